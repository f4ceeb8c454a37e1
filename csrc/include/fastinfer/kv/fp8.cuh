// FP8 KV-cache write: quantizes each token's K and V rows into an e4m3 paged cache with the layer's
// scales, stored = e4m3(clamp(x / scale)) (fastinfer/fp8.h), bit-exact with the CPU reference
// (IEEE division, round to nearest even, saturating).
//
// Layout and slot rules as kv/append.cuh ([num_blocks, 2, block_size, num_kv_heads, head_dim]);
// kv_scale = [k_scale, v_scale] lives on the device, so a captured graph reads its current value.
// Parallelisation: one CTA per token, threads over (head, dim). Pure bandwidth: 2 x row x
// sizeof(T) read, 2 x row bytes written per token.
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/kv/kv.h"

namespace fastinfer {
namespace kv {

constexpr int kFp8Threads = 256;

template <typename T>
__global__ void reshape_and_cache_fp8_kernel(ReshapeAndCacheParams p, const float* kv_scale) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const float k_scale = kv_scale[0], v_scale = kv_scale[1];
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  __nv_fp8_storage_t* k_dst = static_cast<__nv_fp8_storage_t*>(p.kv_cache) + (block * 2 * p.block_size + offset) * row;
  __nv_fp8_storage_t* v_dst = k_dst + p.block_size * row;
  const T* k_src = static_cast<const T*>(p.key) + t * p.key_token_stride;
  const T* v_src = static_cast<const T*>(p.value) + t * p.value_token_stride;
  for (int idx = threadIdx.x; idx < row; idx += blockDim.x) {
    const int h = idx / p.head_dim, d = idx % p.head_dim;
    k_dst[idx] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(k_src[h * p.key_head_stride + d]), k_scale),
                                       __NV_SATFINITE, __NV_E4M3);
    v_dst[idx] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(v_src[h * p.value_head_stride + d]), v_scale),
                                       __NV_SATFINITE, __NV_E4M3);
  }
}

}  // namespace kv

inline cudaError_t launch_reshape_and_cache_fp8_impl(const ReshapeAndCacheParams& p, const float* kv_scale,
                                                     cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    kv::reshape_and_cache_fp8_kernel<T><<<p.num_tokens, kv::kFp8Threads, 0, stream>>>(p, kv_scale);
    return cudaGetLastError();
  });
}

}  // namespace fastinfer
