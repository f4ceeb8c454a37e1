// W4A16 GEMM on Hopper: out[M, N] = x[M, K] @ W^T, W 4-bit in the packed layout of w4a16.h,
// dequantized in registers, multiplied on the tensor cores (mma.sync.m16n8k16, fp32 accumulation).
//
// Parallelisation. A CTA (256 threads = 8 warps) owns a BM x 128 output tile (BM = 16 MT rows,
// MT = 1..4) and a contiguous range of K. Its warps form a 2 (n) x 4 (k) grid: warp (wn, wk) owns
// the 64 columns of strip wn and, in every 64-deep stage, the k16 step wk; the four k-partial sums
// are added through shared memory at the end. Per stage the CTA streams 4 KiB of weights (2 strips
// x 4 k-steps x 512 B, each a contiguous run) plus BM x 64 activations and the stage's scale rows,
// with cp.async into a kStages-deep ring, so loads for stage t + kStages - 1 fly while stage t
// computes. Each warp reads its 512-byte weight tile with one 16-byte LDS per lane: the layout hands
// every lane exactly the B fragments of its 8 n8 tiles, which it dequantizes with the magic-number
// trick (4 LOP3 + 4 HSUB2/HMUL2 per 8 weights) and feeds to 8 MT mma.sync.
//
// Split-K. For decode-sized M the output has too few tiles to keep 132 SMs streaming (Llama-3-8B
// down-projection, N = 4096: 32 tiles). The launcher then splits K over S <= 8 CTAs of a thread-block
// cluster; after the K loop each CTA leaves its fp32 partial tile in shared memory and the cluster
// reduces through distributed shared memory in a fixed order (deterministic, no global workspace,
// no second kernel), each CTA summing and storing 1/S of the tile.
//
// Roofline (H100/H200, 14336 -> 4096, group 128): 29.4 MB of codes + 0.9 MB of scales; at ~3.3 TB/s
// that is ~9 us, against 42 us for the bf16 weights cuBLAS reads. Tensor-core work at M <= 64 is
// far below the machine's rate, so the kernel is a streaming problem until M is in the hundreds.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "fastinfer/common.cuh"
#include "fastinfer/gemm/split_plan.h"
#include "fastinfer/gemm/w4a16.h"

namespace fastinfer {
namespace w4a16 {

namespace cg = cooperative_groups;
namespace L = int4_layout;

constexpr int kThreads = 256;
constexpr int kWarpsN = 2;                                 // warps along n: one 64-column strip each
constexpr int kWarpsK = 4;                                 // warps along k: one k16 step of a stage each
constexpr int kTileN = kWarpsN * L::kStripN;               // 128 columns per CTA
constexpr int kStageK = kWarpsK * L::kStepK;               // 64 k per pipeline stage
constexpr int kStepBytes = L::kWordsPerStep * 4;           // 512 B: one strip x one k16 step
constexpr int kStageBBytes = kWarpsN * kWarpsK * kStepBytes;  // 4 KiB of codes per stage
constexpr int kParamRowBytes = kTileN * 2;                 // one group row of 128 16-bit scales
constexpr int kStageParamBytes = 2 * kParamRowBytes;       // <= 2 group rows per stage (group 32)
constexpr int kAccStride = kTileN + 8;                     // fp32 epilogue tile row: +8 keeps float2 stores conflict-free
constexpr int kMaxSplits = split_plan::kMaxSplits;         // portable thread-block cluster size

template <int MT>
struct Config {
  static constexpr int kRows = 16 * MT;
  static constexpr int kStageABytes = kRows * kStageK * 2;
  static constexpr int kStageBytes = kStageBBytes + kStageABytes + 2 * kStageParamBytes;
  // Deep rings where the CTA is pure streaming; fewer stages where accumulators need the registers.
  static constexpr int kStages = MT == 1 ? 6 : MT == 2 ? 5 : 4;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kEpilogueBytes = kRows * kAccStride * 4;
  static_assert(kEpilogueBytes <= kSmemBytes, "the epilogue tile reuses the pipeline's shared memory");
  static constexpr int kMinBlocks = MT <= 2 ? 2 : 1;
};

// ---- dtype traits: the magic number whose mantissa receives a 4-bit code -------------------------
template <typename T>
struct Traits;
template <>
struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;      // half2(1024, 1024): 1024 + q is exact for q < 1024
  static constexpr uint32_t kMagicSym = 0x64086408u;   // half2(1032, 1032) = magic + 8
  static constexpr float kMagicValue = 1024.0f;
  static constexpr uint32_t kOnes = 0x3c003c00u;       // half2(1, 1)
};
template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;      // bf162(128, 128): 128 + q is exact for q < 128
  static constexpr uint32_t kMagicSym = 0x43084308u;   // bf162(136, 136)
  static constexpr float kMagicValue = 128.0f;
  static constexpr uint32_t kOnes = 0x3f803f80u;       // bf162(1, 1)
};

