"""GraniteForCausalLM (IBM Granite 3.x: Llama with four scalars) against HF transformers, CPU fp32:
embedding_multiplier (the embedding rows scaled as HF scales them), residual_multiplier (folded into o_proj /
down_proj), attention_multiplier (the attention scale), logits_scaling (the logits divided)."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import ops
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from fastinfer.models import linear as linear_mod
from fastinfer.models.llama_weights import residual_scaled
from models import VARIANTS, left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits

transformers = pytest.importorskip("transformers")
PAD = 0
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"attention_bias": True},
                                       {"embedding_multiplier": 1.0, "logits_scaling": 1.0}],
                         ids=["tied", "untied", "attention-bias", "unit-embedding-and-logits"])
def test_logits_match_hf(overrides):
    model = make_hf_model("granite", seed=1, **overrides)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scalar, value", [("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                                           ("attention_multiplier", 2.0), ("logits_scaling", 1.0)])
def test_each_multiplier_matters(scalar, value):
    """The same weights with one scalar reset give other logits in HF and in fastinfer alike: each of the
    four is applied, not just accepted."""
    model = make_hf_model("granite", seed=2)
    changed = make_hf_model("granite", seed=2, **{scalar: value})
    ours, theirs = fi_logits(get_loaded(changed), PROMPT), hf_logits(changed, PROMPT)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (theirs - hf_logits(model, PROMPT)).abs().max() > 1e-3


def test_greedy_from_a_safetensors_dir_and_the_fused_decode_path(tmp_path, monkeypatch):
    model = make_hf_model("granite", seed=3)
    model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=3)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(fastinfer.generate(str(tmp_path), ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)
    # decode GEMV forced on the CPU: the fused norm / residual path with the scaled projections
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    calls = []
    real = ops.dense_gemv_add_residual
    monkeypatch.setattr(ops, "dense_gemv_add_residual", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)
    assert calls, "the fused path did not run"


def test_tied_head_keeps_the_unscaled_rows():
    loaded = get_loaded(make_hf_model("granite", seed=4))
    model = loaded.model
    assert model.lm_head is not model.embed
    torch.testing.assert_close(model.embed, model.lm_head * 6.0)


@pytest.mark.parametrize("quantization", ["fp8", "int4"])
def test_quantized_on_load_runs_close_to_hf(quantization):
    """Quantization of the float checkpoint sees the folded projections; logits stay near HF's."""
    model = make_hf_model("granite", seed=5, hidden_size=128, intermediate_size=256)
    ours = fi_logits(fastinfer.load_model(model, quantization=quantization), PROMPT)
    theirs = hf_logits(model, PROMPT)
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min() > 0.99


def test_prequantized_projection_is_refused():
    weights = [("model.layers.0.self_attn.o_proj.weight", torch.zeros(4, 4, dtype=torch.float8_e4m3fn))]
    with pytest.raises(ValueError, match="pre-quantized Granite checkpoint"):
        list(residual_scaled(weights, 0.5))


@pytest.mark.parametrize("key, value", [("logits_scaling", 0), ("attention_multiplier", "x"),
                                        ("embedding_multiplier", float("inf")), ("residual_multiplier", None)])
def test_bad_multipliers_name_the_field(key, value):
    cfg = {**make_hf_model("granite").config.to_dict(), key: value}
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(cfg)


def test_registered_as_a_variant():
    assert "granite" in VARIANTS  # test_generate.py's batched greedy parity runs it too


def test_bf16_logits_are_rounded_after_the_scaling_as_hfs():
    """HF divides its bf16 logits by logits_scaling and rounds: fastinfer's logits are bf16 values too,
    close to HF's (a non-power-of-two scaling, where the rounding shows)."""
    model = make_hf_model("granite", seed=6, logits_scaling=3.0).to(torch.bfloat16)
    ours = fi_logits(get_loaded(model), PROMPT)
    assert torch.equal(ours, ours.to(torch.bfloat16).float())
    theirs = hf_logits(model, PROMPT)
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()

