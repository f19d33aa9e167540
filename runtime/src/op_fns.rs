//! The ops of the graph IR as plain functions over slices with explicit shapes: what the
//! interpreter ([`crate::exec`]) runs for each node, and what a specialized module generated
//! from a Program (`kiln emit rust`, `kiln::model!`) calls with constant shapes. Both paths
//! call the same functions, so they compute the same bits.
//!
//! Most ops map straight onto a [`crate::cpu`] kernel; the functions here add the plumbing
//! the kernels leave to their caller (bounds checks on ids, row counts, the fused residual
//! adds, re-deriving a norm's statistics for its backward pass).

use kiln_ir::attrs::NormKind;
use kiln_ir::expr::Compiled;
use kiln_ir::ir::RouterSpec;

use crate::cpu::elementwise::{self, is_swiglu, swiglu};
use crate::cpu::{dense, moe, Real};
use crate::exec::ExecError;
use crate::numerics::gemm::GemmNumerics;

/// A tensor of `n` copies of `value`.
pub fn fill<T: Real>(value: f64, n: usize) -> Vec<T> {
    vec![T::from_f64(value); n]
}

/// Splits the rows of `x` (of width `sizes.iter().sum()`) into column blocks of `sizes`.
pub fn split<T: Real>(x: &[T], sizes: &[usize]) -> Vec<Vec<T>> {
    let total: usize = sizes.iter().sum();
    let rows = x.len() / total.max(1);
    let mut outs: Vec<Vec<T>> = sizes
        .iter()
        .map(|&s| Vec::with_capacity(rows * s))
        .collect();
    for row in x.chunks_exact(total.max(1)) {
        let mut at = 0;
        for (o, &s) in outs.iter_mut().zip(sizes) {
            o.extend_from_slice(&row[at..at + s]);
            at += s;
        }
    }
    outs
}

/// Concatenates the rows of `xs` (of widths `widths`) column-wise.
pub fn concat<T: Real>(xs: &[&[T]], widths: &[usize]) -> Vec<T> {
    let rows = xs[0].len() / widths[0].max(1);
    let mut y = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for r in 0..rows {
        for (x, &w) in xs.iter().zip(widths) {
            y.extend_from_slice(&x[r * w..(r + 1) * w]);
        }
    }
    y
}

/// Repeats each of the `outer` blocks of `inner` elements `n` times (a new axis of size `n`).
pub fn expand<T: Real>(x: &[T], outer: usize, inner: usize, n: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len() * n);
    for o in 0..outer {
        for _ in 0..n {
            y.extend_from_slice(&x[o * inner..(o + 1) * inner]);
        }
    }
    y
}

/// Sums `x: [outer, len, inner]` over its middle axis, in order.
pub fn sum_axis<T: Real>(x: &[T], outer: usize, len: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::ZERO; outer * inner];
    for o in 0..outer {
        for l in 0..len {
            let src = &x[(o * len + l) * inner..(o * len + l + 1) * inner];
            for (d, &v) in y[o * inner..(o + 1) * inner].iter_mut().zip(src) {
                *d += v;
            }
        }
    }
    y
}

/// `w[ids]`: rows of the `[vocab, d]` table; an id out of range is an error naming `path`.
pub fn embedding<T: Real>(
    w: &[T],
    vocab: usize,
    d: usize,
    ids: &[u32],
    path: &str,
) -> Result<Vec<T>, ExecError> {
    check_ids(ids, vocab, path)?;
    Ok(dense::embedding_fwd(w, vocab, d, ids))
}

/// `x·wᵀ (+ b)` for `x: [rows, inp]`, `w: [out, inp]`.
pub fn linear<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, out: usize, inp: usize) -> Vec<T> {
    linear_with(x, w, b, out, inp, &GemmNumerics::Exact)
}

/// [`linear`] under a precision policy's numerics.
pub fn linear_with<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    out: usize,
    inp: usize,
    num: &GemmNumerics,
) -> Vec<T> {
    dense::linear_fwd_with(x, x.len() / inp, inp, w, out, b, num)
}

/// The gradients of [`linear`] given `dy: [rows, out]`.
pub fn linear_grad<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    out: usize,
    inp: usize,
    bias: bool,
) -> dense::LinearGrads<T> {
    linear_grad_with(x, w, dy, out, inp, bias, &GemmNumerics::Exact)
}

