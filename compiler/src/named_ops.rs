//! The named ops of a model: the one place that knows which weights a block has.
//!
//! Every parameter tensor and every op the precision policy can select has a dotted path
//! (`layers.3.attn.kv_a`, `layers.5.moe.experts.up`, `mtp.0.eh_proj`, `head`). The analyzer
//! counts parameters and FLOPs from this list, the checker matches precision patterns and FP8
//! tile rules against it, and later stages name IR values after it, so the three can never
//! disagree about what a model contains.

use serde::Serialize;

use crate::model::{AttentionKind, Format, LayerKind, Model, Positions, Precision};

/// What an op computes, for the precision policy's per-class formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// Token or position embedding lookup.
    Embed,
    /// A linear projection (dense or expert); a GEMM.
    Linear,
    /// RMSNorm or LayerNorm.
    Norm,
    /// Softmax(q·kᵀ)·v, with RoPE applied to its inputs.
    AttnCore,
    /// The elementwise activation expression of an FFN or expert.
    Act,
    /// Router scores and top-k selection (its GEMM included).
    Router,
    /// The output projection to vocabulary logits.
    Head,
}

/// The component an op's parameters are counted under in the analyzer's breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Embedding,
    Attention,
    DenseFfn,
    RoutedExperts,
    SharedExperts,
    Router,
    Norms,
    Head,
    /// MTP's own projection from `[h; emb]` back to the model width.
    MtpProj,
}

impl Component {
    pub const ALL: [Component; 9] = [
        Component::Embedding,
        Component::Attention,
        Component::DenseFfn,
        Component::RoutedExperts,
        Component::SharedExperts,
        Component::Router,
        Component::Norms,
        Component::Head,
        Component::MtpProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Embedding => "embedding",
            Component::Attention => "attention",
            Component::DenseFfn => "dense_ffn",
            Component::RoutedExperts => "routed_experts",
            Component::SharedExperts => "shared_experts",
            Component::Router => "router",
            Component::Norms => "norms",
            Component::Head => "head",
            Component::MtpProj => "mtp_proj",
        }
    }
}

/// Where an op sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// Embedding, final norm, head.
    Model,
    /// Transformer block `i` of the main stack.
    Layer(usize),
    /// Multi-token-prediction module `k` (0-based; it predicts token `t + k + 2`).
    Mtp(usize),
}

/// One named op. Linear ops multiply a `[tokens, inp]` activation by a `[out, inp]` weight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Op {
    pub path: String,
    pub class: OpClass,
    pub component: Component,
    pub site: Site,
    /// Contraction dimension (input features). For norms and embeddings: the vector width.
    pub inp: u64,
    /// Output features. For embeddings: rows of the table. For norms and parameter-free ops: 0.
    pub out: u64,
    /// Learned parameters of one copy of the op (weights and biases).
    pub params: u64,
    /// Identical copies (routed or shared experts); 1 otherwise.
    pub copies: u64,
    /// Name of the activation this op reads, local to its site (`attn.x` is the normed input
    /// of attention, read by `q_a` and `kv_a` alike). Ops with the same `input` at the same
    /// site read one tensor, which the analyzer counts once.
    pub input: &'static str,
    /// Copies each token passes through (top-k for routed experts; `copies` otherwise).
    pub active_copies: u64,
}

impl Op {
    /// FLOPs per token of this op's matrix products (2·inp·out per active copy); 0 for ops
    /// that are not GEMMs. Embedding lookups are free; the attention core is counted apart.
    pub fn matmul_flops(&self) -> u64 {
        match self.class {
            OpClass::Linear | OpClass::Router | OpClass::Head => {
                2 * self.inp * self.out * self.active_copies
            }
            _ => 0,
        }
    }

    pub fn total_params(&self) -> u64 {
        self.params * self.copies
    }

    pub fn active_params(&self) -> u64 {
        self.params * self.active_copies
    }

    /// The path with its `layers.N.` or `mtp.N.` prefix removed (`attn.kv_a`).
    pub fn local_path(&self) -> &str {
        match self.site {
            Site::Model => &self.path,
            Site::Layer(_) | Site::Mtp(_) => {
                let mut parts = self.path.splitn(3, '.');
                parts.nth(2).unwrap_or(&self.path)
            }
        }
    }
}

