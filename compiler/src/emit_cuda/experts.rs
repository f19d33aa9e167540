//! The routed experts: sorting (token, slot) pairs by expert, gathering each pair's token
//! row, the experts' products as grouped GEMMs ([`GroupedGemm`], one product per expert over
//! its sorted rows, in the node's format), the activation, the weighted combine, and their
//! backward — in the interpreter's order of operations (`runtime/src/cpu/moe/experts.rs`),
//! so that an FP8 policy quantizes the same operands in the same tiles.

use super::expr::{expr_forward, expr_gradient};
use super::{
    grid_stride, val, Arg, Elem, Emitter, Fp8Gemm, Grid, GroupedGemm, KernelDef, Pass, Work,
};
use crate::dsl::expr::{Compiled, Expr};
use crate::ir::{Node, ValueId};
use crate::model::Format;
use crate::names::comment_text;

/// An expert activation compiled over its operands (`gate, up`, or `x` ungated), and its
/// text for comments.
struct ExpertAct {
    compiled: Compiled,
    text: String,
}

impl ExpertAct {
    fn of(act: &Expr, gated: bool) -> Self {
        let vars: &[&str] = if gated { &["gate", "up"] } else { &["x"] };
        ExpertAct {
            compiled: act
                .compile(vars)
                .expect("a verified expert activation compiles"),
            text: comment_text(&act.to_string()),
        }
    }
}

/// The shapes of an `experts` node, baked into its kernels.
#[derive(Clone, Copy)]
struct MoeDims {
    /// Tokens, model width, slots per token, experts, expert hidden width.
    n: u64,
    d: u64,
    k: u64,
    e: u64,
    h: u64,
    gated: bool,
}

impl MoeDims {
    fn suffix(&self) -> String {
        format!("e{}_k{}_d{}_h{}", self.e, self.k, self.d, self.h)
    }
}

/// (token, slot) pairs each block of the sort takes: a chunk, in rounds of one per thread.
pub(super) const SORT_CHUNK: u64 = 512;

/// The range of pairs of the chunk `blockIdx.x`: `start` to `end`.
fn chunk_range(k: u64) -> String {
    let c = SORT_CHUNK;
    format!(
        "    const long long pairs = n * {k}, start = blockIdx.x * {c}LL;
    const long long end = start + {c} < pairs ? start + {c} : pairs;"
    )
}

/// Counts the (token, slot) pairs of each chunk of [`SORT_CHUNK`] per expert, a block per
/// chunk: the sort's first launch, and the bias update's. Takes `experts`, `counts`
/// (`chunks · e` ints), `error` and `n`.
pub(super) fn sort_count(e: u64, k: u64) -> KernelDef {
    let c = SORT_CHUNK;
    let chunk = chunk_range(k);
    KernelDef::new(format!("moe_sort_count_e{e}_k{k}"), "counts each chunk's pairs per expert")
    .doc(format!(
        "// Counts the (token, slot) pairs of each chunk of {c} per expert: counts[chunk · {e} + x].\n\
// A block per chunk; an id outside the experts sets *error = 3.\n\
// experts: u32[n, {k}]; counts: i32[chunks, {e}]."
    ))
    .body(format!(
        "    __shared__ unsigned local[{e}];
{chunk}
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) local[x] = 0u;
    __syncthreads();
    for (long long p = start + threadIdx.x; p < end; p += blockDim.x) {{
        const unsigned x = experts[p];
        if (x < {e}) atomicAdd(&local[x], 1u); else *error = 3;
    }}
    __syncthreads();
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) counts[blockIdx.x * {e}LL + x] = (int)local[x];
"
    ))
}

