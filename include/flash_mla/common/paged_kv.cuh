// Where the tokens of a KV tile live in the paged cache. Token j of a request sits in page
// block_table[j / page_size] at slot j % page_size; the kernels walk a request in tiles of
// kTileTokens (64) tokens whatever the page size, so a tile is either a 64-token slice of one
// page (pages of 64, 128, 256 tokens) or kBoxes whole pages (pages of 16 or 32 tokens).
// Entries of block_table past a request's pages (or past max_blocks_per_seq) are never read.
#pragma once

#include <cstdint>

#include "../params.hpp"

namespace flash_mla {

/// Pages a 64-token tile spans: 64 / page_size for pages smaller than a tile, else 1.
FLASH_MLA_HOST_DEVICE constexpr int tile_boxes(int page_size) {
  return page_size < kTileTokens ? kTileTokens / page_size : 1;
}

/// The pages of one tile: box j holds tokens [j * 64 / kBoxes, (j + 1) * 64 / kBoxes) of the tile.
template <int kBoxes>
struct TilePages {
  static_assert(kBoxes == 1 || kBoxes == 2 || kBoxes == 4, "tiles span 1, 2 or 4 pages");
  static constexpr int kBoxTokens = kTileTokens / kBoxes;
  int page[kBoxes];  ///< physical page of each box; -1: no page (the box reads as zeros)
  int token0;        ///< slot of the tile's first token in its page (kBoxes == 1; else 0)
};

/// log2 of a supported page size (a power of two), for shifts instead of divisions.
__device__ __forceinline__ int page_shift(const DecodeParams& p) { return __ffs(p.page_size) - 1; }

/// The pages of tile `tile` (counted from the request's first token) of request `req`; pages
/// holding no token below `n_hi` are -1 and their block_table entries are not read.
template <int kBoxes>
__device__ __forceinline__ TilePages<kBoxes> tile_pages(const DecodeParams& p, int req, int tile, int n_hi) {
  TilePages<kBoxes> t;
  const int32_t* row = p.block_table + static_cast<int64_t>(req) * p.block_table_stride;
  const int first = tile * kTileTokens;
  if constexpr (kBoxes == 1) {
    const int logical = first >> page_shift(p);
    t.token0 = first - (logical << page_shift(p));
    t.page[0] = first < n_hi && logical < p.max_blocks_per_seq ? row[logical] : -1;
  } else {
    t.token0 = 0;
#pragma unroll
    for (int j = 0; j < kBoxes; ++j) {
      const int logical = tile * kBoxes + j;
      t.page[j] = first + j * TilePages<kBoxes>::kBoxTokens < n_hi && logical < p.max_blocks_per_seq ? row[logical] : -1;
    }
  }
  return t;
}

}  // namespace flash_mla
