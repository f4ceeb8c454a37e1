"""Linear layers of the model: a plain weight (torch GEMM, cuBLAS on GPU) or an FP8 weight.

FP8 (quantization="fp8"): weight e4m3 [out, in] with one fp32 scale per output channel; the
activations are quantized per token on the fly and multiplied by fastinfer's scaled FP8 GEMM
(fastinfer.ops.fp8_linear). A fused matrix (q/k/v, gate/up) is one Linear; each checkpoint tensor
fills a row range of it (`rows`), and per-channel scales make that range self-contained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ops as ops
from .._checks import FP8


@dataclass
class LinearRows:
    """Rows [start, stop) of a Linear: what one checkpoint tensor (e.g. k_proj in qkv) fills."""
    weight: torch.Tensor               # [rows, in]: model dtype, or e4m3
    weight_scale: torch.Tensor | None  # fp32 [rows] for an FP8 layer, else None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale is not None


class Linear:
    """y = x @ weight.T (+ bias), x: [num_tokens, in_features]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 bias: bool = False, fp8: bool = False):
        self.weight = torch.empty(out_features, in_features, dtype=FP8 if fp8 else dtype, device=device)
        self.weight_scale = torch.empty(out_features, dtype=torch.float32, device=device) if fp8 else None
        self.bias = torch.empty(out_features, dtype=dtype, device=device) if bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def rows(self, start: int = 0, stop: int | None = None) -> LinearRows:
        stop = self.weight.shape[0] if stop is None else stop
        scale = None if self.weight_scale is None else self.weight_scale[start:stop]
        return LinearRows(self.weight[start:stop], scale)
