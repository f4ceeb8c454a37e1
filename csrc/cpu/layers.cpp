// CPU reference: token embedding (+ sums of squares), RMSNorm (+ fused residual add), NeoX rotary
// embedding, SiLU-and-mul.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "cpu/ops.h"

namespace fastinfer::cpu {

namespace {

constexpr int64_t kRowsPerTask = 16;

template <typename T, typename W>  // W: the weight's type, T or float (Gemma's 1 + w, kept in fp32)
void rms_norm_row(T* out, const T* in, T* residual, const W* weight, int64_t hidden, float eps) {
  float sum_sq = 0.0f;
  for (int64_t i = 0; i < hidden; ++i) {
    float x = static_cast<float>(in[i]);
    if (residual != nullptr) {
      const T r = static_cast<T>(x + static_cast<float>(residual[i]));  // stored rounded, as unfused
      residual[i] = r;
      x = static_cast<float>(r);
    }
    sum_sq += x * x;
  }
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
  const T* src = residual != nullptr ? residual : in;
  for (int64_t i = 0; i < hidden; ++i) {
    out[i] = static_cast<T>(static_cast<float>(src[i]) * inv_rms * static_cast<float>(weight[i]));
  }
}

template <typename T, typename W>
void rms_norm_rows(T* out, int64_t out_stride, const T* in, int64_t in_stride, T* residual,
                   int64_t res_stride, const W* weight, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rms_norm_row(out + r * out_stride, in + r * in_stride,
                   residual ? residual + r * res_stride : nullptr, weight, hidden, eps);
    }
  });
}

}  // namespace

// out[t] = weight[ids[t]]; sq_sums[t, g] = the fp32 sum of out[t, 16 g ..]^2 in column order. An id
// outside the table (callers validate) gives a NaN row, as the CUDA kernel does.
void embedding(at::Tensor& out, const std::optional<at::Tensor>& sq_sums, const at::Tensor& input_ids,
               const at::Tensor& weight) {
  const int64_t tokens = input_ids.size(0), vocab = weight.size(0), hidden = weight.size(1);
  TORCH_CHECK(input_ids.dim() == 1 && input_ids.is_contiguous() && input_ids.scalar_type() == at::kLong &&
                  out.size(0) == tokens && out.size(1) == hidden && out.stride(1) == 1 && weight.is_contiguous() &&
                  out.scalar_type() == weight.scalar_type() &&
                  (!sq_sums.has_value() || (sq_sums->size(0) == tokens && sq_sums->size(1) == (hidden + 15) / 16 &&
                                            sq_sums->stride(1) == 1)),
              "embedding: inconsistent shapes (validate with fastinfer.ops.embedding)");
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "embedding", [&] {
    for (int64_t t = 0; t < tokens; ++t) {
      const bool valid = ids[t] >= 0 && ids[t] < vocab;
      const scalar_t* row = weight.data_ptr<scalar_t>() + (valid ? ids[t] : 0) * hidden;
      scalar_t* dst = out.data_ptr<scalar_t>() + t * out.stride(0);
      for (int64_t g = 0; g * 16 < hidden; ++g) {
        float sum = 0.0f;
        for (int64_t col = g * 16; col < std::min(hidden, g * 16 + 16); ++col) {
          const scalar_t v = valid ? row[col] : static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
          dst[col] = v;
          sum += static_cast<float>(v) * static_cast<float>(v);
        }
        if (sq_sums.has_value()) sq_sums->data_ptr<float>()[t * sq_sums->stride(0) + g] = sum;
      }
    }
  });
}

