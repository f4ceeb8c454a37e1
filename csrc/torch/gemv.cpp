// CUDA binding of dense_gemv and dense_gemv_silu_mul (its SwiGLU epilogue): tensors -> DenseGemvParams, current stream, launch.
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

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("dense_gemv", &fastinfer::torch_glue::dense_gemv);
  m.impl("dense_gemv_silu_mul", &fastinfer::torch_glue::dense_gemv_silu_mul);
}
