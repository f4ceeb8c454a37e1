// W4A16 on Hopper's warpgroup MMA (sm_90a): out[M, N] = x[M, K] @ W^T for the prefill-sized and
// batched-decode M (17 .. a few hundred rows), where the mma.sync tile kernel (w4a16.cuh) is bound by
// its instruction stream rather than by bytes: on an H200 (bench/results visit 6) it ran gate_up
// 4096 -> 28672 at M = 64 and M = 256 at ~1200 SM cycles per 64-deep stage whatever M, ~200 TFLOP/s
// of bf16 mma, while wgmma's rate is ~4x mma.sync's at the same instruction count.
//
// Operands swapped, as in the GEMV kernel: D[64 weight columns x BN tokens] = W_strip[64 x K] . x^T,
// with the dequantized weights as wgmma's A operand *from registers* and x as B in shared memory
// (K-major: x's own rows, 128-byte swizzle). The packed layout (w4a16.h) needs no change: a lane's
// word i of a k16 step is exactly its m16n8k16 A fragment of rows 16 i .. 16 i + 15 of the strip
// (w4a16_small.cuh), and wgmma's register A is that fragment per warp (warp w of the warpgroup holds
// rows 16 w .. 16 w + 15), so warp w dequantizes word w of every lane (4 KiB of codes per strip and
// 64-k stage are read once per CTA; each word LDS.32 is a 4-way bank conflict, 16 wavefronts per warp
// and stage, far below the stage's tensor time).
//
// CTA: 3 warpgroups. Warpgroup 0 is the producer (one thread): per 64-k stage it waits for a free slot
// of the ring (`empty` mbarrier), then loads, all completing on the slot's `full` mbarrier:
//   x tile    TMA, BN tokens x 128 bytes, 128-byte swizzle; tokens past M read as zeros
//   codes     one bulk copy (cp.async.bulk) of 2 KiB per strip: 4 k16 steps, contiguous in the layout
//   params    the stage's group rows of scales (and zeros / mins), 128 bytes per strip each
// Warpgroups 1 and 2 own strips 0 and 1 of the CTA's 128 columns. Per stage each dequantizes its 4
// k16 steps' A fragments (16 registers, the magic-number trick of w4a16.cuh: (q - z) s or q s + m
// rounded once to T, the tile kernel's numbers) and issues 4 wgmma m64nBNk16 into fp32 accumulators;
// the next stage's fragments are dequantized into the other register set while those run
// (wgmma.wait_group 0 then releases the stage: its x tile is no longer read).
// BN = 64 (M <= 64, one row block) or 128 (larger M: ceil(M / 128) row blocks).
//
// Split K over a thread-block cluster of <= 8 CTAs along grid x when the output tiles cannot fill the
// SMs (as the tile kernel: gemm/split_plan.h prices it): after the K loop each CTA writes its fp32
// tile into its shared memory and the cluster sums the CTAs' tiles in rank order through distributed
// shared memory (deterministic; no workspace). Numerics: the tile kernel's dequantized weights, fp32
// accumulation in wgmma's order; results are not bitwise those of the mma.sync kernels.
// Off by default until measured (FASTINFER_INT4_KERNEL=wgmma).
#pragma once
#include <cuda/ptx>

#include "fastinfer/tma.cuh"
#define FASTINFER_W4A16_HELPERS_ONLY  // the tile kernel's helpers, not its dispatch (w4a16.cuh)
#include "fastinfer/gemm/w4a16.cuh"
#include "fastinfer/gemm/wgmma_16bit.cuh"
#include "fastinfer/gemm/wgmma_fp8.cuh"

