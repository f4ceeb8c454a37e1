// Params and launcher of the paged prefill attention kernel. Host-compiler safe: the binding
// includes this; the kernels live in attention/prefill.cuh.
//
// Causal attention of a ragged batch of query rows over the paged KV cache (the CPU reference,
// csrc/cpu/attention.cpp, is the spec): sequence b owns query rows cu_seqlens_q[b] ..
// cu_seqlens_q[b+1]; they are the LAST q_len tokens of a seq_lens[b]-token context already in the
// cache, so query j sits at position seq_lens[b] - q_len + j and sees keys 0 ..= that position (with
// a sliding window W > 0: keys position - W + 1 ..= position, HF's sliding_window).
// Query head h reads KV head h / (num_heads / num_kv_heads). Strides are in elements.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

struct PrefillParams {
  void* out;                    // [num_tokens, num_heads, head_dim], last dim contiguous
  const void* query;            // [num_tokens, num_heads, head_dim], last dim contiguous
  const void* kv_cache;         // [num_blocks, 2, block_size, num_kv_heads, head_dim], contiguous
  // nullptr: kv_cache has dtype's elements. Otherwise fp32 [2] = (k_scale, v_scale) on the device and
  // kv_cache holds float8_e4m3fn: K = k_scale * k8, V = v_scale * v8 (dtype bf16 or fp16 only).
  const float* kv_scale;
  const int32_t* cu_seqlens_q;  // [batch + 1]
  const int32_t* seq_lens;      // [batch]
  const int32_t* block_tables;  // [batch, max_blocks], row stride block_table_stride
  int64_t num_tokens;
  int batch;
  int num_heads, num_kv_heads, head_dim;
  int block_size;               // a power of two
  int64_t query_token_stride, query_head_stride;
  int64_t out_token_stride, out_head_stride;
  int64_t block_table_stride;
  float scale;                  // softmax scale (usually head_dim^-0.5)
  int window;                   // > 0: sliding window of that many keys; 0 (zero-initialised): full causal
  float softcap;                // > 0: scores s = scale q.k become softcap tanh(s / softcap) (Gemma 2); the
                                // mma.sync and fp32 kernels only (not launch_paged_prefill_wgmma); 0: none
  DType dtype;                  // of query and out (and kv_cache unless kv_scale is set)
  // Query rows per CTA of the bf16 / fp16 kernel: 64, 128, or 0 (zero-initialised) = 128 when the
  // sequences average >= 128 query rows, else 64. Anything else: cudaErrorInvalidValue.
  int block_m;
  // nullptr, or fp32 [num_tokens, num_heads] contiguous: each query row's natural-log softmax
  // denominator log(sum over visible keys of exp(scale * q . k)) (k = k_scale * k8 for an e4m3 cache).
  float* lse;
  // K / V block-table reads: 0 (zero-initialised) = once per key tile per warp, handed to the
  // lanes by shuffles (block sizes >= 4; smaller ones always read per copy); 1 = one global read
  // before every 16-byte copy, the loads up to visit 6 (FASTINFER_ATTN_TABLE=per_copy).
  int table_per_copy;
  // The sm_90a kernel's K / V loads (FASTINFER_ATTN_KV_LOAD): 0 (zero-initialised) = 16-byte cp.async by
  // the producer warpgroup; 1 = TMA boxes of a block's rows (one producer thread issues them; the last
  // key tile of a sequence, which holds keys past its length, still by cp.async, zero-filling them).
  // TMA applies to block sizes >= 8 with num_blocks set; other calls keep cp.async.
  int kv_tma;
  int64_t num_blocks;  // kv_cache.size(0): the TMA map's extent (0: unknown, no TMA)
};

// Head dims the kernels are compiled for; anything else is refused with cudaErrorInvalidValue. head_dim 256
// (Gemma 3): bf16 / fp16 query and cache only (fp32 or an e4m3 cache at 256 is refused too).
inline bool prefill_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }

// The bf16/fp16 tensor-core kernel copies 16-byte chunks: query, out and kv_cache must start on
// 16-byte boundaries and their token / head strides must be multiples of 8 elements. Unmet:
// cudaErrorMisalignedAddress, before anything is launched.
cudaError_t launch_paged_prefill_attention(const PrefillParams& p, cudaStream_t stream);

// The sm_90a kernel (wgmma; attention/prefill_sm90.cuh), built only when FASTINFER_CUDA_ARCHS has 90a
// (FASTINFER_HAS_SM90 in the bindings) and run only on an sm_90 GPU: bf16 / fp16 query and cache (no
// kv_scale), head_dim 64 or 128; other inputs get cudaErrorInvalidValue (block_m is not read).
cudaError_t launch_paged_prefill_wgmma(const PrefillParams& p, cudaStream_t stream);
// Launches of it that loaded K / V by TMA (PrefillParams::kv_tma in effect), process-wide.
long long prefill_tma_launch_count();

}  // namespace fastinfer
