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
//!
//! This file has the tree ([`Expr`], [`Func`], [`BinOp`]), its evaluation and its printing;
//! `parse.rs` the parser, `compiled.rs` the compiled form ([`Compiled`]).

use std::fmt;

mod compiled;

pub use compiled::{Compiled, Instr};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
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
}
