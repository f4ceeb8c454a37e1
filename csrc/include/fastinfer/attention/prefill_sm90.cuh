// Paged prefill attention for Hopper (sm_90a): the same op as prefill.cuh (causal, GQA, ragged
// batch, K/V through block tables, bf16 / fp16, plain cache), on wgmma instead of mma.sync.
//
// Why: mma.sync runs at roughly two thirds of Hopper's dense tensor-core rate at best, and the
// FlashAttention-2 structure of prefill.cuh also feeds every mma from registers loaded with ldmatrix.
// wgmma reads its B operand (and here also Q, the A of S = Q K^T) straight from shared memory and
// runs asynchronously, so the softmax of one warpgroup overlaps the matrix products of the other.
//
// CTA = 128 query rows of one (sequence, head), 3 warpgroups (384 threads, one CTA per SM):
//   warpgroup 0, producer (40 registers after setmaxnreg): per key tile n, 16-byte cp.async of
//     K_n then V_n (128 keys each) through the block table (its entries for the tile read once per
//     warp and shuffled to the copies, prefill_tiles.cuh) into stage n % kStages of a ring (3
//     stages at D = 128, 4 at D = 64), zero-filling keys >= key_end (never read: unused slots may
//     hold NaN, and 0 * NaN = NaN); each thread waits for its own copies two groups behind the
//     newest (cp.async.wait_group 2), fences them for the async proxy (wgmma reads shared memory
//     through it) and arrives on the stage's `full` mbarrier (count 128). A stage is refilled
//     after both consumers arrived on its `empty` mbarrier (one arrival per consumer warp).
//   warpgroups 1 and 2, consumers (232 registers): consumer c owns query rows 64 c .. 64 c + 63,
//     loads them once into shared memory, then per key tile:
//       S[64 x 128] = Q K_n^T   head_dim / 16 wgmma m64n128k16, both operands in shared memory;
//       mask (causal, only on tiles that reach past the warp's first row), online softmax in fp32
//       (prefill_softmax.cuh: the wgmma accumulator layout is mma.sync's m16n8 layout, per warp);
//       O[64 x D] += P V_n      8 wgmma m64nDk16, P from registers (the S accumulators rounded to
//       16 bits are the A fragments), V from shared memory read MN-major (transposed: V rows are
//       keys, head_dim contiguous, as the cache stores them).
//     A consumer whose rows cannot see a tile (its last row precedes the tile's first key, or with a
//     sliding window the tile's last key precedes its first row's window) or that has no rows (a
//     short last tile) still waits for and releases the stage, and skips the math. With a window the
//     key tiles start at the CTA's first row's window (the tiles below it are neither loaded nor read).
//   Epilogue: O / row sum, rounded, stored from registers (4 bytes per thread and row block).
// Shared memory: Q, K and V tiles are [D / 64 column blocks][128 rows][128 bytes] with the 128-byte
// swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8) of its 128-byte row, atoms of 8 rows
// = 1024 bytes, every tile 1024-byte aligned), the layout wgmma's matrix descriptors take: K-major
// for Q and K (stride byte offset 1024 between 8-row groups; a k-step of 16 elements = 32 bytes
// advances the start address inside the row), MN-major for V (8-key groups 1024 bytes apart, the
// two 64-column blocks at D = 128 one tile-block (16 KiB) apart as the leading byte offset).
// D = 128: Q 32 KiB + 3 x (K 32 + V 32) KiB = 224 KiB (of 227); D = 64: 16 + 4 x 32 KiB = 144 KiB.
// Grid and tile lookup as prefill.cuh (grid.x bounds the 128-row tiles of the ragged batch, each CTA
// finds its (sequence, tile) with locate_tile, longest-context tiles first; blockIdx.y = head).
// K / V by TMA (PrefillParams::kv_tma, FASTINFER_ATTN_KV_LOAD=tma; block sizes >= 8): a 5-D tensor map
// over the cache [blocks][K, V][block rows][kv heads][head_dim] gives boxes of (64 dims x min(block, 128)
// rows) of one block, kv head and half, which land in the tile exactly as the swizzled cp.async copies
// do (a box of >= 8 rows starts on a swizzle atom). One lane of the producer's warp 0 issues a tile's
// boxes (the block ids from tile_table_entry, one read per lane, shuffled) after an arrive_expect_tx
// of the tile's bytes on its `full` barrier (count 1 in this mode); the tile of a sequence that holds
// keys past its length is still copied by all 128 producer threads with cp.async, zero-filling them
// (a block's unused slots may hold NaN), which then arrive once through thread 0. Same shared-memory
// images as the cp.async mode, so the same bits (tested). The point: one thread's ~32 TMA issues per
// tile instead of ~20 instructions for each of the 128 threads' 32 16-byte copies. (Full tiles take
// their block ids from one read per lane whatever FASTINFER_ATTN_TABLE says; a table entry out of the
// cache's range reads zeros by TMA where a copy would fault: the op validates indices unless told not to.)
// Not covered here (prefill.cuh runs them): fp32, an e4m3 cache, other head dims, GPUs other than
// sm_90.
#pragma once
#include <cuda/ptx>

