// FP8 decode GEMM (W8A8, e4m3): out[M, N] = (a[M, K] . b[N, K]) * scale_a[m] * scale_b[n] + bias[n]
// for M = 1..16 (kFp8GemvMaxM), on mma.sync.m16n8k32.e4m3 (sm_89+; built in the sm_90a unit next to
// the wgmma GEMM, fp8_sm90.cuh, which launches it when Fp8GemmParams::gemv is set).
//
// Why. At decode sizes the FP8 GEMM is a stream of N K weight bytes, half of bf16's. The wgmma
// kernel tiles N by 128 (swapped, tokens on wgmma's N side): 32 CTAs at N = 4096, too few to keep
// 132 SMs' loads in flight without split K, and split K (a cluster reduction) costs as much as it
// gains at K = 4096 (bench/results/2026-11-28-h200-visit4/fp8.log: o at M = 1 reads its 16.8 MB at
// 30% of copy bandwidth, qkv at 39%). dense_gemv (gemv.cuh), the bf16 kernel this one copies, reads
// o at 49% and down at 76%, each CTA taking 16 rows: N / 16 CTAs, 2 per SM.
//
// Fragment order: the same as gemv.cuh's, one byte per element. Lane L = 4 g + c loads 16
// consecutive bytes (k = 16 c .. 16 c + 15 of a 64-k step) of b rows g and g + 8 and of a row g.
// m16n8k32's A fragment holds rows g / g + 8 at k 4 c .. 4 c + 3 (a0 / a1) and 16 + 4 c .. (a2 / a3),
// B holds column g at k 4 c .. (b0) and 16 + 4 c .. (b1). The lane's words .x .y .z .w (k 16 c + 0-3,
// 4-7, 8-11, 12-15) feed two mmas:
//     mma 0: a = {bl.x, bh.x, bl.y, bh.y}, b = {av.x, av.y}
//     mma 1: a = {bl.z, bh.z, bl.w, bh.w}, b = {av.z, av.w}
// The map from the mma's k to memory is the same for A and B, so the sum is exact as written; every
// operand is one 16-byte load, and a warp instruction reads 64 contiguous bytes of each of 8 rows.
//
// Tensor cores. sm_90 has no native FP8 mma.sync: ptxas lowers each m16n8k32.e4m3 to F2FP unpacks
// (two e4m3 -> two f16, exact: every e4m3 value is an f16) and two HMMA.16816.F32 (SASS of this
// kernel: 96 F2FP and 16 HMMA per 256-k chunk and lane, kTiles = 1). So the products are exact and
// summed in fp32 as in dense_gemv, without the ~14-bit accumulation of FP8 wgmma (DeepSeek-V3 report,
// 3.3.2) that makes fp8_sm90.cuh promote every 128 k (chunk_mma's chunk-by-chunk sums are for
// registers, not accuracy). Budget: the unpacks run at ~16 per clock per SM, 3072
// lane-ops per 4 KiB of weights, ~21 weight bytes per clock per SM against ~16 needed at 4.2 TB/s
// (132 SMs, ~1.98 GHz): about 3/4 of the conversion rate at full bandwidth (an estimate; the x
// unpacks are a third of them, 8 columns converted whatever M is).
//
// Parallelisation and registers: gemv.cuh's. A CTA (8 warps) owns 16 rows of b and all of K; warp w
// takes 256-k chunks w, w + 8, ...; a chunk's 8 b loads and 4 kTiles a loads (16 B per lane each) are
// issued before its mmas: 4 KiB of weights per warp in flight, 128 KiB per SM at 2 CTAs. kTiles = 1
// (M <= 8) or 2 (M <= 16) n8 tiles of a^T share each b fragment, so b is read once whatever M is.
// Rows of b past N re-read row N - 1 (not stored); rows of a past M read row 0 and are zeroed.
// K % 16 == 0 (the op's rule) keeps every 16-byte piece wholly inside or outside a row.
//
// Predicted (H200, bench_fp8.py's write flush, ~9 us per call + bytes / 4.2 TB/s as dense_gemv
// measured): M = 1 o 13.6 -> ~12.5 us, qkv 17.0 -> ~15, gate_up 42 -> ~38, down 28.6 -> ~23: the
// weight bytes at dense_gemv's rate. Not measured yet: FASTINFER_FP8_GEMV=on selects it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fastinfer/common.cuh"
#include "fastinfer/gemm/fp8.h"