template <typename T2>
__device__ __forceinline__ T2 as_pair(uint32_t bits) {
  T2 v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}
template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// Element j of 8 16-bit values (4 words), broadcast to both halves of a pair: one PRMT.
__device__ __forceinline__ uint32_t broadcast_half(const uint32_t (&v)[4], int j) {
  return __byte_perm(v[j / 2], 0, j % 2 ? 0x3232 : 0x1010);
}

// ---- PTX wrappers ---------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes, or 16 zero bytes when !valid (rows past M).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// (a & mask) | bits in one LOP3 (the compiler emits an AND and an OR for the C expression).
template <uint32_t kMask, uint32_t kBits>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "n"(kMask), "n"(kBits));
  return r;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- dequantization of one B register: nibbles p and p + 4 of a word -> two weights -------------
// `word` is already shifted so that the pair sits in bits 0..3 and 16..19.
template <typename T, Int4Mode kMode>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, typename Traits<T>::T2 scale,
                                                 typename Traits<T>::T2 offset) {
  using T2 = typename Traits<T>::T2;
  const T2 biased = as_pair<T2>(and_or<0x000f000fu, Traits<T>::kMagic>(word));  // (magic + q) per half, exact
  if constexpr (kMode == Int4Mode::kMins) {
    const T2 q = __hsub2(biased, as_pair<T2>(Traits<T>::kMagic));         // q, exact
    return as_bits(__hfma2(q, scale, offset));                             // q s + m, one rounding
  } else {
    return as_bits(__hmul2(__hsub2(biased, offset), scale));               // (q - z) s, one rounding
  }
}

// ---- the kernel -----------------------------------------------------------------------------------
struct Shape {
  int total_stages;   // K / 64
  int group_shift;    // log2(group_size)
};

