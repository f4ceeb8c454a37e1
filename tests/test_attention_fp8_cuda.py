"""Paged prefill / decode attention over an FP8 (e4m3) KV cache, on every device (the `device`
fixture: the CPU half runs everywhere, the CUDA half is marked `cuda`), against tests/reference.py.
The CUDA decode tests run both decode kernels (conftest.decode_kernel: tensor cores, CUDA cores), the
CUDA prefill tests both query tile heights (conftest.prefill_block_m: 64, 128).
The full shape sweeps run on the GPU only (tests/test_fp8_kv.py sweeps the CPU op).

The reference dequantizes the same e4m3 cache (e4m3 * scale, exact in fp32 / fp64) and runs plain
attention; DESIGN.md's rule compares ours with the fp32 (fp64 for fp32 queries) reference against
twice the error of torch attention in the query's dtype over the cache dequantized to that dtype.
Both scales are non-unit, including ones that push values into e4m3's subnormals and ones that
saturate at 448 (the cache is quantized by the reference, so saturation is part of the data).
The CUDA kernels exist for bf16 / fp16 queries and head_dim 64 / 128; the CPU op takes fp32 too.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from test_ops import (BLOCK_SIZES, HEAD_DIMS, HEADS, assert_lse_close, assert_within_tolerance, build_paged_kv,
                      make_query, ref_dtype)

CUDA = torch.device("cuda")
DTYPES16 = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# (k_scale, v_scale): typical; small values (many e4m3 subnormals); large ones (K saturates at 448).
SCALES = [pytest.param((0.05, 0.02), id="s-typical"), pytest.param((3.0, 0.7), id="s-subnormal"),
          pytest.param((0.004, 0.5), id="s-saturating")]
# test_ops.HEADS (GQA 1, 4, 8, all heads on one KV head) plus Llama-3-8B's 32 / 8.
GQA_HEADS = HEADS + [(32, 8)]
DECODE_LENS = [1, 7, 113, 1023, 16, 65, 33]
PREFILL_LENS, PREFILL_Q_LENS = [7, 1, 113, 0, 200, 65], [7, 1, 40, 0, 130, 1]


def make_fp8_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, scales, device,
                  poison=True, q_rows=None, extra_blocks=0, seed=21):
    """(query, e4m3 cache, block_tables, seq_lens, kv_scale) on `device`. The cache is
    test_ops.build_paged_kv's (shuffled block table, NaN in every slot no sequence owns), quantized
    with `scales`; extra_blocks widens the block table with -1 columns (more planned context, hence
    more decode splits, that no sequence reaches)."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch.float32,
                                                  gen, poison)
    kv_scale = torch.tensor(scales, dtype=torch.float32)
    kv8 = ref.fp8_quantize(kv_cache, kv_scale.reshape(1, 2, 1, 1, 1))
    query = make_query(len(seq_lens) if q_rows is None else q_rows, num_heads, num_kv_heads, head_dim, "qkv",
                       dtype, gen)
    if extra_blocks:
        wide = torch.full((block_tables.shape[0], block_tables.shape[1] + extra_blocks), -1, dtype=torch.int32)
        wide[:, :block_tables.shape[1]] = block_tables
        block_tables = wide
    move = lambda t: t.to(device)  # noqa: E731
    return move(query), move(kv8), move(block_tables), move(lens), move(kv_scale)


def references(run_ref, query, kv8, kv_scale, *rest):
    """(same-dtype torch baseline, wide reference) over the dequantized cache."""
    same = run_ref(query, ref.fp8_dequantize_kv(kv8, kv_scale, query.dtype), *rest, query.dtype)
    wide = ref_dtype(query.dtype)
    return same, run_ref(query, ref.fp8_dequantize_kv(kv8, kv_scale, torch.float64).to(wide), *rest, wide)


def run_decode(case, out=None):
    query, kv8, block_tables, lens, kv_scale = case
    scale = query.shape[2] ** -0.5
    ours = ops.paged_decode_attention(query, kv8, block_tables, lens, scale, out=out, kv_scale=kv_scale)
    if query.device.type == "cuda":  # the fused split merge (semaphores): the same output bit for bit
        from test_attention_decode_cuda import check_fused_merge
        check_fused_merge((query, kv8, block_tables, lens, scale), ours, kv_scale=kv_scale)
    return ours, lambda: references(ref.paged_decode_attention, query, kv8, kv_scale, block_tables, lens, scale)


