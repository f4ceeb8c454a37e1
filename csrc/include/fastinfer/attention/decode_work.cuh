// What one CTA of a paged decode kernel owns, shared by the CUDA-core (decode.cuh) and the
// tensor-core (decode_mma.cuh) kernels: grid (num_splits, num_kv_heads * num_head_chunks, batch), a
// CTA takes the context tokens [begin, end) of split blockIdx.x of one sequence, for a chunk of the
// query heads that share one KV head. Also the empty split's output and the cp.async group wait.
#pragma once
#include "fastinfer/attention/decode.h"
#include "fastinfer/attention/merge.cuh"
#include "fastinfer/attention/state.cuh"
#include "fastinfer/common.cuh"

namespace fastinfer {
namespace decode {

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

struct CtaWork {
  int64_t seq;
  int kv_head;
  int first_head;           // global index of the CTA's first query head
  int num_heads;            // query heads of the CTA, >= 1 (the plan)
  int begin, end;           // context tokens of the split; begin >= end: the split is empty
  int lo;                   // first key the query sees (0, or seq_len - window); keys below it score -inf
  bool direct;              // one split: write out[] here, no merge step
  int used_splits;          // fused merge: the splits holding tokens of this sequence (the rest exit)
  int64_t partial_row0;     // workspace row of (seq, first_head, split); head g adds g * num_splits
};

// With the fused merge (p.semaphores set) a launch plans num_splits for the block table's width (so
// that a captured graph replays with any seq_lens), but only the first ceil((seq_len - base) / split_tokens)
// splits of a sequence hold tokens (base: 0, or a sliding window's first key rounded down, cta_work). Those alone take part: the others exit at once (no -inf lse to
// write, no count on the semaphore), the last of the used splits merges only them, and a sequence
// that fits one split writes out[] directly with no workspace round trip and no merge. At batch 1
// with a 8192-token table and a 150-token context that is 2 of 64 splits per KV head (visit 5's
// profile: 8.7 us per layer, 512 CTAs of which 496 only wrote -inf and counted). Without semaphores
// (the separate merge kernel reads every split) the empty splits still write lse = -inf.
__device__ __forceinline__ bool dynamic_splits(const DecodeParams& p, const DecodePlan& plan) {
  return p.semaphores != nullptr && plan.num_splits > 1;
}

// kKeyAlign: the alignment of a split's first key the kernel needs (a power of two): the splits of a
// sequence cover [base, seq_len) from base = lo rounded down to it, so with a sliding window the
// keys [base, lo) of the first split are read (they are the sequence's own, valid keys) and masked
// by a kernel with kKeyAlign > 1 (P = 0 times their V: finite because the engine keeps every block a
// query's window reaches, rounded down to 128 keys, python/fastinfer/block_manager.py; entries below
// that may be stale ids, never read); with kKeyAlign = 1 the first split starts at lo itself.
template <int kKeyAlign>
__device__ __forceinline__ CtaWork cta_work(const DecodeParams& p, const DecodePlan& plan) {
  CtaWork w;
  const int split = blockIdx.x;
  w.kv_head = blockIdx.y / plan.num_head_chunks;
  const int head_chunk = blockIdx.y % plan.num_head_chunks;
  w.seq = blockIdx.z;
  const int group = p.num_heads / p.num_kv_heads;
  w.first_head = w.kv_head * group + head_chunk * plan.heads_per_cta;
  w.num_heads = min(plan.heads_per_cta, group - head_chunk * plan.heads_per_cta);
  const int capacity = p.max_blocks * p.block_size;  // fits an int (plan)
  const int seq_len = min(max(p.seq_lens[w.seq], 0), capacity);  // defensive: never index past the table
  // seq_len - window < 2^30 + 2^30 (the binding's bounds): no overflow, nor in base + the plan's splits
  w.lo = p.window > 0 ? max(0, seq_len - p.window) : 0;
  const int base = w.lo & ~(kKeyAlign - 1);
  w.begin = base + split * plan.split_tokens;
  w.end = min(seq_len, w.begin + plan.split_tokens);
  w.used_splits = seq_len == 0 ? 0 : (seq_len - base + plan.split_tokens - 1) / plan.split_tokens;
  w.direct = plan.num_splits == 1 || (dynamic_splits(p, plan) && w.used_splits <= 1);
  w.partial_row0 = (w.seq * p.num_heads + w.first_head) * plan.num_splits + split;
  return w;
}

// A split past its sequence's end (or an empty sequence): zeros into out[] when it is the only split,
// else lse = -inf, which the merge skips without reading the partial output.
template <typename T, int kHeadDim, int kThreads>
__device__ __forceinline__ void write_empty_split(const DecodeParams& p, const DecodePlan& plan, const CtaWork& w,
                                                  float* partial_lse) {
  if (w.direct) {
    for (int i = threadIdx.x; i < w.num_heads * kHeadDim; i += kThreads) {
      static_cast<T*>(p.out)[w.seq * p.out_batch_stride + (w.first_head + i / kHeadDim) * p.out_head_stride +
                             i % kHeadDim] = from_float<T>(0.0f);
    }
  } else if (threadIdx.x < w.num_heads) {
    partial_lse[w.partial_row0 + static_cast<int64_t>(threadIdx.x) * plan.num_splits] = attention::neg_inf();
  }
}

// The fused split-KV merge (p.semaphores set, more than one split): the end of every CTA of both
// decode kernels, called by all its threads once its partial output and lse are written. The used CTAs
// of one group (sequence, kv head, head chunk: blockIdx.z, blockIdx.y) count themselves on the group's
// semaphore; the one that arrives last, which knows that every used split's partials are written, merges
// the group's query heads into out[] (merge.cuh: merge_row, the merge kernel's code, so the results
// are the same bit for bit); its count wraps the semaphore back to 0 for the next launch. Ordering: every
// writer fences (__threadfence: its partials visible to the GPU) before the barrier that precedes the
// count, the last CTA fences after it, and the merge reads through L2 (ld.global.cg), never a stale L1
// line. The semaphores start at 0 (their owner zeroes them once) and every launch leaves them at 0,
// so a captured graph replays with no memset. Saves the merge kernel: one launch per layer of a step.
template <typename T, int kHeadDim, int kThreads>
__device__ __forceinline__ void merge_if_last(const DecodeParams& p, const DecodePlan& plan, const CtaWork& w,
                                              const float* partial_o, const float* partial_lse) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    // atomicInc wraps to 0 after used_splits - 1: the last arrival leaves the count at 0 by itself.
    // Contract: the count is 0 when a launch starts and no other launch uses it meanwhile. A count
    // left wrong (a foreign buffer, an aborted launch) does not heal: counting modulo used_splits, a
    // start at k merges k arrivals early in later launches, and k >= used_splits never merges.
    auto* count = reinterpret_cast<unsigned*>(p.semaphores) + (w.seq * gridDim.y + blockIdx.y);
    const unsigned last = static_cast<unsigned>(w.used_splits - 1);  // >= 1: one used split is direct
    is_last = atomicInc(count, last) == last;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int g = threadIdx.x / kWarpSize; g < w.num_heads; g += kThreads / kWarpSize) {
    merge_row<T, kHeadDim>(p, partial_o, partial_lse, plan.num_splits, w.used_splits, w.seq, w.first_head + g,
                           threadIdx.x % kWarpSize);
  }
}

