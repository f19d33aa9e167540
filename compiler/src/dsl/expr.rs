//! Elementwise activation expressions such as `"silu(gate) * up"`.
//!
//! The grammar, from loosest to tightest binding:
//!
//! ```text
//! sum     := product (('+' | '-') product)*      left associative
//! product := unary (('*' | '/') unary)*          left associative
//! unary   := '-' unary | power
//! power   := atom ('^' integer)?                 the exponent is a literal from 1 to 8
//! atom    := number | identifier | func '(' sum ')' | '(' sum ')'
//! ```
//!
//! Numbers are decimal literals with an optional fraction and exponent (`2`, `0.5`, `1e-6`,
//! `1.5E+3`) and must be finite; there are no signed literals, so `-1` is a negation. Identifiers
//! are `[A-Za-z_][A-Za-z0-9_]*`; one followed by `(` calls a [`Func`], any other must be one of
//! the variables the caller allows. Exponents do not chain (`x^2^3` is an error, because readers
//! disagree on what it means); write `(x^2)^3` instead. Whitespace is allowed between tokens.
//!
//! Parentheses, calls and negations nest at most [`MAX_NESTING`] levels deep, and the parsed
//! tree is at most [`MAX_TREE_DEPTH`] nodes deep, so parsing, printing, evaluating and dropping
//! an expression never overflow the stack.

use std::fmt;
use std::ops::Range;

use nom::character::complete::{char, digit1, one_of};
use nom::combinator::{opt, recognize};
use nom::{IResult, Parser};

use super::lex::{identifier, is_word_char, symbol, ws, Step};
use super::{closest, DslError};

/// The deepest that parentheses, function calls and negations may nest.
pub const MAX_NESTING: usize = 64;

/// The deepest a parsed expression tree may be, counting every node on the longest path from
/// the root to a leaf. This bounds long operator chains such as `a + b + c + ...`, which nest
/// in the tree even though they need no parentheses.
pub const MAX_TREE_DEPTH: usize = 256;

/// A built-in elementwise function of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    /// `x * sigmoid(x)`.
    Silu,
    /// The exact GELU, `0.5 x (1 + erf(x / sqrt(2)))`.
    Gelu,
    /// The tanh approximation of GELU, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// The hyperbolic tangent.
    Tanh,
    /// `e^x`.
    Exp,
    /// `ln(1 + e^x)`.
    Softplus,
}

impl Func {
    /// Every function, in declaration order.
    pub const ALL: [Func; 8] = [
        Func::Silu,
        Func::Gelu,
        Func::GeluTanh,
        Func::Relu,
        Func::Sigmoid,
        Func::Tanh,
        Func::Exp,
        Func::Softplus,
    ];

    /// The name of this function as written in an expression, e.g. `"gelu_tanh"`.
    pub fn name(self) -> &'static str {
        match self {
            Func::Silu => "silu",
            Func::Gelu => "gelu",
            Func::GeluTanh => "gelu_tanh",
            Func::Relu => "relu",
            Func::Sigmoid => "sigmoid",
            Func::Tanh => "tanh",
            Func::Exp => "exp",
            Func::Softplus => "softplus",
        }
    }

    /// The function with the given name, if there is one.
    pub fn from_name(name: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Applies the function to `x` in double precision.
    ///
    /// Every function is computed in a numerically stable form: `sigmoid`, `silu` and
    /// `gelu_tanh` never form `1 + e^x` for large `x`, `softplus` is `max(x, 0) +
    /// ln(1 + e^-|x|)`, and `gelu` for negative `x` uses `erfc` instead of `1 + erf`, so the
    /// tiny values far in the negative tail keep their relative accuracy. NaN propagates.
    ///
    /// The error function behind `gelu` is implemented in this module from its power series and
    /// continued fraction; `gelu` keeps a relative error below about 2e-13 for every `x`.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Func::Silu => x * sigmoid(x),
            Func::Gelu => {
                let z = x * std::f64::consts::FRAC_1_SQRT_2;
                if x >= 0.0 {
                    0.5 * x * (1.0 + erf(z))
                } else {
                    0.5 * x * erfc(-z)
                }
            }
            Func::GeluTanh => {
                // Since 0.5 (1 + tanh(u)) = sigmoid(2u), this is the stable form of the
                // textbook formula.
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                x * sigmoid(2.0 * u)
            }
            Func::Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Func::Sigmoid => sigmoid(x),
            Func::Tanh => x.tanh(),
            Func::Exp => x.exp(),
            Func::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        }
    }
}

impl Func {
    /// The derivative of the function at `x`, in double precision and in the same stable
    /// forms as [`Func::apply`]. At the kink of `relu` the derivative is taken as 0.
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Func::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Func::Gelu => {
                // Φ(x) + x·φ(x), with Φ from erfc on the negative side like `apply`.
                let z = x * std::f64::consts::FRAC_1_SQRT_2;
                let cdf = if x >= 0.0 {
                    0.5 * (1.0 + erf(z))
                } else {
                    0.5 * erfc(-z)
                };
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                cdf + x * pdf
            }
            Func::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let u = c * (x + 0.044715 * x * x * x);
                let s = sigmoid(2.0 * u);
                let du = c * (1.0 + 3.0 * 0.044715 * x * x);
                s + x * s * (1.0 - s) * 2.0 * du
            }
            Func::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Func::Sigmoid => {
                let s = sigmoid(x);
                s * (1.0 - s)
            }
            Func::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Func::Exp => x.exp(),
            Func::Softplus => sigmoid(x),
        }
    }
}

