//! Reading a spec and checking it: the built-in default, diagnostics rendered to stderr and,
//! for `--json`, their JSON form.

use std::path::PathBuf;

use kiln_compiler::check::check;
use kiln_compiler::diag::{self, Diagnostic};
use kiln_compiler::model::Model;

use crate::output::out;
use crate::Failure;

/// The default spec, compiled in so `kiln check` works anywhere.
pub(crate) const TINY: &str = include_str!("../specs/tiny.toml");
const TINY_NAME: &str = "specs/tiny.toml (built in)";

/// `--set section.key=value` overrides, given once per process by the command line.
static OVERRIDES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Records the `--set` overrides every spec this process reads gets.
pub(crate) fn set_overrides(sets: Vec<String>) {
    let _ = OVERRIDES.set(sets);
}

/// Applies `sets` (`section.key=value` each) to a spec's text, in order.
pub(crate) fn apply_sets(bytes: Vec<u8>, sets: &[String]) -> Result<Vec<u8>, Failure> {
    if sets.is_empty() {
        return Ok(bytes);
    }
    let mut text = String::from_utf8(bytes)
        .map_err(|_| crate::cmd::layout::usage("--set needs a UTF-8 spec", ""))?;
    for set in sets {
        let Some((key, value)) = set.split_once('=') else {
            return Err(crate::cmd::layout::usage(
                &format!("--set `{set}` is not `section.key=value`"),
                "for example --set train.lr=3e-4 or --set moe.score=sigmoid",
            ));
        };
        text = kiln_compiler::check::set_key(&text, key.trim(), value)
            .map_err(|e| crate::cmd::layout::usage(&format!("--set {set}: {e}"), ""))?;
    }
    Ok(text.into_bytes())
}

/// The `--set` overrides of the command line.
pub(crate) fn overrides() -> &'static [String] {
    OVERRIDES.get().map_or(&[][..], Vec::as_slice)
}

/// A spec's display name and bytes as the file has them.
pub(crate) fn read_raw(path: Option<&PathBuf>) -> Result<(String, Vec<u8>), Failure> {
    match path {
        None => Ok((TINY_NAME.to_string(), TINY.as_bytes().to_vec())),
        Some(p) => std::fs::read(p)
            .map(|b| (p.display().to_string(), b))
            .map_err(|e| Failure::Other(format!("cannot read {}: {e}", p.display()))),
    }
}

/// Checks spec bytes; on failure renders the diagnostics under `name` and returns
/// [`Failure::Invalid`].
pub(crate) fn check_named(name: &str, bytes: &[u8], color: bool) -> Result<Model, Failure> {
    check(bytes).map_err(|diags| {
        let text = String::from_utf8_lossy(bytes);
        eprint!("{}", diag::render(name, &text, &diags, color));
        Failure::Invalid
    })
}

/// A spec's display name and bytes, with the `--set` overrides applied.
pub(crate) fn read_spec(path: Option<&PathBuf>) -> Result<(String, Vec<u8>), Failure> {
    let (name, bytes) = match path {
        None => (TINY_NAME.to_string(), TINY.as_bytes().to_vec()),
        Some(p) => std::fs::read(p)
            .map(|b| (p.display().to_string(), b))
            .map_err(|e| Failure::Other(format!("cannot read {}: {e}", p.display())))?,
    };
    let sets = OVERRIDES.get().map_or(&[][..], Vec::as_slice);
    // Diagnostics then say where a line they show came from.
    let name = if sets.is_empty() {
        name
    } else {
        format!("{name} with --set {}", sets.join(" --set "))
    };
    Ok((name, apply_sets(bytes, sets)?))
}

/// The JSON form of diagnostics, one object per error.
fn errors_json(file: &str, text: &str, diags: &[Diagnostic]) -> Vec<serde_json::Value> {
    diags
        .iter()
        .map(|d| {
            let (line, col) = d.line_col(text);
            serde_json::json!({
                "rule": d.rule.name(),
                "message": d.message,
                "file": file,
                "line": line,
                "col": col,
                "span": [d.span.start, d.span.end],
                "label": d.label,
                "help": d.help,
            })
        })
        .collect()
}

/// Checks one spec. On failure, renders its diagnostics to stderr and appends their JSON form
/// to `json_errors`.
pub(crate) fn load(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<(String, Model), Failure> {
    let (name, bytes) = read_spec(path)?;
    check(&bytes).map(|m| (name.clone(), m)).map_err(|diags| {
        let text = String::from_utf8_lossy(&bytes);
        eprint!("{}", diag::render(&name, &text, &diags, color));
        json_errors.extend(errors_json(&name, &text, &diags));
        Failure::Invalid
    })
}

/// With `--json`, an invalid spec's errors go to stdout as `{"errors": [...]}`.
pub(crate) fn print_errors_json(json: bool, errors: Vec<serde_json::Value>) {
    if json && !errors.is_empty() {
        out(&format!("{:#}\n", serde_json::json!({ "errors": errors })));
    }
}
