"""Sliding-window models release the KV blocks below each sequence's window (block_manager.py): a
generation far longer than the window runs in a pool that could not hold it whole, and nothing changes in
the output (CPU, fp32, against HF): with preemption, prefix caching, parallel sampling (forked block
tables) and n-gram speculation; not with a draft model or when some layer has full attention."""
from __future__ import annotations

import pytest
import torch

from fastinfer.block_manager import RELEASE_ALIGN
from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model

pytest.importorskip("transformers")
GREEDY = dict(temperature=0.0, ignore_eos=True)


def hf_tokens(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[list[int]]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in engine.pop_finished(out.request_id).outputs]
        engine.blocks.check_invariants()
        assert engine.blocks.num_in_use <= engine.blocks.num_blocks
    return done


@pytest.fixture(scope="module")
def mistral():
    return make_hf_model("mistral", seed=1, sliding_window=16)


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_long_generation_fits_a_pool_smaller_than_it(mistral):
    """40 + 300 tokens need 22 blocks of 16; with a 16-token window a sequence keeps at most
    (RELEASE_ALIGN + window) / 16 + 2 of them, so 13 suffice, with no preemption."""
    prompt = prompt_of(40, 1)
    engine = Engine(get_loaded(mistral), EngineConfig(num_blocks=15, block_size=16, max_num_batched_tokens=64))
    assert engine.blocks.window == 16
    out = run(engine, {"a": (prompt, SamplingParams(max_tokens=300, **GREEDY))})
    assert out["a"][0] == hf_tokens(mistral, prompt, 300)
    assert engine.scheduler.num_preemptions == 0
    assert (RELEASE_ALIGN + 16) // 16 + 2 <= 13


def test_preemption_prefix_cache_and_parallel_sampling(mistral):
    """Several long sequences in a small pool (preempted and recomputed), a shared prefix served from the
    cache, and an n = 2 request whose forked tables share released entries: the same tokens as in a pool
    large enough to hold everything."""
    shared = prompt_of(150, 2)
    requests = {"p0": (shared + prompt_of(5, 3), SamplingParams(max_tokens=120, **GREEDY)),
                "p1": (shared + prompt_of(9, 4), SamplingParams(max_tokens=90, **GREEDY)),
                "solo": (prompt_of(30, 5), SamplingParams(max_tokens=200, **GREEDY)),
                "n2": (prompt_of(20, 6), SamplingParams(n=2, max_tokens=150, temperature=0.9, seed=7,
                                                         ignore_eos=True))}
    loaded = get_loaded(mistral)
    big = run(Engine(loaded, EngineConfig(num_blocks=256, block_size=16, max_num_seqs=8)), requests)
    small_engine = Engine(loaded, EngineConfig(num_blocks=24, block_size=16, max_num_seqs=4,
                                               max_num_batched_tokens=48))
    small = run(small_engine, requests)
    assert small == big
    assert small_engine.scheduler.num_preemptions > 0
    assert big["solo"][0] == hf_tokens(mistral, requests["solo"][0], 200)


