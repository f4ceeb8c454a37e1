"""Gemma 2's and Gemma 3's decoder layers (HF's Gemma2ForCausalLM, Gemma3ForCausalLM: the text model): Llama's
projections and paged attention with

    x_mid = x + post_attention_layernorm(o_proj(attention(input_layernorm(x))))
    x_out = x_mid + post_feedforward_layernorm(down(gelu_tanh(gate(h)) * up(h))),  h = pre_feedforward_layernorm(x_mid)

every norm Gemma's: x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32 and rounded once (ops.rms_norm /
fused_add_rms_norm with 1 + w kept in fp32, as HF computes it: a 16-bit 1 + w would lose Gemma's small weights);
q and k normalized per head the same way before rotary; the MLP's GeLU-tanh and product in ops.gelu_tanh_and_mul;
attention scaled by query_pre_attn_scalar ** -0.5; the sliding-window layers rotate with their own rope table (rope_local_base_freq),
the global ones with rope_theta and its scaling. The embedding rows are scaled by sqrt(hidden_size) rounded to
the model dtype, and the logits soft-capped (cap * tanh(logits / cap)) when final_logit_softcapping is set: both
in LlamaForCausalLM. The fused decode paths (norms inside the GEMVs) are never taken.

Gemma 2 is the same layer without the q / k norms, with one rope table for every layer and its attention scores
soft-capped, cap * tanh(s / cap) (attn_logit_softcapping: the attention ops' softcap).
"""
from __future__ import annotations

import torch

from .. import _ops as ops
from .._checks import FP8
from ..metadata import AttnMetadata
from .llama import LlamaLayer  # (llama.py imports this module only when it builds a Gemma model)

# HF's Gemma3TextConfig / Gemma2Config defaults, for the keys a config.json may leave out
GEMMA3_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
                   "pad_token_id": 0}
GEMMA2_DEFAULTS = {**GEMMA3_DEFAULTS, "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0}


def finish_gemma_weights(model) -> float:
    """After loading: each norm weight w becomes its multiplier 1 + w in fp32 (HF keeps w in the model dtype and
    computes 1 + w in fp32; a GGUF's stored 1 + w is kept exactly: ModelConfig.exact_norm_weights); returns the
    embedding scale as HF's embed_scale buffer holds it, sqrt(hidden) in fp32 rounded to the model dtype."""
    with torch.no_grad():
        for norm in [model.norm] + [t for layer in model.layers for t in layer.norm_targets("").values()]:
            if not model.config.exact_norm_weights:
                norm.copy_(norm.to(model.dtype))
            norm.add_(1.0)
    return torch.tensor(model.config.embedding_multiplier, dtype=torch.float32).to(model.dtype).item()


class GemmaLayer(LlamaLayer):
    llama_block = False  # its own norm placement: the fused Llama forwards do not apply

    def __init__(self, cfg, dtype, device, kind=None, window: int = 0, moe: bool = False):
        super().__init__(cfg, dtype, device, kind, window=window, moe=moe)
        if moe:
            raise ValueError("Gemma has no mixture-of-experts layers")

        def f32(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.float32, device=device)
        h, d = cfg.hidden_size, cfg.head_dim
        # 1 + w, in fp32, once loaded (LlamaForCausalLM.load_weights adds the 1)
        self.input_norm, self.post_attn_norm, self.pre_ff_norm, self.post_ff_norm = f32(h), f32(h), f32(h), f32(h)
        # Gemma 3's per-head q / k norms (Gemma 2 has none)
        self.q_norm_gemma, self.k_norm_gemma = (f32(d), f32(d)) if cfg.architecture == "Gemma3ForCausalLM" else (None, None)
        self.q_norm = self.k_norm = None  # the fused op's per-head norms are Qwen3's (weights as stored)
        self.cos_sin: torch.Tensor | None = None  # this layer's rope table (local or global), set by the model

    def norm_targets(self, prefix: str) -> dict[str, torch.Tensor]:
        t = {prefix + "input_layernorm.weight": self.input_norm,
             prefix + "post_attention_layernorm.weight": self.post_attn_norm,
             prefix + "pre_feedforward_layernorm.weight": self.pre_ff_norm,
             prefix + "post_feedforward_layernorm.weight": self.post_ff_norm}
        if self.q_norm_gemma is not None:
            t[prefix + "self_attn.q_norm.weight"] = self.q_norm_gemma
            t[prefix + "self_attn.k_norm.weight"] = self.k_norm_gemma
        return t

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttnMetadata, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (post-feedforward-normed MLP output, x_mid): the next layer, or the final norm, adds them (HF's
        `residual + hidden_states`, one rounding: fused_add_rms_norm's add)."""
        if residual is None:  # the embedding rows: x
            residual, normed = hidden, ops.rms_norm(hidden, self.input_norm, self.eps)
        else:  # residual becomes x = the previous layer's x_mid + its output, hidden its input norm
            normed = hidden
            ops.fused_add_rms_norm(normed, residual, self.input_norm, self.eps)
        attn = self.o_proj_out(self.attention(normed, kv_cache, meta, self.cos_sin))
        post = ops.rms_norm(attn, self.post_attn_norm, self.eps)
        ops.fused_add_rms_norm(post, residual, self.pre_ff_norm, self.eps)  # residual: x_mid; post: its norm
        out = self.down(ops.gelu_tanh_and_mul(self.gate_up(post)))
        return ops.rms_norm(out, self.post_ff_norm, self.eps), residual

    def attend(self, qkv: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
               cos_sin: torch.Tensor) -> torch.Tensor:
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.reshape(t, self.num_heads, self.head_dim), k.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm_gemma is not None:  # Gemma 3: each head normalized (rows of head_dim)
            q = ops.rms_norm(q.reshape(-1, self.head_dim), self.q_norm_gemma, self.eps).view(t, self.num_heads, -1)
            k = ops.rms_norm(k.reshape(-1, self.head_dim), self.k_norm_gemma, self.eps).view(t, self.num_kv_heads, -1)
        v = v.contiguous().view(t, self.num_kv_heads, self.head_dim)
        kv_scale = self.kv_scale if kv_cache.dtype == FP8 else None
        ops.rotary_embedding_and_cache(meta.positions, q, k, v, cos_sin, kv_cache, meta.slot_mapping,
                                       check_indices=False, kv_scale=kv_scale)
        return self.attend_rotated(q, kv_cache, meta, kv_scale)
