//! How statements name what they read and bind: [`Scope`], with the runner's own body
//! ([`Straight`], values in stores by index) and an outlined layer function ([`Outlined`],
//! everything named positionally so alike layers share one method).

use std::collections::HashMap;

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use super::lit;
use super::statements::slice_of;
use crate::ir::{Def, Graph, Node, ValueId};

pub(super) fn local(v: ValueId) -> proc_macro2::Ident {
    format_ident!("v{}", v.index())
}

/// How statements name what they read and bind. The runner's own body and an outlined layer
/// function name things differently; the statements are the same.
pub(super) trait Scope {
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
pub(super) struct Straight<'g> {
    pub(super) graph: &'g Graph,
}

pub(super) fn saved_local(node: usize) -> proc_macro2::Ident {
    format_ident!("saved_{}", node)
}

impl Straight<'_> {
    /// The store `v` lives in, and its index there.
    pub(super) fn slot(&self, v: ValueId) -> (proc_macro2::Ident, Literal) {
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
pub(super) enum Slot {
    Value(ValueId),
    Saved(usize),
}

/// The body of an outlined function, named so that two layers computing the same thing on
/// different parameters produce the same tokens: locals `lN` and states `sN` in order of
/// definition, operands from outside `aN` in order of first use, parameters `p[N]` and op
/// paths `paths[N]` in order of first use.
pub(super) struct Outlined<'g> {
    pub(super) graph: &'g Graph,
    pub(super) locals: HashMap<ValueId, proc_macro2::Ident>,
    pub(super) saved: HashMap<usize, proc_macro2::Ident>,
    /// What the body binds, in order.
    pub(super) defined: Vec<Slot>,
    pub(super) inputs: Vec<(Slot, proc_macro2::Ident)>,
    pub(super) params: Vec<usize>,
    pub(super) paths: Vec<String>,
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
