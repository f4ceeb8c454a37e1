"""The decode GEMV family with FP8 weights (W8A16): weight e4m3 [N, K], weight_scale fp32 [N], x 16-bit.

Contract (csrc/include/fastinfer/gemm/gemv.cuh, "FP8 weights"): out = round(x @ float(W)^T * scale +
bias), x kept in its dtype, each weight converted exactly. Judged by DESIGN.md's rule against an fp64
reference of the same product: max error <= 2 x that of the same-dtype torch computation
(F.linear(x, W.to(dtype)) * scale, rounded) + 1e-5. The fused ops are compared with the unfused FP8 ops
on the same device as their 16-bit versions are (tests/test_gemv_fused_norm.py): bitwise for the
SwiGLU and residual epilogues, >= 99% equal for the RMSNorm prologue and the rotary epilogue. One test
feeds every e4m3 code through the kernel and reads it back exactly (the in-register conversion). The
model takes this path for decode steps with FASTINFER_FP8_DECODE=w8a16 (forced here on the CPU).
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
import reference as ref
from fastinfer import ops
from fastinfer.models import linear as linear_mod
from models import make_hf_model
from test_gemv_fused_norm import EPS, check_rope, group_sq_sums, rope_inputs

FP8 = torch.float8_e4m3fn
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def fp8_weight(n: int, k: int, device, gen: torch.Generator, spread: float = 1.0):
    """An e4m3 weight [n, k] with per-row scales (amax / 448), from a Gaussian of std spread / sqrt(k)."""
    w = torch.randn(n, k, generator=gen, device=gen.device) * spread * k ** -0.5
    scale = (w.abs().amax(dim=1) / 448.0).clamp(min=1e-12)
    return (w / scale[:, None]).to(FP8).to(device), scale.float().to(device)


def inputs(m, n, k, dtype, device, bias: bool, seed: int, spread: float = 1.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    w, scale = fp8_weight(n, k, device, gen, spread)
    b = torch.randn(n, generator=gen, device=device).to(dtype) if bias else None
    return x, w, scale, b


def expected64(x, w, scale, b):
    y = x.double() @ w.double().t() * scale.double()
    return y if b is None else y + b.double()


def same_dtype(x, w, scale, b):
    """What torch computes in x's dtype: the dequantized-code matmul, scaled, biased, rounded."""
    y = torch.nn.functional.linear(x, w.to(x.dtype)).float() * scale
    return (y if b is None else y + b.float()).to(x.dtype)


def check_close(ours, x, w, scale, b):
    assert torch.isfinite(ours).all()
    expected = expected64(x, w, scale, b)
    err = (ours.double() - expected).abs().max().item()
    baseline = (same_dtype(x, w, scale, b).double() - expected).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x same-dtype torch {baseline:.3g} + 1e-5"


# ---- the CPU reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m, n, k", [(1, 1, 16), (3, 7, 64), (8, 113, 1008), (16, 33, 528)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_cpu_matches_reference(m, n, k, dtype, bias):
    x, w, scale, b = inputs(m, n, k, dtype, "cpu", bias, seed=m * 100 + n)
    check_close(ops.dense_gemv(x, w, b, weight_scale=scale), x, w, scale, b)


def test_scale_is_applied_per_row():
    x, w, scale, _ = inputs(2, 5, 32, torch.float32, "cpu", False, seed=1)
    base = ops.dense_gemv(x, w, weight_scale=scale)
    doubled = scale.clone()
    doubled[3] *= 2
    out = ops.dense_gemv(x, w, weight_scale=doubled)
    assert torch.equal(out[:, [0, 1, 2, 4]], base[:, [0, 1, 2, 4]])
    torch.testing.assert_close(out[:, 3], 2 * base[:, 3])


