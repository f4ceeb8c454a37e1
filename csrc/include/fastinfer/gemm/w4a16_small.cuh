// W4A16 for decode-sized M (1..16 rows of x): the GEMV formulation of the same packed weights.
//
// Why a second kernel. The tile kernel (w4a16.cuh) stages 4 KiB of codes per CTA per pipeline
// stage through shared memory with a barrier per stage and multiplies x as the 16-row A operand, so
// at M = 1 fifteen of the sixteen rows of every mma are padding. On an H200 it read the
// down-projection's 4-bit bytes at 24% of copy bandwidth (31 us at M = 1..16, bf16 cuBLAS 41 us;
// bench/results/2026-11-28-h200-visit2). This kernel is the dense GEMV's design (gemm/gemv.cuh)
// applied to 4-bit codes:
//
// - Operands swapped: out^T = W x^T. The dequantized weights are the mma's A operand (16 output
//   columns), x^T the B operand (8 tokens per n8 tile, NT tiles: M <= 8 -> 1, <= 16 -> 2). The
//   packed layout needs no change: a lane's B fragments of n8 tiles 2i and 2i + 1 (registers b0, b1
//   of each) are exactly its A fragment of the m16 tile i = {b0(2i), b0(2i+1), b1(2i), b1(2i+1)}.
//   Half the mmas of the tile kernel at M <= 8.
// - No shared-memory staging and no barrier in the K loop. A warp owns one chunk of kChunk
//   consecutive k16 steps of its CTA's strip at a time (kChunk x 512 contiguous bytes) and issues all
//   of the chunk's loads (codes: ld.global.nc.L1::no_allocate, 16 bytes a lane a step; the chunk's
//   group parameters and x: ld.global.nc through L1) before its first mma. The 8 warps of a CTA take
//   consecutive chunks, so a CTA reads 8 x kChunk x 512 contiguous bytes per round.
// - Group parameters are loaded once per pair of steps (32 k: the smallest group), so the code
//   needs no group-size template: for groups 64 / 128 the repeated loads hit the same L1 line.
//   With kDeferScales (auto's choice) they are loaded where a group's sums are scaled instead.
// - Split-K over a thread-block cluster (S <= 8 CTAs on one strip), reduced through distributed
//   shared memory in a fixed order as in the tile kernel: deterministic, no workspace. S minimizes
//   waves x (rounds of chunks per CTA + one round for the CTA's start and reduction).
//
// Measured (H200, bench/results visits 4-6): at M = 1 qkv 13.0-13.5 us, o 13.5-13.8, down 26-28,
// gate_up 34.0 (1.5-2.0x bf16 cuBLAS); the tile kernel is faster from M = 9 on. Neither register
// double buffering nor the deferred scales' halving of the executed instructions made it faster;
// the per-CTA overhead term in the split rule did (gate_up 44.7 -> 34.0 us). bench/PERF_NOTES.md.
#pragma once

