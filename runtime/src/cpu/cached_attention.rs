//! Decoding attention: one new token per row attending to its sequence's KV cache (the
//! CPU kernels of the IR's `cached_attention`), for a grouped (or multi-head) cache of keys
//! and values, and for multi-head latent attention's cache of latents with the key and value
//! up-projection absorbed.

use super::Real;

/// Softmax of one row of scores with the maximum subtracted.
fn softmax_row<T: Real>(scores: &mut [T]) {
    let max = scores.iter().copied().fold(T::NEG_INFINITY, T::max);
    let mut sum = T::ZERO;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s = *s / sum;
    }
}

/// The shapes of a decode step's cached attention: `rows` new tokens, `capacity` cached
/// slots per row, `entry` elements per cached token, `heads` query heads.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub rows: usize,
    pub capacity: usize,
    pub entry: usize,
    pub heads: usize,
}

/// Cached token `t` of row `r`: from the cache before the row's position, its own `entry` at
/// it.
fn cached<'a, T>(
    s: &CacheShape,
    cache: &'a [T],
    entry: &'a [T],
    r: usize,
    t: usize,
    pos: usize,
) -> &'a [T] {
    if t == pos {
        &entry[r * s.entry..(r + 1) * s.entry]
    } else {
        &cache[(r * s.capacity + t) * s.entry..][..s.entry]
    }
}

/// Decoding attention with a grouped (or multi-head) cache: `q: [rows, heads, dh]`, each
/// cached token `[k (kv_heads·dh) | v (kv_heads·dh)]`; row `r` attends to its cache's tokens
/// `0..positions[r]` and its own `entry`. Returns `[rows, heads, dh]`.
#[allow(clippy::too_many_arguments)]
pub fn cached_attention_grouped<T: Real>(
    q: &[T],
    entry: &[T],
    cache: &[T],
    positions: &[u32],
    s: CacheShape,
    kv_heads: usize,
    dh: usize,
    scale: f64,
) -> Vec<T> {
    let (h, hk) = (s.heads, kv_heads);
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; s.rows * h * dh];
    for (r, &pos) in positions.iter().enumerate() {
        let pos = pos as usize;
        let mut scores = vec![T::ZERO; pos + 1];
        for j in 0..h {
            let kvh = j / (h / hk);
            let qj = &q[(r * h + j) * dh..][..dh];
            for (t, sc) in scores.iter_mut().enumerate() {
                let k = &cached(&s, cache, entry, r, t, pos)[kvh * dh..][..dh];
                let mut dot = T::ZERO;
                for (&a, &b) in qj.iter().zip(k) {
                    dot += a * b;
                }
                *sc = scale * dot;
            }
            softmax_row(&mut scores);
            let o = &mut out[(r * h + j) * dh..][..dh];
            for (t, &p) in scores.iter().enumerate() {
                let v = &cached(&s, cache, entry, r, t, pos)[(hk + kvh) * dh..][..dh];
                for (o, &v) in o.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
    out
}

/// The dimensions of multi-head latent attention's cache: latent `rank`, the per-head
/// no-RoPE and RoPE query parts, and the value width.
#[derive(Clone, Copy, Debug)]
pub struct LatentDims {
    pub rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

/// Decoding attention over a latent cache with the key and value up-projection `kv_b:
/// [heads·(nope + v), rank]` absorbed (DeepSeek-V2 §2.1.2): each cached token is
/// `[c_kv (rank) | k_rope (rope)]`, `q: [rows, heads, nope + rope]` with its RoPE part
/// already rotated. Per head, `q̃ = W_ukᵀ·q_nope`, scores `q̃·c_kv + q_rope·k_rope`, and the
/// output `W_uv·(Σₜ pₜ·c_kv(t))`. Returns `[rows, heads, v]`.
#[allow(clippy::too_many_arguments)]
pub fn cached_attention_latent<T: Real>(
    q: &[T],
    entry: &[T],
    cache: &[T],
    positions: &[u32],
    kv_b: &[T],
    s: CacheShape,
    m: LatentDims,
    scale: f64,
) -> Vec<T> {
    let (h, r_dim, qk, stride) = (s.heads, m.rank, m.nope + m.rope, m.nope + m.v);
    let scale = T::from_f64(scale);
    let mut out = vec![T::ZERO; s.rows * h * m.v];
    let mut q_lat = vec![T::ZERO; r_dim];
    let mut o_lat = vec![T::ZERO; r_dim];
    for (r, &pos) in positions.iter().enumerate() {
        let pos = pos as usize;
        let mut scores = vec![T::ZERO; pos + 1];
        for j in 0..h {
            let qj = &q[(r * h + j) * qk..][..qk];
            q_lat.fill(T::ZERO);
            for (i, &qv) in qj[..m.nope].iter().enumerate() {
                let w = &kv_b[(j * stride + i) * r_dim..][..r_dim];
                for (l, &wv) in q_lat.iter_mut().zip(w) {
                    *l += qv * wv;
                }
            }
            for (t, sc) in scores.iter_mut().enumerate() {
                let c = cached(&s, cache, entry, r, t, pos);
                let mut nope = T::ZERO;
                for (&a, &b) in q_lat.iter().zip(&c[..r_dim]) {
                    nope += a * b;
                }
                let mut rope = T::ZERO;
                for (&a, &b) in qj[m.nope..].iter().zip(&c[r_dim..]) {
                    rope += a * b;
                }
                *sc = scale * (nope + rope);
            }
            softmax_row(&mut scores);
            o_lat.fill(T::ZERO);
            for (t, &p) in scores.iter().enumerate() {
                let c = cached(&s, cache, entry, r, t, pos);
                for (o, &cv) in o_lat.iter_mut().zip(&c[..r_dim]) {
                    *o += p * cv;
                }
            }
            let o = &mut out[(r * h + j) * m.v..][..m.v];
            for (vi, ov) in o.iter_mut().enumerate() {
                let w = &kv_b[(j * stride + m.nope + vi) * r_dim..][..r_dim];
                let mut acc = T::ZERO;
                for (&a, &b) in w.iter().zip(&o_lat) {
                    acc += a * b;
                }
                *ov = acc;
            }
        }
    }
    out
}
