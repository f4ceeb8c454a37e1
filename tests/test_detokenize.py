"""Incremental detokenization (fastinfer.detokenize) equals decoding the whole output at every step."""
from __future__ import annotations

import random

import pytest

from fastinfer.detokenize import detokenize
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


def _incremental(tokenizer, ids, skip_special=True):
    seq = Sequence("r", 0, [1], SamplingParams(skip_special_tokens=skip_special), None, 0)
    for tok in ids:
        seq.output_token_ids.append(tok)
        detokenize(tokenizer, seq)
    return seq


def test_clean_up_tokenization_spaces_loses_no_characters(tokenizer):
    """transformers 4.x applies clean_up_tokenization_spaces (" 's" -> "'s", " ." -> ".") to BPE
    tokenizers whose config asks for it (Llama-3, GPT-2); applied per window, it deleted a
    character on the far side of the window's edge: "it 's fine" came out as "it ' fine"."""
    ids = tokenizer("it 's fine , isn 't it ?")["input_ids"]
    saved = {k: getattr(tokenizer, k, None) for k in ("clean_up_tokenization_spaces",
             "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")}
    try:  # what transformers 4.x does for a tokenizer_config with clean_up_tokenization_spaces: true
        tokenizer.clean_up_tokenization_spaces = True
        tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        seq = _incremental(tokenizer, ids)
        assert seq.text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    finally:
        for k, v in saved.items():
            setattr(tokenizer, k, v)


def test_final_flush_keeps_an_incomplete_tail(tokenizer):
    """A sequence that finishes inside a multi-byte character: its text ends as the whole output's
    decode does (with U+FFFD), not without the held-back bytes."""
    emoji = tokenizer("Ünïcödé 🚀")["input_ids"]
    assert tokenizer.decode(emoji[:-1]).endswith("\ufffd")  # the emoji's bytes span several tokens
    for cut in range(1, len(emoji) + 1):  # cut after every byte piece
        ids = emoji[:cut]
        seq = _incremental(tokenizer, ids)
        detokenize(tokenizer, seq, final=True)
        assert seq.text == tokenizer.decode(ids, skip_special_tokens=True), (cut, seq.text)
