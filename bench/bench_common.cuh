// Shared pieces of the C++ microbenchmarks (bench/bench_prefill.cu, bench/bench_decode.cu): CUDA
// runtime only, no torch. They follow the contract of bench/common.py for the Python benchmarks:
//   - exit 2 with one line on stderr when they cannot run (no GPU, not a Hopper GPU),
//   - timing: cudaEvents around each launch, the L2 cache flushed (a 256 MB write, or a read with
//     FASTINFER_BENCH_FLUSH=read) before every timed launch, the median of the launches reported,
//   - results as one JSON fragment (--json PATH) that bench/report.py renders: name, title, device,
//     notes, columns [key, header, Python format spec], rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace bench {

constexpr int kExitCannotRun = 2;
constexpr size_t kL2FlushBytes = size_t{256} << 20;
constexpr size_t kCopyBytes = size_t{1} << 30;  // one direction; a copy moves twice this

[[noreturn]] inline void die(const char* what, cudaError_t err, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", file, line, what, cudaGetErrorName(err),
               cudaGetErrorString(err));
  std::exit(1);
}
#define BENCH_CHECK(expr)                                                   \
  do {                                                                      \
    cudaError_t bench_err_ = (expr);                                        \
    if (bench_err_ != cudaSuccess) ::bench::die(#expr, bench_err_, __FILE__, __LINE__); \
  } while (0)

[[noreturn]] inline void cannot_run(const char* prog, const std::string& why) {
  std::fprintf(stderr, "%s: cannot run: %s\n", prog, why.c_str());
  std::exit(kExitCannotRun);
}

// ---- command line: --json PATH --iters N --warmup N ------------------------------------------------
struct Args {
  std::string json;
  int iters = 20, warmup = 3;
};

inline Args parse_args(int argc, char** argv, const char* usage) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    const bool has_value = i + 1 < argc;
    if (k == "--json" && has_value) {
      a.json = argv[++i];
    } else if (k == "--iters" && has_value) {
      a.iters = std::atoi(argv[++i]);
    } else if (k == "--warmup" && has_value) {
      a.warmup = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s %s\n", argv[0], usage);
      std::exit(k == "-h" || k == "--help" ? 0 : 1);
    }
  }
  if (a.iters < 1 || a.warmup < 0) {
    std::fprintf(stderr, "%s: --iters must be >= 1 and --warmup >= 0\n", argv[0]);
    std::exit(1);
  }
  return a;
}

// ---- the device ----------------------------------------------------------------------------------
struct Device {
  cudaDeviceProp prop;
  int runtime_version, driver_version;
};

// Device 0, or exit 2 when there is none, or it is not the Hopper (sm_90) the kernels are built for.
inline Device require_hopper(const char* prog) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cannot_run(prog, std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorString(err) + ")");
  }
  if (count == 0) cannot_run(prog, "no CUDA device visible");
  Device d{};
  BENCH_CHECK(cudaGetDeviceProperties(&d.prop, 0));
  if (d.prop.major != 9 || d.prop.minor != 0) {
    cannot_run(prog, std::string(d.prop.name) + " is sm_" + std::to_string(d.prop.major) +
                         std::to_string(d.prop.minor) + "; the kernels are built for sm_90a (Hopper)");
  }
  BENCH_CHECK(cudaSetDevice(0));
  BENCH_CHECK(cudaRuntimeGetVersion(&d.runtime_version));
  BENCH_CHECK(cudaDriverGetVersion(&d.driver_version));
  return d;
}

// A device allocation freed on scope exit.
class Buffer {
 public:
  explicit Buffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) BENCH_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~Buffer() {
    if (ptr_) cudaFree(ptr_);  // no check: may run during exit
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// ---- data ----------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_uniform_bf16_kernel(__nv_bfloat16* x, size_t n, uint64_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const float u = static_cast<float>(mix64(seed * 0x9e3779b97f4a7c15ull + i) >> 40) * 0x1p-24f;  // [0, 1)
    x[i] = __float2bfloat16(lo + (hi - lo) * u);
  }
}

