"""LongRoPE rope scaling (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini; "su" / "yarn" in Phi-3 configs, as HF
reads them) against HF transformers, CPU fp32.

HF rotates a forward whose sequence is longer than original_max_position_embeddings (32 here) with the long
factors and any other with the short ones; its KV cache keeps what earlier forwards wrote. fastinfer makes
that choice per token as if each sequence ran alone in HF (metadata.rope_rows): prompt tokens by the prompt's
length, a generated token at p by p + 1. So a single sequence's greedy output equals HF's, crossing the
boundary included, under chunked prefill, prefix caching and preemption.
"""
from __future__ import annotations

import random

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.engine import Engine, EngineConfig
from fastinfer.generate import get_loaded
from fastinfer.metadata import rope_rows
from models import make_hf_model
from test_loader_parity import fi_logits, hf_logits

transformers = pytest.importorskip("transformers")
ORIGINAL = 32


def factors(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 8.0), 3) for _ in range(n)]


def longrope_model(variant: str = "phi3", seed: int = 1, short=None, long=None, **overrides):
    """A small HF model with LongRoPE from position 32 of 128; head_dim 16 (rotary 16, or 12 for phi3-partial)."""
    half = 6 if variant == "phi3-partial" else 8
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short or factors(half, seed),
            "long_factor": long or factors(half, seed + 100)}
    extra = dict(max_position_embeddings=128, rope_scaling=rope, **overrides)
    if variant.startswith("phi3"):
        extra["original_max_position_embeddings"] = ORIGINAL  # Phi-3 keeps it at the top level
    else:
        rope["original_max_position_embeddings"] = ORIGINAL
    return make_hf_model(variant, seed=seed, **extra)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


def hf_greedy(hf, ids: list[int], new: int) -> list[int]:
    return hf_greedy_logprobs(hf, ids, new)[0]


def hf_greedy_logprobs(hf, ids: list[int], new: int) -> tuple[list[int], list[float]]:
    """HF's greedy tokens and each one's logprob, from its cached decoding (the earlier forwards' KV kept)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]


def assert_logprobs_match_hf(hf, llm, prompts: list[list[int]], new: int) -> None:
    """Greedy tokens and their logprobs (to 1e-4) equal HF's, each prompt run alone in HF."""
    params = fastinfer.SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0)
    for p, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        tokens, logprobs = hf_greedy_logprobs(hf, p, new)
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        torch.testing.assert_close(torch.tensor([float(d[t]) for d, t in zip(got.logprobs, tokens)]),
                                   torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_rope_rows_rule():
    assert list(rope_rows(3, 7, None, 0)) == [3, 4, 5, 6]                    # no LongRoPE: positions
    assert list(rope_rows(0, 20, None, 32)) == list(range(20))               # a whole short prompt
    assert list(rope_rows(0, 40, None, 32)) == list(range(32, 72))           # a whole long prompt: all long
    assert list(rope_rows(0, 16, 40, 32)) == list(range(32, 48))             # a chunk of a long prompt
    assert list(rope_rows(30, 34, 20, 32)) == [30, 31, 32 + 32, 32 + 33]     # generated tokens crossing
    assert list(rope_rows(31, 32, None, 32)) == [31] and list(rope_rows(32, 33, None, 32)) == [64]


@pytest.mark.parametrize("variant", ["phi3", "phi3-partial", "llama", "qwen2"])
@pytest.mark.parametrize("n", [20, 32, 33, 60])
def test_logits_match_hf_on_both_sides_of_the_original_length(variant, n):
    hf = longrope_model(variant)
    torch.testing.assert_close(fi_logits(get_loaded(hf), prompt(n)), hf_logits(hf, prompt(n)), rtol=0, atol=2e-5)


def test_each_factor_list_acts_on_its_side_only():
    base, other_long = longrope_model(seed=2), longrope_model(seed=2, long=factors(8, 999))
    short_prompt, long_prompt = prompt(30), prompt(50)
    assert torch.equal(fi_logits(get_loaded(base), short_prompt), fi_logits(get_loaded(other_long), short_prompt))
    assert (fi_logits(get_loaded(base), long_prompt) - fi_logits(get_loaded(other_long), long_prompt)).abs().max() > 1e-3  # fp32 noise: ~1e-6


def test_attention_factor_from_the_length_ratio():
    """sqrt(1 + ln(128 / 32) / ln(32)) scales cos and sin (given attention_factor: that value)."""
    loaded = get_loaded(longrope_model())
    assert loaded.model.cos_sin.shape == (ORIGINAL + 128, 16)
    expected = (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(32.0))).sqrt()
    torch.testing.assert_close(loaded.model.cos_sin[0, 0], expected)  # cos(0) times the factor
    hf = longrope_model()
    hf.config.rope_parameters["attention_factor"] = 0.5
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.rope_scaling["attention_factor"] == 0.5


