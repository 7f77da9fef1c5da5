// Compile-time shape of the Hopper (sm_90a) decode kernel and its shared-memory layout.
//
// One CTA = 2 math warpgroups that take the 64-token KV tiles of a segment in pairs ("seesaw"):
// warpgroup 0 owns the even tile of a pair (buffer kv[0]), warpgroup 1 the odd one (kv[1]).
// Each computes the whole S = Q K^T of its own tile (wgmma m64n64k16), so while one does its
// softmax the other's matrix products keep the tensor cores busy. O is split by channels:
// warpgroup w accumulates O[:, 256w : 256w + 256] from both tiles of the pair, its own P from
// registers and the other warpgroup's P through shared memory.
//
// Q, K and P live in shared memory in the 128-byte-swizzled layout that both TMA and wgmma
// speak: each 64-column block of a tile is [rows][128 B], 16-byte chunk c of row r stored at
// chunk c ^ (r % 8). Every 64-column block of a KV buffer has its own transaction barrier, so
// S starts on the first block while the rest are in flight, and a block is refilled as soon as
// its last reader is done (the two halves of V have different readers).
#pragma once

#include <cstdint>

#include "../params.hpp"

namespace flash_mla::sm90 {

struct Traits {
  static constexpr int kBlockM = 64;                // packed query rows per CTA
  static constexpr int kBlockN = kTileTokens;       // tokens per KV tile (common/paged_kv.cuh)
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column swizzle blocks per row (9)
  static constexpr int kColBlockBytes = 64 * 128;   // one block of a 64-row tile
  static constexpr int kTileBytes = kColBlocks * kColBlockBytes;  // a 64 x 576 tile (72 KB)
  static constexpr int kRopeBlock = kColBlocks - 1;               // channels 512..575: K only

  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kThreads = 2 * kWarpgroupThreads;
  static constexpr int kSTiles = kBlockN / 8;            // 8-column accumulator tiles of S
  static constexpr int kDvPerWarpgroup = kHeadDimV / 2;  // O channels per warpgroup
  static constexpr int kOTiles = kDvPerWarpgroup / 8;    // 8-column accumulator tiles of O
  static constexpr int kVBlocksPerWarpgroup = kDvPerWarpgroup / 64;
  static constexpr int kKSteps = 64 / 16;                // k16 steps per 64-column block

  /// Byte offset of element (row, col) in a swizzled tile of 576-wide rows.
  __host__ __device__ static constexpr uint32_t offset(int row, int col) {
    return (col / 64) * kColBlockBytes + row * 128 + ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2;
  }
};

/// Hand-offs between the two warpgroups, once per tile pair each: the producing warpgroup's 128
/// threads arrive on a shared-memory barrier (release), the other warpgroup waits on its phase
/// (acquire). (Named-barrier arrive/sync pairs made compute-sanitizer's racecheck report
/// hazards, even across __syncthreads; mbarriers are what it models.)
enum Handoff : int {
  kMax0Ready = 0,  // wg0 published the maxima / rescale factor after the even tile (S0 done)
  kMax1Ready = 1,  // wg1 published them after the odd tile (S1 done)
  kP0Ready = 2,    // wg0 stored its P, scaled to the pair's final maxima
  kP1Ready = 3,    // wg1 stored its P
  kHandoffs = 4,
};

/// Hardware named barriers of a single warpgroup (0 is __syncthreads).
enum Barrier : int {
  kWarpgroup0 = 1,
  kWarpgroup1 = 2,
};

struct alignas(1024) SharedStorage {
  alignas(1024) uint8_t q[Traits::kTileBytes];
  // kv[1]'s RoPE block doubles as warpgroup 1's P once S of the odd tile is done: with Q and
  // two tiles resident there is room for one more 8 KB buffer only (p0).
  alignas(1024) uint8_t kv[2][Traits::kTileBytes];
  alignas(1024) uint8_t p0[Traits::kBlockM * 128];  // warpgroup 0's P: 64 rows x 64 tokens
  float row_max[Traits::kBlockM];                     // running maxima (log2 domain), shared
  float rescale[2][Traits::kBlockM];                  // per tile of the pair: factor for older terms
  float row_sum[2][Traits::kBlockM];                  // per warpgroup, at the end of a segment
  uint64_t kv_bar[2][Traits::kColBlocks];             // TMA transaction barriers, one per block
  uint64_t handoff[kHandoffs];                        // see Handoff
};

constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory an sm_90 block may use");

}  // namespace flash_mla::sm90
