//! The optimizer: partial sums of squares over every gradient and the global norm for clipping,
//! AdamW over multi-tensor chunks, and the router bias update, launched after the step.

use super::experts::{sort_count, SORT_CHUNK};
use super::{
    val, Arg, Elem, Emitter, Grid, KernelDef, Launch, Pass, TensorEntry, MAX_GRID, OPTIMIZER_CHUNK,
};
use crate::ir::Update;
use crate::program::Settings;
use crate::program::TrainOutputs;

/// The optimizer's view of every trainable tensor, which the runtime fills in a device table
/// (`Arg::Tensors`), and the chunks its launches split them into (`Arg::ChunkTensor`,
/// `Arg::ChunkStart`).
const OPTIMIZER_TYPES: &str = "\
// One trainable tensor for the optimizer: parameter, AdamW moments, gradient, size, decay.
struct KilnTensor {
    float* w;
    float* m;
    float* v;
    const float* g;
    long long n;
    float decay;
};
";

const SUM_SQUARES_DOC: &str = "\
// The gradient norm, first part: partial[c] = Σ g² over chunk c of the gradients (chunks of
// 4096 elements of one tensor; f32 terms, summed in a fixed tree order), one block per chunk.
// tensors: the trainable tensors; chunk_tensor, chunk_start: i32[chunks], i64[chunks].";

const SUM_SQUARES_BODY: &str = "    __shared__ float scratch[32];
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const KilnTensor t = tensors[chunk_tensor[c]];
        const long long end = chunk_start[c] + 4096 < t.n ? chunk_start[c] + 4096 : t.n;
        float acc = 0.0f;
        for (long long i = chunk_start[c] + threadIdx.x; i < end; i += blockDim.x) {
            const float x = t.g[i];
            acc += x * x;
        }
        acc = kiln_block_sum(acc, scratch);
        if (threadIdx.x == 0) partial[c] = acc;
    }
";

const GRAD_NORM_DOC: &str = "\
// The gradient norm, second part: norm[0] = sqrt(Σ partial) in a fixed order, and the clipping
// factor norm[1] = max_norm / norm[0] when that is below 1 (1 otherwise; max_norm ≤ 0: no
// clipping). One block. partial: f32[chunks]; norm: f32[2].";

const GRAD_NORM_BODY: &str = "    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[c];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const float n = sqrtf(acc);
        norm[0] = n;
        norm[1] = max_norm > 0.0f && n > max_norm ? max_norm / n : 1.0f;
    }
";

const ADAMW_DOC: &str = "\
// One AdamW step on every trainable tensor, a block per chunk of 4096 elements, with
// decoupled weight decay, on the clipped gradient (clip = norm[1]):
// m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², w −= lr·((m/bias1) / (sqrt(v/bias2) + eps) + decay·w).
// tensors: the trainable tensors; chunk_tensor, chunk_start: i32[chunks], i64[chunks].";

const ADAMW_BODY: &str = "    const float clip = norm[1];
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const KilnTensor t = tensors[chunk_tensor[c]];
        const long long end = chunk_start[c] + 4096 < t.n ? chunk_start[c] + 4096 : t.n;
        for (long long i = chunk_start[c] + threadIdx.x; i < end; i += blockDim.x) {
            const float g = t.g[i] * clip;
            const float mi = beta1 * t.m[i] + (1.0f - beta1) * g;
            const float vi = beta2 * t.v[i] + (1.0f - beta2) * g * g;
            t.m[i] = mi;
            t.v[i] = vi;
            const float step = (mi / bias1) / (sqrtf(vi / bias2) + eps);
            t.w[i] = t.w[i] - lr * (step + t.decay * t.w[i]);
        }
    }
";

const BIAS_UPDATE_DOC: &str = "\
// The aux-loss-free balance update of one router's selection bias, after the optimizer step:
// bias[j] += gamma · sign(mean load − load_j), with load_j the (token, slot) pairs routed to
// expert j, summed over the chunks' counts (compared as total vs e · load_j, in integers).
// One block, a thread per expert; O(chunks · e) per thread.
// counts: i32[chunks, e] (per chunk and expert); bias: f32[e].";

const BIAS_UPDATE_BODY: &str = "    long long total = 0;
    for (long long i = 0; i < chunks * e; ++i) total += counts[i];
    for (long long j = threadIdx.x; j < e; j += blockDim.x) {
        long long load = 0;
        for (long long c = 0; c < chunks; ++c) load += counts[c * e + j];
        const long long scaled = e * load;
        bias[j] += total > scaled ? gamma : (total < scaled ? -gamma : 0.0f);
    }