namespace fastinfer {
namespace fp8gemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileN = 16;                          // rows of b per CTA: the mma's M dimension
constexpr int kVecElems = 16;                       // 16-byte loads of 1-byte elements
constexpr int kStepK = 4 * kVecElems;               // k per step: 4 lanes (c) x 16 elements, two mmas
constexpr int kStepsPerChunk = 4;
constexpr int kChunkK = kStepK * kStepsPerChunk;    // 256 k per chunk
static_assert(kFp8GemvMaxM == 16, "tiles_for below covers M <= 16");

__host__ __device__ constexpr int tiles_for(int64_t m) { return m <= 8 ? 1 : 2; }

// d += a (16x32 row major, e4m3) * b (32x8 col major, e4m3), fp32 accumulate (sm_89+).
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  __trap();  // never launched below sm_90 (the op needs a Hopper GPU)
#else
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Each chunk's mmas accumulate into fresh registers (two sets: the two mmas of a step, two
// dependency chains), which are then added to the fp32 totals. Summing chunk by chunk is not needed
// for accuracy here (see "Tensor cores"), but at kTiles = 1 ptxas fits this form in 128 registers
// with no spill, where dense_gemv's form (two running sets) spilled 12 bytes (nvcc 13.0, sm_90a).
template <int kTiles, bool kPartial>
__device__ __forceinline__ void chunk_mma(float (&total)[kTiles][4], const uint8_t* b_lo, const uint8_t* b_hi,
                                          const uint8_t* const (&a_rows)[kTiles], unsigned has_a, int64_t k0,
                                          int64_t k_left) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 bl[kStepsPerChunk], bh[kStepsPerChunk], av[kStepsPerChunk][kTiles];
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
    const bool in_row = !kPartial || s * kStepK < k_left;
    const int64_t k = k0 + s * kStepK;
    bl[s] = in_row ? load_stream(b_lo + k) : zero;
    bh[s] = in_row ? load_stream(b_hi + k) : zero;
  }
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
    const bool in_row = !kPartial || s * kStepK < k_left;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      // Unconditional load, then a select (gemv.cuh: a conditional load became a branch).
      const uint4 v = kPartial && !in_row ? zero : load_shared_input(a_rows[t] + k0 + s * kStepK);
      av[s][t] = (has_a >> t) & 1u ? v : zero;
    }
  }
  float acc[2][kTiles][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[a][t][j] = 0.f;
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      mma_e4m3(acc[0][t], bl[s].x, bh[s].x, bl[s].y, bh[s].y, av[s][t].x, av[s][t].y);
      mma_e4m3(acc[1][t], bl[s].z, bh[s].z, bl[s].w, bh[s].w, av[s][t].z, av[s][t].w);
    }
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int j = 0; j < 4; ++j) total[t][j] += acc[0][t][j] + acc[1][t][j];
}

