//! Copies and data movement: fill, split and concat (column copies; a concat whose output has
//! an FP8 copy quantizes on the way out), expand and sum over an axis, the embedding's lookup
//! and scatter-add, and the bias gradient's column sums.

use super::fp8::Tiles;
use super::{grid_stride, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work};
use crate::ir::{Node, ValueId};

/// The copy behind split and concat: columns `[src_off, src_off + width)` of `src` into
/// `[dst_off, dst_off + width)` of `dst`.
#[allow(clippy::too_many_arguments)]
fn copy_columns(
    src: Arg,
    dst: Arg,
    rows: u64,
    width: u64,
    src_cols: u64,
    src_off: u64,
    dst_cols: u64,
    dst_off: u64,
) -> KernelDef {
    KernelDef::new("copy_columns", "copies a block of columns (split, concat)")
        .doc(
            "// Copies columns [src_off, src_off + width) of src: f32[rows, src_cols] into columns\n\
             // [dst_off, dst_off + width) of dst: f32[rows, dst_cols] (split and concat).",
        )
        .read("src", src)
        .write("dst", dst)
        .long("rows", rows)
        .long("width", width)
        .long("src_cols", src_cols)
        .long("src_off", src_off)
        .long("dst_cols", dst_cols)
        .long("dst_off", dst_off)
        .body(format!(
            "    const long long n = rows * width;\n{}\
             \x20       const long long r = i / width, c = i % width;\n\
             \x20       dst[r * dst_cols + dst_off + c] = src[r * src_cols + src_off + c];\n    }}\n",
            grid_stride("    ", "i", "n")
        ))
}

/// `y[i] = value` for all of `y`.
fn fill(y: Arg, value: f64, n: u64) -> KernelDef {
    KernelDef::new("fill", "fills a buffer with a value")
        .doc("// y[i] = value for i < n (gradient seeds, absent gradients).")
        .write("y", y)
        .float("value", value)
        .long("n", n)
        .body(format!(
            "{}        y[i] = value;\n    }}\n",
            grid_stride("    ", "i", "n")
        ))
}

/// The column sums of `dy: [rows, cols]` into `db` (a bias gradient), 32 columns per block.
pub(super) fn bias_grad(dy: Arg, db: Arg, rows: u64, cols: u64) -> KernelDef {
    KernelDef::new("bias_grad", "column sums (a bias gradient)")
        .doc(
            "// Column sums in a fixed order: db[j] = Σ_r dy[r, j]. dy: f32[rows, cols]; db: f32[cols].\n\
             // Block: 32 columns × 8 row lanes.",
        )
        .read("dy", dy)
        .write("db", db)
        .long("rows", rows)
        .long("cols", cols)
        .body(
            "    __shared__ float part[8][33];
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
",
        )
}

