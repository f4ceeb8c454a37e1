"""The residual add + RMSNorm of a decode step, fused into the dense GEMVs around it.

dense_gemv_add_residual: residual += round(x @ W^T + bias), rounded (dense_gemv, then the add of
fused_add_rms_norm), and sq_sums [M, ceil(N / 16)]: the new residual's sums of squares per 16
columns. Both parts are exact compositions of rounded values, so the residual is compared bitwise
with the unfused ops on the same device, and sq_sums with an fp64 sum of the same squares.

rms_norm_dense_gemv: dense_gemv (or dense_gemv_silu_mul) of rms_norm(x), with 1 / rms from sq_sums.
It is judged by DESIGN.md's rule against an fp64 reference of the whole (norm, then projection, then
SwiGLU): max error <= 2 x the error of the unfused same-dtype ops (rms_norm, then dense_gemv) + 1e-5;
and against the unfused ops themselves, which it equals except where the two sums of squares (added
in different orders) round 1 / rms differently.

dense_gemv_rope_cache: the q/k/v projection (optionally with the norm prologue) with
rotary_embedding_and_cache in its epilogue. On the CPU it is that composition, bit for bit; the CUDA
kernel is judged against an fp64 reference of projection + rotation with the same rule, and against
the unfused ops on the GPU (nearly all values equal), the cache rows it must not touch NaN-poisoned.

The model (models/llama.py, fuse_norms) takes this path for steps of <= 16 tokens on the decode GEMV:
its greedy output must stay HF's (forced here on the CPU), and on the GPU a decode step must run two
RMSNorm kernels and no rotary / KV-write kernel whatever the depth.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
import reference as ref
from fastinfer import ops
from fastinfer.models import linear as linear_mod
from fastinfer.models.rope import cos_sin_cache
from models import left_padded_batch, make_hf_model

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
EPS = 1e-5


def draw(shape, device, gen, scale=1.0, dtype=torch.float32):
    """Drawn where gen lives (the tests' generators live on their device: the GPU shapes reach 1 GB)."""
    return (torch.randn(shape, generator=gen, device=gen.device) * scale).to(dtype).to(device)


def make_gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def add_residual_inputs(m, n, k, dtype, device, bias, seed):
    gen = make_gen(device, seed)
    x = draw((m, k), device, gen, dtype=dtype)
    weight = draw((n, k), device, gen, k ** -0.5, dtype)
    b = draw((n,), device, gen, dtype=dtype) if bias else None
    residual = draw((m, n), device, gen, 2.0, dtype)
    return x, weight, b, residual


def group_sq_sums(residual: torch.Tensor) -> torch.Tensor:
    """fp64 sums of squares of residual's rows over each 16 columns (the last group may be short)."""
    m, n = residual.shape
    pad = -n % ops.SQ_SUM_GROUP
    wide = torch.nn.functional.pad(residual.double(), (0, pad))
    return wide.pow(2).reshape(m, -1, ops.SQ_SUM_GROUP).sum(-1)


def check_add_residual(x, weight, b, residual):
    expected = residual.clone()
    ops.fused_add_rms_norm(ops.dense_gemv(x, weight, b), expected, torch.ones_like(residual[0]), EPS)
    sq_sums = ops.dense_gemv_add_residual(x, weight, residual, b)
    assert torch.equal(residual, expected), "residual differs from dense_gemv + the add of fused_add_rms_norm"
    assert sq_sums.dtype == torch.float32 and sq_sums.shape == (x.shape[0], ops.sq_sum_groups(weight.shape[0]))
    torch.testing.assert_close(sq_sums.double(), group_sq_sums(residual), rtol=1e-5, atol=1e-6)


def norm_inputs(m, n, k, dtype, device, bias, seed, silu_mul=False):
    """x (a residual stream of a few units), its sq_sums, norm weight, W, bias."""
    gen = make_gen(device, seed)
    x = draw((m, k), device, gen, 3.0, dtype)
    norm_w = (1 + draw((k,), device, gen, 0.3)).to(dtype)
    weight = draw((n, k), device, gen, (4.0 if silu_mul else 1.0) * k ** -0.5, dtype)
    b = draw((n,), device, gen, dtype=dtype) if bias else None
    return x, group_sq_sums(x).float(), norm_w, weight, b


def reference(x, norm_w, weight, b, silu_mul):
    """fp64 rms_norm -> linear -> (SwiGLU) of the same inputs."""
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()
    y = torch.nn.functional.linear(normed, weight.double(), None if b is None else b.double())
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


def unfused(x, norm_w, weight, b, silu_mul):
    normed = ops.rms_norm(x, norm_w, EPS)
    return ops.dense_gemv_silu_mul(normed, weight) if silu_mul else ops.dense_gemv(normed, weight, b)


def check_rms_norm_gemv(x, sq_sums, norm_w, weight, b, silu_mul):
    out = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b, silu_mul=silu_mul)
    expected = reference(x, norm_w, weight, b, silu_mul)
    base = unfused(x, norm_w, weight, b, silu_mul)
    assert out.shape == base.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    err = (out.double() - expected).abs().max().item()
    baseline = (base.double() - expected).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x unfused {baseline:.3g} + 1e-5"
    # Against the unfused ops: the same roundings, but for 1 / rms from another order of the same sum.
    close = torch.isclose(out.float(), base.float(), rtol=2 ** -6, atol=1e-3)
    assert close.float().mean().item() >= 0.99, "more than 1% of outputs differ from the unfused ops"
    return out


