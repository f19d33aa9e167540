//! Copies and data movement: fill, split and concat (column copies; a concat whose output has
//! an FP8 copy quantizes on the way out), expand and sum over an axis, the embedding's lookup
//! and scatter-add, and the bias gradient's column sums.

use super::fp8::Tiles;
use super::{const_ptrs, elementwise_launch, int, val, Arg, Emitter, Work, NAME};
use crate::ir::{Node, ValueId};

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

pub(super) const BIAS_GRAD: &str = "\
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

impl Emitter<'_> {
    fn copy_columns(&mut self, node: usize) -> String {
        self.fixed(
            "copy_columns",
            "copies a block of columns (split, concat)",
            COPY_COLUMNS,
            node,
        )
    }

    pub(super) fn fill_launch(&mut self, node: usize, out: ValueId, value: f64) -> Work {
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

    /// A split: one column copy per output.
    pub(super) fn split(&mut self, index: usize, node: &Node, sizes: &[u64]) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
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

    /// A concat: one column copy per input, or one quantizing kernel for an output with an FP8 copy.
    pub(super) fn concat(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
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

    /// Repeats an axis of size 1 `n` times.
    pub(super) fn expand(&mut self, index: usize, node: &Node, axis: u32, n: u64) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let s = self.shape(ins[0]);
        let outer: u64 = s[..axis as usize].iter().product();
        let inner: u64 = s[axis as usize + 1..].iter().product();
        let k = self.fixed("expand_axis", "repeats an axis of size 1", EXPAND, index);
        vec![elementwise_launch(
            k,
            outer * n * inner,
            vec![val(ins[0]), val(outs[0]), int(outer), int(n), int(inner)],
        )]
    }

    /// Sums an axis, keeping it.
    pub(super) fn sum_axis(&mut self, index: usize, node: &Node, axis: u32) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
        let s = self.shape(ins[0]);
        let outer: u64 = s[..axis as usize].iter().product();
        let len = s[axis as usize];
        let inner: u64 = s[axis as usize + 1..].iter().product();
        let k = self.fixed("sum_axis", "sums an axis, keeping it", SUM_AXIS, index);
        vec![elementwise_launch(
            k,
            outer * inner,
            vec![val(ins[0]), val(outs[0]), int(outer), int(len), int(inner)],
        )]
    }

    /// The embedding's row lookup.
    pub(super) fn embedding(&mut self, index: usize, node: &Node) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
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

    /// The embedding's gradient: zeros, then a scatter-add of rows.
    pub(super) fn embedding_grad(&mut self, index: usize, node: &Node, vocab: u64) -> Vec<Work> {
        let ins = &node.inputs;
        let outs = &node.outputs;
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
                    int(vocab),
                ],
            ),
        ]
    }
}
