//! The CUDA device (`--device cuda`, cargo feature `cuda`): a CUDA plan on a GPU, through
//! cudarc's driver, NVRTC and cuBLASLt bindings, all loaded at run time.
//!
//! Memory is device memory (`cuMemAlloc`), so an address is a `CUdeviceptr`. The generated
//! translation unit and kiln's helper kernels (`kernels/kiln_device.cu`, [`super::lt`]) are
//! compiled by NVRTC for the GPU's architecture through the on-disk PTX cache
//! ([`crate::cuda::compile_cached`]) and loaded as modules. Everything runs on one stream, in
//! order; copies to and from the host wait for it.
//!
//! GEMMs run on cuBLASLt with [`super::GemmCall`]'s semantics: [`super::lt::lt_problem`] maps the
//! row-major call to cuBLASLt's column-major problem; f32 operands stay f32 (compute
//! `CUBLAS_COMPUTE_32F`, no TF32); bf16/f16 operands are rounded from their f32 storage into
//! scratch by a helper kernel; FP8 operands are k-major codes with block scales, moved into
//! the layout cuBLASLt reads when kiln's differs ([`super::lt::fp8_problem`]). Output f32.
//! A bias is cuBLASLt's BIAS epilogue (f32 bias, f32 output), or a helper kernel after an FP8
//! GEMM. Each distinct problem's descriptors and algorithm are found once and kept.
//!
//! Every call makes the device's context current on the calling thread first, so the device
//! may move between threads (it is `Send`), one call at a time (`&mut self`).

use std::collections::HashMap;
use std::ffi::{c_void, CString};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as drv, sys as dsys};
use kiln_ir::attrs::Format;
use kiln_ir::cuda::{CudaProgram, HEADERS};

use super::lt::{
    fp8_problem, helper_program, lt_problem, nvrtc_arch, LtMatrix, LtProblem, ScaleLayout,
    ScaleMode, Source, HELPER_BLOCK,
};
use super::{BufId, Device, DeviceError, GemmCall, KernelArg};
use crate::cuda::{compile_cached, CudaError};

/// cuBLASLt's workspace: allocated once, offered to every GEMM.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Dynamic shared memory a kernel may use without opting in (`cuFuncSetAttribute`).
const DEFAULT_SHARED_BYTES: u32 = 48 << 10;

/// Checks that the driver, NVRTC and cuBLASLt can be loaded (cudarc panics on first use of a
/// missing one), naming the first that cannot and the file names searched.
pub fn check_libraries() -> Result<(), DeviceError> {
    let missing = |library: &str, names: &[&str]| {
        let mut tried: Vec<String> = Vec::new();
        for candidate in names
            .iter()
            .flat_map(|n| cudarc::get_lib_name_candidates(n))
        {
            if !tried.contains(&candidate) {
                tried.push(candidate);
            }
        }
        DeviceError::Missing {
            library: library.to_string(),
            tried,
        }
    };
    // SAFETY: each check only tries to open the library under its candidate names.
    if !unsafe { dsys::is_culib_present() } {
        return Err(missing(
            "the CUDA driver (libcuda, installed with NVIDIA's GPU driver)",
            &["cuda", "nvcuda"],
        ));
    }
    crate::cuda::nvrtc_available().map_err(from_cuda)?;
    // SAFETY: as above.
    if !unsafe { ltsys::is_culib_present() } {
        return Err(missing(
            "cuBLASLt (libcublasLt, from the CUDA toolkit or NVIDIA's `nvidia-cublas` wheel)",
            &["cublasLt"],
        ));
    }
    Ok(())
}

/// A kernel-compile error as the device reports it.
fn from_cuda(e: CudaError) -> DeviceError {
    match e {
        CudaError::Missing { library, tried } => DeviceError::Missing {
            library: format!("NVRTC (lib{library})"),
            tried,
        },
        e => DeviceError::Build(e.to_string()),
    }
}

