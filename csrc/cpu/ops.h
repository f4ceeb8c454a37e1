// CPU reference implementations of every fastinfer op. They are the executable spec of the CUDA
// kernels: plain loops, fp32 arithmetic, one rounding to the storage dtype at the end.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastinfer::cpu {

void embedding(at::Tensor& out, const std::optional<at::Tensor>& sq_sums, const at::Tensor& input_ids,
               const at::Tensor& weight);
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache);
void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input);
// out[r] (int64) = index of the first maximum of fp32 row r, or of its first NaN: torch.argmax(dim=-1).
void argmax_rows(at::Tensor& out, const at::Tensor& input);
// In place: each [t, h] row of x [num_tokens, heads, head_dim] (last dimension contiguous) becomes
// rms_norm(row, weight [head_dim], eps), rms_norm's arithmetic.
void rms_norm_heads(at::Tensor& x, const at::Tensor& weight, double eps);
// Exactly rms_norm_heads of query and key (given q_norm and k_norm), rotary_embedding(positions, query,
// key, cos_sin_cache), then reshape_and_cache (or reshape_and_cache_fp8 when kv_scale is given) of the
// rotated key and value.
void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& cos_sin_cache, at::Tensor& kv_cache,
                                const at::Tensor& slot_mapping, const std::optional<at::Tensor>& kv_scale,
                                const std::optional<at::Tensor>& q_norm = std::nullopt,
                                const std::optional<at::Tensor>& k_norm = std::nullopt, double norm_eps = 0.0);
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping);
// lse (optional): fp32 [num_tokens, num_heads], contiguous: per query row and head, the natural log of
// the softmax denominator, log(sum over visible keys of exp(scale * q . k)).
// window > 0: sliding-window attention, a query at position p sees keys (p - window, p] (attention.cpp).
void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                             const at::Tensor& block_tables, double scale, const std::optional<at::Tensor>& lse,
                             int64_t window, double softcap);
void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const std::optional<at::Tensor>& semaphores, int64_t window, double softcap);
void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins, int64_t group_size);
// out [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]); x / out rows may be strided. weight_scale
// (every op of the family): weight is e4m3 and each row's sum is multiplied by weight_scale[n] (W8A16).
// out[p] = dense_gemv(x[p / x_group], weight[expert_ids[p]]) (silu_mul: dense_gemv_silu_mul's), weight [E, N, K].
void moe_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_ids,
              int64_t x_group, bool silu_mul,
              const std::optional<at::Tensor>& weight_scale);
void moe_int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins,
                     const at::Tensor& expert_ids, int64_t group_size, int64_t x_group);
void dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& weight_scale);
void dense_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& weight_scale);
// The prefetch arguments of the last three (the next GEMV's weight for the CUDA kernel to ask L2 for)
// are a hint and change nothing here.
void dense_gemv_add_residual(at::Tensor& residual, at::Tensor& sq_sums, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prefetch,
                             int64_t prefetch_bytes, bool prefetch_swiglu, const std::optional<at::Tensor>& weight_scale);
void rms_norm_dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& sq_sums, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool silu_mul,
                         const std::optional<at::Tensor>& prefetch, int64_t prefetch_bytes, bool prefetch_swiglu,
                         const std::optional<at::Tensor>& weight_scale);
void dense_gemv_rope_cache(at::Tensor& query, at::Tensor& kv_cache, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& sq_sums, const std::optional<at::Tensor>& norm_weight,
                           double eps,
                           const std::optional<at::Tensor>& prefetch, int64_t prefetch_bytes, bool prefetch_swiglu,
                           const std::optional<at::Tensor>& weight_scale);

void speculative_verify(at::Tensor& output_token_ids, at::Tensor& num_accepted, const at::Tensor& draft_token_ids,
                        const at::Tensor& num_draft_tokens, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniform_accept,
                        const std::optional<at::Tensor>& uniform_sample, bool greedy);


// FP8 (csrc/include/fastinfer/fp8.h): quantization, scaled matmul, FP8 KV cache.
void fp8_quantize_per_token(at::Tensor& out, at::Tensor& scales, const at::Tensor& input);
void fp8_quantize_per_tensor(at::Tensor& out, at::Tensor& scale, const at::Tensor& input, bool dynamic);
// rms_norm (with residual: fused_add_rms_norm's add, residual updated, input untouched) or
// silu_and_mul, then fp8_quantize_per_token of the 16-bit result, which is not kept.
void rms_norm_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input,
                        const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps);
void silu_and_mul_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input);
void fp8_scaled_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                   const at::Tensor& scale_b, const std::optional<at::Tensor>& bias);
void reshape_and_cache_fp8(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping, const at::Tensor& kv_scale);
void paged_prefill_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                 const at::Tensor& kv_scale, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale,
                                 const std::optional<at::Tensor>& lse, int64_t window, double softcap);
void paged_decode_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                const at::Tensor& kv_scale, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale, const std::optional<at::Tensor>& semaphores,
                                int64_t window, double softcap);

}  // namespace fastinfer::cpu
