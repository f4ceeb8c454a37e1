"""4-bit weights: the packed layout (pack / unpack), round-to-nearest, and the int4_linear op.

The op is judged against an fp64 matmul on weights dequantized here from the logical codes (never
through fastinfer's own dequantization), with two bounds: the issue's mean relative error
(||ours - ref||_1 / ||ref||_1 < 1e-3 for fp16 activations) and DESIGN.md's max-abs rule against
a same-dtype torch matmul on the same dequantized weights.
"""
from __future__ import annotations

import pytest
import torch

from child import run_child
from fastinfer import ops
from fastinfer.quant.int4 import (GROUP_SIZES, PackedInt4, QuantizedWeight, pack, permute_group_params,
                                  quantize_rtn, unpack, unpermute_group_params)

MODES = ["symmetric", "zeros", "mins"]
NUM_ROWS = [1, 3, 7, 16, 67, 257]
MEAN_REL_ERROR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_weight(n: int, k: int, group_size: int, mode: str, gen: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    groups = (n, k // group_size)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(groups, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, groups, generator=gen).to(dtype) if mode == "zeros" else None
    mins = (-8 * scales.float() + torch.randn(groups, generator=gen) * 0.01).to(dtype) if mode == "mins" else None
    return QuantizedWeight(codes, scales, group_size, zeros, mins)


def reference_weight(w: QuantizedWeight) -> torch.Tensor:
    """fp64 [N, K] straight from the definitions, group by group."""
    q = w.codes.double()
    s = w.scales.double().repeat_interleave(w.group_size, 1)
    if w.mins is not None:
        return q * s + w.mins.double().repeat_interleave(w.group_size, 1)
    z = w.zeros.double().repeat_interleave(w.group_size, 1) if w.zeros is not None else 8.0
    return (q - z) * s


# ---- layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_pack_unpack_round_trip(group_size, mode):
    w = random_weight(192, 384, group_size, mode, torch.Generator().manual_seed(group_size))
    packed = pack(w)
    assert packed.qweight.dtype == torch.int32 and packed.qweight.shape == (3, 8 * 384)
    assert packed.scales.shape == (384 // group_size, 192) and packed.shape == (192, 384)
    back = unpack(packed)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.scales, w.scales)
    for name in ("zeros", "mins"):
        a, b = getattr(back, name), getattr(w, name)
        assert (a is None and b is None) or torch.equal(a, b)


def test_packed_words_follow_the_documented_formula():
    """Every nibble of the packed words against the index formulas of w4a16.h, one by one."""
    gen = torch.Generator().manual_seed(1)
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    words = pack(QuantizedWeight(codes, torch.ones(n, 1), 64)).qweight.view(torch.int32).tolist()
    for s in range(n // 64):
        for t in range(k // 16):
            for lane in range(32):
                g, c = divmod(lane, 4)
                for i in range(4):
                    word = words[s][(t * 32 + lane) * 4 + i] & 0xFFFFFFFF
                    for p in range(8):
                        hi, h, r = p // 4, (p // 2) % 2, p % 2
                        nn, kk = 64 * s + 8 * (2 * i + h) + g, 16 * t + 8 * r + 2 * c + hi
                        assert (word >> (4 * p)) & 0xF == codes[nn, kk], (s, t, lane, i, p)


def test_group_params_are_transposed_inside_64_column_blocks():
    logical = torch.arange(2 * 128, dtype=torch.float32).reshape(128, 2)  # [N, groups]
    packed = permute_group_params(logical)
    for col in range(128):
        block, within = divmod(col, 64)
        j, g = divmod(within, 8)  # column 8 j + g sits at position 8 g + j
        assert torch.equal(packed[:, 64 * block + 8 * g + j], logical[col])
    assert torch.equal(unpermute_group_params(packed), logical)


def test_fused_matrices_pack_as_concatenation():
    gen = torch.Generator().manual_seed(2)
    a, b = random_weight(64, 128, 32, "mins", gen), random_weight(128, 128, 32, "mins", gen)
    fused = QuantizedWeight(torch.cat([a.codes, b.codes]), torch.cat([a.scales, b.scales]), 32,
                            mins=torch.cat([a.mins, b.mins]))
    pa, pb, pf = pack(a), pack(b), pack(fused)
    assert torch.equal(pf.qweight, torch.cat([pa.qweight, pb.qweight]))
    assert torch.equal(pf.scales, torch.cat([pa.scales, pb.scales], 1))
    assert torch.equal(pf.mins, torch.cat([pa.mins, pb.mins], 1))


@pytest.mark.parametrize("n, k, group_size, match", [(96, 128, 32, "out_features"), (64, 96, 32, "in_features"),
                                                     (64, 192, 128, "in_features"), (64, 128, 16, "group_size")])
def test_pack_rejects_shapes_outside_the_layout(n, k, group_size, match):
    with pytest.raises(ValueError, match=match):
        quantize_rtn(torch.randn(n, k), group_size)


# ---- round-to-nearest -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_rtn_error_is_at_most_half_a_step(group_size, mode):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    w[0, :group_size] = 0.25  # a constant group: scale 0 must not divide by zero
    q = quantize_rtn(w, group_size, mode)
    assert q.mode == mode and q.codes.max() <= 15
    step = q.scales.float().repeat_interleave(group_size, 1)
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all(), float((err - step / 2).max())
    assert torch.allclose(q.dequantize()[0, :group_size], w[0, :group_size])


def test_mode_conversions_keep_the_weight():
    w = random_weight(64, 128, 64, "symmetric", torch.Generator().manual_seed(4))
    assert torch.equal(w.with_mode("zeros").zeros, torch.full_like(w.scales, 8))
    assert torch.equal(w.with_mode("mins").mins, -8 * w.scales)  # exact: a power of two
    for mode in ("zeros", "mins"):  # equal up to the rounding of q * s + m evaluated unfused
        torch.testing.assert_close(w.with_mode(mode).dequantize(), w.dequantize(), rtol=1e-6, atol=1e-7)


# ---- the op ---------------------------------------------------------------------------------------

def run_int4_linear(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    p = pack(w.to(x.dtype))
    dev = lambda t: None if t is None else t.to(x.device)  # noqa: E731
    return ops.int4_linear(x, p.qweight.to(x.device), p.scales.to(x.device), w.group_size,
                           zeros=dev(p.zeros), mins=dev(p.mins), out=out)


def check_against_reference(ours: torch.Tensor, x: torch.Tensor, w: QuantizedWeight) -> None:
    weight = reference_weight(w.to(x.dtype))  # the parameters as the op sees them
    ref = x.double().cpu() @ weight.t()
    same_dtype = (x @ weight.to(x.dtype).to(x.device).t()).double().cpu()
    ours = ours.double().cpu()
    assert torch.isfinite(ours).all()
    rel = ((ours - ref).abs().sum() / ref.abs().sum()).item()
    assert rel < MEAN_REL_ERROR[x.dtype], f"mean relative error {rel:.3g}"
    err, baseline = (ours - ref).abs().max().item(), (same_dtype - ref).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"max abs error {err:.3g} > 2 x same-dtype torch {baseline:.3g} + 1e-5"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", NUM_ROWS)
def test_int4_linear_matches_fp32_matmul(device, int4_kernel, m, group_size, mode, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes 16-bit activations")
    gen = torch.Generator().manual_seed(m * 1000 + group_size)
    n, k = 192, 512
    w = random_weight(n, k, group_size, mode, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    check_against_reference(run_int4_linear(x, w), x, w)


@pytest.mark.parametrize("n, k", [(64, 64), (576, 576), (960, 576), (576, 1536), (320, 14336)])
def test_int4_linear_shapes(device, int4_kernel, n, k):
    """Odd strip counts (N / 128 not whole), K of one stage, a long K (split along K on a GPU)."""
    dtype = torch.float16
    gen = torch.Generator().manual_seed(n + k)
    w = random_weight(n, k, 32, "mins", gen)
    for m in (1, 5, 33):
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        check_against_reference(run_int4_linear(x, w), x, w)


@pytest.mark.parametrize("m", [1, 16, 64, 257])
def test_int4_linear_many_tiles_is_deterministic(device, int4_kernel, m):
    """N = 4096: a GPU splits K for small M and not for large M; both reductions are deterministic."""
    gen = torch.Generator().manual_seed(m)
    w = random_weight(4096, 1024, 128, "symmetric", gen)
    x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16).to(device)
    first = run_int4_linear(x, w)
    check_against_reference(first, x, w)
    assert torch.equal(first, run_int4_linear(x, w))


def test_int4_linear_strided_rows_and_out(device, int4_kernel):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    w = random_weight(128, 256, 64, "zeros", gen)
    x = torch.randn(9, 256 + 64, generator=gen).to(dtype).to(device)[:, 64:]
    out = torch.full((9, 128 + 8), float("nan"), dtype=dtype, device=device)[:, 8:]
    run_int4_linear(x, w, out=out)
    check_against_reference(out, x, w)


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("n, k", [(4096, 1024), (28672 // 4, 4096), (4096, 14336)])
def test_int4_streamk_graph_replays(monkeypatch, n, k, m):
    """FASTINFER_INT4_KERNEL=small_streamk (w4a16_small.cuh): strips cut between CTAs are summed by the
    last of their CTAs to arrive, through a workspace whose counters every launch leaves at 0. Eager
    calls (the first allocates the workspace), then a captured graph replayed with new activations, must
    equal the eager calls each time, bit for bit (the same fixed-order sums), and the reference; M = 3
    and M = 8 (every token row of the kernel's n8 tile)."""
    monkeypatch.setenv("FASTINFER_INT4_KERNEL", "small_streamk")
    gen = torch.Generator().manual_seed(n + k)
    w = random_weight(n, k, 128, "zeros", gen)
    xs = [torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]
    p = pack(w.to(torch.bfloat16))  # on the GPU once: nothing but the op inside the capture
    qweight, scales, zeros = p.qweight.cuda(), p.scales.cuda(), p.zeros.cuda()

    def linear(v, out=None):
        return ops.int4_linear(v, qweight, scales, w.group_size, zeros=zeros, out=out)
    eager = [linear(v) for v in xs]
    check_against_reference(eager[0], xs[0], w)
    x = xs[0].clone()
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear(x, out=out)
    for v, expected in zip(xs + xs, eager + eager):
        x.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def test_int4_linear_empty_batch(device):
    w = random_weight(64, 64, 32, "symmetric", torch.Generator().manual_seed(6))
    x = torch.empty(0, 64, dtype=torch.float16, device=device)
    assert run_int4_linear(x, w).shape == (0, 64)


def test_int4_linear_opcheck(device):
    w = random_weight(128, 128, 32, "zeros", torch.Generator().manual_seed(7))
    p = pack(w.to(torch.float16))
    x = torch.randn(3, 128, dtype=torch.float16, device=device)
    out = torch.empty(3, 128, dtype=torch.float16, device=device)
    args = (out, x, p.qweight.to(device), p.scales.to(device), p.zeros.to(device), None, 32)
    torch.library.opcheck(torch.ops.fastinfer.int4_linear.default, args)


def _valid_args():
    w = random_weight(128, 128, 32, "zeros", torch.Generator().manual_seed(8))
    p = pack(w)
    return dict(x=torch.randn(2, 128), qweight=p.qweight, scales=p.scales, group_size=32, zeros=p.zeros)


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(2, 96)), "x's last dimension"),
    (dict(x=torch.randn(2, 128, dtype=torch.float64)), "x must have dtype"),
    (dict(qweight=torch.zeros(2, 1024, dtype=torch.int64)), "qweight must have dtype"),
    (dict(qweight=torch.zeros(2, 512, dtype=torch.int32)), "qweight must have shape"),
    (dict(scales=torch.zeros(4, 128, dtype=torch.float16)), "scales must have dtype"),
    (dict(scales=torch.zeros(2, 128)), "scales must have shape"),
    (dict(group_size=48), "group_size"),
    (dict(mins=torch.zeros(4, 128)), "zeros .* or mins .*, not both"),
    (dict(out=torch.zeros(2, 64)), "out must have shape"),
])
def test_int4_linear_errors_name_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        ops.int4_linear(**{**_valid_args(), **change})


def test_int4_linear_out_must_not_overlap_x():
    buf = torch.randn(4, 128)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        ops.int4_linear(**{**_valid_args(), "x": buf[:2], "out": buf[2:]})


def test_packed_int4_shape_property():
    p = PackedInt4(torch.zeros(3, 8 * 128, dtype=torch.int32), torch.zeros(4, 192), 32)
    assert p.shape == (192, 128)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["zeros", "mins", "symmetric"])
def test_rtn_and_pack_on_the_gpu_equal_the_cpu(mode):
    """Int4Rows quantizes a dense checkpoint on the weight's device: the GPU must give the CPU's bytes."""
    from fastinfer.quant.int4 import pack, quantize_rtn
    w = torch.randn(192, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    cpu = pack(quantize_rtn(w, 128, mode).to(torch.bfloat16))
    gpu = pack(quantize_rtn(w.cuda(), 128, mode).to(torch.bfloat16))
    for name in ("qweight", "scales", "zeros", "mins"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b.cpu()), name


# ---- FASTINFER_INT4_KERNEL=wgmma (sm_90a warpgroup MMA, w4a16_wgmma.cuh), in a child process --------
# A new mbarrier pipeline whose byte counts were wrong would hang rather than fail: the cases run in
# a child with a timeout, so a hang costs this test, not the session. Each case checks the output
# against the fp64 reference (check_against_reference) and that the wgmma kernel is what launched.
WGMMA_CASES = (
    # (m, n, k, group, mode, dtype): the reference sweep (BN 64: M <= 64; BN 128 above, several row blocks)
    [(m, 192, 512, g, mode, dt) for m in (1, 7, 16, 17, 64, 65, 130, 257) for g in GROUP_SIZES for mode in MODES
     for dt in ("float16", "bfloat16")]
    # odd strip counts (the last CTA has one strip), one stage of K, a long K (split over a cluster)
    + [(m, n, k, 32, "mins", "float16") for n, k in ((64, 64), (576, 576), (960, 576), (576, 1536), (320, 14336))
       for m in (1, 5, 33, 100)]
    # Llama-3-8B shapes where the tiles leave SMs idle (split K) and where they do not
    + [(64, 4096, 14336, 128, "mins", "bfloat16"), (16, 7168, 4096, 128, "zeros", "bfloat16"),
       (256, 4096, 4096, 128, "symmetric", "bfloat16"), (64, 6144, 4096, 64, "zeros", "float16")]
    # several stages per CTA after the split (the second register set, the ring wrapping its 6 slots)
    + [(m, 192, 4096, g, mode, "bfloat16") for m in (17, 130) for g in GROUP_SIZES for mode in MODES]
)
# Tiles that fill the SMs (no split: the prefill regime; the direct store of both strips, one strip in
# the last tile for N / 64 odd): (m, n, k, group, mode, dtype).
WGMMA_UNSPLIT = [(300, 8192, 1024, 64, "zeros", "bfloat16"), (48, 17408, 512, 32, "symmetric", "float16"),
                 (300, 8256, 1024, 128, "mins", "bfloat16")]

WGMMA_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
os.environ["FASTINFER_INT4_KERNEL"] = "wgmma"
from fastinfer import _C
from test_int4 import check_against_reference, random_weight, run_int4_linear
results = []
for m, n, k, group, mode, dtype in json.loads(sys.argv[1]):
    gen = torch.Generator().manual_seed(m * 7 + n + k + group)
    try:
        w = random_weight(n, k, group, mode, gen)
        x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype)).cuda()
        first = run_int4_linear(x, w)
        info = _C.int4_last_launch()
        check_against_reference(first, x, w)
        again = run_int4_linear(x, w)
        torch.cuda.synchronize()
        error = None if torch.equal(first, again) else "not deterministic"
    except Exception as exc:
        info, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
    results.append({"error": error, "info": info})
# auto_wgmma: auto's GEMV up to 8 rows, the wgmma kernel above
os.environ["FASTINFER_INT4_KERNEL"] = "auto_wgmma"
picked = {}
for m in (4, 8, 9, 16):
    gen = torch.Generator().manual_seed(m)
    w = random_weight(256, 512, 128, "zeros", gen)
    x = torch.randn(m, 512, generator=gen).to(torch.bfloat16).cuda()
    check_against_reference(run_int4_linear(x, w), x, w)
    picked[m] = _C.int4_last_launch()["kernel"]
os.environ["FASTINFER_INT4_KERNEL"] = "wgmma"
print("AUTO_WGMMA " + json.dumps(picked))
# strided rows of x and out (x's rows 640 bytes apart, 128 bytes in; out 16 bytes in)
try:
    gen = torch.Generator().manual_seed(5)
    w = random_weight(128, 256, 64, "zeros", gen)
    x = torch.randn(9, 256 + 64, generator=gen).to(torch.bfloat16).cuda()[:, 64:]
    out = torch.full((9, 128 + 8), float("nan"), dtype=torch.bfloat16, device="cuda")[:, 8:]
    run_int4_linear(x, w, out=out)
    check_against_reference(out, x, w)
    results.append({"error": None, "info": _C.int4_last_launch()})
except Exception as exc:
    results.append({"error": f"strided: {type(exc).__name__}: {str(exc)[:300]}", "info": None})
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.cuda
@pytest.mark.sm90
def test_int4_wgmma_kernel_matches_the_reference():
    """FASTINFER_INT4_KERNEL=wgmma: the dequantized weights as wgmma's register A operand, x by TMA;
    every group size, mode and dtype, M across both tile widths, odd strip counts, split K over a
    cluster (deterministic: two runs give the same bits), strided x and out."""
    out = run_child(WGMMA_CHILD, WGMMA_CASES + WGMMA_UNSPLIT, "the wgmma W4A16 kernel", tags=("RESULTS", "AUTO_WGMMA"))
    results, picked = out["RESULTS"], out["AUTO_WGMMA"]
    cases = WGMMA_CASES + WGMMA_UNSPLIT + [("strided",)]
    failures = [(case, r["error"]) for case, r in zip(cases, results) if r["error"]]
    assert not failures, failures[:10]
    for case, r in zip(cases, results):
        info = r["info"]
        assert info["kernel"] == "wgmma" and info["ctas"] == info["units"] * info["splits"], (case, info)
        assert 1 <= info["splits"] <= 8
        if case in WGMMA_UNSPLIT:
            assert info["splits"] == 1 and info["units"] >= torch.cuda.get_device_properties(0).multi_processor_count, \
                (case, info)
    assert picked == {"4": "small", "8": "small", "9": "wgmma", "16": "wgmma"}, picked
    split = [r["info"]["splits"] for case, r in zip(cases, results) if case[:3] == (64, 4096, 14336)]
    if torch.cuda.get_device_properties(0).multi_processor_count >= 64:  # a whole Hopper, not a MIG slice
        assert split and split[0] > 1, "the down projection at M = 64 (32 tiles) should split K"
