// 4-bit decode GEMVs of a mixture-of-experts MLP (moe_int4_linear): each (token, expert) pair against its
// own expert's packed weight, the expert ids read on the device (so a decode step of a GPTQ / AWQ / int4 MoE
// model can be a CUDA graph):
//   out[p] = x[p / x_group] @ W[expert_ids[p]]^T        [P, N]
// for pairs p = 0 .. P - 1 (P = tokens x experts per token; x_group = experts per token for the gate / up
// projection, whose input is the token's row, 1 for the down projection, whose input is the pair's row).
// W[e] is int4_linear's packed layout (gemm/w4a16.h) of one expert, stacked along a leading expert
// dimension: qweight [E, N / 64, 8 K], scales / zeros / mins [E, K / group_size, N]. Each output row is the
// small GEMV kernel's strip sums (w4a16_small.cuh, deferred scales, M = 1) over the whole K in one CTA: what
// int4_linear computes at M = 1 when its auto choice runs that kernel without a K split (with a split, or
// another FASTINFER_INT4_KERNEL, the sums are ordered differently: equal within rounding, not bit for bit;
// the CPU reference is int4_linear per pair exactly). Host-compiler safe; the kernel is
// gemm/moe_w4a16.cuh (sm_90a build only, as int4_linear).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastinfer/gemm/int4_layout.h"
#include "fastinfer/types.h"

namespace fastinfer {

struct MoeW4A16Params {
  void* out;                  // [P, N], rows out_stride elements apart
  const void* x;              // [P / x_group, K], rows x_stride elements apart (x_stride % 8 == 0, 16-byte aligned)
  const uint32_t* qweight;    // [E, N / 64, 8 K] contiguous, 16-byte aligned
  const void* scales;         // [E, K / group_size, N] contiguous, 16-byte aligned
  const void* offsets;        // zeros or mins like scales; nullptr for kSymmetric
  const int32_t* expert_ids;  // [P], each in [0, E) (not checked on the device)
  int pairs;                  // P, 0 .. 65535
  int x_group;                // >= 1
  int n, k, group_size;       // N % 64 == 0 (N / 64 <= 65535), K % 64 == 0, K % group_size == 0; group 32 / 64 / 128
  int64_t x_stride, out_stride;
  Int4Mode mode;
  DType dtype;                // of out, x, scales, offsets: kFloat16 or kBFloat16
};

// cudaErrorInvalidValue for parameters outside the above; never synchronizes.
cudaError_t launch_moe_w4a16(const MoeW4A16Params& p, cudaStream_t stream);

}  // namespace fastinfer
