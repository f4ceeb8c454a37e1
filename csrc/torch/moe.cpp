// CUDA binding of moe_gemv (gemm/moe_gemv.h): tensors -> MoeGemvParams, current stream, launch.
// python/fastinfer/_ops_moe.py validates; the checks here are the second line of defence.
#include <torch/library.h>

#include <limits>

#include "common.h"  // csrc/torch/common.h
#include "fastinfer/gemm/moe_gemv.h"

namespace fastinfer::torch_glue {
namespace {

void moe_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_ids,
              int64_t x_group, bool silu_mul) {
  constexpr const char* kOp = "moe_gemv";
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              " on CUDA takes float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), kOp,
              ": x, weight and out must share one dtype");
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
  TORCH_CHECK(!out.is_alias_of(x) && !out.is_alias_of(weight), kOp, ": out must not share memory with x or weight");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &weight, &expert_ids}) {
    TORCH_CHECK(t->device() == x.device(), kOp, ": every tensor must be on x's device (", x.device(), ")");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  MoeGemvParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
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

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) { m.impl("moe_gemv", &fastinfer::torch_glue::moe_gemv); }
