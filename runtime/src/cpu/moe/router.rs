//! The router: scores, the (group-limited) top-k selection and normalized weights, and its
//! backward.

use rayon::prelude::*;

use crate::cpu::matmul::matmul;
use crate::cpu::Real;

/// The score function, the selection and the group score: the IR's own router attributes
/// (`Op::Router`), which the kernels match on.
pub use kiln_ir::attrs::{GroupScore, ScoreFunc, Selection};

/// The router's configuration, mirroring the compiler's `Op::Router` attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub score: ScoreFunc,
    pub select: Selection,
    /// The number of contiguous expert groups; it divides the expert count. Only read for
    /// [`Selection::GroupLimited`].
    pub groups: usize,
    /// The number of groups a token may route into, at most `groups`.
    pub groups_kept: usize,
    pub group_score: GroupScore,
    /// Experts per token, at most the expert count.
    pub top_k: usize,
    /// Divide the chosen experts' weights by their sum (plus `1e-20`), HF's `norm_topk_prob`.
    pub normalize: bool,
    /// The factor applied to the weights last, HF's `routed_scaling_factor`.
    pub scale: f64,
}

/// What the router computes for `n` tokens, `e` experts and `k = top_k`.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterOut<T> {
    /// `[n, k]`: the gating weights of the chosen experts, slot by slot.
    pub weights: Vec<T>,
    /// `[n, k]`: the chosen experts, in descending order of selection score.
    pub experts: Vec<u32>,
    /// `[n, e]`: the unbiased scores `score(x·wᵀ)` (the balance loss reads them).
    pub scores: Vec<T>,
}

/// The added constant of the weight normalization's denominator, as in HF.
const NORM_EPS: f64 = 1e-20;

/// The logistic sigmoid `1 / (1 + e^(-x))`; it saturates to 0 or 1 without overflow trouble.
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// Turns one row of logits into scores in place with the configured score function.
fn score_row<T: Real>(row: &mut [T], score: ScoreFunc) {
    match score {
        ScoreFunc::Sigmoid => {
            for v in row.iter_mut() {
                *v = sigmoid(*v);
            }
        }
        ScoreFunc::Softmax => {
            // Subtracting the row maximum keeps every exponent at or below zero.
            let max = row.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = T::ZERO;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v = *v / sum;
            }
        }
    }
}

/// A selection score as a totally ordered f64 sort key: NaN sorts below everything (it is
/// never preferred), and `-0.0` becomes `+0.0` so that it ties with the masked `0.0`.
fn key<T: Real>(x: T) -> f64 {
    let v = x.to_f64();
    if v.is_nan() {
        f64::NEG_INFINITY
    } else {
        v + 0.0
    }
}

/// Reorders `idx` so that its first `k` entries are the `k` best by `keys` (descending key,
/// then ascending index), in that order. The rest of `idx` is left in an unspecified order.
fn top_k_indices(idx: &mut [u32], keys: &[f64], k: usize) {
    let better = |a: &u32, b: &u32| {
        keys[*b as usize]
            .total_cmp(&keys[*a as usize])
            .then(a.cmp(b))
    };
    if k == 0 {
        return;
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, better);
    }
    idx[..k].sort_unstable_by(better);
}

/// Reusable per-thread buffers of the router's selection.
#[derive(Default)]
struct SelectScratch {
    keys: Vec<f64>,
    idx: Vec<u32>,
    group_keys: Vec<f64>,
    group_idx: Vec<u32>,
    keep: Vec<bool>,
}

