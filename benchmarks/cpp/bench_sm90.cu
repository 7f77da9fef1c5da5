// Stand-alone timing of the sm90 decode path (split kernel + combine) from C++, for A/B work on
// the kernel: built on any machine with nvcc (no Python, no GPU needed to build), so a GPU round
// only runs binaries. It complements benchmarks/bench_decode.py (the reference numbers, CUDA-graph
// replay of the Python call), whose case table it follows; its lengths are drawn by its own
// generator (normal(mean, mean / 2), at least s_q, fixed seed), so compare binaries with each
// other, not with the Python benchmark's rows.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -Iinclude -I$CUTLASS/include benchmarks/cpp/bench_sm90.cu -o bench_sm90 [-DMACRO=V ...]
//   ./bench_sm90 [--reps N] [--cases c1,c2,c3,c4,m1,m2,imb,c5,s1,...,s6] [--trace] [--pool PAGES] [--parts N]
//                [--page TOKENS] [--fp8] [--check]
//   (scripts/build_cpp_bench.sh builds one binary per variant.)
//
// --trace needs a build with -DFLASH_MLA_SM90_TRACE (include/flash_mla/sm90/trace.cuh): after
// timing the first case it prints, for CTA (0, 0, 0), the median clock of each main-loop event
// relative to the start of warpgroup 0's pair, and the median pair period; then every CTA's start
// and end time (the kernel's span, the idle share at its end, and a fit of the end times to each
// CTA's page pairs and segments).
// --check: after timing, compares the sm90 output of each case with the portable kernel's on the
// same inputs (max |difference| of out and lse, non-finite counts); exit status 1 past 2e-2 / 1e-3.
// A smoke test of a variant on the GPU, not the test suite.
// --page: tokens per page of the cache (16, 32, 64 (default), 128, 256); lengths are unchanged.
// --fp8: the cache in float8_e4m3fn (the same random values times 64, descale_k 1/64); q bf16.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <flash_mla/flash_mla.hpp>

