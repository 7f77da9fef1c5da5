// The Hopper (sm_90a) token-sparse decode kernel. Same plan, grid and outputs as the portable
// kernel running sparse::IndexedKvTiles: one plan request per query token, its keys the tokens
// its index rows select; 64 query rows per CTA.
//
// Three warpgroups, one role each:
//   producer (wg2)  gathers a 64-key tile into registers (sparse_gather.cuh), waits for a free
//                   buffer, widens the tile into it with the keys' validity (ballot bits, one
//                   16-byte read for the softmax) -> k_ready; a bf16 format is copied into the
//                   tile by cp.async instead (produce_copies), whose completion arrives on k_ready
//   softmax  (wg0)  S = Q K^T over the whole tile (wgmma 64x64, Q and K from shared memory),
//                   masks skipped keys, online softmax; P into the tile's RoPE block (no longer
//                   needed once S is done) and the rescale factor (with the segment's final row
//                   statistics on its last tile) -> p_ready; then
//                   O[:, 0:256] = O * f + P V[:, 0:256] with P from registers, and S of the next
//                   tile issued behind it
//   pv       (wg1)  on p_ready: O[:, 256:512] = O * f + P V[:, 256:512] with P from shared memory
// A buffer is free again (k_free) once both products that read its V have completed. Two tile
// buffers, Q, and nothing else: 216 KB of the 227 KB.
#pragma once

#include <cuda.h>

#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../common/epilogue.cuh"
#include "../common/q_chunk.cuh"
#include "../common/segment.cuh"
#include "../common/softmax.cuh"
#include "../params.hpp"
#include "../sm80/ptx.cuh"
#include "../sparse/indexed_kv.cuh"
#include "sparse_gather.cuh"
#include "sync.cuh"
#include "traits.hpp"
#include "wgmma.cuh"

