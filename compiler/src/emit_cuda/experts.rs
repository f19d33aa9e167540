//! The routed experts: sorting (token, slot) pairs by expert, the hidden layer with its
//! activation, the down projection and the weighted combine, and their backward kernels.

use std::collections::HashMap;

use super::expr::{expr_forward, expr_gradient};
use super::{elementwise_launch, int, val, Arg, Emitter, Launch, Work, BLOCK, NAME};
use crate::dsl::expr::{Compiled, Expr};
use crate::ir::Node;
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

/// Sorts the (token, slot) pairs by expert, stably: `offsets[e]..offsets[e + 1]` are expert
/// `e`'s rows, `perm[row]` is the pair at a sorted row and `row_of[pair]` its inverse. One
/// block; thread `e` places expert `e`'s pairs in pair order. An id outside the experts sets
/// *error = 3 and goes nowhere.
fn moe_sort_text(m: MoeDims) -> String {
    let MoeDims { e, k, .. } = m;
    format!(
        "\
// Sorts the (token, slot) pairs by expert, stably (counting sort): offsets[e]..offsets[e + 1]
// are expert e's rows, perm[row] the pair at a sorted row, row_of[pair] its row. One block.
// experts: u32[n, {k}]; offsets: i32[{e} + 1]; perm, row_of: i32[n · {k}].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const unsigned* __restrict__ experts, int* __restrict__ offsets, int* __restrict__ perm, int* __restrict__ row_of, int* __restrict__ error, long long n) {{
    __shared__ int counts[{e}];
    const long long pairs = n * {k};
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        int c = 0;
        for (long long p = 0; p < pairs; ++p) c += experts[p] == (unsigned)x;
        counts[x] = c;
    }}
    if (threadIdx.x == 0) {{
        for (long long p = 0; p < pairs; ++p) {{
            if (experts[p] >= {e}) {{ *error = 3; row_of[p] = -1; }}
        }}
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
        int acc = 0;
        for (int x = 0; x < {e}; ++x) {{ offsets[x] = acc; acc += counts[x]; }}
        offsets[{e}] = acc;
    }}
    __syncthreads();
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        int row = offsets[x];
        for (long long p = 0; p < pairs; ++p) {{
            if (experts[p] == (unsigned)x) {{ perm[row] = (int)p; row_of[p] = row; ++row; }}
        }}
    }}
}}
"
    )
}

/// The expert hidden layer for every sorted row: `gate = x·W_gate[e]ᵀ`, `up = x·W_up[e]ᵀ` and
/// `a = act(gate, up)`, one thread per (row, hidden unit).
fn moe_hidden_text(m: MoeDims, act: &Compiled, act_text: &str) -> String {
    let MoeDims { k, d, h, gated, .. } = m;
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["g".into(), "u".into()]
    } else {
        vec!["u".into()]
    };
    let y = expr_forward(act, &inputs, "        ", &mut body);
    let (gate_param, gate_out, gate_dot) = if gated {
        (
            "const float* __restrict__ w_gate, ",
            "float* __restrict__ gate, ",
            format!(
                "        float g = 0.0f;\n        for (int c = 0; c < {d}; ++c) g += xr[c] * w_gate[(e * {h} + i) * {d} + c];\n        gate[r * {h} + i] = g;\n"
            ),
        )
    } else {
        ("", "", String::new())
    };
    format!(
        "\
// The routed experts' hidden layer, one thread per (sorted row, hidden unit): for the row's
// token x and expert e, {}up = x·W_up[e]ᵀ and a = {act_text}.
// x: f32[n, {d}]; experts: u32[n, {k}]; w_gate?, w_up: f32[E, {h}, {d}]; gate?, up, a: f32[n · {k}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ x, const unsigned* __restrict__ experts, const int* __restrict__ perm, {gate_param}const float* __restrict__ w_up, {gate_out}float* __restrict__ up, float* __restrict__ a, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {h};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {h}, i = idx % {h};
        const long long pair = perm[r];
        const long long e = experts[pair];
        const float* xr = x + (pair / {k}) * {d};
{gate_dot}        float u = 0.0f;
        for (int c = 0; c < {d}; ++c) u += xr[c] * w_up[(e * {h} + i) * {d} + c];
        up[r * {h} + i] = u;
{body}        a[r * {h} + i] = {y};
    }}
}}
",
        if gated { "gate = x·W_gate[e]ᵀ, " } else { "" }
    )
}

