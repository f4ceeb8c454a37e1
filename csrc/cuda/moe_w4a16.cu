// Instantiates the 4-bit MoE decode GEMV (fp16 / bf16 x 3 modes) behind gemm/moe_w4a16.h. Hopper-only
// source, as int4_linear (its own translation unit: w4a16.cu's instantiations are not rebuilt with it).
#include "fastinfer/gemm/moe_w4a16.cuh"

namespace fastinfer {
cudaError_t launch_moe_w4a16(const MoeW4A16Params& p, cudaStream_t stream) { return launch_moe_w4a16_impl(p, stream); }
}  // namespace fastinfer
