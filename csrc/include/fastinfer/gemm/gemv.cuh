// Dense decode GEMM: out[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), M = 1..32, bf16 / fp16 in and out,
// fp32 accumulation. At decode sizes the product is a pure weight stream: 2 N K bytes of W against
// 2 M (N + K) bytes of everything else, so the only goal is to read W at the memory's full rate.
//
// Why tensor cores in a GEMV. x^T [K, 8] is exactly the n8 B operand of mma.sync.m16n8k16, with
// W as the row-major A operand (16 rows of W x 16 k). One mma per 512 bytes of W is far below the
// tensor cores' rate, and it replaces what CUDA cores would spend at M = 8 (8 FMAs plus conversions
// per weight, close to the SM's FP32 issue rate at 4 TB/s) and the final warp-shuffle reductions:
// the mma sums over k itself, so one kernel with one code path serves every M. Columns m >= M of
// the B fragment are zero; the garbage they would produce is simply not stored.
//
// M up to 32: x tiles. Rows 8 t .. 8 t + 7 of x form B tile t; a warp multiplies each A (W)
// fragment it loaded by kTiles = 1, 2 or 4 B tiles (M = 1..8, 9..16, 17..32: tiles_for), so W is
// still read once whatever M is. The kernel is a template on kTiles (x {bf16, fp16}: 6 kernels),
// picked at launch from M. Tile t's B column g is x row 8 t + g (zero past M).
//
// Fragment order without shuffles. A dot product does not care in which order k is summed, so the
// kernel maps the mma's k index to memory such that every operand is one 16-byte load per lane.
// Lane L = 4 g + c loads 8 consecutive k (k = 8 c .. 8 c + 7 of a 32-k step) from W rows g and
// g + 8 and from x row g (of each tile). Its words (.x .y .z .w = k pairs 0-1, 2-3, 4-5, 6-7)
// feed two mmas (per tile):
//     mma 0: a = {wl.x, wh.x, wl.y, wh.y}, b = {xv.x, xv.y}    (mma k 2c, 2c+1 <-> 8c, 8c+1;
//     mma 1: a = {wl.z, wh.z, wl.w, wh.w}, b = {xv.z, xv.w}     mma k 2c+8, 2c+9 <-> 8c+2, 8c+3; ...)
// The mapping depends on the mma k index only, so A and B agree and the sum is exact as written.
// A warp instruction reads 64 contiguous bytes from each of 8 rows: whole 32-byte sectors.
//
// Parallelisation. A CTA (8 warps) owns 16 rows of W (one mma tile) and the whole of K; its warps
// split K into 128-k chunks taken round-robin (warp w: chunks w, w + 8, ...), so together they
// stream each row front to back. A warp issues all loads of a chunk (4 steps x 2 rows of W = 8
// x 16 B per lane, 4 KiB per warp, plus 4 kTiles x 16 B of x) before its first mma. Partial 16 x 8
// tiles of the 8 warps (kTiles each) are added through 4 kTiles KiB of shared memory in a fixed
// order (deterministic), then bias is added in fp32 and each output rounded once. Rows past N re-read row N - 1 (no branch in
// the loop) and are not stored; a partial last chunk predicates its loads (K % 8 == 0 keeps every
// 16-byte piece wholly inside or outside the row).
//
// SwiGLU epilogue (p.swiglu, dense_gemv_silu_mul). For the fused gate / up projection W = [gate; up]
// ([2 F, K], F % 8 == 0, no bias), CTA b takes gate rows 8 b .. 8 b + 7 as A rows g = 0..7 and the
// matching up rows F + 8 b + g as A rows g + 8 (the grid is still N / 16 CTAs). After the cross-warp
// sum a lane's D values j and j + 2 are then gate and up of one output (m, 8 b + g): each is rounded
// to T, then silu(gate) * up is computed as silu_mul.cuh does and rounded once more. This equals
// silu_and_mul(dense_gemv(x, W)) bit for bit because nothing in a row's sum depends on which rows
// share its CTA: the k split (warp chunks, lane c, mma k index, accumulator set) follows k and M
// alone, the cross-warp sum is in a fixed order, and an mma computes each D element from its own A
// row and B column (an assumption about the tensor cores, checked bitwise by the cuda tests). It
// saves the [M, 2 F] intermediate's write and read and one launch; the weight stream is unchanged.
// It is a runtime branch of the epilogue only (no extra kernels).
//
// Residual and RMSNorm (dense_gemv_add_residual, rms_norm_dense_gemv; models/llama.py fuse_norms).
// A Llama layer's decode step runs residual add + RMSNorm twice, each a kernel that reads and writes
// two [M, hidden] rows and moves no weight: at batch 1, ~2-3 us of launch and latency per kernel for
// 16 KiB of traffic, 64 kernels of an 8B model's ~290. The add moves into the epilogue of the GEMV
// before it (o, down: p.residual): a CTA owns its 16 output columns, so it updates those residual
// entries in place (residual + round(x W^T), rounded: fused_add_rms_norm's add) and writes the fp32
// sum of their squares per x row, sq_sums[m, blockIdx.x] (summed in column order through shared
// memory). The norm moves into the prologue of the GEMV after it (q/k/v, gate / up: template kNorm):
// 1 / rms[m] = rsqrt(sum of row m's sq_sums / K + eps), summed by one warp per row in the same order
// in every CTA, and each 16-byte piece of x is normalized as it is loaded, round(x * inv_rms * w)
// (layers/rmsnorm.cuh's formula, its weight w read like x). Rounded values are the unfused ops' except 1 /
// rms: the same squares added in another order (a last-bit difference of fp32, rarely visible after
// the rounding to 16 bits). Cost: a residual read + write per output and one barrier (epilogue); a
// [M, K / 16] fp32 read, a warp reduction and a barrier before the K loop (after the L2 prefetch of the
// first W chunk), and 2 FMUL + 2 conversions per x element (prologue), x being M / 16 of the W bytes
// a CTA reads. Expected: each GEMV <= 1% slower, and a batch-1 step 3-6% faster (64 kernels and their
// gaps gone); bench_gemv.py times each fused kernel against the pair it replaces and bench_e2e.py the
// step with and without (FASTINFER_FUSED_NORM=0). M <= 16 only (kGemvNormMaxM): with 4 x tiles
// the prologue's registers (norm weight, 1 / rms per tile) made ptxas spill, so batches of 17..32
// keep the separate norm kernels. The first layer's sums come from the embedding kernel
// (layers/embedding.cuh) and the final norm runs in the LM head's prologue, whose out_fp32 epilogue
// stores float(round(x W^T)), the fp32 logits with no cast kernel after them. 4 more kernels (kNorm x
// 1, 2 tiles x 2 dtypes), no spills. With
// one tile, kNorm's K loop is not unrolled (~120 registers; SASS: 8 W + 4 x + 4 norm-weight loads,
// then 8 mmas): 4 KiB of W in flight per warp, 64 KiB per SM, against the ~30 KiB needed (below).
//
// Rotary + KV-cache epilogue (dense_gemv_rope_cache; p.rope). The q/k/v projection of a decode
// step is followed by rotary_embedding_and_cache, one more kernel per layer (32 of an 8B model's
// step) that re-reads the projection's output. Rotation pairs dim d with d + head_dim / 2 of a head,
// so, as the SwiGLU epilogue pairs gate and up rows, CTA b takes A rows g = dims 8 j + g and g + 8 =
// dims 8 j + g + head_dim / 2 of head b / (head_dim / 16), j = b % (head_dim / 16): a lane's D values
// j and j + 2 are then one pair. Each is rounded to T (with its bias: the projection's output), query
// and key heads are rotated by rope::rotate_pair (the formula of the rotary kernel; fp32 cos / sin at
// the token's position) and rounded again, and the pair is stored: query heads to out, key and value
// heads to the paged cache at slot_mapping[m] (-1: padding, not stored), as kv/append.cuh does for
// a 16-bit cache (an FP8 cache keeps the separate kernel). Stores are 2-byte and scattered (a warp
// writes 8 dims x 2 halves of one head for 4 tokens), ~M (H + 2 Hkv) D 2 bytes in all: noise next
// to the weight. The rows' sums do not depend on this pairing (see the SwiGLU epilogue), so the
// outputs equal the unfused pair's up to the contraction of the rotation's multiply-adds.
//
// Registers. __launch_bounds__(256, 2) lets ptxas use 128 registers a thread. With one tile it
// hoists the loads of two chunks (its 2x unroll of the K loop: 16 x 16 B of W per lane, 8 KiB per
// warp) above their mmas; at the default budget it chose ~70 registers and interleaved loads with
// mmas, leaving ~6 loads in flight. x costs 16 registers per tile per chunk, so with 2 tiles (108
// registers; 112 since the SwiGLU epilogue, SASS schedule not re-read) the loop is not unrolled:
// one chunk, 8 W + 8 x loads, then 16 mmas (4 KiB of W per warp in flight); with 4 tiles (128
// registers) 7 of the 8 W loads and most of the 16 x loads precede the first mma (~3.5 KiB per
// warp). At no tile count are the next chunk's loads issued before the current chunk's mmas (no
// pipelining across iterations; with 1 tile the 2x unroll puts two chunks' loads before their 16
// mmas): in-flight bytes per warp drop to zero while it does its mmas, and the other 15 warps of the SM cover that. 2 CTAs x 8 warps: 128 KiB in flight per SM at
// M <= 8, ~64 KiB at 9..16, ~56 KiB at 17..32, against ~30 KiB needed (Little's law below).
// No spills in any of the 6 kernels (sm_90a, nvcc 13.0). One accumulator set per tile when
// kTiles >= 2 (the tiles already give independent mma chains), two when kTiles == 1.
//
// Loads. W is read exactly once: ld.global.nc.L1::no_allocate (no L1 pollution) with a 256-byte
// L2 prefetch hint. x (M x K x 2 bytes) is read by every CTA: ld.global.nc, served by L1 / L2.
//
// x traffic. A CTA streams 16 K 2 bytes of W and reads M K 2 bytes of x, so x is M / 16 of the W
// bytes the SMs request: 1/2 at M = 8, 1 at 16, 2 at 32. At M = 32, K = 4096 a CTA reads 128 KiB
// of W and 256 KiB of x: x is 2/3 of the L2 -> SM traffic (M / (M + 16)) though under 1% of the
// DRAM traffic (x comes from DRAM once: 256 KiB against N x 8 KiB of W). Whatever L1 does not
// catch (W bypasses L1, so x has it to itself: at K = 4096, M = 32, x is about the L1's size; at
// K = 14336 it is 3.5 x larger) the L2 serves, up to 3 x the DRAM rate in all at M = 32: ~11 TB/s
// at 88% of copy bandwidth, likely more than the L2 delivers (not measured here). M = 17..32 may
// therefore be L2-bound rather than DRAM-bound; bench/bench_gemv.py at M = 16 and 32 will say.
// Staging x in shared memory per CTA would not help: each x element is already read once per CTA
// (its warps split K, so no two warps of a CTA use the same x), and staging adds a shared-memory
// round trip for the same L2 bytes. What would help is more W rows per read of x: 32 rows per CTA
// halve x's share (but N / 32 CTAs is 128 at N = 4096, under 2 per SM), or a cluster of CTAs
// sharing x by TMA multicast / distributed shared memory (x / cluster size, grid unchanged).
// Neither is done: measure first.
//
// Roofline (H200, 132 SMs, 4.28 TB/s copy bandwidth; GPU.md). Llama-3-8B gate_up 4096 -> 28672:
// 235 MB of weights = 55 us at 4.28 TB/s; 14336 -> 4096: 117 MB = 27.5 us (cuBLAS: 41 us, 67%).
// Little's law: ~4 TB/s x ~1 us loaded latency = ~4 MB in flight = ~30 KiB per SM. With 128
// registers a thread, 2 CTAs (16 warps) fit an SM, each warp holding 8 KiB of W in flight at
// M <= 8 (128 KiB per SM), ~3.5-4 KiB at M = 9..32 (56-64 KiB per SM): headroom for ~90% of copy
// bandwidth on the large shapes as far as DRAM latency goes (for M > 16 see "x traffic"). The
// mma count per byte of W grows with the tiles (32 mmas per 4 KiB chunk at 4 tiles: one per ~8
// SM cycles at 88% of 4.28 TB/s, an estimated quarter to half of the mma.sync rate; unmeasured).
// Small N has few CTAs (N / 16): at N = 4096 that is 256 CTAs, ~2 per SM, still all the bytes in
// flight above; below N ~ 2048 (fewer CTAs than SMs) the kernel is correct but cannot fill the machine
// (there is no split-K across CTAs).
//
// L2 prefetch across kernels (DenseGemvParams::prefetch; FASTINFER_GEMV_PREFETCH_MB, models/llama.py).
// A graphed batch-1 step of an 8B model runs 129 GEMVs back to back; visit 5 timed them at 4403 us
// for 15.0 GB, 3.41 TB/s, against ~4.06 TB/s that the same loads reach on a 1 GB stream: ~5.5 us per
// kernel beyond its bytes. Each kernel starts with DRAM idle (launch, first loads' latency) and ends
// with it idle (the last CTAs' last loads drain, the cross-warp sum and the epilogue), and the decode
// attention kernel between the q/k/v and o projections reads next to nothing. Weights are constant, so
// the next GEMV's first bytes can be asked of L2 before that kernel starts: with a plan (PrefetchPlan,
// gemm/gemv_prefetch.h, built at launch), the CTAs of this grid's last wave, as their warps leave the K loop, issue
// cp.async.bulk.prefetch.L2 (sm_90; nothing on older targets) for the first `bytes` of each row the
// next GEMV's first wave reads (its CTAs stream their 16 rows front to back), spread over the CTAs so
// the requests start with the first CTA to finish. DRAM then works through this kernel's tail, the
// launch gap and the next kernel's start, whose first loads hit L2. Only last-wave CTAs issue: a
// multi-wave kernel's earlier waves would have the lines evicted by the waves after them. Results are
// unchanged (a prefetch moves no data a thread sees). Predicted (H200, batch 1, 8 MB per GEMV
// boundary and 16 MB across attention): ~2-3 us per GEMV and ~3 us more per attention, ~0.35-0.5 ms of a
// 4.79 ms step (74.5% -> 80-83% of the roofline); no gain if the L2 drops the prefetched lines before
// use (the next GEMV's own reads would then show it in bench_e2e's profile: unchanged kernel times).
//
// FP8 weights (W8A16: DenseGemvParams::weight_scale, template kFp8; M <= 16). A decode step of an FP8
// model reads half the weight bytes of a 16-bit one, but the W8A8 path (fp8_linear: a quantization
// kernel, then the FP8 GEMM; forward_fp8 in models/llama.py) runs ~10 kernels a layer, and on an H200 a
// batch-1 step of the Llama-3-8B shape took 4.13 ms against bf16's 4.79 (visit 4): 1.16x for half the
// bytes. This variant keeps every fusion above (RMSNorm prologue, SwiGLU / residual / rotary + cache
// epilogues: 3 kernels a layer) and reads e4m3 rows: x stays 16-bit, each weight is converted exactly
// to T in registers (e4m3 values are all bf16 / fp16 values), the mma sums x * w in fp32, and the
// epilogue multiplies each row's sum by its fp32 scale before the bias and the roundings: out[m, n] =
// round(sum_k x[m, k] float(W[n, k]) * scale[n] + bias[n]). No activation quantization, so it is more
// accurate than W8A8 (x keeps its 8 / 11 significant bits instead of e4m3's 4). A lane's 16-byte piece is
// now 16 k: per 64-k step it loads 16 bytes of each of its two rows and two 16-byte pieces of x per
// tile, converts each weight word into two pairs (e4m3x2_high_to: mask, shift, one 2-element multiply
// by 2^(bias(T) - 7); ~9 instructions per 4 weights, PRMT for x's matching pairs) and issues 4 mmas per
// tile. Chunks of 4 steps (256 k, 4 KiB of weights per warp in flight) with one x tile, 2 steps with
// two. SASS (bf16, one tile, nvcc 13.0): ~376 instructions per 4 KiB warp-chunk against ~60 for the
// 16-bit kernel; at 4 TB/s an SM must take a 4 KiB chunk every ~256 cycles, so ~1.5 of its 4 issue
// slots per cycle go to it: it should stay memory-bound, with less slack to hide latency (fewer
// bytes in flight while a warp converts). Predicted (H200): each GEMV near dense_gemv's time for the
// same number of bytes, i.e. about half its 16-bit time on large shapes; a batch-1 FP8 step 4.13 ->
// ~2.9 ms (7 GB of e4m3 weights + the bf16 LM head at dense_gemv's measured 3.41 TB/s, plus attention),
// batch 8 ~3.0 ms. FASTINFER_FP8_DECODE=w8a16 selects it (models/llama.py); bench_e2e times it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fastinfer/common.cuh"
#include "fastinfer/gemm/gemv.h"
#include "fastinfer/gemm/gemv_prefetch.h"
#include "fastinfer/layers/rope.cuh"

