//! RoPE: the rotation of every head's pairs (either pair layout) by its position's angle, and
//! its gradient (the inverse rotation), reading the cos/sin tables the runtime fills
//! (`RopeTable`, one per distinct table).

use std::fmt::Write;

use super::{elementwise_launch, int, val, Arg, Emitter, RopeTable, Work, NAME};
use crate::ir::{Node, RopePairs};
use crate::model::Yarn;

impl Emitter<'_> {
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

    pub(super) fn rope(
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
