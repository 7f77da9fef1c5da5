// The paged KV cache as a TMA tensor: (576 channels, h_kv, page_size tokens, num_blocks), boxes
// of 64 channels x 1 head x min(page_size, 64) tokens x 1 page with 128-byte swizzle (a 64-token
// tile is one box, or 64 / page_size boxes of whole small pages: common/paged_kv.cuh). A page
// index outside [0, num_blocks) reads as zeros (TMA fills out-of-bounds boxes), never out of
// bounds. An FP8 cache is the same tensor of bytes, in boxes of 128 channels (8 KB per 64
// tokens, the size of a 16-bit box; sm90/fp8_widen.cuh): the last one, channels 512..639, reads
// zeros past channel 575.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <string>

#include "../common/paged_kv.cuh"
#include "../params.hpp"

namespace flash_mla::sm90 {

/// Builds the tensor map on the host (no device work, no sync); passed to the kernel by value.
inline Status make_kv_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return Status::error("cuTensorMapEncodeTiled is not available from the CUDA driver");

  const int64_t elem = p.kv_elem_bytes();
  // Size-1 dims may carry any stride; give TMA a valid one.
  const int64_t head = p.num_heads_kv > 1 ? p.k_head_stride : kHeadDim;
  const int64_t token = p.k_token_stride;
  const int64_t block = p.num_blocks > 1 ? p.k_block_stride : int64_t(p.page_size) * p.num_heads_kv * kHeadDim;
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(p.num_heads_kv),
                        static_cast<cuuint64_t>(p.page_size), static_cast<cuuint64_t>(p.num_blocks > 0 ? p.num_blocks : 1)};
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(head * elem), static_cast<cuuint64_t>(token * elem),
                           static_cast<cuuint64_t>(block * elem)};
  const cuuint32_t box_channels = p.kv_fp8() ? 128 : 64;  // 128 bytes either way
  cuuint32_t box[4] = {box_channels, 1, static_cast<cuuint32_t>(kTileTokens / tile_boxes(p.page_size)), 1};
  cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = p.kv_fp8()                ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                    : p.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult res = encode(map, type, 4, const_cast<void*>(p.k_cache), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return Status::error("cuTensorMapEncodeTiled failed for k_cache (error " + std::to_string(res) + ")");
  return Status::success();
}

/// make_kv_tensor_map through a small per-thread cache keyed by everything the map encodes: a
/// model's layers each have their own cache tensor, and the decode call runs once per layer per
/// step, so encoding on every call would repeat the same few dozen maps.
inline Status cached_kv_tensor_map(const DecodeParams& p, CUtensorMap* map) {
  struct Key {
    const void* ptr;
    int64_t head_stride, token_stride, block_stride;
    int heads, blocks, page_size;
    DType dtype;
    KvDType kv_dtype;
    bool operator==(const Key& o) const {
      return ptr == o.ptr && head_stride == o.head_stride && token_stride == o.token_stride &&
             block_stride == o.block_stride && heads == o.heads && blocks == o.blocks && page_size == o.page_size &&
             dtype == o.dtype && kv_dtype == o.kv_dtype;
    }
  };
  struct Entry {
    Key key;
    CUtensorMap map;
    bool valid = false;
  };
  constexpr int kEntries = 128;
  thread_local Entry cache[kEntries];
  const Key key{p.k_cache,      p.k_head_stride, p.k_token_stride, p.k_block_stride,
                p.num_heads_kv, p.num_blocks,    p.page_size,      p.dtype,         p.kv_dtype};
  Entry& e = cache[(reinterpret_cast<uintptr_t>(p.k_cache) >> 8) % kEntries];
  if (e.valid && e.key == key) {
    *map = e.map;
    return Status::success();
  }
  Status st = make_kv_tensor_map(p, map);
  if (st.ok()) {
    e.key = key;
    e.map = *map;
    e.valid = true;
  }
  return st;
}

/// L2 policy for KV loads: evict-first. Streamed KV then does not push out what is reused; a page
/// read by two m-block CTAs is read by both at about the same time, and measured faster with
/// evict-first too (H200: +4-6% on the compute rows against evict-normal).
__device__ __forceinline__ uint64_t kv_cache_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

/// One box (64 channels x the map's box tokens, from slot token0) of a KV page into shared
/// memory, completing on `mbar`.
__device__ __forceinline__ void tma_load_kv_box(void* smem_dst, const CUtensorMap* map, uint64_t* mbar, int channel0,
                                                int kv_head, int token0, int page, uint64_t cache_policy) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const uint32_t bar = static_cast<uint32_t>(__cvta_generic_to_shared(mbar));
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(channel0), "r"(kv_head), "r"(token0), "r"(page), "r"(bar),
        "l"(cache_policy)
      : "memory");
}

}  // namespace flash_mla::sm90
