//! cuBLASLt's view of a [`GemmCall`], and the CUDA device's helper kernels: the pure part of
//! the `cuda` device (`super::cuda`), kept out of the `cuda` feature so that the default test
//! pass checks it without a GPU or CUDA's libraries.
//!
//! kiln's GEMMs are row-major; cuBLASLt is column-major. A row-major `[r, c]` matrix with rows
//! `ld` apart is, read column-major, its transpose `[c, r]` with the same `ld`. So the
//! row-major `C = op(A)·op(B)` is the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's A is the
//! call's B, its B the call's A, its m the call's n and its n the call's m, and each operand's
//! transpose flag is the call's own (a row-major `B[k, n]` read column-major is already
//! `op(B)ᵀ = [n, k]`). [`lt_problem`] states that mapping once; the tests run it through a CPU
//! model of cuBLASLt's column-major semantics against a plain row-major product.

use kiln_ir::attrs::Format;
use kiln_ir::cuda::{CudaProgram, Elem, Kernel, Param, Pass};

use super::{DeviceError, Fp8Operand, GemmCall, GemmOperand};

/// The helper kernels' source (`kernels/kiln_device.cu`): no includes, so NVRTC compiles it
/// alone and the host shim builds it for the tests.
pub const HELPERS: &str = include_str!("../../../kernels/kiln_device.cu");

/// Threads per block of every helper kernel.
pub const HELPER_BLOCK: u32 = 256;

/// The helper kernels as a program (no steps): their names and parameters, for loading them
/// on a device like the generated kernels.
pub fn helper_program() -> CudaProgram {
    let kernel = |name: &str, summary: &str, params: Vec<Param>| Kernel {
        name: name.to_string(),
        summary: summary.to_string(),
        block: HELPER_BLOCK,
        shared_bytes: 0,
        params,
        nodes: Vec::new(),
    };
    let p = Param::new;
    let convert = |name: &str, to: &str| {
        kernel(
            name,
            &format!("y[i] = {to}(x[i]), rounded to nearest even"),
            vec![
                p("x", Elem::F32, Pass::Read),
                p("y", Elem::U8, Pass::Write),
                p("n", Elem::I64, Pass::Value),
            ],
        )
    };
    CudaProgram::library(
        "kiln_device",
        HELPERS,
        vec![
            convert("kiln_f32_to_bf16", "bf16"),
            convert("kiln_f32_to_f16", "f16"),
            kernel(
                "kiln_add_bias",
                "c[r, j] += bias[j]",
                vec![
                    p("c", Elem::F32, Pass::Write),
                    p("bias", Elem::F32, Pass::Read),
                    p("m", Elem::I64, Pass::Value),
                    p("n", Elem::I64, Pass::Value),
                    p("ldc", Elem::I64, Pass::Value),
                ],
            ),
            kernel(
                "kiln_relayout_scales",
                "y[r * row_stride + j * col_stride] = x[r, j]",
                vec![
                    p("x", Elem::F32, Pass::Read),
                    p("y", Elem::F32, Pass::Write),
                    p("rows", Elem::I64, Pass::Value),
                    p("cols", Elem::I64, Pass::Value),
                    p("row_stride", Elem::I64, Pass::Value),
                    p("col_stride", Elem::I64, Pass::Value),
                ],
            ),
        ],
    )
}

/// Which of the call's operands a cuBLASLt operand reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    A,
    B,
}

/// One cuBLASLt operand, column-major: the call's operand `source`, stored as a `rows × cols`
/// matrix with columns `ld` elements apart (`ld ≥ rows`), transposed by the matmul when
/// `trans`; consecutive matrices of a batch `stride` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtMatrix {
    pub source: Source,
    pub trans: bool,
    pub rows: u64,
    pub cols: u64,
    pub ld: u64,
    pub stride: u64,
}

/// A GEMM as cuBLASLt computes it, column-major: `D[m, n] = op(A)[m, k] · op(B)[k, n]
/// (+ bias[i] on each row i of D)`, `batch` times; C is D (beta = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtProblem {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: LtMatrix,
    pub b: LtMatrix,
    /// D's leading dimension and batch stride (D is `m × n`).
    pub ldd: u64,
    pub stride_d: u64,
    pub batch: u64,
}

