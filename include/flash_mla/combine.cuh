// Merges the partial outputs of requests decoded by several SM parts:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * o_s
// Requests with a single split were finished by the decode kernel and are skipped. Two kernels:
// many rows with a few splits each (large batches) take one warp per row, all of a row's loads
// in flight at once; few rows with many splits each (one long request decoded by ~100 SM parts,
// the imbalanced spec case) take one CTA per row, its warps sharing the splits.
#pragma once

#include <cmath>

#include "params.hpp"
#include "common/launch.hpp"
#include "common/epilogue.cuh"
#include "common/numeric.cuh"

namespace flash_mla {

/// Shape of a wide combine CTA (one packed row): each warp derives the row's LSE itself (no
/// barrier) and then takes every kWarps-th split, kUnroll of them in flight, so 32 loads of the
/// row are in flight at once.
template <int kWarps_, int kUnroll_, int kMinBlocks_>
struct CombineShape {
  static constexpr int kWarps = kWarps_, kUnroll = kUnroll_, kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = kWarps * 32;
};
using CombineWide = CombineShape<8, 4, 2>;
/// Rows (request x query token x head) from which the row-per-warp kernel is used.
constexpr long long kCombineLightRows = 1024;

/// Row-per-warp combine: warp w of CTA (request, y) merges packed rows kRowWarps * y + w, then
/// kRowWarps * gridDim.y further. Lane l holds channels 4 (l + 32 k) .. + 3, k < 4. The first
/// kSplitsInFlight splits' partial outputs are loaded before the row's LSE is known, so a row of
/// up to that many splits costs one round trip to memory instead of three (LSE, weights, then
/// the outputs). H200, s_q = 1, h_q = 128, L 8192, b = 128: the whole call 10 us shorter than
/// with the one-row-per-CTA kernel (24 us of combine, 2-3 splits a row).
constexpr int kRowWarps = 4;
constexpr int kSplitsInFlight = 2;  // 80 registers; 4 measured no faster (large batches: 2-3 splits a row)

/// LSE of a packed row over its n_splits splits (split s's at split_lse[s * stride]), derived by
/// every lane of the calling warp; +inf when no split saw a visible key (then out = 0).
__device__ __forceinline__ float warp_row_lse(const float* split_lse, int n_splits, int stride) {
  const int lane = threadIdx.x % 32;
  float lse_max = -INFINITY;
  for (int s = lane; s < n_splits; s += 32) lse_max = fmaxf(lse_max, split_lse[static_cast<int64_t>(s) * stride]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, off));
  if (lse_max == -INFINITY) return INFINITY;
  float sum = 0.f;
  for (int s = lane; s < n_splits; s += 32) sum += expf(split_lse[static_cast<int64_t>(s) * stride] - lse_max);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  return lse_max + logf(sum);
}

/// One packed row (kv_head * rows + r) of a request with n_splits > 1 splits, by one warp.
template <typename Element>
__device__ __forceinline__ void combine_row(const DecodeParams& p, int req, int row, int first, int n_splits) {
  const int lane = threadIdx.x % 32;
  const int rows = p.rows_per_kv_head();
  const int rows_total = p.num_heads_kv * rows;
  const float* split_lse = p.lse_accum + static_cast<int64_t>(first) * rows_total + row;
  const float4* row_partial =  // split 0 of this row, this lane's first float4
      reinterpret_cast<const float4*>(p.o_accum + (static_cast<int64_t>(first) * rows_total + row) * kHeadDimV) + lane;
  const int64_t split_stride = static_cast<int64_t>(rows_total) * (kHeadDimV / 4);  // in float4
  const auto partial = [&](int s) { return row_partial + s * split_stride; };
  float4 v[kSplitsInFlight][4];
  const auto load_splits = [&](int s0) {  // splits s0 .. s0 + kSplitsInFlight - 1 (clamped)
#pragma unroll
    for (int u = 0; u < kSplitsInFlight; ++u) {
      const float4* src = partial(min(s0 + u, n_splits - 1));
#pragma unroll
      for (int k = 0; k < 4; ++k) v[u][k] = src[32 * k];
    }
  };
  load_splits(0);

  const float lse = warp_row_lse(split_lse, n_splits, rows_total);
  float4 acc[4] = {};
  if (lse != INFINITY) {
    for (int s0 = 0; s0 < n_splits; s0 += kSplitsInFlight) {
      if (s0 > 0) load_splits(s0);  // more splits than were prefetched: the next ones
#pragma unroll
      for (int u = 0; u < kSplitsInFlight; ++u) {
        const int s = s0 + u;
        const float w = s < n_splits ? expf(split_lse[static_cast<int64_t>(min(s, n_splits - 1)) * rows_total] - lse) : 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc[k].x += w * v[u][k].x;
          acc[k].y += w * v[u][k].y;
          acc[k].z += w * v[u][k].z;
          acc[k].w += w * v[u][k].w;
        }
      }
    }
  }

  const int heads_per_kv = p.num_heads_q / p.num_heads_kv;
  const int r = row % rows;
  const int t = r / heads_per_kv;
  const int h = (row / rows) * heads_per_kv + r % heads_per_kv;
  Element* dst = static_cast<Element*>(p.out) + ((static_cast<int64_t>(req) * p.seqlen_q + t) * p.num_heads_q + h) * kHeadDimV;
  const float w = sink_factor(p.attn_sink, h, lse);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint2 packed;
    packed.x = pack2<Element>(w * acc[k].x, w * acc[k].y);
    packed.y = pack2<Element>(w * acc[k].z, w * acc[k].w);
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * k)) = packed;
  }
  if (lane == 0) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + t] = lse;
}

template <typename Element>
__global__ void __launch_bounds__(kRowWarps * 32) combine_rows_kernel(const __grid_constant__ DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the decode kernel's writes have landed
#endif
  const int req = blockIdx.x;
  const int rows_total = p.num_heads_kv * p.rows_per_kv_head();
  const int first = p.num_splits[req];
  const int n_splits = min(p.num_splits[req + 1], p.max_splits) - first;  // min: foreign metadata
  if (n_splits <= 1 || first < 0) return;
  for (int row = blockIdx.y * kRowWarps + threadIdx.x / 32; row < rows_total; row += gridDim.y * kRowWarps) {
    combine_row<Element>(p, req, row, first, n_splits);
  }
}

template <typename Element, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kMinBlocks) combine_kernel(const __grid_constant__ DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early (programmatic dependent launch): wait until the decode kernel's writes land.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int req = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = p.rows_per_kv_head();
  const int rows_total = p.num_heads_kv * rows;
  const int first = p.num_splits[req];
  const int n_splits = min(p.num_splits[req + 1], p.max_splits) - first;  // min: foreign metadata
  if (n_splits <= 1 || first < 0) return;
  __shared__ float4 partial[Shape::kWarps][kHeadDimV / 4];

  for (int row = blockIdx.y; row < rows_total; row += gridDim.y) {  // kv_head * rows + r
    const float* split_lse = p.lse_accum + static_cast<int64_t>(first) * rows_total + row;
    // Every warp derives the row's LSE itself (n_splits reads): no barrier needed for it.
    const float lse = warp_row_lse(split_lse, n_splits, rows_total);
    float4 acc[4] = {};
    if (lse != INFINITY) {
      // No branch on the weight: the loads of several splits can then be in flight at once.
#pragma unroll Shape::kUnroll
      for (int s = warp; s < n_splits; s += Shape::kWarps) {
        const float w = expf(split_lse[static_cast<int64_t>(s) * rows_total] - lse);
        const float4* src = reinterpret_cast<const float4*>(
            p.o_accum + (static_cast<int64_t>(first + s) * rows_total + row) * kHeadDimV);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float4 v = src[lane + 32 * k];
          acc[k].x += w * v.x;
          acc[k].y += w * v.y;
          acc[k].z += w * v.z;
          acc[k].w += w * v.w;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) partial[warp][lane + 32 * k] = acc[k];
    __syncthreads();

    // Thread t < 128 sums the warps' shares of channels 4t .. 4t + 3 and stores them.
    if (threadIdx.x < kHeadDimV / 4) {
      const int heads_per_kv = p.num_heads_q / p.num_heads_kv;
      const int r = row % rows;
      const int t = r / heads_per_kv;
      const int h = (row / rows) * heads_per_kv + r % heads_per_kv;
      float4 total = partial[0][threadIdx.x];
#pragma unroll
      for (int w = 1; w < Shape::kWarps; ++w) {
        const float4 v = partial[w][threadIdx.x];
        total.x += v.x;
        total.y += v.y;
        total.z += v.z;
        total.w += v.w;
      }
      Element* dst = static_cast<Element*>(p.out) +
                     ((static_cast<int64_t>(req) * p.seqlen_q + t) * p.num_heads_q + h) * kHeadDimV;
      const float w = sink_factor(p.attn_sink, h, lse);
      uint2 packed;
      packed.x = pack2<Element>(w * total.x, w * total.y);
      packed.y = pack2<Element>(w * total.z, w * total.w);
      *reinterpret_cast<uint2*>(dst + 4 * threadIdx.x) = packed;
      if (threadIdx.x == 0) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + t] = lse;
    }
    __syncthreads();  // `partial` is reused by the next row
  }
}

/// Launches `kernel` on p.stream over (batch, y_blocks) CTAs of `threads`; with `overlap` (sm_90+)
/// as a programmatic dependent launch: its CTAs are scheduled while the decode kernel drains and
/// wait in griddepcontrol.
inline cudaError_t launch_combine_grid(const DecodeParams& p, bool overlap, void (*kernel)(DecodeParams), int y_blocks,
                                       int threads) {
  return launch_kernel(kernel, dim3(p.batch, y_blocks < 65535 ? y_blocks : 65535), dim3(threads), 0, p.stream, overlap,
                       p);
}

/// The combine of the split requests on p.stream (see launch_combine_grid for `overlap`).
template <typename Element>
inline cudaError_t launch_combine(const DecodeParams& p, bool overlap) {
  const int rows_total = p.seqlen_q * p.num_heads_q;  // per request, all KV heads
  if (static_cast<long long>(p.batch) * rows_total >= kCombineLightRows) {
    // rows_total / kRowWarps CTAs per request: fewer than 65535 for any supported shape.
    return launch_combine_grid(p, overlap, combine_rows_kernel<Element>, (rows_total + kRowWarps - 1) / kRowWarps,
                               kRowWarps * 32);
  }
  return launch_combine_grid(p, overlap, combine_kernel<Element, CombineWide>, rows_total, CombineWide::kThreads);
}

}  // namespace flash_mla
