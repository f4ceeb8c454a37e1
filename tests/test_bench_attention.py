"""CPU checks of the attention benchmark's plumbing (bench/bench_attention.py, bench/report.py):
the paged cache it builds from [B, H_kv, S, D] K/V holds what SDPA sees (fastinfer's CPU kernels are
the spec), and a fragment with failed cells renders through report.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastinfer import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402
import report  # noqa: E402


def _kv(b, hkv, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)


@pytest.mark.parametrize("s", [16, 37])  # a whole number of blocks, and a padded last block
def test_paged_cache_prefill_matches_sdpa(s):
    b, h, hkv, d = 2, 4, 2, 64
    k, v = _kv(b, hkv, s, d, seed=s)
    q = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(1))
    cache, tables = bench_attention.paged_cache(k, v)
    assert cache.shape == (b * -(-s // bench_attention.BLOCK), 2, bench_attention.BLOCK, hkv, d)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    lens = torch.full((b,), s, dtype=torch.int32)
    out = ops.paged_prefill_attention(q.transpose(1, 2).reshape(b * s, h, d).contiguous(), cache, cu, lens,
                                      tables, d ** -0.5)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         is_causal=True)
    torch.testing.assert_close(out.reshape(b, s, h, d).transpose(1, 2), ref, atol=1e-5, rtol=1e-4)


def test_paged_cache_decode_matches_sdpa():
    b, h, hkv, ctx, d = 3, 8, 2, 40, 64
    k, v = _kv(b, hkv, ctx, d, seed=2)
    q = torch.randn(b, h, 1, d, generator=torch.Generator().manual_seed(3))
    cache, tables = bench_attention.paged_cache(k, v)
    out = ops.paged_decode_attention(q.reshape(b, h, d), cache, tables, torch.full((b,), ctx, dtype=torch.int32),
                                     d ** -0.5)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out.reshape(b, h, 1, d), ref, atol=1e-5, rtol=1e-4)


def test_sdpa_call_reports_how_it_ran_gqa():
    q = torch.randn(1, 4, 8, 64)
    k, v = _kv(1, 2, 8, 64, seed=4)
    fn, mode = bench_attention.sdpa_call(torch.nn.attention.SDPBackend.MATH, q, k, v, causal=True)
    assert mode == "enable_gqa"
    torch.testing.assert_close(fn(), F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True))
    _, mode = bench_attention.sdpa_call(torch.nn.attention.SDPBackend.MATH, q, q, q, causal=True)
    assert mode == "same heads"


def test_report_renders_failed_cells(tmp_path):
    """A fragment as bench_attention writes it, one backend failed, renders as 'n/a (error)'."""
    (tmp_path / "bench").mkdir()
    rows = [{"kind": "prefill", "shape": "B4", "impl": "fastinfer paged", "kv": "paged", "us": 1000.0,
             "tflops": 300.0, "speedup": 1.0, "max_diff": None},
            {"kind": "prefill", "shape": "B4", "impl": "SDPA cuDNN", "kv": bench_attention.NA,
             "us": bench_attention.NA, "tflops": None, "speedup": None, "max_diff": None}]
    frag = {"name": "attention", "title": "Paged attention", "device": {}, "notes": ["ERROR x"],
            "columns": [list(c) for c in bench_attention.COLUMNS], "rows": rows}
    (tmp_path / "bench" / "attention.json").write_text(json.dumps(frag))
    md = report.render_markdown(report.build_report(tmp_path, "abc", "2026-01-01"))
    lines = [line for line in md.splitlines() if "SDPA cuDNN" in line]
    assert lines == ["| prefill | B4 | SDPA cuDNN | n/a (error) | n/a (error) | - | - | - | - | - |"]
    assert "| prefill | B4 | fastinfer paged | paged | 1000.0 | 300.0 | - | - | 1.00 | - |" in md