/// `out[row, c] = Σ_i a[row, i] · W_down[e][c, i]`, one thread per (sorted row, column).
fn moe_down_text(m: MoeDims) -> String {
    let MoeDims { k, d, h, .. } = m;
    format!(
        "\
// The routed experts' down projection, one thread per (sorted row, output column):
// out[row, c] = Σ_i a[row, i] · W_down[e][c, i].
// a: f32[n · {k}, {h}]; w_down: f32[E, {d}, {h}]; out: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ a, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_down, float* __restrict__ out, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += a[r * {h} + i] * w_down[(e * {d} + c) * {h} + i];
        out[idx] = acc;
    }}
}}
"
    )
}

/// `y[t, c] = Σ_slot weights[t, slot] · out[row_of[t, slot], c]`, in slot order.
fn moe_combine_text(m: MoeDims) -> String {
    let MoeDims { k, d, .. } = m;
    format!(
        "\
// Combines each token's experts in slot order: y[t, c] = Σ_j weights[t, j] · out[row_of[t, j], c].
// weights: f32[n, {k}]; out: f32[n · {k}, {d}]; y: f32[n, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ weights, const int* __restrict__ row_of, const float* __restrict__ out, float* __restrict__ y, long long n) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += weights[t * {k} + j] * out[(long long)r * {d} + c];
        }}
        y[idx] = acc;
    }}
}}
"
    )
}

/// The experts' backward kernels (after the forward's sort, hidden layer and down projection
/// ran again): the weights' gradient, the weighted output gradient, the hidden gradient
/// through the activation, the input gradient, and the weight gradients per expert, each
/// output element summed by one thread in a fixed order.
fn moe_bwd_texts(m: MoeDims, act: &Compiled, act_text: &str) -> Vec<(&'static str, String)> {
    let MoeDims { k, d, h, gated, .. } = m;
    let dweights = format!(
        "\
// Experts backward: d_weights[t, j] = dy[t, :] · out[row_of[t, j], :], one thread per pair.
// dy: f32[n, {d}]; out: f32[n · {k}, {d}]; d_weights: f32[n, {k}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dy, const int* __restrict__ row_of, const float* __restrict__ out, float* __restrict__ d_weights, long long n) {{
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < n * {k};
         p += (long long)gridDim.x * blockDim.x) {{
        const int r = row_of[p];
        float acc = 0.0f;
        if (r >= 0) for (int c = 0; c < {d}; ++c) acc += dy[(p / {k}) * {d} + c] * out[(long long)r * {d} + c];
        d_weights[p] = acc;
    }}
}}
"
    );
    let gout = format!(
        "\
// Experts backward: the gradient of each sorted row's down output, weights[pair] · dy[token].
// weights: f32[n, {k}]; dy: f32[n, {d}]; gout: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ weights, const int* __restrict__ perm, const float* __restrict__ dy, float* __restrict__ gout, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long pair = perm[r];
        gout[idx] = weights[pair] * dy[(pair / {k}) * {d} + c];
    }}
}}
"
    );
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
    let da = format!(
        "\
// Experts backward: da[row, i] = Σ_c gout[row, c] · W_down[e][c, i], then through
// a = {act_text} to the gradients of the pre-activations{}.
// gout: f32[n · {k}, {d}]; w_down: f32[E, {d}, {h}]; gate?, up, dg?, du: f32[n · {k}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ gout, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_down, const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ dg, float* __restrict__ du, long long rows) {{
    constexpr long long H = {h};
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * H;
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / H, i = idx % H;
        const long long e = experts[perm[r]];
        float da = 0.0f;
        for (int c = 0; c < {d}; ++c) da += gout[r * {d} + c] * w_down[(e * {d} + c) * H + i];
{body}{stores}    }}
}}
",
        if gated { " (gate and up)" } else { "" }
    );
    let gate_term = if gated {
        "dg[r * {h} + i] * w_gate[(e * {h} + i) * {d} + c] + "
            .replace("{h}", &h.to_string())
            .replace("{d}", &d.to_string())
    } else {
        String::new()
    };
    let dxs = format!(
        "\
// Experts backward: each sorted row's input gradient,
// dxs[row, c] = Σ_i {}du[row, i] · W_up[e][i, c].
// dg?, du: f32[n · {k}, {h}]; w_gate?, w_up: f32[E, {h}, {d}]; dxs: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dg, const float* __restrict__ du, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_gate, const float* __restrict__ w_up, float* __restrict__ dxs, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += {gate_term}du[r * {h} + i] * w_up[(e * {h} + i) * {d} + c];
        dxs[idx] = acc;
    }}
}}
",
        if gated { "dg[row, i] · W_gate[e][i, c] + " } else { "" }
    );
    let dx = format!(
        "\
// Experts backward: dx[t, c] = Σ_j dxs[row_of[t, j], c], in slot order.
// dxs: f32[n · {k}, {d}]; dx: f32[n, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dxs, const int* __restrict__ row_of, float* __restrict__ dx, long long n) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += dxs[(long long)r * {d} + c];
        }}
        dx[idx] = acc;
    }}
}}
"
    );
    let dw_down = format!(
        "\
// Experts backward: dW_down[e][c, i] = Σ over expert e's rows of gout[row, c] · a[row, i].
// gout: f32[n · {k}, {d}]; a: f32[n · {k}, {h}]; dw_down: f32[E, {d}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ gout, const float* __restrict__ a, const int* __restrict__ offsets, float* __restrict__ dw_down, long long experts) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < experts * {d} * {h};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long e = idx / ({d} * {h}), c = (idx / {h}) % {d}, i = idx % {h};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += gout[(long long)r * {d} + c] * a[(long long)r * {h} + i];
        dw_down[idx] = acc;
    }}
}}
"
    );
    let dw_in = format!(
        "\
// Experts backward: dW[e][i, c] = Σ over expert e's rows of g[row, i] · x[token(row), c], for
// the up projection (g = du) or the gate (g = dg).
// g: f32[n · {k}, {h}]; x: f32[n, {d}]; dw: f32[E, {h}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ g, const float* __restrict__ x, const int* __restrict__ perm, const int* __restrict__ offsets, float* __restrict__ dw, long long experts) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < experts * {h} * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long e = idx / ({h} * {d}), i = (idx / {d}) % {h}, c = idx % {d};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += g[(long long)r * {h} + i] * x[(perm[r] / {k}) * {d} + c];
        dw[idx] = acc;
    }}
}}
"
    );
    vec![
        ("dweights", dweights),
        ("gout", gout),
        ("da", da),
        ("dxs", dxs),
        ("dx", dx),
        ("dw_down", dw_down),
        ("dw_in", dw_in),
    ]
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
    /// the work and the scratch slots (offsets, perm, row_of, gate, up, a, out).
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
        let sort = self.kernel(
            &format!("moe_sort_e{}_k{}", m.e, m.k),
            "sorts (token, slot) pairs by expert",
            moe_sort_text(m),
            index,
            0,
        );
        let hidden = self.kernel(
            &format!("moe_hidden_{}", m.suffix()),
            "the experts' hidden layer",
            moe_hidden_text(m, &act.compiled, &act.text),
            index,
            0,
        );
        let down = self.kernel(
            &format!("moe_down_{}", m.suffix()),
            "the experts' down projection",
            moe_down_text(m),
            index,
            0,
        );
        let (x, ids) = (node.inputs[0], node.inputs[2]);
        let (w_up, w_down) = if m.gated {
            (node.inputs[4], node.inputs[5])
        } else {
            (node.inputs[3], node.inputs[4])
        };
        let mut hidden_args = vec![val(x), val(ids), perm.clone()];
        if m.gated {
            hidden_args.push(val(node.inputs[3]));
        }
        hidden_args.push(val(w_up));
        if m.gated {
            hidden_args.push(gate.clone());
        }
        hidden_args.extend([up.clone(), a.clone(), int(rows)]);
        let work = vec![
            Work::Launch(Launch {
                kernel: sort,
                grid: 1,
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    val(ids),
                    offsets,
                    perm.clone(),
                    row_of,
                    Arg::ErrorFlag,
                    int(m.n),
                ],
            }),
            elementwise_launch(hidden, rows * m.h, hidden_args),
            elementwise_launch(
                down,
                rows * m.d,
                vec![a, val(ids), perm, val(w_down), out, int(rows)],
            ),
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
        let combine = self.kernel(
            &format!("moe_combine_k{}_d{}", m.k, m.d),
            "combines each token's experts",
            moe_combine_text(m),
            index,
            0,
        );
        let [_, _, row_of, _, _, _, out] = slots;
        work.push(elementwise_launch(
            combine,
            m.n * m.d,
            vec![
                val(node.inputs[1]),
                row_of,
                out,
                val(node.outputs[0]),
                int(m.n),
            ],
        ));
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
        let texts = moe_bwd_texts(m, &act.compiled, &act.text);
        let mut names = HashMap::new();
        for (what, text) in texts {
            let base = match what {
                "dx" | "dweights" | "gout" => format!("moe_bwd_{what}_k{}_d{}", m.k, m.d),
                _ => format!("moe_bwd_{what}_{}", m.suffix()),
            };
            let name = self.kernel(&base, "the experts' backward", text, index, 0);
            names.insert(what, name);
        }
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
        work.extend([
            elementwise_launch(
                names["dweights"].clone(),
                rows,
                vec![val(dy), row_of.clone(), out, val(d_weights), int(m.n)],
            ),
            elementwise_launch(
                names["gout"].clone(),
                rows * m.d,
                vec![val(weights), perm.clone(), val(dy), gout.clone(), int(rows)],
            ),
            elementwise_launch(
                names["da"].clone(),
                rows * m.h,
                vec![
                    gout.clone(),
                    val(ids),
                    perm.clone(),
                    val(w_down),
                    gate,
                    up,
                    dg.clone(),
                    du.clone(),
                    int(rows),
                ],
            ),
            elementwise_launch(
                names["dxs"].clone(),
                rows * m.d,
                vec![
                    dg.clone(),
                    du.clone(),
                    val(ids),
                    perm.clone(),
                    w_gate_arg,
                    val(w_up),
                    dxs.clone(),
                    int(rows),
                ],
            ),
            elementwise_launch(
                names["dx"].clone(),
                m.n * m.d,
                vec![dxs, row_of, val(dx), int(m.n)],
            ),
            elementwise_launch(
                names["dw_down"].clone(),
                m.e * m.d * m.h,
                vec![gout, a, offsets.clone(), val(dw_down), int(m.e)],
            ),
            elementwise_launch(
                names["dw_in"].clone(),
                m.e * m.h * m.d,
                vec![
                    du,
                    val(x),
                    perm.clone(),
                    offsets.clone(),
                    val(dw_up),
                    int(m.e),
                ],
            ),
        ]);
        if let Some(dw_gate) = dw_gate {
            work.push(elementwise_launch(
                names["dw_in"].clone(),
                m.e * m.h * m.d,
                vec![dg, val(x), perm, offsets, val(dw_gate), int(m.e)],
            ));
        }
        work
    }
}
