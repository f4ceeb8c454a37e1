"""bench/run_tests.py with tests/ledger_plugin.py: a test that breaks the CUDA context (faked here)
or kills its process costs that test only; the rest still run, and every outcome is reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A build log with one kernel and no spills (report.py's spill check passes on it).
CLEAN_PTXAS_LOG = ("ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90a'\n"
                   "ptxas info    : Function properties for _Z6kernelv\n"
                   "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                   "ptxas info    : Used 32 registers, used 1 barriers, 1024 bytes smem, 352 bytes cmem[0]\n")

SUITE = '''
import os
import pytest

def test_a():
    pass

def test_fault():
    pass

def test_fails():
    assert 1 == 2, "boom"

def test_abort():
    os.abort()

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

def test_last():
    pass
'''


def _run(tmp_path: Path, budget: float = 120, suite: str = SUITE, extra: tuple = (), pytest_extra: tuple = (),
         **env) -> tuple[int, dict, str]:
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_suite.py").write_text(suite)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_tests.py"), "--out", str(out), "--budget-s", str(budget), *extra,
         "--", "-p", "ledger_plugin", "-p", "no:cacheprovider", "-q", *pytest_extra, "suite"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
             **env})
    summary = json.loads((out / "tests.json").read_text()) if (out / "tests.json").exists() else {}
    return proc.returncode, summary, proc.stdout + proc.stderr


def test_goes_on_past_a_broken_context_and_a_crash(tmp_path):
    rc, summary, log = _run(tmp_path, FASTINFER_TEST_FAKE_CUDA_FAULT="test_fault")
    outcomes = {nodeid.split("::")[-1]: t["outcome"] for nodeid, t in summary["tests"].items()}
    assert outcomes == {"test_a": "passed", "test_fault": "error", "test_fails": "failed",
                        "test_abort": "crashed", "test_skipped": "skipped", "test_last": "passed"}, log
    assert [r["rc"] for r in summary["runs"]][0] == 3, log  # stopped after the broken context
    assert len(summary["runs"]) == 3, log                  # ... and after the abort, then finished
    assert rc == 1
    assert summary["passed"] == 2 and summary["crashed"] == 1 and summary["skipped"] == 1
    messages = " ".join(summary["failures"])
    assert "boom" in messages and "CUDA context is broken" in messages
    assert summary["skip_reasons"] == {"not here": 1}
    for n in (1, 2, 3):  # every run's junit xml, the crashed one excepted
        assert (tmp_path / "out" / f"pytest-{n}.xml").exists() == (n != 2)


def test_an_empty_run_exits_5(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_tests.py"), "--out", str(empty / "out"), "--",
         "-p", "ledger_plugin", "-p", "no:cacheprovider", "-q", str(empty)],
        cwd=empty, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 5, proc.stdout + proc.stderr


@pytest.mark.parametrize("budget", [3])
def test_budget_stops_reruns(tmp_path, budget):
    rc, summary, log = _run(tmp_path, budget=budget, FASTINFER_TEST_FAKE_CUDA_FAULT="test_fault")
    # the first run either finished within 3 s and broke the context, or was interrupted: no second run
    assert len(summary.get("runs", [])) == 1, log
    assert rc in (1, 124)


def test_report_lists_every_outcome(tmp_path):
    """report.py takes the merged outcomes (crashes included) from tests.json into report.md."""
    rc, summary, log = _run(tmp_path, FASTINFER_TEST_FAKE_CUDA_FAULT="test_fault")
    out = tmp_path / "out"
    (out / "steps.tsv").write_text(f"build\t0\t60\t\nenv\t0\t2\t\npytest\t{rc}\t9\t\n")
    (out / "build.log").write_text(CLEAN_PTXAS_LOG)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    md = (out / "report.md").read_text()
    assert "FAIL: tests" in md
    assert "passed 2, failed 1, errors 1, crashed 1, skipped 1; 3 pytest runs (exit [3, -6, 0])" in md
    assert "test_abort [crashed]" in md and "boom" in md


HANGING = '''
import time

def test_first():
    pass

def test_hangs():
    time.sleep(600)

def test_after():
    pass
'''


def test_a_hung_test_ends_by_its_time_limit_and_the_rest_run(tmp_path):
    """The ledger plugin's watchdog (--test-timeout) ends the process in a hung test (a GPU kernel that
    never returns looks like this): the test is recorded as failed, "timed out", and pytest runs again
    after it. No pytest-timeout needed (the GPU machine has none)."""
    rc, summary, log = _run(tmp_path, suite=HANGING, extra=("--test-timeout", "3"))
    outcomes = {nodeid.split("::")[-1]: t["outcome"] for nodeid, t in summary["tests"].items()}
    assert outcomes == {"test_first": "passed", "test_hangs": "failed", "test_after": "passed"}, log
    assert "timed out after 3 s" in " ".join(summary["failures"])
    assert [r["rc"] for r in summary["runs"]] == [3, 0] and rc == 1, log


def test_the_budget_interrupts_rather_than_crashes(tmp_path):
    rc, summary, log = _run(tmp_path, budget=8, suite=HANGING)
    outcomes = {nodeid.split("::")[-1]: t["outcome"] for nodeid, t in summary["tests"].items()}
    assert outcomes == {"test_first": "passed", "test_hangs": "interrupted"}, log
    assert rc == 124 and len(summary["runs"]) == 1



def test_shards_run_at_once_and_merge(tmp_path):
    """--shards 2: every test runs once in one of two pytest loops (each going on past the broken
    context and the abort in its share), and tests.json merges both."""
    rc, summary, log = _run(tmp_path, extra=("--shards", "2"), FASTINFER_TEST_FAKE_CUDA_FAULT="test_fault")
    outcomes = {nodeid.split("::")[-1]: t["outcome"] for nodeid, t in summary["tests"].items()}
    assert outcomes == {"test_a": "passed", "test_fault": "error", "test_fails": "failed",
                        "test_abort": "crashed", "test_skipped": "skipped", "test_last": "passed"}, log
    assert rc == 1
    assert {r["shard"] for r in summary["runs"]} == {"0", "1"}, summary["runs"]
    out = tmp_path / "out"
    assert (out / "pytest-shard0.log").exists() and (out / "pytest-shard1.log").exists()
    assert "2 shards at once" in log and "==== shard 1:" in log


MARKED = """
import pytest

@pytest.mark.keep
def test_k1(): pass

def test_other1(): pass

@pytest.mark.keep
def test_k2(): pass

def test_other2(): pass

@pytest.mark.keep
def test_k3(): pass

@pytest.mark.keep
def test_k4(): pass
"""


def test_shards_split_the_selected_tests(tmp_path):
    """The shard is taken after -m: two shards run two of the four selected tests each, none twice."""
    rc, summary, log = _run(tmp_path, suite=MARKED, extra=("--shards", "2"), pytest_extra=("-m", "keep"))
    assert rc == 0, log
    assert sorted(n.split("::")[-1] for n in summary["tests"]) == ["test_k1", "test_k2", "test_k3", "test_k4"], log
    assert sorted((r["shard"], r["tests_started"]) for r in summary["runs"]) == [("0", 2), ("1", 2)], log
