// Paged decode attention: one query token per sequence over its paged KV cache, with GQA and
// split-KV (FlashDecoding). Two kernels share the contract, the grid, the plan and the merge: the
// CUDA-core kernel below (every dtype; fp32 queries always take it) and the tensor-core kernel of
// decode_mma.cuh, which the plan picks for bf16 / fp16 queries unless DecodeParams.kernel asks for
// the CUDA cores.
//
//   out[b, h] = softmax(scale * q[b, h] . K_b^T) @ V_b over the seq_lens[b] cached tokens of
//   sequence b, read through block_tables[b]; query head h uses KV head h / (num_heads / num_kv_heads).
//
// Layout: query/out [batch, num_heads, head_dim] (rows strided, features contiguous); kv_cache
// [num_blocks, 2, block_size, num_kv_heads, head_dim] contiguous; token pos of sequence b lives in
// block block_tables[b, pos / block_size] at offset pos % block_size. Scores are fp32 in the log2
// domain (q is premultiplied by scale * log2 e once, in shared memory); all accumulation is fp32.
//
// Parallelisation: a CTA (128 threads) owns one (sequence, kv head, split): the split's context
// tokens [base + split * split_tokens, ...) (base 0, or with a sliding window its first key: decode_work.cuh)
// and every query head of the kv head (up to 32; larger groups
// are spread over head chunks), so each K/V byte is read from global memory once per split. It walks
// the split in tiles of 32 keys, double-buffered in shared memory by 16-byte cp.async copies (one
// tile in flight while the previous one is computed; rows padded by 16 bytes so that both access
// patterns below are free of bank conflicts). Per tile:
//   - scores + softmax: warp w owns query heads w, w + 4, ...; lane j scores key j of the tile
//     against the head (q read as a shared-memory broadcast), then the warp reduces the tile max and
//     sum with shuffles and updates that head's running (m, d) in shared memory;
//   - P @ V: thread (row r, chunk c) owns 16 bytes' worth of features of one or more (query head,
//     key partition) pairs, fp32 in registers. With fewer heads than rows the tile's keys are split
//     over rows (key j to partition j % parts) so that every thread works; partitions of a head
//     share its m, so they are simply summed at the end.
// Keys past the split's end are never read: their shared-memory rows are zero-filled and their
// scores set to -inf before the exp (never "garbage * 0"); block-table entries past the sequence
// are never read either. A CTA whose split lies past its sequence's end writes only lse = -inf.
// With one split the CTA writes out[] directly; otherwise it writes its normalised fp32 output and
// lse to the workspace and merge.cuh combines the splits: a second kernel, or, given semaphores, the
// last CTA of each group of splits at the end of this one (decode_work.cuh: merge_if_last).
//
// Split heuristic (plan_paged_decode): shapes only (batch, kv heads, block_tables.shape[1] *
// block_size, SM count), so a captured CUDA graph replays with any seq_lens. Splits are added until
// about 3 CTAs per SM exist, keeping every split at >= 4 tiles (128 keys) and more for big groups
// (tensor cores: tiles of 64 keys, splits of >= 2 tiles, at most 16 query heads per CTA, and about
// 6 CTAs per SM: two waves of its 3 (2 for an e4m3 cache) resident CTAs, so the last wave's tail
// is short; B64 x 8 kv heads at 4096 tokens then takes 2 splits).
//
// Roofline, B64, 32 query / 8 kv heads, ctx 4096, head_dim 128, bf16:
//   KV bytes = 64 seq * 4096 tok * 8 heads * 128 * 2 (K, V) * 2 B = 1.07 GB -> 251 us at 4.28 TB/s
//   (torch SDPA flash reaches 2.53 TB/s on contiguous KV: 424 us). q + out: 1 MB. 512 CTAs >= 3 per
//   SM on 132 SMs, so one split and no workspace. FLOPs 4 * B * Hq * ctx * D = 4.3 GFLOP: 4 FLOP
//   per KV byte on the fp32 CUDA cores, well under their ~14 FLOP/byte ridge; bandwidth-bound.
//   Larger groups raise the FLOP per byte linearly (group 8: 8 FLOP/B); tensor cores would be the
//   next step for group >= 8.
//
// FP8 KV cache (p.kv_scale != nullptr; query / out bf16 or fp16): the cache holds float8_e4m3fn and
// K = k_scale * k8, V = v_scale * v8 with kv_scale = [k_scale, v_scale] read on the device. The
// pipeline is the same with 1-byte elements (16 features per 16-byte chunk, so a tile is half the
// bytes); a 16-byte chunk is converted e4m3x2 -> f16x2 -> fp32 (exact) where it is read from shared
// memory. The scales cost nothing: k_scale joins q's prescale (scores = (q . k8) * scale * k_scale)
// and v_scale the final normalisation (out = sum p v8 / sum p * v_scale), as in csrc/cpu/attention.cpp.
// Same roofline with half the KV bytes (B64 ctx 4096: 0.54 GB -> 125 us at 4.28 TB/s).
#pragma once
#include <cuda_fp8.h>

