// Paged prefill attention microbenchmark (CUDA runtime + csrc/include only; no torch, no Python).
//
//   bench_prefill [--json PATH] [--iters N] [--warmup N]
//
// bf16, causal, head_dim 128 (and one 64), over a paged KV cache of random bf16 values whose block
// table is a random permutation of the cache's blocks. Each case: batch sequences of `context`
// tokens of which the last q_len are queries (q_len == context: a whole prompt; q_len < context: one
// chunk of a chunked prefill). FLOPs counted: 4 * head_dim * num_heads per (query, visible key), i.e.
// 2*2*B*H*S*S*D/2 for a whole causal prompt (the usual convention). Each case runs both query tile
// heights of the mma kernel (PrefillParams.block_m 128 and 64) and, in a build with 90a
// (FASTINFER_HAS_SM90), the sm_90a wgmma kernel. Timing: bench/bench_common.cuh.
#include "bench_common.cuh"
#include "fastinfer/attention/prefill.h"

namespace {

using namespace bench;

struct Case {
  int batch, heads, kv_heads, q_len, context, head_dim, block_size;
};

const Case kCases[] = {
    {4, 32, 8, 4096, 4096, 128, 16},   // Llama-3-8B GQA; the shape of the SDPA peer figures in GPU.md
    {4, 32, 32, 4096, 4096, 128, 16},  // MHA, same shape
    {4, 32, 8, 4096, 4096, 128, 64},   // larger KV blocks
    {4, 32, 8, 4096, 4096, 64, 16},    // head_dim 64
    {1, 32, 8, 1024, 1024, 128, 16},   // one short prompt
    {16, 32, 8, 1024, 1024, 128, 16},  // many short prompts
    {4, 32, 8, 512, 4096, 128, 16},    // a 512-token chunk at the end of a 4096-token context
};

// Multiply-adds of QK^T and PV over the causal mask: each of q_len queries sees
// context - q_len + j + 1 keys (j = 0 .. q_len - 1); for q_len == context this is counted as S*S/2.
double causal_flops(const Case& c) {
  const double q = c.q_len, prior = c.context - c.q_len;
  const double pairs = q * prior + (c.q_len == c.context ? q * q / 2 : q * (q + 1) / 2);
  return 4.0 * c.batch * c.heads * c.head_dim * pairs;
}

std::string case_name(const Case& c) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "B%d H%d/%d D%d q%d ctx%d", c.batch, c.heads, c.kv_heads, c.head_dim, c.q_len,
                c.context);
  return buf;
}

