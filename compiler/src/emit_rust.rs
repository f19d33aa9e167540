//! The Rust emitter: a Program → a module of straight-line Rust that runs it with constant
//! shapes, calling the runtime's kernels (`kiln emit rust`, `kiln::model!`).
//!
//! Every node becomes one statement that calls the function the interpreter calls for that op
//! (`kiln_runtime::ops`, or a `kiln_runtime::cpu` kernel) with the node's shapes written as
//! literals, so the generated module computes the interpreter's bits without walking a graph,
//! looking up shapes or dispatching on ops. Values are locals, freed by `drop` right after
//! their last use; parameters and inputs are borrowed from the feed. What can be built once
//! (RoPE tables, compiled activation expressions) is built in `new`.
//!
//! Each layer's run of nodes (its forward pass; its backward pass) is outlined into a method
//! whose body names everything positionally (parameters `p[i]`, operands `aN`, locals `lN`),
//! so layers that compute the same thing on their own parameters produce the same tokens and
//! share one method: DeepSeek-V3's 61 layers become three forward and three backward methods,
//! and the code grows with the kinds of layer, not their number. What crosses a method's
//! boundary is a value or an `experts` node's saved state; the caller drops what it read last.
//!
//! User text reaches the output only as string literals (the model name), made by `quote`, so
//! a spec cannot inject code; the module's identifier is sanitized.

use std::collections::HashMap;

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use crate::ir::{Def, Graph, InputKind, Node, Op, RopePairs, ValueId};
use crate::model::{GroupScore, NormKind, ScoreFunc, Selection};
use crate::program::{Compiled, TrainOutputs};

/// A `usize` literal without suffix.
fn lit(n: impl TryInto<usize>) -> Literal {
    Literal::usize_unsuffixed(n.try_into().ok().expect("sizes fit in usize"))
}

/// An `f64` literal that reads back to exactly `x`.
fn lit_f64(x: f64) -> TokenStream {
    if x.is_finite() {
        let l = Literal::f64_suffixed(x);
        quote!(#l)
    } else if x.is_nan() {
        quote!(f64::NAN)
    } else if x > 0.0 {
        quote!(f64::INFINITY)
    } else {
        quote!(f64::NEG_INFINITY)
    }
}

/// The module identifier for a model name: [`crate::names::module_name`] (snake case, only
/// ASCII letters, digits and `_`, never a keyword or a name that would shadow the prelude).
pub fn module_ident(name: &str) -> String {
    crate::names::module_name(name)
}

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
fn slice_of(graph: &Graph, v: ValueId) -> TokenStream {
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
        Def::Node { .. } => {
            let name = local(v);
            quote!(&#name[..])
        }
    }
}

fn local(v: ValueId) -> proc_macro2::Ident {
    format_ident!("v{}", v.index())
}

fn norm_kind(kind: NormKind) -> TokenStream {
    match kind {
        NormKind::RmsNorm => quote!(NormKind::RmsNorm),
        NormKind::LayerNorm => quote!(NormKind::LayerNorm),
    }
}

/// How statements name what they read and bind. The runner's own body and an outlined layer
/// function name things differently; the statements are the same.
trait Scope {
    /// A slice expression reading `v`.
    fn read(&mut self, v: ValueId) -> TokenStream;
    /// The local a statement binds `v` to.
    fn def(&mut self, v: ValueId) -> proc_macro2::Ident;
    /// The local a statement bound `v` to (after [`Scope::def`]).
    fn bound(&self, v: ValueId) -> proc_macro2::Ident;
    /// What follows the statement that bound `v` when something reads `v` later.
    fn keep_result(&self, v: ValueId) -> TokenStream;
    /// An expression moving `v` out, if this scope owns it (and so drops or moves it).
    fn take(&self, v: ValueId) -> Option<TokenStream>;
    /// The local holding the expert-FFN state that node `node` saves.
    fn saved_def(&mut self, node: usize) -> proc_macro2::Ident;
    /// What follows the statement that bound the state of `node`.
    fn keep_saved(&self, node: usize) -> TokenStream;
    /// The expert-FFN state node `node` saved, owned or borrowed.
    fn saved_use(&mut self, node: usize) -> TokenStream;
    /// A `&str` expression for the node's op path (error messages name it).
    fn path(&mut self, node: &Node) -> TokenStream;
}

/// The runner's own body. What one statement computes moves at once into a store indexed by
/// value (`vals` for floats, `ids` for token and expert ids; `saved` for expert states by
/// node), so no local outlives its statement: a function holding a whole model's saved
/// activations in locals is one LLVM optimizes in superlinear time (DeepSeek-V3's did not
/// finish in 25 minutes). Parameters and inputs come from the feed.
struct Straight<'g> {
    graph: &'g Graph,
}

fn saved_local(node: usize) -> proc_macro2::Ident {
    format_ident!("saved_{}", node)
}

impl Straight<'_> {
    /// The store `v` lives in, and its index there.
    fn slot(&self, v: ValueId) -> (proc_macro2::Ident, Literal) {
        let store = if self.graph.values[v].ty.dtype == crate::ir::DType::U32 {
            format_ident!("ids")
        } else {
            format_ident!("vals")
        };
        (store, lit(v.index()))
    }
}

impl Scope for Straight<'_> {
    fn read(&mut self, v: ValueId) -> TokenStream {
        match self.graph.values[v].def {
            Def::Node { .. } => {
                let (store, i) = self.slot(v);
                quote!(&#store[#i][..])
            }
            _ => slice_of(self.graph, v),
        }
    }

    fn def(&mut self, v: ValueId) -> proc_macro2::Ident {
        local(v)
    }

    fn bound(&self, v: ValueId) -> proc_macro2::Ident {
        local(v)
    }

    fn keep_result(&self, v: ValueId) -> TokenStream {
        let (store, i) = self.slot(v);
        let l = local(v);
        quote!(#store[#i] = #l;)
    }

    fn take(&self, v: ValueId) -> Option<TokenStream> {
        matches!(self.graph.values[v].def, Def::Node { .. }).then(|| {
            let (store, i) = self.slot(v);
            quote!(std::mem::take(&mut #store[#i]))
        })
    }

    fn saved_def(&mut self, node: usize) -> proc_macro2::Ident {
        saved_local(node)
    }

    fn keep_saved(&self, node: usize) -> TokenStream {
        let (l, i) = (saved_local(node), lit(node));
        quote!(saved[#i] = Some(#l);)
    }

    fn saved_use(&mut self, node: usize) -> TokenStream {
        let i = lit(node);
        quote!(saved[#i].take().expect("the experts node saved its state"))
    }

    fn path(&mut self, node: &Node) -> TokenStream {
        let l = Literal::string(&node.path);
        quote!(#l)
    }
}

/// What crosses the boundary of an outlined function: a value, or the expert-FFN state an
/// `experts` node saved for its `experts_grad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Value(ValueId),
    Saved(usize),
}

/// The body of an outlined function, named so that two layers computing the same thing on
/// different parameters produce the same tokens: locals `lN` and states `sN` in order of
/// definition, operands from outside `aN` in order of first use, parameters `p[N]` and op
/// paths `paths[N]` in order of first use.
struct Outlined<'g> {
    graph: &'g Graph,
    locals: HashMap<ValueId, proc_macro2::Ident>,
    saved: HashMap<usize, proc_macro2::Ident>,
    /// What the body binds, in order.
    defined: Vec<Slot>,
    inputs: Vec<(Slot, proc_macro2::Ident)>,
    params: Vec<usize>,
    paths: Vec<String>,
}

impl Outlined<'_> {
    fn input(&mut self, slot: Slot) -> proc_macro2::Ident {
        if let Some((_, a)) = self.inputs.iter().find(|(s, _)| *s == slot) {
            return a.clone();
        }
        let a = format_ident!("a{}", self.inputs.len());
        self.inputs.push((slot, a.clone()));
        a
    }
}

impl Scope for Outlined<'_> {
    fn read(&mut self, v: ValueId) -> TokenStream {
        if let Some(l) = self.locals.get(&v) {
            return quote!(&#l[..]);
        }
        if let Def::Param(p) = self.graph.values[v].def {
            let k = match self.params.iter().position(|&q| q == p.index()) {
                Some(k) => k,
                None => {
                    self.params.push(p.index());
                    self.params.len() - 1
                }
            };
            let k = lit(k);
            return quote!(p[#k]);
        }
        let a = self.input(Slot::Value(v));
        quote!(#a)
    }

    fn def(&mut self, v: ValueId) -> proc_macro2::Ident {
        let l = format_ident!("l{}", self.locals.len());
        self.locals.insert(v, l.clone());
        self.defined.push(Slot::Value(v));
        l
    }

    fn bound(&self, v: ValueId) -> proc_macro2::Ident {
        self.locals[&v].clone()
    }

    fn keep_result(&self, _: ValueId) -> TokenStream {
        quote!()
    }

    fn take(&self, v: ValueId) -> Option<TokenStream> {
        self.locals.get(&v).map(|l| quote!(#l))
    }

    fn keep_saved(&self, _: usize) -> TokenStream {
        quote!()
    }

    fn saved_def(&mut self, node: usize) -> proc_macro2::Ident {
        let s = format_ident!("s{}", self.saved.len());
        self.saved.insert(node, s.clone());
        self.defined.push(Slot::Saved(node));
        s
    }

    fn saved_use(&mut self, node: usize) -> TokenStream {
        if let Some(s) = self.saved.get(&node) {
            return quote!(#s);
        }
        let a = self.input(Slot::Saved(node));
        quote!(#a)
    }

    fn path(&mut self, node: &Node) -> TokenStream {
        let k = lit(self.paths.len());
        self.paths.push(node.path.clone());
        quote!(paths[#k])
    }
}

/// The parts of a generated module that `new` builds once.
#[derive(Default)]
struct Setup {
    fields: Vec<TokenStream>,
    inits: Vec<TokenStream>,
    /// RoPE tables by (positions, rotated dims, theta bits, yarn): one field each.
    rope: HashMap<String, proc_macro2::Ident>,
    /// Compiled expressions by (text, variables): one field each.
    maps: HashMap<String, proc_macro2::Ident>,
    /// Expert activations by (text, gated): one field each.
    activations: HashMap<String, proc_macro2::Ident>,
}

impl Setup {
    /// The field holding the compiled expression `text` over `vars`, added on first use.
    fn map(&mut self, text: &str, vars: &[&str]) -> proc_macro2::Ident {
        let key = format!("{text}\u{0}{}", vars.join("\u{0}"));
        if let Some(f) = self.maps.get(&key) {
            return f.clone();
        }
        let f = format_ident!("map_{}", self.maps.len());
        let (text, names) = (
            Literal::string(text),
            vars.iter().map(|v| Literal::string(v)),
        );
        self.field(
            &f,
            quote!(Elementwise),
            quote!(elementwise(#text, &[#(#names),*])),
        );
        self.maps.insert(key, f.clone());
        f
    }

    /// The field holding the expert activation `text` (gated or not), added on first use.
    fn activation(&mut self, text: &str, gated: bool) -> proc_macro2::Ident {
        let key = format!("{text}\u{0}{gated}");
        if let Some(f) = self.activations.get(&key) {
            return f.clone();
        }
        let f = format_ident!("act_{}", self.activations.len());
        let lit = Literal::string(text);
        self.field(
            &f,
            quote!(ops::ExprActivation),
            quote!(activation(#lit, #gated)),
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
struct ExpertPairs {
    /// `experts_grad` node index → its `experts` node index.
    forward: HashMap<usize, usize>,
    /// The `experts` nodes whose state some `experts_grad` reuses.
    backward: Vec<usize>,
}

impl ExpertPairs {
    fn of(graph: &Graph) -> Self {
        let forward = graph.experts_forward();
        let backward = forward.values().copied().collect();
        ExpertPairs { forward, backward }
    }
}

/// The statement computing `node` (index `index`), naming its operands and results through
/// `scope`.
fn node_statement(
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
        Op::Fill { value, .. } => {
            let n = lit(o.out_shape(0).iter().product::<usize>());
            let value = lit_f64(*value);
            let y = &outs[0];
            quote!(let #y: Vec<f32> = ops::fill(#value, #n);)
        }
        Op::Reshape { .. } => {
            let y = &outs[0];
            let x = a(0);
            quote!(let #y = (#x).to_vec();)
        }
        Op::Map { expr, vars } | Op::MapGrad { expr, vars, .. } => {
            let vars: Vec<&str> = vars.iter().map(String::as_str).collect();
            let field = setup.map(&expr.to_string(), &vars);
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
                let [#(#outs),*]: [Vec<f32>; #count] = ops::split(#x, &[#(#sizes),*])
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
            quote!(let #y: Vec<f32> = ops::concat(&[#(#xs),*], &[#(#widths),*]);)
        }
        Op::Expand { axis, n } => {
            let s = o.shape(0);
            let outer = lit(s[..*axis as usize].iter().product::<usize>());
            let inner = lit(s[*axis as usize + 1..].iter().product::<usize>());
            let n = lit(*n);
            let (y, x) = (&outs[0], a(0));
            quote!(let #y: Vec<f32> = ops::expand(#x, #outer, #inner, #n);)
        }
        Op::SumAxis { axis } => {
            let s = o.shape(0);
            let outer = lit(s[..*axis as usize].iter().product::<usize>());
            let len = lit(s[*axis as usize]);
            let inner = lit(s[*axis as usize + 1..].iter().product::<usize>());
            let (y, x) = (&outs[0], a(0));
            quote!(let #y: Vec<f32> = ops::sum_axis(#x, #outer, #len, #inner);)
        }
        Op::Embedding => {
            let t = o.shape(0);
            let (vocab, d, path) = (lit(t[0]), lit(t[1]), scope.path(node));
            let (y, w, ids) = (&outs[0], a(0), a(1));
            quote!(let #y: Vec<f32> = ops::embedding(#w, #vocab, #d, #ids, #path)?;)
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
            let linear = quote!(let #pre: Vec<f32> = ops::linear(#x, #wt, #b, #out, #inp););
            if let Op::LinearMap { expr, var, .. } = &node.op {
                let field = setup.map(&expr.to_string(), &[var]);
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
                let g = ops::linear_grad(#x, #wt, #dy, #out, #inp, #bias);
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
            quote!(let #y: Vec<f32> = ops::norm_fwd(#kind, #eps, #x, #w, #b);)
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
            quote!(let (#s, #y): (Vec<f32>, Vec<f32>) = ops::add_norm(#kind, #eps, #x, #r, #w, #b);)
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
                let [#(#outs),*]: [Vec<f32>; #count] = ops::norm_bwd(#kind, #eps, #x, #w, #dy)
                    .try_into()
                    .expect("a norm has one gradient per operand");
            )
        }
        Op::AddNormGrad { norm, eps } => {
            let (kind, eps) = (norm_kind(*norm), lit_f64(*eps));
            let (s, w, dy, ds) = (a(0), a(1), a(2), a(3));
            let count = lit(outs.len());
            quote!(
                let [#(#outs),*]: [Vec<f32>; #count] = ops::add_norm_grad(#kind, #eps, #s, #w, #dy, #ds)
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
                ScoreFunc::Softmax => quote!(moe::Score::Softmax),
                ScoreFunc::Sigmoid => quote!(moe::Score::Sigmoid),
            };
            let select = match spec.select {
                Selection::Greedy => quote!(moe::Select::Greedy),
                Selection::GroupLimited => quote!(moe::Select::GroupLimited),
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
                    ops::router_grad(#xa, #n, #d, #wa, #e, #(#rest),*, #cfg);)
            }
        }
        Op::Experts { act, gated } | Op::ExpertsGrad { act, gated } => {
            let x = o.shape(0);
            let k = o.shape(1)[1];
            let up_at = if *gated { 4 } else { 3 };
            let up = o.shape(up_at);
            let (e, h) = (up[0], up[1]);
            let field = setup.activation(&act.to_string(), *gated);
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
                ops::check_ids(#ids, #e_l, #path)?;
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
                quote!(let #y: Vec<f32> = vec![ops::cross_entropy_weighted(#logits, #n, #vocab, #t, #w, #path)?];)
            } else {
                quote!(let #y: Vec<f32> = vec![ops::cross_entropy(#logits, #n, #vocab, #t, #path)?];)
            }
        }
        Op::CrossEntropyGrad => {
            let l = o.shape(0);
            let (n, vocab) = (lit(l[0]), lit(l[1]));
            let (y, logits, t, dl) = (&outs[0], a(0), a(1), a(2));
            if node.inputs.len() == 4 {
                let w = a(3);
                quote!(let #y: Vec<f32> = ops::cross_entropy_weighted_grad(#logits, #n, #vocab, #t, #w, (#dl)[0]);)
            } else {
                quote!(let #y: Vec<f32> = ops::cross_entropy_grad(#logits, #n, #vocab, #t, (#dl)[0]);)
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

/// The layer a node belongs to, for outlining: `layers.3` for `layers.3.attn.kv_a`, `mtp.0`
/// for `mtp.0.eh_proj`; a fused node belongs to its first op's layer. Nodes outside layers
/// (embedding, head, losses) have none.
fn layer_of(path: &str) -> Option<&str> {
    let first = path.split('+').next()?;
    let mut parts = first.splitn(3, '.');
    let (group, index) = (parts.next()?, parts.next()?);
    let nested = parts.next().is_some();
    let known = group == "layers" || group == "mtp";
    (known && nested && index.parse::<usize>().is_ok())
        .then(|| &first[..group.len() + 1 + index.len()])
}

/// A maximal run of consecutive nodes of one layer: becomes one call of an outlined function.
struct Segment<'g> {
    layer: &'g str,
    /// Which run of its layer this is: 0 is the forward pass, later ones the backward.
    ordinal: usize,
    nodes: std::ops::Range<usize>,
}

/// The runs of `graph` worth outlining (two nodes or more), in order.
fn segments(graph: &Graph) -> Vec<Segment<'_>> {
    let mut runs: Vec<Segment> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, node) in graph.nodes.iter() {
        let i = id.index();
        let Some(layer) = layer_of(&node.path) else {
            continue;
        };
        match runs.last_mut() {
            Some(run) if run.layer == layer && run.nodes.end == i => run.nodes.end = i + 1,
            _ => {
                let ordinal = seen.entry(layer).or_insert(0);
                runs.push(Segment {
                    layer,
                    ordinal: *ordinal,
                    nodes: i..i + 1,
                });
                *ordinal += 1;
            }
        }
    }
    runs.retain(|r| r.nodes.len() >= 2);
    runs
}

/// When each value is read last (a node index), `None` for values nothing reads or that the
/// runner keeps.
fn last_uses(graph: &Graph, keep: &[ValueId]) -> Vec<Option<usize>> {
    let mut last_use = vec![None; graph.values.len()];
    for (id, node) in graph.nodes.iter() {
        for &v in &node.inputs {
            last_use[v.index()] = Some(id.index());
        }
    }
    for &v in keep {
        last_use[v.index()] = None;
    }
    last_use
}

/// One generated statement, with the comment naming the node it computes (a reshape that
/// moves its buffer has none).
struct Statement {
    comment: Option<String>,
    code: TokenStream,
}

/// The statements computing `nodes` in `scope`, with `drop`s after each owned local's last use.
fn statements(
    graph: &Graph,
    nodes: std::ops::Range<usize>,
    scope: &mut dyn Scope,
    setup: &mut Setup,
    experts: &ExpertPairs,
    last_use: &[Option<usize>],
    keep: &[ValueId],
) -> Vec<Statement> {
    let mut out = Vec::new();
    for index in nodes {
        let node = &graph.nodes[crate::ir::Handle::from_index(index)];
        // A reshape of an owned value nothing reads afterwards takes its buffer (row-major
        // data does not change); otherwise it copies.
        let moved = match (&node.op, node.inputs.as_slice()) {
            (Op::Reshape { .. }, &[x]) if last_use[x.index()] == Some(index) => {
                scope.take(x).map(|place| {
                    let y = scope.def(node.outputs[0]);
                    out.push(Statement {
                        comment: None,
                        code: quote!(let #y = #place;),
                    });
                    x
                })
            }
            _ => None,
        };
        if moved.is_none() {
            out.push(Statement {
                comment: Some(format!(" {} {}", node.op.name(), node.path)),
                code: node_statement(graph, index, node, setup, scope, experts),
            });
        }
        // Keep what is read later; free what nobody reads and what this node read last.
        for &v in &node.outputs {
            let code = if last_use[v.index()].is_none() && !keep.contains(&v) {
                let l = scope.bound(v);
                quote!(drop(#l);)
            } else {
                scope.keep_result(v)
            };
            if !code.is_empty() {
                out.push(Statement {
                    comment: None,
                    code,
                });
            }
        }
        let mut dead: Vec<ValueId> = node
            .inputs
            .iter()
            .copied()
            .filter(|v| last_use[v.index()] == Some(index) && Some(*v) != moved)
            .collect();
        dead.sort_by_key(|v| v.index());
        dead.dedup();
        for place in dead.into_iter().filter_map(|v| scope.take(v)) {
            out.push(Statement {
                comment: None,
                code: quote!(drop(#place);),
            });
        }
    }
    out
}

/// A function outlined from layer runs: the code every run with the same tokens shares.
struct Outline {
    /// The function's tokens without its name and comments: runs with equal keys share it.
    key: String,
    name: proc_macro2::Ident,
    /// The layers whose run calls it, in order.
    layers: Vec<String>,
    ordinal: usize,
    /// The function, commented with the first caller's op paths.
    item: TokenStream,
}

impl Outline {
    fn phase(ordinal: usize) -> String {
        match ordinal {
            0 => "forward".to_string(),
            1 => "backward".to_string(),
            n => format!("backward_{n}"),
        }
    }

    /// The function with a doc comment naming its callers.
    fn documented(&self) -> TokenStream {
        let what = match self.ordinal {
            0 => "The forward pass".to_string(),
            1 => "The backward pass".to_string(),
            n => format!("Part {n} of the backward pass"),
        };
        let doc = format!(
            " {what} of {} (the comments name the ops of `{}`).",
            layer_list(&self.layers),
            self.layers[0]
        );
        let item = &self.item;
        quote!(#[doc = #doc] #item)
    }
}

/// Layer names as a short list: runs of consecutive indices in either direction become
/// ranges (`layers.3` to `layers.60`).
fn layer_list(layers: &[String]) -> String {
    let split = |l: &str| -> Option<(String, usize)> {
        let (group, index) = l.rsplit_once('.')?;
        Some((group.to_string(), index.parse().ok()?))
    };
    let mut runs: Vec<(usize, usize)> = Vec::new(); // [first, last] positions in `layers`
    for i in 0..layers.len() {
        let extends = runs.last().is_some_and(|&(first, last)| {
            let (a, b) = (split(&layers[last]), split(&layers[i]));
            let step = |x: usize, y: usize| x.abs_diff(y) == 1;
            match (a, b, split(&layers[first])) {
                (Some((ga, ia)), Some((gb, ib)), Some((_, i0))) if ga == gb && step(ia, ib) => {
                    // A run keeps one direction.
                    last == first || (ib > ia) == (ia > i0)
                }
                _ => false,
            }
        });
        match runs.last_mut() {
            Some(run) if extends => run.1 = i,
            _ => runs.push((i, i)),
        }
    }
    runs.iter()
        .map(|&(a, b)| match b - a {
            0 => format!("`{}`", layers[a]),
            1 => format!("`{}`, `{}`", layers[a], layers[b]),
            _ => format!("`{}` to `{}`", layers[a], layers[b]),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Rust type of a slot an outlined function borrows (`borrowed`) or returns.
fn slot_type(graph: &Graph, slot: Slot, borrowed: bool) -> TokenStream {
    let owned = match slot {
        Slot::Value(v) if graph.values[v].ty.dtype == crate::ir::DType::U32 => quote!(u32),
        Slot::Value(_) => quote!(f32),
        Slot::Saved(_) => {
            return if borrowed {
                quote!(&moe::ExpertsSaved<f32>)
            } else {
                quote!(Option<moe::ExpertsSaved<f32>>)
            }
        }
    };
    if borrowed {
        quote!(&[#owned])
    } else {
        quote!(Vec<#owned>)
    }
}

/// Everything one runner emits into: the compiled-once setup and the outlined functions.
struct RunnerParts<'g> {
    graph: &'g Graph,
    keep: &'g [ValueId],
    last_use: Vec<Option<usize>>,
    experts: ExpertPairs,
    setup: Setup,
    outlines: Vec<Outline>,
}

impl RunnerParts<'_> {
    /// The statements for `nodes` in the runner's own body.
    fn straight(&mut self, nodes: std::ops::Range<usize>) -> Vec<TokenStream> {
        let mut scope = Straight { graph: self.graph };
        let stmts = statements(
            self.graph,
            nodes,
            &mut scope,
            &mut self.setup,
            &self.experts,
            &self.last_use,
            self.keep,
        );
        render(&stmts, true)
    }

    /// The call running `seg` through its outlined function (added, or found by its key), and
    /// the `drop`s of what the run read last.
    fn call(&mut self, seg: &Segment) -> TokenStream {
        let graph = self.graph;
        let mut scope = Outlined {
            graph,
            locals: HashMap::new(),
            saved: HashMap::new(),
            defined: Vec::new(),
            inputs: Vec::new(),
            params: Vec::new(),
            paths: Vec::new(),
        };
        let stmts = statements(
            graph,
            seg.nodes.clone(),
            &mut scope,
            &mut self.setup,
            &self.experts,
            &self.last_use,
            self.keep,
        );
        // What the rest of the graph reads (or the runner keeps) leaves as a result.
        let end = seg.nodes.end;
        let outputs: Vec<Slot> = scope
            .defined
            .iter()
            .copied()
            .filter(|&slot| match slot {
                Slot::Value(v) => {
                    self.keep.contains(&v) || self.last_use[v.index()].is_some_and(|u| u >= end)
                }
                Slot::Saved(f) => self
                    .experts
                    .forward
                    .iter()
                    .any(|(g, &ff)| ff == f && !seg.nodes.contains(g)),
            })
            .collect();
        // A state leaves as `Some`, so the caller can assign it straight into its store.
        let out_names: Vec<TokenStream> = outputs
            .iter()
            .map(|&slot| match slot {
                Slot::Value(v) => {
                    let l = &scope.locals[&v];
                    quote!(#l)
                }
                Slot::Saved(f) => {
                    let s = &scope.saved[&f];
                    quote!(Some(#s))
                }
            })
            .collect();
        let out_tys: Vec<TokenStream> = outputs
            .iter()
            .map(|&s| slot_type(graph, s, false))
            .collect();
        let in_params: Vec<TokenStream> = scope
            .inputs
            .iter()
            .map(|(s, a)| {
                let ty = slot_type(graph, *s, true);
                quote!(#a: #ty)
            })
            .collect();
        let function = |name: &proc_macro2::Ident, comments: bool| {
            let body = render(&stmts, comments);
            quote! {
                #[allow(unused_variables, clippy::let_unit_value, clippy::redundant_locals, clippy::too_many_arguments)]
                fn #name(
                    &self,
                    p: &[&[f32]],
                    paths: &[&str],
                    #(#in_params),*
                ) -> Result<(#(#out_tys,)*), ExecError> {
                    #(#body)*
                    Ok((#(#out_names,)*))
                }
            }
        };
        let key = function(&format_ident!("outlined"), false).to_string();
        let name = match self.outlines.iter_mut().find(|o| o.key == key) {
            Some(o) => {
                o.layers.push(seg.layer.to_string());
                o.name.clone()
            }
            None => {
                let name = format_ident!(
                    "{}_{}",
                    seg.layer.replace('.', "_"),
                    Outline::phase(seg.ordinal)
                );
                self.outlines.push(Outline {
                    key,
                    name: name.clone(),
                    layers: vec![seg.layer.to_string()],
                    ordinal: seg.ordinal,
                    item: function(&name, true),
                });
                name
            }
        };
        let mut top = Straight { graph };
        let params = scope.params.iter().map(|&i| lit(i));
        let paths = scope.paths.iter().map(|p| Literal::string(p));
        let args: Vec<TokenStream> = scope
            .inputs
            .iter()
            .map(|&(s, _)| match s {
                Slot::Value(v) => top.read(v),
                Slot::Saved(f) => {
                    let i = lit(f);
                    quote!(saved[#i].as_ref().expect("the experts node saved its state"))
                }
            })
            .collect();
        // The results go straight into the store (places with constant indices: no
        // statement here can fail, so no cleanup paths multiply).
        let places = outputs.iter().map(|&s| match s {
            Slot::Value(v) => {
                let (store, i) = top.slot(v);
                quote!(#store[#i])
            }
            Slot::Saved(f) => {
                let i = lit(f);
                quote!(saved[#i])
            }
        });
        let mut call = quote! {
            (#(#places,)*) = self.#name(&gather(feed, &[#(#params),*]), &[#(#paths),*], #(#args),*)?;
        };
        for &(s, _) in &scope.inputs {
            match s {
                Slot::Value(v) => {
                    let last = self.last_use[v.index()].is_some_and(|u| seg.nodes.contains(&u));
                    if let Some(place) = top.take(v).filter(|_| last) {
                        call.extend(quote!(drop(#place);));
                    }
                }
                Slot::Saved(f) => {
                    let i = lit(f);
                    call.extend(quote!(saved[#i] = None;));
                }
            }
        }
        call
    }
}

/// Statements as tokens, with or without their comments.
fn render(stmts: &[Statement], comments: bool) -> Vec<TokenStream> {
    let mut out = Vec::new();
    for s in stmts {
        if let (Some(c), true) = (&s.comment, comments) {
            out.push(quote!(#[doc = #c]));
        }
        out.push(s.code.clone());
    }
    out
}

/// The struct and `run` method executing `graph`, keeping `keep`: `pub struct #name` with
/// `new()` and an implementation of `kiln_runtime::exec::Run`. Each layer's run of nodes
/// (its forward pass, its backward pass) is a call of a method; layers computing the same
/// thing on their own parameters call the same method, so the code grows with the kinds of
/// layer, not their number.
fn runner(graph: &Graph, keep: &[ValueId], name: &proc_macro2::Ident) -> TokenStream {
    let mut parts = RunnerParts {
        graph,
        keep,
        last_use: last_uses(graph, keep),
        experts: ExpertPairs::of(graph),
        setup: Setup::default(),
        outlines: Vec::new(),
    };
    let mut inputs = Vec::new();
    let mut seen = Vec::new();
    for (_, v) in graph.values.iter() {
        if let Def::Input(kind) = v.def {
            // A graph may read one input through several values; bind it once.
            if seen.contains(&kind) {
                continue;
            }
            seen.push(kind);
            let (local, key) = match kind {
                InputKind::Tokens { offset } => {
                    let off = Literal::u32_unsuffixed(offset);
                    (
                        format_ident!("tokens_{}", offset),
                        quote!(InputKind::Tokens { offset: #off }),
                    )
                }
                InputKind::Positions => (format_ident!("positions"), quote!(InputKind::Positions)),
                InputKind::TokenWeights => {
                    let n = lit(v.ty.elements());
                    inputs.push(quote!(let token_weights: &[f32] = token_weights(feed, #n)?;));
                    continue;
                }
            };
            let n = lit(v.ty.elements());
            inputs.push(quote!(let #local: &[u32] = input(feed, #key, #n)?;));
        }
    }
    let mut body = Vec::new();
    let mut next = 0;
    for seg in segments(graph) {
        body.extend(parts.straight(next..seg.nodes.start));
        body.push(parts.call(&seg));
        next = seg.nodes.end;
    }
    body.extend(parts.straight(next..graph.nodes.len()));
    let kept: Vec<TokenStream> = keep
        .iter()
        .map(|&v| {
            let i = lit(v.index());
            let buf = if graph.values[v].ty.dtype == crate::ir::DType::U32 {
                quote!(Buf::U)
            } else {
                quote!(Buf::F)
            };
            let place = Straight { graph }
                .take(v)
                .expect("kept values are computed");
            quote!(out.insert(ValueId::from_index(#i), #buf(#place));)
        })
        .collect();
    let (fields, inits) = (&parts.setup.fields, &parts.setup.inits);
    let value_count = lit(graph.values.len());
    let node_count = lit(graph.nodes.len());
    let outlined = parts.outlines.iter().map(Outline::documented);
    quote! {
        /// The graph as straight-line code: build once with `new`, run once per step.
        pub struct #name {
            #(#fields,)*
        }

        impl #name {
            pub fn new() -> Self {
                #name { #(#inits,)* }
            }

            #(#outlined)*
        }

        impl Default for #name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl Run for #name {
            #[allow(unused_variables, unused_mut, clippy::let_unit_value, clippy::redundant_locals)]
            fn run(&self, feed: &Feed<f32>) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
                check_params(feed)?;
                #(#inputs)*
                let mut vals: Box<[Vec<f32>; #value_count]> = store();
                let mut ids: Box<[Vec<u32>; #value_count]> = store();
                let mut saved: Box<[Option<moe::ExpertsSaved<f32>>; #node_count]> = store();
                #(#body)*
                let mut out = HashMap::new();
                #(#kept)*
                Ok(out)
            }
        }
    }
}

/// The parameter names as a tree: `layers.3.attn.kv_b.weight` is the leaf `weight` under
/// `kv_b` under `attn` under element 3 of the array `layers`.
#[derive(Clone)]
enum Tree {
    /// A tensor: its index in the parameter order.
    Leaf(usize),
    /// Named children, in order of first appearance.
    Struct(Vec<(String, Tree)>),
    /// Numbered children (`layers.0`, `layers.1`, …), in order.
    Array(Vec<Tree>),
}

impl Tree {
    fn insert(&mut self, path: &[&str], index: usize) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let is_index = first.parse::<usize>().is_ok();
        if let (Tree::Struct(children), true) = (&*self, is_index) {
            if children.is_empty() {
                *self = Tree::Array(Vec::new());
            }
        }
        let child = match self {
            Tree::Array(items) => {
                let i: usize = first.parse().expect("array children are numbered");
                while items.len() <= i {
                    items.push(Tree::Struct(Vec::new()));
                }
                &mut items[i]
            }
            Tree::Struct(children) => {
                if let Some(pos) = children.iter().position(|(n, _)| n == first) {
                    &mut children[pos].1
                } else {
                    let fresh = if rest.is_empty() {
                        Tree::Leaf(index)
                    } else {
                        Tree::Struct(Vec::new())
                    };
                    children.push((first.to_string(), fresh));
                    &mut children.last_mut().expect("just pushed").1
                }
            }
            Tree::Leaf(_) => return,
        };
        child.insert(rest, index);
    }
}

/// The Rust type of a field that several trees (one array's elements, or one field of them)
/// share: `Vec<f32>` for tensors, a struct named after `path` (the union of the trees'
/// fields, `Option` where some lack one), or a `Vec` of the merged element type.
fn merged_type(path: &str, trees: &[&Tree], defs: &mut Vec<(String, TokenStream)>) -> TokenStream {
    match trees.first() {
        None | Some(Tree::Leaf(_)) => quote!(Vec<f32>),
        Some(Tree::Array(_)) => {
            let items: Vec<&Tree> = trees
                .iter()
                .flat_map(|t| match t {
                    Tree::Array(items) => items.iter().collect::<Vec<_>>(),
                    _ => vec![],
                })
                .collect();
            let elem = merged_type(path, &items, defs);
            quote!(Vec<#elem>)
        }
        Some(Tree::Struct(_)) => {
            let names = union_fields(&Tree::Array(trees.iter().map(|&t| t.clone()).collect()));
            let ty_name = struct_name(path, trees);
            let ty = format_ident!("{}", ty_name);
            if defs.iter().any(|(name, _)| *name == ty_name) {
                return quote!(#ty);
            }
            let mut fields = Vec::new();
            for (n, all) in &names {
                let n = n.as_str();
                let subs: Vec<&Tree> = trees
                    .iter()
                    .filter_map(|t| match t {
                        Tree::Struct(children) => {
                            children.iter().find(|(c, _)| c == n).map(|(_, t)| t)
                        }
                        _ => None,
                    })
                    .collect();
                let field_ty = merged_type(&format!("{path} {n}"), &subs, defs);
                let field = format_ident!("{}", field_name(n));
                if *all {
                    fields.push(quote!(pub #field: #field_ty));
                } else {
                    fields.push(quote!(pub #field: Option<#field_ty>));
                }
            }
            // Fields first defined their own types; a type they share is defined once.
            if !defs.iter().any(|(name, _)| *name == ty_name) {
                defs.push((
                    ty_name,
                    quote! {
                        #[derive(Clone, Debug, PartialEq)]
                        pub struct #ty { #(#fields,)* }
                    },
                ));
            }
            quote!(#ty)
        }
    }
}

/// The name of the struct merging `trees`: a struct of tensors only is named after its
/// fields (`Weight`, `WeightBias`: one type serves every linear layer), any other after its
/// path (`ParamsLayersAttn`).
fn struct_name(path: &str, trees: &[&Tree]) -> String {
    let fields = union_fields(&Tree::Array(trees.iter().map(|&t| t.clone()).collect()));
    let leaves_only = trees.iter().all(|t| match t {
        Tree::Struct(children) => children.iter().all(|(_, c)| matches!(c, Tree::Leaf(_))),
        _ => false,
    });
    if leaves_only && !fields.is_empty() {
        let words: Vec<String> = fields
            .iter()
            .map(|(n, all)| if *all { n.clone() } else { format!("opt {n}") })
            .collect();
        crate::names::type_name(&words.join(" "))
    } else {
        crate::names::type_name(path)
    }
}

/// The Rust field for a parameter-path segment (`final` → `final_`).
fn field_name(segment: &str) -> String {
    crate::names::ident(segment, crate::names::Lang::Rust)
}

/// The expression building `tree` (whose merged type is named from `path`) out of `v`, a
/// `Vec<Option<Vec<f32>>>` in parameter order. `shape` holds every instance of this position
/// (all elements of an array), so the fields some instances lack become `None`.
fn build_expr(path: &str, tree: &Tree, shape: &Tree) -> TokenStream {
    match tree {
        Tree::Leaf(i) => {
            let i = lit(*i);
            quote!(v[#i].take().expect("each parameter is used once"))
        }
        Tree::Array(items) => {
            let elems: Vec<TokenStream> =
                items.iter().map(|t| build_expr(path, t, shape)).collect();
            // `Vec::from([…])` rather than `vec![…]`, so prettyplease formats the elements.
            quote!(Vec::from([#(#elems),*]))
        }
        Tree::Struct(children) => {
            let instances: Vec<&Tree> = match shape {
                Tree::Array(items) => items.iter().collect(),
                t => vec![t],
            };
            let ty = format_ident!("{}", struct_name(path, &instances));
            let fields: Vec<TokenStream> = union_fields(shape)
                .into_iter()
                .map(|(n, all)| {
                    let field = format_ident!("{}", field_name(&n));
                    let sub_path = format!("{path} {n}");
                    let sub_shape = merged_child(shape, &n);
                    let value = children
                        .iter()
                        .find(|(c, _)| *c == n)
                        .map(|(_, t)| build_expr(&sub_path, t, &sub_shape));
                    match (value, all) {
                        (Some(e), true) => quote!(#field: #e),
                        (Some(e), false) => quote!(#field: Some(#e)),
                        (None, _) => quote!(#field: None),
                    }
                })
                .collect();
            quote!(#ty { #(#fields,)* })
        }
    }
}

/// For a struct-typed tree or an array of them: the union of field names, each with whether
/// every instance has it.
fn union_fields(shape: &Tree) -> Vec<(String, bool)> {
    let instances: Vec<&Tree> = match shape {
        Tree::Array(items) => items.iter().collect(),
        t => vec![t],
    };
    let mut names: Vec<(String, usize)> = Vec::new();
    for t in &instances {
        if let Tree::Struct(children) = t {
            for (n, _) in children {
                match names.iter_mut().find(|(m, _)| m == n) {
                    Some((_, c)) => *c += 1,
                    None => names.push((n.clone(), 1)),
                }
            }
        }
    }
    names
        .into_iter()
        .map(|(n, c)| (n, c == instances.len()))
        .collect()
}

/// The merged "shape" of field `n` across the instances of `shape` (an array of its
/// instances' children, so nested unions see every instance).
fn merged_child(shape: &Tree, n: &str) -> Tree {
    let instances: Vec<&Tree> = match shape {
        Tree::Array(items) => items.iter().collect(),
        t => vec![t],
    };
    let mut out = Vec::new();
    for t in instances {
        if let Tree::Struct(children) = t {
            if let Some((_, c)) = children.iter().find(|(c, _)| c == n) {
                match c {
                    Tree::Array(items) => out.extend(items.iter().cloned()),
                    other => out.push(other.clone()),
                }
            }
        }
    }
    Tree::Array(out)
}

/// Collects `(parameter index, borrowed view)` for every leaf of `tree`, reached through
/// `access` (a place expression); fields some instances lack go through
/// `as_ref().expect(…)`. `shape` is as for [`build_expr`].
fn flat_views(tree: &Tree, access: TokenStream, out: &mut Vec<(usize, TokenStream)>, shape: &Tree) {
    match tree {
        Tree::Leaf(i) => out.push((*i, quote!(&(#access)[..]))),
        Tree::Array(items) => {
            for (k, t) in items.iter().enumerate() {
                let k = lit(k);
                flat_views(t, quote!(#access[#k]), out, shape);
            }
        }
        Tree::Struct(children) => {
            let fields = union_fields(shape);
            for (n, t) in children {
                let field = format_ident!("{}", field_name(n));
                let all = fields.iter().find(|(m, _)| m == n).is_none_or(|(_, a)| *a);
                let sub_shape = merged_child(shape, n);
                let place = if all {
                    quote!(#access.#field)
                } else {
                    let msg = Literal::string(&format!("this element has `{n}`"));
                    quote!(#access.#field.as_ref().expect(#msg))
                };
                flat_views(t, place, out, &sub_shape);
            }
        }
    }
}

/// `Params`, the typed parameter struct: one field per name segment
/// (`params.layers[3].attn.kv_b.weight`), with `from_flat`, `flat` and `into_flat` converting
/// to and from the parameter order of `PARAM_NAMES`.
fn params_struct(names: &[&str]) -> TokenStream {
    let mut root = Tree::Struct(Vec::new());
    for (i, name) in names.iter().enumerate() {
        let path: Vec<&str> = name.split('.').collect();
        root.insert(&path, i);
    }
    let mut defs = Vec::new();
    let ty = merged_type("params", &[&root], &mut defs);
    let defs: Vec<TokenStream> = defs.into_iter().map(|(_, d)| d).collect();
    let shape = Tree::Array(vec![root.clone()]);
    let build = build_expr("params", &root, &shape);
    let mut views = Vec::new();
    flat_views(&root, quote!(self), &mut views, &shape);
    views.sort_by_key(|(i, _)| *i);
    let views: Vec<TokenStream> = views.into_iter().map(|(_, e)| e).collect();
    let count = lit(names.len());
    quote! {
        #(#defs)*

        impl #ty {
            /// Takes the parameters in `PARAM_NAMES` order (as checkpoints and the trainer hold
            /// them).
            pub fn from_flat(values: Vec<Vec<f32>>) -> Self {
                assert_eq!(values.len(), #count, "one tensor per parameter");
                let mut v: Vec<Option<Vec<f32>>> = values.into_iter().map(Some).collect();
                #build
            }

            /// Borrows the parameters in `PARAM_NAMES` order.
            pub fn flat(&self) -> Vec<&[f32]> {
                Vec::from([#(#views),*])
            }

            /// The parameters in `PARAM_NAMES` order.
            pub fn into_flat(self) -> Vec<Vec<f32>> {
                self.flat().into_iter().map(<[f32]>::to_vec).collect()
            }
        }
    }
}

/// The specialized module of a compiled model: constants, parameter names and shapes, the
/// typed `Params`, `Train`, which runs the training graph (forward, backward, losses) keeping
/// exactly what `kiln_runtime::train::Trainer` reads, and `Forward`, which runs the forward
/// Program (losses and logits, for evaluation and sampling) keeping its named outputs.
pub fn emit(compiled: &Compiled) -> TokenStream {
    let graph = compiled.train.graph();
    let settings = compiled.train.settings();
    let mut keep = TrainOutputs::of(graph)
        .map(|t| t.values())
        .unwrap_or_default();
    // Without MoE or MTP the total loss is the main loss: one value, kept once.
    keep.sort_by_key(|v| v.index());
    keep.dedup();
    let module = format_ident!("{}", module_ident(&settings.name));
    let name = Literal::string(&settings.name);
    let (vocab, d_model, layers) = (
        lit(settings.vocab),
        lit(settings.d_model),
        lit(settings.layers),
    );
    let (batch, seq_len) = (lit(settings.batch), lit(settings.seq_len));
    let names: Vec<Literal> = graph
        .params
        .iter()
        .map(|(_, p)| Literal::string(&p.name))
        .collect();
    let shapes: Vec<TokenStream> = graph
        .params
        .iter()
        .map(|(_, p)| {
            let dims = p.ty.shape.iter().map(|&d| lit(d));
            quote!(&[#(#dims),*])
        })
        .collect();
    let count = lit(names.len());
    let name_strs: Vec<&str> = graph.params.iter().map(|(_, p)| p.name.as_str()).collect();
    let params = params_struct(&name_strs);
    let train_runner = runner(graph, &keep, &format_ident!("Train"));
    let fwd = compiled.forward.graph();
    let mut fwd_keep: Vec<ValueId> = fwd.outputs.iter().map(|&(_, v)| v).collect();
    fwd_keep.sort_by_key(|v| v.index());
    fwd_keep.dedup();
    let forward_runner = runner(fwd, &fwd_keep, &format_ident!("Forward"));
    debug_assert!(
        fwd.params
            .iter()
            .map(|(_, p)| &p.name)
            .eq(graph.params.iter().map(|(_, p)| &p.name)),
        "the forward and training graphs read the same parameters in the same order"
    );
    let fwd_outputs: Vec<TokenStream> = fwd
        .outputs
        .iter()
        .map(|(n, v)| {
            let (n, i) = (Literal::string(n), lit(v.index()));
            quote!((#n, #i))
        })
        .collect();
    let fwd_output_count = lit(fwd_outputs.len());
    let cuda_source = Literal::string(&crate::emit_cuda::emit(&compiled.train).source);
    // Only graphs with a weighted loss read token weights.
    let weighted = [&compiled.train, &compiled.forward].iter().any(|p| {
        p.graph()
            .values
            .iter()
            .any(|(_, v)| v.def == Def::Input(InputKind::TokenWeights))
    });
    let weights_helper = if weighted {
        quote! {
            fn token_weights<'f>(feed: &'f Feed<f32>, n: usize) -> Result<&'f [f32], ExecError> {
                match feed.weights {
                    Some(w) if w.len() == n => Ok(w),
                    Some(w) => Err(ExecError::Input(format!(
                        "{} token weights were supplied, the graph needs {n}", w.len()
                    ))),
                    None => Err(ExecError::Input(
                        "the graph reads token weights, which were not supplied".to_string()
                    )),
                }
            }
        }
    } else {
        quote!()
    };
    quote! {
        #[allow(clippy::all, clippy::pedantic, unused_imports, unused_doc_comments, dead_code)]
        pub mod #module {
            //! Generated by kiln from a spec: the model's training step as straight-line code.
            use ::std::collections::HashMap;
            use ::kiln_runtime::cpu::{attention, dense, moe};
            use ::kiln_runtime::cpu::elementwise::Elementwise;
            use ::kiln_runtime::exec::{Buf, ExecError, Feed, Run};
            use ::kiln_runtime::ops;
            use ::kiln_runtime::kiln_compiler::ir::{InputKind, ValueId};
            use ::kiln_runtime::kiln_compiler::model::NormKind;

            /// The spec's model name.
            pub const NAME: &str = #name;
            pub const VOCAB: usize = #vocab;
            pub const D_MODEL: usize = #d_model;
            pub const LAYERS: usize = #layers;
            pub const BATCH: usize = #batch;
            pub const SEQ_LEN: usize = #seq_len;
            /// The CUDA kernels of the training step (`kiln emit cuda`), for the CUDA backend;
            /// they include `kiln_compiler::emit_cuda::HEADERS`.
            pub const CUDA_SOURCE: &str = #cuda_source;
            /// The training graph's parameters, in order: `feed.params[i]` is `PARAM_NAMES[i]`.
            pub const PARAM_NAMES: [&str; #count] = [#(#names),*];
            pub const PARAM_SHAPES: [&[usize]; #count] = [#(#shapes),*];

            fn elementwise(text: &str, vars: &[&str]) -> Elementwise {
                let expr = ::kiln_runtime::kiln_compiler::dsl::expr::parse_expr(text, vars)
                    .expect("kiln printed this expression");
                Elementwise::new(&expr, vars).expect("kiln compiled this expression")
            }

            fn activation(text: &str, gated: bool) -> ops::ExprActivation {
                let vars: &[&str] = if gated { &["gate", "up"] } else { &["x"] };
                let expr = ::kiln_runtime::kiln_compiler::dsl::expr::parse_expr(text, vars)
                    .expect("kiln printed this expression");
                ops::ExprActivation::new(&expr, gated)
            }

            /// The parameters at `indices` (in range: `check_params` ran).
            fn gather<'f>(feed: &'f Feed<f32>, indices: &[usize]) -> Vec<&'f [f32]> {
                indices.iter().map(|&i| &feed.params[i][..]).collect()
            }

            /// A store of `N` empty slots on the heap, indexed by constants, so reading or
            /// filling a slot cannot fail.
            fn store<T: Default, const N: usize>() -> Box<[T; N]> {
                let slots: Box<[T]> = (0..N).map(|_| T::default()).collect();
                slots.try_into().unwrap_or_else(|_| unreachable!("N slots were made"))
            }

            fn check_params(feed: &Feed<f32>) -> Result<(), ExecError> {
                if feed.params.len() < PARAM_NAMES.len() {
                    return Err(ExecError::Param(format!(
                        "{} parameters were supplied, the graph needs {}",
                        feed.params.len(),
                        PARAM_NAMES.len()
                    )));
                }
                for ((p, name), shape) in feed.params.iter().zip(PARAM_NAMES).zip(PARAM_SHAPES) {
                    let want: usize = shape.iter().product();
                    if p.len() != want {
                        return Err(ExecError::Param(format!(
                            "parameter `{name}` has {} values, the graph needs {want}",
                            p.len()
                        )));
                    }
                }
                Ok(())
            }

            #weights_helper

            fn input<'f>(feed: &'f Feed<f32>, kind: InputKind, n: usize) -> Result<&'f [u32], ExecError> {
                match feed.inputs.get(&kind) {
                    Some(v) if v.len() == n => Ok(v),
                    Some(v) => Err(ExecError::Input(format!(
                        "input {kind:?} has {} ids, the graph needs {n}", v.len()
                    ))),
                    None => Err(ExecError::Input(format!(
                        "the graph reads input {kind:?}, which was not supplied"
                    ))),
                }
            }

            #params

            #train_runner

            /// The forward Program's named outputs and the value index `Forward` keys them by
            /// (`Forward` reads the parameters of `PARAM_NAMES`, like `Train`).
            pub const FORWARD_OUTPUTS: [(&str, usize); #fwd_output_count] = [#(#fwd_outputs),*];

            pub mod forward {
                //! The forward Program: losses and logits at the spec's batch and length.
                use super::*;
                #forward_runner
            }
            pub use forward::Forward;
        }
    }
}

/// [`emit`] formatted as a source file (`kiln emit rust`).
pub fn emit_text(compiled: &Compiled) -> Result<String, String> {
    let tokens = emit(compiled);
    let file: syn::File =
        syn::parse2(tokens).map_err(|e| format!("generated Rust does not parse: {e}"))?;
    Ok(prettyplease::unparse(&file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_belong_to_the_layer_of_their_first_op() {
        assert_eq!(layer_of("layers.3.attn.kv_a"), Some("layers.3"));
        assert_eq!(
            layer_of("layers.0.ffn.residual+layers.1.attn.norm"),
            Some("layers.0")
        );
        assert_eq!(
            layer_of("mtp.0.hnorm.grad+layers.3.ffn.residual.grad_sum"),
            Some("mtp.0")
        );
        assert_eq!(layer_of("layers.12.moe.experts.grad"), Some("layers.12"));
        for outside in [
            "embed",
            "head",
            "loss.mtp.0",
            "layers",
            "layers.x.attn",
            "layers.3",
        ] {
            assert_eq!(layer_of(outside), None, "{outside}");
        }
    }

    #[test]
    fn layer_lists_fold_runs_of_consecutive_layers_into_ranges() {
        let list = |xs: &[&str]| layer_list(&xs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(list(&["layers.0"]), "`layers.0`");
        assert_eq!(list(&["layers.1", "layers.2"]), "`layers.1`, `layers.2`");
        assert_eq!(
            list(&["layers.3", "layers.4", "layers.5", "layers.6"]),
            "`layers.3` to `layers.6`"
        );
        assert_eq!(
            list(&["layers.60", "layers.59", "layers.58"]),
            "`layers.60` to `layers.58`"
        );
        assert_eq!(
            list(&["layers.1", "layers.2", "layers.3", "layers.2", "mtp.0", "mtp.1"]),
            "`layers.1` to `layers.3`, `layers.2`, `mtp.0`, `mtp.1`"
        );
    }
}