# ---- the CPU reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 8), (3, 17, 64), (8, 113, 200), (17, 64, 72), (32, 40, 264)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_add_residual_cpu(m, n, k, dtype, bias):
    check_add_residual(*add_residual_inputs(m, n, k, dtype, "cpu", bias, seed=m * 31 + n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m, n, k", [(1, 16, 8), (3, 48, 64), (8, 112, 200), (16, 32, 1000), (5, 16, 136)])
@pytest.mark.parametrize("mode", ["plain", "bias", "silu_mul"])
def test_rms_norm_gemv_cpu(m, n, k, dtype, mode):
    silu_mul = mode == "silu_mul"
    x, sq_sums, norm_w, weight, b = norm_inputs(m, n, k, dtype, "cpu", mode == "bias", seed=m * 7 + k, silu_mul=silu_mul)
    check_rms_norm_gemv(x, sq_sums, norm_w, weight, b, silu_mul)


def test_sums_of_squares_are_the_only_norm_input():
    """1 / rms comes from sq_sums, not from x: doubling the sums scales the output by 1 / sqrt(2)."""
    x, sq_sums, norm_w, weight, _ = norm_inputs(2, 32, 64, torch.float32, "cpu", False, seed=1)
    one = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, 0.0, weight)
    two = ops.rms_norm_dense_gemv(x, 2 * sq_sums, norm_w, 0.0, weight)
    torch.testing.assert_close(two, one / 2 ** 0.5, rtol=1e-5, atol=1e-6)


def test_chain_matches_the_unfused_layer(device):
    """o projection with the residual epilogue, then gate / up with the norm prologue, against
    dense_gemv + fused_add_rms_norm + dense_gemv_silu_mul: a decode layer's second half."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, h, f = 5, 256, 96
    gen = make_gen(device, 2)
    attn, w_o = draw((m, h), device, gen, dtype=dtype), draw((h, h), device, gen, h ** -0.5, dtype)
    w_gu = draw((2 * f, h), device, gen, 4 * h ** -0.5, dtype)
    norm_w = (1 + draw((h,), device, gen, 0.3)).to(dtype)
    residual = draw((m, h), device, gen, 3.0, dtype)

    res_ref = residual.clone()
    hidden = ops.dense_gemv(attn, w_o)
    ops.fused_add_rms_norm(hidden, res_ref, norm_w, EPS)
    expected = ops.dense_gemv_silu_mul(hidden, w_gu)

    sq_sums = ops.dense_gemv_add_residual(attn, w_o, residual)
    out = ops.rms_norm_dense_gemv(residual, sq_sums, norm_w, EPS, w_gu, silu_mul=True)
    assert torch.equal(residual, res_ref)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -6, atol=1e-3)


def test_strided_x_and_poisoned_out(device):
    """x rows with a stride beyond K, out a NaN-filled wider buffer: only out's [M, N] is written."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, n, k = 6, 48, 192
    x_full, _, norm_w, weight, b = norm_inputs(m, n, k + 64, dtype, device, True, seed=3)
    x, norm_w, weight = x_full[:, 64:], norm_w[:k].contiguous(), weight[:, :k].contiguous()
    buf = torch.full((m, n + 8), float("nan"), dtype=dtype, device=device)
    ops.rms_norm_dense_gemv(x, group_sq_sums(x).float(), norm_w, EPS, weight, b, out=buf[:, 8:])
    check_rms_norm_gemv(x, group_sq_sums(x).float(), norm_w, weight, b, False)
    torch.testing.assert_close(buf[:, 8:], ops.rms_norm_dense_gemv(x, group_sq_sums(x).float(), norm_w, EPS, weight, b))
    assert torch.isnan(buf[:, :8]).all()


@pytest.mark.parametrize("m", [3, 16])
def test_opcheck(device, m):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, weight, b, residual = add_residual_inputs(m, 40, 64, dtype, device, True, seed=4)
    sq_sums = torch.empty(m, 3, dtype=torch.float32, device=device)
    nxt = torch.randn(48, 64, dtype=dtype, device=device)  # a next weight to prefetch (gemv.cuh)
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_add_residual.default, (residual, sq_sums, x, weight, b))
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_add_residual.default,
                          (residual, sq_sums, x, weight, b, nxt, 4096, True))
    x, sq_sums, norm_w, weight, b = norm_inputs(m, 32, 64, dtype, device, True, seed=5)
    for silu_mul, bias, cols in ((False, b, 32), (True, None, 16)):
        out = torch.empty(m, cols, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.fastinfer.rms_norm_dense_gemv.default,
                              (out, x, sq_sums, norm_w, EPS, weight, bias, silu_mul))
        torch.library.opcheck(torch.ops.fastinfer.rms_norm_dense_gemv.default,
                              (out, x, sq_sums, norm_w, EPS, weight, bias, silu_mul, nxt, 1 << 20, False))


# ---- input validation -----------------------------------------------------------------------------------

def _add_residual_args() -> dict:
    return dict(x=torch.randn(2, 64), weight=torch.randn(40, 64), residual=torch.randn(2, 40), bias=None)


@pytest.mark.parametrize("change, match", [
    (dict(residual=torch.randn(2, 39)), "residual must have shape"),
    (dict(residual=torch.randn(2, 40, dtype=torch.float16)), "residual must have dtype"),
    (dict(residual=torch.randn(40, 2).t()), "residual .*contiguous"),
    (dict(residual=torch.randn(1, 40).expand(2, 40)), "residual rows must be contiguous and distinct"),
    (dict(residual=None), "residual must be a torch.Tensor"),
    (dict(sq_sums=torch.empty(2, 2)), "sq_sums must have shape"),
    (dict(sq_sums=torch.empty(2, 3, dtype=torch.float64)), "sq_sums must have dtype"),
    (dict(x=torch.randn(33, 64), residual=torch.randn(33, 40)), "x must have 1 to 32 rows"),
    (dict(weight=torch.randn(40, 72)), "weight must have shape"),
    (dict(bias=torch.randn(39)), "bias must have shape"),
])
def test_add_residual_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.dense_gemv_add_residual(**{**_add_residual_args(), **change})


def test_add_residual_rejects_x_in_the_residual():
    """x and residual in one buffer would race on the GPU (the residual is written while x is read)."""
    buf = torch.randn(2, 128)
    with pytest.raises(ValueError, match="residual must not share memory with x"):
        ops.dense_gemv_add_residual(buf[:, :64], torch.randn(64, 64), buf[:, 64:])


