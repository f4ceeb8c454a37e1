// CPU reference: causal attention with GQA over the paged KV cache.
//
// Prefill (ragged batch): sequence b owns query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]; they are
// the LAST q_len tokens of a context of seq_lens[b] tokens already written to the cache, so query
// j sits at position seq_lens[b] - q_len + j and sees keys 0 .. that position. Chunked prefill and
// prefix-cache hits are the case q_len < seq_len. Decode is q_len = 1 for every sequence.
// Query head h reads KV head h / (num_heads / num_kv_heads).
// window > 0 (sliding-window attention, Mistral / Phi-3 / Qwen2's sliding layers): a query at position
// p sees only keys p - window < j <= p, as HF's sliding_window_overlay (kv_idx > q_idx - window);
// window 0 is full causal attention. Every block-table entry of the context must be an id in range; with a
// window, the blocks wholly below it are never read (the engine releases them and leaves stale ids).
//
// FP8 KV cache (the *_fp8 ops): the cache holds e4m3 values and kv_scale = [k_scale, v_scale], so
// K = k_scale * k8 and V = v_scale * v8. The scales are folded where they cost nothing: scores are
// (q . k8) * (scale * k_scale) and the output is (sum p v8 / sum p) * v_scale. With both scales 1
// (a plain cache) this is exactly the unscaled computation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/fp8_convert.h"
#include "cpu/ops.h"

namespace fastinfer::cpu {

namespace {

struct PagedKV {
  const void* cache;
  int64_t block_size, num_kv_heads, head_dim, num_blocks;
  float k_scale = 1.0f, v_scale = 1.0f;
};

// One query row attends to keys [first_key, num_keys) of one sequence: softmax(s) @ v in fp32 with
// s_j = q.k_j * scale, soft-capped to softcap * tanh(s_j / softcap) when softcap > 0 (Gemma 2); lse (if not
// null) receives log(sum_j exp(s_j)) over those keys.
// T: the query / output dtype; C: the cache's (T, or e4m3 for an FP8 cache).
template <typename T, typename C>
void attend_row(T* out, float* lse, const T* q, const PagedKV& kv, const int32_t* block_table, int64_t kv_head,
                int64_t first_key, int64_t num_keys, float scale, float softcap, std::vector<float>& scores,
                std::vector<float>& acc) {
  const int64_t D = kv.head_dim, row = kv.num_kv_heads * D;
  const C* cache = static_cast<const C*>(kv.cache);
  const float score_scale = scale * kv.k_scale;
  auto key_at = [&](int64_t pos) {
    const int64_t block = block_table[pos / kv.block_size], offset = pos % kv.block_size;
    return cache + (block * 2 * kv.block_size + offset) * row + kv_head * D;
  };
  scores.resize(num_keys);
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = first_key; j < num_keys; ++j) {
    const C* k = key_at(j);
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(q[d]) * load_float(k[d]);
    scores[j] = dot * score_scale;
    if (softcap > 0.0f) scores[j] = softcap * std::tanh(scores[j] / softcap);  // Gemma 2
    max_score = std::max(max_score, scores[j]);
  }
  acc.assign(D, 0.0f);
  float denom = 0.0f;
  for (int64_t j = first_key; j < num_keys; ++j) {
    const float p = std::exp(scores[j] - max_score);
    denom += p;
    const C* v = key_at(j) + kv.block_size * row;
    for (int64_t d = 0; d < D; ++d) acc[d] += p * load_float(v[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] / denom * kv.v_scale);
  if (lse != nullptr) *lse = max_score + std::log(denom);
}

// The first key a query at position `position` sees.
int64_t window_start(int64_t position, int64_t window) { return window > 0 ? std::max<int64_t>(0, position - window + 1) : 0; }

PagedKV paged_kv(const at::Tensor& kv_cache, const at::Tensor* kv_scale) {
  PagedKV kv{kv_cache.data_ptr(), kv_cache.size(2), kv_cache.size(3), kv_cache.size(4), kv_cache.size(0)};
  if (kv_scale != nullptr) {
    kv.k_scale = kv_scale->data_ptr<float>()[0];
    kv.v_scale = kv_scale->data_ptr<float>()[1];
  }
  return kv;
}

// Calls fn.template operator()<T, C>() for the query dtype T and the cache element type C.
template <typename Fn>
void dispatch_query_and_cache(const at::Tensor& query, const at::Tensor& kv_cache, const char* op, Fn fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention", [&] {
    if (kv_cache.scalar_type() == at::kFloat8_e4m3fn) {
      fn.template operator()<scalar_t, e4m3>();
    } else {
      TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type(), op, ": kv_cache dtype ", kv_cache.scalar_type(),
                  " differs from query's ", query.scalar_type());
      fn.template operator()<scalar_t, scalar_t>();
    }
  });
}

// Every block a sequence of num_keys tokens uses must exist; checked before any row is read.
void check_block_table(const int32_t* block_table, int64_t num_keys, const PagedKV& kv, int64_t seq) {
  const int64_t used = (num_keys + kv.block_size - 1) / kv.block_size;
  for (int64_t i = 0; i < used; ++i) {
    TORCH_CHECK(block_table[i] >= 0 && block_table[i] < kv.num_blocks, "attention: block_tables[", seq,
                ", ", i, "] = ", block_table[i], " outside the cache's ", kv.num_blocks, " blocks");
  }
}

