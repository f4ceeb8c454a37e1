"""``Int4Linear``: a linear layer whose weight lives in the packed 4-bit layout, and its config.

The model allocates one per fused matrix (qkv, o, gate_up, down). Loading fills row ranges of it
the way a dense fused matrix is filled through views: ``layer.qkv[:q].copy_(w)`` packs a
``QuantizedWeight`` (GPTQ / AWQ / GGUF, converted by quant.checkpoints / quant.gguf) straight into
its rows, or quantizes a dense tensor with round-to-nearest (``quantization="int4"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ops as ops
from .int4 import GROUP_SIZES, MODES, TILE_N, QuantizedWeight, check_shape, pack, quantize_rtn

METHODS = ("int4", "gptq", "awq", "gguf")


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """How a model's linear layers are quantized. method: where the codes come from (int4 =
    round-to-nearest at load time); mode: symmetric, zeros or mins (quant.int4)."""
    method: str
    group_size: int = 128
    mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of {METHODS}, got {self.method!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {self.mode!r}")


class Int4Linear:
    """y = x @ W^T for a 4-bit W [out_features, in_features]; x: [num_tokens, in_features]."""

    def __init__(self, out_features: int, in_features: int, quant: QuantConfig, dtype: torch.dtype,
                 device: torch.device | str, bias: bool = False):
        check_shape(out_features, in_features, quant.group_size)
        device = torch.device(device)
        if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"4-bit weights on CUDA need dtype float16 or bfloat16, got {dtype}")
        self.quant, self.dtype = quant, dtype
        self.out_features, self.in_features = out_features, in_features
        groups = in_features // quant.group_size
        self.qweight = torch.zeros(out_features // TILE_N, 8 * in_features, dtype=torch.int32, device=device)
        self.scales = torch.zeros(groups, out_features, dtype=dtype, device=device)
        self.zeros = self.mins = None
        if quant.mode == "zeros":
            self.zeros = torch.zeros_like(self.scales)
        elif quant.mode == "mins":
            self.mins = torch.zeros_like(self.scales)
        self.bias = torch.zeros(out_features, dtype=dtype, device=device) if bias else None

    @classmethod
    def stacked(cls, count: int, out_features: int, in_features: int, quant: QuantConfig, dtype: torch.dtype,
                device: torch.device | str) -> tuple[list["Int4Linear"], tuple]:
        """count bias-free layers whose tensors are views of stacked ones (a MoE layer's experts, which
        ops.moe_int4_linear reads whole): (layers, (qweight [count, N / 64, 8 K], scales [count, G, N],
        zeros or None, mins or None)); layers[i].qweight is qweight[i], and so on."""
        first = cls(out_features, in_features, quant, dtype, device)  # its checks; a template for the rest
        tensors = tuple(None if t is None else t.new_zeros((count,) + tuple(t.shape))
                        for t in (first.qweight, first.scales, first.zeros, first.mins))
        layers = []
        for i in range(count):
            layer = cls.__new__(cls)
            layer.__dict__.update(first.__dict__)
            layer.qweight, layer.scales, layer.zeros, layer.mins = (None if t is None else t[i] for t in tensors)
            layers.append(layer)
        return layers, tensors

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.int4_linear(x, self.qweight, self.scales, self.quant.group_size, zeros=self.zeros, mins=self.mins)
        return out if self.bias is None else out.add_(self.bias)

    def rows(self, start: int = 0, stop: int | None = None) -> "Int4Rows":
        """Rows start:stop, as models.linear.Linear.rows: what one checkpoint tensor fills."""
        return self[start:stop]

    def __getitem__(self, rows: slice) -> "Int4Rows":
        start, stop, step = rows.indices(self.out_features)
        if step != 1:
            raise ValueError("Int4Linear rows must be a contiguous slice")
        return Int4Rows(self, start, stop)

    def copy_(self, weight) -> "Int4Linear":
        self[:].copy_(weight)
        return self


class Int4Rows:
    """Output rows start:stop of an Int4Linear, to be filled with copy_ (a multiple of 64 rows)."""

    def __init__(self, linear: Int4Linear, start: int, stop: int):
        if start % TILE_N or stop % TILE_N:
            raise ValueError(f"4-bit weights are packed in strips of {TILE_N} output rows; rows {start}:{stop} "
                             f"do not fall on strip boundaries")
        self.linear, self.start, self.stop = linear, start, stop

    @property
    def shape(self) -> tuple[int, int]:
        return self.stop - self.start, self.linear.in_features

    def copy_(self, weight: QuantizedWeight | torch.Tensor) -> None:
        lin, quant = self.linear, self.linear.quant
        if isinstance(weight, torch.Tensor):  # dense: round-to-nearest here
            weight = quantize_rtn(weight.float(), quant.group_size, quant.mode)  # on the weight's device
        if weight.group_size != quant.group_size:
            raise ValueError(f"weight has group_size {weight.group_size}, the model was built for {quant.group_size}")
        packed = pack(weight.with_mode(quant.mode).to(lin.dtype))
        s0, s1 = self.start // TILE_N, self.stop // TILE_N
        with torch.no_grad():
            lin.qweight[s0:s1].copy_(packed.qweight)
            lin.scales[:, self.start:self.stop].copy_(packed.scales)
            for name in ("zeros", "mins"):
                dest = getattr(lin, name)
                if dest is not None:
                    dest[:, self.start:self.stop].copy_(getattr(packed, name))
