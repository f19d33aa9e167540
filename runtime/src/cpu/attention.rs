//! Rotary position embeddings (plain and YaRN, both pair layouts) and causal attention.
//!
//! RoPE follows HF transformers' Llama and DeepSeek-V3 models: frequency `i` of a head of `dim`
//! rotated dimensions is `theta^(-2i/dim)`, and YaRN blends interpolated and extrapolated
//! frequencies over DeepSeek's correction range and scales the cos/sin tables by its amplitude.
//! Attention is causal softmax attention with grouped key/value heads, computed in tiles with an
//! online softmax in the style of FlashAttention; its backward recomputes the probabilities from
//! the saved log-sum-exp.

use rayon::prelude::*;

use super::simd;
use super::Real;

/// Query rows per tile of the attention forward and backward. Tall tiles amortize the packing
/// of each key/value block over many rows of the tile products.
const BLOCK_Q: usize = 128;
/// Keys per block of the attention forward and backward. Narrow blocks waste little work on
/// the masked half of the blocks on the diagonal.
const BLOCK_K: usize = 32;
/// Key blocks per span of the attention forward's online softmax: the running maximum and sum
/// of a row are updated once per span of `SPAN_BLOCKS · BLOCK_K` keys.
const SPAN_BLOCKS: usize = 8;

/// YaRN's parameters: the checked model's own type, whose methods hold the formulas (the
/// correction range, the cos/sin amplitude) so the compiler and the runtime share one copy.
pub use kiln_ir::attrs::Yarn;

/// Which dimensions of a head RoPE rotates together: the IR's own `RopePairs`.
pub use kiln_ir::ir::RopePairs;

/// The two dimensions of pair `i` in a head of `2 · half` dimensions.
fn pair(pairs: RopePairs, i: usize, half: usize) -> (usize, usize) {
    match pairs {
        RopePairs::Halves => (i, i + half),
        RopePairs::Interleaved => (2 * i, 2 * i + 1),
    }
}

/// Precomputed rotations: `cos` and `sin` are `[seq, half]`, entry `[t, i]` being the cosine
/// and sine of position `t`'s angle under frequency `i`, times the YaRN amplitude if any.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTables<T> {
    pub cos: Vec<T>,
    pub sin: Vec<T>,
    /// The number of positions the tables cover.
    pub seq: usize,
    /// The number of frequencies, half the rotated dimensions of a head.
    pub half: usize,
}

/// The `dim / 2` inverse frequencies of RoPE, in f64: `theta^(-2i/dim)`, or under YaRN the blend
/// `inv_freq / factor · (1 − mask) + inv_freq · mask` where `mask = 1 − ramp` and `ramp` rises
/// linearly from 0 at the correction range's `low` to 1 at its `high`. `dim` is even.
pub fn rope_inv_freq(dim: usize, theta: f64, yarn: Option<&Yarn>) -> Vec<f64> {
    debug_assert!(dim % 2 == 0, "rope: rotated dims {dim} must be even");
    let plain = (0..dim / 2).map(|i| theta.powf(-((2 * i) as f64) / dim as f64));
    let Some(y) = yarn else {
        return plain.collect();
    };
    let (low, high) = y.correction_range(dim, theta);
    // An empty range would divide by zero; the reference widens it by a thousandth.
    let high = if high == low { high + 0.001 } else { high };
    plain
        .enumerate()
        .map(|(i, extrapolated)| {
            let interpolated = extrapolated / y.factor;
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let mask = 1.0 - ramp;
            interpolated * (1.0 - mask) + extrapolated * mask
        })
        .collect()
}

/// Builds the cos/sin tables of RoPE for positions `0..seq` of a head with `dim` rotated
/// dimensions (even): the angle of position `t` under frequency `i` is `t · inv_freq_i` (see
/// [`rope_inv_freq`]), computed in f64 and cast to `T` after scaling by the YaRN amplitude.
pub fn rope_tables<T: Real>(
    seq: usize,
    dim: usize,
    theta: f64,
    yarn: Option<&Yarn>,
) -> RopeTables<T> {
    let inv_freq = rope_inv_freq(dim, theta, yarn);
    let amplitude = yarn.map_or(1.0, Yarn::rope_amplitude);
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for t in 0..seq {
        for &f in &inv_freq {
            let angle = t as f64 * f;
            cos.push(T::from_f64(amplitude * angle.cos()));
            sin.push(T::from_f64(amplitude * angle.sin()));
        }
    }
    RopeTables {
        cos,
        sin,
        seq,
        half,
    }
}

/// Applies RoPE: `x: [b, t, h, d]` → `[b, t, h, d]`, every head of position `p` rotating each
/// pair `(a, b)` of `pairs` under frequency `i` to `(a·cos − b·sin, a·sin + b·cos)` with the
/// tables' entries `[p, i]`. `d = 2 · tables.half` and `t ≤ tables.seq`.
#[allow(clippy::too_many_arguments)]
pub fn rope_fwd<T: Real>(
    x: &[T],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    tables: &RopeTables<T>,
    pairs: RopePairs,
) -> Vec<T> {
    rotate(x, b, t, h, d, tables, pairs, false)
}

/// The backward of [`rope_fwd`]: `dy: [b, t, h, d]` → `dx: [b, t, h, d]`, the transposed
/// rotation `(a, b)` → `(a·cos + b·sin, −a·sin + b·cos)`. Without a YaRN amplitude this is
/// also the inverse rotation.
#[allow(clippy::too_many_arguments)]
pub fn rope_bwd<T: Real>(
    dy: &[T],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    tables: &RopeTables<T>,
    pairs: RopePairs,
) -> Vec<T> {
    rotate(dy, b, t, h, d, tables, pairs, true)
}

/// Rotates every head of `x: [b, t, h, d]` by the tables' rotation of its position, or by the
/// transpose of that rotation when `transpose` is set.
#[allow(clippy::too_many_arguments)]
fn rotate<T: Real>(
    x: &[T],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    tables: &RopeTables<T>,
    pairs: RopePairs,
    transpose: bool,
) -> Vec<T> {
    debug_assert_eq!(
        x.len(),
        b * t * h * d,
        "rope: x is not [{b}, {t}, {h}, {d}]"
    );
    debug_assert_eq!(
        d,
        2 * tables.half,
        "rope: head dim {d} is not twice the tables' half"
    );
    debug_assert!(
        t <= tables.seq,
        "rope: {t} positions exceed the tables' {}",
        tables.seq
    );
    let half = tables.half;
    let mut y = vec![T::ZERO; x.len()];
    let row = h * d;
    if row == 0 {
        return y;
    }
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .for_each(|(r, (y_row, x_row))| {
            // Rows are (batch, position) pairs, so the position is the row index modulo `t`.
            let p = r % t;
            let cos = &tables.cos[p * half..][..half];
            let sin = &tables.sin[p * half..][..half];
            rotate_row(y_row, x_row, d, cos, sin, pairs, transpose);
        });
    y
}