/// [`linear_grad`] under a precision policy's numerics.
#[allow(clippy::too_many_arguments)]
pub fn linear_grad_with<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    out: usize,
    inp: usize,
    bias: bool,
    num: &GemmNumerics,
) -> dense::LinearGrads<T> {
    dense::linear_bwd_with(x, x.len() / inp, inp, w, out, dy, bias, num)
}

/// `s = x + r` and `norm(s)`: a residual add fused with the norm that reads it.
pub fn add_norm<T: Real>(
    kind: NormKind,
    eps: f64,
    x: &[T],
    r: &[T],
    w: &[T],
    b: Option<&[T]>,
) -> (Vec<T>, Vec<T>) {
    let s = elementwise::add(x, r);
    let y = norm_fwd(kind, eps, &s, w, b);
    (s, y)
}

/// The gradients of [`add_norm`]: `[ds + dx, dw, (db)]` given the norm's output gradient
/// `dy` and the gradient `ds` that reaches the sum directly.
pub fn add_norm_grad<T: Real>(
    kind: NormKind,
    eps: f64,
    s: &[T],
    w: &[T],
    dy: &[T],
    ds: &[T],
) -> Vec<Vec<T>> {
    let mut grads = norm_bwd(kind, eps, s, w, dy);
    elementwise::add_assign(&mut grads[0], ds);
    grads
}

/// The gradient of [`router_fwd`](moe::router_fwd)'s outputs with respect to `x` and `w`.
#[allow(clippy::too_many_arguments)]
pub fn router_grad<T: Real>(
    x: &[T],
    n: usize,
    d: usize,
    w: &[T],
    e: usize,
    weights: &[T],
    experts: &[u32],
    scores: &[T],
    d_weights: &[T],
    d_scores: &[T],
    cfg: &moe::RouterConfig,
) -> (Vec<T>, Vec<T>) {
    let out = moe::RouterOut {
        weights: weights.to_vec(),
        experts: experts.to_vec(),
        scores: scores.to_vec(),
    };
    moe::router_bwd(x, n, d, w, e, &out, cfg, d_weights, Some(d_scores))
}

/// The mean cross-entropy of `logits: [n, vocab]` against `targets`; a target out of range is
/// an error naming `path`.
pub fn cross_entropy<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    path: &str,
) -> Result<T, ExecError> {
    check_ids(targets, vocab, path)?;
    Ok(dense::cross_entropy_fwd(logits, n, vocab, targets).0)
}

/// The weighted cross-entropy `Σᵢ wᵢ · CEᵢ` of `logits: [n, vocab]` (a policy-gradient
/// loss); a target out of range is an error naming `path`.
pub fn cross_entropy_weighted<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    weights: &[T],
    path: &str,
) -> Result<T, ExecError> {
    check_ids(targets, vocab, path)?;
    Ok(dense::cross_entropy_fwd_weighted(logits, n, vocab, targets, Some(weights)).0)
}

/// The gradient of [`cross_entropy_weighted`] scaled by `dloss`.
pub fn cross_entropy_weighted_grad<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    weights: &[T],
    dloss: T,
) -> Vec<T> {
    let (_, lse) = dense::cross_entropy_fwd_weighted(logits, n, vocab, targets, Some(weights));
    dense::cross_entropy_bwd_weighted(logits, n, vocab, targets, &lse, dloss, Some(weights))
}

/// The gradient of [`cross_entropy`] scaled by `dloss` (the row statistics are recomputed).
pub fn cross_entropy_grad<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    dloss: T,
) -> Vec<T> {
    let (_, lse) = dense::cross_entropy_fwd(logits, n, vocab, targets);
    dense::cross_entropy_bwd(logits, n, vocab, targets, &lse, dloss)
}

/// Errors when an id is not below `bound`, naming the op `path` that read it.
pub fn check_ids(ids: &[u32], bound: usize, path: &str) -> Result<(), ExecError> {
    match ids.iter().find(|&&i| i as usize >= bound) {
        Some(bad) => Err(ExecError::OutOfRange(format!(
            "`{path}` reads index {bad}, but only {bound} exist"
        ))),
        None => Ok(()),
    }
}

/// A norm of the rows of `x` (of width `w.len()`): RMSNorm, or LayerNorm with bias `b`.
pub fn norm_fwd<T: Real>(kind: NormKind, eps: f64, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let n = w.len();
    let rows = x.len() / n;
    match kind {
        NormKind::RmsNorm => dense::rms_norm_fwd(x, rows, n, w, eps).0,
        NormKind::LayerNorm => {
            let b = b.expect("a LayerNorm has a bias");
            dense::layer_norm_fwd(x, rows, n, w, b, eps).0
        }
    }
}

