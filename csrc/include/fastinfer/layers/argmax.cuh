// argmax over the last dimension of fp32 rows (the greedy sampler's token pick): out[r] = the index of
// the first maximum of row r, or of its first NaN when it has one (torch.argmax's order: NaN above
// everything, ties to the lowest index).
//
// Why a kernel: torch's reduction took 27 us for one 128256-wide row of logits on an H200 (visit 5's
// batch-1 profile: at::native::reduce_kernel, ~0.6% of the step), one CTA streaming 512 KB. Here one
// CTA of 1024 threads per row reads it with 16-byte loads, 8 in flight per thread: ~3-4 us.
// Values become unsigned keys in torch's order (order_key); each thread walks its elements in index
// order, so a strict > keeps the first maximum; the warp and CTA compare indices on equal keys.
#pragma once
#include <cstdint>

#include "fastinfer/common.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace argmax {

constexpr int kThreads = 1024;

// A float as an unsigned key in torch.argmax's order: larger values larger keys, -0.0 as +0.0 (they
// compare equal), every NaN the largest key. One unsigned compare per element, and ties (equal keys)
// keep the lower index. No real value maps to key 0 (that pattern is a NaN's), the initial best.
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t b = __float_as_uint(v);
  b = b == 0x80000000u ? 0u : b;                           // -0.0 -> +0.0
  const uint32_t k = (b & 0x80000000u) ? ~b : b | 0x80000000u;  // sign-magnitude -> unsigned order
  return v != v ? 0xFFFFFFFFu : k;
}

struct Best {
  uint32_t k;
  int32_t i;
};

__device__ __forceinline__ void take(Best& best, uint32_t k, int32_t i) {
  if (k > best.k || (k == best.k && i < best.i)) best = Best{k, i};
}

// In index order within a thread, a strict > suffices (a later equal key never replaces).
__device__ __forceinline__ void take_next(Best& best, float v, int32_t i) {
  const uint32_t k = order_key(v);
  if (k > best.k) best = Best{k, i};
}

__global__ void __launch_bounds__(kThreads) argmax_rows_kernel(const ArgmaxParams p) {
  const float* row = p.input + static_cast<int64_t>(blockIdx.x) * p.input_stride;
  const int32_t cols = static_cast<int32_t>(p.cols);
  Best best{0u, INT32_MAX};
  // Head: elements before the first 16-byte boundary; then float4 loads; then the tail.
  const int32_t misalign = static_cast<int32_t>((16 - (reinterpret_cast<uintptr_t>(row) & 15)) / 4 & 3);
  const int32_t head = cols < misalign ? cols : misalign;
  if (threadIdx.x < head) take_next(best, row[threadIdx.x], threadIdx.x);
  const int32_t vecs = (cols - head) / 4;
  const float4* body = reinterpret_cast<const float4*>(row + head);
  int32_t v = threadIdx.x;
  for (; v + 7 * kThreads < vecs; v += 8 * kThreads) {  // 8 loads in flight, then their elements in order
    float4 x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) x[u] = __ldg(body + v + u * kThreads);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int32_t i = head + 4 * (v + u * kThreads);
      take_next(best, x[u].x, i);
      take_next(best, x[u].y, i + 1);
      take_next(best, x[u].z, i + 2);
      take_next(best, x[u].w, i + 3);
    }
  }
  for (; v < vecs; v += kThreads) {
    const float4 x = __ldg(body + v);
    const int32_t i = head + 4 * v;
    take_next(best, x.x, i);
    take_next(best, x.y, i + 1);
    take_next(best, x.z, i + 2);
    take_next(best, x.w, i + 3);
  }
  for (int32_t i = head + 4 * vecs + threadIdx.x; i < cols; i += kThreads) take_next(best, row[i], i);

  // Warp, then CTA (keys and indices compared as in take: a total order, any combination order).
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    take(best, __shfl_xor_sync(kFullMask, best.k, offset), __shfl_xor_sync(kFullMask, best.i, offset));
  }
  __shared__ uint32_t keys[kThreads / kWarpSize];
  __shared__ int32_t idxs[kThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    keys[warp] = best.k;
    idxs[warp] = best.i;
  }
  __syncthreads();
  if (warp == 0) {
    best = Best{keys[lane], idxs[lane]};  // kThreads / 32 == 32 warps: one per lane
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      take(best, __shfl_xor_sync(kFullMask, best.k, offset), __shfl_xor_sync(kFullMask, best.i, offset));
    }
    if (lane == 0) p.out[static_cast<int64_t>(blockIdx.x) * p.out_stride] = best.i;  // cols >= 1: a real index
  }
}

}  // namespace argmax

inline cudaError_t launch_argmax_rows_impl(const ArgmaxParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols <= 0 || p.cols > 0x7fffffff - 4096 || p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  argmax::argmax_rows_kernel<<<static_cast<unsigned>(p.rows), argmax::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fastinfer
