// The Hopper (sm_90a) split-KV decode kernel: TMA loads of 64-token pages into a two-stage
// shared-memory pipeline (CUTLASS PipelineTmaAsync), wgmma for Q K^T and P V, online softmax
// in registers, warp-specialised (one producer warpgroup, two consumer warpgroups) with
// register reallocation. Same grid, metadata and outputs as the portable kernel.
#pragma once

#include <cuda.h>

#include <cutlass/arch/reg_reconfig.h>

#include "../common/epilogue.cuh"
#include "../common/q_chunk.cuh"
#include "../common/segment.cuh"
#include "../common/softmax.cuh"
#include "../params.hpp"
#include "../sm80/ptx.cuh"
#include "tma.hpp"
#include "traits.hpp"
#include "wgmma.cuh"

namespace flash_mla::sm90 {

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(Traits::kConsumerThreads) : "memory"); }

/// Generic-proxy shared-memory writes (st.shared, cp.async) become visible to wgmma.
__device__ __forceinline__ void fence_to_async_proxy() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

/// Consumers copy the Q tile of (request, KV head, m-block) into the swizzled layout.
template <typename Element>
__device__ __forceinline__ void load_q(uint8_t* sq, const DecodeParams& p, const RowMap& rows_map, int req, int row0,
                                       bool q_vec16) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < Traits::kBlockM * kChunks; idx += Traits::kConsumerThreads) {
    const int row = idx / kChunks, col = (idx % kChunks) * 8;
    copy_q_chunk(reinterpret_cast<Element*>(sq + Traits::offset(row, col)), p, rows_map, req, row0 + row, col, q_vec16);
  }
  sm80::cp_async_commit();
  sm80::cp_async_wait_all();
}

