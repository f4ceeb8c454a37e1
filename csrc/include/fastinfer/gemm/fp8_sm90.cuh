// FP8 e4m3 GEMM for Hopper (sm_90a): out = (a @ b^T) * scale_a[m] * scale_b[n] + bias[n], bf16/fp16.
//
// Operands: a [M, K] (activations) and b [N, K] (weights), both row-major = K-major, which is the
// only layout wgmma takes for 8-bit inputs. The kernel computes D[P, Q] = X[P, K] @ Y[Q, K]^T with
// (X, Y) = (a, b), or for small M (decode) swapped, (X, Y) = (b, a): wgmma's M side is at least 64
// rows, so with M <= 64 tokens the weights take that side and the tokens sit on wgmma's N side,
// which goes down to 8 (a 64 x 8 tile instead of a 64 x 128 one wastes no weight bandwidth).
//
// Structure (one CTA per SM, persistent):
//   warpgroup 0 (producer, 40 registers): one thread walks the CTA's work units and, per k-tile
//     of 128 bytes of K, waits for a free stage of the shared-memory ring (`empty` mbarrier) and
//     issues two TMA loads (X tile [kBlockP x 128], Y tile [kBlockQ x 128], 128-byte swizzle) that
//     complete on the stage's `full` mbarrier (expect_tx of the stage's bytes).
//   warpgroups 1..2 (consumers, 232 registers): each owns 64 rows of X. Per k-tile it waits on
//     `full`, issues 4 wgmma m64nQk32 (fp32 accumulators in registers), waits for them, releases
//     the stage (`empty`) and adds the k-tile's partial sums into a second fp32 accumulator.
//     That promotion matters: Hopper's FP8 tensor cores keep only ~14 mantissa bits while they
//     accumulate, so summing all of K inside wgmma loses accuracy that torch._scaled_mm (cuBLAS,
//     without fast accumulation) keeps; promoting every 128 of K stays as accurate.
//   Epilogue: scales (per token x per channel, or per tensor), bias, bf16, straight from registers.
// Multicast (Fp8GemmParams::multicast, off by default): 2-CTA clusters on vertically adjacent tiles
//   that load one shared Y tile half each, by TMA multicast into both CTAs (see multicast_unit).
// Work units: output tiles in a grouped raster (kGroup tiles of P share each sweep over Q, so the
// CTAs running together reuse Y panels from L2), times a split of K when tiles alone cannot fill
// the SMs (decode shapes such as N = 4096, K = 14336). A split launch has one CTA per (tile, split),
// the splits of a tile forming a thread-block cluster (<= 8, portable): after the K loop each CTA
// leaves its fp32 partial tile in its shared memory, and the cluster reduces them through
// distributed shared memory in a fixed order (deterministic; no workspace, memset or second kernel),
// each CTA scaling and storing 1 / splits of the tile. (As the W4A16 kernel does.)
// Shared memory: 128-byte swizzle (TMA writes it, wgmma's descriptors read it): 8 rows x 128 B
// atoms, 1024-byte aligned. Per stage (kBlockP + kBlockQ) x 128 B: 32 KiB for 128 x 128 tiles
// (7 stages), 17 KiB for 128 x 8 (12 stages, ~200 KiB in flight per SM for decode).
// Roofline: 8192^3 is 1.1 PFLOP, ~0.8 ms at the H200's measured 1269 TFLOP/s (torch._scaled_mm);
// decode (M <= 64, 4096 -> 14336) is 58.7 MB of weights, 13.7 us at 4.28 TB/s.
#pragma once
#include <cuda.h>           // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cooperative_groups.h>

#include <algorithm>
#include <cuda/ptx>

#include "fastinfer/common.cuh"
#include "fastinfer/tma.cuh"
#include "fastinfer/gemm/fp8.h"
#include "fastinfer/gemm/fp8_gemv.cuh"
#include "fastinfer/gemm/wgmma_fp8.cuh"

