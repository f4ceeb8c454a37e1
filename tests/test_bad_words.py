"""vLLM's SamplingParams.bad_words: words tokenized as vLLM does (the word, and " " + word when that starts with
another token and has as many), a word's last token banned whenever the output ends with the rest of it,
matched against the output only (HF's bad_words_ids, the token-level field, also looks at the prompt)."""
from __future__ import annotations

import dataclasses

import pytest

from fastinfer.llm import LLM
from fastinfer.request_checks import bad_words_token_ids
from fastinfer.sampling_params import SamplingParams
from fastinfer.structured import StructuredOutputsParams
from test_engine_robustness import hf, loaded  # noqa: F401 - fixtures
from test_vllm_compat import GREEDY, first_new_token

pytest.importorskip("transformers")
PROMPT = "t5 t17 t33 t2 t99"


class WordTokenizer:
    """Token id N <-> the word "tN"; a text is its space-separated words (a leading space changes nothing)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def llm(loaded):  # noqa: F811
    return LLM(dataclasses.replace(loaded, tokenizer=WordTokenizer()), num_blocks=64)


def run(llm, **kw):
    return list(llm.generate([PROMPT], SamplingParams(max_tokens=12, **GREEDY, **kw), use_tqdm=False)[0].outputs[0].token_ids)


def test_a_one_token_word_is_never_generated(llm):
    free = run(llm)
    k, tok = first_new_token(free)
    out = run(llm, bad_words=[f"t{tok}"])
    assert out[:k] == free[:k] and tok not in out


def test_a_two_token_word_bans_its_last_token_after_the_first(llm):
    free = run(llm)
    k, tok = first_new_token(free)
    out = run(llm, bad_words=[f"t{free[k - 1]} t{tok}"])
    assert out[:k] == free[:k] and out[k] != tok


def test_matched_against_the_output_only(llm):
    """A word whose first token ends the prompt does not ban the output's first token (vLLM); HF's
    bad_words_ids, over prompt + output, does."""
    free = run(llm)
    if free[0] in free[1:]:
        pytest.skip("the first token recurs in the greedy run")
    last_prompt = int(PROMPT.split()[-1][1:])
    assert run(llm, bad_words=[f"t{last_prompt} t{free[0]}"]) == free
    assert run(llm, bad_words_ids=[[last_prompt, free[0]]])[0] != free[0]


def test_vllm_tokenization_rule():
    class Folding:
        """A leading space folds into the first token (id + 100); "ab" is two tokens, "abc" grows by one with it."""

        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            spaced = text.startswith(" ")
            ids = [ord(c) for c in text.strip()]
            if spaced:
                ids[0] += 100
                if text.strip() == "abc":
                    ids.append(7)
            return {"input_ids": ids}
    tok = Folding()
    assert bad_words_token_ids(tok, ["ab"]) == [[97, 98], [197, 98]]
    assert bad_words_token_ids(tok, ["  ab"]) == [[97, 98], [197, 98]]  # leading spaces stripped first
    assert bad_words_token_ids(tok, ["abc"]) == [[97, 98, 99]]  # the spaced form has another length: left out


@pytest.mark.parametrize("kw, match", [
    (dict(bad_words=["  "]), "bad_words"), (dict(bad_words=[3]), "bad_words"),
    (dict(bad_words=["t3"], structured_outputs=StructuredOutputsParams(choice=["a"])), "bad_words"),
])
def test_bad_values_are_refused(llm, kw, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([PROMPT], SamplingParams(max_tokens=4, **kw), use_tqdm=False)


def test_needs_a_tokenizer_and_no_speculation(loaded):  # noqa: F811
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        LLM(loaded, num_blocks=64).generate([[5, 6]], SamplingParams(max_tokens=4, bad_words=["x"]), use_tqdm=False)
    spec = LLM(dataclasses.replace(loaded, tokenizer=WordTokenizer()), num_blocks=64,
               speculative={"method": "ngram", "num_tokens": 2})
    with pytest.raises(ValueError, match="bad_words is not supported with speculative decoding"):
        spec.generate([PROMPT], SamplingParams(max_tokens=4, bad_words=["t3"]), use_tqdm=False)


def test_a_string_is_one_word():
    assert SamplingParams(bad_words="t3").bad_words == ["t3"]
