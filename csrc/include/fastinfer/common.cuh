// Small CUDA helpers shared by every kernel: error checks, ceil_div, warp / block reductions,
// conversions between storage dtypes and the fp32 used for all arithmetic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "fastinfer/types.h"

// Propagates a failed CUDA call to the caller as its cudaError_t (kernels never throw).
#define FI_CUDA_TRY(expr)                      \
  do {                                         \
    cudaError_t fi_err_ = (expr);              \
    if (fi_err_ != cudaSuccess) return fi_err_; \
  } while (0)

namespace fastinfer {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Read-only global loads (no kernel writes the data while the reader runs). load_stream: 16 bytes
// read once (weights), bypassing L1 and asking L2 for the surrounding 256 bytes; load_shared_input /
// load_shared_input4: 16 / 4 bytes that several warps or CTAs read (activations, group scales),
// cached in L1.
__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
__device__ __forceinline__ uint4 load_shared_input(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
__device__ __forceinline__ uint32_t load_shared_input4(const void* ptr) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(ptr));
  return v;
}

// tanh(x) to ~1e-7 absolute. The build's --use_fast_math turns tanhf into tanh.approx.f32 (~2^-11
// relative), too coarse for attention scores and GeLU outputs compared at fp32 tolerances: a short odd
// series near 0, 1 - 2 / (e^(2|x|) + 1) elsewhere (exp2 overflowing to inf gives 1), the sign of x.
__device__ __forceinline__ float tanh_accurate(float x) {
  const float a = fabsf(x);
  if (a < 0.25f) {  // x - x^3/3 + 2x^5/15 - 17x^7/315: the next term is below 1e-8 there
    const float x2 = x * x;
    return x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  }
  return copysignf(1.0f - 2.0f / (exp2f(2.8853900817779268f * a) + 1.0f), x);  // 2 log2(e) |x|
}

// Storage type -> fp32 and back. All arithmetic happens in fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_reduce_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_reduce_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x / kWarpSize;
  v = lane < num_warps ? partial[lane] : 0.0f;
  return warp_reduce_sum(v);
}

// ---- programmatic dependent launch (PDL, sm_90) ----------------------------------------------------
// With FASTINFER_PDL=1 the decode-path kernels (RMSNorm, rotary / KV write, decode attention and its
// merge, dense GEMV) are launched with cudaLaunchAttributeProgrammaticStreamSerialization: such a
// launch may be scheduled while the kernel before it in the stream is still running, once every CTA
// of that kernel has called pdl_launch_dependents(); it then runs up to its pdl_wait(), which returns
// when the previous kernel has completed and its memory is visible. Every kernel launched this way
// calls pdl_wait() before it reads or writes anything another kernel touches (the GEMV first asks L2
// for its first weights, which no kernel writes). The GEMV and the decode attention kernels call
// pdl_launch_dependents() after their main loops (every CTA of the grid has then been scheduled, so
// the next kernel's CTAs, resident and waiting, take only slots this grid no longer needs); the short
// one-wave kernels (RMSNorm, rotary / KV write, embedding, merge) right after pdl_wait(). Without the attribute
// (FASTINFER_PDL unset or 0, the default until measured on a GPU: bench/bench_e2e.py) both are no-ops.
// Read at every launch, so a test or a benchmark can compare the two in one process.
inline bool pdl_requested() {
  const char* value = std::getenv("FASTINFER_PDL");
  return value != nullptr && value[0] == '1' && value[1] == '\0';
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches that carried the PDL attribute, process-wide (fastinfer._C.pdl_launches(): tests check
// that FASTINFER_PDL=1 is in effect, not only that results agree).
inline std::atomic<long long> pdl_launches{0};

// compute(kernel), once per kernel and process, behind a lock: a fact of a loaded kernel (its PTX
// version, its occupancy). Each call site (its Compute type) keeps its own cache; a process is assumed to
// drive one GPU model.
template <typename Value, typename Kernel, typename Compute>
Value cached_per_kernel(Kernel kernel, Compute compute) {
  static std::mutex mutex;
  static std::unordered_map<const void*, Value> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(reinterpret_cast<const void*>(kernel));
  if (it != cache.end()) return it->second;
  const Value value = compute(kernel);
  cache.emplace(reinterpret_cast<const void*>(kernel), value);
  return value;
}

// Whether `kernel`, as loaded on the current device, executes griddepcontrol: its PTX must target
// sm_90 or newer. A kernel JIT-compiled from compute_80 PTX (a "80;90a" build on a GPU the sm_90a code
// does not run on) has pdl_wait compiled out, so it must never get the attribute. Cached per kernel.
template <typename Kernel>
bool pdl_capable(Kernel* kernel) {
  return cached_per_kernel<bool>(kernel, [](Kernel* k) {
    cudaFuncAttributes attributes{};
    const bool ok = cudaFuncGetAttributes(&attributes, k) == cudaSuccess && attributes.ptxVersion >= 90;
    if (!ok) (void)cudaGetLastError();  // a failed query is not the launch's error
    return ok;
  });
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when pdl_requested() and the
// kernel can honour it. Returns the launch's error, like cudaGetLastError() after <<<>>> (and clears it).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (pdl_requested() && pdl_capable(kernel)) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    pdl_launches.fetch_add(1, std::memory_order_relaxed);
  }
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();
  return launched != cudaSuccess ? launched : last;
}

// For fastinfer._C (module.cpp, a host-only translation unit); defined in csrc/cuda/layers.cu.
long long pdl_launch_count();

// ---- thread-block clusters (split-K reductions through distributed shared memory) -------------

// A launch configuration whose CTAs form 1-D clusters of cluster_x (no cluster attribute for 1).
// Holds the attribute it points to: not copyable.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1] = {};
  ClusterLaunch(dim3 grid, int threads, size_t smem, cudaStream_t stream, int cluster_x) {
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster_x);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = cluster_x > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// How many clusters of cluster_x CTAs of `kernel` (threads, smem bytes of dynamic shared memory, whose
// attribute the caller has set) can be resident at once; 0 when that size cannot be scheduled.
template <typename Kernel>
int max_active_clusters(Kernel kernel, int threads, size_t smem, int cluster_x) {
  ClusterLaunch launch(dim3(static_cast<unsigned>(cluster_x)), threads, smem, nullptr, cluster_x);
  launch.config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) != cudaSuccess) {
    (void)cudaGetLastError();  // an unschedulable size is an answer here, not an error for the next launch
    return 0;
  }
  return clusters;
}

}  // namespace fastinfer