namespace fastinfer {
namespace w4a16 {
namespace wg {

namespace ptx = cuda::ptx;

constexpr int kWarpgroup = 128;
constexpr int kThreads = 3 * kWarpgroup;              // producer + 2 consumer warpgroups
constexpr int kStrips = 2;                            // one per consumer warpgroup
constexpr int kTileN = kStrips * L::kStripN;          // 128 weight columns per CTA
constexpr int kStageK = 64;                           // k per stage: x rows of 128 bytes
constexpr int kSteps = kStageK / L::kStepK;           // 4 k16 steps per stage
constexpr int kCodeBytes = kSteps * L::kWordsPerStep * 4;  // 2 KiB per strip and stage
constexpr int kParamRowBytes = kTileN * 2;            // one group row for the CTA's 128 columns
constexpr int kMaxParamRows = 2;                      // group 32: two group rows per 64-k stage
constexpr int kStages = 6;
constexpr int kSwizzleAtom = 1024;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

template <int BN>
struct Cfg {
  static constexpr int kXBytes = BN * 128;                                     // first: atom-aligned
  static constexpr int kCodesOffset = kXBytes;
  static constexpr int kParamsOffset = kCodesOffset + kStrips * kCodeBytes;
  static constexpr int kOffsetsOffset = kParamsOffset + kMaxParamRows * kParamRowBytes;
  static constexpr int kStageBytes = kOffsetsOffset + kMaxParamRows * kParamRowBytes;
  static_assert(kStageBytes % kSwizzleAtom == 0, "every stage's x tile starts on a swizzle atom");
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kBarrierBytes = 2 * kStages * 8;
  static constexpr int kSmemBytes = kRingBytes + kBarrierBytes + kSwizzleAtom;  // + alignment slack
  static constexpr int kRedStride = BN + 1;  // fp32 split-K tile row (odd: the column-wise reads hit distinct banks)
  static_assert(kTileN * kRedStride * 4 <= kRingBytes, "the split-K tile reuses the ring");
};

struct Shape {
  int total_stages;  // K / 64
  int group_shift;   // log2(group_size)
};

using tma::cluster_barrier;
using tma::wait_barrier;

// A 32-bit shared-memory load at a shared-window address. volatile: it stays after the mbarrier wait
// that makes the stage's bytes visible (a plain C++ load through the aligned generic pointer compiled to
// generic LD.E, and nothing would keep it below the wait).
__device__ __forceinline__ uint32_t lds32(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(address) : "memory");
  return v;
}


// The A fragments (4 k16 steps x 4 registers) of this warp's 16 weight columns of its strip for one
// stage: word `warp` of each lane's 16 bytes, dequantized with the column's group parameters.
template <typename T, int BN, Int4Mode kMode>
__device__ __forceinline__ void dequant_stage(uint32_t (&a)[kSteps][4], uint32_t stage, int strip, int warp,
                                              int lane, int k0, int group_shift) {
  using C = Cfg<BN>;
  using T2 = typename Traits<T>::T2;
  const int g = lane / 4;
  const uint32_t codes = stage + C::kCodesOffset + strip * kCodeBytes + lane * 16 + warp * 4;
  const int first_row = k0 >> group_shift;
#pragma unroll
  for (int t = 0; t < kSteps; ++t) {
    const uint32_t word = lds32(codes + t * L::kWordsPerStep * 4);
    const int row = ((k0 + t * L::kStepK) >> group_shift) - first_row;  // 0, or 1 (group 32, steps 2-3)
    // Lane g's 8 parameters sit at positions 8 g .. 8 g + 7 of the strip (columns 8 j + g); this
    // warp's n8 tiles are j = 2 warp, 2 warp + 1: halves 0 and 1 of 32-bit word `warp`.
    const int param = row * kParamRowBytes + strip * (L::kStripN * 2) + g * 16 + warp * 4;
    const uint32_t scale_word = lds32(stage + C::kParamsOffset + param);
    uint32_t offset_word = 0;
    if constexpr (kMode != Int4Mode::kSymmetric) offset_word = lds32(stage + C::kOffsetsOffset + param);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g (h = 0) and g + 8 (h = 1) of the warp's m16 tile
      const T2 scale = as_pair<T2>(__byte_perm(scale_word, 0, h ? 0x3232 : 0x1010));
      T2 offset;
      if constexpr (kMode == Int4Mode::kSymmetric) {
        offset = as_pair<T2>(Traits<T>::kMagicSym);
      } else if constexpr (kMode == Int4Mode::kZeros) {  // magic + z, exact
        offset = __hadd2(as_pair<T2>(__byte_perm(offset_word, 0, h ? 0x3232 : 0x1010)), as_pair<T2>(Traits<T>::kMagic));
      } else {
        offset = as_pair<T2>(__byte_perm(offset_word, 0, h ? 0x3232 : 0x1010));
      }
      a[t][h] = dequant_pair<T, kMode>(word >> (8 * h), scale, offset);          // k 2c, 2c+1
      a[t][2 + h] = dequant_pair<T, kMode>(word >> (8 * h + 4), scale, offset);  // k 2c+8, 2c+9
    }
  }
}

// grid (splits, row blocks, N / 128 rounded up), clusters of `splits` along x.
template <typename T, int BN, Int4Mode kMode>
__global__ void __launch_bounds__(kThreads, 1)
    w4a16_wgmma_kernel(const __grid_constant__ CUtensorMap map_x, const W4A16Params p, const Shape shape) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BN>;
  constexpr bool kHasOffsets = kMode != Int4Mode::kSymmetric;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSwizzleAtom - 1) / kSwizzleAtom * kSwizzleAtom);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kRingBytes);
  uint64_t* empty = full + kStages;
  const int warpgroup = threadIdx.x / kWarpgroup;
  const int split = blockIdx.x, splits = gridDim.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int n0 = blockIdx.z * kTileN;
  const int strips = min(kStrips, (p.n - n0) / L::kStripN);  // 1 for the last tile when N / 64 is odd
  const int stage_begin = static_cast<int>(static_cast<int64_t>(split) * shape.total_stages / splits);
  const int stage_end = static_cast<int>(static_cast<int64_t>(split + 1) * shape.total_stages / splits);
  const int num_iters = stage_end - stage_begin;  // >= 1: the launcher keeps splits <= total stages

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      ptx::mbarrier_init(&full[i], 1);   // the producer's arrive_expect_tx
      ptx::mbarrier_init(&empty[i], 8);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init(ptx::sem_release, ptx::scope_cluster);
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      const int k_steps = p.k / L::kStepK;
      const int param_rows = max(1, kStageK >> shape.group_shift);
      const uint32_t param_bytes = static_cast<uint32_t>(strips * L::kStripN * 2);
      const uint32_t bytes = static_cast<uint32_t>(C::kXBytes + strips * kCodeBytes) +
                             static_cast<uint32_t>(param_rows) * param_bytes * (kHasOffsets ? 2u : 1u);
      const uint8_t* scales = static_cast<const uint8_t*>(p.scales);
      const uint8_t* offsets = static_cast<const uint8_t*>(p.offsets);
      int stage = 0;
      uint32_t phase = 0;
      for (int it = 0; it < num_iters; ++it) {
        const int gs = stage_begin + it;  // global 64-k stage
        wait_barrier(&empty[stage], phase ^ 1);  // a fresh barrier counts as released once
        uint8_t* dst = smem + stage * C::kStageBytes;
        ptx::mbarrier_arrive_expect_tx(ptx::sem_release, ptx::scope_cta, ptx::space_shared, &full[stage], bytes);
        const int32_t x_coords[2] = {gs * kStageK * 2, static_cast<int32_t>(m0)};  // bytes of K, token row
        ptx::cp_async_bulk_tensor(ptx::space_cluster, ptx::space_global, dst, &map_x, x_coords, &full[stage]);
        for (int s = 0; s < strips; ++s) {
          const uint32_t* src = p.qweight + (static_cast<int64_t>(n0 / L::kStripN + s) * k_steps + gs * kSteps) *
                                                L::kWordsPerStep;
          ptx::cp_async_bulk(ptx::space_cluster, ptx::space_global, dst + C::kCodesOffset + s * kCodeBytes, src,
                             static_cast<uint32_t>(kCodeBytes), &full[stage]);
        }
        const int first_row = (gs * kStageK) >> shape.group_shift;
        for (int r = 0; r < param_rows; ++r) {
          const int64_t at = (static_cast<int64_t>(first_row + r) * p.n + n0) * 2;
          ptx::cp_async_bulk(ptx::space_cluster, ptx::space_global, dst + C::kParamsOffset + r * kParamRowBytes,
                             scales + at, param_bytes, &full[stage]);
          if constexpr (kHasOffsets) {
            ptx::cp_async_bulk(ptx::space_cluster, ptx::space_global, dst + C::kOffsetsOffset + r * kParamRowBytes,
                               offsets + at, param_bytes, &full[stage]);
          }
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    if (splits > 1) {  // the split-K reduction's cluster barriers count every thread
      __syncwarp();
      cluster_barrier();
      cluster_barrier();
    }
    return;
  }

  // ---- consumers: warpgroup 1 + strip ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int strip = warpgroup - 1;
  const int warp = (threadIdx.x / kWarpSize) % 4, lane = threadIdx.x % kWarpSize;
  float acc[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  uint32_t a0[kSteps][4], a1[kSteps][4];

  int stage = 0;
  uint32_t phase = 0;
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  auto stage_ptr = [&](int s) { return ring + static_cast<uint32_t>(s * C::kStageBytes); };
  // Issue the 4 wgmmas of the stage `s` with A fragments `a`.
  auto issue = [&](uint32_t (&a)[kSteps][4], int s) {
    const uint64_t desc = wgmma::smem_desc_sw128(stage_ptr(s), 16, kSwizzleAtom);
    wgmma::fence_operands(acc);
    wgmma::fence_operands(a);
    wgmma::fence();
#pragma unroll
    for (int t = 0; t < kSteps; ++t) wgmma::mma_rs<BN, T>(acc, a[t], desc + 2 * t, 1);  // +32 bytes of K
    wgmma::commit_group();
  };
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) ptx::mbarrier_arrive(&empty[s]);
  };
  auto advance = [&] {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  };

  // Stage it's fragments are dequantized while stage it - 1's wgmmas run. Two trips per loop pass keep
  // the register sets' roles compile-time (a0: even iterations, a1: odd).
  wait_barrier(&full[stage], phase);
  // Iteration it: issue its wgmmas (fragments in `cur`), dequantize iteration it + 1 into `next` while
  // they run, then wait for them and release their stage.
  auto iteration = [&](int it, uint32_t (&cur)[kSteps][4], uint32_t (&next)[kSteps][4]) {
    const int s = stage;
    issue(cur, s);
    advance();
    if (it + 1 < num_iters) {
      wait_barrier(&full[stage], phase);
      dequant_stage<T, BN, kMode>(next, stage_ptr(stage), strip, warp, lane, (stage_begin + it + 1) * kStageK,
                                  shape.group_shift);
    }
    wgmma::wait_group<0>();
    wgmma::fence_operands(acc);
    release(s);
  };
  dequant_stage<T, BN, kMode>(a0, stage_ptr(stage), strip, warp, lane, stage_begin * kStageK, shape.group_shift);
  for (int it = 0; it < num_iters; it += 2) {
    iteration(it, a0, a1);
    if (it + 1 < num_iters) iteration(it + 1, a1, a0);
  }

  // acc[j][2 h + e]: weight column 16 warp + lane / 4 + 8 h of the strip, token 8 j + 2 (lane % 4) + e.
  T* out = static_cast<T*>(p.out);
  const int g = lane / 4, c = lane % 4;
  if (splits == 1) {
    if (strip < strips) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          const int h = e4 / 2, e = e4 % 2;
          const int64_t m = m0 + 8 * j + 2 * c + e;
          const int n = n0 + strip * L::kStripN + 16 * warp + g + 8 * h;
          if (m < p.m) out[m * p.out_stride + n] = from_float<T>(acc[j][e4]);
        }
      }
    }
    return;
  }

  // ---- split K: fp32 tiles -> shared memory (the drained ring) -> summed over the cluster ----
  float* tile = reinterpret_cast<float*>(smem);  // [128 columns][kRedStride]
  asm volatile("bar.sync 1, %0;\n" ::"n"(2 * kWarpgroup) : "memory");  // both consumers are done with the ring
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int e4 = 0; e4 < 4; ++e4) {
      const int h = e4 / 2, e = e4 % 2;
      tile[(strip * L::kStripN + 16 * warp + g + 8 * h) * C::kRedStride + 8 * j + 2 * c + e] = acc[j][e4];
    }
  }
  __syncwarp();
  cluster_barrier();
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int t = threadIdx.x - kWarpgroup;  // 0 .. 255
  const int cols = strips * L::kStripN;
  // Consecutive threads take consecutive columns n of one token row (contiguous in out).
  for (int idx = rank * 2 * kWarpgroup + t; idx < BN * kTileN; idx += splits * 2 * kWarpgroup) {
    const int token = idx / kTileN, col = idx % kTileN;
    const int64_t m = m0 + token;
    if (col >= cols || m >= p.m) continue;
    float sum = 0.0f;
    for (int r = 0; r < splits; ++r) sum += cluster.map_shared_rank(tile, r)[col * C::kRedStride + token];
    out[m * p.out_stride + n0 + col] = from_float<T>(sum);
  }
  __syncwarp();
  cluster_barrier();
