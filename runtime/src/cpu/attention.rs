//! Owned by a kernel helper; see cpu/mod.rs.
