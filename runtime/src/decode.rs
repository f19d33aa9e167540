//! Autoregressive decoding with a KV cache: one new token per sequence per step, attention
//! reading the cached keys and values of the earlier tokens instead of recomputing them.
//!
//! The decoder runs a decode Program (the compiler's `compile_decode`: the model lowered for
//! one token per row, with each block's cache as an input and its new entry as an output) on
//! the interpreter, from the forward graph's parameters (by name); a test checks its logits
//! against the interpreter's uncached forward pass. The Program decides what is cached; this
//! module stores it.
//!
//! For multi-head latent attention the cache holds only what DeepSeek-V2/V3 need per token and
//! layer: the normalized latent `c_kv` (`kv_rank` elements) and the roped shared key
//! `k_rope` (`rope_dim`), 576 elements for V3. The Program's `cached_attention` absorbs the
//! key and value up-projections instead of applying them to every cached token (DeepSeek-V2
//! §2.1.2):
//! - per head, the query's no-RoPE part is mapped into the latent space once,
//!   `q̃ = W_ukᵀ · q_nope`, so that `q_nope · k_nope(t) = q̃ · c_kv(t)`;
//! - the attention output is formed in the latent space, `õ = Σ_t p_t · c_kv(t)`, and mapped
//!   out once, `o = W_uv · õ`.
//!
//! Grouped-query and multi-head attention cache each token's roped keys and values.
//!
//! The cache stores in the precision policy's `kv_cache` format (f32, bf16 or fp16); its
//! bytes per token are then the analyzer's KV-cache figure. The Program reads each block's
//! cache as one f32 input in its own layout (sequence `s` in row `s`); the cache keeps that
//! input from step to step, so a step passes it as it is and writes only the new entries
//! (O(1) per token, not O(capacity)). For f32 the input is the storage; a 16-bit cache keeps
//! it beside its storage, holding the rounded values, so attention reads what is stored.

use std::collections::HashMap;

use kiln_ir::attrs::Format;
use kiln_ir::ir::{Def, Graph, InputKind, ValueId};
use kiln_ir::program::Program;

use crate::exec::{Executor, Feed};

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

