"""Issue 5: a forward on the GPU runs fastinfer's kernels and cuBLAS GEMMs. torch's own kernels are a
constant few per forward whatever the depth (the embedding gather, the gather of the rows that need
logits, the fp32 cast of the logits, metadata built on the device): a per-layer op falling back to
torch (attention, a norm, an activation, a cast) would add one kernel per layer and fail here.

The kernels of one prefill step and one decode step (eager, so each launch is seen) are listed with
torch.profiler for the same model at two depths; fastinfer's are named in its namespace, cuBLAS's by
their GEMM names. Memory copies and sets are not kernels and are not counted."""
from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastinfer.generate import get_loaded
from fastinfer.metadata import SeqChunk
from fastinfer.runner import ModelRunner
from models import make_hf_model

pytestmark = pytest.mark.cuda
GEMM = re.compile(r"gemm|xmma|cutlass|nvjet|cublas|splitKreduce", re.IGNORECASE)
MAX_TORCH_KERNELS = 8  # per forward: a handful of gathers and casts, whatever the depth


def kernel_names(fn) -> list[str]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if not n.lower().startswith(("memcpy", "memset"))]


def torch_kernels(names: list[str]) -> list[str]:
    return [n for n in names if "fastinfer" not in n and not GEMM.search(n)]


def step_kernels(num_layers: int) -> dict[str, list[str]]:
    hf = make_hf_model("llama", seed=3, head_dim=128, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=num_layers)
    runner = ModelRunner(get_loaded(hf, dtype=torch.bfloat16, device="cuda").model, num_blocks=16, block_size=16)
    prompts = [[5, 9, 2, 7, 11, 3, 8], [4, 4, 6, 1, 9]]
    tables = [[3, 1], [7, 2]]
    runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])  # warm-up (lazy inits, cuBLAS handles)
    prefill = kernel_names(lambda: runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]))
    decode = kernel_names(lambda: runner.run([SeqChunk([6], len(p), t) for p, t in zip(prompts, tables)]))
    return {"prefill": prefill, "decode": decode}


def test_forward_runs_fastinfer_kernels_and_gemms():
    shallow, deep = step_kernels(2), step_kernels(6)
    for step in ("prefill", "decode"):
        ours = [n for n in deep[step] if "fastinfer" in n]
        assert len(ours) >= 6 * 4, (step, deep[step])  # norms, rotary + cache, attention, ... per layer
        extra_shallow, extra_deep = torch_kernels(shallow[step]), torch_kernels(deep[step])
        assert len(extra_deep) == len(extra_shallow) <= MAX_TORCH_KERNELS, (step, extra_shallow, extra_deep)