template <typename T, int MT, Int4Mode kMode>
__global__ void __launch_bounds__(kThreads, Config<MT>::kMinBlocks) w4a16_kernel(const W4A16Params p, const Shape shape) {
  using C = Config<MT>;
  using T2 = typename Traits<T>::T2;
  constexpr bool kHasOffsets = kMode != Int4Mode::kSymmetric;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int wn = warp % kWarpsN, wk = warp / kWarpsN;
  const int split = blockIdx.x, num_splits = gridDim.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * C::kRows;
  const int n0 = blockIdx.z * kTileN;
  const int strips = min(kWarpsN, (p.n - n0) / L::kStripN);  // 1 when N / 64 is odd and this is the last tile
  const int stage_begin = static_cast<int>(static_cast<int64_t>(split) * shape.total_stages / num_splits);
  const int stage_end = static_cast<int>(static_cast<int64_t>(split + 1) * shape.total_stages / num_splits);
  const int num_iters = stage_end - stage_begin;  // >= 1: the launcher keeps num_splits <= total_stages

  // ---- per-thread copy assignments, fixed for the whole K loop (a stage only adds its offset) ----
  // Codes: thread t copies lane t % 32 of k-step (t / 32) % 4 of strip t / 128: 2 contiguous 2 KiB runs.
  const int b_strip = tid / (kWarpsK * kWarpSize), b_step = (tid / kWarpSize) % kWarpsK, b_lane = tid % kWarpSize;
  const bool b_active = b_strip < strips;
  const uint32_t* b_src = p.qweight + static_cast<int64_t>(n0 / L::kStripN + b_strip) * 8 * p.k +
                          b_step * L::kWordsPerStep + b_lane * L::kWordsPerLane;  // + stage * 4 k-steps
  const int b_dst = (b_strip * kWarpsK + b_step) * kStepBytes + b_lane * 16;
  // Activations: 8 16-byte chunks per row, stored XOR-swizzled (chunk ^ row % 8) for ldmatrix.
  constexpr int kAChunks = C::kRows * 8, kAIters = (kAChunks + kThreads - 1) / kThreads;
  const T* x = static_cast<const T*>(p.x);
  const T* a_src[kAIters];
  int a_dst[kAIters];
  bool a_active[kAIters], a_valid[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i) {
    const int c = tid + i * kThreads, row = c / 8, chunk = c % 8;
    a_active[i] = c < kAChunks;
    a_valid[i] = a_active[i] && m0 + row < p.m;  // rows past M are zero-filled
    a_src[i] = a_valid[i] ? x + (m0 + row) * p.x_stride + chunk * 8 : x;
    a_dst[i] = kStageBBytes + row * (kStageK * 2) + (chunk ^ (row % 8)) * 16;
  }
  // Group rows (scales: threads 0-31, zeros / mins: 32-63): 16 chunks per 128-column row, and a
  // stage touches 2 rows (group 32) or 1 (groups 64, 128: the stage lies inside one group).
  const int pw = tid / kWarpSize, p_row = (tid % kWarpSize) / 16, p_chunk = tid % 16;
  const int param_rows = max(1, kStageK >> shape.group_shift);
  const bool p_active = pw < (kHasOffsets ? 2 : 1) && p_row < param_rows && p_chunk / 8 < strips;
  const uint8_t* p_src = static_cast<const uint8_t*>(p_active && pw == 1 ? p.offsets : p.scales) +
                         (static_cast<int64_t>(p_row) * p.n + n0) * 2 + p_chunk * 16;  // + first group * N * 2
  const int p_dst = kStageBBytes + C::kStageABytes + pw * kStageParamBytes + p_row * kParamRowBytes + p_chunk * 16;

  // Issue the cp.asyncs of stage `stage` (global index) into the ring slot at `s`.
  auto load_stage = [&](int stage, uint8_t* s) {
    if (b_active) {
      const uint32_t* src = b_src + static_cast<int64_t>(stage) * kWarpsK * L::kWordsPerStep;
      // (Plain cp.async: the L2::cache_hint form with an evict_first policy wrote to another CTA's
      // shared memory in these cluster launches on an H200, compute-sanitizer memcheck, 2026-11-28.)
      cp_async16(s + b_dst, src);
    }
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      if (a_active[i]) cp_async16(s + a_dst[i], a_src[i] + (a_valid[i] ? stage * kStageK : 0), a_valid[i]);
    }
    if (p_active) {
      const int64_t group = (static_cast<int64_t>(stage) * kStageK) >> shape.group_shift;
      cp_async16(s + p_dst, p_src + group * p.n * 2);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.0f;

  // Per-thread read offsets inside a stage. ldmatrix.x4: lanes 0-15 address rows 0-15 at k 0-7 of
  // this warp's k16 step, lanes 16-31 the same rows at k 8-15 -> registers a0..a3 of the mma.
  int a_read[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = mt * 16 + lane % 16, chunk = wk * 2 + lane / 16;
    a_read[mt] = kStageBBytes + row * (kStageK * 2) + (chunk ^ (row % 8)) * 16;
  }
  const int b_read = (wn * kWarpsK + wk) * kStepBytes + lane * 16;
  // The warp's k16 step lies in group row (16 wk) >> log2(group) of the stage's rows (1 only for
  // group 32, wk >= 2); lane g's 8 columns 8 j + g sit at positions 8 g .. 8 g + 7 of its strip.
  const int param_read = kStageBBytes + C::kStageABytes + ((wk * L::kStepK) >> shape.group_shift) * kParamRowBytes +
                         wn * L::kStripN * 2 + (lane / 4) * 16;

  auto compute_stage = [&](const uint8_t* s) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], s + a_read[mt]);
    const uint4 codes = *reinterpret_cast<const uint4*>(s + b_read);
    const uint4 scale8 = *reinterpret_cast<const uint4*>(s + param_read);
    uint4 offset8 = make_uint4(0, 0, 0, 0);
    if constexpr (kHasOffsets) offset8 = *reinterpret_cast<const uint4*>(s + param_read + kStageParamBytes);
    const uint32_t scale_words[4] = {scale8.x, scale8.y, scale8.z, scale8.w};
    const uint32_t offset_words[4] = {offset8.x, offset8.y, offset8.z, offset8.w};
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * i + h;  // n8 tile: column 8 j + lane / 4 of the strip
        const T2 scale = as_pair<T2>(broadcast_half(scale_words, j));
        T2 offset;
        if constexpr (kMode == Int4Mode::kSymmetric) {
          offset = as_pair<T2>(Traits<T>::kMagicSym);
        } else if constexpr (kMode == Int4Mode::kZeros) {  // magic + z, exact
          offset = __hadd2(as_pair<T2>(broadcast_half(offset_words, j)), as_pair<T2>(Traits<T>::kMagic));
        } else {
          offset = as_pair<T2>(broadcast_half(offset_words, j));
        }
        const uint32_t b0 = dequant_pair<T, kMode>(words[i] >> (8 * h), scale, offset);      // k 2c, 2c+1
        const uint32_t b1 = dequant_pair<T, kMode>(words[i] >> (8 * h + 4), scale, offset);  // k 2c+8, 2c+9
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][j], a[mt], b0, b1);
      }
    }
  };

  // ---- the cp.async ring: stage it + kStages - 1 is in flight while stage it computes ----
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < num_iters) load_stage(stage_begin + s, smem + s * C::kStageBytes);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  int read_slot = 0, write_slot = C::kStages - 1;
  for (int it = 0; it < num_iters; ++it) {
    cp_async_wait<C::kStages - 2>();  // this thread's copies of stage `it` have landed
    __syncthreads();                  // everyone's have, and everyone is done with the slot refilled next
    if (it + C::kStages - 1 < num_iters) load_stage(stage_begin + it + C::kStages - 1, smem + write_slot * C::kStageBytes);
    cp_async_commit();
    compute_stage(smem + read_slot * C::kStageBytes);
    read_slot = read_slot == C::kStages - 1 ? 0 : read_slot + 1;
    write_slot = write_slot == C::kStages - 1 ? 0 : write_slot + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring's shared memory becomes the epilogue tile

  // ---- k-partials of the 4 warps along k -> one fp32 tile [kRows][kAccStride], in a fixed order ----
  float* tile = reinterpret_cast<float*>(smem);
#pragma unroll 1
  for (int turn = 0; turn < kWarpsK; ++turn) {
    if (wk == turn) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int row = mt * 16 + lane / 4, col = wn * L::kStripN + j * 8 + (lane % 4) * 2;
          float2* lo = reinterpret_cast<float2*>(tile + row * kAccStride + col);
          float2* hi = reinterpret_cast<float2*>(tile + (row + 8) * kAccStride + col);
          if (turn == 0) {
            *lo = make_float2(acc[mt][j][0], acc[mt][j][1]);
            *hi = make_float2(acc[mt][j][2], acc[mt][j][3]);
          } else {
            const float2 l = *lo, u = *hi;
            *lo = make_float2(l.x + acc[mt][j][0], l.y + acc[mt][j][1]);
            *hi = make_float2(u.x + acc[mt][j][2], u.y + acc[mt][j][3]);
          }
        }
      }
    }
    __syncthreads();
  }

  // ---- split-K partials of the cluster's CTAs -> out, through distributed shared memory ----
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every CTA's tile is complete and visible to the cluster
  const int rows = static_cast<int>(min(static_cast<int64_t>(C::kRows), p.m - m0));
  const int half_cols = strips * L::kStripN / 2;
  const int rank = static_cast<int>(cluster.block_rank());
  T* out = static_cast<T*>(p.out);
  for (int idx = rank * kThreads + tid; idx < rows * half_cols; idx += num_splits * kThreads) {
    const int row = idx / half_cols, col = (idx % half_cols) * 2;
    float2 sum = make_float2(0.0f, 0.0f);
    for (int r = 0; r < num_splits; ++r) {
      const float* remote = cluster.map_shared_rank(tile, r);
      const float2 v = *reinterpret_cast<const float2*>(remote + row * kAccStride + col);
      sum.x += v.x;
      sum.y += v.y;
    }
    T2 pair_out;
    pair_out.x = from_float<T>(sum.x);
    pair_out.y = from_float<T>(sum.y);
    *reinterpret_cast<T2*>(out + (m0 + row) * p.out_stride + n0 + col) = pair_out;
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

// ---- launcher -------------------------------------------------------------------------------------
// Occupancy facts of one instantiation, queried once per process (they depend on the kernel and
// the GPU model; a process is assumed to drive one GPU model).
struct Occupancy {
  int blocks_per_sm;
  int clusters[kMaxSplits + 1];  // [s >= 2]: clusters of s CTAs resident at once, 0 = unschedulable
};

// Resident CTAs per SM and resident clusters per size of `kernel` (both W4A16 kernels).
template <typename Kernel>
cudaError_t query_kernel_occupancy(Kernel kernel, int threads, int smem_bytes, Occupancy* occ) {
  if (smem_bytes > 48 * 1024) {
    FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  FI_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ->blocks_per_sm, kernel, threads, smem_bytes));
  occ->clusters[0] = occ->clusters[1] = 0;
  for (int splits = 2; splits <= kMaxSplits; ++splits) {
    occ->clusters[splits] = max_active_clusters(kernel, threads, smem_bytes, splits);
  }
  return cudaSuccess;
}

