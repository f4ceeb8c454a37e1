"""PEFT LoRA models (peft.PeftModel) through fastinfer.generate / load_model / LLM: the adapters' deltas merged
into the weights give PEFT's own (unmerged) logits and greedy tokens, and follow set_adapter, disable_adapter and
merge_adapter; what the merge does not cover is refused by name. CPU fp32."""
from __future__ import annotations

import pytest
import torch

import fastinfer
from fastinfer.generate import get_loaded
from models import left_padded_batch, make_hf_model
from test_loader_parity import fi_logits, hf_logits

peft = pytest.importorskip("peft")
PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41, 8, 19, 77, 23]


def lora_model(variant="llama", seed=1, adapters=("default",), **config):
    """A PeftModelForCausalLM on a small random HF model; B is random (PEFT starts it at zero, a no-op)."""
    base = make_hf_model(variant, seed=seed)
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM") | config
    model = peft.get_peft_model(base, peft.LoraConfig(**settings), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft.LoraConfig(**settings))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def assert_matches_peft(model, atol=2e-5):
    torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model, PROMPT), rtol=0, atol=atol)


@pytest.mark.parametrize("variant, config", [
    ("llama", {}),
    ("qwen2", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),         # biased q / v
    ("phi3", {"rank_pattern": {"qkv_proj": 8}, "alpha_pattern": {"down_proj": 32}}),  # fused qkv / gate_up
    ("llama", {"modules_to_save": ["lm_head"]}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),                        # an embedding LoRA
], ids=["llama-all-linear", "qwen2-qv-rslora", "phi3-patterns", "modules-to-save", "embedding"])
def test_logits_and_greedy_tokens_match_peft(variant, config):
    model = lora_model(variant, **config)
    assert_matches_peft(model)
    ids, mask = left_padded_batch([5, 17, 9], model.config.vocab_size, 0, seed=2)
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(fastinfer.generate(model, ids, attention_mask=mask, **kw), expected)


def test_adapter_switching_disabling_and_merging(tmp_path):
    """One cached fastinfer model per adapter state: set_adapter, disable_adapter() and merge_adapter() (which
    puts the deltas into the base weights: they are not added twice) each give PEFT's logits."""
    model = lora_model(adapters=("first", "second"))
    assert_matches_peft(model)
    model.set_adapter("second")
    assert_matches_peft(model)
    with model.disable_adapter():
        assert_matches_peft(model)
        torch.testing.assert_close(fi_logits(get_loaded(model), PROMPT), hf_logits(model.get_base_model(), PROMPT))
    model.merge_adapter()
    assert_matches_peft(model)
    with model.disable_adapter():  # PEFT's forward takes the merged deltas out again (fastinfer is asked first)
        assert_matches_peft(model)
    model.merge_adapter()
    model.unmerge_adapter()
    assert_matches_peft(model)


def test_adapter_scale_changes_are_followed():
    """set_scale and rescale_adapter_scale change no parameter, only the layers' scaling: the cached copy follows."""
    from peft.helpers import rescale_adapter_scale
    model = lora_model()
    assert_matches_peft(model)
    with rescale_adapter_scale(model, 0.5):
        assert_matches_peft(model)
    for _, module in model.named_modules():
        if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
            module.set_scale("default", 0.25)
    assert_matches_peft(model)


def test_an_adapter_saved_and_loaded_from_its_directory(tmp_path):
    """The usual flow: PeftModel.from_pretrained(base, adapter_dir), then the LLM batch API on it."""
    trained = lora_model(seed=3)
    trained.save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(make_hf_model("llama", seed=3), tmp_path / "adapter").eval()
    assert_matches_peft(model)
    llm = fastinfer.LLM(model)
    out = llm.generate([PROMPT], fastinfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(PROMPT):]
    assert out[0].outputs[0].token_ids == expected.tolist()


@pytest.mark.parametrize("make, match", [
    (lambda: lora_model(use_dora=True), "LoRA variant"),
    (lambda: lora_model(lora_bias=True), "lora_bias"),
    (lambda: peft.get_peft_model(make_hf_model("llama"), peft.IA3Config(task_type="CAUSAL_LM")), "is IA3"),
    (lambda: lora_model(target_modules=["q_proj"], trainable_token_indices=[3, 5]), "trainable tokens"),
    (lambda: peft.get_peft_model(make_hf_model("llama"), peft.LoraConfig(target_modules=["q_proj"]), mixed=True),
     "PeftMixedModel"),
])
def test_what_the_merge_does_not_cover_is_refused(make, match):
    with pytest.raises(ValueError, match=match):
        fastinfer.load_model(make())
