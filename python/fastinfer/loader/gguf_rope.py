"""Rope scaling of GGUF files as an HF config's rope_scaling: llama.cpp's scaling keys (linear, yarn), Llama 3.1+'s
per-frequency divisors (rope_freqs, checked against the llama3 formula), Phi-3's LongRoPE factor tensors."""
from __future__ import annotations

import math

import torch

from .gguf_file import GGUFFile, dequantize, float32_value

# Llama 3.1+ GGUFs store their rope scaling as per-frequency divisors in this tensor; these are the
# llama3 parameters every Llama 3.x checkpoint uses, checked against the tensor before use.
ROPE_FREQS = "rope_freqs.weight"
LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")  # Phi-3's, long first
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_scaling(file: GGUFFile, head_dim: int, arch: str = "llama", rope_dims: int | None = None) -> dict | None:
    meta, path = file.metadata, file.path
    if any(name in file.tensors for name in LONGROPE):
        if arch != "phi3":
            raise ValueError(f"{path}: LongRoPE factors ({', '.join(LONGROPE)}) in a {arch!r} GGUF are not supported")
        return _longrope_scaling(file, rope_dims or head_dim)
    kind = meta.get(f"{arch}.rope.scaling.type", "linear" if f"{arch}.rope.scale_linear" in meta else "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0))
    if ROPE_FREQS in file.tensors:
        if arch != "llama":
            raise ValueError(f"{path}: {ROPE_FREQS} in a {arch!r} GGUF is not supported")
        if kind != "none":
            raise ValueError(f"{path}: both {ROPE_FREQS} and rope scaling type {kind!r}")
        return _llama3_rope_scaling(file, head_dim)
    if kind == "none":
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < math.inf:
        raise ValueError(f"{path}: {arch}.rope.scaling.factor must be a positive number, got {factor!r}")
    factor = factor or 1.0  # llama.cpp reads a factor of 0 as "not set"
    if kind == "linear" and factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float32_value(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float32_value(factor)}
        for gguf_key, hf_key in (("original_context_length", "original_max_position_embeddings"),
                                 ("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                 ("yarn_beta_slow", "beta_slow")):
            if f"{arch}.rope.scaling.{gguf_key}" in meta:
                value = meta[f"{arch}.rope.scaling.{gguf_key}"]
                scaling[hf_key] = float32_value(value) if isinstance(value, float) else value
        return scaling
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")


def _longrope_scaling(file: GGUFFile, rope_dims: int) -> dict:
    """Phi-3's LongRoPE: the per-frequency long / short factors the converter stored as tensors (HF reads them
    as float32 too, so nothing is lost), the original context length, and llama.cpp's attention factor, kept
    only where it differs from the one HF derives from the two lengths."""
    meta, path = file.metadata, file.path
    factors = {}
    for name in LONGROPE:
        tensor = file.tensors.get(name)
        if tensor is None or list(tensor.shape) != [rope_dims // 2]:
            raise ValueError(f"{path}: LongRoPE needs {' and '.join(LONGROPE)} of shape [{rope_dims // 2}] "
                             f"(rope dimensions / 2), got {None if tensor is None else list(tensor.shape)} for {name}")
        factors[name] = [float32_value(v) for v in dequantize(tensor).tolist()]
    original = meta.get("phi3.rope.scaling.original_context_length")
    length = meta.get("phi3.context_length")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (original, length)):
        raise ValueError(f"{path}: LongRoPE needs positive integers phi3.context_length and "
                         f"phi3.rope.scaling.original_context_length, got {length!r} and {original!r}")
    scaling = {"rope_type": "longrope", "long_factor": factors[LONGROPE[0]],
               "short_factor": factors[LONGROPE[1]], "original_max_position_embeddings": original}
    stored = meta.get("phi3.rope.scaling.attn_factor")
    scale = length / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and abs(stored - derived) > 1e-6 * derived:
        scaling["attention_factor"] = float32_value(stored)
    return scaling


def _llama3_rope_scaling(file: GGUFFile, head_dim: int) -> dict:
    """Recover HF's llama3 rope_scaling from the divisors the converter wrote, or refuse."""
    theta = float(file.metadata.get("llama.rope.freq_base", 10000.0))
    tensor = file.tensors[ROPE_FREQS]
    if list(tensor.shape) != [head_dim // 2]:  # checked before head_dim sizes anything below
        raise ValueError(f"{file.path}: {ROPE_FREQS} has shape {list(tensor.shape)}, expected [{head_dim // 2}] "
                         f"(head_dim {head_dim} / 2)")
    stored = dequantize(tensor).double()  # [head_dim / 2]
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), **_LLAMA3_ROPE}
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                               "high_freq_factor"))
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    expected = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-3):
        raise ValueError(f"{file.path}: {ROPE_FREQS} does not match llama3 rope scaling with "
                         f"{_LLAMA3_ROPE}; custom per-frequency rope factors are not supported")
    return {k: float32_value(v) if isinstance(v, float) else v for k, v in scaling.items()}
