// Instantiates the dense decode GEMM (bf16, fp16) behind the non-template launcher of gemm/gemv.h.
#include "fastinfer/gemm/gemv.cuh"

namespace fastinfer {
cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t s) { return launch_dense_gemv_impl(p, s); }
}  // namespace fastinfer
