// Instantiates the dense decode GEMM (bf16, fp16) behind the non-template launcher of gemm/gemv.h.
#include <mutex>

#include "fastinfer/gemm/gemv.cuh"

namespace fastinfer {
namespace {
std::mutex last_prefetch_mutex;
GemvPrefetchInfo last_prefetch{};
}  // namespace

void gemv_record_prefetch(const GemvPrefetchInfo& info) {
  std::lock_guard<std::mutex> lock(last_prefetch_mutex);
  last_prefetch = info;
}

GemvPrefetchInfo gemv_last_prefetch() {
  std::lock_guard<std::mutex> lock(last_prefetch_mutex);
  return last_prefetch;
}

cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t s) { return launch_dense_gemv_impl(p, s); }
}  // namespace fastinfer
