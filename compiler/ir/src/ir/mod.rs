//! The graph IR: what a model computes, as a list of typed ops over tensors with concrete
//! shapes.
//!
//! A [`Graph`] holds three arenas: parameters, values and nodes, addressed by typed
//! [`Handle`]s. Every value is defined exactly once — as a graph input, as a parameter, or as
//! an output of a node — and nodes are stored in execution order: **a node's operands are
//! defined before it** (inputs and parameters first, then earlier nodes). [`verify()`] checks
//! this and every op's shape rule; every pass must leave a graph that verifies.
//!
//! Shapes are concrete: a graph is lowered for one batch size and sequence length (the
//! spec's `train.batch` and `train.seq_len`), so emitted code can treat every dimension as a
//! constant. Lowering again for another shape (sampling, say) is cheap.
//!
//! The op set is small and closed ([`Op`]), with explicit composite ops where performance
//! needs them (attention core, router, grouped expert FFN, cross-entropy). Elementwise work
//! is one op, [`Op::Map`], over an expression of the spec's activation language, so fusing an
//! elementwise chain is rewriting one `Map` into another, never editing emitted text.

mod infer;
mod print;
mod verify;

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;

use crate::attrs::{Format, GroupScore, NormKind, ScoreFunc, Selection, Yarn};
use crate::expr::Expr;

pub use infer::infer;
pub use verify::{verify, VerifyError};

/// A typed index into an [`Arena`].
pub struct Handle<T> {
    index: u32,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    fn new(index: usize) -> Self {
        Handle {
            index: u32::try_from(index).expect("an arena holds fewer than 2^32 items"),
            _marker: PhantomData,
        }
    }

    /// The position in the arena.
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// The handle of position `index`, for code generated from a graph that refers to its
    /// values by position; it is meaningful only for that graph's arena.
    pub fn from_index(index: usize) -> Self {
        Handle::new(index)
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}
impl<T> Eq for Handle<T> {}
impl<T> PartialOrd for Handle<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Handle<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.index.cmp(&other.index)
    }
}
impl<T> std::hash::Hash for Handle<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.index.hash(state);
    }
}
impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.index)
    }
}

/// An append-only vector addressed by [`Handle`]s.
#[derive(Clone, Debug)]
pub struct Arena<T> {
    items: Vec<T>,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena { items: Vec::new() }
    }
}

impl<T> Arena<T> {
    pub fn append(&mut self, item: T) -> Handle<T> {
        self.items.push(item);
        Handle::new(self.items.len() - 1)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Handle<T>, &T)> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, t)| (Handle::new(i), t))
    }

    /// The item behind `h`, if `h` belongs to this arena.
    pub fn get(&self, h: Handle<T>) -> Option<&T> {
        self.items.get(h.index())
    }
}

impl<T> std::ops::Index<Handle<T>> for Arena<T> {
    type Output = T;
    fn index(&self, h: Handle<T>) -> &T {
        &self.items[h.index()]
    }
}

impl<T> std::ops::IndexMut<Handle<T>> for Arena<T> {
    fn index_mut(&mut self, h: Handle<T>) -> &mut T {
        &mut self.items[h.index()]
    }
}

pub type ValueId = Handle<Value>;
pub type NodeId = Handle<Node>;
pub type ParamId = Handle<Param>;

/// Element type of a value. Compute is f32 (f64 in gradient checks); the precision policy's
/// formats are attributes of the nodes that quantize, not of the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    /// Token ids and expert indices.
    U32,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::U32 => "u32",
        })
    }
}

/// A tensor's type: element type and concrete shape (empty for a scalar).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl TensorType {
    pub fn f32(shape: impl Into<Vec<u64>>) -> Self {
        TensorType {
            dtype: DType::F32,
            shape: shape.into(),
        }
    }

    pub fn u32(shape: impl Into<Vec<u64>>) -> Self {
        TensorType {
            dtype: DType::U32,
            shape: shape.into(),
        }
    }

    /// Number of elements.
    pub fn elements(&self) -> u128 {
        self.shape.iter().map(|&d| d as u128).product()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A learned (or, for router biases, rule-updated) tensor of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// HF-style dotted name: the op path plus `.weight` or `.bias` (`layers.3.attn.kv_a.weight`).
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
    /// How the parameter changes during training.
    pub update: Update,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
    Ones,
}

