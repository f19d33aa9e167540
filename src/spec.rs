//! Reading a spec and checking it: the built-in default, `extends` chains and `--set`
//! overrides resolved into the text the checker reads, diagnostics rendered to stderr at the
//! file that holds each error and, for `--json`, their JSON form.

use std::path::{Path, PathBuf};

use kiln_compiler::check::check;
use kiln_compiler::check::extends::{self, Loaded};
use kiln_compiler::diag;
use kiln_compiler::model::Model;
use kiln_compiler::source::SpecSource;

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

/// The `--set` overrides of the command line.
pub(crate) fn overrides() -> &'static [String] {
    OVERRIDES.get().map_or(&[][..], Vec::as_slice)
}

/// Applies `sets` (`section.key=value` each) to a spec, in order, and names it after them.
pub(crate) fn apply_sets(src: &mut SpecSource, sets: &[String]) -> Result<(), Failure> {
    if sets.is_empty() {
        return Ok(());
    }
    for set in sets {
        let Some((key, value)) = set.split_once('=') else {
            return Err(crate::cmd::layout::usage(
                &format!("--set `{set}` is not `section.key=value`"),
                "for example --set train.lr=3e-4 or --set moe.score=sigmoid",
            ));
        };
        kiln_compiler::check::set(src, key.trim(), value)
            .map_err(|e| crate::cmd::layout::usage(&format!("--set {set}: {e}"), ""))?;
    }
    // Diagnostics then say where the text they check came from.
    let name = format!("{} with --set {}", src.name(), sets.join(" --set "));
    src.set_name(name);
    Ok(())
}

/// A spec as its file says, with its `extends` chain resolved (no `--set` overrides).
/// Diagnostics about the chain (a missing base, a loop) are rendered, and their JSON form
/// appended to `json_errors`.
pub(crate) fn read_source(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<SpecSource, Failure> {
    let Some(p) = path else {
        return Ok(SpecSource::single(TINY_NAME, TINY));
    };
    let bytes = read_file(p).map_err(Failure::Other)?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            // The checker's own diagnostic says where the bytes stop being UTF-8.
            let bytes = e.into_bytes();
            let name = p.display().to_string();
            let diags = check(&bytes).err().unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            eprint!("{}", diag::render(&name, &text, &diags, color));
            json_errors.extend(SpecSource::single(&name, text).errors_json(&diags));
            return Err(Failure::Invalid);
        }
    };
    // A base is named as the user would write it (`specs/child.toml` extends `base.toml`:
    // `specs/base.toml`) and identified by its canonical path, so a loop is found whatever
    // the spelling.
    let first = loaded(p.clone(), text).map_err(Failure::Other)?;
    let mut load = |from: &Loaded, target: &str| {
        let dir = Path::new(&from.name).parent().unwrap_or(Path::new(""));
        load_file(lexical(&dir.join(target)))
    };
    extends::resolve(first, &mut load).map_err(|(src, diags)| {
        eprint!("{}", src.render(&diags, color));
        json_errors.extend(src.errors_json(&diags));
        Failure::Invalid
    })
}

/// Reads one spec of an `extends` chain.
fn load_file(name: PathBuf) -> Result<Loaded, String> {
    let bytes = read_file(&name)?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", name.display()))?;
    loaded(name, text)
}

/// A spec of an `extends` chain read as `text`, identified by its canonical path.
fn loaded(name: PathBuf, text: String) -> Result<Loaded, String> {
    let id = name
        .canonicalize()
        .map_err(|e| format!("{}: {e}", name.display()))?;
    Ok(Loaded {
        id: id.to_string_lossy().into_owned(),
        name: name.display().to_string(),
        text,
    })
}

/// `a/b/../c` as `a/c`, so a base is named as a person would name it.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn read_file(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// A spec with its `extends` chain resolved and the `--set` overrides applied.
pub(crate) fn source(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<SpecSource, Failure> {
    let mut src = read_source(path, json_errors, color)?;
    apply_sets(&mut src, overrides())?;
    Ok(src)
}

/// Checks a resolved spec; on failure renders its diagnostics at the files that hold them,
/// appends their JSON form to `json_errors` and returns [`Failure::Invalid`].
pub(crate) fn check_source(
    src: &SpecSource,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<Model, Failure> {
    check(src.text().as_bytes()).map_err(|diags| {
        eprint!("{}", src.render(&diags, color));
        json_errors.extend(src.errors_json(&diags));
        Failure::Invalid
    })
}

/// Checks one spec. On failure, renders its diagnostics to stderr and appends their JSON form
/// to `json_errors`.
pub(crate) fn load(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<(String, Model), Failure> {
    let (name, _, model) = load_text(path, json_errors, color)?;
    Ok((name, model))
}

/// [`load`], with the resolved text (`extends` and `--set` applied): what a run records and a
/// build compiles.
pub(crate) fn load_text(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<(String, Vec<u8>, Model), Failure> {
    let src = source(path, json_errors, color)?;
    let model = check_source(&src, json_errors, color)?;
    Ok((
        src.name().to_string(),
        src.text().as_bytes().to_vec(),
        model,
    ))
}

/// With `--json`, an invalid spec's errors go to stdout as `{"errors": [...]}`.
pub(crate) fn print_errors_json(json: bool, errors: Vec<serde_json::Value>) {
    if json && !errors.is_empty() {
        out(&format!("{:#}\n", serde_json::json!({ "errors": errors })));
    }
}
