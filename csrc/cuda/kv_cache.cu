// Instantiates the paged KV-cache write behind the launcher of kv.h.
#include "fastinfer/kv/append.cuh"

namespace fastinfer {
cudaError_t launch_reshape_and_cache(const ReshapeAndCacheParams& p, cudaStream_t s) {
  return launch_reshape_and_cache_impl(p, s);
}
}  // namespace fastinfer
