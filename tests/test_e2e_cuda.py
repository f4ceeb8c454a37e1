"""End to end: a random-weight Llama in fastinfer agrees with HF transformers on HF's own greedy text.

Issue 5's criterion. For each prompt, HF `generate` (greedy, batch 1, no padding) produces a
continuation c_1..c_N and its logits z_hf[i] (output_logits: the raw logits that chose c_i). The
same weights in fastinfer are then teacher-forced on prompt + c_1..c_{N-1}, all prompts batched
in one paged KV cache, in three ways so that every attention path is checked:
  prefill  every sequence whole in one step (the prefill kernel, all_logits=True);
  chunked  every sequence split into three chunks at different places, fed over three steps (the
           prefill kernel over a prefix already in the paged cache);
  decode   the prompts prefilled in one step, then one token per sequence per step (the decode
           kernel); sequences have different prompt and continuation lengths, so the batch is
           ragged and shrinks as sequences finish.
That gives our logits z[i] for the position that chose c_i. With lp = log_softmax:
  top-1 agreement  = fraction of all (prompt, i) with argmax z[i] == c_i (HF's greedy choice);
  max |d logprob|  = max over all (prompt, i) of |lp(z[i])[c_i] - lp(z_hf[i])[c_i]|.
Pass: bf16 agreement >= 99% and max |d logprob| <= 0.05 (the issue's figures, the max taken over
every position); fp32 agreement 100% and max |d logprob| <= 1e-3 (tighter than the issue's 0.05,
which fp32 meets by orders of magnitude: 1e-5 on the CPU). The KV cache is filled with NaN before each run, so a kernel
that reads a slot that was never written turns the logits NaN and fails the test.

Random weights need care. HF's default init (std 0.02) gives near-uniform logits whose top-1 flips
on rounding noise; a std that ignores fan-in makes attention one-hot; and a plain random lm_head
over 32000 tokens puts the top logit barely above a crowd of rivals, so that HF bf16 differs from
HF fp32 (same weights) by up to 0.15 in logprob: no bf16 implementation could pass. The init here:
q, k, v, gate, up std 1/sqrt(fan_in) (unit-scale activations, soft attention); o_proj and down_proj
BLOCK_OUT_GAIN times that; embeddings std EMBED_STD; RMSNorm weights uniform in [0.5, 1.5] (a kernel
that ignored them would show); lm_head std LOGIT_STD/sqrt(hidden) plus, for a random permutation
`successor`, row successor[t] += embedding[t] * SUCCESSOR_LOGIT / (EMBED_STD * hidden). The residual
stream carries the current token's embedding, so its successor's logit is lifted by about
SUCCESSOR_LOGIT * cos(final hidden, embedding): HF's top-1 probability averages about 0.85 (the
logprob still depends on every other logit, and so on attention), top-1 margins are several
nats, and HF bf16 vs HF fp32 stays within about 0.02 (measured on the CPU with hidden 512, 3 layers,
vocab 32000 while tuning).
The lift is set per GPU shape from a CPU run of exactly these cases (HF bf16 and fastinfer's CPU
kernels in bf16, prefill mode; the GPU has not run them yet). At the lift of 16, HF bf16's own
distance from HF fp32 reached 0.021 (hd128) and 0.052 (hd64, 6 layers: the residual stream drifts
further from the embedding, mean top-1 probability 0.71, min 0.06), and fastinfer bf16 vs HF bf16
0.046 and 0.055: two bf16 implementations each ~0.02-0.03 from fp32, in opposite directions, so the
bar of 0.05 measured rounding noise, not the implementation. hd128 at 18: mean top-1 probability
0.95 (min 0.47), HF bf16 vs fp32 0.011, fastinfer bf16 vs HF bf16 0.007; hd64 at 20: 0.97 (min 0.50),
0.016 and 0.023. (At 24 the model is near-certain, mean 0.999, and the test would check little.)
"""
from __future__ import annotations

import math

import pytest
import torch

from fastinfer.loader import load_model
from fastinfer.metadata import SeqChunk
from fastinfer.runner import ModelRunner

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16
MODES = ("prefill", "chunked", "decode")
EMBED_STD = 1.0
BLOCK_OUT_GAIN = 0.5     # o_proj and down_proj: the blocks perturb the residual stream, not drown it
LOGIT_STD = 1.0         # spread of the lm_head's random part of the logits
SUCCESSOR_LOGIT = 16.0  # lift of the current token's successor, times cos(final hidden, its embedding)
MIN_TOP1 = {torch.bfloat16: 0.99, torch.float32: 1.0}
MAX_DELTA_LOGPROB = {torch.bfloat16: 0.05, torch.float32: 1e-3}

