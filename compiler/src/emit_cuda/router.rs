//! The MoE router (logits, score function and top-k selection fused, as the CPU backend
//! selects), its backward, and the sequence-wise balance loss and its gradient.

use super::attention::ATTN_ROWS;
use super::cross_entropy::mean;
use super::{float_lit, grid_stride, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work};
use crate::ir::Node;

/// The router, fused: logits `x·wᵀ` (a lane per expert), the score function, and the selection
/// exactly as the CPU backend makes it (keys `score + bias` with NaN lowest, group scores, the
/// kept groups, top-k by descending key then ascending index, weights normalized and scaled),
/// the selection sequential in lane 0 of the token's warp.
fn router_fwd(def: KernelDef, spec: &crate::ir::RouterSpec, d: u64, e: u64) -> KernelDef {
    use crate::model::{GroupScore, ScoreFunc, Selection};
    let k = spec.top_k;
    let per_lane = e.div_ceil(32);
    let score = match spec.score {
        ScoreFunc::Sigmoid => "\
        for (int j = 0; j < E; ++j) s[j] = 1.0f / (1.0f + expf(-s[j]));"
            .to_string(),
        ScoreFunc::Softmax => "\
        float mx = -INFINITY;
        for (int j = 0; j < E; ++j) mx = fmaxf(mx, s[j]);
        float total = 0.0f;
        for (int j = 0; j < E; ++j) { s[j] = expf(s[j] - mx); total += s[j]; }
        for (int j = 0; j < E; ++j) s[j] = s[j] / total;"
            .to_string(),
    };
    let groups = if spec.select == Selection::GroupLimited && spec.groups > 0 {
        let size = e / spec.groups;
        let group_key = match (spec.group_score, size >= 2) {
            (GroupScore::Top2Sum, true) => "first + second",
            _ => "first",
        };
        format!(
            "\
        // Group scores from each group's best (two best) keys; keep the best {kept} groups
        // (descending score, then ascending index); experts of the others get key 0.0.
        // (Group scores add in double, as the CPU backend's f64 keys do.)
        double* gkey = gkey_all[warp];
        bool* kept = kept_all[warp];
        for (int g = 0; g < {g}; ++g) {{
            double first = -INFINITY, second = -INFINITY;
            for (int j = g * {size}; j < (g + 1) * {size}; ++j) {{
                const double v = key[j];
                if (v > first) {{ second = first; first = v; }} else if (v > second) {{ second = v; }}
            }}
            gkey[g] = {group_key};
        }}
        for (int g = 0; g < {g}; ++g) kept[g] = false;
        for (int r = 0; r < {kept}; ++r) {{
            int best = -1;
            for (int g = 0; g < {g}; ++g)
                if (!kept[g] && (best < 0 || gkey[g] > gkey[best])) best = g;
            kept[best] = true;
        }}
        for (int j = 0; j < E; ++j) if (!kept[j / {size}]) key[j] = 0.0f;
",
            g = spec.groups,
            kept = spec.groups_kept.min(spec.groups),
        )
    } else {
        String::new()
    };
    let normalize = if spec.normalize {
        "        const float denom = sum + 1e-20f;\n        for (int r = 0; r < K; ++r) weights[token * K + r] = weights[token * K + r] / denom * SCALE;\n"
    } else {
        "        for (int r = 0; r < K; ++r) weights[token * K + r] *= SCALE;\n"
    };
    let score_name = match spec.score {
        ScoreFunc::Sigmoid => "sigmoid",
        ScoreFunc::Softmax => "softmax",
    };
    let grouped = if groups.is_empty() {
        String::new()
    } else {
        format!(
            " within the best {} of {} groups",
            spec.groups_kept, spec.groups
        )
    };
    let normalized = if spec.normalize {
        ", normalized (+1e-20),"
    } else {
        ""
    };
    let group_shared = if spec.select == Selection::GroupLimited && spec.groups > 0 {
        format!(
            "    __shared__ double gkey_all[{ATTN_ROWS}][{g}];\n    __shared__ bool kept_all[{ATTN_ROWS}][{g}];",
            g = spec.groups
        )
    } else {
        String::new()
    };
    let scale = float_lit(spec.scale);
    def.doc(format!(
        "// The router, fused: logits = x·wᵀ (one lane per expert), scores = {score_name}(logits), and the\n\
         // choice of {k} experts among {e} ranking scores + bias{grouped}; weights are the chosen\n\
         // experts' unbiased scores{normalized} times {scale}. A warp per token; lane 0 selects.\n\
         // x: f32[n, {d}]; w: f32[{e}, {d}]; bias: f32[{e}]; weights: f32[n, {k}]; experts: u32[n, {k}];\n\
         // scores: f32[n, {e}]."
    ))
    .body(format!(
        "    constexpr int E = {e}, K = {k};
    constexpr float SCALE = {scale};
    __shared__ float s_all[{ATTN_ROWS}][E];
    __shared__ float key_all[{ATTN_ROWS}][E];
{group_shared}
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long token = blockIdx.x * {ATTN_ROWS}LL + warp;
    float* s = s_all[warp];
    float* key = key_all[warp];
#pragma unroll
    for (int i = 0; i < {per_lane}; ++i) {{
        const int j = lane + 32 * i;
        if (j < E && token < n) {{
            float dot = 0.0f;
            for (int c = 0; c < {d}; ++c) dot += x[token * {d} + c] * w[(long long)j * {d} + c];
            s[j] = dot;
        }}
    }}
    __syncwarp();
    if (lane == 0 && token < n) {{
{score}
        for (int j = 0; j < E; ++j) {{
            const float v = s[j] + bias[j];
            key[j] = v != v ? -INFINITY : v + 0.0f;
        }}
{groups}        float sum = 0.0f;
        // Top-k by descending key, then ascending index; a chosen expert's key becomes NaN
        // (no key is NaN before), so it is never chosen again.
        for (int r = 0; r < K; ++r) {{
            int best = -1;
            for (int j = 0; j < E; ++j)
                if (key[j] == key[j] && (best < 0 || key[j] > key[best])) best = j;
            experts[token * K + r] = (unsigned)best;
            weights[token * K + r] = s[best];
            sum += s[best];
            key[best] = NAN;
        }}
{normalize}        for (int j = 0; j < E; ++j) scores[token * E + j] = s[j];
    }}
"
    ))
}

