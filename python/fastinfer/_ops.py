"""Validating wrappers around ``torch.ops.fastinfer.*``.

Every public op checks dtypes, devices, shapes, strides and index ranges here and raises a
``ValueError`` naming the offending argument before any kernel runs, so a kernel never sees an
input that can index out of bounds. Index checks (slots, block tables) read the index tensors on
the host; the model runner validates its metadata once per step and passes ``check_indices=False``
to skip the per-layer device sync. The FP8 ops live in _ops_fp8.py, the 4-bit and decode-sized
dense linear ops in _ops_linear.py, speculative_verify in _ops_spec.py; all are re-exported here.
"""
from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.fastinfer.*)
from ._checks import (FLOAT_DTYPES, FP8, _check, _check_float, _check_kv_cache,  # noqa: F401
                      _check_positions_in, _check_shape, _check_slots_in, _fail, _ops)
from ._ops_fp8 import (FP8_MAX, FP8_MIN_SCALE, FP8_OP_NAMES, fp8_linear,  # noqa: F401  (re-exported)
                       fp8_quantize_per_tensor, fp8_quantize_per_token, fp8_scaled_mm, rms_norm_quant_fp8,
                       silu_and_mul_quant_fp8)
from ._ops_linear import (GEMV_FP8_MAX_M, GEMV_MAX_M, GEMV_NORM_MAX_M, INT4_GROUP_SIZES, SQ_SUM_GROUP,  # noqa: F401  (re-exported)
                          GemvPrefetch, dense_gemv, dense_gemv_add_residual, dense_gemv_rope_cache, dense_gemv_silu_mul, int4_linear,
                          rms_norm_dense_gemv, sq_sum_groups)
from ._ops_moe import MOE_GEMV_MAX_PAIRS, moe_gemv, moe_int4_linear  # noqa: F401  (re-exported)
from ._ops_spec import SPEC_MAX_VOCAB, speculative_verify  # noqa: F401  (re-exported)


# ---- layers ---------------------------------------------------------------------------------------

def embedding(input_ids: torch.Tensor, weight: torch.Tensor, return_sq_sums: bool = False,
              check_indices: bool = True, out: torch.Tensor | None = None):
    """out [num_tokens, hidden] = weight[input_ids] (weight [vocab, hidden], contiguous). With
    return_sq_sums also float32 [num_tokens, ceil(hidden / 16)]: each row's sums of squares over 16
    columns, which rms_norm_dense_gemv takes for the first layer's RMSNorm; returns (out, sq_sums).
    check_indices=False skips the host-side range check of input_ids (the engine validates prompts)."""
    op = "embedding"
    _check(op, "input_ids", input_ids, ndim=1, dtype=torch.int64, contiguous=True)
    _check_float(op, "weight", weight, ndim=2)
    _check(op, "weight", weight, device=input_ids.device, contiguous=True)
    num_tokens, (vocab, hidden) = input_ids.shape[0], weight.shape
    if check_indices and num_tokens:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            _fail(op, f"input_ids must lie in [0, {vocab}) (the vocabulary), got [{lo}, {hi}]")
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=weight.dtype, device=weight.device)
    _check_float(op, "out", out, like=weight, ndim=2)
    _check_shape(op, "out", out, (num_tokens, hidden))
    if out.stride(1) != 1:
        _fail(op, "out rows must be contiguous")
    sq_sums = torch.empty(num_tokens, sq_sum_groups(hidden), dtype=torch.float32, device=weight.device) \
        if return_sq_sums else None
    _ops.embedding(out, sq_sums, input_ids, weight)
    return (out, sq_sums) if return_sq_sums else out


