"""Model configuration read from an HF ``config.json`` (transformers 4.x and 5.x spellings)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config_fields import (MAX_POSITION_EMBEDDINGS, _gemma, _granite_scalars, _is_int, _is_number, _moe,
                            _optional_positive_int, _rope, _sliding_window, multimodal_text_config,
                            multimodal_wrapper)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "GraniteForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                           "Qwen3MoeForCausalLM", "GraniteMoeForCausalLM", "Olmo2ForCausalLM", "Gemma2ForCausalLM",
                           "Gemma3ForCausalLM")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}


def parse_dtype(value, field_name: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{field_name} must be one of float32, float16, bfloat16, got {value!r}")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None = None
    # the layers whose attention has the sliding window (Qwen2 / Qwen3's layer_types or max_window_layers);
    # None: every layer, when sliding_window is set
    sliding_window_layers: tuple[int, ...] | None = None
    qk_norm: bool = False  # Qwen3: an RMSNorm over each q / k head (weights [head_dim]) before rotary
    rotary_dim: int | None = None  # features of each head rotary rotates (Phi-3's partial_rotary_factor); None: all
    # sparse MoE MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE; models/moe.py): the layers that have one, their experts,
    # the experts each token runs, the experts' intermediate size, whether the top-k weights are renormalized
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a gated dense expert every token also runs
    # Granite's scalars (HF's GraniteForCausalLM; 1 / None elsewhere): the embedding rows are multiplied by
    # embedding_multiplier, each layer's attention and MLP outputs by residual_multiplier before their residual
    # add, the attention scores by attention_multiplier (instead of head_dim ** -0.5), the logits divided by
    # logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # Gemma 2 / 3 (models/gemma.py): Gemma 3's sliding-window layers' own rope (theta, scaling); logits soft-capped
    # as cap * tanh(logits / cap); Gemma 2's attention scores the same way. Their attention scale and embedding
    # scale use the two Granite fields above.
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    # a multimodal checkpoint whose text model this is (config_fields.MULTIMODAL_WRAPPERS): its weights are renamed
    # and the vision tower's skipped as they load (llama_weights.text_weights)
    text_of_multimodal: bool = False
    # Gemma's norm multipliers 1 + w as loaded (a GGUF's, llama.cpp's), instead of with w rounded to the model dtype
    # first (HF keeps w in it); set by the GGUF reader
    exact_norm_weights: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: torch.dtype = torch.float32
    quantization: str | None = None                        # "fp8" for an FP8 checkpoint (quant/fp8.py)
    fp8_weight_block_size: tuple[int, int] | None = None   # its [bn, bk] when its scales are per block

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.max_position_embeddings > MAX_POSITION_EMBEDDINGS:
            raise ValueError(f"config: max_position_embeddings = {self.max_position_embeddings} is implausibly large "
                             f"(at most {MAX_POSITION_EMBEDDINGS} positions are supported; its rotary table alone "
                             f"would take {self.max_position_embeddings * self.head_dim * 4 / 2**30:.0f} GiB)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rotary_dim is not None and not (_is_int(self.rotary_dim) and 0 < self.rotary_dim <= self.head_dim
                                                and self.rotary_dim % 2 == 0):
            raise ValueError(f"config: the rotary dimension (head_dim x partial_rotary_factor) must be an even integer "
                             f"in (0, head_dim = {self.head_dim}], got {self.rotary_dim!r}")

        if (self.rope_scaling or {}).get("rope_type") == "longrope":
            half = (self.rotary_dim or self.head_dim) // 2
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling[key]) != half:
                    raise ValueError(f"config: longrope rope scaling {key!r} must hold rotary_dim / 2 = {half} numbers, "
                                     f"got {len(self.rope_scaling[key])}")

    @property
    def rope_long_from(self) -> int:
        """LongRoPE: HF rotates with the long factors in a forward whose sequence is longer than this
        (original_max_position_embeddings), with the short ones otherwise; 0 for every other rope type."""
        if (self.rope_scaling or {}).get("rope_type") != "longrope":
            return 0
        return int(self.rope_scaling["original_max_position_embeddings"])

    @property
    def rope_recompute_at_switch(self) -> bool:
        """LongRoPE in HF's Phi3ForCausalLM: generate() drops the cache when a sequence first feeds position
        original_max_position_embeddings and recomputes it whole with the long factors (its
        prepare_inputs_for_generation); other architectures keep the short-factor KV they cached."""
        return bool(self.rope_long_from) and self.architecture == "Phi3ForCausalLM"

    @property
    def max_model_len(self) -> int:
        """Longest sequence this model runs: its max_position_embeddings (sliding windows included)."""
        return self.max_position_embeddings

    def attention_window(self, layer: int) -> int:
        """Layer `layer`'s sliding window (a query at p sees keys p - window < j <= p), 0 for full attention."""
        if self.sliding_window is None:
            return 0
        if self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return 0
        return self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ValueError(f"config must be a JSON object, got {type(cfg).__name__}")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config: architectures must be a list of class names, got {archs!r}")
        wrapper = multimodal_wrapper(cfg, archs)
        multimodal = wrapper is not None
        if multimodal:  # Gemma 3 4B+, Mistral Small 3.1+: the text model inside (llama_weights.text_weights)
            cfg, archs = multimodal_text_config(cfg, wrapper), []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                       "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
                                       "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                       "qwen3_moe": "Qwen3MoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                                       "olmo2": "Olmo2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                       "gemma3_text": "Gemma3ForCausalLM"}.get(
                                           cfg.get("model_type"), None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch or cfg.get('model_type')!r}; fastinfer supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        gemma = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
        if gemma:
            from .models.gemma import GEMMA2_DEFAULTS, GEMMA3_DEFAULTS
            # HF's class defaults for what config.json leaves out
            cfg = {**(GEMMA2_DEFAULTS if arch == "Gemma2ForCausalLM" else GEMMA3_DEFAULTS), **cfg}
            act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"  # HF's Gemma reads this key only
            if act != "gelu_pytorch_tanh":
                raise ValueError(f"unsupported hidden_activation {act!r} for Gemma; only 'gelu_pytorch_tanh' is supported")
        elif cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' is supported")
        if cfg.get("mlp_bias") and arch in ("LlamaForCausalLM", "GraniteForCausalLM"):  # Qwen2 / Mistral's HF code has none
            raise ValueError("unsupported mlp_bias=True")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not _is_int(cfg.get(key)) or cfg[key] < 1:
                raise ValueError(f"config: {key} must be a positive integer, got {cfg.get(key)!r}")
        heads = cfg["num_attention_heads"]
        # null means "not set" (the HF default); any other value must be a positive integer
        kv_heads = _optional_positive_int(cfg, "num_key_value_heads", heads)
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if cfg["hidden_size"] % heads:
                raise ValueError(f"config: hidden_size ({cfg['hidden_size']}) must be a multiple of "
                                 f"num_attention_heads ({heads}) when config.json gives no head_dim")
            head_dim = cfg["hidden_size"] // heads
        elif not _is_int(head_dim) or head_dim < 1:
            raise ValueError(f"config: head_dim must be a positive integer, got {head_dim!r}")
        rope_theta, rope_scaling, partial = _rope(cfg, partial_rotary=arch == "Phi3ForCausalLM") if not gemma \
            else (0.0, None, 1.0)  # Gemma's rope settings: _gemma
        # HF's config classes' defaults when the key is absent
        eps = cfg.get("rms_norm_eps", 1e-5 if arch in ("Phi3ForCausalLM", "MixtralForCausalLM", "Olmo2ForCausalLM")
                      else 1e-6)
        if not _is_number(eps) or not 0 <= eps < math.inf:
            raise ValueError(f"config: rms_norm_eps must be a non-negative number, got {eps!r}")
        qc = cfg.get("quantization_config")
        if qc and not isinstance(qc, dict):
            raise ValueError(f"config: quantization_config must be a JSON object, got {qc!r}")
        from .quant.fp8 import parse_quantization_config
        quantization, block_size = parse_quantization_config(qc)
        eos = cfg.get("eos_token_id")
        if not (eos is None or _is_int(eos) or (isinstance(eos, (list, tuple)) and all(_is_int(e) for e in eos))):
            raise ValueError(f"config: eos_token_id must be an integer or a list of integers, got {eos!r}")
        for key in ("bos_token_id", "pad_token_id"):
            if cfg.get(key) is not None and not _is_int(cfg[key]):
                raise ValueError(f"config: {key} must be an integer or null, got {cfg[key]!r}")
        window, window_layers = _sliding_window(cfg, arch)
        granite = _granite_scalars(cfg) if arch in ("GraniteForCausalLM", "GraniteMoeForCausalLM") else {}
        moe = _moe(cfg, arch)
        if gemma:
            moe = _gemma(cfg, arch)  # (no MoE: the same slot carries Gemma's fields)
            rope_theta, rope_scaling = moe.pop("rope_theta"), moe.pop("rope_scaling")
            window, window_layers = moe.pop("sliding_window"), moe.pop("sliding_window_layers")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # as HF's modeling code: Qwen2 always has q/k/v biases, Mistral and Phi-3 never, Llama and Qwen3 per
            # the flag
            attention_bias={"Qwen2ForCausalLM": True, "MistralForCausalLM": False, "Phi3ForCausalLM": False,
                            "MixtralForCausalLM": False, "Qwen2MoeForCausalLM": bool(cfg.get("qkv_bias", True))}.get(
                arch, bool(cfg.get("attention_bias", False))),
            sliding_window=window,
            sliding_window_layers=window_layers,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            # as HF's rope init: int(head_dim * partial_rotary_factor)
            rotary_dim=None if partial == 1.0 else int(head_dim * partial),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=cfg.get("pad_token_id"),
            dtype=parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32", "config dtype"),
            quantization=quantization,
            fp8_weight_block_size=block_size,
            **granite,
            **moe,
            text_of_multimodal=multimodal,
            exact_norm_weights=bool(cfg.get("_gguf_norms", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg = read_json(path, "config.json")
        try:
            return cls.from_hf(cfg)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def read_json(path: Path, what: str):
    """A JSON file's value; a missing file is a FileNotFoundError, an unreadable one a ValueError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text ({e})") from None
    except OSError as e:  # a directory, unreadable, ...
        raise ValueError(f"cannot read {what} {path}: {e}") from None
