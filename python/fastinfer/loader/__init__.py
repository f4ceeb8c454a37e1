"""Model loaders: an HF checkpoint directory (safetensors), an in-memory HF model, or a GGUF file.

``load_model`` returns the fastinfer model, a tokenizer when one is available, and the
generation defaults the checkpoint ships (HF ``generation_config``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, parse_dtype
from ..models.llama import LlamaForCausalLM
from .safetensors import iter_safetensors


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any = None
    generation_defaults: dict = field(default_factory=dict)


def _default_device(quantization: str | None = None) -> torch.device:
    """The GPU when CUDA kernels exist for every op the model runs, else the CPU."""
    from .. import _ops
    from ..env import env_info
    info = env_info()
    needed = _ops.MODEL_OP_NAMES + (("fp8_quantize_per_token", "fp8_scaled_mm") if quantization == "fp8" else ())
    if info["gpu"] is not None and all("CUDA" in info["ops"][op] for op in needed):
        return torch.device("cuda")
    return torch.device("cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_model(source, dtype=None, device=None, quantization: str | None = None) -> LoadedModel:
    """source: a checkpoint directory, a .gguf file, or a transformers PreTrainedModel.

    quantization: None keeps the checkpoint's own format (an FP8 checkpoint loads as FP8); "fp8"
    also quantizes a float checkpoint's linear weights on load (fastinfer.quant.fp8).
    """
    device = torch.device(device) if device is not None else None
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".gguf":
            return _from_gguf(path, dtype, device, quantization)
        if path.is_dir():
            return _from_directory(path, dtype, device, quantization)
        raise FileNotFoundError(f"model path {path} is neither a checkpoint directory nor a .gguf file")
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return _from_hf_model(source, dtype, device, quantization)
    raise TypeError(f"model must be a path or a transformers PreTrainedModel, got {type(source).__name__}")


def _build(cfg: ModelConfig, dtype, device, weights, quantization=None) -> LlamaForCausalLM:
    quantization = quantization or cfg.quantization
    device = device or _default_device(quantization)
    dtype = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    model = LlamaForCausalLM(cfg, dtype, device, quantization)
    model.load_weights(weights)
    return model


def _from_directory(path: Path, dtype, device, quantization) -> LoadedModel:
    cfg = ModelConfig.from_file(path / "config.json")
    model = _build(cfg, dtype, device, iter_safetensors(path), quantization)
    gen_file = path / "generation_config.json"
    defaults = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    return LoadedModel(model, _tokenizer_from_dir(path), defaults)


def _from_hf_model(hf_model, dtype, device, quantization) -> LoadedModel:
    cfg_dict = hf_model.config.to_dict()
    cfg = ModelConfig.from_hf(cfg_dict)
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
        dtype = cfg.dtype if dtype == torch.float8_e4m3fn else dtype
    if device is None:
        device = next(hf_model.parameters()).device
    model = _build(cfg, dtype, device, hf_model.state_dict().items(), quantization)
    gen = getattr(hf_model, "generation_config", None)
    return LoadedModel(model, None, gen.to_dict() if gen is not None else {})


def _from_gguf(path: Path, dtype, device, quantization) -> LoadedModel:
    from .gguf import read_gguf
    device = device or _default_device(quantization)
    target = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    cfg_dict, state_dict, tokenizer = read_gguf(path, target)
    cfg = ModelConfig.from_hf(cfg_dict)
    model = _build(cfg, target, device, state_dict.items(), quantization)
    return LoadedModel(model, tokenizer, {"eos_token_id": cfg.eos_token_id})


def _tokenizer_from_dir(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
