"""Quantized mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): 4-bit experts (round-to-nearest at
load, GPTQ and AWQ checkpoints in the per-expert layout the published ones use) and FP8 experts
(quantize-on-load, fine-grained FP8 checkpoints), against HF transformers, CPU fp32.

4-bit references: HF models whose projections hold exactly the dequantized weights (the 4-bit op
computes with those values). FP8 references: HF models whose projections, experts included, compute with
fp8 weights (per channel) and activations (per token), as tests/test_fp8_model.py's. Routers and
Qwen2-MoE's shared-expert gate stay unquantized in both, as in the published checkpoints.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastinfer
import reference as ref
from fastinfer.quant.int4 import quantize_rtn
from fastinfer.quant.linear import Int4Linear
from fastinfer.generate import get_loaded
from models import make_hf_model
from test_fp8_model import block_scales, emulate_fp8_linears, quantize_weight
from test_loader_parity import edit_tensors, fi_logits, hf_from_dir, hf_logits
from test_quant_loaders import awq_parts, gptq_parts

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 4-bit projections need whole 64-row strips and K a multiple of the group (here 64)
SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
VARIANTS = {"mixtral": dict(SHAPE, intermediate_size=128),
            "qwen2-moe": dict(SHAPE, moe_intermediate_size=64, shared_expert_intermediate_size=128),
            "qwen3-moe": dict(SHAPE, moe_intermediate_size=64, intermediate_size=192),
            "granitemoe": dict(SHAPE, intermediate_size=128)}
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19]
UNQUANTIZED = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "block_sparse_moe.gate.weight",
               "shared_expert_gate.weight", "block_sparse_moe.router.weight")


def quantized_names(state: dict) -> list[str]:
    """The projections a quantized model runs quantized: every 2-D (and fused 3-D expert) weight but the
    embedding, the LM head, the routers and the shared-expert gate."""
    return [n for n, t in state.items() if t.dim() >= 2 and not n.endswith(UNQUANTIZED)]


def rtn_dequantized(hf, group: int, mode: str = "zeros") -> None:
    """In place: each quantized projection (each expert's matrix apart) -> its round-to-nearest values."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in quantized_names(dict(hf.named_parameters())):
                for w in (p if p.dim() == 3 else [p]):
                    w.copy_(quantize_rtn(w, group, mode).dequantize())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_at_load_matches_hf_on_the_rtn_weights(variant):
    hf = make_hf_model(variant, seed=1, **VARIANTS[variant])
    loaded = fastinfer.load_model(hf, quantization="int4")
    moe = next(layer.moe for layer in loaded.model.layers if layer.moe is not None)
    group = loaded.model.quant.group_size  # the largest dividing every K (Mixtral's / Granite-MoE's are all 128)
    assert group == (128 if variant in ("mixtral", "granitemoe") else 64) and isinstance(moe.experts[0][0], Int4Linear)
    assert moe.gate_up is None and moe.router.dtype == torch.float32  # the router stays dense
    before = hf_logits(hf, PROMPT)
    rtn_dequantized(hf, group)
    expected = hf_logits(hf, PROMPT)
    assert (expected - before).abs().max() > 1e-3  # the quantization shows (Granite divides its logits by 4)
    torch.testing.assert_close(fi_logits(loaded, PROMPT), expected, rtol=1e-4, atol=1e-4)


def test_int4_greedy_generation_and_the_engine_match_hf():
    hf = make_hf_model("mixtral", seed=2, **VARIANTS["mixtral"])
    llm = fastinfer.LLM(hf, quantization="int4", num_blocks=16, block_size=4)
    rtn_dequantized(hf, 128)
    outs = llm.generate([PROMPT, PROMPT[:7]], fastinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    for p, out in zip([PROMPT, PROMPT[:7]], outs):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert list(out.outputs[0].token_ids) == expected[0, len(p):].tolist()


def write_4bit_moe_checkpoint(path, variant: str, method: str, seed: int):
    """save_pretrained's per-expert checkpoint with every quantized projection replaced by GPTQ (symmetric,
    v1) or AWQ parts of its round-to-nearest weights; the HF reference loads the same values dequantized."""
    hf = make_hf_model(variant, seed=seed, **VARIANTS[variant])
    hf.save_pretrained(path / "ref")
    mode = "symmetric" if method == "gptq" else "zeros"

    def quantize(tensors):
        for name in quantized_names(tensors):
            w = quantize_rtn(tensors.pop(name).float(), 64, mode, scale_dtype=torch.float16)
            tensors[name] = w.dequantize()
            quantized[name.removesuffix(".weight")] = w
    quantized = {}
    edit_tensors(path / "ref", quantize)
    assert any(".experts.1." in name for name in quantized)  # the per-expert spelling
    (path / "ckpt").mkdir()
    tensors = safetensors_torch.load_file(path / "ref" / "model.safetensors")
    for layer, w in quantized.items():
        del tensors[layer + ".weight"]
        parts = gptq_parts(w, "gptq") if method == "gptq" else awq_parts(w)
        tensors.update({f"{layer}.{part}": t.contiguous() for part, t in parts.items()})
    safetensors_torch.save_file(tensors, path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "ref" / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True,
                                      "desc_act": False, "checkpoint_format": "gptq"} if method == "gptq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": ["gate"]})
    (path / "ckpt" / "config.json").write_text(json.dumps(config))
    return hf_from_dir(path / "ref")