namespace flash_mla::sm90 {

struct SparseTraits {
  static constexpr int kThreads = 3 * Traits::kWarpgroupThreads;
  // Registers per thread after setmaxnreg: the softmax warpgroup holds S, P and half of O; the
  // pv warpgroup half of O; the producer a tile's share of records. setmaxnreg only moves
  // registers between the warpgroups of the CTA: the sum stays within the launch allotment of
  // 168 a thread (64K / 384, rounded down to a multiple of 8); a larger sum never completes.
  static constexpr int kLaunchRegs = 168;
  static constexpr int kSoftmaxRegs = 224;
  static constexpr int kProducerRegs = 120;
  static constexpr int kPvRegs = 160;
  static_assert(kSoftmaxRegs + kProducerRegs + kPvRegs <= 3 * kLaunchRegs, "registers of the CTA");
};

/// Named barriers (0 is __syncthreads).
enum SparseBarrier : int {
  kSoftmaxGroup = 1,  // the softmax warpgroup alone (Q loaded)
};

struct alignas(1024) SparseSharedStorage {
  alignas(1024) uint8_t q[Traits::kTileBytes];
  // Block kRopeBlock of a tile holds its P (64 x 64) once S of the tile is done.
  alignas(1024) uint8_t kv[2][Traits::kTileBytes];
  float rescale[2][Traits::kBlockM];  // per buffer: the factor its tile's maxima scale older terms by
  // Per buffer, set with the last tile of a segment: its final row maxima (log2 domain) and sums,
  // for the pv warpgroup (handed over by p_ready, like the factor).
  float row_max[2][Traits::kBlockM];
  float row_sum[2][Traits::kBlockM];
  // Per buffer, the keys that are selected, valid tokens, from the producers' ballots: bit 2 k of
  // word w is key 16 w + k (odd bits are not read), read with one 16-byte load.
  alignas(16) uint32_t key_lanes[2][Traits::kBlockN / 16];
  uint64_t k_ready[2], k_free[2], p_ready[2];
};

constexpr int kSparseSmemBytes = static_cast<int>(sizeof(SparseSharedStorage));
static_assert(kSparseSmemBytes <= 232448, "exceeds the 227 KB of shared memory an sm_90 block may use");

namespace sparse_detail {

using Bar = cutlass::arch::ClusterBarrier;


/// Waits for the phase of parity `parity` of `bar`; the wgmma fence after the wait loop keeps
/// ptxas from inserting its own in a divergent path (which serialises every wgmma).
__device__ __forceinline__ void wait_then_arrive_wgmma(uint64_t* bar, uint32_t parity) {
  Bar::wait(bar, parity);
  cute::warpgroup_arrive();
}

/// Tile `it` of the CTA (counted over all its segments) uses buffer it % 2 and phase (it / 2) % 2.
struct TileSlot {
  int buf;
  uint32_t parity;
  __device__ explicit TileSlot(uint32_t it) : buf(it & 1), parity((it >> 1) & 1) {}
};

/// S = Q K^T of a landed tile: 9 column blocks x 4 k16 steps.
__device__ __forceinline__ void issue_qk(const uint8_t* q, const uint8_t* kv, float (&s)[Traits::kSTiles][4]) {
  const uint64_t q_desc = desc_k_major(smem_addr(q)), k_desc = desc_k_major(smem_addr(kv));
#pragma unroll
  for (int b = 0; b < Traits::kColBlocks; ++b) {
#pragma unroll
    for (int k = 0; k < Traits::kKSteps; ++k) {
      const uint32_t offset = b * Traits::kColBlockBytes + kmajor_step(k);
      mma<__nv_bfloat16, Major::K>(desc_at(q_desc, offset), desc_at(k_desc, offset), s, b > 0 || k > 0);
    }
  }
}

/// The producer's walk over the CTA's segments: body(seg, keys) for each one with tiles, in order.
template <typename Body>
__device__ __forceinline__ void for_each_producer_segment(const DecodeParams& p, const sparse::IndexedKvParams& kp,
                                                          const int32_t* meta, int first_req, int last_req,
                                                          Body&& body) {
  for (int req = first_req; req <= last_req; ++req) {
    const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
    if (seg.n_tiles <= 0) continue;
    body(seg, sparse::SelectedKeys(kp, req, seg));
  }
}

/// The record of key j of a segment (its index entry idx), and whether it is read: a selected,
/// valid token before the segment's end (a skipped key's address is readable but not read).
__device__ __forceinline__ const uint8_t* segment_record(const sparse::SelectedKeys& keys, const Segment& seg, int j,
                                                         int idx, bool& valid) {
  const SparseKvCache* kc;
  const sparse::TokenAddress at = keys.address(j, idx, kc);
  valid = at.valid && j < seg.n_hi;
  return at.page + static_cast<int64_t>(at.slot) * kc->token_stride;
}

/// Bits 0..7 of `bits` at the even positions of a 16-bit value (bit k -> bit 2 k).
__device__ __forceinline__ uint32_t spread_to_even_bits(uint32_t bits) {
  bits &= 0xffu;
  bits = (bits | (bits << 4)) & 0x0f0fu;
  bits = (bits | (bits << 2)) & 0x3333u;
  return (bits | (bits << 1)) & 0x5555u;
}

/// The producer warpgroup for a widened format (TokenRegisters, four threads a key): a tile is
/// two rounds of 32 keys, key 8 w + (lane % 8) + 32 r of round r in warp w, read by lanes
/// (lane % 8) + 8 q. All of a tile's records are read into registers before the wait for a free
/// buffer, so their latency passes during that wait; the index entries are read two tiles ahead.
/// (An L2 prefetch of the next tile's records measured slower once the loads keep their lines.)
template <typename Format>
__device__ void produce(SparseSharedStorage& smem, const DecodeParams& p, const sparse::IndexedKvParams& kp,
                        const int32_t* meta, int first_req, int last_req) {
  using Regs = TokenRegisters<Format>;
  static_assert(Regs::kLanesPerKey == 4, "eight keys a warp a round");
  constexpr int kRounds = Traits::kBlockN * Regs::kLanesPerKey / Traits::kWarpgroupThreads;  // 2
  constexpr int kKeysPerRound = Traits::kBlockN / kRounds;                                  // 32
  const int t = threadIdx.x % Traits::kWarpgroupThreads, lane = t % 32, q = lane / 8;
  const int key0 = 8 * (t / 32) + lane % 8;  // the key of round 0
  uint32_t it = 0;
  for_each_producer_segment(p, kp, meta, first_req, last_req, [&](const Segment& seg, const sparse::SelectedKeys& keys) {
    const auto key_of = [&](int i, int r) { return seg.n_lo + i * Traits::kBlockN + key0 + kKeysPerRound * r; };
    const auto entry_of = [&](int i, int r) { return i < seg.n_tiles ? keys.index_entry(key_of(i, r)) : -1; };
    int idx[kRounds], next_idx[kRounds];  // index entries of tiles i, i + 1
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      idx[r] = entry_of(0, r);
      next_idx[r] = entry_of(1, r);
    }
    for (int i = 0; i < seg.n_tiles; ++i, ++it) {
      Regs regs[kRounds];
      bool valid[kRounds];
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const uint8_t* record = segment_record(keys, seg, key_of(i, r), idx[r], valid[r]);
        regs[r].load(record, q, valid[r]);
      }
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {  // tile i + 2's entries, read behind this tile's loads
        idx[r] = next_idx[r];
        next_idx[r] = entry_of(i + 2, r);
      }
      const TileSlot slot(it);
      Bar::wait(&smem.k_free[slot.buf], slot.parity ^ 1);  // the first use of a buffer passes at once
      uint16_t* const flags = reinterpret_cast<uint16_t*>(smem.key_lanes[slot.buf]);
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        regs[r].store(smem.kv[slot.buf], key0 + kKeysPerRound * r, q);
        // Lanes 0..7 hold keys 8 w + 32 r + 0..7: half-word w + 4 r of the flags.
        const uint32_t lanes = __ballot_sync(0xffffffffu, valid[r]);
        if (lane == 0) flags[t / 32 + 4 * r] = static_cast<uint16_t>(spread_to_even_bits(lanes));
      }
      fence_to_async_proxy();  // the tile is read by wgmma
      Bar::arrive(&smem.k_ready[slot.buf]);
    }
  });
}

