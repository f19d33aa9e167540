//! Where each kiln parameter lives in a Hugging Face checkpoint.
//!
//! kiln names parameters after op paths (`layers.3.attn.kv_a.weight`); HF checkpoints use each
//! family's module names (`model.layers.3.self_attn.kv_a_proj_with_mqa.weight`). This module is
//! the one place that knows the correspondence, as data: for every kiln parameter, the list of
//! [`Piece`]s of HF tensors that, concatenated along the first axis, give the kiln tensor.
//! Import reads pieces into kiln tensors; export writes kiln tensors back into pieces. It does
//! no I/O and knows nothing of tensor values.
//!
//! The layouts (transformers 5.x `save_pretrained`, which writes the hub's layout):
//! - DeepSeek-V2/V3 and Llama under `model.` with `lm_head.weight`; linear weights `[out, in]`
//!   as in kiln. Routed experts are stored one tensor per expert
//!   (`mlp.experts.{j}.gate_proj.weight: [hidden, d_model]`); kiln stacks them `[e, h, d]`.
//!   DeepSeek-V3's router bias is `mlp.gate.e_score_correction_bias`.
//! - DeepSeek-V3's MTP modules sit after the last layer, `model.layers.{L + k}`, with `enorm`,
//!   `hnorm`, `eh_proj`, the block's weights, `shared_head.norm`, and copies of the shared
//!   embedding and head (`embed_tokens`, `shared_head.head`) that kiln does not keep twice
//!   ([`shared_copies`]).
//! - GPT-2 under `transformer.` (the original OpenAI checkpoint has no prefix; import accepts
//!   both), with `Conv1D` weights stored `[in, out]` and the query, key and value projections
//!   fused into `attn.c_attn` (`[d, 3d]`, bias `[3d]`).

use crate::model::{AttentionKind, Model, NormKind, Positions};
pub use kiln_ir::hf_layout::{Layout, Piece};

/// The HF naming scheme a model's checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// DeepSeek-V2/V3 (MLA) and Llama (grouped-query attention): `model.…`.
    Decoder,
    /// GPT-2: `transformer.…`, `Conv1D` weights, fused `c_attn`.
    Gpt2,
}

impl Naming {
    /// The scheme of a checked model: GPT-2's for learned positions with LayerNorm, the
    /// decoder scheme otherwise.
    pub fn of(model: &Model) -> Naming {
        if model.positions == Positions::Learned && model.norm.kind == NormKind::LayerNorm {
            Naming::Gpt2
        } else {
            Naming::Decoder
        }
    }
}

/// The HF pieces of the kiln parameter `name`, in order: concatenated along the first axis
/// they give the kiln tensor (one piece for most parameters, one per expert for stacked expert
/// weights). `Ok(vec![])` means HF has no such tensor (DeepSeek-V2's routers have no bias;
/// kiln keeps a zero one). An unknown name is an error: the mapping and the lowering disagree,
/// which is a bug in kiln.
pub fn pieces(model: &Model, name: &str) -> Result<Vec<Piece>, String> {
    let unknown = || format!("no Hugging Face name is known for kiln parameter `{name}`");
    match Naming::of(model) {
        Naming::Decoder => decoder_pieces(model, name).ok_or_else(unknown),
        Naming::Gpt2 => gpt2_pieces(name).ok_or_else(unknown),
    }
}

/// Whether the model's routers carry HF's `e_score_correction_bias` (sigmoid scoring, as in
/// DeepSeek-V3); DeepSeek-V2's softmax routers have none.
fn router_bias_in_hf(model: &Model) -> bool {
    model
        .moe
        .as_ref()
        .is_some_and(|m| m.score == crate::model::ScoreFunc::Sigmoid)
}

