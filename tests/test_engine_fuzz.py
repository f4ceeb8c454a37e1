"""Randomized (seeded) stress test of the continuous-batching engine against an oracle.

Oracle: each request run alone in a fresh engine with a large KV pool (greedy fp32; or the same seed
for seeded sampling: a seeded request's tokens must not depend on the rest of the batch).
Stressed engine: tiny KV pool (preemption by recompute), small token budget (chunked prefill), few
batch slots, prefix caching on / off, requests arriving over time, shared prompt prefixes, n > 1,
random aborts, varied max_tokens / min_tokens / stop_token_ids / penalties. After every step the
block manager's books are checked against the live sequences' block tables.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model

pytest.importorskip("transformers")
VOCAB = 320


@pytest.fixture(scope="module")
def loaded():
    return get_loaded(make_hf_model("llama", seed=11))


# ---- helpers -------------------------------------------------------------------------------------

def check_books(engine: Engine) -> None:
    """BlockManager invariants plus ref counts against the live sequences' block tables."""
    bm = engine.blocks
    bm.check_invariants()
    assert len(set(bm.free)) == len(bm.free), "a block twice in the free list"
    assert not set(bm.free) & set(bm.cached), "a block both free and cached"
    refs = Counter()
    seqs = [s for r in engine.requests.values() for s in r.seqs]
    seqs += [s for s in list(engine.scheduler.running) + list(engine.scheduler.waiting) if s not in seqs]
    for s in seqs:
        if s.is_finished:
            assert not s.block_table, f"finished {s} still holds blocks {s.block_table}"
        assert len(set(s.block_table)) == len(s.block_table), f"{s} holds a block twice: {s.block_table}"
        refs.update(s.block_table)
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == refs[b], (b, bm.ref_counts[b], refs[b])
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    for s in engine.scheduler.running:
        assert not s.is_finished and s.num_computed_tokens <= len(s)
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
    for s in engine.scheduler.waiting:
        assert not s.is_finished and not s.block_table
    assert len(engine.scheduler.running) <= engine.config.max_num_seqs


_ALONE: dict = {}


