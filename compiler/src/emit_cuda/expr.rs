//! Expressions: elementwise `map` kernels (an activation-language expression over its operands,
//! quantized to FP8 on the way out where a GEMM reads the result) and their gradients, and the
//! C statements that evaluate a compiled expression and its reverse sweep (the experts'
//! activations use them too).

use std::fmt::Write;

use super::fp8::{quantizing_loop, TileOut, Tiles, GRID_START, GRID_STRIDE};
use super::{
    const_ptrs, elementwise_launch, float_lit, int, path_base, val, Arg, Emitter, Work, NAME,
};
use crate::dsl::expr::{BinOp, Compiled, Expr, Instr};
use crate::ir::Node;
use crate::names::comment_text;

/// The statements evaluating `expr` over `inputs` (C expressions, one per operand) into `t0…`,
/// and the name of the result.
pub(super) fn expr_forward(
    c: &Compiled,
    inputs: &[String],
    indent: &str,
    out: &mut String,
) -> String {
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
pub(super) fn expr_gradient(
    c: &Compiled,
    inputs: &[String],
    seed: &str,
    indent: &str,
    out: &mut String,
) {
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

impl Emitter<'_> {
    pub(super) fn map(
        &mut self,
        index: usize,
        node: &Node,
        expr: &Expr,
        vars: &[String],
    ) -> Vec<Work> {
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

    pub(super) fn map_grad(
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
}
