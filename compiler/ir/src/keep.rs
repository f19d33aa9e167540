//! The keep plan: which values of a training graph's forward pass its backward pass reads,
//! how a backend stores each under the precision policy, and after which node it is packed.
//!
//! One decision, made here once and carried in the [`crate::program::Program`]: the
//! interpreter packs exactly these values when it emulates the policy, reports their bytes
//! for `kiln bench --memory`, and the analyzer's activation estimate is held to them (a test).
//!
//! The backward pass is every node after the one computing `loss`. A value of the forward
//! pass that it reads is kept when it is float and computed from the graph's inputs (values
//! derived from parameters alone are weights, not activations):
//! - as FP8 tiles, exactly as an FP8 GEMM of the forward pass read it, when every backward
//!   reader is the weight-gradient GEMM of an FP8 `linear_grad` or `experts_grad`
//!   (DeepSeek-V3 caches the FP8 input; its weight gradient quantizes the dequantized values
//!   again, along the tokens);
//! - in f32 when it is a statistic (a scalar, a router's outputs, attention's log-sum-exp,
//!   the logits a cross-entropy gradient reads, or a reshape of one of these) or a named
//!   output, which its caller reads whole at the end;
//! - otherwise in the compute format.
//!
//! Besides values, an `experts` node whose gradient node reads its routed projections keeps
//! them (one or two `[routed rows, hidden]` tensors) in the compute format.

use crate::attrs::{Format, Fp8, ScaleFormat};
use crate::ir::{DType, Def, Graph, Op, ValueId};

/// How a kept value is stored between the forward and the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// As computed, in f32 (statistics the backward pass needs exactly).
    F32,
    /// In the policy's compute format (`precision.compute`): bf16 or fp16 round it, f32
    /// keeps it as computed.
    Compute,
    /// FP8 codes in `format` with one scale per `1 × tile` tile along the last dimension,
    /// as the forward GEMM's quantization made them.
    Fp8 {
        format: Format,
        tile: u64,
        scale: ScaleFormat,
    },
}

/// One value the backward pass reads from the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub value: ValueId,
    pub storage: Storage,
    /// The node after which it is packed: its last forward reader, or its producer when no
    /// forward node reads it.
    pub after: usize,
}

/// What a training graph keeps for its backward pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepPlan {
    /// The first node of the backward pass (the node after `loss`'s producer); `None` for a
    /// graph without nodes after its `loss` (a forward graph), which keeps nothing.
    pub boundary: Option<usize>,
    /// Every kept value, in value order.
    pub kept: Vec<Kept>,
    /// The `experts` nodes (by index) whose routed projections an `experts_grad` node reads,
    /// kept in the compute format.
    pub experts: Vec<usize>,
}

/// Bytes a keep plan holds once the forward pass is done, by how they are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptBytes {
    /// Stored in f32 (statistics, and everything else under an f32 compute format).
    pub f32: u64,
    /// Stored in a 16-bit compute format.
    pub half: u64,
    /// FP8 codes.
    pub fp8: u64,
    /// The FP8 codes' f32 tile scales.
    pub scales: u64,
}

impl KeptBytes {
    /// Bytes stored below f32: what packing holds instead of the f32 values.
    pub fn packed(&self) -> u64 {
        self.half + self.fp8 + self.scales
    }

    pub fn total(&self) -> u64 {
        self.f32 + self.packed()
    }
}

/// The FP8 operand quantization of node `n` of `g`, if it is a GEMM whose activation
/// operand (operand 0) is read in an FP8 format.
fn fp8_gemm(g: &Graph, n: usize, fp8: &Fp8) -> Option<Storage> {
    let node = &g.nodes[crate::ir::Handle::from_index(n)];
    let gemm = matches!(
        node.op,
        Op::Linear { .. }
            | Op::LinearMap { .. }
            | Op::LinearGrad { .. }
            | Op::Experts { .. }
            | Op::ExpertsGrad { .. }
    );
    (gemm && node.format.is_fp8()).then_some(Storage::Fp8 {
        format: node.format,
        tile: fp8.act_tile[1],
        scale: fp8.scale,
    })
}

