/// @file params.hpp
/// Plain parameter structs a C++ caller fills. No CUDA device code, no allocation:
/// this header compiles with any C++17 host compiler (with the CUDA runtime headers).
///
/// Conventions: every pointer is device memory of the current device; strides are in
/// elements (not bytes); a stride of a dimension of size 1 may be anything >= 0.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "macros.hpp"

namespace flash_mla {

/// Element type of q and out (and of k_cache unless DecodeParams::kv_dtype says FP8).
enum class DType : int {
  kBF16 = 0,     ///< __nv_bfloat16
  kFP16 = 1,     ///< __half
  kFP8E4M3 = 2,  ///< float8_e4m3fn q (with an FP8 cache and DecodeParams::descale_q); out is bf16
};

/// Element type of k_cache.
enum class KvDType : int {
  kSameAsQ = 0,  ///< bf16 / fp16, as DecodeParams::dtype
  kFP8E4M3 = 1,  ///< float8_e4m3fn, one byte per channel, times *DecodeParams::descale_k
};

/// Which decode kernel to run. kAuto picks the best one for the device.
/// The explicit values exist so tests can exercise every path on one GPU.
enum class KernelChoice : int {
  kAuto = 0,  ///< the fastest kernel the device and the build support
  kSm80Large = 1,  ///< 64-row x 32-token tiles, ~149 KB shared memory (A100, H100, H200)
  kSm80Small = 2,  ///< 32-row x 16-token tiles, ~75 KB shared memory (any sm_80+, e.g. Ada)
  kSm90 = 3,       ///< Hopper: TMA + wgmma, warp-specialised (sm_90a builds only)
};

/// Model constants fixed by the MLA contract.
constexpr int kHeadDim = 576;     ///< d: 512 latent channels + 64 RoPE channels
constexpr int kHeadDimV = 512;    ///< dv: V is the first 512 channels of K
constexpr int kTileTokens = 64;   ///< tokens per KV tile: the unit of the plan and of the kernels' loops
constexpr int kMetaInts = 8;      ///< int32 fields per row of the tile-scheduler metadata
constexpr int kRowsPerMBlock = 64;  ///< query rows per scheduler m-block

/// Tokens per KV-cache page the kernels take (dim 1 of k_cache): 16, 32, 64, 128 or 256. A
/// 64-token tile spans 64 / page pages of a smaller size, or lies inside one larger page.
FLASH_MLA_HOST_DEVICE constexpr bool is_supported_page_size(int page_size) {
  return page_size == 16 || page_size == 32 || page_size == 64 || page_size == 128 || page_size == 256;
}

/// Result of every entry point: ok() or an error message naming the argument.
struct Status {
  std::string message;  ///< empty on success
  /// True on success.
  bool ok() const { return message.empty(); }
  /// A successful result.
  static Status success() { return {}; }
  /// A failed result carrying `msg` (must not be empty).
  static Status error(std::string msg) { return Status{std::move(msg)}; }
};

/// Inputs/outputs of the tile scheduler, flash_mla::get_mla_metadata() (see
/// scheduler/plan.hpp for the row format). All arrays are contiguous int32 device memory.
struct MetadataParams {
  const int32_t* cache_seqlens = nullptr;  ///< in: [batch] KV length of each request (0 allowed)
  int32_t* tile_scheduler_metadata = nullptr;  ///< out: [num_sm_parts, kMetaInts]
  int32_t* num_splits = nullptr;  ///< out: [batch + 1] first split of each request (prefix sums)
  int batch = 0;                  ///< requests (>= 0)
  int num_sm_parts = 0;           ///< from get_num_sm_parts(), in [1, 65535]
  cudaStream_t stream = nullptr;  ///< stream the metadata kernel runs on
};

/// One decode call, flash_mla::mla_decode(): attention of `seqlen_q` new query tokens of each
/// of `batch` requests over a paged KV cache (docs/api.md). Token j of request i is
/// k_cache[block_table[i * block_table_stride + j / page_size], j % page_size]; query head h reads KV head
/// h / (h_q / h_kv). q, k_cache and out hold `dtype`; the last dim of q and k_cache is
/// contiguous. With an FP8 cache (kv_dtype kFP8E4M3) the key/value used is
/// float(k_cache) * *descale_k and k_cache's strides count bytes. Internally, query rows are
/// packed per KV head as row = t * heads_per_kv + hh (t: query token, hh: head inside the KV
/// head's group).
struct DecodeParams {
  DType dtype = DType::kBF16;  ///< element type of q and out (k_cache too unless kv_dtype is FP8)
  KvDType kv_dtype = KvDType::kSameAsQ;  ///< element type of k_cache
  int batch = 0;               ///< b: requests (0: nothing to do)
  int seqlen_q = 0;            ///< s_q: query tokens per request (>= 1)
  int num_heads_q = 0;         ///< h_q: query heads (>= 1)
  int num_heads_kv = 0;        ///< h_kv: KV heads (>= 1, divides h_q)
  int num_blocks = 0;          ///< pages in k_cache (pages >= num_blocks read as zeros)
  int max_blocks_per_seq = 0;  ///< block_table columns (logical pages past it read as zeros)
  int page_size = 64;          ///< tokens per page of k_cache (dim 1): is_supported_page_size()
  float softmax_scale = 0.f;   ///< multiplier of q.k, usually 1/sqrt(576); finite and > 0
  bool causal = false;         ///< token t sees keys 0 .. L - s_q + t (matters for s_q > 1 only)
  /// [1] float32 device memory, read by the kernel (so a CUDA graph replays with its current
  /// value): required with an FP8 cache, null otherwise. K and V are float(k_cache) * *descale_k.
  const float* descale_k = nullptr;
  /// [1] float32 device memory: required with an FP8 q, null otherwise (q is float(q) * *descale_q).
  const float* descale_q = nullptr;
  /// [h_q] float32 device memory, optional (null: none): per-head attention sink; the final
  /// output of head h is scaled by 1 / (1 + exp(attn_sink[h] - lse)) (lse is returned without
  /// it; +-inf allowed). Token-sparse decode only: mla_decode_sparse() sets it and mla_decode()
  /// requires it null.
  const float* attn_sink = nullptr;