/// Rotates every head (of `d` dimensions) of one row with one position's `cos`/`sin`.
fn rotate_row<T: Real>(
    y_row: &mut [T],
    x_row: &[T],
    d: usize,
    cos: &[T],
    sin: &[T],
    pairs: RopePairs,
    transpose: bool,
) {
    let half = d / 2;
    for (yh, xh) in y_row.chunks_exact_mut(d).zip(x_row.chunks_exact(d)) {
        for i in 0..half {
            let (ia, ib) = pair(pairs, i, half);
            let (a, bb) = (xh[ia], xh[ib]);
            let c = cos[i];
            let s = if transpose { -sin[i] } else { sin[i] };
            yh[ia] = a * c - bb * s;
            yh[ib] = a * s + bb * c;
        }
    }
}

/// [`rope_fwd`] for one row of heads at position `pos` (`x: [h, d]`), in place: what a
/// decoder applies to the one new token of a sequence. The same arithmetic as `rope_fwd`.
pub fn rope_row<T: Real>(
    x: &mut [T],
    d: usize,
    tables: &RopeTables<T>,
    pos: usize,
    pairs: RopePairs,
) {
    debug_assert!(
        pos < tables.seq,
        "rope: position {pos} beyond the tables' {}",
        tables.seq
    );
    let half = tables.half;
    let (cos, sin) = (
        &tables.cos[pos * half..][..half],
        &tables.sin[pos * half..][..half],
    );
    let src = x.to_vec();
    rotate_row(x, &src, d, cos, sin, pairs, false);
}

/// The shapes of an attention call: batch `b`, sequence `t`, query heads `h`, key/value heads
/// `hk` (dividing `h`), query/key dims `dk` and value dims `dv`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    hk: usize,
    dk: usize,
    dv: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.hk
    }

    /// The offset of query head `hh`'s row at position `i` of batch `bi` in a `[b, t, h, w]`
    /// tensor.
    fn q_row(&self, bi: usize, i: usize, hh: usize, w: usize) -> usize {
        ((bi * self.t + i) * self.h + hh) * w
    }

    /// The offset of key/value head `kvh`'s row at position `j` of batch `bi` in a
    /// `[b, t, hk, w]` tensor.
    fn kv_row(&self, bi: usize, j: usize, kvh: usize, w: usize) -> usize {
        ((bi * self.t + j) * self.hk + kvh) * w
    }

    /// Checks the operands' lengths in debug builds.
    fn debug_check<T>(&self, q: &[T], k: &[T], v: &[T]) {
        let Dims {
            b,
            t,
            h,
            hk,
            dk,
            dv,
        } = *self;
        debug_assert!(
            h == 0 || (hk > 0 && h % hk == 0),
            "attention: {hk} kv heads do not divide {h} heads"
        );
        debug_assert_eq!(
            q.len(),
            b * t * h * dk,
            "attention: q is not [{b}, {t}, {h}, {dk}]"
        );
        debug_assert_eq!(
            k.len(),
            b * t * hk * dk,
            "attention: k is not [{b}, {t}, {hk}, {dk}]"
        );
        debug_assert_eq!(
            v.len(),
            b * t * hk * dv,
            "attention: v is not [{b}, {t}, {hk}, {dv}]"
        );
    }
}

/// The dot product of two equally long slices, summed in a fixed order over eight lanes so that
/// it vectorizes and stays deterministic.
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [T::ZERO; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = T::ZERO;
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        + tail
}

/// The sum of a slice, over eight lanes in a fixed order so that it vectorizes and stays
/// deterministic.
fn lane_sum<T: Real>(x: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let x8 = x.chunks_exact(8);
    let mut tail = T::ZERO;
    for &y in x8.remainder() {
        tail += y;
    }
    for y in x8 {
        for l in 0..8 {
            lanes[l] += y[l];
        }
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        + tail
}

/// The largest element of a slice (−∞ for an empty one), over eight lanes so that it
/// vectorizes; a maximum is exact, so the order does not change it. Like `max`, it skips NaNs.
fn lane_max<T: Real>(x: &[T]) -> T {
    let mut lanes = [T::NEG_INFINITY; 8];
    let x8 = x.chunks_exact(8);
    let mut tail = T::NEG_INFINITY;
    for &y in x8.remainder() {
        tail = tail.max(y);
    }
    for y in x8 {
        for l in 0..8 {
            if y[l] > lanes[l] {
                lanes[l] = y[l];
            }
        }
    }
    lanes.iter().fold(tail, |a, &y| a.max(y))
}

/// A read-only matrix inside a slice: element `(r, c)` is `data[offset + r · rs + c · cs]`.
/// The strides let a tile product read the rows of one head straight out of a `[b, t, h, d]`
/// tensor, and read a stored matrix transposed by swapping them.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    /// The rows of `data` from `offset` on, `rs` elements apart, each stored contiguously.
    fn rows(data: &'a [T], offset: usize, rs: usize) -> Self {
        View {
            data,
            offset,
            rs,
            cs: 1,
        }
    }

    /// The same elements read as the transposed matrix.
    fn t(self) -> Self {
        View {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Panics unless every element of a `rows × cols` matrix (both positive) lies in the slice,
    /// which is what makes handing the view's pointer to `gemm` sound.
    fn check(&self, rows: usize, cols: usize) {
        let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "attention: a {rows}×{cols} tile reaches past its operand"
        );
    }
}

/// `c[m, n] = (accumulate ? c : 0) + alpha · a[m, k] · b[k, n]`, with `c` row-major of row
/// stride `ldc`, on the calling thread.
///
/// The attention kernels parallelize over (batch, head, block) tasks themselves, so their tile
/// products run serially (`gemm::Parallelism::None`): nesting rayon-parallel products inside
/// rayon tasks would oversubscribe the workers, and a serial product's arithmetic depends only
/// on its shape, which keeps the results independent of the thread count.
#[allow(clippy::too_many_arguments)]
fn gemm_serial<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    a: View<'_, T>,
    b: View<'_, T>,
    alpha: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && (m - 1) * ldc + n <= c.len(),
        "attention: a {m}×{n} tile does not fit its output"
    );
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(T::ZERO);
            }
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    // SAFETY: the checks above keep every element the strides address inside its slice, `c`
    // does not alias `a` or `b` (it is borrowed mutably while they are borrowed shared), and
    // `T` is f32 or f64, which `gemm` supports. `gemm` computes
    // `dst = alpha · dst + beta · lhs · rhs`, reading `dst` only when asked to.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Splits `x` into `b` equally long consecutive parts, one per batch element; unlike
