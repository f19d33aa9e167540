//! The parser: [`parse_expr`], a recursive descent over the grammar in the module
//! documentation, with nesting and depth limits and errors that say what to write instead.

use std::ops::Range;

use nom::character::complete::{char, digit1, one_of};
use nom::combinator::{opt, recognize};
use nom::{IResult, Parser};

use super::{BinOp, Expr, Func, MAX_NESTING, MAX_TREE_DEPTH};
use crate::dsl::lex::{identifier, is_word_char, symbol, ws, Step};
use crate::dsl::{closest, DslError};

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
