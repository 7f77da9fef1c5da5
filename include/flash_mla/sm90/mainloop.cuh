// The seesaw main loop: one tile pair per call, one function per warpgroup.
//
// Per pair (even tile in kv[0], owned by wg0; odd tile in kv[1], owned by wg1), with S of both
// tiles already in the owners' registers:
//   wg0: fold S0 into the maxima                        -> kMax0Ready
//        O_L = O_L * f0 + P0 V0_L  (P0 from registers)
//        wait kMax1Ready; once V0_L is read, refill kv[0] blocks 0-3 with the next even tile
//        store P0 * f1                                   -> kP0Ready
//        wait kP1Ready; O_L = O_L * f1 + P1 V1_L  (P1 from shared memory)
//        S0 of the next pair: blocks 0-3, refill kv[1] blocks 0-3 and 8 once V1_L and P1 are
//        read, blocks 4-8
//   wg1: wait kMax0Ready; fold S1 into the maxima        -> kMax1Ready
//        store P1 over kv[1]'s RoPE block (S1 no longer needs it)
//        O_R = O_R * f0 * f1 + P1 V1_R  (registers)
//        wait kP0Ready; O_R += (P0 * f1) V0_R  (shared memory) -> kP1Ready (after both issues)
//        refill kv[1] blocks 4-7 and kv[0] blocks 4-8 as the two products finish; S1 of the
//        next pair
// f0, f1: the factors by which the maxima of the even / odd tile scale older terms. Each
// warpgroup's softmax runs while the other's products keep the tensor cores busy, and the odd
// tile's V_R is read first so that its refill starts early. A pair past the end of the segment
// (odd tile count) has a zero tile (TMA fills boxes outside the cache with zeros) whose keys are
// all masked: P1 = 0 and f1 = 1.
#pragma once

#include <cuda.h>

#include <cutlass/arch/barrier.h>

#include "../common/softmax.cuh"
#include "fp8_widen.cuh"
#include "softmax.cuh"
#include "sync.cuh"
#include "tma.hpp"
#include "trace.cuh"
#include "traits.hpp"
#include "wgmma.cuh"

namespace flash_mla::sm90 {

using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

/// Producer side of a hand-off: every thread of the warpgroup arrives (release).
__device__ __forceinline__ void handoff_arrive(SharedStorage& smem, Handoff h) {
  cutlass::arch::ClusterBarrier::arrive(&smem.handoff[h]);
}

/// Consumer side: waits until the hand-off of this pair (phase parity `parity`) completed. The
/// wgmma fence after the wait loop keeps ptxas from inserting its own in a divergent path (which
/// serialises every wgmma of the kernel, warning C7520).
__device__ __forceinline__ void handoff_wait(SharedStorage& smem, Handoff h, uint32_t parity) {
  cutlass::arch::ClusterBarrier::wait(&smem.handoff[h], parity);
  cute::warpgroup_arrive();
}


/// Where the KV tiles come from: blocks [kFrom, kTo) of a tile into a buffer, each block
/// completing its own barrier. A tile of kBoxes pages is loaded by kBoxes threads (lanes 0 ..
/// kBoxes - 1 of a warp), each issuing the TMA boxes of its own page: as many instructions per
/// thread as for one 64-token page. kFp8: the cache is FP8; the blocks' raw bytes land as
/// fp8_widen.cuh lays them out (block pairs), each completing the barrier of its landing block.
template <int kBoxes, bool kFp8_ = false>
struct KvSource {
  static constexpr bool kFp8 = kFp8_;
  const CUtensorMap* map;
  int kv_head;
  uint64_t cache_policy;

  /// Whether the calling thread is one of the loaders of its warpgroup.
  __device__ __forceinline__ static bool loader() { return threadIdx.x % Traits::kWarpgroupThreads < kBoxes; }