/// Formats stored as the tile holds them (bf16 tokens of 576 channels): copied, not widened.
template <typename Format>
constexpr bool kCopiedAsStored = std::is_same_v<Format, sparse::Bf16Tokens<576>>;

/// k_ready arrivals per phase: every producer thread; with copied formats each thread's arrival
/// is its cp.async completion, and each producer warp adds one for its flag word.
template <typename Format>
constexpr int kReadyArrivals = Traits::kWarpgroupThreads + (kCopiedAsStored<Format> ? Traits::kWarpgroupThreads / 32 : 0);

/// The producer warpgroup for a format stored as the tile wants it: no registers and no widening.
/// Two threads a key, each copying alternate 16-byte chunks of the record (so that the two lanes
/// of a key read one 32-byte sector a step) straight into the swizzled tile with cp.async (zero
/// bytes for a skipped key, whose source is not read); the copies' completion arrives on k_ready
/// (cp.async.mbarrier.arrive), so the producer never waits for its loads and the next tile's
/// copies start as soon as a buffer is free.
template <typename Format>
__device__ void produce_copies(SparseSharedStorage& smem, const DecodeParams& p, const sparse::IndexedKvParams& kp,
                               const int32_t* meta, int first_req, int last_req) {
  constexpr int kChunks = Format::kHeadDim / 8;  // 16-byte chunks of a record
  const int t = threadIdx.x % Traits::kWarpgroupThreads, token = t / 2, part = t % 2;
  uint32_t it = 0;
  for_each_producer_segment(p, kp, meta, first_req, last_req, [&](const Segment& seg, const sparse::SelectedKeys& keys) {
    int idx = keys.index_entry(seg.n_lo + token);
    for (int i = 0; i < seg.n_tiles; ++i, ++it) {
      const int j = seg.n_lo + i * Traits::kBlockN + token;
      bool valid;
      const uint8_t* record = segment_record(keys, seg, j, idx, valid);
      if (i + 1 < seg.n_tiles) idx = keys.index_entry(j + Traits::kBlockN);  // read behind this tile's copies
      const TileSlot slot(it);
      Bar::wait(&smem.k_free[slot.buf], slot.parity ^ 1);  // the first use of a buffer passes at once
      uint8_t* tile = smem.kv[slot.buf];
#pragma unroll 6
      for (int c = part; c < kChunks; c += 2) sm80::cp_async_16(tile + Traits::offset(token, 8 * c), record + 16 * c, valid);
      cp_async_arrive_noinc(&smem.k_ready[slot.buf]);
      const uint32_t lanes = __ballot_sync(0xffffffffu, valid);
      if (t % 32 == 0) {
        smem.key_lanes[slot.buf][t / 32] = lanes;
        Bar::arrive(&smem.k_ready[slot.buf]);
      }
    }
  });
}

/// Copies the Q tile of (plan request req, rows row0 ..) into the swizzled layout (cp.async by
/// the softmax warpgroup) and waits until the whole warpgroup's copies are visible to wgmma.
__device__ __forceinline__ void load_q(uint8_t* sq, const DecodeParams& p, const RowMap& rows_map, int req, int row0,
                                       bool q_vec16) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x % Traits::kWarpgroupThreads; idx < Traits::kBlockM * kChunks;
       idx += Traits::kWarpgroupThreads) {
    const int row = idx / kChunks, col = (idx % kChunks) * 8;
    copy_q_chunk<__nv_bfloat16>(reinterpret_cast<__nv_bfloat16*>(sq + Traits::offset(row, col)), p, rows_map, req,
                                row0 + row, col, q_vec16);
  }
  sm80::cp_async_commit();
  sm80::cp_async_wait_all();
  fence_to_async_proxy();
  bar_sync(kSoftmaxGroup, Traits::kWarpgroupThreads);
}

/// Softmax warpgroup state across a segment.
struct SoftmaxState {
  float o[Traits::kOTiles][4];  // O[:, 0:256], rows row and row + 8
  float s[Traits::kSTiles][4];  // S of the tile in hand
  float max[2], sum[2];         // running maxima (log2 domain); this thread's share of the sums,
                                // the full row sums once the segment's last tile is done
  int row;
};