/// Plans what `g` keeps for its backward pass; `fp8` is the policy's FP8 scaling (DeepSeek-V3's
/// when absent).
pub fn keep(g: &Graph, fp8: Option<&Fp8>) -> KeepPlan {
    let fp8 = fp8.copied().unwrap_or(Fp8::DEEPSEEK_V3);
    let loss_node = g.output("loss").and_then(|v| match g.values[v].def {
        Def::Node { node, .. } => Some(node.index()),
        _ => None,
    });
    let Some(boundary) = loss_node.map(|n| n + 1).filter(|&b| b < g.nodes.len()) else {
        return KeepPlan::default();
    };
    let mut from_data = vec![false; g.values.len()];
    let mut readers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); g.values.len()];
    for (v, value) in g.values.iter() {
        from_data[v.index()] = matches!(value.def, Def::Input(_));
    }
    let mut statistic = vec![false; g.values.len()];
    for (id, node) in g.nodes.iter() {
        let data = node.inputs.iter().any(|v| from_data[v.index()]);
        for (i, &o) in node.outputs.iter().enumerate() {
            from_data[o.index()] = data;
            statistic[o.index()] = g.values[o].ty.shape.is_empty()
                || match node.op {
                    Op::Router(_) => true,
                    Op::Attention { .. } => i == 1,
                    Op::Reshape { .. } => statistic[node.inputs[0].index()],
                    _ => false,
                };
        }
        for (at, &v) in node.inputs.iter().enumerate() {
            readers[v.index()].push((id.index(), at));
        }
        if let (Op::CrossEntropyGrad, Some(logits)) = (&node.op, node.inputs.first()) {
            statistic[logits.index()] = true;
        }
    }
    let named: std::collections::HashSet<ValueId> = g.outputs.iter().map(|&(_, v)| v).collect();
    // The FP8 storage of a GEMM reading `v` as its activation operand (operand 0).
    let fp8_reader = |(node, at): (usize, usize)| {
        if at == 0 {
            fp8_gemm(g, node, &fp8)
        } else {
            None
        }
    };
    let mut kept = Vec::new();
    for (v, value) in g.values.iter() {
        let Def::Node { node: producer, .. } = value.def else {
            continue;
        };
        let (forward, backward): (Vec<_>, Vec<_>) =
            readers[v.index()].iter().partition(|(n, _)| *n < boundary);
        if producer.index() >= boundary
            || backward.is_empty()
            || value.ty.dtype != DType::F32
            || !from_data[v.index()]
        {
            continue;
        }
        // A named output lives to the end as computed (its caller reads it whole).
        let storage = if statistic[v.index()] || named.contains(&v) {
            Storage::F32
        } else {
            match forward.iter().find_map(|&&r| fp8_reader(r)) {
                Some(f) if backward.iter().all(|&&r| fp8_reader(r).is_some()) => f,
                _ => Storage::Compute,
            }
        };
        let after = forward.iter().map(|(n, _)| *n).max();
        kept.push(Kept {
            value: v,
            storage,
            after: after.unwrap_or(producer.index()),
        });
    }
    let mut experts: Vec<usize> = g.experts_forward().into_values().collect();
    experts.sort_unstable();
    experts.dedup();
    KeepPlan {
        boundary: Some(boundary),
        kept,
        experts,
    }
}

impl KeepPlan {
    /// Bytes kept once the forward pass is done, with `compute` the policy's compute format:
    /// every kept value in its storage, and the routed projections `experts` nodes keep.
    pub fn bytes(&self, g: &Graph, compute: Format) -> KeptBytes {
        let mut b = KeptBytes::default();
        let mut add = |n: u64, format: Format| match format.bytes() {
            2 => b.half += 2 * n,
            _ => b.f32 += 4 * n,
        };
        for k in &self.kept {
            let ty = &g.values[k.value].ty;
            let n = ty.elements() as u64;
            match k.storage {
                Storage::F32 => add(n, Format::Fp32),
                Storage::Compute => add(n, compute),
                Storage::Fp8 { tile, .. } => {
                    let cols = *ty.shape.last().unwrap_or(&1);
                    b.fp8 += n;
                    b.scales += 4 * (n / cols.max(1)) * cols.div_ceil(tile);
                }
            }
        }
        for &f in &self.experts {
            let node = &g.nodes[crate::ir::Handle::from_index(f)];
            let Op::Experts { gated, .. } = node.op else {
                continue;
            };
            let routed = g.values[node.inputs[1]].ty.elements() as u64;
            let h = g.values[node.inputs[if gated { 4 } else { 3 }]].ty.shape[1];
            add(routed * h * if gated { 2 } else { 1 }, compute);
        }
        b
    }

    /// The kept values packed after node `n`.
    pub fn after(&self, n: usize) -> impl Iterator<Item = &Kept> {
        self.kept.iter().filter(move |k| k.after == n)
    }
}
