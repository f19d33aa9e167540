//! Autoregressive decoding with a KV cache: one new token per sequence per step, attention
//! reading the cached keys and values of the earlier tokens instead of recomputing them.
//!
//! The decoder computes what the lowered forward graph computes (`kiln_compiler::lower`),
//! token by token, from the same parameters (by name), with the same CPU kernels where the
//! shapes allow; a test checks its logits against the interpreter's uncached forward pass.
//!
//! For multi-head latent attention the cache holds only what DeepSeek-V2/V3 need per token and
//! layer: the normalized latent `c_kv` (`kv_rank` elements) and the roped shared key
//! `k_rope` (`rope_dim`), 576 elements for V3. The key and value up-projections are absorbed
//! instead of applied to every cached token (DeepSeek-V2 §2.1.2):
//! - per head, the query's no-RoPE part is mapped into the latent space once,
//!   `q̃ = W_ukᵀ · q_nope`, so that `q_nope · k_nope(t) = q̃ · c_kv(t)`;
//! - the attention output is formed in the latent space, `õ = Σ_t p_t · c_kv(t)`, and mapped
//!   out once, `o = W_uv · õ`.
//!
//! Grouped-query and multi-head attention cache each token's roped keys and values.
//!
//! The cache stores in the precision policy's `kv_cache` format (f32, bf16 or fp16); its
//! bytes per token are then the analyzer's KV-cache figure.

use std::collections::HashMap;

use kiln_compiler::ir::{Graph, RouterSpec};
use kiln_compiler::model::{AttentionKind, Format, LayerKind, Model, NormKind, Positions};

use crate::cpu::attention::{rope_row, rope_tables, RopePairs, RopeTables};
use crate::cpu::moe::{self, Activation as _, ExpertFfn};
use crate::op_fns::{self, norm_fwd, router_config, ExprActivation};

/// Why a decoder could not be built or run.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// A parameter the model needs is not in the graph (or has the wrong size).
    Param(String),
    /// The cache cannot use the policy's format.
    CacheFormat(Format),
    /// A sequence would exceed the cache's capacity (or the model's positions).
    Full { sequence: usize, capacity: usize },
    /// A token id is outside the vocabulary, or a sequence index outside the batch.
    OutOfRange(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Param(m) | DecodeError::OutOfRange(m) => f.write_str(m),
            DecodeError::CacheFormat(format) => write!(
                f,
                "the KV cache cannot be stored in {format} yet (precision.kv_cache); use fp32, \
                 bf16 or fp16"
            ),
            DecodeError::Full { sequence, capacity } => write!(
                f,
                "sequence {sequence} is full: the cache holds {capacity} positions (at most the \
                 model's max_positions)"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The format a cache stores in for a policy's `kv_cache` format: that format, except FP8
/// (which would need per-token scales), which falls back to bf16.
pub fn cache_format(kv_cache: Format) -> Format {
    if kv_cache.is_fp8() {
        Format::Bf16
    } else {
        kv_cache
    }
}

/// Cached elements in one of the supported storage formats.
#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Store {
    fn new(format: Format, len: usize) -> Result<Store, DecodeError> {
        Ok(match format {
            Format::Fp32 => Store::F32(vec![0.0; len]),
            Format::Bf16 => Store::Bf16(vec![half::bf16::ZERO; len]),
            Format::Fp16 => Store::F16(vec![half::f16::ZERO; len]),
            other => return Err(DecodeError::CacheFormat(other)),
        })
    }

    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            Store::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Store::Bf16(v) => {
                for (d, &s) in v[at..at + x.len()].iter_mut().zip(x) {
                    *d = half::bf16::from_f32(s);
                }
            }
            Store::F16(v) => {
                for (d, &s) in v[at..at + x.len()].iter_mut().zip(x) {
                    *d = half::f16::from_f32(s);
                }
            }
        }
    }

    /// Elements `at..at + out.len()` as f32.
    fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            Store::F32(v) => out.copy_from_slice(&v[at..at + out.len()]),
            Store::Bf16(v) => {
                for (d, s) in out.iter_mut().zip(&v[at..]) {
                    *d = s.to_f32();
                }
            }
            Store::F16(v) => {
                for (d, s) in out.iter_mut().zip(&v[at..]) {
                    *d = s.to_f32();
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F32(v) => 4 * v.len(),
            Store::Bf16(v) => 2 * v.len(),
            Store::F16(v) => 2 * v.len(),
        }
    }
}

