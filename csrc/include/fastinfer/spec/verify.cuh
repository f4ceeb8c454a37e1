// Speculative-decoding verify: rejection sampling (Leviathan et al. 2023, Chen et al. 2023) and
// greedy verification for a whole batch in one launch. The rule, its fixed-point arithmetic and
// the fallbacks: fastinfer/spec/verify_math.h; the CPU reference: csrc/cpu/spec_verify.cpp.
//
// Layout: target_probs [batch, k + 1, vocab] and draft_probs [batch, k, vocab] fp32 with strides
// on the first two dimensions; ids, counts, uniforms and outputs contiguous (spec/verify.h).
//
// Parallelisation: one CTA of 1024 threads per request.
//  - Accept tests (sampling): warp 0, one proposal per lane; a ballot finds the first rejection.
//    Only p(x_i) and q(x_i) are read: 2 gathers per proposal.
//  - Residual / bonus draw: the row is cut into chunks of 512 tokens; a warp owns a chunk, each
//    lane four float4 of p (and of q) issued together, so every warp keeps 2 x 4 x 512 B in
//    flight. Pass 1 stores every chunk's fixed-point mass in shared memory (2048 chunks max,
//    16 KiB: vocab <= 2^20) and reduces the total. Pass 2, warp 0 alone: a warp scan over the
//    chunk masses finds the chunk holding the threshold, then a warp scan over that chunk's
//    512 tokens (re-read from L1/L2) finds the token. The row is read from DRAM once.
//  - Greedy: a block argmax (first index on ties) of rows 0, 1, ... until the first mismatch.
//
// Roofline, B = 16, k = 4, V = 128256 (Llama 3), fp32: the inputs are 41.0 MB of target_probs and
// 32.8 MB of draft_probs, but the op reads only what the rule needs:
//  - sampling: 2 x 4 x 16 gathered probabilities (~4 KB of sectors) plus, per request, one p row
//    and one q row at the first rejection (2 x 128256 x 4 B = 1.03 MB; 0.51 MB for the bonus or a
//    one-hot q): at most 16.4 MB -> 3.8 us at the 4.28 TB/s copy ceiling of GPU.md.
//  - greedy: argmax of up to k + 1 rows: at most 5 x 0.51 MB = 2.57 MB per request, 41.0 MB
//    (9.6 us) when everything is accepted.
// With one CTA per request only 16 of 132 SMs stream at B = 16; 32 warps x 4 KiB in flight per
// SM at ~1 us DRAM latency is ~130 GB/s per SM, so expect ~8 us (sampling; greedy streams one row
// at a time with half that in flight: up to ~40 us when all k + 1 rows are read), latency-bound,
// and bandwidth-bound only from B ~ 132. Splitting the vocabulary over several CTAs per request
// would close that gap (estimates; not measured).
#pragma once
#include <climits>

#include "fastinfer/common.cuh"
#include "fastinfer/spec/verify.h"

