//! What the test files share: running the built binary, scratch directories, and the nvcc
//! and host C++ compiler calls of the CUDA tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::nvcc::{self, Nvcc};

/// Runs the `kiln` binary from the repository root, without colour.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        // Built kernels (the emulated device's libraries) stay in the build tree.
        .env(
            "KILN_CACHE_DIR",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/kiln-cache"),
        )
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

/// nvcc, `None` when the CUDA checks are switched off; a missing nvcc fails the test.
pub fn nvcc(test: &str) -> Option<Nvcc> {
    nvcc::find_or_skip(test).unwrap_or_else(|e| panic!("{e}"))
}

/// The nvcc command `nvcc ARGS -I kernels/ -o OUTPUT SOURCE`, to run.
pub fn nvcc_command(nvcc: &Nvcc, args: &[&str], output: &Path, source: &Path) -> Command {
    let mut command = Command::new(nvcc.path());
    command
        .args(args)
        .arg("-I")
        .arg(nvcc::kernels_dir())
        .arg("-o")
        .arg(output)
        .arg(source);
    command
}

/// The host C++ compiler (`$CXX`, else g++) and its command `CXX FLAGS -I kernels/ -o EXE
/// SOURCE`, to run.
pub fn cxx_command(flags: &[&str], exe: &Path, source: &Path) -> (String, Command) {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    let mut command = Command::new(&cxx);
    command
        .args(flags)
        .arg("-I")
        .arg(nvcc::kernels_dir())
        .arg("-o")
        .arg(exe)
        .arg(source);
    (cxx, command)
}

/// Runs the host C++ compile `cxx_command` made, failing the test when the compiler cannot
/// start.
pub fn run_cxx(cxx: &str, mut command: Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run the host C++ compiler {cxx} (set CXX): {e}"))
}
