//! The grouped expert FFN: rows sorted by expert, each thread taking one equal part of the
//! sorted rows, forward and backward, and the activations it applies.

use rayon::prelude::*;

use crate::cpu::elementwise::swiglu;
use crate::cpu::simd;
use crate::cpu::Real;
use crate::numerics::gemm::{GemmNumerics, Role};

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
/// [`crate::cpu::elementwise::swiglu`].
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
pub fn sort_by_expert(experts: &[u32], e: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
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

/// Each token's rows of `rows: [_, d]` summed in slot order, `y_t = Σ_j w[t·k + j] ·
/// rows[row_of[t·k + j]]` for `j = 0..k`, starting from zero (unweighted when `weights` is
/// `None`), in parallel over tokens: `[n, d]`. The experts' combine, and the sum of a token's
/// input gradients.
pub fn combine_slots<T: Real>(
    rows: &[T],
    row_of: &[usize],
    weights: Option<&[T]>,
    n: usize,
    k: usize,
    d: usize,
) -> Vec<T> {
    let mut y = vec![T::ZERO; n * d];
    if d > 0 {
        y.par_chunks_mut(d).enumerate().for_each(|(t, yt)| {
            for j in 0..k {
                let p = t * k + j;
                let r = &rows[row_of[p] * d..(row_of[p] + 1) * d];
                match weights {
                    Some(w) => {
                        for (yc, &oc) in yt.iter_mut().zip(r) {
                            *yc += w[p] * oc;
                        }
                    }
                    None => {
                        for (yc, &oc) in yt.iter_mut().zip(r) {
                            *yc += oc;
                        }
                    }
                }
            }
        });
    }
    y
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
pub fn gather_sorted<T: Real>(src: &[T], order: &[usize], k: usize, d: usize) -> Vec<T> {
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
pub(super) fn row_parts(rows: usize, flop_per_row: usize) -> usize {
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

    let y = combine_slots(&out, &row_of, Some(weights), n, k, d);
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

    let dx = combine_slots(&dx_rows, &saved.row_of, None, n, k, d);
    let d_weights = saved.row_of.iter().map(|&r| dwt_rows[r]).collect();
    ExpertsGrads {
        dx,
        d_weights,
        dw_gate,
        dw_up,
        dw_down,
    }
}