def all_codes_case(m: int, offset: int, dtype, device):
    """x [m, 256] one-hot at columns 17 i, W [16, 256] with W[n, k] = code (k + 16 n + offset) % 256: output
    (i, n) reads code 17 i + 16 n + offset (mod 256): low nibble i + offset, high nibble i + n (+ a carry).
    m = 16, offset 0 runs over all 256 codes; m = 8 with offsets 0 and 8 does, in two calls, on the one-tile
    kernel. The two NaN codes are replaced by 0; scale 1."""
    rows = torch.arange(m)
    x = torch.zeros(m, 256)
    x[rows, 17 * rows] = 1.0
    codes = (torch.arange(256)[None, :] + 16 * torch.arange(16)[:, None] + offset) % 256
    codes[(codes == 0x7F) | (codes == 0xFF)] = 0
    w = codes.to(torch.uint8).view(FP8)
    expected = w.float()[:, 17 * rows].t()  # [i, n] = W[n, 17 i]
    return x.to(dtype).to(device), w.to(device), torch.ones(16, device=device), expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_every_e4m3_code_is_converted_exactly(device, dtype, norm):
    """Each kernel the model runs (one x tile, with and without the RMSNorm prologue; and two tiles) reads
    every e4m3 code back exactly, subnormals and 448 included. The prologue sees one-hot rows whose
    sums of squares give 1 / rms = 1 exactly (sum = K, eps = 0) and a norm weight of ones."""
    seen = []
    for m, offset in ((16, 0), (8, 0), (8, 8)):
        x, w, scale, expected = all_codes_case(m, offset, dtype, device)
        if norm:
            sums = torch.zeros(m, 256 // ops.SQ_SUM_GROUP, device=device)
            sums[:, 0] = 256.0
            out = ops.rms_norm_dense_gemv(x, sums, torch.ones(256, dtype=dtype, device=device), 0.0, w,
                                          weight_scale=scale)
        else:
            out = ops.dense_gemv(x, w, weight_scale=scale)
        out = out.float().cpu()
        assert torch.equal(out, expected), (m, offset, (out - expected).abs().max())
        seen.append(expected.flatten())
        if m == 16:
            assert (expected != 0).sum() == 252  # 256 codes less +-0 and the two NaN codes
    both = torch.cat(seen[1:])
    assert (both != 0).sum() == 252 and (both.abs() == 2.0 ** -9).sum() == 2 and both.abs().max() == 448


def test_fused_ops_pass_the_scale_through_on_the_cpu():
    """The CPU spec of each fused op is its composition with the FP8 dense_gemv."""
    x, w, scale, b = inputs(3, 32, 64, torch.float32, "cpu", True, seed=2)
    assert torch.equal(ops.dense_gemv_silu_mul(x, w, weight_scale=scale),
                       ops.silu_and_mul(ops.dense_gemv(x, w, weight_scale=scale)))
    residual = torch.randn(3, 32)
    expected = residual + ops.dense_gemv(x, w, b, weight_scale=scale)
    sq = ops.dense_gemv_add_residual(x, w, residual, b, weight_scale=scale)
    assert torch.equal(residual, expected)
    torch.testing.assert_close(sq.double(), group_sq_sums(residual), rtol=1e-5, atol=1e-6)
    norm_w = torch.rand(64) + 0.5
    sums = group_sq_sums(x).float()
    out = ops.rms_norm_dense_gemv(x, sums, norm_w, EPS, w, b, weight_scale=scale)
    torch.testing.assert_close(out, ops.dense_gemv(ops.rms_norm(x, norm_w, EPS), w, b, weight_scale=scale))


# ---- validation ----------------------------------------------------------------------------------------

def _valid(**change):
    x, w, scale, b = inputs(2, 16, 64, torch.float32, "cpu", True, seed=0)
    return {**dict(x=x, weight=w, bias=b, weight_scale=scale), **change}


@pytest.mark.parametrize("change, match", [
    (dict(weight_scale=None), "weight is float8_e4m3fn: pass its per-row float32 scales as weight_scale"),
    (dict(weight_scale=torch.ones(15)), "weight_scale must have shape"),
    (dict(weight_scale=torch.ones(16, dtype=torch.float16)), "weight_scale must have dtype"),
    (dict(weight_scale=torch.ones(16, 2)), "weight_scale must have 1 dimension"),
    (dict(weight=torch.randn(16, 64)), "weight must have dtype"),
    (dict(x=torch.randn(17, 64)), "x must have 1 to 16 rows .M. with FP8 weights"),
    (dict(x=torch.randn(2, 72), weight=torch.zeros(16, 72, dtype=FP8)), "K must be a multiple of 16 with FP8 weights"),
])
def test_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.dense_gemv(**_valid(**change))


def test_fused_ops_validate_the_scale_too():
    x, w, scale, _ = inputs(2, 32, 64, torch.float32, "cpu", False, seed=0)
    with pytest.raises(ValueError, match="dense_gemv_silu_mul: weight is float8_e4m3fn"):
        ops.dense_gemv_silu_mul(x, w)
    with pytest.raises(ValueError, match="dense_gemv_add_residual: weight_scale must have shape"):
        ops.dense_gemv_add_residual(x, w, torch.zeros(2, 32), weight_scale=scale[:16])
    with pytest.raises(ValueError, match="rms_norm_dense_gemv: x must have 1 to 16 rows"):
        ops.rms_norm_dense_gemv(torch.randn(17, 64), torch.ones(17, 4), torch.ones(64), EPS, w, weight_scale=scale)


def test_prefetch_takes_an_fp8_next_weight():
    x, w, scale, _ = inputs(2, 16, 64, torch.float32, "cpu", False, seed=0)
    residual = torch.zeros(2, 16)
    ops.dense_gemv_add_residual(x, w, residual, prefetch=ops.GemvPrefetch(w, 1 << 20), weight_scale=scale)
    with pytest.raises(ValueError, match="prefetch.weight must have dtype"):
        ops.dense_gemv_add_residual(x, w, residual, prefetch=ops.GemvPrefetch(w.float().half(), 1 << 20),
                                    weight_scale=scale)


def test_opcheck(device):
    """opcheck_fp8 (test_fp8.py): torch's schema check cannot compare float8 tensors, so it runs on bytes."""
    from test_fp8 import opcheck_fp8
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x, w, scale, b = inputs(3, 40, 64, dtype, device, True, seed=4)
    out = torch.empty(3, 40, dtype=dtype, device=device)
    opcheck_fp8("dense_gemv", dict(out=out, x=x, weight=w, bias=b, weight_scale=scale))
    out2 = torch.empty(3, 20, dtype=dtype, device=device)
    opcheck_fp8("dense_gemv_silu_mul", dict(out=out2, x=x, weight=w, weight_scale=scale))


# ---- the CUDA kernel ---------------------------------------------------------------------------------

# (M, N, K): M over one x tile (1..8) and two (9..16) with their edges; N below / at / above the 16-row
# tile and Llama-3-8B's projections; K of one partial step (16, 48), a partial last chunk (1008, 4112)
# and whole chunks (4096, 14336; 256 k a chunk with one tile, 128 with two).
GPU_SHAPES = [(1, 1, 16), (2, 7, 48), (3, 64, 4096), (4, 113, 1008), (5, 7, 14336), (6, 4096, 16),
              (7, 6144, 4096), (8, 4096, 14336), (1, 28672, 4096), (8, 17, 4112), (9, 113, 1008),
              (9, 6144, 4096), (12, 1, 16), (16, 4096, 14336), (16, 17, 4112), (13, 28672, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", GPU_SHAPES)
def test_cuda_shapes(m, n, k, dtype):
    x, w, scale, b = inputs(m, n, k, dtype, "cuda", (m + n) % 2 == 1, seed=m * 7 + n)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    ops.dense_gemv(x, w, b, out=out, weight_scale=scale)
    check_close(out, x, w, scale, b)
    assert torch.equal(out, ops.dense_gemv(x, w, b, weight_scale=scale)), "two runs differ"


@pytest.mark.cuda
def test_cuda_agrees_with_cpu_reference():
    x, w, scale, b = inputs(4, 300, 2048, torch.bfloat16, "cpu", True, seed=9)
    cpu = ops.dense_gemv(x, w, b, weight_scale=scale)
    gpu = ops.dense_gemv(x.cuda(), w.cuda(), b.cuda(), weight_scale=scale.cuda()).cpu()
    ulp = cpu.float().abs() * 2.0 ** -7
    assert ((gpu.float() - cpu.float()).abs() <= ulp + 1e-6).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, f, k", [(1, 8, 4096), (5, 14336, 4096), (9, 24, 1008), (16, 14336, 4096)])
def test_cuda_silu_mul_is_the_composition(m, f, k, dtype):
    x, w, scale, _ = inputs(m, 2 * f, k, dtype, "cuda", False, seed=m + f, spread=4.0)
    out = ops.dense_gemv_silu_mul(x, w, weight_scale=scale)
    assert torch.equal(out, ops.silu_and_mul(ops.dense_gemv(x, w, weight_scale=scale)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (2, 17, 1008), (8, 4096, 14336), (16, 33, 4112)])
def test_cuda_add_residual_is_the_composition(m, n, k, dtype):
    x, w, scale, b = inputs(m, n, k, dtype, "cuda", m % 2 == 0, seed=m + n)
    residual = torch.randn(m, n, device="cuda").to(dtype) * 2
    expected = residual.clone()
    ops.fused_add_rms_norm(ops.dense_gemv(x, w, b, weight_scale=scale), expected, torch.ones_like(residual[0]), EPS)
    sq = ops.dense_gemv_add_residual(x, w, residual, b, weight_scale=scale)
    assert torch.equal(residual, expected)
    torch.testing.assert_close(sq.double(), group_sq_sums(residual), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, silu_mul", [(1, 6144, 4096, False), (1, 28672, 4096, True), (7, 48, 4112, True),
                                               (12, 6144, 4096, False), (16, 48, 14336, True)])
def test_cuda_rms_norm_prologue(m, n, k, silu_mul, dtype):
    x, w, scale, _ = inputs(m, n, k, dtype, "cuda", False, seed=m * 3 + n, spread=4.0 if silu_mul else 1.0)
    x = x * 3
    norm_w = (1 + 0.3 * torch.randn(k, device="cuda")).to(dtype)
    sums = group_sq_sums(x).float()
    out = ops.rms_norm_dense_gemv(x, sums, norm_w, EPS, w, silu_mul=silu_mul, weight_scale=scale)
    normed = ops.rms_norm(x, norm_w, EPS)
    base = (ops.dense_gemv_silu_mul(normed, w, weight_scale=scale) if silu_mul
            else ops.dense_gemv(normed, w, weight_scale=scale))
    x64 = x.double()
    normed64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()
    expected = normed64 @ w.double().t() * scale.double()
    if silu_mul:
        gate, up = expected.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
    err = (out.double() - expected).abs().max().item()
    baseline = (base.double() - expected).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x unfused {baseline:.3g} + 1e-5"
    same = torch.isclose(out.float(), base.float(), rtol=2 ** -6, atol=1e-3).float().mean().item()
    assert same >= 0.99, f"only {same:.1%} close to the unfused FP8 ops"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, heads, kv_heads, d, k, norm", [(1, 32, 8, 128, 4096, True), (8, 32, 8, 128, 4096, True),
                                                            (3, 14, 2, 64, 896, False), (16, 8, 2, 128, 4112, True)])
