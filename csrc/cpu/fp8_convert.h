// FP8 e4m3 rounding shared by the CPU reference ops (the rule is csrc/include/fastinfer/fp8.h).
#pragma once
#include <c10/util/Float8_e4m3fn.h>

#include <cmath>

#include "fastinfer/fp8.h"

namespace fastinfer::cpu {

using e4m3 = c10::Float8_e4m3fn;

// Clamp with NaN propagating (std::clamp / fminf would turn NaN into a bound). The explicit clamp
// keeps the result independent of whether the installed torch's float -> e4m3 conversion saturates.
inline float clamp_fp8(float x) { return x > kFp8E4m3Max ? kFp8E4m3Max : (x < -kFp8E4m3Max ? -kFp8E4m3Max : x); }

// q = e4m3(clamp(x / scale)), rounded to nearest even.
inline e4m3 quantize_fp8(float x, float scale) { return e4m3(clamp_fp8(x / scale)); }

// max(amax / 448, kFp8MinScale); a NaN amax gives a NaN scale.
inline float dynamic_fp8_scale(float amax) {
  const float s = amax / kFp8E4m3Max;
  return std::isnan(s) ? s : (s > kFp8MinScale ? s : kFp8MinScale);
}

}  // namespace fastinfer::cpu
