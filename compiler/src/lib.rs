//! kiln-compiler: spec checking and analysis, lowering to the graph IR, autodiff, fusion and
//! memory planning ([`program::compile`]), and the Rust and CUDA emitters.

pub mod analyze;
pub mod autodiff;
pub mod check;
pub mod diag;
pub mod dsl;
pub mod emit_cuda;
pub mod emit_rust;
pub mod fuse;
pub mod hf;
pub mod hf_weights;
pub mod lower;
pub mod model;
pub mod named_ops;
pub mod names;
pub mod parallel;
pub mod program;
pub mod report;
pub mod source;

// The ground floor kiln-ir holds, at the paths it had when it lived here.
pub use kiln_ir::{ir, keep, plan};
