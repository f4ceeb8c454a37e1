// Paged prefill attention: causal, GQA, ragged batch, K/V read through block tables.
//
// Computes, for every query row r of sequence b and head h (spec: csrc/cpu/attention.cpp),
//   out[r, h] = softmax(scale * q[r, h] . K[0 ..= pos(r)]^T) @ V[0 ..= pos(r)],
//   pos(r) = seq_lens[b] - q_len(b) + (r - cu_seqlens_q[b]),  K/V of kv head h / (H / H_kv).
//
// Layout: query / out [num_tokens, H, D] with the last dim contiguous (token and head strides are
// free, so a view into a fused qkv tensor works); kv_cache [num_blocks, 2, block_size, H_kv, D]
// contiguous; key k of sequence b lives in block block_tables[b, k / block_size], slot
// k % block_size. Offsets into query, out and the cache are 64-bit.
//
// bf16 / fp16: FlashAttention-2 on mma.sync.m16n8k16 (fp32 accumulate).
//   CTA = 64 query rows of one (sequence, head), 4 warps; warp w owns rows 16w .. 16w + 15 and
//   keeps its Q fragments, its 16 x D output accumulator and its softmax state in registers, so the
//   warps never exchange data. Or (kMB = 2, PrefillParams.block_m) CTA = 128 query rows, warp w owning
//   rows 32w .. 32w + 31 as two row blocks: every K / V fragment read from shared memory feeds two
//   mma instead of one (shared-memory traffic per mma 192 instead of 256 bytes in S = Q K^T, 128
//   instead of 256 in P V), Q fragments are read from shared memory at each head-dim step, and at
//   head_dim 128 the K/V tiles hold 32 keys (the two blocks' outputs take 128 registers). The
//   launcher takes 128 rows when the sequences average >= 128 query rows. head_dim 256 (Gemma 3, bf16 /
//   fp16 over a 16-bit cache): 64 rows only, 32-key tiles, Q fragments read from shared memory (the
//   warp's 16 x 256 outputs take 128 registers), (64 + 2 * 32) * 256 * 2 = 64 KiB of shared memory.
//   grid = (query tiles of the whole ragged batch, H). The host cannot
//   know the tiles per sequence without a sync, so grid.x is the bound (M = 64 or 128 rows)
//   sum_b ceil(q_len_b / M) <= (num_tokens + (M - 1) * batch) / M, and each CTA finds its (sequence,
//   tile) with a warp-wide prefix sum over cu_seqlens_q (32 sequences per step); CTAs past the
//   last tile exit. Within a sequence the last (longest-context) tiles are scheduled first.
//   K/V tiles of N = 64 keys (32 for 128 rows at D = 128) go global -> shared with 16-byte cp.async,
//   row by row through the block table (a tile spans N / block_size blocks, or part of one); keys
//   past the tile's causal end are zero-filled in shared memory instead of read, so NaN in unused
//   cache slots never meets a 0 probability (0 * NaN = NaN). Pipeline (FA2): V_n is fetched
//   while S = Q K_n^T runs, K_{n+1} while softmax and O += P V_n run; one buffer each for Q, K, V:
//   (M + 2 N) * D * 2 bytes of dynamic shared memory: 24 / 48 KiB at 64 rows (D = 64 / 128), 32 / 48
//   KiB at 128 rows.
//   Shared rows are D * 2 bytes (a multiple of 128); 16-byte chunk c of row r is stored at chunk
//   c ^ (r % 8), so the 8 row addresses of every ldmatrix phase (8 consecutive rows, same chunk)
//   hit 8 different bank groups: conflict-free, no padding. Q and K feed ldmatrix (K needs no
//   transpose: B of Q K^T is K row-major), V feeds ldmatrix.trans; P goes from the S accumulators
//   straight into A fragments (the m16n8 C layout of two key blocks is the m16k16 A layout).
//   Causal masking runs only on tiles that reach past the warp's first query position; tiles past
//   its last query position are never loaded. A sliding window (p.window > 0) masks the keys of a
//   tile below some row's window the same way, and the tiles below the first row's are never loaded.
// FP8 KV cache (p.kv_scale != nullptr, query / out bf16 or fp16): the cache holds float8_e4m3fn,
//   K = k_scale * k8 and V = v_scale * v8 (kv_scale = [k_scale, v_scale] read on the device). The
//   same mma kernel, with one more shared buffer of N x D bytes that K/V tiles are copied into
//   (16-byte cp.async of 16 e4m3 values); each thread converts exactly the chunks it copied (so no
//   barrier sits between its cp.async wait and the conversion) e4m3x2 -> f16x2 (-> bf16x2), which is
//   exact in both, into the swizzled 16-bit K / V tiles that ldmatrix reads as before. The scales
//   are applied in fp32 where they cost nothing: k_scale joins the softmax scale, v_scale the final
//   1 / sum (as in csrc/cpu/attention.cpp). Shared memory: 28 / 56 KiB at 64 rows (D = 64 / 128),
//   36 / 52 KiB at 128 rows.
// fp32: a plain CUDA-core kernel (one warp per query row and head, one key at a time, online
//   softmax), for fp32 end-to-end checks; not tuned.
//
// Roofline, B4 H32 S4096 D128 causal bf16: FLOPs = 4 * B * H * S^2 * D / 2 = 5.50e11. At the H200's
// ~990 TFLOP/s dense bf16 peak that is 0.56 ms; mma.sync (not wgmma) tops out well below that
// peak on Hopper, and torch's FA2 (SDPA flash) reaches 317 TFLOP/s here (GPU.md), i.e. ~1.7 ms.
// Bytes: Q + O + K + V = 4 * 4 * 4096 * 32 * 128 * 2 = 0.54 GB (K/V re-reads hit L2) = 0.13 ms at
// 4.28 TB/s, so the kernel is compute bound (~1000 FLOP/byte).
#pragma once
#include <cuda_fp8.h>