template <typename OutT, int kTiles>
__global__ void __launch_bounds__(kThreads, 2) fp8_gemv_kernel(Fp8GemmParams p) {
  __shared__ float4 partial[kWarps][kTiles][kWarpSize];  // each warp's 16 x 8 tiles, D-fragment order
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int row0 = blockIdx.x * kTileN;
  const uint8_t* b = static_cast<const uint8_t*>(p.b);
  const uint8_t* b_lo = b + static_cast<int64_t>(min(row0 + g, p.N - 1)) * p.K + kVecElems * c;
  const uint8_t* b_hi = b + static_cast<int64_t>(min(row0 + g + 8, p.N - 1)) * p.K + kVecElems * c;
  const uint8_t* a_rows[kTiles];
  unsigned has_a = 0;  // bit t: B column g of tile t = a row 8 t + g exists (zero beyond M)
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int row = 8 * t + g;
    has_a |= (row < p.M ? 1u : 0u) << t;
    a_rows[t] = static_cast<const uint8_t*>(p.a) + static_cast<int64_t>(row < p.M ? row : 0) * p.K + kVecElems * c;
  }

  // PDL (common.cuh): ask L2 for the warp's first weights, then wait for the kernel that wrote a.
  const int64_t num_full = p.K / kChunkK;
  if (warp < num_full) {
#pragma unroll
    for (int s = 0; s < kStepsPerChunk; ++s) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(b_lo + warp * kChunkK + s * kStepK));
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(b_hi + warp * kChunkK + s * kStepK));
    }
  }
  pdl_wait();

  float total[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int j = 0; j < 4; ++j) total[t][j] = 0.f;
  int64_t chunk = warp;
  for (; chunk < num_full; chunk += kWarps) {
    chunk_mma<kTiles, false>(total, b_lo, b_hi, a_rows, has_a, chunk * kChunkK, 0);
  }
  if (chunk == num_full && p.K % kChunkK != 0) {  // the partial last chunk falls to this warp
    const int64_t k0 = chunk * kChunkK;
    chunk_mma<kTiles, true>(total, b_lo, b_hi, a_rows, has_a, k0, p.K - k0 - kVecElems * c);
  }
  pdl_launch_dependents();  // after the K loop, as gemv.cuh (every CTA of the grid is scheduled)
#pragma unroll
  for (int t = 0; t < kTiles; ++t) partial[warp][t][lane] = make_float4(total[t][0], total[t][1], total[t][2], total[t][3]);
  __syncthreads();

  // Value i of a warp's tiles: tile t = i / 128, fragment value j = i % 4 of lane (i % 128) / 4, i.e.
  // D row g (+ 8 for j >= 2) = output column n, D column 2 c + j % 2 of tile t = token m.
  const float* flat = reinterpret_cast<const float*>(&partial[0][0][0]);
  constexpr int kValuesPerWarp = kTiles * kWarpSize * 4;
  const OutT* bias = static_cast<const OutT*>(p.bias);
  for (int i = threadIdx.x; i < kValuesPerWarp; i += kThreads) {
    const int src = (i % (kWarpSize * 4)) / 4, j = i % 4, t = i / (kWarpSize * 4);
    const int m = 8 * t + 2 * (src % 4) + (j % 2);
    const int n = row0 + src / 4 + (j >= 2 ? 8 : 0);
    if (m >= p.M || n >= p.N) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += flat[w * kValuesPerWarp + i];  // fixed order
    float v = sum * p.scale_a[p.scale_a_per_token ? m : 0] * p.scale_b[p.scale_b_per_channel ? n : 0];
    if (bias != nullptr) v += to_float(bias[n]);
    static_cast<OutT*>(p.out)[m * p.out_stride + n] = from_float<OutT>(v);
  }
}

template <typename OutT>
cudaError_t run(const Fp8GemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kTileN)));
  const auto kernel = tiles_for(p.M) == 1 ? fp8_gemv_kernel<OutT, 1> : fp8_gemv_kernel<OutT, 2>;
  FI_CUDA_TRY(launch_kernel(kernel, grid, dim3(kThreads), 0, stream, p));
  fp8_record_launch(Fp8LaunchInfo{Fp8LaunchInfo::kGemv, kTileN, 8 * tiles_for(p.M), true, 1,
                                  static_cast<int>(grid.x), 1, false, static_cast<int>(grid.x), false});
  return cudaSuccess;
}

}  // namespace fp8gemv
}  // namespace fastinfer
