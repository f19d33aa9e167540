//! A device's run of a step against the interpreter's on the same inputs, value by value:
//! what `kiln verify` reports and `runtime/tests/device.rs` asserts.
//!
//! Each value is compared by its relative L2 distance `‖dev − cpu‖ / ‖cpu‖` and by its worst
//! element, relative to the interpreter's largest magnitude in that value. A NaN or infinity
//! where the interpreter has a finite number is infinitely far: `f64::max` drops NaN, so every
//! maximum here is taken by hand. Token ids and expert indices (u32 values) are compared by
//! the share of elements that differ.

use std::collections::HashMap;

use kiln_ir::attrs::Format;
use kiln_ir::ir::{Def, Graph, ValueId};
use kiln_ir::program::Formats;

use super::DeviceKind;
use crate::exec::Buf;

/// One value of a step on a device and on the interpreter.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub value: ValueId,
    /// `‖dev − cpu‖ / ‖cpu‖` for floats (infinite with a NaN or infinity the interpreter does
    /// not have); the share of elements that differ for ids.
    pub error: f64,
    /// The largest element difference relative to the interpreter's largest magnitude (ids:
    /// the same share as `error`).
    pub element: f64,
    /// `‖cpu‖` and `‖dev‖` (ids: 0).
    pub cpu: f64,
    pub dev: f64,
    /// Whether the value holds ids (u32), compared by equality.
    pub ids: bool,
}

impl Compared {
    /// A value that vanishes in exact arithmetic — on both sides below `floor` in norm, such
    /// as the gradient of an attention key bias (softmax ignores a shift every key shares) —
    /// holds rounding noise on both sides, and no relative error says anything about it.
    pub fn vanishes(&self, floor: f64) -> bool {
        !self.ids && self.cpu < floor && self.dev < floor
    }
}

/// [`Compared`] for each of `values` present in both runs, in the order given.
pub fn compare(
    values: &[ValueId],
    cpu: &HashMap<ValueId, Buf<f32>>,
    dev: &HashMap<ValueId, Buf<f32>>,
) -> Vec<Compared> {
    values
        .iter()
        .filter_map(|v| Some(compare_one(*v, cpu.get(v)?, dev.get(v)?)))
        .collect()
}

fn compare_one(value: ValueId, cpu: &Buf<f32>, dev: &Buf<f32>) -> Compared {
    match (cpu, dev) {
        (Buf::F(c), Buf::F(d)) => {
            let scale = c.iter().fold(0f64, |m, y| m.max(f64::from(y.abs())));
            let (mut d2, mut c2, mut g2, mut worst) = (0f64, 0f64, 0f64, 0f64);
            let mut broken = c.len() != d.len();
            for (x, y) in d.iter().zip(c) {
                let (x, y) = (f64::from(*x), f64::from(*y));
                if !x.is_finite() && y.is_finite() {
                    broken = true;
                    continue;
                }
                let diff = if x == y { 0.0 } else { (x - y).abs() };
                d2 += diff * diff;
                c2 += y * y;
                g2 += x * x;
                worst = worst.max(diff);
            }
            let far = |e: f64| {
                if broken || e.is_nan() {
                    f64::INFINITY
                } else {
                    e
                }
            };
            Compared {
                value,
                error: far((d2 / c2.max(1e-300)).sqrt()),
                element: far(worst / scale.max(1e-300)),
                cpu: c2.sqrt(),
                dev: if broken { f64::INFINITY } else { g2.sqrt() },
                ids: false,
            }
        }
        (Buf::U(c), Buf::U(d)) => {
            let differ = if c.len() == d.len() {
                c.iter().zip(d).filter(|(a, b)| a != b).count() as f64 / c.len().max(1) as f64
            } else {
                f64::INFINITY
            };
            Compared {
                value,
                error: differ,
                element: differ,
                cpu: 0.0,
                dev: 0.0,
                ids: true,
            }
        }
        _ => Compared {
            value,
            error: f64::INFINITY,
            element: f64::INFINITY,
            cpu: 0.0,
            dev: f64::INFINITY,
            ids: false,
        },
    }
}