impl fmt::Display for Func {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The logistic function, computed without overflow for either sign of `x`.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `2 / sqrt(pi)`.
const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// Below this argument `erf` uses its power series; at or above it `erfc` uses its continued
/// fraction.
const ERF_SWITCH: f64 = 2.0;

/// The error function.
///
/// For `|x| < 2` it sums the series `erf(x) = 2/sqrt(pi) e^(-x^2) sum_n 2^n x^(2n+1) /
/// (1 * 3 * ... * (2n+1))`, whose terms are all positive, so nothing cancels; beyond that it
/// is `1 - erfc(|x|)` with the sign restored. Checked against libm on a grid of step 0.001 over
/// [-7, 7], the absolute error is at most about 1.1e-15 (five units in the last place of 1).
fn erf(x: f64) -> f64 {
    if x.abs() < ERF_SWITCH {
        erf_series(x)
    } else if x > 0.0 {
        1.0 - erfc_continued_fraction(x)
    } else if x < 0.0 {
        erfc_continued_fraction(-x) - 1.0
    } else {
        // Only NaN gets here.
        x
    }
}

/// The complementary error function `1 - erf(x)`.
///
/// For `x >= 2` it evaluates the continued fraction `erfc(x) = e^(-x^2)/sqrt(pi) / (x + (1/2)
/// / (x + 1 / (x + (3/2) / (x + 2 / ...))))` from 100 terms down, which keeps full relative
/// accuracy (about 1e-15) far into the tail where `1 - erf(x)` would round to zero. Between -2
/// and 2 it is `1 - erf(x)`, whose relative error grows to about 2e-13 just below 2, and below
/// -2 it is `2 - erfc(-x)`. These bounds come from a comparison with libm on a grid of step
/// 0.001 over [-7, 7].
fn erfc(x: f64) -> f64 {
    if x >= ERF_SWITCH {
        erfc_continued_fraction(x)
    } else if x > -ERF_SWITCH {
        1.0 - erf_series(x)
    } else if x <= -ERF_SWITCH {
        2.0 - erfc_continued_fraction(-x)
    } else {
        // Only NaN gets here.
        x
    }
}

/// The positive-term power series for `erf`, accurate for `|x| < 2`.
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    // About 30 terms reach full precision at |x| = 2; the bound only guards against NaN.
    for n in 1..200 {
        term *= 2.0 * x2 / f64::from(2 * n + 1);
        sum += term;
        if term.abs() <= sum.abs() * 1e-17 {
            break;
        }
    }
    TWO_OVER_SQRT_PI * exp_minus_square(x) * sum
}

/// The continued fraction for `erfc`, accurate for `x >= 2`.
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut t = x;
    for k in (1..=100u32).rev() {
        t = x + 0.5 * f64::from(k) / t;
    }
    exp_minus_square(x) / (std::f64::consts::PI.sqrt() * t)
}

/// `e^(-x^2)`, with `x^2` split so that rounding it does not cost relative accuracy when
/// `x^2` is large: with `h` being `x` rounded down to a multiple of 1/16, `h^2` is exact and
/// `x^2 = h^2 + (x - h)(x + h)`.
fn exp_minus_square(x: f64) -> f64 {
    let x = x.abs();
    if !x.is_finite() || x > 1e4 {
        return (-x * x).exp();
    }
    let h = (x * 16.0).trunc() / 16.0;
    (-h * h).exp() * (-(x - h) * (x + h)).exp()
}

/// A binary arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BinOp {
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
}

impl BinOp {
    /// The operator's symbol, e.g. `"+"`.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }

    /// How tightly the operator binds; see [`precedence`].
    fn precedence(self) -> u8 {
        match self {
            BinOp::Add | BinOp::Sub => 1,
            BinOp::Mul | BinOp::Div => 2,
        }
    }

    /// Applies the operator.
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
}

/// A parsed elementwise expression.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Expr {
    /// A variable, one of those allowed when parsing.
    Var(String),
    /// A finite, non-negative number literal.
    Num(f64),
    /// Negation.
    Neg(Box<Expr>),
    /// A binary operation.
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// A power with a small positive integer exponent.
    Pow(Box<Expr>, u32),
    /// A call of a built-in function.
    Call(Func, Box<Expr>),
}

/// Parses an expression; every variable must be one of `vars`.
pub fn parse_expr(src: &str, vars: &[&str]) -> Result<Expr, DslError> {
    let parser = ExprParser { src, vars };
    let (rest, node) = parser.sum(src, 0)?;
    let rest = ws(rest);
    if rest.is_empty() {
        return Ok(node.expr);
    }
    let help = if rest.starts_with(')') {
        "this `)` has no matching `(`"
    } else if rest.starts_with(is_word_char) || rest.starts_with('(') {
        "write an operator such as `*` between two terms"
    } else {
        "expected an operator or the end of the expression"
    };
    Err(parser.unexpected(rest).with_help(help))
}

impl Expr {
    /// The distinct variable names in the expression, in order of first occurrence.
    pub fn vars(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_vars(&mut out);
        out
    }

    /// Appends the variables of `self` that `out` does not hold yet.
    fn collect_vars<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Var(name) => {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
            Expr::Num(_) => {}
            Expr::Neg(e) | Expr::Pow(e, _) | Expr::Call(_, e) => e.collect_vars(out),
            Expr::Bin(_, a, b) => {
                a.collect_vars(out);
                b.collect_vars(out);
            }
        }
    }

    /// Evaluates the expression in double precision, looking variables up with `env`.
    pub fn eval(&self, env: &dyn Fn(&str) -> f64) -> f64 {
        match self {
            Expr::Var(name) => env(name),
            Expr::Num(x) => *x,
            Expr::Neg(e) => -e.eval(env),
            Expr::Bin(op, a, b) => op.apply(a.eval(env), b.eval(env)),
            Expr::Pow(e, n) => e.eval(env).powi(i32::try_from(*n).unwrap_or(i32::MAX)),
            Expr::Call(func, e) => func.apply(e.eval(env)),
        }
    }
}

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

/// How tightly an expression binds when printed: 1 for sums, 2 for products, 3 for negations,
/// 4 for powers and 5 for atoms. A negative number prints with a leading `-`, so it binds like
/// a negation.
fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Bin(op, _, _) => op.precedence(),
        Expr::Neg(_) => 3,
        Expr::Num(x) if x.is_sign_negative() => 3,
        Expr::Pow(_, _) => 4,
        Expr::Var(_) | Expr::Num(_) | Expr::Call(_, _) => 5,
    }
}

