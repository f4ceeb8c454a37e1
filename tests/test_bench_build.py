"""The C++ microbenchmarks (CMake option FASTINFER_BUILD_BENCH) compile and link against the kernel
objects without torch: built in the editable install's build directory (whose kernel objects are
already compiled, so only bench/*.cu are), whose option is then set back to what it was.
On a machine without a GPU the binaries start and refuse cleanly (exit 2, "cannot run")."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinfer import _C

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "editable"


def cmake() -> str:
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else (shutil.which("cmake") or pytest.skip("no cmake"))


def test_cpp_benchmarks_build_and_start():
    if not (BUILD / "CMakeCache.txt").exists():
        pytest.skip("no editable build directory (build/editable)")
    if not _C.cuda_archs:
        pytest.skip("the CUDA kernels are not built")
    before = "ON" if "FASTINFER_BUILD_BENCH:BOOL=ON" in (BUILD / "CMakeCache.txt").read_text() else "OFF"

    def run(*args, timeout):
        done = subprocess.run([cmake(), *args], capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    try:
        run("-S", str(ROOT), "-B", str(BUILD), "-DFASTINFER_BUILD_BENCH=ON", timeout=300)
        run("--build", str(BUILD), "--target", "bench_prefill", "bench_decode", "bench_stream", timeout=1200)
    finally:  # the developer's setting back (CI's is OFF)
        subprocess.run([cmake(), "-S", str(ROOT), "-B", str(BUILD), f"-DFASTINFER_BUILD_BENCH={before}"],
                       capture_output=True, timeout=300)
    for name in ("bench_prefill", "bench_decode", "bench_stream"):
        binary = BUILD / name
        assert binary.exists(), name
        if torch.cuda.is_available():
            continue  # it would run the whole benchmark; bench/gpu_check.sh does that
        run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "cannot run" in run.stderr + run.stdout, (name, run.returncode, run.stderr)
