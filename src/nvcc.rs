//! The CUDA compile check (tier 3 of the tests): compile CUDA C++ with nvcc for sm_90a, read
//! ptxas's resource report, and hold every kernel to kiln's rules: no register spills, and no
//! stack frame unless `kernels/stack-allowlist.txt` lists the kernel with its reason.
//!
//! No GPU is needed. [`find`] locates nvcc: `$KILN_NVCC`, else the wrapper that
//! `scripts/cuda-toolchain` writes into the repository's `.venv-cuda/` (NVIDIA's pinned nvcc
//! wheels). [`Nvcc::compile`] builds a cubin for `sm_90a` with `-Xptxas -v`; [`parse_ptxas`]
//! turns the report into one [`KernelResources`] per function; [`check`] returns one message
//! per broken rule. `docs/cuda.md` describes the toolchain and the allow-list format.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable naming the nvcc to use; `scripts/test` sets it.
pub const NVCC_ENV: &str = "KILN_NVCC";
/// Set to `1` to skip CUDA compile checks (see [`find_or_skip`]).
pub const SKIP_ENV: &str = "KILN_SKIP_CUDA_COMPILE";
/// The target every kernel is checked for: Hopper with its architecture-specific features
/// (wgmma, setmaxnreg), which generated kernels may use.
pub const GENCODE: &str = "-gencode=arch=compute_90a,code=sm_90a";