#include <algorithm>
#include <atomic>
#include <climits>

#include "fastinfer/tma.cuh"
#include "fastinfer/attention/prefill_softmax.cuh"
#include "fastinfer/attention/prefill_tiles.cuh"  // locate_tile, cp.async, pack2, rows_are_16_byte_aligned
#include "fastinfer/gemm/wgmma_16bit.cuh"
#include "fastinfer/gemm/wgmma_fp8.cuh"  // fence / commit_group / wait_group / fence_operand

namespace fastinfer {
namespace prefill {
namespace sm90 {

namespace ptx = cuda::ptx;

constexpr int kRows = 128;            // query rows per CTA, and keys per K / V tile
constexpr int kLag = 2;               // cp.async groups a producer thread leaves in flight (see below)
constexpr int kConsumers = 2;         // warpgroups of 64 query rows
constexpr int kWarpgroup = 128;
constexpr int kThreadsWs = (kConsumers + 1) * kWarpgroup;
constexpr int kRowBytes = 128;        // one swizzled row of a column block: 64 16-bit elements
constexpr int kAtom = 1024;           // 8 rows x 128 bytes: the swizzle period and the tiles' alignment
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 64 Ki registers
constexpr int kFullArrivals = kWarpgroup;               // every producer thread, after its own copies
constexpr int kEmptyArrivals = kConsumers * 4;          // one per consumer warp

template <int kHeadDim>
struct Smem {
  // Ring depth: D = 128 as deep as 227 KiB allow (32 + 3 x 64 KiB); D = 64: 16 + 4 x 32 KiB.
  static constexpr int kStages = kHeadDim == 128 ? 3 : 4;
  static constexpr int kTileBytes = kRows * kHeadDim * 2;     // Q, or one K or V stage
  static constexpr int kBlockBytes = kRows * kRowBytes;       // one 64-column block of a tile
  static constexpr int kQ = 0;
  static constexpr int kK = kTileBytes;                       // + stage * kTileBytes
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kBarriers = kV + kStages * kTileBytes; // full_k, full_v, empty_k, empty_v
  static constexpr int kBytes = kBarriers + 4 * kStages * 8 + kAtom;  // + slack to align the base
  static_assert(kHeadDim % 64 == 0 && kTileBytes % kAtom == 0, "tiles must be whole swizzle atoms");
  static_assert(kBytes <= 232448, "227 KiB of dynamic shared memory per CTA");
};

// Byte offset of 16-byte chunk c of row r (r < 128) in a swizzled tile.
__device__ __forceinline__ uint32_t tile_offset(int r, int c) {
  return (c >> 3) * (kRows * kRowBytes) + r * kRowBytes + (((c ^ r) & 7) << 4);  // bit ops: (r + 8 k) & 7 folds
}

using tma::wait_barrier;

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// This thread's completed generic-proxy writes to shared memory (cp.async, st.shared) become visible
// to async-proxy reads (wgmma) ordered after it.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void warpgroup_barrier(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kWarpgroup) : "memory");
}

// Keys [key0, key0 + 128) of K (kv = 0) or V (kv = 1) into a swizzled tile, by the 128 producer
// threads (t = 0 .. 127; 16 consecutive threads copy one 256-byte key row at D = 128): prefill_tiles.cuh's
// copy_kv_rows (keys >= key_end zero-filled, never read: unused slots may hold NaN).
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_kv(uint8_t* tile, const T* cache_head, const int32_t* block_table, bool by_shuffle,
                                        int entry, int block_shift, int64_t token_stride, int kv, int key0, int key_end,
                                        int t) {
  auto dst = [](int r, int c) { return static_cast<int>(tile_offset(r, c)); };
  copy_kv_rows<kWarpgroup, kRows, kHeadDim / kChunk>(tile, dst, cache_head, block_table, by_shuffle, entry, block_shift,
                                                     token_stride, kv, key0, key_end, t);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreadsWs, 1)
    paged_prefill_wgmma_kernel(const __grid_constant__ CUtensorMap kv_map, const PrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<kHeadDim>;
  constexpr int kStages = L::kStages;
  constexpr int kDimBlocks = kHeadDim / 8;   // n8 blocks of O
  constexpr int kKeyBlocks = kRows / 8;      // n8 blocks of S
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + kAtom - 1) / kAtom * kAtom);
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* full_v = full_k + kStages;
  uint64_t* empty_k = full_v + kStages;
  uint64_t* empty_v = empty_k + kStages;