";

impl Emitter<'_> {
    /// The optimizer's launches: the gradient norm's partial sums over every gradient, then
    /// AdamW on every trainable tensor (`node` numbers past the graph's nodes name them).
    pub(super) fn optimizer(&mut self, settings: &Settings, outputs: &TrainOutputs) -> Vec<Launch> {
        let graph = self.graph;
        let node = graph.nodes.len();
        self.out.push_str(OPTIMIZER_TYPES);
        self.out.push('\n');
        let opt = &settings.optimizer;
        let mut entries = Vec::new();
        for &(p, g) in &outputs.grads {
            let Some(w) = graph.param_value(p) else {
                continue;
            };
            let decay = if graph.params[p].update == Update::Decayed {
                opt.weight_decay
            } else {
                0.0
            };
            entries.push(TensorEntry {
                param: w.index(),
                grad: g.index(),
                elements: self.elements(g),
                decay,
            });
        }
        let chunks: u64 = entries
            .iter()
            .map(|t| t.elements.div_ceil(OPTIMIZER_CHUNK))
            .sum();
        let tensors = Arg::Tensors { entries };
        let partial = Arg::Scratch {
            slot: 0,
            bytes: chunks.max(1) * 4,
        };
        let norm = Arg::Scratch { slot: 1, bytes: 8 };
        // Every tensor's chunks: the table's entries, then each chunk's tensor and start.
        let chunked = |def: KernelDef| {
            def.param("tensors", Elem::Tensor, Pass::Read, tensors.clone())
                .param("chunk_tensor", Elem::I32, Pass::Read, Arg::ChunkTensor)
                .param("chunk_start", Elem::I64, Pass::Read, Arg::ChunkStart)
        };
        let grid = Grid::Blocks(chunks.clamp(1, MAX_GRID));
        let squares = chunked(
            KernelDef::new("sum_squares", "partial sums of squares (gradient norm)")
                .doc(SUM_SQUARES_DOC),
        )
        .write("partial", partial.clone())
        .long("chunks", chunks)
        .body(SUM_SQUARES_BODY);
        let grad_norm = KernelDef::new("grad_norm", "the gradient norm and clipping factor")
            .doc(GRAD_NORM_DOC)
            .read("partial", partial)
            .write("norm", norm.clone())
            .long("chunks", chunks)
            .float("max_norm", settings.grad_clip.unwrap_or(0.0))
            .body(GRAD_NORM_BODY);
        let hyper = |name| Arg::Hyper { name };
        let adamw =
            chunked(KernelDef::new("adamw", "one AdamW step on every tensor").doc(ADAMW_DOC))
                .read("norm", norm)
                .long("chunks", chunks)
                .param("lr", Elem::F32, Pass::Value, hyper("lr"))
                .float("beta1", opt.beta1)
                .float("beta2", opt.beta2)
                .float("eps", opt.eps)
                .param("bias1", Elem::F32, Pass::Value, hyper("bias1"))
                .param("bias2", Elem::F32, Pass::Value, hyper("bias2"))
                .body(ADAMW_BODY);
        let mut launches = vec![
            self.launch(node, squares, grid),
            self.launch(node, grad_norm, Grid::Blocks(1)),
            self.launch(node, adamw, grid),
        ];
        let gamma = settings.bias_update;
        if gamma > 0.0 {
            for &(bias, experts, e) in &outputs.routers {
                let Some(b) = graph.param_value(bias) else {
                    continue;
                };
                // The loads: per chunk of pairs and expert, as the experts' sort counts them.
                let (e, k) = (e as u64, self.shape(experts)[1]);
                let pairs = self.elements(experts);
                let chunks = pairs.div_ceil(SORT_CHUNK).max(1);
                let counts = Arg::Scratch {
                    slot: 2,
                    bytes: chunks * e * 4,
                };
                let count = sort_count(e, k)
                    .param("experts", Elem::U32, Pass::Read, val(experts))
                    .param("counts", Elem::I32, Pass::Write, counts.clone())
                    .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
                    .long("n", pairs / k);
                let update = KernelDef::new("bias_update", "the aux-loss-free bias update")
                    .doc(BIAS_UPDATE_DOC)
                    .param("counts", Elem::I32, Pass::Read, counts)
                    .write("bias", val(b))
                    .long("chunks", chunks)
                    .long("e", e)
                    .float("gamma", gamma)
                    .body(BIAS_UPDATE_BODY);
                launches.push(self.launch(node, count, Grid::Blocks(chunks)));
                launches.push(self.launch(node, update, Grid::Blocks(1)));
            }
        }
        launches
    }
}