namespace fastinfer {
namespace spec {

constexpr int kThreads = 1024;
constexpr int kNumWarps = kThreads / kWarpSize;
constexpr int kVec = 4;                                   // fp32 per 16-byte load
constexpr int kUnitElems = kWarpSize * kVec;              // one float4 per lane
constexpr int kUnitsPerChunk = 4;                         // float4 per lane and row in flight
constexpr int kChunkElems = kUnitElems * kUnitsPerChunk;  // 512 tokens
constexpr int kMaxChunks = kMaxVocab / kChunkElems;       // 2048
static_assert(kMaxVocab % kChunkElems == 0, "the chunk table must cover kMaxVocab exactly");
constexpr int64_t kNoToken = -1;

struct SharedStorage {
  uint64_t chunk_mass[kMaxChunks];  // fixed-point mass of every 512-token chunk of the row
  uint64_t warp_mass[kNumWarps];
  float warp_value[kNumWarps];
  int warp_index[kNumWarps];
  int64_t token;  // broadcast from warp 0
  int num_accepted;
};

// q at one position: a row of draft probabilities, one-hot on `onehot` (proposers without
// probabilities), or zero (bonus draw / fallback to p: residual_fixed(p, 0) == to_fixed(p)).
struct DraftDist {
  const float* row = nullptr;
  int64_t onehot = -1;
  __device__ bool empty() const { return row == nullptr && onehot < 0; }
};

struct ArgMax {
  float value;
  int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ float component(const float4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;  // e is unrolled: a register pick
}

// Four consecutive tokens from idx; past the row they read as 0 (zero mass, never the argmax).
template <bool kAligned>
__device__ __forceinline__ float4 load4(const float* __restrict__ row, int idx, int vocab) {
  if constexpr (kAligned) {  // vocab % 4 == 0: a vector lies wholly inside or wholly past the row
    return idx < vocab ? __ldg(reinterpret_cast<const float4*>(row + idx)) : make_float4(0.f, 0.f, 0.f, 0.f);
  } else {
    float4 v;
    v.x = idx + 0 < vocab ? __ldg(row + idx + 0) : 0.0f;
    v.y = idx + 1 < vocab ? __ldg(row + idx + 1) : 0.0f;
    v.z = idx + 2 < vocab ? __ldg(row + idx + 2) : 0.0f;
    v.w = idx + 3 < vocab ? __ldg(row + idx + 3) : 0.0f;
    return v;
  }
}

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ uint64_t warp_inclusive_scan(uint64_t v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const uint64_t other = __shfl_up_sync(kFullMask, v, delta);
    if (lane >= delta) v += other;
  }
  return v;
}

// Fixed-point masses of tokens j .. j + 3, from their p and q values (q.row) or q.onehot.
__device__ __forceinline__ void unit_masses(const float4& pv, const float4& qv, const DraftDist& q, int j,
                                            uint64_t (&mass)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float qj = q.row ? sanitize_prob(component(qv, e)) : (j + e == q.onehot ? 1.0f : 0.0f);
    mass[e] = residual_fixed(sanitize_prob(component(pv, e)), qj);
  }
}

// p and q of the 128-token unit `u` of `chunk`: lane l gets tokens 4 l .. 4 l + 3 of the unit.
template <bool kAligned>
__device__ __forceinline__ void load_unit(const float* p_row, const DraftDist& q, int chunk, int u, int vocab,
                                          float4& pv, float4& qv) {
  const int j = chunk * kChunkElems + u * kUnitElems + (threadIdx.x % kWarpSize) * kVec;
  pv = load4<kAligned>(p_row, j, vocab);
  qv = q.row ? load4<kAligned>(q.row, j, vocab) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// Pass 1: every chunk's mass into smem.chunk_mass; returns the row's total to every thread.
template <bool kAligned>
__device__ uint64_t row_mass(const float* p_row, const DraftDist& q, int vocab, SharedStorage& smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_chunks = ceil_div(vocab, kChunkElems);
  uint64_t warp_total = 0;
  for (int c = warp; c < num_chunks; c += kNumWarps) {
    float4 pv[kUnitsPerChunk], qv[kUnitsPerChunk];
#pragma unroll
    for (int u = 0; u < kUnitsPerChunk; ++u) load_unit<kAligned>(p_row, q, c, u, vocab, pv[u], qv[u]);
    uint64_t lane_total = 0;
#pragma unroll
    for (int u = 0; u < kUnitsPerChunk; ++u) {
      uint64_t mass[kVec];
      unit_masses(pv[u], qv[u], q, c * kChunkElems + u * kUnitElems + lane * kVec, mass);
#pragma unroll
      for (int e = 0; e < kVec; ++e) lane_total += mass[e];
    }
    const uint64_t chunk_total = warp_sum(lane_total);
    if (lane == 0) smem.chunk_mass[c] = chunk_total;
    warp_total += chunk_total;
  }
  __syncthreads();  // warp_mass may still be read by an earlier reduction
  if (lane == 0) smem.warp_mass[warp] = warp_total;
  __syncthreads();  // also publishes chunk_mass
  uint64_t total = 0;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) total += smem.warp_mass[w];
  return total;
}

// Pass 2, warp 0 only: the smallest token whose inclusive prefix mass exceeds `threshold`
// (< the row total, so it exists). Integer sums make the answer independent of the scan order.
template <bool kAligned>
__device__ int64_t search(const float* p_row, const DraftDist& q, int vocab, uint64_t threshold,
                          const SharedStorage& smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int num_chunks = ceil_div(vocab, kChunkElems);
  // Which chunk: each lane owns a contiguous run of chunks.
  const int per_lane = ceil_div(num_chunks, kWarpSize);
  const int first = min(lane * per_lane, num_chunks), last = min(first + per_lane, num_chunks);
  uint64_t lane_total = 0;
  for (int c = first; c < last; ++c) lane_total += smem.chunk_mass[c];
  uint64_t before = warp_inclusive_scan(lane_total) - lane_total;
  const bool owner = before <= threshold && threshold < before + lane_total;
  const unsigned owners = __ballot_sync(kFullMask, owner);
  if (owners == 0) return vocab - 1;  // unreachable while threshold < total
  int chunk = first;
  if (owner) {
    while (chunk + 1 < last && before + smem.chunk_mass[chunk] <= threshold) before += smem.chunk_mass[chunk++];
  }
  const int owner_lane = __ffs(owners) - 1;
  chunk = __shfl_sync(kFullMask, chunk, owner_lane);
  before = __shfl_sync(kFullMask, before, owner_lane);

  // Which token of the chunk: one 128-token unit at a time, lane l owns 4 consecutive tokens.
  for (int u = 0; u < kUnitsPerChunk; ++u) {
    float4 pv, qv;
    load_unit<kAligned>(p_row, q, chunk, u, vocab, pv, qv);
    const int j = chunk * kChunkElems + u * kUnitElems + lane * kVec;
    uint64_t mass[kVec];
    unit_masses(pv, qv, q, j, mass);
    uint64_t mine = 0;
#pragma unroll
    for (int e = 0; e < kVec; ++e) mine += mass[e];
    const uint64_t inclusive = warp_inclusive_scan(mine);
    uint64_t cumulative = before + inclusive - mine;
    const unsigned crossing = __ballot_sync(kFullMask, cumulative <= threshold && threshold < cumulative + mine);
    if (crossing != 0) {  // the crossing lane walks its 4 tokens; the others' answers are unused
      int found = kVec - 1;
      bool passed = false;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        cumulative += mass[e];
        if (!passed && cumulative > threshold) found = e, passed = true;
      }
      const int64_t token = j + found;
      return __shfl_sync(kFullMask, token, __ffs(crossing) - 1);
    }
    before += __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
  }
  return vocab - 1;  // unreachable: the chunk holds the threshold
}

