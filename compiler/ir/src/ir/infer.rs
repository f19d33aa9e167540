//! Shape and type rules: the result types of an op applied to operands of given types.
//!
//! The graph builder uses these to type new nodes, and the verifier re-derives every node's
//! result types with them, so the two can never disagree.

use super::{CacheLayout, DType, Op, RouterSpec, TensorType};
use crate::attrs::NormKind;

type Types = Result<Vec<TensorType>, String>;

fn arity(inputs: &[&TensorType], n: usize) -> Result<(), String> {
    if inputs.len() == n {
        Ok(())
    } else {
        Err(format!("takes {n} operands, got {}", inputs.len()))
    }
}

fn dtype(t: &TensorType, want: DType, what: &str) -> Result<(), String> {
    if t.dtype == want {
        Ok(())
    } else {
        Err(format!("{what} must be {want}, found {t}"))
    }
}

fn rank(t: &TensorType, r: usize, what: &str) -> Result<(), String> {
    if t.shape.len() == r {
        Ok(())
    } else {
        Err(format!("{what} must have rank {r}, found {t}"))
    }
}

/// The last dimension of a tensor of rank ≥ 1.
fn last(t: &TensorType, what: &str) -> Result<u64, String> {
    t.shape
        .last()
        .copied()
        .ok_or_else(|| format!("{what} must not be a scalar"))
}

fn with_last(t: &TensorType, n: u64) -> TensorType {
    let mut shape = t.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = n;
    }
    TensorType::f32(shape)
}

