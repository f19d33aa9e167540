//! kiln-runtime: executes compiled graphs on the CPU (the numerical reference) and, behind
//! the `cuda` feature (to come), on NVIDIA GPUs through cudarc.
//!
//! The runtime never parses specs: it receives graphs (or code generated from them) from
//! kiln-compiler, and plain values (paths, sizes, seeds) from its caller.
//!
//! - [`cpu`]: the kernels, forward and backward side by side, in f32 or f64.
//! - [`exec`]: the interpreter that runs a verified graph with those kernels.
//! - [`train`]: parameters, AdamW, schedules, the training step.
//! - [`checkpoint`]: atomic safetensors checkpoints.
//! - [`data`]: the PRNG, the built-in corpus, text and llm.c token shards, batching.
//! - [`memory`]: process-wide allocator settings for training loops.

pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod exec;
pub mod hf;
pub mod memory;
pub mod ops;
pub mod train;