namespace fastinfer {
namespace gemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileN = 16;                          // rows of W per CTA: the mma's M dimension
constexpr int kVecElems = 8;                        // 16-byte loads of 16-bit elements
constexpr int kStepK = 4 * kVecElems;               // k per step: 4 lanes (c) x 8 elements, two mmas
constexpr int kStepsPerChunk = 4;                   // steps whose loads are in flight together
constexpr int kChunkK = kStepK * kStepsPerChunk;    // 128 k per chunk

// d += a (16x16 row major) * b (16x8 col major), fp32 accumulate. Needs sm_80 (bf16 mma).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // not built for pre-Ampere targets (FASTINFER_CUDA_ARCHS is 80 or newer)
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// Loads (common.cuh: load_stream for W, load_shared_input for x) and mmas are volatile asm so that
// the PTX keeps their program order (all loads of a chunk, then its mmas); the SASS order is
// ptxas's, see "Registers" above.

// x^T tiles (n8 B operands) a warp multiplies by each 16-row W fragment: M = 1..8 -> 1, 9..16 -> 2,
// 17..32 -> 4. Host and device agree through this one function.
__host__ __device__ constexpr int tiles_for(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : 4; }

// One tile keeps two accumulator sets (the two mmas of a step feed different ones, two dependency
// chains); with 2 or 4 tiles the tiles already give 2 or 4 chains, and registers go to x instead.
template <int kTiles>
constexpr int kAccSets = kTiles == 1 ? 2 : 1;

template <int kTiles>
struct Acc {
  float v[kAccSets<kTiles>][kTiles][4];
};

// One 128-k chunk starting at k0: issue every load (W, then x of every tile), then the 2 x kTiles x
// kStepsPerChunk mmas, each W fragment feeding all kTiles mmas. The lane's pointers already include
// its 8 c offset; k_left = K - 8 c - k0 elements remain from its first piece. x_rows[t] is the lane's
// row 8 t + g of x, or row 0 where that is past M (has_x bit t clear: the value is replaced by zeros).
// rms_norm's formula on two packed elements: round(x * inv_rms * w) each.
template <typename T>
__device__ __forceinline__ uint32_t normalize_pair(uint32_t x, uint32_t w, float inv_rms) {
  T xs[2], ws[2], ys[2];
  memcpy(xs, &x, sizeof(xs));
  memcpy(ws, &w, sizeof(ws));
#pragma unroll
  for (int i = 0; i < 2; ++i) ys[i] = from_float<T>(to_float(xs[i]) * inv_rms * to_float(ws[i]));
  uint32_t y;
  memcpy(&y, ys, sizeof(y));
  return y;
}

// rms_norm's formula on a 16-byte piece of x (8 elements) with the norm weight's piece w.
template <typename T>
__device__ __forceinline__ uint4 normalize_piece(const uint4& x, const uint4& w, float inv_rms) {
  return make_uint4(normalize_pair<T>(x.x, w.x, inv_rms), normalize_pair<T>(x.y, w.y, inv_rms),
                    normalize_pair<T>(x.z, w.z, inv_rms), normalize_pair<T>(x.w, w.w, inv_rms));
}

// The RMSNorm prologue's per-lane state (kNorm): the norm weight at the lane's 8 c offset, and the
// 1 / rms of x row 8 t + g for each tile t (0 past M).
template <typename T, int kTiles>
struct NormState {
  const T* weight;
  float inv_rms[kTiles];
};

// The chunk's W pieces, rows g and g + 8 (zeros past a partial chunk's row end).
template <typename T, bool kPartial>
__device__ __forceinline__ void load_w_chunk(uint4 (&wl)[kStepsPerChunk], uint4 (&wh)[kStepsPerChunk], const T* w_lo,
                                             const T* w_hi, int64_t k0, int64_t k_left) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
    const bool in_row = !kPartial || s * kStepK < k_left;
    const int64_t k = k0 + s * kStepK;
    wl[s] = in_row ? load_stream(w_lo + k) : zero;
    wh[s] = in_row ? load_stream(w_hi + k) : zero;
  }
}

