//! `hf`: the mapping between Hugging Face `config.json` files and kiln specs, for the four
//! families kiln shares with HF transformers: `deepseek_v3`, `deepseek_v2` (DeepSeek-V2 and
//! V2-Lite), `llama` and `gpt2`. Architecture only: no weights, and no I/O (callers hand in and
//! take back text and values).
//!
//! - [`import_config`] turns a `config.json` text into spec text that [`crate::check::check`]
//!   accepts, plus notes on every choice a user may want to know about (defaults applied,
//!   fields ignored).
//! - [`family_of`] says which family a checked [`Model`](crate::model::Model) maps to, or
//!   names every feature that has no HF equivalent.
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
//!
//! This file has the public types and errors; `reader.rs` reads config objects, `import.rs`
//! (with `rope.rs`) maps a config to an architecture, `spec_writer.rs` writes it as a spec, and
//! `export.rs` maps a model back to a config.

use std::fmt;

mod export;
mod import;
mod reader;
mod rope;
mod spec_writer;

pub use export::{export_config, family_of};
pub use import::import_config;

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

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::reader::{parse_json, IGNORED};
    use super::rope::yarn_correction;
    use super::*;
    use crate::check::check_str;
    use crate::model::Model;

    const TINY: &str = include_str!("../../../specs/tiny.toml");
    const SPECS: [&str; 6] = [
        include_str!("../../../specs/deepseek-v3.toml"),
        include_str!("../../../specs/deepseek-v2.toml"),
        include_str!("../../../specs/deepseek-v2-lite.toml"),
        include_str!("../../../specs/gpt2-124m.toml"),
        include_str!("../../../specs/llama3-8b.toml"),
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
