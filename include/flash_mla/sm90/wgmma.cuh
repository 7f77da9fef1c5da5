// Warpgroup MMA: shared-memory descriptors for the 128-byte-swizzled layout of traits.hpp, the
// A-operand register fragments, and the four instruction shapes the kernel issues (through
// CuTe's atoms). Nothing here commits or waits: the caller owns the wgmma groups.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include "../common/numeric.cuh"
#include "traits.hpp"

namespace flash_mla::sm90 {

namespace GMMA = cute::SM90::GMMA;
using GMMA::Major;

/// Shared-state-space address of a shared-memory pointer, opaque to the optimiser: descriptors
/// derived from it are rebuilt where used (a few integer ops) instead of ~40 loop-invariant
/// 64-bit descriptors being hoisted into registers the accumulators need.
__device__ __forceinline__ uint32_t smem_addr(const void* smem) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("" : "+r"(addr));
  return addr;
}

/// Shared-memory matrix descriptor, 128-byte swizzle. Byte offsets: `kLeading` between
/// 64-element blocks along MN (MN-major operands; ignored for K-major), `kStride` between
/// 8-row groups.
template <uint32_t kLeading, uint32_t kStride>
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  constexpr uint64_t kFields = (static_cast<uint64_t>((kLeading >> 4) & 0x3FFF) << 16) |
                               (static_cast<uint64_t>((kStride >> 4) & 0x3FFF) << 32) |
                               (static_cast<uint64_t>(1) << 62);  // 128-byte swizzle
  return kFields | ((addr & 0x3FFFF) >> 4);
}

/// Descriptor of a K-major operand of 64 rows at the swizzled block `block`.
__device__ __forceinline__ uint64_t desc_k_major(uint32_t block) { return smem_desc<16, 1024>(block); }

/// Descriptor of V (tokens x channels, channel-contiguous) as the MN-major B operand: 256
/// channels starting at the swizzle block `v_block`.
__device__ __forceinline__ uint64_t desc_v(uint32_t v_block) { return smem_desc<Traits::kColBlockBytes, 1024>(v_block); }

/// The same descriptor `bytes` further on (a multiple of 16; stays inside shared memory): one
/// add, so a chain of wgmma is issued from one base descriptor.
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

/// Byte offsets of k16 step k: along K in a K-major 64-column block, along tokens in V.
constexpr uint32_t kmajor_step(int k) { return 32u * k; }
constexpr uint32_t v_step(int k) { return 16u * 128u * k; }

/// A-operand fragment of one k16 step of a 64-row wgmma, per thread: rows g and g + 8 of its warp's
/// 16, columns 2tq.. and 2tq + 8.. (the mma.sync m16n8k16 layout).
using AFrag = uint32_t[4];

template <typename Element, int N, Major MajorB, bool kRegA>
struct Atom;

