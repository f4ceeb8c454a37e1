"""Review of speculative decoding in the engine: every SamplingParams feature must behave with
speculation on exactly as with it off (greedy: token for token; sampled: same distribution).

Most tests use the target itself as the draft model, so that (greedy) every proposal is accepted:
stops, max_tokens, min_tokens and stop strings then land *inside* an accepted run of draft tokens.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastinfer.engine import Engine, EngineConfig
from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams
from test_engine import make_prompts

pytest.importorskip("transformers")
from test_spec_engine import GREEDY, draft, target  # noqa: E402,F401  (the same models and fixtures)


class CharTokenizer:
    """One lowercase letter per token id (id % 26): each token adds exactly one character."""
    ALPHA = "abcdefghijklmnopqrstuvwxyz"

    def __call__(self, text):
        return {"input_ids": [3 + self.ALPHA.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.ALPHA[i % 26] for i in ids)


def repetitive(count: int, seed: int) -> list[list[int]]:
    out = []
    for i, base in enumerate(make_prompts(count, seed, lo=3, hi=9)):
        out.append((base * 6)[: 10 + 5 * (i % 7)])
    return out


def spec_cfg(kind, target, draft, k=4, **extra):
    if kind is None:
        return None
    if kind == "self":
        return {"method": "draft", "model": target, "num_tokens": k, **extra}
    if kind == "draft":
        return {"method": "draft", "model": draft, "num_tokens": k, **extra}
    return {"method": "ngram", "num_tokens": k, **extra}


def make_engine(loaded, speculative=None, eos=None, **cfg):
    cfg = {"num_blocks": 256, "max_num_seqs": 16, **cfg}
    engine = Engine(loaded, EngineConfig(speculative=speculative, **cfg))
    if eos is not None:
        engine.eos_ids = set(eos)
    return engine


def drain(engine: Engine) -> dict:
    done = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id)
        engine.blocks.check_invariants()
    assert engine.blocks.num_in_use == 0
    return done


def run(loaded, prompts, params, speculative=None, eos=None, **cfg):
    """[(token_ids, text, finish_reason, stop_reason) per completion] per prompt, and the engine."""
    engine = make_engine(loaded, speculative, eos, **cfg)
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done = drain(engine)
    assert set(done) == {str(i) for i in range(len(prompts))}, "a request never reported finished"
    res = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in done[str(i)].outputs]
           for i in range(len(prompts))]
    return res, engine


def assert_same_with_speculation(loaded, draft, prompts, params, kinds=("self", "ngram", "draft"), k=4,
                                 eos=None, **cfg):
    expected, _ = run(loaded, prompts, params, None, eos, **cfg)
    engines = {}
    for kind in kinds:
        got, engine = run(loaded, prompts, params, spec_cfg(kind, loaded, draft, k), eos, **cfg)
        assert got == expected, kind
        engines[kind] = engine
    return expected, engines


# ================================================================================================
# stops / lengths inside an accepted run
# ================================================================================================
def test_stop_token_inside_accepted_run(target, draft):
    prompts = repetitive(4, seed=3)
    free, _ = run(target, prompts, SamplingParams(max_tokens=24, **GREEDY))
    # per prompt, a stop id taken from the middle of its free-running output
    params = [SamplingParams(max_tokens=24, stop_token_ids=[c[0][0][j]], **GREEDY)
              for c, j in zip(free, (2, 5, 7, 9))]
    expected, engines = assert_same_with_speculation(target, draft, prompts, params)
    for c, j in zip(expected, (2, 5, 7, 9)):
        toks, _, reason, stop = c[0]
        assert reason == "stop" and toks[-1] == stop and len(toks) <= j + 1
    assert engines["self"].spec_stats.acceptance_rate == 1.0


def test_eos_inside_accepted_run_and_min_tokens(target, draft):
    """EOS (engine.eos_ids) hit inside an accepted run; with min_tokens, EOS suppressed until then,
    also at the verified positions of draft tokens."""
    prompts = repetitive(4, seed=4)
    free, _ = run(target, prompts, SamplingParams(max_tokens=20, **GREEDY))
    eos = {c[0][0][4] for c in free}
    for min_tokens in (0, 3, 8):
        params = SamplingParams(max_tokens=20, min_tokens=min_tokens, temperature=0.0)
        expected, _ = assert_same_with_speculation(target, draft, prompts, params, eos=eos)
        for c in expected:
            toks, _, reason, _ = c[0]
            assert not set(toks[:min_tokens]) & eos
            if reason == "stop":
                assert toks[-1] in eos and len(toks) >= max(min_tokens, 1)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 6, 7, 11])
def test_max_tokens_reached_mid_acceptance(target, draft, max_tokens):
    prompts = repetitive(3, seed=5)
    expected, engines = assert_same_with_speculation(target, draft, prompts,
                                                     SamplingParams(max_tokens=max_tokens, **GREEDY),
                                                     kinds=("self", "ngram"))
    assert all(len(c[0][0]) == max_tokens and c[0][2] == "length" for c in expected)


def test_max_model_len_reached_mid_acceptance(target, draft):
    prompts = repetitive(3, seed=6)
    max_len = max(map(len, prompts)) + 7
    params = SamplingParams(max_tokens=None, **GREEDY)  # filled in: up to max_model_len
    expected, _ = assert_same_with_speculation(target, draft, prompts, params, kinds=("self", "ngram"),
                                               max_model_len=max_len)
    for p, c in zip(prompts, expected):
        assert len(p) + len(c[0][0]) == max_len and c[0][2] == "length"


def test_stop_string_mid_acceptance(target, draft):
    tok_target = dataclasses.replace(target, tokenizer=CharTokenizer())
    prompts = ["abcabcabcabc", "hellohellohello", "zzyzzyzzy"]
    free, _ = run(tok_target, prompts, SamplingParams(max_tokens=16, **GREEDY))
    params = [SamplingParams(max_tokens=16, stop=[c[0][1][j:j + 2]], **GREEDY) for c, j in zip(free, (1, 4, 6))]
    expected, _ = assert_same_with_speculation(tok_target, draft, prompts, params, kinds=("self", "ngram"))
    for c in expected:
        toks, text, reason, stop = c[0]
        assert reason == "stop" and stop not in text and len(text) <= len(toks)


# ================================================================================================
# penalties
# ================================================================================================
@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.5), dict(presence_penalty=1.0),
                                     dict(frequency_penalty=0.8),
                                     dict(repetition_penalty=0.7, frequency_penalty=-0.5)])
def test_penalties_greedy_match_plain(target, draft, penalty):
    prompts = repetitive(4, seed=7)
    assert_same_with_speculation(target, draft, prompts, SamplingParams(max_tokens=20, **GREEDY, **penalty))


# ================================================================================================
# n > 1, seeds, mixed rows
# ================================================================================================
@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_n_greedy_completions_with_speculation(target, draft, kind):
    prompts = repetitive(3, seed=8)
    expected, _ = assert_same_with_speculation(target, draft, prompts,
                                               SamplingParams(n=3, max_tokens=12, **GREEDY), kinds=(kind,))
    assert all(len(c) == 3 and c[0] == c[1] == c[2] for c in expected)


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_n_completions_when_the_prompt_tail_is_left_for_a_later_step(target, draft, kind):
    """A prompt of 17 tokens under a 16-token budget: its last prompt token is computed in a later
    step, as a running sequence with one uncomputed token, so the scheduler gives it lookahead and
    _propose treats it as a decode. That step goes through _verify, not _expand_forks, so the
    request forks one step late, from a parent that already has an output token: the child copies
    the parent's computed length but not its output, and the next step raises
    "ValueError: sequence 1 feeds no tokens" from the runner (the whole engine step fails)."""
    prompt = (list(range(10, 15)) * 4)[:17]
    params = SamplingParams(n=2, max_tokens=6, **GREEDY)
    expected, _ = run(target, [prompt], params, max_num_batched_tokens=16)
    assert len(expected[0]) == 2
    got, _ = run(target, [prompt], params, spec_cfg(kind, target, draft), max_num_batched_tokens=16)
    assert got == expected


def test_seeded_sampling_is_reproducible_with_speculation(target, draft):
    prompts = repetitive(4, seed=9)
    params = [SamplingParams(max_tokens=16, temperature=0.9, seed=100 + i, ignore_eos=True) for i in range(4)]
    for kind in ("ngram", "draft"):
        a, _ = run(target, prompts, params, spec_cfg(kind, target, draft))
        b, _ = run(target, prompts, params, spec_cfg(kind, target, draft))
        assert a == b, kind


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_seeded_request_does_not_depend_on_the_rest_of_the_batch(target, draft, kind):
    """Without speculation a seeded request's tokens are the same alone or batched with others
    (per-row generators); with speculation too (an earlier verify_rows drew k_max + 1 uniforms from
    each row's generator, so what a request consumed depended on its neighbours' proposals)."""
    mine = (list(range(40, 47)) * 5)[:30]
    others = repetitive(6, seed=10)
    sp = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    greedy = SamplingParams(max_tokens=16, **GREEDY)
    # sanity: without speculation the seeded output is batch-independent
    alone, _ = run(target, [mine], sp)
    batched, _ = run(target, [mine] + others, [sp] + [greedy] * len(others))
    assert alone[0] == batched[0]
    spec = spec_cfg(kind, target, draft, k=5)
    alone, _ = run(target, [mine], sp, spec)
    batched, _ = run(target, [mine] + others, [sp] + [greedy] * len(others), spec)
    assert alone[0] == batched[0]


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_greedy_rows_mixed_with_sampled_rows_in_one_verify_step(target, draft, kind):
    prompts = repetitive(6, seed=11)
    params = [SamplingParams(max_tokens=16, **GREEDY) if i % 2 == 0 else
              SamplingParams(max_tokens=16, temperature=1.0, top_k=20, seed=i, ignore_eos=True) for i in range(6)]
    expected, _ = run(target, prompts[::2], params[::2])
    got, engine = run(target, prompts, params, spec_cfg(kind, target, draft))
    assert got[::2] == expected
    assert all(len(c[0][0]) == 16 for c in got)
    assert engine.spec_stats.num_proposed > 0


# ================================================================================================
# abort, prefix caching, short prompts, logprobs
# ================================================================================================
@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_abort_between_steps_with_speculation(target, draft, kind):
    """A request aborted between two steps (after a verify step left it with lookahead blocks trimmed)
    ends as 'abort' with the tokens it had; the others still equal plain greedy; no block leaks."""
    prompts = repetitive(3, seed=12)
    params = SamplingParams(max_tokens=20, **GREEDY)
    expected, _ = run(target, prompts, params)
    engine = make_engine(target, spec_cfg(kind, target, draft))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    engine.step()  # prefill
    engine.step()  # a verify step
    engine.step()
    had = list(engine.requests["1"].seqs[0].output_token_ids)
    assert 0 < len(had) < 20
    engine.abort("1")
    out = engine.pop_finished("1").outputs[0]
    done = drain(engine)
    assert (out.finish_reason, out.token_ids) == ("abort", had) and had == expected[1][0][0][:len(had)]
    assert [done[r].outputs[0].token_ids for r in ("0", "2")] == [expected[0][0][0], expected[2][0][0]]


def test_ngram_speculation_with_prefix_caching(target, draft):
    """The n-gram path keeps prefix caching: a prompt run again hits the blocks registered by the
    first run (including blocks completed by accepted proposals); outputs stay plain greedy's."""
    base = repetitive(2, seed=13)
    prompts = [base[0] * 4, base[1] * 4]
    params = SamplingParams(max_tokens=40, **GREEDY)
    expected, _ = run(target, prompts, params, enable_prefix_caching=False, block_size=4)
    engine = make_engine(target, spec_cfg("ngram", target, draft), block_size=4)
    assert engine.blocks.enable_prefix_caching
    for round_ in range(3):
        # round 1: prompt + the first run's output as the new prompt (hits blocks filled by verify)
        ps = prompts if round_ != 1 else [p + e[0][0] for p, e in zip(prompts, expected)]
        for i, p in enumerate(ps):
            engine.add_request(f"{round_}-{i}", p, params)
        done = drain(engine)
        got = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in done[f"{round_}-{i}"].outputs]
               for i in range(2)]
        if round_ != 1:
            assert got == expected
        else:
            want, _ = run(target, ps, params, enable_prefix_caching=False, block_size=4)
            assert got == want
            assert all(done[f"1-{i}"].num_cached_tokens > len(prompts[i]) for i in range(2))
    assert engine.blocks.prefix_hit_rate > 0 and engine.spec_stats.num_accepted > 0