/// `chunks_mut`, this also works when the parts are empty.
fn split_batches<T>(x: &mut [T], b: usize) -> Vec<&mut [T]> {
    let len = x.len() / b;
    let mut parts = Vec::with_capacity(b);
    let mut rest = x;
    for _ in 0..b {
        let (part, tail) = rest.split_at_mut(len);
        parts.push(part);
        rest = tail;
    }
    parts
}

/// Causal attention forward: `q: [b, t, h, dk]`, `k: [b, t, hk, dk]`, `v: [b, t, hk, dv]` →
/// `(o: [b, t, h, dv], lse: [b, h, t])` with `o_i = Σ_{j ≤ i} softmax_j(scale · q_i·k_j) v_j`,
/// query head `hh` reading key/value head `hh / (h / hk)`, and `lse_i` the log-sum-exp of the
/// scaled scores of query `i` (which the backward needs).
///
/// Tiled: each task takes `BLOCK_Q` (128) query rows of one (batch, head) and walks the keys
/// in spans of `SPAN_BLOCKS · BLOCK_K` (256) with an online softmax (a running maximum and sum
/// per row, the accumulator rescaled when the maximum grows), so it holds one span of scores
/// per row at a time. A span's scores and its contribution to the output are tile products on
/// `gemm`, one per key block of `BLOCK_K` (32), each skipping the rows before its first key.
/// Tasks run on rayon and each computes in a fixed order with serial products, so the result
/// does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    t: usize,
    h: usize,
    hk: usize,
    dk: usize,
    dv: usize,
    scale: f64,
) -> (Vec<T>, Vec<T>) {
    let dims = Dims {
        b,
        t,
        h,
        hk,
        dk,
        dv,
    };
    fwd_tiled(q, k, v, dims, scale, BLOCK_Q, BLOCK_K)
}

/// [`attention_fwd`] with explicit tile sizes: `bq` query rows per task, `bk` keys per block.
fn fwd_tiled<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    scale: f64,
    bq: usize,
    bk: usize,
) -> (Vec<T>, Vec<T>) {
    dims.debug_check(q, k, v);
    let Dims {
        b,
        t,
        h,
        hk,
        dk,
        dv,
    } = dims;
    let mut o = vec![T::ZERO; b * t * h * dv];
    let mut lse = vec![T::ZERO; b * h * t];
    if b * h * t == 0 {
        return (o, lse);
    }
    let group = dims.group();
    let scale = T::from_f64(scale);
    let tiles = t.div_ceil(bq);
    let results: Vec<(Vec<T>, Vec<T>)> = (0..b * h * tiles)
        .into_par_iter()
        .map(|task| {
            let (bh, tile) = (task / tiles, task % tiles);
            let (bi, hh) = (bh / h, bh % h);
            let kvh = hh / group;
            let i0 = tile * bq;
            let i1 = (i0 + bq).min(t);
            let rows = i1 - i0;
            // The unnormalized output, running maximum and running sum of each row.
            let mut acc = vec![T::ZERO; rows * dv];
            let mut max = vec![T::NEG_INFINITY; rows];
            let mut sum = vec![T::ZERO; rows];
            // The scores of one span of `width` keys (`SPAN_BLOCKS` key blocks) for every row,
            // overwritten in place by their probabilities. The online softmax steps once per
            // span, so its per-row work (maximum, rescaling, sum) is spread over many keys,
            // while the products still go block by block and skip the rows that precede a
            // block's first key.
            let width = bk * SPAN_BLOCKS;
            let mut scores = vec![T::ZERO; rows * width.min(i1)];
            // Causality: the tile's last query sees keys up to `i1 − 1`.
            for w0 in (0..i1).step_by(width) {
                let w1 = (w0 + width).min(i1);
                let span = w1 - w0;
                // Row `r0` is the first that sees key `j0`: rows before it see none of the
                // block, so the block's products start there.
                let first_row = |j0: usize| j0.saturating_sub(i0);
                for j0 in (w0..w1).step_by(bk) {
                    let j1 = (j0 + bk).min(w1);
                    let r0 = first_row(j0);
                    // `scores[r, j − w0] = scale · q_{i0+r} · k_j` for the block's keys `j`.
                    gemm_serial(
                        rows - r0,
                        j1 - j0,
                        dk,
                        &mut scores[r0 * span + (j0 - w0)..],
                        span,
                        false,
                        View::rows(q, dims.q_row(bi, i0 + r0, hh, dk), h * dk),
                        View::rows(k, dims.kv_row(bi, j0, kvh, dk), hk * dk).t(),
                        scale,
                    );
                }
                // Rows before the span's first key see none of it.
                for (r, s_row) in scores
                    .chunks_exact_mut(span)
                    .enumerate()
                    .take(rows)
                    .skip(first_row(w0))
                {
                    // Row `i` sees the span's keys up to `i`; the rest are its future (and
                    // hold no scores where their block's product skipped the row).
                    let (seen, future) = s_row.split_at_mut(w1.min(i0 + r + 1) - w0);
                    let span_max = lane_max(seen);
                    // When the maximum grows, the accumulator and the sum so far shrink by
                    // `alpha`; otherwise `alpha` would be exactly 1, and the rescaling is
                    // skipped. The first span of a row has a maximum of −∞ before it, so its
                    // `alpha` is 0 (on an accumulator and sum that are still 0).
                    if span_max > max[r] {
                        let alpha = (max[r] - span_max).exp();
                        for a in &mut acc[r * dv..][..dv] {
                            *a *= alpha;
                        }
                        sum[r] *= alpha;
                        max[r] = span_max;
                    }
                    let new_max = max[r];
                    // The exponentials first and their sum apart: a running sum in the same
                    // loop would chain every iteration through the previous one's addition
                    // across the calls to `exp`.
                    simd::exp_shifted(seen, new_max);
                    sum[r] += lane_sum(seen);
                    // Future keys weigh nothing.
                    future.fill(T::ZERO);
                }
                for j0 in (w0..w1).step_by(bk) {
                    let j1 = (j0 + bk).min(w1);
                    let r0 = first_row(j0);
                    // `acc[r0.., :] += p[r0.., block] · v_{j0..j1}`.
                    gemm_serial(
                        rows - r0,
                        dv,
                        j1 - j0,
                        &mut acc[r0 * dv..],
                        dv,
                        true,
                        View {
                            data: &scores,
                            offset: r0 * span + (j0 - w0),
                            rs: span,
                            cs: 1,
                        },
                        View::rows(v, dims.kv_row(bi, j0, kvh, dv), hk * dv),
                        T::ONE,
                    );
                }
            }
            let mut tile_lse = vec![T::ZERO; rows];
            for r in 0..rows {
                let inv = T::ONE / sum[r];
                for a in &mut acc[r * dv..][..dv] {
                    *a *= inv;
                }
                tile_lse[r] = max[r] + sum[r].ln();
            }
            (acc, tile_lse)
        })
        .collect();
    // Scatter the tiles into place, one batch element per rayon task.
    split_batches(&mut o, b)
        .into_par_iter()
        .zip(split_batches(&mut lse, b))
        .zip(results.par_chunks(h * tiles))
        .for_each(|((o_b, lse_b), tasks)| {
            for (task, (acc, tile_lse)) in tasks.iter().enumerate() {
                let (hh, tile) = (task / tiles, task % tiles);
                let i0 = tile * bq;
                lse_b[hh * t + i0..][..tile_lse.len()].copy_from_slice(tile_lse);
                for (r, row) in acc.chunks_exact(dv.max(1)).enumerate() {
                    let at = dims.q_row(0, i0 + r, hh, dv);
                    o_b[at..at + dv].copy_from_slice(row);
                }
            }
        });
    (o, lse)
}

