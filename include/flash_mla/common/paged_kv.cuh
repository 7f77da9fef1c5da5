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

/// Where one box of a tile comes from. Box `box` of a tile holds its tokens
/// [box * 64 / kBoxes, (box + 1) * 64 / kBoxes); the kBoxes boxes are loaded by kBoxes threads
/// in parallel, each knowing only its own box's page.
struct BoxPage {
  int page;    ///< physical page; -1: no page (the box reads as zeros)
  int token0;  ///< slot of the box's first token in that page
};

/// log2 of a supported page size (a power of two), for shifts instead of divisions.
__device__ __forceinline__ int page_shift(const DecodeParams& p) { return __ffs(p.page_size) - 1; }

/// Box `box` of tile `tile` (counted from the request's first token) of request `req`, for a
/// tile of kBoxes pages (kBoxes == 1: a 64-token slice of one page). A box holding no token
/// below `n_hi` has page -1 and its block_table entry is not read.
template <int kBoxes>
__device__ __forceinline__ BoxPage box_page(const DecodeParams& p, int req, int tile, int box, int n_hi) {
  static_assert(kBoxes == 1 || kBoxes == 2 || kBoxes == 4, "a tile spans 1, 2 or 4 pages");
  constexpr int kBoxTokens = kTileTokens / kBoxes;
  const int first = tile * kTileTokens + box * kBoxTokens;
  const int logical = kBoxes == 1 ? first >> page_shift(p) : tile * kBoxes + box;
  BoxPage b;
  b.token0 = kBoxes == 1 ? first - (logical << page_shift(p)) : 0;
  b.page = first < n_hi && logical < p.max_blocks_per_seq
               ? p.block_table[static_cast<int64_t>(req) * p.block_table_stride + logical]
               : -1;
  return b;
}

}  // namespace flash_mla