// The rest of a chunk once its W is loaded: x of every tile (normalized with kNorm), then the mmas.
template <typename T, int kTiles, bool kPartial, bool kNorm>
__device__ __forceinline__ void chunk_mma_loaded(Acc<kTiles>& acc, const uint4 (&wl)[kStepsPerChunk],
                                                 const uint4 (&wh)[kStepsPerChunk], const T* const (&x_rows)[kTiles],
                                                 unsigned has_x, int64_t k0, int64_t k_left,
                                                 const NormState<T, kTiles>& norm) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 xv[kStepsPerChunk][kTiles];
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
    const bool in_row = !kPartial || s * kStepK < k_left;
    const int64_t k = k0 + s * kStepK;
    uint4 nw = zero;
    if constexpr (kNorm) nw = kPartial && !in_row ? zero : load_shared_input(norm.weight + k);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      // Unconditional load (lanes past M read row 0: the same sectors as the lanes of row 0), then a
      // select: a conditional load here became a branch that ptxas would not hoist the next loads over.
      uint4 v = kPartial && !in_row ? zero : load_shared_input(x_rows[t] + k);
      if constexpr (kNorm) v = normalize_piece<T>(v, nw, norm.inv_rms[t]);
      xv[s][t] = (has_x >> t) & 1u ? v : zero;
    }
  }
