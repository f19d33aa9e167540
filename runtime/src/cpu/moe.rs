//! Mixture-of-experts kernels: the router, the grouped expert FFN and the sequence-wise balance
//! loss, with their backward kernels and the aux-loss-free bias update.
//!
//! The semantics follow HF transformers' DeepSeek models: `DeepseekV3TopkRouter` (sigmoid
//! scores, a selection bias, group-limited selection by the sum of each group's two best
//! scores, renormalized weights times a scaling factor) and DeepSeek-V2's gate (softmax scores,
//! greedy or group-limited selection by each group's best score). Where HF leaves an order
//! unspecified (`torch.topk(..., sorted=False)`, ties), these kernels fix one: the `k` slots of
//! a token are ordered by descending selection score, and equal scores go to the lower expert
//! (or group) index, so a routing decision never depends on the thread count.
//!
//! Masked groups follow HF, not DeepSeek's own reference code: experts outside the kept groups
//! get selection score `0.0` (HF's `masked_fill(..., 0.0)`), where DeepSeek's reference uses
//! `-inf`. The two agree whenever the kept experts' selection scores are positive, which is
//! always the case for softmax scores without a bias. With sigmoid scores and a negative
//! enough bias they differ: when fewer than `k` kept experts have a positive selection score,
//! the masked experts (all tied at `0.0`, so the lowest indices first) beat the negative kept
//! ones and a token is routed into a group that group-limited selection dropped.

use rayon::prelude::*;

use super::dense::matmul;
use super::elementwise::swiglu;
use super::simd;
use super::Real;
use crate::numerics::gemm::{GemmNumerics, Role};

/// The score function that turns router logits into per-expert affinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// `softmax` over the experts (DeepSeek-V2).
    Softmax,
    /// An elementwise logistic sigmoid (DeepSeek-V3).
    Sigmoid,
}

/// How a token's experts are chosen from the selection scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// Top-k over all experts.
    Greedy,
    /// Keep the best `groups_kept` of `groups` contiguous expert groups, then top-k.
    GroupLimited,
}

/// How a group of experts is scored for group-limited selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's best selection score (DeepSeek-V2).
    Max,
    /// The sum of the group's two best selection scores (DeepSeek-V3). A group of one expert
    /// scores its single expert (HF would fail on such a group).
    Top2Sum,
}

