//! Devices that run a Program's CUDA plan ([`kiln_ir::cuda::CudaProgram`]): the kernels the
//! emitter generated, launched as the manifest says, and its GEMMs with cuBLASLt's semantics.
//!
//! A [`Device`] offers exactly what the plan needs: memory (allocate zeroed, upload, download,
//! the address a pointer argument or a table of pointers carries), kernel launches (grid,
//! block, shared bytes, arguments in the kernel's parameter order), GEMMs ([`GemmCall`]) and a
//! synchronization point. Two devices implement it:
//! - [`emulated::Emulated`] (`--device cuda-emulated`): the generated kernels built for the
//!   host under CUDA's execution model (`kernels/kiln_host.h`), GEMMs by a CPU implementation
//!   of the same semantics. Slow; it proves the plan runner, the manifest and the GEMM
//!   descriptors without a GPU.
//! - `cuda::Cuda` (cargo feature `cuda`, `--device cuda`): the same calls on a GPU through
//!   cudarc — the kernels compiled by NVRTC, GEMMs by cuBLASLt. [`lt`] holds its pure part
//!   (cuBLASLt's column-major view of a [`GemmCall`], FP8 scale layouts, the helper kernels),
//!   tested without a GPU.
//!
//! [`runner::DeviceRunner`] runs a training Program's plan on a device; [`verify`] compares a
//! device's step with the interpreter's, value by value.

use std::fmt;

use kiln_ir::attrs::Format;
use kiln_ir::cuda::CudaProgram;

use crate::numerics::accum::Accumulation;

pub mod arena;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod emulated;
pub mod lt;
pub mod runner;
pub mod verify;

/// Where a command runs its steps (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The interpreter (the default).
    Cpu,
    /// A GPU, through cudarc.
    Cuda,
    /// The CUDA plan on the CPU: the generated kernels built for the host, GEMMs emulated.
    CudaEmulated,
}

impl DeviceKind {
    /// Every kind, as `--device` spells them.
    pub const ALL: [DeviceKind; 3] = [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::CudaEmulated];

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::CudaEmulated => "cuda-emulated",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown device `{s}`: expected cpu, cuda or cuda-emulated"))
    }
}

/// Why a device could not do what the plan asked.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceError {
    /// Something the device needs was not found: what (in words), and the names searched.
    Missing { library: String, tried: Vec<String> },
    /// The kernels could not be built or loaded.
    Build(String),
    /// A launch, GEMM or copy was refused: what, and why.
    Call(String),
    /// The plan needs more memory than the device has free (bytes).
    Memory { need: u64, free: u64, total: u64 },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::Missing { library, tried } => {
                write!(
                    f,
                    "{library} was not found (searched: {})",
                    tried.join(", ")
                )
            }
            DeviceError::Build(m) | DeviceError::Call(m) => f.write_str(m),
            DeviceError::Memory { need, free, total } => write!(
                f,
                "the plan needs {need} bytes of device memory, but {free} of the device's \
                 {total} are free"
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

/// A buffer of device memory, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub usize);

/// A kernel argument as a launch passes it: a device address, or a value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I64(i64),
    F32(f32),
}

/// One operand of a [`GemmCall`]: a row-major matrix at `ptr` whose rows are `ld` elements
/// apart; `op` transposes it when `trans`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmOperand {
    pub ptr: u64,
    pub trans: bool,
    pub ld: u64,
}

/// An FP8 operand: K-major codes (one byte per element, `[outer, k]` row-major) and one f32
/// scale per `block` of elements (`[outer / block[0], k / block[1]]`, rounded up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Operand {
    pub codes: u64,
    pub scales: u64,
    pub block: [u64; 2],
}

/// The FP8 operands of a block-scaled GEMM and how its products accumulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Call {
    pub a: Fp8Operand,
    pub b: Fp8Operand,
    pub accumulation: Accumulation,
}