namespace fastinfer {
namespace fp8gemm {

namespace ptx = cuda::ptx;

constexpr int kBlockK = 128;             // K per stage: 128 e4m3 bytes = one 128-byte swizzle row
constexpr int kMmaK = 32;                // K of one wgmma on 8-bit inputs
constexpr int kWarpgroup = 128;
constexpr int kSwizzleAtom = 1024;       // 8 rows x 128 B: the swizzle pattern's period and alignment
constexpr int kSmemLimit = 232448;       // 227 KiB of opt-in dynamic shared memory per CTA on sm_90
constexpr int kMaxStages = 12;
constexpr int kGroup = 8;                // P-tiles per raster group
constexpr int kMinKTilesPerSplit = 4;
constexpr int kMaxSplits = 8;            // portable thread-block cluster size
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 64 Ki registers

// kBlockQ = 256 (Fp8GemmParams.wide_tiles): 128 accumulators per thread leave no room for a second
// set of 128, so each k-tile runs as two m64n128 halves (columns 0..127, then 128..255 of the Y tile),
// each accumulated into one 64-register `part` and promoted into its half of `acc`.
template <int kBlockQ_, bool kSwapAB_>
struct Config {
  static constexpr int kConsumers = 2;
  static constexpr int kHalves = kBlockQ_ == 256 ? 2 : 1;  // wgmma issues per k-step
  static constexpr int kBlockP = 64 * kConsumers;  // X rows per tile: 64 per consumer warpgroup
  static constexpr int kBlockQ = kBlockQ_;         // Y rows per tile = wgmma N
  static constexpr bool kSwapAB = kSwapAB_;
  static constexpr int kThreads = (kConsumers + 1) * kWarpgroup;
  static constexpr int kXBytes = kBlockP * kBlockK;
  static constexpr int kStageBytes = (kBlockP + kBlockQ) * kBlockK;
  static constexpr int kBarrierBytes = 2 * kMaxStages * 8;
  static constexpr int kStages = (kSmemLimit - kSwizzleAtom - kBarrierBytes) / kStageBytes < kMaxStages
                                     ? (kSmemLimit - kSwizzleAtom - kBarrierBytes) / kStageBytes
                                     : kMaxStages;
  static constexpr int kSmemBytes = kStages * kStageBytes + kBarrierBytes + kSwizzleAtom;
  static_assert(kBlockQ % 8 == 0 && kBlockQ <= 256 && kStages >= 2, "unsupported tile");
};

// How the output is cut into work units; shared by host (grid size) and device (unit -> tile).
struct Schedule {
  int tiles_p, tiles_q, splits, k_tiles;
  // Fp8GemmParams::multicast in effect (splits == 1, tiles_p even, unswapped tiles): the grid is made of
  // 2-CTA clusters, each walking units of two P-tiles that share one Q-tile (multicast_unit below).
  int multicast;
  __host__ __device__ int num_units() const { return tiles_p * tiles_q * splits; }
};

struct Unit {
  int p, q;              // tile coordinates
  int k_begin, k_end;    // k-tiles of this unit's split
};

__device__ __forceinline__ Unit unit_at(const Schedule& s, int u) {
  // Unit u < tiles_p * tiles_q * splits. Split launches: the splits of a tile are consecutive CTAs
  // (one cluster), one unit per CTA.
  const int split = s.splits > 1 ? u % s.splits : 0, t = s.splits > 1 ? u / s.splits : u;
  const int group_size = kGroup * s.tiles_q;
  const int first_p = t / group_size * kGroup;
  const int rows = min(s.tiles_p - first_p, kGroup);
  const int local = t % group_size;
  Unit w;
  w.p = first_p + local % rows;
  w.q = local / rows;
  w.k_begin = static_cast<int>(static_cast<int64_t>(split) * s.k_tiles / s.splits);
  w.k_end = static_cast<int>(static_cast<int64_t>(split + 1) * s.k_tiles / s.splits);
  return w;
}

// ---- TMA multicast over a 2-CTA cluster (Fp8GemmParams::multicast) --------------------------------
// The two CTAs of a cluster take P-tiles 2 i and 2 i + 1 of one Q column at a time: the same Y tile
// (the weights' kBlockQ x 128 bytes per k-tile, 2/3 of a 128 x 256 tile's stage) feeds both. Each
// producer loads its own X tile and half of the Y tile, the latter multicast into the same offset of
// both CTAs' shared memory and completing on both CTAs' `full` barriers (each expects a whole stage:
// X + two Y halves). A stage may be overwritten only when the consumers of both CTAs are done with it,
// so each consumer warp releases it on its own and on the peer's `empty` barrier (16 arrivals per
// phase instead of 8). The shared-memory image of every stage, and so every wgmma and every sum, is
// the one a CTA without multicast builds: the outputs are equal bit for bit. Halves the L2 -> SM
// bytes of Y: per 128 x 256 k-tile 32 KiB instead of 48 KiB a CTA.
// Pair unit u of the cluster: the unit_at of the schedule with tiles_p / 2 rows of pairs, then this
// CTA's P-tile of the pair.
__device__ __forceinline__ Unit multicast_unit(const Schedule& s, int u, int rank) {
  Schedule pairs = s;
  pairs.tiles_p = s.tiles_p / 2;
  Unit w = unit_at(pairs, u);
  w.p = 2 * w.p + rank;
  return w;
}

// This CTA's units (persistent loop): u = first, first + stride, ... < count. With multicast, units
// are pairs and the loop runs per cluster (both CTAs walk the same sequence, in the same order).
struct Walk {
  int first, stride, count, rank;
  __device__ __forceinline__ Unit unit(const Schedule& s, int u) const {
    return s.multicast ? multicast_unit(s, u, rank) : unit_at(s, u);
  }
};
__device__ __forceinline__ Walk make_walk(const Schedule& s) {
  if (!s.multicast) return Walk{static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), s.num_units(), 0};
  // The cluster's index, the number of clusters and this CTA's rank in its cluster, as the hardware
  // numbers them (what the multicast mask and mapa refer to), not derived from blockIdx.
  unsigned cluster, clusters, rank;
  asm("mov.u32 %0, %%clusterid.x;\n" : "=r"(cluster));
  asm("mov.u32 %0, %%nclusterid.x;\n" : "=r"(clusters));
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return Walk{static_cast<int>(cluster), static_cast<int>(clusters), s.num_units() / 2, static_cast<int>(rank)};
}

// The peer CTA's copy of a shared-memory barrier (mapa), and an arrival on it with the default
// semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id) does: what it orders is
// this warp's finished reads of the stage (its wgmmas were waited for) before the peer's TMA rewrites it.
// (.release.cluster compiles to MEMBAR.ALL.GPU before every arrival, SASS 2026-11-28: a GPU-wide fence
// per warp and k-tile.)
__device__ __forceinline__ uint32_t peer_barrier(uint64_t* bar, int peer_rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
               : "=r"(remote)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(peer_rank));
  return remote;
}
__device__ __forceinline__ void arrive_remote(uint32_t remote_bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote_bar) : "memory");
}

