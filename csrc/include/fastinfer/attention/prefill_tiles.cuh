// Building blocks of the FlashAttention-2 style tensor-core attention kernels: the prefill kernel
// (prefill.cuh) and the tensor-core decode kernel (decode_mma.cuh). PTX wrappers (cp.async,
// ldmatrix, mma.sync.m16n8k16), the swizzled shared-memory tile layout, K/V tile loads through a
// block table (16-bit, or e4m3 staged and converted), and the two per-warp products S = Q K^T and
// O += P V on mma fragments. The layouts are described in prefill.cuh.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

#include "fastinfer/attention/prefill.h"

#include "fastinfer/common.cuh"

namespace fastinfer {
namespace prefill {

constexpr int kBlockN = 64;                    // keys per K/V tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kChunk = 8;                      // 16-bit elements per 16-byte chunk
constexpr int kKeyBlocks = kBlockN / 8;        // n8 blocks of S
constexpr float kLog2e = 1.4426950408889634f;

// ---- PTX wrappers ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (.cg); completes at cp_async_wait_all.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(global_src)
               : "memory");
}
// 16 bytes, or (valid false) 16 zero bytes and nothing read: src-size 0 (global_src must still be a
// valid address; callers pass their cache head's base).
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* global_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(global_src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// ---- block tables, read once per key tile ----------------------------------------------------------
// Why: a table read right before each cp.async cannot be hoisted (the copies are asm volatile with a
// memory clobber), so every 16-byte copy waited for its own global load: the SASS of both prefill
// kernels had one LDG -> LDGSTS chain per copy, 32 per thread per 128-key K+V tile. Instead lane l of a
// warp reads the entry of the tile's l-th block once, and each copy takes its entry with a shuffle.
// Valid for block sizes >= 4 (a 128-key tile spans at most 32 blocks); tables_by_shuffle says when.
// Also requires one block's elements (K and V halves) to fit an int: the shuffled path's offsets.
__device__ __forceinline__ bool tables_by_shuffle(int block_shift, int table_per_copy, int64_t token_stride) {
  return block_shift >= 2 && table_per_copy == 0 && (token_stride << block_shift) * 2 <= 0x7fffffff;
}

// This lane's entry: block (key0 >> block_shift) + lane of the table, or 0 past the blocks that hold
// keys < key_end (never used: those keys are zero-filled, not read). Requires key0 % min(kTileKeys,
// block_size) == 0, so that (key0 + r) >> block_shift == (key0 >> block_shift) + (r >> block_shift):
// the callers' key0 is a whole number of tiles (decode: split_tokens is, checked in mma::launch).
template <int kTileKeys>
__device__ __forceinline__ int tile_table_entry(const int32_t* block_table, int block_shift, int key0, int key_end,
                                                int lane) {
  static_assert(kTileKeys <= 128 && kTileKeys % 32 == 0, "at most 32 blocks of >= 4 keys per tile");
  const int first = key0 >> block_shift;
  // A tile lies inside one block when blocks are at least as long (both are powers of two; shift <= 30).
  const int blocks = max(1, kTileKeys >> block_shift);
  const int used = ((key_end - 1) >> block_shift) + 1;
  return lane < blocks && first + lane < used ? block_table[first + lane] : 0;
}

// The table entry of tile row r (key key0 + r) from the lanes' entries: lane r >> block_shift holds it
// (always < 32 for block_shift >= 2 and r < 128). Called by every lane of the warp.
__device__ __forceinline__ int64_t row_block(int entry, int r, int block_shift) {
  return __shfl_sync(kFullMask, entry, r >> block_shift);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 b16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i, and lane l
// receives from matrix i the pair (row l / 4, cols 2 (l % 4), +1) in r[i] (.trans: the pair
// (rows 2 (l % 4), +1; col l / 4)).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// d += a (16x16, row major) * b (16x8, col major), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 -> one register of two 16-bit values, the first in the low half (mma operand order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The C fragments (fp32) of two consecutive n8 key blocks are, element for element, the A fragment
// (16-bit) of one k16 step: mma.m16n8k16's and wgmma m64k16's register layout alike.
template <typename T>
__device__ __forceinline__ void c_to_a_fragment(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// ---- shared-memory tiles -----------------------------------------------------------------------

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][kHeadDim] swizzled tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) * kChunk);
}

