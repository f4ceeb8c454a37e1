"""fastinfer: fast inference of Llama-family LLMs with hand-written CUDA kernels.

Public API: ``fastinfer.generate`` (drop-in for HF ``model.generate``), ``fastinfer.LLM`` and
``fastinfer.SamplingParams`` (batch API), ``fastinfer.load_model``, ``fastinfer.env``. Ops live in ``fastinfer.ops`` (validated wrappers
of ``torch.ops.fastinfer.*``).
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (must load before the extension)

from . import _ops as ops
from .env import env
from .generate import generate
from .llm import LLM
from .loader import load_model
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .structured import GuidedDecodingParams, StructuredOutputsParams
from .vllm_beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence

__all__ = ["__version__", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "CompletionOutput", "env", "generate", "GuidedDecodingParams", "LLM", "load_model", "ops",
           "RequestOutput", "SamplingParams", "StructuredOutputsParams"]