@pytest.mark.parametrize("variant", ["phi3", "llama"])
@pytest.mark.parametrize("n, new", [(24, 20), (31, 6), (32, 6), (33, 6), (40, 10)])
def test_greedy_crossing_the_boundary_matches_hf(variant, n, new):
    """Prompt 24: short until position 32. There HF's Phi-3 generate drops its cache and recomputes it whole
    with the long factors (prepare_inputs_for_generation); HF's Llama keeps the short-rotated cache and
    rotates new tokens long. Prompt 40: everything long."""
    hf = longrope_model(variant, seed=3)
    expected = hf_greedy(hf, prompt(n, 3), new)
    out = fastinfer.generate(hf, torch.tensor([prompt(n, 3)]), max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert out[0, n:].tolist() == expected
    llm = fastinfer.LLM(hf, num_blocks=40, block_size=4, max_num_batched_tokens=8)  # 8-token prefill chunks
    assert_logprobs_match_hf(hf, llm, [prompt(n, 3)], new)
    restarts = llm.engine.scheduler.num_rope_restarts
    assert restarts == (1 if variant == "phi3" and n <= ORIGINAL else 0) and llm.engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("max_num_seqs", [1, 4])
def test_n_children_of_a_prompt_at_the_boundary(max_num_seqs):
    """n = 2 from a 32-token Phi-3 prompt: each child's second token is sampled past position 32; a child that
    waits for a batch slot is recomputed from scratch, long from its first token, as HF would have it."""
    hf = longrope_model(seed=9)
    p = prompt(32, 9)
    tokens, logprobs = hf_greedy_logprobs(hf, p, 5)
    llm = fastinfer.LLM(hf, num_blocks=40, block_size=4, max_num_seqs=max_num_seqs)
    out = llm.generate([p], fastinfer.SamplingParams(n=2, max_tokens=5, temperature=0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0]
    for child in out.outputs:
        assert list(child.token_ids) == tokens
        torch.testing.assert_close(torch.tensor([float(d[t]) for d, t in zip(child.logprobs, tokens)]),
                                   torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_hf_loops_cross_the_boundary_as_hf():
    """fastinfer.generate's own copies of HF's loops (beam search; greedy with output_logits) recompute a
    Phi-3 row at position 32 too."""
    hf = longrope_model(seed=7)
    ids = torch.tensor([prompt(27, 7)])
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        beams = hf.generate(ids, num_beams=3, num_return_sequences=2, **kw)
        scored = hf.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    assert torch.equal(fastinfer.generate(hf, ids, num_beams=3, num_return_sequences=2, **kw), beams)
    ours = fastinfer.generate(hf, ids, return_dict_in_generate=True, output_logits=True, **kw)
    assert torch.equal(ours.sequences, scored.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(scored.logits), rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", ["phi3", "llama"])
def test_static_decode_path_crosses_the_boundary(variant):
    """The decode steps' static buffers (DecodeGraphs, run eagerly on the CPU) take the LongRoPE rows too."""
    hf = longrope_model(variant, seed=4)
    tokens, logprobs = hf_greedy_logprobs(hf, prompt(26, 4), 16)
    static = Engine(get_loaded(hf), EngineConfig(num_blocks=40, block_size=4, decode_graphs=True, graph_sizes=[1, 2]))
    static.add_request("a", prompt(26, 4), fastinfer.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                                     logprobs=0))
    while static.has_unfinished():
        static.step()
    out = static.pop_finished("a").outputs[0]
    assert list(out.token_ids) == tokens and static.runner.graphs.num_steps > 8
    torch.testing.assert_close(torch.tensor([float(d[t]) for d, t in zip(out.logprobs, tokens)]),
                               torch.tensor(logprobs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["phi3", "llama"])
def test_ngram_speculation_crosses_the_boundary(variant, monkeypatch):
    """A repetitive prompt, so that n-gram proposals are made around position 32: greedy output equals HF's; a
    Phi-3 sequence proposes nothing at 32 or past it until its recompute (spec_decode.lookahead)."""
    hf = longrope_model(variant, seed=4)
    p = (prompt(6, 4) * 5)[:27]
    expected = hf_greedy(hf, p, 16)
    import fastinfer.engine as engine_module
    ks = []
    real = engine_module.lookahead
    monkeypatch.setattr(engine_module, "lookahead",
                        lambda seq, *a: ks.append((len(seq), seq.rope_prompt_len, real(seq, *a))) or ks[-1][2])
    llm = fastinfer.LLM(hf, num_blocks=40, block_size=4, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert list(llm.generate([p], fastinfer.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids) == expected
    assert llm.speculative_stats.num_proposed > 0
    if variant == "phi3":  # short-rotated sequences never propose a token at position 32 or past it
        assert all(length + k <= ORIGINAL for length, rope_len, k in ks if rope_len <= ORIGINAL)
        assert any(length + k == ORIGINAL and k > 0 for length, rope_len, k in ks if rope_len <= ORIGINAL)


def test_prefix_cache_keeps_long_and_short_prompts_apart():
    """A long prompt's KV was rotated with the long factors from its first token: a short prompt sharing its
    first blocks must not reuse them, nor the other way round."""
    hf = longrope_model(seed=5)
    long_p, short_p = prompt(44, 5), prompt(44, 5)[:24]
    llm = fastinfer.LLM(hf, num_blocks=64, block_size=4)
    for p in (long_p, short_p, long_p + [7], short_p[:20] + [9, 9]):
        assert_logprobs_match_hf(hf, llm, [p], 6)
    assert llm.prefix_cache_hit_rate > 0  # the third and fourth prompts hit their own kind's blocks


def test_preemption_and_a_batch_match_each_sequence_alone():
    hf = longrope_model(seed=6)
    prompts = [prompt(n, 6 + n) for n in (12, 28, 36, 20, 45)]
    llm = fastinfer.LLM(hf, num_blocks=34, block_size=4, max_num_batched_tokens=16)
    assert_logprobs_match_hf(hf, llm, prompts, 14)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("rope_type", ["su", "yarn"])
def test_phi3_reads_su_and_yarn_as_longrope(rope_type):
    hf = longrope_model()
    cfg = hf.config.to_dict()
    cfg["rope_scaling"] = dict(cfg.pop("rope_parameters"), rope_type=rope_type)
    read = ModelConfig.from_hf(cfg)
    assert read.rope_long_from == ORIGINAL and read == ModelConfig.from_hf(hf.config.to_dict())


@pytest.mark.parametrize("change, match", [
    (lambda r: r.update(short_factor=[1.0] * 7), "short_factor.*8"),
    (lambda r: r.update(long_factor="wide"), "long_factor"),
    (lambda r: r.update(long_factor=[1.0] * 7 + [-2.0]), "long_factor"),
    (lambda r: r.update(attention_factor="x"), "attention_factor"),
    (lambda r: r.update(original_max_position_embeddings=0.5), "original_max_position_embeddings"),
])
def test_bad_longrope_configs_name_the_field(change, match):
    cfg = longrope_model("llama").config.to_dict()
    change(cfg["rope_parameters"])
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["phi3", "phi3-partial"])
def test_crossing_the_boundary_on_the_gpu(variant):
    """The GPU rotary kernels on the LongRoPE table's rows (short, then long from row 32), fp32: fastinfer.generate
    and the LLM engine (CUDA-graph decode, pipelined steps, the Phi-3 recompute at position 32) against HF's
    generate on the same GPU."""
    half = 24 if variant == "phi3-partial" else 32
    hf = longrope_model(variant, seed=8, short=factors(half, 8), long=factors(half, 108), hidden_size=256,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512).cuda()
    for n in (24, 40):
        ids = torch.tensor([prompt(n, 8)], device="cuda")
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(fastinfer.generate(hf, ids, max_new_tokens=20, do_sample=False, eos_token_id=None), expected)
        llm = fastinfer.LLM(hf, num_blocks=64, block_size=16)
        got = llm.generate([prompt(n, 8)], fastinfer.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
        assert list(got) == expected[0, n:].tolist()


@pytest.mark.parametrize("n", [20, 40])
def test_with_a_sliding_window(n):
    """Phi-3's sliding window (12 here) with LongRoPE: the restart at position 32 recomputes a sequence whose
    blocks below the window were released; logprobs equal HF's."""
    hf = longrope_model(seed=11, sliding_window=12)
    llm = fastinfer.LLM(hf, num_blocks=64, block_size=4, max_num_batched_tokens=8)
    assert llm.engine.blocks.window == 12
    assert_logprobs_match_hf(hf, llm, [prompt(n, 11)], 16)
    assert llm.engine.scheduler.num_rope_restarts == (1 if n < ORIGINAL else 0)
