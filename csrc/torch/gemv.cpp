// CUDA binding of dense_gemv, dense_gemv_silu_mul (its SwiGLU epilogue), dense_gemv_add_residual (its
// residual epilogue), rms_norm_dense_gemv (its RMSNorm prologue) and dense_gemv_rope_cache (its rotary +
// KV-cache epilogue): tensors -> DenseGemvParams, current stream, launch. The last three, the GEMVs of
// a fused decode layer, take the next GEMV's weight to prefetch into L2 (gemv.cuh).
// python/fastinfer/_ops.py validates; the checks here are the second line of defence.
#include <torch/library.h>

#include <limits>
#include <optional>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/gemv.h"

namespace fastinfer::torch_glue {
namespace {

// The checks and Params the ops share; out has N columns (dense_gemv), N / 2 (swiglu) or query_cols.
// weight_scale: weight is e4m3 [N, K] with one fp32 scale per row (gemv.cuh, "FP8 weights").
DenseGemvParams make_params(const char* op, at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool swiglu,
                            const std::optional<at::Tensor>& weight_scale, int64_t query_cols = -1) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, " on CUDA takes float16 or bfloat16, got ", x.scalar_type());
  // out may be float32 for the plain epilogue (rounded to x's dtype, then widened: the fp32 logits)
  const bool out_fp32 = out.scalar_type() == at::kFloat && !swiglu && query_cols < 0;
  const bool fp8 = weight_scale.has_value();
  if (fp8) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat8_e4m3fn, op, ": with weight_scale, weight must be float8_e4m3fn");
    TORCH_CHECK(weight_scale->scalar_type() == at::kFloat && weight_scale->dim() == 1 &&
                    weight_scale->size(0) == weight.size(0) && weight_scale->is_contiguous() &&
                    weight_scale->device() == x.device(),
                op, ": weight_scale must be a contiguous float32 [N] on x's device");
    TORCH_CHECK(x.size(0) <= kGemvFp8MaxM && x.size(1) % 16 == 0,
                op, ": FP8 weights take at most ", kGemvFp8MaxM, " rows of x and K a multiple of 16");
  }
  TORCH_CHECK((fp8 || weight.scalar_type() == x.scalar_type()) && (out.scalar_type() == x.scalar_type() || out_fp32) &&
                  (!bias.has_value() || bias->scalar_type() == x.scalar_type()),
              op, ": x, weight and bias must share one dtype, and out too (or float32 for a plain projection)");
  // out: N columns, N / 2 (swiglu) or the query's (the rotary epilogue writes only q there).
  const int64_t out_cols = query_cols >= 0 ? query_cols : swiglu ? weight.size(0) / 2 : weight.size(0);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2 && weight.size(1) == x.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == out_cols &&
                  (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0))),
              op, ": inconsistent shapes (validate with fastinfer.ops.", op, ")");
  TORCH_CHECK(!swiglu || (weight.size(0) % 16 == 0 && !bias.has_value()),
              op, ": weight needs 2 F rows with F a multiple of 8, and no bias");
  TORCH_CHECK(x.size(0) <= kGemvMaxM, op, ": x may have at most ", kGemvMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1 &&
                  (!bias.has_value() || bias->is_contiguous()),
              op, ": weight and bias must be contiguous, x and out rows contiguous");
  TORCH_CHECK(weight.size(0) <= std::numeric_limits<int>::max(), op, ": too many weight rows");
  // Every CTA reads all of x while others store their columns: an out overlapping x (or weight,
  // bias) would be read after it was written.
  TORCH_CHECK(!out.is_alias_of(x) && !out.is_alias_of(weight) && (!bias.has_value() || !out.is_alias_of(*bias)),
              op, ": out must not share memory with x, weight or bias");
  TORCH_CHECK(weight.device() == x.device() && out.device() == x.device() &&
                  (!bias.has_value() || bias->device() == x.device()),
              op, ": every tensor must be on x's device (", x.device(), ")");
  DenseGemvParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(weight.size(0));
  p.k = x.size(1);
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.dtype = to_dtype(x, op);
  p.swiglu = swiglu;
  p.out_fp32 = out_fp32;
  p.weight_scale = fp8 ? weight_scale->data_ptr<float>() : nullptr;
  return p;
}

