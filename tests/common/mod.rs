//! What the command-line test files share: running the built binary, and scratch files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `kiln` binary from the repository root, without colour.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("the kiln binary runs")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh, empty directory for one test's files.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tests/specs/micro.toml` with `extra` appended, written into `dir`; returns its path.
pub fn micro_with(dir: &Path, file: &str, extra: &str) -> String {
    let micro = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/specs/micro.toml"),
    )
    .unwrap();
    let path = dir.join(file);
    std::fs::write(&path, format!("{micro}\n{extra}")).unwrap();
    path.to_str().unwrap().to_string()
}
