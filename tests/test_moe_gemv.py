"""ops.moe_gemv (each (token, expert) pair of a MoE decode step against its own expert, the ids read on
the device) and the MoE decode path built on it (models/moe.py). The op's spec is dense_gemv /
dense_gemv_silu_mul with M = 1 on the pair's expert: equal bit for bit on every device (the CUDA kernel
runs dense_gemv's chunks and cross-warp sum), and within DESIGN.md's tolerance of an fp32 reference."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import ops
from fastinfer.models import moe as moe_mod
from models import left_padded_batch, make_hf_model
from test_ops import DTYPES, assert_within_tolerance, randn

transformers = pytest.importorskip("transformers")
PAD = 0


def case(device, dtype, tokens, top_k, experts, n, k, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    x = randn(tokens, k + (16 if strided else 0), dtype=dtype, device=device, gen=gen)[:, :k]
    weight = randn(experts, n, k, dtype=dtype, device=device, gen=gen, scale=k ** -0.5)
    ids = torch.randint(0, experts, (tokens * top_k,), generator=gen, dtype=torch.int32).to(device)
    return x, weight, ids


# (tokens, top_k, experts, N, K): a partial last row tile (N % 16), a partial last K chunk (K % 128),
# more pairs than experts (repeats), one pair
SHAPES = [(1, 2, 4, 64, 128), (3, 2, 8, 40, 200), (5, 8, 16, 96, 264), (1, 1, 1, 16, 8), (7, 3, 4, 48, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_dense_gemv_per_pair(device, dtype, shape):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit inputs")
    tokens, top_k, experts, n, k = shape
    x, weight, ids = case(device, dtype, tokens, top_k, experts, n, k, strided=True)
    out = ops.moe_gemv(x, weight, ids, x_group=top_k)
    for p, e in enumerate(ids.tolist()):
        assert torch.equal(out[p:p + 1], ops.dense_gemv(x[p // top_k:p // top_k + 1], weight[e]))
    reference = torch.stack([x[p // top_k].double() @ weight[e].double().T for p, e in enumerate(ids.tolist())])
    same = torch.stack([(x[p // top_k].float() @ weight[e].float().T).to(dtype) for p, e in enumerate(ids.tolist())])
    assert_within_tolerance(out.cpu(), same.cpu(), reference.cpu())
    # the down projection's form: one row per pair
    rows = randn(tokens * top_k, k, dtype=dtype, device=device, gen=torch.Generator().manual_seed(1))
    down = ops.moe_gemv(rows, weight, ids)
    for p, e in enumerate(ids.tolist()):
        assert torch.equal(down[p:p + 1], ops.dense_gemv(rows[p:p + 1], weight[e]))


@pytest.mark.parametrize("shape", [(1, 2, 4, 64, 128), (3, 4, 6, 32, 200), (2, 8, 8, 96, 264)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_dense_gemv_silu_mul_per_pair(device, dtype, shape):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit inputs")
    tokens, top_k, experts, n, k = shape
    x, weight, ids = case(device, dtype, tokens, top_k, experts, n, k, seed=2)
    out = ops.moe_gemv(x, weight, ids, x_group=top_k, silu_mul=True)
    assert out.shape == (tokens * top_k, n // 2)
    for p, e in enumerate(ids.tolist()):
        assert torch.equal(out[p:p + 1], ops.dense_gemv_silu_mul(x[p // top_k:p // top_k + 1], weight[e]))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: {**a, "expert_ids": a["expert_ids"].long()}, "expert_ids must have dtype torch.int32"),
    (lambda a: {**a, "expert_ids": a["expert_ids"] + 4}, r"expert_ids must lie in \[0, 4\)"),
    (lambda a: {**a, "expert_ids": a["expert_ids"][:-1]}, "expert_ids must have x.shape"),
    (lambda a: {**a, "weight": a["weight"][0]}, "weight"),
    (lambda a: {**a, "x_group": 0}, "x_group"),
    (lambda a: {**a, "silu_mul": True, "weight": a["weight"][:, :40].contiguous()}, "with silu_mul"),
    (lambda a: {**a, "x": a["x"][:, :60]}, "K"),
    (lambda a: {**a, "weight": a["weight"][:, :0].contiguous()}, "rows per expert"),
])
def test_bad_input_is_a_value_error_naming_it(mutate, match):
    x, weight, ids = case("cpu", torch.float32, 3, 2, 4, 64, 128)
    args = mutate(dict(x=x, weight=weight, expert_ids=ids, x_group=2))
    with pytest.raises(ValueError, match=match):
        ops.moe_gemv(**args)


def test_opcheck(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, weight, ids = case(device, dtype, 3, 2, 4, 64, 128)
    out = torch.empty(6, 32, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastinfer.moe_gemv.default, (out, x, weight, ids, 2, True))


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_decode_path_forced_on_the_cpu_matches_hf(monkeypatch, variant):
    """Every step of up to 256 pairs through ops.moe_gemv (as a GPU's decode steps): HF's tokens, and the
    model reports its decode steps graph-safe."""
    monkeypatch.setattr(moe_mod, "use_moe_gemv", lambda device, pairs, dtype: 1 <= pairs <= 256)
    calls = []
    real = ops.moe_gemv
    monkeypatch.setattr(ops, "moe_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_hf_model(variant, seed=6)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=6)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)
    assert calls
    from fastinfer.generate import get_loaded
    assert get_loaded(model).model.decode_graph_safe(4)
    monkeypatch.setattr(moe_mod, "use_moe_gemv", lambda device, pairs, dtype: False)
    assert not get_loaded(model).model.decode_graph_safe(4)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_bf16_decode_graphs_agree_with_the_per_expert_path(monkeypatch, variant):
    """On a GPU in bf16 the decode steps run moe_gemv inside CUDA graphs; their logits stay within bf16
    rounding of the per-expert path's (FASTINFER_MOE_GEMV=0, eager)."""
    model = make_hf_model(variant, seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=512).to(torch.bfloat16).cuda()
    prompt = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(7)).cuda()
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    graphs = fastinfer.generate(model, prompt, **kw)
    monkeypatch.setenv("FASTINFER_MOE_GEMV", "0")
    eager = fastinfer.generate(model, prompt, **kw)
    first = (graphs.logits[0] - eager.logits[0]).abs().max().item()
    assert first < 0.1 * eager.logits[0].abs().max().item()


