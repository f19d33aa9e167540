//! `check`: spec text → [`Model`], or every error in the file.
//!
//! Checking runs in three layers, each reporting all of its errors before the next runs:
//! 1. syntax: UTF-8 and TOML (stop here on failure: nothing else is trustworthy);
//! 2. sections: each section's keys, types, ranges and DSL strings, read independently;
//! 3. cross-field rules, then rules over the model's ops (precision patterns, FP8 tiles),
//!    which run only when every value they depend on is valid, so one mistake is one error.

pub mod extends;
mod op_rules;
mod overrides;
pub use overrides::{set, set_key, OVERRIDES};
mod reader;
mod sections;

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostic, Rule};
use crate::dsl::closest;
use crate::dsl::stack::LayerKind;
use crate::model::*;
use reader::{Section, Sink};

/// Largest accepted width of any model dimension.
const MAX_DIM: u64 = 1 << 20;
/// Largest accepted vocabulary.
const MAX_VOCAB: u64 = 1 << 24;
/// Largest accepted number of transformer blocks.
pub(crate) const MAX_LAYERS: usize = 4096;

const SECTIONS: &[&str] = &[
    "model",
    "attention",
    "ffn",
    "moe",
    "mtp",
    "precision",
    "train",
    "rl",
    "parallel",
];
const MODEL_KEYS: &[&str] = &[
    "name",
    "vocab",
    "d_model",
    "layers",
    "max_positions",
    "positions",
    "norm",
    "norm_eps",
    "tie_embeddings",
    "init_std",
];
const ATTENTION_KEYS: &[&str] = &[
    "kind", "heads", "kv_heads", "head_dim", "q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim",
    "bias", "rope",
];
const ROPE_KEYS: &[&str] = &["theta", "yarn"];
const YARN_KEYS: &[&str] = &[
    "factor",
    "original_max_positions",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
];
const FFN_KEYS: &[&str] = &["hidden", "act", "bias"];
const MOE_KEYS: &[&str] = &[
    "experts",
    "shared",
    "top_k",
    "expert_hidden",
    "act",
    "score",
    "select",
    "groups",
    "groups_kept",
    "group_score",
    "normalize_top_k",
    "route_scale",
    "bias_update",
    "seq_aux",
];
const MTP_KEYS: &[&str] = &["depth", "weight", "block"];
const PRECISION_KEYS: &[&str] = &[
    "compute",
    "linear",
    "linear_grad",
    "embed",
    "head",
    "router",
    "norm",
    "attn_core",
    "act",
    "keep",
    "keep_format",
    "master",
    "grads",
    "moments",
    "kv_cache",
    "fp8",
];
const FP8_KEYS: &[&str] = &[
    "act_tile",
    "weight_block",
    "scale",
    "promote_every",
    "accumulator",
    "accumulator_bits",
];
const TRAIN_KEYS: &[&str] = &[
    "batch",
    "seq_len",
    "steps",
    "seed",
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "schedule",
    "warmup",
    "min_lr",
    "grad_clip",
    "skip_nonfinite",
    "data",
];

const RL_KEYS: &[&str] = &[
    "group",
    "questions",
    "steps",
    "lr",
    "clip",
    "kl",
    "ref_reset",
    "max_completion",
    "temperature",
    "top_k",
    "updates",
    "answer",
    "accuracy_weight",
    "format_weight",
];

const PARALLEL_KEYS: &[&str] = &[
    "dp",
    "ep",
    "pp",
    "tp",
    "schedule",
    "zero",
    "micro_batch",
    "grad_accum",
    "recompute",
];

const FORMATS: &[(&str, Format)] = &[
    ("fp32", Format::Fp32),
    ("bf16", Format::Bf16),
    ("fp16", Format::Fp16),
    ("e4m3", Format::E4m3),
    ("e5m2", Format::E5m2),
];
const LAYER_KINDS: &[(&str, LayerKind)] = &[("dense", LayerKind::Dense), ("moe", LayerKind::Moe)];

/// Checks spec bytes. `Ok` holds a model satisfying every rule; `Err` holds every error found,
/// ordered by position. Never panics, whatever the input.
pub fn check(bytes: &[u8]) -> Result<Model, Vec<Diagnostic>> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to();
            let len = e.error_len().unwrap_or(bytes.len() - at);
            return Err(vec![Diagnostic::new(
                Rule::Syntax,
                at..at + len,
                format!("the spec is not valid UTF-8 (byte {at})"),
                "invalid UTF-8 here",
            )
            .with_help("save the file as UTF-8")]);
        }
    };
    check_str(text)
}

/// Checks spec text; see [`check`].
pub fn check_str(text: &str) -> Result<Model, Vec<Diagnostic>> {
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(syntax_errors(&errors));
    }
    let sink = Sink::new(text);
    // A section written as a plain value or misspelled is reported as such, not again as
    // missing.
    let misspelled_sections = root
        .get_ref()
        .iter()
        .filter_map(|(k, v)| {
            let k: &str = k.get_ref();
            match SECTIONS.iter().find(|s| **s == k) {
                Some(s) => (!v.get_ref().is_table()).then_some(*s),
                None => closest(k, SECTIONS.iter().copied()),
            }
        })
        .collect();
    let model = Checker {
        sink: &sink,
        misspelled_sections,
    }
    .run(root.get_ref());
    match model {
        Some(m) if !sink.has_errors() => Ok(m),
        _ => {
            let diags = sink.finish();
            if diags.is_empty() {
                // Unreachable by construction: every `None` above records an error. Report it
                // rather than panicking, so a checker bug is visible but harmless.
                Err(vec![Diagnostic::new(
                    Rule::Syntax,
                    0..0,
                    "internal checker error: the spec was rejected without a reason",
                    "please report this",
                )])
            } else {
                Err(diags)
            }
        }
    }
}

/// TOML parse errors as diagnostics, ordered by position.
fn syntax_errors(errors: &[toml::de::Error]) -> Vec<Diagnostic> {
    let mut diags: Vec<Diagnostic> = errors
        .iter()
        .map(|e| {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            let first = msg.lines().next().unwrap_or("invalid TOML").to_string();
            Diagnostic::new(Rule::Syntax, span, format!("invalid TOML: {first}"), first)
        })
        .collect();
    diags.sort_by_key(|d| (d.span.start, d.span.end));
    diags.dedup();
    diags
}

struct Checker<'a, 't> {
    sink: &'a Sink<'t>,
    /// Known sections already reported (misspelled, or written as a value); their absence is
    /// not reported again.
    misspelled_sections: Vec<&'static str>,
}

/// Spans the model-level rules point at.
#[derive(Default)]
struct Spans {
    layers: Range<usize>,
    linear: Range<usize>,
    linear_grad: Range<usize>,
    head: Range<usize>,
    keep: Vec<Range<usize>>,
    fp8: Range<usize>,
    /// `act_tile` and `weight_block` in `[precision.fp8]`, where written.
    fp8_keys: Vec<(&'static str, Range<usize>)>,
    seq_len: Range<usize>,
    mtp_block: Range<usize>,
    /// Integer dimension keys (`model.d_model`, `moe.expert_hidden`…), their values and spans,
    /// so an FP8 tiling error can point at the key a bad dimension comes from.
    dims: Vec<(String, u64, Range<usize>)>,
}

fn positive(x: f64) -> bool {
    x > 0.0
}

impl<'a, 't> Checker<'a, 't> {
    fn run(&self, root: &'a DeTable<'t>) -> Option<Model> {
        let mut sections: [Option<Section<'a, 't>>; 9] = Default::default();
        for (k, v) in root.iter() {
            let key: &str = k.get_ref();
            let Some(idx) = SECTIONS.iter().position(|s| *s == key) else {
                let help = match closest(key, SECTIONS.iter().copied()) {
                    Some(c) => format!("did you mean `[{c}]`?"),
                    None => format!(
                        "sections are: {}",
                        SECTIONS
                            .iter()
                            .map(|s| format!("[{s}]"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let what = if v.get_ref().is_table() {
                    "section"
                } else {
                    "top-level key"
                };
                self.sink.push(
                    Diagnostic::new(
                        Rule::UnknownSection,
                        k.span(),
                        format!("unknown {what} `{key}`"),
                        format!("unknown {what}"),
                    )
                    .with_help(help),
                );
                continue;
            };
            let DeValue::Table(t) = v.get_ref() else {
                self.sink.error(
                    Rule::Type,
                    k.span(),
                    format!("`{key}` must be a section (`[{key}]`), not a value"),
                    "expected a table",
                );
                continue;
            };
            let keys = [
                MODEL_KEYS,
                ATTENTION_KEYS,
                FFN_KEYS,
                MOE_KEYS,
                MTP_KEYS,
                PRECISION_KEYS,
                TRAIN_KEYS,
                RL_KEYS,
                PARALLEL_KEYS,
            ][idx];
            sections[idx] = Some(Section::new(self.sink, key, t, k.span(), keys));
        }
        let mut spans = Spans::default();
        const DIM_KEYS: [&[&str]; 4] = [
            &["d_model", "vocab"],
            &[
                "head_dim", "q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim",
            ],
            &["hidden"],
            &["expert_hidden"],
        ];
        for (sec, keys) in sections.iter().zip(DIM_KEYS) {
            let Some(sec) = sec else { continue };
            for key in keys {
                if let Some((n, span)) = sec.raw_int(key) {
                    spans.dims.push((format!("{}.{key}", sec.name), n, span));
                }
            }
        }
        let [model, attention, ffn, moe, mtp, precision, train, rl, parallel] = sections;

        let model = self.require(model, "model");
        let m = model
            .as_ref()
            .and_then(|s| self.model_section(s, &mut spans));
        let attention = self.require(attention, "attention");
        let positions = m.as_ref().map(|m| m.positions);
        let attn = attention
            .as_ref()
            .and_then(|a| self.attention(a, m.as_ref(), positions));

        let layers = m.as_ref().map(|m| m.layers.clone());
        if let Some(s) = &mtp {
            spans.mtp_block = s.span_of("block");
        }
        let mtp_written = mtp.is_some();
        let mtp = mtp.as_ref().and_then(|s| self.mtp(s, layers.as_deref()));
        // A kind of block is used by the stack or by the MTP modules; unknown if the stack is.
        let used = |kind| {
            let in_stack = layers.as_ref()?.contains(&kind);
            Some(Use {
                in_stack,
                in_mtp: mtp.is_some_and(|m| m.block == kind),
            })
        };
        let ffn = self
            .needed(ffn, "ffn", used(LayerKind::Dense), "dense", &spans)
            .and_then(|s| self.ffn(&s));
        let moe = self
            .needed(moe, "moe", used(LayerKind::Moe), "moe", &spans)
            .and_then(|s| self.moe(&s, ffn.as_ref()));
        let precision = precision.map_or_else(
            || Some(default_precision()),
            |p| self.precision(&p, &mut spans),
        );
        let train_sec = self.require(train, "train");
        spans.seq_len = train_sec.as_ref().map_or(0..0, |t| t.span_of("seq_len"));
        let batch_span = train_sec.as_ref().map_or(0..0, |t| t.span_of("batch"));
        // `batch` and `seq_len` as written, when each is valid on its own: the rules that read
        // only them need not wait for the rest of [train].
        let raw = |key: &str, max: u64| {
            let (n, _) = train_sec.as_ref()?.raw_int(key)?;
            (1..=max).contains(&n).then_some(n)
        };
        let (raw_batch, raw_seq) = (raw("batch", 1 << 20), raw("seq_len", 1 << 24));
        let train = train_sec.and_then(|t| self.train(&t, m.as_ref()));
        let rl = rl.map_or(Some(Rl::DEFAULT), |s| self.rl(&s, m.as_ref()));
        let parallel = parallel.as_ref().map_or(Some(Parallel::SINGLE), |s| {
            let p = self.parallel(s)?;
            // The layout rules read the stack, the experts and the batch: check them once
            // those are known, whatever else is wrong.
            let batch = train.as_ref().map(|t| t.batch).or(raw_batch);
            if let (Some(m), Some(batch)) = (&m, batch) {
                // Unknown when the section that says is itself in error.
                let moe_used = m.layers.contains(&LayerKind::Moe)
                    || mtp.is_some_and(|x| x.block == LayerKind::Moe);
                let experts = match &moe {
                    Some(x) => Some(Some(x.experts)),
                    None if moe_used => None,
                    None => Some(None),
                };
                let layers = m.layers.len() as u64;
                let mla = attn
                    .as_ref()
                    .map(|a| matches!(a.kind, AttentionKind::Latent(_)));
                let problems = p.problems(batch, layers, experts, mla);
                for problem in &problems {
                    let span = match problem.key {
                        "batch" => batch_span.clone(),
                        key if s.has(key) => s.span_of(key),
                        _ => s.span.clone(),
                    };
                    self.sink.push(
                        Diagnostic::new(Rule::Layout, span, problem.message.clone(), "here")
                            .with_help(problem.help.clone()),
                    );
                }
                if !problems.is_empty() {
                    return None;
                }
            }
            Some(p)
        });

        // The op rules read the model's shape, its blocks and the precision policy (and the
        // tokens per step): run them when those are valid, whatever else is wrong, so that
        // one pass reports every independent mistake.
        let uses = |kind| {
            layers.as_ref().is_some_and(|l| l.contains(&kind))
                || mtp.is_some_and(|x| x.block == kind)
        };
        let blocks_ok = ffn.is_some() == uses(LayerKind::Dense)
            && moe.is_some() == uses(LayerKind::Moe)
            && (mtp.is_some() || !mtp_written);
        let m = m?;
        let attention = attn?;
        let precision = precision?;
        let tokens = raw_batch.zip(raw_seq).map(|(b, t)| b * t);
        let model = Model {
            name: m.name,
            vocab: m.vocab,
            d_model: m.d_model,
            max_positions: m.max_positions,
            layers: m.layers,
            positions: m.positions,
            norm: m.norm,
            tie_embeddings: m.tie_embeddings,
            init_std: m.init_std,
            attention,
            ffn,
            moe,
            mtp,
            precision,
            // Stand-ins while their own errors are reported; the model is not returned then.
            train: train.clone().unwrap_or_else(Train::stand_in),
            rl: rl.unwrap_or(Rl::DEFAULT),
            parallel: parallel.unwrap_or(Parallel::SINGLE),
        };
        if blocks_ok {
            self.op_rules(&model, tokens, &spans);
        }
        if self.sink.has_errors() || train.is_none() || rl.is_none() || parallel.is_none() {
            return None;
        }
        Some(model)
    }

    fn require(&self, s: Option<Section<'a, 't>>, name: &str) -> Option<Section<'a, 't>> {
        if s.is_none() && !self.misspelled_sections.contains(&name) {
            let end = self.sink.text.len();
            self.sink.push(
                Diagnostic::new(
                    Rule::MissingKey,
                    end..end,
                    format!("missing required section [{name}]"),
                    format!("add a [{name}] section"),
                )
                .with_help("see docs/spec.md for every section and key"),
            );
        }
        s
    }

    /// A section that must be present exactly when some block (of the stack or the MTP
    /// modules) uses it.
    fn needed(
        &self,
        s: Option<Section<'a, 't>>,
        name: &str,
        used: Option<Use>,
        kind: &str,
        spans: &Spans,
    ) -> Option<Section<'a, 't>> {
        let Some(used) = used else { return s };
        let layers_span = &spans.layers;
        match s {
            None if (used.in_stack || used.in_mtp) && !self.misspelled_sections.contains(&name) => {
                let (span, message) = if used.in_stack {
                    (layers_span, format!("the layer stack has `{kind}` layers but the spec has no [{name}] section"))
                } else {
                    (&spans.mtp_block, format!("the MTP modules use a `{kind}` block but the spec has no [{name}] section"))
                };
                let label = format!("`{kind}` blocks need [{name}]");
                self.sink.push(
                    Diagnostic::new(Rule::MissingKey, span.clone(), message, label)
                        .with_help(format!("add a [{name}] section; see docs/spec.md")),
                );
                None
            }
            Some(s) if !used.in_stack && !used.in_mtp => {
                self.sink.push(
                    Diagnostic::new(
                        Rule::Conflict,
                        s.span.clone(),
                        format!("[{name}] has no effect: no layer of the stack is `{kind}`"),
                        "unused section",
                    )
                    .with_related(layers_span.clone(), "the layer stack")
                    .with_help(format!(
                        "remove [{name}] or add `{kind}` layers to `model.layers`"
                    )),
                );
                None
            }
            s => s,
        }
    }
}

/// The policy of a spec without [precision]: bf16 compute, fp32 master weights, gradients
/// and moments.
fn default_precision() -> Precision {
    let c = Format::Bf16;
    Precision {
        compute: c,
        linear: c,
        linear_grad: c,
        embed: c,
        head: c,
        router: c,
        norm: c,
        attn_core: c,
        act: c,
        keep: Vec::new(),
        keep_format: c,
        fp8: None,
        master: Format::Fp32,
        grads: Format::Fp32,
        moments: Format::Fp32,
        kv_cache: c,
    }
}

/// Where a kind of block occurs: in the main stack, in the MTP modules, or both.
#[derive(Clone, Copy)]
struct Use {
    in_stack: bool,
    in_mtp: bool,
}

/// The [model] section's values, before the other sections are read.
struct PartialModel {
    name: String,
    vocab: u64,
    d_model: u64,
    max_positions: u64,
    layers: Vec<LayerKind>,
    positions: Positions,
    norm: Norm,
    tie_embeddings: bool,
    init_std: f64,
}
