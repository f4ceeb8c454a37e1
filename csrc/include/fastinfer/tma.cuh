// The sm_90a kernels' shared TMA and mbarrier helpers: the mbarrier wait and the cluster barrier, and
// the driver's cuTensorMapEncodeTiled reached through the runtime's entry-point query (no link against
// libcuda; nullptr when the driver does not provide it) with the 2-D map the FP8 GEMM and the W4A16
// wgmma kernel load through (the sm_90a prefill encodes its own 5-D map of the paged cache).
#pragma once
#include <cuda.h>           // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cuda/ptx>

namespace fastinfer {
namespace tma {

// Spin until phase `parity` of a shared-memory mbarrier has completed (the TMA loads' and the
// consumers' handshake in the sm_90a kernels).
__device__ __forceinline__ void wait_barrier(uint64_t* bar, uint32_t parity) {
  while (!cuda::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
}

// barrier.cluster (arrive.release + wait.acquire): every thread of every CTA of the cluster, each warp
// converged (.aligned); orders shared-memory writes before other CTAs' distributed shared-memory reads.
__device__ __forceinline__ void cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

inline PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major matrix of bytes (rows of row_bytes, stride_bytes apart; 16-byte aligned base and stride) read
// in boxes of 128 bytes x box_rows with the 128-byte swizzle, the shared-memory layout wgmma's K-major
// descriptors take; rows and columns past the matrix read as zeros. The FP8 GEMM's operands (e4m3, one
// byte an element) and the W4A16 wgmma kernel's activations (16-bit, two) both load through it.
inline cudaError_t encode_rows_sw128(CUtensorMap* map, const void* ptr, int64_t row_bytes, int64_t rows,
                                     int64_t stride_bytes, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride_bytes)};
  const cuuint32_t box[2] = {128, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(ptr), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace tma
}  // namespace fastinfer
