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
//! - [`dense`]: matrix products, linear layers, embeddings, norms, cross-entropy.
//! - [`elementwise`]: the activation language's expressions and their gradients.
//! - [`attention`]: RoPE (plain and YaRN, both pair layouts) and causal attention.
//! - [`moe`]: the router, the grouped expert FFN and the sequence-wise balance loss.

pub mod attention;
pub mod dense;
pub mod elementwise;
pub mod moe;

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
            fn exp(self) -> Self {
                <$t>::exp(self)
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
