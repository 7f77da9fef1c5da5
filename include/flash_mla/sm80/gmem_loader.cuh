// Global -> shared copies of the portable kernel: the Q tile of one (request, KV head,
// m-block) and KV tiles through the block table (pages of any supported size). Tokens at or past L
// and pages whose block_table entry is out of range are zero-filled, never read, so NaN in
// unused cache slots and junk in unused table entries cannot reach the math.
//
// A 16-bit cache lands in the swizzled tile the matrix products read. An FP8 cache lands as raw
// bytes in a staging tile (row-major, 576 bytes per token) and widen_kv_tile() converts it into
// the swizzled tile: the same shared memory as two 16-bit tiles (one 16-bit tile + two staging).
#pragma once

#include "../common/fp8.cuh"
#include "../common/q_chunk.cuh"
#include "../common/rows.cuh"
#include "../common/segment.cuh"
#include "../params.hpp"
#include "ptx.cuh"

namespace flash_mla::sm80 {

/// Copies rows [row0, row0 + kBlockM) of request `req` into the swizzled Q tile; rows past
/// rows_map.rows are zero. q_vec16: q's base and strides allow 16-byte copies.
template <typename Traits, typename QStored, typename Element>
__device__ __forceinline__ void load_q_tile(Element* sQ, const DecodeParams& p, const RowMap& rows_map,
                                            int req, int row0, bool q_vec16) {
  for (int idx = threadIdx.x; idx < Traits::kBlockM * Traits::kChunksPerRow; idx += Traits::kThreads) {
    const int local_row = idx / Traits::kChunksPerRow;
    const int col = (idx % Traits::kChunksPerRow) * 8;
    copy_q_chunk<Element, QStored>(sQ + Traits::swizzle(local_row, col), p, rows_map, req, row0 + local_row, col,
                                   q_vec16);
  }
}

/// Physical page of logical page `logical` of request `req`, or -1 when the request has no such
/// page in block_table or the entry is not a page of k_cache.
__device__ __forceinline__ int checked_page(const DecodeParams& p, int req, int logical) {
  const int page = logical < p.max_blocks_per_seq ? p.block_table[req * p.block_table_stride + logical] : -1;
  return page >= 0 && page < p.num_blocks ? page : -1;
}

/// Byte offset of channel `col` (a multiple of 16 bytes' worth) of `token` in a KV tile as it
/// lands: swizzled 16-bit elements, or the raw FP8 staging rows.
template <typename Traits, typename KvStored>
__device__ __forceinline__ int landed_offset(int token, int col) {
  if constexpr (kIsFp8<KvStored>) {
    return token * Traits::kHeadDim + col;
  } else {
    return Traits::swizzle(token, col) * 2;
  }
}

/// Copies tokens [n0, n0 + kBlockN) of request `req` into a KV tile (landed_offset layout). The
/// tile lies in one page or straddles two (kBlockN <= 2 x the smallest page size); pages holding
/// no token below seqlen are not looked up.
template <typename Traits, typename KvStored>
__device__ __forceinline__ void load_kv_tile(uint8_t* tile, const DecodeParams& p, int req, int kv_head,
                                             int n0, int seqlen) {
  static_assert(Traits::kBlockN <= 32, "a tile spans at most two pages of 16 tokens");
  constexpr int kChunkElems = 16 / sizeof(KvStored);
  constexpr int kChunksPerRow = Traits::kHeadDim / kChunkElems;
  const KvStored* k_cache = static_cast<const KvStored*>(p.k_cache);
  const int shift = __ffs(p.page_size) - 1;  // page sizes are powers of two
  const int first_logical = n0 >> shift;
  const int last_token = min(n0 + Traits::kBlockN, seqlen) - 1;  // < n0: the tile holds no token
  const int first_page = n0 <= last_token ? checked_page(p, req, first_logical) : -1;
  const int second_page =
      n0 <= last_token && (last_token >> shift) != first_logical ? checked_page(p, req, first_logical + 1) : -1;
  for (int idx = threadIdx.x; idx < Traits::kBlockN * kChunksPerRow; idx += Traits::kThreads) {
    const int token = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * kChunkElems;
    const int j = n0 + token;
    const int page = (j >> shift) == first_logical ? first_page : second_page;
    const bool valid = page >= 0 && j < seqlen;
    const KvStored* src = k_cache;
    if (valid) {
      src = k_cache + page * p.k_block_stride + (j & (p.page_size - 1)) * p.k_token_stride +
            static_cast<int64_t>(kv_head) * p.k_head_stride + col;
    }
    cp_async_16(tile + landed_offset<Traits, KvStored>(token, col), src, valid);
  }
}

/// Converts a landed FP8 staging tile into the swizzled 16-bit tile (fp8.cuh).
/// Zero-filled tokens stay zero. The caller synchronises before and after.
template <typename Traits, typename Element>
__device__ __forceinline__ void widen_kv_tile(const uint8_t* staged, Element* sK) {
  constexpr int kChunksPerRow = Traits::kHeadDim / 16;  // 16 FP8 channels per 16-byte chunk
  for (int idx = threadIdx.x; idx < Traits::kBlockN * kChunksPerRow; idx += Traits::kThreads) {
    const int token = idx / kChunksPerRow;
    const int col = (idx % kChunksPerRow) * 16;
    uint4 first, second;
    e4m3x16_to_scaled<Element>(*reinterpret_cast<const uint4*>(staged + token * Traits::kHeadDim + col), first, second);
    *reinterpret_cast<uint4*>(sK + Traits::swizzle(token, col)) = first;
    *reinterpret_cast<uint4*>(sK + Traits::swizzle(token, col + 8)) = second;
  }
}

/// The dense KV source of the portable kernel (the sparse one: sparse/indexed_kv.cuh): the tokens
/// of one request through its block table. Query row r sees keys 0 .. its limit (causal or not).
/// Interface the kernel uses: Params (the kernel's second argument), the constructor (one per
/// request segment), load() (issues the copies of one tile; flags unused here), widen() (staged
/// FP8 tiles only), visible() and value_scale().
template <typename Traits, typename KvStored>
struct PagedKvTiles {
  struct Params {};  // everything is in DecodeParams
  const DecodeParams& p;
  int req, kv_head, seqlen;
  int limit[2];  // last visible key of the thread's two rows (-1: none, also for padding rows)

  __device__ PagedKvTiles(const DecodeParams& params, const Params&, int request, const Segment& seg,
                          const RowMap& rows_map, int first_row)
      : p(params), req(request), kv_head(rows_map.kv_head), seqlen(seg.seqlen) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = first_row + 8 * i;
      limit[i] = seg.last_visible(p, r < rows_map.rows, rows_map.token(r));
    }
  }
  __device__ void load(uint8_t* landed, uint8_t* /*flags*/, int n0) const {
    load_kv_tile<Traits, KvStored>(landed, p, req, kv_head, n0, seqlen);
  }
  template <typename Element>
  __device__ void widen(const uint8_t* staged, Element* sK) const {
    widen_kv_tile<Traits>(staged, sK);
  }
  __device__ bool visible(int i, int col, int /*tile_n0*/, const uint8_t* /*flags*/) const { return col <= limit[i]; }
  /// What V's widened values are multiplied by (the descale and fp8_widen_scale() for FP8).
  __device__ float value_scale() const { return input_scale<KvStored>(p.descale_k); }
};

}  // namespace flash_mla::sm80