/// A 16-bit cache's storage.
#[derive(Clone, Debug)]
enum Half {
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Half {
    /// Stores `x` at `at` and overwrites `x` with the stored values, widened back to f32.
    fn write(&mut self, at: usize, x: &mut [f32]) {
        match self {
            Half::Bf16(v) => {
                for (d, s) in v[at..at + x.len()].iter_mut().zip(x) {
                    *d = half::bf16::from_f32(*s);
                    *s = d.to_f32();
                }
            }
            Half::F16(v) => {
                for (d, s) in v[at..at + x.len()].iter_mut().zip(x) {
                    *d = half::f16::from_f32(*s);
                    *s = d.to_f32();
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Half::Bf16(v) => 2 * v.len(),
            Half::F16(v) => 2 * v.len(),
        }
    }
}

/// One block's cache.
#[derive(Clone, Debug)]
struct Layer {
    /// The Program's cache input of this block, `[rows, slots, entry]` in f32 with sequence
    /// `s` in row `s`: the stored values, so a step passes it to the Program as it is and
    /// writes only the new entries. For an f32 cache this is the storage itself; for a 16-bit
    /// one it holds the stored (rounded) values widened, so attention reads exactly what the
    /// cache stores.
    input: Vec<f32>,
    /// A 16-bit cache's storage, `[batch, capacity, entry]`; `None` for f32.
    half: Option<Half>,
    /// Cached elements per token.
    entry: usize,
}

/// The KV cache of a batch of sequences: per layer, `capacity` token slots per sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    format: Format,
    capacity: usize,
    /// Cached elements per token and layer.
    per_token: usize,
    /// The Program's rows and cache slots per row (its inputs' shape).
    rows: usize,
    slots: usize,
    layers: Vec<Layer>,
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

    /// Bytes the cache stores: a 16-bit cache's buffers, measured; for an f32 cache, 4 bytes
    /// per element of its sequences' slots (batch × capacity) in the Program's input, which
    /// is its storage (the Program's padding rows and slots beyond `capacity` are not counted).
    /// The f32 copy a 16-bit cache keeps for the interpreter is not counted either.
    pub fn bytes(&self) -> usize {
        let slots = self.batch() * self.capacity;
        self.layers
            .iter()
            .map(|l| match &l.half {
                Some(h) => h.bytes(),
                None => 4 * slots * l.entry,
            })
            .sum()
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

/// Decoding on a compiled decode Program (`kiln_compiler::program::compile_decode`): each
/// step runs the Program on the same executor as training, with the new tokens, their
/// positions and each block's cache as inputs, and appends the Program's `cache.<i>` outputs
/// to the cache.
pub struct Decoder<'a> {
    program: &'a Program,
    exec: Executor<'a>,
    /// The parameters in the Program's order: the caller's, borrowed when they are a prefix
    /// of them in that order (the forward graph's, MTP modules last), else copied.
    params: std::borrow::Cow<'a, [Vec<f32>]>,
    /// Rows and cache slots per row the Program was lowered for.
    rows: usize,
    capacity: usize,
    /// Cached elements per token of each block.
    per_token: Vec<usize>,
    vocab: usize,
    logits: ValueId,
    entries: Vec<ValueId>,
}

impl<'a> Decoder<'a> {
    /// The decoder of a decode `program` with the parameters `params` of `graph` (in that
    /// graph's parameter order, as `init_params` and checkpoints hold them), found by name.
    pub fn new(
        program: &'a Program,
        graph: &Graph,
        params: &'a [Vec<f32>],
    ) -> Result<Self, DecodeError> {
        if params.len() != graph.params.len() {
            return Err(DecodeError::Param(format!(
                "{} parameter tensors given, the graph has {}",
                params.len(),
                graph.params.len()
            )));
        }
        let g = program.graph();
        let logits = g
            .output("logits")
            .ok_or_else(|| DecodeError::Param("the Program has no `logits` output".into()))?;
        let mut caches: Vec<(u32, ValueId)> = g
            .values
            .iter()
            .filter_map(|(v, value)| match value.def {
                Def::Input(InputKind::KvCache { layer }) => Some((layer, v)),
                _ => None,
            })
            .collect();
        caches.sort_unstable();
        if caches.is_empty() {
            return Err(DecodeError::Param(
                "the Program is not a decode Program: it reads no KV cache".into(),
            ));
        }
        let mut entries = Vec::with_capacity(caches.len());
        let mut per_token = Vec::with_capacity(caches.len());
        for (i, &(layer, cache)) in caches.iter().enumerate() {
            if layer as usize != i {
                return Err(DecodeError::Param(format!(
                    "block {i} has no KV cache input"
                )));
            }
            let entry = g.output(&format!("cache.{layer}")).ok_or_else(|| {
                DecodeError::Param(format!("the Program has no `cache.{layer}` output"))
            })?;
            entries.push(entry);
            per_token.push(g.values[cache].ty.shape[2] as usize);
        }
        let shape = &g.values[caches[0].1].ty.shape;
        let (rows, capacity) = (shape[0] as usize, shape[1] as usize);
        let names: Vec<&str> = graph.params.iter().map(|(_, p)| p.name.as_str()).collect();
        let want: Vec<&str> = g.params.iter().map(|(_, p)| p.name.as_str()).collect();
        let params = if names.starts_with(&want) {
            std::borrow::Cow::Borrowed(&params[..want.len()])
        } else {
            let by_name: HashMap<&str, &Vec<f32>> = names.iter().copied().zip(params).collect();
            let ordered = want
                .iter()
                .map(|n| {
                    by_name.get(n).map(|p| (*p).clone()).ok_or_else(|| {
                        DecodeError::Param(format!("the model has no parameter `{n}`"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            std::borrow::Cow::Owned(ordered)
        };
        for ((_, p), data) in g.params.iter().zip(params.iter()) {
            let n = p.ty.elements() as usize;
            if data.len() != n {
                return Err(DecodeError::Param(format!(
                    "parameter `{}` has {} values, the decoder needs {n}",
                    p.name,
                    data.len()
                )));
            }
        }
        let mut keep = vec![logits];
        keep.extend(&entries);
        Ok(Decoder {
            program,
            exec: Executor::new(program, &keep),
            params,
            rows,
            capacity,
            per_token,
            vocab: *g.values[logits].ty.shape.last().unwrap_or(&0) as usize,
            logits,
            entries,
        })
    }

    /// The decode Program this decoder runs.
    pub fn program(&self) -> &Program {
        self.program
    }

    /// An empty cache for `batch` sequences (at most the Program's rows) of up to `capacity`
    /// tokens each (at most the Program's cache capacity), stored in `format`.
    pub fn cache(
        &self,
        batch: usize,
        capacity: usize,
        format: Format,
    ) -> Result<KvCache, DecodeError> {
        if batch > self.rows {
            return Err(DecodeError::OutOfRange(format!(
                "{batch} sequences do not fit a decode Program of {} rows",
                self.rows
            )));
        }
        let capacity = capacity.min(self.capacity);
        let layers = self
            .per_token
            .iter()
            .map(|&entry| {
                let len = batch * capacity * entry;
                let half = match format {
                    Format::Fp32 => None,
                    Format::Bf16 => Some(Half::Bf16(vec![half::bf16::ZERO; len])),
                    Format::Fp16 => Some(Half::F16(vec![half::f16::ZERO; len])),
                    other => return Err(DecodeError::CacheFormat(other)),
                };
                Ok(Layer {
                    input: vec![0.0; self.rows * self.capacity * entry],
                    half,
                    entry,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            format,
            capacity,
            per_token: self.per_token[0],
            rows: self.rows,
            slots: self.capacity,
            layers,
            lens: vec![0; batch],
        })
    }

    /// Feeds one token to each listed sequence, `(sequence, token)`, at that sequence's next
    /// position; appends their keys and values to `cache` and returns the logits of each row,
    /// `[rows.len(), vocab]`.
    pub fn step(
        &self,
        cache: &mut KvCache,
        rows: &[(usize, u32)],
    ) -> Result<Vec<f32>, DecodeError> {
        let vocab = self.vocab;
        let n = rows.len();
        if n > self.rows {
            return Err(DecodeError::OutOfRange(format!(
                "{n} rows do not fit a decode Program of {} rows",
                self.rows
            )));
        }
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
        if (cache.rows, cache.slots) != (self.rows, self.capacity)
            || cache.layers.len() != self.per_token.len()
            || cache
                .layers
                .iter()
                .zip(&self.per_token)
                .any(|(l, &e)| l.entry != e)
        {
            return Err(DecodeError::OutOfRange(
                "the cache was made by a decoder of another decode Program".into(),
            ));
        }
        // Sequence `s` runs in the Program's row `s`, where the cache inputs hold its tokens;
        // rows of sequences not listed (and beyond the batch) are padding at position 0, which
        // reads no cache, and their outputs are dropped.
        let r_all = self.rows;
        let mut tokens = vec![0u32; r_all];
        let mut pos = vec![0u32; r_all];
        for (&(s, tok), &p) in rows.iter().zip(&positions) {
            tokens[s] = tok;
            pos[s] = p as u32;
        }
        let caches: Vec<&[f32]> = cache.layers.iter().map(|l| l.input.as_slice()).collect();
        let mut inputs = HashMap::new();
        inputs.insert(InputKind::Tokens { offset: 0 }, tokens);
        inputs.insert(InputKind::Positions, pos);
        let out = self
            .exec
            .run_cached(
                &Feed {
                    params: &self.params,
                    inputs: &inputs,
                    weights: None,
                },
                &caches,
            )
            .map_err(|e| DecodeError::OutOfRange(e.to_string()))?;
        let (capacity, slots) = (cache.capacity, cache.slots);
        for (layer, &entry) in cache.layers.iter_mut().zip(&self.entries) {
            let (new, e) = (out[&entry].floats(), layer.entry);
            for (&(s, _), &p) in rows.iter().zip(&positions) {
                let x = &mut layer.input[(s * slots + p) * e..][..e];
                x.copy_from_slice(&new[s * e..(s + 1) * e]);
                if let Some(half) = &mut layer.half {
                    half.write((s * capacity + p) * e, x);
                }
            }
        }
        for &(s, _) in rows {
            cache.lens[s] += 1;
        }
        let logits = out[&self.logits].floats();
        let mut picked = Vec::with_capacity(n * vocab);
        for &(s, _) in rows {
            picked.extend_from_slice(&logits[s * vocab..(s + 1) * vocab]);
        }
        Ok(picked)
    }
}
