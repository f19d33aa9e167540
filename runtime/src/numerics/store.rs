//! Activations kept for the backward pass, stored as a GPU stores them: in the policy's
//! compute format (bf16, fp16), or, for the input of an FP8 GEMM, as the FP8 tiles that GEMM
//! read (DeepSeek-V3 §3.3 caches those instead of the 16-bit tensor).
//!
//! A [`Packed`] value is what the CPU keeps between the last forward use of an activation
//! and its backward uses; each backward use unpacks a transient f32 copy. The bytes held are
//! the policy's, so a CPU run's heap measures the memory the analyzer reports.

use kiln_ir::attrs::Format;
use rayon::prelude::*;

use super::fp8::Fp8Format;
use super::quant::{quantize, Quantized, ScaleFormat, PARALLEL_ELEMENTS};
use crate::cpu::Real;

/// `f` applied to every element, in parallel for large tensors.
fn convert<A: Sync, B: Send>(x: &[A], f: impl Fn(&A) -> B + Sync + Send) -> Vec<B> {
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_iter().map(f).collect()
    } else {
        x.iter().map(f).collect()
    }
}

/// How a kept activation is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// 16-bit floats, rounded to nearest even.
    Half(Half),
    /// FP8 codes with one f32 scale per `1 × tile` tile along the last dimension.
    Fp8 {
        format: Fp8Format,
        tile: usize,
        rule: ScaleFormat,
    },
}

/// A 16-bit storage format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    Fp16,
}

impl Half {
    /// The 16-bit format `format` is, if it is one.
    pub fn of(format: Format) -> Option<Half> {
        match format {
            Format::Bf16 => Some(Half::Bf16),
            Format::Fp16 => Some(Half::Fp16),
            _ => None,
        }
    }

    #[inline]
    pub fn encode(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
            Half::Fp16 => half::f16::from_f32(x).to_bits(),
        }
    }

    #[inline]
    pub fn decode(self, bits: u16) -> f32 {
        match self {
            Half::Bf16 => half::bf16::from_bits(bits).to_f32(),
            Half::Fp16 => half::f16::from_bits(bits).to_f32(),
        }
    }
}

/// A tensor in its storage format.
#[derive(Clone, Debug, PartialEq)]
pub enum Packed {
    Half {
        format: Half,
        bits: Vec<u16>,
    },
    /// Quantized as a `[len / cols, cols]` matrix.
    Fp8(Quantized),
    /// An FP8 tensor with a non-finite element cannot be scaled; like an FP8 GEMM reading
    /// one, it unpacks to NaN everywhere, so the loss and gradients that depend on it are
    /// NaN and the step is skipped.
    NonFinite {
        len: usize,
    },
}

impl Packed {
    /// `x`, whose last dimension is `cols`, stored as `storage`.
    pub fn pack<T: Real>(x: &[T], cols: usize, storage: Storage) -> Packed {
        match storage {
            Storage::Half(h) => Packed::Half {
                format: h,
                bits: convert(x, |v| h.encode(v.to_f64() as f32)),
            },
            Storage::Fp8 { format, tile, rule } => {
                let x32: Vec<f32> = x.iter().map(|v| v.to_f64() as f32).collect();
                let cols = cols.max(1);
                match quantize(&x32, x.len() / cols, cols, [1, tile], format, rule) {
                    Ok(q) => Packed::Fp8(q),
                    Err(_) => Packed::NonFinite { len: x.len() },
                }
            }
        }
    }

    /// The values as the backward pass reads them.
    pub fn unpack<T: Real>(&self) -> Vec<T> {
        let to = |v: f32| T::from_f64(f64::from(v));
        match self {
            Packed::Half { format, bits } => convert(bits, |&b| to(format.decode(b))),
            Packed::Fp8(q) => convert(&q.dequantize(), |&v| to(v)),
            Packed::NonFinite { len } => vec![T::from_f64(f64::NAN); *len],
        }
    }

    /// Bytes held: two per 16-bit element; one per FP8 code and four per scale.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::Half { bits, .. } => 2 * bits.len(),
            Packed::Fp8(q) => q.bytes(),
            Packed::NonFinite { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<f32> {
        let mut rng = crate::data::Rng::new(11);
        (0..len)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * 3.0)
            .collect()
    }

    #[test]
    fn half_storage_rounds_each_element_to_nearest_even() {
        let x = data(1000);
        for (h, format) in [(Half::Bf16, Format::Bf16), (Half::Fp16, Format::Fp16)] {
            let p = Packed::pack(&x, 10, Storage::Half(h));
            assert_eq!(p.bytes(), 2000);
            let y: Vec<f32> = p.unpack();
            let want: Vec<f32> = x
                .iter()
                .map(|&v| super::super::round16(format, v))
                .collect();
            assert_eq!(y, want);
            // f64 runs read the same values.
            let y64: Vec<f64> = p.unpack();
            assert!(y64.iter().zip(&want).all(|(a, b)| *a == f64::from(*b)));
        }
    }

    #[test]
    fn fp8_storage_is_the_quantization_an_fp8_gemm_reads() {
        let (rows, cols) = (6, 200);
        let x = data(rows * cols);
        let storage = Storage::Fp8 {
            format: Fp8Format::E4m3,
            tile: 128,
            rule: ScaleFormat::Fp32,
        };
        let p = Packed::pack(&x, cols, storage);
        // 1200 codes and two tiles (one partial) per row.
        assert_eq!(p.bytes(), 1200 + 4 * 12);
        let q = quantize(&x, rows, cols, [1, 128], Fp8Format::E4m3, ScaleFormat::Fp32).unwrap();
        assert_eq!(p.unpack::<f32>(), q.dequantize());
    }

    #[test]
    fn a_non_finite_fp8_tensor_unpacks_to_nan() {
        let mut x = data(256);
        x[3] = f32::INFINITY;
        let storage = Storage::Fp8 {
            format: Fp8Format::E5m2,
            tile: 128,
            rule: ScaleFormat::Pow2,
        };
        let y: Vec<f32> = Packed::pack(&x, 128, storage).unpack();
        assert_eq!(y.len(), 256);
        assert!(y.iter().all(|v| v.is_nan()));
    }
}
