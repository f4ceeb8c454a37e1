// Paged decode attention on tensor cores (bf16 / fp16 queries; a 16-bit or an FP8 e4m3 cache).
//
// Same contract, grid, plan and split merge as the CUDA-core kernel of decode.cuh; what changes is
// the arithmetic. The query heads that share a KV head (up to 16 per CTA) are the 16 rows of one
// mma.m16n8k16 row block (rows past the group are zero and discarded), so the scores of a key and
// its share of P @ V cost one tensor-core instruction per 2048 multiply-adds instead of one fp32 FMA
// per (head, feature, key) on the CUDA cores. That matters when the group is large (8 heads per KV
// head: 8 FLOP per bf16 KV byte, near the CUDA cores' ridge) and for an FP8 cache, where the
// CUDA-core kernel converts each e4m3 value once per head it meets; here each value is converted
// once (e4m3x2 -> f16x2, exact) into a 16-bit tile, as in the prefill kernel.
//
// CTA = 4 warps on one (sequence, kv head, split). K/V tiles of 64 keys go global -> shared with
// 16-byte cp.async through the block table (prefill_tiles.cuh's tile loaders; the same swizzled 16-bit
// layout that ldmatrix reads without bank conflicts; keys past the split's end are zero-filled,
// never read, and their scores set to -inf). Warp w takes keys 16w .. 16w + 15 of every tile with
// its own online softmax (m, l) and 16 x D fp32 output in registers, so the warps never exchange
// data inside the loop (FlashDecoding within the CTA); at the end they are merged through shared
// memory, exactly as the splits are merged in merge.cuh. Pipeline: a ring of kStages K/V stages
// with kStages - 1 tiles in flight; one barrier per tile for a 16-bit cache. For an e4m3 cache the
// ring holds the raw bytes (half the size) and each thread converts the chunks it copied itself into
// one shared 16-bit K/V tile (so a raw stage is reused by the same thread that read it: no barrier
// for that), with a second barrier per tile before the converted tile is read.
//
// Cost per 64-key tile and warp (D = 128): 32 mma + 24 ldmatrix.x4 (8 of them re-reading Q's
// fragments, which are not held in registers) + the softmax of 16 x 16 scores,
// against 32 KB of bf16 K/V: ~0.01 warp instructions per byte, so the kernel streams at the memory
// system's rate whatever the group size. Shared memory (D = 128): 68.5 KiB (16-bit, 2 stages,
// 3 CTAs per SM), 100.5 KiB (e4m3, 4 raw stages, 2 CTAs per SM): 64 to 96 KiB in flight per SM.
// Registers (sm_90a, nvcc 13.0): 153 / 143 (16-bit / e4m3) at D = 128, ~105 at D = 64, no spills.
//
// Numerics as the prefill kernel: scores and softmax in fp32 (log2 domain), P rounded to the query
// dtype for P @ V, fp32 accumulation; k_scale joins the softmax scale, v_scale the final 1 / l.
#pragma once
#include <cuda_fp8.h>

