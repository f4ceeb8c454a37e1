// RMSNorm, optionally fused with the residual add that precedes it in every Llama block.
//
//   out = x * rsqrt(mean(x^2) + eps) * weight, in fp32, rounded once to the storage dtype.
//   Fused: residual <- input + residual (rounded to the storage dtype, as the unfused model
//   stores it), then input <- rmsnorm(residual).
//
// Parallelisation: one block per token row; threads stride over the hidden dimension, so each
// warp reads contiguous 128-byte segments. The second pass re-reads the row from L1/L2.
// Roofline (decode, hidden 4096, bf16): 8 KiB read + 8 KiB written per token, pure bandwidth.
//
// FP8 output (kQuant: rms_norm_quant_fp8, p.fp8_out). An FP8 layer quantizes the normalized rows per
// token before its q/k/v and gate / up GEMMs: a second kernel per norm that re-reads the rows. With
// kQuant the same CTA finishes the job: the normalized values (rounded to T, exactly what would be
// stored) give the row's amax (a second block reduction), then each is computed again and quantized
// with gemm/fp8_quant_math.cuh's formula, so the bytes and scales equal fp8_quantize_per_token of the
// unfused kernel's output bit for bit. The values are recomputed rather than kept (any hidden size;
// the row is in L1 / L2). One launch less per norm, and no [T, hidden] 16-bit row written and read back.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/gemm/fp8_quant_math.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace rmsnorm {

constexpr int kMaxThreads = 1024;

// One normalized element, rounded to the storage dtype (the unfused output and the FP8 path's input).
template <typename T>
__device__ __forceinline__ T normalized(T x, float inv_rms, T w) {
  return from_float<T>(to_float(x) * inv_rms * to_float(w));
}

template <typename T, bool kFusedAdd, bool kQuant = false>
__global__ void rms_norm_kernel(RMSNormParams p) {
  pdl_wait();  // common.cuh: PDL (FASTINFER_PDL=1)
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* in = static_cast<const T*>(p.input) + row * p.input_stride;
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  T* res = kFusedAdd ? static_cast<T*>(p.residual) + row * p.residual_stride : nullptr;
  const T* w = static_cast<const T*>(p.weight);

  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    float x = to_float(in[i]);
    if constexpr (kFusedAdd) {
      const T r = from_float<T>(x + to_float(res[i]));
      res[i] = r;
      x = to_float(r);
    }
    sum_sq += x * x;
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / p.hidden + p.eps);
  const T* src = kFusedAdd ? res : in;
  if constexpr (kQuant) {
    // Each thread reads back only what it wrote in the loop above (same i), so no barrier is needed.
    float amax = 0.0f;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
      amax = fp8q::nan_max(amax, fabsf(to_float(normalized(src[i], inv_rms, w[i]))));
    }
    const float scale = fp8q::dynamic_scale(fp8q::block_reduce_max(amax));
    if (threadIdx.x == 0) p.fp8_scales[row] = scale;
    auto* q = static_cast<__nv_fp8_storage_t*>(p.fp8_out) + row * p.fp8_out_stride;
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
      q[i] = fp8q::quantize(to_float(normalized(src[i], inv_rms, w[i])), scale);
    }
  } else {
    for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) out[i] = normalized(src[i], inv_rms, w[i]);
  }
}

}  // namespace rmsnorm

inline cudaError_t launch_rms_norm_impl(const RMSNormParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  int threads = ((p.hidden + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads > rmsnorm::kMaxThreads ? rmsnorm::kMaxThreads : threads;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    const bool quant = p.fp8_out != nullptr;
    const auto kernel = p.residual != nullptr ? (quant ? rmsnorm::rms_norm_kernel<T, true, true>
                                                       : rmsnorm::rms_norm_kernel<T, true, false>)
                                              : (quant ? rmsnorm::rms_norm_kernel<T, false, true>
                                                       : rmsnorm::rms_norm_kernel<T, false, false>);
    return launch_kernel(kernel, dim3(static_cast<unsigned>(p.num_tokens)), dim3(threads), 0, stream, p);
  });
}

}  // namespace fastinfer