#include <algorithm>
#include <type_traits>

#include "fastinfer/attention/decode.h"
#include "fastinfer/attention/decode_mma.cuh"
#include "fastinfer/attention/decode_work.cuh"
#include "fastinfer/attention/merge.cuh"
#include "fastinfer/attention/state.cuh"
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTileTokens = kWarpSize;  // keys per tile: one per lane in the score phase
constexpr int kStages = 2;              // shared-memory K/V tiles: one computed, one in flight
constexpr int kMaxHeadsPerCta = 32;     // query heads sharing one CTA's K/V reads
constexpr int kChunkBytes = 16;         // one cp.async / one vector load
// A probability row: the tile's kTileTokens values of exp2(s - m), then the head's rescale factor
// alpha for this tile; the extra slot also puts consecutive heads in different banks.
constexpr int kPStride = kTileTokens + 1;
constexpr int kAlphaSlot = kTileTokens;
constexpr int kTargetCtasPerSm = 3;     // split until this many CTAs exist
constexpr int kMinSplitTiles = 4;       // ... but never below 4 tiles (128 keys) per split
constexpr int kMinCtasPerSm = 4;        // register cap (128 per thread): 4 CTAs keep 4 tiles in flight per SM

// Compile-time geometry of one (cache element C, head_dim) instantiation.
template <typename C, int kHeadDim>
struct Geometry {
  static constexpr int kVec = kChunkBytes / static_cast<int>(sizeof(C));  // features per 16-byte chunk
  static constexpr int kChunks = kHeadDim / kVec;                          // chunks per K or V row
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(C)) + kChunkBytes;  // padded
  static constexpr int kTileBytes = kTileTokens * kRowBytes;  // K (or V) of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;          // K then V
  static constexpr int kRows = kThreads / kChunks;            // P @ V rows; also keys copied per pass
  static constexpr int kCopiesPerThread = kTileTokens / kRows;  // K (and V) chunks a thread copies per tile
  static constexpr int kMaxPairsPerRow = (kMaxHeadsPerCta + kRows - 1) / kRows;

  static_assert(kHeadDim % kVec == 0 && kThreads % kChunks == 0 && kTileTokens % kRows == 0,
                "a tile's chunks must split evenly over the threads");
  static_assert(kVec % 4 == 0, "the score loop reads q as float4");
  // The per-pair fp32 outputs are summed through the (then idle) K/V stages at the end.
  static_assert(static_cast<size_t>(kMaxHeadsPerCta > kRows ? kMaxHeadsPerCta : kRows) * kHeadDim *
                        sizeof(float) <= static_cast<size_t>(kStages) * kStageBytes,
                "the output reduction buffer must fit in the K/V stages");

  // Dynamic shared memory: K/V stages, q (fp32, prescaled), probability rows, (m, d) per head.
  static constexpr size_t smem_bytes(int heads) {
    return static_cast<size_t>(kStages) * kStageBytes +
           static_cast<size_t>(heads) * (kHeadDim + kPStride + 2) * sizeof(float);
  }
};

// Pointers into the dynamic shared memory of a CTA holding `heads` query heads.
struct Smem {
  unsigned char* stages;  // [kStages][K, V][kTileTokens][row bytes]
  float* q;               // [heads][head_dim], times scale * log2 e
  float* p;               // [heads][kPStride]: exp2(s - m) of the current tile's keys, then alpha
  float* m;               // [heads] running max
  float* d;               // [heads] running denominator
};

