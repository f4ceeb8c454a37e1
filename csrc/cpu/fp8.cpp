// CPU reference: FP8 (e4m3) activation quantization and the scaled FP8 matmul.
//
// The format and the rounding rule are csrc/include/fastinfer/fp8.h (helpers: cpu/fp8_convert.h).
//
// fp8_scaled_mm: out[m, n] = (sum_k a[m, k] * b[n, k]) * (scale_a[m] * scale_b[n]) + bias[n], with
// the sum in fp32 (products of two e4m3 values are exact in fp32) in k order, and one rounding to
// out's dtype. A scale of shape [1] is per tensor and applies to every row (column).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/ops.h"
#include "cpu/fp8_convert.h"

namespace fastinfer::cpu {

namespace {

template <typename T>
float row_amax(const T* row, int64_t n) {
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(static_cast<float>(row[k]));
    amax = (a > amax || std::isnan(a)) ? a : amax;
  }
  return amax;
}

}  // namespace

void fp8_quantize_per_token(at::Tensor& out, at::Tensor& scales, const at::Tensor& input) {
  const int64_t rows = input.size(0), cols = input.size(1);
  float* scale = scales.data_ptr<float>();
  e4m3* q = static_cast<e4m3*>(out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fp8_quantize_per_token", [&] {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* x = input.data_ptr<scalar_t>() + m * input.stride(0);
        const float s = dynamic_fp8_scale(row_amax(x, cols));
        scale[m] = s;
        for (int64_t k = 0; k < cols; ++k) q[m * out.stride(0) + k] = quantize_fp8(static_cast<float>(x[k]), s);
      }
    });
  });
}

void fp8_quantize_per_tensor(at::Tensor& out, at::Tensor& scale, const at::Tensor& input, bool dynamic) {
  const int64_t rows = input.size(0), cols = input.size(1);
  e4m3* q = static_cast<e4m3*>(out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fp8_quantize_per_tensor", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    if (dynamic) {
      float amax = 0.0f;
      for (int64_t m = 0; m < rows; ++m) {
        const float a = row_amax(x + m * input.stride(0), cols);
        amax = (a > amax || std::isnan(a)) ? a : amax;
      }
      scale.data_ptr<float>()[0] = dynamic_fp8_scale(amax);
    }
    const float s = scale.data_ptr<float>()[0];
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t k = 0; k < cols; ++k) q[m * out.stride(0) + k] = quantize_fp8(static_cast<float>(x[m * input.stride(0) + k]), s);
    }
  });
}

void fp8_scaled_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                   const at::Tensor& scale_b, const std::optional<at::Tensor>& bias) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  const e4m3* a8 = static_cast<const e4m3*>(a.data_ptr());
  const e4m3* b8 = static_cast<const e4m3*>(b.data_ptr());
  const float* sa = scale_a.data_ptr<float>();
  const float* sb = scale_b.data_ptr<float>();
  const bool per_token = scale_a.numel() != 1;    // else per tensor ([1])
  const bool per_channel = scale_b.numel() != 1;
  // b decoded once: K contiguous floats per output channel.
  std::vector<float> b_float(N * K);
  for (int64_t i = 0; i < N * K; ++i) b_float[i] = fp8_to_float(b8[(i / K) * b.stride(0) + i % K]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fp8_scaled_mm", [&] {
    const scalar_t* bias_ptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> a_row(K);
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t k = 0; k < K; ++k) a_row[k] = fp8_to_float(a8[m * a.stride(0) + k]);
        const float row_scale = sa[per_token ? m : 0];
        scalar_t* o = out.data_ptr<scalar_t>() + m * out.stride(0);
        for (int64_t n = 0; n < N; ++n) {
          const float* w = b_float.data() + n * K;
          float acc = 0.0f;
          for (int64_t k = 0; k < K; ++k) acc += a_row[k] * w[k];
          float y = acc * row_scale * sb[per_channel ? n : 0];  // (acc * scale_a) * scale_b: gemm/fp8.h, as the CUDA kernels
          if (bias_ptr != nullptr) y += static_cast<float>(bias_ptr[n]);
          o[n] = static_cast<scalar_t>(y);
        }
      }
    });
  });
}

// The fused FP8 producers' spec: the 16-bit op, then fp8_quantize_per_token of its output.
void rms_norm_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input,
                        const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  at::Tensor normed = input.clone(at::MemoryFormat::Contiguous);
  if (residual.has_value()) {
    at::Tensor res = *residual;  // the same storage: updated in place
    fused_add_rms_norm(normed, res, weight, eps);
  } else {
    rms_norm(normed, input, weight, eps);
  }
  fp8_quantize_per_token(out, scales, normed);
}

void silu_and_mul_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input) {
  at::Tensor act = at::empty({input.size(0), input.size(1) / 2}, input.options());
  silu_and_mul(act, input);
  fp8_quantize_per_token(out, scales, act);
}

}  // namespace fastinfer::cpu
