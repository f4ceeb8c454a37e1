// CUDA binding of the paged KV-cache write.
#include <torch/library.h>

#include "fastinfer/kv/kv.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(key.device());
  ReshapeAndCacheParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = key.size(0);
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(key.size(2));
  p.block_size = static_cast<int>(kv_cache.size(2));
  p.key_token_stride = key.stride(0);
  p.key_head_stride = key.stride(1);
  p.value_token_stride = value.stride(0);
  p.value_head_stride = value.stride(1);
  p.dtype = to_dtype(key, "reshape_and_cache");
  check_launch(launch_reshape_and_cache(p, stream_of(key)), "reshape_and_cache");
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("reshape_and_cache", &fastinfer::torch_glue::reshape_and_cache);
}
