"""HF checkpoint directories of safetensors files (sharded or not). Never unpickles anything."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard(s): {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():  # what HF reads; other *.safetensors beside it (consolidated.*, old exports) are not
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled}: pickled checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no *.safetensors files in {directory}{hint}")
    return files


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard; a truncated or corrupt file is a ValueError, and
    so is a tensor name in two files (which one to use would be a guess)."""
    seen: dict[str, Path] = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in seen:
                        raise ValueError(f"weight {name!r} is in both {seen[name].name} and {path.name}")
                    seen[name] = path
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, Exception) as e:  # safetensors raises SafetensorError
            if isinstance(e, ValueError) and str(e).startswith("weight"):
                raise
            raise ValueError(f"cannot read safetensors file {path}: {e}") from None
