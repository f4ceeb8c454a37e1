// RMSNorm's per-element formula, shared by the RMSNorm kernels (layers/rmsnorm.cuh) and the per-head
// norm in front of rotary + KV write (kv/append.cuh) without pulling the kernels into every file.
#pragma once
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace rmsnorm {

// One normalized element, rounded to the storage dtype (the unfused output and the FP8 path's input).
template <typename T, typename W = T>  // W: T, or float for Gemma's fp32 1 + w
__device__ __forceinline__ T normalized(T x, float inv_rms, W w) {
  return from_float<T>(to_float(x) * inv_rms * to_float(w));
}

}  // namespace rmsnorm
}  // namespace fastinfer
