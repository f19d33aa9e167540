//! Attention: causal attention with online softmax (a warp per query row, key and value tiles
//! in shared memory) and its flash-style backward (`delta`, the query gradient, and the key and
//! value gradients per KV head); and decoding's cached attention (a block per row and head over
//! its KV cache, grouped or latent with kv_b absorbed).

use super::rope::POSITION_ERROR;
use super::{float_lit, grid_stride, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work, BLOCK};
use crate::ir::{CacheLayout, Node};

/// Rows (query rows, or key rows in the key-side backward) per attention block: one warp each.
pub(super) const ATTN_ROWS: u64 = 8;

/// The attention kernels' shapes, baked into their text.
#[derive(Clone, Copy)]
struct AttnDims {
    b: u64,
    t: u64,
    h: u64,
    hk: u64,
    dk: u64,
    dv: u64,
}

impl AttnDims {
    /// Keys (or queries) per tile streamed through shared memory: 32, one per lane, unless
    /// the tiles would not fit in 48 KB of static shared memory with room to spare.
    fn tile(&self) -> u64 {
        let floats = |kt: u64| {
            2 * ATTN_ROWS * (self.dk + self.dv)
                + kt * (self.dk + self.dv + 2)
                + 2 * ATTN_ROWS * kt
                + 2 * kt
        };
        if floats(32) * 4 <= 40 * 1024 {
            32
        } else {
            16
        }
    }

    /// Accumulators per lane for `d` dimensions split over the warp's 32 lanes.
    fn per_lane(d: u64) -> u64 {
        d.div_ceil(32)
    }

    fn suffix(&self) -> String {
        format!("h{}_kv{}_dk{}_dv{}", self.h, self.hk, self.dk, self.dv)
    }
}

/// The causal attention forward: one block per 8 query rows of one (batch, head), one warp per
/// row; key and value tiles go through shared memory, each lane scores one key of the tile,
/// and the warp keeps the row's online-softmax state and its output (dimensions split over the
/// lanes) in registers.
fn attention_fwd(def: KernelDef, d: AttnDims, scale: f64) -> KernelDef {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let kt = d.tile();
    let acc = AttnDims::per_lane(dv);
    let scale = float_lit(scale);
    let group = h / hk;
    def.doc(format!(
        "// Causal attention, forward (flash-style): o = softmax(scale · q·kᵀ) · v over the keys at or\n\
// before each query, with the row's log-sum-exp kept for the backward pass. Query head h reads\n\
// KV head h / {group}. One block per {ATTN_ROWS} query rows of one (batch, head), a warp per row;\n\
// tiles of {kt} keys through shared memory, one key per lane; online softmax in registers.\n\
// q: f32[B, {t}, {h}, {dk}]; k: f32[B, {t}, {hk}, {dk}]; v: f32[B, {t}, {hk}, {dv}];\n\
// o: f32[B, {t}, {h}, {dv}]; lse: f32[B, {h}, {t}]. scale = {scale}."
    ))
    .body(format!(
        "    __shared__ float qs[{ATTN_ROWS}][{dk}];
    __shared__ float ks[{kt}][{dk} + 1];
    __shared__ float vs[{kt}][{dv}];
    __shared__ float ps[{ATTN_ROWS}][{kt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bh = blockIdx.x / tiles;
    const long long b = bh / {h}, head = bh % {h}, kv = head / {group};
    const long long t0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long row = t0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = t0 + i / {dk};
        qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
    }}
    float m = -INFINITY, l = 0.0f;
    float acc[{acc}];
#pragma unroll
    for (int i = 0; i < {acc}; ++i) acc[i] = 0.0f;
    const long long last = t0 + {ATTN_ROWS} - 1 < {t} - 1 ? t0 + {ATTN_ROWS} - 1 : {t} - 1;
    for (long long k0 = 0; k0 <= last; k0 += {kt}) {{
        __syncthreads();
        for (int i = threadIdx.x; i < {kt} * {dk}; i += blockDim.x) {{
            const long long key = k0 + i / {dk};
            ks[i / {dk}][i % {dk}] = key < {t} ? k[((b * {t} + key) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
        }}
        for (int i = threadIdx.x; i < {kt} * {dv}; i += blockDim.x) {{
            const long long key = k0 + i / {dv};
            vs[i / {dv}][i % {dv}] = key < {t} ? v[((b * {t} + key) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
        }}
        __syncthreads();
        const long long key = k0 + lane;
        float s = -INFINITY;
        if (lane < {kt} && key <= row && row < {t}) {{
            float dot = 0.0f;
            for (int c = 0; c < {dk}; ++c) dot += qs[warp][c] * ks[lane][c];
            s = dot * {scale};
        }}
        const float m_new = fmaxf(m, kiln_warp_max(s));
        const float shift = m_new == -INFINITY ? 0.0f : m_new;
        const float p = s == -INFINITY ? 0.0f : kiln_softmax_exp(s - shift);
        const float correction = m == -INFINITY ? 0.0f : kiln_softmax_exp(m - shift);
        l = l * correction + kiln_warp_sum(p);
        m = m_new;
        if (lane < {kt}) ps[warp][lane] = p;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            float a = acc[i] * correction;
            if (c < {dv}) {{
                for (int j = 0; j < {kt}; ++j) a += ps[warp][j] * vs[j][c];
            }}
            acc[i] = a;
        }}
        __syncwarp();
    }}
    if (row < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dv}) o[((b * {t} + row) * {h} + head) * {dv} + c] = acc[i] / l;
        }}
        if (lane == 0) lse[(b * {h} + head) * {t} + row] = m + logf(l);
    }}
