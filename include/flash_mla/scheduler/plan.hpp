// The split-KV work plan: which SM part decodes which pages of which request.
//
// One function computes the plan and is compiled twice: by the GPU metadata kernel
// (scheduler/metadata_kernel.cuh, one thread, inputs staged in shared memory) and on the
// host (host_plan below), so the host reference and the device plan cannot drift apart.
//
// Row p of tile_scheduler_metadata (kMetaInts int32 each) describes SM part p:
//   [0] begin_req   first request of the part
//   [1] begin_page  first page of begin_req it decodes
//   [2] end_req     last request of the part (inclusive); end_req < begin_req: empty part
//   [3] end_page    one past the last page of end_req it decodes
//   [4] begin_split split index of the part's segment of begin_req (later requests: 0)
//   [5..7]          zero
// num_splits[i] is the first split of request i in the split workspace and
// num_splits[i + 1] - num_splits[i] the number of parts that decode it (>= 1, also for L == 0).
#pragma once

#include <cstdint>
#include <vector>

#include "../macros.hpp"
#include "../params.hpp"

namespace flash_mla {

/// Cost charged per request segment, in pages: the fixed work (Q load, epilogue, combine)
/// that a segment costs regardless of its length.
constexpr int kSegmentFixedCost = 5;

/// Pages holding `seqlen` tokens (negative lengths count as empty).
FLASH_MLA_HOST_DEVICE int pages_of(int seqlen) {
  return seqlen > 0 ? static_cast<int>((static_cast<long long>(seqlen) + kPageSize - 1) / kPageSize) : 0;
}

/// Number of SM parts the plan balances over: one part per SM for each (KV head, m-block)
/// CTA column, so that all CTAs of the decode grid are resident at once.
FLASH_MLA_HOST_DEVICE int num_sm_parts_for(int num_sms, int rows_per_kv_head, int num_heads_kv) {
  const int m_blocks = (rows_per_kv_head + kRowsPerMBlock - 1) / kRowsPerMBlock;
  const int denom = (m_blocks > 0 ? m_blocks : 1) * (num_heads_kv > 0 ? num_heads_kv : 1);
  const int parts = num_sms / denom;
  return parts > 0 ? parts : 1;
}

/// Upper bound on the number of splits of a plan: every part boundary adds at most one segment.
FLASH_MLA_HOST_DEVICE int max_splits_of(int batch, int num_sm_parts) { return batch + num_sm_parts; }

/// Fills meta[num_parts * kMetaInts] and num_splits[batch + 1] from seqlens[batch].
/// Greedy: every part gets about ceil(total / parts) cost units, a request's cost being its
/// pages plus kSegmentFixedCost per segment; the last part takes whatever is left.
FLASH_MLA_HOST_DEVICE void plan_split_kv(const int32_t* seqlens, int batch, int num_parts,
                                        int32_t* meta, int32_t* num_splits) {
  long long total = 0;
  for (int i = 0; i < batch; ++i) total += pages_of(seqlens[i]) + kSegmentFixedCost;
  const long long payload = (total + num_parts - 1) / num_parts + kSegmentFixedCost;

  int req = 0, page = 0, split = 0, splits_done = 0;
  num_splits[0] = 0;
  for (int p = 0; p < num_parts; ++p) {
    int32_t* row = meta + p * kMetaInts;
    row[0] = req;
    row[1] = page;
    row[4] = split;
    long long remain = payload;
    const bool last = p == num_parts - 1;
    while (req < batch) {
      const int left = pages_of(seqlens[req]) - page;
      if (last || remain >= left + kSegmentFixedCost) {  // finish this request here
        remain -= left + kSegmentFixedCost;
        splits_done += split + 1;
        num_splits[req + 1] = splits_done;
        ++req;
        page = 0;
        split = 0;
      } else {  // take what fits and leave the rest of the request to the next part
        const long long take = remain - kSegmentFixedCost;
        if (take > 0) {
          page += static_cast<int>(take);
          ++split;
        }
        break;
      }
    }
    if (page > 0) {
      row[2] = req;
      row[3] = page;
    } else {
      row[2] = req - 1;
      row[3] = req > 0 ? pages_of(seqlens[req - 1]) : 0;
    }
    row[5] = row[6] = row[7] = 0;
  }
}

/// Host reference of the plan, for tests and C++ callers that plan on the CPU.
struct HostPlan {
  std::vector<int32_t> meta;        ///< [num_sm_parts * kMetaInts]
  std::vector<int32_t> num_splits;  ///< [batch + 1]
  int num_sm_parts = 0;
};

inline HostPlan host_plan(const std::vector<int32_t>& seqlens, int num_sm_parts) {
  HostPlan plan;
  plan.num_sm_parts = num_sm_parts;
  plan.meta.assign(static_cast<size_t>(num_sm_parts) * kMetaInts, 0);
  plan.num_splits.assign(seqlens.size() + 1, 0);
  plan_split_kv(seqlens.data(), static_cast<int>(seqlens.size()), num_sm_parts, plan.meta.data(),
                plan.num_splits.data());
  return plan;
}

}  // namespace flash_mla
