//! The CUDA emitter: a verified training Program → one CUDA translation unit of kernels and the
//! plan of work that runs the Program on a GPU (`kiln emit cuda`).
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
//! Data are f32 in this version; GEMMs are described for cuBLASLt with bf16 operands and f32
//! accumulation, which is how the runtime runs them. A linear layer's GEMM whose format is FP8
//! reads K-major FP8 copies of both operands with their scales (1×T activation tiles, weight
//! blocks; [`Fp8Gemm`]) instead, each written once per step, where possible by the kernel
//! that computes the value ([`Fp8Copy`], planned in `fp8.rs`).

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

use crate::dsl::expr::{BinOp, Compiled, Expr, Instr};
use crate::ir::{Graph, Node, Op, RopePairs, Update, ValueId};
use crate::model::{Format, Fp8, NormKind, Yarn};
use crate::names::{comment_text, Lang, Namer};
use crate::program::{Program, Settings, TrainOutputs};

mod fp8;

use fp8::{quantizing_loop, Copies, TileOut, Tiles, GRID_START, GRID_STRIDE};

/// The building blocks in `kernels/` that the translation unit includes, by file name (for
/// writing beside it, and for NVRTC, which takes headers as strings).
/// (`kiln_types.cuh`, the bf16/FP8 conversions, joins them when a kernel needs it: it includes
/// CUDA's own headers, which NVRTC needs a path to.)
/// `kiln_fp8.cuh` is included when some GEMM is FP8; it needs no CUDA header.
pub const HEADERS: [(&str, &str); 4] = [
    (
        "kiln_reduce.cuh",
        include_str!("../../kernels/kiln_reduce.cuh"),
    ),
    (
        "kiln_softmax.cuh",
        include_str!("../../kernels/kiln_softmax.cuh"),
    ),
    ("kiln_math.cuh", include_str!("../../kernels/kiln_math.cuh")),
    ("kiln_fp8.cuh", include_str!("../../kernels/kiln_fp8.cuh")),
];

/// Threads per block of the row-wise kernels (norms, cross-entropy) and the elementwise ones.
const BLOCK: u32 = 256;

/// The most blocks an elementwise launch uses; its loop strides over the rest.
const MAX_GRID: u64 = 132 * 16;

/// The CUDA program of a training step: source, kernels and the work of each node.
#[derive(Clone, Debug, Serialize)]
pub struct CudaProgram {
    /// What the program computes for (the graph's name).
    pub name: String,
    /// The translation unit: includes, helpers and every kernel.
    #[serde(skip)]
    pub source: String,
    /// Each kernel once, in source order.
    pub kernels: Vec<Kernel>,
    /// RoPE tables the runtime computes on the host and uploads (`Arg::RopeCos/RopeSin`).
    pub rope_tables: Vec<RopeTable>,
    /// One step per Program node, in execution order.
    pub steps: Vec<Step>,
    /// The optimizer's launches after the step: the gradient norm (chunk partial sums, then
    /// the norm and clipping factor), AdamW on every tensor in one launch, each router's bias
    /// update.
    pub optimizer: Vec<Launch>,
    /// The FP8 copies of activations and weights that the step's FP8 GEMMs read
    /// (`Arg::Fp8Codes`, `Arg::Fp8Scales`), each live from its writer's step to its last
    /// reader's.
    pub fp8_copies: Vec<Fp8Copy>,
}

/// One kernel of the translation unit.
#[derive(Clone, Debug, Serialize)]
pub struct Kernel {
    pub name: String,
    /// What it computes, in one line.
    pub summary: String,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory per block, in bytes (static shared memory is in the source).
    pub shared_bytes: u32,
    /// The Program nodes that launch it.
    pub nodes: Vec<usize>,
}

/// A RoPE table pair `cos, sin: f32[seq, dim / 2]`, as the CPU backend's `rope_tables`
/// computes them.
#[derive(Clone, Debug, Serialize)]
pub struct RopeTable {
    pub seq: u64,
    pub dim: u64,
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// One kernel launch.
#[derive(Clone, Debug, Serialize)]
pub struct Launch {
    pub kernel: String,
    pub grid: u64,
    pub block: u32,
    pub shared_bytes: u32,
    /// The kernel's arguments, in order.
    pub args: Vec<Arg>,
}

/// A kernel argument.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Arg {
    /// The buffer of a value (a parameter, an input or an intermediate), by value index.
    Value {
        id: usize,
    },
    /// Scratch memory of the step, `slot` numbered within the step: launches of one step that
    /// name the same slot share the buffer.
    Scratch {
        slot: u32,
        bytes: u64,
    },
    /// The codes (`bytes`, one per element) and the scales (f32) of an FP8 copy, by index
    /// into `fp8_copies`: buffers that outlive a step, from the one that writes them to the
    /// last that reads them.
    Fp8Codes {
        copy: usize,
        bytes: u64,
    },
    Fp8Scales {
        copy: usize,
        bytes: u64,
    },
    /// The device's error flag: kernels set it to a nonzero code on bad input (a token id
    /// outside the vocabulary), and the runtime reports it after the step.
    ErrorFlag,
    /// A RoPE table (index into `rope_tables`).
    RopeCos {
        table: usize,
    },
    RopeSin {
        table: usize,
    },
    /// The device table of every trainable tensor (`KilnTensor`: parameter, AdamW moments,
    /// gradient, size, weight decay), in this order; the runtime fills the pointers.
    Tensors {
        entries: Vec<TensorEntry>,
    },
    /// For the optimizer's chunks of `OPTIMIZER_CHUNK` elements (each tensor's, in the order
    /// of `Tensors`): the tensor of each chunk (`i32`), and its first element (`i64`).
    ChunkTensor,
    ChunkStart,
    /// A per-step optimizer scalar the runtime supplies: `lr` (the schedule's), `bias1` and
    /// `bias2` (`1 − βᵗ`).
    Hyper {
        name: &'static str,
    },
    /// Integers and floats passed by value (`long long` and `float`).
    Int {
        value: i64,
    },
    Float {
        value: f64,
    },
}

/// The work of one Program node.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub node: usize,
    pub op: &'static str,
    pub path: String,
    pub work: Vec<Work>,
}

/// What runs for (part of) a node.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Work {
    Launch(Launch),
    /// A matrix product on cuBLASLt: row-major `out[m, n] = op(a)[m, k] · op(b)[k, n]`
    /// (+ `bias[n]` broadcast over rows), where `op` transposes when the flag says so;
    /// operands in bf16, accumulation and output in f32.
    Gemm(Gemm),
    /// No work: the output is the input's buffer under another shape.
    Alias {
        of: usize,
    },
}

/// One trainable tensor of [`Arg::Tensors`]: its parameter and gradient values, its size, its
/// weight decay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorEntry {
    pub param: usize,
    pub grad: usize,
    pub elements: u64,
    pub decay: f64,
}

/// A GEMM for cuBLASLt (see [`Work::Gemm`]).
#[derive(Clone, Debug, Serialize)]
pub struct Gemm {
    pub out: usize,
    pub a: usize,
    pub b: usize,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a_trans: bool,
    pub b_trans: bool,
    pub bias: Option<usize>,
    /// The FP8 copies of `a` and `b` the GEMM reads instead, when its format is FP8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8: Option<Fp8Gemm>,
}

/// A block-scaled FP8 GEMM (DeepSeek-V3's recipe): `out = (a_codes · a_scales) ·
/// (b_codes · b_scales)ᵀ` over `k`, accumulated in f32. Both operands are K-major copies that
/// the step's launches wrote before it: `a` as `[m, k]` and `b` as `[n, k]`, row-major, the
/// layout cuBLASLt's FP8 GEMM takes. The `a`, `b` and transpose fields of the [`Gemm`]
/// still name the f32 values the copies come from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fp8Gemm {
    pub format: Format,
    pub a: Fp8Operand,
    pub b: Fp8Operand,
}

/// One quantized operand of an [`Fp8Gemm`], `[outer, k]` row-major.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fp8Operand {
    /// One byte per element.
    pub codes: Arg,
    /// One f32 per block, row-major `[outer / block[0], k / block[1]]` (rounded up).
    pub scales: Arg,
    /// The elements one scale covers, `[outer, k]`: `[1, T]` activation tiles or `[R, C]`
    /// weight blocks (a weight read as `[in, out]` has its `[out, in]` blocks transposed).
    pub block: [u64; 2],
    /// The cuBLASLt scale mode these blocks are: `VEC128_32F` for 1×128 tiles,
    /// `BLK128x128_32F` for 128×128 blocks; none for other sizes, which cuBLASLt does not
    /// take. The runtime arranges the scales as the mode wants.
    pub cublaslt_scale_mode: Option<&'static str>,
}

/// An FP8 copy of a GEMM operand that a step writes once and every GEMM reading the value in
/// that layout and format reads (`fp8::Copies::plan`): an activation (or activation gradient)
/// in 1×T tiles along its last axis, the left operand of the forward and input-gradient GEMMs
/// that read it as stored; or a weight in blocks, as stored (forward) or transposed (input
/// gradient).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fp8Copy {
    /// The value quantized (the buffer's own value: reshapes alias it).
    pub value: usize,
    pub format: Format,
    /// The copy is `[outer, k]` row-major: the value as stored, or its transpose when
    /// `transposed` (a weight, as the input-gradient GEMM reads it).
    pub outer: u64,
    pub k: u64,
    pub transposed: bool,
    /// The elements one scale covers: `[1, T]` tiles of an activation, a weight's blocks
    /// (`[C, R]` when transposed).
    pub block: [u64; 2],
    /// `VEC128_32F`, `BLK128x128_32F` or none (see [`Fp8Operand`]).
    pub cublaslt_scale_mode: Option<&'static str>,
    /// The node whose step writes the copy: the value's producer when `fused` (its kernel
    /// quantizes what it computes, and takes the copy's codes and scales as arguments), else
    /// a quantizing launch before the GEMM of the first reader (of the pair, for a weight).
    pub writer: usize,
    pub fused: bool,
    /// A weight's copy in the other layout, which the same launch writes (the blocks' scales
    /// come from one max-abs).
    pub pair: Option<usize>,
    /// The nodes whose GEMMs read it, in execution order; the copy is dead after the last.
    pub readers: Vec<usize>,
}

/// A kernel written once and found again by its text.
struct Written {
    name: String,
    index: usize,
}

/// The emitter's state: the source so far and the kernels by their text.
struct Emitter<'g> {
    graph: &'g Graph,
    out: String,
    namer: Namer,
    kernels: Vec<Kernel>,
    /// Kernel body text (with a placeholder for the name) → the kernel.
    by_text: HashMap<String, Written>,
    rope_tables: Vec<RopeTable>,
    /// The spec's FP8 scaling (`[precision.fp8]`), for GEMMs whose format is FP8.
    fp8: Fp8,
    /// The FP8 copies of GEMM operands, planned before any step is emitted.
    copies: Copies,
}

/// The placeholder for a kernel's name in its text until it is named.
const NAME: &str = "@KERNEL@";

impl<'g> Emitter<'g> {
    /// Adds the kernel `text` (its name written as [`NAME`]) for `node`, unless the same text
    /// was added before; returns its name. `base` names it (sanitized, made unique).
    fn kernel(
        &mut self,
        base: &str,
        summary: &str,
        text: String,
        node: usize,
        shared: u32,
    ) -> String {
        if let Some(w) = self.by_text.get(&text) {
            let k = &mut self.kernels[w.index];
            if !k.nodes.contains(&node) {
                k.nodes.push(node);
            }
            return w.name.clone();
        }
        let name = self.namer.call(base);
        let body = text.replace(NAME, &name);
        self.out.push_str(&body);
        self.out.push('\n');
        self.kernels.push(Kernel {
            name: name.clone(),
            summary: summary.to_string(),
            block: BLOCK,
            shared_bytes: shared,
            nodes: vec![node],
        });
        self.by_text.insert(
            text,
            Written {
                name: name.clone(),
                index: self.kernels.len() - 1,
            },
        );
        name
    }

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

