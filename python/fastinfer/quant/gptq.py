"""GPTQ (Frantar et al., 2022): 4-bit weights that minimise the layer's output error on real inputs.

For a projection y = x W^T and calibration inputs X, GPTQ quantizes W column by column (input by
input) and, after each column, spreads that column's rounding error over the columns not yet
quantized so as to minimise ||X W^T - X Q^T||^2. The Hessian of that objective, H = 2 X^T X / n,
is all it needs from the data; its inverse's Cholesky factor gives the update weights.

    hessians = collect_hessians(model, calibration_token_ids)   # one forward per sequence
    quantized = gptq_quantize_model(model, hessians, group_size=128, mode="symmetric")

Hessians come from one pass of the dense model (every layer sees unquantized inputs). Group
parameters are chosen from the error-updated weights when a column opens a new group, as in the
reference implementation; act-order (desc_act) is not used, so the result runs as-is.
"""
from __future__ import annotations

import contextlib

import torch

from ..metadata import SeqChunk
from ..models.llama import LlamaForCausalLM
from .int4 import QuantizedWeight, check_shape, group_params, quantize_values
from .linear import Int4Linear, QuantConfig

PROJECTIONS = ("qkv", "o_proj", "gate_up", "down")
DEFAULT_DAMP = 0.01     # fraction of mean(diag(H)) added to the diagonal
DEFAULT_BLOCK = 128     # columns updated together (lazy batch updates)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, mode: str = "symmetric",
                  scale_dtype: torch.dtype = torch.float16, damp: float = DEFAULT_DAMP,
                  block: int = DEFAULT_BLOCK) -> QuantizedWeight:
    """W [N, K] with H [K, K] -> QuantizedWeight. block must be a multiple of group_size."""
    n, k = weight.shape
    check_shape(n, k, group_size)
    if block % group_size:
        raise ValueError(f"block ({block}) must be a multiple of group_size ({group_size})")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0          # inputs never seen: any weight is as good as another
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    with _one_thread():
        return _gptq_columns(w, h_inv, group_size, mode, scale_dtype, block)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small dependent ops: intra-op fork/join (and idle OpenMP
    workers spinning on a busy machine) cost far more than they save (18x measured on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gptq_columns(w: torch.Tensor, h_inv: torch.Tensor, group_size: int, mode: str, scale_dtype: torch.dtype,
                  block: int) -> QuantizedWeight:
    n, k = w.shape
    groups = k // group_size
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, groups, dtype=scale_dtype)
    zeros = torch.empty_like(scales) if mode == "zeros" else None
    mins = torch.empty_like(scales) if mode == "mins" else None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w_block, err_block, h_block = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0), h_inv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # parameters from the group's current (error-updated) weights
                g = col // group_size
                params = group_params(w_block[:, i:i + group_size], mode, scale_dtype)
                scales[:, g] = params[0]
                for dest, value in ((zeros, params[1]), (mins, params[2])):
                    if dest is not None:
                        dest[:, g] = value
            g = col // group_size
            q = quantize_values(w_block[:, i:i + 1], scales[:, g], None if zeros is None else zeros[:, g],
                                None if mins is None else mins[:, g])[:, 0]
            codes[:, col] = q.to(torch.uint8)
            dequant = _dequantize_column(q, scales[:, g], None if zeros is None else zeros[:, g],
                                         None if mins is None else mins[:, g])
            err = (w_block[:, i] - dequant) / h_block[i, i]
            w_block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, b1:] -= err_block @ h_inv[b0:b1, b1:]
    return QuantizedWeight(codes, scales, group_size, zeros, mins)


def _dequantize_column(q, scales, zeros, mins) -> torch.Tensor:
    s = scales.float()
    if mins is not None:
        return q * s + mins.float()
    return (q - (zeros.float() if zeros is not None else 8.0)) * s


# ---- calibration on a model -----------------------------------------------------------------------

class _HessianRecorder:
    """Stands in for a dense projection (a models.linear.Linear): accumulates sum x^T x over the
    rows it sees, then computes the projection as before."""

    def __init__(self, linear):
        self.linear = linear
        self.sum = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.detach().to("cpu", torch.float64)
        self.sum += xf.t() @ xf
        self.rows += x.shape[0]
        return self.linear(x)

    @property
    def hessian(self) -> torch.Tensor:
        return 2 * self.sum / max(self.rows, 1)


def _refuse_moe(model: LlamaForCausalLM) -> None:
    if model.config.moe_layers:
        raise ValueError(f"GPTQ calibration of mixture-of-experts models ({model.config.architecture}) is not "
                         f"supported: load a GPTQ / AWQ checkpoint, or quantize with quantization='int4' (round-to-nearest)")


def collect_hessians(model: LlamaForCausalLM, sequences: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """H = 2 X^T X / n for every projection of a dense model, X its inputs over the sequences."""
    from ..runner import ModelRunner
    if model.quantization is not None:
        raise ValueError(f"collect_hessians needs the dense model (loaded without quantization), "
                         f"got quantization={model.quantization!r}")
    _refuse_moe(model)
    recorders = {}
    for i, layer in enumerate(model.layers):
        for name in PROJECTIONS:
            recorders[(i, name)] = _HessianRecorder(getattr(layer, name))
            setattr(layer, name, recorders[(i, name)])
    try:
        longest = max(len(s) for s in sequences)
        runner = ModelRunner(model, num_blocks=-(-longest // 16), block_size=16)
        for seq in sequences:
            runner.run([SeqChunk(list(seq), 0, list(range(-(-len(seq) // 16))))])
    finally:
        for (i, name), rec in recorders.items():
            setattr(model.layers[i], name, rec.linear)
    return {key: rec.hessian for key, rec in recorders.items()}


def gptq_quantize_model(model: LlamaForCausalLM, hessians: dict[tuple[int, str], torch.Tensor],
                        group_size: int = 128, mode: str = "symmetric", damp: float = DEFAULT_DAMP) -> LlamaForCausalLM:
    """A new model sharing the dense model's embeddings and norms, its projections GPTQ-quantized."""
    if model.quantization is not None:
        raise ValueError(f"gptq_quantize_model needs the dense model, got quantization={model.quantization!r}")
    _refuse_moe(model)
    quant = QuantConfig("gptq", group_size, mode)
    out = LlamaForCausalLM.__new__(LlamaForCausalLM)
    out.__dict__.update(model.__dict__)
    out.quant, out.quantization = quant, quant.method
    out.layers = []
    for i, layer in enumerate(model.layers):
        new = type(layer).__new__(type(layer))
        new.__dict__.update(layer.__dict__)
        for name in PROJECTIONS:
            dense = getattr(layer, name)
            weight = dense.weight
            q = gptq_quantize(weight.cpu(), hessians[(i, name)], group_size, mode,
                              scale_dtype=model.dtype if model.dtype != torch.float32 else torch.float16, damp=damp)
            projection = Int4Linear(*weight.shape, quant, model.dtype, model.device, bias=dense.bias is not None)
            projection.copy_(q)
            if dense.bias is not None:
                projection.bias.copy_(dense.bias)
            setattr(new, name, projection)
        out.layers.append(new)
    return out
