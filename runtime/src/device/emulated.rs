//! The emulated device (`--device cuda-emulated`): the CUDA plan on the CPU.
//!
//! Memory is host memory, so an address is a host pointer. The generated translation unit is
//! built with the host C++ compiler (`$CXX`, else `g++`) under `kernels/kiln_host.h`, CUDA's
//! execution model on the host (a block's 256 threads are real threads, blocks run one after
//! another), into a shared library that is cached on disk by the hash of its source and
//! loaded with `dlopen`. Each kernel gets a trampoline, `kiln_emu_<kernel>(grid, args)`, that
//! takes its arguments as `cuLaunchKernel` does — an array of pointers to each argument's
//! value — and casts them to the types the kernel's parameters declare (the manifest's
//! `Kernel::params`), so a launch here passes exactly what it would pass to a GPU.
//!
//! GEMMs run on the CPU with cuBLASLt's semantics ([`super::GemmCall`]): operands rounded
//! to the call's format as the interpreter's precision emulation rounds them, FP8 operands
//! read from their codes and scales and accumulated with the policy's accumulation model.
//!
//! Every address a launch or a GEMM reads is checked to lie in an allocated buffer before it
//! is dereferenced here; kernels index within the buffers the plan gave them (what
//! `tests/cuda_host.rs` checks), which this device trusts as a GPU would.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_ir::attrs::Format;
use kiln_ir::cuda::{CudaProgram, Pass, HEADERS, HOST_HEADER};

use super::{BufId, Device, DeviceError, Fp8Operand, GemmCall, GemmOperand, KernelArg};
use crate::numerics::accum::fp8_product;
use crate::numerics::fp8::Fp8Format;
use crate::numerics::gemm::{GemmNumerics, Role};
use crate::numerics::quant::Quantized;

/// Held for every launch: a library is loaded once per process however many devices open it
/// (`dlopen` counts references), and its worker pool, block index and barriers are that
/// library's globals, so launches from different devices or threads must take turns.
static LAUNCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A callback for lines of progress.
type Progress = Box<dyn FnMut(&str) + Send>;

/// A trampoline: `kiln_emu_<kernel>(grid, args)`.
type Trampoline = unsafe extern "C" fn(u64, *const *const c_void);

/// The loaded library of one translation unit.
struct Library {
    handle: *mut c_void,
    kernels: HashMap<String, Trampoline>,
    path: PathBuf,
}

// SAFETY: the library's code is process-global; every launch holds `LAUNCHES`, so one runs at
// a time, which is all the host shim requires.
unsafe impl Send for Library {}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and no trampoline outlives `self`.
        unsafe {
            libc::dlclose(self.handle);
        }
    }
}

/// The CUDA plan's device, emulated on the host.
pub struct Emulated {
    /// Each buffer's words (8-byte aligned) and its size in bytes.
    buffers: Vec<(Vec<u64>, u64)>,
    /// Buffers by start address, for checking the addresses GEMMs read.
    by_address: std::collections::BTreeMap<u64, usize>,
    library: Option<Library>,
    /// Where built libraries are cached.
    cache: PathBuf,
    /// Called with a line while the kernels build (which takes a while the first time).
    progress: Option<Progress>,
    /// The memory the device claims to have, to rehearse a GPU's limit; unlimited if `None`.
    capacity: Option<u64>,
    /// Bytes allocated so far.
    allocated: u64,
}

impl Emulated {
    /// An emulated device caching built kernels under `cache`.
    pub fn new(cache: &Path) -> Emulated {
        Emulated {
            buffers: Vec::new(),
            by_address: Default::default(),
            library: None,
            cache: cache.to_path_buf(),
            progress: None,
            capacity: None,
            allocated: 0,
        }
    }

    /// Claims `bytes` of device memory, as a GPU of that size would: a plan that needs more
    /// is refused before anything is built or allocated, and an allocation past it fails.
    pub fn with_capacity(mut self, bytes: u64) -> Emulated {
        self.capacity = Some(bytes);
        self
    }

