//! Reverse-mode automatic differentiation on the graph IR.
//!
//! [`differentiate`] appends to a forward graph the nodes that compute the gradient of one
//! scalar output with respect to every trainable parameter, walking the forward nodes in
//! reverse and applying each op's vector-Jacobian product rule. The result is one graph
//! (forward, then backward) with an output `grad.<param name>` per trainable parameter, so
//! later passes (fusion, planning) and every backend see both directions at once.
//!
//! Only values that depend on a trainable parameter get gradients; a value used several
//! times gets the sum of its contributions. Composite forward ops have composite backward ops
//! (`linear_grad`, `attention_grad`, `experts_grad`, …) that recompute cheap statistics (norm
//! reciprocals, the softmax normalizer of cross-entropy) instead of saving them; attention
//! keeps its log-sum-exp as a forward output.

use std::collections::HashMap;

use crate::dsl::expr::{BinOp, Expr};
use crate::ir::{DType, Def, Graph, Node, Op, ShapeError, Update, ValueId};
use crate::model::Format;

/// Appends the backward pass of `loss` (a scalar output of `fwd`) to a copy of `fwd`.
pub fn differentiate(fwd: &Graph, loss: ValueId) -> Result<Graph, ShapeError> {
    let mut g = fwd.clone();
    g.name = format!("{} + backward", fwd.name);
    let needs = requires_grad(fwd);
    let mut grads: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    let seed = g.node1(
        Op::Fill {
            value: 1.0,
            shape: Vec::new(),
        },
        &[],
        "grad.seed",
        Format::Fp32,
    )?;
    grads.insert(loss, vec![seed]);

    let nodes: Vec<Node> = fwd.nodes.iter().map(|(_, n)| n.clone()).collect();
    for node in nodes.iter().rev() {
        let mut dys = Vec::with_capacity(node.outputs.len());
        for &o in &node.outputs {
            dys.push(sum(&mut g, &mut grads, o, &node.path)?);
        }
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let contributions = vjp(&mut g, node, &dys, &needs)?;
        for (input, grad) in contributions {
            if needs[input.index()] {
                grads.entry(input).or_default().push(grad);
            }
        }
    }

    let params: Vec<(String, ValueId)> = fwd
        .values
        .iter()
        .filter_map(|(v, value)| match value.def {
            Def::Param(p) if fwd.params[p].update != Update::BalanceBias => {
                Some((fwd.params[p].name.clone(), v))
            }
            _ => None,
        })
        .collect();
    for (name, v) in params {
        let grad = match sum(&mut g, &mut grads, v, &name)? {
            Some(d) => d,
            None => {
                let shape = g.values[v].ty.shape.clone();
                let fmt = Format::Fp32;
                g.node1(
                    Op::Fill { value: 0.0, shape },
                    &[],
                    format!("grad.{name}"),
                    fmt,
                )?
            }
        };
        g.outputs.push((format!("grad.{name}"), grad));
    }
    Ok(g)
}

/// Which values depend on a trainable parameter (and so need gradients).
fn requires_grad(g: &Graph) -> Vec<bool> {
    let mut needs = vec![false; g.values.len()];
    for (v, value) in g.values.iter() {
        if let Def::Param(p) = value.def {
            needs[v.index()] = g.params[p].update != Update::BalanceBias;
        }
    }
    for (_, node) in g.nodes.iter() {
        let any = node
            .inputs
            .iter()
            .any(|&i| needs[i.index()] && g.values[i].ty.dtype == DType::F32);
        for &o in &node.outputs {
            needs[o.index()] = any && g.values[o].ty.dtype == DType::F32;
        }
    }
    needs
}

/// The total gradient of `v`: its one contribution, or their sum.
fn sum(
    g: &mut Graph,
    grads: &mut HashMap<ValueId, Vec<ValueId>>,
    v: ValueId,
    path: &str,
) -> Result<Option<ValueId>, ShapeError> {
    let Some(parts) = grads.remove(&v) else {
        return Ok(None);
    };
    if parts.len() == 1 {
        return Ok(Some(parts[0]));
    }
    let vars: Vec<String> = (0..parts.len()).map(|i| format!("g{i}")).collect();
    let expr = vars[1..]
        .iter()
        .fold(Expr::Var(vars[0].clone()), |acc, name| {
            Expr::Bin(BinOp::Add, Box::new(acc), Box::new(Expr::Var(name.clone())))
        });
    let fmt = Format::Fp32;
    Ok(Some(g.node1(
        Op::Map { expr, vars },
        &parts,
        format!("{path}.grad_sum"),
        fmt,
    )?))
}