/// The repository the `kiln` package was built from.
fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/cuda-toolchain` puts its nvcc wrapper.
pub fn venv_nvcc() -> PathBuf {
    repo_dir().join(".venv-cuda/bin/nvcc")
}

/// The hand-written building blocks (`*.cuh`) generated kernels include; passed as `-I`.
pub fn kernels_dir() -> PathBuf {
    repo_dir().join("kernels")
}

/// The committed stack allow-list.
pub fn allowlist_path() -> PathBuf {
    kernels_dir().join("stack-allowlist.txt")
}

/// Why nvcc could not be found or did not compile.
#[derive(Debug)]
pub enum NvccError {
    /// Neither `$KILN_NVCC` nor the toolchain's virtualenv gives an nvcc.
    NotFound(String),
    /// nvcc could not be started, or a file around it could not be written.
    Io { what: String, error: io::Error },
    /// nvcc ran and failed: the command and everything it printed.
    Failed { command: String, output: String },
}

impl fmt::Display for NvccError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NvccError::NotFound(message) => f.write_str(message),
            NvccError::Io { what, error } => write!(f, "{what}: {error}"),
            NvccError::Failed { command, output } => {
                write!(f, "nvcc failed: {command}\n{output}")
            }
        }
    }
}

impl std::error::Error for NvccError {}

/// An nvcc that compiles kiln's kernels.
#[derive(Clone, Debug)]
pub struct Nvcc {
    path: PathBuf,
    include_dirs: Vec<PathBuf>,
}

/// What [`Nvcc::compile`] produced.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The cubin for sm_90a.
    pub cubin: PathBuf,
    /// Everything nvcc printed (ptxas's report and any warnings), stdout then stderr.
    pub output: String,
    /// The report parsed with [`parse_ptxas`].
    pub resources: Vec<KernelResources>,
}

/// Finds nvcc: `$KILN_NVCC` if set (it must exist), else `.venv-cuda/bin/nvcc` in the
/// repository `kiln` was built from; otherwise an error that says to run
/// `scripts/cuda-toolchain`.
pub fn find() -> Result<Nvcc, NvccError> {
    find_in(std::env::var_os(NVCC_ENV), &venv_nvcc())
}

/// [`find`] with the variable's value and the virtualenv's wrapper given.
fn find_in(from_env: Option<OsString>, venv: &Path) -> Result<Nvcc, NvccError> {
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(Nvcc::at(path))
        } else {
            Err(NvccError::NotFound(format!(
                "{NVCC_ENV}={} is not a file; point it at an nvcc, or unset it to use the one \
                 scripts/cuda-toolchain installs",
                path.display()
            )))
        };
    }
    if venv.is_file() {
        return Ok(Nvcc::at(venv));
    }
    Err(NvccError::NotFound(format!(
        "no nvcc: {NVCC_ENV} is not set and {} does not exist. Run scripts/cuda-toolchain (it \
         installs NVIDIA's pinned CUDA compiler wheels from PyPI into .venv-cuda/ and prints the \
         nvcc path), or set {NVCC_ENV} to another nvcc. To skip the CUDA compile checks on a \
         machine that cannot have one, set {SKIP_ENV}=1.",
        venv.display()
    )))
}

/// For tests: `Ok(None)` when `KILN_SKIP_CUDA_COMPILE=1` (after printing that the check is
/// skipped and why), else [`find`]'s result. A test that needs nvcc fails on `Err`, so a
/// machine without nvcc cannot pass the compile checks by accident.
pub fn find_or_skip(what: &str) -> Result<Option<Nvcc>, NvccError> {
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("skipping {what}: {SKIP_ENV}=1 (CUDA compile checks are off)");
        return Ok(None);
    }
    find().map(Some)
}

impl Nvcc {
    /// The nvcc at `path`, with `kernels/` on the include path.
    pub fn at(path: impl Into<PathBuf>) -> Nvcc {
        Nvcc {
            path: path.into(),
            include_dirs: vec![kernels_dir()],
        }
    }

    /// The nvcc executable.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The arguments [`Nvcc::compile`] passes for `source`, writing `cubin`.
    ///
    /// `-cubin` compiles device code only: the cubin is what the CUDA backend loads, and
    /// skipping the host half halves the time. nvcc still runs the host compiler's
    /// preprocessor.
    pub fn args(&self, source: &Path, cubin: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "-std=c++17".into(),
            GENCODE.into(),
            "-Xptxas".into(),
            "-v".into(),
            "-cubin".into(),
        ];
        for dir in &self.include_dirs {
            args.push("-I".into());
            args.push(dir.into());
        }
        args.push("-o".into());
        args.push(cubin.into());
        args.push(source.into());
        args
    }

    /// Compiles `source` into `out_dir/<stem>.cubin` (creating `out_dir`) and parses
    /// ptxas's report. A failed compile returns everything nvcc printed.
    pub fn compile(&self, source: &Path, out_dir: &Path) -> Result<Compiled, NvccError> {
        std::fs::create_dir_all(out_dir).map_err(|error| NvccError::Io {
            what: format!("cannot create {}", out_dir.display()),
            error,
        })?;
        let stem = source.file_stem().unwrap_or(source.as_os_str());
        let cubin = out_dir.join(stem).with_extension("cubin");
        let args = self.args(source, &cubin);
        let result = Command::new(&self.path)
            .args(&args)
            .output()
            .map_err(|error| NvccError::Io {
                what: format!("cannot run {}", self.path.display()),
                error,
            })?;
        let mut output = String::from_utf8_lossy(&result.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&result.stderr));
        if !result.status.success() {
            let command = std::iter::once(self.path.as_os_str())
                .chain(args.iter().map(|a| a.as_os_str()))
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ");
            return Err(NvccError::Failed {
                command: format!("{command} ({})", result.status),
                output,
            });
        }
        let resources = parse_ptxas(&output);
        Ok(Compiled {
            cubin,
            output,
            resources,
        })
    }
}

/// One function in ptxas's report: a kernel (`__global__`), or a device function that was
/// not inlined, which ptxas reports on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// The symbol as ptxas prints it: plain for `extern "C"`, else Itanium-mangled.
    pub name: String,
    /// A readable form of the name: the name itself when plain, else the qualified function
    /// name from the mangling with any template arguments shown as `<…>` (or the mangled name
    /// when it uses forms this does not read).
    pub readable: String,
    /// Whether this is a kernel (ptxas compiled it as an entry function).
    pub entry: bool,
    /// The target ptxas compiled the kernel for (`sm_90a`); `None` for device functions.
    pub arch: Option<String>,
    /// Registers per thread; `None` when the report has no "Used" line for the function
    /// (always so for device functions).
    pub registers: Option<u32>,
    /// Named barriers used.
    pub barriers: Option<u32>,
    /// Static shared memory in bytes (dynamic shared memory is chosen at launch).
    pub smem_bytes: u64,
    /// Constant memory per bank, `(bank, bytes)`, as reported. ptxas 13.5 reports none for
    /// sm_90a; older targets show bank 0 (the kernel parameters) and others.
    pub cmem_bytes: Vec<(u32, u64)>,
    /// The function's own stack frame and spills; `None` when the report named the function
    /// but had no stack-frame line for it, which [`check`] refuses.
    pub frame: Option<Frame>,
    /// Stack of the kernel and everything it calls ("cumulative stack size"); 0 when not
    /// reported.
    pub cumulative_stack_bytes: u64,
}

/// A function's "N bytes stack frame, S bytes spill stores, L bytes spill loads" line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl KernelResources {
    /// The stack the function needs: its own frame or, for a kernel, the cumulative stack
    /// of everything it calls, whichever is larger.
    pub fn stack_bytes(&self) -> u64 {
        let own = self.frame.map_or(0, |f| f.stack_bytes);
        own.max(self.cumulative_stack_bytes)
    }
}

/// Reads ptxas's `-v` report (from nvcc's output; other lines are ignored) into one record
/// per function, in the order ptxas first names them.
///
/// The report for one target looks like this (ptxas 13.5, sm_90a):
///
/// ```text
/// ptxas info    : Compiling entry function 'staged' for 'sm_90a'
/// ptxas info    : Function properties for staged
///     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 18 registers, used 1 barriers, 32 bytes cumulative stack size, 2048 bytes smem
/// ptxas info    : Function properties for _Z4pickfi
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ```
///
/// A "Used" line belongs to the kernel named by the last "Compiling entry function" line; a
/// stack-frame line to the function named by the "Function properties" line just before it.
/// A report for several targets gives a kernel one record per target.
pub fn parse_ptxas(output: &str) -> Vec<KernelResources> {
    let mut records: Vec<KernelResources> = Vec::new();
    // The record the next stack-frame line belongs to, and the kernel being compiled.
    let mut properties_of: Option<usize> = None;
    let mut compiling: Option<usize> = None;
    for line in output.lines() {
        let trimmed = line.trim();
        if let Some(info) = ptxas_info(trimmed) {
            properties_of = None;
            if let Some(rest) = info.strip_prefix("Compiling entry function '") {
                let Some((name, arch)) = rest.rsplit_once("' for '") else {
                    continue;
                };
                let arch = arch.trim_end_matches('\'');
                // A name already compiled for another target starts a new record.
                let index = match records.iter().rposition(|r| r.name == name) {
                    Some(i) if records[i].arch.as_deref().is_none_or(|a| a == arch) => i,
                    _ => push_record(&mut records, name),
                };
                records[index].entry = true;
                records[index].arch = Some(arch.to_string());
                compiling = Some(index);
            } else if let Some(name) = info.strip_prefix("Function properties for ") {
                let name = name.trim();
                let index = match records.iter().rposition(|r| r.name == name) {
                    Some(i) => i,
                    None => push_record(&mut records, name),
                };
                properties_of = Some(index);
            } else if let Some(used) = info.strip_prefix("Used ") {
                if let Some(index) = compiling {
                    read_used(&mut records[index], used);
                }
            }
        } else if let Some(index) = properties_of.take() {
            if let Some(frame) = read_frame(trimmed) {
                records[index].frame = Some(frame);
            }
        }
    }
    records
}

/// The text after `ptxas info    :`, if the line is one.
fn ptxas_info(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("ptxas info")?.trim_start();
    Some(rest.strip_prefix(':')?.trim())
}

fn push_record(records: &mut Vec<KernelResources>, name: &str) -> usize {
    records.push(KernelResources {
        name: name.to_string(),
        readable: readable_name(name),
        ..KernelResources::default()
    });
    records.len() - 1
}

/// Reads "Used 18 registers, used 1 barriers, 32 bytes cumulative stack size, 2048 bytes
/// smem, 360 bytes cmem[0]" (after "Used "). Items ptxas may add later are ignored.
fn read_used(record: &mut KernelResources, used: &str) {
    for (i, item) in used.split(',').map(str::trim).enumerate() {
        let item = if i == 0 {
            item
        } else {
            item.strip_prefix("used ").unwrap_or(item)
        };
        let Some((number, what)) = item.split_once(' ') else {
            continue;
        };
        let Ok(n) = number.parse::<u64>() else {
            continue;
        };
        match what {
            "registers" => record.registers = u32::try_from(n).ok(),
            "barriers" => record.barriers = u32::try_from(n).ok(),
            "bytes smem" => record.smem_bytes = n,
            "bytes cumulative stack size" => record.cumulative_stack_bytes = n,
            _ => {
                let bank = what
                    .strip_prefix("bytes cmem[")
                    .and_then(|b| b.strip_suffix(']'))
                    .and_then(|b| b.parse::<u32>().ok());
                if let Some(bank) = bank {
                    record.cmem_bytes.push((bank, n));
                }
            }
        }
    }
}

/// Reads "32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads".
fn read_frame(line: &str) -> Option<Frame> {
    let mut numbers = [None; 3];
    for item in line.split(',').map(str::trim) {
        let (number, what) = item.split_once(' ')?;
        let n = number.parse::<u64>().ok()?;
        let slot = match what {
            "bytes stack frame" => 0,
            "bytes spill stores" => 1,
            "bytes spill loads" => 2,
            _ => return None,
        };
        numbers[slot] = Some(n);
    }
    Some(Frame {
        stack_bytes: numbers[0]?,
        spill_store_bytes: numbers[1]?,
        spill_load_bytes: numbers[2]?,
    })
}

/// A readable form of a symbol: itself unless Itanium-mangled (`_Z…`); then the function's
/// qualified name, with `<…>` for template arguments. Mangled forms beyond plain and nested
/// names (substitutions, operators, constructors) give the symbol back unchanged.
pub fn readable_name(symbol: &str) -> String {
    fn source_name(s: &str) -> Option<(&str, &str)> {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let len: usize = s[..digits].parse().ok()?;
        let rest = &s[digits..];
        Some((rest.get(..len)?, &rest[len..]))
    }
    let parse = || -> Option<String> {
        let body = symbol.strip_prefix("_Z")?;
        let mut parts = Vec::new();
        let mut templated = false;
        if let Some(nested) = body.strip_prefix('N') {
            let mut rest = nested.trim_start_matches(['r', 'V', 'K']);
            while !rest.starts_with('E') {
                if rest.starts_with('I') {
                    templated = true;
                    break;
                }
                let (name, after) = source_name(rest)?;
                parts.push(name);
                rest = after;
            }
        } else {
            let (name, after) = source_name(body)?;
            parts.push(name);
            templated = after.starts_with('I');
        }
        if parts.is_empty() {
            return None;
        }
        let mut name = parts.join("::");
        if templated {
            name.push_str("<…>");
        }
        Some(name)
    };
    parse().unwrap_or_else(|| symbol.to_string())
}

/// The committed list of kernels allowed a stack frame, each with a bound and a reason.
///
/// One entry per line: `<kernel> <max stack bytes> # <reason>`, where the kernel is the
/// symbol as ptxas prints it and the reason is required. Lines that are blank or start with
/// `#` are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Allowed>,
}

