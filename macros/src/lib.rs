//! kiln-macros: `kiln::model!("specs/x.toml")`, a thin shell over kiln-compiler's Rust
//! emitter that expands a spec into a specialized training module.
//!
//! The macro arrives with the Rust emitter; until then this proc-macro crate exports nothing.
