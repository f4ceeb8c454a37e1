// The MoE decode GEMV (gemm/moe_gemv.h): dense_gemv's one-x-tile kernel (gemm/gemv.cuh) with the CTA's
// weight, x row and output row chosen by its pair, blockIdx.x, and the pair's expert id read from device
// memory. grid (P, N / 16 row tiles (swiglu: N / 16 pairs of 8 gate and 8 up rows)); block 8 warps. The
// pairs vary fastest, so the pairs that share an expert read each of its row tiles at about the same
// time: the repeats come from L2, not DRAM. The
// K loop is gemv.cuh's chunk_mma (8 warps split K into 128-k chunks, all loads of a chunk before its
// mmas), B column 0 holding the x row and columns 1..7 zero; the partial 16 x 8 tiles of the warps are
// summed in warp order and column 0 stored: each output is dense_gemv(x[row], W[e]) with M = 1, the same
// expression (so the same bits), and the swiglu epilogue is its silu_mul one.
// Cost: every pair streams its expert's rows; at batch 1 that is each selected expert once.
// FP8 weights (kFp8, MoeGemvParams::weight_scale): dense_gemv's W8A16 form the same way (chunk_mma_fp8, each
// row's sum times its expert's scale before the roundings), bit for bit dense_gemv with weight_scale at M = 1.
#pragma once
#include "fastinfer/gemm/gemv.cuh"
#include "fastinfer/gemm/moe_gemv.h"

