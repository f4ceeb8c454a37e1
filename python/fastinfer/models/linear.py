"""Linear layers of the model, and the one place that decides each projection's kind.

A projection is one of three kinds, picked by ``make_linear`` from the model's quantization:
  dense   (None)          weight [out, in] in the model dtype; torch GEMM (cuBLAS on GPU), except
                          decode-sized inputs on CUDA (``use_dense_gemv``): fastinfer.ops.dense_gemv,
                          built to stream the weight at the memory's rate (cuBLAS reaches ~2/3
                          of it at M = 1 on an H200); the gate / up projection's SwiGLU then
                          runs in that kernel's epilogue (Linear.silu_mul: ops.dense_gemv_silu_mul).
  FP8     ("fp8")         weight e4m3 [out, in] with one fp32 scale per output channel; the
                          activations are quantized per token on the fly and multiplied by
                          fastinfer's scaled FP8 GEMM (fastinfer.ops.fp8_linear).
  4-bit   (a QuantConfig) quant.linear.Int4Linear: the packed 4-bit layout of the fused W4A16 GEMM
                          (fastinfer.ops.int4_linear); int4 / gptq / awq / gguf.
A fused matrix (q/k/v, gate/up) is one layer; each checkpoint tensor fills a row range of it
(``rows``): a LinearRows (dense / FP8: per-channel scales make the range self-contained) or an
Int4Rows (packed as it is copied, in strips of 64 rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ops as ops
from .._checks import FP8
from ..quant.linear import METHODS, Int4Linear, QuantConfig

QUANTIZATIONS = (None,) + METHODS + ("fp8",)


@dataclass
class LinearRows:
    """Rows [start, stop) of a Linear: what one checkpoint tensor (e.g. k_proj in qkv) fills."""
    weight: torch.Tensor               # [rows, in]: model dtype, or e4m3
    weight_scale: torch.Tensor | None  # fp32 [rows] for an FP8 layer, else None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


class Linear:
    """y = x @ weight.T (+ bias), x: [num_tokens, in_features]; a dense or an FP8 weight."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 bias: bool = False, fp8: bool = False):
        self.weight = torch.empty(out_features, in_features, dtype=FP8 if fp8 else dtype, device=device)
        self.weight_scale = torch.empty(out_features, dtype=torch.float32, device=device) if fp8 else None
        self.bias = torch.empty(out_features, dtype=dtype, device=device) if bias else None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return dense_linear(x, self.weight, self.bias)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def fp8_mm(self, q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """An FP8 layer on an input already quantized per token (q e4m3, fp32 scales [T]): what
        self(x) computes after its own fp8_quantize_per_token."""
        return ops.fp8_scaled_mm(q, self.weight, scales, self.weight_scale, self.bias, out_dtype=out_dtype)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(self(x)) for a fused [gate; up] projection. A dense, bias-free layer whose
        x takes the decode GEMV (use_dense_gemv) runs it with the SwiGLU in the GEMV's epilogue
        (ops.dense_gemv_silu_mul, bit for bit the same result); anything else runs the two ops."""
        if self.weight_scale is None and self.bias is None and self.out_features % 16 == 0 and x.dim() == 2 \
                and self.weight.dtype == x.dtype and use_dense_gemv(x.device, x.shape[0], x.shape[1], x.dtype):
            return ops.dense_gemv_silu_mul(x, self.weight)
        return ops.silu_and_mul(self(x))

    def rows(self, start: int = 0, stop: int | None = None) -> LinearRows:
        stop = self.weight.shape[0] if stop is None else stop
        scale = None if self.weight_scale is None else self.weight_scale[start:stop]
        return LinearRows(self.weight[start:stop], scale)


def stacked_fp8_linears(count: int, in_features: int, out_features: int,
                        device: torch.device) -> tuple[list[Linear], torch.Tensor, torch.Tensor]:
    """count bias-free FP8 layers whose weights and scales are views of stacked ones (a MoE layer's experts,
    which ops.moe_gemv reads whole): (layers, e4m3 [count, out, in], fp32 scales [count, out])."""
    weight = torch.empty(count, out_features, in_features, dtype=FP8, device=device)
    scale = torch.empty(count, out_features, dtype=torch.float32, device=device)
    layers = []
    for i in range(count):
        layer = Linear.__new__(Linear)
        layer.weight, layer.weight_scale, layer.bias = weight[i], scale[i], None
        layers.append(layer)
    return layers, weight, scale


GEMV_DTYPES = (torch.float16, torch.bfloat16)


# FASTINFER_DENSE_GEMV=0 sends every dense projection to F.linear (cuBLAS): a switch to tell a
# GEMV problem from anything else on a GPU.
DENSE_GEMV_ENABLED = os.environ.get("FASTINFER_DENSE_GEMV", "1") != "0"
# Steps of at most this many tokens take the decode GEMV (the kernel takes up to ops.GEMV_MAX_M = 32).
# On an H200 (bench/results/2026-11-28-h200-visit1, bench_gemv, Llama-3-8B shapes) it beat cuBLAS by
# 5-16% on qkv / o / down up to M = 8 and tied on gate_up; at M = 16 gate_up took 76 us against
# cuBLAS's 68, at M = 32 97 against 70 (batch-32 decode steps took longer than batch-128 ones).
DENSE_GEMV_MAX_TOKENS = 8


def use_dense_gemv(device: torch.device, num_tokens: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether a dense projection of x [num_tokens, in_features] runs fastinfer's decode GEMV: on
    CUDA, for 1..DENSE_GEMV_MAX_TOKENS (8) tokens, 16-byte rows (in_features % 8 == 0) and a 16-bit
    dtype. Everything else (prefill, larger batches, the CPU, fp32) takes F.linear."""
    return (DENSE_GEMV_ENABLED and device.type == "cuda" and 1 <= num_tokens <= DENSE_GEMV_MAX_TOKENS
            and in_features % 8 == 0 and dtype in GEMV_DTYPES)


def gate_up_silu_mul(gate_up, x: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(gate_up(x)) for a model's fused [gate; up] projection of any kind (or a stand-in
    such as GPTQ's input recorder): a dense Linear may fuse it (Linear.silu_mul), the rest run the two ops."""
    return gate_up.silu_mul(x) if isinstance(gate_up, Linear) else ops.silu_and_mul(gate_up(x))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, in] @ weight [out, in]^T (+ bias): dense_gemv where use_dense_gemv says so, else F.linear."""
    if x.dim() == 2 and weight.dtype == x.dtype and use_dense_gemv(x.device, x.shape[0], x.shape[1], x.dtype):
        return ops.dense_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_kind(quantization: str | QuantConfig | None) -> str | QuantConfig | None:
    """None (dense), "fp8" or a QuantConfig (4-bit) from a model's quantization argument."""
    if quantization is None or quantization == "fp8" or isinstance(quantization, QuantConfig):
        return quantization
    if quantization in METHODS:
        raise ValueError(f"quantization={quantization!r} needs a QuantConfig (group size and mode): load the model "
                         f"with fastinfer.load_model(..., quantization={quantization!r}) or pass a QuantConfig")
    raise ValueError(f"quantization must be one of {QUANTIZATIONS} or a QuantConfig, got {quantization!r}")


def make_linear(in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                kind: str | QuantConfig | None, bias: bool = False) -> Linear | Int4Linear:
    """The projection of the given kind (see linear_kind)."""
    if isinstance(kind, QuantConfig):
        return Int4Linear(out_features, in_features, kind, dtype, device, bias=bias)
    return Linear(in_features, out_features, dtype, device, bias=bias, fp8=linear_kind(kind) == "fp8")