"
    ))
}

/// `delta[b, h, t] = Σ_c do[b, t, h, c] · o[b, t, h, c]`, one thread per row.
fn attention_delta(def: KernelDef, d: AttnDims) -> KernelDef {
    let AttnDims { t, h, dv, .. } = d;
    def.doc(format!(
        "// Attention backward, first part: delta[b, h, t] = Σ_c do·o over the {dv} output dimensions of\n\
// each row, which the softmax's backward subtracts. One thread per row.\n\
// o, d_o: f32[B, {t}, {h}, {dv}]; delta: f32[B, {h}, {t}]."
    ))
    .body(format!(
        "\
{}\
\x20       const long long b = r / ({h} * {t}), head = (r / {t}) % {h}, row = r % {t};
        const float* orow = o + ((b * {t} + row) * {h} + head) * {dv};
        const float* drow = d_o + ((b * {t} + row) * {h} + head) * {dv};
        float acc = 0.0f;
        for (int c = 0; c < {dv}; ++c) acc += orow[c] * drow[c];
        delta[r] = acc;
    }}
",
        grid_stride("    ", "r", "rows")
    ))
}

/// The query gradient: the forward's layout, with `ds = p · (do·v − delta)` per key and
/// `dq = scale · Σ ds · k`.
fn attention_dq(def: KernelDef, d: AttnDims, scale: f64) -> KernelDef {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let kt = d.tile();
    let acc = AttnDims::per_lane(dk);
    let scale = float_lit(scale);
    let group = h / hk;
    def.doc(format!(
        "// Attention backward, query gradient: for each query row and each key at or before it,\n\
// p = exp(scale · q·k − lse), ds = p · (do·v − delta), and dq = scale · Σ ds · k. The\n\
// forward's layout: {ATTN_ROWS} query rows per block, a warp per row, {kt} keys per tile.\n\
// q, dq: f32[B, {t}, {h}, {dk}]; k: f32[B, {t}, {hk}, {dk}]; v: f32[B, {t}, {hk}, {dv}];\n\
// d_o: f32[B, {t}, {h}, {dv}]; lse, delta: f32[B, {h}, {t}]."
    ))
    .body(format!(
        "    __shared__ float qs[{ATTN_ROWS}][{dk}];
    __shared__ float dos[{ATTN_ROWS}][{dv}];
    __shared__ float ks[{kt}][{dk} + 1];
    __shared__ float vs[{kt}][{dv} + 1];
    __shared__ float ds_s[{ATTN_ROWS}][{kt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bh = blockIdx.x / tiles;
    const long long b = bh / {h}, head = bh % {h}, kv = head / {group};
    const long long t0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long row = t0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = t0 + i / {dk};
        qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
    }}
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dv}; i += blockDim.x) {{
        const long long r = t0 + i / {dv};
        dos[i / {dv}][i % {dv}] = r < {t} ? d_o[((b * {t} + r) * {h} + head) * {dv} + i % {dv}] : 0.0f;
    }}
    const float row_lse = row < {t} ? lse[(b * {h} + head) * {t} + row] : 0.0f;
    const float row_delta = row < {t} ? delta[(b * {h} + head) * {t} + row] : 0.0f;
    float acc[{acc}];
#pragma unroll
    for (int i = 0; i < {acc}; ++i) acc[i] = 0.0f;
    const long long last = t0 + {ATTN_ROWS} - 1 < {t} - 1 ? t0 + {ATTN_ROWS} - 1 : {t} - 1;
    for (long long k0 = 0; k0 <= last; k0 += {kt}) {{
        __syncthreads();
        for (int i = threadIdx.x; i < {kt} * {dk}; i += blockDim.x) {{
            const long long key = k0 + i / {dk};
            ks[i / {dk}][i % {dk}] = key < {t} ? k[((b * {t} + key) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
        }}
        for (int i = threadIdx.x; i < {kt} * {dv}; i += blockDim.x) {{
            const long long key = k0 + i / {dv};
            vs[i / {dv}][i % {dv}] = key < {t} ? v[((b * {t} + key) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
        }}
        __syncthreads();
        const long long key = k0 + lane;
        float ds = 0.0f;
        if (lane < {kt} && key <= row && row < {t}) {{
            float s = 0.0f, dp = 0.0f;
            for (int c = 0; c < {dk}; ++c) s += qs[warp][c] * ks[lane][c];
            for (int c = 0; c < {dv}; ++c) dp += dos[warp][c] * vs[lane][c];
            const float p = kiln_softmax_exp(s * {scale} - row_lse);
            ds = p * (dp - row_delta);
        }}
        if (lane < {kt}) ds_s[warp][lane] = ds;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) {{
                float a = acc[i];
                for (int j = 0; j < {kt}; ++j) a += ds_s[warp][j] * ks[j][c];
                acc[i] = a;
            }}
        }}
        __syncwarp();
    }}
    if (row < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) dq[((b * {t} + row) * {h} + head) * {dk} + c] = acc[i] * {scale};
        }}
    }}
