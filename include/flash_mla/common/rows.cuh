// How the packed query rows of one (request, KV head) map back to (query token, query head).
#pragma once

namespace flash_mla {

/// Where the packed query rows of one CTA live: row r = t * heads_per_kv + hh.
struct RowMap {
  int heads_per_kv;  // h_q / h_kv
  int rows;          // s_q * heads_per_kv: valid packed rows per KV head
  int kv_head;
  __device__ int token(int r) const { return r / heads_per_kv; }
  __device__ int head(int r) const { return kv_head * heads_per_kv + r % heads_per_kv; }
};

}  // namespace flash_mla
