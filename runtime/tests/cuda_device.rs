//! The CUDA device on a GPU (feature `cuda`): launches pass their arguments as the kernels
//! declare them, and cuBLASLt's GEMMs agree with the emulated device's for every layout a
//! `GemmCall` describes (transposes, padded leading dimensions, batches, a bias) in f32,
//! bf16 and f16, and for a block-scaled FP8 GEMM.
//!
//! Without a GPU driver the tests pass with a note, unless `KILN_REQUIRE_GPU=1` (set it on a
//! GPU machine, so that a broken setup fails instead of skipping). Needs NVRTC and cuBLASLt on
//! the library path.
#![cfg(feature = "cuda")]

use kiln_ir::attrs::Format;
use kiln_ir::cuda::{CudaProgram, Elem, Kernel, Param, Pass};
use kiln_runtime::device::cuda::Cuda;
use kiln_runtime::device::emulated::Emulated;
use kiln_runtime::device::{
    Device, DeviceError, Fp8Call, Fp8Operand, GemmCall, GemmOperand, KernelArg,
};
use kiln_runtime::numerics::accum::Accumulation;
use kiln_runtime::numerics::fp8::Fp8Format;
use kiln_runtime::numerics::quant::{quantize, ScaleFormat};

/// The GPU, or `None` (with a note) where there is none and none is required.
fn gpu() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(d) => {
            eprintln!("{}", d.describe());
            Some(d)
        }
        Err(e @ DeviceError::Missing { .. })
            if std::env::var("KILN_REQUIRE_GPU").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn emulated() -> Emulated {
    // Under cargo, the build tree; run as a carried binary on a GPU machine (scripts/
    // device-check), where that path does not exist, kiln's cache (`KILN_CACHE_DIR`).
    let dir = match std::env::var_os("KILN_CACHE_DIR") {
        Some(_) => kiln_runtime::device::cache_dir(),
        None => std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    Emulated::new(&dir.join("cuda-device-emu"))
}

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = kiln_runtime::data::Rng::new(seed);
    (0..len)
        .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
        .collect()
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn put(d: &mut dyn Device, b: &[u8]) -> u64 {
    let buf = d.alloc(b.len() as u64).unwrap();
    d.upload(buf, b).unwrap();
    d.address(buf)
}

/// Every buffer a GEMM reads, and where its output goes, on one device.
struct Operands {
    a: u64,
    b: u64,
    bias: u64,
    c: kiln_runtime::device::BufId,
    fp8: Option<Fp8Call>,
}

/// Runs `call` (its pointers replaced by `d`'s copies of the data) and returns C.
fn run(d: &mut dyn Device, call: &GemmCall, host: &Host) -> Vec<f32> {
    let fp8 = host.fp8.as_ref().map(|(qa, qb, blocks)| {
        let mut operand =
            |q: &kiln_runtime::numerics::quant::Quantized, block: [u64; 2]| Fp8Operand {
                codes: put(d, &q.codes),
                scales: put(d, &bytes(&q.scales)),
                block,
            };
        let a = operand(qa, blocks[0]);
        let b = operand(qb, blocks[1]);
        Fp8Call {
            a,
            b,
            accumulation: Accumulation::DEEPSEEK_V3,
        }
    });
    let o = Operands {
        a: put(d, &bytes(&host.a)),
        b: put(d, &bytes(&host.b)),
        bias: put(d, &bytes(&host.bias)),
        c: {
            let c = d.alloc(4 * host.c.len() as u64).unwrap();
            d.upload(c, &bytes(&host.c)).unwrap();
            c
        },
        fp8,
    };
    let call = GemmCall {
        a: GemmOperand { ptr: o.a, ..call.a },
        b: GemmOperand { ptr: o.b, ..call.b },
        c: d.address(o.c),
        bias: call.bias.map(|_| o.bias),
        fp8: o.fp8,
        ..*call
    };
    d.gemm(&call).unwrap_or_else(|e| panic!("{call:?}: {e}"));
    d.synchronize().unwrap();
    let mut out = vec![0u8; 4 * host.c.len()];
    d.download(o.c, &mut out).unwrap();
    floats(&out)
}

/// A GEMM's data on the host.
struct Host {
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Vec<f32>,
    c: Vec<f32>,
    #[allow(clippy::type_complexity)]
    fp8: Option<(
        kiln_runtime::numerics::quant::Quantized,
        kiln_runtime::numerics::quant::Quantized,
        [[u64; 2]; 2],
    )>,
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: c[{i}] = {g}, the emulated device gives {w}"
        );
    }
}

