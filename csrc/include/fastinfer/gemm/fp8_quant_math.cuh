// The per-token FP8 quantization's arithmetic (gemm/fp8_quant.cuh's kernels, and the norm and SwiGLU
// kernels that emit FP8 directly: layers/rmsnorm.cuh, layers/silu_mul.cuh): one formula for all, so
// their bytes and scales agree bit for bit.
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/common.cuh"
#include "fastinfer/gemm/fp8.h"

namespace fastinfer {
namespace fp8q {

// max that keeps NaN (fmaxf drops it; the CPU reference keeps it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float block_reduce_max(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(kFullMask, v, offset));
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / kWarpSize ? partial[lane] : 0.0f;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = nan_max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float dynamic_scale(float amax) {
  const float s = __fdiv_rn(amax, kFp8E4m3Max);
  return s != s ? s : (s > kFp8MinScale ? s : kFp8MinScale);
}

__device__ __forceinline__ __nv_fp8_storage_t quantize(float x, float scale) {
  return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
}

}  // namespace fp8q
}  // namespace fastinfer
