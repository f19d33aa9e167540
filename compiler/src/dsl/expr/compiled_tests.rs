//! The compiled form's tests (its code is in kiln-ir), which parse their expressions.

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