def _norm_args() -> dict:
    return dict(x=torch.randn(2, 64), sq_sums=torch.rand(2, 4), norm_weight=torch.randn(64), eps=EPS,
                weight=torch.randn(32, 64))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(17, 64), sq_sums=torch.rand(17, 4)), "x must have 1 to 16 rows"),
    (dict(sq_sums=torch.rand(3, 4)), r"sq_sums must be \[M = 2, ceil\(K / 16\) = 4\]"),
    (dict(sq_sums=torch.rand(2, 3)), r"sq_sums must be \[M = 2, ceil\(K / 16\) = 4\]"),
    (dict(sq_sums=torch.rand(2, 4, dtype=torch.float64)), "sq_sums must have dtype"),
    (dict(norm_weight=torch.randn(60)), "norm_weight must have shape"),
    (dict(norm_weight=torch.randn(64, dtype=torch.float16)), "norm_weight must have dtype"),
    (dict(weight=torch.randn(24, 64), silu_mul=True), "weight must have 2 F rows"),
    (dict(bias=torch.randn(32), silu_mul=True), "bias must be None with silu_mul"),
    (dict(bias=torch.randn(31)), "bias must have shape"),
    (dict(out=torch.empty(2, 16)), "out must have shape"),
])
def test_rms_norm_gemv_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.rms_norm_dense_gemv(**{**_norm_args(), **change})


# ---- dense_gemv_rope_cache --------------------------------------------------------------------------------

def rope_inputs(m, heads, kv_heads, d, k, dtype, device, bias, norm, seed, block_size=16, num_blocks=8):
    """x, W, bias, positions, cos_sin, a NaN-poisoned cache, slots (one -1), sq_sums, norm weight."""
    gen, host_gen = make_gen(device, seed), torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * d
    x = draw((m, k), device, gen, 3.0 if norm else 1.0, dtype)
    weight = draw((n, k), device, gen, k ** -0.5, dtype)
    b = draw((n,), device, gen, dtype=dtype) if bias else None
    positions = torch.randint(0, 500, (m,), generator=host_gen).to(device)
    cos_sin = cos_sin_cache(d, 512, 10000.0, None, device)
    kv_cache = torch.full((num_blocks, 2, block_size, kv_heads, d), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=host_gen)[:m]
    if m > 1:
        slots[m // 2] = -1  # a padding row: computed, not cached
    sq_sums = group_sq_sums(x).float() if norm else None
    norm_w = (1 + draw((k,), device, gen, 0.3)).to(dtype) if norm else None
    return x, weight, b, positions, cos_sin, kv_cache, slots.to(device), sq_sums, norm_w


def rope_unfused(x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w, heads, weight_scale=None):
    """The same step on the unfused ops: returns (q, cache). weight_scale: an FP8 weight's (test_gemv_fp8.py)."""
    kv_heads, d = kv_cache.shape[3], kv_cache.shape[4]
    if sq_sums is None:
        qkv = ops.dense_gemv(x, weight, b, weight_scale=weight_scale)
    else:
        qkv = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b, weight_scale=weight_scale)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(-1, heads, d), k.view(-1, kv_heads, d), v.view(-1, kv_heads, d)
    cache = kv_cache.clone()
    ops.rotary_embedding_and_cache(positions, q, k, v, cos_sin, cache, slots)
    return q.contiguous(), cache


def rope_reference(x, weight, b, positions, cos_sin, kv_cache, slots, norm_w, heads):
    """fp64: (norm,) projection, rotation of q and k, the cache with k / v in their slots."""
    kv_heads, d = kv_cache.shape[3], kv_cache.shape[4]
    x64 = x.double()
    if norm_w is not None:
        x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()
    qkv = torch.nn.functional.linear(x64, weight.double(), None if b is None else b.double())
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    cs = cos_sin[positions].double()
    cos, sin = cs[:, : d // 2].repeat(1, 2), cs[:, d // 2:].repeat(1, 2)
    q = ref.rotary_embedding(q.reshape(-1, heads, d), cos, sin, torch.float64)
    k = ref.rotary_embedding(k.reshape(-1, kv_heads, d), cos, sin, torch.float64)
    cache = ref.reshape_and_cache(k, v.reshape(-1, kv_heads, d), kv_cache.double(), slots)
    return q, cache


def check_rope(args, heads, device_exact: bool, weight_scale=None):
    """weight_scale: args' weight is e4m3 with these row scales (test_gemv_fp8.py), the reference's
    weight its dequantized values."""
    x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = args
    cache = kv_cache.clone()
    q = ops.dense_gemv_rope_cache(x, weight, positions, cos_sin, cache, slots, heads, b, sq_sums, norm_w, EPS,
                                  weight_scale=weight_scale)
    q_unfused, cache_unfused = rope_unfused(*args, heads, weight_scale=weight_scale)
    w64 = weight.double() if weight_scale is None else weight.double() * weight_scale.double()[:, None]
    q_ref, cache_ref = rope_reference(x, w64, b, positions, cos_sin, kv_cache, slots, norm_w, heads)
    written = ~torch.isnan(cache_ref)
    assert torch.equal(torch.isnan(cache), ~written), "cache slots written != the slot_mapping's"
    for ours, unfused, expected in ((q, q_unfused, q_ref), (cache[written], cache_unfused[written], cache_ref[written])):
        err = (ours.double() - expected).abs().max().item()
        baseline = (unfused.double() - expected).abs().max().item()
        assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x unfused {baseline:.3g} + 1e-5"
        if device_exact:
            assert torch.equal(ours, unfused)
        else:
            same = (ours == unfused).float().mean().item()
            assert same >= 0.99, f"only {same:.1%} of the values equal the unfused ops'"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m, heads, kv_heads, d, k", [(1, 4, 2, 16, 64), (3, 2, 2, 32, 72), (16, 4, 1, 16, 200),
                                                      (5, 3, 1, 64, 136)])