    fn rope_table(&mut self, seq: u64, dim: u64, theta: f64, yarn: Option<Yarn>) -> usize {
        let same = |t: &RopeTable| {
            t.seq == seq && t.dim == dim && t.theta.to_bits() == theta.to_bits() && t.yarn == yarn
        };
        if let Some(i) = self.rope_tables.iter().position(same) {
            return i;
        }
        self.rope_tables.push(RopeTable {
            seq,
            dim,
            theta,
            yarn,
        });
        self.rope_tables.len() - 1
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

/// A launch of `kernel` over `n` elements, one per thread, striding past [`MAX_GRID`] blocks.
fn elementwise_launch(kernel: String, n: u64, args: Vec<Arg>) -> Work {
    Work::Launch(Launch {
        kernel,
        grid: n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_GRID),
        block: BLOCK,
        shared_bytes: 0,
        args,
    })
}

/// A launch of `kernel` with one block per row.
fn row_launch(kernel: String, rows: u64, args: Vec<Arg>) -> Work {
    Work::Launch(Launch {
        kernel,
        grid: rows.max(1),
        block: BLOCK,
        shared_bytes: 0,
        args,
    })
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

/// The statements evaluating `expr` over `inputs` (C expressions, one per operand) into `t0…`,
/// and the name of the result.
fn expr_forward(c: &Compiled, inputs: &[String], indent: &str, out: &mut String) -> String {
    forward_lines(c, inputs, indent, out, &vec![true; c.len()]);
    format!("t{}", c.len() - 1)
}

/// The statements defining the temporaries `t{i}` that `keep` marks.
fn forward_lines(c: &Compiled, inputs: &[String], indent: &str, out: &mut String, keep: &[bool]) {
    for (i, step) in c.instrs().iter().enumerate() {
        if !keep[i] {
            continue;
        }
        let rhs = match *step {
            Instr::Var(v) => inputs[v].clone(),
            Instr::Num(x) => float_lit(x),
            Instr::Neg(a) => format!("-t{a}"),
            Instr::Bin(op, a, b) => format!("t{a} {} t{b}", op.symbol()),
            Instr::Pow(a, n) => vec![format!("t{a}"); n as usize].join(" * "),
            Instr::Call(f, a) => format!("kiln_{}(t{a})", f.name()),
        };
        let _ = writeln!(out, "{indent}const float t{i} = {rhs};");
    }
}

/// The gradient of `expr` over `inputs`: the forward temporaries the reverse sweep reads
/// (and those they are computed from), then the sweep seeding the result's adjoint with
/// `seed`, leaving each operand's gradient in `d0…` (declared here).
fn expr_gradient(c: &Compiled, inputs: &[String], seed: &str, indent: &str, out: &mut String) {
    let steps = c.instrs();
    // Only the adjoints that something reaches are declared.
    let mut reached = vec![false; steps.len()];
    reached[steps.len() - 1] = true;
    for i in (0..steps.len()).rev() {
        if !reached[i] {
            continue;
        }
        match steps[i] {
            Instr::Neg(a) | Instr::Pow(a, _) | Instr::Call(_, a) => reached[a] = true,
            Instr::Bin(_, a, b) => {
                reached[a] = true;
                reached[b] = true;
            }
            Instr::Var(_) | Instr::Num(_) => {}
        }
    }
    // Per reached step, its statements: (the adjoint it accumulates into, the statement, the
    // forward temporaries it reads). Constants have no adjoint, so theirs are left out.
    let mut sweep = Vec::new();
    let mut read = vec![false; steps.len()];
    for i in (0..steps.len()).rev() {
        if !reached[i] {
            continue;
        }
        let g = format!("g{i}");
        let parts: Vec<(Option<usize>, String, Vec<usize>)> = match steps[i] {
            Instr::Var(v) => vec![(None, format!("d{v} += {g};"), vec![])],
            Instr::Num(_) => continue,
            Instr::Neg(a) => vec![(Some(a), format!("g{a} -= {g};"), vec![])],
            Instr::Bin(BinOp::Add, a, b) => vec![
                (Some(a), format!("g{a} += {g};"), vec![]),
                (Some(b), format!("g{b} += {g};"), vec![]),
            ],
            Instr::Bin(BinOp::Sub, a, b) => vec![
                (Some(a), format!("g{a} += {g};"), vec![]),
                (Some(b), format!("g{b} -= {g};"), vec![]),
            ],
            Instr::Bin(BinOp::Mul, a, b) => vec![
                (Some(a), format!("g{a} += {g} * t{b};"), vec![b]),
                (Some(b), format!("g{b} += {g} * t{a};"), vec![a]),
            ],
            Instr::Bin(BinOp::Div, a, b) => vec![
                (Some(a), format!("g{a} += {g} / t{b};"), vec![b]),
                (
                    Some(b),
                    format!("g{b} -= {g} * t{a} / (t{b} * t{b});"),
                    vec![a, b],
                ),
            ],
            Instr::Pow(a, n) => {
                let (power, reads) = if n == 1 {
                    ("1.0f".to_string(), vec![])
                } else {
                    (vec![format!("t{a}"); n as usize - 1].join(" * "), vec![a])
                };
                let line = format!("g{a} += {g} * {} * ({power});", float_lit(f64::from(n)));
                vec![(Some(a), line, reads)]
            }
            Instr::Call(f, a) => vec![(
                Some(a),
                format!("g{a} += {g} * kiln_{}_grad(t{a});", f.name()),
                vec![a],
            )],
        };
        let kept: Vec<String> = parts
            .into_iter()
            .filter(|(target, ..)| !target.is_some_and(|t| matches!(steps[t], Instr::Num(_))))
            .map(|(_, line, reads)| {
                for r in reads {
                    read[r] = true;
                }
                line
            })
            .collect();
        if !kept.is_empty() {
            sweep.push(kept.join(" "));
        }
    }
    // A temporary read by a kept one is kept too (operands come first).
    for i in (0..steps.len()).rev() {
        if !read[i] {
            continue;
        }
        match steps[i] {
            Instr::Neg(a) | Instr::Pow(a, _) | Instr::Call(_, a) => read[a] = true,
            Instr::Bin(_, a, b) => {
                read[a] = true;
                read[b] = true;
            }
            Instr::Var(_) | Instr::Num(_) => {}
        }
    }
    forward_lines(c, inputs, indent, out, &read);
    for v in 0..c.arity() {
        let _ = writeln!(out, "{indent}float d{v} = 0.0f;");
    }
    for (i, &r) in reached.iter().enumerate().take(steps.len() - 1) {
        if r && !matches!(steps[i], Instr::Num(_)) {
            let _ = writeln!(out, "{indent}float g{i} = 0.0f;");
        }
    }
    let last = steps.len() - 1;
    let _ = writeln!(out, "{indent}const float g{last} = {seed};");
    for line in sweep {
        let _ = writeln!(out, "{indent}{line}");
    }
}

/// The C declaration list `const float* __restrict__ x0, …`.
fn const_ptrs(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("const float* __restrict__ {n}"))
        .collect::<Vec<_>>()
        .join(", ")
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

/// The last loop of a row kernel (one block per row of `d`): element `j` of the row is the
/// expression `value` (after the lines `pre`, which may declare temporaries), written to
/// `dst[j]`; with an FP8 copy to write, four consecutive elements per thread, quantized into
/// the row's tiles as they are written (the copy's pointers are offset by `row`).
fn row_epilogue(
    quantized: &Option<(Tiles, Arg, Arg)>,
    d: u64,
    dst: &str,
    pre: &[String],
    value: &str,
) -> String {
    let Some((tiles, ..)) = quantized else {
        if pre.is_empty() {
            return format!(
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {dst}[j] = {value};\n"
            );
        }
        let mut s = format!("    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{\n");
        for line in pre {
            let _ = writeln!(s, "        {line}");
        }
        let _ = writeln!(s, "        {dst}[j] = {value};\n    }}");
        return s;
    };
    let mut element = pre.to_vec();
    element.push(format!("const float value = {value};"));
    let mut s = format!(
        "    unsigned* const row_codes = codes + row * {};\n    float* const row_scales = scales + row * {};\n",
        d / 4,
        d / tiles.t
    );
    s.push_str(&quantizing_loop(
        "    ",
        "threadIdx.x",
        "blockDim.x",
        &(d / 4).to_string(),
        &element,
        &[TileOut {
            tiles: *tiles,
            value: "value",
            store: Some(dst),
            codes: "row_codes",
            scales: "row_scales",
        }],
    ));
    s
}

impl Emitter<'_> {
    fn map(&mut self, index: usize, node: &Node, expr: &Expr, vars: &[String]) -> Vec<Work> {
        let names: Vec<&str> = vars.iter().map(String::as_str).collect();
        let c = expr.compile(&names).expect("a verified map compiles");
        let ins: Vec<String> = (0..vars.len()).map(|i| format!("x{i}")).collect();
        let quantized = self.fused_copy(index, node.outputs[0]);
        let shapes = vars
            .iter()
            .enumerate()
            .map(|(i, v)| format!("x{i} ({}): f32[n]", comment_text(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let what = comment_text(&expr.to_string());
        let n = self.elements(node.outputs[0]);
        let mut args: Vec<Arg> = node.inputs.iter().map(|&v| val(v)).collect();
        args.push(val(node.outputs[0]));
        let mut base = format!("map_{}", path_base(&node.path));
        let (text, threads) = match quantized {
            None => {
                let loads: Vec<String> = ins.iter().map(|x| format!("{x}[i]")).collect();
                let mut body = String::new();
                let y = expr_forward(&c, &loads, "        ", &mut body);
                let text = format!(
                    "// y = {what}, elementwise.\n// {shapes}; y: f32[n]\n\
                     extern \"C\" __global__ void {NAME}({}, float* __restrict__ y, long long n) {{\n\
                     \x20   for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;\n\
                     \x20        i += (long long)gridDim.x * blockDim.x) {{\n{body}        y[i] = {y};\n    }}\n}}\n",
                    const_ptrs(&ins)
                );
                (text, n)
            }
            Some((tiles, codes, scales)) => {
                // Four consecutive elements per thread, quantized as they are written.
                let loads: Vec<String> = ins.iter().map(|x| format!("{x}[j]")).collect();
                let mut body = String::new();
                let y = expr_forward(&c, &loads, "", &mut body);
                let mut element: Vec<String> = body.lines().map(str::to_string).collect();
                element.push(format!("const float value = {y};"));
                let text = format!(
                    "// y = {what}, elementwise.\n// {shapes}; y: f32[n], n a multiple of {}\n{}\n\
                     extern \"C\" __global__ void {NAME}({}, float* __restrict__ y, unsigned* __restrict__ codes, float* __restrict__ scales, long long n) {{\n\
                     \x20   const long long n4 = n / 4;\n{}}}\n",
                    tiles.t,
                    tiles.comment("y"),
                    const_ptrs(&ins),
                    tiles.grid_loop(&element, Some("y"))
                );
                base.push_str(&format!("_q{}", tiles.suffix()));
                args.extend([codes, scales]);
                (text, n / 4)
            }
        };
        let name = self.kernel(&base, &format!("y = {what}"), text, index, 0);
        args.push(int(n));
        vec![elementwise_launch(name, threads, args)]
    }

    fn map_grad(
        &mut self,
        index: usize,
        node: &Node,
        expr: &Expr,
        vars: &[String],
        wrt: &[u32],
    ) -> Vec<Work> {
        let names: Vec<&str> = vars.iter().map(String::as_str).collect();
        let c = expr.compile(&names).expect("a verified map compiles");
        let ins: Vec<String> = (0..vars.len()).map(|i| format!("x{i}")).collect();
        // The FP8 copies of gradients the kernel writes too (planned where a GEMM reads one).
        let quantized: Vec<Option<(Tiles, Arg, Arg)>> = node
            .outputs
            .iter()
            .map(|&v| self.fused_copy(index, v))
            .collect();
        let what = comment_text(&expr.to_string());
        let wrt_names = wrt
            .iter()
            .map(|&w| comment_text(&vars[w as usize]))
            .collect::<Vec<_>>()
            .join(", ");
        let mut params: Vec<String> = wrt
            .iter()
            .map(|w| format!("float* __restrict__ dx{w}"))
            .collect();
        let mut args: Vec<Arg> = node.inputs.iter().map(|&v| val(v)).collect();
        args.extend(node.outputs.iter().map(|&v| val(v)));
        let n = self.elements(node.outputs[0]);
        let mut base = format!("map_grad_{}", path_base(&node.path));
        let (text, threads) = if quantized.iter().all(Option::is_none) {
            let loads: Vec<String> = ins.iter().map(|x| format!("{x}[i]")).collect();
            let mut body = String::new();
            expr_gradient(&c, &loads, "dy[i]", "        ", &mut body);
            for w in wrt {
                let _ = writeln!(body, "        dx{w}[i] = d{w};");
            }
            let text = format!(
                "// The gradient of y = {what} with respect to {wrt_names}: dx_w = dy · ∂y/∂x_w.\n\
                 // x*, dy, dx*: f32[n]\n\
                 extern \"C\" __global__ void {NAME}({}, const float* __restrict__ dy, {}, long long n) {{\n\
                 \x20   for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;\n\
                 \x20        i += (long long)gridDim.x * blockDim.x) {{\n{body}    }}\n}}\n",
                const_ptrs(&ins),
                params.join(", ")
            );
            (text, n)
        } else {
            // Four consecutive elements per thread; the quantized gradients are quantized
            // as they are written.
            let loads: Vec<String> = ins.iter().map(|x| format!("{x}[j]")).collect();
            let mut body = String::new();
            expr_gradient(&c, &loads, "dy[j]", "", &mut body);
            let mut names = Vec::new();
            for (w, q) in wrt.iter().zip(&quantized) {
                match q {
                    None => {
                        let _ = writeln!(body, "dx{w}[j] = d{w};");
                    }
                    Some((tiles, codes, scales)) => {
                        names.push((*tiles, format!("d{w}"), format!("dx{w}"), *w));
                        params.push(format!("unsigned* __restrict__ codes{w}"));
                        params.push(format!("float* __restrict__ scales{w}"));
                        args.extend([codes.clone(), scales.clone()]);
                        base.push_str(&format!("_q{w}"));
                    }
                }
            }
            let element: Vec<String> = body.lines().map(str::to_string).collect();
            let codes: Vec<(String, String)> = names
                .iter()
                .map(|(.., w)| (format!("codes{w}"), format!("scales{w}")))
                .collect();
            let outs: Vec<TileOut> = names
                .iter()
                .zip(&codes)
                .map(|((tiles, value, store, _), (c, s))| TileOut {
                    tiles: *tiles,
                    value,
                    store: Some(store),
                    codes: c,
                    scales: s,
                })
                .collect();
            base.push_str(&names[0].0.suffix());
            // One comment for the gradients quantized alike.
            let mut comments: Vec<String> = Vec::new();
            let mut alike: Vec<(Tiles, Vec<&str>)> = Vec::new();
            for (tiles, _, store, _) in &names {
                match alike.iter_mut().find(|(t, _)| t == tiles) {
                    Some((_, stores)) => stores.push(store),
                    None => alike.push((*tiles, vec![store])),
                }
            }
            for (tiles, stores) in alike {
                comments.push(tiles.comment(&stores.join(" and ")));
            }
            let text = format!(
                "// The gradient of y = {what} with respect to {wrt_names}: dx_w = dy · ∂y/∂x_w.\n\
                 // x*, dy, dx*: f32[n], n a multiple of {}\n{}\n\
                 extern \"C\" __global__ void {NAME}({}, const float* __restrict__ dy, {}, long long n) {{\n\
                 \x20   const long long n4 = n / 4;\n{}}}\n",
                names[0].0.t,
                comments.join("\n"),
                const_ptrs(&ins),
                params.join(", "),
                quantizing_loop("    ", GRID_START, GRID_STRIDE, "n4", &element, &outs)
            );
            (text, n / 4)
        };
        let name = self.kernel(&base, &format!("gradient of y = {what}"), text, index, 0);
        args.push(int(n));
        vec![elementwise_launch(name, threads, args)]
    }

    /// A norm's forward (`add` adds the residual first and writes the sum too).
    fn norm_fwd(
        &mut self,
        index: usize,
        node: &Node,
        kind: NormKind,
        eps: f64,
        add: bool,
    ) -> Vec<Work> {
        let x = node.inputs[0];
        let (rows, d) = self.rows(x);
        // y, and the FP8 copy of it the kernel writes too, if one is planned here.
        let y = *node.outputs.last().expect("a norm has an output");
        let quantized = self.fused_copy(index, y);
        let layer = kind == NormKind::LayerNorm;
        let kind_name = if layer { "layer_norm" } else { "rms_norm" };
        let op = if add {
            format!("add_{kind_name}")
        } else {
            kind_name.to_string()
        };
        let eps_lit = float_lit(eps);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// {}y = {} over rows of {d}, statistics in f32 (eps = {eps_lit}).",
            if add { "s = x + r; " } else { "" },
            if layer {
                "(s − mean) / sqrt(var + eps) · w + b"
            } else {
                "s / sqrt(mean(s²) + eps) · w"
            }
        );
        let _ = writeln!(
            t,
            "// x{}: f32[rows, {d}]; w{}: f32[{d}]; {}y: f32[rows, {d}]",
            if add { ", r" } else { "" },
            if layer { ", b" } else { "" },
            if add { "s, " } else { "" }
        );
        if let Some((tiles, ..)) = &quantized {
            let _ = writeln!(t, "{}", tiles.comment("y"));
        }
        let mut params = vec!["const float* __restrict__ x".to_string()];
        if add {
            params.push("const float* __restrict__ r".into());
        }
        params.push("const float* __restrict__ w".into());
        if layer {
            params.push("const float* __restrict__ b".into());
        }
        if add {
            params.push("float* __restrict__ s".into());
        }
        params.push("float* __restrict__ y".into());
        if quantized.is_some() {
            params.push("unsigned* __restrict__ codes".into());
            params.push("float* __restrict__ scales".into());
        }
        params.push("long long rows".into());
        let _ = writeln!(
            t,
            "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}({}) {{",
            params.join(", ")
        );
        let _ = writeln!(t, "    __shared__ float scratch[32];");
        let _ = writeln!(t, "    const long long row = blockIdx.x;");
        let _ = writeln!(t, "    if (row >= rows) return;");
        let _ = writeln!(t, "    const float* xr = x + row * {d};");
        if add {
            let _ = writeln!(t, "    const float* rr = r + row * {d};");
            let _ = writeln!(t, "    float* sr = s + row * {d};");
        }
        let _ = writeln!(t, "    float* yr = y + row * {d};");
        let load = if add { "xr[j] + rr[j]" } else { "xr[j]" };
        if add {
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sr[j] = {load};"
            );
            let _ = writeln!(t, "    __syncthreads();");
        }
        let src = if add { "sr" } else { "xr" };
        if layer {
            let _ = writeln!(t, "    float sum = 0.0f;");
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sum += {src}[j];"
            );
            let _ = writeln!(
                t,
                "    const float mean = kiln_block_sum(sum, scratch) / {d}.0f;"
            );
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float c = {src}[j] - mean; sq += c * c; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        } else {
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float v = {src}[j]; sq += v * v; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        }
        let element = if layer {
            format!("({src}[j] - mean) * rstd * w[j] + b[j]")
        } else {
            format!("{src}[j] * rstd * w[j]")
        };
        t.push_str(&row_epilogue(&quantized, d, "yr", &[], &element));
        let _ = writeln!(t, "}}");
        let mut base = format!("{op}_fwd_d{d}");
        let mut args: Vec<Arg> = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&v| val(v))
            .collect();
        if let Some((tiles, codes, scales)) = quantized {
            base.push_str(&format!("_q{}", tiles.suffix()));
            args.extend([codes, scales]);
        }
        args.push(int(rows));
        let name = self.kernel(
            &base,
            &format!("{op} forward over rows of {d}"),
            t,
            index,
            0,
        );
        vec![row_launch(name, rows, args)]
    }

