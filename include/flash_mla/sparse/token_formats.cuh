// How one token of a token-sparse KV cache is stored, copied into shared memory and widened
// into the bf16 row the products read (docs/kv-formats.md). One type per format:
//
//   Bf16Tokens<kDim>  kDim bf16 channels: copied straight into the swizzled 16-bit tile.
//   V32Tokens         656 bytes: 512 e4m3, 4 float32 scales (one per 128 channels), 64 bf16 RoPE.
//   Model1Tokens      the 512-dim format: a 576-byte record (448 e4m3 + 64 bf16 RoPE) and, in the
//                     page's second region, an 8-byte record of 7 ue8m0 scales (one per 64).
//
// Interface (used by IndexedKvTiles): kFormat, kHeadDim, kStagedTokenBytes (0: lands unstaged),
// copy<Traits, kParts>() issues the cp.async copies of one token (or zero-fills it) by kParts
// threads, widen<Traits>() converts a whole staged tile into the swizzled bf16 tile.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "../common/fp8.cuh"
#include "../params.hpp"
#include "../sm80/ptx.cuh"

namespace flash_mla::sparse {

/// Where a selected token lies: its page's first byte and its slot in the page. For a skipped
/// token, `page` is any readable address (it is not read: the copies zero-fill).
struct TokenAddress {
  const uint8_t* page;
  int slot;
  bool valid;
};

template <int kDim>
struct Bf16Tokens {
  static constexpr SparseKvFormat kFormat = SparseKvFormat::kBF16;
  static constexpr int kHeadDim = kDim;
  static constexpr int kStagedTokenBytes = 0;

  template <typename Traits, int kParts>
  __device__ static void copy(uint8_t* tile, int token, int part, const TokenAddress& at, const SparseKvCache& c) {
    const uint8_t* src = at.page + at.slot * c.token_stride;
    for (int chunk = part; chunk < kDim / 8; chunk += kParts) {
      sm80::cp_async_16(tile + Traits::swizzle(token, chunk * 8) * 2, src + chunk * 16, at.valid);
    }
  }
};

/// Copies 16-byte chunks [0, kChunks) of a token record to its staged row.
template <int kChunks, int kParts>
__device__ __forceinline__ void copy_record(uint8_t* row, const uint8_t* src, int part, bool valid) {
  for (int chunk = part; chunk < kChunks; chunk += kParts) sm80::cp_async_16(row + chunk * 16, src + chunk * 16, valid);
}

/// Widens a staged tile: per token, kE4m3Chunks chunks of 16 e4m3 channels (chunk k scaled by
/// scale_of(row, k)) and 8 chunks of 8 bf16 RoPE channels at byte kRopeOffset of the staged row.
template <typename Traits, int kE4m3Chunks, int kRopeOffset, typename ScaleOf>
__device__ __forceinline__ void widen_tile(const uint8_t* staged, __nv_bfloat16* sK, const ScaleOf& scale_of) {
  constexpr int kJobs = kE4m3Chunks + 8;  // per token
  for (int idx = threadIdx.x; idx < Traits::kBlockN * kJobs; idx += Traits::kThreads) {
    const int token = idx / kJobs, job = idx % kJobs;
    const uint8_t* row = staged + token * Traits::kStagedTokenBytes;
    if (job < kE4m3Chunks) {
      uint4 first, second;
      e4m3x16_to_bf16_times(*reinterpret_cast<const uint4*>(row + job * 16), scale_of(row, job), first, second);
      *reinterpret_cast<uint4*>(sK + Traits::swizzle(token, job * 16)) = first;
      *reinterpret_cast<uint4*>(sK + Traits::swizzle(token, job * 16 + 8)) = second;
    } else {
      const int rope = job - kE4m3Chunks;
      *reinterpret_cast<uint4*>(sK + Traits::swizzle(token, kE4m3Chunks * 16 + rope * 8)) =
          *reinterpret_cast<const uint4*>(row + kRopeOffset + rope * 16);
    }
  }
}

struct V32Tokens {
  static constexpr SparseKvFormat kFormat = SparseKvFormat::kV32FP8;
  static constexpr int kHeadDim = 576;
  static constexpr int kBytes = 656;
  static constexpr int kStagedTokenBytes = kBytes;
  static constexpr int kScaleOffset = 512;  // 4 float32
  static constexpr int kRopeOffset = 528;   // 64 bf16

  template <typename Traits, int kParts>
  __device__ static void copy(uint8_t* staged, int token, int part, const TokenAddress& at, const SparseKvCache& c) {
    copy_record<kBytes / 16, kParts>(staged + token * kStagedTokenBytes, at.page + at.slot * c.token_stride, part,
                                     at.valid);
  }

  template <typename Traits>
  __device__ static void widen(const uint8_t* staged, __nv_bfloat16* sK) {
    widen_tile<Traits, 32, kRopeOffset>(staged, sK, [](const uint8_t* row, int chunk) {
      return reinterpret_cast<const float*>(row + kScaleOffset)[chunk / 8];  // 128 channels a scale
    });
  }
};

struct Model1Tokens {
  static constexpr SparseKvFormat kFormat = SparseKvFormat::kModel1FP8;
  static constexpr int kHeadDim = 512;
  static constexpr int kRecordBytes = 576;  // 448 e4m3 + 64 bf16, the page's first region
  static constexpr int kScaleRecordBytes = 8;  // 7 ue8m0 + 1 pad, the page's second region
  static constexpr int kStagedTokenBytes = kRecordBytes + 16;  // the scale record at byte 576

  template <typename Traits, int kParts>
  __device__ static void copy(uint8_t* staged, int token, int part, const TokenAddress& at, const SparseKvCache& c) {
    uint8_t* row = staged + token * kStagedTokenBytes;
    copy_record<kRecordBytes / 16, kParts>(row, at.page + at.slot * kRecordBytes, part, at.valid);
    if (part == kParts - 1) {
      sm80::cp_async_8(row + kRecordBytes,
                       at.page + static_cast<int64_t>(c.page_size) * kRecordBytes + at.slot * kScaleRecordBytes,
                       at.valid);
    }
  }

  /// 2^(b - 127) of a ue8m0 byte: byte 0 is 2^-127, byte 255 NaN.
  __device__ static float ue8m0(uint8_t b) {
    if (b == 0) return __uint_as_float(0x00400000u);
    return b == 255 ? __uint_as_float(0x7fc00000u) : __uint_as_float(uint32_t(b) << 23);
  }

  template <typename Traits>
  __device__ static void widen(const uint8_t* staged, __nv_bfloat16* sK) {
    widen_tile<Traits, 28, 448>(staged, sK, [](const uint8_t* row, int chunk) {
      return ue8m0(row[kRecordBytes + chunk / 4]);  // 64 channels a scale
    });
  }
};

}  // namespace flash_mla::sparse
