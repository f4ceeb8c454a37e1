"""Model loaders: an HF checkpoint directory (safetensors), an in-memory HF model, or a GGUF file.

``load_model`` returns the fastinfer model, a tokenizer when one is available, and the
generation defaults the checkpoint ships (HF ``generation_config``). ``quantization`` picks 4-bit
projections (fastinfer.quant): GPTQ / AWQ checkpoints are converted to the packed layout as they
load, a GGUF file's Q4_0 / Q4_1 blocks are repacked without ever becoming floats ("gguf"), and
"int4" quantizes dense weights with round-to-nearest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, parse_dtype
from ..models.llama import LlamaForCausalLM
from ..quant.linear import METHODS, QuantConfig
from .safetensors import iter_safetensors


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any = None
    generation_defaults: dict = field(default_factory=dict)


def _default_device() -> torch.device:
    """The GPU when CUDA kernels exist for every op the model runs, else the CPU."""
    from ..env import env_info
    info = env_info()
    if info["gpu"] is not None and all("CUDA" in impls for impls in info["ops"].values()):
        return torch.device("cuda")
    return torch.device("cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_model(source, dtype=None, device=None, quantization: str | None = None) -> LoadedModel:
    """source: a checkpoint directory, a .gguf file, or a transformers PreTrainedModel.

    quantization: None (weights as stored: a GPTQ / AWQ checkpoint stays 4-bit, a GGUF file is
    dequantized), "gptq" / "awq" (the checkpoint must be one), "gguf" (a .gguf file's Q4_0 / Q4_1
    projections run as 4-bit) or "int4" (round-to-nearest 4-bit of the dense weights at load)."""
    if quantization is not None and quantization not in METHODS:
        raise ValueError(f"quantization must be None or one of {METHODS}, got {quantization!r}")
    device = torch.device(device) if device is not None else None
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


def _build(cfg: ModelConfig, dtype, device, weights, quant: QuantConfig | None = None) -> LlamaForCausalLM:
    device = device or _default_device()
    dtype = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    model = LlamaForCausalLM(cfg, dtype, device, quant)
    model.load_weights(weights)
    return model


def rtn_config(cfg: ModelConfig) -> QuantConfig:
    """quantization="int4": asymmetric round-to-nearest, the largest group dividing every projection's K."""
    ks = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), None)
    if group is None:
        raise ValueError(f"quantization='int4' needs projection input sizes {ks} divisible by 32")
    return QuantConfig("int4", group, "zeros")


def _from_directory(path: Path, dtype, device, quantization) -> LoadedModel:
    cfg = ModelConfig.from_file(path / "config.json")
    raw = json.loads((path / "config.json").read_text())
    weights, quant = iter_safetensors(path), None
    from ..quant.checkpoints import checkpoint_quant_config, convert_checkpoint
    stored = checkpoint_quant_config(raw)
    if stored is not None:
        if quantization not in (None, stored.method):
            raise ValueError(f"{path} is a {stored.method} checkpoint; it cannot load with quantization={quantization!r}")
        weights, quant = convert_checkpoint(weights, raw), stored
    elif quantization in ("gptq", "awq", "gguf"):
        raise ValueError(f"quantization={quantization!r}, but {path}/config.json has no {quantization} "
                         f"quantization_config (a .gguf file is needed for 'gguf')")
    elif quantization == "int4":
        quant = rtn_config(cfg)
    model = _build(cfg, dtype, device, weights, quant)
    gen_file = path / "generation_config.json"
    defaults = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    return LoadedModel(model, _tokenizer_from_dir(path), defaults)


def _from_hf_model(hf_model, dtype, device, quantization) -> LoadedModel:
    cfg_dict = hf_model.config.to_dict()
    cfg = ModelConfig.from_hf(cfg_dict)
    if quantization not in (None, "int4"):
        raise ValueError(f"a transformers model object loads with quantization=None or 'int4', got {quantization!r}")
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
    if device is None:
        device = next(hf_model.parameters()).device
    quant = rtn_config(cfg) if quantization == "int4" else None
    model = _build(cfg, dtype, device, hf_model.state_dict().items(), quant)
    gen = getattr(hf_model, "generation_config", None)
    return LoadedModel(model, None, gen.to_dict() if gen is not None else {})


def _from_gguf(path: Path, dtype, device, quantization) -> LoadedModel:
    device = device or _default_device()
    target = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    if quantization in ("gptq", "awq"):
        raise ValueError(f"{path} is a GGUF file; quantization={quantization!r} needs a {quantization} checkpoint directory")
    if quantization == "gguf":
        from ..quant.gguf import read_gguf_int4
        cfg_dict, state_dict, tokenizer, quant = read_gguf_int4(path, target)
    else:
        from .gguf import read_gguf
        cfg_dict, state_dict, tokenizer = read_gguf(path, target)
        quant = None
    cfg = ModelConfig.from_hf(cfg_dict)
    if quantization == "int4":
        quant = rtn_config(cfg)
    model = _build(cfg, target, device, state_dict.items(), quant)
    return LoadedModel(model, tokenizer, {"eos_token_id": cfg.eos_token_id})


def _tokenizer_from_dir(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