    /// A norm's backward: one kernel for the input gradient (plus the residual stream's `ds`
    /// when `add`), saving each row's statistics, and one for the weight (and bias) gradients,
    /// summed over rows in a fixed order.
    fn norm_bwd(
        &mut self,
        index: usize,
        node: &Node,
        kind: NormKind,
        eps: f64,
        add: bool,
    ) -> Vec<Work> {
        let x = node.inputs[0];
        let (rows, d) = self.rows(x);
        let quantized = self.fused_copy(index, node.outputs[0]);
        let layer = kind == NormKind::LayerNorm;
        let kind_name = if layer { "layer_norm" } else { "rms_norm" };
        let op = if add {
            format!("add_{kind_name}")
        } else {
            kind_name.to_string()
        };
        let eps_lit = float_lit(eps);
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// The input gradient of {kind_name} over rows of {d}{}; saves each row's {} for the weight gradient.",
            if add { ", plus the residual stream's gradient ds" } else { "" },
            if layer { "mean and 1/std" } else { "1/rms" }
        );
        let _ = writeln!(
            t,
            "// x, dy{}, dx: f32[rows, {d}]; w: f32[{d}]; stats: f32[rows, 2]",
            if add { ", ds" } else { "" }
        );
        if let Some((tiles, ..)) = &quantized {
            let _ = writeln!(t, "{}", tiles.comment("dx"));
        }
        let mut params = vec![
            "const float* __restrict__ x".to_string(),
            "const float* __restrict__ w".into(),
            "const float* __restrict__ dy".into(),
        ];
        if add {
            params.push("const float* __restrict__ ds".into());
        }
        params.extend([
            "float* __restrict__ dx".to_string(),
            "float* __restrict__ stats".into(),
        ]);
        if quantized.is_some() {
            params.push("unsigned* __restrict__ codes".into());
            params.push("float* __restrict__ scales".into());
        }
        params.push("long long rows".into());
        let _ = writeln!(
            t,
            "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}({}) {{",
            params.join(", ")
        );
        let _ = writeln!(t, "    __shared__ float scratch[32];");
        let _ = writeln!(t, "    const long long row = blockIdx.x;");
        let _ = writeln!(t, "    if (row >= rows) return;");
        let _ = writeln!(t, "    const float* xr = x + row * {d};");
        let _ = writeln!(t, "    const float* gr = dy + row * {d};");
        let _ = writeln!(t, "    float* dxr = dx + row * {d};");
        if layer {
            let _ = writeln!(t, "    float sum = 0.0f;");
            let _ = writeln!(
                t,
                "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) sum += xr[j];"
            );
            let _ = writeln!(
                t,
                "    const float mean = kiln_block_sum(sum, scratch) / {d}.0f;"
            );
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float c = xr[j] - mean; sq += c * c; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        } else {
            let _ = writeln!(t, "    const float mean = 0.0f;");
            let _ = writeln!(t, "    float sq = 0.0f;");
            let _ = writeln!(t, "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{ const float v = xr[j]; sq += v * v; }}");
            let _ = writeln!(
                t,
                "    const float rstd = rsqrtf(kiln_block_sum(sq, scratch) / {d}.0f + {eps_lit});"
            );
        }
        // g = w·dy; dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) for LayerNorm, rstd·(g − x̂·mean(g·x̂))
        // for RMSNorm.
        let _ = writeln!(t, "    float gsum = 0.0f, gx = 0.0f;");
        let _ = writeln!(
            t,
            "    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{"
        );
        let _ = writeln!(t, "        const float g = w[j] * gr[j];");
        let _ = writeln!(t, "        gsum += g;");
        let _ = writeln!(t, "        gx += g * (xr[j] - mean) * rstd;");
        let _ = writeln!(t, "    }}");
        if layer {
            let _ = writeln!(
                t,
                "    const float gmean = kiln_block_sum(gsum, scratch) / {d}.0f;"
            );
        } else {
            let _ = writeln!(t, "    const float gmean = 0.0f;");
        }
        let _ = writeln!(
            t,
            "    const float gxmean = kiln_block_sum(gx, scratch) / {d}.0f;"
        );
        let residual = if add {
            format!(" + ds[row * {d} + j]")
        } else {
            String::new()
        };
        t.push_str(&row_epilogue(
            &quantized,
            d,
            "dxr",
            &["const float xhat = (xr[j] - mean) * rstd;".to_string()],
            &format!("rstd * (w[j] * gr[j] - gmean - xhat * gxmean){residual}"),
        ));
        let _ = writeln!(
            t,
            "    if (threadIdx.x == 0) {{ stats[2 * row] = mean; stats[2 * row + 1] = rstd; }}"
        );
        let _ = writeln!(t, "}}");
        let dx_base = match &quantized {
            Some((tiles, ..)) => format!("{op}_bwd_dx_d{d}_q{}", tiles.suffix()),
            None => format!("{op}_bwd_dx_d{d}"),
        };
        let dx_name = self.kernel(
            &dx_base,
            &format!("{op} input gradient over rows of {d}"),
            t,
            index,
            0,
        );

        // The weight (and bias) gradient: 32 columns per block, 8 row lanes summing rows
        // strided by 8, then the lanes in a fixed order.
        let mut t = String::new();
        let _ = writeln!(
            t,
            "// The weight{} gradient of {kind_name}: dw[j] = Σ_rows dy·x̂{}, over rows of {d}.",
            if layer { " and bias" } else { "" },
            if layer { ", db[j] = Σ_rows dy" } else { "" }
        );
        let _ = writeln!(t, "// x, dy: f32[rows, {d}]; stats: f32[rows, 2]; dw{}: f32[{d}]. Block: 32 columns × 8 row lanes.", if layer { ", db" } else { "" });
        let mut params = vec![
            "const float* __restrict__ x".to_string(),
            "const float* __restrict__ dy".into(),
            "const float* __restrict__ stats".into(),
            "float* __restrict__ dw".into(),
        ];
        if layer {
            params.push("float* __restrict__ db".into());
        }
        params.push("long long rows".into());
        let _ = writeln!(
            t,
            "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}({}) {{",
            params.join(", ")
        );
        let _ = writeln!(t, "    __shared__ float part_w[8][33];");
        if layer {
            let _ = writeln!(t, "    __shared__ float part_b[8][33];");
        }
        let _ = writeln!(
            t,
            "    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;"
        );
        let _ = writeln!(t, "    const int j = blockIdx.x * 32 + lane;");
        let _ = writeln!(t, "    float acc_w = 0.0f, acc_b = 0.0f;");
        let _ = writeln!(t, "    if (j < {d}) {{");
        let _ = writeln!(
            t,
            "        for (long long row = group; row < rows; row += 8) {{"
        );
        let _ = writeln!(t, "            const float g = dy[row * {d} + j];");
        let _ = writeln!(
            t,
            "            acc_w += g * (x[row * {d} + j] - stats[2 * row]) * stats[2 * row + 1];"
        );
        let _ = writeln!(t, "            acc_b += g;");
        let _ = writeln!(t, "        }}");
        let _ = writeln!(t, "    }}");
        let _ = writeln!(t, "    part_w[group][lane] = acc_w;");
        if layer {
            let _ = writeln!(t, "    part_b[group][lane] = acc_b;");
        }
        let _ = writeln!(t, "    __syncthreads();");
        let _ = writeln!(t, "    if (group == 0 && j < {d}) {{");
        let _ = writeln!(
            t,
            "        float w_sum = 0.0f{};",
            if layer { ", b_sum = 0.0f" } else { "" }
        );
        let _ = writeln!(
            t,
            "        for (int k = 0; k < 8; ++k) {{ w_sum += part_w[k][lane];{} }}",
            if layer {
                " b_sum += part_b[k][lane];"
            } else {
                ""
            }
        );
        let _ = writeln!(t, "        dw[j] = w_sum;");
        if layer {
            let _ = writeln!(t, "        db[j] = b_sum;");
        }
        let _ = writeln!(t, "    }}");
        let _ = writeln!(t, "}}");
        let dw_name = self.kernel(
            &format!("{kind_name}_bwd_dw_d{d}"),
            &format!("{kind_name} weight gradient over rows of {d}"),
            t,
            index,
            0,
        );

        let stats = Arg::Scratch {
            slot: 0,
            bytes: rows * 8,
        };
        let mut args = vec![
            val(node.inputs[0]),
            val(node.inputs[1]),
            val(node.inputs[2]),
        ];
        if add {
            args.push(val(node.inputs[3]));
        }
        args.extend([val(node.outputs[0]), stats.clone()]);
        if let Some((_, codes, scales)) = quantized {
            args.extend([codes, scales]);
        }
        args.push(int(rows));
        let mut dw_args = vec![
            val(node.inputs[0]),
            val(node.inputs[2]),
            stats,
            val(node.outputs[1]),
        ];
        if layer {
            dw_args.push(val(node.outputs[2]));
        }
        dw_args.push(int(rows));
        vec![
            row_launch(dx_name, rows, args),
            Work::Launch(Launch {
                kernel: dw_name,
                grid: d.div_ceil(32),
                block: BLOCK,
                shared_bytes: 0,
                args: dw_args,
            }),
        ]
    }

    fn rope(
        &mut self,
        index: usize,
        node: &Node,
        theta: f64,
        yarn: Option<Yarn>,
        pairs: RopePairs,
        grad: bool,
    ) -> Vec<Work> {
        let s = self.shape(node.inputs[0]);
        let (b, t_len, h, d) = (s[0], s[1], s[2], s[3]);
        let half = d / 2;
        let table = self.rope_table(t_len, d, theta, yarn);
        let (layout, first, second): (&str, String, String) = match pairs {
            RopePairs::Interleaved => ("interleaved", "2 * i".into(), "2 * i + 1".into()),
            RopePairs::Halves => ("halves", "i".into(), format!("i + {half}")),
        };
        let (dir, rot) = if grad {
            (
                "bwd",
                "(a, b) → (a·cos + b·sin, −a·sin + b·cos), the transposed rotation",
            )
        } else {
            ("fwd", "(a, b) → (a·cos − b·sin, a·sin + b·cos)")
        };
        let mut t = String::new();
        let _ = writeln!(t, "// RoPE {dir}: rotates each pair ({layout}) of every head by its position's angle, {rot}.");
        let _ = writeln!(
            t,
            "// x, y: f32[B, T, H, {d}]; cos, sin: f32[T, {half}]. One thread per pair."
        );
        let _ = writeln!(t, "extern \"C\" __global__ void {NAME}(const float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t, float* __restrict__ y, long long pairs_total, long long t_len, long long heads) {{");
        let _ = writeln!(t, "    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs_total;");
        let _ = writeln!(t, "         p += (long long)gridDim.x * blockDim.x) {{");
        let _ = writeln!(t, "        const long long i = p % {half};");
        let _ = writeln!(t, "        const long long head = p / {half};");
        let _ = writeln!(t, "        const long long pos = (head / heads) % t_len;");
        let _ = writeln!(
            t,
            "        const float c = cos_t[pos * {half} + i], s = sin_t[pos * {half} + i];"
        );
        let _ = writeln!(t, "        const float* xh = x + head * {d};");
        let _ = writeln!(t, "        float* yh = y + head * {d};");
        let _ = writeln!(t, "        const float a = xh[{first}], b = xh[{second}];");
        if grad {
            let _ = writeln!(t, "        yh[{first}] = a * c + b * s;");
            let _ = writeln!(t, "        yh[{second}] = b * c - a * s;");
        } else {
            let _ = writeln!(t, "        yh[{first}] = a * c - b * s;");
            let _ = writeln!(t, "        yh[{second}] = a * s + b * c;");
        }
        let _ = writeln!(t, "    }}");
        let _ = writeln!(t, "}}");
        let name = self.kernel(
            &format!("rope_{dir}_{layout}_d{d}"),
            &format!("RoPE {dir}, {layout} pairs, head dim {d}"),
            t,
            index,
            0,
        );
        let pairs_total = b * t_len * h * half;
        vec![elementwise_launch(
            name,
            pairs_total,
            vec![
                val(node.inputs[0]),
                Arg::RopeCos { table },
                Arg::RopeSin { table },
                val(node.outputs[0]),
                int(pairs_total),
                int(t_len),
                int(h),
            ],
        )]
    }
}

