// CUDA bindings of the fused small layers: tensors -> Params, current stream, launch.
#include <torch/library.h>

#include <optional>

#include "fastinfer/layers/layers.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

// The fields every RMSNorm launch shares; the caller sets the output (16-bit out, or the FP8 pair).
RMSNormParams rms_norm_params(const at::Tensor& input, const at::Tensor* residual, const at::Tensor& weight,
                              double eps, const char* op) {
  RMSNormParams p{};
  p.input = input.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.num_tokens = input.size(0);
  p.hidden = static_cast<int>(input.size(1));
  p.input_stride = input.stride(0);
  p.residual_stride = residual ? residual->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(input, op);
  p.weight_fp32 = weight.scalar_type() == at::kFloat;
  return p;
}

void rms_norm_impl(at::Tensor& out, const at::Tensor& input, at::Tensor* residual, const at::Tensor& weight,
                   double eps, const char* op) {
  const c10::cuda::CUDAGuard guard(input.device());
  RMSNormParams p = rms_norm_params(input, residual, weight, eps, op);
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  check_launch(launch_rms_norm(p, stream_of(input)), op);
}

// The fields every SiLU-and-mul launch shares (input [rows, 2 d]); the caller sets the output.
SiluMulParams silu_mul_params(const at::Tensor& input, const char* op) {
  SiluMulParams p{};
  p.input = input.data_ptr();
  p.num_tokens = input.size(0);
  p.d = static_cast<int>(input.size(1) / 2);
  p.input_stride = input.stride(0);
  p.dtype = to_dtype(input, op);
  return p;
}

// rms_norm_quant_fp8 / silu_and_mul_quant_fp8's FP8 outputs: e4m3 rows of `cols`, fp32 scales [rows].
void check_fp8_out(const char* op, const at::Tensor& out, const at::Tensor& scales, const at::Tensor& input,
                   int64_t cols) {
  TORCH_CHECK(input.dim() == 2 && input.stride(1) == 1, op, ": input must be 2-D with contiguous rows");
  TORCH_CHECK(cols > 0, op, ": rows must have at least one element");
  TORCH_CHECK(out.scalar_type() == at::kFloat8_e4m3fn && out.dim() == 2 && out.size(0) == input.size(0) &&
                  out.size(1) == cols && out.stride(1) == 1 && out.device() == input.device(),
              op, ": out must be float8_e4m3fn [", input.size(0), ", ", cols, "] with contiguous rows on ",
              input.device());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == input.size(0) &&
                  scales.is_contiguous() && scales.device() == input.device(),
              op, ": scales must be a contiguous float32 [", input.size(0), "] on ", input.device());
}

void rms_norm_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input,
                        const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm_quant_fp8";
  TORCH_CHECK(input.dim() == 2, op, ": input must be [num_tokens, hidden]");
  check_fp8_out(op, out, scales, input, input.size(1));
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
              op, ": weight must be a contiguous [hidden] in input's dtype on its device");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == input.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == input.scalar_type() && residual->device() == input.device(),
                op, ": residual must be like input, rows contiguous");
  }
  const c10::cuda::CUDAGuard guard(input.device());
  RMSNormParams p = rms_norm_params(input, residual.has_value() ? &*residual : nullptr, weight, eps, op);
  p.fp8_out = out.data_ptr();
  p.fp8_scales = scales.data_ptr<float>();
  p.fp8_out_stride = out.stride(0);
  check_launch(launch_rms_norm(p, stream_of(input)), op);
}

void silu_and_mul_quant_fp8(at::Tensor& out, at::Tensor& scales, const at::Tensor& input) {
  const char* op = "silu_and_mul_quant_fp8";
  TORCH_CHECK(input.dim() == 2 && input.size(1) % 2 == 0 && input.size(1) > 0, op, ": input must be [rows, 2 d], d >= 1");
  check_fp8_out(op, out, scales, input, input.size(1) / 2);
  const c10::cuda::CUDAGuard guard(input.device());
  SiluMulParams p = silu_mul_params(input, op);
  p.fp8_out = out.data_ptr();
  p.fp8_scales = scales.data_ptr<float>();
  p.fp8_out_stride = out.stride(0);
  check_launch(launch_silu_and_mul(p, stream_of(input)), op);
}

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  rms_norm_impl(out, input, nullptr, weight, eps, "rms_norm");
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  rms_norm_impl(input, input, &residual, weight, eps, "fused_add_rms_norm");
}

