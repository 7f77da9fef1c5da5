/// @file input_check.cuh
/// Opt-in validation of the paged-cache indices on the GPU: check_paged_inputs().
///
/// mla_decode() never reads outside k_cache or block_table (out-of-range pages read as zeros),
/// but a block_table entry outside [0, num_blocks) or a cache_seqlens value outside
/// [0, page_size * max_blocks_per_seq] gives meaningless results. This check finds such entries
/// without the host ever reading the (device-resident) indices: three tiny kernels write a
/// verdict to a caller-provided device buffer (layout: InputCheckParams in params.hpp).
/// Only the entries mla_decode() would use are checked: columns 0 .. ceil(L / page_size) - 1 of
/// each row; the tail of a row may hold anything.
///
/// Nothing here synchronises with the host or allocates, so the calls can be captured in a
/// CUDA graph; reading the verdict back is the caller's (synchronising) business.
#pragma once

#include <cstdint>
#include <string>

#include "params.hpp"

namespace flash_mla {

namespace input_check {

constexpr int kThreads = 128;
constexpr int kMaxBlocks = 8192;  ///< grid-stride over requests beyond this many CTAs
constexpr unsigned long long kNone = ~0ull;

/// Slot of the result buffer holding the running minimum of the problem keys.
constexpr int kScratchWord = 5;

/// Problems are ordered by (request, slot): slot 0 is the length, slot c + 1 column c.
__device__ __forceinline__ unsigned long long key_of(int request, unsigned slot) {
  return (static_cast<unsigned long long>(request) << 32) | slot;
}

__global__ void init_kernel(int64_t* result) {
  if (threadIdx.x < kInputCheckWords) {
    result[threadIdx.x] = threadIdx.x == kScratchWord ? static_cast<int64_t>(kNone) : 0;
  }
}

/// One CTA per request (grid-stride): thread 0 checks the length, all threads the used pages.
__global__ void __launch_bounds__(kThreads) check_kernel(const InputCheckParams p) {
  auto* first = reinterpret_cast<unsigned long long*>(p.result + kScratchWord);
  auto* count = reinterpret_cast<unsigned long long*>(p.result + 4);
  const long long capacity = static_cast<long long>(p.max_blocks_per_seq) * p.page_size;
  for (int req = blockIdx.x; req < p.batch; req += gridDim.x) {
    const int seqlen = p.cache_seqlens[req];
    if (seqlen < 0 || seqlen > capacity) {
      if (threadIdx.x == 0) {
        atomicMin(first, key_of(req, 0));
        atomicAdd(count, 1ull);
      }
      continue;  // uniform over the CTA: no page of this request is checked
    }
    const int pages = seqlen / p.page_size + (seqlen % p.page_size != 0);  // <= max_blocks_per_seq
    const int32_t* row = p.block_table + static_cast<int64_t>(req) * p.block_table_stride;
    unsigned local_first = 0xffffffffu;
    unsigned long long local_count = 0;
    for (int c = threadIdx.x; c < pages; c += blockDim.x) {
      const int32_t page = row[c];
      if (page < 0 || page >= p.num_blocks) {
        if (local_first == 0xffffffffu) local_first = static_cast<unsigned>(c) + 1;
        ++local_count;
      }
    }
    if (local_count) {
      atomicMin(first, key_of(req, local_first));
      atomicAdd(count, local_count);
    }
  }
}

/// Turns the minimal key into (code, request, column, value).
__global__ void finalize_kernel(const InputCheckParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const unsigned long long key = static_cast<unsigned long long>(p.result[kScratchWord]);
  if (key == kNone) return;  // init_kernel left code 0 (ok)
  const int req = static_cast<int>(key >> 32);
  const unsigned slot = static_cast<unsigned>(key & 0xffffffffu);
  if (slot == 0) {
    p.result[0] = static_cast<int64_t>(InputCheckCode::kBadSeqlen);
    p.result[2] = -1;
    p.result[3] = p.cache_seqlens[req];
  } else {
    p.result[0] = static_cast<int64_t>(InputCheckCode::kBadPage);
    p.result[2] = slot - 1;
    p.result[3] = p.block_table[static_cast<int64_t>(req) * p.block_table_stride + (slot - 1)];
  }
  p.result[1] = req;
}

}  // namespace input_check

/// Launches the check on p.stream (asynchronous). The verdict lands in p.result.
inline Status check_paged_inputs(const InputCheckParams& p) {
  if (p.batch < 0 || p.max_blocks_per_seq < 0 || p.num_blocks < 0) {
    return Status::error("batch, max_blocks_per_seq and num_blocks must be >= 0");
  }
  if (!is_supported_page_size(p.page_size)) {
    return Status::error("page_size must be one of 16, 32, 64, 128, 256, got " + std::to_string(p.page_size));
  }
  if (p.result == nullptr || reinterpret_cast<uintptr_t>(p.result) % 8 != 0) {
    return Status::error("result must be a non-null, 8-byte aligned buffer of kInputCheckWords int64");
  }
  if (p.batch > 0 && p.cache_seqlens == nullptr) return Status::error("cache_seqlens is null");
  if (p.batch > 0 && p.max_blocks_per_seq > 0 && p.block_table == nullptr) return Status::error("block_table is null");
  if (p.block_table_stride < 0) return Status::error("block_table_stride must be >= 0");
  input_check::init_kernel<<<1, 32, 0, p.stream>>>(p.result);
  if (p.batch > 0) {
    const int grid = p.batch < input_check::kMaxBlocks ? p.batch : input_check::kMaxBlocks;
    input_check::check_kernel<<<grid, input_check::kThreads, 0, p.stream>>>(p);
  }
  input_check::finalize_kernel<<<1, 32, 0, p.stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::error(std::string("input check launch failed: ") + cudaGetErrorString(err));
  return Status::success();
}

}  // namespace flash_mla
