"""GPTQ quantizer: less output error than round-to-nearest on correlated inputs, RTN exactly when the
inputs are uncorrelated, and a better 4-bit SmolLM2 than RTN when calibrated on text."""
from __future__ import annotations

import pytest
import torch

from fastinfer.quant.gptq import collect_hessians, gptq_quantize, gptq_quantize_model
from fastinfer.quant.int4 import quantize_rtn
from fastinfer.quant.linear import Int4Linear

MODES = ["symmetric", "zeros", "mins"]


def correlated_inputs(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs with a few strong directions and outlier channels, like a transformer's activations."""
    mixing = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=gen) @ mixing
    return x * (1 + 4 * (torch.rand(k, generator=gen) > 0.95))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", [64, 128])
def test_gptq_beats_rtn_on_correlated_inputs(group_size, mode):
    gen = torch.Generator().manual_seed(group_size)
    x, w = correlated_inputs(2048, 256, gen), torch.randn(128, 256, generator=gen) * 0.05
    hessian = 2 * x.double().t() @ x.double() / x.shape[0]
    gptq = gptq_quantize(w, hessian, group_size, mode)
    rtn = quantize_rtn(w, group_size, mode, scale_dtype=torch.float16)
    err = lambda q: (x @ (w - q.dequantize()).t()).norm().item()  # noqa: E731
    assert gptq.mode == mode and gptq.scales.dtype == torch.float16
    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))


@pytest.mark.parametrize("mode", MODES)
def test_gptq_is_rtn_for_uncorrelated_inputs(mode):
    """H = c I: no column's error can be compensated by another, so GPTQ must round to nearest."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    gptq = gptq_quantize(w, 3 * torch.eye(128, dtype=torch.float64), 64, mode)
    rtn = quantize_rtn(w, 64, mode, scale_dtype=torch.float16)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(torch.randn(64, 128), torch.eye(64), 64)
    with pytest.raises(ValueError, match="block"):
        gptq_quantize(torch.randn(64, 128), torch.eye(128), 128, block=64)


def test_gptq_model_is_closer_to_dense_than_rtn():
    from fastinfer import load_model
    from models import make_hf_model
    from test_quant_loaders import PROMPT, SHAPE, logits
    hf = make_hf_model("llama", seed=3, **SHAPE)
    dense = load_model(hf, dtype=torch.float32, device="cpu").model
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, 320, (96,), generator=gen).tolist() for _ in range(8)]
    model = gptq_quantize_model(dense, collect_hessians(dense, calibration), group_size=128, mode="zeros")
    assert all(isinstance(layer.qkv, Int4Linear) for layer in model.layers) and dense.quant is None
    rtn = load_model(hf, dtype=torch.float32, device="cpu", quantization="int4").model
    reference = logits(dense, PROMPT)
    assert (logits(model, PROMPT) - reference).pow(2).mean() < (logits(rtn, PROMPT) - reference).pow(2).mean()


@pytest.mark.slow
def test_gptq_calibrated_on_text_beats_rtn_on_smollm2():
    pytest.importorskip("gguf")
    from text_data import novel

    from fastinfer import load_model
    from fastinfer.evaluate import perplexity
    from fastinfer.loader.gguf import default_model_path
    path = default_model_path()
    dense = load_model(path, device="cpu")
    ids = dense.tokenizer(novel("prideprejudice"))["input_ids"]
    calibration = [ids[20000 + 256 * i: 20256 + 256 * i] for i in range(4)]  # far from the evaluation text
    hessians = collect_hessians(dense.model, calibration)
    gptq = gptq_quantize_model(dense.model, hessians, group_size=64, mode="zeros")
    rtn = load_model(path, device="cpu", quantization="int4")  # group 64 (576 = 9 x 64), zeros
    assert rtn.model.quant.group_size == 64
    evaluation = ids[:512]
    ppl_gptq = perplexity(type(dense)(gptq, dense.tokenizer), evaluation, window=512)
    ppl_rtn = perplexity(rtn, evaluation, window=512)
    print(f"SmolLM2 re-quantized to 4 bits (g64), first 512 tokens: GPTQ {ppl_gptq:.3f}, RTN {ppl_rtn:.3f}")
    assert ppl_gptq < ppl_rtn