def test_ngram_speculation_with_released_blocks(mistral):
    pattern = prompt_of(7, 8)
    prompt = pattern * 6
    spec = {"method": "ngram", "num_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    engine = Engine(get_loaded(mistral), EngineConfig(num_blocks=16, block_size=16, speculative=spec))
    out = run(engine, {"a": (prompt, SamplingParams(max_tokens=200, **GREEDY))})
    assert out["a"][0] == hf_tokens(mistral, prompt, 200)
    assert engine.blocks.window == 16


def test_no_release_with_a_full_attention_layer_or_a_draft_model(mistral):
    qwen = make_hf_model("qwen2", seed=3, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert Engine(get_loaded(qwen), EngineConfig(num_blocks=32)).blocks.window == 0  # layer 0 is full
    draft = {"method": "draft", "model": get_loaded(make_hf_model("mistral", seed=4, sliding_window=16)),
             "num_tokens": 2}
    assert Engine(get_loaded(mistral), EngineConfig(num_blocks=32, speculative=draft)).blocks.window == 0


def test_prefix_hits_below_the_window_are_not_taken(mistral):
    """A prompt whose 400-token prefix is cached takes only the hit blocks its window reaches: the ones
    below stay in the cache unreferenced (a small pool admits it), and the tokens are HF's."""
    prefix = prompt_of(400, 9)
    engine = Engine(get_loaded(mistral), EngineConfig(num_blocks=40, block_size=16, max_num_batched_tokens=64))
    run(engine, {"first": (prefix + [5], SamplingParams(max_tokens=4, **GREEDY))})
    prompt = prefix + [6, 7]
    engine.add_request("second", prompt, SamplingParams(max_tokens=30, **GREEDY))
    engine.step()
    seq = engine.requests["second"].seqs[0]
    assert seq.num_hashed_blocks == 25 and seq.num_released_blocks == (400 - 15) // 128 * 128 // 16
    assert engine.blocks.num_in_use <= 4
    done = run(engine, {})
    assert done["second"][0] == hf_tokens(mistral, prompt, 30)


@pytest.mark.parametrize("block_size", [4, 16, 256])
@pytest.mark.parametrize("mode", ["plain", "pipelined+graphs", "ngram"])
def test_no_step_reads_a_released_block(mistral, monkeypatch, block_size, mode):
    """Every chunk a step runs needs its sequence's blocks from (its first position - window + 1) rounded
    down to RELEASE_ALIGN keys on (what the CUDA kernels may read): none of them may be released when the
    step is launched, nor while a launched decode step may still be in flight (pipelined decode releases
    after the next step is launched). Checked on every step of mixed traffic: prefix sharing, n = 2,
    aborts, preemption."""
    loaded = get_loaded(mistral)
    spec = {"method": "ngram", "num_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    config = EngineConfig(num_blocks=max(12, 1200 // block_size), block_size=block_size, max_num_seqs=4,
                          max_num_batched_tokens=40, pipelined_decode=mode == "pipelined+graphs",
                          decode_graphs=mode == "pipelined+graphs", speculative=spec if mode == "ngram" else None)
    engine = Engine(loaded, config)
    w, owner, last = engine.blocks.window, {}, {}

    def first_needed(start: int) -> int:  # 128: the sm_90a prefill's key tile, the widest rounding of any kernel
        return max(0, start - w + 1) // 128 * 128 // block_size

    real_run = engine.runner.run

    def run_checked(chunks, input_ids=None):
        for chunk in chunks:  # the chunk's table is its sequence's, or a copy of it (speculative steps)
            seq = next(s for s in engine.scheduler.running
                       if s.block_table is chunk.block_table or s.block_table == chunk.block_table)
            assert seq.num_released_blocks <= first_needed(chunk.start), (chunk.start, seq.num_released_blocks)
            last[id(seq)] = (chunk.start, len(chunk.token_ids))
            owner[id(seq)] = seq
        return real_run(chunks, input_ids=input_ids)
    monkeypatch.setattr(engine.runner, "run", run_checked)
    real_release = engine.blocks._release_below_window

    def release_checked(seq):
        real_release(seq)
        start, n = last.get(id(seq), (None, 0))
        if n == 1:  # a decode step: it may still be in flight
            assert seq.num_released_blocks <= first_needed(start), (start, seq.num_released_blocks)
    monkeypatch.setattr(engine.blocks, "_release_below_window", release_checked)

    shared = prompt_of(90, 10)
    requests = {"a": (shared + prompt_of(3, 11), SamplingParams(max_tokens=150, **GREEDY)),
                "b": (shared + prompt_of(4, 12), SamplingParams(max_tokens=120, **GREEDY)),
                "c": (prompt_of(7, 13) * 5, SamplingParams(n=2, max_tokens=100, temperature=0.8, seed=3,
                                                            ignore_eos=True)),
                "d": (prompt_of(20, 14), SamplingParams(max_tokens=200, **GREEDY))}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 40:
            engine.abort("b")
        engine.blocks.check_invariants()
    assert steps > 100 and owner