"
    ))
}

/// The key and value gradients: one block per 8 key rows of one (batch, KV head), a warp per
/// key; query tiles (of every query head reading this KV head) through shared memory.
fn attention_dkdv(def: KernelDef, d: AttnDims, scale: f64) -> KernelDef {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let qt = d.tile();
    let acc_k = AttnDims::per_lane(dk);
    let acc_v = AttnDims::per_lane(dv);
    let scale = float_lit(scale);
    let group = h / hk;
    def.doc(format!(
        "// Attention backward, key and value gradients: for each key row and each query at or after it\n\
// (in each of the {group} query heads reading its KV head), p = exp(scale · q·k − lse),\n\
// dv = Σ p · do and dk = scale · Σ p · (do·v − delta) · q. One block per {ATTN_ROWS} key rows\n\
// of one (batch, KV head), a warp per key; tiles of {qt} queries through shared memory.\n\
// q: f32[B, {t}, {h}, {dk}]; k, dk_out: f32[B, {t}, {hk}, {dk}]; v, dv_out: f32[B, {t}, {hk}, {dv}];\n\
// d_o: f32[B, {t}, {h}, {dv}]; lse, delta: f32[B, {h}, {t}]."
    ))
    .body(format!(
        "    __shared__ float krows[{ATTN_ROWS}][{dk}];
    __shared__ float vrows[{ATTN_ROWS}][{dv}];
    __shared__ float qs[{qt}][{dk} + 1];
    __shared__ float dos[{qt}][{dv} + 1];
    __shared__ float lse_s[{qt}], delta_s[{qt}];
    __shared__ float p_s[{ATTN_ROWS}][{qt}], ds_s[{ATTN_ROWS}][{qt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bkv = blockIdx.x / tiles;
    const long long b = bkv / {hk}, kv = bkv % {hk};
    const long long k0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long key = k0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = k0 + i / {dk};
        krows[i / {dk}][i % {dk}] = r < {t} ? k[((b * {t} + r) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
    }}
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dv}; i += blockDim.x) {{
        const long long r = k0 + i / {dv};
        vrows[i / {dv}][i % {dv}] = r < {t} ? v[((b * {t} + r) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
    }}
    float acc_k[{acc_k}], acc_v[{acc_v}];
#pragma unroll
    for (int i = 0; i < {acc_k}; ++i) acc_k[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < {acc_v}; ++i) acc_v[i] = 0.0f;
    for (int g = 0; g < {group}; ++g) {{
        const long long head = kv * {group} + g;
        for (long long q0 = k0; q0 < {t}; q0 += {qt}) {{
            __syncthreads();
            for (int i = threadIdx.x; i < {qt} * {dk}; i += blockDim.x) {{
                const long long r = q0 + i / {dk};
                qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
            }}
            for (int i = threadIdx.x; i < {qt} * {dv}; i += blockDim.x) {{
                const long long r = q0 + i / {dv};
                dos[i / {dv}][i % {dv}] = r < {t} ? d_o[((b * {t} + r) * {h} + head) * {dv} + i % {dv}] : 0.0f;
            }}
            for (int i = threadIdx.x; i < {qt}; i += blockDim.x) {{
                const long long r = q0 + i;
                lse_s[i] = r < {t} ? lse[(b * {h} + head) * {t} + r] : 0.0f;
                delta_s[i] = r < {t} ? delta[(b * {h} + head) * {t} + r] : 0.0f;
            }}
            __syncthreads();
            const long long query = q0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (lane < {qt} && key < {t} && query < {t} && query >= key) {{
                float s = 0.0f, dp = 0.0f;
                for (int c = 0; c < {dk}; ++c) s += qs[lane][c] * krows[warp][c];
                for (int c = 0; c < {dv}; ++c) dp += dos[lane][c] * vrows[warp][c];
                p = kiln_softmax_exp(s * {scale} - lse_s[lane]);
                ds = p * (dp - delta_s[lane]);
            }}
            if (lane < {qt}) {{
                p_s[warp][lane] = p;
                ds_s[warp][lane] = ds;
            }}
            __syncwarp();
#pragma unroll
            for (int i = 0; i < {acc_v}; ++i) {{
                const int c = lane + 32 * i;
                if (c < {dv}) {{
                    float a = acc_v[i];
                    for (int j = 0; j < {qt}; ++j) a += p_s[warp][j] * dos[j][c];
                    acc_v[i] = a;
                }}
            }}
#pragma unroll
            for (int i = 0; i < {acc_k}; ++i) {{
                const int c = lane + 32 * i;
                if (c < {dk}) {{
                    float a = acc_k[i];
                    for (int j = 0; j < {qt}; ++j) a += ds_s[warp][j] * qs[j][c];
                    acc_k[i] = a;
                }}
            }}
            __syncwarp();
        }}
    }}
    if (key < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc_k}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) dk_out[((b * {t} + key) * {hk} + kv) * {dk} + c] = acc_k[i] * {scale};
        }}
#pragma unroll
        for (int i = 0; i < {acc_v}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dv}) dv_out[((b * {t} + key) * {hk} + kv) * {dv} + c] = acc_v[i];
        }}
    }}
