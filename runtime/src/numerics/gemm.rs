//! The matrix products of linear layers and experts under a precision policy.
//!
//! A node's format (the IR's `format`, from the spec's `[precision]`) decides how its GEMM
//! operands are rounded before they are multiplied:
//! - `fp32`: as they are (the reference, and the only path that is bit-identical to the
//!   unemulated kernels);
//! - `bf16`, `fp16`: each operand rounded to nearest even, products accumulated in f32;
//! - `e4m3`, `e5m2`: block-scaled FP8 with limited-precision accumulation
//!   ([`super::quant`], [`super::accum`]).
//!
//! Which block shape an operand gets depends on the product's [`Role`], as in DeepSeek-V3:
//! the left operand is always an activation or activation gradient, scaled per 1×T tile
//! along the contraction; the right one is the weight (one scale per weight block; the
//! input-gradient product reads the same blocks transposed) or, for the weight gradient,
//! the layer's input, scaled per tile along the tokens it is contracted over.

use kiln_ir::attrs::{Format, Fp8};

use super::accum::{fp8_product, Accumulation, Datapath};
use super::fp8::Fp8Format;
use super::quant::{quantize, ScaleFormat};
use super::round16;
use crate::cpu::matmul::{matmul, matmul_serial};
use crate::cpu::Real;

/// Which product of a layer a GEMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `y = x · wᵀ`.
    Forward,
    /// `dx = dy · w`.
    InputGrad,
    /// `dw = dyᵀ · x`.
    WeightGrad,
}

/// FP8 scaling and accumulation of one GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Gemm {
    pub format: Fp8Format,
    /// Width of an activation tile along the contraction.
    pub tile: usize,
    /// Weight block `[rows, cols]` of a weight stored `[out, in]`.
    pub weight_block: [usize; 2],
    pub rule: ScaleFormat,
    pub accumulation: Accumulation,
}

/// How one node's GEMMs treat their operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmNumerics {
    /// The run's own type throughout.
    Exact,
    /// Operands rounded to bf16, f32 accumulation.
    Bf16,
    /// Operands rounded to fp16, f32 accumulation.
    Fp16,
    Fp8(Fp8Gemm),
}

impl GemmNumerics {
    /// The numerics of a node whose policy format is `format`; `fp8` is the spec's
    /// `[precision.fp8]` (present whenever some format is FP8).
    pub fn of(format: Format, fp8: Option<&Fp8>) -> GemmNumerics {
        let fp8_format = match format {
            Format::Fp32 => return GemmNumerics::Exact,
            Format::Bf16 => return GemmNumerics::Bf16,
            Format::Fp16 => return GemmNumerics::Fp16,
            Format::E4m3 => Fp8Format::E4m3,
            Format::E5m2 => Fp8Format::E5m2,
        };
        let f = fp8.copied().unwrap_or(Fp8::DEEPSEEK_V3);
        GemmNumerics::Fp8(Fp8Gemm {
            format: fp8_format,
            tile: f.act_tile[1] as usize,
            weight_block: f.weight_block.map(|v| v as usize),
            rule: f.scale,
            accumulation: Accumulation {
                datapath: match f.accumulator {
                    kiln_ir::attrs::Accumulator::H100 => Datapath::H100,
                    kiln_ir::attrs::Accumulator::Truncate { bits } => Datapath::Truncating { bits },
                },
                promote_every: f.promote_every.map(|p| p as usize),
                step: super::accum::MMA_K,
            },
        })
    }

    /// `c[m, n] = (accumulate ? c : 0) + op(a) · op(b)` with [`matmul`]'s layout contract,
    /// where `role` says which product of a layer this is. `serial` keeps the work on the
    /// calling thread.
    ///
    /// A non-finite FP8 operand cannot be scaled; the product is then NaN everywhere, so the
    /// loss that depends on it is too.
    #[allow(clippy::too_many_arguments)]
    pub fn product<T: Real>(
        &self,
        role: Role,
        (m, k, n): (usize, usize, usize),
        (a, trans_a): (&[T], bool),
        (b, trans_b): (&[T], bool),
        c: &mut [T],
        accumulate: bool,
        serial: bool,
    ) {
        let mm = if serial { matmul_serial } else { matmul };
        let format = match self {
            GemmNumerics::Exact => return mm(m, k, n, a, trans_a, b, trans_b, c, accumulate),
            GemmNumerics::Bf16 => Format::Bf16,
            GemmNumerics::Fp16 => Format::Fp16,
            GemmNumerics::Fp8(_) => Format::Fp32,
        };
        let p = match self {
            GemmNumerics::Fp8(f) => {
                fp8_gemm(f, role, (m, k, n), (a, trans_a), (b, trans_b), serial)
            }
            _ => {
                let r = |x: &[T]| -> Vec<f32> {
                    x.iter()
                        .map(|v| round16(format, v.to_f64() as f32))
                        .collect()
                };
                let (a, b) = (r(a), r(b));
                let mut p = vec![0f32; m * n];
                let mm32 = if serial { matmul_serial } else { matmul };
                mm32(m, k, n, &a, trans_a, &b, trans_b, &mut p, false);
                p
            }
        };
        for (c, p) in c.iter_mut().zip(p) {
            let p = T::from_f64(f64::from(p));
            *c = if accumulate { *c + p } else { p };
        }
    }
}