// A consumer warp is done with stage `stage`: one arrival (lane 0) on this CTA's `empty` barrier and,
// with multicast, on the peer's (whose producer writes half of this CTA's Y tile).
__device__ __forceinline__ void release_stage(uint64_t* empty, int stage, bool multicast, int peer_rank, int lane) {
  __syncwarp();
  if (lane == 0) {
    ptx::mbarrier_arrive(&empty[stage]);
    if (multicast) arrive_remote(peer_barrier(&empty[stage], peer_rank));
  }
}

// wgmma matrix descriptor of a K-major tile with 128-byte swizzle: start address (>> 4), leading
// byte offset unused for swizzled K-major (1), stride byte offset 1024 (between 8-row atoms),
// layout type 1 = SWIZZLE_128B. Stepping K by 32 bytes inside the 128-byte row adds 2 to the start.
__device__ __forceinline__ uint64_t smem_desc(const void* smem) {
  return wgmma::smem_desc_sw128(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), 16, kSwizzleAtom);
}

using tma::wait_barrier;

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

// Scales, bias and the store of one consumer thread's accumulators (wgmma's D fragment: register
// 4j + 2h + e holds row 16 warp + lane / 4 + 8 h, column 8 j + 2 (lane % 4) + e of the 64 x Q tile).
// The thread's two P rows keep their scale for the whole tile, and each pair of Q columns is read once
// for both rows, all through the read-only path (ld.global.nc): an ordinary load after a store to out
// cannot be moved above it (they might alias), so the SASS had ~7 loads per stored pair, each waiting
// behind the previous pair's store. Same roundings as before: rn(rn(acc * rn(scale_a[m] * scale_b[n]))
// + bias[n]) (with the bias loaded first the compiler fused multiply and add for half the elements).
template <class Cfg, typename OutT>
__device__ __forceinline__ void epilogue(const float (&acc)[Cfg::kBlockQ / 2], const Fp8GemmParams& p, const Unit& w,
                                         int consumer) {
  const int lane = threadIdx.x % kWarpSize, warp = (threadIdx.x / kWarpSize) % 4;
  const int64_t p0 = static_cast<int64_t>(w.p) * Cfg::kBlockP + consumer * 64 + warp * 16 + lane / 4;
  const int64_t q0 = static_cast<int64_t>(w.q) * Cfg::kBlockQ + (lane % 4) * 2;
  OutT* out = static_cast<OutT*>(p.out);
  const OutT* bias = static_cast<const OutT*>(p.bias);
  // P side: rows of a (tokens) unless swapped, then rows of b (channels); Q side the other.
  const int64_t p_size = Cfg::kSwapAB ? p.N : p.M, q_size = Cfg::kSwapAB ? p.M : p.N;
  const float* p_scales = Cfg::kSwapAB ? p.scale_b : p.scale_a;
  const float* q_scales = Cfg::kSwapAB ? p.scale_a : p.scale_b;
  const bool p_per_row = Cfg::kSwapAB ? p.scale_b_per_channel : p.scale_a_per_token;
  const bool q_per_row = Cfg::kSwapAB ? p.scale_a_per_token : p.scale_b_per_channel;
  float p_scale[2], p_bias[2] = {0.0f, 0.0f};  // p_bias: the bias of channel pp when swapped
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t pp = p0 + 8 * h;
    p_scale[h] = pp < p_size ? __ldg(p_scales + (p_per_row ? pp : 0)) : 0.0f;  // never read past the edge
    if (Cfg::kSwapAB && bias != nullptr && pp < p_size) p_bias[h] = to_float(__ldg(bias + pp));
  }