namespace {

int g_page_size = 64;  // tokens per page of the cache (--page)
bool g_kv_fp8 = false;  // float8_e4m3fn cache (--fp8)
constexpr float kFp8Descale = 1.f / 64.f;

#define CUDA_OK(call)                                                                                \
  do {                                                                                              \
    const cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

#define FLASH_MLA_OK(call)                                                                       \
  do {                                                                                          \
    const flash_mla::Status st_ = (call);                                                       \
    if (!st_.ok()) {                                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, st_.message.c_str()); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

struct Case {
  const char* name;
  int b, s_q, h_q, mean_L;
  bool causal;
  std::vector<int> lens;  // explicit lengths (imbalanced), else drawn
};

std::vector<Case> all_cases() {
  return {
      {"c1", 128, 1, 128, 8192, true, {}},   {"c2", 128, 1, 128, 32768, true, {}},
      {"c3", 128, 2, 128, 8192, true, {}},   {"c4", 128, 2, 128, 32768, true, {}},
      {"m1", 128, 1, 16, 8192, false, {}},   {"m2", 128, 1, 32, 16384, false, {}},
      {"imb", 4, 4, 16, 0, true, {4641, 45118, 1730, 1696}},
      {"c5", 128, 1, 64, 8192, true, {}},  // c1 with one m-block: no page shared by two CTAs
      // Short contexts, where the fixed costs of a segment dominate.
      {"s1", 128, 1, 128, 256, false, {}},  {"s2", 128, 1, 128, 1024, false, {}},
      {"s3", 128, 2, 128, 1024, true, {}},  {"s4", 128, 1, 16, 1024, false, {}},
      {"s5", 32, 1, 128, 1024, false, {}},  {"s6", 128, 1, 128, 2048, false, {}},
      {"b1", 1, 1, 128, 0, false, {1024}},  {"b8", 8, 1, 128, 1024, false, {}},
  };
}

/// Deterministic pseudo-random bf16 in about [-2, 2).
__global__ void fill_random(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16(float(h & 0xFFFF) / 16384.f - 2.f);
  }
}

/// The values of fill_random divided by kFp8Descale, as float8_e4m3fn bytes.
__global__ void fill_random_fp8(uint8_t* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (float(h & 0xFFFF) / 16384.f - 2.f) / kFp8Descale;
    x[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  }
}

struct DeviceMem {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceMem(size_t n) : bytes(n) { CUDA_OK(cudaMalloc(&ptr, n + 256)); }
  ~DeviceMem() { cudaFree(ptr); }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
};

/// One set of inputs and outputs of a case (several sets rotate when one would sit in L2).
struct Inputs {
  flash_mla::SplitWorkspaceSize ws;  // first: the workspace buffers below are sized from it
  DeviceMem q, k, table, lens, meta, splits, out, lse, o_accum, lse_accum, descale;
  flash_mla::DecodeParams p;
  Inputs(const Case& c, const std::vector<int>& lens_host, int parts, uint32_t seed, std::mt19937& rng, int pool)
      : ws(workspace(c, lens_host, parts)), q(bytes_q(c, lens_host)), k(bytes_k(c, lens_host)), table(4 * table_entries(lens_host)),
        lens(4 * lens_host.size()), meta(4 * size_t(parts) * flash_mla::kMetaInts), splits(4 * (lens_host.size() + 1)),
        out(size_t(2) * lens_host.size() * c.s_q * c.h_q * flash_mla::kHeadDimV),
        lse(size_t(4) * lens_host.size() * c.s_q * c.h_q), o_accum(ws.o_accum_bytes),
        lse_accum(ws.lse_accum_bytes), descale(4) {
    using flash_mla::kHeadDim;
    const int b = int(lens_host.size());
    const int max_pages = max_pages_of(lens_host);
    const int blocks = total_pages(lens_host);
    std::vector<int> pages(blocks);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng);
    std::vector<int> table_host(size_t(b) * max_pages, 0);
    for (int i = 0, used = 0; i < b; ++i) {
      for (int j = 0; j < (lens_host[i] + g_page_size - 1) / g_page_size; ++j) {
        const int page = pages[used++];
        table_host[size_t(i) * max_pages + j] = pool > 0 ? page % pool : page;  // --pool: L2-resident pages
      }
    }
    CUDA_OK(cudaMemcpy(table.ptr, table_host.data(), 4 * table_host.size(), cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(lens.ptr, lens_host.data(), 4 * lens_host.size(), cudaMemcpyHostToDevice));
    const size_t nq = size_t(b) * c.s_q * c.h_q * kHeadDim, nk = size_t(blocks) * g_page_size * kHeadDim;
    fill_random<<<1024, 256>>>(q.as<__nv_bfloat16>(), nq, seed);
    if (g_kv_fp8) {
      fill_random_fp8<<<4096, 256>>>(k.as<uint8_t>(), nk, seed * 7 + 1);
      CUDA_OK(cudaMemcpy(descale.ptr, &kFp8Descale, 4, cudaMemcpyHostToDevice));
      p.kv_dtype = flash_mla::KvDType::kFP8E4M3;
      p.descale_k = descale.as<float>();
    } else {
      fill_random<<<4096, 256>>>(k.as<__nv_bfloat16>(), nk, seed * 7 + 1);
    }
    CUDA_OK(cudaGetLastError());

    flash_mla::MetadataParams mp;
    mp.cache_seqlens = lens.as<int32_t>();
    mp.tile_scheduler_metadata = meta.as<int32_t>();
    mp.num_splits = splits.as<int32_t>();
    mp.batch = b;
    mp.num_sm_parts = parts;
    FLASH_MLA_OK(flash_mla::get_mla_metadata(mp));

    p.dtype = flash_mla::DType::kBF16;
    p.batch = b;
    p.seqlen_q = c.s_q;
    p.num_heads_q = c.h_q;
    p.num_heads_kv = 1;
    p.num_blocks = blocks;
    p.max_blocks_per_seq = max_pages;
    p.page_size = g_page_size;
    p.softmax_scale = 1.f / std::sqrt(float(kHeadDim));
    p.causal = c.causal;
    p.q = q.ptr;
    p.q_head_stride = kHeadDim;
    p.q_seq_stride = int64_t(c.h_q) * kHeadDim;
    p.q_batch_stride = int64_t(c.s_q) * c.h_q * kHeadDim;
    p.k_cache = k.ptr;
    p.k_head_stride = kHeadDim;
    p.k_token_stride = kHeadDim;
    p.k_block_stride = int64_t(g_page_size) * kHeadDim;
    p.block_table = table.as<int32_t>();
    p.block_table_stride = max_pages;
    p.cache_seqlens = lens.as<int32_t>();
    p.tile_scheduler_metadata = meta.as<int32_t>();
    p.num_sm_parts = parts;
    p.num_splits = splits.as<int32_t>();
    p.out = out.ptr;
    p.lse = lse.as<float>();
    p.o_accum = o_accum.as<float>();
    p.lse_accum = lse_accum.as<float>();
    p.max_splits = ws.max_splits;
    p.kernel = flash_mla::KernelChoice::kSm90;
  }

  static int max_pages_of(const std::vector<int>& lens) {
    int m = 1;
    for (int L : lens) m = std::max(m, (L + g_page_size - 1) / g_page_size);
    return m;
  }
  static int total_pages(const std::vector<int>& lens) {
    int n = 1;
    for (int L : lens) n += (L + g_page_size - 1) / g_page_size;
    return n;
  }
  static size_t table_entries(const std::vector<int>& lens) { return lens.size() * size_t(max_pages_of(lens)); }
  static size_t bytes_q(const Case& c, const std::vector<int>& lens) {
    return size_t(2) * lens.size() * c.s_q * c.h_q * flash_mla::kHeadDim;
  }
  static size_t bytes_k(const Case&, const std::vector<int>& lens) {
    return size_t(g_kv_fp8 ? 1 : 2) * total_pages(lens) * g_page_size * flash_mla::kHeadDim;
  }
  static flash_mla::SplitWorkspaceSize workspace(const Case& c, const std::vector<int>& lens, int parts) {
    flash_mla::SplitWorkspaceSize w;
    FLASH_MLA_OK(flash_mla::get_split_workspace_size(int(lens.size()), c.s_q, c.h_q, parts, &w));
    return w;
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Device-to-device copy of 2 GiB: bytes read + written per second (the memory ceiling).
double copy_ceiling_gbs() {
  const size_t bytes = size_t(1) << 30;
  DeviceMem a(bytes), b(bytes);
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int r = 0; r < 8; ++r) {
    CUDA_OK(cudaEventRecord(e0));
    CUDA_OK(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice));
    CUDA_OK(cudaEventRecord(e1));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) t.push_back(ms);
  }
  return 2.0 * bytes / (median(t) * 1e-3) / 1e9;
}

[[maybe_unused]] void print_trace();
[[maybe_unused]] void print_segment_trace();
[[maybe_unused]] void print_cta_times(const Case& c, const Inputs& in, const std::vector<int>& lens);

/// out and lse of one call of `kernel` on `in`, copied to the host.
void run_once(Inputs& in, flash_mla::KernelChoice kernel, std::vector<__nv_bfloat16>& out, std::vector<float>& lse) {
  const flash_mla::KernelChoice keep = in.p.kernel;
  in.p.kernel = kernel;
  CUDA_OK(cudaMemset(in.out.ptr, 0xff, in.out.bytes));  // NaN: a row not written shows up
  CUDA_OK(cudaMemset(in.lse.ptr, 0xff, in.lse.bytes));
  FLASH_MLA_OK(flash_mla::mla_decode(in.p));
  CUDA_OK(cudaDeviceSynchronize());
  in.p.kernel = keep;
  out.resize(in.out.bytes / 2);
  lse.resize(in.lse.bytes / 4);
  CUDA_OK(cudaMemcpy(out.data(), in.out.ptr, in.out.bytes, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), in.lse.ptr, in.lse.bytes, cudaMemcpyDeviceToHost));
}

/// The sm90 path against the portable kernel on the same inputs; false past the tolerances.
bool check_case(const Case& c, Inputs& in) {
  std::vector<__nv_bfloat16> o90, o80;
  std::vector<float> l90, l80;
  run_once(in, flash_mla::KernelChoice::kSm90, o90, l90);
  run_once(in, flash_mla::KernelChoice::kSm80Large, o80, l80);
  double d_out = 0, d_lse = 0;
  size_t bad = 0;
  for (size_t i = 0; i < o90.size(); ++i) {
    const float a = __bfloat162float(o90[i]), b = __bfloat162float(o80[i]);
    if (!std::isfinite(a) || !std::isfinite(b)) ++bad;
    else d_out = std::max(d_out, double(std::fabs(a - b)));
  }
  for (size_t i = 0; i < l90.size(); ++i) {
    if (std::isnan(l90[i]) || std::isnan(l80[i]) || (std::isinf(l90[i]) != std::isinf(l80[i]))) ++bad;
    else if (std::isfinite(l90[i])) d_lse = std::max(d_lse, double(std::fabs(l90[i] - l80[i])));
  }
  const bool ok = bad == 0 && d_out <= 2e-2 && d_lse <= 1e-3;
  std::printf("check %-4s sm90 vs sm80_large: max|d out| %.2e, max|d lse| %.2e, %zu non-finite or mismatched: %s\n",
              c.name, d_out, d_lse, bad, ok ? "ok" : "FAILED");
  return ok;
}

void run_case(const Case& c, int reps, bool trace, double copy_gbs, int pool, int parts_override, bool check,
              bool& all_ok) {
  std::mt19937 rng(12345);
  std::vector<int> lens = c.lens;
  if (lens.empty()) {
    std::normal_distribution<double> normal(c.mean_L, c.mean_L / 2.0);
    for (int i = 0; i < c.b; ++i) lens.push_back(std::max(int(normal(rng)), c.s_q));
  }
  int device = 0, parts = 0;
  CUDA_OK(cudaGetDevice(&device));
  FLASH_MLA_OK(flash_mla::get_num_sm_parts(device, c.s_q, c.h_q, 1, &parts));
  if (parts_override > 0) parts = parts_override;  // --parts: fewer CTAs than SMs (a probe)
  const double total_L = std::accumulate(lens.begin(), lens.end(), 0.0);
  const double flops = double(c.h_q) * c.s_q * total_L * 2 * (flash_mla::kHeadDim + flash_mla::kHeadDimV);
  const double bytes = total_L * flash_mla::kHeadDim * (g_kv_fp8 ? 1 : 2) +
                       double(lens.size()) * c.s_q * c.h_q * (flash_mla::kHeadDim + flash_mla::kHeadDimV) * 2;
  // Rotate among sets whose total exceeds a few L2s.
  const size_t set_bytes = Inputs::bytes_k(c, lens);
  const int sets = int(std::min<size_t>(8, std::max<size_t>(1, (size_t(256) << 20) / set_bytes + 1)));
  std::vector<Inputs*> inputs;
  for (int s = 0; s < sets; ++s) inputs.push_back(new Inputs(c, lens, parts, 1000u + s, rng, pool));
  CUDA_OK(cudaDeviceSynchronize());

  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  for (int w = 0; w < 3; ++w) FLASH_MLA_OK(flash_mla::mla_decode(inputs[w % sets]->p));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const int calls = sets;
    CUDA_OK(cudaEventRecord(e0));
    for (int s = 0; s < calls; ++s) FLASH_MLA_OK(flash_mla::mla_decode(inputs[s]->p));
    CUDA_OK(cudaEventRecord(e1));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    times.push_back(ms * 1e3 / calls);
  }
  const double us = median(times);
  std::printf("%-4s b=%d s_q=%d h_q=%d mean_L=%.0f%s: %9.1f us  %7.1f TFLOP/s  %7.1f GB/s (%5.1f%% copy)  [min %.1f max %.1f us, %d sets]\n",
              c.name, int(lens.size()), c.s_q, c.h_q, total_L / lens.size(), c.causal ? " causal" : "", us,
              flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, 100.0 * bytes / (us * 1e-6) / 1e9 / copy_gbs,
              *std::min_element(times.begin(), times.end()), *std::max_element(times.begin(), times.end()), sets);
  if (trace) {
#ifdef FLASH_MLA_SM90_TRACE
    std::vector<long long> zeros(2 * flash_mla::sm90::kTracePairs * flash_mla::sm90::kTraceEvents, 0);
    CUDA_OK(cudaMemcpyToSymbol(flash_mla::sm90::trace_clock, zeros.data(), zeros.size() * sizeof(long long)));
    std::vector<unsigned long long> mb_zeros(2 * flash_mla::sm90::kTracePairs, 0);
    CUDA_OK(cudaMemcpyToSymbol(flash_mla::sm90::trace_mblock_ns, mb_zeros.data(), mb_zeros.size() * sizeof(unsigned long long)));
    FLASH_MLA_OK(flash_mla::mla_decode(inputs[0]->p));
    CUDA_OK(cudaDeviceSynchronize());
    {
      std::vector<long long> seg_zeros(size_t(flash_mla::sm90::kTraceSegCtas) * flash_mla::sm90::kTraceSegments *
                                       flash_mla::sm90::kSegEvents, 0);
      CUDA_OK(cudaMemcpyToSymbol(flash_mla::sm90::trace_seg_clock, seg_zeros.data(), seg_zeros.size() * sizeof(long long)));
    }
    FLASH_MLA_OK(flash_mla::mla_decode(inputs[0]->p));
    CUDA_OK(cudaDeviceSynchronize());
    print_trace();
    print_segment_trace();
    print_cta_times(c, *inputs[0], lens);
#else
    std::printf("--trace: this binary was built without -DFLASH_MLA_SM90_TRACE\n");
#endif
  }
  CUDA_OK(cudaDeviceSynchronize());
  if (check && !check_case(c, *inputs[0])) all_ok = false;
  for (auto* in : inputs) delete in;
}

#ifdef FLASH_MLA_SM90_TRACE
void print_trace() {
  using namespace flash_mla::sm90;
  std::vector<long long> t(2 * kTracePairs * kTraceEvents);
  CUDA_OK(cudaMemcpyFromSymbol(t.data(), trace_clock, t.size() * sizeof(long long)));
  auto at = [&](int wg, int slot, int ev) { return t[(size_t(wg) * kTracePairs + slot) * kTraceEvents + ev]; };
  static const char* names[kTraceEvents] = {"pair start", "max published", "own PV issued", "other ready",
                                            "P stored / remote PV issued", "own PV done", "remote ready / remote PV done",
                                            "S first part issued", "refill issued", "S issued", "S done (pair end)"};
  // Steady-state pairs: both warpgroups stamped this pair and the next one.
  std::vector<int> slots;
  for (int s = 2; s + 1 < kTracePairs; ++s) {
    if (at(0, s, kTracePairStart) && at(1, s, kTracePairStart) && at(0, s + 1, kTracePairStart)) slots.push_back(s);
  }
  if (slots.empty()) {
    std::printf("trace: no steady-state pair stamped\n");
    return;
  }
  std::vector<double> period;
  for (int s : slots) period.push_back(double(at(0, s + 1, kTracePairStart) - at(0, s, kTracePairStart)));
  std::printf("trace (CTA 0, %zu pairs): pair period median %.0f clk (min %.0f, max %.0f); clocks relative to wg0's pair start\n",
              slots.size(), median(period), *std::min_element(period.begin(), period.end()),
              *std::max_element(period.begin(), period.end()));
  std::printf("  raw (wg0 | wg1) of pairs %d..%d:\n", slots[slots.size() / 2], slots[slots.size() / 2] + 3);
  for (int ev = 0; ev < kTraceEvents; ++ev) {
    std::printf("  %-32s", names[ev]);
    for (int k = 0; k < 4; ++k) {
      const int s = slots[slots.size() / 2] + k;
      const long long base = at(0, s, kTracePairStart);
      std::printf(" %6lld |%6lld ", at(0, s, ev) ? at(0, s, ev) - base : -1, at(1, s, ev) ? at(1, s, ev) - base : -1);
    }
    std::printf("\n");
  }
  // Lock-step of the two m-block CTAs of part 0 (they read the same pages): pair start times.
  std::vector<unsigned long long> mb(2 * kTracePairs);
  CUDA_OK(cudaMemcpyFromSymbol(mb.data(), trace_mblock_ns, mb.size() * sizeof(unsigned long long)));
  std::vector<double> lag;
  for (int s = 0; s < kTracePairs; ++s) {
    if (mb[s] && mb[kTracePairs + s]) lag.push_back(double(mb[kTracePairs + s]) - double(mb[s]));
  }
  if (!lag.empty()) {
    std::vector<double> abs_lag;
    for (double x : lag) abs_lag.push_back(std::fabs(x));
    std::printf("  m-block CTAs 0 and 1 of part 0: pair start of CTA 1 minus CTA 0 over %zu pairs: median %.0f ns, "
                "|lag| median %.0f ns, max %.0f ns; first/last: %.0f / %.0f ns\n",
                lag.size(), median(lag), median(abs_lag), *std::max_element(abs_lag.begin(), abs_lag.end()),
                lag.front(), lag.back());
  }
  std::printf("  %-32s %10s %10s\n", "event", "wg0", "wg1");
  for (int ev = 0; ev < kTraceEvents; ++ev) {
    std::vector<double> d[2];
    for (int wg = 0; wg < 2; ++wg) {
      for (int s : slots) {
        if (at(wg, s, ev)) d[wg].push_back(double(at(wg, s, ev) - at(0, s, kTracePairStart)));
      }
    }
    std::printf("  %-32s %10s %10s\n", names[ev], d[0].empty() ? "-" : std::to_string(long(median(d[0]))).c_str(),
                d[1].empty() ? "-" : std::to_string(long(median(d[1]))).c_str());
  }
}
/// Start and end of every CTA of the traced call: the kernel's span and how long CTAs sat idle
/// at its end (the plan's imbalance plus the last pairs' drain); and a least-squares fit of each
/// CTA's end time to its work (page pairs and segments, from the metadata), whose ratio is what
/// a segment really costs in pages (the plan charges kSegmentFixedCost).
/// Median clocks of each phase of a segment over the stamped CTAs and segments (first segment of a
/// CTA apart: its loads are not overlapped with a previous segment).
void print_segment_trace() {
  using namespace flash_mla::sm90;
  std::vector<long long> t(size_t(kTraceSegCtas) * kTraceSegments * kSegEvents);
  CUDA_OK(cudaMemcpyFromSymbol(t.data(), trace_seg_clock, t.size() * sizeof(long long)));
  static const char* names[kSegEvents] = {"top -> loads ready", "ready -> first S done", "first S -> pairs done",
                                          "pairs done -> sums", "sums -> stores issued"};
  const auto at = [&](int cta, int seg, int ev) { return t[(size_t(cta) * kTraceSegments + seg) * kSegEvents + ev]; };
  for (int first = 1; first >= 0; --first) {
    std::printf("segment phases (%s segment of a CTA), median clk over CTAs (x=y=0, z<%d):\n",
                first ? "first" : "later", kTraceSegCtas);
    for (int ev = 0; ev + 1 < kSegEvents; ++ev) {
      std::vector<double> d;
      for (int cta = 0; cta < kTraceSegCtas; ++cta) {
        for (int seg = first ? 0 : 1; seg < (first ? 1 : kTraceSegments); ++seg) {
          const long long a = at(cta, seg, ev), b = at(cta, seg, ev + 1);
          if (a && b && at(cta, seg, kSegReady)) d.push_back(double(b - a));
        }
      }
      std::printf("  %-26s %8.0f  (p90 %.0f, n %zu)\n", names[ev], d.empty() ? -1.0 : median(d),
                  d.empty() ? -1.0 : [&] { auto e = d; std::sort(e.begin(), e.end()); return e[e.size() * 9 / 10]; }(), d.size());
    }
  }
}

