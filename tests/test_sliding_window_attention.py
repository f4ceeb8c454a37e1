"""Sliding-window attention (the ops' `window`): a query at position p sees keys p - window < j <= p,
HF's sliding_window_overlay. Checked against tests/reference.py with DESIGN.md's tolerance rule on
the CPU and, in `cuda` runs, on every CUDA kernel (the prefill_variant / decode_kernel fixtures: the
mma.sync prefill with 64- and 128-row tiles, the sm_90a wgmma prefill, the fp32 kernels, both decode
kernels, FP8 caches).

The windows straddle the kernels' tile edges (32 / 64 / 128 keys, 64 / 128 query rows), so a window's
first key falls inside, at the start of and just past a key tile; the contexts leave whole tiles
below every row's window (skipped) and chunks whose rows' windows start in different tiles. Unused
cache slots hold NaN (test_ops.build_paged_kv), and decode tables are wider than the sequences
(-1 entries: splits planned past the end that must not read them).
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from test_fp8_kv import check_attention as check_fp8_attention
from test_fp8_kv import fp8_paged_kv, kv_scale
from test_ops import DTYPES, assert_lse_close, assert_within_tolerance, build_paged_kv, make_query, ref_dtype

# A full prompt, one token, a chunk continuing a context, an empty sequence, a 65-row chunk of 200.
RAGGED = ([7, 1, 113, 0, 200], [7, 1, 40, 0, 65])
LONG = ([1023, 700], [1023, 129])
WINDOWS = [1, 5, 31, 32, 33, 63, 64, 65, 127, 128, 129, 300]
DECODE_LENS = [1, 7, 113, 1023, 16, 65, 4097]


def _skip_repeated_fp32(request, device, repeated: bool) -> None:
    callspec = getattr(request.node, "callspec", None)
    if device.type == "cuda" and repeated and callspec is not None and callspec.params.get("dtype") == torch.float32:
        pytest.skip("fp32 has one kernel (another run covers it)")


@pytest.fixture
def prefill_kernel(request, device, prefill_variant):
    """The prefill tests run once per CUDA prefill kernel (conftest.prefill_variant), once on the CPU."""
    _skip_repeated_fp32(request, device, prefill_variant != "64")
    return prefill_variant


@pytest.fixture
def decode_kernels(request, device, decode_kernel):
    """The decode tests run once per CUDA decode kernel (conftest.decode_kernel), once on the CPU."""
    _skip_repeated_fp32(request, device, decode_kernel == "tensor_cores")
    return decode_kernel


def widen(block_tables: torch.Tensor, extra: int, device) -> torch.Tensor:
    """The table as a column slice of a wider one, its `extra` last columns -1 (never to be read)."""
    wide = torch.full((block_tables.shape[0], block_tables.shape[1] + extra + 3), -1, dtype=torch.int32)
    wide[:, :block_tables.shape[1]] = block_tables
    return wide.to(device)[:, :block_tables.shape[1] + extra]


def prefill_case(seq_lens, q_lens, dtype, device, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                 fp8=False, poison=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    build = fp8_paged_kv if fp8 else build_paged_kv
    kv_cache, block_tables, lens = build(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(sum(q_lens), num_heads, num_kv_heads, head_dim, "qkv", dtype, gen)
    cu = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return (query.to(device), kv_cache.to(device), cu.to(device), lens.to(device), widen(block_tables, 0, device),
            head_dim ** -0.5)


def decode_case(seq_lens, dtype, device, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, fp8=False,
                extra_blocks=0, poison=True, seed=2):
    gen = torch.Generator().manual_seed(seed)
    build = fp8_paged_kv if fp8 else build_paged_kv
    kv_cache, block_tables, lens = build(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(len(seq_lens), num_heads, num_kv_heads, head_dim, "qkv", dtype, gen)
    return (query.to(device), kv_cache.to(device), widen(block_tables, extra_blocks, device), lens.to(device),
            head_dim ** -0.5)


def check(op, reference, args, window, **kw):
    ours = op(*args, window=window, **kw)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    dtype = args[0].dtype
    assert_within_tolerance(ours.cpu(), reference(*cpu, dtype, window), reference(*cpu, ref_dtype(dtype), window))
    return ours


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(device, prefill_kernel, dtype, window):
    check(ops.paged_prefill_attention, ref.paged_prefill_attention, prefill_case(*RAGGED, dtype, device), window)


@pytest.mark.parametrize("window", [33, 64, 129, 200, 1000])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_long(device, prefill_kernel, dtype, head_dim, window):
    """Query tiles whose first rows' windows start tiles before their last rows', tiles skipped."""
    args = prefill_case(*LONG, dtype, device, num_heads=4, num_kv_heads=1, head_dim=head_dim, block_size=32)
    check(ops.paged_prefill_attention, ref.paged_prefill_attention, args, window)


@pytest.mark.parametrize("window", [1, 33, 128, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_lse(device, prefill_kernel, dtype, window):
    args = prefill_case(*RAGGED, dtype, device)
    out, lse = ops.paged_prefill_attention(*args, window=window, return_lse=True)
    assert torch.equal(out, ops.paged_prefill_attention(*args, window=window))
    assert_lse_close(lse, ref.paged_prefill_lse(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                                                window=window))


@pytest.mark.parametrize("window", [1, 7, 33, 64, 65, 100, 1000])
@pytest.mark.parametrize("extra_blocks", [0, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(device, decode_kernels, dtype, extra_blocks, window):
    args = decode_case(DECODE_LENS, dtype, device, extra_blocks=extra_blocks)
    ours = check(ops.paged_decode_attention, ref.paged_decode_attention, args, window)
    if device.type == "cuda":  # the fused split merge: the same bits, semaphores left at zero
        semaphores = torch.zeros(args[0].shape[0] * args[0].shape[1], dtype=torch.int32, device=device)
        fused = ops.paged_decode_attention(*args, window=window, semaphores=semaphores)
        torch.testing.assert_close(fused, ours, rtol=torch.finfo(ours.dtype).eps, atol=1e-6)
        assert not semaphores.any()


@pytest.mark.parametrize("window", [1, 33, 129, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_head_dim_256(device, dtype, window):
    """Gemma 3's head_dim 256 (on CUDA: the 32-key prefill tiles, the CUDA-core decode kernel): windows, the
    log-sum-exp, the fused split merge."""
    args = prefill_case(*LONG, dtype, device, num_heads=4, num_kv_heads=2, head_dim=256, block_size=32)
    check(ops.paged_prefill_attention, ref.paged_prefill_attention, args, window)
    out, lse = ops.paged_prefill_attention(*args, window=window, return_lse=True)
    assert_lse_close(lse, ref.paged_prefill_lse(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                                                window=window))
    args = decode_case(DECODE_LENS, dtype, device, head_dim=256, extra_blocks=300)
    ours = check(ops.paged_decode_attention, ref.paged_decode_attention, args, window)
    if device.type == "cuda":
        semaphores = torch.zeros(args[0].shape[0] * args[0].shape[1], dtype=torch.int32, device=device)
        fused = ops.paged_decode_attention(*args, window=window, semaphores=semaphores)
        torch.testing.assert_close(fused, ours, rtol=torch.finfo(ours.dtype).eps, atol=1e-6)
        assert not semaphores.any()


@pytest.mark.parametrize("window", [1, 33, 129, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_fp8_cache(device, prefill_block_m, dtype, window):
    """An e4m3 cache (the mma kernel, both tile heights): against the reference over the same cache
    dequantized (test_fp8_kv's rule)."""
    args = prefill_case(*LONG, dtype, device, fp8=True)
    out = ops.paged_prefill_attention(*args, kv_scale=kv_scale(device), window=window)
    check_fp8_attention(out.cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                        lambda *a: ref.paged_prefill_attention(*a, window=window))


@pytest.mark.parametrize("window", [1, 33, 129, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_fp8_cache(device, decode_kernels, dtype, window):
    args = decode_case(DECODE_LENS, dtype, device, fp8=True, extra_blocks=300)
    out = ops.paged_decode_attention(*args, kv_scale=kv_scale(device), window=window)
    check_fp8_attention(out.cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                        lambda *a: ref.paged_decode_attention(*a, window=window))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_window_covering_every_context_is_full_attention_in_prefill(device, prefill_kernel, dtype):
    """window >= the table's capacity changes nothing, bit for bit (the same tiles and masks)."""
    args = prefill_case(*LONG, dtype, device)
    full = ops.paged_prefill_attention(*args)
    assert torch.equal(ops.paged_prefill_attention(*args, window=0), full)
    assert torch.equal(ops.paged_prefill_attention(*args, window=1 << 40), full)
    capacity = args[4].shape[1] * args[1].shape[2]
    assert torch.equal(ops.paged_prefill_attention(*args, window=capacity), full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_window_covering_every_context_is_full_attention_in_decode(device, decode_kernels, dtype):
    """The same in decode (the same splits too: the plan covers min(table, window + a tile) keys)."""
    args = decode_case(DECODE_LENS, dtype, device, extra_blocks=30)
    full = ops.paged_decode_attention(*args)
    capacity = args[2].shape[1] * args[1].shape[2]
    assert torch.equal(ops.paged_decode_attention(*args, window=capacity), full)
    assert torch.equal(ops.paged_decode_attention(*args, window=None), full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_one_returns_each_rows_own_value(device, prefill_kernel, dtype):
    """A one-key window: softmax of one score is exactly 1, so each output row is its own V row."""
    seq_lens, q_lens = LONG
    query, kv_cache, cu, lens, tables, scale = prefill_case(seq_lens, q_lens, dtype, device)
    out = ops.paged_prefill_attention(query, kv_cache, cu, lens, tables, scale, window=1).cpu()
    group = query.shape[1] // kv_cache.shape[3]
    row = 0
    for b, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        _, value = ref.gather_kv(kv_cache.cpu(), tables[b].cpu(), seq_len)
        expected = value[seq_len - q_len:].repeat_interleave(group, dim=1)
        assert torch.equal(out[row:row + q_len], expected)
        row += q_len


@pytest.mark.parametrize("window", [1, 40, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_ignores_nan_padding(device, prefill_kernel, dtype, window):
    poisoned = ops.paged_prefill_attention(*prefill_case(*RAGGED, dtype, device, poison=True), window=window)
    clean = ops.paged_prefill_attention(*prefill_case(*RAGGED, dtype, device, poison=False), window=window)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.parametrize("window", [1, 40, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ignores_nan_padding(device, decode_kernels, dtype, window):
    poisoned = ops.paged_decode_attention(*decode_case(DECODE_LENS, dtype, device, poison=True, extra_blocks=40),
                                          window=window)
    clean = ops.paged_decode_attention(*decode_case(DECODE_LENS, dtype, device, poison=False, extra_blocks=40),
                                       window=window)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


def test_decode_equals_the_last_prefill_row_on_the_cpu():
    """The CPU computes each row on its own: decode of a sequence's last token is its prefill's last
    row, bit for bit, under any window."""
    seq_lens = [1, 7, 113, 300]
    for window in (1, 6, 64, 299):
        query, kv_cache, cu, lens, tables, scale = prefill_case(seq_lens, seq_lens, torch.float32, "cpu")
        prefill = ops.paged_prefill_attention(query, kv_cache, cu, lens, tables, scale, window=window)
        last = prefill[cu[1:].long() - 1]
        assert torch.equal(ops.paged_decode_attention(query[cu[1:].long() - 1], kv_cache, tables, lens, scale,
                                                      window=window), last)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_a_bad_window_is_a_value_error_naming_it(bad):
    args = prefill_case(*RAGGED, torch.float32, "cpu")
    with pytest.raises(ValueError, match="paged_prefill_attention: window must be a non-negative integer"):
        ops.paged_prefill_attention(*args, window=bad)
    args = decode_case([5, 9], torch.float32, "cpu")
    with pytest.raises(ValueError, match="paged_decode_attention: window must be a non-negative integer"):
        ops.paged_decode_attention(*args, window=bad)


@pytest.mark.parametrize("op", ["paged_prefill_attention", "paged_decode_attention"])
def test_opcheck(device, op):
    if op == "paged_prefill_attention":
        query, kv_cache, cu, lens, tables, scale = prefill_case([7, 30], [7, 9], torch.float32, device)
        args = dict(out=torch.empty_like(query), query=query, kv_cache=kv_cache, cu_seqlens_q=cu, seq_lens=lens,
                    block_tables=tables, scale=scale, window=5)
    else:
        query, kv_cache, tables, lens, scale = decode_case([7, 30], torch.float32, device)
        args = dict(out=torch.empty_like(query), query=query, kv_cache=kv_cache, block_tables=tables, seq_lens=lens,
                    scale=scale, window=5)
    torch.library.opcheck(getattr(torch.ops.fastinfer, op).default, (), args)
