//! Number formats below f32, emulated exactly on the CPU: what the precision policy of a
//! spec (`[precision]`) means for the numbers a training step computes.
//!
//! - [`fp8`]: E4M3 and E5M2, converted bit-exactly as CUDA's saturating conversion does.
//! - [`quant`]: fine-grained scaling (DeepSeek-V3 §3.3): a scale per 1×128 activation tile
//!   and per 128×128 weight block, from the block's max-abs.
//! - [`accum`]: the tensor core's limited-precision accumulation and its promotion to f32
//!   every N_C elements, and the block-scaled FP8 GEMM built from them.
//! - [`gemm`]: the products of a linear layer or expert under a node's format.
//! - [`store`]: activations kept for the backward pass in the compute format, or as the FP8
//!   tiles their GEMM read.

pub mod accum;
pub mod fp8;
pub mod gemm;
pub mod quant;
pub mod store;

pub use fp8::Fp8Format;

use kiln_ir::attrs::{Format, Fp8};
use kiln_ir::program::Formats;

/// A spec's precision policy as a CPU run emulates it: GEMM operands in their nodes'
/// formats (the graph carries those), FP8 scaling and accumulation from `[precision.fp8]`,
/// activations kept for the backward pass in the compute format ([`store`]), and AdamW's
/// moments stored in theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct Emulation {
    pub fp8: Option<Fp8>,
    /// The compute format (`precision.compute`): kept activations are stored in it when it is
    /// a 16-bit format, except the inputs of FP8 GEMMs, which are kept as FP8 tiles.
    pub activations: Format,
    /// `fp32`, or `bf16`/`fp16`: moments are stored in it.
    pub moments: Format,
    /// Whether kept activations are stored as the policy says (16-bit, FP8 tiles); without,
    /// every value stays f32 as the CUDA plan stores it today, and only the GEMMs' numerics
    /// are emulated — the reference the plan's runs are compared with.
    pub keep_storage: bool,
}

impl Emulation {
    /// The policy of a Program's settings (`Program::settings().formats`).
    pub fn of(formats: &Formats) -> Emulation {
        Emulation {
            fp8: formats.fp8,
            activations: formats.compute,
            moments: formats.moments,
            keep_storage: true,
        }
    }

    /// The same policy with every kept activation stored in f32 (see
    /// [`Emulation::keep_storage`]).
    pub fn with_f32_storage(self) -> Emulation {
        Emulation {
            keep_storage: false,
            ..self
        }
    }
}

/// `x` rounded to nearest even in `format` when it is a 16-bit float (bf16, fp16); unchanged
/// otherwise (f32, and FP8, which needs a scale and goes through [`quant`]).
#[inline]
pub fn round16(format: Format, x: f32) -> f32 {
    match format {
        Format::Bf16 => half::bf16::from_f32(x).to_f32(),
        Format::Fp16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
