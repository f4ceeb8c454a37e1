"""`python -m fastinfer env` reports the kernel-variant settings with their values in this process."""
from __future__ import annotations

from fastinfer.env import SETTINGS, env, env_info


def test_settings_are_reported_with_their_values(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTINFER_DECODE_KERNEL", "cuda_cores")
    info = env_info()["settings"]
    assert set(info) == set(SETTINGS)
    assert info["FASTINFER_DECODE_KERNEL"] == {**info["FASTINFER_DECODE_KERNEL"], "value": "cuda_cores", "set": True}
    assert info["FASTINFER_PDL"]["value"] == "0" and not info["FASTINFER_PDL"]["set"]
    text = env()
    assert "FASTINFER_DECODE_KERNEL" in text and "cuda_cores" in text
    assert "FASTINFER_PREFILL_BLOCK_M" in text and "auto (default)" in text


def test_env_lists_every_op():
    info = env_info()
    assert info["ops"] and all("CPU" in impls for impls in info["ops"].values())


def test_pdl_launch_counter_exists():
    from fastinfer import _C
    assert isinstance(_C.pdl_launches(), int) and _C.pdl_launches() >= 0


def test_every_variable_the_extension_reads_is_listed():
    """Each FASTINFER_* variable the C++ / CUDA sources read (getenv, env_choice) is in SETTINGS, so
    `python -m fastinfer env` and the GPU reports show every kernel choice in effect."""
    import re
    from pathlib import Path
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    read = set()
    for path in csrc.rglob("*"):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu"):
            read |= set(re.findall(r'"(FASTINFER_[A-Z0-9_]+)"', path.read_text()))
    assert read, "no FASTINFER_* variables found under csrc/"
    assert read <= set(SETTINGS), sorted(read - set(SETTINGS))
