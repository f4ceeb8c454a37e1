// Weight-stream microbenchmark: how fast can a kernel read a decode projection's weights, by access
// pattern, next to fastinfer's decode GEMV on the same weights (CUDA runtime + csrc/include only).
//
//   bench_stream [--json PATH] [--iters N] [--warmup N]
//
// A batch-1 decode step is a stream of weights: on the H200 of 2026-11-28 dense_gemv took 94% of a
// Llama-3-8B step reading at ~80% of copy bandwidth (bench/PERF_NOTES.md). This separates what the
// access pattern and the grid cost from what the GEMV's arithmetic costs. For each Llama-3-8B
// projection (bf16 W [N, K]), the same bytes are read by:
//   dense_gemv M=1   fastinfer's decode GEMV (launch_dense_gemv), the product
//   tiles            the GEMV's loads alone: one CTA (8 warps) per 16-row tile, warp w taking the
//                    tile's 128-column chunks w, w + 8, ..., two chunks' loads (8 KiB per warp) in
//                    flight, the loaded words summed instead of multiplied
//   persistent       the same tile body, 2 CTAs per SM looping over the tiles round-robin (no
//                    partial last wave, no per-tile CTA start)
//   contiguous       the same, each CTA one contiguous range of tiles
//   linear           grid-stride 16-byte loads over the whole weight, 8 in flight per thread
//   dense_gemv W8A16 the decode GEMV on the same shape with e4m3 weights (DenseGemvParams::weight_scale:
//                    half the bytes, converted in registers); GB/s counts its N K bytes, and "vs
//                    dense_gemv" is the 16-bit GEMV's time over its (2.0 would be the bytes' ratio)
//   ..., read flush  dense_gemv and linear again with the L2 flushed by a 256 MB read instead of the
//                    write (or the other way round under FASTINFER_BENCH_FLUSH=read): whether the
//                    ~9 us every call pays is the write-back of the write flush's dirty lines
// and a chain of a step's GEMVs (4 layers of q/k/v, o, gate / up, down) without and with the L2
// prefetch of each next weight (gemv.cuh, "L2 prefetch across kernels").
// Each read pattern adds the weight's 32-bit words (wrapping) into one counter; all of them must
// give the same sum (each word read exactly once), or the row is marked wrong. GB/s counts the
// weight bytes once; "of copy" divides by the device-to-device copy rate (read + write) of the
// same run. Timing: bench/bench_common.cuh (L2 flushed before every launch, median).
#include <memory>

#include "bench_common.cuh"
#include "fastinfer/gemm/gemv.h"

namespace {

using namespace bench;

struct Shape {
  const char* name;
  int n;
  int64_t k;
};

// Llama-3-8B's decode projections (q/k/v fused, gate/up fused) and its LM head.
const Shape kShapes[] = {
    {"qkv 4096->6144", 6144, 4096},   {"o 4096->4096", 4096, 4096},     {"gate_up 4096->28672", 28672, 4096},
    {"down 14336->4096", 4096, 14336}, {"lm_head 4096->128256", 128256, 4096},
};

constexpr int kThreads = 256;  // 8 warps, as the GEMV
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 16;
constexpr int kChunkK = 128;  // bf16 columns per warp chunk: 16 rows x 256 B = 4 KiB

__device__ __forceinline__ uint4 ld_stream(const void* ptr) {  // the GEMV's weight load
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t word_sum(const uint4& v) { return v.x + v.y + v.z + v.w; }

__device__ __forceinline__ void add_block_sum(uint32_t v, unsigned int* sum) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) atomicAdd(sum, v);
}

