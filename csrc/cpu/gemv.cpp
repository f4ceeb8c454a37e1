// CPU reference: dense_gemv, out[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]). Plain loops: each output
// is one fp32 dot product (k in order), plus bias in fp32, rounded once to out's dtype. And
// dense_gemv_silu_mul, defined as silu_and_mul(dense_gemv(x, W)). Every op also takes FP8 weights
// (weight_scale given: W e4m3 [N, K], fp32 scale [N]): each dot product is then taken over the e4m3
// values converted to float (exact) and multiplied by its row's scale before the bias (W8A16). And the two halves of a residual
// add + RMSNorm split across the GEMVs around it: dense_gemv_add_residual (residual += dense_gemv,
// plus sums of squares of the new residual per 16 columns) and rms_norm_dense_gemv (dense_gemv or
// dense_gemv_silu_mul of rms_norm(x), 1 / rms taken from those sums).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/fp8_convert.h"
#include "cpu/ops.h"

namespace fastinfer::cpu {

namespace {

constexpr int64_t kRowsPerTask = 64;  // rows of W per parallel task

inline float weight_value(float w) { return w; }
inline float weight_value(c10::Half w) { return static_cast<float>(w); }
inline float weight_value(c10::BFloat16 w) { return static_cast<float>(w); }
inline float weight_value(e4m3 w) { return fp8_to_float(w); }

// WT: T, or e4m3 with scale [N] (each row's sum times its scale, then the bias).
template <typename T, typename WT>
void gemv_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, const WT* weight, const float* scale,
               const T* bias, int64_t m, int64_t n, int64_t k) {
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const WT* w = weight + row * k;
      for (int64_t i = 0; i < m; ++i) {
        const T* xi = x + i * x_stride;
        float acc = 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) acc += static_cast<float>(xi[kk]) * weight_value(w[kk]);
        if (scale != nullptr) acc *= scale[row];
        if (bias != nullptr) acc += static_cast<float>(bias[row]);
        out[i * out_stride + row] = static_cast<T>(acc);
      }
    }
  });
}

}  // namespace

void dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& weight_scale) {
  if (out.scalar_type() != x.scalar_type()) {  // float32 out: the values rounded to x's dtype, widened
    TORCH_CHECK(out.scalar_type() == at::kFloat, "dense_gemv: out must have x's dtype or float32");
    at::Tensor rounded = at::empty({x.size(0), weight.size(0)}, x.options());
    dense_gemv(rounded, x, weight, bias, weight_scale);
    out.copy_(rounded);
    return;
  }
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const bool fp8 = weight_scale.has_value();
  TORCH_CHECK(weight.size(1) == k && weight.is_contiguous() && out.size(0) == m && out.size(1) == n &&
                  (!bias.has_value() || (bias->numel() == n && bias->is_contiguous())) &&
                  (fp8 ? weight.scalar_type() == at::kFloat8_e4m3fn && weight_scale->scalar_type() == at::kFloat &&
                             weight_scale->numel() == n && weight_scale->is_contiguous()
                       : weight.scalar_type() == x.scalar_type()),
              "dense_gemv: inconsistent shapes or dtypes (validate with fastinfer.ops.dense_gemv)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_gemv", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (fp8) {
      gemv_rows<scalar_t, e4m3>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                                weight.data_ptr<e4m3>(), weight_scale->data_ptr<float>(), b, m, n, k);
    } else {
      gemv_rows<scalar_t, scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                                    weight.data_ptr<scalar_t>(), nullptr, b, m, n, k);
    }
  });
}

// dense_gemv_silu_mul's spec: the composition, through an [M, 2 F] intermediate in x's dtype.
void dense_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& weight_scale) {
  TORCH_CHECK(weight.size(0) == 2 * out.size(1), "dense_gemv_silu_mul: weight must have 2 F rows for out [M, F]");
  at::Tensor gate_up = at::empty({x.size(0), weight.size(0)}, x.options());
  dense_gemv(gate_up, x, weight, std::nullopt, weight_scale);
  silu_and_mul(out, gate_up);
}

constexpr int64_t kSqSumGroup = 16;  // kGemvSqSumGroup in gemm/gemv.h

// residual[m, n] = round(residual + round(x @ W^T + bias)); sq_sums[m, j] = sum over columns
// 16 j .. 16 j + 15 (in order) of the new residual squared, in fp32.
void dense_gemv_add_residual(at::Tensor& residual, at::Tensor& sq_sums, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& /*prefetch*/,
                             int64_t /*prefetch_bytes*/, bool /*prefetch_swiglu*/,
                             const std::optional<at::Tensor>& weight_scale) {
  const int64_t m = x.size(0), n = weight.size(0);
  const int64_t groups = (n + kSqSumGroup - 1) / kSqSumGroup;
  TORCH_CHECK(residual.size(0) == m && residual.size(1) == n && residual.stride(1) == 1 && sq_sums.size(0) == m &&
                  sq_sums.size(1) == groups && sq_sums.stride(1) == 1 && sq_sums.scalar_type() == at::kFloat,
              "dense_gemv_add_residual: inconsistent shapes (validate with fastinfer.ops.dense_gemv_add_residual)");
  at::Tensor y = at::empty({m, n}, x.options());
  dense_gemv(y, x, weight, bias, weight_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_gemv_add_residual", [&] {
    for (int64_t i = 0; i < m; ++i) {
      scalar_t* r = residual.data_ptr<scalar_t>() + i * residual.stride(0);
      const scalar_t* yi = y.data_ptr<scalar_t>() + i * n;
      float* sums = sq_sums.data_ptr<float>() + i * sq_sums.stride(0);
      for (int64_t j = 0; j < groups; ++j) {
        float sum = 0.0f;
        for (int64_t col = j * kSqSumGroup; col < std::min(n, (j + 1) * kSqSumGroup); ++col) {
          const scalar_t updated = static_cast<scalar_t>(static_cast<float>(r[col]) + static_cast<float>(yi[col]));
          r[col] = updated;
          sum += static_cast<float>(updated) * static_cast<float>(updated);
        }
        sums[j] = sum;
      }
    }
  });
}

