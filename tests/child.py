"""Runs a check of a new GPU kernel in a child Python process (tests of kernels written without a GPU).

A kernel whose mbarrier or named-barrier counts are wrong hangs instead of failing. In a child with a
timeout that costs the one test: the child is killed, and with it its CUDA context and the hung kernel.
100 s stays under bench/gpu_check.sh's 120 s per-test watchdog, which would otherwise end pytest first and
leave the child (and its kernel) running. The child prints one line "<TAG> <json>" per result it reports;
the tests directory is its argv[2], so it can import the test modules' helpers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 100


def run_child(script: str, cases, what: str, tags=("RESULTS",)):
    """Runs `script` with argv[1] = json(cases), argv[2] = the tests directory; returns the json after each
    tag (one value for one tag, else a dict by tag). A timeout or a failing child fails the test."""
    try:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(cases), str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s (a hang: barrier counts or phases)")
    assert done.returncode == 0, done.stderr[-3000:]
    found = {}
    for line in done.stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag in tags:
            found[tag] = json.loads(payload)
    missing = [t for t in tags if t not in found]
    assert not missing, f"the child printed no {missing} line; stdout tail: {done.stdout[-1000:]}"
    return found[tags[0]] if len(tags) == 1 else found
