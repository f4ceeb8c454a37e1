// CUDA binding of int4_linear: tensors -> W4A16Params, current stream, launch. Registered only
// when the build has the Hopper kernels (FASTINFER_HAS_SM90); python/fastinfer/_ops.py validates.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/w4a16.h"

#ifdef FASTINFER_HAS_SM90
namespace fastinfer::torch_glue {
namespace {

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "int4_linear: ", name,
              " must start on a 16-byte boundary");
}

// The stream-K kernel's workspace (w4a16_small.cuh): one per device, made on the first small_streamk
// call and kept for the process (its counters are 0 between launches; deliberately never freed, so no
// destructor runs after the caching allocator's at exit). Allocating it inside a CUDA-graph
// capture would tie it to the graph's memory pool, so the first call must be eager (the engine's
// warm-up steps are). Launches on two streams of one device at once would share it: not supported.
constexpr int kStreamKSlotsPerSm = 4;
constexpr int64_t kStreamKPieceFloats = 8 * 64;  // tokens x strip columns

std::pair<at::Tensor, at::Tensor> streamk_workspace(const at::Tensor& x, int num_sms) {
  static std::mutex mutex;
  static auto& workspaces = *new std::unordered_map<int, std::pair<at::Tensor, at::Tensor>>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = workspaces.find(x.get_device());
  if (found != workspaces.end()) return found->second;
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "int4_linear: FASTINFER_INT4_KERNEL=small_streamk needs one call outside CUDA-graph capture first "
              "(it allocates its workspace then)");
  const int64_t capacity = static_cast<int64_t>(num_sms) * kStreamKSlotsPerSm;
  auto pair = std::make_pair(at::empty({capacity * 2 * kStreamKPieceFloats}, x.options().dtype(at::kFloat)),
                             at::zeros({capacity}, x.options().dtype(at::kInt)));
  workspaces.emplace(x.get_device(), pair);
  return pair;
}

void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins, int64_t group_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(!(zeros.has_value() && mins.has_value()), "int4_linear: pass zeros or mins, not both");
  const at::Tensor* offsets = zeros.has_value() ? &*zeros : mins.has_value() ? &*mins : nullptr;
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "int4_linear on CUDA takes float16 or bfloat16 x, got ", x.scalar_type());
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && (!offsets || offsets->is_contiguous()),
              "int4_linear: qweight, scales, zeros / mins must be contiguous");
  // The Python wrapper (fastinfer.ops.int4_linear) names the argument; these keep a direct
  // torch.ops.fastinfer.int4_linear call from reading or writing out of bounds.
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && qweight.dim() == 2 && scales.dim() == 2,
              "int4_linear: x, out, qweight and scales must be 2-D (validate with fastinfer.ops.int4_linear)");
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "int4_linear: group_size must be 32, 64 or 128");
  TORCH_CHECK(k > 0 && k % 64 == 0 && k % group_size == 0 && k <= std::numeric_limits<int>::max() &&
                  n % 64 == 0 && n <= std::numeric_limits<int>::max(),
              "int4_linear: K must be a positive multiple of 64 and of group_size, N a multiple of 64");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.size(0) == n / 64 && qweight.size(1) == 8 * k,
              "int4_linear: qweight must be int32 [N / 64, 8 K] = [", n / 64, ", ", 8 * k, "]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&scales, offsets}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 2 && t->size(0) == k / group_size && t->size(1) == n && t->scalar_type() == x.scalar_type(),
                "int4_linear: scales, zeros and mins must be [K / group_size, N] = [", k / group_size, ", ", n,
                "] in x's dtype");
  }
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.size(0) == m && x.stride(1) == 1 && out.stride(1) == 1,
              "int4_linear: out must be [M, N] in x's dtype; x and out rows contiguous");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &qweight, &scales, offsets}) {
    TORCH_CHECK(t == nullptr || t->device() == x.device(), "int4_linear: every tensor must be on x's device (",
                x.device(), ")");
  }
  TORCH_CHECK(!out.is_alias_of(x), "int4_linear: out must not share memory with x");
  check_aligned(x, "x");
  check_aligned(out, "out");
  check_aligned(qweight, "qweight");
  check_aligned(scales, "scales");
  if (offsets) check_aligned(*offsets, zeros.has_value() ? "zeros" : "mins");
  W4A16Params p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.scales = scales.data_ptr();
  p.offsets = offsets ? offsets->data_ptr() : nullptr;
  p.m = m;
  p.k = static_cast<int>(k);
  p.n = static_cast<int>(n);
  p.group_size = static_cast<int>(group_size);
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.mode = zeros.has_value() ? Int4Mode::kZeros : mins.has_value() ? Int4Mode::kMins : Int4Mode::kSymmetric;
  p.dtype = to_dtype(x, "int4_linear");
  p.kernel = static_cast<Int4Kernel>(
      env_choice("int4_linear", "FASTINFER_INT4_KERNEL", {"auto", "tiles", "small", "small_deferred", "small_streamk", "wgmma", "auto_wgmma"}));
  // overhead (default, one round per CTA added to the split-K cost) or rounds (none): visit 6
  p.split_overhead_rounds = env_choice("int4_linear", "FASTINFER_INT4_SPLITS", {"overhead", "rounds"}) == 0 ? 1 : 0;
  // clusters (default): waves counted in resident clusters of each split size; slots: in CTA slots (visit 6)
  p.waves_by_clusters = env_choice("int4_linear", "FASTINFER_INT4_WAVES", {"clusters", "slots"}) == 0;
  const cudaError_t err = cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, x.get_device());
  check_launch(err, "int4_linear (SM count)");
  if (p.kernel == Int4Kernel::kSmallStreamK && m > 0 && m <= 8) {
    const auto [partials, counters] = streamk_workspace(x, p.num_sms);
    p.streamk_partials = partials.data_ptr<float>();
    p.streamk_counters = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
    p.streamk_capacity = static_cast<int>(counters.numel());
  }
  check_launch(launch_w4a16_gemm(p, stream_of(x)), "int4_linear");
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) { m.impl("int4_linear", &fastinfer::torch_glue::int4_linear); }
#endif  // FASTINFER_HAS_SM90
