//! Rules over a model's named ops: precision patterns must select an op, and FP8 GEMMs must
//! tile their dimensions exactly.

use std::ops::Range;

use super::*;
use crate::dsl::pattern::Pattern;
use crate::named_ops::{ops, Op, OpClass, Site};

impl Checker<'_, '_> {
    /// Rules over the model's named ops: keep patterns must select something, and FP8 GEMMs
    /// must tile exactly. `tokens` (batch × seq_len) is `None` when either is invalid; the
    /// rule that reads it is then skipped. `model.train` may be a stand-in: it is not read.
    pub(super) fn op_rules(&self, model: &Model, tokens: Option<u64>, spans: &Spans) {
        let all = ops(model);
        let p = &model.precision;
        for (pat, span) in p.keep.iter().zip(&spans.keep) {
            if !all.iter().any(|op| pat.matches(&op.path)) {
                self.unmatched(pat, span, &all);
            }
        }
        let Some(fp8) = p.fp8 else { return };
        // One error per offending dimension value, listing every op and layer it affects.
        let mut bad: Vec<TileViolation> = Vec::new();
        for op in all
            .iter()
            .filter(|op| matches!(op.class, OpClass::Linear | OpClass::Head))
        {
            let fwd = p.format_of(op);
            let grad = p.grad_format_of(op);
            let [_, tile] = fp8.act_tile;
            let [block_rows, block_cols] = fp8.weight_block;
            let mut need: Vec<(&str, u64, u64, String)> = Vec::new();
            if fwd.is_fp8() {
                need.push((
                    "input",
                    op.inp,
                    tile,
                    format!("the 1×{tile} activation tile"),
                ));
                let block = format!("the {block_rows}×{block_cols} weight block");
                need.push(("input", op.inp, block_cols, block.clone()));
                need.push(("output", op.out, block_rows, block));
            }
            if grad.is_fp8() {
                let what = format!("the 1×{tile} tile of the output gradient");
                need.push(("output", op.out, tile, what));
            }
            for (dim, value, multiple, what) in need {
                if value % multiple != 0 {
                    let use_ = format!("{} ({dim})", op.local_path());
                    let v = match bad.iter_mut().position(|b| b.value == value) {
                        Some(i) => &mut bad[i],
                        None => {
                            bad.push(TileViolation {
                                value,
                                uses: Vec::new(),
                                sites: Vec::new(),
                                tiles: Vec::new(),
                                multiples: Vec::new(),
                                // The key that put the first such op in FP8.
                                span: match op.class {
                                    OpClass::Head => spans.head.clone(),
                                    _ if fwd.is_fp8() => spans.linear.clone(),
                                    _ => spans.linear_grad.clone(),
                                },
                            });
                            bad.last_mut().expect("just pushed")
                        }
                    };
                    for (list, item) in [(&mut v.uses, use_), (&mut v.tiles, what)] {
                        if !list.contains(&item) {
                            list.push(item);
                        }
                    }
                    if !v.sites.contains(&op.site) {
                        v.sites.push(op.site);
                    }
                    if !v.multiples.contains(&multiple) {
                        v.multiples.push(multiple);
                    }
                }
            }
        }
        let grads_fp8 = all.iter().any(|op| {
            matches!(op.class, OpClass::Linear | OpClass::Head) && p.grad_format_of(op).is_fp8()
        });
        let tokens = tokens.filter(|t| grads_fp8 && t % fp8.act_tile[1] != 0);
        if let Some(tokens) = tokens {
            self.sink.push(
                Diagnostic::new(
                    Rule::Fp8Tile,
                    spans.seq_len.clone(),
                    format!(
                        "FP8 weight-gradient GEMMs contract over the {tokens} tokens of a step \
                         (batch × seq_len), which is not a multiple of the {}-wide activation tile",
                        fp8.act_tile[1]
                    ),
                    "tokens per step",
                )
                .with_related(spans.linear_grad.clone(), "FP8 gradient GEMMs")
                .with_help(format!(
                    "make batch × seq_len a multiple of {}, or set `linear_grad` to a 16-bit format",
                    fp8.act_tile[1]
                )),
            );
        }
        for v in bad {
            let first = v.uses[0].split(' ').next().unwrap_or_default().to_string();
            let mut d = Diagnostic::new(
                Rule::Fp8Tile,
                v.span.clone(),
                format!(
                    "dimension {} of FP8 GEMMs is not a multiple of {}",
                    v.value,
                    v.multiples
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                format!(
                    "FP8 here: {}{}",
                    v.uses.join(", "),
                    describe_sites(&v.sites)
                ),
            );
            for (key, span) in spans
                .dims
                .iter()
                .filter(|(_, n, _)| *n == v.value)
                .map(|(k, _, s)| (k, s))
            {
                d = d.with_related(span.clone(), format!("`{key}` = {}", v.value));
            }
            if spans.fp8.is_empty() {
                d.message
                    .push_str(" (the default FP8 tiles of DeepSeek-V3)");
            } else {
                d = d.with_related(spans.fp8.clone(), "tile and block sizes");
            }
            self.sink.push(d.with_help(format!(
                "it must fill {}; change the dimension, or keep these ops out of FP8 with \
                 `precision.keep`, e.g. \"{first}\"",
                v.tiles.join(", ")
            )));
        }
    }

    pub(super) fn unmatched(&self, pat: &Pattern, span: &Range<usize>, all: &[Op]) {
        let mut names: Vec<&str> = all.iter().map(Op::local_path).collect();
        names.extend(all.iter().flat_map(|o| o.local_path().split('.')));
        names.sort_unstable();
        names.dedup();
        let text = pat.to_string();
        let help = match closest(&text, names.iter().copied()) {
            Some(c) => format!("did you mean `{c}`?"),
            None => "op names look like `embed`, `head`, `attn.kv_a`, `attn.core`, `moe.router`, `ffn.up`, `*norm`; see docs/spec.md".to_string(),
        };
        self.sink.push(
            Diagnostic::new(
                Rule::UnmatchedPattern,
                span.clone(),
                format!("pattern `{text}` in `precision.keep` selects no op of this model"),
                "matches nothing",
            )
            .with_help(help),
        );
    }
}

/// One FP8 tiling error: a dimension value that some FP8 GEMMs cannot tile.
struct TileViolation {
    value: u64,
    /// `op (input|output)` for each local op path that has the value.
    uses: Vec<String>,
    sites: Vec<Site>,
    /// The tiles and blocks it fails to fill, and their widths along the dimension.
    tiles: Vec<String>,
    multiples: Vec<u64>,
    span: Range<usize>,
}

/// " in layers 0–60", " in layers 3, 7 and MTP module 0", or "" for ops outside the blocks.
fn describe_sites(sites: &[Site]) -> String {
    let layers: Vec<usize> = sites
        .iter()
        .filter_map(|s| {
            if let Site::Layer(i) = s {
                Some(*i)
            } else {
                None
            }
        })
        .collect();
    let mtp: Vec<usize> = sites
        .iter()
        .filter_map(|s| if let Site::Mtp(i) = s { Some(*i) } else { None })
        .collect();
    let mut parts = Vec::new();
    if !layers.is_empty() {
        let contiguous = layers.windows(2).all(|w| w[1] == w[0] + 1);
        parts.push(match (layers.len(), contiguous) {
            (1, _) => format!("layer {}", layers[0]),
            (_, true) => format!("layers {}–{}", layers[0], layers[layers.len() - 1]),
            _ => format!(
                "layers {}",
                layers
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    if !mtp.is_empty() {
        parts.push(format!(
            "MTP module{} {}",
            if mtp.len() > 1 { "s" } else { "" },
            mtp.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Ops outside the blocks (embedding, head) need no location.
    if parts.is_empty() {
        String::new()
    } else {
        format!(" in {}", parts.join(" and "))
    }
}