// What split_plan::choose_splits needs: every CTA slot for 1 split, the queried counts above it.
inline split_plan::Residency residency(const Occupancy& occ, int num_sms) {
  split_plan::Residency r{};
  r.clusters[1] = static_cast<int64_t>(num_sms) * (occ.blocks_per_sm > 0 ? occ.blocks_per_sm : 1);
  for (int s = 2; s <= kMaxSplits; ++s) r.clusters[s] = occ.clusters[s];
  return r;
}

// The plan of the last W4A16 launch in this process (fastinfer._C.int4_last_launch(): the benchmark
// prints it beside each row, the cuda tests check it). Written by the launching host thread.
void record_launch(const Int4LaunchInfo& info);

inline Int4LaunchInfo launch_info(int kernel, int splits, int64_t waves, int64_t units, int items, int items_per_round,
                                  const split_plan::Residency& r) {
  static_assert(sizeof(Int4LaunchInfo{}.resident) == sizeof(r.clusters), "one count per cluster size");
  Int4LaunchInfo info{kernel, splits, units * splits, waves, units, items, items_per_round, {}};
  for (int s = 0; s <= kMaxSplits; ++s) info.resident[s] = r.clusters[s];
  return info;
}

template <typename T, int MT, Int4Mode kMode>
cudaError_t query_occupancy(Occupancy* occ) {
  return query_kernel_occupancy(w4a16_kernel<T, MT, kMode>, kThreads, Config<MT>::kSmemBytes, occ);
}

