//! Dense kernels: linear layers (their GEMMs through `numerics::gemm`), embeddings, norms
//! and cross-entropy.

use rayon::prelude::*;

use super::simd;
use super::Real;
use crate::numerics::gemm::{GemmNumerics, Role};

/// Below this many elements (rows × row length) a row-wise kernel runs on the calling thread:
/// spreading a smaller problem over rayon's workers costs more than it saves.
const PARALLEL_MIN_ELEMENTS: usize = 32 * 1024;

/// Roughly how many elements one parallel task handles at least, so that tasks stay large
/// enough to amortize their scheduling.
const TASK_MIN_ELEMENTS: usize = 8 * 1024;

/// Whether a kernel over `rows` rows of `n` elements should spread its rows over rayon's
/// current thread pool. The answer never changes a row-wise result: every row is computed by
/// the same code whichever thread runs it.
fn parallel(rows: usize, n: usize) -> bool {
    rows.saturating_mul(n) > PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1
}

/// The fewest rows of `n` elements one parallel task takes.
fn min_rows_per_task(n: usize) -> usize {
    (TASK_MIN_ELEMENTS / n.max(1)).max(1)
}

/// Sums a quantity down the rows of a `[rows, n]` layout: `out[j] = Σ_r term(r, j)` for every
/// column `j < n`, where `add_row(r, first, acc)` adds `term(r, first + c)` to `acc[c]` for
/// each `c < acc.len()` (a loop over contiguous columns, which vectorizes).
///
/// Each column is accumulated in f64, in row order, by one task, so the result is the same
/// bit for bit whatever the thread count or the way the columns are split between tasks.
fn column_sums<T: Real>(
    rows: usize,
    n: usize,
    add_row: impl Fn(usize, usize, &mut [f64]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::ZERO; n];
    // Adds every row's contribution to the columns `first..first + block.len()`.
    let sum_block = |first: usize, block: &mut [T]| {
        let mut acc = vec![0.0f64; block.len()];
        for r in 0..rows {
            add_row(r, first, &mut acc);
        }
        for (o, a) in block.iter_mut().zip(&acc) {
            *o = T::from_f64(*a);
        }
    };
    if parallel(rows, n) {
        // A few blocks per thread for load balance, each wide enough to read whole cache
        // lines of every row.
        let width = n.div_ceil(4 * rayon::current_num_threads()).max(64);
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(b, block)| sum_block(b * width, block));
    } else {
        sum_block(0, &mut out);
    }
    out
}

/// The gradients of a linear layer with respect to its input, weight and (optional) bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearGrads<T> {
    /// `∂L/∂x: [rows, inp]`.
    pub dx: Vec<T>,
    /// `∂L/∂w: [out, inp]`.
    pub dw: Vec<T>,
    /// `∂L/∂b: [out]`, present when the layer has a bias.
    pub db: Option<Vec<T>>,
}

/// A linear layer, `y = x · wᵀ + b`.
///
/// `x: [rows, inp]`, `w: [out, inp]` (PyTorch's layout), `b: [out]` → `y: [rows, out]`.
pub fn linear_fwd<T: Real>(
    x: &[T],
    rows: usize,
    inp: usize,
    w: &[T],
    out: usize,
    b: Option<&[T]>,
) -> Vec<T> {
    linear_fwd_with(x, rows, inp, w, out, b, &GemmNumerics::Exact)
}

/// [`linear_fwd`] with the product's operands treated as `num` says (a precision policy's
/// emulation; [`GemmNumerics::Exact`] is `linear_fwd` itself).
pub fn linear_fwd_with<T: Real>(
    x: &[T],
    rows: usize,
    inp: usize,
    w: &[T],
    out: usize,
    b: Option<&[T]>,
    num: &GemmNumerics,
) -> Vec<T> {
    debug_assert_eq!(x.len(), rows * inp, "linear_fwd: x is not [rows, inp]");
    debug_assert_eq!(w.len(), out * inp, "linear_fwd: w is not [out, inp]");
    let mut y = vec![T::ZERO; rows * out];
    // The bias, when there is one, is written into every row first and the product is
    // accumulated onto it.
    if let Some(b) = b {
        debug_assert_eq!(b.len(), out, "linear_fwd: b is not [out]");
        for row in y.chunks_mut(out.max(1)) {
            row.copy_from_slice(b);
        }
    }
    // y[rows, out] (+)= x[rows, inp] · wᵀ, where w is stored [out, inp].
    let dims = (rows, inp, out);
    num.product(
        Role::Forward,
        dims,
        (x, false),
        (w, true),
        &mut y,
        b.is_some(),
        false,
    );
    y
}

/// The backward pass of [`linear_fwd`]: `dx = dy · w`, `dw = dyᵀ · x`, `db = Σ_rows dy`.
///
/// `x: [rows, inp]`, `w: [out, inp]`, `dy: [rows, out]`; `bias` says whether the layer has a
/// bias, and so whether `db` is computed. Both products read the stored operands through
/// transposed strides; nothing is transposed in memory.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Real>(
    x: &[T],
    rows: usize,
    inp: usize,
    w: &[T],
    out: usize,
    dy: &[T],
    bias: bool,
) -> LinearGrads<T> {
    linear_bwd_with(x, rows, inp, w, out, dy, bias, &GemmNumerics::Exact)
}