/// The router's configuration, mirroring the compiler's `Op::Router` attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub score: Score,
    pub select: Select,
    /// The number of contiguous expert groups; it divides the expert count. Only read for
    /// [`Select::GroupLimited`].
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
fn score_row<T: Real>(row: &mut [T], score: Score) {
    match score {
        Score::Sigmoid => {
            for v in row.iter_mut() {
                *v = sigmoid(*v);
            }
        }
        Score::Softmax => {
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

    if cfg.select == Select::GroupLimited && cfg.groups > 0 {
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
        cfg.select == Select::Greedy
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
            Score::Sigmoid => {
                for (g, &si) in ds.iter_mut().zip(s) {
                    *g *= si * (T::ONE - si);
                }
            }
            Score::Softmax => {
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

/// An expert FFN's activation, elementwise over the hidden units.
///
/// A gated activation combines the gate projection's and the up projection's outputs
/// (`silu(gate)·up` for SwiGLU); a non-gated one ignores `gate` (the kernels pass zero) and
/// reads the first projection's output as `up`.
pub trait Activation<T: Real>: Sync {
    /// Whether the expert has a gate projection.
    fn gated(&self) -> bool;
    /// The activation's value.
    fn value(&self, gate: T, up: T) -> T;
    /// The partial derivatives `(∂/∂gate, ∂/∂up)`; the first is ignored when not gated.
    fn grad(&self, gate: T, up: T) -> (T, T);

    /// `out[i] = value(gate[i], up[i])` over a block, with `gate` empty (read as zeros) when
    /// not gated. Implementations may override it with a loop that vectorizes; the values
    /// must equal [`Activation::value`]'s bit for bit.
    fn values(&self, gate: &[T], up: &[T], out: &mut [T]) {
        per_element_values(self, gate, up, out);
    }

    /// The value and both partial derivatives over a block: `a[i] = value(gate[i], up[i])`,
    /// `(d_gate[i], d_up[i]) = grad(gate[i], up[i])`; `gate` and `d_gate` are empty when not
    /// gated. The results must equal the per-element methods' bit for bit.
    fn values_and_grads(&self, gate: &[T], up: &[T], a: &mut [T], dg: &mut [T], du: &mut [T]) {
        per_element_values_and_grads(self, gate, up, a, dg, du);
    }
}

/// [`Activation::values`] one element at a time.
pub fn per_element_values<T: Real, A: Activation<T> + ?Sized>(
    act: &A,
    gate: &[T],
    up: &[T],
    out: &mut [T],
) {
    for (i, (o, &u)) in out.iter_mut().zip(up).enumerate() {
        *o = act.value(gate.get(i).copied().unwrap_or(T::ZERO), u);
    }
}

/// [`Activation::values_and_grads`] one element at a time.
pub fn per_element_values_and_grads<T: Real, A: Activation<T> + ?Sized>(
    act: &A,
    gate: &[T],
    up: &[T],
    a: &mut [T],
    d_gate: &mut [T],
    d_up: &mut [T],
) {
    for (i, ((a, du), &u)) in a.iter_mut().zip(d_up.iter_mut()).zip(up).enumerate() {
        let g = gate.get(i).copied().unwrap_or(T::ZERO);
        *a = act.value(g, u);
        let (dg, dup) = act.grad(g, u);
        *du = dup;
        if let Some(slot) = d_gate.get_mut(i) {
            *slot = dg;
        }
    }
}

/// SwiGLU: `silu(gate)·up` with `silu(g) = g·sigmoid(g)`, computed as
/// [`super::elementwise::swiglu`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SwiGlu;

impl<T: Real> Activation<T> for SwiGlu {
    fn gated(&self) -> bool {
        true
    }

    fn value(&self, gate: T, up: T) -> T {
        swiglu(gate, up).0
    }

    fn grad(&self, gate: T, up: T) -> (T, T) {
        let (_, d_gate, d_up) = swiglu(gate, up);
        (d_gate, d_up)
    }

    fn values(&self, gate: &[T], up: &[T], out: &mut [T]) {
        simd::swiglu_values(gate, up, out);
    }

    fn values_and_grads(&self, gate: &[T], up: &[T], a: &mut [T], dg: &mut [T], du: &mut [T]) {
        simd::swiglu_values_and_grads(gate, up, a, dg, du);
    }
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`; not gated.
#[derive(Clone, Copy, Debug, Default)]
pub struct GeluTanh;

/// `√(2/π)`, the tanh GELU's inner factor.
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh GELU.
const GELU_A: f64 = 0.044_715;

impl<T: Real> Activation<T> for GeluTanh {
    fn gated(&self) -> bool {
        false
    }

    fn value(&self, _gate: T, x: T) -> T {
        let c = T::from_f64(GELU_C);
        let a = T::from_f64(GELU_A);
        let half = T::from_f64(0.5);
        half * x * (T::ONE + (c * (x + a * x * x * x)).tanh())
    }

    fn grad(&self, _gate: T, x: T) -> (T, T) {
        let c = T::from_f64(GELU_C);
        let a = T::from_f64(GELU_A);
        let half = T::from_f64(0.5);
        let th = (c * (x + a * x * x * x)).tanh();
        let inner = c * (T::ONE + T::from_f64(3.0) * a * x * x);
        let dx = half * (T::ONE + th) + half * x * (T::ONE - th * th) * inner;
        (T::ZERO, dx)
    }
}

/// One routed-experts FFN call: the operands of [`experts_fwd`] and [`experts_bwd`].
///
/// `x: [n, d]`, `weights: [n, k]`, `experts: [n, k]` (indices below `e`); per expert
/// `w_gate: [e, h, d]` (present exactly when `act` is gated), `w_up: [e, h, d]` and
/// `w_down: [e, d, h]`, so that `gate_e(x) = w_gate[e]·x`.
#[derive(Clone, Copy)]
pub struct ExpertFfn<'a, T> {
    pub x: &'a [T],
    pub n: usize,
    pub d: usize,
    pub weights: &'a [T],
    pub experts: &'a [u32],
    pub k: usize,
    pub w_gate: Option<&'a [T]>,
    pub w_up: &'a [T],
    pub w_down: &'a [T],
    pub e: usize,
    pub h: usize,
    pub act: &'a dyn Activation<T>,
}

impl<T: Real> ExpertFfn<'_, T> {
    /// Checks, in debug builds, that the operands have the shapes documented above.
    fn debug_check(&self) {
        let (n, d, k, e, h) = (self.n, self.d, self.k, self.e, self.h);
        debug_assert_eq!(self.x.len(), n * d);
        debug_assert_eq!(self.weights.len(), n * k);
        debug_assert_eq!(self.experts.len(), n * k);
        debug_assert!(self.experts.iter().all(|&i| (i as usize) < e));
        debug_assert_eq!(self.act.gated(), self.w_gate.is_some());
        debug_assert!(self.w_gate.is_none_or(|g| g.len() == e * h * d));
        debug_assert_eq!(self.w_up.len(), e * h * d);
        debug_assert_eq!(self.w_down.len(), e * d * h);
    }
}

/// What [`experts_fwd`] keeps for [`experts_bwd`]. A "routed row" is one (token, slot) pair;
/// routed rows are stored sorted by expert, and by `t·k + j` within an expert.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsSaved<T> {
    /// `[n·k]`: for each routed row in sorted order, the flat pair index `t·k + j`.
    pub order: Vec<usize>,
    /// `[n·k]`: for each pair `t·k + j`, its row in sorted order (the inverse of `order`).
    pub row_of: Vec<usize>,
    /// `[e + 1]`: expert `i` owns sorted rows `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    /// `[n·k, h]`: the gate projection of each sorted row; `None` when not gated.
    pub gate: Option<Vec<T>>,
    /// `[n·k, h]`: the up (first) projection of each sorted row.
    pub up: Vec<T>,
}

/// The gradients [`experts_bwd`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsGrads<T> {
    /// `[n, d]`.
    pub dx: Vec<T>,
    /// `[n, k]`.
    pub d_weights: Vec<T>,
    /// `[e, h, d]`; `None` when not gated.
    pub dw_gate: Option<Vec<T>>,
    /// `[e, h, d]`.
    pub dw_up: Vec<T>,
    /// `[e, d, h]`.
    pub dw_down: Vec<T>,
}

/// Sorts the `experts.len()` routed rows by expert with a stable counting sort.
///
/// Returns `(order, row_of, offsets)` as documented on [`ExpertsSaved`].
fn sort_by_expert(experts: &[u32], e: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut offsets = vec![0usize; e + 1];
    for &x in experts {
        offsets[x as usize + 1] += 1;
    }
    for i in 0..e {
        offsets[i + 1] += offsets[i];
    }
    let mut cursor = offsets[..e].to_vec();
    let mut order = vec![0usize; experts.len()];
    let mut row_of = vec![0usize; experts.len()];
    for (p, &x) in experts.iter().enumerate() {
        let row = cursor[x as usize];
        cursor[x as usize] += 1;
        order[row] = p;
        row_of[p] = row;
    }
    (order, row_of, offsets)
}

/// Splits `buf` into consecutive parts of `(offsets[i + 1] − offsets[i])·width` elements.
fn split_parts<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for pair in offsets.windows(2) {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut((pair[1] - pair[0]) * width);
        parts.push(head);
        buf = tail;
    }
    parts
}

/// Copies the rows `rows[i] / k` of `src: [_, d]` into `out: [rows.len(), d]`: the tokens of
/// the given flat pair indices.
fn gather_tokens_into<T: Real>(src: &[T], rows: &[usize], k: usize, d: usize, out: &mut [T]) {
    for (&p, o) in rows.iter().zip(out.chunks_exact_mut(d)) {
        let t = p / k;
        o.copy_from_slice(&src[t * d..(t + 1) * d]);
    }
}

/// [`gather_tokens_into`] for every routed row in sorted order, in parallel: `[rows, d]`.
fn gather_sorted<T: Real>(src: &[T], order: &[usize], k: usize, d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; order.len() * d];
    if d > 0 {
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * d)
            .zip(order.par_chunks(ROWS))
            .for_each(|(o, rows)| gather_tokens_into(src, rows, k, d, o));
    }
    out
}

/// One expert's weight gradient `out = lhsᵀ·rhs` over its sorted rows, where `lhs` and `rhs`
/// hold every routed row (`[rows, _]`).
struct WeightGrad<'a, T> {
    expert: usize,
    lhs: &'a [T],
    rhs: &'a [T],
    out: &'a mut [T],
}

