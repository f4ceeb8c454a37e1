// Every fastinfer op schema, defined once in every build, and the CPU reference implementations.
// CUDA implementations register from csrc/torch/*.cpp when the build has CUDA.
// Validation with errors naming the argument happens in python/fastinfer/_ops.py before any op
// runs; the TORCH_CHECKs in the kernels' bindings are a second line of defence.
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(fastinfer, m) {
  // out [T, H] = weight[input_ids]; sq_sums [T, ceil(H / 16)]: each row's sums of squares per 16 columns.
  m.def("embedding(Tensor(a!) out, Tensor(b!)? sq_sums, Tensor input_ids, Tensor weight) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  // gelu_tanh(gate) * up (Gemma's MLP), silu_and_mul's layout and rounding
  m.def("gelu_tanh_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor input) -> ()");
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  // rotary_embedding then reshape_and_cache (or reshape_and_cache_fp8 with kv_scale) in one pass;
  // with q_norm / k_norm (Qwen3), each query / key head is first RMS-normalized in place (rms_norm
  // over head_dim with those weights and norm_eps).
  m.def(
      "rotary_embedding_and_cache(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor value, "
      "Tensor cos_sin_cache, Tensor(c!) kv_cache, Tensor slot_mapping, Tensor? kv_scale=None, "
      "Tensor? q_norm=None, Tensor? k_norm=None, float norm_eps=0.0) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor cu_seqlens_q, "
      "Tensor seq_lens, Tensor block_tables, float scale, Tensor(b!)? lse=None, int window=0, "
      "float softcap=0.0) -> ()");
  // window > 0: sliding-window attention, a query at position p sees keys (p - window, p] (HF's
  // sliding_window); 0: full causal attention. softcap > 0: each score s = scale * q.k becomes
  // softcap * tanh(s / softcap) before the mask and softmax (Gemma 2's attn_logit_softcapping); 0: none.
  // semaphores: int32 [>= batch * num_heads] zeros, left zero; with them the CUDA kernel merges its
  // split-KV partials itself instead of launching a merge kernel (python/fastinfer/_ops.py).
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, Tensor(b!)? semaphores=None, int window=0, float softcap=0.0) -> ()");
  // FP8 e4m3 (csrc/include/fastinfer/fp8.h). scale_a: [1] or [M]; scale_b: [1] or [N]; kv_scale: [2].
  m.def("fp8_quantize_per_token(Tensor(a!) out, Tensor(b!) scales, Tensor input) -> ()");
  m.def("fp8_quantize_per_tensor(Tensor(a!) out, Tensor(b!) scale, Tensor input, bool dynamic) -> ()");
  // rms_norm / fused_add_rms_norm's add (residual) or silu_and_mul, then fp8_quantize_per_token of the
  // result, in one kernel: out e4m3, scales fp32 [rows].
  m.def(
      "rms_norm_quant_fp8(Tensor(a!) out, Tensor(b!) scales, Tensor input, Tensor(c!)? residual, Tensor weight, "
      "float eps) -> ()");
  m.def("silu_and_mul_quant_fp8(Tensor(a!) out, Tensor(b!) scales, Tensor input) -> ()");
  m.def("fp8_scaled_mm(Tensor(a!) out, Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias) -> ()");
  m.def(
      "reshape_and_cache_fp8(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor kv_scale) -> ()");
  m.def(
      "paged_prefill_attention_fp8(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor kv_scale, "
      "Tensor cu_seqlens_q, Tensor seq_lens, Tensor block_tables, float scale, Tensor(b!)? lse=None, "
      "int window=0, float softcap=0.0) -> ()");
  m.def(
      "paged_decode_attention_fp8(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor kv_scale, "
      "Tensor block_tables, Tensor seq_lens, float scale, Tensor(b!)? semaphores=None, int window=0, "
      "float softcap=0.0) -> ()");
  // Speculative decoding: accept a prefix of each request's proposals, then emit one more token
  // (python/fastinfer/_ops.py: speculative_verify documents the arguments).
  m.def(
      "speculative_verify(Tensor(a!) output_token_ids, Tensor(b!) num_accepted, Tensor draft_token_ids, "
      "Tensor num_draft_tokens, Tensor target_probs, Tensor? draft_probs, Tensor? uniform_accept, "
      "Tensor? uniform_sample, bool greedy) -> ()");
  m.def(
      "int4_linear(Tensor(a!) out, Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, "
      "int group_size) -> ()");
  // Decode-sized dense linear: out [M <= 32, N] = x [M, K] @ weight [N, K]^T (+ bias [N]).
  // Every op of this family takes weight_scale: weight is then e4m3 and each output row's sum is
  // multiplied by its fp32 scale (W8A16; gemm/gemv.cuh, "FP8 weights").
  m.def("dense_gemv(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias, Tensor? weight_scale=None) -> ()");
  // Fused gate / up projection: out [M, F] = silu(x @ weight[:F]^T) * (x @ weight[F:]^T), weight [2 F, K].
  m.def("dense_gemv_silu_mul(Tensor(a!) out, Tensor x, Tensor weight, Tensor? weight_scale=None) -> ()");
  // A decode step's residual add + RMSNorm, split across the GEMVs around it. dense_gemv_add_residual:
  // residual [M, N] += x @ weight^T (+ bias), and sq_sums [M, ceil(N / 16)] fp32 = the new residual's
  // sums of squares per 16 columns. rms_norm_dense_gemv: dense_gemv (or, silu_mul, dense_gemv_silu_mul)
  // of rms_norm(x, norm_weight, eps), with x's sums of squares taken from sq_sums.
  m.def(
      "dense_gemv_add_residual(Tensor(a!) residual, Tensor(b!) sq_sums, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor? prefetch=None, int prefetch_bytes=0, bool prefetch_swiglu=False, Tensor? weight_scale=None) -> ()");
  m.def(
      "rms_norm_dense_gemv(Tensor(a!) out, Tensor x, Tensor sq_sums, Tensor norm_weight, float eps, Tensor weight, "
      "Tensor? bias, bool silu_mul, Tensor? prefetch=None, int prefetch_bytes=0, bool prefetch_swiglu=False, "
      "Tensor? weight_scale=None) -> ()");
  // The q/k/v projection of a decode step with rotary_embedding_and_cache in its epilogue (and, given
  // sq_sums and norm_weight, rms_norm_dense_gemv's prologue): query [M, H, D] receives the rotated q.
  m.def(
      "dense_gemv_rope_cache(Tensor(a!) query, Tensor(b!) kv_cache, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor positions, Tensor cos_sin_cache, Tensor slot_mapping, Tensor? sq_sums, Tensor? norm_weight, "
      "float eps, Tensor? prefetch=None, int prefetch_bytes=0, bool prefetch_swiglu=False, Tensor? weight_scale=None) -> ()");
  // Mixture-of-experts decode GEMVs, the expert of each (token, expert) pair read on the device: out[p] =
  // dense_gemv(x[p / x_group], weight[expert_ids[p]]) (or dense_gemv_silu_mul's with silu_mul), weight
  // [E, N, K] (e4m3 with fp32 weight_scale [E, N]: their W8A16 form). Bit for bit those ops with M = 1
  // (gemm/moe_gemv.h).
  m.def(
      "moe_gemv(Tensor(a!) out, Tensor x, Tensor weight, Tensor expert_ids, int x_group, bool silu_mul, "
      "Tensor? weight_scale=None) -> ()");
  // The same for 4-bit experts: out[p] = int4_linear(x[p / x_group], qweight[e], scales[e], zeros / mins[e]) with
  // e = expert_ids[p], the packed layouts stacked along a leading expert dimension (gemm/moe_w4a16.h).
  m.def(
      "moe_int4_linear(Tensor(a!) out, Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, "
      "Tensor expert_ids, int group_size, int x_group) -> ()");
  // The last three take the next GEMV's weight (prefetch) to ask L2 for, about prefetch_bytes of it, as
  // they finish (a hint: results do not change; the CPU ignores it). prefetch_swiglu: that GEMV is the
  // SwiGLU one.
}