#pragma unroll
  for (int j = 0; j < Cfg::kBlockQ / 8; ++j) {
    const int64_t qq = q0 + 8 * j;
    if (qq >= q_size) continue;  // the pair's first column (or token) is past the edge: so is the second
    const bool pair_q = qq + 1 < q_size;
    float q_scale[2], q_bias[2] = {0.0f, 0.0f};  // q_bias: the bias of channels qq, qq + 1 unless swapped
    q_scale[0] = __ldg(q_scales + (q_per_row ? qq : 0));
    q_scale[1] = pair_q ? __ldg(q_scales + (q_per_row ? qq + 1 : 0)) : 0.0f;
    if (!Cfg::kSwapAB && bias != nullptr) {
      q_bias[0] = to_float(__ldg(bias + qq));
      if (pair_q) q_bias[1] = to_float(__ldg(bias + qq + 1));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t pp = p0 + 8 * h;
      if (pp >= p_size) continue;
      float v[2] = {acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]};
      int64_t m[2], n[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        m[e] = Cfg::kSwapAB ? qq + e : pp;
        n[e] = Cfg::kSwapAB ? pp : qq + e;
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float sa = Cfg::kSwapAB ? q_scale[e] : p_scale[h], sb = Cfg::kSwapAB ? p_scale[h] : q_scale[e];
        v[e] = __fmul_rn(v[e], sa * sb);  // never contracted with the bias add into an FMA (the earlier rounding)
      }
      if (bias != nullptr) {  // bias[n[e]]: n = qq + e unless swapped, else pp
        v[0] += Cfg::kSwapAB ? p_bias[h] : q_bias[0];
        if (pair_q) v[1] += Cfg::kSwapAB ? p_bias[h] : q_bias[1];
      }
      OutT* dst = out + m[0] * p.out_stride + n[0];
      if (!Cfg::kSwapAB && pair_q && reinterpret_cast<uintptr_t>(dst) % (2 * sizeof(OutT)) == 0) {
        OutT two[2] = {to_out<OutT>(v[0]), to_out<OutT>(v[1])};
        *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(two);
      } else {
        *dst = to_out<OutT>(v[0]);
        if (pair_q) out[m[1] * p.out_stride + n[1]] = to_out<OutT>(v[1]);
      }
    }
  }
}

// Named barriers of the two consumer warpgroups (256 threads; id 1 is the split-K reduction's): the
// ping-pong order of their wgmma issues (Fp8GemmParams::pingpong).
constexpr int kPingBarrier = 2, kPongBarrier = 3;
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroup) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(2 * kWarpgroup) : "memory");
}

using tma::cluster_barrier;

// Split K (s.splits > 1, one unit per CTA, the tile's splits one cluster): both consumer warpgroups
// write their fp32 partial sums into this CTA's shared memory (the pipeline ring, drained: every TMA
// load has been consumed and every wgmma waited for), [kBlockP][kBlockQ + 1] (odd row stride: the
// column-wise reads below hit distinct banks); after a cluster barrier CTA `rank` sums elements
// rank, rank + splits, .. of the tile over the cluster's partials in rank order (deterministic),
// scales, adds the bias and stores; a second barrier keeps every CTA's shared memory alive until all
// have read it. Consecutive threads take consecutive output columns n (contiguous in out): rows P of
// the tile when operands are swapped (P = n), columns Q otherwise.
template <class Cfg, typename OutT>
__device__ __forceinline__ void reduce_split_k(const float (&acc)[Cfg::kBlockQ / 2], uint8_t* smem,
                                               const Fp8GemmParams& p, const Unit& w, int consumer, int splits) {
  constexpr int kStride = Cfg::kBlockQ + 1;
  static_assert(Cfg::kBlockP * kStride * 4 <= Cfg::kStages * Cfg::kStageBytes, "the partial tile fits the ring");
  float* tile = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x - kWarpgroup;  // 0 .. 255 over both consumer warpgroups
  asm volatile("bar.sync 1, %0;\n" ::"n"(Cfg::kConsumers * kWarpgroup) : "memory");  // both done with the ring
  const int lane = t % kWarpSize, warp = (t / kWarpSize) % 4;
#pragma unroll
  for (int j = 0; j < Cfg::kBlockQ / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = consumer * 64 + warp * 16 + lane / 4 + 8 * h, col = 8 * j + 2 * (lane % 4) + e;
        tile[row * kStride + col] = acc[4 * j + 2 * h + e];
      }
    }
  }
  cluster_barrier();
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  OutT* out = static_cast<OutT*>(p.out);
  const OutT* bias = static_cast<const OutT*>(p.bias);
  for (int idx = rank * Cfg::kConsumers * kWarpgroup + t; idx < Cfg::kBlockP * Cfg::kBlockQ;
       idx += splits * Cfg::kConsumers * kWarpgroup) {
    const int row = Cfg::kSwapAB ? idx % Cfg::kBlockP : idx / Cfg::kBlockQ;
    const int col = Cfg::kSwapAB ? idx / Cfg::kBlockP : idx % Cfg::kBlockQ;
    const int64_t pp = static_cast<int64_t>(w.p) * Cfg::kBlockP + row;
    const int64_t qq = static_cast<int64_t>(w.q) * Cfg::kBlockQ + col;
    const int64_t m = Cfg::kSwapAB ? qq : pp, n = Cfg::kSwapAB ? pp : qq;
    if (m >= p.M || n >= p.N) continue;
    float sum = 0.0f;
    for (int r = 0; r < splits; ++r) {
      sum += cluster.map_shared_rank(tile, r)[row * kStride + col];
    }
    float v = sum * p.scale_a[p.scale_a_per_token ? m : 0] * p.scale_b[p.scale_b_per_channel ? n : 0];
    if (bias != nullptr) v += to_float(bias[n]);
    out[m * p.out_stride + n] = to_out<OutT>(v);
  }
  cluster_barrier();
}