"
    ))
}

impl Emitter<'_> {
    fn attn_dims(&self, node: &Node) -> AttnDims {
        let (q, k, v) = (
            self.shape(node.inputs[0]),
            self.shape(node.inputs[1]),
            self.shape(node.inputs[2]),
        );
        AttnDims {
            b: q[0],
            t: q[1],
            h: q[2],
            hk: k[2],
            dk: q[3],
            dv: v[3],
        }
    }

    pub(super) fn attention(&mut self, index: usize, node: &Node, scale: f64) -> Vec<Work> {
        let d = self.attn_dims(node);
        let (i, o) = (&node.inputs, &node.outputs);
        let def = KernelDef::new(
            format!("attention_fwd_{}", d.suffix()),
            "causal attention forward (flash-style, online softmax)",
        )
        .read("q", val(i[0]))
        .read("k", val(i[1]))
        .read("v", val(i[2]))
        .write("o", val(o[0]))
        .write("lse", val(o[1]));
        let def = attention_fwd(def.heavy(), d, scale);
        vec![self.work(
            index,
            def,
            Grid::Blocks(d.b * d.h * d.t.div_ceil(ATTN_ROWS)),
        )]
    }

    /// `(q, k, v, o, lse, do) -> (dq, dk, dv)`: delta, then the query gradient and the key and
    /// value gradients, each without atomics.
    pub(super) fn attention_grad(&mut self, index: usize, node: &Node, scale: f64) -> Vec<Work> {
        let d = self.attn_dims(node);
        let (q, k, v, o, lse, d_o) = (
            node.inputs[0],
            node.inputs[1],
            node.inputs[2],
            node.inputs[3],
            node.inputs[4],
            node.inputs[5],
        );
        let (dq, dk, dv) = (node.outputs[0], node.outputs[1], node.outputs[2]);
        let rows = d.b * d.h * d.t;
        let delta = Arg::Scratch {
            slot: 0,
            bytes: rows * 4,
        };
        let delta_def = KernelDef::new(
            format!("attention_bwd_delta_h{}_dv{}", d.h, d.dv),
            "attention backward: delta = rowsum(do · o)",
        )
        .read("o", val(o))
        .read("d_o", val(d_o))
        .write("delta", delta.clone())
        .long("rows", rows);
        // q, k, v, lse, d_o and delta: what both gradient kernels read.
        let reads = |def: KernelDef| {
            def.read("q", val(q))
                .read("k", val(k))
                .read("v", val(v))
                .read("lse", val(lse))
                .read("d_o", val(d_o))
                .read("delta", delta.clone())
        };
        let dq_def = reads(KernelDef::new(
            format!("attention_bwd_dq_{}", d.suffix()),
            "attention backward: query gradient",
        ))
        .write("dq", val(dq));
        let dkdv_def = reads(KernelDef::new(
            format!("attention_bwd_dkdv_{}", d.suffix()),
            "attention backward: key and value gradients",
        ))
        .write("dk_out", val(dk))
        .write("dv_out", val(dv));
        vec![
            self.work(index, attention_delta(delta_def, d), Grid::Threads(rows)),
            self.work(
                index,
                attention_dq(dq_def.heavy(), d, scale),
                Grid::Blocks(d.b * d.h * d.t.div_ceil(ATTN_ROWS)),
            ),
            self.work(
                index,
                attention_dkdv(dkdv_def.heavy(), d, scale),
                Grid::Blocks(d.b * d.hk * d.t.div_ceil(ATTN_ROWS)),
            ),
        ]
    }
}