#pragma unroll
  for (int s = 0; s < kStepsPerChunk; ++s) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      mma_16816<T>(acc.v[0][t], wl[s].x, wh[s].x, wl[s].y, wh[s].y, xv[s][t].x, xv[s][t].y);
      mma_16816<T>(acc.v[kAccSets<kTiles> - 1][t], wl[s].z, wh[s].z, wl[s].w, wh[s].w, xv[s][t].z, xv[s][t].w);
    }
  }
}

template <typename T, int kTiles, bool kPartial, bool kNorm>
__device__ __forceinline__ void chunk_mma(Acc<kTiles>& acc, const T* w_lo, const T* w_hi,
                                          const T* const (&x_rows)[kTiles], unsigned has_x, int64_t k0,
                                          int64_t k_left, const NormState<T, kTiles>& norm) {
  uint4 wl[kStepsPerChunk], wh[kStepsPerChunk];
  load_w_chunk<T, kPartial>(wl, wh, w_lo, w_hi, k0, k_left);
  chunk_mma_loaded<T, kTiles, kPartial, kNorm>(acc, wl, wh, x_rows, has_x, k0, k_left, norm);
}

// ---- FP8 weights (kFp8; see "FP8 weights" above) ----
constexpr int kFp8VecElems = 16;                    // 16-byte loads of e4m3 weights: 16 k
constexpr int kFp8StepK = 4 * kFp8VecElems;         // k per step: 4 lanes (c) x 16, four mmas
// Steps per chunk: 4 with one x tile (4 KiB of weights per warp in flight, as the 16-bit kernel), 2 with
// two (an FP8 step's x is two 16-byte loads per tile: 4 steps x 2 tiles would not fit 128 registers).
template <int kTiles>
constexpr int kFp8Steps = kTiles == 1 ? 4 : 2;
template <int kTiles>
constexpr int kFp8ChunkK = kFp8StepK * kFp8Steps<kTiles>;

// Two e4m3 values, the high bytes of v's 16-bit halves, -> two T, exactly. The sign stays in bit 15;
// exponent and mantissa (bits 14..8) move down into T's fields (by 4 for bf16's 8 exponent bits, by 1 for
// fp16's 5), which reads as the same value times 2^(7 - bias(T)), subnormals included (e4m3 exponent 0
// lands on T's exponent 0); one exact multiply by 2^(bias(T) - 7) = 2^120 (bf16) or 2^8 (fp16) undoes it,
// a 2-element FMA with -0 so zeros keep their sign. e4m3's NaN code (S.1111.111) would read as +-480: the
// quantizers of this package saturate, and loading an FP8 checkpoint rejects weights holding NaN codes
// (quant/fp8.py load_fp8_rows).
template <typename T>
__device__ __forceinline__ uint32_t e4m3x2_high_to(uint32_t v) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const uint32_t bits = (v & 0x80008000u) | ((v & 0x7F007F00u) >> (kBf16 ? 4 : 1));
  uint32_t out;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(out) : "r"(bits), "r"(0x7B807B80u), "r"(0x80008000u));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(out) : "r"(bits), "r"(0x5C005C00u), "r"(0x80008000u));
  }