/// The sort of (token, slot) pairs by expert, stable (a counting sort in three launches, each
/// over chunks of [`SORT_CHUNK`] pairs, so no single block walks every pair): `offsets[e]..
/// offsets[e + 1]` are expert `e`'s rows, `perm[row]` is the pair at a sorted row and
/// `row_of[pair]` its inverse. `counts` is scratch of `chunks · e` ints. An id outside the
/// experts sets *error = 3 and goes nowhere (`row_of` = -1).
fn moe_sort(m: MoeDims) -> [KernelDef; 3] {
    let MoeDims { e, k, .. } = m;
    let c = SORT_CHUNK;
    let chunk = chunk_range(k);
    let count = sort_count(e, k);
    let offsets = KernelDef::new(format!("moe_sort_offsets_e{e}"), "each expert's first row per chunk")
    .doc(format!(
        "// Turns the chunks' counts into rows, in place: counts[chunk · {e} + x] becomes the first row\n\
// of expert x's pairs in that chunk; offsets[x] is expert x's first row and offsets[{e}] the\n\
// rows in all. One block: a thread per expert over the chunks, then one over the experts.\n\
// counts: i32[chunks, {e}]; offsets: i32[{e} + 1]."
    ))
    .body(format!(
        "    __shared__ int total[{e}];
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        int acc = 0;
        for (long long c = 0; c < chunks; ++c) {{
            const int v = counts[c * {e} + x];
            counts[c * {e} + x] = acc;
            acc += v;
        }}
        total[x] = acc;
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
        int acc = 0;
        for (int x = 0; x < {e}; ++x) {{ offsets[x] = acc; acc += total[x]; }}
        offsets[{e}] = acc;
    }}
    __syncthreads();
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        for (long long c = 0; c < chunks; ++c) counts[c * {e} + x] += offsets[x];
    }}
"
    ));
    let scatter = KernelDef::new(
        format!("moe_sort_scatter_e{e}_k{k}"),
        "places each pair at its row",
    )
    .doc(format!(
        "// Places the pairs of each chunk of {c} at their rows, in pair order within an expert:\n\
// perm[row] = pair, row_of[pair] = row (-1 for an id outside the experts). A block per chunk,\n\
// in rounds of one pair per thread: a pair's row is its expert's next row in the chunk plus\n\
// the pairs of that expert before it in the round. Precondition: 256 threads per block.\n\
// experts: u32[n, {k}]; counts: i32[chunks, {e}] (first rows); perm, row_of: i32[n · {k}]."
    ))
    .body(format!(
        "    __shared__ int next[{e}];
    __shared__ unsigned round[256];
{chunk}
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) next[x] = counts[blockIdx.x * {e}LL + x];
    __syncthreads();
    for (long long r = start; r < end; r += blockDim.x) {{
        const long long p = r + threadIdx.x;
        const unsigned x = p < end ? experts[p] : 0xffffffffu;
        round[threadIdx.x] = x;
        __syncthreads();
        if (p < end) {{
            if (x < {e}) {{
                int rank = 0;
                for (unsigned j = 0; j < threadIdx.x; ++j) rank += round[j] == x;
                const int row = next[x] + rank;
                perm[row] = (int)p;
                row_of[p] = row;
            }} else {{
                row_of[p] = -1;
            }}
        }}
        __syncthreads();
        for (int y = threadIdx.x; y < {e}; y += blockDim.x) {{
            int seen = 0;
            for (unsigned j = 0; j < blockDim.x; ++j) seen += round[j] == (unsigned)y;
            next[y] += seen;
        }}
        __syncthreads();
    }}
"
    ));
    [count, offsets, scatter]
}

/// `out[row, c] = src[token(row), c]`: a token's row for each sorted (token, slot) pair, one
/// thread per element. The experts' GEMMs read their rows contiguously.
fn moe_gather(m: MoeDims) -> KernelDef {
    let MoeDims { k, d, .. } = m;
    KernelDef::new(
        format!("moe_gather_k{k}_d{d}"),
        "gathers each sorted pair's token row",
    )
    .doc(format!(
        "// Gathers the token row of each sorted (token, slot) pair: out[row, c] = src[perm[row] / {k}, c].\n\
// src: f32[n, {d}]; perm: i32[n · {k}]; out: f32[n · {k}, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long r = idx / {d}, c = idx % {d};
        out[idx] = src[((long long)perm[r] / {k}) * {d} + c];
    }}
",
        gs = grid_stride("    ", "idx", &format!("rows * {d}"))
    ))
}

