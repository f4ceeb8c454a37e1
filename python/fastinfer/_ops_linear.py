"""Validating wrappers of the linear-layer kernels; re-exported by ``fastinfer.ops``.

int4_linear: the fused W4A16 GEMM over fastinfer.quant.int4's packed layout. dense_gemv and
dense_gemv_silu_mul: decode-sized (M <= 32) dense projections that stream the weight
(csrc/include/fastinfer/gemm/gemv.cuh). Errors name the offending argument, as in _ops.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (FP8, _check, _check_float, _check_kv_cache, _check_positions_in, _check_shape,
                      _check_slots_in, _fail, _ops, _shares_memory)


# ---- 4-bit weight-only linear --------------------------------------------------------------------

INT4_GROUP_SIZES = (32, 64, 128)


def _check_aligned_rows(op: str, name: str, t: torch.Tensor) -> None:
    """The CUDA kernel moves rows in 16-byte pieces."""
    if t.device.type == "cuda" and (t.stride(0) % 8 or t.data_ptr() % 16):
        _fail(op, f"{name} rows must start on 16-byte boundaries on CUDA (row stride a multiple of 8 "
                  f"elements), got stride {t.stride()}")


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                zeros: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T, W a 4-bit [N, K] in the packed layout of fastinfer.quant.int4:
    qweight int32 [N / 64, 8 K]; scales and (optionally) zeros or mins [K / group_size, N] in x's
    dtype. w = (q - 8) s, (q - zeros) s or q s + mins."""
    op = "int4_linear"
    _check_float(op, "x", x, ndim=2)
    if x.device.type == "cuda" and x.dtype == torch.float32:
        _fail(op, "x must be float16 or bfloat16 on CUDA (the tensor cores take 16-bit inputs), got float32")
    m, k = x.shape
    if group_size not in INT4_GROUP_SIZES:
        _fail(op, f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k == 0 or k % 64 or k % group_size:
        _fail(op, f"x's last dimension K must be a positive multiple of 64 and of group_size={group_size}, got {k}")
    _check(op, "qweight", qweight, ndim=2, dtype=torch.int32, device=x.device, contiguous=True)
    n = qweight.shape[0] * 64
    _check_shape(op, "qweight", qweight, (n // 64, 8 * k))
    if zeros is not None and mins is not None:
        _fail(op, "pass zeros (w = (q - z) s) or mins (w = q s + m), not both")
    for name, t in (("scales", scales), ("zeros", zeros), ("mins", mins)):
        if t is not None:
            _check(op, name, t, ndim=2, dtype=x.dtype, device=x.device, contiguous=True)
            _check_shape(op, name, t, (k // group_size, n))
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _check_float(op, "out", out, like=x, ndim=2)
    _check_shape(op, "out", out, (m, n))
    if _shares_memory(out, x):
        _fail(op, "out must not share memory with x")
    _check_aligned_rows(op, "x", x)
    _check_aligned_rows(op, "out", out)
    _ops.int4_linear(out, x, qweight, scales, zeros, mins, int(group_size))
    return out


# ---- decode-sized dense linear -------------------------------------------------------------------

GEMV_MAX_M = 32  # rows of x the kernel takes (kGemvMaxM in csrc/include/fastinfer/gemm/gemv.h)
GEMV_NORM_MAX_M = 16  # rows of x rms_norm_dense_gemv takes (kGemvNormMaxM)
GEMV_FP8_MAX_M = 16  # rows of x the ops take with FP8 weights (kGemvFp8MaxM)
SQ_SUM_GROUP = 16  # columns per sum of squares of dense_gemv_add_residual (kGemvSqSumGroup)


def _check_gemv_x(op: str, x: torch.Tensor) -> None:
    _check_float(op, "x", x, ndim=2)
    if x.device.type == "cuda" and x.dtype == torch.float32:
        _fail(op, "x must be float16 or bfloat16 on CUDA (the kernel multiplies on the tensor cores), got float32")
    m, k = x.shape
    if not 1 <= m <= GEMV_MAX_M:
        _fail(op, f"x must have 1 to {GEMV_MAX_M} rows (M), got {m}: use a GEMM for larger M")
    if k == 0 or k % 8:
        _fail(op, f"x's last dimension K must be a positive multiple of 8 (16-byte rows), got {k}")


def _check_gemv_operands(op: str, x: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor | None = None) -> tuple[int, int, int]:
    """x [M, K] and weight [N, K] of the decode GEMV; returns (M, K, N). With weight_scale, weight is
    float8_e4m3fn and weight_scale float32 [N] (W8A16: each row's sum times its scale), M <= 16 and K a
    multiple of 16."""
    _check_gemv_x(op, x)
    m, k = x.shape
    if weight_scale is None:
        if isinstance(weight, torch.Tensor) and weight.dtype == FP8:
            _fail(op, "weight is float8_e4m3fn: pass its per-row float32 scales as weight_scale")
        _check(op, "weight", weight, ndim=2, dtype=x.dtype, device=x.device, contiguous=True)
    else:
        _check(op, "weight", weight, ndim=2, dtype=FP8, device=x.device, contiguous=True)
        if m > GEMV_FP8_MAX_M:
            _fail(op, f"x must have 1 to {GEMV_FP8_MAX_M} rows (M) with FP8 weights, got {m}: use fp8_linear")
        if k % 16:
            _fail(op, f"x's last dimension K must be a multiple of 16 with FP8 weights, got {k}")
    n = weight.shape[0]
    _check_shape(op, "weight", weight, (n, k))
    if weight_scale is not None:
        _check(op, "weight_scale", weight_scale, ndim=1, dtype=torch.float32, device=x.device, contiguous=True)
        _check_shape(op, "weight_scale", weight_scale, (n,))
    return m, k, n


def _check_gemv_out(op: str, out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                    shape: tuple[int, int], name: str = "out", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out (allocated when None) of the given shape, in x's dtype or (out_dtype=torch.float32, a plain
    projection: each output rounded to x's dtype, then widened) float32; then the CUDA kernel's
    16-byte alignments."""
    if out_dtype not in (None, x.dtype, torch.float32):
        _fail(op, f"out_dtype must be None (x's dtype) or torch.float32, got {out_dtype}")
    if out is None:
        out = torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device)
    _check(op, name, out, ndim=2, dtype=(x.dtype, torch.float32) if out_dtype is None else out_dtype or x.dtype,
           device=x.device)
    _check_shape(op, name, out, shape)
    if _shares_memory(out, x, weight):
        # every CTA reads all of x while the others store their columns
        _fail(op, f"{name} must not share memory with x or weight")
    _check_aligned_rows(op, "x", x)
    if weight.device.type == "cuda" and weight.data_ptr() % 16:
        _fail(op, "weight must start on a 16-byte boundary on CUDA")
    return out


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]) for 1 <= M <= 32, K a multiple of 8:
    the weight-streaming kernel of decode steps. fp32 accumulation, one rounding to x's dtype;
    float16 / bfloat16 on CUDA (any float dtype on the CPU). x and out rows may be strided.
    out_dtype=torch.float32 (or a float32 out): the rounded values widened, dense_gemv(...).float().
    weight_scale (float32 [N]; every op of this family takes it): weight is float8_e4m3fn and out =
    round(x @ float(weight)^T * weight_scale + bias), x kept in its dtype (W8A16; M <= 16, K % 16 == 0)."""
    op = "dense_gemv"
    m, _, n = _check_gemv_operands(op, x, weight, weight_scale)
    if bias is not None:
        _check(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device, contiguous=True)
        _check_shape(op, "bias", bias, (n,))
    out = _check_gemv_out(op, out, x, weight, (m, n), out_dtype=out_dtype)
    _ops.dense_gemv(out, x, weight, bias, weight_scale)
    return out


def dense_gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, F] = silu(x @ weight[:F]^T) * (x @ weight[F:]^T): the fused gate / up projection of a
    decode step, weight [2 F, K] (gate rows, then up rows), F a multiple of 8, no bias. Bit for bit
    silu_and_mul(dense_gemv(x, weight)) (each half rounded to x's dtype before the SwiGLU)."""
    op = "dense_gemv_silu_mul"
    m, _, n = _check_gemv_operands(op, x, weight, weight_scale)
    if n == 0 or n % 16:
        _fail(op, f"weight must have 2 F rows ([gate; up]) with F a positive multiple of 8, got {n} rows")
    out = _check_gemv_out(op, out, x, weight, (m, n // 2), out_dtype=x.dtype)
    _ops.dense_gemv_silu_mul(out, x, weight, weight_scale)
    return out


class GemvPrefetch(NamedTuple):
    """The next GEMV's weight for a decode GEMV to ask L2 for as it finishes (gemv.cuh, "L2 prefetch
    across kernels"): about nbytes of the first bytes of the rows that GEMV's first wave of CTAs reads
    (swiglu: it is the fused gate / up GEMV, which reads gate and up rows in pairs). A hint for the
    CUDA kernel: no result changes, and the CPU ignores it."""
    weight: torch.Tensor
    nbytes: int
    swiglu: bool = False


def _prefetch_args(op: str, x: torch.Tensor, prefetch: GemvPrefetch | None) -> tuple:
    """The op's (prefetch, prefetch_bytes, prefetch_swiglu) arguments, checked."""
    if prefetch is None:
        return None, 0, False
    if not isinstance(prefetch, GemvPrefetch):
        _fail(op, f"prefetch must be a GemvPrefetch or None, got {type(prefetch).__name__}")
    weight, nbytes, swiglu = prefetch
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        _fail(op, f"prefetch.nbytes must be an int >= 0, got {nbytes!r}")
    if not isinstance(swiglu, bool):
        _fail(op, f"prefetch.swiglu must be a bool, got {swiglu!r}")
    _check(op, "prefetch.weight", weight, ndim=2, dtype=(x.dtype, FP8), device=x.device, contiguous=True)
    if weight.device.type == "cuda" and ((weight.shape[1] * weight.element_size()) % 16 or weight.data_ptr() % 16):
        _fail(op, f"prefetch.weight rows must start on 16-byte boundaries on CUDA, got shape {tuple(weight.shape)}")
    if swiglu and weight.shape[0] % 2:
        _fail(op, f"prefetch.weight must have an even number of rows ([gate; up]) with swiglu, got {weight.shape[0]}")
    return weight, nbytes, swiglu


def sq_sum_groups(n: int) -> int:
    """Columns of the sq_sums that dense_gemv_add_residual writes for N = n outputs: ceil(n / 16)."""
    return -(-n // SQ_SUM_GROUP)


def _check_norm_prologue(op: str, x: torch.Tensor, sq_sums: torch.Tensor, norm_weight: torch.Tensor) -> None:
    """The RMSNorm prologue's inputs: x of <= 16 rows, the sums of squares of its rows (float32
    [M, ceil(K / 16)]) and the norm weight [K]."""
    m, k = x.shape
    if m > GEMV_NORM_MAX_M:
        _fail(op, f"x must have 1 to {GEMV_NORM_MAX_M} rows (M) with the RMSNorm prologue, got {m}: use rms_norm "
                  f"then the plain op")
    _check(op, "sq_sums", sq_sums, ndim=2, dtype=torch.float32, device=x.device)
    if tuple(sq_sums.shape) != (m, sq_sum_groups(k)):
        _fail(op, f"sq_sums must be [M = {m}, ceil(K / {SQ_SUM_GROUP}) = {sq_sum_groups(k)}] (dense_gemv_add_residual's "
                  f"output for x), got {tuple(sq_sums.shape)}")
    if sq_sums.stride(1) != 1:
        _fail(op, "sq_sums rows must be contiguous")
    _check(op, "norm_weight", norm_weight, ndim=1, dtype=x.dtype, device=x.device, contiguous=True)
    _check_shape(op, "norm_weight", norm_weight, (k,))
    if norm_weight.device.type == "cuda" and norm_weight.data_ptr() % 16:
        _fail(op, "norm_weight must start on a 16-byte boundary on CUDA")


def dense_gemv_add_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                            bias: torch.Tensor | None = None, sq_sums: torch.Tensor | None = None,
                            prefetch: GemvPrefetch | None = None,
                            weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """residual [M, N] += x [M, K] @ weight [N, K]^T (+ bias) in place (the projection's output and
    the sum each rounded to x's dtype, as dense_gemv then the add of fused_add_rms_norm store them),
    and returns sq_sums: float32 [M, ceil(N / 16)], the sums of squares of the new residual over each
    16 consecutive columns, which rms_norm_dense_gemv turns into the next RMSNorm's 1 / rms. The
    first half of a decode step's residual add + RMSNorm, in the o / down projection's epilogue.
    prefetch: the next GEMV's weight to ask L2 for (GemvPrefetch; no result changes)."""
    op = "dense_gemv_add_residual"
    m, _, n = _check_gemv_operands(op, x, weight, weight_scale)
    if bias is not None:
        _check(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device, contiguous=True)
        _check_shape(op, "bias", bias, (n,))
    _check(op, "residual", residual, ndim=2, dtype=x.dtype, device=x.device)
    _check_gemv_out(op, residual, x, weight, (m, n), name="residual", out_dtype=x.dtype)  # dense_gemv's out
    if residual.stride(1) != 1 or (m > 1 and residual.stride(0) < n):
        _fail(op, "residual rows must be contiguous and distinct (stride 1 along N, rows >= N apart)")
    shape = (m, sq_sum_groups(n))
    if sq_sums is None:
        sq_sums = torch.empty(shape, dtype=torch.float32, device=x.device)
    _check(op, "sq_sums", sq_sums, ndim=2, dtype=torch.float32, device=x.device)
    _check_shape(op, "sq_sums", sq_sums, shape)
    if sq_sums.stride(1) != 1 or (m > 1 and sq_sums.stride(0) < shape[1]):
        _fail(op, "sq_sums rows must be contiguous and distinct")
    if _shares_memory(sq_sums, x, residual):
        _fail(op, "sq_sums must not share memory with x or residual")
    _ops.dense_gemv_add_residual(residual, sq_sums, x, weight, bias, *_prefetch_args(op, x, prefetch), weight_scale)
    return sq_sums


def rms_norm_dense_gemv(x: torch.Tensor, sq_sums: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
                        out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        prefetch: GemvPrefetch | None = None,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """dense_gemv(rms_norm(x, norm_weight, eps), weight, bias), or with silu_mul
    dense_gemv_silu_mul(rms_norm(x, norm_weight, eps), weight), in one kernel that normalizes x as it
    loads it: x [M <= 16, K] is a residual stream and sq_sums [M, groups] float32 the sums of squares
    of its rows over groups of columns (what dense_gemv_add_residual returned when it wrote x), so
    1 / rms = rsqrt(sum(sq_sums[m]) / K + eps) needs no pass over x. The second half of a decode
    step's residual add + RMSNorm, in the q/k/v or gate / up projection's prologue (and the final
    norm in the LM head's: out_dtype=torch.float32 as dense_gemv takes it, not with silu_mul).
    prefetch: the next GEMV's weight to ask L2 for (GemvPrefetch; no result changes)."""
    op = "rms_norm_dense_gemv"
    m, _, n = _check_gemv_operands(op, x, weight, weight_scale)
    _check_norm_prologue(op, x, sq_sums, norm_weight)
    if silu_mul:
        if n == 0 or n % 16:
            _fail(op, f"weight must have 2 F rows ([gate; up]) with F a positive multiple of 8, got {n} rows")
        if bias is not None:
            _fail(op, "bias must be None with silu_mul")
        if out_dtype not in (None, x.dtype):
            _fail(op, f"out_dtype must be None (x's dtype) with silu_mul, got {out_dtype}")
    elif bias is not None:
        _check(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device, contiguous=True)
        _check_shape(op, "bias", bias, (n,))
    out = _check_gemv_out(op, out, x, weight, (m, n // 2 if silu_mul else n),
                          out_dtype=x.dtype if silu_mul else out_dtype)
    if _shares_memory(out, sq_sums):  # (x: _check_gemv_out)
        _fail(op, "out must not share memory with x or sq_sums")
    _ops.rms_norm_dense_gemv(out, x, sq_sums, norm_weight, float(eps), weight, bias, bool(silu_mul),
                             *_prefetch_args(op, x, prefetch), weight_scale)
    return out


def dense_gemv_rope_cache(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                          bias: torch.Tensor | None = None, sq_sums: torch.Tensor | None = None,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                          check_indices: bool = True, out: torch.Tensor | None = None,
                          prefetch: GemvPrefetch | None = None,
                          weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The q/k/v projection of a decode step with rotary and the KV-cache write in its epilogue:
    qkv = dense_gemv(x, weight, bias) (or, given sq_sums and norm_weight, rms_norm_dense_gemv's
    normalized x), split into q [M, num_heads, D], k and v [M, num_kv_heads, D], then
    rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping). Returns
    the rotated q (out, [M, num_heads, D] with contiguous heads). weight: [(num_heads + 2 num_kv_heads)
    D, K]; kv_cache a 16-bit cache of x's dtype (not FP8) whose num_kv_heads and D it takes;
    cos_sin_cache [max_position, D] (rotary over the whole head), D a multiple of 16. prefetch: the
    next GEMV's weight to ask L2 for (GemvPrefetch; no result changes)."""
    op = "dense_gemv_rope_cache"
    m, _, n = _check_gemv_operands(op, x, weight, weight_scale)
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dtype == FP8:
        _fail(op, "kv_cache must hold x's dtype: an FP8 cache takes rotary_embedding_and_cache with kv_scale")
    _check_kv_cache(op, kv_cache, x, None)
    if kv_cache.shape[0] == 0 or kv_cache.shape[2] == 0 or kv_cache.shape[3] == 0:
        _fail(op, f"kv_cache must have blocks, slots and kv heads, got shape {tuple(kv_cache.shape)}")
    kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    if head_dim % 16:
        _fail(op, f"kv_cache head_dim must be a multiple of 16, got {head_dim}")
    if num_heads <= 0 or n != (num_heads + 2 * kv_heads) * head_dim:
        _fail(op, f"weight must have (num_heads + 2 num_kv_heads) head_dim = ({num_heads} + 2 x {kv_heads}) x "
                  f"{head_dim} rows, got {n}")
    if bias is not None:
        _check(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device, contiguous=True)
        _check_shape(op, "bias", bias, (n,))
    _check(op, "positions", positions, ndim=1, dtype=torch.int64, device=x.device, contiguous=True)
    _check_shape(op, "positions", positions, (m,))
    _check(op, "cos_sin_cache", cos_sin_cache, ndim=2, dtype=torch.float32, device=x.device, contiguous=True)
    if cos_sin_cache.shape[1] != head_dim:
        _fail(op, f"cos_sin_cache must rotate the whole head ([max_position, {head_dim}]), got rotary_dim "
                  f"{cos_sin_cache.shape[1]}: use rotary_embedding_and_cache")
    _check(op, "slot_mapping", slot_mapping, ndim=1, dtype=torch.int64, device=x.device, contiguous=True)
    _check_shape(op, "slot_mapping", slot_mapping, (m,))
    if check_indices:
        _check_positions_in(op, positions, cos_sin_cache)
        _check_slots_in(op, slot_mapping, kv_cache)
    if (sq_sums is None) != (norm_weight is None):
        _fail(op, "sq_sums and norm_weight come together (the RMSNorm prologue) or not at all")
    if sq_sums is not None:
        _check_norm_prologue(op, x, sq_sums, norm_weight)
    shape = (m, num_heads, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _check_float(op, "out", out, like=x, ndim=3)
    _check_shape(op, "out", out, shape)
    if out.stride(2) != 1 or out.stride(1) != head_dim or (m > 1 and out.stride(0) < num_heads * head_dim):
        _fail(op, f"out must have contiguous heads and distinct rows (strides (>= {num_heads * head_dim}, "
                  f"{head_dim}, 1)), got {out.stride()}")
    _check_gemv_out(op, out.view(m, num_heads * head_dim), x, weight, (m, num_heads * head_dim), out_dtype=x.dtype)
    inputs = [x, positions, slot_mapping] + ([sq_sums] if sq_sums is not None else [])
    if _shares_memory(out, kv_cache, *inputs) or _shares_memory(kv_cache, *inputs):
        _fail(op, "out and kv_cache must not share memory with each other or with x, positions, slot_mapping, sq_sums")
    _ops.dense_gemv_rope_cache(out, kv_cache, x, weight, bias, positions, cos_sin_cache, slot_mapping, sq_sums,
                               norm_weight, float(eps), *_prefetch_args(op, x, prefetch), weight_scale)
    return out
