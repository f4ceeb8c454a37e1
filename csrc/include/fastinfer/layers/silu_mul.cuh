// SwiGLU activation: out[t, i] = silu(gate[t, i]) * up[t, i], where input[t] = [gate | up].
//
// Parallelisation: a 2-D grid, x over tokens and y over chunks of the row, so that even one
// decode token spreads over many SMs. Pure bandwidth: 2d elements read, d written per token.
//
// FP8 output (silu_and_mul_quant_fp8, p.fp8_out): the FP8 down projection quantizes this output per
// token. One CTA per token row computes each value (rounded to T, as stored unfused), reduces the
// row's amax, then computes each again and quantizes it with gemm/fp8_quant_math.cuh's formula: the bytes
// and scales of fp8_quantize_per_token on the unfused output, bit for bit, in one launch.
#pragma once
#include <algorithm>

#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/gemm/fp8_quant_math.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace silu_mul {

constexpr int kThreads = 256;

constexpr int kMaxRowThreads = 1024;

// silu(gate) * up, rounded to T: the one formula of both kernels.
template <typename T>
__device__ __forceinline__ T silu_mul_value(T gate_t, T up_t) {
  const float gate = to_float(gate_t);
  return from_float<T>(gate / (1.0f + __expf(-gate)) * to_float(up_t));
}

// gelu_tanh(gate) * up, rounded to T (Gemma's MLP, HF's gelu_pytorch_tanh); tanh_accurate (common.cuh), not
// fast math's tanh.approx.
template <typename T>
__device__ __forceinline__ T gelu_tanh_mul_value(T gate_t, T up_t) {
  const float gate = to_float(gate_t);
  const float act = 0.5f * gate * (1.0f + tanh_accurate(0.7978845608028654f * (gate + 0.044715f * gate * gate * gate)));
  return from_float<T>(act * to_float(up_t));
}

template <typename T, bool kGelu = false>
__global__ void silu_and_mul_kernel(SiluMulParams p) {
  const int64_t t = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= p.d) return;
  const T* in = static_cast<const T*>(p.input) + t * p.input_stride;
  static_cast<T*>(p.out)[t * p.out_stride + i] =
      kGelu ? gelu_tanh_mul_value(in[i], in[p.d + i]) : silu_mul_value(in[i], in[p.d + i]);
}

// Values a thread keeps in registers between the two passes: rows of up to kCache x 1024 (Llama's
// intermediate sizes); longer rows compute them twice. 64 registers a thread at 1024 threads.
constexpr int kCache = 16;

// One CTA per token row: the row's values (every load issued first), their amax, then the values
// quantized. At one token this is one SM's work (~2 us at d = 14336, mostly the ex2 / rcp of silu and
// the IEEE divisions of the quantization, which fp8_quantize_per_token also ran on one SM).
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads, 1) silu_and_mul_quant_kernel(SiluMulParams p) {
  const int64_t t = blockIdx.x;
  const T* in = static_cast<const T*>(p.input) + t * p.input_stride;
  auto* q = static_cast<__nv_fp8_storage_t*>(p.fp8_out) + t * p.fp8_out_stride;
  const int d = p.d, step = static_cast<int>(blockDim.x);
  if (d <= kCache * step) {  // uniform over the CTA
    T gates[kCache], ups[kCache];
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int i = threadIdx.x + j * step;
      const int at = i < d ? i : 0;  // past the row: element 0 again, ignored
      gates[j] = in[at];
      ups[j] = in[d + at];
    }
    float v[kCache];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      v[j] = to_float(silu_mul_value(gates[j], ups[j]));
      if (threadIdx.x + j * step < d) amax = fp8q::nan_max(amax, fabsf(v[j]));
    }
    const float scale = fp8q::dynamic_scale(fp8q::block_reduce_max(amax));
    if (threadIdx.x == 0) p.fp8_scales[t] = scale;
#pragma unroll
    for (int j = 0; j < kCache; ++j) {
      const int i = threadIdx.x + j * step;
      if (i < d) q[i] = fp8q::quantize(v[j], scale);
    }
    return;
  }
  float amax = 0.0f;
  for (int i = threadIdx.x; i < d; i += step) amax = fp8q::nan_max(amax, fabsf(to_float(silu_mul_value(in[i], in[d + i]))));
  const float scale = fp8q::dynamic_scale(fp8q::block_reduce_max(amax));
  if (threadIdx.x == 0) p.fp8_scales[t] = scale;
  for (int i = threadIdx.x; i < d; i += step) q[i] = fp8q::quantize(to_float(silu_mul_value(in[i], in[d + i])), scale);
}

}  // namespace silu_mul

inline cudaError_t launch_silu_and_mul_impl(const SiluMulParams& p, cudaStream_t stream) {
  if (p.fp8_out != nullptr) {
    if (p.activation != 0) return cudaErrorInvalidValue;  // silu only
    if (p.num_tokens == 0) return cudaSuccess;
    if (p.d <= 0 || p.fp8_scales == nullptr) return cudaErrorInvalidValue;
    const int threads = std::min(ceil_div(p.d, kWarpSize) * kWarpSize, silu_mul::kMaxRowThreads);
    return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
      silu_mul::silu_and_mul_quant_kernel<T><<<static_cast<unsigned>(p.num_tokens), threads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  }
  if (p.num_tokens == 0 || p.d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.num_tokens), ceil_div(p.d, silu_mul::kThreads));
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    if (p.activation == 1) {
      silu_mul::silu_and_mul_kernel<T, true><<<grid, silu_mul::kThreads, 0, stream>>>(p);
    } else {
      silu_mul::silu_and_mul_kernel<T><<<grid, silu_mul::kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