/// The expert activation of every sorted row: `a = act(gate, up)`, one thread per element.
fn moe_act(m: MoeDims, act: &ExpertAct) -> KernelDef {
    let MoeDims { h, gated, .. } = m;
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["gate[idx]".into(), "up[idx]".into()]
    } else {
        vec!["up[idx]".into()]
    };
    let y = expr_forward(&act.compiled, &inputs, "        ", &mut body);
    let text = &act.text;
    KernelDef::new(format!("moe_act_{}", m.suffix()), "the experts' activation")
        .doc(format!(
            "// The routed experts' activation of each sorted row: a = {text}.\n\
// gate?, up, a: f32[n · k, {h}]."
        ))
        .body(format!(
            "\
{gs}{body}        a[idx] = {y};
    }}
",
            gs = grid_stride("    ", "idx", &format!("rows * {h}"))
        ))
}

/// The experts' backward row by row, one thread per sorted row: from `G = dy·W_down[e]` (the
/// gradient of the unweighted output's activation) and the row's gating weight ω, the
/// weighted activation `ω·a` (for dW_down), the gradients of the pre-activations
/// `ω·G·∂a/∂gate` and `ω·G·∂a/∂up`, and the gating weight's gradient `Σ_i G·a`, in the
/// interpreter's order.
fn moe_bwd_rows(m: MoeDims, act: &ExpertAct) -> KernelDef {
    let MoeDims { h, gated, .. } = m;
    let inputs: Vec<String> = if gated {
        vec!["gate[at]".into(), "up[at]".into()]
    } else {
        vec!["up[at]".into()]
    };
    let mut value = String::new();
    let y = expr_forward(&act.compiled, &inputs, "                ", &mut value);
    let mut grad = String::new();
    expr_gradient(
        &act.compiled,
        &inputs,
        "1.0f",
        "                ",
        &mut grad,
    );
    let (declare, keep, store) = if gated {
        (
            "float a, d_gate, d_up;",
            "d_gate = d0;\n                d_up = d1;",
            "            dg[at] = om * gv * d_gate;\n            du[at] = om * gv * d_up;\n",
        )
    } else {
        (
            "float a, d_up;",
            "d_up = d0;",
            "            du[at] = om * gv * d_up;\n",
        )
    };
    let text = &act.text;
    KernelDef::new(
        format!("moe_bwd_rows_{}", m.suffix()),
        "the experts' backward, row by row",
    )
    .doc(format!(
        "// Experts backward, one thread per sorted row, for a = {text} and the row's gating weight\n\
// ω = weights[perm[row]]: a_w = ω·a, {}du = ω·G·∂a/∂up and\n\
// d_weights[perm[row]] = Σ_i G[row, i] · a[row, i].\n\
// g (G = dy·W_down[e]), gate?, up, a_w, dg?, du: f32[n · k, {h}]; weights, d_weights: f32[n, k].",
        if gated { "dg = ω·G·∂a/∂gate, " } else { "" }
    ))
    .body(format!(
        "\
{gs}        const int pair = perm[r];
        const float om = weights[pair];
        float dot = 0.0f;
        for (long long i = 0; i < {h}; ++i) {{
            const long long at = r * {h} + i;
            const float gv = g[at];
            {declare}
            {{
{value}                a = {y};
            }}
            {{
{grad}                {keep}
            }}
            dot += gv * a;
            a_w[at] = om * a;
{store}        }}
        d_weights[pair] = dot;
    }}
",
        gs = grid_stride("    ", "r", "rows")
    ))
}