/// One tile of the softmax warpgroup, its S in st.s; kHasNext: S of the next tile is issued
/// behind this tile's P V (compile-time: a wgmma under a runtime condition serialises them all).
template <bool kHasNext>
__device__ __forceinline__ void softmax_tile(SparseSharedStorage& smem, SoftmaxState& st, uint32_t it, float scale_log2) {
  const TileSlot slot(it);
  uint8_t* kv = smem.kv[slot.buf];
  const int tq = threadIdx.x % 4;

  // Skipped keys -> -inf; the tile's row maxima. The thread's columns of block j are keys
  // 8 j + 2 tq and 8 j + 2 tq + 1: bits 4 tq + 16 (j % 2) and 2 above it of word j / 2.
  const uint4 lanes4 = *reinterpret_cast<const uint4*>(smem.key_lanes[slot.buf]);
  const uint32_t lanes[4] = {lanes4.x >> (4 * tq), lanes4.y >> (4 * tq), lanes4.z >> (4 * tq), lanes4.w >> (4 * tq)};
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j) {
    const uint32_t pair = lanes[j / 2] >> (16 * (j % 2));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (((pair >> (2 * (e & 1))) & 1u) == 0) st.s[j][e] = -INFINITY;
    }
    tile_max[0] = fmaxf(tile_max[0], fmaxf(st.s[j][0], st.s[j][1]));
    tile_max[1] = fmaxf(tile_max[1], fmaxf(st.s[j][2], st.s[j][3]));
  }
  float factor[2], offset[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float new_max = fmaxf(st.max[i], quad_max(tile_max[i]) * scale_log2);
    offset[i] = new_max == -INFINITY ? 0.f : new_max;
    factor[i] = fast_exp2(st.max[i] - offset[i]);
    st.max[i] = new_max;
    st.sum[i] *= factor[i];
  }
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      st.s[j][e] = fast_exp2(fmaf(st.s[j][e], scale_log2, -offset[e / 2]));
      st.sum[e / 2] += st.s[j][e];
    }
  }

  // P for the pv warpgroup, with the factor.
  AFrag pf[Traits::kKSteps];
  to_a_fragments<__nv_bfloat16>(st.s, pf);
  store_a_fragments(kv + Traits::kRopeBlock * Traits::kColBlockBytes, st.row, pf);
  if constexpr (!kHasNext) {  // the segment's last tile: its final statistics go with the factor
#pragma unroll
    for (int i = 0; i < 2; ++i) st.sum[i] = quad_sum(st.sum[i]);
    if (tq == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        smem.row_max[slot.buf][st.row + 8 * i] = st.max[i];
        smem.row_sum[slot.buf][st.row + 8 * i] = st.sum[i];
      }
    }
  }
  if (tq == 0) {
    smem.rescale[slot.buf][st.row] = factor[0];
    smem.rescale[slot.buf][st.row + 8] = factor[1];
  }
  fence_to_async_proxy();
  Bar::arrive(&smem.p_ready[slot.buf]);

  rescale_rows(st.o, factor);
  fence_fragments(pf);
  fence_accumulators(st.o);
  cute::warpgroup_arrive();
  const uint64_t v_desc = desc_v(smem_addr(kv));
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) mma<__nv_bfloat16, Major::MN>(pf[k], desc_at(v_desc, v_step(k)), st.o, true);
  cute::warpgroup_commit_batch();
  if constexpr (kHasNext) {
    const TileSlot next(it + 1);
    fence_accumulators(st.s);
    wait_then_arrive_wgmma(&smem.k_ready[next.buf], next.parity);
    issue_qk(smem.q, smem.kv[next.buf], st.s);
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<1>();  // P V done: this warpgroup no longer reads the buffer
  } else {
    cute::warpgroup_wait<0>();
  }
  fence_fragments(pf);
  fence_accumulators(st.o);
  Bar::arrive(&smem.k_free[slot.buf]);
  if constexpr (kHasNext) {
    cute::warpgroup_wait<0>();
    fence_accumulators(st.s);
  }
}

}  // namespace sparse_detail