// dense_gemv (silu_mul: dense_gemv_silu_mul) of x' = round(x * inv_rms * norm_weight), rms_norm's
// formula with inv_rms[m] = 1 / sqrt(sum_j sq_sums[m, j] / K + eps) (the sums in index order).
void rms_norm_dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& sq_sums, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool silu_mul,
                         const std::optional<at::Tensor>& /*prefetch*/, int64_t /*prefetch_bytes*/,
                         bool /*prefetch_swiglu*/, const std::optional<at::Tensor>& weight_scale) {
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(sq_sums.size(0) == m && sq_sums.stride(1) == 1 && sq_sums.scalar_type() == at::kFloat &&
                  norm_weight.numel() == k && norm_weight.is_contiguous() && (!silu_mul || !bias.has_value()),
              "rms_norm_dense_gemv: inconsistent shapes (validate with fastinfer.ops.rms_norm_dense_gemv)");
  at::Tensor normed = at::empty({m, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_dense_gemv", [&] {
    const scalar_t* w = norm_weight.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) {
      const float* sums = sq_sums.data_ptr<float>() + i * sq_sums.stride(0);
      float sum = 0.0f;
      for (int64_t j = 0; j < sq_sums.size(1); ++j) sum += sums[j];
      const float inv_rms = 1.0f / std::sqrt(sum / static_cast<float>(k) + static_cast<float>(eps));
      const scalar_t* xi = x.data_ptr<scalar_t>() + i * x.stride(0);
      scalar_t* dst = normed.data_ptr<scalar_t>() + i * k;
      for (int64_t kk = 0; kk < k; ++kk) {
        dst[kk] = static_cast<scalar_t>(static_cast<float>(xi[kk]) * inv_rms * static_cast<float>(w[kk]));
      }
    }
  });
  if (silu_mul) {
    dense_gemv_silu_mul(out, normed, weight, weight_scale);
  } else {
    dense_gemv(out, normed, weight, bias, weight_scale);
  }
}

// The composition: the q/k/v projection (dense_gemv, or rms_norm_dense_gemv with sq_sums), then
// rotary_embedding_and_cache of its q / k / v parts; query receives the rotated q.
void dense_gemv_rope_cache(at::Tensor& query, at::Tensor& kv_cache, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& sq_sums, const std::optional<at::Tensor>& norm_weight,
                           double eps, const std::optional<at::Tensor>& /*prefetch*/, int64_t /*prefetch_bytes*/,
                           bool /*prefetch_swiglu*/, const std::optional<at::Tensor>& weight_scale) {
  const int64_t m = x.size(0), heads = query.size(1), head_dim = query.size(2), kv_heads = kv_cache.size(3);
  TORCH_CHECK(query.size(0) == m && weight.size(0) == (heads + 2 * kv_heads) * head_dim &&
                  sq_sums.has_value() == norm_weight.has_value(),
              "dense_gemv_rope_cache: inconsistent shapes (validate with fastinfer.ops.dense_gemv_rope_cache)");
  at::Tensor qkv = at::empty({m, weight.size(0)}, x.options());
  if (sq_sums.has_value()) {
    rms_norm_dense_gemv(qkv, x, *sq_sums, *norm_weight, eps, weight, bias, false, std::nullopt, 0, false,
                        weight_scale);
  } else {
    dense_gemv(qkv, x, weight, bias, weight_scale);
  }
  at::Tensor q = qkv.narrow(1, 0, heads * head_dim).view({m, heads, head_dim});
  at::Tensor k = qkv.narrow(1, heads * head_dim, kv_heads * head_dim).view({m, kv_heads, head_dim});
  at::Tensor v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim).view({m, kv_heads, head_dim});
  rotary_embedding_and_cache(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping, std::nullopt, std::nullopt,
                             std::nullopt, 0.0);
  query.copy_(q);
}

// moe_gemv's spec: each pair's row through dense_gemv (or dense_gemv_silu_mul) on its expert's weight (and its
// scales: FP8 weights).
void moe_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_ids,
              int64_t x_group, bool silu_mul, const std::optional<at::Tensor>& weight_scale) {
  TORCH_CHECK(weight.dim() == 3 && expert_ids.scalar_type() == at::kInt && x_group >= 1 &&
                  x.size(0) * x_group == expert_ids.size(0) && out.size(0) == expert_ids.size(0),
              "moe_gemv: inconsistent shapes or dtypes (validate with fastinfer.ops.moe_gemv)");
  const int32_t* ids = expert_ids.data_ptr<int32_t>();
  for (int64_t p = 0; p < expert_ids.size(0); ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < weight.size(0), "moe_gemv: expert_ids[", p, "] = ", ids[p],
                " outside [0, ", weight.size(0), ")");
    const at::Tensor row = x.narrow(0, p / x_group, 1);
    at::Tensor dst = out.narrow(0, p, 1);
    const std::optional<at::Tensor> scale =
        weight_scale.has_value() ? std::optional<at::Tensor>((*weight_scale)[ids[p]]) : std::nullopt;
    if (silu_mul) {
      dense_gemv_silu_mul(dst, row, weight[ids[p]], scale);
    } else {
      dense_gemv(dst, row, weight[ids[p]], std::nullopt, scale);
    }
  }
}

}  // namespace fastinfer::cpu
