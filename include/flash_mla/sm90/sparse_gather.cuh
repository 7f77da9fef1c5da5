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

/// The V3.2 656-byte record: thread `part` (0, 1) of a token holds channels [256 part, 256 part
/// + 256) of the e4m3 part with their two scales, and RoPE channels [32 part, 32 part + 32).
template <>
struct TokenRegisters<sparse::V32Tokens> {
  using Format = sparse::V32Tokens;
  static constexpr int kNopeChunks = 16;  // 16 e4m3 each
  static constexpr int kRopeChunks = 4;   // 8 bf16 each
  uint4 nope[kNopeChunks];
  uint4 rope[kRopeChunks];
  float scale[2];

  __device__ __forceinline__ void load(const uint8_t* record, int part, bool valid) {
    const uint8_t* nope_src = record + part * (kNopeChunks * 16);
    const uint8_t* rope_src = record + Format::kRopeOffset + part * (kRopeChunks * 16);
    if (valid) {
#pragma unroll
      for (int i = 0; i < kNopeChunks; ++i) nope[i] = load_streaming_16(nope_src + 16 * i);
#pragma unroll
      for (int i = 0; i < kRopeChunks; ++i) rope[i] = load_streaming_16(rope_src + 16 * i);
      const float2 s = *reinterpret_cast<const float2*>(record + Format::kScaleOffset + 8 * part);
      scale[0] = s.x;
      scale[1] = s.y;
    } else {
#pragma unroll
      for (int i = 0; i < kNopeChunks; ++i) nope[i] = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int i = 0; i < kRopeChunks; ++i) rope[i] = make_uint4(0, 0, 0, 0);
      scale[0] = scale[1] = 0.f;
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

  /// Widens into row `token` of a swizzled bf16 tile.
  __device__ __forceinline__ void store(uint8_t* tile, int token, int part) const {
#pragma unroll
    for (int i = 0; i < kNopeChunks; ++i) {
      const int col = 256 * part + 16 * i;
      uint4 first, second;
      e4m3x16_to_bf16_times(nope[i], scale[i / 8], first, second);
      store_16(tile, Traits::offset(token, col), first);
      store_16(tile, Traits::offset(token, col + 8), second);
    }
#pragma unroll
    for (int i = 0; i < kRopeChunks; ++i) store_16(tile, Traits::offset(token, 512 + 32 * part + 8 * i), rope[i]);
  }
};

}  // namespace flash_mla::sm90
