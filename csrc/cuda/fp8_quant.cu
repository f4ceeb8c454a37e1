// Instantiates the FP8 activation quantization and the FP8 KV-cache write (every architecture)
// behind the launchers of gemm/fp8.h and kv/kv.h.
#include "fastinfer/gemm/fp8_quant.cuh"
#include "fastinfer/kv/fp8.cuh"

namespace fastinfer {
cudaError_t launch_fp8_quantize_per_token(const Fp8QuantParams& p, cudaStream_t s) {
  return launch_fp8_quantize_per_token_impl(p, s);
}
cudaError_t launch_fp8_quantize_per_tensor(const Fp8QuantParams& p, bool dynamic, cudaStream_t s) {
  return launch_fp8_quantize_per_tensor_impl(p, dynamic, s);
}
cudaError_t launch_reshape_and_cache_fp8(const ReshapeAndCacheParams& p, const float* kv_scale, cudaStream_t s) {
  return launch_reshape_and_cache_fp8_impl(p, kv_scale, s);
}
}  // namespace fastinfer