/// A matrix product as cuBLASLt computes it, row-major:
/// `c[m, n] = op(a)[m, k] · op(b)[k, n] (+ bias[n])`, `batch` times with the given element
/// strides between matrices. Operands in `format` (`fp32` as they are, `bf16`/`fp16` rounded
/// to nearest even, FP8 from `fp8`'s codes and scales), accumulation and output in f32. With
/// `k = 0` the product is zero: `c` becomes the bias (or zeros), or keeps its values when
/// accumulating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmCall {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: GemmOperand,
    pub b: GemmOperand,
    pub c: u64,
    pub ldc: u64,
    pub bias: Option<u64>,
    pub batch: u64,
    /// Elements between consecutive matrices of `a`, `b` and `c`.
    pub strides: [u64; 3],
    pub format: Format,
    pub fp8: Option<Fp8Call>,
    /// Adds the product to what `c` holds (cuBLASLt's β = 1) instead of overwriting it.
    pub accumulate: bool,
}

/// What a CUDA plan runs on.
pub trait Device: Send {
    /// One line saying what this device is.
    fn describe(&self) -> String;
    /// Makes `program`'s kernels launchable (compiling them, or loading them from a cache).
    fn load(&mut self, program: &CudaProgram) -> Result<(), DeviceError>;
    /// `bytes` of zeroed memory.
    fn alloc(&mut self, bytes: u64) -> Result<BufId, DeviceError>;
    /// The address of `buf`'s first byte, as pointer arguments and tables carry it.
    fn address(&self, buf: BufId) -> u64;
    /// Copies `data` to the start of `buf`.
    fn upload(&mut self, buf: BufId, data: &[u8]) -> Result<(), DeviceError>;
    /// Copies the start of `buf` into `out`.
    fn download(&mut self, buf: BufId, out: &mut [u8]) -> Result<(), DeviceError>;
    /// Launches `kernel` (a name the loaded program defines) over `grid` blocks of `block`
    /// threads with `args` in its parameter order.
    fn launch(
        &mut self,
        kernel: &str,
        grid: u64,
        block: u32,
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), DeviceError>;
    fn gemm(&mut self, call: &GemmCall) -> Result<(), DeviceError>;
    /// Waits for everything launched so far.
    fn synchronize(&mut self) -> Result<(), DeviceError>;
    /// `(free, total)` bytes of device memory, where the device can say.
    fn memory(&mut self) -> Option<(u64, u64)> {
        None
    }
}

/// The directory kiln caches built kernels in: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`,
/// else `~/.cache/kiln`, else the system's temporary directory.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return std::path::PathBuf::from(d).join("kiln");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return std::path::PathBuf::from(h).join(".cache").join("kiln");
    }
    std::env::temp_dir().join("kiln")
}

/// FNV-1a, 64 bits, over `parts` kept apart: a stable hash for cache keys (not for security).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether a shared library can be loaded under one of `names`; the error names them all.
pub fn find_library(what: &str, names: &[&str]) -> Result<(), DeviceError> {
    for name in names {
        let Ok(c) = std::ffi::CString::new(*name) else {
            continue;
        };
        // SAFETY: dlopen with a valid C string; the handle is closed at once.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            // SAFETY: the handle came from dlopen above.
            unsafe { libc::dlclose(handle) };
            return Ok(());
        }
    }
    Err(DeviceError::Missing {
        library: what.to_string(),
        tried: names.iter().map(|n| n.to_string()).collect(),
    })
}

/// A device chosen at run time (`--device`) is a boxed one.
impl Device for Box<dyn Device> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn load(&mut self, program: &CudaProgram) -> Result<(), DeviceError> {
        (**self).load(program)
    }
    fn alloc(&mut self, bytes: u64) -> Result<BufId, DeviceError> {
        (**self).alloc(bytes)
    }
    fn address(&self, buf: BufId) -> u64 {
        (**self).address(buf)
    }
    fn upload(&mut self, buf: BufId, data: &[u8]) -> Result<(), DeviceError> {
        (**self).upload(buf, data)
    }
    fn download(&mut self, buf: BufId, out: &mut [u8]) -> Result<(), DeviceError> {
        (**self).download(buf, out)
    }
    fn launch(
        &mut self,
        kernel: &str,
        grid: u64,
        block: u32,
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        (**self).launch(kernel, grid, block, shared_bytes, args)
    }
    fn gemm(&mut self, call: &GemmCall) -> Result<(), DeviceError> {
        (**self).gemm(call)
    }
    fn synchronize(&mut self) -> Result<(), DeviceError> {
        (**self).synchronize()
    }

    fn memory(&mut self) -> Option<(u64, u64)> {
        (**self).memory()
    }
}
