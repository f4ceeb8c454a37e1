// Constants of the packed 4-bit weight layout drawn at the top of fastinfer/gemm/w4a16.h.
// Plain C++ (no CUDA headers): the CPU reference includes it too.
#pragma once

namespace fastinfer {

namespace int4_layout {
constexpr int kStripN = 64;      // columns per strip
constexpr int kStepK = 16;       // k rows per k-step (one mma.m16n8k16)
constexpr int kLanes = 32;
constexpr int kWordsPerLane = 4;  // 16 bytes: a lane's B fragments for one k16 x n64 tile
constexpr int kWordsPerStep = kLanes * kWordsPerLane;  // 128 words = 512 bytes per strip and k-step
constexpr int kMinK = 64;        // K granularity (one pipeline stage of the CUDA kernel)
constexpr int kSymmetricZero = 8;
}  // namespace int4_layout

// How a code q becomes a weight (s: scale, z: zero point, m: minimum; per column and group).
enum class Int4Mode : int {
  kSymmetric = 0,  // w = (q - 8) * s
  kZeros = 1,      // w = (q - z) * s
  kMins = 2,       // w = q * s + m
};

// Which CUDA kernel runs int4_linear: auto = the GEMV kernel (w4a16_small.cuh) with deferred scales
// (multiplying by the biased codes, the group parameters applied to the fp32 sums) for M <= 8 rows
// of x, the tile kernel (w4a16.cuh) above; tiles / small (the GEMV kernel dequantizing each weight) /
// small_deferred force one at every M; small_streamk: stream-K GEMV at M <= 8; wgmma: the sm_90a
// warpgroup-MMA kernel (w4a16_wgmma.cuh) at every M; auto_wgmma: auto's GEMV up to 8 rows, wgmma above
// (the candidate default the end-to-end benchmark times).
enum class Int4Kernel : int {
  kAuto = 0, kTiles = 1, kSmall = 2, kSmallDeferred = 3, kSmallStreamK = 4, kWgmma = 5, kAutoWgmma = 6
};

}  // namespace fastinfer
