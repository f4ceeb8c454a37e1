"""paged_prefill_attention on the GPU against the independent references in tests/reference.py.

Tolerance as in test_ops.py (DESIGN.md): max abs error(ours vs fp32 reference) <= 2 x that of the
same-dtype torch implementation + 1e-5. Inputs are drawn on the CPU with a seeded generator and
moved; the references run on the GPU too (fp64 for fp32 inputs). Every test runs both tile shapes of
each bf16/fp16 kernel (the `prefill_variant` fixture): mma.sync with 64 query rows x 64 keys and with 128
rows x 64 keys (x 32 keys at head_dim 128), and on a Hopper GPU the wgmma kernel (128 rows x 128 keys, two
64-row warpgroups), so the cases straddle those edges: 31/32/33, 63/64/65 and 127/128/129-row
chunks, contexts that are not a multiple of the tile in front of the chunk, more than 32 sequences
(the tile lookup scans 32 at a time).
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from child import run_child
from conftest import wgmma_prefill_runs
from fastinfer import ops
from test_ops import (BLOCK_SIZES, DTYPES, HEAD_DIMS, HEADS, assert_lse_close, assert_within_tolerance, build_paged_kv,
                      randn, ref_dtype)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _every_kernel(request, prefill_variant):
    """Runs every test of this module once per bf16 / fp16 prefill kernel (conftest.prefill_variant:
    mma with 64- and 128-row tiles, and the sm_90a wgmma kernel on a Hopper GPU); fp32 has one
    kernel, so its other runs would repeat the first."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("dtype") == torch.float32 and prefill_variant != "64":
        pytest.skip("fp32 has one kernel (its first run covers it)")
    if request.node.get_closest_marker("own_block_m") and prefill_variant != "64":
        pytest.skip("the test picks the kernels itself (its first run covers it)")
    return prefill_variant


def make_query(num_tokens, num_heads, num_kv_heads, head_dim, layout, dtype, gen) -> torch.Tensor:
    """[num_tokens, num_heads, head_dim] on the GPU: contiguous, a view into a fused qkv tensor, or
    heads padded (head stride > head_dim). Built on the GPU as a whole, then sliced, so the view's
    strides survive (moving a view copies it into a contiguous tensor)."""
    kw = dict(dtype=dtype, device=CUDA, gen=gen)
    if layout == "qkv":
        return randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, **kw)[:, :num_heads]
    if layout == "padded":
        return randn(num_tokens, num_heads, head_dim + 16, **kw)[..., :head_dim]
    return randn(num_tokens, num_heads, head_dim, **kw)