  const void* q = nullptr;  ///< [batch, s_q, h_q, 576] query, aligned to its element size
  int64_t q_batch_stride = 0,  ///< q stride of dim 0 (batch), elements
      q_seq_stride = 0,        ///< q stride of dim 1 (s_q), elements
      q_head_stride = 0;       ///< q stride of dim 2 (h_q), elements
  const void* k_cache = nullptr;  ///< [num_blocks, page_size, h_kv, 576] paged KV cache, 16-byte aligned
  int64_t k_block_stride = 0,  ///< k_cache stride of dim 0 (page), elements, a multiple of 16 bytes
      k_token_stride = 0,      ///< k_cache stride of dim 1 (token in page), a multiple of 16 bytes
      k_head_stride = 0;       ///< k_cache stride of dim 2 (KV head), a multiple of 16 bytes
  const int32_t* block_table = nullptr;  ///< [batch, max_blocks_per_seq] physical page of each logical page
  int64_t block_table_stride = 0;        ///< block_table row stride, elements
  const int32_t* cache_seqlens = nullptr;  ///< [batch] KV length of each request, as given to get_mla_metadata
  const int32_t* tile_scheduler_metadata = nullptr;  ///< [num_sm_parts, kMetaInts] from get_mla_metadata
  int num_sm_parts = 0;                             ///< as given to get_mla_metadata
  const int32_t* num_splits = nullptr;              ///< [batch + 1] from get_mla_metadata

