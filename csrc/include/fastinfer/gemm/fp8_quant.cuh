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
// Parallelisation (per token): one CTA per row. Roofline (bf16, hidden 4096): 8 KiB read + 4 KiB
// written per token, pure bandwidth; at M = 16 ~200 KiB, well under a microsecond of HBM time.
//
// Per-token rows keep their values in registers between the two passes (kCacheVecs 16-byte vectors
// a thread, rows of up to 16384 16-bit / 8192 fp32 elements whose start and length allow 16-byte loads): every load
// of a thread is issued before the first is used, the amax is reduced, and each vector is converted
// and stored as 8 (4 for fp32) bytes. Other rows take a loop that re-reads the row (from L1 / L2) for
// the second pass, one element per thread and step. That loop was the only path before, and at M = 1
// it was latency-bound: bench_fp8 (H200, visit 4) timed fp8_linear 4.1 us above the GEMM alone at K =
// 4096 and 9.2 us at K = 14336 (56 dependent scalar steps a thread). Predicted for the register path:
// ~1-2 us at both (one round of loads, then ~20 instructions per value of IEEE division on one SM).
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/gemm/fp8.h"
#include "fastinfer/gemm/fp8_quant_math.cuh"

namespace fastinfer {
namespace fp8q {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;

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

constexpr int kCacheVecs = 8;  // 16-byte vectors a thread holds between the passes (32 registers)

// The register path's condition (uniform over the CTA: it depends on the row only): 16-byte aligned
// input rows, output rows aligned to a vector's kVec bytes, whole vectors, and a row that fits.
template <typename T>
__device__ __forceinline__ bool row_fits_registers(const T* row, const __nv_fp8_storage_t* out, int cols) {
  constexpr int kVec = kVecBytes / sizeof(T);
  // cols > 0: an empty row's data pointer may be null, and the path loads unconditionally.
  return cols > 0 && reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && reinterpret_cast<uintptr_t>(out) % kVec == 0 &&
         cols % kVec == 0 && cols <= kThreads * kVec * kCacheVecs;
}

// kVec e4m3 bytes of one 16-byte input vector, packed in input order (kVec = 8: bf16 / fp16; 4: fp32).
template <typename T>
__device__ __forceinline__ void store_quantized(__nv_fp8_storage_t* out, const uint4& raw, float scale) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const T* x = reinterpret_cast<const T*>(&raw);
  uint32_t words[kVec / 4];
#pragma unroll
  for (int w = 0; w < kVec / 4; ++w) {
    words[w] = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) words[w] |= static_cast<uint32_t>(quantize(to_float(x[4 * w + i]), scale)) << (8 * i);
  }
  if constexpr (kVec == 8) {
    *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint32_t*>(out) = words[0];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_per_token_kernel(Fp8QuantParams p) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(p.input) + r * p.input_stride;
  __nv_fp8_storage_t* out = static_cast<__nv_fp8_storage_t*>(p.out) + r * p.out_stride;
  if (!row_fits_registers(row, out, p.cols)) {
    const float scale = dynamic_scale(block_reduce_max(row_amax(row, p.cols)));
    if (threadIdx.x == 0) p.scale[r] = scale;
    quantize_row(out, row, p.cols, scale);
    return;
  }
  // Vector i of this thread starts at column (i * kThreads + threadIdx.x) * kVec. Every load is
  // unconditional (past the row: the row's first vector again), then replaced by zeros: a plain
  // predicated load let ptxas put the first vectors' arithmetic between the loads, waiting on each.
  uint4 v[kCacheVecs];
#pragma unroll
  for (int i = 0; i < kCacheVecs; ++i) {
    const int c = (i * kThreads + threadIdx.x) * kVec;
    v[i] = load_shared_input(row + (c < p.cols ? c : 0));
  }
#pragma unroll
  for (int i = 0; i < kCacheVecs; ++i) {
    if ((i * kThreads + threadIdx.x) * kVec >= p.cols) v[i] = make_uint4(0, 0, 0, 0);
  }
  float amax = 0.0f;  // the zero vectors past the row leave it unchanged (|x| >= 0)
#pragma unroll
  for (int i = 0; i < kCacheVecs; ++i) {
    const T* x = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = nan_max(amax, fabsf(to_float(x[j])));
  }
  const float scale = dynamic_scale(block_reduce_max(amax));
  if (threadIdx.x == 0) p.scale[r] = scale;
#pragma unroll
  for (int i = 0; i < kCacheVecs; ++i) {
    const int c = (i * kThreads + threadIdx.x) * kVec;
    if (c < p.cols) store_quantized<T>(out + c, v[i], scale);
  }
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
