//! Reading `config.json`: the keys every family ignores, [`Reader`] (typed getters over one
//! config object that record each problem and note and remember which keys were read, so the
//! rest can be reported), and a JSON parse that also finds repeated keys.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{json, Map, Value};

use super::{Family, Problem, ProblemKind};
use crate::dsl::closest;

/// Keys of every family that carry no architecture: bookkeeping, token ids, the stored dtype,
/// runtime flags, fine-tuning labels, remote-code pointers and generation settings (which
/// transformers 5.x drops on load).
pub(super) const IGNORED: &[&str] = &[
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
pub(super) const IGNORED_GPT2: &[&str] = &[
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "reorder_and_upcast_attn",
];

/// DeepSeek keys that carry no architecture: the expert-parallel degree.
pub(super) const IGNORED_DEEPSEEK: &[&str] = &["ep_size"];

/// HF's `attribute_map` aliases, `(alias, field)`: a config may spell the field either way.
pub(super) fn aliases(family: Family) -> &'static [(&'static str, &'static str)] {
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
pub(super) fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// `the string "x"`, `the number 1.5`, … for type errors.
pub(super) fn describe(v: &Value) -> String {
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
pub(super) struct Reader<'a> {
    obj: &'a Map<String, Value>,
    /// Prefix of field names in messages (`rope_scaling.` inside the RoPE table).
    pub(super) prefix: String,
    pub(super) aliases: &'static [(&'static str, &'static str)],
    /// Every key this reader knows (read, aliased or ignored), for unknown-key detection.
    pub(super) known: BTreeSet<&'static str>,
    pub(super) problems: Vec<Problem>,
    pub(super) notes: Vec<String>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(obj: &'a Map<String, Value>, prefix: &str) -> Self {
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

    pub(super) fn problem(&mut self, key: &str, kind: ProblemKind, message: String) {
        let field = self.name(key);
        self.problems.push(Problem {
            field,
            kind,
            message,
        });
    }

    pub(super) fn unsupported(&mut self, key: &str, v: &Value, why: &str) {
        let msg = format!("`{}` is {}: {why}", self.name(key), show(v));
        self.problem(key, ProblemKind::Unsupported, msg);
    }

    pub(super) fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// The value of `key` or of one of its aliases, null included; marks them known.
    pub(super) fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
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
    pub(super) fn present(&mut self, key: &'static str) -> Option<&'a Value> {
        self.raw(key).filter(|v| !v.is_null())
    }

    pub(super) fn has(&mut self, key: &'static str) -> bool {
        self.present(key).is_some()
    }

    pub(super) fn missing(&mut self, key: &'static str, means: &str) {
        let found = if self.obj.contains_key(key) {
            "is null"
        } else {
            "is missing"
        };
        let msg = format!("`{}` {found}: it is required ({means})", self.name(key));
        self.problem(key, ProblemKind::Missing, msg);
    }

    pub(super) fn wrong_type(&mut self, key: &str, expected: &str, v: &Value) {
        let msg = format!(
            "`{}` must be {expected}, found {}",
            self.name(key),
            describe(v)
        );
        self.problem(key, ProblemKind::Type, msg);
    }

    pub(super) fn defaulted(&mut self, key: &str, default: &str) {
        if !self.obj.contains_key(key) {
            let msg = format!(
                "`{}` is absent: using HF's default {default}",
                self.name(key)
            );
            self.note(msg);
        }
    }

    pub(super) fn as_int(&mut self, key: &str, v: &Value) -> Option<u64> {
        let n = v.as_u64();
        if n.is_none() {
            self.wrong_type(key, "a non-negative integer", v);
        }
        n
    }

    pub(super) fn as_float(&mut self, key: &str, v: &Value) -> Option<f64> {
        let x = v.as_f64();
        if x.is_none() {
            self.wrong_type(key, "a number", v);
        }
        x
    }

    pub(super) fn as_bool(&mut self, key: &str, v: &Value) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.wrong_type(key, "true or false", v);
        }
        b
    }

    pub(super) fn as_str(&mut self, key: &str, v: &'a Value) -> Option<&'a str> {
        let s = v.as_str();
        if s.is_none() {
            self.wrong_type(key, "a string", v);
        }
        s
    }

    pub(super) fn req_int(&mut self, key: &'static str, means: &str) -> Option<u64> {
        match self.present(key) {
            Some(v) => self.as_int(key, v),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    /// An integer field that may be null (`q_lora_rank`, `n_inner`); `Some(None)` for null.
    pub(super) fn req_nullable_int(
        &mut self,
        key: &'static str,
        means: &str,
    ) -> Option<Option<u64>> {
        match self.raw(key) {
            Some(Value::Null) => Some(None),
            Some(v) => self.as_int(key, v).map(Some),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    pub(super) fn req_float(&mut self, key: &'static str, means: &str) -> Option<f64> {
        match self.present(key) {
            Some(v) => self.as_float(key, v),
            None => {
                self.missing(key, means);
                None
            }
        }
    }

    pub(super) fn opt_float(&mut self, key: &'static str, default: f64) -> Option<f64> {
        match self.present(key) {
            Some(v) => self.as_float(key, v),
            None => {
                self.defaulted(key, &format!("{default:?}"));
                Some(default)
            }
        }
    }

    pub(super) fn opt_bool(&mut self, key: &'static str, default: bool) -> Option<bool> {
        match self.present(key) {
            Some(v) => self.as_bool(key, v),
            None => {
                self.defaulted(key, &default.to_string());
                Some(default)
            }
        }
    }

    pub(super) fn opt_str(&mut self, key: &'static str, default: &'static str) -> Option<&'a str> {
        match self.present(key) {
            Some(v) => self.as_str(key, v),
            None => {
                self.defaulted(key, &format!("{default:?}"));
                Some(default)
            }
        }
    }

    /// A field whose value must be `ok` when present and not null; otherwise `why` explains.
    pub(super) fn expect(&mut self, key: &'static str, ok: impl Fn(&Value) -> bool, why: &str) {
        if let Some(v) = self.present(key) {
            if !ok(v) {
                self.unsupported(key, v, why);
            }
        }
    }

    /// A dropout probability: kiln trains without dropout, so a non-zero value is noted.
    pub(super) fn dropout(&mut self, key: &'static str) {
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
    pub(super) fn layer_count(&mut self, key: &'static str, n: Option<u64>) -> Option<usize> {
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

    pub(super) fn ignore(&mut self, keys: &[&'static str]) {
        self.known.extend(keys.iter().copied());
    }

    /// Reports every key this reader did not read or ignore.
    pub(super) fn unknown_keys(&mut self, whose: &str) {
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

/// A key that appears twice in one JSON object, with different values: its path and both values.
pub(super) type Repeated = (String, Value, Value);

/// Parses JSON like `serde_json::from_str`, and also returns the keys that an object repeats
/// with different values: serde_json, like Python's `json` (and so transformers), silently keeps
/// the last of them.
pub(super) fn parse_json(text: &str) -> Result<(Value, Vec<Repeated>), serde_json::Error> {
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
