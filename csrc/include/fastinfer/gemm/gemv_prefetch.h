// The L2 prefetch plan of a decode GEMV launch (gemm/gemv.cuh, "L2 prefetch across kernels"): which
// rows of the next GEMV's weight, how many bytes of each, and which CTAs of this grid ask L2 for them.
// Host-only arithmetic (fastinfer._C.plan_gemv_prefetch exposes it to the CPU tests); the launcher
// feeds it the occupancy API's count of resident CTAs.
#pragma once
#include <algorithm>
#include <cstdint>

namespace fastinfer {

struct GemvPrefetchPlan {
  const char* base = nullptr;  // nullptr: no prefetch
  int64_t row_bytes = 0;       // between rows of the next weight
  int rows = 0;                // per range
  int second = -1;             // first row of the second range (SwiGLU: the up rows); < 0: one range
  int bytes = 0;               // asked of L2 from the start of each row, a multiple of 16
  int first_cta = 0;           // CTAs blockIdx.x >= first_cta issue the prefetches: this grid's last wave
};

constexpr int kGemvTileRows = 16;  // rows of W per CTA of the GEMV (gemv.cuh kTileN)

// next_rows x row_bytes: the next GEMV's weight; budget: bytes in all; slots: CTAs resident at once
// (this kernel's, assumed the next one's too); tiles: CTAs of this launch.
//  - The next GEMV reads rows 16 b .. 16 b + 15 in CTA b (SwiGLU: gate rows 8 b .. 8 b + 7 and up rows
//    F + 8 b ..; rotary: a permutation of the rows within each head, so its first w CTAs read rows
//    [0, 16 w) when w is a multiple of head_dim / 16, as at 264 slots and head_dim 64 / 128; otherwise
//    the last head's rows are guessed, still inside the weight). Its first wave of w = min(CTAs, slots)
//    CTAs reads rows [0, 16 w) (SwiGLU: [0, 8 w) and [F, F + 8 w)) first, each row front to back, 2048
//    bytes a row in its first round (8 warps x 128 16-bit columns).
//  - Each row gets budget / rows bytes rounded to the nearest multiple of 256 (to 16 below 256), at most
//    the row and 512 KiB (the instruction's size field); none under 16 bytes.
//  - The issuing CTAs are this grid's last wave, the CTAs after the last whole multiple of slots (all
//    of them when the grid fits at once): earlier waves would have the lines evicted by the waves after them.
inline GemvPrefetchPlan plan_gemv_prefetch(const void* next, int64_t next_rows, int64_t row_bytes, int64_t budget,
                                           bool swiglu, int64_t slots, int64_t tiles) {
  GemvPrefetchPlan pf{};
  if (next == nullptr || budget <= 0 || next_rows <= 0 || row_bytes < 16 || slots <= 0 || tiles <= 0) return pf;
  const int64_t next_wave = std::min<int64_t>((next_rows + kGemvTileRows - 1) / kGemvTileRows, slots);
  const int64_t half = next_rows / 2;
  const int64_t rows = swiglu ? std::min<int64_t>(half, next_wave * (kGemvTileRows / 2))
                              : std::min<int64_t>(next_rows, next_wave * kGemvTileRows);
  if (rows <= 0) return pf;
  const int64_t per_row = budget / (swiglu ? 2 * rows : rows);
  int64_t bytes = per_row >= 256 - 128 ? (per_row + 128) / 256 * 256 : per_row / 16 * 16;
  bytes = std::min({bytes, row_bytes / 16 * 16, int64_t{1} << 19});
  if (bytes < 16) return pf;
  const int64_t last_wave = tiles % slots == 0 ? std::min(tiles, slots) : tiles % slots;
  pf.base = static_cast<const char*>(next);
  pf.row_bytes = row_bytes;
  pf.rows = static_cast<int>(rows);
  pf.second = swiglu ? static_cast<int>(half) : -1;
  pf.bytes = static_cast<int>(bytes);
  pf.first_cta = static_cast<int>(tiles - last_wave);
  return pf;
}

}  // namespace fastinfer
