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
// Self-contained, for NVRTC, which has no CUDA headers, and for host compilers: on the device
// the conversion is the sm_89+ instruction itself; on the host (tests, and the CPU emulation
// of generated kernels) it is kiln_fp8_encode_host, checked against cuda_fp8.h's host code.
#pragma once

// The largest finite values of the formats.
constexpr float KILN_FP8_E4M3_MAX = 448.0f;
constexpr float KILN_FP8_E5M2_MAX = 57344.0f;

// The smallest normal f32 (FLT_MIN, without <cfloat>, which NVRTC lacks).
constexpr float KILN_F32_MIN_NORMAL = 1.17549435e-38f;

// The bit casts serve the host encoder too, so under nvcc (and NVRTC) they are host and device
// functions; host compilers that are not nvcc see the shim's __device__ (defined away).
#ifdef __CUDACC__
#define KILN_HOST_DEVICE __host__ __device__
#else
#define KILN_HOST_DEVICE __device__
#endif

KILN_HOST_DEVICE __forceinline__ unsigned kiln_float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    unsigned b;
    __builtin_memcpy(&b, &x, sizeof b);
    return b;
#endif
}

KILN_HOST_DEVICE __forceinline__ float kiln_bits_float(unsigned b) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    float x;
    __builtin_memcpy(&x, &b, sizeof x);
    return x;
#endif
}

#ifndef __CUDA_ARCH__
// One float as an FP8 code, as cvt.rn.satfinite computes it, in integer arithmetic (f32
// arithmetic without excess precision, as on x86-64, for the subnormal range).
template <bool E5M2>
inline unsigned kiln_fp8_encode_host(float x) {
    constexpr unsigned M = E5M2 ? 2 : 3;  // fraction bits
    constexpr unsigned BIAS = E5M2 ? 15 : 7;
    constexpr unsigned MAX_CODE = E5M2 ? 0x7B : 0x7E;
    // The largest finite value's f32 bits (57344, 448). Saturation starts half an ulp above
    // it: at the tie itself when the largest code is odd (the tie rounds away from it, to
    // the even code beyond), just above it when even.
    constexpr unsigned MAX_BITS = E5M2 ? 0x47600000u : 0x43E00000u;
    constexpr unsigned MIDPOINT = MAX_BITS + (1u << (23 - M - 1));
    constexpr unsigned SATURATES = (MAX_CODE & 1) ? MIDPOINT : MIDPOINT + 1;
    constexpr unsigned MIN_NORMAL_BITS = (127 + 1 - BIAS) << 23;
    // The smallest subnormal: 2^-16, 2^-9.
    constexpr float MIN_SUBNORMAL = E5M2 ? 1.52587890625e-5f : 1.953125e-3f;
    const unsigned bits = kiln_float_bits(x);
    const unsigned sign = (bits >> 24) & 0x80u;
    const unsigned a = bits & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7Fu;  // NaN
    if (a >= SATURATES) return sign | MAX_CODE;
    unsigned magnitude;
    if (a >= MIN_NORMAL_BITS) {
        // Round the fraction to M bits, ties to even: add just under half an ulp plus the
        // ulp's parity (a carry moves into the exponent), then rebias the exponent.
        constexpr unsigned SHIFT = 23 - M;
        const unsigned rounded = a + ((1u << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1u);
        magnitude = (rounded >> SHIFT) - ((127 - BIAS) << M);
    } else {
        // Subnormal or zero: the count of smallest steps, rounded to nearest even by adding
        // and subtracting 2^23 (exact division by a power of two first).
        const float steps = kiln_bits_float(a) / MIN_SUBNORMAL;
        magnitude = (unsigned)((steps + 8388608.0f) - 8388608.0f);
    }
    return sign | magnitude;
}
#endif

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
    return kiln_fp8_encode_host<E5M2>(lo) | (kiln_fp8_encode_host<E5M2>(hi) << 8);
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