#else
  out = bits;  // never launched below sm_80 (mma_16816 traps there)
#endif
  return out;
}

// The four e4m3 of word w (k, k + 1, k + 2, k + 3 in its bytes 0..3) as the pairs {k, k + 2} (even) and
// {k + 1, k + 3} (odd): the byte order that needs no byte permute on the weights.
template <typename T>
__device__ __forceinline__ uint32_t e4m3_even(uint32_t w) { return e4m3x2_high_to<T>(w << 8); }
template <typename T>
__device__ __forceinline__ uint32_t e4m3_odd(uint32_t w) { return e4m3x2_high_to<T>(w); }

// The chunk's e4m3 pieces of rows g and g + 8: kFp8Steps 16-byte loads each (zeros past the row's end).
template <int kSteps, bool kPartial>
__device__ __forceinline__ void load_w_chunk_fp8(uint4 (&wl)[kSteps], uint4 (&wh)[kSteps], const uint8_t* w_lo,
                                                 const uint8_t* w_hi, int64_t k0, int64_t k_left) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const bool in_row = !kPartial || s * kFp8StepK < k_left;
    const int64_t k = k0 + s * kFp8StepK;
    wl[s] = in_row ? load_stream(w_lo + k) : zero;
    wh[s] = in_row ? load_stream(w_hi + k) : zero;
  }
}

// One FP8 chunk starting at k0: the weights, then x of every tile (16 k per lane and step: two 16-byte
// loads, normalized with kNorm), then 4 mmas per step and tile. Step s, lane c covers k0 + 64 s + 16 c ..
// + 15; word q of a weight piece (k 4 q .. 4 q + 3 of those) feeds mma q as {even, odd} of rows g and
// g + 8 (mma k 2 c, 2 c + 1 <-> 4 q, 4 q + 2; 2 c + 8, 2 c + 9 <-> 4 q + 1, 4 q + 3), and x words 2 q and
// 2 q + 1 (k 4 q .. 4 q + 3) are byte-permuted into the same pairs. As in the 16-bit kernel the map from
// the mma's k to memory is shared by A and B, so the sum is exact as written. Unlike the 16-bit kernel,
// x rows past M are not replaced by zeros: their lanes multiply x row 0 (finite data; 0 after the
// RMSNorm prologue, whose 1 / rms is 0 there) into D columns m >= M, which no epilogue stores, and the
// 32 selects a chunk would cost are ~8% of its instructions. Its x loop repeats chunk_mma_loaded's shape
// on purpose: a shared helper for both changed the SASS of the measured 16-bit kernels (instruction counts
// and scheduling), which only a GPU run could clear.
template <typename T, int kTiles, bool kPartial, bool kNorm>
__device__ __forceinline__ void chunk_mma_fp8(Acc<kTiles>& acc, const uint8_t* w_lo, const uint8_t* w_hi,
                                              const T* const (&x_rows)[kTiles], int64_t k0,
                                              int64_t k_left, const NormState<T, kTiles>& norm) {
  constexpr int kSteps = kFp8Steps<kTiles>;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wl[kSteps], wh[kSteps];
  load_w_chunk_fp8<kSteps, kPartial>(wl, wh, w_lo, w_hi, k0, k_left);
  uint4 xv[kSteps][kTiles][2];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const bool in_row = !kPartial || s * kFp8StepK < k_left;
    const int64_t k = k0 + s * kFp8StepK;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 nw = zero;
      if constexpr (kNorm) nw = kPartial && !in_row ? zero : load_shared_input(norm.weight + k + h * kVecElems);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        uint4 v = kPartial && !in_row ? zero : load_shared_input(x_rows[t] + k + h * kVecElems);
        if constexpr (kNorm) v = normalize_piece<T>(v, nw, norm.inv_rms[t]);
        xv[s][t][h] = v;  // rows past M: row 0's values (see above), in D columns that are never stored
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const uint32_t lo[4] = {wl[s].x, wl[s].y, wl[s].z, wl[s].w};
    const uint32_t hi[4] = {wh[s].x, wh[s].y, wh[s].z, wh[s].w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t a0 = e4m3_even<T>(lo[q]), a1 = e4m3_even<T>(hi[q]);
      const uint32_t a2 = e4m3_odd<T>(lo[q]), a3 = e4m3_odd<T>(hi[q]);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const uint4& xh = xv[s][t][q / 2];
        const uint32_t x0 = q % 2 == 0 ? xh.x : xh.z, x1 = q % 2 == 0 ? xh.y : xh.w;  // k 4 q .. 4 q + 3
        mma_16816<T>(acc.v[q % kAccSets<kTiles>][t], a0, a1, a2, a3, __byte_perm(x0, x1, 0x5410),
                     __byte_perm(x0, x1, 0x7632));
      }
    }
  }
}

using PrefetchPlan = GemvPrefetchPlan;  // gemm/gemv_prefetch.h

__device__ __forceinline__ void l2_prefetch_bulk(const void* ptr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(ptr)), "r"(bytes));
#endif
}

// One warp's share of the plan: item i (a row) goes to CTA i % ctas of the issuing ones and, within
// it, to warp (i / ctas) % 8 first, so every CTA and each of its warps issues a few (a handful per
// lane-serial loop: the instruction takes uniform operands) and the first warp to finish starts the stream.
__device__ __forceinline__ void issue_prefetch(const PrefetchPlan& pf) {
  const int ctas = static_cast<int>(gridDim.x) - pf.first_cta;
  const int items = pf.second < 0 ? pf.rows : 2 * pf.rows;
  const int slot = static_cast<int>(threadIdx.x % kWarpSize) * kWarps + static_cast<int>(threadIdx.x / kWarpSize);
  for (int i = static_cast<int>(blockIdx.x) - pf.first_cta + slot * ctas; i < items; i += ctas * kThreads) {
    const int64_t row = i < pf.rows ? i : pf.second + (i - pf.rows);
    l2_prefetch_bulk(pf.base + row * pf.row_bytes, static_cast<uint32_t>(pf.bytes));
  }
}

