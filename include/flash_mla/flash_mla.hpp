/// @file flash_mla.hpp
/// C++ entry points of flash-mla. Include from a .cu file compiled by nvcc (C++17,
/// --expt-relaxed-constexpr; the CMake target flash_mla::flash_mla sets both).
///
/// One decoding step, for a batch of `batch` requests, `s_q` query tokens each:
///   1. get_num_sm_parts(device, s_q, h_q, h_kv, &parts)        how finely to split the KV work
///   2. allocate int32 tile_scheduler_metadata [parts, kMetaInts] and num_splits [batch + 1];
///      get_mla_metadata(MetadataParams)                          plans the split-KV schedule on
///      the GPU (once per step; reuse it for every layer of the step)
///   3. get_split_workspace_size(batch, s_q, h_q, parts, &ws)   sizes o_accum and lse_accum;
///      allocate them, out [batch, s_q, h_q, 512] and lse [batch, h_q, s_q]
///   4. mla_decode(DecodeParams)                                 per layer: decode + combine
///
/// Every function checks its arguments and returns a Status instead of aborting; nothing here
/// allocates memory or synchronises with the host, so the calls can be captured in a CUDA graph.
/// Pointers must be device (or managed) memory of the current device: that cannot be checked
/// without a driver call per pointer and is left to the caller.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>

#include "combine.cuh"
#include "params.hpp"
#include "scheduler/metadata_kernel.cuh"
#include "scheduler/plan.hpp"
#include "sm80/kernel.cuh"
#include "sm80/traits.hpp"
#include "sm90/kernel.cuh"
#include "sm90/traits.hpp"

namespace flash_mla {

/// Largest num_sm_parts (dim 0 of tile_scheduler_metadata): the decode grid has one z-slice per part.
constexpr int kMaxSmParts = 65535;
/// Largest s_q * h_q of one request (far above any model's; keeps the per-row index arithmetic
/// of the kernels comfortably inside 32 bits).
constexpr int64_t kMaxRowsPerRequest = int64_t(65535) * 4;

namespace detail {

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

/// The shape checks shared by every entry point (flash_mla_with_kvcache checks the same in Python).
inline Status check_heads(int64_t seqlen_q, int64_t num_heads_q, int64_t num_heads_kv) {
  if (seqlen_q < 1) return Status::error("seqlen_q must be >= 1, got " + std::to_string(seqlen_q));
  if (num_heads_q < 1 || num_heads_kv < 1) {
    return Status::error("num_heads_q and num_heads_kv must be >= 1, got " + std::to_string(num_heads_q) + " and " +
                         std::to_string(num_heads_kv));
  }
  if (num_heads_q % num_heads_kv != 0) {
    return Status::error("num_heads_q must be a multiple of num_heads_kv, got h_q = " + std::to_string(num_heads_q) +
                         ", h_kv = " + std::to_string(num_heads_kv));
  }
  if (num_heads_kv > 65535) return Status::error("num_heads_kv must be <= 65535");
  if (seqlen_q * num_heads_q > kMaxRowsPerRequest) {
    return Status::error("seqlen_q * num_heads_q must be <= " + std::to_string(kMaxRowsPerRequest));
  }
  return Status::success();
}

inline Status check_sm_parts(int64_t num_sm_parts) {
  if (num_sm_parts < 1 || num_sm_parts > kMaxSmParts) {
    return Status::error("num_sm_parts must be in [1, " + std::to_string(kMaxSmParts) + "], got " +
                         std::to_string(num_sm_parts));
  }
  return Status::success();
}

}  // namespace detail

/// Number of SM parts get_mla_metadata plans for (dim 0 of tile_scheduler_metadata), from the
/// device's SM count. Unchecked (any input gives a result >= 1); get_num_sm_parts() is the
/// checked form that queries the SM count itself.
/// @param num_sms           multiprocessors of the device (cudaDevAttrMultiProcessorCount)
/// @param rows_per_kv_head  s_q * h_q / h_kv: query rows per KV head
/// @param num_heads_kv      h_kv
inline int num_sm_parts(int num_sms, int rows_per_kv_head, int num_heads_kv) {
  return num_sm_parts_for(num_sms, rows_per_kv_head, num_heads_kv);
}

/// Number of SM parts for a decode shape on `device`: the num_sm_parts of MetadataParams and
/// DecodeParams, and the number of rows of tile_scheduler_metadata to allocate.
/// @param device        CUDA device ordinal the decode will run on
/// @param seqlen_q      s_q, query tokens per request (>= 1)
/// @param num_heads_q   h_q (>= 1, a multiple of num_heads_kv)
/// @param num_heads_kv  h_kv (>= 1)
/// @param[out] parts    the number of SM parts
inline Status get_num_sm_parts(int device, int seqlen_q, int num_heads_q, int num_heads_kv, int* parts) {
  if (parts == nullptr) return Status::error("parts is null");
  Status st = detail::check_heads(seqlen_q, num_heads_q, num_heads_kv);
  if (!st.ok()) return st;
  int num_sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    return Status::error("cannot query device " + std::to_string(device) + ": " + cudaGetErrorString(err));
  }
  const int n = num_sm_parts(num_sms, seqlen_q * (num_heads_q / num_heads_kv), num_heads_kv);
  *parts = n < kMaxSmParts ? n : kMaxSmParts;
  return Status::success();
}

