"""Argument checks shared by the op wrappers (_ops*.py): each raises ValueError naming the argument."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.fastinfer  # the extension must be loaded before any op is called (fastinfer._ops does)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"fastinfer.{op}: {msg}")


def _check(op: str, name: str, t, *, ndim: int | None = None, dtype=None, device=None,
           contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            _fail(op, f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if device is not None and t.device != device:
        _fail(op, f"{name} must be on {device} (like the other inputs), got {t.device}")
    if contiguous and not t.is_contiguous():
        _fail(op, f"{name} must be contiguous")
    if t.dim() > 0 and t.numel() > 0 and t.stride(-1) != 1:
        _fail(op, f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _shares_memory(t: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether t and any of others live in the same storage (tensors with no elements never do: an
    empty tensor's storage may be a shared null)."""
    if t.numel() == 0:
        return False
    ptr = t.untyped_storage().data_ptr()
    return any(o is not None and o.numel() > 0 and o.untyped_storage().data_ptr() == ptr for o in others)


def _check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_float(op: str, name: str, t, like: torch.Tensor | None = None, ndim: int | None = None) -> None:
    _check(op, name, t, ndim=ndim, dtype=FLOAT_DTYPES if like is None else like.dtype,
           device=None if like is None else like.device)


def _check_kv_cache(op: str, kv_cache, like: torch.Tensor, kv_scale) -> bool:
    """True for an FP8 cache (float8_e4m3fn, with kv_scale = fp32 [k_scale, v_scale] on its device)."""
    _check(op, "kv_cache", kv_cache, ndim=5, dtype=(like.dtype, FP8), device=like.device, contiguous=True)
    if kv_cache.shape[1] != 2:
        _fail(op, f"kv_cache must be [num_blocks, 2, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    bs = kv_cache.shape[2]
    if bs <= 0 or bs & (bs - 1):
        _fail(op, f"kv_cache block_size must be a power of two, got {bs}")
    fp8 = kv_cache.dtype == FP8
    if fp8:
        _check(op, "kv_scale", kv_scale, ndim=1, dtype=torch.float32, device=like.device, contiguous=True)
        _check_shape(op, "kv_scale", kv_scale, (2,))
    elif kv_scale is not None:
        _fail(op, f"kv_scale is only for a {FP8} kv_cache, got a {kv_cache.dtype} one")
    return fp8


def _check_positions_in(op: str, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Host-side: every position indexes a row of cos_sin_cache."""
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            _fail(op, f"positions must lie in [0, {cos_sin_cache.shape[0]}) (the cos_sin_cache length), got [{lo}, {hi}]")


def _check_slots_in(op: str, slot_mapping: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Host-side: every slot is -1 (not written) or a slot of kv_cache."""
    if slot_mapping.numel():
        num_slots = kv_cache.shape[0] * kv_cache.shape[2]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_slots:
            _fail(op, f"slot_mapping values must be -1 or in [0, {num_slots}), got [{lo}, {hi}]")