#else
  __trap();  // built for sm_90a only
#endif
}

// ---- host ----------------------------------------------------------------------------------------

// x [M, K] (16-bit, rows x_stride elements apart) as bytes: [BN rows x 128 bytes] boxes, 128-byte swizzle,
// rows past M (and nothing else: K % 64 == 0) read as zeros.
inline cudaError_t make_x_map(CUtensorMap* map, const W4A16Params& p, int box_rows) {
  static_assert(kStageK * 2 == 128, "one 128-byte swizzle row of x per stage");
  if (reinterpret_cast<uintptr_t>(p.x) % 16 != 0 || p.x_stride < p.k) return cudaErrorInvalidValue;
  return tma::encode_rows_sw128(map, p.x, static_cast<int64_t>(p.k) * 2, p.m, p.x_stride * 2, box_rows);
}

template <typename T, int BN, Int4Mode kMode>
cudaError_t launch(const W4A16Params& p, cudaStream_t stream) {
  using C = Cfg<BN>;
  auto* kernel = w4a16_wgmma_kernel<T, BN, kMode>;
  static Occupancy occ{};
  static std::atomic<int> state{0};  // 0: not queried, 1: ready
  if (state.load(std::memory_order_acquire) == 0) {
    Occupancy fresh{};
    FI_CUDA_TRY(query_kernel_occupancy(kernel, kThreads, C::kSmemBytes, &fresh));
    occ = fresh;
    state.store(1, std::memory_order_release);
  } else {
    FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  }
  const int64_t m_blocks = ceil_div<int64_t>(p.m, BN);
  if (m_blocks > 65535) return cudaErrorInvalidValue;  // grid.y
  const int n_tiles = ceil_div(p.n, kTileN);
  if (n_tiles > 65535) return cudaErrorInvalidValue;  // grid.z
  const int64_t tiles = static_cast<int64_t>(n_tiles) * m_blocks;
  const int64_t slots = static_cast<int64_t>(p.num_sms) * (occ.blocks_per_sm > 0 ? occ.blocks_per_sm : 1);
  const Shape shape{p.k / kStageK, __builtin_ctz(p.group_size)};
  const split_plan::Residency r = residency(occ, p.num_sms);
  // The tile kernel's rule (w4a16.cuh launch_tiles): split only while the tiles leave CTA slots idle,
  // into at most slots / tiles CTAs, priced in waves of resident clusters x (stages + overhead).
  const int bound = tiles >= slots ? 1 : static_cast<int>(std::min<int64_t>(kMaxSplits, slots / tiles));
  const split_plan::Plan plan = split_plan::choose_splits(tiles, shape.total_stages, 1, p.split_overhead_rounds, r,
                                                          p.waves_by_clusters, bound);
  const int splits = std::max(1, std::min(plan.splits, shape.total_stages));
  CUtensorMap map_x;
  FI_CUDA_TRY(make_x_map(&map_x, p, BN));
  const ClusterLaunch launch(dim3(static_cast<unsigned>(splits), static_cast<unsigned>(m_blocks),
                                  static_cast<unsigned>(n_tiles)),
                             kThreads, C::kSmemBytes, stream, splits);
  FI_CUDA_TRY(cudaLaunchKernelEx(&launch.config, kernel, map_x, p, shape));
  record_launch(launch_info(Int4LaunchInfo::kWgmma, splits, plan.waves, tiles, shape.total_stages, 1, r));
  return cudaSuccess;
}