/// Splits the split workspace must hold for `batch` requests planned over `num_sm_parts`
/// parts (unchecked; see get_split_workspace_size()). o_accum is float [splits, s_q * h_q, 512]
/// and lse_accum float [splits, s_q * h_q].
inline int split_workspace_splits(int batch, int num_sm_parts) { return max_splits_of(batch, num_sm_parts); }

/// Size of the split-KV workspace of DecodeParams (o_accum, lse_accum, max_splits).
struct SplitWorkspaceSize {
  int max_splits = 0;          ///< value for DecodeParams::max_splits
  size_t o_accum_bytes = 0;    ///< float [max_splits, s_q * h_q, 512]; must be 16-byte aligned
  size_t lse_accum_bytes = 0;  ///< float [max_splits, s_q * h_q]
};

/// Sizes the split-KV workspace of a decode step. The workspace depends only on the shape,
/// not on the sequence lengths: allocate it once for the largest batch and reuse it.
/// @param batch         requests (>= 0)
/// @param seqlen_q      s_q (>= 1)
/// @param num_heads_q   h_q (>= 1)
/// @param num_sm_parts  the value given to get_mla_metadata (from get_num_sm_parts())
/// @param[out] size     the sizes
inline Status get_split_workspace_size(int batch, int seqlen_q, int num_heads_q, int num_sm_parts,
                                       SplitWorkspaceSize* size) {
  if (size == nullptr) return Status::error("size is null");
  if (batch < 0) return Status::error("batch must be >= 0, got " + std::to_string(batch));
  Status st = detail::check_heads(seqlen_q, num_heads_q, 1);
  if (st.ok()) st = detail::check_sm_parts(num_sm_parts);
  if (!st.ok()) return st;
  const int64_t splits = int64_t(batch) + num_sm_parts;
  if (splits > INT32_MAX) return Status::error("batch + num_sm_parts must fit in an int");
  const size_t rows = size_t(seqlen_q) * size_t(num_heads_q);
  size->max_splits = static_cast<int>(splits);
  size->o_accum_bytes = size_t(splits) * rows * kHeadDimV * sizeof(float);
  size->lse_accum_bytes = size_t(splits) * rows * sizeof(float);
  return Status::success();
}

