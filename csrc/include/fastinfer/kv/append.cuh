// Paged KV-cache write: copies each token's K and V rows into its slot of the paged cache, or for an
// FP8 cache (p.kv_scale set) quantizes them: stored = e4m3(clamp(x / scale)) with scale = kv_scale[0]
// for K, kv_scale[1] for V (fastinfer/fp8.h), bit-exact with the CPU reference (IEEE division, round
// to nearest even, saturating). kv_scale lives on the device, so a captured graph reads its current value.
//
// Layout: cache [num_blocks, 2, block_size, num_kv_heads, head_dim]; slot = block * block_size +
// offset; slot -1 marks padding and is skipped. Offsets use 64-bit arithmetic (a cache of
// num_blocks * 2 * block_size * heads * head_dim elements passes 2^31 easily).
// Parallelisation: one block per token, threads over (head, dim). Pure bandwidth: 2 x row x
// sizeof(T) read, 2 x row x sizeof(cache element) written per token.
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/kv/kv.h"
#include "fastinfer/layers/rmsnorm_math.cuh"
#include "fastinfer/layers/rope.cuh"

namespace fastinfer {
namespace kv {

constexpr int kThreads = 256;

// One element as the cache stores it: a copy, or quantized with its scale.
template <typename T, bool kFp8>
__device__ __forceinline__ auto cache_element(T x, float scale) {
  if constexpr (kFp8) {
    return __nv_cvt_float_to_fp8(__fdiv_rn(to_float(x), scale), __NV_SATFINITE, __NV_E4M3);
  } else {
    return x;
  }
}

// Per-head RMSNorm of one token's query and key heads in place (p.q_norm / p.k_norm: Qwen3), a warp
// per head: rms_norm_kernel's formula over head_dim (the sum of squares in another order).
template <typename T>
__device__ __forceinline__ void norm_heads(const ReshapeAndCacheParams& p, T* q, T* k) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  for (int h = warp; h < p.num_heads + p.num_kv_heads; h += num_warps) {
    const bool is_q = h < p.num_heads;
    T* x = is_q ? q + h * p.query_head_stride : k + (h - p.num_heads) * p.key_head_stride;
    const T* w = static_cast<const T*>(is_q ? p.q_norm : p.k_norm);
    float sum_sq = 0.0f;
    for (int d = lane; d < p.head_dim; d += kWarpSize) {
      const float v = to_float(x[d]);
      sum_sq += v * v;
    }
    const float inv_rms = rsqrtf(warp_reduce_sum(sum_sq) / p.head_dim + p.norm_eps);
    for (int d = lane; d < p.head_dim; d += kWarpSize) x[d] = rmsnorm::normalized(x[d], inv_rms, w[d]);
  }
}

// kRope: rotate query and key in place first (every token, padding too, as rotary_embedding does;
// with p.q_norm set, each head RMS-normalized before), then write the rotated key: one launch and one
// pass over key instead of two (four with the norms).
template <typename T, bool kFp8, bool kRope>
__global__ void reshape_and_cache_kernel(ReshapeAndCacheParams p) {
  pdl_wait();  // common.cuh: PDL (FASTINFER_PDL=1)
  pdl_launch_dependents();
  using C = decltype(cache_element<T, kFp8>(T{}, 1.0f));
  const int64_t t = blockIdx.x;
  if constexpr (kRope) {
    T* q = static_cast<T*>(p.query) + t * p.query_token_stride;
    T* k = static_cast<T*>(p.key) + t * p.key_token_stride;
    if (p.q_norm != nullptr) {  // uniform over the grid
      norm_heads<T>(p, q, k);
      __syncthreads();  // the rotation pairs elements other warps normalized
    }
    rope::rotate_token(q, k, p.cos_sin_cache + p.positions[t] * p.rotary_dim, p.rotary_dim, p.num_heads,
                       p.num_kv_heads, p.query_head_stride, p.key_head_stride);
    __syncthreads();  // the copy below reads key elements other threads rotated
  }
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const float k_scale = kFp8 ? p.kv_scale[0] : 1.0f, v_scale = kFp8 ? p.kv_scale[1] : 1.0f;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;  // one token's K or V
  C* k_dst = static_cast<C*>(p.kv_cache) + (block * 2 * p.block_size + offset) * row;
  C* v_dst = k_dst + p.block_size * row;
  const T* k_src = static_cast<const T*>(p.key) + t * p.key_token_stride;
  const T* v_src = static_cast<const T*>(p.value) + t * p.value_token_stride;
  for (int idx = threadIdx.x; idx < row; idx += blockDim.x) {
    const int h = idx / p.head_dim, d = idx % p.head_dim;
    k_dst[idx] = cache_element<T, kFp8>(k_src[h * p.key_head_stride + d], k_scale);
    v_dst[idx] = cache_element<T, kFp8>(v_src[h * p.value_head_stride + d], v_scale);
  }
}

}  // namespace kv

inline cudaError_t launch_reshape_and_cache_impl(const ReshapeAndCacheParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const bool rope = p.positions != nullptr;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    auto launch = [&](auto kernel) {
      return launch_kernel(kernel, dim3(static_cast<unsigned>(p.num_tokens)), dim3(kv::kThreads), 0, stream, p);
    };
    if (p.kv_scale != nullptr) {
      return rope ? launch(kv::reshape_and_cache_kernel<T, true, true>)
                  : launch(kv::reshape_and_cache_kernel<T, true, false>);
    }
    return rope ? launch(kv::reshape_and_cache_kernel<T, false, true>)
                : launch(kv::reshape_and_cache_kernel<T, false, false>);
  });
}

}  // namespace fastinfer
