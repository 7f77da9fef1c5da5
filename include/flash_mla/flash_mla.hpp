// C++ entry points of flash-mla. Include from a .cu file compiled by nvcc.
//
//   get_mla_metadata(MetadataParams)  plans the split-KV schedule on the GPU
//   mla_decode(DecodeParams)          decode kernel (+ combine) on params.stream
//
// Every function checks its arguments and returns a Status instead of aborting; nothing here
// allocates memory or synchronises with the host. Pointers must belong to the current device.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "combine.cuh"
#include "params.hpp"
#include "scheduler/metadata_kernel.cuh"
#include "scheduler/plan.hpp"
#include "sm80/kernel.cuh"
#include "sm80/traits.hpp"

namespace flash_mla {

/// Number of SM parts get_mla_metadata plans for (rows 0 dim of tile_scheduler_metadata).
inline int num_sm_parts(int num_sms, int rows_per_kv_head, int num_heads_kv) {
  return num_sm_parts_for(num_sms, rows_per_kv_head, num_heads_kv);
}

/// Splits the split workspace must hold: o_accum is [splits, s_q * h_q, 512] float and
/// lse_accum [splits, s_q * h_q] float.
inline int split_workspace_splits(int batch, int num_sm_parts) { return max_splits_of(batch, num_sm_parts); }

inline Status get_mla_metadata(const MetadataParams& p) {
  if (p.batch < 0) return Status::error("batch must be >= 0");
  if (p.num_sm_parts < 1) return Status::error("num_sm_parts must be >= 1");
  if (p.batch > 0 && p.cache_seqlens == nullptr) return Status::error("cache_seqlens is null");
  if (p.tile_scheduler_metadata == nullptr || p.num_splits == nullptr) {
    return Status::error("tile_scheduler_metadata and num_splits must be non-null");
  }
  return launch_metadata(p);
}

/// Resolves kAuto to a concrete kernel for `device`; kAuto on a GPU older than sm_80 is an error.
inline Status resolve_kernel(KernelChoice choice, int device, KernelChoice* resolved) {
  int major = 0, smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return Status::error(std::string("cannot query device: ") + cudaGetErrorString(err));
  if (major < 8) return Status::error("flash-mla needs an sm_80 or newer GPU (compute capability >= 8.0)");
  if (choice == KernelChoice::kAuto) {
    choice = smem_optin >= sm80::LargeTraits::kSmemBytes ? KernelChoice::kSm80Large : KernelChoice::kSm80Small;
  }
  const int need = choice == KernelChoice::kSm80Large ? sm80::LargeTraits::kSmemBytes : sm80::SmallTraits::kSmemBytes;
  if (smem_optin < need) {
    return Status::error("kernel needs " + std::to_string(need) + " bytes of shared memory per block, device has " +
                         std::to_string(smem_optin));
  }
  *resolved = choice;
  return Status::success();
}

inline const char* kernel_name(KernelChoice resolved) {
  switch (resolved) {
    case KernelChoice::kSm80Large: return "sm80_large";
    case KernelChoice::kSm80Small: return "sm80_small";
    default: return "auto";
  }
}

/// Checks the parts of DecodeParams that the kernels rely on.
inline Status validate(const DecodeParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return Status::error("dtype must be bf16 or fp16");
  if (p.batch < 0) return Status::error("batch must be >= 0");
  if (p.seqlen_q < 1) return Status::error("seqlen_q must be >= 1");
  if (p.num_heads_kv < 1 || p.num_heads_q < 1) return Status::error("num_heads_q and num_heads_kv must be >= 1");
  if (p.num_heads_q % p.num_heads_kv != 0) return Status::error("num_heads_q must be a multiple of num_heads_kv");
  if (p.num_heads_kv > 65535) return Status::error("num_heads_kv must be <= 65535");
  if (p.num_sm_parts < 1 || p.num_sm_parts > 65535) return Status::error("num_sm_parts must be in [1, 65535]");
  if (p.max_splits < p.batch + p.num_sm_parts) return Status::error("max_splits must be >= batch + num_sm_parts");
  if (p.num_blocks < 0 || p.max_blocks_per_seq < 0) return Status::error("num_blocks and max_blocks_per_seq must be >= 0");
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) return Status::error("softmax_scale must be finite and > 0");
  if (p.batch == 0) return Status::success();
  if (!p.q || !p.k_cache || !p.block_table || !p.cache_seqlens || !p.tile_scheduler_metadata || !p.num_splits ||
      !p.out || !p.lse || !p.o_accum || !p.lse_accum) {
    return Status::error("a tensor pointer is null");
  }
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (!aligned16(p.k_cache) || p.k_block_stride % 8 || p.k_token_stride % 8 || p.k_head_stride % 8) {
    return Status::error("k_cache must be 16-byte aligned with strides that are multiples of 8 elements");
  }
  if (!aligned16(p.out) || !aligned16(p.o_accum)) return Status::error("out and o_accum must be 16-byte aligned");
  if (p.k_block_stride < 0 || p.k_token_stride < 0 || p.k_head_stride < 0 || p.q_batch_stride < 0 ||
      p.q_seq_stride < 0 || p.q_head_stride < 0 || p.block_table_stride < 0) {
    return Status::error("strides must be >= 0");
  }
  return Status::success();
}

namespace detail {

template <typename Traits, typename Element>
Status launch_sm80(const DecodeParams& p) {
  const auto kernel = sm80::decode_kernel<Traits, Element>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return Status::error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err));
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool q_vec16 = aligned16(p.q) && p.q_batch_stride % 8 == 0 && p.q_seq_stride % 8 == 0 && p.q_head_stride % 8 == 0;
  const dim3 grid((p.rows_per_kv_head() + Traits::kBlockM - 1) / Traits::kBlockM, p.num_heads_kv, p.num_sm_parts);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, p.stream>>>(p, q_vec16);
  launch_combine<Element>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return Status::error(std::string("decode launch failed: ") + cudaGetErrorString(err));
  return Status::success();
}

template <typename Element>
Status launch_decode(const DecodeParams& p, KernelChoice kernel) {
  switch (kernel) {
    case KernelChoice::kSm80Large: return launch_sm80<sm80::LargeTraits, Element>(p);
    case KernelChoice::kSm80Small: return launch_sm80<sm80::SmallTraits, Element>(p);
    default: return Status::error("unknown kernel choice");
  }
}

}  // namespace detail

/// Runs one decode step on p.stream: the split kernel, then the combine kernel.
inline Status mla_decode(const DecodeParams& p) {
  Status st = validate(p);
  if (!st.ok() || p.batch == 0) return st;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::error("no current CUDA device");
  KernelChoice kernel;
  st = resolve_kernel(p.kernel, device, &kernel);
  if (!st.ok()) return st;
  return p.dtype == DType::kBF16 ? detail::launch_decode<__nv_bfloat16>(p, kernel)
                                 : detail::launch_decode<__half>(p, kernel);
}

}  // namespace flash_mla