/// [`linear_bwd`] with both products' operands treated as `num` says.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_with<T: Real>(
    x: &[T],
    rows: usize,
    inp: usize,
    w: &[T],
    out: usize,
    dy: &[T],
    bias: bool,
    num: &GemmNumerics,
) -> LinearGrads<T> {
    debug_assert_eq!(x.len(), rows * inp, "linear_bwd: x is not [rows, inp]");
    debug_assert_eq!(w.len(), out * inp, "linear_bwd: w is not [out, inp]");
    debug_assert_eq!(dy.len(), rows * out, "linear_bwd: dy is not [rows, out]");
    // dx[rows, inp] = dy[rows, out] · w[out, inp].
    let mut dx = vec![T::ZERO; rows * inp];
    let dims = (rows, out, inp);
    num.product(
        Role::InputGrad,
        dims,
        (dy, false),
        (w, false),
        &mut dx,
        false,
        false,
    );
    // dw[out, inp] = dyᵀ · x, where dy is stored [rows, out] and so read transposed.
    let mut dw = vec![T::ZERO; out * inp];
    let dims = (out, rows, inp);
    num.product(
        Role::WeightGrad,
        dims,
        (dy, true),
        (x, false),
        &mut dw,
        false,
        false,
    );
    let db = bias.then(|| {
        column_sums(rows, out, |r, first, acc| {
            for (a, &d) in acc.iter_mut().zip(&dy[r * out + first..]) {
                *a += d.to_f64();
            }
        })
    });
    LinearGrads { dx, dw, db }
}

/// Copies the table row of one id into `y`, leaving `y` zero for an id out of range.
fn embedding_row<T: Real>(table: &[T], vocab: usize, d: usize, id: u32, y: &mut [T]) {
    let id = id as usize;
    debug_assert!(
        id < vocab,
        "embedding_fwd: id {id} is not below vocab {vocab}"
    );
    if let Some(src) = table.get(id * d..(id + 1) * d) {
        y.copy_from_slice(src);
    }
}

/// Looks up one row of an embedding table per id.
///
/// `table: [vocab, d]`, `ids: [len]` → `y: [len, d]`, row `i` a copy of `table[ids[i]]`.
///
/// Ids must be below `vocab`: callers validate them (the data pipeline does). A debug build
/// panics on an id out of range; a release build gives such an id a row of zeros, never
/// reading outside the table.
pub fn embedding_fwd<T: Real>(table: &[T], vocab: usize, d: usize, ids: &[u32]) -> Vec<T> {
    debug_assert_eq!(
        table.len(),
        vocab * d,
        "embedding_fwd: table is not [vocab, d]"
    );
    let mut y = vec![T::ZERO; ids.len() * d];
    if d == 0 {
        return y;
    }
    if parallel(ids.len(), d) {
        y.par_chunks_mut(d)
            .zip(ids.par_iter())
            .with_min_len(min_rows_per_task(d))
            .for_each(|(yr, &id)| embedding_row(table, vocab, d, id, yr));
    } else {
        y.chunks_mut(d)
            .zip(ids.iter())
            .for_each(|(yr, &id)| embedding_row(table, vocab, d, id, yr));
    }
    y
}

/// The backward pass of [`embedding_fwd`]: `dtable[v] = Σ_{i : ids[i] = v} dy[i]`.
///
/// `ids: [len]`, `dy: [len, d]` → `dtable: [vocab, d]`. Rows of repeated ids are added in the
/// order of `ids`, always, so the result does not depend on the thread count. An id out of
/// range (see [`embedding_fwd`]) contributes nothing in a release build.
pub fn embedding_bwd<T: Real>(ids: &[u32], dy: &[T], vocab: usize, d: usize) -> Vec<T> {
    debug_assert_eq!(dy.len(), ids.len() * d, "embedding_bwd: dy is not [len, d]");
    let mut dtable = vec![T::ZERO; vocab * d];
    if d == 0 {
        return dtable;
    }
    // Adds, in id order, the gradient rows of the ids in `first..first + block rows`.
    let scatter = |first: usize, block: &mut [T]| {
        let end = first + block.len() / d;
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            debug_assert!(
                id < vocab,
                "embedding_bwd: id {id} is not below vocab {vocab}"
            );
            if (first..end).contains(&id) {
                let dst = &mut block[(id - first) * d..(id - first + 1) * d];
                for (o, g) in dst.iter_mut().zip(&dy[i * d..(i + 1) * d]) {
                    *o += *g;
                }
            }
        }
    };
    if parallel(ids.len(), d) {
        // Each task owns a band of table rows and scans all the ids for those in its band,
        // so a few bands per thread suffice.
        let band = vocab.div_ceil(4 * rayon::current_num_threads()).max(1);
        dtable
            .par_chunks_mut(band * d)
            .enumerate()
            .for_each(|(b, block)| scatter(b * band, block));
    } else {
        scatter(0, &mut dtable);
    }
    dtable
}

/// `Σ_{j < n} term(j)` in f64 over eight interleaved partial sums, combined in a fixed order:
/// the additions pipeline (and vectorize) instead of each waiting for the last, and the
/// result does not depend on anything but `n` and the terms.
#[inline]
fn sum_f64(n: usize, term: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let full = n - n % 8;
    for base in (0..full).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += term(base + l);
        }
    }
    for j in full..n {
        acc[j - full] += term(j);
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// `1 / sqrt(mean(x²) + eps)` of one row, the sum of squares in f64.
fn rms_rstd_row<T: Real>(x: &[T], eps: f64) -> T {
    let sum_sq = sum_f64(x.len(), |j| x[j].to_f64() * x[j].to_f64());
    T::from_f64(1.0 / (sum_sq / x.len() as f64 + eps).sqrt())
}

/// One row of RMSNorm: writes `y = x · rstd · w` and returns `rstd`, the sum of squares
/// accumulated in f64.
fn rms_norm_row<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T]) -> T {
    let rstd = rms_rstd_row(x, eps);
    for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
        *o = v * rstd * g;
    }
    rstd
}

/// RMSNorm over the last axis: `y = x · rstd · w` with `rstd = 1 / sqrt(mean(x²) + eps)`.
///
/// `x: [rows, n]`, `w: [n]` → `(y: [rows, n], rstd: [rows])`. The statistics are computed in
/// f64 (HF computes them in fp32 at least); `rstd` is kept for the backward pass. Every row is
/// computed alone, so the result is the same bit for bit for any thread count.
pub fn rms_norm_fwd<T: Real>(
    x: &[T],
    rows: usize,
    n: usize,
    w: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    debug_assert_eq!(x.len(), rows * n, "rms_norm_fwd: x is not [rows, n]");
    debug_assert_eq!(w.len(), n, "rms_norm_fwd: w is not [n]");
    debug_assert!(n > 0, "rms_norm_fwd: rows are empty");
    let mut y = vec![T::ZERO; rows * n];
    let mut rstd = vec![T::ZERO; rows];
    if n == 0 {
        return (y, rstd);
    }
    if parallel(rows, n) {
        x.par_chunks(n)
            .zip(y.par_chunks_mut(n))
            .zip(rstd.par_iter_mut())
            .with_min_len(min_rows_per_task(n))
            .for_each(|((xr, yr), r)| *r = rms_norm_row(xr, w, eps, yr));
    } else {
        x.chunks(n)
            .zip(y.chunks_mut(n))
            .zip(rstd.iter_mut())
            .for_each(|((xr, yr), r)| *r = rms_norm_row(xr, w, eps, yr));
    }
    (y, rstd)
}

/// The `rstd` of every row, exactly as [`rms_norm_fwd`] computes it, without the output: what
/// a backward pass that recomputes its statistics needs.
pub fn rms_norm_rstd<T: Real>(x: &[T], rows: usize, n: usize, eps: f64) -> Vec<T> {
    debug_assert_eq!(x.len(), rows * n, "rms_norm_rstd: x is not [rows, n]");
    let row = |xr: &[T]| rms_rstd_row(xr, eps);
    if n == 0 {
        return vec![T::ZERO; rows];
    }
    if parallel(rows, n) {
        x.par_chunks(n)
            .with_min_len(min_rows_per_task(n))
            .map(row)
            .collect()
    } else {
        x.chunks(n).map(row).collect()
    }
}

/// One row of the RMSNorm input gradient:
/// `dx = rstd · w · dy − (rstd³ / n) · x · Σ_j (dy · w · x)_j`, the dot product in f64.
fn rms_norm_bwd_row<T: Real>(x: &[T], w: &[T], rstd: T, dy: &[T], dx: &mut [T]) {
    let dot = sum_f64(x.len(), |j| dy[j].to_f64() * w[j].to_f64() * x[j].to_f64());
    let r = rstd.to_f64();
    let c = T::from_f64(r * r * r * dot / x.len() as f64);
    for (((o, &v), &g), &d) in dx.iter_mut().zip(x).zip(w).zip(dy) {
        *o = rstd * g * d - c * v;
    }
}

/// The backward pass of [`rms_norm_fwd`].
///
/// `x: [rows, n]`, `w: [n]`, `rstd: [rows]` (from the forward pass), `dy: [rows, n]` →
/// `(dx: [rows, n], dw: [n])` with `dw = Σ_rows dy · x · rstd`. `dx` is row-wise and the same
/// bit for bit for any thread count; `dw` sums every column in row order, so it is too.
pub fn rms_norm_bwd<T: Real>(
    x: &[T],
    rows: usize,
    n: usize,
    w: &[T],
    rstd: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>) {
    debug_assert_eq!(x.len(), rows * n, "rms_norm_bwd: x is not [rows, n]");
    debug_assert_eq!(w.len(), n, "rms_norm_bwd: w is not [n]");
    debug_assert_eq!(rstd.len(), rows, "rms_norm_bwd: rstd is not [rows]");
    debug_assert_eq!(dy.len(), rows * n, "rms_norm_bwd: dy is not [rows, n]");
    let mut dx = vec![T::ZERO; rows * n];
    if n > 0 {
        if parallel(rows, n) {
            x.par_chunks(n)
                .zip(dy.par_chunks(n))
                .zip(dx.par_chunks_mut(n))
                .zip(rstd.par_iter())
                .with_min_len(min_rows_per_task(n))
                .for_each(|(((xr, dyr), dxr), &r)| rms_norm_bwd_row(xr, w, r, dyr, dxr));
        } else {
            x.chunks(n)
                .zip(dy.chunks(n))
                .zip(dx.chunks_mut(n))
                .zip(rstd.iter())
                .for_each(|(((xr, dyr), dxr), &r)| rms_norm_bwd_row(xr, w, r, dyr, dxr));
        }
    }
    let dw = column_sums(rows, n, |r, first, acc| {
        let (at, rs) = (r * n + first, rstd[r].to_f64());
        for ((a, &d), &v) in acc.iter_mut().zip(&dy[at..]).zip(&x[at..]) {
            *a += d.to_f64() * v.to_f64() * rs;
        }
    });
    (dx, dw)
}

