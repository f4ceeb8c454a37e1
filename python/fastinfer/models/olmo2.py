"""OLMo-2's decoder layer (HF's Olmo2ForCausalLM): Llama's projections and attention with the norms moved.

    x_mid = x + post_attention_layernorm(o_proj(attention(x)))       (no norm before attention)
    x_out = x_mid + post_feedforward_layernorm(down(silu(gate(x_mid)) * up(x_mid)))

and q / k each RMS-normalized over the whole projection ([heads x head_dim] weights, not per head) before
rotary. The model's layer loop keeps Llama's pending residual add: a layer returns (its last normed output,
x_mid), and the next layer (or the final norm, fused_add_rms_norm) adds the two, the one rounding HF's
`residual + hidden_states` takes. fastinfer's rms_norm multiplies by the weight in fp32 and rounds once, as
HF's Olmo2RMSNorm does (Llama's rounds before the weight). The fused decode paths (forward_fused,
forward_fp8) are Llama's layer layout: never taken here."""
from __future__ import annotations

import torch

from .. import _ops as ops
from .._checks import FP8
from ..metadata import AttnMetadata
from .linear import gate_up_silu_mul
from .llama import LlamaLayer  # (llama.py imports this module only when it builds an OLMo-2 model)


class Olmo2Layer(LlamaLayer):
    llama_block = False  # its own norm placement: the fused Llama forwards do not apply

    def __init__(self, cfg, dtype, device, kind=None, window: int = 0, moe: bool = False):
        super().__init__(cfg, dtype, device, kind, window=window, moe=moe)
        self.q_norm = self.k_norm = None  # the per-head kind is Qwen3's; OLMo-2's span the projections
        self.q_norm_full = torch.empty(self.q_size, dtype=dtype, device=device)
        self.k_norm_full = torch.empty(self.kv_size, dtype=dtype, device=device)
        self.post_ff_norm = torch.empty(cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttnMetadata, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden if residual is None else hidden + residual
        attn = self.o_proj_out(self.attention(x, kv_cache, meta, cos_sin))
        x_mid = x + ops.rms_norm(attn, self.post_attn_norm, self.eps)
        out = self.down(gate_up_silu_mul(self.gate_up, x_mid)) if self.moe is None else self.moe(
            x_mid, decode=meta.is_decode)
        return ops.rms_norm(out, self.post_ff_norm, self.eps), x_mid

    def attend(self, qkv: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
               cos_sin: torch.Tensor) -> torch.Tensor:
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = ops.rms_norm(q.contiguous(), self.q_norm_full, self.eps).view(t, self.num_heads, self.head_dim)
        k = ops.rms_norm(k.contiguous(), self.k_norm_full, self.eps).view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        kv_scale = self.kv_scale if kv_cache.dtype == FP8 else None
        ops.rotary_embedding_and_cache(meta.positions, q, k, v, cos_sin, kv_cache, meta.slot_mapping,
                                       check_indices=False, kv_scale=kv_scale)
        return self.attend_rotated(q, kv_cache, meta, kv_scale)