/// Chooses one token's experts and computes their weights.
///
/// `scores: [e]` are the token's unbiased scores and `bias: [e]` the selection bias; the chosen
/// experts go to `experts: [k]` and their weights to `weights: [k]`.
fn select_row<T: Real>(
    scores: &[T],
    bias: &[T],
    cfg: &RouterConfig,
    scratch: &mut SelectScratch,
    experts: &mut [u32],
    weights: &mut [T],
) {
    let e = scores.len();
    let k = experts.len();
    let keys = &mut scratch.keys;
    keys.clear();
    keys.extend(scores.iter().zip(bias).map(|(&s, &b)| key(s + b)));

    if cfg.select == Selection::GroupLimited && cfg.groups > 0 {
        let size = e / cfg.groups;
        // Each group's score from its best (or two best) selection scores.
        scratch.group_keys.clear();
        for g in 0..cfg.groups {
            let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for &v in &keys[g * size..(g + 1) * size] {
                if v > first {
                    second = first;
                    first = v;
                } else if v > second {
                    second = v;
                }
            }
            let group_key = match cfg.group_score {
                GroupScore::Max => first,
                GroupScore::Top2Sum if size >= 2 => first + second,
                GroupScore::Top2Sum => first,
            };
            scratch.group_keys.push(group_key);
        }
        scratch.group_idx.clear();
        scratch.group_idx.extend(0..cfg.groups as u32);
        let kept = cfg.groups_kept.min(cfg.groups);
        top_k_indices(&mut scratch.group_idx, &scratch.group_keys, kept);
        // Experts of dropped groups get selection score 0.0, as HF's masked_fill does; see the
        // module documentation for when this lets a dropped group's expert win.
        scratch.keep.clear();
        scratch.keep.resize(cfg.groups, false);
        for &g in &scratch.group_idx[..kept] {
            scratch.keep[g as usize] = true;
        }
        for (g, kept_group) in scratch.keep.iter().enumerate() {
            if !kept_group {
                keys[g * size..(g + 1) * size].fill(0.0);
            }
        }
    }

    scratch.idx.clear();
    scratch.idx.extend(0..e as u32);
    top_k_indices(&mut scratch.idx, keys, k);
    experts.copy_from_slice(&scratch.idx[..k]);

    // The weights are the unbiased scores of the chosen experts.
    let mut sum = T::ZERO;
    for (w, &x) in weights.iter_mut().zip(experts.iter()) {
        *w = scores[x as usize];
        sum += *w;
    }
    let scale = T::from_f64(cfg.scale);
    if cfg.normalize {
        let denom = sum + T::from_f64(NORM_EPS);
        for w in weights.iter_mut() {
            *w = *w / denom * scale;
        }
    } else {
        for w in weights.iter_mut() {
            *w *= scale;
        }
    }
}

/// The router: scores every expert for every token and chooses each token's `k = top_k`.
///
/// `x: [n, d]` are the tokens, `w: [e, d]` the router weights and `bias: [e]` the selection
/// bias (zeros for routers without one). `logits = x·wᵀ`; `scores = sigmoid(logits)` or the
/// softmax over experts; selection ranks `scores + bias` (after group masking, see
/// [`RouterConfig`] and the module documentation); the weights are the unbiased scores of the
/// chosen experts, divided by their sum plus `1e-20` when `normalize`, then times `scale`.
pub fn router_fwd<T: Real>(
    x: &[T],
    n: usize,
    d: usize,
    w: &[T],
    e: usize,
    bias: &[T],
    cfg: &RouterConfig,
) -> RouterOut<T> {
    let k = cfg.top_k;
    debug_assert_eq!(x.len(), n * d);
    debug_assert_eq!(w.len(), e * d);
    debug_assert_eq!(bias.len(), e);
    debug_assert!(k <= e, "router: top_k {k} exceeds {e} experts");
    debug_assert!(
        cfg.select == Selection::Greedy
            || (cfg.groups > 0 && e % cfg.groups == 0 && cfg.groups_kept <= cfg.groups),
        "router: {e} experts do not split into {} groups keeping {}",
        cfg.groups,
        cfg.groups_kept
    );
    let mut scores = vec![T::ZERO; n * e];
    let mut weights = vec![T::ZERO; n * k];
    let mut experts = vec![0u32; n * k];
    if n == 0 || e == 0 {
        return RouterOut {
            weights,
            experts,
            scores,
        };
    }
    matmul(n, d, e, x, false, w, true, &mut scores, false);
    scores
        .par_chunks_mut(e)
        .for_each(|row| score_row(row, cfg.score));
    if k > 0 {
        scores
            .par_chunks(e)
            .zip(experts.par_chunks_mut(k))
            .zip(weights.par_chunks_mut(k))
            .for_each_init(SelectScratch::default, |scratch, ((s, x), w)| {
                select_row(s, bias, cfg, scratch, x, w);
            });
    }
    RouterOut {
        weights,
        experts,
        scores,
    }
}