/// The KV cache of a batch of sequences: per layer, `capacity` token slots per sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    format: Format,
    capacity: usize,
    /// Cached elements per token and layer.
    per_token: usize,
    layers: Vec<Store>,
    lens: Vec<usize>,
}

impl KvCache {
    /// Tokens cached so far for `sequence` (its next position).
    pub fn len(&self, sequence: usize) -> usize {
        self.lens[sequence]
    }

    /// Whether no sequence has a cached token.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Cached elements per token over all layers (the analyzer's KV-cache elements).
    pub fn elements_per_token(&self) -> usize {
        self.per_token * self.layers.len()
    }

    /// Bytes the cache holds, measured from its buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(Store::bytes).sum()
    }

    /// Bytes per cached token slot: [`KvCache::bytes`] over batch × capacity.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes() as f64 / (self.batch() * self.capacity).max(1) as f64
    }

    /// Forgets `sequence`'s tokens, so the slot can take a new sequence.
    pub fn reset(&mut self, sequence: usize) {
        self.lens[sequence] = 0;
    }
}

/// One layer's attention weights, by kind.
enum AttnWeights<'a> {
    Grouped {
        q: (&'a [f32], Option<&'a [f32]>),
        k: (&'a [f32], Option<&'a [f32]>),
        v: (&'a [f32], Option<&'a [f32]>),
    },
    Latent {
        /// `q_a`, its norm, `q_b`, or a single `q` projection.
        q_a: Option<(&'a [f32], Option<&'a [f32]>)>,
        q_norm: Option<Norm<'a>>,
        q: &'a [f32],
        kv_a: (&'a [f32], Option<&'a [f32]>),
        kv_norm: Norm<'a>,
        kv_b: &'a [f32],
    },
}

#[derive(Clone, Copy)]
struct Norm<'a> {
    w: &'a [f32],
    b: Option<&'a [f32]>,
}

struct Mlp<'a> {
    up: (&'a [f32], Option<&'a [f32]>),
    gate: Option<(&'a [f32], Option<&'a [f32]>)>,
    down: (&'a [f32], Option<&'a [f32]>),
    hidden: usize,
}

enum FfnWeights<'a> {
    Dense(Norm<'a>, Mlp<'a>),
    Moe {
        norm: Norm<'a>,
        router: (&'a [f32], &'a [f32]),
        gate: Option<&'a [f32]>,
        up: &'a [f32],
        down: &'a [f32],
        shared: Option<Mlp<'a>>,
    },
}

struct Layer<'a> {
    attn_norm: Norm<'a>,
    attn: AttnWeights<'a>,
    o: (&'a [f32], Option<&'a [f32]>),
    ffn: FfnWeights<'a>,
}

/// A model's weights arranged for decoding, borrowed from its parameters.
pub struct Decoder<'a> {
    model: &'a Model,
    embed: &'a [f32],
    pos_embed: Option<&'a [f32]>,
    layers: Vec<Layer<'a>>,
    final_norm: Norm<'a>,
    head: &'a [f32],
    rope: Option<RopeTables<f32>>,
    ffn_act: Option<ExprActivation>,
    moe_act: Option<ExprActivation>,
    router: Option<moe::RouterConfig>,
}

/// Parameters by name, checked for size.
struct Params<'a> {
    by_name: HashMap<&'a str, &'a [f32]>,
}

