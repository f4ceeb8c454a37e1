"""FP8 GEMM (sm_90a) against torch._scaled_mm and bf16 cuBLAS, 8192^3 and Llama-3-8B decode/prefill shapes.

    python bench/bench_fp8.py [--out PATH] [--iters N] [--m 1 16 64 256 4096]

out[M, N] = x[M, K] @ w[N, K]^T. Implementations, all on the same fp8 inputs (bf16 output):
  fastinfer rowwise   fastinfer.ops.fp8_scaled_mm, per-token x per-channel scales
  fastinfer tensor    the same kernel with per-tensor scales
  fastinfer linear    fastinfer.ops.fp8_linear: per-token quantization of bf16 x + the GEMM
  ... 128x256         M > 64: the same with 128 x 256 tiles (FASTINFER_FP8_GEMM_TILE)
  ... split-K on      M <= 64: the same splitting K wherever the output tiles leave SMs idle
                      (FASTINFER_FP8_SPLIT_K=on; the default splits only M <= 16 with K >= 8192)
  ... gemv            M <= 16: the mma.sync decode GEMV instead of wgmma (FASTINFER_FP8_GEMV=on)
  ... overlap         per-tensor, the next k-tile's wgmma issued before the last one's promotion
                      (FASTINFER_FP8_PROMOTE=overlap; 128-column tiles, so the default tile at M > 64)
  ... multicast       M > 64: 2-CTA clusters sharing each weight tile by TMA multicast
                      (FASTINFER_FP8_MULTICAST=on)
  ... pingpong        per-tensor, the two consumer warpgroups' wgmma issues alternated
                      (FASTINFER_FP8_PROMOTE=pingpong)
  (the multicast and pingpong rows, written without a GPU, are timed after the peers of their shape)
  _scaled_mm tensor   torch._scaled_mm, per-tensor scales (cuBLAS)
  _scaled_mm rowwise  torch._scaled_mm, row-wise scales
  bf16 cuBLAS         F.linear on the bf16 operands
"vs bf16" is bf16 time / this time; "vs peer" compares with _scaled_mm at the same scale granularity.
Decode shapes (M <= 64) are bound by the weight bytes: "of copy BW" is N*K bytes (fp8) or 2*N*K
(bf16) over the time, as a fraction of the device-to-device copy bandwidth measured in the run.
"mean rel err" is sum |out - ref| / sum |ref| against an fp32 matmul of the same fp8-rounded inputs
(issue 7: at most 3x that of _scaled_mm). Timing and L2 flushing: bench/common.py.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import common

# (name, K, N): a Llama-3-8B layer's projections (q/k/v and gate/up fused, as fastinfer runs them)
LLAMA3_8B = [("qkv 4096->6144", 4096, 6144), ("o 4096->4096", 4096, 4096),
             ("gate_up 4096->28672", 4096, 28672), ("down 14336->4096", 14336, 4096)]
M_VALUES = (1, 16, 64, 256, 4096)
FP8 = torch.float8_e4m3fn


def operands(m: int, k: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    return {"x": x, "w": w}


def quantized(ops, d: dict) -> dict:
    """fp8 operands at both granularities, from fastinfer's quantization (bit-exact with the spec)."""
    xr, sxr = ops.fp8_quantize_per_token(d["x"])
    wr, swr = ops.fp8_quantize_per_token(d["w"])
    xt, sxt = ops.fp8_quantize_per_tensor(d["x"])
    wt, swt = ops.fp8_quantize_per_tensor(d["w"])
    return {"row": (xr, wr, sxr, swr), "tensor": (xt, wt, sxt, swt)}


