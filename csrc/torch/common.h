// Host-side glue shared by the CUDA bindings: torch dtype -> fastinfer::DType, stream, checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "fastinfer/types.h"

namespace fastinfer::torch_glue {

inline DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t.scalar_type());
  }
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Which of `choices` the environment variable `name` holds: unset or "" is choices[0] (the default);
// anything not listed is refused with a message naming the op, the variable and the choices. Read at
// every call (the kernel-variant settings, listed by `python -m fastinfer env`), so one process can
// compare variants.
inline int env_choice(const char* op, const char* name, std::initializer_list<const char*> choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  std::string listed;
  int index = 0;
  for (const char* choice : choices) {
    if (std::strcmp(value, choice) == 0) return index;
    listed += index == 0 ? "" : (index + 1 == static_cast<int>(choices.size()) ? " or " : ", ");
    listed += choice;
    ++index;
  }
  TORCH_CHECK(false, "fastinfer.", op, ": environment variable ", name, " must be ", listed, ", got '", value, "'");
}

// An attention op's window as the kernels' int, refused (naming the op) when negative: a window of 2^30 keys
// or more is full attention (0). It covers every decode context (the binding caps tables below 2^30 tokens) and any
// prefill context a GPU's memory holds (2^30 tokens of one 64-wide 16-bit KV head: 256 GB).
inline int window_param(const char* op, int64_t window) {
  TORCH_CHECK(window >= 0, "fastinfer.", op, ": window must be >= 0 (0: full attention), got ", window);
  return window >= (int64_t{1} << 30) ? 0 : static_cast<int>(window);
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastinfer.", op, " CUDA launch failed: ", cudaGetErrorString(err));
}

// The cache / scale pairing of the attention ops: kv_scale == nullptr (the plain op) needs a cache of
// query's dtype; otherwise (the *_fp8 op) an float8_e4m3fn cache, a bf16 / fp16 query (the CUDA
// kernels' instantiations) and kv_scale fp32 [2] = (k_scale, v_scale), contiguous, on query's device.
// Returns kv_scale's device pointer (nullptr for the plain op), read by the kernels, never the host.
inline const float* check_kv_cache_dtype(const char* op, const at::Tensor& query, const at::Tensor& kv_cache,
                                         const at::Tensor* kv_scale) {
  if (kv_scale == nullptr) {
    TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(), "fastinfer.", op, ": kv_cache dtype ",
                kv_cache.scalar_type(), " differs from query's ", query.scalar_type());
    return nullptr;
  }
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat8_e4m3fn, "fastinfer.", op,
              ": kv_cache must be float8_e4m3fn, got ", kv_cache.scalar_type());
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf, "fastinfer.", op,
              ": the CUDA kernel over an FP8 kv_cache needs a bfloat16 or float16 query, got ", query.scalar_type());
  TORCH_CHECK(kv_scale->scalar_type() == at::kFloat && kv_scale->dim() == 1 && kv_scale->numel() == 2 &&
                  kv_scale->is_contiguous() && kv_scale->device() == query.device(),
              "fastinfer.", op, ": kv_scale must be a contiguous float32 [2] (k_scale, v_scale) on ", query.device());
  return kv_scale->data_ptr<float>();
}

}  // namespace fastinfer::torch_glue
