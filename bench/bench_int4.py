"""W4A16 GEMM (fastinfer.ops.int4_linear) against torch bf16 matmul (cuBLAS) and torch's int4 mm.

    python bench/bench_int4.py [--out PATH] [--iters N] [--m 1 4 16 64 256]

Shapes: the four projections of a Llama-3-8B layer, y = x @ W^T with W [N, K]: qkv 4096 -> 6144,
o 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096; M = tokens. Every implementation runs
the same weight: random 4-bit codes with group-128 scales and minimums (w = q s + m, GGUF Q4_1's
form and the one torch's _weight_int4pack_mm computes), dequantized to bf16 for cuBLAS.
Bytes moved at least: the weight as each implementation stores it (4-bit codes + 2 x bf16 per group
of 128, or bf16) plus x and out; GB/s = bytes / median device time, and that as a fraction of the
device-to-device copy bandwidth measured in the same run. "vs bf16" = cuBLAS time / this time.
Issue 6 asks for >= 3x vs bf16 at M <= 16 and >= 1.5x at M = 64 on the down projection.
Timing and L2 flushing: see bench/common.py.
"""
from __future__ import annotations


import torch

import common

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
TOKENS = (1, 4, 16, 64, 256)
GROUP = 128
DTYPE = torch.bfloat16
BF16, TORCH_INT4, OURS = "torch bf16 (cuBLAS)", "torch _weight_int4pack_mm", "fastinfer int4_linear"
# The default (auto) kernel choice above, and each CUDA kernel forced at every M (FASTINFER_INT4_KERNEL),
# with the settings each variant changes (python/fastinfer/env.py describes them).
VARIANTS = {
    "fastinfer int4_linear [slot waves]": {"FASTINFER_INT4_WAVES": "slots"},  # the default before 2026-11-28
    "fastinfer int4_linear [small]": {"FASTINFER_INT4_KERNEL": "small"},
    "fastinfer int4_linear [small_deferred]": {"FASTINFER_INT4_KERNEL": "small_deferred"},
    "fastinfer int4_linear [small_deferred, earlier split rule]": {"FASTINFER_INT4_KERNEL": "small_deferred",
                                                                   "FASTINFER_INT4_SPLITS": "rounds",
                                                                   "FASTINFER_INT4_WAVES": "slots"},
    "fastinfer int4_linear [tiles]": {"FASTINFER_INT4_KERNEL": "tiles"},
    "fastinfer int4_linear [tiles, slot waves]": {"FASTINFER_INT4_KERNEL": "tiles", "FASTINFER_INT4_WAVES": "slots"},
    "fastinfer int4_linear [small_streamk]": {"FASTINFER_INT4_KERNEL": "small_streamk"},
    # the sm_90a warpgroup-MMA kernel (w4a16_wgmma.cuh; written without a GPU, 2026-11-28), last
    "fastinfer int4_linear [wgmma]": {"FASTINFER_INT4_KERNEL": "wgmma"},
}


def launch_plan(fastinfer) -> str:
    """The last int4_linear launch: kernel, splits per cluster, waves / resident clusters of that size."""
    info = fastinfer._C.int4_last_launch()
    if not info or info["kernel"] == "none":
        return ""
    resident = info["resident"][info["splits"] - 1]
    return f"{info['kernel']} s{info['splits']} {info['ctas']} CTAs, {info['waves']} w of {resident}"


TORCH_INNER_K_TILES = 8


def make_weight(k: int, n: int, seed: int):
    """(codes uint8 [N, K], scales, mins [N, K / 128] bf16, dense bf16 [N, K]) on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=g, device="cuda") * 0.01 + 0.002).to(DTYPE)
    mins = (-8 * scales.float() + torch.randn(n, k // GROUP, generator=g, device="cuda") * 1e-3).to(DTYPE)
    dense = (codes.float() * scales.float().repeat_interleave(GROUP, 1) +
             mins.float().repeat_interleave(GROUP, 1)).to(DTYPE)
    return codes, scales, mins, dense


def torch_int4_operands(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
    """torch's tinygemm format: w = (q - 8) * s + z with z = m + 8 s; codes two per byte."""
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()  # uint8 [N, K / 2]
    weight = torch.ops.aten._convert_weight_to_int4pack(packed, TORCH_INNER_K_TILES)
    zeros = (mins.float() + 8 * scales.float()).to(DTYPE)
    scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()  # [K / 128, N, 2]
    return weight, scales_and_zeros