/// How a parameter changes during training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// AdamW with weight decay (matrices).
    Decayed,
    /// AdamW without weight decay (norm weights, biases).
    NoDecay,
    /// Not trained by gradients: the router's aux-loss-free balancing bias, moved by
    /// `bias_i += γ·sign(mean_load − load_i)` after each step.
    BalanceBias,
}

/// What the runtime feeds a graph input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Token ids `t[b, i + offset]` of each sequence window: offset 0 is the model's input,
    /// 1 its targets, and MTP module k reads offset k + 1 and predicts offset k + 2. The
    /// runtime cuts windows of `seq_len + max offset` tokens.
    Tokens { offset: u32 },
    /// Positions `0..seq_len` in every row (learned position embeddings).
    Positions,
    /// Per-token loss weights `[B, T]` (f32) of a weighted cross-entropy: the coefficients a
    /// policy-gradient objective puts on each target token's log-probability (zero on prompt
    /// and padding positions).
    TokenWeights,
    /// The KV cache of block `layer` for each row of a decode graph, `[B, C, E]` (f32): the
    /// entries of the tokens before each row's position (see [`Op::CachedAttention`]).
    KvCache { layer: u32 },
}

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Def {
    Input(InputKind),
    Param(ParamId),
    /// Output `output` of `node`.
    Node {
        node: NodeId,
        output: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    pub def: Def,
}

/// Which dimensions of a head RoPE pairs up for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairs {
    /// Dimension `i` with `i + D/2` (`rotate_half`; Llama, and DeepSeek as HF transformers
    /// runs it after de-interleaving).
    Halves,
    /// Dimension `2i` with `2i + 1` (DeepSeek's reference code, the layout of its released
    /// checkpoints' RoPE weights).
    Interleaved,
}

/// What one cached token of one layer holds, for [`Op::CachedAttention`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// `E = 2·Hk·D`: the roped keys of every KV head, then their values; `Dq = Dv = D`, and
    /// query head `h` reads KV head `h / (H / Hk)`.
    Grouped { kv_heads: u64, head_dim: u64 },
    /// Multi-head latent attention: `E = R + Dr`, the normalized latent `c_kv` and the roped
    /// shared key `k_rope`; `q` is `[q_nope (Dn) | q_rope (Dr)]` per head, `q_rope` roped. A
    /// fifth operand `kv_b[H·(Dn + Dv), R]` (each head's `Dn` key rows, then its `Dv` value
    /// rows) is absorbed: scores are `(W_ukᵀ·q_nope)·c_kv + q_rope·k_rope`, and the output
    /// `W_uv·(Σₜ pₜ·c_kv(t))` (DeepSeek-V2 §2.1.2).
    Latent {
        rank: u64,
        nope: u64,
        rope: u64,
        v: u64,
    },
}

