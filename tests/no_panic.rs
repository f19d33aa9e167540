//! The checker never panics: real specs, mutated at random, and adversarial inputs (not TOML,
//! huge numbers, deep nesting, invalid UTF-8) all produce either a model or diagnostics, and
//! rendering either never panics. Bounded for CI: `PROPTEST_CASES` (default 512) cases.

use kiln_compiler::analyze::analyze;
use kiln_compiler::check::check;
use kiln_compiler::diag::render;
use kiln_compiler::report;
use proptest::prelude::*;

const SPECS: &[&str] = &[
    include_str!("../specs/tiny.toml"),
    include_str!("../specs/deepseek-v3.toml"),
    include_str!("../specs/deepseek-v2.toml"),
    include_str!("../specs/deepseek-v2-lite.toml"),
    include_str!("../specs/gpt2-124m.toml"),
    include_str!("../specs/llama3-8b.toml"),
];

/// Fragments that tend to reach interesting checker paths when spliced into a spec.
const FRAGMENTS: &[&[u8]] = &[
    b"\"",
    b"'",
    b"[",
    b"]",
    b"=",
    b"*",
    b"(",
    b")",
    b",",
    b".",
    b"{",
    b"}",
    b"\n",
    b"#",
    b"0",
    b"1",
    b"-1",
    b"7",
    b"99999999999999999999",
    b"9223372036854775807",
    b"1e309",
    b"nan",
    b"inf",
    b"-0.0",
    b"true",
    b"[[model]]",
    b"\xff",
    b"\xe2\x82",
    b"\"moe*99999999999\"",
    b"moe",
    b"dense",
    b"silu(",
    b"gate",
    b"**",
    b"e4m3",
    b"mla",
    b"gqa",
    b"[moe]",
    b"[mtp]\ndepth = 3\n",
    b"experts = 0",
    b"groups = 3",
    b"heads = 5",
    b"\"\\u0000\"",
    b"\"\"\"",
    b"x = []",
    b"keep = [\"a..b\"]",
];

#[derive(Clone, Debug)]
enum Mutation {
    Splice { at: usize, fragment: usize },
    Delete { at: usize, len: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    RandomBytes { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| Mutation::Splice { at, fragment }),
        3 => (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| Mutation::RandomBytes { at, bytes }),
    ]
}

fn apply(mut s: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = s.len().max(1);
    match m {
        Mutation::Splice { at, fragment } => {
            let at = at % n;
            s.splice(at..at, FRAGMENTS[*fragment].iter().copied());
        }
        Mutation::Delete { at, len } => {
            let at = at % n;
            let end = (at + len).min(s.len());
            s.drain(at.min(end)..end);
        }
        Mutation::RandomBytes { at, bytes } => {
            let at = at % n;
            s.splice(at..at, bytes.iter().copied());
        }
        Mutation::DuplicateLine { line } | Mutation::SwapLines { a: line, .. } => {
            let mut lines: Vec<Vec<u8>> = s.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
            let i = line % lines.len();
            if let Mutation::SwapLines { b, .. } = m {
                let j = b % lines.len();
                lines.swap(i, j);
            } else {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            s = lines.join(&b'\n');
        }
    }
    s
}

/// Checks `bytes` and exercises everything a user's command would do with the result.
fn exercise(bytes: &[u8]) {
    match check(bytes) {
        Ok(model) => {
            let r = analyze(&model);
            let _ = report::render(&r);
            let _ = serde_json::to_string(&r).unwrap();
            let _ = model.settings();
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            let text = String::from_utf8_lossy(bytes);
            for d in &diags {
                assert!(
                    d.span.start <= d.span.end && d.span.end <= bytes.len(),
                    "span {:?} out of {} bytes",
                    d.span,
                    bytes.len()
                );
            }
            let _ = render("mutated.toml", &text, &diags, false);
        }
    }
}

/// Values spliced in place of a key's value: edge numbers, every enum name the checker knows,
/// DSL strings, wrong types.
const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "16",
    "64",
    "96",
    "128",
    "256",
    "4096",
    "65537",
    "-1",
    "0.0",
    "1e-9",
    "0.5",
    "2.5",
    "1e30",
    "true",
    "false",
    "\"dense\"",
    "\"moe\"",
    "\"mla\"",
    "\"gqa\"",
    "\"mha\"",
    "\"learned\"",
    "\"rope\"",
    "\"layernorm\"",
    "\"e4m3\"",
    "\"e5m2\"",
    "\"fp32\"",
    "\"bf16\"",
    "\"softmax\"",
    "\"sigmoid\"",
    "\"greedy\"",
    "\"group_limited\"",
    "\"max\"",
    "\"pow2\"",
    "\"constant\"",
    "\"gelu_tanh(x)\"",
    "\"relu(x)^2\"",
    "\"dense*2, (moe, dense)*2\"",
    "\"moe*4\"",
    "\"dense\"",
    "[1, 64]",
    "[1, 128]",
    "[128, 64]",
    "[\"*norm\"]",
    "[\"**.up\", \"head\"]",
    "[]",
    "{}",
];