template <typename C, int kHeadDim>
__device__ __forceinline__ Smem carve_smem(unsigned char* base, int heads) {
  using G = Geometry<C, kHeadDim>;
  Smem s;
  s.stages = base;
  s.q = reinterpret_cast<float*>(base + static_cast<size_t>(kStages) * G::kStageBytes);
  s.p = s.q + heads * kHeadDim;
  s.m = s.p + heads * kPStride;
  s.d = s.m + heads;
  return s;
}

// ---- small device helpers --------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// 16 bytes of storage dtype -> fp32.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&f)[kChunkBytes / sizeof(T)]);
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& raw, float (&f)[4]) {
  f[0] = __uint_as_float(raw.x), f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z), f[3] = __uint_as_float(raw.w);
}
template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& raw, float (&f)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}
// e4m3 -> f16 (cvt.rn.f16x2.e4m3x2) -> fp32: both steps exact, so f is the stored value itself.
template <>
__device__ __forceinline__ void unpack16<__nv_fp8_e4m3>(const uint4& raw, float (&f)[16]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __half2_raw pair =
          __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] >> (16 * h)), __NV_E4M3);
      const float2 v = __half22float2(__half2(pair));
      f[4 * w + 2 * h] = v.x, f[4 * w + 2 * h + 1] = v.y;
    }
  }
}

// ---- the phases of one tile ---------------------------------------------------------------------------

// Scores of the tile's keys against every query head of the CTA, and the online-softmax update:
// s.p[g][j] = exp2(s_gj - m_g) with m_g, d_g raised to cover the tile, s.p[g][kAlphaSlot] the factor
// that rescales head g's outputs accumulated so far.
// Keys j >= valid (past the split's end) score -inf, so their probability is exactly 0.
template <typename C, int kHeadDim>  // C: the cache element
__device__ __forceinline__ void score_tile(const Smem& s, const unsigned char* k_tile, int num_heads, int valid,
                                           int warp, int lane, float cap_log2) {
  using G = Geometry<C, kHeadDim>;
  const unsigned char* k_row = k_tile + lane * G::kRowBytes;
  for (int g = warp; g < num_heads; g += kWarps) {
    const float4* q = reinterpret_cast<const float4*>(s.q + g * kHeadDim);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four independent FMA chains
#pragma unroll 4  // enough loads in flight; full unrolling hoists every q and k load into registers
    for (int c = 0; c < G::kChunks; ++c) {
      float k[G::kVec];
      unpack16<C>(*reinterpret_cast<const uint4*>(k_row + c * kChunkBytes), k);
#pragma unroll
      for (int v = 0; v < G::kVec / 4; ++v) {
        const float4 qv = q[c * (G::kVec / 4) + v];  // the same address in every lane: a broadcast
        acc[0] = fmaf(qv.x, k[4 * v + 0], acc[0]);
        acc[1] = fmaf(qv.y, k[4 * v + 1], acc[1]);
        acc[2] = fmaf(qv.z, k[4 * v + 2], acc[2]);
        acc[3] = fmaf(qv.w, k[4 * v + 3], acc[3]);
      }
    }
    float score = (acc[0] + acc[1]) + (acc[2] + acc[3]);  // log2 units: q was scaled by scale * log2 e
    // Gemma 2's soft-capping, cap * tanh(s / cap) in natural units, is the same formula in log2 units
    if (cap_log2 > 0.0f) score = cap_log2 * tanh_accurate(score / cap_log2);
    score = lane < valid ? score : attention::neg_inf();
    // Only this warp touches head g's (m, d): read by all lanes here, written by lane 0 below after
    // the shuffles, which every lane reaches only once its read has returned.
    attention::SoftmaxStats stats{s.m[g], s.d[g]};
    const float alpha = stats.raise_max(warp_reduce_max(score));  // lane 0 is always valid: finite
    const float prob = exp2f(score - stats.m);                     // exp2(-inf) = 0 for masked keys
    stats.d += warp_reduce_sum(prob);
    s.p[g * kPStride + lane] = prob;
    if (lane == 0) {
      s.m[g] = stats.m;
      s.d[g] = stats.d;
      s.p[g * kPStride + kAlphaSlot] = alpha;
    }
  }
}

