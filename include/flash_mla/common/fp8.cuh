// FP8 (float8_e4m3fn) inputs: the storage tag the kernels are instantiated with, and the
// conversion to the 16-bit type the tensor cores multiply.
//
// Every e4m3 value is exactly representable in fp16 and in bf16, so widening loses nothing.
// On sm_89 and later the hardware converts two e4m3 to two fp16 in one instruction (NaN kept);
// bf16 goes on through fp32, exactly. Older GPUs (the portable kernel's sm_80 build) use an
// integer-only conversion: moving the 4 exponent and 3 mantissa bits of e4m3 under the fp16
// exponent field gives an fp16 of the value times 2^-8 (subnormals included, since fp16 has
// subnormals 2^8 below e4m3's). Either way the widened value times fp8_widen_scale() is the
// stored value; that factor joins the per-tensor descale, which the kernels apply once per score
// and once per output instead of once per element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flash_mla {

/// Storage tag of a float8_e4m3fn tensor (q or k_cache): one byte per channel.
struct Fp8E4M3 {
  uint8_t bits;
};

/// Whether `Stored` is the FP8 tag (the kernels widen it on chip).
template <typename Stored>
constexpr bool kIsFp8 = false;
template <>
constexpr bool kIsFp8<Fp8E4M3> = true;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define FLASH_MLA_FP8_HARDWARE_CVT 1
#endif

/// The value the widened elements are multiplied by to give float(x) (see the file comment).
__device__ __forceinline__ constexpr float fp8_widen_scale() {
#ifdef FLASH_MLA_FP8_HARDWARE_CVT
  return 1.f;
#else
  return 256.f;
#endif
}

/// Multiplier of the stored values of an input: 1 for 16-bit storage; *descale times
/// fp8_widen_scale() for FP8.
template <typename Stored>
__device__ __forceinline__ float input_scale(const float* descale) {
  if constexpr (kIsFp8<Stored>) {
    return *descale * fp8_widen_scale();
  } else {
    return 1.f;
  }
}

/// Integer-only conversion (older GPUs): two e4m3 bytes held in bits 0-7 and 16-23 of `pair`
/// -> two fp16 (lo, hi) of value * 2^-8.
/// NaN (0x7f, 0xff) stays NaN.
__device__ __forceinline__ uint32_t e4m3_pair_to_scaled_half2(uint32_t pair) {
  const uint32_t magnitude = pair & 0x007f007fu;
  uint32_t h = ((pair & 0x00800080u) << 8) | (magnitude << 7);
  // e4m3 has no infinities and one NaN magnitude (all exponent and mantissa bits set): give it an
  // all-ones fp16 exponent (the mantissa bits 0x380 keep it a NaN).
  h |= __vcmpeq2(magnitude, 0x007f007fu) & 0x7c007c00u;
  return h;
}

/// Four e4m3 bytes (byte i = element i) -> two registers of two Element each (the widened values,
/// see fp8_widen_scale()).
template <typename Element>
__device__ __forceinline__ void e4m3x4_to_scaled(uint32_t four, uint32_t& lo, uint32_t& hi) {
#ifdef FLASH_MLA_FP8_HARDWARE_CVT
  asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(four));
#else
  lo = e4m3_pair_to_scaled_half2(__byte_perm(four, 0u, 0x4140));  // bytes 0, 1
  hi = e4m3_pair_to_scaled_half2(__byte_perm(four, 0u, 0x4342));  // bytes 2, 3
#endif
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    // fp16 -> fp32 -> bf16 is exact for these values (3 mantissa bits, exponents >= 2^-17).
    const auto widen = [](uint32_t h2) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
      __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
      return *reinterpret_cast<uint32_t*>(&b);
    };
    lo = widen(lo);
    hi = widen(hi);
  }
}

/// 16 e4m3 bytes -> 16 widened Element as two 16-byte vectors (elements 0-7, 8-15).
template <typename Element>
__device__ __forceinline__ void e4m3x16_to_scaled(const uint4& in, uint4& first, uint4& second) {
  e4m3x4_to_scaled<Element>(in.x, first.x, first.y);
  e4m3x4_to_scaled<Element>(in.y, first.z, first.w);
  e4m3x4_to_scaled<Element>(in.z, second.x, second.y);
  e4m3x4_to_scaled<Element>(in.w, second.z, second.w);
}

/// 8 e4m3 bytes -> 8 widened Element as one 16-byte vector.
template <typename Element>
__device__ __forceinline__ uint4 e4m3x8_to_scaled(const uint2& in) {
  uint4 out;
  e4m3x4_to_scaled<Element>(in.x, out.x, out.y);
  e4m3x4_to_scaled<Element>(in.y, out.z, out.w);
  return out;
}

/// 16 e4m3 bytes times `scale` -> 16 bf16 as two 16-byte vectors (elements 0-7, 8-15): the
/// token-sparse formats' per-group scales. Exact up to the final rounding to bf16 (none for
/// power-of-two scales in range).
__device__ __forceinline__ void e4m3x16_to_bf16_times(const uint4& in, float scale, uint4& first, uint4& second) {
  const float s = scale * fp8_widen_scale();
  const auto convert4 = [s](uint32_t four, uint32_t& lo, uint32_t& hi) {
    uint32_t h_lo, h_hi;
    e4m3x4_to_scaled<__half>(four, h_lo, h_hi);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h_lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&h_hi));
    __nv_bfloat162 ba = __floats2bfloat162_rn(a.x * s, a.y * s), bb = __floats2bfloat162_rn(b.x * s, b.y * s);
    lo = *reinterpret_cast<uint32_t*>(&ba);
    hi = *reinterpret_cast<uint32_t*>(&bb);
  };
  convert4(in.x, first.x, first.y);
  convert4(in.y, first.z, first.w);
  convert4(in.z, second.x, second.y);
  convert4(in.w, second.z, second.w);
}

}  // namespace flash_mla
