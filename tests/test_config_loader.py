"""Config parsing (transformers 4.x / 5.x spellings) and loader errors."""
from __future__ import annotations

import json

import pytest
import torch

import fastinfer
from fastinfer.config import ModelConfig
from models import make_hf_model

BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_rope_spellings_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    v4 = ModelConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": scaling, "torch_dtype": "bfloat16"})
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}, "dtype": "bfloat16"})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.dtype == torch.bfloat16 and v4.head_dim == 16
    plain = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "longrope"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "fast"}}, "beta_fast"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}}, "truncate"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 for this architecture"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 1.5}, "partial_rotary_factor must be"),
    ({"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 2.0}}, "longrope"),
    ({"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.35}, "rotary dimension"),  # 16 x 0.35: 5
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"torch_dtype": "int8"}, "dtype"),
])
def test_unsupported_configs_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**BASE, **change})


def test_a_sliding_window_no_longer_limits_the_context():
    """Sliding-window models run past their window (tests/test_sliding_window_models.py checks the tokens)."""
    model = make_hf_model("mistral", sliding_window=32)
    assert fastinfer.generate(model, torch.tensor([[5] * 20]), max_new_tokens=20).shape == (1, 40)
    qwen = ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16,
                                "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.attention_bias


def _saved(tmp_path, variant="llama"):
    model = make_hf_model(variant)
    model.save_pretrained(tmp_path)
    return model


def test_sharded_checkpoint_loads(tmp_path):
    model = make_hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.tensor([[4, 9, 13, 2]])
    assert torch.equal(fastinfer.generate(str(tmp_path), ids, max_new_tokens=6, do_sample=False, eos_token_id=None),
                       model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0))


def _rewrite(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_weight(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="missing .*down_proj"):
        fastinfer.load_model(tmp_path)


def test_misshaped_weight(tmp_path):
    _saved(tmp_path)
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match="k_proj.*shape"):
        fastinfer.load_model(tmp_path)


def test_unexpected_weight(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected weight"):
        fastinfer.load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_safetensors(tmp_path, keep):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match="model.safetensors"):
        fastinfer.load_model(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickled checkpoints are never loaded"):
        fastinfer.load_model(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastinfer.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastinfer.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fastinfer.load_model(tmp_path)