TORCH_LIBRARY_IMPL(fastinfer, CPU, m) {
  m.impl("embedding", &fastinfer::cpu::embedding);
  m.impl("rms_norm", &fastinfer::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &fastinfer::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &fastinfer::cpu::rotary_embedding);
  m.impl("silu_and_mul", &fastinfer::cpu::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &fastinfer::cpu::gelu_tanh_and_mul);
  m.impl("argmax_rows", &fastinfer::cpu::argmax_rows);
  m.impl("reshape_and_cache", &fastinfer::cpu::reshape_and_cache);
  m.impl("rotary_embedding_and_cache", &fastinfer::cpu::rotary_embedding_and_cache);
  m.impl("paged_prefill_attention", &fastinfer::cpu::paged_prefill_attention);
  m.impl("paged_decode_attention", &fastinfer::cpu::paged_decode_attention);
  m.impl("fp8_quantize_per_token", &fastinfer::cpu::fp8_quantize_per_token);
  m.impl("fp8_quantize_per_tensor", &fastinfer::cpu::fp8_quantize_per_tensor);
  m.impl("rms_norm_quant_fp8", &fastinfer::cpu::rms_norm_quant_fp8);
  m.impl("silu_and_mul_quant_fp8", &fastinfer::cpu::silu_and_mul_quant_fp8);
  m.impl("fp8_scaled_mm", &fastinfer::cpu::fp8_scaled_mm);
  m.impl("reshape_and_cache_fp8", &fastinfer::cpu::reshape_and_cache_fp8);
  m.impl("paged_prefill_attention_fp8", &fastinfer::cpu::paged_prefill_attention_fp8);
  m.impl("paged_decode_attention_fp8", &fastinfer::cpu::paged_decode_attention_fp8);
  m.impl("speculative_verify", &fastinfer::cpu::speculative_verify);
  m.impl("int4_linear", &fastinfer::cpu::int4_linear);
  m.impl("dense_gemv", &fastinfer::cpu::dense_gemv);
  m.impl("dense_gemv_silu_mul", &fastinfer::cpu::dense_gemv_silu_mul);
  m.impl("moe_gemv", &fastinfer::cpu::moe_gemv);
  m.impl("moe_int4_linear", &fastinfer::cpu::moe_int4_linear);
  m.impl("dense_gemv_add_residual", &fastinfer::cpu::dense_gemv_add_residual);
  m.impl("rms_norm_dense_gemv", &fastinfer::cpu::rms_norm_dense_gemv);
  m.impl("dense_gemv_rope_cache", &fastinfer::cpu::dense_gemv_rope_cache);
}