def rms_norm(input: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = input * rsqrt(mean(input^2) + eps) * weight, per row, in fp32 and rounded once. input: [num_tokens,
    hidden]; weight: [hidden] in input's dtype, or fp32 (not rounded to input's dtype: Gemma's 1 + w)."""
    op = "rms_norm"
    _check_float(op, "input", input, ndim=2)
    _check(op, "weight", weight, ndim=1, dtype=(input.dtype, torch.float32), device=input.device, contiguous=True)
    _check_shape(op, "weight", weight, (input.shape[1],))
    if out is None:
        out = torch.empty_like(input, memory_format=torch.contiguous_format)
    _check_float(op, "out", out, like=input, ndim=2)
    _check_shape(op, "out", out, input.shape)
    _ops.rms_norm(out, input, weight, float(eps))
    return out


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += input; input = rms_norm(residual) * weight. Both [num_tokens, hidden]; weight as
    rms_norm's (input's dtype or fp32)."""
    op = "fused_add_rms_norm"
    _check_float(op, "input", input, ndim=2)
    _check_float(op, "residual", residual, like=input, ndim=2)
    _check_shape(op, "residual", residual, input.shape)
    _check(op, "weight", weight, ndim=1, dtype=(input.dtype, torch.float32), device=input.device, contiguous=True)
    _check_shape(op, "weight", weight, (input.shape[1],))
    _ops.fused_add_rms_norm(input, residual, weight, float(eps))


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, check_indices: bool = True) -> None:
    """NeoX-style rotary embedding in place on query [T, H, D] and key [T, Hkv, D].

    cos_sin_cache: fp32 [max_position, rotary_dim], cos in the first half of a row, sin in the second.
    """
    _check_rotary("rotary_embedding", positions, query, key, cos_sin_cache, check_indices)
    _ops.rotary_embedding(positions, query, key, cos_sin_cache)


def _check_rotary(op: str, positions, query, key, cos_sin_cache, check_indices: bool) -> None:
    _check_float(op, "query", query, ndim=3)
    _check_float(op, "key", key, like=query, ndim=3)
    _check(op, "positions", positions, ndim=1, dtype=torch.int64, device=query.device)
    _check(op, "cos_sin_cache", cos_sin_cache, ndim=2, dtype=torch.float32, device=query.device, contiguous=True)
    num_tokens, _, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim:
        _fail(op, f"key must be [{num_tokens}, num_kv_heads, {head_dim}], got {tuple(key.shape)}")
    _check_shape(op, "positions", positions, (num_tokens,))
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        _fail(op, f"cos_sin_cache rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    if check_indices:
        _check_positions_in(op, positions, cos_sin_cache)


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu(input[:, :d]) * input[:, d:]. input: [num_tokens, 2 d]."""
    return _act_and_mul("silu_and_mul", input, out)