/// The copy kernel behind split and concat: a block of columns from one row-major matrix into
/// another.
const COPY_COLUMNS: &str = "\
// Copies columns [src_off, src_off + width) of src: f32[rows, src_cols] into columns
// [dst_off, dst_off + width) of dst: f32[rows, dst_cols] (split and concat).
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ src, float* __restrict__ dst, long long rows, long long width, long long src_cols, long long src_off, long long dst_cols, long long dst_off) {
    const long long n = rows * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        dst[r * dst_cols + dst_off + c] = src[r * src_cols + src_off + c];
    }
}
";

const FILL: &str = "\
// y[i] = value for i < n (gradient seeds, absent gradients).
extern \"C\" __global__ void @KERNEL@(float* __restrict__ y, float value, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = value;
    }
}
";

const EXPAND: &str = "\
// Repeats the middle axis: x: f32[outer, 1, inner] → y: f32[outer, n, inner].
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ x, float* __restrict__ y, long long outer, long long n, long long inner) {
    const long long total = outer * n * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long o = i / (n * inner), j = i % inner;
        y[i] = x[o * inner + j];
    }
}
";

const SUM_AXIS: &str = "\
// Sums the middle axis in order: x: f32[outer, len, inner] → y: f32[outer, 1, inner].
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ x, float* __restrict__ y, long long outer, long long len, long long inner) {
    const long long total = outer * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long o = i / inner, j = i % inner;
        float acc = 0.0f;
        for (long long k = 0; k < len; ++k) acc += x[(o * len + k) * inner + j];
        y[i] = acc;
    }
}
";

const EMBEDDING_FWD: &str = "\
// Row lookup: y[r, :] = table[ids[r], :]. An id outside the vocabulary sets *error = 1 and
// writes zeros. table: f32[vocab, d]; ids: u32[rows]; y: f32[rows, d].
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ table, const unsigned* __restrict__ ids, float* __restrict__ y, int* __restrict__ error, long long rows, long long d, long long vocab) {
    const long long n = rows * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / d, j = i % d;
        const unsigned id = ids[r];
        if (id < vocab) {
            y[i] = table[(long long)id * d + j];
        } else {
            y[i] = 0.0f;
            *error = 1;
        }
    }
}
";

const EMBEDDING_BWD: &str = "\
// Scatter-add of rows: dtable[ids[r], :] += dy[r, :] (dtable zeroed first by a fill). Atomic
// adds: the order of additions, and so the last bits, vary from run to run.
// ids: u32[rows]; dy: f32[rows, d]; dtable: f32[vocab, d].
extern \"C\" __global__ void @KERNEL@(const unsigned* __restrict__ ids, const float* __restrict__ dy, float* __restrict__ dtable, long long rows, long long d, long long vocab) {
    const long long n = rows * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / d, j = i % d;
        const unsigned id = ids[r];
        if (id < vocab) atomicAdd(&dtable[(long long)id * d + j], dy[i]);
    }
}
";

const BIAS_GRAD: &str = "\
// Column sums in a fixed order: db[j] = Σ_r dy[r, j]. dy: f32[rows, cols]; db: f32[cols].
// Block: 32 columns × 8 row lanes.
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ dy, float* __restrict__ db, long long rows, long long cols) {
    __shared__ float part[8][33];
    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    const long long j = blockIdx.x * 32LL + lane;
    float acc = 0.0f;
    if (j < cols) {
        for (long long r = group; r < rows; r += 8) acc += dy[r * cols + j];
    }
    part[group][lane] = acc;
    __syncthreads();
    if (group == 0 && j < cols) {
        float sum = 0.0f;
        for (int k = 0; k < 8; ++k) sum += part[k][lane];
        db[j] = sum;
    }
}
";

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

/// Cross-entropy over rows of `V` logits, forward: each block runs an online softmax over its
/// row (never storing probabilities) and writes `lse − logit[target]`; a second kernel takes
/// the mean in a fixed order.
fn cross_entropy_fwd_text(vocab: u64) -> String {
    format!(
        "\
// Cross-entropy, forward: loss[r] = logsumexp(logits[r, :]) − logits[r, target[r]], by an
// online softmax over the {vocab} logits of the row (the probabilities are never stored). A
// target outside the vocabulary sets *error = 2 and counts as zero loss.
// logits: f32[rows, {vocab}]; target: u32[rows]; loss: f32[rows].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ logits, const unsigned* __restrict__ target, float* __restrict__ loss, int* __restrict__ error, long long rows) {{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + row * {vocab};
    kiln_softmax_state state = kiln_softmax_state::empty();
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) state.update(z[j]);
    const float m = kiln_block_max(state.m, scratch);
    const float l = kiln_block_sum(state.l * kiln_softmax_exp(state.m - m), scratch);
    if (threadIdx.x == 0) {{
        const unsigned t = target[row];
        if (t < {vocab}) {{
            loss[row] = m + logf(l) - z[t];
        }} else {{
            loss[row] = 0.0f;
            *error = 2;
        }}
    }}
}}
"
    )
}

/// Cross-entropy, backward: recomputes each row's log-sum-exp, then writes
/// `(softmax − onehot) · dloss / rows`.
fn cross_entropy_bwd_text(vocab: u64, weighted: bool) -> String {
    // The weighted loss Σ w[r]·CE[r] scales row r by dloss · w[r] instead of dloss / rows.
    let (what, weight_doc, weight_arg, scale) = if weighted {
        (
            "dloss · weight[r]",
            "; weight: f32[rows]",
            "const float* __restrict__ weight, ",
            "dloss[0] * weight[row]",
        )
    } else {
        ("dloss / rows", "", "", "dloss[0] / (float)rows")
    };
    format!(
        "\
// Cross-entropy, backward: dlogits[r, j] = (softmax(logits[r, :])[j] − [j = target[r]]) ·
// {what}, the row's log-sum-exp recomputed by an online softmax (two reads of the row,
// one write; the probabilities are never stored).
// logits, dlogits: f32[rows, {vocab}]; target: u32[rows]; dloss: f32[1]{weight_doc}.
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ logits, const unsigned* __restrict__ target, const float* __restrict__ dloss, {weight_arg}float* __restrict__ dlogits, long long rows) {{
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + row * {vocab};
    float* dz = dlogits + row * {vocab};
    kiln_softmax_state state = kiln_softmax_state::empty();
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) state.update(z[j]);
    const float m = kiln_block_max(state.m, scratch);
    const float l = kiln_block_sum(state.l * kiln_softmax_exp(state.m - m), scratch);
    const float scale = {scale};
    const unsigned t = target[row];
    for (int j = threadIdx.x; j < {vocab}; j += blockDim.x) {{
        const float p = kiln_softmax_exp(z[j] - m) / l;
        dz[j] = (p - (j == (int)t ? 1.0f : 0.0f)) * scale;
    }}
}}
"
    )
}

/// The weighted sum of `n` values in one block, in a fixed order (weighted losses).
const WEIGHTED_SUM: &str = "\
// y[0] = Σ x[i] · w[i], one block, fixed order. x, w: f32[n]; y: f32[1].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i] * w[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc;
}
";

/// The mean of `n` values in one block, in a fixed order (losses).
const MEAN: &str = "\
// y[0] = (Σ x[i]) / n, one block, fixed order. x: f32[n]; y: f32[1].
extern \"C\" __global__ void __launch_bounds__(256) @KERNEL@(const float* __restrict__ x, float* __restrict__ y, long long n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) y[0] = acc / (float)n;
}
";

