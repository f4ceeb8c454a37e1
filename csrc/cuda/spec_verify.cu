// Instantiates the speculative-verify kernel behind the non-template launcher of spec/verify.h.
#include "fastinfer/spec/verify.cuh"

namespace fastinfer {
cudaError_t launch_speculative_verify(const SpecVerifyParams& p, cudaStream_t s) {
  return launch_speculative_verify_impl(p, s);
}
}  // namespace fastinfer