/// A driver error, with CUDA's name for it (`CUDA_ERROR_ILLEGAL_ADDRESS`).
fn driver(what: impl std::fmt::Display) -> impl FnOnce(drv::DriverError) -> DeviceError {
    move |e| {
        let name = e
            .error_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        DeviceError::Call(format!("{what}: {name}"))
    }
}

/// A cuBLASLt error, with its status name.
fn cublas(what: impl std::fmt::Display) -> impl FnOnce(lt::CublasError) -> DeviceError {
    move |e| DeviceError::Call(format!("{what}: {:?}", e.0))
}

/// A loaded module and its kernels by name.
struct Module {
    handle: dsys::CUmodule,
    functions: HashMap<String, dsys::CUfunction>,
    /// The hash of the source it was compiled from.
    key: u64,
}

/// A GEMM problem's cuBLASLt descriptors and chosen algorithm.
struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

/// What makes two GEMMs the same problem for cuBLASLt (pointers aside).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    problem: LtProblem,
    format: Format,
    bias: bool,
    scales: Option<(ScaleMode, ScaleMode)>,
}

/// Scratch memory that grows as needed: converted operands, relaid-out scales.
#[derive(Clone, Copy, Default)]
struct Scratch {
    ptr: dsys::CUdeviceptr,
    bytes: usize,
}

/// Scratch slots.
const SCRATCH_A: usize = 0;
const SCRATCH_B: usize = 1;

/// A GPU, through the CUDA driver.
pub struct Cuda {
    ordinal: usize,
    device: dsys::CUdevice,
    /// The device's primary context, retained (null until retained).
    context: dsys::CUcontext,
    stream: dsys::CUstream,
    name: String,
    capability: (i32, i32),
    arch: &'static str,
    memory: usize,
    /// Each buffer's address and size in bytes.
    buffers: Vec<(dsys::CUdeviceptr, u64)>,
    program: Option<Module>,
    helpers: Option<Module>,
    blas: ltsys::cublasLtHandle_t,
    workspace: dsys::CUdeviceptr,
    plans: HashMap<PlanKey, Plan>,
    scratch: [Scratch; 2],
}

// SAFETY: the handles are process-wide driver objects, not tied to a thread; every method
// makes the context current on its thread before using them, and `&mut self` (or the owner's
// exclusive access in `Drop`) keeps calls one at a time.
unsafe impl Send for Cuda {}