// The L2 prefetch of the next GEMV's weight (gemv.h; a hint, no result changes): its checks, then the
// fields. budget 0 or no tensor: none.
void set_prefetch(const char* op, DenseGemvParams& p, const at::Tensor& x, const std::optional<at::Tensor>& prefetch,
                  int64_t budget, bool swiglu) {
  TORCH_CHECK(budget >= 0, op, ": prefetch_bytes must be >= 0, got ", budget);
  if (!prefetch.has_value() || budget == 0) return;
  const at::Tensor& w = *prefetch;
  const int64_t row_bytes = w.dim() == 2 ? w.size(1) * w.element_size() : 0;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.element_size() == 2 || w.element_size() == 1) &&
                  w.device() == x.device() && row_bytes % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && (!swiglu || w.size(0) % 2 == 0),
              op, ": prefetch must be a contiguous 16-bit or 8-bit 2-D weight on x's device, 16-byte aligned rows",
              swiglu ? " and an even number of rows (prefetch_swiglu)" : "");
  TORCH_CHECK(w.size(0) <= std::numeric_limits<int>::max() / 2, op, ": prefetch has too many rows");
  int num_sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.get_device());
  TORCH_CHECK(err == cudaSuccess, op, ": cudaDeviceGetAttribute: ", cudaGetErrorString(err));
  p.prefetch = w.data_ptr();
  p.prefetch_rows = w.size(0);
  p.prefetch_row_bytes = row_bytes;
  p.prefetch_budget = budget;
  p.prefetch_swiglu = swiglu;
  p.num_sms = num_sms;
}

void dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& weight_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DenseGemvParams p = make_params("dense_gemv", out, x, weight, bias, false, weight_scale);
  // cudaErrorInvalidValue here means K % 8, x's row stride or an unaligned x / weight (16-byte loads).
  check_launch(launch_dense_gemv(p, stream_of(x)), "dense_gemv");
}

void dense_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& weight_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DenseGemvParams p = make_params("dense_gemv_silu_mul", out, x, weight, std::nullopt, true, weight_scale);
  check_launch(launch_dense_gemv(p, stream_of(x)), "dense_gemv_silu_mul");
}

void dense_gemv_add_residual(at::Tensor& residual, at::Tensor& sq_sums, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prefetch,
                             int64_t prefetch_bytes, bool prefetch_swiglu,
                             const std::optional<at::Tensor>& weight_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "dense_gemv_add_residual";
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype");
  DenseGemvParams p = make_params(op, residual, x, weight, bias, false, weight_scale);  // residual has out's shape
  TORCH_CHECK(sq_sums.scalar_type() == at::kFloat && sq_sums.dim() == 2 && sq_sums.size(0) == x.size(0) &&
                  sq_sums.size(1) == (weight.size(0) + kGemvSqSumGroup - 1) / kGemvSqSumGroup &&
                  sq_sums.stride(1) == 1 && (sq_sums.size(0) == 1 || sq_sums.stride(0) >= sq_sums.size(1)) &&
                  sq_sums.device() == x.device(),
              op, ": sq_sums must be float32 [M, ceil(N / ", kGemvSqSumGroup, ")] with distinct rows on x's device");
  TORCH_CHECK(!sq_sums.is_alias_of(x) && !sq_sums.is_alias_of(residual),  // residual vs x: make_params
              op, ": residual, sq_sums and x must not share memory");
  p.out = nullptr;
  p.residual = residual.data_ptr();
  p.residual_stride = residual.stride(0);
  p.sq_sums_out = sq_sums.data_ptr<float>();
  p.sq_sums_out_stride = sq_sums.stride(0);
  set_prefetch(op, p, x, prefetch, prefetch_bytes, prefetch_swiglu);
  check_launch(launch_dense_gemv(p, stream_of(x)), op);
}

// The RMSNorm prologue's fields of p (rms_norm_dense_gemv, dense_gemv_rope_cache with sq_sums).
void set_norm(const char* op, DenseGemvParams& p, const at::Tensor& x, const at::Tensor& sq_sums,
              const at::Tensor& norm_weight, double eps) {
  TORCH_CHECK(x.size(0) <= kGemvNormMaxM, op, ": x may have at most ", kGemvNormMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(sq_sums.scalar_type() == at::kFloat && sq_sums.dim() == 2 && sq_sums.size(0) == x.size(0) &&
                  sq_sums.size(1) == (x.size(1) + kGemvSqSumGroup - 1) / kGemvSqSumGroup && sq_sums.stride(1) == 1 &&
                  sq_sums.device() == x.device(),
              op, ": sq_sums must be float32 [M, ceil(K / ", kGemvSqSumGroup, ")] on x's device");
  TORCH_CHECK(norm_weight.scalar_type() == x.scalar_type() && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == x.size(1) && norm_weight.is_contiguous() && norm_weight.device() == x.device(),
              op, ": norm_weight must be [K], contiguous, in x's dtype, on x's device");
  TORCH_CHECK(sq_sums.size(1) <= std::numeric_limits<int>::max(), op, ": too many sq_sums groups");
  p.norm_weight = norm_weight.data_ptr();
  p.sq_sums_in = sq_sums.data_ptr<float>();
  p.sq_sums_in_stride = sq_sums.stride(0);
  p.sq_groups = static_cast<int>(sq_sums.size(1));
  p.eps = static_cast<float>(eps);
  p.norm_preload = env_choice(op, "FASTINFER_GEMV_NORM_PRELOAD", {"off", "on"}) == 1;
}

void rms_norm_dense_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& sq_sums, const at::Tensor& norm_weight,
                         double eps, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool silu_mul,
                         const std::optional<at::Tensor>& prefetch, int64_t prefetch_bytes, bool prefetch_swiglu,
                         const std::optional<at::Tensor>& weight_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "rms_norm_dense_gemv";
  DenseGemvParams p = make_params(op, out, x, weight, bias, silu_mul, weight_scale);
  set_norm(op, p, x, sq_sums, norm_weight, eps);
  TORCH_CHECK(!out.is_alias_of(sq_sums), op, ": out must not share memory with x or sq_sums");  // x: make_params
  set_prefetch(op, p, x, prefetch, prefetch_bytes, prefetch_swiglu);
  // cudaErrorInvalidValue here also means a norm_weight not 16-byte aligned.
  check_launch(launch_dense_gemv(p, stream_of(x)), op);
}

