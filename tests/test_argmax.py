"""argmax_rows (the greedy sampler's token pick) against torch.argmax: first maximum, NaN first, on the
CPU reference and on the GPU kernel (one CTA per row, 16-byte loads after an unaligned head)."""
from __future__ import annotations

import pytest
import torch

from fastinfer import ops
from fastinfer.sampling import _argmax

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def rows_with_edge_cases(cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows and rows built to test the order: repeated maxima, NaN (one, several, first
    column), all -inf, all equal, +inf, and a maximum in the last column."""
    x = torch.randn(12, cols, generator=gen)
    x[1, cols // 3] = x[1, (2 * cols) // 3] = 50.0  # a tie: the first one wins
    x[2, cols // 2] = float("nan")
    x[3, cols - 1] = float("nan")
    x[3, cols // 4] = float("nan")
    x[4, 0] = float("nan")
    x[5] = float("-inf")
    x[6] = 1.0
    x[7, cols // 5] = float("inf")
    x[7, cols // 7] = float("inf")
    x[8, cols - 1] = 1e30
    x[9, :] = torch.arange(cols, dtype=torch.float32).flip(0)  # the maximum at column 0
    x[10] = -1.0 - x[10].abs()  # a zero maximum: -0.0 first, then +0.0 (equal: the first wins)
    x[10, cols // 2] = -0.0
    x[10, cols - 1] = 0.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [1, 3, 4, 5, 127, 1000, 4097, 32000, 128256])
def test_matches_torch_argmax(device, cols):
    x = rows_with_edge_cases(cols, torch.Generator().manual_seed(cols)).to(device)
    assert torch.equal(ops.argmax_rows(x).cpu(), x.cpu().argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5])
def test_strided_and_unaligned_rows(device, offset):
    """Rows of a wider buffer starting `offset` floats in (not 16-byte aligned for 1-3, 5): the kernel's
    element-wise head before its 16-byte loads, and a row stride other than the row length; into `out`."""
    gen = torch.Generator().manual_seed(offset)
    wide = rows_with_edge_cases(7001 + 16, gen).to(device)
    x = wide[:, offset:offset + 7001]
    out = torch.full((x.shape[0],), -1, dtype=torch.int64, device=device)
    ops.argmax_rows(x, out=out)
    assert torch.equal(out.cpu(), x.cpu().argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_greedy_pick_is_torch_argmax(device):
    x = rows_with_edge_cases(3000, torch.Generator().manual_seed(9)).to(device)
    assert torch.equal(_argmax(x).cpu(), x.cpu().argmax(dim=-1))
    assert torch.equal(_argmax(x[:, ::2]).cpu(), x[:, ::2].cpu().argmax(dim=-1))  # not contiguous: torch's


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="input must have dtype torch.float32"):
        ops.argmax_rows(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="at least one column"):
        ops.argmax_rows(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="input must have a contiguous last dimension"):
        ops.argmax_rows(torch.zeros(4, 6)[:, ::2])
    with pytest.raises(ValueError, match="out must have shape"):
        ops.argmax_rows(torch.zeros(2, 3), out=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="input must have 2 dimensions"):
        ops.argmax_rows(torch.zeros(3))
    assert ops.argmax_rows(torch.zeros(0, 5)).shape == (0,)


@pytest.mark.cuda
def test_sampler_setting_picks_torch_or_the_kernel(monkeypatch):
    """FASTINFER_ARGMAX=torch: the sampler's pick by torch.argmax (the earlier form), same indices; any
    other value than kernel / torch is refused by name."""
    x = rows_with_edge_cases(5000, torch.Generator().manual_seed(3)).cuda()
    picks = {}
    for choice in ("kernel", "torch"):
        monkeypatch.setenv("FASTINFER_ARGMAX", choice)
        picks[choice] = _argmax(x)
    assert torch.equal(picks["kernel"], picks["torch"])
    monkeypatch.setenv("FASTINFER_ARGMAX", "fast")
    with pytest.raises(ValueError, match="FASTINFER_ARGMAX"):
        _argmax(x)
