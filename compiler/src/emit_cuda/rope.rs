//! RoPE: the rotation of every head's pairs (either pair layout) by its position's angle, and
//! its gradient (the inverse rotation), reading the cos/sin tables the runtime fills
//! (`RopeTable`, one per distinct table); and decoding's RoPE at positions, each row rotated
//! by its own position read from the positions input, from a table covering the KV cache.

use std::fmt::Write;

use super::{grid_stride, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, RopeTable, Work};
use crate::ir::{Node, RopePairs};
use crate::model::Yarn;

/// A pair layout's name and the indices, within a head, of pair `i`'s two elements.
fn pair_indices(pairs: RopePairs, half: u64) -> (&'static str, String, String) {
    match pairs {
        RopePairs::Interleaved => ("interleaved", "2 * i".into(), "2 * i + 1".into()),
        RopePairs::Halves => ("halves", "i".into(), format!("i + {half}")),
    }
}

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
        let (layout, first, second) = pair_indices(pairs, half);
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
        let doc = std::mem::take(&mut t);
        t.push_str(&grid_stride("    ", "p", "pairs_total"));
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
        let pairs_total = b * t_len * h * half;
        let def = KernelDef::new(
            format!("rope_{dir}_{layout}_d{d}"),
            format!("RoPE {dir}, {layout} pairs, head dim {d}"),
        )
        .doc(doc)
        .read("x", val(node.inputs[0]))
        .read("cos_t", Arg::RopeCos { table })
        .read("sin_t", Arg::RopeSin { table })
        .write("y", val(node.outputs[0]))
        .long("pairs_total", pairs_total)
        .long("t_len", t_len)
        .long("heads", h)
        .body(t);
        vec![self.work(index, def, Grid::Threads(pairs_total))]
    }
}

/// The error code a decode kernel sets for a position at or beyond the cache's capacity.
pub(super) const POSITION_ERROR: u32 = 4;

impl Emitter<'_> {
    /// RoPE of a decode graph (`Op::RopeAt`): row `(b, t)` rotated by the angle of its own
    /// position `positions[b, t]`, from a table covering the KV cache's capacity.
    pub(super) fn rope_at(
        &mut self,
        index: usize,
        node: &Node,
        theta: f64,
        yarn: Option<Yarn>,
        pairs: RopePairs,
    ) -> Vec<Work> {
        let s = self.shape(node.inputs[0]);
        let (rows, h, d) = (s[0] * s[1], s[2], s[3]);
        let half = d / 2;
        let capacity = self.graph.cache_capacity();
        let table = self.rope_table(capacity, d, theta, yarn);
        let (layout, first, second) = pair_indices(pairs, half);
        let mut t = String::new();
        let _ = writeln!(t, "// RoPE at positions (decoding): rotates each pair ({layout}) of every head of row r by the");
        let _ = writeln!(
            t,
            "// angle of the row's own position positions[r], (a, b) → (a·cos − b·sin, a·sin + b·cos)."
        );
        let _ = writeln!(t, "// x, y: f32[rows, H, {d}]; positions: u32[rows]; cos, sin: f32[{capacity}, {half}] (the KV");
        let _ = writeln!(t, "// cache's capacity). One thread per pair. Precondition: positions[r] < {capacity}; a position");
        let _ = writeln!(
            t,
            "// beyond the table sets *error = {POSITION_ERROR} and writes zeros."
        );
        let doc = std::mem::take(&mut t);
        t.push_str(&grid_stride("    ", "p", "pairs_total"));
        let _ = writeln!(t, "        const long long i = p % {half};");
        let _ = writeln!(t, "        const long long head = p / {half};");
        let _ = writeln!(t, "        const unsigned pos = positions[head / heads];");
        let _ = writeln!(t, "        const float* xh = x + head * {d};");
        let _ = writeln!(t, "        float* yh = y + head * {d};");
        let _ = writeln!(t, "        if (pos >= {capacity}u) {{");
        let _ = writeln!(t, "            yh[{first}] = 0.0f;");
        let _ = writeln!(t, "            yh[{second}] = 0.0f;");
        let _ = writeln!(t, "            *error = {POSITION_ERROR};");
        let _ = writeln!(t, "            continue;");
        let _ = writeln!(t, "        }}");
        let _ = writeln!(
            t,
            "        const float c = cos_t[pos * {half}LL + i], s = sin_t[pos * {half}LL + i];"
        );
        let _ = writeln!(t, "        const float a = xh[{first}], b = xh[{second}];");
        let _ = writeln!(t, "        yh[{first}] = a * c - b * s;");
        let _ = writeln!(t, "        yh[{second}] = a * s + b * c;");
        let _ = writeln!(t, "    }}");
        let pairs_total = rows * h * half;
        let def = KernelDef::new(
            format!("rope_at_{layout}_d{d}"),
            format!("RoPE at each row's position (decoding), {layout} pairs, head dim {d}"),
        )
        .doc(doc)
        .read("x", val(node.inputs[0]))
        .param("positions", Elem::U32, Pass::Read, val(node.inputs[1]))
        .read("cos_t", Arg::RopeCos { table })
        .read("sin_t", Arg::RopeSin { table })
        .write("y", val(node.outputs[0]))
        .param("error", Elem::I32, Pass::Write, Arg::ErrorFlag)
        .long("pairs_total", pairs_total)
        .long("heads", h)
        .body(t);
        vec![self.work(index, def, Grid::Threads(pairs_total))]
    }
}