#[test]
fn gemms_agree_with_the_emulated_device_in_every_layout() {
    let Some(mut gpu) = gpu() else { return };
    let mut emu = emulated();
    let (m, n, k) = (37u64, 45u64, 70u64);
    for format in [Format::Fp32, Format::Bf16, Format::Fp16] {
        for batch in [1u64, 3] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (ac + 3, bc + 5, n + 2);
                let (sa, sb, sc) = (ar * lda + 4, br * ldb + 8, m * ldc + 4);
                let host = Host {
                    a: data((batch * sa) as usize, 1),
                    b: data((batch * sb) as usize, 2),
                    bias: data(n as usize, 3),
                    c: vec![7.0; (batch * sc) as usize],
                    fp8: None,
                };
                let op = |trans, ld| GemmOperand { ptr: 0, trans, ld };
                let call = GemmCall {
                    m,
                    n,
                    k,
                    a: op(ta, lda),
                    b: op(tb, ldb),
                    c: 0,
                    ldc,
                    bias: Some(0),
                    batch,
                    strides: [sa, sb, sc],
                    format,
                    fp8: None,
                    accumulate: false,
                };
                let got = run(&mut gpu, &call, &host);
                let want = run(&mut emu, &call, &host);
                // Same rounded operands and f32 products; only the summation order differs,
                // while a layout mistake would be off by the size of the values.
                let what = format!("{format:?} batch {batch} ta {ta} tb {tb}");
                close(&got, &want, 1e-4, &what);
            }
        }
    }
}

#[test]
fn a_block_scaled_fp8_gemm_agrees_with_the_emulated_device() {
    let Some(mut gpu) = gpu() else { return };
    let mut emu = emulated();
    // k = 384 pads the 128×128 table's rows (3 blocks to 4); k = 512 needs no padding.
    let (m, n) = (128u64, 256u64);
    for (k, blocks) in [
        (512u64, [[1, 128], [128, 128]]),
        (384, [[1, 128], [128, 128]]),
        (384, [[1, 128], [1, 128]]),
    ] {
        let (xa, xb) = (data((m * k) as usize, 4), data((n * k) as usize, 5));
        let q = |x: &[f32], rows: u64, block: [u64; 2]| {
            let block = block.map(|b| b as usize);
            quantize(
                x,
                rows as usize,
                k as usize,
                block,
                Fp8Format::E4m3,
                ScaleFormat::Fp32,
            )
            .unwrap()
        };
        let host = Host {
            a: vec![0.0; 1],
            b: vec![0.0; 1],
            bias: data(n as usize, 6),
            c: vec![0.0; (m * n) as usize],
            fp8: Some((q(&xa, m, blocks[0]), q(&xb, n, blocks[1]), blocks)),
        };
        let op = |trans| GemmOperand {
            ptr: 0,
            trans,
            ld: k,
        };
        let call = GemmCall {
            m,
            n,
            k,
            a: op(false),
            b: op(true),
            c: 0,
            ldc: n,
            bias: Some(0),
            batch: 1,
            strides: [0; 3],
            format: Format::E4m3,
            fp8: None,
            accumulate: false,
        };
        let got = run(&mut gpu, &call, &host);
        let want = run(&mut emu, &call, &host);
        // Same codes and scales; only the order and width of the accumulation differ.
        close(&got, &want, 2e-3, &format!("FP8 k {k} blocks {blocks:?}"));
    }
}

#[test]
fn launches_pass_pointers_and_values_as_the_kernel_declares_them() {
    let Some(mut gpu) = gpu() else { return };
    let source = r#"extern "C" __global__ void __launch_bounds__(256) kiln_test_args(
    float* __restrict__ y, const float* __restrict__ x, long long n, float s, int t, unsigned u) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] * s + (float)t + (float)u;
}
"#;
    let p = Param::new;
    let program = CudaProgram::library(
        "launch-test",
        source,
        vec![Kernel {
            name: "kiln_test_args".into(),
            summary: "y = x * s + t + u".into(),
            block: 256,
            shared_bytes: 0,
            params: vec![
                p("y", Elem::F32, Pass::Write),
                p("x", Elem::F32, Pass::Read),
                p("n", Elem::I64, Pass::Value),
                p("s", Elem::F32, Pass::Value),
                p("t", Elem::I32, Pass::Value),
                p("u", Elem::U32, Pass::Value),
            ],
            nodes: Vec::new(),
        }],
    );
    gpu.load(&program).unwrap();
    let n = 1000u64;
    let x = data(n as usize, 7);
    let px = put(&mut gpu, &bytes(&x));
    let y = gpu.alloc(4 * n).unwrap();
    let args = [
        KernelArg::Ptr(gpu.address(y)),
        KernelArg::Ptr(px),
        KernelArg::I64(n as i64),
        KernelArg::F32(2.5),
        KernelArg::I64(-3),
        KernelArg::I64(7),
    ];
    gpu.launch("kiln_test_args", n.div_ceil(256), 256, 0, &args)
        .unwrap();
    gpu.synchronize().unwrap();
    let mut out = vec![0u8; 4 * n as usize];
    gpu.download(y, &mut out).unwrap();
    for (i, (g, x)) in floats(&out).iter().zip(&x).enumerate() {
        let want = x * 2.5 + 4.0;
        assert!((g - want).abs() <= 1e-5, "y[{i}] = {g}, not {want}");
    }
    assert!(gpu.launch("no_such_kernel", 1, 256, 0, &[]).is_err());
    assert!(gpu.upload(y, &vec![0u8; 4 * n as usize + 1]).is_err());
}
