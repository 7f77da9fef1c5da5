// Compile-time shape of the portable (sm_80+) decode kernel: tile sizes, warp roles and the
// shared-memory layout. Everything the kernel indexes by is derived here, in one place.
#pragma once

#include <cstdint>

#include "../params.hpp"

namespace flash_mla::sm80 {

/// kBlockM query rows x kBlockN KV tokens per step, kHeadDim channels per key (576, or 512 for
/// the 512-dim token-sparse format). kStagedTokenBytes: 0 when KV tiles land as the 16-bit tiles
/// the products read; else the bytes per token of the raw tiles (FP8) that land in two staging
/// buffers and are widened into the one 16-bit tile.
/// Warps come in pairs per 16-row group: warp `w` owns rows 16 * (w % kRowGroups) and
///  - for S = Q K^T: tokens [half * kBlockN/2, (half + 1) * kBlockN/2) of the tile,
///  - for O = P V:   output channels [half * 256, (half + 1) * 256),
/// with half = w / kRowGroups. The pair exchanges row maxima and P through shared memory,
/// so no warp holds more than a 16 x 256 fp32 accumulator (128 registers per thread).
template <int kBlockM_, int kBlockN_, int kHeadDim_ = flash_mla::kHeadDim, int kStagedTokenBytes_ = 0>
struct DecodeTraits {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStagedTokenBytes = kStagedTokenBytes_;
  static constexpr bool kStaged = kStagedTokenBytes > 0;
  static constexpr int kHeadDimV = flash_mla::kHeadDimV;

  static constexpr int kRowGroups = kBlockM / 16;
  static constexpr int kWarps = kRowGroups * 2;
  static constexpr int kThreads = kWarps * 32;

  static constexpr int kTokensPerWarp = kBlockN / 2;  // S columns per warp
  static constexpr int kSTiles = kTokensPerWarp / 8;  // mma n-tiles of S per warp
  static constexpr int kDvPerWarp = kHeadDimV / 2;
  static constexpr int kOTiles = kDvPerWarp / 8;      // mma n-tiles of O per warp
  static constexpr int kKSteps = kHeadDim / 16;       // k-steps of S = Q K^T
  static constexpr int kPvSteps = kBlockN / 16;       // k-steps of O += P V

  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks per 16-bit row
  // P rows are padded by one 16-byte chunk so ldmatrix rows fall in distinct banks.
  static constexpr int kPStride = kBlockN + 8;

  // Shared memory, in bytes. Q and K tiles are kHeadDim-wide rows with an XOR swizzle of the
  // 16-byte chunks (see swizzle()); K is double-buffered: two 16-bit tiles, or one 16-bit tile
  // and two staging tiles. Key flags: one byte per token of each of the two tiles in flight
  // (which keys a token-sparse tile holds).
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kStagedTileBytes = kBlockN * kStagedTokenBytes;
  static constexpr int kKBytes = kStaged ? kKTileBytes + 2 * kStagedTileBytes : 2 * kKTileBytes;
  static constexpr int kPBytes = kBlockM * kPStride * 2;
  static constexpr int kRowStatBytes = 2 * kBlockM * 4;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + kQBytes;
  static constexpr int kPOffset = kKOffset + kKBytes;
  static constexpr int kRowStatOffset = kPOffset + kPBytes;
  static constexpr int kKeyFlagsOffset = kRowStatOffset + kRowStatBytes;
  static constexpr int kSmemBytes = kKeyFlagsOffset + 2 * kBlockN;

  static_assert(kBlockM % 16 == 0, "rows come in 16-row mma tiles");
  static_assert(kBlockN % 16 == 0 && kTokensPerWarp % 8 == 0, "tokens come in 8-wide mma tiles");
  static_assert(kTileTokens % kBlockN == 0, "the plan's 64-token tiles split into whole KV tiles");
  static_assert(kChunksPerRow % 8 == 0, "the swizzle permutes chunks in groups of 8");
  static_assert(kStagedTokenBytes % 16 == 0, "staged rows hold whole 16-byte copies");

  /// Element offset of (row, col) in a swizzled kHeadDim-wide tile: chunk c of row r is stored at
  /// c ^ (r % 8), so the 8 rows an ldmatrix reads hit 8 different bank groups.
  __host__ __device__ static constexpr int swizzle(int row, int col) {
    return row * kHeadDim + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
};

using LargeTraits = DecodeTraits<64, 32>;  // 149 KB: sm_80, sm_90
using SmallTraits = DecodeTraits<32, 16>;  // 75 KB: any sm_80+ (sm_86/89 have 99 KB)

/// `Shape` (LargeTraits or SmallTraits) for keys of kHeadDim channels landing as
/// kStagedTokenBytes-byte raw tokens (0: as 16-bit rows).
template <typename Shape, int kHeadDim, int kStagedTokenBytes>
using TraitsFor = DecodeTraits<Shape::kBlockM, Shape::kBlockN, kHeadDim, kStagedTokenBytes>;

}  // namespace flash_mla::sm80
