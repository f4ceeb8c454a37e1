"""The text model of a multimodal checkpoint (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2; Gemma 3's
is in test_gemma3.py): its logits and greedy tokens as HF's wrapper computes them for text-only input, in memory
and from a saved directory, the vision tower's tensors skipped."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from test_loader_parity import fi_logits

transformers = pytest.importorskip("transformers")
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]


def mistral3(seed=1, **text):
    text = {**dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=None), **text}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, head_dim=16)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return model


@pytest.mark.parametrize("text", [{}, {"sliding_window": 6}], ids=["full", "sliding-window"])
def test_mistral3_text_model(tmp_path, text):
    model = mistral3(**text)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert cfg.architecture == "MistralForCausalLM" and cfg.text_of_multimodal
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].float()
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), expected, rtol=0, atol=2e-5)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), PROMPT), expected, rtol=0, atol=2e-5)
    assert torch.equal(fastinfer.generate(str(tmp_path), torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                          eos_token_id=None, pad_token_id=0), tokens)


def test_a_wrapper_without_a_text_config_is_named():
    with pytest.raises(ValueError, match="mistral3 \\(multimodal\\) config needs a text_config"):
        ModelConfig.from_hf({"architectures": ["Mistral3ForConditionalGeneration"], "text_config": None})