namespace fastinfer {
namespace w4a16 {
namespace small {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRedStride = L::kStripN + 4;  // fp32 partial tile row (one token): +4 spreads lanes over banks

template <int NT, bool kDeferScales = false>
struct SmallConfig {
  static constexpr int kTokens = 8 * NT;
  // k16 steps a warp loads before it computes (deferred scales at NT = 2: 2, the sums' registers)
  static constexpr int kChunk = NT == 1 ? 8 : (kDeferScales ? 2 : 4);
  static constexpr int kPairs = kChunk / 2;       // group-parameter loads per chunk (one per 32 k)
  static constexpr int kSliceFloats = kTokens * kRedStride;
  static constexpr int kSmemBytes = kWarps * kSliceFloats * 4;
};

// kDeferScales: the mma multiplies x by the biased codes (magic + q, one LOP3 per pair, exact in T)
// instead of dequantized weights, and the group's parameters are applied to the fp32 sums once per
// group (or per chunk, whichever ends first): with s, z, m of a column and X = the sum of x over the
// group's k (one extra mma by an all-ones A),
//   sum x w = s (sum x (magic + q) - (magic + z) X)          zeros (symmetric: z = 8)
//   sum x w = s (sum x (magic + q) - magic X) + m X           mins
// Half the dequantization instructions per weight, and no rounding of w to T (the fp32 sums carry
// the magic offset: 128 (bf16) or 1024 (fp16) times X, far inside fp32's precision).
//
// strip_sums is the K loop and the sum over the CTA's warps, for one strip and a range of its chunks;
// w4a16_small_kernel (split-K over a cluster) and w4a16_streamk_kernel (below) differ in how they cut
// the work and combine the pieces. The sums of the strip's tokens m0 .. m0 + kTokens - 1 end in slice
// 0 of red, red[token * kRedStride + col]; the caller synchronizes before reading them (or before
// strip_sums runs again).
template <typename T, int NT, Int4Mode kMode, bool kDeferScales>
__device__ __forceinline__ void strip_sums(const W4A16Params& p, const int group_shift, const int strip,
                                           const int64_t m0, const int chunk_begin, const int chunk_end, float* red) {
  using Cfg = SmallConfig<NT, kDeferScales>;
  using T2 = typename Traits<T>::T2;
  constexpr bool kHasOffsets = kMode != Int4Mode::kSymmetric;
  constexpr int kChunk = Cfg::kChunk;

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int k_steps = p.k / L::kStepK;

  const uint32_t* codes_base = p.qweight + static_cast<int64_t>(strip) * k_steps * L::kWordsPerStep + lane * L::kWordsPerLane;
  const T* scales = static_cast<const T*>(p.scales) + strip * L::kStripN + 8 * g;  // + group * N
  const T* offsets = static_cast<const T*>(p.offsets) + strip * L::kStripN + 8 * g;
  const T* x = static_cast<const T*>(p.x);
  const T* x_row[NT];
  bool x_valid[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t token = m0 + nt * 8 + g;
    x_valid[nt] = token < p.m;
    x_row[nt] = x + (x_valid[nt] ? token : 0) * p.x_stride + 2 * c;
  }

  float acc[NT][4][4];
  float raw[NT][4][4];  // kDeferScales: the current group's sums of x (magic + q)
  float xsum[NT][4];    // kDeferScales: the current group's sums of x (every row the same)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][i][e] = raw[nt][i][e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) xsum[nt][e] = 0.0f;
  }
  const int group_steps = (1 << group_shift) / L::kStepK;  // 2, 4 or 8 k16 steps per group
  const uint32_t ones[4] = {Traits<T>::kOnes, Traits<T>::kOnes, Traits<T>::kOnes, Traits<T>::kOnes};
  // Group row of `step`'s scales and offsets (zeros or minimums; 0 without): 8 per lane, one 16-byte load each.
  auto load_group = [&](int step, uint4& scale8, uint4& offset8) {
    const int64_t group_off = ((static_cast<int64_t>(step) * L::kStepK) >> group_shift) * p.n;
    scale8 = load_shared_input(scales + group_off);
    offset8 = kHasOffsets ? load_shared_input(offsets + group_off) : make_uint4(0, 0, 0, 0);
  };

