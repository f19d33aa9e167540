// kiln_softmax.cuh: online softmax for kiln's generated kernels (attention, cross-entropy).
//
// Provides kiln_softmax_state, the running maximum m and running sum l = sum(exp(x - m)) of
// the values seen so far, with update(x) for one more value and merge(other) for combining the
// states of disjoint parts (per thread, per warp, per tile) in any grouping; the exponential
// kiln_softmax_exp; and kiln_softmax_warp_merge, which merges the states of a warp's 32 lanes.
//
// Numerics: a state starts empty (m = -inf, l = 0). Inputs equal to -inf (masked positions)
// add nothing, and a state that has seen only -inf stays empty: the shift subtracted before
// exponentiating is the running maximum, or 0 while that is -inf, so -inf - -inf (NaN) is
// never formed. A NaN input makes l NaN; so does +inf (as in the mathematical softmax, whose
// exp(+inf - +inf) is undefined). Merging is symmetric: merge(a, b) and merge(b, a) give the
// same bits.
//
// kiln_softmax_exp(x) is exp2f(x * log2(e)): exp2f compiles to the hardware's base-2
// exponential (2 ulp) without expf's extra range reduction. Rounding the product to f32 adds
// a relative error of at most |x| * 2^-24, small for softmax's arguments x - m <= 0 (results
// for x < -104 are 0 or subnormal anyway). It is not the DSL's `exp` activation: that is
// kiln_exp in kiln_math.cuh, computed with expf to match the CPU reference closely.
#pragma once

// log2(e), rounded to f32.
constexpr float KILN_LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float kiln_softmax_exp(float x) {
    return exp2f(x * KILN_LOG2E);
}

struct kiln_softmax_state {
    // The largest value seen (-inf while none, or only -inf, has been seen).
    float m;
    // The sum of exp(x - m) over the values seen.
    float l;

    __device__ __forceinline__ static kiln_softmax_state empty() {
        return kiln_softmax_state{-INFINITY, 0.0f};
    }

    // Adds one value: two exponentials. For many values, reduce a tile's maximum first and
    // merge a state built from it instead.
    __device__ __forceinline__ void update(float x) {
        const float m_new = fmaxf(m, x);
        const float shift = m_new == -INFINITY ? 0.0f : m_new;
        l = l * kiln_softmax_exp(m - shift) + kiln_softmax_exp(x - shift);
        m = m_new;
    }

    // Combines with the state of other values, as if they had been added one by one.
    __device__ __forceinline__ void merge(kiln_softmax_state other) {
        const float m_new = fmaxf(m, other.m);
        const float shift = m_new == -INFINITY ? 0.0f : m_new;
        // __fmul_rn keeps nvcc from contracting a product and the sum into an FMA, which
        // would round the two orders differently: merge(a, b) and merge(b, a) must agree bit
        // for bit, or the lanes of kiln_softmax_warp_merge would end with different states.
        l = __fmul_rn(l, kiln_softmax_exp(m - shift)) +
            __fmul_rn(other.l, kiln_softmax_exp(other.m - shift));
        m = m_new;
    }

    // log(sum(exp(x))) over the values seen: -inf for an empty state.
    __device__ __forceinline__ float log_sum_exp() const {
        return m + logf(l);
    }

    // softmax(x) = exp(x - m) / l for a value x among those seen (the state must have seen a
    // value above -inf).
    __device__ __forceinline__ float prob(float x) const {
        return kiln_softmax_exp(x - m) / l;
    }
};

// Merges the states of the warp's 32 lanes; every lane gets the same result. All 32 lanes
// must call it together.
__device__ __forceinline__ kiln_softmax_state kiln_softmax_warp_merge(kiln_softmax_state s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        kiln_softmax_state other;
        other.m = __shfl_xor_sync(0xffffffffu, s.m, offset);
        other.l = __shfl_xor_sync(0xffffffffu, s.l, offset);
        s.merge(other);
    }
    return s;
}
