// Plain parameter structs a C++ caller fills. No CUDA device code, no allocation:
// this header compiles with any C++17 host compiler.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "macros.hpp"

namespace flash_mla {

/// Element type of q, k_cache and out.
enum class DType : int { kBF16 = 0, kFP16 = 1 };

/// Which decode kernel to run. kAuto picks the best one for the device.
/// The explicit values exist so tests can exercise every path on one GPU.
enum class KernelChoice : int {
  kAuto = 0,
  kSm80Large = 1,  ///< 64-row x 32-token tiles, ~149 KB shared memory (A100, H100, H200)
  kSm80Small = 2,  ///< 32-row x 16-token tiles, ~75 KB shared memory (any sm_80+, e.g. Ada)
};

/// Model constants fixed by the MLA contract.
constexpr int kHeadDim = 576;     ///< d: 512 latent channels + 64 RoPE channels
constexpr int kHeadDimV = 512;    ///< dv: V is the first 512 channels of K
constexpr int kPageSize = 64;     ///< tokens per KV-cache page
constexpr int kMetaInts = 8;      ///< int32 fields per row of the tile-scheduler metadata
constexpr int kRowsPerMBlock = 64;  ///< query rows per scheduler m-block

/// Result of every entry point: ok() or an error message naming the argument.
struct Status {
  std::string message;  ///< empty on success
  bool ok() const { return message.empty(); }
  static Status success() { return {}; }
  static Status error(std::string msg) { return Status{std::move(msg)}; }
};

/// Inputs/outputs of the tile scheduler (see scheduler/plan.hpp for the row format).
struct MetadataParams {
  const int32_t* cache_seqlens = nullptr;  ///< [batch] device pointer
  int32_t* tile_scheduler_metadata = nullptr;  ///< [num_sm_parts, kMetaInts] device pointer
  int32_t* num_splits = nullptr;  ///< [batch + 1] device pointer
  int batch = 0;
  int num_sm_parts = 0;
  cudaStream_t stream = nullptr;
};

/// One decode call. Strides are in elements. Query rows are packed per KV head as
/// row = t * heads_per_kv + hh (t: query token, hh: head inside the KV head's group).
struct DecodeParams {
  DType dtype = DType::kBF16;
  int batch = 0;
  int seqlen_q = 0;        ///< s_q
  int num_heads_q = 0;     ///< h_q
  int num_heads_kv = 0;    ///< h_kv
  int num_blocks = 0;      ///< pages in k_cache
  int max_blocks_per_seq = 0;  ///< block_table columns
  float softmax_scale = 0.f;
  bool causal = false;

  const void* q = nullptr;  ///< [batch, s_q, h_q, 576]
  int64_t q_batch_stride = 0, q_seq_stride = 0, q_head_stride = 0;
  const void* k_cache = nullptr;  ///< [num_blocks, 64, h_kv, 576]
  int64_t k_block_stride = 0, k_token_stride = 0, k_head_stride = 0;
  const int32_t* block_table = nullptr;  ///< [batch, max_blocks_per_seq]
  int64_t block_table_stride = 0;
  const int32_t* cache_seqlens = nullptr;  ///< [batch]
  const int32_t* tile_scheduler_metadata = nullptr;  ///< [num_sm_parts, kMetaInts]
  int num_sm_parts = 0;
  const int32_t* num_splits = nullptr;  ///< [batch + 1]

  void* out = nullptr;  ///< [batch, s_q, h_q, 512] contiguous
  float* lse = nullptr;  ///< [batch, h_q, s_q] contiguous
  float* o_accum = nullptr;    ///< [max_splits, s_q * h_q, 512] split workspace
  float* lse_accum = nullptr;  ///< [max_splits, s_q * h_q] split workspace
  int max_splits = 0;          ///< splits the workspace holds, >= split_workspace_splits()

  KernelChoice kernel = KernelChoice::kAuto;
  cudaStream_t stream = nullptr;

  FLASH_MLA_HOST_DEVICE int rows_per_kv_head() const { return num_heads_kv > 0 ? seqlen_q * (num_heads_q / num_heads_kv) : 0; }
};

}  // namespace flash_mla
