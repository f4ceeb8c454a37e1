"""fastinfer: fast inference of Llama-family LLMs with hand-written CUDA kernels.

Public API: ``fastinfer.generate`` (drop-in for HF ``model.generate``), ``fastinfer.load_model``,
``fastinfer.SamplingParams``, ``fastinfer.env``. Ops live in ``fastinfer.ops`` (validated wrappers
of ``torch.ops.fastinfer.*``).
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (must load before the extension)

from . import _ops as ops
from .env import env
from .generate import generate
from .loader import load_model
from .sampling_params import SamplingParams

__all__ = ["__version__", "env", "generate", "load_model", "ops", "SamplingParams"]
