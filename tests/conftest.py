"""Shared fixtures and marker handling (markers are declared in pyproject.toml).

`cuda` tests are skipped unless a GPU is visible and the extension was built with CUDA; `sm90`
tests unless that GPU is a Hopper (capability 9.0). The `device` fixture runs one test body on
CPU and, marked `cuda`, on the GPU.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
# Crash-tolerant GPU runs (FASTINFER_TEST_LEDGER, bench/run_tests.py); inert when the variable is unset.
from ledger_plugin import (  # noqa: F401 - hooks and an autouse fixture, registered by being here
    _cuda_context_check, pytest_runtest_logfinish, pytest_runtest_logreport, pytest_runtest_logstart,
    pytest_sessionfinish)
from ledger_plugin import pytest_collection_modifyitems as _skip_done_tests


@pytest.fixture
def quiet_transformers():
    """transformers' warnings and log messages silenced for a test that provokes them on purpose
    (right padding, sampling flags on greedy runs, ...: comparisons with HF generate)."""
    import warnings

    from transformers import logging
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.set_verbosity_error()
        yield
        logging.set_verbosity_warning()


def _cuda_skip_reason() -> str | None:
    if not fastinfer.ops._C.with_cuda:
        return "fastinfer was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def _sm90_skip_reason() -> str | None:
    reason = _cuda_skip_reason()
    if reason is None and torch.cuda.get_device_capability() != (9, 0):
        reason = f"needs a Hopper GPU (sm_90), got capability {torch.cuda.get_device_capability()}"
    return reason


@pytest.hookimpl(trylast=True)  # after -m / -k selection: the ledger plugin's shard is of the selected tests
def pytest_collection_modifyitems(config, items):
    cuda_reason, sm90_reason = _cuda_skip_reason(), _sm90_skip_reason()
    for item in items:
        if item.get_closest_marker("sm90") and sm90_reason:
            item.add_marker(pytest.mark.skip(reason=sm90_reason))
        elif item.get_closest_marker("cuda") and cuda_reason:
            item.add_marker(pytest.mark.skip(reason=cuda_reason))
    _skip_done_tests(config, items)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test's tensors live on: CPU always, the GPU for `cuda`-marked runs."""
    return torch.device(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: tensors are drawn on the CPU, then moved, so a test sees
    the same numbers on every device."""
    return torch.Generator().manual_seed(0)


def select_variant(request, monkeypatch, variable: str, variants: list[str]) -> str:
    """Sets the kernel-variant environment variable (read by the op at every call) to this run's
    variant; a test's CPU half (`device` == "cpu") runs once, with the first variant, since the CPU op
    has a single implementation."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cpu" and request.param != variants[0]:
        pytest.skip("the CPU op has a single implementation")
    monkeypatch.setenv(variable, request.param)
    return request.param


DECODE_KERNELS = ["tensor_cores", "cuda_cores"]


@pytest.fixture(params=DECODE_KERNELS)
def decode_kernel(request, monkeypatch) -> str:
    """The CUDA paged-decode kernel a test runs (FASTINFER_DECODE_KERNEL): tensor cores (the default
    for bf16 / fp16) and CUDA cores (fp32's only one)."""
    return select_variant(request, monkeypatch, "FASTINFER_DECODE_KERNEL", DECODE_KERNELS)


INT4_KERNELS = ["small", "tiles", "small_deferred", "small_streamk"]


@pytest.fixture(params=INT4_KERNELS)
def int4_kernel(request, monkeypatch) -> str:
    """The CUDA int4_linear kernel a test runs (FASTINFER_INT4_KERNEL), forced at every M: the GEMV
    kernel dequantizing each weight, the tile kernel (auto's choice above 8 rows) and the GEMV kernel
    with deferred scales (auto's choice up to 8 rows), and that kernel on a stream-K grid (<= 8 rows)."""
    return select_variant(request, monkeypatch, "FASTINFER_INT4_KERNEL", INT4_KERNELS)


PREFILL_BLOCK_MS = ["64", "128"]


@pytest.fixture(params=PREFILL_BLOCK_MS)
def prefill_block_m(request, monkeypatch) -> str:
    """Query rows per CTA of the CUDA prefill kernel (FASTINFER_PREFILL_BLOCK_M): 64 (a warp owns 16
    rows) and 128 (two row blocks per warp)."""
    return select_variant(request, monkeypatch, "FASTINFER_PREFILL_BLOCK_M", PREFILL_BLOCK_MS)


# The CUDA prefill kernels of a 16-bit query over a plain cache: the mma.sync kernel with 64- and
# 128-row tiles, and the sm_90a wgmma kernel (FASTINFER_PREFILL_KERNEL=wgmma).
PREFILL_VARIANTS = ["64", "128", "wgmma"]


def wgmma_prefill_runs() -> bool:
    """Whether FASTINFER_PREFILL_KERNEL=wgmma runs the sm_90a kernel here: a build with 90a and an
    sm_90 GPU (elsewhere it falls back to the mma kernel)."""
    import torch
    from fastinfer import _C
    return ("90a" in _C.cuda_archs.split(";") and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0))


@pytest.fixture(params=PREFILL_VARIANTS)
def prefill_variant(request, monkeypatch) -> str:
    """Sets FASTINFER_PREFILL_KERNEL (mma or wgmma) and, for mma, FASTINFER_PREFILL_BLOCK_M; the
    wgmma variant is skipped where that kernel would not run (it would repeat an mma run)."""
    variant = select_variant(request, monkeypatch, "FASTINFER_PREFILL_BLOCK_M", PREFILL_VARIANTS)
    if variant == "wgmma":
        monkeypatch.delenv("FASTINFER_PREFILL_BLOCK_M")
        if not wgmma_prefill_runs():
            pytest.skip("the wgmma prefill kernel needs an sm_90 GPU and a build for 90a")
    monkeypatch.setenv("FASTINFER_PREFILL_KERNEL", "wgmma" if variant == "wgmma" else "mma")
    return variant