def make_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout="qkv",
              poison=True, seed=1):
    """Arguments of ops.paged_prefill_attention on the GPU: a shuffled block table (rows strided,
    as a column slice of a wider table) over a cache whose unused slots hold NaN (poison)."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(sum(q_lens), num_heads, num_kv_heads, head_dim, layout, dtype, gen)
    cu_seqlens_q = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    wide = torch.full((block_tables.shape[0], block_tables.shape[1] + 3), -1, dtype=torch.int32, device=CUDA)
    wide[:, :block_tables.shape[1]] = block_tables.to(CUDA)
    return (query, kv_cache.to(CUDA), cu_seqlens_q.to(CUDA), lens.to(CUDA), wide[:, :block_tables.shape[1]],
            head_dim ** -0.5)


def check(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout="qkv", out=None):
    args = make_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, layout)
    ours = ops.paged_prefill_attention(*args, out=out)
    assert_within_tolerance(ours, ref.paged_prefill_attention(*args, dtype),
                            ref.paged_prefill_attention(*args, ref_dtype(dtype)))
    return ours


# A full prompt, one token, a chunk continuing a context, an empty sequence, and a 65-row chunk of a
# context of 200 (two query tiles, the chunk starting 135 keys in: not tile aligned).
RAGGED = ([7, 1, 113, 0, 200], [7, 1, 40, 0, 65])


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep(dtype, num_heads, num_kv_heads, head_dim, block_size):
    check(*RAGGED, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("seq_len,q_len", [
    pytest.param(1, 1, id="1"), pytest.param(7, 7, id="7"), pytest.param(64, 64, id="64"),
    pytest.param(113, 113, id="113"), pytest.param(1023, 1023, id="1023"), pytest.param(4097, 4097, id="4097"),
    pytest.param(113, 50, id="113-chunk50"), pytest.param(1023, 1, id="1023-last1"),
    pytest.param(1023, 63, id="1023-chunk63"), pytest.param(4097, 1000, id="4097-chunk1000"),
    pytest.param(33, 33, id="33"), pytest.param(65, 65, id="65"), pytest.param(127, 127, id="127"),
    pytest.param(128, 128, id="128"), pytest.param(129, 129, id="129"), pytest.param(300, 129, id="300-chunk129"),
    pytest.param(300, 127, id="300-chunk127"), pytest.param(257, 31, id="257-chunk31"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths(dtype, seq_len, q_len):
    check([seq_len], [q_len], 8, 2, 128, 16, dtype, layout="contiguous")


@pytest.mark.parametrize("case", [  # test_ops.py's CPU cases, and the 4097 one it marks slow there
    pytest.param(([1023], [1023], 3, 1, 128, 16), id="1023-full-heads3:1-d128-bs16"),
    pytest.param(([1023, 300], [64, 300], 8, 2, 64, 32), id="1023-chunk64+300-heads8:2-d64-bs32"),
    pytest.param(([4097, 33], [4097, 1], 8, 2, 128, 16), id="4097+33-last1-heads8:2-d128-bs16"),
    pytest.param(([4097, 2048], [1000, 2048], 32, 8, 64, 64), id="4097-chunk1000+2048-heads32:8-d64-bs64"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_long(dtype, case):
    check(*case, dtype, layout="contiguous")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_sequences(dtype, head_dim):
    """70 sequences (three 32-sequence steps of the tile lookup), random lengths and chunk sizes,
    some empty chunks."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = torch.randint(1, 300, (70,), generator=gen)
    q_lens = (torch.rand(70, generator=gen) * (seq_lens + 1)).long().clamp(max=seq_lens)
    q_lens[::9] = 0
    q_lens[1::7] = seq_lens[1::7]
    check(seq_lens.tolist(), q_lens.tolist(), 8, 1, head_dim, 32, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_and_strided_out(dtype, layout):
    seq_lens, q_lens = [130, 70], [130, 6]
    # out: a view with a head stride of 88 and rows starting 8 elements in; NaN where it is not written
    out = torch.full((sum(q_lens), 4, 64 + 24), float("nan"), dtype=dtype, device=CUDA)[..., 8:72]
    ours = check(seq_lens, q_lens, 4, 4, 64, 64, dtype, layout=layout, out=out)
    assert ours.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignores_nan_padding(dtype, block_size):
    """NaN in unused slots and in the blocks named by unused table entries changes nothing."""
    case = ([7, 113, 1, 50, 200], [7, 20, 1, 50, 131], 8, 2, 128, block_size, dtype)
    poisoned = ops.paged_prefill_attention(*make_case(*case, poison=True))
    clean = ops.paged_prefill_attention(*make_case(*case, poison=False))
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_block_sizes_where_table_reads_change(dtype, block_size):
    """prefill_tiles.cuh reads a key tile's block-table entries once per warp and shuffles them to the
    copies for blocks >= 4 keys (32 blocks per 128-key tile at 4), reads per copy below that (1, 2), and
    takes one entry per tile when blocks are at least a tile long (128, 256)."""
    check(*RAGGED, 8, 2, 128, block_size, dtype)


@pytest.mark.parametrize("block_size", [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
def test_table_reads_per_copy_give_the_same_bits(monkeypatch, block_size):
    """FASTINFER_ATTN_TABLE=per_copy (a global read before every copy, the loads before 2026-11-28)
    fills the same tiles as the shuffled entries, so the outputs are equal bit for bit; the poisoned
    unused slots stay unread either way (zero-filled copies)."""
    args = make_case([7, 113, 1, 50, 300], [7, 20, 1, 50, 131], 8, 2, 128, block_size, torch.bfloat16)
    shuffled = ops.paged_prefill_attention(*args)
    monkeypatch.setenv("FASTINFER_ATTN_TABLE", "per_copy")
    per_copy = ops.paged_prefill_attention(*args)
    assert torch.isfinite(shuffled).all() and torch.equal(shuffled, per_copy)


@pytest.mark.parametrize("split", [1, 63, 64, 128, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_matches_full_prefill(dtype, split):
    """A 301-token prefill == a prefill of `split` tokens then one of the rest. Each row sees the same
    64-key tiles in the same order wherever its query tile starts (tiles past its position add exact
    zeros), so equality is exact."""
    seq_len, num_kv_heads, head_dim, block_size = 301, 2, 64, 16
    query, kv_cache, _, _, block_tables, scale = make_case([seq_len], [seq_len], 8, num_kv_heads, head_dim,
                                                           block_size, dtype, seed=3)

    def prefill(rows, context_len, cache):
        cu = torch.tensor([0, rows.shape[0]], dtype=torch.int32, device=CUDA)
        lens = torch.tensor([context_len], dtype=torch.int32, device=CUDA)
        return ops.paged_prefill_attention(rows, cache, cu, lens, block_tables, scale)

    full = prefill(query, seq_len, kv_cache)
    first_cache = kv_cache.clone()  # the first chunk runs before the rest is written: NaN there
    later = torch.arange(split, seq_len, device=CUDA)
    first_cache[block_tables[0, later // block_size].long(), :, later % block_size] = float("nan")
    chunked = torch.cat((prefill(query[:split], split, first_cache), prefill(query[split:], seq_len, kv_cache)))
    assert torch.equal(chunked, full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_query_rows(dtype):
    args = make_case([5, 9], [0, 0], 4, 2, 64, 16, dtype)
    assert ops.paged_prefill_attention(*args).shape == (0, 4, 64)


def test_opcheck():
    args = make_case([5, 20], [3, 20], 4, 2, 64, 16, torch.bfloat16, layout="contiguous", poison=False)
    names = ("query", "kv_cache", "cu_seqlens_q", "seq_lens", "block_tables", "scale")
    kwargs = dict(zip(names, args), out=torch.empty_like(args[0]))
    torch.library.opcheck(torch.ops.fastinfer.paged_prefill_attention.default, (), kwargs)


def test_unsupported_head_dim_is_a_clear_error():
    args = make_case([5], [5], 4, 2, 96, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim 64, 128 and 256, got 96"):
        ops.paged_prefill_attention(*args)


def test_misaligned_query_is_a_clear_error():
    query, *rest = make_case([5], [5], 4, 2, 64, 16, torch.bfloat16)
    shifted = torch.zeros(5, 4, 72, dtype=torch.bfloat16, device=CUDA)[..., 1:65]  # rows start 2 bytes in
    shifted.copy_(query)
    with pytest.raises(RuntimeError, match="16-byte"):
        ops.paged_prefill_attention(shifted, *rest)


@pytest.mark.own_block_m
@pytest.mark.parametrize("variable, value, choices", [("FASTINFER_PREFILL_BLOCK_M", "96", "auto, 64 or 128"),
                                                      ("FASTINFER_PREFILL_KERNEL", "fa3", "auto, mma or wgmma"),
                                                      ("FASTINFER_ATTN_TABLE", "once", "shuffle or per_copy")])
def test_unknown_setting_is_refused(monkeypatch, variable, value, choices):
    args = make_case([70], [70], 4, 2, 64, 16, torch.bfloat16)
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError, match=f"{variable} must be {choices}"):
        ops.paged_prefill_attention(*args)


@pytest.mark.own_block_m
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_tile_heights_agree_closely(monkeypatch, head_dim):
    """64- and 128-row tiles (and the automatic choice) compute the same thing; only the order of the
    fp32 online-softmax updates differs (32- or 64-key tiles at head_dim 128)."""
    args = make_case([1500, 40, 700], [1500, 40, 300], 8, 2, head_dim, 16, torch.bfloat16)
    outs = {}
    for block_m in ("64", "128", "auto"):
        monkeypatch.setenv("FASTINFER_PREFILL_BLOCK_M", block_m)
        outs[block_m] = ops.paged_prefill_attention(*args).float()
    assert (outs["64"] - outs["128"]).abs().max().item() < 2e-2
    assert torch.equal(outs["auto"], outs["128"])  # 1840 rows over 3 sequences: >= 128 on average


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse(dtype, head_dim):
    """return_lse leaves the output as it was and gives log(sum exp(scale q.k)) per row and head."""
    args = make_case(*RAGGED, 8, 2, head_dim, 16, dtype)
    out, lse = ops.paged_prefill_attention(*args, return_lse=True)
    assert torch.equal(out, ops.paged_prefill_attention(*args))
    assert_lse_close(lse, ref.paged_prefill_lse(*args))


@pytest.mark.own_block_m
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_wgmma_agrees_with_mma_closely(monkeypatch, head_dim, dtype):
    """The sm_90a kernel and the mma kernel compute the same thing (only the fp32 summation order and
    the 128-key tiles differ): close, not bit-equal. auto runs wgmma at head_dim 128, mma at 64."""
    if not wgmma_prefill_runs():
        pytest.skip("the wgmma prefill kernel needs an sm_90 GPU and a build for 90a")
    args = make_case([1500, 40, 700, 129], [1500, 40, 300, 129], 8, 2, head_dim, 16, dtype)
    outs = {}
    for kernel in ("mma", "wgmma", "auto"):
        monkeypatch.setenv("FASTINFER_PREFILL_KERNEL", kernel)
        outs[kernel] = ops.paged_prefill_attention(*args).float()
    assert torch.isfinite(outs["wgmma"]).all()
    assert (outs["mma"] - outs["wgmma"]).abs().max().item() < 2e-2
    assert torch.equal(outs["auto"], outs["wgmma" if head_dim == 128 else "mma"])


# FASTINFER_ATTN_KV_LOAD=tma (the sm_90a kernel's K / V by TMA boxes), checked in a child process: a
# wrong byte count would hang the kernel, and the timeout turns that into this test's failure. Each
# case against the cp.async loads: the same tiles, so equal bits; unused slots hold NaN (make_case
# poisons them), so a last tile loaded whole instead of zero-filled shows as non-finite output.
# (seq_lens, q_lens, heads, kv heads, head_dim, block_size, dtype): block sizes below 8 (cp.async
# anyway), 8-1024 (boxes of 8-128 rows, one box per tile from 128 on), contexts that end on a tile
# (the last tile by TMA too) and inside one, chunks continuing a context, both head dims and dtypes.
TMA_CASES = [
    ([7, 113, 1, 50, 300], [7, 20, 1, 50, 131], 8, 2, 128, bs, "bfloat16") for bs in (4, 8, 16, 32, 64, 128, 256, 1024)
] + [
    ([256, 384, 128], [256, 130, 128], 8, 8, 128, 16, "float16"),
    ([256, 640, 129], [200, 640, 129], 4, 1, 64, 16, "bfloat16"),
    ([1000, 3, 512], [1000, 3, 100], 8, 2, 64, 32, "float16"),
    ([4096], [4096], 32, 8, 128, 16, "bfloat16"),
]

TMA_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
os.environ["FASTINFER_PREFILL_KERNEL"] = "wgmma"
from fastinfer import _C, ops
from test_attention_prefill_cuda import make_case
results = []
for seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype in json.loads(sys.argv[1]):
    args = make_case(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, getattr(torch, dtype))
    outs, launches = [], []
    for load in ("cp_async", "tma"):
        os.environ["FASTINFER_ATTN_KV_LOAD"] = load
        before = _C.prefill_tma_launches()
        outs.append(ops.paged_prefill_attention(*args))
        torch.cuda.synchronize()
        launches.append(_C.prefill_tma_launches() - before)
    results.append({"equal": bool(torch.equal(outs[0], outs[1])), "finite": bool(torch.isfinite(outs[1]).all()),
                    "tma": launches})
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.own_block_m
@pytest.mark.sm90
def test_kv_by_tma_gives_the_same_bits():
    """FASTINFER_ATTN_KV_LOAD=tma: whole key tiles arrive as TMA boxes of a block's rows, the last tile of
    a sequence (keys past its length) by zero-filling cp.async as before; every output equals the
    cp.async kernel's bit for bit, NaN-poisoned unused slots included."""
    if not wgmma_prefill_runs():
        pytest.skip("the sm_90a prefill kernel does not run here")
    results = run_child(TMA_CHILD, TMA_CASES, "the TMA prefill")
    bad = [(case, r) for case, r in zip(TMA_CASES, results) if not (r["equal"] and r["finite"])]
    assert not bad, bad
    for case, r in zip(TMA_CASES, results):  # TMA ran where it applies (block sizes >= 8), and only there
        assert r["tma"] == [0, 1 if case[5] >= 8 else 0], (case, r)


# head_dim 256 (Gemma 3): bf16 / fp16 over a 16-bit cache, 64-row tiles of 32 keys with Q read from shared memory
D256_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", D256_DTYPES)
def test_head_dim_256_sweep(dtype, num_heads, num_kv_heads, block_size):
    check(*RAGGED, num_heads, num_kv_heads, 256, block_size, dtype)


@pytest.mark.parametrize("seq_len,q_len", [(1, 1), (33, 33), (129, 129), (1023, 1023), (1023, 63), (4097, 1000)])
@pytest.mark.parametrize("dtype", D256_DTYPES)
def test_head_dim_256_lengths(dtype, seq_len, q_len):
    check([seq_len], [q_len], 8, 4, 256, 16, dtype, layout="contiguous")


@pytest.mark.parametrize("dtype", D256_DTYPES)
def test_head_dim_256_many_sequences_and_forced_kernels(monkeypatch, dtype):
    """70 ragged sequences; FASTINFER_PREFILL_KERNEL=wgmma (64 / 128 only) and block_m 128 still run the 64-row
    mma.sync kernel at head_dim 256."""
    gen = torch.Generator().manual_seed(8)
    seq_lens = torch.randint(1, 300, (70,), generator=gen)
    q_lens = (torch.rand(70, generator=gen) * (seq_lens + 1)).long().clamp(max=seq_lens)
    for kernel in ("auto", "wgmma"):
        monkeypatch.setenv("FASTINFER_PREFILL_KERNEL", kernel)
        monkeypatch.setenv("FASTINFER_PREFILL_BLOCK_M", "128")
        check(seq_lens.tolist(), q_lens.tolist(), 8, 1, 256, 32, dtype)


def test_head_dim_256_refuses_fp32_and_an_fp8_cache():
    args = make_case([7], [7], 4, 2, 256, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim 256 runs on CUDA with bfloat16 / float16"):
        ops.paged_prefill_attention(*args)
    query, kv_cache, *rest = make_case([7], [7], 4, 2, 256, 16, torch.bfloat16, poison=False)
    with pytest.raises(ValueError, match="head_dim 256 runs on CUDA .* 16-bit kv_cache only"):
        ops.paged_prefill_attention(query, kv_cache.to(torch.float8_e4m3fn), *rest,
                                    kv_scale=torch.ones(2, device=CUDA))
