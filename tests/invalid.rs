//! Tier 2 (*fail*): every spec under `tests/invalid/` breaks exactly one rule. Its first line
//! names the rule (`# rule: divisible`); the checker must report exactly one error, of that
//! rule, and the rendered diagnostic is an insta snapshot.

use std::path::Path;

use kiln_compiler::check::check;
use kiln_compiler::diag::render;

#[test]
fn each_invalid_spec_breaks_its_rule() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 30,
        "expected at least 30 invalid specs, found {}",
        paths.len()
    );
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let rule = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# rule: "))
            .unwrap_or_else(|| panic!("{name}: first line must be `# rule: NAME`"))
            .trim()
            .to_string();
        let diags = match check(&bytes) {
            Ok(_) => panic!("{name} checks, but it should break `{rule}`"),
            Err(d) => d,
        };
        let rendered = render(&format!("tests/invalid/{name}"), &text, &diags, false);
        assert_eq!(
            diags.len(),
            1,
            "{name}: expected one error, got:\n{rendered}"
        );
        assert_eq!(
            diags[0].rule.name(),
            rule,
            "{name}: wrong rule:\n{rendered}"
        );
        insta::assert_snapshot!(name.trim_end_matches(".toml").to_string(), rendered);
    }
}