/// Plans the split-KV schedule of one decoding step on p.stream (one small kernel; no host
/// sync). Writes p.tile_scheduler_metadata [p.num_sm_parts, kMetaInts] and
/// p.num_splits [p.batch + 1]; both depend only on cache_seqlens and the shape, so compute them
/// once per step and reuse them for every layer.
inline Status get_mla_metadata(const MetadataParams& p) {
  if (p.batch < 0) return Status::error("batch must be >= 0, got " + std::to_string(p.batch));
  Status st = detail::check_sm_parts(p.num_sm_parts);
  if (!st.ok()) return st;
  if (p.batch > 0 && p.cache_seqlens == nullptr) return Status::error("cache_seqlens is null");
  if (p.tile_scheduler_metadata == nullptr || p.num_splits == nullptr) {
    return Status::error("tile_scheduler_metadata and num_splits must be non-null");
  }
  if (!detail::aligned_to(p.cache_seqlens, 4) || !detail::aligned_to(p.tile_scheduler_metadata, 4) ||
      !detail::aligned_to(p.num_splits, 4)) {
    return Status::error("cache_seqlens, tile_scheduler_metadata and num_splits must be 4-byte aligned");
  }
  return launch_metadata(p);
}

/// Resolves kAuto to a concrete kernel for `device`; kAuto on a GPU older than sm_80 is an error.
namespace detail {

/// What kernel selection needs to know about a device, queried once per device and process
/// (the decode call is on every layer's path: no repeated driver queries there).
struct DeviceInfo {
  cudaError_t error = cudaSuccess;
  int major = 0;
  int smem_optin = 0;
  bool sm90_built = false;  // this binary holds sm_90a code for the sm90 kernel
};

inline DeviceInfo query_device(int device) {
  DeviceInfo info;
  info.error = cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device);
  if (info.error == cudaSuccess) {
    info.error = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  // The sm90 kernel exists only where this binary holds sm_90a code (its stub reports less). A
  // stub JIT-compiled from the compute_80 PTX for an sm_90 GPU (CUDA_FORCE_PTX_JIT=1, or a build
  // without 90a) also reports binaryVersion 90, but ptxVersion 80.
  cudaFuncAttributes attr{};
  info.sm90_built = info.error == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, sm90::decode_kernel<__nv_bfloat16, 1>) == cudaSuccess &&
                    attr.binaryVersion == 90 && attr.ptxVersion >= 90;
  cudaGetLastError();  // a failed query must not leak into the launch check
  return info;
}

inline DeviceInfo device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static DeviceInfo cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return query_device(device);
  std::lock_guard<std::mutex> lock(mutex);
  if (!known[device]) {
    cache[device] = query_device(device);
    known[device] = cache[device].error == cudaSuccess;  // retry failed queries
  }
  return cache[device];
}

}  // namespace detail

inline Status resolve_kernel(KernelChoice choice, int device, KernelChoice* resolved) {
  const detail::DeviceInfo info = detail::device_info(device);
  if (info.error != cudaSuccess) return Status::error(std::string("cannot query device: ") + cudaGetErrorString(info.error));
  const int major = info.major, smem_optin = info.smem_optin;
  const bool sm90_built = info.sm90_built;
  if (major < 8) return Status::error("flash-mla needs an sm_80 or newer GPU (compute capability >= 8.0)");
  if (choice == KernelChoice::kAuto) {
    if (major == 9 && sm90_built) {
      choice = KernelChoice::kSm90;
    } else {
      choice = smem_optin >= sm80::LargeTraits::kSmemBytes ? KernelChoice::kSm80Large : KernelChoice::kSm80Small;
    }
  }
  if (choice == KernelChoice::kSm90 && (major != 9 || !sm90_built)) {
    return Status::error("the sm90 kernel needs an sm_90 GPU and a build with FLASH_MLA_CUDA_ARCHS containing 90a");
  }
  const int need = choice == KernelChoice::kSm90        ? sm90::kSmemBytes
                   : choice == KernelChoice::kSm80Large ? sm80::LargeTraits::kSmemBytes
                                                        : sm80::SmallTraits::kSmemBytes;
  if (smem_optin < need) {
    return Status::error("kernel needs " + std::to_string(need) + " bytes of shared memory per block, device has " +
                         std::to_string(smem_optin));
  }
  *resolved = choice;
  return Status::success();
}

/// Name of a kernel choice ("sm80_large", ...; "auto" for kAuto or an unknown value).
inline const char* kernel_name(KernelChoice resolved) {
  switch (resolved) {
    case KernelChoice::kSm80Large: return "sm80_large";
    case KernelChoice::kSm80Small: return "sm80_small";
    case KernelChoice::kSm90: return "sm90";
    default: return "auto";
  }
}

