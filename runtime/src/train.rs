//! Training on the CPU: parameter initialization, one optimizer step over a full (forward +
//! backward) graph, AdamW with decoupled weight decay, global-norm clipping, the learning-rate
//! schedule, the aux-loss-free router bias update, and validation loss.
//!
//! The runtime does not read specs: it trains a compiled [`Program`], and [`TrainConfig`]
//! comes from the Program's settings.

use std::collections::HashMap;

use kiln_ir::attrs::ScheduleKind;
use kiln_ir::ir::{Def, Graph, Init, InputKind, ParamId, Update, ValueId};
use kiln_ir::program::{Program, Settings, TrainOutputs};

use rayon::prelude::*;

use crate::cpu::moe;
use crate::data::{Batch, Rng};
use crate::ep::{Exchange, ExpertParallel};
use crate::exec::{AdamSettings, Buf, ExecError, Executor, Feed, KeptBytes, Run, StepScalars};
use crate::numerics::store::Half;
use crate::numerics::Emulation;

/// Optimizer and schedule settings (the spec's `[train]` and `[moe] bias_update`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub steps: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Cosine decay to `min_lr` after warmup when true; constant `lr` otherwise.
    pub cosine: bool,
    pub min_lr: f64,
    /// Global gradient-norm clip; `None` disables clipping.
    pub grad_clip: Option<f64>,
    /// Aux-loss-free balancing speed γ.
    pub bias_update: f64,
    pub seed: u64,
    /// Emulate the spec's precision policy (GEMM formats, FP8 scaling, moment storage);
    /// `None` trains in f32 throughout.
    pub emulate: Option<Emulation>,
}

impl TrainConfig {
    /// A Program's optimizer, schedule, clipping and balancing speed
    /// ([`Program::settings`]), for `steps` steps from `seed`.
    pub fn of(settings: &Settings, steps: u64, seed: u64) -> TrainConfig {
        let (o, s) = (&settings.optimizer, &settings.schedule);
        TrainConfig {
            steps,
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            warmup: s.warmup,
            cosine: s.kind == ScheduleKind::Cosine,
            min_lr: s.min_lr,
            grad_clip: settings.grad_clip,
            bias_update: settings.bias_update,
            seed,
            emulate: None,
        }
    }

    /// The same settings, emulating the precision policy of `settings`.
    pub fn emulating(self, settings: &Settings) -> TrainConfig {
        TrainConfig {
            emulate: Some(Emulation::of(&settings.formats)),
            ..self
        }
    }

    /// The learning rate at 0-based `step`. Warmup rises linearly to `lr` at its last step
    /// (the first step without warmup); the cosine then falls from that peak to `min_lr` at
    /// the run's last step, `steps - 1`. A run shorter than its warmup ends inside it.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        if !self.cosine {
            return self.lr;
        }
        let peak = self.warmup.saturating_sub(1);
        let span = self.steps.saturating_sub(1).saturating_sub(peak).max(1) as f64;
        let progress = ((step - peak) as f64 / span).min(1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// A standard normal sample (Box–Muller on the runtime's PRNG).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Initial values of every parameter of `graph`, in parameter order, deterministic in `seed`.
pub fn init_params(graph: &Graph, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::with_stream(seed, 7);
    graph
        .params
        .iter()
        .map(|(_, p)| {
            let n = p.ty.elements() as usize;
            match p.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal { std } => (0..n).map(|_| (normal(&mut rng) * std) as f32).collect(),
            }
        })
        .collect()
}

