"""The GGUF container: metadata, tensor table and raw tensor bytes, without interpreting them.

Layout (little endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count; kv_count
(key string, u32 value type, value); tensor_count (name string, u32 n_dims, u64 dims[n_dims]
innermost first, u32 ggml type, u64 offset into the data section); padding to `general.alignment`
(default 32); the data section. A string is a u64 byte length and UTF-8 bytes.

`gguf.GGUFReader` parses the same thing but builds a numpy view per value, which takes ~5 s for
a 49k-token vocabulary on a slow CPU; `struct` over an mmap takes ~0.2 s. Every read is
bounds-checked, so a truncated or corrupt file is a ValueError naming the file, never a crash.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

SUPPORTED_VERSIONS = (2, 3)
_MAX_ARRAY_NESTING = 8  # arrays of arrays of ... (llama.cpp writes at most 2 levels); deeper is corrupt
_MAGIC = b"GGUF"
_SCALAR_FORMATS = {  # GGUFValueType -> struct format
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor as stored: `data` is a read-only uint8 view of the file, one row of blocks per
    output row, shape [*shape[:-1], bytes_per_row]. For Q4_1 a 20-byte block holds fp16 scale d,
    fp16 min m and 32 4-bit values q (low nibbles are elements 0..15): x = d * q + m."""
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, e.g. [out_features, in_features]
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Sequential bounds-checked reads from the header."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid GGUF file ({problem} at byte {self.pos}; "
                          f"the file has {len(self.buf)} bytes, is it truncated?)")

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.fail("header ends early")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        if self.pos + length > len(self.buf):
            raise self.fail(f"string of {length} bytes runs past the end")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def value(self, value_type: int, depth: int = 0) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type == gguf.GGUFValueType.STRING:
            return self.string()
        if value_type == gguf.GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise self.fail(f"arrays nested more than {_MAX_ARRAY_NESTING} deep")
            item_type, count = self.unpack("<IQ")
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                raise self.fail(f"array of {count} items runs past the end")
            if item_type in _SCALAR_FORMATS:
                return list(self.unpack(f"<{count}{_SCALAR_FORMATS[item_type][1]}"))
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise self.fail(f"unknown metadata value type {value_type}")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file and map its tensors (no tensor data is read yet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise ValueError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes)")
        # The mapping outlives the `with`: the tensor views below keep it alive.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    if buf[:4] != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {_MAGIC!r})")
    cur.pos = 4
    version, tensor_count, kv_count = cur.unpack("<IQQ")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        (value_type,) = cur.unpack("<I")
        metadata[key] = cur.value(value_type)
    table = []
    for _ in range(tensor_count):
        name = cur.string()
        (n_dims,) = cur.unpack("<I")
        if n_dims > 4:  # GGML_MAX_DIMS
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = cur.unpack(f"<{n_dims}Q")
        qtype, offset = cur.unpack("<IQ")
        table.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise ValueError(f"{path}: general.alignment must be a positive integer, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {name: _tensor_view(path, buf, name, shape, qtype, data_start + offset)
               for name, shape, qtype, offset in table}
    if len(tensors) != len(table):
        raise ValueError(f"{path}: the tensor table names a tensor twice")
    return GGUFFile(path, metadata, tensors)


def _tensor_view(path: Path, buf, name: str, shape: tuple[int, ...], qtype_id: int, start: int) -> GGUFTensor:
    try:
        qtype = gguf.GGMLQuantizationType(qtype_id)
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {qtype_id}") from None
    if not shape or shape[-1] % block_size:
        raise ValueError(f"{path}: tensor {name!r} of shape {list(shape)} is not a whole number of "
                         f"{qtype.name} blocks of {block_size}")
    byte_shape = (*shape[:-1], shape[-1] // block_size * block_bytes)
    nbytes = math.prod(byte_shape)
    if start + nbytes > len(buf):
        raise ValueError(f"{path}: tensor {name!r} needs bytes {start}..{start + nbytes} but the file has "
                         f"{len(buf)} bytes (truncated?)")
    data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start).reshape(byte_shape)
    return GGUFTensor(name, qtype, shape, data)


def dequantize(tensor: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor's values in `dtype`, in GGUF row order, shape `tensor.shape`."""
    values = gguf.quants.dequantize(tensor.data, tensor.qtype)  # float32, or a read-only view for F32
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(tensor.shape).to(dtype)


def float32_value(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.9999997e-06; keep the decimal it was written as."""
    return float(str(np.float32(value)))
