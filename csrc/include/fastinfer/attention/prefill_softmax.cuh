// Online softmax over the mma.m16n8k16 accumulator fragments of one warp (used by prefill.cuh).
//
// A warp owns 16 query rows. In an m16n8 fp32 accumulator (c0, c1, c2, c3) lane l holds row
// l / 4 in c0, c1 and row l / 4 + 8 in c2, c3, so each lane carries two rows (index i = 0, 1) and
// the four lanes of a quad (l / 4 equal) share them: row reductions are two xor-shuffles (1, 2).
// Scores arrive already multiplied by scale * log2(e), so exp(x * scale) = exp2(score): one ex2
// per element, and the running max is kept in the same log2 units.
#pragma once
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace prefill {

constexpr float kLn2 = 0.6931471805599453f;

template <int kKeyBlocks, int kDimBlocks>  // 8-wide blocks of keys (scores) and of head_dim (output)
struct OnlineSoftmax {
  float row_max[2];  // running max of the scaled scores, -inf before any visible key
  float row_sum[2];  // this lane's share of the running denominator (quad-reduced in finalize)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.0f;
    }
  }

  // scores[kKeyBlocks][4] (scaled, -inf where masked) become the unnormalised probabilities
  // exp2(score - max); the output accumulator is rescaled to the new max.
  __device__ __forceinline__ void update(float (&scores)[kKeyBlocks][4], float (&out)[kDimBlocks][4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float new_max = row_max[i];
#pragma unroll
      for (int nb = 0; nb < kKeyBlocks; ++nb) {
        new_max = fmaxf(new_max, fmaxf(scores[nb][2 * i], scores[nb][2 * i + 1]));
      }
      new_max = fmaxf(new_max, __shfl_xor_sync(kFullMask, new_max, 1));
      new_max = fmaxf(new_max, __shfl_xor_sync(kFullMask, new_max, 2));
      // A row that has seen only masked keys keeps max -inf; subtracting 0 instead keeps
      // exp2(-inf - base) = 0 rather than exp2(-inf + inf) = NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      const float correction = exp2f(row_max[i] - base);
      row_max[i] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int nb = 0; nb < kKeyBlocks; ++nb) {
        scores[nb][2 * i] = exp2f(scores[nb][2 * i] - base);
        scores[nb][2 * i + 1] = exp2f(scores[nb][2 * i + 1] - base);
        sum += scores[nb][2 * i] + scores[nb][2 * i + 1];
      }
      row_sum[i] = row_sum[i] * correction + sum;
#pragma unroll
      for (int db = 0; db < kDimBlocks; ++db) {
        out[db][2 * i] *= correction;
        out[db][2 * i + 1] *= correction;
      }
    }
  }

  // The denominator of row i (l / 4 or l / 4 + 8): the quad's shares summed.
  __device__ __forceinline__ float row_total(int i) const {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    return sum + __shfl_xor_sync(kFullMask, sum, 2);
  }

  // log(sum over keys of exp(scale * q . k)) of rows l / 4 (i = 0) and l / 4 + 8 (i = 1): the scores
  // are in log2 units, so it is ln 2 * (max + log2(sum exp2(score - max))); -inf for a row without a key.
  __device__ __forceinline__ void log_sum_exp(float (&lse)[2]) const {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = row_total(i);
      lse[i] = sum > 0.0f ? (row_max[i] + __log2f(sum)) * kLn2 : -INFINITY;
    }
  }

  // lse[r * stride] <- log_sum_exp of the rows r = row, row + 8 (this lane's two, row = l / 4 of its
  // row block) that are < num_rows; one lane of each quad stores.
  __device__ __forceinline__ void store_log_sum_exp(float* lse, int64_t stride, int row, int num_rows,
                                                    int lane) const {
    float value[2];
    log_sum_exp(value);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (lane % 4 == 0 && row + 8 * i < num_rows) lse[(row + 8 * i) * stride] = value[i];
    }
  }

  // 1 / denominator of rows l / 4 (i = 0) and l / 4 + 8 (i = 1); 0 for a row without any key.
  __device__ __forceinline__ void inverse_sums(float (&inv)[2]) const {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = row_total(i);
      inv[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
  }
};

}  // namespace prefill
}  // namespace fastinfer
