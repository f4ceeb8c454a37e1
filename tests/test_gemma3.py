"""Gemma 3 (HF's Gemma3ForCausalLM, the text model) against HF transformers, CPU fp32: logits, greedy and beam
search, the engine's chunked prefill / prefix cache / preemption past the sliding window, 4.x configs, int4 / fp8
at load, and what is refused."""
from __future__ import annotations

import json

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from models import left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits
from test_moe import assert_engine_matches_hf

transformers = pytest.importorskip("transformers")
PAD = 0
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]  # longer than the window (6)


@pytest.mark.parametrize("overrides", [{}, {"final_logit_softcapping": 3.0}, {"tie_word_embeddings": False},
                                       {"attention_bias": True, "num_key_value_heads": 4},
                                       {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 3}],
                         ids=["default", "softcapped", "untied", "biased-mha", "global-then-narrow-window"])
def test_logits_match_hf(overrides):
    model = make_hf_model("gemma3", seed=1, **overrides)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=2e-5)


def test_each_gemma_feature_matters():
    """The reference is sensitive to what this port reproduces: with any one of them off, the logits move."""
    model = make_hf_model("gemma3", seed=1)
    expected = hf_logits(model, PROMPT)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert cfg.sliding_window == 6 and cfg.sliding_window_layers == (0,)
    assert cfg.attention_multiplier == 24 ** -0.5 and cfg.local_rope_theta == 10_000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    for change in ({"query_pre_attn_scalar": 16}, {"sliding_window": 60},
                   {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}):
        other = make_hf_model("gemma3", seed=1, **change)
        assert (fi_logits(get_loaded(other), PROMPT) - expected).abs().max() > 1e-3, change


def test_greedy_and_beam_search_match_hf():
    assert_greedy_and_beams_match_hf(make_hf_model("gemma3", seed=2))


def assert_greedy_and_beams_match_hf(model):
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    for kw in (dict(max_new_tokens=16, do_sample=False), dict(max_new_tokens=10, do_sample=False, num_beams=3)):
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kw)
        got = fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None, **kw)
        assert torch.equal(got, expected), kw


def test_engine_chunked_prefill_prefix_cache_and_preemption_match_hf():
    assert_engine_matches_hf(make_hf_model("gemma3", seed=4))


ROPE_FORMS = {  # config.json rope spellings, each read as HF 5 reads it
    # the published checkpoints' (transformers 4.x): rope_theta + rope_scaling for the global layers,
    # rope_local_base_freq for the sliding ones
    "4.x": dict(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # a 4.x rope_scaling beside rope_parameters keyed by layer type: merged into the global layers' entry
    "keyed+scaling": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # keyed entries without thetas: the top-level rope_theta / rope_local_base_freq fill them
    "keyed+thetas": dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                          "sliding_attention": {"rope_type": "default"}},
                         rope_theta=5000.0, rope_local_base_freq=777.0),
    # a legacy "type" key beside HF's default rope_type: HF applies no scaling, nor does fastinfer
    "legacy-type": dict(rope_scaling={"type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("form", ROPE_FORMS)
def test_a_checkpoints_config_json_is_read_as_hf_reads_it(tmp_path, form):
    """config.json as checkpoints write it (rope spellings above, sliding_window_pattern instead of layer_types,
    defaults left out): fastinfer's logits equal those of HF's model loaded from the same directory."""
    model = make_hf_model("gemma3", seed=3, layer_types=None, sliding_window_pattern=2)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "head_dim", "query_pre_attn_scalar"):
        raw.pop(key, None)
    raw.update(sliding_window_pattern=2, head_dim=16, **ROPE_FORMS[form])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.layer_types == ["sliding_attention", "full_attention"]
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), PROMPT), hf_logits(hf, PROMPT),
                               rtol=0, atol=2e-5)


def multimodal_model(seed=6):
    """A small Gemma3ForConditionalGeneration (Gemma 3 4B / 12B / 27B's class): a vision tower around the text
    model."""
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    return model


