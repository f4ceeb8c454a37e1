// CUDA bindings of moe_gemv (gemm/moe_gemv.h) and moe_int4_linear (gemm/moe_w4a16.h, only in builds with the
// Hopper kernels, as int4_linear): tensors -> params, current stream, launch. python/fastinfer/_ops_moe.py
// validates; the checks here are the second line of defence.
#include <torch/library.h>

#include <limits>
#include <optional>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/moe_gemv.h"
#include "fastinfer/gemm/moe_w4a16.h"

namespace fastinfer::torch_glue {
namespace {

void moe_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_ids,
              int64_t x_group, bool silu_mul, const std::optional<at::Tensor>& weight_scale) {
  constexpr const char* kOp = "moe_gemv";
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              " on CUDA takes float16 or bfloat16, got ", x.scalar_type());
  const bool fp8 = weight_scale.has_value();
  TORCH_CHECK((fp8 ? weight.scalar_type() == at::kFloat8_e4m3fn : weight.scalar_type() == x.scalar_type()) &&
                  out.scalar_type() == x.scalar_type(),
              kOp, ": x and out share one dtype, weight too (or float8_e4m3fn with weight_scale)");
  TORCH_CHECK(!fp8 || (weight_scale->scalar_type() == at::kFloat && weight_scale->is_contiguous() &&
                       weight_scale->dim() == 2 && weight_scale->size(0) == weight.size(0) &&
                       weight_scale->size(1) == weight.size(1) && weight_scale->device() == x.device() &&
                       x.size(1) % 16 == 0),
              kOp, ": weight_scale must be contiguous float32 [E, N] on x's device, with K a multiple of 16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && out.dim() == 2 && expert_ids.dim() == 1 && x_group >= 1 &&
                  weight.size(2) == x.size(1) && out.size(0) == expert_ids.size(0) &&
                  x.size(0) * x_group == expert_ids.size(0) &&
                  out.size(1) == (silu_mul ? weight.size(1) / 2 : weight.size(1)),
              kOp, ": inconsistent shapes (validate with fastinfer.ops.moe_gemv)");
  TORCH_CHECK(expert_ids.scalar_type() == at::kInt && expert_ids.is_contiguous(), kOp,
              ": expert_ids must be a contiguous int32 tensor");
  TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1 && out.stride(1) == 1 && x.size(1) % 8 == 0 &&
                  x.stride(0) % 8 == 0 && (!silu_mul || weight.size(1) % 16 == 0),
              kOp, ": weight contiguous, x / out rows contiguous, K and x's row stride multiples of 8");
  TORCH_CHECK(expert_ids.size(0) <= 65535 && weight.size(1) <= std::numeric_limits<int>::max(), kOp,
              ": at most 65535 pairs");
  TORCH_CHECK(!out.is_alias_of(x) && !out.is_alias_of(weight) && !(fp8 && out.is_alias_of(*weight_scale)), kOp,
              ": out must not share memory with x, weight or weight_scale");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &weight, &expert_ids}) {
    TORCH_CHECK(t->device() == x.device(), kOp, ": every tensor must be on x's device (", x.device(), ")");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  MoeGemvParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.weight_scale = fp8 ? weight_scale->data_ptr<float>() : nullptr;
  p.expert_ids = expert_ids.data_ptr<int32_t>();
  p.pairs = static_cast<int>(expert_ids.size(0));
  p.x_group = static_cast<int>(x_group);
  p.n = static_cast<int>(weight.size(1));
  p.k = x.size(1);
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.swiglu = silu_mul;
  p.dtype = to_dtype(x, kOp);
  check_launch(launch_moe_gemv(p, stream_of(x)), kOp);
}

#ifdef FASTINFER_HAS_SM90
void moe_int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& mins,
                     const at::Tensor& expert_ids, int64_t group_size, int64_t x_group) {
  constexpr const char* kOp = "moe_int4_linear";
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              " on CUDA takes float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!(zeros.has_value() && mins.has_value()), kOp, ": pass zeros or mins, not both");
  const at::Tensor* offsets = zeros.has_value() ? &*zeros : mins.has_value() ? &*mins : nullptr;
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && qweight.dim() == 3 && scales.dim() == 3 && expert_ids.dim() == 1 &&
                  x_group >= 1 && x.size(0) * x_group == expert_ids.size(0) && out.size(0) == expert_ids.size(0),
              kOp, ": inconsistent shapes (validate with fastinfer.ops.moe_int4_linear)");
  const int64_t experts = qweight.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, kOp, ": group_size must be 32, 64 or 128");
  TORCH_CHECK(k > 0 && k % 64 == 0 && k % group_size == 0 && k <= std::numeric_limits<int>::max() && n > 0 &&
                  n % 64 == 0 && n / 64 <= 65535,
              kOp, ": K a positive multiple of 64 and of group_size, N a positive multiple of 64");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(1) == n / 64 &&
                  qweight.size(2) == 8 * k,
              kOp, ": qweight must be contiguous int32 [E, N / 64, 8 K]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&scales, offsets}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->size(0) == experts && t->size(1) == k / group_size && t->size(2) == n &&
                    t->scalar_type() == x.scalar_type(),
                kOp, ": scales, zeros and mins must be contiguous [E, K / group_size, N] in x's dtype");
  }
  TORCH_CHECK(expert_ids.scalar_type() == at::kInt && expert_ids.is_contiguous() && expert_ids.size(0) <= 65535, kOp,
              ": expert_ids must be a contiguous int32 tensor of at most 65535 pairs");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && x.stride(1) == 1 && out.stride(1) == 1 && x.stride(0) % 8 == 0,
              kOp, ": out in x's dtype; x and out rows contiguous, x's row stride a multiple of 8");
  TORCH_CHECK(!out.is_alias_of(x) && !out.is_alias_of(qweight) && !out.is_alias_of(scales) &&
                  !(offsets && out.is_alias_of(*offsets)),
              kOp, ": out must not share memory with x or the weights");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &qweight, &scales, offsets, &expert_ids}) {
    TORCH_CHECK(t == nullptr || t->device() == x.device(), kOp, ": every tensor must be on x's device (", x.device(), ")");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  MoeW4A16Params p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  p.scales = scales.data_ptr();
  p.offsets = offsets ? offsets->data_ptr() : nullptr;
  p.expert_ids = expert_ids.data_ptr<int32_t>();
  p.pairs = static_cast<int>(expert_ids.size(0));
  p.x_group = static_cast<int>(x_group);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.group_size = static_cast<int>(group_size);
  p.x_stride = x.stride(0);
  p.out_stride = out.stride(0);
  p.mode = zeros.has_value() ? Int4Mode::kZeros : mins.has_value() ? Int4Mode::kMins : Int4Mode::kSymmetric;
  p.dtype = to_dtype(x, kOp);
  check_launch(launch_moe_w4a16(p, stream_of(x)), kOp);
}
#endif

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("moe_gemv", &fastinfer::torch_glue::moe_gemv);
#ifdef FASTINFER_HAS_SM90
  m.impl("moe_int4_linear", &fastinfer::torch_glue::moe_int4_linear);
#endif
}