fn decoder_pieces(model: &Model, name: &str) -> Option<Vec<Piece>> {
    let one = |n: String| Some(vec![Piece::same(n)]);
    match name {
        "embed.weight" => return one("model.embed_tokens.weight".into()),
        "head.weight" => return one("lm_head.weight".into()),
        "final.norm.weight" => return one("model.norm.weight".into()),
        _ => {}
    }
    // `layers.{i}.rest` or `mtp.{k}.rest`, the latter stored as layer `L + k`.
    let (index, rest) = if let Some(r) = name.strip_prefix("layers.") {
        let (i, rest) = r.split_once('.')?;
        (i.parse::<usize>().ok()?, rest)
    } else if let Some(r) = name.strip_prefix("mtp.") {
        let (k, rest) = r.split_once('.')?;
        let k = k.parse::<usize>().ok()?;
        let mtp_only = match rest {
            "enorm.weight" | "hnorm.weight" | "eh_proj.weight" => Some(rest.to_string()),
            "norm.weight" => Some("shared_head.norm.weight".to_string()),
            _ => None,
        };
        let layer = model.layers.len() + k;
        if let Some(r) = mtp_only {
            return one(format!("model.layers.{layer}.{r}"));
        }
        (layer, rest)
    } else {
        return None;
    };
    let prefix = format!("model.layers.{index}");
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn.norm" => "input_layernorm".to_string(),
        "ffn.norm" | "moe.norm" => "post_attention_layernorm".to_string(),
        "moe.router" => {
            return match param {
                "weight" => one(format!("{prefix}.mlp.gate.weight")),
                "bias" if router_bias_in_hf(model) => {
                    one(format!("{prefix}.mlp.gate.e_score_correction_bias"))
                }
                "bias" => Some(vec![]),
                _ => None,
            };
        }
        _ => {
            if let Some(which) = module.strip_prefix("moe.experts.") {
                let proj = projection(which)?;
                let e = model.moe.as_ref()?.experts as usize;
                return Some(
                    (0..e)
                        .map(|j| Piece::same(format!("{prefix}.mlp.experts.{j}.{proj}.{param}")))
                        .collect(),
                );
            }
            if let Some(which) = module.strip_prefix("moe.shared.") {
                format!("mlp.shared_experts.{}", projection(which)?)
            } else if let Some(which) = module.strip_prefix("ffn.") {
                format!("mlp.{}", projection(which)?)
            } else if let Some(which) = module.strip_prefix("attn.") {
                format!("self_attn.{}", attention_projection(model, which)?)
            } else {
                return None;
            }
        }
    };
    one(format!("{prefix}.{hf_module}.{param}"))
}

/// The HF module of an FFN projection.
fn projection(kiln: &str) -> Option<&'static str> {
    Some(match kiln {
        "gate" => "gate_proj",
        "up" => "up_proj",
        "down" => "down_proj",
        _ => return None,
    })
}

/// The HF module of an attention projection or norm.
fn attention_projection(model: &Model, kiln: &str) -> Option<&'static str> {
    let latent = matches!(model.attention.kind, AttentionKind::Latent(_));
    Some(match (kiln, latent) {
        ("q", _) => "q_proj",
        ("k", false) => "k_proj",
        ("v", false) => "v_proj",
        ("o", _) => "o_proj",
        ("q_a", true) => "q_a_proj",
        ("q_norm", true) => "q_a_layernorm",
        ("q_b", true) => "q_b_proj",
        ("kv_a", true) => "kv_a_proj_with_mqa",
        ("kv_norm", true) => "kv_a_layernorm",
        ("kv_b", true) => "kv_b_proj",
        _ => return None,
    })
}

fn gpt2_pieces(name: &str) -> Option<Vec<Piece>> {
    let one = |n: String, layout| Some(vec![Piece { name: n, layout }]);
    let plain = |n: &str| one(format!("transformer.{n}"), Layout::Same);
    match name {
        "embed.weight" => return plain("wte.weight"),
        "pos_embed.weight" => return plain("wpe.weight"),
        "final.norm.weight" => return plain("ln_f.weight"),
        "final.norm.bias" => return plain("ln_f.bias"),
        "head.weight" => return one("lm_head.weight".into(), Layout::Same),
        _ => {}
    }
    let r = name.strip_prefix("layers.")?;
    let (i, rest) = r.split_once('.')?;
    let i = i.parse::<usize>().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let conv = |index| Layout::Conv1d { index, count: 1 };
    let (hf, layout) = match module {
        "attn.norm" => ("ln_1", Layout::Same),
        "ffn.norm" => ("ln_2", Layout::Same),
        "attn.q" => ("attn.c_attn", Layout::Conv1d { index: 0, count: 3 }),
        "attn.k" => ("attn.c_attn", Layout::Conv1d { index: 1, count: 3 }),
        "attn.v" => ("attn.c_attn", Layout::Conv1d { index: 2, count: 3 }),
        "attn.o" => ("attn.c_proj", conv(0)),
        "ffn.up" => ("mlp.c_fc", conv(0)),
        "ffn.down" => ("mlp.c_proj", conv(0)),
        _ => return None,
    };
    one(format!("transformer.h.{i}.{hf}.{param}"), layout)
}

/// Tensors DeepSeek's checkpoints store for MTP module `k` that kiln shares with the main model
/// instead: `(HF name, kiln parameter it copies)`. Export writes them, as DeepSeek's release
/// does; import checks that they equal the main model's.
pub fn shared_copies(model: &Model) -> Vec<(String, &'static str)> {
    let Some(mtp) = model.mtp else {
        return vec![];
    };
    let layers = model.layers.len();
    (0..mtp.depth as usize)
        .flat_map(|k| {
            let p = format!("model.layers.{}", layers + k);
            [
                (format!("{p}.embed_tokens.weight"), "embed.weight"),
                (format!("{p}.shared_head.head.weight"), "head.weight"),
            ]
        })
        .collect()
}

