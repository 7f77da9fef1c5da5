// Token-sparse decode from C++ (DeepSeek-V3.2 FP8 cache): quantize a bf16 cache into 656-byte
// token records on the host, pick top-k token indices per query token (some invalid), plan the
// schedule with get_mla_metadata over one request per query token, decode (mla_decode_sparse)
// and check the result against a double-precision reference on the dequantized cache.
//
// Exit status: 0 match, 1 a mismatch, 2 a CUDA or flash-mla error, 77 no usable GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <flash_mla/flash_mla.hpp>

namespace {

constexpr int kExitMismatch = 1;
constexpr int kExitError = 2;
constexpr int kExitSkip = 77;

#define CUDA_OK(call)                                                                           \
  do {                                                                                         \
    const cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(kExitError);                                                                   \
    }                                                                                          \
  } while (0)

#define FLASH_MLA_OK(call)                                                                  \
  do {                                                                                     \
    const flash_mla::Status st_ = (call);                                                  \
    if (!st_.ok()) {                                                                       \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, st_.message.c_str()); \
      std::exit(kExitError);                                                               \
    }                                                                                      \
  } while (0)

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* ptr = nullptr;
  CUDA_OK(cudaMalloc(&ptr, host.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

// The V3.2 token record: 512 e4m3 (channels 0-511), 4 float32 scales (one per 128 channels),
// 64 bf16 RoPE channels (512-575).
constexpr int kRecordBytes = 656;
constexpr int kHeadDim = 576;

/// Quantizes one token (576 floats) into its record and returns the dequantized values.
std::vector<float> quantize_token(const float* x, uint8_t* record) {
  std::vector<float> deq(kHeadDim);
  for (int group = 0; group < 4; ++group) {
    float amax = 0.f;
    for (int c = 0; c < 128; ++c) amax = std::max(amax, std::fabs(x[group * 128 + c]));
    // A power-of-two scale: dequantization is exact in bf16.
    const float scale = std::ldexp(1.f, amax > 0.f ? int(std::ceil(std::log2(amax / 448.f))) : -20);
    std::memcpy(record + 512 + 4 * group, &scale, 4);
    for (int c = 0; c < 128; ++c) {
      const int ch = group * 128 + c;
      const __nv_fp8_storage_t e = __nv_cvt_float_to_fp8(x[ch] / scale, __NV_SATFINITE, __NV_E4M3);
      record[ch] = e;
      const __half_raw h = __nv_cvt_fp8_to_halfraw(e, __NV_E4M3);
      deq[ch] = __half2float(__half(h)) * scale;
    }
  }
  for (int c = 512; c < kHeadDim; ++c) {
    const __nv_bfloat16 r = __float2bfloat16(x[c]);
    std::memcpy(record + 528 + 2 * (c - 512), &r, 2);
    deq[c] = __bfloat162float(r);
  }
  return deq;
}

}  // namespace

int main() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 8) {
    std::printf("sparse_decode_example: no usable GPU (needs sm_80+), skipped\n");
    return kExitSkip;
  }
  const int b = 2, s_q = 2, h_q = 32, topk = 200, page = 64, num_blocks = 16;
  const float scale = 1.f / std::sqrt(float(kHeadDim));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);

  // --- The cache: num_blocks pages of `page` records, and its dequantized values. -----------
  const int tokens = num_blocks * page;
  std::vector<uint8_t> cache(size_t(tokens) * kRecordBytes);
  std::vector<std::vector<float>> deq(tokens);
  std::vector<float> x(kHeadDim);
  for (int t = 0; t < tokens; ++t) {
    for (float& v : x) v = 0.5f * normal(rng);
    deq[t] = quantize_token(x.data(), cache.data() + size_t(t) * kRecordBytes);
  }
  // q (bf16) and the top-k indices: token id = page * page_size + slot; -1 and ids past the
  // cache are skipped (never read).
  std::vector<__nv_bfloat16> q(size_t(b) * s_q * h_q * kHeadDim);
  for (auto& v : q) v = __float2bfloat16(normal(rng));
  std::vector<int32_t> indices(size_t(b) * s_q * topk);
  std::uniform_int_distribution<int> pick(0, tokens - 1);
  for (size_t i = 0; i < indices.size(); ++i) indices[i] = i % 37 == 5 ? -1 : i % 53 == 7 ? tokens + 3 : pick(rng);

  // --- Device buffers, the plan (one request per query token) and the workspace. -----------
  uint8_t* d_cache = device_copy(cache);
  __nv_bfloat16* d_q = device_copy(q);
  int32_t* d_indices = device_copy(indices);
  int32_t* d_plan = device_copy(std::vector<int32_t>(size_t(b) * s_q, topk));  // keys per query token
  int parts = 0;
  FLASH_MLA_OK(flash_mla::get_num_sm_parts(device, /*seqlen_q=*/1, h_q, /*num_heads_kv=*/1, &parts));
  flash_mla::SplitWorkspaceSize ws;
  FLASH_MLA_OK(flash_mla::get_split_workspace_size(b * s_q, 1, h_q, parts, &ws));
  int32_t *d_meta = nullptr, *d_splits = nullptr;
  float *d_lse = nullptr, *d_o_accum = nullptr, *d_lse_accum = nullptr;
  __nv_bfloat16* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_meta, size_t(parts) * flash_mla::kMetaInts * sizeof(int32_t)));
  CUDA_OK(cudaMalloc(&d_splits, (size_t(b) * s_q + 1) * sizeof(int32_t)));
  CUDA_OK(cudaMalloc(&d_out, size_t(b) * s_q * h_q * flash_mla::kHeadDimV * sizeof(__nv_bfloat16)));
  CUDA_OK(cudaMalloc(&d_lse, size_t(b) * s_q * h_q * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_o_accum, ws.o_accum_bytes));
  CUDA_OK(cudaMalloc(&d_lse_accum, ws.lse_accum_bytes));

  flash_mla::MetadataParams mp;
  mp.cache_seqlens = d_plan;
  mp.tile_scheduler_metadata = d_meta;
  mp.num_splits = d_splits;
  mp.batch = b * s_q;
  mp.num_sm_parts = parts;
  FLASH_MLA_OK(flash_mla::get_mla_metadata(mp));  // once per step, reused by every layer

  flash_mla::SparseDecodeParams p;
  p.format = flash_mla::SparseKvFormat::kV32FP8;
  p.head_dim = kHeadDim;
  p.batch = b;
  p.seqlen_q = s_q;
  p.num_heads_q = h_q;
  p.softmax_scale = scale;
  p.q = d_q;
  p.q_seq_stride = int64_t(h_q) * kHeadDim;
  p.q_head_stride = kHeadDim;
  p.cache.data = d_cache;
  p.cache.num_blocks = num_blocks;
  p.cache.page_size = page;
  p.cache.page_stride = int64_t(page) * kRecordBytes;
  p.cache.token_stride = kRecordBytes;
  p.cache.indices = d_indices;
  p.cache.indices_batch_stride = int64_t(s_q) * topk;
  p.cache.indices_seq_stride = topk;
  p.cache.topk = topk;
  p.plan_seqlens = d_plan;
  p.tile_scheduler_metadata = d_meta;
  p.num_sm_parts = parts;
  p.num_splits = d_splits;
  p.out = d_out;
  p.lse = d_lse;
  p.o_accum = d_o_accum;
  p.lse_accum = d_lse_accum;
  p.max_splits = ws.max_splits;
  FLASH_MLA_OK(flash_mla::mla_decode_sparse(p));
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<__nv_bfloat16> out(size_t(b) * s_q * h_q * flash_mla::kHeadDimV);
  std::vector<float> lse(size_t(b) * s_q * h_q);
  CUDA_OK(cudaMemcpy(out.data(), d_out, out.size() * sizeof(out[0]), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), d_lse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

  // --- Reference: softmax over the valid selected tokens (duplicates counted), in double. ----
  double max_err = 0, max_lse_err = 0;
  for (int i = 0; i < b; ++i) {
    for (int t = 0; t < s_q; ++t) {
      const int32_t* row = indices.data() + (size_t(i) * s_q + t) * topk;
      for (int h = 0; h < h_q; ++h) {
        const __nv_bfloat16* qv = q.data() + ((size_t(i) * s_q + t) * h_q + h) * kHeadDim;
        std::vector<double> scores;
        std::vector<int> keys;
        for (int k = 0; k < topk; ++k) {
          if (row[k] < 0 || row[k] >= tokens) continue;
          double dot = 0;
          for (int c = 0; c < kHeadDim; ++c) dot += double(__bfloat162float(qv[c])) * deq[row[k]][c];
          scores.push_back(dot * scale);
          keys.push_back(row[k]);
        }
        double m = -INFINITY, sum = 0;
        for (double s : scores) m = std::max(m, s);
        for (double s : scores) sum += std::exp(s - m);
        const double ref_lse = m + std::log(sum);
        const size_t o = (size_t(i) * s_q + t) * h_q + h;  // lse is (batch, s_q, h_q) in C++
        max_lse_err = std::max(max_lse_err, std::fabs(ref_lse - lse[o]));
        for (int c = 0; c < flash_mla::kHeadDimV; ++c) {
          double acc = 0;
          for (size_t k = 0; k < keys.size(); ++k) acc += std::exp(scores[k] - ref_lse) * deq[keys[k]][c];
          max_err = std::max(max_err, std::fabs(acc - __bfloat162float(out[o * flash_mla::kHeadDimV + c])));
        }
      }
    }
  }
  for (void* ptr : {static_cast<void*>(d_cache), static_cast<void*>(d_q), static_cast<void*>(d_indices),
                    static_cast<void*>(d_plan), static_cast<void*>(d_meta), static_cast<void*>(d_splits),
                    static_cast<void*>(d_out), static_cast<void*>(d_lse), static_cast<void*>(d_o_accum),
                    static_cast<void*>(d_lse_accum)}) {
    cudaFree(ptr);
  }
  const bool ok = max_err < 1e-2 && max_lse_err < 2e-3;
  std::printf("sparse_decode_example: %s (max |out - ref| %.2e, max |lse - ref| %.2e)\n", ok ? "PASS" : "FAIL",
              max_err, max_lse_err);
  return ok ? 0 : kExitMismatch;
}
