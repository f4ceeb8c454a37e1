"""Run pytest so that one faulting kernel costs one test, not the rest of the GPU run.

    python bench/run_tests.py --out DIR --budget-s 200 -- -m cuda -q tests

Runs pytest with FASTINFER_TEST_LEDGER=DIR/tests.ledger (tests/ledger_plugin.py); when pytest stops
because a test broke the CUDA context (exit 3) or the process died during a test (a signal, or
pytest-timeout ending a hung test: --test-timeout), pytest runs again on the tests not yet started,
while the budget lasts and each run makes progress. Each run writes DIR/pytest-<n>.xml; the merged
outcome of every test goes to DIR/tests.json (read by report.py).

Exit status: 0 all tests that ran passed or were skipped; 5 none ran; 124 the budget ran out first;
1 otherwise (a failure, an error, a crash).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ledger_plugin import EXIT_CUDA_BROKEN, read_ledger  # noqa: E402

MAX_RUNS = 8
RERUN_BELOW_S = 15  # no new pytest process with less time than this left


def _run_once(cmd: list[str], env: dict, seconds: float) -> int:
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest stops as on Ctrl-C and still writes its xml
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


def summarize(tests: dict[str, dict], runs: list[dict]) -> dict:
    counts = Counter(passed=0, failed=0, errors=0, skipped=0, crashed=0, interrupted=0)
    key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped", "crashed": "crashed",
           "interrupted": "interrupted"}
    failures, skip_reasons = [], Counter()
    for nodeid, t in tests.items():
        counts[key.get(t["outcome"], "failed")] += 1
        if t["outcome"] == "skipped":
            skip_reasons[t["message"][:120]] += 1
        elif t["outcome"] != "passed":
            failures.append(f"{nodeid} [{t['outcome']}] {t['message'][:300]}".rstrip())
    return {**counts, "failures": failures, "skip_reasons": dict(skip_reasons.most_common()),
            "runs": runs, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--test-timeout", type=float, default=0,
                        help="seconds one test may take (pytest-timeout, thread method: the process ends and "
                             "the rest run again); 0: none")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    if args.test_timeout > 0:
        if importlib.util.find_spec("pytest_timeout") is None:
            print("run_tests: pytest-timeout is not installed; no per-test time limit", flush=True)
        else:
            pytest_args = [f"--timeout={args.test_timeout:g}", "--timeout-method=thread", *pytest_args]
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "tests.ledger"
    ledger.unlink(missing_ok=True)
    env = {**os.environ, "FASTINFER_TEST_LEDGER": str(ledger)}
    deadline = time.monotonic() + args.budget_s
    runs: list[dict] = []
    while len(runs) < MAX_RUNS:
        left = deadline - time.monotonic()
        if runs and left < RERUN_BELOW_S:
            break
        before = read_ledger(str(ledger))
        n = len(runs) + 1
        cmd = [sys.executable, "-m", "pytest", *pytest_args, f"--junitxml={args.out / f'pytest-{n}.xml'}"]
        if runs:
            print(f"\n==== run_tests: pytest run {n}, on the tests not yet started ({left:.0f} s left)", flush=True)
        t0 = time.monotonic()
        rc = _run_once(cmd, env, left)
        after = read_ledger(str(ledger))
        started = len(after) - len(before)
        died_in = [t for t, v in after.items() if v["outcome"] == "crashed" and t not in before]
        runs.append({"rc": rc, "seconds": round(time.monotonic() - t0, 1), "tests_started": started})
        # A broken context, a signal, or a test that started and never ended (the process died in it:
        # pytest-timeout's thread method ends a hung test with exit status 1).
        broke = rc == EXIT_CUDA_BROKEN or rc < 0 or rc > 128 or bool(died_in)
        if not broke or started == 0 or rc == 124:
            break
    tests = read_ledger(str(ledger))
    if runs and runs[-1]["rc"] == 124 and tests:  # the test the budget cut short did not crash
        last = tests[next(reversed(tests))]
        if last["outcome"] == "crashed":
            last.update(outcome="interrupted", message="stopped by the time budget")
    summary = summarize(tests, runs)
    (args.out / "tests.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n==== run_tests: {len(runs)} pytest run(s), exit {[r['rc'] for r in runs]}: "
          + ", ".join(f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "crashed", "skipped"))
          + (f", {summary['interrupted']} interrupted" if summary["interrupted"] else ""))
    for failure in summary["failures"]:
        print("  ", failure)
    if runs[-1]["rc"] == 124:
        return 124
    if summary["failed"] or summary["errors"] or summary["crashed"] or any(
            r["rc"] not in (0, 5, EXIT_CUDA_BROKEN) for r in runs):
        return 1
    return 5 if not tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
