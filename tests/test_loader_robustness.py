"""Malformed checkpoints: every one is a ValueError / FileNotFoundError naming the file and the field,
raised before the model is allocated or any weight is read; never a raw TypeError / KeyError /
AttributeError / RecursionError / ZeroDivisionError, an allocation of terabytes or a hang.

(What test_config_loader, test_loader_parity, test_gguf and test_quant_loaders already check
is not repeated: truncated safetensors, missing shards, pickled-only folders, missing config
fields, unsupported rope types, bad GGUF magic, truncated GGUF files, ...)
"""
from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch

import fastinfer
import fastinfer.loader as loader

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from models import make_hf_model  # noqa: E402
from test_gguf import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama checkpoint, one file and sharded."""
    root = tmp_path_factory.mktemp("ckpt")
    model = make_hf_model("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    return root


def copy(saved, tmp_path, which="single"):
    dest = tmp_path / which
    shutil.copytree(saved / which, dest)
    return dest


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail the test if a model is allocated: the error must come before that heavy work."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was allocated before the bad input was noticed")
    monkeypatch.setattr(loader, "LlamaForCausalLM", boom)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


_DROP = object()


def edit_index(path, edit):
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))


# ---------------------------------------------------------------- safetensors index
@pytest.mark.parametrize("edit, match", [
    (lambda i: [i], "no 'weight_map'"),
    (lambda i: {**i, "weight_map": ["model-00001-of-00006.safetensors"]}, "weight_map"),
    (lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": 5}}, "weight_map"),
    (lambda i: {**i, "weight_map": {}}, "weight_map' is empty"),
], ids=["not-an-object", "weight-map-list", "shard-not-a-string", "empty"])
def test_malformed_index_names_it(saved, tmp_path, no_model_build, edit, match):
    """Was: TypeError / AttributeError from indexing a list; an empty map loaded nothing."""
    path = copy(saved, tmp_path, "sharded")
    edit_index(path, edit)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json.*{match}"):
        fastinfer.load_model(path)


def test_index_not_utf8_names_it(saved, tmp_path, no_model_build):
    path = copy(saved, tmp_path, "sharded")
    (path / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid JSON"):
        fastinfer.load_model(path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_shard_outside_the_directory_is_refused(saved, tmp_path, no_model_build, shard):
    """Was: the file was opened (and /etc/passwd parsed as a safetensors header)."""
    path = copy(saved, tmp_path, "sharded")
    safetensors_torch.save_file({"junk": torch.zeros(2)}, tmp_path / "outside.safetensors")
    edit_index(path, lambda i: {**i, "weight_map": {**i["weight_map"], "junk": shard}})
    with pytest.raises(ValueError, match=f"names shard '{shard}' outside the checkpoint directory"):
        fastinfer.load_model(path)


def _corrupt_last_shard(path):
    last = sorted(path.glob("model-*.safetensors"))[-1]
    last.write_bytes(struct.pack("<Q", 9) + b"{bad json")
    return last.name


def _duplicate_across_shards(path):
    first, second = sorted(path.glob("model-*.safetensors"))[:2]
    a, b = safetensors_torch.load_file(first), safetensors_torch.load_file(second)
    name = next(iter(a))
    safetensors_torch.save_file({**b, name: a[name]}, second, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("damage, match", [(_corrupt_last_shard, "cannot read safetensors file .*{}"),
                                           (_duplicate_across_shards, "weight '{}' is in both")],
                         ids=["corrupt-last-shard", "tensor-in-two-shards"])
def test_every_shard_header_is_checked_before_the_model_is_built(saved, tmp_path, no_model_build, damage, match):
    """Was: found only after the model was allocated and the earlier shards were read."""
    path = copy(saved, tmp_path, "sharded")
    detail = damage(path)
    with pytest.raises(ValueError, match=match.format(detail)):
        fastinfer.load_model(path)


def test_pth_only_folder_is_refused_and_named_without_unpickling(saved, tmp_path, monkeypatch):
    """Was: refused, but the error did not say a .pth checkpoint was found."""
    path = copy(saved, tmp_path)
    (path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, path / "consolidated.00.pth")
    def boom(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, boom)
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth.*pickled checkpoints are never loaded"):
        fastinfer.load_model(path)


# ---------------------------------------------------------------- config.json
LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 1e4}
CT = {"quant_method": "compressed-tensors"}


@pytest.mark.parametrize("changes, match", [
    # were silently replaced by a default (0 is not "unset")
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
    # were TypeError (bool passed as int; the model then failed in torch.empty)
    ({"vocab_size": True}, "vocab_size must be a positive integer"),
    # was a weight-shape error that never named the config fields
    ({"head_dim": _DROP, "num_attention_heads": 5, "num_key_value_heads": 5},
     r"hidden_size \(64\) must be a multiple of num_attention_heads \(5\)"),
    # were ValueError / TypeError from dict() naming nothing
    ({"rope_parameters": _DROP, "rope_scaling": "linear"}, "rope_scaling must be a JSON object"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be a JSON object"),
    # were "could not convert string to float" / TypeError, or loaded with NaN / inf rotary tables
    ({"rope_parameters": _DROP, "rope_theta": "abc"}, "rope_theta must be a positive number"),
    ({"rope_parameters": _DROP, "rope_theta": None}, "rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, "rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta must be a positive number"),
    ({"rope_parameters": {**LINEAR, "factor": 0}}, "'factor' must be a positive number"),
    ({"rope_parameters": {**LINEAR, "factor": -2.0}}, "'factor' must be a positive number"),
    ({"rope_parameters": {**LINEAR, "factor": True}}, "'factor' must be a positive number"),
    ({"rope_parameters": {**LLAMA3, "low_freq_factor": 0}}, "'low_freq_factor' must be a positive number"),
    ({"rope_parameters": {**LLAMA3, "original_max_position_embeddings": "x"}}, "original_max_position_embeddings"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a non-negative number"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a non-negative number"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a non-negative number"),
    # eos "2" became the list ['2']; 2.5 was a TypeError; bos / pad strings loaded
    ({"eos_token_id": "2"}, "eos_token_id must be an integer or a list of integers"),
    ({"eos_token_id": 2.5}, "eos_token_id must be an integer or a list of integers"),
    ({"eos_token_id": ["a"]}, "eos_token_id must be an integer or a list of integers"),
    ({"bos_token_id": "x"}, "bos_token_id must be an integer or null"),
    ({"pad_token_id": "x"}, "pad_token_id must be an integer or null"),
    # "LlamaForCausalLM"[0] == "L" was reported as the architecture; 5 was a TypeError
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of class names"),
    ({"architectures": 5}, "architectures must be a list of class names"),
    # were AttributeError / TypeError inside the quantization parsers
    ({"quantization_config": [1]}, "quantization_config must be a JSON object"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 5}}, "weight_block_size"),
    ({"quantization_config": {**CT, "config_groups": [1]}}, "config_groups must be a JSON object"),
    ({"quantization_config": {**CT, "config_groups": {"g": {"weights": [1]}}}}, "weights must be a JSON object"),
    ({"quantization_config": {**CT, "kv_cache_scheme": [1]}}, "kv_cache_scheme must be a JSON object"),
    # was "invalid literal for int()"
    ({"architectures": ["MistralForCausalLM"], "sliding_window": "abc"}, "sliding_window must be a positive integer"),
    # was a 4 TiB allocation for the rotary table (RuntimeError from torch)
    ({"max_position_embeddings": 2 ** 40}, "max_position_embeddings = 1099511627776 is implausibly large"),
])
def test_malformed_config_names_the_field(saved, tmp_path, no_model_build, changes, match):
    path = copy(saved, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        fastinfer.load_model(path)
    assert str(path / "config.json") in str(info.value)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 10 ** 9), ("vocab_size", 2 ** 34),
                                          ("intermediate_size", 2 ** 36), ("hidden_size", 2 ** 20)])
def test_config_far_larger_than_the_checkpoint_is_refused_before_allocating(saved, tmp_path, no_model_build,
                                                                            field, value):
    """Was: torch tried to allocate terabytes (RuntimeError), or looped for 10**9 layers."""
    path = copy(saved, tmp_path)
    edit_config(path, **{field: value})
    with pytest.raises(ValueError, match=f"config.json describes a model .*{field}={value}.* does not match"):
        fastinfer.load_model(path)


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_text("[]"), "config must be a JSON object"),   # was AttributeError
    (lambda p: p.write_bytes(b"\xff\xfe\x00{"), "not valid JSON: not UTF-8"),   # was UnicodeDecodeError
    (lambda p: p.mkdir(), "cannot read config.json"),   # was IsADirectoryError
], ids=["list", "not-utf8", "directory"])
def test_unreadable_config_json_names_it(saved, tmp_path, write, match):
    path = copy(saved, tmp_path)
    (path / "config.json").unlink()
    write(path / "config.json")
    with pytest.raises(ValueError, match=match) as info:
        fastinfer.load_model(path)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("text, match", [("{bad", "generation_config.json is not valid JSON"),
                                         ("[1]", "generation_config.json must hold a JSON object")])
def test_malformed_generation_config_names_it(saved, tmp_path, no_model_build, text, match):
    """Was: a JSONDecodeError naming no file; a list loaded and broke generate() later."""
    path = copy(saved, tmp_path)
    (path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        fastinfer.load_model(path)


@pytest.mark.parametrize("name, text", [("tokenizer.json", "{bad"), ("tokenizer.json", '{"model": 5}'),
                                        ("tokenizer_config.json", "{bad")])
def test_corrupt_tokenizer_files_name_the_checkpoint(saved, tmp_path, no_model_build, name, text):
    """Was: a bare JSONDecodeError / KeyError from transformers, after the model was built."""
    path = copy(saved, tmp_path)
    (path / name).write_text(text)
    with pytest.raises(ValueError, match=f"{path}: cannot load the tokenizer"):
        fastinfer.load_model(path)


def test_llm_reports_the_same_errors(saved, tmp_path, no_model_build):
    path = copy(saved, tmp_path)
    edit_config(path, num_hidden_layers=10 ** 9)
    with pytest.raises(ValueError, match="config.json describes a model"):
        fastinfer.LLM(str(path), kv_cache_memory_bytes=1 << 20)


# ---------------------------------------------------------------- GGUF
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_bytes(kvs: bytes, n_kv: int, tail: bytes = b"\0" * 64) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kvs + tail


def test_deeply_nested_gguf_arrays_are_a_value_error(tmp_path):
    """Was: RecursionError (arrays of arrays of ... 200k deep)."""
    depth = 200_000
    kv = _s("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf_bytes(kv, 1))
    with pytest.raises(ValueError, match=f"{path}: not a valid GGUF file .*nested"):
        fastinfer.load_model(path)


@pytest.mark.parametrize("value", [struct.pack("<I", 4) + struct.pack("<I", 0),   # was ZeroDivisionError
                                   struct.pack("<I", 8) + _s("x")],                # was "invalid literal for int()"
                         ids=["zero", "string"])
def test_bad_gguf_alignment_names_the_key(tmp_path, value):
    path = tmp_path / "aligned.gguf"
    path.write_bytes(_gguf_bytes(_s("general.alignment") + value, 1))
    with pytest.raises(ValueError, match=f"{path}: general.alignment must be a positive integer"):
        fastinfer.load_model(path)


def tiny_gguf(path, monkeypatch, overrides: dict, **kwargs):
    """test_gguf's tiny llama GGUF (F32) with metadata keys set / replaced: {key: (value, GGUFValueType)}."""
    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kw):
            for key, (value, vtype) in overrides.items():
                self.add_key_value(key, value, vtype)
            return super().write_header_to_file(*args, **kw)
    with monkeypatch.context() as m:
        m.setattr(gguf, "GGUFWriter", Writer)
        write_tiny_llama(path, qtype="F32", **kwargs)
    return path


