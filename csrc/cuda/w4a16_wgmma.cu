// Instantiates the sm_90a warpgroup-MMA W4A16 kernel (fp16 / bf16 x 3 modes x BN 64 / 128) behind
// launch_w4a16_wgmma (gemm/w4a16.h). Its own translation unit: the two W4A16 units build in parallel.
#include "fastinfer/gemm/w4a16_wgmma.cuh"

namespace fastinfer {
cudaError_t launch_w4a16_wgmma(const W4A16Params& p, cudaStream_t stream) { return launch_w4a16_wgmma_impl(p, stream); }
}  // namespace fastinfer
