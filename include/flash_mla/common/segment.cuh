// The part of one request an SM part decodes: tiles [tile_lo, tile_hi) of the plan row
// (scheduler/plan.hpp), as a token range clipped to the request's length.
#pragma once

#include "../params.hpp"
#include "../scheduler/plan.hpp"
#include "rows.cuh"

namespace flash_mla {

struct Segment {
  int seqlen;   // L of the request (negative lengths read as 0)
  int n_lo;     // first token of the segment
  int n_hi;     // one past its last token
  int n_tiles;  // kLoopTokens-token steps of the kernel's loop covering [n_lo, n_hi)

  template <int kLoopTokens>
  __device__ static Segment of(const DecodeParams& p, const int32_t* meta, int req) {
    Segment seg;
    seg.seqlen = max(p.cache_seqlens[req], 0);
    const int tile_lo = req == meta[0] ? meta[1] : 0;
    const int tile_hi = req == meta[2] ? meta[3] : tiles_of(seg.seqlen);
    seg.n_lo = static_cast<int>(min(static_cast<long long>(tile_lo) * kTileTokens, static_cast<long long>(seg.seqlen)));
    seg.n_hi = static_cast<int>(min(static_cast<long long>(tile_hi) * kTileTokens, static_cast<long long>(seg.seqlen)));
    seg.n_tiles = seg.n_hi > seg.n_lo ? (seg.n_hi - seg.n_lo + kLoopTokens - 1) / kLoopTokens : 0;
    return seg;
  }

  /// Last key position visible to packed row r whose query token is t (-1: none).
  __device__ int last_visible(const DecodeParams& p, bool row_valid, int t) const {
    if (!row_valid) return -1;
    return p.causal && p.seqlen_q > 1 ? seqlen - p.seqlen_q + t : seqlen - 1;
  }
};

/// What one CTA of a Hopper decode grid works on: its KV head's packed rows (blockIdx.y), its
/// 64-row block (blockIdx.x) and its SM part's slice of the plan (blockIdx.z).
struct CtaWork {
  RowMap rows_map;
  int row0;               // first packed row of the CTA's block
  const int32_t* meta;    // the SM part's metadata row
  int first_req, last_req;

  template <int kBlockM>
  __device__ static CtaWork of(const DecodeParams& p) {
    CtaWork w{{p.num_heads_q / p.num_heads_kv, p.rows_per_kv_head(), static_cast<int>(blockIdx.y)},
              static_cast<int>(blockIdx.x) * kBlockM, p.tile_scheduler_metadata + blockIdx.z * kMetaInts, 0, 0};
    // The clamps only matter for metadata planned for other inputs: stay in bounds.
    w.first_req = max(w.meta[0], 0);
    w.last_req = min(w.meta[2], p.batch - 1);
    return w;
  }
};

}  // namespace flash_mla