  for (int chunk = chunk_begin + warp; chunk < chunk_end; chunk += kWarps) {
    const int step0 = chunk * kChunk;
    uint4 codes[kChunk];
    uint4 scale8[Cfg::kPairs], offset8[Cfg::kPairs];
    uint32_t xb[kChunk][NT][2];
    // ---- every load of the chunk first ----
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int step = step0 + u;
      const bool live = step < k_steps;  // only the last chunk of K can be partial (K % 64 == 0)
      codes[u] = live ? load_stream(codes_base + static_cast<int64_t>(step) * L::kWordsPerStep) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* src = x_row[nt] + step * L::kStepK;
        xb[u][nt][0] = live && x_valid[nt] ? load_shared_input4(src) : 0u;
        xb[u][nt][1] = live && x_valid[nt] ? load_shared_input4(src + 8) : 0u;
      }
    }
    if constexpr (!kDeferScales) {  // (deferred: loaded where a group's sums are scaled, fewer live registers)
#pragma unroll
      for (int q = 0; q < Cfg::kPairs; ++q) load_group(min(step0 + 2 * q, k_steps - 1), scale8[q], offset8[q]);
    }
    // ---- then its mmas ----
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      if (step0 + u >= k_steps) break;  // warp-uniform
      const uint32_t words[4] = {codes[u].x, codes[u].y, codes[u].z, codes[u].w};
      if constexpr (kDeferScales) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            a[h] = and_or<0x000f000fu, Traits<T>::kMagic>(words[i] >> (8 * h));          // magic + q, exact
            a[2 + h] = and_or<0x000f000fu, Traits<T>::kMagic>(words[i] >> (8 * h + 4));
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816<T>(raw[nt][i], a, xb[u][nt][0], xb[u][nt][1]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16816<T>(xsum[nt], ones, xb[u][nt][0], xb[u][nt][1]);
        // The group (or this warp's run of consecutive steps) ends here: apply its parameters.
        const int step = step0 + u;
        if (u == kChunk - 1 || (step + 1) % group_steps == 0 || step + 1 == k_steps) {  // warp-uniform
          constexpr float kMagicValue = Traits<T>::kMagicValue;
          uint4 gs8, go8;
          load_group(step, gs8, go8);
          const uint32_t scale_words[4] = {gs8.x, gs8.y, gs8.z, gs8.w};
          const uint32_t offset_words[4] = {go8.x, go8.y, go8.z, go8.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int j = 2 * i + (e >= 2 ? 1 : 0);  // n8 tile: the column's scale / offset index
              const T2 s2 = as_pair<T2>(broadcast_half(scale_words, j));
              const float sc = to_float(s2.x);
              float bias;  // what the sums of x (magic + q) carry beyond q - z (times X), or m - magic s
              if constexpr (kMode == Int4Mode::kSymmetric) {
                bias = -(kMagicValue + 8.0f) * sc;
              } else if constexpr (kMode == Int4Mode::kZeros) {
                bias = -(kMagicValue + to_float(as_pair<T2>(broadcast_half(offset_words, j)).x)) * sc;
              } else {
                bias = to_float(as_pair<T2>(broadcast_half(offset_words, j)).x) - kMagicValue * sc;
              }
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) {
                const float xs = xsum[nt][e & 1];
                acc[nt][i][e] = fmaf(sc, raw[nt][i][e], fmaf(bias, xs, acc[nt][i][e]));
                raw[nt][i][e] = 0.0f;
              }
            }
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) xsum[nt][e] = 0.0f;
        }
      } else {
        const uint4 s8 = scale8[u / 2], o8 = offset8[u / 2];
        const uint32_t scale_words[4] = {s8.x, s8.y, s8.z, s8.w};
        const uint32_t offset_words[4] = {o8.x, o8.y, o8.z, o8.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // m16 tile i: strip columns 16 i .. 16 i + 15 = n8 tiles 2i, 2i + 1
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = 2 * i + h;
            const T2 scale = as_pair<T2>(broadcast_half(scale_words, j));
            T2 offset;
            if constexpr (kMode == Int4Mode::kSymmetric) {
              offset = as_pair<T2>(Traits<T>::kMagicSym);
            } else if constexpr (kMode == Int4Mode::kZeros) {
              offset = __hadd2(as_pair<T2>(broadcast_half(offset_words, j)), as_pair<T2>(Traits<T>::kMagic));
            } else {
              offset = as_pair<T2>(broadcast_half(offset_words, j));
            }
            a[h] = dequant_pair<T, kMode>(words[i] >> (8 * h), scale, offset);          // rows g (+8 h), k 2c, 2c+1
            a[2 + h] = dequant_pair<T, kMode>(words[i] >> (8 * h + 4), scale, offset);  // k 2c+8, 2c+9
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816<T>(acc[nt][i], a, xb[u][nt][0], xb[u][nt][1]);
        }
      }
    }
  }

  // ---- the 8 warps' k-partials -> slice 0, in warp order ----
  float* slice = red + warp * Cfg::kSliceFloats;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 16 * i + g + (e >= 2 ? 8 : 0), token = nt * 8 + 2 * c + (e & 1);
        slice[token * kRedStride + col] = acc[nt][i][e];
      }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Cfg::kTokens * L::kStripN; idx += kThreads) {
    const int at = (idx / L::kStripN) * kRedStride + idx % L::kStripN;
    float sum = red[at];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += red[w * Cfg::kSliceFloats + at];
    red[at] = sum;  // each element has one owner thread: no hazard
  }
}

