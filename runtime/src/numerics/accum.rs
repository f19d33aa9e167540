//! Limited-precision accumulation, and the block-scaled FP8 product built on it.
//!
//! Hopper's FP8 tensor cores do not accumulate in f32. DeepSeek-V3 (§3.3.2) reports that
//! they keep "around 14 bits", and copies the partial sum to an FP32 register every
//! N_C = 128 elements of the contraction ("promotion"), where the scales are applied.
//!
//! Two models of the tensor core ([`Datapath`]):
//! - [`Datapath::H100`], the default: the bit-accurate model of H100's FP8 `wgmma` that
//!   Khattak and Mikaitis fitted to the hardware ("Accurate Models of NVIDIA Tensor Cores",
//!   arXiv 2512.07004; their MATLAB models `H100TC.m`). One step fuses 32 products and the
//!   running sum C: the products are exact, every term is aligned to the largest exponent
//!   among them (a product's exponent is the sum of its operands', its significand left
//!   in [1, 4)), cut toward zero to 13 fraction bits below it, summed exactly, and the sum
//!   is truncated to 13 fraction bits: an accumulator with a 14-bit significand (1 + 13),
//!   SageAttention2's "FP22". [`h100_block`] is one step.
//! - [`Datapath::Truncating`], DeepSeek-V3's description taken literally (the model before
//!   this one): the step's products summed in f32, then added to the running sum with
//!   [`add_limited`], both truncated toward zero to `bits` fraction bits below the larger
//!   one's leading bit, and a carry into the next binade dropping one more bit.
//!
//! Either way, every `promote_every` elements the running sum is scaled and added to an f32
//! accumulator and restarts from zero; without promotion the whole contraction stays in the
//! limited sum. The tensor core multiplies codes: each interval's sum is multiplied by the
//! two operands' scales, which are constant across it when promotion follows the scale
//! blocks. A chain that crosses a scale block without promotion (only `promote_every =
//! None` with block scaling does) is carried over in f32: the hardware cannot do that, so
//! such a kernel would scale per tensor instead.
//!
//! With `Truncating { bits: 23 }` and promotion, the product is an f32 product up to
//! truncation instead of rounding.

use super::fp8::Fp8Format;
use super::quant::Quantized;
use rayon::prelude::*;

use crate::cpu::matmul::matmul_serial;

/// Contraction elements the tensor core adds per step: the K of Hopper's FP8 `wgmma`.
pub const MMA_K: usize = 32;

/// Fraction bits H100's FP8 datapath keeps when aligning and after normalizing.
pub const H100_FRACTION_BITS: u32 = 13;

/// How the tensor core joins a step of products to the running sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    /// H100's FP8 `wgmma`, bit for bit ([`h100_block`]).
    H100,
    /// Products summed in f32, then [`add_limited`] with `bits` fraction bits (1 to 23).
    Truncating { bits: u32 },
}

/// How partial sums accumulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accumulation {
    pub datapath: Datapath,
    /// Contraction elements between promotions to f32; `None` never promotes.
    pub promote_every: Option<usize>,
    /// Products the tensor core sums per step: [`MMA_K`] on Hopper; 1 models alignment of
    /// every single product.
    pub step: usize,
}

