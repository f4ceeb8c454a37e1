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


def test_common_frame(tmp_path, monkeypatch, capsys):
    """common.parser / common.finish as the kernel benchmarks use them (the GPU-only parts faked)."""
    sys.path.insert(0, str(BENCH))
    import common
    monkeypatch.setattr(common, "device_info", lambda: {"name": "fake", "capability": "sm_90", "sms": 132})
    args = common.parser("demo", "Demo benchmark.\n\nmore", iters=7, warmup=2).parse_args([])
    assert (args.out, args.iters, args.warmup) == (None, 7, 2)
    monkeypatch.setenv("OUT", str(tmp_path))
    columns = [("impl", "impl", ""), ("us", "time (us)", ".1f")]
    rc = common.finish(None, name="demo", title="Demo", columns=columns, rows=[{"impl": "a", "us": 1.25}],
                       notes=["a note"], errors=["a: boom"], copy={"gbps": 4000.0})
    assert rc == 1
    import json
    frag = json.loads((tmp_path / "bench" / "demo.json").read_text())
    assert frag["notes"] == ["a note", "ERROR a: boom"] and frag["errors"] == ["a: boom"]
    assert frag["copy"] == {"gbps": 4000.0} and frag["device"]["name"] == "fake"
    assert "| a | 1.2 |" in capsys.readouterr().out  # the table is printed
    assert common.finish(str(tmp_path / "x.json"), name="demo", title="Demo", columns=columns, rows=[],
                         notes=[], errors=[]) == 0
