//! CPU kernels: the numerical reference every other backend is checked against.
//!
//! Each op of the graph IR has a forward kernel and, where it has parameters or feeds
//! gradients, a backward kernel, side by side. Kernels are plain functions over row-major
//! slices with the shapes written in their doc comments (`x: [rows, n]`), generic over
//! [`Real`] so the same code runs in f32 (training) and f64 (gradient checks against finite
//! differences). They allocate their outputs, never panic on valid shapes (shapes are checked
//! by the IR verifier before anything runs; kernels `debug_assert!` them), and are
//! deterministic for a given thread count.
//!
//! - [`matmul`]: the matrix product on the `gemm` crate.
//! - [`dense`]: linear layers, embeddings, norms, cross-entropy.
//! - [`elementwise`]: the activation language's expressions and their gradients.
//! - [`attention`]: RoPE (plain and YaRN, both pair layouts) and causal attention.
//! - [`moe`]: the router, the grouped expert FFN and the sequence-wise balance loss.

pub mod attention;
pub mod cached_attention;
pub mod dense;
pub mod elementwise;
pub mod matmul;
pub mod moe;
pub mod simd;

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The floating-point types kernels compute in: f32 for training, f64 for gradient checks.
pub trait Real:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
}

/// The exponential the kernels use: [`exp_f32`] in f32, the standard library's in f64.
trait ExpOf {
    fn exp_of(self) -> Self;
}

impl ExpOf for f32 {
    #[inline(always)]
    fn exp_of(self) -> f32 {
        exp_f32(self)
    }
}

impl ExpOf for f64 {
    #[inline(always)]
    fn exp_of(self) -> f64 {
        self.exp()
    }
}

#[inline(always)]
fn exp_of<T: ExpOf>(x: T) -> T {
    x.exp_of()
}

/// `e^x` in f32, within 2 ulp of the exact value (1 ulp over most of the range), with `exp(0)
/// = 1`, overflow to `+∞` above ~88.72, gradual underflow to subnormals and `0`, and NaN kept.
///
/// Written without branches, table lookups or library calls, so that a loop over it
/// vectorizes; and without fused multiply-adds, so that every machine (and every vector width)
/// computes the same bits. The method: `x = n·ln 2 + r` with `n` an integer and
/// `|r| ≤ ln 2 / 2` (ln 2 in two parts, so the reduction is exact), `e^r` by its Taylor
/// polynomial of degree 7 (truncation below 1.5e-8 relative), and `2^n` applied as two
/// factors `2^⌊n/2⌋·2^(n−⌊n/2⌋)`, each a normal float, so results in the subnormal range and
/// overflow come out rounded like one multiplication would.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with 8 trailing zero bits so that n·LN2_HI is exact for
    // |n| < 2^8.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds a float of magnitude below 2^22 to an integer (to nearest even)
    // and leaves that integer in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    // Outside this range the result is 0 or +∞ anyway; clamping keeps n small.
    let c = x.clamp(-104.0, 89.0);
    let t = c * LOG2_E + ROUNDER;
    let n = t - ROUNDER;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let n = t.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let half = n >> 1;
    let scale = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = p * scale(half) * scale(n - half);
    if x.is_nan() {
        x
    } else {
        y
    }
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                exp_of(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_real!(f32);
impl_real!(f64);

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// The distance in units of the last place between `got` and the correctly rounded `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.to_bits() + 1) - w).abs() as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_f32_is_within_two_ulp_over_the_normal_range() {
        let (mut worst, mut at) = (0.0, 0.0);
        // Every 97th float between -87.3 and 88.7 (results stay normal), both signs.
        let lo = (-87.3f32).to_bits();
        let mut bits = 0u32;
        while bits < lo {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if x <= 88.7 {
                    let e = ulps(exp_f32(x), (x as f64).exp());
                    if e > worst {
                        (worst, at) = (e, x);
                    }
                }
            }
            bits += 97;
        }
        assert!(worst <= 2.0, "{worst} ulp at x = {at}");
    }

    #[test]
    fn exp_f32_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(88.73), f32::INFINITY);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::MAX), f32::INFINITY);
        assert_eq!(exp_f32(f32::MIN), 0.0);
        // The largest finite result and gradual underflow.
        assert!(exp_f32(88.72).is_finite());
        for x in [-88.0f32, -95.0, -100.0, -103.0] {
            let (got, want) = (exp_f32(x), (x as f64).exp());
            assert!(got > 0.0 && got < f32::MIN_POSITIVE, "{x}");
            assert!((got as f64 - want).abs() <= 1.5e-45, "{x}: {got} vs {want}");
        }
        assert_eq!(exp_f32(-104.0), 0.0);
    }
}