def run_alone(loaded, prompt, params: SamplingParams, max_model_len=None, spec=None):
    """The request alone in a fresh engine with a roomy pool (memoized: the fuzz cases share requests)."""
    key = (id(loaded), tuple(prompt), repr(params), max_model_len, repr(spec))
    if key not in _ALONE:
        blocks = -(-(max_model_len or 512) // 16) * params.n + 2
        engine = Engine(loaded, EngineConfig(num_blocks=blocks, enable_prefix_caching=False,
                                             max_model_len=max_model_len, speculative=spec))
        engine.add_request("x", prompt, params)
        while engine.has_unfinished():
            engine.step()
        _ALONE[key] = engine.pop_finished("x")
    return _ALONE[key]


def summary(out):
    return [(c.index, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]


def random_requests(rng: random.Random, count: int, max_model_len=None, spec=None):
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    reqs = []
    for i in range(count):
        tail = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 24))]
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + tail
        if rng.random() < 0.15 and reqs:  # an exact repeat of an earlier prompt
            prompt = list(rng.choice(reqs)[1])
        max_tokens = rng.randint(1, 24)
        if max_model_len is not None:
            prompt = prompt[:max_model_len - 2]
            max_tokens = None if rng.random() < 0.5 else min(max_tokens, max_model_len - len(prompt))
        kw = dict(max_tokens=max_tokens, min_tokens=rng.choice([0, 0, 0, min(max_tokens or len(prompt) and max_model_len - len(prompt), rng.randint(1, 6))]),
                  ignore_eos=rng.random() < 0.5, n=rng.choice([1, 1, 1, 1, 2, 3]))
        if rng.random() < 0.5:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=rng.choice([0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                      top_k=rng.choice([0, 20]), seed=rng.randrange(2**31))
        if rng.random() < 0.3:
            kw.update(repetition_penalty=rng.choice([1.2, 0.9]))
        if rng.random() < 0.2:
            kw.update(presence_penalty=0.5, frequency_penalty=0.3)
        if rng.random() < 0.15 and spec is None:
            kw.update(logprobs=rng.choice([0, 2]))
        reqs.append([f"r{i}", prompt, kw])
    return reqs


def add_stop_tokens(loaded, rng, reqs, max_model_len=None, spec=None):
    """Give some requests a stop token that their lone run actually produces."""
    for req in reqs:
        if rng.random() < 0.35:
            free = run_alone(loaded, req[1], SamplingParams(**req[2]), max_model_len, spec).outputs[0].token_ids
            if len(free) > 1:
                req[2] = dict(req[2], stop_token_ids=[rng.choice(free[1:])])


def matches_prefix(got, want):
    """An aborted completion's tokens are a prefix of one of the oracle's completions."""
    return any(w[1][:len(got)] == got for w in want)


# ---- the fuzz test -------------------------------------------------------------------------------

def fuzz(loaded, seed: int, prefix_caching: bool, pipelined: bool = False, num_requests: int = 22,
         max_model_len=None, spec=None):
    rng = random.Random(seed)
    reqs = random_requests(rng, num_requests, max_model_len, spec)
    add_stop_tokens(loaded, rng, reqs, max_model_len, spec)
    oracle = {rid: summary(run_alone(loaded, p, SamplingParams(**kw), max_model_len, spec)) for rid, p, kw in reqs}
    if spec is not None:  # greedy speculation never changes the output
        for rid, p, kw in reqs:
            if kw["temperature"] == 0.0:
                assert oracle[rid] == summary(run_alone(loaded, p, SamplingParams(**kw), max_model_len)), rid
    block_size = rng.choice([4, 8, 16])
    longest = max(len(p) + (kw["max_tokens"] or max_model_len - len(p)) for _, p, kw in reqs)
    num_blocks = -(-longest // block_size) + rng.randint(0, 3)
    cfg = EngineConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(2, 6),
                       max_num_batched_tokens=rng.choice([5, 16, 33, 64]), enable_prefix_caching=prefix_caching,
                       pipelined_decode=pipelined, max_model_len=max_model_len, speculative=spec)
    engine = Engine(loaded, cfg)
    pending = list(reqs)
    live: set[str] = set()
    aborted: dict[str, None] = {}
    kept_aborted: set[str] = set()
    results: dict[str, object] = {}
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if pending:
                rid, p, kw = pending.pop(0)
                engine.add_request(rid, p, SamplingParams(**kw))
                live.add(rid)
        if live and rng.random() < 0.04:
            rid = rng.choice(sorted(live))
            engine.abort(rid)
            live.discard(rid)
            aborted[rid] = None
            out = engine.requests[rid]
            assert all(s.is_finished and not s.block_table for s in out.seqs)
            if rng.random() < 0.5:
                results[rid] = engine.pop_finished(rid)
            else:
                kept_aborted.add(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id in live, f"{out.request_id} reported finished twice / after abort"
                live.discard(out.request_id)
                results[out.request_id] = engine.pop_finished(out.request_id)
        check_books(engine)
        steps += 1
        assert steps < 3000, "no progress"
    # every request accounted for
    assert not live
    assert set(engine.requests) == kept_aborted
    for rid in kept_aborted:
        results[rid] = engine.pop_finished(rid)
    assert not engine.requests
    assert set(results) == {rid for rid, _, _ in reqs}
    bm = engine.blocks
    assert bm.num_in_use == 0 and bm.num_free + bm.num_cached == bm.num_blocks
    assert prefix_caching or bm.num_cached == 0
    for rid, p, kw in reqs:
        got = results[rid]
        assert got.finished and got.prompt_token_ids == p
        loose = spec is not None and kw["temperature"] > 0 and kw.get("seed") is None
        if rid in aborted and loose:
            assert all(c.finish_reason in ("abort", "stop", "length") for c in got.outputs)
        elif rid in aborted:
            for c in got.outputs:
                assert c.finish_reason in ("abort", "stop", "length"), c.finish_reason
                assert matches_prefix(c.token_ids, oracle[rid]), (rid, kw, c.token_ids, oracle[rid])
                if c.finish_reason != "abort":
                    assert (c.index, c.token_ids, c.finish_reason, c.stop_reason) in oracle[rid]
        elif loose:
            # an unseeded sampled request under speculation: its tokens come from the default generator,
            # shared with the batch, so only the shape is compared (seeded ones are compared exactly:
            # sampling.TokenStream keys their draws by output position, speculation or not)
            assert [(i, len(t) <= kw["max_tokens"]) for i, t, _, _ in summary(got)] == \
                [(i, True) for i, *_ in oracle[rid]]
        else:
            assert summary(got) == oracle[rid], (rid, kw, cfg)
    return engine, steps


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fuzz_engine_matches_oracle(loaded, seed, prefix_caching):
    engine, steps = fuzz(loaded, seed, prefix_caching)
    assert steps > 20


@pytest.mark.parametrize("seed", [4, 5])
def test_fuzz_pipelined_decode_matches_oracle(loaded, seed):
    """EngineConfig.pipelined_decode also runs on the CPU (LLM turns it on for GPUs only)."""
    fuzz(loaded, seed, prefix_caching=True, pipelined=True)


@pytest.mark.parametrize("seed", [6, 7])
def test_fuzz_max_model_len_bound(loaded, seed):
    """max_model_len=40: some requests default max_tokens to the room left and end on the context."""
    fuzz(loaded, seed, prefix_caching=seed % 2 == 0, pipelined=True, max_model_len=40)


@pytest.mark.parametrize("seed", [8, 9])
def test_fuzz_ngram_speculation(loaded, seed):
    """Greedy requests exact (and equal to plain decoding); seeded sampled ones checked for shape only."""
    fuzz(loaded, seed, prefix_caching=seed % 2 == 0, spec={"method": "ngram", "num_tokens": 3})
