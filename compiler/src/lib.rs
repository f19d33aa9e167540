//! kiln-compiler: spec checking, analysis, and (later) lowering, autodiff and code generation.

pub mod analyze;
pub mod autodiff;
pub mod check;
pub mod diag;
pub mod dsl;
pub mod ir;
pub mod lower;
pub mod model;
pub mod ops;
pub mod plan;
pub mod report;