/// `y[t, c] = Σ_slot weights[t, slot] · out[row_of[t, slot], c]`, in slot order.
fn moe_combine(m: MoeDims) -> KernelDef {
    let MoeDims { k, d, .. } = m;
    KernelDef::new(format!("moe_combine_k{k}_d{d}"), "combines each token's experts")
    .doc(format!(
        "// Combines each token's experts in slot order: y[t, c] = Σ_j weights[t, j] · out[row_of[t, j], c].\n\
// weights: f32[n, {k}]; out: f32[n · {k}, {d}]; y: f32[n, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += weights[t * {k} + j] * out[(long long)r * {d} + c];
        }}
        y[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("n * {d}"))
    ))
}

/// `dx[t, c] = Σ_j dx_rows[row_of[t, j], c]`, in slot order.
fn moe_dx(m: MoeDims) -> KernelDef {
    let MoeDims { k, d, .. } = m;
    KernelDef::new(
        format!("moe_bwd_dx_k{k}_d{d}"),
        "the experts' input gradient per token",
    )
    .doc(format!(
        "// Experts backward: dx[t, c] = Σ_j dx_rows[row_of[t, j], c], in slot order.\n\
// dx_rows: f32[n · {k}, {d}]; dx: f32[n, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += dx_rows[(long long)r * {d} + c];
        }}
        dx[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("n * {d}"))
    ))
}

/// The scratch slots of an experts step. Forward and backward number them alike; the FP8
/// copies of the grouped GEMMs' operands take pairs from [`FIRST_FP8_SLOT`] on.
mod slots {
    pub const OFFSETS: u32 = 0;
    pub const PERM: u32 = 1;
    pub const ROW_OF: u32 = 2;
    pub const GATE: u32 = 3;
    pub const UP: u32 = 4;
    /// The activation forward, the weighted activation backward.
    pub const A: u32 = 5;
    pub const OUT: u32 = 6;
    pub const DYS: u32 = 7;
    pub const DG: u32 = 8;
    pub const DU: u32 = 9;
    pub const DX_ROWS: u32 = 10;
    pub const COUNTS: u32 = 11;
    pub const XS: u32 = 12;
    pub const G: u32 = 13;
    pub const FIRST_FP8_SLOT: u32 = 14;
}

/// One operand or output of a grouped GEMM: its buffer, and its width (elements per sorted
/// row, or per row of each group's matrix).
#[derive(Clone)]
struct Side {
    arg: Arg,
    trans: bool,
}

/// A grouped GEMM of an experts step before its FP8 operands are planned.
struct Grouped {
    contract_rows: bool,
    /// The fixed sizes, the grouped one being the total rows.
    m: u64,
    n: u64,
    k: u64,
    a: Side,
    b: Side,
    c: Arg,
    accumulate: bool,
}