void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor* kv_scale,
             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& block_tables,
             double scale, const std::optional<at::Tensor>& lse, int64_t window, double softcap) {
  TORCH_CHECK(window >= 0, "paged_prefill_attention: window must be >= 0 (0: full attention), got ", window);
  TORCH_CHECK(softcap >= 0, "paged_prefill_attention: softcap must be >= 0 (0: none), got ", softcap);
  const PagedKV kv = paged_kv(kv_cache, kv_scale);
  const int64_t batch = seq_lens.size(0), heads = query.size(1), group = heads / kv.num_kv_heads;
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  std::vector<int64_t> seq_of_row(query.size(0));
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() && lse->dim() == 2 &&
                    lse->size(0) == query.size(0) && lse->size(1) == heads,
                "paged_prefill_attention: lse must be a contiguous fp32 [num_tokens, num_heads] tensor");
  }
  float* lse_data = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  TORCH_CHECK(cu[0] == 0 && cu[batch] == query.size(0), "paged_prefill_attention: cu_seqlens_q must run from 0 to ",
              query.size(0), " (num_tokens), got ", cu[0], " .. ", cu[batch]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], "paged_prefill_attention: cu_seqlens_q must be non-decreasing");
    const int64_t q_len = cu[b + 1] - cu[b];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[b], "paged_prefill_attention: sequence ", b, " has ", q_len,
                " query tokens but a context of ", lens[b]);
    TORCH_CHECK(lens[b] <= block_tables.size(1) * kv.block_size, "paged_prefill_attention: seq_lens[", b,
                "] = ", lens[b], " exceeds its block table");
    check_block_table(tables + b * table_stride, lens[b], kv, b);
    for (int64_t r = cu[b]; r < cu[b + 1]; ++r) seq_of_row[r] = b;
  }
  dispatch_query_and_cache(query, kv_cache, "paged_prefill_attention", [&]<typename T, typename C>() {
    at::parallel_for(0, query.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / heads, h = i % heads, b = seq_of_row[r];
        const int64_t position = lens[b] - (cu[b + 1] - cu[b]) + (r - cu[b]);
        attend_row<T, C>(out.data_ptr<T>() + r * out.stride(0) + h * out.stride(1),
                         lse_data != nullptr ? lse_data + i : nullptr,  // i = r * heads + h
                         query.data_ptr<T>() + r * query.stride(0) + h * query.stride(1), kv,
                         tables + b * table_stride, h / group, window_start(position, window), position + 1,
                         static_cast<float>(scale), static_cast<float>(softcap), scores, acc);
      }
    });
  });
}

void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor* kv_scale,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window, double softcap) {
  TORCH_CHECK(window >= 0, "paged_decode_attention: window must be >= 0 (0: full attention), got ", window);
  TORCH_CHECK(softcap >= 0, "paged_decode_attention: softcap must be >= 0 (0: none), got ", softcap);
  const PagedKV kv = paged_kv(kv_cache, kv_scale);
  const int64_t batch = query.size(0), heads = query.size(1), group = heads / kv.num_kv_heads;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= block_tables.size(1) * kv.block_size,
                "paged_decode_attention: seq_lens[", b, "] = ", lens[b], " outside [1, block table capacity]");
    check_block_table(tables + b * table_stride, lens[b], kv, b);
  }
  dispatch_query_and_cache(query, kv_cache, "paged_decode_attention", [&]<typename T, typename C>() {
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / heads, h = i % heads;
        attend_row<T, C>(out.data_ptr<T>() + b * out.stride(0) + h * out.stride(1), nullptr,
                         query.data_ptr<T>() + b * query.stride(0) + h * query.stride(1), kv,
                         tables + b * table_stride, h / group, window_start(lens[b] - 1, window), lens[b],
                         static_cast<float>(scale), static_cast<float>(softcap), scores, acc);
      }
    });
  });
}

}  // namespace

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                             const at::Tensor& block_tables, double scale, const std::optional<at::Tensor>& lse,
                             int64_t window, double softcap) {
  prefill(out, query, kv_cache, nullptr, cu_seqlens_q, seq_lens, block_tables, scale, lse, window, softcap);
}

void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const std::optional<at::Tensor>& /*semaphores: the CPU has no splits to merge*/,
                            int64_t window, double softcap) {
  decode(out, query, kv_cache, nullptr, block_tables, seq_lens, scale, window, softcap);
}

void paged_prefill_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                 const at::Tensor& kv_scale, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale,
                                 const std::optional<at::Tensor>& lse, int64_t window, double softcap) {
  prefill(out, query, kv_cache, &kv_scale, cu_seqlens_q, seq_lens, block_tables, scale, lse, window, softcap);
}

void paged_decode_attention_fp8(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                                const at::Tensor& kv_scale, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale,
                                const std::optional<at::Tensor>& /*semaphores: the CPU has no splits to merge*/,
                                int64_t window, double softcap) {
  decode(out, query, kv_cache, &kv_scale, block_tables, seq_lens, scale, window, softcap);
}

}  // namespace fastinfer::cpu
