// Dense decode GEMM ("GEMV"): out[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) for M = 1..32, or with
// swiglu set, out[M, N / 2] = silu(x @ W[:N/2]^T) * (x @ W[N/2:]^T) (the fused gate / up projection).
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
  // SwiGLU epilogue (dense_gemv_silu_mul): W = [gate; up] with N = 2 F rows (F % 8 == 0, no bias);
  // out [M, F] = silu(round(x @ gate^T)) * round(x @ up^T), rounded once more: bit for bit
  // silu_and_mul(dense_gemv(x, W)).
  bool swiglu;
};

// cudaErrorInvalidValue for shapes, alignments or dtypes the kernel does not support. Never
// synchronizes; M == 0 or N == 0 launches nothing.
cudaError_t launch_dense_gemv(const DenseGemvParams& p, cudaStream_t stream);

}  // namespace fastinfer
