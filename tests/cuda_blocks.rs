//! The hand-written CUDA building blocks in `kernels/` (docs/cuda.md).
//!
//! - Tier 3: a translation unit including all five headers, with small `extern "C"` kernels
//!   that call every function, compiles with nvcc for sm_90a, and no kernel spills or has a
//!   stack frame.
//! - The harness refuses what it should: a spilling kernel, an unlisted stack, a compile
//!   error.
//! - The headers that need no GPU intrinsics (`kiln_math.cuh`, `kiln_softmax.cuh`), compiled
//!   for the CPU by the host C++ compiler (g++, or `$CXX`), agree with the expression DSL's
//!   definitions (`Func::apply`, `Func::derivative`) and with softmax in f64. On a GPU the same
//!   source runs CUDA's `expf`, `erff`…, whose accuracy those checks do not cover.
//!
//! Without nvcc the compile tests fail with the message of `nvcc::find` (run
//! `scripts/cuda-toolchain`). `KILN_SKIP_CUDA_COMPILE=1` makes every test here print why it
//! skipped and pass, for machines that cannot install the toolchain.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::nvcc::{self, AllowList, Nvcc, NvccError};
use kiln_compiler::dsl::expr::Func;

mod common;

use common::nvcc;

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    common::scratch("cuda_blocks", test)
}

fn skip_host(test: &str) -> bool {
    let skip = std::env::var(nvcc::SKIP_ENV).as_deref() == Ok("1");
    if skip {
        eprintln!("skipping {test}: {}=1", nvcc::SKIP_ENV);
    }
    skip
}

/// The kernels of the building-block test: every function of every header, called so that
/// nvcc instantiates it. The map kernels come from `Func::ALL`, so a DSL function without
/// its `kiln_<name>` and `kiln_<name>_grad` fails to compile here.
const BLOCKS: &str = r#"// Small kernels calling every function of kernels/*.cuh (tests/cuda_blocks.rs).
#include "kiln_types.cuh"
#include "kiln_reduce.cuh"
#include "kiln_softmax.cuh"
#include "kiln_math.cuh"
#include "kiln_fp8.cuh"

// x: (n,). Converts to bf16, E4M3 and E5M2 and back; back: (n, 3).
extern "C" __global__ void kiln_test_types(const float* x, __nv_bfloat16* bf16,
                                           __nv_fp8_storage_t* e4m3, __nv_fp8_storage_t* e5m2,
                                           float* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bf16[i] = kiln_f32_to_bf16(x[i]);
    e4m3[i] = kiln_f32_to_e4m3(x[i]);
    e5m2[i] = kiln_f32_to_e5m2(x[i]);
    back[3 * i] = kiln_bf16_to_f32(bf16[i]);
    back[3 * i + 1] = kiln_e4m3_to_f32(e4m3[i]);
    back[3 * i + 2] = kiln_e5m2_to_f32(e5m2[i]);
}

// The same two at a time. x: (n,) pairs; back: (n, 3) pairs.
extern "C" __global__ void kiln_test_types_x2(const float2* x, __nv_bfloat162* bf16,
                                              __nv_fp8x2_storage_t* e4m3,
                                              __nv_fp8x2_storage_t* e5m2, float2* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    bf16[i] = kiln_f32x2_to_bf16x2(x[i]);
    e4m3[i] = kiln_f32x2_to_e4m3x2(x[i]);
    e5m2[i] = kiln_f32x2_to_e5m2x2(x[i]);
    back[3 * i] = kiln_bf16x2_to_f32x2(bf16[i]);
    back[3 * i + 1] = kiln_e4m3x2_to_f32x2(e4m3[i]);
    back[3 * i + 2] = kiln_e5m2x2_to_f32x2(e5m2[i]);
}

