"""The C++ microbenchmarks' output code (bench/bench_common.cuh: markdown table, JSON fragment) with
fabricated rows, compiled host-side with nvcc: the fragment is valid JSON in bench/common.py's
format, report.py renders it, and the binary's own table equals the one report.py prints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import report  # noqa: E402

HARNESS = r"""
#include "bench_common.cuh"
using namespace bench;
int main(int, char** argv) {
  Device d{};
  std::snprintf(d.prop.name, sizeof d.prop.name, "NVIDIA H200 \"x\"");
  d.prop.major = 9;
  d.prop.multiProcessorCount = 132;
  d.prop.totalGlobalMem = size_t(140) << 30;
  d.runtime_version = 13000;
  std::vector<Column> cols = {{"case", "case", ""}, {"block", "block", "d"}, {"us", "time (us)", ".1f"},
                              {"tbps", "TB/s", ".2f"}, {"frac", "of copy BW", ".1%"}, {"e", "err", ".1e"},
                              {"x", "x", ""}};
  std::vector<Row> rows = {
      {{"case", "B64 H32/8"}, {"block", 16LL}, {"us", 251.25}, {"tbps", 4.2749}, {"frac", 0.8512}, {"e", 1.5e-3},
       {"x", 7LL}},
      {{"case", "q\"\\\t"}, {"block", 64LL}, {"us", std::monostate{}}, {"tbps", std::nan("")}, {"frac", 0.5},
       {"x", 0.25}}};
  print_table(cols, rows);
  write_fragment(argv[1], "decode_cpp", "Decode, C++", d, {"note \"1\""}, cols, rows,
                 {{"copy", {{"bytes", 2.0 * kCopyBytes}, {"gbps", 4294.5}}}});
}
"""


def _nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.slow
def test_cpp_fragment_renders_like_python(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    (tmp_path / "h.cu").write_text(HARNESS)
    subprocess.run([nvcc, "-std=c++20", "-arch=sm_90a", f"-I{BENCH}", "-o", str(tmp_path / "h"),
                    str(tmp_path / "h.cu")], check=True, timeout=600)
    frag_path = tmp_path / "out" / "bench" / "decode_cpp.json"
    printed = subprocess.run([str(tmp_path / "h"), str(frag_path)], check=True, capture_output=True,
                             text=True).stdout
    frag = json.loads(frag_path.read_text())
    assert frag["device"] == {"name": 'NVIDIA H200 "x"', "capability": "sm_90", "sms": 132, "memory_gib": 140,
                              "torch": None, "cuda": "13.0"}
    assert frag["rows"][1] == {"case": 'q"\\\t', "block": 64, "us": None, "tbps": None, "frac": 0.5, "x": 0.25}
    assert frag["copy"] == {"bytes": 2**31, "gbps": 4294.5} and frag["notes"] == ['note "1"']
    table = common.markdown_table(frag["columns"], frag["rows"])
    assert table in printed
    assert "| B64 H32/8 | 16 | 251.2 | 4.27 | 85.1% | 1.5e-03 | 7 |" in table
    md = report.render_markdown(report.build_report(tmp_path / "out", "c", "2026-01-01"))
    assert "### Decode, C++" in md and table in md