impl Cuda {
    /// The GPU `ordinal` (0 for the first), ready for [`Device::load`].
    ///
    /// Fails with [`DeviceError::Missing`] when the driver, NVRTC or cuBLASLt cannot be
    /// loaded (never a panic), and with [`DeviceError::Call`] when there is no such GPU or
    /// kiln does not compile for its architecture.
    pub fn new(ordinal: usize) -> Result<Cuda, DeviceError> {
        check_libraries()?;
        drv::init().map_err(driver("cuInit"))?;
        let count = drv::device::get_count().map_err(driver("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(DeviceError::Call(format!(
                "there is no GPU {ordinal}: the driver sees {count}"
            )));
        }
        let device = drv::device::get(ordinal as i32).map_err(driver("cuDeviceGet"))?;
        let mut cuda = Cuda {
            ordinal,
            device,
            context: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            name: drv::device::get_name(device).map_err(driver("cuDeviceGetName"))?,
            capability: (0, 0),
            arch: "",
            memory: 0,
            buffers: Vec::new(),
            program: None,
            helpers: None,
            blas: std::ptr::null_mut(),
            workspace: 0,
            plans: HashMap::new(),
            scratch: Default::default(),
        };
        // From here on, `Drop` releases whatever was set up if a step fails.
        // SAFETY: `device` came from cuDeviceGet.
        cuda.context = unsafe { drv::primary_ctx::retain(device) }
            .map_err(driver("cuDevicePrimaryCtxRetain"))?;
        cuda.bind()?;
        let attribute = |a| {
            // SAFETY: `device` came from cuDeviceGet.
            unsafe { drv::device::get_attribute(device, a) }.map_err(driver("cuDeviceGetAttribute"))
        };
        use dsys::CUdevice_attribute::*;
        cuda.capability = (
            attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        cuda.arch = nvrtc_arch(cuda.capability)?;
        // SAFETY: as above.
        cuda.memory =
            unsafe { drv::device::total_mem(device) }.map_err(driver("cuDeviceTotalMem"))?;
        cuda.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(driver("cuStreamCreate"))?;
        cuda.blas = lt::create_handle().map_err(cublas("cublasLtCreate"))?;
        // SAFETY: the context is current; the memory is only ever handed to cuBLASLt.
        cuda.workspace = unsafe { drv::malloc_sync(WORKSPACE_BYTES) }
            .map_err(driver("allocating cuBLASLt's workspace"))?;
        Ok(cuda)
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its compute capability, `(major, minor)`.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The architecture NVRTC compiles for (`sm_90a`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// Makes the device's context current on this thread.
    fn bind(&self) -> Result<(), DeviceError> {
        // SAFETY: the context was retained in `new` and is released only in `Drop`.
        unsafe { drv::ctx::set_current(self.context) }.map_err(driver("cuCtxSetCurrent"))
    }

    /// Waits for the stream; an asynchronous failure is reported as `what` failing.
    fn wait(&self, what: &str) -> Result<(), DeviceError> {
        // SAFETY: the stream was created in `new` and is destroyed only in `Drop`.
        unsafe { drv::stream::synchronize(self.stream) }.map_err(driver(what))
    }

    /// Compiles `program` (through the PTX cache) and loads its module.
    fn compile(
        &self,
        program: &CudaProgram,
        headers: &[(&str, &str)],
    ) -> Result<Module, DeviceError> {
        let cache = super::cache_dir().join("nvrtc");
        std::fs::create_dir_all(&cache)
            .map_err(|e| DeviceError::Build(format!("cannot create {}: {e}", cache.display())))?;
        let ptx = compile_cached(&program.source, headers, self.arch, &cache).map_err(from_cuda)?;
        let image = CString::new(ptx.text)
            .map_err(|_| DeviceError::Build(format!("{}: a NUL in the PTX", ptx.path.display())))?;
        // SAFETY: `image` is NUL-terminated PTX text, alive for the call; the context is
        // current (every caller binds first).
        let handle = unsafe { drv::module::load_data(image.as_ptr().cast()) }
            .map_err(driver(format!("loading the PTX of {}", program.name)))?;
        let mut module = Module {
            handle,
            functions: HashMap::new(),
            key: super::fnv1a(&[program.source.as_bytes()]),
        };
        for k in &program.kernels {
            let name = CString::new(k.name.as_str()).expect("kernel names have no NUL");
            // SAFETY: the module was loaded above and is not unloaded while in use.
            let f = match unsafe { drv::module::get_function(module.handle, name) } {
                Ok(f) => f,
                Err(e) => {
                    // SAFETY: loaded above, no function of it escapes.
                    unsafe {
                        let _ = drv::module::unload(module.handle);
                    }
                    return Err(driver(format!("kernel `{}`", k.name))(e));
                }
            };
            if k.shared_bytes > DEFAULT_SHARED_BYTES {
                // SAFETY: `f` is a function of the loaded module.
                unsafe {
                    drv::function::set_function_attribute(
                        f,
                        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        k.shared_bytes as i32,
                    )
                }
                .map_err(driver(format!(
                    "{}: {} bytes of shared memory",
                    k.name, k.shared_bytes
                )))?;
            }
            module.functions.insert(k.name.clone(), f);
        }
        Ok(module)
    }

    /// Launches `f` on the stream: `grid`×1×1 blocks of `block`×1×1 threads, each argument's
    /// value in an 8-byte little-endian slot (a `float` or `int` parameter reads its first 4
    /// bytes), passed as cuLaunchKernel's array of pointers to them.
    fn launch_function(
        &self,
        f: dsys::CUfunction,
        what: &str,
        grid: u64,
        block: u32,
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        if grid == 0 {
            return Ok(());
        }
        let grid = u32::try_from(grid)
            .ok()
            .filter(|&g| g <= i32::MAX as u32)
            .ok_or_else(|| DeviceError::Call(format!("{what}: a grid of {grid} blocks")))?;
        let mut values: Vec<[u8; 8]> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => p.to_le_bytes(),
                KernelArg::I64(v) => v.to_le_bytes(),
                KernelArg::F32(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_le_bytes());
                    b
                }
            })
            .collect();
        let mut pointers: Vec<*mut c_void> =
            values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        // SAFETY: `f` belongs to a loaded module; one argument per parameter (the runner
        // checks launches against the manifest, helpers are launched as declared), each slot
        // as wide as any parameter type; cuLaunchKernel copies the values before returning,
        // and the addresses are device buffers the plan allocated.
        unsafe {
            drv::launch_kernel(
                f,
                (grid, 1, 1),
                (block, 1, 1),
                shared_bytes,
                self.stream,
                &mut pointers,
            )
        }
        .map_err(driver(format!("launching {what}")))
    }

    /// Launches a helper kernel over `n` elements.
    fn helper(&self, kernel: &str, n: u64, args: &[KernelArg]) -> Result<(), DeviceError> {
        let f = self
            .helpers
            .as_ref()
            .and_then(|m| m.functions.get(kernel))
            .ok_or_else(|| DeviceError::Call("a GEMM before the kernels were loaded".into()))?;
        self.launch_function(
            *f,
            kernel,
            n.div_ceil(u64::from(HELPER_BLOCK)),
            HELPER_BLOCK,
            0,
            args,
        )
    }

    /// Scratch slot `slot` with at least `bytes`; growing it waits for the stream first, as
    /// earlier work may still read the old memory.
    fn scratch(&mut self, slot: usize, bytes: u64) -> Result<dsys::CUdeviceptr, DeviceError> {
        let bytes = bytes.max(1) as usize;
        if self.scratch[slot].bytes < bytes {
            self.wait("a GEMM before growing its scratch")?;
            let old = std::mem::take(&mut self.scratch[slot]);
            if old.ptr != 0 {
                // SAFETY: allocated below by an earlier call, no longer in use (waited above).
                unsafe { drv::free_sync(old.ptr) }.map_err(driver("freeing GEMM scratch"))?;
            }
            // SAFETY: the context is current.
            let ptr = unsafe { drv::malloc_sync(bytes) }
                .map_err(driver(format!("allocating {bytes} bytes of GEMM scratch")))?;
            self.scratch[slot] = Scratch { ptr, bytes };
        }
        Ok(self.scratch[slot].ptr)
    }

    /// The descriptors and algorithm of `key`, found once.
    fn plan(&mut self, key: PlanKey) -> Result<&Plan, DeviceError> {
        if !self.plans.contains_key(&key) {
            let plan = make_plan(self.blas, &key)?;
            self.plans.insert(key, plan);
        }
        Ok(&self.plans[&key])
    }

    /// `x`'s operand in 16 bits (`format`) in scratch `slot`: the whole span its layout covers
    /// (with the padding between columns and matrices), so leading dimensions and strides
    /// stay as they are.
    fn rounded_16_bits(
        &mut self,
        x: &LtMatrix,
        ptr: u64,
        batch: u64,
        format: Format,
        slot: usize,
    ) -> Result<u64, DeviceError> {
        let span = if x.rows == 0 || x.cols == 0 {
            0
        } else {
            (batch - 1) * x.stride + (x.cols - 1) * x.ld + x.rows
        };
        let out = self.scratch(slot, 2 * span)?;
        let kernel = if format == Format::Bf16 {
            "kiln_f32_to_bf16"
        } else {
            "kiln_f32_to_f16"
        };
        let args = [
            KernelArg::Ptr(ptr),
            KernelArg::Ptr(out),
            KernelArg::I64(span as i64),
        ];
        self.helper(kernel, span, &args)?;
        Ok(out)
    }

    /// FP8 scales for cuBLASLt: kiln's table at `ptr` as it is, or relaid out in `slot`.
    fn scales(&mut self, ptr: u64, layout: &ScaleLayout, slot: usize) -> Result<u64, DeviceError> {
        if layout.is_kilns() {
            return Ok(ptr);
        }
        let out = self.scratch(slot, 4 * layout.len)?;
        // The padding is never read as a scale; zero it so that nothing stale sits there.
        // SAFETY: `out` holds at least 4·len bytes; the memset is ordered on the stream.
        unsafe { drv::memset_d8_async(out, 0, 4 * layout.len as usize, self.stream) }
            .map_err(driver("clearing FP8 scales"))?;
        let n = layout.rows * layout.cols;
        let args = [
            KernelArg::Ptr(ptr),
            KernelArg::Ptr(out),
            KernelArg::I64(layout.rows as i64),
            KernelArg::I64(layout.cols as i64),
            KernelArg::I64(layout.row_stride as i64),
            KernelArg::I64(layout.col_stride as i64),
        ];
        self.helper("kiln_relayout_scales", n, &args)?;
        Ok(out)
    }

    /// Runs `key`'s plan: `D = op(A)·op(B) (+ D when accumulating)` at `d` (C = D, beta 0 or
    /// 1), with the bias epilogue's pointer and the FP8 scale pointers set for this call.
    fn matmul(
        &mut self,
        key: PlanKey,
        [a, b, d]: [u64; 3],
        bias: Option<u64>,
        scales: Option<(u64, u64)>,
        accumulate: bool,
    ) -> Result<(), DeviceError> {
        let (blas, workspace, stream) = (self.blas, self.workspace, self.stream);
        let plan = self.plan(key)?;
        use ltsys::cublasLtMatmulDescAttributes_t::*;
        let mut pointers = Vec::new();
        if let Some(bias) = bias {
            pointers.push((CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias));
        }
        if let Some((sa, sb)) = scales {
            pointers.push((CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, sa));
            pointers.push((CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, sb));
        }
        for (attribute, ptr) in pointers {
            // SAFETY: the descriptor is alive (owned by the plan); the attribute is a device
            // pointer, 8 bytes, read during the call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attribute,
                    (&ptr as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(cublas(format!("setting {attribute:?}")))?;
        }
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
        // SAFETY: descriptors and layouts are alive and describe the buffers (the runner's
        // allocations, checked by cuBLASLt only against the layouts); alpha and beta are host
        // f32 (the default pointer mode); the workspace holds WORKSPACE_BYTES, which the
        // heuristic was told; the stream is ours.
        unsafe {
            lt::matmul(
                blas,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                d as *const c_void,
                plan.d,
                d as *mut c_void,
                plan.d,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as ltsys::cudaStream_t,
            )
        }
        .map_err(cublas("cublasLtMatmul"))
    }

    /// A product over an empty contraction (an expert's weight gradient when it received no
    /// rows): zeros, added to nothing when accumulating. cuBLASLt takes no `k = 0`.
    fn empty_product(&mut self, call: &GemmCall) -> Result<(), DeviceError> {
        if call.accumulate {
            return Ok(());
        }
        if call.bias.is_some() || call.ldc != call.n || call.batch > 1 {
            return Err(DeviceError::Call(
                "a GEMM with k = 0 and a bias, a strided output or a batch".into(),
            ));
        }
        // SAFETY: the output holds m·n f32s from c (the runner's allocation); the stream is
        // ours and orders the fill with the launches around it.
        unsafe { drv::memset_d8_async(call.c, 0, (4 * call.m * call.n) as usize, self.stream) }
            .map_err(driver("zeroing an empty product"))
    }

    fn fp8_gemm(&mut self, call: &GemmCall) -> Result<(), DeviceError> {
        let p = fp8_problem(call)?;
        let f = call.fp8.expect("fp8_problem checked it");
        // cuBLASLt's A is the call's b, its B the call's a.
        let sa = self.scales(f.b.scales, &p.scales_a, SCRATCH_A)?;
        let sb = self.scales(f.a.scales, &p.scales_b, SCRATCH_B)?;
        let key = PlanKey {
            problem: p.lt,
            format: call.format,
            bias: false,
            scales: Some((p.scales_a.mode, p.scales_b.mode)),
        };
        self.matmul(
            key,
            [f.b.codes, f.a.codes, call.c],
            None,
            Some((sa, sb)),
            call.accumulate,
        )?;
        if let Some(bias) = call.bias {
            // FP8 GEMMs restrict the bias epilogue's types; a helper adds it instead.
            let args = [
                KernelArg::Ptr(call.c),
                KernelArg::Ptr(bias),
                KernelArg::I64(call.m as i64),
                KernelArg::I64(call.n as i64),
                KernelArg::I64(call.ldc as i64),
            ];
            self.helper("kiln_add_bias", call.m * call.n, &args)?;
        }
        Ok(())
    }
}

