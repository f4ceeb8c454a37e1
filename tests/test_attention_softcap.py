"""Soft-capped attention scores (the ops' `softcap`, Gemma 2's attn_logit_softcapping): each score s = scale q.k
becomes softcap * tanh(s / softcap) before the mask and the softmax, and in the log-sum-exp. Against
tests/reference.py with DESIGN.md's tolerance rule on the CPU and, in `cuda` runs, on the kernels that apply it
(the mma.sync prefill whatever FASTINFER_PREFILL_KERNEL asks, the CUDA-core decode kernel whatever
FASTINFER_DECODE_KERNEL asks; head_dim 64, 128 and 256; FP8 caches).

The queries are scaled up so that most scores are well past the cap (a cap of 2 on scores of spread ~6):
without the cap the outputs would differ far beyond the tolerance (checked once, below)."""
from __future__ import annotations

import pytest
import torch

import reference as ref
from fastinfer import ops
from test_fp8_kv import check_attention as check_fp8_attention
from test_fp8_kv import kv_scale
from test_ops import DTYPES, assert_lse_close, assert_within_tolerance, ref_dtype
from test_sliding_window_attention import DECODE_LENS, LONG, RAGGED, decode_case, prefill_case

CAP = 2.0


def sharpened(args):
    """The case with its queries times 6 (scores of spread ~6 against a cap of 2)."""
    return (args[0] * 6,) + tuple(args[1:])


def check(op, reference, args, window, softcap):
    ours = op(*args, window=window, softcap=softcap)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    dtype = args[0].dtype
    assert_within_tolerance(ours.cpu(), reference(*cpu, dtype, window, softcap),
                            reference(*cpu, ref_dtype(dtype), window, softcap))
    return ours


@pytest.mark.parametrize("window", [0, 33, 129])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill(device, prefill_variant, dtype, window):
    args = sharpened(prefill_case(*RAGGED, dtype, device))
    check(ops.paged_prefill_attention, ref.paged_prefill_attention, args, window, CAP)
    out, lse = ops.paged_prefill_attention(*args, window=window, softcap=CAP, return_lse=True)
    assert_lse_close(lse, ref.paged_prefill_lse(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                                                window=window, softcap=CAP))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_long_and_head_dims(device, dtype, head_dim):
    args = sharpened(prefill_case(*LONG, dtype, device, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                                  block_size=32))
    check(ops.paged_prefill_attention, ref.paged_prefill_attention, args, 200, CAP)


@pytest.mark.parametrize("window", [0, 65])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(device, decode_kernel, dtype, head_dim, window):
    if head_dim == 256 and (dtype == torch.float32 and device.type == "cuda"):
        pytest.skip("head_dim 256 runs in bf16 / fp16 on CUDA")
    args = sharpened(decode_case(DECODE_LENS, dtype, device, head_dim=head_dim, extra_blocks=30))
    ours = check(ops.paged_decode_attention, ref.paged_decode_attention, args, window, CAP)
    if device.type == "cuda":  # the fused split merge: the same bits, semaphores left at zero
        semaphores = torch.zeros(args[0].shape[0] * args[0].shape[1], dtype=torch.int32, device=device)
        fused = ops.paged_decode_attention(*args, window=window, softcap=CAP, semaphores=semaphores)
        torch.testing.assert_close(fused, ours, rtol=torch.finfo(ours.dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp8_cache(device, dtype):
    args = sharpened(prefill_case(*LONG, dtype, device, fp8=True))
    out = ops.paged_prefill_attention(*args, kv_scale=kv_scale(device), softcap=CAP)
    check_fp8_attention(out.cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                        lambda *a: ref.paged_prefill_attention(*a, softcap=CAP))
    args = sharpened(decode_case(DECODE_LENS, dtype, device, fp8=True, extra_blocks=30))
    out = ops.paged_decode_attention(*args, kv_scale=kv_scale(device), softcap=CAP)
    check_fp8_attention(out.cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args),
                        lambda *a: ref.paged_decode_attention(*a, softcap=CAP))


def test_the_cap_matters_and_bad_values_are_named():
    args = sharpened(prefill_case(*RAGGED, torch.float32, torch.device("cpu")))
    capped = ops.paged_prefill_attention(*args, softcap=CAP)
    assert (capped - ops.paged_prefill_attention(*args)).abs().max() > 0.1
    assert torch.equal(ops.paged_prefill_attention(*args, softcap=0), ops.paged_prefill_attention(*args))
    for bad in (-1.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            ops.paged_prefill_attention(*args, softcap=bad)
