//! The Rust emitter: a Program → a module of straight-line Rust that runs it with constant
//! shapes, calling the runtime's kernels (`kiln emit rust`, `kiln::model!`).
//!
//! Every node becomes one statement that calls the function the interpreter calls for that op
//! (`kiln_runtime::op_fns`, or a `kiln_runtime::cpu` kernel) with the node's shapes written as
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

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use crate::ir::{Def, InputKind, ValueId};
use crate::program::{Compiled, TrainOutputs};

mod outline;
mod params;
mod scope;
mod statements;

use outline::runner;
use params::params_struct;

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
            use ::kiln_runtime::op_fns;
            use ::kiln_runtime::kiln_ir::ir::{InputKind, ValueId};
            use ::kiln_runtime::kiln_ir::attrs::NormKind;
            use ::kiln_runtime::kiln_ir::expr::{BinOp, Expr, Func};

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

            fn elementwise(expr: &Expr, vars: &[&str]) -> Elementwise {
                Elementwise::new(expr, vars).expect("kiln compiled this expression")
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