__global__ void count_nonfinite_bf16_kernel(const __nv_bfloat16* x, size_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    local += !isfinite(__bfloat162float(x[i]));
  }
  if (local) atomicAdd(count, local);
}

inline void fill_uniform_bf16(const Buffer& b, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  fill_uniform_bf16_kernel<<<1024, 256>>>(b.get<__nv_bfloat16>(), b.bytes() / 2, seed, lo, hi);
  BENCH_CHECK(cudaGetLastError());
}

// Number of NaN / inf values in a bf16 buffer (synchronizes).
inline unsigned long long count_nonfinite_bf16(const Buffer& b) {
  Buffer count(sizeof(unsigned long long));
  BENCH_CHECK(cudaMemset(count.get(), 0, count.bytes()));
  count_nonfinite_bf16_kernel<<<1024, 256>>>(b.get<__nv_bfloat16>(), b.bytes() / 2, count.get<unsigned long long>());
  BENCH_CHECK(cudaGetLastError());
  unsigned long long n = 0;
  BENCH_CHECK(cudaMemcpy(&n, count.get(), sizeof n, cudaMemcpyDeviceToHost));
  return n;
}

// Block table [batch, max_blocks] over a cache of batch * max_blocks blocks, in shuffled order, so
// that consecutive blocks of a sequence lie anywhere in the cache (as they do after serving a while).
inline std::vector<int32_t> shuffled_block_table(int batch, int max_blocks, uint32_t seed) {
  std::vector<int32_t> table(static_cast<size_t>(batch) * max_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(seed));
  return table;
}

inline void upload(const Buffer& dst, const void* src, size_t bytes) {
  BENCH_CHECK(cudaMemcpy(dst.get(), src, bytes, cudaMemcpyHostToDevice));
}

// ---- timing --------------------------------------------------------------------------------------
struct Timing {
  double us, min_us, max_us;
  int iters;
};

// Median / min / max device time of launch() in microseconds. The L2 flush runs before every timed
// launch and also keeps the GPU busy while the host queues the launch, so host launch overhead is
// not counted. FASTINFER_BENCH_FLUSH picks how (bench/common.py reads the same variable):
//   write (default)  a memset of 256 MB: L2 ends full of dirty lines of the flush buffer, which are
//                    written back to DRAM while the timed kernel runs (the suspect of the ~9 us per
//                    call that bench/PERF_NOTES.md fits to every small kernel),
//   read             a kernel reading 256 MB: L2 ends full of clean lines, nothing to write back,
//                    and the timed kernel's operands are still not in L2.
inline const Buffer& l2_flush_buffer() {
  static Buffer flush(kL2FlushBytes);  // one for the whole run
  return flush;
}

// -1: FASTINFER_BENCH_FLUSH decides; 0 / 1: write / read (a benchmark timing both in one run).
inline int l2_flush_override = -1;

inline bool l2_flush_reads() {
  if (l2_flush_override >= 0) return l2_flush_override == 1;
  const char* mode = std::getenv("FASTINFER_BENCH_FLUSH");
  if (mode == nullptr || *mode == '\0' || std::strcmp(mode, "write") == 0) return false;
  if (std::strcmp(mode, "read") == 0) return true;
  std::fprintf(stderr, "FASTINFER_BENCH_FLUSH must be write or read, got '%s'\n", mode);
  std::exit(1);
}

// For the notes of a results table.
inline const char* l2_flush_description() {
  return l2_flush_reads() ? "L2 flushed (256 MB read) before each" : "L2 flushed (256 MB write) before each";
}

