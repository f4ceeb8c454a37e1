// Instantiates the sm_90a FP8 GEMM (wgmma + TMA) behind the launchers of gemm/fp8.h.
// Listed in FASTINFER_SM90_SOURCES: compiled for 90a only.
#include <mutex>

#include "fastinfer/gemm/fp8_sm90.cuh"

namespace fastinfer {
namespace {
std::mutex last_launch_mutex;
Fp8LaunchInfo last_launch{};
}  // namespace

void fp8_record_launch(const Fp8LaunchInfo& info) {
  std::lock_guard<std::mutex> lock(last_launch_mutex);
  last_launch = info;
}

Fp8LaunchInfo fp8_last_launch() {
  std::lock_guard<std::mutex> lock(last_launch_mutex);
  return last_launch;
}

cudaError_t launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t s) { return launch_fp8_gemm_sm90_impl(p, s); }
}  // namespace fastinfer