// kPreload (kNorm only; DenseGemvParams::norm_preload, FASTINFER_GEMV_NORM_PRELOAD=on): the warp's
// first chunk of W is loaded into registers before the RMSNorm prologue instead of only being asked of
// L2, so the prologue's dependent reads (the sums of squares, a reduction, a barrier) overlap the
// weights' DRAM latency rather than preceding it. Why: bench_gemv (H200, visit 4) timed the prologue
// at +1.8 us on qkv (384 CTAs, 1.5 waves) and +4.1 us on gate_up (1792 CTAs, ~7 waves) against the
// same GEMV on x normalized beforehand: about one such latency per wave of CTAs, ~190 us of a 4.8 ms
// batch-1 step. Predicted: most of it back (qkv ~20.8, gate_up ~68.5 us). 32 more registers live
// across the prologue, which needs few.
template <typename T, int kTiles, bool kNorm, bool kPreload = false, bool kFp8 = false>
__global__ void __launch_bounds__(kThreads, 2) dense_gemv_kernel(DenseGemvParams p, PrefetchPlan pf) {
  static_assert(kNorm || !kPreload, "the preload only moves W ahead of the RMSNorm prologue");
  static_assert(!kFp8 || (!kPreload && kTiles <= 2), "FP8 weights: M <= kGemvFp8MaxM, no preload variant");
  using WT = std::conditional_t<kFp8, uint8_t, T>;              // a weight element: 16-bit or e4m3
  constexpr int kLaneK = kFp8 ? kFp8VecElems : kVecElems;       // k of one lane's 16-byte weight piece
  constexpr int kChunk = kFp8 ? kFp8ChunkK<kTiles> : kChunkK;   // k per warp chunk
  constexpr int kSteps = kFp8 ? kFp8Steps<kTiles> : kStepsPerChunk;
  constexpr int kStep = kFp8 ? kFp8StepK : kStepK;
  // Each warp's 16 x 8 tiles in D-fragment order: partial[warp][tile][lane].
  __shared__ float4 partial[kWarps][kTiles][kWarpSize];
  // RMSNorm prologue: 1 / rms of each x row. Residual epilogue: squares of the CTA's new residuals.
  __shared__ float inv_rms_s[kNorm ? kGemvMaxM : 1];
  __shared__ float squares[kGemvMaxM][kTileN];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int row0 = blockIdx.x * kTileN;
  // Rows past N (last tile only) re-read row N - 1; their sums are never stored. SwiGLU: A rows g
  // and g + 8 are gate row 8 b + g and up row F + 8 b + g (F = N / 2, N % 16 == 0: no rows past N).
  const int gate_row = blockIdx.x * (kTileN / 2) + g;
  // Rotary: A rows g and g + 8 are dims d and d + head_dim / 2 of one head, d = 8 j + g for the
  // CTA's j-th of the head_dim / 16 CTAs of that head (head_dim % 16 == 0: no rows past N).
  // Recomputed in the epilogue (from a fresh read of %ctaid.x, which the compiler cannot merge with
  // this one) rather than kept live across the K loop, where it cost the one-tile kernel a spill.
  const auto cta = [] {
    unsigned b;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(b));
    return static_cast<int>(b);
  };
  const auto rope_head = [&] { return cta() / (p.head_dim / kTileN); };
  const auto rope_d0 = [&] { return cta() % (p.head_dim / kTileN) * (kTileN / 2); };
  const bool rope = p.rope;
  const int rope_row = rope ? rope_head() * p.head_dim + rope_d0() + g : 0;
  const int64_t row_lo = p.swiglu ? gate_row : rope ? rope_row : min(row0 + g, p.n - 1);
  const int64_t row_hi = p.swiglu ? p.n / 2 + gate_row : rope ? rope_row + p.head_dim / 2 : min(row0 + g + 8, p.n - 1);
  const WT* weight = static_cast<const WT*>(p.weight);
  const WT* w_lo = weight + row_lo * p.k + kLaneK * c;
  const WT* w_hi = weight + row_hi * p.k + kLaneK * c;
  const T* x_rows[kTiles];
  unsigned has_x = 0;  // bit t: B column g of tile t = x row 8 t + g exists (zero beyond M)
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const int row = 8 * t + g;
    has_x |= (row < p.m ? 1u : 0u) << t;
    x_rows[t] = static_cast<const T*>(p.x) + (row < p.m ? row : 0) * p.x_stride + kLaneK * c;
  }

  // PDL (common.cuh, FASTINFER_PDL=1): ask L2 for this warp's first chunk of W, which no kernel
  // writes, while the kernel before this one may still be running; then wait for it (x is its output).
  const int64_t num_full = p.k / kChunk;
  uint4 first_wl[kStepsPerChunk], first_wh[kStepsPerChunk];  // kPreload: chunk `warp`'s W
  if constexpr (kPreload) {
    if (warp < num_full) load_w_chunk<T, false>(first_wl, first_wh, w_lo, w_hi, warp * kChunkK, 0);
  } else if (warp < num_full) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(w_lo + warp * kChunk + s * kStep));
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(w_hi + warp * kChunk + s * kStep));
    }
  }
  pdl_wait();

  NormState<T, kTiles> norm{};
  if constexpr (kNorm) {
    // 1 / rms of x row m from its sums of squares (written by the kernel that wrote x): warp w takes
    // rows w, w + 8, ..., each summed in the same order in every CTA, so all CTAs agree.
    for (int m = warp; m < p.m; m += kWarps) {
      const float* sums = p.sq_sums_in + m * p.sq_sums_in_stride;
      float sum = 0.f;
      for (int j = lane; j < p.sq_groups; j += kWarpSize) sum += sums[j];
      sum = warp_reduce_sum(sum);
      if (lane == 0) inv_rms_s[m] = rsqrtf(sum / static_cast<float>(p.k) + p.eps);
    }
    __syncthreads();
    norm.weight = static_cast<const T*>(p.norm_weight) + kLaneK * c;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) norm.inv_rms[t] = 8 * t + g < p.m ? inv_rms_s[8 * t + g] : 0.f;
  }

  Acc<kTiles> acc;
