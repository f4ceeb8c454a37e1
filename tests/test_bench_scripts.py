"""Every bench/bench_*.py imports, parses its arguments and, on a machine without a GPU, exits with
code 2 and one line saying why (bench/common.py's contract with gpu_check.sh and report.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_exits_2_without_a_gpu(script, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / script)], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot run" in proc.stderr
    assert not list(tmp_path.rglob("*.json"))  # no half-written fragment
