"""Shared helpers for the Python benchmarks (bench/bench_*.py).

Contract with bench/gpu_check.sh and bench/report.py: every benchmark script
  - accepts `--out PATH` (default: `$OUT/bench/<name>.json`, see `default_out`),
  - exits with code 2 and one clear line on stderr when it cannot run (no GPU, no CUDA kernels),
  - writes one JSON fragment (`write_fragment`) holding its own table spec, so report.py renders
    any benchmark without knowing it.

Timing (`time_cuda`): CUDA events around each call, warmup first, the L2 cache flushed before every
timed call (a 256 MB write, larger than the 50 MB L2 of an H100/H200) so that every call reads its
operands from HBM, as it does inside a model; the median of the calls is reported.
FASTINFER_BENCH_FLUSH=read flushes by reading 256 MB instead: the write leaves L2 full of dirty lines
that are written back while the timed call runs (bench/PERF_NOTES.md suspects them of the ~9 us every
small kernel pays in these tables); after the read L2 holds clean lines only. The C++ benchmarks
(bench/bench_common.cuh) read the same variable, and `finish` records the mode in the notes. The flush also
keeps the GPU busy while the host queues the timed call, so a call's launch overhead on the host
(Python validation, several torch launches) is not counted: the numbers are device time, which is
what a CUDA-graph decode step pays.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

EXIT_CANNOT_RUN = 2
L2_FLUSH_BYTES = 256 * 2**20
COPY_BYTES = 1 * 2**30  # one direction; a copy moves twice this (read + write)


# ---- can we run at all ----------------------------------------------------------------------------

def cannot_run(message: str) -> None:
    print(f"{Path(sys.argv[0]).name}: cannot run: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CANNOT_RUN)


def require_cuda_build():
    """Import fastinfer and return it; exit with EXIT_CANNOT_RUN unless a GPU and the kernels are there."""
    if not torch.cuda.is_available():
        cannot_run(f"no CUDA GPU visible to torch {torch.__version__} "
                   f"(CUDA build: {torch.version.cuda or 'no'}); run it on the GPU machine")
    try:
        import fastinfer
    except Exception as exc:  # a broken or missing build: say so, do not print a traceback
        cannot_run(f"import fastinfer failed: {type(exc).__name__}: {exc}")
    if not fastinfer.ops._C.with_cuda:
        cannot_run(f"fastinfer at {Path(fastinfer.__file__).parent} was built without CUDA kernels")
    return fastinfer


# ---- timing ---------------------------------------------------------------------------------------

FLUSH_MODES = ("write", "read")


def flush_mode() -> str:
    """FASTINFER_BENCH_FLUSH: write (default) or read; anything else is refused."""
    mode = os.environ.get("FASTINFER_BENCH_FLUSH") or "write"
    if mode not in FLUSH_MODES:
        raise SystemExit(f"FASTINFER_BENCH_FLUSH must be write or read, got {mode!r}")
    return mode


def flush_note() -> str:
    return f"L2 flushed before every timed call by a 256 MB {flush_mode()} (FASTINFER_BENCH_FLUSH)"


class L2Flusher:
    """Writes (or, mode "read", reads) a buffer larger than L2 so that the next kernel finds none of
    its operands there."""

    def __init__(self, nbytes: int = L2_FLUSH_BYTES, device: str = "cuda", mode: str | None = None):
        self.mode = mode or flush_mode()
        if self.mode not in FLUSH_MODES:
            raise ValueError(f"L2Flusher mode must be write or read, got {self.mode!r}")
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.words = self.buffer.view(torch.int64)
        self.sink = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self) -> None:
        if self.mode == "write":
            self.buffer.fill_(0)
        else:  # one reduction over every byte; writes 8 bytes
            torch.sum(self.words, dim=0, out=self.sink)


def time_cuda(fn: Callable[[], object], *, warmup: int = 5, iters: int = 30,
              flush: L2Flusher | None = None) -> dict:
    """Median / min / max device time of `fn()` in microseconds over `iters` timed calls."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        if flush is not None:
            flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times_us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return {"us": statistics.median(times_us), "min_us": min(times_us), "max_us": max(times_us),
            "iters": iters}


def with_env(fn: Callable, settings: dict[str, str]) -> Callable:
    """fn with these environment variables set for the call (the ops read their kernel-variant settings
    at every call), removed afterwards."""
    def run(*args, **kwargs):
        os.environ.update(settings)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in settings:
                os.environ.pop(key, None)
    return run


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def copy_bandwidth_gbps(nbytes: int = COPY_BYTES, iters: int = 20, flush: L2Flusher | None = None) -> dict:
    """Measured device-to-device copy bandwidth: dst.copy_(src), bytes = read nbytes + write nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, iters=iters, flush=flush)
    return {"bytes": 2 * nbytes, "us": t["us"], "gbps": gbps(2 * nbytes, t["us"])}


# ---- the frame every kernel benchmark shares --------------------------------------------------------

def parser(name: str, doc: str, iters: int = 30, warmup: int = 5):
    """argparse with --out (default $OUT/bench/<name>.json), --iters and --warmup."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=None, help=f"JSON path (default $OUT/bench/{name}.json)")
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--warmup", type=int, default=warmup)
    return p


def start():
    """(fastinfer, L2Flusher, copy bandwidth) once the GPU and the kernels are known to be there;
    prints the device and the measured copy bandwidth."""
    fastinfer = require_cuda_build()
    flush = L2Flusher()
    copy = copy_bandwidth_gbps(flush=flush)
    info = device_info()
    print(f"{info['name']} ({info['capability']}, {info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}")
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write of {copy['bytes'] // 2 // 2**20} MiB, "
          f"{copy['us']:.1f} us)")
    return fastinfer, flush, copy


def finish(out, *, name: str, title: str, columns, rows: list[dict], notes: Sequence[str], errors: list[str],
           copy: dict | None = None, extra: dict | None = None) -> int:
    """Prints the table, writes the fragment (notes, then one ERROR line per error) to `out` or
    $OUT/bench/<name>.json; exit status 1 when there were errors."""
    print(markdown_table(columns, rows))
    out = out or default_out(name)
    write_fragment(out, name=name, title=title, columns=columns, rows=rows,
                   notes=[*notes, flush_note(), *(f"ERROR {e}" for e in errors)],
                   extra={"copy": copy, "errors": errors, **(extra or {})})
    print(f"wrote {out}")
    return 1 if errors else 0


# ---- where results go -----------------------------------------------------------------------------

def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def default_out(name: str) -> Path:
    """$OUT/bench/<name>.json, or bench/results/tmp-<date>/bench/<name>.json like gpu_check.sh."""
    out = os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results" / f"tmp-{today()}")
    return Path(out) / "bench" / f"{name}.json"


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def write_fragment(path: Path, *, name: str, title: str, columns: Sequence[tuple[str, str, str]],
                   rows: list[dict], notes: Sequence[str] = (), extra: dict | None = None) -> None:
    """One benchmark's results. columns: (row key, header, format spec such as '.2f' or '')."""
    fragment = {"name": name, "title": title, "device": device_info(), "notes": list(notes),
                "columns": [list(c) for c in columns], "rows": rows, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fragment, indent=1) + "\n")


# ---- tables ---------------------------------------------------------------------------------------

def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown_table(columns: Sequence[Sequence[str]], rows: list[dict]) -> str:
    """A markdown table; numeric columns right-aligned. columns: (key, header, format spec)."""
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    numeric = [any(isinstance(r.get(c[0]), (int, float)) for r in rows) for c in columns]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(_cell(r.get(c[0]), c[2]) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