/// One row of LayerNorm: writes `y = (x − mean) · rstd · w + b` and returns `(mean, rstd)`,
/// both computed in f64 (two passes, biased variance).
fn layer_norm_row<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, y: &mut [T]) -> (T, T) {
    let n = x.len() as f64;
    let mean = sum_f64(x.len(), |j| x[j].to_f64()) / n;
    let var = sum_f64(x.len(), |j| (x[j].to_f64() - mean) * (x[j].to_f64() - mean)) / n;
    let rstd = 1.0 / (var + eps).sqrt();
    let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
    for (((o, &v), &g), &c) in y.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean_t) * rstd_t * g + c;
    }
    (mean_t, rstd_t)
}

/// LayerNorm over the last axis: `y = (x − mean) · rstd · w + b` with
/// `rstd = 1 / sqrt(var + eps)` and the biased variance (PyTorch's).
///
/// `x: [rows, n]`, `w: [n]`, `b: [n]` → `(y: [rows, n], mean: [rows], rstd: [rows])`. The
/// statistics are computed in f64 and kept for the backward pass. Every row is computed
/// alone, so the result is the same bit for bit for any thread count.
pub fn layer_norm_fwd<T: Real>(
    x: &[T],
    rows: usize,
    n: usize,
    w: &[T],
    b: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    debug_assert_eq!(x.len(), rows * n, "layer_norm_fwd: x is not [rows, n]");
    debug_assert_eq!(w.len(), n, "layer_norm_fwd: w is not [n]");
    debug_assert_eq!(b.len(), n, "layer_norm_fwd: b is not [n]");
    debug_assert!(n > 0, "layer_norm_fwd: rows are empty");
    let mut y = vec![T::ZERO; rows * n];
    let mut mean = vec![T::ZERO; rows];
    let mut rstd = vec![T::ZERO; rows];
    if n == 0 {
        return (y, mean, rstd);
    }
    if parallel(rows, n) {
        x.par_chunks(n)
            .zip(y.par_chunks_mut(n))
            .zip(mean.par_iter_mut())
            .zip(rstd.par_iter_mut())
            .with_min_len(min_rows_per_task(n))
            .for_each(|(((xr, yr), m), r)| (*m, *r) = layer_norm_row(xr, w, b, eps, yr));
    } else {
        x.chunks(n)
            .zip(y.chunks_mut(n))
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
            .for_each(|(((xr, yr), m), r)| (*m, *r) = layer_norm_row(xr, w, b, eps, yr));
    }
    (y, mean, rstd)
}

/// One row of the LayerNorm input gradient. With `x̂ = (x − mean) · rstd` and `g = dy · w`:
/// `dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))`, the two means in f64.
fn layer_norm_bwd_row<T: Real>(x: &[T], w: &[T], mean: T, rstd: T, dy: &[T], dx: &mut [T]) {
    let n = x.len() as f64;
    let sum_g = sum_f64(x.len(), |j| (dy[j] * w[j]).to_f64());
    let sum_gx = sum_f64(x.len(), |j| {
        (dy[j] * w[j]).to_f64() * ((x[j] - mean) * rstd).to_f64()
    });
    let (mean_g, mean_gx) = (T::from_f64(sum_g / n), T::from_f64(sum_gx / n));
    for (((o, &v), &g), &d) in dx.iter_mut().zip(x).zip(w).zip(dy) {
        let xhat = (v - mean) * rstd;
        *o = rstd * (d * g - mean_g - xhat * mean_gx);
    }
}

/// The backward pass of [`layer_norm_fwd`].
///
/// `x: [rows, n]`, `w: [n]`, `mean, rstd: [rows]` (from the forward pass), `dy: [rows, n]` →
/// `(dx: [rows, n], dw: [n], db: [n])` with `dw = Σ_rows dy · x̂` and `db = Σ_rows dy`. `dx` is
/// row-wise and `dw`, `db` sum every column in row order, so all three are the same bit for
/// bit for any thread count.
pub fn layer_norm_bwd<T: Real>(
    x: &[T],
    rows: usize,
    n: usize,
    w: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    debug_assert_eq!(x.len(), rows * n, "layer_norm_bwd: x is not [rows, n]");
    debug_assert_eq!(w.len(), n, "layer_norm_bwd: w is not [n]");
    debug_assert_eq!(mean.len(), rows, "layer_norm_bwd: mean is not [rows]");
    debug_assert_eq!(rstd.len(), rows, "layer_norm_bwd: rstd is not [rows]");
    debug_assert_eq!(dy.len(), rows * n, "layer_norm_bwd: dy is not [rows, n]");
    let mut dx = vec![T::ZERO; rows * n];
    if n > 0 {
        if parallel(rows, n) {
            x.par_chunks(n)
                .zip(dy.par_chunks(n))
                .zip(dx.par_chunks_mut(n))
                .zip(mean.par_iter())
                .zip(rstd.par_iter())
                .with_min_len(min_rows_per_task(n))
                .for_each(|((((xr, dyr), dxr), &m), &r)| layer_norm_bwd_row(xr, w, m, r, dyr, dxr));
        } else {
            x.chunks(n)
                .zip(dy.chunks(n))
                .zip(dx.chunks_mut(n))
                .zip(mean.iter())
                .zip(rstd.iter())
                .for_each(|((((xr, dyr), dxr), &m), &r)| layer_norm_bwd_row(xr, w, m, r, dyr, dxr));
        }
    }
    let dw = column_sums(rows, n, |r, first, acc| {
        let (at, m, rs) = (r * n + first, mean[r], rstd[r]);
        for ((a, &d), &v) in acc.iter_mut().zip(&dy[at..]).zip(&x[at..]) {
            *a += d.to_f64() * ((v - m) * rs).to_f64();
        }
    });
    let db = column_sums(rows, n, |r, first, acc| {
        for (a, &d) in acc.iter_mut().zip(&dy[r * n + first..]) {
            *a += d.to_f64();
        }
    });
    (dx, dw, db)
}

