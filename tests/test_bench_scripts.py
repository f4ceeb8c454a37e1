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
    monkeypatch.delenv("FASTINFER_BENCH_FLUSH", raising=False)
    args = common.parser("demo", "Demo benchmark.\n\nmore", iters=7, warmup=2).parse_args([])
    assert (args.out, args.iters, args.warmup) == (None, 7, 2)
    monkeypatch.setenv("OUT", str(tmp_path))
    columns = [("impl", "impl", ""), ("us", "time (us)", ".1f")]
    rc = common.finish(None, name="demo", title="Demo", columns=columns, rows=[{"impl": "a", "us": 1.25}],
                       notes=["a note"], errors=["a: boom"], copy={"gbps": 4000.0})
    assert rc == 1
    import json
    frag = json.loads((tmp_path / "bench" / "demo.json").read_text())
    assert frag["notes"] == ["a note", common.flush_note(), "ERROR a: boom"] and frag["errors"] == ["a: boom"]
    assert "256 MB write" in common.flush_note()
    assert frag["copy"] == {"gbps": 4000.0} and frag["device"]["name"] == "fake"
    assert "| a | 1.2 |" in capsys.readouterr().out  # the table is printed
    assert common.finish(str(tmp_path / "x.json"), name="demo", title="Demo", columns=columns, rows=[],
                         notes=[], errors=[]) == 0
    monkeypatch.setenv("FASTINFER_BENCH_FLUSH", "read")  # the other flush, named in the notes
    assert common.flush_mode() == "read" and "256 MB read" in common.flush_note()
    monkeypatch.setenv("FASTINFER_BENCH_FLUSH", "dirty")
    with pytest.raises(SystemExit, match="FASTINFER_BENCH_FLUSH must be write or read, got 'dirty'"):
        common.flush_mode()


def _sanitize_ids() -> list[str]:
    lines = (BENCH / "sanitize_tests.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_sanitize_list_names_existing_cuda_tests():
    """gpu_check.sh runs bench/sanitize_tests.txt under compute-sanitizer with -m cuda: every id must
    still collect (a renamed test or parameter would otherwise drop out silently) and be cuda-marked."""
    ids = _sanitize_ids()
    assert len(ids) == len(set(ids)) >= 30
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "cuda", *ids], cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if line.startswith("tests/")]
    assert sorted(collected) == sorted(ids), sorted(set(collected) ^ set(ids))


@pytest.mark.parametrize("rc, verdict", [(0, True), (86, False), (1, False), (124, None), ("skip", None)])
def test_report_judges_the_sanitizer_only_when_it_ran(tmp_path, rc, verdict):
    import json
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.tsv").write_text(f"build\t0\t60\t\nenv\t0\t2\t\npytest\t0\t9\t\nsanitize:memcheck\t{rc}\t50\tnote\n")
    from test_run_tests import CLEAN_PTXAS_LOG
    (out / "build.log").write_text(CLEAN_PTXAS_LOG)
    subprocess.run([sys.executable, str(BENCH / "report.py"), "--out", str(out)], capture_output=True, text=True,
                   timeout=120)
    checks = json.loads((out / "report.json").read_text())["checks"]
    assert checks.get("sanitizer") is verdict
    md = (out / "report.md").read_text()
    assert "sanitize:memcheck" in md
    if verdict is False:
        assert "FAIL: sanitizer" in md


@pytest.mark.parametrize("script", ["gpu_check.sh", "mirror_check.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_mirror_check_reads_gpu_checks_test_order():
    """mirror_check.sh collects the files gpu_check.sh tests, from gpu_check's TEST_ORDER."""
    gpu_check = (BENCH / "gpu_check.sh").read_text()
    assert 'TEST_ORDER="' in gpu_check
    assert "sed -n '/^TEST_ORDER=\"/,/\"$/p' bench/gpu_check.sh" in (BENCH / "mirror_check.sh").read_text()


def test_ncu_targets_cannot_run_here_and_lays_out_its_cache(tmp_path):
    """bench/ncu_targets.py (gpu_check's GPU_CHECK_NCU step): exit 2 without a GPU build, 1 for an unknown
    target; its paged cache holds token t of sequence b in block tables[b, t // 16], row t % 16."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run")
    run = lambda *a: subprocess.run([sys.executable, str(BENCH / "ncu_targets.py"), *a], cwd=BENCH,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    assert run("prefill").returncode == 2
    assert run("nonsense").returncode == 1
    sys.path.insert(0, str(BENCH))
    import ncu_targets
    k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    with pytest.raises(RuntimeError):  # 40 is not a whole number of 16-token blocks
        ncu_targets.paged(k, v)
    k, v = k[:, :, :32], v[:, :, :32]
    cache, tables = ncu_targets.paged(k, v)
    for b, t in ((0, 0), (1, 17), (1, 31)):
        assert torch.equal(cache[tables[b, t // 16], 0, t % 16], k[b, :, t])
        assert torch.equal(cache[tables[b, t // 16], 1, t % 16], v[b, :, t])