@pytest.mark.parametrize("mode", ["plain", "bias", "norm", "norm+bias"])
def test_rope_cache_cpu_is_the_composition(m, heads, kv_heads, d, k, dtype, mode):
    args = rope_inputs(m, heads, kv_heads, d, k, dtype, "cpu", "bias" in mode, "norm" in mode, seed=m * 5 + d)
    check_rope(args, heads, device_exact=True)


@pytest.mark.parametrize("m", [17, 32])
def test_rope_cache_cpu_large_m_without_norm(m):
    check_rope(rope_inputs(m, 2, 1, 16, 64, torch.float32, "cpu", True, False, seed=m), 2, device_exact=True)


def _rope_args(**change) -> dict:
    x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = rope_inputs(2, 2, 1, 16, 64, torch.float32,
                                                                                     "cpu", False, True, seed=0)
    args = dict(x=x, weight=weight, positions=positions, cos_sin_cache=cos_sin, kv_cache=kv_cache, slot_mapping=slots,
                num_heads=2, sq_sums=sq_sums, norm_weight=norm_w)
    return {**args, **change}


@pytest.mark.parametrize("change, match", [
    (dict(num_heads=3), r"weight must have \(num_heads \+ 2 num_kv_heads\) head_dim"),
    (dict(kv_cache=torch.zeros(8, 2, 16, 1, 16, dtype=torch.float8_e4m3fn)), "an FP8 cache takes rotary_embedding_and_cache"),
    (dict(kv_cache=torch.zeros(8, 2, 16, 1, 16, dtype=torch.float16)), "kv_cache must have dtype"),
    (dict(kv_cache=torch.zeros(8, 2, 16, 4, 8), weight=torch.randn(64, 64)), "head_dim must be a multiple of 16"),
    (dict(cos_sin_cache=cos_sin_cache(8, 512, 10000.0, None)), "cos_sin_cache must rotate the whole head"),
    (dict(positions=torch.tensor([0, 512])), r"positions must lie in \[0, 512\)"),
    (dict(positions=torch.tensor([0, 1], dtype=torch.int32)), "positions must have dtype"),
    (dict(slot_mapping=torch.tensor([0, 128])), "slot_mapping values must be -1 or in"),
    (dict(slot_mapping=torch.tensor([0])), "slot_mapping must have shape"),
    (dict(norm_weight=None), "sq_sums and norm_weight come together"),
    (dict(sq_sums=torch.rand(2, 3)), r"sq_sums must be \[M = 2, ceil\(K / 16\) = 4\]"),
    (dict(bias=torch.randn(63)), "bias must have shape"),
    (dict(out=torch.empty(2, 2, 16).transpose(0, 1)), "out must have"),
    (dict(out=torch.empty(1, 2, 16).expand(2, 2, 16)), "out must have contiguous heads and distinct rows"),
    (dict(kv_cache=torch.zeros(0, 2, 16, 1, 16)), "kv_cache must have blocks"),
])
def test_rope_cache_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.dense_gemv_rope_cache(**_rope_args(**change))


def test_rope_cache_rejects_shared_memory():
    """out carved from x's buffer would be written while other CTAs still read x."""
    buf = torch.randn(2, 96)
    args = _rope_args(x=buf[:, :64])
    with pytest.raises(ValueError, match="must not share memory"):
        ops.dense_gemv_rope_cache(**args, out=buf[:, 64:].view(2, 2, 16))


def test_rope_cache_opcheck(device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = rope_inputs(3, 2, 1, 16, 64, dtype, device,
                                                                                     True, True, seed=8)
    q = torch.empty(3, 2, 16, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_rope_cache.default,
                          (q, kv_cache.nan_to_num(0.0), x, weight, b, positions, cos_sin, slots, sq_sums, norm_w, EPS))
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_rope_cache.default,
                          (q, kv_cache.nan_to_num(0.0), x, weight, b, positions, cos_sin, slots, sq_sums, norm_w, EPS,
                           weight, 8192, False))


ROPE_SHAPES = [  # (M, heads, kv_heads, head_dim, K, mode): Llama-3-8B, Qwen2-style bias, head_dim 64
    (1, 32, 8, 128, 4096, "norm"), (8, 32, 8, 128, 4096, "norm"), (16, 32, 8, 128, 4096, "plain"),
    (3, 14, 2, 64, 896, "norm+bias"), (5, 4, 4, 64, 1000, "bias"), (17, 8, 2, 128, 1024, "plain"),
    (32, 8, 1, 64, 512, "bias"), (9, 4, 2, 128, 4104, "norm")]


