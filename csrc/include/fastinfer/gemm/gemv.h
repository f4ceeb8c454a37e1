// Dense decode GEMM ("GEMV"): out[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for M = 1..32, or with
// swiglu set, out[M, N / 2] = silu(x @ W[:N/2]^T) * (x @ W[N/2:]^T) (the fused gate / up projection).
// Two more options fuse a decode step's residual add + RMSNorm into the GEMVs around it (gemv.cuh,
// "Residual and RMSNorm"): a residual epilogue (the o / down projections) and an RMSNorm prologue
// (the q/k/v and gate / up projections).
// Host-compiler safe: the torch binding includes this; the kernel lives in gemm/gemv.cuh, whose
// header comment explains the design and the bandwidth arithmetic.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

constexpr int kGemvMaxM = 32;  // rows of x: up to four mma n8 tiles

struct DenseGemvParams {
  void* out;            // [M, N], rows out_stride elements apart
  const void* x;        // [M, K], rows x_stride elements apart (x_stride % 8 == 0, 16-byte aligned)
  const void* weight;   // [N, K], contiguous, 16-byte aligned
  const void* bias;     // [N] or nullptr
  int m;                // 1..kGemvMaxM
  int n;                // >= 1
  int64_t k;            // multiple of 8 (16-byte rows)
  int64_t x_stride, out_stride;
  DType dtype;          // of out, x, weight, bias: kFloat16 or kBFloat16
  // FP8 weights (W8A16; gemv.cuh, "FP8 weights"), when weight_scale != nullptr: weight is e4m3 [N, K]
  // (K % 16 == 0, M <= kGemvFp8MaxM) and every output is round(x @ float(W[n])^T * weight_scale[n] (+ bias)),
  // the sum taken over the exactly converted e4m3 values; the epilogues then proceed as for 16-bit weights.
  const float* weight_scale;  // [N] fp32, one scale per weight row
  // SwiGLU epilogue (dense_gemv_silu_mul): W = [gate; up] with N = 2 F rows (F % 8 == 0, no bias);
  // out [M, F] = silu(round(x @ gate^T)) * round(x @ up^T), rounded once more: bit for bit
  // silu_and_mul(dense_gemv(x, W)).
  bool swiglu;
  // out holds float32 (the plain epilogue only): each output rounded to dtype, then widened, i.e.
  // dense_gemv(...).float() in one pass (the LM head's fp32 logits).
  bool out_fp32;
  // Residual epilogue (dense_gemv_add_residual), when residual != nullptr: out is not written;
  // residual[m, n] = round(residual[m, n] + round(x @ W^T + bias)), and
  // sq_sums_out[m * sq_sums_out_stride + n / 16] = the fp32 sum of residual[m, n']^2 (the new,
  // rounded values) over the 16 columns n' of n's group, in column order. Not with swiglu.
  void* residual;       // [M, N], rows residual_stride elements apart
  int64_t residual_stride;
  float* sq_sums_out;   // [M, ceil(N / 16)]
  int64_t sq_sums_out_stride;
  // RMSNorm prologue (rms_norm_dense_gemv), when norm_weight != nullptr: x is normalized as it is
  // loaded, x'[m, k] = round(x[m, k] * inv_rms[m] * norm_weight[k]) (rms_norm's formula), with
  // inv_rms[m] = rsqrt(sum(sq_sums_in[m, 0 .. sq_groups - 1]) / K + eps): the sums of squares of x's
  // row m over groups of its columns (sq_sums_out of the residual epilogue that wrote x).
  const void* norm_weight;   // [K], dtype
  const float* sq_sums_in;   // [M, sq_groups], rows sq_sums_in_stride apart
  int64_t sq_sums_in_stride;
  int sq_groups;
  float eps;
  bool norm_preload;         // load the first W chunk before the prologue (gemv.cuh kPreload); same results
  // Rotary + KV-cache epilogue (dense_gemv_rope_cache), when rope is set: W = [Wq; Wk; Wv],
  // N = (num_heads + 2 num_kv_heads) head_dim rows (head_dim % 16 == 0, rotary over the whole head,
  // bias allowed, not with swiglu or residual). Each output is rounded to dtype, then query and key
  // heads are rotated as rotary_embedding does (layers/rope.cuh, fp32 cos / sin, rounded once more):
  // query to out ([M, num_heads, head_dim], token rows out_stride apart, heads head_dim apart), key
  // and value to the 16-bit cache slot slot_mapping[m] (-1: not written), as reshape_and_cache.
  bool rope;
  void* kv_cache;               // [num_blocks >= 1, 2, block_size, num_kv_heads, head_dim], dtype
  const int64_t* positions;     // [M]
  const float* cos_sin_cache;   // [max_position, head_dim]: cos then sin, head_dim / 2 each
  const int64_t* slot_mapping;  // [M]
  int num_heads, num_kv_heads, head_dim, block_size;
  // L2 prefetch of the next GEMV's weight (gemv.cuh, "L2 prefetch across kernels"): a hint that changes
  // no result. When prefetch != nullptr, this grid's last wave of CTAs, as each warp leaves its K loop,
  // asks L2 for the first bytes of the rows the next dense GEMV's first wave will read, about
  // prefetch_budget bytes in all. The next weight is [prefetch_rows, prefetch_row_bytes] bytes (16-bit or
  // e4m3 elements), contiguous, 16-byte aligned; prefetch_swiglu: the next GEMV is the SwiGLU one (its CTAs read
  // gate and up rows in pairs). num_sms (> 0 with a prefetch) sizes the waves.
  const void* prefetch;
  int64_t prefetch_rows;
  int64_t prefetch_row_bytes;
  int64_t prefetch_budget;
  bool prefetch_swiglu;
  int num_sms;
};

// Rows of x the FP8-weight kernels take (one or two x tiles; FP8 x tiles are twice as many registers).
constexpr int kGemvFp8MaxM = 16;

constexpr int kGemvSqSumGroup = 16;  // columns per sum of squares of the residual epilogue (a CTA's rows)
// Rows of x the RMSNorm prologue takes: with 4 x tiles (M > 16) its registers would spill.
constexpr int kGemvNormMaxM = 16;

// The prefetch plan of the last launch given a prefetch (fastinfer._C.gemv_last_prefetch(): the cuda
// tests check that one was made and what it holds). rows == 0: the plan was empty.
struct GemvPrefetchInfo {
  int rows, second, bytes, first_cta, tiles, slots;
};
GemvPrefetchInfo gemv_last_prefetch();
void gemv_record_prefetch(const GemvPrefetchInfo& info);  // by the launcher (csrc/cuda/gemv.cu)

// cudaErrorInvalidValue for shapes, alignments or dtypes the kernel does not support. Never
// synchronizes; M == 0 or N == 0 launches nothing.
cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t stream);

}  // namespace fastinfer
