"""dense_gemv: out [M <= 32, N] = x [M, K] @ weight [N, K]^T (+ bias), the decode-step dense linear.

Judged by DESIGN.md's rule against tests/reference.py's linear: max |ours - fp64 (fp32 on the GPU)
reference| <= 2 x that of the same-dtype torch linear + 1e-5. The GPU sweep samples awkward shapes
(N not a multiple of the 16-row tile, K with a partial 128-k chunk, Llama-3-8B's projections)
rather than their full product, to stay fast. M covers each x-tile count of the kernel (1..8: one n8
tile, 9..16: two, 17..32: four) and its edges (8, 9, 16, 17, 31, 32).
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from fastinfer.models import linear as linear_mod
from fastinfer.models.linear import Linear, use_dense_gemv

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def make_inputs(m: int, n: int, k: int, dtype: torch.dtype, device, bias: bool, seed: int):
    """x, weight, bias drawn on device (a seeded generator there: the GPU shapes reach 1 GB)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    weight = (torch.randn(n, k, generator=gen, device=device) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=device).to(dtype) if bias else None
    return x, weight, b


def check_close(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    wide = torch.float64 if x.device.type == "cpu" else torch.float32
    expected = ref.linear(x, weight, bias, wide)
    same_dtype = ref.linear(x, weight, bias, x.dtype).to(wide)
    assert torch.isfinite(ours).all()
    err = (ours.to(wide) - expected).abs().max().item()
    baseline = (same_dtype - expected).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x same-dtype torch {baseline:.3g} + 1e-5"


# ---- the CPU reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 8), (3, 7, 64), (8, 113, 1000), (5, 64, 520), (9, 17, 72),
                                     (16, 33, 520), (17, 5, 1000), (32, 40, 264)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_cpu_matches_reference(m, n, k, dtype, bias):
    x, weight, b = make_inputs(m, n, k, dtype, "cpu", bias, seed=m * 100 + n)
    check_close(ops.dense_gemv(x, weight, b), x, weight, b)


@pytest.mark.parametrize("m", [5, 13, 27])
def test_strided_rows_and_poisoned_out(device, m):
    """x rows 64 elements apart beyond K, out a NaN-filled wider buffer: only out's [M, N] is written."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, k = 37, 192
    x_full, weight, b = make_inputs(m, n, k + 64, dtype, device, True, seed=3)
    x, weight = x_full[:, 64:], weight[:, :k].contiguous()
    buf = torch.full((m, n + 8), float("nan"), dtype=dtype, device=device)
    out = buf[:, 8:]
    ops.dense_gemv(x, weight, b, out=out)
    check_close(out, x, weight, b)
    assert torch.isnan(buf[:, :8]).all()


@pytest.mark.parametrize("m", [3, 32])
def test_opcheck(device, m):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, weight, b = make_inputs(m, 40, 64, dtype, device, True, seed=4)
    out = torch.empty(m, 40, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv.default, (out, x, weight, b))
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv.default, (out, x, weight, None))


# ---- the CUDA kernel ---------------------------------------------------------------------------------

# (M, N, K): every M in 1..8 and 9, 12, 16, 17, 24, 31, 32 (each x-tile count and its edges); N below /
# at / above the 16-row tile, Llama-3-8B's N (6144 qkv, 4096 o / down, 28672 gate_up, 128256 lm_head);
# K of one partial chunk (8, 64), a partial last chunk (1000, 4104) and whole chunks (4096, 14336).
GPU_SHAPES = [(1, 1, 8), (2, 7, 64), (3, 64, 4096), (4, 113, 1000), (5, 7, 14336), (6, 4096, 8),
              (7, 6144, 4096), (8, 4096, 14336), (1, 28672, 4096), (2, 128256, 4096), (8, 17, 4104),
              (3, 28672, 64), (5, 1, 14336),
              (9, 113, 1000), (9, 6144, 4096), (12, 1, 8), (16, 4096, 14336), (16, 17, 4104),
              (17, 7, 64), (17, 28672, 4096), (24, 113, 1000), (31, 6144, 4104), (31, 1, 14336),
              (32, 4096, 14336), (32, 128256, 4096), (32, 17, 8)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", GPU_SHAPES)
def test_cuda_shapes(m, n, k, dtype):
    bias = (m + n) % 2 == 1
    x, weight, b = make_inputs(m, n, k, dtype, "cuda", bias, seed=m * 7 + n)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ops.dense_gemv(x, weight, b, out=out)
    check_close(out, x, weight, b)
    again = ops.dense_gemv(x, weight, b)
    assert torch.equal(out, again), "two runs differ: the cross-warp sum must be in a fixed order"


@pytest.mark.cuda
def test_cuda_agrees_with_cpu_reference():
    """The kernel and the CPU spec on the same bf16 inputs: equal up to the last bit of rounding."""
    x, weight, b = make_inputs(4, 300, 2048, torch.bfloat16, "cpu", True, seed=9)
    cpu = ops.dense_gemv(x, weight, b)
    gpu = ops.dense_gemv(x.cuda(), weight.cuda(), b.cuda()).cpu()
    check_close(gpu, x, weight, b)
    ulp = cpu.float().abs() * 2.0 ** -7
    assert ((gpu.float() - cpu.float()).abs() <= ulp + 1e-6).all()


@pytest.mark.cuda
def test_cuda_rejects_float32():
    x = torch.randn(1, 64, device="cuda")
    with pytest.raises(ValueError, match="x must be float16 or bfloat16 on CUDA"):
        ops.dense_gemv(x, torch.randn(8, 64, device="cuda"))


# ---- input validation ----------------------------------------------------------------------------------

def _valid_args() -> dict:
    return dict(x=torch.randn(2, 64), weight=torch.randn(16, 64), bias=torch.randn(16))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(0, 64)), "x must have 1 to 32 rows"),
    (dict(x=torch.randn(33, 64)), "x must have 1 to 32 rows"),
    (dict(x=torch.randn(2, 60), weight=torch.randn(16, 60)), "K must be a positive multiple of 8"),
    (dict(x=torch.randn(2, 64, 1)), "x must have 2 dimensions"),
    (dict(x=torch.randn(2, 64, dtype=torch.float64)), "x must have dtype"),
    (dict(x=torch.randn(64, 2).t()), "x must have a contiguous last dimension"),
    (dict(weight=torch.randn(16, 64, dtype=torch.float16)), "weight must have dtype"),
    (dict(weight=torch.randn(16, 72)), "weight must have shape"),
    (dict(weight=torch.randn(64, 16).t()), "weight must be contiguous"),
    (dict(bias=torch.randn(15)), "bias must have shape"),
    (dict(bias=torch.randn(16, dtype=torch.bfloat16)), "bias must have dtype"),
    (dict(out=torch.empty(2, 15)), "out must have shape"),
    (dict(out=torch.empty(2, 16, dtype=torch.float16)), "out must have dtype"),
])
def test_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.dense_gemv(**{**_valid_args(), **change})


def test_out_must_not_overlap_x_or_weight():
    """Every CTA reads all of x while the others store their columns: in place would read outputs."""
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="out must not share memory with x or weight"):
        ops.dense_gemv(x, torch.randn(64, 64), out=x)
    weight = torch.randn(16, 16)
    with pytest.raises(ValueError, match="out must not share memory with x or weight"):
        ops.dense_gemv(torch.randn(1, 16), weight, out=weight[:1])
    buf = torch.randn(4, 32)
    with pytest.raises(ValueError, match="out must not share memory with x or weight"):
        ops.dense_gemv_silu_mul(buf[:2], torch.randn(64, 32), out=buf[2:])


# ---- the model's dispatch --------------------------------------------------------------------------------

CUDA = torch.device("cuda")  # a device object only: no GPU needed to ask the decision


@pytest.mark.parametrize("device, m, k, dtype, expected", [
    (CUDA, 1, 4096, torch.bfloat16, True),
    (CUDA, 8, 14336, torch.float16, True),
    (CUDA, 9, 4096, torch.bfloat16, False),      # cuBLAS measured faster from here (DENSE_GEMV_MAX_TOKENS)
    (CUDA, 16, 4096, torch.float16, False),
    (CUDA, 32, 4096, torch.bfloat16, False),     # batch-32 decode
    (CUDA, 33, 4096, torch.bfloat16, False),     # prefill / larger batches: cuBLAS
    (CUDA, 0, 4096, torch.bfloat16, False),
    (CUDA, 4, 4100, torch.bfloat16, False),      # rows not 16-byte multiples
    (CUDA, 1, 4096, torch.float32, False),
    (torch.device("cpu"), 1, 4096, torch.bfloat16, False),  # the CPU keeps F.linear
])
def test_use_dense_gemv(device, m, k, dtype, expected):
    assert use_dense_gemv(device, m, k, dtype) is expected


def test_linear_routes_by_the_decision(monkeypatch):
    """Linear calls ops.dense_gemv exactly when use_dense_gemv says so (forced here on the CPU)."""
    layer = Linear(64, 16, torch.float32, torch.device("cpu"), bias=True)
    layer.weight.copy_(torch.randn(16, 64))
    layer.bias.copy_(torch.randn(16))
    x = torch.randn(3, 64)
    calls = []
    real = ops.dense_gemv
    monkeypatch.setattr(ops, "dense_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plain = layer(x)
    assert calls == [] and torch.allclose(plain, torch.nn.functional.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda *a: True)
    routed = layer(x)
    assert calls == [1]
    check_close(routed, x, layer.weight, layer.bias)


# ---- dense_gemv_silu_mul: the SwiGLU in the GEMV's epilogue --------------------------------------------
# Its contract is bitwise: silu_and_mul(dense_gemv(x, W)) on the same device and dtype, W = [gate; up].

def swiglu_inputs(m: int, f: int, k: int, dtype: torch.dtype, device, seed: int):
    x, weight, _ = make_inputs(m, 2 * f, k, dtype, device, False, seed)
    return x, weight * 4  # gate / up values of a few units: silu's curved part, not just its tails


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 5, 17, 32])
def test_silu_mul_cpu_is_the_composition(m, dtype):
    x, weight = swiglu_inputs(m, 24, 200, dtype, "cpu", seed=m)
    fused = ops.dense_gemv_silu_mul(x, weight)
    assert fused.shape == (m, 24) and fused.dtype == dtype
    assert torch.equal(fused, ops.silu_and_mul(ops.dense_gemv(x, weight)))


def test_silu_mul_strided_rows_and_poisoned_out(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, f, k = 7, 40, 192
    x_full, weight = swiglu_inputs(m, f, k + 64, dtype, device, seed=5)
    x, weight = x_full[:, 64:], weight[:, :k].contiguous()
    buf = torch.full((m, f + 8), float("nan"), dtype=dtype, device=device)
    ops.dense_gemv_silu_mul(x, weight, out=buf[:, 8:])
    assert torch.equal(buf[:, 8:], ops.silu_and_mul(ops.dense_gemv(x, weight)))
    assert torch.isnan(buf[:, :8]).all()


@pytest.mark.parametrize("m", [3, 32])
def test_silu_mul_opcheck(device, m):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, weight = swiglu_inputs(m, 24, 64, dtype, device, seed=6)
    out = torch.empty(m, 24, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_silu_mul.default, (out, x, weight))


# (M, F, K): F of one CTA (8), an odd number of CTAs (24: 3), Llama-3-8B's 14336; M over every x-tile
# count, odd; K with a partial chunk (1000) and whole chunks (4096).
SILU_MUL_SHAPES = [(1, 8, 4096), (3, 24, 4096), (5, 14336, 4096), (7, 8, 1000), (9, 24, 4096),
                   (13, 14336, 4096), (17, 24, 1000), (31, 14336, 4096), (32, 8, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, f, k", SILU_MUL_SHAPES)
def test_silu_mul_cuda_is_the_composition(m, f, k, dtype):
    """Bitwise equal to the unfused pair on the GPU: the row pairing does not change any row's sum."""
    x, weight = swiglu_inputs(m, f, k, dtype, "cuda", seed=m * 11 + f)
    out = torch.full((m, f), float("nan"), dtype=dtype, device="cuda")
    ops.dense_gemv_silu_mul(x, weight, out=out)
    assert torch.equal(out, ops.silu_and_mul(ops.dense_gemv(x, weight)))


@pytest.mark.cuda
def test_silu_mul_cuda_agrees_with_cpu():
    x, weight = swiglu_inputs(4, 48, 2048, torch.bfloat16, "cpu", seed=12)
    cpu = ops.dense_gemv_silu_mul(x, weight)
    gpu = ops.dense_gemv_silu_mul(x.cuda(), weight.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2 ** -6, atol=1e-3)


@pytest.mark.cuda
def test_silu_mul_cuda_rejects_float32():
    with pytest.raises(ValueError, match="x must be float16 or bfloat16 on CUDA"):
        ops.dense_gemv_silu_mul(torch.randn(1, 64, device="cuda"), torch.randn(16, 64, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("rows, wdtype, match", [(24, torch.bfloat16, "F a multiple of 8, and no bias"),
                                                 (16, torch.float16, "must share one dtype")], ids=["F=12", "dtype"])
def test_silu_mul_cuda_binding_checks(rows, wdtype, match):
    """The binding's own checks, past the Python wrapper: the kernel never sees such a weight."""
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(rows, 64, device="cuda", dtype=wdtype)
    out = torch.empty(2, rows // 2, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastinfer.dense_gemv_silu_mul(out, x, weight)


@pytest.mark.parametrize("change, match", [
    (dict(weight=torch.randn(24, 64)), "weight must have 2 F rows"),     # F = 12: not a multiple of 8
    (dict(weight=torch.randn(15, 64)), "weight must have 2 F rows"),
    (dict(weight=torch.randn(0, 64)), "weight must have 2 F rows"),
    (dict(weight=torch.randn(16, 64, dtype=torch.float16)), "weight must have dtype"),
    (dict(weight=torch.randn(16, 72)), "weight must have shape"),
    (dict(x=torch.randn(33, 64)), "x must have 1 to 32 rows"),
    (dict(x=torch.randn(2, 60), weight=torch.randn(16, 60)), "K must be a positive multiple of 8"),
    (dict(out=torch.empty(2, 16)), "out must have shape"),
    (dict(out=torch.empty(2, 8, dtype=torch.float16)), "out must have dtype"),
])
def test_silu_mul_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.dense_gemv_silu_mul(**{**dict(x=torch.randn(2, 64), weight=torch.randn(16, 64)), **change})


def test_silu_mul_takes_no_bias():
    with pytest.raises(TypeError):
        ops.dense_gemv_silu_mul(torch.randn(2, 64), torch.randn(16, 64), bias=torch.randn(16))


def _silu_mul_layer(bias: bool, out_features: int = 32) -> Linear:
    layer = Linear(64, out_features, torch.float32, torch.device("cpu"), bias=bias)
    layer.weight.copy_(torch.randn(out_features, 64))
    if bias:
        layer.bias.copy_(torch.randn(out_features))
    return layer


@pytest.mark.parametrize("bias, out_features, fused", [(False, 32, True), (True, 32, False), (False, 24, False)])
def test_linear_silu_mul_routes(monkeypatch, bias, out_features, fused):
    """Linear.silu_mul fuses exactly for a bias-free layer of 2 F rows (F % 8 == 0) where use_dense_gemv
    holds (forced here on the CPU), and equals silu_and_mul(layer(x)) either way."""
    layer = _silu_mul_layer(bias, out_features)
    x = torch.randn(3, 64)
    calls = []
    real = ops.dense_gemv_silu_mul
    monkeypatch.setattr(ops, "dense_gemv_silu_mul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert torch.equal(layer.silu_mul(x), ops.silu_and_mul(layer(x))) and calls == []
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda *a: True)
    routed = layer.silu_mul(x)
    assert calls == ([1] if fused else [])
    assert torch.equal(routed, ops.silu_and_mul(layer(x)))