def _act_and_mul(op: str, input: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """silu_and_mul / gelu_tanh_and_mul: input [num_tokens, 2 d] = [gate | up] -> out [num_tokens, d]."""
    _check_float(op, "input", input, ndim=2)
    if input.shape[1] % 2:
        _fail(op, f"input's last dimension must be even ([gate | up]), got {input.shape[1]}")
    shape = (input.shape[0], input.shape[1] // 2)
    if out is None:
        out = torch.empty(shape, dtype=input.dtype, device=input.device)
    _check_float(op, "out", out, like=input, ndim=2)
    _check_shape(op, "out", out, shape)
    getattr(_ops, op)(out, input)
    return out


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = gelu_tanh(input[:, :d]) * input[:, d:] (Gemma's MLP: HF's gelu_pytorch_tanh), in fp32, rounded once.
    input: [num_tokens, 2 d]."""
    return _act_and_mul("gelu_tanh_and_mul", input, out)


def argmax_rows(input: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(input, dim=-1) of fp32 rows: the index of each row's first maximum (of its first NaN
    if it has one), int64 [rows]. The greedy sampler's token pick: on a GPU one CTA per row."""
    op = "argmax_rows"
    _check(op, "input", input, ndim=2, dtype=torch.float32)
    if input.shape[1] == 0:
        _fail(op, "input must have at least one column")
    if out is None:
        out = torch.empty(input.shape[0], dtype=torch.int64, device=input.device)
    _check(op, "out", out, ndim=1, dtype=torch.int64, device=input.device)
    _check_shape(op, "out", out, (input.shape[0],))
    _ops.argmax_rows(out, input)
    return out


# ---- paged KV cache -------------------------------------------------------------------------------

def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      check_indices: bool = True, kv_scale: torch.Tensor | None = None) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their slots; slot -1 is skipped.

    An FP8 (float8_e4m3fn) kv_cache needs kv_scale, fp32 [k_scale, v_scale]: it stores
    e4m3(clamp(key / k_scale, +-448)) and likewise for value.
    """
    if _check_cache_write("reshape_and_cache", key, value, kv_cache, slot_mapping, check_indices, kv_scale):
        _ops.reshape_and_cache_fp8(key, value, kv_cache, slot_mapping, kv_scale)
    else:
        _ops.reshape_and_cache(key, value, kv_cache, slot_mapping)


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                               check_indices: bool = True, kv_scale: torch.Tensor | None = None,
                               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                               norm_eps: float = 0.0) -> None:
    """rotary_embedding(positions, query, key, cos_sin_cache) then reshape_and_cache(key, value, ...)
    in one kernel: query and key are rotated in place, the rotated key and value are cached.
    q_norm, k_norm ([head_dim] weights, Qwen3's): each query / key head is first replaced by
    rms_norm(head, q_norm or k_norm, norm_eps), in place."""
    op = "rotary_embedding_and_cache"
    _check_rotary(op, positions, query, key, cos_sin_cache, check_indices)
    fp8 = _check_cache_write(op, key, value, kv_cache, slot_mapping, check_indices, kv_scale)
    if (q_norm is None) != (k_norm is None):
        _fail(op, "q_norm and k_norm must be given together (per-head RMSNorm weights of query and key)")
    if q_norm is not None:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            _check(op, name, w, ndim=1, dtype=query.dtype, device=query.device, contiguous=True)
            _check_shape(op, name, w, (query.shape[2],))
        if not (isinstance(norm_eps, (int, float)) and 0 <= norm_eps < math.inf):
            _fail(op, f"norm_eps must be a finite number >= 0, got {norm_eps!r}")
    _ops.rotary_embedding_and_cache(positions, query, key, value, cos_sin_cache, kv_cache, slot_mapping,
                                    kv_scale if fp8 else None, q_norm, k_norm, float(norm_eps))


def _check_cache_write(op: str, key, value, kv_cache, slot_mapping, check_indices: bool, kv_scale) -> bool:
    """Validates a KV write; True for an FP8 cache."""
    _check_float(op, "key", key, ndim=3)
    _check_float(op, "value", value, like=key, ndim=3)
    _check_shape(op, "value", value, key.shape)
    fp8 = _check_kv_cache(op, kv_cache, key, kv_scale)
    if tuple(kv_cache.shape[3:]) != tuple(key.shape[1:]):
        _fail(op, f"kv_cache heads/head_dim {tuple(kv_cache.shape[3:])} do not match key's {tuple(key.shape[1:])}")
    _check(op, "slot_mapping", slot_mapping, ndim=1, dtype=torch.int64, device=key.device)
    _check_shape(op, "slot_mapping", slot_mapping, (key.shape[0],))
    if check_indices:
        _check_slots_in(op, slot_mapping, kv_cache)
    return fp8


# ---- attention ------------------------------------------------------------------------------------

def _check_attention_common(op: str, query, kv_cache, kv_scale, block_tables, seq_lens, batch: int) -> bool:
    fp8 = _check_kv_cache(op, kv_cache, query, kv_scale)
    if fp8 and query.device.type == "cuda" and query.dtype not in (torch.bfloat16, torch.float16):
        _fail(op, f"query must be torch.bfloat16 or torch.float16 over an {FP8} kv_cache on CUDA, got {query.dtype}")
    heads, head_dim = query.shape[1], query.shape[2]
    if query.device.type == "cuda" and head_dim not in (64, 128, 256):
        # (checked here, not only in C++: a C++ error on this path once took a test process down on
        # an H200, inside torch's backtrace capture)
        _fail(op, f"the CUDA kernels support head_dim 64, 128 and 256, got {head_dim} (query.shape[2])")
    if query.device.type == "cuda" and head_dim == 256 and (fp8 or query.dtype == torch.float32):
        _fail(op, f"head_dim 256 runs on CUDA with bfloat16 / float16 queries over a 16-bit kv_cache only, got "
                  f"{query.dtype} over {kv_cache.dtype}")
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        _fail(op, f"kv_cache head_dim {kv_cache.shape[4]} does not match query's {head_dim}")
    if heads % num_kv_heads:
        _fail(op, f"query heads ({heads}) must be a multiple of kv_cache's num_kv_heads ({num_kv_heads})")
    _check(op, "block_tables", block_tables, ndim=2, dtype=torch.int32, device=query.device)
    _check(op, "seq_lens", seq_lens, ndim=1, dtype=torch.int32, device=query.device)
    _check_shape(op, "seq_lens", seq_lens, (batch,))
    if block_tables.shape[0] != batch:
        _fail(op, f"block_tables must have {batch} rows (one per sequence), got {block_tables.shape[0]}")
    return fp8


def _check_window(op: str, window) -> int:
    """An attention op's sliding window as the kernels' int: None -> 0 (full attention)."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        _fail(op, f"window must be a non-negative integer or None (0 / None: full attention), got {window!r}")
    return window


def _check_softcap(op: str, softcap) -> float:
    """An attention op's score soft-cap (Gemma 2): None / 0 -> 0.0 (none), else a finite positive number."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        _fail(op, f"softcap must be a finite number >= 0 or None (0 / None: no soft-capping), got {softcap!r}")
    return float(softcap)


def _check_attention_indices(op: str, kv_cache, block_tables, seq_lens, min_len: int) -> None:
    """Host-side: each sequence's length fits its table, and every block it uses exists."""
    lens = seq_lens.cpu()
    block_size, num_blocks = kv_cache.shape[2], kv_cache.shape[0]
    capacity = block_tables.shape[1] * block_size
    if lens.numel() and (int(lens.min()) < min_len or int(lens.max()) > capacity):
        _fail(op, f"seq_lens must lie in [{min_len}, {capacity}] (block table capacity), "
                  f"got [{int(lens.min())}, {int(lens.max())}]")
    used = (lens.to(torch.int64) + block_size - 1) // block_size
    mask = torch.arange(block_tables.shape[1]) < used[:, None]
    tables = block_tables.cpu()[mask]
    if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= num_blocks):
        _fail(op, f"block_tables entries in use must lie in [0, {num_blocks}), got "
                  f"[{int(tables.min())}, {int(tables.max())}]")


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None, check_indices: bool = True,
                            kv_scale: torch.Tensor | None = None, return_lse: bool = False,
                            lse: torch.Tensor | None = None, window: int | None = None,
                            softcap: float | None = None):
    """Causal varlen attention over the paged cache (K/V already written for every position).

    query: [num_tokens, num_heads, head_dim]; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
    which are the last tokens of its seq_lens[b]-token context. Returns [num_tokens, num_heads, head_dim].
    An FP8 kv_cache is read as e4m3 * kv_scale ([k_scale, v_scale], fp32).
    return_lse (or an `lse` tensor to fill): also the log-sum-exp of each row's scaled scores,
    log(sum_j exp(scale * q . k_j)) over its visible keys, fp32 [num_tokens, num_heads] (what merging
    the outputs of attention over disjoint key ranges needs); then returns (out, lse).
    window (sliding-window attention, HF's ``sliding_window``): a query at position p sees only keys
    p - window < j <= p; None or 0: all keys up to p.
    softcap (Gemma 2's attn_logit_softcapping): each score s = scale * q . k becomes softcap * tanh(s / softcap)
    before the softmax (and in the log-sum-exp); None or 0: none. On a GPU the mma.sync kernel runs then.
    """
    op = "paged_prefill_attention"
    window = _check_window(op, window)
    softcap = _check_softcap(op, softcap)
    _check_float(op, "query", query, ndim=3)
    _check(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtype=torch.int32, device=query.device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        _fail(op, "cu_seqlens_q must have batch + 1 entries, got 0")
    fp8 = _check_attention_common(op, query, kv_cache, kv_scale, block_tables, seq_lens, batch)
    if check_indices:
        cu = cu_seqlens_q.cpu().to(torch.int64)
        q_lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != query.shape[0] or (q_lens < 0).any():
            _fail(op, f"cu_seqlens_q must rise from 0 to num_tokens={query.shape[0]}, got {cu.tolist()[:8]}...")
        if (q_lens > seq_lens.cpu().to(torch.int64)).any():
            _fail(op, "seq_lens must be >= each sequence's query length (cu_seqlens_q differences)")
        _check_attention_indices(op, kv_cache, block_tables, seq_lens, min_len=0)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _check_float(op, "out", out, like=query, ndim=3)
    _check_shape(op, "out", out, query.shape)
    if return_lse and lse is None:
        lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    if lse is not None:
        _check(op, "lse", lse, ndim=2, dtype=torch.float32, device=query.device, contiguous=True)
        _check_shape(op, "lse", lse, query.shape[:2])
    if fp8:
        _ops.paged_prefill_attention_fp8(out, query, kv_cache, kv_scale, cu_seqlens_q, seq_lens, block_tables,
                                         float(scale), lse, window, softcap)
    else:
        _ops.paged_prefill_attention(out, query, kv_cache, cu_seqlens_q, seq_lens, block_tables, float(scale), lse,
                                     window, softcap)
    return (out, lse) if lse is not None else out


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                           check_indices: bool = True, kv_scale: torch.Tensor | None = None,
                           semaphores: torch.Tensor | None = None, window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence over its seq_lens[b] cached tokens. query: [batch, num_heads, head_dim].
    An FP8 kv_cache is read as e4m3 * kv_scale ([k_scale, v_scale], fp32).
    semaphores: int32 [>= batch * num_heads] on query's device, all zero (allocate once with
    torch.zeros and keep: every launch leaves them zero; not concurrently by two launches). With them
    the CUDA kernel merges its split-KV partial results in the last CTA of each group of splits
    instead of a second kernel (FASTINFER_DECODE_MERGE=kernel: the second kernel anyway); the
    result is the same bit for bit. The CPU ignores them.
    window (sliding-window attention): each query sees only its sequence's last `window` keys; None or
    0: all of them. softcap: as paged_prefill_attention's (on a GPU the CUDA-core kernel runs then)."""
    op = "paged_decode_attention"
    window = _check_window(op, window)
    softcap = _check_softcap(op, softcap)
    _check_float(op, "query", query, ndim=3)
    fp8 = _check_attention_common(op, query, kv_cache, kv_scale, block_tables, seq_lens, query.shape[0])
    if semaphores is not None:
        _check(op, "semaphores", semaphores, ndim=1, dtype=torch.int32, device=query.device, contiguous=True)
        if semaphores.numel() < query.shape[0] * query.shape[1]:
            _fail(op, f"semaphores must have >= batch * num_heads = {query.shape[0] * query.shape[1]} elements, "
                      f"got {semaphores.numel()}")
    if check_indices:
        _check_attention_indices(op, kv_cache, block_tables, seq_lens, min_len=1)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _check_float(op, "out", out, like=query, ndim=3)
    _check_shape(op, "out", out, query.shape)
    if fp8:
        _ops.paged_decode_attention_fp8(out, query, kv_cache, kv_scale, block_tables, seq_lens, float(scale), semaphores,
                                        window, softcap)
    else:
        _ops.paged_decode_attention(out, query, kv_cache, block_tables, seq_lens, float(scale), semaphores, window,
                                    softcap)
    return out