// x: (n,) rows of 1×(4·lanes) tiles, n a multiple of 128; each thread quantizes four
// consecutive elements. codes: (n / 4,) four codes each; scales: (n / (4·lanes),).
extern "C" __global__ void kiln_test_quantize(const float4* x, unsigned* codes, float* scales,
                                              int n, int lanes, int e5m2, int pow2) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (32 * (i / 32) >= n / 4) return;  // whole warps only: the tile max is a warp shuffle
    float s;
    codes[i] = e5m2 ? kiln_quantize4<true>(x[i], lanes, pow2, &s)
                    : kiln_quantize4<false>(x[i], lanes, pow2, &s);
    if (i % lanes == 0) scales[i / lanes] = s;
}

// x: (gridDim.x, blockDim.x). warp: (gridDim.x, blockDim.x / 32, 2) each warp's sum and max;
// block: (gridDim.x, 2) the block's sum and max, one scratch serving both.
extern "C" __global__ void kiln_test_reduce(const float* x, float* warp, float* block) {
    __shared__ float scratch[32];
    const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    const float sum = kiln_warp_sum(v);
    const float max = kiln_warp_max(v);
    const float block_sum = kiln_block_sum(v, scratch);
    const float block_max = kiln_block_max(v, scratch);
    if (threadIdx.x % 32 == 0) {
        const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
        warp[2 * w] = sum;
        warp[2 * w + 1] = max;
    }
    if (threadIdx.x == 0) {
        block[2 * blockIdx.x] = block_sum;
        block[2 * blockIdx.x + 1] = block_max;
    }
}

// x: (gridDim.x, n), one block per row. out: (gridDim.x, 2) the row's log-sum-exp and the
// softmax of its first element. Threads, then warps, then the block merge their states.
extern "C" __global__ void kiln_test_softmax(const float* x, float* out, int n) {
    __shared__ float m_scratch[32];
    __shared__ float l_scratch[32];
    const float* row = x + blockIdx.x * n;
    kiln_softmax_state s = kiln_softmax_state::empty();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s.update(row[i]);
    s = kiln_softmax_warp_merge(s);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        m_scratch[warp] = s.m;
        l_scratch[warp] = s.l;
    }
    __syncthreads();
    if (warp == 0) {
        kiln_softmax_state w = kiln_softmax_state::empty();
        if (lane < blockDim.x / 32) {
            w.m = m_scratch[lane];
            w.l = l_scratch[lane];
        }
        w = kiln_softmax_warp_merge(w);
        if (lane == 0) {
            out[2 * blockIdx.x] = w.log_sum_exp();
            out[2 * blockIdx.x + 1] = w.prob(row[0]);
        }
    }
}

// x: (n,). A DSL function and its derivative; y, dy: (n,).
#define KILN_TEST_MAP(f)                                                                   \
    extern "C" __global__ void kiln_test_##f(const float* x, float* y, float* dy, int n) { \
        const int i = blockIdx.x * blockDim.x + threadIdx.x;                               \
        if (i < n) {                                                                       \
            y[i] = kiln_##f(x[i]);                                                         \
            dy[i] = kiln_##f##_grad(x[i]);                                                 \
        }                                                                                  \
    }
"#;

fn blocks_source() -> String {
    let mut source = BLOCKS.to_string();
    for f in Func::ALL {
        writeln!(source, "KILN_TEST_MAP({})", f.name()).unwrap();
    }
    source
}

fn blocks_kernels() -> BTreeSet<String> {
    let fixed = [
        "kiln_test_types",
        "kiln_test_types_x2",
        "kiln_test_reduce",
        "kiln_test_softmax",
        "kiln_test_quantize",
    ];
    let maps = Func::ALL.map(|f| format!("kiln_test_{}", f.name()));
    fixed.into_iter().map(String::from).chain(maps).collect()
}

fn compile(nvcc: &Nvcc, dir: &Path, file: &str, source: &str) -> nvcc::Compiled {
    let path = dir.join(file);
    std::fs::write(&path, source).unwrap();
    nvcc.compile(&path, dir).unwrap_or_else(|e| panic!("{e}"))
}