@pytest.fixture
def no_dequantize(monkeypatch):
    """Fail the test if a tensor is dequantized: the error must come before that heavy work."""
    import fastinfer.loader.gguf as gguf_loader

    def boom(*args, **kwargs):
        raise AssertionError("tensors were dequantized before the bad metadata was noticed")
    monkeypatch.setattr(gguf_loader, "dequantize", boom)


U32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING


@pytest.mark.parametrize("overrides, match", [
    # was a 60 s+ loop building the expected tensor table of 2**31 layers
    ({"llama.block_count": (2 ** 31, U32)}, "llama.block_count = 2147483648, but the file has only 21 tensors"),
    # was a 64 GiB allocation for the rotary table, after dequantizing every tensor
    ({"llama.context_length": (2 ** 31, U32)}, "max_position_embeddings = 2147483648 is implausibly large"),
    # was a tensor-shape error after the table; now the head counts are named
    ({"llama.attention.head_count_kv": (3, U32)}, r"must be a multiple of num_key_value_heads \(3\)"),
    # was "could not convert string to float"
    ({"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": ("x", STR)},
     "llama.rope.scaling.factor must be a positive number"),
    # was loaded: apply_chat_template would fail on an int later
    ({"tokenizer.chat_template": (5, U32)}, "tokenizer.chat_template must be a string"),
    # was "eos_token_id = x is outside the vocabulary" (a string is not an id)
    ({"tokenizer.ggml.eos_token_id": ("x", STR)}, "eos_token_id must be an integer"),
], ids=["block-count", "context-length", "kv-heads", "rope-factor", "chat-template", "eos"])
def test_malformed_gguf_metadata_names_the_key(tmp_path, monkeypatch, no_model_build, no_dequantize, overrides, match):
    path = tiny_gguf(tmp_path / "bad.gguf", monkeypatch, overrides)
    with pytest.raises(ValueError, match=f"{path}: .*{match}"):
        fastinfer.load_model(path)


def test_huge_key_length_with_rope_freqs_is_refused_before_sizing_anything(tmp_path, monkeypatch, no_model_build):
    """Was: torch.arange(0, 2**31, 2) in float64 and more (minutes, gigabytes) before the shape check."""
    path = tiny_gguf(tmp_path / "freqs.gguf", monkeypatch, {"llama.attention.key_length": (2 ** 31, U32)},
                     rope_freqs=[1.0] * 8)
    with pytest.raises(ValueError, match=r"rope_freqs.weight has shape \[8\], expected \[1073741824\]"):
        fastinfer.load_model(path)


def test_gguf_rope_factor_zero_means_unset(tmp_path, monkeypatch):
    """llama.cpp reads rope.scaling.factor = 0 as "not set"; was a linear rope dividing by zero (inf)."""
    from fastinfer.loader.gguf import read_gguf
    path = tiny_gguf(tmp_path / "zero.gguf", monkeypatch, {"llama.rope.scaling.type": ("linear", STR),
                                                           "llama.rope.scaling.factor": (0.0, gguf.GGUFValueType.FLOAT32)})
    assert read_gguf(path)[0]["rope_scaling"] is None


def test_gguf_int4_path_checks_metadata_before_converting(tmp_path, monkeypatch, no_model_build):
    import fastinfer.quant.gguf as quant_gguf
    monkeypatch.setattr(quant_gguf, "q4_weight", lambda *a: (_ for _ in ()).throw(AssertionError("converted")))
    path = tmp_path / "q4.gguf"
    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kw):
            self.add_key_value("llama.attention.head_count_kv", 3, U32)
            return super().write_header_to_file(*args, **kw)
    with monkeypatch.context() as m:
        m.setattr(gguf, "GGUFWriter", Writer)
        write_tiny_llama(path, qtype="Q4_0")
    with pytest.raises(ValueError, match=f"{path}: .*num_key_value_heads"):
        fastinfer.load_model(path, quantization="gguf")
