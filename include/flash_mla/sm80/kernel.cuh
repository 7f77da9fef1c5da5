// The portable split-KV decode kernel (sm_80 and newer): mma.sync m16n8k16 tensor-core math,
// cp.async double-buffered KV tiles, online softmax in registers.
//
// Grid: (m-blocks of kBlockM packed query rows, KV heads, SM parts). Each CTA walks the request
// segments its SM part owns (scheduler/plan.hpp) and, per segment, streams KV tiles through two
// shared-memory buffers: tile i + 1 is copied while tile i is multiplied. Raw FP8 tiles stream
// through two staging buffers instead, and each tile is widened into the one 16-bit tile the
// products read.
//
// Where the keys come from is the KvSource: PagedKvTiles (gmem_loader.cuh: a request's tokens
// through its block table) or sparse::IndexedKvTiles (a query token's selected tokens; there a
// "request" of the plan is one query token of one request).
//
// Element: the type the tensor cores multiply and out's type. QStored: how q is stored, Element
// itself or Fp8E4M3 (common/fp8.cuh; an FP8 q is multiplied as bf16).
#pragma once

#include "../common/epilogue.cuh"
#include "../common/fp8.cuh"
#include "../common/segment.cuh"
#include "../common/softmax.cuh"
#include "../params.hpp"
#include "gmem_loader.cuh"
#include "ptx.cuh"
#include "traits.hpp"

