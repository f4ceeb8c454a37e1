"""LLM.generate / SamplingParams / RequestOutput as a user switching over from vLLM expects them.

Each test pins vLLM's documented behaviour (SamplingParams, LLM.generate, RequestOutput,
CompletionOutput, Logprob) on the tiny random models of test_engine_robustness, on the CPU.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastinfer.llm import LLM
from fastinfer.outputs import CompletionOutput
from fastinfer.sampling import process_logits
from fastinfer.sampling_params import SamplingParams
from test_engine import run_alone
from test_engine_robustness import CharTokenizer, hf, loaded, with_tok  # noqa: F401 - fixtures

pytest.importorskip("transformers")
GREEDY = dict(temperature=0.0, ignore_eos=True)


def greedy_free(llm, prompt="hello", max_tokens=12):
    return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)[0].outputs[0]


class SpecialTokenizer(CharTokenizer):
    """CharTokenizer with special tokens: their text is "<sN>", dropped when skip_special_tokens."""

    def __init__(self, special: set[int]):
        self.special = special

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join("" if (i in self.special and skip_special_tokens) else
                       f"<s{i}>" if i in self.special else self.ALPHA[i % 26] for i in ids)


def first_new_token(free_ids, start=2):
    """An index k >= start whose token does not occur earlier in free_ids, and that token."""
    for k in range(start, len(free_ids)):
        if free_ids[k] not in free_ids[:k]:
            return k, free_ids[k]
    pytest.skip("no token that first appears late in the greedy run")


# ---- stop tokens, EOS and stop strings ------------------------------------------------------------

def test_stop_token_in_output_unless_special(loaded):
    """vLLM's documentation of stop_token_ids: "The returned output will contain the stop tokens
    unless the stop tokens are special tokens": finish_reason 'stop', stop_reason = the id, the
    token last in token_ids, and its text in `text` unless it is a special token being skipped."""
    plain = dataclasses.replace(loaded, tokenizer=CharTokenizer())
    free = greedy_free(LLM(plain, num_blocks=64))
    k, tok = first_new_token(free.token_ids)
    params = dict(max_tokens=12, stop_token_ids=[tok], **GREEDY)
    out = LLM(plain, num_blocks=64).generate(["hello"], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", tok, free.token_ids[:k + 1])
    assert out.text == free.text[:k + 1]
    special = SpecialTokenizer({tok})
    llm = LLM(dataclasses.replace(loaded, tokenizer=special), num_blocks=64)
    skipped = llm.generate(["hello"], SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    assert (skipped.text, skipped.token_ids, skipped.stop_reason) == (free.text[:k], out.token_ids, tok)
    shown = llm.generate(["hello"], SamplingParams(skip_special_tokens=False, **params), use_tqdm=False)[0].outputs[0]
    assert shown.text == free.text[:k] + f"<s{tok}>"


def test_stop_string_include_stop_str_in_output(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    free = greedy_free(llm)
    stop = free.text[3:5]
    at = free.text.find(stop)
    cut = llm.generate(["hello"], SamplingParams(max_tokens=12, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (free.text[:at], "stop", stop)
    kept = llm.generate(["hello"], SamplingParams(max_tokens=12, stop=[stop], include_stop_str_in_output=True,
                                                  **GREEDY), use_tqdm=False)[0].outputs[0]
    assert (kept.text, kept.stop_reason, kept.token_ids) == (free.text[:at + 2], stop, cut.token_ids)
    assert len(kept.token_ids) == at + 2  # one letter per token: the token completing the stop string is kept
    streamed = "".join(d.text for d in llm.stream(["hello"], SamplingParams(
        max_tokens=12, stop=[stop], include_stop_str_in_output=True, **GREEDY)))
    assert streamed == kept.text


def test_length_finish_has_no_stop_reason(with_tok):
    out = greedy_free(LLM(with_tok, num_blocks=64), max_tokens=5)
    assert (out.finish_reason, out.stop_reason, len(out.token_ids)) == ("length", None, 5)
    assert out.finished() is True  # vLLM: CompletionOutput.finished() is a method
    running = CompletionOutput(0, "", [], None)
    assert running.finished() is False


# ---- detokenize, logprobs, prompt_logprobs -------------------------------------------------------

def test_detokenize_false_gives_token_ids_and_no_text(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    free = greedy_free(llm, max_tokens=6)
    out = llm.generate(["hello"], SamplingParams(max_tokens=6, detokenize=False, logprobs=1, **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert (out.text, out.token_ids) == ("", free.token_ids)
    assert all(lp.decoded_token is None for entry in out.logprobs for lp in entry.values())
    with pytest.raises(ValueError, match="detokenize"):  # vLLM: stop strings need detokenize=True
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize=0)


def test_logprobs_are_vllm_logprob_objects_with_rank_and_decoded_token(with_tok):
    """vLLM: logprobs[i] is {token id: Logprob(logprob, rank, decoded_token)} with the sampled token and
    the top-`logprobs` ones (ranks 1..k); cumulative_logprob sums the sampled tokens' logprobs and is
    None when no logprobs were asked for."""
    llm = LLM(with_tok, num_blocks=64)
    tok = with_tok.tokenizer
    params = SamplingParams(max_tokens=5, temperature=0.9, seed=3, logprobs=3, ignore_eos=True)
    out = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    total = 0.0
    for t, entry in zip(out.token_ids, out.logprobs):
        assert t in entry and len(entry) in (3, 4)
        top = sorted((lp for i, lp in entry.items() if i != t or lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top][:3] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
        for i, lp in entry.items():
            assert isinstance(lp.logprob, float) and lp.logprob <= 0 and math.isfinite(lp.logprob)
            assert lp.decoded_token == tok.decode([i])
        better = sum(lp.logprob > entry[t].logprob for lp in entry.values())
        assert entry[t].rank >= better + 1
        total += entry[t].logprob
    assert out.cumulative_logprob == pytest.approx(total)
    greedy = llm.generate(["hello"], SamplingParams(max_tokens=4, logprobs=0, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert all(list(e) == [t] and e[t].rank == 1 for t, e in zip(greedy.token_ids, greedy.logprobs))
    plain = greedy_free(llm, max_tokens=3)
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_unsupported_vllm_fields_fail_naming_the_field(with_tok):
    """Fields fastinfer does not implement fail loudly at non-default values; vLLM's defaults pass."""
    SamplingParams(prompt_logprobs=None, spaces_between_special_tokens=True, detokenize=True,
                   include_stop_str_in_output=False, truncate_prompt_tokens=None)
    for field, value in [("prompt_logprobs", -1), ("spaces_between_special_tokens", False),
                         ("truncate_prompt_tokens", 0), ("include_stop_str_in_output", 1)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    for field in ("best_of", "logits_processors"):
        with pytest.raises((TypeError, ValueError), match=field):
            SamplingParams(**{field: 2})
    for field in ("structured_outputs", "guided_decoding"):  # supported (tests/test_structured.py): typed
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: 2})
    out = LLM(with_tok, num_blocks=64).generate("hello", SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert out.prompt_logprobs is None


# ---- prompts -------------------------------------------------------------------------------------

def test_prompt_dicts_and_truncate_prompt_tokens(with_tok):
    """vLLM prompts: str, {"prompt": str}, {"prompt_token_ids": [...]}, alone or in a list;
    truncate_prompt_tokens=k keeps the prompt's last k tokens."""
    llm = LLM(with_tok, num_blocks=64)
    tok = with_tok.tokenizer
    ids = tok("hello")["input_ids"]
    params = SamplingParams(max_tokens=4, **GREEDY)
    outs = llm.generate(["hello", {"prompt": "hello"}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", "hello", None]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    single = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=r"prompts\[1\].*multi_modal_data"):
        llm.generate(["hello", {"prompt": "x", "multi_modal_data": {"image": 1}}], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[0\].*prompt"):
        llm.generate([{"text": "hello"}], params, use_tqdm=False)
    assert not llm.engine.requests
    cut = llm.generate(["hello"], SamplingParams(max_tokens=4, truncate_prompt_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-2:]
    assert cut.outputs[0].token_ids == llm.generate([ids[-2:]], params, use_tqdm=False)[0].outputs[0].token_ids


def test_list_of_params_per_prompt_and_n(loaded):
    llm = LLM(loaded, num_blocks=64)
    params = [SamplingParams(max_tokens=3, n=3, **GREEDY), SamplingParams(max_tokens=5, **GREEDY)]
    a, b = llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert all(c.token_ids == run_alone(loaded, [5, 6, 7], 3) for c in a.outputs)  # greedy n: identical copies
    assert len(b.outputs) == 1 and len(b.outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[5, 6, 7], [8, 9]], params[:1], use_tqdm=False)


def test_max_tokens_none_runs_to_max_model_len(loaded):
    llm = LLM(loaded, num_blocks=64, max_model_len=40)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=None, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (35, "length")


# ---- seeds ---------------------------------------------------------------------------------------

def test_seed_is_per_request(loaded):
    """vLLM: a seeded request gives the same tokens whatever else is in the batch; two requests with
    the same seed give the same tokens; the n completions of a seeded request differ."""
    llm = LLM(loaded, num_blocks=128)
    seeded = SamplingParams(max_tokens=8, temperature=1.5, seed=1234, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=8, temperature=1.5, ignore_eos=True)
    outs = llm.generate([[9, 10], [5, 6, 7], [5, 6, 7]], [other, seeded, seeded], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids == alone
    other_seed = llm.generate([[5, 6, 7]], dataclasses.replace(seeded, seed=99), use_tqdm=False)[0].outputs[0]
    assert other_seed.token_ids != alone
    n3 = llm.generate([[5, 6, 7]], dataclasses.replace(seeded, n=3), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in n3.outputs}) == 3
    again = llm.generate([[5, 6, 7]], dataclasses.replace(seeded, n=3), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in n3.outputs]


# ---- penalties -----------------------------------------------------------------------------------

def test_penalty_semantics():
    """vLLM: presence / frequency penalties count output tokens only (logit -= f * count + p * [count > 0]);
    repetition_penalty every prompt and output token (divide positive logits, multiply negative)."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    prompt, output = [0], [1, 1, 2]
    pf = process_logits(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, temperature=0)],
                        [prompt + output], [output])
    assert pf.tolist() == [[2.0, -1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 1.0]]
    rep = process_logits(logits, [SamplingParams(repetition_penalty=2.0, temperature=0)], [prompt + output], [output])
    assert rep.tolist() == [[1.0, -2.0, 0.25, 1.0]]
    for field in ("presence_penalty", "frequency_penalty"):
        SamplingParams(**{field: -2.0})
        SamplingParams(**{field: 2.0})
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: 2.5})
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


# ---- LLM.generate defaults and progress bar ------------------------------------------------------

def test_default_sampling_params_come_from_the_generation_config(loaded):
    """vLLM (generation_config="auto"): generate() without SamplingParams uses the model's generation
    config's non-default temperature / top_k / top_p / min_p / repetition_penalty / max_new_tokens."""
    gen = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 50, "top_p": 1.0, "do_sample": True}
    llm = LLM(dataclasses.replace(loaded, generation_defaults=gen), num_blocks=64)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k, defaults.top_p) == (0.0, 3, 0, 1.0)
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 3 and out.token_ids == run_alone(loaded, [5, 6, 7], 3)[:len(out.token_ids)]
    assert LLM(loaded, num_blocks=64).get_default_sampling_params() == SamplingParams()


def test_use_tqdm_accepts_a_tqdm_class(loaded):
    """vLLM: use_tqdm may be a callable building the progress bar (e.g. a tqdm subclass)."""
    made = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    LLM(loaded, num_blocks=64).generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=Bar)
    assert len(made) == 1 and (made[0].total, made[0].n) == (2, 2)


# ---- logit_bias, allowed_token_ids ----------------------------------------------------------------

def test_allowed_token_ids_restrict_every_token(with_tok):
    """vLLM's allowed_token_ids: the other ids' logits are -inf, greedy and sampled, one id or several."""
    llm = LLM(with_tok, num_blocks=64)
    allowed = [3, 7, 11]
    for params in (SamplingParams(max_tokens=8, allowed_token_ids=allowed, **GREEDY),
                   SamplingParams(max_tokens=8, allowed_token_ids=allowed, temperature=1.5, seed=2, ignore_eos=True)):
        out = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 8 and set(out.token_ids) <= set(allowed)
    one = llm.generate(["hello"], SamplingParams(max_tokens=4, allowed_token_ids=[5], **GREEDY), use_tqdm=False)
    assert one[0].outputs[0].token_ids == [5] * 4


def test_logit_bias_shifts_the_logits(with_tok):
    """A bias of -100 on the greedy token makes the runner-up win; +100 on any token makes it win; the
    processed logits are the raw ones plus the bias (before the penalties and warpers)."""
    llm = LLM(with_tok, num_blocks=64)
    free = greedy_free(llm, max_tokens=1).token_ids[0]
    logits = torch.randn(2, 40)
    biased = process_logits(logits, [SamplingParams(logit_bias={3: 2.5, 7: -1.0}), SamplingParams()],
                            [[], []], [[], []])
    expected = logits.clone()
    expected[0, 3] += 2.5
    expected[0, 7] -= 1.0
    torch.testing.assert_close(biased, expected)
    pushed = llm.generate(["hello"], SamplingParams(max_tokens=3, logit_bias={9: 100.0}, **GREEDY), use_tqdm=False)
    assert pushed[0].outputs[0].token_ids == [9, 9, 9]
    demoted = llm.generate(["hello"], SamplingParams(max_tokens=1, logit_bias={free: -100.0}, **GREEDY),
                           use_tqdm=False)[0].outputs[0].token_ids[0]
    assert demoted != free


@pytest.mark.parametrize("kwargs, match", [
    (dict(logit_bias=[1, 2]), "logit_bias must be None or a dict"),
    (dict(logit_bias={-1: 1.0}), "logit_bias must be None or a dict"),
    (dict(logit_bias={1: float("nan")}), "logit_bias must be None or a dict"),
    (dict(logit_bias={1: 1e39}), "logit_bias must be None or a dict"),
    (dict(logit_bias={1: float("inf")}), "logit_bias must be None or a dict"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be None or a non-empty list"),
    (dict(allowed_token_ids=[1, "a"]), "allowed_token_ids must be None or a non-empty list"),
])
def test_logit_bias_and_allowed_ids_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_minus_inf_bans_and_allowed_stop_only_with_min_tokens_fails(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    free = greedy_free(llm, max_tokens=1).token_ids[0]
    banned = llm.generate(["hello"], SamplingParams(max_tokens=4, logit_bias={free: float("-inf")}, **GREEDY),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert free not in banned
    with pytest.raises(ValueError, match="allowed_token_ids holds only stop tokens"):
        llm.generate(["hello"], SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=[5], stop_token_ids=[5]),
                     use_tqdm=False)


def test_logit_bias_and_allowed_ids_outside_the_vocabulary_fail_the_request(with_tok):
    llm = LLM(with_tok, num_blocks=64)
    vocab = llm.loaded.model.config.vocab_size
    for kwargs in (dict(logit_bias={vocab: 1.0}), dict(allowed_token_ids=[0, vocab + 3])):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate(["hello"], SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)


def test_vllm_engine_arguments(loaded):
    """LLM(seed=) seeds the draws of requests without their own seed, so two LLMs built with the same seed sample
    the same tokens; vLLM's enable_chunked_prefill=True / swap_space / disable_log_stats / tokenizer_mode="auto"
    are accepted, what fastinfer cannot honour is refused by name."""
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)

    def sampled(seed):
        llm = LLM(loaded, seed=seed, enable_chunked_prefill=True, swap_space=4, disable_log_stats=False,
                  tokenizer_mode="auto")
        return llm.generate([[5, 6, 7]] * 3, params, use_tqdm=False)

    first, again, other = sampled(123), sampled(123), sampled(7)
    tokens = [o.outputs[0].token_ids for o in first]
    assert tokens == [o.outputs[0].token_ids for o in again]
    assert tokens != [o.outputs[0].token_ids for o in other]
    for kwargs, match in [({"enable_chunked_prefill": False}, "enable_chunked_prefill"), ({"seed": "1"}, "seed"),
                          ({"swap_space": -1}, "swap_space"), ({"tokenizer_mode": "slow"}, "tokenizer_mode")]:
        with pytest.raises(ValueError, match=match):
            LLM(loaded, **kwargs)


def test_per_request_adapters_and_priorities_are_refused_by_name(loaded):
    llm = LLM(loaded)
    with pytest.raises(ValueError, match="lora_request: per-request LoRA adapters are not supported"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match="priority"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False, priority=[1])
