// Params, plan and launcher of paged decode attention (one query token per sequence).
// Host-compiler safe: the torch binding includes this; the kernels live in decode.cuh / merge.cuh.
// Strides are in elements; the last dimension of every tensor is contiguous.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

// Which decode kernel a launch may use. kAuto and kTensorCores pick the tensor-core kernel
// (decode_mma.cuh) for bf16 / fp16 queries; fp32 queries always take the CUDA-core kernel
// (decode.cuh), which kCudaCores selects for every dtype (a comparison point for benchmarks and tests).
enum class DecodeKernel : int { kAuto = 0, kCudaCores = 1, kTensorCores = 2 };

// out[b, h] = softmax(scale * q[b, h] . K[b, lo:seq_lens[b]]) @ V[b, lo:seq_lens[b]], with query head
// h reading KV head h / (num_heads / num_kv_heads) through block_tables[b]; lo = 0, or with a sliding
// window max(0, seq_lens[b] - window).
struct DecodeParams {
  void* out;                    // [batch, num_heads, head_dim]
  const void* query;            // [batch, num_heads, head_dim]
  const void* kv_cache;         // [num_blocks, 2, block_size, num_kv_heads, head_dim], contiguous
  // nullptr: kv_cache has dtype's elements. Otherwise fp32 [2] = (k_scale, v_scale) on the device and
  // kv_cache holds float8_e4m3fn: K = k_scale * k8, V = v_scale * v8 (dtype bf16 or fp16 only).
  const float* kv_scale;
  const int32_t* block_tables;  // [batch, max_blocks], rows block_table_stride apart
  const int32_t* seq_lens;      // [batch], each in [1, max_blocks * block_size]
  int64_t out_batch_stride, out_head_stride;
  int64_t query_batch_stride, query_head_stride;
  int64_t block_table_stride;
  int batch, num_heads, num_kv_heads, head_dim;
  int block_size;  // a power of two
  int max_blocks;  // block_tables.shape[1]: max_blocks * block_size is the longest context a launch plans for
  float scale;     // softmax scale, usually head_dim ** -0.5
  // > 0: sliding-window attention, the query (position seq_len - 1) sees its last `window` keys; 0
  // (zero-initialised): all of them. The plan then covers min(table, window + a key tile - 1) keys per
  // sequence (decode_work.cuh: a split starts on a whole key tile).
  int window;
  // > 0: scores s = scale q.k become softcap tanh(s / softcap) (Gemma 2), in the CUDA-core kernel only (the
  // plan takes it then); 0 (zero-initialised): none
  float softcap;
  DType dtype;     // of out and query (and kv_cache unless kv_scale is set)
  int num_sms;     // SMs of the device: the split heuristic's only hardware input
  DecodeKernel kernel;  // zero-initialised: kAuto
  // The split heuristic's CTAs per SM (FASTINFER_DECODE_CTAS_PER_SM); 0 (zero-initialised): the
  // kernel's default (decode.cuh kTargetCtasPerSm, decode_mma.cuh mma::kTargetCtasPerSm).
  int target_ctas_per_sm;
  // nullptr: the splits are merged by a second kernel (merge.cuh). Else int32 [>= batch * num_heads],
  // zero before the launch and zero after it: the last CTA of each group of splits merges them
  // (decode_work.cuh: merge_if_last), one launch instead of two.
  int* semaphores;
  // The tensor-core kernel's K / V block-table reads (prefill.h: PrefillParams::table_per_copy): 0 =
  // once per tile per warp, shuffled to the copies; 1 = before every copy (FASTINFER_ATTN_TABLE=per_copy).
  int table_per_copy;
};

// How a launch is cut up. A function of DecodeParams' shapes and num_sms alone, never of the
// seq_lens values (they live on the device), so one plan serves every replay of a captured CUDA
// graph; splits past a sequence's end write an empty state that the merge skips.
struct DecodePlan {
  int num_splits;          // CTAs along the context of one (sequence, kv head); 1 = no merge step
  int split_tokens;        // context tokens per split, a multiple of the kernel's key tile
  int num_head_chunks;     // CTAs along the query heads of one kv head: 1 unless the group is > 32 (16)
  int heads_per_cta;       // query heads per CTA
  bool tensor_cores;       // the tensor-core kernel (64-key tiles, <= 16 heads per CTA) runs
  size_t workspace_bytes;  // fp32 partial outputs + log-sum-exps of the splits; 0 when num_splits == 1
};

// Head dims with a compiled kernel; anything else is refused with cudaErrorInvalidValue. head_dim 256 (Gemma 3)
// runs the CUDA-core kernel, bf16 / fp16 only (fp32 or an e4m3 cache at 256 is refused).
inline bool decode_head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }

// Fills *plan; cudaErrorInvalidValue for parameters the kernel does not support.
cudaError_t plan_paged_decode(const DecodeParams& p, DecodePlan* plan);

// workspace: plan.workspace_bytes bytes of device memory (nullptr allowed when that is 0), 16-byte
// aligned, owned by the caller for the duration of the launch. Never synchronizes.
cudaError_t launch_paged_decode_attention(const DecodeParams& p, void* workspace, cudaStream_t stream);

}  // namespace fastinfer
