"""Model configuration read from an HF ``config.json`` (transformers 4.x and 5.x spellings)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
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
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def max_model_len(self) -> int:
        """Longest sequence this model runs correctly: attention here is full (no sliding window)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(cfg.get("model_type"), None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch or cfg.get('model_type')!r}; fastinfer supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' is supported")
        if cfg.get("mlp_bias") and arch == "LlamaForCausalLM":  # Qwen2 / Mistral's HF code has no MLP bias
            raise ValueError("unsupported mlp_bias=True")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise ValueError(f"config: {key} must be a positive integer, got {cfg.get(key)!r}")
        heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _rope(cfg)
        from .quant.fp8 import parse_quantization_config
        quantization, block_size = parse_quantization_config(cfg.get("quantization_config"))
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # as HF's modeling code: Qwen2 always has q/k/v biases, Mistral never, Llama per the flag
            attention_bias={"Qwen2ForCausalLM": True, "MistralForCausalLM": False}.get(
                arch, bool(cfg.get("attention_bias", False))),
            sliding_window=_sliding_window(cfg, arch),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=cfg.get("pad_token_id"),
            dtype=parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32", "config dtype"),
            quantization=quantization,
            fp8_weight_block_size=block_size,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(cfg)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and rope scaling from either spelling: 4.x rope_theta + rope_scaling, 5.x rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; fastinfer supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {cfg['partial_rotary_factor']}")
    if rope_type == "default":
        return theta, None
    merged.pop("rope_theta", None)
    merged.pop("type", None)
    merged["rope_type"] = rope_type
    if rope_type == "llama3":  # HF's standardize_rope_params fills this in
        merged.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    for key in required:
        if not isinstance(merged.get(key), (int, float)):
            raise ValueError(f"config: {rope_type} rope scaling needs a number {key!r}, got {merged.get(key)!r}")
    return theta, merged


def _sliding_window(cfg: dict, arch: str) -> int | None:
    window = cfg.get("sliding_window")
    if arch == "LlamaForCausalLM":  # HF's Llama has no sliding window, whatever the config holds
        return None
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None