    /// Reports progress lines (the host build of the kernels) to `f`.
    pub fn with_progress(mut self, f: impl FnMut(&str) + Send + 'static) -> Emulated {
        self.progress = Some(Box::new(f));
        self
    }

    /// The built library's path, once loaded.
    pub fn library_path(&self) -> Option<&Path> {
        self.library.as_ref().map(|l| l.path.as_path())
    }

    /// Checks that `[address, address + bytes)` lies in one buffer.
    fn check(&self, address: u64, bytes: u64, what: &str) -> Result<(), DeviceError> {
        let found = self
            .by_address
            .range(..=address)
            .next_back()
            .map(|(&start, &i)| (start, self.buffers[i].1));
        match found {
            Some((start, size)) if address + bytes <= start + size.max(1) => Ok(()),
            _ => Err(DeviceError::Call(format!(
                "{what}: {bytes} bytes at {address:#x} are outside every buffer"
            ))),
        }
    }

    /// `rows × cols` f32 of a row-major matrix at `ptr` with rows `ld` apart, packed.
    fn matrix(
        &self,
        ptr: u64,
        rows: u64,
        cols: u64,
        ld: u64,
        what: &str,
    ) -> Result<Vec<f32>, DeviceError> {
        if rows == 0 || cols == 0 {
            return Ok(Vec::new());
        }
        if ld < cols {
            return Err(DeviceError::Call(format!(
                "{what}: leading dimension {ld} below the row length {cols}"
            )));
        }
        self.check(ptr, 4 * ((rows - 1) * ld + cols), what)?;
        // SAFETY: the range lies in one live buffer (checked above), 4-byte aligned as every
        // value's buffer is.
        let all = unsafe {
            std::slice::from_raw_parts(ptr as *const f32, ((rows - 1) * ld + cols) as usize)
        };
        let mut out = Vec::with_capacity((rows * cols) as usize);
        for r in 0..rows {
            let start = (r * ld) as usize;
            out.extend_from_slice(&all[start..start + cols as usize]);
        }
        Ok(out)
    }

    /// An FP8 operand `[outer, k]` as the interpreter's quantized form.
    fn quantized(
        &self,
        op: &Fp8Operand,
        outer: u64,
        k: u64,
        format: Fp8Format,
    ) -> Result<Quantized, DeviceError> {
        let n = outer * k;
        let blocks = outer.div_ceil(op.block[0]) * k.div_ceil(op.block[1]);
        self.check(op.codes, n, "FP8 codes")?;
        self.check(op.scales, 4 * blocks, "FP8 scales")?;
        // SAFETY: both ranges lie in live buffers (checked above).
        let (codes, scales) = unsafe {
            (
                std::slice::from_raw_parts(op.codes as *const u8, n as usize).to_vec(),
                std::slice::from_raw_parts(op.scales as *const f32, blocks as usize).to_vec(),
            )
        };
        Ok(Quantized {
            format,
            rows: outer as usize,
            cols: k as usize,
            block: op.block.map(|b| b as usize),
            codes,
            scales,
        })
    }
}

impl Device for Emulated {
    fn describe(&self) -> String {
        "cuda-emulated (the generated kernels on the host, GEMMs on the CPU)".to_string()
    }

    fn load(&mut self, program: &CudaProgram) -> Result<(), DeviceError> {
        let source = host_unit(program);
        let key = super::fnv1a(&[
            source.as_bytes(),
            compiler().as_bytes(),
            FLAGS.join(" ").as_bytes(),
        ]);
        std::fs::create_dir_all(&self.cache).map_err(|e| {
            DeviceError::Build(format!("cannot create {}: {e}", self.cache.display()))
        })?;
        let path = self.cache.join(format!("host-{key:016x}.so"));
        if !path.exists() {
            if let Some(p) = self.progress.as_mut() {
                p(&format!(
                    "building {} kernels for the host with {} (cached in {})",
                    program.kernels.len(),
                    compiler(),
                    self.cache.display()
                ));
            }
            build(&source, &path)?;
        }
        let names: Vec<&str> = program.kernels.iter().map(|k| k.name.as_str()).collect();
        self.library = Some(open(&path, &names)?);
        Ok(())
    }

