/// @file sparse_decode.hpp
/// Token-sparse decode (DeepSeek-V3.2 and the 512-dim format): mla_decode_sparse(). Included by
/// flash_mla.hpp; see SparseDecodeParams (params.hpp) for the call's shape and planning.
#pragma once

#include <string>

#include "params.hpp"
#include "sm90/sparse_kernel.cuh"
#include "sparse/indexed_kv.cuh"
#include "sparse/token_formats.cuh"

namespace flash_mla {

namespace detail {

inline Status check_sparse_cache(const SparseKvCache& c, const char* name, SparseKvFormat format) {
  const std::string n(name);
  if (c.data == nullptr) return Status::error(n + ".data is null");
  if (!aligned_to(c.data, 16)) return Status::error(n + ".data must be 16-byte aligned");
  if (c.num_blocks < 0) return Status::error(n + ".num_blocks must be >= 0");
  if (c.page_size < 1) return Status::error(n + ".page_size must be >= 1, got " + std::to_string(c.page_size));
  if (c.page_stride < 0 || c.page_stride % 16) return Status::error(n + ".page_stride must be a multiple of 16 bytes >= 0");
  if (format != SparseKvFormat::kModel1FP8 && (c.token_stride < 0 || c.token_stride % 16)) {
    return Status::error(n + ".token_stride must be a multiple of 16 bytes >= 0");
  }
  if (c.topk < 0) return Status::error(n + ".topk must be >= 0");
  if (c.indices == nullptr || !aligned_to(c.indices, 4)) return Status::error(n + ".indices must be non-null and 4-byte aligned");
  if (c.indices_batch_stride < 0 || c.indices_seq_stride < 0) return Status::error(n + ".indices strides must be >= 0");
  if (c.topk_length != nullptr && !aligned_to(c.topk_length, 4)) {
    return Status::error(n + ".topk_length must be 4-byte aligned");
  }
  return Status::success();
}

}  // namespace detail

/// Whether the Hopper token-sparse kernel (sm90/sparse_kernel.cuh) takes a format: V3.2 FP8
/// (widened by its producer) and bf16 of 576 channels (copied as stored). The one statement of
/// that set: validate_sparse checks a call's format against it, launch_sparse picks its kernel.
constexpr bool hopper_sparse_format(SparseKvFormat format, int head_dim) {
  return format == SparseKvFormat::kV32FP8 || (format == SparseKvFormat::kBF16 && head_dim == 576);
}

/// Checks a SparseDecodeParams before any launch (mla_decode_sparse calls it first): the format
/// and head_dim agree (kBF16: 576 or 512, kV32FP8: 576, kModel1FP8: 512), kSm90 only with
/// kV32FP8 or kBF16 of 576 channels, batch >= 0,
/// s_q and h_q >= 1, batch * s_q and h_q within the kernels' limits, softmax_scale finite and
/// > 0, num_sm_parts in [1, kMaxSmParts], max_splits >= batch * s_q + num_sm_parts; with
/// batch > 0 the pointers (non-null where required, aligned as documented) and strides of q
/// (dim 0's stride is s_q times dim 1's: the kernel walks (request, token) as one index) and of
/// each cache (SparseKvCache).
inline Status validate_sparse(const SparseDecodeParams& p) {
  const bool dim_ok = p.format == SparseKvFormat::kBF16       ? (p.head_dim == 576 || p.head_dim == 512)
                      : p.format == SparseKvFormat::kV32FP8    ? p.head_dim == 576
                      : p.format == SparseKvFormat::kModel1FP8 ? p.head_dim == 512
                                                               : false;
  if (!dim_ok) return Status::error("format and head_dim disagree (kBF16: 576 or 512, kV32FP8: 576, kModel1FP8: 512)");
  if (p.kernel == KernelChoice::kSm90 && !hopper_sparse_format(p.format, p.head_dim)) {
    return Status::error("kernel: the sm90 token-sparse kernel takes kV32FP8 and kBF16 with head_dim 576; this format "
                         "runs on the portable kernels (kAuto, kSm80Large or kSm80Small)");
  }
  if (p.batch < 0) return Status::error("batch must be >= 0, got " + std::to_string(p.batch));
  Status st = detail::check_heads(p.seqlen_q, p.num_heads_q, 1);
  if (st.ok()) st = detail::check_sm_parts(p.num_sm_parts);
  if (!st.ok()) return st;
  const int64_t pairs = int64_t(p.batch) * p.seqlen_q;
  if (pairs + p.num_sm_parts > INT32_MAX) return Status::error("batch * seqlen_q + num_sm_parts must fit in an int");
  if (int64_t(p.max_splits) < pairs + p.num_sm_parts) {
    return Status::error("max_splits must be >= batch * seqlen_q + num_sm_parts, got " + std::to_string(p.max_splits));
  }
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) return Status::error("softmax_scale must be finite and > 0");
  if (p.batch == 0) return Status::success();
  const struct {
    const void* ptr;
    const char* name;
    uintptr_t align;
  } pointers[] = {
      {p.q, "q", 2},
      {p.plan_seqlens, "plan_seqlens", 4},
      {p.tile_scheduler_metadata, "tile_scheduler_metadata", 4},
      {p.num_splits, "num_splits", 4},
      {p.out, "out", 16},
      {p.lse, "lse", 4},
      {p.o_accum, "o_accum", 16},
      {p.lse_accum, "lse_accum", 4},
      {p.attn_sink != nullptr ? p.attn_sink : p.lse, "attn_sink", 4},  // (a non-null stand-in when unused)
  };
  for (const auto& arg : pointers) {
    if (arg.ptr == nullptr) return Status::error(std::string(arg.name) + " is null");
    if (!detail::aligned_to(arg.ptr, arg.align)) {
      return Status::error(std::string(arg.name) + " must be " + std::to_string(arg.align) + "-byte aligned");
    }
  }
  if (p.q_seq_stride < 0 || p.q_head_stride < 0) return Status::error("q strides must be >= 0");
  st = detail::check_sparse_cache(p.cache, "cache", p.format);
  if (st.ok() && p.extra.data != nullptr) st = detail::check_sparse_cache(p.extra, "extra", p.format);
  if (st.ok() && int64_t(p.cache.topk) + (p.extra.data != nullptr ? p.extra.topk : 0) > INT32_MAX / 2) {
    st = Status::error("cache.topk + extra.topk is too large");
  }
  return st;
}

