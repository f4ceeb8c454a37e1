"""fastinfer.generate matches HF transformers' generate token for token (CPU, fp32, greedy)."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from models import VARIANTS, left_padded_batch, make_hf_model

transformers = pytest.importorskip("transformers")
PAD = 0


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_hf_batched(variant):
    model = make_hf_model(variant)
    ids, mask = left_padded_batch([5, 17, 1, 33], model.config.vocab_size, PAD)
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    expected = hf_generate(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert ours.dtype == torch.long and ours.shape == expected.shape
    assert torch.equal(ours, expected)


def test_greedy_matches_hf_from_safetensors_dir(tmp_path):
    model = make_hf_model("llama3-rope", seed=1)
    model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch([9, 4], model.config.vocab_size, PAD, seed=1)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(fastinfer.generate(str(tmp_path), ids, attention_mask=mask, pad_token_id=PAD, **kw),
                       hf_generate(model, ids, mask, **kw))


def test_eos_padding_and_penalties_match_hf():
    model = make_hf_model("llama", seed=2)
    ids, mask = left_padded_batch([6, 11, 3], model.config.vocab_size, PAD, seed=2)
    ref = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    # Pick as EOS a token some row emits mid-way, so rows finish at different steps.
    eos = int(ref[1, ids.shape[1] + 3])
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=[eos, 7], repetition_penalty=1.3, min_new_tokens=2)
    expected = hf_generate(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(ours, expected)
    assert (ours[:, -1] == PAD).any(), "the test wants a row that finished early"


def test_num_return_sequences_layout():
    model = make_hf_model("llama", seed=2)
    ids, mask = left_padded_batch([6, 3], model.config.vocab_size, PAD, seed=2)
    out = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=4,
                             do_sample=True, num_return_sequences=3, eos_token_id=None)
    assert out.shape == (6, ids.shape[1] + 4)
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))
    with pytest.raises(ValueError, match="num_return_sequences"):
        fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=4, num_return_sequences=2)


def test_stale_cache_is_refreshed_after_weight_change():
    model = make_hf_model("llama", seed=3)
    ids, mask = left_padded_batch([8], model.config.vocab_size, PAD, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    with torch.no_grad():
        model.model.norm.weight.mul_(-1.0)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw),
                       hf_generate(model, ids, mask, **kw))


def test_sampling_is_reproducible_with_seed():
    model = make_hf_model("qwen2", seed=4)
    ids, mask = left_padded_batch([5, 9], model.config.vocab_size, PAD, seed=4)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01)
    torch.manual_seed(123)
    a = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    torch.manual_seed(123)
    b = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(a, b)


class _Recorder:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_each_token():
    model = make_hf_model("llama", seed=5)
    ids, mask = left_padded_batch([7], model.config.vocab_size, PAD, seed=5)
    rec = _Recorder()
    out = fastinfer.generate(model, ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             eos_token_id=None, streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], ids)
    assert [int(p.item()) for p in rec.puts[1:]] == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5, do_sample=True), "temperature"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=-1, do_sample=True), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, length_penalty="long"), "length_penalty"),
    (dict(num_beam_groups=2, num_beams=2), "num_beam_groups"),
    (dict(no_such_option=3), "no_such_option"),
    (dict(num_return_sequences=0), "num_return_sequences"),
])
def test_bad_generation_arguments(kwargs, match):
    model = make_hf_model("llama", seed=6)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=match):
        fastinfer.generate(model, ids, **kwargs)


def test_bad_prompts():
    model = make_hf_model("llama", seed=6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fastinfer.generate(model, torch.tensor([[5, model.config.vocab_size]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        fastinfer.generate(model, torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        fastinfer.generate(model, torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="maximum length"):
        fastinfer.generate(model, torch.tensor([[5, 6]]), max_new_tokens=10_000)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "phi3-partial", "granite", "mixtral", "qwen2-moe", "qwen3-moe",
                                     "granitemoe", "olmo2", "gemma2", "gemma3"])
def test_greedy_matches_hf_on_the_gpu(variant):
    """The GPU path end to end (CUDA kernels, decode GEMV, pipelined decode) in fp32 against HF's
    generate on the same GPU, left-padded batch, with EOS stops."""
    model = make_hf_model(variant, seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=512).cuda()
    ids, mask = left_padded_batch([5, 17, 1, 33, 60], model.config.vocab_size, PAD, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=[7, 11])
    expected = hf_generate(model, ids, mask, **kw)
    ours = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert ours.device == ids.device
    assert torch.equal(ours, expected)
