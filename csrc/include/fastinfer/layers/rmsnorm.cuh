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
// FP8 output (rms_norm_quant_kernel: rms_norm_quant_fp8, p.fp8_out). An FP8 layer quantizes the
// normalized rows per token before its q/k/v and gate / up GEMMs: a second kernel per norm that
// re-reads the rows. Here the same CTA finishes the job: the normalized values (rounded to T, exactly
// what would be stored) give the row's amax (a second block reduction) and are quantized with
// gemm/fp8_quant_math.cuh's formula, so the bytes and scales equal fp8_quantize_per_token of the
// unfused kernel's output bit for bit. Rows of up to kCache x 1024 elements stay in registers (every
// load issued first); longer ones recompute the values from L1 / L2. One launch less per norm, and no
// [T, hidden] 16-bit row written and read back.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/gemm/fp8_quant_math.cuh"
#include "fastinfer/layers/layers.h"
#include "fastinfer/layers/rmsnorm_math.cuh"

namespace fastinfer {
namespace rmsnorm {

constexpr int kMaxThreads = 1024;

template <typename T, bool kFusedAdd, typename W = T>  // W: the weight's type (float: Gemma's fp32 1 + w)
__global__ void rms_norm_kernel(RMSNormParams p) {
  pdl_wait();  // common.cuh: PDL (FASTINFER_PDL=1)
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* in = static_cast<const T*>(p.input) + row * p.input_stride;
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  T* res = kFusedAdd ? static_cast<T*>(p.residual) + row * p.residual_stride : nullptr;
  const W* w = static_cast<const W*>(p.weight);

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
  for (int i = threadIdx.x; i < p.hidden; i += blockDim.x) out[i] = normalized(src[i], inv_rms, w[i]);
}

// Values a thread of the FP8 kernel keeps in registers between its passes: rows of up to kCache x
// 1024 elements (Llama hidden sizes up to 8192); longer rows recompute them from L1 / L2 instead. A
// 1024-thread CTA has 64 registers a thread (__launch_bounds__ below).
constexpr int kCache = 8;

// rms_norm_kernel's arithmetic (the same threads, the same sum of squares in the same order, the same
// rounded values), then the row's amax, scale and e4m3 values (p.fp8_out; gemm/fp8_quant_math.cuh).
template <typename T, bool kFusedAdd>
__global__ void __launch_bounds__(kMaxThreads, 1) rms_norm_quant_kernel(RMSNormParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* in = static_cast<const T*>(p.input) + row * p.input_stride;
  T* res = kFusedAdd ? static_cast<T*>(p.residual) + row * p.residual_stride : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  auto* q = static_cast<__nv_fp8_storage_t*>(p.fp8_out) + row * p.fp8_out_stride;
  const int n = p.hidden, step = static_cast<int>(blockDim.x);

  if (n <= kCache * step) {  // uniform over the CTA
    // Every load first (clamped to element 0 past the row, then ignored), then the arithmetic.
    T xs[kCache], rs[kCache], ws[kCache];
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int i = threadIdx.x + j * step;
      const int at = i < n ? i : 0;
      xs[j] = in[at];
      if constexpr (kFusedAdd) rs[j] = res[at];
      ws[j] = w[at];
    }
    float v[kCache];
    float sum_sq = 0.0f;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int i = threadIdx.x + j * step;
      float x = to_float(xs[j]);
      if constexpr (kFusedAdd) {
        const T r = from_float<T>(x + to_float(rs[j]));
        if (i < n) res[i] = r;
        x = to_float(r);
      }
      v[j] = x;
      if (i < n) sum_sq += x * x;
    }
    const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / n + p.eps);
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      v[j] = to_float(from_float<T>(v[j] * inv_rms * to_float(ws[j])));  // normalized(), on the cached values
      if (threadIdx.x + j * step < n) amax = fp8q::nan_max(amax, fabsf(v[j]));
    }
    const float scale = fp8q::dynamic_scale(fp8q::block_reduce_max(amax));
    if (threadIdx.x == 0) p.fp8_scales[row] = scale;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int i = threadIdx.x + j * step;
      if (i < n) q[i] = fp8q::quantize(v[j], scale);
    }
    return;
  }
  // rms_norm_kernel's loops, written out again: one shared inline function for both made ptxas spill
  // in the register path above (sm_90a, nvcc 13.0).
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < n; i += step) {
    float x = to_float(in[i]);
    if constexpr (kFusedAdd) {
      const T r = from_float<T>(x + to_float(res[i]));
      res[i] = r;
      x = to_float(r);
    }
    sum_sq += x * x;
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / n + p.eps);
  const T* src = kFusedAdd ? res : in;  // each thread reads back only what it wrote (same i)
  float amax = 0.0f;
  for (int i = threadIdx.x; i < n; i += step) amax = fp8q::nan_max(amax, fabsf(to_float(normalized(src[i], inv_rms, w[i]))));
  const float scale = fp8q::dynamic_scale(fp8q::block_reduce_max(amax));
  if (threadIdx.x == 0) p.fp8_scales[row] = scale;
  for (int i = threadIdx.x; i < n; i += step) q[i] = fp8q::quantize(to_float(normalized(src[i], inv_rms, w[i])), scale);
}

}  // namespace rmsnorm

inline cudaError_t launch_rms_norm_impl(const RMSNormParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  int threads = ((p.hidden + kWarpSize - 1) / kWarpSize) * kWarpSize;
  threads = threads > rmsnorm::kMaxThreads ? rmsnorm::kMaxThreads : threads;
  if (p.weight_fp32 && p.dtype != DType::kFloat32) {  // Gemma's fp32 1 + w over a 16-bit input (no FP8 output)
    if (p.fp8_out != nullptr) return cudaErrorInvalidValue;
    auto launch = [&](auto kernel) {
      return launch_kernel(kernel, dim3(static_cast<unsigned>(p.num_tokens)), dim3(threads), 0, stream, p);
    };
    if (p.dtype == DType::kBFloat16) {
      return p.residual != nullptr ? launch(rmsnorm::rms_norm_kernel<__nv_bfloat16, true, float>)
                                   : launch(rmsnorm::rms_norm_kernel<__nv_bfloat16, false, float>);
    }
    return p.residual != nullptr ? launch(rmsnorm::rms_norm_kernel<__half, true, float>)
                                 : launch(rmsnorm::rms_norm_kernel<__half, false, float>);
  }
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    const bool quant = p.fp8_out != nullptr;
    const auto kernel = p.residual != nullptr ? (quant ? rmsnorm::rms_norm_quant_kernel<T, true>
                                                       : rmsnorm::rms_norm_kernel<T, true>)
                                              : (quant ? rmsnorm::rms_norm_quant_kernel<T, false>
                                                       : rmsnorm::rms_norm_kernel<T, false>);
    return launch_kernel(kernel, dim3(static_cast<unsigned>(p.num_tokens)), dim3(threads), 0, stream, p);
  });
}

}  // namespace fastinfer
