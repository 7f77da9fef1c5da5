// GPU side of the tile scheduler: one CTA stages cache_seqlens in shared memory, its threads try
// one payload each (plan.hpp) and one thread writes the plan of the smallest feasible payload.
// Microseconds for thousands of requests; no host sync.
#pragma once

#include "../params.hpp"
#include "plan.hpp"

namespace flash_mla {

/// Requests staged in shared memory; larger batches read cache_seqlens from global memory.
constexpr int kMetadataSmemRequests = 12 * 1024;
constexpr int kMetadataThreads = 256;

__global__ void __launch_bounds__(kMetadataThreads)
    metadata_kernel(const int32_t* __restrict__ cache_seqlens, int batch, int num_parts,
                    int32_t* __restrict__ meta, int32_t* __restrict__ num_splits) {
  static_assert(kPayloadCandidates <= 32, "one lane of the planning warp per payload candidate");
  extern __shared__ int32_t staged_seqlens[];
  __shared__ int chosen;
  const bool staged = batch <= kMetadataSmemRequests;
  if (staged) {
    for (int i = threadIdx.x; i < batch; i += blockDim.x) staged_seqlens[i] = cache_seqlens[i];
  }
  if (threadIdx.x == 0) chosen = kPayloadCandidates;
  __syncthreads();
  const int32_t* seqlens = staged ? staged_seqlens : cache_seqlens;
  if (threadIdx.x >= 32) return;  // one warp plans
  // Each lane tries one payload; the smallest feasible one wins (the host plan takes the same).
  const PayloadSearch search = PayloadSearch::of(seqlens, batch, num_parts);
  if (threadIdx.x < kPayloadCandidates &&
      greedy_plan<false>(seqlens, batch, num_parts, search.candidate(threadIdx.x), nullptr, nullptr)) {
    atomicMin(&chosen, static_cast<int>(threadIdx.x));
  }
  __syncwarp();
  if (threadIdx.x == 0) {
    write_plan(seqlens, batch, num_parts, search, chosen < kPayloadCandidates ? chosen : -1, meta, num_splits);
  }
}

inline Status launch_metadata(const MetadataParams& p) {
  const int smem = p.batch <= kMetadataSmemRequests ? p.batch * static_cast<int>(sizeof(int32_t)) : 0;
  metadata_kernel<<<1, kMetadataThreads, smem, p.stream>>>(p.cache_seqlens, p.batch, p.num_sm_parts,
                                                          p.tile_scheduler_metadata, p.num_splits);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::error(std::string("metadata kernel launch failed: ") + cudaGetErrorString(err));
  return Status::success();
}

}  // namespace flash_mla