#include <climits>

#include "fastinfer/attention/prefill.h"
#include "fastinfer/attention/prefill_tiles.cuh"
#include "fastinfer/attention/prefill_softmax.cuh"
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace prefill {

// Query rows per CTA: 64 (kMB = 1: a warp owns one m16 row block, its Q fragments in registers) or
// 128 (kMB = 2: a warp owns two row blocks, rows 32w .. 32w + 31, and every K / V fragment it reads
// from shared memory feeds two mma instead of one; Q fragments are read from shared memory at each
// head-dim step, as FlashAttention-2 does for head_dim 128).
template <int kMB>
constexpr int block_m() { return 64 * kMB; }
// Keys per K / V tile: 64, or 32 for 128-row tiles at head_dim 128 (as FlashAttention-2 picks for
// that shape), which keeps the two row blocks' scores and outputs (32 + 128 registers) from spilling,
// and 32 at head_dim 256 (64-row tiles only: a warp's 16 rows x 256 outputs are 128 registers).
template <int kHeadDim, int kMB>
constexpr int block_n() { return (kMB == 2 && kHeadDim == 128) || kHeadDim == 256 ? 32 : kBlockN; }
// Whether a warp keeps its Q fragments in registers (64-row tiles up to head_dim 128) or reads them from
// shared memory at each head-dim step (128-row tiles, and head_dim 256, whose 64 fragment registers the
// outputs need).
template <int kHeadDim, int kMB>
constexpr bool q_in_registers() { return kMB == 1 && kHeadDim <= 128; }

// Q, K, V tiles of T; for an e4m3 cache (C of 1 byte) also the staging tile the copies land in.
template <typename T, typename C, int kHeadDim, int kMB>
constexpr size_t smem_bytes() {
  constexpr int kKeys = block_n<kHeadDim, kMB>();
  return static_cast<size_t>(block_m<kMB>() + 2 * kKeys) * kHeadDim * sizeof(T) +
         (sizeof(C) == 1 ? static_cast<size_t>(kKeys) * kHeadDim : 0);
}

// The query rows [row0, row0 + num_rows) of head h into sQ; missing rows of the tile are zeroed.
template <typename T, int kHeadDim, int kBlockM>
__device__ __forceinline__ void load_query_tile(T* sQ, const PrefillParams& p, int64_t row0, int num_rows,
                                                int head) {
  constexpr int kChunks = kHeadDim / kChunk;
  const T* query = static_cast<const T*>(p.query) + head * p.query_head_stride;
#pragma unroll
  for (int it = 0; it < kBlockM * kChunks / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int r = i / kChunks, c = i % kChunks;
    T* dst = sQ + swizzle<kHeadDim>(r, c);
    if (r < num_rows) {
      cp_async_16(dst, query + (row0 + r) * p.query_token_stride + c * kChunk);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// ---- bf16 / fp16 tensor-core kernel ------------------------------------------------------------

// T: the query / out dtype; C: the cache element (T, or __nv_fp8_e4m3 with p.kv_scale); kMB: m16
// row blocks per warp (64 or 128 query rows per CTA, see block_m).
// Min. 1 CTA per SM in the launch bounds: without it ptxas held the head_dim 64 kernel to 128
// registers and spilled 8 bytes. With it (sm_90a, nvcc 13.0): 172-180 registers at 64 rows and
// D = 64 (3 CTAs of 128 threads per SM), 243-254 at D = 128 or 128 rows (2 CTAs per SM), 244 at
// D = 256 (64 rows, Q from shared memory), no spills.
template <typename T, typename C, int kHeadDim, int kMB>
__global__ void __launch_bounds__(kThreads, 1) paged_prefill_mma_kernel(const PrefillParams p) {
  constexpr int kBlockM = block_m<kMB>();
  constexpr int kKeys = block_n<kHeadDim, kMB>();  // keys per K / V tile
  constexpr int kNB = kKeys / 8;                    // n8 key blocks of S
  constexpr int kWarpRows = 16 * kMB;
  constexpr int kDimBlocks = kHeadDim / 8;
  constexpr bool kFp8 = sizeof(C) == 1;
  extern __shared__ uint4 smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kHeadDim;
  T* sV = sK + kKeys * kHeadDim;
  uint8_t* stage = reinterpret_cast<uint8_t*>(sV + kKeys * kHeadDim);  // FP8 only: e4m3 K or V tile

  QueryTile qt;
  if (!locate_query_tile<kBlockM>(p, blockIdx.x, qt)) return;  // uniform over the CTA
  const int head = blockIdx.y;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int64_t row0 = qt.row0;                          // the tile's first query row in the batch
  const int num_rows = qt.num_rows, first_pos = qt.first_pos, key_end = qt.key_end;
  const int num_kv_tiles = ceil_div(key_end, kKeys);
  // Sliding window: no row sees a key below first_pos - window + 1, so the tiles before its tile are skipped
  // (window 2^30: none, and no key is ever below a row's window).
  const int window = p.window > 0 ? p.window : (1 << 30);
  const int kv_tile0 = max(0, first_pos - window + 1) / kKeys;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int block_shift = __ffs(p.block_size) - 1;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const C* cache_head = static_cast<const C*>(p.kv_cache) + static_cast<int64_t>(kv_head) * kHeadDim;
  const int32_t* block_table = p.block_tables + qt.seq * p.block_table_stride;
  const bool by_shuffle = tables_by_shuffle(block_shift, p.table_per_copy, token_stride);
  const float scale_log2 = p.scale * kLog2e * (kFp8 ? p.kv_scale[0] : 1.0f);  // k_scale folded in
  // Gemma 2's soft-capping: s = scale q.k -> cap tanh(s / cap), in log2 units cap_log2 tanh(raw * to_capped)
  const float cap_log2 = p.softcap * kLog2e;
  const float to_capped = p.softcap > 0.0f ? scale_log2 / cap_log2 : 0.0f;
  // K (kv = 0) or V (kv = 1) tile starting at key0 into `tile`: directly, or for an e4m3 cache into
  // the staging tile, which finish_tile (after this thread's cp.async wait) converts into `tile`.
  auto start_tile = [&](T* tile, int kv, int key0) {
    const int entry = lane_table_entry<kKeys>(block_table, by_shuffle, block_shift, key0, key_end);
    if constexpr (kFp8) {
      load_kv_tile_fp8<kHeadDim, kKeys>(stage, reinterpret_cast<const uint8_t*>(cache_head), block_table, by_shuffle,
                                        entry, block_shift, token_stride, kv, key0, key_end);
    } else {
      load_kv_tile<T, kHeadDim, kKeys>(tile, cache_head, block_table, by_shuffle, entry, block_shift, token_stride, kv,
                                       key0, key_end);
    }
  };
  auto finish_tile = [&](T* tile) {
    if constexpr (kFp8) convert_kv_tile_fp8<T, kHeadDim, kKeys>(tile, stage);
  };

  load_query_tile<T, kHeadDim, kBlockM>(sQ, p, row0, num_rows, head);
  start_tile(sK, 0, kv_tile0 * kKeys);
  cp_async_commit();
  cp_async_wait_all();
  finish_tile(sK);
  __syncthreads();

  const int q_row0 = warp * kWarpRows;  // this warp's first row in the tile
  // q_in_registers: the warp's 16 query rows as A fragments, one per 16-wide head-dim step (see ldmatrix_x4:
  // matrices (rows +0..7, d +0..7), (rows +8..15, d +0..7), (rows +0..7, d +8..15), (+8..15, +8..15)).
  constexpr bool kQRegs = q_in_registers<kHeadDim, kMB>();
  uint32_t q_frag[kQRegs ? kHeadDim / 16 : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      ldmatrix_x4(q_frag[kk], sQ + swizzle<kHeadDim>(q_row0 + lane % 16, kk * 2 + lane / 16));
    }
  }

  float o[kMB][kDimBlocks][4];
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db) {
#pragma unroll
      for (int j = 0; j < 4; ++j) o[mb][db][j] = 0.0f;
    }
  }
  OnlineSoftmax<kNB, kDimBlocks> softmax[kMB];
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) softmax[mb].init();
  // Accumulator element j of a lane sits at row (lane / 4) + 8 (j / 2), column 2 (lane % 4) + j % 2
  // of its row block; row block mb of the warp starts at tile row q_row0 + 16 mb.
  const int row_pos = first_pos + q_row0 + lane / 4;  // position of this lane's first row

  for (int n = kv_tile0; n < num_kv_tiles; ++n) {
    const int key0 = n * kKeys;
    start_tile(sV, 1, key0);  // FP8: this thread's staging chunks were converted into sK already
    cp_async_commit();

    float s[kMB][kNB][4];
    if constexpr (kQRegs) {
      compute_scores<T, kHeadDim>(s[0], q_frag, sK, lane);
    } else {
      compute_scores_smem_q<T, kHeadDim, kMB, kNB>(s, sQ, q_row0, sK, lane);
    }
    const bool diagonal = key0 + kKeys - 1 > first_pos + q_row0;  // some key here is later than some row
    // some key here is below some row's sliding window (never without a window)
    const bool below_window = key0 <= first_pos + q_row0 + kWarpRows - 1 - window;
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[mb][nb][j] = cap_log2 > 0.0f ? cap_log2 * tanh_accurate(s[mb][nb][j] * to_capped) : s[mb][nb][j] * scale_log2;
        }
      }
    }
    if (diagonal || below_window) {  // uniform over the warp
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int key = key0 + nb * 8 + (lane % 4) * 2 + j % 2, pos = row_pos + mb * 16 + (j / 2) * 8;
            if (key > pos || key <= pos - window) s[mb][nb][j] = -INFINITY;
          }
        }
      }
    }

    cp_async_wait_all();
    finish_tile(sV);  // sV is free: every warp passed the previous iteration's last barrier
    __syncthreads();  // V_n landed; every warp is done reading sK
    if (n + 1 < num_kv_tiles) {
      start_tile(sK, 0, key0 + kKeys);
      cp_async_commit();
    }
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) softmax[mb].update(s[mb], o[mb]);
    if constexpr (kQRegs) {  // 64-key tiles
      accumulate_pv<T, kHeadDim>(o[0], s[0], sV, lane);
    } else {
      accumulate_pv_blocks<T, kHeadDim, kMB, kNB>(o, s, sV, lane);
    }
    cp_async_wait_all();
    if (n + 1 < num_kv_tiles) finish_tile(sK);  // sK is free since the barrier above
    __syncthreads();  // K_{n+1} landed; every warp is done reading sV
  }

  // Normalise, stage this warp's rows in its own rows of sQ (Q from shared memory: every warp read all of
  // its own rows, and only those, for the last time before the loop's last barrier), then write 16-byte
  // chunks of the rows that exist.
  const float v_scale = kFp8 ? p.kv_scale[1] : 1.0f;
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
    float inv_sum[2];
    softmax[mb].inverse_sums(inv_sum);
    if (p.lse != nullptr) {
      softmax[mb].store_log_sum_exp(p.lse + row0 * p.num_heads + head, p.num_heads, q_row0 + mb * 16 + lane / 4,
                                    num_rows, lane);
    }
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = q_row0 + mb * 16 + lane / 4 + i * 8;
        *reinterpret_cast<uint32_t*>(sQ + swizzle<kHeadDim>(row, db) + (lane % 4) * 2) =
            pack2<T>(o[mb][db][2 * i] * inv_sum[i] * v_scale, o[mb][db][2 * i + 1] * inv_sum[i] * v_scale);
      }
    }
  }
  __syncwarp();
  constexpr int kChunks = kHeadDim / kChunk;
  T* out = static_cast<T*>(p.out) + head * p.out_head_stride;