/// One row of cross-entropy: returns `(lse, loss)` with `lse = log Σ_j exp(logits_j)`
/// (max-subtracted, summed in f64) and `loss = lse − logits[target]`, or a loss of zero for a
/// target out of range.
fn cross_entropy_row<T: Real>(logits: &[T], target: u32) -> (T, f64) {
    let max = logits.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
    let mut e = vec![T::ZERO; logits.len()];
    simd::exp_shifted_scaled(logits, max, T::ONE, &mut e);
    let sum: f64 = e.iter().map(|v| v.to_f64()).sum();
    let lse = max.to_f64() + sum.ln();
    let t = target as usize;
    debug_assert!(
        t < logits.len(),
        "cross_entropy: target {t} is not below vocab {}",
        logits.len()
    );
    let loss = logits.get(t).map_or(0.0, |&v| lse - v.to_f64());
    (T::from_f64(lse), loss)
}

/// The mean cross-entropy of rows of logits against target classes:
/// `loss = mean_i (lse_i − logits[i, targets[i]])` with `lse_i = log Σ_j exp(logits[i, j])`.
///
/// `logits: [n, vocab]`, `targets: [n]` → `(loss, lse: [n])`; `lse` is kept for the backward
/// pass. Each row subtracts its maximum before exponentiating and sums in f64; the per-row
/// losses are added in row order, so the result is the same bit for bit for any thread count.
///
/// Targets must be below `vocab`: callers validate them. A debug build panics on a target out
/// of range; a release build lets that row contribute nothing (zero loss, zero gradient) while
/// the mean still divides by `n`.
pub fn cross_entropy_fwd<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
) -> (T, Vec<T>) {
    cross_entropy_fwd_weighted(logits, n, vocab, targets, None)
}

/// [`cross_entropy_fwd`], or with `weights: [n]` the weighted sum `Σ_i w_i · loss_i` (no
/// mean), summed in row order in f64.
pub fn cross_entropy_fwd_weighted<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    weights: Option<&[T]>,
) -> (T, Vec<T>) {
    debug_assert_eq!(
        logits.len(),
        n * vocab,
        "cross_entropy_fwd: logits are not [n, vocab]"
    );
    debug_assert_eq!(targets.len(), n, "cross_entropy_fwd: targets are not [n]");
    debug_assert!(vocab > 0, "cross_entropy_fwd: the vocabulary is empty");
    let mut lse = vec![T::ZERO; n];
    let mut losses = vec![0.0f64; n];
    if vocab == 0 || n == 0 {
        return (T::ZERO, lse);
    }
    if parallel(n, vocab) {
        logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .zip(lse.par_iter_mut())
            .zip(losses.par_iter_mut())
            .with_min_len(min_rows_per_task(vocab))
            .for_each(|(((lr, &t), s), l)| (*s, *l) = cross_entropy_row(lr, t));
    } else {
        logits
            .chunks(vocab)
            .zip(targets.iter())
            .zip(lse.iter_mut())
            .zip(losses.iter_mut())
            .for_each(|(((lr, &t), s), l)| (*s, *l) = cross_entropy_row(lr, t));
    }
    let total = match weights {
        None => losses.iter().sum::<f64>() / n as f64,
        Some(w) => losses.iter().zip(w).map(|(l, w)| l * w.to_f64()).sum(),
    };
    (T::from_f64(total), lse)
}

/// One row of the cross-entropy gradient: `dlogits = (exp(logits − lse) − onehot(target)) ·
/// scale`, left zero for a target out of range.
fn cross_entropy_bwd_row<T: Real>(logits: &[T], target: u32, lse: T, scale: T, dlogits: &mut [T]) {
    let t = target as usize;
    debug_assert!(
        t < logits.len(),
        "cross_entropy_bwd: target {t} is not below vocab {}",
        logits.len()
    );
    if t >= logits.len() {
        return;
    }
    simd::exp_shifted_scaled(logits, lse, scale, dlogits);
    dlogits[t] -= scale;
}

/// The backward pass of [`cross_entropy_fwd`]:
/// `dlogits[i, j] = (softmax(logits[i])_j − [j = targets[i]]) · dloss / n`.
///
/// `logits: [n, vocab]`, `targets: [n]`, `lse: [n]` (from the forward pass), `dloss` the
/// gradient of the mean loss → `dlogits: [n, vocab]`. A row whose target is out of range gets
/// a zero gradient in a release build (see [`cross_entropy_fwd`]). Row-wise: the same bit for
/// bit for any thread count.
pub fn cross_entropy_bwd<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    lse: &[T],
    dloss: T,
) -> Vec<T> {
    cross_entropy_bwd_weighted(logits, n, vocab, targets, lse, dloss, None)
}

