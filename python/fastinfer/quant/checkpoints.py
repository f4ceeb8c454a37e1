"""GPTQ and AWQ checkpoints (HF safetensors with a ``quantization_config``) as QuantizedWeight.

GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq" or "gptq_v2"), per linear layer:
    qweight int32 [K / 8, N]   8 codes along K per word, element 8 i + j in bits 4j..4j+3
    qzeros  int32 [G, N / 8]   8 zero points along N per word, same order; format "gptq" stores z - 1
    scales  fp16  [G, N]       w[k, n] = (q - z) * s of group g_idx[k]
    g_idx   int32 [K]          k // group_size unless act-order (desc_act) reordered the groups
AWQ (AutoAWQ "gemm" version):
    qweight int32 [K, N / 8]   8 codes along N per word, column 8 c + ORDER[i] in nibble i
    qzeros  int32 [G, N / 8]   same packing;  scales fp16 [G, N];  w = (q - z) * s
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .int4 import GROUP_SIZES, QuantizedWeight, SYMMETRIC_ZERO
from .linear import QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)           # nibble i holds column ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)   # column c sits in nibble REVERSE[c]
_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
_REQUIRED = ("qweight", "qzeros", "scales")
_SHIFTS = 4 * torch.arange(8, dtype=torch.int32)


def checkpoint_quant_config(config: dict) -> QuantConfig | None:
    """The QuantConfig of an HF config.json dict, None when it is not quantized, ValueError when it
    is quantized in a way fastinfer cannot run."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method in ("fp8", "compressed-tensors"):  # read by quant.fp8 (ModelConfig.quantization)
        return None
    if method not in _PARTS:
        raise ValueError(f"quantization_config quant_method {method!r} is not supported (supported: gptq, awq)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{method} checkpoints with bits={bits!r} are not supported (only 4-bit)")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{method} group_size={group_size!r} is not supported (supported: {GROUP_SIZES}; "
                         f"-1 means one group per row)")
    if method == "gptq":
        fmt = gptq_format(qc)
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format / format {fmt!r} is not supported (gptq, gptq_v2)")
        _refuse_dense_modules(method, qc)
        return QuantConfig("gptq", group_size, "symmetric" if qc.get("sym", True) else "zeros")
    fmt = _one_of(qc, "version", "format", "gemm")  # AutoAWQ's version, transformers 5's format
    if fmt != "gemm":
        raise ValueError(f"AWQ version / format {fmt!r} is not supported (only 'gemm')")
    _refuse_dense_modules(method, qc)
    if not qc.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported")
    return QuantConfig("awq", group_size, "zeros")


def _one_of(qc: dict, old: str, new: str, default: str) -> str:
    """A field two spellings name (an older library's and transformers 5's): they must agree."""
    a, b = qc.get(old), qc.get(new)
    if a is not None and b is not None and str(a).lower() != str(b).lower():
        raise ValueError(f"quantization_config {old}={a!r} and {new}={b!r} disagree")
    return str(a if a is not None else b if b is not None else default).lower()


def gptq_format(qc: dict) -> str:
    """gptq (v1: zero points stored minus one) or gptq_v2: checkpoint_format (AutoGPTQ) or format (GPTQModel,
    transformers 5)."""
    return _one_of(qc, "checkpoint_format", "format", "gptq")


def _refuse_dense_modules(method: str, qc: dict) -> None:
    """GPTQModel's per-module `dynamic` rules (other bits or group sizes, or skipped modules): refused.
    modules_to_not_convert / modules_in_block_to_quantize are accepted: the modules they leave unquantized
    arrive as plain `weight` tensors, which load where fastinfer keeps the layer unquantized (the MoE
    routers, Qwen2-MoE's shared-expert gate, embeddings, the LM head) and are refused by name where it runs
    a 4-bit projection (models/llama_weights.py), never re-quantized."""
    if qc.get("dynamic"):
        raise ValueError(f"{method} quantization_config dynamic={qc['dynamic']!r}: checkpoints with per-module "
                         f"rules (other bits or group sizes, or skipped modules) are not supported")