void embedding(at::Tensor& out, const std::optional<at::Tensor>& sq_sums, const at::Tensor& input_ids,
               const at::Tensor& weight) {
  const char* op = "embedding";
  TORCH_CHECK(input_ids.scalar_type() == at::kLong && input_ids.dim() == 1 && input_ids.is_contiguous() &&
                  weight.dim() == 2 && weight.is_contiguous() && out.dim() == 2 && out.stride(1) == 1 &&
                  out.size(0) == input_ids.size(0) && out.size(1) == weight.size(1) &&
                  out.scalar_type() == weight.scalar_type(),
              "fastinfer.embedding: inconsistent arguments (validate with fastinfer.ops.embedding)");
  TORCH_CHECK(input_ids.device() == out.device() && weight.device() == out.device(),
              "fastinfer.embedding: every tensor must be on ", out.device());
  if (sq_sums.has_value()) {
    TORCH_CHECK(sq_sums->scalar_type() == at::kFloat && sq_sums->dim() == 2 && sq_sums->stride(1) == 1 &&
                    sq_sums->size(0) == out.size(0) && sq_sums->size(1) == (out.size(1) + 15) / 16 &&
                    sq_sums->device() == out.device(),
                "fastinfer.embedding: sq_sums must be float32 [num_tokens, ceil(hidden / 16)] on ", out.device());
  }
  const c10::cuda::CUDAGuard guard(out.device());
  EmbeddingParams p{};
  p.out = out.data_ptr();
  p.sq_sums = sq_sums.has_value() ? sq_sums->data_ptr<float>() : nullptr;
  p.ids = input_ids.data_ptr<int64_t>();
  p.weight = weight.data_ptr();
  p.num_tokens = input_ids.size(0);
  p.vocab = weight.size(0);
  p.hidden = weight.size(1);
  p.out_stride = out.stride(0);
  p.sq_sums_stride = sq_sums.has_value() ? sq_sums->stride(0) : 0;
  p.dtype = to_dtype(out, op);
  check_launch(launch_embedding(p, stream_of(out)), op);
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache) {
  const c10::cuda::CUDAGuard guard(query.device());
  RotaryParams p{};
  p.positions = positions.data_ptr<int64_t>();
  p.query = query.data_ptr();
  p.key = key.data_ptr();
  p.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  p.num_tokens = query.size(0);
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(query.size(2));
  p.rotary_dim = static_cast<int>(cos_sin_cache.size(1));
  p.query_token_stride = query.stride(0);
  p.query_head_stride = query.stride(1);
  p.key_token_stride = key.stride(0);
  p.key_head_stride = key.stride(1);
  p.dtype = to_dtype(query, "rotary_embedding");
  check_launch(launch_rotary_embedding(p, stream_of(query)), "rotary_embedding");
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  SiluMulParams p = silu_mul_params(input, "silu_and_mul");
  p.d = static_cast<int>(out.size(1));
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  check_launch(launch_silu_and_mul(p, stream_of(input)), "silu_and_mul");
}

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  SiluMulParams p = silu_mul_params(input, "gelu_tanh_and_mul");
  p.d = static_cast<int>(out.size(1));
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  p.activation = 1;
  check_launch(launch_silu_and_mul(p, stream_of(input)), "gelu_tanh_and_mul");
}

void argmax_rows(at::Tensor& out, const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  ArgmaxParams p{};
  p.out = out.data_ptr<int64_t>();
  p.input = input.data_ptr<float>();
  p.rows = input.size(0);
  p.cols = input.size(1);
  p.out_stride = out.stride(0);
  p.input_stride = input.stride(0);
  check_launch(launch_argmax_rows(p, stream_of(input)), "argmax_rows");
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("embedding", &fastinfer::torch_glue::embedding);
  m.impl("rms_norm", &fastinfer::torch_glue::rms_norm);
  m.impl("fused_add_rms_norm", &fastinfer::torch_glue::fused_add_rms_norm);
  m.impl("rotary_embedding", &fastinfer::torch_glue::rotary_embedding);
  m.impl("silu_and_mul", &fastinfer::torch_glue::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &fastinfer::torch_glue::gelu_tanh_and_mul);
  m.impl("argmax_rows", &fastinfer::torch_glue::argmax_rows);
  m.impl("rms_norm_quant_fp8", &fastinfer::torch_glue::rms_norm_quant_fp8);
  m.impl("silu_and_mul_quant_fp8", &fastinfer::torch_glue::silu_and_mul_quant_fp8);
}
