"""FP8 checkpoints and weight quantization for ``quantization="fp8"``.

fastinfer's FP8 linear layer holds an e4m3 weight [out, in] with one fp32 scale per output channel
(csrc/include/fastinfer/fp8.h). Weights arrive in one of these forms and are converted on load:

  bf16 / fp16 / fp32 weight     quantized per output channel (fastinfer.ops.fp8_quantize_per_token
                                on the rows of the weight): scale = amax(row) / 448.
  compressed-tensors FP8        `weight` e4m3 + `weight_scale` fp32: [N] or [N, 1] (strategy
  (quant_method "compressed-    "channel") is copied; [1] or a scalar (strategy "tensor", also the
  tensors", float 8-bit)        AutoFP8 / HF "fp8" per-tensor layout) is broadcast to every row,
                                which is exact.
  HF fine-grained FP8           `weight` e4m3 + `weight_scale_inv` fp32 [ceil(N/bn), ceil(K/bk)]
  (quant_method "fp8",          (w = q * scale_inv per bn x bk block; compressed-tensors "block"
  weight_block_size [bn, bk])   strategy ships the same as `weight_scale`): no per-channel form is
                                exact, so the weight is dequantized and re-quantized per channel.
  `input_scale` (static activation scales) is ignored: activations are always quantized per token
  on the fly, which is at least as accurate. Modules a checkpoint leaves unquantized ("ignore",
  "modules_to_not_convert") arrive in bf16 and are quantized on load like any bf16 weight;
  embeddings and lm_head always stay in the model dtype (an FP8 one is dequantized, w = q * scale).
  With tie_word_embeddings the head is the embedding; an lm_head such a checkpoint stores anyway
  (FP8 or not) is dequantized and used if it differs, as transformers does, with a warning
  (models/llama.py LlamaForCausalLM._load_tied_head).
  A compressed-tensors config that quantizes only the KV cache (kv_cache_scheme, no config_groups)
  loads as a dense model.
  KV-cache scales: `self_attn.k_scale` / `self_attn.v_scale` fill the layer's kv_scale, used when
  the KV cache is FP8 (kv_cache_dtype="fp8"); without them both scales are 1.0.
"""
from __future__ import annotations

import torch

from .. import _ops as ops
from .._checks import FP8

SCALE_NAMES = ("weight_scale", "weight_scale_inv")
IGNORED_NAMES = ("input_scale",)
FOUR_BIT_METHODS = ("gptq", "awq")
AUX_NAMES = SCALE_NAMES + IGNORED_NAMES  # per-layer tensors an FP8 checkpoint ships besides `weight`


def parse_quantization_config(qc: dict | None) -> tuple[str | None, tuple[int, int] | None]:
    """(quantization, weight_block_size) of an HF config's quantization_config: (None, None) when
    absent or 4-bit (GPTQ / AWQ: quant.checkpoints reads those), ("fp8", None | (bn, bk)) for a
    supported FP8 checkpoint; anything else is a ValueError."""
    if not qc:
        return None, None
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"unsupported fp8 format {qc.get('fmt')!r}; fastinfer loads e4m3 checkpoints")
        return "fp8", _block_size(qc.get("weight_block_size"))
    if method == "compressed-tensors":
        groups = _mapping(qc.get("config_groups") or {}, "config_groups")
        groups = [_mapping(g, f"config_groups.{name}") for name, g in groups.items()]
        if not groups:
            kv = _mapping(qc.get("kv_cache_scheme") or {}, "kv_cache_scheme")
            if not kv:
                raise ValueError("compressed-tensors quantization_config has no config_groups")
            # only the KV cache is quantized: dense weights, the k_scale / v_scale tensors fill kv_scale
            if kv.get("num_bits") != 8 or kv.get("type") != "float":
                raise ValueError(f"unsupported compressed-tensors kv_cache_scheme {kv.get('type')}{kv.get('num_bits')}: "
                                 "fastinfer's FP8 KV cache takes float 8-bit scales")
            return None, None
        block = None
        for g in groups:
            w = _mapping(g.get("weights") or {}, "config_groups weights")
            if w.get("num_bits") != 8 or w.get("type") != "float":
                raise ValueError(f"unsupported compressed-tensors weights {w.get('type')}{w.get('num_bits')}: "
                                 "fastinfer loads FP8 (type float, 8 bits) compressed-tensors checkpoints")
            if w.get("strategy", "tensor") not in ("tensor", "channel", "block"):
                raise ValueError(f"unsupported compressed-tensors weight strategy {w.get('strategy')!r}")
            if w.get("strategy") == "block":
                block = _block_size(w.get("block_structure"))
        return "fp8", block
    if str(method).lower() in FOUR_BIT_METHODS:  # read by fastinfer.quant.checkpoints
        return None, None
    raise ValueError(f"unsupported quantization method {method!r} (config.json quantization_config quant_method); "
                     f"fastinfer loads fp8 and compressed-tensors "
                     f"FP8 checkpoints, and 4-bit {' and '.join(FOUR_BIT_METHODS)} checkpoints")


def _mapping(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"quantization_config {name} must be a JSON object, got {value!r}")
    return value


