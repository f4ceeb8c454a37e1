// Runtime value -> compile-time type. An unsupported value returns an error; never a fallback.
#pragma once
#include "fastinfer/common.cuh"

#define FI_DISPATCH_DTYPE(dtype, T, ...)                                   \
  [&]() -> cudaError_t {                                                   \
    switch (dtype) {                                                       \
      case ::fastinfer::DType::kFloat32: { using T = float; return __VA_ARGS__(); }          \
      case ::fastinfer::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }         \
      case ::fastinfer::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                      \
    return cudaErrorInvalidValue;                                          \
  }()
