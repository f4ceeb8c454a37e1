"""Decode-sized dense GEMM (fastinfer.ops.dense_gemv) against torch.matmul (cuBLAS), bf16.

    python bench/bench_gemv.py [--out PATH] [--iters N] [--m 1 2 4 8 16 32]

Shapes: Llama-3-8B's projections, y = x @ W^T with W [N, K]: qkv 4096 -> 6144, o 4096 -> 4096,
gate_up 4096 -> 28672, down 14336 -> 4096, lm_head 4096 -> 128256; M = tokens of a decode step
(1..8: one x tile in the kernel, 16: two, 32: four; batch-32 decode is the end-to-end target).
Bytes moved at least: the bf16 weight (2 N K) plus x and out (2 M (K + N)); GB/s = bytes / median
device time, and that as a fraction of the device-to-device copy bandwidth measured in the same
run (a copy reads and writes, so a read-mostly stream can exceed 100%). "vs cuBLAS" = cuBLAS time /
this time. Issue 9 needs >= 85% of the weight-bandwidth roofline for batch-1 decode, and batch-32
decode needs ~88% at M = 32 (cuBLAS: ~67%). At M = 16 / 32 x is 1 / 2 x the W bytes each CTA
reads (from L1 / L2, not DRAM): see the x-traffic note in csrc/include/fastinfer/gemm/gemv.cuh.
Timing and L2 flushing: see bench/common.py.
"""
from __future__ import annotations

import torch

import common

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}  # (K, N)
TOKENS = (1, 2, 4, 8, 16, 32)
DTYPE = torch.bfloat16
CUBLAS, OURS = "torch.matmul (cuBLAS)", "fastinfer dense_gemv"


def run_shape(ops, name: str, k: int, n: int, tokens, args, flush, copy_gbps: float, errors: list) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(k + n)
    weight = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(DTYPE)
    impls = {CUBLAS: lambda x: torch.matmul(x, weight.t()), OURS: lambda x: ops.dense_gemv(x, weight)}
    rows = []
    for m in tokens:
        x = torch.randn(m, k, generator=g, device="cuda").to(DTYPE)
        reference = x.float() @ weight.float().t()
        times = {}
        for impl, fn in impls.items():
            try:
                out = fn(x)
                err = float((out.float() - reference).abs().max())
                t = common.time_cuda(lambda: fn(x), warmup=args.warmup, iters=args.iters, flush=flush)
            except Exception as exc:  # report and carry on: one failure must not hide the other rows
                errors.append(f"{name} M={m} {impl}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
                continue
            nbytes = 2 * n * k + 2 * m * (k + n)
            bw = common.gbps(nbytes, t["us"])
            times[impl] = t["us"]
            rows.append({"shape": f"{name} {k}->{n}", "m": m, "impl": impl, "us": t["us"], "min_us": t["min_us"],
                         "bytes": nbytes, "gbps": bw, "frac_copy": bw / copy_gbps, "max_abs_err": err})
        for r in rows[-len(times):]:
            r["vs_cublas"] = times[CUBLAS] / r["us"] if CUBLAS in times else None
    return rows


COLUMNS = [("shape", "shape (K->N)", ""), ("m", "M", "d"), ("impl", "impl", ""), ("us", "time (us)", ".1f"),
           ("gbps", "GB/s", ".0f"), ("frac_copy", "of copy BW", ".1%"), ("vs_cublas", "vs cuBLAS", ".2f"),
           ("max_abs_err", "max abs err vs fp32", ".2e")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("gemv", __doc__, iters=30, warmup=5)
    parser.add_argument("--m", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args(argv)
    fastinfer, flush, copy = common.start()

    rows, errors = [], []
    for name, (k, n) in SHAPES.items():
        rows += run_shape(fastinfer.ops, name, k, n, args.m, args, flush, copy["gbps"], errors)
        torch.cuda.empty_cache()
    notes = [f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write); bf16 weights and activations; "
             f"L2 flushed before each of {args.iters} calls; Llama-3-8B projection shapes"]
    return common.finish(args.out, name="gemv", title="Decode GEMV vs cuBLAS bf16 (Llama-3-8B shapes, M = 1..32)",
                         columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)


if __name__ == "__main__":
    raise SystemExit(main())