impl Emitter<'_> {
    /// A fixed kernel (its text uses [`NAME`]), added once.
    fn fixed(&mut self, base: &str, summary: &str, text: &str, node: usize) -> String {
        self.kernel(base, summary, text.to_string(), node, 0)
    }

    fn copy_columns(&mut self, node: usize) -> String {
        self.fixed(
            "copy_columns",
            "copies a block of columns (split, concat)",
            COPY_COLUMNS,
            node,
        )
    }

    fn fill_launch(&mut self, node: usize, out: ValueId, value: f64) -> Work {
        let k = self.fixed("fill", "fills a buffer with a value", FILL, node);
        let n = self.elements(out);
        elementwise_launch(k, n, vec![val(out), Arg::Float { value }, int(n)])
    }

    /// A concat whose output has an FP8 copy: one kernel writes the whole output, four
    /// consecutive elements per thread, each from the input that holds its column, and
    /// quantizes them on the way out. (A tile may span inputs, and rows: the column widths
    /// are constants of the kernel.)
    fn concat_quantized(&mut self, index: usize, node: &Node, q: (Tiles, Arg, Arg)) -> Work {
        let (tiles, codes, scales) = q;
        let (rows, cols) = self.rows(node.outputs[0]);
        let widths: Vec<u64> = node.inputs.iter().map(|&x| self.rows(x).1).collect();
        let mut element = vec![format!("const long long r = j / {cols}, c = j % {cols};")];
        let mut off = 0;
        let mut select = String::new();
        for (i, w) in widths.iter().enumerate() {
            let load = if off == 0 {
                format!("x{i}[r * {w} + c]")
            } else {
                format!("x{i}[r * {w} + c - {off}]")
            };
            off += w;
            if i + 1 == widths.len() {
                select.push_str(&load);
            } else {
                select.push_str(&format!("c < {off} ? {load} : "));
            }
        }
        element.push(format!("const float value = {select};"));
        let ins: Vec<String> = (0..widths.len()).map(|i| format!("x{i}")).collect();
        let shapes = widths
            .iter()
            .enumerate()
            .map(|(i, w)| format!("x{i}: f32[rows, {w}]"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "// y = concat(x0, …) along the last axis.\n// {shapes}; y: f32[rows, {cols}]\n{}\n\
             extern \"C\" __global__ void {NAME}({}, float* __restrict__ y, unsigned* __restrict__ codes, float* __restrict__ scales, long long rows) {{\n\
             \x20   const long long n4 = rows * {cols} / 4;\n{}}}\n",
            tiles.comment("y"),
            const_ptrs(&ins),
            tiles.grid_loop(&element, Some("y"))
        );
        let name = self.kernel(
            &format!(
                "concat_{}_q{}",
                widths
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join("_"),
                tiles.suffix()
            ),
            "concat, quantized to FP8 on the way out",
            text,
            index,
            0,
        );
        let mut args: Vec<Arg> = node.inputs.iter().map(|&v| val(v)).collect();
        args.extend([val(node.outputs[0]), codes, scales, int(rows)]);
        elementwise_launch(name, rows * cols / 4, args)
    }

    /// A linear layer's GEMM `y = x·wᵀ (+ b)`.
    fn linear_gemm(&self, x: ValueId, w: ValueId, b: Option<ValueId>, y: ValueId) -> Gemm {
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
            fp8: None,
        }
    }

    /// The work of one node.
    fn step(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        match &node.op {
            Op::Reshape { .. } => vec![Work::Alias { of: ins[0].index() }],
            Op::Fill { value, .. } => vec![self.fill_launch(index, outs[0], *value)],
            Op::Map { expr, vars } => self.map(index, node, expr, vars),
            Op::MapGrad { expr, vars, wrt } => self.map_grad(index, node, expr, vars, wrt),
            Op::Split { sizes } => {
                let k = self.copy_columns(index);
                let (rows, cols) = self.rows(ins[0]);
                let mut off = 0;
                let mut work = Vec::new();
                for (&size, &out) in sizes.iter().zip(outs) {
                    let n = rows * size;
                    work.push(elementwise_launch(
                        k.clone(),
                        n,
                        vec![
                            val(ins[0]),
                            val(out),
                            int(rows),
                            int(size),
                            int(cols),
                            int(off),
                            int(size),
                            int(0),
                        ],
                    ));
                    off += size;
                }
                work
            }
            Op::Concat => {
                if let Some(q) = self.fused_copy(index, outs[0]) {
                    return vec![self.concat_quantized(index, node, q)];
                }
                let k = self.copy_columns(index);
                let (rows, cols) = self.rows(outs[0]);
                let mut off = 0;
                let mut work = Vec::new();
                for &x in ins {
                    let (_, width) = self.rows(x);
                    work.push(elementwise_launch(
                        k.clone(),
                        rows * width,
                        vec![
                            val(x),
                            val(outs[0]),
                            int(rows),
                            int(width),
                            int(width),
                            int(0),
                            int(cols),
                            int(off),
                        ],
                    ));
                    off += width;
                }
                work
            }
            Op::Expand { axis, n } => {
                let s = self.shape(ins[0]);
                let outer: u64 = s[..*axis as usize].iter().product();
                let inner: u64 = s[*axis as usize + 1..].iter().product();
                let k = self.fixed("expand_axis", "repeats an axis of size 1", EXPAND, index);
                vec![elementwise_launch(
                    k,
                    outer * n * inner,
                    vec![val(ins[0]), val(outs[0]), int(outer), int(*n), int(inner)],
                )]
            }
            Op::SumAxis { axis } => {
                let s = self.shape(ins[0]);
                let outer: u64 = s[..*axis as usize].iter().product();
                let len = s[*axis as usize];
                let inner: u64 = s[*axis as usize + 1..].iter().product();
                let k = self.fixed("sum_axis", "sums an axis, keeping it", SUM_AXIS, index);
                vec![elementwise_launch(
                    k,
                    outer * inner,
                    vec![val(ins[0]), val(outs[0]), int(outer), int(len), int(inner)],
                )]
            }
            Op::Embedding => {
                let t = self.shape(ins[0]);
                let (rows, d) = (self.elements(ins[1]), t[1]);
                let k = self.fixed("embedding_fwd", "row lookup", EMBEDDING_FWD, index);
                vec![elementwise_launch(
                    k,
                    rows * d,
                    vec![
                        val(ins[0]),
                        val(ins[1]),
                        val(outs[0]),
                        Arg::ErrorFlag,
                        int(rows),
                        int(d),
                        int(t[0]),
                    ],
                )]
            }
            Op::EmbeddingGrad { vocab } => {
                let (rows, d) = self.rows(ins[1]);
                let zero = self.fill_launch(index, outs[0], 0.0);
                let k = self.fixed("embedding_bwd", "scatter-add of rows", EMBEDDING_BWD, index);
                vec![
                    zero,
                    elementwise_launch(
                        k,
                        rows * d,
                        vec![
                            val(ins[0]),
                            val(ins[1]),
                            val(outs[0]),
                            int(rows),
                            int(d),
                            int(*vocab),
                        ],
                    ),
                ]
            }
            Op::Linear { bias } => {
                let b = bias.then(|| ins[2]);
                let gemm = self.linear_gemm(ins[0], ins[1], b, outs[0]);
                self.gemm_in(index, node.format, gemm, true, 0)
            }
            Op::LinearMap { bias, expr, var } => {
                let b = bias.then(|| ins[2]);
                let gemm = self.linear_gemm(ins[0], ins[1], b, outs[0]);
                let gemm = self.gemm_in(index, node.format, gemm, true, 0);
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
                    fp8: None,
                };
                let mut work = self.gemm_in(index, node.format, dx, true, 0);
                work.extend(self.gemm_in(index, node.format, dw, false, 4));
                if *bias {
                    let k = self.fixed(
                        "bias_grad",
                        "column sums (a bias gradient)",
                        BIAS_GRAD,
                        index,
                    );
                    work.push(Work::Launch(Launch {
                        kernel: k,
                        grid: out_f.div_ceil(32),
                        block: BLOCK,
                        shared_bytes: 0,
                        args: vec![val(dy), val(outs[2]), int(rows), int(out_f)],
                    }));
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
            Op::CrossEntropy => {
                let (rows, vocab) = self.rows(ins[0]);
                let fwd = self.kernel(
                    &format!("cross_entropy_fwd_v{vocab}"),
                    &format!("cross-entropy rows over {vocab} logits"),
                    cross_entropy_fwd_text(vocab),
                    index,
                    0,
                );
                let per_row = Arg::Scratch {
                    slot: 0,
                    bytes: rows * 4,
                };
                let (reduce, args) = match ins.get(2) {
                    None => (
                        self.fixed("mean", "the mean of a vector", MEAN, index),
                        vec![per_row.clone(), val(outs[0]), int(rows)],
                    ),
                    Some(&w) => (
                        self.fixed(
                            "weighted_sum",
                            "the weighted sum of a vector",
                            WEIGHTED_SUM,
                            index,
                        ),
                        vec![per_row.clone(), val(w), val(outs[0]), int(rows)],
                    ),
                };
                vec![
                    row_launch(
                        fwd,
                        rows,
                        vec![val(ins[0]), val(ins[1]), per_row, Arg::ErrorFlag, int(rows)],
                    ),
                    Work::Launch(Launch {
                        kernel: reduce,
                        grid: 1,
                        block: BLOCK,
                        shared_bytes: 0,
                        args,
                    }),
                ]
            }
            Op::CrossEntropyGrad => {
                let (rows, vocab) = self.rows(ins[0]);
                let weight = ins.get(3).copied();
                let (base, what) = match weight {
                    None => ("cross_entropy_bwd", "cross-entropy"),
                    Some(_) => ("cross_entropy_weighted_bwd", "weighted cross-entropy"),
                };
                let bwd = self.kernel(
                    &format!("{base}_v{vocab}"),
                    &format!("{what} gradient over {vocab} logits"),
                    cross_entropy_bwd_text(vocab, weight.is_some()),
                    index,
                    0,
                );
                let mut args = vec![val(ins[0]), val(ins[1]), val(ins[2])];
                args.extend(weight.map(val));
                args.extend([val(outs[0]), int(rows)]);
                vec![row_launch(bwd, rows, args)]
            }
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
/// trainable tensor, with the Program's settings.
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
    let _ = writeln!(
        e.out,
        "// Generated by kiln from the spec {} (batch {}, seq_len {}): the kernels of one\n\
         // training step.\n\
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
        settings.batch,
        settings.seq_len,
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
    }
}

impl Emitter<'_> {
    /// The optimizer's launches: the gradient norm's partial sums over every gradient, then
    /// AdamW on every trainable tensor (`node` numbers past the graph's nodes name them).
    fn optimizer(&mut self, settings: &Settings, outputs: &TrainOutputs) -> Vec<Launch> {
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

/// Rows (query rows, or key rows in the key-side backward) per attention block: one warp each.
const ATTN_ROWS: u64 = 8;

/// The attention kernels' shapes, baked into their text.
#[derive(Clone, Copy)]
struct AttnDims {
    b: u64,
    t: u64,
    h: u64,
    hk: u64,
    dk: u64,
    dv: u64,
}

impl AttnDims {
    /// Keys (or queries) per tile streamed through shared memory: 32, one per lane, unless
    /// the tiles would not fit in 48 KB of static shared memory with room to spare.
    fn tile(&self) -> u64 {
        let floats = |kt: u64| {
            2 * ATTN_ROWS * (self.dk + self.dv)
                + kt * (self.dk + self.dv + 2)
                + 2 * ATTN_ROWS * kt
                + 2 * kt
        };
        if floats(32) * 4 <= 40 * 1024 {
            32
        } else {
            16
        }
    }

    /// Accumulators per lane for `d` dimensions split over the warp's 32 lanes.
    fn per_lane(d: u64) -> u64 {
        d.div_ceil(32)
    }

    fn suffix(&self) -> String {
        format!("h{}_kv{}_dk{}_dv{}", self.h, self.hk, self.dk, self.dv)
    }
}

/// The causal attention forward: one block per 8 query rows of one (batch, head), one warp per
/// row; key and value tiles go through shared memory, each lane scores one key of the tile,
/// and the warp keeps the row's online-softmax state and its output (dimensions split over the
/// lanes) in registers.
fn attention_fwd_text(d: AttnDims, scale: f64) -> String {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let kt = d.tile();
    let acc = AttnDims::per_lane(dv);
    let scale = float_lit(scale);
    let group = h / hk;
    format!(
        "\
// Causal attention, forward (flash-style): o = softmax(scale · q·kᵀ) · v over the keys at or
// before each query, with the row's log-sum-exp kept for the backward pass. Query head h reads
// KV head h / {group}. One block per {ATTN_ROWS} query rows of one (batch, head), a warp per row;
// tiles of {kt} keys through shared memory, one key per lane; online softmax in registers.
// q: f32[B, {t}, {h}, {dk}]; k: f32[B, {t}, {hk}, {dk}]; v: f32[B, {t}, {hk}, {dv}];
// o: f32[B, {t}, {h}, {dv}]; lse: f32[B, {h}, {t}]. scale = {scale}.
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ o, float* __restrict__ lse) {{
    __shared__ float qs[{ATTN_ROWS}][{dk}];
    __shared__ float ks[{kt}][{dk} + 1];
    __shared__ float vs[{kt}][{dv}];
    __shared__ float ps[{ATTN_ROWS}][{kt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bh = blockIdx.x / tiles;
    const long long b = bh / {h}, head = bh % {h}, kv = head / {group};
    const long long t0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long row = t0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = t0 + i / {dk};
        qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
    }}
    float m = -INFINITY, l = 0.0f;
    float acc[{acc}];
#pragma unroll
    for (int i = 0; i < {acc}; ++i) acc[i] = 0.0f;
    const long long last = t0 + {ATTN_ROWS} - 1 < {t} - 1 ? t0 + {ATTN_ROWS} - 1 : {t} - 1;
    for (long long k0 = 0; k0 <= last; k0 += {kt}) {{
        __syncthreads();
        for (int i = threadIdx.x; i < {kt} * {dk}; i += blockDim.x) {{
            const long long key = k0 + i / {dk};
            ks[i / {dk}][i % {dk}] = key < {t} ? k[((b * {t} + key) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
        }}
        for (int i = threadIdx.x; i < {kt} * {dv}; i += blockDim.x) {{
            const long long key = k0 + i / {dv};
            vs[i / {dv}][i % {dv}] = key < {t} ? v[((b * {t} + key) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
        }}
        __syncthreads();
        const long long key = k0 + lane;
        float s = -INFINITY;
        if (lane < {kt} && key <= row && row < {t}) {{
            float dot = 0.0f;
            for (int c = 0; c < {dk}; ++c) dot += qs[warp][c] * ks[lane][c];
            s = dot * {scale};
        }}
        const float m_new = fmaxf(m, kiln_warp_max(s));
        const float shift = m_new == -INFINITY ? 0.0f : m_new;
        const float p = s == -INFINITY ? 0.0f : kiln_softmax_exp(s - shift);
        const float correction = m == -INFINITY ? 0.0f : kiln_softmax_exp(m - shift);
        l = l * correction + kiln_warp_sum(p);
        m = m_new;
        if (lane < {kt}) ps[warp][lane] = p;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            float a = acc[i] * correction;
            if (c < {dv}) {{
                for (int j = 0; j < {kt}; ++j) a += ps[warp][j] * vs[j][c];
            }}
            acc[i] = a;
        }}
        __syncwarp();
    }}
    if (row < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dv}) o[((b * {t} + row) * {h} + head) * {dv} + c] = acc[i] / l;
        }}
        if (lane == 0) lse[(b * {h} + head) * {t} + row] = m + logf(l);
    }}
}}
"
    )
}

/// `delta[b, h, t] = Σ_c do[b, t, h, c] · o[b, t, h, c]`, one thread per row.
fn attention_delta_text(d: AttnDims) -> String {
    let AttnDims { t, h, dv, .. } = d;
    format!(
        "\
// Attention backward, first part: delta[b, h, t] = Σ_c do·o over the {dv} output dimensions of
// each row, which the softmax's backward subtracts. One thread per row.
// o, d_o: f32[B, {t}, {h}, {dv}]; delta: f32[B, {h}, {t}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ o, const float* __restrict__ d_o, float* __restrict__ delta, long long rows) {{
    for (long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x; r < rows;
         r += (long long)gridDim.x * blockDim.x) {{
        const long long b = r / ({h} * {t}), head = (r / {t}) % {h}, row = r % {t};
        const float* orow = o + ((b * {t} + row) * {h} + head) * {dv};
        const float* drow = d_o + ((b * {t} + row) * {h} + head) * {dv};
        float acc = 0.0f;
        for (int c = 0; c < {dv}; ++c) acc += orow[c] * drow[c];
        delta[r] = acc;
    }}
}}
"
    )
}

/// The query gradient: the forward's layout, with `ds = p · (do·v − delta)` per key and
/// `dq = scale · Σ ds · k`.
fn attention_dq_text(d: AttnDims, scale: f64) -> String {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let kt = d.tile();
    let acc = AttnDims::per_lane(dk);
    let scale = float_lit(scale);
    let group = h / hk;
    format!(
        "\
// Attention backward, query gradient: for each query row and each key at or before it,
// p = exp(scale · q·k − lse), ds = p · (do·v − delta), and dq = scale · Σ ds · k. The
// forward's layout: {ATTN_ROWS} query rows per block, a warp per row, {kt} keys per tile.
// q, dq: f32[B, {t}, {h}, {dk}]; k: f32[B, {t}, {hk}, {dk}]; v: f32[B, {t}, {hk}, {dv}];
// d_o: f32[B, {t}, {h}, {dv}]; lse, delta: f32[B, {h}, {t}].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ d_o, const float* __restrict__ delta, float* __restrict__ dq) {{
    __shared__ float qs[{ATTN_ROWS}][{dk}];
    __shared__ float dos[{ATTN_ROWS}][{dv}];
    __shared__ float ks[{kt}][{dk} + 1];
    __shared__ float vs[{kt}][{dv} + 1];
    __shared__ float ds_s[{ATTN_ROWS}][{kt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bh = blockIdx.x / tiles;
    const long long b = bh / {h}, head = bh % {h}, kv = head / {group};
    const long long t0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long row = t0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = t0 + i / {dk};
        qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
    }}
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dv}; i += blockDim.x) {{
        const long long r = t0 + i / {dv};
        dos[i / {dv}][i % {dv}] = r < {t} ? d_o[((b * {t} + r) * {h} + head) * {dv} + i % {dv}] : 0.0f;
    }}
    const float row_lse = row < {t} ? lse[(b * {h} + head) * {t} + row] : 0.0f;
    const float row_delta = row < {t} ? delta[(b * {h} + head) * {t} + row] : 0.0f;
    float acc[{acc}];
#pragma unroll
    for (int i = 0; i < {acc}; ++i) acc[i] = 0.0f;
    const long long last = t0 + {ATTN_ROWS} - 1 < {t} - 1 ? t0 + {ATTN_ROWS} - 1 : {t} - 1;
    for (long long k0 = 0; k0 <= last; k0 += {kt}) {{
        __syncthreads();
        for (int i = threadIdx.x; i < {kt} * {dk}; i += blockDim.x) {{
            const long long key = k0 + i / {dk};
            ks[i / {dk}][i % {dk}] = key < {t} ? k[((b * {t} + key) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
        }}
        for (int i = threadIdx.x; i < {kt} * {dv}; i += blockDim.x) {{
            const long long key = k0 + i / {dv};
            vs[i / {dv}][i % {dv}] = key < {t} ? v[((b * {t} + key) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
        }}
        __syncthreads();
        const long long key = k0 + lane;
        float ds = 0.0f;
        if (lane < {kt} && key <= row && row < {t}) {{
            float s = 0.0f, dp = 0.0f;
            for (int c = 0; c < {dk}; ++c) s += qs[warp][c] * ks[lane][c];
            for (int c = 0; c < {dv}; ++c) dp += dos[warp][c] * vs[lane][c];
            const float p = kiln_softmax_exp(s * {scale} - row_lse);
            ds = p * (dp - row_delta);
        }}
        if (lane < {kt}) ds_s[warp][lane] = ds;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) {{
                float a = acc[i];
                for (int j = 0; j < {kt}; ++j) a += ds_s[warp][j] * ks[j][c];
                acc[i] = a;
            }}
        }}
        __syncwarp();
    }}
    if (row < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) dq[((b * {t} + row) * {h} + head) * {dk} + c] = acc[i] * {scale};
        }}
    }}
}}
"
    )
}

/// The key and value gradients: one block per 8 key rows of one (batch, KV head), a warp per
/// key; query tiles (of every query head reading this KV head) through shared memory.
fn attention_dkdv_text(d: AttnDims, scale: f64) -> String {
    let AttnDims {
        t, h, hk, dk, dv, ..
    } = d;
    let qt = d.tile();
    let acc_k = AttnDims::per_lane(dk);
    let acc_v = AttnDims::per_lane(dv);
    let scale = float_lit(scale);
    let group = h / hk;
    format!(
        "\
// Attention backward, key and value gradients: for each key row and each query at or after it
// (in each of the {group} query heads reading its KV head), p = exp(scale · q·k − lse),
// dv = Σ p · do and dk = scale · Σ p · (do·v − delta) · q. One block per {ATTN_ROWS} key rows
// of one (batch, KV head), a warp per key; tiles of {qt} queries through shared memory.
// q: f32[B, {t}, {h}, {dk}]; k, dk_out: f32[B, {t}, {hk}, {dk}]; v, dv_out: f32[B, {t}, {hk}, {dv}];
// d_o: f32[B, {t}, {h}, {dv}]; lse, delta: f32[B, {h}, {t}].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ d_o, const float* __restrict__ delta, float* __restrict__ dk_out, float* __restrict__ dv_out) {{
    __shared__ float krows[{ATTN_ROWS}][{dk}];
    __shared__ float vrows[{ATTN_ROWS}][{dv}];
    __shared__ float qs[{qt}][{dk} + 1];
    __shared__ float dos[{qt}][{dv} + 1];
    __shared__ float lse_s[{qt}], delta_s[{qt}];
    __shared__ float p_s[{ATTN_ROWS}][{qt}], ds_s[{ATTN_ROWS}][{qt}];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long tiles = ({t} + {ATTN_ROWS} - 1) / {ATTN_ROWS};
    const long long bkv = blockIdx.x / tiles;
    const long long b = bkv / {hk}, kv = bkv % {hk};
    const long long k0 = (blockIdx.x % tiles) * {ATTN_ROWS};
    const long long key = k0 + warp;
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dk}; i += blockDim.x) {{
        const long long r = k0 + i / {dk};
        krows[i / {dk}][i % {dk}] = r < {t} ? k[((b * {t} + r) * {hk} + kv) * {dk} + i % {dk}] : 0.0f;
    }}
    for (int i = threadIdx.x; i < {ATTN_ROWS} * {dv}; i += blockDim.x) {{
        const long long r = k0 + i / {dv};
        vrows[i / {dv}][i % {dv}] = r < {t} ? v[((b * {t} + r) * {hk} + kv) * {dv} + i % {dv}] : 0.0f;
    }}
    float acc_k[{acc_k}], acc_v[{acc_v}];