/// Keys per tile of the decode attention kernels: one per thread of the block.
const DECODE_TILE: u64 = BLOCK as u64;

/// The shapes of a decode step's cached attention, baked into its kernels' text.
#[derive(Clone, Copy)]
struct CachedDims {
    /// Query heads, cached tokens per row (the capacity), elements per cached token.
    h: u64,
    c: u64,
    e: u64,
}

/// The part of a cached attention kernel shared by both layouts: the loop over the keys
/// `0..=pos` in tiles of [`DECODE_TILE`], one key per thread, with the online softmax over
/// the block (`kiln_block_max`, `kiln_block_sum`) and `out` output dimensions accumulated
/// in registers, `ceil(out / 256)` per thread. `score` is C statements that set `s` from the
/// key's cached token `kt` (before `scale`); `value` is the offset of the token's values
/// within it. On exit, `acc[i]` holds dimension `threadIdx.x + 256·i` of `Σₜ eₜ·vₜ` and `l`
/// the sum `Σₜ eₜ` (`eₜ = exp(s_t − m)`).
fn cached_softmax_loop(d: CachedDims, scale: f64, out: u64, score: &str, value: &str) -> String {
    let CachedDims { c, e, .. } = d;
    let per = out.div_ceil(DECODE_TILE);
    let scale = float_lit(scale);
    format!(
        "    float m = -INFINITY, l = 0.0f;
    float acc[{per}];
#pragma unroll
    for (int i = 0; i < {per}; ++i) acc[i] = 0.0f;
    for (long long k0 = 0; k0 <= pos; k0 += {DECODE_TILE}) {{
        const long long key = k0 + threadIdx.x;
        // Slots before the row's position come from the cache, slot pos is the new entry.
        const float* kt = key < pos ? cache + (b * {c} + key) * {e} : entry + b * {e};
        float s = -INFINITY;
        if (key <= pos) {{
{score}
            s *= {scale};
        }}
        // The tile holds key k0 <= pos, so m_new is finite (for finite scores).
        const float m_new = fmaxf(m, kiln_block_max(s, red));
        const float p = key <= pos ? kiln_softmax_exp(s - m_new) : 0.0f;
        const float correction = kiln_softmax_exp(m - m_new);
        l = l * correction + kiln_block_sum(p, red);
        m = m_new;
        ps[threadIdx.x] = p;
        __syncthreads();
        const long long last = pos - k0 < {DECODE_TILE} ? pos - k0 : {DECODE_TILE} - 1;
#pragma unroll
        for (int i = 0; i < {per}; ++i) {{
            const long long dim = threadIdx.x + {DECODE_TILE} * i;
            float a = acc[i] * correction;
            if (dim < {out}) {{
                for (long long j = 0; j <= last; ++j) {{
                    const float* vt = k0 + j < pos ? cache + (b * {c} + k0 + j) * {e} : entry + b * {e};
                    a += ps[j] * vt[{value} + dim];
                }}
            }}
            acc[i] = a;
        }}
        __syncthreads();
    }}
"
    )
}