/// One line per function of a report, for the test's output.
fn table(resources: &[nvcc::KernelResources]) -> String {
    let mut out = String::new();
    for r in resources {
        let frame = r.frame.unwrap_or_default();
        writeln!(
            out,
            "  {:<28} {:>3} registers  {:>5} B smem  {:>4} B stack  {}/{} B spilled",
            r.name,
            r.registers.map_or("-".to_string(), |n| n.to_string()),
            r.smem_bytes,
            r.stack_bytes(),
            frame.spill_store_bytes,
            frame.spill_load_bytes,
        )
        .unwrap();
    }
    out
}

#[test]
fn building_blocks_compile_for_sm_90a_without_spills_or_stack() {
    let Some(nvcc) = nvcc("building_blocks_compile_for_sm_90a_without_spills_or_stack") else {
        return;
    };
    let dir = scratch("blocks");
    let compiled = compile(&nvcc, &dir, "blocks.cu", &blocks_source());
    eprintln!("{}", table(&compiled.resources));

    let kernels: BTreeSet<String> = compiled
        .resources
        .iter()
        .filter(|r| r.entry)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(
        kernels,
        blocks_kernels(),
        "ptxas reported other kernels than the test defines:\n{}",
        compiled.output
    );
    assert!(
        compiled.resources.iter().all(|r| r.entry),
        "{}",
        compiled.output
    );
    assert!(compiled
        .resources
        .iter()
        .all(|r| r.arch.as_deref() == Some("sm_90a")));
    // The building blocks may not use a stack at all, whatever the allow-list says.
    let violations = nvcc::check(&compiled.resources, &AllowList::default());
    assert!(
        violations.is_empty(),
        "{}\n\nnvcc's output:\n{}",
        violations.join("\n"),
        compiled.output
    );
    // The reductions and softmax use their shared scratch, and nothing else does.
    for r in &compiled.resources {
        let want = match r.name.as_str() {
            "kiln_test_reduce" => 32 * 4,
            "kiln_test_softmax" => 2 * 32 * 4,
            _ => 0,
        };
        assert_eq!(r.smem_bytes, want, "{}", r.name);
    }
    assert!(std::fs::metadata(&compiled.cubin).unwrap().len() > 0);
}

/// What the check must refuse: a kernel `__launch_bounds__` squeezes into spilling, and one
/// that keeps an array indexed at run time on the stack.
const BAD: &str = r#"// Kernels the compile check must refuse (tests/cuda_blocks.rs).
extern "C" __global__ void __launch_bounds__(1024, 2) spills(float* x) {
    float acc[48];
#pragma unroll
    for (int i = 0; i < 48; i++) acc[i] = x[i * blockDim.x + threadIdx.x];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 48; i++)
#pragma unroll
        for (int j = 0; j < 48; j++) s += acc[i] * acc[(i + j) % 48] * x[j];
    x[threadIdx.x] = s;
}

extern "C" __global__ void indexed(float* x, int k) {
    float a[16];
    for (int j = 0; j < 16; j++) a[j] = x[j * blockDim.x + threadIdx.x];
    for (int t = 0; t < k; t++) a[(t * 7) & 15] += a[t & 15];
    x[threadIdx.x] = a[k & 15];
}
"#;

