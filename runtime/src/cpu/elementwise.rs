//! Elementwise expressions of the spec's activation language (the IR's `map` and `map_grad`)
//! over tensors of one shape.
//!
//! An expression is compiled once ([`Compiled`]) and then run over blocks of [`BLOCK`]
//! elements: each instruction loops over a whole block, so the loops are simple enough for
//! the compiler to vectorize and a block's intermediate values stay in L1. The gradient runs
//! the same instructions forward over a block, then sweeps them in reverse with one adjoint
//! block per instruction. Arithmetic is in the compute type; the built-in functions are
//! evaluated in f64 ([`Func::apply`]) and rounded once. Two common shapes have closed forms
//! that skip the interpreter altogether: left-to-right sums of operands (residual adds and
//! gradient accumulation) and `silu(gate) * up`. Every form rounds exactly as the expression
//! evaluated step by step in the compute type would, so fusing a chain of maps into one never
//! changes a result.

use kiln_ir::expr::{BinOp, Compiled, Expr, Func, Instr};
use rayon::prelude::*;

use super::simd;
use super::Real;

/// Elements one instruction processes at a time.
const BLOCK: usize = 256;
/// Elements per parallel task (a multiple of [`BLOCK`]).
pub const CHUNK: usize = 16 * 1024;

/// A compiled elementwise expression, ready to run over slices.
#[derive(Clone, Debug)]
pub struct Elementwise {
    compiled: Compiled,
    form: Form,
}

/// How an expression runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Form {
    /// A sum of operands, `Σ x_{terms[j]}` (an operand may appear more than once).
    Sum(Vec<usize>),
    /// `silu(gate) * up`, in either operand order.
    SwiGlu { gate: usize, up: usize },
    /// Anything else: the block interpreter.
    General,
}

impl Elementwise {
    /// Compiles `expr` with `vars[i]` bound to operand `i`.
    pub fn new(expr: &Expr, vars: &[&str]) -> Result<Self, String> {
        let compiled = expr.compile(vars)?;
        let form = recognize(expr, vars, &compiled);
        Ok(Elementwise { compiled, form })
    }

    /// Number of operands.
    pub fn arity(&self) -> usize {
        self.compiled.arity()
    }

