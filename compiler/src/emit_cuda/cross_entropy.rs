//! Cross-entropy: each row's loss by an online softmax over its logits, the mean (or weighted
//! sum) of the rows in a fixed order, and the gradient (`softmax − onehot`, weighted or not).

use super::{val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work};
use crate::ir::{Node, ValueId};

/// Cross-entropy over rows of `V` logits, forward: each block runs an online softmax over its
/// row (never storing probabilities) and writes `lse − logit[target]`; a second kernel takes
/// the mean in a fixed order.
fn cross_entropy_fwd(logits: Arg, target: Arg, loss: Arg, rows: u64, vocab: u64) -> KernelDef {
    KernelDef::new(
        format!("cross_entropy_fwd_v{vocab}"),
        format!("cross-entropy rows over {vocab} logits"),
    )
    .doc(format!(
        "// Cross-entropy, forward: loss[r] = logsumexp(logits[r, :]) − logits[r, target[r]], by an\n\
         // online softmax over the {vocab} logits of the row (the probabilities are never stored). A\n\
         // target outside the vocabulary sets *error = 2 and counts as zero loss.\n\
         // logits: f32[rows, {vocab}]; target: u32[rows]; loss: f32[rows]."
    ))
    .read("logits", logits)
    .param("target", Elem::U32, Pass::Read, target)
    .write("loss", loss)
    .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
    .long("rows", rows)
    .body(format!(
        "    __shared__ float scratch[32];
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
"
    ))
}

/// Cross-entropy, backward: recomputes each row's log-sum-exp, then writes
/// `(softmax − onehot) · dloss / rows`.
/// `ins` are the logits, targets, `dloss` and the rows' weights if the loss is weighted.
fn cross_entropy_bwd(ins: &[ValueId], dlogits: Arg, rows: u64, vocab: u64) -> KernelDef {
    let weight = ins.get(3).copied();
    let (base, op) = match weight {
        None => ("cross_entropy_bwd", "cross-entropy"),
        Some(_) => ("cross_entropy_weighted_bwd", "weighted cross-entropy"),
    };
    // The weighted loss Σ w[r]·CE[r] scales row r by dloss · w[r] instead of dloss / rows.
    let (what, weight_doc, scale) = if weight.is_some() {
        (
            "dloss · weight[r]",
            "; weight: f32[rows]",
            "dloss[0] * weight[row]",
        )
    } else {
        ("dloss / rows", "", "dloss[0] / (float)rows")
    };
    let mut def = KernelDef::new(
        format!("{base}_v{vocab}"),
        format!("{op} gradient over {vocab} logits"),
    )
    .doc(format!(
        "// Cross-entropy, backward: dlogits[r, j] = (softmax(logits[r, :])[j] − [j = target[r]]) ·\n\
         // {what}, the row's log-sum-exp recomputed by an online softmax (two reads of the row,\n\
         // one write; the probabilities are never stored).\n\
         // logits, dlogits: f32[rows, {vocab}]; target: u32[rows]; dloss: f32[1]{weight_doc}."
    ))
    .read("logits", val(ins[0]))
    .param("target", Elem::U32, Pass::Read, val(ins[1]))
    .read("dloss", val(ins[2]));
    if let Some(w) = weight {
        def = def.read("weight", val(w));
    }
    def.write("dlogits", dlogits)
        .long("rows", rows)
        .body(format!(
            "    __shared__ float scratch[32];
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
"
        ))
}

/// The weighted sum `Σ x[i] · w[i]` of `n` values in one block, in a fixed order (weighted
/// losses).
fn weighted_sum(x: Arg, w: Arg, y: Arg, n: u64) -> KernelDef {
    KernelDef::new("weighted_sum", "the weighted sum of a vector")
        .doc("// y[0] = Σ x[i] · w[i], one block, fixed order. x, w: f32[n]; y: f32[1].")
        .read("x", x)
        .read("w", w)
        .write("y", y)
        .long("n", n)
        .body(
            "    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i] * w[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc;
",
        )
}

/// The mean of `n` values in one block, in a fixed order (losses).
pub(super) fn mean(x: Arg, y: Arg, n: u64) -> KernelDef {
    KernelDef::new("mean", "the mean of a vector")
        .doc("// y[0] = (Σ x[i]) / n, one block, fixed order. x: f32[n]; y: f32[1].")
        .read("x", x)
        .write("y", y)
        .long("n", n)
        .body(
            "    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc / (float)n;
",
        )
}

impl Emitter<'_> {
    /// Cross-entropy: per-row losses into scratch, then their mean (or weighted sum).
    pub(super) fn cross_entropy(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let (rows, vocab) = self.rows(ins[0]);
        let per_row = Arg::Scratch {
            slot: 0,
            bytes: rows * 4,
        };
        let fwd = cross_entropy_fwd(val(ins[0]), val(ins[1]), per_row.clone(), rows, vocab);
        let reduce = match ins.get(2) {
            None => mean(per_row, val(outs[0]), rows),
            Some(&w) => weighted_sum(per_row, val(w), val(outs[0]), rows),
        };
        vec![
            self.work(index, fwd, Grid::Blocks(rows)),
            self.work(index, reduce, Grid::Blocks(1)),
        ]
    }

    /// Cross-entropy's gradient, one block per row.
    pub(super) fn cross_entropy_grad(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let (rows, vocab) = self.rows(node.inputs[0]);
        let def = cross_entropy_bwd(&node.inputs, val(node.outputs[0]), rows, vocab);
        vec![self.work(index, def, Grid::Blocks(rows))]
    }
}
