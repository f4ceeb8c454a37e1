"""fastinfer: fast inference of Llama-family LLMs with hand-written CUDA kernels.

Public API: ``fastinfer.generate`` (drop-in for HF ``model.generate``), ``fastinfer.env``.
Ops live in ``fastinfer.ops`` (validated wrappers of ``torch.ops.fastinfer.*``).
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (must load before the extension)

from . import _ops as ops
from .env import env

__all__ = ["__version__", "env", "ops"]
