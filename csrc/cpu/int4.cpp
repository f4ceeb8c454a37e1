// CPU reference: W4A16 linear, out = x @ W^T, reading the packed 4-bit layout drawn in
// fastinfer/gemm/w4a16.h. Each task owns one 64-column strip: it dequantizes the strip to fp32
// (the definition of w, in fp32), then multiplies with fp32 accumulation and one rounding of the
// result to out's dtype. Register blocking (4 rows x 8 columns) keeps it fast enough for real
// models' perplexity on a CPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/ops.h"
#include "fastinfer/gemm/int4_layout.h"  // layout: fastinfer/gemm/w4a16.h

namespace fastinfer::cpu {

namespace {

namespace L = int4_layout;
constexpr int kRowBlock = 4;  // rows of x per register block
constexpr int kColBlock = 8;  // columns per register block

// The strip's weights as fp32 wT[k][col], col = n - 64 s, decoded from the packed words.
template <typename S>
void dequantize_strip(float* wT, const uint32_t* strip_words, const S* scales, const S* offsets, Int4Mode mode,
                      int64_t n, int64_t k, int64_t group_size, int64_t strip) {
  const int64_t steps = k / L::kStepK;
  for (int64_t t = 0; t < steps; ++t) {
    for (int lane = 0; lane < L::kLanes; ++lane) {
      const int g = lane / 4, c = lane % 4;
      for (int i = 0; i < L::kWordsPerLane; ++i) {
        const uint32_t word = strip_words[(t * L::kLanes + lane) * L::kWordsPerLane + i];
        for (int p = 0; p < 8; ++p) {
          const int hi = p / 4, h = (p / 2) % 2, r = p % 2;
          const int j = 2 * i + h;                       // n8 tile inside the strip
          const int col = 8 * j + g;                     // n - 64 s
          const int64_t kk = L::kStepK * t + 8 * r + 2 * c + hi;
          const int64_t param = (kk / group_size) * n + L::kStripN * strip + 8 * g + j;  // permuted column
          const float q = static_cast<float>((word >> (4 * p)) & 0xFu);
          const float s = static_cast<float>(scales[param]);
          float w;
          switch (mode) {
            case Int4Mode::kSymmetric: w = (q - L::kSymmetricZero) * s; break;
            case Int4Mode::kZeros: w = (q - static_cast<float>(offsets[param])) * s; break;
            default: w = q * s + static_cast<float>(offsets[param]); break;
          }
          wT[kk * L::kStripN + col] = w;
        }
      }
    }
  }
}

// out[m, col] for the strip's 64 columns. xf: fp32 x [M, K] contiguous.
template <typename T>
void strip_gemm(T* out, int64_t out_stride, const float* xf, const float* wT, int64_t m, int64_t k, int64_t col0) {
  const std::vector<float> zero_row(k, 0.0f);
  for (int64_t m0 = 0; m0 < m; m0 += kRowBlock) {
    const float* rows[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) rows[r] = m0 + r < m ? xf + (m0 + r) * k : zero_row.data();
    for (int cb = 0; cb < L::kStripN; cb += kColBlock) {
      float acc[kRowBlock][kColBlock] = {};
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* w = wT + kk * L::kStripN + cb;
        for (int r = 0; r < kRowBlock; ++r) {
          const float xv = rows[r][kk];
          for (int cc = 0; cc < kColBlock; ++cc) acc[r][cc] += xv * w[cc];
        }
      }
      for (int r = 0; r < kRowBlock && m0 + r < m; ++r) {
        for (int cc = 0; cc < kColBlock; ++cc) out[(m0 + r) * out_stride + col0 + cb + cc] = static_cast<T>(acc[r][cc]);
      }
    }
  }
}

}  // namespace

void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins, int64_t group_size) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(!(zeros.has_value() && mins.has_value()), "int4_linear: pass zeros or mins, not both");
  TORCH_CHECK(n % L::kStripN == 0 && k % L::kMinK == 0 && k % group_size == 0 && qweight.size(0) * L::kStripN == n &&
                  qweight.size(1) == 8 * k && scales.size(0) == k / group_size && scales.size(1) == n,
              "int4_linear: inconsistent shapes (validate with fastinfer.ops.int4_linear)");
  if (m == 0) return;
  const Int4Mode mode = zeros.has_value() ? Int4Mode::kZeros : mins.has_value() ? Int4Mode::kMins : Int4Mode::kSymmetric;
  const at::Tensor* offsets = zeros.has_value() ? &*zeros : mins.has_value() ? &*mins : nullptr;
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K] fp32, converted once for every strip
  const auto* words = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int4_linear", [&] {
    const scalar_t* s = scales.data_ptr<scalar_t>();
    const scalar_t* off = offsets ? offsets->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n / L::kStripN, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> wT(k * L::kStripN);
      for (int64_t strip = begin; strip < end; ++strip) {
        dequantize_strip(wT.data(), words + strip * 8 * k, s, off, mode, n, k, group_size, strip);
        strip_gemm(o, out.stride(0), xf.data_ptr<float>(), wT.data(), m, k, strip * L::kStripN);
      }
    });
  });
}

// moe_int4_linear's spec (gemm/moe_w4a16.h): each pair's row through int4_linear on its expert's tensors.
void moe_int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins,
                     const at::Tensor& expert_ids, int64_t group_size, int64_t x_group) {
  TORCH_CHECK(qweight.dim() == 3 && scales.dim() == 3 && expert_ids.scalar_type() == at::kInt && x_group >= 1 &&
                  x.size(0) * x_group == expert_ids.size(0) && out.size(0) == expert_ids.size(0),
              "moe_int4_linear: inconsistent shapes or dtypes (validate with fastinfer.ops.moe_int4_linear)");
  const int32_t* ids = expert_ids.data_ptr<int32_t>();
  for (int64_t p = 0; p < expert_ids.size(0); ++p) {
    const int64_t e = ids[p];
    TORCH_CHECK(e >= 0 && e < qweight.size(0), "moe_int4_linear: expert_ids[", p, "] = ", e, " outside [0, ",
                qweight.size(0), ")");
    at::Tensor dst = out.narrow(0, p, 1);
    const std::optional<at::Tensor> z = zeros.has_value() ? std::optional<at::Tensor>((*zeros)[e]) : std::nullopt;
    const std::optional<at::Tensor> mn = mins.has_value() ? std::optional<at::Tensor>((*mins)[e]) : std::nullopt;
    int4_linear(dst, x.narrow(0, p / x_group, 1), qweight[e], scales[e], z, mn, group_size);
  }
}

}  // namespace fastinfer::cpu