@pytest.mark.parametrize("silu_mul", [False, True], ids=["plain", "silu_mul"])
@pytest.mark.parametrize("shape", [(1, 2, 4, 64, 128), (3, 2, 8, 48, 208), (5, 8, 16, 96, 272)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_weights_equal_dense_gemv_per_pair(device, dtype, shape, silu_mul):
    """e4m3 experts with fp32 row scales (W8A16): each pair bit for bit dense_gemv / dense_gemv_silu_mul with
    that expert's weight_scale, within tolerance of an fp64 product of the dequantized weights."""
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit inputs")
    tokens, top_k, experts, n, k = shape
    x, weight, ids = case(device, dtype, tokens, top_k, experts, n, k, seed=3, strided=True)
    scale = (weight.float().abs().amax(dim=2) / 448).clamp(min=1e-12)
    w8 = (weight.float() / scale[:, :, None]).to(torch.float8_e4m3fn)
    out = ops.moe_gemv(x, w8, ids, x_group=top_k, silu_mul=silu_mul, weight_scale=scale)
    single = ops.dense_gemv_silu_mul if silu_mul else ops.dense_gemv
    for p, e in enumerate(ids.tolist()):
        assert torch.equal(out[p:p + 1], single(x[p // top_k:p // top_k + 1], w8[e], weight_scale=scale[e]))
    deq = w8.double() * scale.double()[:, :, None]
    ref = torch.stack([x[p // top_k].double() @ deq[e].T for p, e in enumerate(ids.tolist())])
    same = torch.stack([(x[p // top_k].float() @ deq[e].float().T).to(dtype) for p, e in enumerate(ids.tolist())])
    if silu_mul:
        half = n // 2
        ref = torch.nn.functional.silu(ref[:, :half]) * ref[:, half:]
        same = (torch.nn.functional.silu(same[:, :half].float()) * same[:, half:].float()).to(dtype)
    assert_within_tolerance(out.cpu(), same.cpu(), ref.cpu())


def test_fp8_weight_scale_is_checked():
    x, weight, ids = case(torch.device("cpu"), torch.float32, 2, 2, 4, 64, 128)
    w8 = weight.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_scale"):
        ops.moe_gemv(x, w8, ids, x_group=2, weight_scale=torch.ones(4, 32))
    with pytest.raises(ValueError, match="weight"):
        ops.moe_gemv(x, w8, ids, x_group=2)  # e4m3 without scales
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.moe_gemv(x[:, :120], w8[:, :, :120].contiguous(), ids, x_group=2, weight_scale=torch.ones(4, 64))
