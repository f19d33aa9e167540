//! The compiled form of an expression: a straight-line program of [`Instr`]s over operand
//! positions, evaluated in one forward sweep and differentiated by one reverse sweep.

use super::{BinOp, Expr, Func};

/// One instruction of a [`Compiled`] expression; operands (`usize`) are indices of earlier
/// instructions, so a program evaluates in one forward sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// Operand `i` of the expression.
    Var(usize),
    /// A constant.
    Num(f64),
    /// Negation.
    Neg(usize),
    /// A binary operation.
    Bin(BinOp, usize, usize),
    /// A power with a small positive integer exponent.
    Pow(usize, u32),
    /// A built-in function.
    Call(Func, usize),
}

/// An expression compiled for fast evaluation over many elements: a straight-line program
/// whose steps read earlier steps, with variables bound to operand positions. Evaluates in
/// f64, and gives every partial derivative by one reverse sweep over the same steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    steps: Vec<Instr>,
    arity: usize,
}

impl Expr {
    /// Compiles the expression with `vars[i]` bound to operand `i`. Fails if the expression
    /// reads a variable that `vars` does not name.
    pub fn compile(&self, vars: &[&str]) -> Result<Compiled, String> {
        fn go(e: &Expr, vars: &[&str], steps: &mut Vec<Instr>) -> Result<usize, String> {
            let step = match e {
                Expr::Var(name) => match vars.iter().position(|v| v == name) {
                    Some(i) => Instr::Var(i),
                    None => return Err(format!("`{name}` is not an operand")),
                },
                Expr::Num(x) => Instr::Num(*x),
                Expr::Neg(a) => Instr::Neg(go(a, vars, steps)?),
                Expr::Bin(op, a, b) => {
                    let a = go(a, vars, steps)?;
                    let b = go(b, vars, steps)?;
                    Instr::Bin(*op, a, b)
                }
                Expr::Pow(a, n) => Instr::Pow(go(a, vars, steps)?, *n),
                Expr::Call(f, a) => Instr::Call(*f, go(a, vars, steps)?),
            };
            steps.push(step);
            Ok(steps.len() - 1)
        }
        let mut steps = Vec::new();
        go(self, vars, &mut steps)?;
        Ok(Compiled {
            steps,
            arity: vars.len(),
        })
    }
}

impl Compiled {
    /// Number of operands.
    pub fn arity(&self) -> usize {
        self.arity
    }

    /// The instructions, for evaluators that run the program another way (over blocks of
    /// elements in the compute type, say). The last instruction is the result.
    pub fn instrs(&self) -> &[Instr] {
        &self.steps
    }

    /// Number of instructions: the scratch length one evaluation needs.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the program is empty (never, for a compiled expression).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The operands `(a, b)` when the expression is exactly `a + b` of two operands, the
    /// residual add, which callers may run as a plain vector add.
    pub fn as_sum_of_two(&self) -> Option<(usize, usize)> {
        match self.steps.as_slice() {
            [Instr::Var(a), Instr::Var(b), Instr::Bin(BinOp::Add, 0, 1)] => Some((*a, *b)),
            _ => None,
        }
    }

    /// Scratch space one evaluation needs; reuse it across elements.
    pub fn scratch(&self) -> Vec<f64> {
        vec![0.0; self.steps.len()]
    }

    /// The value at `x` (one value per operand), using `scratch` for the steps.
    pub fn eval(&self, x: &[f64], scratch: &mut [f64]) -> f64 {
        for (i, step) in self.steps.iter().enumerate() {
            scratch[i] = match *step {
                Instr::Var(v) => x[v],
                Instr::Num(c) => c,
                Instr::Neg(a) => -scratch[a],
                Instr::Bin(op, a, b) => op.apply(scratch[a], scratch[b]),
                Instr::Pow(a, n) => scratch[a].powi(i32::try_from(n).unwrap_or(i32::MAX)),
                Instr::Call(f, a) => f.apply(scratch[a]),
            };
        }
        scratch[self.steps.len() - 1]
    }

    /// The value at `x` and its partial derivatives, written to `grad` (one per operand).
    /// `scratch` and `adjoint` must each hold [`Compiled::scratch`]'s length.
    pub fn eval_grad(
        &self,
        x: &[f64],
        scratch: &mut [f64],
        adjoint: &mut [f64],
        grad: &mut [f64],
    ) -> f64 {
        let y = self.eval(x, scratch);
        adjoint.fill(0.0);
        grad.fill(0.0);
        let last = self.steps.len() - 1;
        adjoint[last] = 1.0;
        for i in (0..self.steps.len()).rev() {
            let g = adjoint[i];
            if g == 0.0 {
                continue;
            }
            match self.steps[i] {
                Instr::Var(v) => grad[v] += g,
                Instr::Num(_) => {}
                Instr::Neg(a) => adjoint[a] -= g,
                Instr::Bin(op, a, b) => match op {
                    BinOp::Add => {
                        adjoint[a] += g;
                        adjoint[b] += g;
                    }
                    BinOp::Sub => {
                        adjoint[a] += g;
                        adjoint[b] -= g;
                    }
                    BinOp::Mul => {
                        adjoint[a] += g * scratch[b];
                        adjoint[b] += g * scratch[a];
                    }
                    BinOp::Div => {
                        adjoint[a] += g / scratch[b];
                        adjoint[b] -= g * scratch[a] / (scratch[b] * scratch[b]);
                    }
                },
                Instr::Pow(a, n) => {
                    let n_i = i32::try_from(n).unwrap_or(i32::MAX);
                    adjoint[a] += g * f64::from(n) * scratch[a].powi(n_i - 1);
                }
                Instr::Call(f, a) => adjoint[a] += g * f.derivative(scratch[a]),
            }
        }
        y
    }
}
