"""Continuous batching: staggered arrivals, preemption, chunked prefill, prefix caching, abort, n > 1."""
from __future__ import annotations

import random

import pytest
import torch

from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model

pytest.importorskip("transformers")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return get_loaded(make_hf_model("llama", seed=11))


def make_prompts(count: int, seed: int, lo: int = 1, hi: int = 60, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def run_alone(loaded, prompt: list[int], max_tokens: int) -> list[int]:
    engine = Engine(loaded, EngineConfig(num_blocks=64, enable_prefix_caching=False))
    engine.add_request("x", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    while engine.has_unfinished():
        engine.step()
    return engine.pop_finished("x").outputs[0].token_ids


def drain(engine: Engine, pending: list[tuple[str, list[int], int]], arrivals_per_step: int) -> dict[str, list[int]]:
    """Add requests a few per step while stepping; returns request_id -> tokens of finished ones."""
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for rid, prompt, max_tokens in pending[:arrivals_per_step]:
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        del pending[:arrivals_per_step]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id).outputs[0].token_ids
        engine.blocks.check_invariants()
    return done


@pytest.fixture(scope="module")
def expected(loaded):
    prompts = make_prompts(64, seed=0)
    lengths = [random.Random(i).randint(1, 24) for i in range(64)]
    return prompts, lengths, [run_alone(loaded, p, n) for p, n in zip(prompts, lengths)]


@pytest.mark.parametrize("budget", [16, 64, 512])
def test_staggered_batch_with_preemption_matches_alone(loaded, expected, budget):
    prompts, lengths, alone = expected
    # 12 blocks of 16 slots hold 2-4 of these sequences: 8 running at once must preempt.
    engine = Engine(loaded, EngineConfig(num_blocks=12, max_num_seqs=8, max_num_batched_tokens=budget))
    pending = [(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    done = drain(engine, pending, arrivals_per_step=3)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert [done[str(i)] for i in range(64)] == alone
    assert engine.blocks.num_in_use == 0
    assert engine.blocks.num_free + engine.blocks.num_cached == engine.blocks.num_blocks


def test_prefix_caching_reuses_blocks_without_changing_outputs(loaded):
    shared = make_prompts(1, seed=5, lo=80, hi=80)[0]
    prompts = [shared + tail for tail in make_prompts(12, seed=6, lo=1, hi=20)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    cached = LLM(loaded, num_blocks=128, enable_prefix_caching=True, max_num_seqs=4)
    plain = LLM(loaded, num_blocks=128, enable_prefix_caching=False, max_num_seqs=4)
    with_cache = [o.outputs[0].token_ids for o in cached.generate(prompts, params, use_tqdm=False)]
    without = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert with_cache == without
    assert cached.prefix_cache_hit_rate > 0.5, cached.prefix_cache_hit_rate
    assert plain.prefix_cache_hit_rate == 0.0
    # A later identical prompt is served from the cache: its 80 shared tokens (5 blocks).
    out = cached.generate([prompts[0]], params, use_tqdm=False)[0]
    assert out.num_cached_tokens >= 80 and out.outputs[0].token_ids == with_cache[0]


def test_abort_ten_of_hundred(loaded):
    prompts = make_prompts(100, seed=7, lo=1, hi=20)
    engine = Engine(loaded, EngineConfig(num_blocks=400, max_num_seqs=128, max_num_batched_tokens=4096))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=6, **GREEDY))
    engine.step()  # every request is running now
    aborted = {str(i) for i in range(0, 100, 10)}
    for rid in aborted:
        engine.abort(rid)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id)
    for rid in aborted:
        out = engine.pop_finished(rid)
        assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 1
    assert set(done) == {str(i) for i in range(100)} - aborted
    for rid, out in done.items():
        assert out.outputs[0].token_ids == run_alone(loaded, prompts[int(rid)], 6)
    engine.blocks.check_invariants()
    assert engine.blocks.num_in_use == 0


def test_parallel_sampling_shares_prompt_blocks(loaded):
    prompt = make_prompts(1, seed=8, lo=40, hi=40)[0]  # 2.5 blocks: 2 shared, 1 partial copied
    engine = Engine(loaded, EngineConfig(num_blocks=32, enable_prefix_caching=False))
    engine.add_request("r", prompt, SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True))
    engine.step()  # prefill + fork
    seqs = engine.requests["r"].seqs
    assert len(seqs) == 4
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert all(engine.blocks.ref_counts[b] == 4 for b in shared)
    assert len({s.block_table[2] for s in seqs}) == 4  # each completion owns its partial block
    while engine.has_unfinished():
        engine.step()
    out = engine.pop_finished("r")
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and all(len(c.token_ids) == 5 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.blocks.num_in_use == 0


def test_parallel_greedy_completions_equal_single(loaded):
    prompt = make_prompts(1, seed=9, lo=21, hi=21)[0]
    llm = LLM(loaded, num_blocks=32)
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=7, **GREEDY), use_tqdm=False)[0]
    assert all(c.token_ids == run_alone(loaded, prompt, 7) for c in out.outputs)


def test_request_that_can_never_fit_fails_at_once(loaded):
    engine = Engine(loaded, EngineConfig(num_blocks=4))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(3, 80)), SamplingParams(max_tokens=10))
    engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=4, **GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pop_finished("ok").outputs[0].token_ids) == 4


def test_seeded_sampling_is_reproducible_across_batches(loaded):
    prompts = make_prompts(6, seed=12, lo=3, hi=30)
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
    alone = LLM(loaded, num_blocks=64).generate([prompts[2]], p, use_tqdm=False)[0].outputs[0].token_ids
    batched = LLM(loaded, num_blocks=64, max_num_batched_tokens=16).generate(prompts, p, use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