@pytest.mark.parametrize("variant, method", [("mixtral", "gptq"), ("qwen2-moe", "gptq"), ("qwen3-moe", "awq"),
                                             ("mixtral", "awq")])
def test_gptq_and_awq_moe_checkpoints_run_4bit(tmp_path, variant, method):
    hf = write_4bit_moe_checkpoint(tmp_path, variant, method, seed=3)
    loaded = fastinfer.load_model(tmp_path / "ckpt", dtype=torch.float32, device="cpu")
    layer = loaded.model.layers[-1]
    assert loaded.model.quant.method == method and isinstance(layer.moe.experts[-1][1], Int4Linear)
    if variant == "qwen2-moe":
        assert isinstance(layer.moe.shared[2], Int4Linear) and layer.moe.shared[3].dtype == torch.float32
    torch.testing.assert_close(fi_logits(loaded, PROMPT), hf_logits(hf, PROMPT), rtol=1e-4, atol=1e-4)


def test_an_expert_stored_unquantized_in_a_4bit_checkpoint_is_refused_by_name(tmp_path):
    """modules_to_not_convert is honoured by the data: a dense tensor where fastinfer runs a 4-bit projection
    is an error naming it, never a silent re-quantization."""
    write_4bit_moe_checkpoint(tmp_path, "mixtral", "awq", seed=4)
    name = "model.layers.1.block_sparse_moe.experts.2.w2"

    def dense_expert(tensors):
        for part in ("qweight", "qzeros", "scales"):
            del tensors[f"{name}.{part}"]
        tensors[name + ".weight"] = torch.zeros(128, 128)
    edit_tensors(tmp_path / "ckpt", dense_expert)
    with pytest.raises(ValueError, match=f"{name}.weight is stored unquantized"):
        fastinfer.load_model(tmp_path / "ckpt", dtype=torch.float32, device="cpu")


def emulate_fp8_experts(hf) -> None:
    """In place: every experts module computes each (token, expert) pair with fp8 weights per channel and
    activations per token; the projections of emulate_fp8_linears the same."""
    emulate_fp8_linears(hf)

    def mm(x, wq_ws):
        xs = ref.fp8_dynamic_scale(x, dim=1)
        return ref.fp8_scaled_mm(ref.fp8_quantize(x, xs[:, None]), wq_ws[0], xs, wq_ws[1], None, torch.float32)
    for module in hf.modules():
        if not (hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")):
            continue
        gate_up = [quantize_weight(w.detach().float()) for w in module.gate_up_proj]
        down = [quantize_weight(w.detach().float()) for w in module.down_proj]

        def forward(hidden_states, top_k_index, top_k_weights, gate_up=gate_up, down=down):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for slot in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, slot])
                    gate, up = mm(hidden_states[t:t + 1].float(), gate_up[e]).chunk(2, dim=-1)
                    out[t] += top_k_weights[t, slot] * mm(F.silu(gate) * up, down[e])[0]
            return out
        module.forward = forward


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp8_at_load_matches_the_fp8_reference(variant):
    hf = make_hf_model(variant, seed=5, **VARIANTS[variant])
    loaded = fastinfer.load_model(hf, quantization="fp8")
    moe = next(layer.moe for layer in loaded.model.layers if layer.moe is not None)
    assert moe.experts[0][1].weight.dtype == ref.FP8 and moe.router.dtype == torch.float32
    unquantized = hf_logits(hf, PROMPT)
    emulate_fp8_experts(hf)
    expected = hf_logits(hf, PROMPT)
    quant_err, err = (expected - unquantized).abs().max().item(), (fi_logits(loaded, PROMPT) - expected).abs().max().item()
    assert 0 < quant_err and err <= 0.01 * quant_err, (err, quant_err)  # fp8 emulated, not fp32


def test_fine_grained_fp8_moe_checkpoint(tmp_path):
    """Qwen3-MoE-FP8's layout: each expert's projections e4m3 with weight_scale_inv per 32 x 32 block here
    (128 x 128 in the published one), the router in the model dtype."""
    hf = make_hf_model("qwen3-moe", seed=6, **VARIANTS["qwen3-moe"])
    hf.save_pretrained(tmp_path)

    def to_fp8(tensors):
        for name in quantized_names(tensors):
            tensors.update(block_scales(name, tensors.pop(name).float()))
    edit_tensors(tmp_path, to_fp8)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert loaded.model.quantization == "fp8" and loaded.model.layers[1].moe.experts[4][0].weight.dtype == ref.FP8
    unquantized = hf_logits(hf, PROMPT)
    emulate_fp8_experts(hf)
    emulated = hf_logits(hf, PROMPT)
    # block scales differ from per-channel ones: close to the fp8 reference, far closer than to nothing
    assert (fi_logits(loaded, PROMPT) - emulated).abs().max() < 2 * (emulated - unquantized).abs().max() + 1e-3


