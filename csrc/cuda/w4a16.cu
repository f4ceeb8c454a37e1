// Instantiates the W4A16 GEMM (fp16 / bf16 x 3 modes x 4 row tiles) behind the launcher of
// gemm/w4a16.h. Hopper-only source (thread-block clusters for the split-K reduction).
#include "fastinfer/gemm/w4a16.cuh"

namespace fastinfer {
cudaError_t launch_w4a16_gemm(const W4A16Params& p, cudaStream_t stream) { return launch_w4a16_gemm_impl(p, stream); }
}  // namespace fastinfer