# Model shapes: (config kwargs, prompt lengths, new tokens per prompt, successor lift). Each prompt gets its own
# continuation length so that the decode batch shrinks as sequences finish.
GPU_CASES = {
    "hd128": (dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   intermediate_size=5632, num_hidden_layers=4, vocab_size=32000),
              [1, 13, 77, 200, 515], [64, 64, 40, 64, 56], 18.0),
    "hd64": (dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                  intermediate_size=5632, num_hidden_layers=6, vocab_size=32000),
             [3, 31, 140, 333], [64, 50, 64, 64], 20.0),
}
CPU_CASES = {
    "small": (dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                   intermediate_size=512, num_hidden_layers=2, vocab_size=2048),
              [1, 9, 40], [24, 16, 24], 10.0),  # 2 layers keep cos(hidden, embedding) high: a smaller lift
}


def make_hf_llama(config_kwargs: dict, seed: int, device: torch.device, successor_logit: float = SUCCESSOR_LOGIT):
    """An fp32 HF LlamaForCausalLM with the peaked random init described in the module docstring,
    drawn on the CPU and then moved: the same weights on every device (a CUDA generator draws other
    numbers), so the GPU cases are the models test_gpu_cases_are_well_conditioned checks."""
    cfg = transformers.LlamaConfig(**config_kwargs, max_position_embeddings=1024, rope_theta=10000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, EMBED_STD, generator=gen)
            elif name == "lm_head.weight":
                p.normal_(0.0, LOGIT_STD / math.sqrt(p.shape[1]), generator=gen)
            else:  # q, k, v, o, gate, up, down: [out, in]
                gain = BLOCK_OUT_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0.0, gain / math.sqrt(p.shape[1]), generator=gen)
        # lm_head row successor[t] points along token t's embedding: the residual stream carries
        # the current token's embedding, which lifts one "next token" well above the rest.
        embed = model.model.embed_tokens.weight
        successor = torch.randperm(cfg.vocab_size, generator=gen)
        model.lm_head.weight[successor] += embed * (successor_logit / (EMBED_STD * cfg.hidden_size))
    return model.to(device)


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation and the fp32 logits [N, vocab] that chose each of its tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    continuation = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack(out.logits, dim=0)[:, 0].float()
    assert len(continuation) == max_new_tokens == logits.shape[0]
    # The premise: with no logits processor, HF's greedy token is the argmax of the logits it returns.
    assert logits.argmax(-1).tolist() == continuation, "HF applied a logits processor; the reference is not raw"
    return continuation, logits


def block_tables(lengths: list[int], seed: int) -> tuple[list[list[int]], int]:
    """Disjoint block tables in a shuffled pool (so sequences' blocks interleave), and the pool size."""
    needed = [-(-n // BLOCK_SIZE) for n in lengths]
    pool = torch.randperm(sum(needed), generator=torch.Generator().manual_seed(seed)).tolist()
    starts = [sum(needed[:i]) for i in range(len(needed))]
    return [pool[s:s + n] for s, n in zip(starts, needed)], sum(needed)


def _split_rows(logits: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(logits, counts, dim=0))


def teacher_force(runner: ModelRunner, prompts: list[list[int]], continuations: list[list[int]],
                  tables: list[list[int]], mode: str) -> list[torch.Tensor]:
    """Our fp32 logits [N_b, vocab] for the positions that chose each continuation token."""
    for cache in runner.kv_caches:
        cache.fill_(float("nan"))
    fed = [p + c[:-1] for p, c in zip(prompts, continuations)]  # the last token is never fed
    if mode == "prefill":
        logits = runner.run([SeqChunk(f, 0, t, all_logits=True) for f, t in zip(fed, tables)])
        rows = _split_rows(logits, [len(f) for f in fed])
        return [r[len(p) - 1:] for r, p in zip(rows, prompts)]
    if mode == "chunked":
        # cut points at 1/3 and 2/3 of each sequence, shifted per sequence; empty chunks skip a step
        cuts = [[0, min(len(f), len(f) // 3 + b), min(len(f), 2 * len(f) // 3 + 2 * b), len(f)]
                for b, f in enumerate(fed)]
        parts: list[list[torch.Tensor]] = [[] for _ in fed]
        for step in range(3):
            active = [b for b, c in enumerate(cuts) if c[step + 1] > c[step]]
            chunks = [SeqChunk(fed[b][cuts[b][step]:cuts[b][step + 1]], cuts[b][step], tables[b], all_logits=True)
                      for b in active]
            rows = _split_rows(runner.run(chunks), [len(c.token_ids) for c in chunks])
            for b, r in zip(active, rows):
                parts[b].append(r)
        return [torch.cat(p)[len(prompt) - 1:] for p, prompt in zip(parts, prompts)]
    if mode == "decode":
        first = runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])  # [B, vocab]
        out = [[first[b]] for b in range(len(prompts))]
        for i in range(max(len(c) for c in continuations) - 1):
            active = [b for b, c in enumerate(continuations) if i < len(c) - 1]
            chunks = [SeqChunk([continuations[b][i]], len(prompts[b]) + i, tables[b]) for b in active]
            for b, row in zip(active, runner.run(chunks)):
                out[b].append(row)
        return [torch.stack(rows) for rows in out]
    raise ValueError(f"unknown mode {mode!r}")


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], continuations: list[list[int]]) -> dict:
    """Top-1 agreement with HF's greedy tokens and max |d logprob| of those tokens (module docstring)."""
    ours_all, theirs_all = torch.cat(ours).float().cpu(), torch.cat(theirs).float().cpu()
    tokens = torch.tensor([t for c in continuations for t in c])[:, None]
    lp_ours = torch.log_softmax(ours_all, -1).gather(1, tokens)[:, 0]
    lp_hf = torch.log_softmax(theirs_all, -1).gather(1, tokens)[:, 0]
    top2 = theirs_all.topk(2, dim=-1).values
    agree = ours_all.argmax(-1) == tokens[:, 0]
    delta = (lp_ours - lp_hf).abs()
    return {"positions": tokens.shape[0], "top1": float(agree.float().mean()), "disagree": int((~agree).sum()),
            "max_dlogprob": float(delta.max()), "mean_dlogprob": float(delta.mean()),
            "finite": bool(torch.isfinite(ours_all).all()),
            "min_hf_margin": float((top2[:, 0] - top2[:, 1]).min()),
            "mean_hf_top_prob": float(lp_hf.exp().mean())}


