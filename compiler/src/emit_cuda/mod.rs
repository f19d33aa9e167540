//! The CUDA emitter: a verified training Program → one CUDA translation unit of kernels and the
//! plan of work that runs the Program on a GPU (`kiln emit cuda`). A decode Program
//! (`program::compile_decode`) emits the same way: its KV caches and positions are inputs like
//! the tokens, read by RoPE at positions and cached attention (`rope.rs`, `attention.rs`).
//!
//! Every node of the Program becomes a [`Step`]: kernel launches, GEMMs for cuBLASLt, or an
//! alias (a reshape moves no data); every op of the IR has its kernels. Kernels are specialized to the node's constants (a norm's width
//! and epsilon, an expression, RoPE's pair layout) and take row counts as arguments; a kernel
//! that two nodes would generate identically is emitted once and launched twice.
//!
//! The source reads like hand-written CUDA: each kernel opens with what it computes and the
//! shapes of its arguments, is named after the op it implements (and, for expressions, after
//! the first op path that uses it), and uses the building blocks in `kernels/*.cuh` (warp and
//! block reductions, online softmax, the activation functions and their derivatives). All
//! generated names live in `namespace kiln_gen`, except the `extern "C"` kernel entry points.
//!
//! Data are f32 in this version; GEMMs are described for cuBLASLt with operands in the node's
//! format and f32 accumulation, which is how the runtime runs them. A linear layer's GEMM whose format is FP8
//! reads K-major FP8 copies of both operands with their scales (1×T activation tiles, weight
//! blocks; [`Fp8Gemm`]) instead, each written once per step, where possible by the kernel
//! that computes the value ([`Fp8Copy`], planned in `fp8.rs`).
//!
//! The emitter and the dispatch of each node to its kernel family are here; every kernel is
//! written one way, as a `kernel::KernelDef` (comment, parameters bound to the launch's
//! arguments, body) that `Emitter::launch` writes once and launches. The families have a file
//! each: `expr.rs` (maps and their gradients), `norm.rs`,
//! `rope.rs`, `attention.rs`, `cross_entropy.rs`, `router.rs` (with the balance loss),
//! `experts.rs`, `copies.rs` (split, concat, fill, embedding…), `optimizer.rs` and `fp8.rs`
//! (the FP8 copies and GEMMs). The types of the emitted plan are
//! `kiln_ir::cuda`'s, which the runtime reads too.

use std::collections::HashMap;
use std::fmt::Write;

use crate::ir::{Def, Graph, InputKind, Node, Op, ValueId};
use crate::model::{Format, Fp8, NormKind};
use crate::names::{comment_text, Lang, Namer};
use crate::program::{Program, TrainOutputs};

mod attention;
mod copies;
mod cross_entropy;
mod experts;
mod expr;
mod fp8;
mod kernel;
mod norm;
mod optimizer;
mod rope;
mod router;

use fp8::Copies;
use kernel::{grid_stride, Grid, KernelDef};
pub use kiln_ir::cuda::{
    Arg, CudaProgram, Elem, Fp8Copy, Fp8Gemm, Fp8Operand, Gemm, GroupedGemm, Keep, KeptStorage,
    KeptValue, Kernel, Launch, Param, Pass, RopeTable, Step, TensorEntry, Work, HEADERS,
    HOST_HEADER, OPTIMIZER_CHUNK,
};

/// Threads per block of the row-wise kernels (norms, cross-entropy) and the elementwise ones.
const BLOCK: u32 = 256;

/// The most blocks an elementwise launch uses; its loop strides over the rest.
const MAX_GRID: u64 = 132 * 16;

/// The emitter's state: the source so far and the kernels by their text.
struct Emitter<'g> {
    graph: &'g Graph,
    out: String,
    namer: Namer,
    kernels: Vec<Kernel>,
    /// Kernel text (with a placeholder for the name) → the kernel's index.
    by_text: HashMap<String, usize>,
    rope_tables: Vec<RopeTable>,
    /// The spec's FP8 scaling (`[precision.fp8]`), for GEMMs whose format is FP8.
    fp8: Fp8,
    /// The FP8 copies of GEMM operands, planned before any step is emitted.
    copies: Copies,
}

impl<'g> Emitter<'g> {
    fn shape(&self, v: ValueId) -> Vec<u64> {
        self.graph.values[v].ty.shape.clone()
    }

    fn elements(&self, v: ValueId) -> u64 {
        self.shape(v).iter().product()
    }

    /// The rows and width of `v` seen as `[rows, last axis]`.
    fn rows(&self, v: ValueId) -> (u64, u64) {
        let s = self.shape(v);
        let d = *s.last().unwrap_or(&1);
        (s.iter().product::<u64>() / d.max(1), d)
    }
}

fn val(v: ValueId) -> Arg {
    Arg::Value { id: v.index() }
}

fn int(x: u64) -> Arg {
    Arg::Int {
        value: i64::try_from(x).expect("sizes fit in i64"),
    }
}