/// The router's backward, first part: each token's logit gradient from the weights' gradient
/// (through the scale, the normalization and the gather) and the scores' own, through the
/// score function.
fn router_dlogits(def: KernelDef, spec: &crate::ir::RouterSpec, e: u64) -> KernelDef {
    use crate::model::ScoreFunc;
    let k = spec.top_k;
    let gather = if spec.normalize {
        "\
        float sum = 0.0f, dot = 0.0f;
        for (int r = 0; r < K; ++r) {
            const float g = s[experts[token * K + r]];
            sum += g;
            dot += d_weights[token * K + r] * g;
        }
        const float denom = sum + 1e-20f;
        for (int r = 0; r < K; ++r)
            dl[experts[token * K + r]] += SCALE * (d_weights[token * K + r] / denom - dot / (denom * denom));"
    } else {
        "\
        for (int r = 0; r < K; ++r) dl[experts[token * K + r]] += SCALE * d_weights[token * K + r];"
    };
    let jacobian = match spec.score {
        ScoreFunc::Sigmoid => "        for (int j = 0; j < E; ++j) dl[j] *= s[j] * (1.0f - s[j]);",
        ScoreFunc::Softmax => {
            "\
        float sdot = 0.0f;
        for (int j = 0; j < E; ++j) sdot += dl[j] * s[j];
        for (int j = 0; j < E; ++j) dl[j] = s[j] * (dl[j] - sdot);"
        }
    };
    let scale = float_lit(spec.scale);
    def.doc(format!(
        "// The router's backward, first part: d_logits[t, :] from d_scores[t, :] plus the chosen\n\
         // experts' share of d_weights[t, :] (through the scale and the normalization), times the\n\
         // score function's Jacobian. One thread per token.\n\
         // scores, d_scores, d_logits: f32[n, {e}]; experts: u32[n, {k}]; d_weights: f32[n, {k}]."
    ))
    .body(format!(
        "    constexpr int E = {e}, K = {k};
    constexpr float SCALE = {scale};
{}\
\x20       const float* s = scores + token * E;
        float* dl = d_logits + token * E;
        for (int j = 0; j < E; ++j) dl[j] = d_scores[token * E + j];
{gather}
{jacobian}
    }}
",
        grid_stride("    ", "token", "n")
    ))
}

/// `dx = d_logits · w` and `dw = d_logitsᵀ · x` for the router (small: `e` columns), one
/// thread per output element, each summing in a fixed order.
fn router_dx(d_logits: Arg, w: Arg, dx: Arg, [n, e, d]: [u64; 3]) -> KernelDef {
    KernelDef::new("router_bwd_dx", "the router's input gradient")
        .doc(
            "// The router's backward, input gradient: dx[t, c] = Σ_j d_logits[t, j] · w[j, c].\n\
             // d_logits: f32[n, e]; w: f32[e, d]; dx: f32[n, d].",
        )
        .read("d_logits", d_logits)
        .read("w", w)
        .write("dx", dx)
        .long("n", n)
        .long("e", e)
        .long("d", d)
        .body(format!(
            "{}\
\x20       const long long t = i / d, c = i % d;
        float acc = 0.0f;
        for (long long j = 0; j < e; ++j) acc += d_logits[t * e + j] * w[j * d + c];
        dx[i] = acc;
    }}
",
            grid_stride("    ", "i", "n * d")
        ))
}

fn router_dw(d_logits: Arg, x: Arg, dw: Arg, [n, e, d]: [u64; 3]) -> KernelDef {
    KernelDef::new("router_bwd_dw", "the router's weight gradient")
        .doc(
            "// The router's backward, weight gradient: dw[j, c] = Σ_t d_logits[t, j] · x[t, c].\n\
             // d_logits: f32[n, e]; x: f32[n, d]; dw: f32[e, d].",
        )
        .read("d_logits", d_logits)
        .read("x", x)
        .write("dw", dw)
        .long("n", n)
        .long("e", e)
        .long("d", d)
        .body(format!(
            "{}\
\x20       const long long j = i / d, c = i % d;
        float acc = 0.0f;
        for (long long t = 0; t < n; ++t) acc += d_logits[t * e + j] * x[t * d + c];
        dw[i] = acc;
    }}
",
            grid_stride("    ", "i", "e * d")
        ))
}

/// The sequence-wise balance loss, forward or backward (`grad`): a block per sequence counts
/// its routed (token, slot) pairs per expert in shared memory, then each thread takes tokens.
fn balance(
    def: KernelDef,
    t: u64,
    e: u64,
    k: u64,
    alpha: f64,
    batch: u64,
    grad: bool,
) -> KernelDef {
    let alpha_l = float_lit(alpha);
    let counts = format!(
        "    __shared__ unsigned counts[{e}];
    __shared__ float f[{e}];
    const long long b = blockIdx.x;
    for (int j = threadIdx.x; j < {e}; j += blockDim.x) counts[j] = 0;
    __syncthreads();
    for (long long i = threadIdx.x; i < {t} * {k}; i += blockDim.x) {{
        const unsigned x = experts[b * {t} * {k} + i];
        if (x < {e}) atomicAdd(&counts[x], 1u);
    }}
    __syncthreads();
    // f_i = E / (k·T) · count_i
    for (int j = threadIdx.x; j < {e}; j += blockDim.x) f[j] = (float)counts[j] * ({e}.0f / ({k}.0f * {t}.0f));
    __syncthreads();"
    );
    if grad {
        def.doc(format!(
            "// The sequence-wise balance loss, backward: with Z = Σ_j s[t, j],\n\
             // d_scores[b, t, m] = dloss · alpha/(B·T) · (f_m / Z − Σ_i f_i·s[t, i] / Z²). A block per\n\
             // sequence (counts in shared memory), a thread per token.\n\
             // scores, d_scores: f32[B, {t}, {e}]; experts: u32[B, {t}, {k}]; dloss: f32[1]. alpha = {alpha_l}."
        ))
        .body(format!(
            "\
{counts}
    const float c = dloss[0] * ({alpha_l} / ({batch}.0f * {t}.0f));
    for (long long tok = threadIdx.x; tok < {t}; tok += blockDim.x) {{
        const float* s = scores + (b * {t} + tok) * {e};
        float* ds = d_scores + (b * {t} + tok) * {e};
        float z = 0.0f, fs = 0.0f;
        for (int j = 0; j < {e}; ++j) {{ z += s[j]; fs += f[j] * s[j]; }}
        const float shift = fs / (z * z);
        for (int j = 0; j < {e}; ++j) ds[j] = c * (f[j] / z - shift);
    }}
"
        ))
    } else {
        def.doc(format!(
            "// The sequence-wise balance loss, forward: per sequence alpha · mean over tokens of\n\
             // Σ_i f_i · s[t, i] / Σ_j s[t, j], with f_i = E/(k·T) · (pairs routed to i); the mean over\n\
             // sequences follows (`mean`). A block per sequence, a thread per token.\n\
             // scores: f32[B, {t}, {e}]; experts: u32[B, {t}, {k}]; per_seq: f32[B]. alpha = {alpha_l}."
        ))
        .body(format!(
            "\
{counts}
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long tok = threadIdx.x; tok < {t}; tok += blockDim.x) {{
        const float* s = scores + (b * {t} + tok) * {e};
        float z = 0.0f, fs = 0.0f;
        for (int j = 0; j < {e}; ++j) {{ z += s[j]; fs += f[j] * s[j]; }}
        acc += fs / z;
    }}
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) per_seq[b] = acc / {t}.0f * {alpha_l};
"
        ))
    }
}