  QueryTile qt;
  if (!locate_query_tile<kRows>(p, blockIdx.x, qt)) return;  // uniform over the CTA
  const int head = blockIdx.y;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int64_t row0 = qt.row0;  // the tile's first query row in the batch
  const int num_rows = qt.num_rows, first_pos = qt.first_pos, key_end = qt.key_end;
  // Key tiles kv_tile0 + n, n < num_kv_tiles: with a sliding window the tiles below the first row's
  // window are skipped (window 2^30: none, and no key is ever below a row's window). Stages, parities
  // and copy groups count n.
  const int window = p.window > 0 ? p.window : (1 << 30);
  const int kv_tile0 = max(0, first_pos - window + 1) / kRows;
  const int num_kv_tiles = ceil_div(key_end, kRows) - kv_tile0;

  if (threadIdx.x == 0) {
    const int full_arrivals = p.kv_tma ? 1 : kFullArrivals;  // TMA mode: one arrive_expect_tx (or thread 0)
    for (int i = 0; i < kStages; ++i) {
      ptx::mbarrier_init(&full_k[i], full_arrivals);
      ptx::mbarrier_init(&full_v[i], full_arrivals);
      ptx::mbarrier_init(&empty_k[i], kEmptyArrivals);
      ptx::mbarrier_init(&empty_v[i], kEmptyArrivals);
    }
    ptx::fence_mbarrier_init(ptx::sem_release, ptx::scope_cluster);
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / kWarpgroup;
  const int t = threadIdx.x % kWarpgroup;
  if (warpgroup == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    const int block_shift = __ffs(p.block_size) - 1;
    const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
    const T* cache_head = static_cast<const T*>(p.kv_cache) + static_cast<int64_t>(kv_head) * kHeadDim;
    const int32_t* block_table = p.block_tables + qt.seq * p.block_table_stride;
    // Copy groups in commit order: 2 n = K_n, 2 n + 1 = V_n. After committing group g a thread waits
    // until at most kLag groups are pending (cp.async.wait_group kLag: groups <= g - kLag have
    // landed), fences its copies for the async proxy and announces every landed group in order on
    // its tile's `full` barrier. So up to kLag + 1 tiles' worth of K / V (~96 KiB at D = 128) are in
    // flight per CTA while the thread waits. No deadlock for kStages >= 2: announcing group 2 c (K_c)
    // needs group 2 c + kLag committed, i.e. the stage of K_{c+1} (V_c) free, which the consumers
    // released at tile c + 1 - kStages < c.
    int announced = 0;  // next group to announce
    auto announce_landed = [&](int last) {
      fence_proxy_async_smem();
      for (; announced <= last; ++announced) {
        const int tile = announced / 2;
        ptx::mbarrier_arrive(announced % 2 == 0 ? &full_k[tile % kStages] : &full_v[tile % kStages]);
      }
    };
    const bool by_shuffle = tables_by_shuffle(block_shift, p.table_per_copy, token_stride);  // uniform
    const int lane = t % kWarpSize;
    if (p.kv_tma) {  // uniform; the host set it only for block sizes >= 8
      const int warp = t / kWarpSize;
      const int box_rows = min(p.block_size, kRows), boxes = kRows / box_rows;
      const int block_mask = p.block_size - 1;
      for (int n = 0; n < num_kv_tiles; ++n) {
        const int s = n % kStages;
        const uint32_t parity = ((n / kStages) & 1) ^ 1;  // a fresh barrier counts as released once
        const int key0 = (kv_tile0 + n) * kRows;
        // Lane b: the table entry of the tile's b-th block (<= 16 blocks of >= 8 keys; one for blocks
        // of >= 128 keys). Warp 0 only (warps 1-3 join for the last tile below).
        const int entry = warp == 0 ? tile_table_entry<kRows>(block_table, block_shift, key0, key_end, lane) : 0;
        if (key0 + kRows <= key_end) {  // every key of the tile exists: whole boxes by TMA
          if (warp != 0) continue;
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {
            uint64_t* full = kv ? &full_v[s] : &full_k[s];
            wait_barrier(kv ? &empty_v[s] : &empty_k[s], parity);
            if (lane == 0) {
              ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, full,
                                             static_cast<uint32_t>(L::kTileBytes));
            }
            uint8_t* tile = smem + (kv ? L::kV : L::kK) + s * L::kTileBytes;
            for (int b = 0; b < boxes; ++b) {
              const int block = __shfl_sync(kFullMask, entry, b);
              if (lane == 0) {
                const int offset = (key0 + b * box_rows) & block_mask;
#pragma unroll
                for (int cb = 0; cb < kHeadDim / 64; ++cb) {
                  const int32_t coords[5] = {cb * 64, kv_head, offset, kv, block};
                  ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global,
                                            tile + cb * L::kBlockBytes + b * box_rows * kRowBytes, &kv_map, coords,
                                            full);
                }
              }
            }
          }
        } else {  // the last tile, with keys past key_end: cp.async by all 128 threads, zero-filled
          // Only warp 0 waits on `empty` (it alone has walked every earlier phase: a parity wait more
          // than one phase ahead could pass early); the others wait for it at a named barrier.
          // (Warp 0 reads its entries again rather than keep `entry`: reusing it made ptxas spill at D = 64.)
          const int all_entry = by_shuffle ? tile_table_entry<kRows>(block_table, block_shift, key0, key_end, lane) : 0;
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {
            if (warp == 0) wait_barrier(kv ? &empty_v[s] : &empty_k[s], parity);
            asm volatile("bar.sync 3, %0;\n" ::"n"(kWarpgroup) : "memory");  // the producer's warps
            load_kv<T, kHeadDim>(smem + (kv ? L::kV : L::kK) + s * L::kTileBytes, cache_head, block_table, by_shuffle,
                                 all_entry, block_shift, token_stride, kv, key0, key_end, t);
            cp_async_commit();
            cp_async_wait<0>();
            fence_proxy_async_smem();
            asm volatile("bar.sync 3, %0;\n" ::"n"(kWarpgroup) : "memory");  // every copy landed and fenced
            if (t == 0) ptx::mbarrier_arrive(kv ? &full_v[s] : &full_k[s]);
          }
        }
      }
      return;
    }
    for (int n = 0; n < num_kv_tiles; ++n) {
      const int s = n % kStages;
      const uint32_t parity = ((n / kStages) & 1) ^ 1;  // a fresh barrier counts as released once
      // K_n and V_n share the tile's entries; the read flies while this thread waits for the stage.
      const int key0 = (kv_tile0 + n) * kRows;
      const int entry = by_shuffle ? tile_table_entry<kRows>(block_table, block_shift, key0, key_end, lane) : 0;
      wait_barrier(&empty_k[s], parity);
      load_kv<T, kHeadDim>(smem + L::kK + s * L::kTileBytes, cache_head, block_table, by_shuffle, entry, block_shift,
                           token_stride, 0, key0, key_end, t);
      cp_async_commit();
      cp_async_wait<kLag>();
      announce_landed(2 * n - kLag);
      wait_barrier(&empty_v[s], parity);
      load_kv<T, kHeadDim>(smem + L::kV + s * L::kTileBytes, cache_head, block_table, by_shuffle, entry, block_shift,
                           token_stride, 1, key0, key_end, t);
      cp_async_commit();
      cp_async_wait<kLag>();
      announce_landed(2 * n + 1 - kLag);
    }
    cp_async_wait<0>();
    announce_landed(2 * num_kv_tiles - 1);
    return;
  }

  // consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int consumer = warpgroup - 1;
  const int warp = t / kWarpSize, lane = t % kWarpSize;
  const int wg_row0 = consumer * 64;                 // this warpgroup's first row in the tile
  const bool has_rows = wg_row0 < num_rows;
  const int wg_last_pos = first_pos + wg_row0 + 63;  // position of its last row
  const int wg_window0 = first_pos + wg_row0 - window + 1;  // the first key its first row sees (may be < 0)
  const int warp_first_pos = first_pos + wg_row0 + warp * 16;
  const int row_pos = warp_first_pos + lane / 4;     // this lane's first row (the second is + 8)

  {  // this warpgroup's 64 query rows (zeros past num_rows)
    constexpr int kChunks = kHeadDim / kChunk;
    const T* query = static_cast<const T*>(p.query) + head * p.query_head_stride;
#pragma unroll
    for (int it = 0; it < 64 * kChunks / kWarpgroup; ++it) {
      const int i = it * kWarpgroup + t;
      const int r = wg_row0 + i / kChunks, c = i % kChunks;
      uint8_t* dst = smem + L::kQ + tile_offset(r, c);
      if (r < num_rows) {
        cp_async_16(dst, query + (row0 + r) * p.query_token_stride + c * kChunk);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_smem();
    warpgroup_barrier(1 + consumer);
  }
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t q_base = smem_base + L::kQ + wg_row0 * kRowBytes;

  const float scale_log2 = p.scale * kLog2e;
  float o[kDimBlocks][4];
#pragma unroll
  for (int db = 0; db < kDimBlocks; ++db) {
#pragma unroll
    for (int j = 0; j < 4; ++j) o[db][j] = 0.0f;
  }
  OnlineSoftmax<kKeyBlocks, kDimBlocks> softmax;
  softmax.init();

  for (int n = 0; n < num_kv_tiles; ++n) {
    const int s = n % kStages;
    const uint32_t parity = (n / kStages) & 1;
    const int key0 = (kv_tile0 + n) * kRows;
    // uniform over the warpgroup: some row of it sees some key of the tile
    const bool needed = has_rows && key0 <= wg_last_pos && key0 + kRows - 1 >= wg_window0;
    float sc[kKeyBlocks][4];

    wait_barrier(&full_k[s], parity);
    if (needed) {
      const uint32_t k_base = smem_base + L::kK + s * L::kTileBytes;
      wgmma::fence_operands(sc);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        // 16 elements = 32 bytes of each row: column block kk / 4, offset 32 (kk % 4) inside it.
        const uint32_t offset = (kk / 4) * L::kBlockBytes + (kk % 4) * 32;
        wgmma::mma_ss<kRows, T>(sc, wgmma::smem_desc_sw128(q_base + offset, 16, kAtom),
                                wgmma::smem_desc_sw128(k_base + offset, 16, kAtom),
                                kk > 0);
      }
      wgmma::commit_group();
      wgmma::wait_group<0>();
      wgmma::fence_operands(sc);
    }
    __syncwarp();
    if (lane == 0) ptx::mbarrier_arrive(&empty_k[s]);

    uint32_t pa[kRows / 16][4];  // P as the A fragments of the k-steps of O += P V
    if (needed) {
      const bool diagonal = key0 + kRows - 1 > warp_first_pos;  // some key here is later than some row
      const bool below_window = key0 <= warp_first_pos + 15 - window;  // some key below some row's window
#pragma unroll
      for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sc[nb][j] *= scale_log2;
      }
      if (diagonal || below_window) {  // uniform over the warp
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int key = key0 + nb * 8 + (lane % 4) * 2 + j % 2, pos = row_pos + (j / 2) * 8;
            if (key > pos || key <= pos - window) sc[nb][j] = -INFINITY;
          }
        }
      }
      softmax.update(sc, o);