/// An f32 literal that reads back to `x` rounded to f32.
fn float_lit(x: f64) -> String {
    let f = x as f32;
    if f.is_nan() {
        return "__int_as_float(0x7fc00000)".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "__int_as_float(0x7f800000)"
        } else {
            "__int_as_float(0xff800000)"
        }
        .to_string();
    }
    let s = format!("{f:?}");
    let s = if s.contains(['.', 'e', 'E']) {
        s
    } else {
        format!("{s}.0")
    };
    format!("{s}f")
}

/// The kernel name for an op's path: the last two segments of its last op (`ffn.act` →
/// `ffn_act`; a fused linear layer and activation is named after the activation).
fn path_base(path: &str) -> String {
    let first = path.rsplit('+').next().unwrap_or(path);
    let parts: Vec<&str> = first
        .split('.')
        .filter(|p| p.parse::<usize>().is_err())
        .collect();
    let tail = &parts[parts.len().saturating_sub(2)..];
    tail.join("_")
}

impl Emitter<'_> {
    /// A linear layer's GEMM `y = x·wᵀ (+ b)`.
    fn linear_gemm(
        &self,
        format: Format,
        x: ValueId,
        w: ValueId,
        b: Option<ValueId>,
        y: ValueId,
    ) -> Gemm {
        let ws = self.shape(w);
        let (rows, _) = self.rows(x);
        Gemm {
            out: y.index(),
            a: x.index(),
            b: w.index(),
            m: rows,
            n: ws[0],
            k: ws[1],
            a_trans: false,
            b_trans: true,
            bias: b.map(ValueId::index),
            format,
            fp8: None,
        }
    }

    /// The work of one node.
    fn step(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        match &node.op {
            Op::Reshape { .. } => vec![Work::Alias { of: ins[0].index() }],
            Op::RopeAt { theta, yarn, pairs } => self.rope_at(index, node, *theta, *yarn, *pairs),
            Op::CachedAttention { scale, layout } => {
                self.cached_attention(index, node, *scale, *layout)
            }
            Op::Fill { value, .. } => vec![self.fill_launch(index, outs[0], *value)],
            Op::Map { expr, vars } => self.map(index, node, expr, vars),
            Op::MapGrad { expr, vars, wrt } => self.map_grad(index, node, expr, vars, wrt),
            Op::Split { sizes } => self.split(index, node, sizes),
            Op::Concat => self.concat(index, node),
            Op::Expand { axis, n } => self.expand(index, node, *axis, *n),
            Op::SumAxis { axis } => self.sum_axis(index, node, *axis),
            Op::Embedding => self.embedding(index, node),
            Op::EmbeddingGrad { vocab } => self.embedding_grad(index, node, *vocab),
            Op::Linear { bias } => {
                let b = bias.then(|| ins[2]);
                let gemm = self.linear_gemm(node.format, ins[0], ins[1], b, outs[0]);
                self.gemm_in(index, gemm, true, 0)
            }
            Op::LinearMap { bias, expr, var } => {
                let b = bias.then(|| ins[2]);
                let gemm = self.linear_gemm(node.format, ins[0], ins[1], b, outs[0]);
                let gemm = self.gemm_in(index, gemm, true, 0);
                // The activation reads the pre-activation the GEMM wrote.
                let act = Node {
                    op: Op::Map {
                        expr: expr.clone(),
                        vars: vec![var.clone()],
                    },
                    inputs: vec![outs[0]],
                    outputs: vec![outs[1]],
                    path: node.path.clone(),
                    format: node.format,
                };
                let Op::Map { expr, vars } = &act.op else {
                    unreachable!()
                };
                let mut work = gemm;
                work.extend(self.map(index, &act, expr, vars));
                work
            }
            Op::LinearGrad { bias } => {
                let (x, w, dy) = (ins[0], ins[1], ins[2]);
                let ws = self.shape(w);
                let (rows, _) = self.rows(x);
                let (out_f, in_f) = (ws[0], ws[1]);
                // dx[rows, in] = dy[rows, out] · w[out, in]
                let dx = Gemm {
                    out: outs[0].index(),
                    a: dy.index(),
                    b: w.index(),
                    m: rows,
                    n: in_f,
                    k: out_f,
                    a_trans: false,
                    b_trans: false,
                    bias: None,
                    format: node.format,
                    fp8: None,
                };
                // dw[out, in] = dyᵀ[out, rows] · x[rows, in]
                let dw = Gemm {
                    out: outs[1].index(),
                    a: dy.index(),
                    b: x.index(),
                    m: out_f,
                    n: in_f,
                    k: rows,
                    a_trans: true,
                    b_trans: false,
                    bias: None,
                    format: node.format,
                    fp8: None,
                };
                let mut work = self.gemm_in(index, dx, true, 0);
                work.extend(self.gemm_in(index, dw, false, 4));
                if *bias {
                    let def = copies::bias_grad(val(dy), val(outs[2]), rows, out_f);
                    work.push(self.work(index, def, Grid::Blocks(out_f.div_ceil(32))));
                }
                work
            }
            Op::RmsNorm { eps } => self.norm_fwd(index, node, NormKind::RmsNorm, *eps, false),
            Op::LayerNorm { eps } => self.norm_fwd(index, node, NormKind::LayerNorm, *eps, false),
            Op::AddNorm { norm, eps } => self.norm_fwd(index, node, *norm, *eps, true),
            Op::RmsNormGrad { eps } => self.norm_bwd(index, node, NormKind::RmsNorm, *eps, false),
            Op::LayerNormGrad { eps } => {
                self.norm_bwd(index, node, NormKind::LayerNorm, *eps, false)
            }
            Op::AddNormGrad { norm, eps } => self.norm_bwd(index, node, *norm, *eps, true),
            Op::Rope { theta, yarn, pairs } => self.rope(index, node, *theta, *yarn, *pairs, false),
            Op::RopeGrad { theta, yarn, pairs } => {
                self.rope(index, node, *theta, *yarn, *pairs, true)
            }
            Op::CrossEntropy => self.cross_entropy(index, node),
            Op::CrossEntropyGrad => self.cross_entropy_grad(index, node),
            Op::Attention { scale } => self.attention(index, node, *scale),
            Op::AttentionGrad { scale } => self.attention_grad(index, node, *scale),
            Op::Router(spec) => self.router(index, node, spec),
            Op::RouterGrad(spec) => self.router_grad(index, node, spec),
            Op::Experts { act, gated } => self.experts(index, node, act, *gated),
            Op::ExpertsGrad { act, gated } => self.experts_grad(index, node, act, *gated),
            Op::BalanceLoss { alpha, top_k } => self.balance(index, node, *alpha, *top_k, false),
            Op::BalanceLossGrad { alpha, top_k } => self.balance(index, node, *alpha, *top_k, true),
        }
    }
}

