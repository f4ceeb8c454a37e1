// CUDA bindings of paged_prefill_attention over a plain or an FP8 (e4m3 + kv_scale) cache:
// tensors -> PrefillParams, current stream, launch.
// _ops.py has validated shapes, dtypes, devices and indices; the checks here cover what only the
// CUDA kernel needs (head_dim 64 / 128 / 256, 16-byte aligned rows) and turn them into clear messages.
#include <cmath>
#include <torch/library.h>

#include "fastinfer/attention/prefill.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

bool is_16_byte_aligned(const at::Tensor& t) {
  const int64_t elements_per_16_bytes = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % elements_per_16_bytes == 0 &&
         t.stride(1) % elements_per_16_bytes == 0;
}

#ifdef FASTINFER_HAS_SM90
// The sm_90a kernel applies: a Hopper GPU, a 16-bit query over a plain cache.
bool wgmma_applies(const at::Tensor& query, const float* kv_scale) {
  if (kv_scale != nullptr || query.scalar_type() == at::kFloat) return false;
  int major = 0, minor = 0;
  const int device = query.get_device();
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess && major == 9 &&
         minor == 0;
}
#endif

// kOp names the op in messages; kv_scale nullptr for the plain op.
void prefill(const char* kOp, at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
             const at::Tensor* kv_scale, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
             const at::Tensor& block_tables, double scale, const std::optional<at::Tensor>& lse, int64_t window,
             double softcap) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 5 && block_tables.dim() == 2, kOp,
              ": query/out must be [num_tokens, num_heads, head_dim], kv_cache 5-d, block_tables 2-d");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && kv_cache.is_contiguous() && block_tables.stride(1) == 1,
              kOp, ": query and out need a contiguous last dimension, kv_cache must be contiguous");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              kOp, ": cu_seqlens_q, seq_lens and block_tables must be int32");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &kv_cache, &cu_seqlens_q, &seq_lens, &block_tables}) {
    TORCH_CHECK(t->device() == query.device(), "fastinfer.", kOp, ": all tensors must be on ", query.device());
  }
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "fastinfer.", kOp, ": out and query must share a dtype");
  const float* kv_scale_ptr = check_kv_cache_dtype(kOp, query, kv_cache, kv_scale);
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(prefill_supports_head_dim(static_cast<int>(head_dim)), kOp,
              ": the CUDA kernel supports head_dim 64, 128 and 256, got ", head_dim);
  TORCH_CHECK(head_dim != 256 || (kv_scale_ptr == nullptr && query.scalar_type() != at::kFloat), kOp,
              ": head_dim 256 runs with bfloat16 / float16 queries over a 16-bit cache only");
  if (query.scalar_type() != at::kFloat) {
    TORCH_CHECK(is_16_byte_aligned(query) && is_16_byte_aligned(out) &&
                    reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0,
                kOp, ": the CUDA kernel reads and writes 16-byte rows: query, out and kv_cache must start on "
                "16-byte boundaries and the token / head strides of query and out must be multiples of 8 elements");
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() && lse->dim() == 2 &&
                    lse->size(0) == query.size(0) && lse->size(1) == query.size(1) && lse->device() == query.device(),
                "fastinfer.", kOp, ": lse must be a contiguous fp32 [num_tokens, num_heads] tensor on ", query.device());
  }
  const c10::cuda::CUDAGuard guard(query.device());
  PrefillParams p{};
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.kv_scale = kv_scale_ptr;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.num_tokens = query.size(0);
  p.batch = static_cast<int>(seq_lens.size(0));
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(kv_cache.size(3));
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(kv_cache.size(2));
  p.query_token_stride = query.stride(0);
  p.query_head_stride = query.stride(1);
  p.out_token_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.block_table_stride = block_tables.stride(0);
  p.scale = static_cast<float>(scale);
  p.window = window_param(kOp, window);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), kOp, ": softcap must be a finite number >= 0 (0: none), got ",
              softcap);
  p.softcap = static_cast<float>(softcap);
  p.dtype = to_dtype(query, kOp);
  // auto (0): 128 query rows per CTA when the sequences average >= 128 rows, else 64
  constexpr int kBlockM[] = {0, 64, 128};
  // shuffle (default): block-table entries read once per key tile per warp; per_copy: before every copy
  p.table_per_copy = env_choice(kOp, "FASTINFER_ATTN_TABLE", {"shuffle", "per_copy"});
  // cp_async (default): the sm_90a prefill's producer copies K / V in 16-byte pieces; tma: TMA boxes
  p.kv_tma = env_choice(kOp, "FASTINFER_ATTN_KV_LOAD", {"cp_async", "tma"});
  p.num_blocks = kv_cache.size(0);
  p.block_m = kBlockM[env_choice(kOp, "FASTINFER_PREFILL_BLOCK_M", {"auto", "64", "128"})];
  // wgmma = the sm_90a kernel of prefill_sm90.cuh wherever it applies (a bf16 / fp16 plain cache on an
  // sm_90 GPU, in a build with 90a), mma (the FlashAttention-2 kernel of prefill.cuh) elsewhere.
  // auto = wgmma at head_dim 128, mma at 64: on an H200 (bench/results/2026-11-28-h200-visit1) wgmma
  // ran B4 H32/8 S4096 D128 at 235 TFLOP/s against mma's 213, and D64 at 199 against mma's 202.
  const int kernel = env_choice(kOp, "FASTINFER_PREFILL_KERNEL", {"auto", "mma", "wgmma"});
  // 64 / 128 only, and without soft-capping (the mma.sync kernel applies it)
  const bool wgmma = ((kernel == 2 && head_dim <= 128) || (kernel == 0 && head_dim == 128)) && softcap == 0;
#ifdef FASTINFER_HAS_SM90  // launch_paged_prefill_wgmma exists only in builds with 90a
  if (wgmma && wgmma_applies(query, kv_scale_ptr)) {
    check_launch(launch_paged_prefill_wgmma(p, stream_of(query)), kOp);
    return;
  }
#else
  (void)wgmma;
#endif
  check_launch(launch_paged_prefill_attention(p, stream_of(query)), kOp);
}

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                             const at::Tensor& block_tables, double scale, const std::optional<at::Tensor>& lse,
                             int64_t window, double softcap) {
  prefill("paged_prefill_attention", out, query, kv_cache, nullptr, cu_seqlens_q, seq_lens, block_tables, scale,
          lse, window, softcap);
}

void paged_prefill_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                 const at::Tensor& kv_scale, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale,
                                 const std::optional<at::Tensor>& lse, int64_t window, double softcap) {
  prefill("paged_prefill_attention_fp8", out, query, kv_cache, &kv_scale, cu_seqlens_q, seq_lens, block_tables,
          scale, lse, window, softcap);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("paged_prefill_attention", &fastinfer::torch_glue::paged_prefill_attention);
  m.impl("paged_prefill_attention_fp8", &fastinfer::torch_glue::paged_prefill_attention_fp8);
}