namespace flash_mla::sm80 {

template <typename Traits, typename Element, typename KvSource, typename QStored = Element>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    decode_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ typename KvSource::Params kv_params,
                  const bool q_vec16) {
  using T = Traits;
  constexpr int kTileElems = T::kBlockN * T::kHeadDim;
  extern __shared__ __align__(128) char smem[];
  Element* sQ = reinterpret_cast<Element*>(smem + T::kQOffset);
  Element* sK = reinterpret_cast<Element*>(smem + T::kKOffset);
  // Where tile `it` lands: one of the two 16-bit tiles, or (staged) one of the two staging tiles
  // behind the single 16-bit tile; and its key flags.
  const auto landing = [&](int it) {
    return reinterpret_cast<uint8_t*>(smem + T::kKOffset) + (T::kStaged ? T::kKTileBytes + (it & 1) * T::kStagedTileBytes
                                                                        : (it & 1) * T::kKTileBytes);
  };
  const auto key_flags = [&](int it) { return reinterpret_cast<uint8_t*>(smem + T::kKeyFlagsOffset) + (it & 1) * T::kBlockN; };
  Element* sP = reinterpret_cast<Element*>(smem + T::kPOffset);
  float* sRowStat = reinterpret_cast<float*>(smem + T::kRowStatOffset);  // [2 halves][kBlockM]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row_group = warp % T::kRowGroups, half = warp / T::kRowGroups;
  const int g = lane / 4, tq = lane % 4;
  const int local_row = row_group * 16 + g;  // the thread's first row; its second is local_row + 8

  const RowMap rows_map{p.num_heads_q / p.num_heads_kv, p.rows_per_kv_head(), static_cast<int>(blockIdx.y)};
  const int row0 = blockIdx.x * T::kBlockM;
  const bool warp_has_rows = row0 + row_group * 16 < rows_map.rows;

  const int32_t* meta = p.tile_scheduler_metadata + blockIdx.z * kMetaInts;
  const int begin_req = meta[0], end_req = meta[2];

  // The clamps only matter for metadata planned for other inputs: stay in bounds.
  for (int req = max(begin_req, 0); req <= min(end_req, p.batch - 1); ++req) {
    const Segment seg = Segment::of<T::kBlockN>(p, meta, req);
    const int n_lo = seg.n_lo, n_tiles = seg.n_tiles;
    KvSource kv_source(p, kv_params, req, seg, rows_map, row0 + local_row);
    // Widened FP8 inputs times fp8_widen_scale() (and the descales) are the stored values: those
    // factors scale the scores and V once.
    const float value_scale = kv_source.value_scale();
    const float scale_log2 = p.softmax_scale * input_scale<QStored>(p.descale_q) * value_scale * float(M_LOG2E);

    __syncthreads();  // the previous segment is done with every shared buffer
    if (n_tiles > 0) {  // an empty segment (L == 0) only writes its zero output
      load_q_tile<T, QStored>(sQ, p, rows_map, req, row0, q_vec16);
      kv_source.load(landing(0), key_flags(0), n_lo);
    }
    cp_async_commit();

    float o[T::kOTiles][4];
#pragma unroll
    for (int j = 0; j < T::kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    RowState state;

    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait_all();
      __syncthreads();  // tile `it` visible to all; everyone is done with tile it - 1
      if (it + 1 < n_tiles) kv_source.load(landing(it + 1), key_flags(it + 1), n_lo + (it + 1) * T::kBlockN);
      cp_async_commit();
      if constexpr (T::kStaged) {
        kv_source.widen(landing(it), sK);
        __syncthreads();  // the 16-bit tile is complete
      }
      const Element* kv = T::kStaged ? sK : sK + (it & 1) * kTileElems;

      // S = Q K^T over this warp's rows and half of the tile's tokens.
      float s[T::kSTiles][4];
#pragma unroll
      for (int j = 0; j < T::kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      if (warp_has_rows) {
        const int a_row = row_group * 16 + lane % 8 + 8 * ((lane / 8) % 2);
        const int a_col = 8 * (lane / 16);
        const int token0 = half * T::kTokensPerWarp;
#pragma unroll 4
        for (int ks = 0; ks < T::kKSteps; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, sQ + T::swizzle(a_row, ks * 16 + a_col));
#pragma unroll
          for (int j = 0; j + 1 < T::kSTiles; j += 2) {
            uint32_t b[4];
            ldmatrix_x4(b, kv + T::swizzle(token0 + j * 8 + lane % 8 + 8 * (lane / 16), ks * 16 + 8 * ((lane / 8) % 2)));
            mma_16816<Element>(s[j], a, b[0], b[1]);
            mma_16816<Element>(s[j + 1], a, b[2], b[3]);
          }
          if constexpr (T::kSTiles % 2 == 1) {
            constexpr int j = T::kSTiles - 1;
            uint32_t b[2];
            ldmatrix_x2(b, kv + T::swizzle(token0 + j * 8 + lane % 8, ks * 16 + 8 * ((lane / 8) % 2)));
            mma_16816<Element>(s[j], a, b[0], b[1]);
          }
        }
      }

      // Online softmax: the two warps sharing these rows agree on the row maxima first.
      const int col0 = n_lo + it * T::kBlockN + half * T::kTokensPerWarp;
      float tile_max[2];
      const int tile_n0 = n_lo + it * T::kBlockN;
      const uint8_t* flags = key_flags(it);
      scale_mask_rowmax(
          s, scale_log2, col0, [&](int i, int col) { return kv_source.visible(i, col, tile_n0, flags); }, tile_max);
      if (tq == 0) {
        sRowStat[half * T::kBlockM + local_row] = tile_max[0];
        sRowStat[half * T::kBlockM + local_row + 8] = tile_max[1];
      }
      __syncthreads();
      float new_max[2], rescale[2], offset[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        new_max[i] = fmaxf(sRowStat[local_row + 8 * i], sRowStat[T::kBlockM + local_row + 8 * i]);
      }
      state.update(new_max, rescale, offset);
      exponentiate(s, offset, state);
      rescale_rows(o, rescale);
#pragma unroll
      for (int j = 0; j < T::kSTiles; ++j) {
        Element* dst = sP + local_row * T::kPStride + half * T::kTokensPerWarp + j * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(dst) = pack2<Element>(s[j][0], s[j][1]);
        *reinterpret_cast<uint32_t*>(dst + 8 * T::kPStride) = pack2<Element>(s[j][2], s[j][3]);
      }
      __syncthreads();  // P of both halves visible

      // O += P V over all tokens of the tile and this warp's half of the channels.
      if (warp_has_rows) {
        const int dv0 = half * T::kDvPerWarp;
#pragma unroll
        for (int ks = 0; ks < T::kPvSteps; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, sP + (row_group * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * T::kPStride + ks * 16 + 8 * (lane / 16));
          const int v_row = ks * 16 + lane % 8 + 8 * ((lane / 8) % 2);
#pragma unroll
          for (int j = 0; j < T::kOTiles; j += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, kv + T::swizzle(v_row, dv0 + j * 8 + 8 * (lane / 16)));
            mma_16816<Element>(o[j], a, b[0], b[1]);
            mma_16816<Element>(o[j + 1], a, b[2], b[3]);
          }
        }
      }
    }

    // Full row sums: reduce over the quad, then add the other half's share.
    float row_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) row_sum[i] = quad_sum(state.sum[i]);
    // sRowStat is free: its last readers (the row maxima) passed the P barrier.
    if (tq == 0) {
      sRowStat[half * T::kBlockM + local_row] = row_sum[0];
      sRowStat[half * T::kBlockM + local_row + 8] = row_sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[i] = sRowStat[local_row + 8 * i] + sRowStat[T::kBlockM + local_row + 8 * i];
    }
    const int split = req == begin_req ? meta[4] : 0;
    store_segment<T::kOTiles, Element>(p, rows_map, req, split, row0 + local_row, half * T::kDvPerWarp, o, state.max,
                                       row_sum, value_scale);
  }
}

}  // namespace flash_mla::sm80
