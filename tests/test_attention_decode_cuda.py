"""paged_decode_attention on the GPU against the independent references in tests/reference.py.

Tolerance as in test_ops.py (DESIGN.md): max abs error(ours vs fp32 reference) <= 2 x that of the
same-dtype torch implementation + 1e-5; the references run on the GPU too (fp64 for fp32 inputs).
Every test runs both CUDA kernels (the `decode_kernel` fixture): the tensor-core one walks each split
in tiles of 64 keys (16 per warp) with up to 16 query heads per CTA, the CUDA-core one in tiles of
32 keys with up to 32 heads. Both split the context over CTAs by shapes alone (batch, kv heads,
block_tables.shape[1] * block_size, SM count): no split when batch * num_kv_heads >= 3 x SMs (CUDA
cores; 6 x SMs on tensor cores) or the table holds too few tiles, otherwise splits of >= 128 keys until
about that many CTAs exist.
The cases below straddle those edges: lengths 1 / 15 / 16 / 17 / 31 / 32 / 33 / 63 / 64 / 65 / 129 and
odd ones, tables much wider than the sequences (most splits empty), more query heads per KV head
than a CTA takes (two or three head chunks).
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from test_ops import BLOCK_SIZES, DTYPES, HEAD_DIMS, HEADS, assert_within_tolerance, build_paged_kv, randn, ref_dtype

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _both_kernels(request, decode_kernel):
    """Runs every test of this module once per decode kernel (conftest.decode_kernel); fp32 queries
    have only the CUDA-core kernel, so their tensor-core run would repeat it."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("dtype") == torch.float32 and decode_kernel == "tensor_cores":
        pytest.skip("fp32 queries always take the CUDA-core kernel (its run covers them)")
    if request.node.get_closest_marker("own_decode_kernel") and decode_kernel != "tensor_cores":
        pytest.skip("the test sets FASTINFER_DECODE_KERNEL itself (its tensor_cores run covers it)")
    return decode_kernel


# test_ops.HEADS (GQA 1, 4, 8, five heads on one KV head) plus 16, 17, 32 and 40 heads on one KV head:
# the CUDA-core kernel takes up to 32 per CTA (40: two chunks of 20), the tensor-core one up to 16
# (17: 9 + 8, 32: 16 + 16, 40: three chunks of 14 / 14 / 12).
GQA_HEADS = HEADS + [(16, 1), (17, 1), (32, 1), (40, 1)]
SEQ_LENS = [1, 7, 113, 1023, 16, 65]


def make_query(batch, num_heads, num_kv_heads, head_dim, layout, dtype, gen) -> torch.Tensor:
    """[batch, num_heads, head_dim] on the GPU: contiguous, a view into a fused qkv tensor, or heads
    padded (head stride > head_dim). Sliced on the GPU so that the view's strides survive."""
    kw = dict(dtype=dtype, device=CUDA, gen=gen)
    if layout == "qkv":
        return randn(batch, num_heads + 2 * num_kv_heads, head_dim, **kw)[:, :num_heads]
    if layout == "padded":
        return randn(batch, num_heads, head_dim + 16, **kw)[..., :head_dim]
    return randn(batch, num_heads, head_dim, **kw)


