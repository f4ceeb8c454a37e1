"""FP8 (e4m3) KV cache: the quantizing cache write and attention that dequantizes inside.

The cache write is exact (compared bit for bit). Attention follows DESIGN.md's rule against an
fp8-emulating reference: the same e4m3 cache dequantized (e4m3 * scale) in fp64, with the
same-dtype baseline being torch attention in the query's dtype over that dequantized cache.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from test_fp8 import assert_bits_equal, opcheck_fp8
from test_ops import (BLOCK_SIZES, DTYPES, HEAD_DIMS, HEADS, assert_within_tolerance, build_paged_kv, make_query,
                      qk_views, randn, ref_dtype, replace, set_item, to, to_meta)

KV_SCALE = (0.05, 0.02)  # k_scale, v_scale: randn / 0.05 stays well inside +-448


def kv_scale(device="cpu") -> torch.Tensor:
    return torch.tensor(KV_SCALE, dtype=torch.float32, device=device)


def quantize_cache(kv_cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A float cache [num_blocks, 2, ...] quantized to e4m3 with K and V's scales (NaN stays NaN)."""
    return ref.fp8_quantize(kv_cache, scale.reshape(1, 2, 1, 1, 1).to(kv_cache.device))


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_tokens", [1, 7, 113])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_fp8(device, gen, dtype, num_tokens, block_size):
    kw = dict(dtype=dtype, device=device, gen=gen)
    num_kv_heads, head_dim, num_blocks = 2, 128, -(-num_tokens // block_size) + 2
    key, value = qk_views(num_tokens, num_kv_heads, num_kv_heads, head_dim, "qkv", **kw)
    key = key * 4  # some values saturate at 448 * k_scale
    kv_cache = quantize_cache(randn(num_blocks, 2, block_size, num_kv_heads, head_dim, **kw), kv_scale())
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[::3] = -1
    slot_mapping = slot_mapping.to(device)
    expected = ref.reshape_and_cache(ref.fp8_quantize(key, KV_SCALE[0]).view(torch.uint8),
                                     ref.fp8_quantize(value, KV_SCALE[1]).view(torch.uint8),
                                     kv_cache.view(torch.uint8), slot_mapping).view(ref.FP8)
    ops.reshape_and_cache(key, value, kv_cache, slot_mapping, kv_scale=kv_scale(device))
    assert_bits_equal(kv_cache, expected)


def fp8_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison=True):
    """test_ops.build_paged_kv's cache (NaN in every slot no sequence owns), quantized to e4m3."""
    kv_cache, block_tables, lens = build_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    return quantize_cache(kv_cache, kv_scale()), block_tables, lens


def check_attention(out, args, run_ref):
    """args hold the e4m3 cache; the references see it dequantized in the query dtype and in fp64."""
    query, kv_cache = args[0], args[1]
    same = run_ref(query, ref.fp8_dequantize_kv(kv_cache, kv_scale(), query.dtype), *args[2:], query.dtype)
    wide = ref_dtype(query.dtype)
    expected = run_ref(query, ref.fp8_dequantize_kv(kv_cache, kv_scale(), torch.float64).to(wide), *args[2:], wide)
    assert_within_tolerance(out, same, expected)


def run_prefill(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, poison=True):
    gen = torch.Generator().manual_seed(11)
    kv_cache, block_tables, lens = fp8_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(sum(q_lens), num_heads, num_kv_heads, head_dim, "qkv", dtype, gen)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = (query, kv_cache, cu_seqlens_q, lens, block_tables, head_dim ** -0.5)
    return ops.paged_prefill_attention(*args, kv_scale=kv_scale()), args


def run_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, poison=True):
    gen = torch.Generator().manual_seed(12)
    kv_cache, block_tables, lens = fp8_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, poison)
    query = make_query(len(seq_lens), num_heads, num_kv_heads, head_dim, "qkv", dtype, gen)
    args = (query, kv_cache, block_tables, lens, head_dim ** -0.5)
    return ops.paged_decode_attention(*args, kv_scale=kv_scale()), args


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention_fp8_kv(dtype, num_heads, num_kv_heads, head_dim, block_size):
    out, args = run_prefill([7, 1, 113, 0], [7, 1, 40, 0], num_heads, num_kv_heads, head_dim, block_size, dtype)
    check_attention(out, args, ref.paged_prefill_attention)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_fp8_kv(dtype, num_heads, num_kv_heads, head_dim, block_size):
    out, args = run_decode([1, 7, 113, 1023, 16, 65], num_heads, num_kv_heads, head_dim, block_size, dtype)
    check_attention(out, args, ref.paged_decode_attention)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_kv_attention_ignores_nan_padding(dtype):
    case = ([7, 113, 1, 50], [7, 20, 1, 50], 8, 2, 64, 16)
    poisoned, _ = run_prefill(*case, dtype=dtype, poison=True)
    clean, _ = run_prefill(*case, dtype=dtype, poison=False)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)
    poisoned, _ = run_decode([7, 113, 1, 50], 8, 2, 64, 16, dtype, poison=True)
    clean, _ = run_decode([7, 113, 1, 50], 8, 2, 64, 16, dtype, poison=False)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


def test_fp8_kv_with_unit_scales_equals_attention_over_the_rounded_cache():
    """kv_scale = [1, 1]: the fp8 op equals the plain op on the cache converted to the query dtype
    (every e4m3 value is exact in fp32), row for row."""
    gen = torch.Generator().manual_seed(13)
    kv_cache, block_tables, lens = build_paged_kv([50, 9], 2, 64, 16, torch.float32, gen, poison=False)
    kv8 = kv_cache.to(ref.FP8)
    query = make_query(2, 8, 2, 64, "contiguous", torch.float32, gen)
    ours = ops.paged_decode_attention(query, kv8, block_tables, lens, 0.125, kv_scale=torch.ones(2))
    assert torch.equal(ours, ops.paged_decode_attention(query, kv8.float(), block_tables, lens, 0.125))


# ---- opcheck and input validation ----------------------------------------------------------------

def valid_args(op: str) -> dict:
    gen = torch.Generator().manual_seed(14)
    kw = dict(dtype=torch.float32, device="cpu", gen=gen)
    if op == "reshape_and_cache_fp8":
        return dict(key=randn(5, 2, 64, **kw), value=randn(5, 2, 64, **kw),
                    kv_cache=torch.zeros(4, 2, 16, 2, 64, dtype=ref.FP8),
                    slot_mapping=torch.tensor([0, 17, -1, 63, 5]), kv_scale=kv_scale())
    kv_cache, block_tables, seq_lens = fp8_paged_kv([5, 20], 2, 64, 16, torch.float32, gen, poison=False)
    common = dict(kv_cache=kv_cache, kv_scale=kv_scale(), block_tables=block_tables, seq_lens=seq_lens, scale=0.125)
    if op == "paged_prefill_attention_fp8":
        return dict(out=randn(23, 4, 64, **kw), query=randn(23, 4, 64, **kw),
                    cu_seqlens_q=torch.tensor([0, 3, 23], dtype=torch.int32), **common)
    return dict(out=randn(2, 4, 64, **kw), query=randn(2, 4, 64, **kw), **common)


FP8_KV_OPS = ["reshape_and_cache_fp8", "paged_prefill_attention_fp8", "paged_decode_attention_fp8"]


@pytest.mark.parametrize("op", FP8_KV_OPS)
def test_opcheck(op):
    opcheck_fp8(op, valid_args(op))


BAD = [case for op in FP8_KV_OPS for case in [
    (op, "kv_scale", "missing", replace("kv_scale", lambda t: None)),
    (op, "kv_scale", "dtype", replace("kv_scale", to(torch.float16))),
    (op, "kv_scale", "shape", replace("kv_scale", lambda t: t[:1])),
    (op, "kv_scale", "device", replace("kv_scale", to_meta)),
    (op, "kv_scale", "plain-cache", replace("kv_cache", lambda t: t.float())),
    (op, "kv_cache", "e5m2", replace("kv_cache", to(torch.float8_e5m2))),
]] + [
    ("reshape_and_cache_fp8", "slot_mapping", "beyond-cache", set_item("slot_mapping", 1, 128)),
    ("paged_decode_attention_fp8", "block_tables", "beyond-cache", set_item("block_tables", (1, 1), 7)),
]


@pytest.mark.parametrize("op,arg,what,mutate", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}") for c in BAD])
def test_bad_input_raises_value_error(op, arg, what, mutate):
    args = valid_args(op)
    mutate(args)
    wrapper = op.removesuffix("_fp8")  # the public wrapper picks the fp8 op from the cache's dtype
    if wrapper != "reshape_and_cache":
        args.pop("out")
    with pytest.raises(ValueError, match=rf"fastinfer\.{wrapper}: .*{arg}"):
        getattr(ops, wrapper)(**args)