@pytest.mark.parametrize("min_n,max_n", [(1, 4), (3, 5), (5, 5)])
def test_prompts_shorter_than_the_ngram(target, draft, min_n, max_n):
    prompts = [[7], [7, 7], [9, 8, 9], [5, 6, 5, 6]]
    params = SamplingParams(max_tokens=10, **GREEDY)
    expected, _ = run(target, prompts, params)
    got, _ = run(target, prompts, params, spec_cfg("ngram", target, draft, k=3, prompt_lookup_min=min_n,
                                                   prompt_lookup_max=max_n))
    assert got == expected


def test_one_token_prompts_with_a_draft_model(target, draft):
    prompts = [[7], [300], [9, 8]]
    expected, _ = assert_same_with_speculation(target, draft, prompts,
                                               SamplingParams(max_tokens=10, **GREEDY), kinds=("self", "draft"))


def test_logprobs_refused_with_speculation(target, draft):
    for kind in ("ngram", "self"):
        engine = make_engine(target, spec_cfg(kind, target, draft))
        for lp in (0, 1):
            with pytest.raises(ValueError, match="logprobs are not supported with speculative decoding"):
                engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=3, logprobs=lp))
        assert not engine.requests and not engine.has_unfinished()
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=3))  # the id was not taken
        drain(engine)


