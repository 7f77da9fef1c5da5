// The producer side of the Hopper token-sparse kernel (sparse_kernel.cuh): the selected tokens
// of a 64-key tile are read into registers (two threads a token), then widened to bf16 and
// written into a swizzled 64 x 576 tile (traits.hpp) once its buffer is free. Reading into
// registers lets a tile's loads be in flight while the math warpgroups still use the buffer it
// will land in; no staging memory is needed (shared memory holds Q and two tiles, nothing more).
//
// One type per format: TokenRegisters<Format>. A skipped key (invalid index, past the row's
// length or the segment) is not read: its registers hold zeros, so its row of the tile is zero
// (its score is masked; P = 0 must not meet NaN in V).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "../common/fp8.cuh"
#include "../sparse/token_formats.cuh"
#include "traits.hpp"

namespace flash_mla::sm90 {

/// 16 bytes of global memory, read through the non-coherent path without L1 allocation (each
/// token record is read once per CTA).
__device__ __forceinline__ uint4 load_streaming_16(const void* src) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
}

/// Asks L2 to fetch the 128-byte line holding `src` (the next tile's records, read soon).
__device__ __forceinline__ void prefetch_l2(const void* src) { asm volatile("prefetch.global.L2 [%0];" ::"l"(src)); }

/// Stores 16 bytes at byte `offset` of a shared-memory tile.
__device__ __forceinline__ void store_16(uint8_t* tile, uint32_t offset, const uint4& v) {
  *reinterpret_cast<uint4*>(tile + offset) = v;
}

template <typename Format>
struct TokenRegisters;

/// The V3.2 656-byte record. Thread `part` (0, 1) of a token takes e4m3 channels [256 part,
/// 256 part + 256) with their two scales and RoPE channels [32 part, 32 part + 32), in two halves
/// (kHalves): half h is e4m3 channels 256 part + 128 h + [0, 128) (one scale) and RoPE channels
/// 32 part + 16 h + [0, 16). The producer stores one half of a tile and then loads that half of
/// the next tile into the same registers, so the next tile's loads are in flight while it works.
template <>
struct TokenRegisters<sparse::V32Tokens> {
  using Format = sparse::V32Tokens;
  static constexpr int kHalves = 2;
  static constexpr int kNopeChunks = 8;  // a half: 8 chunks of 16 e4m3
  static constexpr int kRopeChunks = 2;  // a half: 2 chunks of 8 bf16
  uint4 nope[kNopeChunks];
  uint4 rope[kRopeChunks];
  float scale;

  __device__ __forceinline__ void load(const uint8_t* record, int part, int half, bool valid) {
    const int group = 2 * part + half;  // the 128-channel scale group
    if (valid) {
#pragma unroll
      for (int i = 0; i < kNopeChunks; ++i) nope[i] = load_streaming_16(record + 128 * group + 16 * i);
#pragma unroll
      for (int i = 0; i < kRopeChunks; ++i) rope[i] = load_streaming_16(record + Format::kRopeOffset + 32 * group + 16 * i);
      scale = reinterpret_cast<const float*>(record + Format::kScaleOffset)[group];
    } else {
#pragma unroll
      for (int i = 0; i < kNopeChunks; ++i) nope[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int i = 0; i < kRopeChunks; ++i) rope[i] = make_uint4(0, 0, 0, 0);
      scale = 0.f;
    }
  }

  /// The 128-byte lines of the record this thread will read (prefetch_l2 before load()).
  __device__ __forceinline__ static void prefetch(const uint8_t* record, int part) {
    // 656 bytes span at most 7 lines: the two threads of the token take alternate ones.
    const uint8_t* first = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(record) & ~uintptr_t(127));
#pragma unroll
    for (int l = part; l < 6; l += 2) prefetch_l2(first + 128 * l);
    if (part == 1) prefetch_l2(record + Format::kBytes - 1);
  }

  /// Widens half `half` into row `token` of a swizzled bf16 tile (Traits::offset, spelled out:
  /// the 16-byte chunk c of the row's 128 bytes in a column block lands at c ^ (token % 8); the
  /// per-chunk offsets are a few integer ops, not ~40 addresses held in registers).
  __device__ __forceinline__ void store(uint8_t* tile, int token, int part, int half) const {
    const int group = 2 * part + half;
    const int swz = token % 8;
    uint8_t* row = tile + token * 128;
    uint8_t* nope_row = row + 2 * group * Traits::kColBlockBytes;  // column blocks 2 group, 2 group + 1
#pragma unroll
    for (int i = 0; i < kNopeChunks; ++i) {
      uint4 first, second;
      e4m3x16_to_bf16_times(nope[i], scale, first, second);
      uint8_t* block = nope_row + (i / 4) * Traits::kColBlockBytes;
      store_16(block, ((2 * (i % 4)) ^ swz) << 4, first);
      store_16(block, ((2 * (i % 4) + 1) ^ swz) << 4, second);
    }
    uint8_t* rope_row = row + Traits::kRopeBlock * Traits::kColBlockBytes;
#pragma unroll
    for (int i = 0; i < kRopeChunks; ++i) store_16(rope_row, ((2 * group + i) ^ swz) << 4, rope[i]);
  }
};

}  // namespace flash_mla::sm90