/// Result types of `op` applied to operands of types `inputs`, or why they do not fit.
pub fn infer(op: &Op, inputs: &[&TensorType]) -> Types {
    match op {
        Op::Embedding => {
            arity(inputs, 2)?;
            let (table, ids) = (inputs[0], inputs[1]);
            dtype(table, DType::F32, "the table")?;
            rank(table, 2, "the table")?;
            dtype(ids, DType::U32, "the ids")?;
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1]);
            Ok(vec![TensorType::f32(shape)])
        }
        Op::Linear { bias } => {
            arity(inputs, 2 + usize::from(*bias))?;
            let (x, w) = (inputs[0], inputs[1]);
            dtype(x, DType::F32, "the input")?;
            rank(w, 2, "the weight")?;
            let inp = last(x, "the input")?;
            let [out, w_in] = [w.shape[0], w.shape[1]];
            if w_in != inp {
                return Err(format!("the weight {w} does not take {inp} input features"));
            }
            if *bias && inputs[2].shape != [out] {
                return Err(format!(
                    "the bias {} does not match {out} outputs",
                    inputs[2]
                ));
            }
            Ok(vec![with_last(x, out)])
        }
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => {
            let n_params = if matches!(op, Op::RmsNorm { .. }) {
                1
            } else {
                2
            };
            arity(inputs, 1 + n_params)?;
            let x = inputs[0];
            dtype(x, DType::F32, "the input")?;
            let n = last(x, "the input")?;
            for p in &inputs[1..] {
                if p.shape != [n] {
                    return Err(format!("the norm parameter {p} does not match width {n}"));
                }
            }
            Ok(vec![x.clone()])
        }
        Op::Map { expr, vars } => {
            arity(inputs, vars.len())?;
            let first = inputs.first().ok_or("takes at least one operand")?;
            for (t, name) in inputs.iter().zip(vars) {
                dtype(t, DType::F32, name)?;
                if t.shape != first.shape {
                    return Err(format!(
                        "operand `{name}` is {t}, but `{}` is {first}",
                        vars[0]
                    ));
                }
            }
            for v in expr.vars() {
                if !vars.iter().any(|n| n == v) {
                    return Err(format!("the expression reads `{v}`, which is no operand"));
                }
            }
            Ok(vec![(*first).clone()])
        }
        Op::Split { sizes } => {
            arity(inputs, 1)?;
            let n = last(inputs[0], "the input")?;
            let total: u64 = sizes.iter().sum();
            if total != n || sizes.contains(&0) {
                return Err(format!("sizes {sizes:?} do not split {n} features"));
            }
            Ok(sizes.iter().map(|&s| with_last(inputs[0], s)).collect())
        }
        Op::Concat => {
            let first = inputs.first().ok_or("takes at least one operand")?;
            let lead = &first.shape[..first.shape.len().saturating_sub(1)];
            let mut total = 0;
            for t in inputs {
                dtype(t, DType::F32, "every operand")?;
                let n = last(t, "every operand")?;
                if &t.shape[..t.shape.len() - 1] != lead {
                    return Err(format!("{t} and {first} differ before the last axis"));
                }
                total += n;
            }
            Ok(vec![with_last(first, total)])
        }
        Op::Reshape { shape } => {
            arity(inputs, 1)?;
            let to = TensorType {
                dtype: inputs[0].dtype,
                shape: shape.clone(),
            };
            if to.elements() != inputs[0].elements() {
                return Err(format!("cannot reshape {} to {to}", inputs[0]));
            }
            Ok(vec![to])
        }
        Op::Expand { axis, n } => {
            arity(inputs, 1)?;
            let x = inputs[0];
            let mut shape = x.shape.clone();
            match shape.get_mut(*axis as usize) {
                Some(d) if *d == 1 => *d = *n,
                _ => return Err(format!("axis {axis} of {x} is not of size 1")),
            }
            Ok(vec![TensorType {
                dtype: x.dtype,
                shape,
            }])
        }
        Op::Rope { .. } => {
            arity(inputs, 1)?;
            let x = inputs[0];
            dtype(x, DType::F32, "the input")?;
            rank(x, 4, "the input [B, T, H, D]")?;
            if x.shape[3] % 2 != 0 {
                return Err(format!("the rotary dimension of {x} is odd"));
            }
            Ok(vec![x.clone()])
        }
        Op::RopeAt { .. } => {
            arity(inputs, 2)?;
            let (x, pos) = (inputs[0], inputs[1]);
            dtype(x, DType::F32, "the input")?;
            rank(x, 4, "the input [B, T, H, D]")?;
            dtype(pos, DType::U32, "the positions")?;
            if pos.shape != x.shape[..2] {
                return Err(format!("positions {pos} do not fit the rows of {x}"));
            }
            if x.shape[3] % 2 != 0 {
                return Err(format!("the rotary dimension of {x} is odd"));
            }
            Ok(vec![x.clone()])
        }
        Op::CachedAttention { layout, .. } => {
            let latent = matches!(layout, CacheLayout::Latent { .. });
            arity(inputs, if latent { 5 } else { 4 })?;
            let (q, entry, cache, pos) = (inputs[0], inputs[1], inputs[2], inputs[3]);
            for (t, what) in [(q, "q"), (entry, "the entry"), (cache, "the cache")] {
                dtype(t, DType::F32, what)?;
            }
            dtype(pos, DType::U32, "the positions")?;
            rank(q, 4, "q [B, 1, H, Dq]")?;
            rank(entry, 3, "the entry [B, 1, E]")?;
            rank(cache, 3, "the cache [B, C, E]")?;
            let (b, h) = (q.shape[0], q.shape[2]);
            let (dq, e, dv) = match *layout {
                CacheLayout::Grouped { kv_heads, head_dim } => {
                    if kv_heads == 0 || h % kv_heads != 0 {
                        return Err(format!("{h} query heads cannot share {kv_heads} KV heads"));
                    }
                    (head_dim, 2 * kv_heads * head_dim, head_dim)
                }
                CacheLayout::Latent {
                    rank: r,
                    nope,
                    rope,
                    v,
                } => {
                    let w = inputs[4];
                    if w.shape != [h * (nope + v), r] {
                        return Err(format!("kv_b {w} is not [{}, {r}]", h * (nope + v)));
                    }
                    (nope + rope, r + rope, v)
                }
            };
            if q.shape != [b, 1, h, dq]
                || entry.shape != [b, 1, e]
                || cache.shape.len() != 3
                || cache.shape[0] != b
                || cache.shape[2] != e
                || pos.shape != [b, 1]
            {
                return Err(format!(
                    "q {q}, entry {entry}, cache {cache} and positions {pos} do not fit together"
                ));
            }
            Ok(vec![TensorType::f32([b, 1, h, dv])])
        }
        Op::Attention { .. } => {
            arity(inputs, 3)?;
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                dtype(t, DType::F32, what)?;
                rank(t, 4, what)?;
            }
            let [b, t, h, dk] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
            let hk = k.shape[2];
            if k.shape[..2] != [b, t] || v.shape[..3] != k.shape[..3] || k.shape[3] != dk {
                return Err(format!("q {q}, k {k} and v {v} do not fit together"));
            }
            if hk == 0 || h % hk != 0 {
                return Err(format!("{h} query heads cannot share {hk} KV heads"));
            }
            Ok(vec![
                TensorType::f32([b, t, h, v.shape[3]]),
                TensorType::f32([b, h, t]),
            ])
        }
        Op::Router(RouterSpec { top_k, groups, .. }) => {
            arity(inputs, 3)?;
            let (x, w, bias) = (inputs[0], inputs[1], inputs[2]);
            rank(x, 2, "the input [N, d]")?;
            rank(w, 2, "the weight [E, d]")?;
            let (n, e) = (x.shape[0], w.shape[0]);
            if w.shape[1] != x.shape[1] || bias.shape != [e] {
                return Err(format!("input {x}, weight {w} and bias {bias} do not fit"));
            }
            if *top_k > e || *groups == 0 || e % groups != 0 {
                return Err(format!("top-{top_k} of {e} experts in {groups} groups"));
            }
            Ok(vec![
                TensorType::f32([n, *top_k]),
                TensorType::u32([n, *top_k]),
                TensorType::f32([n, e]),
            ])
        }
        Op::Experts { gated, .. } => {
            arity(inputs, 5 + usize::from(*gated))?;
            let (x, weights, experts) = (inputs[0], inputs[1], inputs[2]);
            rank(x, 2, "the input [N, d]")?;
            dtype(experts, DType::U32, "the expert indices")?;
            let (n, d) = (x.shape[0], x.shape[1]);
            if weights.shape.len() != 2 || weights.shape[0] != n || experts.shape != weights.shape {
                return Err(format!(
                    "weights {weights} and indices {experts} do not fit {x}"
                ));
            }
            let up = inputs[if *gated { 4 } else { 3 }];
            let down = inputs[inputs.len() - 1];
            rank(up, 3, "the up weights [E, h, d]")?;
            let (e, h) = (up.shape[0], up.shape[1]);
            if up.shape[2] != d
                || down.shape != [e, d, h]
                || (*gated && inputs[3].shape != up.shape)
            {
                return Err(format!(
                    "expert weights do not fit {e} experts of {d} → {h} → {d}"
                ));
            }
            Ok(vec![x.clone()])
        }
        Op::CrossEntropy => {
            if inputs.len() != 3 {
                arity(inputs, 2)?;
            }
            let (logits, targets) = (inputs[0], inputs[1]);
            rank(logits, 2, "the logits [N, V]")?;
            dtype(targets, DType::U32, "the targets")?;
            if targets.shape != [logits.shape[0]] {
                return Err(format!("targets {targets} do not fit logits {logits}"));
            }
            if let Some(w) = inputs.get(2) {
                dtype(w, DType::F32, "the token weights")?;
                if w.shape != [logits.shape[0]] {
                    return Err(format!("token weights {w} do not fit logits {logits}"));
                }
            }
            Ok(vec![TensorType::f32(Vec::new())])
        }
        Op::BalanceLoss { top_k, .. } => {
            arity(inputs, 2)?;
            let (scores, experts) = (inputs[0], inputs[1]);
            rank(scores, 3, "the scores [B, T, E]")?;
            dtype(experts, DType::U32, "the expert indices")?;
            if experts.shape != [scores.shape[0], scores.shape[1], *top_k] {
                return Err(format!("indices {experts} do not fit scores {scores}"));
            }
            Ok(vec![TensorType::f32(Vec::new())])
        }
        Op::Fill { shape, .. } => {
            arity(inputs, 0)?;
            Ok(vec![TensorType::f32(shape.clone())])
        }
        Op::SumAxis { axis } => {
            arity(inputs, 1)?;
            let mut shape = inputs[0].shape.clone();
            match shape.get_mut(*axis as usize) {
                Some(d) => *d = 1,
                None => return Err(format!("{} has no axis {axis}", inputs[0])),
            }
            Ok(vec![TensorType::f32(shape)])
        }
        Op::EmbeddingGrad { vocab } => {
            arity(inputs, 2)?;
            let (ids, dy) = (inputs[0], inputs[1]);
            dtype(ids, DType::U32, "the ids")?;
            if dy.shape.len() != ids.shape.len() + 1 || dy.shape[..ids.shape.len()] != ids.shape[..]
            {
                return Err(format!("gradient {dy} does not fit ids {ids}"));
            }
            Ok(vec![TensorType::f32([*vocab, last(dy, "the gradient")?])])
        }
        Op::LinearGrad { bias } => {
            arity(inputs, 3)?;
            let (x, w, dy) = (inputs[0], inputs[1], inputs[2]);
            let fwd = infer(&Op::Linear { bias: false }, &[x, w])?;
            if fwd[0] != *dy {
                return Err(format!(
                    "gradient {dy} does not match the output {}",
                    fwd[0]
                ));
            }
            let mut out = vec![x.clone(), w.clone()];
            if *bias {
                out.push(TensorType::f32([w.shape[0]]));
            }
            Ok(out)
        }
        Op::RmsNormGrad { .. } | Op::LayerNormGrad { .. } => {
            arity(inputs, 3)?;
            let (x, w, dy) = (inputs[0], inputs[1], inputs[2]);
            if x != dy || w.shape != [last(x, "the input")?] {
                return Err(format!(
                    "input {x}, weight {w} and gradient {dy} do not fit"
                ));
            }
            let mut out = vec![x.clone(), w.clone()];
            if matches!(op, Op::LayerNormGrad { .. }) {
                out.push(w.clone());
            }
            Ok(out)
        }
        Op::MapGrad { expr, vars, wrt } => {
            arity(inputs, vars.len() + 1)?;
            let fwd = infer(
                &Op::Map {
                    expr: expr.clone(),
                    vars: vars.clone(),
                },
                &inputs[..vars.len()],
            )?;
            if fwd[0] != *inputs[vars.len()] {
                return Err(format!(
                    "gradient {} does not match {}",
                    inputs[vars.len()],
                    fwd[0]
                ));
            }
            if wrt.iter().any(|&w| w as usize >= vars.len()) {
                return Err(format!("differentiates operand {wrt:?} of {}", vars.len()));
            }
            Ok(wrt.iter().map(|_| fwd[0].clone()).collect())
        }
        Op::RopeGrad { theta, yarn, pairs } => infer(
            &Op::Rope {
                theta: *theta,
                yarn: *yarn,
                pairs: *pairs,
            },
            inputs,
        ),
        Op::AttentionGrad { scale } => {
            arity(inputs, 6)?;
            let fwd = infer(&Op::Attention { scale: *scale }, &inputs[..3])?;
            if *inputs[3] != fwd[0] || *inputs[4] != fwd[1] || *inputs[5] != fwd[0] {
                return Err("o, lse and do do not match the forward results".into());
            }
            Ok(vec![
                inputs[0].clone(),
                inputs[1].clone(),
                inputs[2].clone(),
            ])
        }
        Op::RouterGrad(spec) => {
            arity(inputs, 8)?;
            let fwd = infer(&Op::Router(*spec), &inputs[..3])?;
            if *inputs[3] != fwd[0] || *inputs[4] != fwd[1] || *inputs[5] != fwd[2] {
                return Err("weights, experts and scores do not match the forward results".into());
            }
            if *inputs[6] != fwd[0] || *inputs[7] != fwd[2] {
                return Err("the gradients do not match the weights and scores".into());
            }
            Ok(vec![inputs[0].clone(), inputs[1].clone()])
        }
        Op::ExpertsGrad { act, gated } => {
            // The forward operands, then the output gradient.
            let n = 5 + usize::from(*gated);
            arity(inputs, n + 1)?;
            let fwd_op = Op::Experts {
                act: act.clone(),
                gated: *gated,
            };
            let fwd = infer(&fwd_op, &inputs[..n])?;
            if *inputs[n] != fwd[0] {
                return Err(format!(
                    "gradient {} does not match the output {}",
                    inputs[n], fwd[0]
                ));
            }
            let mut out = vec![inputs[0].clone(), inputs[1].clone()];
            out.extend(inputs[3..n].iter().map(|t| (*t).clone()));
            Ok(out)
        }
        Op::CrossEntropyGrad => {
            if inputs.len() != 4 {
                arity(inputs, 3)?;
            }
            // The forward operands: logits, targets and, when weighted, the weights (last).
            let mut fwd = vec![inputs[0], inputs[1]];
            fwd.extend(inputs.get(3));
            infer(&Op::CrossEntropy, &fwd)?;
            if !inputs[2].shape.is_empty() {
                return Err(format!("the loss gradient {} is not a scalar", inputs[2]));
            }
            Ok(vec![inputs[0].clone()])
        }
        Op::AddNorm { norm, .. } => {
            let n_params = match norm {
                NormKind::RmsNorm => 1,
                NormKind::LayerNorm => 2,
            };
            arity(inputs, 2 + n_params)?;
            let (x, r) = (inputs[0], inputs[1]);
            if x != r {
                return Err(format!("the residual {r} does not match the stream {x}"));
            }
            let mut operands = vec![x];
            operands.extend_from_slice(&inputs[2..]);
            let y = infer(&norm_op(*norm), &operands)?;
            Ok(vec![x.clone(), y[0].clone()])
        }
        Op::AddNormGrad { norm, .. } => {
            arity(inputs, 4)?;
            let (s, ds) = (inputs[0], inputs[3]);
            if s != ds {
                return Err(format!(
                    "the residual gradient {ds} does not match the stream {s}"
                ));
            }
            let grad = match norm {
                NormKind::RmsNorm => Op::RmsNormGrad { eps: 0.0 },
                NormKind::LayerNorm => Op::LayerNormGrad { eps: 0.0 },
            };
            infer(&grad, &inputs[..3])
        }
        Op::LinearMap { bias, expr, var } => {
            let pre = infer(&Op::Linear { bias: *bias }, inputs)?;
            let map = Op::Map {
                expr: expr.clone(),
                vars: vec![var.clone()],
            };
            let y = infer(&map, &[&pre[0]])?;
            Ok(vec![pre[0].clone(), y[0].clone()])
        }
        Op::BalanceLossGrad { alpha, top_k } => {
            arity(inputs, 3)?;
            let fwd = Op::BalanceLoss {
                alpha: *alpha,
                top_k: *top_k,
            };
            infer(&fwd, &inputs[..2])?;
            if !inputs[2].shape.is_empty() {
                return Err(format!("the loss gradient {} is not a scalar", inputs[2]));
            }
            Ok(vec![inputs[0].clone()])
        }
    }
}

/// The plain norm a fused op applies (its `eps` does not affect shapes).
fn norm_op(norm: NormKind) -> Op {
    match norm {
        NormKind::RmsNorm => Op::RmsNorm { eps: 0.0 },
        NormKind::LayerNorm => Op::LayerNorm { eps: 0.0 },
    }
}
