// Online softmax across the two warpgroups of the seesaw. The running row maxima live in shared
// memory: the even page's warpgroup folds its scores in first, the odd page's second, and each
// publishes the factor by which everything accumulated before its page must be scaled.
// Scores are in the log2 domain (common/softmax.cuh); a row that has seen no visible key keeps
// the maximum -inf and uses offset 0, so its exponentials and factors are exactly 0.
#pragma once

#include <cmath>

#include "../common/softmax.cuh"
#include "traits.hpp"

namespace flash_mla::sm90 {

/// Row maxima (log2 domain) of a page's raw scores, columns past each row's last visible key
/// masked to -inf in s; the compares are skipped on pages both rows see whole, and left out of
/// the code when kMayMask is false (a pair every row sees whole). s stays unscaled: fold_page applies the scale inside its exponentials (softmax_scale > 0).
template <bool kMayMask>
__device__ __forceinline__ void page_rowmax(float (&s)[Traits::kSTiles][4], float scale_log2, int col0,
                                            const int (&limit)[2], float (&row_max)[2]) {
  const int tq = threadIdx.x % 4;
  if (kMayMask && col0 + Traits::kBlockN - 1 > min(limit[0], limit[1])) {
#pragma unroll
    for (int j = 0; j < Traits::kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (col0 + j * 8 + 2 * tq + (e & 1) > limit[e / 2]) s[j][e] = -INFINITY;
      }
    }
  }
  row_max[0] = row_max[1] = -INFINITY;
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j) {
    row_max[0] = fmaxf(row_max[0], fmaxf(s[j][0], s[j][1]));
    row_max[1] = fmaxf(row_max[1], fmaxf(s[j][2], s[j][3]));
  }
  row_max[0] = quad_max(row_max[0]) * scale_log2;
  row_max[1] = quad_max(row_max[1]) * scale_log2;
}

/// One page's raw scores s (masked; row maxima tile_max from page_rowmax, log2 domain) folded
/// into the running maxima of the thread's two rows (local rows `row`, `row + 8`): reads the
/// maxima before the page, stores the new ones and the page's factor for older terms (returned
/// in `rescale`, also stored to rescale_out), turns s into exp2(s * scale_log2 - offset) (one
/// FFMA and one ex2 per score), and scales `sum` (this thread's share of the row sums) by the
/// factor before adding the page.
__device__ __forceinline__ void fold_page(SharedStorage& smem, float* rescale_out, int row,
                                          float (&s)[Traits::kSTiles][4], const float (&tile_max)[2], float scale_log2,
                                          float (&rescale)[2], float (&sum)[2]) {
  float old_max[2], new_max[2], offset[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    old_max[i] = smem.row_max[row + 8 * i];
    new_max[i] = fmaxf(old_max[i], tile_max[i]);
    offset[i] = new_max[i] == -INFINITY ? 0.f : new_max[i];
    rescale[i] = fast_exp2(old_max[i] - offset[i]);
    sum[i] *= rescale[i];
  }
  __syncwarp();  // every lane of the quad has read the old maxima
  if (threadIdx.x % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      smem.row_max[row + 8 * i] = new_max[i];
      rescale_out[row + 8 * i] = rescale[i];
    }
  }
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = fast_exp2(fmaf(s[j][e], scale_log2, -offset[e / 2]));
      sum[e / 2] += s[j][e];
    }
  }
}

}  // namespace flash_mla::sm90