impl Emitter<'_> {
    pub(super) fn router(
        &mut self,
        index: usize,
        node: &Node,
        spec: &crate::ir::RouterSpec,
    ) -> Vec<Work> {
        let (n, d) = self.rows(node.inputs[0]);
        let e = self.shape(node.inputs[1])[0];
        let i = &node.inputs;
        let o = &node.outputs;
        let def = KernelDef::new(
            format!("router_fwd_e{e}_k{}_d{d}", spec.top_k),
            "the router: logits, scores and the choice of experts",
        )
        .read("x", val(i[0]))
        .read("w", val(i[1]))
        .read("bias", val(i[2]))
        .write("weights", val(o[0]))
        .param("experts", Elem::U32, Pass::Write, val(o[1]))
        .write("scores", val(o[2]))
        .long("n", n);
        let def = router_fwd(def.heavy(), spec, d, e);
        vec![self.work(index, def, Grid::Blocks(n.div_ceil(ATTN_ROWS)))]
    }

    /// `(x, w, bias, weights, experts, scores, d_weights, d_scores) -> (dx, dw)`.
    pub(super) fn router_grad(
        &mut self,
        index: usize,
        node: &Node,
        spec: &crate::ir::RouterSpec,
    ) -> Vec<Work> {
        let (n, d) = self.rows(node.inputs[0]);
        let e = self.shape(node.inputs[1])[0];
        let dl = Arg::Scratch {
            slot: 0,
            bytes: n * e * 4,
        };
        let i = &node.inputs;
        let dlogits = KernelDef::new(
            format!("router_bwd_dlogits_e{e}_k{}", spec.top_k),
            "the router's logit gradient",
        )
        .read("scores", val(i[5]))
        .param("experts", Elem::U32, Pass::Read, val(i[4]))
        .read("d_weights", val(i[6]))
        .read("d_scores", val(i[7]))
        .write("d_logits", dl.clone())
        .long("n", n);
        let dlogits = router_dlogits(dlogits.heavy(), spec, e);
        let dx = router_dx(dl.clone(), val(i[1]), val(node.outputs[0]), [n, e, d]);
        let dw = router_dw(dl, val(i[0]), val(node.outputs[1]), [n, e, d]);
        vec![
            self.work(index, dlogits, Grid::Threads(n)),
            self.work(index, dx, Grid::Threads(n * d)),
            self.work(index, dw, Grid::Threads(e * d)),
        ]
    }

    pub(super) fn balance(
        &mut self,
        index: usize,
        node: &Node,
        alpha: f64,
        top_k: u64,
        grad: bool,
    ) -> Vec<Work> {
        let s = self.shape(node.inputs[0]);
        let (b, t, e) = (s[0], s[1], s[2]);
        let dir = if grad { "bwd" } else { "fwd" };
        let def = KernelDef::new(
            format!("balance_loss_{dir}_t{t}_e{e}_k{top_k}"),
            "the sequence-wise balance loss",
        )
        .read("scores", val(node.inputs[0]))
        .param("experts", Elem::U32, Pass::Read, val(node.inputs[1]));
        if grad {
            let def = def
                .read("dloss", val(node.inputs[2]))
                .write("d_scores", val(node.outputs[0]));
            let def = balance(def, t, e, top_k, alpha, b, grad);
            vec![self.work(index, def, Grid::Blocks(b))]
        } else {
            let per_seq = Arg::Scratch {
                slot: 0,
                bytes: b * 4,
            };
            let def = balance(
                def.write("per_seq", per_seq.clone()),
                t,
                e,
                top_k,
                alpha,
                b,
                grad,
            );
            let mean = mean(per_seq, val(node.outputs[0]), b);
            vec![
                self.work(index, def, Grid::Blocks(b)),
                self.work(index, mean, Grid::Blocks(1)),
            ]
        }
    }
}