/// One allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub kernel: String,
    pub max_stack_bytes: u64,
    pub reason: String,
    /// 1-based line in the file.
    pub line: usize,
}

/// A malformed allow-list line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowListError {
    /// 1-based line number.
    pub line: usize,
    pub text: String,
    pub problem: String,
}

impl fmt::Display for AllowListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {} (want `<kernel> <max stack bytes> # <reason>`): `{}`",
            self.line, self.problem, self.text
        )
    }
}

impl std::error::Error for AllowListError {}

impl AllowList {
    /// Parses the allow-list's text; the first malformed line is the error.
    pub fn parse(text: &str) -> Result<AllowList, AllowListError> {
        let mut entries: Vec<Allowed> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let error = |problem: String| AllowListError {
                line,
                text: raw.to_string(),
                problem,
            };
            let (fields, reason) = match trimmed.split_once('#') {
                Some((fields, reason)) if !reason.trim().is_empty() => (fields, reason.trim()),
                _ => return Err(error("no reason after `#`".to_string())),
            };
            let fields: Vec<&str> = fields.split_whitespace().collect();
            let [kernel, bytes] = fields[..] else {
                return Err(error(format!(
                    "expected two fields before `#`, found {}",
                    fields.len()
                )));
            };
            let max_stack_bytes = match bytes.parse::<u64>() {
                Ok(0) => return Err(error("a bound of 0 bytes needs no entry".to_string())),
                Ok(n) => n,
                Err(_) => return Err(error(format!("`{bytes}` is not a number of bytes"))),
            };
            if let Some(first) = entries.iter().find(|e| e.kernel == kernel) {
                return Err(error(format!(
                    "`{kernel}` is already listed on line {}",
                    first.line
                )));
            }
            entries.push(Allowed {
                kernel: kernel.to_string(),
                max_stack_bytes,
                reason: reason.to_string(),
                line,
            });
        }
        Ok(AllowList { entries })
    }

    /// Reads and parses the allow-list at `path`; errors name the file.
    pub fn load(path: &Path) -> Result<AllowList, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        AllowList::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn entries(&self) -> &[Allowed] {
        &self.entries
    }

    /// The entry for `kernel`, if listed.
    pub fn get(&self, kernel: &str) -> Option<&Allowed> {
        self.entries.iter().find(|e| e.kernel == kernel)
    }
}

