// CUDA binding of dense_gemv, dense_gemv_silu_mul (its SwiGLU epilogue), dense_gemv_add_residual (its
// residual epilogue) and rms_norm_dense_gemv (its RMSNorm prologue): tensors -> DenseGemvParams, current
// stream, launch.
// python/fastinfer/_ops.py validates; the checks here are the second line of defence.
#include <torch/library.h>

#include <limits>
#include <optional>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/gemv.h"

namespace fastinfer::torch_glue {
namespace {

// The checks and Params both ops share; out has N columns (dense_gemv) or N / 2 (swiglu).
DenseGemvParams make_params(const char* op, at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool swiglu) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, " on CUDA takes float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() &&
                  (!bias.has_value() || bias->scalar_type() == x.scalar_type()),
              op, ": x, weight, bias and out must share one dtype");
  const int64_t out_cols = swiglu ? weight.size(0) / 2 : weight.size(0);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2 && weight.size(1) == x.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == out_cols &&
                  (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0))),
              op, ": inconsistent shapes (validate with fastinfer.ops.", op, ")");
  TORCH_CHECK(!swiglu || (weight.size(0) % 16 == 0 && !bias.has_value()),
              op, ": weight needs 2 F rows with F a multiple of 8, and no bias");
  TORCH_CHECK(x.size(0) <= kGemvMaxM, op, ": x may have at most ", kGemvMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1 &&
                  (!bias.has_value() || bias->is_contiguous()),
              op, ": weight and bias must be contiguous, x and out rows contiguous");
  TORCH_CHECK(weight.size(0) <= std::numeric_limits<int>::max(), op, ": too many weight rows");
  DenseGemvParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(weight.size(0));
  p.k = x.size(1);
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.dtype = to_dtype(x, op);
  p.swiglu = swiglu;
  return p;
}

void dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DenseGemvParams p = make_params("dense_gemv", out, x, weight, bias, false);
  // cudaErrorInvalidValue here means K % 8, x's row stride or an unaligned x / weight (16-byte loads).
  check_launch(launch_dense_gemv(p, stream_of(x)), "dense_gemv");
}

void dense_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DenseGemvParams p = make_params("dense_gemv_silu_mul", out, x, weight, std::nullopt, true);
  check_launch(launch_dense_gemv(p, stream_of(x)), "dense_gemv_silu_mul");
}

void dense_gemv_add_residual(at::Tensor& residual, at::Tensor& sq_sums, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "dense_gemv_add_residual";
  DenseGemvParams p = make_params(op, residual, x, weight, bias, false);  // residual has out's shape
  TORCH_CHECK(sq_sums.scalar_type() == at::kFloat && sq_sums.dim() == 2 && sq_sums.size(0) == x.size(0) &&
                  sq_sums.size(1) == (weight.size(0) + kGemvSqSumGroup - 1) / kGemvSqSumGroup &&
                  sq_sums.stride(1) == 1 && sq_sums.device() == x.device(),
              op, ": sq_sums must be float32 [M, ceil(N / ", kGemvSqSumGroup, ")] on x's device");
  p.out = nullptr;
  p.residual = residual.data_ptr();
  p.residual_stride = residual.stride(0);
  p.sq_sums_out = sq_sums.data_ptr<float>();
  p.sq_sums_out_stride = sq_sums.stride(0);
  check_launch(launch_dense_gemv(p, stream_of(x)), op);
}

void rms_norm_dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& sq_sums, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool silu_mul) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "rms_norm_dense_gemv";
  DenseGemvParams p = make_params(op, out, x, weight, bias, silu_mul);
  TORCH_CHECK(x.size(0) <= kGemvNormMaxM, op, ": x may have at most ", kGemvNormMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(sq_sums.scalar_type() == at::kFloat && sq_sums.dim() == 2 && sq_sums.size(0) == x.size(0) &&
                  sq_sums.size(1) >= 1 && sq_sums.stride(1) == 1 && sq_sums.device() == x.device(),
              op, ": sq_sums must be float32 [M, groups] on x's device");
  TORCH_CHECK(norm_weight.scalar_type() == x.scalar_type() && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == x.size(1) && norm_weight.is_contiguous(),
              op, ": norm_weight must be [K], contiguous, in x's dtype");
  TORCH_CHECK(sq_sums.size(1) <= std::numeric_limits<int>::max(), op, ": too many sq_sums groups");
  p.norm_weight = norm_weight.data_ptr();
  p.sq_sums_in = sq_sums.data_ptr<float>();
  p.sq_sums_in_stride = sq_sums.stride(0);
  p.sq_groups = static_cast<int>(sq_sums.size(1));
  p.eps = static_cast<float>(eps);
  // cudaErrorInvalidValue here also means a norm_weight not 16-byte aligned.
  check_launch(launch_dense_gemv(p, stream_of(x)), op);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("dense_gemv", &fastinfer::torch_glue::dense_gemv);
  m.impl("dense_gemv_silu_mul", &fastinfer::torch_glue::dense_gemv_silu_mul);
  m.impl("dense_gemv_add_residual", &fastinfer::torch_glue::dense_gemv_add_residual);
  m.impl("rms_norm_dense_gemv", &fastinfer::torch_glue::rms_norm_dense_gemv);
}