// o[i] = o[i] * alpha + sum over this thread's keys j of p[j] * V[j][its features], for the
// (head, partition) pairs of this row: p_offset[i] is the head's probability row in s.p, < 0 for a
// pair slot the row does not own.
template <typename C, typename G>  // C: the cache element, G: the Geometry<C, head_dim>
__device__ __forceinline__ void accumulate_pv(float (&o)[G::kMaxPairsPerRow][G::kVec], const Smem& s,
                                              const int (&p_offset)[G::kMaxPairsPerRow], const unsigned char* v_tile,
                                              int chunk, int first_key, int key_stride, int valid) {
#pragma unroll
  for (int i = 0; i < G::kMaxPairsPerRow; ++i) {
    if (p_offset[i] >= 0) {
      const float alpha = s.p[p_offset[i] + kAlphaSlot];
#pragma unroll
      for (int v = 0; v < G::kVec; ++v) o[i][v] *= alpha;
    }
  }
  for (int j = first_key; j < valid; j += key_stride) {
    float v[G::kVec];
    unpack16<C>(*reinterpret_cast<const uint4*>(v_tile + j * G::kRowBytes + chunk * kChunkBytes), v);
#pragma unroll
    for (int i = 0; i < G::kMaxPairsPerRow; ++i) {
      if (p_offset[i] >= 0) {
        const float prob = s.p[p_offset[i] + j];
#pragma unroll
        for (int e = 0; e < G::kVec; ++e) o[i][e] = fmaf(prob, v[e], o[i][e]);
      }
    }
  }
}

// ---- the kernel ----------------------------------------------------------------------------------------