// Keys [key0, key0 + kKeys) of K (kv = 0) or V (kv = 1): 16-byte chunk c (of kChunks per key row) of
// tile row r goes to smem + dst_offset(r, c) bytes, from element c * 16 / sizeof(E) of the key's row in
// the cache. Thread t of kNumThreads copies the chunks t, t + kNumThreads, ... (every thread of the
// group calls this: the shuffles need whole warps). Keys >= key_end are zeroed and never read (their
// slots may be unwritten, their block-table entries meaningless). by_shuffle (tables_by_shuffle):
// the entries come from `entry` (tile_table_entry of this lane), else from a global read per copy.
template <int kNumThreads, int kKeys, int kChunks, typename E, typename DstOffset>
__device__ __forceinline__ void copy_kv_rows(uint8_t* smem, DstOffset dst_offset, const E* cache_head,
                                             const int32_t* block_table, bool by_shuffle, int entry, int block_shift,
                                             int64_t token_stride, int kv, int key0, int key_end, int t) {
  constexpr int kChunkElems = 16 / sizeof(E);
  static_assert(kKeys * kChunks % kNumThreads == 0, "whole rounds of copies");
  const int block_mask = (1 << block_shift) - 1;
  const int64_t block_stride = (token_stride << block_shift) * 2;  // one block: K and V halves
  if (by_shuffle) {
    // Offsets inside a block in 32 bits (tables_by_shuffle checked that a block's elements fit an
    // int), one 32 x 32 -> 64-bit product per copy for the block: ~1/3 of the 64-bit address math.
    const E* head = cache_head + static_cast<int64_t>(kv << block_shift) * token_stride;  // this half of each block
    const int token_stride32 = static_cast<int>(token_stride), block_stride32 = static_cast<int>(block_stride);
    // Thread t copies chunk t % kChunks of rows t / kChunks + kRowsPerRound * it: written out so that
    // the row's swizzle term and the chunk's offset stay per-thread constants.
    constexpr int kRowsPerRound = kNumThreads / kChunks;
    static_assert(kNumThreads % kChunks == 0, "whole rows per round");
    const int c = t % kChunks, r0 = t / kChunks;
    const E* head_c = head + c * kChunkElems;
#pragma unroll 8
    for (int it = 0; it < kKeys / kRowsPerRound; ++it) {
      const int r = r0 + it * kRowsPerRound;
      const int key = key0 + r;
      const int block = static_cast<int>(row_block(entry, r, block_shift));  // every lane shuffles, valid or not
      const bool valid = key < key_end;
      // block ids are >= 0: unsigned 32 x 32 -> 64 (one IMAD.WIDE.U32; the signed form compiled to four)
      const uint64_t offset = static_cast<uint64_t>(static_cast<uint32_t>(block)) * static_cast<uint32_t>(block_stride32) +
                              static_cast<uint32_t>((key & block_mask) * token_stride32);
      cp_async_16_zfill(smem + dst_offset(r, c), valid ? head_c + offset : cache_head, valid);
    }
    return;
  }
#pragma unroll 4
  for (int it = 0; it < kKeys * kChunks / kNumThreads; ++it) {
    const int i = it * kNumThreads + t;
    const int r = i / kChunks, c = i % kChunks;
    const int key = key0 + r;
    uint8_t* dst = smem + dst_offset(r, c);
    if (key < key_end) {
      const int64_t block = block_table[key >> block_shift];
      const int64_t slot = (kv << block_shift) + (key & block_mask);
      cp_async_16(dst, cache_head + block * block_stride + slot * token_stride + c * kChunkElems);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// This thread's lane entry for the tile at key0 (tile_table_entry), or 0 when the entries are read per copy.
template <int kKeys = kBlockN>
__device__ __forceinline__ int lane_table_entry(const int32_t* block_table, bool by_shuffle, int block_shift, int key0,
                                                int key_end) {
  return by_shuffle ? tile_table_entry<kKeys>(block_table, block_shift, key0, key_end, threadIdx.x % kWarpSize) : 0;
}

// Keys [key0, key0 + kKeys) of K (kv = 0) or V (kv = 1) into a swizzled [kKeys][kHeadDim] tile, by every
// thread of the CTA; entry: lane_table_entry of the same tile (K and V share it).
template <typename T, int kHeadDim, int kKeys = kBlockN>
__device__ __forceinline__ void load_kv_tile(T* tile, const T* cache_head, const int32_t* block_table, bool by_shuffle,
                                             int entry, int block_shift, int64_t token_stride, int kv, int key0,
                                             int key_end) {
  auto dst = [](int r, int c) { return swizzle<kHeadDim>(r, c) * static_cast<int>(sizeof(T)); };
  copy_kv_rows<kThreads, kKeys, kHeadDim / kChunk>(reinterpret_cast<uint8_t*>(tile), dst, cache_head, block_table,
                                                   by_shuffle, entry, block_shift, token_stride, kv, key0, key_end,
                                                   threadIdx.x);
}

// FP8 cache: keys [key0, key0 + kKeys) of K (kv = 0) or V (kv = 1) as raw e4m3 into the unswizzled
// staging tile [kKeys][kHeadDim] bytes, 16 values per chunk; keys >= key_end are zeroed, never read.
// Chunk i of the tile is always copied by thread i % kThreads, which later converts it itself.
template <int kHeadDim, int kKeys = kBlockN>
__device__ __forceinline__ void load_kv_tile_fp8(uint8_t* stage, const uint8_t* cache_head, const int32_t* block_table,
                                                 bool by_shuffle, int entry, int block_shift, int64_t token_stride,
                                                 int kv, int key0, int key_end) {
  auto dst = [](int r, int c) { return r * kHeadDim + c * 16; };
  copy_kv_rows<kThreads, kKeys, kHeadDim / 16>(stage, dst, cache_head, block_table, by_shuffle, entry, block_shift,
                                               token_stride, kv, key0, key_end, threadIdx.x);
}

// Two e4m3 values (low byte first) -> one register of two T, exactly.
template <typename T>
__device__ __forceinline__ uint32_t fp8x2_to(uint32_t two);
template <>
__device__ __forceinline__ uint32_t fp8x2_to<__half>(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
template <>
__device__ __forceinline__ uint32_t fp8x2_to<__nv_bfloat16>(uint32_t two) {
  const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3)));
  return pack2<__nv_bfloat16>(f.x, f.y);
}

// The chunks this thread copied with load_kv_tile_fp8 (after its own cp.async wait), converted into
// the swizzled T tile: 16 e4m3 of row r, chunk c become T chunks 2c and 2c + 1 of row r.
template <typename T, int kHeadDim, int kKeys = kBlockN>
__device__ __forceinline__ void convert_kv_tile_fp8(T* tile, const uint8_t* stage) {
  constexpr int kChunks = kHeadDim / 16;
#pragma unroll
  for (int it = 0; it < kKeys * kChunks / kThreads; ++it) {
    const int i = it * kThreads + threadIdx.x;
    const int r = i / kChunks, c = i % kChunks;
    const uint4 raw = *reinterpret_cast<const uint4*>(stage + r * kHeadDim + c * 16);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    uint32_t converted[8];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      converted[2 * w] = fp8x2_to<T>(words[w] & 0xffffu);
      converted[2 * w + 1] = fp8x2_to<T>(words[w] >> 16);
    }
    *reinterpret_cast<uint4*>(tile + swizzle<kHeadDim>(r, 2 * c)) =
        make_uint4(converted[0], converted[1], converted[2], converted[3]);
    *reinterpret_cast<uint4*>(tile + swizzle<kHeadDim>(r, 2 * c + 1)) =
        make_uint4(converted[4], converted[5], converted[6], converted[7]);
  }
}