/// Checks a DecodeParams before any launch (mla_decode calls it first): everything the Python
/// path checks that a params struct can show. Sizes: dtype, batch >= 0, s_q >= 1, h_q and
/// h_kv >= 1 with h_q % h_kv == 0, h_kv <= 65535, s_q * h_q <= kMaxRowsPerRequest,
/// num_sm_parts in [1, kMaxSmParts], max_splits >= batch + num_sm_parts (the workspace of
/// get_split_workspace_size()), num_blocks and max_blocks_per_seq >= 0, page_size one of
/// 16, 32, 64, 128, 256, softmax_scale finite and > 0; an FP8 q only with an FP8 cache;
/// descale_k given exactly for an FP8 cache and descale_q exactly for an FP8 q. With batch > 0:
/// no null pointer; q aligned to its element size; k_cache, out and o_accum 16-byte aligned;
/// lse, lse_accum, the descales and the int32 arrays 4-byte aligned; strides >= 0, those of
/// k_cache multiples of 16 bytes. What a struct cannot show (that pointers are device memory of
/// the current device, buffer extents, the contents of cache_seqlens/block_table) is the caller's.
inline Status validate(const DecodeParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16 && p.dtype != DType::kFP8E4M3) {
    return Status::error("dtype must be bf16, fp16 or fp8_e4m3");
  }
  if (p.kv_dtype != KvDType::kSameAsQ && p.kv_dtype != KvDType::kFP8E4M3) {
    return Status::error("kv_dtype must be kSameAsQ or kFP8E4M3");
  }
  if (p.dtype == DType::kFP8E4M3 && !p.kv_fp8()) return Status::error("an FP8 q needs an FP8 k_cache (kv_dtype)");
  if (p.kv_fp8() != (p.descale_k != nullptr)) {
    return Status::error(p.kv_fp8() ? "descale_k is null (required with an FP8 k_cache)"
                                    : "descale_k must be null unless k_cache is FP8");
  }
  const bool q_fp8 = p.dtype == DType::kFP8E4M3;
  if (q_fp8 != (p.descale_q != nullptr)) {
    return Status::error(q_fp8 ? "descale_q is null (required with an FP8 q)" : "descale_q must be null unless q is FP8");
  }
  if (p.attn_sink != nullptr) return Status::error("attn_sink must be null (token-sparse decode only: mla_decode_sparse)");
  if (p.batch < 0) return Status::error("batch must be >= 0, got " + std::to_string(p.batch));
  Status st = detail::check_heads(p.seqlen_q, p.num_heads_q, p.num_heads_kv);
  if (st.ok()) st = detail::check_sm_parts(p.num_sm_parts);
  if (!st.ok()) return st;
  if (int64_t(p.max_splits) < int64_t(p.batch) + p.num_sm_parts) {
    return Status::error("max_splits must be >= batch + num_sm_parts (get_split_workspace_size), got " +
                         std::to_string(p.max_splits));
  }
  if (p.num_blocks < 0 || p.max_blocks_per_seq < 0) return Status::error("num_blocks and max_blocks_per_seq must be >= 0");
  if (!is_supported_page_size(p.page_size)) {
    return Status::error("page_size must be one of 16, 32, 64, 128, 256, got " + std::to_string(p.page_size));
  }
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) return Status::error("softmax_scale must be finite and > 0");
  if (p.batch == 0) return Status::success();
  const struct {
    const void* ptr;
    const char* name;
    uintptr_t align;
  } pointers[] = {
      {p.q, "q", q_fp8 ? 1u : 2u},
      {p.k_cache, "k_cache", 16},
      {p.block_table, "block_table", 4},
      {p.cache_seqlens, "cache_seqlens", 4},
      {p.tile_scheduler_metadata, "tile_scheduler_metadata", 4},
      {p.num_splits, "num_splits", 4},
      {p.out, "out", 16},
      {p.lse, "lse", 4},
      {p.o_accum, "o_accum", 16},
      {p.lse_accum, "lse_accum", 4},
      {p.kv_fp8() ? p.descale_k : p.lse_accum, "descale_k", 4},  // (a non-null stand-in when unused)
      {q_fp8 ? p.descale_q : p.lse_accum, "descale_q", 4},
  };
  for (const auto& arg : pointers) {
    if (arg.ptr == nullptr) return Status::error(std::string(arg.name) + " is null");
    if (!detail::aligned_to(arg.ptr, arg.align)) {
      return Status::error(std::string(arg.name) + " must be " + std::to_string(arg.align) + "-byte aligned");
    }
  }
  if (p.k_block_stride < 0 || p.k_token_stride < 0 || p.k_head_stride < 0 || p.q_batch_stride < 0 ||
      p.q_seq_stride < 0 || p.q_head_stride < 0 || p.block_table_stride < 0) {
    return Status::error("strides must be >= 0");
  }
  const int64_t k_align = 16 / p.kv_elem_bytes();  // 16-byte copies of a cache row
  if (p.k_block_stride % k_align || p.k_token_stride % k_align || p.k_head_stride % k_align) {
    return Status::error("k_cache strides must be multiples of 16 bytes (" + std::to_string(k_align) + " elements)");
  }
  return Status::success();
}

