// Paged decode attention microbenchmark (CUDA runtime + csrc/include only; no torch, no Python).
//
//   bench_decode [--json PATH] [--iters N] [--warmup N]
//
// bf16, one query token per sequence, 32 query / 8 KV heads, head_dim 128, every sequence at the same
// context length, over a paged KV cache of random bf16 values whose block table is a random
// permutation of the cache's blocks. Decode reads the whole KV context once, so its ceiling is
// memory bandwidth: bytes = K and V of the context (batch * context * kv_heads * head_dim * 2 * 2),
// reported as TB/s and as a fraction of the device-to-device copy bandwidth (cudaMemcpy of 1 GiB,
// read + write counted) measured in the same run. Each case runs both kernels (DecodeParams.kernel):
// tensor cores (the default for bf16) and CUDA cores. Timing: bench/bench_common.cuh.
#include "bench_common.cuh"
#include "fastinfer/attention/decode.h"

namespace {

using namespace bench;

struct Case {
  int batch, heads, kv_heads, context, head_dim, block_size;
};

const Case kCases[] = {
    {64, 32, 8, 4096, 128, 16},  // the shape of the SDPA decode peer figure in GPU.md
    {64, 32, 8, 4096, 128, 32},
    {64, 32, 8, 4096, 128, 64},
    {1, 32, 8, 8192, 128, 16},   // one long sequence: only split-KV fills the GPU
    {8, 32, 8, 8192, 128, 16},
    {16, 64, 8, 4096, 128, 16},   // group 8 (Llama-3-70B's heads): twice the FLOP per KV byte
    {16, 32, 32, 2048, 128, 16},  // MHA (group 1): 15 of the tensor-core kernel's 16 mma rows are padding
};

double kv_bytes(const Case& c) { return 2.0 * 2.0 * c.batch * double(c.context) * c.kv_heads * c.head_dim; }

std::string case_name(const Case& c) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "B%d H%d/%d D%d ctx%d", c.batch, c.heads, c.kv_heads, c.head_dim, c.context);
  return buf;
}

const char* kernel_name(fastinfer::DecodeKernel k) {
  return k == fastinfer::DecodeKernel::kCudaCores ? "CUDA cores" : "tensor cores";
}

