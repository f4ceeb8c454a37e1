"""Review of model loading and configuration against HF transformers (CPU, fp32, tiny random models).

Each test compares what fastinfer loads with what transformers loads from the same checkpoint
(logits of a 2-layer model on a short prompt, or greedy tokens), or checks that bad input is
refused with a ValueError naming the field / file.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import fastinfer
from fastinfer.metadata import SeqChunk
from fastinfer.runner import ModelRunner
from models import LLAMA3_ROPE, make_hf_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

PROMPT = [5, 17, 33, 2, 99, 250, 7, 64, 128, 11, 3, 300, 41]
ATOL = 1e-5


def fi_logits(loaded, ids=PROMPT) -> torch.Tensor:
    model = loaded.model if hasattr(loaded, "model") else loaded
    blocks = -(-len(ids) // 16)
    return ModelRunner(model, blocks, 16).run([SeqChunk(ids, 0, list(range(blocks)), all_logits=True)])


def hf_logits(hf, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_from_dir(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def assert_logits_match(path_or_model, hf):
    torch.testing.assert_close(fi_logits(fastinfer.load_model(path_or_model)), hf_logits(hf), rtol=0, atol=ATOL)


def edit_config(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, edit, name="model.safetensors") -> None:
    tensors = safetensors_torch.load_file(path / name)
    edit(tensors)
    safetensors_torch.save_file(tensors, path / name, metadata={"format": "pt"})


# ---- bugs: each of these fails today ------------------------------------------------------------

def test_llama_attention_bias_matches_hf(tmp_path):
    """LlamaConfig.attention_bias=True gives q, k, v AND o_proj a bias in HF; fastinfer builds no
    o_proj bias and refuses the checkpoint ("unexpected weight ...o_proj.bias")."""
    hf = make_hf_model("llama", attention_bias=True)
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    hf.save_pretrained(tmp_path)
    assert_logits_match(tmp_path, hf)


@pytest.mark.parametrize("variant, flags", [("qwen2", {"attention_bias": False}), ("mistral", {"attention_bias": True}),
                                            ("qwen2", {"mlp_bias": True}), ("mistral", {"mlp_bias": True}),
                                            ("qwen3", {"mlp_bias": True})])
def test_bias_flags_the_architecture_ignores(tmp_path, variant, flags):
    """Qwen2 always has q/k/v biases and no MLP bias, Mistral never has a bias: HF's modeling code for
    them never reads attention_bias / mlp_bias (nor Qwen3's mlp_bias), fastinfer's config does (and then refuses
    the checkpoint)."""
    hf = make_hf_model(variant, **flags)
    hf.save_pretrained(tmp_path)
    assert_logits_match(tmp_path, hf)


def test_tied_config_with_a_distinct_lm_head_matches_hf(tmp_path):
    """tie_word_embeddings=true but the checkpoint ships an lm_head.weight different from the embedding:
    transformers 5 does not tie them (it warns and uses lm_head.weight); so does fastinfer, with a
    warning naming both (it used to drop lm_head.weight and compute the logits with the embedding)."""
    make_hf_model("llama-tied").save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(0)
    edit_tensors(tmp_path, lambda t: t.__setitem__(
        "lm_head.weight", 0.5 * torch.randn(t["model.embed_tokens.weight"].shape, generator=gen)))
    hf = hf_from_dir(tmp_path)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)  # HF used the stored lm_head
    with pytest.warns(UserWarning, match="tie_word_embeddings=True but the checkpoint's lm_head.weight"):
        assert_logits_match(tmp_path, hf)


def test_tied_checkpoint_storing_only_lm_head_loads_like_hf(tmp_path):
    """A tied checkpoint that stores the shared matrix under lm_head.weight (not embed_tokens): HF loads
    it (the tie fills embed_tokens); fastinfer refuses it as missing model.embed_tokens.weight."""
    hf = make_hf_model("llama-tied")
    hf.save_pretrained(tmp_path)
    edit_tensors(tmp_path, lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    torch.testing.assert_close(hf_logits(hf_from_dir(tmp_path)), hf_logits(hf), rtol=0, atol=0)
    assert_logits_match(tmp_path, hf)


def test_other_safetensors_file_beside_model_safetensors_is_not_read(tmp_path):
    """Without an index HF reads model.safetensors only; fastinfer globs *.safetensors and reads every
    file, so a Mistral-style consolidated.safetensors (other tensor names) beside it breaks the load."""
    hf = make_hf_model("mistral")
    hf.save_pretrained(tmp_path)
    safetensors_torch.save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)},
                                tmp_path / "consolidated.safetensors")
    assert_logits_match(tmp_path, hf_from_dir(tmp_path))


def test_stale_safetensors_copy_does_not_silently_override(tmp_path):
    """Worse: a second file holding the same tensor names (an old export left in the folder) silently
    overwrites the weights read from model.safetensors (the later file in sorted order wins, no
    duplicate check); HF reads model.safetensors only."""
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path)
    tensors = safetensors_torch.load_file(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: torch.zeros_like(v) for k, v in tensors.items() if "norm" in k},
                                tmp_path / "old-export.safetensors")
    hf_ref = hf_from_dir(tmp_path)
    torch.testing.assert_close(hf_logits(hf_ref), hf_logits(hf), rtol=0, atol=0)
    assert_logits_match(tmp_path, hf)


def test_llama3_rope_without_original_max_position_embeddings(tmp_path):
    """HF fills a missing llama3 original_max_position_embeddings with max_position_embeddings
    (modeling_rope_utils.standardize_rope_params); fastinfer dies with KeyError while building the cache."""
    make_hf_model("llama3-rope").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c["rope_parameters"].pop("original_max_position_embeddings"))
    hf = hf_from_dir(tmp_path)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == hf.config.max_position_embeddings
    assert_logits_match(tmp_path, hf)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers",
                                   "intermediate_size"])
def test_missing_config_field_is_a_value_error_naming_it(tmp_path, field):
    """Project rule: bad input is a ValueError naming the field; a config.json without a required
    field raises a bare KeyError from ModelConfig.from_hf."""
    make_hf_model("llama").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.pop(field))
    with pytest.raises(ValueError, match=field):
        fastinfer.load_model(tmp_path)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "linear", "rope_theta": 1e4}, "factor"),
    ({**{k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}, "rope_theta": 5e5}, "low_freq_factor"),
])
def test_incomplete_rope_parameters_are_a_value_error_naming_the_field(tmp_path, rope, field):
    """A scaled rope without its factor passes ModelConfig and dies with KeyError in models/rope.py."""
    make_hf_model("llama").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.__setitem__("rope_parameters", rope))
    with pytest.raises(ValueError, match=field):
        fastinfer.load_model(tmp_path)


def test_llama_ignores_a_stray_sliding_window():
    """HF's Llama has no sliding window (the key is ignored): fastinfer runs it with full attention past
    the stray window, as HF does."""
    hf = make_hf_model("llama", sliding_window=16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, pad_token_id=0, **kw)
    assert torch.equal(fastinfer.generate(hf, ids, **kw), expected)


# ---- coverage: these pass -------------------------------------------------------------------------

@pytest.mark.parametrize("variant, overrides", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    ("llama", {"rope_theta": 1234.5}),
    ("llama", {"rms_norm_eps": 0.3}),
    ("llama", {"head_dim": 32}),             # head_dim * heads != hidden_size
    ("llama", {"head_dim": 8}),
    ("mistral", {"head_dim": 32, "rope_theta": 777.0}),
    ("qwen2", {"head_dim": 32, "rms_norm_eps": 0.3}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),                           # q_norm / k_norm over each head, head_dim * heads != hidden_size
    ("qwen3", {"attention_bias": True}),     # q, k, v and o biased, as Llama
    ("qwen3", {"tie_word_embeddings": True, "head_dim": 16}),  # Qwen3-0.6B style
    ("phi3", {}),                            # qkv_proj / gate_up_proj stored fused
    ("phi3", {"partial_rotary_factor": 0.5}),  # 4.x spelling: top-level; rotates the first half of a head
    ("phi3-partial", {"rope_theta": 250000.0}),
    ("llama3-rope", {"tie_word_embeddings": True}),   # Llama 3.2 style
], ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_config_variants_from_a_directory_match_hf(tmp_path, variant, overrides):
    hf = make_hf_model(variant, **overrides)
    hf.save_pretrained(tmp_path)
    assert_logits_match(tmp_path, hf)


def test_transformers_4_config_spelling_of_linear_rope(tmp_path):
    """A 4.x config.json: top-level rope_theta, rope_scaling {"type": "linear"}, torch_dtype."""
    hf = make_hf_model("llama", rope_scaling={"rope_type": "linear", "factor": 3.0}, rope_theta=20000.0)
    hf.save_pretrained(tmp_path)

    def to_v4(c):
        params = c.pop("rope_parameters")
        c.update(rope_theta=params["rope_theta"], rope_scaling={"type": "linear", "factor": 3.0},
                 torch_dtype=c.pop("dtype"))
    edit_config(tmp_path, to_v4)
    assert_logits_match(tmp_path, hf)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_checkpoint_loads_into_fp32_like_hf(tmp_path, stored):
    make_hf_model("qwen2").to(stored).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.pop("dtype"))  # no dtype / torch_dtype in config.json: still loads
    loaded = fastinfer.load_model(tmp_path)
    assert loaded.model.dtype == torch.float32 and loaded.model.embed.dtype == torch.float32
    torch.testing.assert_close(fi_logits(loaded), hf_logits(hf_from_dir(tmp_path)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("rope", [{"type": "dynamic", "factor": 2.0}])  # (longrope: tests/test_longrope.py)
def test_unsupported_rope_types_are_refused_at_load(tmp_path, rope):
    make_hf_model("llama").save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.__setitem__("rope_parameters", {**rope, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match=rope.get("rope_type", rope.get("type"))):
        fastinfer.load_model(tmp_path)


@pytest.mark.parametrize("variant, rope, top_level", [
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, {}),
    ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
               "attention_factor": 1.3}, {}),
    ("qwen2", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "mscale": 0.7,
               "mscale_all_dim": 1.0, "truncate": False}, {}),
    ("llama", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 999}, {"original_max_position_embeddings": 128}),
    ("mistral", {"type": "yarn", "factor": 4.0}, {}),  # 4.x spelling, original = max_position_embeddings
], ids=["qwen3", "attention_factor", "mscale-untruncated", "top-level-original-null-factor", "v4-default-original"])
def test_yarn_rope_matches_hf(tmp_path, variant, rope, top_level):
    """YaRN (Qwen2.5 / Qwen3 long-context configs): the blended frequencies and the attention factor on
    cos / sin, HF's defaults and its precedence (a top-level original_max_position_embeddings wins; a null
    factor is max_position_embeddings / original), over positions past the original context."""
    make_hf_model(variant, rope_theta=10000.0).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(rope_parameters={**rope, "rope_theta": 10000.0}, **top_level))
    hf = hf_from_dir(tmp_path)
    assert hf.model.rotary_emb.rope_type == "yarn"
    ids = list(range(5, 300, 2))  # 148 positions: past every original context above
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path), ids), hf_logits(hf, ids), rtol=0, atol=ATOL)


def test_untied_checkpoint_without_lm_head_names_it(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    edit_tensors(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        fastinfer.load_model(tmp_path)


def _forbid_unpickling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a checkpoint was unpickled")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


def test_pickled_checkpoints_are_never_unpickled(tmp_path, monkeypatch):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.st")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save(hf.state_dict(), tmp_path / "consolidated.00.pth")
    _forbid_unpickling(monkeypatch)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors.*pytorch_model.bin"):
        fastinfer.load_model(tmp_path)
    (tmp_path / "weights.st").rename(tmp_path / "model.safetensors")  # safetensors beside a .bin: only it is read
    assert_logits_match(tmp_path, hf)


def test_sharded_index_reads_only_its_shards(tmp_path):
    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    safetensors_torch.save_file({"junk": torch.zeros(2)}, tmp_path / "zz-unlisted.safetensors")
    assert_logits_match(tmp_path, hf)
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        fastinfer.load_model(tmp_path)


def test_gguf_linear_rope_scaling_matches_hf(tmp_path, monkeypatch):
    """llama.cpp's rope.scaling.type=linear + factor becomes HF's linear rope (F32 tensors, no rounding)."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_llama

    from fastinfer.loader.gguf import read_gguf

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            self.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            self.add_rope_scaling_factor(4.0)
            return super().write_header_to_file(*args, **kwargs)
    monkeypatch.setattr(gguf, "GGUFWriter", Writer)
    state = write_tiny_llama(tmp_path / "t.gguf", qtype="F32")
    cfg = read_gguf(tmp_path / "t.gguf")[0]
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})).eval()
    hf.load_state_dict(state)
    ids = PROMPT[:11]  # the tiny GGUF vocabulary has 262 tokens
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(fi_logits(fastinfer.load_model(tmp_path / "t.gguf"), ids), expected,
                               rtol=1e-5, atol=1e-5 * expected.abs().max().item())
