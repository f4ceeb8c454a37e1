// Instantiates the sm_90a FP8 GEMM (wgmma + TMA) behind the launchers of gemm/fp8.h.
// Listed in FASTINFER_SM90_SOURCES: compiled for 90a only.
#include "fastinfer/gemm/fp8_sm90.cuh"

namespace fastinfer {
cudaError_t launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t s) { return launch_fp8_gemm_sm90_impl(p, s); }
}  // namespace fastinfer
