// FP8 e4m3 rounding shared by the CPU reference ops (the rule is csrc/include/fastinfer/fp8.h).
#pragma once
#include <c10/util/Float8_e4m3fn.h>

#include <array>
#include <cmath>
#include <cstdint>

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

// e4m3 -> float through a 256-entry table (c10's bit-twiddling conversion is several times slower
// in the attention loops); identical values.
inline float fp8_to_float(e4m3 x) {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(e4m3(static_cast<uint8_t>(i), e4m3::from_bits()));
    return t;
  }();
  return table[x.x];
}

// Any storage element -> float: the table for e4m3, a plain conversion otherwise.
template <typename T>
inline float load_float(T x) { return static_cast<float>(x); }
template <>
inline float load_float<e4m3>(e4m3 x) { return fp8_to_float(x); }

}  // namespace fastinfer::cpu
