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


def test_sampled_children_and_preemption_never_generate_a_banned_word(loaded):  # noqa: F811
    """n = 3 sampled completions of two prompts in a pool small enough to preempt: the token and the pair the
    same seeded run produces most without bans never appear with them."""
    from collections import Counter
    llm = LLM(dataclasses.replace(loaded, tokenizer=WordTokenizer()), num_blocks=12, block_size=4,
              max_num_batched_tokens=8)
    base = dict(n=3, max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
    prompts = [PROMPT, "t8 t9 t10"]
    free = [list(o.token_ids) for out in llm.generate(prompts, SamplingParams(**base), use_tqdm=False)
            for o in out.outputs]
    token = Counter(t for ids in free for t in ids).most_common(1)[0][0]
    pairs = Counter((a, b) for ids in free for a, b in zip(ids, ids[1:]) if token not in (a, b))
    pair = pairs.most_common(1)[0][0]
    outs = llm.generate(prompts, SamplingParams(**base, bad_words=[f"t{token}", f"t{pair[0]} t{pair[1]}"]),
                        use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        for o in out.outputs:
            ids = list(o.token_ids)
            assert token not in ids and all(ids[i:i + 2] != list(pair) for i in range(len(ids) - 1)), ids
