"""Independent torch references for the fastinfer ops; they never call a fastinfer op.

Every reference takes ``dtype``, the precision it computes in: fp32 (fp64 when the inputs are
already fp32) gives the reference the kernels are judged against; the inputs' own dtype gives the
"same-dtype torch implementation" whose error sets the tolerance (DESIGN.md, Tests).
They are written the way the model codebases write them (HF transformers' Llama), not the way the
kernels do, so that a shared misunderstanding shows up as a failure.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x: [num_tokens, hidden], weight: [hidden] -> [num_tokens, hidden] in ``dtype``."""
    x = x.to(dtype)
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight.to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to the storage dtype first,
    as an unfused model stores it before normalising."""
    new_residual = x + residual  # storage dtype, like `hidden_states = residual + hidden_states`
    return rms_norm(new_residual, weight, eps, dtype), new_residual


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """fp32 [rotary_dim / 2] inverse frequencies, as HF's default rope init computes them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [num_tokens, rotary_dim] for positions [num_tokens], as HF's LlamaRotaryEmbedding."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NeoX rotation of the first rotary_dim features of x [num_tokens, heads, head_dim]; the rest
    pass through. cos, sin: [num_tokens, rotary_dim]."""
    rotary_dim = cos.shape[-1]
    x = x.to(dtype)
    cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def silu_and_mul(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [num_tokens, 2 d] = [gate | up] -> silu(gate) * up, [num_tokens, d]."""
    gate, up = x.to(dtype).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: [num_tokens, 2 d] = [gate | up] -> gelu_tanh(gate) * up (Gemma's MLP), [num_tokens, d]."""
    gate, up = x.to(dtype).chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """HF's Gemma RMSNorm with weight = 1 + w (fp32): the arithmetic in fp32 (or ``dtype`` if wider), one
    rounding to x's dtype when ``dtype`` is fp32; in ``dtype`` otherwise (the wide reference)."""
    wide = torch.promote_types(dtype, torch.float32)
    xf = x.to(wide)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(wide)
    return out.to(x.dtype) if dtype == torch.float32 else out


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """Returns a copy of kv_cache [num_blocks, 2, block_size, num_kv_heads, head_dim] with token t's
    key/value [num_tokens, num_kv_heads, head_dim] in slot slot_mapping[t]; slot -1 is skipped."""
    out = kv_cache.clone()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    out[blocks, 0, offsets] = key[keep]
    out[blocks, 1, offsets] = value[keep]
    return out


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's contiguous key, value [seq_len, num_kv_heads, head_dim] read through its
    block table row [max_blocks]."""
    block_size = kv_cache.shape[2]
    num_used = -(-seq_len // block_size)
    blocks = kv_cache[block_table[:num_used].long()]  # [num_used, 2, block_size, kv_heads, head_dim]
    keys = blocks[:, 0].flatten(0, 1)[:seq_len]
    values = blocks[:, 1].flatten(0, 1)[:seq_len]
    return keys, values


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0) -> torch.Tensor:
    """[q, k] bool: key position k_pos[j] is visible to query position q_pos[i]: causal, and with a
    sliding window (> 0) only the last `window` positions, HF's sliding_window_overlay
    (kv_idx > q_idx - window)."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    return ok


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              dtype: torch.dtype, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Causal masked-softmax attention of the LAST q_len positions of a seq_len context.

    query: [q_len, num_heads, head_dim]; key, value: [seq_len, num_kv_heads, head_dim].
    Query j sits at position seq_len - q_len + j and sees keys 0 ..= that position (with a window,
    only the last `window` of them).
    """
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    q = query.to(dtype).transpose(0, 1)                                       # [H, q_len, D]
    k = key.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)         # [H, seq_len, D]
    v = value.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale                      # [H, q_len, seq_len]
    if softcap:  # Gemma 2's attn_logit_softcapping
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    k_pos = torch.arange(seq_len, device=query.device)
    scores = scores.masked_fill(~visible(q_pos, k_pos, window), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1)                             # [q_len, H, D]


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            dtype: torch.dtype, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_dim], sequence b owning rows cu_seqlens_q[b]:[b+1]."""
    out = torch.zeros(query.shape, dtype=dtype, device=query.device)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        if cu[b + 1] == cu[b]:
            continue
        key, value = gather_kv(kv_cache, block_tables[b], seq_len)
        out[cu[b]:cu[b + 1]] = attention(query[cu[b]:cu[b + 1]], key, value, scale, dtype, window, softcap)
    return out


def paged_prefill_lse(query: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                      window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """log(sum over visible keys of exp(scale * q . k)) per query row and head, in fp64 (soft-capped scores with
    softcap):
    [num_tokens, num_heads] (rows of empty sequences do not exist; every row sees key 0)."""
    lse = torch.full(query.shape[:2], float("nan"), dtype=torch.float64, device=query.device)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    group = query.shape[1] // kv_cache.shape[3]
    for b, seq_len in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        key, _ = gather_kv(kv_cache, block_tables[b], seq_len)
        q = query[cu[b]:cu[b + 1]].double().transpose(0, 1)                          # [H, q_len, D]
        k = key.double().repeat_interleave(group, dim=1).transpose(0, 1)             # [H, seq_len, D]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores = scores.masked_fill(~visible(q_pos, k_pos, window), float("-inf"))
        lse[cu[b]:cu[b + 1]] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
    return lse


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, dtype: torch.dtype,
                           window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """One query token per sequence, query: [batch, num_heads, head_dim]."""
    cu_seqlens_q = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_prefill_attention(query, kv_cache, cu_seqlens_q, seq_lens, block_tables, scale, dtype, window,
                                   softcap)


# ---- FP8 e4m3 (the format: csrc/include/fastinfer/fp8.h) ------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale, +-448)); scale broadcasts against x (e.g. [M, 1] per row, [1] per tensor)."""
    q = (x.detach().float().cpu() / torch.as_tensor(scale).detach().float().cpu()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.to(x.device)  # divided on the CPU: IEEE quotients (see fp8_dynamic_scale)


def fp8_dynamic_scale(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """fp32 max(amax / 448, floor) over `dim` (None: the whole tensor, shape [1]), on x's device.

    Divided on the CPU: torch's CUDA tensor / scalar multiplies by the reciprocal, which can differ
    from the IEEE quotient of the contract (fp8.h) in the last bit."""
    xf = x.detach().float().cpu()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim)
    return torch.clamp(amax / FP8_MAX, min=FP8_MIN_SCALE).reshape(-1).to(x.device)


def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a [M, K] and b [N, K] (e4m3, scales [1] or per row), then a @ b.T (+ bias) in ``dtype``.

    fp32 gives the "same-dtype torch" baseline of an fp32-accumulating kernel; fp64 the reference.
    """
    a_real = a.to(dtype) * scale_a.to(dtype).reshape(-1, 1)
    b_real = b.to(dtype) * scale_b.to(dtype).reshape(-1, 1)
    out = a_real @ b_real.T
    return out if bias is None else out + bias.to(dtype)


def fp8_dequantize_kv(kv_cache: torch.Tensor, kv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An e4m3 cache [num_blocks, 2, block_size, heads, head_dim] as real K/V values in ``dtype``
    (dequantized in fp32 or fp64, then rounded to ``dtype``)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (kv_cache.to(wide) * kv_scale.to(wide).reshape(1, 2, 1, 1, 1)).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) in ``dtype``, as torch.nn.Linear computes it."""
    return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of the counts against the expected probabilities.

    Bins expecting fewer than min_expected draws (where the chi-square approximation is unreliable)
    are merged into one. Computed with torch alone (chi2's survival function is the regularized upper
    incomplete gamma Q(df / 2, stat / 2)): the GPU check machine has no scipy, and its CUDA tests
    import this module. tests/test_sampling.py checks it against scipy.stats.chisquare where scipy is.
    """
    counts = counts.double().cpu()
    expected = expected_probs.double().cpu() * counts.sum()
    large = expected >= min_expected
    observed = torch.cat([counts[large], counts[~large].sum().reshape(1)])
    expected = torch.cat([expected[large], expected[~large].sum().reshape(1)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    expected = expected * (observed.sum() / expected.sum())  # exact totals, as scipy requires
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))
