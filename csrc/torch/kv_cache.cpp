// CUDA bindings of the paged KV-cache write, into a plain cache or (quantizing) an FP8 one.
#include <torch/library.h>

#include "fastinfer/kv/kv.h"
#include "common.h"  // csrc/torch/common.h

namespace fastinfer::torch_glue {
namespace {

// kv_scale nullptr: the plain op (cache of key's dtype); else fp32 [2] and an e4m3 cache.
// Rotary embedding fused in front of the write (rotary_embedding_and_cache): query and key rotated in
// place from positions and cos_sin_cache (the checks of csrc/torch/layers.cpp's rotary binding).
struct FusedRotary {
  const at::Tensor& positions;
  at::Tensor& query;
  const at::Tensor& cos_sin_cache;
  const std::optional<at::Tensor>& q_norm;  // both or neither: per-head RMSNorm weights [head_dim]
  const std::optional<at::Tensor>& k_norm;
  double norm_eps;
};

void write_cache(const char* op, const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                 const at::Tensor& slot_mapping, const at::Tensor* kv_scale, const FusedRotary* rotary = nullptr) {
  // Second line of defence behind python/fastinfer/_ops.py (reshape_and_cache), which raises
  // ValueErrors naming the argument and checks the slot range.
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && kv_cache.dim() == 5 && kv_cache.size(1) == 2 &&
                  kv_cache.size(3) == key.size(1) && kv_cache.size(4) == key.size(2),
              "fastinfer.", op, ": expected key/value [num_tokens, num_kv_heads, head_dim] and kv_cache "
              "[num_blocks, 2, block_size, num_kv_heads, head_dim]");
  for (const at::Tensor* t : {&value, static_cast<const at::Tensor*>(&kv_cache), &slot_mapping}) {
    TORCH_CHECK(t->device() == key.device(), "fastinfer.", op, ": all tensors must be on ", key.device());
  }
  TORCH_CHECK(value.scalar_type() == key.scalar_type() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) && kv_cache.is_contiguous() &&
                  (key.numel() == 0 || (key.stride(2) == 1 && value.stride(2) == 1)),
              "fastinfer.", op, ": value must share key's dtype, slot_mapping must be int64 [num_tokens], "
              "kv_cache contiguous, key and value contiguous in their last dimension");
  if (kv_scale == nullptr) {
    TORCH_CHECK(kv_cache.scalar_type() == key.scalar_type(), "fastinfer.", op, ": kv_cache dtype ",
                kv_cache.scalar_type(), " differs from key's ", key.scalar_type());
  } else {
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat8_e4m3fn, "fastinfer.", op,
                ": kv_cache must be float8_e4m3fn, got ", kv_cache.scalar_type());
    TORCH_CHECK(kv_scale->scalar_type() == at::kFloat && kv_scale->dim() == 1 && kv_scale->numel() == 2 &&
                    kv_scale->is_contiguous() && kv_scale->device() == key.device(),
                "fastinfer.", op, ": kv_scale must be a contiguous float32 [2] (k_scale, v_scale) on ", key.device());
  }
  if (rotary != nullptr) {
    const at::Tensor &q = rotary->query, &pos = rotary->positions, &cs = rotary->cos_sin_cache;
    TORCH_CHECK(q.dim() == 3 && q.size(0) == key.size(0) && q.size(2) == key.size(2) && q.scalar_type() ==
                    key.scalar_type() && q.device() == key.device() && (q.numel() == 0 || q.stride(2) == 1),
                "fastinfer.", op, ": query must be [num_tokens, num_heads, head_dim] of key's dtype and device, "
                "contiguous in its last dimension");
    TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == key.size(0) &&
                    pos.is_contiguous() && pos.device() == key.device(),
                "fastinfer.", op, ": positions must be a contiguous int64 [num_tokens] on ", key.device());
    TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.dim() == 2 && cs.is_contiguous() && cs.device() == key.device() &&
                    cs.size(1) % 2 == 0 && cs.size(1) > 0 && cs.size(1) <= key.size(2),
                "fastinfer.", op, ": cos_sin_cache must be a contiguous float32 [max_position, rotary_dim] with an "
                "even rotary_dim <= head_dim on ", key.device());
    TORCH_CHECK(rotary->q_norm.has_value() == rotary->k_norm.has_value(), "fastinfer.", op,
                ": q_norm and k_norm go together");
    for (const auto* w : {&rotary->q_norm, &rotary->k_norm}) {
      TORCH_CHECK(!w->has_value() || ((*w)->dim() == 1 && (*w)->size(0) == key.size(2) && (*w)->is_contiguous() &&
                                      (*w)->scalar_type() == key.scalar_type() && (*w)->device() == key.device()),
                  "fastinfer.", op, ": q_norm / k_norm must be contiguous [head_dim] of key's dtype on ", key.device());
    }
  }
  const c10::cuda::CUDAGuard guard(key.device());
  ReshapeAndCacheParams p{};
  if (rotary != nullptr) {
    p.positions = rotary->positions.data_ptr<int64_t>();
    p.cos_sin_cache = rotary->cos_sin_cache.data_ptr<float>();
    p.query = rotary->query.data_ptr();
    p.num_heads = static_cast<int>(rotary->query.size(1));
    p.rotary_dim = static_cast<int>(rotary->cos_sin_cache.size(1));
    p.query_token_stride = rotary->query.stride(0);
    p.query_head_stride = rotary->query.stride(1);
    if (rotary->q_norm.has_value()) {
      p.q_norm = rotary->q_norm->data_ptr();
      p.k_norm = rotary->k_norm->data_ptr();
      p.norm_eps = static_cast<float>(rotary->norm_eps);
    }
  }
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.kv_scale = kv_scale == nullptr ? nullptr : kv_scale->data_ptr<float>();
  p.num_tokens = key.size(0);
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(key.size(2));
  p.block_size = static_cast<int>(kv_cache.size(2));
  p.key_token_stride = key.stride(0);
  p.key_head_stride = key.stride(1);
  p.value_token_stride = value.stride(0);
  p.value_head_stride = value.stride(1);
  p.dtype = to_dtype(key, op);
  check_launch(launch_reshape_and_cache(p, stream_of(key)), op);
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping) {
  write_cache("reshape_and_cache", key, value, kv_cache, slot_mapping, nullptr);
}

void reshape_and_cache_fp8(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping, const at::Tensor& kv_scale) {
  write_cache("reshape_and_cache_fp8", key, value, kv_cache, slot_mapping, &kv_scale);
}

void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& cos_sin_cache, at::Tensor& kv_cache, const at::Tensor& slot_mapping,
                                const std::optional<at::Tensor>& kv_scale, const std::optional<at::Tensor>& q_norm,
                                const std::optional<at::Tensor>& k_norm, double norm_eps) {
  const FusedRotary rotary{positions, query, cos_sin_cache, q_norm, k_norm, norm_eps};
  write_cache("rotary_embedding_and_cache", key, value, kv_cache, slot_mapping,
              kv_scale.has_value() ? &*kv_scale : nullptr, &rotary);
}

}  // namespace
}  // namespace fastinfer::torch_glue

TORCH_LIBRARY_IMPL(fastinfer, CUDA, m) {
  m.impl("reshape_and_cache", &fastinfer::torch_glue::reshape_and_cache);
  m.impl("reshape_and_cache_fp8", &fastinfer::torch_glue::reshape_and_cache_fp8);
  m.impl("rotary_embedding_and_cache", &fastinfer::torch_glue::rotary_embedding_and_cache);
}
