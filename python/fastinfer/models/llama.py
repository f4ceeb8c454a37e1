"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) on fastinfer ops and the paged KV cache.

Weights are fused at load time: q/k/v projections into one [(H + 2 Hkv) D, hidden] matrix and
gate/up into one [2 F, hidden] matrix, so a layer runs two GEMMs where HF runs five. Dense GEMMs
are torch (cuBLAS on GPU); with a QuantConfig the four projections are ``Int4Linear`` (the fused
4-bit GEMM, fastinfer.ops.int4_linear); everything else is a fastinfer op.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .. import _ops as ops
from ..config import ModelConfig
from ..metadata import AttnMetadata
from ..quant.int4 import QuantizedWeight
from ..quant.linear import Int4Linear, QuantConfig
from .rope import cos_sin_cache


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, in] @ weight^T (+ bias); weight is a dense [out, in] tensor or an Int4Linear."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    out = weight(x)
    return out if bias is None else out.add_(bias)


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, quant: QuantConfig | None = None):
        def empty(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        def projection(out_features: int, in_features: int):
            if quant is None:
                return empty(out_features, in_features)
            return Int4Linear(out_features, in_features, quant, dtype, device)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.scale = d ** -0.5
        self.input_norm = empty(h)
        self.qkv = projection(self.q_size + 2 * self.kv_size, h)
        self.qkv_bias = empty(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o_proj = projection(h, self.q_size)
        self.post_attn_norm = empty(h)
        self.gate_up = projection(2 * cfg.intermediate_size, h)
        self.down = projection(h, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttnMetadata, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden, residual: [num_tokens, hidden_size]
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_norm, self.eps)
        else:
            ops.fused_add_rms_norm(hidden, residual, self.input_norm, self.eps)
        hidden = self.o_proj_out(self.attention(hidden, kv_cache, meta, cos_sin))
        ops.fused_add_rms_norm(hidden, residual, self.post_attn_norm, self.eps)
        hidden = linear(ops.silu_and_mul(linear(hidden, self.gate_up)), self.down)
        return hidden, residual

    def attention(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                  cos_sin: torch.Tensor) -> torch.Tensor:
        t = hidden.shape[0]
        qkv = linear(hidden, self.qkv, self.qkv_bias)  # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        ops.rotary_embedding(meta.positions, q, k, cos_sin, check_indices=False)
        ops.reshape_and_cache(k, v, kv_cache, meta.slot_mapping, check_indices=False)
        if meta.is_decode:
            return ops.paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, self.scale,
                                              check_indices=False)
        return ops.paged_prefill_attention(q, kv_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                                           self.scale, check_indices=False)

    def o_proj_out(self, attn: torch.Tensor) -> torch.Tensor:
        return linear(attn.reshape(attn.shape[0], self.q_size), self.o_proj)


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 quant: QuantConfig | None = None):
        self.config = cfg
        self.quant = quant
        self.dtype = dtype or cfg.dtype
        self.device = torch.device(device)
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, device=self.device)
        self.layers = [LlamaLayer(cfg, self.dtype, self.device, quant) for _ in range(cfg.num_layers)]
        self.norm = torch.empty(cfg.hidden_size, dtype=self.dtype, device=self.device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else torch.empty_like(self.embed)
        self.cos_sin = cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                     cfg.rope_scaling, self.device)

    @torch.inference_mode()
    def forward(self, meta: AttnMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """fp32 logits [num_logits, vocab] for the rows in meta.logits_indices."""
        hidden = F.embedding(meta.input_ids, self.embed)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer.forward(hidden, residual, kv_cache, meta, self.cos_sin)
        ops.fused_add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)
        return F.linear(hidden[meta.logits_indices], self.lm_head).float()

    # ---- weights ---------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be filled exactly.
        A projection of a quantized model also takes a QuantizedWeight (packed as it is copied)."""
        targets = self._weight_targets()
        filled: set[str] = set()
        for name, tensor in weights:
            if name not in targets:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            dest = targets[name]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            if isinstance(tensor, QuantizedWeight) and isinstance(dest, torch.Tensor):
                tensor = tensor.dequantize(dest.dtype)  # a 4-bit checkpoint into a dense model
            with torch.no_grad():
                dest.copy_(tensor)
            filled.add(name)
        missing = sorted(set(targets) - filled)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weight(s), e.g. {missing[:3]}")

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF name -> the (view of the) fastinfer tensor it fills."""
        t = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            t["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            q, kv = layer.q_size, layer.kv_size
            ffn = layer.gate_up.shape[0] // 2
            t[p + "input_layernorm.weight"] = layer.input_norm
            t[p + "post_attention_layernorm.weight"] = layer.post_attn_norm
            t[p + "self_attn.q_proj.weight"] = layer.qkv[:q]
            t[p + "self_attn.k_proj.weight"] = layer.qkv[q:q + kv]
            t[p + "self_attn.v_proj.weight"] = layer.qkv[q + kv:]
            if layer.qkv_bias is not None:
                t[p + "self_attn.q_proj.bias"] = layer.qkv_bias[:q]
                t[p + "self_attn.k_proj.bias"] = layer.qkv_bias[q:q + kv]
                t[p + "self_attn.v_proj.bias"] = layer.qkv_bias[q + kv:]
            t[p + "self_attn.o_proj.weight"] = layer.o_proj
            t[p + "mlp.gate_proj.weight"] = layer.gate_up[:ffn]
            t[p + "mlp.up_proj.weight"] = layer.gate_up[ffn:]
            t[p + "mlp.down_proj.weight"] = layer.down
        return t

    def make_kv_caches(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """One [num_blocks, 2, block_size, num_kv_heads, head_dim] cache per layer."""
        cfg = self.config
        shape = (num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