/// Holds every function in `resources` to kiln's rules and returns one message per
/// violation (none: all is well):
///
/// - no function spills registers, whatever the allow-list says;
/// - a function with a stack (its own frame, or a kernel's cumulative stack) is listed in the
///   allow-list, and its stack is within the listed bound;
/// - the report is complete: every function has its stack-frame line, every kernel its
///   "Used" line.
pub fn check(resources: &[KernelResources], allowlist: &AllowList) -> Vec<String> {
    let mut violations = Vec::new();
    for r in resources {
        let what = if r.entry { "kernel" } else { "device function" };
        let name = if r.readable == r.name {
            format!("{what} {}", r.name)
        } else {
            format!("{what} {} ({})", r.name, r.readable)
        };
        let Some(frame) = r.frame else {
            violations.push(format!(
                "{name}: ptxas's report has no stack-frame line for it"
            ));
            continue;
        };
        if r.entry && r.registers.is_none() {
            violations.push(format!(
                "{name}: ptxas's report has no \"Used … registers\" line for it"
            ));
        }
        if frame.spill_store_bytes > 0 || frame.spill_load_bytes > 0 {
            violations.push(format!(
                "{name}: spills registers ({} bytes spill stores, {} bytes spill loads); \
                 spills are never allowed",
                frame.spill_store_bytes, frame.spill_load_bytes
            ));
        }
        let stack = r.stack_bytes();
        if stack > 0 {
            match allowlist.get(&r.name) {
                None => violations.push(format!(
                    "{name}: uses {stack} bytes of stack, and kernels/stack-allowlist.txt does \
                     not list it (add `{} {stack} # <reason>` if the stack is intended)",
                    r.name
                )),
                Some(allowed) if stack > allowed.max_stack_bytes => violations.push(format!(
                    "{name}: uses {stack} bytes of stack, more than the {} bytes allowed on \
                     line {} of kernels/stack-allowlist.txt ({})",
                    allowed.max_stack_bytes, allowed.line, allowed.reason
                )),
                Some(_) => {}
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nvcc 13.5.37's output for a file written to exercise the parser (a plain kernel, one
    /// with shared memory calling a non-inlined device function, one squeezed by
    /// `__launch_bounds__(1024, 2)` into spilling, and a template kernel), compiled with
    /// `-gencode=arch=compute_90a,code=sm_90a -Xptxas -v -cubin`.
    const SM90A: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6scaledILi3EEvPf' for 'sm_90a'
ptxas info    : Function properties for _Z6scaledILi3EEvPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compile time = 1.710 ms
ptxas info    : Compiling entry function 'squeezed' for 'sm_90a'
ptxas info    : Function properties for squeezed
    6184 bytes stack frame, 7968 bytes spill stores, 8908 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 6184 bytes cumulative stack size
ptxas info    : Compile time = 346.180 ms
ptxas info    : Compiling entry function 'staged' for 'sm_90a'
ptxas info    : Function properties for staged
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 32 bytes cumulative stack size, 2048 bytes smem
ptxas info    : Compile time = 2.495 ms
ptxas info    : Function properties for _Z4pickfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'clean' for 'sm_90a'
ptxas info    : Function properties for clean
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compile time = 1.174 ms
";

    /// The same file's `staged` for sm_80, where ptxas also reports constant memory.
    const SM80_STAGED: &str = "\
ptxas info    : Compiling entry function 'staged' for 'sm_80'
ptxas info    : Function properties for staged
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 32 bytes cumulative stack size, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 1.888 ms
";

    fn frame(stack: u64, stores: u64, loads: u64) -> Option<Frame> {
        Some(Frame {
            stack_bytes: stack,
            spill_store_bytes: stores,
            spill_load_bytes: loads,
        })
    }

    fn kernel(name: &str, registers: u32, frame: Option<Frame>) -> KernelResources {
        KernelResources {
            name: name.to_string(),
            readable: readable_name(name),
            entry: true,
            arch: Some("sm_90a".to_string()),
            registers: Some(registers),
            barriers: Some(0),
            frame,
            ..KernelResources::default()
        }
    }

    #[test]
    fn parses_a_real_report() {
        let parsed = parse_ptxas(SM90A);
        let names: Vec<&str> = parsed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "_Z6scaledILi3EEvPf",
                "squeezed",
                "staged",
                "_Z4pickfi",
                "clean"
            ]
        );
        assert_eq!(
            parsed[0],
            KernelResources {
                readable: "scaled<…>".to_string(),
                ..kernel("_Z6scaledILi3EEvPf", 8, frame(0, 0, 0))
            }
        );
        assert_eq!(
            parsed[1],
            KernelResources {
                cumulative_stack_bytes: 6184,
                ..kernel("squeezed", 32, frame(6184, 7968, 8908))
            }
        );
        assert_eq!(
            parsed[2],
            KernelResources {
                barriers: Some(1),
                smem_bytes: 2048,
                cumulative_stack_bytes: 32,
                ..kernel("staged", 18, frame(32, 0, 0))
            }
        );
        assert_eq!(
            parsed[3],
            KernelResources {
                name: "_Z4pickfi".to_string(),
                readable: "pick".to_string(),
                frame: frame(0, 0, 0),
                ..KernelResources::default()
            }
        );
        assert_eq!(parsed[4], kernel("clean", 10, frame(0, 0, 0)));
    }

    #[test]
    fn reads_constant_memory_and_gives_each_target_its_own_record() {
        let both = format!("{SM90A}{SM80_STAGED}");
        let parsed = parse_ptxas(&both);
        let staged: Vec<&KernelResources> = parsed.iter().filter(|r| r.name == "staged").collect();
        assert_eq!(staged.len(), 2);
        assert_eq!(staged[0].arch.as_deref(), Some("sm_90a"));
        assert_eq!(staged[0].cmem_bytes, []);
        assert_eq!(staged[1].arch.as_deref(), Some("sm_80"));
        assert_eq!(staged[1].cmem_bytes, [(0, 360)]);
        assert_eq!(staged[1].smem_bytes, 2048);
        assert_eq!(staged[1].frame, frame(32, 0, 0));
    }

    #[test]
    fn ignores_other_output_and_keeps_a_missing_frame_missing() {
        let text = "\
x.cu(3): warning #177-D: variable \"unused\" was declared but never referenced
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
ptxas info    : Used 4 registers, used 0 barriers
";
        let parsed = parse_ptxas(text);
        assert_eq!(parsed, [kernel("k", 4, None)]);
        assert_eq!(parse_ptxas("nvcc: nothing to see\n"), []);
    }

    #[test]
    fn check_refuses_spills_unlisted_stacks_and_incomplete_reports() {
        let allow = AllowList::parse("staged 32 # calls pick, which is not inlined\n").unwrap();
        let parsed = parse_ptxas(SM90A);
        assert_eq!(
            check(&parsed, &allow),
            [
                "kernel squeezed: spills registers (7968 bytes spill stores, 8908 bytes spill \
                 loads); spills are never allowed",
                "kernel squeezed: uses 6184 bytes of stack, and kernels/stack-allowlist.txt does \
                 not list it (add `squeezed 6184 # <reason>` if the stack is intended)",
            ]
        );
        // Without its entry, `staged` is refused too.
        let violations = check(&parsed, &AllowList::default());
        assert_eq!(violations.len(), 3);
        assert!(violations[2].starts_with("kernel staged: uses 32 bytes of stack"));

        let over = AllowList::parse("# bounds\n\nstaged 16 # calls pick\n").unwrap();
        let clean: Vec<KernelResources> = parsed
            .iter()
            .filter(|r| r.name != "squeezed")
            .cloned()
            .collect();
        assert_eq!(
            check(&clean, &over),
            ["kernel staged: uses 32 bytes of stack, more than the 16 bytes allowed on line 3 of \
              kernels/stack-allowlist.txt (calls pick)"]
        );

        // A spill is refused even when the stack is allowed, and even in a device function.
        let helper = KernelResources {
            name: "_ZN4kiln6detail4stepEf".to_string(),
            readable: readable_name("_ZN4kiln6detail4stepEf"),
            frame: frame(8, 4, 4),
            ..KernelResources::default()
        };
        let allow = AllowList::parse("_ZN4kiln6detail4stepEf 8 # x\n").unwrap();
        assert_eq!(
            check(std::slice::from_ref(&helper), &allow),
            [
                "device function _ZN4kiln6detail4stepEf (kiln::detail::step): spills registers \
              (4 bytes spill stores, 4 bytes spill loads); spills are never allowed"
            ]
        );

        // A kernel without a stack-frame line, or without its "Used" line.
        let no_frame = kernel("k", 4, None);
        let no_used = KernelResources {
            registers: None,
            ..kernel("u", 4, frame(0, 0, 0))
        };
        assert_eq!(
            check(&[no_frame, no_used], &AllowList::default()),
            [
                "kernel k: ptxas's report has no stack-frame line for it",
                "kernel u: ptxas's report has no \"Used … registers\" line for it",
            ]
        );
        assert_eq!(check(&[], &AllowList::default()), Vec::<String>::new());
    }

    #[test]
    fn a_kernels_stack_includes_what_it_calls() {
        let calls = KernelResources {
            cumulative_stack_bytes: 48,
            ..kernel("calls", 20, frame(0, 0, 0))
        };
        assert_eq!(calls.stack_bytes(), 48);
        let allow = AllowList::parse("calls 48 # its callee keeps an array on the stack").unwrap();
        assert_eq!(
            check(std::slice::from_ref(&calls), &allow),
            Vec::<String>::new()
        );
        assert_eq!(check(&[calls], &AllowList::default()).len(), 1);
    }

    #[test]
    fn allowlist_lines_and_their_errors() {
        let text = "\
# kernels allowed a stack frame

attn_bwd 128 # the per-row softmax state of 32 rows does not fit in registers
  _Z4pickfi   16   #   indexed local array
";
        let list = AllowList::parse(text).unwrap();
        assert_eq!(
            list.entries(),
            [
                Allowed {
                    kernel: "attn_bwd".to_string(),
                    max_stack_bytes: 128,
                    reason: "the per-row softmax state of 32 rows does not fit in registers"
                        .to_string(),
                    line: 3,
                },
                Allowed {
                    kernel: "_Z4pickfi".to_string(),
                    max_stack_bytes: 16,
                    reason: "indexed local array".to_string(),
                    line: 4,
                },
            ]
        );

        let cases = [
            ("k 16", "no reason after `#`"),
            ("k 16 #   ", "no reason after `#`"),
            ("k # why", "expected two fields before `#`, found 1"),
            ("k 16 32 # why", "expected two fields before `#`, found 3"),
            ("k sixteen # why", "`sixteen` is not a number of bytes"),
            ("k -16 # why", "`-16` is not a number of bytes"),
            ("k 0 # why", "a bound of 0 bytes needs no entry"),
        ];
        for (line, problem) in cases {
            let text = format!("# header\n{line}\n");
            let error = AllowList::parse(&text).unwrap_err();
            assert_eq!(
                error,
                AllowListError {
                    line: 2,
                    text: line.to_string(),
                    problem: problem.to_string(),
                },
                "{line}"
            );
        }
        let duplicate = AllowList::parse("k 16 # a\nj 8 # b\nk 32 # c\n").unwrap_err();
        assert_eq!(duplicate.line, 3);
        assert_eq!(
            duplicate.to_string(),
            "line 3: `k` is already listed on line 1 (want `<kernel> <max stack bytes> # \
             <reason>`): `k 32 # c`"
        );
    }

    #[test]
    fn the_committed_allowlist_parses() {
        let text = std::fs::read_to_string(allowlist_path()).unwrap();
        AllowList::parse(&text).unwrap_or_else(|e| panic!("kernels/stack-allowlist.txt: {e}"));
    }

    #[test]
    fn readable_names() {
        assert_eq!(readable_name("softmax_fwd"), "softmax_fwd");
        assert_eq!(readable_name("_Z4pickfi"), "pick");
        assert_eq!(readable_name("_Z6scaledILi3EEvPf"), "scaled<…>");
        assert_eq!(
            readable_name("_ZN4kiln6detail4stepEf"),
            "kiln::detail::step"
        );
        assert_eq!(
            readable_name("_ZN4kiln4gemmILi128EEEvPKfPf"),
            "kiln::gemm<…>"
        );
        assert_eq!(readable_name("_ZNK4kiln5State3getEv"), "kiln::State::get");
        // Forms it does not read come back whole.
        assert_eq!(readable_name("_ZSt4moveIRiEvT_"), "_ZSt4moveIRiEvT_");
        assert_eq!(readable_name("_Z99short"), "_Z99short");
        assert_eq!(readable_name("_Z"), "_Z");
    }

    #[test]
    fn finds_nvcc_from_the_variable_then_the_virtualenv() {
        let dir = std::env::temp_dir().join(format!("kiln-nvcc-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("nvcc");
        std::fs::write(&fake, "").unwrap();
        let absent = dir.join("absent");

        let from_env = find_in(Some(fake.clone().into()), &absent).unwrap();
        assert_eq!(from_env.path(), fake);
        let from_venv = find_in(None, &fake).unwrap();
        assert_eq!(from_venv.path(), fake);
        // An empty variable counts as unset.
        assert_eq!(find_in(Some("".into()), &fake).unwrap().path(), fake);

        let wrong = find_in(Some(absent.clone().into()), &fake).unwrap_err();
        assert!(
            wrong
                .to_string()
                .starts_with(&format!("KILN_NVCC={} is not a file", absent.display())),
            "{wrong}"
        );
        let none = find_in(None, &absent).unwrap_err().to_string();
        assert!(none.contains("Run scripts/cuda-toolchain"), "{none}");
        assert!(none.contains(&absent.display().to_string()), "{none}");
        assert!(none.contains("KILN_SKIP_CUDA_COMPILE=1"), "{none}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compiles_for_sm_90a_with_the_resource_report() {
        let nvcc = Nvcc::at("/opt/nvcc");
        let args = nvcc.args(Path::new("k.cu"), Path::new("out/k.cubin"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let kernels = kernels_dir().display().to_string();
        assert_eq!(
            args,
            [
                "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-Xptxas",
                "-v",
                "-cubin",
                "-I",
                kernels.as_str(),
                "-o",
                "out/k.cubin",
                "k.cu",
            ]
        );
    }
}