template <typename T, int NT, Int4Mode kMode, bool kDeferScales>
__global__ void __launch_bounds__(kThreads, 2) w4a16_small_kernel(const W4A16Params p, const int group_shift) {
  using Cfg = SmallConfig<NT, kDeferScales>;
  extern __shared__ __align__(16) float red[];
  const int split = blockIdx.x, num_splits = gridDim.x, strip = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * Cfg::kTokens;
  const int k_steps = p.k / L::kStepK;
  const int chunks = (k_steps + Cfg::kChunk - 1) / Cfg::kChunk;
  const int chunk_begin = static_cast<int>(static_cast<int64_t>(split) * chunks / num_splits);
  const int chunk_end = static_cast<int>(static_cast<int64_t>(split + 1) * chunks / num_splits);
  strip_sums<T, NT, kMode, kDeferScales>(p, group_shift, strip, m0, chunk_begin, chunk_end, red);

  // ---- the cluster's split-K partials -> out ----
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  const int tokens = static_cast<int>(min(static_cast<int64_t>(Cfg::kTokens), p.m - m0));
  T* out = static_cast<T*>(p.out) + m0 * p.out_stride + strip * L::kStripN;
  for (int idx = rank * kThreads + static_cast<int>(threadIdx.x); idx < tokens * L::kStripN; idx += num_splits * kThreads) {
    const int token = idx / L::kStripN, col = idx % L::kStripN;
    float sum = 0.0f;
    for (int r = 0; r < num_splits; ++r) sum += cluster.map_shared_rank(red, r)[token * kRedStride + col];
    out[token * p.out_stride + col] = from_float<T>(sum);
  }
  cluster.sync();  // no CTA leaves while another still reads its shared memory
}

// Occupancy and cluster facts of one instantiation, queried once per process (see launch_tiles).
template <typename T, int NT, Int4Mode kMode, bool kDeferScales>
cudaError_t query_small(Occupancy* occ) {
  return query_kernel_occupancy(w4a16_small_kernel<T, NT, kMode, kDeferScales>, kThreads,
                                SmallConfig<NT, kDeferScales>::kSmemBytes, occ);
}

// Splits of K per strip: split_plan::choose_splits over strips x row blocks, chunks in rounds of one
// chunk per warp, overhead_rounds (W4A16Params::split_overhead_rounds, FASTINFER_INT4_SPLITS) for a
// CTA's start and its reduction epilogue. With 0, gate_up (448 strips, 32 chunks) at M = 1 ran 1792
// CTAs of one round each (7 waves; visit 4: 44 us, the tile kernel 40); with 1 it runs 448 CTAs of 4
// rounds.

template <typename T, int NT, Int4Mode kMode, bool kDeferScales>
cudaError_t launch_small(const W4A16Params& p, cudaStream_t stream) {
  using Cfg = SmallConfig<NT, kDeferScales>;
  static Occupancy occ{};
  static std::atomic<int> state{0};
  if (state.load(std::memory_order_acquire) == 0) {
    Occupancy fresh{};
    FI_CUDA_TRY((query_small<T, NT, kMode, kDeferScales>(&fresh)));
    occ = fresh;
    state.store(1, std::memory_order_release);
  } else if (Cfg::kSmemBytes > 48 * 1024) {
    FI_CUDA_TRY((cudaFuncSetAttribute(w4a16_small_kernel<T, NT, kMode, kDeferScales>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::kSmemBytes)));
  }
  const int strips = p.n / L::kStripN;
  const int64_t m_blocks = ceil_div<int64_t>(p.m, Cfg::kTokens);
  if (m_blocks > 65535 || strips > 65535) return cudaErrorInvalidValue;
  const int chunks = ceil_div(p.k / L::kStepK, Cfg::kChunk);
  const int64_t units = static_cast<int64_t>(strips) * m_blocks;
  const split_plan::Residency r = residency(occ, p.num_sms);
  const split_plan::Plan plan =
      split_plan::choose_splits(units, chunks, kWarps, p.split_overhead_rounds, r, p.waves_by_clusters);
  const int splits = plan.splits;
  ClusterLaunch launch(dim3(splits, strips, static_cast<unsigned>(m_blocks)), kThreads, Cfg::kSmemBytes, stream, splits);
  launch.config.numAttrs = 1;  // a cluster launch even for 1 split: the kernel's cluster.sync() always runs
  FI_CUDA_TRY(cudaLaunchKernelEx(&launch.config, w4a16_small_kernel<T, NT, kMode, kDeferScales>, p,
                                 __builtin_ctz(p.group_size)));
  record_launch(launch_info(Int4LaunchInfo::kSmall, splits, plan.waves, units, chunks, kWarps, r));
  return cudaSuccess;
}