def test_cuda_rope_cache_epilogue(m, heads, kv_heads, d, k, norm, dtype):
    """q and the written cache rows against the unfused FP8 ops (>= 99% equal) and fp64 (DESIGN's rule):
    test_gemv_fused_norm.check_rope with the e4m3 weight and its scales."""
    x, _, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w = rope_inputs(
        m, heads, kv_heads, d, k, dtype, "cuda", False, norm, seed=m + heads, num_blocks=max(8, m))
    w, scale = fp8_weight((heads + 2 * kv_heads) * d, k, "cuda", torch.Generator(device="cuda").manual_seed(m))
    check_rope((x, w, b, positions, cos_sin, kv_cache, slots, sq_sums, norm_w), heads, device_exact=False,
               weight_scale=scale)


@pytest.mark.cuda
def test_cuda_prefetch_of_an_fp8_weight_changes_nothing():
    x, w, scale, b = inputs(1, 4096, 4096, torch.bfloat16, "cuda", False, seed=3)
    nxt, _ = fp8_weight(28672, 4096, "cuda", torch.Generator(device="cuda").manual_seed(4))
    r1 = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    r2 = r1.clone()
    ops.dense_gemv_add_residual(x, w, r1, weight_scale=scale)
    ops.dense_gemv_add_residual(x, w, r2, weight_scale=scale, prefetch=ops.GemvPrefetch(nxt, 8 << 20, True))
    assert torch.equal(r1, r2)
    info = fastinfer.ops._C.gemv_last_prefetch()
    assert info["rows"] > 0 and info["bytes"] > 0