impl<'a, T> WeightGrad<'a, T> {
    /// One task per expert, each writing its block of the stacked gradient `dw: [e, _]`.
    fn per_expert(
        lhs: &'a [T],
        rhs: &'a [T],
        dw: &'a mut [T],
        e: usize,
    ) -> impl Iterator<Item = WeightGrad<'a, T>> {
        let size = dw.len() / e.max(1);
        dw.chunks_mut(size.max(1))
            .enumerate()
            .map(move |(expert, out)| WeightGrad {
                expert,
                lhs,
                rhs,
                out,
            })
    }
}

/// Expert `i`'s block of `size` elements of a stacked weight tensor.
fn block<T>(w: &[T], i: usize, size: usize) -> &[T] {
    &w[i * size..(i + 1) * size]
}

/// One expert's share of a part of the sorted rows: expert `expert` owns rows `lo..hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    expert: usize,
    lo: usize,
    hi: usize,
}

/// Splits the sorted rows `0..offsets[e]` into `parts` contiguous ranges of nearly equal
/// length and cuts each range at the experts' boundaries.
///
/// Returns the ranges' bounds (`parts + 1` row indices) and, per range, its non-empty expert
/// segments. Every part then does the same amount of work whatever the routing, where one task
/// per expert would leave a thread idle while the busiest expert finishes.
fn balanced_parts(offsets: &[usize], parts: usize) -> (Vec<usize>, Vec<Vec<Segment>>) {
    let rows = *offsets.last().unwrap_or(&0);
    let parts = parts.max(1);
    let bounds: Vec<usize> = (0..=parts).map(|p| p * rows / parts).collect();
    let segments = bounds
        .windows(2)
        .map(|w| {
            (0..offsets.len() - 1)
                .filter_map(|expert| {
                    let lo = offsets[expert].max(w[0]);
                    let hi = offsets[expert + 1].min(w[1]);
                    (lo < hi).then_some(Segment { expert, lo, hi })
                })
                .collect()
        })
        .collect();
    (bounds, segments)
}

