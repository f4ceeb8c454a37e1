"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3) on fastinfer ops and the paged KV cache.

Weights are fused at load time: q/k/v projections into one [(H + 2 Hkv) D, hidden] matrix and
gate/up into one [2 F, hidden] matrix, so a layer runs two GEMMs where HF runs five. Each
projection is dense (torch GEMM, cuBLAS on GPU; fastinfer's dense_gemv for decode steps of <= 8
tokens on CUDA, the LM head too), FP8 (quantization="fp8") or 4-bit (a QuantConfig: int4 / gptq /
awq / gguf); models/linear.py decides which. Everything else is a fastinfer op.

Fused norms (LlamaForCausalLM.fuse_norms): a step whose projections all take the dense GEMV (<= 8
tokens; the norm prologue would take 16) runs no RMSNorm kernel. The embedding op leaves the rows' sums of squares per 16 columns
for the first layer, the final norm runs in the LM head (when every row needs logits, which also
gives fp32 logits without a gather or a cast), and in between the o and down projections add their
output to the residual stream in their epilogue (ops.dense_gemv_add_residual, which also leaves the
new residual's sums of squares per 16 columns), and the q/k/v and gate / up projections normalize
the residual as they load it (ops.rms_norm_dense_gemv): 4 kernels per layer instead of 6 around
attention, the same roundings as the unfused ops (the sum of squares is added in another order).
Over a 16-bit cache with rotary over whole heads, the q/k/v projection also rotates q and k and
writes k and v to the cache in its epilogue (ops.dense_gemv_rope_cache): 3 kernels per layer around
attention. Qwen3 normalizes each q / k head before rotary, which that epilogue does not: its q/k/v
GEMV is followed by ops.rotary_embedding_and_cache with q_norm / k_norm (norms, rotary, KV write: one
kernel). With FASTINFER_GEMV_PREFETCH_MB set, each of these GEMVs also asks L2 for the first bytes of the
next one's weight as it finishes (gemv_prefetch_bytes; off until measured on a GPU).

FP8 layers (LlamaLayer.forward_fp8): the two norms and the SwiGLU emit the per-token FP8 inputs of the
GEMMs after them (ops.rms_norm_quant_fp8, ops.silu_and_mul_quant_fp8), the same bits as the 16-bit op
followed by fp8_quantize_per_token; only o_proj quantizes its input (the attention output) itself.
With FASTINFER_FP8_DECODE=w8a16 (off until measured on a GPU), decode steps of FP8 layers take the fused
path above instead, the GEMVs reading the e4m3 weights with 16-bit activations (W8A16: each row's sum
times its scale; ops.dense_gemv's weight_scale): 3 kernels a layer instead of ~10, and no activation
quantization (prefill keeps W8A8).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from .. import _ops as ops
from .._checks import FP8
from ..config import ModelConfig
from ..metadata import AttnMetadata
from ..quant.linear import QuantConfig
from . import linear as _linear
from . import llama_weights
from .linear import Linear, dense_linear, gate_up_silu_mul, linear_kind, make_linear
from .moe import MoE
from .rope import cos_sin_cache


def fused_norms_enabled() -> bool:
    """FASTINFER_FUSED_NORM (default 1; read at every forward, so a CUDA graph keeps what it was
    captured with): 0 runs every residual add + RMSNorm as its own kernel."""
    return os.environ.get("FASTINFER_FUSED_NORM", "1") != "0"


def fused_rope_enabled() -> bool:
    """FASTINFER_FUSED_ROPE (default 1, read like FASTINFER_FUSED_NORM): 0 keeps rotary + KV write
    as its own kernel on the fused-norm path."""
    return os.environ.get("FASTINFER_FUSED_ROPE", "1") != "0"


def fp8_fused_quant_enabled() -> bool:
    """FASTINFER_FP8_FUSED_QUANT (default 1; read at every forward): an FP8 layer's norms and SwiGLU
    emit its GEMMs' FP8 inputs themselves (ops.rms_norm_quant_fp8, ops.silu_and_mul_quant_fp8: same
    bits as the op, then fp8_quantize_per_token); 0 runs the two ops."""
    return os.environ.get("FASTINFER_FP8_FUSED_QUANT", "1") != "0"


FP8_DECODE_MODES = ("w8a8", "w8a16")


def fp8_decode_mode() -> str:
    """FASTINFER_FP8_DECODE (default w8a8; read at every forward, so a CUDA graph keeps what it was
    captured with): w8a16 runs the decode steps of FP8 layers on the fused GEMV path (forward_fused) with
    the e4m3 weights converted in the kernel and x kept 16-bit; w8a8 quantizes x per token (forward_fp8)."""
    value = os.environ.get("FASTINFER_FP8_DECODE", "w8a8")
    if value not in FP8_DECODE_MODES:
        raise ValueError(f"FASTINFER_FP8_DECODE must be one of {', '.join(FP8_DECODE_MODES)}, got {value!r}")
    return value


def gemv_prefetch_bytes() -> int:
    """FASTINFER_GEMV_PREFETCH_MB (default 0: off; read at every forward, so a CUDA graph keeps what it
    was captured with): on the fused path each GEMV asks L2 for about this many MB of the next GEMV's
    weight as it finishes, twice that across attention (csrc/include/fastinfer/gemm/gemv.cuh, "L2
    prefetch across kernels"). A hint: results do not change."""
    value = os.environ.get("FASTINFER_GEMV_PREFETCH_MB", "0")
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not (0.0 <= mb <= 1024.0):
        raise ValueError(f"FASTINFER_GEMV_PREFETCH_MB must be a number of MB in [0, 1024], got {value!r}")
    return int(mb * (1 << 20))


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 kind: str | QuantConfig | None = None, window: int = 0, moe: bool = False):
        """window: this layer's sliding window (ModelConfig.attention_window), 0 for full attention; moe:
        a sparse mixture-of-experts MLP (models/moe.py) instead of the dense one."""
        def empty(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        def linear(n_in, n_out, bias=False):
            return make_linear(n_in, n_out, dtype, device, kind, bias=bias)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        # Granite's attention_multiplier replaces the usual scale
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else d ** -0.5
        self.window = window
        self.softcap = cfg.attn_logit_softcapping or 0.0  # Gemma 2's attention score cap (0: none)
        self.input_norm = empty(h)
        self.qkv = linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        # HF's Llama and Qwen3 bias o_proj too under attention_bias; Qwen2's q/k/v biases leave it without
        self.o_proj = linear(self.q_size, h, bias=cfg.attention_bias
                             and cfg.architecture not in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"))
        # Qwen3: RMSNorm weights over each q and k head, applied before rotary (attend)
        self.q_norm = empty(d) if cfg.qk_norm else None
        self.k_norm = empty(d) if cfg.qk_norm else None
        self.post_attn_norm = empty(h)
        # a MoE layer has no dense MLP (gate_up / down None: neither fused path takes it)
        self.moe = MoE(cfg, dtype, device, kind) if moe else None
        self.gate_up = None if moe else linear(h, 2 * cfg.intermediate_size)
        self.down = None if moe else linear(cfg.intermediate_size, h)
        # [k_scale, v_scale] of an FP8 KV cache (unused otherwise); see make_kv_caches.
        self.kv_scale = torch.ones(2, dtype=torch.float32, device=device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttnMetadata, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden, residual: [num_tokens, hidden_size]
        if self.fp8_quant_fusable and fp8_fused_quant_enabled():
            return self.forward_fp8(hidden, residual, kv_cache, meta, cos_sin)
        if residual is None:
            residual = hidden
            hidden = ops.rms_norm(hidden, self.input_norm, self.eps)
        else:
            ops.fused_add_rms_norm(hidden, residual, self.input_norm, self.eps)
        hidden = self.o_proj_out(self.attention(hidden, kv_cache, meta, cos_sin))
        ops.fused_add_rms_norm(hidden, residual, self.post_attn_norm, self.eps)
        if self.moe is not None:
            return self.moe(hidden, decode=meta.is_decode), residual
        hidden = self.down(gate_up_silu_mul(self.gate_up, hidden))  # silu_and_mul(gate_up(hidden)), fused on decode
        return hidden, residual

    def forward_fused(self, residual: torch.Tensor, sq_sums: torch.Tensor, kv_cache: torch.Tensor,
                      meta: AttnMetadata, cos_sin: torch.Tensor, next_weight: torch.Tensor | None = None,
                      prefetch_bytes: int = 0) -> torch.Tensor:
        """forward() with the residual adds and RMSNorms inside the GEMVs (the module docstring):
        residual [T, hidden] with the sums of squares of its rows per 16 columns (sq_sums: from the
        embedding or the previous layer) is updated in place; returns the sums of its new rows.
        prefetch_bytes > 0: each GEMV asks L2 for that many bytes of the next one's weight as it
        finishes (twice as many across attention; the down projection's next is next_weight, the
        next layer's q/k/v or the LM head); no result changes."""
        def prefetch(weight: torch.Tensor | None, swiglu: bool = False, scale: int = 1):
            if not prefetch_bytes or weight is None:
                return None
            return ops.GemvPrefetch(weight, scale * prefetch_bytes, swiglu)

        to_o = prefetch(self.o_proj.weight, scale=2)  # attention runs in between and reads little
        qkv_w, o_w, gate_up_w, down_w = self.qkv, self.o_proj, self.gate_up, self.down  # FP8: W8A16 (weight_scale)
        if kv_cache.dtype != FP8 and self.head_dim % 16 == 0 and cos_sin.shape[1] == self.head_dim \
                and self.q_norm is None and fused_rope_enabled():
            q = ops.dense_gemv_rope_cache(residual, qkv_w.weight, meta.positions, cos_sin, kv_cache,
                                          meta.slot_mapping, self.num_heads, qkv_w.bias, sq_sums, self.input_norm,
                                          self.eps, check_indices=False, prefetch=to_o, weight_scale=qkv_w.weight_scale)
            attn = self.attend_rotated(q, kv_cache, meta, None)
        else:
            qkv = ops.rms_norm_dense_gemv(residual, sq_sums, self.input_norm, self.eps, qkv_w.weight, qkv_w.bias,
                                          prefetch=to_o, weight_scale=qkv_w.weight_scale)
            attn = self.attend(qkv, kv_cache, meta, cos_sin)
        sq_sums = ops.dense_gemv_add_residual(attn.reshape(attn.shape[0], self.q_size), o_w.weight, residual,
                                              o_w.bias, prefetch=prefetch(gate_up_w.weight, swiglu=True),
                                              weight_scale=o_w.weight_scale)
        act = ops.rms_norm_dense_gemv(residual, sq_sums, self.post_attn_norm, self.eps, gate_up_w.weight,
                                      silu_mul=True, prefetch=prefetch(down_w.weight),
                                      weight_scale=gate_up_w.weight_scale)
        return ops.dense_gemv_add_residual(act, down_w.weight, residual, down_w.bias,
                                           prefetch=prefetch(next_weight), weight_scale=down_w.weight_scale)

    def forward_fp8(self, hidden: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                    meta: AttnMetadata, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() of a layer whose q/k/v, gate / up and down projections are FP8: the two norms and
        the SwiGLU write their GEMMs' per-token FP8 inputs directly (one kernel each instead of the op
        and fp8_quantize_per_token), the same bits as forward(). hidden is not normalized in place."""
        dtype = hidden.dtype
        if residual is None:
            residual = hidden
            q, scales = ops.rms_norm_quant_fp8(hidden, self.input_norm, self.eps)
        else:
            q, scales = ops.rms_norm_quant_fp8(hidden, self.input_norm, self.eps, residual=residual)
        hidden = self.o_proj_out(self.attend(self.qkv.fp8_mm(q, scales, dtype), kv_cache, meta, cos_sin))
        q, scales = ops.rms_norm_quant_fp8(hidden, self.post_attn_norm, self.eps, residual=residual)
        q, scales = ops.silu_and_mul_quant_fp8(self.gate_up.fp8_mm(q, scales, dtype))
        return self.down.fp8_mm(q, scales, dtype), residual

    # A subclass whose forward is not Llama's block (Gemma 2/3, OLMo-2: other norm placements) sets this;
    # the fused forwards below compose Llama's block and then never run it.
    llama_block = True

    @property
    def fp8_quant_fusable(self) -> bool:
        """Whether forward_fp8 can run this layer: FP8 q/k/v, gate / up and down (o_proj quantizes the
        attention output itself, whatever it is)."""
        return self.llama_block and all(isinstance(p, Linear) and p.weight_scale is not None
                                        for p in (self.qkv, self.gate_up, self.down))

    @property
    def fusable_norms(self) -> bool:
        """Whether forward_fused can run this layer: dense 16-bit projections (or, with
        FASTINFER_FP8_DECODE=w8a16, FP8 ones with K % 16 == 0), gate / up without bias."""
        projections = (self.qkv, self.o_proj, self.gate_up, self.down)
        if not self.llama_block or not all(isinstance(p, Linear) for p in projections):
            return False
        fp8 = [p.weight_scale is not None for p in projections]
        if any(fp8) and not (all(fp8) and fp8_decode_mode() == "w8a16"
                             and all(p.in_features % 16 == 0 for p in projections)):
            return False
        return (self.gate_up.bias is None and self.gate_up.out_features % 16 == 0
                and all(p.in_features % 8 == 0 for p in projections))

    def attention(self, hidden: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                  cos_sin: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(hidden), kv_cache, meta, cos_sin)

    def attend(self, qkv: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
               cos_sin: torch.Tensor) -> torch.Tensor:
        """Rotary, KV-cache write and attention of the q/k/v projection's output qkv [T, (H + 2 Hkv) D]
        (Qwen3: each q and k head RMS-normalized first in the same kernel, as HF's q_norm / k_norm)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        kv_scale = self.kv_scale if kv_cache.dtype == FP8 else None
        ops.rotary_embedding_and_cache(meta.positions, q, k, v, cos_sin, kv_cache, meta.slot_mapping,
                                       check_indices=False, kv_scale=kv_scale, q_norm=self.q_norm,
                                       k_norm=self.k_norm, norm_eps=self.eps)
        return self.attend_rotated(q, kv_cache, meta, kv_scale)

    def attend_rotated(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                       kv_scale: torch.Tensor | None) -> torch.Tensor:
        """Attention of rotated queries q [T, H, D] over kv_cache, which holds this step's K / V."""
        if meta.is_decode:
            return ops.paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, self.scale,
                                              check_indices=False, kv_scale=kv_scale,
                                              semaphores=meta.decode_semaphores, window=self.window,
                                              softcap=self.softcap)
        return ops.paged_prefill_attention(q, kv_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                                           self.scale, check_indices=False, kv_scale=kv_scale, window=self.window,
                                           softcap=self.softcap)

    def o_proj_out(self, attn: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn.reshape(attn.shape[0], self.q_size))


class LlamaForCausalLM:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 quantization: str | QuantConfig | None = None):
        """quantization: None (the checkpoint's: an FP8 quantization_config, or dense), "fp8" (FP8
        linear layers; a float checkpoint is quantized while loading) or a QuantConfig (4-bit
        projections; fastinfer.load_model builds it from "int4" / "gptq" / "awq" / "gguf")."""
        kind = linear_kind(quantization if quantization is not None else cfg.quantization)
        if cfg.quantization == "fp8" and kind != "fp8":
            raise ValueError(f"the checkpoint is FP8 (config.json quantization_config); it cannot load with "
                             f"quantization={getattr(kind, 'method', kind)!r}")
        self.config = cfg
        self.quant = kind if isinstance(kind, QuantConfig) else None  # the 4-bit config, else None
        self.dtype = dtype or cfg.dtype
        self.device = torch.device(device)
        self.quantization = kind.method if isinstance(kind, QuantConfig) else kind  # None, "fp8" or a 4-bit method
        if self.device.type == "cuda" and (cfg.head_dim not in (64, 128, 256) or (
                cfg.head_dim == 256 and self.dtype == torch.float32)):
            hint = "dtype=torch.bfloat16 or device='cpu'" if cfg.head_dim == 256 else "device='cpu'"
            raise ValueError(f"head_dim {cfg.head_dim} in {self.dtype}: fastinfer's CUDA attention kernels support "
                             f"head_dim 64 and 128, and 256 in bfloat16 / float16; load this model with {hint}")
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, device=self.device)
        layer_class = LlamaLayer
        self.gemma = cfg.architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
        if cfg.architecture == "Olmo2ForCausalLM":  # post-norm layers (models/olmo2.py)
            from .olmo2 import Olmo2Layer
            layer_class = Olmo2Layer
        elif self.gemma:  # Gemma's norms, GeLU, Gemma 3's two rope tables, Gemma 2's score cap (models/gemma.py)
            from .gemma import GemmaLayer
            layer_class = GemmaLayer
        self.layers = [layer_class(cfg, self.dtype, self.device, kind, window=cfg.attention_window(i),
                                   moe=i in cfg.moe_layers) for i in range(cfg.num_layers)]
        # Gemma's final norm weight is 1 + w in fp32 (models/gemma.py)
        self.norm = torch.empty(cfg.hidden_size, dtype=torch.float32 if self.gemma else self.dtype, device=self.device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else torch.empty_like(self.embed)
        # [max_position, rotary_dim]: Phi-3's partial rotary rotates the first rotary_dim features of a head
        self.cos_sin = cos_sin_cache(cfg.rotary_dim or cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                     cfg.rope_scaling, self.device)
        if self.gemma:  # Gemma 3's sliding-window layers rotate with their own table
            local = self.cos_sin if cfg.local_rope_theta is None else cos_sin_cache(
                cfg.head_dim, cfg.max_position_embeddings, cfg.local_rope_theta, cfg.local_rope_scaling, self.device)
            for layer in self.layers:
                layer.cos_sin = local if layer.window else self.cos_sin

    @torch.inference_mode()
    def forward(self, meta: AttnMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """fp32 logits [num_logits, vocab] for the rows in meta.logits_indices."""
        t, eps = meta.input_ids.shape[0], self.config.rms_norm_eps
        if self.fuse_norms(t):
            # the embedding rows and their sums of squares: the first layer's norm runs in its q/k/v GEMV
            residual, sq_sums = ops.embedding(meta.input_ids, self.embed, return_sq_sums=True, check_indices=False)
            budget = gemv_prefetch_bytes()
            # each layer's down projection prefetches the next layer's q/k/v weight, the last one the LM head's
            next_weights = [layer.qkv.weight for layer in self.layers[1:]] + [self.lm_head]
            for layer, kv_cache, next_weight in zip(self.layers, kv_caches, next_weights):
                sq_sums = layer.forward_fused(residual, sq_sums, kv_cache, meta, self.cos_sin, next_weight, budget)
            if meta.logits_all_rows:  # the final norm in the LM head, fp32 logits of every row, in order
                return self._scaled(ops.rms_norm_dense_gemv(residual, sq_sums, self.norm, eps, self.lm_head,
                                                            out_dtype=torch.float32))
            hidden = ops.rms_norm(residual, self.norm, eps)
        else:
            hidden, residual = ops.embedding(meta.input_ids, self.embed, check_indices=False), None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward(hidden, residual, kv_cache, meta, self.cos_sin)
            ops.fused_add_rms_norm(hidden, residual, self.norm, eps)  # (Gemma's norm weight: fp32 1 + w)
        return self._scaled(dense_linear(hidden[meta.logits_indices], self.lm_head).float())

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma's cap * tanh(logits / cap), or Granite's logits / logits_scaling. HF computes both on its model-dtype
        logits (the LM head's output, which these fp32 logits hold exactly), rounding each step to that dtype: so
        does this."""
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma: cap * tanh(logits / cap), each step in the model dtype as HF's
            logits = logits.to(self.dtype)
            return (torch.tanh(logits / cap) * cap).float()
        s = self.config.logits_scaling
        if s == 1.0:
            return logits
        logits.div_(s)
        return logits if self.dtype == torch.float32 else logits.to(self.dtype).float()

    def decode_graph_safe(self, batch: int) -> bool:
        """Whether decode steps of up to `batch` sequences avoid host syncs, so a CUDA graph can hold them:
        always, except MoE layers whose routing reads the step's data back (models/moe.py: the moe_gemv
        path does not)."""
        return all(layer.moe is None or layer.moe.gemv_ok(batch, self.device, self.dtype, decode=True)
                   for layer in self.layers)

    def fuse_norms(self, num_tokens: int) -> bool:
        """Whether a step of num_tokens runs the layers' forward_fused (the module docstring):
        FASTINFER_FUSED_NORM is not 0, at most ops.GEMV_NORM_MAX_M tokens, every projection (the LM head
        too) dense and on the decode GEMV. Checked at every call: GPTQ calibration swaps projections for
        recorders (quant/gptq.py)."""
        if not (1 <= num_tokens <= ops.GEMV_NORM_MAX_M and fused_norms_enabled()):
            return False
        cfg = self.config
        return (all(_linear.use_dense_gemv(self.device, num_tokens, k, self.dtype)
                    for k in (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size))
                and self.lm_head.dtype == self.dtype and all(layer.fusable_norms for layer in self.layers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be filled exactly
        (models/llama_weights.py)."""
        cfg = self.config
        if cfg.text_of_multimodal:  # a multimodal checkpoint: its text model's tensors, renamed
            weights = llama_weights.text_weights(weights)
        if cfg.residual_multiplier != 1.0:  # Granite: folded into the projections that feed the residual adds
            weights = llama_weights.residual_scaled(weights, cfg.residual_multiplier)
        llama_weights.load_weights(self, weights)
        multiplier = cfg.embedding_multiplier
        if self.gemma:  # norms to 1 + w, the embedding scale rounded (models/gemma.py)
            from .gemma import finish_gemma_weights
            multiplier = finish_gemma_weights(self)
        if multiplier != 1.0:  # Granite, Gemma: the embedding rows scaled as HF scales them (one rounding)
            if self.lm_head is self.embed:  # tied: the LM head keeps the unscaled rows
                self.lm_head = self.embed.clone()
            self.embed.mul_(multiplier)

    def make_kv_caches(self, num_blocks: int, block_size: int, kv_cache_dtype: str | None = None) -> list[torch.Tensor]:
        """One [num_blocks, 2, block_size, num_kv_heads, head_dim] cache per layer.

        kv_cache_dtype "fp8": float8_e4m3fn storage, each layer's K and V scaled by its kv_scale
        (1.0 unless the checkpoint ships k_scale / v_scale, see fastinfer.quant.fp8).
        """
        cfg = self.config
        shape = (num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = kv_cache_storage_dtype(kv_cache_dtype, self.dtype, self.device, cfg.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]


KV_CACHE_DTYPES = ("auto", "fp8")


def kv_cache_storage_dtype(kv_cache_dtype: str | None, model_dtype: torch.dtype, device: torch.device,
                           head_dim: int = 128) -> torch.dtype:
    """The cache tensors' dtype for a kv_cache_dtype name ("auto"/None: the model's dtype); on CUDA an e4m3 cache
    needs a 16-bit model and head_dim 64 or 128 (the attention kernels that read one)."""
    if kv_cache_dtype in (None, "auto"):
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if device.type == "cuda" and model_dtype not in (torch.bfloat16, torch.float16):
        # The CUDA attention kernels over an e4m3 cache exist for bf16 / fp16 queries only.
        raise ValueError(f"kv_cache_dtype='fp8' on CUDA needs a bfloat16 or float16 model, got {model_dtype}")
    if device.type == "cuda" and head_dim not in (64, 128):
        raise ValueError(f"kv_cache_dtype='fp8' on CUDA needs head_dim 64 or 128, got {head_dim}")
    return FP8