def run_shape(fastinfer, name: str, k: int, n: int, tokens, args, flush, copy_gbps: float, errors: list) -> list[dict]:
    from fastinfer.quant.int4 import QuantizedWeight, pack
    codes, scales, mins, dense = make_weight(k, n, seed=k + n)
    p = pack(QuantizedWeight(codes, scales, GROUP, mins=mins))
    weight_bytes = {OURS: n * k // 2 + 2 * (k // GROUP) * n * 2, TORCH_INT4: n * k // 2 + 2 * (k // GROUP) * n * 2,
                    BF16: n * k * 2}
    impls = {BF16: lambda x: torch.matmul(x, dense.t()),
             OURS: lambda x: fastinfer.ops.int4_linear(x, p.qweight, p.scales, GROUP, mins=p.mins)}
    try:  # the peer before the variants: the new kernels come last (a broken context costs only them)
        tw, tsz = torch_int4_operands(codes, scales, mins)
        impls[TORCH_INT4] = lambda x: torch.ops.aten._weight_int4pack_mm(x, tw, GROUP, tsz)
    except Exception as exc:  # an older / newer torch without this format: report, keep going
        errors.append(f"{name}: torch int4 setup: {type(exc).__name__}: {exc}")
    for label, settings in VARIANTS.items():
        impls[label] = common.with_env(impls[OURS], settings)
        weight_bytes[label] = weight_bytes[OURS]
    rows, dense_t = [], dense.float().t()
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.float32).to(DTYPE)
        reference = x.float() @ dense_t
        times = {}
        for impl, fn in impls.items():
            try:
                out = fn(x)
                plan = launch_plan(fastinfer) if impl.startswith(OURS) else ""
                err = float((out.float() - reference).abs().sum() / reference.abs().sum())
                t = common.time_cuda(lambda: fn(x), warmup=args.warmup, iters=args.iters, flush=flush)
            except Exception as exc:
                errors.append(f"{name} M={m} {impl}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
                continue
            nbytes = weight_bytes[impl] + 2 * m * (k + n)
            bw = common.gbps(nbytes, t["us"])
            times[impl] = t["us"]
            rows.append({"shape": f"{name} {k}->{n}", "m": m, "impl": impl, "us": t["us"], "min_us": t["min_us"],
                         "bytes": nbytes, "gbps": bw, "frac_copy": bw / copy_gbps, "rel_err": err,
                         "plan": plan})
        for r in rows[-len(times):]:
            r["vs_bf16"] = times[BF16] / r["us"] if BF16 in times else None
            r["vs_torch_int4"] = times[TORCH_INT4] / r["us"] if TORCH_INT4 in times else None
    return rows


COLUMNS = [("shape", "shape (K->N)", ""), ("m", "M", "d"), ("impl", "impl", ""), ("us", "time (us)", ".1f"),
           ("gbps", "GB/s", ".0f"), ("frac_copy", "of copy BW", ".1%"), ("vs_bf16", "vs bf16", ".2f"),
           ("vs_torch_int4", "vs torch int4", ".2f"), ("rel_err", "mean rel err vs fp32", ".1e"),
           ("plan", "launch (kernel, splits, CTAs, waves of resident clusters)", "")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("int4", __doc__, iters=30, warmup=5)
    parser.add_argument("--m", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args(argv)
    fastinfer, flush, copy = common.start()

    rows, errors = [], []
    for name, (k, n) in SHAPES.items():
        rows += run_shape(fastinfer, name, k, n, args.m, args, flush, copy["gbps"], errors)
        torch.cuda.empty_cache()
    notes = [f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write); bf16 activations, group 128 "
             f"scales + minimums; L2 flushed before each of {args.iters} calls; Llama-3-8B projection shapes"]
    return common.finish(args.out, name="int4", title="W4A16 GEMM vs cuBLAS bf16 and torch int4 (Llama-3-8B shapes)",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
