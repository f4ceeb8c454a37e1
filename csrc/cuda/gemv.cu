// Instantiates the dense decode GEMM (bf16, fp16) behind the non-template launcher of gemm/gemv.h, and
// the MoE decode GEMV (gemm/moe_gemv.h), built on its device functions (one translation unit: a second
// one including gemv.cuh would compile every dense_gemv kernel again).
#include "fastinfer/gemm/gemv.cuh"
#include "fastinfer/gemm/moe_gemv.cuh"
#include "fastinfer/last_record.h"

namespace fastinfer {
namespace {
LastRecord<GemvPrefetchInfo> last_prefetch;
}  // namespace

void gemv_record_prefetch(const GemvPrefetchInfo& info) { last_prefetch.set(info); }

GemvPrefetchInfo gemv_last_prefetch() { return last_prefetch.get(); }

cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t s) { return launch_dense_gemv_impl(p, s); }

cudaError_t launch_moe_gemv(const MoeGemvParams& p, cudaStream_t s) { return launch_moe_gemv_impl(p, s); }
}  // namespace fastinfer