// ---- stream-K (FASTINFER_INT4_KERNEL=small_streamk; M <= 8, deferred scales) ----------------------
//
// Why. The split rule above prices whole waves: gate_up at M = 1 (448 strips of 32 chunks) runs 448
// CTAs of 4 rounds on 264 slots, 2 waves, the second 70% full: 10 round-times for 6.8 of work. Here a
// grid of one CTA per slot cuts the strips' chunks, in strip order, into equal contiguous ranges,
// one per CTA, so every slot streams the same number of bytes whatever the shape.
//
// A range covers the tail of one strip, whole strips, and the head of another. A strip wholly
// inside a range is stored by its CTA. A strip cut between CTAs first .. last: each of them writes
// its piece to the workspace (partials[cta][0] for the piece that begins its range, [1] for the one
// that ends it: a CTA has at most one of each), fences, and counts itself on counters[first] (no
// other cut strip begins in that CTA's range); the last to arrive, which then knows every piece is
// written, adds them in CTA order (deterministic) and stores, as the decode kernels' fused merge does
// (attention/decode_work.cuh: merge_if_last). No CTA ever waits for another, so the grid needs no
// co-residency, and atomicInc's wrap leaves every counter at 0 for the next launch (a captured graph
// replays with no memset). The fp32 sums go through L2 twice more per cut strip (2 KiB a piece).
//
// Workspace: W4A16Params::streamk_partials (2 pieces of kTokens x 64 fp32 per CTA) and
// streamk_counters (unsigned per CTA, zero at rest), for up to streamk_capacity CTAs; one launch at a
// time may use them (the torch binding keeps one pair per device: launches on two streams at once
// would share it). Predicted (H200, visit 6 numbers): gate_up M = 1 34.0 -> ~27 us (the second wave's
// idle 30% and one CTA start per slot instead of per strip), down 27.6 -> ~25, qkv / o ~13 -> ~11-12.
template <typename T, Int4Mode kMode>
__global__ void __launch_bounds__(kThreads, 2) w4a16_streamk_kernel(const W4A16Params p, const int group_shift) {
  using Cfg = SmallConfig<1, true>;
  constexpr int kPieceFloats = Cfg::kTokens * L::kStripN;
  extern __shared__ __align__(16) float red[];
  __shared__ bool is_last;
  const int chunks = (p.k / L::kStepK + Cfg::kChunk - 1) / Cfg::kChunk;
  const int64_t total = static_cast<int64_t>(p.n / L::kStripN) * chunks;
  const int ctas = static_cast<int>(gridDim.x), cta = static_cast<int>(blockIdx.x);
  const auto range_begin = [&](int b) { return static_cast<int64_t>(b) * total / ctas; };
  // The CTA whose range holds chunk u: the largest b with range_begin(b) <= u.
  const auto cta_of = [&](int64_t u) { return static_cast<int>(((u + 1) * ctas + total - 1) / total - 1); };
  const int64_t end = range_begin(cta + 1);
  const int tokens = static_cast<int>(min(static_cast<int64_t>(Cfg::kTokens), p.m));  // M <= 8: m0 = 0
  const auto red_at = [](int idx) { return (idx / L::kStripN) * kRedStride + idx % L::kStripN; };
  for (int64_t at = range_begin(cta); at < end;) {
    const int strip = static_cast<int>(at / chunks);
    const int64_t strip_begin = static_cast<int64_t>(strip) * chunks, strip_end = strip_begin + chunks;
    const int c0 = static_cast<int>(at - strip_begin), c1 = static_cast<int>(min(end, strip_end) - strip_begin);
    at = min(end, strip_end);
    strip_sums<T, 1, kMode, true>(p, group_shift, strip, 0, c0, c1, red);
    __syncthreads();
    T* out = static_cast<T*>(p.out) + strip * L::kStripN;
    if (c0 == 0 && c1 == chunks) {  // the whole strip
      for (int idx = threadIdx.x; idx < tokens * L::kStripN; idx += kThreads) {
        out[(idx / L::kStripN) * p.out_stride + idx % L::kStripN] = from_float<T>(red[red_at(idx)]);
      }
    } else {
      const int first = cta_of(strip_begin), last = cta_of(strip_end - 1);
      const auto piece = [&](int b) {  // b's piece of this strip: the end of b's range unless b > first
        return p.streamk_partials + (static_cast<int64_t>(b) * 2 + (b > first ? 0 : 1)) * kPieceFloats;
      };
      float* mine = piece(cta);
      for (int idx = threadIdx.x; idx < tokens * L::kStripN; idx += kThreads) mine[idx] = red[red_at(idx)];
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) {
        // atomicInc wraps to 0 after last - first arrivals: the count is back at 0 for the next launch.
        is_last = atomicInc(p.streamk_counters + first, static_cast<unsigned>(last - first)) ==
                  static_cast<unsigned>(last - first);
      }
      __syncthreads();
      if (is_last) {
        __threadfence();
        for (int idx = threadIdx.x; idx < tokens * L::kStripN; idx += kThreads) {
          float sum = 0.0f;
          for (int b = first; b <= last; ++b) sum += __ldcg(piece(b) + idx);  // CTA order
          out[(idx / L::kStripN) * p.out_stride + idx % L::kStripN] = from_float<T>(sum);
        }
      }
    }
    __syncthreads();  // red (and is_last) are rewritten by the next piece
  }
}