def run_prefill(case, q_lens):
    query, kv8, block_tables, lens, kv_scale = case
    cu = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0, dtype=torch.int32).to(query.device)
    scale = query.shape[2] ** -0.5
    ours = ops.paged_prefill_attention(query, kv8, cu, lens, block_tables, scale, kv_scale=kv_scale)
    return ours, lambda: references(ref.paged_prefill_attention, query, kv8, kv_scale, cu, lens, block_tables,
                                    scale)


def check(result):
    ours, refs = result
    assert_within_tolerance(ours, *refs())
    return ours


# ---- decode ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_HEADS)
@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.cuda
def test_decode_sweep(dtype, num_heads, num_kv_heads, head_dim, block_size, decode_kernel):
    check(run_decode(make_fp8_case(DECODE_LENS, num_heads, num_kv_heads, head_dim, block_size, dtype, (0.05, 0.02),
                                   CUDA)))


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_decode_scales(device, dtype, scales, decode_kernel):
    check(run_decode(make_fp8_case(DECODE_LENS, 8, 2, 128, 16, dtype, scales, device)))


@pytest.mark.parametrize("extra_blocks", [0, 40])
@pytest.mark.parametrize("seq_len", [1, 31, 32, 33, 63, 64, 65, 4097])
def test_decode_lengths_and_splits(device, seq_len, extra_blocks, decode_kernel):
    """One or two long sequences: the CUDA plan splits the context over CTAs (more so with a wider
    block table whose extra entries, -1, are never read)."""
    check(run_decode(make_fp8_case([seq_len, 300], 32, 8, 128, 16, torch.bfloat16, (0.05, 0.02), device,
                                   extra_blocks=extra_blocks)))


@pytest.mark.parametrize("dtype", DTYPES16)
def test_decode_big_group(device, dtype, decode_kernel):
    """40 query heads on one KV head: more than one CTA takes (CUDA: two chunks of 20 on the CUDA
    cores, three of 14 on the tensor cores)."""
    check(run_decode(make_fp8_case([5, 77], 40, 1, 64, 32, dtype, (0.05, 0.02), device)))


# ---- prefill ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_HEADS)
@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.cuda
def test_prefill_sweep(dtype, num_heads, num_kv_heads, head_dim, block_size, prefill_block_m):
    case = make_fp8_case(PREFILL_LENS, num_heads, num_kv_heads, head_dim, block_size, dtype, (0.05, 0.02), CUDA,
                         q_rows=sum(PREFILL_Q_LENS))
    check(run_prefill(case, PREFILL_Q_LENS))


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_prefill_scales(device, dtype, scales, prefill_block_m):
    case = make_fp8_case(PREFILL_LENS, 8, 2, 64, 16, dtype, scales, device, q_rows=sum(PREFILL_Q_LENS))
    check(run_prefill(case, PREFILL_Q_LENS))


@pytest.mark.parametrize("dtype", DTYPES16)
def test_prefill_lse(device, dtype, prefill_block_m):
    """return_lse over an e4m3 cache: the log-sum-exp of scale * q . (k_scale * k8)."""
    query, kv8, block_tables, lens, kv_scale = make_fp8_case(PREFILL_LENS, 8, 2, 64, 16, dtype, (3.0, 0.7), device,
                                                             q_rows=sum(PREFILL_Q_LENS))
    cu = torch.tensor([0] + PREFILL_Q_LENS, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    out, lse = ops.paged_prefill_attention(query, kv8, cu, lens, block_tables, 0.125, kv_scale=kv_scale,
                                           return_lse=True)
    assert torch.equal(out, ops.paged_prefill_attention(query, kv8, cu, lens, block_tables, 0.125, kv_scale=kv_scale))
    dequantized = ref.fp8_dequantize_kv(kv8, kv_scale, torch.float64)
    assert_lse_close(lse, ref.paged_prefill_lse(query, dequantized, cu, lens, block_tables, 0.125))


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_prefill_long_cuda(dtype, head_dim, prefill_block_m):
    """Odd long lengths (1023, 4097 query rows) on the GPU only: the CPU op would take minutes."""
    lens, q_lens = [1023, 4097, 300], [1023, 4097, 77]
    case = make_fp8_case(lens, 8, 2, head_dim, 32, dtype, (0.05, 0.02), "cuda", q_rows=sum(q_lens))
    check(run_prefill(case, q_lens))


# ---- invariants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES16)
def test_nan_in_unused_slots_changes_nothing(device, dtype):
    args = ([7, 113, 1, 50], 8, 2, 64, 16, dtype, (0.05, 0.02), device)
    q_lens = [7, 20, 1, 50]
    for run in (lambda **kw: run_decode(make_fp8_case(*args, **kw))[0],
                lambda **kw: run_prefill(make_fp8_case(*args, q_rows=sum(q_lens), **kw), q_lens)[0]):
        poisoned, clean = run(poison=True), run(poison=False)
        assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.parametrize("dtype", DTYPES16)
def test_written_by_the_fp8_cache_write(device, gen, dtype):
    """The model's path: K/V quantized into the cache by reshape_and_cache (FP8), then attention."""
    kw = dict(dtype=dtype, device=device)
    num_tokens, block_size, kv_scale = 70, 16, torch.tensor([0.03, 0.01], device=device)
    key, value = (torch.randn(num_tokens, 2, 128, generator=gen).to(**kw) for _ in range(2))
    kv8 = torch.zeros(6, 2, block_size, 2, 128, dtype=ref.FP8, device=device)
    slot_mapping = torch.arange(num_tokens, device=device) + block_size  # blocks 1 .. 5
    ops.reshape_and_cache(key, value, kv8, slot_mapping, kv_scale=kv_scale)
    block_tables = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.int32, device=device)
    lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
    query = torch.randn(1, 8, 128, generator=gen).to(**kw)
    check(run_decode((query, kv8, block_tables, lens, kv_scale)))
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    prefill = ops.paged_prefill_attention(query, kv8, cu, lens, block_tables, 128 ** -0.5, kv_scale=kv_scale)
    assert_within_tolerance(prefill, *references(ref.paged_prefill_attention, query, kv8, kv_scale, cu, lens,
                                                 block_tables, 128 ** -0.5))


