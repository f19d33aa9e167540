//! Import of RoPE settings: the 5.x `rope_parameters` table or the older `rope_theta` and
//! `rope_scaling`, and YaRN with HF's magnitude correction.

use serde_json::{json, Value};

use super::reader::{show, Reader};
use super::{Family, ProblemKind};
use crate::model::{Rope, Yarn};

/// HF's YaRN magnitude correction `0.1 · m · ln(factor) + 1` (1 when `factor ≤ 1`).
pub(super) fn yarn_correction(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// The RoPE settings: the 5.x `rope_parameters` table, or the older `rope_theta` and
/// `rope_scaling` of hub checkpoints.
pub(super) fn read_rope(
    r: &mut Reader,
    family: Family,
    max_positions: Option<u64>,
) -> Option<Rope> {
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
