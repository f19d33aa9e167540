//! The CUDA program of a Program: what kiln-compiler's CUDA emitter yields and the GPU runtime
//! runs, the manifest `kiln emit cuda` writes as JSON beside the source: the kernels with
//! their parameters, the RoPE tables, per node its launches, cuBLASLt GEMMs (FP8 ones with
//! their quantized operands) or aliases, the optimizer's launches, the FP8 copies and the keep
//! plan. The types live here, on the ground floor, so that the runtime reads a CUDA program
//! without linking the compiler.

use serde::Serialize;

use crate::attrs::{Format, Yarn};

/// The building blocks in `kernels/` that the translation unit includes, by file name (for
/// writing beside it, and for NVRTC, which takes headers as strings).
/// (`kiln_types.cuh`, the bf16/FP8 conversions, joins them when a kernel needs it: it includes
/// CUDA's own headers, which NVRTC needs a path to.)
/// `kiln_fp8.cuh` is included when some GEMM is FP8; it needs no CUDA header.
pub const HEADERS: [(&str, &str); 4] = [
    (
        "kiln_reduce.cuh",
        include_str!("../../../kernels/kiln_reduce.cuh"),
    ),
    (
        "kiln_softmax.cuh",
        include_str!("../../../kernels/kiln_softmax.cuh"),
    ),
    (
        "kiln_math.cuh",
        include_str!("../../../kernels/kiln_math.cuh"),
    ),
    (
        "kiln_fp8.cuh",
        include_str!("../../../kernels/kiln_fp8.cuh"),
    ),
];

/// Elements per chunk of the optimizer's multi-tensor launches: block `c` takes chunk `c`
/// ([`Arg::ChunkTensor`], [`Arg::ChunkStart`]).
pub const OPTIMIZER_CHUNK: u64 = 4096;

/// CUDA's execution model on the host (`kernels/kiln_host.h`): the emulated device and the
/// host tests build the translation unit under it.
pub const HOST_HEADER: (&str, &str) = ("kiln_host.h", include_str!("../../../kernels/kiln_host.h"));

/// The CUDA program of a training (or decode) step: source, kernels and the work of each node.
/// Graph inputs (tokens, positions, a decode step's KV caches) and parameters are values,
/// passed as [`Arg::Value`] by their index like intermediates.
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
    /// What the backward pass keeps from the forward pass: the Program's keep plan.
    pub keep: Keep,
}

impl CudaProgram {
    /// Kernels with no plan around them (no steps, tables, copies or optimizer): a library
    /// the runtime launches by hand, such as a device's own helper kernels.
    pub fn library(name: &str, source: &str, kernels: Vec<Kernel>) -> CudaProgram {
        CudaProgram {
            name: name.to_string(),
            source: source.to_string(),
            kernels,
            rope_tables: Vec::new(),
            steps: Vec::new(),
            optimizer: Vec::new(),
            fp8_copies: Vec::new(),
            keep: Keep::default(),
        }
    }
}

/// The Program's keep plan ([`crate::keep`]) as the manifest states it: the values the
/// backward pass reads from the forward pass, which the runtime's memory plan keeps across the
/// boundary. This version's kernels store every kept value in f32 as computed; `storage` is
/// the format the precision policy asks for, which the interpreter's emulation packs to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Keep {
    /// The first node of the backward pass; none for a Program without one (a decode step).
    pub boundary: Option<usize>,
    pub kept: Vec<KeptValue>,
    /// The `experts` nodes whose routed projections their gradient node reads again.
    pub experts: Vec<usize>,
}

/// One kept value: its index, the storage the policy asks for, and the node after which the
/// forward pass is done with it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeptValue {
    pub value: usize,
    pub storage: KeptStorage,
    pub after: usize,
}

/// How the policy stores a kept value ([`crate::keep::Storage`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KeptStorage {
    /// f32 as computed (statistics, named outputs).
    F32,
    /// The compute format (`precision.compute`).
    Compute,
    /// FP8 codes with one scale per `1 × tile` tile along the last axis, as the forward GEMM
    /// quantized it.
    Fp8 { format: Format, tile: u64 },
}

impl Keep {
    /// The manifest's form of a keep plan.
    pub fn of(plan: &crate::keep::KeepPlan) -> Keep {
        use crate::keep::Storage;
        Keep {
            boundary: plan.boundary,
            kept: plan
                .kept
                .iter()
                .map(|k| KeptValue {
                    value: k.value.index(),
                    storage: match k.storage {
                        Storage::F32 => KeptStorage::F32,
                        Storage::Compute => KeptStorage::Compute,
                        Storage::Fp8 { format, tile, .. } => KeptStorage::Fp8 { format, tile },
                    },
                    after: k.after,
                })
                .collect(),
            experts: plan.experts.clone(),
        }
    }
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
    /// Its parameters in order, as the source declares them: every launch passes one
    /// argument per parameter, of the kind the parameter's type takes.
    pub params: Vec<Param>,
    /// The Program nodes that launch it.
    pub nodes: Vec<usize>,
}

/// A kernel parameter: its name and C type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Param {
    pub name: String,
    pub elem: Elem,
    pub pass: Pass,
}

/// What a kernel parameter holds or points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Elem {
    /// `float`
    F32,
    /// `int`
    I32,
    /// `long long`
    I64,
    /// `unsigned`
    U32,
    /// `unsigned char`
    U8,
    /// `KilnTensor`, the optimizer's view of a trainable tensor.
    Tensor,
}

