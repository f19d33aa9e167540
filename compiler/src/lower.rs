//! `lower`: [`Model`] → forward [`Graph`] at the spec's batch size and sequence length.
//!
//! The graph computes the training loss (main cross-entropy, MTP losses weighted `λ/D`, and
//! sequence-wise balance losses) and exposes the main logits. Node paths are the op paths of
//! [`crate::named_ops`], so each node's format comes from the precision policy, and parameters are
//! named `<op path>.weight` / `.bias`.
//!
//! Semantics follow DeepSeek-V3 as HF transformers implements it (DESIGN.md):
//! - block: `h = x + attn(norm(x))`, `y = h + ffn(norm(h))`, then a final norm and the head;
//! - MLA: `q = q_b(norm(q_a(x)))` (or `q_proj(x)`), `[c_kv | k_rope] = kv_a(x)`,
//!   `[k_nope | v] = kv_b(norm(c_kv))`, one shared RoPE key head, scale
//!   `(nope + rope)^-0.5 · mscale²`;
//! - MTP module k: `h' = block(eh_proj([enorm(emb(t₍ᵢ₊ₖ₊₁₎)) ; hnorm(h)]))`, its own final
//!   norm, the shared head; `h` is the previous module's (or the main model's) last hidden
//!   state before its final norm. The concatenation puts the embedding first, as DeepSeek's
//!   released `eh_proj` weights expect (the paper writes `[h; emb]`).

use std::collections::HashMap;

use crate::dsl::expr::{BinOp, Expr};
use crate::ir::{
    CacheLayout, Graph, Init, InputKind, Op, RopePairs, RouterSpec, ShapeError, TensorType, Update,
    ValueId,
};
use crate::model::{Activation, AttentionKind, Format, LayerKind, Mla, Model, NormKind, Positions};
use crate::named_ops::ops;

/// What the lowered graph's `loss` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Pretraining: the main cross-entropy (mean over tokens), the MTP losses weighted
    /// `λ/D`, and the balance losses.
    Pretrain,
    /// Policy-gradient fine-tuning (GRPO): `Σ wᵢ · CEᵢ` of the main head over the target
    /// tokens, with per-token weights from an `InputKind::TokenWeights` input; no MTP modules
    /// and no balance losses (the aux-loss-free bias update still balances the experts).
    PolicyGradient,
    /// Decoding with a KV cache: one new token per row for `rows` rows, each at its own
    /// position (`InputKind::Positions`, `[rows, 1]`), attending to its sequence's cache of
    /// up to `capacity` tokens per block (`InputKind::KvCache`, `[rows, capacity, E]`). The
    /// graph's outputs are the `logits` `[rows, 1, V]` and each block's new cache entry
    /// `cache.<i>` `[rows, 1, E]`; it has no loss, no MTP modules and no balance losses.
    Decode { rows: u64, capacity: u64 },
}

impl Objective {
    fn decoding(self) -> bool {
        matches!(self, Objective::Decode { .. })
    }
}

/// Lowers a checked model. An error here is a bug in kiln (a checked model always lowers),
/// reported with the op that did not fit.
pub fn lower(model: &Model) -> Result<Graph, ShapeError> {
    lower_for(model, Objective::Pretrain)
}

/// [`lower`] with the loss of `objective`.
pub fn lower_for(model: &Model, objective: Objective) -> Result<Graph, ShapeError> {
    let all = ops(model);
    let formats = all
        .iter()
        .map(|op| (op.path.clone(), model.precision.format_of(op)))
        .collect();
    let grad_formats = all
        .iter()
        .map(|op| (op.path.clone(), model.precision.grad_format_of(op)))
        .collect();
    let (b, t) = match objective {
        Objective::Decode { rows, .. } => (rows, 1),
        _ => (model.train.batch, model.train.seq_len),
    };
    let name = match objective {
        Objective::Decode { rows, capacity } => {
            format!("{} (decode {rows} rows, cache {capacity})", model.name)
        }
        _ => format!("{} (batch {b} × seq_len {t})", model.name),
    };
    let mut l = Lowering {
        m: model,
        g: Graph::new(name),
        formats,
        grad_formats,
        objective,
        b,
        t,
        aux: Vec::new(),
        positions: None,
        layer: 0,
    };
    l.model()?;
    Ok(l.g)
}

