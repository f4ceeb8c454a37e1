"""ops.moe_int4_linear (each (token, expert) pair of a MoE decode step against its own 4-bit expert, the ids
read on the device) and the 4-bit MoE decode path built on it (models/moe.py; its GPU case covers FP8 experts'
moe_gemv path too). The op's spec is int4_linear
with M = 1 on the pair's expert: equal bit for bit on the CPU; on a GPU (one CTA per pair and strip over all
of K, where int4_linear may split K) within the int4 tests' bounds of an fp64 reference."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import ops
from fastinfer.generate import get_loaded
from fastinfer.models import moe as moe_mod
from fastinfer.quant.int4 import GROUP_SIZES, pack
from models import left_padded_batch, make_hf_model
from test_int4 import MODES, check_against_reference, random_weight
from test_moe_quant import VARIANTS, rtn_dequantized

transformers = pytest.importorskip("transformers")
PAD = 0


def stacked(weights, dtype, device):
    """[E, ...] stacks of the packed tensors of one QuantizedWeight per expert."""
    packed = [pack(w.to(dtype)) for w in weights]
    stack = lambda name: None if getattr(packed[0], name) is None else torch.stack(  # noqa: E731
        [getattr(p, name) for p in packed]).to(device)
    return stack("qweight"), stack("scales"), stack("zeros"), stack("mins")


# (tokens, top_k, experts, N, K): one expert, more pairs than experts, K of one 64-step, a 5-strip N
SHAPES = [(1, 2, 4, 64, 128), (3, 2, 8, 192, 256), (5, 8, 16, 128, 512), (2, 1, 1, 64, 64), (4, 3, 4, 320, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_equals_int4_linear_per_pair(device, dtype, mode, shape):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit activations")
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("fastinfer::moe_int4_linear", "CUDA"):
        pytest.skip("this build has no sm_90a kernels (moe_int4_linear, as int4_linear)")
    tokens, top_k, experts, n, k = shape
    group = GROUP_SIZES[(tokens + experts) % len(GROUP_SIZES)] if k % 128 == 0 else 64 if k % 64 == 0 else 32
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    weights = [random_weight(n, k, group, mode, gen) for _ in range(experts)]
    qweight, scales, zeros, mins = stacked(weights, dtype, device)
    x = torch.randn(tokens, k + 64, generator=gen).to(dtype).to(device)[:, :k]  # strided rows
    ids = torch.randint(0, experts, (tokens * top_k,), generator=gen, dtype=torch.int32).to(device)
    out = ops.moe_int4_linear(x, qweight, scales, ids, group, zeros=zeros, mins=mins, x_group=top_k)
    for p, e in enumerate(ids.tolist()):
        row = x[p // top_k:p // top_k + 1]
        if device.type == "cpu":
            expected = ops.int4_linear(row, qweight[e], scales[e], group, zeros=None if zeros is None else zeros[e],
                                       mins=None if mins is None else mins[e])
            assert torch.equal(out[p:p + 1], expected)
        check_against_reference(out[p:p + 1], row, weights[e])
    # the down projection's form: one row per pair
    rows = torch.randn(tokens * top_k, k, generator=gen).to(dtype).to(device)
    down = ops.moe_int4_linear(rows, qweight, scales, ids, group, zeros=zeros, mins=mins)
    for p, e in enumerate(ids.tolist()):
        check_against_reference(down[p:p + 1], rows[p:p + 1], weights[e])


def _args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    qweight, scales, zeros, _ = stacked([random_weight(64, 128, 64, "zeros", gen) for _ in range(3)],
                                        torch.float32, device)
    x = torch.randn(2, 128, generator=gen).to(device)
    ids = torch.tensor([0, 2, 1, 1], dtype=torch.int32, device=device)
    return dict(x=x, qweight=qweight, scales=scales, expert_ids=ids, group_size=64, zeros=zeros, x_group=2)


@pytest.mark.parametrize("change, match", [
    (dict(group_size=48), "group_size"),
    (dict(expert_ids=torch.tensor([0, 3, 1, 1], dtype=torch.int32)), "expert_ids must lie"),
    (dict(expert_ids=torch.tensor([0, 1, 1], dtype=torch.int32)), "entries"),
    (dict(expert_ids=torch.tensor([0, 1, 1, 0])), "expert_ids"),
    (dict(x_group=0), "x_group"),
    (dict(qweight=torch.zeros(3, 1, 8 * 64, dtype=torch.int32)), "qweight"),
    (dict(scales=torch.zeros(3, 1, 64)), "scales"),
    (dict(mins=torch.zeros(3, 2, 64)), "not both"),
    (dict(x=torch.randn(2, 96)), "multiple of 64"),
])
def test_bad_input_is_a_value_error_naming_it(change, match):
    with pytest.raises(ValueError, match=match):
        ops.moe_int4_linear(**{**_args(), **change})


def test_opcheck(device):
    args = _args(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for key in ("x", "scales", "zeros"):
        args[key] = args[key].to(dtype)
    out = torch.empty(4, 64, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastinfer.moe_int4_linear.default,
                          (out, args["x"], args["qweight"], args["scales"], args["zeros"], None, args["expert_ids"],
                           64, 2))


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_decode_path_forced_on_the_cpu_equals_the_per_expert_path(monkeypatch, variant):
    """An int4 MoE model's decode steps through ops.moe_int4_linear (as a GPU's): the same logits as the
    per-expert int4_linear path, HF's greedy tokens on the RTN weights, and graph-safe decode steps."""
    hf = make_hf_model(variant, seed=4, **VARIANTS[variant])
    loaded = fastinfer.load_model(hf, quantization="int4")
    model = loaded.model
    rtn_dequantized(hf, model.quant.group_size)
    ids, mask = left_padded_batch([5, 17, 1, 9], hf.config.vocab_size, PAD, seed=4)
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
              output_logits=True, pad_token_id=PAD)
    per_expert = fastinfer.generate(loaded, ids, attention_mask=mask, **kw)
    assert not model.decode_graph_safe(4)
    monkeypatch.setattr(moe_mod, "use_moe_gemv", lambda device, pairs, dtype: 1 <= pairs <= 256)
    calls = []
    real = ops.moe_int4_linear
    monkeypatch.setattr(ops, "moe_int4_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = fastinfer.generate(loaded, ids, attention_mask=mask, **kw)
    assert calls and model.decode_graph_safe(4)
    assert torch.equal(fused.sequences, per_expert.sequences)
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(per_expert.logits), rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=PAD)
    assert torch.equal(fused.sequences, expected)


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("quantization", ["int4", "fp8"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_bf16_quantized_decode_graphs_agree_with_the_per_expert_path(monkeypatch, variant, quantization):
    """On a GPU the 4-bit / FP8 decode steps run moe_int4_linear / moe_gemv (W8A16) inside CUDA graphs; their
    logits stay within bf16 (and, for FP8, activation-quantization) rounding of the per-expert int4_linear /
    fp8_linear path's (FASTINFER_MOE_GEMV=0, eager)."""
    hf = make_hf_model(variant, seed=7, **dict(VARIANTS[variant], hidden_size=256, num_attention_heads=4,
                                               num_key_value_heads=2))
    loaded = fastinfer.load_model(hf, dtype=torch.bfloat16, device="cuda", quantization=quantization)
    assert loaded.model.decode_graph_safe(1)
    prompt = torch.randint(3, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(7)).cuda()
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    graphs = fastinfer.generate(loaded, prompt, **kw)
    monkeypatch.setenv("FASTINFER_MOE_GEMV", "0")
    eager = fastinfer.generate(loaded, prompt, **kw)
    for step in (1, 2):  # decode steps, same prefix
        diff = (graphs.logits[step] - eager.logits[step]).abs().max().item()
        assert diff < 0.1 * eager.logits[step].abs().max().item()
