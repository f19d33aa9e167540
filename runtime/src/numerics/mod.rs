//! Number formats below f32, emulated exactly on the CPU: what the precision policy of a
//! spec (`[precision]`) means for the numbers a training step computes.
//!
//! - [`fp8`]: E4M3 and E5M2, converted bit-exactly as CUDA's saturating conversion does.
//! - [`quant`]: fine-grained scaling (DeepSeek-V3 §3.3): a scale per 1×128 activation tile
//!   and per 128×128 weight block, from the block's max-abs.
//! - [`accum`]: the tensor core's limited-precision accumulation and its promotion to f32
//!   every N_C elements, and the block-scaled FP8 GEMM built from them.
//! - [`gemm`]: the products of a linear layer or expert under a node's format.

pub mod fp8;

pub use fp8::Fp8Format;