@pytest.mark.cuda
@pytest.mark.parametrize("preload", ["off", "on"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, heads, kv_heads, d, k, mode", ROPE_SHAPES)
def test_rope_cache_cuda(monkeypatch, m, heads, kv_heads, d, k, mode, dtype, preload):
    monkeypatch.setenv("FASTINFER_GEMV_NORM_PRELOAD", preload)  # (only the "norm" modes have a prologue)
    args = rope_inputs(m, heads, kv_heads, d, k, dtype, "cuda", "bias" in mode, "norm" in mode, seed=m + heads + d,
                       num_blocks=max(8, m))
    check_rope(args, heads, device_exact=False)


# ---- embedding (+ the first layer's sums of squares) ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hidden", [8, 64, 200])
def test_embedding(device, dtype, hidden):
    """Rows of the table exactly, and the sums of squares per 16 columns (a short last group at 200 and 8)."""
    gen = make_gen(device, hidden)
    weight = draw((50, hidden), device, gen, 2.0, dtype)
    ids = torch.tensor([3, 0, 49, 3, 17], device=device)
    out, sq_sums = ops.embedding(ids, weight, return_sq_sums=True)
    assert torch.equal(out, weight[ids])
    torch.testing.assert_close(sq_sums.double(), group_sq_sums(out), rtol=1e-5, atol=1e-6)
    assert torch.equal(ops.embedding(ids, weight), out)


def test_embedding_errors_name_the_argument():
    weight = torch.randn(10, 16)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 10\)"):
        ops.embedding(torch.tensor([3, 10]), weight)
    with pytest.raises(ValueError, match="input_ids must have dtype torch.int64"):
        ops.embedding(torch.tensor([3], dtype=torch.int32), weight)
    with pytest.raises(ValueError, match="weight must .*contiguous"):
        ops.embedding(torch.tensor([3]), torch.randn(16, 10).t())
    with pytest.raises(ValueError, match="out must have shape"):
        ops.embedding(torch.tensor([3]), weight, out=torch.empty(2, 16))


def test_embedding_out_of_range_ids_unchecked_give_nan_rows():
    """With check_indices=False (the engine validated the prompts) a bad id reads nothing outside the
    table: its row (and its sums) are NaN, the others exact."""
    weight = torch.randn(10, 16)
    out, sq_sums = ops.embedding(torch.tensor([2, 10, -1]), weight, return_sq_sums=True, check_indices=False)
    assert torch.equal(out[0], weight[2]) and torch.isnan(out[1:]).all() and torch.isnan(sq_sums[1:]).all()


def test_embedding_opcheck(device):
    weight = torch.randn(20, 48, device=device)
    ids = torch.tensor([1, 19, 4], device=device)
    out, sums = torch.empty(3, 48, device=device), torch.empty(3, 3, device=device)
    torch.library.opcheck(torch.ops.fastinfer.embedding.default, (out, sums, ids, weight))
    torch.library.opcheck(torch.ops.fastinfer.embedding.default, (out, None, ids, weight))


def test_lm_head_norm_with_fp32_logits(device):
    """The final norm in the LM head: rms_norm_dense_gemv with out_dtype=float32 is the bf16 result widened."""
    dtype = torch.bfloat16
    x, sq_sums, norm_w, weight, _ = norm_inputs(3, 72, 64, dtype, device, False, seed=11)
    logits = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, out_dtype=torch.float32)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight).float())
    assert torch.equal(ops.dense_gemv(x, weight, out_dtype=torch.float32), ops.dense_gemv(x, weight).float())
    with pytest.raises(ValueError, match="out_dtype must be None .* with silu_mul"):
        ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight[:64], silu_mul=True, out_dtype=torch.float32)


# ---- the model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, rope", [("llama", "1"), ("qwen2", "1"), ("llama-tied", "1"), ("llama", "0"),
                                           ("qwen2", "0"), ("qwen3", "1"), ("phi3", "1"), ("phi3-partial", "1")])
