"""`python -m fastinfer env`: what this installation is and what it can run."""
from __future__ import annotations

import platform
import sys

import torch

from . import _C, _ops


# Environment variables that pick between kernel variants (read at each call unless noted), so that
# one process can compare them and a report can say which ran: name -> (default, choices, what it does).
SETTINGS = {
    "FASTINFER_DECODE_KERNEL": ("auto", "auto | tensor_cores | cuda_cores",
                                "paged decode attention for bf16 / fp16 queries (auto = tensor cores)"),
    "FASTINFER_DECODE_CTAS_PER_SM": ("auto", "auto | 2 | 3 | 4 | 6 | 8 | 12",
                                     "paged decode attention: split the context until about this many CTAs per SM "
                                     "exist (auto: the kernel's own, 3 CUDA cores / 6 tensor cores)"),
    "FASTINFER_PREFILL_BLOCK_M": ("auto", "auto | 64 | 128",
                                  "query rows per CTA of the prefill kernel (auto = 128 when sequences "
                                  "average >= 128 rows)"),
    "FASTINFER_PREFILL_KERNEL": ("auto", "auto | mma | wgmma",
                                 "prefill attention kernel for bf16 / fp16 over a plain cache (auto = wgmma at "
                                 "head_dim 128 on Hopper, else mma; wgmma = the sm_90a kernel, Hopper only)"),
    "FASTINFER_ATTN_TABLE": ("shuffle", "shuffle | per_copy",
                             "K / V block-table reads of the prefill and tensor-core decode kernels: once per key tile "
                             "and warp, handed to the copies by shuffles (shuffle; block sizes >= 4), or one global "
                             "read before every 16-byte copy (per_copy, the loads before 2026-11-28)"),
    "FASTINFER_ATTN_KV_LOAD": ("cp_async", "cp_async | tma",
                               "K / V loads of the sm_90a prefill kernel: 16-byte cp.async by its producer warpgroup "
                               "(cp_async), or TMA boxes of a block's rows issued by one thread (tma; block sizes >= 8; "
                               "a sequence's last key tile still by cp.async; off until measured)"),
    "FASTINFER_ARGMAX": ("kernel", "kernel | torch",
                         "the sampler's argmax over fp32 logits on a GPU: fastinfer's argmax_rows (kernel; one CTA per "
                         "row, written 2026-11-28) or torch.argmax (torch, the earlier pick); same indices"),
    "FASTINFER_FP8_GEMM_TILE": ("128x128", "128x128 | 128x256",
                                "FP8 GEMM output tiles for M > 64"),
    "FASTINFER_FP8_SPLIT_K": ("auto", "auto | off | on",
                              "FP8 GEMM split-K (cluster reduction) when output tiles cannot fill the SMs (auto: "
                              "only M <= 16 with K >= 8192, measured faster there; off: never; on: always)"),
    "FASTINFER_FP8_PROMOTE": ("serial", "serial | overlap | pingpong",
                              "FP8 GEMM: promote a k-tile's wgmma sums after waiting for them (serial), or (128-column "
                              "tiles) issue the next k-tile into a second accumulator set first (overlap), or keep the "
                              "two consumer warpgroups' issues in alternation so one promotes while the other's run "
                              "(pingpong; any tile); same results"),
    "FASTINFER_FP8_MULTICAST": ("off", "off | on",
                                "FP8 GEMM for M > 64: 2-CTA clusters on vertically adjacent tiles sharing each weight "
                                "tile by TMA multicast (half the weight bytes from L2 per CTA; same bits; off until "
                                "measured on a GPU). Applies without split K, with an even number of 128-row tiles "
                                "and no weight-tile half wholly past N; other calls run the plain launch"),
    "FASTINFER_FP8_GEMV": ("off", "off | on",
                           "FP8 GEMM for M <= 16 on the mma.sync decode GEMV (gemm/fp8_gemv.cuh) instead of wgmma "
                           "(off until measured on a GPU)"),
    "FASTINFER_INT4_KERNEL": ("auto", "auto | tiles | small | small_deferred | small_streamk | wgmma | auto_wgmma",
                              "int4_linear's CUDA kernel (auto: the GEMV kernel with deferred scales for <= 8 "
                              "rows of x, the tile kernel above; tiles / small: that kernel at every M; "
                              "small_deferred: the GEMV kernel applying the group scales to fp32 sums of x times "
                              "the raw codes; small_streamk: the same GEMV on a persistent grid with equal "
                              "stream-K ranges of chunks for <= 8 rows, small_deferred above; wgmma: the sm_90a warpgroup-MMA "
                              "kernel at every M, off until measured; auto_wgmma: auto up to 8 rows, wgmma above)"),
    "FASTINFER_INT4_SPLITS": ("overhead", "overhead | rounds",
                              "split-K cost of int4_linear's kernels: fewest waves x (rounds per CTA + one for its "
                              "start and reduction) (overhead), or without that round (rounds, the GEMV kernel's "
                              "earlier rule); a round is 8 chunks (GEMV kernel) or one 64-deep stage (tile kernel)"),
    "FASTINFER_INT4_WAVES": ("clusters", "clusters | slots",
                             "split-K waves of int4_linear priced in resident thread-block clusters of each split "
                             "size (clusters), or in CTA slots alone (slots, the rule before; uneven GPCs hold "
                             "fewer clusters than slots / splits)"),
    "FASTINFER_PDL": ("0", "0 | 1", "programmatic dependent launch of the decode-path kernels"),
    "FASTINFER_DECODE_MERGE": ("auto", "auto | kernel", "split-KV decode attention given semaphores (the decode "
                               "graphs) merges in its last CTA per group (kernel: a separate merge kernel)"),
    "FASTINFER_DENSE_GEMV": ("1", "1 | 0", "decode projections on dense_gemv (0: cuBLAS); read at import"),
    "FASTINFER_FP8_FUSED_QUANT": ("1", "1 | 0",
                                  "FP8 layers: the RMSNorms and the SwiGLU emit the next GEMM's per-token FP8 input "
                                  "in the same kernel (rms_norm_quant_fp8, silu_and_mul_quant_fp8; same bits); 0: "
                                  "the 16-bit op, then fp8_quantize_per_token (read at each forward)"),
    "FASTINFER_FP8_DECODE": ("w8a8", "w8a8 | w8a16",
                             "decode steps (<= 8 tokens, FASTINFER_FUSED_NORM=1, K % 16 == 0) of FP8 layers: x quantized "
                             "per token for the FP8 GEMM (w8a8), or the fused decode GEMVs reading the e4m3 weights "
                             "with 16-bit x (w8a16: "
                             "3 kernels a layer, no activation quantization; gemv.cuh 'FP8 weights'); read at each "
                             "forward; off until measured on a GPU"),
    "FASTINFER_GEMV_PREFETCH_MB": ("0", "0 | MB (e.g. 4, 8, 16)",
                                   "on the fused decode path (<= 8 tokens, dense 16-bit weights) each GEMV asks L2 "
                                   "for about this many MB of the next GEMV's weight as it finishes, twice that "
                                   "across attention (gemv.cuh, 'L2 prefetch across kernels'); read at each forward; "
                                   "same results; 0 (off) until measured on a GPU"),
    "FASTINFER_GEMV_NORM_PRELOAD": ("off", "off | on",
                                    "the RMSNorm-prologue GEMVs load their first weight chunk before the prologue "
                                    "(on) instead of an L2 prefetch; same results, off until measured"),
    "FASTINFER_FUSED_NORM": ("1", "1 | 0", "steps of <= 16 tokens add the residual and apply RMSNorm inside the "
                             "dense GEMVs (0: separate fused_add_rms_norm kernels, and no FASTINFER_FUSED_ROPE)"),
    "FASTINFER_FUSED_ROPE": ("1", "1 | 0", "with FASTINFER_FUSED_NORM, the q/k/v GEMV also applies rotary and writes "
                             "K / V to a 16-bit cache (0: rotary_embedding_and_cache kernel)"),
}