/// Causal attention backward: from the forward's operands `q: [b, t, h, dk]`,
/// `k: [b, t, hk, dk]`, `v: [b, t, hk, dv]`, its results `o: [b, t, h, dv]` and
/// `lse: [b, h, t]`, and the output gradient `d_o: [b, t, h, dv]`, computes
/// `(dq: [b, t, h, dk], dk: [b, t, hk, dk], dv: [b, t, hk, dv])`.
///
/// FlashAttention style: the probabilities `p_ij = exp(scale · q_i·k_j − lse_i)` are
/// recomputed tile by tile; with `delta_i = d_o_i·o_i` and `ds_ij = p_ij (d_o_i·v_j −
/// delta_i)`, `dq_i = scale Σ_j ds_ij k_j`, `dk_j = scale Σ_i ds_ij q_i` and
/// `dv_j = Σ_i p_ij d_o_i`, the sums of a key/value head running over its whole query-head
/// group. Every tile's products run on `gemm`. Tasks are (batch, query head) pairs that walk
/// the key blocks and, under each, the query blocks in a fixed order; each yields its head's
/// query gradient and its share of the key/value gradients, which are then summed over the
/// group's heads in head order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    b: usize,
    t: usize,
    h: usize,
    hk: usize,
    dk: usize,
    dv: usize,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let dims = Dims {
        b,
        t,
        h,
        hk,
        dk,
        dv,
    };
    bwd_tiled(q, k, v, o, lse, d_o, dims, scale, BLOCK_Q, BLOCK_K)
}