    fn alloc(&mut self, bytes: u64) -> Result<BufId, DeviceError> {
        if let Some((free, total)) = self.memory() {
            if bytes > free {
                return Err(DeviceError::Memory {
                    need: bytes,
                    free,
                    total,
                });
            }
        }
        self.allocated += bytes;
        let words = vec![0u64; bytes.div_ceil(8).max(1) as usize];
        let address = words.as_ptr() as u64;
        self.buffers.push((words, bytes));
        self.by_address.insert(address, self.buffers.len() - 1);
        Ok(BufId(self.buffers.len() - 1))
    }

    fn address(&self, buf: BufId) -> u64 {
        self.buffers[buf.0].0.as_ptr() as u64
    }

    fn upload(&mut self, buf: BufId, data: &[u8]) -> Result<(), DeviceError> {
        let (words, size) = &mut self.buffers[buf.0];
        if data.len() as u64 > *size {
            return Err(DeviceError::Call(format!(
                "upload of {} bytes into a buffer of {size}",
                data.len()
            )));
        }
        as_bytes_mut(words)[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn download(&mut self, buf: BufId, out: &mut [u8]) -> Result<(), DeviceError> {
        let (words, size) = &mut self.buffers[buf.0];
        if out.len() as u64 > *size {
            return Err(DeviceError::Call(format!(
                "download of {} bytes from a buffer of {size}",
                out.len()
            )));
        }
        out.copy_from_slice(&as_bytes_mut(words)[..out.len()]);
        Ok(())
    }

    fn launch(
        &mut self,
        kernel: &str,
        grid: u64,
        block: u32,
        _shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        let library = self
            .library
            .as_ref()
            .ok_or_else(|| DeviceError::Call("launch before the kernels were loaded".into()))?;
        let f = library
            .kernels
            .get(kernel)
            .ok_or_else(|| DeviceError::Call(format!("no kernel `{kernel}` was loaded")))?;
        if block != 256 {
            return Err(DeviceError::Call(format!(
                "{kernel}: the host shim runs 256 threads per block, not {block}"
            )));
        }
        for a in args {
            if let KernelArg::Ptr(p) = a {
                self.check(*p, 1, &format!("{kernel}'s pointer argument"))?;
            }
        }
        // Each argument's value in 8 bytes, and the array of pointers to them that
        // cuLaunchKernel takes.
        let values: Vec<[u8; 8]> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => p.to_ne_bytes(),
                KernelArg::I64(v) => v.to_ne_bytes(),
                KernelArg::F32(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_ne_bytes());
                    b
                }
            })
            .collect();
        let pointers: Vec<*const c_void> = values.iter().map(|v| v.as_ptr().cast()).collect();
        let _turn = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the trampoline reads one argument per parameter of the kernel, each of the
        // type the manifest declares; the runner passes one per parameter (checked against
        // the manifest), and the values outlive the call.
        unsafe { f(grid, pointers.as_ptr()) };
        Ok(())
    }

    fn gemm(&mut self, g: &GemmCall) -> Result<(), DeviceError> {
        let (m, n, k) = (g.m, g.n, g.k);
        for batch in 0..g.batch.max(1) {
            let [sa, sb, sc] = g.strides.map(|s| 4 * s * batch);
            let p = match (g.format, g.fp8) {
                // An empty contraction: a product of zeros, whatever the format.
                _ if k == 0 => vec![0f32; (m * n) as usize],
                (Format::E4m3 | Format::E5m2, Some(f)) => {
                    if g.batch > 1 {
                        return Err(DeviceError::Call(
                            "a batched FP8 GEMM (its scales have no batch stride yet)".into(),
                        ));
                    }
                    let format = Fp8Format::of(g.format).expect("an FP8 format");
                    let qa = self.quantized(&f.a, m, k, format)?;
                    let qb = self.quantized(&f.b, n, k, format)?;
                    fp8_product(&qa, &qb, f.accumulation, false)
                }
                (Format::E4m3 | Format::E5m2, None) => {
                    return Err(DeviceError::Call(
                        "an FP8 GEMM without its quantized operands".into(),
                    ))
                }
                (format, _) => {
                    let a = self.operand(&g.a, m, k, sa, "GEMM operand a")?;
                    let b = self.operand(&g.b, k, n, sb, "GEMM operand b")?;
                    let mut p = vec![0f32; (m * n) as usize];
                    GemmNumerics::of(format, None).product(
                        Role::Forward,
                        (m as usize, k as usize, n as usize),
                        (&a, g.a.trans),
                        (&b, g.b.trans),
                        &mut p,
                        false,
                        false,
                    );
                    p
                }
            };
            let bias = match g.bias {
                Some(ptr) => Some(self.matrix(ptr, 1, n, n, "GEMM bias")?),
                None => None,
            };
            let c = g.c + sc;
            if m == 0 || n == 0 {
                continue;
            }
            self.check(c, 4 * ((m - 1) * g.ldc + n), "GEMM output")?;
            // SAFETY: the output range lies in one live buffer (checked above), and no slice
            // of it is alive here.
            let out = unsafe {
                std::slice::from_raw_parts_mut(c as *mut f32, ((m - 1) * g.ldc + n) as usize)
            };
            for r in 0..m as usize {
                let row = &mut out[r * g.ldc as usize..][..n as usize];
                let product = &p[r * n as usize..][..n as usize];
                if g.accumulate {
                    for (y, p) in row.iter_mut().zip(product) {
                        *y += p;
                    }
                } else {
                    row.copy_from_slice(product);
                }
                if let Some(bias) = &bias {
                    for (y, b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                }
            }
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn memory(&mut self) -> Option<(u64, u64)> {
        self.capacity.map(|c| (c.saturating_sub(self.allocated), c))
    }
}

impl Emulated {
    /// A GEMM operand as stored: `op(x)` is `[rows, cols]`, so `x` is `[cols, rows]` when
    /// transposed; packed row-major as stored (the product transposes it).
    fn operand(
        &self,
        op: &GemmOperand,
        rows: u64,
        cols: u64,
        offset: u64,
        what: &str,
    ) -> Result<Vec<f32>, DeviceError> {
        let (r, c) = if op.trans { (cols, rows) } else { (rows, cols) };
        self.matrix(op.ptr + offset, r, c, op.ld, what)
    }
}

/// The bytes of a word buffer.
fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no invalid bit patterns and u8 no alignment; the length covers exactly
    // the words' bytes.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// The host C++ compiler.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_string())
}

/// How the library is built: C++20 (the shim's `std::barrier`), and no contraction of
/// `a * b + c` into fused multiply-adds, so each operation rounds as written (as
/// `tests/cuda_host.rs` builds the same unit).
const FLAGS: [&str; 7] = [
    "-std=c++20",
    "-O2",
    "-pthread",
    "-ffp-contract=off",
    "-shared",
    "-fPIC",
    "-w",
];

/// The translation unit for the host: the shim, the generated kernels (without the CUDA
/// headers the shim replaces), and one trampoline per kernel.
pub fn host_unit(program: &CudaProgram) -> String {
    let unit = program
        .source
        .replace("#include <cuda_runtime.h>\n", "")
        .replace("#include \"kiln_types.cuh\"\n", "")
        .replace("#include \"kiln_reduce.cuh\"\n", "");
    let mut s = format!("#include \"{}\"\n{unit}\n", HOST_HEADER.0);
    s.push_str(
        "// One pool of 256 worker threads runs every launch, one block after another.\n\
         static Pool& kiln_emu_pool() { static Pool pool; return pool; }\n",
    );
    for k in &program.kernels {
        let args: Vec<String> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let t = p.elem.c_name();
                match p.pass {
                    Pass::Value => format!("*(const {t}*)args[{i}]"),
                    Pass::Read => format!("*(const {t}* const*)args[{i}]"),
                    Pass::Write => format!("*({t}* const*)args[{i}]"),
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "extern \"C\" void kiln_emu_{name}(unsigned long long grid, const void* const* args) {{\n    \
             kiln_emu_pool().run(grid, [&] {{ {name}({}); }});\n}}",
            args.join(", "),
            name = k.name
        );
    }
    s
}

/// Builds `source` into the shared library `path` (through a temporary name, so an
/// interrupted build leaves nothing half-written; the build directory is this process's, so
/// ranks building the same library at once do not trip over each other).
fn build(source: &str, path: &Path) -> Result<(), DeviceError> {
    let dir = path.with_extension(format!("build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DeviceError::Build(format!("cannot create {}: {e}", dir.display())))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| DeviceError::Build(format!("cannot write {name}: {e}")))
    };
    for (name, text) in HEADERS.iter().chain([&HOST_HEADER]) {
        write(name, text)?;
    }
    write("unit.cpp", source)?;
    let tmp = dir.join("unit.so");
    let cxx = compiler();
    let out = Command::new(&cxx)
        .args(FLAGS)
        .arg("-I")
        .arg(&dir)
        .arg("-o")
        .arg(&tmp)
        .arg(dir.join("unit.cpp"))
        .output()
        .map_err(|e| DeviceError::Missing {
            library: format!("the host C++ compiler ({e}; set CXX to one)"),
            tried: vec![cxx.clone()],
        })?;
    if !out.status.success() {
        return Err(DeviceError::Build(format!(
            "{cxx} could not build the kernels for the host ({}):\n{}",
            dir.join("unit.cpp").display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        DeviceError::Build(format!(
            "cannot move the library to {}: {e}",
            path.display()
        ))
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Opens the library at `path` and finds the trampoline of every kernel in `names`.
fn open(path: &Path, names: &[&str]) -> Result<Library, DeviceError> {
    let c_path = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| DeviceError::Build(format!("a NUL in the path {}", path.display())))?;
    // SAFETY: dlopen with a valid C string; the library's initializers only set up statics.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        let why = crate::dl_error();
        return Err(DeviceError::Build(format!(
            "cannot load {}: {why}",
            path.display()
        )));
    }
    let mut library = Library {
        handle,
        kernels: HashMap::new(),
        path: path.to_path_buf(),
    };
    for name in names {
        let symbol = CString::new(format!("kiln_emu_{name}")).expect("kernel names have no NUL");
        // SAFETY: looks a symbol up in a library we hold open.
        let f = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
        if f.is_null() {
            return Err(DeviceError::Build(format!(
                "{} has no trampoline for kernel `{name}`",
                path.display()
            )));
        }
        // SAFETY: the symbol is a trampoline defined by `host_unit` with this signature.
        let f: Trampoline = unsafe { std::mem::transmute::<*mut c_void, Trampoline>(f) };
        library.kernels.insert((*name).to_string(), f);
    }
    Ok(library)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Fp8Call, Fp8Operand};
    use crate::numerics::accum::Accumulation;
    use crate::numerics::quant::{quantize, ScaleFormat};
    use crate::numerics::round16;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::data::Rng::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    fn bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    fn upload(d: &mut Emulated, x: &[f32]) -> u64 {
        let b = d.alloc(4 * x.len() as u64).unwrap();
        d.upload(b, &bytes(x)).unwrap();
        d.address(b)
    }

    /// `op(x)[r, c]` of a matrix stored row-major with rows `ld` apart (transposed when
    /// `trans`), from batch `i` at `stride` elements apart.
    fn at(x: &[f32], trans: bool, ld: u64, stride: u64, i: u64, r: u64, c: u64) -> f64 {
        let (row, col) = if trans { (c, r) } else { (r, c) };
        f64::from(x[(i * stride + row * ld + col) as usize])
    }

    /// Every layout cuBLASLt takes — transposes, padded leading dimensions, batch strides, a
    /// bias — against a plain f64 product, with operands rounded as the format says.
    #[test]
    fn gemms_follow_the_layout_the_call_describes() {
        let (m, n, k, batch) = (5u64, 7u64, 9u64, 2u64);
        for format in [Format::Fp32, Format::Bf16] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut d = Emulated::new(Path::new("/nonexistent"));
                // Stored shapes, each row padded by 3 elements.
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (ac + 3, bc + 3, n + 3);
                let (sa, sb, sc) = (ar * lda + 1, br * ldb + 2, m * ldc + 1);
                let a = data((batch * sa) as usize, 1);
                let b = data((batch * sb) as usize, 2);
                let bias = data(n as usize, 3);
                let c_init = vec![7.0f32; (batch * sc) as usize];
                let (pa, pb, pbias) = (
                    upload(&mut d, &a),
                    upload(&mut d, &b),
                    upload(&mut d, &bias),
                );
                let cbuf = d.alloc(4 * c_init.len() as u64).unwrap();
                d.upload(cbuf, &bytes(&c_init)).unwrap();
                let call = GemmCall {
                    m,
                    n,
                    k,
                    a: GemmOperand {
                        ptr: pa,
                        trans: ta,
                        ld: lda,
                    },
                    b: GemmOperand {
                        ptr: pb,
                        trans: tb,
                        ld: ldb,
                    },
                    c: d.address(cbuf),
                    ldc,
                    bias: Some(pbias),
                    batch,
                    strides: [sa, sb, sc],
                    format,
                    fp8: None,
                    accumulate: false,
                };
                d.gemm(&call).unwrap();
                let mut out = vec![0u8; 4 * c_init.len()];
                d.download(cbuf, &mut out).unwrap();
                let out: Vec<f32> = out
                    .chunks_exact(4)
                    .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let r = |x: f64| f64::from(round16(format, x as f32));
                for i in 0..batch {
                    for row in 0..m {
                        for col in 0..ldc {
                            let got = f64::from(out[(i * sc + row * ldc + col) as usize]);
                            if col >= n {
                                assert_eq!(got, 7.0, "padding is left alone");
                                continue;
                            }
                            let want: f64 = (0..k)
                                .map(|j| {
                                    r(at(&a, ta, lda, sa, i, row, j))
                                        * r(at(&b, tb, ldb, sb, i, j, col))
                                })
                                .sum::<f64>()
                                + f64::from(bias[col as usize]);
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{format:?} {ta} {tb} batch {i} [{row}, {col}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// An FP8 GEMM reads K-major codes and block scales and accumulates as the interpreter's
    /// emulation does: bit for bit with `fp8_product` of the same quantized operands.
    #[test]
    fn fp8_gemms_read_codes_and_scales_as_the_emulation() {
        let (m, n, k) = (6u64, 10u64, 32u64);
        let (a, b) = (data((m * k) as usize, 4), data((n * k) as usize, 5));
        let qa = quantize(
            &a,
            m as usize,
            k as usize,
            [1, 8],
            Fp8Format::E4m3,
            ScaleFormat::Fp32,
        )
        .unwrap();
        let qb = quantize(
            &b,
            n as usize,
            k as usize,
            [8, 8],
            Fp8Format::E4m3,
            ScaleFormat::Fp32,
        )
        .unwrap();
        let acc = Accumulation::DEEPSEEK_V3;
        let want = fp8_product(&qa, &qb, acc, true);
        let mut d = Emulated::new(Path::new("/nonexistent"));
        let put = |d: &mut Emulated, bytes: &[u8]| {
            let buf = d.alloc(bytes.len() as u64).unwrap();
            d.upload(buf, bytes).unwrap();
            d.address(buf)
        };
        let operand = |d: &mut Emulated, q: &Quantized, block: [u64; 2]| Fp8Operand {
            codes: put(d, &q.codes),
            scales: put(d, &bytes(&q.scales)),
            block,
        };
        let fa = operand(&mut d, &qa, [1, 8]);
        let fb = operand(&mut d, &qb, [8, 8]);
        let c = d.alloc(4 * m * n).unwrap();
        let call = GemmCall {
            m,
            n,
            k,
            // The f32 operands a GEMM names stay unread when its copies are FP8.
            a: GemmOperand {
                ptr: 0,
                trans: false,
                ld: k,
            },
            b: GemmOperand {
                ptr: 0,
                trans: true,
                ld: k,
            },
            c: d.address(c),
            ldc: n,
            bias: None,
            batch: 1,
            strides: [0; 3],
            format: Format::E4m3,
            fp8: Some(Fp8Call {
                a: fa,
                b: fb,
                accumulation: acc,
            }),
            accumulate: false,
        };
        d.gemm(&call).unwrap();
        let mut out = vec![0u8; (4 * m * n) as usize];
        d.download(c, &mut out).unwrap();
        let got: Vec<u32> = out
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }

    /// An address outside every buffer is refused, not read.
    #[test]
    fn accumulating_gemms_add_and_empty_contractions_give_zeros() {
        let (m, n, k) = (3u64, 4u64, 5u64);
        let (a, b) = (data((m * k) as usize, 6), data((k * n) as usize, 7));
        let mut d = Emulated::new(Path::new("/nonexistent"));
        let put = |d: &mut Emulated, x: &[f32]| {
            let buf = d.alloc(4 * x.len() as u64).unwrap();
            d.upload(buf, &bytes(x)).unwrap();
            buf
        };
        let (ab, bb) = (put(&mut d, &a), put(&mut d, &b));
        let start = vec![0.25f32; (m * n) as usize];
        let c = put(&mut d, &start);
        let call = |k: u64, accumulate: bool| GemmCall {
            m,
            n,
            k,
            a: GemmOperand {
                ptr: d.address(ab),
                trans: false,
                ld: k.max(1),
            },
            b: GemmOperand {
                ptr: d.address(bb),
                trans: false,
                ld: n,
            },
            c: d.address(c),
            ldc: n,
            bias: None,
            batch: 1,
            strides: [0; 3],
            format: Format::Fp32,
            fp8: None,
            accumulate,
        };
        let read = |d: &mut Emulated| {
            let mut out = vec![0u8; (4 * m * n) as usize];
            d.download(c, &mut out).unwrap();
            out.chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        };
        let (accumulating, empty) = (call(k, true), call(0, false));
        d.gemm(&accumulating).unwrap();
        let mut want = vec![0f32; (m * n) as usize];
        crate::cpu::matmul::matmul(
            m as usize, k as usize, n as usize, &a, false, &b, false, &mut want, false,
        );
        let got = read(&mut d);
        for ((g, w), s) in got.iter().zip(&want).zip(&start) {
            assert_eq!(g.to_bits(), (s + w).to_bits());
        }
        d.gemm(&empty).unwrap();
        assert!(read(&mut d).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn addresses_outside_the_buffers_are_refused() {
        let mut d = Emulated::new(Path::new("/nonexistent"));
        let b = d.alloc(16).unwrap();
        let p = d.address(b);
        assert!(d.check(p, 16, "x").is_ok());
        assert!(d.check(p + 8, 16, "x").is_err());
        assert!(d.check(p.wrapping_sub(4096), 4, "x").is_err());
    }
}
