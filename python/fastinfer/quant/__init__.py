"""Weight quantization formats: fp8 (e4m3, per-channel scales)."""
