"""4-bit checkpoints into the packed layout: GPTQ, AWQ (synthetic safetensors written here in the
formats AutoGPTQ / AutoAWQ write), GGUF Q4_0 / Q4_1 blocks, and round-to-nearest at load.

A model whose projections are 4-bit must compute what HF computes with the dequantized weights.
The packers below are written from the format descriptions, independently of the converters.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastinfer
from fastinfer.metadata import SeqChunk
from fastinfer.quant.checkpoints import AWQ_ORDER
from fastinfer.quant.int4 import QuantizedWeight, quantize_rtn
from fastinfer.quant.linear import Int4Linear
from fastinfer.runner import ModelRunner
from models import make_hf_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Projections must be whole 64-row strips and K a multiple of the group: head_dim 64, one KV head.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41]


def quantized_hf_model(seed: int, group_size: int, mode: str):
    """An HF Llama whose projections hold exactly the dequantized RTN weights, and those weights."""
    hf = make_hf_model("llama", seed=seed, **SHAPE)
    weights = {}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
                q = quantize_rtn(param, group_size, mode, scale_dtype=torch.float16)
                param.copy_(q.dequantize())
                weights[name.removesuffix(".weight")] = q
    return hf, weights


def logits(model, ids: list[int]) -> torch.Tensor:
    blocks = -(-len(ids) // 16)
    return ModelRunner(model, blocks, 16).run([SeqChunk(ids, 0, list(range(blocks)), all_logits=True)])


def assert_matches_hf(model, hf) -> None:
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(logits(model, PROMPT), expected, rtol=1e-4, atol=1e-4)


def pack_along(codes: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """int32 words of 8 codes along `dim`: nibble i holds element 8 c + order[i]."""
    codes = codes.to(torch.int32).movedim(dim, -1)
    words = torch.zeros(*codes.shape[:-1], codes.shape[-1] // 8, dtype=torch.int32)
    for i, j in enumerate(order):
        words |= codes[..., j::8] << (4 * i)
    return words.movedim(-1, dim)


def gptq_parts(w: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    zeros = w.zeros if w.zeros is not None else torch.full_like(w.scales, 8)
    stored = zeros.t().to(torch.int32) - (1 if fmt == "gptq" else 0)  # v1 stores z - 1
    k = w.shape[1]
    return {"qweight": pack_along(w.codes.t(), 0), "qzeros": pack_along(stored, 1),
            "scales": w.scales.t().half().contiguous(), "g_idx": torch.arange(k, dtype=torch.int32) // w.group_size}


def awq_parts(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    return {"qweight": pack_along(w.codes.t(), 1, AWQ_ORDER), "qzeros": pack_along(w.zeros.t(), 1, AWQ_ORDER),
            "scales": w.scales.t().half().contiguous()}


def write_checkpoint(path, hf, weights, parts_of, quantization_config: dict) -> None:
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()
               if not k.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)) and k != "lm_head.weight"}
    tensors["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    for layer, w in weights.items():
        tensors.update({f"{layer}.{part}": t.contiguous() for part, t in parts_of(w).items()})
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


# ---- GPTQ / AWQ -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sym, fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_gptq_checkpoint_runs_4bit(tmp_path, sym, fmt):
    hf, weights = quantized_hf_model(1, 128, "symmetric" if sym else "zeros")
    if fmt == "gptq" and not sym:  # v1's z - 1 cannot store z = 0 (a known GPTQ v1 limitation)
        assert all(int(w.zeros.min()) >= 1 for w in weights.values())
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": sym, "desc_act": False,
          "checkpoint_format": fmt}
    write_checkpoint(tmp_path, hf, weights, lambda w: gptq_parts(w, fmt), qc)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu").model
    assert isinstance(model.layers[0].qkv, Int4Linear) and isinstance(model.layers[1].down, Int4Linear)
    assert model.quant.method == "gptq" and model.quant.mode == ("symmetric" if sym else "zeros")
    assert_matches_hf(model, hf)


def test_awq_checkpoint_runs_4bit(tmp_path):
    hf, weights = quantized_hf_model(2, 64, "zeros")
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    write_checkpoint(tmp_path, hf, weights, awq_parts, qc)
    model = fastinfer.load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="awq").model
    assert model.quant.method == "awq" and isinstance(model.layers[0].gate_up, Int4Linear)
    assert_matches_hf(model, hf)


def test_gptq_act_order_is_a_clear_error(tmp_path):
    hf, weights = quantized_hf_model(3, 128, "symmetric")

    def shuffled(w):
        parts = gptq_parts(w, "gptq")
        parts["g_idx"] = parts["g_idx"][torch.randperm(len(parts["g_idx"]), generator=torch.Generator().manual_seed(0))]
        return parts
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": True}
    write_checkpoint(tmp_path, hf, weights, shuffled, qc)
    with pytest.raises(ValueError, match="act-order"):
        fastinfer.load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("change, match", [
    ({"bits": 8}, "bits=8"), ({"group_size": -1}, "group_size=-1"), ({"quant_method": "bnb"}, "quant_method"),
    ({"version": "gemv"}, "version"), ({"zero_point": False}, "zero_point"),
])
def test_unsupported_checkpoints_are_refused(tmp_path, change, match):
    hf, weights = quantized_hf_model(4, 64, "zeros")
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", **change}
    write_checkpoint(tmp_path, hf, weights, awq_parts, qc)
    with pytest.raises(ValueError, match=match):
        fastinfer.load_model(tmp_path, device="cpu")


def test_quantization_argument_is_checked(tmp_path):
    hf = make_hf_model("llama", seed=5, **SHAPE)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantization must be"):
        fastinfer.load_model(tmp_path, quantization="int8")  # ("fp8" quantizes on load: tests/test_fp8_model.py)
    with pytest.raises(ValueError, match="no gptq quantization_config"):
        fastinfer.load_model(tmp_path, quantization="gptq")
    with pytest.raises(ValueError, match="quantization=None, 'int4' or 'fp8'"):
        fastinfer.load_model(hf, quantization="awq")


def test_missing_part_names_the_layer(tmp_path):
    hf, weights = quantized_hf_model(6, 128, "symmetric")
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}
    write_checkpoint(tmp_path, hf, weights, lambda w: {k: v for k, v in gptq_parts(w, "gptq").items() if k != "qzeros"}, qc)
    with pytest.raises(ValueError, match="lacks \\['qzeros'\\]"):
        fastinfer.load_model(tmp_path, device="cpu")


# ---- round-to-nearest at load ---------------------------------------------------------------------

def test_int4_quantization_of_a_dense_model_matches_its_rtn_weights():
    hf = make_hf_model("llama", seed=7, **SHAPE)
    loaded = fastinfer.load_model(hf, quantization="int4")
    assert loaded.model.quant.method == "int4" and loaded.model.quant.group_size == 128
    with torch.no_grad():  # the same RTN (fp32 scales, as the fp32 model stores them) applied to HF
        for name, param in hf.named_parameters():
            if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)):
                param.copy_(quantize_rtn(param, 128, "zeros").dequantize())
    assert_matches_hf(loaded.model, hf)


def test_llm_takes_quantization():
    hf = make_hf_model("llama", seed=8, **SHAPE)
    llm = fastinfer.LLM(hf, quantization="int4", num_blocks=16)
    assert isinstance(llm.loaded.model.layers[0].o_proj, Int4Linear)
    out = llm.generate([PROMPT], fastinfer.SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# ---- GGUF blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_match_gguf_dequantize(qtype_name):
    gguf = pytest.importorskip("gguf")
    from fastinfer.loader.gguf_file import GGUFTensor
    from fastinfer.quant.gguf import q4_weight
    qtype = gguf.GGMLQuantizationType[qtype_name]
    values = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    blocks = gguf.quants.quantize(values, qtype)  # uint8 [64, 256 / 32 * block bytes]
    w = q4_weight(GGUFTensor("blk.0.ffn_up.weight", qtype, (64, 256), blocks))
    assert w.mode == ("symmetric" if qtype_name == "Q4_0" else "mins") and w.group_size == 32
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(64, 256))
    assert torch.equal(w.dequantize(), expected)
