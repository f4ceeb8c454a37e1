"""Sparse mixture-of-experts models (Mixtral, Qwen3-MoE) against HF transformers, CPU fp32: logits, greedy
and beam search, both weight spellings (transformers 5's fused experts in memory, the per-expert tensors
checkpoints store), the engine's chunked prefill / prefix cache / preemption."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from fastinfer.generate import get_loaded
from fastinfer.llm import LLM
from fastinfer.sampling_params import SamplingParams
from models import left_padded_batch, make_hf_model
from test_loader_parity import edit_tensors, fi_logits, hf_logits

transformers = pytest.importorskip("transformers")
PAD = 0
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]
CASES = [("mixtral", {}), ("mixtral", {"num_experts_per_tok": 1}), ("qwen3-moe", {}),
         ("qwen3-moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
         ("qwen2-moe", {}), ("qwen2-moe", {"mlp_only_layers": [1], "norm_topk_prob": True, "qkv_bias": False}),
         ("granitemoe", {}), ("granitemoe", {"tie_word_embeddings": False, "num_experts_per_tok": 3,
                                             "residual_multiplier": 0.22, "embedding_multiplier": 12.0})]
IDS = ["mixtral", "mixtral-top1", "qwen3-moe", "qwen3-moe-renormalized-every-2nd", "qwen2-moe",
       "qwen2-moe-dense-last-renormalized-unbiased", "granitemoe", "granitemoe-untied-top3-published-multipliers"]


@pytest.mark.parametrize("variant, overrides", CASES, ids=IDS)
def test_logits_match_hf(variant, overrides):
    model = make_hf_model(variant, seed=1, **overrides)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, overrides", CASES[::2], ids=IDS[::2])
def test_config_reads_the_moe_layers_as_hf(variant, overrides):
    model = make_hf_model(variant, **overrides)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    hf_moe = [i for i, layer in enumerate(model.model.layers)
              if hasattr(getattr(layer, "block_sparse_moe", None) or layer.mlp, "experts")]
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert list(cfg.moe_layers) == hf_moe and cfg.num_experts == experts


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe", "granitemoe"])
def test_a_checkpoint_dir_with_per_expert_tensors(tmp_path, variant):
    """save_pretrained writes each expert's tensors apart (Mixtral's w1 / w3 / w2, Qwen3-MoE's gate / up /
    down_proj), as the published checkpoints do (Granite-MoE's: router.layer, input_linear, output_linear, fused):
    the same logits as the in-memory weights."""
    model = make_hf_model(variant, seed=2)
    model.save_pretrained(tmp_path)
    loaded = fastinfer.load_model(tmp_path)
    assert torch.equal(fi_logits(loaded, PROMPT), fi_logits(get_loaded(model), PROMPT))
    ids, mask = left_padded_batch([5, 17, 1, 9], model.config.vocab_size, PAD, seed=2)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(fastinfer.generate(str(tmp_path), ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)


def test_a_missing_expert_is_named(tmp_path):
    make_hf_model("mixtral").save_pretrained(tmp_path)
    edit_tensors(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match="missing"):
        fastinfer.load_model(tmp_path)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe", "granitemoe"])
def test_beam_search_matches_hf(variant):
    model = make_hf_model(variant, seed=3)
    ids, mask = left_padded_batch([9, 20], model.config.vocab_size, PAD, seed=3)
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=3, eos_token_id=[5])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, pad_token_id=PAD, **kw), expected)


def test_engine_chunked_prefill_prefix_cache_and_preemption_match_hf():
    assert_engine_matches_hf(make_hf_model("qwen3-moe", seed=4))


def assert_engine_matches_hf(model):
    """Five prompts (two sharing a 40-token prefix) through a 7-block pool in 16-token chunks: each prompt's
    greedy tokens equal HF's alone, with preemptions and prefix-cache hits on the way."""
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(3, model.config.vocab_size, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (1, 9)]
    prompts += [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 60, 33)]
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=PAD)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(get_loaded(model), num_blocks=7, block_size=16, max_num_seqs=4, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0 and llm.prefix_cache_hit_rate > 0


@pytest.mark.parametrize("change, match", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"), ({"mlp_only_layers": "0"}, "mlp_only_layers"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"), ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
])
def test_bad_moe_configs_name_the_field(change, match):
    cfg = {**make_hf_model("qwen3-moe").config.to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


def test_qwen3_moe_sliding_window_covers_every_layer():
    """HF's Qwen3-MoE has no layer_types / max_window_layers: under use_sliding_window every layer is windowed."""
    model = make_hf_model("qwen3-moe", seed=5, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    assert [cfg.attention_window(i) for i in range(2)] == [4, 4]
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)


def test_norm_topk_prob_null_is_false():
    cfg = {**make_hf_model("qwen3-moe").config.to_dict(), "norm_topk_prob": None}
    assert ModelConfig.from_hf(cfg).norm_topk_prob is False


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_bf16_moe_output_equals_hfs_default_experts_path(variant):
    """Off the decode GEMV, fastinfer runs transformers 5's default experts path (grouped_mm) with the same
    torch ops: one MoE block in bf16 gives HF's values bit for bit (its config says grouped_mm)."""
    from fastinfer.models.moe import MoE
    model = make_hf_model(variant, seed=8).to(torch.bfloat16)
    block = model.model.layers[1].mlp
    loaded = get_loaded(model).model
    ours = loaded.layers[1].moe
    assert isinstance(ours, MoE)
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    with torch.no_grad():
        expected = block(x[None])[0] if not isinstance(block(x[None]), tuple) else block(x[None])[0][0]
    got = ours(x)
    assert model.config._experts_implementation == "grouped_mm"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_the_per_expert_path_matches_hf(monkeypatch, variant):
    """Where torch._grouped_mm does not run (fp16 / fp32 on a GPU, GPUs before sm_90): a GEMM per expert."""
    from fastinfer.models import moe as moe_mod
    monkeypatch.setattr(moe_mod, "grouped_mm_ok", lambda hidden: False)
    model = make_hf_model(variant, seed=9)
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=1e-5)



def test_granite_moe_per_expert_names_get_the_residual_multiplier(tmp_path):
    """Granite-MoE checkpoints store the experts fused; the per-expert spelling fastinfer also accepts must fold
    the residual multiplier into each expert's down projection too."""
    import safetensors.torch
    model = make_hf_model("granitemoe", seed=5, residual_multiplier=0.22)
    model.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name in [n for n in tensors if n.endswith("block_sparse_moe.input_linear.weight")]:
        prefix = name.removesuffix("input_linear.weight")
        gate_up, down = tensors.pop(name), tensors.pop(prefix + "output_linear.weight")
        half = gate_up.shape[1] // 2
        for j in range(gate_up.shape[0]):
            tensors[f"{prefix}experts.{j}.gate_proj.weight"] = gate_up[j, :half].contiguous()
            tensors[f"{prefix}experts.{j}.up_proj.weight"] = gate_up[j, half:].contiguous()
            tensors[f"{prefix}experts.{j}.down_proj.weight"] = down[j].contiguous()
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), PROMPT), hf_logits(model, PROMPT),
                               rtol=0, atol=1e-5)
