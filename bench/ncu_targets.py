"""One launch of a kernel worth profiling, for Nsight Compute (bench/gpu_check.sh, GPU_CHECK_NCU).

    ncu -k regex:<KERNELS[target]> -s 3 -c 1 --section ... python bench/ncu_targets.py <target>

Each target builds its inputs, then calls its op four times: ncu skips the first three launches of the
named kernel (warm-up: module loading, occupancy queries, cuBLAS / allocator state) and profiles the
fourth. The shapes are the ones the issues measure (bench/PERF_NOTES.md says what each profile is for):

  prefill      wgmma prefill, B1 H32/8 S4096 D128 causal, paged 16-token blocks   (issue 5: 236 vs 329 TFLOP/s)
  decode_bf16  tensor-core decode, B32 ctx 8192, bf16 cache                        (issue 5 / 7 baseline)
  decode_fp8   the same over an e4m3 cache                                         (issue 7: 1.6x bf16)
  int4_m64     int4_linear tile kernel, M 64, down 14336 -> 4096, group 128       (issue 6: 0.61x bf16)
  int4_m1      int4_linear GEMV kernel (auto), M 1, gate_up 4096 -> 28672         (issue 6: 3x bf16)
  fp8_gemm     fp8_scaled_mm 8192^3, per-tensor scales                            (issue 7: >= _scaled_mm)
  gemv_norm    rms_norm_dense_gemv (SwiGLU), M 1, gate_up 4096 -> 28672           (issue 9: the prologue)
  int4_wgmma   int4_linear on the wgmma kernel (FASTINFER_INT4_KERNEL=wgmma), M 64, down 14336 -> 4096
  fp8_multicast  the fp8_gemm target in multicast clusters (FASTINFER_FP8_MULTICAST=on): only that differs
  gemv_w8a16   rms_norm_dense_gemv (SwiGLU) with e4m3 weights, M 1, gate_up 4096 -> 28672 (the W8A16 decode
               path: issue-bound or memory-bound? compare with gemv_norm)

Runs on the GPU only; prints one line per call. Exit 2 when it cannot run (bench/common.py's contract).
"""
from __future__ import annotations

import os
import sys

import torch

import common

KERNELS = {"prefill": "paged_prefill_wgmma", "decode_bf16": "paged_decode_mma", "decode_fp8": "paged_decode_mma",
           "int4_m64": "w4a16_kernel", "int4_m1": "w4a16_small", "fp8_gemm": "fp8_gemm_kernel",
           "gemv_norm": "dense_gemv", "int4_wgmma": "w4a16_wgmma_kernel", "fp8_multicast": "fp8_gemm_kernel",
           "gemv_w8a16": "dense_gemv"}
CALLS = 4


