//! Elementwise activation expressions such as `"silu(gate) * up"`: the tree, its evaluation,
//! printing and compiled form live in kiln-ir (`kiln_ir::expr`, re-exported here); this
//! module adds the parser (`parse.rs`, nom), whose grammar `kiln_ir::expr` documents.

pub use kiln_ir::expr::*;

mod parse;

pub use parse::parse_expr;

#[cfg(test)]
mod compiled_tests;
#[cfg(test)]
mod tests;