template <typename T, int MT, Int4Mode kMode>
cudaError_t launch_tiles(const W4A16Params& p, int m_blocks, cudaStream_t stream) {
  using C = Config<MT>;
  static Occupancy occ{};
  static std::atomic<int> state{0};  // 0: not queried, 1: ready
  if (state.load(std::memory_order_acquire) == 0) {
    Occupancy fresh{};
    FI_CUDA_TRY((query_occupancy<T, MT, kMode>(&fresh)));
    occ = fresh;  // a race here writes identical values
    state.store(1, std::memory_order_release);
  } else if (C::kSmemBytes > 48 * 1024) {  // the attribute is per device: set it for this one too
    FI_CUDA_TRY((cudaFuncSetAttribute(w4a16_kernel<T, MT, kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      C::kSmemBytes)));
  }
  const int n_tiles = ceil_div(p.n, kTileN);
  const int64_t tiles = static_cast<int64_t>(n_tiles) * m_blocks;
  const int64_t slots = static_cast<int64_t>(p.num_sms) * (occ.blocks_per_sm > 0 ? occ.blocks_per_sm : 1);
  Shape shape{p.k / kStageK, __builtin_ctz(p.group_size)};
  int splits;
  int64_t waves;
  const split_plan::Residency r = residency(occ, p.num_sms);
  if (p.waves_by_clusters) {
    // Split only while the tiles leave CTA slots idle, into at most slots / tiles CTAs each (the earlier
    // rule's bound), choosing the count by waves of resident clusters x (stages per CTA + the start /
    // reduction overhead): split_plan.h. Unbounded, the model split shapes the earlier rule never did
    // (M = 128-192) on modelled gains of a few percent (review, 2026-11-28).
    const int bound = tiles >= slots ? 1 : static_cast<int>(std::min<int64_t>(kMaxSplits, slots / tiles));
    const split_plan::Plan plan =
        split_plan::choose_splits(tiles, shape.total_stages, 1, p.split_overhead_rounds, r, true, bound);
    splits = plan.splits;
    waves = plan.waves;
  } else {
    // FASTINFER_INT4_WAVES=slots, the rule measured through visit 6: split K over a cluster only while
    // the tiles leave CTA slots idle; never more splits than stages.
    splits = tiles >= slots ? 1 : static_cast<int>(slots / tiles);
    splits = max(1, min(splits, min(kMaxSplits, shape.total_stages)));
    while (splits > 1 && r.clusters[splits] <= 0) --splits;
    waves = splits == 1 ? ceil_div<int64_t>(tiles, slots) : ceil_div<int64_t>(tiles, r.clusters[splits]);
  }
  ClusterLaunch launch(dim3(splits, m_blocks, n_tiles), kThreads, C::kSmemBytes, stream, splits);
  launch.config.numAttrs = 1;  // a cluster launch even for 1 split: the kernel's cluster.sync() always runs
  FI_CUDA_TRY(cudaLaunchKernelEx(&launch.config, w4a16_kernel<T, MT, kMode>, p, shape));
  record_launch(launch_info(Int4LaunchInfo::kTiles, splits, waves, tiles, shape.total_stages, 1, r));
  return cudaSuccess;
}

}  // namespace w4a16
}  // namespace fastinfer

