// An FP8 cache in the Hopper kernel: where a tile's raw e4m3 bytes land, and their widening
// into the 16-bit layout the products read, in place.
//
// Shared memory holds Q and two 72 KB tiles (224 of the 227 KB): there is no room to stage FP8
// tiles elsewhere. But 128 FP8 channels of 64 tokens take 8 KB, exactly one 64-column block of
// the 16-bit tile. So FP8 block j (channels 128j .. 128j + 127, j < 4) is loaded by TMA into
// 16-bit block 2j + 1 and widened into blocks 2j and 2j + 1; FP8 block 4 (the 64 RoPE channels,
// loaded as a 128-channel box whose upper half lies outside the cache and reads as zeros) lands
// in block 8 and is widened into block 8. The TMA layout is the same 128-byte swizzle: 16-byte
// chunk c of row r at chunk c ^ (r % 8). The refill groups of the seesaw loop (blocks 0-3, 4-7,
// 8, 4-8) are unions of these pairs, so every FP8 block is loaded where its own group refills.
// The warpgroup that owns a tile widens it right before its S products, while the other
// warpgroup's products keep the tensor cores busy.
#pragma once

#include <cstdint>

#include <cutlass/arch/barrier.h>

#include "../common/fp8.cuh"
#include "traits.hpp"

namespace flash_mla::sm90 {

/// The 16-bit block an FP8 block of a tile lands in (and its transaction barrier).
constexpr int fp8_slot(int fp8_block) { return fp8_block < 4 ? 2 * fp8_block + 1 : Traits::kRopeBlock; }

/// Widens the FP8 block landed for 16-bit block `kBlock` (even, or the RoPE block) into blocks
/// kBlock and kBlock + 1 (the RoPE block alone), as common/fp8.cuh widens, once its barrier
/// completed (phase `phase`). All 128 threads of the calling warpgroup; the result is not yet
/// visible to wgmma (widen_fp8_blocks does that).
template <typename Element, int kBlock>
__device__ __forceinline__ void widen_landed_fp8_block(uint8_t* kv, uint64_t* bars, uint32_t phase) {
  static_assert(kBlock % 2 == 0 || kBlock == Traits::kRopeBlock, "FP8 blocks widen into 16-bit block pairs");
  constexpr bool kRope = kBlock == Traits::kRopeBlock;
  constexpr int kChunks = kRope ? 4 : 8;  // 16-byte FP8 chunks per token
  constexpr int kRowsPerWarp = Traits::kBlockN / (Traits::kWarpgroupThreads / 32);
  constexpr int kPerThread = kRowsPerWarp * kChunks / 32;  // 4, or 2
  constexpr int kSlot = fp8_slot(kBlock / 2);
  cutlass::arch::ClusterTransactionBarrier::wait(&bars[kSlot], phase);
  const uint8_t* src = kv + kSlot * Traits::kColBlockBytes;
  // Each warp converts its own 16 tokens: a token's FP8 row and its 16-bit rows are the same
  // 128-byte row of their blocks, so the source a warp overwrites is its own, already read into
  // registers (__syncwarp orders the reads before the writes).
  const int lane = threadIdx.x % 32, row0 = kRowsPerWarp * ((threadIdx.x / 32) % 4);
  uint4 raw[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = lane + 32 * i, row = row0 + idx / kChunks, c = idx % kChunks;
    raw[i] = *reinterpret_cast<const uint4*>(src + row * 128 + ((c ^ (row % 8)) << 4));
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = lane + 32 * i, row = row0 + idx / kChunks, c = idx % kChunks;
    uint4 first, second;  // channels 16c .. 16c + 7 and 16c + 8 .. 16c + 15 of the FP8 block
    e4m3x16_to_scaled<Element>(raw[i], first, second);
    uint8_t* dst = kv + (kBlock + c / 4) * Traits::kColBlockBytes + row * 128;
    const int chunk = 2 * (c % 4);
    *reinterpret_cast<uint4*>(dst + ((chunk ^ (row % 8)) << 4)) = first;
    *reinterpret_cast<uint4*>(dst + (((chunk + 1) ^ (row % 8)) << 4)) = second;
  }
}

/// widen_landed_fp8_block for the block pairs starting at kBlock, kBlock + 2, ... below kTo.
template <typename Element, int kBlock, int kTo>
__device__ __forceinline__ void widen_landed_fp8_range(uint8_t* kv, uint64_t* bars, uint32_t phase) {
  if constexpr (kBlock < kTo) {
    widen_landed_fp8_block<Element, kBlock>(kv, bars, phase);
    widen_landed_fp8_range<Element, kBlock + 2, kTo>(kv, bars, phase);
  }
}

/// Widens the FP8 blocks that 16-bit blocks [kFrom, kTo) of a tile come from (each as soon as it
/// landed), then makes them visible to the calling warpgroup's wgmma: one proxy fence and one
/// warpgroup barrier (`warpgroup_barrier`) for the whole range, since together they cost far
/// more than converting a block.
template <typename Element, int kFrom, int kTo>
__device__ __forceinline__ void widen_fp8_blocks(uint8_t* kv, uint64_t* bars, uint32_t phase, int warpgroup_barrier) {
  static_assert(kFrom % 2 == 0 && kFrom < kTo && (kTo % 2 == 0 || kTo == Traits::kColBlocks), "whole block pairs");
  widen_landed_fp8_range<Element, kFrom, kTo>(kv, bars, phase);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("bar.sync %0, %1;" ::"r"(warpgroup_barrier), "r"(Traits::kWarpgroupThreads) : "memory");
}

}  // namespace flash_mla::sm90
