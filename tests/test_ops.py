"""Every fastinfer op against the independent references in tests/reference.py.

Tolerance (DESIGN.md): err(ours) <= 2 * err(same-dtype torch) + 1e-5, where err is the MAX ABSOLUTE
difference from the reference run in fp32 (fp64 when the inputs are fp32, so that the fp32 torch
baseline has an error of its own). Max, not mean: one wrong element (a mis-indexed head, a stale
slot) must fail, and a mean over thousands of right elements would hide it; the 2x factor on the
same-dtype baseline already scales the bound with the values' magnitude and the dtype's precision.
Exact ops (the KV write) and exact invariants (NaN poisoning, chunking) compare with torch.equal.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
NUM_TOKENS = [1, 7, 113]
# (num_heads, num_kv_heads): GQA ratios 1, 4, 8, and every query head on one KV head.
HEADS = [(4, 4), (8, 2), (16, 2), (5, 1)]
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [16, 32, 64]


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def assert_within_tolerance(ours: torch.Tensor, same_dtype: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.isfinite(ours).all(), "output has non-finite values"
    err = (ours.double() - reference.double()).abs().max().item()
    baseline = (same_dtype.double() - reference.double()).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x same-dtype torch error {baseline:.3g} + 1e-5"


def randn(*shape, dtype, device, gen, scale=1.0):
    """Drawn on the CPU with `gen`, then moved: the same numbers on every device."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def strided_rows(num_tokens: int, width: int, layout: str, **kw) -> torch.Tensor:
    """[num_tokens, width]; "strided" makes it a column slice of a wider tensor (row stride > width)."""
    pad = 24 if layout == "strided" else 0
    return randn(num_tokens, width + pad, **kw)[:, pad:]


# ---- layers: the same bodies run on CPU and (marked cuda) on the GPU -----------------------------

@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("hidden", [128, 4100])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(device, gen, dtype, num_tokens, hidden, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    x = strided_rows(num_tokens, hidden, layout, **kw)
    weight = randn(hidden, scale=0.1, **kw) + 1
    out = strided_rows(num_tokens, hidden, layout, **kw)
    ops.rms_norm(x, weight, 1e-6, out=out)
    assert_within_tolerance(out, ref.rms_norm(x, weight, 1e-6, dtype), ref.rms_norm(x, weight, 1e-6, ref_dtype(dtype)))
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), out)  # out=None allocates a contiguous result


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("hidden", [128, 4100])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, gen, dtype, num_tokens, hidden, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    x, residual = strided_rows(num_tokens, hidden, layout, **kw), strided_rows(num_tokens, hidden, layout, **kw)
    weight = randn(hidden, scale=0.1, **kw) + 1
    expected_out, expected_residual = ref.fused_add_rms_norm(x, residual, weight, 1e-6, ref_dtype(dtype))
    same_dtype_out, _ = ref.fused_add_rms_norm(x, residual, weight, 1e-6, dtype)
    ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, expected_residual)  # stored rounded to dtype, exactly as x + residual
    assert_within_tolerance(x, same_dtype_out, expected_out)


def make_cos_sin(rotary_dim: int, max_position: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's input, fp32 [max_position, rotary_dim] = [cos | sin] (built from the reference's
    inv_freq), and the inv_freq the reference recomputes cos/sin from."""
    inv_freq = ref.rope_inv_freq(rotary_dim, theta)
    cos, sin = ref.rope_cos_sin(torch.arange(max_position), inv_freq)
    half = rotary_dim // 2
    return torch.cat((cos[:, :half], sin[:, :half]), dim=-1).to(device), inv_freq


def qk_views(num_tokens, num_heads, num_kv_heads, head_dim, layout, **kw):
    """query [T, H, D] and key [T, Hkv, D]: separate tensors, views into one fused qkv projection,
    or heads padded (head stride > head_dim)."""
    if layout == "qkv":
        qkv = randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, **kw)
        return qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    pad = 16 if layout == "padded" else 0
    q = randn(num_tokens, num_heads, head_dim + pad, **kw)[..., :head_dim]
    return q, randn(num_tokens, num_kv_heads, head_dim + pad, **kw)[..., :head_dim]


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "padded"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding(device, gen, dtype, num_tokens, head_dim, rotary_dim, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    max_position, num_heads, num_kv_heads = 8192, 8, 2
    query, key = qk_views(num_tokens, num_heads, num_kv_heads, head_dim, layout, **kw)
    positions = torch.randint(max_position, (num_tokens,), generator=gen)
    positions[0] = max_position - 1
    cos_sin_cache, inv_freq = make_cos_sin(rotary_dim, max_position, 500000.0, device)
    cos, sin = ref.rope_cos_sin(positions, inv_freq)
    cos, sin, positions = cos.to(device), sin.to(device), positions.to(device)
    expected = [ref.rotary_embedding(t, cos, sin, ref_dtype(dtype)) for t in (query, key)]
    same_dtype = [ref.rotary_embedding(t, cos, sin, dtype) for t in (query, key)]
    qkv_before = query._base.clone() if layout == "qkv" else None
    ops.rotary_embedding(positions, query, key, cos_sin_cache)
    for ours, same, exp in zip((query, key), same_dtype, expected):
        assert_within_tolerance(ours, same, exp)
    if layout == "qkv":  # the value heads sharing the fused buffer are untouched
        value_heads = slice(num_heads + num_kv_heads, None)
        assert torch.equal(query._base[:, value_heads], qkv_before[:, value_heads])


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("d", [64, 5504])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, gen, dtype, num_tokens, d, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    x = strided_rows(num_tokens, 2 * d, layout, scale=3.0, **kw)
    out = strided_rows(num_tokens, d, layout, **kw)
    ops.silu_and_mul(x, out=out)
    assert_within_tolerance(out, ref.silu_and_mul(x, dtype), ref.silu_and_mul(x, ref_dtype(dtype)))
    assert torch.equal(ops.silu_and_mul(x), out)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("d", [64, 5504])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul(device, gen, dtype, num_tokens, d, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    x = strided_rows(num_tokens, 2 * d, layout, scale=3.0, **kw)
    out = strided_rows(num_tokens, d, layout, **kw)
    ops.gelu_tanh_and_mul(x, out=out)
    assert_within_tolerance(out, ref.gelu_tanh_and_mul(x, dtype), ref.gelu_tanh_and_mul(x, ref_dtype(dtype)))
    assert torch.equal(ops.gelu_tanh_and_mul(x), out)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("hidden", [128, 4100])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_rms_norm_fp32_weight(device, gen, dtype, hidden, fused):
    """A 16-bit input with an fp32 weight (Gemma's 1 + w): the weight is not rounded to the input's dtype; against
    HF's Gemma RMSNorm (fp32 arithmetic, one rounding) and an fp64 reference. With the weight rounded first the
    results differ (the small w of 1 + w is what rounding loses)."""
    x = strided_rows(7, hidden, "strided", dtype=dtype, device=device, gen=gen)
    residual = strided_rows(7, hidden, "strided", dtype=dtype, device=device, gen=gen)
    weight = randn(hidden, scale=0.01, dtype=torch.float32, device=device, gen=gen) + 1
    if fused:
        ours, new_residual = x.clone(), residual.clone()
        ops.fused_add_rms_norm(ours, new_residual, weight, 1e-6)
        assert torch.equal(new_residual, x + residual)
        x = x + residual
    else:
        ours = ops.rms_norm(x, weight, 1e-6)
    assert_within_tolerance(ours, ref.gemma_rms_norm(x, weight, 1e-6, torch.float32),
                            ref.gemma_rms_norm(x, weight, 1e-6, torch.float64))
    assert not torch.equal(ours, ops.rms_norm(x, weight.to(dtype), 1e-6))


# ---- paged KV write ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "qkv"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(device, gen, dtype, num_tokens, block_size, layout):
    kw = dict(dtype=dtype, device=device, gen=gen)
    num_kv_heads, head_dim, num_blocks = 2, 128, -(-num_tokens // block_size) + 2
    key, value = qk_views(num_tokens, num_kv_heads, num_kv_heads, head_dim, layout, **kw)
    kv_cache = randn(num_blocks, 2, block_size, num_kv_heads, head_dim, **kw)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[::3] = -1  # padding tokens: skipped
    slot_mapping = slot_mapping.to(device)
    expected = ref.reshape_and_cache(key, value, kv_cache, slot_mapping)
    ops.reshape_and_cache(key, value, kv_cache, slot_mapping)
    assert torch.equal(kv_cache, expected)


def test_reshape_and_cache_padding_only(device, gen):
    kw = dict(dtype=torch.bfloat16, device=device, gen=gen)
    key, value, kv_cache = randn(7, 2, 64, **kw), randn(7, 2, 64, **kw), randn(3, 2, 16, 2, 64, **kw)
    before = kv_cache.clone()
    ops.reshape_and_cache(key, value, kv_cache, torch.full((7,), -1, dtype=torch.int64, device=device))
    assert torch.equal(kv_cache, before)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_and_cache_equals_the_two_ops(device, gen, dtype, num_tokens, head_dim, rotary_dim, fp8):
    """The fused op is, bit for bit, rotary_embedding followed by reshape_and_cache(_fp8), query,
    key and cache alike, on views into one fused qkv tensor with padding slots."""
    if fp8 and dtype == torch.float32 and device.type == "cuda":
        pytest.skip("no fp32 queries over an FP8 cache on CUDA")
    kw = dict(dtype=dtype, device=device, gen=gen)
    num_heads, num_kv_heads, block_size = 8, 2, 16
    num_blocks = -(-num_tokens // block_size) + 2
    qkv = randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, **kw)
    positions = torch.randint(4096, (num_tokens,), generator=gen).to(device)
    cos_sin_cache, _ = make_cos_sin(rotary_dim, 4096, 10000.0, device)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[1::4] = -1
    slot_mapping = slot_mapping.to(device)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    cache = randn(num_blocks, 2, block_size, num_kv_heads, head_dim, **kw).to(cache_dtype)
    kv_scale = torch.tensor([0.05, 0.02], device=device) if fp8 else None
    results = []
    for fused in (False, True):
        qkv_i, cache_i = qkv.clone(), cache.clone()
        q, k, v = qkv_i[:, :num_heads], qkv_i[:, num_heads:num_heads + num_kv_heads], qkv_i[:, num_heads + num_kv_heads:]
        if fused:
            ops.rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, cache_i, slot_mapping, kv_scale=kv_scale)
        else:
            ops.rotary_embedding(positions, q, k, cos_sin_cache)
            ops.reshape_and_cache(k, v, cache_i, slot_mapping, kv_scale=kv_scale)
        results.append((qkv_i, cache_i.view(torch.uint8) if fp8 else cache_i))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[1][0], qkv) or num_tokens == 0


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (5, 1), (40, 8)], ids=["8x2", "5x1", "40x8"])  # 40x8: Qwen3-14B
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_and_cache_with_head_norms(device, gen, dtype, num_tokens, head_dim, heads, fp8):
    """q_norm / k_norm (Qwen3): every query and key head RMS-normalized with its weights, then rotated,
    then K / V cached, on views into one fused qkv tensor with padding slots. Against the fp32 reference
    (HF's q_norm then rotary) under DESIGN's rule; on the CPU, bit for bit rms_norm of each head then the
    fused op without norms; V copied unchanged."""
    if fp8 and dtype == torch.float32 and device.type == "cuda":
        pytest.skip("no fp32 queries over an FP8 cache on CUDA")
    kw = dict(dtype=dtype, device=device, gen=gen)
    (num_heads, num_kv_heads), block_size, eps, max_position = heads, 16, 1e-6, 4096
    num_blocks = -(-num_tokens // block_size) + 2
    qkv = randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, scale=3.0, **kw)
    q_norm, k_norm = (1.0 + randn(head_dim, scale=0.3, **kw)), (1.0 + randn(head_dim, scale=0.3, **kw))
    positions = torch.randint(max_position, (num_tokens,), generator=gen)
    cos_sin_cache, inv_freq = make_cos_sin(head_dim, max_position, 1000000.0, device)
    cos, sin = (t.to(device) for t in ref.rope_cos_sin(positions, inv_freq))
    positions = positions.to(device)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[1::4] = -1
    slot_mapping = slot_mapping.to(device)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    cache = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                       device=device).to(cache_dtype)
    kv_scale = torch.tensor([0.05, 0.02], device=device) if fp8 else None

    def split(t):
        return t[:, :num_heads], t[:, num_heads:num_heads + num_kv_heads], t[:, num_heads + num_kv_heads:]

    ours, ours_cache = qkv.clone(), cache.clone()
    q, k, v = split(ours)
    ops.rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, ours_cache, slot_mapping, kv_scale=kv_scale,
                                   q_norm=q_norm, k_norm=k_norm, norm_eps=eps)

    def reference(t, weight, dtype_):
        n, h, d = t.shape
        normed = ref.rms_norm(t.reshape(n * h, d), weight, eps, dtype_).to(dtype_).reshape(n, h, d)
        return ref.rotary_embedding(normed, cos, sin, dtype_)
    q0, k0, v0 = split(qkv)
    for got, t, w in ((q, q0, q_norm), (k, k0, k_norm)):
        assert_within_tolerance(got, reference(t, w, dtype), reference(t, w, ref_dtype(dtype)))
    assert torch.equal(v, v0)
    written = slot_mapping >= 0
    flat = ours_cache.view(num_blocks * 2, block_size, num_kv_heads, head_dim)
    blocks, offsets = slot_mapping[written] // block_size, slot_mapping[written] % block_size
    k_cached, v_cached = flat[2 * blocks, offsets], flat[2 * blocks + 1, offsets]
    if fp8:
        assert torch.equal(k_cached.view(torch.uint8), ref.fp8_quantize(k[written].float(), kv_scale[0]).view(torch.uint8))
        assert torch.equal(v_cached.view(torch.uint8), ref.fp8_quantize(v[written].float(), kv_scale[1]).view(torch.uint8))
    else:
        assert torch.equal(k_cached, k[written]) and torch.equal(v_cached, v[written])
    unwritten = torch.ones(num_blocks * block_size, dtype=torch.bool)
    unwritten[slot_mapping[written].cpu()] = False
    assert ours_cache.view(num_blocks, 2, block_size, -1).float().isnan().transpose(1, 2).reshape(
        num_blocks * block_size, -1)[unwritten.to(device)].all()
    if device.type == "cpu":  # the op is the composition, bit for bit
        composed, composed_cache = qkv.clone(), cache.clone()
        cq, ck, cv = split(composed)
        cq.copy_(ops.rms_norm(cq.reshape(-1, head_dim), q_norm, eps).view_as(cq))
        ck.copy_(ops.rms_norm(ck.reshape(-1, head_dim), k_norm, eps).view_as(ck))
        ops.rotary_embedding_and_cache(positions, cq, ck, cv, cos_sin_cache, composed_cache, slot_mapping,
                                       kv_scale=kv_scale)
        assert torch.equal(composed, ours)
        assert torch.equal(composed_cache.view(torch.uint8), ours_cache.view(torch.uint8))


# ---- attention -----------------------------------------------------------------------------------
# TODO(issue 5, CUDA attention kernels): paged_prefill_attention and paged_decode_attention only have
# CPU implementations; when the CUDA kernels land, these tests take the `device` fixture like the
# layer tests above (and the exact-equality invariants may need the kernel's tiling in mind).

def build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison=True):
    """Random K/V for each sequence, written (by the reference) through a shuffled block table.

    Every slot no sequence owns, the last block's tail, the spare blocks and the blocks that the
    unused block-table entries name hold NaN (0 when not poison). block_tables is a column slice of
    a wider table, so its rows are strided. Returns kv_cache, block_tables (int32), seq_lens (int32).
    """
    num_used = [-(-n // block_size) for n in seq_lens]
    num_spare = 3
    num_blocks = sum(num_used) + num_spare
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(num_used) + 1
    table = perm[-num_spare:][torch.randint(num_spare, (len(seq_lens), max_blocks + 2), generator=gen)]
    slots, first = [], 0
    for b, n in enumerate(seq_lens):
        table[b, :num_used[b]] = perm[first:first + num_used[b]]
        first += num_used[b]
        pos = torch.arange(n)
        slots.append(table[b, pos // block_size] * block_size + pos % block_size)
    fill = float("nan") if poison else 0.0
    kv_cache = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), fill, dtype=dtype)
    slot_mapping = torch.cat(slots)
    keys, values = (randn(len(slot_mapping), num_kv_heads, head_dim, dtype=dtype, device="cpu", gen=gen)
                    for _ in range(2))
    kv_cache = ref.reshape_and_cache(keys, values, kv_cache, slot_mapping)
    return kv_cache, table.int()[:, :max_blocks], torch.tensor(seq_lens, dtype=torch.int32)


def make_query(num_tokens, num_heads, num_kv_heads, head_dim, layout, dtype, gen):
    return qk_views(num_tokens, num_heads, num_kv_heads, head_dim, layout, dtype=dtype, device="cpu", gen=gen)[0]


def run_prefill(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout, poison=True):
    gen = torch.Generator().manual_seed(1)
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(sum(q_lens), num_heads, num_kv_heads, head_dim, layout, dtype, gen)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = (query, kv_cache, cu_seqlens_q, lens, block_tables, head_dim ** -0.5)
    return ops.paged_prefill_attention(*args), args


def assert_lse_close(lse: torch.Tensor, reference: torch.Tensor) -> None:
    """lse is computed in fp32 from the inputs as given (no 16-bit rounding enters it, unlike the
    output), so it must match the fp64 reference to fp32 accuracy of the scores' magnitude."""
    assert lse.dtype == torch.float32 and lse.shape == reference.shape
    err = (lse.double().cpu() - reference.cpu()).abs()
    bound = 1e-4 + 1e-5 * reference.cpu().abs()
    assert bool((err <= bound).all()), f"lse max error {err.max().item():.3g}"


def check_prefill(*case, dtype, layout="contiguous"):
    out, args = run_prefill(*case, dtype=dtype, layout=layout)
    assert_within_tolerance(out, ref.paged_prefill_attention(*args, dtype),
                            ref.paged_prefill_attention(*args, ref_dtype(dtype)))


# The sweeps read the query through a fused-qkv view (strided rows); the long cases use a
# contiguous one.
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention(dtype, num_heads, num_kv_heads, head_dim, block_size):
    # a full prompt, a single token, a chunk continuing a longer context, and an empty sequence
    check_prefill([7, 1, 113, 0], [7, 1, 40, 0], num_heads, num_kv_heads, head_dim, block_size,
                  dtype=dtype, layout="qkv")


@pytest.mark.parametrize("case", [
    pytest.param(([1023], [1023], 3, 1, 128, 16), id="1023-full-heads3:1-d128-bs16"),
    pytest.param(([1023, 300], [64, 300], 8, 2, 64, 32), id="1023-chunk64+300-heads8:2-d64-bs32"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention_long(dtype, case):
    check_prefill(*case, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention_lse(dtype):
    """return_lse: the output is unchanged, and lse = log(sum exp(scale q.k)) over each row's keys."""
    out, args = run_prefill([7, 1, 113, 0, 200], [7, 1, 40, 0, 65], 8, 2, 64, 16, dtype, "qkv")
    out2, lse = ops.paged_prefill_attention(*args, return_lse=True)
    assert torch.equal(out, out2)
    assert_lse_close(lse, ref.paged_prefill_lse(*args))
    filled = torch.full_like(lse, float("nan"))
    assert ops.paged_prefill_attention(*args, lse=filled)[1] is filled
    assert torch.equal(filled, lse)


@pytest.mark.parametrize("bad, match", [
    (lambda lse: lse.double(), "lse"),
    (lambda lse: lse[:-1], "lse"),
    (lambda lse: lse.t().contiguous().t(), "lse must be contiguous"),
])
def test_paged_prefill_attention_lse_is_validated(bad, match):
    _, args = run_prefill([7, 20], [7, 5], 4, 2, 64, 16, torch.float32, "contiguous")
    with pytest.raises(ValueError, match=match):
        ops.paged_prefill_attention(*args, lse=bad(torch.empty(12, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention_4097(dtype):
    check_prefill([4097, 33], [4097, 1], 4, 1, 64, 16, dtype=dtype)


def run_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout="contiguous", poison=True):
    gen = torch.Generator().manual_seed(2)
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(len(seq_lens), num_heads, num_kv_heads, head_dim, layout, dtype, gen)
    args = (query, kv_cache, block_tables, lens, head_dim ** -0.5)
    return ops.paged_decode_attention(*args), args


def check_decode(*case, dtype, layout="contiguous"):
    out, args = run_decode(*case, dtype=dtype, layout=layout)
    assert_within_tolerance(out, ref.paged_decode_attention(*args, dtype),
                            ref.paged_decode_attention(*args, ref_dtype(dtype)))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(dtype, num_heads, num_kv_heads, head_dim, block_size):
    check_decode([1, 7, 113, 1023, 16, 65], num_heads, num_kv_heads, head_dim, block_size, dtype=dtype, layout="qkv")


def test_paged_decode_attention_semaphores_checked_then_ignored_on_cpu():
    """The fused split merge's semaphores (CUDA): validated like every argument, and the CPU, which
    has no splits, gives the same result with them and leaves them untouched."""
    out, args = run_decode([5, 40], 4, 2, 64, 16, torch.float32)
    semaphores = torch.zeros(8, dtype=torch.int32)
    assert torch.equal(ops.paged_decode_attention(*args, semaphores=semaphores), out) and not semaphores.any()
    with pytest.raises(ValueError, match="semaphores must have dtype torch.int32"):
        ops.paged_decode_attention(*args, semaphores=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="semaphores must have >= batch"):
        ops.paged_decode_attention(*args, semaphores=torch.zeros(7, dtype=torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_4097(dtype):
    check_decode([4097, 1, 2048], 8, 1, 128, 16, dtype=dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_ignores_nan_padding(dtype, block_size):
    """NaN in unused slots and in the blocks named by unused table entries changes nothing."""
    case = ([7, 113, 1, 50], [7, 20, 1, 50], 8, 2, 64, block_size)
    poisoned, _ = run_prefill(*case, dtype=dtype, layout="qkv", poison=True)
    clean, _ = run_prefill(*case, dtype=dtype, layout="qkv", poison=False)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)
    poisoned, _ = run_decode([7, 113, 1, 50], 8, 2, 64, block_size, dtype, poison=True)
    clean, _ = run_decode([7, 113, 1, 50], 8, 2, 64, block_size, dtype, poison=False)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.parametrize("split", [1, 128, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_matches_full_prefill_and_decode(dtype, split):
    """One 301-token prefill == a prefill of `split` tokens then one of the rest (q_len < seq_len)
    == decode of the last token. Each output row is computed on its own, so equality is exact."""
    seq_len, num_kv_heads, head_dim, block_size = 301, 2, 64, 16
    gen = torch.Generator().manual_seed(3)
    kv_cache, block_tables, _ = build_paged_kv([seq_len], num_kv_heads, head_dim, block_size, dtype, gen)
    query = make_query(seq_len, 8, num_kv_heads, head_dim, "qkv", dtype, gen)
    scale = head_dim ** -0.5

    def prefill(rows, context_len, cache):  # rows: the last query rows of a context_len context
        cu = torch.tensor([0, rows.shape[0]], dtype=torch.int32)
        lens = torch.tensor([context_len], dtype=torch.int32)
        return ops.paged_prefill_attention(rows, cache, cu, lens, block_tables, scale)

    full = prefill(query, seq_len, kv_cache)
    # the first chunk runs before the rest of the prompt is written: those slots are still NaN
    first_cache = kv_cache.clone()
    later = torch.arange(split, seq_len)
    first_cache[block_tables[0, later // block_size].long(), :, later % block_size] = float("nan")
    chunked = torch.cat((prefill(query[:split], split, first_cache), prefill(query[split:], seq_len, kv_cache)))
    assert torch.equal(chunked, full)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    assert torch.equal(ops.paged_decode_attention(query[-1:], kv_cache, block_tables, seq_lens, scale), full[-1:])


# ---- opcheck and input validation ----------------------------------------------------------------

def valid_args(op: str, device) -> dict:
    """Small valid keyword arguments of each op, named as both the wrapper and the schema name them."""
    gen = torch.Generator().manual_seed(4)
    kw = dict(dtype=torch.float32, device=device, gen=gen)
    if op == "rms_norm":
        return dict(out=randn(5, 64, **kw), input=randn(5, 64, **kw), weight=randn(64, **kw), eps=1e-6)
    if op == "fused_add_rms_norm":
        return dict(input=randn(5, 64, **kw), residual=randn(5, 64, **kw), weight=randn(64, **kw), eps=1e-6)
    if op == "rotary_embedding":
        cache, _ = make_cos_sin(64, 32, 10000.0, device)
        return dict(positions=torch.tensor([0, 3, 31, 7, 5], device=device), query=randn(5, 4, 64, **kw),
                    key=randn(5, 2, 64, **kw), cos_sin_cache=cache)
    if op == "silu_and_mul":
        return dict(out=randn(5, 64, **kw), input=randn(5, 128, **kw))
    if op == "reshape_and_cache":
        return dict(key=randn(5, 2, 64, **kw), value=randn(5, 2, 64, **kw), kv_cache=randn(4, 2, 16, 2, 64, **kw),
                    slot_mapping=torch.tensor([0, 17, -1, 63, 5], device=device))
    if op == "rotary_embedding_and_cache":
        return {**valid_args("rotary_embedding", device), **valid_args("reshape_and_cache", device)}
    kv_cache, block_tables, seq_lens = build_paged_kv([5, 20], 2, 64, 16, torch.float32, gen, poison=False)
    common = dict(kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens, scale=0.125)
    if op == "paged_prefill_attention":
        return dict(out=randn(23, 4, 64, **kw), query=randn(23, 4, 64, **kw),
                    cu_seqlens_q=torch.tensor([0, 3, 23], dtype=torch.int32), **common)
    return dict(out=randn(2, 4, 64, **kw), query=randn(2, 4, 64, **kw), **common)


LAYER_OPS = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "reshape_and_cache",
             "rotary_embedding_and_cache"]
ATTENTION_OPS = ["paged_prefill_attention", "paged_decode_attention"]


@pytest.mark.parametrize("op", LAYER_OPS)
def test_opcheck(device, op):
    torch.library.opcheck(getattr(torch.ops.fastinfer, op).default, (), valid_args(op, device))


@pytest.mark.parametrize("op", ATTENTION_OPS)  # CPU only: see the TODO above the attention tests
def test_opcheck_attention(op):
    torch.library.opcheck(getattr(torch.ops.fastinfer, op).default, (), valid_args(op, "cpu"))


def test_opcheck_rotary_cache_with_head_norms(device):
    args = valid_args("rotary_embedding_and_cache", device)
    w = torch.linspace(0.5, 1.5, 64, device=device)
    torch.library.opcheck(torch.ops.fastinfer.rotary_embedding_and_cache.default, (),
                          {**args, "q_norm": w, "k_norm": w.flip(0), "norm_eps": 1e-6})


def test_opcheck_prefill_with_lse():
    args = {**valid_args("paged_prefill_attention", "cpu"), "lse": torch.empty(23, 4)}
    torch.library.opcheck(torch.ops.fastinfer.paged_prefill_attention.default, (), args)


def ones_like_query(args, n):
    return torch.ones(n, dtype=args["query"].dtype, device=args["query"].device)


def replace(name, fn):
    return lambda a: a.__setitem__(name, fn(a[name]))


def set_item(name, index, value):
    return lambda a: a[name].__setitem__(index, value)


def to(dtype):
    return lambda t: t.to(dtype)


to_meta = to(torch.device("meta"))  # "another device" that exists on every machine
drop_row = lambda t: t[:-1]  # noqa: E731
strided_last_dim = lambda t: torch.stack((t, t), -1).flatten(-2)[..., ::2]  # noqa: E731
non_contiguous = lambda t: torch.cat((t, t))[::2]  # noqa: E731  (same shape, last dim still dense)


def _common_cases(op, first, second):
    """Wrong dtype / device / shape / last-dim stride of the op's first and second tensor arguments."""
    return [(op, first, "dtype", replace(first, to(torch.int32))),
            (op, first, "ndim", replace(first, lambda t: t[None])),
            (op, first, "stride", replace(first, strided_last_dim)),
            (op, second, "dtype", replace(second, to(torch.float16))),
            (op, second, "device", replace(second, to_meta)),
            (op, second, "shape", replace(second, drop_row))]


LAYER_CASES = [
    *_common_cases("rms_norm", "input", "weight"),
    ("rms_norm", "out", "shape", replace("out", drop_row)),
    ("rms_norm", "out", "dtype", replace("out", to(torch.bfloat16))),
    ("rms_norm", "out", "device", replace("out", to_meta)),
    ("rms_norm", "out", "stride", replace("out", strided_last_dim)),
    *_common_cases("fused_add_rms_norm", "input", "residual"),
    ("fused_add_rms_norm", "weight", "shape", replace("weight", drop_row)),
    ("fused_add_rms_norm", "weight", "device", replace("weight", to_meta)),
    *_common_cases("rotary_embedding", "query", "key"),
    ("rotary_embedding", "positions", "dtype", replace("positions", to(torch.int32))),
    ("rotary_embedding", "positions", "device", replace("positions", to_meta)),
    ("rotary_embedding", "positions", "shape", replace("positions", drop_row)),
    ("rotary_embedding", "positions", "beyond-cache", set_item("positions", 2, 32)),
    ("rotary_embedding", "positions", "negative", set_item("positions", 2, -1)),
    ("rotary_embedding", "cos_sin_cache", "dtype", replace("cos_sin_cache", to(torch.float16))),
    ("rotary_embedding", "cos_sin_cache", "device", replace("cos_sin_cache", to_meta)),
    ("rotary_embedding", "cos_sin_cache", "non-contiguous", replace("cos_sin_cache", non_contiguous)),
    ("rotary_embedding", "cos_sin_cache", "odd-rotary-dim", replace("cos_sin_cache", lambda t: t[:, :63].contiguous())),
    ("rotary_embedding", "cos_sin_cache", "rotary-dim>head-dim", replace("cos_sin_cache", lambda t: t.repeat(1, 2))),
    *_common_cases("silu_and_mul", "input", "out"),
    ("silu_and_mul", "input", "odd-width", replace("input", lambda t: t[:, :-1].contiguous())),
    *_common_cases("reshape_and_cache", "key", "value"),
    ("reshape_and_cache", "kv_cache", "dtype", replace("kv_cache", to(torch.float16))),
    ("reshape_and_cache", "kv_cache", "device", replace("kv_cache", to_meta)),
    ("reshape_and_cache", "kv_cache", "non-contiguous", replace("kv_cache", non_contiguous)),
    ("reshape_and_cache", "kv_cache", "not-k-and-v", replace("kv_cache", lambda t: t[:, :1].contiguous())),
    ("reshape_and_cache", "kv_cache", "block-size-12", replace("kv_cache", lambda t: t[:, :, :12].contiguous())),
    ("reshape_and_cache", "kv_cache", "heads", replace("kv_cache", lambda t: t[:, :, :, :1].contiguous())),
    ("reshape_and_cache", "slot_mapping", "dtype", replace("slot_mapping", to(torch.int32))),
    ("reshape_and_cache", "slot_mapping", "device", replace("slot_mapping", to_meta)),
    ("reshape_and_cache", "slot_mapping", "shape", replace("slot_mapping", drop_row)),
    ("reshape_and_cache", "slot_mapping", "beyond-cache", set_item("slot_mapping", 1, 64)),
    ("reshape_and_cache", "slot_mapping", "below-minus-1", set_item("slot_mapping", 1, -2)),
    # the fused op validates both halves: a sample of each
    ("rotary_embedding_and_cache", "positions", "beyond-cache", set_item("positions", 2, 32)),
    ("rotary_embedding_and_cache", "cos_sin_cache", "dtype", replace("cos_sin_cache", to(torch.float16))),
    ("rotary_embedding_and_cache", "key", "dtype", replace("key", to(torch.float16))),
    ("rotary_embedding_and_cache", "value", "shape", replace("value", drop_row)),
    ("rotary_embedding_and_cache", "kv_cache", "dtype", replace("kv_cache", to(torch.float16))),
    ("rotary_embedding_and_cache", "slot_mapping", "beyond-cache", set_item("slot_mapping", 1, 64)),
    ("rotary_embedding_and_cache", "q_norm", "alone", lambda a: a.update(q_norm=ones_like_query(a, 64))),
    ("rotary_embedding_and_cache", "q_norm", "shape", lambda a: a.update(q_norm=ones_like_query(a, 32),
                                                                         k_norm=ones_like_query(a, 64))),
    ("rotary_embedding_and_cache", "k_norm", "dtype", lambda a: a.update(
        q_norm=ones_like_query(a, 64), k_norm=ones_like_query(a, 64).half())),
    ("rotary_embedding_and_cache", "norm_eps", "negative", lambda a: a.update(
        q_norm=ones_like_query(a, 64), k_norm=ones_like_query(a, 64), norm_eps=-1.0)),
]

ATTENTION_CASES = [
    *_common_cases("paged_prefill_attention", "query", "out"),
    *_common_cases("paged_decode_attention", "query", "out"),
    *[case for op in ATTENTION_OPS for case in [
        (op, "kv_cache", "dtype", replace("kv_cache", to(torch.bfloat16))),
        (op, "kv_cache", "device", replace("kv_cache", to_meta)),
        (op, "kv_cache", "non-contiguous", replace("kv_cache", non_contiguous)),
        (op, "kv_cache", "head-dim", replace("kv_cache", lambda t: t[..., :32].contiguous())),
        (op, "query", "heads-not-multiple", replace("query", lambda t: t[:, :3].contiguous())),
        (op, "block_tables", "dtype", replace("block_tables", to(torch.int64))),
        (op, "block_tables", "device", replace("block_tables", to_meta)),
        (op, "block_tables", "rows", replace("block_tables", drop_row)),
        (op, "block_tables", "beyond-cache", set_item("block_tables", (1, 1), 7)),
        (op, "block_tables", "negative", set_item("block_tables", (0, 0), -1)),
        (op, "seq_lens", "dtype", replace("seq_lens", to(torch.int64))),
        (op, "seq_lens", "device", replace("seq_lens", to_meta)),
        (op, "seq_lens", "shape", replace("seq_lens", drop_row)),
        (op, "seq_lens", "beyond-table", set_item("seq_lens", 1, 49)),
    ]],
    ("paged_decode_attention", "seq_lens", "zero", set_item("seq_lens", 0, 0)),
    ("paged_prefill_attention", "seq_lens", "shorter-than-query", set_item("seq_lens", 1, 19)),
    ("paged_prefill_attention", "cu_seqlens_q", "dtype", replace("cu_seqlens_q", to(torch.int64))),
    ("paged_prefill_attention", "cu_seqlens_q", "device", replace("cu_seqlens_q", to_meta)),
    ("paged_prefill_attention", "cu_seqlens_q", "end", set_item("cu_seqlens_q", 2, 22)),
    ("paged_prefill_attention", "cu_seqlens_q", "start", set_item("cu_seqlens_q", 0, 1)),
    ("paged_prefill_attention", "cu_seqlens_q", "decreasing", set_item("cu_seqlens_q", 1, 24)),
]


def _ids(cases):
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}") for c in cases]


def check_rejected(op, arg, mutate, device):
    args = valid_args(op, device)
    mutate(args)
    with pytest.raises(ValueError, match=rf"fastinfer\.{op}: .*{arg}"):
        getattr(ops, op)(**args)


@pytest.mark.parametrize("op,arg,what,mutate", _ids(LAYER_CASES))
def test_bad_input_raises_value_error(device, op, arg, what, mutate):
    check_rejected(op, arg, mutate, device)


@pytest.mark.parametrize("op,arg,what,mutate", _ids(ATTENTION_CASES))  # CPU only, see the TODO above
def test_bad_attention_input_raises_value_error(op, arg, what, mutate):
    check_rejected(op, arg, mutate, "cpu")


@pytest.mark.parametrize("op,arg,what,mutate", _ids([
    ("rotary_embedding", "positions", "beyond-cache", set_item("positions", 2, 32)),
    ("reshape_and_cache", "slot_mapping", "beyond-cache", set_item("slot_mapping", 1, 64)),
    ("paged_prefill_attention", "block_tables", "beyond-cache", set_item("block_tables", (1, 1), 7)),
    ("paged_decode_attention", "seq_lens", "beyond-table", set_item("seq_lens", 1, 49)),
]))
def test_cpu_kernels_check_indices_themselves(op, arg, what, mutate):
    """check_indices=False skips the host-side checks; the CPU kernels' TORCH_CHECKs still refuse."""
    args = valid_args(op, "cpu")
    mutate(args)
    with pytest.raises(RuntimeError, match=arg):
        getattr(ops, op)(**args, check_indices=False)