def run_case(config_kwargs, prompt_lengths, new_tokens, successor_logit, dtype, device, seed=0) -> dict[str, dict]:
    hf = make_hf_llama(config_kwargs, seed, device, successor_logit).to(dtype)
    prompts = random_prompts(prompt_lengths, config_kwargs["vocab_size"], seed)
    continuations, hf_logits = zip(*(hf_greedy(hf, p, n) for p, n in zip(prompts, new_tokens)))
    ours = load_model(hf, dtype=dtype, device=device).model
    del hf
    tables, num_blocks = block_tables([len(p) + len(c) for p, c in zip(prompts, continuations)], seed)
    runner = ModelRunner(ours, num_blocks, BLOCK_SIZE)
    return {mode: compare(teacher_force(runner, prompts, list(continuations), tables, mode), list(hf_logits),
                          list(continuations)) for mode in MODES}


def check(results: dict[str, dict], dtype: torch.dtype) -> None:
    bad = {mode: r for mode, r in results.items()
           if not (r["finite"] and r["top1"] >= MIN_TOP1[dtype] and r["max_dlogprob"] <= MAX_DELTA_LOGPROB[dtype])}
    assert not bad, (f"{dtype}: needs top-1 agreement >= {MIN_TOP1[dtype]:.0%} and max |d logprob| <= "
                     f"{MAX_DELTA_LOGPROB[dtype]}; failing modes: {bad}; all: {results}")


# (device, case): like conftest's `device` fixture, the GPU runs are marked `cuda`; each device has
# its own shapes (the GPU ones would take minutes on a CPU).
CASES = [pytest.param("cpu", name, id=f"cpu-{name}") for name in CPU_CASES] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.cuda) for name in GPU_CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device, case", CASES)
def test_teacher_forced_agreement_with_hf(device, case, dtype):
    check(run_case(*(CPU_CASES if device == "cpu" else GPU_CASES)[case], dtype, torch.device(device)), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_cases_are_well_conditioned(case):
    """The premise of the GPU cases, checked on the CPU with their exact shapes and lifts: HF's own
    bf16 logprobs of its greedy text stay within 0.025 of HF fp32's (so an implementation as close
    to fp32 as HF passes 0.05 against HF bf16 with room), and the model is not near-certain (mean
    top-1 probability below 0.99: the logprobs still depend on the computation)."""
    config_kwargs, prompt_lengths, new_tokens, lift = GPU_CASES[case]
    device = torch.device("cpu")
    hf32 = make_hf_llama(config_kwargs, 0, device, lift)
    hf16 = make_hf_llama(config_kwargs, 0, device, lift).to(torch.bfloat16)
    prompts = random_prompts(prompt_lengths, config_kwargs["vocab_size"], 0)
    continuations, hf16_logits = zip(*(hf_greedy(hf16, p, n) for p, n in zip(prompts, new_tokens)))
    with torch.no_grad():
        hf32_logits = [hf32(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:].float()
                       for p, c in zip(prompts, continuations)]
    r = compare(hf32_logits, list(hf16_logits), list(continuations))
    assert r["top1"] == 1.0 and r["max_dlogprob"] <= 0.025, r
    assert 0.9 <= r["mean_hf_top_prob"] < 0.99, r