#pragma unroll
  for (int a = 0; a < kAccSets<kTiles>; ++a)
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[a][t][j] = 0.f;
  int64_t chunk = warp;
  if constexpr (kPreload) {
    if (chunk < num_full) {
      chunk_mma_loaded<T, kTiles, false, kNorm>(acc, first_wl, first_wh, x_rows, has_x, chunk * kChunkK, 0, norm);
      chunk += kWarps;
    }
  }
  if constexpr (kFp8) {
    for (; chunk < num_full; chunk += kWarps) {
      chunk_mma_fp8<T, kTiles, false, kNorm>(acc, w_lo, w_hi, x_rows, chunk * kChunk, 0, norm);
    }
    if (chunk == num_full && p.k % kChunk != 0) {  // the partial last chunk falls to this warp
      const int64_t k0 = chunk * kChunk;
      chunk_mma_fp8<T, kTiles, true, kNorm>(acc, w_lo, w_hi, x_rows, k0, p.k - k0 - kLaneK * c, norm);
    }
  } else {
    for (; chunk < num_full; chunk += kWarps) {
      chunk_mma<T, kTiles, false, kNorm>(acc, w_lo, w_hi, x_rows, has_x, chunk * kChunkK, 0, norm);
    }
    if (chunk == num_full && p.k % kChunkK != 0) {  // the partial last chunk falls to this warp
      const int64_t k0 = chunk * kChunkK;
      chunk_mma<T, kTiles, true, kNorm>(acc, w_lo, w_hi, x_rows, has_x, k0, p.k - k0 - kVecElems * c, norm);
    }
  }
  // PDL: the next kernel may launch once every CTA is past its K loop (all of this grid's CTAs have
  // then been scheduled, so its CTAs cannot take slots this grid still needs: triggering at the start,
  // as first written, measured 5.55 ms per batch-1 step against 4.77 without PDL, visit 3).
  pdl_launch_dependents();
  if (pf.base != nullptr && static_cast<int>(blockIdx.x) >= pf.first_cta) issue_prefetch(pf);
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    const auto& a0 = acc.v[0][t];
    const auto& a1 = acc.v[kAccSets<kTiles> - 1][t];
    partial[warp][t][lane] = kAccSets<kTiles> == 1 ? make_float4(a0[0], a0[1], a0[2], a0[3])
                                                   : make_float4(a0[0] + a1[0], a0[1] + a1[1], a0[2] + a1[2],
                                                                 a0[3] + a1[3]);
  }
  const bool add_residual = p.residual != nullptr;
  if (add_residual) {  // columns past N keep 0
    for (int i = threadIdx.x; i < kGemvMaxM * kTileN; i += kThreads) squares[i / kTileN][i % kTileN] = 0.f;
  }
  __syncthreads();

  // Value i < 128 kTiles of a warp's tiles: tile t = i / 128, fragment value j = i % 4 of lane
  // (i % 128) / 4, i.e. D row g (+ 8 for j >= 2), column 2 c + j % 2 of tile t (x row 8 t + that).
  const float* flat = reinterpret_cast<const float*>(&partial[0][0][0]);
  constexpr int kValuesPerWarp = kTiles * kWarpSize * 4;
  // Each value's sum over the warps is the same expression in both modes, so a row's result does not
  // depend on which rows share its CTA (nor does its k order: chunks and lanes follow k alone).
  const auto warp_sum = [&](int i) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += flat[w * kValuesPerWarp + i];  // fixed order
    return sum;
  };
  // The sum of value i, which belongs to weight row n: times that row's scale with FP8 weights.
  const auto row_sum = [&](int i, int64_t n) {
    if constexpr (kFp8) {
      return warp_sum(i) * p.weight_scale[n];
    } else {
      return warp_sum(i);
    }
  };
  for (int i = threadIdx.x; i < kValuesPerWarp; i += kThreads) {
    const int src = (i % (kWarpSize * 4)) / 4, j = i % 4, t = i / (kWarpSize * 4);
    const int m = 8 * t + 2 * (src % 4) + (j % 2);
    if (m >= p.m) continue;
    if (rope) {
      // Values j < 2 are dims d = rope_d0() + src / 4 and (j + 2) d + head_dim / 2 of the head,
      // each with its bias and rounded to T (the q/k/v projection's output), then rotated and stored.
      if (j >= 2) continue;
      const int head = rope_head(), half = p.head_dim / 2, d = rope_d0() + src / 4;
      const int64_t n_lo = static_cast<int64_t>(head) * p.head_dim + d;
      const T* bias = static_cast<const T*>(p.bias);
      const float x1 = to_float(from_float<T>(row_sum(i, n_lo) + (bias ? to_float(bias[n_lo]) : 0.f)));
      const float x2 = to_float(from_float<T>(row_sum(i + 2, n_lo + half) + (bias ? to_float(bias[n_lo + half]) : 0.f)));
      T out1 = from_float<T>(x1), out2 = from_float<T>(x2);
      if (head < p.num_heads + p.num_kv_heads) {  // query or key: rotate
        const float* cos = p.cos_sin_cache + p.positions[m] * p.head_dim;
        rope::rotate_pair<T>(x1, x2, cos[d], cos[half + d], out1, out2);
      }
      T* dst;
      if (head < p.num_heads) {
        dst = static_cast<T*>(p.out) + m * p.out_stride + head * p.head_dim;
      } else {
        const int64_t slot = p.slot_mapping[m];
        if (slot < 0) continue;
        const bool value = head >= p.num_heads + p.num_kv_heads;
        const int kv_head = head - p.num_heads - (value ? p.num_kv_heads : 0);
        const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;  // one token's K or V
        const int64_t block = slot / p.block_size, offset = slot % p.block_size;
        dst = static_cast<T*>(p.kv_cache) + ((block * 2 + (value ? 1 : 0)) * p.block_size + offset) * row +
              static_cast<int64_t>(kv_head) * p.head_dim;
      }
      dst[d] = out1;
      dst[d + half] = out2;
      continue;
    }
    if (p.swiglu) {
      // Value j < 2 is gate row g (output column 8 b + g), value j + 2 the up row paired with it. Each
      // is rounded to T first and the product once more: silu_mul.cuh's formula on dense_gemv's output.
      if (j >= 2) continue;
      const int64_t gate_n = static_cast<int64_t>(blockIdx.x) * (kTileN / 2) + src / 4;
      const float gate = to_float(from_float<T>(row_sum(i, gate_n)));
      const float up = to_float(from_float<T>(row_sum(i + 2, p.n / 2 + gate_n)));
      static_cast<T*>(p.out)[m * p.out_stride + blockIdx.x * (kTileN / 2) + src / 4] =
          from_float<T>(gate / (1.0f + __expf(-gate)) * up);
      continue;
    }
    const int n = row0 + src / 4 + (j >= 2 ? 8 : 0);
    if (n >= p.n) continue;
    float sum = row_sum(i, n);
    if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[n]);
    if (add_residual) {
      // fused_add_rms_norm's first half on this output: residual + round(x @ W^T), rounded.
      T& r = static_cast<T*>(p.residual)[m * p.residual_stride + n];
      const float updated = to_float(from_float<T>(to_float(r) + to_float(from_float<T>(sum))));
      r = from_float<T>(updated);
      squares[m][n - row0] = updated * updated;
      continue;
    }
    if (p.out_fp32) {
      static_cast<float*>(p.out)[m * p.out_stride + n] = to_float(from_float<T>(sum));
    } else {
      static_cast<T*>(p.out)[m * p.out_stride + n] = from_float<T>(sum);
    }
  }
  if (add_residual) {
    __syncthreads();
    if (threadIdx.x < p.m) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kTileN; ++j) sum += squares[threadIdx.x][j];  // column order
      p.sq_sums_out[threadIdx.x * p.sq_sums_out_stride + blockIdx.x] = sum;
    }
  }
}

