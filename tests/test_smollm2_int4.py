"""SmolLM2-135M's Q4_1 projections running natively as 4-bit (quantization="gguf")."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.evaluate import perplexity
from fastinfer.quant.linear import Int4Linear

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def path():
    from fastinfer.loader.gguf import default_model_path
    return default_model_path()


@pytest.mark.slow
def test_q4_1_projections_never_become_floats(path, monkeypatch):
    import gguf

    import fastinfer.loader.gguf as loader_gguf  # every dequantization of the 4-bit reader goes through it
    plain = loader_gguf.dequantize

    def guarded(tensor, dtype=torch.float32):
        assert tensor.qtype not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1), tensor.name
        return plain(tensor, dtype)
    monkeypatch.setattr(loader_gguf, "dequantize", guarded)
    model = fastinfer.load_model(path, device="cpu", quantization="gguf").model
    assert model.quant.group_size == 32 and model.quant.mode == "mins"
    for layer in model.layers:
        assert all(isinstance(p, Int4Linear) for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))


@pytest.mark.slow
def test_perplexity_int4_equals_dequantized(path):
    """MODELS.md setting: first 2048 tokens of Pride and Prejudice, 512-token windows."""
    from text_data import novel
    int4 = fastinfer.load_model(path, device="cpu", quantization="gguf")
    ids = int4.tokenizer(novel("prideprejudice"))["input_ids"][:2048]
    ours = perplexity(int4, ids, window=512)
    dense = perplexity(fastinfer.load_model(path, device="cpu"), ids, window=512)
    print(f"SmolLM2 perplexity: native Q4_1 int4 {ours:.6f}, dequantized {dense:.6f}")
    assert abs(ours - dense) / dense < 0.005, (ours, dense)


@pytest.mark.slow
def test_int4_generates_real_text(path):
    llm = fastinfer.LLM(path, device="cpu", quantization="gguf", num_blocks=64)
    out = llm.generate("The capital of France is", fastinfer.SamplingParams(max_tokens=4, temperature=0),
                       use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
