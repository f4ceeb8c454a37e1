// Instantiates the sm_90a FP8 GEMM (wgmma + TMA) behind the launchers of gemm/fp8.h.
// Listed in FASTINFER_SM90_SOURCES: compiled for 90a only.
#include "fastinfer/gemm/fp8_sm90.cuh"

namespace fastinfer {
size_t fp8_gemm_workspace_bytes(const Fp8GemmParams& p) { return fp8_gemm_workspace_bytes_impl(p); }
cudaError_t launch_fp8_gemm_sm90(const Fp8GemmParams& p, void* workspace, cudaStream_t s) {
  return launch_fp8_gemm_sm90_impl(p, workspace, s);
}
}  // namespace fastinfer
