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

The model (models/llama.py, fuse_norms) takes this path for steps of <= 16 tokens on the decode GEMV:
its greedy output must stay HF's (forced here on the CPU), and on the GPU a decode step must run two
RMSNorm kernels whatever the depth.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import ops
from fastinfer.models import linear as linear_mod
from models import left_padded_batch, make_hf_model

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
EPS = 1e-5


def draw(shape, device, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def add_residual_inputs(m, n, k, dtype, device, bias, seed):
    gen = torch.Generator().manual_seed(seed)
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
    gen = torch.Generator().manual_seed(seed)
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
    gen = torch.Generator().manual_seed(2)
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
    torch.library.opcheck(torch.ops.fastinfer.dense_gemv_add_residual.default, (residual, sq_sums, x, weight, b))
    x, sq_sums, norm_w, weight, b = norm_inputs(m, 32, 64, dtype, device, True, seed=5)
    for silu_mul, bias, cols in ((False, b, 32), (True, None, 16)):
        out = torch.empty(m, cols, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.fastinfer.rms_norm_dense_gemv.default,
                              (out, x, sq_sums, norm_w, EPS, weight, bias, silu_mul))


# ---- input validation -----------------------------------------------------------------------------------

def _add_residual_args() -> dict:
    return dict(x=torch.randn(2, 64), weight=torch.randn(40, 64), residual=torch.randn(2, 40), bias=None)


@pytest.mark.parametrize("change, match", [
    (dict(residual=torch.randn(2, 39)), "residual must have shape"),
    (dict(residual=torch.randn(2, 40, dtype=torch.float16)), "residual must have dtype"),
    (dict(residual=torch.randn(40, 2).t()), "residual .*contiguous"),
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
    (dict(sq_sums=torch.rand(3, 4)), r"sq_sums must be \[M = 2, groups >= 1\]"),
    (dict(sq_sums=torch.rand(2, 0)), r"sq_sums must be \[M = 2, groups >= 1\]"),
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


# ---- the model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "qwen2", "llama-tied"])
def test_model_fused_norms_greedy_matches_hf(monkeypatch, variant):
    """With the decode GEMV forced on the CPU, steps of <= 16 tokens take the fused path (the spy sees
    it) and greedy output is still HF's token for token (fp32, left-padded batch)."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    model = make_hf_model(variant, seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, 0, seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=0, **kw)
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    calls = []
    real = ops.rms_norm_dense_gemv
    monkeypatch.setattr(ops, "rms_norm_dense_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=0, **kw)
    assert calls, "the fused path did not run"
    assert torch.equal(ours, expected)


def test_model_fuse_norms_decision(monkeypatch):
    from fastinfer.generate import get_loaded
    model = get_loaded(make_hf_model("llama"), dtype=torch.float32).model
    h = model.config.hidden_size
    assert not model.fuse_norms(torch.zeros(1, h))  # the CPU: no decode GEMV
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    assert model.fuse_norms(torch.zeros(1, h)) and model.fuse_norms(torch.zeros(16, h))
    assert not model.fuse_norms(torch.zeros(17, h))  # the norm prologue takes <= 16 rows
    monkeypatch.setenv("FASTINFER_FUSED_NORM", "0")
    assert not model.fuse_norms(torch.zeros(1, h))
    monkeypatch.delenv("FASTINFER_FUSED_NORM")
    model.layers[1].gate_up = lambda x: x  # a stand-in (GPTQ's recorder): that layer cannot fuse
    assert not model.fuse_norms(torch.zeros(1, h))


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


@pytest.mark.cuda
def test_cuda_model_step_runs_two_norm_kernels():
    """A decode step of the fused path runs the first layer's and the final RMSNorm only, at any depth,
    and its logits agree with the unfused path's (FASTINFER_FUSED_NORM=0)."""
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
    logits = {}
    for fused in ("1", "0"):
        os.environ["FASTINFER_FUSED_NORM"] = fused
        try:
            names = kernel_names(lambda: logits.__setitem__(fused, runner.run(decode).clone()))
        finally:
            os.environ.pop("FASTINFER_FUSED_NORM", None)
        norms = [n for n in names if "rms_norm" in n]
        assert len(norms) == (2 if fused == "1" else 2 * 4 + 1), (fused, names)
    torch.testing.assert_close(logits["1"], logits["0"], rtol=0.05, atol=0.05)
    assert torch.equal(logits["1"].argmax(-1), logits["0"].argmax(-1))
