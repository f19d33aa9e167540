//! `extends = "base.toml"`: a spec written as another spec plus the keys it changes.
//!
//! The chain is followed to a spec without `extends`, whose text is the start of the resolved
//! spec; then each spec down the chain sets its keys on it in the order it writes them (see
//! [`super::overrides::apply`]). A spec can add and change keys, not remove them. The
//! compiler does no I/O: a caller's loader reads the files, so paths, the built-in specs and
//! errors reading them are the caller's business.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::overrides::{apply, ensure_section, Leaf};
use super::syntax_errors;
use crate::diag::Diagnostic;
use crate::source::{extends_error, Piece, SpecSource};

/// A spec file as a loader read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// What identifies the file, to find loops (a canonical path).
    pub id: String,
    /// What diagnostics call it (the path as written or resolved for the user).
    pub name: String,
    pub text: String,
}

/// A loader: given the spec that extends and the text of its `extends`, the spec it names, or
/// why it cannot be read.
pub type Loader<'a> = dyn FnMut(&Loaded, &str) -> Result<Loaded, String> + 'a;

/// Resolves `first`'s `extends` chain into the text the checker reads, with each byte mapped
/// to the file that wrote it. On failure, the diagnostics are about one file of the chain,
/// which the returned [`SpecSource`] holds.
pub fn resolve(
    first: Loaded,
    load: &mut Loader,
) -> Result<SpecSource, (SpecSource, Vec<Diagnostic>)> {
    let display = first.name.clone();
    // The chain, from `first` to the spec that extends nothing.
    let mut chain = vec![first];
    loop {
        let last = chain.last().expect("the chain starts with one spec");
        let fail = |diags| Err((SpecSource::single(&last.name, &last.text), diags));
        let found = match extends_of(&last.text) {
            Ok(found) => found,
            Err(diags) => return fail(diags),
        };
        let Some((target, span)) = found else {
            break;
        };
        let next = match load(last, &target) {
            Ok(next) => next,
            Err(why) => {
                return fail(vec![extends_error(
                    span,
                    format!("cannot read `{target}`, the spec this one extends: {why}"),
                    "this spec",
                )
                .with_help("`extends` is a path relative to the file that says it")]);
            }
        };
        if let Some(i) = chain.iter().position(|s| s.id == next.id) {
            let names: Vec<&str> = chain[i..].iter().map(|s| s.name.as_str()).collect();
            return fail(vec![extends_error(
                span,
                format!(
                    "the specs extend each other in a loop: {} → {}",
                    names.join(" → "),
                    next.name
                ),
                "this closes the loop",
            )]);
        }
        chain.push(next);
    }
    let root = chain.pop().expect("the chain starts with one spec");
    let mut src = SpecSource::single(&root.name, &root.text);
    while let Some(spec) = chain.pop() {
        let file = src.add_file(&spec.name, &spec.text);
        let (table, _) = DeTable::parse_recoverable(&spec.text);
        let mut edits = Vec::new();
        edits_of(&src, file, table.get_ref(), &[], &mut edits);
        edits.sort_by_key(|e| e.0.start);
        for (at, edit) in edits {
            let done = match &edit {
                Edit::Key(leaf) => apply(&mut src, leaf),
                Edit::Section(sections) => ensure_section(&mut src, sections),
            };
            if let Err(why) = done {
                let diag = extends_error(
                    at,
                    format!("cannot apply this over {}: {why}", root.name),
                    "here",
                );
                return Err((SpecSource::single(&spec.name, &spec.text), vec![diag]));
            }
        }
    }
    src.set_name(display);
    Ok(src)
}

/// The spec's `extends` and the span of its value, if it has one.
fn extends_of(text: &str) -> Result<Option<(String, Range<usize>)>, Vec<Diagnostic>> {
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(syntax_errors(&errors));
    }
    let Some(v) = root.get_ref().get("extends") else {
        return Ok(None);
    };
    match v.get_ref() {
        DeValue::String(s) => Ok(Some((s.to_string(), v.span()))),
        _ => Err(vec![extends_error(
            v.span(),
            "`extends` names the spec this one builds on".to_string(),
            "expected a path in quotes",
        )
        .with_help(
            "write `extends = \"deepseek-v3.toml\"`, relative to this file",
        )]),
    }
}

/// What a spec down the chain does to the resolved text.
enum Edit {
    /// Sets a key.
    Key(Leaf),
    /// Makes sure an empty section of the spec exists.
    Section(Vec<(String, Piece)>),
}