/// [`attention_bwd`] with explicit tile sizes: `bq` queries and `bk` keys.
#[allow(clippy::too_many_arguments)]
fn bwd_tiled<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    dims: Dims,
    scale: f64,
    bq: usize,
    bk: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    dims.debug_check(q, k, v);
    let Dims {
        b,
        t,
        h,
        hk,
        dk,
        dv,
    } = dims;
    debug_assert_eq!(
        o.len(),
        b * t * h * dv,
        "attention: o is not [{b}, {t}, {h}, {dv}]"
    );
    debug_assert_eq!(
        d_o.len(),
        o.len(),
        "attention: d_o is not [{b}, {t}, {h}, {dv}]"
    );
    debug_assert_eq!(
        lse.len(),
        b * h * t,
        "attention: lse is not [{b}, {h}, {t}]"
    );
    let mut grad_q = vec![T::ZERO; q.len()];
    let mut grad_k = vec![T::ZERO; k.len()];
    let mut grad_v = vec![T::ZERO; v.len()];
    if b * h * t == 0 {
        return (grad_q, grad_k, grad_v);
    }
    let group = dims.group();
    let scale = T::from_f64(scale);
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..b * h)
        .into_par_iter()
        .map(|task| {
            let (bi, hh) = (task / h, task % h);
            let kvh = hh / group;
            let stats = task * t;
            let lse = &lse[stats..][..t];
            // `delta_i = d_o_i·o_i`, the softmax's correction term of each query.
            let delta: Vec<T> = (0..t)
                .map(|i| {
                    let row = dims.q_row(bi, i, hh, dv);
                    dot(&d_o[row..][..dv], &o[row..][..dv])
                })
                .collect();
            // The head's query gradient `[t, dk]` and its shares `[t, dk]`, `[t, dv]` of the
            // key/value head's gradients.
            let mut gq = vec![T::ZERO; t * dk];
            let mut gk = vec![T::ZERO; t * dk];
            let mut gv = vec![T::ZERO; t * dv];
            // One tile of probabilities and one of their gradients.
            let mut p = vec![T::ZERO; bq * bk];
            let mut ds = vec![T::ZERO; bq * bk];
            let q_at = |i: usize| View::rows(q, dims.q_row(bi, i, hh, dk), h * dk);
            let do_at = |i: usize| View::rows(d_o, dims.q_row(bi, i, hh, dv), h * dv);
            let k_at = |j: usize| View::rows(k, dims.kv_row(bi, j, kvh, dk), hk * dk);
            let v_at = |j: usize| View::rows(v, dims.kv_row(bi, j, kvh, dv), hk * dv);
            for j0 in (0..t).step_by(bk) {
                let j1 = (j0 + bk).min(t);
                let n = j1 - j0;
                // Causality: only the queries from `j0` on see the block, so the walk starts
                // at the query block holding `j0`, and within it at row `j0`.
                for block in ((j0 / bq) * bq..t).step_by(bq) {
                    let i0 = block.max(j0);
                    let i1 = (block + bq).min(t);
                    let m = i1 - i0;
                    let (p, ds) = (&mut p[..m * n], &mut ds[..m * n]);
                    // `p[r, jj] = exp(scale · q_{i0+r}·k_{j0+jj} − lse_{i0+r})`, zero for
                    // future keys.
                    gemm_serial(m, n, dk, p, n, false, q_at(i0), k_at(j0).t(), scale);
                    for (r, p_row) in p.chunks_exact_mut(n).enumerate() {
                        let i = i0 + r;
                        let seen = j1.min(i + 1) - j0;
                        simd::exp_shifted(&mut p_row[..seen], lse[i]);
                        p_row[seen..].fill(T::ZERO);
                    }
                    // `dv_{j0..j1} += pᵀ · d_o_{i0..i1}`.
                    gemm_serial(
                        n,
                        dv,
                        m,
                        &mut gv[j0 * dv..],
                        dv,
                        true,
                        View::rows(p, 0, n).t(),
                        do_at(i0),
                        T::ONE,
                    );
                    // `ds[r, jj] = d_o_{i0+r}·v_{j0+jj}`, then the score gradient with the
                    // softmax scale folded in: `scale · p (ds − delta)`.
                    gemm_serial(m, n, dv, ds, n, false, do_at(i0), v_at(j0).t(), T::ONE);
                    for (r, (ds_row, p_row)) in
                        ds.chunks_exact_mut(n).zip(p.chunks_exact(n)).enumerate()
                    {
                        let delta_i = delta[i0 + r];
                        for (d, &x) in ds_row.iter_mut().zip(p_row) {
                            *d = scale * x * (*d - delta_i);
                        }
                    }
                    // `dq_{i0..i1} += ds · k_{j0..j1}` and `dk_{j0..j1} += dsᵀ · q_{i0..i1}`.
                    gemm_serial(
                        m,
                        dk,
                        n,
                        &mut gq[i0 * dk..],
                        dk,
                        true,
                        View::rows(ds, 0, n),
                        k_at(j0),
                        T::ONE,
                    );
                    gemm_serial(
                        n,
                        dk,
                        m,
                        &mut gk[j0 * dk..],
                        dk,
                        true,
                        View::rows(ds, 0, n).t(),
                        q_at(i0),
                        T::ONE,
                    );
                }
            }
            (gq, gk, gv)
        })
        .collect();
    // Gather the heads' gradients, one batch element per rayon task; a key/value head sums
    // the shares of its group's query heads in head order.
    split_batches(&mut grad_q, b)
        .into_par_iter()
        .zip(split_batches(&mut grad_k, b))
        .zip(split_batches(&mut grad_v, b))
        .zip(results.par_chunks(h))
        .for_each(|(((gq_b, gk_b), gv_b), heads)| {
            for (hh, (gq, gk, gv)) in heads.iter().enumerate() {
                let kvh = hh / group;
                for i in 0..t {
                    let at = dims.q_row(0, i, hh, dk);
                    gq_b[at..at + dk].copy_from_slice(&gq[i * dk..][..dk]);
                    let at = dims.kv_row(0, i, kvh, dk);
                    for (a, &x) in gk_b[at..at + dk].iter_mut().zip(&gk[i * dk..][..dk]) {
                        *a += x;
                    }
                    let at = dims.kv_row(0, i, kvh, dv);
                    for (a, &x) in gv_b[at..at + dv].iter_mut().zip(&gv[i * dv..][..dv]) {
                        *a += x;
                    }
                }
            }
        });
    (grad_q, grad_k, grad_v)
}