#include "fastinfer/attention/decode.h"
#include "fastinfer/attention/decode_work.cuh"
#include "fastinfer/attention/prefill_softmax.cuh"
#include "fastinfer/attention/prefill_tiles.cuh"
#include "fastinfer/attention/state.cuh"
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace decode {
namespace mma {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileKeys = prefill::kBlockN;    // 64 keys per K/V tile
constexpr int kWarpKeys = kTileKeys / kWarps;  // 16: one k16 step of P @ V per warp and tile
constexpr int kRows = 16;                      // query heads per CTA: one m16 row block
constexpr int kMinSplitTiles = 2;              // splits of at least 128 keys
constexpr int kTargetCtasPerSm = 6;            // split until this many CTAs exist (decode.cuh's plan)
static_assert(prefill::kThreads == kThreads && prefill::kBlockN == kTileKeys,
              "prefill_tiles.cuh's tile loaders map a 64-key tile onto 128 threads");

template <typename C, int kHeadDim>
struct Geometry {
  static constexpr bool kFp8 = sizeof(C) == 1;
  static constexpr int kStages = kFp8 ? 4 : (kHeadDim == 64 ? 3 : 2);
  static constexpr int kTileElems = kTileKeys * kHeadDim;                             // one K or V tile
  static constexpr int kStageBytes = 2 * kTileElems * static_cast<int>(sizeof(C));    // K then V, as stored
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  static constexpr int kConvBytes = kFp8 ? 2 * kTileElems * 2 : 0;                   // converted K, V tile
  static constexpr int kStatsBytes = 2 * kWarps * kRows * static_cast<int>(sizeof(float));
  static constexpr int kScratchStride = kHeadDim + 8;  // floats per row of the final merge (bank offset)
  static constexpr int kScratchBytes = kWarps * kRows * kScratchStride * static_cast<int>(sizeof(float));
  static constexpr size_t kSmemBytes = static_cast<size_t>(kQBytes) + kConvBytes + kRingBytes + kStatsBytes;
  static_assert(kScratchBytes <= kRingBytes, "the final merge reuses the idle ring");
};

// grid: (num_splits, num_kv_heads * num_head_chunks, batch); block: kThreads.
// T: the query / out dtype (bf16, fp16); C: the cache element (T, or __nv_fp8_e4m3 with p.kv_scale).
template <typename T, typename C, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 3)
    paged_decode_mma_kernel(const DecodeParams p, const DecodePlan plan, float* __restrict__ partial_o,
                            float* __restrict__ partial_lse) {
  using G = Geometry<C, kHeadDim>;
  constexpr bool kFp8 = G::kFp8;
  constexpr int kDimBlocks = kHeadDim / 8;
  extern __shared__ uint4 smem_mma[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem_mma);
  T* sQ = reinterpret_cast<T*>(base);                        // [16][D] swizzled
  T* conv = reinterpret_cast<T*>(base + G::kQBytes);         // e4m3 cache: the converted K, V tile
  unsigned char* ring = base + G::kQBytes + G::kConvBytes;  // [kStages][K, V][64][D] of C
  float* stat_m = reinterpret_cast<float*>(ring + G::kRingBytes);  // [warp][row] final merge
  float* stat_l = stat_m + kWarps * kRows;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  CtaWork w;
  // Splits start on whole 64-key tiles (the shuffled table reads): keys of the first tile below a
  // sliding window's first key score -inf below.
  if (!start_cta<T, kHeadDim, kThreads, kTileKeys>(p, plan, partial_o, partial_lse, w)) return;

  // The CTA's query heads as the 16 rows of sQ (element loads: any head stride works).
  {
    const T* q = static_cast<const T*>(p.query) + w.seq * p.query_batch_stride + w.first_head * p.query_head_stride;
    for (int i = threadIdx.x; i < kRows * kHeadDim; i += kThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      sQ[prefill::swizzle<kHeadDim>(r, d / prefill::kChunk) + d % prefill::kChunk] =
          r < w.num_heads ? q[r * p.query_head_stride + d] : from_float<T>(0.0f);
    }
  }

  const int block_shift = __ffs(p.block_size) - 1;  // block_size is a power of two
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const C* cache_head = static_cast<const C*>(p.kv_cache) + static_cast<int64_t>(w.kv_head) * kHeadDim;
  const int32_t* block_table = p.block_tables + w.seq * p.block_table_stride;
  const int num_tiles = ceil_div(w.end - w.begin, kTileKeys);
  const bool by_shuffle = prefill::tables_by_shuffle(block_shift, p.table_per_copy, token_stride);  // key0: whole tiles (plan)

  // Tile t's K and V into ring stage t % kStages, one commit group per call (empty past the end).
  auto issue = [&](int tile) {
    if (tile < num_tiles) {
      unsigned char* stage = ring + (tile % G::kStages) * G::kStageBytes;
      const int key0 = w.begin + tile * kTileKeys;
      const int entry = prefill::lane_table_entry(block_table, by_shuffle, block_shift, key0, w.end);  // K and V
      if constexpr (kFp8) {
        const uint8_t* cache8 = reinterpret_cast<const uint8_t*>(cache_head);
        prefill::load_kv_tile_fp8<kHeadDim>(stage, cache8, block_table, by_shuffle, entry, block_shift, token_stride,
                                            0, key0, w.end);
        prefill::load_kv_tile_fp8<kHeadDim>(stage + G::kTileElems, cache8, block_table, by_shuffle, entry,
                                            block_shift, token_stride, 1, key0, w.end);
      } else {
        T* tile_k = reinterpret_cast<T*>(stage);
        prefill::load_kv_tile<T, kHeadDim>(tile_k, cache_head, block_table, by_shuffle, entry, block_shift,
                                           token_stride, 0, key0, w.end);
        prefill::load_kv_tile<T, kHeadDim>(tile_k + G::kTileElems, cache_head, block_table, by_shuffle, entry,
                                           block_shift, token_stride, 1, key0, w.end);
      }
    }
    prefill::cp_async_commit();
  };

#pragma unroll
  for (int t = 0; t < G::kStages - 1; ++t) issue(t);
  // sQ is complete at the first tile's barrier.

  float o[1][kDimBlocks][4];  // one m16 row block: the CTA's query heads
#pragma unroll
  for (int db = 0; db < kDimBlocks; ++db) {
#pragma unroll
    for (int j = 0; j < 4; ++j) o[0][db][j] = 0.0f;
  }
  prefill::OnlineSoftmax<2, kDimBlocks> softmax;
  softmax.init();
  const float scale_log2 = p.scale * attention::kLog2e * (kFp8 ? p.kv_scale[0] : 1.0f);  // k_scale folded in
  const int warp_key0 = warp * kWarpKeys;  // this warp's keys within every tile

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<G::kStages - 2>();  // this thread's copies of `tile` have landed ...
    __syncthreads();                  // ... everyone's too; every warp is done with tile - 1
    const T* sK;
    if constexpr (kFp8) {
      const unsigned char* stage = ring + (tile % G::kStages) * G::kStageBytes;
      prefill::convert_kv_tile_fp8<T, kHeadDim>(conv, stage);  // this thread's own chunks
      prefill::convert_kv_tile_fp8<T, kHeadDim>(conv + G::kTileElems, stage + G::kTileElems);
      sK = conv;
    } else {
      sK = reinterpret_cast<const T*>(ring + (tile % G::kStages) * G::kStageBytes);
    }
    // Into the stage of tile - 1: read by every warp before the barrier above (an e4m3 stage only by
    // the threads that copied and converted it, this one included).
    issue(tile + G::kStages - 1);
    if constexpr (kFp8) __syncthreads();  // the converted tile is complete
    const T* sV = sK + G::kTileElems;

    // This warp's 16 keys: rows warp_key0 .. of the tile, folded into the tile pointers (multiples of
    // 8 rows leave the swizzle unchanged). Q's fragments come from sQ at each step (32 fewer registers
    // than holding them: 3 CTAs per SM without spills at head_dim 128).
    float s[1][2][4];
    prefill::compute_scores_smem_q<T, kHeadDim, 1, 2>(s, sQ, 0, sK + warp_key0 * kHeadDim, lane);
    // Accumulator element j of a lane: row lane / 4 + 8 (j / 2), key 2 (lane % 4) + j % 2 of block nb.
    const int key_base = w.begin + tile * kTileKeys + warp_key0 + (lane % 4) * 2;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = key_base + nb * 8 + j % 2;
        s[0][nb][j] = key < w.end && key >= w.lo ? s[0][nb][j] * scale_log2 : -INFINITY;
      }
    }
    softmax.update(s[0], o[0]);
    prefill::accumulate_pv_blocks<T, kHeadDim, 1, 2>(o, s, sV + warp_key0 * kHeadDim, lane);
  }

  // ---- merge the four warps' (m, l, o): o = sum_w o_w 2^(m_w - M) / L, L = sum_w l_w 2^(m_w - M)
  pdl_launch_dependents();  // PDL: every tile read; the next kernel may take this SM's free slots
  cp_async_wait<0>();  // only empty groups can be pending; the ring becomes the merge scratch
  float row_l[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_l[i] = softmax.row_sum[i];
    row_l[i] += __shfl_xor_sync(kFullMask, row_l[i], 1);
    row_l[i] += __shfl_xor_sync(kFullMask, row_l[i], 2);
    if (lane % 4 == 0) {
      stat_m[warp * kRows + lane / 4 + 8 * i] = softmax.row_max[i];  // quad-uniform after update()
      stat_l[warp * kRows + lane / 4 + 8 * i] = row_l[i];
    }
  }
  __syncthreads();  // the stats are visible and no warp reads the ring any more
  float* scratch = reinterpret_cast<float*>(ring);  // [warp][row][kScratchStride]
  float lse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = lane / 4 + 8 * i;
    float m_all = -INFINITY;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) m_all = fmaxf(m_all, stat_m[v * kRows + row]);
    const float base_m = m_all == -INFINITY ? 0.0f : m_all;  // no key at all: every factor exp2(-inf) = 0
    float l_all = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) l_all += stat_l[v * kRows + row] * exp2f(stat_m[v * kRows + row] - base_m);
    const float mine = l_all > 0.0f ? exp2f(softmax.row_max[i] - base_m) / l_all : 0.0f;
    lse[i] = base_m + log2f(l_all);  // -inf for a row without keys
    float* dst = scratch + (warp * kRows + row) * G::kScratchStride + (lane % 4) * 2;
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db) {
      *reinterpret_cast<float2*>(dst + db * 8) = make_float2(o[0][db][2 * i] * mine, o[0][db][2 * i + 1] * mine);
    }
  }
  __syncthreads();
  const float v_scale = kFp8 ? p.kv_scale[1] : 1.0f;
  for (int i = threadIdx.x; i < w.num_heads * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim, feature = i % kHeadDim;
    float acc = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) acc += scratch[(v * kRows + g) * G::kScratchStride + feature];
    write_output<T, kHeadDim>(p, plan, w, partial_o, g, feature, acc * v_scale);
  }
  if (!w.direct && warp == 0 && lane % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = lane / 4 + 8 * i;
      if (row < w.num_heads) partial_lse[w.partial_row0 + static_cast<int64_t>(row) * plan.num_splits] = lse[i];
    }
  }
  if (fused_merge(p, w)) merge_if_last<T, kHeadDim, kThreads>(p, plan, w, partial_o, partial_lse);
}

template <typename T, typename C, int kHeadDim>
cudaError_t launch(const DecodeParams& p, const DecodePlan& plan, float* partial_o, float* partial_lse,
                   cudaStream_t stream) {
  constexpr size_t kSmem = Geometry<C, kHeadDim>::kSmemBytes;
  // Splits start on whole tiles: the shuffled block-table reads (prefill_tiles.cuh) rely on it.
  if (plan.split_tokens % kTileKeys != 0) return cudaErrorInvalidValue;
  auto* kernel = paged_decode_mma_kernel<T, C, kHeadDim>;
  FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  const dim3 grid(plan.num_splits, p.num_kv_heads * plan.num_head_chunks, p.batch);
  return launch_kernel(kernel, grid, dim3(kThreads), kSmem, stream, p, plan, partial_o, partial_lse);
}

}  // namespace mma
}  // namespace decode
}  // namespace fastinfer
