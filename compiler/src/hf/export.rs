//! Export: the HF family a checked [`Model`] maps to ([`family_of`], or every feature that
//! keeps it from mapping) and the family's `config.json` ([`export_config`]).

use serde_json::{json, Map, Value};

use super::{Family, HfError, Problem, ProblemKind};
use crate::dsl::stack::{format_stack, LayerKind};
use crate::model::{
    AttentionKind, GroupScore, Model, NormKind, Positions, Rope, ScoreFunc, Selection,
};

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
/// [`import_config`](super::import_config) of it gives back `model` in everything but `train`
/// and `precision`.
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