#pragma unroll
      for (int kk = 0; kk < kRows / 16; ++kk) c_to_a_fragment<T>(pa[kk], sc[2 * kk], sc[2 * kk + 1]);
    }

    wait_barrier(&full_v[s], parity);
    if (needed) {
      const uint32_t v_base = smem_base + L::kV + s * L::kTileBytes;
      wgmma::fence_operands(o);
      wgmma::fence_operands(pa);  // packed before the fence
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kRows / 16; ++kk) {
        // Keys 16 kk .. 16 kk + 15: two 8-row groups from 16 kk * 128 bytes on; head_dim blocks of 64
        // columns kBlockBytes apart (the leading byte offset), 8-key groups kAtom apart (the stride).
        wgmma::mma_rs_tb<kHeadDim, T>(o, pa[kk],
                                      wgmma::smem_desc_sw128(v_base + kk * 16 * kRowBytes, L::kBlockBytes, kAtom), 1);
      }
      wgmma::commit_group();
      wgmma::wait_group<0>();
      wgmma::fence_operands(o);
      wgmma::fence_operands(pa);  // read by the wgmma until here
    }
    __syncwarp();
    if (lane == 0) ptx::mbarrier_arrive(&empty_v[s]);
  }

  if (!has_rows) return;
  float inv_sum[2];
  softmax.inverse_sums(inv_sum);
  T* out = static_cast<T*>(p.out) + head * p.out_head_stride;
  const int row = wg_row0 + warp * 16 + lane / 4;
  if (p.lse != nullptr) softmax.store_log_sum_exp(p.lse + row0 * p.num_heads + head, p.num_heads, row, num_rows, lane);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (row + 8 * i >= num_rows) continue;
    T* dst = out + (row0 + row + 8 * i) * p.out_token_stride + (lane % 4) * 2;
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db) {
      *reinterpret_cast<uint32_t*>(dst + db * 8) = pack2<T>(o[db][2 * i] * inv_sum[i], o[db][2 * i + 1] * inv_sum[i]);
    }
  }
