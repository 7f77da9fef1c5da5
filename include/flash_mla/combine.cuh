// Merges the partial outputs of requests decoded by several SM parts:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * o_s
// One CTA per (request, packed row); requests with a single split were finished by the
// decode kernel and are skipped.
#pragma once

#include <cmath>

#include "params.hpp"
#include "common/numeric.cuh"

namespace flash_mla {

/// Warps of a combine CTA. A CTA merges one packed row: its threads derive the row's LSE
/// together, then each warp takes every kCombineWarps-th split with several loads in flight, so a
/// request decoded by ~100 SM parts (the imbalanced spec case) costs a few round trips per row.
constexpr int kCombineWarps = 8;
constexpr int kCombineThreads = kCombineWarps * 32;

/// Block-wide reduction (max or sum) of one float per thread; every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
#pragma unroll
  for (int w = 1; w < kCombineWarps; ++w) v = kMax ? fmaxf(v, scratch[w]) : v + scratch[w];
  __syncthreads();  // scratch is reused
  return v;
}

template <typename Element>
__global__ void __launch_bounds__(kCombineThreads, 2) combine_kernel(const __grid_constant__ DecodeParams p) {
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
  __shared__ float4 partial[kCombineWarps][kHeadDimV / 4];
  __shared__ float scratch[kCombineWarps];

  for (int row = blockIdx.y; row < rows_total; row += gridDim.y) {  // kv_head * rows + r
    const float* split_lse = p.lse_accum + static_cast<int64_t>(first) * rows_total + row;
    float lse_max = -INFINITY;
    for (int s = threadIdx.x; s < n_splits; s += kCombineThreads) {
      lse_max = fmaxf(lse_max, split_lse[static_cast<int64_t>(s) * rows_total]);
    }
    lse_max = block_reduce<true>(lse_max, scratch);

    float lse = INFINITY;  // no split saw a visible key: out = 0, lse = +inf
    float4 acc[4] = {};
    if (lse_max != -INFINITY) {
      float sum = 0.f;
      for (int s = threadIdx.x; s < n_splits; s += kCombineThreads) {
        sum += expf(split_lse[static_cast<int64_t>(s) * rows_total] - lse_max);
      }
      lse = lse_max + logf(block_reduce<false>(sum, scratch));
      // No branch on the weight: the loads of several splits can then be in flight at once.
#pragma unroll 4
      for (int s = warp; s < n_splits; s += kCombineWarps) {
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
      for (int w = 1; w < kCombineWarps; ++w) {
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

/// Launches the combine on p.stream. With `overlap` (sm_90+) it is a programmatic dependent
/// launch: its CTAs are scheduled while the decode kernel drains and wait in griddepcontrol.
template <typename Element>
inline cudaError_t launch_combine(const DecodeParams& p, bool overlap) {
  const int rows_total = p.seqlen_q * p.num_heads_q;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.batch, rows_total < 65535 ? rows_total : 65535);
  config.blockDim = dim3(kCombineThreads);
  config.stream = p.stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, combine_kernel<Element>, p);
}

}  // namespace flash_mla