/// A norm's gradients `[dx, dw]` (RMSNorm) or `[dx, dw, db]` (LayerNorm); the statistics
/// are recomputed from `x`.
pub fn norm_bwd<T: Real>(kind: NormKind, eps: f64, x: &[T], w: &[T], dy: &[T]) -> Vec<Vec<T>> {
    let n = w.len();
    let rows = x.len() / n;
    match kind {
        NormKind::RmsNorm => {
            let rstd = dense::rms_norm_rstd(x, rows, n, eps);
            let (dx, dw) = dense::rms_norm_bwd(x, rows, n, w, &rstd, dy);
            vec![dx, dw]
        }
        NormKind::LayerNorm => {
            // The bias does not affect the gradients; zeros stand in for it.
            let zeros = vec![T::ZERO; n];
            let (_, mean, rstd) = dense::layer_norm_fwd(x, rows, n, w, &zeros, eps);
            let (dx, dw, db) = dense::layer_norm_bwd(x, rows, n, w, &mean, &rstd, dy);
            vec![dx, dw, db]
        }
    }
}

/// The runtime's router configuration of the IR's router attributes.
pub fn router_config(s: &RouterSpec) -> moe::RouterConfig {
    moe::RouterConfig {
        score: s.score,
        select: s.select,
        groups: s.groups as usize,
        groups_kept: s.groups_kept as usize,
        group_score: s.group_score,
        top_k: s.top_k as usize,
        normalize: s.normalize,
        scale: s.scale,
    }
}

/// An expert activation given by a spec expression over `gate` and `up` (or `x`).
pub struct ExprActivation {
    compiled: Compiled,
    gated: bool,
    swiglu: bool,
}

impl ExprActivation {
    pub fn new(expr: &kiln_ir::expr::Expr, gated: bool) -> Self {
        let vars: &[&str] = if gated { &["gate", "up"] } else { &["x"] };
        ExprActivation {
            compiled: expr
                .compile(vars)
                .expect("checked activations read gate and up, or x"),
            gated,
            swiglu: is_swiglu(expr, vars),
        }
    }
}

/// Longest expression the activation evaluates with stack scratch space.
const STACK_STEPS: usize = 32;

impl ExprActivation {
    fn operands<T: Real>(&self, gate: T, up: T) -> ([f64; 2], usize) {
        if self.gated {
            ([gate.to_f64(), up.to_f64()], 2)
        } else {
            ([up.to_f64(), 0.0], 1)
        }
    }
}

impl<T: Real> moe::Activation<T> for ExprActivation {
    fn gated(&self) -> bool {
        self.gated
    }

    fn value(&self, gate: T, up: T) -> T {
        if self.swiglu {
            return swiglu(gate, up).0;
        }
        let (x, n) = self.operands(gate, up);
        let c = &self.compiled;
        let y = if c.len() <= STACK_STEPS {
            c.eval(&x[..n], &mut [0.0; STACK_STEPS][..c.len()])
        } else {
            c.eval(&x[..n], &mut c.scratch())
        };
        T::from_f64(y)
    }

    fn grad(&self, gate: T, up: T) -> (T, T) {
        if self.swiglu {
            let (_, d_gate, d_up) = swiglu(gate, up);
            return (d_gate, d_up);
        }
        let (x, n) = self.operands(gate, up);
        let c = &self.compiled;
        let mut g = [0.0; 2];
        if c.len() <= STACK_STEPS {
            let (mut s, mut adj) = ([0.0; STACK_STEPS], [0.0; STACK_STEPS]);
            c.eval_grad(&x[..n], &mut s[..c.len()], &mut adj[..c.len()], &mut g[..n]);
        } else {
            c.eval_grad(&x[..n], &mut c.scratch(), &mut c.scratch(), &mut g[..n]);
        }
        if self.gated {
            (T::from_f64(g[0]), T::from_f64(g[1]))
        } else {
            (T::ZERO, T::from_f64(g[0]))
        }
    }

    fn values(&self, gate: &[T], up: &[T], out: &mut [T]) {
        if self.swiglu {
            return moe::SwiGlu.values(gate, up, out);
        }
        moe::per_element_values(self, gate, up, out);
    }

    fn values_and_grads(&self, gate: &[T], up: &[T], a: &mut [T], dg: &mut [T], du: &mut [T]) {
        if self.swiglu {
            return moe::SwiGlu.values_and_grads(gate, up, a, dg, du);
        }
        moe::per_element_values_and_grads(self, gate, up, a, dg, du);
    }
}
