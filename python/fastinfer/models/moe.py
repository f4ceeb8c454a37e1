"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) as HF transformers computes it.

Router: logits = x @ router^T in the model dtype, softmax in fp32, the top num_experts_per_tok experts
per token, their weights renormalized to sum 1 when norm_topk_prob (Mixtral always; Qwen3-MoE per its
config) and, for Qwen3-MoE, rounded to the model dtype. Each expert e runs SwiGLU on its tokens:
down[e] @ (silu(gate) * up)(gate_up[e] @ x), scaled by the token's weight for e, the products added into
the output in ascending expert order (HF's index_add_ order).

Two paths. Decode steps on a GPU (up to MOE_GEMV_MAX_PAIRS (token, expert) pairs, 16-bit weights) run
ops.moe_gemv: one kernel for every pair's gate / up projection with the SwiGLU epilogue, one for the down
projections, the expert ids read on the device, then the pairs' weighted outputs added in HF's order: no
host sync, so such steps can be CUDA graphs (runner.py). Everything else (prefill, the CPU unless forced)
groups the pairs by expert, one read-back of the group sizes per layer, and runs each expert as a GEMM
over its tokens. Weights: router [E, hidden], gate_up [E, 2 F, hidden] (gate rows first), down [E, hidden, F],
HF 5.x's fused expert layout; per-expert checkpoint tensors are copied into their slices (llama_weights).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _ops as ops
from ..config import ModelConfig

MOE_GEMV_MAX_PAIRS = 256  # decode steps of up to this many (token, expert) pairs take ops.moe_gemv


def use_moe_gemv(device: torch.device, pairs: int, dtype: torch.dtype) -> bool:
    """Whether a step of `pairs` (token, expert) pairs runs ops.moe_gemv: on CUDA, 16-bit weights, at most
    MOE_GEMV_MAX_PAIRS pairs, unless FASTINFER_MOE_GEMV=0 (read at every call; tests force it on the CPU)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and 1 <= pairs <= MOE_GEMV_MAX_PAIRS
            and os.environ.get("FASTINFER_MOE_GEMV", "1") != "0")


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
        if self.gemv_ok(hidden.shape[0], hidden.device, hidden.dtype):
            return self._decode(hidden, weights, experts)
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

    def gemv_ok(self, tokens: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a step of `tokens` runs the graph-safe decode path (ops.moe_gemv)."""
        f, k = self.down.shape[2], self.gate_up.shape[2]
        return use_moe_gemv(device, tokens * self.top_k, dtype) and f % 8 == 0 and k % 8 == 0

    def _decode(self, hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every pair's expert in two ops.moe_gemv launches, then the weighted outputs of each token
        added as HF's index_add_ does: its experts in ascending order, each product rounded to the
        output dtype and added in it."""
        t = hidden.shape[0]
        ids = experts.flatten().to(torch.int32)
        act = ops.moe_gemv(hidden, self.gate_up, ids, x_group=self.top_k, silu_mul=True, check_indices=False)
        y = ops.moe_gemv(act, self.down, ids, check_indices=False).view(t, self.top_k, -1)
        order = torch.argsort(experts, dim=1, stable=True)
        y = y.gather(1, order[:, :, None].expand(-1, -1, y.shape[2]))
        weights = weights.gather(1, order)
        out = (y[:, 0] * weights[:, 0, None]).to(hidden.dtype)
        for s in range(1, self.top_k):
            out = out + (y[:, s] * weights[:, s, None]).to(hidden.dtype)
        return out