// The words of one 16-row tile this thread reads, GEMV-style: lane 4 g + c takes 16 bytes at column
// 32 s + 8 c of rows g and g + 8 for s = 0..3 of every chunk of its warp.
__device__ __forceinline__ uint32_t read_tile(const __nv_bfloat16* w, int64_t k, int tile) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const __nv_bfloat16* lo = w + (static_cast<int64_t>(tile) * kTileRows + g) * k;
  const __nv_bfloat16* hi = lo + 8 * k;
  const int64_t chunks = k / kChunkK;
  uint32_t acc = 0;
  for (int64_t ch = warp; ch < chunks; ch += 2 * kWarps) {
    uint4 v[2][8];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t cc = ch + u * kWarps;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int64_t col = cc * kChunkK + 32 * s + 8 * c;
        v[u][2 * s] = cc < chunks ? ld_stream(lo + col) : make_uint4(0, 0, 0, 0);
        v[u][2 * s + 1] = cc < chunks ? ld_stream(hi + col) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc += word_sum(v[u][i]);
  }
  return acc;
}

__global__ void __launch_bounds__(kThreads, 2) tiles_kernel(const __nv_bfloat16* w, int64_t k, unsigned int* sum) {
  add_block_sum(read_tile(w, k, blockIdx.x), sum);
}

__global__ void __launch_bounds__(kThreads, 2) persistent_kernel(const __nv_bfloat16* w, int64_t k, int tiles,
                                                                 unsigned int* sum) {
  uint32_t acc = 0;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) acc += read_tile(w, k, t);
  add_block_sum(acc, sum);
}

__global__ void __launch_bounds__(kThreads, 2) contiguous_kernel(const __nv_bfloat16* w, int64_t k, int tiles,
                                                                 unsigned int* sum) {
  const int begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * tiles / gridDim.x);
  const int end = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * tiles / gridDim.x);
  uint32_t acc = 0;
  for (int t = begin; t < end; ++t) acc += read_tile(w, k, t);
  add_block_sum(acc, sum);
}

__global__ void __launch_bounds__(kThreads) linear_kernel(const uint4* w, int64_t vectors, unsigned int* sum) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  uint32_t acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < vectors; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = i + j * stride < vectors ? ld_stream(w + i + j * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += word_sum(v[j]);
  }
  add_block_sum(acc, sum);
}

struct Result {
  Timing t;
  unsigned int sum;
};

template <typename Launch>
Result run(Launch&& launch, const Buffer& sum, const Args& args) {
  const Timing t = time_cuda([&] {
    BENCH_CHECK(cudaMemsetAsync(sum.get(), 0, sizeof(unsigned int)));
    launch();
  }, args);
  // One more launch from a zeroed counter for the checksum (the timed ones summed on top of each other).
  BENCH_CHECK(cudaMemset(sum.get(), 0, sizeof(unsigned int)));
  launch();
  BENCH_CHECK(cudaGetLastError());
  unsigned int host = 0;
  BENCH_CHECK(cudaMemcpy(&host, sum.get(), sizeof host, cudaMemcpyDeviceToHost));
  return {t, host};
}

// e4m3 codes from a hash of the index, the exponent's top bit cleared (& 0xB7: |w| <= 1.875, never the
// NaN code S.1111.111).
__global__ void fill_e4m3_kernel(uint8_t* w, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += gridDim.x * static_cast<size_t>(blockDim.x)) {
    w[i] = static_cast<uint8_t>(((static_cast<uint32_t>(i) * 2654435761u) >> 24) & 0xB7u);
  }
}

__global__ void fill_float_kernel(float* x, size_t n, float value) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += gridDim.x * static_cast<size_t>(blockDim.x)) x[i] = value;
}