# ---- fake (meta) implementations: every op writes its outputs in place and returns nothing --------

# MODEL_OP_NAMES: what the default (unquantized) model runs; a device is used by default only when
# it implements all of them. The FP8 ops serve `quantization="fp8"` and `kv_cache_dtype="fp8"`,
# int4_linear the 4-bit quantizations, speculative_verify the engine's speculative decoding.
# dense_gemv (and dense_gemv_silu_mul for gate / up) runs the dense projections of decode steps on
# CUDA (models/linear.py: use_dense_gemv); dense_gemv_add_residual, rms_norm_dense_gemv and
# dense_gemv_rope_cache the same with the residual add + RMSNorm and the rotary + KV write fused in
# (models/llama.py: fuse_norms).
MODEL_OP_NAMES = ("embedding", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
                  "reshape_and_cache", "rotary_embedding_and_cache", "paged_prefill_attention", "paged_decode_attention",
                  "dense_gemv", "dense_gemv_silu_mul", "dense_gemv_add_residual", "rms_norm_dense_gemv",
                  "dense_gemv_rope_cache")
OP_NAMES = MODEL_OP_NAMES + ("speculative_verify", "int4_linear", "moe_gemv", "moe_int4_linear", "gelu_tanh_and_mul") + FP8_OP_NAMES


def _register_fakes() -> None:
    for name in OP_NAMES:
        torch.library.register_fake(f"fastinfer::{name}")(lambda *args, **kwargs: None)


_register_fakes()
