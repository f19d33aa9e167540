//! kiln-ir: the ground floor that kiln's compiler and runtime share.
//!
//! The graph IR ([`ir`]), the product of compilation ([`program::Program`] with its memory
//! plan ([`plan`]) and keep plan ([`keep`])), the attribute enums and plain structs of a model
//! that ops and backends read ([`attrs`]: formats, norms, routing, YaRN, the optimizer), the
//! activation-expression tree and its compiled form ([`expr`]), and where a parameter lives
//! in a Hugging Face checkpoint ([`hf_layout`]), and the CUDA program of a Program — kernels,
//! launches, GEMMs — that the CUDA emitter writes and the GPU runtime runs ([`cuda`]). It depends on nothing but serde, so the
//! runtime builds without the compiler's parsers and code generators; kiln-compiler
//! re-exports every item at its old path.

pub mod attrs;
pub mod cuda;
pub mod expr;
pub mod hf_layout;
pub mod ir;
pub mod keep;
pub mod plan;
pub mod program;
