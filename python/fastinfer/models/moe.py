"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, Granite-MoE) as HF transformers computes it.

Router: logits = x @ router^T in the model dtype, softmax in fp32, the top num_experts_per_tok experts
per token, their weights renormalized to sum 1 when norm_topk_prob (Mixtral always; Qwen3-MoE per its
config) and, for Qwen3-MoE, rounded to the model dtype. Each (token, slot) pair runs its expert's SwiGLU,
y = down[e] @ (silu(gate) * up)(gate_up[e] @ x), and the token's output is round(sum over its slots, in
slot order, of y * weight): transformers 5's default experts path (grouped_mm: the products summed by
.sum(dim=1) over [tokens, top_k, hidden], fp32 accumulation, one rounding), reproduced here with the same
tensor shapes and the same reduction.

Three ways to get y. Decode steps on a GPU (up to MOE_GEMV_DECODE_PAIRS pairs, 16-bit weights) run
ops.moe_gemv: one kernel for every pair's gate / up projection with the SwiGLU epilogue, one for the down
projections, the expert ids read on the device: no host sync, so such steps can be CUDA graphs
(runner.py). Everything else takes HF's default path where torch has it (torch._grouped_mm: the CPU, and
bf16 on an sm_90+ GPU): the pairs sorted by expert, group offsets from a histogram (no host sync), one
grouped GEMM for gate / up, SwiGLU as HF's (silu(gate) * up, two roundings), one for down: the same ops as
transformers on the same device, so the same values. Otherwise the pairs are grouped by expert with one
read-back of the group sizes per layer and each expert runs as a GEMM over its tokens. Weights:
router [E, hidden], gate_up [E, 2 F, hidden] (gate rows first), down [E, hidden, F], HF 5.x's fused expert
layout; per-expert checkpoint tensors are copied into their slices (llama_weights).

Quantized experts (a model loaded with an FP8 or 4-bit kind: GPTQ / AWQ / FP8 checkpoints, or quantized at
load): each expert is a pair of the model's projections of that kind (models/linear.make_linear), gate_up
[2 F, hidden] and down [hidden, F], in `experts`, and the pairs take the per-expert path (one fastinfer
int4_linear / fp8_linear per expert with tokens: a host sync per layer), except decode steps on a GPU: the
experts' tensors are views of stacked ones, and every pair's gate / up and down projections run as the 16-bit
ones do, graph-safe: ops.moe_int4_linear for 4-bit experts (Int4Linear.stacked), ops.moe_gemv on the e4m3
weights for FP8 ones (its W8A16 form, weight_scale: x stays 16-bit in decode steps, where prefill's
fp8_linear quantizes it per token). The router and Qwen2-MoE's shared-expert gate stay dense, as in the published
quantized checkpoints; the shared expert's projections are of the model's kind.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .. import _ops as ops
from ..config import ModelConfig
from ..quant.linear import Int4Linear, QuantConfig
from .linear import make_linear, stacked_fp8_linears

MOE_GEMV_DECODE_PAIRS = 256  # decode steps of up to this many (token, expert) pairs take ops.moe_gemv


