//! Fusion: rewrites a graph so that chains of elementwise work run as one node.
//!
//! Each rule replaces a chain of nodes with one node that computes exactly what the chain
//! computed, so a backend runs it in one pass over the data (one kernel on a GPU):
//!
//! - **Residual add + norm.** `s = map[a + b](x, r)` whose result a norm reads becomes
//!   `add_rms_norm(x, r, w) -> (s, y)` (or `add_layer_norm`). The sum stays an output: the
//!   residual stream continues, and the backward pass reads it.
//! - **Norm gradient + residual gradient.** A norm's gradient whose input gradient only
//!   `map[g0 + g1]` reads, adding the residual stream's gradient `ds`, becomes
//!   `add_rms_norm_grad(s, w, dy, ds) -> (ds + dx, dw)`.
//! - **Bias + activation.** `linear(x, w, b?)` whose output a one-operand `map` reads becomes
//!   `linear_map(x, w, b?) -> (pre, y)`; the pre-activation stays an output for the backward
//!   pass.
//! - **Elementwise chains.** A `map` whose result only another `map` reads is inlined into
//!   that map's expression, so `x + (e + s)` or a loss sum is one node however it was built.
//!
//! A value the graph names as an output is never fused away. A fused node takes the place of
//! the first node of its chain whose operands are all defined there, so operands still
//! precede users; the pass checks the few orderings this could break before fusing. The
//! fused node's path joins the paths of the nodes it replaces with `+`.

use std::collections::HashMap;

use crate::dsl::expr::{BinOp, Expr};
use crate::ir::{Def, Graph, Node, NodeId, Op, ValueId};
use crate::model::NormKind;

/// What becomes of one node of the input graph.
#[derive(Clone, Debug, PartialEq)]
enum Fate {
    /// Copied as it is (a `map` absorbs the chains inlined into it).
    Keep,
    /// Computed by another node's fused replacement.
    Absorbed,
    /// A `map[a + b]` that becomes `add_*_norm` together with this norm node.
    AddNorm { norm: NodeId },
    /// A `map[g0 + g1]` that becomes `add_*_norm_grad` with this norm-gradient node; `ds`
    /// is the map's other operand.
    AddNormGrad { grad: NodeId, ds: ValueId },
    /// A `linear` that becomes `linear_map` together with this map node.
    LinearMap { map: NodeId },
    /// A `map` inlined into the `map` that reads its result.
    Inlined,
}

/// Fuses `g` (which must verify); the result verifies and computes the same outputs.
pub fn fuse(g: &Graph) -> Graph {
    let fates = decide(g);
    rebuild(g, &fates)
}

/// Per value, the distinct nodes reading it, in order.
fn readers(g: &Graph) -> Vec<Vec<NodeId>> {
    let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); g.values.len()];
    for (id, node) in g.nodes.iter() {
        for &v in &node.inputs {
            let list = &mut users[v.index()];
            if list.last() != Some(&id) {
                list.push(id);
            }
        }
    }
    users
}

/// The operands `(a, b)` of a `map` whose expression is `a + b` of two distinct values.
fn sum_of_two(node: &Node) -> Option<(ValueId, ValueId)> {
    let Op::Map { expr, vars } = &node.op else {
        return None;
    };
    let Expr::Bin(BinOp::Add, a, b) = expr else {
        return None;
    };
    let (Expr::Var(a), Expr::Var(b)) = (a.as_ref(), b.as_ref()) else {
        return None;
    };
    let operand = |name: &str| {
        let i = vars.iter().position(|v| v == name)?;
        node.inputs.get(i).copied()
    };
    let (a, b) = (operand(a)?, operand(b)?);
    (a != b).then_some((a, b))
}

fn norm_kind(op: &Op) -> Option<(NormKind, f64)> {
    match op {
        Op::RmsNorm { eps } => Some((NormKind::RmsNorm, *eps)),
        Op::LayerNorm { eps } => Some((NormKind::LayerNorm, *eps)),
        _ => None,
    }
}

fn norm_grad_kind(op: &Op) -> Option<(NormKind, f64)> {
    match op {
        Op::RmsNormGrad { eps } => Some((NormKind::RmsNorm, *eps)),
        Op::LayerNormGrad { eps } => Some((NormKind::LayerNorm, *eps)),
        _ => None,
    }
}

/// The node defining `v`, if a node does.
fn producer(g: &Graph, v: ValueId) -> Option<NodeId> {
    match g.values[v].def {
        Def::Node { node, .. } => Some(node),
        Def::Input(_) | Def::Param(_) => None,
    }
}