#else
  __trap();  // built for sm_90a only; launch_paged_prefill_wgmma is only compiled there
#endif
}

// Launches that loaded K / V by TMA (fastinfer._C.prefill_tma_launches(): the tests check that the
// setting took effect, not only that the results agree).
inline std::atomic<long long> tma_launches{0};

// The cache [num_blocks][2][block_size][num_kv_heads][head_dim] (16-bit elements) as a 5-D tensor map,
// innermost first, read in boxes of (64 dims, 1 kv head, min(block_size, 128) rows, 1 half, 1 block)
// with the 128-byte swizzle.
inline cudaError_t make_kv_map(CUtensorMap* map, const PrefillParams& p) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tma::encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t d = static_cast<cuuint64_t>(p.head_dim), h = static_cast<cuuint64_t>(p.num_kv_heads),
                   b = static_cast<cuuint64_t>(p.block_size);
  const cuuint64_t dims[5] = {d, h, b, 2, static_cast<cuuint64_t>(p.num_blocks)};
  const cuuint64_t strides[4] = {d * 2, h * d * 2, b * h * d * 2, 2 * b * h * d * 2};  // bytes, dims 1..4
  const cuuint32_t box[5] = {64, 1, static_cast<cuuint32_t>(std::min(p.block_size, kRows)), 1, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 5, const_cast<void*>(p.kv_cache), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int kHeadDim>
cudaError_t launch(const PrefillParams& p, cudaStream_t stream) {
  const int64_t max_tiles = (p.num_tokens + static_cast<int64_t>(kRows - 1) * p.batch) / kRows;
  if (max_tiles > INT_MAX) return cudaErrorInvalidValue;
  auto kernel = paged_prefill_wgmma_kernel<T, kHeadDim>;
  constexpr int kSmem = Smem<kHeadDim>::kBytes;
  FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  // TMA where asked and possible: boxes of >= 8 rows (whole swizzle atoms), a known block count.
  PrefillParams q = p;
  CUtensorMap map{};
  q.kv_tma = p.kv_tma && p.block_size >= 8 && p.num_blocks > 0 && p.num_blocks <= INT_MAX ? 1 : 0;
  if (q.kv_tma && make_kv_map(&map, q) != cudaSuccess) q.kv_tma = 0;  // no encoder in the driver: cp.async
  kernel<<<dim3(static_cast<unsigned>(max_tiles), p.num_heads), kThreadsWs, kSmem, stream>>>(map, q);
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && q.kv_tma) tma_launches.fetch_add(1, std::memory_order_relaxed);
  return err;
}

}  // namespace sm90
}  // namespace prefill

// bf16 / fp16 query and cache (no kv_scale), head_dim 64 or 128; anything else cudaErrorInvalidValue
// (the caller runs launch_paged_prefill_attention for those).
inline cudaError_t launch_paged_prefill_wgmma_impl(const PrefillParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0) return cudaSuccess;
  // no e4m3 cache, no soft-capping (the mma.sync kernel of prefill.cuh applies it)
  if (p.kv_scale != nullptr || p.softcap != 0.0f || prefill::invalid_shape(p)) return cudaErrorInvalidValue;
  if (!prefill::rows_are_16_byte_aligned(p)) return cudaErrorMisalignedAddress;
  const bool d128 = p.head_dim == 128;
  if (!d128 && p.head_dim != 64) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kBFloat16:
      return d128 ? prefill::sm90::launch<__nv_bfloat16, 128>(p, stream)
                  : prefill::sm90::launch<__nv_bfloat16, 64>(p, stream);
    case DType::kFloat16:
      return d128 ? prefill::sm90::launch<__half, 128>(p, stream) : prefill::sm90::launch<__half, 64>(p, stream);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastinfer
