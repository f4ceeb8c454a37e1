// Params and launcher of the paged KV-cache write. Host-compiler safe.
//
// KV cache of one layer: [num_blocks, 2, block_size, num_kv_heads, head_dim] (K then V),
// contiguous. Token t goes to slot slot_mapping[t] = block * block_size + offset; -1 is skipped.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

struct ReshapeAndCacheParams {
  void* key;                   // [num_tokens, num_kv_heads, head_dim]; written only with positions set
  const void* value;           // [num_tokens, num_kv_heads, head_dim]
  void* kv_cache;              // [num_blocks, 2, block_size, num_kv_heads, head_dim]
  const int64_t* slot_mapping; // [num_tokens]
  // nullptr: kv_cache has dtype's elements. Otherwise fp32 [2] = (k_scale, v_scale) on the device and
  // kv_cache holds float8_e4m3fn: stored = e4m3(clamp(x / kv_scale[0 for K, 1 for V])).
  const float* kv_scale;
  int64_t num_tokens;
  int num_kv_heads, head_dim, block_size;
  int64_t key_token_stride, key_head_stride, value_token_stride, value_head_stride;
  DType dtype;                  // of key and value
  // Optional fused rotary embedding (rotary_embedding_and_cache): with positions set, query and key
  // are first rotated in place exactly as layers.h's RotaryParams describes, then key is written.
  const int64_t* positions;     // [num_tokens] or nullptr
  const float* cos_sin_cache;   // [max_position, rotary_dim]
  void* query;                  // [num_tokens, num_heads, head_dim]
  int num_heads, rotary_dim;
  int64_t query_token_stride, query_head_stride;
  // Optional per-head RMSNorm before the rotary (Qwen3's q_norm / k_norm; needs positions set): each
  // query and key head x becomes x * rsqrt(mean(x^2) + norm_eps) * weight, rounded once to dtype as
  // layers.h's RMSNorm rounds, in place. Both [head_dim] in dtype, or both nullptr.
  const void* q_norm;
  const void* k_norm;
  float norm_eps;
};
cudaError_t launch_reshape_and_cache(const ReshapeAndCacheParams& p, cudaStream_t stream);

}  // namespace fastinfer