/// RoPE of rows at their own positions (decoding): `x: [rows, h, d]`, row `r` rotated by the
/// angle of `positions[r]` (which the tables must cover).
pub fn rope_at<T: Real>(
    x: &[T],
    d: usize,
    positions: &[u32],
    tables: &RopeTables<T>,
    pairs: RopePairs,
) -> Vec<T> {
    let mut y = x.to_vec();
    let row = x.len() / positions.len().max(1);
    for (r, &pos) in positions.iter().enumerate() {
        rope_row(
            &mut y[r * row..(r + 1) * row],
            d,
            tables,
            pos as usize,
            pairs,
        );
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng::Rng;

    /// Uniform values in [−1, 1).
    fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| 2.0 * rng.next_f64() - 1.0).collect()
    }

    fn to_f32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The largest difference relative to the largest magnitude of the reference.
    fn scaled_error(got: &[f64], want: &[f64]) -> f64 {
        let norm = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
        max_abs_diff(got, want) / norm.max(1e-300)
    }

    fn deepseek_yarn() -> Yarn {
        Yarn {
            factor: 40.0,
            original_max_positions: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        }
    }

    #[test]
    fn plain_tables_are_cos_and_sin_of_position_times_frequency() {
        let (seq, dim, theta) = (37, 16, 10_000.0);
        let tables = rope_tables::<f64>(seq, dim, theta, None);
        assert_eq!((tables.seq, tables.half), (seq, dim / 2));
        assert_eq!(tables.cos.len(), seq * dim / 2);
        for p in 0..seq {
            for i in 0..dim / 2 {
                let angle = p as f64 / theta.powf(2.0 * i as f64 / dim as f64);
                assert!((tables.cos[p * dim / 2 + i] - angle.cos()).abs() < 1e-12);
                assert!((tables.sin[p * dim / 2 + i] - angle.sin()).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn yarn_with_factor_one_is_plain_rope() {
        let yarn = Yarn {
            factor: 1.0,
            mscale: 0.5,
            mscale_all_dim: 2.0,
            ..deepseek_yarn()
        };
        assert_eq!(yarn.rope_amplitude(), 1.0);
        let plain = rope_tables::<f64>(50, 64, 10_000.0, None);
        let scaled = rope_tables::<f64>(50, 64, 10_000.0, Some(&yarn));
        assert!(max_abs_diff(&plain.cos, &scaled.cos) < 1e-13);
        assert!(max_abs_diff(&plain.sin, &scaled.sin) < 1e-13);
    }

    #[test]
    fn yarn_amplitude_is_one_when_the_mscales_agree() {
        let yarn = Yarn {
            mscale: 0.707,
            mscale_all_dim: 0.707,
            ..deepseek_yarn()
        };
        assert_eq!(yarn.rope_amplitude(), 1.0);
        let tables = rope_tables::<f64>(20, 64, 10_000.0, Some(&yarn));
        for (c, s) in tables.cos.iter().zip(&tables.sin) {
            assert!((c * c + s * s - 1.0).abs() < 1e-14);
        }
        // With unequal coefficients the tables carry the ratio of the two corrections.
        let unequal = Yarn {
            mscale: 0.5,
            ..deepseek_yarn()
        };
        let amp = (0.05 * 40f64.ln() + 1.0) / (0.1 * 40f64.ln() + 1.0);
        assert!((unequal.rope_amplitude() - amp).abs() < 1e-15);
        let tables = rope_tables::<f64>(20, 64, 10_000.0, Some(&unequal));
        for (c, s) in tables.cos.iter().zip(&tables.sin) {
            assert!(((c * c + s * s).sqrt() - amp).abs() < 1e-14);
        }
    }

    #[test]
    fn deepseek_v3_yarn_keeps_fast_frequencies_and_divides_slow_ones() {
        let yarn = deepseek_yarn();
        let (dim, theta) = (64usize, 10_000.0f64);
        // The correction range from its definition: the index whose wavelength fits `r`
        // rotations into the 4096 original positions is 64 · ln(4096 / 2πr) / (2 ln 10000).
        let index =
            |r: f64| 64.0 * (4096.0 / (2.0 * std::f64::consts::PI * r)).ln() / (2.0 * theta.ln());
        let (low, high) = (index(32.0).floor(), index(1.0).ceil());
        // By hand: index(32) = 64 · ln 20.37 / 18.42 ≈ 10.47 and index(1) ≈ 22.51.
        assert_eq!((low, high), (10.0, 23.0));
        assert_eq!(yarn.correction_range(dim, theta), (low, high));
        let plain = rope_inv_freq(dim, theta, None);
        let scaled = rope_inv_freq(dim, theta, Some(&yarn));
        for i in 0..dim / 2 {
            let (p, s) = (plain[i], scaled[i]);
            if (i as f64) <= low {
                assert_eq!(s, p, "frequency {i} is extrapolated");
            } else if (i as f64) >= high {
                assert!(
                    (s - p / 40.0).abs() <= 1e-15 * p,
                    "frequency {i} is interpolated"
                );
            } else {
                // In between, the blend is linear in the index.
                let ramp = (i as f64 - low) / (high - low);
                let want = p / 40.0 * ramp + p * (1.0 - ramp);
                assert!((s - want).abs() <= 1e-14 * p, "frequency {i} is blended");
                assert!(s < p && s > p / 40.0);
            }
        }
        let tables = rope_tables::<f64>(3, dim, theta, Some(&yarn));
        assert!((tables.cos[32 + 31] - (1.0 * plain[31] / 40.0).cos()).abs() < 1e-15);
        assert!((tables.sin[64 + 5] - (2.0 * plain[5]).sin()).abs() < 1e-15);
    }

    #[test]
    fn yarn_guards_an_empty_correction_range() {
        // A tiny original context puts both ends of the range at index 0.
        let yarn = Yarn {
            original_max_positions: 1,
            ..deepseek_yarn()
        };
        assert_eq!(yarn.correction_range(8, 10_000.0), (0.0, 0.0));
        let plain = rope_inv_freq(8, 10_000.0, None);
        let scaled = rope_inv_freq(8, 10_000.0, Some(&yarn));
        assert_eq!(scaled[0], plain[0]);
        for i in 1..4 {
            assert!((scaled[i] - plain[i] / 40.0).abs() < 1e-15);
        }
    }

    const PAIRS: [RopePairs; 2] = [RopePairs::Halves, RopePairs::Interleaved];

    #[test]
    fn rope_backward_undoes_the_forward() {
        let mut rng = Rng::new(1);
        let (b, t, h, d) = (2, 9, 3, 8);
        let x = random(&mut rng, b * t * h * d);
        let tables = rope_tables::<f64>(t + 3, d, 500.0, Some(&deepseek_yarn()));
        for pairs in PAIRS {
            let y = rope_fwd(&x, b, t, h, d, &tables, pairs);
            assert!(max_abs_diff(&y, &x) > 0.1);
            let back = rope_bwd(&y, b, t, h, d, &tables, pairs);
            assert!(max_abs_diff(&back, &x) < 1e-14, "{pairs:?}");
        }
    }

    #[test]
    fn rope_backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (b, t, h, d) = (2, 4, 2, 6);
        let x = random(&mut rng, b * t * h * d);
        let w = random(&mut rng, x.len());
        // An amplitude below 1 makes the transpose differ from the inverse.
        let yarn = Yarn {
            mscale: 0.3,
            ..deepseek_yarn()
        };
        let tables = rope_tables::<f64>(t, d, 10.0, Some(&yarn));
        for pairs in PAIRS {
            let loss = |x: &[f64]| -> f64 {
                let y = rope_fwd(x, b, t, h, d, &tables, pairs);
                y.iter().zip(&w).map(|(a, b)| a * b).sum()
            };
            let grad = rope_bwd(&w, b, t, h, d, &tables, pairs);
            let eps = 1e-6;
            let fd: Vec<f64> = (0..x.len())
                .map(|n| {
                    let (mut up, mut down) = (x.clone(), x.clone());
                    up[n] += eps;
                    down[n] -= eps;
                    (loss(&up) - loss(&down)) / (2.0 * eps)
                })
                .collect();
            assert!(scaled_error(&grad, &fd) < 1e-8, "{pairs:?}");
        }
    }

    #[test]
    fn halves_and_interleaved_are_one_rotation_under_a_permutation() {
        let mut rng = Rng::new(3);
        let (b, t, h, d) = (1, 7, 2, 10);
        let half = d / 2;
        let x = random(&mut rng, b * t * h * d);
        // Halves' dimension `i` is interleaved's `2i`, and `i + D/2` is `2i + 1`.
        let to_interleaved = |x: &[f64]| -> Vec<f64> {
            let mut y = vec![0.0; x.len()];
            for (yh, xh) in y.chunks_mut(d).zip(x.chunks(d)) {
                for i in 0..half {
                    yh[2 * i] = xh[i];
                    yh[2 * i + 1] = xh[i + half];
                }
            }
            y
        };
        let tables = rope_tables::<f64>(t, d, 10_000.0, None);
        let halves = rope_fwd(&x, b, t, h, d, &tables, RopePairs::Halves);
        let interleaved = rope_fwd(
            &to_interleaved(&x),
            b,
            t,
            h,
            d,
            &tables,
            RopePairs::Interleaved,
        );
        assert_eq!(to_interleaved(&halves), interleaved);
        let halves = rope_bwd(&x, b, t, h, d, &tables, RopePairs::Halves);
        let interleaved = rope_bwd(
            &to_interleaved(&x),
            b,
            t,
            h,
            d,
            &tables,
            RopePairs::Interleaved,
        );
        assert_eq!(to_interleaved(&halves), interleaved);
    }

    /// Causal attention with a full softmax per query, in f64: `(o, lse)` as the kernel lays
    /// them out.
    fn naive_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dims: Dims,
        scale: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let Dims {
            b, t, h, dk, dv, ..
        } = dims;
        let mut o = vec![0.0; b * t * h * dv];
        let mut lse = vec![0.0; b * h * t];
        for bi in 0..b {
            for hh in 0..h {
                let kvh = hh / dims.group();
                for i in 0..t {
                    let qi = &q[dims.q_row(bi, i, hh, dk)..][..dk];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = &k[dims.kv_row(bi, j, kvh, dk)..][..dk];
                            scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    lse[(bi * h + hh) * t + i] = m + z.ln();
                    let oi = &mut o[dims.q_row(bi, i, hh, dv)..][..dv];
                    for (j, s) in scores.iter().enumerate() {
                        let p = (s - m).exp() / z;
                        let vj = &v[dims.kv_row(bi, j, kvh, dv)..][..dv];
                        for (a, x) in oi.iter_mut().zip(vj) {
                            *a += p * x;
                        }
                    }
                }
            }
        }
        (o, lse)
    }

    fn dims(b: usize, t: usize, h: usize, hk: usize, dk: usize, dv: usize) -> Dims {
        Dims {
            b,
            t,
            h,
            hk,
            dk,
            dv,
        }
    }

    /// Random operands `(q, k, v)` of the given shapes, scaled up so the softmax is peaked.
    fn operands(seed: u64, d: Dims) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = Rng::new(seed);
        let q = random(&mut rng, d.b * d.t * d.h * d.dk)
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let k = random(&mut rng, d.b * d.t * d.hk * d.dk)
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let v = random(&mut rng, d.b * d.t * d.hk * d.dv);
        (q, k, v)
    }

    fn call_fwd<T: Real>(q: &[T], k: &[T], v: &[T], d: Dims, scale: f64) -> (Vec<T>, Vec<T>) {
        attention_fwd(q, k, v, d.b, d.t, d.h, d.hk, d.dk, d.dv, scale)
    }

    const SHAPES: [(usize, usize, usize, usize, usize, usize); 5] = [
        (2, 5, 2, 2, 8, 8),
        (1, 70, 4, 2, 16, 16),
        (1, 130, 4, 1, 8, 8),
        (2, 67, 2, 2, 48, 32),
        (1, 64, 3, 3, 5, 7),
    ];

    #[test]
    fn forward_matches_a_full_softmax() {
        for (n, &(b, t, h, hk, dk, dv)) in SHAPES.iter().enumerate() {
            let d = dims(b, t, h, hk, dk, dv);
            let (q, k, v) = operands(10 + n as u64, d);
            let scale = (dk as f64).powf(-0.5);
            let (want_o, want_lse) = naive_attention(&q, &k, &v, d, scale);
            let (o, lse) = call_fwd(&q, &k, &v, d, scale);
            assert!(max_abs_diff(&o, &want_o) < 1e-13, "{d:?}");
            assert!(max_abs_diff(&lse, &want_lse) < 1e-13, "{d:?}");
            // Small tiles exercise several query tiles and key blocks on the same data.
            let (o, lse) = fwd_tiled(&q, &k, &v, d, scale, 3, 4);
            assert!(max_abs_diff(&o, &want_o) < 1e-13, "{d:?} in small tiles");
            assert!(
                max_abs_diff(&lse, &want_lse) < 1e-13,
                "{d:?} in small tiles"
            );
        }
    }

    #[test]
    fn f32_forward_agrees_with_f64() {
        for (n, &(b, t, h, hk, dk, dv)) in SHAPES.iter().enumerate() {
            let d = dims(b, t, h, hk, dk, dv);
            let (q, k, v) = operands(20 + n as u64, d);
            let scale = (dk as f64).powf(-0.5);
            let (o64, lse64) = call_fwd(&q, &k, &v, d, scale);
            let (o32, lse32) = call_fwd(&to_f32(&q), &to_f32(&k), &to_f32(&v), d, scale);
            let widen = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<_>>();
            assert!(max_abs_diff(&widen(o32), &o64) < 1e-5, "{d:?}");
            assert!(max_abs_diff(&widen(lse32), &lse64) < 1e-5, "{d:?}");
        }
    }

    #[test]
    fn a_future_key_or_value_does_not_change_earlier_outputs() {
        let d = dims(2, 80, 4, 2, 8, 6);
        let (q, mut k, mut v) = operands(30, d);
        let (o, lse) = call_fwd(&q, &k, &v, d, 0.4);
        let changed = 70;
        for bi in 0..d.b {
            for kvh in 0..d.hk {
                k[d.kv_row(bi, changed, kvh, d.dk)] += 5.0;
                v[d.kv_row(bi, changed, kvh, d.dv)] -= 3.0;
            }
        }
        let (o2, lse2) = call_fwd(&q, &k, &v, d, 0.4);
        for bi in 0..d.b {
            for hh in 0..d.h {
                for i in 0..d.t {
                    let row = d.q_row(bi, i, hh, d.dv);
                    let same = o[row..row + d.dv] == o2[row..row + d.dv];
                    let stats = (bi * d.h + hh) * d.t + i;
                    assert_eq!(same, i < changed, "output {i}");
                    assert_eq!(lse[stats] == lse2[stats], i < changed, "lse {i}");
                }
            }
        }
    }

    /// The gradients of `L = Σ w ⊙ o` for the output weights `w`, by the kernel with query
    /// blocks of `bq` and key blocks of `bk`.
    #[allow(clippy::too_many_arguments)]
    fn gradients(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        w: &[f64],
        d: Dims,
        scale: f64,
        bq: usize,
        bk: usize,
    ) -> Vec<Vec<f64>> {
        let (o, lse) = call_fwd(q, k, v, d, scale);
        let (gq, gk, gv) = bwd_tiled(q, k, v, &o, &lse, w, d, scale, bq, bk);
        vec![gq, gk, gv]
    }

    fn weighted_output(q: &[f64], k: &[f64], v: &[f64], w: &[f64], d: Dims, scale: f64) -> f64 {
        let (o, _) = fwd_tiled(q, k, v, d, scale, 4, 3);
        o.iter().zip(w).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn backward_matches_central_differences() {
        let eps = 1e-5;
        for (n, &(b, t, h, hk, dk, dv)) in
            [(1, 6, 2, 2, 3, 4), (2, 7, 4, 2, 4, 3), (1, 9, 4, 1, 5, 2)]
                .iter()
                .enumerate()
        {
            let d = dims(b, t, h, hk, dk, dv);
            let (q, k, v) = operands(40 + n as u64, d);
            let w = random(&mut Rng::new(50 + n as u64), b * t * h * dv);
            let scale = 0.7;
            let loss = |x: [&[f64]; 3]| weighted_output(x[0], x[1], x[2], &w, d, scale);
            // Equal blocks, key blocks that start inside a query block, and one tile.
            for (bq, bk) in [(2, 2), (5, 2), (64, 64)] {
                let grads = gradients(&q, &k, &v, &w, d, scale, bq, bk);
                for which in 0..3 {
                    let fd: Vec<f64> = (0..grads[which].len())
                        .map(|e| {
                            let mut inputs = [q.clone(), k.clone(), v.clone()];
                            inputs[which][e] += eps;
                            let up = loss([&inputs[0], &inputs[1], &inputs[2]]);
                            inputs[which][e] -= 2.0 * eps;
                            let down = loss([&inputs[0], &inputs[1], &inputs[2]]);
                            (up - down) / (2.0 * eps)
                        })
                        .collect();
                    let err = scaled_error(&grads[which], &fd);
                    assert!(err < 1e-6, "{d:?} blocks {bq}×{bk} operand {which}: {err}");
                }
            }
        }
    }

    #[test]
    fn backward_matches_directional_differences_across_blocks() {
        // Too many elements for one difference each: check the derivative along random
        // directions of all three operands at once, with sequences longer than a block.
        let eps = 1e-5;
        for (n, &(b, t, h, hk, dk, dv)) in [(1, 70, 4, 2, 6, 5), (1, 67, 2, 2, 48, 32)]
            .iter()
            .enumerate()
        {
            let d = dims(b, t, h, hk, dk, dv);
            let (q, k, v) = operands(60 + n as u64, d);
            let mut rng = Rng::new(70 + n as u64);
            let w = random(&mut rng, b * t * h * dv);
            let scale = (dk as f64).powf(-0.5);
            let grads = gradients(&q, &k, &v, &w, d, scale, BLOCK_Q, BLOCK_K);
            for _ in 0..2 {
                let dirs = [
                    random(&mut rng, q.len()),
                    random(&mut rng, k.len()),
                    random(&mut rng, v.len()),
                ];
                let shifted = |sign: f64| -> Vec<Vec<f64>> {
                    [&q, &k, &v]
                        .iter()
                        .zip(&dirs)
                        .map(|(x, r)| x.iter().zip(r).map(|(a, b)| a + sign * eps * b).collect())
                        .collect()
                };
                let (up, down) = (shifted(1.0), shifted(-1.0));
                let fd = (weighted_output(&up[0], &up[1], &up[2], &w, d, scale)
                    - weighted_output(&down[0], &down[1], &down[2], &w, d, scale))
                    / (2.0 * eps);
                let analytic: f64 = grads
                    .iter()
                    .zip(&dirs)
                    .map(|(g, r)| g.iter().zip(r).map(|(a, b)| a * b).sum::<f64>())
                    .sum();
                // The scale of the sum: the same products with magnitudes.
                let norm: f64 = grads
                    .iter()
                    .zip(&dirs)
                    .map(|(g, r)| g.iter().zip(r).map(|(a, b)| (a * b).abs()).sum::<f64>())
                    .sum();
                assert!(
                    (analytic - fd).abs() / norm < 1e-6,
                    "{d:?}: {analytic} vs {fd}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let d = dims(2, 70, 4, 2, 8, 8);
        let (q, k, v) = operands(80, d);
        let w = random(&mut Rng::new(81), d.b * d.t * d.h * d.dv);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (o, lse) = call_fwd(&q, &k, &v, d, 0.3);
                let (gq, gk, gv) = attention_bwd(
                    &q, &k, &v, &o, &lse, &w, d.b, d.t, d.h, d.hk, d.dk, d.dv, 0.3,
                );
                [o, lse, gq, gk, gv]
            })
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn empty_shapes_give_empty_results() {
        let (o, lse) = attention_fwd::<f32>(&[], &[], &[], 0, 5, 2, 1, 4, 4, 1.0);
        assert!(o.is_empty() && lse.is_empty());
        let (o, lse) = attention_fwd::<f32>(&[], &[], &[], 2, 0, 2, 1, 4, 4, 1.0);
        assert!(o.is_empty() && lse.is_empty());
        let tables = rope_tables::<f32>(0, 4, 10.0, None);
        assert!(rope_fwd(&[], 1, 0, 2, 4, &tables, RopePairs::Halves).is_empty());
    }

    #[test]
    fn zero_width_heads_match_the_reference() {
        // Heads without query/key dims (uniform attention) or without value dims.
        for (dk, dv) in [(0, 3), (3, 0), (0, 0)] {
            let d = dims(2, 5, 2, 1, dk, dv);
            let (q, k, v) = operands(1, d);
            let w = random(&mut Rng::new(2), d.b * d.t * d.h * d.dv);
            let (o, lse) = call_fwd(&q, &k, &v, d, 0.5);
            let (want_o, want_lse) = naive_attention(&q, &k, &v, d, 0.5);
            assert!(max_abs_diff(&o, &want_o) < 1e-13);
            assert!(max_abs_diff(&lse, &want_lse) < 1e-13);
            let g = gradients(&q, &k, &v, &w, d, 0.5, 3, 2);
            assert!(g.iter().flatten().all(|x| x.is_finite()));
        }
    }
}
