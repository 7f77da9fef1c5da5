// Warpgroup MMA on shared-memory operands: descriptors for the 128-byte-swizzled layout of
// traits.hpp, and the two instruction shapes the kernel uses (through CuTe's atoms).
#pragma once

#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_gmma.hpp>

#include "traits.hpp"

namespace flash_mla::sm90 {

namespace GMMA = cute::SM90::GMMA;

/// Shared-memory matrix descriptor, 128-byte swizzle. Byte offsets: `leading` between 64-element
/// blocks along MN (MN-major operands; ignored for K-major), `stride` between 8-row groups.
__device__ __forceinline__ uint64_t smem_desc(const void* smem, uint32_t leading, uint32_t stride) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = (addr & 0x3FFFF) >> 4;
  desc |= static_cast<uint64_t>((leading >> 4) & 0x3FFF) << 16;
  desc |= static_cast<uint64_t>((stride >> 4) & 0x3FFF) << 32;
  desc |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
  return desc;
}

template <typename Element, int N, GMMA::Major MajorB>
struct Gemm;

template <int N, GMMA::Major MajorB>
struct Gemm<__nv_bfloat16, N, MajorB> {
  using Atom = std::conditional_t<N == 32, GMMA::MMA_64x32x16_F32BF16BF16_SS<GMMA::Major::K, MajorB>,
                                  GMMA::MMA_64x256x16_F32BF16BF16_SS<GMMA::Major::K, MajorB>>;
};

template <int N, GMMA::Major MajorB>
struct Gemm<__half, N, MajorB> {
  using Atom = std::conditional_t<N == 32, GMMA::MMA_64x32x16_F32F16F16_SS<GMMA::Major::K, MajorB>,
                                  GMMA::MMA_64x256x16_F32F16F16_SS<GMMA::Major::K, MajorB>>;
};

template <typename Atom, int kTiles, size_t... I>
__device__ __forceinline__ void gmma_call(uint64_t a, uint64_t b, float (&acc)[kTiles][4], GMMA::ScaleOut scale,
                                          std::index_sequence<I...>) {
  Atom::fma(a, b, acc[I / 4][I % 4]..., scale);
}

/// acc (64 x 8*kTiles per warpgroup) = or += A (64 x 16) * B (16 x 8*kTiles), one instruction.
template <typename Element, GMMA::Major MajorB, int kTiles>
__device__ __forceinline__ void gmma(uint64_t a, uint64_t b, float (&acc)[kTiles][4], bool accumulate) {
  using Atom = typename Gemm<Element, kTiles * 8, MajorB>::Atom;
  gmma_call<Atom>(a, b, acc, accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero,
                  std::make_index_sequence<kTiles * 4>{});
}

template <int kTiles>
__device__ __forceinline__ void fence_accumulators(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) cute::warpgroup_fence_operand(acc[j][e]);
}

/// S (64 x 32 tokens of this warpgroup) = Q K^T; Q and K are K-major, 9 swizzle blocks wide.
template <typename Element>
__device__ __forceinline__ void gemm_qk(const uint8_t* q, const uint8_t* k_tokens, float (&s)[Traits::kSTiles][4]) {
  fence_accumulators(s);
  cute::warpgroup_arrive();
#pragma unroll
  for (int ks = 0; ks < Traits::kQkSteps; ++ks) {
    const int offset = (ks / 4) * Traits::kColBlockBytes + (ks % 4) * 32;
    gmma<Element, GMMA::Major::K>(smem_desc(q + offset, 16, 1024), smem_desc(k_tokens + offset, 16, 1024), s, ks > 0);
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  fence_accumulators(s);
}

/// O (64 x 256 channels of this warpgroup) += P V; P is K-major (one block), V MN-major.
template <typename Element>
__device__ __forceinline__ void gemm_pv(const uint8_t* p, const uint8_t* v_channels, float (&o)[Traits::kOTiles][4]) {
  fence_accumulators(o);
  cute::warpgroup_arrive();
#pragma unroll
  for (int ks = 0; ks < Traits::kPvSteps; ++ks) {
    gmma<Element, GMMA::Major::MN>(smem_desc(p + ks * 32, 16, 1024),
                                   smem_desc(v_channels + ks * 16 * 128, Traits::kColBlockBytes, 1024), o, true);
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  fence_accumulators(o);
}

}  // namespace flash_mla::sm90