namespace detail {

template <typename Format, typename Shape>
using SparseTraits = sm80::TraitsFor<Shape, Format::kHeadDim, Format::kStagedTokenBytes>;

/// Formats the Hopper token-sparse kernel takes (a TokenRegisters, or copied as stored).
template <typename Format>
constexpr bool kHopperSparseFormat = hopper_sparse_format(Format::kFormat, Format::kHeadDim);

template <typename Format>
Status launch_sparse_sm90(const DecodeParams& p, const sparse::IndexedKvParams& kp, int device) {
  const auto kernel = sm90::sparse_decode_kernel<Format>;
  cudaError_t err = allow_dynamic_smem<sm90::sparse_decode_kernel<Format>>(sm90::kSparseSmemBytes, device);
  if (err != cudaSuccess) return Status::error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err));
  err = launch_kernel(kernel, decode_grid<sm90::Traits::kBlockM>(p), dim3(sm90::SparseTraits::kThreads),
                      sm90::kSparseSmemBytes, p.stream, /*programmatic=*/true, p, kp, q_vec16(p));
  return finish_decode_launch<__nv_bfloat16>(err, p, /*overlap=*/true);
}

template <typename Format>
Status launch_sparse(const DecodeParams& p, const sparse::IndexedKvParams& kp, KernelChoice choice, int device) {
  const DeviceInfo info = device_info(device);
  if (info.error != cudaSuccess) return Status::error(std::string("cannot query device: ") + cudaGetErrorString(info.error));
  if (info.major < 8) return Status::error("flash-mla needs an sm_80 or newer GPU (compute capability >= 8.0)");
  using Large = SparseTraits<Format, sm80::LargeTraits>;
  using Small = SparseTraits<Format, sm80::SmallTraits>;
  const bool hopper = info.major == 9 && info.sm90_built && info.smem_optin >= sm90::kSparseSmemBytes;
  if (choice == KernelChoice::kAuto) {
    choice = kHopperSparseFormat<Format> && hopper                 ? KernelChoice::kSm90
             : info.smem_optin >= Large::kSmemBytes ? KernelChoice::kSm80Large
                                                    : KernelChoice::kSm80Small;
  }
  if (choice == KernelChoice::kSm90) {
    if constexpr (kHopperSparseFormat<Format>) {
      if (!hopper) {
        return Status::error("the sm90 kernel needs an sm_90 GPU and a build with FLASH_MLA_CUDA_ARCHS containing 90a");
      }
      return launch_sparse_sm90<Format>(p, kp, device);
    } else {
      return Status::error("the sm90 token-sparse kernel takes the V3.2 FP8 format and 576-channel bf16 caches only; "
                           "this format runs on the portable kernels (kSm80Large or kSm80Small)");
    }
  }
  if (choice != KernelChoice::kSm80Large && choice != KernelChoice::kSm80Small) return Status::error("unknown kernel choice");
  const int need = choice == KernelChoice::kSm80Large ? Large::kSmemBytes : Small::kSmemBytes;
  if (info.smem_optin < need) {
    return Status::error("kernel needs " + std::to_string(need) + " bytes of shared memory per block, device has " +
                         std::to_string(info.smem_optin));
  }
  return choice == KernelChoice::kSm80Large
             ? launch_sm80_kernel<Large, __nv_bfloat16, sparse::IndexedKvTiles<Large, Format>>(p, kp, device)
             : launch_sm80_kernel<Small, __nv_bfloat16, sparse::IndexedKvTiles<Small, Format>>(p, kp, device);
}

