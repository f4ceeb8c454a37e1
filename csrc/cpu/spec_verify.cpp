// CPU reference: speculative-decoding verify (rejection sampling and greedy). The executable spec
// of spec/verify.cuh; the shared arithmetic (fixed-point CDF, sanitizing) is in
// fastinfer/spec/verify_math.h. One request at a time, plain sequential loops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "cpu/ops.h"
#include "fastinfer/spec/verify_math.h"

namespace fastinfer::cpu {

namespace {

using spec::sanitize_prob;

constexpr int64_t kRequestsPerTask = 64;
constexpr int64_t kNoToken = -1;

// First index of the largest sanitized probability.
int64_t argmax(const float* p, int64_t vocab) {
  int64_t best = 0;
  float best_value = sanitize_prob(p[0]);
  for (int64_t j = 1; j < vocab; ++j) {
    const float v = sanitize_prob(p[j]);
    if (v > best_value) best = j, best_value = v;
  }
  return best;
}

// Fixed-point mass of token j: max(0, p - q) when q is a row or one-hot at `onehot`, else p.
uint64_t mass(const float* p, const float* q, int64_t onehot, int64_t j) {
  const float pj = sanitize_prob(p[j]);
  if (q != nullptr) return spec::residual_fixed(pj, sanitize_prob(q[j]));
  if (onehot >= 0) return spec::residual_fixed(pj, j == onehot ? 1.0f : 0.0f);
  return spec::to_fixed(pj);
}

// Inverse-CDF draw from the (unnormalised) fixed-point masses, with the fallbacks of
// verify_math.h: an empty residual draws from p, an empty p gives argmax(p).
int64_t draw(const float* p, const float* q, int64_t onehot, int64_t vocab, float uniform) {
  uint64_t total = 0;
  for (int64_t j = 0; j < vocab; ++j) total += mass(p, q, onehot, j);
  if (total == 0) {
    if (q != nullptr || onehot >= 0) return draw(p, nullptr, -1, vocab, uniform);
    return argmax(p, vocab);
  }
  const uint64_t threshold = spec::cdf_threshold(total, uniform);
  uint64_t cumulative = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    cumulative += mass(p, q, onehot, j);
    if (cumulative > threshold) return j;
  }
  return vocab - 1;  // unreachable: threshold < total
}

struct Request {
  const int64_t* draft;    // [k]
  int64_t num_draft;
  const float* target;     // row i at target + i * target_pos_stride
  const float* draft_probs;  // row i at draft_probs + i * draft_pos_stride, or nullptr
  const float* uniform_accept;  // [k]
  float uniform_sample;
};

// Returns (num_accepted, the emitted token after the accepted prefix).
std::pair<int64_t, int64_t> verify_greedy(const Request& r, int64_t vocab, int64_t target_pos_stride) {
  for (int64_t i = 0;; ++i) {
    const int64_t best = argmax(r.target + i * target_pos_stride, vocab);
    if (i == r.num_draft || r.draft[i] != best) return {i, best};
  }
}

std::pair<int64_t, int64_t> verify_sampled(const Request& r, int64_t vocab, int64_t target_pos_stride,
                                           int64_t draft_pos_stride) {
  for (int64_t i = 0; i < r.num_draft; ++i) {
    const int64_t x = r.draft[i];
    const float* p = r.target + i * target_pos_stride;
    const float* q = r.draft_probs ? r.draft_probs + i * draft_pos_stride : nullptr;
    const float qx = q ? sanitize_prob(q[x]) : 1.0f;
    if (!spec::accept_draft(r.uniform_accept[i], sanitize_prob(p[x]), qx)) {
      return {i, draw(p, q, q ? -1 : x, vocab, r.uniform_sample)};
    }
  }
  const float* bonus = r.target + r.num_draft * target_pos_stride;
  return {r.num_draft, draw(bonus, nullptr, -1, vocab, r.uniform_sample)};
}

}  // namespace

void speculative_verify(at::Tensor& output_token_ids, at::Tensor& num_accepted, const at::Tensor& draft_token_ids,
                        const at::Tensor& num_draft_tokens, const at::Tensor& target_probs,
                        const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniform_accept,
                        const std::optional<at::Tensor>& uniform_sample, bool greedy) {
  const int64_t batch = draft_token_ids.size(0), k = draft_token_ids.size(1), vocab = target_probs.size(2);
  TORCH_CHECK(vocab >= 1 && target_probs.size(1) == k + 1 && output_token_ids.size(1) == k + 1,
              "speculative_verify: expected target_probs [batch, k + 1, vocab >= 1] and output_token_ids "
              "[batch, k + 1] for draft_token_ids [batch, k]");
  TORCH_CHECK(greedy || (uniform_accept && uniform_sample),
              "speculative_verify: uniform_accept and uniform_sample are required unless greedy");
  const int64_t* draft = draft_token_ids.data_ptr<int64_t>();
  const int32_t* num_draft = num_draft_tokens.data_ptr<int32_t>();
  // Indices first, so that a bad one fails before any output is written.
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(num_draft[b] >= 0 && num_draft[b] <= k, "speculative_verify: num_draft_tokens[", b,
                "] = ", num_draft[b], " outside [0, ", k, "]");
    for (int64_t i = 0; i < num_draft[b]; ++i) {
      const int64_t x = draft[b * k + i];
      TORCH_CHECK(x >= 0 && x < vocab, "speculative_verify: draft_token_ids[", b, ", ", i, "] = ", x,
                  " outside [0, ", vocab, ")");
    }
  }
  const bool use_draft_probs = !greedy && draft_probs.has_value();
  const float* target = target_probs.data_ptr<float>();
  const float* dprobs = use_draft_probs ? draft_probs->data_ptr<float>() : nullptr;
  const float* u_accept = greedy ? nullptr : uniform_accept->data_ptr<float>();
  const float* u_sample = greedy ? nullptr : uniform_sample->data_ptr<float>();
  const int64_t t_batch = target_probs.stride(0), t_pos = target_probs.stride(1);
  const int64_t d_batch = use_draft_probs ? draft_probs->stride(0) : 0;
  const int64_t d_pos = use_draft_probs ? draft_probs->stride(1) : 0;
  int64_t* out = output_token_ids.data_ptr<int64_t>();
  int32_t* accepted = num_accepted.data_ptr<int32_t>();

  at::parallel_for(0, batch, kRequestsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Request r{draft + b * k, num_draft[b], target + b * t_batch, dprobs ? dprobs + b * d_batch : nullptr,
                      u_accept ? u_accept + b * k : nullptr, u_sample ? u_sample[b] : 0.0f};
      const auto [m, token] = greedy ? verify_greedy(r, vocab, t_pos) : verify_sampled(r, vocab, t_pos, d_pos);
      int64_t* row = out + b * (k + 1);
      for (int64_t i = 0; i <= k; ++i) row[i] = i < m ? r.draft[i] : (i == m ? token : kNoToken);
      accepted[b] = static_cast<int32_t>(m);
    }
  });
}

}  // namespace fastinfer::cpu