// The K loop of one unit with the promotion overlapped (Fp8GemmParams::overlap_promotion, 128-column
// tiles only: two 64-register accumulator sets beside acc). k-tiles alternate between `part` and
// `part2`: after issuing k-tile t, the warpgroup waits only for t - 1's group (wait_group 1), adds it
// into acc and releases its stage, while t runs on the tensor cores. The sums and their order are
// those of the serial loop (each k-tile's wgmma chain starts from zero and is added to acc in k order).
template <class Cfg, class Mma>
__device__ __forceinline__ void mainloop_overlapped(float (&acc)[Cfg::kBlockQ / 2], float (&part)[Mma::kRegs],
                                                    uint8_t* smem, uint64_t* full, uint64_t* empty, int& stage,
                                                    uint32_t& phase, const Unit& w, int consumer, int lane,
                                                    bool multicast, int peer) {
  static_assert(Cfg::kHalves == 1 && Mma::kRegs == Cfg::kBlockQ / 2, "one wgmma per k-step covers the tile");
  float part2[Mma::kRegs];
  // Issue k-tile (stage) into dst; returns the stage it used and advances the ring.
  auto issue = [&](float (&dst)[Mma::kRegs]) {
    wait_barrier(&full[stage], phase);
    const uint8_t* x = smem + stage * Cfg::kStageBytes + consumer * 64 * kBlockK;
    const uint8_t* y = smem + stage * Cfg::kStageBytes + Cfg::kXBytes;
    const uint64_t desc_x = smem_desc(x), desc_y = smem_desc(y);
#pragma unroll
    for (int i = 0; i < Mma::kRegs; ++i) wgmma::fence_operand(dst[i]);
    wgmma::fence();
#pragma unroll
    for (int k = 0; k < kBlockK / kMmaK; ++k) Mma::run(dst, desc_x + 2 * k, desc_y + 2 * k, k > 0);
    wgmma::commit_group();
    const int used = stage;
    if (++stage == Cfg::kStages) {
      stage = 0;
      phase ^= 1;
    }
    return used;
  };
  // After the wait: src's k-tile into acc, and its stage back to the producer.
  auto retire = [&](float (&src)[Mma::kRegs], int used) {
#pragma unroll
    for (int i = 0; i < Mma::kRegs; ++i) wgmma::fence_operand(src[i]);
#pragma unroll
    for (int i = 0; i < Mma::kRegs; ++i) acc[i] += src[i];
    release_stage(empty, used, multicast, peer, lane);
  };
  int kt = w.k_begin;
  if (kt == w.k_end) return;
  int pending = issue(part);  // k-tile k_begin in part
  for (++kt; kt + 1 < w.k_end; kt += 2) {  // two k-tiles per trip: the arrays' roles stay compile-time
    const int a = issue(part2);
    wgmma::wait_group<1>();
    retire(part, pending);
    pending = issue(part);
    wgmma::wait_group<1>();
    retire(part2, a);
  }
  if (kt < w.k_end) {  // one k-tile left: into part2, then both drained in order
    const int a = issue(part2);
    wgmma::wait_group<1>();
    retire(part, pending);
    wgmma::wait_group<0>();
    retire(part2, a);
  } else {
    wgmma::wait_group<0>();
    retire(part, pending);
  }
}

