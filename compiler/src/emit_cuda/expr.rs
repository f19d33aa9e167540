//! Expressions: elementwise `map` kernels (an activation-language expression over its operands,
//! quantized to FP8 on the way out where a GEMM reads the result) and their gradients, and the
//! C statements that evaluate a compiled expression and its reverse sweep (the experts'
//! activations use them too).

use std::fmt::Write;

use super::fp8::{quantizing_loop, TileOut, Tiles};
use super::kernel::{GRID_START, GRID_STRIDE};
use super::{
    float_lit, grid_stride, path_base, val, Arg, Elem, Emitter, Grid, KernelDef, Pass, Work,
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
        let base = match &quantized {
            None => format!("map_{}", path_base(&node.path)),
            Some((tiles, ..)) => format!("map_{}_q{}", path_base(&node.path), tiles.suffix()),
        };
        let mut def = KernelDef::new(base, format!("y = {what}"));
        for (x, &v) in ins.iter().zip(&node.inputs) {
            def = def.read(x, val(v));
        }
        let (def, threads) = match quantized {
            None => {
                let loads: Vec<String> = ins.iter().map(|x| format!("{x}[i]")).collect();
                let mut body = String::new();
                let y = expr_forward(&c, &loads, "        ", &mut body);
                let def = def
                    .doc(format!(
                        "// y = {what}, elementwise.\n// {shapes}; y: f32[n]"
                    ))
                    .write("y", val(node.outputs[0]))
                    .long("n", n)
                    .body(format!(
                        "{}{body}        y[i] = {y};\n    }}\n",
                        grid_stride("    ", "i", "n")
                    ));
                (def, n)
            }
            Some((tiles, codes, scales)) => {
                // Four consecutive elements per thread, quantized as they are written.
                let loads: Vec<String> = ins.iter().map(|x| format!("{x}[j]")).collect();
                let mut body = String::new();
                let y = expr_forward(&c, &loads, "", &mut body);
                let mut element: Vec<String> = body.lines().map(str::to_string).collect();
                element.push(format!("const float value = {y};"));
                let def = def
                    .doc(format!(
                        "// y = {what}, elementwise.\n// {shapes}; y: f32[n], n a multiple of {}\n{}",
                        tiles.t,
                        tiles.comment("y"),
                    ))
                    .write("y", val(node.outputs[0]))
                    .param("codes", Elem::U32, Pass::Write, codes)
                    .write("scales", scales)
                    .long("n", n)
                    .body(format!(
                        "    const long long n4 = n / 4;\n{}",
                        tiles.grid_loop(&element, Some("y"))
                    ));
                (def, n / 4)
            }
        };
        vec![self.work(index, def, Grid::Threads(threads))]
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
        let n = self.elements(node.outputs[0]);
        let mut base = format!("map_grad_{}", path_base(&node.path));
        let mut def = KernelDef::new("", format!("gradient of y = {what}"));
        for (x, &v) in ins.iter().zip(&node.inputs) {
            def = def.read(x, val(v));
        }
        def = def.read("dy", val(node.inputs[vars.len()]));
        let (def, threads) = if quantized.iter().all(Option::is_none) {
            for (w, &dx) in wrt.iter().zip(&node.outputs) {
                def = def.write(&format!("dx{w}"), val(dx));
            }
            let loads: Vec<String> = ins.iter().map(|x| format!("{x}[i]")).collect();
            let mut body = String::new();
            expr_gradient(&c, &loads, "dy[i]", "        ", &mut body);
            for w in wrt {
                let _ = writeln!(body, "        dx{w}[i] = d{w};");
            }
            let def = def
                .doc(format!(
                    "// The gradient of y = {what} with respect to {wrt_names}: dx_w = dy · ∂y/∂x_w.\n\
                     // x*, dy, dx*: f32[n]"
                ))
                .long("n", n)
                .body(format!("{}{body}    }}\n", grid_stride("    ", "i", "n")));
            (def, n)
        } else {
            // Four consecutive elements per thread; the quantized gradients are quantized
            // as they are written.
            for (w, &dx) in wrt.iter().zip(&node.outputs) {
                def = def.write(&format!("dx{w}"), val(dx));
            }
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
                        def = def
                            .param(&format!("codes{w}"), Elem::U32, Pass::Write, codes.clone())
                            .write(&format!("scales{w}"), scales.clone());
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
            let def = def
                .doc(format!(
                    "// The gradient of y = {what} with respect to {wrt_names}: dx_w = dy · ∂y/∂x_w.\n\
                     // x*, dy, dx*: f32[n], n a multiple of {}\n{}",
                    names[0].0.t,
                    comments.join("\n"),
                ))
                .long("n", n)
                .body(format!(
                    "    const long long n4 = n / 4;\n{}",
                    quantizing_loop("    ", GRID_START, GRID_STRIDE, "n4", &element, &outs)
                ));
            (def, n / 4)
        };
        let def = def.rename(base);
        vec![self.work(index, def, Grid::Threads(threads))]
    }
}
