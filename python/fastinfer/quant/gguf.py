"""GGUF Q4_0 / Q4_1 weights as QuantizedWeight, straight from the raw blocks (never through floats).

llama.cpp blocks hold 32 consecutive inputs of one output row: Q4_0 = fp16 d + 16 bytes of codes,
x = d (q - 8) (our symmetric mode); Q4_1 = fp16 d, fp16 m + 16 bytes, x = d q + m (our mins mode).
Byte b of the codes holds element b in its low nibble and element b + 16 in its high nibble.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ..loader.gguf import (check_dequantizable, checked_config, dequantize_hf, hf_tensor_map, interleaved_qk,
                            open_gguf, unpermute_rows)
from ..loader.gguf_tensors import PROJECTION_SUFFIXES
from ..loader.gguf_tokenizer import build_tokenizer
from .int4 import QuantizedWeight
from .linear import QuantConfig

GGUF_GROUP_SIZE = 32
_Q4 = {gguf.GGMLQuantizationType.Q4_0: 2, gguf.GGMLQuantizationType.Q4_1: 4}  # bytes before the codes


def q4_weight(tensor) -> QuantizedWeight:
    """One Q4_0 / Q4_1 GGUFTensor [rows, K] as codes uint8 [rows, K] + fp16 scales (and mins)."""
    if tensor.qtype not in _Q4:
        raise ValueError(f"tensor {tensor.name!r} is {tensor.qtype.name}, not Q4_0 or Q4_1")
    rows, k = tensor.shape
    header = _Q4[tensor.qtype]
    blocks = tensor.data.reshape(rows, k // GGUF_GROUP_SIZE, header + 16)
    halves = np.ascontiguousarray(blocks[..., :header]).view(np.float16)  # [rows, K / 32, 1 or 2]
    qs = blocks[..., header:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, k)
    scales = torch.from_numpy(halves[..., 0].copy())
    mins = torch.from_numpy(halves[..., 1].copy()) if header == 4 else None
    return QuantizedWeight(torch.from_numpy(codes), scales, GGUF_GROUP_SIZE, mins=mins)


def unpermute_weight(weight: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    """loader.gguf.unpermute_rows on every row-indexed part (llama.cpp's q / k row interleave)."""
    part = lambda t: None if t is None else unpermute_rows(t, num_heads)  # noqa: E731
    return QuantizedWeight(part(weight.codes), part(weight.scales), weight.group_size, part(weight.zeros),
                           part(weight.mins))


def read_gguf_int4(path: str | Path, dtype: torch.dtype = torch.float32, validate=None, stream: bool = False):
    """Like loader.gguf.read_gguf, but every linear projection (experts included; not routers) stays 4-bit:
    (config, state dict with QuantizedWeight projections, tokenizer, QuantConfig); stream as read_gguf's."""
    file = open_gguf(path)
    config = checked_config(file, dtype, validate)
    tensors = hf_tensor_map(file, config)
    projections = [name for name in tensors if name.endswith(PROJECTION_SUFFIXES)]
    other = sorted({tensors[n].qtype.name for n in projections} - {t.name for t in _Q4})
    if other:
        example = next(n for n in projections if tensors[n].qtype.name in other)
        raise ValueError(f"{file.path}: quantization='gguf' runs Q4_0 / Q4_1 projections natively, but {example} "
                         f"is {tensors[example].qtype.name} (types {other}); load without quantization to "
                         f"dequantize instead")
    tokenizer = build_tokenizer(file.metadata, file.path)
    heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
             "self_attn.k_proj.weight": config["num_key_value_heads"]} if interleaved_qk(config) else {}
    check_dequantizable(file, [t for n, t in tensors.items() if n not in projections])

    def converted(name: str, tensor):
        if name not in projections:
            return dequantize_hf(tensor, name, config, dtype)
        weight = q4_weight(tensor)
        suffix = name.split(".", 3)[-1]
        return unpermute_weight(weight, heads[suffix]) if suffix in heads else weight
    items = ((name, converted(name, tensor)) for name, tensor in tensors.items())
    state = items if stream else dict(items)
    all_q4_0 = all(tensors[n].qtype == gguf.GGMLQuantizationType.Q4_0 for n in projections)
    quant = QuantConfig("gguf", GGUF_GROUP_SIZE, "symmetric" if all_q4_0 else "mins")
    return config, state, tokenizer, quant
