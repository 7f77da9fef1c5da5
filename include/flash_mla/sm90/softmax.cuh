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

/// One page's scores s (log2 domain, masked, row maxima tile_max) folded into the running maxima
/// of the thread's two rows (local rows `row`, `row + 8`): reads the maxima before the page,
/// stores the new ones and the page's factor for older terms (returned in `rescale`, also stored
/// to rescale_out), turns s into exp2(s - offset), and scales `sum` (this thread's share of the
/// row sums) by the factor before adding the page.
__device__ __forceinline__ void fold_page(SharedStorage& smem, float* rescale_out, int row,
                                          float (&s)[Traits::kSTiles][4], const float (&tile_max)[2],
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
      s[j][e] = fast_exp2(s[j][e] - offset[e / 2]);
      sum[e / 2] += s[j][e];
    }
  }
}

}  // namespace flash_mla::sm90
