"""bench/bench_e2e.py's code path on a tiny model on the CPU: decode timing through the engine,
the HF peer, offline throughput, the fragment and the chart (figures are not judged here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_e2e  # noqa: E402


def test_bench_e2e_tiny_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main(["--tiny", "--device", "cpu", "--out", str(out), "--batches", "1", "3",
                         "--hf-batches", "3", "--steps", "6", "--requests", "3", "--prompt-len", "9"])
    assert rc == 0
    frag = json.loads(out.read_text())
    assert frag["errors"] == []
    rates = {(r["impl"], r["batch"]): r for r in frag["rows"]}
    assert set(rates) == {("HF eager", 3), ("fastinfer bf16 eager", 1), ("fastinfer bf16 eager", 3),
                          *((f"fastinfer {q}", b) for q in ("bf16", "int4", "fp8") for b in (1, 3))}
    assert all(r["tok_s"] > 0 for r in frag["rows"])
    assert rates[("fastinfer bf16", 3)]["vs_hf_eager"] > 0
    offline = frag["offline"][0]
    assert offline["requests"] == 3 and offline["output_tokens"] > 0 and offline["tpot_ms_median"] > 0
    assert frag["chart"] == "e2e.png" and (tmp_path / "e2e.png").stat().st_size > 1000  # matplotlib: test extra


def test_chart_from_a_saved_fragment(tmp_path):
    """A GPU run without matplotlib leaves "chart": null; --chart-from draws it from the fragment."""
    rows = [{"impl": impl, "batch": b, "tok_s": rate * b} for impl, rate in (("fastinfer bf16", 200.0),
                                                                            ("HF static+compile", 50.0))
            for b in (1, 8, 32, 128)]
    frag = {"name": "e2e", "title": "t", "rows": rows, "chart": None, "notes": ["no chart: matplotlib unavailable"],
            "roofline": {"bf16": {"1": 266.0, "8": 2100.0, "32": 8000.0, "128": 25000.0}}}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(frag))
    assert bench_e2e.main(["--chart-from", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["chart"] == "e2e.png" and (tmp_path / "e2e.png").stat().st_size > 1000
    assert saved["notes"] == ["chart: e2e.png"] and saved["rows"] == rows


def test_bench_e2e_writes_what_it_measured_when_interrupted(tmp_path, monkeypatch):
    """gpu_check stops a benchmark over its time limit with SIGINT: the rows measured so far still land."""
    calls = {"n": 0}
    real = bench_e2e.fastinfer_decode

    def decode_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_e2e, "fastinfer_decode", decode_then_interrupt)
    out = tmp_path / "e2e.json"
    bench_e2e.main(["--tiny", "--device", "cpu", "--out", str(out), "--batches", "1", "3", "--no-hf",
                    "--steps", "2", "--requests", "0", "--prompt-len", "9", "--quant", "bf16"])
    frag = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in frag["rows"]] == [("fastinfer bf16", 1)]
    assert any("interrupted" in e for e in frag["errors"])


def test_summarize_kernels():
    """The batch-1 profile's arithmetic (the profiling itself needs a GPU): per-step counts, busy time
    against the GPU span, kernels grouped by name without template arguments, most time first."""
    kernels = [("void fastinfer::gemv::dense_gemv_kernel<__nv_bfloat16, 1, true>(fastinfer::DenseGemvParams)", 0, 10),
               ("void fastinfer::gemv::dense_gemv_kernel<__nv_bfloat16, 1, false>(fastinfer::DenseGemvParams)", 12, 20),
               ("at::native::index_select_kernel", 20, 21),
               ("void fastinfer::gemv::dense_gemv_kernel<__nv_bfloat16, 1, true>(fastinfer::DenseGemvParams)", 30, 40)]
    s = bench_e2e.summarize_kernels(kernels, steps=2)
    assert s["kernels_per_step"] == 2 and s["kernel_us_per_step"] == 14.5 and s["span_us_per_step"] == 20
    assert s["busy"] == pytest.approx(29 / 40)
    assert s["top"][0] == {"kernel": "fastinfer::gemv::dense_gemv_kernel", "per_step": 1.5, "us_per_step": 14.0}
    assert s["top"][1]["kernel"] == "at::native::index_select_kernel"
    assert s["gap_us_mean"] == pytest.approx((2 + 0 + 9) / 3) and s["overlapped"] == 0
    # PDL: a dependent kernel that starts before its predecessor ends shows as a negative gap
    pdl = bench_e2e.summarize_kernels([("a", 0, 10), ("b", 8, 20), ("c", 21, 25)], steps=1)
    assert pdl["gap_us_mean"] == pytest.approx((-2 + 1) / 2) and pdl["overlapped"] == pytest.approx(0.5)
    assert bench_e2e.summarize_kernels([], steps=3) == {"kernels_per_step": 0}


@pytest.mark.slow
def test_bench_e2e_batch_prefilled_over_several_steps(tmp_path):
    """6 prompts of 1500 tokens take two steps of the 8192-token budget: the first chunk's sequences
    decode while the rest prefill. The timed steps must still count as decode steps of every sequence
    (the H200 run of 2026-11-28 lost its batch-128 rows to this)."""
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main(["--tiny", "--device", "cpu", "--out", str(out), "--batches", "6", "--no-hf",
                         "--quant", "bf16", "--steps", "4", "--requests", "1", "--prompt-len", "1500"])
    frag = json.loads(out.read_text())
    assert rc == 0 and frag["errors"] == []
    assert {(r["impl"], r["batch"]) for r in frag["rows"]} == {("fastinfer bf16", 6), ("fastinfer bf16 eager", 6)}