/// cuBLASLt's data type for operands in `format`.
fn data_type(format: Format) -> ltsys::cudaDataType {
    use ltsys::cudaDataType::*;
    match format {
        Format::Fp32 => CUDA_R_32F,
        Format::Bf16 => CUDA_R_16BF,
        Format::Fp16 => CUDA_R_16F,
        Format::E4m3 => CUDA_R_8F_E4M3,
        Format::E5m2 => CUDA_R_8F_E5M2,
    }
}

/// A matrix layout (column-major) of `x`, batched when `batch > 1`.
fn layout(
    ty: ltsys::cudaDataType,
    rows: u64,
    cols: u64,
    ld: u64,
    batch: u64,
    stride: u64,
) -> Result<ltsys::cublasLtMatrixLayout_t, DeviceError> {
    let l = lt::create_matrix_layout(ty, rows, cols, ld as i64)
        .map_err(cublas("cublasLtMatrixLayoutCreate"))?;
    if batch > 1 {
        use ltsys::cublasLtMatrixLayoutAttribute_t::*;
        let (count, offset) = (batch as i32, stride as i64);
        // SAFETY: `l` was created above; the attributes are an int32 and an int64, as
        // cuBLASLt declares them.
        let set = unsafe {
            lt::set_matrix_layout_attribute(
                l,
                CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                4,
            )
            .and_then(|()| {
                lt::set_matrix_layout_attribute(
                    l,
                    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    (&offset as *const i64).cast(),
                    8,
                )
            })
        };
        if let Err(e) = set {
            // SAFETY: created above, not used after.
            unsafe {
                let _ = lt::destroy_matrix_layout(l);
            }
            return Err(cublas("setting a batched layout")(e));
        }
    }
    Ok(l)
}