void dense_gemv_rope_cache(at::Tensor& query, at::Tensor& kv_cache, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& sq_sums, const std::optional<at::Tensor>& norm_weight,
                           double eps, const std::optional<at::Tensor>& prefetch, int64_t prefetch_bytes,
                           bool prefetch_swiglu, const std::optional<at::Tensor>& weight_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "dense_gemv_rope_cache";
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2) && query.size(0) == x.size(0),
              op, ": query must be [M, num_heads, head_dim] with contiguous heads");
  const int64_t heads = query.size(1), head_dim = query.size(2);
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2 && kv_cache.size(4) == head_dim && kv_cache.is_contiguous() &&
                  kv_cache.numel() > 0 && kv_cache.scalar_type() == x.scalar_type() && kv_cache.device() == x.device(),
              op, ": kv_cache must be a contiguous [num_blocks, 2, block_size, num_kv_heads, ", head_dim, "] in x's dtype");
  const int64_t kv_heads = kv_cache.size(3);
  TORCH_CHECK(head_dim % 16 == 0 && weight.size(0) == (heads + 2 * kv_heads) * head_dim,
              op, ": weight must have (num_heads + 2 num_kv_heads) head_dim rows, head_dim a multiple of 16");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == head_dim && cos_sin_cache.is_contiguous() &&
                  cos_sin_cache.device() == x.device(),
              op, ": cos_sin_cache must be a contiguous float32 [max_position, head_dim] (rotary over the whole head)");
  for (const at::Tensor* t : {&positions, &slot_mapping}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == x.size(0) && t->is_contiguous() &&
                    t->device() == x.device(),
                op, ": positions and slot_mapping must be contiguous int64 [M] on x's device");
  }
  at::Tensor out2d = query.view({query.size(0), heads * head_dim});
  DenseGemvParams p = make_params(op, out2d, x, weight, bias, false, weight_scale, heads * head_dim);
  TORCH_CHECK(sq_sums.has_value() == norm_weight.has_value(), op, ": sq_sums and norm_weight come together");
  if (sq_sums.has_value()) set_norm(op, p, x, *sq_sums, *norm_weight, eps);
  for (const at::Tensor* input : {&x, &positions, &slot_mapping}) {
    TORCH_CHECK(!query.is_alias_of(*input) && !kv_cache.is_alias_of(*input),
                op, ": query and kv_cache must not share memory with x, positions or slot_mapping");
  }
  TORCH_CHECK(!query.is_alias_of(kv_cache) &&
                  (!sq_sums.has_value() || (!query.is_alias_of(*sq_sums) && !kv_cache.is_alias_of(*sq_sums))),
              op, ": query, kv_cache and sq_sums must not share memory");
  p.rope = true;
  p.kv_cache = kv_cache.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_heads = static_cast<int>(heads);
  p.num_kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(kv_cache.size(2));
  set_prefetch(op, p, x, prefetch, prefetch_bytes, prefetch_swiglu);
  check_launch(launch_dense_gemv(p, stream_of(x)), op);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("dense_gemv", &fastinfer::torch_glue::dense_gemv);
  m.impl("dense_gemv_silu_mul", &fastinfer::torch_glue::dense_gemv_silu_mul);
  m.impl("dense_gemv_add_residual", &fastinfer::torch_glue::dense_gemv_add_residual);
  m.impl("rms_norm_dense_gemv", &fastinfer::torch_glue::rms_norm_dense_gemv);
  m.impl("dense_gemv_rope_cache", &fastinfer::torch_glue::dense_gemv_rope_cache);
}
