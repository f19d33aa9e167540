//! The compiler's product: verified, fused graphs with their memory plans, keep plans and
//! settings. (The pipeline that makes them is kiln-compiler's `program` module.)
//!
//! A [`Program`] can only be built from a graph that verifies, so every backend (the CPU
//! interpreter, the emitters) may rely on the verifier's guarantees.

use std::fmt;

use crate::attrs::{AdamW, Format, Fp8, Schedule};
use crate::ir::{verify, Def, Graph, Op, ParamId, ValueId};
use crate::keep::{keep, KeepPlan};
use crate::plan::{plan, Plan};

/// Everything a backend needs to run a graph: the verified graph, its memory plan, what its
/// backward pass keeps (and in which format), and the settings of the run. Backends take a
/// `Program` and nothing else of the compiler.
#[derive(Clone, Debug)]
pub struct Program {
    graph: Graph,
    plan: Plan,
    keep: KeepPlan,
    settings: Settings,
}

impl Program {
    /// Verifies `graph`, plans its memory (keeping its named outputs to the end) and what its
    /// backward pass keeps under `settings`' precision policy.
    pub fn new(graph: Graph, settings: Settings) -> Result<Program, CompileError> {
        checked("verify", &graph)?;
        let plan = plan(&graph, &outputs(&graph));
        let keep = keep(&graph, settings.formats.fp8.as_ref());
        Ok(Program {
            graph,
            plan,
            keep,
            settings,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The values the backward pass reads from the forward pass, with their storage.
    pub fn keep(&self) -> &KeepPlan {
        &self.keep
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// The settings of a run that are not in the graph: the model's name, the shape of a step,
/// the optimizer and its schedule, clipping, the router bias update, and the storage formats
/// of the precision policy. (Each node's compute format is in the graph.)
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub name: String,
    /// Vocabulary size, residual width and block count: the constants a generated module
    /// states.
    pub vocab: u64,
    pub d_model: u64,
    pub layers: usize,
    /// Sequences per step.
    pub batch: u64,
    /// Tokens per sequence.
    pub seq_len: u64,
    pub optimizer: AdamW,
    pub schedule: Schedule,
    /// Global gradient-norm clip; `None` disables clipping.
    pub grad_clip: Option<f64>,
    /// Aux-loss-free balancing speed γ (0 without routed experts).
    pub bias_update: f64,
    pub formats: Formats,
}

/// The precision policy's storage formats and FP8 scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Formats {
    /// The residual stream's format, and that of activations kept for the backward pass.
    pub compute: Format,
    pub master: Format,
    pub grads: Format,
    /// AdamW's moments.
    pub moments: Format,
    pub kv_cache: Format,
    /// FP8 scaling; present iff some GEMM format is FP8.
    pub fp8: Option<Fp8>,
}

impl Settings {
    /// The settings of a checked model (kiln-compiler implements [`SettingsSource`] for
    /// its `Model`).
    pub fn of(source: &impl SettingsSource) -> Settings {
        source.to_settings()
    }
}

/// What a [`Settings`] value is read from: kiln-compiler's `Model`. A trait, so that this
/// crate does not depend on the model and `Settings::of(model)` still reads naturally.
pub trait SettingsSource {
    fn to_settings(&self) -> Settings;
}

fn outputs(g: &Graph) -> Vec<ValueId> {
    g.outputs.iter().map(|&(_, v)| v).collect()
}

/// The values a training step reads after running the training graph: the total and main
/// losses and the loss's other terms, each trainable parameter's gradient, and each router's
/// chosen experts (for the aux-loss-free bias update).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutputs {
    pub loss: ValueId,
    pub main_loss: ValueId,
    /// Each multi-token-prediction depth's cross-entropy (`loss.mtp.<k>`), depth 1 first.
    pub mtp: Vec<ValueId>,
    /// Each MoE layer's sequence-wise balance loss as the total adds it, already scaled by
    /// `moe.seq_aux` (`loss.balance.<i>`), in layer order.
    pub balance: Vec<ValueId>,
    /// `(parameter, its grad.<name> output)` in the order of the parameters' values.
    pub grads: Vec<(ParamId, ValueId)>,
    /// `(router bias parameter, the router's experts output, expert count)` in node order.
    pub routers: Vec<(ParamId, ValueId, usize)>,
}

impl TrainOutputs {
    /// Finds them in a training graph (the output of differentiation): it must have `loss` and
    /// `loss.main` outputs.
    pub fn of(graph: &Graph) -> Option<TrainOutputs> {
        let loss = graph.output("loss")?;
        let main_loss = graph.output("loss.main")?;
        // `loss.<kind>.0`, `loss.<kind>.1`, … until one is missing.
        let numbered = |kind: &str| -> Vec<ValueId> {
            (0..)
                .map_while(|i| graph.output(&format!("loss.{kind}.{i}")))
                .collect()
        };
        let (mtp, balance) = (numbered("mtp"), numbered("balance"));
        // In the order the parameters' values appear (the order the gradient norm sums in).
        let grads = graph
            .values
            .iter()
            .filter_map(|(_, v)| match v.def {
                Def::Param(p) => {
                    Some((p, graph.output(&format!("grad.{}", graph.params[p].name))?))
                }
                _ => None,
            })
            .collect();
        let routers = graph
            .nodes
            .iter()
            .filter(|(_, node)| matches!(node.op, Op::Router(_)))
            .filter_map(|(_, node)| {
                let bias = &graph.values[node.inputs[2]];
                match bias.def {
                    Def::Param(p) => Some((p, node.outputs[1], bias.ty.shape[0] as usize)),
                    _ => None,
                }
            })
            .collect();
        Some(TrainOutputs {
            loss,
            main_loss,
            mtp,
            balance,
            grads,
            routers,
        })
    }

    /// Every value listed, in the order above.
    pub fn values(&self) -> Vec<ValueId> {
        let mut keep = vec![self.loss, self.main_loss];
        keep.extend(self.grads.iter().map(|&(_, g)| g));
        keep.extend(self.routers.iter().map(|&(_, e, _)| e));
        keep.extend(self.mtp.iter().chain(&self.balance));
        keep
    }
}

/// Runs the verifier on the output of `pass`.
pub fn checked(pass: &'static str, g: &Graph) -> Result<(), CompileError> {
    verify(g).map_err(|errors| CompileError {
        pass,
        message: format!(
            "{} does not verify: {}",
            g.name,
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    })
}

/// A pass failed on a model the checker accepted: a bug in kiln, reported with the pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    pub pass: &'static str,
    pub message: String,
}

impl CompileError {
    /// A failure of `pass`, described by `e`.
    pub fn new(pass: &'static str, e: impl fmt::Display) -> Self {
        CompileError {
            pass,
            message: e.to_string(),
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "internal error in pass `{}`: {}",
            self.pass, self.message
        )
    }
}

impl std::error::Error for CompileError {}
