"""Weight quantization: the packed 4-bit layout of the W4A16 kernels, quantizers, checkpoint
converters (int4, linear, checkpoints, gguf, gptq), and FP8 e4m3 weights with per-channel scales
(fp8). models/linear.py picks a projection's kind from these."""
from .int4 import GROUP_SIZES, PackedInt4, QuantizedWeight, pack, quantize_rtn, unpack
from .linear import METHODS, Int4Linear, QuantConfig

__all__ = ["GROUP_SIZES", "METHODS", "Int4Linear", "PackedInt4", "QuantConfig", "QuantizedWeight", "pack",
           "quantize_rtn", "unpack"]