/// A gradient of value `v`, or zeros of its type when nothing flows into it.
fn or_zeros(
    g: &mut Graph,
    dy: Option<ValueId>,
    like: ValueId,
    path: &str,
) -> Result<ValueId, ShapeError> {
    match dy {
        Some(d) => Ok(d),
        None => {
            let shape = g.values[like].ty.shape.clone();
            let fmt = Format::Fp32;
            g.node1(
                Op::Fill { value: 0.0, shape },
                &[],
                format!("{path}.zero_grad"),
                fmt,
            )
        }
    }
}

/// Whether `expr` is a plain sum of distinct variables (a residual add), whose gradient is
/// the output gradient itself for every operand.
fn is_sum_of_vars(expr: &Expr) -> bool {
    match expr {
        Expr::Var(_) => true,
        Expr::Bin(BinOp::Add, a, b) => is_sum_of_vars(a) && is_sum_of_vars(b),
        _ => false,
    }
}

/// The vector-Jacobian product of one node: `(operand, gradient contribution)` pairs.
fn vjp(
    g: &mut Graph,
    node: &Node,
    dys: &[Option<ValueId>],
    needs: &[bool],
) -> Result<Vec<(ValueId, ValueId)>, ShapeError> {
    let path = format!("{}.grad", node.path);
    let fmt = node.format;
    // The gradient GEMMs of linear and expert nodes have their own operand format.
    let grad_fmt = g.grad_formats.get(&node.path).copied().unwrap_or(fmt);
    let x = &node.inputs;
    let dy0 = dys[0];
    let mut out = Vec::new();
    match &node.op {
        Op::Embedding => {
            let vocab = g.values[x[0]].ty.shape[0];
            let d = g.node1(
                Op::EmbeddingGrad { vocab },
                &[x[1], dy0.expect("one output")],
                path,
                fmt,
            )?;
            out.push((x[0], d));
        }
        Op::Linear { bias } => {
            let r = g.node(
                Op::LinearGrad { bias: *bias },
                &[x[0], x[1], dy0.expect("one output")],
                path,
                grad_fmt,
            )?;
            out.extend(x.iter().copied().zip(r));
        }
        Op::RmsNorm { eps } => {
            let r = g.node(
                Op::RmsNormGrad { eps: *eps },
                &[x[0], x[1], dy0.expect("one output")],
                path,
                fmt,
            )?;
            out.extend(x.iter().copied().zip(r));
        }
        Op::LayerNorm { eps } => {
            let r = g.node(
                Op::LayerNormGrad { eps: *eps },
                &[x[0], x[1], dy0.expect("one output")],
                path,
                fmt,
            )?;
            out.extend(x.iter().copied().zip(r));
        }
        Op::Map { expr, vars } => {
            let dy = dy0.expect("one output");
            if is_sum_of_vars(expr) && x.len() == expr.vars().len() {
                out.extend(x.iter().map(|&i| (i, dy)));
            } else {
                let wrt: Vec<u32> = (0..x.len() as u32)
                    .filter(|&i| needs[x[i as usize].index()])
                    .collect();
                if !wrt.is_empty() {
                    let mut inputs = x.clone();
                    inputs.push(dy);
                    let op = Op::MapGrad {
                        expr: expr.clone(),
                        vars: vars.clone(),
                        wrt: wrt.clone(),
                    };
                    let r = g.node(op, &inputs, path, fmt)?;
                    out.extend(wrt.iter().map(|&w| x[w as usize]).zip(r));
                }
            }
        }
        Op::Split { .. } => {
            let mut parts = Vec::new();
            for (&o, &dy) in node.outputs.iter().zip(dys) {
                parts.push(or_zeros(g, dy, o, &path)?);
            }
            let d = g.node1(Op::Concat, &parts, path, fmt)?;
            out.push((x[0], d));
        }
        Op::Concat => {
            let sizes: Vec<u64> = x
                .iter()
                .map(|&i| *g.values[i].ty.shape.last().expect("rank ≥ 1"))
                .collect();
            let r = g.node(Op::Split { sizes }, &[dy0.expect("one output")], path, fmt)?;
            out.extend(x.iter().copied().zip(r));
        }
        Op::Reshape { .. } => {
            let shape = g.values[x[0]].ty.shape.clone();
            let d = g.node1(
                Op::Reshape { shape },
                &[dy0.expect("one output")],
                path,
                fmt,
            )?;
            out.push((x[0], d));
        }
        Op::Expand { axis, .. } => {
            let d = g.node1(
                Op::SumAxis { axis: *axis },
                &[dy0.expect("one output")],
                path,
                fmt,
            )?;
            out.push((x[0], d));
        }
        Op::Rope { theta, yarn, pairs } => {
            let op = Op::RopeGrad {
                theta: *theta,
                yarn: *yarn,
                pairs: *pairs,
            };
            let d = g.node1(op, &[dy0.expect("one output")], path, fmt)?;
            out.push((x[0], d));
        }
        Op::Attention { scale } => {
            let d_o = or_zeros(g, dy0, node.outputs[0], &path)?;
            let inputs = [x[0], x[1], x[2], node.outputs[0], node.outputs[1], d_o];
            let r = g.node(Op::AttentionGrad { scale: *scale }, &inputs, path, fmt)?;
            out.extend(x.iter().copied().zip(r));
        }
        Op::Router(spec) => {
            let d_weights = or_zeros(g, dys[0], node.outputs[0], &path)?;
            let d_scores = or_zeros(g, dys[2], node.outputs[2], &path)?;
            let o = &node.outputs;
            let inputs = [x[0], x[1], x[2], o[0], o[1], o[2], d_weights, d_scores];
            let r = g.node(Op::RouterGrad(*spec), &inputs, path, fmt)?;
            out.extend([x[0], x[1]].into_iter().zip(r));
        }
        Op::Experts { act, gated } => {
            let mut inputs = x.clone();
            inputs.push(dy0.expect("one output"));
            let op = Op::ExpertsGrad {
                act: act.clone(),
                gated: *gated,
            };
            let r = g.node(op, &inputs, path, grad_fmt)?;
            // dx, d_weights, then one gradient per expert weight tensor.
            let targets = [x[0], x[1]].into_iter().chain(x[3..].iter().copied());
            out.extend(targets.zip(r));
        }
        Op::CrossEntropy => {
            // Weights, when present, are data: they get no gradient.
            let mut inputs = vec![x[0], x[1], dy0.expect("one output")];
            inputs.extend(x.get(2));
            let d = g.node1(Op::CrossEntropyGrad, &inputs, path, fmt)?;
            out.push((x[0], d));
        }
        Op::BalanceLoss { alpha, top_k } => {
            let op = Op::BalanceLossGrad {
                alpha: *alpha,
                top_k: *top_k,
            };
            let d = g.node1(op, &[x[0], x[1], dy0.expect("one output")], path, fmt)?;
            out.push((x[0], d));
        }
        // The ops of a backward pass are not differentiated again.
        Op::Fill { .. }
        | Op::SumAxis { .. }
        | Op::EmbeddingGrad { .. }
        | Op::LinearGrad { .. }
        | Op::RmsNormGrad { .. }
        | Op::LayerNormGrad { .. }
        | Op::MapGrad { .. }
        | Op::RopeGrad { .. }
        | Op::AttentionGrad { .. }
        | Op::RouterGrad(_)
        | Op::ExpertsGrad { .. }
        | Op::CrossEntropyGrad
        | Op::BalanceLossGrad { .. } => {}
        // Fusion runs after differentiation, so a fused op here is a pipeline mistake.
        Op::AddNorm { .. } | Op::AddNormGrad { .. } | Op::LinearMap { .. } => {
            return Err(ShapeError {
                path: node.path.clone(),
                op: node.op.name(),
                message: "fused ops are not differentiated: differentiate, then fuse".into(),
            });
        }
        // A decode graph is forward-only: it reads a cache no gradient flows into.
        Op::RopeAt { .. } | Op::CachedAttention { .. } => {
            return Err(ShapeError {
                path: node.path.clone(),
                op: node.op.name(),
                message: "decode ops are not differentiated: a decode graph is forward-only".into(),
            });
        }
    }
    // Gradients of u32 operands (ids, expert indices) do not exist.
    out.retain(|&(v, _)| g.values[v].ty.dtype == DType::F32);
    Ok(out)
}