impl<'a> Params<'a> {
    fn get(&self, name: &str, len: usize) -> Result<&'a [f32], DecodeError> {
        match self.by_name.get(name) {
            Some(p) if p.len() == len => Ok(p),
            Some(p) => Err(DecodeError::Param(format!(
                "parameter `{name}` has {} values, the decoder needs {len}",
                p.len()
            ))),
            None => Err(DecodeError::Param(format!(
                "the model has no parameter `{name}`"
            ))),
        }
    }

    fn opt(&self, name: &str, len: usize, present: bool) -> Result<Option<&'a [f32]>, DecodeError> {
        present.then(|| self.get(name, len)).transpose()
    }

    fn linear(
        &self,
        path: &str,
        out: u64,
        inp: u64,
        bias: bool,
    ) -> Result<(&'a [f32], Option<&'a [f32]>), DecodeError> {
        let w = self.get(&format!("{path}.weight"), (out * inp) as usize)?;
        Ok((w, self.opt(&format!("{path}.bias"), out as usize, bias)?))
    }

    fn norm(&self, path: &str, width: u64, kind: NormKind) -> Result<Norm<'a>, DecodeError> {
        Ok(Norm {
            w: self.get(&format!("{path}.weight"), width as usize)?,
            b: self.opt(
                &format!("{path}.bias"),
                width as usize,
                kind == NormKind::LayerNorm,
            )?,
        })
    }

    fn mlp(
        &self,
        path: &str,
        d: u64,
        hidden: u64,
        gated: bool,
        bias: bool,
    ) -> Result<Mlp<'a>, DecodeError> {
        Ok(Mlp {
            up: self.linear(&format!("{path}.up"), hidden, d, bias)?,
            gate: gated
                .then(|| self.linear(&format!("{path}.gate"), hidden, d, bias))
                .transpose()?,
            down: self.linear(&format!("{path}.down"), d, hidden, bias)?,
            hidden: hidden as usize,
        })
    }
}

