"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) as HF transformers computes it.

Router: logits = x @ router^T in the model dtype, softmax in fp32, the top num_experts_per_tok experts
per token, their weights renormalized to sum 1 when norm_topk_prob (Mixtral always; Qwen3-MoE per its
config) and, for Qwen3-MoE, rounded to the model dtype. Each expert e runs SwiGLU on its tokens:
down[e] @ (silu(gate) * up)(gate_up[e] @ x), scaled by the token's weight for e, the products added into
the output in ascending expert order (HF's index_add_ order).

Correct, not fast: which experts run depends on the data, so a step reads the routing back to the host
(once per layer: how many pairs each expert takes; no CUDA graph can hold that, so decode graphs are off
for such models, runner.py) and each expert is a separate GEMM over its tokens. Weights: router [E, hidden], gate_up [E, 2 F, hidden] (gate rows first), down [E, hidden, F],
HF 5.x's fused expert layout; per-expert checkpoint tensors are copied into their slices (llama_weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops as ops
from ..config import ModelConfig


class MoE:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.round_weights = cfg.architecture == "Qwen3MoeForCausalLM"  # HF casts them to the model dtype
        self.router = torch.empty(e, h, dtype=dtype, device=device)
        self.gate_up = torch.empty(e, 2 * f, h, dtype=dtype, device=device)
        self.down = torch.empty(e, h, f, dtype=dtype, device=device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] (normalized) -> the MoE output [T, hidden] in its dtype."""
        logits = F.linear(hidden, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(hidden.dtype)
        out = torch.zeros_like(hidden)
        # the (token, slot) pairs grouped by expert, ascending (HF's loop over the experts hit); one read
        # back of the group sizes per layer
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.router.shape[0]).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens, slot = pairs // self.top_k, pairs % self.top_k
            act = ops.silu_and_mul(F.linear(hidden[tokens], self.gate_up[e]))
            y = F.linear(act, self.down[e]) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
