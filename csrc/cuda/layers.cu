// Instantiates the layer kernels for every dtype behind the non-template launchers of layers.h.
#include "fastinfer/layers/argmax.cuh"
#include "fastinfer/layers/embedding.cuh"
#include "fastinfer/layers/rmsnorm.cuh"
#include "fastinfer/layers/rope.cuh"
#include "fastinfer/layers/silu_mul.cuh"

namespace fastinfer {
cudaError_t launch_rms_norm(const RMSNormParams& p, cudaStream_t s) { return launch_rms_norm_impl(p, s); }
cudaError_t launch_rotary_embedding(const RotaryParams& p, cudaStream_t s) {
  return launch_rotary_embedding_impl(p, s);
}
cudaError_t launch_silu_and_mul(const SiluMulParams& p, cudaStream_t s) { return launch_silu_and_mul_impl(p, s); }
cudaError_t launch_embedding(const EmbeddingParams& p, cudaStream_t s) { return launch_embedding_impl(p, s); }
cudaError_t launch_argmax_rows(const ArgmaxParams& p, cudaStream_t s) { return launch_argmax_rows_impl(p, s); }
long long pdl_launch_count() { return pdl_launches.load(std::memory_order_relaxed); }  // common.cuh
}  // namespace fastinfer