/// The closed op set. Shape rules are in [`infer`]; each op's operand order is documented
/// on its variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `(table[V, d], ids[..]: u32) -> [.., d]`: row lookup.
    Embedding,
    /// `(x[.., in], w[out, in], b[out]?) -> [.., out]`: `x · wᵀ + b`.
    Linear { bias: bool },
    /// `(x[.., n], w[n]) -> [.., n]`: `x / sqrt(mean(x²) + eps) · w`, statistics in f32.
    RmsNorm { eps: f64 },
    /// `(x[.., n], w[n], b[n]) -> [.., n]`.
    LayerNorm { eps: f64 },
    /// `(x₀, x₁, …) -> y`, all of one shape: `y = expr(x₀, x₁, …)` elementwise, where
    /// `vars[i]` names operand `i` in `expr`. Residual adds, activations and loss sums.
    Map { expr: Expr, vars: Vec<String> },
    /// `(x[.., n]) -> ([.., s₀], [.., s₁], …)`: split the last axis, `Σ sᵢ = n`.
    Split { sizes: Vec<u64> },
    /// `(x₀[.., n₀], x₁[.., n₁], …) -> [.., Σ nᵢ]`: concatenate along the last axis.
    Concat,
    /// `(x) -> x` with another shape of the same size (row-major, no data movement).
    Reshape { shape: Vec<u64> },
    /// `(x[.., 1, ..]) -> [.., n, ..]`: repeat axis `axis` (of size 1) `n` times.
    Expand { axis: u32, n: u64 },
    /// `(x[B, T, H, D]) -> [B, T, H, D]`: rotate by position `t` with frequencies
    /// `theta^(-2i/D)` (YaRN-corrected when `yarn` is set).
    Rope {
        theta: f64,
        yarn: Option<Yarn>,
        pairs: RopePairs,
    },
    /// `(q[B, T, H, Dk], k[B, T, Hk, Dk], v[B, T, Hk, Dv]) -> (o[B, T, H, Dv], lse[B, H, T])`:
    /// causal `softmax(scale · q·kᵀ)·v`, query head `h` reading KV head `h / (H / Hk)`; `lse`
    /// is each query's log-sum-exp of scaled scores, kept for the backward pass.
    Attention { scale: f64 },
    /// `(x[B, T, H, D], positions[B, T]: u32) -> [B, T, H, D]`: [`Op::Rope`], each row
    /// `(b, t)` rotated by the angle of its own position `positions[b, t]` (decoding, where a
    /// row's position is the number of tokens its sequence has cached).
    RopeAt {
        theta: f64,
        yarn: Option<Yarn>,
        pairs: RopePairs,
    },
    /// Decoding attention of one new token per row over its sequence's KV cache:
    /// `(q[B, 1, H, Dq], entry[B, 1, E], cache[B, C, E], positions[B, 1]: u32, kv_b?) ->
    /// o[B, 1, H, Dv]`. Row `b` attends to `cache[b, 0..p]` and then to its own `entry` (at
    /// position `p = positions[b, 0] < C`), `softmax(scale · scores)`; `entry` is what the
    /// caller appends to the cache at `p`. [`CacheLayout`] says what an entry holds.
    CachedAttention { scale: f64, layout: CacheLayout },
    /// `(x[N, d], w[E, d], bias[E]) -> (weights[N, k], experts[N, k]: u32, scores[N, E])`:
    /// scores `score(x·wᵀ)` in f32; selection on `scores + bias`; weights are the unbiased
    /// scores of the chosen experts, normalized if `normalize`, times `scale`.
    Router(RouterSpec),
    /// `(x[N, d], weights[N, k], experts[N, k]: u32, w_gate[E, h, d]?, w_up[E, h, d],
    /// w_down[E, d, h]) -> [N, d]`: `Σⱼ weightsⱼ · down_e(act(gate_e(x), up_e(x)))` over each
    /// token's chosen experts `e`, computed by sorting tokens by expert (grouped GEMMs).
    Experts { act: Expr, gated: bool },
    /// `(logits[N, V], targets[N]: u32) -> []`: mean cross-entropy; with a third operand
    /// `weights[N]: f32`, the weighted sum `Σᵢ wᵢ · CEᵢ` instead (a policy-gradient loss).
    CrossEntropy,
    /// `(scores[B, T, E], experts[B, T, k]: u32) -> []`: the sequence-wise balance loss
    /// `alpha · Σᵢ fᵢ·Pᵢ` averaged over sequences, with `fᵢ = E/(k·T) · count(i)` and `Pᵢ`
    /// the mean normalized score of expert `i` in the sequence.
    BalanceLoss { alpha: f64, top_k: u64 },

    // Ops the backward pass adds (`crate::autodiff`).
    /// `() -> [shape]` filled with `value` (the loss seed, absent gradients).
    Fill { value: f64, shape: Vec<u64> },
    /// `(x[.., n, ..]) -> [.., 1, ..]`: sum over axis `axis`, keeping it.
    SumAxis { axis: u32 },
    /// `(ids[..]: u32, dy[.., d]) -> [vocab, d]`: scatter-add of rows.
    EmbeddingGrad { vocab: u64 },
    /// `(x[.., in], w[out, in], dy[.., out]) -> (dx[.., in], dw[out, in], db[out]?)`.
    LinearGrad { bias: bool },
    /// `(x[.., n], w[n], dy[.., n]) -> (dx, dw)`.
    RmsNormGrad { eps: f64 },
    /// `(x[.., n], w[n], dy[.., n]) -> (dx, dw, db)`.
    LayerNormGrad { eps: f64 },
    /// `(x₀, …, dy) -> (d x_w for w in wrt)`: `dy · ∂expr/∂x_w` elementwise.
    MapGrad {
        expr: Expr,
        vars: Vec<String>,
        wrt: Vec<u32>,
    },
    /// `(dy[B, T, H, D]) -> dx`: the inverse rotation of [`Op::Rope`].
    RopeGrad {
        theta: f64,
        yarn: Option<Yarn>,
        pairs: RopePairs,
    },
    /// `(q, k, v, o, lse, do) -> (dq, dk, dv)`.
    AttentionGrad { scale: f64 },
    /// `(x, w, bias, weights, experts, scores, d_weights[N, k], d_scores[N, E]) -> (dx, dw)`;
    /// the selection is not differentiated.
    RouterGrad(RouterSpec),
    /// `(x, weights, experts, w_gate?, w_up, w_down, dy) -> (dx, d_weights, dw_gate?, dw_up,
    /// dw_down)`.
    ExpertsGrad { act: Expr, gated: bool },
    /// `(logits[N, V], targets[N], dloss[], weights[N]?) -> dlogits[N, V]`.
    CrossEntropyGrad,
    /// `(scores[B, T, E], experts[B, T, k], dloss[]) -> d_scores[B, T, E]`.
    BalanceLossGrad { alpha: f64, top_k: u64 },

    // Fused ops: what `crate::fuse` replaces a chain of the ops above with. Each computes
    // exactly what its chain did, in one pass over the data.
    /// `(x, r, w, b?) -> (s, y)`: the residual add `s = x + r` and `y = norm(s)`; `b` exactly
    /// for LayerNorm. Replaces `map[a + b]` followed by a norm of its result.
    AddNorm { norm: NormKind, eps: f64 },
    /// `(s, w, dy, ds) -> (ds + ∂norm, dw, db?)`: a norm's backward with the residual
    /// stream's gradient `ds` added to the input gradient (`db` exactly for LayerNorm).
    /// Replaces a norm's gradient followed by `map[g0 + g1]` of its input gradient.
    AddNormGrad { norm: NormKind, eps: f64 },
    /// `(x[.., in], w[out, in], b[out]?) -> (pre[.., out], y[.., out])`: a linear layer and
    /// its activation, `pre = x·wᵀ + b` and `y = expr(pre)` with `var` naming `pre` (kept
    /// for the backward pass). Replaces `linear` followed by a one-operand `map`.
    LinearMap { bias: bool, expr: Expr, var: String },
}

