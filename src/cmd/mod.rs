//! The bodies of `kiln`'s commands, one module per command; `lib.rs` parses the command line
//! and dispatches here.

pub(crate) mod bench;
pub(crate) mod build;
pub(crate) mod check;
pub(crate) mod diff;
pub(crate) mod emit;
pub(crate) mod exp;
pub(crate) mod gemms;
pub(crate) mod hf;
pub(crate) mod layout;
pub(crate) mod logits;
pub(crate) mod plan;
pub(crate) mod rl;
pub(crate) mod sample;
pub(crate) mod sweep;
pub(crate) mod tokenize;
pub(crate) mod train;
pub(crate) mod verify;
