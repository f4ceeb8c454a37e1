// Paged KV-cache write: copies each token's K and V rows into its slot of the paged cache.
//
// Layout: cache [num_blocks, 2, block_size, num_kv_heads, head_dim]; slot = block * block_size +
// offset; slot -1 marks padding and is skipped. Offsets use 64-bit arithmetic (a cache of
// num_blocks * 2 * block_size * heads * head_dim elements passes 2^31 easily).
// Parallelisation: one block per token, threads over (head, dim). Pure bandwidth.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/kv/kv.h"

namespace fastinfer {
namespace kv {

constexpr int kThreads = 256;

template <typename T>
__global__ void reshape_and_cache_kernel(ReshapeAndCacheParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;  // one token's K or V
  T* k_dst = static_cast<T*>(p.kv_cache) + (block * 2 * p.block_size + offset) * row;
  T* v_dst = k_dst + p.block_size * row;
  const T* k_src = static_cast<const T*>(p.key) + t * p.key_token_stride;
  const T* v_src = static_cast<const T*>(p.value) + t * p.value_token_stride;
  for (int idx = threadIdx.x; idx < row; idx += blockDim.x) {
    const int h = idx / p.head_dim, d = idx % p.head_dim;
    k_dst[idx] = k_src[h * p.key_head_stride + d];
    v_dst[idx] = v_src[h * p.value_head_stride + d];
  }
}

}  // namespace kv

inline cudaError_t launch_reshape_and_cache_impl(const ReshapeAndCacheParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    kv::reshape_and_cache_kernel<T><<<p.num_tokens, kv::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
