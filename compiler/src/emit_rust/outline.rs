//! Outlining: each layer's runs of nodes (forward, backward) become methods shared by the
//! layers that compute alike, and the runner that calls them and holds the rest.

use std::collections::HashMap;

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use super::lit;
use super::scope::{Outlined, Scope, Slot, Straight};
use super::statements::{node_statement, ExpertPairs, Setup};
use crate::ir::{Def, Graph, InputKind, Op, ValueId};

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
pub(super) fn runner(graph: &Graph, keep: &[ValueId], name: &proc_macro2::Ident) -> TokenStream {
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
                InputKind::KvCache { .. } => {
                    unreachable!("the Rust emitter takes training and forward Programs")
                }
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