impl Emitter<'_> {
    fn moe_dims(&self, node: &Node, gated: bool) -> MoeDims {
        let (n, d) = self.rows(node.inputs[0]);
        let k = self.shape(node.inputs[1])[1];
        let up = self.shape(node.inputs[if gated { 4 } else { 3 }]);
        MoeDims {
            n,
            d,
            k,
            e: up[0],
            h: up[1],
            gated,
        }
    }

    /// `g` in `format` for step `index`: the grouped GEMM, after the launches quantizing its
    /// operands when the format is FP8 (K-major copies in scratch pairs from `*next_slot`).
    fn grouped_gemm(
        &mut self,
        index: usize,
        m: MoeDims,
        format: Format,
        g: Grouped,
        next_slot: &mut u32,
    ) -> Vec<Work> {
        let offsets = scratch(slots::OFFSETS, (m.e + 1) * 4);
        let mut work = Vec::new();
        let fp8 = format.is_fp8().then(|| {
            let rows = m.n * m.k;
            let mut take = || {
                let s = *next_slot;
                *next_slot += 2;
                s
            };
            let (a, b) = if g.contract_rows {
                // Both contracted over the rows: each group's columns in tiles along them.
                let a = self.group_tiles(index, format, (m.e, rows), &g.a.arg, g.m, take());
                let b = self.group_tiles(index, format, (m.e, rows), &g.b.arg, g.n, take());
                (a, b)
            } else {
                // The sorted rows in tiles along k; the experts' weights in blocks.
                let a = self.row_tiles(index, format, &g.a.arg, rows, g.k, take());
                let b =
                    self.expert_blocks(index, format, m.e, &g.b.arg, !g.b.trans, g.n, g.k, take());
                (a, b)
            };
            work.extend([a.1, b.1]);
            Fp8Gemm {
                format,
                a: a.0,
                b: b.0,
            }
        });
        work.push(Work::GroupedGemm(GroupedGemm {
            offsets,
            groups: m.e,
            contract_rows: g.contract_rows,
            m: g.m,
            n: g.n,
            k: g.k,
            a: g.a.arg,
            a_trans: g.a.trans,
            b: g.b.arg,
            b_trans: g.b.trans,
            c: g.c,
            accumulate: g.accumulate,
            format,
            fp8,
        }));
        work
    }

    /// The sort, the gather of the routed tokens' rows and the hidden layer's GEMMs that
    /// forward and backward both run (the forward adds the activation `act` and the down
    /// projection), the GEMMs in `format`.
    fn moe_front(
        &mut self,
        index: usize,
        node: &Node,
        m: MoeDims,
        format: Format,
        act: Option<&ExpertAct>,
        next_slot: &mut u32,
    ) -> Vec<Work> {
        let rows = m.n * m.k;
        let (x, ids) = (node.inputs[0], node.inputs[2]);
        let (w_up, w_down) = if m.gated {
            (node.inputs[4], node.inputs[5])
        } else {
            (node.inputs[3], node.inputs[4])
        };
        let chunks = rows.div_ceil(SORT_CHUNK).max(1);
        let counts = scratch(slots::COUNTS, chunks * m.e * 4);
        let perm = scratch(slots::PERM, rows * 4);
        let [count, sort_offsets, scatter] = moe_sort(m);
        let count = count
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("counts", Elem::I32, Pass::Write, counts.clone())
            .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
            .long("n", m.n);
        let sort_offsets = sort_offsets
            .param("counts", Elem::I32, Pass::Write, counts.clone())
            .param(
                "offsets",
                Elem::I32,
                Pass::Write,
                scratch(slots::OFFSETS, (m.e + 1) * 4),
            )
            .long("chunks", chunks);
        let scatter = scatter
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("counts", Elem::I32, Pass::Read, counts)
            .param("perm", Elem::I32, Pass::Write, perm.clone())
            .param(
                "row_of",
                Elem::I32,
                Pass::Write,
                scratch(slots::ROW_OF, rows * 4),
            )
            .long("n", m.n);
        let xs = scratch(slots::XS, rows * m.d * 4);
        let gather = self.moe_gather_launch(index, m, val(x), xs.clone());
        let mut work = vec![
            self.work(index, count, Grid::Blocks(chunks)),
            self.work(index, sort_offsets, Grid::Blocks(1)),
            self.work(index, scatter, Grid::Blocks(chunks)),
            gather,
        ];
        // gate = xs·W_gate[e]ᵀ, up = xs·W_up[e]ᵀ: [rows_e, h] per expert.
        let hidden = |w: ValueId, c: Arg| Grouped {
            contract_rows: false,
            m: rows,
            n: m.h,
            k: m.d,
            a: Side {
                arg: xs.clone(),
                trans: false,
            },
            b: Side {
                arg: val(w),
                trans: true,
            },
            c,
            accumulate: false,
        };
        let (gate, up) = (
            scratch(slots::GATE, if m.gated { rows * m.h * 4 } else { 4 }),
            scratch(slots::UP, rows * m.h * 4),
        );
        work.extend(self.grouped_gemm(index, m, format, hidden(w_up, up.clone()), next_slot));
        if m.gated {
            let gemm = hidden(node.inputs[3], gate.clone());
            work.extend(self.grouped_gemm(index, m, format, gemm, next_slot));
        }
        if let Some(act) = act {
            let a = scratch(slots::A, rows * m.h * 4);
            let mut def = moe_act(m, act);
            if m.gated {
                def = def.read("gate", gate);
            }
            let def = def.read("up", up).write("a", a.clone()).long("rows", rows);
            work.push(self.work(index, def, Grid::Threads(rows * m.h)));
            // out = a·W_down[e]ᵀ: [rows_e, d] per expert.
            let down = Grouped {
                contract_rows: false,
                m: rows,
                n: m.d,
                k: m.h,
                a: Side {
                    arg: a,
                    trans: false,
                },
                b: Side {
                    arg: val(w_down),
                    trans: true,
                },
                c: scratch(slots::OUT, rows * m.d * 4),
                accumulate: false,
            };
            work.extend(self.grouped_gemm(index, m, format, down, next_slot));
        }
        work
    }

    fn moe_gather_launch(&mut self, index: usize, m: MoeDims, src: Arg, out: Arg) -> Work {
        let rows = m.n * m.k;
        let def = moe_gather(m)
            .read("src", src)
            .param(
                "perm",
                Elem::I32,
                Pass::Read,
                scratch(slots::PERM, rows * 4),
            )
            .write("out", out)
            .long("rows", rows);
        self.work(index, def, Grid::Threads(rows * m.d))
    }

    pub(super) fn experts(
        &mut self,
        index: usize,
        node: &Node,
        act: &Expr,
        gated: bool,
    ) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let mut next_slot = slots::FIRST_FP8_SLOT;
        let act = ExpertAct::of(act, gated);
        let mut work = self.moe_front(index, node, m, node.format, Some(&act), &mut next_slot);
        let rows = m.n * m.k;
        let combine = moe_combine(m)
            .read("weights", val(node.inputs[1]))
            .param(
                "row_of",
                Elem::I32,
                Pass::Read,
                scratch(slots::ROW_OF, rows * 4),
            )
            .read("out", scratch(slots::OUT, rows * m.d * 4))
            .write("y", val(node.outputs[0]))
            .long("n", m.n);
        work.push(self.work(index, combine, Grid::Threads(m.n * m.d)));
        work
    }

    /// `(x, weights, experts, w_gate?, w_up, w_down, dy) -> (dx, d_weights, dw_gate?, dw_up,
    /// dw_down)`, as the interpreter computes it: the forward's sort and hidden layer again (in
    /// the forward node's format), then per expert `G = dy·W_down[e]`, the row-wise
    /// gradients, `dx = du·W_up[e] (+ dg·W_gate[e])` summed per token, and the weight
    /// gradients `dW_down[e] = dyᵀ·(ω·a)`, `dW_up[e] = duᵀ·x`, `dW_gate[e] = dgᵀ·x` over the
    /// expert's rows.
    pub(super) fn experts_grad(
        &mut self,
        index: usize,
        node: &Node,
        act: &Expr,
        gated: bool,
    ) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let act = ExpertAct::of(act, gated);
        let forward_format = self
            .graph
            .experts_forward()
            .get(&index)
            .map_or(node.format, |&f| {
                self.graph.nodes[crate::ir::NodeId::from_index(f)].format
            });
        let mut next_slot = slots::FIRST_FP8_SLOT;
        let mut work = self.moe_front(index, node, m, forward_format, None, &mut next_slot);
        let rows = m.n * m.k;
        let i = &node.inputs;
        let o = &node.outputs;
        let (weights, dy) = (i[1], *i.last().expect("dy"));
        let (w_gate, w_up, w_down) = if gated {
            (Some(i[3]), i[4], i[5])
        } else {
            (None, i[3], i[4])
        };
        let (dx, d_weights) = (o[0], o[1]);
        let (dw_gate, dw_up, dw_down) = if gated {
            (Some(o[2]), o[3], o[4])
        } else {
            (None, o[2], o[3])
        };
        let hw = rows * m.h * 4;
        let (dys, g, a_w, dg, du, dx_rows, xs) = (
            scratch(slots::DYS, rows * m.d * 4),
            scratch(slots::G, hw),
            scratch(slots::A, hw),
            scratch(slots::DG, if gated { hw } else { 4 }),
            scratch(slots::DU, hw),
            scratch(slots::DX_ROWS, rows * m.d * 4),
            scratch(slots::XS, rows * m.d * 4),
        );
        let format = node.format;
        work.push(self.moe_gather_launch(index, m, val(dy), dys.clone()));
        // G = dys·W_down[e]: [rows_e, h] per expert (W_down[e] is [d, h]).
        let side = |arg: &Arg, trans: bool| Side {
            arg: arg.clone(),
            trans,
        };
        let g_gemm = Grouped {
            contract_rows: false,
            m: rows,
            n: m.h,
            k: m.d,
            a: side(&dys, false),
            b: side(&val(w_down), false),
            c: g.clone(),
            accumulate: false,
        };
        work.extend(self.grouped_gemm(index, m, format, g_gemm, &mut next_slot));
        let perm = scratch(slots::PERM, rows * 4);
        let mut def = moe_bwd_rows(m, &act)
            .param("perm", Elem::I32, Pass::Read, perm)
            .read("weights", val(weights))
            .read("g", g);
        if gated {
            def = def.read("gate", scratch(slots::GATE, hw));
        }
        def = def
            .read("up", scratch(slots::UP, hw))
            .write("a_w", a_w.clone());
        if gated {
            def = def.write("dg", dg.clone());
        }
        let def = def
            .write("du", du.clone())
            .write("d_weights", val(d_weights))
            .long("rows", rows);
        work.push(self.work(index, def, Grid::Threads(rows)));
        // dx_rows = du·W_up[e] (+ dg·W_gate[e]): [rows_e, d] per expert (W_up[e] is [h, d]).
        let dx_gemm = |a: &Arg, w: ValueId, accumulate: bool| Grouped {
            contract_rows: false,
            m: rows,
            n: m.d,
            k: m.h,
            a: side(a, false),
            b: side(&val(w), false),
            c: dx_rows.clone(),
            accumulate,
        };
        work.extend(self.grouped_gemm(index, m, format, dx_gemm(&du, w_up, false), &mut next_slot));
        if let Some(w_gate) = w_gate {
            let gemm = dx_gemm(&dg, w_gate, true);
            work.extend(self.grouped_gemm(index, m, format, gemm, &mut next_slot));
        }
        let dx_def = moe_dx(m)
            .param(
                "row_of",
                Elem::I32,
                Pass::Read,
                scratch(slots::ROW_OF, rows * 4),
            )
            .read("dx_rows", dx_rows)
            .write("dx", val(dx))
            .long("n", m.n);
        work.push(self.work(index, dx_def, Grid::Threads(m.n * m.d)));
        // Weight gradients over each expert's rows: dW[e] = lhsᵀ·rhs.
        let wgrad = |lhs: &Arg, p: u64, rhs: &Arg, q: u64, out: ValueId| Grouped {
            contract_rows: true,
            m: p,
            n: q,
            k: rows,
            a: side(lhs, true),
            b: side(rhs, false),
            c: val(out),
            accumulate: false,
        };
        let mut grads = vec![
            wgrad(&dys, m.d, &a_w, m.h, dw_down),
            wgrad(&du, m.h, &xs, m.d, dw_up),
        ];
        if let (Some(dw_gate), true) = (dw_gate, gated) {
            grads.push(wgrad(&dg, m.h, &xs, m.d, dw_gate));
        }
        for gemm in grads {
            work.extend(self.grouped_gemm(index, m, format, gemm, &mut next_slot));
        }
        work
    }
}

/// Scratch slot `slot` of `bytes` (at least 4).
fn scratch(slot: u32, bytes: u64) -> Arg {
    Arg::Scratch {
        slot,
        bytes: bytes.max(4),
    }
}