def test_the_text_model_of_a_multimodal_checkpoint(tmp_path):
    """Gemma3ForConditionalGeneration in memory and saved: its text model's logits and greedy tokens, as HF's
    model computes them for text-only input; the vision tower's tensors are skipped."""
    model = multimodal_model()
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), expected, rtol=0, atol=2e-5)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), PROMPT), expected, rtol=0, atol=2e-5)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=PAD)
    assert torch.equal(fastinfer.generate(str(tmp_path), torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                          eos_token_id=None, pad_token_id=PAD), tokens)


def test_norm_weights_round_to_the_model_dtype():
    """HF keeps Gemma's norm weights w in the model dtype and computes 1 + w in fp32: an fp32 model loaded in bf16
    gets 1 + bf16(w), not 1 + w."""
    model = make_hf_model("gemma3", seed=1)
    layer = fastinfer.load_model(model, dtype=torch.bfloat16).model.layers[0]
    w = model.model.layers[0].input_layernorm.weight.detach()
    assert torch.equal(layer.input_norm, 1.0 + w.to(torch.bfloat16).float())


def test_head_dims_the_gpu_kernels_lack_are_refused_before_loading():
    """On CUDA: head_dim 64 / 128, and 256 in bf16 / fp16 (the attention kernels); anything else is refused when
    the model is built, before any weight is read (on a machine without a GPU as well)."""
    from fastinfer.models.llama import LlamaForCausalLM
    cfg = ModelConfig.from_hf(make_hf_model("gemma3").config.to_dict())
    with pytest.raises(ValueError, match="head_dim 16 in torch.bfloat16: .*device='cpu'"):
        LlamaForCausalLM(cfg, torch.bfloat16, "cuda")
    cfg = ModelConfig.from_hf(make_hf_model("gemma3", head_dim=256).config.to_dict())
    with pytest.raises(ValueError, match="head_dim 256 in torch.float32: .*256 in bfloat16 / float16"):
        LlamaForCausalLM(cfg, torch.float32, "cuda")


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_at_load(quantization):
    """The projections quantized on load: top-1 tokens of a teacher-forced prompt agree with HF's float model on
    most positions (the quantization error alone moves the rest)."""
    model = make_hf_model("gemma3", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32)
    loaded = fastinfer.load_model(model, quantization=quantization)
    ours, theirs = fi_logits(loaded, PROMPT), hf_logits(model, PROMPT)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8
    assert (ours - theirs).abs().max() < 0.2 * theirs.abs().max()


@pytest.mark.parametrize("change, match", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
    ({"rope_parameters": {"full_attention": {"rope_type": "longrope", "rope_theta": 1e6, "factor": 2.0,
                                             "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}}, "LongRoPE"),
])
def test_bad_configs_name_the_field(change, match):
    cfg = make_hf_model("gemma3").config.to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


@pytest.mark.cuda
def test_head_dim_256_on_the_gpu():
    """Gemma 3's head_dim 256 in bf16 on the GPU (the 256 prefill / decode kernels): the prompt's top-1 tokens
    agree with HF's fp32 forward, and each greedy token the engine decodes is HF's top-1 on the same prefix, or
    within bf16's reach of it (0.05 in logprob)."""
    assert_bf16_on_the_gpu_tracks_hf(make_hf_model("gemma3", seed=8, hidden_size=512, intermediate_size=512,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=256))


def assert_bf16_on_the_gpu_tracks_hf(model):
    expected = hf_logits(model, PROMPT)
    loaded = fastinfer.load_model(model, dtype=torch.bfloat16, device="cuda")
    ours = fi_logits(loaded, PROMPT).float().cpu()
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (ours.log_softmax(-1) - expected.log_softmax(-1)).abs().max() < 0.3
    llm = fastinfer.LLM(loaded, max_num_seqs=4)
    out = llm.generate([PROMPT], fastinfer.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    logprobs = hf_logits(model, PROMPT + out).log_softmax(-1)[len(PROMPT) - 1:-1]
    chosen = logprobs.gather(1, torch.tensor(out)[:, None])[:, 0]
    assert (logprobs.max(-1).values - chosen).max() < 0.05


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_bf16_greedy_tokens_equal_hfs(variant):
    """bf16 on the CPU: Gemma's fp32 1 + w norms, the embedding scale rounded to bf16 and the soft-caps in bf16 as
    HF's, so the greedy tokens of a padded batch equal HF's own bf16 run."""
    model = make_hf_model(variant, seed=2).to(torch.bfloat16)
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)
