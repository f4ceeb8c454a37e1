"""Gemma 2 (HF's Gemma2ForCausalLM) against HF transformers, CPU fp32: Gemma 3's layer (models/gemma.py) without
q / k norms, one rope table, every other layer sliding, attention scores soft-capped (the attention ops' softcap),
logits soft-capped. Logits, greedy and beam search, the engine past the window, a checkpoint's config.json, int4 at
load, bad configs."""
from __future__ import annotations

import json

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from models import make_hf_model
from test_loader_parity import fi_logits, hf_logits
from test_gemma3 import assert_bf16_on_the_gpu_tracks_hf, assert_greedy_and_beams_match_hf
from test_moe import assert_engine_matches_hf

transformers = pytest.importorskip("transformers")
PAD = 0
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]  # longer than the window (6)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"attn_logit_softcapping": None},
                                       {"final_logit_softcapping": None, "num_key_value_heads": 4},
                                       {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 3}],
                         ids=["default", "untied", "no-attention-cap", "no-logit-cap-mha", "global-then-narrow-window"])
def test_logits_match_hf(overrides):
    model = make_hf_model("gemma2", seed=1, **overrides)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=2e-5)


def test_the_attention_cap_matters():
    """Without the attention scores' cap the logits move by far more than the tolerance: the softcap reaches the
    attention ops."""
    model = make_hf_model("gemma2", seed=1)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (3.0, 5.0)
    assert cfg.sliding_window == 6 and cfg.sliding_window_layers == (0,) and cfg.local_rope_theta is None
    uncapped = make_hf_model("gemma2", seed=1, attn_logit_softcapping=None)
    assert (fi_logits(get_loaded(uncapped), PROMPT) - hf_logits(model, PROMPT)).abs().max() > 0.1


def test_greedy_and_beam_search_match_hf():
    assert_greedy_and_beams_match_hf(make_hf_model("gemma2", seed=2))


def test_engine_chunked_prefill_prefix_cache_and_preemption_match_hf():
    assert_engine_matches_hf(make_hf_model("gemma2", seed=4))


def test_a_checkpoints_config_json(tmp_path):
    """config.json as Gemma 2 checkpoints write it (rope_theta, no layer_types, defaults left out): fastinfer's
    logits equal HF's model loaded from the same directory."""
    model = make_hf_model("gemma2", seed=3)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "max_position_embeddings", "tie_word_embeddings"):
        raw.pop(key, None)
    raw["rope_theta"] = 10000.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.layer_types == ["sliding_attention", "full_attention"]
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), PROMPT), hf_logits(hf, PROMPT),
                               rtol=0, atol=2e-5)


def test_int4_at_load():
    model = make_hf_model("gemma2", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32)
    ours, theirs = fi_logits(fastinfer.load_model(model, quantization="int4"), PROMPT), hf_logits(model, PROMPT)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("change, match", [
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_bad_configs_name_the_field(change, match):
    cfg = make_hf_model("gemma2").config.to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


@pytest.mark.cuda
def test_on_the_gpu():
    """bf16 on the GPU (the capped mma.sync prefill and CUDA-core decode, head_dim 256): the prompt's top-1 tokens
    agree with HF's fp32 forward, and each greedy token the engine decodes is HF's top-1 on the same prefix or
    within bf16's reach of it."""
    assert_bf16_on_the_gpu_tracks_hf(make_hf_model("gemma2", seed=8, hidden_size=512, intermediate_size=512,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=256))
