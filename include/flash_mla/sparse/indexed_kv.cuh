// The token-sparse KV source of the portable kernel (sm80/kernel.cuh): the keys of one query
// token are the tokens its index rows select, from the main cache and then the extra one.
//
// The plan treats query token t of request i as a request of its own (req = i * s_q + t, one
// query token, h_q rows) whose keys are positions 0 .. topk + extra_topk - 1: position j < topk
// is entry j of the main index row, the others entry j - topk of the extra row. A position past
// the row's topk_length, or holding an invalid index, is a skipped key: it is zero-filled (never
// read) and its flag masks its score to -inf.
#pragma once

#include <cstdint>

#include "../common/rows.cuh"
#include "../common/segment.cuh"
#include "../params.hpp"
#include "token_formats.cuh"

namespace flash_mla::sparse {

/// The caches of a token-sparse call as the kernel reads them (cache[1].data null: none).
struct IndexedKvParams {
  SparseKvCache cache[2];
  int seqlen_q;
};

/// The keys of one plan request (query token `token_q` of request `batch_idx`): which index entry
/// each key position holds and where that token lies. Shared by the kernels' KV sources.
struct SelectedKeys {
  const IndexedKvParams& kp;
  int batch_idx, token_q;     // which request and query token the segment decodes
  int used_main, used_extra;  // index entries used of each cache's row
  int key_end;                // key positions past the planned length are skipped too

  __device__ SelectedKeys(const IndexedKvParams& params, int req, const Segment& seg)
      : kp(params), batch_idx(req / params.seqlen_q), token_q(req % params.seqlen_q), key_end(seg.seqlen) {
    const auto used_of = [&](const SparseKvCache& kc) {
      if (kc.data == nullptr) return 0;
      return min(max(kc.topk_length != nullptr ? kc.topk_length[batch_idx] : kc.topk, 0), kc.topk);
    };
    used_main = used_of(kp.cache[0]);
    used_extra = used_of(kp.cache[1]);
  }

  /// The index entry at key position j of the segment's row: -1 past the used entries (the same
  /// as an invalid index).
  __device__ int index_entry(int j) const {
    // (Selected with conditionals rather than indexed: no local-memory copy of the arrays.)
    const bool main = j < kp.cache[0].topk;
    const SparseKvCache& kc = main ? kp.cache[0] : kp.cache[1];
    const int k = main ? j : j - kp.cache[0].topk;
    if (k >= (main ? used_main : used_extra) || j >= key_end) return -1;
    return kc.indices[batch_idx * kc.indices_batch_stride + token_q * kc.indices_seq_stride + k];
  }

  /// Where index `idx` of key position j lies (valid: a token of its cache).
  __device__ TokenAddress address(int j, int idx, const SparseKvCache*& kc_out) const {
    const SparseKvCache& kc = j < kp.cache[0].topk ? kp.cache[0] : kp.cache[1];
    kc_out = &kc;
    TokenAddress at{static_cast<const uint8_t*>(kp.cache[0].data), 0, false};
    if (idx >= 0 && static_cast<int64_t>(idx) < static_cast<int64_t>(kc.num_blocks) * kc.page_size) {
      at.page = static_cast<const uint8_t*>(kc.data) + (idx / kc.page_size) * kc.page_stride;
      at.slot = idx % kc.page_size;
      at.valid = true;
    }
    return at;
  }
};

template <typename Traits, typename Format>
struct IndexedKvTiles {
  using Params = IndexedKvParams;
  /// Threads that copy one token of a tile.
  static constexpr int kParts = Traits::kThreads / Traits::kBlockN;
  static_assert(kParts * Traits::kBlockN == Traits::kThreads, "whole threads per token");

  SelectedKeys keys;
  bool row_ok[2];          // the thread's two rows are real heads
  int next_n0 = -1, next_idx = -1;  // the prefetched index entry of tile next_n0 (load())

  __device__ IndexedKvTiles(const DecodeParams&, const Params& params, int req, const Segment& seg,
                            const RowMap& rows_map, int first_row)
      : keys(params, req, seg) {
#pragma unroll
    for (int i = 0; i < 2; ++i) row_ok[i] = first_row + 8 * i < rows_map.rows;
  }

  /// Issues the copies of key positions [n0, n0 + kBlockN) and writes their flags. Tiles come in
  /// order within a segment: the index entry of the next tile is loaded here too, so the next
  /// call's copies do not wait for it.
  __device__ void load(uint8_t* landed, uint8_t* flags, int n0) {
    const int token = threadIdx.x / kParts, part = threadIdx.x % kParts;
    const int idx = n0 == next_n0 ? next_idx : keys.index_entry(n0 + token);
    next_n0 = n0 + Traits::kBlockN;
    next_idx = keys.index_entry(next_n0 + token);
    const SparseKvCache* kc;
    const TokenAddress at = keys.address(n0 + token, idx, kc);
    Format::template copy<Traits, kParts>(landed, token, part, at, *kc);
    if (part == 0) flags[token] = at.valid;
  }

  __device__ void widen(const uint8_t* staged, __nv_bfloat16* sK) const { Format::template widen<Traits>(staged, sK); }

  __device__ bool visible(int i, int col, int tile_n0, const uint8_t* flags) const {
    return row_ok[i] && flags[col - tile_n0] != 0;
  }
  __device__ float value_scale() const { return 1.f; }
};

}  // namespace flash_mla::sparse
