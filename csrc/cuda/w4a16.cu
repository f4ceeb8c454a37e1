// Instantiates the W4A16 GEMM (fp16 / bf16 x 3 modes x 4 row tiles) behind the launcher of
// gemm/w4a16.h. Hopper-only source (thread-block clusters for the split-K reduction).
#include "fastinfer/gemm/w4a16.cuh"
#include "fastinfer/last_record.h"

namespace fastinfer {
namespace {
LastRecord<Int4LaunchInfo> last_launch;
}  // namespace

namespace w4a16 {
void record_launch(const Int4LaunchInfo& info) { last_launch.set(info); }
}  // namespace w4a16

Int4LaunchInfo w4a16_last_launch() { return last_launch.get(); }

cudaError_t launch_w4a16_gemm(const W4A16Params& p, cudaStream_t stream) { return launch_w4a16_gemm_impl(p, stream); }
}  // namespace fastinfer
