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
Fused norms (models/llama.py, steps of <= 16 tokens): the q/k/v and gate / up rows also time
rms_norm_dense_gemv (the RMSNorm applied while x is loaded; gate / up with its SwiGLU epilogue)
against dense_gemv on x normalized beforehand (what the prologue costs); the o and down rows
dense_gemv_add_residual against dense_gemv then fused_add_rms_norm (the norm kernel that goes); and
at qkv, dense_gemv_rope_cache (norm prologue, rotary and the KV-cache write in the epilogue) against
rms_norm_dense_gemv then rotary_embedding_and_cache (what the epilogue saves). "vs unfused" = the
unfused ops' time / the fused kernel's; "max |diff| vs unfused" a sanity check of the fused output.
"..., preload": the q/k/v and gate / up prologue kernels with FASTINFER_GEMV_NORM_PRELOAD=on.
FP8 weights (M <= 16): "fastinfer dense_gemv W8A16" (the weight per-row e4m3, x bf16: what
FASTINFER_FP8_DECODE=w8a16 runs) and "fastinfer fp8_linear (W8A8)" (x quantized per token, then the FP8
GEMM: what an FP8 model's decode step runs by default), both counting N K weight bytes; their error
column is against an fp32 product with the dequantized e4m3 weight.
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
W8A16, W8A8 = "fastinfer dense_gemv W8A16", "fastinfer fp8_linear (W8A8)"
FP8_MAX_M = 16  # ops.GEMV_FP8_MAX_M
EPS = 1e-5
# shape -> [(fused impl, the unfused ops it stands for)] for steps of <= 16 tokens (ops.GEMV_NORM_MAX_M).
# Each RMSNorm kernel is counted once: on the o / down side (the norm kernel that disappears); the q/k/v
# and gate / up pairs run their GEMV on x normalized beforehand (the prologue's cost alone); the rotary
# row's pair is the norm-prologue GEMV then rotary_embedding_and_cache (the epilogue's saving alone).
NORM_IMPLS = {"qkv": [("fastinfer rms_norm_dense_gemv", "dense_gemv (x normalized beforehand)"),
                      ("fastinfer dense_gemv_rope_cache (+ norm)", "rms_norm_dense_gemv + rotary_embedding_and_cache")],
              "gate_up": [("fastinfer rms_norm_dense_gemv (SwiGLU)", "dense_gemv_silu_mul (x normalized beforehand)")],
              "o": [("fastinfer dense_gemv_add_residual", "dense_gemv + fused_add_rms_norm")],
              "down": [("fastinfer dense_gemv_add_residual", "dense_gemv + fused_add_rms_norm")]}
# The same prologue kernels with FASTINFER_GEMV_NORM_PRELOAD=on (the first weight chunk loaded before the
# prologue; gemv.cuh kPreload), against the same unfused pair.
PRELOAD_IMPLS = {"qkv": [("fastinfer rms_norm_dense_gemv, preload", "dense_gemv (x normalized beforehand)")],
                 "gate_up": [("fastinfer rms_norm_dense_gemv (SwiGLU), preload",
                              "dense_gemv_silu_mul (x normalized beforehand)")]}
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B: qkv N = (32 + 2 x 8) x 128 = 6144


def norm_impls(ops, name: str, weight: torch.Tensor, x: torch.Tensor, g: torch.Generator) -> dict:
    """The fused kernels of this projection and the unfused ops they stand for, as fn(x) for this x."""
    m = x.shape[0]
    if name not in NORM_IMPLS or m > ops.GEMV_NORM_MAX_M:
        return {}
    (fused, pair), *more = NORM_IMPLS[name]
    n, k = weight.shape
    if name in ("o", "down"):  # x: the attention / MLP output, added to a residual of N columns
        residual = torch.randn(m, n, generator=g, device="cuda").to(DTYPE)
        norm_w = torch.ones(n, dtype=DTYPE, device="cuda")

        def unfused_residual(x):
            hidden = ops.dense_gemv(x, weight)
            ops.fused_add_rms_norm(hidden, residual, norm_w, EPS)
            return residual
        def fused_residual(x):
            ops.dense_gemv_add_residual(x, weight, residual)
            return residual
        return {fused: fused_residual, pair: unfused_residual}
    # x: the residual stream; its sums of squares per 16 columns, as the previous projection leaves them
    sums = x.float().pow(2).reshape(m, -1, ops.SQ_SUM_GROUP).sum(-1)
    norm_w = torch.ones(k, dtype=DTYPE, device="cuda")
    normed = ops.rms_norm(x, norm_w, EPS)
    silu = name == "gate_up"
    impls = {fused: lambda x: ops.rms_norm_dense_gemv(x, sums, norm_w, EPS, weight, silu_mul=silu),
             pair: lambda x: ops.dense_gemv_silu_mul(normed, weight) if silu else ops.dense_gemv(normed, weight)}
    for preload_impl, _ in PRELOAD_IMPLS.get(name, []):
        impls[preload_impl] = common.with_env(impls[fused], {"FASTINFER_GEMV_NORM_PRELOAD": "on"})
    if name == "qkv" and n == (HEADS + 2 * KV_HEADS) * HEAD_DIM:  # + rotary and the KV-cache write of a decode step
        from fastinfer.models.rope import cos_sin_cache
        (rope_fused, rope_pair), = more
        cos_sin = cos_sin_cache(HEAD_DIM, 8192, 500000.0, None, "cuda")
        cache = torch.zeros(m, 2, 16, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")  # a block per token
        positions = torch.arange(m, device="cuda") + 1000
        slots = torch.arange(m, device="cuda") * 16

        def unfused_rope(x):
            qkv = ops.rms_norm_dense_gemv(x, sums, norm_w, EPS, weight)
            q, kk, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            q = q.view(m, HEADS, HEAD_DIM)
            ops.rotary_embedding_and_cache(positions, q, kk.view(m, KV_HEADS, HEAD_DIM), v.view(m, KV_HEADS, HEAD_DIM),
                                           cos_sin, cache, slots, check_indices=False)
            return q
        impls[rope_fused] = lambda x: ops.dense_gemv_rope_cache(x, weight, positions, cos_sin, cache, slots, HEADS,
                                                                sq_sums=sums, norm_weight=norm_w, eps=EPS,
                                                                check_indices=False)
        impls[rope_pair] = unfused_rope
    return impls


def run_shape(ops, name: str, k: int, n: int, tokens, args, flush, copy_gbps: float, errors: list) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(k + n)
    weight = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(DTYPE)
    plain = {CUBLAS: lambda x: torch.matmul(x, weight.t()), OURS: lambda x: ops.dense_gemv(x, weight)}
    scale = (weight.float().abs().amax(dim=1) / 448.0).clamp(min=1e-12)
    w8 = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn)
    fp8 = {W8A16: lambda x: ops.dense_gemv(x, w8, weight_scale=scale),
           W8A8: lambda x: ops.fp8_linear(x, w8, scale)}
    rows = []
    for m in tokens:
        x = torch.randn(m, k, generator=g, device="cuda").to(DTYPE)
        reference = x.float() @ weight.float().t()
        fused = norm_impls(ops, name, weight, x, g)
        impls = {**plain, **fused, **(fp8 if m <= FP8_MAX_M else {})}
        times, outputs = {}, {}
        for impl, fn in impls.items():
            try:
                out = outputs[impl] = fn(x).clone()
                err = float((out.float() - reference).abs().max()) if impl in plain else None
                if impl in fp8:
                    err = float((out.float() - x.float() @ (w8.float() * scale[:, None]).t()).abs().max())
                t = common.time_cuda(lambda: fn(x), warmup=args.warmup, iters=args.iters, flush=flush)
            except Exception as exc:  # report and carry on: one failure must not hide the other rows
                errors.append(f"{name} M={m} {impl}: {type(exc).__name__}: {exc}")
                print(f"ERROR {errors[-1]}")
                continue
            nbytes = (1 if impl in fp8 else 2) * n * k + 2 * m * (k + n)
            bw = common.gbps(nbytes, t["us"])
            times[impl] = t["us"]
            rows.append({"shape": f"{name} {k}->{n}", "m": m, "impl": impl, "us": t["us"], "min_us": t["min_us"],
                         "bytes": nbytes, "gbps": bw, "frac_copy": bw / copy_gbps, "max_abs_err": err})
        for r in rows[-len(times):]:
            r["vs_cublas"] = times[CUBLAS] / r["us"] if CUBLAS in times else None
        for fused_impl, pair in NORM_IMPLS.get(name, []) + PRELOAD_IMPLS.get(name, []) if fused else []:
            for r in rows[-len(times):]:
                if r["impl"] == fused_impl and pair in times:
                    r["vs_unfused"] = times[pair] / r["us"]
                    # a sanity check, not a tolerance: o / down compare residuals after many timed calls
                    a, b = outputs[fused_impl], outputs[pair]
                    if name not in ("o", "down") and a.shape == b.shape:
                        r["diff_vs_unfused"] = float((a.float() - b.float()).abs().max())
    return rows


COLUMNS = [("shape", "shape (K->N)", ""), ("m", "M", "d"), ("impl", "impl", ""), ("us", "time (us)", ".1f"),
           ("gbps", "GB/s", ".0f"), ("frac_copy", "of copy BW", ".1%"), ("vs_cublas", "vs cuBLAS", ".2f"),
           ("vs_unfused", "vs unfused", ".2f"), ("max_abs_err", "max abs err vs fp32", ".2e"),
           ("diff_vs_unfused", "max |diff| vs unfused", ".1e")]


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
