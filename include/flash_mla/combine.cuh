// Merges the partial outputs of requests decoded by several SM parts:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * o_s
// One CTA per (request, packed row); requests with a single split were finished by the
// decode kernel and are skipped.
#pragma once

#include <cmath>

#include "params.hpp"
#include "common/numeric.cuh"

namespace flash_mla {

/// Shape of a combine CTA. A CTA merges one packed row; each warp derives the row's LSE itself
/// (no barrier) and then takes every kWarps-th split, kUnroll of them in flight. Two shapes:
/// many rows (large batches: a few splits per row, occupancy matters) take the light one; few
/// rows with many splits each (one long request decoded by ~100 SM parts, the imbalanced spec
/// case) take the wide one, whose 32 loads in flight per row cut the round trips per row.
template <int kWarps_, int kUnroll_, int kMinBlocks_>
struct CombineShape {
  static constexpr int kWarps = kWarps_, kUnroll = kUnroll_, kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = kWarps * 32;
};
using CombineLight = CombineShape<4, 2, 8>;
using CombineWide = CombineShape<8, 4, 2>;
/// Rows (request x query token x head) from which the light shape is used.
constexpr long long kCombineLightRows = 1024;

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
    float lse_max = -INFINITY;
    for (int s = lane; s < n_splits; s += 32) lse_max = fmaxf(lse_max, split_lse[static_cast<int64_t>(s) * rows_total]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, off));

    float lse = INFINITY;  // no split saw a visible key: out = 0, lse = +inf
    float4 acc[4] = {};
    if (lse_max != -INFINITY) {
      float sum = 0.f;
      for (int s = lane; s < n_splits; s += 32) sum += expf(split_lse[static_cast<int64_t>(s) * rows_total] - lse_max);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      lse = lse_max + logf(sum);
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
      uint2 packed;
      packed.x = pack2<Element>(total.x, total.y);
      packed.y = pack2<Element>(total.z, total.w);
      *reinterpret_cast<uint2*>(dst + 4 * threadIdx.x) = packed;
      if (threadIdx.x == 0) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + t] = lse;
    }
    __syncthreads();  // `partial` is reused by the next row
  }
}

template <typename Element, typename Shape>
inline cudaError_t launch_combine_shape(const DecodeParams& p, bool overlap) {
  const int rows_total = p.seqlen_q * p.num_heads_q;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.batch, rows_total < 65535 ? rows_total : 65535);
  config.blockDim = dim3(Shape::kThreads);
  config.stream = p.stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, combine_kernel<Element, Shape>, p);
}

/// Launches the combine on p.stream. With `overlap` (sm_90+) it is a programmatic dependent
/// launch: its CTAs are scheduled while the decode kernel drains and wait in griddepcontrol.
template <typename Element>
inline cudaError_t launch_combine(const DecodeParams& p, bool overlap) {
  const long long rows = static_cast<long long>(p.batch) * p.seqlen_q * p.num_heads_q;
  return rows >= kCombineLightRows ? launch_combine_shape<Element, CombineLight>(p, overlap)
                                   : launch_combine_shape<Element, CombineWide>(p, overlap);
}

}  // namespace flash_mla
