// Online softmax on mma fragments. Scores are kept in the log2 domain (scaled by
// softmax_scale * log2(e)) so every exponential is one ex2 instruction.
//
// Fragment layout (mma m16n8k16 accumulator): thread (g = lane / 4, tq = lane % 4) holds, for
// n-tile j, elements [0], [1] of row g and [2], [3] of row g + 8, at columns 8j + 2tq + {0, 1}.
// Each thread therefore owns two rows; a row is spread over the 4 threads of a quad.
#pragma once

#include <cmath>

namespace flash_mla {

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/// Scales raw scores into the log2 domain, masks the keys visible(i, col) rejects for the
/// thread's row i (0, 1) to -inf and returns the per-row maxima of this warp's columns
/// (quad-reduced).
template <int kTiles, typename Visible>
__device__ __forceinline__ void scale_mask_rowmax(float (&s)[kTiles][4], float scale_log2, int col0,
                                                  const Visible& visible, float (&row_max)[2]) {
  const int tq = threadIdx.x % 4;
  row_max[0] = row_max[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e / 2;
      const int col = col0 + j * 8 + 2 * tq + (e & 1);
      const float v = visible(i, col) ? s[j][e] * scale_log2 : -INFINITY;
      s[j][e] = v;
      row_max[i] = fmaxf(row_max[i], v);
    }
  }
  row_max[0] = quad_max(row_max[0]);
  row_max[1] = quad_max(row_max[1]);
}

/// Running state of one thread's two rows.
struct RowState {
  float max[2] = {-INFINITY, -INFINITY};  // log2 domain
  float sum[2] = {0.f, 0.f};              // this thread's share of sum(exp2(s - max))

  /// Moves to the new row maxima: returns the factor each row's accumulators must be scaled by
  /// and the offset to subtract from scores (0 while a row has seen no visible key).
  __device__ __forceinline__ void update(const float (&new_max)[2], float (&rescale)[2], float (&offset)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m = fmaxf(max[i], new_max[i]);
      offset[i] = m == -INFINITY ? 0.f : m;
      rescale[i] = fast_exp2(max[i] - offset[i]);
      max[i] = m;
      sum[i] *= rescale[i];
    }
  }
};

/// p = exp2(s - offset) in place, adding each row's share to state.sum.
template <int kTiles>
__device__ __forceinline__ void exponentiate(float (&s)[kTiles][4], const float (&offset)[2], RowState& state) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e / 2;
      s[j][e] = fast_exp2(s[j][e] - offset[i]);
      state.sum[i] += s[j][e];
    }
  }
}

template <int kTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kTiles][4], const float (&rescale)[2]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    o[j][0] *= rescale[0];
    o[j][1] *= rescale[0];
    o[j][2] *= rescale[1];
    o[j][3] *= rescale[1];
  }
}

}  // namespace flash_mla