# ---- the model ------------------------------------------------------------------------------------------

def spy_on_decode_ops(monkeypatch) -> tuple[list, list]:
    """(the weight_scale of every fused-GEMV call, the name of every activation-quantizing call)."""
    from fastinfer import _ops_fp8
    scales, quantized = [], []
    for name in ("dense_gemv_rope_cache", "rms_norm_dense_gemv", "dense_gemv_add_residual"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **k: scales.append(k.get("weight_scale")) or _real(*a, **k))
    for module, name in ((_ops_fp8, "fp8_quantize_per_token"), (ops, "rms_norm_quant_fp8"),
                         (ops, "silu_and_mul_quant_fp8")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: quantized.append(_name) or _real(*a, **k))
    return scales, quantized

def _w8a16_emulated(hf_model):
    """In place: each projection's weight -> its e4m3 per-channel quantization, dequantized in fp32 (x unquantized)."""
    from test_fp8_model import PROJ, quantize_weight
    for name, module in hf_model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJ:
            wq, ws = quantize_weight(module.weight.detach().float())
            module.weight.data.copy_(wq.float() * ws[:, None])


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_model_w8a16_decode_matches_the_emulation(tmp_path, monkeypatch, variant):
    """FASTINFER_FP8_DECODE=w8a16 with the decode GEMV forced on the CPU: a quantization="fp8" model's
    steps of <= 16 tokens take the fused path with the e4m3 weights (every GEMV gets a weight_scale, no
    activation is quantized) and its logits are HF's on the dequantized weights to fp32 rounding."""
    pytest.importorskip("transformers")
    from fastinfer.metadata import SeqChunk
    from fastinfer.runner import ModelRunner
    from test_fp8_model import PROMPT, hf_logits, write_checkpoint
    model = make_hf_model(variant, seed=3)
    write_checkpoint(tmp_path, model)
    emulated = make_hf_model(variant, seed=3)
    _w8a16_emulated(emulated)
    loaded = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="fp8")
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "w8a16")
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    scales, quantized = spy_on_decode_ops(monkeypatch)
    runner = ModelRunner(loaded.model, num_blocks=4, block_size=16)
    ids = PROMPT
    logits = runner.run([SeqChunk(ids, 0, [3, 0], all_logits=True)])
    expected = hf_logits(emulated, ids)
    unquantized = hf_logits(model, ids)
    quant_err = (expected - unquantized).abs().max().item()
    err = (logits - expected).abs().max().item()
    assert 0 < quant_err and err <= 0.01 * quant_err, (err, quant_err)
    layer_gemvs = 4 * len(loaded.model.layers)  # q/k/v, o, gate / up, down: the LM head is 16-bit
    assert len([s for s in scales if s is not None]) == layer_gemvs and not quantized
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "w8a8")
    assert not loaded.model.fuse_norms(1)
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "bogus")
    with pytest.raises(ValueError, match="FASTINFER_FP8_DECODE must be one of w8a8, w8a16"):
        loaded.model.fuse_norms(1)