def implementations(ops, d: dict, q: dict) -> dict:
    xr, wr, sxr, swr = q["row"]
    xt, wt, sxt, swt = q["tensor"]
    wide = {  # M <= 64: split-K forced too (FASTINFER_FP8_SPLIT_K=on); M > 64: the 128 x 256 tiles too
        "fastinfer rowwise split-K on": lambda: ops.fp8_scaled_mm(xr, wr, sxr, swr),
        "fastinfer tensor split-K on": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt)} if d["x"].shape[0] <= 64 else {
        "fastinfer rowwise 128x256": lambda: ops.fp8_scaled_mm(xr, wr, sxr, swr),
        "fastinfer tensor 128x256": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt)}
    gemv = {  # FASTINFER_FP8_GEMV=on (the GEMV takes M <= 16 only)
        "fastinfer rowwise gemv": lambda: ops.fp8_scaled_mm(xr, wr, sxr, swr),
        "fastinfer tensor gemv": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt),
        "fastinfer linear gemv": lambda: ops.fp8_linear(d["x"], wr, swr)} if d["x"].shape[0] <= 16 else {}
    multicast = {  # FASTINFER_FP8_MULTICAST=on (M > 64; applies with an even number of 128-row tiles)
        "fastinfer tensor multicast": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt),
        "fastinfer tensor 128x256 multicast": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt),
        "fastinfer rowwise 128x256 multicast": lambda: ops.fp8_scaled_mm(xr, wr, sxr, swr)} if d["x"].shape[0] > 64 else {}
    pingpong = {"fastinfer tensor pingpong": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt)}  # FASTINFER_FP8_PROMOTE=pingpong
    if d["x"].shape[0] > 64:
        pingpong["fastinfer tensor 128x256 pingpong"] = lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt)
    return {
        **gemv,
        "fastinfer rowwise": lambda: ops.fp8_scaled_mm(xr, wr, sxr, swr),
        "fastinfer tensor": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt),
        "fastinfer tensor overlap": lambda: ops.fp8_scaled_mm(xt, wt, sxt, swt),  # FASTINFER_FP8_PROMOTE=overlap
        **wide,
        "fastinfer linear": lambda: ops.fp8_linear(d["x"], wr, swr),
        "_scaled_mm tensor": lambda: torch._scaled_mm(xt, wt.T, sxt[0], swt[0], out_dtype=torch.bfloat16),
        "_scaled_mm rowwise": lambda: torch._scaled_mm(xr, wr.T, sxr[:, None], swr[None, :], out_dtype=torch.bfloat16),
        "bf16 cuBLAS": lambda: F.linear(d["x"], d["w"]),
        **multicast,
        **pingpong,
    }


PEER = {"fastinfer rowwise": "_scaled_mm rowwise", "fastinfer linear": "_scaled_mm rowwise",
        "fastinfer tensor": "_scaled_mm tensor", "fastinfer rowwise 128x256": "_scaled_mm rowwise",
        "fastinfer tensor 128x256": "_scaled_mm tensor", "fastinfer rowwise split-K on": "_scaled_mm rowwise",
        "fastinfer tensor split-K on": "_scaled_mm tensor", "fastinfer rowwise gemv": "_scaled_mm rowwise",
        "fastinfer tensor gemv": "_scaled_mm tensor", "fastinfer linear gemv": "_scaled_mm rowwise",
        "fastinfer tensor overlap": "_scaled_mm tensor",
        "fastinfer tensor multicast": "_scaled_mm tensor", "fastinfer tensor 128x256 multicast": "_scaled_mm tensor",
        "fastinfer rowwise 128x256 multicast": "_scaled_mm rowwise", "fastinfer tensor pingpong": "_scaled_mm tensor",
        "fastinfer tensor 128x256 pingpong": "_scaled_mm tensor"}
GRANULARITY = {"fastinfer rowwise": "row", "fastinfer linear": "row", "_scaled_mm rowwise": "row",
               "fastinfer tensor": "tensor", "_scaled_mm tensor": "tensor", "fastinfer rowwise 128x256": "row",
               "fastinfer tensor 128x256": "tensor", "fastinfer rowwise split-K on": "row",
               "fastinfer tensor split-K on": "tensor", "fastinfer rowwise gemv": "row",
               "fastinfer tensor gemv": "tensor", "fastinfer linear gemv": "row", "fastinfer tensor overlap": "tensor",
               "fastinfer tensor multicast": "tensor", "fastinfer tensor 128x256 multicast": "tensor",
               "fastinfer rowwise 128x256 multicast": "row", "fastinfer tensor pingpong": "tensor",
               "fastinfer tensor 128x256 pingpong": "tensor"}


def mean_rel_err(out: torch.Tensor, a, b, sa, sb) -> float:
    ref = (a.float() * sa.reshape(-1, 1)) @ (b.float() * sb.reshape(-1, 1)).T
    return float((out.float() - ref).abs().sum() / ref.abs().sum())