impl<'a> Decoder<'a> {
    /// The decoder of `model` with the parameters of its forward `graph` (in the graph's
    /// parameter order, as `init_params` and checkpoints hold them).
    pub fn new(
        model: &'a Model,
        graph: &'a Graph,
        params: &'a [Vec<f32>],
    ) -> Result<Self, DecodeError> {
        if params.len() != graph.params.len() {
            return Err(DecodeError::Param(format!(
                "{} parameter tensors given, the graph has {}",
                params.len(),
                graph.params.len()
            )));
        }
        let p = Params {
            by_name: graph
                .params
                .iter()
                .zip(params)
                .map(|((_, param), data)| (param.name.as_str(), data.as_slice()))
                .collect(),
        };
        let (d, vocab) = (model.d_model, model.vocab);
        let a = &model.attention;
        let nk = model.norm.kind;
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, &kind) in model.layers.iter().enumerate() {
            let pre = format!("layers.{i}");
            let attn = match &a.kind {
                AttentionKind::Grouped { kv_heads, head_dim } => AttnWeights::Grouped {
                    q: p.linear(&format!("{pre}.attn.q"), a.heads * head_dim, d, a.bias)?,
                    k: p.linear(&format!("{pre}.attn.k"), kv_heads * head_dim, d, a.bias)?,
                    v: p.linear(&format!("{pre}.attn.v"), kv_heads * head_dim, d, a.bias)?,
                },
                AttentionKind::Latent(m) => {
                    let qk = m.nope_dim + m.rope_dim;
                    let (q_a, q_norm, q) = match m.q_rank {
                        Some(r) => (
                            Some(p.linear(&format!("{pre}.attn.q_a"), r, d, a.bias)?),
                            Some(p.norm(&format!("{pre}.attn.q_norm"), r, nk)?),
                            p.linear(&format!("{pre}.attn.q_b"), a.heads * qk, r, false)?
                                .0,
                        ),
                        None => (
                            None,
                            None,
                            p.linear(&format!("{pre}.attn.q"), a.heads * qk, d, false)?
                                .0,
                        ),
                    };
                    AttnWeights::Latent {
                        q_a,
                        q_norm,
                        q,
                        kv_a: p.linear(
                            &format!("{pre}.attn.kv_a"),
                            m.kv_rank + m.rope_dim,
                            d,
                            a.bias,
                        )?,
                        kv_norm: p.norm(&format!("{pre}.attn.kv_norm"), m.kv_rank, nk)?,
                        kv_b: p
                            .linear(
                                &format!("{pre}.attn.kv_b"),
                                a.heads * (m.nope_dim + m.v_dim),
                                m.kv_rank,
                                false,
                            )?
                            .0,
                    }
                }
            };
            let ffn = match kind {
                LayerKind::Dense => {
                    let f = model
                        .ffn
                        .as_ref()
                        .expect("checked: dense blocks have [ffn]");
                    FfnWeights::Dense(
                        p.norm(&format!("{pre}.ffn.norm"), d, nk)?,
                        p.mlp(&format!("{pre}.ffn"), d, f.hidden, f.act.gated, f.bias)?,
                    )
                }
                LayerKind::Moe => {
                    let m = model.moe.as_ref().expect("checked: moe blocks have [moe]");
                    let (e, eh) = (m.experts, m.expert_hidden);
                    let ex = format!("{pre}.moe.experts");
                    FfnWeights::Moe {
                        norm: p.norm(&format!("{pre}.moe.norm"), d, nk)?,
                        router: (
                            p.get(&format!("{pre}.moe.router.weight"), (e * d) as usize)?,
                            p.get(&format!("{pre}.moe.router.bias"), e as usize)?,
                        ),
                        gate: p.opt(
                            &format!("{ex}.gate.weight"),
                            (e * eh * d) as usize,
                            m.act.gated,
                        )?,
                        up: p.get(&format!("{ex}.up.weight"), (e * eh * d) as usize)?,
                        down: p.get(&format!("{ex}.down.weight"), (e * d * eh) as usize)?,
                        shared: (m.shared > 0)
                            .then(|| {
                                p.mlp(
                                    &format!("{pre}.moe.shared"),
                                    d,
                                    m.shared * eh,
                                    m.act.gated,
                                    false,
                                )
                            })
                            .transpose()?,
                    }
                }
            };
            layers.push(Layer {
                attn_norm: p.norm(&format!("{pre}.attn.norm"), d, nk)?,
                attn,
                o: p.linear(&format!("{pre}.attn.o"), d, a.heads * a.v_dim(), a.bias)?,
                ffn,
            });
        }
        let embed = p.get("embed.weight", (vocab * d) as usize)?;
        let rope = a.rope.map(|r| {
            let dim = match &a.kind {
                AttentionKind::Grouped { head_dim, .. } => *head_dim,
                AttentionKind::Latent(m) => m.rope_dim,
            };
            rope_tables(
                model.max_positions as usize,
                dim as usize,
                r.theta,
                r.yarn.as_ref(),
            )
        });
        Ok(Decoder {
            model,
            embed,
            pos_embed: p.opt(
                "pos_embed.weight",
                (model.max_positions * d) as usize,
                model.positions == Positions::Learned,
            )?,
            layers,
            final_norm: p.norm("final.norm", d, nk)?,
            head: if model.tie_embeddings {
                embed
            } else {
                p.get("head.weight", (vocab * d) as usize)?
            },
            rope,
            ffn_act: model
                .ffn
                .as_ref()
                .map(|f| ExprActivation::new(&f.act.expr, f.act.gated)),
            moe_act: model
                .moe
                .as_ref()
                .map(|m| ExprActivation::new(&m.act.expr, m.act.gated)),
            router: model.moe.as_ref().map(|m| {
                router_config(&RouterSpec {
                    score: m.score,
                    select: m.select,
                    groups: m.groups,
                    groups_kept: m.groups_kept,
                    group_score: m.group_score,
                    top_k: m.top_k,
                    normalize: m.normalize_top_k,
                    scale: m.route_scale,
                })
            }),
        })
    }

    /// Cached elements per token and layer.
    fn per_token(&self) -> usize {
        let a = &self.model.attention;
        match &a.kind {
            AttentionKind::Grouped { kv_heads, head_dim } => (2 * kv_heads * head_dim) as usize,
            AttentionKind::Latent(m) => (m.kv_rank + m.rope_dim) as usize,
        }
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens each (at most the
    /// model's `max_positions`), stored in `format`.
    pub fn cache(
        &self,
        batch: usize,
        capacity: usize,
        format: Format,
    ) -> Result<KvCache, DecodeError> {
        let capacity = capacity.min(self.model.max_positions as usize);
        let per_token = self.per_token();
        let layers = (0..self.layers.len())
            .map(|_| Store::new(format, batch * capacity * per_token))
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            format,
            capacity,
            per_token,
            layers,
            lens: vec![0; batch],
        })
    }

    fn norm(&self, n: Norm, x: &[f32]) -> Vec<f32> {
        let kind = self.model.norm.kind;
        norm_fwd(kind, self.model.norm.eps, x, n.w, n.b)
    }

    fn linear(&self, (w, b): (&[f32], Option<&[f32]>), x: &[f32], out: usize) -> Vec<f32> {
        let inp = w.len() / out.max(1);
        op_fns::linear(x, w, b, out, inp)
    }

    fn mlp(&self, m: &Mlp, act: &ExprActivation, x: &[f32]) -> Vec<f32> {
        let d = self.model.d_model as usize;
        let up = self.linear(m.up, x, m.hidden);
        let a: Vec<f32> = match m.gate {
            Some(g) => {
                let gate = self.linear(g, x, m.hidden);
                gate.iter()
                    .zip(&up)
                    .map(|(&g, &u)| act.value(g, u))
                    .collect()
            }
            None => up.iter().map(|&u| act.value(0.0, u)).collect(),
        };
        self.linear(m.down, &a, d)
    }

    /// Feeds one token to each listed sequence, `(sequence, token)`, at that sequence's next
    /// position; appends their keys and values to `cache` and returns the logits of each row,
    /// `[rows.len(), vocab]`.
    pub fn step(
        &self,
        cache: &mut KvCache,
        rows: &[(usize, u32)],
    ) -> Result<Vec<f32>, DecodeError> {
        let m = self.model;
        let (d, vocab) = (m.d_model as usize, m.vocab as usize);
        let n = rows.len();
        let mut positions = Vec::with_capacity(n);
        for &(s, tok) in rows {
            if s >= cache.batch() {
                return Err(DecodeError::OutOfRange(format!(
                    "sequence {s} is outside the cache's batch of {}",
                    cache.batch()
                )));
            }
            if tok as usize >= vocab {
                return Err(DecodeError::OutOfRange(format!(
                    "token {tok} is outside the vocabulary of {vocab}"
                )));
            }
            if cache.lens[s] >= cache.capacity {
                return Err(DecodeError::Full {
                    sequence: s,
                    capacity: cache.capacity,
                });
            }
            if rows.iter().filter(|r| r.0 == s).count() > 1 {
                return Err(DecodeError::OutOfRange(format!(
                    "sequence {s} appears twice in one step"
                )));
            }
            positions.push(cache.lens[s]);
        }
        let mut x = Vec::with_capacity(n * d);
        for (&(_, tok), &pos) in rows.iter().zip(&positions) {
            let t = tok as usize;
            let e = &self.embed[t * d..(t + 1) * d];
            match self.pos_embed {
                Some(pe) => x.extend(
                    e.iter()
                        .zip(&pe[pos * d..(pos + 1) * d])
                        .map(|(a, b)| a + b),
                ),
                None => x.extend_from_slice(e),
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = self.norm(layer.attn_norm, &x);
            let o = self.attention(
                layer,
                &mut cache.layers[li],
                cache.capacity,
                cache.per_token,
                &xn,
                rows,
                &positions,
            );
            let a = self.linear(layer.o, &o, d);
            let h: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
            let f = match &layer.ffn {
                FfnWeights::Dense(norm, mlp) => {
                    let hn = self.norm(*norm, &h);
                    self.mlp(
                        mlp,
                        self.ffn_act.as_ref().expect("dense layers have [ffn]"),
                        &hn,
                    )
                }
                FfnWeights::Moe {
                    norm,
                    router,
                    gate,
                    up,
                    down,
                    shared,
                } => {
                    let hn = self.norm(*norm, &h);
                    self.moe(&hn, *router, *gate, up, down, shared.as_ref())
                }
            };
            x = h.iter().zip(&f).map(|(h, f)| h + f).collect();
        }
        for (&(s, _), _) in rows.iter().zip(&positions) {
            cache.lens[s] += 1;
        }
        let xn = self.norm(self.final_norm, &x);
        Ok(op_fns::linear(&xn, self.head, None, vocab, d))
    }

    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        x: &[f32],
        (rw, rb): (&[f32], &[f32]),
        gate: Option<&[f32]>,
        up: &[f32],
        down: &[f32],
        shared: Option<&Mlp>,
    ) -> Vec<f32> {
        let m = self.model.moe.as_ref().expect("moe layers have [moe]");
        let d = self.model.d_model as usize;
        let n = x.len() / d;
        let (e, k, h) = (
            m.experts as usize,
            m.top_k as usize,
            m.expert_hidden as usize,
        );
        let cfg = self.router.as_ref().expect("moe layers have a router");
        let routed = moe::router_fwd(x, n, d, rw, e, rb, cfg);
        let act = self
            .moe_act
            .as_ref()
            .expect("moe layers have an activation");
        let ffn = ExpertFfn {
            x,
            n,
            d,
            weights: &routed.weights,
            experts: &routed.experts,
            k,
            w_gate: gate,
            w_up: up,
            w_down: down,
            e,
            h,
            act,
        };
        let mut y = moe::experts_fwd(&ffn).0;
        if let Some(s) = shared {
            let sy = self.mlp(s, act, x);
            for (a, b) in y.iter_mut().zip(&sy) {
                *a += b;
            }
        }
        y
    }

    /// Attention of the new rows over their sequences' caches (after appending the new
    /// tokens' entries); returns `[n, heads · v_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        store: &mut Store,
        capacity: usize,
        per_token: usize,
        xn: &[f32],
        rows: &[(usize, u32)],
        positions: &[usize],
    ) -> Vec<f32> {
        let a = &self.model.attention;
        let h = a.heads as usize;
        let scale = a.softmax_scale() as f32;
        let n = rows.len();
        let slot = |s: usize, pos: usize| (s * capacity + pos) * per_token;
        match (&layer.attn, &a.kind) {
            (AttnWeights::Grouped { q, k, v }, AttentionKind::Grouped { kv_heads, head_dim }) => {
                let (hk, hd) = (*kv_heads as usize, *head_dim as usize);
                let mut qs = self.linear(*q, xn, h * hd);
                let mut ks = self.linear(*k, xn, hk * hd);
                let vs = self.linear(*v, xn, hk * hd);
                if let Some(tables) = &self.rope {
                    for (r, &pos) in positions.iter().enumerate() {
                        rope_row(
                            &mut qs[r * h * hd..(r + 1) * h * hd],
                            hd,
                            tables,
                            pos,
                            RopePairs::Halves,
                        );
                        rope_row(
                            &mut ks[r * hk * hd..(r + 1) * hk * hd],
                            hd,
                            tables,
                            pos,
                            RopePairs::Halves,
                        );
                    }
                }
                for (r, (&(s, _), &pos)) in rows.iter().zip(positions).enumerate() {
                    let at = slot(s, pos);
                    store.write(at, &ks[r * hk * hd..(r + 1) * hk * hd]);
                    store.write(at + hk * hd, &vs[r * hk * hd..(r + 1) * hk * hd]);
                }
                let mut out = vec![0f32; n * h * hd];
                let mut kv = vec![0f32; per_token];
                for (r, (&(s, _), &pos)) in rows.iter().zip(positions).enumerate() {
                    let len = pos + 1;
                    let mut keys = vec![0f32; len * per_token];
                    for t in 0..len {
                        store.read(slot(s, t), &mut kv);
                        keys[t * per_token..(t + 1) * per_token].copy_from_slice(&kv);
                    }
                    for j in 0..h {
                        let kvh = j / (h / hk);
                        let qj = &qs[(r * h + j) * hd..(r * h + j + 1) * hd];
                        let scores: Vec<f32> = (0..len)
                            .map(|t| {
                                let kt = &keys[t * per_token + kvh * hd..][..hd];
                                scale * qj.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>()
                            })
                            .collect();
                        let p = softmax(&scores);
                        let o = &mut out[(r * h + j) * hd..(r * h + j + 1) * hd];
                        for (t, &pt) in p.iter().enumerate() {
                            let vt = &keys[t * per_token + hk * hd + kvh * hd..][..hd];
                            for (o, &v) in o.iter_mut().zip(vt) {
                                *o += pt * v;
                            }
                        }
                    }
                }
                out
            }
            (
                AttnWeights::Latent {
                    q_a,
                    q_norm,
                    q,
                    kv_a,
                    kv_norm,
                    kv_b,
                },
                AttentionKind::Latent(mla),
            ) => {
                let (r_dim, nope, rope, vd) = (
                    mla.kv_rank as usize,
                    mla.nope_dim as usize,
                    mla.rope_dim as usize,
                    mla.v_dim as usize,
                );
                let qk = nope + rope;
                let qs = match (q_a, q_norm) {
                    (Some(qa), Some(qn)) => {
                        let rank = mla.q_rank.expect("q_a implies q_rank") as usize;
                        let cq = self.linear(*qa, xn, rank);
                        let cq = self.norm(*qn, &cq);
                        op_fns::linear(&cq, q, None, h * qk, rank)
                    }
                    _ => op_fns::linear(xn, q, None, h * qk, self.model.d_model as usize),
                };
                let kv = self.linear(*kv_a, xn, r_dim + rope);
                let tables = self.rope.as_ref().expect("MLA uses RoPE");
                for (r, (&(s, _), &pos)) in rows.iter().zip(positions).enumerate() {
                    let row = &kv[r * (r_dim + rope)..(r + 1) * (r_dim + rope)];
                    let mut entry = self.norm(*kv_norm, &row[..r_dim]);
                    let mut k_rope = row[r_dim..].to_vec();
                    rope_row(&mut k_rope, rope, tables, pos, RopePairs::Interleaved);
                    entry.extend_from_slice(&k_rope);
                    store.write(slot(s, pos), &entry);
                }
                let stride = nope + vd;
                let mut out = vec![0f32; n * h * vd];
                for (r, (&(s, _), &pos)) in rows.iter().zip(positions).enumerate() {
                    let len = pos + 1;
                    let mut cached = vec![0f32; len * per_token];
                    for t in 0..len {
                        store.read(slot(s, t), &mut cached[t * per_token..(t + 1) * per_token]);
                    }
                    for j in 0..h {
                        let qj = &qs[(r * h + j) * qk..(r * h + j + 1) * qk];
                        let mut q_rope = qj[nope..].to_vec();
                        rope_row(&mut q_rope, rope, tables, pos, RopePairs::Interleaved);
                        // q̃ = W_ukᵀ · q_nope: the head's key rows of kv_b, weighted by q_nope.
                        let mut q_lat = vec![0f32; r_dim];
                        for (i, &qv) in qj[..nope].iter().enumerate() {
                            let w = &kv_b[(j * stride + i) * r_dim..][..r_dim];
                            for (l, &wv) in q_lat.iter_mut().zip(w) {
                                *l += qv * wv;
                            }
                        }
                        let scores: Vec<f32> = (0..len)
                            .map(|t| {
                                let c = &cached[t * per_token..][..r_dim];
                                let kr = &cached[t * per_token + r_dim..][..rope];
                                let nope_part: f32 = q_lat.iter().zip(c).map(|(a, b)| a * b).sum();
                                let rope_part: f32 =
                                    q_rope.iter().zip(kr).map(|(a, b)| a * b).sum();
                                scale * (nope_part + rope_part)
                            })
                            .collect();
                        let p = softmax(&scores);
                        // õ = Σ p_t c_t, then o = W_uv · õ.
                        let mut o_lat = vec![0f32; r_dim];
                        for (t, &pt) in p.iter().enumerate() {
                            for (o, &c) in o_lat.iter_mut().zip(&cached[t * per_token..][..r_dim]) {
                                *o += pt * c;
                            }
                        }
                        let o = &mut out[(r * h + j) * vd..(r * h + j + 1) * vd];
                        for (vi, ov) in o.iter_mut().enumerate() {
                            let w = &kv_b[(j * stride + nope + vi) * r_dim..][..r_dim];
                            *ov = w.iter().zip(&o_lat).map(|(a, b)| a * b).sum();
                        }
                    }
                }
                out
            }
            _ => unreachable!("the weights were built for the model's attention kind"),
        }
    }
}

/// Softmax of one row of scores, in f32 with the maximum subtracted.
fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}