def decode_logits(loaded, ids, before_decode=None) -> torch.Tensor:
    """Logits of a prefill of ids (every row) and of one decode step after it (before_decode() in between)."""
    from fastinfer.metadata import SeqChunk
    from fastinfer.runner import ModelRunner
    runner = ModelRunner(loaded.model, num_blocks=4, block_size=16)
    table = [3, 0, 2, 1][:-(-(len(ids) + 1) // 16)]
    prefill = runner.run([SeqChunk(ids, 0, table, all_logits=True)])
    if before_decode is not None:
        before_decode()
    return torch.cat([prefill, runner.run([SeqChunk([7], len(ids), table)])]).float().cpu()


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_w8a16_decode_step_on_the_gpu(tmp_path, monkeypatch, variant):
    """A bf16 decode step with FASTINFER_FP8_DECODE=w8a16 runs the fused W8A16 GEMVs (4 a layer with a
    weight_scale, no activation quantization) and its logits are the CPU fp32 W8A16 path's as closely
    as the bf16 model's fused decode step is the CPU fp32 model's (DESIGN's rule: <= 2 x + 1e-3)."""
    from test_fp8_model import CUDA_DIMS, PROMPT, write_checkpoint
    model = make_hf_model(variant, seed=6, **CUDA_DIMS)
    write_checkpoint(tmp_path, model)
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "w8a16")
    gpu8 = fastinfer.load_model(tmp_path, dtype=torch.bfloat16, device="cuda", quantization="fp8")
    scales, quantized = spy_on_decode_ops(monkeypatch)
    ours = decode_logits(gpu8, PROMPT, before_decode=lambda: (scales.clear(), quantized.clear()))[-1:]
    # the decode step alone (the 13-token prefill takes W8A8)
    assert len([x for x in scales if x is not None]) == 4 * len(gpu8.model.layers) and not quantized
    monkeypatch.undo()
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "w8a16")
    cpu8 = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="fp8")
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    expected = decode_logits(cpu8, PROMPT)[-1:]
    dense_cpu = decode_logits(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu"), PROMPT)[-1:]
    monkeypatch.undo()
    dense_gpu = decode_logits(fastinfer.load_model(tmp_path, dtype=torch.bfloat16, device="cuda"), PROMPT)[-1:]
    err = (ours - expected).abs().max().item()
    baseline = (dense_gpu - dense_cpu).abs().max().item()
    assert err <= 2 * baseline + 1e-3, f"W8A16 bf16 vs fp32 {err:.3g} > 2 x the bf16 model's {baseline:.3g} + 1e-3"


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_graphed_w8a16_decoding(tmp_path, monkeypatch, variant):
    """On the GPU: graphed W8A16 decoding (the graphs captured with the W8A16 GEMVs: the spy sees them)
    gives the tokens of eager W8A16 decoding."""
    from test_fp8_model import CUDA_DIMS, PROMPT, write_checkpoint
    model = make_hf_model(variant, seed=4, **CUDA_DIMS)
    write_checkpoint(tmp_path, model)
    monkeypatch.setenv("FASTINFER_FP8_DECODE", "w8a16")
    params = fastinfer.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:]]
    got = {}
    scales, _ = spy_on_decode_ops(monkeypatch)
    for eager in (False, True):
        llm = fastinfer.LLM(str(tmp_path), dtype=torch.bfloat16, device="cuda", quantization="fp8",
                            kv_cache_memory_bytes=64 << 20, enforce_eager=eager)
        got[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:
            assert llm.engine.runner.graphs.num_steps > 5
            assert len([x for x in scales if x is not None]) >= 4 * len(llm.loaded.model.layers)
        del llm
    assert got[False] == got[True]