#pragma unroll
    for (int i = 0; i < {acc_k}; ++i) acc_k[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < {acc_v}; ++i) acc_v[i] = 0.0f;
    for (int g = 0; g < {group}; ++g) {{
        const long long head = kv * {group} + g;
        for (long long q0 = k0; q0 < {t}; q0 += {qt}) {{
            __syncthreads();
            for (int i = threadIdx.x; i < {qt} * {dk}; i += blockDim.x) {{
                const long long r = q0 + i / {dk};
                qs[i / {dk}][i % {dk}] = r < {t} ? q[((b * {t} + r) * {h} + head) * {dk} + i % {dk}] : 0.0f;
            }}
            for (int i = threadIdx.x; i < {qt} * {dv}; i += blockDim.x) {{
                const long long r = q0 + i / {dv};
                dos[i / {dv}][i % {dv}] = r < {t} ? d_o[((b * {t} + r) * {h} + head) * {dv} + i % {dv}] : 0.0f;
            }}
            for (int i = threadIdx.x; i < {qt}; i += blockDim.x) {{
                const long long r = q0 + i;
                lse_s[i] = r < {t} ? lse[(b * {h} + head) * {t} + r] : 0.0f;
                delta_s[i] = r < {t} ? delta[(b * {h} + head) * {t} + r] : 0.0f;
            }}
            __syncthreads();
            const long long query = q0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (lane < {qt} && key < {t} && query < {t} && query >= key) {{
                float s = 0.0f, dp = 0.0f;
                for (int c = 0; c < {dk}; ++c) s += qs[lane][c] * krows[warp][c];
                for (int c = 0; c < {dv}; ++c) dp += dos[lane][c] * vrows[warp][c];
                p = kiln_softmax_exp(s * {scale} - lse_s[lane]);
                ds = p * (dp - delta_s[lane]);
            }}
            if (lane < {qt}) {{
                p_s[warp][lane] = p;
                ds_s[warp][lane] = ds;
            }}
            __syncwarp();
#pragma unroll
            for (int i = 0; i < {acc_v}; ++i) {{
                const int c = lane + 32 * i;
                if (c < {dv}) {{
                    float a = acc_v[i];
                    for (int j = 0; j < {qt}; ++j) a += p_s[warp][j] * dos[j][c];
                    acc_v[i] = a;
                }}
            }}
#pragma unroll
            for (int i = 0; i < {acc_k}; ++i) {{
                const int c = lane + 32 * i;
                if (c < {dk}) {{
                    float a = acc_k[i];
                    for (int j = 0; j < {qt}; ++j) a += ds_s[warp][j] * qs[j][c];
                    acc_k[i] = a;
                }}
            }}
            __syncwarp();
        }}
    }}
    if (key < {t}) {{
#pragma unroll
        for (int i = 0; i < {acc_k}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dk}) dk_out[((b * {t} + key) * {hk} + kv) * {dk} + c] = acc_k[i] * {scale};
        }}
#pragma unroll
        for (int i = 0; i < {acc_v}; ++i) {{
            const int c = lane + 32 * i;
            if (c < {dv}) dv_out[((b * {t} + key) * {hk} + kv) * {dv} + c] = acc_v[i];
        }}
    }}
}}
"
    )
}

impl Emitter<'_> {
    fn attn_dims(&self, node: &Node) -> AttnDims {
        let (q, k, v) = (
            self.shape(node.inputs[0]),
            self.shape(node.inputs[1]),
            self.shape(node.inputs[2]),
        );
        AttnDims {
            b: q[0],
            t: q[1],
            h: q[2],
            hk: k[2],
            dk: q[3],
            dv: v[3],
        }
    }

    fn attention(&mut self, index: usize, node: &Node, scale: f64) -> Vec<Work> {
        let d = self.attn_dims(node);
        let name = self.kernel(
            &format!("attention_fwd_{}", d.suffix()),
            "causal attention forward (flash-style, online softmax)",
            attention_fwd_text(d, scale),
            index,
            0,
        );
        let grid = d.b * d.h * d.t.div_ceil(ATTN_ROWS);
        let args = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&v| val(v))
            .collect();
        vec![Work::Launch(Launch {
            kernel: name,
            grid,
            block: BLOCK,
            shared_bytes: 0,
            args,
        })]
    }

    /// `(q, k, v, o, lse, do) -> (dq, dk, dv)`: delta, then the query gradient and the key and
    /// value gradients, each without atomics.
    fn attention_grad(&mut self, index: usize, node: &Node, scale: f64) -> Vec<Work> {
        let d = self.attn_dims(node);
        let (q, k, v, o, lse, d_o) = (
            node.inputs[0],
            node.inputs[1],
            node.inputs[2],
            node.inputs[3],
            node.inputs[4],
            node.inputs[5],
        );
        let (dq, dk, dv) = (node.outputs[0], node.outputs[1], node.outputs[2]);
        let rows = d.b * d.h * d.t;
        let delta = Arg::Scratch {
            slot: 0,
            bytes: rows * 4,
        };
        let delta_k = self.kernel(
            &format!("attention_bwd_delta_h{}_dv{}", d.h, d.dv),
            "attention backward: delta = rowsum(do · o)",
            attention_delta_text(d),
            index,
            0,
        );
        let dq_k = self.kernel(
            &format!("attention_bwd_dq_{}", d.suffix()),
            "attention backward: query gradient",
            attention_dq_text(d, scale),
            index,
            0,
        );
        let dkdv_k = self.kernel(
            &format!("attention_bwd_dkdv_{}", d.suffix()),
            "attention backward: key and value gradients",
            attention_dkdv_text(d, scale),
            index,
            0,
        );
        vec![
            elementwise_launch(
                delta_k,
                rows,
                vec![val(o), val(d_o), delta.clone(), int(rows)],
            ),
            Work::Launch(Launch {
                kernel: dq_k,
                grid: d.b * d.h * d.t.div_ceil(ATTN_ROWS),
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    val(q),
                    val(k),
                    val(v),
                    val(lse),
                    val(d_o),
                    delta.clone(),
                    val(dq),
                ],
            }),
            Work::Launch(Launch {
                kernel: dkdv_k,
                grid: d.b * d.hk * d.t.div_ceil(ATTN_ROWS),
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    val(q),
                    val(k),
                    val(v),
                    val(lse),
                    val(d_o),
                    delta,
                    val(dk),
                    val(dv),
                ],
            }),
        ]
    }
}

/// The router, fused: logits `x·wᵀ` (a lane per expert), the score function, and the selection
/// exactly as the CPU backend makes it (keys `score + bias` with NaN lowest, group scores, the
/// kept groups, top-k by descending key then ascending index, weights normalized and scaled),
/// the selection sequential in lane 0 of the token's warp.
fn router_fwd_text(spec: &crate::ir::RouterSpec, d: u64, e: u64) -> String {
    use crate::model::{GroupScore, ScoreFunc, Selection};
    let k = spec.top_k;
    let per_lane = e.div_ceil(32);
    let score = match spec.score {
        ScoreFunc::Sigmoid => "\
        for (int j = 0; j < E; ++j) s[j] = 1.0f / (1.0f + expf(-s[j]));"
            .to_string(),
        ScoreFunc::Softmax => "\
        float mx = -INFINITY;
        for (int j = 0; j < E; ++j) mx = fmaxf(mx, s[j]);
        float total = 0.0f;
        for (int j = 0; j < E; ++j) { s[j] = expf(s[j] - mx); total += s[j]; }
        for (int j = 0; j < E; ++j) s[j] = s[j] / total;"
            .to_string(),
    };
    let groups = if spec.select == Selection::GroupLimited && spec.groups > 0 {
        let size = e / spec.groups;
        let group_key = match (spec.group_score, size >= 2) {
            (GroupScore::Top2Sum, true) => "first + second",
            _ => "first",
        };
        format!(
            "\
        // Group scores from each group's best (two best) keys; keep the best {kept} groups
        // (descending score, then ascending index); experts of the others get key 0.0.
        // (Group scores add in double, as the CPU backend's f64 keys do.)
        double* gkey = gkey_all[warp];
        bool* kept = kept_all[warp];
        for (int g = 0; g < {g}; ++g) {{
            double first = -INFINITY, second = -INFINITY;
            for (int j = g * {size}; j < (g + 1) * {size}; ++j) {{
                const double v = key[j];
                if (v > first) {{ second = first; first = v; }} else if (v > second) {{ second = v; }}
            }}
            gkey[g] = {group_key};
        }}
        for (int g = 0; g < {g}; ++g) kept[g] = false;
        for (int r = 0; r < {kept}; ++r) {{
            int best = -1;
            for (int g = 0; g < {g}; ++g)
                if (!kept[g] && (best < 0 || gkey[g] > gkey[best])) best = g;
            kept[best] = true;
        }}
        for (int j = 0; j < E; ++j) if (!kept[j / {size}]) key[j] = 0.0f;
",
            g = spec.groups,
            kept = spec.groups_kept.min(spec.groups),
        )
    } else {
        String::new()
    };
    let normalize = if spec.normalize {
        "        const float denom = sum + 1e-20f;\n        for (int r = 0; r < K; ++r) weights[token * K + r] = weights[token * K + r] / denom * SCALE;\n"
    } else {
        "        for (int r = 0; r < K; ++r) weights[token * K + r] *= SCALE;\n"
    };
    format!(
        "\
// The router, fused: logits = x·wᵀ (one lane per expert), scores = {score_name}(logits), and the
// choice of {k} experts among {e} ranking scores + bias{grouped}; weights are the chosen
// experts' unbiased scores{normalized} times {scale}. A warp per token; lane 0 selects.
// x: f32[n, {d}]; w: f32[{e}, {d}]; bias: f32[{e}]; weights: f32[n, {k}]; experts: u32[n, {k}];
// scores: f32[n, {e}].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ weights, unsigned* __restrict__ experts, float* __restrict__ scores, long long n) {{
    constexpr int E = {e}, K = {k};
    constexpr float SCALE = {scale};
    __shared__ float s_all[{ATTN_ROWS}][E];
    __shared__ float key_all[{ATTN_ROWS}][E];
{group_shared}
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long token = blockIdx.x * {ATTN_ROWS}LL + warp;
    float* s = s_all[warp];
    float* key = key_all[warp];
#pragma unroll
    for (int i = 0; i < {per_lane}; ++i) {{
        const int j = lane + 32 * i;
        if (j < E && token < n) {{
            float dot = 0.0f;
            for (int c = 0; c < {d}; ++c) dot += x[token * {d} + c] * w[(long long)j * {d} + c];
            s[j] = dot;
        }}
    }}
    __syncwarp();
    if (lane == 0 && token < n) {{
{score}
        for (int j = 0; j < E; ++j) {{
            const float v = s[j] + bias[j];
            key[j] = v != v ? -INFINITY : v + 0.0f;
        }}
{groups}        float sum = 0.0f;
        // Top-k by descending key, then ascending index; a chosen expert's key becomes NaN
        // (no key is NaN before), so it is never chosen again.
        for (int r = 0; r < K; ++r) {{
            int best = -1;
            for (int j = 0; j < E; ++j)
                if (key[j] == key[j] && (best < 0 || key[j] > key[best])) best = j;
            experts[token * K + r] = (unsigned)best;
            weights[token * K + r] = s[best];
            sum += s[best];
            key[best] = NAN;
        }}
{normalize}        for (int j = 0; j < E; ++j) scores[token * E + j] = s[j];
    }}
}}
",
        score_name = match spec.score {
            ScoreFunc::Sigmoid => "sigmoid",
            ScoreFunc::Softmax => "softmax",
        },
        grouped = if groups.is_empty() {
            String::new()
        } else {
            format!(" within the best {} of {} groups", spec.groups_kept, spec.groups)
        },
        normalized = if spec.normalize { ", normalized (+1e-20)," } else { "" },
        group_shared = if spec.select == Selection::GroupLimited && spec.groups > 0 {
            format!(
                "    __shared__ double gkey_all[{ATTN_ROWS}][{g}];\n    __shared__ bool kept_all[{ATTN_ROWS}][{g}];",
                g = spec.groups
            )
        } else {
            String::new()
        },
        scale = float_lit(spec.scale),
    )
}

/// The router's backward, first part: each token's logit gradient from the weights' gradient
/// (through the scale, the normalization and the gather) and the scores' own, through the
/// score function.
fn router_dlogits_text(spec: &crate::ir::RouterSpec, e: u64) -> String {
    use crate::model::ScoreFunc;
    let k = spec.top_k;
    let gather = if spec.normalize {
        "\
        float sum = 0.0f, dot = 0.0f;
        for (int r = 0; r < K; ++r) {
            const float g = s[experts[token * K + r]];
            sum += g;
            dot += d_weights[token * K + r] * g;
        }
        const float denom = sum + 1e-20f;
        for (int r = 0; r < K; ++r)
            dl[experts[token * K + r]] += SCALE * (d_weights[token * K + r] / denom - dot / (denom * denom));"
    } else {
        "\
        for (int r = 0; r < K; ++r) dl[experts[token * K + r]] += SCALE * d_weights[token * K + r];"
    };
    let jacobian = match spec.score {
        ScoreFunc::Sigmoid => "        for (int j = 0; j < E; ++j) dl[j] *= s[j] * (1.0f - s[j]);",
        ScoreFunc::Softmax => {
            "\
        float sdot = 0.0f;
        for (int j = 0; j < E; ++j) sdot += dl[j] * s[j];
        for (int j = 0; j < E; ++j) dl[j] = s[j] * (dl[j] - sdot);"
        }
    };
    format!(
        "\
// The router's backward, first part: d_logits[t, :] from d_scores[t, :] plus the chosen
// experts' share of d_weights[t, :] (through the scale and the normalization), times the
// score function's Jacobian. One thread per token.
// scores, d_scores, d_logits: f32[n, {e}]; experts: u32[n, {k}]; d_weights: f32[n, {k}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ scores, const unsigned* __restrict__ experts, const float* __restrict__ d_weights, const float* __restrict__ d_scores, float* __restrict__ d_logits, long long n) {{
    constexpr int E = {e}, K = {k};
    constexpr float SCALE = {scale};
    for (long long token = blockIdx.x * (long long)blockDim.x + threadIdx.x; token < n;
         token += (long long)gridDim.x * blockDim.x) {{
        const float* s = scores + token * E;
        float* dl = d_logits + token * E;
        for (int j = 0; j < E; ++j) dl[j] = d_scores[token * E + j];
{gather}
{jacobian}
    }}
}}
",
        scale = float_lit(spec.scale),
    )
}