impl Emitter<'_> {
    pub(super) fn fill_launch(&mut self, node: usize, out: ValueId, value: f64) -> Work {
        let n = self.elements(out);
        self.work(node, fill(val(out), value, n), Grid::Threads(n))
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
        let shapes = widths
            .iter()
            .enumerate()
            .map(|(i, w)| format!("x{i}: f32[rows, {w}]"))
            .collect::<Vec<_>>()
            .join(", ");
        let base = format!(
            "concat_{}_q{}",
            widths
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("_"),
            tiles.suffix()
        );
        let mut def = KernelDef::new(base, "concat, quantized to FP8 on the way out").doc(format!(
            "// y = concat(x0, …) along the last axis.\n// {shapes}; y: f32[rows, {cols}]\n{}",
            tiles.comment("y")
        ));
        for (i, &x) in node.inputs.iter().enumerate() {
            def = def.read(&format!("x{i}"), val(x));
        }
        let def = def
            .write("y", val(node.outputs[0]))
            .param("codes", Elem::U32, Pass::Write, codes)
            .write("scales", scales)
            .long("rows", rows)
            .body(format!(
                "    const long long n4 = rows * {cols} / 4;\n{}",
                tiles.grid_loop(&element, Some("y"))
            ));
        self.work(index, def, Grid::Threads(rows * cols / 4))
    }

    /// A split: one column copy per output.
    pub(super) fn split(&mut self, index: usize, node: &Node, sizes: &[u64]) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let (rows, cols) = self.rows(ins[0]);
        let mut off = 0;
        let mut work = Vec::new();
        for (&size, &out) in sizes.iter().zip(outs) {
            let def = copy_columns(val(ins[0]), val(out), rows, size, cols, off, size, 0);
            work.push(self.work(index, def, Grid::Threads(rows * size)));
            off += size;
        }
        work
    }

    /// A concat: one column copy per input, or one quantizing kernel for an output with an FP8 copy.
    pub(super) fn concat(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        if let Some(q) = self.fused_copy(index, outs[0]) {
            return vec![self.concat_quantized(index, node, q)];
        }
        let (rows, cols) = self.rows(outs[0]);
        let mut off = 0;
        let mut work = Vec::new();
        for &x in ins {
            let (_, width) = self.rows(x);
            let def = copy_columns(val(x), val(outs[0]), rows, width, width, 0, cols, off);
            work.push(self.work(index, def, Grid::Threads(rows * width)));
            off += width;
        }
        work
    }

    /// Repeats an axis of size 1 `n` times.
    pub(super) fn expand(&mut self, index: usize, node: &Node, axis: u32, n: u64) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let s = self.shape(ins[0]);
        let outer: u64 = s[..axis as usize].iter().product();
        let inner: u64 = s[axis as usize + 1..].iter().product();
        let def = KernelDef::new("expand_axis", "repeats an axis of size 1")
            .doc("// Repeats the middle axis: x: f32[outer, 1, inner] → y: f32[outer, n, inner].")
            .read("x", val(ins[0]))
            .write("y", val(outs[0]))
            .long("outer", outer)
            .long("n", n)
            .long("inner", inner)
            .body(format!(
                "    const long long total = outer * n * inner;\n{}\
                 \x20       const long long o = i / (n * inner), j = i % inner;\n\
                 \x20       y[i] = x[o * inner + j];\n    }}\n",
                grid_stride("    ", "i", "total")
            ));
        vec![self.work(index, def, Grid::Threads(outer * n * inner))]
    }

    /// Sums an axis, keeping it.
    pub(super) fn sum_axis(&mut self, index: usize, node: &Node, axis: u32) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let s = self.shape(ins[0]);
        let outer: u64 = s[..axis as usize].iter().product();
        let len = s[axis as usize];
        let inner: u64 = s[axis as usize + 1..].iter().product();
        let def = KernelDef::new("sum_axis", "sums an axis, keeping it")
            .doc("// Sums the middle axis in order: x: f32[outer, len, inner] → y: f32[outer, 1, inner].")
            .read("x", val(ins[0]))
            .write("y", val(outs[0]))
            .long("outer", outer)
            .long("len", len)
            .long("inner", inner)
            .body(format!(
                "    const long long total = outer * inner;\n{}\
                 \x20       const long long o = i / inner, j = i % inner;\n\
                 \x20       float acc = 0.0f;\n\
                 \x20       for (long long k = 0; k < len; ++k) acc += x[(o * len + k) * inner + j];\n\
                 \x20       y[i] = acc;\n    }}\n",
                grid_stride("    ", "i", "total")
            ));
        vec![self.work(index, def, Grid::Threads(outer * inner))]
    }

    /// The embedding's row lookup.
    pub(super) fn embedding(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let t = self.shape(ins[0]);
        let (rows, d) = (self.elements(ins[1]), t[1]);
        let def = KernelDef::new("embedding_fwd", "row lookup")
            .doc(
                "// Row lookup: y[r, :] = table[ids[r], :]. An id outside the vocabulary sets *error = 1 and\n\
                 // writes zeros. table: f32[vocab, d]; ids: u32[rows]; y: f32[rows, d].",
            )
            .read("table", val(ins[0]))
            .param("ids", Elem::U32, Pass::Read, val(ins[1]))
            .write("y", val(outs[0]))
            .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
            .long("rows", rows)
            .long("d", d)
            .long("vocab", t[0])
            .body(format!(
                "    const long long n = rows * d;\n{}\
                 \x20       const long long r = i / d, j = i % d;\n\
                 \x20       const unsigned id = ids[r];\n\
                 \x20       if (id < vocab) {{\n\
                 \x20           y[i] = table[(long long)id * d + j];\n\
                 \x20       }} else {{\n\
                 \x20           y[i] = 0.0f;\n\
                 \x20           *error = 1;\n\
                 \x20       }}\n    }}\n",
                grid_stride("    ", "i", "n")
            ));
        vec![self.work(index, def, Grid::Threads(rows * d))]
    }

    /// The embedding's gradient: zeros, then a scatter-add of rows.
    pub(super) fn embedding_grad(&mut self, index: usize, node: &Node, vocab: u64) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let (rows, d) = self.rows(ins[1]);
        let zero = self.fill_launch(index, outs[0], 0.0);
        let def = KernelDef::new("embedding_bwd", "scatter-add of rows")
            .doc(
                "// Scatter-add of rows: dtable[ids[r], :] += dy[r, :] (dtable zeroed first by a fill). Atomic\n\
                 // adds: the order of additions, and so the last bits, vary from run to run.\n\
                 // ids: u32[rows]; dy: f32[rows, d]; dtable: f32[vocab, d].",
            )
            .param("ids", Elem::U32, Pass::Read, val(ins[0]))
            .read("dy", val(ins[1]))
            .write("dtable", val(outs[0]))
            .long("rows", rows)
            .long("d", d)
            .long("vocab", vocab)
            .body(format!(
                "    const long long n = rows * d;\n{}\
                 \x20       const long long r = i / d, j = i % d;\n\
                 \x20       const unsigned id = ids[r];\n\
                 \x20       if (id < vocab) atomicAdd(&dtable[(long long)id * d + j], dy[i]);\n    }}\n",
                grid_stride("    ", "i", "n")
            ));
        vec![zero, self.work(index, def, Grid::Threads(rows * d))]
    }
}