// grid: (num_splits, num_kv_heads * num_head_chunks, batch); block: kThreads.
// T: the query / out dtype; C: the cache element (T, or __nv_fp8_e4m3 with p.kv_scale).
template <typename T, typename C, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    paged_decode_kernel(const DecodeParams p, const DecodePlan plan, float* __restrict__ partial_o,
                        float* __restrict__ partial_lse) {
  using G = Geometry<C, kHeadDim>;
  constexpr bool kFp8 = sizeof(C) == 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  CtaWork w;
  // Keys are copied one by one through the table: a split may start at any key (its sliding window's).
  if (!start_cta<T, kHeadDim, kThreads, 1>(p, plan, partial_o, partial_lse, w)) return;
  const int64_t seq = w.seq;
  const int kv_head = w.kv_head, num_heads = w.num_heads;
  const int begin = w.begin, end = w.end;

  const Smem s = carve_smem<C, kHeadDim>(smem_raw, plan.heads_per_cta);
  {
    const T* q = static_cast<const T*>(p.query) + seq * p.query_batch_stride + w.first_head * p.query_head_stride;
    const float q_scale = p.scale * attention::kLog2e * (kFp8 ? p.kv_scale[0] : 1.0f);  // k_scale folded in
    for (int i = threadIdx.x; i < num_heads * kHeadDim; i += kThreads) {
      s.q[i] = to_float(q[(i / kHeadDim) * p.query_head_stride + i % kHeadDim]) * q_scale;
    }
    for (int g = threadIdx.x; g < num_heads; g += kThreads) {
      const attention::SoftmaxStats empty = attention::SoftmaxStats::empty();
      s.m[g] = empty.m;
      s.d[g] = empty.d;
    }
  }

  // ---- K/V copies: thread t copies chunk (t % kChunks) of keys t / kChunks + i * kRows of a tile
  const int chunk = threadIdx.x % G::kChunks;
  const int row = threadIdx.x / G::kChunks;
  const int block_shift = __ffs(p.block_size) - 1;  // block_size is a power of two
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;  // elements per token
  const int64_t block_stride = 2 * p.block_size * token_stride;                  // elements per block
  const int64_t v_offset = p.block_size * token_stride;                          // K -> V in a block
  const C* cache = static_cast<const C*>(p.kv_cache) + kv_head * kHeadDim + chunk * G::kVec;
  const int32_t* block_table = p.block_tables + seq * p.block_table_stride;
  const int num_tiles = ceil_div(end - begin, kTileTokens);

  // Block ids are fetched one phase before the copies that use them, hiding the table's latency.
  auto fetch_blocks = [&](int tile, int (&blocks)[G::kCopiesPerThread]) {
#pragma unroll
    for (int i = 0; i < G::kCopiesPerThread; ++i) {
      const int pos = begin + tile * kTileTokens + row + i * G::kRows;
      blocks[i] = tile < num_tiles && pos < end ? __ldg(block_table + (pos >> block_shift)) : 0;
    }
  };
  auto issue_copies = [&](int tile, const int (&blocks)[G::kCopiesPerThread]) {
    if (tile >= num_tiles) return;
    unsigned char* k_stage = s.stages + (tile % kStages) * G::kStageBytes;
#pragma unroll
    for (int i = 0; i < G::kCopiesPerThread; ++i) {
      const int key = row + i * G::kRows;
      const int pos = begin + tile * kTileTokens + key;
      unsigned char* k_dst = k_stage + key * G::kRowBytes + chunk * kChunkBytes;
      unsigned char* v_dst = k_dst + G::kTileBytes;
      if (pos < end) {
        const C* k_src = cache + blocks[i] * block_stride + (pos & (p.block_size - 1)) * token_stride;
        cp_async_16(k_dst, k_src);
        cp_async_16(v_dst, k_src + v_offset);
      } else {  // past the split: never read, zeros so that P @ V stays finite whatever was there
        *reinterpret_cast<uint4*>(k_dst) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(v_dst) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  // ---- P @ V ownership: pair (head g, key partition) = g * parts + part, pairs spread over rows
  const int parts = max(1, G::kRows / num_heads);  // key partitions per head: > 1 when heads are few
  const int num_pairs = num_heads * parts;
  const int part = row % parts;  // the same for all of a row's pairs (they exist only when parts == 1)
  int p_offset[G::kMaxPairsPerRow];
#pragma unroll
  for (int i = 0; i < G::kMaxPairsPerRow; ++i) {
    const int pair = row + i * G::kRows;
    p_offset[i] = pair < num_pairs ? pair / parts * kPStride : -1;
  }
  float o[G::kMaxPairsPerRow][G::kVec];
#pragma unroll
  for (int i = 0; i < G::kMaxPairsPerRow; ++i) {
#pragma unroll
    for (int e = 0; e < G::kVec; ++e) o[i][e] = 0.0f;
  }

  // ---- the pipeline: tiles 0 .. kStages-2 in flight before the loop, one more issued per tile
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) {
    int blocks[G::kCopiesPerThread];
    fetch_blocks(tile, blocks);
    issue_copies(tile, blocks);
    cp_async_commit();
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile` have landed ...
    __syncthreads();               // ... everyone's too, and everyone is done with tile - 1
    int blocks[G::kCopiesPerThread];
    fetch_blocks(tile + kStages - 1, blocks);
    const unsigned char* k_tile = s.stages + (tile % kStages) * G::kStageBytes;
    const int valid = min(kTileTokens, end - begin - tile * kTileTokens);  // keys of this tile in the split
    score_tile<C, kHeadDim>(s, k_tile, num_heads, valid, warp, lane, p.softcap * attention::kLog2e);
    issue_copies(tile + kStages - 1, blocks);  // into the stage tile - 1 used
    cp_async_commit();                         // possibly empty: keeps the group count uniform
    __syncthreads();                           // probabilities and alpha of every head are in s
    if (row < num_pairs) {
      accumulate_pv<C, G>(o, s, p_offset, k_tile + G::kTileBytes, chunk, part, parts, valid);
    }
  }
  pdl_launch_dependents();  // PDL: every tile read; the next kernel may take this SM's free slots
  cp_async_wait<0>();
  __syncthreads();  // the stages are idle now: reuse them to sum the key partitions

  float* o_sum = reinterpret_cast<float*>(s.stages);  // [num_pairs][head_dim]
#pragma unroll
  for (int i = 0; i < G::kMaxPairsPerRow; ++i) {
    const int pair = row + i * G::kRows;
    if (pair < num_pairs) {
      float4* dst = reinterpret_cast<float4*>(o_sum + pair * kHeadDim + chunk * G::kVec);
#pragma unroll
      for (int v = 0; v < G::kVec / 4; ++v) {
        dst[v] = make_float4(o[i][4 * v], o[i][4 * v + 1], o[i][4 * v + 2], o[i][4 * v + 3]);
      }
    }
  }
  __syncthreads();
  const float v_scale = kFp8 ? p.kv_scale[1] : 1.0f;
  for (int i = threadIdx.x; i < num_heads * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim, feature = i % kHeadDim;
    float acc = 0.0f;
    for (int k = 0; k < parts; ++k) acc += o_sum[(g * parts + k) * kHeadDim + feature];
    // d >= 1: the split holds at least one key
    write_output<T, kHeadDim>(p, plan, w, partial_o, g, feature, acc / s.d[g] * v_scale);
  }
  if (!w.direct && threadIdx.x < num_heads) {
    const attention::SoftmaxStats stats{s.m[threadIdx.x], s.d[threadIdx.x]};
    partial_lse[w.partial_row0 + static_cast<int64_t>(threadIdx.x) * plan.num_splits] = stats.lse();
  }
  if (fused_merge(p, w)) merge_if_last<T, kHeadDim, kThreads>(p, plan, w, partial_o, partial_lse);
}

// ---- host side -----------------------------------------------------------------------------------------

inline cudaError_t plan_paged_decode_impl(const DecodeParams& p, DecodePlan* plan) {
  const bool valid = p.batch >= 0 && p.num_heads > 0 && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
                     decode_head_dim_supported(p.head_dim) && p.block_size > 0 &&
                     (p.block_size & (p.block_size - 1)) == 0 && p.max_blocks >= 0 && p.num_sms > 0 && p.window >= 0 &&
                     p.window < (1 << 30) &&
                     static_cast<int64_t>(p.max_blocks) * p.block_size <= 0x7fffffff - mma::kTileKeys;
  if (!valid || plan == nullptr) return cudaErrorInvalidValue;
  // the tensor-core kernel exists for head_dim 64 / 128; 256 takes the CUDA-core one
  // (nor softcap: only the CUDA-core kernel applies it)
  const bool tensor_cores = p.dtype != DType::kFloat32 && p.kernel != DecodeKernel::kCudaCores && p.head_dim <= 128 &&
                            p.softcap == 0.0f;
  const int tile_tokens = tensor_cores ? mma::kTileKeys : kTileTokens;
  const int group = p.num_heads / p.num_kv_heads;
  int chunks = ceil_div(group, tensor_cores ? mma::kRows : kMaxHeadsPerCta);
  const int heads_per_cta = ceil_div(group, chunks);
  chunks = ceil_div(group, heads_per_cta);  // every chunk non-empty
  if (static_cast<int64_t>(p.num_kv_heads) * chunks > 65535 || p.batch > 65535) return cudaErrorInvalidValue;

  // Keys one sequence's splits can cover: the table's, or with a sliding window its keys plus the first
  // split's alignment (< a tile; decode_work.cuh: cta_work).
  int plan_keys = p.max_blocks * p.block_size;
  if (p.window > 0) plan_keys = std::min(plan_keys, p.window + tile_tokens - 1);
  const int max_tiles = std::max(1, ceil_div(plan_keys, tile_tokens));
  const int64_t ctas = std::max<int64_t>(1, static_cast<int64_t>(p.batch) * p.num_kv_heads * chunks);
  // A split writes heads * head_dim * 4 bytes of partial output: big groups get longer splits.
  const int min_tiles = tensor_cores ? mma::kMinSplitTiles : std::max(kMinSplitTiles, ceil_div(heads_per_cta, 4));
  const int target = p.target_ctas_per_sm > 0 ? p.target_ctas_per_sm
                                              : tensor_cores ? mma::kTargetCtasPerSm : kTargetCtasPerSm;
  const int64_t wanted = ceil_div<int64_t>(static_cast<int64_t>(target) * p.num_sms, ctas);
  const int splits = static_cast<int>(std::min<int64_t>(wanted, std::max(1, max_tiles / min_tiles)));
  const int tiles_per_split = ceil_div(max_tiles, splits);

  plan->num_splits = ceil_div(max_tiles, tiles_per_split);  // drop splits that would always be empty
  plan->split_tokens = tiles_per_split * tile_tokens;
  plan->num_head_chunks = chunks;
  plan->heads_per_cta = heads_per_cta;
  plan->tensor_cores = tensor_cores;
  plan->workspace_bytes = plan->num_splits == 1 ? 0
                                                : static_cast<size_t>(p.batch) * p.num_heads * plan->num_splits *
                                                      (p.head_dim + 1) * sizeof(float);
  return cudaSuccess;
}

template <typename T, typename C, int kHeadDim>
cudaError_t launch_paged_decode(const DecodeParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream) {
  using G = Geometry<C, kHeadDim>;
  float* partial_o = static_cast<float*>(workspace);
  float* partial_lse =
      plan.num_splits == 1 ? nullptr
                           : partial_o + static_cast<size_t>(p.batch) * p.num_heads * plan.num_splits * kHeadDim;
  if constexpr (!std::is_same_v<T, float> && kHeadDim <= 128) {
    if (plan.tensor_cores) {
      FI_CUDA_TRY((mma::launch<T, C, kHeadDim>(p, plan, partial_o, partial_lse, stream)));
    }
  }
  if (!plan.tensor_cores) {
    const size_t smem = G::smem_bytes(plan.heads_per_cta);
    auto* kernel = paged_decode_kernel<T, C, kHeadDim>;
    if (smem > 48 * 1024) {
      FI_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    const dim3 grid(plan.num_splits, p.num_kv_heads * plan.num_head_chunks, p.batch);
    FI_CUDA_TRY(launch_kernel(kernel, grid, dim3(kThreads), smem, stream, p, plan, partial_o, partial_lse));
  }
  if (plan.num_splits == 1 || p.semaphores != nullptr) return cudaSuccess;  // merged in the kernel (decode_work.cuh)
  return launch_merge_splits<T, kHeadDim>(p, partial_o, partial_lse, plan.num_splits, stream);
}

template <typename T, typename C = T>
cudaError_t launch_paged_decode_for_dtype(const DecodeParams& p, const DecodePlan& plan, void* workspace,
                                          cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_paged_decode<T, C, 64>(p, plan, workspace, stream);
    case 128: return launch_paged_decode<T, C, 128>(p, plan, workspace, stream);
    case 256:  // bf16 / fp16 query and cache only (few instantiations; fp32 would spill)
      if constexpr (std::is_same_v<T, C> && !std::is_same_v<T, float>) return launch_paged_decode<T, C, 256>(p, plan, workspace, stream);
      else return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;  // unreachable after the plan's check; never a fallback
}

}  // namespace decode

inline cudaError_t launch_paged_decode_attention_impl(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  DecodePlan plan;
  FI_CUDA_TRY(decode::plan_paged_decode_impl(p, &plan));
  if (plan.workspace_bytes > 0 && (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0)) {
    return cudaErrorInvalidValue;
  }
  if (reinterpret_cast<uintptr_t>(p.kv_cache) % decode::kChunkBytes != 0) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  if (p.kv_scale != nullptr) {  // an e4m3 cache: bf16 / fp16 queries only (few instantiations)
    switch (p.dtype) {
      case DType::kFloat16: return decode::launch_paged_decode_for_dtype<__half, __nv_fp8_e4m3>(p, plan, workspace, stream);
      case DType::kBFloat16:
        return decode::launch_paged_decode_for_dtype<__nv_bfloat16, __nv_fp8_e4m3>(p, plan, workspace, stream);
      case DType::kFloat32: break;
    }
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case DType::kFloat32: return decode::launch_paged_decode_for_dtype<float>(p, plan, workspace, stream);
    case DType::kFloat16: return decode::launch_paged_decode_for_dtype<__half>(p, plan, workspace, stream);
    case DType::kBFloat16: return decode::launch_paged_decode_for_dtype<__nv_bfloat16>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastinfer
