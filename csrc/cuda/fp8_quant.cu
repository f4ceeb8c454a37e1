// Instantiates the FP8 activation quantization (every architecture) behind the launchers of
// gemm/fp8.h. The FP8 KV-cache write lives with the plain one (kv/append.cuh, cuda/kv_cache.cu).
#include "fastinfer/gemm/fp8_quant.cuh"

namespace fastinfer {
cudaError_t launch_fp8_quantize_per_token(const Fp8QuantParams& p, cudaStream_t s) {
  return launch_fp8_quantize_per_token_impl(p, s);
}
cudaError_t launch_fp8_quantize_per_tensor(const Fp8QuantParams& p, bool dynamic, cudaStream_t s) {
  return launch_fp8_quantize_per_tensor_impl(p, dynamic, s);
}
}  // namespace fastinfer
