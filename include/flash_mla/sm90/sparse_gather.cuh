// The producer side of the Hopper token-sparse kernel (sparse_kernel.cuh): the selected tokens
// of a 64-key tile are read into registers (four threads a token, two rounds of 32 tokens), then
// widened to bf16 and written into a swizzled 64 x 576 tile (traits.hpp) once its buffer is free.
// Reading into registers lets a tile's loads be in flight while the math warpgroups still use the
// buffer it will land in; no staging memory is needed (shared memory holds Q and two tiles).
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

/// 16 bytes of global memory through the non-coherent path. The line stays in L1 (evict_last)
/// and L2 fetches the 256-byte block around it: a record's other runs are read by the next load
/// instructions. (Measured against no L1 allocation, 128-byte fetches and an L2 prefetch of the
/// next tile: 1.6x the rate with two threads a key; see docs/performance.md.)
__device__ __forceinline__ uint4 load_gathered_16(const void* src) {
  uint4 v;
  asm volatile("ld.global.nc.L1::evict_last.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
}

/// Stores 16 bytes at byte `offset` of a shared-memory tile.
__device__ __forceinline__ void store_16(uint8_t* tile, uint32_t offset, const uint4& v) {
  *reinterpret_cast<uint4*>(tile + offset) = v;
}

template <typename Format>
struct TokenRegisters;

/// The V3.2 656-byte record, read by four threads a key as whole 64-byte runs: thread q (0..3)
/// of a key holds bytes [64 k + 16 q, + 16) of the e4m3 part for k = 0..7 (channels 64 k + 16 q +
/// [0, 16), scale group k / 2), RoPE channels 8 q + [0, 8) and 32 + 8 q + [0, 8), and the four
/// scales. A key's four threads are lanes l, l + 8, l + 16, l + 24 of a warp, so one load
/// instruction reads 64 contiguous bytes of each of 8 records (2 full sectors each).
template <>
struct TokenRegisters<sparse::V32Tokens> {
  using Format = sparse::V32Tokens;
  static constexpr int kLanesPerKey = 4;
  static constexpr int kRuns = 8;  // 64-byte runs of the e4m3 part
  uint4 nope[kRuns];
  uint4 rope[2];
  float4 scale;

  __device__ __forceinline__ void load(const uint8_t* record, int q, bool valid) {
    if (valid) {
#pragma unroll
      for (int k = 0; k < kRuns; ++k) nope[k] = load_gathered_16(record + 64 * k + 16 * q);
      rope[0] = load_gathered_16(record + Format::kRopeOffset + 16 * q);
      rope[1] = load_gathered_16(record + Format::kRopeOffset + 64 + 16 * q);
      const uint4 s = load_gathered_16(record + Format::kScaleOffset);
      scale = make_float4(__uint_as_float(s.x), __uint_as_float(s.y), __uint_as_float(s.z), __uint_as_float(s.w));
    } else {
#pragma unroll
      for (int k = 0; k < kRuns; ++k) nope[k] = make_uint4(0, 0, 0, 0);
      rope[0] = rope[1] = make_uint4(0, 0, 0, 0);
      scale = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  /// Widens into row `token` of a swizzled bf16 tile.
  __device__ __forceinline__ void store(uint8_t* tile, int token, int q) const {
    const float scales[4] = {scale.x, scale.y, scale.z, scale.w};
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
      const int col = 64 * k + 16 * q;
      uint4 first, second;
      e4m3x16_to_bf16_times(nope[k], scales[k / 2], first, second);
      store_16(tile, Traits::offset(token, col), first);
      store_16(tile, Traits::offset(token, col + 8), second);
    }
    store_16(tile, Traits::offset(token, 512 + 8 * q), rope[0]);
    store_16(tile, Traits::offset(token, 512 + 32 + 8 * q), rope[1]);
  }
};

}  // namespace flash_mla::sm90
