// Every fastinfer op schema, defined once in every build, and the CPU reference implementations.
// CUDA implementations register from csrc/torch/*.cpp when the build has CUDA.
// Validation with errors naming the argument happens in python/fastinfer/_ops.py before any op
// runs; the TORCH_CHECKs in the kernels' bindings are a second line of defence.
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(fastinfer, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor cu_seqlens_q, "
      "Tensor seq_lens, Tensor block_tables, float scale) -> ()");
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale) -> ()");
  // Speculative decoding: accept a prefix of each request's proposals, then emit one more token
  // (python/fastinfer/_ops.py: speculative_verify documents the arguments).
  m.def(
      "speculative_verify(Tensor(a!) output_token_ids, Tensor(b!) num_accepted, Tensor draft_token_ids, "
      "Tensor num_draft_tokens, Tensor target_probs, Tensor? draft_probs, Tensor? uniform_accept, "
      "Tensor? uniform_sample, bool greedy) -> ()");
  m.def(
      "int4_linear(Tensor(a!) out, Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, "
      "int group_size) -> ()");
}

TORCH_LIBRARY_IMPL(fastinfer, CPU, m) {
  m.impl("rms_norm", &fastinfer::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &fastinfer::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &fastinfer::cpu::rotary_embedding);
  m.impl("silu_and_mul", &fastinfer::cpu::silu_and_mul);
  m.impl("reshape_and_cache", &fastinfer::cpu::reshape_and_cache);
  m.impl("paged_prefill_attention", &fastinfer::cpu::paged_prefill_attention);
  m.impl("paged_decode_attention", &fastinfer::cpu::paged_decode_attention);
  m.impl("speculative_verify", &fastinfer::cpu::speculative_verify);
  m.impl("int4_linear", &fastinfer::cpu::int4_linear);
}