// Reads every 16-byte word of the flush buffer; the xor is stored only when it equals a value no
// 0-filled buffer produces, so the loads cannot be dropped and nothing is written.
__global__ void l2_read_flush_kernel(const uint4* data, size_t words, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < words; i += size_t{gridDim.x} * blockDim.x) {
    const uint4 v = data[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

inline void l2_flush(int i) {
  const Buffer& flush = l2_flush_buffer();
  if (!l2_flush_reads()) {
    BENCH_CHECK(cudaMemsetAsync(flush.get(), i & 0xff, flush.bytes()));
    return;
  }
  static Buffer sink(sizeof(unsigned));
  static const bool zeroed = [&] {  // the flush buffer is read as zeros
    BENCH_CHECK(cudaMemset(flush.get(), 0, flush.bytes()));
    return true;
  }();
  (void)zeroed;
  l2_read_flush_kernel<<<1024, 256>>>(static_cast<const uint4*>(flush.get()), flush.bytes() / sizeof(uint4),
                                      static_cast<unsigned*>(sink.get()));
  BENCH_CHECK(cudaGetLastError());
}

template <typename Launch>
Timing time_cuda(Launch&& launch, const Args& args) {
  for (int i = 0; i < args.warmup; ++i) launch();
  BENCH_CHECK(cudaGetLastError());
  std::vector<cudaEvent_t> ev(2 * args.iters);
  for (auto& e : ev) BENCH_CHECK(cudaEventCreate(&e));
  BENCH_CHECK(cudaDeviceSynchronize());
  for (int i = 0; i < args.iters; ++i) {
    l2_flush(i);
    BENCH_CHECK(cudaEventRecord(ev[2 * i]));
    launch();
    BENCH_CHECK(cudaEventRecord(ev[2 * i + 1]));
  }
  BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<double> us(args.iters);
  for (int i = 0; i < args.iters; ++i) {
    float ms = 0;
    BENCH_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us[i] = ms * 1e3;
  }
  for (auto& e : ev) BENCH_CHECK(cudaEventDestroy(e));
  std::sort(us.begin(), us.end());
  const int n = args.iters;
  const double median = n % 2 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]);
  return {median, us.front(), us.back(), n};
}

// Device-to-device copy bandwidth (cudaMemcpy of 1 GiB), bytes counted as read + write.
struct Copy {
  double bytes, us, gbps;
};
inline Copy copy_bandwidth(const Args& args) {
  Buffer src(kCopyBytes), dst(kCopyBytes);
  BENCH_CHECK(cudaMemset(src.get(), 1, kCopyBytes));
  const Timing t = time_cuda([&] { BENCH_CHECK(cudaMemcpyAsync(dst.get(), src.get(), kCopyBytes, cudaMemcpyDeviceToDevice)); },
                             args);
  const double bytes = 2.0 * kCopyBytes;
  return {bytes, t.us, bytes / (t.us * 1e-6) / 1e9};
}

// ---- tables and the JSON fragment ----------------------------------------------------------------
using Value = std::variant<std::monostate, long long, double, std::string>;  // monostate: null ("-")
using Row = std::vector<std::pair<std::string, Value>>;
struct Column {
  std::string key, header, spec;  // spec: a Python format spec ('', 'd', '.1f', '.1%', '.2e')
};

// Formats like Python's format(value, spec) for the specs the benchmarks use.
inline std::string format_cell(const Value& v, const std::string& spec) {
  char buf[64];
  if (std::holds_alternative<std::monostate>(v)) return "-";
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  const double x = std::holds_alternative<long long>(v) ? static_cast<double>(std::get<long long>(v)) : std::get<double>(v);
  if (!std::isfinite(x)) return "-";  // written as null to the JSON, which report.py prints as "-"
  if (spec.empty()) {
    if (std::holds_alternative<long long>(v)) return std::to_string(std::get<long long>(v));
    std::snprintf(buf, sizeof buf, "%g", x);
  } else if (spec == "d") {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(x));
  } else {
    const int prec = spec.size() > 2 && spec[0] == '.' ? std::atoi(spec.c_str() + 1) : 6;
    switch (spec.back()) {
      case '%': std::snprintf(buf, sizeof buf, "%.*f%%", prec, 100 * x); break;
      case 'e': std::snprintf(buf, sizeof buf, "%.*e", prec, x); break;
      default: std::snprintf(buf, sizeof buf, "%.*f", prec, x); break;
    }
  }
  return buf;
}

inline const Value* find(const Row& row, const std::string& key) {
  for (const auto& [k, v] : row) {
    if (k == key) return &v;
  }
  return nullptr;
}

