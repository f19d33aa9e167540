//! Elementwise loops compiled for the widest vector instructions the CPU has.
//!
//! The crate builds for baseline x86-64 (SSE2), so a binary runs anywhere; the loops here are
//! compiled a second and third time with AVX2 and AVX-512 enabled and picked at run time. They
//! use only IEEE additions, multiplications, divisions, comparisons and bit operations (no
//! fused multiply-adds, which Rust never introduces on its own), so every variant computes the
//! same bits, and a run gives the same numbers on every machine. The exponential they call is
//! [`super::exp_f32`] in f32, which is branch-free so that it vectorizes.

use super::elementwise::swiglu;
use super::Real;

/// Defines `pub fn $name<T: Real>(args)` whose body runs in an AVX-512 or AVX2 compilation
/// of itself when the CPU supports one, and as written otherwise.
macro_rules! vectorized {
    ($(#[$doc:meta])* pub fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        pub fn $name<T: Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512<T: Real>($($arg: $ty),*) $body
                #[target_feature(enable = "avx2")]
                fn avx2<T: Real>($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just now).
                    return unsafe { avx512::<T>($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just now).
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            $body
        }
    };
}

vectorized! {
    /// `out[i] = silu(gate[i])·up[i]`, bit for bit [`swiglu`]'s value.
    pub fn swiglu_values<T: Real>(gate: &[T], up: &[T], out: &mut [T]) {
        let n = out.len().min(gate.len()).min(up.len());
        let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
        for i in 0..n {
            out[i] = swiglu(gate[i], up[i]).0;
        }
    }
}

vectorized! {
    /// [`swiglu`] over a block: its value into `a`, its partial derivatives by the gate and
    /// the up operand into `d_gate` and `d_up`.
    pub fn swiglu_values_and_grads<T: Real>(
        gate: &[T],
        up: &[T],
        a: &mut [T],
        d_gate: &mut [T],
        d_up: &mut [T],
    ) {
        let n = a.len().min(gate.len()).min(up.len()).min(d_gate.len()).min(d_up.len());
        let (gate, up, a, d_gate, d_up) = (&gate[..n], &up[..n], &mut a[..n], &mut d_gate[..n], &mut d_up[..n]);
        for i in 0..n {
            let (v, dg, du) = swiglu(gate[i], up[i]);
            a[i] = v;
            d_gate[i] = dg;
            d_up[i] = du;
        }
    }
}

vectorized! {
    /// `x[i] = exp(x[i] − shift)`.
    pub fn exp_shifted<T: Real>(x: &mut [T], shift: T) {
        for v in x.iter_mut() {
            *v = (*v - shift).exp();
        }
    }
}

vectorized! {
    /// `out[i] = exp(x[i] − shift)·scale`.
    pub fn exp_shifted_scaled<T: Real>(x: &[T], shift: T, scale: T, out: &mut [T]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - shift).exp() * scale;
        }
    }
}

vectorized! {
    /// `out[i] = dy[i]·∂swiglu/∂gate` (when `wrt_gate`) or `dy[i]·∂swiglu/∂up` at
    /// `(gate[i], up[i])`, the partial derivative as [`swiglu`] computes it.
    pub fn swiglu_input_grad<T: Real>(gate: &[T], up: &[T], dy: &[T], wrt_gate: bool, out: &mut [T]) {
        let n = out.len().min(gate.len()).min(up.len()).min(dy.len());
        let (gate, up, dy, out) = (&gate[..n], &up[..n], &dy[..n], &mut out[..n]);
        if wrt_gate {
            for i in 0..n {
                out[i] = dy[i] * swiglu(gate[i], up[i]).1;
            }
        } else {
            for i in 0..n {
                out[i] = dy[i] * swiglu(gate[i], up[i]).2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::exp_f32;
    use super::*;

    /// Values over the whole range the kernels see, with the awkward ones: zeros, huge
    /// magnitudes, infinities, NaN and subnormal results.
    fn probes() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            88.7,
            89.0,
            -87.0,
            -103.5,
            -110.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ];
        let mut state = 0x2545_f491_u32;
        for _ in 0..4000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            v.push((state >> 8) as f32 / (1 << 24) as f32 * 60.0 - 30.0);
        }
        v
    }

    fn same_bits(got: &[f32], want: &[f32], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
        assert_eq!(got.len(), want.len(), "{what}");
    }

    // The loops run in the widest variant the CPU has; the references below are the same
    // per-element code compiled for baseline x86-64, so equal bits show that the variants
    // agree.
    #[test]
    fn vectorized_loops_equal_the_scalar_code_bit_for_bit() {
        let x = probes();
        let mut u = x.clone();
        u.rotate_left(7);
        let n = x.len();

        let mut got = vec![0.0; n];
        swiglu_values(&x, &u, &mut got);
        let want: Vec<f32> = x.iter().zip(&u).map(|(&g, &u)| swiglu(g, u).0).collect();
        same_bits(&got, &want, "swiglu_values");

        let (mut a, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        swiglu_values_and_grads(&x, &u, &mut a, &mut dg, &mut du);
        let triples: Vec<_> = x.iter().zip(&u).map(|(&g, &u)| swiglu(g, u)).collect();
        same_bits(&a, &want, "values_and_grads a");
        same_bits(
            &dg,
            &triples.iter().map(|t| t.1).collect::<Vec<_>>(),
            "d_gate",
        );
        same_bits(
            &du,
            &triples.iter().map(|t| t.2).collect::<Vec<_>>(),
            "d_up",
        );

        for wrt_gate in [true, false] {
            swiglu_input_grad(&x, &u, &u, wrt_gate, &mut got);
            let want: Vec<f32> = triples
                .iter()
                .zip(&u)
                .map(|(t, &dy)| dy * if wrt_gate { t.1 } else { t.2 })
                .collect();
            same_bits(&got, &want, "swiglu_input_grad");
        }

        let mut e = x.clone();
        exp_shifted(&mut e, 1.5);
        let want: Vec<f32> = x.iter().map(|&v| exp_f32(v - 1.5)).collect();
        same_bits(&e, &want, "exp_shifted");

        exp_shifted_scaled(&x, -2.0, 0.25, &mut got);
        let want: Vec<f32> = x.iter().map(|&v| exp_f32(v + 2.0) * 0.25).collect();
        same_bits(&got, &want, "exp_shifted_scaled");
    }

    #[test]
    fn f64_loops_use_the_standard_exponential() {
        let mut x = vec![0.5f64, -3.0, 20.0];
        exp_shifted(&mut x, 1.0);
        assert_eq!(x, [(-0.5f64).exp(), (-4.0f64).exp(), 19.0f64.exp()]);
    }
}
