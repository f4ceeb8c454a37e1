// NeoX-style rotary embedding applied in place to query and key.
//
//   for i < rotary_dim / 2:  (x[i], x[i + r/2]) <- (x[i] c - x[i + r/2] s, x[i + r/2] c + x[i] s)
//   with c, s = cache[position][i], cache[position][r/2 + i] (fp32).
// Llama-3 / linear / dynamic rope scaling only changes the cache, never this kernel.
//
// Parallelisation: one block per token; threads stride over (head, pair) for query heads, then
// key heads. Pure bandwidth: each element is read and written once.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace rope {

constexpr int kThreads = 256;

// One rotated pair (x1, x2) = (x[i], x[i + half]) with c, s = cos[i], sin[i], each rounded to T. The
// one formula of rotate() and of the dense GEMV's rotary epilogue (gemm/gemv.cuh).
template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, T& out1, T& out2) {
  out1 = from_float<T>(x1 * c - x2 * s);
  out2 = from_float<T>(x2 * c + x1 * s);
}

template <typename T>
__device__ __forceinline__ void rotate(T* x, const float* cos, const float* sin, int half, int i) {
  rotate_pair<T>(to_float(x[i]), to_float(x[i + half]), cos[i], sin[i], x[i], x[i + half]);
}

// Rotates every query and key head of one token; the block's threads stride over (head, pair).
// Also the first half of kv/append.cuh's fused rotary + KV write.
template <typename T>
__device__ __forceinline__ void rotate_token(T* q, T* k, const float* cos, int rotary_dim, int num_heads,
                                             int num_kv_heads, int64_t q_head_stride, int64_t k_head_stride) {
  const int half = rotary_dim / 2;
  const float* sin = cos + half;
  for (int idx = threadIdx.x; idx < num_heads * half; idx += blockDim.x) {
    rotate(q + (idx / half) * q_head_stride, cos, sin, half, idx % half);
  }
  for (int idx = threadIdx.x; idx < num_kv_heads * half; idx += blockDim.x) {
    rotate(k + (idx / half) * k_head_stride, cos, sin, half, idx % half);
  }
}

template <typename T>
__global__ void rotary_kernel(RotaryParams p) {
  const int64_t t = blockIdx.x;
  rotate_token(static_cast<T*>(p.query) + t * p.query_token_stride, static_cast<T*>(p.key) + t * p.key_token_stride,
               p.cos_sin_cache + p.positions[t] * p.rotary_dim, p.rotary_dim, p.num_heads, p.num_kv_heads,
               p.query_head_stride, p.key_head_stride);
}

}  // namespace rope

inline cudaError_t launch_rotary_embedding_impl(const RotaryParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    rope::rotary_kernel<T><<<p.num_tokens, rope::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