namespace detail {

/// Raises kKernel's dynamic shared-memory limit to `bytes` once per device: the setting stays with
/// the device's context, and the decode call runs on every layer's path.
template <auto kKernel>
cudaError_t allow_dynamic_smem(int bytes, int device) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

/// Whether q can be copied in 16-byte chunks: its base 16-byte aligned and its strides multiples
/// of 8 elements (the kernels' q_vec16 argument; otherwise they copy element by element).
inline bool q_vec16(const DecodeParams& p) {
  return reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && p.q_batch_stride % 8 == 0 && p.q_seq_stride % 8 == 0 &&
         p.q_head_stride % 8 == 0;
}

/// The decode grid: kBlockM-row blocks of a KV head's packed rows x KV heads x SM parts.
template <int kBlockM>
dim3 decode_grid(const DecodeParams& p) {
  return dim3((p.rows_per_kv_head() + kBlockM - 1) / kBlockM, p.num_heads_kv, p.num_sm_parts);
}

/// After the decode kernel's launch (`err`): the combine kernel, and the call's status.
template <typename Element>
Status finish_decode_launch(cudaError_t err, const DecodeParams& p, bool overlap) {
  if (err == cudaSuccess) err = launch_combine<Element>(p, overlap);
  if (err != cudaSuccess) return Status::error(std::string("decode launch failed: ") + cudaGetErrorString(err));
  return Status::success();
}

/// Launches the portable kernel over `Traits` (sm80/traits.hpp) with keys from `KvSource`
/// (sm80::PagedKvTiles or sparse::IndexedKvTiles), then the combine kernel.
template <typename Traits, typename Element, typename KvSource, typename QStored = Element>
Status launch_sm80_kernel(const DecodeParams& p, const typename KvSource::Params& kv_params, int device) {
  const auto kernel = sm80::decode_kernel<Traits, Element, KvSource, QStored>;
  cudaError_t err = allow_dynamic_smem<sm80::decode_kernel<Traits, Element, KvSource, QStored>>(Traits::kSmemBytes, device);
  if (err != cudaSuccess) return Status::error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err));
  kernel<<<decode_grid<Traits::kBlockM>(p), Traits::kThreads, Traits::kSmemBytes, p.stream>>>(p, kv_params, q_vec16(p));
  return finish_decode_launch<Element>(cudaGetLastError(), p, /*overlap=*/false);
}

/// The dense portable kernel of tile shape `Shape` (LargeTraits / SmallTraits): an FP8 cache
/// lands in staging tiles of one byte per channel.
template <typename Shape, typename Element, typename KvStored, typename QStored>
Status launch_sm80(const DecodeParams& p, int device) {
  using Traits = sm80::TraitsFor<Shape, kHeadDim, kIsFp8<KvStored> ? kHeadDim : 0>;
  return launch_sm80_kernel<Traits, Element, sm80::PagedKvTiles<Traits, KvStored>, QStored>(p, {}, device);
}

