"""Weight quantization: the packed 4-bit layout of the W4A16 kernels, quantizers, checkpoint converters."""
from .int4 import GROUP_SIZES, PackedInt4, QuantizedWeight, pack, quantize_rtn, unpack

__all__ = ["GROUP_SIZES", "PackedInt4", "QuantizedWeight", "pack", "quantize_rtn", "unpack"]