struct Builder<'m> {
    model: &'m Model,
    ops: Vec<Op>,
}

impl Builder<'_> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        site: Site,
        prefix: &str,
        name: &str,
        class: OpClass,
        component: Component,
        inp: u64,
        out: u64,
        params: u64,
        copies: u64,
        active_copies: u64,
        input: &'static str,
    ) {
        let path = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.ops.push(Op {
            path,
            class,
            component,
            site,
            inp,
            out,
            params,
            copies,
            active_copies,
            input,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        site: Site,
        prefix: &str,
        name: &str,
        c: Component,
        input: &'static str,
        inp: u64,
        out: u64,
        bias: bool,
    ) {
        let params = inp * out + if bias { out } else { 0 };
        self.push(
            site,
            prefix,
            name,
            OpClass::Linear,
            c,
            inp,
            out,
            params,
            1,
            1,
            input,
        );
    }

    fn norm(&mut self, site: Site, prefix: &str, name: &str, input: &'static str, width: u64) {
        let params = self.model.norm.kind.vectors() * width;
        self.push(
            site,
            prefix,
            name,
            OpClass::Norm,
            Component::Norms,
            width,
            0,
            params,
            1,
            1,
            input,
        );
    }

    fn block(&mut self, site: Site, prefix: &str, kind: LayerKind) {
        let m = self.model;
        let d = m.d_model;
        let a = &m.attention;
        let bias = a.bias;
        let att = Component::Attention;
        self.norm(site, prefix, "attn.norm", "attn.residual", d);
        match &a.kind {
            AttentionKind::Grouped { kv_heads, head_dim } => {
                self.linear(
                    site,
                    prefix,
                    "attn.q",
                    att,
                    "attn.x",
                    d,
                    a.heads * head_dim,
                    bias,
                );
                self.linear(
                    site,
                    prefix,
                    "attn.k",
                    att,
                    "attn.x",
                    d,
                    kv_heads * head_dim,
                    bias,
                );
                self.linear(
                    site,
                    prefix,
                    "attn.v",
                    att,
                    "attn.x",
                    d,
                    kv_heads * head_dim,
                    bias,
                );
            }
            AttentionKind::Latent(mla) => {
                let q_out = a.heads * (mla.nope_dim + mla.rope_dim);
                match mla.q_rank {
                    Some(r) => {
                        self.linear(site, prefix, "attn.q_a", att, "attn.x", d, r, bias);
                        self.norm(site, prefix, "attn.q_norm", "attn.q_latent", r);
                        self.linear(site, prefix, "attn.q_b", att, "attn.cq", r, q_out, false);
                    }
                    None => self.linear(site, prefix, "attn.q", att, "attn.x", d, q_out, false),
                }
                let kv_a_out = mla.kv_rank + mla.rope_dim;
                self.linear(site, prefix, "attn.kv_a", att, "attn.x", d, kv_a_out, bias);
                self.norm(site, prefix, "attn.kv_norm", "attn.kv_latent", mla.kv_rank);
                let kv_out = a.heads * (mla.nope_dim + mla.v_dim);
                self.linear(
                    site,
                    prefix,
                    "attn.kv_b",
                    att,
                    "attn.ckv",
                    mla.kv_rank,
                    kv_out,
                    false,
                );
            }
        }
        let core = OpClass::AttnCore;
        self.push(
            site,
            prefix,
            "attn.core",
            core,
            att,
            a.qk_dim(),
            a.v_dim(),
            0,
            1,
            1,
            "attn.qkv",
        );
        self.linear(
            site,
            prefix,
            "attn.o",
            att,
            "attn.out",
            a.heads * a.v_dim(),
            d,
            bias,
        );

        match kind {
            LayerKind::Dense => {
                let ffn = m.ffn.as_ref().expect("checked: dense layers have [ffn]");
                self.norm(site, prefix, "ffn.norm", "ffn.residual", d);
                let spec = Mlp {
                    group: "ffn",
                    c: Component::DenseFfn,
                    hidden: ffn.hidden,
                    gated: ffn.act.gated,
                    bias: ffn.bias,
                    copies: 1,
                    active: 1,
                };
                self.mlp(site, prefix, spec);
            }
            LayerKind::Moe => {
                let moe = m.moe.as_ref().expect("checked: moe layers have [moe]");
                self.norm(site, prefix, "moe.norm", "moe.residual", d);
                let router = OpClass::Router;
                self.push(
                    site,
                    prefix,
                    "moe.router",
                    router,
                    Component::Router,
                    d,
                    moe.experts,
                    d * moe.experts,
                    1,
                    1,
                    "moe.x",
                );
                let (hidden, gated) = (moe.expert_hidden, moe.act.gated);
                let experts = Mlp {
                    group: "moe.experts",
                    c: Component::RoutedExperts,
                    hidden,
                    gated,
                    bias: false,
                    copies: moe.experts,
                    active: moe.top_k,
                };
                self.mlp(site, prefix, experts);
                if moe.shared > 0 {
                    let shared = Mlp {
                        group: "moe.shared",
                        c: Component::SharedExperts,
                        hidden,
                        gated,
                        bias: false,
                        copies: moe.shared,
                        active: moe.shared,
                    };
                    self.mlp(site, prefix, shared);
                }
            }
        }
    }

    fn mlp(&mut self, site: Site, prefix: &str, m: Mlp) {
        let d = self.model.d_model;
        let proj = |inp: u64, out: u64| inp * out + if m.bias { out } else { 0 };
        let lin = OpClass::Linear;
        // Expert inputs are per copy (tokens are permuted to their experts); a dense FFN and
        // the shared experts read the normed residual directly.
        let (x, a, h) = match m.group {
            "ffn" => ("ffn.x", "ffn.act_in", "ffn.h"),
            "moe.experts" => ("moe.experts.x", "moe.experts.act_in", "moe.experts.h"),
            _ => ("moe.x", "moe.shared.act_in", "moe.shared.h"),
        };
        let (c, hidden, copies, active) = (m.c, m.hidden, m.copies, m.active);
        if m.gated {
            self.push(
                site,
                prefix,
                &format!("{}.gate", m.group),
                lin,
                c,
                d,
                hidden,
                proj(d, hidden),
                copies,
                active,
                x,
            );
        }
        self.push(
            site,
            prefix,
            &format!("{}.up", m.group),
            lin,
            c,
            d,
            hidden,
            proj(d, hidden),
            copies,
            active,
            x,
        );
        let act_in = if m.gated { 2 * hidden } else { hidden };
        self.push(
            site,
            prefix,
            &format!("{}.act", m.group),
            OpClass::Act,
            c,
            act_in,
            hidden,
            0,
            copies,
            active,
            a,
        );
        self.push(
            site,
            prefix,
            &format!("{}.down", m.group),
            lin,
            c,
            hidden,
            d,
            proj(hidden, d),
            copies,
            active,
            h,
        );
    }
}

/// One feed-forward network (dense FFN, the routed experts or the shared experts).
struct Mlp {
    group: &'static str,
    c: Component,
    hidden: u64,
    gated: bool,
    bias: bool,
    copies: u64,
    active: u64,
}

/// All ops of `model` in execution order: embeddings, the blocks, final norm, head, then the
/// MTP modules (whose embedding and head are the main model's and are not repeated).
pub fn ops(model: &Model) -> Vec<Op> {
    let mut b = Builder {
        model,
        ops: Vec::with_capacity(model.layers.len() * 16 + 8),
    };
    let d = model.d_model;
    let m = Site::Model;
    b.push(
        m,
        "",
        "embed",
        OpClass::Embed,
        Component::Embedding,
        d,
        model.vocab,
        model.vocab * d,
        1,
        1,
        "tokens",
    );
    if model.positions == Positions::Learned {
        let n = model.max_positions;
        b.push(
            m,
            "",
            "pos_embed",
            OpClass::Embed,
            Component::Embedding,
            d,
            n,
            n * d,
            1,
            1,
            "positions",
        );
    }
    for (i, &kind) in model.layers.iter().enumerate() {
        b.block(Site::Layer(i), &format!("layers.{i}"), kind);
    }
    b.norm(m, "", "final.norm", "final.residual", d);
    let head_params = if model.tie_embeddings {
        0
    } else {
        d * model.vocab
    };
    b.push(
        m,
        "",
        "head",
        OpClass::Head,
        Component::Head,
        d,
        model.vocab,
        head_params,
        1,
        1,
        "head.x",
    );
    if let Some(mtp) = &model.mtp {
        for k in 0..mtp.depth as usize {
            let site = Site::Mtp(k);
            let prefix = format!("mtp.{k}");
            b.norm(site, &prefix, "enorm", "mtp.emb", d);
            b.norm(site, &prefix, "hnorm", "mtp.h", d);
            b.linear(
                site,
                &prefix,
                "eh_proj",
                Component::MtpProj,
                "mtp.eh",
                2 * d,
                d,
                false,
            );
            b.block(site, &prefix, mtp.block);
            b.norm(site, &prefix, "norm", "residual.final", d);
        }
    }
    b.ops
}

/// The precision policy applied to named ops. (Here rather than in `model.rs`, so that the
/// model does not depend on the ops it contains: `named_ops` reads `model`, never the
/// reverse.)
impl Precision {
    /// Whether a keep pattern selects `op`.
    pub fn is_kept(&self, op: &Op) -> bool {
        self.keep.iter().any(|p| p.matches(&op.path))
    }

    /// The forward-pass format of an op: its class's format, except that an op a keep pattern
    /// selects never runs in FP8 and uses `keep_format` instead.
    pub fn format_of(&self, op: &Op) -> Format {
        let class = match op.class {
            OpClass::Embed => self.embed,
            OpClass::Linear => self.linear,
            OpClass::Norm => self.norm,
            OpClass::AttnCore => self.attn_core,
            OpClass::Act => self.act,
            OpClass::Router => self.router,
            OpClass::Head => self.head,
        };
        self.unless_kept(op, class)
    }

    /// The operand format of an op's input- and weight-gradient GEMMs: `linear_grad` for
    /// linear ops, the forward format otherwise, and never FP8 for a kept op.
    pub fn grad_format_of(&self, op: &Op) -> Format {
        match op.class {
            OpClass::Linear => self.unless_kept(op, self.linear_grad),
            _ => self.format_of(op),
        }
    }

    fn unless_kept(&self, op: &Op, format: Format) -> Format {
        if format.is_fp8() && self.is_kept(op) {
            self.keep_format
        } else {
            format
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_str;

    const TINY: &str = include_str!("../../specs/tiny.toml");

    #[test]
    fn keep_only_takes_ops_out_of_fp8() {
        let m = check_str(TINY).unwrap();
        let all = ops(&m);
        let p = &m.precision;
        let find = |path: &str| all.iter().find(|o| o.path == path).unwrap();
        // Kept in the spec, but not FP8 by class: the class format (fp32) stands.
        assert_eq!(p.format_of(find("layers.1.moe.router")), Format::Fp32);
        assert_eq!(p.format_of(find("layers.0.attn.norm")), Format::Fp32);
        // Kept linear: out of FP8, into keep_format, forward and backward.
        assert_eq!(p.format_of(find("layers.0.attn.kv_a")), Format::Bf16);
        assert_eq!(p.grad_format_of(find("layers.0.attn.kv_a")), Format::Bf16);
        // Not kept: FP8 both ways.
        assert_eq!(p.format_of(find("layers.1.moe.experts.up")), Format::E4m3);
        assert_eq!(p.grad_format_of(find("mtp.0.eh_proj")), Format::E4m3);
    }

    #[test]
    fn linear_grad_applies_without_fp8_forward() {
        let spec = TINY
            .replace("linear = \"e4m3\"", "linear = \"bf16\"")
            .replace("linear_grad = \"e4m3\"", "linear_grad = \"fp32\"");
        let m = check_str(&spec).unwrap();
        let all = ops(&m);
        let up = all.iter().find(|o| o.path == "layers.0.ffn.up").unwrap();
        assert_eq!(m.precision.format_of(up), Format::Bf16);
        assert_eq!(m.precision.grad_format_of(up), Format::Fp32);
        assert_eq!(m.precision.fp8, None, "no FP8 format is used");
    }
}
