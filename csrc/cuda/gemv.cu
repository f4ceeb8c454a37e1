// Instantiates the dense decode GEMM (bf16, fp16) behind the non-template launcher of gemm/gemv.h.
#include "fastinfer/gemm/gemv.cuh"
#include "fastinfer/last_record.h"

namespace fastinfer {
namespace {
LastRecord<GemvPrefetchInfo> last_prefetch;
}  // namespace

void gemv_record_prefetch(const GemvPrefetchInfo& info) { last_prefetch.set(info); }

GemvPrefetchInfo gemv_last_prefetch() { return last_prefetch.get(); }

cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t s) { return launch_dense_gemv_impl(p, s); }
}  // namespace fastinfer
