//! Fine-grained FP8 quantization (DeepSeek-V3 §3.3.1): a matrix is cut into blocks, each
//! block gets one scale from its largest magnitude, and its elements are stored as FP8 codes
//! of `x / scale`. Activations use 1×128 tiles along the contraction dimension, weights
//! 128×128 blocks; the block shape is the caller's choice.
//!
//! The rules, which the CUDA kernels follow too:
//! - `scale = amax / format.max()` in f32, where `amax` is the block's largest `|x|`; with
//!   [`ScaleFormat::Pow2`] it is rounded up to a power of two, so scaling is exact;
//! - a block of zeros gets scale 1 (its codes are zero, and so is every product);
//! - a scale below f32's smallest normal (a block whose `amax` is below about 5e-36 in E4M3)
//!   is raised to it, and a scale whose largest code would overflow f32 (an `amax` within a
//!   rounding, or with `Pow2` a binade, of `f32::MAX`) is lowered until it does not, so scales
//!   and dequantized values are never zero, subnormal or infinite, at the price of
//!   saturating the largest elements of such a block;
//! - `code = encode(x / scale)`, rounding to nearest even and saturating;
//! - `dequantized = decode(code) · scale`.
//!
//! A NaN or infinite element is an error naming its position: quantizing it would poison its
//! whole block's scale.

use rayon::prelude::*;

use super::fp8::Fp8Format;

/// Tensors at least this large are converted (quantized, dequantized, packed) on several
/// threads.
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 16;

/// How a block's scale is chosen from its max-abs: the policy's own `ScaleFormat` (`Fp32`:
/// `amax / format.max()`; `Pow2`: that rounded up to a power of two).
pub use kiln_ir::attrs::ScaleFormat;

/// A matrix in FP8 with one f32 scale per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub format: Fp8Format,
    pub rows: usize,
    pub cols: usize,
    /// Block shape `[rows, cols]`; the last block of a row or column may be partial.
    pub block: [usize; 2],
    /// Row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// Row-major `[rows.div_ceil(block[0]), cols.div_ceil(block[1])]`.
    pub scales: Vec<f32>,
}

/// A non-finite element: its row, column and value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    pub row: usize,
    pub col: usize,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot quantize {} at row {}, column {} to FP8: every element must be finite",
            self.value, self.row, self.col
        )
    }
}

impl std::error::Error for NonFinite {}

/// The scale of a block whose largest magnitude is `amax` (finite, ≥ 0).
pub fn scale_of(amax: f32, format: Fp8Format, rule: ScaleFormat) -> f32 {
    if amax == 0.0 {
        return 1.0;
    }
    let s = (amax / format.max()).max(f32::MIN_POSITIVE);
    let s = match rule {
        ScaleFormat::Fp32 => s,
        ScaleFormat::Pow2 => {
            // Round up to a power of two: clear the fraction, and step up one binade unless
            // it was already zero. `s` is normal, so this stays finite (amax ≤ f32::MAX).
            let bits = s.to_bits();
            if bits & 0x007F_FFFF == 0 {
                s
            } else {
                f32::from_bits((bits & 0x7F80_0000) + 0x0080_0000)
            }
        }
    };
    // Within a rounding (or a binade) of f32::MAX, the largest code times the scale would
    // overflow; step the scale down instead (to the next f32, or the next power of two),
    // and let the few largest elements saturate.
    if (s * format.max()).is_infinite() {
        return match rule {
            ScaleFormat::Fp32 => f32::from_bits(s.to_bits() - 1),
            ScaleFormat::Pow2 => s / 2.0,
        };
    }
    s
}

/// Quantizes the row-major `[rows, cols]` matrix `x` by blocks of `block`.
pub fn quantize(
    x: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
    format: Fp8Format,
    rule: ScaleFormat,
) -> Result<Quantized, NonFinite> {
    assert_eq!(x.len(), rows * cols, "quantize: x is not [rows, cols]");
    assert!(block[0] > 0 && block[1] > 0, "quantize: empty block");
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(NonFinite {
            row: i / cols,
            col: i % cols,
            value: x[i],
        });
    }
    let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut amax = vec![0f32; br * bc];
    for (r, row) in x.chunks_exact(cols.max(1)).enumerate() {
        let at = (r / block[0]) * bc;
        for (j, chunk) in row.chunks(block[1]).enumerate() {
            let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            amax[at + j] = amax[at + j].max(m);
        }
    }
    let scales: Vec<f32> = amax.iter().map(|&a| scale_of(a, format, rule)).collect();
    let mut codes = vec![0u8; rows * cols];
    let encode_row = |(r, (row, out)): (usize, (&[f32], &mut [u8]))| {
        let at = (r / block[0]) * bc;
        for (j, (chunk, out)) in row
            .chunks(block[1])
            .zip(out.chunks_mut(block[1]))
            .enumerate()
        {
            let s = scales[at + j];
            for (o, &v) in out.iter_mut().zip(chunk) {
                *o = format.encode(v / s);
            }
        }
    };
    let (x_rows, code_rows) = (
        x.chunks_exact(cols.max(1)),
        codes.chunks_exact_mut(cols.max(1)),
    );
    if x.len() >= PARALLEL_ELEMENTS {
        x_rows
            .zip(code_rows)
            .enumerate()
            .par_bridge()
            .for_each(encode_row);
    } else {
        x_rows.zip(code_rows).enumerate().for_each(encode_row);
    }
    Ok(Quantized {
        format,
        rows,
        cols,
        block,
        codes,
        scales,
    })
}

impl Quantized {
    /// The scale of element `(r, c)`.
    #[inline]
    pub fn scale(&self, r: usize, c: usize) -> f32 {
        self.scales[(r / self.block[0]) * self.cols.div_ceil(self.block[1]) + c / self.block[1]]
    }

    /// The unscaled value of every code, row-major: what the tensor core multiplies.
    pub fn code_values(&self) -> Vec<f32> {
        let table = self.format.values();
        self.codes.iter().map(|&c| table[c as usize]).collect()
    }

    /// `decode(code) · scale` for every element, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let table = self.format.values();
        let mut y = vec![0f32; self.codes.len()];
        let cols = self.cols.max(1);
        let row = |(r, (out, codes)): (usize, (&mut [f32], &[u8]))| {
            for (j, (out, codes)) in out
                .chunks_mut(self.block[1])
                .zip(codes.chunks(self.block[1]))
                .enumerate()
            {
                let s = self.scale(r, j * self.block[1]);
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o = table[c as usize] * s;
                }
            }
        };
        let rows = y.chunks_mut(cols).zip(self.codes.chunks(cols)).enumerate();
        if self.codes.len() >= PARALLEL_ELEMENTS {
            rows.par_bridge().for_each(row);
        } else {
            rows.for_each(row);
        }
        y
    }

    /// Bytes this takes on a device: one per code, four per scale.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Half the spacing of the format's grid around `|v|` (unscaled).
    fn half_ulp(format: Fp8Format, v: f32) -> f32 {
        let v = v.abs().min(format.max());
        let step = if v < format.min_normal() {
            format.min_subnormal()
        } else {
            let e = v.log2().floor();
            2f32.powf(e - format.mantissa_bits() as f32)
        };
        step / 2.0
    }

    fn finite() -> impl Strategy<Value = f32> {
        prop_oneof![
            -10.0f32..10.0,
            (-1e-3f32..1e-3),
            (-1e30f32..1e30),
            // Subnormal and tiny normal f32 values.
            (-1e-37f32..1e-37),
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::MAX),
            Just(-f32::MAX),
        ]
    }

    proptest! {
        #[test]
        fn dequantized_values_are_within_half_an_ulp_times_the_scale(
            rows in 1usize..6,
            cols in 1usize..300,
            block_rows in 1usize..4,
            block_cols in prop::sample::select(vec![1usize, 7, 32, 128]),
            seed in prop::collection::vec(finite(), 1..64),
            e5m2 in any::<bool>(),
            pow2 in any::<bool>(),
        ) {
            let format = if e5m2 { Fp8Format::E5m2 } else { Fp8Format::E4m3 };
            let rule = if pow2 { ScaleFormat::Pow2 } else { ScaleFormat::Fp32 };
            let x: Vec<f32> = (0..rows * cols).map(|i| seed[(i * 31 + i / 7) % seed.len()]).collect();
            let q = quantize(&x, rows, cols, [block_rows, block_cols], format, rule).unwrap();
            let y = q.dequantize();
            for s in &q.scales {
                prop_assert!(s.is_normal() && *s > 0.0, "scale {s}");
            }
            if rule == ScaleFormat::Pow2 {
                for s in &q.scales {
                    prop_assert_eq!(s.to_bits() & 0x007F_FFFF, 0, "{} is a power of two", s);
                }
            }
            for r in 0..rows {
                for c in 0..cols {
                    let (v, d, s) = (x[r * cols + c], y[r * cols + c], q.scale(r, c));
                    // The bound of the format's rounding, plus f32's rounding of v / s and of
                    // code · s (relative 2^-24 each).
                    let bound = half_ulp(format, v / s) * s + v.abs() * 2.0 * f32::EPSILON
                        // Saturation, only in blocks whose scale was lowered near f32::MAX.
                        + (v.abs() - format.max() * s).max(0.0);
                    prop_assert!((v - d).abs() <= bound, "{v} → {d} (scale {s}, bound {bound})");
                    prop_assert!(d.is_finite());
                }
            }
        }
    }

    #[test]
    fn a_block_of_zeros_has_scale_one_and_zero_codes() {
        let x = [0.0, -0.0, 0.0, 5.0];
        let q = quantize(&x, 2, 2, [1, 2], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap();
        assert_eq!(q.scales, vec![1.0, 5.0 / 448.0]);
        assert_eq!(&q.codes[..2], &[0x00, 0x80]);
        assert_eq!(q.dequantize()[3], 5.0, "the block max maps to 448 exactly");
    }

    #[test]
    fn scales_follow_the_block_max_and_saturate_nothing() {
        // One 1×4 tile per row: the largest element becomes exactly ±448 · scale.
        let x = [1.0, -3.0, 0.5, 2.0, 1e-3, 2e-3, -4e-3, 0.0];
        let q = quantize(&x, 2, 4, [1, 4], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap();
        assert_eq!(q.scales, vec![3.0 / 448.0, 4e-3 / 448.0]);
        assert_eq!(q.codes[1], 0x80 | 0x7E);
        assert_eq!(q.codes[6], 0x80 | 0x7E);
        let p = quantize(&x, 2, 4, [1, 4], Fp8Format::E4m3, ScaleFormat::Pow2).unwrap();
        assert_eq!(p.scales[0], 1.0 / 128.0, "3/448 rounds up to 2^-7");
    }

    #[test]
    fn tiny_blocks_get_the_smallest_normal_scale() {
        let x = [1e-40f32, -2e-40];
        let q = quantize(&x, 1, 2, [1, 2], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap();
        assert_eq!(q.scales, vec![f32::MIN_POSITIVE]);
        let y = q.dequantize();
        assert!((y[1] - x[1]).abs() <= f32::MIN_POSITIVE * Fp8Format::E4m3.min_subnormal());
    }

    #[test]
    fn non_finite_elements_are_errors_naming_their_position() {
        let x = [1.0, 2.0, 3.0, f32::NAN, 0.0, f32::INFINITY];
        let e = quantize(&x, 2, 3, [1, 3], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap_err();
        assert_eq!((e.row, e.col), (1, 0));
        assert!(e.value.is_nan());
        assert!(e.to_string().contains("row 1, column 0"), "{e}");
    }

    #[test]
    fn weight_blocks_share_one_scale_across_rows() {
        // A 4×4 matrix in 2×2 blocks: the scale of block (0, 1) comes from rows 0-1,
        // columns 2-3 only.
        let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let q = quantize(&x, 4, 4, [2, 2], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap();
        let want: Vec<f32> = [5.0f32, 7.0, 13.0, 15.0]
            .iter()
            .map(|m| m / 448.0)
            .collect();
        assert_eq!(q.scales, want);
        assert_eq!(q.scale(1, 3), 7.0 / 448.0);
        assert_eq!(q.bytes(), 16 + 16);
    }
}