#pragma unroll
  for (int it = 0; it < kWarpRows * kChunks / kWarpSize; ++it) {
    const int i = it * kWarpSize + lane;
    const int row = q_row0 + i / kChunks, c = i % kChunks;
    if (row < num_rows) {
      *reinterpret_cast<uint4*>(out + (row0 + row) * p.out_token_stride + c * kChunk) =
          *reinterpret_cast<const uint4*>(sQ + swizzle<kHeadDim>(row, c));
    }
  }
}

// ---- fp32 CUDA-core kernel ---------------------------------------------------------------------

// Sequence owning query row `token`: the last b with cu_seqlens_q[b] <= token (skips empty ones).
__device__ __forceinline__ int sequence_of(const int32_t* cu_seqlens_q, int batch, int64_t token) {
  int lo = 0, hi = batch;  // cu[lo] <= token < cu[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu_seqlens_q[mid] <= token) lo = mid;
    else hi = mid;
  }
  return lo;
}

// One warp per (query row, head); lane l holds head-dim elements l, l + 32, ...
template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) paged_prefill_fp32_kernel(const PrefillParams p) {
  constexpr int kPerLane = kHeadDim / kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (token >= p.num_tokens) return;  // whole warps; the kernel has no block-wide barrier
  const int lane = threadIdx.x % kWarpSize, head = blockIdx.y;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int seq = sequence_of(p.cu_seqlens_q, p.batch, token);
  const int q_begin = p.cu_seqlens_q[seq], q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int num_keys = p.seq_lens[seq] - q_len + static_cast<int>(token - q_begin) + 1;
  const int first_key = p.window > 0 ? max(0, num_keys - p.window) : 0;  // sliding window
  const int block_shift = __ffs(p.block_size) - 1, block_mask = p.block_size - 1;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const int64_t block_stride = (token_stride << block_shift) * 2;
  const float* cache_head = static_cast<const float*>(p.kv_cache) + static_cast<int64_t>(kv_head) * kHeadDim;
  const int32_t* block_table = p.block_tables + seq * p.block_table_stride;

  const float* q = static_cast<const float*>(p.query) + token * p.query_token_stride + head * p.query_head_stride;
  const float scale_log2 = p.scale * kLog2e;
  float q_reg[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    q_reg[i] = q[lane + i * kWarpSize] * scale_log2;
    acc[i] = 0.0f;
  }
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int key = first_key; key < num_keys; ++key) {
    const float* k = cache_head + block_table[key >> block_shift] * block_stride + (key & block_mask) * token_stride;
    const float* v = k + (token_stride << block_shift);
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dot += q_reg[i] * k[lane + i * kWarpSize];
    dot = warp_reduce_sum(dot);
    if (p.softcap > 0.0f) dot = p.softcap * kLog2e * tanh_accurate(dot / (p.softcap * kLog2e));  // Gemma 2 (log2 units)
    const float new_max = fmaxf(row_max, dot);
    const float correction = exp2f(row_max - new_max), prob = exp2f(dot - new_max);
    row_max = new_max;
    row_sum = row_sum * correction + prob;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * correction + prob * v[lane + i * kWarpSize];
  }
  float* out = static_cast<float*>(p.out) + token * p.out_token_stride + head * p.out_head_stride;
  const float inv_sum = 1.0f / row_sum;  // the row's own key is always visible
  if (p.lse != nullptr && lane == 0) p.lse[token * p.num_heads + head] = (row_max + __log2f(row_sum)) * kLn2;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane + i * kWarpSize] = acc[i] * inv_sum;
}