  void* out = nullptr;  ///< out: [batch, s_q, h_q, 512] contiguous, dtype (bf16 for an FP8 q), 16-byte aligned
  float* lse = nullptr;        ///< out: [batch, h_q, s_q] contiguous, natural-log sum-exp (+inf: no key)
  float* o_accum = nullptr;    ///< [max_splits, s_q * h_q, 512] split workspace, 16-byte aligned
  float* lse_accum = nullptr;  ///< [max_splits, s_q * h_q] split workspace
  int max_splits = 0;          ///< splits the workspace holds, >= batch + num_sm_parts (get_split_workspace_size())

  KernelChoice kernel = KernelChoice::kAuto;  ///< kernel to run; kAuto unless testing a path
  cudaStream_t stream = nullptr;              ///< stream the kernels run on

  /// Whether k_cache holds float8_e4m3fn.
  FLASH_MLA_HOST_DEVICE bool kv_fp8() const { return kv_dtype == KvDType::kFP8E4M3; }
  /// Bytes per element of k_cache.
  FLASH_MLA_HOST_DEVICE int kv_elem_bytes() const { return kv_fp8() ? 1 : 2; }

  /// Query rows per KV head: s_q * h_q / h_kv.
  FLASH_MLA_HOST_DEVICE int rows_per_kv_head() const { return num_heads_kv > 0 ? seqlen_q * (num_heads_q / num_heads_kv) : 0; }
};

/// Token layout of a token-sparse KV cache (docs/kv-formats.md).
enum class SparseKvFormat : int {
  kBF16 = 0,        ///< head_dim bf16 channels per token (head_dim 576 or 512)
  kV32FP8 = 1,      ///< 656 bytes per token: 512 e4m3, 4 float32 scales, 64 bf16 RoPE (head_dim 576)
  kModel1FP8 = 2,   ///< 512-dim: per page, page x (448 e4m3 + 64 bf16) records, then page x 8-byte
                    ///< ue8m0 scale records (head_dim 512)
};

/// One KV cache of a token-sparse decode and the token indices each query token selects from it.
/// Token `idx` is slot idx % page_size of page idx / page_size; an index that is negative or
/// >= num_blocks * page_size is skipped (never read).
struct SparseKvCache {
  const void* data = nullptr;  ///< page 0, 16-byte aligned; null: no such cache (the extra one)
  int num_blocks = 0;          ///< pages (>= 0)
  int page_size = 0;           ///< tokens per page (>= 1)
  int64_t page_stride = 0;     ///< bytes between pages, a multiple of 16
  int64_t token_stride = 0;    ///< bytes between the tokens of a page (kBF16, kV32FP8: a multiple of 16)
  const int32_t* indices = nullptr;  ///< [batch, s_q, topk], last dim contiguous
  int64_t indices_batch_stride = 0,  ///< indices stride of dim 0, elements
      indices_seq_stride = 0;        ///< indices stride of dim 1, elements
  int topk = 0;                      ///< indices per query token (>= 0)
  /// [batch] int32, optional: only the first topk_length[i] indices of request i are used
  /// (clamped to 0 .. topk).
  const int32_t* topk_length = nullptr;
};

/// One token-sparse decode call, flash_mla::mla_decode_sparse(): query token t of request i
/// attends to the valid selected tokens of `cache` and of `extra` (when extra.data is set), in
/// one softmax. h_kv is 1. The work is planned like a dense decode of batch * s_q requests of one
/// query token each: get_mla_metadata() over plan_seqlens (batch * s_q lengths, normally
/// cache.topk + extra.topk each; longer lengths are clamped to that) with num_sm_parts from
/// get_num_sm_parts(device, 1, h_q, 1), and a split workspace of
/// get_split_workspace_size(batch * s_q, 1, h_q, num_sm_parts).
struct SparseDecodeParams {
  SparseKvFormat format = SparseKvFormat::kV32FP8;  ///< layout of both caches
  int head_dim = 576;          ///< d_qk: 576 (kBF16, kV32FP8) or 512 (kBF16, kModel1FP8)
  int batch = 0;               ///< b: requests (0: nothing to do)
  int seqlen_q = 0;            ///< s_q: query tokens per request (>= 1)
  int num_heads_q = 0;         ///< h_q (>= 1)
  float softmax_scale = 0.f;   ///< multiplier of q.k, usually 1/sqrt(head_dim); finite and > 0
  const void* q = nullptr;     ///< [batch, s_q, h_q, head_dim] bf16, 2-byte aligned, last dim contiguous
  int64_t q_seq_stride = 0,    ///< q stride of dim 1, elements; dim 0's must be s_q times it
      q_head_stride = 0;       ///< q stride of dim 2, elements
  SparseKvCache cache;         ///< the main cache
  SparseKvCache extra;         ///< an optional second cache (extra.data null: none), same format
  const float* attn_sink = nullptr;  ///< [h_q] float32, optional (DecodeParams::attn_sink)
  const int32_t* plan_seqlens = nullptr;  ///< [batch * s_q] the lengths given to get_mla_metadata
  const int32_t* tile_scheduler_metadata = nullptr;  ///< [num_sm_parts, kMetaInts]
  int num_sm_parts = 0;                             ///< as given to get_mla_metadata
  const int32_t* num_splits = nullptr;              ///< [batch * s_q + 1]
  void* out = nullptr;        ///< out: [batch, s_q, h_q, 512] bf16 contiguous, 16-byte aligned
  float* lse = nullptr;       ///< out: [batch, s_q, h_q] float32 contiguous (note: s_q before h_q)
  float* o_accum = nullptr;   ///< [max_splits, h_q, 512] split workspace, 16-byte aligned
  float* lse_accum = nullptr; ///< [max_splits, h_q]
  int max_splits = 0;         ///< >= batch * s_q + num_sm_parts
  /// kAuto (kSm90 for kV32FP8 and 576-channel kBF16 on sm_90, else a portable kernel), kSm90
  /// (those formats only), or a portable kernel (kSm80Large / kSm80Small, every format)
  KernelChoice kernel = KernelChoice::kAuto;
  cudaStream_t stream = nullptr;
};

/// int64 words of the result buffer of check_paged_inputs() (input_check.cuh).
constexpr int kInputCheckWords = 8;

/// What check_paged_inputs() found (word 0 of its result buffer).
enum class InputCheckCode : int64_t {
  kOk = 0,           ///< every used entry is valid
  kBadSeqlen = 1,    ///< cache_seqlens[request] outside [0, page_size * max_blocks_per_seq]
  kBadPage = 2,      ///< block_table[request, column] outside [0, num_blocks), column < ceil(L / page_size)
};

/// Opt-in validation of the paged-cache indices on the GPU, flash_mla::check_paged_inputs()
/// (include/flash_mla/input_check.cuh). It reads the same entries mla_decode() would read and
/// writes its verdict to `result` (device memory, kInputCheckWords int64, 8-byte aligned):
///   [0] InputCheckCode of the first problem (lowest request, then lowest column; a bad length
///       comes before the pages of its request), [1] its request, [2] its block_table column
///       (-1 for a bad length), [3] the offending value, [4] how many problems were found,
///       [5] scratch, [6..7] zero.
/// Asynchronous on `stream`; the caller reads `result` back (that read is the host sync).
struct InputCheckParams {
  const int32_t* block_table = nullptr;    ///< [batch, max_blocks_per_seq]
  int64_t block_table_stride = 0;          ///< block_table row stride, elements
  const int32_t* cache_seqlens = nullptr;  ///< [batch]
  int batch = 0;                           ///< requests (>= 0)
  int max_blocks_per_seq = 0;              ///< block_table columns (>= 0)
  int num_blocks = 0;                      ///< pages in k_cache (>= 0)
  int page_size = 64;                      ///< tokens per page: is_supported_page_size()
  int64_t* result = nullptr;               ///< out: [kInputCheckWords]
  cudaStream_t stream = nullptr;           ///< stream the check runs on
};

}  // namespace flash_mla
