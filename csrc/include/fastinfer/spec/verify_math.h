// The arithmetic of speculative verification, shared by the CPU reference (csrc/cpu/spec_verify.cpp)
// and the CUDA kernel (spec/verify.cuh) so both give bit-identical tokens for identical inputs.
// Host-compiler safe and free of CUDA headers: a CPU-only build includes it too.
//
// Why integers: the residual draw is an inverse-CDF search, and a float prefix sum depends on the
// summation order (sequential on the CPU, a tree in a CUDA block), so two correct implementations
// would disagree whenever the uniform lands within a rounding error of a bin edge. Each
// probability is therefore rounded once to 32.32 fixed point (uint64 with 32 fractional bits);
// integer sums are exact and associative, so any order gives the same CDF. The grid (2^-32) is
// finer than the fp32 uniform's (2^-24 for torch.rand), and V < 2^31 terms of at most 2^32
// cannot overflow 64 bits.
//
// Why sanitizing: probabilities pass through sanitize_prob (NaN, negative or subnormal -> 0,
// above 1 -> 1) before any use. Clamping keeps the fixed-point sum in range; flushing
// subnormals makes the CPU agree with the GPU, whose --use_fast_math flushes them to zero.
// Every remaining float operation (one subtraction, one multiplication, exact power-of-two
// scalings, comparisons) is correctly rounded on both, and none can be contracted into an FMA.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FI_HOST_DEVICE inline
#endif

namespace fastinfer::spec {

constexpr float kMinNormal = 0x1p-126f;          // FLT_MIN: smaller probabilities count as 0
constexpr float kFixedScale = 0x1p32f;           // 1.0 in 32.32 fixed point
constexpr uint64_t kMaxFixedUniform = (uint64_t{1} << 32) - 1;
constexpr uint64_t kLow32 = 0xffffffffull;
// Largest vocabulary (the CUDA kernel's shared-memory chunk table covers 2^20 tokens); the
// wrappers enforce it on every device so that the op has one contract.
constexpr int kMaxVocab = 1 << 20;

// [0, 1] with NaN, negatives and subnormals mapped to 0 and anything above 1 (inf too) to 1.
FI_HOST_DEVICE float sanitize_prob(float x) { return x >= kMinNormal ? (x <= 1.0f ? x : 1.0f) : 0.0f; }

// The rule (Leviathan et al. 2023; Chen et al. 2023), p = target, q = draft probabilities:
//   accept proposed token x_i with probability min(1, p(x_i) / q(x_i));
//   at the first rejection, sample from the residual norm(max(0, p - q)) at that position;
//   if all k_b proposals are accepted, sample the bonus token from p at position k_b.
// With u ~ U[0, 1): u < p / q  <=>  u * q < p (q > 0), and q = 0 < p accepts, as p / q = inf
// would. The product form needs no division (approximate under --use_fast_math).
FI_HOST_DEVICE bool accept_draft(float uniform, float p, float q) { return uniform * q < p; }

// A sanitized probability in fixed point, rounded to nearest (ties to even, on host and device).
FI_HOST_DEVICE uint64_t to_fixed(float prob) { return static_cast<uint64_t>(rintf(prob * kFixedScale)); }

// max(0, p - q) in fixed point (p, q sanitized). A subnormal difference (flushed on the GPU)
// rounds to 0 either way.
FI_HOST_DEVICE uint64_t residual_fixed(float p, float q) {
  const float r = p - q;
  return r > 0.0f ? to_fixed(r) : 0;
}

// The uniform in fixed point, floor(u * 2^32), clamped to [0, 2^32 - 1]; NaN -> 0.
FI_HOST_DEVICE uint64_t uniform_to_fixed(float uniform) {
  if (!(uniform > 0.0f)) return 0;
  if (uniform >= 1.0f) return kMaxFixedUniform;
  return static_cast<uint64_t>(floorf(uniform * kFixedScale));
}

// floor(U * total / 2^32) without a 128-bit product: total = hi * 2^32 + lo, and hi * U is an
// integer. The result is < total for total > 0, so the search below always finds a token.
FI_HOST_DEVICE uint64_t cdf_threshold(uint64_t total, float uniform) {
  const uint64_t u = uniform_to_fixed(uniform);
  return (total >> 32) * u + (((total & kLow32) * u) >> 32);
}

// The drawn token is the smallest j whose inclusive prefix sum of fixed-point masses exceeds
// cdf_threshold(total, uniform); zero-mass tokens are never drawn. When the residual has no mass
// (p == q up to the grid) the token is drawn from p at that position instead, with the same
// uniform; when p has no mass either (an all-zero or NaN row, or every entry below 2^-33) the
// token is argmax(p), the first index on ties.

}  // namespace fastinfer::spec
