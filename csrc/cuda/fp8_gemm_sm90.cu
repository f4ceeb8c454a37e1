// Instantiates the sm_90a FP8 GEMM (wgmma + TMA) behind the launchers of gemm/fp8.h.
// Listed in FASTINFER_SM90_SOURCES: compiled for 90a only.
#include "fastinfer/gemm/fp8_sm90.cuh"
#include "fastinfer/last_record.h"

namespace fastinfer {
namespace {
LastRecord<Fp8LaunchInfo> last_launch;
}  // namespace

void fp8_record_launch(const Fp8LaunchInfo& info) { last_launch.set(info); }

Fp8LaunchInfo fp8_last_launch() { return last_launch.get(); }

cudaError_t launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t s) { return launch_fp8_gemm_sm90_impl(p, s); }
}  // namespace fastinfer