/// Every key `table` sets (recursing into sections and inline tables), each with the span it
/// is written at, so errors point there and edits run in the file's order.
fn edits_of(
    src: &SpecSource,
    file: usize,
    table: &DeTable,
    sections: &[(String, Piece)],
    out: &mut Vec<(Range<usize>, Edit)>,
) {
    for (k, v) in table.iter() {
        let name: &str = k.get_ref();
        if sections.is_empty() && name == "extends" {
            continue;
        }
        let key_span = k.span();
        match v.get_ref() {
            DeValue::Table(inner) => {
                let mut path = sections.to_vec();
                path.push((name.to_string(), src.piece(file, key_span.clone())));
                if inner.is_empty() {
                    out.push((key_span, Edit::Section(path.clone())));
                }
                edits_of(src, file, inner, &path, out);
            }
            _ => {
                let line = src.piece(file, key_span.start..v.span().end);
                let leaf = Leaf {
                    sections: sections.to_vec(),
                    key: name.to_string(),
                    line,
                };
                out.push((key_span, Edit::Key(leaf)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_str;
    use crate::source::Location;

    const TINY: &str = include_str!("../../../specs/tiny.toml");

    fn loaded(name: &str, text: &str) -> Loaded {
        Loaded {
            id: name.to_string(),
            name: name.to_string(),
            text: text.to_string(),
        }
    }

    /// A loader over named texts.
    fn files<'a>(
        specs: &'a [(&'a str, &'a str)],
    ) -> impl FnMut(&Loaded, &str) -> Result<Loaded, String> + 'a {
        move |_, target| {
            specs
                .iter()
                .find(|(n, _)| *n == target)
                .map(|(n, t)| loaded(n, t))
                .ok_or_else(|| "no such file".to_string())
        }
    }

    #[test]
    fn a_child_changes_and_adds_keys_over_its_base() {
        let child = "extends = \"tiny.toml\"\n\n[train]\nlr = 5e-4\nweight_decay = 0.05\n\n[parallel]\ndp = 2\n";
        let src = resolve(
            loaded("child.toml", child),
            &mut files(&[("tiny.toml", TINY)]),
        )
        .unwrap();
        let m = check_str(src.text()).unwrap();
        assert_eq!(m.train.optimizer.lr, 5e-4);
        assert_eq!(m.train.optimizer.weight_decay, 0.05);
        assert_eq!(m.parallel.dp, 2);
        // Everything else is tiny's.
        let tiny = check_str(TINY).unwrap();
        assert_eq!(m.layers, tiny.layers);
        assert!(!src.text().contains("extends"));
        // `lr = 5e-4` in the resolved text is the child's line 4.
        let at = src.text().find("lr = 5e-4").unwrap();
        match src.locate(&(at..at + 9)) {
            Location::File(f, r) => {
                assert_eq!(src.files()[f].name, "child.toml");
                assert_eq!(&child[r], "lr = 5e-4");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chains_resolve_in_order_and_loops_are_errors() {
        let mid = "extends = \"tiny.toml\"\n[train]\nlr = 1e-3\nsteps = 700\n";
        let top = "extends = \"mid.toml\"\n[train]\nlr = 2e-3\n";
        let specs = [("tiny.toml", TINY), ("mid.toml", mid)];
        let src = resolve(loaded("top.toml", top), &mut files(&specs)).unwrap();
        let m = check_str(src.text()).unwrap();
        assert_eq!((m.train.optimizer.lr, m.train.steps), (2e-3, 700));

        let a = "extends = \"b.toml\"\n";
        let b = "extends = \"a.toml\"\n";
        let (_, diags) = resolve(
            loaded("a.toml", a),
            &mut files(&[("a.toml", a), ("b.toml", b)]),
        )
        .unwrap_err();
        assert!(
            diags[0].message.contains("a.toml → b.toml → a.toml"),
            "{}",
            diags[0].message
        );
        let (src, diags) = resolve(
            loaded("a.toml", "extends = \"nope.toml\"\n"),
            &mut files(&[]),
        )
        .unwrap_err();
        assert!(diags[0].message.contains("cannot read `nope.toml`"));
        assert_eq!(src.files()[0].name, "a.toml");
        let (_, diags) = resolve(loaded("a.toml", "extends = 3\n"), &mut files(&[])).unwrap_err();
        assert_eq!(diags[0].rule, crate::diag::Rule::Extends);
    }
}
