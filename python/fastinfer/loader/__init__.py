"""Model loaders: an HF checkpoint directory (safetensors), an in-memory HF model, or a GGUF file.

``load_model`` returns the fastinfer model, a tokenizer when one is available, and the
generation defaults the checkpoint ships (HF ``generation_config``). ``quantization`` picks the
projections' kind (models/linear.py): 4-bit (fastinfer.quant): GPTQ / AWQ checkpoints are converted
to the packed layout as they load, a GGUF file's Q4_0 / Q4_1 blocks are repacked without ever
becoming floats ("gguf"), and "int4" quantizes dense weights with round-to-nearest; or FP8
("fp8", or an FP8 checkpoint's quantization_config; fastinfer.quant.fp8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, parse_dtype, read_json
from ..models.llama import LlamaForCausalLM
from ..models.linear import QUANTIZATIONS
from ..quant.linear import QuantConfig
from .safetensors import read_tensors, scan_safetensors


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

    quantization: None keeps the checkpoint's own format (a GPTQ / AWQ checkpoint stays 4-bit, an
    FP8 checkpoint loads as FP8, a GGUF file is dequantized); "gptq" / "awq" (the checkpoint must be
    one), "gguf" (a .gguf file's Q4_0 / Q4_1 projections run as 4-bit), "int4" (round-to-nearest
    4-bit of the dense weights at load) or "fp8" (FP8 projections; a float checkpoint's weights
    are quantized on load, fastinfer.quant.fp8)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    try:
        device = torch.device(device) if device is not None else None
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device: {e}") from None
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


def _build(cfg: ModelConfig, dtype, device, weights, quantization: str | QuantConfig | None = None) -> LlamaForCausalLM:
    """quantization: None (the checkpoint's own), "fp8" or a 4-bit QuantConfig."""
    quantization = quantization or cfg.quantization
    device = device or _default_device(quantization)
    dtype = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    model = LlamaForCausalLM(cfg, dtype, device, quantization)
    model.load_weights(weights)
    return model


def rtn_config(cfg: ModelConfig) -> QuantConfig:
    """quantization="int4": asymmetric round-to-nearest, the largest group dividing every projection's K."""
    ks = (cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    ks += (cfg.intermediate_size,) if len(cfg.moe_layers) < cfg.num_layers else ()  # a dense MLP's down_proj
    ks += (cfg.moe_intermediate_size,) if cfg.moe_layers else ()                     # the experts' down_proj
    ks += (cfg.shared_expert_intermediate_size,) if cfg.shared_expert_intermediate_size else ()
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), None)
    if group is None:
        raise ValueError(f"quantization='int4' needs projection input sizes {ks} divisible by 32")
    return QuantConfig("int4", group, "zeros")


def _dense_kind(cfg: ModelConfig, quantization: str | None) -> str | QuantConfig | None:
    """The projection kind for weights stored dense (or FP8): None, "fp8" or int4's QuantConfig."""
    return rtn_config(cfg) if quantization == "int4" else quantization


