//! The CPU interpreter: executes a verified graph node by node with the [`crate::cpu`]
//! kernels, in f32 for training or f64 for gradient checks.
//!
//! Values live in one slot each, indexed by value id, and are freed after their last use
//! unless the caller asked to keep them (graph outputs). Elementwise [`Op::Map`] nodes run a
//! compiled expression ([`kiln_ir::expr::Compiled`]) over chunks in parallel.
//!
//! Emulating a precision policy ([`Executor::emulating`]), activations the backward pass
//! reads are packed into their storage format ([`crate::numerics::store`]) once the forward
//! pass is done with them, and unpacked for each backward use.

use std::collections::HashMap;
use std::fmt;

use kiln_ir::attrs::{Format, NormKind};
use kiln_ir::ir::{CacheLayout, Def, Graph, InputKind, Node, Op, ParamId, ValueId};
use kiln_ir::keep::{self, KeepPlan};
use kiln_ir::program::Program;

use crate::cpu::attention::{self, RopeTables};
use crate::cpu::cached_attention;
use crate::cpu::elementwise::Elementwise;
use crate::cpu::{dense, moe, Real};
use crate::ep::{self, ExpertParallel};
use crate::numerics::gemm::GemmNumerics;
use crate::numerics::store::{Half, Packed, Storage};
use crate::numerics::{Emulation, Fp8Format};
use crate::op_fns::{self, check_ids, norm_bwd, norm_fwd, router_config, ExprActivation};

/// A tensor's data: floats, or u32 ids and indices.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf<T> {
    F(Vec<T>),
    U(Vec<u32>),
}

impl<T: Real> Buf<T> {
    pub fn floats(&self) -> &[T] {
        match self {
            Buf::F(v) => v,
            Buf::U(_) => panic!("expected a float tensor; the verifier guarantees operand types"),
        }
    }

    pub fn ids(&self) -> &[u32] {
        match self {
            Buf::U(v) => v,
            Buf::F(_) => panic!("expected a u32 tensor; the verifier guarantees operand types"),
        }
    }
}

/// A value held during a run: computed by a node, or borrowed from the caller's feed (so
/// parameters and inputs are never copied to run a step), or an activation kept for the
/// backward pass in its storage format (unpacked into an `Owned` slot while a node reads it).
enum Slot<'f, T> {
    Owned(Buf<T>),
    Param(&'f [T]),
    Input(&'f [u32]),
    Packed(Packed),
}

impl<T: Real> Slot<'_, T> {
    fn floats(&self) -> &[T] {
        match self {
            Slot::Owned(b) => b.floats(),
            Slot::Param(p) => p,
            Slot::Input(_) => {
                panic!("expected a float tensor; the verifier guarantees operand types")
            }
            Slot::Packed(_) => panic!("packed values are unpacked before a node reads them"),
        }
    }

    fn ids(&self) -> &[u32] {
        match self {
            Slot::Owned(b) => b.ids(),
            Slot::Input(i) => i,
            Slot::Param(_) | Slot::Packed(_) => {
                panic!("expected a u32 tensor; the verifier guarantees operand types")
            }
        }
    }

    /// The value as an owned buffer (a copy, if it is borrowed).
    fn into_buf(self) -> Buf<T> {
        match self {
            Slot::Owned(b) => b,
            borrowed => borrowed.to_buf(),
        }
    }

    /// A copy of the value as an owned buffer.
    fn to_buf(&self) -> Buf<T> {
        match self {
            Slot::Owned(b) => b.clone(),
            Slot::Param(p) => Buf::F(p.to_vec()),
            Slot::Input(i) => Buf::U(i.to_vec()),
            Slot::Packed(p) => Buf::F(p.unpack()),
        }
    }
}

/// Why a graph could not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecError {
    /// An input the graph reads was not supplied, or has the wrong length.
    Input(String),
    /// A parameter was not supplied, or has the wrong length.
    Param(String),
    /// A token id or expert index is out of range.
    OutOfRange(String),
    /// The device running the plan refused a call (`--device cuda-emulated`, `cuda`).
    Device(String),
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::Input(m) | ExecError::Param(m) | ExecError::OutOfRange(m) => f.write_str(m),
            ExecError::Device(m) => write!(f, "device: {m}"),
        }
    }
}

impl std::error::Error for ExecError {}

/// What one run needs besides the graph: parameter data (by parameter index) and inputs.
pub struct Feed<'a, T> {
    pub params: &'a [Vec<T>],
    pub inputs: &'a HashMap<InputKind, Vec<u32>>,
    /// The per-token loss weights of a graph with a weighted cross-entropy
    /// (`InputKind::TokenWeights`); `None` for every other graph.
    pub weights: Option<&'a [f32]>,
}

/// Something that runs one graph in f32 and returns the values its caller keeps: the
/// interpreter ([`Executor`]), or a module generated from the graph (`kiln::model!`).
pub trait Run: Sync {
    fn run(&self, feed: &Feed<f32>) -> Result<HashMap<ValueId, Buf<f32>>, ExecError>;

    /// The bytes of the activations a step packs for the backward pass, by storage format
    /// (all zero unless an emulated precision policy stores them below f32); `None` for
    /// runners that cannot say (a generated module, which never emulates).
    fn kept_bytes(&self) -> Option<KeptBytes> {
        None
    }