/// `dx = d_logits · w` and `dw = d_logitsᵀ · x` for the router (small: `e` columns), one
/// thread per output element, each summing in a fixed order.
const ROUTER_DX: &str = "\
// The router's backward, input gradient: dx[t, c] = Σ_j d_logits[t, j] · w[j, c].
// d_logits: f32[n, e]; w: f32[e, d]; dx: f32[n, d].
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ d_logits, const float* __restrict__ w, float* __restrict__ dx, long long n, long long e, long long d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * d;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / d, c = i % d;
        float acc = 0.0f;
        for (long long j = 0; j < e; ++j) acc += d_logits[t * e + j] * w[j * d + c];
        dx[i] = acc;
    }
}
";

const ROUTER_DW: &str = "\
// The router's backward, weight gradient: dw[j, c] = Σ_t d_logits[t, j] · x[t, c].
// d_logits: f32[n, e]; x: f32[n, d]; dw: f32[e, d].
extern \"C\" __global__ void @KERNEL@(const float* __restrict__ d_logits, const float* __restrict__ x, float* __restrict__ dw, long long n, long long e, long long d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < e * d;
         i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / d, c = i % d;
        float acc = 0.0f;
        for (long long t = 0; t < n; ++t) acc += d_logits[t * e + j] * x[t * d + c];
        dw[i] = acc;
    }
}
";

/// The sequence-wise balance loss, forward or backward (`grad`): a block per sequence counts
/// its routed (token, slot) pairs per expert in shared memory, then each thread takes tokens.
fn balance_text(t: u64, e: u64, k: u64, alpha: f64, batch: u64, grad: bool) -> String {
    let alpha_l = float_lit(alpha);
    let counts = format!(
        "\
    __shared__ unsigned counts[{e}];
    __shared__ float f[{e}];
    const long long b = blockIdx.x;
    for (int j = threadIdx.x; j < {e}; j += blockDim.x) counts[j] = 0;
    __syncthreads();
    for (long long i = threadIdx.x; i < {t} * {k}; i += blockDim.x) {{
        const unsigned x = experts[b * {t} * {k} + i];
        if (x < {e}) atomicAdd(&counts[x], 1u);
    }}
    __syncthreads();
    // f_i = E / (k·T) · count_i
    for (int j = threadIdx.x; j < {e}; j += blockDim.x) f[j] = (float)counts[j] * ({e}.0f / ({k}.0f * {t}.0f));
    __syncthreads();"
    );
    if grad {
        format!(
            "\
// The sequence-wise balance loss, backward: with Z = Σ_j s[t, j],
// d_scores[b, t, m] = dloss · alpha/(B·T) · (f_m / Z − Σ_i f_i·s[t, i] / Z²). A block per
// sequence (counts in shared memory), a thread per token.
// scores, d_scores: f32[B, {t}, {e}]; experts: u32[B, {t}, {k}]; dloss: f32[1]. alpha = {alpha_l}.
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ scores, const unsigned* __restrict__ experts, const float* __restrict__ dloss, float* __restrict__ d_scores) {{
{counts}
    const float c = dloss[0] * ({alpha_l} / ({batch}.0f * {t}.0f));
    for (long long tok = threadIdx.x; tok < {t}; tok += blockDim.x) {{
        const float* s = scores + (b * {t} + tok) * {e};
        float* ds = d_scores + (b * {t} + tok) * {e};
        float z = 0.0f, fs = 0.0f;
        for (int j = 0; j < {e}; ++j) {{ z += s[j]; fs += f[j] * s[j]; }}
        const float shift = fs / (z * z);
        for (int j = 0; j < {e}; ++j) ds[j] = c * (f[j] / z - shift);
    }}
}}
"
        )
    } else {
        format!(
            "\
// The sequence-wise balance loss, forward: per sequence alpha · mean over tokens of
// Σ_i f_i · s[t, i] / Σ_j s[t, j], with f_i = E/(k·T) · (pairs routed to i); the mean over
// sequences follows (`mean`). A block per sequence, a thread per token.
// scores: f32[B, {t}, {e}]; experts: u32[B, {t}, {k}]; per_seq: f32[B]. alpha = {alpha_l}.
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const float* __restrict__ scores, const unsigned* __restrict__ experts, float* __restrict__ per_seq) {{
{counts}
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long tok = threadIdx.x; tok < {t}; tok += blockDim.x) {{
        const float* s = scores + (b * {t} + tok) * {e};
        float z = 0.0f, fs = 0.0f;
        for (int j = 0; j < {e}; ++j) {{ z += s[j]; fs += f[j] * s[j]; }}
        acc += fs / z;
    }}
    acc = kiln_block_sum(acc, scratch);
    if (threadIdx.x == 0) per_seq[b] = acc / {t}.0f * {alpha_l};
}}
"
        )
    }
}

impl Emitter<'_> {
    fn router(&mut self, index: usize, node: &Node, spec: &crate::ir::RouterSpec) -> Vec<Work> {
        let (n, d) = self.rows(node.inputs[0]);
        let e = self.shape(node.inputs[1])[0];
        let name = self.kernel(
            &format!("router_fwd_e{e}_k{}_d{d}", spec.top_k),
            "the router: logits, scores and the choice of experts",
            router_fwd_text(spec, d, e),
            index,
            0,
        );
        let args = node
            .inputs
            .iter()
            .chain(&node.outputs)
            .map(|&v| val(v))
            .chain([int(n)])
            .collect();
        vec![Work::Launch(Launch {
            kernel: name,
            grid: n.div_ceil(ATTN_ROWS).max(1),
            block: BLOCK,
            shared_bytes: 0,
            args,
        })]
    }

    /// `(x, w, bias, weights, experts, scores, d_weights, d_scores) -> (dx, dw)`.
    fn router_grad(
        &mut self,
        index: usize,
        node: &Node,
        spec: &crate::ir::RouterSpec,
    ) -> Vec<Work> {
        let (n, d) = self.rows(node.inputs[0]);
        let e = self.shape(node.inputs[1])[0];
        let dl_k = self.kernel(
            &format!("router_bwd_dlogits_e{e}_k{}", spec.top_k),
            "the router's logit gradient",
            router_dlogits_text(spec, e),
            index,
            0,
        );
        let dx_k = self.fixed(
            "router_bwd_dx",
            "the router's input gradient",
            ROUTER_DX,
            index,
        );
        let dw_k = self.fixed(
            "router_bwd_dw",
            "the router's weight gradient",
            ROUTER_DW,
            index,
        );
        let dl = Arg::Scratch {
            slot: 0,
            bytes: n * e * 4,
        };
        let i = &node.inputs;
        vec![
            elementwise_launch(
                dl_k,
                n,
                vec![
                    val(i[5]),
                    val(i[4]),
                    val(i[6]),
                    val(i[7]),
                    dl.clone(),
                    int(n),
                ],
            ),
            elementwise_launch(
                dx_k,
                n * d,
                vec![
                    dl.clone(),
                    val(i[1]),
                    val(node.outputs[0]),
                    int(n),
                    int(e),
                    int(d),
                ],
            ),
            elementwise_launch(
                dw_k,
                e * d,
                vec![dl, val(i[0]), val(node.outputs[1]), int(n), int(e), int(d)],
            ),
        ]
    }

    fn balance(
        &mut self,
        index: usize,
        node: &Node,
        alpha: f64,
        top_k: u64,
        grad: bool,
    ) -> Vec<Work> {
        let s = self.shape(node.inputs[0]);
        let (b, t, e) = (s[0], s[1], s[2]);
        let dir = if grad { "bwd" } else { "fwd" };
        let name = self.kernel(
            &format!("balance_loss_{dir}_t{t}_e{e}_k{top_k}"),
            "the sequence-wise balance loss",
            balance_text(t, e, top_k, alpha, b, grad),
            index,
            0,
        );
        let launch = |args| {
            Work::Launch(Launch {
                kernel: name.clone(),
                grid: b.max(1),
                block: BLOCK,
                shared_bytes: 0,
                args,
            })
        };
        if grad {
            vec![launch(vec![
                val(node.inputs[0]),
                val(node.inputs[1]),
                val(node.inputs[2]),
                val(node.outputs[0]),
            ])]
        } else {
            let per_seq = Arg::Scratch {
                slot: 0,
                bytes: b * 4,
            };
            let mean = self.fixed("mean", "the mean of a vector", MEAN, index);
            vec![
                launch(vec![
                    val(node.inputs[0]),
                    val(node.inputs[1]),
                    per_seq.clone(),
                ]),
                Work::Launch(Launch {
                    kernel: mean,
                    grid: 1,
                    block: BLOCK,
                    shared_bytes: 0,
                    args: vec![per_seq, val(node.outputs[0]), int(b)],
                }),
            ]
        }
    }
}

/// An expert activation compiled over its operands (`gate, up`, or `x` ungated), and its
/// text for comments.
struct ExpertAct {
    compiled: Compiled,
    text: String,
}

impl ExpertAct {
    fn of(act: &Expr, gated: bool) -> Self {
        let vars: &[&str] = if gated { &["gate", "up"] } else { &["x"] };
        ExpertAct {
            compiled: act
                .compile(vars)
                .expect("a verified expert activation compiles"),
            text: comment_text(&act.to_string()),
        }
    }
}

/// The shapes of an `experts` node, baked into its kernels.
#[derive(Clone, Copy)]
struct MoeDims {
    /// Tokens, model width, slots per token, experts, expert hidden width.
    n: u64,
    d: u64,
    k: u64,
    e: u64,
    h: u64,
    gated: bool,
}

impl MoeDims {
    fn suffix(&self) -> String {
        format!("e{}_k{}_d{}_h{}", self.e, self.k, self.d, self.h)
    }
}

/// Sorts the (token, slot) pairs by expert, stably: `offsets[e]..offsets[e + 1]` are expert
/// `e`'s rows, `perm[row]` is the pair at a sorted row and `row_of[pair]` its inverse. One
/// block; thread `e` places expert `e`'s pairs in pair order. An id outside the experts sets
/// *error = 3 and goes nowhere.
fn moe_sort_text(m: MoeDims) -> String {
    let MoeDims { e, k, .. } = m;
    format!(
        "\
// Sorts the (token, slot) pairs by expert, stably (counting sort): offsets[e]..offsets[e + 1]
// are expert e's rows, perm[row] the pair at a sorted row, row_of[pair] its row. One block.
// experts: u32[n, {k}]; offsets: i32[{e} + 1]; perm, row_of: i32[n · {k}].
extern \"C\" __global__ void __launch_bounds__({BLOCK}) {NAME}(const unsigned* __restrict__ experts, int* __restrict__ offsets, int* __restrict__ perm, int* __restrict__ row_of, int* __restrict__ error, long long n) {{
    __shared__ int counts[{e}];
    const long long pairs = n * {k};
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        int c = 0;
        for (long long p = 0; p < pairs; ++p) c += experts[p] == (unsigned)x;
        counts[x] = c;
    }}
    if (threadIdx.x == 0) {{
        for (long long p = 0; p < pairs; ++p) {{
            if (experts[p] >= {e}) {{ *error = 3; row_of[p] = -1; }}
        }}
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
        int acc = 0;
        for (int x = 0; x < {e}; ++x) {{ offsets[x] = acc; acc += counts[x]; }}
        offsets[{e}] = acc;
    }}
    __syncthreads();
    for (int x = threadIdx.x; x < {e}; x += blockDim.x) {{
        int row = offsets[x];
        for (long long p = 0; p < pairs; ++p) {{
            if (experts[p] == (unsigned)x) {{ perm[row] = (int)p; row_of[p] = row; ++row; }}
        }}
    }}
}}
"
    )
}

/// The expert hidden layer for every sorted row: `gate = x·W_gate[e]ᵀ`, `up = x·W_up[e]ᵀ` and
/// `a = act(gate, up)`, one thread per (row, hidden unit).
fn moe_hidden_text(m: MoeDims, act: &Compiled, act_text: &str) -> String {
    let MoeDims { k, d, h, gated, .. } = m;
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["g".into(), "u".into()]
    } else {
        vec!["u".into()]
    };
    let y = expr_forward(act, &inputs, "        ", &mut body);
    let (gate_param, gate_out, gate_dot) = if gated {
        (
            "const float* __restrict__ w_gate, ",
            "float* __restrict__ gate, ",
            format!(
                "        float g = 0.0f;\n        for (int c = 0; c < {d}; ++c) g += xr[c] * w_gate[(e * {h} + i) * {d} + c];\n        gate[r * {h} + i] = g;\n"
            ),
        )
    } else {
        ("", "", String::new())
    };
    format!(
        "\
// The routed experts' hidden layer, one thread per (sorted row, hidden unit): for the row's
// token x and expert e, {}up = x·W_up[e]ᵀ and a = {act_text}.
// x: f32[n, {d}]; experts: u32[n, {k}]; w_gate?, w_up: f32[E, {h}, {d}]; gate?, up, a: f32[n · {k}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ x, const unsigned* __restrict__ experts, const int* __restrict__ perm, {gate_param}const float* __restrict__ w_up, {gate_out}float* __restrict__ up, float* __restrict__ a, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {h};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {h}, i = idx % {h};
        const long long pair = perm[r];
        const long long e = experts[pair];
        const float* xr = x + (pair / {k}) * {d};
{gate_dot}        float u = 0.0f;
        for (int c = 0; c < {d}; ++c) u += xr[c] * w_up[(e * {h} + i) * {d} + c];
        up[r * {h} + i] = u;
{body}        a[r * {h} + i] = {y};
    }}
}}
",
        if gated { "gate = x·W_gate[e]ᵀ, " } else { "" }
    )
}

/// `out[row, c] = Σ_i a[row, i] · W_down[e][c, i]`, one thread per (sorted row, column).
fn moe_down_text(m: MoeDims) -> String {
    let MoeDims { k, d, h, .. } = m;
    format!(
        "\
// The routed experts' down projection, one thread per (sorted row, output column):
// out[row, c] = Σ_i a[row, i] · W_down[e][c, i].
// a: f32[n · {k}, {h}]; w_down: f32[E, {d}, {h}]; out: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ a, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_down, float* __restrict__ out, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += a[r * {h} + i] * w_down[(e * {d} + c) * {h} + i];
        out[idx] = acc;
    }}
}}
"
    )
}