struct Lowering<'m> {
    m: &'m Model,
    g: Graph,
    /// The policy's format for every named op path.
    formats: HashMap<String, Format>,
    /// The policy's gradient-GEMM format for every named op path.
    grad_formats: HashMap<String, Format>,
    objective: Objective,
    b: u64,
    t: u64,
    /// Balance losses of the MoE layers, summed into the total loss.
    aux: Vec<ValueId>,
    /// A decode graph's positions input `[B, 1]`.
    positions: Option<ValueId>,
    /// The index of the block being lowered (a decode graph's cache input and output).
    layer: u32,
}

fn var(name: &str) -> Expr {
    Expr::Var(name.to_string())
}

fn add(a: Expr, b: Expr) -> Expr {
    Expr::Bin(BinOp::Add, Box::new(a), Box::new(b))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

type R<T> = Result<T, ShapeError>;

impl Lowering<'_> {
    fn format(&self, path: &str) -> Format {
        self.formats
            .get(path)
            .copied()
            .unwrap_or(self.m.precision.compute)
    }

    fn compute(&self) -> Format {
        self.m.precision.compute
    }

    /// A parameter with the usual initialization and update rule for its role.
    fn param(&mut self, name: String, shape: Vec<u64>, init: Init) -> ValueId {
        let update = if shape.len() >= 2 {
            Update::Decayed
        } else {
            Update::NoDecay
        };
        self.g.param(name, TensorType::f32(shape), init, update)
    }

    fn weight(&mut self, path: &str, shape: Vec<u64>) -> ValueId {
        let init = Init::Normal {
            std: self.m.init_std,
        };
        self.param(format!("{path}.weight"), shape, init)
    }

    fn node(&mut self, op: Op, inputs: &[ValueId], path: &str) -> R<ValueId> {
        let format = self.format(path);
        self.g.node1(op, inputs, path, format)
    }

    fn structural(&mut self, op: Op, inputs: &[ValueId], path: String) -> R<Vec<ValueId>> {
        let format = self.compute();
        self.g.node(op, inputs, path, format)
    }

    fn reshape(&mut self, x: ValueId, shape: Vec<u64>, path: String) -> R<ValueId> {
        Ok(self.structural(Op::Reshape { shape }, &[x], path)?[0])
    }

    fn linear(
        &mut self,
        prefix: &str,
        name: &str,
        x: ValueId,
        inp: u64,
        out: u64,
        bias: bool,
    ) -> R<ValueId> {
        let path = join(prefix, name);
        let w = self.weight(&path, vec![out, inp]);
        let mut inputs = vec![x, w];
        if bias {
            inputs.push(self.param(format!("{path}.bias"), vec![out], Init::Zeros));
        }
        let y = self.node(Op::Linear { bias }, &inputs, &path)?;
        self.record_grad_format(&path, &path);
        Ok(y)
    }

    /// Records the gradient-GEMM format of the GEMM node at `node_path`, from op `op_path`.
    fn record_grad_format(&mut self, node_path: &str, op_path: &str) {
        if let Some(&f) = self.grad_formats.get(op_path) {
            self.g.grad_formats.insert(node_path.to_string(), f);
        }
    }

    fn norm(&mut self, prefix: &str, name: &str, x: ValueId, width: u64) -> R<ValueId> {
        let path = join(prefix, name);
        let eps = self.m.norm.eps;
        let w = self.param(format!("{path}.weight"), vec![width], Init::Ones);
        match self.m.norm.kind {
            NormKind::RmsNorm => self.node(Op::RmsNorm { eps }, &[x, w], &path),
            NormKind::LayerNorm => {
                let b = self.param(format!("{path}.bias"), vec![width], Init::Zeros);
                self.node(Op::LayerNorm { eps }, &[x, w, b], &path)
            }
        }
    }

    /// `a + b`, elementwise.
    fn residual(&mut self, a: ValueId, b: ValueId, path: String) -> R<ValueId> {
        let op = Op::Map {
            expr: add(var("a"), var("b")),
            vars: vec!["a".into(), "b".into()],
        };
        Ok(self.structural(op, &[a, b], path)?[0])
    }

    fn model(&mut self) -> R<()> {
        let m = self.m;
        let (b, t, d, vocab) = (self.b, self.t, m.d_model, m.vocab);
        let tokens = self
            .g
            .input(InputKind::Tokens { offset: 0 }, TensorType::u32([b, t]));
        let embed_w = self.weight("embed", vec![vocab, d]);
        let mut x = self.node(Op::Embedding, &[embed_w, tokens], "embed")?;
        if self.objective.decoding() {
            let pos = self.g.input(InputKind::Positions, TensorType::u32([b, t]));
            self.positions = Some(pos);
        }
        if m.positions == Positions::Learned {
            let pos = match self.positions {
                Some(pos) => pos,
                None => self.g.input(InputKind::Positions, TensorType::u32([b, t])),
            };
            let pos_w = self.weight("pos_embed", vec![m.max_positions, d]);
            let pe = self.node(Op::Embedding, &[pos_w, pos], "pos_embed")?;
            x = self.residual(x, pe, "pos_embed.add".into())?;
        }
        for (i, &kind) in m.layers.iter().enumerate() {
            self.layer = i as u32;
            x = self.block(&format!("layers.{i}"), kind, x)?;
        }
        let head_w = if m.tie_embeddings {
            embed_w
        } else {
            self.weight("head", vec![vocab, d])
        };
        if self.objective.decoding() {
            let xn = self.norm("", "final.norm", x, d)?;
            let fmt = self.format("head");
            let logits = self.g.node1(
                Op::Linear { bias: false },
                &[xn, head_w],
                String::from("head"),
                fmt,
            )?;
            self.g.outputs.push(("logits".into(), logits));
            return Ok(());
        }
        let (logits, main_loss) = self.head_and_loss("", "final.norm", x, head_w, 1)?;
        self.g.outputs.push(("logits".into(), logits));
        self.g.outputs.push(("loss.main".into(), main_loss));

        let mut mtp_losses = Vec::new();
        if self.objective == Objective::PolicyGradient {
            self.g.outputs.push(("loss".into(), main_loss));
            return Ok(());
        }
        if let Some(mtp) = m.mtp {
            let mut prev = x;
            for k in 0..mtp.depth as u32 {
                let prefix = format!("mtp.{k}");
                let tok = self
                    .g
                    .input(InputKind::Tokens { offset: k + 1 }, TensorType::u32([b, t]));
                let fmt = self.format("embed");
                let e = self.g.node1(
                    Op::Embedding,
                    &[embed_w, tok],
                    format!("{prefix}.embed"),
                    fmt,
                )?;
                let en = self.norm(&prefix, "enorm", e, d)?;
                let hn = self.norm(&prefix, "hnorm", prev, d)?;
                let cat = self.structural(Op::Concat, &[en, hn], format!("{prefix}.concat"))?[0];
                let h0 = self.linear(&prefix, "eh_proj", cat, 2 * d, d, false)?;
                let h = self.block(&prefix, mtp.block, h0)?;
                let (_, loss) = self.head_and_loss(&prefix, "norm", h, head_w, k + 2)?;
                self.g.outputs.push((format!("loss.mtp.{k}"), loss));
                mtp_losses.push(loss);
                prev = h;
            }
        }
        for (i, &a) in self.aux.clone().iter().enumerate() {
            self.g.outputs.push((format!("loss.balance.{i}"), a));
        }
        let total = self.total_loss(main_loss, &mtp_losses)?;
        self.g.outputs.push(("loss".into(), total));
        Ok(())
    }

    /// Final norm, head and cross-entropy against tokens at `target_offset`; returns the
    /// logits `[B, T, V]` and the loss.
    fn head_and_loss(
        &mut self,
        prefix: &str,
        norm: &str,
        x: ValueId,
        head_w: ValueId,
        target_offset: u32,
    ) -> R<(ValueId, ValueId)> {
        let (b, t, d, vocab) = (self.b, self.t, self.m.d_model, self.m.vocab);
        let xn = self.norm(prefix, norm, x, d)?;
        let head_path = join(prefix, "head");
        let fmt = self.format("head");
        let logits = self.g.node1(
            Op::Linear { bias: false },
            &[xn, head_w],
            head_path.clone(),
            fmt,
        )?;
        let flat = self.reshape(logits, vec![b * t, vocab], format!("{head_path}.rows"))?;
        let targets = self.g.input(
            InputKind::Tokens {
                offset: target_offset,
            },
            TensorType::u32([b, t]),
        );
        let targets = self.reshape(targets, vec![b * t], format!("{head_path}.targets"))?;
        let loss_path = if prefix.is_empty() {
            "loss.main".to_string()
        } else {
            format!("loss.{prefix}")
        };
        let fmt = self.format("head");
        let mut operands = vec![flat, targets];
        if self.objective == Objective::PolicyGradient {
            let w = self
                .g
                .input(InputKind::TokenWeights, TensorType::f32([b, t]));
            operands.push(self.reshape(w, vec![b * t], format!("{head_path}.weights"))?);
        }
        let loss = self.g.node1(Op::CrossEntropy, &operands, loss_path, fmt)?;
        Ok((logits, loss))
    }

    /// `main + λ/D · Σ mtp + Σ balance`.
    fn total_loss(&mut self, main: ValueId, mtp: &[ValueId]) -> R<ValueId> {
        let mut vars = vec!["main".to_string()];
        let mut inputs = vec![main];
        let mut expr = var("main");
        if let (Some(cfg), false) = (self.m.mtp, mtp.is_empty()) {
            let mut sum: Option<Expr> = None;
            for (k, &l) in mtp.iter().enumerate() {
                let name = format!("mtp{k}");
                vars.push(name.clone());
                inputs.push(l);
                sum = Some(match sum {
                    None => var(&name),
                    Some(s) => add(s, var(&name)),
                });
            }
            let weight = Expr::Num(cfg.weight / cfg.depth as f64);
            let weighted = Expr::Bin(
                BinOp::Mul,
                Box::new(weight),
                Box::new(sum.expect("depth ≥ 1")),
            );
            expr = add(expr, weighted);
        }
        for (i, &a) in self.aux.clone().iter().enumerate() {
            let name = format!("balance{i}");
            vars.push(name.clone());
            inputs.push(a);
            expr = add(expr, var(&name));
        }
        if inputs.len() == 1 {
            return Ok(main);
        }
        Ok(self.structural(Op::Map { expr, vars }, &inputs, "loss".into())?[0])
    }

    fn block(&mut self, prefix: &str, kind: LayerKind, x: ValueId) -> R<ValueId> {
        let a = self.attention(prefix, x)?;
        let h = self.residual(x, a, format!("{prefix}.attn.residual"))?;
        let f = match kind {
            LayerKind::Dense => {
                let ffn = self
                    .m
                    .ffn
                    .as_ref()
                    .expect("checked: dense blocks have [ffn]");
                let hn = self.norm(prefix, "ffn.norm", h, self.m.d_model)?;
                self.mlp(prefix, "ffn", hn, ffn.hidden, &ffn.act.clone(), ffn.bias)?
            }
            LayerKind::Moe => self.moe(prefix, h)?,
        };
        self.residual(h, f, format!("{prefix}.ffn.residual"))
    }

    /// `down(act(…))` with one (`x`) or two (`gate`, `up`) input projections.
    fn mlp(
        &mut self,
        prefix: &str,
        group: &str,
        x: ValueId,
        hidden: u64,
        act: &Activation,
        bias: bool,
    ) -> R<ValueId> {
        let d = self.m.d_model;
        let g = join(prefix, group);
        let up = self.linear(&g, "up", x, d, hidden, bias)?;
        let (inputs, vars) = if act.gated {
            let gate = self.linear(&g, "gate", x, d, hidden, bias)?;
            (vec![gate, up], vec!["gate".to_string(), "up".to_string()])
        } else {
            (vec![up], vec!["x".to_string()])
        };
        let a = self.node(
            Op::Map {
                expr: act.expr.clone(),
                vars,
            },
            &inputs,
            &format!("{g}.act"),
        )?;
        self.linear(&g, "down", a, hidden, d, bias)
    }

    /// RoPE on `x[B, T, H, D]`: by sequence position, or in a decode graph by each row's
    /// position input. RoPE belongs to the attention core's op class, and takes its format.
    fn rope(&mut self, prefix: &str, x: ValueId, path: String, pairs: RopePairs) -> R<ValueId> {
        let rope = self
            .m
            .attention
            .rope
            .expect("checked: rotary attention has [attention.rope]");
        let (theta, yarn) = (rope.theta, rope.yarn);
        let format = self.format(&join(prefix, "attn.core"));
        match self.positions {
            Some(pos) => {
                let op = Op::RopeAt { theta, yarn, pairs };
                self.g.node1(op, &[x, pos], path, format)
            }
            None => self
                .g
                .node1(Op::Rope { theta, yarn, pairs }, &[x], path, format),
        }
    }

    /// GQA/MHA's roped queries and keys and its values, `[B, T, heads, D]`.
    fn grouped_qkv(
        &mut self,
        prefix: &str,
        xn: ValueId,
        hk: u64,
        hd: u64,
    ) -> R<(ValueId, ValueId, ValueId)> {
        let m = self.m;
        let (a, b, t, d) = (&m.attention, self.b, self.t, m.d_model);
        let h = a.heads;
        let p = |s: &str| join(prefix, s);
        let q = self.linear(prefix, "attn.q", xn, d, h * hd, a.bias)?;
        let k = self.linear(prefix, "attn.k", xn, d, hk * hd, a.bias)?;
        let v = self.linear(prefix, "attn.v", xn, d, hk * hd, a.bias)?;
        let mut q = self.reshape(q, vec![b, t, h, hd], p("attn.q.heads"))?;
        let mut k = self.reshape(k, vec![b, t, hk, hd], p("attn.k.heads"))?;
        let v = self.reshape(v, vec![b, t, hk, hd], p("attn.v.heads"))?;
        if m.positions == Positions::Rope {
            q = self.rope(prefix, q, p("attn.q.rope"), RopePairs::Halves)?;
            k = self.rope(prefix, k, p("attn.k.rope"), RopePairs::Halves)?;
        }
        Ok((q, k, v))
    }

    /// MLA's per-token projections: the query's no-RoPE part `[B, T, H, nope]` and roped
    /// part `[B, T, H, rope]`, the normalized latent `c_kv` `[B, T, kv_rank]` and the roped
    /// shared key `[B, T, 1, rope]`.
    fn latent_parts(&mut self, prefix: &str, xn: ValueId, mla: &Mla) -> R<[ValueId; 4]> {
        let m = self.m;
        let (a, b, t, d) = (&m.attention, self.b, self.t, m.d_model);
        let h = a.heads;
        let p = |s: &str| join(prefix, s);
        let qk = mla.nope_dim + mla.rope_dim;
        let q = match mla.q_rank {
            Some(r) => {
                let cq = self.linear(prefix, "attn.q_a", xn, d, r, a.bias)?;
                let cq = self.norm(prefix, "attn.q_norm", cq, r)?;
                self.linear(prefix, "attn.q_b", cq, r, h * qk, false)?
            }
            None => self.linear(prefix, "attn.q", xn, d, h * qk, false)?,
        };
        let q = self.reshape(q, vec![b, t, h, qk], p("attn.q.heads"))?;
        let split = Op::Split {
            sizes: vec![mla.nope_dim, mla.rope_dim],
        };
        let qs = self.structural(split, &[q], p("attn.q.split"))?;
        let q_rope = self.rope(prefix, qs[1], p("attn.q.rope"), RopePairs::Interleaved)?;

        let kv = self.linear(
            prefix,
            "attn.kv_a",
            xn,
            d,
            mla.kv_rank + mla.rope_dim,
            a.bias,
        )?;
        let split = Op::Split {
            sizes: vec![mla.kv_rank, mla.rope_dim],
        };
        let kvs = self.structural(split, &[kv], p("attn.kv_a.split"))?;
        let ckv = self.norm(prefix, "attn.kv_norm", kvs[0], mla.kv_rank)?;
        let k_rope = self.reshape(kvs[1], vec![b, t, 1, mla.rope_dim], p("attn.k_rope.heads"))?;
        let k_rope = self.rope(prefix, k_rope, p("attn.k.rope"), RopePairs::Interleaved)?;
        Ok([qs[0], q_rope, ckv, k_rope])
    }

    fn attention(&mut self, prefix: &str, x: ValueId) -> R<ValueId> {
        if let Objective::Decode { capacity, .. } = self.objective {
            return self.cached_attention(prefix, x, capacity);
        }
        let m = self.m;
        let a = &m.attention;
        let (b, t, d, h) = (self.b, self.t, m.d_model, a.heads);
        let xn = self.norm(prefix, "attn.norm", x, d)?;
        let p = |s: &str| join(prefix, s);
        let (q, k, v) = match &a.kind {
            AttentionKind::Grouped { kv_heads, head_dim } => {
                self.grouped_qkv(prefix, xn, *kv_heads, *head_dim)?
            }
            AttentionKind::Latent(mla) => {
                let [q_nope, q_rope, ckv, k_rope] = self.latent_parts(prefix, xn, mla)?;
                let k_rope = self.structural(
                    Op::Expand { axis: 2, n: h },
                    &[k_rope],
                    p("attn.k_rope.expand"),
                )?[0];

                let kvb = self.linear(
                    prefix,
                    "attn.kv_b",
                    ckv,
                    mla.kv_rank,
                    h * (mla.nope_dim + mla.v_dim),
                    false,
                )?;
                let kvb = self.reshape(
                    kvb,
                    vec![b, t, h, mla.nope_dim + mla.v_dim],
                    p("attn.kv_b.heads"),
                )?;
                let split = Op::Split {
                    sizes: vec![mla.nope_dim, mla.v_dim],
                };
                let kvbs = self.structural(split, &[kvb], p("attn.kv_b.split"))?;
                let q = self.structural(Op::Concat, &[q_nope, q_rope], p("attn.q.concat"))?[0];
                let k = self.structural(Op::Concat, &[kvbs[0], k_rope], p("attn.k.concat"))?[0];
                (q, k, kvbs[1])
            }
        };
        let scale = a.softmax_scale();
        let path = p("attn.core");
        let fmt = self.format(&path);
        let o = self
            .g
            .node(Op::Attention { scale }, &[q, k, v], path, fmt)?[0];
        let o = self.reshape(o, vec![b, t, h * a.v_dim()], p("attn.core.merge"))?;
        self.linear(prefix, "attn.o", o, h * a.v_dim(), d, a.bias)
    }

    /// A decode graph's attention: the projections of [`Lowering::attention`] for one token
    /// per row, the token's cache entry (a named output), and [`Op::CachedAttention`] over the
    /// block's cache input. MLA's entry is the normalized latent and the roped shared key;
    /// its key and value up-projection (`kv_b`) is absorbed into the attention.
    fn cached_attention(&mut self, prefix: &str, x: ValueId, capacity: u64) -> R<ValueId> {
        let m = self.m;
        let a = &m.attention;
        let (b, d, h) = (self.b, m.d_model, a.heads);
        let xn = self.norm(prefix, "attn.norm", x, d)?;
        let p = |s: &str| join(prefix, s);
        let (q, entry, layout, kv_b) = match &a.kind {
            AttentionKind::Grouped { kv_heads, head_dim } => {
                let (hk, hd) = (*kv_heads, *head_dim);
                let (q, k, v) = self.grouped_qkv(prefix, xn, hk, hd)?;
                let k = self.reshape(k, vec![b, 1, hk * hd], p("attn.k.rows"))?;
                let v = self.reshape(v, vec![b, 1, hk * hd], p("attn.v.rows"))?;
                let entry = self.structural(Op::Concat, &[k, v], p("attn.cache.entry"))?[0];
                let layout = CacheLayout::Grouped {
                    kv_heads: hk,
                    head_dim: hd,
                };
                (q, entry, layout, None)
            }
            AttentionKind::Latent(mla) => {
                let [q_nope, q_rope, ckv, k_rope] = self.latent_parts(prefix, xn, mla)?;
                let q = self.structural(Op::Concat, &[q_nope, q_rope], p("attn.q.concat"))?[0];
                let k_rope =
                    self.reshape(k_rope, vec![b, 1, mla.rope_dim], p("attn.k_rope.rows"))?;
                let entry = self.structural(Op::Concat, &[ckv, k_rope], p("attn.cache.entry"))?[0];
                let kv_b = self.weight(
                    &p("attn.kv_b"),
                    vec![h * (mla.nope_dim + mla.v_dim), mla.kv_rank],
                );
                let layout = CacheLayout::Latent {
                    rank: mla.kv_rank,
                    nope: mla.nope_dim,
                    rope: mla.rope_dim,
                    v: mla.v_dim,
                };
                (q, entry, layout, Some(kv_b))
            }
        };
        let e = self.g.values[entry].ty.shape[2];
        let layer = self.layer;
        let cache = self.g.input(
            InputKind::KvCache { layer },
            TensorType::f32([b, capacity, e]),
        );
        self.g.outputs.push((format!("cache.{layer}"), entry));
        let pos = self.positions.expect("a decode graph has positions");
        let mut operands = vec![q, entry, cache, pos];
        operands.extend(kv_b);
        let path = p("attn.core");
        let fmt = self.format(&path);
        let op = Op::CachedAttention {
            scale: a.softmax_scale(),
            layout,
        };
        let o = self.g.node1(op, &operands, path, fmt)?;
        let o = self.reshape(o, vec![b, 1, h * a.v_dim()], p("attn.core.merge"))?;
        self.linear(prefix, "attn.o", o, h * a.v_dim(), d, a.bias)
    }

    fn moe(&mut self, prefix: &str, x: ValueId) -> R<ValueId> {
        let m = self.m;
        let moe = m.moe.as_ref().expect("checked: moe blocks have [moe]");
        let (b, t, d, e) = (self.b, self.t, m.d_model, moe.experts);
        let p = |s: &str| join(prefix, s);
        let xn = self.norm(prefix, "moe.norm", x, d)?;
        let flat = self.reshape(xn, vec![b * t, d], p("moe.tokens"))?;

        let router = p("moe.router");
        let rw = self.weight(&router, vec![e, d]);
        let rb = self.g.param(
            format!("{router}.bias"),
            TensorType::f32([e]),
            Init::Zeros,
            Update::BalanceBias,
        );
        let op = Op::Router(RouterSpec {
            score: moe.score,
            select: moe.select,
            groups: moe.groups,
            groups_kept: moe.groups_kept,
            group_score: moe.group_score,
            top_k: moe.top_k,
            normalize: moe.normalize_top_k,
            scale: moe.route_scale,
        });
        let fmt = self.format(&router);
        let routed = self.g.node(op, &[flat, rw, rb], router.clone(), fmt)?;
        let (weights, experts, scores) = (routed[0], routed[1], routed[2]);

        let eh = moe.expert_hidden;
        let ex = p("moe.experts");
        let mut inputs = vec![flat, weights, experts];
        if moe.act.gated {
            inputs.push(self.weight(&format!("{ex}.gate"), vec![e, eh, d]));
        }
        inputs.push(self.weight(&format!("{ex}.up"), vec![e, eh, d]));
        inputs.push(self.weight(&format!("{ex}.down"), vec![e, d, eh]));
        let op = Op::Experts {
            act: moe.act.expr.clone(),
            gated: moe.act.gated,
        };
        let fmt = self.format(&format!("{ex}.up"));
        let mut y = self.g.node1(op, &inputs, ex.clone(), fmt)?;
        self.record_grad_format(&ex, &format!("{ex}.up"));
        if moe.shared > 0 {
            // HF stores the shared experts as one MLP of width shared · expert_hidden.
            let s = self.mlp(
                prefix,
                "moe.shared",
                flat,
                moe.shared * eh,
                &moe.act.clone(),
                false,
            )?;
            y = self.residual(y, s, p("moe.combine"))?;
        }
        if moe.seq_aux > 0.0 && self.objective == Objective::Pretrain {
            let scores = self.reshape(scores, vec![b, t, e], p("moe.balance.scores"))?;
            let experts = self.reshape(experts, vec![b, t, moe.top_k], p("moe.balance.experts"))?;
            let op = Op::BalanceLoss {
                alpha: moe.seq_aux,
                top_k: moe.top_k,
            };
            let loss = self.structural(op, &[scores, experts], p("moe.balance"))?[0];
            self.aux.push(loss);
        }
        self.reshape(y, vec![b, t, d], p("moe.out"))
    }
}
