// Online softmax state in fp32, in the log2 domain.
//
// Scores arrive premultiplied by scale * log2(e), so exp(scale * q.k - max) is exp2(s - m): one
// ex2 instruction per probability, no extra multiply. A state over keys j is
//   m = max_j s_j,  d = sum_j exp2(s_j - m),  o = sum_j exp2(s_j - m) * v_j,
// and its log-sum-exp (log2 domain) is m + log2(d). The empty state (no keys) has m = -inf, d = 0,
// o = 0; merging it is a no-op, and it is recognised by m == -inf and never read further, so garbage
// in an unwritten partial output is never multiplied (by 0 or anything else).
#pragma once
#include <math_constants.h>

#include "fastinfer/common.cuh"

namespace fastinfer {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return -CUDART_INF_F; }

// Running max and denominator of one softmax row, updated a tile of keys at a time.
struct SoftmaxStats {
  float m;  // max of the scores seen so far; -inf before the first
  float d;  // sum of exp2(s - m) over the scores seen so far

  __device__ __forceinline__ static SoftmaxStats empty() { return {neg_inf(), 0.0f}; }

  // Raises m to cover a tile whose largest score is tile_max. Returns the factor that rescales
  // everything accumulated under the old max (d is rescaled here; the caller rescales its o).
  // 0 on the first tile (old m = -inf), exactly 1 when the max does not move.
  __device__ __forceinline__ float raise_max(float tile_max) {
    const float m_new = fmaxf(m, tile_max);
    const float alpha = m_new == m ? 1.0f : exp2f(m - m_new);  // m == m_new also covers -inf == -inf
    d *= alpha;
    m = m_new;
    return alpha;
  }

  __device__ __forceinline__ float lse() const { return m + log2f(d); }
};

// A (partial) attention output of kN features with its softmax state. A normalised partial from
// another CTA (o / d, lse) enters as the state (o / d, m = lse, d = 1).
template <int kN>
struct AttentionState {
  float o[kN];
  float m, d;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < kN; ++i) o[i] = 0.0f;
    m = neg_inf();
    d = 0.0f;
  }

  // this <- this (+) other. An empty other (m_b = -inf) changes nothing and its o_b is not read.
  __device__ __forceinline__ void merge(const float (&o_b)[kN], float m_b, float d_b) {
    if (m_b == neg_inf()) return;
    const float m_new = fmaxf(m, m_b);
    const float scale_a = exp2f(m - m_new);  // 0 while this is still empty: its o and d are 0
    const float scale_b = exp2f(m_b - m_new);
#pragma unroll
    for (int i = 0; i < kN; ++i) o[i] = o[i] * scale_a + o_b[i] * scale_b;
    d = d * scale_a + d_b * scale_b;
    m = m_new;
  }

  // The softmax-weighted average o / d; 0 for the empty state (a sequence without keys).
  __device__ __forceinline__ float normalized(int i) const { return d > 0.0f ? o[i] / d : 0.0f; }
};

}  // namespace attention
}  // namespace fastinfer
