// Params and launchers of the FP8 kernels: activation quantization (every architecture) and the
// scaled FP8 GEMM (sm_90a: wgmma + TMA). Host-compiler safe. The format is fastinfer/fp8.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastinfer/fp8.h"
#include "fastinfer/types.h"

namespace fastinfer {

// out[r, c] = e4m3(clamp(input[r, c] / scale)), scale per row (per token) or one for the tensor.
struct Fp8QuantParams {
  void* out;           // e4m3 [rows, cols], rows out_stride apart
  float* scale;        // fp32 [rows] (per token) or [1] (per tensor)
  const void* input;   // [rows, cols] in dtype, rows input_stride apart, last dim contiguous
  int64_t rows;
  int cols;
  int64_t out_stride, input_stride;  // elements
  DType dtype;                       // of input
};
// Dynamic per-token scales, written to p.scale[r]: one kernel, one CTA per row.
cudaError_t launch_fp8_quantize_per_token(const Fp8QuantParams& p, cudaStream_t stream);
// dynamic: p.scale[0] <- max(amax(input) / 448, floor) first (amax kernel + quantize kernel);
// else p.scale[0] is read. Never synchronizes.
cudaError_t launch_fp8_quantize_per_tensor(const Fp8QuantParams& p, bool dynamic, cudaStream_t stream);

// out[m, n] = (sum_k a[m, k] b[n, k]) * scale_a[m] * scale_b[n] + bias[n], fp32 accumulation.
struct Fp8GemmParams {
  void* out;              // [M, N] in out_dtype, rows out_stride apart
  const void* a;          // e4m3 [M, K], contiguous, 16-byte aligned (TMA)
  const void* b;          // e4m3 [N, K], contiguous, 16-byte aligned (the weight, as F.linear takes it)
  const float* scale_a;   // [M] when scale_a_per_token, else [1]
  const float* scale_b;   // [N] when scale_b_per_channel, else [1]
  const void* bias;       // [N] in out_dtype, or nullptr
  int64_t M;
  int N, K;               // K a multiple of 16 (TMA row strides are multiples of 16 bytes)
  int64_t out_stride;
  bool scale_a_per_token, scale_b_per_channel;
  DType out_dtype;        // kBFloat16 or kFloat16
  int num_sms;            // of the device: sizes the persistent grid and the split-K factor
  // M > 64: 128 x 256 output tiles instead of 128 x 128 (the default; zero-initialised false); both
  // promote wgmma's partial sums into fp32 every 128 of K.
  bool wide_tiles;
  // Split K over a thread-block cluster when output tiles alone cannot fill the SMs: kSplitKAuto
  // (zero-initialised) only where that measured faster (M <= 16 and K >= 8192), kSplitKOff never,
  // kSplitKOn wherever the tiles leave SMs idle. A split launch reduces through distributed shared
  // memory; one that does not split streams its weights from fewer SMs. bench/bench_fp8.py runs both.
  int split_k;
  // M <= kFp8GemvMaxM: the mma.sync GEMV kernel (gemm/fp8_gemv.cuh: N / 16 CTAs streaming the weight)
  // instead of the wgmma one. Off by default until measured (FASTINFER_FP8_GEMV=on).
  bool gemv;
  // 128-column tiles (and the swapped small-M ones): issue k-tile t's wgmma into a second accumulator
  // set before waiting for t - 1's and promoting it (wgmma.wait_group 1), so a warpgroup keeps the
  // tensor cores fed across k-tiles; false (zero-initialised): wait for each k-tile, then promote.
  // Off by default until measured (FASTINFER_FP8_PROMOTE=overlap).
  bool overlap_promotion;
  // M > 64 without a split and with an even number of 128-row tiles: 2-CTA clusters on vertically
  // adjacent tiles, each CTA loading half of their shared weight tile by TMA multicast into both
  // (fp8_sm90.cuh: the same shared-memory image, so the same bits). Off by default until measured
  // (FASTINFER_FP8_MULTICAST=on).
  bool multicast;
  // The serial promotion loop with the two consumer warpgroups' wgmma issues in a fixed alternation
  // (named barriers): consumer 0's k-tile (half), then consumer 1's, then consumer 0's next. Without it
  // both wait on the same `full` barrier and issue together, so their wgmmas may finish together and
  // both promote while the tensor cores idle. Same sums, same bits. Off by default until measured
  // (FASTINFER_FP8_PROMOTE=pingpong; takes precedence over the overlapped loop).
  bool pingpong;
};

// What the last fp8_scaled_mm launch ran (fastinfer._C.fp8_last_launch()); kernel kNone before the first.
struct Fp8LaunchInfo {
  enum Kernel : int { kNone = 0, kWgmma = 1, kGemv = 2 };
  int kernel;
  int block_p, block_q;  // output tile: P rows (of a, or of b when swapped) x Q
  bool swapped;          // M <= 64: the weights on wgmma's M side
  int splits;            // CTAs per tile (split K)
  int grid;              // CTAs launched
  int cluster;           // CTAs per cluster (1: none)
  bool multicast;
  int units;             // work units (tiles x splits)
  bool pingpong;         // the consumers' alternated issue order (Fp8GemmParams::pingpong)
};
Fp8LaunchInfo fp8_last_launch();
void fp8_record_launch(const Fp8LaunchInfo& info);  // by the launchers (sm_90a unit)
constexpr int kSplitKAuto = 0, kSplitKOff = 1, kSplitKOn = 2;  // Fp8GemmParams::split_k
constexpr int kFp8GemvMaxM = 16;
// sm_90a only (built when FASTINFER_HAS_SM90). cudaErrorInvalidValue for unsupported parameters.
// One kernel launch, no workspace (split K reduces inside a thread-block cluster).
cudaError_t launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t stream);

}  // namespace fastinfer
