//! The verifier: checks the invariants every pass must preserve. Run after every pass in
//! tests and debug builds; emitters accept only graphs that pass.

use std::fmt;

use super::{infer, Def, Graph, TensorType};

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    /// The node's position, when the error is about a node.
    pub node: Option<usize>,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "node {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Checks that every value is defined once and consistently, that nodes are in execution
/// order (operands defined before use), that every node's result types follow from its
/// operands by the op's shape rule, and that parameters and outputs are well formed.
pub fn verify(g: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let mut err = |node: Option<usize>, message: String| errors.push(VerifyError { node, message });

    let mut param_users = vec![0usize; g.params.len()];
    for (v, value) in g.values.iter() {
        match value.def {
            Def::Input(_) => {}
            Def::Param(p) => match g.params.get(p) {
                Some(param) => {
                    param_users[p.index()] += 1;
                    if param.ty != value.ty {
                        err(
                            None,
                            format!(
                                "value %{} has type {} but its parameter `{}` is {}",
                                v.index(),
                                value.ty,
                                param.name,
                                param.ty
                            ),
                        );
                    }
                }
                None => err(
                    None,
                    format!("value %{} reads a parameter that does not exist", v.index()),
                ),
            },
            Def::Node { node, output } => {
                let ok = g
                    .nodes
                    .get(node)
                    .and_then(|n| n.outputs.get(output as usize))
                    == Some(&v);
                if !ok {
                    err(None, format!("value %{} claims to be output {output} of node {}, which does not produce it", v.index(), node.index()));
                }
            }
        }
    }
    for (p, param) in g.params.iter() {
        if param_users[p.index()] != 1 {
            err(
                None,
                format!(
                    "parameter `{}` is read by {} values instead of one",
                    param.name,
                    param_users[p.index()]
                ),
            );
        }
    }

    for (id, node) in g.nodes.iter() {
        let i = Some(id.index());
        let mut types: Vec<&TensorType> = Vec::with_capacity(node.inputs.len());
        for &v in &node.inputs {
            match g.values.get(v) {
                None => err(i, format!("operand %{} does not exist", v.index())),
                Some(value) => {
                    if let Def::Node { node: def, .. } = value.def {
                        if def >= id {
                            err(i, format!("operand %{} is defined by node {}, which does not come before it", v.index(), def.index()));
                        }
                    }
                    types.push(&value.ty);
                }
            }
        }
        for (k, &v) in node.outputs.iter().enumerate() {
            let back = g.values.get(v).map(|value| value.def);
            if back
                != Some(Def::Node {
                    node: id,
                    output: k as u32,
                })
            {
                err(
                    i,
                    format!(
                        "result %{} is not defined as output {k} of this node",
                        v.index()
                    ),
                );
            }
        }
        if types.len() != node.inputs.len() {
            continue;
        }
        match infer(&node.op, &types) {
            Err(m) => err(i, format!("{} at `{}`: {m}", node.op.name(), node.path)),
            Ok(expected) => {
                let actual: Vec<Option<&TensorType>> = node
                    .outputs
                    .iter()
                    .map(|&v| g.values.get(v).map(|x| &x.ty))
                    .collect();
                let expected: Vec<Option<&TensorType>> = expected.iter().map(Some).collect();
                if actual != expected {
                    err(i, format!("{} at `{}`: results have types {actual:?}, the shape rule gives {expected:?}", node.op.name(), node.path));
                }
            }
        }
    }

    for (name, v) in &g.outputs {
        if g.values.get(*v).is_none() {
            err(
                None,
                format!(
                    "output `{name}` is value %{}, which does not exist",
                    v.index()
                ),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