    /// `y = expr(xs…)`; every operand has `n` elements.
    pub fn forward<T: Real>(&self, xs: &[&[T]]) -> Vec<T> {
        let n = xs.first().map_or(0, |x| x.len());
        debug_assert!(xs.iter().all(|x| x.len() == n));
        let mut y = vec![T::ZERO; n];
        let instrs = self.compiled.instrs();
        y.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let lo = chunk * CHUNK;
                match &self.form {
                    Form::Sum(terms) => {
                        out.copy_from_slice(&xs[terms[0]][lo..lo + out.len()]);
                        for &t in &terms[1..] {
                            for (o, &x) in out.iter_mut().zip(&xs[t][lo..]) {
                                *o += x;
                            }
                        }
                    }
                    Form::SwiGlu { gate, up } => {
                        let (g, u) = (&xs[*gate][lo..], &xs[*up][lo..]);
                        simd::swiglu_values(g, u, out);
                    }
                    Form::General => {
                        let mut regs = vec![T::ZERO; instrs.len() * BLOCK];
                        for (b, block) in out.chunks_mut(BLOCK).enumerate() {
                            let len = block.len();
                            eval_block(instrs, xs, lo + b * BLOCK, len, &mut regs);
                            let last = (instrs.len() - 1) * BLOCK;
                            block.copy_from_slice(&regs[last..last + len]);
                        }
                    }
                }
            });
        y
    }

    /// `dy · ∂expr/∂x_w` for each operand `w` in `wrt`.
    pub fn backward<T: Real>(&self, xs: &[&[T]], dy: &[T], wrt: &[u32]) -> Vec<Vec<T>> {
        let n = dy.len();
        debug_assert!(xs.iter().all(|x| x.len() == n));
        let mut outs: Vec<Vec<T>> = wrt.iter().map(|_| vec![T::ZERO; n]).collect();
        // One task per chunk of elements, holding its slice of every output.
        let mut iters: Vec<_> = outs.iter_mut().map(|o| o.chunks_mut(CHUNK)).collect();
        let tasks: Vec<Vec<&mut [T]>> = (0..n.div_ceil(CHUNK))
            .map(|_| iters.iter_mut().filter_map(Iterator::next).collect())
            .collect();
        let instrs = self.compiled.instrs();
        tasks
            .into_par_iter()
            .enumerate()
            .for_each(|(chunk, mut parts)| {
                let lo = chunk * CHUNK;
                let len = (n - lo).min(CHUNK);
                let dy = &dy[lo..lo + len];
                match &self.form {
                    Form::Sum(terms) => {
                        for (part, &w) in parts.iter_mut().zip(wrt) {
                            let times = terms.iter().filter(|&&t| t == w as usize).count();
                            let k = T::from_f64(times as f64);
                            for (o, &g) in part.iter_mut().zip(dy) {
                                *o = g * k;
                            }
                        }
                    }
                    Form::SwiGlu { gate, up } => {
                        let (g, u) = (&xs[*gate][lo..], &xs[*up][lo..]);
                        for (part, &w) in parts.iter_mut().zip(wrt) {
                            simd::swiglu_input_grad(g, u, dy, w as usize == *gate, part);
                        }
                    }
                    Form::General => {
                        let mut regs = vec![T::ZERO; instrs.len() * BLOCK];
                        let mut adj = vec![T::ZERO; instrs.len() * BLOCK];
                        for b in 0..len.div_ceil(BLOCK) {
                            let at = b * BLOCK;
                            let blen = (len - at).min(BLOCK);
                            eval_block(instrs, xs, lo + at, blen, &mut regs);
                            adjoint_block(instrs, &regs, &dy[at..at + blen], blen, &mut adj);
                            // Each occurrence of operand w contributes its adjoint.
                            for (part, &w) in parts.iter_mut().zip(wrt) {
                                let out = &mut part[at..at + blen];
                                for (k, ins) in instrs.iter().enumerate() {
                                    if *ins == Instr::Var(w as usize) {
                                        for (o, &a) in out.iter_mut().zip(&adj[k * BLOCK..]) {
                                            *o += a;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
        outs
    }
}

/// `a + b` elementwise.
pub fn add<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
    let mut y = a.to_vec();
    add_assign(&mut y, b);
    y
}

/// `y += b` elementwise.
pub fn add_assign<T: Real>(y: &mut [T], b: &[T]) {
    debug_assert_eq!(y.len(), b.len());
    y.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(y, b)| {
            for (y, &b) in y.iter_mut().zip(b) {
                *y += b;
            }
        });
}

/// The closed form an expression has, if any.
fn recognize(expr: &Expr, vars: &[&str], compiled: &Compiled) -> Form {
    if let Some(terms) = left_sum(compiled.instrs()) {
        return Form::Sum(terms);
    }
    let Expr::Bin(BinOp::Mul, a, b) = expr else {
        return Form::General;
    };
    for (s, u) in [(a, b), (b, a)] {
        if let (Expr::Call(Func::Silu, inner), Expr::Var(up)) = (s.as_ref(), u.as_ref()) {
            if let Expr::Var(gate) = inner.as_ref() {
                let gate = vars.iter().position(|v| v == gate);
                let up = vars.iter().position(|v| v == up);
                if let (Some(gate), Some(up)) = (gate, up) {
                    if gate != up {
                        return Form::SwiGlu { gate, up };
                    }
                }
            }
        }
    }
    Form::General
}

/// The operands of `((x₀ + x₁) + x₂) + …`, summed left to right, if that is the program. (A
/// sum grouped another way rounds differently, so it stays with the interpreter, which keeps
/// the expression's order.)
fn left_sum(instrs: &[Instr]) -> Option<Vec<usize>> {
    let Some(Instr::Var(first)) = instrs.first() else {
        return None;
    };
    let mut terms = vec![*first];
    let mut acc = 0;
    for pair in instrs[1..].chunks(2) {
        match *pair {
            [Instr::Var(v), Instr::Bin(BinOp::Add, a, b)] if a == acc && b == acc + 1 => {
                terms.push(v);
                acc += 2;
            }
            _ => return None,
        }
    }
    Some(terms)
}

/// Whether `expr` over `vars` is `silu(gate) * up` with `gate` operand 0 and `up` operand 1.
pub fn is_swiglu(expr: &Expr, vars: &[&str]) -> bool {
    match expr.compile(vars) {
        Ok(c) => recognize(expr, vars, &c) == Form::SwiGlu { gate: 0, up: 1 },
        Err(_) => false,
    }
}

/// `silu(g)·u` and its partial derivatives by `g` and `u` at one element.
#[inline]
pub fn swiglu<T: Real>(g: T, u: T) -> (T, T, T) {
    let s = T::ONE / (T::ONE + (-g).exp());
    let silu = g * s;
    (silu * u, u * s * (T::ONE + g * (T::ONE - s)), silu)
}

/// Runs every instruction over elements `lo..lo + len`; instruction `k`'s values land in
/// `regs[k·BLOCK..k·BLOCK + len]`.
fn eval_block<T: Real>(instrs: &[Instr], xs: &[&[T]], lo: usize, len: usize, regs: &mut [T]) {
    for (k, ins) in instrs.iter().enumerate() {
        let (done, rest) = regs.split_at_mut(k * BLOCK);
        let out = &mut rest[..len];
        let reg = |i: usize| &done[i * BLOCK..i * BLOCK + len];
        match *ins {
            Instr::Var(v) => out.copy_from_slice(&xs[v][lo..lo + len]),
            Instr::Num(c) => out.fill(T::from_f64(c)),
            Instr::Neg(a) => {
                for (o, &a) in out.iter_mut().zip(reg(a)) {
                    *o = -a;
                }
            }
            Instr::Bin(op, a, b) => {
                let (a, b) = (reg(a), reg(b));
                let it = out.iter_mut().zip(a.iter().zip(b));
                match op {
                    BinOp::Add => it.for_each(|(o, (&a, &b))| *o = a + b),
                    BinOp::Sub => it.for_each(|(o, (&a, &b))| *o = a - b),
                    BinOp::Mul => it.for_each(|(o, (&a, &b))| *o = a * b),
                    BinOp::Div => it.for_each(|(o, (&a, &b))| *o = a / b),
                }
            }
            Instr::Pow(a, n) => {
                for (o, &a) in out.iter_mut().zip(reg(a)) {
                    *o = powi(a, n);
                }
            }
            Instr::Call(f, a) => {
                for (o, &a) in out.iter_mut().zip(reg(a)) {
                    *o = T::from_f64(f.apply(a.to_f64()));
                }
            }
        }
    }
}

/// The reverse sweep: `adj[k·BLOCK + j]` becomes `dy_j · ∂y/∂(instruction k)` at element `j`,
/// given the forward values in `regs`.
fn adjoint_block<T: Real>(instrs: &[Instr], regs: &[T], dy: &[T], len: usize, adj: &mut [T]) {
    adj.fill(T::ZERO);
    let last = instrs.len() - 1;
    adj[last * BLOCK..last * BLOCK + len].copy_from_slice(dy);
    let reg = |i: usize| &regs[i * BLOCK..i * BLOCK + len];
    for k in (0..instrs.len()).rev() {
        // Operands precede instruction k, so its adjoint is final and lies above theirs.
        let (lower, upper) = adj.split_at_mut(k * BLOCK);
        let g = &upper[..len];
        let mut add = |i: usize, f: &dyn Fn(usize) -> T| {
            for (j, a) in lower[i * BLOCK..i * BLOCK + len].iter_mut().enumerate() {
                *a += f(j);
            }
        };
        match instrs[k] {
            Instr::Var(_) | Instr::Num(_) => {}
            Instr::Neg(a) => add(a, &|j| -g[j]),
            Instr::Bin(op, a, b) => {
                let (va, vb) = (reg(a), reg(b));
                match op {
                    BinOp::Add => {
                        add(a, &|j| g[j]);
                        add(b, &|j| g[j]);
                    }
                    BinOp::Sub => {
                        add(a, &|j| g[j]);
                        add(b, &|j| -g[j]);
                    }
                    BinOp::Mul => {
                        add(a, &|j| g[j] * vb[j]);
                        add(b, &|j| g[j] * va[j]);
                    }
                    BinOp::Div => {
                        add(a, &|j| g[j] / vb[j]);
                        add(b, &|j| -(g[j] * va[j] / (vb[j] * vb[j])));
                    }
                }
            }
            Instr::Pow(a, n) => {
                let va = reg(a);
                let k = T::from_f64(f64::from(n));
                add(a, &|j| g[j] * k * powi(va[j], n - 1));
            }
            Instr::Call(f, a) => {
                let va = reg(a);
                add(a, &|j| g[j] * T::from_f64(f.derivative(va[j].to_f64())));
            }
        }
    }
}

/// `x^n` by repeated multiplication (`x^0 = 1`).
#[inline]
fn powi<T: Real>(x: T, n: u32) -> T {
    let mut y = T::ONE;
    for _ in 0..n {
        y *= x;
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::dsl::expr::parse_expr;

    /// The block interpreter and the closed forms agree with per-element f64 evaluation.
    #[test]
    fn agrees_with_scalar_evaluation() {
        let cases: &[(&str, &[&str])] = &[
            ("a + b", &["a", "b"]),
            ("g0 + g1 + g2 + g0", &["g0", "g1", "g2"]),
            ("silu(gate) * up", &["gate", "up"]),
            ("up * silu(gate)", &["gate", "up"]),
            ("gelu_tanh(x)", &["x"]),
            ("x^3 / (1 + y * y) - -x + exp(-y) * 0.5", &["x", "y"]),
            ("softplus(a) * tanh(b) - relu(a - b)", &["a", "b"]),
        ];
        // Lengths that exercise partial blocks and several parallel chunks.
        for n in [1, 255, 257, CHUNK + 300] {
            for (src, vars) in cases {
                let expr = parse_expr(src, vars).unwrap();
                let e = Elementwise::new(&expr, vars).unwrap();
                let c = expr.compile(vars).unwrap();
                let xs: Vec<Vec<f64>> = (0..vars.len())
                    .map(|v| {
                        (0..n)
                            .map(|i| ((i * 7 + v * 13) % 23) as f64 / 5.0 - 2.1)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f64]> = xs.iter().map(Vec::as_slice).collect();
                let dy: Vec<f64> = (0..n).map(|i| (i % 5) as f64 - 1.5).collect();
                let wrt: Vec<u32> = (0..vars.len() as u32).rev().collect();
                let y = e.forward(&refs);
                let grads = e.backward(&refs, &dy, &wrt);
                let mut s = c.scratch();
                let mut adj = c.scratch();
                let mut g = vec![0.0; vars.len()];
                for i in 0..n {
                    let point: Vec<f64> = xs.iter().map(|x| x[i]).collect();
                    let want = c.eval_grad(&point, &mut s, &mut adj, &mut g);
                    assert!(
                        (y[i] - want).abs() <= 1e-12 * (1.0 + want.abs()),
                        "{src} at {i}"
                    );
                    for (out, &w) in grads.iter().zip(&wrt) {
                        let want = dy[i] * g[w as usize];
                        let got = out[i];
                        assert!(
                            (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                            "d({src})/d{} at {i}: {got} vs {want}",
                            vars[w as usize]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn recognizes_closed_forms() {
        let form = |src: &str, vars: &[&str]| {
            let expr = parse_expr(src, vars).unwrap();
            Elementwise::new(&expr, vars).unwrap().form
        };
        assert_eq!(form("a + b + a", &["a", "b"]), Form::Sum(vec![0, 1, 0]));
        assert_eq!(form("a", &["a"]), Form::Sum(vec![0]));
        assert_eq!(form("a + (b + a)", &["a", "b"]), Form::General);
        assert_eq!(
            form("up * silu(gate)", &["gate", "up"]),
            Form::SwiGlu { gate: 0, up: 1 }
        );
        assert_eq!(form("silu(a) * a", &["a"]), Form::General);
        assert_eq!(form("a - b", &["a", "b"]), Form::General);
    }
}