// Whether a CTA ends with merge_if_last.
__device__ __forceinline__ bool fused_merge(const DecodeParams& p, const CtaWork& w) {
  return !w.direct && p.semaphores != nullptr;
}

// The start of both decode kernels: PDL (common.cuh: wait for the previous kernel), the CTA's work, and
// an empty split written out (lse = -inf for the merge kernel, or zeros into out[] when it is the only
// split). With the fused merge an empty split is unused and simply returns (dynamic_splits), so it
// never counts on a semaphore. False: the CTA has nothing more to do.
template <typename T, int kHeadDim, int kThreads, int kKeyAlign>
__device__ __forceinline__ bool start_cta(const DecodeParams& p, const DecodePlan& plan, const float* partial_o,
                                          float* partial_lse, CtaWork& w) {
  pdl_wait();  // the dependents are triggered after the K/V loop (the kernels' end_of_main_loop), or on exit
  w = cta_work<kKeyAlign>(p, plan);
  if (w.begin < w.end) return true;
  if (dynamic_splits(p, plan) && blockIdx.x > 0) return false;  // an unused split (split 0 of an empty sequence writes zeros: direct)
  write_empty_split<T, kHeadDim, kThreads>(p, plan, w, partial_lse);
  return false;
}

// One finished value of query head g (of the CTA), feature `feature`: into out[] or the workspace.
template <typename T, int kHeadDim>
__device__ __forceinline__ void write_output(const DecodeParams& p, const DecodePlan& plan, const CtaWork& w,
                                             float* partial_o, int g, int feature, float value) {
  if (w.direct) {
    static_cast<T*>(p.out)[w.seq * p.out_batch_stride + (w.first_head + g) * p.out_head_stride + feature] =
        from_float<T>(value);
  } else {
    partial_o[(w.partial_row0 + static_cast<int64_t>(g) * plan.num_splits) * kHeadDim + feature] = value;
  }
}

}  // namespace decode
}  // namespace fastinfer