    /// The runner's own optimizer, when it can keep the training state (parameters and AdamW
    /// moments) where it runs the step, as a GPU runner does; `None` for the others, whose
    /// trainer updates the parameters on the host.
    fn resident(&self) -> Option<&dyn Resident> {
        None
    }

    /// [`Run::run`] with the routed experts sharded over `ep`'s group: the expert weights in
    /// `feed` are this rank's blocks. Only the interpreter can.
    fn run_experts(
        &self,
        feed: &Feed<f32>,
        ep: &ExpertParallel<'_>,
    ) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
        let _ = (feed, ep);
        Err(ExecError::Device(
            "this runner cannot shard the routed experts; expert parallelism runs on the \
             interpreter (--device cpu)"
                .into(),
        ))
    }
}

/// AdamW hyperparameters a [`Resident`] optimizer must have been built with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: Option<f64>,
    /// The router bias update's γ (0: none).
    pub bias_update: f64,
}

/// What one step's scalars are: the schedule's learning rate and Adam's bias corrections
/// `1 − βᵗ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    pub lr: f64,
    pub bias1: f64,
    pub bias2: f64,
}

/// A runner that keeps the training state on its device and updates it there: the
/// parameters stay put between steps (a run reads them there, not the feed's), the gradients
/// are never read back, and only the losses and the gradient norm cross to the host.
pub trait Resident {
    /// The AdamW settings its optimizer was built with; the trainer uses it only when its own
    /// are these.
    fn settings(&self) -> AdamSettings;
    /// Puts the parameters and both moments (in parameter order) on the device; the runs that
    /// follow read these parameters.
    fn put_state(
        &self,
        params: &[Vec<f32>],
        m: &[Vec<f32>],
        v: &[Vec<f32>],
    ) -> Result<(), ExecError>;
    /// The optimizer step after a run, on its gradients: the gradient norm, then — unless the
    /// norm or the loss (`loss_finite`) is not finite — AdamW with clipping and the router
    /// bias update. Returns the norm and whether the update was skipped.
    fn optimizer_step(
        &self,
        scalars: StepScalars,
        loss_finite: bool,
    ) -> Result<(f64, bool), ExecError>;
    /// Copies the parameters and both moments the device holds into `params`, `m` and `v`
    /// (by parameter index; what it does not hold is left as it is).
    fn get_state(
        &self,
        params: &mut [Vec<f32>],
        m: &mut [Vec<f32>],
        v: &mut [Vec<f32>],
    ) -> Result<(), ExecError>;
}

impl Run for Executor<'_> {
    fn run(&self, feed: &Feed<f32>) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
        Executor::run(self, feed)
    }

    fn run_experts(
        &self,
        feed: &Feed<f32>,
        ep: &ExpertParallel<'_>,
    ) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
        self.run_with(feed, &[], None, Some(ep))
    }

    fn kept_bytes(&self) -> Option<KeptBytes> {
        Some(Executor::kept_bytes(self))
    }
}

/// A graph prepared for repeated runs: liveness and compiled expressions computed once.
pub struct Executor<'g> {
    graph: &'g Graph,
    /// The routed experts' weights ([`ep::expert_params`]), sorted.
    expert_params: Vec<ParamId>,
    /// What the backward pass reads from the forward pass, and how it is stored.
    keep: &'g KeepPlan,
    /// The compute format kept activations are stored in, when emulating a policy.
    compute: Option<Format>,
    /// For each value, the index of the last node reading it (`usize::MAX` if kept).
    last_use: Vec<usize>,
    /// Compiled expressions of `map` and `map_grad` nodes, by node index.
    elementwise: HashMap<usize, Elementwise>,
    /// RoPE tables by (theta, yarn, seq, dim) of each rope node, by node index.
    rope_key: HashMap<usize, (usize, usize)>,
    /// For each `experts_grad` node, the `experts` node it differentiates; its routed
    /// activations are kept from the forward pass instead of being recomputed.
    experts_forward: HashMap<usize, usize>,
    /// How each GEMM node treats its operands, by node index; absent nodes are exact. Empty
    /// unless [`Executor::emulating`] set a precision policy.
    gemm: HashMap<usize, GemmNumerics>,
    /// The activations to pack once a node has run, by node index: each is a value the
    /// backward pass reads, after its last forward reader. Empty unless emulating.
    pack: HashMap<usize, Vec<(ValueId, Storage)>>,
    /// How `experts` nodes keep their routed projections for the backward pass; `None`
    /// keeps them in the run's type.
    experts_storage: Option<Half>,
}

/// Bytes of the activations an emulating executor keeps for the backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptBytes {
    /// Stored in the 16-bit compute format.
    pub half: u64,
    /// FP8 codes.
    pub fp8: u64,
    /// The FP8 codes' f32 tile scales.
    pub scales: u64,
}

impl KeptBytes {
    pub fn total(&self) -> u64 {
        self.half + self.fp8 + self.scales
    }
}

/// What an `experts` node keeps for its backward pass: the routing and the projections,
/// which are packed (and the saved vectors left empty) under a 16-bit compute format.
struct KeptExperts<T> {
    saved: moe::ExpertsSaved<T>,
    packed: Option<(Option<Packed>, Packed)>,
}

