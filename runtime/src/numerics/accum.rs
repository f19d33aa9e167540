//! Limited-precision accumulation, and the block-scaled FP8 product built on it.
//!
//! DeepSeek-V3 (§3.3.2) observes that Hopper's FP8 tensor cores keep only about 14 bits of
//! their running sum: each addend is aligned to the largest exponent in play by a right
//! shift, and the bits shifted out are lost. Its remedy is to copy the partial sum to an FP32
//! register every N_C = 128 elements of the contraction ("promotion"), where the scales are
//! applied and the full-precision sum continues.
//!
//! The model here:
//! - the tensor core adds [`MMA_K`] products at a time (one FP8 `wgmma` step on Hopper;
//!   [`Accumulation::step`] changes it); the sum of those products is formed in f32, then added to the running sum with
//!   [`add_limited`]: both are truncated toward zero to `bits` fraction bits below the larger
//!   one's leading bit, added exactly, and a carry into the next binade drops one more bit;
//! - every `promote_every` elements the running sum is added to an f32 accumulator and
//!   restarts from zero; without promotion the whole contraction stays in the limited sum;
//! - each group's product sum is multiplied by the two operands' scales before it is added
//!   (on Hopper the scales are constant across a promotion interval and applied once at
//!   promotion; the order differs only where a truncation meets a non-power-of-two scale).
//!
//! With `bits = 23` and promotion, this is an f32 product up to truncation instead of
//! rounding; `bits` between 1 and 22 adds exactly the stated loss.

use super::quant::Quantized;
use rayon::prelude::*;

use crate::cpu::matmul::matmul_serial;

/// Contraction elements the tensor core adds per step: the K of Hopper's FP8 `wgmma`.
pub const MMA_K: usize = 32;

/// How partial sums accumulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accumulation {
    /// Fraction bits the limited accumulator keeps (f32 keeps 23).
    pub bits: u32,
    /// Contraction elements between promotions to f32; `None` never promotes.
    pub promote_every: Option<usize>,
    /// Products the tensor core sums before adding them to the running sum: [`MMA_K`] on
    /// Hopper; 1 models alignment of every single product.
    pub step: usize,
}

impl Accumulation {
    /// DeepSeek-V3's description of Hopper: 14 bits, promoted every 128 elements.
    pub const DEEPSEEK_V3: Accumulation = Accumulation {
        bits: 14,
        promote_every: Some(128),
        step: MMA_K,
    };
}

/// `v` truncated toward zero to a multiple of `2^e` (`e ≥ -149`), by clearing the fraction
/// bits below that weight. Branch-free, so that loops over it vectorize.
#[inline(always)]
fn truncate_to(v: f32, e: i32) -> f32 {
    let bits = v.to_bits();
    // The weight of the lowest fraction bit is 2^(field − 150), subnormals sharing field 1's.
    let field = ((bits >> 23) & 0xFF).max(1) as i32;
    let cut = e - (field - 150);
    // Past 23 bits the value is below the grid altogether: keep only the sign.
    let cut = if cut > 23 { 31 } else { cut.max(0) } as u32;
    f32::from_bits(bits & !((1u32 << cut) - 1))
}

/// `acc + x` in an accumulator that keeps `bits` fraction bits: both operands are truncated
/// toward zero to the grid of the larger one's binade, their sum is exact (for `bits` ≤ 22),
/// and a carry into the next binade truncates once more. Operands below f32's normal range
/// are not truncated.
#[inline(always)]
pub fn add_limited(acc: f32, x: f32, bits: u32) -> f32 {
    let field = |v: f32| ((v.to_bits() >> 23) & 0xFF) as i32;
    let top = field(acc).max(field(x));
    // The grid of the larger operand's binade: 2^(top − 127 − bits).
    let e = (top - 127 - bits as i32).max(-149);
    let s = truncate_to(acc, e) + truncate_to(x, e);
    let carried = truncate_to(s, e + 1);
    if field(s) > top {
        carried
    } else {
        s
    }
}

/// `limited[i] = add_limited(limited[i], part[i] · (sa · sb[i]), bits)`: one group's scaled
/// products into a row of running sums, compiled for AVX-512 or AVX2 when the CPU has them
/// (integer and IEEE operations only, so every variant gives the same bits).
fn accumulate_row(limited: &mut [f32], part: &[f32], sb: &[f32], sa: f32, bits: u32) {
    #[inline(always)]
    fn body(limited: &mut [f32], part: &[f32], sb: &[f32], sa: f32, bits: u32) {
        let n = limited.len().min(part.len()).min(sb.len());
        let (limited, part, sb) = (&mut limited[..n], &part[..n], &sb[..n]);
        for i in 0..n {
            limited[i] = add_limited(limited[i], part[i] * (sa * sb[i]), bits);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(limited: &mut [f32], part: &[f32], sb: &[f32], sa: f32, bits: u32) {
            body(limited, part, sb, sa, bits)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(limited: &mut [f32], part: &[f32], sb: &[f32], sa: f32, bits: u32) {
            body(limited, part, sb, sa, bits)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just now).
            return unsafe { avx512(limited, part, sb, sa, bits) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just now).
            return unsafe { avx2(limited, part, sb, sa, bits) };
        }
    }
    body(limited, part, sb, sa, bits)
}

/// `C[m, n] = Σ_k A[m, k] · B[n, k]` for two quantized operands laid out `[outer, K]`, with
/// each element's scales applied, accumulated as `acc` describes. The steps of `acc.step`
/// products are narrowed where needed so that none straddles a scale block or a promotion point.
///
/// `serial` keeps the work on the calling thread (for callers that already run many
/// products in parallel); otherwise blocks of rows run in parallel. Both give the same bits.
pub fn fp8_product(a: &Quantized, b: &Quantized, acc: Accumulation, serial: bool) -> Vec<f32> {
    assert_eq!(a.cols, b.cols, "fp8_product: contraction lengths differ");
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let mut group = gcd(gcd(acc.step.max(1), a.block[1]), b.block[1]);
    if let Some(p) = acc.promote_every {
        group = gcd(group, p);
    }
    let groups: Vec<(usize, usize)> = (0..k)
        .step_by(group.max(1))
        .map(|k0| (k0, group.min(k - k0)))
        .collect();
    // B's code values group by group, each [n, w] contiguous, and their scales per column.
    let bv = b.code_values();
    let b_groups: Vec<(Vec<f32>, Vec<f32>)> = groups
        .iter()
        .map(|&(k0, w)| {
            let mut g = Vec::with_capacity(n * w);
            for row in bv.chunks_exact(k) {
                g.extend_from_slice(&row[k0..k0 + w]);
            }
            (g, (0..n).map(|c| b.scale(c, k0)).collect())
        })
        .collect();
    let av = a.code_values();
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    // Rows in blocks that keep a block's running sums in cache across the groups; the
    // blocks are independent, so they run in parallel unless `serial`.
    let block_rows = (16 * 1024 / n).clamp(1, 64);
    let block = |(t, out): (usize, &mut [f32])| {
        let (r0, rows) = (t * block_rows, out.len() / n);
        let mut limited = vec![0f32; rows * n];
        let mut part = vec![0f32; rows * n];
        let mut ga = vec![0f32; rows * group];
        let mut since_promotion = 0;
        for (&(k0, w), (gb, sb)) in groups.iter().zip(&b_groups) {
            let ga = &mut ga[..rows * w];
            for (d, src) in ga.chunks_exact_mut(w).zip(av[r0 * k..].chunks_exact(k)) {
                d.copy_from_slice(&src[k0..k0 + w]);
            }
            matmul_serial(rows, w, n, ga, false, gb, true, &mut part, false);
            for r in 0..rows {
                let row = r * n..(r + 1) * n;
                let sa = a.scale(r0 + r, k0);
                accumulate_row(&mut limited[row.clone()], &part[row], sb, sa, acc.bits);
            }
            since_promotion += w;
            let last = k0 + w == k;
            if acc
                .promote_every
                .map_or(last, |p| since_promotion >= p || last)
            {
                for (o, l) in out.iter_mut().zip(limited.iter_mut()) {
                    *o += *l;
                    *l = 0.0;
                }
                since_promotion = 0;
            }
        }
    };
    if serial {
        out.chunks_mut(block_rows * n).enumerate().for_each(block);
    } else {
        out.par_chunks_mut(block_rows * n)
            .enumerate()
            .for_each(block);
    }
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::fp8::Fp8Format;
    use crate::numerics::quant::{quantize, ScaleFormat};
    use proptest::prelude::*;

    #[test]
    fn addends_lose_the_bits_below_the_larger_operands_grid() {
        // Two fraction bits: the grid of [1, 2) is 0.25.
        assert_eq!(add_limited(1.0, 0.3, 2), 1.25);
        assert_eq!(
            add_limited(-1.0, -0.3, 2),
            -1.25,
            "truncation is toward zero"
        );
        assert_eq!(
            add_limited(0.3, 1.0, 2),
            1.25,
            "either operand may be the larger"
        );
        // 1.75 + 0.5 = 2.25 carries into [2, 4), whose grid is 0.5.
        assert_eq!(add_limited(1.75, 0.5, 2), 2.0);
        // Cancellation is exact.
        assert_eq!(add_limited(1.5, -1.25, 2), 0.25);
        assert_eq!(add_limited(0.0, 0.0, 2), 0.0);
        // A small running sum is cut to the grid of a large addend.
        assert_eq!(add_limited(0.2, 8.0, 2), 8.0);
        assert_eq!(add_limited(0.0, 0.3, 2), 0.25);
    }

    proptest! {
        #[test]
        fn limited_sums_are_on_the_grid_and_within_its_bound(
            acc in -1e6f32..1e6,
            x in -1e6f32..1e6,
            bits in 1u32..23,
        ) {
            let s = add_limited(acc, x, bits);
            let top = f64::from(acc.abs().max(x.abs())).log2().floor().max(-200.0) as i32;
            let q = 2f64.powi((top - bits as i32).max(-149)) as f32;
            // Two truncations, and one more of twice the step after a carry.
            let exact = f64::from(acc) + f64::from(x);
            prop_assert!((f64::from(s) - exact).abs() <= 4.0 * f64::from(q), "{acc} + {x} → {s}");
            prop_assert!((f64::from(s) / f64::from(q)).fract() == 0.0, "{s} on the grid of {q}");
        }
    }

    fn reference(a: &Quantized, b: &Quantized) -> Vec<f64> {
        let (x, y) = (a.dequantize(), b.dequantize());
        let (m, n, k) = (a.rows, b.rows, a.cols);
        let mut c = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                c[r * n + j] = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(y[j * k + i]))
                    .sum();
            }
        }
        c
    }

    fn operands(m: usize, n: usize, k: usize) -> (Quantized, Quantized) {
        let mut rng = crate::data::Rng::new(7);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f64() as f32).collect();
        let y: Vec<f32> = (0..n * k).map(|_| rng.next_f64() as f32 - 0.25).collect();
        let f = Fp8Format::E4m3;
        (
            quantize(&x, m, k, [1, 128], f, ScaleFormat::Fp32).unwrap(),
            quantize(&y, n, k, [128, 128], f, ScaleFormat::Fp32).unwrap(),
        )
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn with_f32_bits_and_promotion_the_product_is_an_f32_product() {
        let (a, b) = operands(5, 130, 300);
        let c = fp8_product(
            &a,
            &b,
            Accumulation {
                bits: 23,
                promote_every: Some(128),
                step: MMA_K,
            },
            true,
        );
        let err = max_rel(&c, &reference(&a, &b));
        assert!(err < 1e-5, "relative error {err}");
    }

    #[test]
    fn promotion_bounds_the_error_that_a_long_limited_sum_accumulates() {
        let (a, b) = operands(4, 8, 4096);
        let want = reference(&a, &b);
        let err = |promote_every| {
            let acc = Accumulation {
                bits: 14,
                promote_every,
                step: MMA_K,
            };
            max_rel(&fp8_product(&a, &b, acc, false), &want)
        };
        let (never, every) = (err(None), err(Some(128)));
        assert!(
            never > 5.0 * every,
            "no promotion {never}, every 128 {every}"
        );
        assert!(
            every < 2e-4,
            "promotion every 128 keeps 14-bit error small: {every}"
        );
    }

    #[test]
    fn aligning_fewer_products_per_step_loses_more() {
        // One truncation per step: the fewer products per step, the more truncations, and
        // without promotion their loss accumulates over the whole contraction.
        let (a, b) = operands(4, 8, 4096);
        let want = reference(&a, &b);
        let err = |step| {
            let acc = Accumulation {
                bits: 14,
                promote_every: None,
                step,
            };
            max_rel(&fp8_product(&a, &b, acc, true), &want)
        };
        let (one, four, wgmma) = (err(1), err(4), err(MMA_K));
        assert!(
            one > 2.0 * four && four > 3.0 * wgmma,
            "{one} {four} {wgmma}"
        );
    }

    #[test]
    fn serial_and_parallel_products_agree_bit_for_bit() {
        let (a, b) = operands(70, 90, 256);
        let acc = Accumulation::DEEPSEEK_V3;
        assert_eq!(
            fp8_product(&a, &b, acc, true),
            fp8_product(&a, &b, acc, false)
        );
    }
}