// ---- launch ------------------------------------------------------------------------------------

template <typename T, typename C, int kHeadDim, int kMB>
cudaError_t launch_mma_tiles(const PrefillParams& p, cudaStream_t stream) {
  constexpr int kBlockM = block_m<kMB>();
  // Sum over sequences of ceil(q_len / kBlockM) <= (num_tokens + (kBlockM - 1) * batch) / kBlockM,
  // without reading cu_seqlens_q on the host.
  const int64_t max_tiles = (p.num_tokens + static_cast<int64_t>(kBlockM - 1) * p.batch) / kBlockM;
  if (max_tiles > INT_MAX) return cudaErrorInvalidValue;
  constexpr size_t kSmem = smem_bytes<T, C, kHeadDim, kMB>();
  auto kernel = paged_prefill_mma_kernel<T, C, kHeadDim, kMB>;
  FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  kernel<<<dim3(static_cast<unsigned>(max_tiles), p.num_heads), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// 128-row tiles when asked for, or (block_m = 0) when the sequences average >= 128 query rows (a
// prompt, not a decode-sized chunk or a speculative verify); 64-row tiles otherwise.
template <typename T, typename C, int kHeadDim>
cudaError_t launch_mma(const PrefillParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim == 256) {  // 64-row tiles only (two row blocks' outputs would be 256 registers)
    return launch_mma_tiles<T, C, kHeadDim, 1>(p, stream);
  } else {
    const bool rows128 = p.block_m == 128 || (p.block_m == 0 && p.num_tokens >= int64_t{128} * p.batch);
    return rows128 ? launch_mma_tiles<T, C, kHeadDim, 2>(p, stream) : launch_mma_tiles<T, C, kHeadDim, 1>(p, stream);
  }
}

