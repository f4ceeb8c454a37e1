"""The arch-specific fields of an HF ``config.json`` as transformers' config and modeling classes read them (rope
parameters and scaling, sliding windows, Granite's multipliers, mixture-of-experts layers), checked: helpers
of config.ModelConfig.from_hf."""
from __future__ import annotations

import math

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# The rotary table is [max_position_embeddings, head_dim] fp32, built when the model is: a corrupt
# max_position_embeddings must not ask for terabytes. 2**24 positions is far past any supported model.
MAX_POSITION_EMBEDDINGS = 1 << 24


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_positive_int(cfg: dict, key: str, default: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < 1:
        raise ValueError(f"config: {key} must be a positive integer, got {value!r}")
    return value


def _rope(cfg: dict, partial_rotary: bool = False) -> tuple[float, dict | None, float]:
    """rope_theta, rope scaling and partial_rotary_factor from either spelling: 4.x rope_theta + rope_scaling
    (+ partial_rotary_factor), 5.x rope_parameters. partial_rotary: the architecture rotates only the first
    features of a head (Phi-3); elsewhere a factor other than 1 is refused."""
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"config: {key} must be a JSON object or null, got {cfg[key]!r}")
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not _is_number(theta) or not 0 < theta < math.inf:
        raise ValueError(f"config: rope_theta must be a positive number, got {theta!r}")
    theta = float(theta)
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if partial_rotary and rope_type in ("yarn", "su"):  # HF's Phi3Config reads su / yarn as longrope
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; fastinfer supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = merged.pop("partial_rotary_factor", None)
    partial = cfg.get("partial_rotary_factor", 1.0) if partial is None else partial
    partial = 1.0 if partial is None else partial
    if not _is_number(partial) or not 0 < partial <= 1:
        raise ValueError(f"config: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    if partial != 1.0 and not partial_rotary:
        raise ValueError(f"unsupported partial_rotary_factor {partial} for this architecture")
    partial = float(partial)
    if rope_type == "default":
        return theta, None, partial
    merged.pop("rope_theta", None)
    merged.pop("type", None)
    merged["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn", "longrope"):  # as HF's standardize_rope_params: a top-level value wins
        if cfg.get("original_max_position_embeddings") is not None:
            merged["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        merged.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    if rope_type == "yarn":
        _yarn_params(merged, cfg)
    if rope_type == "longrope":
        _longrope_params(merged, cfg)
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings"),
                "longrope": ("factor", "original_max_position_embeddings")}.get(rope_type, ())
    for key in required:
        if not isinstance(merged.get(key), (int, float)):
            raise ValueError(f"config: {rope_type} rope scaling needs a number {key!r}, got {merged.get(key)!r}")
        if not _is_number(merged[key]) or not 0 < merged[key] < math.inf:
            raise ValueError(f"config: {rope_type} rope scaling {key!r} must be a positive number, got {merged[key]!r}")
    return theta, merged, partial


def _longrope_params(merged: dict, cfg: dict) -> None:
    """LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini long-context configs): short_factor and long_factor lists of
    positive numbers (their length, rotary_dim / 2, is checked by ModelConfig), an integer
    original_max_position_embeddings, optional attention_factor; a null factor becomes
    max_position_embeddings / original_max_position_embeddings, as HF computes it."""
    old_len = merged.get("original_max_position_embeddings")
    if not _is_int(old_len) or not 0 < old_len <= MAX_POSITION_EMBEDDINGS:
        raise ValueError(f"config: longrope rope scaling 'original_max_position_embeddings' must be a positive "
                         f"integer (at most {MAX_POSITION_EMBEDDINGS}), got {old_len!r}")
    for key in ("short_factor", "long_factor"):
        value = merged.get(key)
        if not (isinstance(value, list) and value and all(_is_number(x) and 0 < x < math.inf for x in value)):
            raise ValueError(f"config: longrope rope scaling {key!r} must be a list of positive numbers, got {value!r}")
    if merged.get("factor") is None:
        merged["factor"] = cfg.get("max_position_embeddings", 2048) / old_len
    value = merged.get("attention_factor")
    if value is not None and (not _is_number(value) or not 0 <= value < math.inf):
        raise ValueError(f"config: longrope rope scaling 'attention_factor' must be a non-negative number or null, "
                         f"got {value!r}")


def _yarn_params(merged: dict, cfg: dict) -> None:
    """YaRN's optional fields checked (numbers, or null for HF's defaults); a null factor becomes
    max_position_embeddings / original_max_position_embeddings, as HF computes it."""
    old_len = merged.get("original_max_position_embeddings")
    if not _is_number(old_len) or not 0 < old_len < math.inf:
        raise ValueError(f"config: yarn rope scaling 'original_max_position_embeddings' must be a positive number, "
                         f"got {old_len!r}")
    if merged.get("factor") is None:
        merged["factor"] = cfg.get("max_position_embeddings", 2048) / old_len
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = merged.get(key)
        if value is not None and (not _is_number(value) or not -math.inf < value < math.inf):
            raise ValueError(f"config: yarn rope scaling {key!r} must be a number or null, got {value!r}")
    if not isinstance(merged.get("truncate", True), bool):
        raise ValueError(f"config: yarn rope scaling 'truncate' must be true or false, got {merged['truncate']!r}")


def _sliding_window(cfg: dict, arch: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, the layers that have it: None for all) as HF's modeling code reads the config: Llama and
    Granite have no sliding window whatever the config holds; Mistral, Mixtral and Phi-3 apply
    sliding_window to every layer, Qwen3-MoE too under use_sliding_window; Qwen2 / Qwen3 only under
    use_sliding_window, to the layers layer_types names "sliding_attention" (by default those from
    max_window_layers on)."""
    window = cfg.get("sliding_window")
    if arch in ("LlamaForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "Olmo2ForCausalLM"):  # no window
        return None, None
    # windowed layers from layer_types / max_window_layers
    qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM")
    if (qwen or arch == "Qwen3MoeForCausalLM") and not cfg.get("use_sliding_window", False):
        return None, None  # Qwen3-MoE under use_sliding_window: every layer, as Mistral
    if window is None:
        types = cfg.get("layer_types")
        if qwen and isinstance(types, (list, tuple)) and "sliding_attention" in types:  # HF fails on it
            raise ValueError("config: layer_types names sliding_attention layers but sliding_window is null")
        return None, None
    try:
        window = int(window)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"config: sliding_window must be a positive integer or null, got {window!r}") from None
    if window < 1:  # 0 included: HF's mask would hide every key
        raise ValueError(f"config: sliding_window must be a positive integer or null, got {window!r}")
    if not qwen:
        return window, None
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)  # HF's Qwen2Config / Qwen3Config default
        if not _is_int(first) or first < 0:
            raise ValueError(f"config: max_window_layers must be a non-negative integer, got {first!r}")
        sliding = tuple(i for i in range(layers) if i >= first)
    else:
        if (not isinstance(types, (list, tuple)) or len(types) != layers
                or any(t not in ("sliding_attention", "full_attention") for t in types)):
            raise ValueError(f"config: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                             f"{layers} layers, got {types!r}")
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, sliding) if sliding else (None, None)


def _granite_scalars(cfg: dict) -> dict:
    """GraniteConfig's four multipliers (HF's defaults: 1.0), each a finite number; the attention and
    logits ones non-zero."""
    out = {}
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        value = cfg.get(key, 1.0)
        nonzero = key in ("attention_multiplier", "logits_scaling")
        if not _is_number(value) or not -math.inf < value < math.inf or (nonzero and value == 0):
            raise ValueError(f"config: {key} must be a finite number{' other than 0' if nonzero else ''}, got {value!r}")
        out[key] = float(value)
    return out


def _moe(cfg: dict, arch: str) -> dict:
    """The MoE fields as HF's Mixtral / Qwen2-MoE / Qwen3-MoE / Granite-MoE read their configs: Mixtral's (and
    Granite-MoE's) every layer has
    num_local_experts experts of intermediate_size, renormalized top-k weights; Qwen2-MoE's and Qwen3-MoE's
    layers not in mlp_only_layers whose (index + 1) is a multiple of decoder_sparse_step have num_experts
    experts of moe_intermediate_size (the rest a dense MLP of intermediate_size), renormalized under
    norm_topk_prob, and Qwen2-MoE's also a shared expert of shared_expert_intermediate_size."""
    if arch not in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "GraniteMoeForCausalLM"):
        return {}
    layers = cfg["num_hidden_layers"]
    # Granite-MoE's router: softmax over the top-k logits, which is Mixtral's renormalized top-k
    mixtral = arch in ("MixtralForCausalLM", "GraniteMoeForCausalLM")
    # transformers 5 writes either model's count as num_local_experts (num_experts is an alias of it)
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    experts = _optional_positive_int(cfg, key, 8 if mixtral else 128)
    top_k = _optional_positive_int(cfg, "num_experts_per_tok", 2 if mixtral else 8)
    if top_k > experts:
        raise ValueError(f"config: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})")
    if mixtral:
        return dict(moe_layers=tuple(range(layers)), num_experts=experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    step = _optional_positive_int(cfg, "decoder_sparse_step", 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, (list, tuple)) or not all(_is_int(i) for i in dense):
        raise ValueError(f"config: mlp_only_layers must be a list of layer indices, got {dense!r}")
    norm = cfg.get("norm_topk_prob") or False  # HF: null is False
    if not isinstance(norm, bool):
        raise ValueError(f"config: norm_topk_prob must be true or false, got {norm!r}")
    qwen2 = arch == "Qwen2MoeForCausalLM"
    return dict(moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
                num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=_optional_positive_int(cfg, "moe_intermediate_size", 1408 if qwen2 else 768),
                norm_topk_prob=norm,
                shared_expert_intermediate_size=_optional_positive_int(cfg, "shared_expert_intermediate_size", 5632)
                if qwen2 else 0)



def _gemma(cfg: dict, arch: str) -> dict:
    """Gemma 2's and Gemma 3's fields as HF's Gemma2Config / Gemma3TextConfig and their attention read them (cfg
    has the class defaults filled in). Gemma 2: every other layer sliding (layer_types, else layers 0, 2, ...),
    one rope setting, the attention scores soft-capped (attn_logit_softcapping, null: none). Gemma 3:
    layer_types (or every sliding_window_pattern-th layer global), the sliding layers' window, two rope settings
    (rope_parameters keyed by layer type, or the 4.x rope_theta + rope_scaling for the global layers and
    rope_local_base_freq for the sliding ones), query_pre_attn_scalar ** -0.5 as the attention scale, the
    embedding scale sqrt(hidden_size), final_logit_softcapping. Gemma 3 with attention soft-capping and
    bidirectional attention are refused."""
    gemma2 = arch == "Gemma2ForCausalLM"
    for key in ("use_bidirectional_attention",) + (() if gemma2 else ("attn_logit_softcapping",)):
        if cfg.get(key):
            raise ValueError(f"config: {key}={cfg[key]!r} is not supported")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        pattern = 2 if gemma2 else _optional_positive_int(cfg, "sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if (not isinstance(types, (list, tuple)) or len(types) != layers
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ValueError(f"config: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                         f"{layers} layers, got {types!r}")
    window = cfg.get("sliding_window")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"config: sliding_window must be a positive integer or null, got {window!r}")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    caps = {}
    for key in ("final_logit_softcapping",) + (("attn_logit_softcapping",) if gemma2 else ()):
        cap = cfg.get(key)
        if cap is not None and (not _is_number(cap) or not 0 < cap < math.inf):
            raise ValueError(f"config: {key} must be a positive number or null, got {cap!r}")
        caps[key] = None if cap is None else float(cap)
    scalar = cfg.get("query_pre_attn_scalar")
    if not _is_number(scalar) or not 0 < scalar < math.inf:
        raise ValueError(f"config: query_pre_attn_scalar must be a positive number, got {scalar!r}")
    common = dict(sliding_window=window if sliding and window else None,
                  sliding_window_layers=sliding if sliding and window else None,
                  attention_multiplier=scalar ** -0.5, embedding_multiplier=cfg["hidden_size"] ** 0.5, **caps)
    if gemma2:  # one rope setting for every layer
        theta, scaling, _ = _rope(cfg)
        return dict(rope_theta=theta, rope_scaling=scaling, **common)
    # HF's Gemma3TextConfig.convert_rope_params_to_dict, in its order: rope_parameters keyed by layer type (or the
    # defaults), a 4.x rope_scaling merged into the global layers' entry, then rope_theta / rope_local_base_freq
    # where an entry has no theta (a legacy "type" key beside the default "rope_type" changes nothing, as in HF)
    params = cfg.get("rope_parameters")
    if params is not None and not (isinstance(params, dict) and set(params) <= {"full_attention", "sliding_attention"}):
        raise ValueError(f"config: Gemma 3's rope_parameters must be keyed by layer type "
                         f"(full_attention / sliding_attention), got {params!r}")
    params = params or {}
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"config: rope_scaling must be a JSON object or null, got {scaling!r}")
    full.update(scaling or {})
    full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
    for entry in (full, local):
        if entry.get("rope_type", entry.get("type")) in ("longrope", "su"):
            raise ValueError("config: LongRoPE in Gemma 3's rope_parameters is not supported")
    length = {"max_position_embeddings": cfg["max_position_embeddings"]}
    theta, scaling, _ = _rope({**length, "rope_parameters": full})
    local_theta, local_scaling, _ = _rope({**length, "rope_parameters": local})
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta, local_rope_scaling=local_scaling,
                **common)


