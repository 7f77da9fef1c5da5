// Copying one chunk of 8 channels of a packed query row into shared memory (16 bytes of the
// compute type), shared by both kernels' Q loaders (they differ only in the shared-memory layout).
#pragma once

#include "../params.hpp"
#include "fp8.cuh"
#include "../sm80/ptx.cuh"
#include "rows.cuh"

namespace flash_mla {

/// Chunk `col / 8` of packed row r of request `req` into dst; zeros for padding rows
/// (r >= rows). q_vec16: q's base is 16-byte aligned and its strides multiples of 8 elements
/// (16-bit q: cp.async of the chunk; FP8 q: one 8-byte load); otherwise an unaligned q view is
/// copied element by element (Q is loaded once per segment: cheap). An FP8 q (QStored Fp8E4M3)
/// is widened to Element on the way (fp8.cuh) with plain stores.
template <typename Element, typename QStored = Element>
__device__ __forceinline__ void copy_q_chunk(Element* dst, const DecodeParams& p, const RowMap& rows_map, int req,
                                             int r, int col, bool q_vec16) {
  const QStored* q = static_cast<const QStored*>(p.q);
  const bool valid = r < rows_map.rows;
  const QStored* src = q;
  if (valid) {
    src = q + req * p.q_batch_stride + rows_map.token(r) * p.q_seq_stride +
          static_cast<int64_t>(rows_map.head(r)) * p.q_head_stride + col;
  }
  if constexpr (kIsFp8<QStored>) {
    uint2 raw = make_uint2(0, 0);
    if (valid && q_vec16) {
      raw = *reinterpret_cast<const uint2*>(src);
    } else if (valid) {
      uint8_t bytes[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) bytes[e] = src[e].bits;
      raw.x = bytes[0] | bytes[1] << 8 | bytes[2] << 16 | uint32_t(bytes[3]) << 24;
      raw.y = bytes[4] | bytes[5] << 8 | bytes[6] << 16 | uint32_t(bytes[7]) << 24;
    }
    *reinterpret_cast<uint4*>(dst) = e4m3x8_to_scaled<Element>(raw);
  } else if (q_vec16) {
    sm80::cp_async_16(dst, src, valid);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = valid ? src[e] : Element(0.f);
  }
}

}  // namespace flash_mla