impl Accumulation {
    /// DeepSeek-V3's recipe on H100: promoted every 128 elements (four `wgmma` steps).
    pub const DEEPSEEK_V3: Accumulation = Accumulation {
        datapath: Datapath::H100,
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

/// One step of H100's FP8 tensor core: `c` plus the products `a[i] · b[i]` of FP8 values
/// (formats `fa`, `fb`; at most a few dozen), as the hardware forms them (see the module
/// documentation). The result has at most 14 significant bits.
pub fn h100_block(a: &[f32], fa: Fp8Format, b: &[f32], fb: Fp8Format, c: f32) -> f32 {
    let (ea, eb): (Vec<i32>, Vec<i32>) = (
        a.iter().map(|&x| code_exponent(x, fa)).collect(),
        b.iter().map(|&x| code_exponent(x, fb)).collect(),
    );
    h100_step(a, &ea, b, &eb, c)
}

/// A code value's exponent as the tensor core sees it: its binade, or the format's least
/// normal exponent for a subnormal; far below any other for zero, so that a zero product
/// never sets the alignment.
#[inline(always)]
fn code_exponent(x: f32, format: Fp8Format) -> i32 {
    if x == 0.0 {
        return ZERO_EXPONENT;
    }
    let field = ((x.to_bits() >> 23) & 0xFF) as i32;
    (field - 127).max(1 - format.bias())
}

/// The exponent [`code_exponent`] gives zero.
const ZERO_EXPONENT: i32 = -1024;

/// The least alignment exponent: its grid's unit, 2^(13 − top), must be an f32. Products of
/// FP8 codes are at least 2^-32, so only a running sum carried across scale blocks could
/// reach below it, and it would be cut on this grid.
const MIN_TOP: i32 = -100;

/// `2^e` for `−126 ≤ e ≤ 127`.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// [`h100_block`] with the operands' exponents ([`code_exponent`]) given.
#[inline(always)]
fn h100_step(a: &[f32], ea: &[i32], b: &[f32], eb: &[i32], c: f32) -> f32 {
    let n = a.len().min(b.len()).min(ea.len()).min(eb.len());
    let (a, ea, b, eb) = (&a[..n], &ea[..n], &b[..n], &eb[..n]);
    // The alignment exponent: the largest product's (significand in [1, 4)), or C's.
    let mut top = ZERO_EXPONENT;
    for i in 0..n {
        top = top.max(ea[i] + eb[i]);
    }
    if c != 0.0 {
        let field = ((c.to_bits() >> 23) & 0xFF) as i32;
        top = top.max(field.max(1) - 127);
    }
    if top <= ZERO_EXPONENT / 2 {
        return 0.0;
    }
    let top = top.max(MIN_TOP);
    // Every term in units of the grid 2^(top − 13), cut toward zero: a product of FP8 values
    // is exact in f32, the scaling by a power of two too, and the conversion truncates.
    // Each term is below 2^15 units, so the sum is exact.
    let unit = pow2(H100_FRACTION_BITS as i32 - top);
    let mut sum = (c * unit) as i64;
    for i in 0..n {
        sum += (a[i] * b[i] * unit) as i64;
    }
    normalized(sum, top)
}

/// `sum` units of 2^(top − 13), normalized and cut toward zero to 13 fraction bits below
/// its leading one; +0 for zero.
#[inline(always)]
fn normalized(sum: i64, top: i32) -> f32 {
    if sum == 0 {
        return 0.0;
    }
    let magnitude = sum.unsigned_abs();
    let lead = 63 - magnitude.leading_zeros();
    let cut = lead.saturating_sub(H100_FRACTION_BITS);
    let kept = ((magnitude >> cut) << cut) as f32;
    let value = kept * pow2(top - H100_FRACTION_BITS as i32);
    if sum < 0 {
        -value
    } else {
        value
    }
}

/// What [`h100_product`] computes each row of its output from.
struct H100Rows<'a> {
    a: &'a Quantized,
    av: &'a [f32],
    ea: &'a [i32],
    steps: &'a [(usize, usize)],
    /// Per step: B's values and exponents, `[w, n]`, and its scale per column.
    b_steps: &'a [(Vec<f32>, Vec<i32>, Vec<f32>)],
    promoted: &'a [bool],
}

impl H100Rows<'_> {
    /// Row `r` of the output into `total`, compiled for AVX-512 or AVX2 when the CPU has
    /// them (integer and IEEE operations only, so every variant gives the same bits).
    fn row(&self, r: usize, total: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            fn avx512(rows: &H100Rows<'_>, r: usize, total: &mut [f32]) {
                rows.body(r, total)
            }
            #[target_feature(enable = "avx2")]
            fn avx2(rows: &H100Rows<'_>, r: usize, total: &mut [f32]) {
                rows.body(r, total)
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just now).
                return unsafe { avx512(self, r, total) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just now).
                return unsafe { avx2(self, r, total) };
            }
        }
        self.body(r, total)
    }

    #[inline(always)]
    fn body(&self, r: usize, total: &mut [f32]) {
        let (a, av, ea) = (self.a, self.av, self.ea);
        let (k, n) = (a.cols, total.len());
        let mut running = vec![0f32; n];
        let mut top = vec![0i32; n];
        let mut unit = vec![0f32; n];
        let mut sum = vec![0i64; n];
        let mut part = vec![0f32; n];
        for (i, &(k0, w)) in self.steps.iter().enumerate() {
            let (bt, ebt, sb) = &self.b_steps[i];
            let (ar, ear) = (
                &av[r * k + k0..r * k + k0 + w],
                &ea[r * k + k0..r * k + k0 + w],
            );
            // The alignment exponent of every column: its running sum's, then its products'.
            for (t, &c) in top.iter_mut().zip(&running) {
                let field = ((c.to_bits() >> 23) & 0xFF) as i32;
                *t = if c == 0.0 {
                    ZERO_EXPONENT
                } else {
                    field.max(1) - 127
                };
            }
            for (j, &e) in ear.iter().enumerate() {
                for (t, &f) in top.iter_mut().zip(&ebt[j * n..(j + 1) * n]) {
                    *t = (*t).max(e + f);
                }
            }
            // Every term in units of 2^(top − 13), cut toward zero: an integer below 2^15. (A
            // column with no non-zero term sums to zero whatever its unit.)
            for (((p, t), u), &c) in part
                .iter_mut()
                .zip(top.iter_mut())
                .zip(unit.iter_mut())
                .zip(&running)
            {
                *t = (*t).max(MIN_TOP);
                *u = pow2(H100_FRACTION_BITS as i32 - *t);
                *p = (c * *u).trunc();
            }
            if w < 1 << 9 {
                // Fewer than 2^9 terms below 2^15 sum below 2^24: exactly, in f32. Scaled
                // back, the sum is a normal f32, so cutting it to 13 fraction bits clears the
                // low 10 bits of its significand (and + 0 makes a zero +0).
                for (j, &x) in ar.iter().enumerate() {
                    let products = &bt[j * n..(j + 1) * n];
                    for ((p, &u), &y) in part.iter_mut().zip(&unit).zip(products) {
                        *p += (x * y * u).trunc();
                    }
                }
                for ((c, &p), &t) in running.iter_mut().zip(&part).zip(&top) {
                    let v = p * pow2(t - H100_FRACTION_BITS as i32) + 0.0;
                    *c = f32::from_bits(v.to_bits() & !((1 << (23 - H100_FRACTION_BITS)) - 1));
                }
            } else {
                // Longer steps (not the hardware's) sum in runs of 2^9 into i64.
                for (s, p) in sum.iter_mut().zip(part.iter_mut()) {
                    *s = *p as i64;
                    *p = 0.0;
                }
                for (run, values) in ar.chunks(1 << 9).enumerate() {
                    for (j, &x) in values.iter().enumerate() {
                        let products = &bt[((run << 9) + j) * n..][..n];
                        for ((p, &u), &y) in part.iter_mut().zip(&unit).zip(products) {
                            *p += (x * y * u).trunc();
                        }
                    }
                    for (s, p) in sum.iter_mut().zip(part.iter_mut()) {
                        *s += *p as i64;
                        *p = 0.0;
                    }
                }
                for ((c, &s), &t) in running.iter_mut().zip(&sum).zip(&top) {
                    *c = normalized(s, t);
                }
            }
            let sa = a.scale(r, k0);
            if self.promoted[i] {
                for ((o, c), &s) in total.iter_mut().zip(running.iter_mut()).zip(sb) {
                    *o += *c * (sa * s);
                    *c = 0.0;
                }
            } else {
                // A chain across a scale block without promotion (see the module
                // documentation): carried in f32 into the next block's units.
                let (k1, _) = self.steps[i + 1];
                let (sa1, sb1) = (a.scale(r, k1), &self.b_steps[i + 1].2);
                for ((c, &s), &s1) in running.iter_mut().zip(sb).zip(sb1) {
                    let (scale, next) = (sa * s, sa1 * s1);
                    if scale != next {
                        *c = *c * scale / next;
                    }
                }
            }
        }
    }
}

/// [`fp8_product`] on [`Datapath::H100`]: per output element, the steps of the contraction
/// chained through the tensor core (as [`h100_block`] computes each) and, at each promotion,
/// scaled and added to an f32 sum. A row of the output is computed a step at a time for all
/// its columns at once, with B's step transposed so that the loops over columns vectorize.
fn h100_product(a: &Quantized, b: &Quantized, acc: Accumulation, serial: bool) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let steps = steps(a, b, acc);
    let (av, bv) = (a.code_values(), b.code_values());
    let ea: Vec<i32> = av.iter().map(|&x| code_exponent(x, a.format)).collect();
    // Per step: B's values and exponents, [w, n], and its scale per column.
    let b_steps: Vec<(Vec<f32>, Vec<i32>, Vec<f32>)> = steps
        .iter()
        .map(|&(k0, w)| {
            let (mut values, mut exps) = (vec![0f32; w * n], vec![0i32; w * n]);
            for c in 0..n {
                for j in 0..w {
                    let x = bv[c * k + k0 + j];
                    values[j * n + c] = x;
                    exps[j * n + c] = code_exponent(x, b.format);
                }
            }
            (values, exps, (0..n).map(|c| b.scale(c, k0)).collect())
        })
        .collect();
    // Whether the tensor core's sum is promoted after each step.
    let mut since = 0;
    let promoted: Vec<bool> = steps
        .iter()
        .enumerate()
        .map(|(i, &(_, w))| {
            since += w;
            let end = i + 1 == steps.len() || acc.promote_every.is_some_and(|p| since >= p);
            if end {
                since = 0;
            }
            end
        })
        .collect();
    let rows = H100Rows {
        a,
        av: &av,
        ea: &ea,
        steps: &steps,
        b_steps: &b_steps,
        promoted: &promoted,
    };
    let row = |(r, total): (usize, &mut [f32])| rows.row(r, total);
    if serial {
        out.chunks_mut(n).enumerate().for_each(row);
    } else {
        out.par_chunks_mut(n).enumerate().for_each(row);
    }
    out
}

/// `C[m, n] = Σ_k A[m, k] · B[n, k]` for two quantized operands laid out `[outer, K]`, with
/// each element's scales applied, accumulated as `acc` describes. The steps of `acc.step`
/// products are narrowed where needed so that none straddles a scale block or a promotion point.
///
/// `serial` keeps the work on the calling thread (for callers that already run many
/// products in parallel); otherwise blocks of rows run in parallel. Both give the same bits.
pub fn fp8_product(a: &Quantized, b: &Quantized, acc: Accumulation, serial: bool) -> Vec<f32> {
    assert_eq!(a.cols, b.cols, "fp8_product: contraction lengths differ");
    let bits = match acc.datapath {
        Datapath::H100 => return h100_product(a, b, acc, serial),
        Datapath::Truncating { bits } => bits,
    };
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let groups = steps(a, b, acc);
    let group = groups.first().map_or(1, |g| g.1);
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
                accumulate_row(&mut limited[row.clone()], &part[row], sb, sa, bits);
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

/// The contraction cut into steps of `acc.step` products, narrowed so that none straddles a
/// scale block or a promotion point: `(first element, width)` each.
fn steps(a: &Quantized, b: &Quantized, acc: Accumulation) -> Vec<(usize, usize)> {
    let mut step = gcd(gcd(acc.step.max(1), a.block[1]), b.block[1]);
    if let Some(p) = acc.promote_every {
        step = gcd(step, p);
    }
    let k = a.cols;
    (0..k)
        .step_by(step.max(1))
        .map(|k0| (k0, step.min(k - k0)))
        .collect()
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

    const E4: Fp8Format = Fp8Format::E4m3;

    /// One H100 step on E4M3 operands.
    fn h100(a: &[f32], b: &[f32], c: f32) -> f32 {
        h100_block(a, E4, b, E4, c)
    }

    #[test]
    fn the_h100_model_separates_the_hypotheses_about_the_datapath() {
        let tiny = 2f32.powi(-7); // E4M3's subnormal 2^-7: exponent −6, significand 1/2
                                  // C is cut to 13 fraction bits (SageAttention2's test: A = B = 0).
        assert_eq!(h100(&[0.0], &[0.0], 1.0 + f32::EPSILON), 1.0);
        assert_eq!(
            h100(&[0.0], &[0.0], 1.0 + 2f32.powi(-13)),
            1.0 + 2f32.powi(-13)
        );
        // A product 14 binades below the largest falls outside the 13-bit window...
        assert_eq!(h100(&[1.0, tiny], &[1.0, tiny], 0.0), 1.0);
        // ...cut toward zero on its magnitude, not floored: 1 − 2^-14 gives 1.
        assert_eq!(h100(&[1.0, -tiny], &[1.0, tiny], 0.0), 1.0);
        // The window hangs from the product's exponent (the sum of its operands'), with its
        // significand left in [1, 4): 1.875² = 3.515625 keeps two 2^-13 terms.
        let got = h100(&[1.875, 2.0 * tiny, 2.0 * tiny], &[1.875, tiny, tiny], 0.0);
        assert_eq!(got, 3.515625 + 2f32.powi(-12));
        // 32 products share one alignment: sixteen 2^-14 beside a 1 vanish, where two steps
        // of 16 would keep their 2^-10.
        let mut a = vec![tiny; 16];
        a.push(1.0);
        a.resize(32, 0.0);
        assert_eq!(h100(&a, &a, 0.0), 1.0);
        assert_eq!(
            h100(&a[16..], &a[16..], h100(&a[..16], &a[..16], 0.0)),
            1.0 + 2f32.powi(-10)
        );
        // C takes part in choosing the alignment.
        assert_eq!(h100(&[tiny; 4], &[tiny; 4], 1.0), 1.0);
        // The sum is truncated again after normalizing: 7.03125 + 2^-12 carries into [4, 8),
        // whose grid is 2^-11.
        let got = h100(
            &[1.875, 1.875, 2.0 * tiny],
            &[1.875, 1.875, 2.0 * tiny],
            0.0,
        );
        assert_eq!(got, 7.03125);
        // Zero sums are +0.
        assert_eq!(h100(&[1.0, -1.0], &[1.0, 1.0], 0.0).to_bits(), 0);
        assert_eq!(h100(&[], &[], 0.0).to_bits(), 0);
    }

    /// The H100 step as its description reads, in f64 with explicit floors, to check the
    /// integer arithmetic of [`h100_block`].
    fn h100_by_the_book(a: &[f32], fa: Fp8Format, b: &[f32], fb: Fp8Format, c: f32) -> f32 {
        let exponent = |x: f64, emin: i32| (x.abs().log2().floor() as i32).max(emin);
        let mut terms: Vec<(f64, i32)> = Vec::new(); // (value, exponent)
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (f64::from(x), f64::from(y));
            if x != 0.0 && y != 0.0 {
                terms.push((
                    x * y,
                    exponent(x, 1 - fa.bias()) + exponent(y, 1 - fb.bias()),
                ));
            }
        }
        if c != 0.0 {
            let c = f64::from(c);
            terms.push((c, exponent(c, -126)));
        }
        let Some(top) = terms.iter().map(|t| t.1).max() else {
            return 0.0;
        };
        let unit = 2f64.powi(top - 13);
        let sum: f64 = terms
            .iter()
            .map(|&(v, _)| v.signum() * (v.abs() / unit).floor() * unit)
            .sum();
        if sum == 0.0 {
            return 0.0;
        }
        let grid = 2f64.powi(sum.abs().log2().floor() as i32 - 13);
        (sum.signum() * (sum.abs() / grid).floor() * grid) as f32
    }

    proptest! {
        #[test]
        fn h100_steps_match_their_description(
            codes in proptest::collection::vec((0u8..=255, 0u8..=255), 1..40),
            c in -64f32..64.0,
            c_zero in proptest::bool::ANY,
            e5m2 in proptest::bool::ANY,
        ) {
            let (fa, fb) = (E4, if e5m2 { Fp8Format::E5m2 } else { E4 });
            let value = |f: Fp8Format, code: u8| {
                let v = f.values()[code as usize];
                if v.is_finite() { v } else { 0.0 }
            };
            let a: Vec<f32> = codes.iter().map(|&(x, _)| value(fa, x)).collect();
            let b: Vec<f32> = codes.iter().map(|&(_, y)| value(fb, y)).collect();
            let c = if c_zero { 0.0 } else { c };
            let got = h100_block(&a, fa, &b, fb, c);
            let want = h100_by_the_book(&a, fa, &b, fb, c);
            prop_assert_eq!(got.to_bits(), want.to_bits(), "{} vs {}", got, want);
            // At most 14 significant bits.
            prop_assert_eq!(got.to_bits() & 0x3FF, 0);
        }
    }

    #[test]
    fn h100_products_stay_near_the_exact_product_and_promotion_helps() {
        // Promoted every 128 elements, the 14-bit accumulator stays within about 2^-13 of an
        // f64 product.
        let (a, b) = operands(4, 8, 512);
        let want = reference(&a, &b);
        let acc = Accumulation::DEEPSEEK_V3;
        let got = fp8_product(&a, &b, acc, true);
        let err = max_rel(&got, &want);
        assert!(err < 1e-3, "relative error {err}");
        assert_eq!(
            fp8_product(&a, &b, acc, false),
            got,
            "serial and parallel differ"
        );
        // Without promotion, the limited sum loses more.
        let never = Accumulation {
            promote_every: None,
            ..acc
        };
        assert!(max_rel(&fp8_product(&a, &b, never, true), &want) > 2.0 * err);
    }

    /// Against hardware: the outputs Khattak and Mikaitis measured on H100 (FP8 `wgmma`, C = 0,
    /// 32 products a row) and on Ada (16 products a step, two steps, C given), in their
    /// repository's `model_validation` folder (github.com/north-numerical-computing/
    /// MATLAB-tensor-core, not copied here). Run with `KILN_TC_DATA=<a checkout> cargo test
    /// -p kiln-runtime -- --ignored hardware`.
    #[test]
    #[ignore = "needs KILN_TC_DATA, a checkout of the models' repository"]
    fn the_h100_model_reproduces_measured_tensor_cores() {
        let root = std::path::PathBuf::from(std::env::var("KILN_TC_DATA").expect("KILN_TC_DATA"));
        let read = |gpu: &str, format: &str, name: &str| -> Vec<Vec<f32>> {
            let path = root.join(format!("model_validation/{gpu}/{format}/{name}"));
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .lines()
                .map(|l| {
                    l.split_whitespace()
                        .map(|w| {
                            let radix = if w.len() == 32 { 2 } else { 16 };
                            f32::from_bits(u32::from_str_radix(w, radix).unwrap())
                        })
                        .collect()
                })
                .collect()
        };
        for (gpu, step) in [("H100", 32), ("Ada", 16)] {
            for (name, f) in [("E4M3", E4), ("E5M2", Fp8Format::E5m2)] {
                let a = read(gpu, name, &format!("a_{gpu}_{name}.txt"));
                let b = read(gpu, name, &format!("b_{gpu}_{name}.txt"));
                let c = read(gpu, name, &format!("c_{gpu}_fp32.txt"));
                let d = read(gpu, name, &format!("d_{gpu}_fp32.txt"));
                let mut wrong = 0;
                for i in 0..a.len() {
                    // The H100 rows were measured with C = 0.
                    let mut acc = if gpu == "H100" { 0.0 } else { c[i][0] };
                    for k in (0..a[i].len()).step_by(step) {
                        let end = (k + step).min(a[i].len());
                        acc = h100_block(&a[i][k..end], f, &b[i][k..end], f, acc);
                    }
                    wrong += usize::from(acc.to_bits() != d[i][0].to_bits());
                }
                eprintln!(
                    "{gpu} {name}: {} of {} rows bit-exact",
                    a.len() - wrong,
                    a.len()
                );
                assert_eq!(wrong, 0, "{gpu} {name}");
            }
        }
    }

    #[test]
    fn h100_products_chain_the_steps_and_scale_at_each_promotion() {
        // Mixed signs and scales per block, K not a multiple of the promotion interval.
        let mut rng = crate::data::Rng::new(11);
        let (m, n, k) = (3, 37, 200);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f64() as f32 - 0.3).collect();
        let y: Vec<f32> = (0..n * k)
            .map(|i| (rng.next_f64() as f32 - 0.5) * (1 + i % 5) as f32)
            .collect();
        let f = Fp8Format::E4m3;
        let a = quantize(&x, m, k, [1, 64], f, ScaleFormat::Fp32).unwrap();
        let b = quantize(&y, n, k, [64, 64], f, ScaleFormat::Fp32).unwrap();
        let (av, bv) = (a.code_values(), b.code_values());
        for promote_every in [Some(64), Some(128), None] {
            let acc = Accumulation {
                datapath: Datapath::H100,
                promote_every,
                step: MMA_K,
            };
            let got = fp8_product(&a, &b, acc, false);
            for r in 0..m {
                for c in 0..n {
                    let (mut total, mut running, mut since) = (0f32, 0f32, 0);
                    for k0 in (0..k).step_by(MMA_K) {
                        let w = MMA_K.min(k - k0);
                        let (ar, bc) = (&av[r * k + k0..][..w], &bv[c * k + k0..][..w]);
                        running = h100_block(ar, f, bc, f, running);
                        since += w;
                        let scale = a.scale(r, k0) * b.scale(c, k0);
                        let last = k0 + w == k;
                        if last || promote_every.is_some_and(|p| since >= p) {
                            total += running * scale;
                            (running, since) = (0.0, 0);
                        } else {
                            let next = a.scale(r, k0 + w) * b.scale(c, k0 + w);
                            if next != scale {
                                running = running * scale / next;
                            }
                        }
                    }
                    assert_eq!(
                        got[r * n + c].to_bits(),
                        total.to_bits(),
                        "{promote_every:?} ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn long_h100_steps_sum_exactly_too() {
        // Steps beyond 2^9 products (not the hardware's) take the i64 path.
        let mut rng = crate::data::Rng::new(5);
        let k = 1536;
        let x: Vec<f32> = (0..2 * k).map(|_| rng.next_f64() as f32).collect();
        let f = Fp8Format::E4m3;
        let q = quantize(&x, 2, k, [1, k], f, ScaleFormat::Pow2).unwrap();
        let step = 768;
        let acc = Accumulation {
            datapath: Datapath::H100,
            promote_every: None,
            step,
        };
        let got = fp8_product(&q, &q, acc, true);
        let v = q.code_values();
        for r in 0..2 {
            for c in 0..2 {
                let (a, b) = (&v[r * k..(r + 1) * k], &v[c * k..(c + 1) * k]);
                let chained = h100_block(
                    &a[step..],
                    f,
                    &b[step..],
                    f,
                    h100_block(&a[..step], f, &b[..step], f, 0.0),
                );
                let want = chained * (q.scale(r, 0) * q.scale(c, 0));
                assert_eq!(got[r * 2 + c].to_bits(), want.to_bits(), "({r}, {c})");
            }
        }
    }

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
                datapath: Datapath::Truncating { bits: 23 },
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
                datapath: Datapath::Truncating { bits: 14 },
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
                datapath: Datapath::Truncating { bits: 14 },
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
