// The 4-bit MoE decode GEMV (gemm/moe_w4a16.h): the small W4A16 GEMV's strip sums (w4a16_small.cuh,
// deferred scales, one 8-token tile of which only token 0 exists) for one (pair, strip) per CTA, with the
// pair's expert id read from device memory choosing the weight, scales and offsets, and the pair's x row.
// grid (P, N / 64), block 8 warps; the pairs vary fastest, so pairs that share an expert read its strips at
// about the same time (the repeats come from L2). No split-K: a pair's strip is one CTA over all of K (at
// decode sizes P x N / 64 CTAs already fill the GPU: e.g. Mixtral-8x7B at batch 1, 2 pairs x 448 gate / up
// strips; Qwen3-30B-A3B, 8 pairs x 24), so each output is the unsplit int4_linear sum, deterministic.
#pragma once
#include "fastinfer/gemm/moe_w4a16.h"
// The W4A16 helpers and the small GEMV's strip_sums, without int4_linear's dispatch (which would instantiate
// every W4A16 kernel in this unit again; they live in w4a16.cu).
#ifndef FASTINFER_W4A16_HELPERS_ONLY
#define FASTINFER_W4A16_HELPERS_ONLY
#endif
#include "fastinfer/gemm/w4a16.cuh"
#include "fastinfer/gemm/w4a16_small.cuh"

namespace fastinfer {
namespace moe_w4a16 {

using w4a16::small::kThreads;
using Cfg = w4a16::small::SmallConfig<1, true>;

template <typename T, Int4Mode kMode>
__global__ void __launch_bounds__(kThreads, 2) moe_w4a16_kernel(const MoeW4A16Params mp, const int group_shift) {
  extern __shared__ __align__(16) float red[];
  const int pair = blockIdx.x, strip = blockIdx.y;
  const int64_t expert = mp.expert_ids[pair];
  const int64_t groups = mp.k / mp.group_size;
  W4A16Params p{};  // the pair's GEMV as int4_linear sees it: M = 1 on its expert's tensors
  p.x = static_cast<const T*>(mp.x) + static_cast<int64_t>(pair / mp.x_group) * mp.x_stride;
  p.qweight = mp.qweight + expert * (mp.n / int4_layout::kStripN) * (8 * static_cast<int64_t>(mp.k));
  p.scales = static_cast<const T*>(mp.scales) + expert * groups * mp.n;
  p.offsets = mp.offsets == nullptr ? nullptr : static_cast<const T*>(mp.offsets) + expert * groups * mp.n;
  p.m = 1;
  p.n = mp.n;
  p.k = mp.k;
  p.group_size = mp.group_size;
  p.x_stride = mp.x_stride;
  const int chunks = (mp.k / int4_layout::kStepK + Cfg::kChunk - 1) / Cfg::kChunk;
  w4a16::small::strip_sums<T, 1, kMode, true>(p, group_shift, strip, 0, 0, chunks, red);
  __syncthreads();  // slice 0 of red (token 0: red[col]) is complete
  T* out = static_cast<T*>(mp.out) + static_cast<int64_t>(pair) * mp.out_stride + strip * int4_layout::kStripN;
  for (int col = static_cast<int>(threadIdx.x); col < int4_layout::kStripN; col += kThreads) out[col] = from_float<T>(red[col]);
}

template <typename T, Int4Mode kMode>
cudaError_t launch_typed(const MoeW4A16Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.pairs), static_cast<unsigned>(p.n / int4_layout::kStripN));
  // A plain launch, as int4_linear's kernels: no pdl_wait inside, so never the PDL attribute.
  moe_w4a16_kernel<T, kMode><<<grid, kThreads, Cfg::kSmemBytes, stream>>>(p, __builtin_ctz(p.group_size));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mode(const MoeW4A16Params& p, cudaStream_t stream) {
  switch (p.mode) {
    case Int4Mode::kSymmetric: return launch_typed<T, Int4Mode::kSymmetric>(p, stream);
    case Int4Mode::kZeros: return launch_typed<T, Int4Mode::kZeros>(p, stream);
    case Int4Mode::kMins: return launch_typed<T, Int4Mode::kMins>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_w4a16

inline cudaError_t launch_moe_w4a16_impl(const MoeW4A16Params& p, cudaStream_t stream) {
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool group_ok = p.group_size == 32 || p.group_size == 64 || p.group_size == 128;
  if (p.pairs < 0 || p.pairs > 65535 || p.x_group < 1 || p.n <= 0 || p.n % 64 != 0 || p.n / 64 > 65535 ||
      p.k <= 0 || p.k % 64 != 0 || !group_ok || p.k % p.group_size != 0 || p.x_stride % 8 != 0 ||
      !aligned16(p.x) || !aligned16(p.qweight) || !aligned16(p.scales) || (p.offsets && !aligned16(p.offsets)) ||
      p.expert_ids == nullptr || ((p.mode == Int4Mode::kSymmetric) != (p.offsets == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.pairs == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return moe_w4a16::launch_mode<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return moe_w4a16::launch_mode<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastinfer
