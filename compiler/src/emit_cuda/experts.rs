//! The routed experts: sorting (token, slot) pairs by expert, the hidden layer with its
//! activation, the down projection and the weighted combine, and their backward kernels.

use std::collections::HashMap;

use super::expr::{expr_forward, expr_gradient};
use super::{grid_stride, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work};
use crate::dsl::expr::{Compiled, Expr};
use crate::ir::{Node, ValueId};
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

/// The expert hidden layer for every sorted row: `gate = x·W_gate[e]ᵀ`, `up = x·W_up[e]ᵀ` and
/// `a = act(gate, up)`, one thread per (row, hidden unit).
fn moe_hidden(m: MoeDims, act: &Compiled, act_text: &str) -> KernelDef {
    let MoeDims { k, d, h, gated, .. } = m;
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["g".into(), "u".into()]
    } else {
        vec!["u".into()]
    };
    let y = expr_forward(act, &inputs, "        ", &mut body);
    let gate_dot = if gated {
        format!(
                "        float g = 0.0f;\n        for (int c = 0; c < {d}; ++c) g += xr[c] * w_gate[(e * {h} + i) * {d} + c];\n        gate[r * {h} + i] = g;\n"
        )
    } else {
        String::new()
    };
    KernelDef::new(format!("moe_hidden_{}", m.suffix()), "the experts' hidden layer")
    .doc(format!(
        "// The routed experts' hidden layer, one thread per (sorted row, hidden unit): for the row's\n\
// token x and expert e, {}up = x·W_up[e]ᵀ and a = {act_text}.\n\
// x: f32[n, {d}]; experts: u32[n, {k}]; w_gate?, w_up: f32[E, {h}, {d}]; gate?, up, a: f32[n · {k}, {h}].",
        if gated { "gate = x·W_gate[e]ᵀ, " } else { "" }
    ))
    .body(format!(
        "\
{gs}        const long long r = idx / {h}, i = idx % {h};
        const long long pair = perm[r];
        const long long e = experts[pair];
        const float* xr = x + (pair / {k}) * {d};
{gate_dot}        float u = 0.0f;
        for (int c = 0; c < {d}; ++c) u += xr[c] * w_up[(e * {h} + i) * {d} + c];
        up[r * {h} + i] = u;
{body}        a[r * {h} + i] = {y};
    }}
",
        gs = grid_stride("    ", "idx", &format!("rows * {h}"))
    ))
}

/// `out[row, c] = Σ_i a[row, i] · W_down[e][c, i]`, one thread per (sorted row, column).
fn moe_down(m: MoeDims) -> KernelDef {
    let MoeDims { k, d, h, .. } = m;
    KernelDef::new(
        format!("moe_down_{}", m.suffix()),
        "the experts' down projection",
    )
    .doc(format!(
        "// The routed experts' down projection, one thread per (sorted row, output column):\n\
// out[row, c] = Σ_i a[row, i] · W_down[e][c, i].\n\
// a: f32[n · {k}, {h}]; w_down: f32[E, {d}, {h}]; out: f32[n · {k}, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += a[r * {h} + i] * w_down[(e * {d} + c) * {h} + i];
        out[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("rows * {d}"))
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

/// The experts' backward kernels (after the forward's sort, hidden layer and down projection
/// ran again): the weights' gradient, the weighted output gradient, the hidden gradient
/// through the activation, the input gradient, and the weight gradients per expert, each
/// output element summed by one thread in a fixed order.
fn moe_bwd(m: MoeDims, act: &Compiled, act_text: &str) -> HashMap<&'static str, KernelDef> {
    let MoeDims { k, d, h, gated, .. } = m;
    let dweights = KernelDef::new("", "the experts' backward")
    .doc(format!(
        "// Experts backward: d_weights[t, j] = dy[t, :] · out[row_of[t, j], :], one thread per pair.\n\
// dy: f32[n, {d}]; out: f32[n · {k}, {d}]; d_weights: f32[n, {k}]."
    ))
    .body(format!(
        "\
{gs}        const int r = row_of[p];
        float acc = 0.0f;
        if (r >= 0) for (int c = 0; c < {d}; ++c) acc += dy[(p / {k}) * {d} + c] * out[(long long)r * {d} + c];
        d_weights[p] = acc;
    }}
",
        gs = grid_stride("    ", "p", &format!("n * {k}"))
    ));
    let gout = KernelDef::new("", "the experts' backward")
    .doc(format!(
        "// Experts backward: the gradient of each sorted row's down output, weights[pair] · dy[token].\n\
// weights: f32[n, {k}]; dy: f32[n, {d}]; gout: f32[n · {k}, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long r = idx / {d}, c = idx % {d};
        const long long pair = perm[r];
        gout[idx] = weights[pair] * dy[(pair / {k}) * {d} + c];
    }}
",
        gs = grid_stride("    ", "idx", &format!("rows * {d}"))
    ));
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["gate[r * H + i]".into(), "up[r * H + i]".into()]
    } else {
        vec!["up[r * H + i]".into()]
    };
    expr_gradient(act, &inputs, "da", "        ", &mut body);
    let stores = if gated {
        "        dg[r * H + i] = d0;\n        du[r * H + i] = d1;\n"
    } else {
        "        du[r * H + i] = d0;\n"
    };
    let da = KernelDef::new("", "the experts' backward")
        .doc(format!(
            "// Experts backward: da[row, i] = Σ_c gout[row, c] · W_down[e][c, i], then through\n\
// a = {act_text} to the gradients of the pre-activations{}.\n\
// gout: f32[n · {k}, {d}]; w_down: f32[E, {d}, {h}]; gate?, up, dg?, du: f32[n · {k}, {h}].",
            if gated { " (gate and up)" } else { "" }
        ))
        .body(format!(
            "    constexpr long long H = {h};
{gs}        const long long r = idx / H, i = idx % H;
        const long long e = experts[perm[r]];
        float da = 0.0f;
        for (int c = 0; c < {d}; ++c) da += gout[r * {d} + c] * w_down[(e * {d} + c) * H + i];
{body}{stores}    }}
",
            gs = grid_stride("    ", "idx", "rows * H")
        ));
    let gate_term = if gated {
        "dg[r * {h} + i] * w_gate[(e * {h} + i) * {d} + c] + "
            .replace("{h}", &h.to_string())
            .replace("{d}", &d.to_string())
    } else {
        String::new()
    };
    let dxs = KernelDef::new("", "the experts' backward")
    .doc(format!(
        "// Experts backward: each sorted row's input gradient,\n\
// dxs[row, c] = Σ_i {}du[row, i] · W_up[e][i, c].\n\
// dg?, du: f32[n · {k}, {h}]; w_gate?, w_up: f32[E, {h}, {d}]; dxs: f32[n · {k}, {d}].",
        if gated { "dg[row, i] · W_gate[e][i, c] + " } else { "" }
    ))
    .body(format!(
        "\
{gs}        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += {gate_term}du[r * {h} + i] * w_up[(e * {h} + i) * {d} + c];
        dxs[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("rows * {d}"))
    ));
    let dx = KernelDef::new("", "the experts' backward")
        .doc(format!(
            "// Experts backward: dx[t, c] = Σ_j dxs[row_of[t, j], c], in slot order.\n\
// dxs: f32[n · {k}, {d}]; dx: f32[n, {d}]."
        ))
        .body(format!(
            "\
{gs}        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += dxs[(long long)r * {d} + c];
        }}
        dx[idx] = acc;
    }}
",
            gs = grid_stride("    ", "idx", &format!("n * {d}"))
        ));
    let dw_down = KernelDef::new("", "the experts' backward")
    .doc(format!(
        "// Experts backward: dW_down[e][c, i] = Σ over expert e's rows of gout[row, c] · a[row, i].\n\
// gout: f32[n · {k}, {d}]; a: f32[n · {k}, {h}]; dw_down: f32[E, {d}, {h}]."
    ))
    .body(format!(
        "\
{gs}        const long long e = idx / ({d} * {h}), c = (idx / {h}) % {d}, i = idx % {h};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += gout[(long long)r * {d} + c] * a[(long long)r * {h} + i];
        dw_down[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("experts * {d} * {h}"))
    ));
    let dw_in = KernelDef::new("", "the experts' backward")
    .doc(format!(
        "// Experts backward: dW[e][i, c] = Σ over expert e's rows of g[row, i] · x[token(row), c], for\n\
// the up projection (g = du) or the gate (g = dg).\n\
// g: f32[n · {k}, {h}]; x: f32[n, {d}]; dw: f32[E, {h}, {d}]."
    ))
    .body(format!(
        "\
{gs}        const long long e = idx / ({h} * {d}), i = (idx / {d}) % {h}, c = idx % {d};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += g[(long long)r * {h} + i] * x[(perm[r] / {k}) * {d} + c];
        dw[idx] = acc;
    }}
",
        gs = grid_stride("    ", "idx", &format!("experts * {h} * {d}"))
    ));
    [
        ("dweights", dweights),
        ("gout", gout),
        ("da", da),
        ("dxs", dxs),
        ("dx", dx),
        ("dw_down", dw_down),
        ("dw_in", dw_in),
    ]
    .into_iter()
    .map(|(what, def)| {
        let base = match what {
            "dx" | "dweights" | "gout" => format!("moe_bwd_{what}_k{k}_d{d}"),
            _ => format!("moe_bwd_{what}_{}", m.suffix()),
        };
        (what, def.rename(base))
    })
    .collect()
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

    /// The sort, hidden layer and down projection that forward and backward both run; returns
    /// the work and the scratch slots (offsets, perm, row_of, gate, up, a, out; slot 11 holds the
    /// sort's per-chunk counts).
    fn moe_front(
        &mut self,
        index: usize,
        node: &Node,
        m: MoeDims,
        act: &ExpertAct,
    ) -> (Vec<Work>, [Arg; 7]) {
        let rows = m.n * m.k;
        let slot = |s: u32, bytes: u64| Arg::Scratch {
            slot: s,
            bytes: bytes.max(4),
        };
        let slots = [
            slot(0, (m.e + 1) * 4),
            slot(1, rows * 4),
            slot(2, rows * 4),
            slot(3, if m.gated { rows * m.h * 4 } else { 4 }),
            slot(4, rows * m.h * 4),
            slot(5, rows * m.h * 4),
            slot(6, rows * m.d * 4),
        ];
        let [offsets, perm, row_of, gate, up, a, out] = slots.clone();
        let (x, ids) = (node.inputs[0], node.inputs[2]);
        let (w_up, w_down) = if m.gated {
            (node.inputs[4], node.inputs[5])
        } else {
            (node.inputs[3], node.inputs[4])
        };
        let chunks = rows.div_ceil(SORT_CHUNK).max(1);
        let counts = slot(11, chunks * m.e * 4);
        let [count, sort_offsets, scatter] = moe_sort(m);
        let count = count
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("counts", Elem::I32, Pass::Write, counts.clone())
            .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
            .long("n", m.n);
        let sort_offsets = sort_offsets
            .param("counts", Elem::I32, Pass::Write, counts.clone())
            .param("offsets", Elem::I32, Pass::Write, offsets)
            .long("chunks", chunks);
        let scatter = scatter
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("counts", Elem::I32, Pass::Read, counts)
            .param("perm", Elem::I32, Pass::Write, perm.clone())
            .param("row_of", Elem::I32, Pass::Write, row_of)
            .long("n", m.n);
        let mut hidden = moe_hidden(m, &act.compiled, &act.text)
            .read("x", val(x))
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("perm", Elem::I32, Pass::Read, perm.clone());
        if m.gated {
            hidden = hidden.read("w_gate", val(node.inputs[3]));
        }
        hidden = hidden.read("w_up", val(w_up));
        if m.gated {
            hidden = hidden.write("gate", gate);
        }
        let hidden = hidden
            .write("up", up)
            .write("a", a.clone())
            .long("rows", rows);
        let down = moe_down(m)
            .read("a", a)
            .param("experts", Elem::U32, Pass::Read, val(ids))
            .param("perm", Elem::I32, Pass::Read, perm)
            .read("w_down", val(w_down))
            .write("out", out)
            .long("rows", rows);
        let work = vec![
            self.work(index, count, Grid::Blocks(chunks)),
            self.work(index, sort_offsets, Grid::Blocks(1)),
            self.work(index, scatter, Grid::Blocks(chunks)),
            self.work(index, hidden, Grid::Threads(rows * m.h)),
            self.work(index, down, Grid::Threads(rows * m.d)),
        ];
        (work, slots)
    }

    pub(super) fn experts(
        &mut self,
        index: usize,
        node: &Node,
        act: &Expr,
        gated: bool,
    ) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let (mut work, slots) = self.moe_front(index, node, m, &ExpertAct::of(act, gated));
        let [_, _, row_of, _, _, _, out] = slots;
        let combine = moe_combine(m)
            .read("weights", val(node.inputs[1]))
            .param("row_of", Elem::I32, Pass::Read, row_of)
            .read("out", out)
            .write("y", val(node.outputs[0]))
            .long("n", m.n);
        work.push(self.work(index, combine, Grid::Threads(m.n * m.d)));
        work
    }

    /// `(x, weights, experts, w_gate?, w_up, w_down, dy) -> (dx, d_weights, dw_gate?, dw_up,
    /// dw_down)`.
    pub(super) fn experts_grad(
        &mut self,
        index: usize,
        node: &Node,
        act: &Expr,
        gated: bool,
    ) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let act = ExpertAct::of(act, gated);
        let (mut work, slots) = self.moe_front(index, node, m, &act);
        let [offsets, perm, row_of, gate, up, a, out] = slots;
        let rows = m.n * m.k;
        let mut defs = moe_bwd(m, &act.compiled, &act.text);
        let mut def = |what: &str| defs.remove(what).expect("every backward kernel is defined");
        let i = &node.inputs;
        let o = &node.outputs;
        let (x, weights, ids, dy) = (i[0], i[1], i[2], *i.last().expect("dy"));
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
        let slot = |s: u32, bytes: u64| Arg::Scratch {
            slot: s,
            bytes: bytes.max(4),
        };
        let (gout, dg, du, dxs) = (
            slot(7, rows * m.d * 4),
            slot(8, if gated { rows * m.h * 4 } else { 4 }),
            slot(9, rows * m.h * 4),
            slot(10, rows * m.d * 4),
        );
        // Without a gate, the gate's slots are unused placeholders the kernels never read.
        let w_gate_arg = w_gate.map_or(up.clone(), val);
        let int_ptr =
            |def: KernelDef, name: &str, arg: Arg| def.param(name, Elem::I32, Pass::Read, arg);
        let ids_ptr = |def: KernelDef| def.param("experts", Elem::U32, Pass::Read, val(ids));
        let dweights = int_ptr(
            def("dweights").read("dy", val(dy)),
            "row_of",
            row_of.clone(),
        )
        .read("out", out)
        .write("d_weights", val(d_weights))
        .long("n", m.n);
        let gout_def = int_ptr(
            def("gout").read("weights", val(weights)),
            "perm",
            perm.clone(),
        )
        .read("dy", val(dy))
        .write("gout", gout.clone())
        .long("rows", rows);
        let da = int_ptr(
            ids_ptr(def("da").read("gout", gout.clone())),
            "perm",
            perm.clone(),
        )
        .read("w_down", val(w_down))
        .read("gate", gate)
        .read("up", up)
        .write("dg", dg.clone())
        .write("du", du.clone())
        .long("rows", rows);
        let dxs_def = int_ptr(
            ids_ptr(def("dxs").read("dg", dg.clone()).read("du", du.clone())),
            "perm",
            perm.clone(),
        )
        .read("w_gate", w_gate_arg)
        .read("w_up", val(w_up))
        .write("dxs", dxs.clone())
        .long("rows", rows);
        let dx_def = int_ptr(def("dx").read("dxs", dxs), "row_of", row_of)
            .write("dx", val(dx))
            .long("n", m.n);
        let dw_down_def = int_ptr(
            def("dw_down").read("gout", gout).read("a", a),
            "offsets",
            offsets.clone(),
        )
        .write("dw_down", val(dw_down))
        .long("experts", m.e);
        let dw_in = def("dw_in");
        // The up projection's weight gradient from du, the gate's from dg: one kernel.
        let dw_in_of = |g: Arg, dw: ValueId| {
            int_ptr(
                int_ptr(
                    dw_in.clone().read("g", g).read("x", val(x)),
                    "perm",
                    perm.clone(),
                ),
                "offsets",
                offsets.clone(),
            )
            .write("dw", val(dw))
            .long("experts", m.e)
        };
        let experts_out = m.e * m.h * m.d;
        work.extend([
            self.work(index, dweights, Grid::Threads(rows)),
            self.work(index, gout_def, Grid::Threads(rows * m.d)),
            self.work(index, da, Grid::Threads(rows * m.h)),
            self.work(index, dxs_def, Grid::Threads(rows * m.d)),
            self.work(index, dx_def, Grid::Threads(m.n * m.d)),
            self.work(index, dw_down_def, Grid::Threads(experts_out)),
            self.work(index, dw_in_of(du, dw_up), Grid::Threads(experts_out)),
        ]);
        if let Some(dw_gate) = dw_gate {
            work.push(self.work(index, dw_in_of(dg, dw_gate), Grid::Threads(experts_out)));
        }
        work
    }
}
