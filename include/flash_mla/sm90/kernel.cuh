// The Hopper (sm_90a) split-KV decode kernel: two math warpgroups taking the 64-token tiles of a
// segment in pairs (mainloop.cuh), KV tiles streamed by TMA into two buffers with one transaction
// barrier per 64-column block, wgmma for Q K^T and P V. Same grid, metadata and outputs as the
// portable kernel. An FP8 cache (KvStored Fp8E4M3) lands as raw bytes in the same buffers and
// is widened in place before the products (fp8_widen.cuh); an FP8 q is widened as it is loaded.
#pragma once

#include <cuda.h>

#include "../common/paged_kv.cuh"
#include "../common/q_chunk.cuh"
#include "../common/segment.cuh"
#include "../params.hpp"
#include "../sm80/ptx.cuh"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "tma.hpp"
#include "sync.cuh"
#include "traits.hpp"
#include "wgmma.cuh"

namespace flash_mla::sm90 {

/// All threads start copying the Q tile of (request, KV head, m-block) into the swizzled layout
/// (cp.async, one commit group; the caller waits with cp_async_wait_all before Q is read).
template <typename Element, typename QStored>
__device__ __forceinline__ void start_q_load(uint8_t* sq, const DecodeParams& p, const RowMap& rows_map, int req,
                                             int row0, bool q_vec16) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < Traits::kBlockM * kChunks; idx += Traits::kThreads) {
    const int row = idx / kChunks, col = (idx % kChunks) * 8;
    copy_q_chunk<Element, QStored>(reinterpret_cast<Element*>(sq + Traits::offset(row, col)), p, rows_map, req,
                                   row0 + row, col, q_vec16);
  }
  sm80::cp_async_commit();
}

/// The calling thread's box (lane % kBoxes) of the segment's `block`-th tile; page -1 (zeros)
/// past the segment.
template <int kBoxes>
__device__ __forceinline__ BoxPage segment_tile(const DecodeParams& p, const Segment& seg, int req, int block) {
  return box_page<kBoxes>(p, req, seg.n_lo / kTileTokens + block, static_cast<int>(threadIdx.x % kBoxes), seg.n_hi);
}

/// Starts every load a segment needs before its first S: its first two tiles (TMA, issued by
/// the first kBoxes threads) and its Q tile (cp.async by all threads). Called when Q and both KV buffers are free:
/// at the end of the previous segment, so that the loads overlap its epilogue, or at the start of
/// the CTA's first segment.
template <typename Element, typename QStored, int kBoxes, bool kFp8>
__device__ __forceinline__ void start_segment_loads(SharedStorage& smem, const DecodeParams& p, const RowMap& rows_map,
                                                    const KvSource<kBoxes, kFp8>& src, const Segment& seg, int req,
                                                    int row0, bool q_vec16) {
  if (threadIdx.x < kBoxes) {
    src.template load<0, Traits::kColBlocks>(smem.kv[0], smem.kv_bar[0], segment_tile<kBoxes>(p, seg, req, 0));
    src.template load<0, Traits::kColBlocks>(smem.kv[1], smem.kv_bar[1], segment_tile<kBoxes>(p, seg, req, 1));
  }
  start_q_load<Element, QStored>(smem.q, p, rows_map, req, row0, q_vec16);
}

/// kBoxes: pages per 64-token tile (tile_boxes(p.page_size)): 1 for pages of 64 tokens or more.
/// Element: the multiplied type and out's; KvStored / QStored: how k_cache and q are stored
/// (Element, or Fp8E4M3: common/fp8.cuh).
template <typename Element, int kBoxes, typename KvStored = Element, typename QStored = Element>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap kv_map, const bool q_vec16) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  trace_cta(false);
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int warpgroup = threadIdx.x / Traits::kWarpgroupThreads;
  const int lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int b = 0; b < Traits::kColBlocks; ++b) {
      TxBarrier::init(&smem.kv_bar[0][b], 1);
      TxBarrier::init(&smem.kv_bar[1][b], 1);
    }