namespace fastinfer {
namespace moe_gemv {

using gemv::kThreads;
using gemv::kTileN;
using gemv::kWarps;

template <typename T, bool kFp8>
__global__ void __launch_bounds__(kThreads, 2) moe_gemv_kernel(const MoeGemvParams p) {
  using WT = std::conditional_t<kFp8, uint8_t, T>;                       // a weight element: 16-bit or e4m3
  constexpr int kLaneK = kFp8 ? gemv::kFp8VecElems : gemv::kVecElems;    // k of one lane's 16-byte weight piece
  constexpr int kChunk = kFp8 ? gemv::kFp8ChunkK<1> : gemv::kChunkK;     // k per warp chunk
  __shared__ float4 partial[kWarps][kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int pair = blockIdx.x, tile = blockIdx.y;
  pdl_wait();  // x (and the expert ids) come from the kernels before
  const int64_t expert = p.expert_ids[pair];
  const WT* weight = static_cast<const WT*>(p.weight) + expert * p.n * p.k;
  // dense_gemv's row choice: tile rows, or with swiglu gate row 8 b + g and its up row F + 8 b + g
  const int row0 = tile * kTileN, gate_row = tile * (kTileN / 2) + g;
  const int64_t row_lo = p.swiglu ? gate_row : min(row0 + g, p.n - 1);
  const int64_t row_hi = p.swiglu ? p.n / 2 + gate_row : min(row0 + g + 8, p.n - 1);
  const WT* w_lo = weight + row_lo * p.k + kLaneK * c;
  const WT* w_hi = weight + row_hi * p.k + kLaneK * c;
  const T* x_rows[1] = {static_cast<const T*>(p.x) + (pair / p.x_group) * p.x_stride + kLaneK * c};
  const unsigned has_x = g == 0 ? 1u : 0u;  // B column g = x row g: only row 0 exists
  const gemv::NormState<T, 1> norm{};

  gemv::Acc<1> acc;
#pragma unroll
  for (int a = 0; a < gemv::kAccSets<1>; ++a)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc.v[a][0][j] = 0.f;
  const int64_t num_full = p.k / kChunk;
  int64_t chunk = warp;
  if constexpr (kFp8) {  // dense_gemv's FP8 loop (x row 0 in every B column; only column 0 is stored)
    for (; chunk < num_full; chunk += kWarps) {
      gemv::chunk_mma_fp8<T, 1, false, false>(acc, w_lo, w_hi, x_rows, chunk * kChunk, 0, norm);
    }
    if (chunk == num_full && p.k % kChunk != 0) {
      const int64_t k0 = chunk * kChunk;
      gemv::chunk_mma_fp8<T, 1, true, false>(acc, w_lo, w_hi, x_rows, k0, p.k - k0 - kLaneK * c, norm);
    }
  } else {
    for (; chunk < num_full; chunk += kWarps) {
      gemv::chunk_mma<T, 1, false, false>(acc, w_lo, w_hi, x_rows, has_x, chunk * kChunk, 0, norm);
    }
    if (chunk == num_full && p.k % kChunk != 0) {  // the partial last chunk falls to this warp
      const int64_t k0 = chunk * kChunk;
      gemv::chunk_mma<T, 1, true, false>(acc, w_lo, w_hi, x_rows, has_x, k0, p.k - k0 - kLaneK * c, norm);
    }
  }
  pdl_launch_dependents();
  const auto& a0 = acc.v[0][0];
  const auto& a1 = acc.v[gemv::kAccSets<1> - 1][0];
  partial[warp][lane] = make_float4(a0[0] + a1[0], a0[1] + a1[1], a0[2] + a1[2], a0[3] + a1[3]);
  __syncthreads();

  // Column 0 of D: lanes 4 g' (c = 0), values 0 (row g') and 2 (row g' + 8), as dense_gemv's epilogue
  // reads them (value i of a warp: lane i / 4, element i % 4), summed over the warps in warp order.
  const float* flat = reinterpret_cast<const float*>(&partial[0][0]);
  const auto warp_sum = [&](int i) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += flat[w * kWarpSize * 4 + i];
    return sum;
  };
  // The sum of value i, which belongs to weight row n: times that row's scale with FP8 weights.
  const auto row_sum = [&](int i, int64_t n) {
    if constexpr (kFp8) {
      return warp_sum(i) * p.weight_scale[expert * p.n + n];
    } else {
      return warp_sum(i);
    }
  };
  if (threadIdx.x >= 16) return;
  const int src = threadIdx.x % 8 * 4, hi = threadIdx.x / 8;  // lane 4 g' of D row g' (+ 8 when hi)
  T* out = static_cast<T*>(p.out) + pair * p.out_stride;
  if (p.swiglu) {
    if (hi) return;
    const int64_t gate_n = static_cast<int64_t>(tile) * (kTileN / 2) + src / 4;
    const float gate = to_float(from_float<T>(row_sum(src * 4, gate_n)));
    const float up = to_float(from_float<T>(row_sum(src * 4 + 2, p.n / 2 + gate_n)));
    out[gate_n] = from_float<T>(gate / (1.0f + __expf(-gate)) * up);
    return;
  }
  const int n = row0 + src / 4 + (hi ? 8 : 0);
  if (n < p.n) out[n] = from_float<T>(row_sum(src * 4 + (hi ? 2 : 0), n));
}

template <typename T>
cudaError_t launch_typed(const MoeGemvParams& p, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(p.swiglu ? p.n / kTileN : ceil_div(p.n, kTileN));
  const auto kernel = p.weight_scale != nullptr ? moe_gemv_kernel<T, true> : moe_gemv_kernel<T, false>;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(p.pairs), tiles), dim3(kThreads), 0, stream, p);
}

}  // namespace moe_gemv

inline cudaError_t launch_moe_gemv_impl(const MoeGemvParams& p, cudaStream_t stream) {
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.pairs < 0 || p.pairs > 65535 || p.x_group < 1 || p.n <= 0 || p.n / gemv::kTileN >= 65535 || p.k <= 0 || p.k % gemv::kVecElems != 0 ||
      p.x_stride % gemv::kVecElems != 0 || !aligned16(p.x) || !aligned16(p.weight) || p.expert_ids == nullptr ||
      (p.weight_scale != nullptr && p.k % gemv::kFp8VecElems != 0) ||
      (p.swiglu && p.n % gemv::kTileN != 0)) {
    return cudaErrorInvalidValue;
  }
  if (p.pairs == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return moe_gemv::launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return moe_gemv::launch_typed<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastinfer
