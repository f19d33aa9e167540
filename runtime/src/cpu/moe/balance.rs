//! Balancing: the expert load, the aux-loss-free bias update and the sequence-wise balance
//! loss with its gradient.

use rayon::prelude::*;

use crate::cpu::Real;

/// The number of (token, slot) pairs routed to each of `e` experts; `experts: [n, k]`.
pub fn expert_load(experts: &[u32], e: usize) -> Vec<u64> {
    let mut load = vec![0u64; e];
    for &x in experts {
        debug_assert!((x as usize) < e, "expert index {x} out of {e}");
        if let Some(l) = load.get_mut(x as usize) {
            *l += 1;
        }
    }
    load
}

/// The aux-loss-free balancing step, `bias_i += γ·sign(mean_load − load_i)` with `sign(0) = 0`:
/// under-loaded experts become more attractive to the selection, over-loaded ones less.
///
/// `bias: [e]` and `load: [e]` (from [`expert_load`], summed over whatever the step covers).
/// The comparison with the mean is exact: it compares `Σ load` with `e · load_i` in integers.
pub fn update_balance_bias<T: Real>(bias: &mut [T], load: &[u64], gamma: f64) {
    debug_assert_eq!(bias.len(), load.len());
    let e = load.len() as u128;
    let total: u128 = load.iter().map(|&l| l as u128).sum();
    for (b, &l) in bias.iter_mut().zip(load) {
        let scaled = e * l as u128;
        let sign = if total > scaled {
            1.0
        } else if total < scaled {
            -1.0
        } else {
            0.0
        };
        *b += T::from_f64(gamma * sign);
    }
}

/// `f_i = e/(k·t) · count_i` for one sequence's `experts: [t, k]`.
fn load_fractions<T: Real>(experts: &[u32], t: usize, e: usize, k: usize) -> Vec<T> {
    let unit = T::from_f64(e as f64 / (k as f64 * t as f64));
    expert_load(experts, e)
        .into_iter()
        .map(|c| T::from_f64(c as f64) * unit)
        .collect()
}

/// The sequence-wise balance loss: `alpha · mean over sequences of Σ_i f_i·P_i`.
///
/// `scores: [b, t, e]` are the router's unbiased scores and `experts: [b, t, k]` its choices.
/// Per sequence, `f_i = e/(k·t) · (the number of the sequence's (token, slot) pairs routed to
/// i)` and `P_i` is the mean over its tokens of the normalized score `s_{t,i} / Σ_j s_{t,j}`.
/// DeepSeek-V3 normalizes its sigmoid scores this way; for softmax scores the sum is already 1,
/// so the normalization changes nothing (and, because the softmax Jacobian annihilates
/// constant shifts, it changes no gradient either). The scores must be positive.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss_fwd<T: Real>(
    scores: &[T],
    experts: &[u32],
    b: usize,
    t: usize,
    e: usize,
    k: usize,
    alpha: f64,
) -> T {
    debug_assert_eq!(scores.len(), b * t * e);
    debug_assert_eq!(experts.len(), b * t * k);
    if b == 0 || t == 0 || e == 0 || k == 0 {
        return T::ZERO;
    }
    let per_seq: Vec<T> = scores
        .par_chunks(t * e)
        .zip(experts.par_chunks(t * k))
        .map(|(s, x)| {
            let f = load_fractions::<T>(x, t, e, k);
            let mut sum = T::ZERO;
            for row in s.chunks(e) {
                let mut z = T::ZERO;
                let mut fs = T::ZERO;
                for (&si, &fi) in row.iter().zip(&f) {
                    z += si;
                    fs += fi * si;
                }
                sum += fs / z;
            }
            sum / T::from_f64(t as f64)
        })
        .collect();
    let mut total = T::ZERO;
    for l in per_seq {
        total += l;
    }
    total * T::from_f64(alpha / b as f64)
}

/// The balance loss's backward: `d_scores: [b, t, e]` given the loss gradient `dloss`; the
/// arguments are those of [`balance_loss_fwd`]. The counts `f_i` are constants, so with
/// `Z = Σ_j s_{t,j}`: `∂L/∂s_{t,m} = dloss · alpha/(b·t) · (f_m/Z − Σ_i f_i·s_{t,i}/Z²)`.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss_bwd<T: Real>(
    scores: &[T],
    experts: &[u32],
    b: usize,
    t: usize,
    e: usize,
    k: usize,
    alpha: f64,
    dloss: T,
) -> Vec<T> {
    debug_assert_eq!(scores.len(), b * t * e);
    debug_assert_eq!(experts.len(), b * t * k);
    let mut d_scores = vec![T::ZERO; b * t * e];
    if b == 0 || t == 0 || e == 0 || k == 0 {
        return d_scores;
    }
    let c = dloss * T::from_f64(alpha / (b as f64 * t as f64));
    d_scores
        .par_chunks_mut(t * e)
        .zip(scores.par_chunks(t * e))
        .zip(experts.par_chunks(t * k))
        .for_each(|((ds, s), x)| {
            let f = load_fractions::<T>(x, t, e, k);
            for (drow, row) in ds.chunks_mut(e).zip(s.chunks(e)) {
                let mut z = T::ZERO;
                let mut fs = T::ZERO;
                for (&si, &fi) in row.iter().zip(&f) {
                    z += si;
                    fs += fi * si;
                }
                let shift = fs / (z * z);
                for (g, &fi) in drow.iter_mut().zip(&f) {
                    *g = c * (fi / z - shift);
                }
            }
        });
    d_scores
}