def make_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout="qkv", poison=True,
              extra_blocks=0, seed=2):
    """Arguments of ops.paged_decode_attention on the GPU. The block table is a column slice of a
    wider one (strided rows) whose last `extra_blocks` columns hold -1: a longer planned context (more
    splits) whose entries must never be read."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(len(seq_lens), num_heads, num_kv_heads, head_dim, layout, dtype, gen)
    width = block_tables.shape[1] + extra_blocks
    wide = torch.full((block_tables.shape[0], width + 3), -1, dtype=torch.int32, device=CUDA)
    wide[:, :block_tables.shape[1]] = block_tables.to(CUDA)
    return query, kv_cache.to(CUDA), wide[:, :width], lens.to(CUDA), head_dim ** -0.5


def check(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, out=None, **kw):
    args = make_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, **kw)
    ours = ops.paged_decode_attention(*args, out=out)
    assert_within_tolerance(ours, ref.paged_decode_attention(*args, dtype),
                            ref.paged_decode_attention(*args, ref_dtype(dtype)))
    check_fused_merge(args, ours)
    return ours


def check_fused_merge(args, expected: torch.Tensor, kv_scale=None) -> None:
    """With semaphores the kernel merges its splits in the last CTA of each group, through the merge
    kernel's own code (merge_row): the same output up to the last bit (bit for bit unless ptxas
    contracts the inlined copy's multiply-adds differently), and every semaphore back at 0 (twice)."""
    query = args[0]
    semaphores = torch.zeros(query.shape[0] * query.shape[1] + 3, dtype=torch.int32, device=CUDA)
    eps = torch.finfo(expected.dtype).eps
    for _ in range(2):
        fused = ops.paged_decode_attention(*args, kv_scale=kv_scale, semaphores=semaphores)
        torch.testing.assert_close(fused, expected, rtol=eps, atol=1e-6, msg="the fused merge differs from the merge kernel")
        assert not semaphores.any(), "a launch left a semaphore non-zero"


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA_HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep(dtype, num_heads, num_kv_heads, head_dim, block_size):
    check(SEQ_LENS, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("seq_len", [1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 113, 129, 1023, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths(dtype, seq_len):
    check([seq_len], 8, 2, 128, 16, dtype, layout="contiguous")


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_block_sizes(dtype, block_size):
    """Any power of two works: the kernel only indexes through the block table."""
    check([1, 33, 300], 8, 2, 64, block_size, dtype)


@pytest.mark.own_decode_kernel
@pytest.mark.parametrize("ctas_per_sm", ["auto", "12"])
@pytest.mark.parametrize("block_size", [2, 4, 8, 16, 32, 64, 128, 256, 1024])
def test_table_reads_per_copy_give_the_same_bits(monkeypatch, block_size, ctas_per_sm):
    """The tensor-core kernel's block-table reads (prefill_tiles.cuh: once per tile and warp, shuffled
    to the copies; FASTINFER_ATTN_TABLE=per_copy: before every copy) fill the same tiles: equal bits.
    Lengths end mid-block and mid-tile; 12 CTAs per SM cuts the contexts into short splits, several of
    them inside one block when blocks are long."""
    monkeypatch.setenv("FASTINFER_DECODE_KERNEL", "tensor_cores")
    monkeypatch.setenv("FASTINFER_DECODE_CTAS_PER_SM", ctas_per_sm)
    args = make_case([3000, 1025, 129, 1, 33], 32, 8, 128, block_size, torch.bfloat16, extra_blocks=5)
    shuffled = ops.paged_decode_attention(*args)
    assert_within_tolerance(shuffled, ref.paged_decode_attention(*args, torch.bfloat16),
                            ref.paged_decode_attention(*args, ref_dtype(torch.bfloat16)))
    monkeypatch.setenv("FASTINFER_ATTN_TABLE", "per_copy")
    per_copy = ops.paged_decode_attention(*args)
    assert torch.isfinite(shuffled).all() and torch.equal(shuffled, per_copy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch1_context_8192(dtype):
    """Llama-3-8B heads at batch 1: one CTA per kv head would leave the GPU idle, so many splits."""
    check([8192], 32, 8, 128, 16, dtype, layout="contiguous")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch3(dtype):
    check([4097, 1, 2048], 8, 1, 128, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch64(dtype):
    """64 sequences x 8 kv heads = 512 CTAs: no split on a 132-SM Hopper on CUDA cores, 2 on tensor cores."""
    lens = torch.randint(1, 700, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    check(lens, 32, 8, 128, 16, dtype, layout="contiguous")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_splits(dtype):
    """A table planned for 16384 keys, 4 sequences x 1 kv head: dozens of splits (86 of 192 keys on
    132 SMs), most of them past the sequences' ends (empty states the merge must skip)."""
    check([7, 1, 129, 3000], 4, 1, 128, 16, dtype, extra_blocks=1024 - 189)


@pytest.mark.parametrize("ctas_per_sm", ["2", "12"])
def test_split_target_setting(monkeypatch, ctas_per_sm):
    """FASTINFER_DECODE_CTAS_PER_SM moves the split heuristic's target (fewer / more splits than the
    default): the same results within tolerance, fused merge included; an unknown value is refused."""
    monkeypatch.setenv("FASTINFER_DECODE_CTAS_PER_SM", ctas_per_sm)
    check([7, 1, 129, 3000], 8, 2, 128, 16, torch.bfloat16, extra_blocks=300)
    monkeypatch.setenv("FASTINFER_DECODE_CTAS_PER_SM", "5")
    with pytest.raises(RuntimeError, match="FASTINFER_DECODE_CTAS_PER_SM must be auto, 2, 3, 4, 6, 8 or 12"):
        check([7], 8, 2, 128, 16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_sequences_give_zeros(dtype):
    """seq_len 0 (only with check_indices=False): zeros, with the merge kernel and with the fused merge
    (decode_work.cuh: split 0 writes them directly, the unused splits exit), the other rows as usual."""
    args = make_case([0, 5, 0, 300], 8, 2, 128, 16, dtype, extra_blocks=100)
    query, kv_cache, block_tables, lens, scale = args
    lens = lens.clone()
    lens[0] = lens[2] = 0
    merged = ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale, check_indices=False)
    semaphores = torch.zeros(query.shape[0] * query.shape[1], dtype=torch.int32, device=CUDA)
    fused = ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale, semaphores=semaphores,
                                       check_indices=False)
    assert not merged[[0, 2]].any() and not fused[[0, 2]].any()
    assert not semaphores.any()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fused, merged, rtol=eps, atol=1e-6)
    rows = [1, 3]
    ref_args = (query[rows], kv_cache, block_tables[rows], lens[rows], scale)
    assert_within_tolerance(merged[rows], ref.paged_decode_attention(*ref_args, dtype),
                            ref.paged_decode_attention(*ref_args, ref_dtype(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_split(dtype):
    """Few splits both ways: a table of 144 keys (one split: 5 CUDA-core tiles, 3 tensor-core tiles), and
    batch x kv heads = 3 x SMs (one split on CUDA cores, two on tensor cores)."""
    check([100, 7, 128], 8, 2, 128, 16, dtype)
    num_sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    lens = torch.randint(1, 300, (3 * num_sms,), generator=torch.Generator().manual_seed(6)).tolist()
    check(lens, 4, 1, 64, 32, dtype, extra_blocks=200)


@pytest.mark.parametrize("extra_blocks", [0, 1000])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignores_nan_padding(dtype, block_size, extra_blocks):
    """NaN in unused slots, in the tails of last blocks and in blocks that unused table entries name
    changes nothing, with and without splits: the output is finite and bitwise identical."""
    case = ([7, 113, 1, 50, 31, 33], 8, 2, 64, block_size, dtype)
    poisoned = ops.paged_decode_attention(*make_case(*case, poison=True, extra_blocks=extra_blocks))
    clean = ops.paged_decode_attention(*make_case(*case, poison=False, extra_blocks=extra_blocks))
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_query_and_out(dtype, layout):
    """Query and out as views with row strides > their widths; out's neighbours stay untouched."""
    seq_lens, num_heads, head_dim = [7, 500, 1], 8, 128
    base = randn(len(seq_lens), num_heads + 2, head_dim + 8, dtype=dtype, device=CUDA, gen=torch.Generator())
    before = base.clone()
    out = base[:, 1:num_heads + 1, 8:]
    check(seq_lens, num_heads, 2, head_dim, 16, dtype, out=out, layout=layout)
    outside = torch.ones_like(base, dtype=torch.bool)
    outside[:, 1:num_heads + 1, 8:] = False
    assert torch.equal(base[outside], before[outside])


def test_deterministic():
    args = make_case([3000, 17], 16, 2, 128, 16, torch.bfloat16, extra_blocks=100)
    assert torch.equal(ops.paged_decode_attention(*args), ops.paged_decode_attention(*args))


def test_cuda_graph_replay_with_new_lengths():
    """The split plan depends on shapes only: a graph captured once replays correctly after seq_lens,
    block tables and query change in place (the workspace comes from the graph's pool)."""
    seq_lens, dtype = [900, 5, 2000], torch.bfloat16
    query, kv_cache, block_tables, lens, scale = make_case(seq_lens, 8, 2, 128, 16, dtype, extra_blocks=50)
    out = torch.empty_like(query)
    run = lambda: ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale, out=out,  # noqa: E731
                                             check_indices=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside capture, as torch recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    # The table rows swap places each time; each row's new length stays within what it was built for.
    for new_lens in ([1999, 1, 33], [1, 5, 2000]):
        block_tables.copy_(block_tables.flip(0))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        query.copy_(torch.randn(query.shape, generator=torch.Generator().manual_seed(sum(new_lens))).to(query))
        out.fill_(float("nan"))
        graph.replay()
        args = (query, kv_cache, block_tables, lens, scale)
        assert_within_tolerance(out, ref.paged_decode_attention(*args, dtype),
                                ref.paged_decode_attention(*args, ref_dtype(dtype)))


def test_cuda_graph_replay_with_fused_merge():
    """The decode graphs' setting: semaphores in a static buffer, captured once, replayed with new
    lengths; each replay equals an eager launch without them (the merge kernel) and leaves them 0."""
    seq_lens, dtype = [900, 5, 2000, 77], torch.bfloat16
    query, kv_cache, block_tables, lens, scale = make_case(seq_lens, 8, 2, 128, 16, dtype, extra_blocks=50)
    out = torch.empty_like(query)
    semaphores = torch.zeros(query.shape[0] * query.shape[1], dtype=torch.int32, device=CUDA)
    run = lambda: ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale, out=out,  # noqa: E731
                                             check_indices=False, semaphores=semaphores)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for new_lens in ([1999, 1, 33, 900], [1, 5, 2000, 2], [16, 16, 16, 16]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not semaphores.any()
        torch.testing.assert_close(out, ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale),
                                   rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_semaphores_too_small_are_refused():
    query, kv_cache, block_tables, lens, scale = make_case([5, 9], 4, 2, 64, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="semaphores must have >= batch \\* num_heads = 8 elements"):
        ops.paged_decode_attention(query, kv_cache, block_tables, lens, scale,
                                   semaphores=torch.zeros(7, dtype=torch.int32, device=CUDA))


def test_opcheck():
    query, kv_cache, block_tables, lens, scale = make_case([5, 200], 4, 2, 64, 16, torch.float32, poison=False,
                                                           extra_blocks=300)
    torch.library.opcheck(torch.ops.fastinfer.paged_decode_attention.default,
                          (torch.empty_like(query), query, kv_cache, block_tables, lens, scale))


def test_unsupported_head_dim_is_refused():
    args = make_case([5, 20], 4, 2, 96, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim 64, 128 and 256, got 96"):
        ops.paged_decode_attention(*args)


@pytest.mark.own_decode_kernel
def test_unknown_kernel_name_is_refused(monkeypatch):
    args = make_case([5, 20], 4, 2, 64, 16, torch.bfloat16)
    monkeypatch.setenv("FASTINFER_DECODE_KERNEL", "tensorcores")
    with pytest.raises(RuntimeError, match="FASTINFER_DECODE_KERNEL must be auto, cuda_cores or tensor_cores"):
        ops.paged_decode_attention(*args)


@pytest.mark.own_decode_kernel
def test_both_kernels_agree_closely(monkeypatch):
    """The two kernels round differently (P in the query dtype for the tensor cores' P @ V, fp32 on the
    CUDA cores) but compute the same thing: they agree far inside the tolerance rule."""
    args = make_case([700, 3, 4096, 64], 32, 8, 128, 16, torch.bfloat16, extra_blocks=20)
    outs = {}
    for kernel in ("tensor_cores", "cuda_cores"):
        monkeypatch.setenv("FASTINFER_DECODE_KERNEL", kernel)
        outs[kernel] = ops.paged_decode_attention(*args).float()
    assert (outs["tensor_cores"] - outs["cuda_cores"]).abs().max().item() < 2e-2


# head_dim 256 (Gemma 3): the CUDA-core kernel (the tensor-core one has 64 / 128), bf16 / fp16 over a 16-bit cache
D256_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS + [(40, 1)])
@pytest.mark.parametrize("dtype", D256_DTYPES)
def test_head_dim_256_sweep(dtype, num_heads, num_kv_heads, block_size):
    check(SEQ_LENS, num_heads, num_kv_heads, 256, block_size, dtype)


@pytest.mark.parametrize("seq_len", [1, 31, 33, 129, 4097])
@pytest.mark.parametrize("dtype", D256_DTYPES)
def test_head_dim_256_lengths_and_the_fused_merge(dtype, seq_len):
    args = make_case([seq_len, 65], 8, 4, 256, 16, dtype, extra_blocks=3)
    expected = ops.paged_decode_attention(*args)
    assert_within_tolerance(expected, ref.paged_decode_attention(*args, dtype),
                            ref.paged_decode_attention(*args, ref_dtype(dtype)))
    check_fused_merge(args, expected)


def test_head_dim_256_refuses_fp32_and_an_fp8_cache():
    args = make_case([7], 4, 2, 256, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 256 runs on CUDA with bfloat16 / float16"):
        ops.paged_decode_attention(*args)
    query, kv_cache, *rest = make_case([7], 4, 2, 256, 16, torch.bfloat16, poison=False)
    with pytest.raises(ValueError, match="head_dim 256 runs on CUDA .* 16-bit kv_cache only"):
        ops.paged_decode_attention(query, kv_cache.to(torch.float8_e4m3fn), *rest, kv_scale=torch.ones(2, device=CUDA))
