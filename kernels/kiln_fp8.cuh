// kiln_fp8.cuh: fine-grained FP8 scaling (DeepSeek-V3 §3.3.1) for kiln's generated kernels.
//
// Provides
//   - kiln_fp8_scale(amax, format_max, pow2): the scale of a block whose largest magnitude is
//     `amax`;
//   - kiln_tile_amax(m, lanes): the largest magnitude of a tile spread over `lanes`
//     consecutive lanes of a warp;
//   - kiln_quantize4<E5M2>(x, lanes, pow2, &scale): one lane's share of quantizing 1×T
//     activation tiles, T = 4·lanes: its four consecutive elements as four FP8 codes, with
//     the tile's scale.
// The rules are runtime/src/numerics/quant.rs's, which the CPU emulation uses, bit for bit
// (tests/fp8_cuda.rs compiles this header for the host and compares):
//   - scale = amax / format_max in f32 (an IEEE division: kiln compiles kernels without
//     --use_fast_math), raised to at least the smallest normal f32; with `pow2` rounded up to
//     a power of two, so scaling is exact;
//   - an all-zero tile gets scale 1;
//   - a scale whose largest code would overflow f32 is lowered: to the next f32 below, or,
//     with `pow2`, halved (for E4M3 and E5M2 only pow2 scales of tiles whose max-abs is in
//     f32's top binade get there);
//   - code = f32 -> FP8 of x / scale: round to nearest even, saturating, as
//     __nv_cvt_float_to_fp8(…, __NV_SATFINITE, …) (kiln_types.cuh).
// Non-finite elements are outside the contract: the CPU refuses them, and here a NaN is
// ignored by the max (fmaxf) and encodes as NaN. Either way the GEMM reading the tile gives
// NaN, and so does the loss.
//
// Self-contained for NVRTC, which has no CUDA headers: on the device the conversion is the
// sm_89+ instruction itself; compiled for the host (tests) it is cuda_fp8.h's host code.
#pragma once

#ifndef __CUDA_ARCH__
#include <cuda_fp8.h>
#endif

// The largest finite values of the formats.
constexpr float KILN_FP8_E4M3_MAX = 448.0f;
constexpr float KILN_FP8_E5M2_MAX = 57344.0f;

// Two floats as two FP8 codes, `lo` in the low byte: round to nearest even, saturating.
template <bool E5M2>
__device__ __forceinline__ unsigned kiln_fp8x2(float lo, float hi) {
#ifdef __CUDA_ARCH__
    // The instruction puts its first source operand in the upper byte.
    unsigned short d;
    if (E5M2) {
        asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
    }
    return d;
#else
    return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE,
                                    E5M2 ? __NV_E5M2 : __NV_E4M3);
#endif
}

// The smallest normal f32 (FLT_MIN, without <cfloat>, which NVRTC lacks).
constexpr float KILN_F32_MIN_NORMAL = 1.17549435e-38f;

__device__ __forceinline__ unsigned kiln_float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    unsigned b;
    __builtin_memcpy(&b, &x, sizeof b);
    return b;
#endif
}

__device__ __forceinline__ float kiln_bits_float(unsigned b) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    float x;
    __builtin_memcpy(&x, &b, sizeof x);
    return x;
#endif
}

// The scale of a block whose largest magnitude is `amax` (finite, >= 0), for a format whose
// largest finite value is `format_max` (KILN_FP8_E4M3_MAX or KILN_FP8_E5M2_MAX).
__device__ __forceinline__ float kiln_fp8_scale(float amax, float format_max, bool pow2) {
    if (amax == 0.0f) return 1.0f;
    float s = fmaxf(amax / format_max, KILN_F32_MIN_NORMAL);
    if (pow2) {
        // Clear the fraction and step up one binade, unless it was already clear. `s` is
        // normal, so this stays finite.
        const unsigned b = kiln_float_bits(s);
        if (b & 0x007FFFFFu) s = kiln_bits_float((b & 0x7F800000u) + 0x00800000u);
    }
    // Within a rounding (or a binade) of f32's largest value, the largest code times the
    // scale would overflow.
    if ((kiln_float_bits(s * format_max) & 0x7FFFFFFFu) == 0x7F800000u) {
        return pow2 ? s / 2.0f : kiln_bits_float(kiln_float_bits(s) - 1u);
    }
    return s;
}

// The largest of `m` over each group of `lanes` consecutive lanes (a power of two, at most
// 32, groups aligned to multiples of `lanes`). Called by all 32 lanes of the warp together;
// every lane of a group gets the same value.
__device__ __forceinline__ float kiln_tile_amax(float m, int lanes) {
    for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    return m;
}

// One lane's share of quantizing 1×T tiles, T = 4·lanes: lane i of a group of `lanes`
// consecutive lanes holds elements 4i..4i+3 of its tile in `x`. Called by all 32 lanes of the
// warp together (a warp covers 128 elements: 32 / lanes tiles). Returns the four codes, the
// first in the low byte, and sets `*scale` to the tile's scale (the same in every lane of the
// tile).
template <bool E5M2>
__device__ __forceinline__ unsigned kiln_quantize4(float4 x, int lanes, bool pow2, float* scale) {
    const float m = fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w)));
    const float s = kiln_fp8_scale(kiln_tile_amax(m, lanes),
                                   E5M2 ? KILN_FP8_E5M2_MAX : KILN_FP8_E4M3_MAX, pow2);
    *scale = s;
    const unsigned a = kiln_fp8x2<E5M2>(x.x / s, x.y / s);
    const unsigned b = kiln_fp8x2<E5M2>(x.z / s, x.w / s);
    return (a & 0xFFFFu) | (b << 16);
}
