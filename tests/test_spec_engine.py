"""Speculative decoding in the engine never changes greedy output; draft == target accepts all."""
from __future__ import annotations

import pytest

from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.sampling_params import SamplingParams
from models import make_hf_model
from test_engine import make_prompts

pytest.importorskip("transformers")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def target():
    return get_loaded(make_hf_model("llama", seed=21))


@pytest.fixture(scope="module")
def draft():
    # Same vocabulary, a different (weaker) model: proposals are often rejected.
    return get_loaded(make_hf_model("llama", seed=22, num_hidden_layers=1))


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a motif, so prompt lookup finds matches."""
    out = []
    for i, base in enumerate(make_prompts(count, seed, lo=3, hi=9)):
        out.append((base * 6)[: 10 + 5 * (i % 7)])
    return out


def run(loaded, prompts, max_tokens, num_blocks, speculative=None, max_num_seqs=16, budget=64):
    engine = Engine(loaded, EngineConfig(num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=budget, speculative=speculative))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, **GREEDY))
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.pop_finished(out.request_id).outputs[0].token_ids
        engine.blocks.check_invariants()
    assert engine.blocks.num_in_use == 0
    return [done[str(i)] for i in range(len(prompts))], engine


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_matches_plain_greedy(target, draft, method, k, batch):
    prompts = repetitive_prompts(batch, seed=k)
    expected, _ = run(target, prompts, 32, num_blocks=256)
    spec = {"method": method, "num_tokens": k}
    if method == "draft":
        spec["model"] = draft
    # 16 blocks cannot hold 16 sequences of up to ~75 tokens: preemption is forced at batch 16.
    got, engine = run(target, prompts, 32, num_blocks=16 if batch > 1 else 256, speculative=spec)
    assert got == expected
    stats = engine.spec_stats
    assert stats.num_proposed > 0 and 1.0 <= stats.mean_acceptance_length <= k + 1
    if batch > 1:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_on_the_fused_decode_path(monkeypatch, target, draft, method):
    """The decode GEMV forced on the CPU: draft steps and verify steps of <= 16 tokens take the
    fused-norm / rotary path (models/llama.py), and greedy output is still plain greedy's."""
    from fastinfer import ops
    from fastinfer.models import linear as linear_mod
    prompts = repetitive_prompts(4, seed=9)
    expected, _ = run(target, prompts, 24, num_blocks=256)
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    # A verify step: the target's forward over several tokens of each sequence, none at position 0.
    verify, fused_in_verify = [False], []
    forward = target.model.forward

    def spy_forward(meta, kv_caches):
        starts = meta.positions[meta.cu_seqlens_q[:-1].long()]
        verify[0] = not meta.is_decode and bool((starts > 0).all())
        try:
            return forward(meta, kv_caches)
        finally:
            verify[0] = False
    real = ops.dense_gemv_rope_cache
    monkeypatch.setattr(target.model, "forward", spy_forward)
    monkeypatch.setattr(ops, "dense_gemv_rope_cache", lambda *a, **kw: fused_in_verify.append(verify[0]) or real(*a, **kw))
    spec = {"method": method, "num_tokens": 3, **({"model": draft} if method == "draft" else {})}
    got, _ = run(target, prompts, 24, num_blocks=256, speculative=spec)
    assert got == expected
    assert any(fused_in_verify), "no verify step took the fused path"


def test_draft_equal_to_target_accepts_everything(target):
    prompts = repetitive_prompts(4, seed=9)
    _, engine = run(target, prompts, 16, num_blocks=128,
                    speculative={"method": "draft", "model": target, "num_tokens": 3})
    assert engine.spec_stats.acceptance_rate == 1.0


def test_draft_equal_to_target_accepts_everything_through_preemption(target):
    """A preempted sequence loses its blocks, and with them the draft's KV: the draft must recompute
    it (a stale draft cache after preemption lowered this acceptance rate to ~0.87)."""
    prompts = repetitive_prompts(16, seed=11)
    _, engine = run(target, prompts, 32, num_blocks=16,
                    speculative={"method": "draft", "model": target, "num_tokens": 3})
    assert engine.scheduler.num_preemptions > 0
    assert engine.spec_stats.acceptance_rate == 1.0


def test_sampled_draft_equal_to_target_accepts_everything(target):
    engine = Engine(target, EngineConfig(num_blocks=128, speculative={"method": "draft", "model": target,
                                                                      "num_tokens": 4}))
    for i, p in enumerate(repetitive_prompts(4, seed=10)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.spec_stats.num_proposed > 0 and engine.spec_stats.acceptance_rate == 1.0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_different_k_per_request_in_one_step(target, draft, method):
    """Requests near their max_tokens propose fewer tokens than the others (their lookahead shrinks),
    so one verify step mixes k = 0 .. 4 across the batch; output still equals plain greedy."""
    prompts = repetitive_prompts(6, seed=12)
    max_tokens = [3, 4, 5, 6, 20, 20]

    def run_with(speculative):
        engine = Engine(target, EngineConfig(num_blocks=256, max_num_seqs=16, speculative=speculative))
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=m, **GREEDY))
        ks_seen = []
        if engine.proposer is not None:
            real = engine.proposer.propose

            def spy(seqs, ks, stop_ids=None):
                ks_seen.append(list(ks))
                return real(seqs, ks, stop_ids)
            engine.proposer.propose = spy
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = engine.pop_finished(out.request_id).outputs[0].token_ids
        return [done[str(i)] for i in range(len(prompts))], ks_seen

    expected, _ = run_with(None)
    spec = {"method": method, "num_tokens": 4, **({"model": draft} if method == "draft" else {})}
    got, ks_seen = run_with(spec)
    assert got == expected
    assert any(len(set(ks)) >= 3 for ks in ks_seen), ks_seen  # one step, three different k


def test_bad_speculative_configs(target):
    with pytest.raises(ValueError, match="num_tokens"):
        Engine(target, EngineConfig(num_blocks=8, speculative={"method": "ngram", "num_tokens": 0}))
    with pytest.raises(ValueError, match="method"):
        Engine(target, EngineConfig(num_blocks=8, speculative={"method": "medusa", "num_tokens": 2}))
    other = get_loaded(make_hf_model("llama", seed=1, vocab_size=100))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, EngineConfig(num_blocks=8, speculative={"method": "draft", "model": other, "num_tokens": 2}))