/// How a kernel parameter is passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// By value (`long long n`, `float eps`).
    Value,
    /// A pointer the kernel only reads (`const float* __restrict__ x`).
    Read,
    /// A pointer the kernel writes (`float* __restrict__ y`).
    Write,
}

impl Elem {
    /// The C type's name.
    pub fn c_name(self) -> &'static str {
        match self {
            Elem::F32 => "float",
            Elem::I32 => "int",
            Elem::I64 => "long long",
            Elem::U32 => "unsigned",
            Elem::U8 => "unsigned char",
            Elem::Tensor => "KilnTensor",
        }
    }
}

impl Param {
    pub fn new(name: &str, elem: Elem, pass: Pass) -> Param {
        Param {
            name: name.to_string(),
            elem,
            pass,
        }
    }

    /// The C declaration, as in the kernel's parameter list.
    pub fn c_decl(&self) -> String {
        let (t, n) = (self.elem.c_name(), &self.name);
        match self.pass {
            Pass::Value => format!("{t} {n}"),
            Pass::Read => format!("const {t}* __restrict__ {n}"),
            Pass::Write => format!("{t}* __restrict__ {n}"),
        }
    }
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
    /// The device's error flag: kernels set it to a nonzero code on bad input (1: a token id
    /// outside the vocabulary, 2: a target outside it, 3: an expert id out of range, 4: a
    /// decode position at or beyond the KV cache's capacity), and the runtime reports it after
    /// the step.
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
    /// (+ `bias[n]` broadcast over rows), where `op` transposes when the flag says so; operands
    /// in the node's format ([`Gemm::format`]), accumulation and output in f32.
    Gemm(Gemm),
    /// One matrix product per group of sorted rows (the routed experts'), each on cuBLASLt.
    GroupedGemm(GroupedGemm),
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
    /// The node's format: `fp32` multiplies the operands as they are, `bf16` and `fp16` round
    /// each to nearest even first (as the CPU's precision emulation does), and an FP8 format
    /// reads the quantized copies of [`Gemm::fp8`] instead.
    pub format: Format,
    /// The FP8 copies of `a` and `b` the GEMM reads instead, when its format is FP8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp8: Option<Fp8Gemm>,
}

/// The routed experts' products: for each group `g` (an expert) owning the sorted rows
/// `offsets[g] .. offsets[g + 1]` (`i32[groups + 1]` on the device, written by the step's
/// sort), one row-major product `c_g = op(a_g) · op(b_g)` in the node's format, accumulation and
/// output in f32, as [`Gemm`] describes one. The runtime reads the offsets back and issues a
/// GEMM per group that has rows.
///
/// Two shapes, by what a group's rows are:
/// - `contract_rows == false`: the output's rows, `m_g = offsets[g + 1] − offsets[g]` (the
///   forward and input-gradient products). `a` holds every sorted row, `[Σ m_g, k]`, and group
///   `g` reads its rows; `b` holds one `[k, n]` matrix per group (stored `[n, k]` when
///   `b_trans`), `g × n·k` elements in; `c` holds every sorted row, `[Σ m_g, n]`.
/// - `contract_rows == true`: the contraction, `k_g = m_g` (the weight gradients,
///   `c_g = a_gᵀ · b_g`). `a` holds every sorted row `[Σ k_g, m]` read transposed (`a_trans`),
///   `b` every sorted row `[Σ k_g, n]`, and `c` one `[m, n]` matrix per group; a group without
///   rows gets zeros.
///
/// `m`, `n` and `k` give the fixed sizes; the grouped one is the total over the groups (the
/// rows every group together may hold). With `accumulate`, each group's product is added to
/// what `c` holds (cuBLASLt's β = 1).
///
/// An FP8 product reads K-major copies the step's launches wrote ([`Fp8Gemm`]), laid out per
/// group: an operand holding sorted rows along its outer axis (`a` when the rows are the
/// output's) is `[Σ m_g, k]` codes with `[Σ m_g, k / T]` scales, group `g` from row
/// `offsets[g]`; a per-group weight (`b` then) is `[groups, n, k]` codes with each group's
/// blocks after the previous group's; an operand contracted over the rows (both when
/// `contract_rows`) is, per group, `[outer, k_g]` codes from `outer · offsets[g]` with
/// `[outer, ⌈k_g / T⌉]` scales from `outer · Σ_{g' < g} ⌈k_{g'} / T⌉`: tiles start at each
/// group's first row, as the CPU quantizes each expert's operands.
#[derive(Clone, Debug, Serialize)]
pub struct GroupedGemm {
    pub offsets: Arg,
    pub groups: u64,
    pub contract_rows: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: Arg,
    pub a_trans: bool,
    pub b: Arg,
    pub b_trans: bool,
    pub c: Arg,
    pub accumulate: bool,
    pub format: Format,
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

impl Fp8Copy {
    /// The kernel arguments naming its codes (one byte per element) and its scales (one f32
    /// per block); `copy` is its index in [`CudaProgram::fp8_copies`].
    pub fn args(&self, copy: usize) -> (Arg, Arg) {
        let scales = self.outer.div_ceil(self.block[0]) * self.k.div_ceil(self.block[1]);
        (
            Arg::Fp8Codes {
                copy,
                bytes: self.outer * self.k,
            },
            Arg::Fp8Scales {
                copy,
                bytes: 4 * scales,
            },
        )
    }
}
