// Instantiates the paged prefill attention kernels (bf16 / fp16 tensor-core, fp32 CUDA-core; head
// dims 64 and 128, and 256 for bf16 / fp16 over a 16-bit cache) behind the launcher of attention/prefill.h.
#include "fastinfer/attention/prefill.cuh"

namespace fastinfer {
cudaError_t launch_paged_prefill_attention(const PrefillParams& p, cudaStream_t s) {
  return launch_paged_prefill_attention_impl(p, s);
}
}  // namespace fastinfer