Row run_case(const Case& c, fastinfer::DecodeKernel kernel, const Device& dev, double copy_gbps, const Args& args,
             unsigned long long* nonfinite) {
  const int max_blocks = (c.context + c.block_size - 1) / c.block_size;
  const size_t num_blocks = size_t(c.batch) * max_blocks;
  Buffer kv(num_blocks * 2 * c.block_size * c.kv_heads * c.head_dim * 2);
  Buffer query(size_t(c.batch) * c.heads * c.head_dim * 2), out(query.bytes());
  fill_uniform_bf16(kv, 11);
  fill_uniform_bf16(query, 12);
  const std::vector<int32_t> seq_lens(c.batch, c.context);
  const std::vector<int32_t> table = shuffled_block_table(c.batch, max_blocks, 13);
  Buffer d_lens(seq_lens.size() * 4), d_table(table.size() * 4);
  upload(d_lens, seq_lens.data(), d_lens.bytes());
  upload(d_table, table.data(), d_table.bytes());

  fastinfer::DecodeParams p{};
  p.out = out.get();
  p.query = query.get();
  p.kv_cache = kv.get();
  p.block_tables = d_table.get<int32_t>();
  p.seq_lens = d_lens.get<int32_t>();
  p.out_batch_stride = p.query_batch_stride = int64_t{c.heads} * c.head_dim;
  p.out_head_stride = p.query_head_stride = c.head_dim;
  p.block_table_stride = max_blocks;
  p.batch = c.batch;
  p.num_heads = c.heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.block_size = c.block_size;
  p.max_blocks = max_blocks;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.dtype = fastinfer::DType::kBFloat16;
  p.num_sms = dev.prop.multiProcessorCount;
  p.kernel = kernel;
  fastinfer::DecodePlan plan{};
  BENCH_CHECK(fastinfer::plan_paged_decode(p, &plan));
  Buffer workspace(plan.workspace_bytes);

  const Timing t =
      time_cuda([&] { BENCH_CHECK(fastinfer::launch_paged_decode_attention(p, workspace.get(), nullptr)); }, args);
  const unsigned long long bad = count_nonfinite_bf16(out);
  *nonfinite += bad;
  const double gbps = kv_bytes(c) / (t.us * 1e-6) / 1e9;
  return {{"case", case_name(c)},
          {"kernel", std::string(kernel_name(kernel))},
          {"batch", (long long)c.batch},
          {"heads", (long long)c.heads},
          {"kv_heads", (long long)c.kv_heads},
          {"head_dim", (long long)c.head_dim},
          {"context", (long long)c.context},
          {"block", (long long)c.block_size},
          {"splits", (long long)plan.num_splits},
          {"us", t.us},
          {"min_us", t.min_us},
          {"kv_mb", kv_bytes(c) / 1e6},
          {"tbps", gbps / 1e3},
          {"frac_copy", gbps / copy_gbps},
          {"nonfinite", (long long)bad}};
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "[--json PATH] [--iters N] [--warmup N]");
  const Device dev = require_hopper(argv[0]);
  std::printf("%s (sm_%d%d, %d SMs), CUDA runtime %d, driver %d\n", dev.prop.name, dev.prop.major, dev.prop.minor,
              dev.prop.multiProcessorCount, dev.runtime_version, dev.driver_version);
  const Copy copy = copy_bandwidth(args);
  std::printf("device-to-device copy (cudaMemcpy 1 GiB, read + write): %.0f GB/s (%.1f us)\n", copy.gbps, copy.us);

  std::vector<Row> rows;
  unsigned long long nonfinite = 0;
  for (const Case& c : kCases) {
    for (const auto kernel : {fastinfer::DecodeKernel::kTensorCores, fastinfer::DecodeKernel::kCudaCores}) {
      rows.push_back(run_case(c, kernel, dev, copy.gbps, args, &nonfinite));
      std::printf("  %-28s block %2d %-12s %9.1f us %6.2f TB/s\n", case_name(c).c_str(), c.block_size,
                  kernel_name(kernel), std::get<double>(*find(rows.back(), "us")),
                  std::get<double>(*find(rows.back(), "tbps")));
      std::fflush(stdout);
    }
  }
  const std::vector<Column> cols = {{"case", "case", ""},         {"kernel", "kernel", ""}, {"block", "block", "d"},
                                    {"splits", "splits", "d"},    {"us", "time (us)", ".1f"},
                                    {"kv_mb", "KV read (MB)", ".1f"}, {"tbps", "TB/s", ".2f"},
                                    {"frac_copy", "of copy BW", ".1%"}};
  std::printf("\n");
  print_table(cols, rows);

  char copy_note[160];
  std::snprintf(copy_note, sizeof copy_note, "device-to-device copy %.0f GB/s (cudaMemcpy of 1 GiB, read + write)",
                copy.gbps);
  std::vector<std::string> notes = {
      copy_note,
      "fastinfer plan_paged_decode + launch_paged_decode_attention from C++ (no torch): bf16, random paged KV cache "
      "with a shuffled block table; bytes = K and V of the context; median of " + std::to_string(args.iters) +
      " launches, " + bench::l2_flush_description()};
  if (nonfinite) notes.push_back("ERROR: " + std::to_string(nonfinite) + " non-finite output values");
  if (!args.json.empty()) {
    write_fragment(args.json, "decode_cpp", "Paged decode attention, C++ microbenchmark (bf16, 32/8 heads, D128)", dev,
                   notes, cols, rows,
                   {{"copy", {{"bytes", copy.bytes}, {"us", copy.us}, {"gbps", copy.gbps}}}});
  }
  if (nonfinite) {
    std::fprintf(stderr, "bench_decode: %llu non-finite output values\n", nonfinite);
    return 1;
  }
  return 0;
}
