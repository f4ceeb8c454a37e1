"""Same-run A/B of kernel settings, from one GPU check's benchmark fragments.

Kernel changes written without a GPU land either as a new default with the earlier form one setting
away, or as a candidate behind a setting (bench/PERF_NOTES.md). Their benchmarks time both forms in
the same run as separate rows; this table puts each pair side by side so that the decision the next
session makes with a few minutes of device time (keep the default, revert it, flip a switch) reads
off one line per setting: the variant's speed over the baseline's on every shape, worst / median /
best, and how many shapes it won. Nothing here is typed in by hand: a pair missing from the run is
listed as not measured.
"""
from __future__ import annotations

import statistics

# (benchmark, rows' group keys, baseline impl, variant impl, metric, higher is better, what the pair decides)
# "new default" pairs: the variant is the default, the baseline its earlier form (revert if it loses);
# "switch" pairs: the baseline is the default, the variant a candidate (flip if it wins).
PAIRS = [
    ("attention", ("kind", "shape"), "fastinfer paged, wgmma (sm_90a), per-copy table reads",
     "fastinfer paged, wgmma (sm_90a)", "us", False, "new default: shuffled block-table reads, wgmma prefill"),
    ("attention", ("kind", "shape"), "fastinfer paged, per-copy table reads", "fastinfer paged", "us", False,
     "new default: shuffled block-table reads, mma prefill / tensor-core decode"),
    ("attention", ("kind", "shape"), "fastinfer paged, wgmma (sm_90a)", "fastinfer paged, wgmma (sm_90a), TMA K/V", "us",
     False, "switch FASTINFER_ATTN_KV_LOAD=tma (wgmma prefill)"),
    ("int4", ("shape", "m"), "fastinfer int4_linear [slot waves]", "fastinfer int4_linear", "us", False,
     "new default: INT4 split-K waves priced in resident clusters"),
    ("int4", ("shape", "m"), "fastinfer int4_linear", "fastinfer int4_linear [small_streamk]", "us", False,
     "switch FASTINFER_INT4_KERNEL=small_streamk (M <= 8)"),
    ("int4", ("shape", "m"), "fastinfer int4_linear", "fastinfer int4_linear [wgmma]", "us", False,
     "switch FASTINFER_INT4_KERNEL=wgmma (every M; a default candidate above 8 rows)"),
    ("fp8", ("shape", "M"), "fastinfer tensor", "fastinfer tensor overlap", "us", False,
     "switch FASTINFER_FP8_PROMOTE=overlap"),
    ("fp8", ("shape", "M"), "fastinfer tensor", "fastinfer tensor multicast", "us", False,
     "switch FASTINFER_FP8_MULTICAST=on (128 x 128, per-tensor)"),
    ("fp8", ("shape", "M"), "fastinfer tensor 128x256", "fastinfer tensor 128x256 multicast", "us", False,
     "switch FASTINFER_FP8_MULTICAST=on (128 x 256, per-tensor)"),
    ("fp8", ("shape", "M"), "fastinfer rowwise 128x256", "fastinfer rowwise 128x256 multicast", "us", False,
     "switch FASTINFER_FP8_MULTICAST=on (128 x 256, row-wise)"),
    ("fp8", ("shape", "M"), "fastinfer tensor", "fastinfer tensor pingpong", "us", False,
     "switch FASTINFER_FP8_PROMOTE=pingpong (128 x 128 and swapped tiles)"),
    ("fp8", ("shape", "M"), "fastinfer tensor 128x256", "fastinfer tensor 128x256 pingpong", "us", False,
     "switch FASTINFER_FP8_PROMOTE=pingpong (128 x 256)"),
    ("fp8", ("shape", "M"), "fastinfer tensor", "fastinfer tensor gemv", "us", False,
     "switch FASTINFER_FP8_GEMV=on (per-tensor)"),
    ("fp8", ("shape", "M"), "fastinfer rowwise", "fastinfer rowwise gemv", "us", False,
     "switch FASTINFER_FP8_GEMV=on (row-wise)"),
    ("gemv", ("shape", "m"), "fastinfer rms_norm_dense_gemv", "fastinfer rms_norm_dense_gemv, preload", "us", False,
     "switch FASTINFER_GEMV_NORM_PRELOAD=on (qkv)"),
    ("gemv", ("shape", "m"), "fastinfer rms_norm_dense_gemv (SwiGLU)", "fastinfer rms_norm_dense_gemv (SwiGLU), preload",
     "us", False, "switch FASTINFER_GEMV_NORM_PRELOAD=on (gate_up)"),
    ("e2e", ("batch",), "fastinfer bf16", "fastinfer bf16 + norm preload", "tok_s", True,
     "switch FASTINFER_GEMV_NORM_PRELOAD=on, end to end"),
    ("e2e", ("batch",), "fastinfer int4", "fastinfer int4 stream-K", "tok_s", True,
     "switch FASTINFER_INT4_KERNEL=small_streamk, end to end"),
    ("e2e", ("batch",), "fastinfer int4", "fastinfer int4 wgmma", "tok_s", True,
     "switch FASTINFER_INT4_KERNEL=auto_wgmma (wgmma above 8 rows), end to end"),
    ("e2e", ("batch",), "fastinfer fp8", "fastinfer fp8 GEMV", "tok_s", True, "switch FASTINFER_FP8_GEMV=on, end to end"),
    ("e2e", ("batch",), "fastinfer fp8", "fastinfer fp8 W8A16 decode", "tok_s", True,
     "switch FASTINFER_FP8_DECODE=w8a16 (fused W8A16 GEMVs for <= 8-token steps), end to end"),
    ("gemv", ("shape", "m"), "fastinfer fp8_linear (W8A8)", "fastinfer dense_gemv W8A16", "us", False,
     "switch FASTINFER_FP8_DECODE=w8a16: one projection, W8A16 GEMV vs quantize + FP8 GEMM"),
    ("layers", ("op", "tokens"), "fastinfer two ops", "fastinfer", "us", False,
     "new default: an FP8 layer's norms / SwiGLU emit its GEMM inputs in one kernel (FASTINFER_FP8_FUSED_QUANT)"),
    ("e2e", ("batch",), "fastinfer fp8 unfused quant", "fastinfer fp8", "tok_s", True,
     "new default: FASTINFER_FP8_FUSED_QUANT=1, end to end"),
    ("stream_cpp", ("shape",), "dense_gemv chain", "dense_gemv chain, L2 prefetch 8 MB", "us", False,
     "switch FASTINFER_GEMV_PREFETCH_MB=8 (16 GEMVs back to back, C++)"),
    ("stream_cpp", ("shape",), "dense_gemv chain", "dense_gemv chain, L2 prefetch 16 MB", "us", False,
     "switch FASTINFER_GEMV_PREFETCH_MB=16 (16 GEMVs back to back, C++)"),
    ("e2e", ("batch",), "fastinfer bf16", "fastinfer bf16 + L2 prefetch 8 MB", "tok_s", True,
     "switch FASTINFER_GEMV_PREFETCH_MB=8, end to end (batches <= 8 take the fused path)"),
    ("e2e", ("batch",), "fastinfer bf16", "fastinfer bf16 + L2 prefetch 16 MB", "tok_s", True,
     "switch FASTINFER_GEMV_PREFETCH_MB=16, end to end"),
    ("e2e", ("batch",), "fastinfer bf16 + torch argmax", "fastinfer bf16", "tok_s", True,
     "new default: argmax_rows for the sampler's pick (FASTINFER_ARGMAX), end to end"),
]