// weight in the input's dtype, or fp32 (the product is taken in fp32 either way: an fp32 weight is not
// rounded first; Gemma's 1 + w).
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rms_norm", [&] {
    auto run = [&](const auto* w) {
      rms_norm_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), input.data_ptr<scalar_t>(), input.stride(0),
                              nullptr, 0, w, input.size(0), input.size(1), static_cast<float>(eps));
    };
    if (weight.scalar_type() == at::kFloat) run(weight.data_ptr<float>());
    else run(weight.data_ptr<scalar_t>());
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* in = input.data_ptr<scalar_t>();
    auto run = [&](const auto* w) {
      rms_norm_rows<scalar_t>(in, input.stride(0), in, input.stride(0), residual.data_ptr<scalar_t>(),
                              residual.stride(0), w, input.size(0), input.size(1), static_cast<float>(eps));
    };
    if (weight.scalar_type() == at::kFloat) run(weight.data_ptr<float>());
    else run(weight.data_ptr<scalar_t>());
  });
}

void rms_norm_heads(at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && weight.dim() == 1 && weight.size(0) == head_dim &&
                  weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.device() == x.device() &&
                  std::isfinite(eps) && eps >= 0,
              "rms_norm_heads: x must be [tokens, heads, head_dim] contiguous in its last dimension, weight a "
              "contiguous [head_dim] of its dtype and device, eps finite and >= 0");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_heads", [&] {
    scalar_t* base = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t ts = x.stride(0), hs = x.stride(1);
    at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* row = base + t * ts + h * hs;
          rms_norm_row<scalar_t>(row, row, nullptr, w, head_dim, static_cast<float>(eps));
        }
      }
    });
  });
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache) {
  const int64_t num_tokens = query.size(0);
  const int64_t rotary_dim = cos_sin_cache.size(1), half = rotary_dim / 2;
  const int64_t max_position = cos_sin_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cache = cos_sin_cache.data_ptr<float>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: positions[", t, "] = ", pos[t],
                " outside the cos_sin_cache of ", max_position, " positions");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "rotary_embedding", [&] {
    auto rotate_heads = [&](at::Tensor& x) {
      scalar_t* base = x.data_ptr<scalar_t>();
      const int64_t heads = x.size(1), ts = x.stride(0), hs = x.stride(1);
      at::parallel_for(0, num_tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const float* cos = cache + pos[t] * rotary_dim;
          const float* sin = cos + half;
          for (int64_t h = 0; h < heads; ++h) {
            scalar_t* v = base + t * ts + h * hs;
            for (int64_t i = 0; i < half; ++i) {
              const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
              v[i] = static_cast<scalar_t>(x1 * cos[i] - x2 * sin[i]);
              v[i + half] = static_cast<scalar_t>(x2 * cos[i] + x1 * sin[i]);
            }
          }
        }
      });
    };
    rotate_heads(query);
    rotate_heads(key);
  });
}

// act(gate) * up in fp32, rounded once to the input's dtype: the gated MLP activations below.
template <typename Act>
void gated_activation(at::Tensor& out, const at::Tensor& input, Act act) {
  const int64_t rows = input.size(0), d = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gated_activation", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t is = input.stride(0), os = out.stride(0);
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < d; ++i) {
          const float gate = static_cast<float>(in[r * is + i]);
          const float up = static_cast<float>(in[r * is + d + i]);
          o[r * os + i] = static_cast<scalar_t>(act(gate) * up);
        }
      }
    });
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  gated_activation(out, input, [](float gate) { return gate / (1.0f + std::exp(-gate)); });
}

// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): Gemma's MLP (HF's gelu_pytorch_tanh).
void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) {
  gated_activation(out, input, [](float gate) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * gate * (1.0f + std::tanh(kSqrt2OverPi * (gate + 0.044715f * gate * gate * gate)));
  });
}

void argmax_rows(at::Tensor& out, const at::Tensor& input) {
  const int64_t rows = input.size(0), cols = input.size(1);
  const float* in = input.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t is = input.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * is;
      int64_t best = 0;
      for (int64_t i = 1; i < cols; ++i) {
        const float v = row[i], b = row[best];
        if (std::isnan(b)) break;  // the first NaN wins
        if (std::isnan(v) || v > b) best = i;
      }
      o[r * os] = best;
    }
  });
}

}  // namespace fastinfer::cpu
