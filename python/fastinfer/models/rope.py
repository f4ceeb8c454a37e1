"""Rotary cos/sin cache. Rope scaling (linear, Llama-3, YaRN, LongRoPE) only changes inv_freq (and, for YaRN
and LongRoPE, scales cos / sin by an attention factor, as HF does), never the kernel.

LongRoPE has two sets of frequencies: HF rotates a forward whose sequence is longer than
original_max_position_embeddings (L0) with the long factors, any other with the short ones. Its table
holds both: rows 0 .. L0 - 1 the short set at positions 0 .. L0 - 1, rows L0 + p the long set at position p;
metadata.rope_rows picks each token's row."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, as HF transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif rope_type == "yarn":
        inv_freq = _yarn(head_dim, theta, scaling)
    elif rope_type == "longrope":
        inv_freq = _longrope(head_dim, theta, scaling, long=False)
    elif rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r}")
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn(head_dim: int, theta: float, s: dict) -> torch.Tensor:
    """YaRN (HF's _compute_yarn_parameters): each frequency a blend of the original (extrapolation) and
    divided by factor (interpolation), by a linear ramp over the dimensions between the correction range
    of beta_fast / beta_slow rotations in the original context."""
    factor, old_len = float(s["factor"]), s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # HF: no singular ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _longrope(head_dim: int, theta: float, s: dict, long: bool) -> torch.Tensor:
    """HF's _compute_longrope_parameters: the default frequencies divided by a per-frequency factor, the long
    or the short list."""
    factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (factors * theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def attention_scaling(scaling: dict | None) -> float:
    """The factor HF multiplies cos and sin by: YaRN's attention factor (given, or from factor, mscale and
    mscale_all_dim as HF infers it), LongRoPE's (given, or sqrt(1 + ln(factor) / ln(L0)) for a factor above 1),
    1 otherwise."""
    rope_type = (scaling or {}).get("rope_type")
    if rope_type not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if rope_type == "longrope":
        factor, old_len = float(scaling["factor"]), scaling["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
    factor, mscale, mscale_all_dim = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def cos_sin_cache(head_dim: int, max_position: int, theta: float, scaling: dict | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 [max_position, head_dim]: row p = [cos(p * inv_freq) | sin(p * inv_freq)] (times YaRN's or
    LongRoPE's attention factor). LongRoPE: [L0 + max_position, head_dim], the short set's L0 rows, then the
    long set's max_position (the module docstring)."""
    scale = attention_scaling(scaling)

    def table(inv_freq: torch.Tensor, rows: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return torch.cat([cos, sin], dim=-1)
    if (scaling or {}).get("rope_type") == "longrope":
        short = table(_longrope(head_dim, theta, scaling, long=False), scaling["original_max_position_embeddings"])
        return torch.cat([short, table(_longrope(head_dim, theta, scaling, long=True), max_position)]).to(device)
    return table(inv_frequencies(head_dim, theta, scaling), max_position).to(device)
