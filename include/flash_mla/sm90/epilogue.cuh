// End of a segment on Hopper: each warpgroup normalises its 64 rows x 256 channels of O, stages
// them in its own (now idle) KV buffer and hands them to the bulk-copy engine, one row per copy.
// The stores then drain while the CTA goes on with the next segment: written from registers,
// every SM would push its 64-128 KB through the load/store unit at the same moment and wait for
// it (measured at ~9,000 clocks a segment on an H200 with 128 requests of ~1K tokens).
//
// A request decoded by one SM part writes the final `out` rows (q's dtype) and `lse`; otherwise
// this split's partial output rows (float32) and LSE go to the split workspace for combine.cuh.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/numeric.cuh"
#include "../common/rows.cuh"
#include "../params.hpp"
#include "traits.hpp"
#include "wgmma.cuh"

namespace flash_mla::sm90 {

/// Staged rows of one warpgroup: 256 channels plus 32 bytes of padding, so that the 8 rows a warp
/// writes at once spread over all shared-memory banks (2 wavefronts for float2, 1 for 2 x 16 bit).
template <typename Out>
struct StagedRows {
  static constexpr int kRowBytes = Traits::kDvPerWarpgroup * int(sizeof(Out));
  static constexpr int kStride = kRowBytes + 32;
  static_assert(kStride * Traits::kBlockM <= Traits::kTileBytes, "a warpgroup's O must fit in one KV buffer");
  static_assert(kRowBytes % 16 == 0 && kStride % 16 == 0, "bulk copies need 16-byte sizes and addresses");
};

/// Bulk copy of `bytes` from shared to global memory in this thread's bulk group.
__device__ __forceinline__ void bulk_store(void* gmem, uint32_t smem, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem), "r"(smem), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
/// The shared-memory sources of this thread's bulk copies have been read (the buffer is free).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
/// This thread's bulk copies have completed (their writes are performed).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

/// Stages and stores this warpgroup's O. o: the thread's rows row_in_tile and row_in_tile + 8 (of
/// the CTA's 64) x channels dv0 + 8 j + 2 tq (+1); row_sum: full softmax sums of those rows;
/// row_max: their maxima in the log2 domain. stage: this warpgroup's KV buffer, free by now.
/// Returns after the staged rows have been read by the copy engine (the buffer may be refilled);
/// every thread of the warpgroup must call it. lse of a row with no visible key: +inf in the final
/// output, -inf in a partial (combine then gives it weight 0).
template <typename Out, typename Element>
__device__ __forceinline__ void stage_and_store_rows(uint8_t* stage, const DecodeParams& p, const RowMap& rows_map,
                                                     int req, int row0, int row_in_tile, int dv0, bool single_split,
                                                     int64_t split_row0, const float (&o)[Traits::kOTiles][4],
                                                     const float (&row_max)[2], const float (&row_sum)[2],
                                                     int warpgroup_barrier) {
  using Rows = StagedRows<Out>;
  const int tq = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int lr = row_in_tile + 8 * i;
    const bool seen = row_sum[i] > 0.f;
    const float inv = seen ? 1.f / row_sum[i] : 0.f;
    uint8_t* dst = stage + lr * Rows::kStride + 2 * tq * int(sizeof(Out));
#pragma unroll
    for (int j = 0; j < Traits::kOTiles; ++j) {
      if constexpr (sizeof(Out) == 4) {
        *reinterpret_cast<float2*>(dst + j * 8 * 4) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      } else {
        *reinterpret_cast<uint32_t*>(dst + j * 8 * 2) = pack2<Element>(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      }
    }
    const int r = row0 + lr;
    if (tq == 0 && dv0 == 0 && r < rows_map.rows) {
      const float lse = seen ? (row_max[i] + log2f(row_sum[i])) * float(M_LN2) : (single_split ? INFINITY : -INFINITY);
      if (single_split) {
        p.lse[(static_cast<int64_t>(req) * p.num_heads_q + rows_map.head(r)) * p.seqlen_q + rows_map.token(r)] = lse;
      } else {
        p.lse_accum[split_row0 + r] = lse;
      }
    }
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // staged rows visible to the copy engine
  asm volatile("bar.sync %0, %1;" ::"r"(warpgroup_barrier), "r"(Traits::kWarpgroupThreads) : "memory");

  const int lr = threadIdx.x % Traits::kWarpgroupThreads;  // one row per thread of the first 64
  const int r = row0 + lr;
  if (lr < Traits::kBlockM && r < rows_map.rows) {
    void* dst;
    if (single_split) {
      dst = static_cast<Out*>(p.out) +
            ((static_cast<int64_t>(req) * p.seqlen_q + rows_map.token(r)) * p.num_heads_q + rows_map.head(r)) * kHeadDimV +
            dv0;
    } else {
      dst = reinterpret_cast<Out*>(p.o_accum) + (split_row0 + r) * kHeadDimV + dv0;
    }
    bulk_store(dst, smem_addr(stage + lr * Rows::kStride), Rows::kRowBytes);
    bulk_commit();
    bulk_wait_read();
  }
  asm volatile("bar.sync %0, %1;" ::"r"(warpgroup_barrier), "r"(Traits::kWarpgroupThreads) : "memory");
}

/// The end of a segment for one warpgroup: final rows of a request decoded by one SM part, else
/// this split's partial rows. Does nothing for metadata planned for other inputs (a split index
/// outside the workspace); the condition is the same for the whole CTA.
template <typename Element>
__device__ __forceinline__ void store_segment_async(uint8_t* stage, const DecodeParams& p, const RowMap& rows_map,
                                                    int req, int split, int row0, int row_in_tile, int dv0,
                                                    const float (&o)[Traits::kOTiles][4], const float (&row_max)[2],
                                                    const float (&row_sum)[2], int warpgroup_barrier) {
  const bool single_split = p.num_splits[req + 1] - p.num_splits[req] <= 1;
  const int split_idx = p.num_splits[req] + split;
  if (!single_split && (split_idx < 0 || split_idx >= p.max_splits)) return;  // foreign metadata
  const int64_t split_row0 =
      static_cast<int64_t>(split_idx) * p.num_heads_kv * rows_map.rows + static_cast<int64_t>(rows_map.kv_head) * rows_map.rows;
  if (single_split) {
    stage_and_store_rows<Element, Element>(stage, p, rows_map, req, row0, row_in_tile, dv0, true, 0, o, row_max, row_sum,
                                           warpgroup_barrier);
  } else {
    stage_and_store_rows<float, Element>(stage, p, rows_map, req, row0, row_in_tile, dv0, false, split_row0, o, row_max,
                                         row_sum, warpgroup_barrier);
  }
}

}  // namespace flash_mla::sm90
