// Token embedding: out[t] = weight[ids[t]], and optionally the sums of squares of each out row over
// groups of 16 columns, in column order (sq_sums[t, g]): what the first layer's RMSNorm prologue
// (gemm/gemv.cuh, rms_norm_dense_gemv) reads, so that no norm kernel runs before it.
//
// Parallelisation: one block per token; a thread owns 16-column groups (g = threadIdx.x, + blockDim).
// A row of 4096 bf16 is 8 KiB: pure latency, the copy's bandwidth does not matter. An id outside
// [0, vocab) (the callers validate them; this is a second line of defence) writes a NaN row and NaN
// sums rather than reading outside the table.
#pragma once
#include "fastinfer/common.cuh"
#include "fastinfer/dispatch.cuh"
#include "fastinfer/layers/layers.h"

namespace fastinfer {
namespace embedding {

constexpr int kThreads = 256;
constexpr int kGroup = 16;

template <typename T>
__global__ void embedding_kernel(EmbeddingParams p) {
  pdl_wait();  // common.cuh: PDL (FASTINFER_PDL=1)
  pdl_launch_dependents();
  const int64_t t = blockIdx.x;
  const int64_t id = p.ids[t];
  const bool valid = id >= 0 && id < p.vocab;
  const T* row = static_cast<const T*>(p.weight) + (valid ? id : 0) * p.hidden;
  T* out = static_cast<T*>(p.out) + t * p.out_stride;
  const int64_t groups = (p.hidden + kGroup - 1) / kGroup;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    float sum = 0.f;
    const int64_t end = min(p.hidden, (g + 1) * kGroup);
    for (int64_t col = g * kGroup; col < end; ++col) {
      const T v = valid ? row[col] : from_float<T>(__int_as_float(0x7fc00000));  // NaN
      out[col] = v;
      sum += to_float(v) * to_float(v);
    }
    if (p.sq_sums != nullptr) p.sq_sums[t * p.sq_sums_stride + g] = sum;
  }
}

}  // namespace embedding

inline cudaError_t launch_embedding_impl(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens > 0x7fffffff || p.hidden <= 0) return cudaErrorInvalidValue;
  return FI_DISPATCH_DTYPE(p.dtype, T, [&] {
    return launch_kernel(embedding::embedding_kernel<T>, dim3(static_cast<unsigned>(p.num_tokens)),
                         dim3(embedding::kThreads), 0, stream, p);
  });
}

}  // namespace fastinfer