def settings() -> dict:
    """SETTINGS with the value each variable has in this process."""
    import os
    return {name: {"value": os.environ.get(name) or default, "set": name in os.environ, "choices": choices,
                   "meaning": meaning} for name, (default, choices, meaning) in SETTINGS.items()}


def has_kernel(op: str, key: str) -> bool:
    """Whether fastinfer::op has an implementation for dispatch key "CPU" or "CUDA" in this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastinfer::{op}", key)


def env_info() -> dict:
    from . import __version__
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    return {
        "fastinfer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels_built": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "gpu": gpu,
        "ops": {op: [k for k in ("CPU", "CUDA") if has_kernel(op, k)] for op in _ops.OP_NAMES},
        "settings": settings(),
    }


def env() -> str:
    """A human-readable report of versions, build and ops (also printed by `python -m fastinfer env`)."""
    info = env_info()
    gpu = info["gpu"]
    lines = [
        f"fastinfer          {info['fastinfer']}",
        f"python             {info['python']} ({sys.executable})",
        f"torch              {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"CUDA kernels built {'yes, for ' + ', '.join('sm_' + a for a in info['cuda_archs']) if info['cuda_kernels_built'] else 'no (CPU ops only)'}",
        f"GPU                {gpu['name'] + ' (' + gpu['capability'] + ', ' + str(gpu['sms']) + ' SMs, ' + str(gpu['memory_gib']) + ' GiB)' if gpu else 'none'}",
        "ops:",
    ]
    width = max(map(len, info["ops"]))
    lines += [f"  {op:<{width}}  {' + '.join(impls) or 'NO IMPLEMENTATION'}" for op, impls in info["ops"].items()]
    lines.append("kernel settings (environment):")
    width = max(map(len, info["settings"]))
    for name, s in info["settings"].items():
        value = f"{s['value']}{'' if s['set'] else ' (default)'}"
        lines.append(f"  {name:<{width}}  {value:<18} {s['choices']}: {s['meaning']}")
    return "\n".join(lines)
