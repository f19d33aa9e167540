//! `Model`: the checked, span-free description of one model and its training run.
//!
//! This is the contract between `check` and everything after it (analyzer, lowering, emitters,
//! runtime configuration). Every field holds a resolved value: defaults are filled in, the layer
//! stack is expanded, DSL strings are parsed, and every cross-field rule of the checker holds.
//! Later stages may therefore index and divide without re-validating.

use serde::Serialize;

use crate::dsl::expr::Expr;
use crate::dsl::pattern::Pattern;
pub use crate::dsl::stack::LayerKind;
pub use kiln_ir::attrs::{
    Accumulator, AdamW, Format, Fp8, GroupScore, NormKind, ScaleFormat, Schedule, ScheduleKind,
    ScoreFunc, Selection, Yarn,
};

/// A checked model spec. Produced only by [`crate::check::check`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Model {
    pub name: String,
    /// Vocabulary size (HF `vocab_size`).
    pub vocab: u64,
    /// Residual stream width (HF `hidden_size`).
    pub d_model: u64,
    /// Maximum sequence length the positions support (HF `max_position_embeddings`).
    pub max_positions: u64,
    /// One entry per transformer block, in order. Serialized in the stack language.
    #[serde(serialize_with = "ser_stack")]
    pub layers: Vec<LayerKind>,
    pub positions: Positions,
    pub norm: Norm,
    /// Whether the output head reuses the token embedding matrix.
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initializer (HF `initializer_range`).
    pub init_std: f64,
    pub attention: Attention,
    /// The FFN of `dense` blocks. Present exactly when the stack or the MTP block has one.
    pub ffn: Option<Ffn>,
    /// The mixture-of-experts FFN of `moe` blocks. Present exactly when the stack or the MTP
    /// block has one.
    pub moe: Option<Moe>,
    pub mtp: Option<Mtp>,
    pub precision: Precision,
    pub train: Train,
    /// GRPO fine-tuning settings (`[rl]`, all defaulted; `kiln rl` reads them).
    pub rl: Rl,
    /// How a step is spread over devices (`[parallel]`, all defaulted: one device). The
    /// checker has verified [`Parallel::problems`] is empty for this model.
    pub parallel: Parallel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Rotary embeddings applied inside attention (see [`Rope`]).
    Rope,
    /// A learned absolute position table added to the token embedding (GPT-2).
    Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Norm {
    pub kind: NormKind,
    pub eps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attention {
    pub heads: u64,
    pub kind: AttentionKind,
    /// Bias on the projections that read the residual stream and on the output projection.
    pub bias: bool,
    /// Present iff `Model::positions` is `Rope`.
    pub rope: Option<Rope>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttentionKind {
    /// Multi-head or grouped-query attention: `heads % kv_heads == 0`.
    Grouped { kv_heads: u64, head_dim: u64 },
    /// Multi-head latent attention (DeepSeek-V2/V3).
    Latent(Mla),
}

/// Multi-head latent attention dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mla {
    /// Query compression rank (HF `q_lora_rank`); `None` projects queries directly.
    pub q_rank: Option<u64>,
    /// Key/value latent rank (HF `kv_lora_rank`).
    pub kv_rank: u64,
    /// Per-head query/key dims without positions (HF `qk_nope_head_dim`).
    pub nope_dim: u64,
    /// Per-head query dims and the one shared key head that carry RoPE (HF `qk_rope_head_dim`). Even.
    pub rope_dim: u64,
    /// Per-head value dims (HF `v_head_dim`).
    pub v_dim: u64,
}

impl Attention {
    /// Per-head query/key dimension.
    pub fn qk_dim(&self) -> u64 {
        match &self.kind {
            AttentionKind::Grouped { head_dim, .. } => *head_dim,
            AttentionKind::Latent(m) => m.nope_dim + m.rope_dim,
        }
    }

    /// Per-head value dimension.
    pub fn v_dim(&self) -> u64 {
        match &self.kind {
            AttentionKind::Grouped { head_dim, .. } => *head_dim,
            AttentionKind::Latent(m) => m.v_dim,
        }
    }

    /// Number of distinct key/value heads (1 latent for MLA is not counted here).
    pub fn kv_heads(&self) -> u64 {
        match &self.kind {
            AttentionKind::Grouped { kv_heads, .. } => *kv_heads,
            AttentionKind::Latent(_) => self.heads,
        }
    }

    /// Number of dimensions per head that RoPE rotates.
    pub fn rotary_dim(&self) -> u64 {
        match &self.kind {
            AttentionKind::Grouped { head_dim, .. } => *head_dim,
            AttentionKind::Latent(m) => m.rope_dim,
        }
    }

    /// The softmax scale applied to `q·k`: `qk_dim^-0.5`, times `attention_mscale()²` under
    /// YaRN with `mscale_all_dim > 0` (DeepSeek's convention, as HF transformers implements it;
    /// the cos/sin tables carry `Yarn::rope_amplitude()`).
    pub fn softmax_scale(&self) -> f64 {
        let mut scale = (self.qk_dim() as f64).powf(-0.5);
        if let Some(Rope { yarn: Some(y), .. }) = &self.rope {
            if y.mscale_all_dim > 0.0 {
                let m = y.attention_mscale();
                scale *= m * m;
            }
        }
        scale
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rope {
    /// Base of the rotary frequencies (HF `rope_theta`).
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// A position-wise feed-forward network: `down(act(...))` where the activation expression reads
/// either one projection (`x`) or two (`gate` and `up`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ffn {
    pub hidden: u64,
    pub act: Activation,
    pub bias: bool,
}

/// A checked activation expression and the input projections it reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Activation {
    /// Serialized as its canonical text.
    #[serde(serialize_with = "ser_display")]
    pub expr: Expr,
    /// `true` when the expression reads `gate` and `up` (two input projections), `false`
    /// when it reads `x` (one).
    pub gated: bool,
}

impl Activation {
    /// Input projections feeding the expression: 2 when gated, else 1.
    pub fn inputs(&self) -> u64 {
        if self.gated {
            2
        } else {
            1
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Moe {
    /// Routed experts per layer (HF `n_routed_experts`).
    pub experts: u64,
    /// Shared experts per layer, each `expert_hidden` wide (HF `n_shared_experts`).
    pub shared: u64,
    /// Routed experts each token uses (HF `num_experts_per_tok`).
    pub top_k: u64,
    /// Hidden width of one expert (HF `moe_intermediate_size`).
    pub expert_hidden: u64,
    pub act: Activation,
    pub score: ScoreFunc,
    pub select: Selection,
    /// Expert groups (HF `n_group`); `experts % groups == 0`.
    pub groups: u64,
    /// Groups a token may route into (HF `topk_group`).
    pub groups_kept: u64,
    /// How a group is scored for group-limited selection.
    pub group_score: GroupScore,
    /// Renormalize the chosen experts' weights to sum to 1 (HF `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// Multiplier on the routed output (HF `routed_scaling_factor`).
    pub route_scale: f64,
    /// Aux-loss-free balancing speed γ: `bias_i += γ·sign(mean_load − load_i)`; 0 disables.
    pub bias_update: f64,
    /// Weight α of the sequence-wise balance loss `α Σ f_i P_i`; 0 disables.
    pub seq_aux: f64,
}

/// Multi-token prediction: `depth` sequential modules, each predicting one token further.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Mtp {
    pub depth: u64,
    /// Loss weight λ: total MTP loss is `λ/D · Σ CE_k`.
    pub weight: f64,
    /// The kind of transformer block inside each module.
    pub block: LayerKind,
}

/// How completions of the verifiable task are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// The completion's first line is the answer (the built-in corpus's `Q: … A: 19` form).
    Plain,
    /// `<think>…</think><answer>…</answer>`: accuracy from the answer block, plus a format
    /// reward.
    Tagged,
}

/// Group Relative Policy Optimization (DeepSeekMath §4.1) on the built-in arithmetic task.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rl {
    /// Completions sampled per question (G).
    pub group: u64,
    /// Questions per step; a step trains on `questions × group` completions.
    pub questions: u64,
    pub steps: u64,
    /// AdamW learning rate (constant; the spec's betas, eps and weight decay).
    pub lr: f64,
    /// The ratio clip ε.
    pub clip: f64,
    /// The KL coefficient β (k3 estimator against the reference policy).
    pub kl: f64,
    /// Copy the policy into the reference every this many steps; `None` keeps the initial one.
    pub ref_reset: Option<u64>,
    /// Tokens a completion may have.
    pub max_completion: u64,
    pub temperature: f64,
    /// Sample among the k most likely tokens; 0 for all.
    pub top_k: u64,
    /// Policy updates per sampled batch (μ); the first is on-policy.
    pub updates: u64,
    pub answer: AnswerFormat,
    /// Reward weights: accuracy, and (for `Tagged`) format.
    pub accuracy_weight: f64,
    pub format_weight: f64,
}

impl Rl {
    /// The defaults of `[rl]`.
    pub const DEFAULT: Rl = Rl {
        group: 8,
        questions: 16,
        steps: 60,
        lr: 5e-5,
        clip: 0.2,
        kl: 0.04,
        ref_reset: None,
        max_completion: 40,
        temperature: 1.0,
        top_k: 0,
        updates: 1,
        answer: AnswerFormat::Plain,
        accuracy_weight: 1.0,
        format_weight: 0.1,
    };
}

/// A pipeline schedule (DeepSeek-V3 technical report, §3.2.1 and Table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PipeSchedule {
    /// One forward, one backward: each stage keeps at most `pp` micro-batches in flight.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// DeepSeek-V3's bidirectional schedule: every device holds two stages (one per
    /// direction), overlaps each chunk's communication with another's computation, and
    /// needs an even `pp` and an even number of micro-batches.
    DualPipe,
}

impl PipeSchedule {
    pub const CHOICES: [(&'static str, PipeSchedule); 2] = [
        ("1f1b", PipeSchedule::OneFOneB),
        ("dualpipe", PipeSchedule::DualPipe),
    ];

    pub fn name(self) -> &'static str {
        match self {
            PipeSchedule::OneFOneB => "1f1b",
            PipeSchedule::DualPipe => "dualpipe",
        }
    }
}

/// The parallel layout of a training step. The world is `dp · ep · pp` ranks, numbered with
/// `ep` fastest, then `dp`, then `pp`, so an expert-parallel group is as local as it can be.
/// Every one of the `dp · ep` ranks of a pipeline stage reads its own share of `train.batch`;
/// routed experts are sharded over `ep` and replicated over `dp`; every other weight is
/// replicated over all `dp · ep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Parallel {
    pub dp: u64,
    pub ep: u64,
    pub pp: u64,
    pub schedule: PipeSchedule,
    /// ZeRO stage: 0 replicates the optimizer state; 1 shards master weights (where they are
    /// a copy apart from the working weights) and moments over each weight's replicas.
    pub zero: u8,
    /// Sequences per micro-batch on one data rank, if the spec sets it.
    pub micro_batch: Option<u64>,
    /// Micro-batches per step on one data rank (gradient accumulation), if the spec sets it.
    pub grad_accum: Option<u64>,
    /// What the per-device estimate takes the backward pass to recompute instead of keeping.
    pub recompute: Recompute,
}

/// Activations recomputed in the backward pass rather than kept (DeepSeek-V3 report,
/// §3.2.3). A planning assumption of the per-device estimate: kiln's runtime keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Recompute {
    /// Norm outputs: ops reading a norm's output (other than the dispatched expert inputs,
    /// which live on another device) recompute it from the kept norm input.
    pub norm: bool,
    /// MLA's up-projections: the attention core keeps only its log-sum-exp and recomputes
    /// q, k and v from the kept latents.
    pub attn_up: bool,
}

impl Recompute {
    pub const CHOICES: [&'static str; 2] = ["norm", "attn_up"];

    /// Sets one named choice; `false` if `name` is not one.
    pub fn enable(&mut self, name: &str) -> bool {
        match name {
            "norm" => self.norm = true,
            "attn_up" => self.attn_up = true,
            _ => return false,
        }
        true
    }

    /// The enabled choices, in `CHOICES` order.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [self.norm, self.attn_up];
        Self::CHOICES
            .iter()
            .zip(on)
            .filter_map(|(n, on)| on.then_some(*n))
            .collect()
    }
}

/// A layout that does not fit the model: the `[parallel]` key (or `train.batch`) at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutProblem {
    /// `dp`, `ep`, `pp`, `tp`, `schedule`, `zero`, `micro_batch`, `grad_accum` or `batch`.
    pub key: &'static str,
    pub message: String,
    pub help: String,
}