def use_moe_gemv(device: torch.device, pairs: int, dtype: torch.dtype) -> bool:
    """Whether a decode step of `pairs` (token, expert) pairs runs ops.moe_gemv: on CUDA, 16-bit weights, at
    most MOE_GEMV_DECODE_PAIRS pairs, unless FASTINFER_MOE_GEMV=0 (read when a step runs; a captured decode
    graph keeps the path it was captured with). Tests force it on the CPU."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and 1 <= pairs <= MOE_GEMV_DECODE_PAIRS
            and os.environ.get("FASTINFER_MOE_GEMV", "1") != "0")


def grouped_mm_ok(hidden: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs here: torch has it, and the CPU, or bf16 on an sm_90+ GPU."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if hidden.device.type == "cpu":
        return True
    return hidden.device.type == "cuda" and hidden.dtype == torch.bfloat16 and _sm90_or_newer(hidden.device.index)


@functools.cache
def _sm90_or_newer(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)  # asked once per device, not per layer


class MoE:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 kind: str | QuantConfig | None = None):
        """kind: the model's projection kind (models/linear.py); None keeps the experts dense and stacked."""
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.num_experts = e
        # Granite-MoE's router: a softmax over the top-k logits (Mixtral's renormalized top-k, rounded otherwise)
        self.softmax_of_topk = cfg.architecture == "GraniteMoeForCausalLM"
        # HF casts the Qwen and Granite-MoE routers' weights to the model dtype
        self.round_weights = cfg.architecture in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "GraniteMoeForCausalLM")
        self.router = torch.empty(e, h, dtype=dtype, device=device)
        # stacked expert weights for ops.moe_gemv: 16-bit, or e4m3 with fp32 row scales [E, rows] (FP8)
        self.gate_up = self.down = self.gate_up_scale = self.down_scale = None
        self.experts = None  # quantized experts: (gate_up, down) projections per expert, views of stacked storage
        self.int4_gate_up = self.int4_down = None  # 4-bit experts: the stacked tensors of ops.moe_int4_linear
        if kind is None:
            self.gate_up = torch.empty(e, 2 * f, h, dtype=dtype, device=device)
            self.down = torch.empty(e, h, f, dtype=dtype, device=device)
        elif isinstance(kind, QuantConfig):
            gate_up, self.int4_gate_up = Int4Linear.stacked(e, 2 * f, h, kind, dtype, device)
            down, self.int4_down = Int4Linear.stacked(e, h, f, kind, dtype, device)
            self.experts = list(zip(gate_up, down))
        else:  # "fp8"
            gate_up, self.gate_up, self.gate_up_scale = stacked_fp8_linears(e, h, 2 * f, device)
            down, self.down, self.down_scale = stacked_fp8_linears(e, f, h, device)
            self.experts = list(zip(gate_up, down))
        s = cfg.shared_expert_intermediate_size  # Qwen2-MoE's shared expert: HF's MLP, gated by sigmoid(x @ g^T)
        self.shared = None if not s else [make_linear(h, s, dtype, device, kind),   # gate_proj
                                          make_linear(h, s, dtype, device, kind),   # up_proj
                                          make_linear(s, h, dtype, device, kind),   # down_proj
                                          torch.empty(1, h, dtype=dtype, device=device)]  # shared_expert_gate

    def __call__(self, hidden: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """hidden [T, hidden] (normalized) -> the MoE output [T, hidden] in its dtype. decode: a decode step
        (one token per sequence), which may take ops.moe_gemv."""
        logits = F.linear(hidden, self.router)
        if self.softmax_of_topk:  # Granite-MoE: the top-k of the fp32 logits, a softmax over those
            top_logits, experts = torch.topk(logits.float(), self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, experts = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(hidden.dtype)
        t = hidden.shape[0]
        if self.gemv_ok(t, hidden.device, hidden.dtype, decode):
            y = self._pairs_by_int4_gemv(hidden, experts) if self.int4_gate_up is not None else \
                self._pairs_by_gemv(hidden, experts)
        elif self.experts is None and grouped_mm_ok(hidden):
            y = self._pairs_grouped(hidden, experts)
        else:
            y = self._pairs_by_expert(hidden, experts)
        # HF's combine: each pair's output times its weight (fp32 for Mixtral's weights), summed over the
        # token's slots by .sum(dim=1), rounded once
        out = (y.view(t, self.top_k, -1) * weights[:, :, None]).sum(dim=1).to(hidden.dtype)
        if self.shared is not None:  # Qwen2-MoE, as HF: the routed output plus the gated shared expert's
            gate, up, down, gate_w = self.shared
            shared = down(F.silu(gate(hidden)) * up(hidden))
            out = out + torch.sigmoid(F.linear(hidden, gate_w)) * shared
        return out

    def gemv_ok(self, tokens: int, device: torch.device, dtype: torch.dtype, decode: bool) -> bool:
        """Whether a step of `tokens` runs the graph-safe path (ops.moe_gemv, W8A16 for FP8 experts;
        ops.moe_int4_linear for 4-bit ones): decode steps only."""
        if self.int4_gate_up is not None:
            return decode and use_moe_gemv(device, tokens * self.top_k, dtype)
        f, k = self.down.shape[2], self.gate_up.shape[2]
        align = 16 if self.gate_up_scale is not None else 8  # e4m3 rows: 16-byte pieces of 16 k
        return decode and use_moe_gemv(device, tokens * self.top_k, dtype) and f % align == 0 and k % align == 0

    def _pairs_by_gemv(self, hidden: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """y [T * top_k, hidden] in (token, slot) order: two ops.moe_gemv launches, no host sync."""
        ids = experts.flatten().to(torch.int32)
        act = ops.moe_gemv(hidden, self.gate_up, ids, x_group=self.top_k, silu_mul=True, check_indices=False,
                           weight_scale=self.gate_up_scale)
        return ops.moe_gemv(act, self.down, ids, check_indices=False, weight_scale=self.down_scale)

    def _pairs_by_int4_gemv(self, hidden: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """_pairs_by_gemv for 4-bit experts: gate / up (ops.moe_int4_linear), SwiGLU, down; no host sync."""
        ids = experts.flatten().to(torch.int32)
        group = self.experts[0][0].quant.group_size
        qweight, scales, zeros, mins = self.int4_gate_up
        gate_up = ops.moe_int4_linear(hidden, qweight, scales, ids, group, zeros=zeros, mins=mins,
                                      x_group=self.top_k, check_indices=False)
        qweight, scales, zeros, mins = self.int4_down
        return ops.moe_int4_linear(ops.silu_and_mul(gate_up), qweight, scales, ids, group, zeros=zeros, mins=mins,
                                   check_indices=False)

    def _pairs_grouped(self, hidden: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """y [T * top_k, hidden] in (token, slot) order, as transformers' grouped_mm experts path computes it."""
        flat = experts.flatten()
        sorted_ids, perm = torch.sort(flat)
        counts_in = sorted_ids.float() if hidden.device.type == "cpu" else sorted_ids.int()
        counts = torch.histc(counts_in, bins=self.router.shape[0], min=0, max=self.router.shape[0] - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = torch._grouped_mm(hidden[perm // self.top_k], self.gate_up.transpose(-2, -1),
                                     offs=offsets).chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=offsets)
        y = torch.empty_like(out)
        y[perm] = out
        return y

    def _pairs_by_expert(self, hidden: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """y [T * top_k, hidden] in (token, slot) order: the pairs grouped by expert (one argsort and one
        read-back of the group sizes), a GEMM per expert over its tokens."""
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        y = torch.empty(flat.shape[0], hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            x = hidden[pairs // self.top_k]
            if self.experts is None:
                y[pairs] = F.linear(ops.silu_and_mul(F.linear(x, self.gate_up[e])), self.down[e])
            else:
                gate_up, down = self.experts[e]
                y[pairs] = down(ops.silu_and_mul(gate_up(x)))
        return y