def run_shape(ops, shape: str, m: int, k: int, n: int, args, flush, copy_gbps: float) -> list[dict]:
    d = operands(m, k, n)
    q = quantized(ops, d)
    rows = []
    for impl, fn in implementations(ops, d, q).items():
        # the op reads these settings at every call: set for the timing of one impl at a time
        os.environ["FASTINFER_FP8_GEMM_TILE"] = "128x256" if "128x256" in impl else "128x128"
        os.environ["FASTINFER_FP8_MULTICAST"] = "on" if impl.endswith("multicast") else "off"
        os.environ["FASTINFER_FP8_SPLIT_K"] = "on" if impl.endswith("split-K on") else "auto"
        os.environ["FASTINFER_FP8_GEMV"] = "on" if impl.endswith("gemv") else "off"
        os.environ["FASTINFER_FP8_PROMOTE"] = ("overlap" if impl.endswith("overlap") else
                                               "pingpong" if impl.endswith("pingpong") else "serial")
        t = common.time_cuda(fn, warmup=args.warmup, iters=args.iters, flush=flush)
        weight_bytes = n * k * (2 if impl == "bf16 cuBLAS" else 1)
        row = {"shape": shape, "M": m, "impl": impl, "us": t["us"], "tflops": 2 * m * n * k / (t["us"] * 1e6),
               "frac_copy": common.gbps(weight_bytes, t["us"]) / copy_gbps if m <= 64 else None}
        if impl in GRANULARITY and m * n * k <= 2**40:  # fp32 reference matmul (8192^3: ~20 ms on an H100)
            row["mean_rel_err"] = mean_rel_err(fn(), *q[GRANULARITY[impl]])
        rows.append(row)
    os.environ.pop("FASTINFER_FP8_GEMM_TILE", None)
    os.environ.pop("FASTINFER_FP8_SPLIT_K", None)
    os.environ.pop("FASTINFER_FP8_GEMV", None)
    os.environ.pop("FASTINFER_FP8_PROMOTE", None)
    os.environ.pop("FASTINFER_FP8_MULTICAST", None)
    by_impl = {r["impl"]: r for r in rows}
    for r in rows:
        r["vs_bf16"] = by_impl["bf16 cuBLAS"]["us"] / r["us"]
        if r["impl"] in PEER:
            r["vs_peer"] = by_impl[PEER[r["impl"]]]["us"] / r["us"]
    return rows


COLUMNS = [("shape", "shape (K->N)", ""), ("M", "M", "d"), ("impl", "impl", ""), ("us", "time (us)", ".1f"),
           ("tflops", "TFLOP/s", ".0f"), ("vs_bf16", "vs bf16", ".2f"), ("vs_peer", "vs _scaled_mm", ".2f"),
           ("frac_copy", "of copy BW", ".0%"), ("mean_rel_err", "mean rel err", ".2e")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("fp8", __doc__, iters=20, warmup=3)
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES))
    args = parser.parse_args(argv)
    common.require_cuda_build()
    if torch.cuda.get_device_capability() != (9, 0):
        common.cannot_run(f"the FP8 GEMM needs a Hopper GPU, got {torch.cuda.get_device_name()}")
    fastinfer, flush, copy = common.start()

    cases = [("8192^3", 8192, 8192, 8192)] + [(name, m, k, n) for name, k, n in LLAMA3_8B for m in args.m]
    rows, errors = [], []
    for shape, m, k, n in cases:
        try:
            rows += run_shape(fastinfer.ops, shape, m, k, n, args, flush, copy["gbps"])
        except Exception as exc:  # report and carry on
            errors.append(f"{shape} M={m}: {type(exc).__name__}: {exc}")
            print(f"ERROR {errors[-1]}")
        torch.cuda.empty_cache()
    notes = [f"bf16 output; L2 flushed before each of {args.iters} calls; copy {copy['gbps']:.0f} GB/s",
             "targets (issue 7): 8192^3 >= _scaled_mm tensor; M <= 64 >= 1.8x bf16; mean rel err <= 3x _scaled_mm"]
    return common.finish(args.out, name="fp8", title="FP8 GEMM vs torch._scaled_mm and bf16 cuBLAS",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
