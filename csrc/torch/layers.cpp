// CUDA bindings of the fused small layers: tensors -> Params, current stream, launch.
#include <torch/library.h>

#include "fastinfer/layers/layers.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

void rms_norm_impl(at::Tensor& out, const at::Tensor& input, at::Tensor* residual, const at::Tensor& weight,
                   double eps, const char* op) {
  const c10::cuda::CUDAGuard guard(input.device());
  RMSNormParams p{};
  p.out = out.data_ptr();
  p.input = input.data_ptr();
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.num_tokens = input.size(0);
  p.hidden = static_cast<int>(input.size(1));
  p.out_stride = out.stride(0);
  p.input_stride = input.stride(0);
  p.residual_stride = residual ? residual->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(input, op);
  check_launch(launch_rms_norm(p, stream_of(input)), op);
}

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  rms_norm_impl(out, input, nullptr, weight, eps, "rms_norm");
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  rms_norm_impl(input, input, &residual, weight, eps, "fused_add_rms_norm");
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
  SiluMulParams p{};
  p.out = out.data_ptr();
  p.input = input.data_ptr();
  p.num_tokens = input.size(0);
  p.d = static_cast<int>(out.size(1));
  p.out_stride = out.stride(0);
  p.input_stride = input.stride(0);
  p.dtype = to_dtype(input, "silu_and_mul");
  check_launch(launch_silu_and_mul(p, stream_of(input)), "silu_and_mul");
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("rms_norm", &fastinfer::torch_glue::rms_norm);
  m.impl("fused_add_rms_norm", &fastinfer::torch_glue::fused_add_rms_norm);
  m.impl("rotary_embedding", &fastinfer::torch_glue::rotary_embedding);
  m.impl("silu_and_mul", &fastinfer::torch_glue::silu_and_mul);
}
