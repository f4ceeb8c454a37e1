// SwiGLU activation: out[t, i] = silu(gate[t, i]) * up[t, i], where input[t] = [gate | up].
//
// Parallelisation: a 2-D grid, x over tokens and y over chunks of the row, so that even one
// decode token spreads over many SMs. Pure bandwidth: 2d elements read, d written per token.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace silu_mul {

constexpr int kThreads = 256;

template <typename T>
__global__ void silu_and_mul_kernel(SiluMulParams p) {
  const int64_t t = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= p.d) return;
  const T* in = static_cast<const T*>(p.input) + t * p.input_stride;
  const float gate = to_float(in[i]);
  const float up = to_float(in[p.d + i]);
  static_cast<T*>(p.out)[t * p.out_stride + i] = from_float<T>(gate / (1.0f + __expf(-gate)) * up);
}

}  // namespace silu_mul

inline cudaError_t launch_silu_and_mul_impl(const SiluMulParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.num_tokens), ceil_div(p.d, silu_mul::kThreads));
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    silu_mul::silu_and_mul_kernel<T><<<grid, silu_mul::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
