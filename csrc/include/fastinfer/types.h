// Plain host/device-neutral types shared by the torch bindings (host compiler) and the kernels
// (nvcc). Never includes torch.
#pragma once
#include <cstdint>

namespace fastinfer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace fastinfer