#pragma unroll
    for (int h = 0; h < kHandoffs; ++h) cutlass::arch::ClusterBarrier::init(&smem.handoff[h], Traits::kWarpgroupThreads);
    cutlass::arch::fence_barrier_init();
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&kv_map)) : "memory");
  }
  __syncthreads();
  wait_for_prior_grid();  // a programmatic dependent launch (launch_sm90)

  const CtaWork work = CtaWork::of<Traits::kBlockM>(p);
  const RowMap& rows_map = work.rows_map;
  const int row0 = work.row0, first_req = work.first_req, last_req = work.last_req;
  const int32_t* meta = work.meta;
  const KvSource<kBoxes, kIsFp8<KvStored>> src{&kv_map, rows_map.kv_head, kv_cache_policy()};
  // FP8 inputs are widened exactly up to fp8_widen_scale(): the descales and that factor scale
  // the scores and O once.
  const float value_scale = input_scale<KvStored>(p.descale_k);
  const float scale_log2 = p.softmax_scale * input_scale<QStored>(p.descale_q) * value_scale * float(M_LOG2E);

  WarpgroupState st;
  st.row = 16 * ((threadIdx.x / 32) % 4) + lane / 4;
  uint32_t phase = 0;       // of this warpgroup's KV buffer barriers
  uint32_t pairs_done = 0;  // tile pairs of all segments so far: the hand-offs' phase parity

  bool loads_started = false;  // the segment's first tiles and Q were requested by the previous one
  for (int req = first_req; req <= last_req; ++req) {
    const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + st.row + 8 * i;
      st.limit[i] = min(seg.last_visible(p, r < rows_map.rows, rows_map.token(r)), seg.n_hi - 1);
    }
