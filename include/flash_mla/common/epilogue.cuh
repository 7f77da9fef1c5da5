// End of one request segment: normalise the accumulators and write either the final output
// (the request has one split) or this split's partial output and LSE for combine.cuh.
#pragma once

#include <cmath>

#include "../params.hpp"
#include "numeric.cuh"
#include "rows.cuh"

namespace flash_mla {

/// What the final output of head h is multiplied by for an attention sink (DecodeParams::
/// attn_sink): 1 / (1 + exp(sink - lse)); 1 without a sink or for a row with no key (lse +inf).
__device__ __forceinline__ float sink_factor(const float* attn_sink, int h, float lse) {
  if (attn_sink == nullptr || lse == INFINITY) return 1.f;
  return 1.f / (1.f + expf(attn_sink[h] - lse));
}

/// o: this warp's 16 rows x 256 channels (channel offset dv0); row_sum: full softmax sums of the
/// thread's two rows; row_max: their maxima in the log2 domain. lse of a row with no visible key:
/// +inf in the final output, -inf in a partial (so that combine gives it weight 0).
/// value_scale: what V's stored values are multiplied by (an FP8 cache's descale; else 1).
template <int kOTiles, typename Element>
__device__ __forceinline__ void store_segment(const DecodeParams& p, const RowMap& rows_map, int req,
                                              int split, int first_row, int dv0,
                                              const float (&o)[kOTiles][4], const float (&row_max)[2],
                                              const float (&row_sum)[2], float value_scale) {
  const int tq = threadIdx.x % 4;
  const bool single_split = p.num_splits[req + 1] - p.num_splits[req] <= 1;
  const int rows_total = p.num_heads_kv * rows_map.rows;
  const int split_idx = p.num_splits[req] + split;
  if (!single_split && (split_idx < 0 || split_idx >= p.max_splits)) return;  // foreign metadata
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = first_row + 8 * i;
    if (r >= rows_map.rows) continue;
    const bool seen = row_sum[i] > 0.f;
    const float inv = seen ? value_scale / row_sum[i] : 0.f;
    const float lse = seen ? (row_max[i] + log2f(row_sum[i])) * float(M_LN2)
                           : (single_split ? INFINITY : -INFINITY);
    const bool writes_lse = tq == 0 && dv0 == 0;
    if (single_split) {
      const int t = rows_map.token(r), h = rows_map.head(r);
      const float out_scale = inv * sink_factor(p.attn_sink, h, lse);
      Element* dst = static_cast<Element*>(p.out) +
                     ((static_cast<int64_t>(req) * p.seqlen_q + t) * p.num_heads_q + h) * kHeadDimV + dv0;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        *reinterpret_cast<uint32_t*>(dst + j * 8 + 2 * tq) = pack2<Element>(o[j][2 * i] * out_scale, o[j][2 * i + 1] * out_scale);
      }
      if (writes_lse) p.lse[(static_cast<int64_t>(req) * p.num_heads_q + h) * p.seqlen_q + t] = lse;
    } else {
      const int64_t row_idx = static_cast<int64_t>(split_idx) * rows_total + rows_map.kv_head * rows_map.rows + r;
      float* dst = p.o_accum + row_idx * kHeadDimV + dv0;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        *reinterpret_cast<float2*>(dst + j * 8 + 2 * tq) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
      }
      if (writes_lse) p.lse_accum[row_idx] = lse;
    }
  }
}

}  // namespace flash_mla
