//! Per-device figures of a parallel layout on a cluster, and the search `kiln plan` runs.
//!
//! Every figure derives from the same named ops as [`crate::analyze`], placed on pipeline
//! stages. The model of a step, its assumptions and the published figures it reproduces are
//! in `docs/parallel.md`; in short:
//! - Stages take contiguous runs of layers (`layers · s / pp` onwards); the embedding sits on
//!   the first stage, the final norm, head and MTP modules on the last, which also keeps a
//!   copy of the embedding when the head or the MTP modules read it.
//! - Routed experts are sharded over `ep`; everything else is replicated over `dp · ep`.
//!   Under DualPipe a device holds two stages (`i` and `pp - 1 - i`), so every weight has
//!   twice the replicas, and ZeRO-1 shards over all of them.
//! - Routing is taken as uniform and balanced (what the bias update aims at): each expert
//!   receives `top_k / experts` of the tokens.
//! - Collectives are rings: an all-reduce sends `2 (n - 1) / n` of the buffer per device, a
//!   reduce-scatter or all-gather half of that.
//! - Times use the cluster's peak rates, so step times are lower bounds and MFU an upper
//!   bound; DualPipe hides the expert and pipeline traffic behind computation (DeepSeek-V3's
//!   claim for it), 1F1B exposes it, and the data-parallel reduction is exposed in both.

use serde::Serialize;

use crate::analyze::{is_fp8_gemm, saved_per_token};
use crate::model::{Format, Model, Parallel, PipeSchedule, Recompute, Selection};
use crate::named_ops::{ops, Component, Op, OpClass, Site};

/// A cluster of identical GPUs in nodes of `gpus_per_node`, with per-GPU rates.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    pub gpus: u64,
    pub gpus_per_node: u64,
    /// Memory of one GPU, in GiB (what `nvidia-smi` reports as total).
    pub memory_gib: f64,
    /// Bandwidth one GPU sends at inside its node (NVLink), GB/s, one direction.
    pub nvlink_gb_s: f64,
    /// Bandwidth one GPU sends at to other nodes (InfiniBand), GB/s, one direction.
    pub ib_gb_s: f64,
    /// Dense BF16 tensor-core peak, TFLOP/s; FP32 GEMMs run at half of it (TF32).
    pub bf16_tflops: f64,
    /// Dense FP8 tensor-core peak, TFLOP/s.
    pub fp8_tflops: f64,
}

/// A built-in cluster: its name, per-GPU figures and where they come from.
struct Preset {
    name: &'static str,
    memory_gib: f64,
    nvlink_gb_s: f64,
    ib_gb_s: f64,
    source: &'static str,
}

/// Hopper SXM dense tensor-core peaks (NVIDIA's H100 datasheet; H800 and H200 share the
/// H100's SMs and clocks).
const HOPPER_BF16_TFLOPS: f64 = 989.4;
const HOPPER_FP8_TFLOPS: f64 = 1978.9;

const PRESETS: [Preset; 3] = [
    Preset {
        name: "h800",
        memory_gib: 81559.0 / 1024.0,
        nvlink_gb_s: 160.0,
        ib_gb_s: 50.0,
        source: "DeepSeek-V3 report §3.2.2: NVLink 160 GB/s and IB 50 GB/s achieved per GPU",
    },
    Preset {
        name: "h100",
        memory_gib: 81559.0 / 1024.0,
        nvlink_gb_s: 450.0,
        ib_gb_s: 50.0,
        source: "H100 SXM datasheet: NVLink 900 GB/s both ways; one 400 Gb/s NIC per GPU",
    },
    Preset {
        name: "h200",
        memory_gib: 143771.0 / 1024.0,
        nvlink_gb_s: 450.0,
        ib_gb_s: 50.0,
        source:
            "H200 SXM datasheet: 141 GB HBM3e, NVLink 900 GB/s both ways; one 400 Gb/s NIC per GPU",
    },
];

impl Cluster {
    /// The built-in names, for help text.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.name).collect()
    }

    /// Each preset with the source of its figures, for `kiln plan --help` and the docs.
    pub fn preset_sources() -> Vec<(&'static str, &'static str)> {
        PRESETS.iter().map(|p| (p.name, p.source)).collect()
    }

    /// `h800x2048` (a preset and its GPU count) or `h800` (as many GPUs as `default_gpus`).
    /// `None` if `text` names no preset.
    pub fn preset(text: &str, default_gpus: u64) -> Option<Result<Cluster, String>> {
        let (name, gpus) = match text.split_once('x') {
            Some((n, g)) => (n, Some(g)),
            None => (text, None),
        };
        let p = PRESETS
            .iter()
            .find(|p| p.name == name.to_ascii_lowercase())?;
        let gpus = match gpus {
            None => Ok(default_gpus),
            Some(g) => g
                .parse::<u64>()
                .ok()
                .filter(|&g| g >= 1)
                .ok_or_else(|| format!("`{text}`: the GPU count after `x` must be a positive integer, as in `{name}x2048`")),
        };
        Some(gpus.map(|gpus| Cluster {
            name: p.name.to_string(),
            gpus,
            gpus_per_node: 8,
            memory_gib: p.memory_gib,
            nvlink_gb_s: p.nvlink_gb_s,
            ib_gb_s: p.ib_gb_s,
            bf16_tflops: HOPPER_BF16_TFLOPS,
            fp8_tflops: HOPPER_FP8_TFLOPS,
        }))
    }

    /// A cluster file: TOML with a `[cluster]` table of every field of [`Cluster`].
    pub fn from_toml(text: &str) -> Result<Cluster, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            cluster: Cluster,
        }
        let c = toml::from_str::<File>(text)
            .map_err(|e| e.to_string().trim_end().to_string())?
            .cluster;
        let positive = [
            ("memory_gib", c.memory_gib),
            ("nvlink_gb_s", c.nvlink_gb_s),
            ("ib_gb_s", c.ib_gb_s),
            ("bf16_tflops", c.bf16_tflops),
            ("fp8_tflops", c.fp8_tflops),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "`cluster.{key}` must be a positive number, found {v}"
                ));
            }
        }
        if c.gpus == 0 || c.gpus_per_node == 0 {
            return Err("`cluster.gpus` and `cluster.gpus_per_node` must be at least 1".into());
        }
        Ok(c)
    }

    pub fn memory_bytes(&self) -> u128 {
        (self.memory_gib * (1u64 << 30) as f64) as u128
    }

    /// Whether `size` ranks at `stride` fit in one node (the layout aligns groups to nodes
    /// when their extent divides the node).
    fn in_node(&self, size: u64, stride: u64) -> bool {
        size <= 1 || self.gpus_per_node % (size * stride) == 0
    }

    /// GEMM rate of a format, FLOP/s.
    fn rate(&self, f: Format) -> f64 {
        let tf = match f {
            Format::E4m3 | Format::E5m2 => self.fp8_tflops,
            Format::Bf16 | Format::Fp16 => self.bf16_tflops,
            Format::Fp32 => self.bf16_tflops / 2.0,
        };
        tf * 1e12
    }
}