/// The CUDA program for a verified training Program: kernels for its nodes, then the
/// optimizer's: partial sums of squares for the global gradient norm and one AdamW launch per
/// trainable tensor, with the Program's settings. A Program without gradients (a decode step)
/// has no optimizer launches.
pub fn emit(program: &Program) -> CudaProgram {
    let graph = program.graph();
    let settings = program.settings();
    let mut namer = Namer::new(Lang::Cuda);
    namer.reserve("kiln_gen");
    let mut e = Emitter {
        graph,
        out: String::new(),
        namer,
        kernels: Vec::new(),
        by_text: HashMap::new(),
        rope_tables: Vec::new(),
        fp8: settings.formats.fp8.unwrap_or(Fp8::DEEPSEEK_V3),
        copies: Copies::default(),
    };
    e.copies = Copies::plan(graph, &e.fp8);
    let fp8_gemms = graph.nodes.iter().any(|(_, n)| {
        matches!(
            n.op,
            Op::Linear { .. } | Op::LinearMap { .. } | Op::LinearGrad { .. }
        ) && n.format.is_fp8()
    });
    // A decode step's rows and cache capacity, from its KV cache input `[rows, C, E]`.
    let decode = graph.values.iter().find_map(|(_, v)| match v.def {
        Def::Input(InputKind::KvCache { .. }) => Some((v.ty.shape[0], v.ty.shape[1])),
        _ => None,
    });
    let what = match decode {
        Some((rows, capacity)) => {
            format!("(decode {rows} rows, cache {capacity}): the kernels of one\n// decode step")
        }
        None => format!(
            "(batch {}, seq_len {}): the kernels of one\n// training step",
            settings.batch, settings.seq_len
        ),
    };
    let _ = writeln!(
        e.out,
        "// Generated by kiln from the spec {} {what}.\n\
         // Every kernel opens with what it computes and the shapes of its arguments; the plan\n\
         // of launches (grids, blocks, arguments) is in the manifest beside this file.\n\
         // It compiles with nvcc and with NVRTC (which has no C headers: hence the macros).\n\
         #ifndef INFINITY\n\
         #define INFINITY __int_as_float(0x7f800000)\n\
         #endif\n\
         #ifndef NAN\n\
         #define NAN __int_as_float(0x7fffffff)\n\
         #endif\n\
         #include \"kiln_reduce.cuh\"\n\
         #include \"kiln_softmax.cuh\"\n\
         #include \"kiln_math.cuh\"\n{}",
        comment_text(&crate::names::rust_str_literal(&settings.name)),
        if fp8_gemms {
            "#include \"kiln_fp8.cuh\"\n"
        } else {
            ""
        }
    );
    let mut steps = Vec::new();
    for (id, node) in graph.nodes.iter() {
        let work = e.step(id.index(), node);
        steps.push(Step {
            node: id.index(),
            op: node.op.name(),
            path: node.path.clone(),
            work,
        });
    }
    let optimizer = match TrainOutputs::of(graph) {
        Some(outputs) => e.optimizer(settings, &outputs),
        None => Vec::new(),
    };
    CudaProgram {
        name: graph.name.clone(),
        source: e.out,
        kernels: e.kernels,
        rope_tables: e.rope_tables,
        steps,
        optimizer,
        fp8_copies: e.copies.copies,
        keep: Keep::of(program.keep()),
    }
}
