// CPU reference: paged KV-cache write (see csrc/include/fastinfer/kv/kv.h for the layout), in the
// cache's own dtype or quantized to an FP8 cache with per-layer scales (csrc/include/fastinfer/fp8.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/fp8_convert.h"
#include "cpu/ops.h"

namespace fastinfer::cpu {

namespace {

// Writes token t's K and V rows into slot_mapping[t] as Cache values; convert(x, 0|1) maps a K (0)
// or V (1) element to the cache type.
template <typename Cache, typename T, typename Convert>
void write_slots(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                 const char* op, Convert convert) {
  const int64_t num_tokens = key.size(0), heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = kv_cache.size(2);
  const int64_t num_slots = kv_cache.size(0) * block_size;
  const int64_t row = heads * head_dim;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  Cache* cache = static_cast<Cache*>(kv_cache.data_ptr());
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding
    TORCH_CHECK(slot < num_slots, op, ": slot_mapping[", t, "] = ", slot, " beyond the cache's ", num_slots, " slots");
    const int64_t block = slot / block_size, offset = slot % block_size;
    Cache* k_dst = cache + (block * 2 * block_size + offset) * row;
    Cache* v_dst = k_dst + block_size * row;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t d = 0; d < head_dim; ++d) {
        k_dst[h * head_dim + d] = convert(k[t * key.stride(0) + h * key.stride(1) + d], 0);
        v_dst[h * head_dim + d] = convert(v[t * value.stride(0) + h * value.stride(1) + d], 1);
      }
    }
  }
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "reshape_and_cache", [&] {
    write_slots<scalar_t, scalar_t>(key, value, kv_cache, slot_mapping, "reshape_and_cache",
                                    [](scalar_t x, int) { return x; });
  });
}

// FP8 cache: stored = e4m3(clamp(x / kv_scale[0 for K, 1 for V])).
void reshape_and_cache_fp8(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping, const at::Tensor& kv_scale) {
  const float* scales = kv_scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "reshape_and_cache_fp8", [&] {
    write_slots<e4m3, scalar_t>(key, value, kv_cache, slot_mapping, "reshape_and_cache_fp8",
                                [scales](scalar_t x, int which) { return quantize_fp8(static_cast<float>(x), scales[which]); });
  });
}

void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& cos_sin_cache, at::Tensor& kv_cache,
                                const at::Tensor& slot_mapping, const std::optional<at::Tensor>& kv_scale,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                double norm_eps) {
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "rotary_embedding_and_cache: q_norm and k_norm go together");
  if (q_norm.has_value()) {  // the positions are checked before anything is written
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < positions.numel(); ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin_cache.size(0), "rotary_embedding_and_cache: positions[", t,
                  "] = ", pos[t], " outside the cos_sin_cache of ", cos_sin_cache.size(0), " positions");
    }
    rms_norm_heads(query, *q_norm, norm_eps);
    rms_norm_heads(key, *k_norm, norm_eps);
  }
  rotary_embedding(positions, query, key, cos_sin_cache);
  if (kv_scale.has_value()) {
    reshape_and_cache_fp8(key, value, kv_cache, slot_mapping, *kv_scale);
  } else {
    reshape_and_cache(key, value, kv_cache, slot_mapping);
  }
}

}  // namespace fastinfer::cpu