  /// Called by the kBoxes loader lanes together; `box`: the calling lane's box of the tile.
  template <int kFrom, int kTo>
  __device__ __forceinline__ void load(uint8_t* kv, uint64_t* bars, const BoxPage& box) const {
    // A small page fills 64 / kBoxes rows of each block: 2 or 4 KB, a multiple of the 1 KB
    // swizzle period, so its box lands in the same layout as a whole 64-token box.
    constexpr int kBoxBytes = Traits::kColBlockBytes / kBoxes;
    const int j = threadIdx.x % kBoxes;
    if constexpr (kFp8) {
      static_assert(kFrom % 4 == 0 && (kTo % 4 == 0 || kTo == Traits::kColBlocks), "FP8 loads whole block pairs");
      constexpr int kFp8To = kTo == Traits::kColBlocks ? 5 : kTo / 2;
#pragma unroll
      for (int f = kFrom / 2; f < kFp8To; ++f) {  // FP8 block f: channels 128 f .. 128 f + 127
        uint64_t* bar = &bars[fp8_slot(f)];
        if (j == 0) TxBarrier::arrive_and_expect_tx(bar, Traits::kColBlockBytes);
        tma_load_kv_box(kv + fp8_slot(f) * Traits::kColBlockBytes + j * kBoxBytes, map, bar, 128 * f, kv_head,
                        box.token0, box.page, cache_policy);
      }
    } else {
#pragma unroll
      for (int b = kFrom; b < kTo; ++b) {
        if (j == 0) TxBarrier::arrive_and_expect_tx(&bars[b], Traits::kColBlockBytes);
        tma_load_kv_box(kv + b * Traits::kColBlockBytes + j * kBoxBytes, map, &bars[b], 64 * b, kv_head, box.token0,
                        box.page, cache_policy);
      }
    }
  }
};

/// What a pair step needs to know of its tiles.
struct PairInfo {
  int n0;              // first token of the even tile
  int valid[2];        // tokens of each tile inside the segment (<= 0: a zero tile)
  BoxPage next[2];     // the calling thread's box of the next pair's tiles, if any (page -1: zeros)
  uint32_t parity;     // phase parity of this pair's hand-offs
  int slot;            // pairs before this one in the CTA (trace.cuh)
};

/// S (+)= Q K^T over 64-column blocks [kFrom, kTo) of a landed, 16-bit KV buffer (descriptor
/// `kv`), no barrier waits.
template <typename Element, int kFrom, int kTo, bool kZeroInit>
__device__ __forceinline__ void issue_qk_blocks(uint64_t q, uint64_t kv, float (&s)[Traits::kSTiles][4]) {
#pragma unroll
  for (int b = kFrom; b < kTo; ++b) {
#pragma unroll
    for (int k = 0; k < Traits::kKSteps; ++k) {
      const uint32_t offset = b * Traits::kColBlockBytes + kmajor_step(k);
      mma<Element, Major::K>(desc_at(q, offset), desc_at(kv, offset), s, !(kZeroInit && b == kFrom && k == 0));
    }
  }
}

/// S (+)= Q K^T over the 64-column blocks [kFrom, kTo) of the KV buffer `kv_ptr` (descriptor
/// `kv`), each issued as soon as its barrier completes. kFp8: the range's FP8 blocks are first
/// widened by the calling warpgroup (fp8_widen.cuh; named barrier `warpgroup_barrier`), all of
/// them before the range's products.
template <typename Element, bool kFp8, int kFrom, int kTo, bool kZeroInit>
__device__ __forceinline__ void issue_qk(uint64_t q, uint64_t kv, uint8_t* kv_ptr, uint64_t* bars, uint32_t phase,
                                         float (&s)[Traits::kSTiles][4], int warpgroup_barrier) {
  if constexpr (kFp8) {
    widen_fp8_blocks<Element, kFrom, kTo>(kv_ptr, bars, phase, warpgroup_barrier);
    cute::warpgroup_arrive();
    issue_qk_blocks<Element, kFrom, kTo, kZeroInit>(q, kv, s);
  } else if constexpr (kFrom < kTo) {
    TxBarrier::wait(&bars[kFrom], phase);
    cute::warpgroup_arrive();  // explicit after the wait loop, or ptxas serialises the wgmma chain
    issue_qk_blocks<Element, kFrom, kFrom + 1, kZeroInit>(q, kv, s);
    issue_qk<Element, false, kFrom + 1, kTo, false>(q, kv, kv_ptr, bars, phase, s, warpgroup_barrier);
  }
}

/// Zeroes tokens [valid, 64) of V blocks [kFrom, kTo) of a landed tile (slots past the length may
/// hold NaN, and P = 0 times NaN is NaN), visible to this warpgroup's wgmma afterwards.
template <int kFrom, int kTo>
__device__ __forceinline__ void zero_tail(uint8_t* kv, int valid, int warpgroup_barrier) {
  if (valid <= 0 || valid >= Traits::kBlockN) return;  // whole tile, or a zero tile
  constexpr int kChunks = (kTo - kFrom) * 8;              // 16-byte chunks per token
  for (int idx = threadIdx.x % Traits::kWarpgroupThreads; idx < (Traits::kBlockN - valid) * kChunks;
       idx += Traits::kWarpgroupThreads) {
    const int token = valid + idx / kChunks, c = idx % kChunks;
    *reinterpret_cast<uint4*>(kv + (kFrom + c / 8) * Traits::kColBlockBytes + token * 128 + (c % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
  fence_to_async_proxy();
  bar_sync(warpgroup_barrier, Traits::kWarpgroupThreads);
}

/// Per-thread state of a warpgroup across a segment.
struct WarpgroupState {
  float o[Traits::kOTiles][4];        // this warpgroup's 256 channels of O, rows row and row + 8
  float s[Traits::kSTiles][4];        // S, then P, of the tile this warpgroup owns
  float sum[2];                       // this thread's share of the row sums
  int limit[2];                       // last visible key of the two rows (clipped to the segment)
  int row;                            // the thread's first local row
};

/// Closes a pair: waits for the warpgroup's last wgmma group (the next pair's S, if any).
template <bool kHasNext>
__device__ __forceinline__ void finish_pair(WarpgroupState& st, uint32_t& phase) {
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  fence_accumulators(st.o);
  fence_accumulators(st.s);
  if constexpr (kHasNext) phase ^= 1;  // the buffer's barriers completed one more phase
}

/// kHasNext: another pair follows in the segment (compile-time: a wgmma issued under a runtime
/// condition makes ptxas serialise every wgmma of the kernel). kBoundary: some row may not see
/// every key of the pair, or a tile is partial or a zero tile (masking and V tail zeroing);
/// false for the pairs inside the segment, whose code then has no branch but the refills'.
template <typename Element, bool kHasNext, bool kBoundary, typename Source>
__device__ __forceinline__ void even_warpgroup_pair(SharedStorage& smem, WarpgroupState& st, const PairInfo& pair,
                                                    const Source& src, float scale_log2, uint32_t& phase) {
  const bool leader = Source::loader();
  uint8_t* kv0 = smem.kv[0];
  uint8_t* kv1 = smem.kv[1];
  const uint8_t* p1 = kv1 + Traits::kRopeBlock * Traits::kColBlockBytes;

  float tile_max[2], factor[2];
  trace(pair.slot, kTracePairStart);
  page_rowmax<kBoundary>(st.s, scale_log2, pair.n0, st.limit, tile_max);
  fold_page(smem, smem.rescale[0], st.row, st.s, tile_max, scale_log2, factor, st.sum);
  handoff_arrive(smem, kMax0Ready);
  trace(pair.slot, kTraceMaxPublished);
  rescale_rows(st.o, factor);

  AFrag p[Traits::kKSteps];
  to_a_fragments<Element>(st.s, p);
  if constexpr (kBoundary) zero_tail<0, Traits::kVBlocksPerWarpgroup>(kv0, pair.valid[0], kWarpgroup0);
  fence_fragments(p);
  fence_accumulators(st.o);
  cute::warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    mma<Element, Major::MN>(p[k], desc_at(desc_v(smem_addr(kv0)), v_step(k)), st.o, true);
  }
  cute::warpgroup_commit_batch();
  trace(pair.slot, kTraceOwnPvIssued);

  handoff_wait(smem, kMax1Ready, pair.parity);  // S1 is done and f1 is published
  trace(pair.slot, kTraceOtherReady);
  if constexpr (kBoundary) zero_tail<0, Traits::kVBlocksPerWarpgroup>(kv1, pair.valid[1], kWarpgroup0);
#pragma unroll
  for (int i = 0; i < 2; ++i) factor[i] = smem.rescale[1][st.row + 8 * i];
  rescale_rows(st.s, factor);
  store_a_operand<Element>(smem.p0, st.row, st.s);
  fence_to_async_proxy();
  handoff_arrive(smem, kP0Ready);
  trace(pair.slot, kTracePStored);
  cute::warpgroup_wait<0>();
  fence_accumulators(st.o);
  fence_fragments(p);
  trace(pair.slot, kTraceOwnPvDone);
  if (kHasNext && leader) src.template load<0, Traits::kVBlocksPerWarpgroup>(kv0, smem.kv_bar[0], pair.next[0]);
  rescale_rows(st.o, factor);
#pragma unroll
  for (int i = 0; i < 2; ++i) st.sum[i] *= factor[i];

  handoff_wait(smem, kP1Ready, pair.parity);
  trace(pair.slot, kTraceRemoteReady);
  fence_accumulators(st.o);
  fence_accumulators(st.s);
  cute::warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    mma<Element, Major::MN>(desc_at(desc_k_major(smem_addr(p1)), kmajor_step(k)), desc_at(desc_v(smem_addr(kv1)), v_step(k)),
                            st.o, true);
  }
  cute::warpgroup_commit_batch();
  const uint64_t q_desc = desc_k_major(smem_addr(smem.q)), k_desc = desc_k_major(smem_addr(kv0));
  if constexpr (kHasNext) {
    issue_qk<Element, Source::kFp8, 0, Traits::kVBlocksPerWarpgroup, true>(q_desc, k_desc, kv0, smem.kv_bar[0], phase,
                                                                            st.s, kWarpgroup0);
  }
  cute::warpgroup_commit_batch();
  trace(pair.slot, kTraceSFirstIssued);
  cute::warpgroup_wait<1>();  // V1_L and P1 read: kv[1] blocks 0-3 and 8 may be refilled
  if (kHasNext && leader) {
    src.template load<0, Traits::kVBlocksPerWarpgroup>(kv1, smem.kv_bar[1], pair.next[1]);
    src.template load<Traits::kRopeBlock, Traits::kColBlocks>(kv1, smem.kv_bar[1], pair.next[1]);
  }
  trace(pair.slot, kTraceRefillIssued);
  if constexpr (kHasNext) {
    issue_qk<Element, Source::kFp8, Traits::kVBlocksPerWarpgroup, Traits::kColBlocks, false>(
        q_desc, k_desc, kv0, smem.kv_bar[0], phase, st.s, kWarpgroup0);
  }
  trace(pair.slot, kTraceSIssued);
  finish_pair<kHasNext>(st, phase);
  trace(pair.slot, kTracePairEnd);
}

template <typename Element, bool kHasNext, bool kBoundary, typename Source>
__device__ __forceinline__ void odd_warpgroup_pair(SharedStorage& smem, WarpgroupState& st, const PairInfo& pair,
                                                   const Source& src, float scale_log2, uint32_t& phase) {
  const bool leader = Source::loader();
  uint8_t* kv0 = smem.kv[0];
  uint8_t* kv1 = smem.kv[1];
  uint8_t* v0 = kv0 + Traits::kVBlocksPerWarpgroup * Traits::kColBlockBytes;  // V0_R
  uint8_t* v1 = kv1 + Traits::kVBlocksPerWarpgroup * Traits::kColBlockBytes;  // V1_R
  uint8_t* p1 = kv1 + Traits::kRopeBlock * Traits::kColBlockBytes;

  float tile_max[2], factor[2], f0[2];
  trace(pair.slot, kTracePairStart);
  page_rowmax<kBoundary>(st.s, scale_log2, pair.n0 + Traits::kBlockN, st.limit, tile_max);
  handoff_wait(smem, kMax0Ready, pair.parity);  // S0 done, f0 and the maxima after the even tile
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    f0[i] = smem.rescale[0][st.row + 8 * i];
    st.sum[i] *= f0[i];
  }
  fold_page(smem, smem.rescale[1], st.row, st.s, tile_max, scale_log2, factor, st.sum);
  handoff_arrive(smem, kMax1Ready);
  trace(pair.slot, kTraceMaxPublished);
#pragma unroll
  for (int i = 0; i < 2; ++i) f0[i] *= factor[i];
  rescale_rows(st.o, f0);

  AFrag p[Traits::kKSteps];
  to_a_fragments<Element>(st.s, p);
  store_a_fragments(p1, st.row, p);
  fence_to_async_proxy();  // P1 is read by wg0's wgmma after kP1Ready
  if constexpr (kBoundary) zero_tail<Traits::kVBlocksPerWarpgroup, 2 * Traits::kVBlocksPerWarpgroup>(kv1, pair.valid[1], kWarpgroup1);
  if constexpr (kBoundary) zero_tail<Traits::kVBlocksPerWarpgroup, 2 * Traits::kVBlocksPerWarpgroup>(kv0, pair.valid[0], kWarpgroup1);
  fence_fragments(p);
  fence_accumulators(st.o);
  cute::warpgroup_arrive();
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    mma<Element, Major::MN>(p[k], desc_at(desc_v(smem_addr(v1)), v_step(k)), st.o, true);
  }
  cute::warpgroup_commit_batch();
  trace(pair.slot, kTraceOwnPvIssued);