// block_m 0: the wgmma kernel (128 rows per CTA).
Row run_case(const Case& c, int block_m, const Args& args, unsigned long long* nonfinite) {
  const int max_blocks = (c.context + c.block_size - 1) / c.block_size;
  const size_t num_blocks = size_t(c.batch) * max_blocks;
  const size_t tokens = size_t(c.batch) * c.q_len;
  Buffer kv(num_blocks * 2 * c.block_size * c.kv_heads * c.head_dim * 2);
  Buffer query(tokens * c.heads * c.head_dim * 2), out(query.bytes());
  fill_uniform_bf16(kv, 1);
  fill_uniform_bf16(query, 2);

  std::vector<int32_t> cu_seqlens(c.batch + 1), seq_lens(c.batch, c.context);
  for (int b = 0; b <= c.batch; ++b) cu_seqlens[b] = b * c.q_len;
  const std::vector<int32_t> table = shuffled_block_table(c.batch, max_blocks, 3);
  Buffer d_cu(cu_seqlens.size() * 4), d_lens(seq_lens.size() * 4), d_table(table.size() * 4);
  upload(d_cu, cu_seqlens.data(), d_cu.bytes());
  upload(d_lens, seq_lens.data(), d_lens.bytes());
  upload(d_table, table.data(), d_table.bytes());

  fastinfer::PrefillParams p{};
  p.out = out.get();
  p.query = query.get();
  p.kv_cache = kv.get();
  p.cu_seqlens_q = d_cu.get<int32_t>();
  p.seq_lens = d_lens.get<int32_t>();
  p.block_tables = d_table.get<int32_t>();
  p.num_tokens = static_cast<int64_t>(tokens);
  p.batch = c.batch;
  p.num_heads = c.heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.block_size = c.block_size;
  p.query_token_stride = p.out_token_stride = int64_t{c.heads} * c.head_dim;
  p.query_head_stride = p.out_head_stride = c.head_dim;
  p.block_table_stride = max_blocks;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.dtype = fastinfer::DType::kBFloat16;
  p.block_m = block_m;

  const bool wgmma = block_m == 0;
  const Timing t = time_cuda(
      [&] {
#ifdef FASTINFER_HAS_SM90
        if (wgmma) {
          BENCH_CHECK(fastinfer::launch_paged_prefill_wgmma(p, nullptr));
          return;
        }
#endif
        BENCH_CHECK(fastinfer::launch_paged_prefill_attention(p, nullptr));
      },
      args);
  const unsigned long long bad = count_nonfinite_bf16(out);
  *nonfinite += bad;
  const double tflops = causal_flops(c) / (t.us * 1e-6) / 1e12;
  return {{"case", case_name(c)},      {"kernel", std::string(wgmma ? "wgmma" : "mma")},
          {"rows", (long long)(wgmma ? 128 : block_m)},      {"batch", (long long)c.batch},     {"heads", (long long)c.heads},
          {"kv_heads", (long long)c.kv_heads}, {"head_dim", (long long)c.head_dim}, {"q_len", (long long)c.q_len},
          {"context", (long long)c.context},   {"block", (long long)c.block_size},  {"us", t.us},
          {"min_us", t.min_us},        {"flops", causal_flops(c)},        {"tflops", tflops},
          {"nonfinite", (long long)bad}};
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "[--json PATH] [--iters N] [--warmup N]");
  const Device dev = require_hopper(argv[0]);
  std::printf("%s (sm_%d%d, %d SMs), CUDA runtime %d, driver %d\n", dev.prop.name, dev.prop.major, dev.prop.minor,
              dev.prop.multiProcessorCount, dev.runtime_version, dev.driver_version);

  std::vector<Row> rows;
  unsigned long long nonfinite = 0;
  for (const Case& c : kCases) {
#ifdef FASTINFER_HAS_SM90
    const std::vector<int> variants = {128, 64, 0};  // 0: the wgmma kernel
#else
    const std::vector<int> variants = {128, 64};
#endif
    for (const int block_m : variants) {
      rows.push_back(run_case(c, block_m, args, &nonfinite));
      std::printf("  %-36s %-5s rows %3d %10.1f us %8.1f TFLOP/s\n", case_name(c).c_str(), block_m ? "mma" : "wgmma",
                  block_m ? block_m : 128,
                  std::get<double>(*find(rows.back(), "us")), std::get<double>(*find(rows.back(), "tflops")));
      std::fflush(stdout);
    }
  }
  const std::vector<Column> cols = {{"case", "case", ""},       {"kernel", "kernel", ""}, {"rows", "query rows / CTA", "d"}, {"block", "block", "d"},
                                    {"us", "time (us)", ".1f"}, {"min_us", "min (us)", ".1f"},
                                    {"tflops", "TFLOP/s", ".1f"}};
  std::printf("\n");
  print_table(cols, rows);

  std::vector<std::string> notes = {
      "fastinfer launch_paged_prefill_attention (mma) and launch_paged_prefill_wgmma (sm_90a) from C++ (no torch): bf16, causal, random paged KV cache with a "
      "shuffled block table; median of " + std::to_string(args.iters) +
      " launches, " + bench::l2_flush_description() + "; FLOPs 2*2*B*H*S*S*D/2 for a whole causal prompt, exact "
      "visible-key count for a chunk"};
  if (nonfinite) notes.push_back("ERROR: " + std::to_string(nonfinite) + " non-finite output values");
  if (!args.json.empty()) {
    write_fragment(args.json, "prefill_cpp", "Paged prefill attention, C++ microbenchmark (bf16, causal)", dev, notes,
                   cols, rows, {});
  }
  if (nonfinite) {
    std::fprintf(stderr, "bench_prefill: %llu non-finite output values\n", nonfinite);
    return 1;
  }
  return 0;
}
