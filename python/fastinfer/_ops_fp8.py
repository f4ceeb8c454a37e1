"""Validating wrappers of the FP8 (float8_e4m3fn) ops; re-exported by ``fastinfer.ops``.

Format (csrc/include/fastinfer/fp8.h): x ~= float(q) * scale with q = e4m3(clamp(x / scale, +-448)),
rounded to nearest even; a dynamic scale is max(amax / 448, FP8_MIN_SCALE). Activations are
quantized per token (one scale per row) or per tensor, weights per output channel.
"""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, FP8, _check, _check_float, _check_shape, _fail, _ops, _shares_memory

FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)
# The GEMM reads rows of a and b with TMA, whose global strides must be multiples of 16 bytes.
FP8_K_ALIGN = 16
FP8_OP_NAMES = ("fp8_quantize_per_token", "fp8_quantize_per_tensor", "fp8_scaled_mm", "reshape_and_cache_fp8",
                "paged_prefill_attention_fp8", "paged_decode_attention_fp8", "rms_norm_quant_fp8",
                "silu_and_mul_quant_fp8")


def _check_fp8_out(op: str, out, input: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(input.shape, dtype=FP8, device=input.device)
    _check(op, "out", out, ndim=2, dtype=FP8, device=input.device, contiguous=True)
    _check_shape(op, "out", out, input.shape)
    return out


def fp8_quantize_per_token(input: torch.Tensor, out: torch.Tensor | None = None,
                           scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input [M, K] float -> (e4m3 [M, K], fp32 scales [M]), one dynamic scale per row.

    Also quantizes a weight [N, K] per output channel (a row of the weight is one channel).
    """
    op = "fp8_quantize_per_token"
    _check_float(op, "input", input, ndim=2)
    out = _check_fp8_out(op, out, input)
    if scales is None:
        scales = torch.empty(input.shape[0], dtype=torch.float32, device=input.device)
    _check(op, "scales", scales, ndim=1, dtype=torch.float32, device=input.device, contiguous=True)
    _check_shape(op, "scales", scales, (input.shape[0],))
    _ops.fp8_quantize_per_token(out, scales, input)
    return out, scales


def _fp8_outputs(op: str, input: torch.Tensor, cols: int, out, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 [rows, cols] and fp32 [rows] outputs of the fused producers, made or checked."""
    rows = input.shape[0]
    if out is None:
        out = torch.empty(rows, cols, dtype=FP8, device=input.device)
    _check(op, "out", out, ndim=2, dtype=FP8, device=input.device, contiguous=True)
    _check_shape(op, "out", out, (rows, cols))
    if scales is None:
        scales = torch.empty(rows, dtype=torch.float32, device=input.device)
    _check(op, "scales", scales, ndim=1, dtype=torch.float32, device=input.device, contiguous=True)
    _check_shape(op, "scales", scales, (rows,))
    return out, scales


def rms_norm_quant_fp8(input: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       out: torch.Tensor | None = None,
                       scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_quantize_per_token(rms_norm(input, weight, eps)) in one kernel; with residual, the add of
    fused_add_rms_norm first (residual += input, in place) and the norm of the new residual, input left
    as it is. The 16-bit normalized rows are not kept: (e4m3 [T, hidden], fp32 scales [T]), bit for
    bit what the two ops give. The q/k/v and gate / up inputs of an FP8 layer."""
    op = "rms_norm_quant_fp8"
    _check_float(op, "input", input, ndim=2)
    if input.shape[1] == 0:
        _fail(op, "input must have at least one column (hidden)")
    _check(op, "weight", weight, ndim=1, dtype=input.dtype, device=input.device, contiguous=True)
    _check_shape(op, "weight", weight, (input.shape[1],))
    if residual is not None:
        _check_float(op, "residual", residual, like=input, ndim=2)
        _check_shape(op, "residual", residual, input.shape)
        if _shares_memory(residual, input, weight):
            _fail(op, "residual must not share memory with input or weight")
    out, scales = _fp8_outputs(op, input, input.shape[1], out, scales)
    if _shares_memory(scales, input, residual, weight, out):
        _fail(op, "scales must not share memory with input, residual, weight or out")
    if _shares_memory(out, input, residual, weight):
        _fail(op, "out must not share memory with input, residual or weight")
    _ops.rms_norm_quant_fp8(out, scales, input, residual, weight, float(eps))
    return out, scales


def silu_and_mul_quant_fp8(input: torch.Tensor, out: torch.Tensor | None = None,
                           scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_quantize_per_token(silu_and_mul(input)) in one kernel, input [T, 2 d] ([gate | up]):
    (e4m3 [T, d], fp32 scales [T]), bit for bit the two ops'. The down projection's input of an FP8 layer."""
    op = "silu_and_mul_quant_fp8"
    _check_float(op, "input", input, ndim=2)
    if input.shape[1] % 2 or input.shape[1] == 0:
        _fail(op, f"input's last dimension must be even and positive ([gate | up]), got {input.shape[1]}")
    out, scales = _fp8_outputs(op, input, input.shape[1] // 2, out, scales)
    if _shares_memory(scales, input, out):
        _fail(op, "scales must not share memory with input or out")
    if _shares_memory(out, input):
        _fail(op, "out must not share memory with input")
    _ops.silu_and_mul_quant_fp8(out, scales, input)
    return out, scales


def fp8_quantize_per_tensor(input: torch.Tensor, scale: torch.Tensor | None = None,
                            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input [M, K] float -> (e4m3 [M, K], fp32 scale [1]).

    scale None: dynamic, computed from the whole tensor's amax. Otherwise static: the given fp32 [1].
    """
    op = "fp8_quantize_per_tensor"
    _check_float(op, "input", input, ndim=2)
    out = _check_fp8_out(op, out, input)
    dynamic = scale is None
    if dynamic:
        scale = torch.empty(1, dtype=torch.float32, device=input.device)
    _check(op, "scale", scale, ndim=1, dtype=torch.float32, device=input.device, contiguous=True)
    _check_shape(op, "scale", scale, (1,))
    _ops.fp8_quantize_per_tensor(out, scale, input, dynamic)
    return out, scale


def _check_scale(op: str, name: str, scale, rows: int, what: str, device) -> None:
    _check(op, name, scale, ndim=1, dtype=torch.float32, device=device, contiguous=True)
    if scale.shape[0] not in (1, rows):
        _fail(op, f"{name} must have 1 (per tensor) or {rows} (per {what}) entries, got {scale.shape[0]}")


def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out[m, n] = (a[m] . b[n]) * scale_a[m] * scale_b[n] + bias[n], fp32 accumulation.

    a: e4m3 [M, K] (activations), b: e4m3 [N, K] (weight, as F.linear takes it), both contiguous,
    K a multiple of 16. scale_a: fp32 [1] or [M] (per token); scale_b: fp32 [1] or [N] (per channel).
    out: [M, N] in out_dtype (bf16 or fp16 on CUDA, which needs a Hopper GPU; also fp32 on CPU).
    """
    op = "fp8_scaled_mm"
    _check(op, "a", a, ndim=2, dtype=FP8, contiguous=True)
    _check(op, "b", b, ndim=2, dtype=FP8, device=a.device, contiguous=True)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        _fail(op, f"b must be [N, K={k}] (K matching a), got {tuple(b.shape)}")
    if k % FP8_K_ALIGN or k == 0:
        _fail(op, f"a and b need K (their last dimension) to be a positive multiple of {FP8_K_ALIGN}, got {k}")
    _check_scale(op, "scale_a", scale_a, m, "token", a.device)
    _check_scale(op, "scale_b", scale_b, n, "output channel", a.device)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    _check(op, "out", out, ndim=2, dtype=FLOAT_DTYPES, device=a.device)
    _check_shape(op, "out", out, (m, n))
    if a.device.type == "cuda":
        if out.dtype == torch.float32:
            _fail(op, "out must be bfloat16 or float16 on CUDA, got torch.float32")
        for name, t in (("a", a), ("b", b)):
            if t.data_ptr() % 16:
                _fail(op, f"{name} must start at a 16-byte aligned address on CUDA (TMA)")
    if bias is not None:
        _check(op, "bias", bias, ndim=1, dtype=out.dtype, device=a.device, contiguous=True)
        _check_shape(op, "bias", bias, (n,))
    # the CUDA kernel reads its inputs through the read-only cache: out must not overlap any of them
    if _shares_memory(out, a, b, scale_a, scale_b, bias):
        _fail(op, "out must not share memory with a, b, scale_a, scale_b or bias")
    _ops.fp8_scaled_mm(out, a, b, scale_a, scale_b, bias)
    return out


def fp8_linear(input: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with an FP8 weight: input [T, K] float is quantized per token (or with the static
    per-tensor input_scale, fp32 [1]), then multiplied by weight e4m3 [N, K] with weight_scale fp32
    [N] (or [1]). Returns [T, N] in input's dtype."""
    if input_scale is None:
        q, scale = fp8_quantize_per_token(input)
    else:
        q, scale = fp8_quantize_per_tensor(input, input_scale)
    return fp8_scaled_mm(q, weight, scale, weight_scale, bias, out_dtype=input.dtype)