def _block_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value] if isinstance(value, (list, tuple)) else []
    except (TypeError, ValueError, OverflowError):
        sizes = []
    if len(sizes) != 2 or any(v <= 0 for v in sizes):
        raise ValueError(f"weight_block_size must be two positive integers, got {value!r}")
    return sizes[0], sizes[1]


def quantize_rows(dest_weight: torch.Tensor, dest_scale: torch.Tensor, weight: torch.Tensor) -> None:
    """dest_weight (e4m3) / dest_scale (fp32) <- a float weight [rows, in], one scale per row."""
    q, scale = ops.fp8_quantize_per_token(weight.to(dest_weight.device).contiguous())
    dest_weight.copy_(q)
    dest_scale.copy_(scale)


def load_fp8_rows(name: str, dest_weight: torch.Tensor, dest_scale: torch.Tensor, weight: torch.Tensor,
                  scales: dict[str, torch.Tensor], block_size: tuple[int, int] | None) -> None:
    """dest <- an FP8 checkpoint weight [N, K] (e4m3) and its weight_scale or weight_scale_inv."""
    if weight.dtype != FP8:
        raise ValueError(f"weight {name!r} has dtype {weight.dtype}; an FP8 checkpoint weight must be {FP8}")
    n = weight.shape[0]
    scale = scales.get("weight_scale", scales.get("weight_scale_inv")).to(torch.float32)
    if ((weight.view(torch.uint8) & 0x7F) == 0x7F).any():
        # e4m3's NaN codes: W8A8 would give NaN outputs, the W8A16 decode GEMV +-480 (gemv.cuh)
        raise ValueError(f"weight {name!r} holds e4m3 NaN codes (0x7F / 0xFF): the checkpoint is corrupt")
    if scale.numel() == 1:        # per tensor: the same scale on every row
        dest_weight.copy_(weight)
        dest_scale.copy_(scale.reshape(1).expand(n))
    elif scale.numel() == n and (scale.dim() == 1 or tuple(scale.shape) == (n, 1)):  # per channel
        dest_weight.copy_(weight)
        dest_scale.copy_(scale.reshape(n))
    else:                         # per block: dequantize, then per channel (dequantize refuses other shapes)
        quantize_rows(dest_weight, dest_scale, dequantize(name, weight, scales, block_size))


def dequantize(name: str, weight: torch.Tensor, scales: dict[str, torch.Tensor],
               block_size: tuple[int, int] | None) -> torch.Tensor:
    """w = q * scale, fp32 [N, K], of an FP8 checkpoint weight (e4m3) and its weight_scale or
    weight_scale_inv: per tensor, per output channel or per 2-D block. What a layer fastinfer keeps
    in the model dtype (lm_head, embeddings) holds when the checkpoint quantized it."""
    if weight.dtype != FP8:
        raise ValueError(f"weight {name!r} has dtype {weight.dtype}; an FP8 checkpoint weight must be {FP8}")
    n, k = weight.shape
    scale = scales.get("weight_scale", scales.get("weight_scale_inv")).to(torch.float32)
    w = weight.to(torch.float32)
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.numel() == n and (scale.dim() == 1 or tuple(scale.shape) == (n, 1)):
        return w * scale.reshape(n, 1)
    if scale.dim() == 2:
        bn, bk = block_size or (-(-n // scale.shape[0]), -(-k // scale.shape[1]))
        if scale.shape != (-(-n // bn), -(-k // bk)):
            raise ValueError(f"{name}: block scales of shape {tuple(scale.shape)} do not tile [{n}, {k}] in "
                             f"{bn}x{bk} blocks")
        return w * scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    raise ValueError(f"{name}: unsupported weight scale shape {tuple(scale.shape)} for a [{n}, {k}] weight "
                     f"(per tensor, per output channel or per 2-D block are supported)")


class Fp8Parts:
    """Pairs each FP8 checkpoint weight with its scale (a checkpoint may list them in any order)."""

    def __init__(self, block_size: tuple[int, int] | None):
        self.block_size = block_size
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> "weight" / scale name -> tensor

    def add(self, module: str, leaf: str, tensor: torch.Tensor, rows) -> bool:
        """Stash `module.leaf`; True once the module's weight and scale are both in and written to
        rows: a models.linear.LinearRows (FP8), or a plain tensor that fastinfer keeps in the model
        dtype (an FP8-quantized lm_head), which takes the dequantized weight."""
        if leaf in IGNORED_NAMES:
            return False
        parts = self.pending.setdefault(module, {})
        parts[leaf] = tensor
        if "weight" not in parts or len(parts) < 2:
            return False
        del self.pending[module]
        name = module + ".weight"
        weight = parts.pop("weight")
        dest = rows if isinstance(rows, torch.Tensor) else rows.weight
        if tuple(weight.shape) != tuple(dest.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(weight.shape)}, expected {tuple(dest.shape)}")
        with torch.no_grad():
            if isinstance(rows, torch.Tensor):
                rows.copy_(dequantize(name, weight, parts, self.block_size))
            else:
                load_fp8_rows(name, rows.weight, rows.weight_scale, weight, parts, self.block_size)
        return True

    def check_complete(self) -> None:
        for module, parts in self.pending.items():
            if "weight" in parts:
                raise ValueError(f"FP8 weight {module}.weight came without its scale (weight_scale or weight_scale_inv)")
            raise ValueError(f"{module} has a weight scale but no FP8 weight")