#[test]
fn the_check_refuses_spills_and_unlisted_stacks() {
    let Some(nvcc) = nvcc("the_check_refuses_spills_and_unlisted_stacks") else {
        return;
    };
    let dir = scratch("bad");
    let compiled = compile(&nvcc, &dir, "bad.cu", BAD);
    eprintln!("{}", table(&compiled.resources));
    let find = |name: &str| {
        compiled
            .resources
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no {name} in\n{}", compiled.output))
    };
    let spills = find("spills").frame.unwrap();
    assert!(spills.spill_store_bytes > 0 && spills.spill_load_bytes > 0);
    let indexed = find("indexed").stack_bytes();
    assert!(indexed > 0, "{}", compiled.output);

    let violations = nvcc::check(&compiled.resources, &AllowList::default());
    let about = |name: &str, what: &str| {
        violations
            .iter()
            .any(|v| v.starts_with(&format!("kernel {name}: {what}")))
    };
    assert!(about("spills", "spills registers"), "{violations:#?}");
    assert!(about("spills", "uses"), "{violations:#?}");
    assert!(about("indexed", "uses"), "{violations:#?}");
    assert_eq!(violations.len(), 3, "{violations:#?}");

    // Listing both stacks leaves the spill, which no entry can allow.
    let stack = find("spills").stack_bytes();
    let allow = AllowList::parse(&format!(
        "indexed {indexed} # test\nspills {stack} # test\n"
    ))
    .unwrap();
    let violations = nvcc::check(&compiled.resources, &allow);
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].starts_with("kernel spills: spills registers"));
}

#[test]
fn a_compile_error_returns_nvccs_output() {
    let Some(nvcc) = nvcc("a_compile_error_returns_nvccs_output") else {
        return;
    };
    let dir = scratch("broken");
    let path = dir.join("broken.cu");
    std::fs::write(
        &path,
        "#include \"kiln_math.cuh\"\n\
         extern \"C\" __global__ void k(float* x) { x[0] = kiln_no_such_function(x[1]); }\n",
    )
    .unwrap();
    match nvcc.compile(&path, &dir) {
        Err(NvccError::Failed { command, output }) => {
            assert!(command.contains("compute_90a"), "{command}");
            assert!(output.contains("broken.cu"), "{output}");
            assert!(output.contains("kiln_no_such_function"), "{output}");
        }
        other => panic!("expected a failed compile, got {other:?}"),
    }
}