// dense_gemv at M = 1 over a bf16 W of shape s.
fastinfer::DenseGemvParams gemv_params(void* out, const void* x, const void* w, const Shape& s) {
  fastinfer::DenseGemvParams p{};
  p.out = out;
  p.x = x;
  p.weight = w;
  p.m = 1;
  p.n = s.n;
  p.k = s.k;
  p.x_stride = s.k;
  p.out_stride = s.n;
  p.dtype = fastinfer::DType::kBFloat16;
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv, "[--json PATH] [--iters N] [--warmup N]");
  const Device dev = require_hopper(argv[0]);
  const int sms = dev.prop.multiProcessorCount;
  const Copy copy = copy_bandwidth(args);
  std::printf("%s (%d SMs); device-to-device copy %.0f GB/s (read + write)\n", dev.prop.name, sms, copy.gbps);

  std::vector<Row> rows;
  bool all_ok = true;
  for (const Shape& s : kShapes) {
    if (s.n % kTileRows != 0 || s.k % kChunkK != 0) cannot_run(argv[0], "shape not a multiple of the tile");
    const double bytes = 2.0 * s.n * s.k;
    Buffer w(static_cast<size_t>(bytes)), x(static_cast<size_t>(s.k) * 2), out(static_cast<size_t>(s.n) * 2);
    Buffer sum(sizeof(unsigned int));
    fill_uniform_bf16(w, 21, -0.05f, 0.05f);
    fill_uniform_bf16(x, 22);
    const auto* wp = w.get<__nv_bfloat16>();
    unsigned int* sp = sum.get<unsigned int>();
    const int tiles = s.n / kTileRows;
    const int resident = std::min(tiles, 2 * sms);

    const fastinfer::DenseGemvParams p = gemv_params(out.get(), x.get(), w.get(), s);
    const auto launch_gemv = [&] { BENCH_CHECK(fastinfer::launch_dense_gemv(p, nullptr)); };
    const Timing gemv = time_cuda(launch_gemv, args);
    const unsigned long long nonfinite = count_nonfinite_bf16(out);

    const auto launch_linear = [&] {
      linear_kernel<<<4 * sms, kThreads>>>(w.get<uint4>(), static_cast<int64_t>(bytes / 16), sp);
    };
    const Result linear = run(launch_linear, sum, args);
    // The same two under the other flush (PERF_NOTES: is the ~9 us per call the write-back of the
    // flush's dirty lines?), then back to the mode of the run.
    const bool flush_reads = l2_flush_reads();
    l2_flush_override = flush_reads ? 0 : 1;
    const Timing gemv_other = time_cuda(launch_gemv, args);
    const Result linear_other = run(launch_linear, sum, args);
    l2_flush_override = -1;
    const std::string other = flush_reads ? ", write flush" : ", read flush";
    const std::pair<const char*, Result> reads[] = {
        {"tiles", run([&] { tiles_kernel<<<tiles, kThreads>>>(wp, s.k, sp); }, sum, args)},
        {"persistent", run([&] { persistent_kernel<<<resident, kThreads>>>(wp, s.k, tiles, sp); }, sum, args)},
        {"contiguous", run([&] { contiguous_kernel<<<resident, kThreads>>>(wp, s.k, tiles, sp); }, sum, args)},
        {"linear", linear},
    };

    auto row = [&](const char* impl, const Timing& t, Value check, long long grid) {
      const double gbps = bytes / (t.us * 1e-6) / 1e9;
      rows.push_back({{"shape", std::string(s.name)}, {"impl", std::string(impl)}, {"grid", grid},
                       {"us", t.us}, {"min_us", t.min_us}, {"gbps", gbps}, {"of_copy", gbps / copy.gbps},
                       {"vs_gemv", gemv.us / t.us}, {"check", std::move(check)}});
    };
    row("dense_gemv M=1", gemv, Value(std::string(nonfinite ? "NON-FINITE" : "finite")), tiles);
    {  // the same GEMV with e4m3 weights (W8A16): half the bytes
      Buffer w8(static_cast<size_t>(bytes / 2)), scale(static_cast<size_t>(s.n) * 4);
      fill_e4m3_kernel<<<4 * sms, 256>>>(w8.get<uint8_t>(), static_cast<size_t>(bytes / 2));
      fill_float_kernel<<<4 * sms, 256>>>(scale.get<float>(), static_cast<size_t>(s.n), 1.0f / 448.0f);
      BENCH_CHECK(cudaGetLastError());
      fastinfer::DenseGemvParams p8 = gemv_params(out.get(), x.get(), w8.get(), s);
      p8.weight_scale = scale.get<float>();
      const Timing t8 = time_cuda([&] { BENCH_CHECK(fastinfer::launch_dense_gemv(p8, nullptr)); }, args);
      const double gbps = bytes / 2 / (t8.us * 1e-6) / 1e9;
      rows.push_back({{"shape", std::string(s.name)}, {"impl", std::string("dense_gemv W8A16 M=1")}, {"grid", tiles},
                      {"us", t8.us}, {"min_us", t8.min_us}, {"gbps", gbps}, {"of_copy", gbps / copy.gbps},
                      {"vs_gemv", gemv.us / t8.us},
                      {"check", Value(std::string(count_nonfinite_bf16(out) ? "NON-FINITE" : "finite"))}});
    }
    for (const auto& [name, r] : reads) {
      const bool ok = r.sum == linear.sum;
      all_ok = all_ok && ok;
      const long long grid = std::string(name) == "tiles" ? tiles : std::string(name) == "linear" ? 4LL * sms : resident;
      row(name, r.t, Value(std::string(ok ? "sum ok" : "SUM DIFFERS")), grid);
    }
    row(("dense_gemv M=1" + other).c_str(), gemv_other, Value(std::string(count_nonfinite_bf16(out) ? "NON-FINITE" : "finite")),
        tiles);
    const bool other_ok = linear_other.sum == linear.sum;
    all_ok = all_ok && other_ok;
    row(("linear" + other).c_str(), linear_other.t, Value(std::string(other_ok ? "sum ok" : "SUM DIFFERS")), 4LL * sms);
  }

  // The GEMVs of a batch-1 step back to back (gemv.cuh, "L2 prefetch across kernels"): 4 Llama-3-8B
  // layers of q/k/v, o, gate / up (SwiGLU) and down on distinct weights (1.74 GB, so nothing stays in
  // L2 from one chain to the next), one stream, the L2 flushed once before each chain. Without and with
  // each kernel asking L2 for the next weight's first bytes as it finishes; the outputs of every
  // prefetch budget must equal the plain chain's bit for bit.
  {
    constexpr int kLayers = 4;
    const Shape chain_shapes[] = {kShapes[0], kShapes[1], kShapes[2], kShapes[3]};
    std::vector<std::unique_ptr<Buffer>> weights, outs;
    double chain_bytes = 0;
    int64_t max_k = 0;
    for (int l = 0; l < kLayers; ++l) {
      for (const Shape& s : chain_shapes) {
        weights.push_back(std::make_unique<Buffer>(static_cast<size_t>(2 * s.n * s.k)));
        fill_uniform_bf16(*weights.back(), 100 + weights.size(), -0.05f, 0.05f);
        outs.push_back(std::make_unique<Buffer>(static_cast<size_t>(s.n) * 2));
        chain_bytes += 2.0 * s.n * s.k;
        max_k = std::max(max_k, s.k);
      }
    }
    Buffer x(static_cast<size_t>(max_k) * 2);
    fill_uniform_bf16(x, 23);
    const int kernels = static_cast<int>(weights.size());
    const auto launch_chain = [&](int64_t budget) {
      for (int i = 0; i < kernels; ++i) {
        const Shape& s = chain_shapes[i % 4];
        fastinfer::DenseGemvParams p = gemv_params(outs[i]->get(), x.get(), weights[i]->get(), s);
        p.swiglu = i % 4 == 2;  // gate_up
        if (p.swiglu) p.out_stride = s.n / 2;
        if (budget > 0 && i + 1 < kernels) {
          const Shape& next = chain_shapes[(i + 1) % 4];
          p.prefetch = weights[i + 1]->get();
          p.prefetch_rows = next.n;
          p.prefetch_row_bytes = 2 * next.k;
          p.prefetch_budget = budget;
          p.prefetch_swiglu = (i + 1) % 4 == 2;
          p.num_sms = sms;
        }
        BENCH_CHECK(fastinfer::launch_dense_gemv(p, nullptr));
      }
    };
    const auto snapshot = [&] {
      std::vector<std::vector<char>> host;
      for (const auto& o : outs) {
        host.emplace_back(o->bytes());
        BENCH_CHECK(cudaMemcpy(host.back().data(), o->get(), o->bytes(), cudaMemcpyDeviceToHost));
      }
      return host;
    };
    const Timing plain = time_cuda([&] { launch_chain(0); }, args);
    const auto plain_out = snapshot();
    char shape[64];
    std::snprintf(shape, sizeof shape, "chain: %d layers x 4 GEMVs", kLayers);
    const auto chain_row = [&](const std::string& impl, const Timing& t, const std::string& check) {
      const double gbps = chain_bytes / (t.us * 1e-6) / 1e9;
      rows.push_back({{"shape", std::string(shape)}, {"impl", impl}, {"grid", static_cast<long long>(kernels)},
                       {"us", t.us}, {"min_us", t.min_us}, {"gbps", gbps}, {"of_copy", gbps / copy.gbps},
                       {"vs_gemv", plain.us / t.us}, {"check", check}});
    };
    chain_row("dense_gemv chain", plain, "reference");
    for (const int64_t mb : {4, 8, 16, 32}) {
      const Timing t = time_cuda([&] { launch_chain(mb << 20); }, args);
      const bool same = snapshot() == plain_out;
      all_ok = all_ok && same;
      chain_row("dense_gemv chain, L2 prefetch " + std::to_string(mb) + " MB", t, same ? "same bits" : "OUTPUT DIFFERS");
    }
  }

  const std::vector<Column> cols = {
      {"shape", "shape (bf16 W [N, K])", ""}, {"impl", "impl", ""},           {"grid", "CTAs", "d"},
      {"us", "time (us)", ".1f"},             {"min_us", "min (us)", ".1f"},  {"gbps", "GB/s", ".0f"},
      {"of_copy", "of copy BW", ".1%"},       {"vs_gemv", "vs dense_gemv", ".2f"}, {"check", "check", ""}};
  print_table(cols, rows);
  char note[160];
  std::snprintf(note, sizeof note, "device-to-device copy %.0f GB/s (read + write); GB/s = weight bytes / median time",
                copy.gbps);
  std::vector<std::string> notes = {
      note, "tiles = the GEMV's loads without its arithmetic; persistent / contiguous = the same tiles over 2 CTAs "
            "per SM; linear = grid-stride 16-byte loads; median of " + std::to_string(args.iters) +
            " launches, " + bench::l2_flush_description()};
  notes.push_back("chain rows: 16 dense_gemv launches (4 Llama-3-8B layers, gate_up as SwiGLU) timed as one, the "
                  "L2 flushed before each chain; 'vs dense_gemv' is the plain chain's time over the row's; "
                  "'L2 prefetch N MB': each kernel asks L2 for ~N MB of the next weight's first bytes as it finishes");
  if (!all_ok) notes.push_back("ERROR: a read pattern's word sum differs from linear's (a word read twice or never), "
                               "or a prefetching chain's outputs differ from the plain chain's");
  if (!args.json.empty()) {
    write_fragment(args.json, "stream_cpp", "Weight stream: dense_gemv against its access pattern alone (C++)", dev,
                   notes, cols, rows, {{"copy", {{"bytes", copy.bytes}, {"us", copy.us}, {"gbps", copy.gbps}}}});
  }
  if (!all_ok) std::fprintf(stderr, "bench_stream: a read pattern's word sum differs\n");
  return all_ok ? 0 : 1;
}
