//! The optimizer: partial sums of squares over every gradient and the global norm for clipping,
//! AdamW over multi-tensor chunks, and the router bias update, launched after the step.

use super::{int, val, Arg, Emitter, Launch, TensorEntry, BLOCK, MAX_GRID};
use crate::ir::Update;
use crate::program::Settings;
use crate::program::TrainOutputs;

/// Elements per chunk of the optimizer's multi-tensor launches: block `c` takes chunk `c`.
pub const OPTIMIZER_CHUNK: u64 = 4096;

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

const SUM_SQUARES: &str = "\
// The gradient norm, first part: partial[c] = Σ g² over chunk c of the gradients (chunks of
// 4096 elements of one tensor; f32 terms, summed in a fixed tree order), one block per chunk.
// tensors: the trainable tensors; chunk_tensor, chunk_start: i32[chunks], i64[chunks].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const KilnTensor* __restrict__ tensors, const int* __restrict__ chunk_tensor, const long long* __restrict__ chunk_start, float* __restrict__ partial, long long chunks) {
    __shared__ float scratch[32];
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
}
";

const GRAD_NORM: &str = "\
// The gradient norm, second part: norm[0] = sqrt(Σ partial) in a fixed order, and the clipping
// factor norm[1] = max_norm / norm[0] when that is below 1 (1 otherwise; max_norm ≤ 0: no
// clipping). One block. partial: f32[chunks]; norm: f32[2].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ partial, float* __restrict__ norm, long long chunks, float max_norm) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[c];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const float n = sqrtf(acc);
        norm[0] = n;
        norm[1] = max_norm > 0.0f && n > max_norm ? max_norm / n : 1.0f;
    }
}
";

const ADAMW: &str = "\
// One AdamW step on every trainable tensor, a block per chunk of 4096 elements, with
// decoupled weight decay, on the clipped gradient (clip = norm[1]):
// m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², w −= lr·((m/bias1) / (sqrt(v/bias2) + eps) + decay·w).
// tensors: the trainable tensors; chunk_tensor, chunk_start: i32[chunks], i64[chunks].
extern \"C\" __global__ void @KERNEL@(const KilnTensor* __restrict__ tensors, const int* __restrict__ chunk_tensor, const long long* __restrict__ chunk_start, const float* __restrict__ norm, long long chunks, float lr, float beta1, float beta2, float eps, float bias1, float bias2) {
    const float clip = norm[1];
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
}
";

const BIAS_UPDATE: &str = "\
// The aux-loss-free balance update of one router's selection bias, after the optimizer step:
// bias[j] += gamma · sign(mean load − load_j), with load_j the (token, slot) pairs routed to
// expert j (compared as total vs e · load_j, in integers). One block, a thread per expert.
// experts: u32[pairs]; bias: f32[e].
extern \"C\" __global__ void @KERNEL@(const unsigned* __restrict__ experts, float* __restrict__ bias, long long pairs, long long e, float gamma) {
    for (long long j = threadIdx.x; j < e; j += blockDim.x) {
        long long load = 0, total = 0;
        for (long long p = 0; p < pairs; ++p) {
            load += experts[p] == (unsigned)j;
            total += experts[p] < (unsigned)e;
        }
        const long long scaled = e * load;
        bias[j] += total > scaled ? gamma : (total < scaled ? -gamma : 0.0f);
    }
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
        let squares = self.fixed(
            "sum_squares",
            "partial sums of squares (gradient norm)",
            SUM_SQUARES,
            node,
        );
        let norm_k = self.fixed(
            "grad_norm",
            "the gradient norm and clipping factor",
            GRAD_NORM,
            node,
        );
        let adamw = self.fixed("adamw", "one AdamW step on every tensor", ADAMW, node);
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
        let grid = chunks.clamp(1, MAX_GRID);
        let mut launches = vec![
            Launch {
                kernel: squares,
                grid,
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    tensors.clone(),
                    Arg::ChunkTensor,
                    Arg::ChunkStart,
                    partial.clone(),
                    int(chunks),
                ],
            },
            Launch {
                kernel: norm_k,
                grid: 1,
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    partial,
                    norm.clone(),
                    int(chunks),
                    Arg::Float {
                        value: settings.grad_clip.unwrap_or(0.0),
                    },
                ],
            },
            Launch {
                kernel: adamw,
                grid,
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    tensors,
                    Arg::ChunkTensor,
                    Arg::ChunkStart,
                    norm,
                    int(chunks),
                    Arg::Hyper { name: "lr" },
                    Arg::Float { value: opt.beta1 },
                    Arg::Float { value: opt.beta2 },
                    Arg::Float { value: opt.eps },
                    Arg::Hyper { name: "bias1" },
                    Arg::Hyper { name: "bias2" },
                ],
            },
        ];
        let gamma = settings.bias_update;
        if gamma > 0.0 {
            let update = self.fixed(
                "bias_update",
                "the aux-loss-free bias update",
                BIAS_UPDATE,
                node,
            );
            for &(bias, experts, e) in &outputs.routers {
                let Some(b) = graph.param_value(bias) else {
                    continue;
                };
                launches.push(Launch {
                    kernel: update.clone(),
                    grid: 1,
                    block: BLOCK,
                    shared_bytes: 0,
                    args: vec![
                        val(experts),
                        val(b),
                        int(self.elements(experts)),
                        int(e as u64),
                        Arg::Float { value: gamma },
                    ],
                });
            }
        }
        launches
    }
}
