// Decode GEMVs of a mixture-of-experts MLP, each (token, expert) pair against its own expert's weight,
// the expert ids read on the device (so a decode step with MoE layers can be a CUDA graph):
//   out[p] = x[p / x_group] @ W[expert_ids[p]]^T                      [P, N]
//   or, with swiglu, silu(x W_gate^T) * (x W_up^T) of W[e] = [gate; up]  [P, N / 2]
// for pairs p = 0 .. P - 1 (P = tokens x experts per token; x_group = experts per token for the gate / up
// projection, whose input is the token's row, 1 for the down projection, whose input is the pair's row).
// Each output is dense_gemv's (gemm/gemv.h) for M = 1 on that expert's weight (and scales, with FP8 weights),
// bit for bit: the same chunks, fragments and fixed-order cross-warp sum. Host-compiler safe; the kernel is gemm/moe_gemv.cuh.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/types.h"

namespace fastinfer {

struct MoeGemvParams {
  void* out;                  // [P, N] (or [P, N / 2]), rows out_stride elements apart
  const void* x;              // [P / x_group, K], rows x_stride elements apart (x_stride % 8 == 0, 16-byte aligned)
  const void* weight;         // [E, N, K] contiguous, 16-byte aligned: x's dtype, or e4m3 with weight_scale
  const float* weight_scale;  // [E, N] fp32 per-row scales of e4m3 weights (W8A16; K % 16 == 0), else nullptr
  const int32_t* expert_ids;  // [P], each in [0, E) (not checked on the device)
  int pairs;                  // P, 0 .. 65535 (the grid's x extent allows more; the binding's limit)
  int x_group;                // >= 1
  int n;                      // rows of one expert's weight (% 16 == 0 with swiglu), < 65535 x 16
  int64_t k;                  // multiple of 8
  int64_t x_stride, out_stride;
  bool swiglu;
  DType dtype;                // of out, x (and 16-bit weights): kFloat16 or kBFloat16
};

// cudaErrorInvalidValue for parameters outside the above; never synchronizes.
cudaError_t launch_moe_gemv(const MoeGemvParams& p, cudaStream_t stream);

}  // namespace fastinfer