/// Writes `e`, in parentheses when `parens` is set.
fn write_operand(f: &mut fmt::Formatter<'_>, e: &Expr, parens: bool) -> fmt::Result {
    if parens {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

/// Writes a number in the shorter of Rust's plain and scientific shortest round-trip forms,
/// e.g. `2`, `0.5` or `1e-7`, all of which the parser reads back to the same value.
fn write_number(f: &mut fmt::Formatter<'_>, x: f64) -> fmt::Result {
    let plain = x.to_string();
    let scientific = format!("{x:e}");
    if scientific.len() < plain.len() {
        f.write_str(&scientific)
    } else {
        f.write_str(&plain)
    }
}

/// Prints the canonical form with the fewest parentheses, e.g. `silu(gate) * up` or
/// `a - (b - c)`. Every expression the parser produces prints to a string that parses back to
/// an equal expression. Expressions built by hand with a negative, infinite or NaN number or an
/// exponent outside 1..=8 still print, but not in a form that parses back to the same tree.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Var(name) => f.write_str(name),
            Expr::Num(x) => write_number(f, *x),
            Expr::Neg(e) => {
                f.write_str("-")?;
                write_operand(f, e, precedence(e) < 3)
            }
            Expr::Bin(op, a, b) => {
                let p = op.precedence();
                write_operand(f, a, precedence(a) < p)?;
                write!(f, " {} ", op.symbol())?;
                // Both operators of each level are left associative, so an operand on the right
                // at the same level needs parentheses.
                write_operand(f, b, precedence(b) <= p)
            }
            Expr::Pow(e, n) => {
                write_operand(f, e, precedence(e) < 5)?;
                write!(f, "^{n}")
            }
            Expr::Call(func, e) => write!(f, "{}({e})", func.name()),
        }
    }
}

/// A parsed expression together with the depth of its tree.
struct Node {
    expr: Expr,
    depth: usize,
}

/// Whether `c` can continue a number literal, well-formed or not.
fn is_number_char(c: char) -> bool {
    is_word_char(c) || c == '.'
}

/// Recognises a number literal: digits, an optional fraction and an optional exponent.
fn number(input: &str) -> IResult<&str, &str> {
    recognize((
        digit1,
        opt((char('.'), digit1)),
        opt((one_of("eE"), opt(one_of("+-")), digit1)),
    ))
    .parse(input)
}

/// The byte length of the run of characters at the start of `s` that satisfy `pred`.
fn run_len(s: &str, pred: impl Fn(char) -> bool) -> usize {
    s.find(|c| !pred(c)).unwrap_or(s.len())
}

/// The error for an expression that nests too deeply, pointing at `span`.
fn too_deep(span: Range<usize>) -> DslError {
    DslError::new(
        span,
        format!("the expression is nested more than {MAX_NESTING} levels deep"),
    )
}

/// A recursive-descent parser over one expression string, which it keeps to turn the
/// remaining input at any point into a byte offset.
struct ExprParser<'s, 'v> {
    src: &'s str,
    vars: &'v [&'v str],
}