/// Bytes one device sends per step over each kind of link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Traffic {
    pub nvlink_bytes: u128,
    pub ib_bytes: u128,
}

impl Traffic {
    fn on(in_node: bool, bytes: f64) -> Traffic {
        let b = bytes.round() as u128;
        if in_node {
            Traffic {
                nvlink_bytes: b,
                ib_bytes: 0,
            }
        } else {
            Traffic {
                nvlink_bytes: 0,
                ib_bytes: b,
            }
        }
    }

    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            nvlink_bytes: self.nvlink_bytes + o.nvlink_bytes,
            ib_bytes: self.ib_bytes + o.ib_bytes,
        }
    }

    /// Seconds at the links' rates; NVLink and IB carry their shares at the same time.
    fn seconds(&self, c: &Cluster) -> f64 {
        let nvlink = self.nvlink_bytes as f64 / (c.nvlink_gb_s * 1e9);
        let ib = self.ib_bytes as f64 / (c.ib_gb_s * 1e9);
        nvlink.max(ib)
    }
}

/// The layout as the report states it, with what it derives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layout {
    pub dp: u64,
    pub ep: u64,
    pub pp: u64,
    pub schedule: PipeSchedule,
    pub zero: u8,
    pub world: u64,
    /// Sequences per micro-batch on one data rank.
    pub micro_batch: u64,
    /// Micro-batches per step on one data rank.
    pub micro_batches: u64,
    /// Main-model layers on each stage.
    pub stage_layers: Vec<u64>,
}

/// Memory of one device, in bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceMemory {
    /// Learned parameters the device holds (both stages under DualPipe).
    pub params: u128,
    pub weights_bytes: u128,
    pub master_bytes: u128,
    pub grads_bytes: u128,
    pub moments_bytes: u128,
    pub scales_bytes: u128,
    /// Micro-batches whose activations are alive at once (the schedule's peak).
    pub in_flight: u64,
    pub activations_bytes: u128,
    pub total_bytes: u128,
    pub capacity_bytes: u128,
}

/// Bytes one device sends per step, by collective.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comm {
    /// Tokens to their experts' ranks: forward activations (FP8 where the experts compute in
    /// FP8) and the backward gradients of the combine.
    pub ep_dispatch: Traffic,
    /// Expert outputs back to their tokens' ranks, and the backward gradients of the dispatch.
    pub ep_combine: Traffic,
    /// Routed token copies the device sends to other devices per step in the forward
    /// dispatch, with uniform routing (each also crosses back in the combine, and both again
    /// in the backward pass): `ep_dispatch + ep_combine` is this many times the bytes of one.
    pub ep_rows_out: f64,
    /// Whether routing is node-limited: group-limited selection whose groups are the
    /// expert-parallel nodes, so a token reaches at most `groups_kept` nodes.
    pub node_limited: bool,
    /// Nodes other than its own each token is sent to, on average, per MoE layer.
    pub remote_nodes_per_token: f64,
    /// Gradients over each weight's replicas: an all-reduce (ZeRO 0) or reduce-scatter (1).
    pub dp_grads: Traffic,
    /// ZeRO-1's all-gather of the updated weights, in their working formats.
    pub dp_params: Traffic,
    /// Activations and their gradients between pipeline stages.
    pub pp_sends: Traffic,
}

/// An estimated step, in seconds, at the cluster's peak rates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepTime {
    /// The stages of the device that paces the step (the most computation plus exposed
    /// communication), whose figures `compute_s` and `exposed_comm_s` are.
    pub pace_stages: Vec<u64>,
    /// Forward time of one micro-batch on the slowest stage (`F`; backward is `2F`).
    pub forward_chunk_s: f64,
    pub compute_s: f64,
    /// Idle time from the schedule (DeepSeek-V3 report, Table 2).
    pub bubble_s: f64,
    /// The pacing device's expert and pipeline traffic, which DualPipe hides behind its
    /// computation.
    pub overlappable_comm_s: f64,
    /// Communication not hidden behind computation.
    pub exposed_comm_s: f64,
    pub step_s: f64,
    /// Model FLOPs utilization: the share of the step an average device spends computing
    /// the model's FLOPs at the peak rate of each GEMM's format.
    pub mfu: f64,
}

/// What `kiln check` reports per device for a layout on a cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerDevice {
    pub cluster: Cluster,
    pub layout: Layout,
    /// What the activation estimate takes the backward pass to recompute.
    pub recompute: Recompute,
    /// The stages the device with the most memory holds (two under DualPipe).
    pub stages: Vec<u64>,
    pub memory: DeviceMemory,
    pub comm: Comm,
    pub time: StepTime,
    pub fits: bool,
}