/// Format: the token format of the caches (sparse/token_formats.cuh): one with a TokenRegisters
/// (gathered into registers and widened), or one copied as stored (kCopiedAsStored).
template <typename Format>
__global__ void __launch_bounds__(SparseTraits::kThreads, 1)
    sparse_decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ sparse::IndexedKvParams kp,
                         const bool q_vec16) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using namespace sparse_detail;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SparseSharedStorage& smem = *reinterpret_cast<SparseSharedStorage*>(smem_raw);
  const int warpgroup = threadIdx.x / Traits::kWarpgroupThreads;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      Bar::init(&smem.k_ready[b], kReadyArrivals<Format>);
      Bar::init(&smem.p_ready[b], Traits::kWarpgroupThreads);
      Bar::init(&smem.k_free[b], 2 * Traits::kWarpgroupThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  wait_for_prior_grid();  // a programmatic dependent launch (launch_sparse_sm90)

  const CtaWork work = CtaWork::of<Traits::kBlockM>(p);
  const RowMap& rows_map = work.rows_map;
  const int row0 = work.row0, first_req = work.first_req, last_req = work.last_req;
  const int32_t* meta = work.meta;

  if (warpgroup == 2) {
    cutlass::arch::warpgroup_reg_dealloc<SparseTraits::kProducerRegs>();
    if constexpr (kCopiedAsStored<Format>) {
      produce_copies<Format>(smem, p, kp, meta, first_req, last_req);
    } else {
      produce<Format>(smem, p, kp, meta, first_req, last_req);
    }
    return;
  }

  const int lane = threadIdx.x % 32;
  const int row = 16 * ((threadIdx.x / 32) % 4) + lane / 4;  // the thread's first local row
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  uint32_t it = 0;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_alloc<SparseTraits::kSoftmaxRegs>();
    SoftmaxState st;
    st.row = row;
    for (int req = first_req; req <= last_req; ++req) {
      const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
#pragma unroll
      for (int j = 0; j < Traits::kOTiles; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;
      st.max[0] = st.max[1] = -INFINITY;
      st.sum[0] = st.sum[1] = 0.f;
      if (seg.n_tiles > 0) {
        load_q(smem.q, p, rows_map, req, row0, q_vec16);
        const TileSlot first(it);
        fence_accumulators(st.s);
        wait_then_arrive_wgmma(&smem.k_ready[first.buf], first.parity);
        issue_qk(smem.q, smem.kv[first.buf], st.s);
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_accumulators(st.s);
        for (int i = 0; i + 1 < seg.n_tiles; ++i, ++it) softmax_tile<true>(smem, st, it, scale_log2);
        softmax_tile<false>(smem, st, it, scale_log2);
        ++it;
      }
      const float row_sum[2] = {st.sum[0], st.sum[1]};  // full sums (0 for a segment without tiles)
      const float row_max[2] = {st.max[0], st.max[1]};
      const int split = req == meta[0] ? meta[4] : 0;
      store_segment<Traits::kOTiles, __nv_bfloat16>(p, rows_map, req, split, row0 + row, 0, st.o, row_max, row_sum, 1.f);
    }
  } else {
    cutlass::arch::warpgroup_reg_dealloc<SparseTraits::kPvRegs>();
    float o[Traits::kOTiles][4];
    for (int req = first_req; req <= last_req; ++req) {
      const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
#pragma unroll
      for (int j = 0; j < Traits::kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // a segment without keys
      for (int i = 0; i < seg.n_tiles; ++i, ++it) {
        const TileSlot slot(it);
        const uint8_t* kv = smem.kv[slot.buf];
        wait_then_arrive_wgmma(&smem.p_ready[slot.buf], slot.parity);
        const float factor[2] = {smem.rescale[slot.buf][row], smem.rescale[slot.buf][row + 8]};
        if (i + 1 == seg.n_tiles) {  // read before k_free: the buffer's next tile rewrites them
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            row_max[h] = smem.row_max[slot.buf][row + 8 * h];
            row_sum[h] = smem.row_sum[slot.buf][row + 8 * h];
          }
        }
        rescale_rows(o, factor);
        fence_accumulators(o);
        cute::warpgroup_arrive();
        const uint64_t p_desc = desc_k_major(smem_addr(kv + Traits::kRopeBlock * Traits::kColBlockBytes));
        const uint64_t v_desc = desc_v(smem_addr(kv + Traits::kVBlocksPerWarpgroup * Traits::kColBlockBytes));
#pragma unroll
        for (int k = 0; k < Traits::kKSteps; ++k) {
          mma<__nv_bfloat16, Major::MN>(desc_at(p_desc, kmajor_step(k)), desc_at(v_desc, v_step(k)), o, true);
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_accumulators(o);
        Bar::arrive(&smem.k_free[slot.buf]);
      }
      const int split = req == meta[0] ? meta[4] : 0;
      store_segment<Traits::kOTiles, __nv_bfloat16>(p, rows_map, req, split, row0 + row, Traits::kDvPerWarpgroup, o,
                                                    row_max, row_sum, 1.f);
    }
  }
#endif
}

}  // namespace flash_mla::sm90
