// Merges the partial outputs of requests decoded by several SM parts:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * o_s
// One warp per (request, packed row); requests with a single split were finished by the
// decode kernel and are skipped.
#pragma once

#include <cmath>

#include "params.hpp"
#include "common/numeric.cuh"

namespace flash_mla {

constexpr int kCombineRowsPerCta = 4;

template <typename Element>
__global__ void __launch_bounds__(kCombineRowsPerCta * 32) combine_kernel(const __grid_constant__ DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early (programmatic dependent launch): wait until the decode kernel's writes land.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int req = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int rows = p.rows_per_kv_head();
  const int rows_total = p.num_heads_kv * rows;
  const int row = blockIdx.y * kCombineRowsPerCta + threadIdx.x / 32;  // kv_head * rows + r
  const int first = p.num_splits[req];
  const int n_splits = min(p.num_splits[req + 1], p.max_splits) - first;  // min: foreign metadata
  if (n_splits <= 1 || first < 0 || row >= rows_total) return;

  const float* split_lse = p.lse_accum + static_cast<int64_t>(first) * rows_total + row;
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
#pragma unroll 4
    for (int s = 0; s < n_splits; ++s) {
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

  const int heads_per_kv = p.num_heads_q / p.num_heads_kv;
  const int r = row % rows;
  const int t = r / heads_per_kv;
  const int h = (row / rows) * heads_per_kv + r % heads_per_kv;
  Element* dst = static_cast<Element*>(p.out) + ((static_cast<int64_t>(req) * p.seqlen_q + t) * p.num_heads_q + h) * kHeadDimV;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    uint2 packed;
    packed.x = pack2<Element>(acc[k].x, acc[k].y);
    packed.y = pack2<Element>(acc[k].z, acc[k].w);
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * k)) = packed;
  }
  if (lane == 0) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + t] = lse;
}

/// Launches the combine on p.stream. With `overlap` (sm_90+) it is a programmatic dependent
/// launch: its CTAs are scheduled while the decode kernel drains and wait in griddepcontrol.
template <typename Element>
inline cudaError_t launch_combine(const DecodeParams& p, bool overlap) {
  const int rows_total = p.seqlen_q * p.num_heads_q;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.batch, (rows_total + kCombineRowsPerCta - 1) / kCombineRowsPerCta);
  config.blockDim = dim3(kCombineRowsPerCta * 32);
  config.stream = p.stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, combine_kernel<Element>, p);
}

}  // namespace flash_mla