  handoff_wait(smem, kP0Ready, pair.parity);
  trace(pair.slot, kTraceOtherReady);
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    mma<Element, Major::MN>(desc_at(desc_k_major(smem_addr(smem.p0)), kmajor_step(k)),
                            desc_at(desc_v(smem_addr(v0)), v_step(k)), st.o, true);
  }
  cute::warpgroup_commit_batch();
  // P1 is announced only now, so that this warpgroup's two products reach the tensor cores before
  // wg0's P1 V1_L: the refills they gate (kv[1] blocks 4-7, kv[0] blocks 4-8) start earlier.
  handoff_arrive(smem, kP1Ready);
  trace(pair.slot, kTracePStored);

  cute::warpgroup_wait<1>();  // V1_R read: kv[1] blocks 4-7 may be refilled (8 holds P1 until wg0 read it)
  fence_fragments(p);
  trace(pair.slot, kTraceOwnPvDone);
  if (kHasNext && leader) {
    src.template load<Traits::kVBlocksPerWarpgroup, Traits::kRopeBlock>(kv1, smem.kv_bar[1], pair.next[1]);
  }
  cute::warpgroup_wait<0>();  // V0_R and P0 read
  fence_accumulators(st.o);
  trace(pair.slot, kTraceRemoteReady);
  if (kHasNext && leader) {
    src.template load<Traits::kVBlocksPerWarpgroup, Traits::kColBlocks>(kv0, smem.kv_bar[0], pair.next[0]);
  }

  fence_accumulators(st.s);
  cute::warpgroup_arrive();
  if constexpr (kHasNext) {
    // Blocks in the order their refills were issued: 4-7 here, 0-3 and 8 by wg0.
    const uint64_t q_desc = desc_k_major(smem_addr(smem.q)), k_desc = desc_k_major(smem_addr(kv1));
    uint64_t* bars = smem.kv_bar[1];
    constexpr bool kFp8 = Source::kFp8;
    issue_qk<Element, kFp8, Traits::kVBlocksPerWarpgroup, Traits::kRopeBlock, true>(q_desc, k_desc, kv1, bars, phase,
                                                                                   st.s, kWarpgroup1);
    trace(pair.slot, kTraceSFirstIssued);
    issue_qk<Element, kFp8, 0, Traits::kVBlocksPerWarpgroup, false>(q_desc, k_desc, kv1, bars, phase, st.s,
                                                                    kWarpgroup1);
    issue_qk<Element, kFp8, Traits::kRopeBlock, Traits::kColBlocks, false>(q_desc, k_desc, kv1, bars, phase, st.s,
                                                                          kWarpgroup1);
  }
  trace(pair.slot, kTraceSIssued);
  finish_pair<kHasNext>(st, phase);
  trace(pair.slot, kTracePairEnd);
}

}  // namespace flash_mla::sm90
