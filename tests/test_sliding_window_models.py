"""Sliding-window models against HF transformers (CPU fp32 unless marked cuda): Mistral and Phi-3 (every
layer windowed), Qwen2 / Qwen3 under use_sliding_window (only the layers HF windows: from
max_window_layers on, or as layer_types lists them). Windows of a few tokens, so that prompts and
generations run far past them: logits over whole prompts, greedy generate on left-padded batches,
the engine's chunked prefill, prefix caching and preemption, beam search, prompt-lookup speculative
decoding and the fused decode path.
"""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer import ops
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.models import linear as linear_mod
from fastinfer.sampling_params import SamplingParams
from models import left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits

transformers = pytest.importorskip("transformers")
PAD = 0

# name -> (tests/models.py variant, config overrides, the windowed layers of the 2-layer model)
WINDOWED = {
    "mistral": ("mistral", dict(sliding_window=8), (0, 1)),
    "phi3": ("phi3", dict(sliding_window=7), (0, 1)),
    "qwen2-max-window-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), (1,)),
    "qwen3-layer-types": ("qwen3", dict(use_sliding_window=True, sliding_window=5,
                                        layer_types=["sliding_attention", "full_attention"]), (0,)),
}


def windowed_model(name: str, seed: int = 0, **extra):
    variant, overrides, _ = WINDOWED[name]
    return make_hf_model(variant, seed=seed, **overrides, **extra)


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_config_reads_the_windowed_layers_as_hf(name):
    model = windowed_model(name)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    window, layers = model.config.sliding_window, WINDOWED[name][2]
    assert [cfg.attention_window(i) for i in range(2)] == [window if i in layers else 0 for i in range(2)]
    assert cfg.max_model_len == model.config.max_position_embeddings  # no longer capped at the window


def test_config_without_a_window():
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    for cfg in ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": False},
                {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": True,
                 "max_window_layers": 3},  # no layer from 3 on
                {"architectures": ["LlamaForCausalLM"], "sliding_window": 16},
                {"architectures": ["MistralForCausalLM"], "sliding_window": None}):
        parsed = ModelConfig.from_hf({**base, **cfg})
        assert parsed.sliding_window is None and [parsed.attention_window(i) for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types"),
    ({"max_window_layers": -1}, "max_window_layers"),
    ({"sliding_window": -4}, "sliding_window"),
    ({"sliding_window": 0}, "sliding_window"),  # HF's mask would hide every key
    ({"sliding_window": None, "layer_types": ["sliding_attention", "full_attention", "full_attention"]},
     "sliding_window is null"),
])
def test_bad_window_configs_name_the_field(change, match):
    cfg = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               architectures=["Qwen2ForCausalLM"], sliding_window=16, use_sliding_window=True)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**cfg, **change})


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_logits_match_hf_far_past_the_window(name):
    model = windowed_model(name, seed=3)
    ids = torch.randint(3, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(model, ids)
    torch.testing.assert_close(fi_logits(get_loaded(model), ids), expected, rtol=0, atol=1e-5)
    # the window matters here: full attention gives other logits from the window's end on
    variant, overrides, _ = WINDOWED[name]
    plain = {k: v for k, v in overrides.items() if k not in ("sliding_window", "use_sliding_window", "layer_types")}
    full = hf_logits(make_hf_model(variant, seed=3, **plain, sliding_window=None), ids)
    window = model.config.sliding_window
    assert torch.equal(full[:window], expected[:window])
    assert (full[window:] - expected[window:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_greedy_generate_matches_hf(name):
    model = windowed_model(name, seed=4)
    ids, mask = left_padded_batch([5, 17, 1, 33], model.config.vocab_size, PAD, seed=4)
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw),
                       hf_generate(model, ids, mask, **kw))


@pytest.mark.parametrize("name", ["mistral", "qwen2-max-window-layers"])
def test_beam_search_matches_hf(name):
    model = windowed_model(name, seed=5)
    ids, mask = left_padded_batch([9, 20], model.config.vocab_size, PAD, seed=5)
    kw = dict(max_new_tokens=16, do_sample=False, num_beams=3, eos_token_id=[5], length_penalty=0.7)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw),
                       hf_generate(model, ids, mask, **kw))


@pytest.mark.parametrize("name", ["phi3", "qwen3-layer-types"])
def test_prompt_lookup_speculation_matches_hf_greedy(name):
    model = windowed_model(name, seed=6)
    pattern = torch.randint(3, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(6))
    ids = pattern.repeat(4)[None]  # repeats: the n-gram proposer finds drafts
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=None)
    expected = hf_generate(model, ids, torch.ones_like(ids), **kw)
    assert torch.equal(fastinfer.generate(model, ids, pad_token_id=PAD, prompt_lookup_num_tokens=4, **kw), expected)


def test_fused_decode_path_matches_hf(monkeypatch):
    """With the decode GEMV forced on the CPU the decode steps take the fused norm / rotary path; the
    window still applies (it is the attention op's)."""
    model = windowed_model("mistral", seed=7, head_dim=16)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=7)
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    expected = hf_generate(model, ids, mask, **kw)
    monkeypatch.setattr(linear_mod, "use_dense_gemv", lambda device, n, k, dtype: 1 <= n <= ops.GEMV_MAX_M)
    calls = []
    real = ops.rms_norm_dense_gemv
    monkeypatch.setattr(ops, "rms_norm_dense_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)
    assert calls, "the fused path did not run"


def test_engine_chunked_prefill_prefix_cache_and_preemption_match_hf():
    """The batch API past the window: prompts of up to 60 tokens in 16-token chunks, a shared 40-token
    prefix served from the cache, and a pool small enough to preempt; every completion is HF's."""
    model = windowed_model("mistral", seed=8)
    gen = torch.Generator().manual_seed(8)
    shared = torch.randint(3, model.config.vocab_size, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (1, 9, 20)]
    prompts += [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 60, 33)]
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf_generate(model, ids, torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=None)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(get_loaded(model), num_blocks=7, block_size=16, max_num_seqs=4, max_num_batched_tokens=16,
              enable_prefix_caching=True)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0 and llm.prefix_cache_hit_rate > 0


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mistral", "qwen2-max-window-layers"])
def test_greedy_matches_hf_on_the_gpu(name):
    """The CUDA kernels' windows end to end (prefill, split decode, decode graphs) in fp32 against HF's
    generate on the same GPU, with windows of 16 and 100 tokens: past a key tile and across splits."""
    for window in (16, 100):
        variant, overrides, _ = WINDOWED[name]
        model = make_hf_model(variant, seed=9, **{**overrides, "sliding_window": window}, hidden_size=256,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512).cuda()
        ids, mask = left_padded_batch([5, 17, 1, 33, 150], model.config.vocab_size, PAD, seed=9)
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(max_new_tokens=60, do_sample=False, eos_token_id=None)
        assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw),
                           hf_generate(model, ids, mask, **kw))