/// `x` stored `[rows, cols]` (or `[cols, rows]` when `trans`), as f32 in `[rows, cols]`.
fn oriented<T: Real>(x: &[T], rows: usize, cols: usize, trans: bool) -> Vec<f32> {
    if !trans {
        return x.iter().map(|v| v.to_f64() as f32).collect();
    }
    let mut y = vec![0f32; rows * cols];
    for (i, src) in x.chunks_exact(rows.max(1)).enumerate() {
        for (j, v) in src.iter().enumerate() {
            y[j * cols + i] = v.to_f64() as f32;
        }
    }
    y
}

fn fp8_gemm<T: Real>(
    f: &Fp8Gemm,
    role: Role,
    (m, k, n): (usize, usize, usize),
    (a, trans_a): (&[T], bool),
    (b, trans_b): (&[T], bool),
    serial: bool,
) -> Vec<f32> {
    // Both operands as [outer, K]: A is [m, k]; B, logically [k, n], as [n, k].
    let a32 = oriented(a, m, k, trans_a);
    let b32 = oriented(b, n, k, !trans_b);
    let tile = [1, f.tile];
    let b_block = match role {
        Role::Forward => f.weight_block,
        // w is stored [out, in] and contracted over `out`: the same blocks, transposed.
        Role::InputGrad => [f.weight_block[1], f.weight_block[0]],
        Role::WeightGrad => tile,
    };
    let qa = quantize(&a32, m, k, tile, f.format, f.rule);
    let qb = quantize(&b32, n, k, b_block, f.format, f.rule);
    match (qa, qb) {
        (Ok(qa), Ok(qb)) => fp8_product(&qa, &qb, f.accumulation, serial),
        _ => vec![f32::NAN; m * n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::data::Rng::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (d / n).sqrt()
    }

    fn run(
        num: GemmNumerics,
        role: Role,
        dims: (usize, usize, usize),
        ta: bool,
        tb: bool,
    ) -> Vec<f32> {
        let (m, k, n) = dims;
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let mut c = vec![0.5f32; m * n];
        num.product(role, dims, (&a, ta), (&b, tb), &mut c, true, false);
        c
    }

    #[test]
    fn exact_is_the_plain_product_and_rounded_formats_stay_near_it() {
        let fp8 = Fp8::DEEPSEEK_V3;
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for role in [Role::Forward, Role::InputGrad, Role::WeightGrad] {
                let dims = (40, 256, 130);
                let exact = run(GemmNumerics::Exact, role, dims, ta, tb);
                let (a, b) = (data(40 * 256, 1), data(256 * 130, 2));
                let mut want = vec![0.5f32; 40 * 130];
                matmul(40, 256, 130, &a, ta, &b, tb, &mut want, true);
                assert_eq!(exact, want);
                // bf16 keeps 8 bits, E4M3 4 and E5M2 3: relative errors near 2^-9, 2^-5,
                // 2^-4 per operand, averaged down over 256 products.
                for (format, lo, hi) in [
                    (Format::Bf16, 1e-4, 4e-3),
                    (Format::Fp16, 1e-5, 5e-4),
                    (Format::E4m3, 5e-3, 5e-2),
                    (Format::E5m2, 1e-2, 1e-1),
                ] {
                    let got = run(GemmNumerics::of(format, Some(&fp8)), role, dims, ta, tb);
                    let e = rel(&got, &exact);
                    assert!(lo < e && e < hi, "{format} {role:?} {ta} {tb}: {e}");
                }
            }
        }
    }

    #[test]
    fn the_fp8_product_equals_the_product_of_the_dequantized_operands() {
        // With f32 accumulation bits, the FP8 path differs from multiplying the dequantized
        // operands only by f32 rounding: this pins down which blocks each role uses.
        let mut f = match GemmNumerics::of(Format::E4m3, Some(&Fp8::DEEPSEEK_V3)) {
            GemmNumerics::Fp8(f) => f,
            _ => unreachable!(),
        };
        f.accumulation.datapath = Datapath::Truncating { bits: 23 };
        f.weight_block = [128, 64];
        let (m, k, n) = (3, 256, 192);
        for role in [Role::Forward, Role::InputGrad, Role::WeightGrad] {
            let (a, b) = (data(m * k, 3), data(n * k, 4));
            // b stored [n, k] (trans_b), as a forward weight [out, in].
            let got = fp8_gemm(&f, role, (m, k, n), (&a, false), (&b, true), false);
            let qa = quantize(&a, m, k, [1, 128], f.format, f.rule)
                .unwrap()
                .dequantize();
            let block = match role {
                Role::Forward => [128, 64],
                Role::InputGrad => [64, 128],
                Role::WeightGrad => [1, 128],
            };
            let qb = quantize(&b, n, k, block, f.format, f.rule)
                .unwrap()
                .dequantize();
            let mut want = vec![0f32; m * n];
            matmul(m, k, n, &qa, false, &qb, true, &mut want, false);
            assert!(rel(&got, &want) < 1e-6, "{role:?}: {}", rel(&got, &want));
        }
    }

    #[test]
    fn a_non_finite_fp8_operand_makes_the_product_nan() {
        let num = GemmNumerics::of(Format::E4m3, None);
        let mut a = data(4 * 128, 5);
        a[7] = f32::INFINITY;
        let b = data(128 * 2, 6);
        let mut c = vec![0f32; 8];
        num.product(
            Role::Forward,
            (4, 128, 2),
            (&a, false),
            (&b, false),
            &mut c,
            false,
            true,
        );
        assert!(c.iter().all(|v| v.is_nan()));
    }
}
