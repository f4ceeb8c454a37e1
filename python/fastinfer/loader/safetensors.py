"""HF checkpoint directories of safetensors files (sharded or not). Never unpickles anything."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..config import read_json

# Pickle-based checkpoint formats: named in the error when a directory has no safetensors, never opened.
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _index_files(directory: Path, index: Path) -> list[Path]:
    """The shard files an index.json names, each checked to be a file name inside `directory`."""
    data = read_json(index, "safetensors index")
    if not isinstance(data, dict) or "weight_map" not in data:
        raise ValueError(f"{index} is not a valid safetensors index: it has no 'weight_map' object")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names to "
                         f"shard file names")
    if not weight_map:
        raise ValueError(f"{index} is not a valid safetensors index: 'weight_map' is empty")
    root = directory.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        file = directory / name
        if Path(name).is_absolute() or not file.resolve().is_relative_to(root):
            raise ValueError(f"{index} names shard {name!r} outside the checkpoint directory {directory}")
        files.append(file)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names missing shard(s): {missing}")
    return files


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return _index_files(directory, index)
    single = directory / "model.safetensors"
    if single.exists():  # what HF reads; other *.safetensors beside it (consolidated.*, old exports) are not
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for pattern in _PICKLED for p in sorted(directory.glob(pattern))]
        hint = f" (found {pickled}: pickled checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no *.safetensors files in {directory}{hint}")
    return files


def _unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"cannot read safetensors file {path}: {e}")


def scan_safetensors(directory: Path) -> list[tuple[Path, list[str]]]:
    """(file, tensor names) of every shard, from the headers alone (no tensor data is read): a corrupt
    header, or a tensor name in two files (which one to use would be a guess), is a ValueError here."""
    seen: dict[str, Path] = {}
    shards = []
    for path in checkpoint_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises SafetensorError (an Exception), OSError, ...
            raise _unreadable(path, e) from None
        for name in names:
            if name in seen:
                raise ValueError(f"weight {name!r} is in both {seen[name].name} and {path.name}")
            seen[name] = path
        shards.append((path, names))
    return shards


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard. Every shard's header is checked first, when
    this is called (scan_safetensors); a file that then fails to read is a ValueError naming it."""
    return read_tensors(scan_safetensors(directory))


def read_tensors(shards: list[tuple[Path, list[str]]]) -> Iterator[tuple[str, torch.Tensor]]:
    for path, names in shards:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except GeneratorExit:
            raise
        except Exception as e:
            raise _unreadable(path, e) from None
