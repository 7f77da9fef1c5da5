// Compile-time shape of the Hopper (sm_90a) decode kernel and its shared-memory layout.
//
// One CTA = 3 warpgroups: two consumers (math) and one producer (a single thread issues TMA).
// A KV tile is one 64-token page; consumer warpgroup w
//  - computes S[:, 32w : 32w + 32] = Q K^T  (wgmma m64n32k16, 36 k-steps),
//  - then O[:, 256w : 256w + 256] += P V     (wgmma m64n256k16, 4 k-steps),
// exchanging row maxima and P (bf16/fp16) through shared memory in between.
// Q, K and P live in shared memory in the 128-byte-swizzled layout that both TMA and wgmma
// speak: each 64-column block of a tile is [rows][128 B], 16-byte chunk c of row r stored at
// chunk c ^ (r % 8).
#pragma once

#include <cstdint>

#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "../params.hpp"

namespace flash_mla::sm90 {

struct Traits {
  static constexpr int kBlockM = 64;               // packed query rows per CTA
  static constexpr int kBlockN = kPageSize;        // tokens per KV tile
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column swizzle blocks per row (9)
  static constexpr int kColBlockBytes = 64 * 128;   // one block of a 64-row tile
  static constexpr int kTileBytes = kColBlocks * kColBlockBytes;  // a 64 x 576 tile (72 KB)
  static constexpr int kStages = 2;

  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kConsumerThreads + 128;
  static constexpr int kTokensPerWarpgroup = kBlockN / 2;      // S columns per consumer warpgroup
  static constexpr int kSTiles = kTokensPerWarpgroup / 8;      // 8-column accumulator tiles of S
  static constexpr int kDvPerWarpgroup = kHeadDimV / 2;
  static constexpr int kOTiles = kDvPerWarpgroup / 8;          // 8-column accumulator tiles of O
  static constexpr int kQkSteps = kHeadDim / 16;
  static constexpr int kPvSteps = kBlockN / 16;

  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;

  /// Byte offset of element (row, col) in a swizzled tile of 576-wide rows.
  __host__ __device__ static constexpr uint32_t offset(int row, int col) {
    return (col / 64) * kColBlockBytes + row * 128 + ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2;
  }
};

using Pipeline = cutlass::PipelineTmaAsync<Traits::kStages>;

struct alignas(1024) SharedStorage {
  alignas(1024) uint8_t q[Traits::kTileBytes];
  alignas(1024) uint8_t kv[Traits::kStages][Traits::kTileBytes];
  alignas(1024) uint8_t p[Traits::kBlockM * 128];  // P: 64 rows x 64 tokens, one swizzle block
  float row_stat[2][Traits::kBlockM];                // per consumer warpgroup: row maxima, then sums
  Pipeline::SharedStorage pipeline;
};

constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory an sm_90 block may use");

}  // namespace flash_mla::sm90