/// Zeroes tokens [valid, 64) of a landed KV tile: slots past L may hold NaN, and P = 0 times
/// NaN would still poison O.
__device__ __forceinline__ void zero_tail_tokens(uint8_t* kv, int valid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < (Traits::kBlockN - valid) * kChunksPerRow; idx += Traits::kConsumerThreads) {
    const int row = valid + idx / kChunksPerRow, c = idx % kChunksPerRow;
    *reinterpret_cast<uint4*>(kv + (c / 8) * Traits::kColBlockBytes + row * 128 + (c % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
}

template <typename Element>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap kv_map, const bool q_vec16) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);
  const int warpgroup = threadIdx.x / 128;
  const bool is_producer = warpgroup == 2;

  Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kTileBytes;
  pipe_params.role = is_producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == Traits::kConsumerThreads;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipeline(smem.pipeline, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  __syncthreads();  // barriers initialised before anyone waits on them

  const RowMap rows_map{p.num_heads_q / p.num_heads_kv, p.rows_per_kv_head(), static_cast<int>(blockIdx.y)};
  const int row0 = blockIdx.x * Traits::kBlockM;
  const int32_t* meta = p.tile_scheduler_metadata + blockIdx.z * kMetaInts;
  // The clamps only matter for metadata planned for other inputs: stay in bounds.
  const int first_req = max(meta[0], 0), last_req = min(meta[2], p.batch - 1);

  if (is_producer) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x != Traits::kConsumerThreads) return;
    auto state = cutlass::make_producer_start_state<Pipeline>();
    const uint64_t cache_policy = kv_cache_policy(gridDim.x == 1);
    for (int req = first_req; req <= last_req; ++req) {
      const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
      for (int it = 0; it < seg.n_tiles; ++it) {
        const int logical_page = seg.n_lo / kPageSize + it;
        const int page = logical_page < p.max_blocks_per_seq
                             ? p.block_table[req * p.block_table_stride + logical_page] : -1;
        pipeline.producer_acquire(state);
        uint64_t* bar = pipeline.producer_get_barrier(state);
        uint8_t* dst = smem.kv[state.index()];
#pragma unroll
        for (int b = 0; b < Traits::kColBlocks; ++b) {
          tma_load_kv_box(dst + b * Traits::kColBlockBytes, &kv_map, bar, 64 * b, rows_map.kv_head, page, cache_policy);
        }
        ++state;
      }
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int lane = threadIdx.x % 32, tq = lane % 4;
  const int local_row = 16 * ((threadIdx.x / 32) % 4) + lane / 4;  // the thread's first row; second: +8
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  cutlass::PipelineState<Traits::kStages> state;

  for (int req = first_req; req <= last_req; ++req) {
    const Segment seg = Segment::of<Traits::kBlockN>(p, meta, req);
    int limit[2];  // last visible key of the thread's two rows (-1: none)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + local_row + 8 * i;
      limit[i] = seg.last_visible(p, r < rows_map.rows, rows_map.token(r));
    }

    consumers_sync();  // the previous segment is done with Q, P and the row statistics
    if (seg.n_tiles > 0) {
      load_q<Element>(smem.q, p, rows_map, req, row0, q_vec16);
      fence_to_async_proxy();
    }
    consumers_sync();

    float o[Traits::kOTiles][4];
#pragma unroll
    for (int j = 0; j < Traits::kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    RowState rows;

    for (int it = 0; it < seg.n_tiles; ++it) {
      pipeline.consumer_wait(state);
      uint8_t* kv = smem.kv[state.index()];
      const int n0 = seg.n_lo + it * Traits::kBlockN;
      if (n0 + Traits::kBlockN > seg.seqlen) {
        zero_tail_tokens(kv, seg.seqlen - n0);
        fence_to_async_proxy();
        consumers_sync();
      }

      float s[Traits::kSTiles][4];
      gemm_qk<Element>(smem.q, kv + warpgroup * Traits::kTokensPerWarpgroup * 128, s);

      float tile_max[2];
      scale_mask_rowmax(s, scale_log2, n0 + warpgroup * Traits::kTokensPerWarpgroup, limit, tile_max);
      if (tq == 0) {
        smem.row_stat[warpgroup][local_row] = tile_max[0];
        smem.row_stat[warpgroup][local_row + 8] = tile_max[1];
      }
      consumers_sync();
      float new_max[2], rescale[2], offset[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) new_max[i] = fmaxf(smem.row_stat[0][local_row + 8 * i], smem.row_stat[1][local_row + 8 * i]);
      rows.update(new_max, rescale, offset);
      exponentiate(s, offset, rows);
      rescale_rows(o, rescale);
#pragma unroll
      for (int j = 0; j < Traits::kSTiles; ++j) {
        const int col = warpgroup * Traits::kTokensPerWarpgroup + j * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(smem.p + Traits::offset(local_row, col)) = pack2<Element>(s[j][0], s[j][1]);
        *reinterpret_cast<uint32_t*>(smem.p + Traits::offset(local_row + 8, col)) = pack2<Element>(s[j][2], s[j][3]);
      }
      fence_to_async_proxy();
      consumers_sync();  // P of both warpgroups written

      gemm_pv<Element>(smem.p, kv + warpgroup * (Traits::kDvPerWarpgroup / 64) * Traits::kColBlockBytes, o);
      pipeline.consumer_release(state);
      ++state;
    }

    // Full row sums: reduce over the quad, then add the other warpgroup's share.
    float row_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) row_sum[i] = quad_sum(rows.sum[i]);
    if (tq == 0) {
      smem.row_stat[warpgroup][local_row] = row_sum[0];
      smem.row_stat[warpgroup][local_row + 8] = row_sum[1];
    }
    consumers_sync();
#pragma unroll
    for (int i = 0; i < 2; ++i) row_sum[i] = smem.row_stat[0][local_row + 8 * i] + smem.row_stat[1][local_row + 8 * i];
    const int split = req == meta[0] ? meta[4] : 0;
    store_segment<Traits::kOTiles, Element>(p, rows_map, req, split, row0 + local_row, warpgroup * Traits::kDvPerWarpgroup,
                                            o, rows.max, row_sum);
  }
#endif
}

}  // namespace flash_mla::sm90
