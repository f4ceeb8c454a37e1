// argmax over the last dimension of fp32 rows (the greedy sampler's token pick): out[r] = the index of
// the first maximum of row r, or of its first NaN when it has one (torch.argmax's order: NaN above
// everything, ties to the lowest index).
//
// Why a kernel: torch's reduction took 27 us for one 128256-wide row of logits on an H200 (visit 5's
// batch-1 profile: at::native::reduce_kernel, ~0.6% of the step), one CTA streaming 512 KB. Here one
// CTA of 1024 threads per row reads it with 16-byte loads, 8 in flight per thread: ~3-4 us.
// Each thread keeps (value, index) in index order, so a strict > (or NaN first) keeps the first
// maximum; the warp and CTA combine with the same order, comparing indices on ties.
#pragma once
#include <cstdint>

#include "fastinfer/common.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace argmax {

constexpr int kThreads = 1024;

struct Best {
  float v;
  int64_t i;
};

// Whether (a) comes first in torch.argmax's order against (b): NaN first, then larger, then lower index.
__device__ __forceinline__ bool before(float av, int64_t ai, float bv, int64_t bi) {
  const bool an = av != av, bn = bv != bv;
  if (an || bn) return an && (!bn || ai < bi);
  return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ void take(Best& best, float v, int64_t i) {
  if (before(v, i, best.v, best.i)) best = Best{v, i};
}

__global__ void __launch_bounds__(kThreads) argmax_rows_kernel(const ArgmaxParams p) {
  const float* row = p.input + static_cast<int64_t>(blockIdx.x) * p.input_stride;
  Best best{-INFINITY, INT64_MAX};
  // Head: elements before the first 16-byte boundary; then float4 loads; then the tail.
  const int64_t misalign = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(row) & 15)) / 4 & 3);
  const int64_t head = p.cols < misalign ? p.cols : misalign;
  for (int64_t i = threadIdx.x; i < head; i += kThreads) take(best, row[i], i);
  const int64_t vecs = (p.cols - head) / 4;
  const float4* body = reinterpret_cast<const float4*>(row + head);
  int64_t v = threadIdx.x;
  for (; v + 7 * kThreads < vecs; v += 8 * kThreads) {  // 8 loads in flight, then their elements in order
    float4 x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) x[u] = __ldg(body + v + u * kThreads);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t i = head + 4 * (v + u * kThreads);
      take(best, x[u].x, i);
      take(best, x[u].y, i + 1);
      take(best, x[u].z, i + 2);
      take(best, x[u].w, i + 3);
    }
  }
  for (; v < vecs; v += kThreads) {
    const float4 x = __ldg(body + v);
    const int64_t i = head + 4 * v;
    take(best, x.x, i);
    take(best, x.y, i + 1);
    take(best, x.z, i + 2);
    take(best, x.w, i + 3);
  }
  for (int64_t i = head + 4 * vecs + threadIdx.x; i < p.cols; i += kThreads) take(best, row[i], i);

  // Warp, then CTA: the order is total, so the combination order does not matter.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(kFullMask, best.v, offset);
    const int64_t oi = __shfl_xor_sync(kFullMask, best.i, offset);
    take(best, ov, oi);
  }
  __shared__ float vals[kThreads / kWarpSize];
  __shared__ int64_t idxs[kThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    vals[warp] = best.v;
    idxs[warp] = best.i;
  }
  __syncthreads();
  if (warp == 0) {
    best = Best{vals[lane], idxs[lane]};  // kThreads / 32 == 32 warps: one per lane
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(kFullMask, best.v, offset);
      const int64_t oi = __shfl_xor_sync(kFullMask, best.i, offset);
      take(best, ov, oi);
    }
    // An all -inf row keeps index INT64_MAX only if it had no elements (cols > 0 is checked): every
    // element beats the initial (-inf, INT64_MAX) on the index tie-break.
    if (lane == 0) p.out[static_cast<int64_t>(blockIdx.x) * p.out_stride] = best.i;
  }
}

}  // namespace argmax

inline cudaError_t launch_argmax_rows_impl(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols <= 0 || p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  argmax::argmax_rows_kernel<<<static_cast<unsigned>(p.rows), argmax::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastinfer
