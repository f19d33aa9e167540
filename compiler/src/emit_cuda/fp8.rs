//! FP8 GEMM operands on the CUDA path, as DeepSeek-V3 trains: the kernels that quantize them,
//! and which copies a step keeps.
//!
//! Every operand of an FP8 GEMM is a K-major copy in FP8 codes with its scales:
//! - An activation (or activation gradient) that a forward or input-gradient product reads as
//!   its left operand, as it is stored, is an [`Fp8Copy`] of the program: quantized once per
//!   step in 1×T tiles along its last axis, and read by every GEMM that takes the value in
//!   that format (a norm's output feeds several projections). When the kernel computing the
//!   value can quantize what it has just computed (norms forward and backward, when T divides
//!   their rows; elementwise maps and their gradients; concats), it does (*fused*), and the
//!   value is never read back for it; otherwise a quantizing launch in the step of its first
//!   reader writes the copy.
//! - A weight is a copy per layout its GEMMs read (blocks as stored for the forward product,
//!   transposed for the input gradient); one launch at the first reader writes both.
//! - The weight-gradient product's operands (tiles along the tokens, a transposed read) are
//!   quantized into the step's scratch right before their GEMM.
//!
//! Quantization is `kiln_fp8.cuh`'s, bit for bit the CPU emulation's (`numerics::quant`):
//! tests/cuda_host.rs compares every operand of a step's FP8 GEMMs with it.

use std::collections::HashMap;
use std::fmt::Write;

use super::kernel::{GRID_START, GRID_STRIDE};
use super::{
    grid_stride, val, Arg, Elem, Emitter, Fp8Copy, Fp8Gemm, Fp8Operand, Gemm, Grid, KernelDef,
    Pass, Work,
};
use crate::ir::{Def, Graph, Op, ValueId};
use crate::model::{Format, Fp8, ScaleFormat};

/// Quantization in 1×T tiles along the contraction, as the copies and the tile kernels do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tiles {
    pub format: Format,
    pub pow2: bool,
    /// Elements per tile (and per scale).
    pub t: u64,
}

impl Tiles {
    pub fn of(format: Format, fp8: &Fp8) -> Tiles {
        let t = fp8.act_tile[1];
        assert!(
            t % 4 == 0 && t <= 128 && t.is_power_of_two(),
            "FP8 tiles of {t}: the checker allows powers of two from 4 to 128"
        );
        Tiles {
            format,
            pow2: fp8.scale == ScaleFormat::Pow2,
            t,
        }
    }

    fn e5m2(self) -> bool {
        self.format == Format::E5m2
    }

    /// What a kernel name says of the quantization: `_e4m3_t128`, `_e5m2_t8_pow2`.
    pub fn suffix(self) -> String {
        format!(
            "_{}_t{}{}",
            self.format.name(),
            self.t,
            if self.pow2 { "_pow2" } else { "" }
        )
    }

    /// The comment lines saying how a kernel quantizes `what`, the rows it writes.
    pub fn comment(self, what: &str) -> String {
        let (format, rule) = fp8_names(self.e5m2(), self.pow2);
        let t = self.t;
        format!(
            "// Quantizes {what} on the way out: {format} codes (u8, four per unsigned, the first in\n\
             // the low byte) and one {rule} scale (f32) per 1×{t} tile along its rows."
        )
    }
}

impl Tiles {
    /// The grid-stride [`quantizing_loop`] of an elementwise kernel over `n4` groups of four:
    /// `element` computes element `j` as `value`, stored to `store[j]` if given, quantized
    /// into `codes` and `scales`.
    pub fn grid_loop(self, element: &[String], store: Option<&str>) -> String {
        quantizing_loop(
            "    ",
            GRID_START,
            GRID_STRIDE,
            "n4",
            element,
            &[TileOut {
                tiles: self,
                value: "value",
                store,
                codes: "codes",
                scales: "scales",
            }],
        )
    }
}

/// One value that a [`quantizing_loop`] quantizes.
pub(super) struct TileOut<'a> {
    pub tiles: Tiles,
    /// The variable holding element `j` after the loop's element lines.
    pub value: &'a str,
    /// Where the loop stores it (`store[j]`), when the element lines do not.
    pub store: Option<&'a str>,
    /// The pointers its codes (`unsigned`, four per group) and scales (per tile) go to.
    pub codes: &'a str,
    pub scales: &'a str,
}

/// The loop over groups of four consecutive elements `4i .. 4i + 3`, `i` from `start` by
/// `stride` below `n4`, that computes, stores and quantizes them: `element` (lines at the
/// body's indentation, which may declare temporaries) computes element `j` of each of `outs`;
/// the loop stores those that name a store, then writes each group's four codes to
/// `codes[i]` and each tile's scale to `scales[4 * i / T]`. Whole blocks go round together,
/// so that the lanes of a tile meet in its shuffles (and the host emulation's block-wide
/// barriers meet too).
pub(super) fn quantizing_loop(
    indent: &str,
    start: &str,
    stride: &str,
    n4: &str,
    element: &[String],
    outs: &[TileOut],
) -> String {
    let suffix = |k: usize| {
        if outs.len() == 1 {
            String::new()
        } else {
            k.to_string()
        }
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{indent}for (long long i = {start}; i - threadIdx.x < {n4}; i += {stride}) {{"
    );
    for k in 0..outs.len() {
        let p = suffix(k);
        let _ = writeln!(
            s,
            "{indent}    float part{p}[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};"
        );
    }
    let _ = writeln!(s, "{indent}    if (i < {n4}) {{");
    let _ = writeln!(s, "{indent}        #pragma unroll");
    let _ = writeln!(s, "{indent}        for (int e = 0; e < 4; ++e) {{");
    let _ = writeln!(s, "{indent}            const long long j = 4 * i + e;");
    for line in element {
        let _ = writeln!(s, "{indent}            {line}");
    }
    for (k, out) in outs.iter().enumerate() {
        let (p, value) = (suffix(k), out.value);
        if let Some(store) = out.store {
            let _ = writeln!(s, "{indent}            {store}[j] = {value};");
        }
        let _ = writeln!(s, "{indent}            part{p}[e] = {value};");
    }
    let _ = writeln!(s, "{indent}        }}");
    let _ = writeln!(s, "{indent}    }}");
    for (k, out) in outs.iter().enumerate() {
        let p = suffix(k);
        let t = out.tiles;
        let (e5m2, pow2, lanes) = (t.e5m2(), t.pow2, t.t / 4);
        let _ = writeln!(s, "{indent}    float scale{p};");
        let _ = writeln!(
            s,
            "{indent}    const unsigned four{p} = kiln_quantize4<{e5m2}>({{part{p}[0], part{p}[1], part{p}[2], part{p}[3]}}, {lanes}, {pow2}, &scale{p});"
        );
        let _ = writeln!(s, "{indent}    if (i < {n4}) {{");
        let _ = writeln!(s, "{indent}        {}[i] = four{p};", out.codes);
        let _ = writeln!(
            s,
            "{indent}        if (threadIdx.x % {lanes} == 0) {}[4 * i / {}] = scale{p};",
            out.scales, t.t
        );
        let _ = writeln!(s, "{indent}    }}");
    }
    let _ = writeln!(s, "{indent}}}");
    s
}

/// The quantizer of activations and gradients: `[outer, k]` (stored transposed as
/// `[k, outer]` when `transposed`) to K-major FP8 codes with one scale per 1×T tile along
/// `k`, four elements per thread.
fn fp8_tiles(
    tiles: Tiles,
    transposed: bool,
    x: Arg,
    codes: Arg,
    scales: Arg,
    outer: u64,
    k: u64,
) -> KernelDef {
    let stored = if transposed {
        "f32[k, outer]"
    } else {
        "f32[outer, k]"
    };
    // Scalar loads: a value's buffer may sit at any 4-byte offset of the arena.
    let element = if transposed {
        // Element j of the K-major copy is (o, c) = (j / k, j % k): x[c, o]. The four of a
        // group share o (4 divides k), so the divisions are the group's, out of the loop.
        vec![
            "const long long first = j - e;".to_string(),
            "const float value = x[(first % k + e) * outer + first / k];".to_string(),
        ]
    } else {
        vec!["const float value = x[j];".to_string()]
    };
    let (format, rule) = fp8_names(tiles.e5m2(), tiles.pow2);
    let t = tiles.t;
    let t_suffix = if transposed { "_t" } else { "" };
    KernelDef::new(
        format!("fp8_tiles{t_suffix}{}", tiles.suffix()),
        "quantizes an activation to FP8 in 1×T tiles",
    )
    .doc(format!(
        "// Quantizes x: {stored}, read as [outer, k], to {format} codes: u8[outer, k] (four per\n\
         // unsigned, the first in the low byte) with one {rule} scale per 1×{t} tile along k,\n\
         // scales: f32[outer, k / {t}]. Four elements per thread (`kiln_quantize4`)."
    ))
    .read("x", x)
    .param("codes", Elem::U32, Pass::Write, codes)
    .write("scales", scales)
    .long("outer", outer)
    .long("k", k)
    .body(format!(
        "    const long long n4 = outer * k / 4;\n{}",
        tiles.grid_loop(&element, None)
    ))
}

/// One layout a weight quantizer writes: the weight's own `[rows, cols]` or its transpose
/// `[cols, rows]` (the input-gradient GEMM's K-major operand), in a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockOut {
    e5m2: bool,
    transposed: bool,
}

/// The quantizer of weights: `w: f32[rows, cols]` in `br × bc` blocks, one thread block per
/// weight block, each block's max-abs found once and its codes written in every layout of
/// `outs` (`codes`/`scales` for one, `codes{i}`/`scales{i}` for several).
/// `w` is the weight's buffer, each of `outs` comes with its codes and scales.
/// `batched`: `w` holds matrices `[rows, cols]` one after another (the experts' weights), each
/// quantized on its own; the grid covers every matrix's blocks, and the copies follow each
/// other likewise (one layout only).
fn fp8_blocks(
    def: KernelDef,
    pow2: bool,
    [br, bc]: [u64; 2],
    w: Arg,
    outs: &[(BlockOut, Arg, Arg)],
    [rows, cols]: [u64; 2],
    batched: bool,
) -> KernelDef {
    let one = outs.len() == 1;
    assert!(
        one || !batched,
        "a batched weight quantizer writes one layout"
    );
    // A batched kernel's pointer parameters are the whole tensors; the body's names point
    // at the block's matrix.
    let all = if batched { "_all" } else { "" };
    let name = |what: &str, i: usize| {
        if one {
            what.to_string()
        } else {
            format!("{what}{i}")
        }
    };
    let rule = fp8_names(false, pow2).1;
    let mut header = String::new();
    let mut def = def.read(&format!("w{all}"), w);
    let (mut scale_lines, mut code_lines, mut store_lines) =
        (String::new(), String::new(), String::new());
    // One scale and one code per format, whatever the layouts.
    let first_of = |i: usize| (0..=i).find(|&j| outs[j].0.e5m2 == outs[i].0.e5m2).unwrap();
    for (i, (out, codes_arg, scales_arg)) in outs.iter().enumerate() {
        let format = fp8_names(out.e5m2, pow2).0;
        let (codes, scales) = (name("codes", i), name("scales", i));
        let (s, q) = (format!("s{}", first_of(i)), format!("q{}", first_of(i)));
        let (layout, code_at, scale_at) = if out.transposed {
            (
                format!(
                    "u8[cols, rows] (transposed), {scales}: f32[ceil(cols / {bc}), ceil(rows / {br})]"
                ),
                "c * rows + r",
                format!("bc * ((rows + {br} - 1) / {br}) + br"),
            )
        } else {
            (
                format!("u8[rows, cols], {scales}: f32[ceil(rows / {br}), ceil(cols / {bc})]"),
                "r * cols + c",
                "br * bcols + bc".to_string(),
            )
        };
        let _ = writeln!(header, "//   {format}: {codes}: {layout}");
        def = def
            .param(
                &format!("{codes}{all}"),
                Elem::U8,
                Pass::Write,
                codes_arg.clone(),
            )
            .write(&format!("{scales}{all}"), scales_arg.clone());
        if first_of(i) == i {
            let max = if out.e5m2 {
                "KILN_FP8_E5M2_MAX"
            } else {
                "KILN_FP8_E4M3_MAX"
            };
            let _ = writeln!(
                scale_lines,
                "    const float {s} = kiln_fp8_scale(amax, {max}, {pow2});"
            );
            let _ = writeln!(
                code_lines,
                "        const unsigned char {q} = (unsigned char)(kiln_fp8x2<{}>(v / {s}, 0.0f) & 0xFFu);",
                out.e5m2
            );
        }
        let _ = writeln!(code_lines, "        {codes}[{code_at}] = {q};");
        let _ = writeln!(
            store_lines,
            "    if (threadIdx.x == 0) {scales}[{scale_at}] = {s};"
        );
    }
    let (what, prologue, block) = if batched {
        (
            "each matrix w of w_all: f32[batch, rows, cols]",
            format!(
                "\
\x20   const long long per = ((rows + {br} - 1) / {br}) * ((cols + {bc} - 1) / {bc});
    const long long matrix = blockIdx.x / per, blk = blockIdx.x % per;
    const float* w = w_all + matrix * rows * cols;
    unsigned char* codes = codes_all + matrix * rows * cols;
    float* scales = scales_all + matrix * per;
"
            ),
            "blk",
        )
    } else {
        ("the weight w: f32[rows, cols]", String::new(), "blockIdx.x")
    };
    let batch_line = if batched {
        "\n// Batched: the copies of matrix b start b · rows · cols codes and b · (blocks per matrix)\n\
         // scales in."
    } else {
        ""
    };
    def.doc(format!(
        "// Quantizes {what} in {br} × {bc} blocks, one {rule} scale per block\n\
         // from its max-abs:\n{header}// One thread block per weight block (the last ones may be partial).{batch_line}"
    ))
    .long("rows", rows)
    .long("cols", cols)
    .body(format!(
        "\
{prologue}\x20   __shared__ float scratch[32];
    const long long bcols = (cols + {bc} - 1) / {bc};
    const long long br = {block} / bcols, bc = {block} % bcols;
    const long long r0 = br * {br}, c0 = bc * {bc};
    const long long h = rows - r0 < {br} ? rows - r0 : {br};
    const long long wd = cols - c0 < {bc} ? cols - c0 : {bc};
    float m = 0.0f;
    for (long long e = threadIdx.x; e < h * wd; e += blockDim.x) {{
        m = fmaxf(m, fabsf(w[(r0 + e / wd) * cols + c0 + e % wd]));
    }}
    const float amax = kiln_block_max(m, scratch);
{scale_lines}    for (long long e = threadIdx.x; e < h * wd; e += blockDim.x) {{
        const long long r = r0 + e / wd, c = c0 + e % wd;
        const float v = w[r * cols + c];
{code_lines}    }}
{store_lines}"
    ))
}

/// The format and scale rule of an FP8 kernel, as its comment names them.
fn fp8_names(e5m2: bool, pow2: bool) -> (&'static str, &'static str) {
    (
        if e5m2 { "E5M2" } else { "E4M3" },
        if pow2 { "power-of-two" } else { "fp32" },
    )
}

/// The FP8 copies of a program, and which GEMMs and kernels use them.
#[derive(Debug, Default)]
pub(super) struct Copies {
    pub copies: Vec<Fp8Copy>,
    /// (the buffer's value, format, k, transposed) → its copy.
    by_operand: HashMap<(ValueId, Format, u64, bool), usize>,
    /// A value → the copy its producer's kernel writes (at most one per value).
    fused: HashMap<ValueId, usize>,
}

/// The value whose buffer `v` is: reshapes alias their input.
fn buffer_of(graph: &Graph, mut v: ValueId) -> ValueId {
    while let Def::Node { node, .. } = graph.values[v].def {
        let n = &graph.nodes[node];
        if !matches!(n.op, Op::Reshape { .. }) {
            break;
        }
        v = n.inputs[0];
    }
    v
}

/// Whether `value` comes from a kernel that can quantize it in tiles of `t` as it writes it:
/// an elementwise map, its gradient or a concat (any tile of consecutive elements), or a
/// norm's row output, forward or backward, when `t` divides the rows (one block writes each).
fn fusable(graph: &Graph, value: ValueId, t: u64) -> bool {
    let Def::Node { node, output } = graph.values[value].def else {
        return false;
    };
    let d = *graph.values[value].ty.shape.last().unwrap_or(&1);
    match graph.nodes[node].op {
        Op::Map { .. } | Op::MapGrad { .. } | Op::Concat => true,
        Op::LinearMap { .. } => output == 1,
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => output == 0 && d % t == 0,
        Op::AddNorm { .. } => output == 1 && d % t == 0,
        Op::RmsNormGrad { .. } | Op::LayerNormGrad { .. } | Op::AddNormGrad { .. } => {
            output == 0 && d % t == 0
        }
        _ => false,
    }
}

/// An FP8 GEMM operand that a copy serves: `value` read as `[outer, k]` in `format`, as
/// stored or transposed (a weight read by the input gradient).
struct Read {
    value: ValueId,
    format: Format,
    outer: u64,
    k: u64,
    transposed: bool,
    weight: bool,
}

impl Copies {
    /// The copies of an FP8 program: every activation an FP8 GEMM reads as its left operand,
    /// as stored (the forward product's input, the input-gradient product's output gradient),
    /// and every weight in each layout its GEMMs read, once per format. An activation's
    /// writer is its producing node when [`fusable`], else its first reader; a weight's is
    /// its first reader, and when the weight is read in both layouts (forward and input
    /// gradient) one launch writes both, at the first reader of either (`pair`).
    pub fn plan(graph: &Graph, fp8: &Fp8) -> Copies {
        let mut activations = Copies::default();
        let mut weights = Copies::default();
        for (id, node) in graph.nodes.iter() {
            if !node.format.is_fp8() {
                continue;
            }
            let backward = match node.op {
                Op::Linear { .. } | Op::LinearMap { .. } => false,
                Op::LinearGrad { .. } => true,
                _ => continue,
            };
            let (operand, w) = if backward {
                (node.inputs[2], node.inputs[1])
            } else {
                (node.inputs[0], node.inputs[1])
            };
            let ws = &graph.values[w].ty.shape;
            let (out_f, in_f) = (ws[0], ws[1]);
            // The contraction: the layer's input width forward, its output width backward.
            let k = if backward { out_f } else { in_f };
            let value = buffer_of(graph, operand);
            let elements: u64 = graph.values[value].ty.shape.iter().product();
            let reader = id.index();
            activations.add(
                graph,
                fp8,
                reader,
                Read {
                    value,
                    format: node.format,
                    outer: elements / k,
                    k,
                    transposed: false,
                    weight: false,
                },
            );
            weights.add(
                graph,
                fp8,
                reader,
                Read {
                    value: w,
                    format: node.format,
                    outer: if backward { in_f } else { out_f },
                    k,
                    transposed: backward,
                    weight: true,
                },
            );
        }
        // Each weight's copy as stored pairs with its transposed one.
        let n = weights.copies.len();
        for c in 0..n {
            if weights.copies[c].transposed {
                continue;
            }
            let partner = (0..n).find(|&t| {
                let (a, b) = (&weights.copies[c], &weights.copies[t]);
                b.transposed && b.value == a.value && b.pair.is_none()
            });
            if let Some(t) = partner {
                let writer = weights.copies[c].readers[0].min(weights.copies[t].readers[0]);
                let offset = activations.copies.len();
                for (x, y) in [(c, t), (t, c)] {
                    weights.copies[x].pair = Some(offset + y);
                    weights.copies[x].writer = writer;
                }
            }
        }
        let offset = activations.copies.len();
        for (key, c) in weights.by_operand {
            activations.by_operand.insert(key, offset + c);
        }
        activations.copies.extend(weights.copies);
        activations
    }

    /// Records `reader` as a reader of the copy `read` names, planning the copy if it is new.
    fn add(&mut self, graph: &Graph, fp8: &Fp8, reader: usize, read: Read) {
        let key = (read.value, read.format, read.k, read.transposed);
        if let Some(&c) = self.by_operand.get(&key) {
            self.copies[c].readers.push(reader);
            return;
        }
        let (block, mode, fused) = if read.weight {
            let [br, bc] = fp8.weight_block;
            let block = if read.transposed { [bc, br] } else { [br, bc] };
            (block, block_scale_mode(block), false)
        } else {
            let t = Tiles::of(read.format, fp8).t;
            assert!(
                read.k % t == 0,
                "FP8 tiles of {t} along k = {}: the checker allows only tiles that divide k",
                read.k
            );
            // A producer's kernel writes one copy of its output; a second one (another
            // format or width, which no spec makes today) is quantized at its first reader.
            let taken = self.fused.contains_key(&read.value);
            (
                [1, t],
                tile_scale_mode(t),
                !taken && fusable(graph, read.value, t),
            )
        };
        let writer = match graph.values[read.value].def {
            Def::Node { node, .. } if fused => node.index(),
            _ => reader,
        };
        self.by_operand.insert(key, self.copies.len());
        if fused {
            self.fused.insert(read.value, self.copies.len());
        }
        self.copies.push(Fp8Copy {
            value: read.value.index(),
            format: read.format,
            outer: read.outer,
            k: read.k,
            transposed: read.transposed,
            block,
            cublaslt_scale_mode: mode,
            writer,
            fused,
            pair: None,
            readers: vec![reader],
        });
    }

    /// The copy of `value` that `node`'s kernel writes as it computes it, if any.
    fn fused_at(&self, node: usize, value: ValueId) -> Option<usize> {
        let &c = self.fused.get(&value)?;
        (self.copies[c].writer == node).then_some(c)
    }
}

/// An FP8 operand before quantization: `value` seen as `[outer, k]`, stored as `[k, outer]`
/// when `stored_transposed`; a weight is scaled in blocks, anything else in 1×T tiles.
struct Operand {
    value: usize,
    outer: u64,
    k: u64,
    stored_transposed: bool,
    weight: bool,
}

impl Emitter<'_> {
    /// The FP8 copy of `value` that the kernel of `node` writes as it computes it: its
    /// quantization, codes and scales, when the plan fused one there.
    pub(super) fn fused_copy(&self, node: usize, value: ValueId) -> Option<(Tiles, Arg, Arg)> {
        let c = self.copies.fused_at(node, value)?;
        let copy = &self.copies.copies[c];
        let (codes, scales) = copy.args(c);
        Some((Tiles::of(copy.format, &self.fp8), codes, scales))
    }

    /// `gemm` as the work of a node whose format is `format`: the GEMM alone, or for an FP8
    /// format the GEMM reading K-major FP8 copies of both operands, after the launches that
    /// write those this step must. An operand read as stored, or a weight, is its
    /// [`Fp8Copy`] (written here only when this node is the copy's writer and no kernel
    /// fuses it); the weight gradient's operands, read transposed, are quantized into
    /// scratch slots `slot`, `slot + 1` (`a`) and `slot + 2`, `slot + 3` (`b`).
    /// `b_is_weight`: the `b` operand is a weight, scaled per weight block (DeepSeek-V3's
    /// 128×128); activations and gradients are scaled per 1×T tile along `k` (its 1×128).
    pub(super) fn gemm_in(
        &mut self,
        node: usize,
        mut g: Gemm,
        b_is_weight: bool,
        slot: u32,
    ) -> Vec<Work> {
        let format = g.format;
        if !format.is_fp8() {
            return vec![Work::Gemm(g)];
        }
        let (m, n, k) = (g.m, g.n, g.k);
        let mut work = Vec::new();
        // a is [m, k] when stored as it is, else [k, m]; b is [k, n] stored as [n, k] when
        // transposed, else as it is.
        let a = Operand {
            value: g.a,
            outer: m,
            k,
            stored_transposed: g.a_trans,
            weight: false,
        };
        let qa = if g.a_trans {
            self.scratch_operand(node, format, &a, slot, &mut work)
        } else {
            self.copy_operand(node, format, &a, &mut work)
        };
        let b = Operand {
            value: g.b,
            outer: n,
            k,
            stored_transposed: !g.b_trans,
            weight: b_is_weight,
        };
        let qb = if b_is_weight {
            self.copy_operand(node, format, &b, &mut work)
        } else {
            self.scratch_operand(node, format, &b, slot + 2, &mut work)
        };
        g.fp8 = Some(Fp8Gemm {
            format,
            a: qa,
            b: qb,
        });
        work.push(Work::Gemm(g));
        work
    }

    /// The planned copy of an operand, with the launch writing it when this node is its
    /// (unfused) writer.
    fn copy_operand(
        &mut self,
        node: usize,
        format: Format,
        op: &Operand,
        work: &mut Vec<Work>,
    ) -> Fp8Operand {
        let value = buffer_of(self.graph, ValueId::from_index(op.value));
        let key = (value, format, op.k, op.weight && op.stored_transposed);
        let c = self.copies.by_operand[&key];
        let copy = &self.copies.copies[c];
        let (codes, scales) = copy.args(c);
        let (block, cublaslt_scale_mode) = (copy.block, copy.cublaslt_scale_mode);
        if copy.writer == node && !copy.fused {
            work.push(if op.weight {
                self.quantize_weight(node, c)
            } else {
                self.quantize_tiles(node, format, op, codes.clone(), scales.clone())
            });
        }
        Fp8Operand {
            codes,
            scales,
            block,
            cublaslt_scale_mode,
        }
    }

    /// An activation operand read transposed, quantized in 1×T tiles along `k` into scratch
    /// `slot` (codes) and `slot + 1` (scales) by a launch pushed onto `work`.
    fn scratch_operand(
        &mut self,
        node: usize,
        format: Format,
        op: &Operand,
        slot: u32,
        work: &mut Vec<Work>,
    ) -> Fp8Operand {
        let t = Tiles::of(format, &self.fp8).t;
        let elements = op.outer * op.k;
        let codes = Arg::Scratch {
            slot,
            bytes: elements.max(4),
        };
        let scales = Arg::Scratch {
            slot: slot + 1,
            bytes: 4 * (elements / t).max(1),
        };
        work.push(self.quantize_tiles(node, format, op, codes.clone(), scales.clone()));
        tiled_operand(codes, scales, t)
    }

    /// The launch writing weight copy `c`, and its pair when it has one, from the weight:
    /// one thread block per weight block.
    fn quantize_weight(&mut self, node: usize, c: usize) -> Work {
        let copy = &self.copies.copies[c];
        let mut written: Vec<usize> = std::iter::once(c).chain(copy.pair).collect();
        // As stored first, then transposed.
        written.sort_by_key(|&i| self.copies.copies[i].transposed);
        let w = ValueId::from_index(copy.value);
        let (rows, cols) = (self.shape(w)[0], self.shape(w)[1]);
        let pow2 = self.fp8.scale == ScaleFormat::Pow2;
        let [br, bc] = self.fp8.weight_block;
        let outs: Vec<(BlockOut, Arg, Arg)> = written
            .iter()
            .map(|&i| {
                let copy = &self.copies.copies[i];
                let (codes, scales) = copy.args(i);
                let out = BlockOut {
                    e5m2: copy.format == Format::E5m2,
                    transposed: copy.transposed,
                };
                (out, codes, scales)
            })
            .collect();
        // fp8_blocks_e4m3, fp8_blocks_t_e4m3 (transposed), fp8_blocks_pair_e4m3 (both layouts;
        // two formats when they differ).
        let copies = &self.copies.copies;
        let mut formats: Vec<&str> = written.iter().map(|&i| copies[i].format.name()).collect();
        formats.dedup();
        let layouts = match written[..] {
            [i] if copies[i].transposed => format!("_t_{}", formats[0]),
            [_] => format!("_{}", formats[0]),
            _ => format!("_pair_{}", formats.join("_")),
        };
        let rule = if pow2 { "_pow2" } else { "" };
        let def = KernelDef::new(
            format!("fp8_blocks{layouts}_{br}x{bc}{rule}"),
            "quantizes a weight to FP8 in blocks, in each layout its GEMMs read",
        );
        let def = fp8_blocks(def, pow2, [br, bc], val(w), &outs, [rows, cols], false);
        self.work(
            node,
            def,
            Grid::Blocks(rows.div_ceil(br) * cols.div_ceil(bc)),
        )
    }

    /// The launch quantizing the activation operand `op` in 1×T tiles into `codes` and
    /// `scales`.
    fn quantize_tiles(
        &mut self,
        node: usize,
        format: Format,
        op: &Operand,
        codes: Arg,
        scales: Arg,
    ) -> Work {
        let tiles = Tiles::of(format, &self.fp8);
        let x = Arg::Value { id: op.value };
        let def = fp8_tiles(
            tiles,
            op.stored_transposed,
            x,
            codes,
            scales,
            op.outer,
            op.k,
        );
        self.work(node, def, Grid::Threads(op.outer * op.k / 4))
    }
}

/// The quantizer of an operand contracted over the experts' sorted rows (a weight gradient's):
/// `x: f32[rows, outer]`, read per group `g` of rows (`offsets`) as the K-major
/// `[outer, k_g]`, in 1×T tiles along the rows that start at each group's first row — as the
/// CPU quantizes each expert's operands. Laid out as [`GroupedGemm`](super::GroupedGemm)
/// says; one thread per (tile, column).
fn fp8_group_tiles(tiles: Tiles, x: Arg, offsets: Arg, codes: Arg, scales: Arg) -> KernelDef {
    let (format, rule) = fp8_names(tiles.e5m2(), tiles.pow2);
    let t = tiles.t;
    let max = if tiles.e5m2() {
        "KILN_FP8_E5M2_MAX"
    } else {
        "KILN_FP8_E4M3_MAX"
    };
    KernelDef::new(
        format!("fp8_group_tiles{}", tiles.suffix()),
        "quantizes an operand contracted over each expert's rows",
    )
    .doc(format!(
        "// Quantizes x: f32[rows, outer], per group g of rows offsets[g] .. offsets[g + 1] (k_g of\n\
         // them) read as [outer, k_g], to {format} codes with one {rule} scale per 1×{t} tile along\n\
         // the rows, tiles starting at the group's first row: group g's codes u8[outer, k_g] from\n\
         // outer · offsets[g], its scales f32[outer, ⌈k_g / {t}⌉] from outer · (the tiles of the\n\
         // groups before it). One thread per (tile, column); tiles are numbered through the groups\n\
         // in order, at most rows / {t} + groups of them.\n\
         // offsets: i32[groups + 1]."
    ))
    .read("x", x)
    .param("offsets", Elem::I32, Pass::Read, offsets)
    .param("codes", Elem::U8, Pass::Write, codes)
    .write("scales", scales)
    .body(format!(
        "\
{gs}        const long long s = idx / outer, o = idx % outer;
        long long g = 0, before = 0;
        for (; g < groups; ++g) {{
            const long long n = (offsets[g + 1] - offsets[g] + {t} - 1) / {t};
            if (s < before + n) break;
            before += n;
        }}
        if (g == groups) continue;
        const long long lo = offsets[g], kg = offsets[g + 1] - lo, tile = s - before;
        const long long r0 = lo + tile * {t};
        const long long r1 = r0 + {t} < lo + kg ? r0 + {t} : lo + kg;
        float m = 0.0f;
        for (long long r = r0; r < r1; ++r) m = fmaxf(m, fabsf(x[r * outer + o]));
        const float scale = kiln_fp8_scale(m, {max}, {pow2});
        for (long long r = r0; r < r1; ++r) {{
            const float v = x[r * outer + o];
            codes[outer * lo + o * kg + (r - lo)] =
                (unsigned char)(kiln_fp8x2<{e5m2}>(v / scale, 0.0f) & 0xFFu);
        }}
        scales[outer * before + o * ((kg + {t} - 1) / {t}) + tile] = scale;
    }}
",
        gs = grid_stride("    ", "idx", "slots * outer"),
        pow2 = tiles.pow2,
        e5m2 = tiles.e5m2(),
    ))
}

impl Emitter<'_> {
    /// The FP8 copy of `x: f32[outer, k]` (the experts' sorted rows) in 1×T tiles along `k`,
    /// into scratch `slot` (codes) and `slot + 1` (scales), and the launch writing it.
    pub(super) fn row_tiles(
        &mut self,
        node: usize,
        format: Format,
        x: &Arg,
        outer: u64,
        k: u64,
        slot: u32,
    ) -> (Fp8Operand, Work) {
        let tiles = Tiles::of(format, &self.fp8);
        let t = tiles.t;
        assert!(
            k % t == 0,
            "an FP8 expert GEMM contracts {k}, not a multiple of its tiles of {t}"
        );
        let codes = Arg::Scratch {
            slot,
            bytes: (outer * k).max(4),
        };
        let scales = Arg::Scratch {
            slot: slot + 1,
            bytes: 4 * (outer * k / t).max(1),
        };
        let def = fp8_tiles(
            tiles,
            false,
            x.clone(),
            codes.clone(),
            scales.clone(),
            outer,
            k,
        );
        let work = self.work(node, def, Grid::Threads(outer * k / 4));
        let operand = tiled_operand(codes, scales, t);
        (operand, work)
    }

    /// The FP8 copies of `x: f32[rows, outer]` contracted over each of `groups` experts' rows
    /// ([`fp8_group_tiles`]), into scratch `slot` and `slot + 1`, and the launch writing them.
    pub(super) fn group_tiles(
        &mut self,
        node: usize,
        format: Format,
        (groups, rows): (u64, u64),
        x: &Arg,
        outer: u64,
        slot: u32,
    ) -> (Fp8Operand, Work) {
        let tiles = Tiles::of(format, &self.fp8);
        let t = tiles.t;
        let tile_slots = rows / t + groups;
        let codes = Arg::Scratch {
            slot,
            bytes: (outer * rows).max(4),
        };
        let scales = Arg::Scratch {
            slot: slot + 1,
            bytes: 4 * (outer * tile_slots).max(1),
        };
        let offsets = Arg::Scratch {
            slot: 0,
            bytes: 4 * (groups + 1),
        };
        let def = fp8_group_tiles(tiles, x.clone(), offsets, codes.clone(), scales.clone())
            .long("outer", outer)
            .long("groups", groups)
            .long("slots", tile_slots);
        let work = self.work(node, def, Grid::Threads(outer * tile_slots));
        let operand = tiled_operand(codes, scales, t);
        (operand, work)
    }

    /// The FP8 copies of the experts' weights `w` (`groups` matrices, each `[n, k]` stored, or
    /// `[k, n]` when `stored_kn`), each in the spec's weight blocks as the GEMM reads it
    /// (`[n, k]`, K-major), into scratch `slot` and `slot + 1`, and the launch writing them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn expert_blocks(
        &mut self,
        node: usize,
        format: Format,
        groups: u64,
        w: &Arg,
        stored_kn: bool,
        n: u64,
        k: u64,
        slot: u32,
    ) -> (Fp8Operand, Work) {
        let pow2 = self.fp8.scale == ScaleFormat::Pow2;
        let [br, bc] = self.fp8.weight_block;
        let (rows, cols) = if stored_kn { (k, n) } else { (n, k) };
        let per = rows.div_ceil(br) * cols.div_ceil(bc);
        let codes = Arg::Scratch {
            slot,
            bytes: (groups * n * k).max(4),
        };
        let scales = Arg::Scratch {
            slot: slot + 1,
            bytes: 4 * groups * per,
        };
        let out = BlockOut {
            e5m2: format == Format::E5m2,
            transposed: stored_kn,
        };
        let layout = if stored_kn { "_t" } else { "" };
        let rule = if pow2 { "_pow2" } else { "" };
        let def = KernelDef::new(
            format!(
                "fp8_expert_blocks{layout}_{}_{br}x{bc}{rule}",
                format.name()
            ),
            "quantizes the experts' weights to FP8 in blocks, each expert's on its own",
        );
        let outs = [(out, codes.clone(), scales.clone())];
        let def = fp8_blocks(def, pow2, [br, bc], w.clone(), &outs, [rows, cols], true);
        let work = self.work(node, def, Grid::Blocks(groups * per));
        // The copy's blocks, [n, k]-wise: the stored blocks, transposed with the matrix.
        let block = if stored_kn { [bc, br] } else { [br, bc] };
        let operand = Fp8Operand {
            codes,
            scales,
            block,
            cublaslt_scale_mode: block_scale_mode(block),
        };
        (operand, work)
    }
}

/// cuBLASLt's scale mode for activations in 1×`t` tiles: `VEC128_32F` at t = 128, none
/// otherwise (cuBLASLt takes no other tile).
fn tile_scale_mode(t: u64) -> Option<&'static str> {
    (t == 128).then_some("VEC128_32F")
}

/// cuBLASLt's scale mode for weights in `block`s (as the GEMM reads them): `BLK128x128_32F`
/// for 128×128 blocks, none otherwise.
fn block_scale_mode(block: [u64; 2]) -> Option<&'static str> {
    (block == [128, 128]).then_some("BLK128x128_32F")
}

/// An operand quantized in 1×`t` tiles along k.
fn tiled_operand(codes: Arg, scales: Arg, t: u64) -> Fp8Operand {
    Fp8Operand {
        codes,
        scales,
        block: [1, t],
        cublaslt_scale_mode: tile_scale_mode(t),
    }
}