/// The dense kernel's parameters for a sparse call: request i * s_q + t is query token t of
/// request i, with one query token and h_q rows of its own.
inline DecodeParams dense_view(const SparseDecodeParams& sp) {
  DecodeParams p;
  p.dtype = DType::kBF16;
  p.batch = sp.batch * sp.seqlen_q;
  p.seqlen_q = 1;
  p.num_heads_q = sp.num_heads_q;
  p.num_heads_kv = 1;
  p.softmax_scale = sp.softmax_scale;
  p.attn_sink = sp.attn_sink;
  p.q = sp.q;
  p.q_batch_stride = sp.q_seq_stride;
  p.q_seq_stride = 0;
  p.q_head_stride = sp.q_head_stride;
  p.cache_seqlens = sp.plan_seqlens;
  p.tile_scheduler_metadata = sp.tile_scheduler_metadata;
  p.num_sm_parts = sp.num_sm_parts;
  p.num_splits = sp.num_splits;
  p.out = sp.out;
  p.lse = sp.lse;
  p.o_accum = sp.o_accum;
  p.lse_accum = sp.lse_accum;
  p.max_splits = sp.max_splits;
  p.stream = sp.stream;
  return p;
}

}  // namespace detail

/// Runs one token-sparse decode step (one layer) on p.stream: a decode kernel over the selected
/// tokens (sm90::sparse_decode_kernel for kV32FP8 on sm_90, else the portable kernel; see
/// SparseDecodeParams::kernel), then the combine kernel; asynchronous, no host sync, no allocation. Checks p
/// with validate_sparse() first; batch == 0 is a no-op.
inline Status mla_decode_sparse(const SparseDecodeParams& sp) {
  Status st = validate_sparse(sp);
  if (!st.ok() || sp.batch == 0) return st;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::error("no current CUDA device");
  const DecodeParams p = detail::dense_view(sp);
  sparse::IndexedKvParams kp{{sp.cache, sp.extra}, sp.seqlen_q};
  if (kp.cache[1].data == nullptr) kp.cache[1] = SparseKvCache{};  // no extra cache: no extra keys
  switch (sp.format) {
    case SparseKvFormat::kV32FP8: return detail::launch_sparse<sparse::V32Tokens>(p, kp, sp.kernel, device);
    case SparseKvFormat::kModel1FP8: return detail::launch_sparse<sparse::Model1Tokens>(p, kp, sp.kernel, device);
    default:
      return sp.head_dim == 576 ? detail::launch_sparse<sparse::Bf16Tokens<576>>(p, kp, sp.kernel, device)
                                : detail::launch_sparse<sparse::Bf16Tokens<512>>(p, kp, sp.kernel, device);
  }
}

}  // namespace flash_mla
