// Compile-time shape of the portable (sm_80+) decode kernel: tile sizes, warp roles and the
// shared-memory layout. Everything the kernel indexes by is derived here, in one place.
#pragma once

#include <cstdint>

#include "../params.hpp"

namespace flash_mla::sm80 {

/// kBlockM query rows x kBlockN KV tokens per step.
/// Warps come in pairs per 16-row group: warp `w` owns rows 16 * (w % kRowGroups) and
///  - for S = Q K^T: tokens [half * kBlockN/2, (half + 1) * kBlockN/2) of the tile,
///  - for O = P V:   output channels [half * 256, (half + 1) * 256),
/// with half = w / kRowGroups. The pair exchanges row maxima and P through shared memory,
/// so no warp holds more than a 16 x 256 fp32 accumulator (128 registers per thread).
template <int kBlockM_, int kBlockN_>
struct DecodeTraits {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kHeadDim = flash_mla::kHeadDim;
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

  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks per 576-wide row
  // P rows are padded by one 16-byte chunk so ldmatrix rows fall in distinct banks.
  static constexpr int kPStride = kBlockN + 8;

  // Shared memory, in bytes. Q and K tiles are 576-wide rows with an XOR swizzle of the
  // 16-byte chunks (see swizzle()); K is double-buffered.
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kPBytes = kBlockM * kPStride * 2;
  static constexpr int kRowStatBytes = 2 * kBlockM * 4;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQOffset + kQBytes;
  static constexpr int kPOffset = kKOffset + 2 * kKTileBytes;
  static constexpr int kRowStatOffset = kPOffset + kPBytes;
  static constexpr int kSmemBytes = kRowStatOffset + kRowStatBytes;

  static_assert(kBlockM % 16 == 0, "rows come in 16-row mma tiles");
  static_assert(kBlockN % 16 == 0 && kTokensPerWarp % 8 == 0, "tokens come in 8-wide mma tiles");
  static_assert(kTileTokens % kBlockN == 0, "the plan's 64-token tiles split into whole KV tiles");
  static_assert(kChunksPerRow % 8 == 0, "the swizzle permutes chunks in groups of 8");

  /// Element offset of (row, col) in a swizzled 576-wide tile: chunk c of row r is stored at
  /// c ^ (r % 8), so the 8 rows an ldmatrix reads hit 8 different bank groups.
  __host__ __device__ static constexpr int swizzle(int row, int col) {
    return row * kHeadDim + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
};

using LargeTraits = DecodeTraits<64, 32>;  // 149 KB: sm_80, sm_90
using SmallTraits = DecodeTraits<32, 16>;  // 75 KB: any sm_80+ (sm_86/89 have 99 KB)

}  // namespace flash_mla::sm80
