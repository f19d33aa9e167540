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
        let gemms: Vec<&Op> = all
            .iter()
            .filter(|op| matches!(op.class, OpClass::Linear | OpClass::Head))
            .collect();
        // A tile or block size that fails several dimensions which a common power of two
        // would tile is the cause: one error at its key instead of one per dimension.
        let blame = self.blame_sizes(&gemms, p, fp8, spans);
        let mut sizes: std::collections::HashMap<Size, (u64, Vec<u64>)> = Default::default();
        // One error per offending dimension value, listing every op and layer it affects.
        let mut bad: Vec<TileViolation> = Vec::new();
        for &op in &gemms {
            let fwd = p.format_of(op);
            let grad = p.grad_format_of(op);
            let [_, tile] = fp8.act_tile;
            let [block_rows, block_cols] = fp8.weight_block;
            let mut need: Vec<(&str, u64, u64, String, Size)> = Vec::new();
            if fwd.is_fp8() {
                need.push((
                    "input",
                    op.inp,
                    tile,
                    format!("the 1×{tile} activation tile"),
                    Size::ActTile,
                ));
                let block = format!("the {block_rows}×{block_cols} weight block");
                need.push(("input", op.inp, block_cols, block.clone(), Size::BlockCols));
                need.push(("output", op.out, block_rows, block, Size::BlockRows));
            }
            if grad.is_fp8() {
                let what = format!("the 1×{tile} tile of the output gradient");
                need.push(("output", op.out, tile, what, Size::ActTile));
            }
            for (_, value, multiple, _, size) in &need {
                sizes
                    .entry(*size)
                    .or_insert((*multiple, Vec::new()))
                    .1
                    .push(*value);
            }
            for (dim, value, multiple, what, size) in need {
                if value % multiple != 0 {
                    let blamed = blame.get(&size).copied().unwrap_or(false);
                    if blamed {
                        continue;
                    }
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
                                ops: Vec::new(),
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
                    if !v.ops.iter().any(|o| o == op.local_path()) {
                        v.ops.push(op.local_path().to_string());
                    }
                }
            }
        }
        let grads_fp8 = all.iter().any(|op| {
            matches!(op.class, OpClass::Linear | OpClass::Head) && p.grad_format_of(op).is_fp8()
        });
        // A blamed activation tile is reported once, at its key.
        let tile_blamed = blame.get(&Size::ActTile).copied().unwrap_or(false);
        let tokens = tokens.filter(|t| grads_fp8 && !tile_blamed && t % fp8.act_tile[1] != 0);
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
            let multiple = v.multiples.iter().fold(1, |l, &m| l / gcd(l, m) * m);
            let keys: Vec<&str> = spans
                .dims
                .iter()
                .filter(|(_, n, _)| *n == v.value)
                .map(|(k, _, _)| k.as_str())
                .collect();
            let change = match keys.as_slice() {
                [key] => format!("set `{key}` to {}", nearest_multiples(v.value, multiple)),
                _ => format!("make it {}", nearest_multiples(v.value, multiple)),
            };
            let patterns = keep_patterns(&v.ops, &all, p)
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            self.sink.push(d.with_help(format!(
                "it must fill {}: {change}, or keep every op it fails out of FP8 by adding \
                 {patterns} to `precision.keep`",
                v.tiles.join(", ")
            )));
        }
    }

    /// For each tile or block size, whether it — not a dimension — is the cause of its tiling
    /// failures: it fails two or more distinct dimensions, all of which a common power of two
    /// of at least 16 divides. Reports one error at the size's key for each blamed size.
    fn blame_sizes(
        &self,
        gemms: &[&Op],
        p: &Precision,
        fp8: Fp8,
        spans: &Spans,
    ) -> std::collections::HashMap<Size, bool> {
        let mut axes: Vec<(Size, u64, Vec<u64>)> = vec![
            (Size::ActTile, fp8.act_tile[1], Vec::new()),
            (Size::BlockCols, fp8.weight_block[1], Vec::new()),
            (Size::BlockRows, fp8.weight_block[0], Vec::new()),
        ];
        let mut failing_ops: Vec<Vec<String>> = vec![Vec::new(); 3];
        for op in gemms {
            let (fwd, grad) = (p.format_of(op).is_fp8(), p.grad_format_of(op).is_fp8());
            let dims = [
                (0, op.inp, fwd),
                (0, op.out, grad),
                (1, op.inp, fwd),
                (2, op.out, fwd),
            ];
            for (axis, value, used) in dims {
                if !used {
                    continue;
                }
                axes[axis].2.push(value);
                let path = op.local_path();
                if value % axes[axis].1 != 0 && !failing_ops[axis].iter().any(|o| o == path) {
                    failing_ops[axis].push(path.to_string());
                }
            }
        }
        let mut blamed = std::collections::HashMap::new();
        for ((size, multiple, values), ops) in axes.into_iter().zip(failing_ops) {
            let mut failing: Vec<u64> = values
                .iter()
                .copied()
                .filter(|v| v % multiple != 0)
                .collect();
            failing.sort_unstable();
            failing.dedup();
            let g = values.iter().fold(0, |g, &v| gcd(g, v));
            // The largest power of two up to 128 (DeepSeek-V3's size) dividing every value.
            let fits = (4..=7).rev().map(|e| 1u64 << e).find(|b| g % b == 0);
            let Some(fits) = fits.filter(|_| failing.len() >= 2) else {
                continue;
            };
            blamed.insert(size, true);
            let (key, now, fixed) = match size {
                Size::ActTile => ("act_tile", fp8.act_tile, [1, fits]),
                Size::BlockCols => (
                    "weight_block",
                    fp8.weight_block,
                    [fp8.weight_block[0], fits],
                ),
                Size::BlockRows => (
                    "weight_block",
                    fp8.weight_block,
                    [fits, fp8.weight_block[1]],
                ),
            };
            let what = match size {
                Size::ActTile => "the input (and gradient) dimensions",
                Size::BlockCols => "the input dimensions",
                Size::BlockRows => "the output dimensions",
            };
            let list = failing
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let span = match spans.fp8_keys.iter().find(|(k, _)| *k == key) {
                Some((_, s)) => s.clone(),
                None => spans.fp8.clone(),
            };
            self.sink.push(
                Diagnostic::new(
                    Rule::Fp8Tile,
                    span,
                    format!(
                        "`precision.fp8.{key}` = [{}, {}]: {multiple} does not divide {what} of FP8 GEMMs {list}",
                        now[0], now[1]
                    ),
                    format!("{multiple} does not tile {}", ops.join(", ")),
                )
                .with_help(format!(
                    "every such dimension of this model is a multiple of {fits}: \
                     `{key} = [{}, {}]`",
                    fixed[0], fixed[1]
                )),
            );
        }
        blamed
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
    /// The local paths of the ops that fail.
    ops: Vec<String>,
    span: Range<usize>,
}

/// Which FP8 tile or block size a dimension must be a multiple of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Size {
    /// `act_tile[1]`: the inputs of FP8 GEMMs, and the outputs of FP8 gradient GEMMs.
    ActTile,
    /// `weight_block[1]`: the inputs.
    BlockCols,
    /// `weight_block[0]`: the outputs.
    BlockRows,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `1400` with multiple 128 → `"1408 or 1280"`: the nearest values that tile.
fn nearest_multiples(value: u64, multiple: u64) -> String {
    let below = value / multiple * multiple;
    let above = below + multiple;
    if below == 0 {
        above.to_string()
    } else if above - value <= value - below {
        format!("{above} or {below}")
    } else {
        format!("{below} or {above}")
    }
}

/// Keep patterns that cover `failing` (local op paths) and change nothing else: a parent such
/// as `moe.experts` when every GEMM under it fails and every other op under it already runs
/// in `keep_format`, else the op's own path.
fn keep_patterns(failing: &[String], all: &[Op], p: &Precision) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for path in failing {
        let covered = |parent: &str| {
            all.iter()
                .filter(|o| {
                    let local = o.local_path();
                    local.starts_with(parent) && local[parent.len()..].starts_with('.')
                })
                .all(|o| {
                    let gemm = matches!(o.class, OpClass::Linear | OpClass::Head);
                    if gemm {
                        failing.iter().any(|f| f == o.local_path())
                    } else {
                        p.format_of(o) == p.keep_format
                    }
                })
        };
        let pattern = match path.rsplit_once('.') {
            Some((parent, _)) if covered(parent) => parent.to_string(),
            _ => path.to_string(),
        };
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    out
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
