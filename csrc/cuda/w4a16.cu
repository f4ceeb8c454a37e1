// Instantiates the W4A16 GEMM (fp16 / bf16 x 3 modes x 4 row tiles) behind the launcher of
// gemm/w4a16.h. Hopper-only source (thread-block clusters for the split-K reduction).
#include <mutex>

#include "fastinfer/gemm/w4a16.cuh"

namespace fastinfer {
namespace {
std::mutex last_launch_mutex;
Int4LaunchInfo last_launch{};
}  // namespace

namespace w4a16 {
void record_launch(const Int4LaunchInfo& info) {
  std::lock_guard<std::mutex> lock(last_launch_mutex);
  last_launch = info;
}
}  // namespace w4a16

Int4LaunchInfo w4a16_last_launch() {
  std::lock_guard<std::mutex> lock(last_launch_mutex);
  return last_launch;
}

cudaError_t launch_w4a16_gemm(const W4A16Params& p, cudaStream_t stream) { return launch_w4a16_gemm_impl(p, stream); }
}  // namespace fastinfer
