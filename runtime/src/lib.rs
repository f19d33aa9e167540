//! kiln-runtime: executes a compiled `Program` on the CPU (the numerical reference) and, behind
//! the `cuda` feature, on NVIDIA GPUs through cudarc.
//!
//! The runtime never parses specs: it receives Programs (or code generated from them) from
//! kiln-compiler, and plain values (paths, sizes, seeds) from its caller.
//!
//! Today the crate holds the data pipeline, [`data`]: a deterministic PRNG, the built-in
//! synthetic corpus with its arithmetic problems, byte-level text, llm.c token shards, sources
//! with their train/validation splits, and batching. Execution arrives with the IR and
//! CPU-runtime work.

pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod exec;
pub mod train;