/// The values a graph's nodes compute (not its inputs or parameters), in graph order.
pub fn node_values(graph: &Graph) -> Vec<ValueId> {
    graph
        .values
        .iter()
        .filter(|(_, v)| matches!(v.def, Def::Node { .. }))
        .map(|(id, _)| id)
        .collect()
}

/// The narrowest format a policy computes in: FP8 if any GEMM is, else the compute format.
pub fn narrowest(formats: &Formats) -> Format {
    match formats.fp8 {
        Some(_) => Format::E4m3,
        None => formats.compute,
    }
}

/// How far (relative L2) a step's values on `device` may be from the interpreter's, which
/// emulates the policy whose narrowest format is `narrowest`.
///
/// Errors compound from the first node to the last gradient, so one bound holds for every
/// value of a step:
/// - all f32: the arithmetic is the same and only the order of sums differs: 1e-5 on the
///   emulated device (its GEMMs sum as the interpreter's do, its kernels in their own order),
///   1e-4 on a GPU (cuBLASLt's split and tensor-core order, atomics);
/// - 16-bit: kernels keep activations in f32 where the interpreter packs them in the compute
///   format for the backward pass (a relative rounding of 2⁻⁹ for bf16), and a GPU's GEMMs
///   sum in their own order: 3e-2;
/// - FP8: an upstream difference of one f32 ulp can move a value across a code boundary, and
///   on a GPU the tensor cores accumulate as they do, not as the emulation models: 6e-2.
pub fn tolerance(device: DeviceKind, narrowest: Format) -> f64 {
    match (narrowest, device) {
        (Format::Fp32, DeviceKind::CudaEmulated | DeviceKind::Cpu) => 1e-5,
        (Format::Fp32, DeviceKind::Cuda) => 1e-4,
        (Format::Bf16 | Format::Fp16, _) => 3e-2,
        _ => 6e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(c: &[f32], d: &[f32]) -> Compared {
        compare_one(
            ValueId::from_index(0),
            &Buf::F(c.to_vec()),
            &Buf::F(d.to_vec()),
        )
    }

    #[test]
    fn distances_are_relative_and_nan_is_infinitely_far() {
        let same = floats(&[1.0, -2.0, 2.0], &[1.0, -2.0, 2.0]);
        assert_eq!((same.error, same.element), (0.0, 0.0));
        let off = floats(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((off.error - 0.1).abs() < 1e-12, "{}", off.error);
        assert!((off.element - 0.125).abs() < 1e-12, "{}", off.element);
        // A NaN among good elements: `max` would have dropped it.
        for bad in [f32::NAN, f32::INFINITY] {
            let c = floats(&[1.0, 2.0, 3.0], &[1.0, bad, 3.0]);
            assert_eq!((c.error, c.element), (f64::INFINITY, f64::INFINITY));
            assert!(!c.vanishes(1.0));
        }
        // Both sides infinite (an overflow the interpreter shares) is agreement.
        let both = floats(&[f32::NEG_INFINITY, 1.0], &[f32::NEG_INFINITY, 1.0]);
        assert_eq!(both.error, 0.0);
        // A length mismatch is a wrong plan.
        assert_eq!(floats(&[1.0], &[1.0, 2.0]).error, f64::INFINITY);
    }

    #[test]
    fn ids_count_the_share_that_differ() {
        let c = compare_one(
            ValueId::from_index(0),
            &Buf::U(vec![1, 2, 3, 4]),
            &Buf::U(vec![1, 2, 0, 4]),
        );
        assert_eq!(c.error, 0.25);
        assert!(!c.vanishes(1.0), "ids are compared, whatever their norm");
        let mixed = compare_one(ValueId::from_index(0), &Buf::U(vec![1]), &Buf::F(vec![1.0]));
        assert_eq!(mixed.error, f64::INFINITY);
    }

    #[test]
    fn vanishing_values_are_told_apart() {
        let tiny = floats(&[1e-12, -1e-12], &[3e-12, 0.0]);
        assert!(tiny.error > 1.0);
        assert!(tiny.vanishes(1e-9));
        assert!(!floats(&[1.0], &[1.0]).vanishes(1e-9));
    }
}
