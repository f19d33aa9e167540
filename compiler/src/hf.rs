//! `hf`: the mapping between Hugging Face `config.json` files and kiln specs, for the four
//! families kiln shares with HF transformers: `deepseek_v3`, `deepseek_v2` (DeepSeek-V2 and
//! V2-Lite), `llama` and `gpt2`. Architecture only: no weights, and no I/O (callers hand in and
//! take back text and values).
//!
//! - [`import_config`] turns a `config.json` text into spec text that [`crate::check::check`]
//!   accepts, plus notes on every choice a user may want to know about (defaults applied,
//!   fields ignored).
//! - [`family_of`] says which family a checked [`Model`] maps to, or names every feature that
//!   has no HF equivalent.
//! - [`export_config`] writes the family's `config.json` fields for a model, such that importing
//!   them gives back the same model in every field except `train` and `precision`.
//!
//! Nothing is dropped silently. Every key of a config is mapped to a spec key, on an explicit
//! list of keys that carry no architecture (token ids, dtype, generation settings, …), or
//! reported; a value kiln cannot express (a RoPE scaling other than YaRN, a sliding window, a
//! quantized checkpoint, …) is an error that names the field, the value and what is supported.
//! All problems of a config are reported together. `docs/hf.md` has the field-by-field table.
//!
//! The semantics followed are HF transformers 5.x's (the version the project measures against),
//! which also reads the older hub form of RoPE settings (`rope_theta` + `rope_scaling`); export
//! writes that older form, which transformers 4.x and 5.x both read.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{json, Map, Value};

use crate::check::check_str;
use crate::dsl::closest;
use crate::dsl::stack::{format_stack, LayerKind};
use crate::model::{
    AttentionKind, GroupScore, Mla, Model, NormKind, Positions, Rope, ScoreFunc, Selection, Yarn,
};

/// The HF model families kiln maps to and from (the `model_type` field of `config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `deepseek_v3`: MLA, DeepSeekMoE with sigmoid scores and group-limited routing, MTP.
    DeepseekV3,
    /// `deepseek_v2`: MLA, DeepSeekMoE with softmax scores (DeepSeek-V2 and V2-Lite).
    DeepseekV2,
    /// `llama`: MHA/GQA with RoPE, SwiGLU, RMSNorm.
    Llama,
    /// `gpt2`: MHA with biases, LayerNorm, a GELU (tanh) MLP, learned positions.
    Gpt2,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::DeepseekV3,
        Family::DeepseekV2,
        Family::Llama,
        Family::Gpt2,
    ];

    /// The `model_type` of the family's `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::DeepseekV3 => "deepseek_v3",
            Family::DeepseekV2 => "deepseek_v2",
            Family::Llama => "llama",
            Family::Gpt2 => "gpt2",
        }
    }

    /// The HF class of the causal language model (`architectures` in `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
            Family::DeepseekV2 => "DeepseekV2ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Gpt2 => "GPT2LMHeadModel",
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    fn is_deepseek(self) -> bool {
        matches!(self, Family::DeepseekV3 | Family::DeepseekV2)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

/// A `config.json` turned into a kiln spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedConfig {
    pub family: Family,
    /// TOML spec text that `check` accepts. Its `[train]` section holds the placeholders
    /// described at [`TRAIN_DEFAULTS`]; `[precision]` is omitted (kiln's defaults).
    pub spec: String,
    /// Full sentences on what the import decided without the config saying so: HF defaults for
    /// absent fields, values kiln ignores (dropout), and settings HF does not carry (the MTP loss
    /// weight, the balancing speed).
    pub notes: Vec<String>,
}

/// The `[train]` section of an imported spec. HF configs carry no training settings, so these
/// are small placeholders meant to be edited: 8 sequences of 256 tokens (fewer when the model
/// supports fewer positions), 1,000 steps, AdamW at 3e-4 with 100 warmup steps and a cosine
/// decay to 3e-5, on the built-in corpus. Every other `[train]` key keeps its spec default.
pub const TRAIN_DEFAULTS: TrainDefaults = TrainDefaults {
    batch: 8,
    seq_len: 256,
    steps: 1000,
    lr: 3e-4,
    warmup: 100,
    min_lr: 3e-5,
};

/// See [`TRAIN_DEFAULTS`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainDefaults {
    pub batch: u64,
    /// Capped at the model's `max_positions`.
    pub seq_len: u64,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub min_lr: f64,
}

/// The V3 report's aux-loss-free balancing speed γ, used when a `deepseek_v3` config does not
/// say (HF stores only the learned per-expert bias, not γ).
pub const DEFAULT_BIAS_UPDATE: f64 = 0.001;
/// The V3 report's MTP loss weight λ, used when a `deepseek_v3` config does not say.
pub const DEFAULT_MTP_WEIGHT: f64 = 0.3;

/// Everything that can go wrong between a `config.json` and a model.
#[derive(Clone, Debug, PartialEq)]
pub enum HfError {
    /// The text is not JSON, or its top level is not an object.
    Json(String),
    /// Every problem that keeps a config from importing, in the order the fields were read.
    Import {
        /// The config's `model_type`, when it is a string.
        model_type: Option<String>,
        problems: Vec<Problem>,
    },
    /// Every feature of a model that no HF family expresses.
    Export {
        model: String,
        problems: Vec<Problem>,
    },
    /// The spec made from a config does not check: a value lies outside kiln's ranges (the
    /// diagnostics name the spec key and its HF field in a comment), or the importer has a bug.
    Spec {
        spec: String,
        /// The checker's diagnostics, rendered against `spec`.
        diagnostics: String,
    },
}

/// One problem with a config field (import) or a model feature (export).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The config field on import (`rope_scaling.type`), the spec key on export (`ffn.act`).
    pub field: String,
    pub kind: ProblemKind,
    /// A full sentence: what was found, why it is a problem, what is supported.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// A key that is neither mapped nor known to carry no architecture.
    UnknownKey,
    /// A required field is absent or null.
    Missing,
    /// A field has the wrong JSON type.
    Type,
    /// A value kiln cannot express.
    Unsupported,
    /// Fields that contradict each other.
    Inconsistent,
    /// A model feature no HF family expresses (export).
    NoEquivalent,
}

impl ProblemKind {
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::UnknownKey => "unknown-key",
            ProblemKind::Missing => "missing",
            ProblemKind::Type => "type",
            ProblemKind::Unsupported => "unsupported",
            ProblemKind::Inconsistent => "inconsistent",
            ProblemKind::NoEquivalent => "no-hf-equivalent",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind.name(), self.message)
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HfError::Json(e) => write!(f, "cannot read config.json: {e}"),
            HfError::Import {
                model_type,
                problems,
            } => {
                write!(f, "cannot import config.json")?;
                if let Some(t) = model_type {
                    write!(f, " (model_type {t:?})")?;
                }
                writeln!(f, ": {}", count(problems.len(), "problem"))?;
                for p in problems {
                    writeln!(f, "  {p}")?;
                }
                Ok(())
            }
            HfError::Export { model, problems } => {
                writeln!(
                    f,
                    "model `{model}` has no Hugging Face config: {}",
                    count(problems.len(), "problem")
                )?;
                for p in problems {
                    writeln!(f, "  {p}")?;
                }
                Ok(())
            }
            HfError::Spec { diagnostics, .. } => write!(
                f,
                "the spec imported from config.json does not check (a value outside kiln's \
                 ranges, or a bug in the importer):\n{diagnostics}"
            ),
        }
    }
}

impl std::error::Error for HfError {}

// ---------------------------------------------------------------------------------------------
// Reading config.json
// ---------------------------------------------------------------------------------------------

/// Keys of every family that carry no architecture: bookkeeping, token ids, the stored dtype,
/// runtime flags, fine-tuning labels, remote-code pointers and generation settings (which
/// transformers 5.x drops on load).
const IGNORED: &[&str] = &[
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "auto_map",
    "tokenizer_class",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    "torchscript",
    "chunk_size_feed_forward",
    "gradient_checkpointing",
    "is_decoder",
    "tie_encoder_decoder",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "prefix",
    "task_specific_params",
    // Generation settings (transformers' `GenerationConfig` defaults).
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
];

/// GPT-2 keys that carry no architecture of the language model: the settings of the
/// classification head of `GPT2DoubleHeadsModel`, and an attention-numerics flag (upcasting to
/// fp32 and scaling before the product computes the same function).
const IGNORED_GPT2: &[&str] = &[
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "reorder_and_upcast_attn",
];

/// DeepSeek keys that carry no architecture: the expert-parallel degree.
const IGNORED_DEEPSEEK: &[&str] = &["ep_size"];

/// HF's `attribute_map` aliases, `(alias, field)`: a config may spell the field either way.
fn aliases(family: Family) -> &'static [(&'static str, &'static str)] {
    match family {
        Family::DeepseekV3 => &[
            ("num_local_experts", "n_routed_experts"),
            ("num_mtp_layers", "num_nextn_predict_layers"),
        ],
        Family::DeepseekV2 => &[("num_experts", "n_routed_experts")],
        Family::Llama => &[],
        Family::Gpt2 => &[
            ("hidden_size", "n_embd"),
            ("max_position_embeddings", "n_positions"),
            ("num_attention_heads", "n_head"),
            ("num_hidden_layers", "n_layer"),
        ],
    }
}

/// A JSON value as a user would write it, shortened when long.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// `the string "x"`, `the number 1.5`, … for type errors.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => format!("the string {}", show(v)),
        Value::Array(_) => format!("the array {}", show(v)),
        Value::Object(_) => format!("the object {}", show(v)),
    }
}

/// Reads the fields of one config object, remembering which keys it has read so that the rest
/// can be reported, and collecting every problem and note.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    /// Prefix of field names in messages (`rope_scaling.` inside the RoPE table).
    prefix: String,
    aliases: &'static [(&'static str, &'static str)],
    /// Every key this reader knows (read, aliased or ignored), for unknown-key detection.
    known: BTreeSet<&'static str>,
    problems: Vec<Problem>,
    notes: Vec<String>,
}

impl<'a> Reader<'a> {
    fn new(obj: &'a Map<String, Value>, prefix: &str) -> Self {
        Reader {
            obj,
            prefix: prefix.to_string(),
            aliases: &[],
            known: BTreeSet::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn problem(&mut self, key: &str, kind: ProblemKind, message: String) {
        let field = self.name(key);
        self.problems.push(Problem {
            field,
            kind,
            message,
        });
    }

    fn unsupported(&mut self, key: &str, v: &Value, why: &str) {
        let msg = format!("`{}` is {}: {why}", self.name(key), show(v));
        self.problem(key, ProblemKind::Unsupported, msg);
    }

    fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// The value of `key` or of one of its aliases, null included; marks them known.
    fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.insert(key);
        let mut found = self.obj.get(key);
        for &(alias, field) in self.aliases {
            if field != key {
                continue;
            }
            self.known.insert(alias);
            let Some(v) = self.obj.get(alias) else {
                continue;
            };
            match found {
                None => found = Some(v),
                Some(f) if f != v => {
                    let msg = format!(
                        "`{}` ({}) and `{}` ({}) are one field in HF (an alias) but disagree",
                        self.name(alias),
                        show(v),
                        self.name(key),
                        show(f)
                    );
                    self.problem(key, ProblemKind::Inconsistent, msg);
                }
                Some(_) => {}
            }
        }
        found
    }

    /// The value of `key` unless it is absent or null.
    fn present(&mut self, key: &'static str) -> Option<&'a Value> {
        self.raw(key).filter(|v| !v.is_null())
    }

    fn has(&mut self, key: &'static str) -> bool {
        self.present(key).is_some()
    }

    fn missing(&mut self, key: &'static str, means: &str) {
        let found = if self.obj.contains_key(key) {
            "is null"
        } else {
            "is missing"
        };
        let msg = format!("`{}` {found}: it is required ({means})", self.name(key));
        self.problem(key, ProblemKind::Missing, msg);
    }

    fn wrong_type(&mut self, key: &str, expected: &str, v: &Value) {
        let msg = format!(
            "`{}` must be {expected}, found {}",
            self.name(key),
            describe(v)
        );
        self.problem(key, ProblemKind::Type, msg);
    }

    fn defaulted(&mut self, key: &str, default: &str) {
        if !self.obj.contains_key(key) {
            let msg = format!(
                "`{}` is absent: using HF's default {default}",
                self.name(key)
            );
            self.note(msg);
        }
    }

    fn as_int(&mut self, key: &str, v: &Value) -> Option<u64> {
        let n = v.as_u64();
        if n.is_none() {
            self.wrong_type(key, "a non-negative integer", v);
        }
        n
    }

    fn as_float(&mut self, key: &str, v: &Value) -> Option<f64> {
        let x = v.as_f64();
        if x.is_none() {
            self.wrong_type(key, "a number", v);
        }
        x
    }

    fn as_bool(&mut self, key: &str, v: &Value) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.wrong_type(key, "true or false", v);
        }
        b
    }

    fn as_str(&mut self, key: &str, v: &'a Value) -> Option<&'a str> {
        let s = v.as_str();
        if s.is_none() {
            self.wrong_type(key, "a string", v);
        }
        s
    }

    fn req_int(&mut self, key: &'static str, means: &str) -> Option<u64> {
        match self.present(key) {
            Some(v) => self.as_int(key, v),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    /// An integer field that may be null (`q_lora_rank`, `n_inner`); `Some(None)` for null.
    fn req_nullable_int(&mut self, key: &'static str, means: &str) -> Option<Option<u64>> {
        match self.raw(key) {
            Some(Value::Null) => Some(None),
            Some(v) => self.as_int(key, v).map(Some),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    fn req_float(&mut self, key: &'static str, means: &str) -> Option<f64> {
        match self.present(key) {
            Some(v) => self.as_float(key, v),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    fn opt_float(&mut self, key: &'static str, default: f64) -> Option<f64> {
        match self.present(key) {
            Some(v) => self.as_float(key, v),
            None => {
                self.defaulted(key, &format!("{default:?}"));
                Some(default)
            }
        }
    }

    fn opt_bool(&mut self, key: &'static str, default: bool) -> Option<bool> {
        match self.present(key) {
            Some(v) => self.as_bool(key, v),
            None => {
                self.defaulted(key, &default.to_string());
                Some(default)
            }
        }
    }

    fn opt_str(&mut self, key: &'static str, default: &'static str) -> Option<&'a str> {
        match self.present(key) {
            Some(v) => self.as_str(key, v),
            None => {
                self.defaulted(key, &format!("{default:?}"));
                Some(default)
            }
        }
    }

    /// A field whose value must be `ok` when present and not null; otherwise `why` explains.
    fn expect(&mut self, key: &'static str, ok: impl Fn(&Value) -> bool, why: &str) {
        if let Some(v) = self.present(key) {
            if !ok(v) {
                self.unsupported(key, v, why);
            }
        }
    }

    /// A dropout probability: kiln trains without dropout, so a non-zero value is noted.
    fn dropout(&mut self, key: &'static str) {
        if let Some(v) = self.present(key) {
            match v.as_f64() {
                Some(p) if p != 0.0 => self.note(format!(
                    "`{}` = {p} is ignored: kiln trains without dropout",
                    self.name(key)
                )),
                Some(_) => {}
                None => self.wrong_type(key, "a number", v),
            }
        }
    }

    /// A layer count kiln can hold: 1 to the checker's limit (so no huge stack is built).
    fn layer_count(&mut self, key: &'static str, n: Option<u64>) -> Option<usize> {
        let n = n?;
        match usize::try_from(n) {
            Ok(l) if (1..=crate::check::MAX_LAYERS).contains(&l) => Some(l),
            _ => {
                let why = format!("kiln models have 1 to {} layers", crate::check::MAX_LAYERS);
                self.unsupported(key, &json!(n), &why);
                None
            }
        }
    }

    fn ignore(&mut self, keys: &[&'static str]) {
        self.known.extend(keys.iter().copied());
    }

    /// Reports every key this reader did not read or ignore.
    fn unknown_keys(&mut self, whose: &str) {
        let unknown: Vec<&String> = self
            .obj
            .keys()
            .filter(|k| !self.known.contains(k.as_str()))
            .collect();
        for key in unknown {
            let mut msg = format!(
                "`{}` is not a field kiln maps or ignores in {whose}",
                self.name(key)
            );
            if let Some(c) = closest(key, self.known.iter().copied()) {
                msg.push_str(&format!(" (did you mean `{}`?)", self.name(c)));
            }
            self.problem(key, ProblemKind::UnknownKey, msg);
        }
    }
}

/// What an import found, in the terms of a spec: the values the spec will hold.
struct Arch {
    vocab: u64,
    d_model: u64,
    layers: Vec<LayerKind>,
    max_positions: u64,
    positions: Positions,
    norm: NormKind,
    norm_eps: f64,
    tie: bool,
    init_std: f64,
    heads: u64,
    attention: AttentionKind,
    attention_bias: bool,
    rope: Option<Rope>,
    ffn: Option<FfnOut>,
    moe: Option<MoeOut>,
    mtp: Option<MtpOut>,
}

struct FfnOut {
    hidden: u64,
    act: &'static str,
    bias: bool,
}

struct MoeOut {
    experts: u64,
    shared: u64,
    top_k: u64,
    expert_hidden: u64,
    act: &'static str,
    score: ScoreFunc,
    select: Selection,
    groups: u64,
    groups_kept: u64,
    group_score: GroupScore,
    normalize_top_k: bool,
    route_scale: f64,
    bias_update: f64,
    seq_aux: f64,
}

struct MtpOut {
    depth: u64,
    weight: f64,
    block: LayerKind,
}

/// A key that appears twice in one JSON object, with different values: its path and both values.
type Repeated = (String, Value, Value);

/// Parses JSON like `serde_json::from_str`, and also returns the keys that an object repeats
/// with different values: serde_json, like Python's `json` (and so transformers), silently keeps
/// the last of them.
fn parse_json(text: &str) -> Result<(Value, Vec<Repeated>), serde_json::Error> {
    use serde::de::DeserializeSeed;
    let repeated = std::cell::RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Tracked {
        path: String::new(),
        repeated: &repeated,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, repeated.into_inner()))
}

/// Deserializes one JSON value at `path`, recording repeated keys of the objects inside it.
struct Tracked<'r> {
    path: String,
    repeated: &'r std::cell::RefCell<Vec<Repeated>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Tracked<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Tracked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(json!(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(json!(n))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so every parsed float is finite.
        Ok(serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Tracked {
            path: format!("{}[{}]", self.path, out.len()),
            repeated: self.repeated,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let v = map.next_value_seed(Tracked {
                path: path.clone(),
                repeated: self.repeated,
            })?;
            if let Some(first) = out.insert(key, v.clone()) {
                if first != v {
                    self.repeated.borrow_mut().push((path, first, v));
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Reads a `config.json` and writes the kiln spec of the same architecture, named `name`.
///
/// The spec is checked before it is returned; see [`HfError`] for what can go wrong. Every
/// problem of the config is reported at once.
pub fn import_config(config_json: &str, name: &str) -> Result<ImportedConfig, HfError> {
    let (value, repeated) =
        parse_json(config_json).map_err(|e| HfError::Json(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(HfError::Json(format!(
            "the top level must be an object, found {}",
            describe(&value)
        )));
    };
    let model_type = obj.get("model_type");
    let family = match model_type {
        Some(Value::String(t)) => Family::from_model_type(t),
        _ => None,
    };
    let Some(family) = family else {
        let supported = "kiln imports \"deepseek_v3\", \"deepseek_v2\", \"llama\" and \"gpt2\"";
        let (kind, message) = match model_type {
            None => (
                ProblemKind::Missing,
                format!("`model_type` is missing: it names the model family ({supported})"),
            ),
            Some(Value::String(t)) => (
                ProblemKind::Unsupported,
                format!("`model_type` is {t:?}: {supported}"),
            ),
            Some(v) => (
                ProblemKind::Type,
                format!("`model_type` must be a string, found {}", describe(v)),
            ),
        };
        return Err(HfError::Import {
            model_type: model_type.and_then(|v| v.as_str()).map(str::to_string),
            problems: vec![Problem {
                field: "model_type".to_string(),
                kind,
                message,
            }],
        });
    };

    let mut r = Reader::new(obj, "");
    r.aliases = aliases(family);
    r.known.insert("model_type");
    for (field, first, last) in repeated {
        let msg = format!(
            "`{field}` appears more than once, with different values ({} and {}); JSON readers \
             keep the last one, so the config says two things",
            show(&first),
            show(&last)
        );
        r.problems.push(Problem {
            field,
            kind: ProblemKind::Inconsistent,
            message: msg,
        });
    }
    let arch = match family {
        Family::DeepseekV3 | Family::DeepseekV2 => read_deepseek(&mut r, family),
        Family::Llama => read_llama(&mut r),
        Family::Gpt2 => read_gpt2(&mut r),
    };
    read_generic(&mut r, family);
    r.unknown_keys(&format!("HF's {family} config"));
    let arch = match arch {
        Some(a) if r.problems.is_empty() => a,
        _ => {
            return Err(HfError::Import {
                model_type: Some(family.model_type().to_string()),
                problems: r.problems,
            })
        }
    };
    let spec = write_spec(&arch, family, name);
    match check_str(&spec) {
        Ok(_) => Ok(ImportedConfig {
            family,
            spec,
            notes: r.notes,
        }),
        Err(diags) => Err(HfError::Spec {
            diagnostics: crate::diag::render("imported spec", &spec, &diags, false),
            spec,
        }),
    }
}

/// Keys every family shares that either carry no architecture, or must hold their default
/// because kiln has no equivalent of anything else.
fn read_generic(r: &mut Reader, family: Family) {
    r.ignore(IGNORED);
    match family {
        Family::Gpt2 => r.ignore(IGNORED_GPT2),
        Family::DeepseekV3 | Family::DeepseekV2 => r.ignore(IGNORED_DEEPSEEK),
        Family::Llama => {}
    }
    if let Some(q) = r.present("quantization_config") {
        let method = match q.get("quant_method") {
            Some(m) => format!(" with quant_method {}", show(m)),
            None => String::new(),
        };
        let msg = format!(
            "`quantization_config` is set{method}: the checkpoint's weights are quantized, \
             and kiln maps only unquantized checkpoints; use a bf16/fp32 copy of the weights, \
             whose config has no `quantization_config`"
        );
        r.problem("quantization_config", ProblemKind::Unsupported, msg);
    }
    r.expect(
        "is_encoder_decoder",
        |v| v == &Value::Bool(false),
        "kiln models are decoder-only",
    );
    r.expect(
        "add_cross_attention",
        |v| v == &Value::Bool(false),
        "kiln models have no cross-attention",
    );
    r.expect(
        "pruned_heads",
        |v| v.as_object().is_some_and(Map::is_empty),
        "kiln has no pruned attention heads; every layer has all of its heads",
    );
    r.expect(
        "per_layer_config",
        |_| false,
        "kiln layers of one kind share one configuration",
    );
    r.expect(
        "sliding_window",
        |_| false,
        "kiln's attention is full causal attention, without a sliding window",
    );
    r.expect(
        "use_sliding_window",
        |v| v == &Value::Bool(false),
        "kiln's attention is full causal attention, without a sliding window",
    );
    r.expect(
        "layer_types",
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().all(|t| t == "full_attention"))
        },
        "kiln's attention is full causal attention in every layer",
    );
}

/// The MLP activation (`hidden_act`, GPT-2's `activation_function`) as the activation expression
/// the family's MLP computes with it: `silu(gate) * up` for the gated families, `gelu_tanh(x)`
/// for GPT-2. Other activations are refused, so that export can always write the family's own.
fn act_of(r: &mut Reader, key: &'static str, family: Family) -> Option<&'static str> {
    let default = if family == Family::Gpt2 {
        "gelu_new"
    } else {
        "silu"
    };
    let act = r.opt_str(key, default)?;
    let v = Value::String(act.to_string());
    match (family, act) {
        (Family::Gpt2, "gelu_new") => Some("gelu_tanh(x)"),
        (Family::Gpt2, "gelu_pytorch_tanh") => {
            r.note(format!(
                "`{key}` = \"gelu_pytorch_tanh\" is the same function as \"gelu_new\" \
                 (`gelu_tanh(x)`); export writes \"gelu_new\""
            ));
            Some("gelu_tanh(x)")
        }
        (Family::Gpt2, _) => {
            r.unsupported(
                key,
                &v,
                "kiln maps GPT-2's MLP activation \"gelu_new\" (and its equal \
                 \"gelu_pytorch_tanh\") to `gelu_tanh(x)`",
            );
            None
        }
        (_, "silu") => Some("silu(gate) * up"),
        (_, "swish") => {
            r.note(format!(
                "`{key}` = \"swish\" is HF's other name of \"silu\"; export writes \"silu\""
            ));
            Some("silu(gate) * up")
        }
        _ => {
            r.unsupported(
                key,
                &v,
                "kiln maps this family's gated MLP only with \"silu\" (SwiGLU, \
                 `silu(gate) * up`)",
            );
            None
        }
    }
}

/// `pretraining_tp` of the RoPE families: 1 (or absent) is the only value kiln computes.
fn read_pretraining_tp(r: &mut Reader) {
    r.expect(
        "pretraining_tp",
        |v| v.as_u64() == Some(1),
        "kiln computes each projection as one matrix product; `pretraining_tp` > 1 asks for \
         the sliced products of tensor-parallel pretraining, which kiln does not emulate",
    );
}

fn read_llama(r: &mut Reader) -> Option<Arch> {
    let vocab = r.req_int("vocab_size", "kiln `model.vocab`");
    let d_model = r.req_int("hidden_size", "kiln `model.d_model`");
    let hidden = r.req_int("intermediate_size", "kiln `ffn.hidden`");
    let layers = r.req_int("num_hidden_layers", "kiln `model.layers`");
    let layers = r.layer_count("num_hidden_layers", layers);
    let heads = r.req_int("num_attention_heads", "kiln `attention.heads`");
    let max_positions = r.req_int("max_position_embeddings", "kiln `model.max_positions`");
    let kv_heads = match r.present("num_key_value_heads") {
        Some(v) => r.as_int("num_key_value_heads", v),
        None => heads,
    };
    let head_dim = match r.present("head_dim") {
        Some(v) => r.as_int("head_dim", v),
        // HF's default, `hidden_size / num_attention_heads`, which HF requires to be exact.
        None => match (d_model, heads) {
            (Some(d), Some(h)) if h > 0 && d % h != 0 => {
                let msg = format!(
                    "`hidden_size` ({d}) is not a multiple of `num_attention_heads` ({h}), \
                     and there is no `head_dim` to say the head size"
                );
                r.problem("head_dim", ProblemKind::Missing, msg);
                None
            }
            // A zero head count is reported by the checker as `attention.heads`.
            (Some(d), Some(h)) => Some(d.checked_div(h).unwrap_or(0)),
            _ => None,
        },
    };
    let act = act_of(r, "hidden_act", Family::Llama);
    let norm_eps = r.opt_float("rms_norm_eps", 1e-6);
    let init_std = r.opt_float("initializer_range", 0.02);
    let tie = r.opt_bool("tie_word_embeddings", false);
    let attention_bias = r.opt_bool("attention_bias", false);
    let mlp_bias = r.opt_bool("mlp_bias", false);
    r.dropout("attention_dropout");
    read_pretraining_tp(r);
    let rope = read_rope(r, Family::Llama, max_positions);
    Some(Arch {
        vocab: vocab?,
        d_model: d_model?,
        layers: vec![LayerKind::Dense; layers?],
        max_positions: max_positions?,
        positions: Positions::Rope,
        norm: NormKind::RmsNorm,
        norm_eps: norm_eps?,
        tie: tie?,
        init_std: init_std?,
        heads: heads?,
        attention: AttentionKind::Grouped {
            kv_heads: kv_heads?,
            head_dim: head_dim?,
        },
        attention_bias: attention_bias?,
        rope: Some(rope?),
        ffn: Some(FfnOut {
            hidden: hidden?,
            act: act?,
            bias: mlp_bias?,
        }),
        moe: None,
        mtp: None,
    })
}

fn read_gpt2(r: &mut Reader) -> Option<Arch> {
    let vocab = r.req_int("vocab_size", "kiln `model.vocab`");
    let d_model = r.req_int("n_embd", "kiln `model.d_model`");
    let layers = r.req_int("n_layer", "kiln `model.layers`");
    let layers = r.layer_count("n_layer", layers);
    let heads = r.req_int("n_head", "kiln `attention.heads`");
    let max_positions = r.req_int("n_positions", "kiln `model.max_positions`");
    if let (Some(v), Some(n)) = (r.present("n_ctx"), max_positions) {
        // `n_ctx` is the older name of the context length; transformers no longer reads it.
        if v.as_u64() != Some(n) {
            let msg = format!(
                "`n_ctx` ({}) differs from `n_positions` ({n}); HF sizes the position table \
                 by `n_positions`",
                show(v)
            );
            r.problem("n_ctx", ProblemKind::Inconsistent, msg);
        }
    }
    let hidden = match r.raw("n_inner") {
        Some(Value::Null) | None => d_model.map(|d| d.saturating_mul(4)),
        Some(v) => r.as_int("n_inner", v),
    };
    let act = act_of(r, "activation_function", Family::Gpt2);
    let norm_eps = r.opt_float("layer_norm_epsilon", 1e-5);
    let init_std = r.opt_float("initializer_range", 0.02);
    let tie = r.opt_bool("tie_word_embeddings", true);
    for key in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
        r.dropout(key);
    }
    r.expect(
        "scale_attn_weights",
        |v| v == &Value::Bool(true),
        "kiln always scales attention scores by 1/sqrt(head_dim)",
    );
    r.expect(
        "scale_attn_by_inverse_layer_idx",
        |v| v == &Value::Bool(false),
        "kiln does not scale attention scores by the layer index",
    );
    Some(Arch {
        vocab: vocab?,
        d_model: d_model?,
        layers: vec![LayerKind::Dense; layers?],
        max_positions: max_positions?,
        positions: Positions::Learned,
        norm: NormKind::LayerNorm,
        norm_eps: norm_eps?,
        tie: tie?,
        init_std: init_std?,
        heads: heads?,
        attention: AttentionKind::Grouped {
            kv_heads: heads?,
            head_dim: d_model?.checked_div(heads?).unwrap_or(0),
        },
        attention_bias: true,
        rope: None,
        ffn: Some(FfnOut {
            hidden: hidden?,
            act: act?,
            bias: true,
        }),
        moe: None,
        mtp: None,
    })
}

fn read_deepseek(r: &mut Reader, family: Family) -> Option<Arch> {
    let v3 = family == Family::DeepseekV3;
    let vocab = r.req_int("vocab_size", "kiln `model.vocab`");
    let d_model = r.req_int("hidden_size", "kiln `model.d_model`");
    let n_layers = r.req_int("num_hidden_layers", "kiln `model.layers`");
    let n_layers = r.layer_count("num_hidden_layers", n_layers);
    let first_dense = r.req_int(
        "first_k_dense_replace",
        "the dense layers before the MoE layers, kiln `model.layers`",
    );
    r.expect(
        "moe_layer_freq",
        |v| v.as_u64() == Some(1),
        "kiln maps DeepSeek stacks of `first_k_dense_replace` dense layers followed only by \
         MoE layers (`moe_layer_freq` = 1); transformers ignores other values",
    );
    let heads = r.req_int("num_attention_heads", "kiln `attention.heads`");
    let max_positions = r.req_int("max_position_embeddings", "kiln `model.max_positions`");
    let q_rank = r.req_nullable_int(
        "q_lora_rank",
        "kiln `attention.q_rank`; null for no query compression",
    );
    let kv_rank = r.req_int("kv_lora_rank", "kiln `attention.kv_rank`");
    let nope_dim = r.req_int("qk_nope_head_dim", "kiln `attention.nope_dim`");
    let rope_dim = r.req_int("qk_rope_head_dim", "kiln `attention.rope_dim`");
    let v_dim = r.req_int("v_head_dim", "kiln `attention.v_dim`");
    // Fields transformers 5.x derives and saves; they must agree with the ones they come from.
    let derived = [
        (
            "num_key_value_heads",
            heads,
            "`num_attention_heads`, since MLA expands keys and values for every head",
        ),
        (
            "head_dim",
            rope_dim,
            "`qk_rope_head_dim` (transformers 5.x saves the rotary head size here)",
        ),
        (
            "qk_head_dim",
            nope_dim.zip(rope_dim).map(|(a, b)| a.saturating_add(b)),
            "`qk_nope_head_dim` + `qk_rope_head_dim`",
        ),
    ];
    for (key, expected, from) in derived {
        if let (Some(v), Some(e)) = (r.present(key), expected) {
            if v.as_u64() != Some(e) {
                let msg = format!("`{key}` is {}, but it must equal {from}: {e}", show(v));
                r.problem(key, ProblemKind::Inconsistent, msg);
            }
        }
    }
    let act = act_of(r, "hidden_act", family);
    let norm_eps = r.opt_float("rms_norm_eps", 1e-6);
    let init_std = r.opt_float("initializer_range", 0.02);
    let tie = r.opt_bool("tie_word_embeddings", false);
    let attention_bias = r.opt_bool("attention_bias", false);
    r.dropout("attention_dropout");
    read_pretraining_tp(r);
    if v3 {
        r.expect(
            "rope_interleave",
            |v| v == &Value::Bool(true),
            "kiln rotates MLA's rotary dimensions as interleaved pairs, which HF does with \
             `rope_interleave` = true; the other layout is not supported",
        );
    }
    let rope = read_rope(r, family, max_positions);
    let extras = if v3 {
        read_kiln_table(r)
    } else {
        KilnExtras::default()
    };

    // MTP modules: `num_nextn_predict_layers` (V3 only). DeepSeek's MTP layers continue the
    // stack (layer indices L, L+1, …), so they are MoE layers, as the last layer is.
    let mtp_depth = if v3 {
        match r.present("num_nextn_predict_layers") {
            Some(v) => r.as_int("num_nextn_predict_layers", v),
            None => {
                r.note(
                    "`num_nextn_predict_layers` is absent: no MTP modules (transformers 5.x \
                     would assume 1, but the checkpoint describes none)"
                        .to_string(),
                );
                Some(0)
            }
        }
    } else {
        Some(0)
    };

    let mut layers = None;
    if let (Some(n), Some(k)) = (n_layers, first_dense) {
        match usize::try_from(k) {
            Ok(k) if k <= n => {
                let mut l = vec![LayerKind::Dense; k];
                l.resize(n, LayerKind::Moe);
                layers = Some(l);
            }
            _ => {
                let msg =
                    format!("`first_k_dense_replace` ({k}) exceeds `num_hidden_layers` ({n})");
                r.problem("first_k_dense_replace", ProblemKind::Inconsistent, msg);
            }
        }
    }
    let dense_used = first_dense.is_some_and(|k| k > 0);
    let moe_used = match (&layers, mtp_depth) {
        (Some(l), Some(d)) => l.last() == Some(&LayerKind::Moe) || d > 0,
        _ => false,
    };
    let hidden = if dense_used {
        r.req_int("intermediate_size", "kiln `ffn.hidden` of the dense layers")
            .map(Some)
    } else {
        r.raw("intermediate_size");
        Some(None)
    };
    let mlp_bias = if v3 {
        Some(false)
    } else {
        let b = r.opt_bool("mlp_bias", false);
        if b == Some(true) && moe_used {
            r.unsupported(
                "mlp_bias",
                &Value::Bool(true),
                "HF's DeepseekV2 puts these biases on the shared experts too, and kiln's \
                 experts have no biases; kiln maps `mlp_bias` only for models without MoE \
                 layers",
            );
        }
        b
    };
    let moe = read_deepseek_moe(r, family, moe_used, act, extras.bias_update);
    let mtp = match mtp_depth {
        Some(0) => {
            if extras.mtp_weight.is_some() {
                r.note("`kiln.mtp_weight` has no effect: there is no MTP module".to_string());
            }
            Some(None)
        }
        Some(depth) => {
            let weight = extras.mtp_weight.unwrap_or_else(|| {
                r.note(format!(
                    "HF configs do not carry the MTP loss weight λ (kiln `mtp.weight`): using \
                     the DeepSeek-V3 report's {DEFAULT_MTP_WEIGHT:?}"
                ));
                DEFAULT_MTP_WEIGHT
            });
            Some(Some(MtpOut {
                depth,
                weight,
                block: LayerKind::Moe,
            }))
        }
        None => None,
    };

    Some(Arch {
        vocab: vocab?,
        d_model: d_model?,
        layers: layers?,
        max_positions: max_positions?,
        positions: Positions::Rope,
        norm: NormKind::RmsNorm,
        norm_eps: norm_eps?,
        tie: tie?,
        init_std: init_std?,
        heads: heads?,
        attention: AttentionKind::Latent(Mla {
            q_rank: q_rank?,
            kv_rank: kv_rank?,
            nope_dim: nope_dim?,
            rope_dim: rope_dim?,
            v_dim: v_dim?,
        }),
        attention_bias: attention_bias?,
        rope: Some(rope?),
        ffn: match hidden? {
            Some(h) => Some(FfnOut {
                hidden: h,
                act: act?,
                bias: mlp_bias?,
            }),
            None => None,
        },
        moe: moe?,
        mtp: mtp?,
    })
}

/// The `kiln` table that [`export_config`] writes into `deepseek_v3` configs, for the two
/// settings HF has no field for: `bias_update` (γ) and `mtp_weight` (λ).
#[derive(Default)]
struct KilnExtras {
    bias_update: Option<f64>,
    mtp_weight: Option<f64>,
}

fn read_kiln_table(r: &mut Reader) -> KilnExtras {
    let Some(v) = r.present("kiln") else {
        return KilnExtras::default();
    };
    let Value::Object(t) = v else {
        r.wrong_type("kiln", "an object", v);
        return KilnExtras::default();
    };
    let mut sub = Reader::new(t, "kiln.");
    let mut get = |key: &'static str| {
        let v = sub.present(key)?;
        sub.as_float(key, v)
    };
    let extras = KilnExtras {
        bias_update: get("bias_update"),
        mtp_weight: get("mtp_weight"),
    };
    sub.unknown_keys("the settings kiln writes under `kiln`");
    r.problems.append(&mut sub.problems);
    extras
}

/// The MoE fields of a DeepSeek config. `Some(None)` when no layer (and no MTP block) is MoE.
fn read_deepseek_moe(
    r: &mut Reader,
    family: Family,
    used: bool,
    act: Option<&'static str>,
    bias_update: Option<f64>,
) -> Option<Option<MoeOut>> {
    let v3 = family == Family::DeepseekV3;
    const MOE_KEYS: [&str; 12] = [
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "n_shared_experts",
        "n_group",
        "topk_group",
        "topk_method",
        "scoring_func",
        "norm_topk_prob",
        "routed_scaling_factor",
        "aux_loss_alpha",
        "seq_aux",
    ];
    if !used {
        let present: Vec<String> = MOE_KEYS
            .into_iter()
            .filter(|k| r.raw(k).is_some())
            .map(|k| format!("`{k}`"))
            .collect();
        if bias_update.is_some() {
            r.note("`kiln.bias_update` has no effect: there is no MoE layer".to_string());
        }
        if !present.is_empty() {
            r.note(format!(
                "{} have no effect: every layer is dense (`first_k_dense_replace` = \
                 `num_hidden_layers`) and there is no MTP module",
                present.join(", ")
            ));
        }
        return Some(None);
    }
    let experts = r.req_int("n_routed_experts", "kiln `moe.experts`");
    let top_k = r.req_int("num_experts_per_tok", "kiln `moe.top_k`");
    let expert_hidden = r.req_int("moe_intermediate_size", "kiln `moe.expert_hidden`");
    let shared = match r.raw("n_shared_experts") {
        Some(Value::Null) => {
            r.note("`n_shared_experts` is null: no shared experts".to_string());
            Some(0)
        }
        Some(v) => r.as_int("n_shared_experts", v),
        None => {
            r.missing("n_shared_experts", "kiln `moe.shared`");
            None
        }
    };
    let (score_name, score, other) = if v3 {
        (
            "sigmoid",
            ScoreFunc::Sigmoid,
            "softmax scores are deepseek_v2's",
        )
    } else {
        (
            "softmax",
            ScoreFunc::Softmax,
            "sigmoid scores are deepseek_v3's",
        )
    };
    if let Some(v) = r.present("scoring_func") {
        if v.as_str() != Some(score_name) {
            let why = format!(
                "HF's {family} router always scores experts with {score_name:?} (kiln \
                 `moe.score`); {other}"
            );
            r.unsupported("scoring_func", v, &why);
        }
    }
    let method = if v3 {
        r.opt_str("topk_method", "noaux_tc")
    } else {
        r.opt_str("topk_method", "greedy")
    };
    // Read by some routing methods only; known to all.
    r.raw("n_group");
    r.raw("topk_group");
    let mut select = None;
    let mut groups = Some(1);
    let mut groups_kept = Some(1);
    let mut group_score = GroupScore::Top2Sum;
    match (v3, method) {
        (_, None) => {}
        (true, Some("noaux_tc")) => {
            let n_group = r.req_int("n_group", "kiln `moe.groups`");
            let topk_group = r.req_int("topk_group", "kiln `moe.groups_kept`");
            // Group-limited routing over one group keeps every expert: greedy selection.
            select = n_group.map(|g| {
                if g == 1 {
                    Selection::Greedy
                } else {
                    Selection::GroupLimited
                }
            });
            if n_group == Some(1) && topk_group.is_some_and(|t| t != 1) {
                let msg = format!(
                    "`topk_group` is {}, but with `n_group` = 1 there is one group to keep",
                    topk_group.unwrap_or(0)
                );
                r.problem("topk_group", ProblemKind::Inconsistent, msg);
            }
            groups = n_group;
            groups_kept = topk_group;
        }
        (false, Some("greedy")) => {
            select = Some(Selection::Greedy);
            let unused: Vec<String> = ["n_group", "topk_group"]
                .into_iter()
                .filter_map(|k| {
                    let v = r.present(k)?;
                    (v.as_u64() != Some(1)).then(|| format!("`{k}` = {}", show(v)))
                })
                .collect();
            if !unused.is_empty() {
                r.note(format!(
                    "{} ignored: `topk_method` \"greedy\" routes over all experts",
                    unused.join(", ")
                ));
            }
        }
        (false, Some("group_limited_greedy")) => {
            select = Some(Selection::GroupLimited);
            groups = r.req_int("n_group", "kiln `moe.groups`");
            groups_kept = r.req_int("topk_group", "kiln `moe.groups_kept`");
            group_score = GroupScore::Max;
        }
        (_, Some(m)) => {
            let why = if v3 {
                "DeepSeek-V3 routes with \"noaux_tc\" (group-limited over the sum of each \
                 group's two best biased scores); `n_group` = 1 makes it greedy"
            } else {
                "DeepSeek-V2 routes with \"greedy\" or \"group_limited_greedy\" (groups \
                 scored by their best expert)"
            };
            r.unsupported("topk_method", &Value::String(m.to_string()), why);
        }
    }
    let normalize_top_k = if v3 {
        r.opt_bool("norm_topk_prob", true)
    } else {
        r.expect(
            "norm_topk_prob",
            |v| v == &Value::Bool(false),
            "HF's DeepseekV2 router never renormalizes the chosen experts' weights (DeepSeek's \
             own code would), so kiln cannot tell which the checkpoint means",
        );
        Some(false)
    };
    let route_scale = r.opt_float("routed_scaling_factor", if v3 { 2.5 } else { 1.0 });
    let alpha = match r.present("aux_loss_alpha") {
        Some(v) => r.as_float("aux_loss_alpha", v),
        None => Some(0.0),
    };
    let seq = match r.present("seq_aux") {
        Some(v) => r.as_bool("seq_aux", v),
        None => Some(true),
    };
    if let (Some(a), Some(false)) = (alpha, seq) {
        if a != 0.0 {
            r.unsupported(
                "seq_aux",
                &Value::Bool(false),
                &format!(
                    "with `aux_loss_alpha` = {a} this asks for a batch-wise balance loss; \
                     kiln's balance loss is sequence-wise (`seq_aux` = true, kiln \
                     `moe.seq_aux`)"
                ),
            );
        }
    }
    let bias_update = match (v3, bias_update) {
        (true, Some(b)) => b,
        (true, None) => {
            r.note(format!(
                "HF configs do not carry the aux-loss-free balancing speed γ (kiln \
                 `moe.bias_update`; HF stores only its result, `e_score_correction_bias`): \
                 using the DeepSeek-V3 report's {DEFAULT_BIAS_UPDATE:?}"
            ));
            DEFAULT_BIAS_UPDATE
        }
        (false, _) => 0.0,
    };
    Some(Some(MoeOut {
        experts: experts?,
        shared: shared?,
        top_k: top_k?,
        expert_hidden: expert_hidden?,
        act: act?,
        score,
        select: select?,
        groups: groups?,
        groups_kept: groups_kept?,
        group_score,
        normalize_top_k: normalize_top_k?,
        route_scale: route_scale?,
        bias_update,
        seq_aux: alpha?,
    }))
}

/// HF's YaRN magnitude correction `0.1 · m · ln(factor) + 1` (1 when `factor ≤ 1`).
fn yarn_correction(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// The RoPE settings: the 5.x `rope_parameters` table, or the older `rope_theta` and
/// `rope_scaling` of hub checkpoints.
fn read_rope(r: &mut Reader, family: Family, max_positions: Option<u64>) -> Option<Rope> {
    let params = r.present("rope_parameters");
    let scaling = r.present("rope_scaling");
    let top_theta = r.present("rope_theta");
    let top_partial = r.present("partial_rotary_factor");
    let (table_key, table) = match (params, scaling) {
        (Some(_), Some(_)) => {
            let msg = "`rope_parameters` (transformers 5.x) and `rope_scaling` (older \
                       versions) are both set; keep one"
                .to_string();
            r.problem("rope_scaling", ProblemKind::Inconsistent, msg);
            return None;
        }
        (Some(t), None) => ("rope_parameters", Some(t)),
        (None, Some(t)) => ("rope_scaling", Some(t)),
        (None, None) => ("rope_parameters", None),
    };
    let theta_top = top_theta.and_then(|v| r.as_float("rope_theta", v));
    if let Some(v) = top_partial {
        if v.as_f64() != Some(1.0) {
            r.unsupported(
                "partial_rotary_factor",
                v,
                "kiln rotates the whole head (`partial_rotary_factor` = 1)",
            );
        }
    }
    let Some(table) = table else {
        if theta_top.is_none() {
            r.defaulted("rope_theta", "10000.0");
        }
        return Some(Rope {
            theta: theta_top.unwrap_or(10000.0),
            yarn: None,
        });
    };
    let Value::Object(t) = table else {
        r.wrong_type(table_key, "an object", table);
        return None;
    };
    if t.values().any(Value::is_object) {
        r.unsupported(
            table_key,
            table,
            "RoPE settings per layer type (a table of tables) describe layers of different \
             kinds; kiln's layers share one RoPE",
        );
        return None;
    }
    let mut sub = Reader::new(t, &format!("{table_key}."));
    let kind = {
        let a = sub.present("rope_type");
        let b = sub.present("type");
        match (a, b) {
            (Some(a), Some(b)) if a != b => {
                let msg = format!(
                    "`{table_key}.rope_type` ({}) and `{table_key}.type` ({}) disagree",
                    show(a),
                    show(b)
                );
                sub.problem("type", ProblemKind::Inconsistent, msg);
                None
            }
            (Some(v), _) | (None, Some(v)) => {
                let key = if a.is_some() { "rope_type" } else { "type" };
                sub.as_str(key, v)
            }
            (None, None) => Some("default"),
        }
    };
    let theta = match (sub.present("rope_theta"), theta_top) {
        (Some(v), top) => {
            let inner = sub.as_float("rope_theta", v);
            if let (Some(i), Some(o)) = (inner, top) {
                if i != o {
                    let msg = format!(
                        "`{table_key}.rope_theta` ({i:?}) and `rope_theta` ({o:?}) disagree"
                    );
                    sub.problem("rope_theta", ProblemKind::Inconsistent, msg);
                }
            }
            inner
        }
        (None, Some(o)) => Some(o),
        (None, None) => {
            sub.defaulted("rope_theta", "10000.0");
            Some(10000.0)
        }
    };
    sub.expect(
        "partial_rotary_factor",
        |v| v.as_f64() == Some(1.0),
        "kiln rotates the whole head (`partial_rotary_factor` = 1)",
    );
    let yarn = match kind {
        Some("default") => Some(None),
        Some("yarn") => read_yarn(&mut sub, family, max_positions).map(Some),
        Some(other) => {
            let v = Value::String(other.to_string());
            let key = if sub.has("rope_type") {
                "rope_type"
            } else {
                "type"
            };
            sub.unsupported(
                key,
                &v,
                "kiln supports plain RoPE (\"default\") and YaRN (\"yarn\")",
            );
            None
        }
        None => None,
    };
    // The keys of an unsupported kind of RoPE are not worth reporting one by one.
    if let Some(k @ ("default" | "yarn")) = kind {
        sub.unknown_keys(&format!("a {k:?} RoPE table"));
    }
    r.problems.append(&mut sub.problems);
    r.notes.append(&mut sub.notes);
    Some(Rope {
        theta: theta?,
        yarn: yarn?,
    })
}

fn read_yarn(r: &mut Reader, family: Family, max_positions: Option<u64>) -> Option<Yarn> {
    let factor = r.req_float("factor", "kiln `attention.rope.yarn.factor`");
    let original = match r.present("original_max_position_embeddings") {
        Some(v) => r.as_int("original_max_position_embeddings", v),
        None => {
            if let Some(m) = max_positions {
                r.note(format!(
                    "`{}original_max_position_embeddings` is absent: HF uses \
                     `max_position_embeddings` ({m})",
                    r.prefix
                ));
            }
            max_positions
        }
    };
    // HF reads `beta_fast or 32` and `beta_slow or 1`: zero means the default too.
    let mut beta = |key: &'static str, default: f64| match r.present(key) {
        Some(v) => r
            .as_float(key, v)
            .map(|b| if b == 0.0 { default } else { b }),
        None => Some(default),
    };
    let beta_fast = beta("beta_fast", 32.0);
    let beta_slow = beta("beta_slow", 1.0);
    let mut opt = |key: &'static str| match r.present(key) {
        Some(v) => r.as_float(key, v).map(Some),
        None => Some(None),
    };
    let mscale = opt("mscale");
    let mscale_all_dim = opt("mscale_all_dim");
    let attention_factor = opt("attention_factor");
    r.expect(
        "truncate",
        |v| v == &Value::Bool(true),
        "kiln rounds YaRN's correction range outward to whole dimensions, as HF does with \
         `truncate` = true",
    );
    let (factor, mscale, mad, attention_factor) =
        (factor?, mscale?, mscale_all_dim?, attention_factor?);
    // HF: the cos/sin amplitude is correction(mscale) / correction(mscale_all_dim) when both
    // are non-zero, else correction(1); DeepSeek's attention (only) also multiplies the softmax
    // scale by correction(mscale_all_dim)² when that is non-zero. kiln: the amplitude is
    // correction(mscale) / correction(mscale_all_dim), and every attention kind scales the
    // softmax by correction(mscale_all_dim)² when it is positive.
    let m = mscale.unwrap_or(0.0);
    let d = mad.unwrap_or(0.0);
    let (kiln_mscale, kiln_mad) = if family.is_deepseek() && d != 0.0 {
        if m == 0.0 {
            let v = mad.map_or(Value::Null, |x| json!(x));
            r.unsupported(
                "mscale_all_dim",
                &v,
                "without a non-zero `mscale`, HF scales the softmax by mscale_all_dim but not \
                 the rotary amplitude, which kiln cannot express; set `mscale` (DeepSeek's \
                 configs set both)",
            );
            return None;
        }
        (m, d)
    } else if d != 0.0 && m != 0.0 {
        let v = mad.map_or(Value::Null, |x| json!(x));
        r.unsupported(
            "mscale_all_dim",
            &v,
            "HF's llama applies the mscale ratio to the rotary amplitude only, while kiln also \
             scales the softmax by mscale_all_dim (DeepSeek's convention); kiln maps llama's \
             YaRN without mscale_all_dim",
        );
        return None;
    } else {
        if (m != 0.0 && m != 1.0) || d != 0.0 {
            r.note(format!(
                "`{p}mscale` and `{p}mscale_all_dim` have no effect unless both are non-zero \
                 ({family} attention); kiln uses mscale = 1, mscale_all_dim = 0",
                p = r.prefix
            ));
        }
        (1.0, 0.0)
    };
    if let Some(af) = attention_factor {
        let amplitude = yarn_correction(factor, kiln_mscale) / yarn_correction(factor, kiln_mad);
        if (af - amplitude).abs() > 1e-12 * amplitude.abs() {
            r.unsupported(
                "attention_factor",
                &json!(af),
                &format!(
                    "kiln derives the rotary amplitude from factor, mscale and mscale_all_dim \
                     ({amplitude:?} here) and cannot set it apart"
                ),
            );
        }
    }
    Some(Yarn {
        factor,
        original_max_positions: original?,
        beta_fast: beta_fast?,
        beta_slow: beta_slow?,
        mscale: kiln_mscale,
        mscale_all_dim: kiln_mad,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing the spec
// ---------------------------------------------------------------------------------------------

/// Spec text with `key = value` lines whose comments line up, like the reference specs.
#[derive(Default)]
struct SpecWriter {
    out: String,
}

impl SpecWriter {
    fn line(&mut self, s: &str) {
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn section(&mut self, name: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        self.line(&format!("[{name}]"));
    }

    fn key(&mut self, key: &str, value: impl fmt::Display, comment: &str) {
        let kv = format!("{key} = {value}");
        if comment.is_empty() {
            self.line(&kv);
        } else {
            self.line(&format!("{kv:<35} # {comment}"));
        }
    }
}

/// A TOML float that reads back as exactly `x` (Rust's shortest round-trip form).
fn toml_float(x: f64) -> String {
    format!("{x:?}")
}

fn write_spec(a: &Arch, family: Family, name: &str) -> String {
    let gpt2 = family == Family::Gpt2;
    let hf = |generic: &'static str, gpt2_name: &'static str| {
        if gpt2 {
            gpt2_name
        } else {
            generic
        }
    };
    let mut w = SpecWriter::default();
    w.line(&format!(
        "# Imported from a Hugging Face config.json (model_type \"{family}\") by kiln's HF \
         config mapping."
    ));
    w.line("# The comments name the config fields. HF configs carry no training settings:");
    w.line("# [train] holds small placeholders and [precision] is left at its defaults.");

    w.section("model");
    w.key("name", crate::names::toml_str_literal(name), "");
    w.key("vocab", a.vocab, "vocab_size");
    w.key("d_model", a.d_model, hf("hidden_size", "n_embd"));
    let layers_comment = if family.is_deepseek() {
        "num_hidden_layers, first_k_dense_replace"
    } else {
        hf("num_hidden_layers", "n_layer")
    };
    w.key(
        "layers",
        crate::names::toml_str_literal(&format_stack(&a.layers)),
        layers_comment,
    );
    w.key(
        "max_positions",
        a.max_positions,
        hf("max_position_embeddings", "n_positions"),
    );
    let positions = match a.positions {
        Positions::Rope => "\"rope\"",
        Positions::Learned => "\"learned\"",
    };
    w.key("positions", positions, "");
    let norm = match a.norm {
        NormKind::RmsNorm => "\"rmsnorm\"",
        NormKind::LayerNorm => "\"layernorm\"",
    };
    w.key("norm", norm, "");
    w.key(
        "norm_eps",
        toml_float(a.norm_eps),
        hf("rms_norm_eps", "layer_norm_epsilon"),
    );
    w.key("tie_embeddings", a.tie, "tie_word_embeddings");
    w.key("init_std", toml_float(a.init_std), "initializer_range");

    w.section("attention");
    match &a.attention {
        AttentionKind::Grouped { kv_heads, head_dim } => {
            let mha = *kv_heads == a.heads;
            w.key("kind", if mha { "\"mha\"" } else { "\"gqa\"" }, "");
            w.key("heads", a.heads, hf("num_attention_heads", "n_head"));
            if !mha {
                w.key("kv_heads", kv_heads, "num_key_value_heads");
            }
            if !gpt2 {
                w.key("head_dim", head_dim, "head_dim");
            }
        }
        AttentionKind::Latent(m) => {
            w.key("kind", "\"mla\"", "");
            w.key("heads", a.heads, "num_attention_heads");
            match m.q_rank {
                Some(q) => w.key("q_rank", q, "q_lora_rank"),
                None => w.line("# q_rank omitted: q_lora_rank = null (no query compression)"),
            }
            w.key("kv_rank", m.kv_rank, "kv_lora_rank");
            w.key("nope_dim", m.nope_dim, "qk_nope_head_dim");
            w.key("rope_dim", m.rope_dim, "qk_rope_head_dim");
            w.key("v_dim", m.v_dim, "v_head_dim");
        }
    }
    let bias_comment = if gpt2 {
        "GPT-2's projections have biases"
    } else {
        "attention_bias"
    };
    w.key("bias", a.attention_bias, bias_comment);
    if let Some(rope) = &a.rope {
        w.section("attention.rope");
        w.key("theta", toml_float(rope.theta), "rope_theta");
        if let Some(y) = &rope.yarn {
            w.section("attention.rope.yarn");
            w.key("factor", toml_float(y.factor), "factor");
            w.key(
                "original_max_positions",
                y.original_max_positions,
                "original_max_position_embeddings",
            );
            w.key("beta_fast", toml_float(y.beta_fast), "beta_fast");
            w.key("beta_slow", toml_float(y.beta_slow), "beta_slow");
            w.key("mscale", toml_float(y.mscale), "mscale");
            w.key(
                "mscale_all_dim",
                toml_float(y.mscale_all_dim),
                "mscale_all_dim",
            );
        }
    }

    if let Some(f) = &a.ffn {
        w.section("ffn");
        let hidden_comment = if gpt2 {
            "n_inner (null: 4 · n_embd)"
        } else {
            "intermediate_size"
        };
        w.key("hidden", f.hidden, hidden_comment);
        w.key(
            "act",
            crate::names::toml_str_literal(f.act),
            hf("hidden_act", "activation_function"),
        );
        let bias_comment = match family {
            Family::Gpt2 => "GPT-2's MLP has biases",
            Family::DeepseekV3 => "DeepSeek-V3's MLP has no biases",
            _ => "mlp_bias",
        };
        w.key("bias", f.bias, bias_comment);
    }

    if let Some(m) = &a.moe {
        w.section("moe");
        w.key("experts", m.experts, "n_routed_experts");
        w.key("shared", m.shared, "n_shared_experts");
        w.key("top_k", m.top_k, "num_experts_per_tok");
        w.key("expert_hidden", m.expert_hidden, "moe_intermediate_size");
        w.key("act", crate::names::toml_str_literal(m.act), "hidden_act");
        let score = match m.score {
            ScoreFunc::Sigmoid => "\"sigmoid\"",
            ScoreFunc::Softmax => "\"softmax\"",
        };
        w.key("score", score, "scoring_func");
        let v3 = family == Family::DeepseekV3;
        match m.select {
            Selection::Greedy => {
                let why = if v3 { "n_group = 1" } else { "topk_method" };
                w.key("select", "\"greedy\"", why);
            }
            Selection::GroupLimited => {
                w.key("select", "\"group_limited\"", "topk_method");
                w.key("groups", m.groups, "n_group");
                w.key("groups_kept", m.groups_kept, "topk_group");
                let (gs, why) = match m.group_score {
                    GroupScore::Max => ("\"max\"", "DeepSeek-V2: a group's best expert"),
                    GroupScore::Top2Sum => ("\"top2_sum\"", "DeepSeek-V3: its two best experts"),
                };
                w.key("group_score", gs, why);
            }
        }
        w.key("normalize_top_k", m.normalize_top_k, "norm_topk_prob");
        w.key(
            "route_scale",
            toml_float(m.route_scale),
            "routed_scaling_factor",
        );
        w.key(
            "bias_update",
            toml_float(m.bias_update),
            "not in HF configs (kiln.bias_update)",
        );
        w.key(
            "seq_aux",
            toml_float(m.seq_aux),
            "aux_loss_alpha, seq_aux = true",
        );
    }

    if let Some(m) = &a.mtp {
        w.section("mtp");
        w.key("depth", m.depth, "num_nextn_predict_layers");
        w.key(
            "weight",
            toml_float(m.weight),
            "not in HF configs (kiln.mtp_weight)",
        );
        w.key(
            "block",
            crate::names::toml_str_literal(m.block.name()),
            "DeepSeek's MTP layers are MoE",
        );
    }

    let t = TRAIN_DEFAULTS;
    w.section("train");
    w.line("# Placeholders (HF configs carry no training settings): edit before training.");
    w.key("batch", t.batch, "");
    w.key("seq_len", t.seq_len.min(a.max_positions), "");
    w.key("steps", t.steps, "");
    w.key("lr", toml_float(t.lr), "");
    w.key("warmup", t.warmup, "");
    w.key("min_lr", toml_float(t.min_lr), "");
    w.out
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

/// The HF family a checked model maps to, or every feature of the model that keeps it from
/// mapping to one (as [`HfError::Export`], naming spec keys).
///
/// Learned positions map to `gpt2`; MLA to `deepseek_v3` (sigmoid router, or no MoE) or
/// `deepseek_v2` (softmax router, or no MoE with FFN biases); MHA/GQA with RoPE to `llama`.
/// The family's other requirements are then checked: `export_config` succeeds exactly when
/// this does.
pub fn family_of(model: &Model) -> Result<Family, HfError> {
    let family = classify(model);
    let problems = unexpressed(model, family);
    if problems.is_empty() {
        Ok(family)
    } else {
        Err(HfError::Export {
            model: model.name.clone(),
            problems,
        })
    }
}

fn classify(m: &Model) -> Family {
    match (&m.positions, &m.attention.kind) {
        (Positions::Learned, _) => Family::Gpt2,
        (Positions::Rope, AttentionKind::Grouped { .. }) => Family::Llama,
        (Positions::Rope, AttentionKind::Latent(_)) => match &m.moe {
            Some(moe) if moe.score == ScoreFunc::Softmax => Family::DeepseekV2,
            Some(_) => Family::DeepseekV3,
            None if m.ffn.as_ref().is_some_and(|f| f.bias) => Family::DeepseekV2,
            None => Family::DeepseekV3,
        },
    }
}

/// The canonical activation text each family's MLP computes.
fn family_act(family: Family) -> &'static str {
    match family {
        Family::Gpt2 => "gelu_tanh(x)",
        _ => "silu(gate) * up",
    }
}

/// Every feature of `m` that `family`'s config cannot express.
fn unexpressed(m: &Model, family: Family) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut no = |field: &str, message: String| {
        out.push(Problem {
            field: field.to_string(),
            kind: ProblemKind::NoEquivalent,
            message,
        })
    };
    let f = family.model_type();

    // Norms.
    match (family, m.norm.kind) {
        (Family::Gpt2, NormKind::RmsNorm) => no(
            "model.norm",
            "`model.norm` is \"rmsnorm\" with learned positions: gpt2, the HF family with \
             learned positions, uses LayerNorm, and the families with RMSNorm (llama, \
             deepseek) use rotary positions"
                .to_string(),
        ),
        (Family::Gpt2, NormKind::LayerNorm) | (_, NormKind::RmsNorm) => {}
        (_, NormKind::LayerNorm) => no(
            "model.norm",
            format!(
                "`model.norm` is \"layernorm\" with rotary positions: {f} uses RMSNorm, and \
                 gpt2, the HF family with LayerNorm, uses learned positions"
            ),
        ),
    }

    // The layer stack, MoE and MTP.
    let moe_layers = m.count(LayerKind::Moe);
    match family {
        Family::Gpt2 | Family::Llama => {
            if moe_layers > 0 || m.moe.is_some() {
                let attn = if family == Family::Gpt2 {
                    "learned positions"
                } else {
                    "MHA/GQA attention"
                };
                no(
                    "moe",
                    format!(
                        "[moe] with {attn}: {f} has no mixture of experts, and the HF families \
                         with one (deepseek_v3 with a sigmoid router, deepseek_v2 with \
                         softmax) use MLA attention with rotary positions"
                    ),
                );
            }
            if m.mtp.is_some() {
                no(
                    "mtp",
                    format!(
                        "[mtp]: {f} has no MTP modules; deepseek_v3 (MLA, sigmoid router) is \
                         the HF family with them"
                    ),
                );
            }
        }
        Family::DeepseekV3 | Family::DeepseekV2 => {
            let k = m.first_dense();
            if m.layers
                .iter()
                .skip(k as usize)
                .any(|&l| l == LayerKind::Dense)
            {
                no(
                    "model.layers",
                    format!(
                        "`model.layers` is {:?}: DeepSeek configs describe `first_k_dense_replace` \
                         dense layers followed only by MoE layers",
                        format_stack(&m.layers)
                    ),
                );
            }
            if let Some(mtp) = &m.mtp {
                if family == Family::DeepseekV2 {
                    no(
                        "mtp",
                        "[mtp]: deepseek_v2 has no MTP modules; deepseek_v3 (sigmoid router) \
                         has them"
                            .to_string(),
                    );
                } else if mtp.block != LayerKind::Moe {
                    no(
                        "mtp.block",
                        "`mtp.block` is \"dense\": DeepSeek-V3's MTP layers continue the stack \
                         after its MoE layers and are MoE blocks"
                            .to_string(),
                    );
                }
            }
        }
    }

    // Activations.
    let want = family_act(family);
    let ffn_act = m.ffn.as_ref().map(|x| x.act.expr.to_string());
    let moe_act = m.moe.as_ref().map(|x| x.act.expr.to_string());
    for (key, act) in [("ffn.act", &ffn_act), ("moe.act", &moe_act)] {
        if let Some(a) = act {
            if a != want {
                let hf_name = if family == Family::Gpt2 {
                    "`activation_function` = \"gelu_new\""
                } else {
                    "`hidden_act` = \"silu\""
                };
                no(
                    key,
                    format!(
                        "`{key}` is {a:?}: {f} maps only `{want}`, which HF writes as {hf_name}"
                    ),
                );
            }
        }
    }

    // Biases and head shapes.
    let a = &m.attention;
    match family {
        Family::Gpt2 => {
            if !a.bias {
                no(
                    "attention.bias",
                    "`attention.bias` is false: GPT-2's attention projections always have \
                     biases"
                        .to_string(),
                );
            }
            if m.ffn.as_ref().is_some_and(|x| !x.bias) {
                no(
                    "ffn.bias",
                    "`ffn.bias` is false: GPT-2's MLP always has biases".to_string(),
                );
            }
            if let AttentionKind::Grouped { kv_heads, head_dim } = a.kind {
                if kv_heads != a.heads {
                    no(
                        "attention.kv_heads",
                        format!(
                            "`attention.kv_heads` is {kv_heads} with {} heads: GPT-2's \
                             attention is multi-head",
                            a.heads
                        ),
                    );
                }
                if head_dim.checked_mul(a.heads) != Some(m.d_model) {
                    no(
                        "attention.head_dim",
                        format!(
                            "`attention.head_dim` is {head_dim}: GPT-2's heads split \
                             `d_model` ({}) evenly, {} each",
                            m.d_model,
                            m.d_model / a.heads.max(1)
                        ),
                    );
                }
            }
        }
        Family::DeepseekV3 => {
            if m.ffn.as_ref().is_some_and(|x| x.bias) {
                no(
                    "ffn.bias",
                    "`ffn.bias` is true: DeepSeek-V3's MLP has no biases".to_string(),
                );
            }
        }
        Family::DeepseekV2 => {
            if m.ffn.as_ref().is_some_and(|x| x.bias) && m.moe.is_some() {
                no(
                    "ffn.bias",
                    "`ffn.bias` is true in a model with MoE layers: HF's DeepseekV2 puts \
                     `mlp_bias` biases on the shared experts too, and kiln's experts have none"
                        .to_string(),
                );
            }
        }
        Family::Llama => {}
    }
    if matches!(family, Family::Llama | Family::DeepseekV2) && m.d_model % a.heads.max(1) != 0 {
        no(
            "attention.heads",
            format!(
                "`model.d_model` ({}) is not a multiple of `attention.heads` ({}): HF's {f} \
                 config refuses such a model, whatever its head size",
                m.d_model, a.heads
            ),
        );
    }

    // YaRN.
    if let Some(Rope { yarn: Some(y), .. }) = &a.rope {
        if family.is_deepseek() {
            if y.mscale_all_dim == 0.0 && y.mscale != 1.0 {
                no(
                    "attention.rope.yarn.mscale",
                    format!(
                        "`attention.rope.yarn.mscale` is {:?} with `mscale_all_dim` = 0: HF \
                         ignores mscale unless mscale_all_dim is non-zero",
                        y.mscale
                    ),
                );
            }
        } else if y.mscale_all_dim != 0.0 || y.mscale != 1.0 {
            no(
                "attention.rope.yarn.mscale_all_dim",
                format!(
                    "YaRN with mscale = {:?} and mscale_all_dim = {:?}: HF's llama scales only \
                     the rotary amplitude, while kiln scales the softmax by mscale_all_dim; \
                     llama maps YaRN with mscale = 1 and mscale_all_dim = 0",
                    y.mscale, y.mscale_all_dim
                ),
            );
        }
    }

    // Routing.
    if let Some(moe) = &m.moe {
        match family {
            Family::DeepseekV3 => {
                if moe.select == Selection::GroupLimited
                    && moe.groups > 1
                    && moe.group_score != GroupScore::Top2Sum
                {
                    no(
                        "moe.group_score",
                        "`moe.group_score` is \"max\": DeepSeek-V3 scores a group by the sum of \
                         its two best experts (\"top2_sum\"); \"max\" is DeepSeek-V2's, whose \
                         router uses softmax scores"
                            .to_string(),
                    );
                }
                if moe.experts / moe.groups.max(1) < 2 {
                    no(
                        "moe.experts",
                        format!(
                            "{} expert(s) per group: DeepSeek-V3's router sums the two best \
                             experts of every group, even with one group",
                            moe.experts / moe.groups.max(1)
                        ),
                    );
                }
            }
            Family::DeepseekV2 => {
                if moe.select == Selection::GroupLimited && moe.group_score != GroupScore::Max {
                    no(
                        "moe.group_score",
                        "`moe.group_score` is \"top2_sum\": DeepSeek-V2 scores a group by its \
                         best expert (\"max\"); \"top2_sum\" is DeepSeek-V3's, whose router \
                         uses sigmoid scores"
                            .to_string(),
                    );
                }
                if moe.normalize_top_k {
                    no(
                        "moe.normalize_top_k",
                        "`moe.normalize_top_k` is true with softmax scores: HF's DeepseekV2 \
                         never renormalizes the chosen experts' weights"
                            .to_string(),
                    );
                }
                if moe.bias_update > 0.0 {
                    no(
                        "moe.bias_update",
                        "`moe.bias_update` is positive with softmax scores: DeepSeek-V2 has no \
                         per-expert selection bias (DeepSeek-V3, with sigmoid scores, has)"
                            .to_string(),
                    );
                }
            }
            Family::Llama | Family::Gpt2 => {}
        }
    }
    out
}

/// A `config.json` for `model`, in its family's fields (see [`family_of`]), such that
/// [`import_config`] of it gives back `model` in everything but `train` and `precision`.
///
/// Token ids are omitted and `torch_dtype`/`dtype` are "float32". RoPE settings are written in
/// the older `rope_theta` + `rope_scaling` form, which transformers 4.x and 5.x both read. For
/// `deepseek_v3`, the balancing speed and the MTP loss weight, which HF has no field for, go in
/// a `kiln` table (`{"bias_update": γ, "mtp_weight": λ}`) that transformers keeps but ignores.
/// Two settings that do not change what the model computes are written in their canonical form
/// and come back in it: a group score under greedy routing, and group-limited routing over one
/// group (greedy).
pub fn export_config(model: &Model) -> Result<Value, HfError> {
    let family = family_of(model)?;
    let m = model;
    let a = &m.attention;
    let mut c = Map::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    put("model_type", json!(family.model_type()));
    put("architectures", json!([family.architecture()]));
    put("torch_dtype", json!("float32"));
    put("dtype", json!("float32"));
    put("vocab_size", json!(m.vocab));
    put("initializer_range", json!(m.init_std));
    put("tie_word_embeddings", json!(m.tie_embeddings));
    let layers = m.layers.len();

    if family == Family::Gpt2 {
        let hidden = m.ffn.as_ref().map_or(0, |x| x.hidden);
        put("n_embd", json!(m.d_model));
        put("n_layer", json!(layers));
        put("n_head", json!(a.heads));
        put("n_positions", json!(m.max_positions));
        let n_inner = if Some(hidden) == m.d_model.checked_mul(4) {
            Value::Null
        } else {
            json!(hidden)
        };
        put("n_inner", n_inner);
        put("activation_function", json!("gelu_new"));
        put("layer_norm_epsilon", json!(m.norm.eps));
        for key in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
            put(key, json!(0.0));
        }
        put("scale_attn_weights", json!(true));
        put("scale_attn_by_inverse_layer_idx", json!(false));
        return Ok(Value::Object(c));
    }

    put("hidden_size", json!(m.d_model));
    put("num_hidden_layers", json!(layers));
    put("num_attention_heads", json!(a.heads));
    put("max_position_embeddings", json!(m.max_positions));
    put("rms_norm_eps", json!(m.norm.eps));
    put("hidden_act", json!("silu"));
    put("attention_bias", json!(a.bias));
    put("attention_dropout", json!(0.0));
    put("pretraining_tp", json!(1));
    let rope = a.rope.unwrap_or(Rope {
        theta: 10000.0,
        yarn: None,
    });
    put("rope_theta", json!(rope.theta));
    let scaling = match rope.yarn {
        None => Value::Null,
        Some(y) => json!({
            "type": "yarn",
            "rope_type": "yarn",
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_positions,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }),
    };
    put("rope_scaling", scaling);
    if let Some(ffn) = &m.ffn {
        put("intermediate_size", json!(ffn.hidden));
        if family != Family::DeepseekV3 {
            put("mlp_bias", json!(ffn.bias));
        }
    }

    match &a.kind {
        AttentionKind::Grouped { kv_heads, head_dim } => {
            put("num_key_value_heads", json!(kv_heads));
            put("head_dim", json!(head_dim));
        }
        AttentionKind::Latent(mla) => {
            put("num_key_value_heads", json!(a.heads));
            put("q_lora_rank", json!(mla.q_rank));
            put("kv_lora_rank", json!(mla.kv_rank));
            put("qk_nope_head_dim", json!(mla.nope_dim));
            put("qk_rope_head_dim", json!(mla.rope_dim));
            put("v_head_dim", json!(mla.v_dim));
            put("first_k_dense_replace", json!(m.first_dense()));
            put("moe_layer_freq", json!(1));
        }
    }
    if family == Family::DeepseekV3 {
        put("rope_interleave", json!(true));
        put(
            "num_nextn_predict_layers",
            json!(m.mtp.map_or(0, |x| x.depth)),
        );
    }

    let mut extras = Map::new();
    if let Some(moe) = &m.moe {
        put("n_routed_experts", json!(moe.experts));
        put("n_shared_experts", json!(moe.shared));
        put("num_experts_per_tok", json!(moe.top_k));
        put("moe_intermediate_size", json!(moe.expert_hidden));
        let (groups, kept) = match moe.select {
            Selection::Greedy => (1, 1),
            Selection::GroupLimited => (moe.groups, moe.groups_kept),
        };
        put("n_group", json!(groups));
        put("topk_group", json!(kept));
        if family == Family::DeepseekV3 {
            put("scoring_func", json!("sigmoid"));
            put("topk_method", json!("noaux_tc"));
            extras.insert("bias_update".to_string(), json!(moe.bias_update));
        } else {
            put("scoring_func", json!("softmax"));
            let method = match moe.select {
                Selection::Greedy => "greedy",
                Selection::GroupLimited => "group_limited_greedy",
            };
            put("topk_method", json!(method));
        }
        put("norm_topk_prob", json!(moe.normalize_top_k));
        put("routed_scaling_factor", json!(moe.route_scale));
        put("aux_loss_alpha", json!(moe.seq_aux));
        put("seq_aux", json!(true));
    }
    if let Some(mtp) = &m.mtp {
        extras.insert("mtp_weight".to_string(), json!(mtp.weight));
    }
    if !extras.is_empty() {
        put("kiln", Value::Object(extras));
    }
    Ok(Value::Object(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../specs/tiny.toml");
    const SPECS: [&str; 6] = [
        include_str!("../../specs/deepseek-v3.toml"),
        include_str!("../../specs/deepseek-v2.toml"),
        include_str!("../../specs/deepseek-v2-lite.toml"),
        include_str!("../../specs/gpt2-124m.toml"),
        include_str!("../../specs/llama3-8b.toml"),
        TINY,
    ];

    fn exported(spec: &str) -> Map<String, Value> {
        let m = check_str(spec).unwrap();
        match export_config(&m).unwrap() {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    fn import_obj(o: &Map<String, Value>) -> Result<ImportedConfig, HfError> {
        import_config(&Value::Object(o.clone()).to_string(), "m")
    }

    fn problems(o: &Map<String, Value>) -> Vec<Problem> {
        match import_obj(o) {
            Err(HfError::Import { problems, .. }) => problems,
            other => panic!("expected import problems, got {other:?}"),
        }
    }

    /// The one problem of a config, checked to concern `field`.
    fn the_problem(o: &Map<String, Value>, field: &str, kind: ProblemKind) -> Problem {
        let p = problems(o);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!((p[0].field.as_str(), p[0].kind), (field, kind), "{p:#?}");
        p[0].clone()
    }

    fn model_of(o: &Map<String, Value>) -> Model {
        let i = import_obj(o).unwrap_or_else(|e| panic!("{e}"));
        check_str(&i.spec).unwrap()
    }

    /// A different value of the same JSON type (strings and nulls become something else).
    fn perturbed(v: &Value) -> Value {
        match v {
            Value::Bool(b) => json!(!b),
            Value::Number(n) if n.is_u64() => json!(n.as_u64().unwrap() + 1),
            Value::Number(n) => json!(n.as_f64().unwrap() * 1.5 + 0.1),
            Value::String(_) => json!("bogus"),
            Value::Null => json!(7),
            Value::Array(_) | Value::Object(_) => json!("bogus"),
        }
    }

    /// Nothing is dropped silently: changing any field of an exported config (other than the
    /// ones that carry no architecture) changes the imported model or its notes, or fails.
    #[test]
    fn every_field_matters() {
        for spec in SPECS {
            let base = exported(spec);
            let imported = import_obj(&base).unwrap();
            let model = check_str(&imported.spec).unwrap();
            let mut fields: Vec<(String, Option<String>)> = Vec::new();
            for (k, v) in &base {
                if IGNORED.contains(&k.as_str()) {
                    continue;
                }
                fields.push((k.clone(), None));
                if let Value::Object(inner) = v {
                    fields.extend(inner.keys().map(|i| (k.clone(), Some(i.clone()))));
                }
            }
            for (key, inner) in fields {
                let mut o = base.clone();
                match &inner {
                    None => {
                        let v = perturbed(&o[&key]);
                        o.insert(key.clone(), v);
                    }
                    Some(i) => {
                        let t = o.get_mut(&key).unwrap().as_object_mut().unwrap();
                        let v = perturbed(&t[i]);
                        t.insert(i.clone(), v);
                    }
                }
                let what = format!("{}: `{key}` {inner:?}", check_str(spec).unwrap().name);
                if let Ok(changed) = import_obj(&o) {
                    let m = check_str(&changed.spec).unwrap();
                    assert!(
                        m != model || changed.notes != imported.notes,
                        "changing {what} changed nothing"
                    );
                }
            }
        }
    }

    #[test]
    fn names_are_toml_strings() {
        let o = exported(TINY);
        let name = "a \"quoted\" name \\ with ü";
        let i = import_config(&Value::Object(o).to_string(), name).unwrap();
        assert_eq!(check_str(&i.spec).unwrap().name, name);
        assert_eq!(
            crate::names::toml_str_literal("tab\there"),
            "\"tab\\u0009here\""
        );
    }

    fn with_yarn(spec: &str, yarn: Value) -> Map<String, Value> {
        let mut o = exported(spec);
        o.insert("rope_scaling".into(), yarn);
        o
    }

    #[test]
    fn yarn_mscales_follow_hf() {
        let llama = SPECS[4];
        let yarn = |extra: Value| {
            let mut y =
                json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64});
            y.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            y
        };
        // DeepSeek: HF scales the softmax by mscale_all_dim, and the amplitude by the ratio
        // only when mscale is set too.
        let p = the_problem(
            &with_yarn(TINY, yarn(json!({"mscale_all_dim": 1.0}))),
            "rope_scaling.mscale_all_dim",
            ProblemKind::Unsupported,
        );
        assert!(p.message.contains("without a non-zero `mscale`"), "{p}");
        // Without mscale_all_dim, HF ignores mscale: kiln writes 1 and says so.
        let o = with_yarn(TINY, yarn(json!({"mscale": 0.707})));
        let i = import_obj(&o).unwrap();
        assert!(
            i.notes.iter().any(|n| n.contains("have no effect")),
            "{:?}",
            i.notes
        );
        let y = check_str(&i.spec)
            .unwrap()
            .attention
            .rope
            .unwrap()
            .yarn
            .unwrap();
        assert_eq!((y.mscale, y.mscale_all_dim), (1.0, 0.0));
        // Llama: mscale_all_dim never scales its softmax.
        the_problem(
            &with_yarn(llama, yarn(json!({"mscale": 1.0, "mscale_all_dim": 1.0}))),
            "rope_scaling.mscale_all_dim",
            ProblemKind::Unsupported,
        );
        // An attention factor is accepted only when it is the one kiln derives.
        let amplitude = yarn_correction(4.0, 1.0);
        model_of(&with_yarn(
            llama,
            yarn(json!({"attention_factor": amplitude})),
        ));
        the_problem(
            &with_yarn(llama, yarn(json!({"attention_factor": 1.0}))),
            "rope_scaling.attention_factor",
            ProblemKind::Unsupported,
        );
        the_problem(
            &with_yarn(llama, yarn(json!({"truncate": false}))),
            "rope_scaling.truncate",
            ProblemKind::Unsupported,
        );
        // HF defaults original_max_position_embeddings to max_position_embeddings.
        let mut no_original = yarn(json!({}));
        no_original
            .as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
        let m = model_of(&with_yarn(llama, no_original));
        assert_eq!(
            m.attention
                .rope
                .unwrap()
                .yarn
                .unwrap()
                .original_max_positions,
            8192
        );
        // Per-layer-type RoPE tables are refused as a whole.
        let mut o = exported(llama);
        o.remove("rope_scaling");
        o.insert(
            "rope_parameters".into(),
            json!({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}),
        );
        the_problem(&o, "rope_parameters", ProblemKind::Unsupported);
        // Both RoPE forms at once are ambiguous.
        let mut o = exported(llama);
        o.insert("rope_parameters".into(), json!({"rope_type": "default"}));
        o.insert("rope_scaling".into(), json!({"rope_type": "default"}));
        the_problem(&o, "rope_scaling", ProblemKind::Inconsistent);
    }

    #[test]
    fn aliases_read_like_their_fields() {
        let gpt2 = SPECS[3];
        let mut o = exported(gpt2);
        let d = o.remove("n_embd").unwrap();
        o.insert("hidden_size".into(), d);
        assert_eq!(model_of(&o), model_of(&exported(gpt2)));
        o.insert("n_embd".into(), json!(512));
        the_problem(&o, "n_embd", ProblemKind::Inconsistent);
        let mut o = exported(TINY);
        let depth = o.remove("num_nextn_predict_layers").unwrap();
        o.insert("num_mtp_layers".into(), depth);
        assert_eq!(model_of(&o), model_of(&exported(TINY)));
    }

    #[test]
    fn deepseek_stacks_and_mtp() {
        let mut o = exported(TINY);
        o.insert("first_k_dense_replace".into(), json!(5));
        the_problem(&o, "first_k_dense_replace", ProblemKind::Inconsistent);
        // A dense-only DeepSeek model has no [moe]; its MoE fields are noted, not mapped.
        let mut o = exported(TINY);
        o.insert("first_k_dense_replace".into(), json!(4));
        o.insert("num_nextn_predict_layers".into(), json!(0));
        let i = import_obj(&o).unwrap();
        assert!(!i.spec.contains("[moe]"), "{}", i.spec);
        assert!(
            i.notes.iter().any(|n| n.contains("have no effect")),
            "{:?}",
            i.notes
        );
        // No MTP field: no MTP modules, and a note saying why.
        let mut o = exported(TINY);
        o.remove("num_nextn_predict_layers");
        let i = import_obj(&o).unwrap();
        assert!(check_str(&i.spec).unwrap().mtp.is_none());
        assert!(i
            .notes
            .iter()
            .any(|n| n.contains("num_nextn_predict_layers")));
        // A layer count beyond kiln's limit is refused before any stack is built.
        let mut o = exported(SPECS[4]);
        o.insert("num_hidden_layers".into(), json!(u64::MAX));
        the_problem(&o, "num_hidden_layers", ProblemKind::Unsupported);
    }

    #[test]
    fn deepseek_v2_routing_rules() {
        let v2 = SPECS[1];
        let mut o = exported(v2);
        o.insert("norm_topk_prob".into(), json!(true));
        the_problem(&o, "norm_topk_prob", ProblemKind::Unsupported);
        let mut o = exported(v2);
        o.insert("mlp_bias".into(), json!(true));
        the_problem(&o, "mlp_bias", ProblemKind::Unsupported);
        let mut o = exported(v2);
        o.insert("topk_method".into(), json!("noaux_tc"));
        the_problem(&o, "topk_method", ProblemKind::Unsupported);
        let mut o = exported(v2);
        o.insert("aux_loss_alpha".into(), json!(0.001));
        o.insert("seq_aux".into(), json!(false));
        the_problem(&o, "seq_aux", ProblemKind::Unsupported);
        // Greedy routing ignores the group fields, and says so.
        let mut o = exported(SPECS[2]);
        o.insert("n_group".into(), json!(8));
        let i = import_obj(&o).unwrap();
        assert!(
            i.notes.iter().any(|n| n.contains("`n_group` = 8 ignored")),
            "{:?}",
            i.notes
        );
    }

    #[test]
    fn repeated_keys_with_different_values_are_reported() {
        let text = Value::Object(exported(SPECS[4])).to_string();
        let body = text.strip_suffix('}').unwrap();
        // The same value twice says one thing: fine.
        let same = format!("{body}, \"hidden_size\": 4096}}");
        import_config(&same, "m").unwrap();
        let twice = format!("{body}, \"hidden_size\": 2048}}");
        let Err(HfError::Import { problems, .. }) = import_config(&twice, "m") else {
            panic!("a repeated key with another value imports");
        };
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].field, "hidden_size");
        assert!(
            problems[0].message.contains("4096 and 2048"),
            "{}",
            problems[0]
        );
        // Inside nested tables too.
        let (value, repeated) =
            parse_json(r#"{"a": {"b": [1, {"c": 1, "c": 2}], "d": 3, "d": 3}}"#).unwrap();
        assert_eq!(value, json!({"a": {"b": [1, {"c": 2}], "d": 3}}));
        assert_eq!(repeated, vec![("a.b[1].c".to_string(), json!(1), json!(2))]);
        assert!(parse_json("{} x").is_err());
    }

    #[test]
    fn export_refuses_what_hf_cannot_say() {
        let cases = [
            (TINY.replace("normalize_top_k = true", "normalize_top_k = true\nseq_aux = 0.0")
                .replace("seq_aux = 1e-4\n", "")
                .replace("score = \"sigmoid\"", "score = \"softmax\"")
                .replace("group_score = \"top2_sum\"", "group_score = \"max\""),
             vec!["mtp", "moe.normalize_top_k", "moe.bias_update"]),
            (TINY.replace("[mtp]\ndepth = 1\nweight = 0.3\n", "[mtp]\ndepth = 1\nblock = \"dense\"\n"),
             vec!["mtp.block"]),
            (TINY.replace("theta = 10000.0", "theta = 10000.0\nyarn = { factor = 4.0, original_max_positions = 64, mscale = 0.5 }"),
             vec!["attention.rope.yarn.mscale"]),
            // HF's LlamaConfig requires hidden_size to be a multiple of the heads.
            (SPECS[4].replace("heads = 32\nkv_heads = 8", "heads = 30\nkv_heads = 6"),
             vec!["attention.heads"]),
        ];
        for (spec, fields) in cases {
            let m = check_str(&spec).unwrap_or_else(|d| panic!("{d:#?}"));
            let Err(HfError::Export { problems, .. }) = family_of(&m) else {
                panic!("{spec} exports");
            };
            let got: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
            assert_eq!(got, fields);
        }
    }
}
