// The driver's cuTensorMapEncodeTiled, reached through the runtime's entry-point query (no link
// against libcuda), shared by the kernels that load through TMA tensor maps (the FP8 GEMM, the W4A16
// wgmma kernel, the sm_90a prefill's K / V). nullptr when the driver does not provide it.
#pragma once
#include <cuda.h>           // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled_v12000
#include <cuda_runtime_api.h>

namespace fastinfer {
namespace tma {

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

}  // namespace tma
}  // namespace fastinfer
