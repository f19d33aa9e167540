//! `Params`: the parameter names as a tree of named fields per layer, with structs merged
//! across layers of different kinds.

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

use super::lit;

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
pub(super) fn params_struct(names: &[&str]) -> TokenStream {
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
