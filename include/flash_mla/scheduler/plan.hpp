// The split-KV work plan: which SM part decodes which KV tiles (kTileTokens = 64 tokens, whatever
// the cache's page size) of which request.
//
// One function computes the plan and is compiled twice: by the GPU metadata kernel
// (scheduler/metadata_kernel.cuh, one thread, inputs staged in shared memory) and on the
// host (host_plan below), so the host reference and the device plan cannot drift apart.
//
// Row p of tile_scheduler_metadata (kMetaInts int32 each) describes SM part p:
//   [0] begin_req   first request of the part
//   [1] begin_tile  first tile of begin_req it decodes
//   [2] end_req     last request of the part (inclusive); end_req < begin_req: empty part
//   [3] end_tile    one past the last tile of end_req it decodes
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

/// Cost charged per request segment, in tiles: the fixed work (Q load, epilogue, combine)
/// that a segment costs regardless of its length.
constexpr int kSegmentFixedCost = 5;

/// Tiles holding `seqlen` tokens (negative lengths count as empty).
FLASH_MLA_HOST_DEVICE int tiles_of(int seqlen) {
  return seqlen > 0 ? static_cast<int>((static_cast<long long>(seqlen) + kTileTokens - 1) / kTileTokens) : 0;
}

/// What `tiles` tiles of one segment cost in the plan: the kernels take tiles in pairs, so an odd
/// count costs as much as the next even one (the pair's second tile is a zero tile).
FLASH_MLA_HOST_DEVICE int paired_tiles(int tiles) { return tiles + (tiles & 1); }

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

/// The greedy plan for one payload: part after part takes up to `payload` cost units, a segment's
/// cost being its tiles rounded up to pairs plus kSegmentFixedCost; a request that does not fit
/// whole is split (the part takes the even number of tiles that fits). Returns whether every request was placed. With
/// kLastTakesRest the last part takes whatever is left (always true then). meta / num_splits are
/// written when non-null.
template <bool kLastTakesRest>
FLASH_MLA_HOST_DEVICE bool greedy_plan(const int32_t* seqlens, int batch, int num_parts, long long payload,
                                       int32_t* meta, int32_t* num_splits) {
  int req = 0, tile = 0, split = 0, splits_done = 0;
  if (num_splits != nullptr) num_splits[0] = 0;
  for (int p = 0; p < num_parts; ++p) {
    int32_t* row = meta != nullptr ? meta + p * kMetaInts : nullptr;
    if (row != nullptr) {
      row[0] = req;
      row[1] = tile;
      row[4] = split;
    }
    long long remain = payload;
    const bool take_rest = kLastTakesRest && p == num_parts - 1;
    while (req < batch) {
      const int left = tiles_of(seqlens[req]) - tile;
      if (take_rest || remain >= paired_tiles(left) + kSegmentFixedCost) {  // finish this request here
        remain -= paired_tiles(left) + kSegmentFixedCost;
        splits_done += split + 1;
        if (num_splits != nullptr) num_splits[req + 1] = splits_done;
        ++req;
        tile = 0;
        split = 0;
      } else {  // take what fits and leave the rest of the request to the next part
        // An even number of tiles: the kernels take tiles in pairs, so a segment of an odd tile
        // count costs as much as one tile more, and later segments of the request stay aligned.
        long long take = remain - kSegmentFixedCost;
        take -= take & 1;
        if (take > 0) {
          tile += static_cast<int>(take);
          ++split;
        }
        break;
      }
    }
    if (row != nullptr) {
      if (tile > 0) {
        row[2] = req;
        row[3] = tile;
      } else {
        row[2] = req - 1;
        row[3] = req > 0 ? tiles_of(seqlens[req - 1]) : 0;
      }
      row[5] = row[6] = row[7] = 0;
    }
  }
  return req >= batch;
}

/// Payloads tried by the balancing search: ceil(total / parts) + k for k < kPayloadCandidates (the
/// smallest feasible payload was at most kSegmentFixedCost above the share in every plan we
/// simulated; the cap keeps every part within share + fixed cost + 1). The device evaluates them
/// in parallel (one per thread of the metadata kernel), the host one after the other; both take
/// the smallest feasible one.
constexpr int kPayloadCandidates = kSegmentFixedCost + 2;

struct PayloadSearch {
  long long first = 0;  // smallest candidate: ceil(total / parts)

  FLASH_MLA_HOST_DEVICE long long candidate(int k) const { return first + k; }
  /// Payload of the last-part-takes-the-rest plan, used when no candidate is feasible.
  FLASH_MLA_HOST_DEVICE long long fallback() const { return first + kSegmentFixedCost; }

  FLASH_MLA_HOST_DEVICE static PayloadSearch of(const int32_t* seqlens, int batch, int num_parts) {
    long long total = 0;
    for (int i = 0; i < batch; ++i) total += paired_tiles(tiles_of(seqlens[i])) + kSegmentFixedCost;
    PayloadSearch s;
    s.first = (total + num_parts - 1) / num_parts;
    return s;
  }
};

/// Fills meta[num_parts * kMetaInts] and num_splits[batch + 1] from seqlens[batch] with the
/// greedy plan of the given payload (candidate index k of the search), or, for k < 0, the plan
/// whose last part takes whatever is left.
FLASH_MLA_HOST_DEVICE void write_plan(const int32_t* seqlens, int batch, int num_parts, const PayloadSearch& search,
                                      int k, int32_t* meta, int32_t* num_splits) {
  if (k >= 0) {
    greedy_plan<false>(seqlens, batch, num_parts, search.candidate(k), meta, num_splits);
  } else {
    greedy_plan<true>(seqlens, batch, num_parts, search.fallback(), meta, num_splits);
  }
}

/// The split-KV plan: the smallest payload whose greedy plan places every request (so the busiest
/// part is as light as the greedy allows and no part is left idle while others carry extra
/// work); if no candidate is feasible, the plan with payload ceil(total / parts) + fixed cost and
/// the last part taking the rest.
FLASH_MLA_HOST_DEVICE void plan_split_kv(const int32_t* seqlens, int batch, int num_parts, int32_t* meta,
                                        int32_t* num_splits) {
  const PayloadSearch search = PayloadSearch::of(seqlens, batch, num_parts);
  int chosen = -1;
  for (int k = 0; k < kPayloadCandidates && chosen < 0; ++k) {
    if (greedy_plan<false>(seqlens, batch, num_parts, search.candidate(k), nullptr, nullptr)) chosen = k;
  }
  write_plan(seqlens, batch, num_parts, search, chosen, meta, num_splits);
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
