// CUDA binding of the speculative-decoding verify op: tensors -> Params, current stream, launch.
#include <torch/library.h>

#include <optional>

#include "fastinfer/spec/verify.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

void speculative_verify(at::Tensor& output_token_ids, at::Tensor& num_accepted, const at::Tensor& draft_token_ids,
                        const at::Tensor& num_draft_tokens, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniform_accept,
                        const std::optional<at::Tensor>& uniform_sample, bool greedy) {
  constexpr const char* op = "speculative_verify";
  const c10::cuda::CUDAGuard guard(target_probs.device());
  const int64_t k = draft_token_ids.size(1), vocab = target_probs.size(2);
  TORCH_CHECK(vocab >= 1 && vocab <= spec::kMaxVocab, op, ": vocab must lie in [1, ", spec::kMaxVocab, "], got ",
              vocab);
  TORCH_CHECK(target_probs.size(1) == k + 1 && output_token_ids.size(1) == k + 1, op,
              ": expected target_probs [batch, k + 1, vocab] and output_token_ids [batch, k + 1]");
  TORCH_CHECK(greedy || (uniform_accept && uniform_sample), op,
              ": uniform_accept and uniform_sample are required unless greedy");
  const bool use_draft_probs = !greedy && draft_probs.has_value();
  SpecVerifyParams p{};
  p.output_token_ids = output_token_ids.data_ptr<int64_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.draft_token_ids = draft_token_ids.data_ptr<int64_t>();
  p.num_draft_tokens = num_draft_tokens.data_ptr<int32_t>();
  p.target_probs = target_probs.data_ptr<float>();
  p.draft_probs = use_draft_probs ? draft_probs->data_ptr<float>() : nullptr;
  p.uniform_accept = greedy ? nullptr : uniform_accept->data_ptr<float>();
  p.uniform_sample = greedy ? nullptr : uniform_sample->data_ptr<float>();
  p.batch = draft_token_ids.size(0);
  p.k = static_cast<int>(k);
  p.vocab = static_cast<int>(vocab);
  p.target_batch_stride = target_probs.stride(0);
  p.target_pos_stride = target_probs.stride(1);
  p.draft_batch_stride = use_draft_probs ? draft_probs->stride(0) : 0;
  p.draft_pos_stride = use_draft_probs ? draft_probs->stride(1) : 0;
  p.greedy = greedy;
  check_launch(launch_speculative_verify(p, stream_of(target_probs)), op);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("speculative_verify", &fastinfer::torch_glue::speculative_verify);
}
