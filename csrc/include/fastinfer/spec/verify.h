// Params and launcher of the speculative-decoding verify op. Host-compiler safe.
//
// For each request b with n = num_draft_tokens[b] <= k proposals draft_token_ids[b, :n]:
// accept a prefix of m proposals, then emit one more token (residual or bonus draw, or the
// target argmax in greedy mode). output_token_ids[b] = accepted tokens, that token, then -1
// padding; num_accepted[b] = m, so m + 1 tokens are emitted. Randomness is an input (uniforms
// drawn by the caller), so CPU and CUDA agree bit for bit and a CUDA graph can capture the op.
// The rule and its arithmetic: fastinfer/spec/verify_math.h.
//
// Strides are in elements; the last (vocabulary) dimension of the probabilities is contiguous,
// the small tensors (ids, counts, uniforms, outputs) are contiguous.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/spec/verify_math.h"

namespace fastinfer {

struct SpecVerifyParams {
  int64_t* output_token_ids;       // [batch, k + 1]
  int32_t* num_accepted;           // [batch]
  const int64_t* draft_token_ids;  // [batch, k]; entries at or past num_draft_tokens[b] ignored
  const int32_t* num_draft_tokens; // [batch], each in [0, k]
  const float* target_probs;       // [batch, k + 1, vocab]
  const float* draft_probs;        // [batch, k, vocab], or nullptr: q is one-hot on the proposal
  const float* uniform_accept;     // [batch, k]; unused when greedy
  const float* uniform_sample;     // [batch]; unused when greedy
  int64_t batch;
  int k, vocab;
  int64_t target_batch_stride, target_pos_stride;
  int64_t draft_batch_stride, draft_pos_stride;
  bool greedy;
};

cudaError_t launch_speculative_verify(const SpecVerifyParams& p, cudaStream_t stream);

}  // namespace fastinfer
