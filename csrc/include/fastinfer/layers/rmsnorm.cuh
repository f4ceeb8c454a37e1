// RMSNorm, optionally fused with the residual add that precedes it in every Llama block.
//
//   out = x * rsqrt(mean(x^2) + eps) * weight, in fp32, rounded once to the storage dtype.
//   Fused: residual <- input + residual (rounded to the storage dtype, as the unfused model
//   stores it), then input <- rmsnorm(residual).
//
// Parallelisation: one block per token row; threads stride over the hidden dimension, so each
// warp reads contiguous 128-byte segments. The second pass re-reads the row from L1/L2.
// Roofline (decode, hidden 4096, bf16): 8 KiB read + 8 KiB written per token, pure bandwidth.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace rmsnorm {

constexpr int kMaxThreads = 1024;

template <typename T, bool kFusedAdd>
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
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    out[i] = from_float<T>(to_float(src[i]) * inv_rms * to_float(w[i]));
  }
}

}  // namespace rmsnorm

inline cudaError_t launch_rms_norm_impl(const RMSNormParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  int threads = ((p.hidden + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads > rmsnorm::kMaxThreads ? rmsnorm::kMaxThreads : threads;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    const auto kernel = p.residual != nullptr ? rmsnorm::rms_norm_kernel<T, true> : rmsnorm::rms_norm_kernel<T, false>;
    return launch_kernel(kernel, dim3(static_cast<unsigned>(p.num_tokens)), dim3(threads), 0, stream, p);
  });
}

}  // namespace fastinfer