def convert_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], config: dict) -> Iterator[tuple[str, object]]:
    """HF-named (name, tensor) of a GPTQ / AWQ checkpoint -> (name, tensor or QuantizedWeight): the
    parts of each quantized layer (any order, any shard) become one `<layer>.weight` QuantizedWeight."""
    quant = checkpoint_quant_config(config)
    qc = config["quantization_config"]
    zero_offset = 1 if quant.method == "gptq" and gptq_format(qc) == "gptq" else 0
    parts = _PARTS[quant.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        layer, _, part = name.rpartition(".")
        if part not in parts:
            yield name, tensor
            continue
        got = pending.setdefault(layer, {})
        got[part] = tensor
        if all(p in got for p in parts):
            del pending[layer]
            yield f"{layer}.weight", _convert(quant, got, zero_offset, layer)
    for layer, got in pending.items():  # g_idx is optional
        missing = [p for p in _REQUIRED if p not in got]
        if missing:
            raise ValueError(f"{quant.method} layer {layer!r} lacks {missing}")
        yield f"{layer}.weight", _convert(quant, got, zero_offset, layer)


def _convert(quant: QuantConfig, parts: dict[str, torch.Tensor], zero_offset: int, layer: str) -> QuantizedWeight:
    if quant.method == "gptq":
        return gptq_weight(parts["qweight"], parts["qzeros"], parts["scales"], quant.group_size,
                           parts.get("g_idx"), zero_offset, layer)
    return awq_weight(parts["qweight"], parts["qzeros"], parts["scales"], quant.group_size, layer)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> [..., C, 8] codes, nibble i in bits 4i..4i+3."""
    return (words.to(torch.int32)[..., None] >> _SHIFTS) & 0xF


def _check(layer: str, name: str, t: torch.Tensor, shape: tuple[int, int], dtype=None) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{layer}.{name} has shape {tuple(t.shape)}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{layer}.{name} has dtype {t.dtype}, expected {dtype}")


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                g_idx: torch.Tensor | None = None, zero_offset: int = 1, layer: str = "layer") -> QuantizedWeight:
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    groups = k // group_size
    _check(layer, "qweight", qweight, (k // 8, n), torch.int32)
    _check(layer, "qzeros", qzeros, (groups, n // 8), torch.int32)
    _check(layer, "scales", scales, (groups, n))
    if g_idx is not None:
        _check(layer, "g_idx", g_idx, (k,))
        if not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group_size):
            raise ValueError(f"{layer}: act-order GPTQ (desc_act=True with reordered groups, see g_idx) is not "
                             f"supported; re-quantize with desc_act=False")
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)  # word row i, nibble j -> k = 8 i + j
    if zero_offset:  # v1 stores z - 1 per nibble as one 32-bit subtraction (GPTQModel: z = 0 borrows): add back
        qzeros = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + 0x11111111 * zero_offset) & 0xFFFFFFFF
    zeros = _nibbles(qzeros).reshape(groups, n)
    if bool((zeros == SYMMETRIC_ZERO).all()):
        return QuantizedWeight(codes.t().to(torch.uint8), scales.t(), group_size)
    return QuantizedWeight(codes.t().to(torch.uint8), scales.t(), group_size, zeros=zeros.t().to(scales.dtype))


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               layer: str = "layer") -> QuantizedWeight:
    k, n = qweight.shape[0], 8 * qweight.shape[1]
    groups = k // group_size
    _check(layer, "qweight", qweight, (k, n // 8), torch.int32)
    _check(layer, "qzeros", qzeros, (groups, n // 8), torch.int32)
    _check(layer, "scales", scales, (groups, n))
    reverse = list(AWQ_REVERSE_ORDER)
    codes = _nibbles(qweight)[..., reverse].reshape(k, n)
    zeros = _nibbles(qzeros)[..., reverse].reshape(groups, n)
    return QuantizedWeight(codes.t().to(torch.uint8), scales.t(), group_size, zeros=zeros.t().to(scales.dtype))