/// The prologue of both layouts' kernels: the block's row and head, the row's position, and
/// the precondition on it (a position outside the cache zeroes the block's output and sets
/// the error flag).
fn cached_prologue(d: CachedDims, dout: u64) -> String {
    let CachedDims { h, c, .. } = d;
    format!(
        "    const long long b = blockIdx.x / {h}, head = blockIdx.x % {h};
    const long long pos = positions[b];
    float* oh = o + (b * {h} + head) * {dout};
    if (pos >= {c}) {{
        for (int i = threadIdx.x; i < {dout}; i += blockDim.x) oh[i] = 0.0f;
        if (threadIdx.x == 0) *error = {POSITION_ERROR};
        return;
    }}
"
    )
}

/// Grouped (or multi-head) decoding attention: one block per (row, query head).
fn cached_grouped(def: KernelDef, d: CachedDims, hk: u64, dh: u64, scale: f64) -> KernelDef {
    let CachedDims { h, c, e } = d;
    let group = h / hk;
    let prologue = cached_prologue(d, dh);
    let score = format!(
        "            float dot = 0.0f;
            for (int i = 0; i < {dh}; ++i) dot += qs[i] * kt[kv * {dh} + i];
            s = dot;"
    );
    let body = cached_softmax_loop(d, scale, dh, &score, &format!("({hk} + kv) * {dh}"));
    def.doc(format!(
        "// Decoding attention over a grouped KV cache: the new token of row b attends to its cached\n\
// tokens 0..pos-1 and then to its own entry (slot pos = positions[b]), o = softmax(scale ·\n\
// q·kᵀ)·v; query head h reads KV head h / {group}. A cached token is [k ({hk}×{dh}) | v ({hk}×{dh})].\n\
// One block per (row, query head), one key per thread in tiles of {DECODE_TILE} with block\n\
// reductions (online softmax), the {dh} output dimensions split over the threads.\n\
// q: f32[B, 1, {h}, {dh}]; entry: f32[B, 1, {e}]; cache: f32[B, {c}, {e}]; positions: u32[B, 1];\n\
// o: f32[B, 1, {h}, {dh}]. Precondition: positions[b] < {c}; a position beyond the cache sets\n\
// *error = {POSITION_ERROR} and writes zeros."
    ))
    .body(format!(
        "    __shared__ float qs[{dh}];
    __shared__ float ps[{DECODE_TILE}];
    __shared__ float red[32];
{prologue}    const long long kv = head / {group};
    for (int i = threadIdx.x; i < {dh}; i += blockDim.x) qs[i] = q[(b * {h} + head) * {dh} + i];
    __syncthreads();
{body}#pragma unroll
    for (int i = 0; i < {per}; ++i) {{
        const long long dim = threadIdx.x + {DECODE_TILE} * i;
        if (dim < {dh}) oh[dim] = acc[i] / l;
    }}
",
        per = dh.div_ceil(DECODE_TILE),
    ))
}

