"""Seeded sampling keyed by output position (sampling.TokenStream): a review's tests.

What these tests pin:
- the t-th output token of a seeded completion is exactly the sampler's draw with the noise of (seed, t)
  (child seeds for n > 1 siblings), checked against an independent oracle (the HF model's own forward),
  in plain, pipelined, chunked, preempted, forked-and-waiting and speculative runs: no off-by-one anywhere;
- a seeded request's tokens are the same alone, batched, with n-gram / draft / self speculation for
  k = 1..5, with tiny token budgets (cut proposals), under preemption and with pipelined decode;
- the draws follow the processed distribution over many seeds (per position, jointly over positions,
  parent vs child streams) and the engine's first / second tokens follow the model's softmax, with and
  without speculation (coupled verify);
- coupled_verify emits the positional draws up to the first mismatch (pos0 = len(output));
- edge cases: seeds near 2**64 - 1, logprobs, stop strings, min_tokens, PYTHONHASHSEED independence;
- the engine fuzz with speculation, seeded sampled requests compared exactly with a run without it.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import reference as ref
from fastinfer.engine import _child_seed
from fastinfer.generate import get_loaded
from fastinfer.sampling import TokenStream, make_stream, position_noise, process_logits, sample
from fastinfer.sampling_params import SamplingParams
from fastinfer.spec_decode import coupled_verify
from models import make_hf_model

pytest.importorskip("transformers")
from test_spec_edge_cases import CharTokenizer, drain, make_engine, repetitive, run, spec_cfg  # noqa: E402
from test_spec_engine import draft  # noqa: E402,F401  (fixture)

kMinPValue = 1e-3


@pytest.fixture(scope="module")
def hf_target():
    return make_hf_model("llama", seed=21)


@pytest.fixture(scope="module")
def target(hf_target):
    return get_loaded(hf_target)


# ---- oracle: each output token is the draw of its own output position ------------------------------

def positional_mismatches(hf, prompt, params, completions):
    """(completion, position, oracle token, engine token) where the engine's t-th token is not
    sample() at position t with the completion's TokenStream on the HF model's own logits."""
    bad = []
    for k, out in enumerate(completions):
        stream = TokenStream(params.seed if k == 0 else _child_seed(params.seed, k), "cpu")
        with torch.no_grad():
            logits = hf(torch.tensor([list(prompt) + out])).logits[0].float()
        for t in range(len(out)):
            row = logits[len(prompt) - 1 + t][None]
            tok = int(sample(row, [params], [list(prompt) + out[:t]], [out[:t]], None, [stream], [t])[0])
            if tok != out[t]:
                bad.append((k, t, tok, out[t]))
    return bad


ORACLE_PARAMS = [
    SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True),
    SamplingParams(n=3, max_tokens=8, temperature=0.8, top_k=20, seed=2**64 - 1, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, min_p=0.02, repetition_penalty=1.3,
                   presence_penalty=0.4, frequency_penalty=0.2, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, seed=0, ignore_eos=True),
]

ORACLE_CONFIGS = {
    "plain": dict(),
    "pipelined": dict(pipelined_decode=True),
    "budget3": dict(max_num_batched_tokens=3),
    "one_seq": dict(max_num_seqs=1),                       # n > 1 children wait and are recomputed
    "preempt": dict(num_blocks=12, block_size=4, max_num_seqs=8),
    "draft_k3": dict(speculative="draft"),
    "self_k2_budget5": dict(speculative="self", max_num_batched_tokens=5),
    "ngram_k4": dict(speculative="ngram"),
}


@pytest.mark.parametrize("config", list(ORACLE_CONFIGS))
def test_every_token_is_the_draw_of_its_output_position(hf_target, target, draft, config):
    cfg = dict(ORACLE_CONFIGS[config])
    kind = cfg.pop("speculative", None)
    k = {"draft": 3, "self": 2, "ngram": 4}.get(kind, 0)
    prompts = [[5, 17, 99, 4, 230, 17, 99, 4], [7, 8, 9, 7, 8, 9, 7, 8, 9, 7], [300], [44, 45] * 6]
    got, engine = run(target, prompts, ORACLE_PARAMS, spec_cfg(kind, target, draft, k), **cfg)
    for prompt, params, res in zip(prompts, ORACLE_PARAMS, got):
        completions = [c[0] for c in res]
        assert len(completions) == params.n and all(len(c) == params.max_tokens for c in completions)
        assert positional_mismatches(hf_target, prompt, params, completions) == [], (config, params)
    if config == "preempt":
        assert engine.scheduler.num_preemptions > 0
    if config == "one_seq":
        assert engine.scheduler.num_preemptions == 0  # the children waited without being preempted


# ---- same tokens whatever the grouping into steps ----------------------------------------------

MIXED_PARAMS = [
    SamplingParams(max_tokens=14, temperature=0.9, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=1.2, top_k=15, top_p=0.85, min_p=0.01, seed=2**64 - 1, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.3, seed=3),
    SamplingParams(max_tokens=14, min_tokens=6, temperature=1.5, seed=4),
    SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.7, seed=6, stop_token_ids=[20, 40, 60, 80, 100]),
]
MIXED_EOS = {7, 11}


@pytest.fixture(scope="module")
def mixed_expected(target):
    prompts = repetitive(6, seed=31)
    got, _ = run(target, prompts, MIXED_PARAMS, eos=MIXED_EOS)
    return prompts, got


def test_each_seeded_request_alone_equals_batched(target, mixed_expected):
    prompts, expected = mixed_expected
    for p, sp, want in zip(prompts, MIXED_PARAMS, expected):
        alone, _ = run(target, [p], sp, eos=MIXED_EOS)
        assert alone[0] == want


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_seeded_tokens_with_speculation_every_k_budget_and_preemption(target, draft, mixed_expected, kind):
    prompts, expected = mixed_expected
    for k in range(1, 6):
        got, engine = run(target, prompts, MIXED_PARAMS, spec_cfg(kind, target, draft, k), eos=MIXED_EOS)
        assert got == expected, (kind, k)
        if kind == "self":  # the draft draws with the target's noise at the same positions: all accepted
            assert engine.spec_stats.num_proposed > 0 and engine.spec_stats.acceptance_rate == 1.0, k
    for budget in (3, 5, 9):
        got, _ = run(target, prompts, MIXED_PARAMS, spec_cfg(kind, target, draft, 4), eos=MIXED_EOS,
                     max_num_batched_tokens=budget)
        assert got == expected, (kind, budget)
    got, engine = run(target, prompts, MIXED_PARAMS, spec_cfg(kind, target, draft, 3), eos=MIXED_EOS,
                      num_blocks=16, block_size=4, max_num_seqs=8)
    assert got == expected and engine.scheduler.num_preemptions > 0
    got, _ = run(target, prompts, MIXED_PARAMS, spec_cfg(kind, target, draft, 3), eos=MIXED_EOS,
                 max_num_seqs=2, max_num_batched_tokens=7)
    assert got == expected


def test_ngram_speculation_with_accepted_proposals(target, draft):
    """Low temperature on prompts that end in the model's own greedy loop: n-gram proposals get
    accepted (the sampled runs above rarely accept any), and the tokens still equal plain sampling."""
    prompts = repetitive(6, seed=31)
    loops, _ = run(target, prompts, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    prompts = [p + c[0][0] for p, c in zip(prompts, loops)]
    params = [SamplingParams(max_tokens=20, temperature=0.1, seed=i, ignore_eos=True) for i in range(6)]
    plain, _ = run(target, prompts, params)
    for k in (1, 3, 5):
        got, engine = run(target, prompts, params, spec_cfg("ngram", target, draft, k))
        assert got == plain, k
        assert engine.spec_stats.num_accepted > 0


def test_pipelined_decode_with_stops_and_forks(target):
    """Only pipeline-eligible params (no penalties, no min_tokens, n > 1 forked), one request stopping
    on a stop id mid-run while others go on, others ending at different max_tokens."""
    prompts = repetitive(6, seed=31)
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=[0.3, 1.0][i % 2], top_k=[0, 30][i % 2],
                             seed=100 + i, n=2 if i == 4 else 1, ignore_eos=True,
                             stop_token_ids=list(range(50, 320, 9)) if i == 2 else None) for i in range(6)]
    plain, _ = run(target, prompts, params)
    assert plain[2][0][2] == "stop" and len(plain[2][0][0]) < params[2].max_tokens
    for cfg in (dict(), dict(num_blocks=16, block_size=4, max_num_seqs=8), dict(max_num_seqs=3),
                dict(max_num_batched_tokens=4)):
        got, engine = run(target, prompts, params, pipelined_decode=True, **cfg)
        assert got == plain, cfg
        assert engine.num_pipelined_steps > 0, cfg


# ---- edge cases ---------------------------------------------------------------------------------

def test_logprobs_do_not_change_seeded_tokens(target):
    prompts = repetitive(4, seed=41)
    base = [SamplingParams(max_tokens=10, temperature=1.0, seed=70 + i, ignore_eos=True) for i in range(4)]
    plain, _ = run(target, prompts, base)
    with_lp = [dataclasses.replace(p, logprobs=[None, 0, 3, 5][i]) for i, p in enumerate(base)]
    got, _ = run(target, prompts, with_lp)
    assert got == plain
    got, _ = run(target, prompts, with_lp, pipelined_decode=True)  # logprob rows keep it off the pipeline
    assert got == plain


@pytest.mark.parametrize("kind", ["self", "ngram", "draft"])
def test_stop_strings_and_min_tokens_with_seeded_speculation(target, draft, kind):
    tok_target = dataclasses.replace(target, tokenizer=CharTokenizer())
    prompts = ["abcabcabcabc", "hellohellohello", "zzyzzyzzy"]
    free, _ = run(tok_target, prompts, SamplingParams(max_tokens=16, temperature=0.8, seed=9, ignore_eos=True))
    params = [SamplingParams(max_tokens=16, temperature=0.8, seed=9, ignore_eos=True, stop=[c[0][1][j:j + 2]])
              for c, j in zip(free, (3, 6, 9))]
    params.append(SamplingParams(max_tokens=16, min_tokens=8, temperature=0.8, seed=9))
    prompts.append("abcabc")
    eos = {3 + 5, 3 + 9}  # 'f' and 'j'
    plain, _ = run(tok_target, prompts, params, eos=eos)
    assert all(c[0][2] == "stop" for c in plain[:3])
    got, _ = run(tok_target, prompts, params, spec_cfg(kind, tok_target, draft, 4), eos=eos)
    assert got == plain


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1])
def test_token_stream_seeds_near_the_top_of_the_range(seed):
    stream = make_stream(seed, "cpu")
    for position in (0, 1, 2**40):
        g = stream.at(position)
        assert 0 <= g.initial_seed() < 2**63
        row = position_noise(stream, position, torch.empty(16))
        again = position_noise(make_stream(seed, "cpu"), position, torch.empty(16))
        assert torch.equal(row, again) and (row > 0).all()
    child = _child_seed(seed, 3)
    assert 0 <= child < 2**63
    SamplingParams(seed=seed)  # accepted


def test_positional_seeds_do_not_depend_on_pythonhashseed():
    """The derived seeds (sampling.mix_seed) are the same in any process, whatever PYTHONHASHSEED."""
    code = ("from fastinfer.sampling import TokenStream; from fastinfer.engine import _child_seed; "
            "s = TokenStream(12345, 'cpu'); "
            "print([s.at(t).initial_seed() for t in (0, 1, 99)], _child_seed(12345, 2))")
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


def test_coupled_verify_emits_the_positional_draws_up_to_the_first_mismatch():
    torch.manual_seed(0)
    vocab, params = 12, SamplingParams(temperature=1.0, seed=0)
    for seed in range(40):
        outputs = list(range(seed % 5))
        seq = SimpleNamespace(output_token_ids=outputs, generator=TokenStream(seed, "cpu"), params=params)
        n = 1 + seed % 4
        logits = torch.randn(1, n + 1, vocab) * 2
        probs = torch.softmax(logits, dim=-1)  # what sample() computes at temperature 1
        draws = [int(sample(logits[0, j:j + 1], [params], [[]], [[]], None, [seq.generator],
                            [len(outputs) + j])[0]) for j in range(n + 1)]
        cut = seed % (n + 1)  # proposals equal to the draws up to `cut`, then one that differs
        proposals = draws[:cut] + [(d + 1) % vocab for d in draws[cut:n]]
        emitted = coupled_verify(probs, [seq], [proposals])[0]
        assert emitted == draws[:cut + 1], (seed, proposals, draws)


# ---- statistics ---------------------------------------------------------------------------------

def _logits(vocab=32, seed=4, scale=1.5):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("position", [0, 1, 7, 2**40])
def test_positional_draws_follow_the_processed_distribution(position):
    n, logits = 20_000, _logits()
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.95)
    expected = torch.softmax(process_logits(logits[None], [params], [[]], [[]])[0].double(), -1)
    streams = [TokenStream(s, "cpu") for s in range(n)]
    tokens = sample(logits.expand(n, -1).contiguous(), [params] * n, [[]] * n, [[]] * n, None, streams,
                    [position] * n)
    counts = torch.bincount(tokens, minlength=logits.numel())
    assert counts[expected == 0].sum() == 0
    assert ref.chi_square_pvalue(counts, expected) > kMinPValue


def test_positional_draws_are_independent_across_positions_and_siblings():
    """Same seed at positions 0 and 1, and a parent vs its child stream at the same position: the
    joint counts of two 6-way draws match the product distribution."""
    n, logits = 20_000, _logits(vocab=6, seed=5, scale=0.7)
    probs = torch.softmax(logits.double(), -1)
    params = SamplingParams()
    rows = logits.expand(n, -1).contiguous()
    empty = [[]] * n

    def draws(streams, positions):
        return sample(rows, [params] * n, empty, empty, None, streams, positions)

    parents = [TokenStream(s, "cpu") for s in range(n)]
    children = [TokenStream(_child_seed(s, 1), "cpu") for s in range(n)]
    for a, b in [(draws(parents, [0] * n), draws(parents, [1] * n)),
                 (draws(parents, [3] * n), draws(children, [3] * n)),
                 (draws(parents, [0] * n), draws(children, [0] * n))]:
        joint = torch.bincount(a * 6 + b, minlength=36)
        assert ref.chi_square_pvalue(joint, torch.outer(probs, probs).flatten()) > kMinPValue


@pytest.fixture(scope="module")
def many_seeds(hf_target, target, draft):
    """2500 requests of one prompt, seeds 0..2499, 3 tokens each, at T = 0.25: without speculation,
    with a draft model and with the target as its own draft."""
    prompt = [5, 17, 99, 4, 230, 17, 99, 4, 8, 33, 71, 5, 17, 99, 4, 230, 17]
    temperature, n = 0.25, 2500
    runs = {}
    for kind in (None, "draft", "self"):
        engine = make_engine(target, spec_cfg(kind, target, draft, 3), num_blocks=n // 4 + 64, max_num_seqs=256,
                             max_num_batched_tokens=2048)
        for s in range(n):
            engine.add_request(str(s), prompt, SamplingParams(max_tokens=3, temperature=temperature, seed=s,
                                                              ignore_eos=True))
        done = drain(engine)
        runs[kind] = ([done[str(s)].outputs[0].token_ids for s in range(n)], engine)
    return hf_target, prompt, temperature, runs


def _model_probs(hf, ids, temperature):
    with torch.no_grad():
        return torch.softmax(hf(torch.tensor([ids])).logits[0, -1].double() / temperature, -1)


@pytest.mark.parametrize("kind", [None, "draft", "self"])
def test_engine_draws_over_many_seeds_follow_the_model(many_seeds, kind):
    hf, prompt, temperature, runs = many_seeds
    outs, engine = runs[kind]
    if kind is not None:
        assert outs == runs[None][0]  # the same 2500 completions with speculation
        assert engine.spec_stats.num_accepted > 0
    if kind == "self":
        assert engine.spec_stats.acceptance_rate == 1.0
    first = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=320)
    assert ref.chi_square_pvalue(first, _model_probs(hf, prompt, temperature)) > kMinPValue
    # position 1 (verified by coupled_verify with speculation), given the first token
    for tok, count in Counter(o[0] for o in outs).most_common(3):
        second = torch.bincount(torch.tensor([o[1] for o in outs if o[0] == tok]), minlength=320)
        assert ref.chi_square_pvalue(second, _model_probs(hf, prompt + [tok], temperature)) > kMinPValue


# ---- the engine fuzz, strict for seeded sampled requests under speculation -----------------------

@pytest.mark.parametrize("method,seed", [("ngram", 8), ("ngram", 9), ("draft", 10), ("draft", 11)])
def test_fuzz_speculation_is_strict_for_seeded_requests(monkeypatch, method, seed):
    """tests/test_engine_fuzz.py's speculative fuzz compares seeded sampled requests exactly (only
    unseeded ones by shape): with position-keyed streams they match a run *without* speculation."""
    import test_engine_fuzz as fz
    loaded = get_loaded(make_hf_model("llama", seed=11))
    alone = fz.run_alone
    monkeypatch.setattr(fz, "run_alone", lambda lo, p, sp, max_model_len=None, spec=None: alone(lo, p, sp, max_model_len))
    spec = {"method": "ngram", "num_tokens": 3} if method == "ngram" else \
        {"method": "draft", "model": get_loaded(make_hf_model("llama", seed=22, num_hidden_layers=1)), "num_tokens": 3}
    fz.fuzz(loaded, seed, prefix_caching=method == "ngram" and seed % 2 == 0, spec=spec)


def test_seeds_one_hash_modulus_apart_are_different_streams():
    """hash() of an int is taken modulo 2**61 - 1, so a tuple hash made seeds 5 and 5 + 2**61 - 1 the
    same stream; sampling.mix_seed mixes all 64 bits (and child seeds use it too)."""
    from fastinfer.sampling import mix_seed
    m = 2**61 - 1
    for seed in (0, 5, 123456789):
        assert mix_seed(seed, 0) != mix_seed(seed + m, 0)
        assert _child_seed(seed, 1) != _child_seed(seed + m, 1)
    assert all(0 <= mix_seed(s, t) < 2**63 for s in (0, 2**64 - 1) for t in (-5, 0, 10**12))
    draws = {TokenStream(s, "cpu").at(0).initial_seed() for s in range(1000)}
    assert len(draws) == 1000