/// Whether `v` is available at node `at`: an input, a parameter, or defined before it.
fn defined_before(g: &Graph, v: ValueId, at: NodeId) -> bool {
    producer(g, v).is_none_or(|p| p < at)
}

fn decide(g: &Graph) -> Vec<Fate> {
    let users = readers(g);
    let mut kept = vec![false; g.values.len()];
    for &(_, v) in &g.outputs {
        kept[v.index()] = true;
    }
    let only_reader = |v: ValueId, node: NodeId| !kept[v.index()] && users[v.index()] == [node];
    let mut fates = vec![Fate::Keep; g.nodes.len()];

    // Residual add + norm, and norm gradient + residual gradient.
    for (m, node) in g.nodes.iter() {
        let Some((a, b)) = sum_of_two(node) else {
            continue;
        };
        let s = node.outputs[0];
        let norm = users[s.index()].iter().copied().find(|&n| {
            let reader = &g.nodes[n];
            norm_kind(&reader.op).is_some()
                && reader.inputs[0] == s
                && fates[n.index()] == Fate::Keep
                && reader.inputs[1..].iter().all(|&p| defined_before(g, p, m))
        });
        if let Some(n) = norm {
            fates[m.index()] = Fate::AddNorm { norm: n };
            fates[n.index()] = Fate::Absorbed;
            continue;
        }
        for (dx, ds) in [(a, b), (b, a)] {
            let Some(grad) = producer(g, dx) else {
                continue;
            };
            let gnode = &g.nodes[grad];
            // The fused node replaces the map, later than the gradient node: nothing in
            // between may read the gradient's other outputs.
            let later = gnode.outputs[1..]
                .iter()
                .all(|o| users[o.index()].iter().all(|&u| u > m));
            if norm_grad_kind(&gnode.op).is_some()
                && gnode.outputs[0] == dx
                && only_reader(dx, m)
                && fates[grad.index()] == Fate::Keep
                && later
            {
                fates[m.index()] = Fate::AddNormGrad { grad, ds };
                fates[grad.index()] = Fate::Absorbed;
                break;
            }
        }
    }

    // Bias + activation.
    for (l, node) in g.nodes.iter() {
        if !matches!(node.op, Op::Linear { .. }) || fates[l.index()] != Fate::Keep {
            continue;
        }
        let pre = node.outputs[0];
        let map = users[pre.index()].iter().copied().find(|&m| {
            matches!(&g.nodes[m].op, Op::Map { vars, .. } if vars.len() == 1)
                && fates[m.index()] == Fate::Keep
        });
        if let Some(m) = map {
            fates[l.index()] = Fate::LinearMap { map: m };
            fates[m.index()] = Fate::Absorbed;
        }
    }

    // Elementwise chains: inline a map into the one map that reads it.
    for (p, node) in g.nodes.iter() {
        if !matches!(node.op, Op::Map { .. }) || fates[p.index()] != Fate::Keep {
            continue;
        }
        let y = node.outputs[0];
        if let [c] = users[y.index()][..] {
            if !kept[y.index()]
                && matches!(g.nodes[c].op, Op::Map { .. })
                && fates[c.index()] == Fate::Keep
            {
                fates[p.index()] = Fate::Inlined;
            }
        }
    }
    fates
}

/// Operands of a fused `map`: each distinct value once, under a unique name.
#[derive(Default)]
struct Operands {
    list: Vec<(ValueId, String)>,
}

impl Operands {
    /// The name of `v`, adding it under `preferred` (or `preferred_2`, `_3`, … if taken).
    fn name(&mut self, v: ValueId, preferred: &str) -> String {
        if let Some((_, n)) = self.list.iter().find(|(u, _)| *u == v) {
            return n.clone();
        }
        let taken = |n: &str| self.list.iter().any(|(_, m)| m == n);
        let mut name = preferred.to_string();
        let mut k = 2;
        while taken(&name) {
            name = format!("{preferred}_{k}");
            k += 1;
        }
        self.list.push((v, name.clone()));
        name
    }
}

/// The expression of map node `m` with every inlined producer substituted, its operands
/// collected in `ops`.
fn inline(g: &Graph, fates: &[Fate], m: NodeId, ops: &mut Operands) -> Expr {
    let node = &g.nodes[m];
    let Op::Map { expr, vars } = &node.op else {
        unreachable!("only maps are inlined");
    };
    substitute(expr, &mut |name| {
        let i = vars
            .iter()
            .position(|v| v == name)
            .expect("verified maps bind every variable");
        let v = node.inputs[i];
        match producer(g, v) {
            Some(p) if fates[p.index()] == Fate::Inlined => inline(g, fates, p, ops),
            _ => Expr::Var(ops.name(v, name)),
        }
    })
}