template <int kHeadDim>
cudaError_t launch_fp32(const PrefillParams& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(p.num_tokens, kWarps);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  paged_prefill_fp32_kernel<kHeadDim><<<dim3(static_cast<unsigned>(blocks), p.num_heads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int kHeadDim>
cudaError_t launch_for_head_dim(const PrefillParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim == 256) {  // bf16 / fp16 query and cache only (few instantiations)
    if (p.kv_scale == nullptr && p.dtype == DType::kFloat16) return launch_mma<__half, __half, kHeadDim>(p, stream);
    if (p.kv_scale == nullptr && p.dtype == DType::kBFloat16) {
      return launch_mma<__nv_bfloat16, __nv_bfloat16, kHeadDim>(p, stream);
    }
    return cudaErrorInvalidValue;
  } else {
    if (p.kv_scale != nullptr) {  // an e4m3 cache: bf16 / fp16 queries only (few instantiations)
      switch (p.dtype) {
        case DType::kFloat16: return launch_mma<__half, __nv_fp8_e4m3, kHeadDim>(p, stream);
        case DType::kBFloat16: return launch_mma<__nv_bfloat16, __nv_fp8_e4m3, kHeadDim>(p, stream);
        case DType::kFloat32: break;
      }
      return cudaErrorInvalidValue;
    }
    switch (p.dtype) {
      case DType::kFloat32: return launch_fp32<kHeadDim>(p, stream);
      case DType::kFloat16: return launch_mma<__half, __half, kHeadDim>(p, stream);
      case DType::kBFloat16: return launch_mma<__nv_bfloat16, __nv_bfloat16, kHeadDim>(p, stream);
    }
    return cudaErrorInvalidValue;
  }
}

}  // namespace prefill

inline cudaError_t launch_paged_prefill_attention_impl(const PrefillParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  if (prefill::invalid_shape(p) || (p.block_m != 0 && p.block_m != 64 && p.block_m != 128)) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype != DType::kFloat32 && !prefill::rows_are_16_byte_aligned(p)) return cudaErrorMisalignedAddress;
  switch (p.head_dim) {
    case 64: return prefill::launch_for_head_dim<64>(p, stream);
    case 128: return prefill::launch_for_head_dim<128>(p, stream);
    case 256: return prefill::launch_for_head_dim<256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastinfer
