//! The pipeline that makes the compiler's product, [`Program`] (defined in kiln-ir and
//! re-exported here with its parts):
//!
//! ```text
//! Model ─lower─▶ forward Graph ─differentiate─▶ forward + backward ─fuse─▶ ─plan─▶ Program
//! ```
//!
//! A [`Program`] can only be built from a graph that verifies, so every backend (the CPU
//! interpreter, the emitters) may rely on the verifier's guarantees.

use crate::autodiff::differentiate;
use crate::fuse::fuse;
use crate::ir::Graph;
use crate::lower::{lower, lower_for, Objective};
use crate::model::Model;
pub use kiln_ir::program::*;

impl SettingsSource for Model {
    /// The settings of a checked model.
    fn to_settings(&self) -> Settings {
        let model = self;
        let (t, p) = (&model.train, &model.precision);
        Settings {
            name: model.name.clone(),
            vocab: model.vocab,
            d_model: model.d_model,
            layers: model.layers.len(),
            batch: t.batch,
            seq_len: t.seq_len,
            optimizer: t.optimizer,
            schedule: t.schedule,
            grad_clip: t.grad_clip,
            bias_update: model.moe.as_ref().map_or(0.0, |m| m.bias_update),
            formats: Formats {
                compute: p.compute,
                master: p.master,
                grads: p.grads,
                moments: p.moments,
                kv_cache: p.kv_cache,
                fp8: p.fp8,
            },
        }
    }
}

/// What compiling a model yields: the training step, and the forward pass alone (for
/// evaluation and sampling), both fused.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// Forward, backward (`grad.<param>` outputs) and losses.
    pub train: Program,
    /// The forward pass: `loss`, `loss.main`, `logits`.
    pub forward: Program,
}

/// The last pass a caller wants to see the result of (`kiln emit ir --after`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// The forward graph.
    Lower,
    /// Forward and backward.
    Autodiff,
    /// Forward and backward, fused.
    Fuse,
}

/// The graph after `pass`, verified after every pass on the way.
pub fn graph_after(model: &Model, pass: Pass) -> Result<Graph, CompileError> {
    let forward = lowered(model)?;
    if pass == Pass::Lower {
        return Ok(forward);
    }
    let train = differentiated(&forward)?;
    if pass == Pass::Autodiff {
        return Ok(train);
    }
    let fused = fuse(&train);
    checked("fuse", &fused)?;
    Ok(fused)
}

/// The whole pipeline: lower, differentiate, fuse and plan.
pub fn compile(model: &Model) -> Result<Compiled, CompileError> {
    let forward = lowered(model)?;
    let train = differentiated(&forward)?;
    Ok(Compiled {
        train: Program::new(fuse(&train), Settings::of(model))?,
        forward: Program::new(fuse(&forward), Settings::of(model))?,
    })
}

/// The pipeline for policy-gradient fine-tuning (GRPO): the training step of
/// [`Objective::PolicyGradient`]'s weighted loss, and its forward pass (whose `logits`
/// give the current policy's log-probabilities).
pub fn compile_policy(model: &Model) -> Result<Compiled, CompileError> {
    let forward =
        lower_for(model, Objective::PolicyGradient).map_err(|e| CompileError::new("lower", e))?;
    checked("lower", &forward)?;
    let train = differentiated(&forward)?;
    Ok(Compiled {
        train: Program::new(fuse(&train), Settings::of(model))?,
        forward: Program::new(fuse(&forward), Settings::of(model))?,
    })
}

/// The decode step of [`Objective::Decode`]: one token for each of `rows` rows over KV caches
/// of `capacity` tokens, lowered, fused and planned. Decoding (`kiln sample`, GRPO's
/// sampling) runs it on the same executor as training, and the CUDA emitter its kernels.
pub fn compile_decode(model: &Model, rows: u64, capacity: u64) -> Result<Program, CompileError> {
    let graph = lower_for(model, Objective::Decode { rows, capacity })
        .map_err(|e| CompileError::new("lower", e))?;
    checked("lower", &graph)?;
    Program::new(fuse(&graph), Settings::of(model))
}

/// The forward pass alone, lowered, fused and planned (sampling needs no backward pass).
pub fn compile_forward(model: &Model) -> Result<Program, CompileError> {
    Program::new(fuse(&lowered(model)?), Settings::of(model))
}

fn lowered(model: &Model) -> Result<Graph, CompileError> {
    let forward = lower(model).map_err(|e| CompileError::new("lower", e))?;
    checked("lower", &forward)?;
    Ok(forward)
}

fn differentiated(forward: &Graph) -> Result<Graph, CompileError> {
    let loss = forward.output("loss").expect("lowering names the loss");
    let train = differentiate(forward, loss).map_err(|e| CompileError::new("autodiff", e))?;
    checked("autodiff", &train)?;
    Ok(train)
}