template <typename T, Int4Mode kMode>
cudaError_t launch_streamk(const W4A16Params& p, cudaStream_t stream) {
  using Cfg = SmallConfig<1, true>;
  static Occupancy occ{};
  static std::atomic<int> state{0};
  if (state.load(std::memory_order_acquire) == 0) {
    Occupancy fresh{};
    FI_CUDA_TRY(query_kernel_occupancy(w4a16_streamk_kernel<T, kMode>, kThreads, Cfg::kSmemBytes, &fresh));
    occ = fresh;
    state.store(1, std::memory_order_release);
  }
  if (p.m > Cfg::kTokens || p.streamk_partials == nullptr || p.streamk_counters == nullptr || p.streamk_capacity <= 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks = ceil_div(p.k / L::kStepK, Cfg::kChunk);
  const int64_t total = static_cast<int64_t>(p.n / L::kStripN) * chunks;
  const int64_t slots = static_cast<int64_t>(p.num_sms) * (occ.blocks_per_sm > 0 ? occ.blocks_per_sm : 1);
  const int ctas = static_cast<int>(std::min({slots, total, static_cast<int64_t>(p.streamk_capacity)}));
  split_plan::Residency r{};
  r.clusters[1] = slots;

  // A plain launch: the kernel has no pdl_wait (FASTINFER_PDL must not start it before x is written).
  // Nothing waits inside it, so the grid may exceed what is resident at once (it never does here).
  w4a16_streamk_kernel<T, kMode><<<ctas, kThreads, Cfg::kSmemBytes, stream>>>(p, __builtin_ctz(p.group_size));
  FI_CUDA_TRY(cudaGetLastError());
  Int4LaunchInfo info = launch_info(Int4LaunchInfo::kStreamK, 1, 1, ctas, static_cast<int>(chunks), 1, r);
  info.units = total;  // (strip, chunk) items, cut into ctas equal ranges
  record_launch(info);
  return cudaSuccess;
}

}  // namespace small
}  // namespace w4a16
}  // namespace fastinfer
