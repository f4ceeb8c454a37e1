// Merge of split-KV partial attention outputs (FlashDecoding's second pass).
//
//   out[b, h] = sum_s w_s * o_s / sum_s w_s,  w_s = exp2(lse_s - max_s lse_s)
// over the splits s of row (b, h), where o_s is split s's normalised output and lse_s its
// log-sum-exp (log2 domain). Splits that saw no key (past the sequence's end) carry lse = -inf and
// are skipped without reading their o_s, which was never written.
//
// Layout (workspace, fp32): partial_o [batch, num_heads, num_splits, head_dim], then
// partial_lse [batch, num_heads, num_splits].
// Parallelisation: one warp per (b, h) row, each lane owning head_dim / 32 consecutive features
// (one 8- or 16-byte load per split); 4 rows per CTA. With DecodeParams.semaphores the same per-row
// merge runs instead at the end of the decode kernel, in the last CTA of each group of splits
// (decode_work.cuh: merge_if_last), and this kernel is not launched.
// Cost: reads num_splits * (head_dim + 1) * 4 bytes per row; the plan keeps splits long enough that
// this stays a few percent of the KV bytes the splits read.
#pragma once
#include "fastinfer/attention/decode.h"
#include "fastinfer/attention/state.cuh"
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace decode {

constexpr int kMergeThreads = 128;
constexpr int kMergeRowsPerCta = kMergeThreads / kWarpSize;

// 8, 16 or 32 bytes (head_dim 64, 128, 256) of a split's partial output, through L2 only (ld.global.cg): in the
// fused merge (decode_work.cuh: merge_if_last) other CTAs of the same launch wrote them, and L1 is not coherent.
template <int kN>
__device__ __forceinline__ void load_floats(float (&dst)[kN], const float* src) {
  static_assert(kN == 2 || kN == 4 || kN == 8, "a lane loads 8, 16 or 32 bytes");
  if constexpr (kN == 8) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(src));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(src) + 1);
    dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w, dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
  } else if constexpr (kN == 4) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src));
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  } else {
    const float2 v = __ldcg(reinterpret_cast<const float2*>(src));
    dst[0] = v.x, dst[1] = v.y;
  }
}

// Merges row (seq, head) of the workspace into out[seq, head]: one warp, lane owning head_dim / 32
// consecutive features. The merge kernel's body and the fused merge's (merge_if_last). A row holds
// num_splits entries; the first used_splits are read (the fused merge: the splits with tokens).
template <typename T, int kHeadDim>
__device__ __forceinline__ void merge_row(const DecodeParams& p, const float* partial_o, const float* partial_lse,
                                          int num_splits, int used_splits, int64_t seq, int64_t head, int lane) {
  constexpr int kPerLane = kHeadDim / kWarpSize;
  const int64_t row = seq * p.num_heads + head;
  const float* lse = partial_lse + row * num_splits;
  const float* o = partial_o + row * num_splits * kHeadDim + lane * kPerLane;
  attention::AttentionState<kPerLane> state;
  state.init();
  for (int s = 0; s < used_splits; ++s) {
    const float lse_s = __ldcg(lse + s);
    if (lse_s == attention::neg_inf()) continue;  // an empty split: its o was never written
    float o_s[kPerLane];
    load_floats(o_s, o + static_cast<int64_t>(s) * kHeadDim);
    state.merge(o_s, lse_s, 1.0f);
  }
  T* dst = static_cast<T*>(p.out) + seq * p.out_batch_stride + head * p.out_head_stride + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dst[i] = from_float<T>(state.normalized(i));
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const DecodeParams p, const float* __restrict__ partial_o,
                        const float* __restrict__ partial_lse, int num_splits) {
  pdl_wait();  // common.cuh: PDL (FASTINFER_PDL=1)
  pdl_launch_dependents();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + threadIdx.x / kWarpSize;
  if (row >= static_cast<int64_t>(p.batch) * p.num_heads) return;
  merge_row<T, kHeadDim>(p, partial_o, partial_lse, num_splits, num_splits, row / p.num_heads, row % p.num_heads,
                         threadIdx.x % kWarpSize);
}

template <typename T, int kHeadDim>
cudaError_t launch_merge_splits(const DecodeParams& p, const float* partial_o, const float* partial_lse,
                                int num_splits, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_heads;
  const int64_t ctas = ceil_div<int64_t>(rows, kMergeRowsPerCta);
  if (ctas > 0x7fffffff) return cudaErrorInvalidValue;
  return launch_kernel(merge_splits_kernel<T, kHeadDim>, dim3(static_cast<unsigned>(ctas)), dim3(kMergeThreads), 0,
                       stream, p, partial_o, partial_lse, num_splits);
}

}  // namespace decode
}  // namespace fastinfer
