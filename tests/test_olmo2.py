"""OLMo-2 (Olmo2ForCausalLM: post-norm layers, q / k RMSNorms over the whole projections) against HF
transformers, CPU fp32: logits, greedy and beam search on left-padded batches, a checkpoint directory, the
engine's chunked prefill / prefix cache / preemption, quantization at load."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.generate import get_loaded
from models import left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits
from test_moe import assert_engine_matches_hf

transformers = pytest.importorskip("transformers")
PAD = 0
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41]


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}, {"tie_word_embeddings": True},
                                       {"num_key_value_heads": 4}], ids=["default", "bias", "tied", "mha"])
def test_logits_match_hf(overrides):
    model = make_hf_model("olmo2", seed=1, **overrides)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_the_norms_are_where_olmo2_puts_them():
    """Each of the three OLMo-2-specific norms changes the logits (a layer read as Llama's would not)."""
    model = make_hf_model("olmo2", seed=2)
    base = fi_logits(get_loaded(model), PROMPT)
    for name in ("post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        edited = make_hf_model("olmo2", seed=2)
        with torch.no_grad():
            edited.get_parameter(f"model.layers.0.{name}.weight").mul_(1.5)
        changed = fi_logits(get_loaded(edited), PROMPT)
        assert (changed - base).abs().max() > 1e-3, name
        torch.testing.assert_close(changed, hf_logits(edited, PROMPT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_hf_from_a_checkpoint_dir(tmp_path, num_beams):
    model = make_hf_model("olmo2", seed=3)
    model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=3)
    kw = dict(max_new_tokens=14, do_sample=False, eos_token_id=None, num_beams=num_beams)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(fastinfer.generate(str(tmp_path), ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)


def test_engine_chunked_prefill_prefix_cache_and_preemption_match_hf():
    assert_engine_matches_hf(make_hf_model("olmo2", seed=4))


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantization_at_load_runs_close_to_the_float_model(quantization):
    model = make_hf_model("olmo2", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=64)
    quantized = fi_logits(fastinfer.load_model(model, quantization=quantization), PROMPT)
    exact = hf_logits(model, PROMPT)
    assert (quantized.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75
    assert 0 < (quantized - exact).abs().max() < 0.5 * exact.abs().max()