// The markdown table of bench/common.py markdown_table, printed to stdout.
inline void print_table(const std::vector<Column>& cols, const std::vector<Row>& rows) {
  std::string head = "|", rule = "|";
  for (const auto& c : cols) {
    bool numeric = false;
    for (const auto& r : rows) {
      const Value* v = find(r, c.key);
      numeric |= v && (std::holds_alternative<long long>(*v) || std::holds_alternative<double>(*v));
    }
    head += " " + c.header + " |";
    rule += numeric ? "---:|" : "---|";
  }
  std::printf("%s\n%s\n", head.c_str(), rule.c_str());
  for (const auto& r : rows) {
    std::string line = "|";
    for (const auto& c : cols) {
      const Value* v = find(r, c.key);
      line += " " + (v ? format_cell(*v, c.spec) : std::string("-")) + " |";
    }
    std::printf("%s\n", line.c_str());
  }
}

inline std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

inline std::string json_value(const Value& v) {
  if (std::holds_alternative<std::monostate>(v)) return "null";
  if (const auto* s = std::get_if<std::string>(&v)) return json_string(*s);
  if (const auto* i = std::get_if<long long>(&v)) return std::to_string(*i);
  const double x = std::get<double>(v);
  if (!std::isfinite(x)) return "null";  // JSON has no NaN / inf
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

inline std::string json_object(const Row& fields) {
  std::string out = "{";
  for (size_t i = 0; i < fields.size(); ++i) {
    out += (i ? ", " : "") + json_string(fields[i].first) + ": " + json_value(fields[i].second);
  }
  return out + "}";
}

inline Row device_fields(const Device& d) {
  char cuda[32];
  std::snprintf(cuda, sizeof cuda, "%d.%d", d.runtime_version / 1000, (d.runtime_version % 1000) / 10);
  return {{"name", std::string(d.prop.name)},
          {"capability", "sm_" + std::to_string(d.prop.major) + std::to_string(d.prop.minor)},
          {"sms", static_cast<long long>(d.prop.multiProcessorCount)},
          {"memory_gib", std::round(d.prop.totalGlobalMem / double(1 << 30) * 10) / 10},
          {"torch", std::monostate{}},
          {"cuda", std::string(cuda)}};
}

// Writes the fragment of bench/common.py write_fragment: name, title, device, notes, columns, rows,
// plus `extra` (top-level fields such as the copy bandwidth). Exits 1 if the file cannot be written.
inline void write_fragment(const std::string& path, const std::string& name, const std::string& title,
                           const Device& dev, const std::vector<std::string>& notes, const std::vector<Column>& cols,
                           const std::vector<Row>& rows, const std::vector<std::pair<std::string, Row>>& extra) {
  std::string s = "{\n \"name\": " + json_string(name) + ",\n \"title\": " + json_string(title) +
                  ",\n \"device\": " + json_object(device_fields(dev)) + ",\n \"notes\": [";
  for (size_t i = 0; i < notes.size(); ++i) s += (i ? ", " : "") + json_string(notes[i]);
  s += "],\n \"columns\": [";
  for (size_t i = 0; i < cols.size(); ++i) {
    s += (i ? ", " : "") + std::string("[") + json_string(cols[i].key) + ", " + json_string(cols[i].header) + ", " +
         json_string(cols[i].spec) + "]";
  }
  s += "],\n \"rows\": [";
  for (size_t i = 0; i < rows.size(); ++i) s += (i ? ",\n  " : "\n  ") + json_object(rows[i]);
  s += "\n ]";
  for (const auto& [key, obj] : extra) s += ",\n " + json_string(key) + ": " + json_object(obj);
  s += "\n}\n";
  std::error_code ec;  // like write_fragment: create the folder
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f || std::fwrite(s.data(), 1, s.size(), f) != s.size() || std::fclose(f) != 0) {
    std::fprintf(stderr, "cannot write %s: %s\n", path.c_str(), std::strerror(errno));
    std::exit(1);
  }
  std::printf("wrote %s\n", path.c_str());
}

}  // namespace bench