/// Latent (MLA) decoding attention with kv_b absorbed: one block per (row, query head).
fn cached_latent(
    def: KernelDef,
    d: CachedDims,
    [r, nope, rope, v]: [u64; 4],
    scale: f64,
) -> KernelDef {
    let CachedDims { h, c, e } = d;
    let (qk, stride) = (nope + rope, nope + v);
    let prologue = cached_prologue(d, v);
    let score = format!(
        "            float nope = 0.0f, rope = 0.0f;
            for (int i = 0; i < {r}; ++i) nope += q_lat[i] * kt[i];
            for (int i = 0; i < {rope}; ++i) rope += q_rope[i] * kt[{r} + i];
            s = nope + rope;"
    );
    let body = cached_softmax_loop(d, scale, r, &score, "0");
    def.doc(format!(
        "// Decoding attention over a latent (MLA) cache with the key and value up-projection kv_b\n\
// absorbed (DeepSeek-V2 §2.1.2): a cached token is [c_kv ({r}) | k_rope ({rope})], the query\n\
// [q_nope ({nope}) | q_rope ({rope}), already roped]. For head h, with W_uk its {nope} key rows\n\
// and W_uv its next {v} value rows of kv_b: q̃ = W_ukᵀ·q_nope, scores s_t = scale · (q̃·c_kv(t)\n\
// + q_rope·k_rope(t)) over the cached tokens 0..pos-1 and the row's own entry (slot pos =\n\
// positions[b]), õ = Σ_t softmax(s)_t · c_kv(t), and o = W_uv·õ.\n\
// One block per (row, query head): q̃ by threads over the {r} latent dimensions, one key per\n\
// thread in tiles of {DECODE_TILE} with block reductions (online softmax), õ split over the\n\
// threads, then a warp per output dimension of W_uv·õ.\n\
// q: f32[B, 1, {h}, {qk}]; entry: f32[B, 1, {e}]; cache: f32[B, {c}, {e}]; positions: u32[B, 1];\n\
// kv_b: f32[{h}·{stride}, {r}]; o: f32[B, 1, {h}, {v}]. Precondition: positions[b] < {c}; a\n\
// position beyond the cache sets *error = {POSITION_ERROR} and writes zeros."
    ))
    .body(format!(
        "    __shared__ float q_lat[{r}];
    __shared__ float q_rope[{rope}];
    __shared__ float o_lat[{r}];
    __shared__ float ps[{DECODE_TILE}];
    __shared__ float red[32];
{prologue}    const float* qh = q + (b * {h} + head) * {qk};
    const float* w = kv_b + head * {stride} * {r};
    // q̃[j] = Σ_i q_nope[i] · W_uk[i, j], one latent dimension per thread.
    for (int j = threadIdx.x; j < {r}; j += blockDim.x) {{
        float a = 0.0f;
        for (int i = 0; i < {nope}; ++i) a += qh[i] * w[i * {r} + j];
        q_lat[j] = a;
    }}
    for (int i = threadIdx.x; i < {rope}; i += blockDim.x) q_rope[i] = qh[{nope} + i];
    __syncthreads();
{body}#pragma unroll
    for (int i = 0; i < {per}; ++i) {{
        const long long dim = threadIdx.x + {DECODE_TILE} * i;
        if (dim < {r}) o_lat[dim] = acc[i] / l;
    }}
    __syncthreads();
    // o[vi] = W_uv[vi, :]·õ, a warp per output dimension (every warp runs every round).
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int v0 = 0; v0 < {v}; v0 += warps) {{
        const int vi = v0 + warp;
        float a = 0.0f;
        if (vi < {v}) {{
            const float* wv = w + ({nope} + vi) * {r};
            for (int j = lane; j < {r}; j += 32) a += wv[j] * o_lat[j];
        }}
        a = kiln_warp_sum(a);
        if (vi < {v} && lane == 0) oh[vi] = a;
    }}
",
        per = r.div_ceil(DECODE_TILE),
    ))
}