impl<T: Real> KeptExperts<T> {
    /// Keeps `saved`, whose projections are `h` wide, packing them in `half` if given.
    fn keep(mut saved: moe::ExpertsSaved<T>, h: usize, half: Option<Half>) -> Self {
        let packed = half.map(|half| {
            let pack = |x: Vec<T>| Packed::pack(&x, h, Storage::Half(half));
            let gate = saved.gate.take().map(pack);
            (gate, pack(std::mem::take(&mut saved.up)))
        });
        KeptExperts { saved, packed }
    }

    /// The saved activations, unpacked.
    fn restore(self) -> moe::ExpertsSaved<T> {
        let mut saved = self.saved;
        if let Some((gate, up)) = self.packed {
            saved.gate = gate.map(|g| g.unpack());
            saved.up = up.unpack();
        }
        saved
    }
}

impl<'g> Executor<'g> {
    /// Prepares `program` to run, keeping the values in `keep` alive.
    pub fn new(program: &'g Program, keep: &[ValueId]) -> Self {
        let graph = program.graph();
        let mut last_use = vec![0usize; graph.values.len()];
        for (id, node) in graph.nodes.iter() {
            for &v in &node.inputs {
                last_use[v.index()] = id.index();
            }
        }
        for &v in keep {
            last_use[v.index()] = usize::MAX;
        }
        let mut elementwise = HashMap::new();
        let mut rope_key = HashMap::new();
        for (id, node) in graph.nodes.iter() {
            match &node.op {
                Op::Map { expr, vars } | Op::MapGrad { expr, vars, .. } => {
                    let names: Vec<&str> = vars.iter().map(String::as_str).collect();
                    let e = Elementwise::new(expr, &names).expect("verified graphs compile");
                    elementwise.insert(id.index(), e);
                }
                Op::LinearMap { expr, var, .. } => {
                    let e = Elementwise::new(expr, &[var]).expect("verified graphs compile");
                    elementwise.insert(id.index(), e);
                }
                Op::Rope { .. } | Op::RopeGrad { .. } => {
                    let shape = &graph.values[node.inputs[0]].ty.shape;
                    rope_key.insert(id.index(), (shape[1] as usize, shape[3] as usize));
                }
                // Positions of a decode graph reach its caches' capacity.
                Op::RopeAt { .. } => {
                    let capacity = graph.cache_capacity();
                    let dim = graph.values[node.inputs[0]].ty.shape[3];
                    rope_key.insert(id.index(), (capacity as usize, dim as usize));
                }
                _ => {}
            }
        }
        let experts_forward = graph.experts_forward();
        Executor {
            expert_params: ep::expert_params(graph),
            graph,
            keep: program.keep(),
            compute: None,
            last_use,
            elementwise,
            rope_key,
            experts_forward,
            gemm: HashMap::new(),
            pack: HashMap::new(),
            experts_storage: None,
        }
    }

    fn gemm_of(&self, index: usize) -> GemmNumerics {
        self.gemm
            .get(&index)
            .copied()
            .unwrap_or(GemmNumerics::Exact)
    }

    /// Runs every linear and expert GEMM in its node's format, emulated exactly
    /// ([`crate::numerics`]): 16-bit operands rounded, FP8 operands block-scaled with the
    /// spec's `fp8` settings and limited-precision accumulation. Other ops compute in the
    /// run's type, at least as precise as any policy format.
    ///
    /// Activations the backward pass reads are stored as a GPU stores them
    /// (the Program's keep plan), unless `emulation` keeps them in f32.
    pub fn emulating(mut self, emulation: &Emulation) -> Self {
        let fp8 = emulation.fp8.as_ref();
        for (id, node) in self.graph.nodes.iter() {
            if matches!(
                node.op,
                Op::Linear { .. }
                    | Op::LinearMap { .. }
                    | Op::LinearGrad { .. }
                    | Op::Experts { .. }
                    | Op::ExpertsGrad { .. }
            ) {
                self.gemm
                    .insert(id.index(), GemmNumerics::of(node.format, fp8));
            }
        }
        if emulation.keep_storage {
            let half = Half::of(emulation.activations);
            self.experts_storage = half;
            self.pack = self.storage(half);
        }
        self.compute = Some(emulation.activations);
        self
    }

    /// The activations this executor packs for the backward pass, with their storage, in
    /// graph order (none unless [`Executor::emulating`] set a policy).
    pub fn kept_activations(&self) -> Vec<(ValueId, Storage)> {
        let mut kept: Vec<(ValueId, Storage)> = self.pack.values().flatten().copied().collect();
        kept.sort_by_key(|(v, _)| v.index());
        kept
    }

    /// Bytes the packed activations hold once the forward pass is done: every value of
    /// [`Executor::kept_activations`] plus the routed projections `experts` nodes keep, as
    /// the keep plan counts them (all zero unless emulating a 16-bit or FP8 policy).
    pub fn kept_bytes(&self) -> KeptBytes {
        match self.compute {
            Some(compute) => {
                let b = self.keep.bytes(self.graph, compute);
                KeptBytes {
                    half: b.half,
                    fp8: b.fp8,
                    scales: b.scales,
                }
            }
            None => KeptBytes::default(),
        }
    }

    /// The activations to pack once each node has run, from the Program's keep plan: those
    /// it stores in FP8, and those it stores in the compute format when that is 16-bit.
    fn storage(&self, half: Option<Half>) -> HashMap<usize, Vec<(ValueId, Storage)>> {
        let mut pack: HashMap<usize, Vec<(ValueId, Storage)>> = HashMap::new();
        for k in &self.keep.kept {
            let storage = match k.storage {
                keep::Storage::F32 => continue,
                keep::Storage::Compute => match half {
                    Some(h) => Storage::Half(h),
                    None => continue,
                },
                keep::Storage::Fp8 {
                    format,
                    tile,
                    scale,
                } => Storage::Fp8 {
                    format: Fp8Format::of(format).expect("the keep plan stores FP8 formats"),
                    tile: tile as usize,
                    rule: scale,
                },
            };
            pack.entry(k.after).or_default().push((k.value, storage));
        }
        pack
    }

    /// Runs the graph; returns the kept values.
    pub fn run<T: Real>(&self, feed: &Feed<T>) -> Result<HashMap<ValueId, Buf<T>>, ExecError> {
        self.run_timed(feed, None)
    }

    /// Runs a decode graph with `caches[i]`, the KV cache input of block `i`
    /// (`InputKind::KvCache`), borrowed (not copied); returns the kept values.
    pub fn run_cached<T: Real>(
        &self,
        feed: &Feed<T>,
        caches: &[impl AsRef<[T]>],
    ) -> Result<HashMap<ValueId, Buf<T>>, ExecError> {
        let caches: Vec<&[T]> = caches.iter().map(AsRef::as_ref).collect();
        self.run_with(feed, &caches, None, None)
    }

    /// Runs the graph, adding each node's wall time to `profile` under its op name when
    /// given; returns the kept values.
    pub fn run_timed<T: Real>(
        &self,
        feed: &Feed<T>,
        profile: Option<&mut HashMap<&'static str, std::time::Duration>>,
    ) -> Result<HashMap<ValueId, Buf<T>>, ExecError> {
        self.run_with(feed, &[], profile, None)
    }

    fn run_with<'f, T: Real>(
        &self,
        feed: &'f Feed<T>,
        caches: &[&'f [T]],
        mut profile: Option<&mut HashMap<&'static str, std::time::Duration>>,
        ep: Option<&ExpertParallel<'_>>,
    ) -> Result<HashMap<ValueId, Buf<T>>, ExecError> {
        let g = self.graph;
        let mut slots: Vec<Option<Slot<T>>> = (0..g.values.len()).map(|_| None).collect();
        for (v, value) in g.values.iter() {
            let want = value.ty.elements() as usize;
            match value.def {
                Def::Input(InputKind::TokenWeights) => {
                    let Some(w) = feed.weights else {
                        return Err(ExecError::Input(
                            "the graph reads token weights, which were not supplied".into(),
                        ));
                    };
                    if w.len() != want {
                        return Err(ExecError::Input(format!(
                            "{} token weights were supplied, the graph needs {want}",
                            w.len()
                        )));
                    }
                    let w = w.iter().map(|&x| T::from_f64(f64::from(x))).collect();
                    slots[v.index()] = Some(Slot::Owned(Buf::F(w)));
                }
                Def::Input(InputKind::KvCache { layer }) => {
                    let cache = caches.get(layer as usize).ok_or_else(|| {
                        ExecError::Input(format!("the KV cache of block {layer} was not supplied"))
                    })?;
                    if cache.len() != want {
                        return Err(ExecError::Input(format!(
                            "the KV cache of block {layer} has {} values, the graph needs {want}",
                            cache.len()
                        )));
                    }
                    slots[v.index()] = Some(Slot::Param(cache));
                }
                Def::Input(kind) => {
                    let Some(data) = feed.inputs.get(&kind) else {
                        // Inputs no node reads (and nobody keeps) may be omitted.
                        if self.last_use[v.index()] == 0
                            && !g.nodes.iter().any(|(_, n)| n.inputs.contains(&v))
                        {
                            continue;
                        }
                        return Err(ExecError::Input(format!(
                            "the graph reads input {kind:?}, which was not supplied"
                        )));
                    };
                    if data.len() != want {
                        return Err(ExecError::Input(format!(
                            "input {kind:?} has {} ids, the graph needs {want}",
                            data.len()
                        )));
                    }
                    slots[v.index()] = Some(Slot::Input(data));
                }
                Def::Param(p) => {
                    // Sharded expert weights hold this rank's experts only.
                    let want = match ep {
                        Some(ep) if self.is_expert_param(p) => want / ep.ranks(),
                        _ => want,
                    };
                    let data = feed.params.get(p.index()).ok_or_else(|| {
                        ExecError::Param(format!(
                            "parameter `{}` was not supplied",
                            g.params[p].name
                        ))
                    })?;
                    if data.len() != want {
                        return Err(ExecError::Param(format!(
                            "parameter `{}` has {} values, the graph needs {want}",
                            g.params[p].name,
                            data.len()
                        )));
                    }
                    slots[v.index()] = Some(Slot::Param(data));
                }
                Def::Node { .. } => {}
            }
        }
        let mut tables: HashMap<(usize, usize), RopeTables<T>> = HashMap::new();
        // What each expert FFN's forward saved for its backward, by forward node.
        let mut saved_experts: HashMap<usize, KeptExperts<T>> = HashMap::new();
        // With sharded experts, what each forward node's exchange keeps, by forward node.
        let mut routed: HashMap<usize, ep::Routed<T>> = HashMap::new();
        for (id, node) in g.nodes.iter() {
            let started = std::time::Instant::now();
            // A node reads packed operands unpacked; the packed copies go back afterwards,
            // unless this node was their last reader.
            let mut aside: Vec<(usize, Packed)> = Vec::new();
            for &v in &node.inputs {
                if let Some(Slot::Packed(p)) =
                    slots[v.index()].take_if(|s| matches!(s, Slot::Packed(_)))
                {
                    slots[v.index()] = Some(Slot::Owned(Buf::F(p.unpack())));
                    aside.push((v.index(), p));
                }
            }
            // A reshape of a value nothing reads afterwards moves its buffer instead of
            // copying it (row-major data does not change).
            if let (Op::Reshape { .. }, [x]) = (&node.op, node.inputs.as_slice()) {
                if self.last_use[x.index()] == id.index() {
                    slots[node.outputs[0].index()] = slots[x.index()].take();
                    if let Some(p) = profile.as_deref_mut() {
                        *p.entry(node.op.name()).or_default() += started.elapsed();
                    }
                    continue;
                }
            }
            let results = match (ep, &node.op) {
                (Some(ep), Op::Experts { .. } | Op::ExpertsGrad { .. }) => self.sharded_experts(
                    id.index(),
                    node,
                    &slots,
                    ep,
                    &mut saved_experts,
                    &mut routed,
                )?,
                _ => self.node(id.index(), node, &slots, &mut tables, &mut saved_experts)?,
            };
            if let Some(p) = profile.as_deref_mut() {
                *p.entry(node.op.name()).or_default() += started.elapsed();
            }
            for (&o, buf) in node.outputs.iter().zip(results) {
                slots[o.index()] = Some(Slot::Owned(buf));
            }
            for &v in &node.inputs {
                if self.last_use[v.index()] == id.index() {
                    slots[v.index()] = None;
                }
            }
            for (v, p) in aside {
                if slots[v].is_some() {
                    slots[v] = Some(Slot::Packed(p));
                }
            }
            for &(v, storage) in self.pack.get(&id.index()).into_iter().flatten() {
                if let Some(Slot::Owned(Buf::F(x))) = &slots[v.index()] {
                    let cols = *g.values[v].ty.shape.last().unwrap_or(&1) as usize;
                    slots[v.index()] = Some(Slot::Packed(Packed::pack(x, cols, storage)));
                }
            }
        }
        let mut out = HashMap::new();
        for ((v, _), slot) in g.values.iter().zip(slots) {
            if let (usize::MAX, Some(slot)) = (self.last_use[v.index()], slot) {
                out.insert(v, slot.into_buf());
            }
        }
        Ok(out)
    }

    fn is_expert_param(&self, p: ParamId) -> bool {
        self.expert_params
            .binary_search_by_key(&p.index(), |q| q.index())
            .is_ok()
    }

    /// The operands of an `experts` or `experts_grad` node, whose weights hold `1 / shards`
    /// of the experts (`e` is the whole layer's count), and where its `dy` operand is.
    fn experts_ffn<'s, T: Real>(
        &self,
        node: &Node,
        slots: &'s [Option<Slot<'s, T>>],
        act: &'s ExprActivation,
        shards: usize,
    ) -> Result<(moe::ExpertFfn<'s, T>, usize), ExecError> {
        let g = self.graph;
        let shape = |i: usize| -> Vec<usize> {
            g.values[node.inputs[i]]
                .ty
                .shape
                .iter()
                .map(|&d| d as usize)
                .collect()
        };
        let arg = |i: usize| {
            slots[node.inputs[i].index()]
                .as_ref()
                .expect("operands are computed before use")
        };
        let gated = moe::Activation::<T>::gated(act);
        let x = shape(0);
        let k = shape(1)[1];
        let up_at = if gated { 4 } else { 3 };
        let up = shape(up_at);
        let (e, h) = (up[0], up[1]);
        let experts = arg(2).ids();
        check_ids(experts, e, &node.path)?;
        debug_assert_eq!(arg(up_at).floats().len(), e / shards * h * x[1]);
        Ok((
            moe::ExpertFfn {
                x: arg(0).floats(),
                n: x[0],
                d: x[1],
                weights: arg(1).floats(),
                experts,
                k,
                w_gate: gated.then(|| arg(3).floats()),
                w_up: arg(up_at).floats(),
                w_down: arg(up_at + 1).floats(),
                e,
                h,
                act,
            },
            up_at,
        ))
    }

    /// An `experts` or `experts_grad` node with its experts sharded over `ep`'s group
    /// ([`crate::ep`]). The exchange's state is always kept for the backward pass (recomputing
    /// would repeat the exchange).
    fn sharded_experts<T: Real>(
        &self,
        index: usize,
        node: &Node,
        slots: &[Option<Slot<T>>],
        ep: &ExpertParallel<'_>,
        saved_experts: &mut HashMap<usize, KeptExperts<T>>,
        routed: &mut HashMap<usize, ep::Routed<T>>,
    ) -> Result<Vec<Buf<T>>, ExecError> {
        let (Op::Experts { act, gated } | Op::ExpertsGrad { act, gated }) = &node.op else {
            unreachable!("called for expert nodes")
        };
        let act = ExprActivation::new(act, *gated);
        let (ffn, up_at) = self.experts_ffn(node, slots, &act, ep.ranks())?;
        let num = &self.gemm_of(index);
        let fail = |e: String| ExecError::Device(format!("{}: {e}", node.path));
        if matches!(node.op, Op::Experts { .. }) {
            let f = ep.forward(&ffn, num).map_err(fail)?;
            if self.experts_forward.values().any(|&i| i == index) {
                let kept = KeptExperts::keep(f.saved, ffn.h, self.experts_storage);
                saved_experts.insert(index, kept);
                routed.insert(index, f.routed);
            }
            return Ok(vec![Buf::F(f.y)]);
        }
        let fwd = self.experts_forward.get(&index);
        let (Some(saved), Some(r)) = (
            fwd.and_then(|i| saved_experts.remove(i)),
            fwd.and_then(|i| routed.remove(i)),
        ) else {
            return Err(fail("the forward pass kept nothing for it".into()));
        };
        let dy = slots[node.inputs[up_at + 2].index()]
            .as_ref()
            .expect("operands are computed before use")
            .floats();
        let g = ep
            .backward(&ffn, &r, &saved.restore(), dy, num)
            .map_err(fail)?;
        Ok(expert_grads(g))
    }

    fn node<T: Real>(
        &self,
        index: usize,
        node: &Node,
        slots: &[Option<Slot<T>>],
        tables: &mut HashMap<(usize, usize), RopeTables<T>>,
        saved_experts: &mut HashMap<usize, KeptExperts<T>>,
    ) -> Result<Vec<Buf<T>>, ExecError> {
        let g = self.graph;
        let arg = |i: usize| {
            slots[node.inputs[i].index()]
                .as_ref()
                .expect("operands are computed before use")
        };
        // How this node's GEMMs (if any) treat their operands.
        let num = &self.gemm_of(index);
        let shape = |i: usize| {
            g.values[node.inputs[i]]
                .ty
                .shape
                .iter()
                .map(|&d| d as usize)
                .collect::<Vec<_>>()
        };
        let out_shape = |i: usize| {
            g.values[node.outputs[i]]
                .ty
                .shape
                .iter()
                .map(|&d| d as usize)
                .collect::<Vec<_>>()
        };
        let f = |v: Vec<T>| Buf::F(v);
        Ok(match &node.op {
            Op::Fill { value, .. } => {
                vec![f(op_fns::fill(*value, out_shape(0).iter().product()))]
            }
            Op::Reshape { .. } => vec![arg(0).to_buf()],
            Op::Map { .. } => {
                let xs: Vec<&[T]> = (0..node.inputs.len()).map(|i| arg(i).floats()).collect();
                vec![f(self.elementwise[&index].forward(&xs))]
            }
            Op::MapGrad { wrt, .. } => {
                let n = node.inputs.len() - 1;
                let xs: Vec<&[T]> = (0..n).map(|i| arg(i).floats()).collect();
                self.elementwise[&index]
                    .backward(&xs, arg(n).floats(), wrt)
                    .into_iter()
                    .map(f)
                    .collect()
            }
            Op::Split { sizes } => {
                let sizes: Vec<usize> = sizes.iter().map(|&s| s as usize).collect();
                op_fns::split(arg(0).floats(), &sizes)
                    .into_iter()
                    .map(f)
                    .collect()
            }
            Op::Concat => {
                let widths: Vec<usize> = (0..node.inputs.len())
                    .map(|i| *shape(i).last().expect("rank ≥ 1"))
                    .collect();
                let xs: Vec<&[T]> = (0..node.inputs.len()).map(|i| arg(i).floats()).collect();
                vec![f(op_fns::concat(&xs, &widths))]
            }
            Op::Expand { axis, n } => {
                let s = shape(0);
                let outer: usize = s[..*axis as usize].iter().product();
                let inner: usize = s[*axis as usize + 1..].iter().product();
                vec![f(op_fns::expand(
                    arg(0).floats(),
                    outer,
                    inner,
                    *n as usize,
                ))]
            }
            Op::SumAxis { axis } => {
                let s = shape(0);
                let outer: usize = s[..*axis as usize].iter().product();
                let inner: usize = s[*axis as usize + 1..].iter().product();
                let len = s[*axis as usize];
                vec![f(op_fns::sum_axis(arg(0).floats(), outer, len, inner))]
            }
            Op::Embedding => {
                let t = shape(0);
                let ids = arg(1).ids();
                vec![f(op_fns::embedding(
                    arg(0).floats(),
                    t[0],
                    t[1],
                    ids,
                    &node.path,
                )?)]
            }
            Op::EmbeddingGrad { vocab } => {
                let d = *shape(1).last().expect("rank ≥ 1");
                vec![f(dense::embedding_bwd(
                    arg(0).ids(),
                    arg(1).floats(),
                    *vocab as usize,
                    d,
                ))]
            }
            Op::Linear { bias } | Op::LinearMap { bias, .. } => {
                let w = shape(1);
                let b = bias.then(|| arg(2).floats());
                let (x, wt) = (arg(0).floats(), arg(1).floats());
                let pre = op_fns::linear_with(x, wt, b, w[0], w[1], num);
                match self.elementwise.get(&index) {
                    // `linear_map`: the activation follows in the same node.
                    Some(act) => {
                        let y = act.forward(&[&pre]);
                        vec![f(pre), f(y)]
                    }
                    None => vec![f(pre)],
                }
            }
            Op::LinearGrad { bias } => {
                let w = shape(1);
                let (x, dy) = (arg(0).floats(), arg(2).floats());
                let r = op_fns::linear_grad_with(x, arg(1).floats(), dy, w[0], w[1], *bias, num);
                let mut v = vec![f(r.dx), f(r.dw)];
                if let Some(db) = r.db {
                    v.push(f(db));
                }
                v
            }
            Op::RmsNorm { eps } => vec![f(norm_fwd(
                NormKind::RmsNorm,
                *eps,
                arg(0).floats(),
                arg(1).floats(),
                None,
            ))],
            Op::LayerNorm { eps } => vec![f(norm_fwd(
                NormKind::LayerNorm,
                *eps,
                arg(0).floats(),
                arg(1).floats(),
                Some(arg(2).floats()),
            ))],
            Op::AddNorm { norm, eps } => {
                let b = (*norm == NormKind::LayerNorm).then(|| arg(3).floats());
                let (x, r, w) = (arg(0).floats(), arg(1).floats(), arg(2).floats());
                let (s, y) = op_fns::add_norm(*norm, *eps, x, r, w, b);
                vec![f(s), f(y)]
            }
            Op::RmsNormGrad { eps } | Op::LayerNormGrad { eps } => {
                let kind = if let Op::LayerNormGrad { .. } = node.op {
                    NormKind::LayerNorm
                } else {
                    NormKind::RmsNorm
                };
                let (x, w, dy) = (arg(0).floats(), arg(1).floats(), arg(2).floats());
                norm_bwd(kind, *eps, x, w, dy).into_iter().map(f).collect()
            }
            Op::AddNormGrad { norm, eps } => {
                let (s, w, dy) = (arg(0).floats(), arg(1).floats(), arg(2).floats());
                op_fns::add_norm_grad(*norm, *eps, s, w, dy, arg(3).floats())
                    .into_iter()
                    .map(f)
                    .collect()
            }
            Op::Rope { theta, yarn, pairs } | Op::RopeGrad { theta, yarn, pairs } => {
                let key = self.rope_key[&index];
                let table = tables
                    .entry(key)
                    .or_insert_with(|| attention::rope_tables(key.0, key.1, *theta, yarn.as_ref()));
                let s = shape(0);
                let p = *pairs;
                let y = if matches!(node.op, Op::Rope { .. }) {
                    attention::rope_fwd(arg(0).floats(), s[0], s[1], s[2], s[3], table, p)
                } else {
                    attention::rope_bwd(arg(0).floats(), s[0], s[1], s[2], s[3], table, p)
                };
                vec![f(y)]
            }
            Op::RopeAt { theta, yarn, pairs } => {
                let key = self.rope_key[&index];
                let table = tables
                    .entry(key)
                    .or_insert_with(|| attention::rope_tables(key.0, key.1, *theta, yarn.as_ref()));
                let positions = arg(1).ids();
                if let Some(&p) = positions.iter().find(|&&p| p as usize >= table.seq) {
                    return Err(ExecError::OutOfRange(format!(
                        "{}: position {p} is beyond the cache's {} positions",
                        node.path, table.seq
                    )));
                }
                let y = attention::rope_at(arg(0).floats(), shape(0)[3], positions, table, *pairs);
                vec![f(y)]
            }
            Op::CachedAttention { scale, layout } => {
                let (q, cache) = (shape(0), shape(2));
                let s = cached_attention::CacheShape {
                    rows: q[0],
                    capacity: cache[1],
                    entry: cache[2],
                    heads: q[2],
                };
                let positions = arg(3).ids();
                if let Some(&p) = positions.iter().find(|&&p| p as usize >= s.capacity) {
                    return Err(ExecError::OutOfRange(format!(
                        "{}: position {p} is beyond the cache's {} slots",
                        node.path, s.capacity
                    )));
                }
                let (qs, entry, cache) = (arg(0).floats(), arg(1).floats(), arg(2).floats());
                let o = match *layout {
                    CacheLayout::Grouped { kv_heads, head_dim } => {
                        cached_attention::cached_attention_grouped(
                            qs,
                            entry,
                            cache,
                            positions,
                            s,
                            kv_heads as usize,
                            head_dim as usize,
                            *scale,
                        )
                    }
                    CacheLayout::Latent {
                        rank,
                        nope,
                        rope,
                        v,
                    } => cached_attention::cached_attention_latent(
                        qs,
                        entry,
                        cache,
                        positions,
                        arg(4).floats(),
                        s,
                        cached_attention::LatentDims {
                            rank: rank as usize,
                            nope: nope as usize,
                            rope: rope as usize,
                            v: v as usize,
                        },
                        *scale,
                    ),
                };
                vec![f(o)]
            }
            Op::Attention { scale } => {
                let (q, k, v) = (shape(0), shape(1), shape(2));
                let (o, lse) = attention::attention_fwd(
                    arg(0).floats(),
                    arg(1).floats(),
                    arg(2).floats(),
                    q[0],
                    q[1],
                    q[2],
                    k[2],
                    q[3],
                    v[3],
                    *scale,
                );
                vec![f(o), f(lse)]
            }
            Op::AttentionGrad { scale } => {
                let (q, k, v) = (shape(0), shape(1), shape(2));
                let (dq, dk, dv) = attention::attention_bwd(
                    arg(0).floats(),
                    arg(1).floats(),
                    arg(2).floats(),
                    arg(3).floats(),
                    arg(4).floats(),
                    arg(5).floats(),
                    q[0],
                    q[1],
                    q[2],
                    k[2],
                    q[3],
                    v[3],
                    *scale,
                );
                vec![f(dq), f(dk), f(dv)]
            }
            Op::Router(spec) => {
                let (x, w) = (shape(0), shape(1));
                let r = moe::router_fwd(
                    arg(0).floats(),
                    x[0],
                    x[1],
                    arg(1).floats(),
                    w[0],
                    arg(2).floats(),
                    &router_config(spec),
                );
                vec![f(r.weights), Buf::U(r.experts), f(r.scores)]
            }
            Op::RouterGrad(spec) => {
                let (x, w) = (shape(0), shape(1));
                let (dx, dw) = op_fns::router_grad(
                    arg(0).floats(),
                    x[0],
                    x[1],
                    arg(1).floats(),
                    w[0],
                    arg(3).floats(),
                    arg(4).ids(),
                    arg(5).floats(),
                    arg(6).floats(),
                    arg(7).floats(),
                    &router_config(spec),
                );
                vec![f(dx), f(dw)]
            }
            Op::Experts { act, gated } | Op::ExpertsGrad { act, gated } => {
                let act = ExprActivation::new(act, *gated);
                let (ffn, up_at) = self.experts_ffn(node, slots, &act, 1)?;
                let h = ffn.h;
                if matches!(node.op, Op::Experts { .. }) {
                    let (y, saved) = moe::experts_fwd_with(&ffn, num);
                    // Keep the routed activations for the backward pass if one follows.
                    if self.keep.experts.binary_search(&index).is_ok() {
                        saved_experts
                            .insert(index, KeptExperts::keep(saved, h, self.experts_storage));
                    }
                    vec![f(y)]
                } else {
                    let saved = match self
                        .experts_forward
                        .get(&index)
                        .and_then(|i| saved_experts.remove(i))
                    {
                        Some(s) => s.restore(),
                        // Recomputed as the forward node computed it.
                        None => {
                            let fwd = self.experts_forward.get(&index);
                            let fwd_num = fwd.map_or(*num, |&i| self.gemm_of(i));
                            moe::experts_fwd_with(&ffn, &fwd_num).1
                        }
                    };
                    let dy = arg(up_at + 2).floats();
                    expert_grads(moe::experts_bwd_with(&ffn, &saved, dy, num))
                }
            }
            Op::CrossEntropy => {
                let l = shape(0);
                let (logits, targets) = (arg(0).floats(), arg(1).ids());
                let loss = match node.inputs.get(2) {
                    None => op_fns::cross_entropy(logits, l[0], l[1], targets, &node.path)?,
                    Some(_) => {
                        let w = arg(2).floats();
                        op_fns::cross_entropy_weighted(logits, l[0], l[1], targets, w, &node.path)?
                    }
                };
                vec![f(vec![loss])]
            }
            Op::CrossEntropyGrad => {
                let l = shape(0);
                let (logits, targets) = (arg(0).floats(), arg(1).ids());
                let dloss = arg(2).floats()[0];
                vec![f(match node.inputs.get(3) {
                    None => op_fns::cross_entropy_grad(logits, l[0], l[1], targets, dloss),
                    Some(_) => {
                        let w = arg(3).floats();
                        op_fns::cross_entropy_weighted_grad(logits, l[0], l[1], targets, w, dloss)
                    }
                })]
            }
            Op::BalanceLoss { alpha, top_k } => {
                let s = shape(0);
                let loss = moe::balance_loss_fwd(
                    arg(0).floats(),
                    arg(1).ids(),
                    s[0],
                    s[1],
                    s[2],
                    *top_k as usize,
                    *alpha,
                );
                vec![f(vec![loss])]
            }
            Op::BalanceLossGrad { alpha, top_k } => {
                let s = shape(0);
                let d = moe::balance_loss_bwd(
                    arg(0).floats(),
                    arg(1).ids(),
                    s[0],
                    s[1],
                    s[2],
                    *top_k as usize,
                    *alpha,
                    arg(2).floats()[0],
                );
                vec![f(d)]
            }
        })
    }
}

/// An `experts_grad` node's outputs: `dx`, `d_weights`, then the weights' gradients.
fn expert_grads<T>(g: moe::ExpertsGrads<T>) -> Vec<Buf<T>> {
    let mut v = vec![Buf::F(g.dx), Buf::F(g.d_weights)];
    v.extend(g.dw_gate.map(Buf::F));
    v.push(Buf::F(g.dw_up));
    v.push(Buf::F(g.dw_down));
    v
}
