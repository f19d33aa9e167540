//! Import: a `config.json` → spec text ([`import_config`]): the generic keys, each family's
//! architecture (`llama`, `gpt2`, `deepseek_v2`/`deepseek_v3` with their MoE), and the
//! `kiln` table of settings HF has no key for.

use serde_json::{Map, Value};

use super::reader::{
    aliases, describe, parse_json, show, Reader, IGNORED, IGNORED_DEEPSEEK, IGNORED_GPT2,
};
use super::rope::read_rope;
use super::spec_writer::write_spec;
use super::{
    Family, HfError, ImportedConfig, Problem, ProblemKind, DEFAULT_BIAS_UPDATE, DEFAULT_MTP_WEIGHT,
};
use crate::check::check_str;
use crate::dsl::stack::LayerKind;
use crate::model::{
    AttentionKind, GroupScore, Mla, NormKind, Positions, Rope, ScoreFunc, Selection,
};

/// What an import found, in the terms of a spec: the values the spec will hold.
pub(super) struct Arch {
    pub(super) vocab: u64,
    pub(super) d_model: u64,
    pub(super) layers: Vec<LayerKind>,
    pub(super) max_positions: u64,
    pub(super) positions: Positions,
    pub(super) norm: NormKind,
    pub(super) norm_eps: f64,
    pub(super) tie: bool,
    pub(super) init_std: f64,
    pub(super) heads: u64,
    pub(super) attention: AttentionKind,
    pub(super) attention_bias: bool,
    pub(super) rope: Option<Rope>,
    pub(super) ffn: Option<FfnOut>,
    pub(super) moe: Option<MoeOut>,
    pub(super) mtp: Option<MtpOut>,
}

pub(super) struct FfnOut {
    pub(super) hidden: u64,
    pub(super) act: &'static str,
    pub(super) bias: bool,
}

pub(super) struct MoeOut {
    pub(super) experts: u64,
    pub(super) shared: u64,
    pub(super) top_k: u64,
    pub(super) expert_hidden: u64,
    pub(super) act: &'static str,
    pub(super) score: ScoreFunc,
    pub(super) select: Selection,
    pub(super) groups: u64,
    pub(super) groups_kept: u64,
    pub(super) group_score: GroupScore,
    pub(super) normalize_top_k: bool,
    pub(super) route_scale: f64,
    pub(super) bias_update: f64,
    pub(super) seq_aux: f64,
}

pub(super) struct MtpOut {
    pub(super) depth: u64,
    pub(super) weight: f64,
    pub(super) block: LayerKind,
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