/// The model's ops with what placing them needs, computed once per model.
pub struct Placed<'m> {
    model: &'m Model,
    ops: Vec<Op>,
    formats: Vec<Format>,
    embed_params: u128,
}

impl<'m> Placed<'m> {
    pub fn new(model: &'m Model) -> Self {
        let ops = ops(model);
        let formats = ops.iter().map(|o| model.precision.format_of(o)).collect();
        let embed_params = ops
            .iter()
            .filter(|o| o.class == OpClass::Embed)
            .map(|o| o.total_params() as u128)
            .sum();
        Placed {
            model,
            ops,
            formats,
            embed_params,
        }
    }
}

/// Main-model layers on each of `pp` stages: stage `s` starts at layer `layers · s / pp`.
pub fn stage_layers(layers: u64, pp: u64) -> Vec<u64> {
    (0..pp)
        .map(|s| layers * (s + 1) / pp - layers * s / pp)
        .collect()
}

/// The stage an op sits on.
fn stage_of(op: &Op, layers: u64, pp: u64) -> u64 {
    match op.site {
        Site::Model if op.class == OpClass::Embed => 0,
        Site::Model | Site::Mtp(_) => pp - 1,
        // The largest stage whose first layer is at or before `i`.
        Site::Layer(i) => (0..pp)
            .rev()
            .find(|s| layers * s / pp <= i as u64)
            .unwrap_or(0),
    }
}

/// One stage's share of the model on one of its devices (experts divided by `ep`).
#[derive(Default, Clone, Copy)]
struct Stage {
    expert_params: f64,
    other_params: f64,
    /// Working copies in formats other than the master's.
    weights_bytes: f64,
    /// Master copies apart from a working copy (ZeRO-1 shards these), experts and the rest.
    expert_master_apart: f64,
    other_master_apart: f64,
    /// Master copies that are the working copy (needed whole for the forward pass).
    master_is_working: f64,
    /// The weights as ZeRO-1 all-gathers them (working formats), experts and the rest.
    expert_working: f64,
    other_working: f64,
    weight_scales: f64,
    /// Kept for backward per token of a micro-batch.
    saved: f64,
    saved_scales: f64,
    /// Forward seconds per token at the cluster's peak rates.
    forward_s_per_token: f64,
    moe_layers: u64,
}

fn stage(p: &Placed, par: &Parallel, c: &Cluster, s: u64) -> Stage {
    let m = p.model;
    let layers = m.layers.len() as u64;
    let prec = &m.precision;
    let mut st = Stage::default();
    let mine = |op: &Op| stage_of(op, layers, par.pp) == s;
    let last = s == par.pp - 1;
    let a = &m.attention;
    let t = m.train.seq_len as f64;
    for (op, &f) in p.ops.iter().zip(&p.formats) {
        if !mine(op) {
            continue;
        }
        let expert = op.component == Component::RoutedExperts;
        let shards = if expert { par.ep as f64 } else { 1.0 };
        let n = op.total_params() as f64 / shards;
        let master = n * prec.master.bytes() as f64;
        let working = if f != prec.master {
            st.weights_bytes += n * f.bytes() as f64;
            if expert {
                st.expert_master_apart += master;
            } else {
                st.other_master_apart += master;
            }
            n * f.bytes() as f64
        } else {
            st.master_is_working += master;
            master
        };
        if expert {
            st.expert_params += n;
            st.expert_working += working;
        } else {
            st.other_params += n;
            st.other_working += working;
        }
        if let (Some(fp8), true) = (prec.fp8, is_fp8_gemm(op, f)) {
            let blocks =
                op.out.div_ceil(fp8.weight_block[0]) * op.inp.div_ceil(fp8.weight_block[1]);
            st.weight_scales += 4.0 * (blocks * op.copies) as f64 / shards;
        }
        let core = if op.class == OpClass::AttnCore {
            (a.heads * (a.qk_dim() + a.v_dim())) as f64 * (t + 1.0)
        } else {
            0.0
        };
        st.forward_s_per_token += (op.matmul_flops() as f64 + core) / c.rate(f);
        if op.class == OpClass::Router {
            st.moe_layers += 1;
        }
    }
    if last {
        // The MTP modules end in the shared head, outside their op list.
        let depth = m.mtp.map_or(0, |x| x.depth) as f64;
        let head = p
            .ops
            .iter()
            .zip(&p.formats)
            .find(|(o, _)| o.class == OpClass::Head)
            .map_or(prec.compute, |(_, &f)| f);
        st.forward_s_per_token += depth * 2.0 * (m.d_model * m.vocab) as f64 / c.rate(head);
        // The head (tied) or the MTP modules read the embedding: a copy lives here too.
        if par.pp > 1 && (m.tie_embeddings || depth > 0.0) {
            let e = p.embed_params as f64;
            let w = e * prec.compute.bytes() as f64;
            st.other_params += e;
            st.weights_bytes += w;
            st.other_master_apart += e * prec.master.bytes() as f64;
            st.other_working += w;
        }
    }
    let saved = saved_per_token(
        m,
        p.ops
            .iter()
            .zip(p.formats.iter().copied())
            .filter(|(o, _)| mine(o)),
        last,
        par.recompute,
    );
    st.saved = saved.bytes as f64;
    st.saved_scales = saved.scale_bytes as f64;
    st
}

/// The schedule's idle time per step for `pp` stages, given the forward time `f` of one
/// micro-batch on one stage, the backward `b` and its weight-gradient part `w` (DeepSeek-V3
/// report, Table 2). `F&B`, a forward and a backward chunk overlapped, takes `f + b`.
pub fn bubble(schedule: PipeSchedule, pp: u64, f: f64, b: f64, w: f64) -> f64 {
    match schedule {
        PipeSchedule::OneFOneB => (pp as f64 - 1.0) * (f + b),
        PipeSchedule::DualPipe => (pp as f64 / 2.0 - 1.0).max(0.0) * ((f + b) + b - 3.0 * w),
    }
}

