//! The stable textual form of a graph (`kiln emit ir`), used in snapshots and reviews.
//!
//! ```text
//! graph tiny (batch 8 × seq_len 128)
//! params
//!   %1: f32[256, 256] = param embed.weight normal(0.02)
//! inputs
//!   %0: u32[8, 128] = tokens(+0)
//! body
//!   %2: f32[8, 128, 256] = embedding(%1, %0) bf16  # embed
//! outputs
//!   loss = %99
//! ```
//!
//! Values are numbered by their position in the value arena, so the text is stable for a
//! given lowering.

use std::fmt::{self, Write};

use super::{CacheLayout, Def, Graph, Init, InputKind, Op, RopePairs, RouterSpec, Update, ValueId};

fn v(id: ValueId) -> String {
    format!("%{}", id.index())
}

/// `0.5`, `1e-6`, `10000`: the shortest form that reads back as the same number.
fn num(x: f64) -> String {
    let plain = format!("{x}");
    let sci = format!("{x:e}");
    if sci.len() < plain.len() {
        sci
    } else {
        plain
    }
}

fn attributes(op: &Op) -> String {
    match op {
        Op::Embedding | Op::Concat | Op::CrossEntropy | Op::Linear { .. } => String::new(),
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => format!("[eps={}]", num(*eps)),
        Op::Map { expr, .. } => format!("[{expr}]"),
        Op::Split { sizes } | Op::Reshape { shape: sizes } => {
            let s: Vec<String> = sizes.iter().map(u64::to_string).collect();
            format!("[{}]", s.join(", "))
        }
        Op::Expand { axis, n } => format!("[axis={axis}, n={n}]"),
        Op::RopeAt { theta, yarn, pairs } => attributes(&Op::Rope {
            theta: *theta,
            yarn: *yarn,
            pairs: *pairs,
        }),
        Op::CachedAttention { scale, layout } => match *layout {
            CacheLayout::Grouped { kv_heads, head_dim } => format!(
                "[scale={}, grouped(kv_heads={kv_heads}, head_dim={head_dim})]",
                num(*scale)
            ),
            CacheLayout::Latent {
                rank,
                nope,
                rope,
                v,
            } => format!(
                "[scale={}, latent(rank={rank}, nope={nope}, rope={rope}, v={v})]",
                num(*scale)
            ),
        },
        Op::Rope { theta, yarn, pairs } => {
            let pairs = match pairs {
                RopePairs::Halves => "halves",
                RopePairs::Interleaved => "interleaved",
            };
            let mut s = format!("[theta={}, pairs={pairs}", num(*theta));
            if let Some(y) = yarn {
                let _ = write!(
                    s,
                    ", yarn(factor={}, original={}, beta_fast={}, beta_slow={}, mscale={}, mscale_all_dim={})",
                    num(y.factor),
                    y.original_max_positions,
                    num(y.beta_fast),
                    num(y.beta_slow),
                    num(y.mscale),
                    num(y.mscale_all_dim)
                );
            }
            s.push(']');
            s
        }
        Op::Attention { scale } => format!("[causal, scale={}]", num(*scale)),
        Op::Router(spec) | Op::RouterGrad(spec) => router(spec),
        Op::Experts { act, .. } | Op::ExpertsGrad { act, .. } => format!("[{act}]"),
        Op::BalanceLoss { alpha, top_k } | Op::BalanceLossGrad { alpha, top_k } => {
            format!("[alpha={}, top-{top_k}]", num(*alpha))
        }
        Op::Fill { value, shape } => {
            let s: Vec<String> = shape.iter().map(u64::to_string).collect();
            format!("[{} × [{}]]", num(*value), s.join(", "))
        }
        Op::SumAxis { axis } => format!("[axis={axis}]"),
        Op::EmbeddingGrad { vocab } => format!("[vocab={vocab}]"),
        Op::LinearGrad { .. } | Op::CrossEntropyGrad => String::new(),
        Op::RmsNormGrad { eps } | Op::LayerNormGrad { eps } => format!("[eps={}]", num(*eps)),
        Op::MapGrad { expr, wrt, .. } => {
            let w: Vec<String> = wrt.iter().map(u32::to_string).collect();
            format!("[{expr}; wrt {}]", w.join(", "))
        }
        Op::RopeGrad { theta, yarn, pairs } => attributes(&Op::Rope {
            theta: *theta,
            yarn: *yarn,
            pairs: *pairs,
        }),
        Op::AttentionGrad { scale } => format!("[causal, scale={}]", num(*scale)),
        Op::AddNorm { eps, .. } | Op::AddNormGrad { eps, .. } => format!("[eps={}]", num(*eps)),
        Op::LinearMap { expr, var, .. } => format!("[{var} -> {expr}]"),
    }
}

fn router(spec: &RouterSpec) -> String {
    let RouterSpec {
        score,
        select,
        groups,
        groups_kept,
        group_score,
        top_k,
        normalize,
        scale,
    } = spec;
    let mut s = format!("[{}, top-{top_k}", format!("{score:?}").to_lowercase());
    if *select == crate::attrs::Selection::GroupLimited {
        let gs = match group_score {
            crate::attrs::GroupScore::Max => "max",
            crate::attrs::GroupScore::Top2Sum => "top2_sum",
        };
        let _ = write!(s, ", groups {groups_kept}/{groups} by {gs}");
    }
    if *normalize {
        s.push_str(", normalized");
    }
    let _ = write!(s, ", scale={}]", num(*scale));
    s
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {}", self.name)?;
        writeln!(f, "params")?;
        for (id, value) in self.values.iter() {
            if let Def::Param(p) = value.def {
                let param = &self.params[p];
                let init = match param.init {
                    Init::Normal { std } => format!("normal({})", num(std)),
                    Init::Zeros => "zeros".to_string(),
                    Init::Ones => "ones".to_string(),
                };
                let update = match param.update {
                    Update::Decayed => "",
                    Update::NoDecay => " no_decay",
                    Update::BalanceBias => " balance_bias",
                };
                writeln!(
                    f,
                    "  {}: {} = param {} {init}{update}",
                    v(id),
                    value.ty,
                    param.name
                )?;
            }
        }
        writeln!(f, "inputs")?;
        for (id, value) in self.values.iter() {
            if let Def::Input(kind) = value.def {
                let what = match kind {
                    InputKind::Tokens { offset } => format!("tokens(+{offset})"),
                    InputKind::Positions => "positions".to_string(),
                    InputKind::TokenWeights => "token weights".to_string(),
                    InputKind::KvCache { layer } => format!("kv cache {layer}"),
                };
                writeln!(f, "  {}: {} = {what}", v(id), value.ty)?;
            }
        }
        writeln!(f, "body")?;
        for (_, node) in self.nodes.iter() {
            let results: Vec<String> = node
                .outputs
                .iter()
                .map(|&o| format!("{}: {}", v(o), self.values[o].ty))
                .collect();
            let operands: Vec<String> = match &node.op {
                Op::Map { vars, .. } => node
                    .inputs
                    .iter()
                    .zip(vars)
                    .map(|(&i, name)| format!("{name}={}", v(i)))
                    .collect(),
                _ => node.inputs.iter().map(|&i| v(i)).collect(),
            };
            writeln!(
                f,
                "  {} = {}{}({}) {}  # {}",
                results.join(", "),
                node.op.name(),
                attributes(&node.op),
                operands.join(", "),
                node.format,
                node.path
            )?;
        }
        writeln!(f, "outputs")?;
        for (name, id) in &self.outputs {
            writeln!(f, "  {name} = {}", v(*id))?;
        }
        Ok(())
    }
}