template <typename T, Int4Mode kMode>
cudaError_t launch_mode(const W4A16Params& p, cudaStream_t stream) {
  return p.m <= 64 ? launch<T, 64, kMode>(p, stream) : launch<T, 128, kMode>(p, stream);
}

}  // namespace wg
}  // namespace w4a16

inline cudaError_t launch_w4a16_wgmma_impl(const W4A16Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16:
      switch (p.mode) {
        case Int4Mode::kSymmetric: return w4a16::wg::launch_mode<__half, Int4Mode::kSymmetric>(p, stream);
        case Int4Mode::kZeros: return w4a16::wg::launch_mode<__half, Int4Mode::kZeros>(p, stream);
        case Int4Mode::kMins: return w4a16::wg::launch_mode<__half, Int4Mode::kMins>(p, stream);
      }
      break;
    case DType::kBFloat16:
      switch (p.mode) {
        case Int4Mode::kSymmetric: return w4a16::wg::launch_mode<__nv_bfloat16, Int4Mode::kSymmetric>(p, stream);
        case Int4Mode::kZeros: return w4a16::wg::launch_mode<__nv_bfloat16, Int4Mode::kZeros>(p, stream);
        case Int4Mode::kMins: return w4a16::wg::launch_mode<__nv_bfloat16, Int4Mode::kMins>(p, stream);
      }
      break;
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastinfer
