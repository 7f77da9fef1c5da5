// Copying one 16-byte chunk (8 channels) of a packed query row into shared memory, shared by
// both kernels' Q loaders (they differ only in the shared-memory layout).
#pragma once

#include "../params.hpp"
#include "../sm80/ptx.cuh"
#include "rows.cuh"

namespace flash_mla {

/// Chunk `col / 8` of packed row r of request `req` into dst; zeros for padding rows
/// (r >= rows). q_vec16: q's base and strides allow 16-byte copies (cp.async); otherwise an
/// unaligned q view is copied element by element (Q is loaded once per segment: cheap).
template <typename Element>
__device__ __forceinline__ void copy_q_chunk(Element* dst, const DecodeParams& p, const RowMap& rows_map, int req,
                                             int r, int col, bool q_vec16) {
  const Element* q = static_cast<const Element*>(p.q);
  const bool valid = r < rows_map.rows;
  const Element* src = q;
  if (valid) {
    src = q + req * p.q_batch_stride + rows_map.token(r) * p.q_seq_stride +
          static_cast<int64_t>(rows_map.head(r)) * p.q_head_stride + col;
  }
  if (q_vec16) {
    sm80::cp_async_16(dst, src, valid);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = valid ? src[e] : Element(0.f);
  }
}

}  // namespace flash_mla
