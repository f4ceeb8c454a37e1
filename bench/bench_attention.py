"""Paged attention (fastinfer.ops) against torch SDPA (flash and cuDNN backends), prefill and decode.

    python bench/bench_attention.py [--out PATH] [--iters N] [--warmup N]

Prefill: bf16, causal, D128, B4 S4096 with 32 query heads over 8 KV heads (GQA) and over 32 (MHA),
plus B1 S1024. fastinfer reads a paged cache (block 16, contiguous block table) holding the same K/V
that SDPA gets as [B, H_kv, S, D] tensors. SDPA runs GQA with enable_gqa=True where the backend
accepts it, else with K/V expanded to all query heads (the "K/V" column says which; expanded K/V is
what a model would have to materialise). FLOPs: 2*2*B*H*S*S*D/2 (causal). "fastinfer speedup" = this
row's time / fastinfer's time on the same shape. fastinfer runs its default (128 query rows per CTA
for these shapes), as a second row 64-row tiles (FASTINFER_PREFILL_BLOCK_M=64) and, as a third, the
sm_90a wgmma kernel (FASTINFER_PREFILL_KERNEL=wgmma; on other GPUs that setting runs the default
kernel, and the row says so); the mma and wgmma kernels also run with FASTINFER_ATTN_TABLE=per_copy
(", per-copy table reads": a block-table read before every 16-byte copy, the loads before 2026-11-28),
and the wgmma kernel once more with FASTINFER_ATTN_KV_LOAD=tma (", TMA K/V": whole key tiles as TMA boxes).
Decode: one query token per sequence, 32 / 8 heads, D128: B64 ctx 4096 and B8 ctx 8192. SDPA flash
gets a [B, H, 1, D] query and contiguous [B, H_kv, ctx, D] K/V. fastinfer runs its default
tensor-core decode kernel, as a second row the CUDA-core one (FASTINFER_DECODE_KERNEL=cuda_cores) and, as a
third, the tensor-core kernel merging its splits itself (semaphores, as in the decode graphs; no merge
kernel), and the tensor-core kernel with per-copy table reads. Bytes = K and V of the context (the
unexpanded KV heads, whatever an implementation reads), as TB/s and as a fraction of the
device-to-device copy bandwidth measured in the same run.
A backend that fails on a shape is reported as "n/a (error)" and listed in the notes.
Timing and L2 flushing: see bench/common.py.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common

DTYPE = torch.bfloat16
BLOCK = 16
PER_COPY = ", per-copy table reads"  # FASTINFER_ATTN_TABLE=per_copy: the block-table loads before 2026-11-28
TMA_KV = ", TMA K/V"  # FASTINFER_ATTN_KV_LOAD=tma: the sm_90a prefill's K / V tiles by TMA (not a default yet)
OURS = "fastinfer paged"  # prefill: the mma kernel (FASTINFER_PREFILL_KERNEL=mma); decode: the default
OURS_CUDA_CORES = "fastinfer paged, CUDA-core decode"  # FASTINFER_DECODE_KERNEL=cuda_cores, for comparison
OURS_FUSED_MERGE = "fastinfer paged, split merge in-kernel"  # semaphores given, as the decode graphs do
OURS_64_ROWS = "fastinfer paged, 64-row tiles"  # FASTINFER_PREFILL_BLOCK_M=64 (the default here is 128)
OURS_WGMMA = "fastinfer paged, wgmma (sm_90a)"  # FASTINFER_PREFILL_KERNEL=wgmma
SDPA = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION}
PREFILL = [(4, 32, 8, 4096, 128), (4, 32, 32, 4096, 128), (1, 32, 8, 1024, 128)]  # B, H, H_kv, S, D
DECODE = [(64, 32, 8, 4096, 128), (8, 32, 8, 8192, 128)]  # B, H, H_kv, ctx, D
NA = "n/a (error)"


def paged_cache(k: torch.Tensor, v: torch.Tensor, block: int = BLOCK):
    """[B, H_kv, S, D] K and V -> (kv_cache [B * S / block, 2, block, H_kv, D], block_tables [B, S / block])
    with sequence b in blocks b * S / block onwards (a contiguous block table)."""
    b, hkv, s, d = k.shape
    blocks = -(-s // block)
    pad = blocks * block - s
    kv = torch.stack([k, v], dim=1).transpose(2, 3)  # [B, 2, S, H_kv, D]
    kv = F.pad(kv, (0, 0, 0, 0, 0, pad)).reshape(b, 2, blocks, block, hkv, d)
    cache = kv.permute(0, 2, 1, 3, 4, 5).reshape(b * blocks, 2, block, hkv, d).contiguous()
    tables = torch.arange(b * blocks, dtype=torch.int32, device=k.device).reshape(b, blocks)
    return cache, tables


def sdpa_call(backend, q, k, v, causal: bool):
    """A callable running SDPA on one backend, and how it got K/V: GQA natively if it can, else expanded."""
    group = q.shape[1] // k.shape[1]

    def run(kk, vv, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)

    if group == 1:
        run(k, v, False)
        return (lambda: run(k, v, False)), "same heads"
    try:
        run(k, v, True)
        return (lambda: run(k, v, True)), "enable_gqa"
    except RuntimeError:
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        run(ke, ve, False)
        return (lambda: run(ke, ve, False)), "expanded"


def measure(impls: dict, reference_name: str, args, flush, errors: list, label: str) -> dict:
    """impl name -> (time dict, K/V mode, output) or (None, NA, error); the first call is checked for errors."""
    results = {}
    for name, make in impls.items():
        try:
            fn, mode = make()
            out = fn()
            t = common.time_cuda(fn, warmup=args.warmup, iters=args.iters, flush=flush)
            results[name] = (t, mode, out)
        except Exception as exc:  # a backend that does not take this shape: report it, keep going
            errors.append(f"{label} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            print(f"ERROR {errors[-1]}")
            results[name] = (None, NA, None)
    ref = results.get(reference_name, (None, None, None))[2]
    for name, (t, mode, out) in results.items():
        diff = None
        if ref is not None and out is not None and name != reference_name:
            diff = float((out.float().reshape(ref.shape) - ref.float()).abs().max())
        results[name] = (t, mode, diff)
    return results


def prefill_rows(ops, args, flush, errors: list) -> list[dict]:
    rows = []
    for b, h, hkv, s, d in PREFILL:
        gen = torch.Generator(device="cuda").manual_seed(s + h + hkv)
        q, k, v = (torch.randn(b, n, s, d, generator=gen, device="cuda", dtype=DTYPE) for n in (h, hkv, hkv))
        cache, tables = paged_cache(k, v)
        q_tok = q.transpose(1, 2).reshape(b * s, h, d).contiguous()  # [tokens, H, D]
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
        lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q_tok)
        scale = d ** -0.5
        ops.paged_prefill_attention(q_tok, cache, cu, lens, tables, scale, out=out)  # validates the indices once

        def ours(block_m, kernel="mma", table="shuffle", kv_load="cp_async"):
            def make():  # the op reads these settings at each call; measure() times one impl at a time
                os.environ["FASTINFER_PREFILL_BLOCK_M"] = block_m
                os.environ["FASTINFER_PREFILL_KERNEL"] = kernel
                os.environ["FASTINFER_ATTN_TABLE"] = table
                os.environ["FASTINFER_ATTN_KV_LOAD"] = kv_load
                out_m = torch.empty_like(q_tok)
                return (lambda: ops.paged_prefill_attention(q_tok, cache, cu, lens, tables, scale, out=out_m,
                                                            check_indices=False).reshape(b, s, h, d).transpose(1, 2)), "paged"
            return make

        wgmma_name = OURS_WGMMA if torch.cuda.get_device_capability() == (9, 0) else OURS_WGMMA + " = default here"
        # every kernel named (auto is wgmma at head_dim 128 on Hopper): OURS is the mma kernel
        impls = {OURS: ours("auto", "mma"), OURS_64_ROWS: ours("64"), wgmma_name: ours("auto", "wgmma"),
                 wgmma_name + PER_COPY: ours("auto", "wgmma", "per_copy"), OURS + PER_COPY: ours("auto", "mma", "per_copy"),
                 wgmma_name + TMA_KV: ours("auto", "wgmma", "shuffle", "tma"),
                 **{n: (lambda be=be: sdpa_call(be, q, k, v, True)) for n, be in SDPA.items()}}
        label = f"B{b} H{h}/{hkv} S{s} D{d}"
        flops = 2 * 2 * b * h * s * s * d / 2
        results = measure(impls, OURS, args, flush, errors, f"prefill {label}")
        base = results[OURS][0]
        for name, (t, mode, diff) in results.items():
            rows.append({"kind": "prefill", "shape": label, "impl": name, "kv": mode,
                         "us": t["us"] if t else NA, "tflops": flops / (t["us"] * 1e-6) / 1e12 if t else None,
                         "speedup": t["us"] / base["us"] if t and base else None, "max_diff": diff})
        del q, k, v, cache, q_tok, out
        torch.cuda.empty_cache()
    for key in ("FASTINFER_PREFILL_BLOCK_M", "FASTINFER_PREFILL_KERNEL", "FASTINFER_ATTN_TABLE", "FASTINFER_ATTN_KV_LOAD"):
        os.environ.pop(key, None)
    return rows


def decode_rows(ops, args, flush, copy_gbps: float, errors: list) -> list[dict]:
    rows = []
    for b, h, hkv, ctx, d in DECODE:
        gen = torch.Generator(device="cuda").manual_seed(ctx + b)
        q = torch.randn(b, h, 1, d, generator=gen, device="cuda", dtype=DTYPE)
        k, v = (torch.randn(b, hkv, ctx, d, generator=gen, device="cuda", dtype=DTYPE) for _ in range(2))
        cache, tables = paged_cache(k, v)
        q3 = q.reshape(b, h, d)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        scale = d ** -0.5
        ops.paged_decode_attention(q3, cache, tables, lens, scale)  # validates the indices once

        def ours(kernel, fused_merge=False, table="shuffle"):
            def make():  # the op reads FASTINFER_DECODE_KERNEL at each call; measure() times one impl at a time
                os.environ["FASTINFER_DECODE_KERNEL"] = kernel
                os.environ["FASTINFER_ATTN_TABLE"] = table
                os.environ["FASTINFER_DECODE_MERGE"] = "auto"  # with semaphores: the in-kernel merge
                out = torch.empty_like(q3)
                sem = torch.zeros(b * h, dtype=torch.int32, device="cuda") if fused_merge else None
                return (lambda: ops.paged_decode_attention(q3, cache, tables, lens, scale, out=out, check_indices=False,
                                                           semaphores=sem).reshape(b, h, 1, d)), "paged"
            return make

        impls = {OURS: ours("tensor_cores"), OURS_CUDA_CORES: ours("cuda_cores"),
                 OURS_FUSED_MERGE: ours("tensor_cores", fused_merge=True), OURS + PER_COPY: ours("tensor_cores", table="per_copy"),
                 "SDPA flash": lambda: sdpa_call(SDPA["SDPA flash"], q, k, v, False)}
        label = f"B{b} H{h}/{hkv} ctx{ctx} D{d}"
        nbytes = 2 * 2 * b * hkv * ctx * d
        results = measure(impls, OURS, args, flush, errors, f"decode {label}")
        base = results[OURS][0]
        for name, (t, mode, diff) in results.items():
            tbps = common.gbps(nbytes, t["us"]) / 1e3 if t else None
            rows.append({"kind": "decode", "shape": label, "impl": name, "kv": mode, "us": t["us"] if t else NA,
                         "tbps": tbps, "frac_copy": tbps * 1e3 / copy_gbps if t else None,
                         "speedup": t["us"] / base["us"] if t and base else None, "max_diff": diff})
        del q, k, v, cache
        torch.cuda.empty_cache()
    for key in ("FASTINFER_DECODE_KERNEL", "FASTINFER_DECODE_MERGE", "FASTINFER_ATTN_TABLE"):
        os.environ.pop(key, None)
    return rows


COLUMNS = [("kind", "phase", ""), ("shape", "shape", ""), ("impl", "impl", ""), ("kv", "K/V", ""),
           ("us", "time (us)", ".1f"), ("tflops", "TFLOP/s", ".1f"), ("tbps", "TB/s", ".2f"),
           ("frac_copy", "of copy BW", ".1%"), ("speedup", "fastinfer speedup", ".2f"),
           ("max_diff", "max |diff| vs fastinfer", ".1e")]


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("attention", __doc__, iters=20, warmup=3)
    args = parser.parse_args(argv)
    fastinfer, flush, copy = common.start()

    errors: list[str] = []
    rows = prefill_rows(fastinfer.ops, args, flush, errors)
    rows += decode_rows(fastinfer.ops, args, flush, copy["gbps"], errors)
    notes = [f"device-to-device copy {copy['gbps']:.0f} GB/s (read + write); bf16; fastinfer block {BLOCK}, "
             f"contiguous block table; prefill causal, FLOPs 2*2*B*H*S*S*D/2; decode bytes = K + V of the "
             f"context; L2 flushed before each of {args.iters} calls",
             "K/V: enable_gqa = SDPA's native GQA; expanded = K/V repeated to all query heads; "
             "max |diff| = largest elementwise difference from fastinfer's output"]
    common.finish(args.out, name="attention", title="Paged attention vs torch SDPA (flash, cuDNN)",
                  columns=COLUMNS, rows=rows, notes=notes, errors=errors, copy=copy)
    return 1 if any(e.split(": ")[0].endswith(OURS) for e in errors) else 0  # a peer's failure is reported only


if __name__ == "__main__":
    raise SystemExit(main())
