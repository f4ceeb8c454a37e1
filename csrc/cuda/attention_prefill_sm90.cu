// Instantiates the sm_90a paged prefill attention (wgmma) behind launch_paged_prefill_wgmma.
// Listed in FASTINFER_SM90_SOURCES: compiled for 90a only.
#include "fastinfer/attention/prefill_sm90.cuh"

namespace fastinfer {
cudaError_t launch_paged_prefill_wgmma(const PrefillParams& p, cudaStream_t stream) {
  return launch_paged_prefill_wgmma_impl(p, stream);
}
long long prefill_tma_launch_count() { return prefill::sm90::tma_launches.load(std::memory_order_relaxed); }
}  // namespace fastinfer