/// The routing rule of a [`Op::Router`] (and its gradient).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterSpec {
    pub score: ScoreFunc,
    pub select: Selection,
    pub groups: u64,
    pub groups_kept: u64,
    pub group_score: GroupScore,
    pub top_k: u64,
    pub normalize: bool,
    pub scale: f64,
}

impl Op {
    /// The op's name in the textual form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding => "embedding",
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Map { .. } => "map",
            Op::Split { .. } => "split",
            Op::Concat => "concat",
            Op::Reshape { .. } => "reshape",
            Op::Expand { .. } => "expand",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::RopeAt { .. } => "rope_at",
            Op::CachedAttention { .. } => "cached_attention",
            Op::Router(_) => "router",
            Op::Experts { .. } => "experts",
            Op::CrossEntropy => "cross_entropy",
            Op::BalanceLoss { .. } => "balance_loss",
            Op::Fill { .. } => "fill",
            Op::SumAxis { .. } => "sum_axis",
            Op::EmbeddingGrad { .. } => "embedding_grad",
            Op::LinearGrad { .. } => "linear_grad",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::LayerNormGrad { .. } => "layer_norm_grad",
            Op::MapGrad { .. } => "map_grad",
            Op::RopeGrad { .. } => "rope_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::RouterGrad(_) => "router_grad",
            Op::ExpertsGrad { .. } => "experts_grad",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::BalanceLossGrad { .. } => "balance_loss_grad",
            Op::AddNorm {
                norm: NormKind::RmsNorm,
                ..
            } => "add_rms_norm",
            Op::AddNorm {
                norm: NormKind::LayerNorm,
                ..
            } => "add_layer_norm",
            Op::AddNormGrad {
                norm: NormKind::RmsNorm,
                ..
            } => "add_rms_norm_grad",
            Op::AddNormGrad {
                norm: NormKind::LayerNorm,
                ..
            } => "add_layer_norm_grad",
            Op::LinearMap { .. } => "linear_map",
        }
    }
}

/// One op application.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    /// Operands; each is defined before this node.
    pub inputs: Vec<ValueId>,
    /// Results; each value's `def` points back at this node.
    pub outputs: Vec<ValueId>,
    /// The named op of the model this node implements (`layers.3.attn.kv_a`), or the name of
    /// the structural step it belongs to (`layers.3.attn.q.heads`).
    pub path: String,
    /// The format the precision policy gives this op (GEMM operands for `linear` and
    /// `experts`; compute format elsewhere).
    pub format: Format,
}