/// Creates `key`'s descriptors and asks cuBLASLt's heuristic for an algorithm.
fn make_plan(blas: ltsys::cublasLtHandle_t, key: &PlanKey) -> Result<Plan, DeviceError> {
    let p = &key.problem;
    let ty = data_type(key.format);
    let desc = lt::create_matmul_desc(
        ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ltsys::cudaDataType::CUDA_R_32F,
    )
    .map_err(cublas("cublasLtMatmulDescCreate"))?;
    let mut plan = Plan {
        desc,
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        d: std::ptr::null_mut(),
        algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
    };
    // On any failure below, dropping `plan` destroys what was created.
    use ltsys::cublasLtMatmulDescAttributes_t::*;
    let set = |attribute, value: i32| {
        // SAFETY: the descriptor was created above; every attribute set here is an int32
        // (cublasOperation_t, cublasLtEpilogue_t, cudaDataType, cublasLtMatmulMatrixScale_t).
        unsafe { lt::set_matmul_desc_attribute(desc, attribute, (&value as *const i32).cast(), 4) }
            .map_err(cublas(format!("setting {attribute:?}")))
    };
    // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
    set(CUBLASLT_MATMUL_DESC_TRANSA, i32::from(p.a.trans))?;
    set(CUBLASLT_MATMUL_DESC_TRANSB, i32::from(p.b.trans))?;
    if key.bias {
        set(
            CUBLASLT_MATMUL_DESC_EPILOGUE,
            ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32,
        )?;
        set(
            CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            ltsys::cudaDataType::CUDA_R_32F as i32,
        )?;
    }
    if let Some((a, b)) = key.scales {
        let mode = |m| match m {
            ScaleMode::Vec128 => {
                ltsys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F
            }
            ScaleMode::Blk128x128 => {
                ltsys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
            }
        };
        set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode(a) as i32)?;
        set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode(b) as i32)?;
    }
    plan.a = layout(ty, p.a.rows, p.a.cols, p.a.ld, p.batch, p.a.stride)?;
    plan.b = layout(ty, p.b.rows, p.b.cols, p.b.ld, p.batch, p.b.stride)?;
    plan.d = layout(
        ltsys::cudaDataType::CUDA_R_32F,
        p.m,
        p.n,
        p.ldd,
        p.batch,
        p.stride_d,
    )?;
    let pref = lt::create_matmul_pref().map_err(cublas("cublasLtMatmulPreferenceCreate"))?;
    let limit = WORKSPACE_BYTES as u64;
    // SAFETY: `pref` was created above; the attribute is a uint64.
    let heuristic = unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&limit as *const u64).cast(),
            8,
        )
        .and_then(|()| {
            lt::get_matmul_algo_heuristic(blas, desc, plan.a, plan.b, plan.d, plan.d, pref)
        })
    };
    // SAFETY: created above, not used after.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    let found = heuristic.map_err(|e| {
        DeviceError::Call(format!(
            "cuBLASLt has no algorithm for a {:?} GEMM (m {}, n {}, k {}, batch {}, \
             op(A) {}, op(B) {}, bias {}, scales {:?}): {:?}",
            key.format,
            p.m,
            p.n,
            p.k,
            p.batch,
            if p.a.trans { "T" } else { "N" },
            if p.b.trans { "T" } else { "N" },
            key.bias,
            key.scales,
            e.0
        ))
    })?;
    plan.algo = found.algo;
    Ok(plan)
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by make_plan (or is null) and is destroyed once.
        unsafe {
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Device for Cuda {
    fn describe(&self) -> String {
        format!(
            "cuda:{} {} (compute capability {}.{}, {}, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.capability.0,
            self.capability.1,
            self.arch,
            self.memory as f64 / f64::from(1u32 << 30)
        )
    }

    fn load(&mut self, program: &CudaProgram) -> Result<(), DeviceError> {
        self.bind()?;
        if self.helpers.is_none() {
            self.helpers = Some(self.compile(&helper_program(), &[])?);
        }
        let key = super::fnv1a(&[program.source.as_bytes()]);
        if self.program.as_ref().is_some_and(|m| m.key == key) {
            return Ok(());
        }
        let module = self.compile(program, &HEADERS)?;
        // Nothing may still run the old module's kernels when it goes.
        self.wait("the work before loading new kernels")?;
        if let Some(old) = self.program.replace(module) {
            // SAFETY: loaded by `compile`, idle (waited above), its functions dropped with it.
            unsafe {
                let _ = drv::module::unload(old.handle);
            }
        }
        Ok(())
    }

    fn alloc(&mut self, bytes: u64) -> Result<BufId, DeviceError> {
        self.bind()?;
        let size = bytes.max(1) as usize;
        // SAFETY: the context is current; the memory is zeroed on the stream before any use
        // (all uses are on the stream, or wait for it).
        let ptr = unsafe { drv::malloc_sync(size) }
            .map_err(driver(format!("allocating {bytes} bytes")))?;
        // SAFETY: `ptr` holds `size` bytes.
        unsafe { drv::memset_d8_async(ptr, 0, size, self.stream) }
            .map_err(driver("zeroing new memory"))?;
        self.buffers.push((ptr, bytes));
        Ok(BufId(self.buffers.len() - 1))
    }

    fn address(&self, buf: BufId) -> u64 {
        self.buffers[buf.0].0
    }

    fn upload(&mut self, buf: BufId, data: &[u8]) -> Result<(), DeviceError> {
        self.bind()?;
        let (ptr, size) = self.buffers[buf.0];
        if data.len() as u64 > size {
            return Err(DeviceError::Call(format!(
                "upload of {} bytes into a buffer of {size}",
                data.len()
            )));
        }
        // SAFETY: the buffer holds `data.len()` bytes (checked); `data` outlives the copy,
        // which is waited for before returning.
        unsafe { drv::memcpy_htod_async(ptr, data, self.stream) }
            .map_err(driver("copying to the GPU"))?;
        self.wait("copying to the GPU")
    }

    fn download(&mut self, buf: BufId, out: &mut [u8]) -> Result<(), DeviceError> {
        self.bind()?;
        let (ptr, size) = self.buffers[buf.0];
        if out.len() as u64 > size {
            return Err(DeviceError::Call(format!(
                "download of {} bytes from a buffer of {size}",
                out.len()
            )));
        }
        // SAFETY: the buffer holds `out.len()` bytes (checked); `out` is borrowed until the
        // copy is waited for below.
        unsafe { drv::memcpy_dtoh_async(out, ptr, self.stream) }
            .map_err(driver("copying from the GPU"))?;
        self.wait("copying from the GPU (or the work before it)")
    }

    fn launch(
        &mut self,
        kernel: &str,
        grid: u64,
        block: u32,
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), DeviceError> {
        self.bind()?;
        let f = self
            .program
            .as_ref()
            .ok_or_else(|| DeviceError::Call("launch before the kernels were loaded".into()))?
            .functions
            .get(kernel)
            .copied()
            .ok_or_else(|| DeviceError::Call(format!("no kernel `{kernel}` was loaded")))?;
        self.launch_function(f, kernel, grid, block, shared_bytes, args)
    }

    fn gemm(&mut self, call: &GemmCall) -> Result<(), DeviceError> {
        self.bind()?;
        if call.m == 0 || call.n == 0 {
            return Ok(());
        }
        if call.k == 0 {
            return self.empty_product(call);
        }
        match (call.format, call.fp8) {
            (Format::E4m3 | Format::E5m2, Some(_)) => self.fp8_gemm(call),
            (Format::E4m3 | Format::E5m2, None) => Err(DeviceError::Call(
                "an FP8 GEMM without its quantized operands".into(),
            )),
            (format, _) => {
                let p = lt_problem(call);
                let source = |x: &LtMatrix| match x.source {
                    Source::A => call.a.ptr,
                    Source::B => call.b.ptr,
                };
                let (mut a, mut b) = (source(&p.a), source(&p.b));
                if format != Format::Fp32 {
                    a = self.rounded_16_bits(&p.a, a, p.batch, format, SCRATCH_A)?;
                    b = self.rounded_16_bits(&p.b, b, p.batch, format, SCRATCH_B)?;
                }
                let key = PlanKey {
                    problem: p,
                    format,
                    bias: call.bias.is_some(),
                    scales: None,
                };
                self.matmul(key, [a, b, call.c], call.bias, None, call.accumulate)
            }
        }
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        self.bind()?;
        self.wait("a kernel or GEMM")
    }

    fn memory(&mut self) -> Option<(u64, u64)> {
        self.bind().ok()?;
        let (free, total) = drv::mem_get_info().ok()?;
        Some((free as u64, total as u64))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if self.context.is_null() {
            return;
        }
        if self.bind().is_err() {
            return;
        }
        // SAFETY: every handle below was created by this device (or is null/0), nothing uses
        // it after the stream is idle, and each is released once.
        unsafe {
            if !self.stream.is_null() {
                let _ = drv::stream::synchronize(self.stream);
            }
            self.plans.clear();
            for (ptr, _) in self.buffers.drain(..) {
                let _ = drv::free_sync(ptr);
            }
            for s in self.scratch {
                if s.ptr != 0 {
                    let _ = drv::free_sync(s.ptr);
                }
            }
            if self.workspace != 0 {
                let _ = drv::free_sync(self.workspace);
            }
            for m in [self.program.take(), self.helpers.take()]
                .into_iter()
                .flatten()
            {
                let _ = drv::module::unload(m.handle);
            }
            if !self.blas.is_null() {
                let _ = lt::destroy_handle(self.blas);
            }
            if !self.stream.is_null() {
                let _ = drv::stream::destroy(self.stream);
            }
            let _ = drv::primary_ctx::release(self.device);
        }
    }
}
