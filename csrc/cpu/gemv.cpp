// CPU reference: dense_gemv, out[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]). Plain loops: each output
// is one fp32 dot product (k in order), plus bias in fp32, rounded once to out's dtype. And
// dense_gemv_silu_mul, defined as silu_and_mul(dense_gemv(x, W)).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "cpu/ops.h"

namespace fastinfer::cpu {

namespace {

constexpr int64_t kRowsPerTask = 64;  // rows of W per parallel task

template <typename T>
void gemv_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride, const T* weight, const T* bias, int64_t m,
               int64_t n, int64_t k) {
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* w = weight + row * k;
      for (int64_t i = 0; i < m; ++i) {
        const T* xi = x + i * x_stride;
        float acc = 0.0f;
        for (int64_t kk = 0; kk < k; ++kk) acc += static_cast<float>(xi[kk]) * static_cast<float>(w[kk]);
        if (bias != nullptr) acc += static_cast<float>(bias[row]);
        out[i * out_stride + row] = static_cast<T>(acc);
      }
    }
  });
}

}  // namespace

void dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && weight.is_contiguous() && out.size(0) == m && out.size(1) == n &&
                  (!bias.has_value() || (bias->numel() == n && bias->is_contiguous())),
              "dense_gemv: inconsistent shapes (validate with fastinfer.ops.dense_gemv)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_gemv", [&] {
    gemv_rows<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), x.data_ptr<scalar_t>(), x.stride(0),
                        weight.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, m, n, k);
  });
}

// dense_gemv_silu_mul's spec: the composition, through an [M, 2 F] intermediate in x's dtype.
void dense_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.size(0) == 2 * out.size(1), "dense_gemv_silu_mul: weight must have 2 F rows for out [M, F]");
  at::Tensor gate_up = at::empty({x.size(0), weight.size(0)}, x.options());
  dense_gemv(gate_up, x, weight, std::nullopt);
  silu_and_mul(out, gate_up);
}

}  // namespace fastinfer::cpu