/// `y[t, c] = Σ_slot weights[t, slot] · out[row_of[t, slot], c]`, in slot order.
fn moe_combine_text(m: MoeDims) -> String {
    let MoeDims { k, d, .. } = m;
    format!(
        "\
// Combines each token's experts in slot order: y[t, c] = Σ_j weights[t, j] · out[row_of[t, j], c].
// weights: f32[n, {k}]; out: f32[n · {k}, {d}]; y: f32[n, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ weights, const int* __restrict__ row_of, const float* __restrict__ out, float* __restrict__ y, long long n) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += weights[t * {k} + j] * out[(long long)r * {d} + c];
        }}
        y[idx] = acc;
    }}
}}
"
    )
}

/// The experts' backward kernels (after the forward's sort, hidden layer and down projection
/// ran again): the weights' gradient, the weighted output gradient, the hidden gradient
/// through the activation, the input gradient, and the weight gradients per expert, each
/// output element summed by one thread in a fixed order.
fn moe_bwd_texts(m: MoeDims, act: &Compiled, act_text: &str) -> Vec<(&'static str, String)> {
    let MoeDims { k, d, h, gated, .. } = m;
    let dweights = format!(
        "\
// Experts backward: d_weights[t, j] = dy[t, :] · out[row_of[t, j], :], one thread per pair.
// dy: f32[n, {d}]; out: f32[n · {k}, {d}]; d_weights: f32[n, {k}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dy, const int* __restrict__ row_of, const float* __restrict__ out, float* __restrict__ d_weights, long long n) {{
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < n * {k};
         p += (long long)gridDim.x * blockDim.x) {{
        const int r = row_of[p];
        float acc = 0.0f;
        if (r >= 0) for (int c = 0; c < {d}; ++c) acc += dy[(p / {k}) * {d} + c] * out[(long long)r * {d} + c];
        d_weights[p] = acc;
    }}
}}
"
    );
    let gout = format!(
        "\
// Experts backward: the gradient of each sorted row's down output, weights[pair] · dy[token].
// weights: f32[n, {k}]; dy: f32[n, {d}]; gout: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ weights, const int* __restrict__ perm, const float* __restrict__ dy, float* __restrict__ gout, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long pair = perm[r];
        gout[idx] = weights[pair] * dy[(pair / {k}) * {d} + c];
    }}
}}
"
    );
    let mut body = String::new();
    let inputs: Vec<String> = if gated {
        vec!["gate[r * H + i]".into(), "up[r * H + i]".into()]
    } else {
        vec!["up[r * H + i]".into()]
    };
    expr_gradient(act, &inputs, "da", "        ", &mut body);
    let stores = if gated {
        "        dg[r * H + i] = d0;\n        du[r * H + i] = d1;\n"
    } else {
        "        du[r * H + i] = d0;\n"
    };
    let da = format!(
        "\
// Experts backward: da[row, i] = Σ_c gout[row, c] · W_down[e][c, i], then through
// a = {act_text} to the gradients of the pre-activations{}.
// gout: f32[n · {k}, {d}]; w_down: f32[E, {d}, {h}]; gate?, up, dg?, du: f32[n · {k}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ gout, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_down, const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ dg, float* __restrict__ du, long long rows) {{
    constexpr long long H = {h};
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * H;
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / H, i = idx % H;
        const long long e = experts[perm[r]];
        float da = 0.0f;
        for (int c = 0; c < {d}; ++c) da += gout[r * {d} + c] * w_down[(e * {d} + c) * H + i];
{body}{stores}    }}
}}
",
        if gated { " (gate and up)" } else { "" }
    );
    let gate_term = if gated {
        "dg[r * {h} + i] * w_gate[(e * {h} + i) * {d} + c] + "
            .replace("{h}", &h.to_string())
            .replace("{d}", &d.to_string())
    } else {
        String::new()
    };
    let dxs = format!(
        "\
// Experts backward: each sorted row's input gradient,
// dxs[row, c] = Σ_i {}du[row, i] · W_up[e][i, c].
// dg?, du: f32[n · {k}, {h}]; w_gate?, w_up: f32[E, {h}, {d}]; dxs: f32[n · {k}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dg, const float* __restrict__ du, const unsigned* __restrict__ experts, const int* __restrict__ perm, const float* __restrict__ w_gate, const float* __restrict__ w_up, float* __restrict__ dxs, long long rows) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < rows * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long r = idx / {d}, c = idx % {d};
        const long long e = experts[perm[r]];
        float acc = 0.0f;
        for (int i = 0; i < {h}; ++i) acc += {gate_term}du[r * {h} + i] * w_up[(e * {h} + i) * {d} + c];
        dxs[idx] = acc;
    }}
}}
",
        if gated { "dg[row, i] · W_gate[e][i, c] + " } else { "" }
    );
    let dx = format!(
        "\
// Experts backward: dx[t, c] = Σ_j dxs[row_of[t, j], c], in slot order.
// dxs: f32[n · {k}, {d}]; dx: f32[n, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ dxs, const int* __restrict__ row_of, float* __restrict__ dx, long long n) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long t = idx / {d}, c = idx % {d};
        float acc = 0.0f;
        for (int j = 0; j < {k}; ++j) {{
            const int r = row_of[t * {k} + j];
            if (r >= 0) acc += dxs[(long long)r * {d} + c];
        }}
        dx[idx] = acc;
    }}
}}
"
    );
    let dw_down = format!(
        "\
// Experts backward: dW_down[e][c, i] = Σ over expert e's rows of gout[row, c] · a[row, i].
// gout: f32[n · {k}, {d}]; a: f32[n · {k}, {h}]; dw_down: f32[E, {d}, {h}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ gout, const float* __restrict__ a, const int* __restrict__ offsets, float* __restrict__ dw_down, long long experts) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < experts * {d} * {h};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long e = idx / ({d} * {h}), c = (idx / {h}) % {d}, i = idx % {h};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += gout[(long long)r * {d} + c] * a[(long long)r * {h} + i];
        dw_down[idx] = acc;
    }}
}}
"
    );
    let dw_in = format!(
        "\
// Experts backward: dW[e][i, c] = Σ over expert e's rows of g[row, i] · x[token(row), c], for
// the up projection (g = du) or the gate (g = dg).
// g: f32[n · {k}, {h}]; x: f32[n, {d}]; dw: f32[E, {h}, {d}].
extern \"C\" __global__ void {NAME}(const float* __restrict__ g, const float* __restrict__ x, const int* __restrict__ perm, const int* __restrict__ offsets, float* __restrict__ dw, long long experts) {{
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < experts * {h} * {d};
         idx += (long long)gridDim.x * blockDim.x) {{
        const long long e = idx / ({h} * {d}), i = (idx / {d}) % {h}, c = idx % {d};
        float acc = 0.0f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) acc += g[(long long)r * {h} + i] * x[(perm[r] / {k}) * {d} + c];
        dw[idx] = acc;
    }}
}}
"
    );
    vec![
        ("dweights", dweights),
        ("gout", gout),
        ("da", da),
        ("dxs", dxs),
        ("dx", dx),
        ("dw_down", dw_down),
        ("dw_in", dw_in),
    ]
}

impl Emitter<'_> {
    fn moe_dims(&self, node: &Node, gated: bool) -> MoeDims {
        let (n, d) = self.rows(node.inputs[0]);
        let k = self.shape(node.inputs[1])[1];
        let up = self.shape(node.inputs[if gated { 4 } else { 3 }]);
        MoeDims {
            n,
            d,
            k,
            e: up[0],
            h: up[1],
            gated,
        }
    }

    /// The sort, hidden layer and down projection that forward and backward both run; returns
    /// the work and the scratch slots (offsets, perm, row_of, gate, up, a, out).
    fn moe_front(
        &mut self,
        index: usize,
        node: &Node,
        m: MoeDims,
        act: &ExpertAct,
    ) -> (Vec<Work>, [Arg; 7]) {
        let rows = m.n * m.k;
        let slot = |s: u32, bytes: u64| Arg::Scratch {
            slot: s,
            bytes: bytes.max(4),
        };
        let slots = [
            slot(0, (m.e + 1) * 4),
            slot(1, rows * 4),
            slot(2, rows * 4),
            slot(3, if m.gated { rows * m.h * 4 } else { 4 }),
            slot(4, rows * m.h * 4),
            slot(5, rows * m.h * 4),
            slot(6, rows * m.d * 4),
        ];
        let [offsets, perm, row_of, gate, up, a, out] = slots.clone();
        let sort = self.kernel(
            &format!("moe_sort_e{}_k{}", m.e, m.k),
            "sorts (token, slot) pairs by expert",
            moe_sort_text(m),
            index,
            0,
        );
        let hidden = self.kernel(
            &format!("moe_hidden_{}", m.suffix()),
            "the experts' hidden layer",
            moe_hidden_text(m, &act.compiled, &act.text),
            index,
            0,
        );
        let down = self.kernel(
            &format!("moe_down_{}", m.suffix()),
            "the experts' down projection",
            moe_down_text(m),
            index,
            0,
        );
        let (x, ids) = (node.inputs[0], node.inputs[2]);
        let (w_up, w_down) = if m.gated {
            (node.inputs[4], node.inputs[5])
        } else {
            (node.inputs[3], node.inputs[4])
        };
        let mut hidden_args = vec![val(x), val(ids), perm.clone()];
        if m.gated {
            hidden_args.push(val(node.inputs[3]));
        }
        hidden_args.push(val(w_up));
        if m.gated {
            hidden_args.push(gate.clone());
        }
        hidden_args.extend([up.clone(), a.clone(), int(rows)]);
        let work = vec![
            Work::Launch(Launch {
                kernel: sort,
                grid: 1,
                block: BLOCK,
                shared_bytes: 0,
                args: vec![
                    val(ids),
                    offsets,
                    perm.clone(),
                    row_of,
                    Arg::ErrorFlag,
                    int(m.n),
                ],
            }),
            elementwise_launch(hidden, rows * m.h, hidden_args),
            elementwise_launch(
                down,
                rows * m.d,
                vec![a, val(ids), perm, val(w_down), out, int(rows)],
            ),
        ];
        (work, slots)
    }

    fn experts(&mut self, index: usize, node: &Node, act: &Expr, gated: bool) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let (mut work, slots) = self.moe_front(index, node, m, &ExpertAct::of(act, gated));
        let combine = self.kernel(
            &format!("moe_combine_k{}_d{}", m.k, m.d),
            "combines each token's experts",
            moe_combine_text(m),
            index,
            0,
        );
        let [_, _, row_of, _, _, _, out] = slots;
        work.push(elementwise_launch(
            combine,
            m.n * m.d,
            vec![
                val(node.inputs[1]),
                row_of,
                out,
                val(node.outputs[0]),
                int(m.n),
            ],
        ));
        work
    }

    /// `(x, weights, experts, w_gate?, w_up, w_down, dy) -> (dx, d_weights, dw_gate?, dw_up,
    /// dw_down)`.
    fn experts_grad(&mut self, index: usize, node: &Node, act: &Expr, gated: bool) -> Vec<Work> {
        let m = self.moe_dims(node, gated);
        let act = ExpertAct::of(act, gated);
        let (mut work, slots) = self.moe_front(index, node, m, &act);
        let [offsets, perm, row_of, gate, up, a, out] = slots;
        let rows = m.n * m.k;
        let texts = moe_bwd_texts(m, &act.compiled, &act.text);
        let mut names = HashMap::new();
        for (what, text) in texts {
            let base = match what {
                "dx" | "dweights" | "gout" => format!("moe_bwd_{what}_k{}_d{}", m.k, m.d),
                _ => format!("moe_bwd_{what}_{}", m.suffix()),
            };
            let name = self.kernel(&base, "the experts' backward", text, index, 0);
            names.insert(what, name);
        }
        let i = &node.inputs;
        let o = &node.outputs;
        let (x, weights, ids, dy) = (i[0], i[1], i[2], *i.last().expect("dy"));
        let (w_gate, w_up, w_down) = if gated {
            (Some(i[3]), i[4], i[5])
        } else {
            (None, i[3], i[4])
        };
        let (dx, d_weights) = (o[0], o[1]);
        let (dw_gate, dw_up, dw_down) = if gated {
            (Some(o[2]), o[3], o[4])
        } else {
            (None, o[2], o[3])
        };
        let slot = |s: u32, bytes: u64| Arg::Scratch {
            slot: s,
            bytes: bytes.max(4),
        };
        let (gout, dg, du, dxs) = (
            slot(7, rows * m.d * 4),
            slot(8, if gated { rows * m.h * 4 } else { 4 }),
            slot(9, rows * m.h * 4),
            slot(10, rows * m.d * 4),
        );
        // Without a gate, the gate's slots are unused placeholders the kernels never read.
        let w_gate_arg = w_gate.map_or(up.clone(), val);
        work.extend([
            elementwise_launch(
                names["dweights"].clone(),
                rows,
                vec![val(dy), row_of.clone(), out, val(d_weights), int(m.n)],
            ),
            elementwise_launch(
                names["gout"].clone(),
                rows * m.d,
                vec![val(weights), perm.clone(), val(dy), gout.clone(), int(rows)],
            ),
            elementwise_launch(
                names["da"].clone(),
                rows * m.h,
                vec![
                    gout.clone(),
                    val(ids),
                    perm.clone(),
                    val(w_down),
                    gate,
                    up,
                    dg.clone(),
                    du.clone(),
                    int(rows),
                ],
            ),
            elementwise_launch(
                names["dxs"].clone(),
                rows * m.d,
                vec![
                    dg.clone(),
                    du.clone(),
                    val(ids),
                    perm.clone(),
                    w_gate_arg,
                    val(w_up),
                    dxs.clone(),
                    int(rows),
                ],
            ),
            elementwise_launch(
                names["dx"].clone(),
                m.n * m.d,
                vec![dxs, row_of, val(dx), int(m.n)],
            ),
            elementwise_launch(
                names["dw_down"].clone(),
                m.e * m.d * m.h,
                vec![gout, a, offsets.clone(), val(dw_down), int(m.e)],
            ),
            elementwise_launch(
                names["dw_in"].clone(),
                m.e * m.h * m.d,
                vec![
                    du,
                    val(x),
                    perm.clone(),
                    offsets.clone(),
                    val(dw_up),
                    int(m.e),
                ],
            ),
        ]);
        if let Some(dw_gate) = dw_gate {
            work.push(elementwise_launch(
                names["dw_in"].clone(),
                m.e * m.h * m.d,
                vec![dg, val(x), perm, offsets, val(dw_gate), int(m.e)],
            ));
        }
        work
    }
}