/// `e` with every variable replaced by `with(name)`.
fn substitute(e: &Expr, with: &mut dyn FnMut(&str) -> Expr) -> Expr {
    match e {
        Expr::Var(name) => with(name),
        Expr::Num(x) => Expr::Num(*x),
        Expr::Neg(a) => Expr::Neg(Box::new(substitute(a, with))),
        Expr::Bin(op, a, b) => {
            let a = substitute(a, with);
            let b = substitute(b, with);
            Expr::Bin(*op, Box::new(a), Box::new(b))
        }
        Expr::Pow(a, n) => Expr::Pow(Box::new(substitute(a, with)), *n),
        Expr::Call(f, a) => Expr::Call(*f, Box::new(substitute(a, with))),
    }
}

fn rebuild(g: &Graph, fates: &[Fate]) -> Graph {
    let mut out = Graph::new(g.name.clone());
    let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
    // Inputs and parameters first, parameters in their original order (the runtime feeds
    // parameters by index).
    for (v, value) in g.values.iter() {
        let new = match value.def {
            Def::Input(kind) => out.input(kind, value.ty.clone()),
            Def::Param(p) => {
                let param = &g.params[p];
                out.param(
                    param.name.clone(),
                    param.ty.clone(),
                    param.init,
                    param.update,
                )
            }
            Def::Node { .. } => continue,
        };
        remap.insert(v, new);
    }
    let joined = |a: &Node, b: &Node| format!("{}+{}", a.path, b.path);
    for (id, node) in g.nodes.iter() {
        let r = |v: &ValueId| remap[v];
        // (op, operands, path, format, old values the new outputs stand for)
        let (op, inputs, path, format, stands_for): (Op, Vec<ValueId>, String, _, Vec<ValueId>) =
            match &fates[id.index()] {
                Fate::Absorbed | Fate::Inlined => continue,
                Fate::Keep => match &node.op {
                    Op::Map { .. } => {
                        let mut ops = Operands::default();
                        let expr = inline(g, fates, id, &mut ops);
                        let (values, vars): (Vec<ValueId>, Vec<String>) =
                            ops.list.into_iter().unzip();
                        (
                            Op::Map { expr, vars },
                            values.iter().map(r).collect(),
                            node.path.clone(),
                            node.format,
                            node.outputs.clone(),
                        )
                    }
                    op => (
                        op.clone(),
                        node.inputs.iter().map(r).collect(),
                        node.path.clone(),
                        node.format,
                        node.outputs.clone(),
                    ),
                },
                Fate::AddNorm { norm } => {
                    let n = &g.nodes[*norm];
                    let (kind, eps) = norm_kind(&n.op).expect("chosen for its norm");
                    let (x, res) = sum_of_two(node).expect("chosen for its sum");
                    let mut inputs = vec![r(&x), r(&res)];
                    inputs.extend(n.inputs[1..].iter().map(r));
                    (
                        Op::AddNorm { norm: kind, eps },
                        inputs,
                        joined(node, n),
                        n.format,
                        vec![node.outputs[0], n.outputs[0]],
                    )
                }
                Fate::AddNormGrad { grad, ds } => {
                    let gn = &g.nodes[*grad];
                    let (kind, eps) = norm_grad_kind(&gn.op).expect("chosen for its gradient");
                    let mut inputs: Vec<ValueId> = gn.inputs.iter().map(r).collect();
                    inputs.push(r(ds));
                    let mut stands_for = vec![node.outputs[0]];
                    stands_for.extend_from_slice(&gn.outputs[1..]);
                    (
                        Op::AddNormGrad { norm: kind, eps },
                        inputs,
                        joined(gn, node),
                        gn.format,
                        stands_for,
                    )
                }
                Fate::LinearMap { map } => {
                    let m = &g.nodes[*map];
                    let (Op::Linear { bias }, Op::Map { expr, vars }) = (&node.op, &m.op) else {
                        unreachable!("chosen for a linear and a one-operand map");
                    };
                    (
                        Op::LinearMap {
                            bias: *bias,
                            expr: expr.clone(),
                            var: vars[0].clone(),
                        },
                        node.inputs.iter().map(r).collect(),
                        joined(node, m),
                        node.format,
                        vec![node.outputs[0], m.outputs[0]],
                    )
                }
            };
        let outputs = out
            .node(op, &inputs, path, format)
            .expect("a fused node has the types of the chain it replaces");
        for (old, new) in stands_for.into_iter().zip(outputs) {
            remap.insert(old, new);
        }
    }
    out.outputs = g
        .outputs
        .iter()
        .map(|(name, v)| (name.clone(), remap[v]))
        .collect();
    out
}