# ---- the CUDA kernels against the CPU op -------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_cuda_matches_cpu_op(dtype, head_dim):
    """The CUDA output against the CPU fp8 op's on the same inputs, within the same tolerance (the
    CPU op standing in for the reference)."""
    for run, kw, extra in ((run_decode, {}, ()), (run_prefill, dict(q_rows=sum(PREFILL_Q_LENS)), (PREFILL_Q_LENS,))):
        lens = PREFILL_LENS if extra else DECODE_LENS
        gpu, refs = run(make_fp8_case(lens, 16, 2, head_dim, 32, dtype, (0.05, 0.02), "cuda", **kw), *extra)
        cpu, _ = run(make_fp8_case(lens, 16, 2, head_dim, 32, dtype, (0.05, 0.02), "cpu", **kw), *extra)
        same, _ = refs()
        assert_within_tolerance(gpu.cpu(), same.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_refuses_fp32_query():
    case = make_fp8_case([5], 4, 4, 64, 16, torch.float32, (0.05, 0.02), "cuda")
    with pytest.raises(ValueError, match=r"fastinfer\.paged_decode_attention: query must be torch.bfloat16"):
        run_decode(case)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["paged_prefill_attention_fp8", "paged_decode_attention_fp8"])
def test_opcheck_cuda(op):
    from test_fp8 import opcheck_fp8
    query, kv8, block_tables, lens, kv_scale = make_fp8_case([5, 20], 4, 2, 64, 16, torch.bfloat16, (0.05, 0.02),
                                                             "cuda", poison=False, q_rows=23)
    args = dict(out=torch.empty_like(query), query=query, kv_cache=kv8, kv_scale=kv_scale, block_tables=block_tables,
                seq_lens=lens, scale=0.125)
    if op == "paged_prefill_attention_fp8":
        args["cu_seqlens_q"] = torch.tensor([0, 3, 23], dtype=torch.int32, device="cuda")
    else:
        for k in ("out", "query"):
            args[k] = args[k][:2]
    opcheck_fp8(op, args)


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [2, 4, 16, 128, 256])
def test_table_reads_per_copy_give_the_same_bits_fp8(monkeypatch, block_size, prefill_block_m):
    """An e4m3 cache through both block-table read forms (FASTINFER_ATTN_TABLE): equal bits, decode
    (tensor-core kernel) and prefill (both row tiles: 64 keys per tile, and 32 at 128 rows)."""
    monkeypatch.setenv("FASTINFER_DECODE_KERNEL", "tensor_cores")
    case = make_fp8_case(PREFILL_LENS, 8, 2, 128, block_size, torch.bfloat16, (0.02, 0.03), "cuda",
                         q_rows=sum(PREFILL_Q_LENS))
    decode_case = make_fp8_case(DECODE_LENS, 8, 2, 128, block_size, torch.bfloat16, (0.02, 0.03), "cuda",
                                extra_blocks=4)
    first = (run_prefill(case, PREFILL_Q_LENS)[0], run_decode(decode_case)[0])
    monkeypatch.setenv("FASTINFER_ATTN_TABLE", "per_copy")
    second = (run_prefill(case, PREFILL_Q_LENS)[0], run_decode(decode_case)[0])
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)