/// Expected distinct nodes `k` uniform picks among `n` nodes reach.
fn distinct(n: f64, k: f64) -> f64 {
    n * (1.0 - (1.0 - 1.0 / n).powf(k))
}

/// One device's figures before the pipeline's pace is known.
struct Device {
    stages: Vec<u64>,
    memory: DeviceMemory,
    comm: Comm,
    compute_s: f64,
    /// Forward time of its slowest micro-batch chunk.
    chunk_s: f64,
    /// Communication a schedule may hide (expert and pipeline) and the DP reduction.
    hideable_s: f64,
    dp_s: f64,
}

/// Per-device figures of `par` for a placed model on `c`: the device with the most memory,
/// and the step the slowest device paces. The layout must satisfy [`Parallel::problems`].
pub fn per_device(p: &Placed, par: &Parallel, c: &Cluster) -> PerDevice {
    let m = p.model;
    let stages: Vec<Stage> = (0..par.pp).map(|s| stage(p, par, c, s)).collect();
    let dual = par.schedule == PipeSchedule::DualPipe && par.pp >= 2;
    // Each stage on its own devices, or (DualPipe) stages i and pp-1-i together.
    let groups: Vec<Vec<u64>> = if dual {
        (0..par.pp / 2).map(|i| vec![i, par.pp - 1 - i]).collect()
    } else {
        (0..par.pp).map(|s| vec![s]).collect()
    };
    let devices: Vec<Device> = groups
        .into_iter()
        .map(|g| device(p, par, c, &stages, g, dual))
        .collect();
    let chunk = devices.iter().map(|d| d.chunk_s).fold(0.0, f64::max);
    let bubble_s = bubble(par.schedule, par.pp, chunk, 2.0 * chunk, chunk);
    let busy = |d: &Device| {
        let exposed = if dual {
            (d.hideable_s - d.compute_s).max(0.0) + d.dp_s
        } else {
            d.hideable_s + d.dp_s
        };
        (d.compute_s + exposed, exposed)
    };
    let pace = devices
        .iter()
        .max_by(|a, b| busy(a).0.total_cmp(&busy(b).0))
        .expect("pp >= 1");
    let (busy_s, exposed) = busy(pace);
    let step_s = busy_s + bubble_s;
    let mean_compute = devices.iter().map(|d| d.compute_s).sum::<f64>() / devices.len() as f64;
    let time = StepTime {
        pace_stages: pace.stages.clone(),
        forward_chunk_s: chunk,
        compute_s: pace.compute_s,
        bubble_s,
        overlappable_comm_s: pace.hideable_s,
        exposed_comm_s: exposed,
        step_s,
        mfu: mean_compute / step_s,
    };
    let batch = m.train.batch;
    let layout = Layout {
        dp: par.dp,
        ep: par.ep,
        pp: par.pp,
        schedule: par.schedule,
        zero: par.zero,
        world: par.world(),
        micro_batch: par.micro_batch(batch),
        micro_batches: par.micro_batches(batch),
        stage_layers: stage_layers(m.layers.len() as u64, par.pp),
    };
    let heavy = devices
        .into_iter()
        .max_by_key(|d| d.memory.total_bytes)
        .expect("pp >= 1");
    PerDevice {
        cluster: c.clone(),
        layout,
        recompute: par.recompute,
        stages: heavy.stages,
        fits: heavy.memory.total_bytes <= heavy.memory.capacity_bytes,
        memory: heavy.memory,
        comm: heavy.comm,
        time,
    }
}

/// The figures of the device holding `held` (one stage, or two under DualPipe).
fn device(
    p: &Placed,
    par: &Parallel,
    c: &Cluster,
    stages: &[Stage],
    held: Vec<u64>,
    dual: bool,
) -> Device {
    let m = p.model;
    let prec = &m.precision;
    let batch = m.train.batch;
    let micro = par.micro_batches(batch);
    let tokens_mb = (par.micro_batch(batch) * m.train.seq_len) as f64;
    // A device's stages share the step's micro-batches (DualPipe feeds half from each end).
    let share = micro as f64 / held.len() as f64;
    let copies = if dual { 2.0 } else { 1.0 };
    // Replicas of a weight, over which ZeRO-1 shards and gradients are reduced.
    let r_other = par.data_ranks() as f64 * copies;
    let r_expert = par.dp as f64 * copies;
    let zero = |r: f64| if par.zero == 1 { 1.0 / r } else { 1.0 };
    let mine: Vec<&Stage> = held.iter().map(|&s| &stages[s as usize]).collect();
    let sum = |f: &dyn Fn(&Stage) -> f64| mine.iter().map(|s| f(s)).sum::<f64>();
    let max = |f: &dyn Fn(&Stage) -> f64| mine.iter().map(|s| f(s)).fold(0.0, f64::max);

    // Memory. Activations: the micro-batches each stage holds at the schedule's peak. Stage
    // `s` holds `pp - s`, so a DualPipe device holds `pp - i` of its stage `i` and `i + 1` of
    // its mirror `pp - 1 - i`: PP + 1 in all (DeepSeek-V3 report, Table 2).
    let in_flight: Vec<u64> = held
        .iter()
        .map(|&s| (par.pp - s).min(micro.div_ceil(held.len() as u64)))
        .collect();
    let acts: f64 = in_flight
        .iter()
        .zip(&mine)
        .map(|(&n, s)| n as f64 * tokens_mb * s.saved)
        .sum();
    let act_scales: f64 = in_flight
        .iter()
        .zip(&mine)
        .map(|(&n, s)| n as f64 * tokens_mb * s.saved_scales)
        .sum();
    let params = sum(&|s| s.expert_params + s.other_params);
    let sharded = sum(&|s| s.expert_params * zero(r_expert) + s.other_params * zero(r_other));
    let master = sum(&|s| {
        s.expert_master_apart * zero(r_expert)
            + s.other_master_apart * zero(r_other)
            + s.master_is_working
    });
    let weights = sum(&|s| s.weights_bytes);
    let grads = params * prec.grads.bytes() as f64;
    let moments = 2.0 * sharded * prec.moments.bytes() as f64;
    let scales = sum(&|s| s.weight_scales) + act_scales;
    let r = |x: f64| x.round() as u128;
    let memory = DeviceMemory {
        params: r(params),
        weights_bytes: r(weights),
        master_bytes: r(master),
        grads_bytes: r(grads),
        moments_bytes: r(moments),
        scales_bytes: r(scales),
        in_flight: in_flight.iter().sum(),
        activations_bytes: r(acts),
        total_bytes: r(weights) + r(master) + r(grads) + r(moments) + r(scales) + r(acts),
        capacity_bytes: c.memory_bytes(),
    };

    // Expert all-to-all: every MoE layer the device runs, for every token it runs them on.
    let (top_k, node_groups) = m.moe.as_ref().map_or((0, None), |x| {
        let limited = (x.select == Selection::GroupLimited).then_some((x.groups, x.groups_kept));
        (x.top_k, limited)
    });
    let ep = par.ep as f64;
    let ep_in_node = c.in_node(par.ep, 1);
    let ep_nodes = (ep / c.gpus_per_node as f64).ceil().max(1.0);
    let node_limited = !ep_in_node && node_groups.is_some_and(|(g, _)| g as f64 == ep_nodes);
    let remote_nodes = if ep_in_node {
        0.0
    } else {
        let reached = match node_groups {
            Some((_, kept)) if node_limited => distinct(kept as f64, top_k as f64),
            _ => distinct(ep_nodes, top_k as f64),
        };
        reached * (ep_nodes - 1.0) / ep_nodes
    };
    let elements = sum(&|s| s.moe_layers as f64) * share * tokens_mb * m.d_model as f64;
    // Every copy leaving its GPU crosses NVLink once: directly, or forwarded after IB.
    let copies_out = top_k as f64 * (ep - 1.0) / ep;
    let ep_traffic = |bytes: f64| Traffic {
        nvlink_bytes: r(elements * copies_out * bytes),
        ib_bytes: r(elements * remote_nodes * bytes),
    };
    let (dispatch_b, compute_b) = expert_io_bytes(p);
    let ep_rows_out = elements / (m.d_model as f64).max(1.0) * copies_out;
    let ep_dispatch = ep_traffic(dispatch_b + compute_b);
    let ep_combine = ep_traffic(2.0 * compute_b);

    // Data parallel: rings over each weight's replicas. A stage's dp·ep ranks are
    // contiguous; an expert's replicas stride over ep; DualPipe's second copy lives on
    // the mirror stage, so its rings span the whole pipeline.
    let ring = |n: f64| if n > 1.0 { (n - 1.0) / n } else { 0.0 };
    let (other_in_node, expert_in_node) = if dual {
        let whole = c.in_node(par.world(), 1);
        (whole, whole)
    } else {
        (c.in_node(par.data_ranks(), 1), c.in_node(par.dp, par.ep))
    };
    let g = prec.grads.bytes() as f64;
    let reduce = if par.zero == 1 { 1.0 } else { 2.0 };
    let dp_grads = Traffic::on(
        expert_in_node,
        reduce * ring(r_expert) * sum(&|s| s.expert_params) * g,
    )
    .add(Traffic::on(
        other_in_node,
        reduce * ring(r_other) * sum(&|s| s.other_params) * g,
    ));
    let dp_params = if par.zero == 1 {
        Traffic::on(expert_in_node, ring(r_expert) * sum(&|s| s.expert_working)).add(Traffic::on(
            other_in_node,
            ring(r_other) * sum(&|s| s.other_working),
        ))
    } else {
        Traffic::default()
    };

    // Pipeline: each micro-batch's output goes forward and its input's gradient back; the
    // neighbouring stage is dp·ep ranks away.
    let boundary = tokens_mb * m.d_model as f64 * compute_b;
    let edges: u64 = held
        .iter()
        .map(|&s| (s + 1 < par.pp) as u64 + (s > 0) as u64)
        .sum();
    let pp_in_node = par.pp == 1 || c.in_node(2, par.data_ranks());
    let pp_sends = Traffic::on(pp_in_node, edges as f64 * share * boundary);

    Device {
        compute_s: 3.0 * share * tokens_mb * sum(&|s| s.forward_s_per_token),
        chunk_s: tokens_mb * max(&|s| s.forward_s_per_token),
        hideable_s: ep_dispatch.add(ep_combine).add(pp_sends).seconds(c),
        dp_s: dp_grads.add(dp_params).seconds(c),
        stages: held,
        memory,
        comm: Comm {
            ep_dispatch,
            ep_combine,
            ep_rows_out,
            node_limited,
            remote_nodes_per_token: remote_nodes,
            dp_grads,
            dp_params,
            pp_sends,
        },
    }
}

/// Bytes per element of the expert all-to-all: what the dispatch sends forward (FP8 with one
/// fp32 scale per activation tile where the experts' first GEMM runs in FP8, else the
/// compute format), and the compute format (the combine, and every backward transfer).
fn expert_io_bytes(p: &Placed) -> (f64, f64) {
    let prec = &p.model.precision;
    let compute = prec.compute.bytes() as f64;
    let first = p
        .ops
        .iter()
        .zip(&p.formats)
        .find(|(o, _)| o.component == Component::RoutedExperts && o.class == OpClass::Linear);
    let dispatch = match (first, prec.fp8) {
        (Some((o, &f)), Some(fp8)) if is_fp8_gemm(o, f) => {
            f.bytes() as f64 + 4.0 / fp8.act_tile[1] as f64
        }
        _ => compute,
    };
    (dispatch, compute)
}

/// Why `kiln plan` rejected a layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    /// It breaks a layout rule (the `[parallel]` key at fault and the checker's message).
    Rule { key: &'static str, message: String },
    /// Its fullest device needs more memory than a GPU has.
    Memory {
        needed_bytes: u128,
        capacity_bytes: u128,
    },
}

/// A layout `kiln plan` tried.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tried {
    pub dp: u64,
    pub ep: u64,
    pub pp: u64,
    pub schedule: PipeSchedule,
    pub zero: u8,
    pub micro_batch: u64,
}

/// What `kiln plan` found: the layouts that fit, fastest first, and the rest with why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub cluster: Cluster,
    pub tried: usize,
    pub fits: Vec<PerDevice>,
    pub rejected: Vec<(Tried, Rejection)>,
}

/// The divisors of `n`, ascending.
fn divisors(n: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (1..=n)
        .take_while(|d| d * d <= n)
        .filter(|d| n % d == 0)
        .collect();
    let big: Vec<u64> = v
        .iter()
        .rev()
        .map(|d| n / d)
        .filter(|b| !v.contains(b))
        .collect();
    v.extend(big);
    v
}

/// Tries every layout of exactly `cluster.gpus` ranks: each `pp` up to the layer count, each
/// `ep` dividing the experts, `dp` the rest, both schedules, ZeRO 0 and 1, and micro-batches
/// of 1, 2, 4… sequences while they divide a rank's share of the batch, keeping the model's
/// `recompute`. Rule-breaking layouts and those
/// that do not fit are kept with the reason; the fits are sorted by estimated step time.
pub fn plan(model: &Model, cluster: &Cluster) -> Plan {
    let placed = Placed::new(model);
    let layers = model.layers.len() as u64;
    let experts = model.moe.as_ref().map(|m| m.experts);
    let mla = matches!(model.attention.kind, crate::model::AttentionKind::Latent(_));
    let (known_experts, known_mla) = (Some(experts), Some(mla));
    let batch = model.train.batch;
    let mut fits = Vec::new();
    let mut rejected = Vec::new();
    let mut tried = 0;
    for pp in divisors(cluster.gpus).into_iter().filter(|&p| p <= layers) {
        let rest = cluster.gpus / pp;
        let eps: Vec<u64> = match experts {
            Some(e) => divisors(rest).into_iter().filter(|x| e % x == 0).collect(),
            None => vec![1],
        };
        for ep in eps {
            let dp = rest / ep;
            let per_rank = batch / (dp * ep).max(1);
            // Powers of two that divide a rank's sequences (1 stands for all of them when
            // the batch does not split, so the rule is reported once).
            let micro: Vec<u64> = std::iter::successors(Some(1u64), |m| Some(m * 2))
                .take_while(|&m| m == 1 || (m <= per_rank && per_rank % m == 0))
                .collect();
            for schedule in [PipeSchedule::OneFOneB, PipeSchedule::DualPipe] {
                for zero in [0u8, 1] {
                    for &mb in &micro {
                        let par = Parallel {
                            dp,
                            ep,
                            pp,
                            schedule,
                            zero,
                            micro_batch: Some(mb),
                            grad_accum: None,
                            recompute: model.parallel.recompute,
                        };
                        let t = Tried {
                            dp,
                            ep,
                            pp,
                            schedule,
                            zero,
                            micro_batch: mb,
                        };
                        tried += 1;
                        if let Some(p) = par
                            .problems(batch, layers, known_experts, known_mla)
                            .first()
                        {
                            let r = Rejection::Rule {
                                key: p.key,
                                message: p.message.clone(),
                            };
                            rejected.push((t, r));
                            continue;
                        }
                        let d = per_device(&placed, &par, cluster);
                        if d.fits {
                            fits.push(d);
                        } else {
                            let r = Rejection::Memory {
                                needed_bytes: d.memory.total_bytes,
                                capacity_bytes: d.memory.capacity_bytes,
                            };
                            rejected.push((t, r));
                        }
                    }
                }
            }
        }
    }
    fits.sort_by(|a, b| a.time.step_s.total_cmp(&b.time.step_s));
    Plan {
        cluster: cluster.clone(),
        tried,
        fits,
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_str;

    fn v3() -> Model {
        check_str(include_str!("../../specs/deepseek-v3.toml")).unwrap()
    }

    fn h800() -> Cluster {
        Cluster::preset("h800x2048", 0).unwrap().unwrap()
    }

    #[test]
    fn v3_spec_carries_the_reports_layout() {
        let p = v3().parallel;
        assert_eq!((p.dp, p.ep, p.pp, p.zero), (2, 64, 16, 1));
        assert_eq!(p.schedule, PipeSchedule::DualPipe);
        assert_eq!(p.world(), 2048);
        assert!(p.recompute.norm && p.recompute.attn_up);
    }

    /// DeepSeek-V3 §3.2: its own layout trains on 80 GB GPUs. Under kiln's activation model
    /// that holds with the recomputation of §3.2.3 and not without it.
    #[test]
    fn v3_layout_fits_in_80_gb() {
        let m = v3();
        let d = per_device(&Placed::new(&m), &m.parallel, &h800());
        assert!(d.fits, "{:#?}", d.memory);
        assert!(d.memory.total_bytes < 80_000_000_000, "{:#?}", d.memory);
        // Table 2: DualPipe keeps PP + 1 micro-batches in flight per device.
        assert_eq!(d.memory.in_flight, 17);
        assert_eq!(d.stages.len(), 2);
        let mut keep_all = m.parallel;
        keep_all.recompute = Recompute::default();
        let d = per_device(&Placed::new(&m), &keep_all, &h800());
        assert!(!d.fits, "{:#?}", d.memory);
    }

    #[test]
    fn stages_split_61_layers_into_16_runs() {
        let s = stage_layers(61, 16);
        assert_eq!(s.iter().sum::<u64>(), 61);
        assert!(s.iter().all(|&n| n == 3 || n == 4), "{s:?}");
        let m = v3();
        let ops = ops(&m);
        // Every layer's ops sit on the stage whose run holds it.
        let mut start = 0;
        for (stage, n) in s.iter().enumerate() {
            for i in start..start + *n as usize {
                let op = ops.iter().find(|o| o.site == Site::Layer(i)).unwrap();
                assert_eq!(stage_of(op, 61, 16), stage as u64, "layer {i}");
            }
            start += *n as usize;
        }
    }

    /// DeepSeek-V3 report, Table 2: bubble (PP−1)(F+B) for 1F1B and (PP/2−1)(F&B+B−3W) for
    /// DualPipe; parameters 1× and 2×; activations PP and PP+1.
    #[test]
    fn schedules_reproduce_table_2() {
        let (f, b, w) = (1.0, 2.0, 1.0);
        let fb = f + b;
        for pp in [2u64, 4, 8, 16] {
            let k = pp as f64;
            assert_eq!(
                bubble(PipeSchedule::OneFOneB, pp, f, b, w),
                (k - 1.0) * (f + b)
            );
            assert_eq!(
                bubble(PipeSchedule::DualPipe, pp, f, b, w),
                (k / 2.0 - 1.0) * (fb + b - 3.0 * w)
            );
        }
        let m = v3();
        let placed = Placed::new(&m);
        let c = h800();
        let one = Parallel {
            schedule: PipeSchedule::OneFOneB,
            ..m.parallel
        };
        let a = per_device(&placed, &one, &c);
        let d = per_device(&placed, &m.parallel, &c);
        // 1F1B's stage s holds PP − s (PP on the first stage).
        assert_eq!(a.memory.in_flight, 16 - a.stages[0]);
        assert_eq!(d.memory.in_flight, 17, "a DualPipe device holds PP + 1");
        // Parameters: a DualPipe device holds two stages; its pair (i, 15 - i) against
        // stage i alone.
        let i = d.stages[0];
        let single = |s: u64| stage(&placed, &one, &c, s);
        let pair = single(i).expert_params + single(i).other_params + {
            let j = single(15 - i);
            j.expert_params + j.other_params
        };
        assert_eq!(d.memory.params, pair.round() as u128);
    }

    /// Simulates 1F1B (warm-up forwards, one forward one backward, cool-down backwards) on
    /// `stages` stages and `micro` micro-batches, and returns the step's makespan.
    fn simulate_1f1b(stages: usize, micro: usize, f: f64, b: f64) -> f64 {
        #[derive(Clone, Copy)]
        enum Work {
            F(usize),
            B(usize),
        }
        let order: Vec<Vec<Work>> = (0..stages)
            .map(|s| {
                let warm = (stages - s - 1).min(micro);
                let mut v: Vec<Work> = (0..warm).map(Work::F).collect();
                let mut next_f = warm;
                for m in 0..micro {
                    if next_f < micro {
                        v.push(Work::F(next_f));
                        next_f += 1;
                    }
                    v.push(Work::B(m));
                }
                v
            })
            .collect();
        let mut done_f = vec![vec![f64::NAN; micro]; stages];
        let mut done_b = vec![vec![f64::NAN; micro]; stages];
        let mut pos = vec![0usize; stages];
        let mut free = vec![0f64; stages];
        loop {
            let mut progressed = false;
            for s in 0..stages {
                while let Some(&w) = order[s].get(pos[s]) {
                    let ready = match w {
                        Work::F(_) if s == 0 => Some(0.0),
                        Work::F(m) => Some(done_f[s - 1][m]).filter(|t| !t.is_nan()),
                        Work::B(m) if s + 1 == stages => Some(done_f[s][m]),
                        Work::B(m) => Some(done_b[s + 1][m]).filter(|t| !t.is_nan()),
                    };
                    let Some(ready) = ready else { break };
                    let start = free[s].max(ready);
                    match w {
                        Work::F(m) => {
                            done_f[s][m] = start + f;
                            free[s] = start + f;
                        }
                        Work::B(m) => {
                            done_b[s][m] = start + b;
                            free[s] = start + b;
                        }
                    }
                    pos[s] += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        assert!(
            pos.iter().zip(&order).all(|(p, o)| *p == o.len()),
            "schedule deadlocked"
        );
        free.iter().copied().fold(0.0, f64::max)
    }

    #[test]
    fn the_1f1b_bubble_is_what_a_simulated_schedule_idles() {
        for (stages, micro) in [(2, 4), (4, 8), (8, 16), (16, 120)] {
            let (f, b) = (1.0, 2.0);
            let idle = simulate_1f1b(stages, micro, f, b) - micro as f64 * (f + b);
            let formula = bubble(PipeSchedule::OneFOneB, stages as u64, f, b, f);
            assert!(
                (idle - formula).abs() < 1e-9,
                "{stages} stages: {idle} vs {formula}"
            );
        }
    }

    /// A small model whose traffic is worked out by hand.
    const MINI: &str = r#"
[model]
name = "mini"
vocab = 256
d_model = 64
layers = "dense, moe*3"
max_positions = 64

[attention]
kind = "gqa"
heads = 4
kv_heads = 4

[ffn]
hidden = 128

[moe]
experts = 8
shared = 1
top_k = 2
expert_hidden = 32
score = "sigmoid"

[train]
batch = 16
seq_len = 32
steps = 1
"#;

    #[test]
    fn traffic_matches_the_ring_and_all_to_all_formulas() {
        let m = check_str(MINI).unwrap();
        let placed = Placed::new(&m);
        let c = Cluster::preset("h100x4", 0).unwrap().unwrap();
        let report = crate::analyze::analyze(&m);
        let par = Parallel {
            dp: 2,
            ep: 2,
            ..Parallel::SINGLE
        };
        let d = per_device(&placed, &par, &c);
        // Tokens per data rank per step: 16 / 4 sequences of 32.
        let tokens = 4.0 * 32.0;
        // 3 MoE layers, top-2, half the copies leave the GPU, d_model 64, bf16 both ways.
        let per_copy = tokens * 3.0 * 2.0 * 0.5 * 64.0;
        assert_eq!(
            d.comm.ep_dispatch.nvlink_bytes,
            (per_copy * (2.0 + 2.0)) as u128
        );
        assert_eq!(d.comm.ep_combine.nvlink_bytes, (per_copy * 4.0) as u128);
        assert_eq!(d.comm.ep_dispatch.ib_bytes, 0);
        // Gradients (fp32) all-reduced: experts over dp = 2, the rest over dp · ep = 4.
        let experts = report.params.by_component["routed_experts"] as f64;
        let rest = report.params.total as f64 - experts;
        let want = 2.0 * 0.5 * (experts / 2.0) * 4.0 + 2.0 * 0.75 * rest * 4.0;
        assert_eq!(d.comm.dp_grads.nvlink_bytes, want as u128);
        assert_eq!(d.comm.dp_params, Traffic::default());
        assert_eq!(d.memory.params as f64, rest + experts / 2.0);
        // One stage: nothing to send down a pipeline.
        assert_eq!(d.comm.pp_sends, Traffic::default());
    }

    #[test]
    fn node_limited_routing_bounds_the_nodes_a_token_reaches() {
        let m = v3();
        let placed = Placed::new(&m);
        let d = per_device(&placed, &m.parallel, &h800());
        // 8 groups over ep = 64 ranks on 8 nodes: the groups are the nodes, 4 kept of 8.
        assert!(d.comm.node_limited);
        let expected = 4.0 * (1.0 - 0.75f64.powi(8)) * 7.0 / 8.0;
        assert!((d.comm.remote_nodes_per_token - expected).abs() < 1e-12);
        assert!(d.comm.remote_nodes_per_token < 4.0);
        // Greedy routing over the same nodes reaches more of them.
        let mut greedy = m.clone();
        greedy.moe.as_mut().unwrap().select = Selection::Greedy;
        let g = per_device(&Placed::new(&greedy), &m.parallel, &h800());
        assert!(!g.comm.node_limited);
        assert!(g.comm.remote_nodes_per_token > d.comm.remote_nodes_per_token);
        assert!(g.comm.ep_dispatch.ib_bytes > d.comm.ep_dispatch.ib_bytes);
    }

    #[test]
    fn zero_1_shards_the_optimizer_state_over_the_replicas() {
        let m = check_str(MINI).unwrap();
        let placed = Placed::new(&m);
        let c = Cluster::preset("h100x8", 0).unwrap().unwrap();
        let z0 = Parallel {
            dp: 8,
            ..Parallel::SINGLE
        };
        let z1 = Parallel { zero: 1, ..z0 };
        let (a, b) = (per_device(&placed, &z0, &c), per_device(&placed, &z1, &c));
        assert_eq!(a.memory.grads_bytes, b.memory.grads_bytes);
        assert_eq!(a.memory.moments_bytes, 8 * b.memory.moments_bytes);
        // bf16 working copies apart from the fp32 masters: the masters are sharded too.
        assert_eq!(a.memory.master_bytes, 8 * b.memory.master_bytes);
        // A reduce-scatter plus an all-gather of bf16 weights instead of an fp32 all-reduce.
        assert_eq!(
            b.comm.dp_grads.nvlink_bytes * 2,
            a.comm.dp_grads.nvlink_bytes
        );
        assert_eq!(
            b.comm.dp_params.nvlink_bytes * 2,
            b.comm.dp_grads.nvlink_bytes
        );
    }

    #[test]
    fn plan_finds_v3s_layout_and_ranks_fits_by_step_time() {
        let m = v3();
        let p = plan(&m, &h800());
        assert!(p
            .fits
            .windows(2)
            .all(|w| w[0].time.step_s <= w[1].time.step_s));
        assert!(p.fits.iter().all(|d| d.fits && d.layout.world == 2048));
        let own = &m.parallel;
        assert!(p.fits.iter().any(|d| {
            let l = &d.layout;
            (l.dp, l.ep, l.pp, l.schedule, l.zero, l.micro_batch)
                == (own.dp, own.ep, own.pp, own.schedule, own.zero, 1)
        }));
        assert_eq!(p.tried, p.fits.len() + p.rejected.len());
        for (t, r) in &p.rejected {
            if let Rejection::Memory {
                needed_bytes,
                capacity_bytes,
            } = r
            {
                assert!(needed_bytes > capacity_bytes, "{t:?}");
            }
        }
    }

    #[test]
    fn clusters_come_from_presets_and_files() {
        let c = Cluster::preset("h200x16", 0).unwrap().unwrap();
        assert_eq!((c.gpus, c.gpus_per_node), (16, 8));
        assert!(c.memory_gib > 140.0);
        assert_eq!(Cluster::preset("h100", 24).unwrap().unwrap().gpus, 24);
        assert!(Cluster::preset("h800x0", 0).unwrap().is_err());
        assert!(Cluster::preset("a100x8", 0).is_none());
        let file = "[cluster]\nname = \"lab\"\ngpus = 16\ngpus_per_node = 4\nmemory_gib = 40\n\
                    nvlink_gb_s = 300\nib_gb_s = 25\nbf16_tflops = 312\nfp8_tflops = 312\n";
        let c = Cluster::from_toml(file).unwrap();
        assert_eq!((c.gpus, c.gpus_per_node), (16, 4));
        let typo = file.replace("ib_gb_s", "ib_gbs");
        assert!(Cluster::from_toml(&typo).unwrap_err().contains("ib_gbs"));
        let zero = file.replace("memory_gib = 40", "memory_gib = 0");
        assert!(Cluster::from_toml(&zero)
            .unwrap_err()
            .contains("memory_gib"));
    }
}
