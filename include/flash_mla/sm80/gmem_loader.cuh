// Global -> shared copies of the portable kernel: the Q tile of one (request, KV head,
// m-block) and 64-token-page-aligned KV tiles through the block table. Tokens at or past L
// and pages whose block_table entry is out of range are zero-filled, never read, so NaN in
// unused cache slots and junk in unused table entries cannot reach the math.
#pragma once

#include "../common/q_chunk.cuh"
#include "../common/rows.cuh"
#include "../params.hpp"
#include "ptx.cuh"

namespace flash_mla::sm80 {

/// Copies rows [row0, row0 + kBlockM) of request `req` into the swizzled Q tile; rows past
/// rows_map.rows are zero. q_vec16: q's base and strides allow 16-byte copies.
template <typename Traits, typename Element>
__device__ __forceinline__ void load_q_tile(Element* sQ, const DecodeParams& p, const RowMap& rows_map,
                                            int req, int row0, bool q_vec16) {
  for (int idx = threadIdx.x; idx < Traits::kBlockM * Traits::kChunksPerRow; idx += Traits::kThreads) {
    const int local_row = idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    copy_q_chunk(sQ + Traits::swizzle(local_row, col), p, rows_map, req, row0 + local_row, col, q_vec16);
  }
}

/// Copies tokens [n0, n0 + kBlockN) of request `req` (inside one page) into a swizzled K tile.
template <typename Traits, typename Element>
__device__ __forceinline__ void load_kv_tile(Element* sK, const DecodeParams& p, int req, int kv_head,
                                             int n0, int seqlen) {
  const Element* k_cache = static_cast<const Element*>(p.k_cache);
  const int logical_page = n0 / kPageSize;
  int page = -1;
  if (logical_page < p.max_blocks_per_seq) page = p.block_table[req * p.block_table_stride + logical_page];
  const bool page_ok = page >= 0 && page < p.num_blocks;
  const Element* base = k_cache;
  if (page_ok) {
    base = k_cache + page * p.k_block_stride + (n0 % kPageSize) * p.k_token_stride +
           static_cast<int64_t>(kv_head) * p.k_head_stride;
  }
  for (int idx = threadIdx.x; idx < Traits::kBlockN * Traits::kChunksPerRow; idx += Traits::kThreads) {
    const int token = idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    const bool valid = page_ok && n0 + token < seqlen;
    const Element* src = valid ? base + token * p.k_token_stride + col : k_cache;
    cp_async_16(sK + Traits::swizzle(token, col), src, valid);
  }
}

}  // namespace flash_mla::sm80