/// A model's computation.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// What the graph computes for, e.g. `tiny (batch 8 × seq_len 128)`.
    pub name: String,
    pub params: Arena<Param>,
    pub values: Arena<Value>,
    /// In execution order: a node's operands are defined by earlier nodes, inputs or params.
    pub nodes: Arena<Node>,
    /// Named results (`loss`, `logits`, …).
    pub outputs: Vec<(String, ValueId)>,
    /// The operand format of the gradient GEMMs of `linear` and `experts` nodes, by node
    /// path: the policy's `linear_grad` (or the forward format, for kept ops). Autodiff gives
    /// it to their `linear_grad` and `experts_grad` nodes; a path not listed keeps the
    /// forward node's format.
    pub grad_formats: std::collections::HashMap<String, Format>,
}

/// Why a node could not be added: its operands do not fit the op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError {
    pub path: String,
    pub op: &'static str,
    pub message: String,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at `{}`: {}", self.op, self.path, self.message)
    }
}

impl std::error::Error for ShapeError {}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// Adds a graph input.
    pub fn input(&mut self, kind: InputKind, ty: TensorType) -> ValueId {
        self.values.append(Value {
            ty,
            def: Def::Input(kind),
        })
    }

    /// Adds a parameter and the value that reads it.
    pub fn param(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        init: Init,
        update: Update,
    ) -> ValueId {
        let p = self.params.append(Param {
            name: name.into(),
            ty: ty.clone(),
            init,
            update,
        });
        self.values.append(Value {
            ty,
            def: Def::Param(p),
        })
    }

    /// Adds a node, inferring its result types; returns its outputs.
    pub fn node(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        path: impl Into<String>,
        format: Format,
    ) -> Result<Vec<ValueId>, ShapeError> {
        let path = path.into();
        let types: Vec<&TensorType> = inputs.iter().map(|&v| &self.values[v].ty).collect();
        let out_types = infer(&op, &types).map_err(|message| ShapeError {
            path: path.clone(),
            op: op.name(),
            message,
        })?;
        let id = NodeId::new(self.nodes.len());
        let outputs: Vec<ValueId> = out_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                self.values.append(Value {
                    ty,
                    def: Def::Node {
                        node: id,
                        output: i as u32,
                    },
                })
            })
            .collect();
        self.nodes.append(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            path,
            format,
        });
        Ok(outputs)
    }

    /// Adds a single-output node and returns its output.
    pub fn node1(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        path: impl Into<String>,
        format: Format,
    ) -> Result<ValueId, ShapeError> {
        let outs = self.node(op, inputs, path, format)?;
        Ok(outs[0])
    }

    /// Elements of every trainable parameter (balancing biases excluded).
    pub fn trainable_elements(&self) -> u128 {
        self.params
            .iter()
            .filter(|(_, p)| p.update != Update::BalanceBias)
            .map(|(_, p)| p.ty.elements())
            .sum()
    }

    /// For each `experts_grad` node, the `experts` node it differentiates (the one with the
    /// same operands), by node index: a backend keeps that node's routed activations for the
    /// backward pass instead of recomputing them.
    pub fn experts_forward(&self) -> std::collections::HashMap<usize, usize> {
        let mut pairs = std::collections::HashMap::new();
        for (id, node) in self.nodes.iter() {
            if let Op::ExpertsGrad { .. } = node.op {
                let operands = &node.inputs[..node.inputs.len() - 1];
                let fwd = self
                    .nodes
                    .iter()
                    .find(|(_, n)| matches!(n.op, Op::Experts { .. }) && n.inputs == operands);
                if let Some((f, _)) = fwd {
                    pairs.insert(id.index(), f.index());
                }
            }
        }
        pairs
    }

    /// The cache slots per row of a decode graph (its `KvCache` inputs' second axis); 0 for
    /// a graph without a KV cache.
    pub fn cache_capacity(&self) -> u64 {
        self.values
            .iter()
            .find(|(_, v)| matches!(v.def, Def::Input(InputKind::KvCache { .. })))
            .map_or(0, |(_, v)| v.ty.shape[1])
    }

    /// The value that reads parameter `p` (`None` if the graph never reads it).
    pub fn param_value(&self, p: ParamId) -> Option<ValueId> {
        self.values
            .iter()
            .find(|(_, v)| matches!(v.def, Def::Param(q) if q == p))
            .map(|(id, _)| id)
    }

    /// The value of a named output.
    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }
}