// S (16 x 64 per warp) = Q (16 x D, A fragments in registers) * K_tile^T.
template <typename T, int kHeadDim>
__device__ __forceinline__ void compute_scores(float (&s)[kKeyBlocks][4], const uint32_t (&q)[kHeadDim / 16][4],
                                               const T* sK, int lane) {
#pragma unroll
  for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
    for (int j = 0; j < 4; ++j) s[nb][j] = 0.0f;
  }
  // Matrices of one ldmatrix.x4: (keys +0..7, d +0..7), (keys +0..7, d +8..15),
  // (keys +8..15, d +0..7), (keys +8..15, d +8..15) -> B fragments of two n8 key blocks.
  const int key_in_pair = (lane / 16) * 8 + lane % 8;
  const int chunk_in_step = (lane / 8) % 2;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kKeyBlocks / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sK + swizzle<kHeadDim>(np * 16 + key_in_pair, kk * 2 + chunk_in_step));
      mma_16816<T>(s[2 * np], q[kk], b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], q[kk], b[2], b[3]);
    }
  }
}

// O (16 x D per warp) += P (16 x 64, from the S accumulators) * V_tile.
template <typename T, int kHeadDim>
__device__ __forceinline__ void accumulate_pv(float (&o)[kHeadDim / 8][4], const float (&s)[kKeyBlocks][4],
                                              const T* sV, int lane) {
  // Matrices of one ldmatrix.x4.trans: (keys +0..7, d +0..7), (keys +8..15, d +0..7),
  // (keys +0..7, d +8..15), (keys +8..15, d +8..15) -> B fragments of two n8 head-dim blocks.
  const int key_in_step = ((lane / 8) % 2) * 8 + lane % 8;
  const int chunk_in_pair = lane / 16;
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    uint32_t a[4];
    c_to_a_fragment<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + swizzle<kHeadDim>(kk * 16 + key_in_step, dp * 2 + chunk_in_pair));
      mma_16816<T>(o[2 * dp], a, b[0], b[1]);
      mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// S (kMB row blocks x 8 kNB keys per warp) = Q K_tile^T with Q's A fragments read from sQ at every