/// cuBLASLt's column-major problem for the row-major `call` (see the module doc): the operands
/// swap, and so do m and n. The row-major bias over C's columns is a bias over D's rows, which
/// is what cuBLASLt's BIAS epilogue adds.
pub fn lt_problem(call: &GemmCall) -> LtProblem {
    let (m, n, k) = (call.m, call.n, call.k);
    // A row-major `[r, c]` read column-major is `[c, r]`. The call's B: op(B) is [k, n], so B
    // is stored `[n, k]` (row-major) when transposed, `[k, n]` when not.
    let b_stored = if call.b.trans { (n, k) } else { (k, n) };
    let a_stored = if call.a.trans { (k, m) } else { (m, k) };
    let column_major = |source, op: &GemmOperand, (rows, cols): (u64, u64), stride| LtMatrix {
        source,
        trans: op.trans,
        rows: cols,
        cols: rows,
        ld: op.ld,
        stride,
    };
    LtProblem {
        m: n,
        n: m,
        k,
        a: column_major(Source::B, &call.b, b_stored, call.strides[1]),
        b: column_major(Source::A, &call.a, a_stored, call.strides[0]),
        ldd: call.ldc,
        stride_d: call.strides[2],
        batch: call.batch.max(1),
    }
}

/// How cuBLASLt scales an FP8 operand's blocks (`cublasLtMatmulMatrixScale_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleMode {
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F`: one f32 per 1×128 block along k.
    Vec128,
    /// `CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F`: one f32 per 128×128 block.
    Blk128x128,
}

/// Where an FP8 operand's scales go for cuBLASLt: kiln's table is `[rows, cols]` row-major
/// (`[outer / block0, k / block1]`, rounded up); cuBLASLt reads scale `[r, j]` at
/// `r * row_stride + j * col_stride` of a table of `len` floats.
///
/// The layouts cuBLASLt expects (`cublasLtMatmulMatrixScale_t`, cuBLAS 12.9 and later:
/// <https://docs.nvidia.com/cuda/cublas/index.html>, cuBLASLt datatypes; the values
/// are listed at <https://docs.nvidia.com/cuda/nvmath-python/latest/bindings/generated/nvmath.bindings.cublasLt.MatmulMatrixScale.html>):
/// - VEC128_32F, one f32 per 128 consecutive elements along k: the table is
///   `[outer, ceil(k / 128)]` stored outer-dimension-major (strides `(1, outer)`), so kiln's
///   row-major table is transposed;
/// - BLK128x128_32F, one f32 per 128×128 block: `[ceil(outer / 128), ceil(k / 128)]` stored
///   k-major with each row padded to a multiple of 4 floats (16 bytes), which is kiln's table
///   with padded rows (the same table when `ceil(k / 128)` is a multiple of 4).
///
/// NVIDIA's page itself could not be read while this was written; the layouts are the ones
/// PyTorch's `_scaled_mm` checks before it hands these tables to cuBLASLt
/// (`aten/src/ATen/native/cuda/ScaledBlas.cpp`, `is_blockwise_1x128_scaling`,
/// `is_blockwise_128x128_scaling`). The first GPU run checks them
/// (`tests/cuda_device.rs`, the FP8 GEMM against the emulated device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScaleLayout {
    pub mode: ScaleMode,
    pub rows: u64,
    pub cols: u64,
    pub row_stride: u64,
    pub col_stride: u64,
    pub len: u64,
}

impl ScaleLayout {
    /// Whether kiln's table is already in this layout (no helper kernel needed).
    pub fn is_kilns(&self) -> bool {
        self.col_stride == 1 && (self.row_stride == self.cols || self.rows <= 1)
    }
}

/// The layout cuBLASLt reads `op`'s scales in, for an `[outer, k]` operand.
///
/// Preconditions (checked by [`fp8_problem`]): `k` a multiple of 128, `outer` of 4.
pub fn scale_layout(
    op: &Fp8Operand,
    outer: u64,
    k: u64,
    which: &str,
) -> Result<ScaleLayout, DeviceError> {
    let kb = k.div_ceil(128);
    match op.block {
        [1, 128] => Ok(ScaleLayout {
            mode: ScaleMode::Vec128,
            rows: outer,
            cols: kb,
            row_stride: 1,
            col_stride: outer,
            len: outer * kb,
        }),
        [128, 128] => {
            let padded = kb.div_ceil(4) * 4;
            let rows = outer.div_ceil(128);
            Ok(ScaleLayout {
                mode: ScaleMode::Blk128x128,
                rows,
                cols: kb,
                row_stride: padded,
                col_stride: 1,
                len: rows * padded,
            })
        }
        [b0, b1] => Err(DeviceError::Call(format!(
            "FP8 GEMM: cuBLASLt scales blocks of 1×128 (VEC128_32F) or 128×128 \
             (BLK128x128_32F), not {which}'s {b0}×{b1}"
        ))),
    }
}

/// An FP8 GEMM as cuBLASLt takes it: "TN" (cuBLASLt's A transposed, B not; both k-major
/// codes), with each operand's scale layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp8Problem {
    pub lt: LtProblem,
    /// The scales of cuBLASLt's A (the call's b) and B (the call's a).
    pub scales_a: ScaleLayout,
    pub scales_b: ScaleLayout,
}

/// cuBLASLt's problem for an FP8 `call`, or why cuBLASLt cannot run it.
///
/// kiln's codes are k-major: the call's a is `[m, k]` and its b `[n, k]`, row-major, rows
/// `k` apart — which is `op(a)` untransposed and `op(b)` transposed in the row-major call,
/// and becomes the "TN" layout cuBLASLt requires for FP8 after [`lt_problem`]'s swap.
/// Refused: a batch (kiln's scales have no batch stride), blocks other than 1×128 and
/// 128×128, k not a multiple of 128 (the block size; it also gives the 16-byte aligned
/// leading dimension FP8 needs), m or n not a multiple of 4 (the scale tables' 16-byte rows).
pub fn fp8_problem(call: &GemmCall) -> Result<Fp8Problem, DeviceError> {
    let refuse = |why: String| Err(DeviceError::Call(format!("FP8 GEMM on cuBLASLt: {why}")));
    let Some(f) = call.fp8 else {
        return refuse("the call has no FP8 operands".into());
    };
    if !matches!(call.format, Format::E4m3 | Format::E5m2) {
        return refuse(format!("format {:?} is not FP8", call.format));
    }
    if call.format == Format::E5m2 {
        // cuBLASLt's FP8 GEMMs take e4m3 × e4m3, e4m3 × e5m2 and e5m2 × e4m3, not e5m2 × e5m2.
        return refuse("both operands e5m2, a pairing cuBLASLt has no kernel for".into());
    }
    if call.batch > 1 {
        return refuse("a batch (its scales have no batch stride)".into());
    }
    if call.k % 128 != 0 {
        return refuse(format!("k = {} is not a multiple of 128", call.k));
    }
    for (what, v) in [("m", call.m), ("n", call.n)] {
        if v % 4 != 0 {
            return refuse(format!("{what} = {v} is not a multiple of 4"));
        }
    }
    let codes = |ptr, trans| GemmOperand {
        ptr,
        trans,
        ld: call.k,
    };
    let tn = GemmCall {
        a: codes(f.a.codes, false),
        b: codes(f.b.codes, true),
        batch: 1,
        strides: [0; 3],
        ..*call
    };
    let lt = lt_problem(&tn);
    debug_assert!(lt.a.trans && !lt.b.trans, "cuBLASLt's FP8 layout is TN");
    Ok(Fp8Problem {
        lt,
        scales_a: scale_layout(&f.b, call.n, call.k, "b")?,
        scales_b: scale_layout(&f.a, call.m, call.k, "a")?,
    })
}

/// The architecture NVRTC compiles for on a GPU of compute capability `(major, minor)`: the
/// `a` variants where kiln's kernels may use the architecture-specific instructions (wgmma,
/// tcgen05).
pub fn nvrtc_arch(capability: (i32, i32)) -> Result<&'static str, DeviceError> {
    match capability {
        (8, 0) => Ok("sm_80"),
        (8, 9) => Ok("sm_89"),
        (9, 0) => Ok("sm_90a"),
        (10, 0) => Ok("sm_100a"),
        (major, minor) => Err(DeviceError::Call(format!(
            "a GPU of compute capability {major}.{minor}: kiln compiles for 8.0 (sm_80), 8.9 \
             (sm_89), 9.0 (sm_90a) and 10.0 (sm_100a) only"
        ))),
    }
}

/// `x` (a row-major `[rows, cols]` table) in `layout`, as `kiln_relayout_scales` writes it.
pub fn relayout(x: &[f32], layout: &ScaleLayout) -> Vec<f32> {
    let mut y = vec![0f32; layout.len as usize];
    for r in 0..layout.rows {
        for j in 0..layout.cols {
            y[(r * layout.row_stride + j * layout.col_stride) as usize] =
                x[(r * layout.cols + j) as usize];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::emulated::Emulated;
    use crate::device::{Device, Fp8Call};
    use crate::numerics::accum::Accumulation;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::data::Rng::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    /// cuBLASLt's semantics on the CPU, column-major, from its documentation:
    /// `D[i + j·ldd] = Σ_l op(A)[i, l] · op(B)[l, j] (+ bias[i])` where `op(X)[r, c]` is
    /// `X[r + c·ld]`, or `X[c + r·ld]` when transposed; each layout must be the shape its
    /// transpose flag implies, with `ld ≥ rows`, as cuBLASLt requires.
    fn lt_reference(p: &LtProblem, a: &[f32], b: &[f32], bias: Option<&[f32]>, d: &mut [f32]) {
        let check = |x: &LtMatrix, rows: u64, cols: u64, what: &str| {
            let want = if x.trans { (cols, rows) } else { (rows, cols) };
            assert_eq!(
                (x.rows, x.cols),
                want,
                "{what}'s layout is op({what})'s shape"
            );
            assert!(x.ld >= x.rows, "{what}: ld {} < rows {}", x.ld, x.rows);
        };
        check(&p.a, p.m, p.k, "A");
        check(&p.b, p.k, p.n, "B");
        assert!(p.ldd >= p.m, "D: ld {} < rows {}", p.ldd, p.m);
        let at = |x: &LtMatrix, buf: &[f32], i: u64, r: u64, c: u64| {
            let (r, c) = if x.trans { (c, r) } else { (r, c) };
            f64::from(buf[(i * x.stride + r + c * x.ld) as usize])
        };
        for i in 0..p.batch {
            for col in 0..p.n {
                for row in 0..p.m {
                    let s: f64 = (0..p.k)
                        .map(|l| at(&p.a, a, i, row, l) * at(&p.b, b, i, l, col))
                        .sum();
                    let s = s + bias.map_or(0.0, |b| f64::from(b[row as usize]));
                    d[(i * p.stride_d + row + col * p.ldd) as usize] = s as f32;
                }
            }
        }
    }

    /// `op(x)[r, c]` of a row-major matrix with rows `ld` apart.
    fn row_major(x: &[f32], trans: bool, ld: u64, offset: u64, r: u64, c: u64) -> f64 {
        let (r, c) = if trans { (c, r) } else { (r, c) };
        f64::from(x[(offset + r * ld + c) as usize])
    }

    /// The mapping, through the column-major model, gives the row-major product for every
    /// transpose pair, padded leading dimensions, batches and a bias; the padding is left
    /// alone.
    #[test]
    fn the_column_major_problem_computes_the_row_major_product() {
        let (m, n, k) = (5u64, 7u64, 9u64);
        for batch in [1u64, 3] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for pad in [0u64, 3] {
                    let (ar, ac) = if ta { (k, m) } else { (m, k) };
                    let (br, bc) = if tb { (n, k) } else { (k, n) };
                    let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
                    let (sa, sb, sc) = (ar * lda + 1, br * ldb + 2, m * ldc + 1);
                    let a = data((batch * sa) as usize, 1);
                    let b = data((batch * sb) as usize, 2);
                    let bias = data(n as usize, 3);
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
                        format: Format::Fp32,
                        fp8: None,
                        accumulate: false,
                    };
                    let p = lt_problem(&call);
                    let pick = |s: Source| if s == Source::A { &a } else { &b };
                    let mut d = vec![7.0f32; (batch * sc) as usize];
                    lt_reference(&p, pick(p.a.source), pick(p.b.source), Some(&bias), &mut d);
                    for i in 0..batch {
                        for row in 0..m {
                            for col in 0..ldc {
                                let got = f64::from(d[(i * sc + row * ldc + col) as usize]);
                                if col >= n {
                                    assert_eq!(got, 7.0, "padding is left alone");
                                    continue;
                                }
                                let want: f64 = (0..k)
                                    .map(|l| {
                                        row_major(&a, ta, lda, i * sa, row, l)
                                            * row_major(&b, tb, ldb, i * sb, l, col)
                                    })
                                    .sum::<f64>()
                                    + f64::from(bias[col as usize]);
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "{ta} {tb} batch {i} pad {pad} [{row}, {col}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The mapping itself, for one case, spelled out.
    #[test]
    fn operands_and_dimensions_swap() {
        let call = GemmCall {
            m: 2,
            n: 3,
            k: 4,
            a: GemmOperand {
                ptr: 0,
                trans: false,
                ld: 4,
            },
            b: GemmOperand {
                ptr: 0,
                trans: true,
                ld: 5,
            },
            c: 0,
            ldc: 6,
            bias: None,
            batch: 1,
            strides: [8, 16, 32],
            format: Format::Fp32,
            fp8: None,
            accumulate: false,
        };
        let p = lt_problem(&call);
        assert_eq!((p.m, p.n, p.k), (3, 2, 4));
        assert_eq!(
            p.a,
            LtMatrix {
                source: Source::B,
                trans: true,
                rows: 4,
                cols: 3,
                ld: 5,
                stride: 16
            }
        );
        assert_eq!(
            p.b,
            LtMatrix {
                source: Source::A,
                trans: false,
                rows: 4,
                cols: 2,
                ld: 4,
                stride: 8
            }
        );
        assert_eq!((p.ldd, p.stride_d), (6, 32));
    }

    fn fp8_call(m: u64, n: u64, k: u64, blocks: [[u64; 2]; 2], batch: u64) -> GemmCall {
        let op = |block| Fp8Operand {
            codes: 0,
            scales: 0,
            block,
        };
        GemmCall {
            m,
            n,
            k,
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
            c: 0,
            ldc: n,
            bias: None,
            batch,
            strides: [0; 3],
            format: Format::E4m3,
            fp8: Some(Fp8Call {
                a: op(blocks[0]),
                b: op(blocks[1]),
                accumulation: Accumulation::DEEPSEEK_V3,
            }),
            accumulate: false,
        }
    }

    /// Calls cuBLASLt cannot run are refused with the reason.
    #[test]
    fn fp8_calls_outside_cublaslts_constraints_are_refused() {
        let ok = [[1, 128], [128, 128]];
        assert!(fp8_problem(&fp8_call(8, 12, 256, ok, 1)).is_ok());
        for (call, why) in [
            (fp8_call(8, 12, 200, ok, 1), "k = 200"),
            (fp8_call(6, 12, 256, ok, 1), "m = 6"),
            (fp8_call(8, 10, 256, ok, 1), "n = 10"),
            (fp8_call(8, 12, 256, ok, 2), "batch"),
            (
                GemmCall {
                    format: Format::E5m2,
                    ..fp8_call(8, 12, 256, ok, 1)
                },
                "e5m2",
            ),
            (fp8_call(8, 12, 256, [[1, 8], [128, 128]], 1), "a's 1×8"),
            (fp8_call(8, 12, 256, [[1, 128], [8, 8]], 1), "b's 8×8"),
        ] {
            match fp8_problem(&call) {
                Err(DeviceError::Call(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    /// An FP8 GEMM through the TN problem and the relaid-out scales, in a CPU model of
    /// cuBLASLt's block scaling as this module reads the documentation, equals the row-major
    /// product of kiln's dequantized operands (codes stand in as small integers).
    #[test]
    fn fp8_problems_read_kilns_codes_and_scales_through_the_documented_layouts() {
        let (m, n, k) = (132u64, 8u64, 384u64);
        for blocks in [
            [[1, 128], [128, 128]],
            [[1, 128], [1, 128]],
            [[128, 128], [1, 128]],
        ] {
            let call = fp8_call(m, n, k, blocks, 1);
            let p = fp8_problem(&call).unwrap();
            assert!(p.lt.a.trans && !p.lt.b.trans, "TN");
            let codes = |len: u64, seed| -> Vec<f32> {
                data(len as usize, seed)
                    .iter()
                    .map(|x| (x * 8.0).round())
                    .collect()
            };
            let (ca, cb) = (codes(m * k, 1), codes(n * k, 2));
            let table = |outer: u64, block: [u64; 2], seed| {
                let len = outer.div_ceil(block[0]) * k.div_ceil(block[1]);
                data(len as usize, seed)
                    .iter()
                    .map(|x| x + 1.5)
                    .collect::<Vec<f32>>()
            };
            let (sa, sb) = (table(m, blocks[0], 3), table(n, blocks[1], 4));
            let kiln_scale = |s: &[f32], block: [u64; 2], r: u64, l: u64| {
                f64::from(s[((r / block[0]) * k.div_ceil(block[1]) + l / block[1]) as usize])
            };
            // cuBLASLt's view: A = the call's b codes, B = the call's a codes.
            let (lt_sa, lt_sb) = (relayout(&sb, &p.scales_a), relayout(&sa, &p.scales_b));
            let lt_scale = |s: &[f32], layout: &ScaleLayout, outer: u64, l: u64| {
                let r = match layout.mode {
                    ScaleMode::Vec128 => outer,
                    ScaleMode::Blk128x128 => outer / 128,
                };
                f64::from(s[(r * layout.row_stride + (l / 128) * layout.col_stride) as usize])
            };
            let lt = &p.lt;
            for j in 0..lt.n {
                for i in 0..lt.m {
                    // op(A)[i, l] = A[l + i·ld] (transposed), op(B)[l, j] = B[l + j·ld].
                    let got: f64 = (0..lt.k)
                        .map(|l| {
                            f64::from(cb[(l + i * lt.a.ld) as usize])
                                * lt_scale(&lt_sa, &p.scales_a, i, l)
                                * f64::from(ca[(l + j * lt.b.ld) as usize])
                                * lt_scale(&lt_sb, &p.scales_b, j, l)
                        })
                        .sum();
                    // Row-major: c[j, i] = Σ a[j, l]·b[i, l] with kiln's own scales.
                    let want: f64 = (0..k)
                        .map(|l| {
                            f64::from(ca[(j * k + l) as usize])
                                * kiln_scale(&sa, blocks[0], j, l)
                                * f64::from(cb[(i * k + l) as usize])
                                * kiln_scale(&sb, blocks[1], i, l)
                        })
                        .sum();
                    assert!(
                        (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                        "{blocks:?} [{j}, {i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn architectures_follow_the_compute_capability() {
        assert_eq!(nvrtc_arch((9, 0)).unwrap(), "sm_90a");
        assert_eq!(nvrtc_arch((8, 0)).unwrap(), "sm_80");
        assert_eq!(nvrtc_arch((8, 9)).unwrap(), "sm_89");
        assert_eq!(nvrtc_arch((10, 0)).unwrap(), "sm_100a");
        match nvrtc_arch((7, 5)) {
            Err(DeviceError::Call(m)) => assert!(m.contains("7.5"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scale_layouts_follow_the_documentation() {
        let op = |block| Fp8Operand {
            codes: 0,
            scales: 0,
            block,
        };
        // 1×128: transposed, the outer dimension contiguous.
        let v = scale_layout(&op([1, 128]), 8, 640, "a").unwrap();
        assert_eq!((v.mode, v.rows, v.cols), (ScaleMode::Vec128, 8, 5));
        assert_eq!((v.row_stride, v.col_stride, v.len), (1, 8, 40));
        assert!(!v.is_kilns());
        // 128×128: kiln's rows, padded to 4 floats.
        let b = scale_layout(&op([128, 128]), 300, 640, "b").unwrap();
        assert_eq!((b.mode, b.rows, b.cols), (ScaleMode::Blk128x128, 3, 5));
        assert_eq!((b.row_stride, b.col_stride, b.len), (8, 1, 24));
        assert!(!b.is_kilns());
        assert!(scale_layout(&op([128, 128]), 300, 512, "b")
            .unwrap()
            .is_kilns());
        let x: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let y = relayout(&x, &b);
        assert_eq!(&y[..8], &[0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]);
        assert_eq!(&y[8..13], &[5.0, 6.0, 7.0, 8.0, 9.0]);
    }

    // The helper kernels, built for the host under kernels/kiln_host.h by the emulated device.

    /// The helpers on the emulated device, built into a cache of the test's own (`test`), as
    /// two builds into one directory at once would collide.
    fn helpers(test: &str) -> Option<Emulated> {
        let cache = std::env::temp_dir().join(format!("kiln-test-device-{test}"));
        let mut d = Emulated::new(&cache);
        match d.load(&helper_program()) {
            Ok(()) => Some(d),
            Err(DeviceError::Missing { .. }) => {
                eprintln!("skipped: no host C++ compiler");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn put(d: &mut Emulated, bytes: &[u8]) -> u64 {
        let b = d.alloc(bytes.len() as u64).unwrap();
        d.upload(b, bytes).unwrap();
        d.address(b)
    }

    fn f32_bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Values where rounding is easy to get wrong: ties both ways, carries into the exponent,
    /// the largest finite values, overflow, subnormals of both formats, zeros, NaN, infinity.
    fn tricky() -> Vec<f32> {
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x807f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x7fc1_2345),
            65504.0,
            65519.99,
            65520.0,
            -65536.0,
            6.1035156e-5,
            5.9604645e-8,
            2.9802322e-8,
            2.9802326e-8,
            8.940697e-8,
            1e-10,
            3.0e38,
        ];
        for base in [0x3f80_0000u32, 0x4780_0000, 0x3380_0000, 0x0080_0000] {
            for low in [
                0x7fffu32, 0x8000, 0x8001, 0x1_8000, 0x0fff, 0x1000, 0x1001, 0x3000,
            ] {
                v.push(f32::from_bits(base | low));
                v.push(-f32::from_bits(base | low));
            }
        }
        v.push(f32::from_bits(0x7f7f_8000));
        v.push(f32::from_bits(0x7f7f_7fff));
        v.extend(data(700, 9).iter().map(|x| x * 1e3));
        v
    }

    fn convert(d: &mut Emulated, kernel: &str, x: &[f32]) -> Vec<u16> {
        let n = x.len() as u64;
        let px = put(d, &f32_bytes(x));
        let y = d.alloc(2 * n).unwrap();
        let args = [
            super::super::KernelArg::Ptr(px),
            super::super::KernelArg::Ptr(d.address(y)),
            super::super::KernelArg::I64(n as i64),
        ];
        d.launch(kernel, n.div_ceil(256), HELPER_BLOCK, 0, &args)
            .unwrap();
        let mut out = vec![0u8; 2 * n as usize];
        d.download(y, &mut out).unwrap();
        out.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    /// f32 → bf16 and f32 → f16 give `half`'s round-to-nearest-even bits on every tricky
    /// value (NaNs: a quiet NaN of the same sign).
    #[test]
    fn helper_conversions_round_as_half_does() {
        let Some(mut d) = helpers("conversions") else {
            return;
        };
        let x = tricky();
        let bf = convert(&mut d, "kiln_f32_to_bf16", &x);
        let hf = convert(&mut d, "kiln_f32_to_f16", &x);
        for (i, &v) in x.iter().enumerate() {
            let (want_bf, want_hf) = (half::bf16::from_f32(v), half::f16::from_f32(v));
            if v.is_nan() {
                let got_bf = half::bf16::from_bits(bf[i]);
                let got_hf = half::f16::from_bits(hf[i]);
                assert!(
                    got_bf.is_nan() && bf[i] & 0x0040 != 0,
                    "bf16 NaN {:#x}",
                    bf[i]
                );
                assert!(
                    got_hf.is_nan() && hf[i] & 0x0200 != 0,
                    "f16 NaN {:#x}",
                    hf[i]
                );
                assert_eq!(bf[i] >> 15, want_bf.to_bits() >> 15, "NaN sign");
                assert_eq!(hf[i] >> 15, want_hf.to_bits() >> 15, "NaN sign");
                continue;
            }
            assert_eq!(
                bf[i],
                want_bf.to_bits(),
                "bf16 of {v:e} ({:#010x})",
                v.to_bits()
            );
            assert_eq!(
                hf[i],
                want_hf.to_bits(),
                "f16 of {v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }

    /// The bias and scale-relayout helpers write what their Rust statements say.
    #[test]
    fn helper_bias_and_relayout_write_their_tables() {
        use super::super::KernelArg::{Ptr, I64};
        let Some(mut d) = helpers("bias-relayout") else {
            return;
        };
        let (m, n, ldc) = (3u64, 300u64, 305u64);
        let c0 = data((m * ldc) as usize, 5);
        let bias = data(n as usize, 6);
        let c = d.alloc(4 * m * ldc).unwrap();
        d.upload(c, &f32_bytes(&c0)).unwrap();
        let pb = put(&mut d, &f32_bytes(&bias));
        let args = [
            Ptr(d.address(c)),
            Ptr(pb),
            I64(m as i64),
            I64(n as i64),
            I64(ldc as i64),
        ];
        d.launch(
            "kiln_add_bias",
            (m * n).div_ceil(256),
            HELPER_BLOCK,
            0,
            &args,
        )
        .unwrap();
        let mut out = vec![0u8; (4 * m * ldc) as usize];
        d.download(c, &mut out).unwrap();
        for (i, w) in out.chunks_exact(4).enumerate() {
            let got = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let j = i as u64 % ldc;
            let want = if j < n {
                c0[i] + bias[j as usize]
            } else {
                c0[i]
            };
            assert_eq!(got.to_bits(), want.to_bits(), "c[{i}]");
        }
        let op = Fp8Operand {
            codes: 0,
            scales: 0,
            block: [1, 128],
        };
        for layout in [
            scale_layout(&op, 300, 640, "a").unwrap(),
            scale_layout(
                &Fp8Operand {
                    block: [128, 128],
                    ..op
                },
                300,
                640,
                "b",
            )
            .unwrap(),
        ] {
            let x = data((layout.rows * layout.cols) as usize, 7);
            let px = put(&mut d, &f32_bytes(&x));
            let y = d.alloc(4 * layout.len).unwrap();
            let args = [
                Ptr(px),
                Ptr(d.address(y)),
                I64(layout.rows as i64),
                I64(layout.cols as i64),
                I64(layout.row_stride as i64),
                I64(layout.col_stride as i64),
            ];
            let grid = (layout.rows * layout.cols).div_ceil(256);
            d.launch("kiln_relayout_scales", grid, HELPER_BLOCK, 0, &args)
                .unwrap();
            let mut out = vec![0u8; (4 * layout.len) as usize];
            d.download(y, &mut out).unwrap();
            let got: Vec<f32> = out
                .chunks_exact(4)
                .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            assert_eq!(got, relayout(&x, &layout), "{:?}", layout.mode);
        }
    }
}
