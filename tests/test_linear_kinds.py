"""One Linear abstraction for every projection kind: dense, FP8 and 4-bit (models/linear.py).

Checks that the kind follows `quantization` (or a checkpoint's quantization_config), that the
combinations fastinfer cannot run fail with a ValueError naming them, and the paths the two
quantizations share: a 4-bit projection with a bias (Qwen2's qkv) and a 4-bit checkpoint loaded
into an FP8 model.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.models.linear import Linear, linear_kind, make_linear
from fastinfer.models.llama import LlamaForCausalLM
from fastinfer.quant.int4 import quantize_rtn
from fastinfer.quant.linear import Int4Linear, QuantConfig
from models import make_hf_model
from test_quant_loaders import PROJECTIONS, SHAPE, assert_matches_hf, gptq_parts, quantized_hf_model, write_checkpoint

pytest.importorskip("transformers")


def test_make_linear_picks_the_kind():
    dense = make_linear(128, 64, torch.float32, torch.device("cpu"), None, bias=True)
    fp8 = make_linear(128, 64, torch.float32, torch.device("cpu"), "fp8")
    int4 = make_linear(128, 64, torch.float32, torch.device("cpu"), QuantConfig("int4", 64, "zeros"), bias=True)
    assert isinstance(dense, Linear) and dense.weight.dtype == torch.float32 and dense.bias is not None
    assert isinstance(fp8, Linear) and fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (64,)
    assert isinstance(int4, Int4Linear) and int4.shape == (64, 128) and int4.bias.shape == (64,)


@pytest.mark.parametrize("bad, match", [("gptq", "needs a QuantConfig"), ("nf4", "quantization must be one of")])
def test_unsupported_kinds_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        linear_kind(bad)


def test_unsupported_combinations_are_value_errors(tmp_path):
    hf = make_hf_model("llama", seed=3, **SHAPE)
    with pytest.raises(ValueError, match="quantization must be one of"):
        fastinfer.load_model(hf, quantization="int8")
    with pytest.raises(ValueError, match="transformers model object"):
        fastinfer.load_model(hf, quantization="gptq")
    hf, weights = quantized_hf_model(4, 128, "symmetric")
    write_checkpoint(tmp_path, hf, weights, lambda w: gptq_parts(w, "gptq"),
                     {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    with pytest.raises(ValueError, match="is a gptq checkpoint; it cannot load with quantization='fp8'"):
        fastinfer.load_model(tmp_path, device="cpu", quantization="fp8")
    cfg = ModelConfig.from_hf({**hf.config.to_dict(), "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="the checkpoint is FP8"):
        LlamaForCausalLM(cfg, torch.float32, "cpu", QuantConfig("int4", 128, "zeros"))


@pytest.mark.parametrize("variant, flags", [("qwen2", {}), ("qwen3", {"attention_bias": True}), ("phi3", {})])
def test_int4_projection_with_bias_matches_hf(variant, flags):
    """Qwen2's q/k/v carry a bias (Qwen3's q/k/v and o with attention_bias, and its q / k heads are
    normalized after the 4-bit projection): the 4-bit projection adds it after the W4A16 GEMM. Phi-3's
    fused qkv_proj / gate_up_proj quantize row by row like the split ones."""
    hf = make_hf_model(variant, seed=9, **{**SHAPE, **flags})
    loaded = fastinfer.load_model(hf, quantization="int4")
    assert isinstance(loaded.model.layers[0].qkv, Int4Linear)
    assert (loaded.model.layers[0].qkv.bias is not None) == (variant != "phi3")
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS + ("self_attn.qkv_proj", "mlp.gate_up_proj"))):
                param.copy_(quantize_rtn(param, 128, "zeros").dequantize())
    assert_matches_hf(loaded.model, hf)


def test_4bit_checkpoint_into_an_fp8_model_equals_its_dequantized_weights():
    hf, weights = quantized_hf_model(5, 128, "zeros")
    state = hf.state_dict()
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    from_codes = LlamaForCausalLM(cfg, torch.float32, "cpu", "fp8")
    from_codes.load_weights((k, weights.get(k.removesuffix(".weight"), v)) for k, v in state.items())
    from_floats = LlamaForCausalLM(cfg, torch.float32, "cpu", "fp8")
    from_floats.load_weights(state.items())
    assert from_codes.quantization == "fp8" and from_codes.quant is None
    for a, b in zip(from_codes.layers, from_floats.layers):
        for name in ("qkv", "o_proj", "gate_up", "down"):
            pa, pb = getattr(a, name), getattr(b, name)
            assert torch.equal(pa.weight.view(torch.uint8), pb.weight.view(torch.uint8))
            torch.testing.assert_close(pa.weight_scale, pb.weight_scale, rtol=0, atol=0)
