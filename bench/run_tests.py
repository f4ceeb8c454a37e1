"""Run pytest so that one faulting kernel costs one test, not the rest of the GPU run.

    python bench/run_tests.py --out DIR --budget-s 200 -- -m cuda -q tests

Runs pytest with FASTINFER_TEST_LEDGER=DIR/tests.ledger (tests/ledger_plugin.py); when pytest stops
because a test broke the CUDA context (exit 3) or the process died during a test (a signal, or the
watchdog ending a test past --test-timeout), pytest runs again on the tests not yet started,
while the budget lasts and each run makes progress. Each run writes DIR/pytest-<n>.xml; the merged
outcome of every test goes to DIR/tests.json (read by report.py).

--shards N runs N such loops at once, shard i on every N-th selected test from the i-th (the ledger
plugin picks them, FASTINFER_TEST_SHARD=i/N, after -m / -k; each shard keeps the priority order of
the files as given and the same tests in every rerun), with its own ledger (tests-<i>.ledger), xml
(pytest-<i>-<n>.xml) and output (pytest-shard<i>.log, printed when all are done). A GPU visit is
minutes long and most of a small test's time is the host's (inputs, references, Python): several
processes on one GPU get through more of the suite than one.

Exit status: 0 all tests that ran passed or were skipped; 5 none ran; 124 the budget ran out first;
1 otherwise (a failure, an error, a crash).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ledger_plugin import EXIT_CUDA_BROKEN, read_ledger  # noqa: E402

MAX_RUNS = 8
RERUN_BELOW_S = 15  # no new pytest process with less time than this left


def _run_once(cmd: list[str], env: dict, seconds: float, log=None) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log is not None else None)
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


def _run_shard(pytest_args: list[str], out: Path, tag: str, deadline: float, env: dict,
               log=None) -> tuple[list[dict], dict[str, dict]]:
    """pytest, run again past a test that broke the CUDA context or killed the process, while the time
    lasts and each run makes progress. tag "" (one shard): tests.ledger, pytest-<n>.xml; else
    tests-<tag>.ledger, pytest-<tag>-<n>.xml. log: a file for pytest's output (else ours)."""
    ledger = out / (f"tests-{tag}.ledger" if tag else "tests.ledger")
    ledger.unlink(missing_ok=True)
    env = {**env, "FASTINFER_TEST_LEDGER": str(ledger)}
    runs: list[dict] = []
    while len(runs) < MAX_RUNS:
        left = deadline - time.monotonic()
        if runs and left < RERUN_BELOW_S:
            break
        before = read_ledger(str(ledger))
        n = len(runs) + 1
        xml = out / (f"pytest-{tag}-{n}.xml" if tag else f"pytest-{n}.xml")
        cmd = [sys.executable, "-m", "pytest", *pytest_args, f"--junitxml={xml}"]
        if runs:
            print(f"\n==== run_tests{f' shard {tag}' if tag else ''}: pytest run {n}, on the tests not yet started "
                  f"({left:.0f} s left)", flush=True, file=log)
        t0 = time.monotonic()
        rc = _run_once(cmd, env, left, log)
        after = read_ledger(str(ledger))
        started = len(after) - len(before)
        died_in = [t for t, v in after.items() if v["outcome"] == "crashed" and t not in before]
        runs.append({"rc": rc, "seconds": round(time.monotonic() - t0, 1), "tests_started": started,
                     **({"shard": tag} if tag else {})})
        # A broken context or a test past its time (exit 3), a signal, or a test that started and never
        # ended (the process died in it).
        broke = rc == EXIT_CUDA_BROKEN or rc < 0 or rc > 128 or bool(died_in)
        if not broke or started == 0 or rc == 124:
            break
    tests = read_ledger(str(ledger))
    if runs and runs[-1]["rc"] == 124 and tests:  # the test the budget cut short did not crash
        last = tests[next(reversed(tests))]
        if last["outcome"] == "crashed":
            last.update(outcome="interrupted", message="stopped by the time budget")
    return runs, tests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--test-timeout", type=float, default=0,
                        help="seconds one test may take (the ledger plugin's watchdog: the test fails, the "
                             "process ends and the rest run again); 0: none")
    parser.add_argument("--shards", type=int, default=1,
                        help="pytest processes at once, each on every n-th selected test (FASTINFER_TEST_SHARD, "
                             "tests/ledger_plugin.py; its own ledger, xml and log pytest-shard<i>.log; CPU threads "
                             "split between them)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    env = dict(os.environ)
    if args.test_timeout > 0:  # the ledger plugin's watchdog (tests/ledger_plugin.py)
        env["FASTINFER_TEST_TIMEOUT_S"] = f"{args.test_timeout:g}"
    if args.shards <= 1:
        runs, tests = _run_shard(pytest_args, args.out, "", deadline, env)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.shards)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        print(f"==== run_tests: {args.shards} shards at once ({threads} CPU threads each; FASTINFER_TEST_SHARD, "
              f"tests/ledger_plugin.py); their output: pytest-shard<i>.log", flush=True)
        results: list = [None] * args.shards

        def work(i: int) -> None:
            shard_env = {**env, "FASTINFER_TEST_SHARD": f"{i}/{args.shards}"}
            try:
                with open(args.out / f"pytest-shard{i}.log", "w") as log:
                    results[i] = _run_shard(pytest_args, args.out, str(i), deadline, shard_env, log)
            except Exception as exc:  # noqa: BLE001 - a shard that cannot run is reported, not fatal
                print(f"run_tests: shard {i} failed to run: {type(exc).__name__}: {exc}", flush=True)
                results[i] = ([{"rc": 1, "seconds": 0.0, "tests_started": 0, "shard": str(i)}], {})

        workers = [threading.Thread(target=work, args=(i,)) for i in range(args.shards)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        runs, tests = [], {}
        for i, (shard_runs, shard_tests) in enumerate(results):
            runs += shard_runs
            tests.update(shard_tests)
            path = args.out / f"pytest-shard{i}.log"
            log = path.read_text(errors="replace").splitlines() if path.exists() else []
            print(f"\n==== shard {i}: {len(shard_tests)} tests, pytest exit {[r['rc'] for r in shard_runs]}; "
                  f"end of pytest-shard{i}.log:", *log[-15:], sep="\n", flush=True)
    summary = summarize(tests, runs)
    (args.out / "tests.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n==== run_tests: {len(runs)} pytest run(s), exit {[r['rc'] for r in runs]}: "
          + ", ".join(f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "crashed", "skipped"))
          + (f", {summary['interrupted']} interrupted" if summary["interrupted"] else ""))
    for failure in summary["failures"]:
        print("  ", failure)
    if any(r["rc"] == 124 for r in runs):
        return 124
    if summary["failed"] or summary["errors"] or summary["crashed"] or any(
            r["rc"] not in (0, 5, EXIT_CUDA_BROKEN) for r in runs):
        return 1
    return 5 if not tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