/// The router's backward: gradients of the loss with respect to `x: [n, d]` and `w: [e, d]`.
///
/// `out` is what [`router_fwd`] returned for these inputs; `d_weights: [n, k]` is the gradient
/// of the weights output and `d_scores: [n, e]` (if the scores feed anything, e.g. the balance
/// loss) that of the scores output. The gradient flows through the scale, the normalization,
/// the gather of the chosen scores and the score function (sigmoid′, or the softmax Jacobian)
/// to the logits, then to `x` and `w`. The selection is a fixed set of indices and has no
/// gradient; neither has the bias, which only affects the selection.
///
/// Returns `(dx [n, d], dw [e, d])`.
#[allow(clippy::too_many_arguments)]
pub fn router_bwd<T: Real>(
    x: &[T],
    n: usize,
    d: usize,
    w: &[T],
    e: usize,
    out: &RouterOut<T>,
    cfg: &RouterConfig,
    d_weights: &[T],
    d_scores: Option<&[T]>,
) -> (Vec<T>, Vec<T>) {
    let k = cfg.top_k;
    debug_assert_eq!(x.len(), n * d);
    debug_assert_eq!(w.len(), e * d);
    debug_assert_eq!(out.scores.len(), n * e);
    debug_assert_eq!(out.experts.len(), n * k);
    debug_assert_eq!(d_weights.len(), n * k);
    debug_assert!(d_scores.is_none_or(|g| g.len() == n * e));
    let mut dx = vec![T::ZERO; n * d];
    let mut dw = vec![T::ZERO; e * d];
    if n == 0 || e == 0 {
        return (dx, dw);
    }

    // The gradient of the logits, row by row: start from the scores' own gradient, add the
    // chosen experts' share of the weights' gradient, then apply the score function's Jacobian.
    let mut d_logits = match d_scores {
        Some(g) => g.to_vec(),
        None => vec![T::ZERO; n * e],
    };
    let scale = T::from_f64(cfg.scale);
    d_logits.par_chunks_mut(e).enumerate().for_each(|(t, ds)| {
        let s = &out.scores[t * e..(t + 1) * e];
        if k > 0 {
            let chosen = &out.experts[t * k..(t + 1) * k];
            let dwt = &d_weights[t * k..(t + 1) * k];
            if cfg.normalize {
                // w_j = scale · g_j / D with D = Σ g + ε, so
                // ∂L/∂g_l = scale · (dw_l / D − Σ_j dw_j·g_j / D²).
                let mut sum = T::ZERO;
                let mut dot = T::ZERO;
                for (&c, &g) in chosen.iter().zip(dwt) {
                    let gc = s[c as usize];
                    sum += gc;
                    dot += g * gc;
                }
                let denom = sum + T::from_f64(NORM_EPS);
                for (&c, &g) in chosen.iter().zip(dwt) {
                    ds[c as usize] += scale * (g / denom - dot / (denom * denom));
                }
            } else {
                for (&c, &g) in chosen.iter().zip(dwt) {
                    ds[c as usize] += scale * g;
                }
            }
        }
        match cfg.score {
            ScoreFunc::Sigmoid => {
                for (g, &si) in ds.iter_mut().zip(s) {
                    *g *= si * (T::ONE - si);
                }
            }
            ScoreFunc::Softmax => {
                let mut dot = T::ZERO;
                for (&g, &si) in ds.iter().zip(s) {
                    dot += g * si;
                }
                for (g, &si) in ds.iter_mut().zip(s) {
                    *g = si * (*g - dot);
                }
            }
        }
    });

    // logits = x·wᵀ, so dx = d_logits·w and dw = d_logitsᵀ·x.
    matmul(n, e, d, &d_logits, false, w, false, &mut dx, false);
    matmul(e, n, d, &d_logits, true, x, false, &mut dw, false);
    (dx, dw)
}
