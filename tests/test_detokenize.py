"""Incremental detokenization (engine.detokenize) equals decoding the whole output at every step."""
from __future__ import annotations

import random

import pytest

from fastinfer.engine import detokenize
from fastinfer.sampling_params import SamplingParams
from fastinfer.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer():
    from fastinfer.loader.gguf import default_model_path
    from fastinfer.loader.gguf_file import open_gguf
    from fastinfer.loader.gguf_tokenizer import build_tokenizer
    file = open_gguf(default_model_path())  # SmolLM2's byte-level BPE
    return build_tokenizer(file.metadata, file.path)


TEXTS = ["Plain ASCII, with punctuation: done.", "Ünïcödé — “quotes” and emoji 🙂🚀 mixed 中文字符 in a line",
         "  leading spaces\n\nnew lines\tand tabs  ", "def f(x):\n    return x ** 2  # code"]


@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_text_equals_full_decode(tokenizer, skip_special):
    rng = random.Random(0)
    specials = sorted(tokenizer.all_special_ids)
    for text in TEXTS + ["random"]:
        ids = (tokenizer(text)["input_ids"] if text != "random"
               else [rng.randrange(tokenizer.vocab_size) for _ in range(200)])
        ids = ids[:3] + specials[:1] + ids[3:]  # a special token in the middle
        seq = Sequence("r", 0, [1], SamplingParams(skip_special_tokens=skip_special), None, 0)
        for tok in ids:
            seq.output_token_ids.append(tok)
            detokenize(tokenizer, seq)
            full = tokenizer.decode(seq.output_token_ids, skip_special_tokens=skip_special)
            # equal, except while the text ends in an incomplete character (held back)
            assert full.startswith(seq.text)
            assert full == seq.text or full.endswith("\ufffd"), (full, seq.text)
