//! Cross-entropy: each row's loss by an online softmax over its logits, the mean (or weighted
//! sum) of the rows in a fixed order, and the gradient (`softmax − onehot`, weighted or not).

use super::{int, row_launch, val, Arg, Emitter, Launch, Work, BLOCK, NAME};
use crate::ir::Node;

/// Cross-entropy over rows of `V` logits, forward: each block runs an online softmax over its
/// row (never storing probabilities) and writes `lse − logit[target]`; a second kernel takes
/// the mean in a fixed order.
fn cross_entropy_fwd_text(vocab: u64) -> String {
    format!(
        "\
// Cross-entropy, forward: loss[r] = logsumexp(logits[r, :]) − logits[r, target[r]], by an
// online softmax over the {vocab} logits of the row (the probabilities are never stored). A
// target outside the vocabulary sets *error = 2 and counts as zero loss.
// logits: f32[rows, {vocab}]; target: u32[rows]; loss: f32[rows].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ logits, const unsigned* __restrict__ target, float* __restrict__ loss, int* __restrict__ error, long long rows) {{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + row * {vocab};
    kiln_softmax_state state = kiln_softmax_state::empty();
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) state.update(z[j]);
    const float m = kiln_block_max(state.m, scratch);
    const float l = kiln_block_sum(state.l * kiln_softmax_exp(state.m - m), scratch);
    if (threadIdx.x == 0) {{
        const unsigned t = target[row];
        if (t < {vocab}) {{
            loss[row] = m + logf(l) - z[t];
        }} else {{
            loss[row] = 0.0f;
            *error = 2;
        }}
    }}
}}
"
    )
}

/// Cross-entropy, backward: recomputes each row's log-sum-exp, then writes
/// `(softmax − onehot) · dloss / rows`.
fn cross_entropy_bwd_text(vocab: u64, weighted: bool) -> String {
    // The weighted loss Σ w[r]·CE[r] scales row r by dloss · w[r] instead of dloss / rows.
    let (what, weight_doc, weight_arg, scale) = if weighted {
        (
            "dloss · weight[r]",
            "; weight: f32[rows]",
            "const float* __restrict__ weight, ",
            "dloss[0] * weight[row]",
        )
    } else {
        ("dloss / rows", "", "", "dloss[0] / (float)rows")
    };
    format!(
        "\
// Cross-entropy, backward: dlogits[r, j] = (softmax(logits[r, :])[j] − [j = target[r]]) ·
// {what}, the row's log-sum-exp recomputed by an online softmax (two reads of the row,
// one write; the probabilities are never stored).
// logits, dlogits: f32[rows, {vocab}]; target: u32[rows]; dloss: f32[1]{weight_doc}.
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ logits, const unsigned* __restrict__ target, const float* __restrict__ dloss, {weight_arg}float* __restrict__ dlogits, long long rows) {{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + row * {vocab};
    float* dz = dlogits + row * {vocab};
    kiln_softmax_state state = kiln_softmax_state::empty();
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) state.update(z[j]);
    const float m = kiln_block_max(state.m, scratch);
    const float l = kiln_block_sum(state.l * kiln_softmax_exp(state.m - m), scratch);
    const float scale = {scale};
    const unsigned t = target[row];
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) {{
        const float p = kiln_softmax_exp(z[j] - m) / l;
        dz[j] = (p - (j == (int)t ? 1.0f : 0.0f)) * scale;
    }}
}}
"
    )
}

/// The weighted sum of `n` values in one block, in a fixed order (weighted losses).
const WEIGHTED_SUM: &str = "\
// y[0] = Σ x[i] · w[i], one block, fixed order. x, w: f32[n]; y: f32[1].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i] * w[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc;
}
";

/// The mean of `n` values in one block, in a fixed order (losses).
pub(super) const MEAN: &str = "\
// y[0] = (Σ x[i]) / n, one block, fixed order. x: f32[n]; y: f32[1].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ x, float* __restrict__ y, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc / (float)n;
}
";

impl Emitter<'_> {
    /// Cross-entropy: per-row losses into scratch, then their mean (or weighted sum).
    pub(super) fn cross_entropy(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let (rows, vocab) = self.rows(ins[0]);
        let fwd = self.kernel(
            &format!("cross_entropy_fwd_v{vocab}"),
            &format!("cross-entropy rows over {vocab} logits"),
            cross_entropy_fwd_text(vocab),
            index,
            0,
        );
        let per_row = Arg::Scratch {
            slot: 0,
            bytes: rows * 4,
        };
        let (reduce, args) = match ins.get(2) {
            None => (
                self.fixed("mean", "the mean of a vector", MEAN, index),
                vec![per_row.clone(), val(outs[0]), int(rows)],
            ),
            Some(&w) => (
                self.fixed(
                    "weighted_sum",
                    "the weighted sum of a vector",
                    WEIGHTED_SUM,
                    index,
                ),
                vec![per_row.clone(), val(w), val(outs[0]), int(rows)],
            ),
        };
        vec![
            row_launch(
                fwd,
                rows,
                vec![val(ins[0]), val(ins[1]), per_row, Arg::ErrorFlag, int(rows)],
            ),
            Work::Launch(Launch {
                kernel: reduce,
                grid: 1,
                block: BLOCK,
                shared_bytes: 0,
                args,
            }),
        ]
    }

    /// Cross-entropy's gradient, one block per row.
    pub(super) fn cross_entropy_grad(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let (rows, vocab) = self.rows(ins[0]);
        let weight = ins.get(3).copied();
        let (base, what) = match weight {
            None => ("cross_entropy_bwd", "cross-entropy"),
            Some(_) => ("cross_entropy_weighted_bwd", "weighted cross-entropy"),
        };
        let bwd = self.kernel(
            &format!("{base}_v{vocab}"),
            &format!("{what} gradient over {vocab} logits"),
            cross_entropy_bwd_text(vocab, weight.is_some()),
            index,
            0,
        );
        let mut args = vec![val(ins[0]), val(ins[1]), val(ins[2])];
        args.extend(weight.map(val));
        args.extend([val(outs[0]), int(rows)]);
        vec![row_launch(bwd, rows, args)]
    }
}
