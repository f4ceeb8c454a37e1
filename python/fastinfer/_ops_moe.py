"""Validated wrappers of the mixture-of-experts decode GEMVs (torch.ops.fastinfer.moe_gemv, moe_int4_linear)."""
from __future__ import annotations

import torch

from ._checks import FP8, _check, _check_float, _check_shape, _fail, _ops, _shares_memory
from ._ops_linear import INT4_GROUP_SIZES, _check_aligned_rows

MOE_GEMV_MAX_PAIRS = 65535  # the binding's limit on the pairs of one launch


def moe_gemv(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, x_group: int = 1,
             silu_mul: bool = False, out: torch.Tensor | None = None, check_indices: bool = True,
             weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each (token, expert) pair p of a MoE decode step against its own expert:
    out[p] = dense_gemv(x[p // x_group], weight[expert_ids[p]]), [P, N], or with silu_mul
    dense_gemv_silu_mul's [P, N / 2] (weight[e] = [gate; up]). weight [E, N, K] contiguous, expert_ids
    int32 [P] with P = x.shape[0] * x_group (x_group: experts per token for the gate / up projection,
    1 for the down projection, whose rows are the pairs'). The expert ids are read on the device (a CUDA
    graph can hold the op); each output equals dense_gemv's with M = 1 on that expert, bit for bit.
    check_indices=False skips the host-side range check of expert_ids (a sync) for ids known valid.
    weight_scale (float32 [E, N]): weight is float8_e4m3fn, each expert's rows scaled as dense_gemv's
    weight_scale (W8A16, K % 16 == 0)."""
    op = "moe_gemv"
    _check_float(op, "x", x, ndim=2)
    if x.device.type == "cuda" and x.dtype == torch.float32:
        _fail(op, "x must be float16 or bfloat16 on CUDA (the kernel multiplies on the tensor cores), got float32")
    _check(op, "weight", weight, ndim=3, dtype=x.dtype if weight_scale is None else FP8, device=x.device,
           contiguous=True)
    experts, n, k = weight.shape
    if weight_scale is not None:
        _check(op, "weight_scale", weight_scale, ndim=2, dtype=torch.float32, device=x.device, contiguous=True)
        _check_shape(op, "weight_scale", weight_scale, (experts, n))
        if k % 16:
            _fail(op, f"FP8 weights need K a multiple of 16, got {k}")
    if k != x.shape[1] or k == 0 or k % 8:
        _fail(op, f"weight [E, N, K] must have x's K ({x.shape[1]}), a positive multiple of 8; got {tuple(weight.shape)}")
    pairs = _check_routing(op, x, expert_ids, x_group)
    if n == 0 or n >= 65535 * 16:
        _fail(op, f"weight must have 1 to {65535 * 16 - 1} rows per expert (N), got {n}")
    if silu_mul and n % 16:
        _fail(op, f"with silu_mul, weight needs 2 F rows per expert ([gate; up]), F a multiple of 8; got N = {n}")
    if check_indices:
        _check_expert_range(op, expert_ids, experts)
    shape = (pairs, n // 2 if silu_mul else n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _check(op, "out", out, ndim=2, dtype=x.dtype, device=x.device)
    _check_shape(op, "out", out, shape)
    if _shares_memory(out, x, weight, *([weight_scale] if weight_scale is not None else [])):
        _fail(op, "out must not share memory with x, weight or weight_scale")
    if x.stride(1) != 1 or out.stride(1) != 1:
        _fail(op, "x and out rows must be contiguous (last dimension stride 1)")
    _check_aligned_rows(op, "x", x)
    if weight.device.type == "cuda" and weight.data_ptr() % 16:
        _fail(op, "weight must start on a 16-byte boundary on CUDA")
    _ops.moe_gemv(out, x, weight, expert_ids, x_group, silu_mul, weight_scale)
    return out


def moe_int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, expert_ids: torch.Tensor,
                    group_size: int, zeros: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                    x_group: int = 1, out: torch.Tensor | None = None, check_indices: bool = True) -> torch.Tensor:
    """moe_gemv for 4-bit experts: out[p] = int4_linear(x[p // x_group], qweight[e], scales[e], group_size,
    zeros[e] / mins[e]) with e = expert_ids[p], [P, N]. qweight int32 [E, N / 64, 8 K] and scales (zeros, mins)
    [E, K / group_size, N] in x's dtype: int4_linear's packed layout per expert, stacked; all contiguous.
    expert_ids int32 [P], P = x.shape[0] * x_group. The ids are read on the device (a CUDA graph can hold
    the op; sm_90a builds, as int4_linear). check_indices=False skips the host-side range check (a sync)."""
    op = "moe_int4_linear"
    _check_float(op, "x", x, ndim=2)
    if x.device.type == "cuda" and x.dtype == torch.float32:
        _fail(op, "x must be float16 or bfloat16 on CUDA (the tensor cores take 16-bit inputs), got float32")
    k = x.shape[1]
    if group_size not in INT4_GROUP_SIZES:
        _fail(op, f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if k == 0 or k % 64 or k % group_size:
        _fail(op, f"x's last dimension K must be a positive multiple of 64 and of group_size={group_size}, got {k}")
    _check(op, "qweight", qweight, ndim=3, dtype=torch.int32, device=x.device, contiguous=True)
    experts, n = qweight.shape[0], qweight.shape[1] * 64
    if experts == 0 or n == 0 or n // 64 > 65535:
        _fail(op, f"qweight [E, N / 64, 8 K] must hold at least one expert of 64 to {65535 * 64} rows, got "
                  f"{tuple(qweight.shape)}")
    _check_shape(op, "qweight", qweight, (experts, n // 64, 8 * k))
    if zeros is not None and mins is not None:
        _fail(op, "pass zeros (w = (q - z) s) or mins (w = q s + m), not both")
    for name, t in (("scales", scales), ("zeros", zeros), ("mins", mins)):
        if t is not None:
            _check(op, name, t, ndim=3, dtype=x.dtype, device=x.device, contiguous=True)
            _check_shape(op, name, t, (experts, k // group_size, n))
    pairs = _check_routing(op, x, expert_ids, x_group)
    if check_indices:
        _check_expert_range(op, expert_ids, experts)
    if out is None:
        out = torch.empty((pairs, n), dtype=x.dtype, device=x.device)
    _check_float(op, "out", out, like=x, ndim=2)
    _check_shape(op, "out", out, (pairs, n))
    if _shares_memory(out, x, qweight, scales, *[t for t in (zeros, mins) if t is not None]):
        _fail(op, "out must not share memory with x or the weights")
    _check_aligned_rows(op, "x", x)
    _check_aligned_rows(op, "out", out)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("mins", mins)):
        if t is not None and t.device.type == "cuda" and t.data_ptr() % 16:
            _fail(op, f"{name} must start on a 16-byte boundary on CUDA")
    _ops.moe_int4_linear(out, x, qweight, scales, zeros, mins, expert_ids, int(group_size), x_group)
    return out


def _check_routing(op: str, x: torch.Tensor, expert_ids: torch.Tensor, x_group) -> int:
    """x_group and expert_ids (int32 [x.shape[0] * x_group], contiguous, on x's device) checked; the pairs."""
    if isinstance(x_group, bool) or not isinstance(x_group, int) or x_group < 1:
        _fail(op, f"x_group must be an integer >= 1, got {x_group!r}")
    _check(op, "expert_ids", expert_ids, ndim=1, dtype=torch.int32, device=x.device, contiguous=True)
    pairs = expert_ids.shape[0]
    if pairs != x.shape[0] * x_group or pairs > MOE_GEMV_MAX_PAIRS:
        _fail(op, f"expert_ids must have x.shape[0] * x_group = {x.shape[0] * x_group} entries (at most "
                  f"{MOE_GEMV_MAX_PAIRS}), got {pairs}")
    return pairs


def _check_expert_range(op: str, expert_ids: torch.Tensor, experts: int) -> None:
    """Every id in [0, experts): a host read-back (the kernels do not check)."""
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= experts):
        _fail(op, f"expert_ids must lie in [0, {experts}), got [{int(expert_ids.min())}, {int(expert_ids.max())}]")
