// Activation quantization to FP8 e4m3 (format and rounding: fastinfer/fp8.h), every architecture.
//
//   per token:  scale[r] = max(amax(row r) / 448, floor); out[r, c] = e4m3(clamp(x / scale[r]))
//   per tensor: the same with one scale (dynamic: an amax kernel first; static: scale given)
//
// Bit-exact with the CPU reference: amax is exact, the two divisions are IEEE (__fdiv_rn, which
// --use_fast_math would otherwise replace), and the conversion rounds to nearest even with
// saturation (cvt ... satfinite), which equals clamp-then-round because 448 is representable.
// NaN propagates (the max below keeps NaN; satfinite keeps NaN).
//
// Parallelisation (per token): one CTA per row; 16-byte vector loads when the row allows it. The
// first pass finds the amax, the second re-reads the row (from L1/L2) and writes 1 byte per value.
// Roofline (bf16, hidden 4096): 8 KiB read + 4 KiB written per token, pure bandwidth; at M = 16
// this is ~200 KiB, well under a microsecond of HBM time: the launch dominates.
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/gemm/fp8.h"

namespace fastinfer {
namespace fp8q {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;

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

// amax of one row, this thread's share; vectorized when the row start is 16-byte aligned.
template <typename T>
__device__ float row_amax(const T* row, int cols) {
  constexpr int kVec = kVecBytes / sizeof(T);
  float amax = 0.0f;
  const bool vec = (reinterpret_cast<uintptr_t>(row) % kVecBytes) == 0;
  const int vec_cols = vec ? cols / kVec * kVec : 0;
  for (int c = threadIdx.x * kVec; c < vec_cols; c += blockDim.x * kVec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) amax = nan_max(amax, fabsf(to_float(x[i])));
  }
  for (int c = vec_cols + threadIdx.x; c < cols; c += blockDim.x) amax = nan_max(amax, fabsf(to_float(row[c])));
  return amax;
}

template <typename T>
__device__ void quantize_row(__nv_fp8_storage_t* out, const T* row, int cols, float scale) {
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[c] = quantize(to_float(row[c]), scale);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_per_token_kernel(Fp8QuantParams p) {
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(p.input) + r * p.input_stride;
  const float scale = dynamic_scale(block_reduce_max(row_amax(row, p.cols)));
  if (threadIdx.x == 0) p.scale[r] = scale;
  quantize_row(static_cast<__nv_fp8_storage_t*>(p.out) + r * p.out_stride, row, p.cols, scale);
}

// amax of the whole tensor into *amax_bits (zeroed before): non-negative floats (and NaN, whose
// bits are larger than +inf's) order like their int bit patterns, so atomicMax on ints works.
template <typename T>
__global__ void __launch_bounds__(kThreads) tensor_amax_kernel(Fp8QuantParams p) {
  const T* row = static_cast<const T*>(p.input) + static_cast<int64_t>(blockIdx.x) * p.input_stride;
  const float amax = block_reduce_max(row_amax(row, p.cols));
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<int*>(p.scale), __float_as_int(amax));
}

__global__ void amax_to_scale_kernel(float* scale) { *scale = dynamic_scale(*scale); }

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_per_tensor_kernel(Fp8QuantParams p) {
  const int64_t r = blockIdx.x;
  quantize_row(static_cast<__nv_fp8_storage_t*>(p.out) + r * p.out_stride,
               static_cast<const T*>(p.input) + r * p.input_stride, p.cols, *p.scale);
}

}  // namespace fp8q

inline cudaError_t launch_fp8_quantize_per_token_impl(const Fp8QuantParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    fp8q::quantize_per_token_kernel<T><<<p.rows, fp8q::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

inline cudaError_t launch_fp8_quantize_per_tensor_impl(const Fp8QuantParams& p, bool dynamic, cudaStream_t stream) {
  if (dynamic) FI_CUDA_TRY(cudaMemsetAsync(p.scale, 0, sizeof(float), stream));  // amax of nothing: 0 -> floor
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    if (dynamic) {
      if (p.rows > 0) fp8q::tensor_amax_kernel<T><<<p.rows, fp8q::kThreads, 0, stream>>>(p);
      fp8q::amax_to_scale_kernel<<<1, 1, 0, stream>>>(p.scale);
      FI_CUDA_TRY(cudaGetLastError());
    }
    if (p.rows > 0) fp8q::quantize_per_tensor_kernel<T><<<p.rows, fp8q::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
