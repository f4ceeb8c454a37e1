"""Validated wrapper of the mixture-of-experts decode GEMV (torch.ops.fastinfer.moe_gemv)."""
from __future__ import annotations

import torch

from ._checks import _check, _check_float, _check_shape, _fail, _ops, _shares_memory
from ._ops_linear import _check_aligned_rows

MOE_GEMV_MAX_PAIRS = 65535  # the binding's limit on the pairs of one launch


def moe_gemv(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, x_group: int = 1,
             silu_mul: bool = False, out: torch.Tensor | None = None, check_indices: bool = True) -> torch.Tensor:
    """Each (token, expert) pair p of a MoE decode step against its own expert:
    out[p] = dense_gemv(x[p // x_group], weight[expert_ids[p]]), [P, N], or with silu_mul
    dense_gemv_silu_mul's [P, N / 2] (weight[e] = [gate; up]). weight [E, N, K] contiguous, expert_ids
    int32 [P] with P = x.shape[0] * x_group (x_group: experts per token for the gate / up projection,
    1 for the down projection, whose rows are the pairs'). The expert ids are read on the device (a CUDA
    graph can hold the op); each output equals dense_gemv's with M = 1 on that expert, bit for bit.
    check_indices=False skips the host-side range check of expert_ids (a sync) for ids known valid."""
    op = "moe_gemv"
    _check_float(op, "x", x, ndim=2)
    if x.device.type == "cuda" and x.dtype == torch.float32:
        _fail(op, "x must be float16 or bfloat16 on CUDA (the kernel multiplies on the tensor cores), got float32")
    _check(op, "weight", weight, ndim=3, dtype=x.dtype, device=x.device, contiguous=True)
    experts, n, k = weight.shape
    if k != x.shape[1] or k == 0 or k % 8:
        _fail(op, f"weight [E, N, K] must have x's K ({x.shape[1]}), a positive multiple of 8; got {tuple(weight.shape)}")
    if isinstance(x_group, bool) or not isinstance(x_group, int) or x_group < 1:
        _fail(op, f"x_group must be an integer >= 1, got {x_group!r}")
    _check(op, "expert_ids", expert_ids, ndim=1, dtype=torch.int32, device=x.device, contiguous=True)
    pairs = expert_ids.shape[0]
    if pairs != x.shape[0] * x_group or pairs > MOE_GEMV_MAX_PAIRS:
        _fail(op, f"expert_ids must have x.shape[0] * x_group = {x.shape[0] * x_group} entries (at most "
                  f"{MOE_GEMV_MAX_PAIRS}), got {pairs}")
    if n == 0 or n >= 65535 * 16:
        _fail(op, f"weight must have 1 to {65535 * 16 - 1} rows per expert (N), got {n}")
    if silu_mul and n % 16:
        _fail(op, f"with silu_mul, weight needs 2 F rows per expert ([gate; up]), F a multiple of 8; got N = {n}")
    if check_indices and pairs and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= experts):
        _fail(op, f"expert_ids must lie in [0, {experts}), got [{int(expert_ids.min())}, {int(expert_ids.max())}]")
    shape = (pairs, n // 2 if silu_mul else n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _check(op, "out", out, ndim=2, dtype=x.dtype, device=x.device)
    _check_shape(op, "out", out, shape)
    if _shares_memory(out, x, weight):
        _fail(op, "out must not share memory with x or weight")
    if x.stride(1) != 1 or out.stride(1) != 1:
        _fail(op, "x and out rows must be contiguous (last dimension stride 1)")
    _check_aligned_rows(op, "x", x)
    if weight.device.type == "cuda" and weight.data_ptr() % 16:
        _fail(op, "weight must start on a 16-byte boundary on CUDA")
    _ops.moe_gemv(out, x, weight, expert_ids, x_group, silu_mul)
    return out