impl Parallel {
    /// One device: what a spec without `[parallel]` means.
    pub const SINGLE: Parallel = Parallel {
        dp: 1,
        ep: 1,
        pp: 1,
        schedule: PipeSchedule::OneFOneB,
        zero: 0,
        micro_batch: None,
        grad_accum: None,
        recompute: Recompute {
            norm: false,
            attn_up: false,
        },
    };

    /// Ranks the layout needs.
    pub fn world(&self) -> u64 {
        self.dp * self.ep * self.pp
    }

    /// Ranks of one pipeline stage, each reading its own data.
    pub fn data_ranks(&self) -> u64 {
        self.dp * self.ep
    }

    /// Sequences per micro-batch on one data rank. Exact for a checked model.
    pub fn micro_batch(&self, batch: u64) -> u64 {
        let per_rank = batch / self.data_ranks();
        match (self.micro_batch, self.grad_accum) {
            (Some(m), _) => m,
            (None, Some(g)) => per_rank / g,
            (None, None) => per_rank,
        }
    }

    /// Micro-batches per step on one data rank (gradient accumulation steps).
    pub fn micro_batches(&self, batch: u64) -> u64 {
        batch / self.data_ranks() / self.micro_batch(batch).max(1)
    }

    /// Whether this is the one-device layout.
    pub fn is_single(&self) -> bool {
        self.world() == 1
    }

    /// Sets one key as `--parallel key=value` spells it (`dp=2`, `schedule=dualpipe`).
    /// Setting `micro_batch` clears `grad_accum` and the other way round, so an override
    /// never fights a value the spec fixed.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let int = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_DEGREE).contains(n))
                .ok_or_else(|| {
                    format!(
                        "`{key}` must be an integer in 1..={MAX_DEGREE} ({what}), found `{value}`"
                    )
                })
        };
        match key {
            "dp" => self.dp = int("data-parallel degree")?,
            "ep" => self.ep = int("expert-parallel degree")?,
            "pp" => self.pp = int("pipeline stages")?,
            "tp" => {
                if int("tensor-parallel degree")? != 1 {
                    return Err(format!("tensor parallelism is not supported: {TP_UNSUPPORTED}"));
                }
            }
            "zero" => {
                self.zero = match value {
                    "0" => 0,
                    "1" => 1,
                    _ => return Err(format!("`zero` must be 0 or 1, found `{value}`")),
                }
            }
            "schedule" => {
                self.schedule = PipeSchedule::CHOICES
                    .iter()
                    .find(|(n, _)| *n == value)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| {
                        format!("`schedule` must be \"1f1b\" or \"dualpipe\", found `{value}`")
                    })?
            }
            "micro_batch" => {
                self.micro_batch = Some(int("sequences per micro-batch")?);
                self.grad_accum = None;
            }
            "grad_accum" => {
                self.grad_accum = Some(int("micro-batches per step")?);
                self.micro_batch = None;
            }
            "recompute" => {
                let mut r = Recompute::default();
                for name in value.split('+').filter(|n| *n != "none") {
                    if !r.enable(name) {
                        return Err(format!(
                            "`recompute` takes `none` or names joined by `+` ({}), found `{name}`",
                            Recompute::CHOICES.join(", ")
                        ));
                    }
                }
                self.recompute = r;
            }
            _ => {
                return Err(format!(
                    "unknown layout key `{key}`; keys are dp, ep, pp, zero, schedule, micro_batch, grad_accum, recompute"
                ))
            }
        }
        Ok(())
    }

    /// Every way this layout fails to fit a model with `layers` blocks, `experts` routed
    /// experts (`Some(None)`: none) and a global batch of `batch` sequences, whose attention
    /// is MLA or not (`mla`). `None` for `experts` or `mla` means unknown (that part of the
    /// spec has errors of its own), and skips the rules reading it: a rule reads only the
    /// values it names, so one pass reports every problem.
    pub fn problems(
        &self,
        batch: u64,
        layers: u64,
        experts: Option<Option<u64>>,
        mla: Option<bool>,
    ) -> Vec<LayoutProblem> {
        let mut v = Vec::new();
        let mut push =
            |key, message: String, help: String| v.push(LayoutProblem { key, message, help });
        match experts {
            Some(None) if self.ep > 1 => push(
                "ep",
                format!(
                    "`ep = {}` shards routed experts, but the model has none",
                    self.ep
                ),
                "remove `ep`, or add `moe` layers and a [moe] section".into(),
            ),
            Some(Some(e)) if e % self.ep != 0 => push(
                "ep",
                format!("`ep = {}` does not divide the {e} routed experts", self.ep),
                format!(
                    "each rank holds experts / ep of them: try {}",
                    nearest_divisors(e, self.ep)
                ),
            ),
            _ => {}
        }
        if self.recompute.attn_up && mla == Some(false) {
            push(
                "recompute",
                "`attn_up` recomputes MLA's up-projections, but attention is not MLA".into(),
                "remove `attn_up` from `recompute`".into(),
            );
        }
        if self.pp > layers {
            push(
                "pp",
                format!(
                    "`pp = {}` stages for {layers} layers: a stage needs at least one",
                    self.pp
                ),
                format!("use at most {layers} stages"),
            );
        }
        if self.schedule == PipeSchedule::DualPipe && (self.pp < 2 || self.pp % 2 != 0) {
            push(
                "schedule",
                format!("DualPipe pairs stages from both ends and needs an even `pp` of at least 2, found {}", self.pp),
                "use an even `pp`, or `schedule = \"1f1b\"`".into(),
            );
        }
        let ranks = self.data_ranks();
        if batch % ranks != 0 {
            push(
                "batch",
                format!(
                    "{batch} sequences per step do not split over dp · ep = {ranks} data ranks"
                ),
                format!("make `train.batch` a multiple of {ranks}, or change `dp`/`ep`"),
            );
            return v;
        }
        let per_rank = batch / ranks;
        let split = |key: &'static str, n: u64, what: &str| -> Option<LayoutProblem> {
            (per_rank % n != 0).then(|| LayoutProblem {
                key,
                message: format!("`{key} = {n}` does not divide the {per_rank} sequences each data rank reads per step"),
                help: format!("{what}: try {}", nearest_divisors(per_rank, n)),
            })
        };
        let mut resolved = true;
        if let Some(m) = self.micro_batch {
            if let Some(p) = split(
                "micro_batch",
                m,
                "a step is a whole number of micro-batches",
            ) {
                v.push(p);
                resolved = false;
            }
        }
        if let Some(g) = self.grad_accum {
            if let Some(p) = split("grad_accum", g, "every micro-batch has the same size") {
                v.push(p);
                resolved = false;
            }
        }
        if let (Some(m), Some(g)) = (self.micro_batch, self.grad_accum) {
            if resolved && m * g != per_rank {
                v.push(LayoutProblem {
                    key: "grad_accum",
                    message: format!("`micro_batch = {m}` × `grad_accum = {g}` is {} sequences, but each data rank reads {per_rank} per step", m * g),
                    help: "set one of the two; the other follows from `train.batch`".into(),
                });
                resolved = false;
            }
        }
        if resolved && self.schedule == PipeSchedule::DualPipe && self.pp >= 2 {
            let m = self.micro_batches(batch);
            if m % 2 != 0 {
                let even = (1..=per_rank)
                    .rev()
                    .find(|d| per_rank % d == 0 && (per_rank / d) % 2 == 0);
                let help = match even {
                    Some(d) => format!("`micro_batch = {d}` makes {} of them", per_rank / d),
                    None => format!(
                        "each data rank reads {per_rank} sequence(s), which do not make an even number of micro-batches; double `train.batch`"
                    ),
                };
                v.push(LayoutProblem {
                    key: "schedule",
                    message: format!("DualPipe feeds micro-batches from both ends and needs an even number per step, found {m}"),
                    help,
                });
            }
        }
        v
    }
}

/// The largest degree `[parallel]` accepts.
pub const MAX_DEGREE: u64 = 1 << 20;

/// Why `tp` must be 1.
pub const TP_UNSUPPORTED: &str = "kiln shards experts (`ep`), layers (`pp`) and data (`dp`), as DeepSeek-V3 does; it trains without tensor parallelism";

/// The divisors of `n` nearest `x`, below and above: `32 or 64`.
fn nearest_divisors(n: u64, x: u64) -> String {
    let below = (1..=x.min(n)).rev().find(|d| n % d == 0);
    let above = (x..=n).find(|d| n % d == 0);
    match (below, above) {
        (Some(b), Some(a)) if a != b => format!("{b} or {a}"),
        (Some(b), _) => b.to_string(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "1".into(),
    }
}

/// The precision policy: which format each op computes in and how tensors are stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Precision {
    /// The default of every per-class format below, and the format of the residual stream.
    pub compute: Format,
    /// Operand format of linear-layer and expert GEMMs in the forward pass.
    pub linear: Format,
    /// Formats of the other op classes; each defaults to `compute`.
    pub embed: Format,
    pub head: Format,
    pub router: Format,
    pub norm: Format,
    pub attn_core: Format,
    pub act: Format,
    /// Operand format of the input-gradient and weight-gradient GEMMs.
    pub linear_grad: Format,
    /// Ops matching any of these patterns never run in FP8: where their class format is FP8,
    /// they compute in `keep_format` instead (DeepSeek-V3 keeps the embedding, head, router,
    /// norms and attention core in their original precision).
    pub keep: Vec<Pattern>,
    pub keep_format: Format,
    /// Scaling of FP8 operands. Present iff `linear`, `linear_grad` or `head` is an FP8 format.
    pub fp8: Option<Fp8>,
    pub master: Format,
    pub grads: Format,
    pub moments: Format,
    pub kv_cache: Format,
}

impl Precision {
    /// The same policy with every format replaced by `f(format)`; the FP8 scaling is kept
    /// only while some GEMM format is still FP8.
    pub fn mapped(&self, f: impl Fn(Format) -> Format) -> Precision {
        let mut p = self.clone();
        for x in [
            &mut p.compute,
            &mut p.linear,
            &mut p.embed,
            &mut p.head,
            &mut p.router,
            &mut p.norm,
            &mut p.attn_core,
            &mut p.act,
            &mut p.linear_grad,
            &mut p.keep_format,
            &mut p.master,
            &mut p.grads,
            &mut p.moments,
            &mut p.kv_cache,
        ] {
            *x = f(*x);
        }
        if ![p.linear, p.linear_grad, p.head].iter().any(|f| f.is_fp8()) {
            p.fp8 = None;
        }
        p
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Train {
    /// Sequences per optimizer step.
    pub batch: u64,
    /// Tokens per sequence; at most `max_positions`.
    pub seq_len: u64,
    pub steps: u64,
    pub seed: u64,
    pub optimizer: AdamW,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this value; `None` disables clipping.
    pub grad_clip: Option<f64>,
    /// Skip an optimizer step whose loss or gradient is not finite (instead of stopping).
    pub skip_nonfinite: bool,
    pub data: DataSource,
}

impl Train {
    /// Placeholder values for a `[train]` section that has errors of its own, so that the
    /// checker can still run the rules that do not read it. Never part of a checked model.
    pub(crate) fn stand_in() -> Train {
        Train {
            batch: 1,
            seq_len: 1,
            steps: 1,
            seed: 0,
            optimizer: AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            schedule: Schedule {
                kind: ScheduleKind::Constant,
                warmup: 0,
                min_lr: 0.0,
            },
            grad_clip: None,
            skip_nonfinite: false,
            data: DataSource::Builtin,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum DataSource {
    /// The deterministic built-in synthetic corpus.
    Builtin,
    /// A file or glob the runtime resolves: `.txt` (byte-level) or llm.c `.bin` shards.
    Path(String),
}

fn ser_stack<S: serde::Serializer>(layers: &[LayerKind], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::dsl::stack::format_stack(layers))
}

fn ser_display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Model {
    /// Every resolved setting as `(spec key, value)`, named as in `docs/spec.md`, defaults
    /// included; `kiln diff` compares specs with it. Keys of absent sections are omitted.
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| out.push((k.to_string(), v));
        let q = |s: &str| format!("{s:?}");
        let f = |x: f64| format!("{x:?}");
        put("model.name", q(&self.name));
        put("model.vocab", self.vocab.to_string());
        put("model.d_model", self.d_model.to_string());
        put(
            "model.layers",
            q(&crate::dsl::stack::format_stack(&self.layers)),
        );
        put("model.max_positions", self.max_positions.to_string());
        let positions = match self.positions {
            Positions::Rope => "rope",
            Positions::Learned => "learned",
        };
        put("model.positions", q(positions));
        let norm = match self.norm.kind {
            NormKind::RmsNorm => "rmsnorm",
            NormKind::LayerNorm => "layernorm",
        };
        put("model.norm", q(norm));
        put("model.norm_eps", f(self.norm.eps));
        put("model.tie_embeddings", self.tie_embeddings.to_string());
        put("model.init_std", f(self.init_std));

        let a = &self.attention;
        put("attention.heads", a.heads.to_string());
        match &a.kind {
            AttentionKind::Grouped { kv_heads, head_dim } => {
                let kind = if *kv_heads == a.heads { "mha" } else { "gqa" };
                put("attention.kind", q(kind));
                put("attention.kv_heads", kv_heads.to_string());
                put("attention.head_dim", head_dim.to_string());
            }
            AttentionKind::Latent(m) => {
                put("attention.kind", q("mla"));
                let q_rank = m.q_rank.map_or("(none)".to_string(), |r| r.to_string());
                put("attention.q_rank", q_rank);
                put("attention.kv_rank", m.kv_rank.to_string());
                put("attention.nope_dim", m.nope_dim.to_string());
                put("attention.rope_dim", m.rope_dim.to_string());
                put("attention.v_dim", m.v_dim.to_string());
            }
        }
        put("attention.bias", a.bias.to_string());
        if let Some(r) = &a.rope {
            put("attention.rope.theta", f(r.theta));
            if let Some(y) = &r.yarn {
                put("attention.rope.yarn.factor", f(y.factor));
                let orig = y.original_max_positions.to_string();
                put("attention.rope.yarn.original_max_positions", orig);
                put("attention.rope.yarn.beta_fast", f(y.beta_fast));
                put("attention.rope.yarn.beta_slow", f(y.beta_slow));
                put("attention.rope.yarn.mscale", f(y.mscale));
                put("attention.rope.yarn.mscale_all_dim", f(y.mscale_all_dim));
            }
        }
        if let Some(ffn) = &self.ffn {
            put("ffn.hidden", ffn.hidden.to_string());
            put("ffn.act", q(&ffn.act.expr.to_string()));
            put("ffn.bias", ffn.bias.to_string());
        }
        if let Some(m) = &self.moe {
            put("moe.experts", m.experts.to_string());
            put("moe.shared", m.shared.to_string());
            put("moe.top_k", m.top_k.to_string());
            put("moe.expert_hidden", m.expert_hidden.to_string());
            put("moe.act", q(&m.act.expr.to_string()));
            let score = match m.score {
                ScoreFunc::Softmax => "softmax",
                ScoreFunc::Sigmoid => "sigmoid",
            };
            put("moe.score", q(score));
            let select = match m.select {
                Selection::Greedy => "greedy",
                Selection::GroupLimited => "group_limited",
            };
            put("moe.select", q(select));
            put("moe.groups", m.groups.to_string());
            put("moe.groups_kept", m.groups_kept.to_string());
            let group_score = match m.group_score {
                GroupScore::Max => "max",
                GroupScore::Top2Sum => "top2_sum",
            };
            put("moe.group_score", q(group_score));
            put("moe.normalize_top_k", m.normalize_top_k.to_string());
            put("moe.route_scale", f(m.route_scale));
            put("moe.bias_update", f(m.bias_update));
            put("moe.seq_aux", f(m.seq_aux));
        }
        if let Some(m) = &self.mtp {
            put("mtp.depth", m.depth.to_string());
            put("mtp.weight", f(m.weight));
            put("mtp.block", q(m.block.name()));
        }
        let p = &self.precision;
        let formats = [
            ("compute", p.compute),
            ("linear", p.linear),
            ("linear_grad", p.linear_grad),
            ("embed", p.embed),
            ("head", p.head),
            ("router", p.router),
            ("norm", p.norm),
            ("attn_core", p.attn_core),
            ("act", p.act),
            ("keep_format", p.keep_format),
            ("master", p.master),
            ("grads", p.grads),
            ("moments", p.moments),
            ("kv_cache", p.kv_cache),
        ];
        for (k, v) in formats {
            put(&format!("precision.{k}"), q(v.name()));
        }
        let keep: Vec<String> = p.keep.iter().map(|k| q(&k.to_string())).collect();
        put("precision.keep", format!("[{}]", keep.join(", ")));
        if let Some(fp8) = &p.fp8 {
            put("precision.fp8.act_tile", format!("{:?}", fp8.act_tile));
            put(
                "precision.fp8.weight_block",
                format!("{:?}", fp8.weight_block),
            );
            let scale = match fp8.scale {
                ScaleFormat::Fp32 => "fp32",
                ScaleFormat::Pow2 => "pow2",
            };
            put("precision.fp8.scale", q(scale));
            put(
                "precision.fp8.promote_every",
                fp8.promote_every.unwrap_or(0).to_string(),
            );
            match fp8.accumulator {
                Accumulator::H100 => put("precision.fp8.accumulator", q("h100")),
                Accumulator::Truncate { bits } => {
                    put("precision.fp8.accumulator", q("truncate"));
                    put("precision.fp8.accumulator_bits", bits.to_string());
                }
            }
        }
        let t = &self.train;
        put("train.batch", t.batch.to_string());
        put("train.seq_len", t.seq_len.to_string());
        put("train.steps", t.steps.to_string());
        put("train.seed", t.seed.to_string());
        put("train.lr", f(t.optimizer.lr));
        put(
            "train.betas",
            format!("[{:?}, {:?}]", t.optimizer.beta1, t.optimizer.beta2),
        );
        put("train.eps", f(t.optimizer.eps));
        put("train.weight_decay", f(t.optimizer.weight_decay));
        let schedule = match t.schedule.kind {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Cosine => "cosine",
        };
        put("train.schedule", q(schedule));
        put("train.warmup", t.schedule.warmup.to_string());
        put("train.min_lr", f(t.schedule.min_lr));
        put("train.grad_clip", f(t.grad_clip.unwrap_or(0.0)));
        put("train.skip_nonfinite", t.skip_nonfinite.to_string());
        let data = match &t.data {
            DataSource::Builtin => "builtin",
            DataSource::Path(p) => p,
        };
        put("train.data", q(data));
        let r = &self.rl;
        put("rl.group", r.group.to_string());
        put("rl.questions", r.questions.to_string());
        put("rl.steps", r.steps.to_string());
        put("rl.lr", f(r.lr));
        put("rl.clip", f(r.clip));
        put("rl.kl", f(r.kl));
        put("rl.ref_reset", r.ref_reset.unwrap_or(0).to_string());
        put("rl.max_completion", r.max_completion.to_string());
        put("rl.temperature", f(r.temperature));
        put("rl.top_k", r.top_k.to_string());
        put("rl.updates", r.updates.to_string());
        let answer = match r.answer {
            AnswerFormat::Plain => "plain",
            AnswerFormat::Tagged => "tagged",
        };
        put("rl.answer", q(answer));
        put("rl.accuracy_weight", f(r.accuracy_weight));
        put("rl.format_weight", f(r.format_weight));
        let p = &self.parallel;
        put("parallel.dp", p.dp.to_string());
        put("parallel.ep", p.ep.to_string());
        put("parallel.pp", p.pp.to_string());
        put("parallel.schedule", q(p.schedule.name()));
        put("parallel.zero", p.zero.to_string());
        let micro = p.micro_batch(self.train.batch).to_string();
        put("parallel.micro_batch", micro);
        put("parallel.recompute", format!("{:?}", p.recompute.names()));
        out
    }

    /// Number of layers of a kind.
    pub fn count(&self, kind: LayerKind) -> u64 {
        self.layers.iter().filter(|&&k| k == kind).count() as u64
    }

    /// Leading dense layers (HF `first_k_dense_replace`).
    pub fn first_dense(&self) -> u64 {
        self.layers
            .iter()
            .take_while(|&&k| k == LayerKind::Dense)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_str;

    const TINY: &str = include_str!("../../specs/tiny.toml");
    const V3: &str = include_str!("../../specs/deepseek-v3.toml");

    #[test]
    fn yarn_scales_like_deepseek_v3() {
        let m = check_str(V3).unwrap();
        let yarn = m.attention.rope.unwrap().yarn.unwrap();
        let mscale = 0.1 * 40f64.ln() + 1.0;
        assert!((yarn.attention_mscale() - mscale).abs() < 1e-15);
        assert_eq!(yarn.rope_amplitude(), 1.0);
        let expected = 192f64.powf(-0.5) * mscale * mscale;
        assert!((m.attention.softmax_scale() - expected).abs() < 1e-15);
        let unequal = Yarn {
            mscale: 0.5,
            ..yarn
        };
        let amp = (0.05 * 40f64.ln() + 1.0) / mscale;
        assert!((unequal.rope_amplitude() - amp).abs() < 1e-15);
    }

    #[test]
    fn settings_name_every_key_by_its_spec_path() {
        let m = check_str(TINY).unwrap();
        let s = m.settings();
        let get = |k: &str| s.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("model.layers"), Some("\"dense, moe*3\""));
        assert_eq!(get("attention.kv_rank"), Some("64"));
        assert_eq!(get("moe.act"), Some("\"silu(gate) * up\""));
        assert_eq!(get("precision.fp8.accumulator"), Some("\"h100\""));
        assert_eq!(get("train.betas"), Some("[0.9, 0.95]"));
    }
}
