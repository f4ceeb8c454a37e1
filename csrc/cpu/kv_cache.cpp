// CPU reference: paged KV-cache write (see csrc/include/fastinfer/kv/kv.h for the layout).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/ops.h"

namespace fastinfer::cpu {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping) {
  const int64_t num_tokens = key.size(0), heads = key.size(1), head_dim = key.size(2);
  const int64_t block_size = kv_cache.size(2);
  const int64_t num_slots = kv_cache.size(0) * block_size;
  const int64_t row = heads * head_dim;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "reshape_and_cache", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding
      TORCH_CHECK(slot < num_slots, "reshape_and_cache: slot_mapping[", t, "] = ", slot,
                  " beyond the cache's ", num_slots, " slots");
      const int64_t block = slot / block_size, offset = slot % block_size;
      scalar_t* k_dst = cache + (block * 2 * block_size + offset) * row;
      scalar_t* v_dst = k_dst + block_size * row;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t d = 0; d < head_dim; ++d) {
          k_dst[h * head_dim + d] = k[t * key.stride(0) + h * key.stride(1) + d];
          v_dst[h * head_dim + d] = v[t * value.stride(0) + h * value.stride(1) + d];
        }
      }
    }
  });
}

}  // namespace fastinfer::cpu
