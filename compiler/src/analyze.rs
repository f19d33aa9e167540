//! `analyze`: [`Model`] → [`Report`]: parameters, FLOPs, KV cache and training memory.
//!
//! Every number derives from the op list in [`crate::named_ops`], so the analyzer, the precision
//! rules and (later) the IR agree on what a model contains. Sums are `u128`: the checker bounds
//! each dimension, but products of bounded dimensions over thousands of layers can pass 2⁶⁴.
//! The formulas are stated in `docs/spec.md` ("What `kiln check` reports").

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::model::{AttentionKind, Format, Model, Recompute};
use crate::named_ops::{ops, Component, Op, OpClass, Site};

/// Everything `kiln check` reports about a model. JSON keys are stable (see `docs/spec.md`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub model: String,
    pub shape: Shape,
    pub params: Params,
    pub flops: Flops,
    pub kv_cache: KvCache,
    pub memory: Memory,
    /// The figures of one device of a parallel layout on a cluster, when one was asked for
    /// (see [`with_layout`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device: Option<crate::parallel::PerDevice>,
}

/// [`analyze`], plus the per-device figures of the model's layout on `cluster`.
pub fn with_layout(model: &Model, cluster: &crate::parallel::Cluster) -> Report {
    let mut r = analyze(model);
    let placed = crate::parallel::Placed::new(model);
    r.per_device = Some(crate::parallel::per_device(
        &placed,
        &model.parallel,
        cluster,
    ));
    r
}