// The dispatch below names every kernel of both W4A16 units, so including it instantiates all of
// them: the warpgroup-MMA unit (w4a16_wgmma.cuh, which uses the helpers above) defines
// FASTINFER_W4A16_HELPERS_ONLY to compile its own kernels alone.
#ifndef FASTINFER_W4A16_HELPERS_ONLY
#include "fastinfer/gemm/w4a16_small.cuh"

namespace fastinfer {
namespace w4a16 {

template <typename T, Int4Mode kMode>
cudaError_t launch_mode(const W4A16Params& p, cudaStream_t stream) {
  // auto: the GEMV kernel with deferred scales up to 8 rows (one n8 tile of x^T), the tile kernel above.
  // On an H200 (bench/results visit 6, with the default split rule "overhead") the four Llama-3-8B
  // projections at M = 1 took 13.3 + 13.5 + 34.0 + 27.6 = 88.4 us, against 96.0 for the plain GEMV
  // kernel with the earlier split rule and 106.4 for the tile kernel; at M = 16 the tile kernel wins
  // (qkv 20.2, down 32.0 us against 20.8 and 50.6).
  if (p.kernel == Int4Kernel::kWgmma || (p.kernel == Int4Kernel::kAutoWgmma && p.m > 8)) {
    return launch_w4a16_wgmma(p, stream);  // w4a16_wgmma.cu
  }
  if (p.kernel == Int4Kernel::kSmallStreamK && p.m <= 8) return small::launch_streamk<T, kMode>(p, stream);
  const bool deferred = p.kernel == Int4Kernel::kSmallDeferred || p.kernel == Int4Kernel::kSmallStreamK ||
                        ((p.kernel == Int4Kernel::kAuto || p.kernel == Int4Kernel::kAutoWgmma) && p.m <= 8);
  if (deferred) {
    return p.m <= 8 ? small::launch_small<T, 1, kMode, true>(p, stream) : small::launch_small<T, 2, kMode, true>(p, stream);
  }
  if (p.kernel == Int4Kernel::kSmall) {
    return p.m <= 8 ? small::launch_small<T, 1, kMode, false>(p, stream) : small::launch_small<T, 2, kMode, false>(p, stream);
  }
  // Fewest CTAs along M at <= 64 rows each, then the fewest 16-row tiles that cover their share.
  const int64_t m_blocks = ceil_div<int64_t>(p.m, 64);
  const int mt = static_cast<int>(ceil_div<int64_t>(ceil_div<int64_t>(p.m, m_blocks), 16));
  if (m_blocks > 65535) return cudaErrorInvalidValue;  // grid.y
  const int mb = static_cast<int>(m_blocks);
  switch (mt) {
    case 1: return launch_tiles<T, 1, kMode>(p, mb, stream);
    case 2: return launch_tiles<T, 2, kMode>(p, mb, stream);
    case 3: return launch_tiles<T, 3, kMode>(p, mb, stream);
    default: return launch_tiles<T, 4, kMode>(p, mb, stream);
  }
}

template <typename T>
cudaError_t launch_dtype(const W4A16Params& p, cudaStream_t stream) {
  switch (p.mode) {
    case Int4Mode::kSymmetric: return launch_mode<T, Int4Mode::kSymmetric>(p, stream);
    case Int4Mode::kZeros: return launch_mode<T, Int4Mode::kZeros>(p, stream);
    case Int4Mode::kMins: return launch_mode<T, Int4Mode::kMins>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace w4a16

inline cudaError_t launch_w4a16_gemm_impl(const W4A16Params& p, cudaStream_t stream) {
  namespace L = int4_layout;
  const bool shape_ok = p.n > 0 && p.k > 0 && p.n % L::kStripN == 0 && p.k % L::kMinK == 0 &&
                        (p.group_size == 32 || p.group_size == 64 || p.group_size == 128) &&
                        p.k % p.group_size == 0 && p.x_stride % 8 == 0 && p.out_stride % 2 == 0 &&
                        (p.mode == Int4Mode::kSymmetric) == (p.offsets == nullptr) && p.num_sms > 0;
  if (!shape_ok || p.m < 0) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16: return w4a16::launch_dtype<__half>(p, stream);
    case DType::kBFloat16: return w4a16::launch_dtype<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastinfer
#endif  // FASTINFER_W4A16_HELPERS_ONLY