impl<'s> ExprParser<'s, '_> {
    /// The byte offset at which `rest` starts inside the source.
    fn pos(&self, rest: &str) -> usize {
        self.src.len().saturating_sub(rest.len())
    }

    /// The span of the token that starts `rest`: a whole word or number, one other character,
    /// or an empty span at the end of the input.
    fn token_span(&self, rest: &str) -> Range<usize> {
        let start = self.pos(rest);
        let len = match rest.chars().next() {
            Some(c) if is_word_char(c) => run_len(rest, is_word_char),
            Some(c) => c.len_utf8(),
            None => 0,
        };
        start..start + len
    }

    /// The error "unexpected `...`" for the token that starts `rest`.
    fn unexpected(&self, rest: &str) -> DslError {
        let span = self.token_span(rest);
        let token = self.src.get(span.clone()).unwrap_or_default();
        DslError::new(span, format!("unexpected `{token}`"))
    }

    /// Checks that one more level of nesting is allowed at `nest`, pointing at `span` if not.
    fn enter(&self, nest: usize, span: Range<usize>) -> Result<usize, DslError> {
        if nest >= MAX_NESTING {
            Err(too_deep(span))
        } else {
            Ok(nest + 1)
        }
    }

    /// Wraps `expr`, whose deepest child has depth `child_depth`, checking the tree depth and
    /// pointing at `span` (the operator) if the tree gets too deep.
    fn node(&self, expr: Expr, child_depth: usize, span: Range<usize>) -> Result<Node, DslError> {
        let depth = child_depth + 1;
        if depth > MAX_TREE_DEPTH {
            return Err(DslError::new(
                span,
                format!("the expression is too long: its tree would be more than {MAX_TREE_DEPTH} operations deep"),
            )
            .with_help("split it into shorter pieces"));
        }
        Ok(Node { expr, depth })
    }

    /// Parses a left-associative chain of `operand`s joined by the operators in `ops`.
    fn chain(
        &self,
        input: &'s str,
        nest: usize,
        ops: [(char, BinOp); 2],
        operand: fn(&Self, &'s str, usize) -> Step<'s, Node>,
    ) -> Step<'s, Node> {
        let (mut rest, mut lhs) = operand(self, input, nest)?;
        loop {
            let after = ws(rest);
            let Some((next, op)) = ops
                .iter()
                .find_map(|&(c, op)| symbol(c)(after).ok().map(|(next, _)| (next, op)))
            else {
                return Ok((rest, lhs));
            };
            let at = self.pos(after);
            let (next, rhs) = operand(self, next, nest)?;
            let depth = lhs.depth.max(rhs.depth);
            let expr = Expr::Bin(op, Box::new(lhs.expr), Box::new(rhs.expr));
            lhs = self.node(expr, depth, at..at + 1)?;
            rest = next;
        }
    }

    /// Parses `product (('+' | '-') product)*`.
    fn sum(&self, input: &'s str, nest: usize) -> Step<'s, Node> {
        self.chain(
            input,
            nest,
            [('+', BinOp::Add), ('-', BinOp::Sub)],
            Self::product,
        )
    }

    /// Parses `unary (('*' | '/') unary)*`.
    fn product(&self, input: &'s str, nest: usize) -> Step<'s, Node> {
        self.chain(
            input,
            nest,
            [('*', BinOp::Mul), ('/', BinOp::Div)],
            Self::unary,
        )
    }

    /// Parses `'-' unary | power`.
    fn unary(&self, input: &'s str, nest: usize) -> Step<'s, Node> {
        let input = ws(input);
        let Ok((rest, _)) = symbol('-')(input) else {
            return self.power(input, nest);
        };
        let at = self.pos(input);
        let nest = self.enter(nest, at..at + 1)?;
        let (rest, inner) = self.unary(rest, nest)?;
        let node = self.node(Expr::Neg(Box::new(inner.expr)), inner.depth, at..at + 1)?;
        Ok((rest, node))
    }

    /// Parses `atom ('^' integer)?` and rejects a second `^`.
    fn power(&self, input: &'s str, nest: usize) -> Step<'s, Node> {
        let (rest, base) = self.atom(input, nest)?;
        let after = ws(rest);
        let Ok((exponent_input, _)) = symbol('^')(after) else {
            return Ok((rest, base));
        };
        let caret = self.pos(after);
        let (rest, exponent) = self.exponent(ws(exponent_input))?;
        let node = self.node(
            Expr::Pow(Box::new(base.expr), exponent),
            base.depth,
            caret..caret + 1,
        )?;
        let after = ws(rest);
        if after.starts_with('^') {
            let at = self.pos(after);
            return Err(DslError::new(at..at + 1, "exponents cannot be chained")
                .with_help("add parentheses to say which power comes first, e.g. `(x^2)^3`"));
        }
        Ok((rest, node))
    }

    /// Parses the integer exponent that follows a `^`, which must be from 1 to 8.
    fn exponent(&self, input: &'s str) -> Step<'s, u32> {
        let start = self.pos(input);
        let parsed: IResult<&str, &str> = digit1(input);
        let end = match parsed {
            Ok((rest, digits)) => {
                let tail = run_len(rest, is_number_char);
                if tail == 0 {
                    if let Some(n) = digits.parse::<u32>().ok().filter(|n| (1..=8).contains(n)) {
                        return Ok((rest, n));
                    }
                }
                self.pos(rest) + tail
            }
            Err(_) => match input.strip_prefix('-') {
                Some(negated) => start + 1 + run_len(negated, is_number_char),
                None => self.token_span(input).end,
            },
        };
        Err(DslError::new(
            start..end,
            "exponents must be integer literals from 1 to 8",
        ))
    }

    /// Parses a number, a variable, a function call or a parenthesised expression.
    fn atom(&self, input: &'s str, nest: usize) -> Step<'s, Node> {
        let input = ws(input);
        let at = self.pos(input);
        if let Ok((rest, literal)) = number(input) {
            return self.number(rest, literal, at);
        }
        if let Ok((rest, name)) = identifier(input) {
            let after = ws(rest);
            if let Ok((args, _)) = symbol('(')(after) {
                return self.call(name, at, self.pos(after), args, nest);
            }
            return self.variable(rest, name, at);
        }
        if let Ok((inner, _)) = symbol('(')(input) {
            let nest = self.enter(nest, at..at + 1)?;
            let (rest, node) = self.sum(inner, nest)?;
            let rest = self.close(rest, "expected an operator or `)`")?;
            return Ok((rest, node));
        }
        if input.is_empty() {
            let span = if self.src.trim().is_empty() {
                0..self.src.len()
            } else {
                at..at
            };
            return Err(DslError::new(span, "expected an expression"));
        }
        Err(self
            .unexpected(input)
            .with_help("expected a number, a variable, a function call or `(`"))
    }

    /// Checks the number literal `literal` that starts at `at` and is followed by `rest`.
    fn number(&self, rest: &'s str, literal: &str, at: usize) -> Step<'s, Node> {
        let tail = run_len(rest, is_number_char);
        if tail > 0 {
            let end = self.pos(rest) + tail;
            let text = self.src.get(at..end).unwrap_or_default();
            let error = DslError::new(at..end, format!("malformed number `{text}`"));
            let help = rest.starts_with(|c: char| {
                (c.is_ascii_alphabetic() || c == '_') && c != 'e' && c != 'E'
            });
            return Err(if help {
                error.with_help("multiplication is written with `*`, e.g. `2 * x`")
            } else {
                error
            });
        }
        match literal.parse::<f64>() {
            Ok(value) if value.is_finite() => {
                let node = Node {
                    expr: Expr::Num(value),
                    depth: 1,
                };
                Ok((rest, node))
            }
            _ => Err(DslError::new(
                at..at + literal.len(),
                format!("the number `{literal}` is too large; numbers must be finite"),
            )),
        }
    }

    /// Resolves the identifier `name` at `at`, which is not followed by `(`, as a variable.
    fn variable(&self, rest: &'s str, name: &str, at: usize) -> Step<'s, Node> {
        let span = at..at + name.len();
        if self.vars.contains(&name) {
            let node = Node {
                expr: Expr::Var(name.to_string()),
                depth: 1,
            };
            return Ok((rest, node));
        }
        if Func::from_name(name).is_some() {
            return Err(DslError::new(
                span,
                format!("`{name}` is a function; call it as `{name}(...)`"),
            ));
        }
        let error = DslError::new(span, format!("unknown variable `{name}`"));
        Err(match closest(name, self.vars.iter().copied()) {
            Some(suggestion) => error.with_help(format!("did you mean `{suggestion}`?")),
            None if self.vars.is_empty() => error.with_help("no variables are available here"),
            None => error.with_help(format!("variables here are: {}", self.vars.join(", "))),
        })
    }

    /// Parses the rest of the call of `name` (at `at`) whose `(` is at `open`; `args` follows
    /// the `(`.
    fn call(
        &self,
        name: &str,
        at: usize,
        open: usize,
        args: &'s str,
        nest: usize,
    ) -> Step<'s, Node> {
        let Some(func) = Func::from_name(name) else {
            return Err(self.unknown_function(name, at));
        };
        let nest = self.enter(nest, open..open + 1)?;
        let arity = format!("`{name}` takes exactly one argument");
        let first = ws(args);
        if first.starts_with(')') {
            let close = self.pos(first);
            return Err(
                DslError::new(open..close + 1, arity).with_help(format!("call it as `{name}(x)`"))
            );
        }
        let (rest, arg) = self.sum(args, nest)?;
        let after = ws(rest);
        if after.starts_with(',') {
            let comma = self.pos(after);
            let end = comma + extra_arguments_len(after);
            return Err(DslError::new(comma..end, arity).with_help("remove the extra arguments"));
        }
        let rest = self.close(rest, "expected an operator or `)`")?;
        let node = self.node(
            Expr::Call(func, Box::new(arg.expr)),
            arg.depth,
            at..open + 1,
        )?;
        Ok((rest, node))
    }

    /// The error for a call of `name` at `at`, which is not a function.
    fn unknown_function(&self, name: &str, at: usize) -> DslError {
        let error = DslError::new(at..at + name.len(), format!("unknown function `{name}`"));
        if self.vars.contains(&name) {
            return error.with_help(format!(
                "`{name}` is a variable; multiplication is written with `*`, e.g. `{name} * (...)`"
            ));
        }
        match closest(name, Func::ALL.map(Func::name)) {
            Some(suggestion) => error.with_help(format!("did you mean `{suggestion}`?")),
            None => {
                let names: Vec<&str> = Func::ALL.map(Func::name).to_vec();
                error.with_help(format!("functions are: {}", names.join(", ")))
            }
        }
    }

    /// Consumes the `)` that should follow `rest`, explaining what is wrong if it does not,
    /// with `help` for an unexpected token.
    fn close(&self, rest: &'s str, help: &str) -> Result<&'s str, DslError> {
        let after = ws(rest);
        if let Ok((rest, _)) = symbol(')')(after) {
            return Ok(rest);
        }
        if after.is_empty() {
            let end = self.pos(rest);
            return Err(
                DslError::new(end..end, "expected `)`").with_help("every `(` needs a matching `)`")
            );
        }
        Err(self.unexpected(after).with_help(help))
    }
}

/// The byte length of the extra arguments of a call, starting at the `,` that begins `s` and
/// ending before the `)` that closes the call (or at the end of the input), without trailing
/// whitespace.
fn extra_arguments_len(s: &str) -> usize {
    let mut depth = 0usize;
    let mut end = s.len();
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => {
                end = i;
                break;
            }
            ')' => depth -= 1,
            _ => {}
        }
    }
    s.get(..end).map_or(end, |extra| extra.trim_end().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VARS: &[&str] = &["gate", "up", "x", "y", "a", "b", "c"];

    /// Parses `src` with [`VARS`], failing the test on an error.
    fn parse(src: &str) -> Expr {
        parse_expr(src, VARS).unwrap_or_else(|e| panic!("`{src}` failed: {e:?}"))
    }

    /// Parses `src` with [`VARS`] and returns the error, failing the test if it parses.
    fn err(src: &str) -> DslError {
        match parse_expr(src, VARS) {
            Ok(e) => panic!("`{src}` parsed to {e:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's message and span, returning it for further checks.
    fn assert_err(src: &str, span: Range<usize>, message: &str) -> DslError {
        let e = err(src);
        assert_eq!(e.message, message, "message for `{src}`");
        assert_eq!(e.span, span, "span for `{src}`");
        e
    }

    fn var(name: &str) -> Box<Expr> {
        Box::new(Expr::Var(name.to_string()))
    }

    fn num(x: f64) -> Box<Expr> {
        Box::new(Expr::Num(x))
    }

    fn bin(op: BinOp, a: Box<Expr>, b: Box<Expr>) -> Box<Expr> {
        Box::new(Expr::Bin(op, a, b))
    }

    /// Evaluates `e` with gate = 1.5, up = -2, x = 0.5, y = 3 and everything else 0.
    fn eval(e: &Expr) -> f64 {
        e.eval(&|name| match name {
            "gate" => 1.5,
            "up" => -2.0,
            "x" => 0.5,
            "y" => 3.0,
            _ => 0.0,
        })
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn func_names_round_trip() {
        assert_eq!(Func::ALL.len(), 8);
        for f in Func::ALL {
            assert_eq!(Func::from_name(f.name()), Some(f));
            assert_eq!(f.to_string(), f.name());
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        assert_eq!(Func::from_name("Silu"), None);
    }

    #[test]
    fn parses_the_swiglu_product() {
        let e = parse("silu(gate) * up");
        let expected = Expr::Bin(
            BinOp::Mul,
            Box::new(Expr::Call(Func::Silu, var("gate"))),
            var("up"),
        );
        assert_eq!(e, expected);
        assert_eq!(e.vars(), ["gate", "up"]);
        assert_eq!(e.to_string(), "silu(gate) * up");
    }

    #[test]
    fn respects_precedence_and_associativity() {
        assert_eq!(
            parse("a + b * c"),
            *bin(BinOp::Add, var("a"), bin(BinOp::Mul, var("b"), var("c")))
        );
        assert_eq!(
            parse("a - b - c"),
            *bin(BinOp::Sub, bin(BinOp::Sub, var("a"), var("b")), var("c"))
        );
        assert_eq!(
            parse("a / b / c"),
            *bin(BinOp::Div, bin(BinOp::Div, var("a"), var("b")), var("c"))
        );
        assert_eq!(parse("-x^2"), Expr::Neg(Box::new(Expr::Pow(var("x"), 2))));
        assert_eq!(
            parse("-a * b"),
            *bin(BinOp::Mul, Box::new(Expr::Neg(var("a"))), var("b"))
        );
        assert_eq!(
            parse("a * -b"),
            *bin(BinOp::Mul, var("a"), Box::new(Expr::Neg(var("b"))))
        );
        assert_eq!(parse("--x"), Expr::Neg(Box::new(Expr::Neg(var("x")))));
        assert_eq!(parse("((x))"), Expr::Var("x".into()));
        assert_eq!(
            parse(" relu ( x ) ^ 2 "),
            Expr::Pow(Box::new(Expr::Call(Func::Relu, var("x"))), 2)
        );
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse("2"), Expr::Num(2.0));
        assert_eq!(parse("0.5"), Expr::Num(0.5));
        assert_eq!(parse("1e-3"), Expr::Num(1e-3));
        assert_eq!(parse("1.5E+3"), Expr::Num(1500.0));
        assert_eq!(parse("007"), Expr::Num(7.0));
        assert_eq!(parse("1e-999"), Expr::Num(0.0));
        assert_eq!(parse("-1"), Expr::Neg(num(1.0)));
        assert_eq!(
            parse("0.044715 * x"),
            *bin(BinOp::Mul, num(0.044715), var("x"))
        );
    }

    #[test]
    fn displays_minimal_parentheses() {
        for src in [
            "silu(gate) * up",
            "gelu_tanh(x)",
            "relu(x)^2",
            "-(x + 1)",
            "x * (y + 2)",
            "a - (b - c)",
            "a / (b * c)",
            "a - b - c",
            "a + b * c",
            "(a + b) * c",
            "-x^2",
            "(-x)^2",
            "(x^2)^3",
            "(a + b)^2",
            "a * -b",
            "a - -b",
            "--x",
            "-2",
            "2^3",
            "0.5 * x * (1 + tanh(0.7978845608 * (x + 0.044715 * x^3)))",
            "sigmoid(x) + exp(-x) / softplus(y)",
            "1e-7 * x",
            "1e21",
        ] {
            let e = parse(src);
            assert_eq!(e.to_string(), src);
            assert_eq!(parse(&e.to_string()), e);
        }
    }

    #[test]
    fn display_normalises_spacing_and_parentheses() {
        assert_eq!(parse("((a))*(b)").to_string(), "a * b");
        assert_eq!(parse("(a*b)*c").to_string(), "a * b * c");
        assert_eq!(parse("a+(b*c)").to_string(), "a + b * c");
        assert_eq!(parse("x ^ 2").to_string(), "x^2");
        assert_eq!(parse("2.50").to_string(), "2.5");
        assert_eq!(parse("0.0000001").to_string(), "1e-7");
        assert_eq!(parse("1500.0").to_string(), "1500");
    }

    #[test]
    fn serializes_to_json() {
        let json = serde_json::to_value(parse("silu(x) * 2")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"Bin": ["Mul", {"Call": ["silu", {"Var": "x"}]}, {"Num": 2.0}]})
        );
    }

    #[test]
    fn lists_variables_in_first_occurrence_order() {
        assert_eq!(parse("up * gate + up * x").vars(), ["up", "gate", "x"]);
        assert!(parse("2 * 3").vars().is_empty());
        assert_eq!(parse("-relu(y)^2").vars(), ["y"]);
    }

    #[test]
    fn evaluates() {
        assert_eq!(eval(&parse("gate * up")), -3.0);
        assert_eq!(eval(&parse("x - y - 1")), -3.5);
        assert_eq!(eval(&parse("y / 2 / 3")), 0.5);
        assert_eq!(eval(&parse("-y^2")), -9.0);
        assert_eq!(eval(&parse("(-y)^3")), -27.0);
        assert_eq!(eval(&parse("relu(up) + relu(y)")), 3.0);
        let swiglu = eval(&parse("silu(gate) * up"));
        assert!(close(swiglu, -2.0 * 1.5 / (1.0 + (-1.5f64).exp()), 1e-15));
    }

    #[test]
    fn erf_matches_reference_values() {
        // Reference values are correctly rounded results of libm's erf and erfc.
        let cases = [
            (0.1, 0.1124629160182849, 0.8875370839817152),
            (0.5, 0.5204998778130465, 0.4795001221869535),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (2.0, 0.9953222650189527, 0.004677734981047265),
            (2.4, 0.999311486103355, 0.0006885138966450789),
            (2.6, 0.9997639655834707, 0.00023603441652934908),
            (3.0, 0.9999779095030014, 2.2090496998585438e-05),
            (4.0, 0.9999999845827421, 1.541725790028002e-08),
            (6.0, 1.0, 2.1519736712498916e-17),
        ];
        for (x, erf_x, erfc_x) in cases {
            assert!((erf(x) - erf_x).abs() < 1e-15, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + erf_x).abs() < 1e-15, "erf(-{x})");
            assert!(close(erfc(x), erfc_x, 1e-13), "erfc({x}) = {}", erfc(x));
            assert!((erfc(-x) - (2.0 - erfc_x)).abs() < 1e-15, "erfc(-{x})");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert!(erf(f64::NAN).is_nan());
        assert!(erfc(f64::NAN).is_nan());
    }

    #[test]
    fn functions_match_reference_values() {
        let cases = [
            (Func::Gelu, -10.0, -7.619853024160593e-23),
            (Func::Gelu, -3.0, -0.004049694094890287),
            (Func::Gelu, -1.0, -0.15865525393145707),
            (Func::Gelu, -0.5, -0.15426876936299344),
            (Func::Gelu, 0.5, 0.34573123063700656),
            (Func::Gelu, 1.0, 0.8413447460685429),
            (Func::Gelu, 3.0, 2.99595030590511),
            (Func::GeluTanh, -1.0, -0.15880800939172324),
            (Func::GeluTanh, 1.0, 0.8411919906082768),
            (Func::GeluTanh, 3.0, 2.996362607918227),
            (Func::Softplus, -30.0, 9.357622968839737e-14),
            (Func::Softplus, -1.0, 0.31326168751822286),
            (Func::Softplus, 0.0, std::f64::consts::LN_2),
            (Func::Softplus, 1.0, 1.3132616875182228),
            (Func::Softplus, 30.0, 30.000000000000092),
            (Func::Sigmoid, 0.0, 0.5),
            (Func::Silu, 2.0, 2.0 / (1.0 + 0.1353352832366127)),
            (Func::Tanh, 1.0, 0.7615941559557649),
            (Func::Exp, 1.0, std::f64::consts::E),
            (Func::Relu, -2.0, 0.0),
            (Func::Relu, 2.0, 2.0),
        ];
        for (f, x, want) in cases {
            let got = f.apply(x);
            assert!(close(got, want, 1e-13), "{f}({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn functions_are_stable_at_extremes() {
        assert_eq!(Func::Softplus.apply(800.0), 800.0);
        assert_eq!(Func::Softplus.apply(-800.0), 0.0);
        assert_eq!(Func::Sigmoid.apply(-800.0), 0.0);
        assert_eq!(Func::Sigmoid.apply(800.0), 1.0);
        assert_eq!(Func::Silu.apply(-800.0), -0.0);
        assert_eq!(Func::Gelu.apply(-40.0), -0.0);
        assert_eq!(Func::Gelu.apply(40.0), 40.0);
        assert_eq!(Func::GeluTanh.apply(-800.0), -0.0);
        assert_eq!(Func::GeluTanh.apply(800.0), 800.0);
        for f in Func::ALL {
            assert!(f.apply(f64::NAN).is_nan(), "{f}(NaN)");
        }
    }

    #[test]
    fn rejects_empty_input() {
        assert_err("", 0..0, "expected an expression");
        assert_err("  ", 0..2, "expected an expression");
        assert_err("x +", 3..3, "expected an expression");
        assert_err("x * ", 4..4, "expected an expression");
        assert_err("-", 1..1, "expected an expression");
    }

    #[test]
    fn rejects_unknown_functions() {
        let e = assert_err("slu(gate) * up", 0..3, "unknown function `slu`");
        assert_eq!(e.help.as_deref(), Some("did you mean `silu`?"));
        let e = assert_err("x * banana(x)", 4..10, "unknown function `banana`");
        assert_eq!(
            e.help.as_deref(),
            Some("functions are: silu, gelu, gelu_tanh, relu, sigmoid, tanh, exp, softplus")
        );
        let e = assert_err("gate (up)", 0..4, "unknown function `gate`");
        assert!(e.help.unwrap().contains("`gate` is a variable"));
    }

    #[test]
    fn rejects_unknown_variables() {
        let e = assert_err("silu(gat) * up", 5..8, "unknown variable `gat`");
        assert_eq!(e.help.as_deref(), Some("did you mean `gate`?"));
        let e = parse_expr("silu(gate) * banana", &["gate", "up"]).unwrap_err();
        assert_eq!(e.span, 13..19);
        assert_eq!(e.message, "unknown variable `banana`");
        assert_eq!(e.help.as_deref(), Some("variables here are: gate, up"));
        let e = parse_expr("x", &[]).unwrap_err();
        assert_eq!(e.span, 0..1);
        assert_eq!(e.help.as_deref(), Some("no variables are available here"));
    }

    #[test]
    fn rejects_functions_used_as_variables() {
        let e = assert_err(
            "silu * up",
            0..4,
            "`silu` is a function; call it as `silu(...)`",
        );
        assert_eq!(e.help, None);
        // A variable that happens to share a function's name is still a variable.
        assert_eq!(
            parse_expr("exp", &["exp"]).unwrap(),
            Expr::Var("exp".into())
        );
        assert_eq!(
            parse_expr("exp(exp)", &["exp"]).unwrap(),
            Expr::Call(Func::Exp, var("exp"))
        );
    }

    #[test]
    fn rejects_wrong_arity() {
        let e = assert_err("silu()", 4..6, "`silu` takes exactly one argument");
        assert_eq!(e.help.as_deref(), Some("call it as `silu(x)`"));
        assert_err("relu( )", 4..7, "`relu` takes exactly one argument");
        assert_err("silu(x, y) * up", 6..9, "`silu` takes exactly one argument");
        assert_err(
            "silu(x, (y), gate )",
            6..17,
            "`silu` takes exactly one argument",
        );
        assert_err("silu(x, y", 6..9, "`silu` takes exactly one argument");
    }

    #[test]
    fn rejects_missing_close_parens() {
        let e = assert_err("silu(x", 6..6, "expected `)`");
        assert_eq!(e.help.as_deref(), Some("every `(` needs a matching `)`"));
        assert_err("(x + y  ", 6..6, "expected `)`");
        assert_err("x * (y + (a)", 12..12, "expected `)`");
        let e = assert_err("(x y)", 3..4, "unexpected `y`");
        assert_eq!(e.help.as_deref(), Some("expected an operator or `)`"));
        assert_err("silu(x;)", 6..7, "unexpected `;`");
    }

    #[test]
    fn rejects_trailing_garbage() {
        let e = assert_err("x y", 2..3, "unexpected `y`");
        assert_eq!(
            e.help.as_deref(),
            Some("write an operator such as `*` between two terms")
        );
        let e = assert_err("x)", 1..2, "unexpected `)`");
        assert_eq!(e.help.as_deref(), Some("this `)` has no matching `(`"));
        let e = assert_err("x + y; z", 5..6, "unexpected `;`");
        assert_eq!(
            e.help.as_deref(),
            Some("expected an operator or the end of the expression")
        );
        assert_err("(x) (y)", 4..5, "unexpected `(`");
        assert_err("x é", 2..4, "unexpected `é`");
        assert_err("x, y", 1..2, "unexpected `,`");
    }

    #[test]
    fn rejects_misplaced_tokens() {
        let e = assert_err("* x", 0..1, "unexpected `*`");
        assert_eq!(
            e.help.as_deref(),
            Some("expected a number, a variable, a function call or `(`")
        );
        assert_err("+x", 0..1, "unexpected `+`");
        assert_err("x + )", 4..5, "unexpected `)`");
        assert_err("()", 1..2, "unexpected `)`");
        assert_err(".5", 0..1, "unexpected `.`");
        assert_err("x * 日本", 4..7, "unexpected `日`");
        assert_err("silu(,x)", 5..6, "unexpected `,`");
    }

    #[test]
    fn rejects_bad_exponents() {
        let message = "exponents must be integer literals from 1 to 8";
        assert_err("x^0", 2..3, message);
        assert_err("x^9", 2..3, message);
        assert_err("x ^ 10", 4..6, message);
        assert_err("x^2.5", 2..5, message);
        assert_err("x^-1", 2..4, message);
        assert_err("x^-", 2..3, message);
        assert_err("x^y", 2..3, message);
        assert_err("x^(2)", 2..3, message);
        assert_err("x^", 2..2, message);
        assert_err("x^99999999999999999999999", 2..25, message);
        assert_err("x^2e1", 2..5, message);
        assert_eq!(parse("x^8"), Expr::Pow(var("x"), 8));
        assert_eq!(parse("x^01"), Expr::Pow(var("x"), 1));
    }

    #[test]
    fn rejects_chained_exponents() {
        let e = assert_err("x^2^3", 3..4, "exponents cannot be chained");
        assert!(e.help.unwrap().contains("(x^2)^3"));
        assert_err("x ^ 2 ^ 3", 6..7, "exponents cannot be chained");
    }

    #[test]
    fn rejects_bad_numbers() {
        let e = assert_err("2x", 0..2, "malformed number `2x`");
        assert_eq!(
            e.help.as_deref(),
            Some("multiplication is written with `*`, e.g. `2 * x`")
        );
        let e = assert_err("1e", 0..2, "malformed number `1e`");
        assert_eq!(e.help, None);
        assert_err("x + 1.5.2", 4..9, "malformed number `1.5.2`");
        assert_err("1.", 0..2, "malformed number `1.`");
        assert_err("1e+", 0..2, "malformed number `1e`");
        let e = assert_err(
            "x * 1e999",
            4..9,
            "the number `1e999` is too large; numbers must be finite",
        );
        assert_eq!(e.help, None);
        let huge = format!("1{}", "0".repeat(400));
        assert_err(
            &huge,
            0..401,
            &format!("the number `{huge}` is too large; numbers must be finite"),
        );
    }

    #[test]
    fn allows_the_maximum_nesting() {
        let parens = format!("{}x{}", "(".repeat(64), ")".repeat(64));
        assert_eq!(parse(&parens), Expr::Var("x".into()));
        let negations = format!("{}x", "-".repeat(64));
        assert_eq!(parse(&negations).to_string(), negations);
        let calls = format!("{}x{}", "relu(".repeat(64), ")".repeat(64));
        assert_eq!(parse(&calls).to_string(), calls);
    }

    #[test]
    fn rejects_deep_nesting_without_overflowing() {
        let message = "the expression is nested more than 64 levels deep";
        assert_err(
            &format!("{}x{}", "(".repeat(65), ")".repeat(65)),
            64..65,
            message,
        );
        assert_err(&"(".repeat(100_000), 64..65, message);
        assert_err(&"-".repeat(100_000), 64..65, message);
        assert_err(&"exp(".repeat(100_000), 259..260, message);
        assert_err(&format!("{}(x", "-(".repeat(40)), 64..65, message);
    }

    #[test]
    fn limits_the_tree_depth() {
        let ok = ["x"; 256].join(" + ");
        assert_eq!(parse(&ok).vars(), ["x"]);
        let too_long = ["x"; 257].join(" + ");
        let e = assert_err(
            &too_long,
            1022..1023,
            "the expression is too long: its tree would be more than 256 operations deep",
        );
        assert!(e.help.is_some());
        // Long chains that are broken up by parentheses still count towards the depth.
        let chunk = ["x"; 100].join(" * ");
        let nested = format!("(({chunk}) * {chunk}) * {chunk}");
        let e = err(&nested);
        assert!(e.message.starts_with("the expression is too long"));
        let huge = format!("{}x", "x+".repeat(99_999));
        assert!(parse_expr(&huge, VARS).is_err());
    }

    /// A strategy for expressions made of a few variables, numbers and every construct.
    fn arb_expr() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            prop::sample::select(vec!["x", "y", "gate"]).prop_map(|v| Expr::Var(v.to_string())),
            (0.0..1e6f64).prop_map(Expr::Num),
            prop::sample::select(vec![0.0, 1.0, 2.0, 0.5, 1e-7, 1e21, 123.456]).prop_map(Expr::Num),
        ];
        leaf.prop_recursive(6, 48, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Neg(Box::new(e))),
                (inner.clone(), 1u32..=8).prop_map(|(e, n)| Expr::Pow(Box::new(e), n)),
                (prop::sample::select(Func::ALL.to_vec()), inner.clone())
                    .prop_map(|(f, e)| Expr::Call(f, Box::new(e))),
                (
                    prop::sample::select(vec![BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div]),
                    inner.clone(),
                    inner
                )
                    .prop_map(|(op, a, b)| Expr::Bin(op, Box::new(a), Box::new(b))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_and_spans_are_valid(src in prop_oneof![
            any::<String>(),
            "[a-z_()*+/^,.0-9 é-]{0,30}",
            "(silu|gate|up|x|\\(|\\)|\\*|-|\\^|[0-9]{1,3}|e|\\.| ){0,20}",
        ]) {
            match parse_expr(&src, VARS) {
                Ok(e) => {
                    let printed = e.to_string();
                    prop_assert_eq!(parse_expr(&printed, VARS).unwrap(), e);
                }
                Err(e) => {
                    prop_assert!(e.span.start <= e.span.end);
                    prop_assert!(e.span.end <= src.len());
                    prop_assert!(src.is_char_boundary(e.span.start));
                    prop_assert!(src.is_char_boundary(e.span.end));
                    prop_assert!(!e.message.is_empty());
                }
            }
        }

        #[test]
        fn display_round_trips(e in arb_expr()) {
            let printed = e.to_string();
            let reparsed = parse_expr(&printed, VARS);
            prop_assert_eq!(reparsed, Ok(e), "printed as `{}`", printed);
        }

        #[test]
        fn numbers_round_trip(x in any::<f64>().prop_filter("finite", |x| x.is_finite() && x.is_sign_positive())) {
            let printed = Expr::Num(x).to_string();
            prop_assert_eq!(parse_expr(&printed, &[]), Ok(Expr::Num(x)), "printed as `{}`", printed);
        }
    }
}

#[cfg(test)]
mod compiled_tests {
    use super::*;

    fn central(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-5 * x.abs().max(1.0);
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn every_function_derivative_matches_finite_differences() {
        for f in Func::ALL {
            for x in [-6.0, -2.5, -1.0, -0.3, 0.2, 0.7, 1.5, 3.0, 8.0] {
                let (want, got) = (central(|x| f.apply(x), x), f.derivative(x));
                let err = (want - got).abs() / want.abs().max(1.0);
                assert!(
                    err < 1e-8,
                    "{f}'({x}) = {got}, finite differences give {want}"
                );
            }
        }
    }

    #[test]
    fn compiled_evaluation_equals_the_tree_and_gradients_are_exact() {
        let cases: [(&str, &[&str]); 5] = [
            ("silu(gate) * up", &["gate", "up"]),
            ("gelu_tanh(x)", &["x"]),
            ("relu(x)^2", &["x"]),
            ("a / (b * c) - -a + 0.5 * exp(b)", &["a", "b", "c"]),
            ("main + 0.3 * (mtp0 + mtp1)", &["main", "mtp0", "mtp1"]),
        ];
        for (src, vars) in cases {
            let e = parse_expr(src, vars).unwrap();
            let c = e.compile(vars).unwrap();
            let (mut s, mut adj) = (c.scratch(), c.scratch());
            let mut grad = vec![0.0; vars.len()];
            let point: Vec<f64> = (0..vars.len()).map(|i| 0.7 - 0.45 * i as f64).collect();
            let tree = e.eval(&|name| point[vars.iter().position(|v| *v == name).unwrap()]);
            let y = c.eval_grad(&point, &mut s, &mut adj, &mut grad);
            assert_eq!(y, tree, "{src}");
            for i in 0..vars.len() {
                let f = |v: f64| {
                    let mut p = point.clone();
                    p[i] = v;
                    c.eval(&p, &mut c.scratch())
                };
                let want = central(f, point[i]);
                assert!(
                    (want - grad[i]).abs() < 1e-7 * want.abs().max(1.0),
                    "{src} d/d{}: {} vs {want}",
                    vars[i],
                    grad[i]
                );
            }
        }
        assert!(parse_expr("x", &["x"]).unwrap().compile(&["y"]).is_err());
    }
}