/// HF checkpoint tensors that hold no parameter and are skipped on import: the causal-mask
/// buffers old GPT-2 checkpoints carry (`h.{i}.attn.bias`, `h.{i}.attn.masked_bias`) and
/// rotary frequency buffers some Llama checkpoints carry (`rotary_emb.inv_freq`).
pub fn is_buffer(naming: Naming, name: &str) -> bool {
    match naming {
        Naming::Gpt2 => name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"),
        Naming::Decoder => name.ends_with("rotary_emb.inv_freq"),
    }
}

/// The canonical form of a checkpoint tensor name: GPT-2 checkpoints saved from `GPT2Model`
/// (OpenAI's original upload) lack the `transformer.` prefix that `GPT2LMHeadModel` writes.
pub fn canonical(naming: Naming, name: &str) -> String {
    match naming {
        Naming::Gpt2 if !name.starts_with("transformer.") && name != "lm_head.weight" => {
            format!("transformer.{name}")
        }
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check;
    use crate::lower::lower;
    use std::collections::BTreeSet;

    fn model(path: &str) -> Model {
        let text = std::fs::read(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        check(&text).unwrap()
    }

    /// Every parameter of every reference spec has HF pieces, and no two parameters claim the
    /// same piece.
    #[test]
    fn every_parameter_maps_to_distinct_hf_tensors() {
        for spec in [
            "specs/tiny.toml",
            "specs/gpt2-124m.toml",
            "specs/llama3-8b.toml",
            "specs/deepseek-v2-lite.toml",
        ] {
            let m = model(spec);
            let graph = lower(&m).unwrap();
            let mut seen = BTreeSet::new();
            for (_, p) in graph.params.iter() {
                for piece in pieces(&m, &p.name).unwrap_or_else(|e| panic!("{spec}: {e}")) {
                    assert!(seen.insert(piece.clone()), "{spec}: {piece:?} twice");
                }
            }
            assert!(!seen.is_empty());
        }
    }

    #[test]
    fn deepseek_names() {
        let m = model("specs/tiny.toml");
        let name = |k: &str| {
            pieces(&m, k)
                .unwrap()
                .into_iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            name("layers.0.attn.kv_a.weight"),
            ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
        );
        assert_eq!(
            name("layers.2.moe.router.bias"),
            ["model.layers.2.mlp.gate.e_score_correction_bias"]
        );
        let experts = name("layers.1.moe.experts.down.weight");
        assert_eq!(experts.len(), 8);
        assert_eq!(experts[7], "model.layers.1.mlp.experts.7.down_proj.weight");
        // tiny has four layers; its MTP module is stored as layer 4.
        assert_eq!(
            name("mtp.0.eh_proj.weight"),
            ["model.layers.4.eh_proj.weight"]
        );
        assert_eq!(
            name("mtp.0.norm.weight"),
            ["model.layers.4.shared_head.norm.weight"]
        );
        assert_eq!(
            name("mtp.0.moe.shared.up.weight"),
            ["model.layers.4.mlp.shared_experts.up_proj.weight"]
        );
        assert_eq!(
            shared_copies(&m),
            [
                (
                    "model.layers.4.embed_tokens.weight".to_string(),
                    "embed.weight"
                ),
                (
                    "model.layers.4.shared_head.head.weight".to_string(),
                    "head.weight"
                )
            ]
        );
        assert!(pieces(&m, "layers.0.attn.nonsense.weight").is_err());
    }

    #[test]
    fn gpt2_names_and_fused_qkv() {
        let m = model("specs/gpt2-124m.toml");
        assert_eq!(
            pieces(&m, "layers.11.attn.v.bias").unwrap(),
            [Piece {
                name: "transformer.h.11.attn.c_attn.bias".into(),
                layout: Layout::Conv1d { index: 2, count: 3 }
            }]
        );
        assert_eq!(
            pieces(&m, "layers.0.ffn.down.weight").unwrap()[0].layout,
            Layout::Conv1d { index: 0, count: 1 }
        );
        assert_eq!(
            canonical(Naming::Gpt2, "h.0.ln_1.weight"),
            "transformer.h.0.ln_1.weight"
        );
        assert!(is_buffer(Naming::Gpt2, "h.3.attn.masked_bias"));
    }

    #[test]
    fn softmax_routers_have_no_hf_bias() {
        let m = model("specs/deepseek-v2-lite.toml");
        let graph = lower(&m).unwrap();
        for (_, p) in graph.params.iter() {
            if p.name.ends_with("moe.router.bias") {
                assert_eq!(pieces(&m, &p.name).unwrap(), []);
            }
        }
    }
}
