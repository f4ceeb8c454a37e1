// CPU reference implementations of every fastinfer op. They are the executable spec of the CUDA
// kernels: plain loops, fp32 arithmetic, one rounding to the storage dtype at the end.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastinfer::cpu {

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache);
void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping);
void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                             const at::Tensor& block_tables, double scale);
void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins, int64_t group_size);

void speculative_verify(at::Tensor& output_token_ids, at::Tensor& num_accepted, const at::Tensor& draft_token_ids,
                        const at::Tensor& num_draft_tokens, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniform_accept,
                        const std::optional<at::Tensor>& uniform_sample, bool greedy);

}  // namespace fastinfer::cpu