def test_seeded_n_completions_are_not_copies_with_a_draft_model(target, draft):
    """n = 3 with a seed: each completion samples on its own TokenStream (a child seed per sibling), so
    the three differ, with draft == target (every proposal accepted) as without speculation; the
    draft proposes with each sibling's own stream."""
    prompt = repetitive(1, seed=14)[0]
    params = SamplingParams(n=3, max_tokens=12, temperature=1.5, seed=5, ignore_eos=True)
    plain, _ = run(target, [prompt], params)
    assert len({tuple(c[0]) for c in plain[0]}) == 3
    got, engine = run(target, [prompt], params, spec_cfg("self", target, draft))
    assert engine.spec_stats.acceptance_rate == 1.0
    assert len({tuple(c[0]) for c in got[0]}) == 3, [c[0] for c in got[0]]


# ---- seeded sampling: randomness keyed by output position (sampling.TokenStream) ----------------

@pytest.mark.parametrize("k", [1, 4])
def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(target, draft, k):
    """A seeded row draws the noise of output position t from (seed, t), and speculation emits at t
    that same draw (spec_decode.coupled_verify; the draft proposes with it too), so the tokens are
    the ones sampling alone gives, for the n-gram proposer, a draft model and the target as its own
    draft, with penalties, top-k / top-p and n > 1 siblings (each its own child seed)."""
    prompts = repetitive(5, seed=15)
    params = [SamplingParams(max_tokens=14, temperature=0.9, seed=200 + i, ignore_eos=True) for i in range(3)]
    params.append(SamplingParams(max_tokens=14, temperature=1.1, top_k=12, top_p=0.9, seed=9,
                                 repetition_penalty=1.2, presence_penalty=0.3, ignore_eos=True))
    params.append(SamplingParams(n=2, max_tokens=10, temperature=1.0, seed=31, ignore_eos=True))
    assert_same_with_speculation(target, draft, prompts, params, k=k)


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_seeded_request_is_the_same_when_the_token_budget_cuts_its_proposals(target, draft, kind):
    """With a 9-token step budget the scheduler gives a decode sequence fewer proposals than k
    whenever the others took the budget first, so how many proposals a request gets depends on its
    neighbours; its tokens must not (they did when the verify step drew its uniforms in sequence)."""
    mine = (list(range(40, 47)) * 5)[:30]
    others = repetitive(5, seed=16)
    sp = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    rest = [SamplingParams(max_tokens=16, temperature=0.8, seed=50 + i, ignore_eos=True) for i in range(len(others))]
    plain, _ = run(target, [mine], sp)
    spec = spec_cfg(kind, target, draft, k=5)
    alone, _ = run(target, [mine], sp, spec)
    batched, engine = run(target, [mine] + others, [sp] + rest, spec, max_num_batched_tokens=9)
    assert alone[0] == plain[0] and batched[0] == plain[0]
    assert engine.spec_stats.num_proposed > 0


def test_draft_suppresses_stop_tokens_below_min_tokens_as_the_target_does(target, draft):
    """The target never draws a stop token before min_tokens; the draft model now suppresses it too,
    so with the target as its own draft (greedy) every proposal is accepted even where the model's
    favourite token is a stop token (before: the draft proposed it and the target rejected it)."""
    prompts = repetitive(3, seed=17)
    plain, _ = run(target, prompts, SamplingParams(max_tokens=12, **GREEDY))
    stops = sorted({out[0][0][2] for out in plain})  # a token each greedy run emits third
    params = SamplingParams(max_tokens=12, min_tokens=10, stop_token_ids=stops, **GREEDY)
    expected, _ = run(target, prompts, params)
    assert all(out[0][0][2] not in stops for out in expected)  # suppressed: the runs differ from plain
    got, engine = run(target, prompts, params, spec_cfg("self", target, draft, k=4))
    assert got == expected
    assert engine.spec_stats.num_proposed > 0 and engine.spec_stats.acceptance_rate == 1.0