COLUMNS = [("what", "setting", ""), ("benchmark", "benchmark", ""), ("shapes", "shapes", "d"),
           ("worst", "worst", ".3f"), ("median", "median", ".3f"), ("best", "best", ".3f"), ("wins", "variant wins", ""),
           ("worst_at", "worst at", ""), ("reading", "first reading", "")]

# A first reading of a pair, for the session that decides (not a decision: a median within ~2% is
# run-to-run noise, and a setting may be worth a per-shape rule where it wins only on some shapes).
NOISE = 0.02


def reading(what: str, worst: float, median: float) -> str:
    if what.startswith("new default"):  # the variant is the default now, the baseline its earlier form
        if median < 1 - NOISE:
            return "revert"
        return "keep" if worst >= 1 - 2 * NOISE else "keep; check its worst shape"
    if median >= 1 + NOISE:  # a candidate switch
        return "flip on" if worst >= 1 - NOISE else "flip on where it wins (per-shape rule)"
    if median <= 1.0:
        return "leave off" if worst < 1 + NOISE else "leave off (noise)"
    return "noise: leave off" if worst < 1 + NOISE else "flip on (small gain everywhere)"


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else None


def compare(benchmarks: dict) -> list[dict]:
    """One row per pair: variant speed / baseline speed (> 1: the variant is faster) over the shapes
    both rows were measured on."""
    out = []
    for bench, keys, base, variant, metric, higher, what in PAIRS:
        rows = [r for r in (benchmarks.get(bench) or {}).get("rows", []) if isinstance(r, dict)]
        by_group: dict[tuple, dict] = {}
        for r in rows:
            if r.get("impl") in (base, variant) and _num(r.get(metric)) is not None:
                by_group.setdefault(tuple(r.get(k) for k in keys), {})[r["impl"]] = r[metric]
        ratios = []
        for group, vals in by_group.items():
            if base in vals and variant in vals:
                speed = vals[variant] / vals[base] if higher else vals[base] / vals[variant]
                ratios.append((speed, group))
        row = {"what": what, "benchmark": bench, "shapes": len(ratios)}
        if ratios:
            speeds = [s for s, _ in ratios]
            worst = min(ratios)
            row.update(worst=worst[0], median=statistics.median(speeds), best=max(speeds),
                       wins=f"{sum(s > 1.0 for s in speeds)} of {len(speeds)}",
                       worst_at=", ".join(f"{k} {v}" for k, v in zip(keys, worst[1])))
            row["reading"] = reading(what, row["worst"], row["median"])
        else:
            row.update(wins="not measured", reading="-")
        out.append(row)
    return out
