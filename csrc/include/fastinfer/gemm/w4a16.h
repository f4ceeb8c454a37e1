// W4A16: out[M, N] = x[M, K] @ W[N, K]^T with W stored as 4-bit codes and group-wise parameters.
// Host-compiler safe: the torch binding and the CPU reference include this; the kernel lives in
// gemm/w4a16.cuh. python/fastinfer/quant/int4.py (pack / unpack) is the source of truth for the
// layout drawn here; the two are tested against each other.
//
// ---- Dequantization (per output column n and group g = k / group_size) --------------------------
//     symmetric   w = (q - 8) * s          (GPTQ sym, GGUF Q4_0)            zeros, mins = nullptr
//     zeros       w = (q - z) * s          (AWQ / GPTQ asym; z integer 0..15, stored as a float)
//     mins        w = q * s + m            (GGUF Q4_1)
// s, z, m have the activations' dtype. The CPU reference evaluates w in fp32; the CUDA tile kernel
// and the plain GEMV kernel in the activation dtype ((q - z) exact, then one rounding of the
// product, or one fused q * s + m), which is the rounding a bf16 / fp16 model applies to its
// dequantized weights anyway; the GEMV kernel with deferred scales (auto at M <= 8) never rounds w:
// it applies s, z, m to fp32 sums of x times the codes (w4a16_small.cuh).
//
// ---- Packed layout (requires N % 64 == 0, K % 64 == 0, K % group_size == 0) --------------------
// The kernel computes with mma.sync.m16n8k16 where W^T [K, N] is the B operand. A B fragment for
// one n8 tile gives lane L = 4 g + c (g = L / 4, c = L % 4) column n = g and rows
// k = {2c, 2c+1} (register b0) and {2c+8, 2c+9} (register b1). 32 such values for one lane are
// 16 bytes, so the weights are shuffled offline into the order in which lanes consume them: one
// 16-byte load per lane feeds a warp a whole k16 x n64 tile (8 n8 tiles), with no shuffles and no
// shared-memory bank conflicts.
//
//   qweight  uint32 [N / 64][K / 16][32 lanes][4 words]   (a torch int32 [N / 64, 8 K])
//
//     strip s (64 columns) -- contiguous K * 32 bytes: a block streams its strips linearly
//     +-- k-step t (16 rows of k) -- 512 bytes: one tile of a warp
//         +-- lane L (g, c) -- 16 bytes: 4 words
//             +-- word i (0..3) covers n8 tiles j = 2i and 2i + 1
//                 nibble p = 4 hi + 2 h + r   (bits 4p .. 4p+3)
//                     n = 64 s + 8 (2 i + h) + g
//                     k = 16 t + 8 r + 2 c + hi
//
//     word i: | p7  | p6  | p5  | p4  | p3  | p2  | p1  | p0  |
//             | j+1 | j+1 | j   | j   | j+1 | j+1 | j   | j   |   (j = 2i; h picks the tile)
//             | b1  | b0  | b1  | b0  | b1  | b0  | b1  | b0  |   (r picks the register)
//             | odd k (hi = 1), bits 16..31 | even k (hi = 0), bits 0..15 |
//
//   Nibbles p and p + 4 are the low and high halves of one 32-bit B register: (w >> 4p) & 0x000f000f
//   puts both into the mantissas of a half2 / bf162 at once (the "magic number" trick: OR in the
//   exponent of 1024.0 (fp16) or 128.0 (bf16), subtract it back), so 8 weights cost 4 shift+LOP3s.
//
//   scales, zeros, mins  [K / group_size][N] in the activation dtype. Row = group. Inside every
//   64-column block the 8 x 8 transpose: position 8 g + j holds column 8 j + g, so the 8 scales
//   lane L needs for its 8 n8 tiles (columns 8 j + g, j = 0..7) are one 16-byte load.
//
// Fusing matrices (q/k/v, gate/up) = concatenating qweight along dim 0 and the scales along dim 1.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/gemm/int4_layout.h"
#include "fastinfer/types.h"

namespace fastinfer {

struct W4A16Params {
  void* out;                  // [M, N], rows out_stride elements apart
  const void* x;              // [M, K], rows x_stride elements apart (x_stride % 8 == 0, 16-byte aligned)
  const uint32_t* qweight;    // [N / 64, 8 K], contiguous
  const void* scales;         // [K / group_size, N], contiguous, permuted as above
  const void* offsets;        // zeros or mins like scales; nullptr for kSymmetric
  int64_t m;
  int n, k, group_size;       // group_size 32, 64 or 128
  int64_t x_stride, out_stride;
  Int4Mode mode;
  DType dtype;                // of out, x, scales, offsets: kFloat16 or kBFloat16
  int num_sms;                // SMs of the device: the split-K heuristic's only hardware input
  Int4Kernel kernel;          // which CUDA kernel (FASTINFER_INT4_KERNEL); kAuto by default
  int split_overhead_rounds;  // split-K cost model (gemm/split_plan.h): 1 from the binding
  bool waves_by_clusters;     // price waves by resident clusters (default) or CTA slots (FASTINFER_INT4_WAVES)
  // kSmallStreamK at M <= 8 (w4a16_small.cuh, stream-K): fp32 [capacity, 2, 8 * 64] pieces and unsigned
  // [capacity] counters, 0 before the first launch (each launch leaves them 0); one launch at a time.
  float* streamk_partials;
  unsigned* streamk_counters;
  int streamk_capacity;       // CTAs the workspace holds; the grid is at most this
};

// What the last launch ran (fastinfer._C.int4_last_launch()); kernel kNone before the first launch.
struct Int4LaunchInfo {
  enum Kernel : int { kNone = 0, kTiles = 1, kSmall = 2, kStreamK = 3, kWgmma = 4 };
  int kernel;
  int splits;                 // CTAs per output unit (one cluster; 1 for stream-K)
  int64_t ctas;               // grid size
  int64_t waves;              // ceil(units / resident clusters of that size) (or of CTA slots, FASTINFER_INT4_WAVES=slots)
  int64_t units;              // output units (tiles, or strips x row blocks) the split-K plan cut
  int items, items_per_round; // k work items per unit (stages or chunks) and per CTA round
  int64_t resident[9];        // [s]: clusters of s CTAs resident at once ([1]: CTA slots; 0 = unschedulable)
};
Int4LaunchInfo w4a16_last_launch();

// cudaErrorInvalidValue for shapes or dtypes the kernel does not support. Never synchronizes.
cudaError_t launch_w4a16_gemm(const W4A16Params& p, cudaStream_t stream);
// The warpgroup-MMA kernel (Int4Kernel::kWgmma; w4a16_wgmma.cuh, its own translation unit), shape
// checks already done by launch_w4a16_gemm.
cudaError_t launch_w4a16_wgmma(const W4A16Params& p, cudaStream_t stream);

}  // namespace fastinfer