def paged(k: torch.Tensor, v: torch.Tensor, block: int = 16):
    """[B, Hkv, S, D] K and V -> a cache of shuffled 16-token blocks and its block table."""
    b, hkv, s, d = k.shape
    per_seq = -(-s // block)
    perm = torch.randperm(b * per_seq, device=k.device)
    cache = torch.zeros(b * per_seq, 2, block, hkv, d, dtype=k.dtype, device=k.device)
    for i, t in enumerate((k, v)):
        blocks = t.permute(0, 2, 1, 3).reshape(b, per_seq, block, hkv, d)  # s % block == 0 here
        cache[perm.view(b, per_seq), i] = blocks
    return cache, perm.view(b, per_seq).to(torch.int32)


def target_fn(ops, name: str):
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = torch.bfloat16
    if name == "prefill":
        os.environ["FASTINFER_PREFILL_KERNEL"] = "wgmma"
        b, h, hkv, s, d = 1, 32, 8, 4096, 128
        q = torch.randn(b * s, h, d, generator=g, device="cuda", dtype=bf16)
        k, v = (torch.randn(b, hkv, s, d, generator=g, device="cuda", dtype=bf16) for _ in range(2))
        cache, tables = paged(k, v)
        cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
        lens = torch.tensor([s], dtype=torch.int32, device="cuda")
        return lambda: ops.paged_prefill_attention(q, cache, cu, lens, tables, d ** -0.5, check_indices=False)
    if name.startswith("decode"):
        os.environ["FASTINFER_DECODE_KERNEL"] = "tensor_cores"
        b, h, hkv, ctx, d = 32, 32, 8, 8192, 128
        q = torch.randn(b, h, d, generator=g, device="cuda", dtype=bf16)
        k, v = (torch.randn(b, hkv, ctx, d, generator=g, device="cuda", dtype=bf16) for _ in range(2))
        cache, tables = paged(k, v)
        del k, v
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        kv_scale = None
        if name == "decode_fp8":
            kv_scale = torch.tensor([0.05, 0.02], dtype=torch.float32, device="cuda")
            cache = (cache.float() / kv_scale.reshape(1, 2, 1, 1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        return lambda: ops.paged_decode_attention(q, cache, tables, lens, d ** -0.5, check_indices=False,
                                                  kv_scale=kv_scale)
    if name.startswith("int4"):
        from fastinfer.quant.int4 import pack, quantize_rtn
        if name == "int4_wgmma":
            os.environ["FASTINFER_INT4_KERNEL"] = "wgmma"
        m, k, n = (64, 14336, 4096) if name in ("int4_m64", "int4_wgmma") else (1, 4096, 28672)
        w = torch.randn(n, k, generator=g, device="cuda", dtype=bf16) * k ** -0.5
        p = pack(quantize_rtn(w, 128, "zeros"))
        x = torch.randn(m, k, generator=g, device="cuda", dtype=bf16)
        return lambda: ops.int4_linear(x, p.qweight, p.scales, 128, zeros=p.zeros)
    if name.startswith("fp8"):
        if name == "fp8_multicast":  # the fp8_gemm target's launch (default 128 x 128 tiles) plus multicast
            os.environ["FASTINFER_FP8_MULTICAST"] = "on"
        n = 8192
        a, sa = ops.fp8_quantize_per_tensor(torch.randn(n, n, generator=g, device="cuda", dtype=bf16))
        b_, sb = ops.fp8_quantize_per_tensor(torch.randn(n, n, generator=g, device="cuda", dtype=bf16))
        return lambda: ops.fp8_scaled_mm(a, b_, sa, sb)
    if name in ("gemv_norm", "gemv_w8a16"):
        k, n = 4096, 28672
        x = torch.randn(1, k, generator=g, device="cuda", dtype=bf16)
        sums = x.float().pow(2).reshape(1, -1, ops.SQ_SUM_GROUP).sum(-1)
        norm_w = torch.ones(k, dtype=bf16, device="cuda")
        w = torch.randn(n, k, generator=g, device="cuda", dtype=bf16) * k ** -0.5
        if name == "gemv_w8a16":
            scale = w.float().abs().amax(dim=1) / 448.0
            w8 = (w.float() / scale[:, None]).to(torch.float8_e4m3fn)
            return lambda: ops.rms_norm_dense_gemv(x, sums, norm_w, 1e-5, w8, silu_mul=True, weight_scale=scale)
        return lambda: ops.rms_norm_dense_gemv(x, sums, norm_w, 1e-5, w, silu_mul=True)
    raise SystemExit(f"ncu_targets.py: unknown target {name!r}; targets: {', '.join(KERNELS)}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in KERNELS:
        print(f"usage: python bench/ncu_targets.py {{{'|'.join(KERNELS)}}}", file=sys.stderr)
        return 1
    fastinfer = common.require_cuda_build()
    fn = target_fn(fastinfer.ops, argv[0])
    for i in range(CALLS):
        fn()
        torch.cuda.synchronize()
        print(f"{argv[0]}: call {i + 1} of {CALLS} done (kernel {KERNELS[argv[0]]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