// 16-wide head-dim step (the 128-row prefill tiles, the 64-row ones at head_dim 256 and the tensor-core
// decode kernel; the 64-row prefill up to head_dim 128 keeps them in registers: compute_scores). Rows q_row0 + 16 mb of sQ, keys 0 .. 8 kNB - 1 of
// sK: a caller's key offset that is a multiple of 8 rows may be folded into sK (the swizzle only
// depends on row % 8).
template <typename T, int kHeadDim, int kMB, int kNB>
__device__ __forceinline__ void compute_scores_smem_q(float (&s)[kMB][kNB][4], const T* sQ, int q_row0,
                                                      const T* sK, int lane) {
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[mb][nb][j] = 0.0f;
    }
  }
  const int key_in_pair = (lane / 16) * 8 + lane % 8;
  const int chunk_in_step = (lane / 8) % 2;
  // Not fully unrolled: kk indexes shared memory only, and a rolled loop keeps ptxas from holding
  // every step's fragment addresses in registers (the two row blocks' outputs take 128 of them).
#pragma unroll 2
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t a[kMB][4];
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      ldmatrix_x4(a[mb], sQ + swizzle<kHeadDim>(q_row0 + mb * 16 + lane % 16, kk * 2 + lane / 16));
    }
#pragma unroll
    for (int np = 0; np < kNB / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sK + swizzle<kHeadDim>(np * 16 + key_in_pair, kk * 2 + chunk_in_step));
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        mma_16816<T>(s[mb][2 * np], a[mb], b[0], b[1]);
        mma_16816<T>(s[mb][2 * np + 1], a[mb], b[2], b[3]);
      }
    }
  }
}

// O (kMB row blocks x D per warp) += P (from the S accumulators) * V_tile; each V fragment feeds kMB mma.
// Keys 0 .. 8 kNB - 1 of sV (an offset of a multiple of 8 rows may be folded into sV, as above).
template <typename T, int kHeadDim, int kMB, int kNB>
__device__ __forceinline__ void accumulate_pv_blocks(float (&o)[kMB][kHeadDim / 8][4],
                                                     const float (&s)[kMB][kNB][4], const T* sV, int lane) {
  const int key_in_step = ((lane / 8) % 2) * 8 + lane % 8;
  const int chunk_in_pair = lane / 16;
#pragma unroll
  for (int kk = 0; kk < kNB / 2; ++kk) {
    uint32_t a[kMB][4];
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) c_to_a_fragment<T>(a[mb], s[mb][2 * kk], s[mb][2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + swizzle<kHeadDim>(kk * 16 + key_in_step, dp * 2 + chunk_in_pair));
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        mma_16816<T>(o[mb][2 * dp], a[mb], b[0], b[1]);
        mma_16816<T>(o[mb][2 * dp + 1], a[mb], b[2], b[3]);
      }
    }
  }
}