#pragma unroll
    for (int j = 0; j < Traits::kOTiles; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;
    st.sum[0] = st.sum[1] = 0.f;

    const int seg_slot = req - first_req;
    trace_segment(seg_slot, kSegTop);
    __syncthreads();  // the previous segment is done with Q, the KV buffers and the row statistics
    if (seg.n_tiles > 0) {
      if (!loads_started) start_segment_loads<Element, QStored>(smem, p, rows_map, src, seg, req, row0, q_vec16);
      if (threadIdx.x < Traits::kBlockM) smem.row_max[threadIdx.x] = -INFINITY;
      sm80::cp_async_wait_all();
      fence_to_async_proxy();
      __syncthreads();
      trace_segment(seg_slot, kSegReady);

      // S of the first pair: each warpgroup its own tile.
      uint8_t* kv = smem.kv[warpgroup];
      fence_accumulators(st.s);
      cute::warpgroup_arrive();
      issue_qk<Element, kIsFp8<KvStored>, 0, Traits::kColBlocks, true>(
          desc_k_major(smem_addr(smem.q)), desc_k_major(smem_addr(kv)), kv, smem.kv_bar[warpgroup], phase, st.s,
          warpgroup == 0 ? kWarpgroup0 : kWarpgroup1);
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
      fence_accumulators(st.s);
      phase ^= 1;
      trace_segment(seg_slot, kSegFirstS);

      const int n_pairs = (seg.n_tiles + 1) / 2;
      const auto pair_info = [&](int pair_idx) {
        PairInfo pair;
        pair.parity = (pairs_done + pair_idx) & 1;
        pair.slot = pairs_done + pair_idx;
        pair.n0 = seg.n_lo + 2 * pair_idx * Traits::kBlockN;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          pair.valid[i] = min(seg.n_hi - (pair.n0 + i * Traits::kBlockN), Traits::kBlockN);
          // Every thread loads its lane's box (one or two transactions per warp), only the loader
          // lanes use it: a load by those lanes alone would put a divergent branch into every pair.
          pair.next[i] = segment_tile<kBoxes>(p, seg, req, 2 * pair_idx + 2 + i);
        }
        return pair;
      };
      // Pairs whose keys every valid row of the tile sees (so both tiles are whole, too) run
      // without masking code: the first valid row has the smallest limit (tokens grow with the
      // packed row). The pairs after them, and the last one, are boundary pairs.
      const int first_limit = min(seg.last_visible(p, true, rows_map.token(row0)), seg.n_hi - 1);
      const int inner_pairs = min(max(first_limit - seg.n_lo + 1, 0) / (2 * Traits::kBlockN), n_pairs - 1);
      int pair_idx = 0;
      if (warpgroup == 0) {
        for (; pair_idx < inner_pairs; ++pair_idx) {
          even_warpgroup_pair<Element, true, false>(smem, st, pair_info(pair_idx), src, scale_log2, phase);
        }
        for (; pair_idx + 1 < n_pairs; ++pair_idx) {
          even_warpgroup_pair<Element, true, true>(smem, st, pair_info(pair_idx), src, scale_log2, phase);
        }
        even_warpgroup_pair<Element, false, true>(smem, st, pair_info(n_pairs - 1), src, scale_log2, phase);
      } else {
        for (; pair_idx < inner_pairs; ++pair_idx) {
          odd_warpgroup_pair<Element, true, false>(smem, st, pair_info(pair_idx), src, scale_log2, phase);
        }
        for (; pair_idx + 1 < n_pairs; ++pair_idx) {
          odd_warpgroup_pair<Element, true, true>(smem, st, pair_info(pair_idx), src, scale_log2, phase);
        }
        odd_warpgroup_pair<Element, false, true>(smem, st, pair_info(n_pairs - 1), src, scale_log2, phase);
      }
      pairs_done += n_pairs;
      trace_segment(seg_slot, kSegPairsDone);
    }

    // Full row sums: reduce over the quad, then add the other warpgroup's share.
    float row_sum[2], row_max[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) row_sum[i] = quad_sum(st.sum[i]);
    if (lane % 4 == 0) {
      smem.row_sum[warpgroup][st.row] = row_sum[0];
      smem.row_sum[warpgroup][st.row + 8] = row_sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[i] = smem.row_sum[0][st.row + 8 * i] + smem.row_sum[1][st.row + 8 * i];
      row_max[i] = seg.n_tiles > 0 ? smem.row_max[st.row + 8 * i] : -INFINITY;
    }
    trace_segment(seg_slot, kSegSummed);
    // Every wgmma of the segment has completed: Q and both KV buffers are free. The next segment's
    // Q starts loading now; each warpgroup stages its O in its own KV buffer and, once the copy
    // engine has read it, requests its tile of the next segment. The stores drain meanwhile.
    Segment next{};
    const bool next_loads = req < last_req && (next = Segment::of<Traits::kBlockN>(p, meta, req + 1)).n_tiles > 0;
    if (next_loads) start_q_load<Element, QStored>(smem.q, p, rows_map, req + 1, row0, q_vec16);
    if constexpr (kIsFp8<KvStored>) {
#pragma unroll
      for (int j = 0; j < Traits::kOTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st.o[j][e] *= value_scale;
      }
    }
    const int split = req == meta[0] ? meta[4] : 0;
    store_segment_async<Element>(smem.kv[warpgroup], p, rows_map, req, split, row0, st.row,
                                 warpgroup * Traits::kDvPerWarpgroup, st.o, row_max, row_sum,
                                 warpgroup == 0 ? kWarpgroup0 : kWarpgroup1);
    if (next_loads && src.loader()) {
      src.template load<0, Traits::kColBlocks>(smem.kv[warpgroup], smem.kv_bar[warpgroup],
                                               segment_tile<kBoxes>(p, next, req + 1, warpgroup));
    }
    loads_started = next_loads;
    trace_segment(seg_slot, kSegStored);
  }
  bulk_wait_all();  // the output rows this thread handed to the copy engine are written
  trace_cta(true);
#endif
}

}  // namespace flash_mla::sm90
