"""Keep a GPU test run going past a kernel that breaks the CUDA context or kills the process.

A faulting kernel (illegal address, trap) leaves the CUDA context unusable: every later GPU test of
the same process then fails with the same error, and a crash loses the whole run's junit xml. On a
GPU visit of a few minutes that would hide which other kernels work. With FASTINFER_TEST_LEDGER set:

- every test's start and end (outcome, short message) are appended to the ledger file, flushed at once,
  so a run that dies still leaves what it did;
- tests already started in the ledger are deselected, so a rerun goes on after the culprit;
- after each test the device is synchronized; an error there means the context is broken: the test
  is reported as an error and pytest stops with exit status 3 (EXIT_CUDA_BROKEN).

bench/run_tests.py reruns pytest while it stops that way (or crashes) and merges the ledger.
The conftest imports these hooks; `-p ledger_plugin` registers them elsewhere (its own tests).
FASTINFER_TEST_FAKE_CUDA_FAULT=<text> treats tests whose id contains <text> as breaking the context
(to test all this without a GPU).

FASTINFER_TEST_TIMEOUT_S=<s> (with the ledger): a test still running after s seconds (setup to
teardown; a kernel that never returns looks like this) is written to the ledger as failed, "timed
out", and a watchdog thread ends the process with exit status 3, so that bench/run_tests.py goes on
after it. Its own, not pytest-timeout: the GPU machine's image has no pytest-timeout.
"""
from __future__ import annotations

import os
import re
import sys
import threading

import pytest

EXIT_CUDA_BROKEN = 3
_state: dict = {"broken": None, "outcomes": {}, "watchdog": None}


def _ledger_path() -> str | None:
    return os.environ.get("FASTINFER_TEST_LEDGER") or None


def _clean(text: str, limit: int = 400) -> str:
    return re.sub(r"\s+", " ", text).strip()[:limit]


def append(path: str, *fields: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("\t".join(_clean(x) for x in fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_ledger(path: str) -> dict[str, dict]:
    """nodeid -> {"outcome": passed|failed|error|skipped|crashed, "message": str}, in run order. A test
    that started but never ended crashed its process."""
    tests: dict[str, dict] = {}
    if not os.path.exists(path):
        return tests
    with open(path, encoding="utf-8") as f:
        for line in f:
            kind, nodeid, *rest = line.rstrip("\n").split("\t") + [""]
            if kind == "start":
                tests[nodeid] = {"outcome": "crashed", "message": "the test process died during this test"}
            elif kind == "end" and nodeid:
                tests[nodeid] = {"outcome": rest[0] or "passed", "message": rest[1] if len(rest) > 1 else ""}
    return tests


def _device_error(nodeid: str) -> str | None:
    fake = os.environ.get("FASTINFER_TEST_FAKE_CUDA_FAULT")
    if fake and fake in nodeid:
        return "FASTINFER_TEST_FAKE_CUDA_FAULT"
    torch = sys.modules.get("torch")  # not imported: no CUDA work to check (and no import to wait for)
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any error surfacing here is an asynchronous kernel fault
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(autouse=True)
def _cuda_context_check(request):
    """Errors of kernels a test left running surface here, charged to that test."""
    yield
    if _ledger_path() is None:
        return
    error = _device_error(request.node.nodeid)
    if error is not None:
        _state["broken"] = f"{request.node.nodeid}: {error}"
        raise RuntimeError(f"the CUDA context is broken after this test: {error}")


def _shard(items: list) -> list:
    """FASTINFER_TEST_SHARD=i/n (bench/run_tests.py --shards): every n-th test from the i-th, of the
    tests selected so far (after -m and -k: this hook runs last), so that n processes split a run."""
    spec = os.environ.get("FASTINFER_TEST_SHARD")
    if not spec:
        return items
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise pytest.UsageError(f"FASTINFER_TEST_SHARD={spec!r}: need i/n with 0 <= i < n")
    return items[i::n]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Runs after pytest's own selection (-m, -k, --deselect): this process's shard, then, with a
    ledger, the tests not yet started (a rerun goes on after the ones a previous run reached; the shard
    is taken first, so that it stays the same set in every rerun)."""
    keep = _shard(items)
    path = _ledger_path()
    if path is not None:
        done = read_ledger(path)
        keep = [item for item in keep if item.nodeid not in done]
    if len(keep) != len(items):
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


def _time_out(path: str, nodeid: str, seconds: float) -> None:
    message = f"timed out after {seconds:g} s (FASTINFER_TEST_TIMEOUT_S): the process was ended"
    append(path, "end", nodeid, "failed", message)
    sys.stderr.write(f"\n{nodeid}: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_CUDA_BROKEN)  # from this thread: the main one may be blocked in a kernel that never returns


def pytest_runtest_logstart(nodeid, location):
    if (path := _ledger_path()) is not None:
        append(path, "start", nodeid)
        seconds = float(os.environ.get("FASTINFER_TEST_TIMEOUT_S") or 0)
        if seconds > 0:
            watchdog = threading.Timer(seconds, _time_out, args=(path, nodeid, seconds))
            watchdog.daemon = True
            watchdog.start()
            _state["watchdog"] = watchdog


def _message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(longrepr or "").strip().splitlines()[-1] if longrepr else ""


def pytest_runtest_logreport(report):
    if _ledger_path() is None:
        return
    outcomes = _state["outcomes"]
    previous = outcomes.get(report.nodeid, ("passed", ""))
    if report.failed:
        outcome = ("failed" if report.when == "call" else "error", _message(report))
        if previous[0] not in ("failed", "error"):
            outcomes[report.nodeid] = outcome
    elif report.skipped and previous[0] == "passed":
        outcomes[report.nodeid] = ("skipped", _message(report))


def _disarm() -> None:
    if _state["watchdog"] is not None:
        _state["watchdog"].cancel()
        _state["watchdog"] = None


def pytest_sessionfinish(session, exitstatus):
    """A test interrupted (SIGINT: run_tests' deadline) never reaches logfinish: its watchdog must not
    fire while pytest writes its summary and xml."""
    _disarm()


def pytest_runtest_logfinish(nodeid, location):
    path = _ledger_path()
    if path is None:
        return
    _disarm()
    outcome, message = _state["outcomes"].pop(nodeid, ("passed", ""))
    append(path, "end", nodeid, outcome, message)
    if _state["broken"] is not None:
        pytest.exit(f"CUDA context broken by {_state['broken']}; rerun to go on past it",
                    returncode=EXIT_CUDA_BROKEN)
