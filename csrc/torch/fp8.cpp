// CUDA bindings of the FP8 ops: activation quantization (every architecture) and the scaled FP8
// GEMM (sm_90a builds, Hopper GPUs). The FP8 KV-cache write and attention bind with their plain
// counterparts (kv_cache.cpp, attention_*.cpp).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/fp8.h"

namespace fastinfer::torch_glue {
namespace {

Fp8QuantParams quant_params(at::Tensor& out, at::Tensor& scale, const at::Tensor& input, const char* op) {
  Fp8QuantParams p{};
  p.out = out.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.input = input.data_ptr();
  p.rows = input.size(0);
  p.cols = static_cast<int>(input.size(1));
  p.out_stride = out.stride(0);
  p.input_stride = input.stride(0);
  p.dtype = to_dtype(input, op);
  return p;
}

void fp8_quantize_per_token(at::Tensor& out, at::Tensor& scales, const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  check_launch(launch_fp8_quantize_per_token(quant_params(out, scales, input, "fp8_quantize_per_token"),
                                             stream_of(input)),
               "fp8_quantize_per_token");
}

void fp8_quantize_per_tensor(at::Tensor& out, at::Tensor& scale, const at::Tensor& input, bool dynamic) {
  const c10::cuda::CUDAGuard guard(input.device());
  check_launch(launch_fp8_quantize_per_tensor(quant_params(out, scale, input, "fp8_quantize_per_tensor"), dynamic,
                                              stream_of(input)),
               "fp8_quantize_per_tensor");
}

#ifdef FASTINFER_HAS_SM90
void fp8_scaled_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                   const at::Tensor& scale_b, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(a.device());
  int major = 0, minor = 0, num_sms = 0;
  const int device = a.get_device();
  for (auto [attr, value] : {std::pair{cudaDevAttrComputeCapabilityMajor, &major},
                             std::pair{cudaDevAttrComputeCapabilityMinor, &minor},
                             std::pair{cudaDevAttrMultiProcessorCount, &num_sms}}) {
    const cudaError_t err = cudaDeviceGetAttribute(value, attr, device);
    TORCH_CHECK(err == cudaSuccess, "fastinfer.fp8_scaled_mm: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  }
  TORCH_CHECK(major == 9 && minor == 0, "fastinfer.fp8_scaled_mm: the CUDA kernel needs a Hopper (sm_90) GPU, got sm_",
              major, minor);
  Fp8GemmParams p{};
  p.out = out.data_ptr();
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.scale_a = scale_a.data_ptr<float>();
  p.scale_b = scale_b.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.M = a.size(0);
  p.N = static_cast<int>(b.size(0));
  p.K = static_cast<int>(a.size(1));
  p.out_stride = out.stride(0);
  p.scale_a_per_token = scale_a.numel() != 1;
  p.scale_b_per_channel = scale_b.numel() != 1;
  p.out_dtype = to_dtype(out, "fp8_scaled_mm");
  p.num_sms = num_sms;
  p.wide_tiles = env_choice("fp8_scaled_mm", "FASTINFER_FP8_GEMM_TILE", {"128x128", "128x256"}) == 1;
  p.split_k = env_choice("fp8_scaled_mm", "FASTINFER_FP8_SPLIT_K", {"auto", "off", "on"});  // kSplitK* order
  p.gemv = env_choice("fp8_scaled_mm", "FASTINFER_FP8_GEMV", {"off", "on"}) == 1;
  const int promote = env_choice("fp8_scaled_mm", "FASTINFER_FP8_PROMOTE", {"serial", "overlap", "pingpong"});
  p.overlap_promotion = promote == 1;
  p.pingpong = promote == 2;
  p.multicast = env_choice("fp8_scaled_mm", "FASTINFER_FP8_MULTICAST", {"off", "on"}) == 1;
  check_launch(launch_fp8_gemm_sm90(p, stream_of(a)), "fp8_scaled_mm");
}
#endif

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("fp8_quantize_per_token", &fastinfer::torch_glue::fp8_quantize_per_token);
  m.impl("fp8_quantize_per_tensor", &fastinfer::torch_glue::fp8_quantize_per_tensor);
#ifdef FASTINFER_HAS_SM90
  m.impl("fp8_scaled_mm", &fastinfer::torch_glue::fp8_scaled_mm);
#endif
}
