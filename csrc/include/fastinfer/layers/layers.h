// Params and launchers of the fused small layers (RMSNorm, rotary embedding, SiLU-and-mul, embedding).
// Host-compiler safe: the bindings include this; the kernels live in the matching .cuh files.
// Strides are in elements; the last dimension of every tensor is contiguous.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

// out[t] = input[t] / rms(input[t]) * weight                         (residual == nullptr)
// residual[t] += input[t]; input[t] = residual[t] / rms(residual[t]) * weight  (fused add)
struct RMSNormParams {
  void* out;             // [num_tokens, hidden]; equals input for the fused add
  const void* input;     // [num_tokens, hidden]
  void* residual;        // [num_tokens, hidden] or nullptr
  const void* weight;    // [hidden]
  int64_t num_tokens;
  int hidden;
  int64_t out_stride, input_stride, residual_stride;
  float eps;
  DType dtype;
  bool weight_fp32;      // weight is fp32 (Gemma's 1 + w) for a 16-bit input; not with fp8_out
  // FP8 output (rms_norm_quant_fp8), when fp8_out != nullptr: the rounded normalized rows are not
  // stored (out unused; the fused add leaves input as it was) but quantized per token as
  // fp8_quantize_per_token would quantize them: fp8_out e4m3 [num_tokens, hidden] (rows fp8_out_stride
  // apart), fp8_scales fp32 [num_tokens].
  void* fp8_out;
  float* fp8_scales;
  int64_t fp8_out_stride;
};
cudaError_t launch_rms_norm(const RMSNormParams& p, cudaStream_t stream);

// NeoX-style rotary embedding, in place, from a precomputed fp32 cache whose row p holds
// cos(p * inv_freq) then sin(p * inv_freq) ([max_position, rotary_dim]).
struct RotaryParams {
  const int64_t* positions;  // [num_tokens]
  void* query;               // [num_tokens, num_heads, head_dim]
  void* key;                 // [num_tokens, num_kv_heads, head_dim]
  const float* cos_sin_cache;
  int64_t num_tokens;
  int num_heads, num_kv_heads, head_dim, rotary_dim;
  int64_t query_token_stride, query_head_stride, key_token_stride, key_head_stride;
  DType dtype;
};
cudaError_t launch_rotary_embedding(const RotaryParams& p, cudaStream_t stream);

// out[t, i] = silu(input[t, i]) * input[t, d + i]
struct SiluMulParams {
  void* out;          // [num_tokens, d]
  const void* input;  // [num_tokens, 2 * d]
  int64_t num_tokens;
  int d;
  int64_t out_stride, input_stride;
  DType dtype;
  int activation;     // 0 (zero-initialised): silu; 1: gelu_tanh (gelu_tanh_and_mul; not with fp8_out)
  // FP8 output (silu_and_mul_quant_fp8), when fp8_out != nullptr: as RMSNormParams' (out unused).
  void* fp8_out;
  float* fp8_scales;
  int64_t fp8_out_stride;
};
cudaError_t launch_silu_and_mul(const SiluMulParams& p, cudaStream_t stream);

// out[r] = index of the first maximum of fp32 row r (of its first NaN if any): torch.argmax(dim=-1).
struct ArgmaxParams {
  int64_t* out;         // [rows], out_stride apart
  const float* input;   // [rows, cols], rows input_stride apart, last dim contiguous
  int64_t rows, cols;
  int64_t out_stride, input_stride;
};
cudaError_t launch_argmax_rows(const ArgmaxParams& p, cudaStream_t stream);

// out[t] = weight[ids[t]]; sq_sums (or nullptr) [t, g] = sum of out[t, 16 g .. 16 g + 15]^2 in fp32
struct EmbeddingParams {
  void* out;            // [num_tokens, hidden], rows out_stride apart
  float* sq_sums;       // [num_tokens, ceil(hidden / 16)], rows sq_sums_stride apart, or nullptr
  const int64_t* ids;   // [num_tokens]
  const void* weight;   // [vocab, hidden], contiguous
  int64_t num_tokens, vocab, hidden;
  int64_t out_stride, sq_sums_stride;
  DType dtype;
};
cudaError_t launch_embedding(const EmbeddingParams& p, cudaStream_t stream);

}  // namespace fastinfer
