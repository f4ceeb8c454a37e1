"""`python -m fastinfer env`: what this installation is and what it can run."""
from __future__ import annotations

import platform
import sys

import torch

from . import _C, _ops


def has_kernel(op: str, key: str) -> bool:
    """Whether fastinfer::op has an implementation for dispatch key "CPU" or "CUDA" in this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastinfer::{op}", key)


def env_info() -> dict:
    from . import __version__
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    return {
        "fastinfer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels_built": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "gpu": gpu,
        "ops": {op: [k for k in ("CPU", "CUDA") if has_kernel(op, k)] for op in _ops.OP_NAMES},
    }


def env() -> str:
    """A human-readable report of versions, build and ops (also printed by `python -m fastinfer env`)."""
    info = env_info()
    gpu = info["gpu"]
    lines = [
        f"fastinfer          {info['fastinfer']}",
        f"python             {info['python']} ({sys.executable})",
        f"torch              {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})",
        f"CUDA kernels built {'yes, for ' + ', '.join('sm_' + a for a in info['cuda_archs']) if info['cuda_kernels_built'] else 'no (CPU ops only)'}",
        f"GPU                {gpu['name'] + ' (' + gpu['capability'] + ', ' + str(gpu['sms']) + ' SMs, ' + str(gpu['memory_gib']) + ' GiB)' if gpu else 'none'}",
        "ops:",
    ]
    width = max(map(len, info["ops"]))
    lines += [f"  {op:<{width}}  {' + '.join(impls) or 'NO IMPLEMENTATION'}" for op, impls in info["ops"].items()]
    return "\n".join(lines)