// Block argmax of the sanitized row, first index on ties; every thread gets the index.
template <bool kAligned>
__device__ int64_t block_argmax(const float* row, int vocab, SharedStorage& smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_chunks = ceil_div(vocab, kChunkElems);
  ArgMax best{-1.0f, INT_MAX};  // below every sanitized probability
  for (int c = warp; c < num_chunks; c += kNumWarps) {
    const int first = c * kChunkElems + lane * kVec;
    float4 v[kUnitsPerChunk];
#pragma unroll
    for (int u = 0; u < kUnitsPerChunk; ++u) v[u] = load4<kAligned>(row, first + u * kUnitElems, vocab);
#pragma unroll
    for (int u = 0; u < kUnitsPerChunk; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int j = first + u * kUnitElems + e;
        if (j < vocab) best = better(best, {sanitize_prob(component(v[u], e)), j});
      }
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const ArgMax other{__shfl_xor_sync(kFullMask, best.value, offset), __shfl_xor_sync(kFullMask, best.index, offset)};
    best = better(best, other);
  }
  __syncthreads();  // warp_value / warp_index may still be read by an earlier call
  if (lane == 0) smem.warp_value[warp] = best.value, smem.warp_index[warp] = best.index;
  __syncthreads();
  best = {smem.warp_value[0], smem.warp_index[0]};
#pragma unroll
  for (int w = 1; w < kNumWarps; ++w) best = better(best, {smem.warp_value[w], smem.warp_index[w]});
  return best.index;
}

// Residual (or bonus) draw with the fallbacks of verify_math.h; every thread gets the token.
template <bool kAligned>
__device__ int64_t draw(const float* p_row, DraftDist q, int vocab, float uniform, SharedStorage& smem) {
  uint64_t total = row_mass<kAligned>(p_row, q, vocab, smem);
  if (total == 0 && !q.empty()) {  // block-uniform branch
    q = DraftDist{};
    total = row_mass<kAligned>(p_row, q, vocab, smem);
  }
  if (total == 0) return block_argmax<kAligned>(p_row, vocab, smem);
  if (threadIdx.x < kWarpSize) {
    const int64_t token = search<kAligned>(p_row, q, vocab, cdf_threshold(total, uniform), smem);
    if (threadIdx.x == 0) smem.token = token;
  }
  __syncthreads();
  return smem.token;
}