/// Compiles `main` with the given headers for the CPU and returns what it prints. The shim
/// turns the CUDA qualifiers into plain C++ and declares the warp shuffle, which the host
/// programs never call.
fn run_on_host(dir: &Path, headers: &[&str], main: &str) -> String {
    let mut source = String::from(
        "#include <math.h>\n#include <stdio.h>\n#include <string.h>\n\
         #define __device__\n#define __forceinline__ inline\n\
         static inline float __fmul_rn(float a, float b) { return a * b; }\n\
         float __shfl_xor_sync(unsigned mask, float value, int lane_mask);\n",
    );
    for h in headers {
        writeln!(source, "#include \"{h}\"").unwrap();
    }
    source.push_str(
        "static float f32(unsigned bits) { float f; memcpy(&f, &bits, 4); return f; }\n\
         static unsigned bits(float f) { unsigned b; memcpy(&b, &f, 4); return b; }\n",
    );
    source.push_str(main);
    let cpp = dir.join("host.cpp");
    let exe = dir.join("host");
    std::fs::write(&cpp, source).unwrap();
    let (cxx, command) = common::cxx_command(
        &[
            "-std=c++17",
            "-O1",
            "-ffp-contract=off",
            "-Wall",
            "-Werror",
            "-Wno-unknown-pragmas",
        ],
        &exe,
        &cpp,
    );
    let out = common::run_cxx(&cxx, command);
    assert!(
        out.status.success(),
        "{cxx} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    String::from_utf8(run.stdout).unwrap()
}

/// `{0x…u, …}`: f32 values as bits, so the C++ side sees exactly the test's values.
fn bits_array(xs: &[f32]) -> String {
    let items: Vec<String> = xs
        .iter()
        .map(|x| format!("0x{:08x}u", x.to_bits()))
        .collect();
    format!("{{{}}}", items.join(", "))
}

fn f32_bits(hex: &str) -> f32 {
    f32::from_bits(u32::from_str_radix(hex, 16).unwrap())
}

/// Whether an f32 result is within `rel * |want| + abs` of the f64 reference, with
/// infinities and NaN required to match exactly (the reference rounded to f32 decides what
/// overflows).
fn close(got: f32, want: f64, rel: f64, abs: f64) -> bool {
    let want32 = want as f32;
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want32.is_infinite() || got.is_infinite() {
        return got == want32;
    }
    (f64::from(got) - want).abs() <= rel * want.abs() + abs
}

#[test]
fn kiln_math_matches_the_dsl_definitions_on_the_host() {
    if skip_host("kiln_math_matches_the_dsl_definitions_on_the_host") {
        return;
    }
    let mut xs: Vec<f32> = (-128..=128).map(|i| i as f32 / 16.0).collect();
    xs.extend([
        -100.0,
        -88.0,
        -50.0,
        -20.0,
        -12.5,
        -10.0,
        -1.2785,
        -0.75,
        -1e-3,
        -1e-20,
        -0.0,
        1e-20,
        1e-3,
        10.0,
        12.5,
        20.0,
        50.0,
        88.0,
        100.0,
        1e10,
        -1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let mut main = format!(
        "static const unsigned xs[] = {};\n\
         struct F {{ const char* name; float (*f)(float); float (*g)(float); }};\n\
         static const F fs[] = {{\n",
        bits_array(&xs)
    );
    for f in Func::ALL {
        let n = f.name();
        writeln!(main, "    {{\"{n}\", kiln_{n}, kiln_{n}_grad}},").unwrap();
    }
    main.push_str(
        "};\n\
         int main() {\n\
             for (const F& f : fs)\n\
                 for (unsigned x : xs)\n\
                     printf(\"%s %08x %08x %08x\\n\", f.name, x, bits(f.f(f32(x))), bits(f.g(f32(x))));\n\
             return 0;\n\
         }\n",
    );
    let dir = scratch("math");
    let printed = run_on_host(&dir, &["kiln_math.cuh"], &main);

    let mut failures = Vec::new();
    let mut lines = 0;
    for line in printed.lines() {
        let [name, x, value, grad] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("unexpected line {line:?}");
        };
        let f = Func::from_name(name).unwrap();
        let x = f32_bits(x);
        let (value, grad) = (f32_bits(value), f32_bits(grad));
        let want = f.apply(f64::from(x));
        let want_grad = f.derivative(f64::from(x));
        // Values: relative accuracy everywhere, including the far tails the stable forms
        // exist for (1e-38 only admits results below f32's normal range). Derivatives: some
        // cancel by their nature (1 - tanh², silu's and gelu's zero crossings), so they get an
        // absolute allowance of a few ulp of 1.
        if !close(value, want, 1e-5, 1e-38) {
            failures.push(format!("{name}({x:e}) = {value:e}, want {want:e}"));
        }
        if !close(grad, want_grad, 1e-5, 1e-6) {
            failures.push(format!("{name}_grad({x:e}) = {grad:e}, want {want_grad:e}"));
        }
        lines += 1;
    }
    assert_eq!(lines, xs.len() * Func::ALL.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kiln_softmax_matches_f64_on_the_host() {
    if skip_host("kiln_softmax_matches_f64_on_the_host") {
        return;
    }
    let inf = f32::INFINITY;
    let mut rows: Vec<Vec<f32>> = vec![
        vec![1.0, 2.0, 3.0, 0.5, -1.0],
        vec![5.0, 4.0, 3.0, 2.0, 1.0],
        vec![-inf, -inf, 2.0, -inf, 5.0, 1.0],
        vec![-inf, -inf, -inf],
        vec![],
        vec![1000.0, 999.0, 1001.0, -1000.0],
        vec![-1000.0, -1001.0, -999.5],
        vec![1.0, f32::NAN, 2.0],
        vec![0.0; 7],
    ];
    rows.push((0..200).map(|i| (i as f32 * 0.7).sin() * 20.0).collect());

    // For each row: the state after updating with every value in order, and the state of
    // chunks of three merged pairwise up a tree; then kiln_softmax_exp over a grid.
    let mut main = String::from(
        "static void print(const char* what, int row, kiln_softmax_state s) {\n\
             printf(\"%s %d %08x %08x %08x\\n\", what, row, bits(s.m), bits(s.l), bits(s.log_sum_exp()));\n\
         }\n\
         static kiln_softmax_state tree(const unsigned* x, int n) {\n\
             kiln_softmax_state s = kiln_softmax_state::empty();\n\
             if (n <= 3) { for (int i = 0; i < n; i++) s.update(f32(x[i])); return s; }\n\
             s = tree(x, n / 2);\n\
             s.merge(tree(x + n / 2, n - n / 2));\n\
             return s;\n\
         }\n",
    );
    for (i, row) in rows.iter().enumerate() {
        let values = if row.is_empty() {
            "{0u}".to_string()
        } else {
            bits_array(row)
        };
        writeln!(main, "static const unsigned row{i}[] = {values};").unwrap();
    }
    main.push_str("int main() {\n");
    for (i, row) in rows.iter().enumerate() {
        let n = row.len();
        writeln!(
            main,
            "    {{ kiln_softmax_state s = kiln_softmax_state::empty();\n\
                   for (int j = 0; j < {n}; j++) s.update(f32(row{i}[j]));\n\
                   print(\"seq\", {i}, s); print(\"tree\", {i}, tree(row{i}, {n})); }}"
        )
        .unwrap();
    }
    let grid: Vec<f32> = (-110..=10).map(|i| i as f32 - 0.3).collect();
    writeln!(
        main,
        "    static const unsigned grid[] = {};\n\
             for (unsigned x : grid) printf(\"exp %08x %08x\\n\", x, bits(kiln_softmax_exp(f32(x))));\n\
             return 0;\n}}",
        bits_array(&grid)
    )
    .unwrap();
    let dir = scratch("softmax");
    let printed = run_on_host(&dir, &["kiln_softmax.cuh"], &main);

    let mut failures = Vec::new();
    let mut seen = 0;
    for line in printed.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields[0] == "exp" {
            let (x, got) = (f32_bits(fields[1]), f32_bits(fields[2]));
            let want = f64::from(x).exp();
            // exp2f's error plus the rounding of x * log2(e): |x| * 2^-24 relative.
            let rel = f64::from(x.abs()) * 2f64.powi(-24) + 4.0 * 2f64.powi(-24);
            if !close(got, want, rel, 1e-44) {
                failures.push(format!("kiln_softmax_exp({x}) = {got:e}, want {want:e}"));
            }
            seen += 1;
            continue;
        }
        let [what, row, m, l, lse] = fields[..] else {
            panic!("unexpected line {line:?}");
        };
        let row = &rows[row.parse::<usize>().unwrap()];
        let (m, l, lse) = (f32_bits(m), f32_bits(l), f32_bits(lse));
        let values: Vec<f64> = row.iter().map(|&x| f64::from(x)).collect();
        let want_m = values
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f64::NEG_INFINITY, f64::max);
        let (want_l, want_lse) = if values.iter().any(|x| x.is_nan()) {
            (f64::NAN, f64::NAN)
        } else if want_m == f64::NEG_INFINITY {
            (0.0, f64::NEG_INFINITY)
        } else {
            let l: f64 = values.iter().map(|x| (x - want_m).exp()).sum();
            (l, want_m + l.ln())
        };
        let ok = f64::from(m) == want_m
            && close(l, want_l, 5e-5, 0.0)
            && close(lse, want_lse, 1e-6, 1e-5);
        if !ok {
            failures.push(format!(
                "{what} {row:?}: m {m:e}, l {l:e}, lse {lse:e}; want m {want_m:e}, l {want_l:e}, \
                 lse {want_lse:e}"
            ));
        }
        seen += 1;
    }
    assert_eq!(seen, 2 * rows.len() + 121);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