template <class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_y,
                    const Fp8GemmParams p, const Schedule s) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Mma = wgmma::MmaFp8<Cfg::kBlockQ / Cfg::kHalves>;  // one half's wgmma
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSwizzleAtom - 1) / kSwizzleAtom * kSwizzleAtom);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Cfg::kStages * Cfg::kStageBytes);
  uint64_t* empty = full + kMaxStages;
  const int warpgroup = threadIdx.x / kWarpgroup;
  const bool multicast = s.multicast != 0;  // uniform over the grid
  const Walk walk = make_walk(s);
  const int peer = walk.rank ^ 1;  // with multicast: the other CTA of the cluster

  if (threadIdx.x == 0) {
    for (int i = 0; i < Cfg::kStages; ++i) {
      ptx::mbarrier_init(&full[i], 1);  // the producer's arrive_expect_tx
      // One arrival per consumer warp, of this CTA and with multicast also of the peer.
      ptx::mbarrier_init(&empty[i], Cfg::kConsumers * 4 * (multicast ? 2 : 1));
    }
    ptx::fence_mbarrier_init(ptx::sem_release, ptx::scope_cluster);  // visible to the TMA unit (and the peer)
  }
  if (multicast) {
    cluster_barrier();  // both CTAs' barriers exist before either multicasts into or arrives on the other
  } else {
    __syncthreads();
  }

  if (warpgroup == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int u = walk.first; u < walk.count; u += walk.stride) {
        const Unit w = walk.unit(s, u);
        for (int kt = w.k_begin; kt < w.k_end; ++kt) {
          wait_barrier(&empty[stage], phase ^ 1);  // a fresh barrier counts as released once
          ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, &full[stage],
                                         static_cast<uint32_t>(Cfg::kStageBytes));
          uint8_t* x = smem + stage * Cfg::kStageBytes;
          const int32_t x_coords[2] = {kt * kBlockK, w.p * Cfg::kBlockP};
          const int32_t y_coords[2] = {kt * kBlockK, w.q * Cfg::kBlockQ};
          ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global, x, &map_x, x_coords, &full[stage]);
          if (multicast) {  // this CTA's half of the Y tile (map_y's box: kBlockQ / 2 rows), into both CTAs
            constexpr int kHalfRows = Cfg::kBlockQ / 2;
            const int32_t half_coords[2] = {kt * kBlockK, w.q * Cfg::kBlockQ + walk.rank * kHalfRows};
            ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global, x + Cfg::kXBytes + walk.rank * kHalfRows * kBlockK,
                                      &map_y, half_coords, &full[stage], static_cast<uint16_t>(0b11));
          } else {
            ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global, x + Cfg::kXBytes, &map_y, y_coords,
                                      &full[stage]);
          }
          if (++stage == Cfg::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    if (s.splits > 1) {  // the cluster barriers of the split-K reduction count every thread
      __syncwarp();
      cluster_barrier();
      cluster_barrier();
    }
    if (multicast) {  // the last barrier of a multicast kernel (below): every thread of both CTAs
      __syncwarp();
      cluster_barrier();
    }
    return;
  }

  // consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int consumer = warpgroup - 1;
  const int lane = threadIdx.x % kWarpSize;
  int stage = 0;
  uint32_t phase = 0;
  const bool pingpong = p.pingpong;  // uniform over the grid
  bool first_issue = true;
  float acc[Cfg::kBlockQ / 2], part[Mma::kRegs];