static_assert(kTileN == kGemvSqSumGroup, "the residual epilogue writes one sum of squares per CTA");

// Resident CTAs per SM of one instantiation, queried once per process (every instantiation asks for
// 2 by __launch_bounds__; the query says what ptxas's registers allow). 2 if the query fails.
template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
  return cached_per_kernel<int>(kernel, [](Kernel k) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, kThreads, 0) != cudaSuccess || blocks <= 0) {
      (void)cudaGetLastError();  // a failed query is not the launch's error
      blocks = 2;
    }
    return blocks;
  });
}

// The prefetch plan of a launch of `tiles` CTAs of `kernel` (p.prefetch set): gemv_prefetch.h's rule
// with the occupancy API's resident CTAs of this kernel. Recorded for gemv_last_prefetch().
template <typename Kernel>
PrefetchPlan plan_prefetch(const DenseGemvParams& p, Kernel kernel, unsigned tiles) {
  const int64_t slots = p.num_sms > 0 ? static_cast<int64_t>(p.num_sms) * blocks_per_sm(kernel) : 0;
  const PrefetchPlan pf = plan_gemv_prefetch(p.prefetch, p.prefetch_rows, p.prefetch_row_bytes, p.prefetch_budget,
                                             p.prefetch_swiglu, slots, tiles);
  gemv_record_prefetch(GemvPrefetchInfo{pf.rows, pf.second, pf.bytes, pf.first_cta, static_cast<int>(tiles),
                                        static_cast<int>(slots)});
  return pf;
}

template <typename T>
cudaError_t launch_typed(const DenseGemvParams& p, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(p.n, kTileN));
  const bool norm = p.norm_weight != nullptr;
  if (norm && tiles_for(p.m) > 2) return cudaErrorInvalidValue;  // kGemvNormMaxM (also checked by the caller)
  const bool pre = norm && p.norm_preload;
  if (p.weight_scale != nullptr) {  // FP8 weights: M <= 16 (checked by the caller), no preload variant
    const auto kernel = tiles_for(p.m) == 1 ? (norm ? dense_gemv_kernel<T, 1, true, false, true>
                                                    : dense_gemv_kernel<T, 1, false, false, true>)
                                            : (norm ? dense_gemv_kernel<T, 2, true, false, true>
                                                    : dense_gemv_kernel<T, 2, false, false, true>);
    const PrefetchPlan pf = p.prefetch != nullptr ? plan_prefetch(p, kernel, tiles) : PrefetchPlan{};
    return launch_kernel(kernel, dim3(tiles), dim3(kThreads), 0, stream, p, pf);
  }
  const auto kernel = tiles_for(p.m) == 1
                          ? (pre ? dense_gemv_kernel<T, 1, true, true>
                                 : norm ? dense_gemv_kernel<T, 1, true> : dense_gemv_kernel<T, 1, false>)
                      : tiles_for(p.m) == 2
                          ? (pre ? dense_gemv_kernel<T, 2, true, true>
                                 : norm ? dense_gemv_kernel<T, 2, true> : dense_gemv_kernel<T, 2, false>)
                          : dense_gemv_kernel<T, 4, false>;  // norm: M <= kGemvNormMaxM
  const PrefetchPlan pf = p.prefetch != nullptr ? plan_prefetch(p, kernel, tiles) : PrefetchPlan{};
  return launch_kernel(kernel, dim3(tiles), dim3(kThreads), 0, stream, p, pf);
}

}  // namespace gemv

inline cudaError_t launch_dense_gemv_impl(const DenseGemvParams& p, cudaStream_t stream) {
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.m < 0 || p.m > kGemvMaxM || p.n < 0 || p.k <= 0 || p.k % gemv::kVecElems != 0 ||
      (p.weight_scale != nullptr && (p.m > kGemvFp8MaxM || p.k % gemv::kFp8VecElems != 0)) ||
      p.x_stride % gemv::kVecElems != 0 || !aligned16(p.x) || !aligned16(p.weight) ||
      (p.swiglu && (p.n % gemv::kTileN != 0 || p.bias != nullptr)) ||
      (p.out_fp32 && (p.swiglu || p.residual != nullptr || p.rope)) ||
      (p.residual != nullptr && (p.swiglu || p.sq_sums_out == nullptr)) ||
      (p.rope &&
       (p.swiglu || p.residual != nullptr || p.kv_cache == nullptr || p.head_dim <= 0 || p.head_dim % gemv::kTileN != 0 || p.num_heads <= 0 ||
        p.num_kv_heads <= 0 || p.block_size <= 0 || p.positions == nullptr || p.cos_sin_cache == nullptr ||
        p.slot_mapping == nullptr || static_cast<int64_t>(p.n) != static_cast<int64_t>(p.num_heads + 2 * p.num_kv_heads) * p.head_dim)) ||
      (p.norm_weight != nullptr && (p.m > kGemvNormMaxM || p.sq_sums_in == nullptr || p.sq_groups <= 0 ||
                                    !aligned16(p.norm_weight))) ||
      (p.prefetch != nullptr && (!aligned16(p.prefetch) || p.prefetch_row_bytes % 16 != 0 || p.prefetch_rows < 0 ||
                                 p.prefetch_rows > std::numeric_limits<int>::max() / 2 || p.prefetch_budget < 0 ||
                                 (p.prefetch_swiglu && p.prefetch_rows % 2 != 0)))) {
    return cudaErrorInvalidValue;
  }
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kBFloat16: return gemv::launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return gemv::launch_typed<__half>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastinfer
