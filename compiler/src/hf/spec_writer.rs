//! Writing the spec: an import's architecture as spec text, `key = value` lines with aligned
//! comments naming the HF field each came from, like the reference specs.

use std::fmt;

use super::import::Arch;
use super::{Family, TRAIN_DEFAULTS};
use crate::dsl::stack::format_stack;
use crate::model::{AttentionKind, GroupScore, NormKind, Positions, ScoreFunc, Selection};

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

pub(super) fn write_spec(a: &Arch, family: Family, name: &str) -> String {
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