#pragma unroll
  for (int i = 0; i < Mma::kRegs; ++i) part[i] = 0.0f;
  for (int u = walk.first; u < walk.count; u += walk.stride) {
    const Unit w = walk.unit(s, u);
#pragma unroll
    for (int i = 0; i < Cfg::kBlockQ / 2; ++i) acc[i] = 0.0f;
    bool overlapped = false;
    if constexpr (Cfg::kHalves == 1) {
      if (p.overlap_promotion && !pingpong) {  // uniform over the grid
        mainloop_overlapped<Cfg, Mma>(acc, part, smem, full, empty, stage, phase, w, consumer, lane, multicast, peer);
        overlapped = true;
      }
    }
    if (!overlapped) {  // the serial loop: wait for each k-tile, then promote
      for (int kt = w.k_begin; kt < w.k_end; ++kt) {
        wait_barrier(&full[stage], phase);
        const uint8_t* x = smem + stage * Cfg::kStageBytes + consumer * 64 * kBlockK;
        const uint8_t* y = smem + stage * Cfg::kStageBytes + Cfg::kXBytes;
        const uint64_t desc_x = smem_desc(x), desc_y = smem_desc(y);
#pragma unroll
        for (int half = 0; half < Cfg::kHalves; ++half) {
          // Half h reads Y rows 128 h .. : 128 rows x 128 B = 16 KiB further, + 1024 in the >> 4 address.
          const uint64_t desc_y_half = desc_y + half * ((128 * kBlockK) >> 4);
#pragma unroll
          for (int i = 0; i < Mma::kRegs; ++i) wgmma::fence_operand(part[i]);
          // Ping-pong (p.pingpong): consumer 1 issues after consumer 0's issue of the same half, consumer 0
          // after consumer 1's previous one, so the tensor cores take one warpgroup's wgmmas, then the
          // other's, and each promotes while the other's run.
          if (pingpong) {
            if (consumer == 1) {
              named_barrier_sync(kPingBarrier);
            } else if (!first_issue) {
              named_barrier_sync(kPongBarrier);
            }
            first_issue = false;
          }
          wgmma::fence();
#pragma unroll
          for (int k = 0; k < kBlockK / kMmaK; ++k) {  // +32 bytes of K = +2 in the >> 4 address
            Mma::run(part, desc_x + 2 * k, desc_y_half + 2 * k, k > 0);
          }
          wgmma::commit_group();
          if (pingpong) named_barrier_arrive(consumer == 0 ? kPingBarrier : kPongBarrier);
          wgmma::wait_group<0>();
#pragma unroll
          for (int i = 0; i < Mma::kRegs; ++i) wgmma::fence_operand(part[i]);
          // Register 4 j + 2 h + e of a half is column 8 j + .. of it: acc's layout for the whole tile.
#pragma unroll
          for (int i = 0; i < Mma::kRegs; ++i) acc[half * Mma::kRegs + i] += part[i];
        }
        release_stage(empty, stage, multicast, peer, lane);
        if (++stage == Cfg::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    if (pingpong && consumer == 0 && u + walk.stride >= walk.count) {
      named_barrier_sync(kPongBarrier);  // consumer 1's last arrival: no barrier is left half-arrived
    }
    if (s.splits == 1) {
      epilogue<Cfg, OutT>(acc, p, w, consumer);
    } else {  // one unit per CTA: reduce the cluster's partial tiles (the loop runs once)
      reduce_split_k<Cfg, OutT>(acc, smem, p, w, consumer, s.splits);
    }
  }
  // Multicast: neither CTA exits while the other may still arrive on its barriers (the peer's last
  // releases) or write into its shared memory.
  if (multicast) {
    __syncwarp();
    cluster_barrier();
  }
#else
  __trap();  // built for sm_90a only; launch_fp8_gemm_sm90 never launches it elsewhere
#endif
}

// ---- host ----------------------------------------------------------------------------------------

// A [rows, K] e4m3 matrix read in [box_rows x 128-byte] boxes with 128-byte swizzle; rows and K
// beyond the matrix read as zeros (they add nothing to the dot products).
inline cudaError_t make_tensor_map(CUtensorMap* map, const void* ptr, int64_t rows, int K, int box_rows) {
  static_assert(kBlockK == 128, "one 128-byte swizzle row per k-tile");
  return tma::encode_rows_sw128(map, ptr, K, rows, K, box_rows);
}

// How many clusters of each size (2 .. kMaxSplits) can be resident at once for this kernel (one CTA
// per SM with its ring of shared memory; a cluster's CTAs share a GPC, and GPCs are uneven, so e.g.
// 132 SMs hold fewer than 132 / 8 clusters of 8), queried once per configuration; 0 = unschedulable.
struct ClusterLimits {
  int max_clusters[kMaxSplits + 1];
};

template <class Cfg, typename OutT>
const ClusterLimits& cluster_limits() {
  static const ClusterLimits limits = [] {
    ClusterLimits l{};
    auto* kernel = fp8_gemm_kernel<Cfg, OutT>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();
      return l;
    }
    for (int splits = 2; splits <= kMaxSplits; ++splits) {
      l.max_clusters[splits] = max_active_clusters(kernel, Cfg::kThreads, Cfg::kSmemBytes, splits);
    }
    return l;
  }();
  return limits;
}

// limits: nullptr (never split) or the resident-cluster counts. A split schedule has
// tiles * splits <= num_sms CTAs, one unit each, and at most as many clusters (tiles) as fit at once,
// so it runs in a single wave.
template <class Cfg>
Schedule make_schedule(const Fp8GemmParams& p, const ClusterLimits* limits) {
  const int64_t rows_x = Cfg::kSwapAB ? p.N : p.M, rows_y = Cfg::kSwapAB ? p.M : p.N;
  Schedule s;
  s.tiles_p = static_cast<int>(ceil_div<int64_t>(rows_x, Cfg::kBlockP));
  s.tiles_q = static_cast<int>(ceil_div<int64_t>(rows_y, Cfg::kBlockQ));
  s.k_tiles = ceil_div(p.K, kBlockK);
  const int tiles = s.tiles_p * s.tiles_q;
  const int by_sms = p.num_sms / tiles, by_k = s.k_tiles / kMinKTilesPerSplit;
  int splits = limits == nullptr ? 1 : std::max(1, std::min({by_sms, by_k, kMaxSplits}));
  while (splits > 1 && tiles > limits->max_clusters[splits]) --splits;
  s.splits = splits;
  s.multicast = 0;
  return s;
}

template <class Cfg, typename OutT>
cudaError_t run(const Fp8GemmParams& p, cudaStream_t stream) {
  // auto splits only M <= 16 by K >= 8192: on an H200 (bench/results/2026-11-28-h200-visit1) splitting
  // sped the down projection 14336 -> 4096 up by 2-6% at M 1 and 16, and slowed it by 4% at M 64,
  // qkv / o (K 4096) by 0-11% at M 1-16 and 28-40% at M 64.
  const bool split = p.split_k == kSplitKOn || (p.split_k == kSplitKAuto && p.M <= 16 && p.K >= 8192);
  Schedule s = make_schedule<Cfg>(p, split ? &cluster_limits<Cfg, OutT>() : nullptr);
  // Multicast (p.multicast): unswapped tiles only (swapped, Y is the few rows of activations: little to
  // share), no split, an even number of P-tiles (each cluster takes two), 2-CTA clusters resident, and
  // no Y half wholly past the matrix (the last Y tile's second half holds a row of it: every TMA box
  // of the kernel then overlaps the tensor, as without multicast).
  const int y_tail = p.N % Cfg::kBlockQ;
  const int pair_clusters = p.multicast && !Cfg::kSwapAB && s.splits == 1 && s.tiles_p % 2 == 0 &&
                                    (y_tail == 0 || y_tail > Cfg::kBlockQ / 2)
                                ? cluster_limits<Cfg, OutT>().max_clusters[2]
                                : 0;
  s.multicast = pair_clusters > 0 ? 1 : 0;
  CUtensorMap map_x, map_y;
  FI_CUDA_TRY(make_tensor_map(&map_x, Cfg::kSwapAB ? p.b : p.a, Cfg::kSwapAB ? p.N : p.M, p.K, Cfg::kBlockP));
  FI_CUDA_TRY(make_tensor_map(&map_y, Cfg::kSwapAB ? p.a : p.b, Cfg::kSwapAB ? p.M : p.N, p.K,
                              s.multicast ? Cfg::kBlockQ / 2 : Cfg::kBlockQ));
  auto* kernel = fp8_gemm_kernel<Cfg, OutT>;
  FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  // Persistent (one CTA per SM at most) without a split; one CTA per unit, clusters of `splits`, with;
  // persistent 2-CTA clusters, as many as are resident at once (GPCs are uneven), with multicast.
  const int grid = s.multicast    ? 2 * std::min(s.num_units() / 2, pair_clusters)
                   : s.splits > 1 ? s.num_units()
                                  : std::min(s.num_units(), p.num_sms);
  const int cluster = s.multicast ? 2 : s.splits;
  const ClusterLaunch launch(dim3(static_cast<unsigned>(grid)), Cfg::kThreads, Cfg::kSmemBytes, stream, cluster);
  FI_CUDA_TRY(cudaLaunchKernelEx(&launch.config, kernel, map_x, map_y, p, s));
  fp8_record_launch(Fp8LaunchInfo{Fp8LaunchInfo::kWgmma, Cfg::kBlockP, Cfg::kBlockQ, Cfg::kSwapAB, s.splits, grid, cluster,
                                  s.multicast != 0, s.num_units(), p.pingpong});
  return cudaSuccess;
}

// The tile shape for a problem: M <= 64 swaps (tokens on wgmma's N side, rounded up to 8/16/32/64),
// anything larger uses 128 x 128 tiles, or with p.wide_tiles 128 x 256 (each X tile feeds twice the
// columns: 3/4 of the L2 -> SM bytes per FLOP, for large GEMMs, where the 128 x 128 tiles' 1/64 byte
// per multiply-add needs ~10 TB/s from L2 at 1.27 PFLOP/s; same promotion, so the same accuracy;
// bench/bench_fp8.py shows which is faster). Calls fn.template operator()<Cfg>().
template <typename Fn>
cudaError_t with_config(const Fp8GemmParams& p, Fn&& fn) {
  if (p.M <= 8) return fn.template operator()<Config<8, true>>();
  if (p.M <= 16) return fn.template operator()<Config<16, true>>();
  if (p.M <= 32) return fn.template operator()<Config<32, true>>();
  if (p.M <= 64) return fn.template operator()<Config<64, true>>();
  if (p.wide_tiles) return fn.template operator()<Config<256, false>>();
  return fn.template operator()<Config<128, false>>();
}

}  // namespace fp8gemm

inline cudaError_t launch_fp8_gemm_sm90_impl(const Fp8GemmParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.K <= 0 || p.K % 16 || p.num_sms <= 0 || reinterpret_cast<uintptr_t>(p.a) % 16 ||
      reinterpret_cast<uintptr_t>(p.b) % 16) {
    return cudaErrorInvalidValue;
  }
  if (p.gemv && p.M <= kFp8GemvMaxM) {
    switch (p.out_dtype) {
      case DType::kBFloat16: return fp8gemv::run<__nv_bfloat16>(p, stream);
      case DType::kFloat16: return fp8gemv::run<__half>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  return fp8gemm::with_config(p, [&]<class Cfg>() {
    switch (p.out_dtype) {
      case DType::kBFloat16: return fp8gemm::run<Cfg, __nv_bfloat16>(p, stream);
      case DType::kFloat16: return fp8gemm::run<Cfg, __half>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace fastinfer