def test_fp8_moe_engine_runs_eagerly_and_matches_its_own_logits():
    hf = make_hf_model("qwen2-moe", seed=7, **VARIANTS["qwen2-moe"])
    llm = fastinfer.LLM(hf, quantization="fp8", num_blocks=32, block_size=4)
    assert not llm.loaded.model.decode_graph_safe(1)  # per-expert GEMMs read the routing back
    out = llm.generate([PROMPT], fastinfer.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    ids = list(PROMPT)
    for _ in range(6):  # teacher-forced: the full-prompt logits' argmax, one token at a time
        ids.append(int(fi_logits(llm.loaded, ids)[-1].argmax()))
    assert list(out) == ids[len(PROMPT):]


def test_int4_group_covers_the_experts_input_size():
    """quantization="int4" picks the largest group dividing every projection's K, the experts' too."""
    hf = make_hf_model("qwen3-moe", seed=8, **dict(VARIANTS["qwen3-moe"], intermediate_size=256,
                                                  moe_intermediate_size=192))
    assert fastinfer.load_model(hf, quantization="int4").model.quant.group_size == 64  # 128 does not divide 192


def test_gptq_calibration_refuses_moe_models():
    from fastinfer.quant.gptq import collect_hessians
    model = get_loaded(make_hf_model("mixtral")).model
    with pytest.raises(ValueError, match="mixture-of-experts"):
        collect_hessians(model, [PROMPT])


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_moe_on_the_gpu_matches_the_cpu(quantization):
    """bf16 on the GPU (per-expert int4_linear / fp8_linear kernels, eager decode) against the same
    quantization in fp32 on the CPU: top-1 agreement over the prompt's positions."""
    if quantization == "fp8" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 GEMM needs sm_90")
    hf = make_hf_model("mixtral", seed=9, **dict(VARIANTS["mixtral"], hidden_size=256, intermediate_size=256))
    cpu = fi_logits(fastinfer.load_model(hf, quantization=quantization), PROMPT)
    gpu = fastinfer.load_model(hf, dtype=torch.bfloat16, device="cuda", quantization=quantization)
    out = fi_logits(gpu, PROMPT).float().cpu()
    assert (out.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.9
    assert (out.log_softmax(-1) - cpu.log_softmax(-1)).abs().max() < 0.3


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe"])
def test_fp8_decode_path_forced_on_the_cpu(monkeypatch, variant):
    """FP8 experts' decode steps through ops.moe_gemv's W8A16 form (as a GPU's, graph-safe): each MoE layer's
    output equals the pairs computed from the e4m3 weights times their row scales with x unquantized."""
    from fastinfer.models import moe as moe_mod
    hf = make_hf_model(variant, seed=10, **VARIANTS[variant])
    model = fastinfer.load_model(hf, quantization="fp8").model
    assert not model.decode_graph_safe(3)
    monkeypatch.setattr(moe_mod, "use_moe_gemv", lambda device, pairs, dtype: 1 <= pairs <= 256)
    assert model.decode_graph_safe(3)
    moe = next(layer.moe for layer in model.layers if layer.moe is not None)
    x = torch.randn(3, moe.router.shape[1], generator=torch.Generator().manual_seed(10))
    got = moe(x, decode=True)
    weights, experts = torch.topk(torch.softmax(x @ moe.router.t(), dim=-1), moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    gate_up = moe.gate_up.float() * moe.gate_up_scale[:, :, None]
    down = moe.down.float() * moe.down_scale[:, :, None]
    expected = torch.zeros_like(x)
    for t in range(3):
        for slot in range(moe.top_k):
            e = int(experts[t, slot])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            expected[t] += weights[t, slot] * (down[e] @ (F.silu(gate) * up))
    if moe.shared is not None:
        gate, up, shared_down, gate_w = moe.shared
        expected += torch.sigmoid(x @ gate_w.t()) * shared_down(F.silu(gate(x)) * up(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe_mod, "use_moe_gemv", lambda device, pairs, dtype: False)
    assert (moe(x, decode=True) - expected).abs().max() > 1e-4  # the W8A8 per-expert path quantizes x too


def test_granite_moe_checkpoint_quantizes_its_fused_experts(tmp_path):
    """Granite-MoE checkpoints store the experts fused (input_linear / output_linear): quantized on load from the
    directory they give the in-memory model's logits (the residual multiplier folded into the experts' down
    projections before quantization)."""
    hf = make_hf_model("granitemoe", seed=12, **VARIANTS["granitemoe"])
    hf.save_pretrained(tmp_path)
    for quantization in ("int4", "fp8"):
        from_dir = fi_logits(fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu",
                                                  quantization=quantization), PROMPT)
        in_memory = fi_logits(fastinfer.load_model(hf, quantization=quantization), PROMPT)
        assert torch.equal(from_dir, in_memory), quantization
