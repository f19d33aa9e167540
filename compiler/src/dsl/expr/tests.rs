use std::ops::Range;

use proptest::prelude::*;

use super::*;
use crate::dsl::DslError;

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
