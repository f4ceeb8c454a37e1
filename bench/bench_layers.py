"""Layer ops of one Llama-3-8B block (bf16) against their plain torch eager equivalents.

    python bench/bench_layers.py [--out PATH] [--iters N] [--tokens 1 64 4096]

Shapes: hidden 4096, 32 query heads, 8 KV heads, head_dim 128, ffn 14336; num_tokens 1 (decode),
64 and 4096 (prefill). Every op here moves bytes and does almost no math, so the figure of merit
is effective bandwidth: the bytes the op must move at least (written out per op below) over its
median device time, and that as a fraction of the device-to-device copy bandwidth measured in the
same run. "vs eager" is torch-eager time / this time (above 1: faster than torch eager).
Timing and L2 flushing: see bench/common.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import common

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, FFN = 4096, 32, 8, 128, 14336
EPS, ROPE_THETA, MAX_POSITION = 1e-5, 500000.0, 8192
BLOCK_SIZE, NUM_BLOCKS = 16, 2048  # a 32k-token paged cache: 2048 x 2 x 16 x 8 x 128 x 2 B = 128 MiB
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
TOKENS = (1, 64, 4096)
EAGER = "torch eager"

State = dict  # the tensors one case works on; ops may rebind entries (out-of-place torch code)


@dataclass
class Case:
    op: str
    setup: Callable[[int, int], State]        # (num_tokens, seed) -> fresh state
    nbytes: Callable[[int], int]              # num_tokens -> bytes moved at least
    impls: dict[str, Callable[[State], tuple]]  # name -> fn(state) -> output tensors


def _randn(gen, *shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale).to(DTYPE)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


# ---- torch eager equivalents (what an HF Llama block runs) ----------------------------------------

def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * xf.to(x.dtype)


def eager_rotary(s: State) -> tuple:
    cos, sin = s["cos_sin_cache"][s["positions"]].chunk(2, dim=-1)  # [T, 64] each, fp32
    cos, sin = cos[:, None, :], sin[:, None, :]
    for name in ("query", "key"):
        x1, x2 = s[name].float().chunk(2, dim=-1)
        s[name].copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    return s["query"], s["key"]


def eager_reshape_and_cache(s: State) -> tuple:
    block, offset = s["slot_mapping"] // BLOCK_SIZE, s["slot_mapping"] % BLOCK_SIZE
    s["kv_cache"][block, 0, offset] = s["key"]
    s["kv_cache"][block, 1, offset] = s["value"]
    return (s["kv_cache"],)


# ---- the cases ------------------------------------------------------------------------------------

def setup_norm(T: int, seed: int) -> State:
    g = _gen(seed)
    return {"x": _randn(g, T, HIDDEN), "residual": _randn(g, T, HIDDEN),
            "weight": _randn(g, HIDDEN, scale=0.1) + 1, "out": torch.empty(T, HIDDEN, dtype=DTYPE, device="cuda")}


def setup_qkv(T: int, seed: int) -> State:
    """query / key / value as the strided views of one fused QKV projection output, as in the model."""
    g = _gen(seed)
    q_width, kv_width = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = _randn(g, T, q_width + 2 * kv_width)  # [T, (32 + 2 * 8) * 128]
    inv_freq = ROPE_THETA ** -(torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    angles = torch.outer(torch.arange(MAX_POSITION, device="cuda", dtype=torch.float32), inv_freq)
    block_order = torch.randperm(NUM_BLOCKS, generator=g, device="cuda")
    tokens = torch.arange(T, device="cuda")
    return {
        "qkv": qkv,
        "query": qkv[:, :q_width].view(T, NUM_HEADS, HEAD_DIM),
        "key": qkv[:, q_width:q_width + kv_width].view(T, NUM_KV_HEADS, HEAD_DIM),
        "value": qkv[:, q_width + kv_width:].view(T, NUM_KV_HEADS, HEAD_DIM),
        "positions": torch.randint(0, MAX_POSITION, (T,), generator=g, device="cuda"),
        "cos_sin_cache": torch.cat((angles.cos(), angles.sin()), dim=-1),  # [MAX_POSITION, 128] fp32
        # Each sequence fills its blocks in order; the blocks themselves are scattered.
        "slot_mapping": block_order[tokens // BLOCK_SIZE] * BLOCK_SIZE + tokens % BLOCK_SIZE,
        "kv_cache": torch.zeros(NUM_BLOCKS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
    }


def setup_mlp(T: int, seed: int) -> State:
    return {"x": _randn(_gen(seed), T, 2 * FFN), "out": torch.empty(T, FFN, dtype=DTYPE, device="cuda")}


TWO_OPS = "fastinfer two ops"


def eager_quant(y: torch.Tensor) -> tuple:
    """Per-token e4m3 quantization in torch eager: (values, fp32 scales)."""
    scales = (y.float().abs().amax(-1) / 448.0).clamp_min(1.0 / (448.0 * 512.0))
    return (y.float() / scales[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scales


def fused_add_then_quant(ops, s: State) -> tuple:
    ops.fused_add_rms_norm(s["x"], s["residual"], s["weight"], EPS)
    return ops.fp8_quantize_per_token(s["x"])


def make_cases(ops) -> list[Case]:
    def fused_add_eager(s: State) -> tuple:
        s["residual"] = s["residual"] + s["x"]
        s["x"] = eager_rms_norm(s["residual"], s["weight"])
        return s["x"], s["residual"]

    def fused_add_ours(s: State) -> tuple:
        ops.fused_add_rms_norm(s["x"], s["residual"], s["weight"], EPS)
        return s["x"], s["residual"]

    def rotary_ours(s: State) -> tuple:
        ops.rotary_embedding(s["positions"], s["query"], s["key"], s["cos_sin_cache"], check_indices=False)
        return s["query"], s["key"]

    def cache_ours(s: State) -> tuple:
        ops.reshape_and_cache(s["key"], s["value"], s["kv_cache"], s["slot_mapping"], check_indices=False)
        return (s["kv_cache"],)

    qk_elems = (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM
    return [
        # read x [T, H] + weight [H], write out [T, H]
        Case("rms_norm", setup_norm, lambda T: (2 * T * HIDDEN + HIDDEN) * ELEM, {
            "fastinfer": lambda s: (ops.rms_norm(s["x"], s["weight"], EPS, out=s["out"]),),
            EAGER: lambda s: (eager_rms_norm(s["x"], s["weight"]),),
            "F.rms_norm": lambda s: (F.rms_norm(s["x"], (HIDDEN,), s["weight"], EPS),)}),
        # read x, residual [T, H] + weight [H], write residual, x [T, H]
        Case("fused_add_rms_norm", setup_norm, lambda T: (4 * T * HIDDEN + HIDDEN) * ELEM,
             {"fastinfer": fused_add_ours, EAGER: fused_add_eager}),
        # read + write q [T, 32, 128] and k [T, 8, 128]; read one fp32 cache row [128] and one int64 position per token
        Case("rotary_embedding", setup_qkv, lambda T: 2 * T * qk_elems * ELEM + T * (HEAD_DIM * 4 + 8),
             {"fastinfer": rotary_ours, EAGER: eager_rotary}),
        # read x [T, 2 * ffn], write out [T, ffn]
        Case("silu_and_mul", setup_mlp, lambda T: 3 * T * FFN * ELEM, {
            "fastinfer": lambda s: (ops.silu_and_mul(s["x"], out=s["out"]),),
            EAGER: lambda s: (F.silu(s["x"][:, :FFN]) * s["x"][:, FFN:],)}),
        # read k, v [T, 8, 128] + one int64 slot per token, write both into the cache
        Case("reshape_and_cache", setup_qkv, lambda T: 4 * T * NUM_KV_HEADS * HEAD_DIM * ELEM + 8 * T,
             {"fastinfer": cache_ours, EAGER: eager_reshape_and_cache}),
        # An FP8 layer's GEMM inputs: read x, residual [T, H] + weight [H]; write residual [T, H], e4m3 [T, H],
        # fp32 scales [T]. "fastinfer" is the one kernel (the model's default), "two ops" what it replaced.
        Case("fused_add_rms_norm -> fp8", setup_norm, lambda T: (3 * T * HIDDEN + HIDDEN) * ELEM + T * HIDDEN + 4 * T, {
            "fastinfer": lambda s: (*ops.rms_norm_quant_fp8(s["x"], s["weight"], EPS, residual=s["residual"]),
                                    s["residual"]),
            TWO_OPS: lambda s: (*fused_add_then_quant(ops, s), s["residual"]),
            EAGER: lambda s: (*eager_quant(fused_add_eager(s)[0]), s["residual"])}),
        # read x [T, 2 * ffn]; write e4m3 [T, ffn], fp32 scales [T]
        Case("silu_and_mul -> fp8", setup_mlp, lambda T: 2 * T * FFN * ELEM + T * FFN + 4 * T, {
            "fastinfer": lambda s: ops.silu_and_mul_quant_fp8(s["x"]),
            TWO_OPS: lambda s: ops.fp8_quantize_per_token(ops.silu_and_mul(s["x"], out=s["out"])),
            EAGER: lambda s: eager_quant(F.silu(s["x"][:, :FFN]) * s["x"][:, FFN:])}),
    ]


def max_abs_diff(case: Case, T: int, impl: str) -> float:
    """max |impl - fastinfer| over the outputs of one call on identical fresh inputs (a sanity check)."""
    ours = case.impls["fastinfer"](case.setup(T, 0))
    theirs = case.impls[impl](case.setup(T, 0))
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, theirs))


def run_case(case: Case, T: int, args, flush, copy_gbps: float) -> list[dict]:
    rows = []
    for impl, fn in case.impls.items():
        state = case.setup(T, 1)
        t = common.time_cuda(lambda: fn(state), warmup=args.warmup, iters=args.iters, flush=flush)
        bw = common.gbps(case.nbytes(T), t["us"])
        rows.append({"op": case.op, "tokens": T, "impl": impl, "us": t["us"], "min_us": t["min_us"],
                     "bytes": case.nbytes(T), "gbps": bw, "frac_copy": bw / copy_gbps,
                     "max_abs_diff": None if impl == "fastinfer" else max_abs_diff(case, T, impl)})
    eager_us = next(r["us"] for r in rows if r["impl"] == EAGER)
    for r in rows:
        r["vs_eager"] = eager_us / r["us"]
    return rows


COLUMNS = [("op", "op", ""), ("tokens", "tokens", "d"), ("impl", "impl", ""), ("us", "time (us)", ".2f"),
           ("gbps", "GB/s", ".0f"), ("frac_copy", "of copy BW", ".1%"), ("vs_eager", "vs eager", ".2f"),
           ("max_abs_diff", "max abs diff", ".3g")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("layers", __doc__, iters=30, warmup=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args(argv)
    fastinfer, flush, copy = common.start()

    rows, errors = [], []
    for case in make_cases(fastinfer.ops):
        for T in args.tokens:
            try:
                rows += run_case(case, T, args, flush, copy["gbps"])
            except Exception as exc:  # report and carry on: one broken op must not hide the others
                errors.append(f"{case.op} tokens={T}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
            torch.cuda.empty_cache()
    notes = [f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write); GB/s = minimum bytes moved / "
             f"median device time, L2 flushed before each of {args.iters} calls; bf16, Llama-3-8B shapes"]
    return common.finish(args.out, name="layers", title="Layer ops vs torch eager (Llama-3-8B, bf16)",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