/// The model at a glance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shape {
    pub layers: u64,
    pub dense_layers: u64,
    pub moe_layers: u64,
    pub d_model: u64,
    pub vocab: u64,
    pub attention: &'static str,
    pub heads: u64,
    pub experts: u64,
    pub top_k: u64,
    pub mtp_depth: u64,
    /// Linear ops whose forward GEMM runs in FP8, of all linear ops (main model and MTP).
    pub fp8_linear_ops: u64,
    pub linear_ops: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Params {
    /// Learned parameters of the main model (MTP modules excluded), as HF counts them.
    pub total: u128,
    /// Parameters one token uses: `total` minus the routed experts it is not sent to.
    pub active: u128,
    /// The MTP modules' own parameters (their embedding and head are the main model's).
    pub mtp: u128,
    /// `total` split by component; the values sum to `total`.
    pub by_component: BTreeMap<&'static str, u128>,
    /// Non-trainable per-expert router biases for aux-loss-free balancing (HF buffers).
    pub router_bias_buffers: u128,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flops {
    /// Sequence length the attention terms are evaluated at (`train.seq_len`).
    pub seq_len: u64,
    /// Main-model forward FLOPs per token: GEMMs plus the attention core.
    pub forward_per_token: u128,
    /// Of which the attention core (q·kᵀ and p·v) at the mean causal context.
    pub attention_per_token: u128,
    /// Forward FLOPs of the MTP modules per token (training only).
    pub mtp_forward_per_token: u128,
    /// Training FLOPs per token: 3 × (main + MTP forward), backward being twice the forward.
    pub train_per_token: u128,
    /// `train_per_token · batch · seq_len`.
    pub train_per_step: u128,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KvCache {
    pub format: Format,
    /// Cached elements per token over all layers (MLA: latent `c_kv` plus the RoPE key).
    pub elements_per_token: u128,
    pub bytes_per_token: u128,
    /// What full multi-head attention with the same heads and head dims would cache.
    pub mha_elements_per_token: u128,
    pub mha_bytes_per_token: u128,
    /// `bytes_per_token · seq_len · batch`: the cache for one full training batch.
    pub bytes_at_batch: u128,
}

/// Training memory for `train.batch × train.seq_len` tokens on one device, in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    pub batch: u64,
    pub seq_len: u64,
    /// Working copies of the weights in their compute formats (FP8 GEMM weights at 1 byte);
    /// weights computed in the master format use the master copy and add nothing.
    pub weights_bytes: u128,
    pub master_bytes: u128,
    pub grads_bytes: u128,
    /// AdamW's two moments.
    pub moments_bytes: u128,
    /// FP8 scales: one fp32 per weight block and per activation tile kept for backward.
    pub scales_bytes: u128,
    /// Activations kept for the backward pass (method in docs/spec.md).
    pub activations_bytes: u128,
    pub total_bytes: u128,
}

/// Analyzes a checked model.
pub fn analyze(model: &Model) -> Report {
    let all = ops(model);
    let main = || all.iter().filter(|o| !matches!(o.site, Site::Mtp(_)));
    let mtp_ops = || all.iter().filter(|o| matches!(o.site, Site::Mtp(_)));
    let p = &model.precision;

    let mut by_component: BTreeMap<&'static str, u128> = BTreeMap::new();
    for c in Component::ALL {
        if c != Component::MtpProj {
            by_component.insert(c.name(), 0);
        }
    }
    let mut total = 0u128;
    let mut active = 0u128;
    for op in main() {
        total += op.total_params() as u128;
        active += op.active_params() as u128;
        *by_component.entry(op.component.name()).or_default() += op.total_params() as u128;
    }
    let mtp: u128 = mtp_ops().map(|o| o.total_params() as u128).sum();
    let router_bias_buffers = match &model.moe {
        Some(m) if m.bias_update > 0.0 => {
            let routers = all.iter().filter(|o| o.class == OpClass::Router).count() as u128;
            routers * m.experts as u128
        }
        _ => 0,
    };

    let t = model.train.seq_len as u128;
    let a = &model.attention;
    // Causal attention: token i attends to i+1 positions, (T+1)/2 on average; q·kᵀ and p·v
    // each cost 2 FLOPs per multiply-add: 2·heads·(qk + v)·(T+1)/2 = heads·(qk + v)·(T+1).
    let attn_core = |op: &Op| -> u128 {
        if op.class == OpClass::AttnCore {
            a.heads as u128 * (a.qk_dim() + a.v_dim()) as u128 * (t + 1)
        } else {
            0
        }
    };
    let fwd = |op: &Op| op.matmul_flops() as u128 + attn_core(op);
    let attention_per_token: u128 = main().map(attn_core).sum();
    let forward_per_token: u128 = main().map(fwd).sum();
    // Each MTP module ends in the shared head, which is not in its op list.
    let head_flops = 2 * model.d_model as u128 * model.vocab as u128;
    let depth = model.mtp.map_or(0, |m| m.depth) as u128;
    let mtp_forward_per_token: u128 = mtp_ops().map(fwd).sum::<u128>() + depth * head_flops;
    let train_per_token = 3 * (forward_per_token + mtp_forward_per_token);
    let tokens = model.train.batch as u128 * t;

    let layers = model.layers.len() as u128;
    let (elements, mha) = match &a.kind {
        AttentionKind::Latent(m) => (
            layers * (m.kv_rank + m.rope_dim) as u128,
            layers * a.heads as u128 * (a.qk_dim() + a.v_dim()) as u128,
        ),
        AttentionKind::Grouped { kv_heads, head_dim } => (
            layers * 2 * (*kv_heads * *head_dim) as u128,
            layers * 2 * (a.heads * *head_dim) as u128,
        ),
    };
    let kv_bytes = p.kv_cache.bytes() as u128;
    let kv_cache = KvCache {
        format: p.kv_cache,
        elements_per_token: elements,
        bytes_per_token: elements * kv_bytes,
        mha_elements_per_token: mha,
        mha_bytes_per_token: mha * kv_bytes,
        bytes_at_batch: elements * kv_bytes * tokens,
    };

    let trained = total + mtp;
    let mut weights = 0u128;
    let mut scales = 0u128;
    // Resolving a format matches keep patterns against the op's path: do it once per op.
    let formats: Vec<Format> = all.iter().map(|op| p.format_of(op)).collect();
    for (op, &f) in all.iter().zip(&formats) {
        if f != p.master {
            weights += op.total_params() as u128 * f.bytes() as u128;
        }
        if let (Some(fp8), true) = (p.fp8, is_fp8_gemm(op, f)) {
            let blocks =
                op.out.div_ceil(fp8.weight_block[0]) * op.inp.div_ceil(fp8.weight_block[1]);
            scales += 4 * blocks as u128 * op.copies as u128;
        }
    }
    let saved = saved_per_token(
        model,
        all.iter().zip(formats.iter().copied()),
        true,
        Recompute::default(),
    );
    scales += saved.scale_bytes * tokens;
    let activations = saved.bytes * tokens;
    let master = trained * p.master.bytes() as u128;
    let grads = trained * p.grads.bytes() as u128;
    let moments = 2 * trained * p.moments.bytes() as u128;
    let memory = Memory {
        batch: model.train.batch,
        seq_len: model.train.seq_len,
        weights_bytes: weights,
        master_bytes: master,
        grads_bytes: grads,
        moments_bytes: moments,
        scales_bytes: scales,
        activations_bytes: activations,
        total_bytes: weights + master + grads + moments + scales + activations,
    };

    let linear: Vec<(&Op, &Format)> = all
        .iter()
        .zip(&formats)
        .filter(|(o, _)| o.class == OpClass::Linear)
        .collect();
    Report {
        model: model.name.clone(),
        shape: Shape {
            layers: model.layers.len() as u64,
            dense_layers: model.count(crate::model::LayerKind::Dense),
            moe_layers: model.count(crate::model::LayerKind::Moe),
            d_model: model.d_model,
            vocab: model.vocab,
            attention: match a.kind {
                AttentionKind::Latent(_) => "mla",
                AttentionKind::Grouped { kv_heads, .. } if kv_heads == a.heads => "mha",
                AttentionKind::Grouped { .. } => "gqa",
            },
            heads: a.heads,
            experts: model.moe.as_ref().map_or(0, |m| m.experts),
            top_k: model.moe.as_ref().map_or(0, |m| m.top_k),
            mtp_depth: model.mtp.map_or(0, |m| m.depth),
            fp8_linear_ops: linear.iter().filter(|(_, f)| f.is_fp8()).count() as u64,
            linear_ops: linear.len() as u64,
        },
        params: Params {
            total,
            active,
            mtp,
            by_component,
            router_bias_buffers,
        },
        flops: Flops {
            seq_len: model.train.seq_len,
            forward_per_token,
            attention_per_token,
            mtp_forward_per_token,
            train_per_token,
            train_per_step: train_per_token * tokens,
        },
        kv_cache,
        memory,
        per_device: None,
    }
}

/// Whether `op`, computing in `format`, is a GEMM with FP8 operands.
pub(crate) fn is_fp8_gemm(op: &Op, format: Format) -> bool {
    matches!(op.class, OpClass::Linear | OpClass::Head) && format.is_fp8()
}

/// The activations that are a norm's output (named as [`Op::input`] names them).
const NORM_OUTPUTS: [&str; 7] = [
    "attn.x", "attn.cq", "attn.ckv", "ffn.x", "moe.x", "head.x", "mtp.eh",
];

/// What one token keeps for the backward pass.
pub(crate) struct Saved {
    pub bytes: u128,
    /// fp32 scales of the FP8 activation tiles, not included in `bytes`.
    pub scale_bytes: u128,
}

/// Activations one token keeps for the backward pass, over the main model and the MTP modules.
/// Each distinct op input is counted once per site and format: a tensor read in two formats
/// (the MoE input, read by the router in 16 bits and by FP8 shared experts) is kept in both.
/// FP8 GEMM inputs are cached in FP8 with one fp32 scale per activation tile, as DeepSeek-V3
/// does (the scales are reported apart, as `scales_bytes`); norms add an fp32 reciprocal RMS; the attention core keeps q, k, v and an fp32
/// log-sum-exp per head; routers keep fp32 scores; and, when `ops` include the end of the
/// model (`last`), the loss keeps fp32 logits once per prediction head (main + each MTP
/// module). `ops` is the whole model or one pipeline stage's share, with each op's format.
/// What `recompute` names is not kept (see [`Recompute`]).
pub(crate) fn saved_per_token<'o>(
    model: &Model,
    ops: impl Iterator<Item = (&'o Op, Format)> + Clone,
    last: bool,
    recompute: Recompute,
) -> Saved {
    let p = &model.precision;
    let a = &model.attention;
    let mut seen: HashSet<(Site, &str, Format)> = HashSet::new();
    let mut bytes = 0u128;
    let mut scale_bytes = 0u128;
    for (op, format) in ops.clone() {
        // Norms and routers keep their input as it arrives (the residual stream, in the
        // compute format) whatever format they compute in; other ops keep it in theirs.
        let stored = match op.class {
            OpClass::Norm | OpClass::Router => p.compute,
            _ => format,
        };
        if !seen.insert((op.site, op.input, stored)) {
            continue;
        }
        let f = stored.bytes() as u128;
        let c = f;
        let n = op.active_copies as u128;
        // A norm's output recomputed from its kept input; the dispatched expert inputs
        // (`moe.experts.x`) are not a norm's output here and stay.
        let input_kept = !(recompute.norm && NORM_OUTPUTS.contains(&op.input)) as u128;
        if let (Some(fp8), true) = (p.fp8, is_fp8_gemm(op, format)) {
            scale_bytes += 4 * op.inp.div_ceil(fp8.act_tile[1]) as u128 * n;
        }
        bytes += match op.class {
            OpClass::Embed => 0,
            OpClass::Linear | OpClass::Head | OpClass::Act => input_kept * op.inp as u128 * n * f,
            OpClass::Norm => op.inp as u128 * c + 4,
            OpClass::Router => input_kept * op.inp as u128 * c + op.out as u128 * 4,
            OpClass::AttnCore if recompute.attn_up => a.heads as u128 * 4,
            OpClass::AttnCore => {
                let (q, k, v) = match a.kind {
                    AttentionKind::Grouped { kv_heads, head_dim } => {
                        (a.heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
                    }
                    AttentionKind::Latent(_) => (
                        a.heads * a.qk_dim(),
                        a.heads * a.qk_dim(),
                        a.heads * a.v_dim(),
                    ),
                };
                (q + k + v) as u128 * f + a.heads as u128 * 4
            }
        };
    }
    if !last {
        return Saved { bytes, scale_bytes };
    }
    // Each MTP module also feeds its normed output to the shared head, outside its op list.
    let depth = model.mtp.map_or(0, |m| m.depth) as u128;
    let head_format = ops
        .into_iter()
        .find(|(o, _)| o.class == OpClass::Head)
        .map_or(p.compute, |(_, f)| f);
    let head_in = if recompute.norm {
        0
    } else {
        model.d_model as u128 * head_format.bytes() as u128
    };
    Saved {
        bytes: bytes + depth * head_in + (1 + depth) * model.vocab as u128 * 4,
        scale_bytes,
    }
}