// ---- ragged batch: which (sequence, query tile) a CTA owns -------------------------------------

struct TileCoord {
  int seq;        // sequence index
  int tile;       // query tile within the sequence
};

// Tile t of the batch's concatenated per-sequence tile lists (ceil(q_len / kBlockM) tiles each).
// Every warp computes the same answer (no shared memory, no barrier). Returns false past the last tile.
template <int kBlockM>
__device__ __forceinline__ bool locate_tile(const int32_t* cu_seqlens_q, int batch, int t, TileCoord& coord) {
  const int lane = threadIdx.x % kWarpSize;
  int tiles_before = 0;  // tiles of the sequences preceding this 32-sequence chunk
  for (int b0 = 0; b0 < batch; b0 += kWarpSize) {
    const int b = b0 + lane;
    const int n = b < batch ? ceil_div(cu_seqlens_q[b + 1] - cu_seqlens_q[b], kBlockM) : 0;
    int inclusive = n;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int v = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += v;
    }
    const int chunk_tiles = __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
    if (t < tiles_before + chunk_tiles) {
      // The first lane whose running total passes t owns it (a lane with 0 tiles never does).
      const int owner = __ffs(__ballot_sync(kFullMask, tiles_before + inclusive > t)) - 1;
      const int owner_inclusive = __shfl_sync(kFullMask, inclusive, owner);
      const int owner_tiles = __shfl_sync(kFullMask, n, owner);
      const int index = t - (tiles_before + owner_inclusive - owner_tiles);
      coord.seq = b0 + owner;
      coord.tile = owner_tiles - 1 - index;  // longest-context tiles first
      return true;
    }
    tiles_before += chunk_tiles;
  }
  return false;
}

// The query tile CTA t owns (locate_tile) and what follows from it. Returns false past the last tile.
struct QueryTile {
  int seq;          // sequence index
  int64_t row0;     // the tile's first query row in the batch: cu_seqlens_q[seq] + its offset in the sequence
  int num_rows;     // rows of the tile that exist (<= kBlockM; fewer in a sequence's last tile)
  int first_pos;    // position of row row0 in its sequence (its context precedes it in the cache)
  int key_end;      // keys any row of the tile can see: [0, key_end)
};

template <int kBlockM>
__device__ __forceinline__ bool locate_query_tile(const PrefillParams& p, int t, QueryTile& q) {
  TileCoord coord;
  if (!locate_tile<kBlockM>(p.cu_seqlens_q, p.batch, t, coord)) return false;
  const int q_begin = p.cu_seqlens_q[coord.seq];
  const int q_len = p.cu_seqlens_q[coord.seq + 1] - q_begin;
  const int m0 = coord.tile * kBlockM;
  q.seq = coord.seq;
  q.row0 = static_cast<int64_t>(q_begin) + m0;
  q.num_rows = min(kBlockM, q_len - m0);
  q.first_pos = p.seq_lens[coord.seq] - q_len + m0;
  q.key_end = q.first_pos + q.num_rows;
  return true;
}

// Parameters no prefill kernel takes (block_m is the mma kernel's own).
inline bool invalid_shape(const PrefillParams& p) {
  return p.batch <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.num_heads > 65535 ||
         p.block_size <= 0 || (p.block_size & (p.block_size - 1)) != 0 || p.window < 0 || p.window >= (1 << 30);
}

// The 16-byte cp.async / vector stores of the tensor-core kernel need 16-byte aligned rows.
inline bool rows_are_16_byte_aligned(const PrefillParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return aligned(p.query) && aligned(p.out) && aligned(p.kv_cache) && p.query_token_stride % kChunk == 0 &&
         p.query_head_stride % kChunk == 0 && p.out_token_stride % kChunk == 0 && p.out_head_stride % kChunk == 0;
}

}  // namespace prefill
}  // namespace fastinfer
