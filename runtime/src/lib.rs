//! kiln-runtime: executes a compiled `Program` on the CPU (the numerical reference) and, behind
//! the `cuda` feature, on NVIDIA GPUs through cudarc.
//!
//! The runtime never parses specs: it receives Programs (or code generated from them) from
//! kiln-compiler. This crate is empty until the IR and CPU-runtime work lands; it is a
//! workspace member now so the crate graph (CLI → compiler, runtime; macros → compiler) is
//! fixed from the start.