#define FLASH_MLA_GMMA_ATOMS(ELEM, TAG)                                                                        \
  template <Major MajorB> struct Atom<ELEM, 64, MajorB, false> { using type = GMMA::MMA_64x64x16_F32##TAG##_SS<Major::K, MajorB>; };   \
  template <Major MajorB> struct Atom<ELEM, 64, MajorB, true> { using type = GMMA::MMA_64x64x16_F32##TAG##_RS<Major::K, MajorB>; };    \
  template <Major MajorB> struct Atom<ELEM, 256, MajorB, false> { using type = GMMA::MMA_64x256x16_F32##TAG##_SS<Major::K, MajorB>; }; \
  template <Major MajorB> struct Atom<ELEM, 256, MajorB, true> { using type = GMMA::MMA_64x256x16_F32##TAG##_RS<Major::K, MajorB>; };
FLASH_MLA_GMMA_ATOMS(__nv_bfloat16, BF16BF16)
FLASH_MLA_GMMA_ATOMS(__half, F16F16)
#undef FLASH_MLA_GMMA_ATOMS

template <typename A, int kTiles, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t a, uint64_t b, float (&acc)[kTiles][4], GMMA::ScaleOut scale,
                                        std::index_sequence<I...>) {
  A::fma(a, b, acc[I / 4][I % 4]..., scale);
}

template <typename A, int kTiles, size_t... I>
__device__ __forceinline__ void gmma_rs(const AFrag& a, uint64_t b, float (&acc)[kTiles][4], GMMA::ScaleOut scale,
                                        std::index_sequence<I...>) {
  A::fma(a[0], a[1], a[2], a[3], b, acc[I / 4][I % 4]..., scale);
}

/// acc (64 x 8*kTiles) = or += A (64 x 16, shared memory) * B (16 x 8*kTiles), one instruction.
template <typename Element, Major MajorB, int kTiles>
__device__ __forceinline__ void mma(uint64_t a, uint64_t b, float (&acc)[kTiles][4], bool accumulate) {
  using A = typename Atom<Element, kTiles * 8, MajorB, false>::type;
  gmma_ss<A>(a, b, acc, accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero, std::make_index_sequence<kTiles * 4>{});
}

/// The same with A from registers.
template <typename Element, Major MajorB, int kTiles>
__device__ __forceinline__ void mma(const AFrag& a, uint64_t b, float (&acc)[kTiles][4], bool accumulate) {
  using A = typename Atom<Element, kTiles * 8, MajorB, true>::type;
  gmma_rs<A>(a, b, acc, accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero, std::make_index_sequence<kTiles * 4>{});
}

template <int kTiles>
__device__ __forceinline__ void fence_accumulators(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) cute::warpgroup_fence_operand(acc[j][e]);
}

template <int kSteps>
__device__ __forceinline__ void fence_fragments(AFrag (&a)[kSteps]) {
#pragma unroll
  for (int k = 0; k < kSteps; ++k)
#pragma unroll
    for (int e = 0; e < 4; ++e) cute::warpgroup_fence_operand(a[k][e]);
}

/// An accumulator of 64 columns (8 tiles) as the A fragments of the next product's 4 k16 steps.
template <typename Element>
__device__ __forceinline__ void to_a_fragments(const float (&acc)[Traits::kSTiles][4], AFrag (&a)[Traits::kKSteps]) {
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    a[k][0] = pack2<Element>(acc[2 * k][0], acc[2 * k][1]);
    a[k][1] = pack2<Element>(acc[2 * k][2], acc[2 * k][3]);
    a[k][2] = pack2<Element>(acc[2 * k + 1][0], acc[2 * k + 1][1]);
    a[k][3] = pack2<Element>(acc[2 * k + 1][2], acc[2 * k + 1][3]);
  }
}

/// Stores A fragments of 64 columns as a swizzled K-major 64 x 64 operand in shared memory;
/// `row` is the thread's first row (g of its warp's 16). One stmatrix.x4 per k16 step: fragment
/// register e is the 8x8 matrix e (rows + 8 for odd e, columns + 8 for e >= 2), and lane t gives
/// the address of row t % 8 of matrix t / 8 (4 instructions instead of 16 32-bit stores).
__device__ __forceinline__ void store_a_fragments(uint8_t* block, int row, const AFrag (&a)[Traits::kKSteps]) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  const int r = row - lane / 4 + lane % 8 + 8 * (m & 1);
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(block));
#pragma unroll
  for (int k = 0; k < Traits::kKSteps; ++k) {
    const uint32_t addr = base + Traits::offset(r, 16 * k + 8 * (m >> 1));
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a[k][0]), "r"(a[k][1]),
                 "r"(a[k][2]), "r"(a[k][3])
                 : "memory");
  }
}

/// Stores an fp32 accumulator of 64 columns as a swizzled K-major 64 x 64 operand.
template <typename Element>
__device__ __forceinline__ void store_a_operand(uint8_t* block, int row, const float (&acc)[Traits::kSTiles][4]) {
  AFrag a[Traits::kKSteps];
  to_a_fragments<Element>(acc, a);
  store_a_fragments(block, row, a);
}

}  // namespace flash_mla::sm90