def _from_directory(path: Path, dtype, device, quantization) -> LoadedModel:
    """Everything that can be checked cheaply (config.json, the safetensors headers, the generation
    config and the tokenizer) is checked before the model is allocated and any weight is read."""
    cfg_path = path / "config.json"
    raw = read_json(cfg_path, "config.json")
    from ..quant.checkpoints import checkpoint_quant_config, convert_checkpoint
    try:
        cfg = ModelConfig.from_hf(raw)
        stored = None if cfg.quantization == "fp8" else checkpoint_quant_config(raw)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    stored_method = stored.method if stored is not None else cfg.quantization
    if stored_method is not None and quantization not in (None, stored_method):
        raise ValueError(f"{path} is a {stored_method} checkpoint; it cannot load with quantization={quantization!r}")
    if stored is None and quantization in ("gptq", "awq", "gguf"):
        raise ValueError(f"quantization={quantization!r}, but {path}/config.json has no {quantization} "
                         f"quantization_config (a .gguf file is needed for 'gguf')")
    kind = stored if stored is not None else _dense_kind(cfg, quantization)
    shards = scan_safetensors(path)
    _check_checkpoint_size(cfg, cfg_path, [file for file, _ in shards])
    weights = read_tensors(shards)
    if stored is not None:
        weights = convert_checkpoint(weights, raw)
    gen_file = path / "generation_config.json"
    defaults = read_json(gen_file, "generation_config.json") if gen_file.exists() else {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{gen_file} must hold a JSON object, got {type(defaults).__name__}")
    tokenizer = _tokenizer_from_dir(path)
    model = _build(cfg, dtype, device, weights, kind)
    return LoadedModel(model, tokenizer, defaults)


def _check_checkpoint_size(cfg: ModelConfig, cfg_path: Path, files: list[Path]) -> None:
    """Refuse a config.json whose model could not be filled from these files, before allocating it:
    every supported format stores at least 4 bits per projection / embedding weight, so a model of
    more than 2 weights per stored byte is missing weights (or its config.json is corrupt, e.g. a
    num_hidden_layers of 10**9 that would otherwise allocate until the process dies)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h = cfg.hidden_size
    per_layer = h * (2 * q_rows + 2 * kv_rows) + 3 * h * cfg.intermediate_size
    needed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * per_layer
    stored = sum(f.stat().st_size for f in files)
    if needed > 2 * stored:
        raise ValueError(f"{cfg_path} describes a model of {needed:,} weights (vocab_size={cfg.vocab_size}, "
                         f"hidden_size={h}, intermediate_size={cfg.intermediate_size}, num_hidden_layers="
                         f"{cfg.num_layers}, num_attention_heads={cfg.num_heads}, num_key_value_heads="
                         f"{cfg.num_kv_heads}, head_dim={cfg.head_dim}), but the checkpoint's safetensors "
                         f"files hold only {stored:,} bytes: config.json does not match the checkpoint")


def _from_hf_model(hf_model, dtype, device, quantization) -> LoadedModel:
    """A transformers model object, or a PEFT LoRA model around one (its adapters merged: loader/peft.py)."""
    cfg_dict = hf_model.config.to_dict()
    cfg = ModelConfig.from_hf(cfg_dict)
    if quantization not in (None, "int4", "fp8"):
        raise ValueError(f"a transformers model object loads with quantization=None, 'int4' or 'fp8', "
                         f"got {quantization!r}")
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
        dtype = cfg.dtype if dtype == torch.float8_e4m3fn else dtype
    if device is None:
        device = next(hf_model.parameters()).device
    kind = _dense_kind(cfg, quantization)
    from .peft import is_peft_model, merged_state_dict, refuse_unmergeable
    refuse_unmergeable(hf_model)
    weights = merged_state_dict(hf_model) if is_peft_model(hf_model) else hf_model.state_dict()
    model = _build(cfg, dtype, device, weights.items(), kind)
    gen = getattr(hf_model, "generation_config", None)
    return LoadedModel(model, None, gen.to_dict() if gen is not None else {})


def _from_gguf(path: Path, dtype, device, quantization) -> LoadedModel:
    device = device or _default_device("fp8" if quantization == "fp8" else None)
    target = parse_dtype(dtype) if dtype is not None else _default_dtype(device)
    if quantization in ("gptq", "awq"):
        raise ValueError(f"{path} is a GGUF file; quantization={quantization!r} needs a {quantization} checkpoint directory")
    if quantization == "gguf":
        from ..quant.gguf import read_gguf_int4
        cfg_dict, weights, tokenizer, quant = read_gguf_int4(path, target, validate=ModelConfig.from_hf, stream=True)
    else:
        from .gguf import read_gguf
        cfg_dict, weights, tokenizer = read_gguf(path, target, validate=ModelConfig.from_hf, stream=True)
        quant = None
    cfg = ModelConfig.from_hf(cfg_dict)
    if quant is None:
        quant = _dense_kind(cfg, quantization)
    model = _build(cfg, target, device, weights, quant)  # tensors dequantized one at a time as they are copied
    return LoadedModel(model, tokenizer, {"eos_token_id": cfg.eos_token_id})


def _tokenizer_from_dir(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (ImportError, OSError):  # a missing optional library (sentencepiece, ...) or file says so itself
        raise
    except Exception as e:  # a corrupt tokenizer.json / tokenizer_config.json: JSONDecodeError, KeyError, ...
        raise ValueError(f"{path}: cannot load the tokenizer (tokenizer.json / tokenizer_config.json / "
                         f"tokenizer.model): {type(e).__name__}: {e}") from None
