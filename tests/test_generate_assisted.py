"""HF's assisted generation keywords in fastinfer.generate, run as the engine's speculative decoding:
assistant_model (a draft model) and prompt_lookup_num_tokens (n-gram prompt lookup). Greedy output is the
model's own, so it must equal HF's plain greedy output, and HF's assisted output, token for token."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import engine as engine_mod
from models import left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


def hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


@pytest.fixture
def engines(monkeypatch):
    """The engines generate builds (their speculative statistics tell whether speculation ran)."""
    made = []
    real = engine_mod.Engine.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(engine_mod.Engine, "__init__", spy)
    return made


@pytest.mark.parametrize("how", ["assistant", "prompt_lookup"])
def test_assisted_greedy_equals_plain_greedy(engines, how):
    target = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([5, 17, 1, 9], target.config.vocab_size, PAD, seed=2)
    ids[1, -12:] = ids[1, -17:-5].clone()  # a repeated stretch for the prompt lookup to find
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=[7])
    extra = ({"assistant_model": make_hf_model("llama", seed=5, num_hidden_layers=1), "num_assistant_tokens": 3}
             if how == "assistant" else {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2})
    ours = fastinfer.generate(target, ids, attention_mask=mask, **kw, **extra)
    assert torch.equal(ours, hf(target, ids, mask, **kw))
    stats = engines[-1].spec_stats
    assert stats.num_proposed > 0 and stats.num_accepted > 0, "speculation did not run: the test checks little"
    one, one_mask = ids[1:2, mask[1].bool()], mask[1:2, mask[1].bool()]  # HF assists batches of one
    assert torch.equal(fastinfer.generate(target, one, attention_mask=one_mask, **kw, **extra),
                       hf(target, one, one_mask, **kw, **extra))


def test_assisted_generation_refusals():
    target = make_hf_model("llama", seed=5)
    ids = torch.tensor([[5, 6, 7]])
    draft = make_hf_model("llama", seed=5, num_hidden_layers=1)
    with pytest.raises(ValueError, match="assistant_model or prompt_lookup_num_tokens, not both"):
        fastinfer.generate(target, ids, max_new_tokens=3, assistant_model=draft, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="not with num_beams > 1"):
        fastinfer.generate(target, ids, max_new_tokens=3, prompt_lookup_num_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        fastinfer.generate(target, ids, max_new_tokens=3, prompt_lookup_num_tokens=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size is not supported with speculative decoding"):
        fastinfer.generate(target, ids, max_new_tokens=3, prompt_lookup_num_tokens=2, no_repeat_ngram_size=2)
    other = make_hf_model("llama", seed=5, num_hidden_layers=1, vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary"):
        fastinfer.generate(target, ids, max_new_tokens=3, assistant_model=other)
