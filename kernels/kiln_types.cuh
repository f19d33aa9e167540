// kiln_types.cuh: number-format conversions for kiln's generated kernels.
//
// Provides f32 <-> bf16 and f32 <-> FP8 (E4M3 and E5M2), one value or two at a time:
//   - f32 -> bf16 rounds to nearest even (as __float2bfloat16_rn); NaN stays NaN.
//   - f32 -> FP8 rounds to nearest even and saturates (__NV_SATFINITE): a finite value beyond
//     the format's largest finite value, or an infinity, becomes that largest value with the
//     input's sign (448 for E4M3, 57344 for E5M2); NaN stays NaN.
//   - bf16 -> f32 and FP8 -> f32 are exact (every bf16 value is an f32 value, every E4M3 and
//     E5M2 value an f16 value, and every f16 value an f32 value).
// FP8 values travel as raw bytes (__nv_fp8_storage_t); a pair (__nv_fp8x2_storage_t) holds the
// first element (.x) in its low byte. Everything here is a thin wrapper over NVIDIA's
// cuda_bf16.h / cuda_fp8.h, which compile to single cvt instructions on sm_90.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

// The largest finite values, for computing FP8 scales (scale = amax / KILN_E4M3_MAX).
constexpr float KILN_E4M3_MAX = 448.0f;
constexpr float KILN_E5M2_MAX = 57344.0f;

// bf16

__device__ __forceinline__ float kiln_bf16_to_f32(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

__device__ __forceinline__ __nv_bfloat16 kiln_f32_to_bf16(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float2 kiln_bf16x2_to_f32x2(__nv_bfloat162 x) {
    return __bfloat1622float2(x);
}

// Packs (x.x, x.y) with x.x in the low half, each rounded to nearest even.
__device__ __forceinline__ __nv_bfloat162 kiln_f32x2_to_bf16x2(float2 x) {
    return __floats2bfloat162_rn(x.x, x.y);
}

// FP8 E4M3

__device__ __forceinline__ __nv_fp8_storage_t kiln_f32_to_e4m3(float x) {
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float kiln_e4m3_to_f32(__nv_fp8_storage_t x) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(x, __NV_E4M3)));
}

__device__ __forceinline__ __nv_fp8x2_storage_t kiln_f32x2_to_e4m3x2(float2 x) {
    return __nv_cvt_float2_to_fp8x2(x, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float2 kiln_e4m3x2_to_f32x2(__nv_fp8x2_storage_t x) {
    return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(x, __NV_E4M3)));
}

// FP8 E5M2

__device__ __forceinline__ __nv_fp8_storage_t kiln_f32_to_e5m2(float x) {
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
}

__device__ __forceinline__ float kiln_e5m2_to_f32(__nv_fp8_storage_t x) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(x, __NV_E5M2)));
}

__device__ __forceinline__ __nv_fp8x2_storage_t kiln_f32x2_to_e5m2x2(float2 x) {
    return __nv_cvt_float2_to_fp8x2(x, __NV_SATFINITE, __NV_E5M2);
}

__device__ __forceinline__ float2 kiln_e5m2x2_to_f32x2(__nv_fp8x2_storage_t x) {
    return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(x, __NV_E5M2)));
}
