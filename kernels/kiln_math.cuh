// kiln_math.cuh: the activation functions of kiln's expression DSL, in f32, for generated
// kernels.
//
// Provides kiln_<name>(x) and its derivative kiln_<name>_grad(x) for each function the DSL
// knows (compiler/src/dsl/expr.rs, Func): silu, gelu, gelu_tanh, relu, sigmoid, tanh, exp,
// softplus. Each is the same stable form as Func::apply and Func::derivative there, in f32:
//   - sigmoid (and silu, gelu_tanh, softplus's derivative, built on it) exponentiates only
//     -|x|, so 1 + e^x is never formed for large x;
//   - gelu uses erfcf on the negative side instead of 1 + erff, keeping the tiny values of the
//     negative tail accurate;
//   - softplus is max(x, 0) + log1p(exp(-|x|));
//   - relu's derivative at 0 is 0.
// NaN propagates through every function value (relu_grad(NaN) is 0, as in Func::derivative).
// The exponentials are expf (not the faster approximation kiln_softmax_exp) so results stay
// within a few ulp of the CPU reference.
#pragma once

// 1/sqrt(2), 1/sqrt(2*pi), sqrt(2/pi), and the cubic coefficient of gelu's tanh form.
constexpr float KILN_FRAC_1_SQRT_2 = 0.70710678118654752f;
constexpr float KILN_FRAC_1_SQRT_2PI = 0.39894228040143268f;
constexpr float KILN_SQRT_2_OVER_PI = 0.79788456080286536f;
constexpr float KILN_GELU_TANH_CUBIC = 0.044715f;

// sigmoid(x) = 1 / (1 + e^-x), as 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0 with
// e = e^-|x|, which never overflows.
__device__ __forceinline__ float kiln_sigmoid(float x) {
    const float e = expf(-fabsf(x));
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

__device__ __forceinline__ float kiln_sigmoid_grad(float x) {
    const float s = kiln_sigmoid(x);
    return s * (1.0f - s);
}

// silu(x) = x * sigmoid(x).
__device__ __forceinline__ float kiln_silu(float x) {
    return x * kiln_sigmoid(x);
}

__device__ __forceinline__ float kiln_silu_grad(float x) {
    const float s = kiln_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

// The standard normal CDF Phi(x), from erff for x >= 0 and erfcf for x < 0.
__device__ __forceinline__ float kiln_normal_cdf(float x) {
    const float z = x * KILN_FRAC_1_SQRT_2;
    return x >= 0.0f ? 0.5f * (1.0f + erff(z)) : 0.5f * erfcf(-z);
}

// gelu(x) = x * Phi(x), the exact form.
__device__ __forceinline__ float kiln_gelu(float x) {
    const float z = x * KILN_FRAC_1_SQRT_2;
    return x >= 0.0f ? 0.5f * x * (1.0f + erff(z)) : 0.5f * x * erfcf(-z);
}

// Phi(x) + x * phi(x).
__device__ __forceinline__ float kiln_gelu_grad(float x) {
    const float pdf = expf(-0.5f * x * x) * KILN_FRAC_1_SQRT_2PI;
    return kiln_normal_cdf(x) + x * pdf;
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
// x * sigmoid(2u), the same value without 1 + tanh(u) cancelling for negative x.
__device__ __forceinline__ float kiln_gelu_tanh(float x) {
    const float u = KILN_SQRT_2_OVER_PI * (x + KILN_GELU_TANH_CUBIC * x * x * x);
    return x * kiln_sigmoid(2.0f * u);
}

__device__ __forceinline__ float kiln_gelu_tanh_grad(float x) {
    const float u = KILN_SQRT_2_OVER_PI * (x + KILN_GELU_TANH_CUBIC * x * x * x);
    const float s = kiln_sigmoid(2.0f * u);
    const float du = KILN_SQRT_2_OVER_PI * (1.0f + 3.0f * KILN_GELU_TANH_CUBIC * x * x);
    return s + x * s * (1.0f - s) * 2.0f * du;
}

// relu(x) = max(x, 0); NaN stays NaN.
__device__ __forceinline__ float kiln_relu(float x) {
    return x < 0.0f ? 0.0f : x;
}

// 1 for x > 0, else 0 (also at 0 and for NaN).
__device__ __forceinline__ float kiln_relu_grad(float x) {
    return x > 0.0f ? 1.0f : 0.0f;
}

__device__ __forceinline__ float kiln_tanh(float x) {
    return tanhf(x);
}

__device__ __forceinline__ float kiln_tanh_grad(float x) {
    const float t = tanhf(x);
    return 1.0f - t * t;
}

__device__ __forceinline__ float kiln_exp(float x) {
    return expf(x);
}

__device__ __forceinline__ float kiln_exp_grad(float x) {
    return expf(x);
}

// softplus(x) = log(1 + e^x), as max(x, 0) + log1p(e^-|x|).
__device__ __forceinline__ float kiln_softplus(float x) {
    return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float kiln_softplus_grad(float x) {
    return kiln_sigmoid(x);
}
