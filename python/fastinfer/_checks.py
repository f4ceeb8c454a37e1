"""Argument checks shared by the op wrappers (_ops.py, _ops_fp8.py): each raises ValueError naming the argument."""
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


def _check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_float(op: str, name: str, t, like: torch.Tensor | None = None, ndim: int | None = None) -> None:
    _check(op, name, t, ndim=ndim, dtype=FLOAT_DTYPES if like is None else like.dtype,
           device=None if like is None else like.device)