void print_cta_times(const Case& c, const Inputs& in, const std::vector<int>& lens) {
  using namespace flash_mla::sm90;
  std::vector<unsigned long long> t(size_t(kTraceCtas) * 2);
  CUDA_OK(cudaMemcpyFromSymbol(t.data(), trace_cta_ns, t.size() * sizeof(unsigned long long)));
  const int m_blocks = (c.s_q * c.h_q + Traits::kBlockM - 1) / Traits::kBlockM;
  int parts = 0, device = 0;
  CUDA_OK(cudaGetDevice(&device));
  FLASH_MLA_OK(flash_mla::get_num_sm_parts(device, c.s_q, c.h_q, 1, &parts));
  const int ctas = std::min(m_blocks * parts, kTraceCtas);
  unsigned long long first = ~0ull, last = 0;
  for (int i = 0; i < ctas; ++i) {
    first = std::min(first, t[2 * i]);
    last = std::max(last, t[2 * i + 1]);
  }
  std::vector<double> end_us, start_us;
  double idle = 0;
  for (int i = 0; i < ctas; ++i) {
    start_us.push_back((t[2 * i] - first) * 1e-3);
    end_us.push_back((t[2 * i + 1] - first) * 1e-3);
    idle += (last - t[2 * i + 1]) * 1e-3;
  }
  // Work of each part from the metadata: page pairs and segments.
  std::vector<int32_t> meta(size_t(parts) * flash_mla::kMetaInts);
  CUDA_OK(cudaMemcpy(meta.data(), in.meta.ptr, 4 * meta.size(), cudaMemcpyDeviceToHost));
  double m[3][3] = {}, v[3] = {};
  for (int i = 0; i < ctas; ++i) {
    const int32_t* row = &meta[size_t(i / m_blocks) * flash_mla::kMetaInts];
    double pairs = 0, segs = 0;
    for (int r = row[0]; r <= row[2] && r < int(lens.size()); ++r) {
      const int lo = r == row[0] ? row[1] : 0;
      const int hi = r == row[2] ? row[3] : flash_mla::tiles_of(lens[r]);
      if (hi > lo) {
        pairs += (hi - lo + 1) / 2;
        segs += 1;
      }
    }
    const double x[3] = {pairs, segs, 1.0};
    for (int a = 0; a < 3; ++a) {
      v[a] += x[a] * end_us[i];
      for (int b = 0; b < 3; ++b) m[a][b] += x[a] * x[b];
    }
  }
  // Solve m * coef = v (Cramer's rule; 3 x 3).
  const auto det3 = [](double a[3][3]) {
    return a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
           a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
  };
  const double d = det3(m);
  double coef[3] = {};
  for (int k = 0; k < 3 && std::fabs(d) > 1e-9; ++k) {
    double mk[3][3];
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) mk[a][b] = b == k ? v[a] : m[a][b];
    coef[k] = det3(mk) / d;
  }
  if (std::fabs(d) > 1e-9) {
    std::printf("CTA end ~ %.3f us per page pair + %.2f us per segment + %.2f us: a segment costs %.1f pages (plan: %d)\n",
                coef[0], coef[1], coef[2], 2.0 * coef[1] / coef[0], flash_mla::kSegmentFixedCost);
  } else {
    std::printf("CTA end fit: singular (every part has the same number of segments)\n");
  }
  std::sort(end_us.begin(), end_us.end());
  const double span = (last - first) * 1e-3;
  std::printf("CTA times (%d CTAs, --parts ignored): span %.1f us; starts max %.1f us; ends min %.1f, p10 %.1f, median %.1f, "
              "p90 %.1f, max %.1f us; idle at the end %.1f%% of CTA-time\n",
              ctas, span, *std::max_element(start_us.begin(), start_us.end()), end_us.front(),
              end_us[ctas / 10], end_us[ctas / 2], end_us[ctas * 9 / 10], end_us.back(), 100.0 * idle / (span * ctas));
}
#else
void print_trace() {}
void print_segment_trace() {}
void print_cta_times(const Case&, const Inputs&, const std::vector<int>&) {}
#endif

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  bool trace = false, check = false;
  int pool = 0, parts = 0;  // > 0: every page index taken modulo pool (a cache that stays in L2; a probe, not a real case)
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--cases") && i + 1 < argc) only = argv[++i];
    else if (!std::strcmp(argv[i], "--trace")) trace = true;
    else if (!std::strcmp(argv[i], "--check")) check = true;
    else if (!std::strcmp(argv[i], "--pool") && i + 1 < argc) pool = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--parts") && i + 1 < argc) parts = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--page") && i + 1 < argc) g_page_size = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--fp8")) g_kv_fp8 = true;
    else {
      std::fprintf(stderr, "usage: %s [--reps N] [--cases c1,c2,...] [--trace] [--pool PAGES] [--parts N] [--page TOKENS] [--check]\n", argv[0]);
      return 2;
    }
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbs = copy_ceiling_gbs();
  std::printf("%s, %d SMs; copy ceiling %.0f GB/s\n", prop.name, prop.multiProcessorCount, copy_gbs);
  bool first = true, all_ok = true;
  for (const Case& c : all_cases()) {
    if (!only.empty() && ("," + only + ",").find(std::string(",") + c.name + ",") == std::string::npos) continue;
    run_case(c, reps, trace && first, copy_gbs, pool, parts, check, all_ok);
    first = false;
  }
  return all_ok ? 0 : 1;
}