// Sampling mode: how many proposals pass their accept test before the first rejection (warp 0,
// a lane per proposal). An id outside [0, vocab) counts as rejected: never read out of bounds.
__device__ int count_accepted(const SpecVerifyParams& p, int64_t b, int num_draft, SharedStorage& smem) {
  if (threadIdx.x < kWarpSize) {
    const int lane = threadIdx.x;
    int accepted = num_draft;
    for (int base = 0; base < num_draft; base += kWarpSize) {
      const int i = base + lane;
      bool reject = false;
      if (i < num_draft) {
        const int64_t x = p.draft_token_ids[b * p.k + i];
        if (x < 0 || x >= p.vocab) {
          reject = true;
        } else {
          const float px = sanitize_prob(p.target_probs[b * p.target_batch_stride + i * p.target_pos_stride + x]);
          const float qx = p.draft_probs
                               ? sanitize_prob(p.draft_probs[b * p.draft_batch_stride + i * p.draft_pos_stride + x])
                               : 1.0f;
          reject = !accept_draft(p.uniform_accept[b * p.k + i], px, qx);
        }
      }
      const unsigned rejected = __ballot_sync(kFullMask, reject);
      if (rejected != 0) {
        accepted = base + __ffs(rejected) - 1;
        break;
      }
    }
    if (lane == 0) smem.num_accepted = accepted;
  }
  __syncthreads();
  return smem.num_accepted;
}

template <bool kAligned>
__global__ void __launch_bounds__(kThreads) speculative_verify_kernel(const SpecVerifyParams p) {
  __shared__ SharedStorage smem;
  const int64_t b = blockIdx.x;
  const int64_t* draft = p.draft_token_ids + b * p.k;
  const int num_draft = min(max(p.num_draft_tokens[b], 0), p.k);  // validated; clamped to stay in bounds
  const float* target = p.target_probs + b * p.target_batch_stride;

  int accepted;
  int64_t token;
  if (p.greedy) {
    for (accepted = 0;; ++accepted) {
      token = block_argmax<kAligned>(target + accepted * p.target_pos_stride, p.vocab, smem);
      if (accepted == num_draft || draft[accepted] != token) break;
    }
  } else {
    accepted = count_accepted(p, b, num_draft, smem);
    DraftDist q;
    if (accepted < num_draft) {
      if (p.draft_probs) {
        q.row = p.draft_probs + b * p.draft_batch_stride + accepted * p.draft_pos_stride;
      } else {
        q.onehot = draft[accepted];
      }
    }
    token = draw<kAligned>(target + accepted * p.target_pos_stride, q, p.vocab, p.uniform_sample[b], smem);
  }

  int64_t* out = p.output_token_ids + b * (p.k + 1);
  for (int i = threadIdx.x; i <= p.k; i += kThreads) out[i] = i < accepted ? draft[i] : (i == accepted ? token : kNoToken);
  if (threadIdx.x == 0) p.num_accepted[b] = accepted;
}

inline bool is_aligned(const void* ptr, int64_t stride0, int64_t stride1) {
  return reinterpret_cast<uintptr_t>(ptr) % (kVec * sizeof(float)) == 0 && stride0 % kVec == 0 && stride1 % kVec == 0;
}

}  // namespace spec

inline cudaError_t launch_speculative_verify_impl(const SpecVerifyParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.vocab < 1 || p.vocab > spec::kMaxVocab || p.k < 0 || p.batch > INT_MAX) return cudaErrorInvalidValue;
  if (!p.greedy && (p.uniform_sample == nullptr || (p.k > 0 && p.uniform_accept == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const bool aligned = p.vocab % spec::kVec == 0 &&
                       spec::is_aligned(p.target_probs, p.target_batch_stride, p.target_pos_stride) &&
                       (p.draft_probs == nullptr ||
                        spec::is_aligned(p.draft_probs, p.draft_batch_stride, p.draft_pos_stride));
  const dim3 grid(static_cast<unsigned>(p.batch));
  if (aligned) {
    spec::speculative_verify_kernel<true><<<grid, spec::kThreads, 0, stream>>>(p);
  } else {
    spec::speculative_verify_kernel<false><<<grid, spec::kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace fastinfer
