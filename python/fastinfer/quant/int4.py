"""4-bit weights: the logical form, the packed layout the W4A16 kernels read, and round-to-nearest.

A 4-bit weight W [N, K] (HF orientation: out_features x in_features) is held two ways:

- ``QuantizedWeight``: logical, easy to build and check. ``codes`` uint8 [N, K] in 0..15 and
  per-group parameters [N, K / group_size]; exactly one of three dequantization modes:
      symmetric   w = (q - 8) * s                 (GPTQ sym, GGUF Q4_0)
      zeros       w = (q - z) * s, z in 0..15     (AWQ, GPTQ asym)
      mins        w = q * s + m                   (GGUF Q4_1)
- ``PackedInt4``: what ``fastinfer.ops.int4_linear`` reads. ``pack`` / ``unpack`` below are the
  source of truth for it; csrc/include/fastinfer/gemm/w4a16.h draws the same layout and says why
  it is shaped for the mma.m16n8k16 B fragments.

Packed layout (S = N / 64 column strips, T = K / 16 k-steps, lane L = 4 g + c, g = L // 4 in 0..7,
c = L % 4):
    qweight int32 [S, 8 K] = [S][T][32 lanes][4 words]; word i of lane L at (s, t) holds 8 nibbles,
    nibble p = 4 hi + 2 h + r (bits 4p..4p+3) is q[n, k] with
        n = 64 s + 8 (2 i + h) + g,    k = 16 t + 8 r + 2 c + hi.
    scales / zeros / mins [K / group_size, N]: row = group, and inside every 64-column block the
    8 x 8 transpose: position 8 g + j holds column 8 j + g (a lane's 8 scales are contiguous).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)
TILE_N = 64   # columns per strip: one 16-byte load per lane covers k16 x n64
TILE_K = 64   # K must be a multiple of this (one pipeline stage of the CUDA kernel)
SYMMETRIC_ZERO = 8
MAX_CODE = 15
MODES = ("symmetric", "zeros", "mins")


@dataclass(frozen=True)
class QuantizedWeight:
    """Logical 4-bit weight [N, K]: codes uint8 [N, K], scales / zeros / mins [N, K / group_size]."""
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    zeros: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.zeros is not None and self.mins is not None:
            raise ValueError("a QuantizedWeight has zeros or mins, not both")
        check_shape(self.codes.shape[0], self.codes.shape[1], self.group_size)
        groups = (self.codes.shape[0], self.codes.shape[1] // self.group_size)
        for name in ("scales", "zeros", "mins"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != groups:
                raise ValueError(f"QuantizedWeight.{name} must have shape {groups}, got {tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def mode(self) -> str:
        return "zeros" if self.zeros is not None else "mins" if self.mins is not None else "symmetric"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] computed in fp32 (the definition the kernels are tested against), then cast."""
        q = self.codes.float()
        expand = lambda t: t.float().repeat_interleave(self.group_size, dim=1)  # noqa: E731
        if self.mins is not None:
            w = q * expand(self.scales) + expand(self.mins)
        else:
            zero = expand(self.zeros) if self.zeros is not None else SYMMETRIC_ZERO
            w = (q - zero) * expand(self.scales)
        return w.to(dtype)

    def with_mode(self, mode: str) -> "QuantizedWeight":
        """The same weight in another mode: symmetric -> zeros (z = 8) or mins (m = -8 s): both
        parameters are exact in any float format; zeros -> mins (m = -z s) rounds m."""
        if mode == self.mode:
            return self
        if mode == "zeros" and self.mode == "symmetric":
            return QuantizedWeight(self.codes, self.scales, self.group_size,
                                   zeros=torch.full_like(self.scales, SYMMETRIC_ZERO))
        if mode == "mins" and self.mode in ("symmetric", "zeros"):
            zero = self.zeros if self.zeros is not None else SYMMETRIC_ZERO
            return QuantizedWeight(self.codes, self.scales, self.group_size, mins=-zero * self.scales)
        raise ValueError(f"cannot express a {self.mode} 4-bit weight in {mode} mode")

    def to(self, dtype: torch.dtype) -> "QuantizedWeight":
        """Scales / zeros / mins in `dtype` (codes unchanged)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return QuantizedWeight(self.codes, self.scales.to(dtype), self.group_size, cast(self.zeros),
                               cast(self.mins))

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return QuantizedWeight(self.codes[start:stop], self.scales[start:stop], self.group_size,
                               cut(self.zeros), cut(self.mins))


@dataclass(frozen=True)
class PackedInt4:
    """The kernel layout: qweight int32 [N / 64, 8 K]; scales, zeros, mins [K / group_size, N]."""
    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    zeros: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0] * TILE_N, self.qweight.shape[1] // 8


def check_shape(n: int, k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if n <= 0 or n % TILE_N:
        raise ValueError(f"the packed 4-bit layout needs out_features (N) a positive multiple of {TILE_N}, got {n}")
    if k <= 0 or k % TILE_K or k % group_size:
        raise ValueError(f"the packed 4-bit layout needs in_features (K) a positive multiple of {TILE_K} "
                         f"and of group_size={group_size}, got {k}")


# ---- the layout -----------------------------------------------------------------------------------

def _codes_to_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] -> int32 [N / 64, 8 K] (see the module docstring for the index formulas)."""
    n, k = codes.shape
    # codes[n, k] with n = 64 s + 8 (2 i + h) + g and k = 16 t + 8 r + 2 c + hi
    x = codes.reshape(n // 64, 4, 2, 8, k // 16, 2, 4, 2)  # s i h g t r c hi
    x = x.permute(0, 4, 3, 6, 1, 7, 2, 5)                  # s t g c i hi h r
    x = x.reshape(n // 64, k // 16, 32, 4, 8)              # s t L i p   (one uint8 copy)
    nibble_pairs = (x[..., 0::2] | (x[..., 1::2] << 4)).contiguous()  # byte b = nibbles 2b, 2b + 1
    return nibble_pairs.view(torch.int32).reshape(n // 64, 8 * k)  # little-endian bytes = the word


def _words_to_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of _codes_to_words."""
    strips, k8 = qweight.shape
    k = k8 // 8
    words = qweight.to(torch.int64).reshape(strips, k // 16, 8, 4, 4) & 0xFFFFFFFF  # s t g c i
    nibbles = (words[..., None] >> (4 * torch.arange(8, dtype=torch.int64))) & 0xF  # s t g c i p
    x = nibbles.reshape(strips, k // 16, 8, 4, 4, 2, 2, 2)                           # s t g c i hi h r
    x = x.permute(0, 4, 6, 2, 1, 7, 3, 5)                                            # s i h g t r c hi
    return x.reshape(strips * 64, k).to(torch.uint8)


def permute_group_params(t: torch.Tensor) -> torch.Tensor:
    """[N, G] logical -> [G, N] packed: 8 x 8 transpose inside each 64-column block. The packed
    -> logical direction is the same function's inverse, `unpermute_group_params`."""
    n, groups = t.shape
    return t.t().reshape(groups, n // 64, 8, 8).transpose(2, 3).reshape(groups, n).contiguous()


def unpermute_group_params(t: torch.Tensor) -> torch.Tensor:
    groups, n = t.shape
    return t.reshape(groups, n // 64, 8, 8).transpose(2, 3).reshape(groups, n).t().contiguous()


def pack(weight: QuantizedWeight) -> PackedInt4:
    """Logical -> kernel layout (on the codes' device; no float weights are ever formed)."""
    n, k = weight.shape
    check_shape(n, k, weight.group_size)
    opt = lambda t: None if t is None else permute_group_params(t)  # noqa: E731
    return PackedInt4(_codes_to_words(weight.codes), permute_group_params(weight.scales), weight.group_size,
                      opt(weight.zeros), opt(weight.mins))


def unpack(packed: PackedInt4) -> QuantizedWeight:
    opt = lambda t: None if t is None else unpermute_group_params(t)  # noqa: E731
    return QuantizedWeight(_words_to_codes(packed.qweight), unpermute_group_params(packed.scales),
                           packed.group_size, opt(packed.zeros), opt(packed.mins))


# ---- round-to-nearest -----------------------------------------------------------------------------

def group_params(w: torch.Tensor, mode: str, scale_dtype: torch.dtype):
    """(scales, zeros or None, mins or None) [...] of the groups w [..., group_size] (fp32).
    symmetric: s = max|w| / 7 (q = round(w / s) + 8 is never clipped); zeros (asymmetric, GPTQ's
    convention): the range is widened to include 0, s = (max - min) / 15, z = round(-min / s);
    mins (Q4_1's): s = (max - min) / 15, m = min."""
    lo, hi = w.amin(-1), w.amax(-1)
    # Divisors as tensors: torch's CUDA tensor / Python scalar multiplies by the reciprocal, which can
    # round differently from the CPU's division (a GPU-quantized checkpoint must equal the CPU's).
    if mode == "symmetric":
        return (torch.maximum(lo.abs(), hi.abs()) / torch.full_like(hi, 7.0)).to(scale_dtype), None, None
    if mode == "zeros":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scales = ((hi - lo) / torch.full_like(hi, float(MAX_CODE))).to(scale_dtype)
    if mode == "zeros":
        return scales, torch.round(-lo / _nonzero(scales)).clamp(0, MAX_CODE).to(scale_dtype), None
    return scales, None, lo.to(scale_dtype)


def quantize_values(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                    mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 codes in 0..15 of w [..., c] under one set of parameters [...] per row."""
    s = _nonzero(scales)[..., None]
    if mins is not None:
        q = torch.round((w - mins.float()[..., None]) / s)
    else:
        q = torch.round(w / s) + (zeros.float()[..., None] if zeros is not None else SYMMETRIC_ZERO)
    return q.clamp(0, MAX_CODE)


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, mode: str = "zeros",
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest 4-bit quantization of W [N, K], one parameter set per `group_size` inputs
    (see group_params for the three modes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_shape(n, k, group_size)
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype != torch.float64 else torch.float32)
    w = weight.float().reshape(n, k // group_size, group_size)
    scales, zeros, mins = group_params(w, mode, scale_dtype)
    codes = quantize_values(w, scales, zeros, mins).to(torch.uint8).reshape(n, k)
    return QuantizedWeight(codes, scales, group_size, zeros, mins)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales with all-equal groups (s = 0) divided by 1 instead (their codes come out exact)."""
    s = scales.float()
    return torch.where(s == 0, torch.ones_like(s), s)
