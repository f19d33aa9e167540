//! One statement per node: the call of the runtime function the interpreter calls for its op,
//! with literal shapes, and what `new` builds once for it ([`Setup`]).

use std::collections::HashMap;

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use super::scope::{local, Scope};
use super::{lit, lit_f64};
use crate::ir::{Def, Graph, InputKind, Node, Op, RopePairs, ValueId};
use crate::model::{GroupScore, NormKind, ScoreFunc, Selection};
use kiln_ir::expr::Expr;

/// How the statement for one node reads its operands.
struct Operands<'a> {
    graph: &'a Graph,
    node: &'a Node,
}

impl Operands<'_> {
    fn value(&self, i: usize) -> ValueId {
        self.node.inputs[i]
    }

    fn shape(&self, i: usize) -> Vec<usize> {
        self.graph.values[self.value(i)]
            .ty
            .shape
            .iter()
            .map(|&d| d as usize)
            .collect()
    }

    fn out_shape(&self, i: usize) -> Vec<usize> {
        self.graph.values[self.node.outputs[i]]
            .ty
            .shape
            .iter()
            .map(|&d| d as usize)
            .collect()
    }
}

/// A slice expression for a value: a parameter or input borrowed from the feed, or a local.
pub(super) fn slice_of(graph: &Graph, v: ValueId) -> TokenStream {
    match graph.values[v].def {
        Def::Param(p) => {
            let i = lit(p.index());
            quote!(&feed.params[#i][..])
        }
        Def::Input(InputKind::Tokens { offset }) => {
            let name = format_ident!("tokens_{}", offset);
            quote!(&#name[..])
        }
        Def::Input(InputKind::Positions) => quote!(&positions[..]),
        Def::Input(InputKind::TokenWeights) => quote!(&token_weights[..]),
        Def::Input(InputKind::KvCache { .. }) => {
            unreachable!("the Rust emitter takes training and forward Programs")
        }
        Def::Node { .. } => {
            let name = local(v);
            quote!(&#name[..])
        }
    }
}

fn norm_kind(kind: NormKind) -> TokenStream {
    match kind {
        NormKind::RmsNorm => quote!(NormKind::RmsNorm),
        NormKind::LayerNorm => quote!(NormKind::LayerNorm),
    }
}

/// The parts of a generated module that `new` builds once.
#[derive(Default)]
pub(super) struct Setup {
    pub(super) fields: Vec<TokenStream>,
    pub(super) inits: Vec<TokenStream>,
    /// RoPE tables by (positions, rotated dims, theta bits, yarn): one field each.
    pub(super) rope: HashMap<String, proc_macro2::Ident>,
    /// Compiled expressions by (text, variables): one field each.
    pub(super) maps: HashMap<String, proc_macro2::Ident>,
    /// Expert activations by (text, gated): one field each.
    pub(super) activations: HashMap<String, proc_macro2::Ident>,
}

/// Code that builds `e` (the generated module needs no expression parser, so the runtime
/// links none).
fn expr_tokens(e: &Expr) -> TokenStream {
    match e {
        Expr::Var(v) => {
            let v = Literal::string(v);
            quote!(Expr::Var(#v.to_string()))
        }
        Expr::Num(x) => {
            let x = Literal::f64_unsuffixed(*x);
            quote!(Expr::Num(#x))
        }
        Expr::Neg(a) => {
            let a = expr_tokens(a);
            quote!(Expr::Neg(Box::new(#a)))
        }
        Expr::Bin(op, a, b) => {
            let op = format_ident!("{op:?}");
            let (a, b) = (expr_tokens(a), expr_tokens(b));
            quote!(Expr::Bin(BinOp::#op, Box::new(#a), Box::new(#b)))
        }
        Expr::Pow(a, n) => {
            let (a, n) = (expr_tokens(a), Literal::u32_unsuffixed(*n));
            quote!(Expr::Pow(Box::new(#a), #n))
        }
        Expr::Call(f, a) => {
            let (f, a) = (format_ident!("{f:?}"), expr_tokens(a));
            quote!(Expr::Call(Func::#f, Box::new(#a)))
        }
    }
}

impl Setup {
    /// The field holding the compiled expression `expr` over `vars`, added on first use.
    fn map(&mut self, expr: &Expr, vars: &[&str]) -> proc_macro2::Ident {
        let key = format!("{expr}\u{0}{}", vars.join("\u{0}"));
        if let Some(f) = self.maps.get(&key) {
            return f.clone();
        }
        let f = format_ident!("map_{}", self.maps.len());
        let (tree, names) = (expr_tokens(expr), vars.iter().map(|v| Literal::string(v)));
        self.field(
            &f,
            quote!(Elementwise),
            quote!(elementwise(&#tree, &[#(#names),*])),
        );
        self.maps.insert(key, f.clone());
        f
    }

    /// The field holding the expert activation `expr` (gated or not), added on first use.
    fn activation(&mut self, expr: &Expr, gated: bool) -> proc_macro2::Ident {
        let key = format!("{expr}\u{0}{gated}");
        if let Some(f) = self.activations.get(&key) {
            return f.clone();
        }
        let f = format_ident!("act_{}", self.activations.len());
        let tree = expr_tokens(expr);
        self.field(
            &f,
            quote!(op_fns::ExprActivation),
            quote!(op_fns::ExprActivation::new(&#tree, #gated)),
        );
        self.activations.insert(key, f.clone());
        f
    }

    fn field(&mut self, name: &proc_macro2::Ident, ty: TokenStream, init: TokenStream) {
        self.fields.push(quote!(#name: #ty));
        self.inits.push(quote!(#name: #init));
    }
}

/// Which `experts` node's saved state each `experts_grad` node reuses.
pub(super) struct ExpertPairs {
    /// `experts_grad` node index → its `experts` node index.
    pub(super) forward: HashMap<usize, usize>,
    /// The `experts` nodes whose state some `experts_grad` reuses.
    pub(super) backward: Vec<usize>,
}

impl ExpertPairs {
    pub(super) fn of(graph: &Graph) -> Self {
        let forward = graph.experts_forward();
        let backward = forward.values().copied().collect();
        ExpertPairs { forward, backward }
    }
}

/// The statement computing `node` (index `index`), naming its operands and results through
/// `scope`.
pub(super) fn node_statement(
    graph: &Graph,
    index: usize,
    node: &Node,
    setup: &mut Setup,
    scope: &mut dyn Scope,
    experts: &ExpertPairs,
) -> TokenStream {
    let o = Operands { graph, node };
    let args: Vec<TokenStream> = node.inputs.iter().map(|&v| scope.read(v)).collect();
    let outs: Vec<proc_macro2::Ident> = node.outputs.iter().map(|&v| scope.def(v)).collect();
    let a = |i: usize| args[i].clone();
    match &node.op {
        // `emit` takes a `Compiled` (training and forward Programs); decode Programs run on
        // the interpreter and the CUDA plan.
        Op::RopeAt { .. } | Op::CachedAttention { .. } => {
            unreachable!("the Rust emitter takes training and forward Programs, not decode ones")
        }
        Op::Fill { value, .. } => {
            let n = lit(o.out_shape(0).iter().product::<usize>());
            let value = lit_f64(*value);
            let y = &outs[0];
            quote!(let #y: Vec<f32> = op_fns::fill(#value, #n);)
        }
        Op::Reshape { .. } => {
            let y = &outs[0];
            let x = a(0);
            quote!(let #y = (#x).to_vec();)
        }
        Op::Map { expr, vars } | Op::MapGrad { expr, vars, .. } => {
            let vars: Vec<&str> = vars.iter().map(String::as_str).collect();
            let field = setup.map(expr, &vars);
            match &node.op {
                Op::MapGrad { wrt, .. } => {
                    let n = node.inputs.len() - 1;
                    let xs: Vec<TokenStream> = (0..n).map(a).collect();
                    let dy = a(n);
                    let wrt: Vec<Literal> =
                        wrt.iter().map(|&w| Literal::u32_unsuffixed(w)).collect();
                    let count = lit(outs.len());
                    quote!(
                        let [#(#outs),*]: [Vec<f32>; #count] = self.#field
                            .backward(&[#(#xs),*], #dy, &[#(#wrt),*])
                            .try_into()
                            .expect("one gradient per operand asked for");
                    )
                }
                _ => {
                    let xs: Vec<TokenStream> = (0..node.inputs.len()).map(a).collect();
                    let y = &outs[0];
                    quote!(let #y: Vec<f32> = self.#field.forward(&[#(#xs),*]);)
                }
            }
        }
        Op::Split { sizes } => {
            let sizes: Vec<Literal> = sizes.iter().map(|&s| lit(s)).collect();
            let count = lit(outs.len());
            let x = a(0);
            quote!(
                let [#(#outs),*]: [Vec<f32>; #count] = op_fns::split(#x, &[#(#sizes),*])
                    .try_into()
                    .expect("one part per size");
            )
        }
        Op::Concat => {
            let widths: Vec<Literal> = (0..node.inputs.len())
                .map(|i| lit(*o.shape(i).last().expect("rank ≥ 1")))
                .collect();
            let xs: Vec<TokenStream> = (0..node.inputs.len()).map(a).collect();
            let y = &outs[0];
            quote!(let #y: Vec<f32> = op_fns::concat(&[#(#xs),*], &[#(#widths),*]);)
        }
        Op::Expand { axis, n } => {
            let s = o.shape(0);
            let outer = lit(s[..*axis as usize].iter().product::<usize>());
            let inner = lit(s[*axis as usize + 1..].iter().product::<usize>());
            let n = lit(*n);
            let (y, x) = (&outs[0], a(0));
            quote!(let #y: Vec<f32> = op_fns::expand(#x, #outer, #inner, #n);)
        }
        Op::SumAxis { axis } => {
            let s = o.shape(0);
            let outer = lit(s[..*axis as usize].iter().product::<usize>());
            let len = lit(s[*axis as usize]);
            let inner = lit(s[*axis as usize + 1..].iter().product::<usize>());
            let (y, x) = (&outs[0], a(0));
            quote!(let #y: Vec<f32> = op_fns::sum_axis(#x, #outer, #len, #inner);)
        }
        Op::Embedding => {
            let t = o.shape(0);
            let (vocab, d, path) = (lit(t[0]), lit(t[1]), scope.path(node));
            let (y, w, ids) = (&outs[0], a(0), a(1));
            quote!(let #y: Vec<f32> = op_fns::embedding(#w, #vocab, #d, #ids, #path)?;)
        }
        Op::EmbeddingGrad { vocab } => {
            let d = lit(*o.shape(1).last().expect("rank ≥ 1"));
            let vocab = lit(*vocab);
            let (y, ids, dy) = (&outs[0], a(0), a(1));
            quote!(let #y: Vec<f32> = dense::embedding_bwd(#ids, #dy, #vocab, #d);)
        }
        Op::Linear { bias } | Op::LinearMap { bias, .. } => {
            let w = o.shape(1);
            let (out, inp) = (lit(w[0]), lit(w[1]));
            let b = if *bias {
                let b = a(2);
                quote!(Some(#b))
            } else {
                quote!(None)
            };
            let (x, wt) = (a(0), a(1));
            let pre = &outs[0];
            let linear = quote!(let #pre: Vec<f32> = op_fns::linear(#x, #wt, #b, #out, #inp););
            if let Op::LinearMap { expr, var, .. } = &node.op {
                let field = setup.map(expr, &[var]);
                let y = &outs[1];
                quote!(#linear let #y: Vec<f32> = self.#field.forward(&[&#pre[..]]);)
            } else {
                linear
            }
        }
        Op::LinearGrad { bias } => {
            let w = o.shape(1);
            let (out, inp) = (lit(w[0]), lit(w[1]));
            let (x, wt, dy) = (a(0), a(1), a(2));
            let (dx, dw) = (&outs[0], &outs[1]);
            let db = if *bias {
                let db = &outs[2];
                quote!(let #db: Vec<f32> = g.db.expect("a biased layer has a bias gradient");)
            } else {
                quote!()
            };
            quote!(
                let g = op_fns::linear_grad(#x, #wt, #dy, #out, #inp, #bias);
                let #dx: Vec<f32> = g.dx;
                let #dw: Vec<f32> = g.dw;
                #db
            )
        }
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => {
            let (kind, b) = if let Op::LayerNorm { .. } = node.op {
                let b = a(2);
                (norm_kind(NormKind::LayerNorm), quote!(Some(#b)))
            } else {
                (norm_kind(NormKind::RmsNorm), quote!(None))
            };
            let eps = lit_f64(*eps);
            let (y, x, w) = (&outs[0], a(0), a(1));
            quote!(let #y: Vec<f32> = op_fns::norm_fwd(#kind, #eps, #x, #w, #b);)
        }
        Op::AddNorm { norm, eps } => {
            let b = if *norm == NormKind::LayerNorm {
                let b = a(3);
                quote!(Some(#b))
            } else {
                quote!(None)
            };
            let (kind, eps) = (norm_kind(*norm), lit_f64(*eps));
            let (x, r, w) = (a(0), a(1), a(2));
            let (s, y) = (&outs[0], &outs[1]);
            quote!(let (#s, #y): (Vec<f32>, Vec<f32>) = op_fns::add_norm(#kind, #eps, #x, #r, #w, #b);)
        }
        Op::RmsNormGrad { eps } | Op::LayerNormGrad { eps } => {
            let kind = if let Op::LayerNormGrad { .. } = node.op {
                norm_kind(NormKind::LayerNorm)
            } else {
                norm_kind(NormKind::RmsNorm)
            };
            let eps = lit_f64(*eps);
            let (x, w, dy) = (a(0), a(1), a(2));
            let count = lit(outs.len());
            quote!(
                let [#(#outs),*]: [Vec<f32>; #count] = op_fns::norm_bwd(#kind, #eps, #x, #w, #dy)
                    .try_into()
                    .expect("a norm has one gradient per operand");
            )
        }
        Op::AddNormGrad { norm, eps } => {
            let (kind, eps) = (norm_kind(*norm), lit_f64(*eps));
            let (s, w, dy, ds) = (a(0), a(1), a(2), a(3));
            let count = lit(outs.len());
            quote!(
                let [#(#outs),*]: [Vec<f32>; #count] = op_fns::add_norm_grad(#kind, #eps, #s, #w, #dy, #ds)
                    .try_into()
                    .expect("a norm has one gradient per operand");
            )
        }
        Op::Rope { theta, yarn, pairs } | Op::RopeGrad { theta, yarn, pairs } => {
            let s = o.shape(0);
            let key = format!("{}_{}_{:?}_{:?}", s[1], s[3], theta.to_bits(), yarn);
            let next = setup.rope.len();
            let field = match setup.rope.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = format_ident!("rope_{}", next);
                    let (seq, dim, theta) = (lit(s[1]), lit(s[3]), lit_f64(*theta));
                    let yarn = match yarn {
                        Some(y) => {
                            let (factor, orig) = (lit_f64(y.factor), lit(y.original_max_positions));
                            let (fast, slow) = (lit_f64(y.beta_fast), lit_f64(y.beta_slow));
                            let (m, mall) = (lit_f64(y.mscale), lit_f64(y.mscale_all_dim));
                            quote!(Some(&attention::Yarn {
                                factor: #factor,
                                original_max_positions: #orig,
                                beta_fast: #fast,
                                beta_slow: #slow,
                                mscale: #m,
                                mscale_all_dim: #mall,
                            }))
                        }
                        None => quote!(None),
                    };
                    setup.field(
                        &f,
                        quote!(attention::RopeTables<f32>),
                        quote!(attention::rope_tables(#seq, #dim, #theta, #yarn)),
                    );
                    setup.rope.insert(key, f.clone());
                    f
                }
            };
            let pairs = match pairs {
                RopePairs::Halves => quote!(attention::RopePairs::Halves),
                RopePairs::Interleaved => quote!(attention::RopePairs::Interleaved),
            };
            let f = if matches!(node.op, Op::Rope { .. }) {
                quote!(attention::rope_fwd)
            } else {
                quote!(attention::rope_bwd)
            };
            let (d0, d1, d2, d3) = (lit(s[0]), lit(s[1]), lit(s[2]), lit(s[3]));
            let (y, x) = (&outs[0], a(0));
            quote!(let #y: Vec<f32> = #f(#x, #d0, #d1, #d2, #d3, &self.#field, #pairs);)
        }
        Op::Attention { scale } => {
            let (q, k, v) = (o.shape(0), o.shape(1), o.shape(2));
            let dims = [q[0], q[1], q[2], k[2], q[3], v[3]].map(lit);
            let scale = lit_f64(*scale);
            let (qa, ka, va) = (a(0), a(1), a(2));
            let (out, lse) = (&outs[0], &outs[1]);
            quote!(let (#out, #lse): (Vec<f32>, Vec<f32>) =
                attention::attention_fwd(#qa, #ka, #va, #(#dims),*, #scale);)
        }
        Op::AttentionGrad { scale } => {
            let (q, k, v) = (o.shape(0), o.shape(1), o.shape(2));
            let dims = [q[0], q[1], q[2], k[2], q[3], v[3]].map(lit);
            let scale = lit_f64(*scale);
            let xs: Vec<TokenStream> = (0..6).map(a).collect();
            let (dq, dk, dv) = (&outs[0], &outs[1], &outs[2]);
            quote!(let (#dq, #dk, #dv): (Vec<f32>, Vec<f32>, Vec<f32>) =
                attention::attention_bwd(#(#xs),*, #(#dims),*, #scale);)
        }
        Op::Router(spec) | Op::RouterGrad(spec) => {
            let (x, w) = (o.shape(0), o.shape(1));
            let (n, d, e) = (lit(x[0]), lit(x[1]), lit(w[0]));
            let score = match spec.score {
                ScoreFunc::Softmax => quote!(moe::ScoreFunc::Softmax),
                ScoreFunc::Sigmoid => quote!(moe::ScoreFunc::Sigmoid),
            };
            let select = match spec.select {
                Selection::Greedy => quote!(moe::Selection::Greedy),
                Selection::GroupLimited => quote!(moe::Selection::GroupLimited),
            };
            let group_score = match spec.group_score {
                GroupScore::Max => quote!(moe::GroupScore::Max),
                GroupScore::Top2Sum => quote!(moe::GroupScore::Top2Sum),
            };
            let (groups, kept, top_k) = (lit(spec.groups), lit(spec.groups_kept), lit(spec.top_k));
            let (normalize, scale) = (spec.normalize, lit_f64(spec.scale));
            let cfg = quote!(&moe::RouterConfig {
                score: #score,
                select: #select,
                groups: #groups,
                groups_kept: #kept,
                group_score: #group_score,
                top_k: #top_k,
                normalize: #normalize,
                scale: #scale,
            });
            if let Op::Router(_) = node.op {
                let (xa, wa, ba) = (a(0), a(1), a(2));
                let (wt, ex, sc) = (&outs[0], &outs[1], &outs[2]);
                quote!(
                    let r = moe::router_fwd(#xa, #n, #d, #wa, #e, #ba, #cfg);
                    let #wt: Vec<f32> = r.weights;
                    let #ex: Vec<u32> = r.experts;
                    let #sc: Vec<f32> = r.scores;
                )
            } else {
                let (xa, wa) = (a(0), a(1));
                let rest: Vec<TokenStream> = (3..8).map(a).collect();
                let (dx, dw) = (&outs[0], &outs[1]);
                quote!(let (#dx, #dw): (Vec<f32>, Vec<f32>) =
                    op_fns::router_grad(#xa, #n, #d, #wa, #e, #(#rest),*, #cfg);)
            }
        }
        Op::Experts { act, gated } | Op::ExpertsGrad { act, gated } => {
            let x = o.shape(0);
            let k = o.shape(1)[1];
            let up_at = if *gated { 4 } else { 3 };
            let up = o.shape(up_at);
            let (e, h) = (up[0], up[1]);
            let field = setup.activation(act, *gated);
            let w_gate = if *gated {
                let g = a(3);
                quote!(Some(#g))
            } else {
                quote!(None)
            };
            let (xa, wts, ids) = (a(0), a(1), a(2));
            let (w_up, w_down) = (a(up_at), a(up_at + 1));
            let (n, d, k, e_l, h) = (lit(x[0]), lit(x[1]), lit(k), lit(e), lit(h));
            let path = scope.path(node);
            let ffn = quote!(
                op_fns::check_ids(#ids, #e_l, #path)?;
                let ffn = moe::ExpertFfn {
                    x: #xa,
                    n: #n,
                    d: #d,
                    weights: #wts,
                    experts: #ids,
                    k: #k,
                    w_gate: #w_gate,
                    w_up: #w_up,
                    w_down: #w_down,
                    e: #e_l,
                    h: #h,
                    act: &self.#field,
                };
            );
            if let Op::Experts { .. } = node.op {
                let y = &outs[0];
                if experts.backward.contains(&index) {
                    let saved = scope.saved_def(index);
                    let keep = scope.keep_saved(index);
                    quote!(
                        let (#y, #saved): (Vec<f32>, moe::ExpertsSaved<f32>) = { #ffn moe::experts_fwd(&ffn) };
                        #keep
                    )
                } else {
                    quote!(let #y: Vec<f32> = { #ffn moe::experts_fwd(&ffn).0 };)
                }
            } else {
                let state = match experts.forward.get(&index) {
                    Some(&f) => scope.saved_use(f),
                    None => quote!(moe::experts_fwd(&ffn).1),
                };
                let dy = a(up_at + 2);
                let names: Vec<&proc_macro2::Ident> = outs.iter().collect();
                let (dx, dwt) = (names[0], names[1]);
                let rest = if *gated {
                    let (dg, du, dd) = (names[2], names[3], names[4]);
                    quote!(
                        let #dg: Vec<f32> = g.dw_gate.expect("a gated expert has a gate gradient");
                        let #du: Vec<f32> = g.dw_up;
                        let #dd: Vec<f32> = g.dw_down;
                    )
                } else {
                    let (du, dd) = (names[2], names[3]);
                    quote!(let #du: Vec<f32> = g.dw_up; let #dd: Vec<f32> = g.dw_down;)
                };
                quote!(
                    let g = { #ffn let saved = #state; moe::experts_bwd(&ffn, &saved, #dy) };
                    let #dx: Vec<f32> = g.dx;
                    let #dwt: Vec<f32> = g.d_weights;
                    #rest
                )
            }
        }
        Op::CrossEntropy => {
            let l = o.shape(0);
            let (n, vocab, path) = (lit(l[0]), lit(l[1]), scope.path(node));
            let (y, logits, t) = (&outs[0], a(0), a(1));
            if node.inputs.len() == 3 {
                let w = a(2);
                quote!(let #y: Vec<f32> = vec![op_fns::cross_entropy_weighted(#logits, #n, #vocab, #t, #w, #path)?];)
            } else {
                quote!(let #y: Vec<f32> = vec![op_fns::cross_entropy(#logits, #n, #vocab, #t, #path)?];)
            }
        }
        Op::CrossEntropyGrad => {
            let l = o.shape(0);
            let (n, vocab) = (lit(l[0]), lit(l[1]));
            let (y, logits, t, dl) = (&outs[0], a(0), a(1), a(2));
            if node.inputs.len() == 4 {
                let w = a(3);
                quote!(let #y: Vec<f32> = op_fns::cross_entropy_weighted_grad(#logits, #n, #vocab, #t, #w, (#dl)[0]);)
            } else {
                quote!(let #y: Vec<f32> = op_fns::cross_entropy_grad(#logits, #n, #vocab, #t, (#dl)[0]);)
            }
        }
        Op::BalanceLoss { alpha, top_k } | Op::BalanceLossGrad { alpha, top_k } => {
            let s = o.shape(0);
            let (s0, s1, s2) = (lit(s[0]), lit(s[1]), lit(s[2]));
            let (top_k, alpha) = (lit(*top_k), lit_f64(*alpha));
            let (y, x, ids) = (&outs[0], a(0), a(1));
            if let Op::BalanceLoss { .. } = node.op {
                quote!(let #y: Vec<f32> = vec![moe::balance_loss_fwd(#x, #ids, #s0, #s1, #s2, #top_k, #alpha)];)
            } else {
                let dl = a(2);
                quote!(let #y: Vec<f32> =
                    moe::balance_loss_bwd(#x, #ids, #s0, #s1, #s2, #top_k, #alpha, (#dl)[0]);)
            }
        }
    }
}