/// The backward pass of [`cross_entropy_fwd_weighted`]: row `i` scaled by `dloss · w_i`
/// instead of `dloss / n` when weighted; rows of weight zero stay zero.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_bwd_weighted<T: Real>(
    logits: &[T],
    n: usize,
    vocab: usize,
    targets: &[u32],
    lse: &[T],
    dloss: T,
    weights: Option<&[T]>,
) -> Vec<T> {
    debug_assert_eq!(
        logits.len(),
        n * vocab,
        "cross_entropy_bwd: logits are not [n, vocab]"
    );
    debug_assert_eq!(targets.len(), n, "cross_entropy_bwd: targets are not [n]");
    debug_assert_eq!(lse.len(), n, "cross_entropy_bwd: lse is not [n]");
    let mut dlogits = vec![T::ZERO; n * vocab];
    if vocab == 0 || n == 0 {
        return dlogits;
    }
    let mean = T::from_f64(dloss.to_f64() / n as f64);
    let scale = |i: usize| match weights {
        None => mean,
        Some(w) => T::from_f64(dloss.to_f64() * w[i].to_f64()),
    };
    /// A row: its index, then its logits, target, gradient and log-sum-exp.
    type Row<'r, T> = (usize, (((&'r [T], &'r u32), &'r mut [T]), &'r T));
    let row = |(i, (((lr, &t), dr), &s)): Row<'_, T>| {
        let sc = scale(i);
        if weights.is_none() || sc != T::ZERO {
            cross_entropy_bwd_row(lr, t, s, sc, dr);
        }
    };
    if parallel(n, vocab) {
        logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .zip(dlogits.par_chunks_mut(vocab))
            .zip(lse.par_iter())
            .enumerate()
            .with_min_len(min_rows_per_task(vocab))
            .for_each(row);
    } else {
        logits
            .chunks(vocab)
            .zip(targets.iter())
            .zip(dlogits.chunks_mut(vocab))
            .zip(lse.iter())
            .enumerate()
            .for_each(row);
    }
    dlogits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit linear congruential generator (Knuth's MMIX constants), enough for test
    /// inputs and independent of the runtime's PRNG.
    struct Lcg(u64);

    impl Lcg {
        /// A uniform value in `[-1, 1)`.
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }

        fn vec(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.next()).collect()
        }

        fn ids(&mut self, len: usize, below: u32) -> Vec<u32> {
            (0..len)
                .map(|_| ((self.next() + 1.0) / 2.0 * below as f64) as u32 % below)
                .collect()
        }
    }

    /// The scale-aware distance between two values: absolute below 1, relative above.
    fn err(a: f64, b: f64) -> f64 {
        (a - b).abs() / 1f64.max(a.abs()).max(b.abs())
    }

    fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                err(a, b) <= tol,
                "{what}[{i}]: {a} vs {b} (tolerance {tol})"
            );
        }
    }

    /// Checks an analytic gradient against central finite differences of the scalar
    /// `loss(input)`, perturbing one element of `input` at a time.
    fn check_grad(what: &str, input: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
        let h = 1e-5;
        let mut probe = input.to_vec();
        let numeric: Vec<f64> = (0..input.len())
            .map(|i| {
                probe[i] = input[i] + h;
                let up = loss(&probe);
                probe[i] = input[i] - h;
                let down = loss(&probe);
                probe[i] = input[i];
                (up - down) / (2.0 * h)
            })
            .collect();
        assert_close(what, analytic, &numeric, 1e-6);
    }

    /// `Σ a · b`, the scalar a backward pass with upstream gradient `b` differentiates.
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn naive_linear(
        x: &[f64],
        rows: usize,
        inp: usize,
        w: &[f64],
        out: usize,
        b: Option<&[f64]>,
    ) -> Vec<f64> {
        let mut y = vec![0.0; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let s: f64 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
                y[r * out + o] = s + b.map_or(0.0, |b| b[o]);
            }
        }
        y
    }

    fn naive_rms_norm(x: &[f64], n: usize, w: &[f64], eps: f64) -> Vec<f64> {
        x.chunks(n)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + eps).sqrt();
                row.iter().zip(w).map(move |(v, g)| v * r * g)
            })
            .collect()
    }

    fn naive_layer_norm(x: &[f64], n: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        x.chunks(n)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / n as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                let r = 1.0 / (var + eps).sqrt();
                (0..n).map(move |j| (row[j] - mean) * r * w[j] + b[j])
            })
            .collect()
    }

    fn naive_cross_entropy(logits: &[f64], vocab: usize, targets: &[u32]) -> f64 {
        let total: f64 = logits
            .chunks(vocab)
            .zip(targets)
            .map(|(row, &t)| {
                let z: f64 = row.iter().map(|v| v.exp()).sum();
                z.ln() - row[t as usize]
            })
            .sum();
        total / targets.len() as f64
    }

    #[test]
    fn linear_matches_the_naive_product_and_its_gradients_match_finite_differences() {
        let mut g = Lcg(1);
        let (rows, inp, out) = (5, 7, 4);
        let (x, w, b, dy) = (
            g.vec(rows * inp),
            g.vec(out * inp),
            g.vec(out),
            g.vec(rows * out),
        );
        for bias in [Some(b.as_slice()), None] {
            let y = linear_fwd(&x, rows, inp, &w, out, bias);
            assert_close("y", &y, &naive_linear(&x, rows, inp, &w, out, bias), 1e-12);
            let grads = linear_bwd(&x, rows, inp, &w, out, &dy, bias.is_some());
            let loss = |x: &[f64], w: &[f64], b: Option<&[f64]>| {
                dot(&linear_fwd(x, rows, inp, w, out, b), &dy)
            };
            check_grad("dx", &x, &grads.dx, |x| loss(x, &w, bias));
            check_grad("dw", &w, &grads.dw, |w| loss(&x, w, bias));
            match bias {
                Some(b) => check_grad("db", b, grads.db.as_ref().unwrap(), |b| {
                    loss(&x, &w, Some(b))
                }),
                None => assert!(grads.db.is_none()),
            }
        }
    }

    #[test]
    fn embedding_looks_up_rows_and_accumulates_repeated_ids() {
        let mut g = Lcg(2);
        let (vocab, d) = (6, 3);
        let table = g.vec(vocab * d);
        let ids = [2u32, 0, 2, 5, 2];
        let y = embedding_fwd(&table, vocab, d, &ids);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(y[i * d..(i + 1) * d], table[id * d..(id + 1) * d]);
        }
        let dy = g.vec(ids.len() * d);
        let dtable = embedding_bwd(&ids, &dy, vocab, d);
        for j in 0..d {
            assert_eq!(dtable[2 * d + j], dy[j] + dy[2 * d + j] + dy[4 * d + j]);
            assert_eq!(dtable[j], dy[d + j]);
            assert_eq!(dtable[5 * d + j], dy[3 * d + j]);
            assert_eq!(dtable[d + j], 0.0);
        }
        check_grad("dtable", &table, &dtable, |t| {
            dot(&embedding_fwd(t, vocab, d, &ids), &dy)
        });
    }

    /// An id out of range is a caller's bug: a debug build panics, a release build reads a row
    /// of zeros.
    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "not below vocab"))]
    fn embedding_of_an_out_of_range_id_is_zero_in_release() {
        let y = embedding_fwd(&[1.0f32, 2.0, 3.0, 4.0], 2, 2, &[1, 2]);
        assert_eq!(y, [3.0, 4.0, 0.0, 0.0]);
    }

    #[test]
    fn rms_norm_matches_the_naive_norm_and_its_gradients_match_finite_differences() {
        let mut g = Lcg(3);
        let (rows, n, eps) = (4, 9, 1e-6);
        let (x, w, dy) = (g.vec(rows * n), g.vec(n), g.vec(rows * n));
        let (y, rstd) = rms_norm_fwd(&x, rows, n, &w, eps);
        assert_close("y", &y, &naive_rms_norm(&x, n, &w, eps), 1e-12);
        let (dx, dw) = rms_norm_bwd(&x, rows, n, &w, &rstd, &dy);
        check_grad("dx", &x, &dx, |x| {
            dot(&rms_norm_fwd(x, rows, n, &w, eps).0, &dy)
        });
        check_grad("dw", &w, &dw, |w| {
            dot(&rms_norm_fwd(&x, rows, n, w, eps).0, &dy)
        });
    }

    #[test]
    fn rms_norm_with_unit_weights_gives_rows_of_unit_rms() {
        let mut g = Lcg(4);
        let (rows, n) = (6, 33);
        let x: Vec<f64> = g.vec(rows * n).iter().map(|v| 5.0 * v).collect();
        let (y, _) = rms_norm_fwd(&x, rows, n, &vec![1.0; n], 1e-12);
        for row in y.chunks(n) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
            assert!((ms.sqrt() - 1.0).abs() < 1e-9, "rms {}", ms.sqrt());
        }
    }

    #[test]
    fn layer_norm_matches_the_naive_norm_and_its_gradients_match_finite_differences() {
        let mut g = Lcg(5);
        let (rows, n, eps) = (4, 8, 1e-5);
        let (x, w, b, dy) = (g.vec(rows * n), g.vec(n), g.vec(n), g.vec(rows * n));
        let (y, mean, rstd) = layer_norm_fwd(&x, rows, n, &w, &b, eps);
        assert_close("y", &y, &naive_layer_norm(&x, n, &w, &b, eps), 1e-12);
        let (dx, dw, db) = layer_norm_bwd(&x, rows, n, &w, &mean, &rstd, &dy);
        let loss =
            |x: &[f64], w: &[f64], b: &[f64]| dot(&layer_norm_fwd(x, rows, n, w, b, eps).0, &dy);
        check_grad("dx", &x, &dx, |x| loss(x, &w, &b));
        check_grad("dw", &w, &dw, |w| loss(&x, w, &b));
        check_grad("db", &b, &db, |b| loss(&x, &w, b));
    }

    #[test]
    fn cross_entropy_matches_the_naive_loss_and_its_gradient_matches_finite_differences() {
        let mut g = Lcg(6);
        let (n, vocab, dloss) = (5, 7, 0.7);
        let logits: Vec<f64> = g.vec(n * vocab).iter().map(|v| 4.0 * v).collect();
        let targets = g.ids(n, vocab as u32);
        let (loss, lse) = cross_entropy_fwd(&logits, n, vocab, &targets);
        assert!(err(loss, naive_cross_entropy(&logits, vocab, &targets)) < 1e-12);
        let dlogits = cross_entropy_bwd(&logits, n, vocab, &targets, &lse, dloss);
        check_grad("dlogits", &logits, &dlogits, |l| {
            dloss * cross_entropy_fwd(l, n, vocab, &targets).0
        });
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_vocab_and_survives_large_logits() {
        let (n, vocab) = (3, 50);
        let (loss, _) = cross_entropy_fwd(&vec![3.7f64; n * vocab], n, vocab, &[0, 17, 49]);
        assert!((loss - (vocab as f64).ln()).abs() < 1e-12, "{loss}");
        // Logits far beyond exp's range must not overflow: the max is subtracted first.
        let (loss, _) = cross_entropy_fwd(&vec![1e4f32; n * vocab], n, vocab, &[0, 17, 49]);
        assert!((loss as f64 - (vocab as f64).ln()).abs() < 1e-5, "{loss}");
    }

    /// A target out of range is a caller's bug: a debug build panics, a release build lets
    /// the row contribute nothing.
    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "not below vocab"))]
    fn cross_entropy_of_an_out_of_range_target_contributes_nothing_in_release() {
        let logits = [0.0f64; 4];
        let (loss, lse) = cross_entropy_fwd(&logits, 2, 2, &[0, 2]);
        assert!((loss - 2f64.ln() / 2.0).abs() < 1e-12);
        let d = cross_entropy_bwd(&logits, 2, 2, &[0, 2], &lse, 1.0);
        assert_eq!(d[2..], [0.0, 0.0]);
    }

    #[test]
    fn f32_forward_kernels_agree_with_f64() {
        let mut g = Lcg(7);
        let (rows, n, out, vocab) = (8, 48, 24, 40);
        let (x, w, b) = (g.vec(rows * n), g.vec(n), g.vec(n));
        let (lw, lb) = (g.vec(out * n), g.vec(out));
        let logits: Vec<f64> = g.vec(rows * vocab).iter().map(|v| 6.0 * v).collect();
        let targets = g.ids(rows, vocab as u32);
        let ids = g.ids(rows, vocab as u32);
        let table = g.vec(vocab * n);
        let (xf, wf, bf) = (to_f32(&x), to_f32(&w), to_f32(&b));
        let tol = 1e-5;

        let y64 = linear_fwd(&x, rows, n, &lw, out, Some(&lb));
        let y32 = linear_fwd(&xf, rows, n, &to_f32(&lw), out, Some(&to_f32(&lb)));
        assert_close("linear", &to_f64(&y32), &y64, tol);

        let (y64, r64) = rms_norm_fwd(&x, rows, n, &w, 1e-6);
        let (y32, r32) = rms_norm_fwd(&xf, rows, n, &wf, 1e-6);
        assert_close("rms_norm y", &to_f64(&y32), &y64, tol);
        assert_close("rms_norm rstd", &to_f64(&r32), &r64, tol);

        let (y64, m64, r64) = layer_norm_fwd(&x, rows, n, &w, &b, 1e-5);
        let (y32, m32, r32) = layer_norm_fwd(&xf, rows, n, &wf, &bf, 1e-5);
        assert_close("layer_norm y", &to_f64(&y32), &y64, tol);
        assert_close("layer_norm mean", &to_f64(&m32), &m64, tol);
        assert_close("layer_norm rstd", &to_f64(&r32), &r64, tol);

        let (l64, s64) = cross_entropy_fwd(&logits, rows, vocab, &targets);
        let (l32, s32) = cross_entropy_fwd(&to_f32(&logits), rows, vocab, &targets);
        assert_close("cross_entropy loss", &[l32 as f64], &[l64], tol);
        assert_close("cross_entropy lse", &to_f64(&s32), &s64, tol);

        let e64 = embedding_fwd(&table, vocab, n, &ids);
        let e32 = embedding_fwd(&to_f32(&table), vocab, n, &ids);
        assert_close("embedding", &to_f64(&e32), &e64, tol);
    }

    /// Runs `f` on a rayon pool of `threads` threads.
    fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a test thread pool")
            .install(f)
    }

    /// Every output of every non-GEMM kernel, on inputs large enough to run in parallel.
    fn all_outputs(threads: usize) -> Vec<Vec<f32>> {
        let mut g = Lcg(8);
        let (rows, n, vocab) = (300, 130, 150);
        let x = to_f32(&g.vec(rows * n));
        let (w, b, dy) = (
            to_f32(&g.vec(n)),
            to_f32(&g.vec(n)),
            to_f32(&g.vec(rows * n)),
        );
        let logits = to_f32(&g.vec(rows * vocab));
        let targets = g.ids(rows, vocab as u32);
        let table = to_f32(&g.vec(vocab * n));
        on_threads(threads, || {
            let (y, rstd) = rms_norm_fwd(&x, rows, n, &w, 1e-6);
            let (dx, dw) = rms_norm_bwd(&x, rows, n, &w, &rstd, &dy);
            let (ly, mean, lrstd) = layer_norm_fwd(&x, rows, n, &w, &b, 1e-5);
            let (ldx, ldw, ldb) = layer_norm_bwd(&x, rows, n, &w, &mean, &lrstd, &dy);
            let (loss, lse) = cross_entropy_fwd(&logits, rows, vocab, &targets);
            let dlogits = cross_entropy_bwd(&logits, rows, vocab, &targets, &lse, 1.0);
            let emb = embedding_fwd(&table, vocab, n, &targets);
            let dtable = embedding_bwd(&targets, &dy, vocab, n);
            let db = column_sums::<f32>(rows, n, |r, first, acc| {
                for (a, &d) in acc.iter_mut().zip(&dy[r * n + first..]) {
                    *a += f64::from(d);
                }
            });
            vec![
                y,
                rstd,
                dx,
                dw,
                ly,
                mean,
                lrstd,
                ldx,
                ldw,
                ldb,
                vec![loss],
                lse,
                dlogits,
                emb,
                dtable,
                db,
            ]
        })
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let one = all_outputs(1);
        for threads in [2, 3] {
            for (i, (a, b)) in one.iter().zip(&all_outputs(threads)).enumerate() {
                let same =
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "output {i} differs between 1 and {threads} threads");
            }
        }
    }
}