/// Edits a spec line by line: replace a key's value, drop a line, or drop a whole section.
/// Unlike byte mutations, these mostly keep the TOML valid and reach the cross-field rules
/// and the op builder with unusual but well-typed combinations.
fn edit_lines(spec: &str, edits: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut lines: Vec<String> = spec.lines().map(str::to_string).collect();
    for &(line, value, what) in edits {
        let i = line % lines.len();
        match what % 8 {
            0 => {
                // Drop the section starting at or after line i.
                if let Some(start) = (i..lines.len()).find(|&j| lines[j].starts_with('[')) {
                    let end = (start + 1..lines.len())
                        .find(|&j| lines[j].starts_with('['))
                        .unwrap_or(lines.len());
                    lines.drain(start..end);
                }
            }
            1 => {
                lines.remove(i);
            }
            _ => {
                if let Some((key, _)) = lines[i].split_once(" = ") {
                    lines[i] = format!("{key} = {}", VALUES[value % VALUES.len()]);
                }
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join("\n").into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_specs_never_panic(spec in 0..SPECS.len(), muts in proptest::collection::vec(mutation(), 1..6)) {
        let bytes = muts.iter().fold(SPECS[spec].as_bytes().to_vec(), apply);
        exercise(&bytes);
    }

    #[test]
    fn edited_specs_never_panic(spec in 0..SPECS.len(), edits in proptest::collection::vec((any::<usize>(), any::<usize>(), any::<u8>()), 1..8)) {
        exercise(&edit_lines(SPECS[spec], &edits));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        exercise(&bytes);
    }
}

#[test]
fn adversarial_inputs_never_panic() {
    let deep_arrays = format!(
        "[model]\nname = {}{}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_tables = format!(
        "[model]\nname = {}{}",
        "{a = ".repeat(20_000),
        "}".repeat(20_000)
    );
    let long_dotted = format!("[{}]\n", vec!["a"; 50_000].join("."));
    let deep_expr = format!(
        "{}\n[ffn]\nhidden = 8\nact = \"{}x{}\"\n",
        "[model]\nname = \"n\"\nvocab = 8\nd_model = 8\nlayers = \"dense\"\nmax_positions = 8\n[attention]\nkind = \"mha\"\nheads = 2\n[train]\nbatch = 1\nseq_len = 8",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    let inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not toml at all {{{".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        b"[model]\nvocab = 99999999999999999999999999\n".to_vec(),
        b"[model]\nvocab = 18446744073709551615\nd_model = -9223372036854775808\n".to_vec(),
        b"[model]\nnorm_eps = nan\ninit_std = inf\n".to_vec(),
        deep_arrays.into_bytes(),
        deep_tables.into_bytes(),
        long_dotted.into_bytes(),
        deep_expr.into_bytes(),
        "[model]\nname = \"\u{202e}évil\u{0}\"\n"
            .as_bytes()
            .to_vec(),
    ];
    for input in &inputs {
        exercise(input);
    }
}