template <typename Element, int kBoxes, typename KvStored, typename QStored>
Status launch_sm90(const DecodeParams& p, int device) {
  CUtensorMap kv_map;
  Status st = sm90::cached_kv_tensor_map(p, &kv_map);
  if (!st.ok()) return st;
  const auto kernel = sm90::decode_kernel<Element, kBoxes, KvStored, QStored>;
  cudaError_t err = allow_dynamic_smem<sm90::decode_kernel<Element, kBoxes, KvStored, QStored>>(sm90::kSmemBytes, device);
  if (err != cudaSuccess) return Status::error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err));
  // A programmatic dependent launch: its set-up overlaps the previous kernel's tail, and it waits
  // in griddepcontrol.wait (kernel.cuh) before touching global memory.
  err = launch_kernel(kernel, decode_grid<sm90::Traits::kBlockM>(p), dim3(sm90::Traits::kThreads), sm90::kSmemBytes,
                      p.stream, /*programmatic=*/true, p, kv_map, q_vec16(p));
  return finish_decode_launch<Element>(err, p, /*overlap=*/true);
}

/// Element: the multiplied type and out's; KvStored / QStored: k_cache's and q's storage
/// (Element, or Fp8E4M3: common/fp8.cuh).
template <typename Element, typename KvStored = Element, typename QStored = Element>
Status launch_decode(const DecodeParams& p, KernelChoice kernel, int device) {
  switch (kernel) {
    case KernelChoice::kSm80Large: return launch_sm80<sm80::LargeTraits, Element, KvStored, QStored>(p, device);
    case KernelChoice::kSm80Small: return launch_sm80<sm80::SmallTraits, Element, KvStored, QStored>(p, device);
    case KernelChoice::kSm90:
      // One instantiation per tile shape in the cache: a tile is 1, 2 or 4 pages (paged_kv.cuh).
      switch (tile_boxes(p.page_size)) {
        case 1: return launch_sm90<Element, 1, KvStored, QStored>(p, device);
        case 2: return launch_sm90<Element, 2, KvStored, QStored>(p, device);
        default: return launch_sm90<Element, 4, KvStored, QStored>(p, device);
      }
    default: return Status::error("unknown kernel choice");
  }
}

}  // namespace detail

/// Runs one decode step (one layer) on p.stream: the split-KV decode kernel, then the combine
/// kernel; asynchronous, no host sync, no allocation. On sm_90 both are programmatic dependent
/// launches: a kernel's set-up overlaps the tail of the one before it on the stream, and it waits
/// for that kernel's completion (and memory) before it reads or writes global memory, so stream
/// order is kept as for plain launches. Checks p with validate() first and
/// resolves p.kernel for the current device (resolve_kernel()); batch == 0 is a no-op.
/// Errors from the launches are returned; errors while the kernels run show up on the stream.
inline Status mla_decode(const DecodeParams& p) {
  Status st = validate(p);
  if (!st.ok() || p.batch == 0) return st;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::error("no current CUDA device");
  KernelChoice kernel;
  st = resolve_kernel(p.kernel, device, &kernel);
  if (!st.ok()) return st;
  if (p.dtype == DType::kFP8E4M3) return detail::launch_decode<__nv_bfloat16, Fp8E4M3, Fp8E4M3>(p, kernel, device);
  if (p.kv_fp8()) {
    return p.dtype == DType::kBF16 ? detail::launch_decode<__nv_bfloat16, Fp8E4M3>(p, kernel, device)
                                   : detail::launch_decode<__half, Fp8E4M3>(p, kernel, device);
  }
  return p.dtype == DType::kBF16 ? detail::launch_decode<__nv_bfloat16>(p, kernel, device)
                                 : detail::launch_decode<__half>(p, kernel, device);
}

}  // namespace flash_mla

#include "sparse_decode.hpp"