def test_model_fused_norms_greedy_matches_hf(monkeypatch, variant, rope):
    """With the decode GEMV forced on the CPU, steps of <= 16 tokens take the fused path (the spies see
    it: with FASTINFER_FUSED_ROPE=0 the rotary stays a separate op, and so it does for Qwen3, whose q / k
    heads are normalized between the projection and rotary) and greedy output is still HF's token for
    token (fp32, left-padded batch)."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    monkeypatch.setenv("FASTINFER_FUSED_ROPE", rope)
    model = make_hf_model(variant, seed=5, head_dim=16)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, 0, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    calls = []
    for name in ("rms_norm_dense_gemv", "dense_gemv_rope_cache"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=0, **kw)
    assert "rms_norm_dense_gemv" in calls, "the fused path did not run"
    # Qwen3's head norms and a partial rotary keep the rotary + KV write kernel
    assert ("dense_gemv_rope_cache" in calls) == (rope == "1" and variant not in ("qwen3", "phi3-partial"))
    assert torch.equal(ours, expected)


def test_model_fuse_norms_decision(monkeypatch):
    from fastinfer.generate import get_loaded
    model = get_loaded(make_hf_model("llama"), dtype=torch.float32).model
    assert not model.fuse_norms(1)  # the CPU: no decode GEMV
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    assert model.fuse_norms(1) and model.fuse_norms(16)
    assert not model.fuse_norms(17)  # the norm prologue takes <= 16 rows
    monkeypatch.setenv("FASTINFER_FUSED_NORM", "0")
    assert not model.fuse_norms(1)
    monkeypatch.delenv("FASTINFER_FUSED_NORM")
    model.layers[1].gate_up = lambda x: x  # a stand-in (GPTQ's recorder): that layer cannot fuse
    assert not model.fuse_norms(1)


# ---- the CUDA kernel --------------------------------------------------------------------------------------

# (M, N, K) for the residual epilogue: every x-tile count (M up to 32), N below / at / above the 16-row
# tile and Llama-3-8B's o / down (4096 from 4096 / 14336), K with a partial chunk.
ADD_RESIDUAL_SHAPES = [(1, 1, 8), (1, 4096, 4096), (2, 17, 1000), (5, 4096, 14336), (8, 113, 64), (9, 4096, 4096),
                       (16, 33, 4104), (17, 4096, 14336), (32, 4096, 4096), (31, 7, 1000)]
# (M, N, K, mode) for the norm prologue: M of one and two x tiles and their edges, Llama-3-8B's qkv
# (6144, with Qwen2-style bias) and gate / up (28672, SwiGLU), K with a partial chunk.
NORM_SHAPES = [(1, 6144, 4096, "bias"), (1, 28672, 4096, "silu_mul"), (2, 17, 1000, "plain"), (3, 48, 8, "plain"),
               (7, 16, 4104, "silu_mul"), (8, 6144, 4096, "plain"), (9, 113, 1000, "bias"), (12, 28672, 4096, "silu_mul"),
               (16, 6144, 4096, "plain"), (16, 48, 14336, "silu_mul")]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", ADD_RESIDUAL_SHAPES)
def test_add_residual_cuda(m, n, k, dtype):
    x, weight, b, residual = add_residual_inputs(m, n, k, dtype, "cuda", (m + n) % 2 == 1, seed=m + n)
    check_add_residual(x, weight, b, residual)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, mode", NORM_SHAPES)
def test_rms_norm_gemv_cuda(m, n, k, mode, dtype):
    silu_mul = mode == "silu_mul"
    x, sq_sums, norm_w, weight, b = norm_inputs(m, n, k, dtype, "cuda", mode == "bias", seed=m * 3 + n, silu_mul=silu_mul)
    out = check_rms_norm_gemv(x, sq_sums, norm_w, weight, b, silu_mul)
    again = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b, silu_mul=silu_mul)
    assert torch.equal(out, again), "two runs differ"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, mode", NORM_SHAPES)
def test_rms_norm_gemv_preload_is_bitwise_the_same(monkeypatch, m, n, k, mode, dtype):
    """FASTINFER_GEMV_NORM_PRELOAD=on loads the first W chunk before the RMSNorm prologue (gemv.cuh
    kPreload): the same arithmetic in the same order, so bit for bit the default kernel's output.
    (The rotary + KV-cache form runs under both in test_rope_cache_cuda.)"""
    silu_mul = mode == "silu_mul"
    x, sq_sums, norm_w, weight, b = norm_inputs(m, n, k, dtype, "cuda", mode == "bias", seed=m * 5 + n, silu_mul=silu_mul)
    outs = {}
    for preload in ("off", "on"):
        monkeypatch.setenv("FASTINFER_GEMV_NORM_PRELOAD", preload)
        outs[preload] = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b, silu_mul=silu_mul)
    assert torch.equal(outs["on"], outs["off"])


@pytest.mark.cuda
def test_rms_norm_gemv_preload_setting_is_checked(monkeypatch):
    x, sq_sums, norm_w, weight, b = norm_inputs(2, 64, 256, torch.bfloat16, "cuda", False, seed=3)
    monkeypatch.setenv("FASTINFER_GEMV_NORM_PRELOAD", "yes")
    with pytest.raises(RuntimeError, match="FASTINFER_GEMV_NORM_PRELOAD must be off or on, got 'yes'"):
        ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b)


@pytest.mark.cuda
def test_cuda_agrees_with_cpu():
    x, sq_sums, norm_w, weight, b = norm_inputs(4, 320, 2048, torch.bfloat16, "cpu", True, seed=9)
    cpu = ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b)
    gpu = ops.rms_norm_dense_gemv(x.cuda(), sq_sums.cuda(), norm_w.cuda(), EPS, weight.cuda(), b.cuda()).cpu()
    torch.testing.assert_close(gpu.float(), cpu.float(), rtol=2 ** -6, atol=1e-3)
    x, weight, b, residual = add_residual_inputs(4, 320, 2048, torch.bfloat16, "cpu", True, seed=10)
    cpu_res, gpu_res = residual.clone(), residual.cuda()
    cpu_sums = ops.dense_gemv_add_residual(x, weight, cpu_res, b)
    gpu_sums = ops.dense_gemv_add_residual(x.cuda(), weight.cuda(), gpu_res, b.cuda()).cpu()
    torch.testing.assert_close(gpu_res.cpu().float(), cpu_res.float(), rtol=2 ** -6, atol=1e-3)
    torch.testing.assert_close(gpu_sums, cpu_sums, rtol=1e-3, atol=1e-3)


def assert_same_choices(got: torch.Tensor, want: torch.Tensor, margin: float = 0.1) -> None:
    """argmax equal on every row whose top two logits (in want) are more than margin apart."""
    top2 = want.float().topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > margin
    assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])


@pytest.mark.cuda
def test_cuda_model_step_runs_no_norm_and_no_cache_write_kernel(monkeypatch):
    """A decode step of the fused path runs no RMSNorm and no rotary / KV-write kernel, only fastinfer
    kernels (embedding, 5 or 6 per layer, the LM head), and its logits agree with the unfused path's
    (FASTINFER_FUSED_NORM=0)."""
    import os

    from fastinfer.generate import get_loaded
    from fastinfer.metadata import SeqChunk
    from fastinfer.runner import ModelRunner
    from test_forward_kernels_cuda import kernel_names

    hf = make_hf_model("llama", seed=3, head_dim=128, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=4, intermediate_size=512)
    runner = ModelRunner(get_loaded(hf, dtype=torch.bfloat16, device="cuda").model, num_blocks=16, block_size=16)
    prompts, tables = [[5, 9, 2, 7, 11, 3, 8], [4, 4, 6, 1, 9]], [[3, 1], [7, 2]]
    runner.run([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
    decode = [SeqChunk([6], len(p), t) for p, t in zip(prompts, tables)]  # rewrites the same slots each time
    runner.run(decode)  # allocates the runner's decode semaphores (a torch fill kernel) before the count
    logits = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("FASTINFER_FUSED_NORM", fused)
        names = kernel_names(lambda: logits.__setitem__(fused, runner.run(decode).clone()))
        norms = [n for n in names if "rms_norm" in n]
        assert len(norms) == (0 if fused == "1" else 2 * 4 + 1), (fused, names)
        cache_writes = [n for n in names if "cache" in n]  # kv::reshape_and_cache_kernel (rotary + KV write)
        assert len(cache_writes) == (0 if fused == "1" else 4), (fused, names)
        if fused == "1":  # embedding, 4 layers x (q/k/v + rotary, attention (+ merge), o, gate / up, down), LM head
            assert all("fastinfer" in n for n in names), names
            assert 1 + 4 * 5 + 1 <= len(names) <= 1 + 4 * 6 + 1, names
    torch.testing.assert_close(logits["1"], logits["0"], rtol=0.05, atol=0.05)
    assert_same_choices(logits["1"], logits["0"])


# ---- L2 prefetch of the next GEMV's weight (gemv.cuh, "L2 prefetch across kernels") ------------------------
# A hint: the three fused-path GEMVs take the next GEMV's weight and ask L2 for its first bytes as they
# finish. No result may change (bitwise, every op and mode, on the GPU), bad arguments are named before
# any kernel runs, and the model hands each GEMV the weight of the GEMV that actually runs next.

def _prefetch_cases(n_rows: int, k: int, dtype, device):
    """Next weights and budgets: none, a few bytes (under 16 per row: nothing issued), budgets capped by
    the row, SwiGLU pairs, 16-byte rows, and a next weight of more rows than its GEMV's first wave
    reads on any GPU (16 x 2 x 132 SMs = 4224 < 8192; plain and SwiGLU)."""
    w = torch.randn(n_rows, k, dtype=dtype, device=device)
    tall = torch.randn(8192, 64, dtype=dtype, device=device)
    return [None, ops.GemvPrefetch(w, 8), ops.GemvPrefetch(w, 1 << 20), ops.GemvPrefetch(w, 1 << 30),
            ops.GemvPrefetch(w, 4096, swiglu=True), ops.GemvPrefetch(w[:, :8].contiguous(), 1 << 20),
            ops.GemvPrefetch(tall, 1 << 20), ops.GemvPrefetch(tall, 1 << 30, swiglu=True)]


@pytest.mark.parametrize("change, match", [
    (dict(prefetch=(torch.randn(16, 64), 1024, False)), "prefetch must be a GemvPrefetch"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(16, 64), -1)), r"prefetch.nbytes must be an int >= 0"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(16, 64), 1.5)), r"prefetch.nbytes must be an int >= 0"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(16, 64), True)), r"prefetch.nbytes must be an int >= 0"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(16, 64), 64, swiglu=1)), r"prefetch.swiglu must be a bool"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(64), 64)), r"prefetch.weight must have 2 dimensions"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(16, 64, dtype=torch.float16), 64)), r"prefetch.weight must have dtype"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(64, 16).t(), 64)), r"prefetch.weight must be contiguous"),
    (dict(prefetch=ops.GemvPrefetch(torch.randn(15, 64), 64, swiglu=True)), r"even number of rows"),
    (dict(prefetch=ops.GemvPrefetch("w", 64)), r"prefetch.weight must be a torch.Tensor"),
])
@pytest.mark.parametrize("op", ["add_residual", "rms_norm", "rope"])
def test_prefetch_errors_name_the_argument(op, change, match):
    if op == "add_residual":
        call = lambda: ops.dense_gemv_add_residual(**{**_add_residual_args(), **change})  # noqa: E731
    elif op == "rms_norm":
        call = lambda: ops.rms_norm_dense_gemv(**{**_norm_args(), **change})  # noqa: E731
    else:
        x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = rope_inputs(
            2, 2, 1, 16, 64, torch.float32, "cpu", False, True, seed=4)
        call = lambda: ops.dense_gemv_rope_cache(x, weight, positions, cos_sin, kv_cache, slots, 2,  # noqa: E731
                                                 sq_sums=sq_sums, norm_weight=norm_w, **change)
    with pytest.raises(ValueError, match=match):
        call()


def check_prefetch_changes_nothing(device, dtype, m, n, k, seed):
    """Every fused-path op, every prefetch case: the outputs of the call without a prefetch, bit for bit."""
    cases = _prefetch_cases(24, k, dtype, device)
    x, weight, b, residual = add_residual_inputs(m, n, k, dtype, device, True, seed=seed)
    outs = []
    for pf in cases:
        res = residual.clone()
        sums = ops.dense_gemv_add_residual(x, weight, res, b, prefetch=pf)
        outs.append((res, sums))
    assert all(torch.equal(r, outs[0][0]) and torch.equal(s, outs[0][1]) for r, s in outs), "add_residual"
    for silu_mul in (False, True):
        x, sq_sums, norm_w, weight, b = norm_inputs(m, 2 * n, k, dtype, device, not silu_mul, seed=seed + 1,
                                                    silu_mul=silu_mul)
        outs = [ops.rms_norm_dense_gemv(x, sq_sums, norm_w, EPS, weight, b, silu_mul=silu_mul, prefetch=pf)
                for pf in cases]
        assert all(torch.equal(o, outs[0]) for o in outs), f"rms_norm_dense_gemv silu_mul={silu_mul}"
    x, weight, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = rope_inputs(
        m, 4, 2, 64, k, dtype, device, True, True, seed=seed + 2, num_blocks=max(8, m))
    outs = []
    for pf in cases:
        cache = kv_cache.clone()
        q = ops.dense_gemv_rope_cache(x, weight, positions, cos_sin, cache, slots, 4, b, sq_sums, norm_w, EPS,
                                      prefetch=pf)
        outs.append((q, cache))
    assert all(torch.equal(q, outs[0][0]) and torch.equal(c.nan_to_num(7.0), outs[0][1].nan_to_num(7.0))
               for q, c in outs), "dense_gemv_rope_cache"


def test_prefetch_changes_nothing_cpu():
    check_prefetch_changes_nothing(torch.device("cpu"), torch.float32, 3, 40, 72, seed=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (3, 40, 72), (8, 2048, 14336), (16, 136, 1000)])
def test_prefetch_changes_nothing_cuda(m, n, k, dtype):
    check_prefetch_changes_nothing(torch.device("cuda"), dtype, m, n, k, seed=m + n)


@pytest.mark.cuda
@pytest.mark.parametrize("swiglu", [False, True])
def test_prefetch_plan_is_made_at_launch(swiglu):
    """A GEMV given a prefetch plans it from the device's resident CTAs (fastinfer._C.gemv_last_prefetch):
    the plan gemm/gemv_prefetch.h's rule gives for those counts, and not an empty one for Llama-3-8B's o -> gate_up."""
    from fastinfer import _C
    x, weight, b, residual = add_residual_inputs(1, 4096, 4096, torch.bfloat16, "cuda", False, seed=3)
    nxt = torch.randn(28672, 4096, dtype=torch.bfloat16, device="cuda")
    ops.dense_gemv_add_residual(x, weight, residual, prefetch=ops.GemvPrefetch(nxt, 8 << 20, swiglu=swiglu))
    info = _C.gemv_last_prefetch()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert info["tiles"] == 256 and info["slots"] >= sms and info["slots"] % sms == 0, info
    want = _C.plan_gemv_prefetch(28672, 8192, 8 << 20, swiglu, info["slots"], info["tiles"])
    assert (info["rows"], info["second"], info["bytes"], info["first_cta"]) == want
    assert info["rows"] > 0 and info["bytes"] >= 1024


@pytest.mark.parametrize("args, want", [
    # (next_rows, row_bytes, budget, swiglu, slots, tiles) -> (rows, second, bytes, first_cta)
    ((4096, 8192, 8 << 20, False, 264, 384), (4096, -1, 2048, 264)),       # qkv -> o: o fits one wave; qkv's last 120 CTAs
    ((28672, 8192, 8 << 20, True, 264, 256), (2112, 14336, 2048, 0)),      # o -> gate_up: 264 CTAs x 8 gate + 8 up rows
    ((4096, 28672, 8 << 20, False, 264, 1792), (4096, -1, 2048, 1584)),    # gate_up -> down: its last 208 CTAs
    ((6144, 8192, 16 << 20, False, 264, 256), (4224, -1, 4096, 0)),        # down -> qkv: qkv's first wave, 16 MB
    ((6144, 8192, 8 << 20, False, 264, 528), (4224, -1, 2048, 264)),       # a grid of whole waves: the last one
    ((6144, 8192, 1 << 40, False, 264, 10), (4224, -1, 8192, 0)),          # capped by the row
    ((64, 16, 1 << 20, False, 264, 10), (64, -1, 16, 0)),                  # 16-byte rows
    ((64, 8192, 64 * 100, False, 264, 10), (64, -1, 96, 0)),               # under 256 a row: multiples of 16
    ((6144, 8192, 4224 * 15, False, 264, 10), (0, -1, 0, 0)),              # under 16 bytes a row: none
    ((6144, 1 << 22, 1 << 40, False, 264, 10), (4224, -1, 1 << 19, 0)),    # the instruction's 512 KiB cap
    ((4096, 8192, 8 << 20, False, 0, 384), (0, -1, 0, 0)),                 # no slots known: none
])
def test_prefetch_plan(args, want):
    """gemm/gemv_prefetch.h: which rows of the next weight, how many bytes of each, which CTAs issue."""
    from fastinfer import _C
    assert _C.plan_gemv_prefetch(*args) == want


def test_prefetch_setting_is_checked(monkeypatch):
    from fastinfer.models.llama import gemv_prefetch_bytes
    monkeypatch.delenv("FASTINFER_GEMV_PREFETCH_MB", raising=False)
    assert gemv_prefetch_bytes() == 0
    monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", "8")
    assert gemv_prefetch_bytes() == 8 << 20
    monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", "0.5")
    assert gemv_prefetch_bytes() == 1 << 19
    for bad in ("-1", "lots", "4096", "nan"):
        monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", bad)
        with pytest.raises(ValueError, match="FASTINFER_GEMV_PREFETCH_MB"):
            gemv_prefetch_bytes()


@pytest.mark.parametrize("all_rows", [True, False], ids=["lm_head_fused", "lm_head_gathered"])
def test_model_prefetches_the_weight_that_runs_next(monkeypatch, all_rows):
    """With the decode GEMV forced on the CPU and FASTINFER_GEMV_PREFETCH_MB=2, every fused-path GEMV's
    prefetch is the weight of the GEMV the step runs next (the LM head after the last layer), with twice
    the budget across attention and the SwiGLU flag exactly before gate / up; greedy output unchanged."""
    from fastinfer.generate import get_loaded
    transformers = pytest.importorskip("transformers")  # noqa: F841
    model = make_hf_model("llama", seed=7, head_dim=16)
    ids, mask = left_padded_batch([6, 3], model.config.vocab_size, 0, seed=4)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    outputs = {}
    for mb in ("0", "2"):
        monkeypatch.setenv("FASTINFER_GEMV_PREFETCH_MB", mb)
        outputs[mb] = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=0, **kw)
    assert torch.equal(outputs["2"], outputs["0"])

    loaded = get_loaded(model, dtype=torch.float32).model
    calls = []  # (weight, prefetch) of every GEMV, in launch order
    for name in ("rms_norm_dense_gemv", "dense_gemv_rope_cache", "dense_gemv_add_residual", "dense_gemv"):
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            weight = a[4] if _name == "rms_norm_dense_gemv" else a[1]
            calls.append((_name, weight, k.get("prefetch")))
            return _real(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    from fastinfer.metadata import SeqChunk
    from fastinfer.runner import ModelRunner
    runner = ModelRunner(loaded, num_blocks=8, block_size=16)
    prefill = [SeqChunk([5, 9, 2], 0, [1])]
    if all_rows:  # a decode step: every row's logits, the final norm in the LM head's GEMV
        runner.run(prefill)
        calls.clear()
        runner.run([SeqChunk([6], 3, [1])])
    else:  # a 3-token prefill: the last row's logits, the final norm then the LM head (dense_gemv) on it
        runner.run(prefill)
    layers = loaded.layers
    expected_weights = [w for layer in layers for w in (layer.qkv.weight, layer.o_proj.weight, layer.gate_up.weight,
                                                        layer.down.weight)] + [loaded.lm_head]
    assert len(calls) == len(expected_weights), [c[0] for c in calls]
    assert all(c[1] is w for c, w in zip(calls, expected_weights)), [c[0] for c in calls]
    assert calls[-1][0] == ("rms_norm_dense_gemv" if all_rows else "dense_gemv")
    budget = 2 << 20
    for i, (name, weight, pf) in enumerate(calls[:-1]):
        assert pf is not None, (i, name)
        assert pf.weight is expected_weights[i + 1], (i, name)
        assert pf.nbytes == (2 * budget if i % 4 == 0 else budget), (i, name)
        assert pf.swiglu == (i % 4 == 1), (i, name)
    assert calls[-1][2] is None  # the LM head: nothing after it in the step
