// CUDA bindings of paged decode attention over a plain or an FP8 (e4m3 + kv_scale) cache:
// tensors -> DecodeParams, plan, workspace, launch.
// The workspace (split partials) comes from torch's caching allocator on the current stream, so the
// op also works inside CUDA-graph capture (the graph's private pool holds it).
#include <cmath>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "fastinfer/attention/decode.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

// kOp names the op in messages; kv_scale nullptr for the plain op.
void decode(const char* kOp, at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
            const at::Tensor* kv_scale, const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
            const std::optional<at::Tensor>& semaphores, int64_t window, double softcap) {
  // Second line of defence behind python/fastinfer/_ops.py, which checks all of this with ValueErrors.
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes() && kv_cache.dim() == 5 && kv_cache.size(1) == 2,
              "fastinfer.", kOp, ": expected query/out [batch, num_heads, head_dim] and kv_cache "
              "[num_blocks, 2, block_size, num_kv_heads, head_dim]");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &kv_cache, &block_tables, &seq_lens}) {
    TORCH_CHECK(t->device() == query.device(), "fastinfer.", kOp, ": all tensors must be on ", query.device());
  }
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "fastinfer.", kOp, ": out and query must share a dtype");
  const float* kv_scale_ptr = check_kv_cache_dtype(kOp, query, kv_cache, kv_scale);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "fastinfer.", kOp,
              ": block_tables and seq_lens must be int32");
  TORCH_CHECK(kv_cache.is_contiguous() && seq_lens.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1 && query.stride(2) == 1 && out.stride(2) == 1,
              "fastinfer.", kOp, ": kv_cache and seq_lens must be contiguous, and block_tables, query and out "
              "contiguous in their last dimension");
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(decode_head_dim_supported(static_cast<int>(head_dim)), "fastinfer.", kOp,
              ": the CUDA kernel supports head_dim 64, 128 and 256, got ", head_dim);
  TORCH_CHECK(head_dim != 256 || (kv_scale_ptr == nullptr && query.scalar_type() != at::kFloat), "fastinfer.", kOp,
              ": head_dim 256 runs with bfloat16 / float16 queries over a 16-bit cache only");
  TORCH_CHECK(kv_cache.size(4) == head_dim && kv_cache.size(3) > 0 && query.size(1) % kv_cache.size(3) == 0,
              "fastinfer.", kOp,
              ": kv_cache [.., num_kv_heads, head_dim] must match query (heads a multiple of num_kv_heads)");
  TORCH_CHECK(block_tables.size(0) == query.size(0) && seq_lens.numel() == query.size(0), "fastinfer.", kOp,
              ": block_tables and seq_lens need one row per sequence");
  TORCH_CHECK(query.size(0) <= 65535 && block_tables.size(1) * kv_cache.size(2) < (int64_t{1} << 30), "fastinfer.",
              kOp, ": at most 65535 sequences and 2^30 planned context tokens (block_tables.shape[1] * block_size)");

  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0, "fastinfer.", kOp,
              ": kv_cache must be 16-byte aligned (the kernel copies K/V rows in 16-byte chunks)");

  const c10::cuda::CUDAGuard guard(query.device());
  DecodeParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.kv_scale = kv_scale_ptr;
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.query_batch_stride = query.stride(0);
  p.query_head_stride = query.stride(1);
  p.block_table_stride = block_tables.stride(0);
  p.batch = static_cast<int>(query.size(0));
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(kv_cache.size(3));
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(kv_cache.size(2));
  p.max_blocks = static_cast<int>(block_tables.size(1));
  p.scale = static_cast<float>(scale);
  p.window = window_param(kOp, window);
  p.dtype = to_dtype(query, kOp);
  // auto: tensor cores for bf16 / fp16 queries (the choices' order is DecodeKernel's)
  p.kernel = static_cast<DecodeKernel>(
      env_choice(kOp, "FASTINFER_DECODE_KERNEL", {"auto", "cuda_cores", "tensor_cores"}));
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "fastinfer.", kOp,
              ": softcap must be a finite number >= 0 (0: none), got ", softcap);
  p.softcap = static_cast<float>(softcap);
  if (softcap > 0) p.kernel = DecodeKernel::kCudaCores;  // the kernel that applies it
  const cudaError_t err = cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, query.get_device());
  TORCH_CHECK(err == cudaSuccess, "fastinfer.", kOp, ": cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  // The split heuristic's target (auto: the kernel's own); bench_fp8_kv.py sweeps it per kernel and cache dtype.
  static constexpr int kCtasPerSm[] = {0, 2, 3, 4, 6, 8, 12};
  // shuffle (default): block-table entries read once per key tile per warp; per_copy: before every copy
  p.table_per_copy = env_choice(kOp, "FASTINFER_ATTN_TABLE", {"shuffle", "per_copy"});
  p.target_ctas_per_sm = kCtasPerSm[env_choice(kOp, "FASTINFER_DECODE_CTAS_PER_SM", {"auto", "2", "3", "4", "6", "8", "12"})];

  DecodePlan plan{};
  TORCH_CHECK(plan_paged_decode(p, &plan) == cudaSuccess, "fastinfer.", kOp, ": unsupported shape (batch ", p.batch,
              ", heads ", p.num_heads, "/", p.num_kv_heads, ", head_dim ", p.head_dim, ", block_size ", p.block_size,
              ", max_blocks ", p.max_blocks, ")");
  // The fused merge (decode_work.cuh: merge_if_last) unless FASTINFER_DECODE_MERGE=kernel.
  const bool merge_kernel = env_choice(kOp, "FASTINFER_DECODE_MERGE", {"auto", "kernel"}) == 1;
  if (semaphores.has_value()) {
    TORCH_CHECK(semaphores->scalar_type() == at::kInt && semaphores->is_contiguous() &&
                    semaphores->device() == query.device() && semaphores->numel() >= query.size(0) * query.size(1),
                "fastinfer.", kOp, ": semaphores must be a contiguous int32 tensor of >= batch * num_heads = ",
                query.size(0) * query.size(1), " zeros on ", query.device());
    if (!merge_kernel) p.semaphores = semaphores->data_ptr<int32_t>();
  }
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, query.options().dtype(at::kByte));
  }
  check_launch(launch_paged_decode_attention(p, workspace.defined() ? workspace.data_ptr() : nullptr,
                                             stream_of(query)),
               kOp);
}

void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const std::optional<at::Tensor>& semaphores, int64_t window, double softcap) {
  decode("paged_decode_attention", out, query, kv_cache, nullptr, block_tables, seq_lens, scale, semaphores, window,
         softcap);
}

void paged_decode_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                const at::Tensor& kv_scale, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale, const std::optional<at::Tensor>& semaphores,
                                int64_t window, double softcap) {
  decode("paged_decode_attention_fp8", out, query, kv_cache, &kv_scale, block_tables, seq_lens, scale, semaphores,
         window, softcap);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("paged_decode_attention", &fastinfer::torch_glue::paged_decode_attention);
  m.impl("paged_decode_attention_fp8", &fastinfer::torch_glue::paged_decode_attention_fp8);
}
