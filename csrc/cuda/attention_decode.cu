// Instantiates paged decode attention (every dtype x head_dim 64/128, bf16 / fp16 x 256, plus the split merge) behind
// the non-template plan and launcher of attention/decode.h.
#include "fastinfer/attention/decode.cuh"

namespace fastinfer {
cudaError_t plan_paged_decode(const DecodeParams& p, DecodePlan* plan) { return decode::plan_paged_decode_impl(p, plan); }
cudaError_t launch_paged_decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  return launch_paged_decode_attention_impl(p, workspace, stream);
}
}  // namespace fastinfer