/// The per-step constants of AdamW.
struct AdamStep {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`, the bias corrections.
    bias1: f64,
    bias2: f64,
    /// Factor from global-norm clipping (1 when not clipping).
    clip: f64,
}

impl AdamStep {
    /// AdamW on one tensor: moments from the clipped gradient, then the bias-corrected step
    /// plus decoupled weight decay `decay · w`. The moments are stored in their format; the
    /// step itself uses them as computed, before storing.
    fn apply(&self, w: &mut [f32], m: &mut Moment, v: &mut Moment, grad: &[f32], decay: f64) {
        match (m, v) {
            (Moment::F32(m), Moment::F32(v)) => {
                self.update(w, m, v, grad, decay, |x| x as f32, f64::from)
            }
            (Moment::Half(h, m), Moment::Half(_, v)) => {
                let h = *h;
                let store = move |x: f64| h.encode(x as f32);
                let load = move |b: u16| f64::from(h.decode(b));
                self.update(w, m, v, grad, decay, store, load)
            }
            _ => unreachable!("a tensor's two moments share one format"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn update<E: Copy + Send + Sync>(
        &self,
        w: &mut [f32],
        m: &mut [E],
        v: &mut [E],
        grad: &[f32],
        decay: f64,
        store: impl Fn(f64) -> E + Sync,
        load: impl Fn(E) -> f64 + Sync,
    ) {
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| {
                for i in 0..w.len() {
                    let gi = f64::from(g[i]) * self.clip;
                    let mi = self.beta1 * load(m[i]) + (1.0 - self.beta1) * gi;
                    let vi = self.beta2 * load(v[i]) + (1.0 - self.beta2) * gi * gi;
                    (m[i], v[i]) = (store(mi), store(vi));
                    let step = (mi / self.bias1) / ((vi / self.bias2).sqrt() + self.eps);
                    w[i] = (f64::from(w[i]) - self.lr * (step + decay * f64::from(w[i]))) as f32;
                }
            });
    }
}

/// One tensor's AdamW moment in its storage format: f32, or 16-bit floats when the policy
/// says so (`precision.moments`, under emulation), which halves the optimizer's memory.
#[derive(Clone, Debug, PartialEq)]
enum Moment {
    F32(Vec<f32>),
    Half(Half, Vec<u16>),
}

impl Moment {
    /// `values` stored in `format` (16-bit formats round to nearest even).
    fn stored(values: Vec<f32>, format: Option<Half>) -> Moment {
        match format {
            None => Moment::F32(values),
            Some(h) => Moment::Half(h, values.iter().map(|&x| h.encode(x)).collect()),
        }
    }

    fn values(&self) -> Vec<f32> {
        match self {
            Moment::F32(v) => v.clone(),
            Moment::Half(h, bits) => bits.iter().map(|&b| h.decode(b)).collect(),
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The loss the step descends: `main_loss + mtp.weight × mtp_loss + balance_loss`.
    pub loss: f64,
    pub main_loss: f64,
    /// The mean of the multi-token-prediction depths' cross-entropies, with MTP.
    pub mtp_loss: Option<f64>,
    /// The sum of the MoE layers' sequence-wise balance losses (scaled by `moe.seq_aux`, as
    /// the total adds them), with that loss on.
    pub balance_loss: Option<f64>,
    pub grad_norm: f64,
    pub lr: f64,
    /// The loss or the gradient norm was not finite, so nothing was updated (the step
    /// counter included); the caller decides whether to go on.
    pub skipped: bool,
}

/// Data-parallel training: each of `ranks()` processes runs the step on its share of the
/// batch's rows, and the trainer combines their gradients, losses and expert loads before the
/// update, so every rank applies the same update to the same parameters.
pub trait Collectives {
    fn ranks(&self) -> usize;
    fn rank(&self) -> usize;
    /// Sums `data` over the ranks in place, with the same bits on every rank.
    fn sum_f32(&self, data: &mut [f32]) -> Result<(), String>;
    /// Sums `data` over the ranks and returns this rank's chunk of the sum
    /// ([`crate::mpi::chunk`]), added in rank order: a reduce-scatter.
    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, String>;
    /// Fills `data` with every rank's `mine`, each at its chunk: an all-gather.
    fn all_gather_f32(&self, mine: &[f32], data: &mut [f32]) -> Result<(), String>;
    /// Sums a few values over the ranks in place.
    fn sum_f64(&self, data: &mut [f64]) -> Result<(), String>;
    /// Bytes this rank has sent so far.
    fn traffic(&self) -> crate::mpi::Traffic;
}

impl Collectives for crate::mpi::Mpi {
    fn ranks(&self) -> usize {
        self.size()
    }

    fn rank(&self) -> usize {
        crate::mpi::Mpi::rank(self)
    }

    fn sum_f32(&self, data: &mut [f32]) -> Result<(), String> {
        crate::mpi::Mpi::sum_f32(self, data).map_err(|e| e.to_string())
    }

    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, String> {
        crate::mpi::Mpi::reduce_scatter_f32(self, data).map_err(|e| e.to_string())
    }

    fn all_gather_f32(&self, mine: &[f32], data: &mut [f32]) -> Result<(), String> {
        crate::mpi::Mpi::all_gather_f32(self, mine, data).map_err(|e| e.to_string())
    }

    fn sum_f64(&self, data: &mut [f64]) -> Result<(), String> {
        crate::mpi::Mpi::sum_f64(self, data).map_err(|e| e.to_string())
    }

    fn traffic(&self) -> crate::mpi::Traffic {
        crate::mpi::Mpi::traffic(self)
    }
}

/// ZeRO stage 1: which part of each trainable parameter this rank updates and keeps AdamW
/// moments for. The trainable parameters, laid end to end in gradient order, are cut into
/// one chunk per rank ([`crate::mpi::chunk`]).
#[derive(Clone, Debug)]
struct Shard {
    /// Per parameter (by index): the range of its elements this rank owns (empty if none).
    owned: Vec<std::ops::Range<usize>>,
}

impl Shard {
    /// This rank's part of each parameter's moments.
    fn cut(&self, moments: &[Moment]) -> Vec<Moment> {
        moments
            .iter()
            .zip(&self.owned)
            .map(|(m, r)| match m {
                Moment::F32(v) => Moment::F32(v[r.clone()].to_vec()),
                Moment::Half(h, v) => Moment::Half(*h, v[r.clone()].to_vec()),
            })
            .collect()
    }
}

/// A training run's state: parameters, AdamW moments and the step counter.
pub struct Trainer<'g> {
    graph: &'g Graph,
    /// What runs the training graph: the interpreter, or a module generated from it.
    exec: Box<dyn Run + 'g>,
    pub config: TrainConfig,
    /// The parameters as of the last [`Trainer::sync`] (see [`Trainer::params`]).
    params: Vec<Vec<f32>>,
    m: Vec<Moment>,
    v: Vec<Moment>,
    pub step: u64,
    /// The runner updates the state on its device ([`Resident`]): the config's AdamW settings
    /// are the ones its optimizer was built with, and the moments are f32.
    resident: bool,
    /// The device holds the state (put there before the first step, and after a restore).
    on_device: bool,
    /// The device's state is newer than `params`, `m` and `v`.
    host_stale: bool,
    loss: ValueId,
    main_loss: ValueId,
    mtp: Vec<ValueId>,
    balance: Vec<ValueId>,
    /// `(param, gradient value)` for every trainable parameter.
    grads: Vec<(ParamId, ValueId)>,
    /// `(router bias param, experts value, number of experts)` for the balancing update.
    routers: Vec<(ParamId, ValueId, usize)>,
    /// Largest token offset the graph reads.
    max_offset: u32,
    positions: bool,
    /// Set for data-parallel training ([`Trainer::data_parallel`]).
    collectives: Option<&'g dyn Collectives>,
    /// Set when the optimizer state is sharded over the ranks ([`Trainer::zero_1`]).
    shard: Option<Shard>,
    /// Micro-batches a step's rows are cut into ([`Trainer::accumulating`]).
    micro_batches: usize,
    /// Set when the routed experts are sharded over a group of ranks
    /// ([`Trainer::expert_parallel`]).
    experts: Option<Experts<'g>>,
}

/// Expert parallelism's state in a trainer.
struct Experts<'g> {
    /// The ranks that share one copy of the experts, each holding a block of every layer's.
    group: &'g dyn Exchange,
    exchange: ExpertParallel<'g>,
    /// The ranks holding the same block as this one, over which its gradients are reduced.
    replicas: &'g dyn Collectives,
    /// Per parameter (by index): one of the routed experts' weights, held as this rank's
    /// block ([`crate::mpi::chunk`] of the whole tensor).
    sharded: Vec<bool>,
}

/// Gradients reduced together over the ranks of `comm`: every trainable parameter, or with
/// expert parallelism, the routed experts' (over their replicas) and the others (over every
/// rank).
struct Group<'a> {
    grads: Vec<(ParamId, ValueId)>,
    comm: &'a dyn Collectives,
    /// The experts' group, whose blocks together make the whole tensors.
    blocks: bool,
}

/// The inputs of one step: token windows of `seq_len + max_offset` per row, cut into the
/// shifted views the graph reads.
pub fn feed_inputs(graph: &Graph, batch: &Batch, seq_len: usize) -> HashMap<InputKind, Vec<u32>> {
    let rows = batch.inputs.len() / batch.seq_len;
    let mut out = HashMap::new();
    for (_, value) in graph.values.iter() {
        let Def::Input(kind) = value.def else {
            continue;
        };
        let data = match kind {
            InputKind::Tokens { offset } => {
                let o = offset as usize;
                let mut ids = Vec::with_capacity(rows * seq_len);
                for r in 0..rows {
                    let row = &batch.inputs[r * batch.seq_len..(r + 1) * batch.seq_len];
                    let last = batch.targets[(r + 1) * batch.seq_len - 1];
                    for i in 0..seq_len {
                        ids.push(row.get(i + o).copied().unwrap_or(last));
                    }
                }
                ids
            }
            InputKind::Positions => (0..rows).flat_map(|_| 0..seq_len as u32).collect(),
            // Float data: the caller's `Feed::weights` and a decoder's caches.
            InputKind::TokenWeights | InputKind::KvCache { .. } => continue,
        };
        out.insert(kind, data);
    }
    out
}

/// The largest token offset a graph reads (1 for plain next-token training, more with MTP).
pub fn max_token_offset(graph: &Graph) -> u32 {
    graph
        .values
        .iter()
        .filter_map(|(_, v)| match v.def {
            Def::Input(InputKind::Tokens { offset }) => Some(offset),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

impl<'g> Trainer<'g> {
    /// A trainer for `program`, a training graph (the output of `autodiff::differentiate`:
    /// it must have `loss`, `loss.main` and one `grad.<param>` output per trainable parameter).
    pub fn new(program: &'g Program, config: TrainConfig, params: Vec<Vec<f32>>) -> Self {
        let keep = TrainOutputs::of(program.graph())
            .expect("a training graph has losses")
            .values();
        let exec = Executor::new(program, &keep);
        let exec = match &config.emulate {
            Some(e) => exec.emulating(e),
            None => exec,
        };
        Trainer::with_runner(program, config, params, Box::new(exec))
    }

    /// A trainer whose graph runs on `runner` instead of the interpreter: a module generated
    /// from the same graph (`kiln::model!`), which must keep [`TrainOutputs::values`].
    pub fn with_runner(
        program: &'g Program,
        config: TrainConfig,
        params: Vec<Vec<f32>>,
        runner: Box<dyn Run + 'g>,
    ) -> Self {
        let graph = program.graph();
        let outputs = TrainOutputs::of(graph).expect("a training graph has losses");
        let TrainOutputs {
            loss,
            main_loss,
            mtp,
            balance,
            grads,
            routers,
        } = outputs;
        let format = config.emulate.as_ref().and_then(|e| Half::of(e.moments));
        let zeros: Vec<Moment> = params
            .iter()
            .map(|p| Moment::stored(vec![0.0; p.len()], format))
            .collect();
        let positions = graph
            .values
            .iter()
            .any(|(_, v)| v.def == Def::Input(InputKind::Positions));
        let resident = runner.resident().is_some_and(|r| {
            let c = &config;
            r.settings()
                == AdamSettings {
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                    grad_clip: c.grad_clip,
                    bias_update: c.bias_update,
                }
                && format.is_none()
        });
        Trainer {
            resident,
            on_device: false,
            host_stale: false,
            exec: runner,
            graph,
            config,
            m: zeros.clone(),
            v: zeros,
            params,
            step: 0,
            loss,
            main_loss,
            mtp,
            balance,
            grads,
            routers,
            max_offset: max_token_offset(graph),
            positions,
            collectives: None,
            shard: None,
            micro_batches: 1,
            experts: None,
        }
    }

    /// The gradient reduction groups of a parallel step (see [`Group`]).
    fn groups(&self) -> Vec<Group<'g>> {
        let Some(world) = self.collectives else {
            return Vec::new();
        };
        match &self.experts {
            None => vec![Group {
                grads: self.grads.clone(),
                comm: world,
                blocks: false,
            }],
            Some(x) => {
                let (experts, others): (Vec<_>, Vec<_>) =
                    self.grads.iter().partition(|(p, _)| x.sharded[p.index()]);
                vec![
                    Group {
                        grads: others,
                        comm: world,
                        blocks: false,
                    },
                    Group {
                        grads: experts,
                        comm: x.replicas,
                        blocks: true,
                    },
                ]
            }
        }
    }

    /// Expert parallelism: the routed experts of every MoE layer are sharded over `group`'s
    /// ranks ([`crate::ep`]), this rank keeping only its block of their weights and moments.
    /// Their gradients are reduced over `replicas` (the ranks holding the same block; the
    /// data-parallel degree), everything else over every rank. Call after
    /// [`Trainer::data_parallel`] (over every rank) and before [`Trainer::zero_1`] and
    /// [`Trainer::restore`], which both take whole tensors.
    pub fn expert_parallel(
        mut self,
        group: &'g dyn Exchange,
        replicas: &'g dyn Collectives,
    ) -> Self {
        assert!(
            self.collectives.is_some() && self.shard.is_none(),
            "expert parallelism follows data_parallel and precedes zero_1"
        );
        let mut sharded = vec![false; self.params.len()];
        for p in crate::ep::expert_params(self.graph) {
            sharded[p.index()] = true;
        }
        let x = Experts {
            group,
            exchange: ExpertParallel::new(group),
            replicas,
            sharded,
        };
        self.params = x.blocks(std::mem::take(&mut self.params));
        let cut = |m: &[Moment]| -> Vec<Moment> {
            m.iter()
                .zip(&x.sharded)
                .map(|(m, &s)| match (m, s) {
                    (m, false) => m.clone(),
                    (Moment::F32(v), true) => Moment::F32(x.block(v).to_vec()),
                    (Moment::Half(h, v), true) => Moment::Half(*h, x.block(v).to_vec()),
                })
                .collect()
        };
        self.m = cut(&self.m);
        self.v = cut(&self.v);
        self.experts = Some(x);
        self
    }

    /// The routed rows this rank's expert exchanges moved to or from other ranks since the
    /// last call (forward; the backward moves as many again), with expert parallelism.
    pub fn take_moved_rows(&self) -> Option<u64> {
        self.experts.as_ref().map(|x| x.exchange.take_moved())
    }

    /// Makes each step data-parallel over `c`'s ranks: this trainer runs on its rank's rows
    /// (the Program's batch is the per-rank batch), and gradients, losses and expert loads are
    /// averaged (loads summed) over the ranks before the update. The runner must update on
    /// the host.
    pub fn data_parallel(mut self, c: &'g dyn Collectives) -> Self {
        assert!(
            !self.resident,
            "data-parallel training updates on the host; a resident runner cannot take part"
        );
        self.collectives = Some(c);
        self
    }

    /// Updates on the host even where the runner could keep the state on its device: what
    /// data parallelism and gradient accumulation need, as they combine gradients first.
    pub fn updating_on_host(mut self) -> Self {
        self.resident = false;
        self
    }

    /// Gradient accumulation: each step cuts its rows into `k` equal micro-batches and runs
    /// the graph (whose batch is then one micro-batch) on each in turn, averaging their
    /// gradients and losses before one update. The runner must update on the host.
    pub fn accumulating(mut self, k: usize) -> Self {
        assert!(
            !self.resident || k == 1,
            "gradient accumulation updates on the host; a resident runner cannot accumulate"
        );
        self.micro_batches = k.max(1);
        self
    }

    /// ZeRO stage 1 over the data-parallel ranks: each rank keeps the AdamW moments of its
    /// chunk of the trainable parameters only. A step reduce-scatters the gradients (each
    /// rank gets its chunk's sums), updates its chunk, and all-gathers the parameters, so
    /// every rank ends the step with the same parameters as without sharding, having sent
    /// the same bytes as an all-reduce. Call after [`Trainer::data_parallel`], before
    /// [`Trainer::restore`].
    pub fn zero_1(mut self) -> Self {
        assert!(
            self.collectives.is_some(),
            "ZeRO-1 shards over the data-parallel ranks"
        );
        let mut owned = vec![0..0; self.params.len()];
        for group in self.groups() {
            let c = group.comm;
            let total: usize = group
                .grads
                .iter()
                .map(|&(p, _)| self.params[p.index()].len())
                .sum();
            let mine = crate::mpi::chunk(total, c.rank(), c.ranks());
            let mut at = 0;
            for &(p, _) in &group.grads {
                let len = self.params[p.index()].len();
                let (lo, hi) = (mine.start.clamp(at, at + len), mine.end.clamp(at, at + len));
                owned[p.index()] = lo - at..hi - at;
                at += len;
            }
        }
        let shard = Shard { owned };
        self.m = shard.cut(&self.m);
        self.v = shard.cut(&self.v);
        self.shard = Some(shard);
        self
    }

    /// The parameters, in parameter order (read back from the device first when it updates
    /// them); with expert parallelism, the routed experts' are this rank's blocks
    /// ([`Trainer::whole_params`] gathers them).
    pub fn params(&mut self) -> Result<&[Vec<f32>], ExecError> {
        self.sync()?;
        Ok(&self.params)
    }

    /// The AdamW moments' values (a copy), in parameter order (read back from the device
    /// first when it updates them).
    ///
    /// With the state sharded ([`Trainer::zero_1`], [`Trainer::expert_parallel`]) the moments
    /// are gathered whole from every rank: every rank must call this at the same step.
    #[allow(clippy::type_complexity)]
    pub fn moments(&mut self) -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>), ExecError> {
        self.sync()?;
        let (m, v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            self.m.iter().map(Moment::values).collect(),
            self.v.iter().map(Moment::values).collect(),
        );
        let (m, v) = match self.shard {
            Some(_) => (self.gather(&m)?, self.gather(&v)?),
            None => (m, v),
        };
        Ok((self.whole(m)?, self.whole(v)?))
    }

    /// The parameters as whole tensors: with expert parallelism, the routed experts' blocks
    /// are gathered from the expert group, so every rank of it must call this at the same
    /// step; otherwise a copy of [`Trainer::params`].
    pub fn whole_params(&mut self) -> Result<Vec<Vec<f32>>, ExecError> {
        self.sync()?;
        self.whole(self.params.clone())
    }

    /// `values` (per parameter, the routed experts' as this rank's blocks) with the experts'
    /// blocks gathered into whole tensors.
    fn whole(&self, mut values: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, ExecError> {
        let Some(x) = &self.experts else {
            return Ok(values);
        };
        let mine: Vec<f32> = values
            .iter()
            .zip(&x.sharded)
            .filter(|(_, &s)| s)
            .flat_map(|(v, _)| v.iter().copied())
            .collect();
        let n = x.group.ranks();
        let mut all = vec![0f32; mine.len() * n];
        x.group
            .all_gather_f32(&mine, &mut all)
            .map_err(|e| ExecError::Device(format!("gathering the experts' blocks: {e}")))?;
        let mut at = 0;
        for (v, _) in values.iter_mut().zip(&x.sharded).filter(|(_, &s)| s) {
            let len = v.len();
            *v = (0..n)
                .flat_map(|j| {
                    all[j * mine.len() + at..j * mine.len() + at + len]
                        .iter()
                        .copied()
                })
                .collect();
            at += len;
        }
        Ok(values)
    }

    /// Every rank's owned parts of per-parameter values, gathered into the values this rank
    /// holds unsharded (those without gradients are zeros, as their unsharded moments are).
    fn gather(&self, parts: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ExecError> {
        let mut whole: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        for group in self.groups() {
            let flat = self.gather_owned(&group, |p| &parts[p], "the optimizer state")?;
            let mut at = 0;
            for &(p, _) in &group.grads {
                let len = self.params[p.index()].len();
                whole[p.index()] = flat[at..at + len].to_vec();
                at += len;
            }
        }
        Ok(whole)
    }

    /// A group's trainable parameters' values laid end to end in gradient order, gathered
    /// from every rank's owned part (`part(p)` is this rank's part of parameter `p`).
    fn gather_owned<'a>(
        &self,
        group: &Group<'_>,
        part: impl Fn(usize) -> &'a [f32],
        what: &str,
    ) -> Result<Vec<f32>, ExecError> {
        let mine: Vec<f32> = group
            .grads
            .iter()
            .flat_map(|&(p, _)| part(p.index()).iter().copied())
            .collect();
        let total: usize = group
            .grads
            .iter()
            .map(|&(p, _)| self.params[p.index()].len())
            .sum();
        let mut flat = vec![0f32; total];
        group
            .comm
            .all_gather_f32(&mine, &mut flat)
            .map_err(|e| ExecError::Device(format!("gathering {what}: {e}")))?;
        Ok(flat)
    }

    /// Whether the runner's device updates the parameters (the plan's optimizer launches),
    /// rather than this trainer on the host.
    pub fn updates_on_device(&self) -> bool {
        self.resident
    }

    /// Reads the state back from the device when it is newer there.
    pub fn sync(&mut self) -> Result<(), ExecError> {
        if !self.host_stale {
            return Ok(());
        }
        let r = self
            .exec
            .resident()
            .expect("a stale host copy has a resident runner");
        let (mut m, mut v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            self.m.iter().map(Moment::values).collect(),
            self.v.iter().map(Moment::values).collect(),
        );
        r.get_state(&mut self.params, &mut m, &mut v)?;
        self.m = m.into_iter().map(Moment::F32).collect();
        self.v = v.into_iter().map(Moment::F32).collect();
        self.host_stale = false;
        Ok(())
    }

    /// Bytes of the activations a step packs for the backward pass, as its runner keeps
    /// them (see [`Run::kept_bytes`]).
    pub fn kept_bytes(&self) -> Option<KeptBytes> {
        self.exec.kept_bytes()
    }

    /// Bytes the AdamW moments hold.
    pub fn moment_bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .map(|m| match m {
                Moment::F32(v) => 4 * v.len(),
                Moment::Half(_, v) => 2 * v.len(),
            })
            .sum()
    }

    /// Continues from a checkpointed state: step count, parameters and moments.
    pub fn restore(
        &mut self,
        step: u64,
        params: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) {
        self.step = step;
        self.params = match &self.experts {
            Some(x) => x.blocks(params),
            None => params,
        };
        // The device's copy, if any, is replaced before the next step.
        self.on_device = false;
        self.host_stale = false;
        let format = self
            .config
            .emulate
            .as_ref()
            .and_then(|e| Half::of(e.moments));
        let (m, v) = match &self.experts {
            Some(x) => (x.blocks(m), x.blocks(v)),
            None => (m, v),
        };
        self.m = m.into_iter().map(|m| Moment::stored(m, format)).collect();
        self.v = v.into_iter().map(|v| Moment::stored(v, format)).collect();
        if let Some(shard) = &self.shard {
            self.m = shard.cut(&self.m);
            self.v = shard.cut(&self.v);
        }
    }

    /// The window length a batch row must have: `seq_len + max_offset - 1` inputs (the batcher
    /// adds the one shifted target).
    pub fn window(&self, seq_len: usize) -> usize {
        seq_len + self.max_offset as usize - 1
    }

    /// Whether the graph reads positions (learned position embeddings).
    pub fn reads_positions(&self) -> bool {
        self.positions
    }

    /// One optimizer step on `batch` (rows of [`Trainer::window`] tokens).
    pub fn step(&mut self, batch: &Batch, seq_len: usize) -> Result<StepStats, ExecError> {
        self.step_weighted(batch, seq_len, None)
    }

    /// [`Trainer::step`] for a graph whose loss weighs its target tokens
    /// (`InputKind::TokenWeights`, `[rows, seq_len]`): a policy-gradient step.
    pub fn step_weighted(
        &mut self,
        batch: &Batch,
        seq_len: usize,
        weights: Option<&[f32]>,
    ) -> Result<StepStats, ExecError> {
        if self.resident && !self.on_device {
            let r = self.exec.resident().expect("checked when built");
            let (m, v) = (
                self.m.iter().map(Moment::values).collect::<Vec<_>>(),
                self.v.iter().map(Moment::values).collect::<Vec<_>>(),
            );
            r.put_state(&self.params, &m, &v)?;
            self.on_device = true;
        }
        // With gradient accumulation, the graph runs on each micro-batch of rows in turn;
        // gradients and losses are summed, then averaged (every micro-batch has as many rows,
        // so the mean of their means is the batch's), and the experts' loads summed.
        let k = self.micro_batches;
        let micro: Vec<Batch> = if k > 1 {
            let part = batch.rows / k;
            (0..k).map(|i| batch.rows_range(i * part, part)).collect()
        } else {
            Vec::new()
        };
        let parts: Vec<&Batch> = if k > 1 {
            micro.iter().collect()
        } else {
            vec![batch]
        };
        let mut out: Option<HashMap<ValueId, Buf<f32>>> = None;
        let mut losses = [0f64; 4];
        let mut loads: Vec<Vec<u64>> = self.routers.iter().map(|&(_, _, e)| vec![0; e]).collect();
        for part in parts {
            let inputs = feed_inputs(self.graph, part, seq_len);
            let feed = Feed {
                params: &self.params,
                inputs: &inputs,
                weights,
            };
            let o = match &self.experts {
                Some(x) => self.exec.run_experts(&feed, &x.exchange)?,
                None => self.exec.run(&feed)?,
            };
            let scalar = |v: ValueId| f64::from(o[&v].floats()[0]);
            // The total, the main loss, then the other terms summed: the MTP depths, the
            // balance.
            let sum = |vs: &[ValueId]| vs.iter().map(|&v| scalar(v)).sum::<f64>();
            let these = [
                scalar(self.loss),
                scalar(self.main_loss),
                sum(&self.mtp),
                sum(&self.balance),
            ];
            for (l, x) in losses.iter_mut().zip(these) {
                *l += x;
            }
            for (load, &(_, experts, e)) in loads.iter_mut().zip(&self.routers) {
                if let Buf::U(ids) = &o[&experts] {
                    for (n, m) in load.iter_mut().zip(moe::expert_load(ids, e)) {
                        *n += m;
                    }
                }
            }
            match &mut out {
                None => out = Some(o),
                Some(acc) => {
                    for &(_, g) in &self.grads {
                        if let (Some(Buf::F(a)), Buf::F(b)) = (acc.get_mut(&g), &o[&g]) {
                            for (x, &y) in a.iter_mut().zip(b) {
                                *x += y;
                            }
                        }
                    }
                }
            }
        }
        let mut out = out.expect("a batch has at least one micro-batch");
        if k > 1 {
            let scale = 1.0 / k as f32;
            for l in &mut losses {
                *l /= k as f64;
            }
            for &(_, g) in &self.grads {
                if let Some(Buf::F(v)) = out.get_mut(&g) {
                    for x in v.iter_mut() {
                        *x *= scale;
                    }
                }
            }
        }
        let groups = self.groups();
        // Per group, this rank's chunk of the reduced gradients, when the optimizer state is
        // sharded.
        let mut sharded: Vec<Vec<f32>> = Vec::new();
        let fail = |e: String| ExecError::Device(format!("data-parallel reduction: {e}"));
        if let Some(c) = self.collectives {
            // Each rank's gradients and losses are means over its rows: their mean over the
            // ranks is the mean over the whole batch. (An expert's gradient on its owner sums
            // every source's, so its replicas' sum is the same sum.)
            let scale = 1.0 / c.ranks() as f32;
            for group in &groups {
                // One reduction over the group's gradients, laid end to end: all of it, or
                // with the optimizer state sharded only this rank's chunk.
                let mut flat: Vec<f32> = Vec::new();
                for &(_, g) in &group.grads {
                    flat.extend_from_slice(out[&g].floats());
                }
                if self.shard.is_some() {
                    let mut mine = group.comm.reduce_scatter_f32(&flat).map_err(fail)?;
                    for x in &mut mine {
                        *x *= scale;
                    }
                    sharded.push(mine);
                } else {
                    group.comm.sum_f32(&mut flat).map_err(fail)?;
                    let mut at = 0;
                    for &(_, g) in &group.grads {
                        if let Some(Buf::F(v)) = out.get_mut(&g) {
                            for (x, &y) in v.iter_mut().zip(&flat[at..]) {
                                *x = y * scale;
                            }
                            at += v.len();
                        }
                    }
                }
            }
            let mut scalars = losses.to_vec();
            for l in &loads {
                scalars.extend(l.iter().map(|&n| n as f64));
            }
            c.sum_f64(&mut scalars).map_err(fail)?;
            for (x, &y) in losses.iter_mut().zip(&scalars) {
                *x = y / c.ranks() as f64;
            }
            let mut at = losses.len();
            for l in &mut loads {
                for n in l.iter_mut() {
                    *n = scalars[at].round() as u64;
                    at += 1;
                }
            }
        }
        let [loss, main_loss, mtp_sum, balance_sum] = losses;
        let mtp_loss = (!self.mtp.is_empty()).then(|| mtp_sum / self.mtp.len() as f64);
        let balance_loss = (!self.balance.is_empty()).then_some(balance_sum);
        if self.resident {
            let c = &self.config;
            let lr = c.lr_at(self.step);
            let t = (self.step + 1) as i32;
            let scalars = StepScalars {
                lr,
                bias1: 1.0 - c.beta1.powi(t),
                bias2: 1.0 - c.beta2.powi(t),
            };
            let r = self.exec.resident().expect("checked when built");
            let (grad_norm, skipped) = r.optimizer_step(scalars, loss.is_finite())?;
            if !skipped {
                self.host_stale = true;
                self.step += 1;
            }
            return Ok(StepStats {
                loss,
                main_loss,
                mtp_loss,
                balance_loss,
                grad_norm,
                lr,
                skipped,
            });
        }

        let square_sum = |xs: &[f32]| xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        let sq: f64 = if groups.is_empty() {
            self.grads
                .par_iter()
                .map(|&(_, g)| square_sum(out[&g].floats()))
                .collect::<Vec<f64>>()
                .iter()
                .sum()
        } else {
            let mut total = 0.0;
            for (i, group) in groups.iter().enumerate() {
                let mut sq = match sharded.get(i) {
                    // Each rank's chunk's sum of squares, added over the group.
                    Some(mine) => {
                        let mut sq = [square_sum(mine)];
                        group.comm.sum_f64(&mut sq).map_err(fail)?;
                        sq[0]
                    }
                    None => group
                        .grads
                        .par_iter()
                        .map(|&(_, g)| square_sum(out[&g].floats()))
                        .collect::<Vec<f64>>()
                        .iter()
                        .sum(),
                };
                // The experts' blocks of one copy, added over the expert group.
                if let (true, Some(x)) = (group.blocks, &self.experts) {
                    let mut s = [sq];
                    x.group.sum_f64(&mut s).map_err(fail)?;
                    sq = s[0];
                }
                total += sq;
            }
            total
        };
        let grad_norm = sq.sqrt();
        if !(loss.is_finite() && grad_norm.is_finite()) {
            return Ok(StepStats {
                loss,
                main_loss,
                mtp_loss,
                balance_loss,
                grad_norm,
                lr: self.config.lr_at(self.step),
                skipped: true,
            });
        }
        let clip = match self.config.grad_clip {
            Some(c) if grad_norm > c => c / grad_norm,
            _ => 1.0,
        };
        let c = &self.config;
        let lr = c.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let hyper = AdamStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            clip,
        };
        // Parameters are disjoint, so they update in parallel; within one tensor, elements
        // update in chunks. The result does not depend on the thread count.
        let graph = self.graph;
        let grads: HashMap<usize, &[f32]> = self
            .grads
            .iter()
            .map(|&(p, g)| (p.index(), out[&g].floats()))
            .collect();
        let decay_of = |i: usize| {
            let param = graph.params.iter().nth(i).expect("in range").1;
            if param.update == Update::Decayed {
                c.weight_decay
            } else {
                0.0
            }
        };
        if let Some(shard) = &self.shard {
            for (group, mine) in groups.iter().zip(&sharded) {
                // This rank's chunk, then every rank's updated chunk shared.
                let mut at = 0;
                for &(p, _) in &group.grads {
                    let (i, r) = (p.index(), shard.owned[p.index()].clone());
                    let len = r.len();
                    let w = &mut self.params[i][r];
                    hyper.apply(
                        w,
                        &mut self.m[i],
                        &mut self.v[i],
                        &mine[at..at + len],
                        decay_of(i),
                    );
                    at += len;
                }
                let params = &self.params;
                let flat = self.gather_owned(
                    group,
                    |p| &params[p][shard.owned[p].clone()],
                    "the updated parameters",
                )?;
                let mut at = 0;
                for &(p, _) in &group.grads {
                    let w = &mut self.params[p.index()];
                    let len = w.len();
                    w.copy_from_slice(&flat[at..at + len]);
                    at += len;
                }
            }
        } else {
            self.params
                .par_iter_mut()
                .zip(self.m.par_iter_mut())
                .zip(self.v.par_iter_mut())
                .enumerate()
                .for_each(|(i, ((w, m), v))| {
                    let Some(grad) = grads.get(&i) else { return };
                    hyper.apply(w, m, v, grad, decay_of(i));
                });
        }
        if c.bias_update > 0.0 {
            for (&(bias, experts, _), load) in self.routers.iter().zip(&loads) {
                if let Buf::U(_) = &out[&experts] {
                    moe::update_balance_bias(&mut self.params[bias.index()], load, c.bias_update);
                }
            }
        }
        self.step += 1;
        Ok(StepStats {
            loss,
            main_loss,
            mtp_loss,
            balance_loss,
            grad_norm,
            lr,
            skipped: false,
        })
    }
}

/// Mean main-model cross-entropy of a forward graph over `batches` (validation), with the
/// precision policy emulated when `emulate` is given.
pub fn eval_loss(
    forward: &Program,
    params: &[Vec<f32>],
    batches: impl Iterator<Item = Batch>,
    seq_len: usize,
    emulate: Option<&Emulation>,
) -> Result<f64, ExecError> {
    let main = forward
        .graph()
        .output("loss.main")
        .expect("a forward graph has a main loss");
    let exec = Executor::new(forward, &[main]);
    let exec = match emulate {
        Some(e) => exec.emulating(e),
        None => exec,
    };
    let (mut sum, mut n) = (0.0, 0usize);
    for batch in batches {
        let inputs = feed_inputs(forward.graph(), &batch, seq_len);
        let out = exec.run::<f32>(&Feed {
            params,
            inputs: &inputs,
            weights: None,
        })?;
        sum += f64::from(out[&main].floats()[0]);
        n += 1;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

impl Experts<'_> {
    /// This rank's block of a whole expert tensor.
    fn block<'a, E>(&self, whole: &'a [E]) -> &'a [E] {
        let g = self.group;
        &whole[crate::mpi::chunk(whole.len(), g.rank(), g.ranks())]
    }

    /// Per-parameter values with the routed experts' cut to this rank's blocks.
    fn blocks(&self, values: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        values
            .into_iter()
            .zip(&self.sharded)
            .map(|(v, &s)| if s { self.block(&v).to_vec() } else { v })
            .collect()
    }
}
