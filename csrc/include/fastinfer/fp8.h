// The FP8 format contract shared by the CPU reference ops, the CUDA kernels and python/fastinfer.
// Plain C++ (no CUDA, no torch): the CPU-only build includes it too.
//
// Values are float8_e4m3fn (1 sign, 4 exponent, 3 mantissa bits; finite range +-448, no infinities).
// A quantized tensor is (q, scale) with x ~= float(q) * scale, and q = e4m3(clamp(x / scale, +-448)):
// one IEEE division (not a multiply by 1/scale, so that every implementation rounds identically),
// clamped, then rounded to nearest even. NaN stays NaN.
//
// Scales, always fp32:
//   activations  per token (one per row of [M, K], computed on the fly) or per tensor ([1]);
//                dynamic scale = max(amax / 448, kFp8MinScale), amax over the row or the tensor.
//   weights      per output channel ([N] for a [N, K] weight, computed the same way per row).
//   KV cache     per layer: kv_scale = [k_scale, v_scale], fixed while the cache lives.
// The floor keeps an all-zero row finite (q = 0) and bounds 1 / scale.
#pragma once

namespace fastinfer {

constexpr float kFp8E4m3Max = 448.0f;
constexpr float kFp8MinScale = 1.0f / (448.0f * 512.0f);

}  // namespace fastinfer
