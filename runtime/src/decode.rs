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
//! bytes per token are then the analyzer's KV-cache figure.

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
            .map(|&e| Store::new(format, batch * capacity * e))
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            format,
            capacity,
            per_token: self.per_token[0],
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
        // The Program's rows: the listed ones, then padding rows at position 0 (which read
        // no cache) whose outputs are dropped.
        let (r_all, c) = (self.rows, self.capacity);
        let mut tokens = vec![0u32; r_all];
        let mut pos = vec![0u32; r_all];
        for (i, (&(_, tok), &p)) in rows.iter().zip(&positions).enumerate() {
            tokens[i] = tok;
            pos[i] = p as u32;
        }
        let caches: Vec<Vec<f32>> = cache
            .layers
            .iter()
            .zip(&self.per_token)
            .map(|(store, &e)| {
                let mut past = vec![0f32; r_all * c * e];
                for (i, (&(s, _), &p)) in rows.iter().zip(&positions).enumerate() {
                    let from = s * cache.capacity * e;
                    store.read(from, &mut past[i * c * e..][..p * e]);
                }
                past
            })
            .collect();
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
        for ((store, &entry), &e) in cache
            .layers
            .iter_mut()
            .zip(&self.entries)
            .zip(&self.per_token)
        {
            let new = out[&entry].floats();
            for (i, (&(s, _), &p)) in rows.iter().zip(&positions).enumerate() {
                store.write((s * cache.capacity + p) * e, &new[i * e..(i + 1) * e]);
            }
        }
        for &(s, _) in rows {
            cache.lens[s] += 1;
        }
        Ok(out[&self.logits].floats()[..n * vocab].to_vec())
    }
}