/// How many parts to split `rows` routed rows of `flop_per_row` multiply-adds into: one per
/// thread, or one when the problem is too small to be worth the synchronization.
fn row_parts(rows: usize, flop_per_row: usize) -> usize {
    if rows.saturating_mul(flop_per_row) >= 64 * 64 * 64 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// The routed experts' FFN: `y_t = Σ_j weights[t, j] · down_e(act(gate_e(x_t), up_e(x_t)))`
/// with `e = experts[t, j]`, summed in slot order `j = 0..k`.
///
/// Shapes as in [`ExpertFfn`]. The (token, slot) pairs are sorted by expert (a stable counting
/// sort); the sorted rows are split into one equal part per thread, each part pushes its
/// experts' tokens through three GEMMs, and the unweighted outputs are combined per token in
/// slot order. Results are deterministic for a given thread count.
///
/// Returns `(y [n, d], saved)`.
pub fn experts_fwd<T: Real>(ffn: &ExpertFfn<'_, T>) -> (Vec<T>, ExpertsSaved<T>) {
    experts_fwd_with(ffn, &GemmNumerics::Exact)
}

/// [`experts_fwd`] with the expert GEMMs' operands treated as `num` says.
pub fn experts_fwd_with<T: Real>(
    ffn: &ExpertFfn<'_, T>,
    num: &GemmNumerics,
) -> (Vec<T>, ExpertsSaved<T>) {
    let ExpertFfn {
        x,
        n,
        d,
        weights,
        experts,
        k,
        w_gate,
        w_up,
        w_down,
        e,
        h,
        act,
    } = *ffn;
    ffn.debug_check();
    let rows = n * k;
    let hd = h * d;
    let (order, row_of, offsets) = sort_by_expert(experts, e);
    let mut gate = w_gate.map(|_| vec![T::ZERO; rows * h]);
    let mut up = vec![T::ZERO; rows * h];
    // The unweighted expert output of each sorted row.
    let mut out = vec![T::ZERO; rows * d];

    if h > 0 {
        let (bounds, segments) = balanced_parts(&offsets, row_parts(rows, 3 * hd));
        let gate_parts = match gate.as_mut() {
            Some(g) => split_parts(g, &bounds, h),
            None => bounds[1..].iter().map(|_| <&mut [T]>::default()).collect(),
        };
        let up_parts = split_parts(&mut up, &bounds, h);
        let out_parts = split_parts(&mut out, &bounds, d);
        let tasks: Vec<_> = segments
            .into_iter()
            .zip(bounds)
            .zip(gate_parts.into_iter().zip(up_parts).zip(out_parts))
            .collect();
        tasks
            .into_par_iter()
            .for_each(|((segments, base), ((gate_p, up_p), out_p))| {
                let longest = segments.iter().map(|s| s.hi - s.lo).max().unwrap_or(0);
                let mut xs = vec![T::ZERO; longest * d];
                let mut a = vec![T::ZERO; longest * h];
                for Segment { expert: i, lo, hi } in segments {
                    let m = hi - lo;
                    let (r, re) = (lo - base, hi - base);
                    let xs = &mut xs[..m * d];
                    let a = &mut a[..m * h];
                    gather_tokens_into(x, &order[lo..hi], k, d, xs);
                    let w = |w| block(w, i, hd);
                    let up_i = &mut up_p[r * h..re * h];
                    num.product(
                        Role::Forward,
                        (m, d, h),
                        (xs, false),
                        (w(w_up), true),
                        up_i,
                        false,
                        true,
                    );
                    let gate_i: &[T] = match w_gate {
                        Some(wg) => {
                            let gate_i = &mut gate_p[r * h..re * h];
                            num.product(
                                Role::Forward,
                                (m, d, h),
                                (xs, false),
                                (w(wg), true),
                                gate_i,
                                false,
                                true,
                            );
                            gate_i
                        }
                        None => &[],
                    };
                    act.values(gate_i, up_i, a);
                    let out_i = &mut out_p[r * d..re * d];
                    num.product(
                        Role::Forward,
                        (m, h, d),
                        (a, false),
                        (w(w_down), true),
                        out_i,
                        false,
                        true,
                    );
                }
            });
    }

    let mut y = vec![T::ZERO; n * d];
    if d > 0 {
        y.par_chunks_mut(d).enumerate().for_each(|(t, yt)| {
            for j in 0..k {
                let p = t * k + j;
                let (wt, r) = (weights[p], row_of[p]);
                for (yc, &oc) in yt.iter_mut().zip(&out[r * d..(r + 1) * d]) {
                    *yc += wt * oc;
                }
            }
        });
    }
    let saved = ExpertsSaved {
        order,
        row_of,
        offsets,
        gate,
        up,
    };
    (y, saved)
}

/// The expert FFN's backward: gradients with respect to `x`, `weights` and the three weight
/// tensors, given `dy: [n, d]` and the `saved` state of the matching [`experts_fwd`] call (the
/// other arguments are those of that call).
///
/// Per expert, with `a = act(gate, up)` for its rows and `ω` the rows' gating weights:
/// `G = dy·w_down[e]` (unweighted), `d_weights = rowsum(G ∘ a)`,
/// `dw_down[e] = dyᵀ·(ω ∘ a)`, `(d_gate, d_up) = ω·G ∘ act′`, `dw_up[e] = d_upᵀ·x`,
/// `dw_gate[e] = d_gateᵀ·x` and the rows' `dx = d_up·w_up[e] + d_gate·w_gate[e]`, summed per
/// token in slot order. Experts that received no tokens get zero gradients.
///
/// Two parallel phases: the row-wise products (everything but the weight gradients) over one
/// equal part of the sorted rows per thread, then the weight gradients as one task per
/// (expert, weight) pair.
pub fn experts_bwd<T: Real>(
    ffn: &ExpertFfn<'_, T>,
    saved: &ExpertsSaved<T>,
    dy: &[T],
) -> ExpertsGrads<T> {
    experts_bwd_with(ffn, saved, dy, &GemmNumerics::Exact)
}

/// [`experts_bwd`] with the expert GEMMs' operands treated as `num` says.
pub fn experts_bwd_with<T: Real>(
    ffn: &ExpertFfn<'_, T>,
    saved: &ExpertsSaved<T>,
    dy: &[T],
    num: &GemmNumerics,
) -> ExpertsGrads<T> {
    let ExpertFfn {
        x,
        n,
        d,
        weights,
        experts: _,
        k,
        w_gate,
        w_up,
        w_down,
        e,
        h,
        act,
    } = *ffn;
    ffn.debug_check();
    debug_assert_eq!(dy.len(), n * d);
    debug_assert_eq!(saved.offsets.len(), e + 1);
    debug_assert_eq!(saved.order.len(), n * k);
    let rows = n * k;
    let hd = h * d;
    let offsets = &saved.offsets;
    let mut dw_gate = w_gate.map(|_| vec![T::ZERO; e * hd]);
    let mut dw_up = vec![T::ZERO; e * hd];
    let mut dw_down = vec![T::ZERO; e * hd];
    // Per sorted row: its share of dx and the gradient of its gating weight.
    let mut dx_rows = vec![T::ZERO; rows * d];
    let mut dwt_rows = vec![T::ZERO; rows];

    if h > 0 {
        let xs = gather_sorted(x, &saved.order, k, d);
        let dys = gather_sorted(dy, &saved.order, k, d);
        // Per sorted row: the weighted activation (for dw_down) and the gradients of the gate
        // and up projections' outputs (for dw_gate, dw_up and dx).
        let mut a_w = vec![T::ZERO; rows * h];
        let mut d_up = vec![T::ZERO; rows * h];
        let mut d_gate = vec![T::ZERO; if w_gate.is_some() { rows * h } else { 0 }];
        let gate_saved: &[T] = saved.gate.as_deref().unwrap_or(&[]);

        // Phase 1, row-wise: G, d_weights, ω∘a, d_gate, d_up and dx.
        let (bounds, segments) = balanced_parts(offsets, row_parts(rows, 4 * hd));
        let d_gate_parts = if w_gate.is_some() {
            split_parts(&mut d_gate, &bounds, h)
        } else {
            bounds[1..].iter().map(|_| <&mut [T]>::default()).collect()
        };
        let tasks: Vec<_> = segments
            .into_iter()
            .zip(bounds.iter().copied())
            .zip(
                split_parts(&mut a_w, &bounds, h)
                    .into_iter()
                    .zip(split_parts(&mut d_up, &bounds, h))
                    .zip(d_gate_parts)
                    .zip(split_parts(&mut dx_rows, &bounds, d))
                    .zip(split_parts(&mut dwt_rows, &bounds, 1)),
            )
            .collect();
        tasks.into_par_iter().for_each(
            |((segments, base), ((((a_w_p, d_up_p), d_gate_p), dx_p), dwt_p))| {
                let longest = segments.iter().map(|s| s.hi - s.lo).max().unwrap_or(0);
                let mut g = vec![T::ZERO; longest * h];
                for Segment { expert: i, lo, hi } in segments {
                    let m = hi - lo;
                    let (r, re) = (lo - base, hi - base);
                    let w = |w| block(w, i, hd);
                    // G = dy·w_down[i]: the gradient of the activation before weighting.
                    let g = &mut g[..m * h];
                    let dyi = &dys[lo * d..hi * d];
                    num.product(
                        Role::InputGrad,
                        (m, d, h),
                        (dyi, false),
                        (w(w_down), false),
                        g,
                        false,
                        true,
                    );
                    // a, act′ for the rows; a lands in a_w and is weighted below.
                    let gate_i = gate_saved.get(lo * h..hi * h).unwrap_or(&[]);
                    let a_i = &mut a_w_p[r * h..re * h];
                    let du_i = &mut d_up_p[r * h..re * h];
                    let dg_i = d_gate_p.get_mut(r * h..re * h).unwrap_or_default();
                    act.values_and_grads(gate_i, &saved.up[lo * h..hi * h], a_i, dg_i, du_i);
                    for (q, dwt) in dwt_p[r..re].iter_mut().enumerate() {
                        let om = weights[saved.order[lo + q]];
                        let cols = q * h..(q + 1) * h;
                        let mut dot = T::ZERO;
                        for ((&gv, av), du) in g[cols.clone()]
                            .iter()
                            .zip(&mut a_i[cols.clone()])
                            .zip(&mut du_i[cols.clone()])
                        {
                            dot += gv * *av;
                            *av = om * *av;
                            *du = om * gv * *du;
                        }
                        if let Some(dg) = dg_i.get_mut(cols.clone()) {
                            for (dg, &gv) in dg.iter_mut().zip(&g[cols]) {
                                *dg = om * gv * *dg;
                            }
                        }
                        *dwt = dot;
                    }
                    let dx_i = &mut dx_p[r * d..re * d];
                    num.product(
                        Role::InputGrad,
                        (m, h, d),
                        (du_i, false),
                        (w(w_up), false),
                        dx_i,
                        false,
                        true,
                    );
                    if let Some(wg) = w_gate {
                        num.product(
                            Role::InputGrad,
                            (m, h, d),
                            (dg_i, false),
                            (w(wg), false),
                            dx_i,
                            true,
                            true,
                        );
                    }
                }
            },
        );

        // Phase 2: one task per (expert, weight), each a product over the expert's rows.
        let mut tasks: Vec<_> = WeightGrad::per_expert(&dys, &a_w, &mut dw_down, e)
            .chain(WeightGrad::per_expert(&d_up, &xs, &mut dw_up, e))
            .collect();
        if let Some(dw_gate) = dw_gate.as_mut() {
            tasks.extend(WeightGrad::per_expert(&d_gate, &xs, dw_gate, e));
        }
        // Largest experts first, so the last tasks to start are the short ones.
        let rows_of = |i: usize| offsets[i + 1] - offsets[i];
        tasks.sort_by_key(|t| std::cmp::Reverse(rows_of(t.expert)));
        tasks.into_par_iter().for_each(|t| {
            let (lo, hi) = (offsets[t.expert], offsets[t.expert + 1]);
            // out = lhsᵀ·rhs over the expert's rows: [cols(lhs), cols(rhs)].
            let (p, q) = (t.lhs.len() / rows, t.rhs.len() / rows);
            let (l, r) = (&t.lhs[lo * p..hi * p], &t.rhs[lo * q..hi * q]);
            num.product(
                Role::WeightGrad,
                (p, hi - lo, q),
                (l, true),
                (r, false),
                t.out,
                false,
                true,
            );
        });
    }

    let mut dx = vec![T::ZERO; n * d];
    if d > 0 {
        dx.par_chunks_mut(d).enumerate().for_each(|(t, dxt)| {
            for j in 0..k {
                let r = saved.row_of[t * k + j];
                for (a, &b) in dxt.iter_mut().zip(&dx_rows[r * d..(r + 1) * d]) {
                    *a += b;
                }
            }
        });
    }
    let d_weights = saved.row_of.iter().map(|&r| dwt_rows[r]).collect();
    ExpertsGrads {
        dx,
        d_weights,
        dw_gate,
        dw_up,
        dw_down,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Rng;

    /// Uniform values in `[-scale, scale)`.
    fn uniform(rng: &mut Rng, len: usize, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// The `e × e` identity, so that a router with `w = eye(e)` has `logits = x`.
    fn eye(e: usize) -> Vec<f64> {
        let mut w = vec![0.0; e * e];
        for i in 0..e {
            w[i * e + i] = 1.0;
        }
        w
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn config(score: Score, top_k: usize) -> RouterConfig {
        RouterConfig {
            score,
            select: Select::Greedy,
            groups: 1,
            groups_kept: 1,
            group_score: GroupScore::Top2Sum,
            top_k,
            normalize: false,
            scale: 1.0,
        }
    }

    fn grouped(group_score: GroupScore, groups: usize, kept: usize, top_k: usize) -> RouterConfig {
        RouterConfig {
            select: Select::GroupLimited,
            groups,
            groups_kept: kept,
            group_score,
            ..config(Score::Sigmoid, top_k)
        }
    }

    /// Routes rows of logits directly (`w` is the identity).
    fn route(logits: &[f64], e: usize, bias: &[f64], cfg: &RouterConfig) -> RouterOut<f64> {
        router_fwd(logits, logits.len() / e, e, &eye(e), e, bias, cfg)
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs() / (1.0 + w.abs());
            assert!(err < tol, "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// Central finite differences of `f` at `p`.
    fn numeric_grad(p: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let eps = 1e-6;
        let mut q = p.to_vec();
        (0..p.len())
            .map(|i| {
                q[i] = p[i] + eps;
                let up = f(&q);
                q[i] = p[i] - eps;
                let down = f(&q);
                q[i] = p[i];
                (up - down) / (2.0 * eps)
            })
            .collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn greedy_softmax_picks_the_two_best_in_descending_order() {
        let logits = [1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 5.0, 1.0];
        let out = route(&logits, 4, &[0.0; 4], &config(Score::Softmax, 2));
        assert_eq!(out.experts, [1, 2, 2, 3]);
        let z0: f64 = [1.0f64, 3.0, 2.0, 0.0].iter().map(|v| v.exp()).sum();
        let z1: f64 = [0.0f64, 0.0, 5.0, 1.0].iter().map(|v| v.exp()).sum();
        let want = [
            3f64.exp() / z0,
            2f64.exp() / z0,
            5f64.exp() / z1,
            1f64.exp() / z1,
        ];
        assert_close(&out.weights, &want, 1e-14, "weights");
        assert_close(
            &out.scores[..4],
            &[1f64.exp() / z0, want[0], want[1], 1.0 / z0],
            1e-14,
            "scores",
        );
    }

    #[test]
    fn the_bias_changes_the_selection_but_not_the_weights() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let cfg = config(Score::Sigmoid, 2);
        let plain = route(&logits, 4, &[0.0; 4], &cfg);
        assert_eq!(plain.experts, [0, 1]);
        assert_close(&plain.weights, &[sig(2.0), sig(1.0)], 1e-14, "unbiased");
        let biased = route(&logits, 4, &[0.0, 0.0, 2.0, 0.0], &cfg);
        assert_eq!(biased.experts, [2, 0]);
        assert_close(&biased.weights, &[0.5, sig(2.0)], 1e-14, "biased");
        assert_eq!(plain.scores, biased.scores);
    }

    /// Eight experts in four groups of two whose best groups differ by the group score:
    /// top-2 sums 1.0, 1.442, 1.312, 1.150; maxima 0.953, 0.731, 0.690, 0.881.
    const GROUP_LOGITS: [f64; 8] = [3.0, -3.0, 1.0, 0.9, 0.5, 0.8, -1.0, 2.0];

    #[test]
    fn top2sum_keeps_the_groups_with_the_best_two_scores() {
        let out = route(
            &GROUP_LOGITS,
            8,
            &[0.0; 8],
            &grouped(GroupScore::Top2Sum, 4, 2, 3),
        );
        assert_eq!(out.experts, [2, 3, 5]);
        assert_close(
            &out.weights,
            &[sig(1.0), sig(0.9), sig(0.8)],
            1e-14,
            "weights",
        );
        let greedy = route(&GROUP_LOGITS, 8, &[0.0; 8], &config(Score::Sigmoid, 3));
        assert_eq!(greedy.experts, [0, 7, 2]);
    }

    #[test]
    fn max_keeps_the_groups_with_the_best_single_score() {
        let out = route(
            &GROUP_LOGITS,
            8,
            &[0.0; 8],
            &grouped(GroupScore::Max, 4, 2, 3),
        );
        assert_eq!(out.experts, [0, 7, 6]);
        assert_close(
            &out.weights,
            &[sig(3.0), sig(2.0), sig(-1.0)],
            1e-14,
            "weights",
        );
    }

    #[test]
    fn group_scores_use_the_biased_selection_scores() {
        // A bias of +1 on expert 1 lifts group 0's top-2 sum to 2.0 and keeps it.
        let mut bias = [0.0; 8];
        bias[1] = 1.0;
        let out = route(
            &GROUP_LOGITS,
            8,
            &bias,
            &grouped(GroupScore::Top2Sum, 4, 2, 3),
        );
        assert_eq!(out.experts, [1, 0, 2]);
        assert_close(
            &out.weights,
            &[sig(-3.0), sig(3.0), sig(1.0)],
            1e-14,
            "weights",
        );
    }

    #[test]
    fn normalized_weights_sum_to_the_scale() {
        let mut rng = Rng::new(3);
        let (n, d, e) = (9, 6, 8);
        let x = uniform(&mut rng, n * d, 1.0);
        let w = uniform(&mut rng, e * d, 1.0);
        let bias = uniform(&mut rng, e, 0.1);
        for score in [Score::Sigmoid, Score::Softmax] {
            for select in [Select::Greedy, Select::GroupLimited] {
                let cfg = RouterConfig {
                    score,
                    select,
                    groups: 4,
                    groups_kept: 2,
                    normalize: true,
                    scale: 2.5,
                    ..config(score, 3)
                };
                let out = router_fwd(&x, n, d, &w, e, &bias, &cfg);
                for row in out.weights.chunks(3) {
                    let sum: f64 = row.iter().sum();
                    assert!((sum - 2.5).abs() < 1e-12, "{score:?} {select:?}: {sum}");
                }
                // Slots are in descending order of selection score.
                for (t, row) in out.experts.chunks(3).enumerate() {
                    let sel =
                        |j: usize| out.scores[t * e + row[j] as usize] + bias[row[j] as usize];
                    assert!(sel(0) >= sel(1) && sel(1) >= sel(2), "{row:?}");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let out = route(&[0.0; 6], 6, &[0.0; 6], &config(Score::Sigmoid, 3));
        assert_eq!(out.experts, [0, 1, 2]);
        let out = route(
            &[0.0, 1.0, 0.0, 1.0],
            4,
            &[0.0; 4],
            &config(Score::Softmax, 3),
        );
        assert_eq!(out.experts, [1, 3, 0]);
        // Tied groups: the lower-index group is kept.
        let out = route(
            &[0.0; 6],
            6,
            &[0.0; 6],
            &grouped(GroupScore::Top2Sum, 3, 1, 2),
        );
        assert_eq!(out.experts, [0, 1]);
        let out = route(
            &[0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
            6,
            &[0.0; 6],
            &grouped(GroupScore::Max, 3, 2, 3),
        );
        assert_eq!(out.experts, [1, 2, 0]);
    }

    /// HF masks dropped groups with 0.0, not −inf: when every kept expert's selection score is
    /// negative, the masked experts (tied at 0.0, lowest index first) win the top-k, so the
    /// token is routed into the group that group-limited selection dropped. DeepSeek's
    /// reference code (−inf) would choose experts 0 and 1 here.
    #[test]
    fn masked_experts_score_zero_and_beat_negative_kept_ones() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let bias = [-1.0; 4];
        // Selection scores −0.119, −0.269, −0.5, −0.731: group 0 wins (−0.388 vs −1.231).
        let out = route(&logits, 4, &bias, &grouped(GroupScore::Top2Sum, 2, 1, 2));
        assert_eq!(out.experts, [2, 3]);
        assert_close(&out.weights, &[0.5, sig(-1.0)], 1e-14, "weights");
        // With a positive selection score the kept group wins as expected.
        let out = route(
            &logits,
            4,
            &[0.0; 4],
            &grouped(GroupScore::Top2Sum, 2, 1, 2),
        );
        assert_eq!(out.experts, [0, 1]);
        // Only one kept expert is negative: it loses to the first masked expert.
        let out = route(
            &logits,
            4,
            &[0.0, -1.0, 0.0, 0.0],
            &grouped(GroupScore::Max, 2, 1, 2),
        );
        assert_eq!(out.experts, [0, 2]);
    }

    #[test]
    fn router_bwd_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let (n, d, e, k) = (5, 4, 8, 3);
        let x = uniform(&mut rng, n * d, 1.0);
        let w = uniform(&mut rng, e * d, 1.0);
        let bias = uniform(&mut rng, e, 0.2);
        let gw = uniform(&mut rng, n * k, 1.0);
        let gs = uniform(&mut rng, n * e, 1.0);
        let configs = [
            RouterConfig {
                normalize: true,
                scale: 2.5,
                ..grouped(GroupScore::Top2Sum, 4, 2, k)
            },
            config(Score::Softmax, k),
            RouterConfig {
                normalize: true,
                ..config(Score::Softmax, k)
            },
            config(Score::Sigmoid, k),
        ];
        for cfg in &configs {
            let base = router_fwd(&x, n, d, &w, e, &bias, cfg);
            for d_scores in [None, Some(&gs[..])] {
                // The loss Σ gw·weights (+ Σ gs·scores); the selection must not move.
                let loss = |x: &[f64], w: &[f64]| {
                    let out = router_fwd(x, n, d, w, e, &bias, cfg);
                    assert_eq!(out.experts, base.experts, "the selection moved");
                    dot(&gw, &out.weights) + d_scores.map_or(0.0, |g| dot(g, &out.scores))
                };
                let (dx, dw) = router_bwd(&x, n, d, &w, e, &base, cfg, &gw, d_scores);
                let want_dx = numeric_grad(&x, |p| loss(p, &w));
                let want_dw = numeric_grad(&w, |p| loss(&x, p));
                assert_close(&dx, &want_dx, 1e-7, &format!("{cfg:?} dx"));
                assert_close(&dw, &want_dw, 1e-7, &format!("{cfg:?} dw"));
            }
        }
    }

    #[test]
    fn expert_load_counts_and_the_bias_moves_toward_balance() {
        let load = expert_load(&[0, 2, 2, 3, 0, 2], 5);
        assert_eq!(load, [2, 0, 3, 1, 0]);
        // The mean load is 1.2.
        let mut bias = vec![0.5f64; 5];
        update_balance_bias(&mut bias, &load, 0.01);
        assert_close(&bias, &[0.49, 0.51, 0.49, 0.51, 0.51], 1e-15, "bias");
        // Experts exactly at the mean (1) keep their bias.
        let mut bias = vec![0.0f32; 4];
        update_balance_bias(&mut bias, &[1, 1, 2, 0], 0.5);
        assert_eq!(bias, [0.0, 0.0, -0.5, 0.5]);
    }

    /// Experts' weights and inputs for the tests.
    struct Ffn {
        n: usize,
        d: usize,
        k: usize,
        e: usize,
        h: usize,
        x: Vec<f64>,
        weights: Vec<f64>,
        experts: Vec<u32>,
        w_gate: Option<Vec<f64>>,
        w_up: Vec<f64>,
        w_down: Vec<f64>,
    }

    impl Ffn {
        /// Routes token `t`'s slot `j` to `(t·(j + 1) + j) mod (e − 1)`, so expert `e − 1`
        /// never receives a token, and no token picks an expert twice when `k ≤ 2`.
        fn new(seed: u64, n: usize, d: usize, k: usize, e: usize, h: usize, gated: bool) -> Ffn {
            let mut rng = Rng::new(seed);
            let experts: Vec<u32> = (0..n * k)
                .map(|p| {
                    let (t, j) = (p / k, p % k);
                    ((t * (j + 1) + j) % (e - 1)) as u32
                })
                .collect();
            Ffn {
                n,
                d,
                k,
                e,
                h,
                x: uniform(&mut rng, n * d, 1.0),
                weights: uniform(&mut rng, n * k, 1.0),
                experts,
                w_gate: gated.then(|| uniform(&mut rng, e * h * d, 0.5)),
                w_up: uniform(&mut rng, e * h * d, 0.5),
                w_down: uniform(&mut rng, e * d * h, 0.5),
            }
        }

        fn act(&self) -> &'static dyn Activation<f64> {
            if self.w_gate.is_some() {
                &SwiGlu
            } else {
                &GeluTanh
            }
        }

        fn args(&self) -> ExpertFfn<'_, f64> {
            ExpertFfn {
                x: &self.x,
                n: self.n,
                d: self.d,
                weights: &self.weights,
                experts: &self.experts,
                k: self.k,
                w_gate: self.w_gate.as_deref(),
                w_up: &self.w_up,
                w_down: &self.w_down,
                e: self.e,
                h: self.h,
                act: self.act(),
            }
        }

        fn fwd(&self) -> (Vec<f64>, ExpertsSaved<f64>) {
            experts_fwd(&self.args())
        }

        fn bwd(&self, saved: &ExpertsSaved<f64>, dy: &[f64]) -> ExpertsGrads<f64> {
            experts_bwd(&self.args(), saved, dy)
        }

        /// Token by token, expert by expert, with plain loops.
        fn naive(&self) -> Vec<f64> {
            let (d, h, k) = (self.d, self.h, self.k);
            let act = self.act();
            let mut y = vec![0.0; self.n * d];
            for t in 0..self.n {
                let xt = &self.x[t * d..(t + 1) * d];
                for j in 0..k {
                    let ex = self.experts[t * k + j] as usize;
                    let proj =
                        |w: &[f64], i: usize| dot(&w[(ex * h + i) * d..(ex * h + i + 1) * d], xt);
                    let a: Vec<f64> = (0..h)
                        .map(|i| {
                            let g = self.w_gate.as_ref().map_or(0.0, |w| proj(w, i));
                            act.value(g, proj(&self.w_up, i))
                        })
                        .collect();
                    for c in 0..d {
                        let o = dot(&self.w_down[(ex * d + c) * h..(ex * d + c + 1) * h], &a);
                        y[t * d + c] += self.weights[t * k + j] * o;
                    }
                }
            }
            y
        }
    }

    #[test]
    fn experts_fwd_matches_the_naive_reference() {
        for gated in [true, false] {
            for k in [1, 2] {
                let ffn = Ffn::new(5, 7, 5, k, 4, 6, gated);
                let (y, saved) = ffn.fwd();
                assert_eq!(saved.offsets[4] - saved.offsets[3], 0, "expert 3 is idle");
                assert_close(&y, &ffn.naive(), 1e-13, &format!("gated {gated} k {k}"));
            }
        }
    }

    #[test]
    fn experts_fwd_in_f32_agrees_with_f64() {
        let ffn = Ffn::new(8, 6, 4, 2, 4, 5, true);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (x, weights, w_up, w_down) = (f(&ffn.x), f(&ffn.weights), f(&ffn.w_up), f(&ffn.w_down));
        let w_gate = f(ffn.w_gate.as_ref().unwrap());
        let (y, _) = experts_fwd(&ExpertFfn {
            x: &x,
            n: ffn.n,
            d: ffn.d,
            weights: &weights,
            experts: &ffn.experts,
            k: ffn.k,
            w_gate: Some(&w_gate),
            w_up: &w_up,
            w_down: &w_down,
            e: ffn.e,
            h: ffn.h,
            act: &SwiGlu,
        });
        let y: Vec<f64> = y.iter().map(|&a| a as f64).collect();
        assert_close(&y, &ffn.naive(), 1e-5, "f32");
    }

    #[test]
    fn experts_bwd_matches_finite_differences() {
        for gated in [true, false] {
            for k in [1, 2] {
                let ffn = Ffn::new(21, 5, 4, k, 4, 3, gated);
                let mut rng = Rng::new(99);
                let dy = uniform(&mut rng, ffn.n * ffn.d, 1.0);
                let (_, saved) = ffn.fwd();
                let grads = ffn.bwd(&saved, &dy);
                let what = |name: &str| format!("gated {gated} k {k} {name}");
                // The loss Σ dy·y as a function of one perturbed input.
                let check = |got: &[f64], field: fn(&mut Ffn) -> &mut Vec<f64>, name: &str| {
                    let mut probe = Ffn::new(21, 5, 4, k, 4, 3, gated);
                    let p = field(&mut probe).clone();
                    let want = numeric_grad(&p, |v| {
                        let mut q = Ffn::new(21, 5, 4, k, 4, 3, gated);
                        *field(&mut q) = v.to_vec();
                        dot(&dy, &q.fwd().0)
                    });
                    assert_close(got, &want, 1e-7, &what(name));
                };
                check(&grads.dx, |f| &mut f.x, "dx");
                check(&grads.d_weights, |f| &mut f.weights, "d_weights");
                check(&grads.dw_up, |f| &mut f.w_up, "dw_up");
                check(&grads.dw_down, |f| &mut f.w_down, "dw_down");
                match &grads.dw_gate {
                    Some(g) => check(g, |f| f.w_gate.as_mut().unwrap(), "dw_gate"),
                    None => assert!(!gated),
                }
                // The idle expert's gradients are zero.
                let hd = ffn.h * ffn.d;
                assert!(grads.dw_up[3 * hd..].iter().all(|&v| v == 0.0));
                assert!(grads.dw_down[3 * hd..].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn experts_results_do_not_depend_on_the_thread_count() {
        // Large enough that the sorted rows are split into one part per thread, with parts
        // that cut experts in two.
        let ffn = Ffn::new(4, 200, 32, 2, 8, 48, true);
        let dy = uniform(&mut Rng::new(5), ffn.n * ffn.d, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(row_parts(ffn.n * ffn.k, 3 * ffn.h * ffn.d), threads);
                let (y, saved) = ffn.fwd();
                (y, ffn.bwd(&saved, &dy))
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(4));
        assert_close(&one.0, &ffn.naive(), 1e-12, "split forward");
    }

    #[test]
    fn empty_shapes_give_empty_or_zero_results() {
        let cfg = config(Score::Softmax, 0);
        let out = router_fwd(&[1.0, 2.0], 1, 2, &[1.0, 0.0, 0.0, 1.0], 2, &[0.0; 2], &cfg);
        assert!(out.weights.is_empty() && out.experts.is_empty());
        assert_close(
            &out.scores,
            &[1.0 / (1.0 + 1f64.exp()), 1.0 / (1.0 + (-1f64).exp())],
            1e-15,
            "scores",
        );
        let out = router_fwd::<f64>(
            &[],
            0,
            2,
            &[0.0; 4],
            2,
            &[0.0; 2],
            &config(Score::Sigmoid, 1),
        );
        assert!(out.scores.is_empty());
        let (dx, dw) = router_bwd::<f64>(
            &[],
            0,
            2,
            &[0.0; 4],
            2,
            &out,
            &config(Score::Sigmoid, 1),
            &[],
            None,
        );
        assert!(dx.is_empty() && dw == [0.0; 4]);
        // No hidden units: the experts output zeros.
        let no_hidden = ExpertFfn {
            x: &[1.0, 2.0],
            n: 1,
            d: 2,
            weights: &[1.0],
            experts: &[0],
            k: 1,
            w_gate: None,
            w_up: &[],
            w_down: &[],
            e: 1,
            h: 0,
            act: &GeluTanh,
        };
        let (y, saved) = experts_fwd(&no_hidden);
        assert_eq!(y, [0.0, 0.0]);
        let g = experts_bwd(&no_hidden, &saved, &[1.0, 1.0]);
        assert_eq!((g.dx, g.d_weights), (vec![0.0, 0.0], vec![0.0]));
        // No tokens.
        let (y, saved) = experts_fwd::<f64>(&ExpertFfn {
            x: &[],
            n: 0,
            d: 2,
            weights: &[],
            experts: &[],
            k: 1,
            w_gate: None,
            w_up: &[0.0; 4],
            w_down: &[0.0; 4],
            e: 2,
            h: 1,
            act: &GeluTanh,
        });
        assert!(y.is_empty() && saved.order.is_empty());
        assert_eq!(balance_loss_fwd::<f64>(&[], &[], 2, 0, 3, 1, 0.1), 0.0);
        assert!(balance_loss_bwd::<f64>(&[], &[], 0, 4, 3, 1, 0.1, 1.0).is_empty());
    }

    #[test]
    fn balance_loss_on_a_hand_example() {
        // Sequence 0: unnormalized sigmoid-like scores that normalize to [0.75, 0.25] and
        // [0.5, 0.5], both tokens routed to expert 0: f = [2, 0], P₀ = 0.625, Σ fP = 1.25.
        // Sequence 1: uniform scores, one token per expert: f = [1, 1], P = [0.5, 0.5], Σ = 1.
        let scores = [0.6, 0.2, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5];
        let experts = [0, 0, 0, 1];
        let loss: f64 = balance_loss_fwd(&scores, &experts, 2, 2, 2, 1, 0.1);
        assert!((loss - 0.1 * 1.125).abs() < 1e-15, "{loss}");
        let one: f64 = balance_loss_fwd(&scores[..4], &experts[..2], 1, 2, 2, 1, 0.1);
        assert!((one - 0.125).abs() < 1e-15, "{one}");
    }

    #[test]
    fn balance_loss_bwd_matches_finite_differences() {
        let (b, t, e, k) = (2, 3, 4, 2);
        let mut rng = Rng::new(17);
        let scores: Vec<f64> = uniform(&mut rng, b * t * e, 2.0)
            .into_iter()
            .map(sig)
            .collect();
        let experts: Vec<u32> = (0..b * t * k)
            .map(|p| ((p * 3 + p / 5) % e) as u32)
            .collect();
        let dloss = 1.7;
        let got = balance_loss_bwd(&scores, &experts, b, t, e, k, 0.3, dloss);
        let want = numeric_grad(&scores, |s| {
            dloss * balance_loss_fwd(s, &experts, b, t, e, k, 0.3)
        });
        assert_close(&got, &want, 1e-8, "d_scores");
    }

    #[test]
    fn swiglu_and_gelu_derivatives_match_finite_differences() {
        for &(g, u) in &[(0.3, -1.2), (-2.0, 0.7), (1.5, 2.0)] {
            let (dg, du) = Activation::<f64>::grad(&SwiGlu, g, u);
            let want = numeric_grad(&[g, u], |p| SwiGlu.value(p[0], p[1]));
            assert_close(&[dg, du], &want, 1e-8, "swiglu");
            let (_, dx) = Activation::<f64>::grad(&GeluTanh, 0.0, g);
            let want = numeric_grad(&[g], |p| GeluTanh.value(0.0, p[0]));
            assert_close(&[dx], &want, 1e-8, "gelu");
        }
    }
}