impl Emitter<'_> {
    /// `Op::CachedAttention`: `(q, entry, cache, positions[, kv_b]) -> o`, one block per
    /// (row, query head).
    pub(super) fn cached_attention(
        &mut self,
        index: usize,
        node: &Node,
        scale: f64,
        layout: CacheLayout,
    ) -> Vec<Work> {
        let (q, cache) = (self.shape(node.inputs[0]), self.shape(node.inputs[2]));
        let d = CachedDims {
            h: q[2],
            c: cache[1],
            e: cache[2],
        };
        let i = &node.inputs;
        let reads = |def: KernelDef| {
            def.read("q", val(i[0]))
                .read("entry", val(i[1]))
                .read("cache", val(i[2]))
                .param("positions", Elem::U32, Pass::Read, val(i[3]))
        };
        let def = match layout {
            CacheLayout::Grouped { kv_heads, head_dim } => {
                let def = reads(KernelDef::new(
                    format!(
                        "cached_attention_h{}_kv{kv_heads}_d{head_dim}_c{}",
                        d.h, d.c
                    ),
                    "decoding attention over a grouped KV cache (online softmax over the block)",
                ));
                cached_grouped(def.heavy(), d, kv_heads, head_dim, scale)
            }
            CacheLayout::Latent {
                rank,
                nope,
                rope,
                v,
            } => {
                let def = reads(KernelDef::new(
                    format!("cached_attention_mla_h{}_r{rank}_c{}", d.h, d.c),
                    "decoding attention over a latent (MLA) cache, kv_b absorbed",
                ))
                .read("kv_b", val(i[4]));
                cached_latent(def.heavy(), d, [rank, nope, rope, v], scale)
            }
        };
        let def = def.write("o", val(node.outputs[0])).param(
            "error",
            Elem::I32,
            Pass::Write,
            Arg::ErrorFlag,
        );
        vec![self.work(index, def, Grid::Blocks(q[0] * d.h))]
    }
}