# multimodal checkpoints whose text model fastinfer runs (the vision tower skipped): class -> model_type, and
# model_type -> the model_type of its text_config when that does not say
MULTIMODAL_WRAPPERS = {"Gemma3ForConditionalGeneration": "gemma3", "Mistral3ForConditionalGeneration": "mistral3"}
_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text", "mistral3": "mistral"}


def multimodal_wrapper(cfg: dict, archs) -> str | None:
    """The multimodal wrapper's model_type when cfg is one of MULTIMODAL_WRAPPERS' configs, else None."""
    if archs:
        return MULTIMODAL_WRAPPERS.get(archs[0])
    return cfg.get("model_type") if cfg.get("model_type") in _TEXT_MODEL_TYPES else None


def multimodal_text_config(cfg: dict, wrapper: str) -> dict:
    """The text model's config of a multimodal checkpoint (Gemma 3 4B+, Mistral Small 3.1+): its text_config,
    with what the wrapper's config holds for the whole model (tie_word_embeddings, special token ids, dtype,
    quantization) where the text config does not say; its class from its model_type."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config: a {wrapper} (multimodal) config needs a text_config object, got {text!r}")
    text = dict(text)
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
                "quantization_config"):
        if key in cfg and text.get(key) is None:
            text[key] = cfg[key]
    text["model_type"] = text.get("model_type") or _TEXT_MODEL_TYPES[wrapper]
    text.pop("architectures", None)  # the class follows from model_type
    return text
