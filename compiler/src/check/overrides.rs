//! `--set section.key=value`: a spec text with one key set, so the checker sees an override
//! exactly as if the file said it (its rules, its types, its diagnostics), and a run can
//! record the resolved spec.

use toml::de::{DeTable, DeValue};

use crate::source::{Piece, SpecSource};

/// The name diagnostics give the `--set` overrides, one `section.key = value` line each.
pub const OVERRIDES: &str = "--set";

/// `text` with `path` (`train.lr`, `attention.rope.theta`) set to `value`; see [`set`].
pub fn set_key(text: &str, path: &str, value: &str) -> Result<String, String> {
    let mut src = SpecSource::single("spec", text);
    set(&mut src, path, value)?;
    Ok(src.text().to_string())
}

/// Sets `path` (`train.lr`, `attention.rope.theta`) to `value` in a spec's resolved text. The
/// value is TOML as written (`3e-4`, `[128, 128]`, `true`, `"bf16"`); anything that is not a
/// TOML value is taken as a string (`moe.score=sigmoid`). The override is recorded as a line of
/// the `--set` source, so a diagnostic about it points there.
pub fn set(src: &mut SpecSource, path: &str, value: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').map(str::trim).collect();
    if segments.len() < 2 || segments.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "`{path}`: name a key by its section, as in `train.lr` or `attention.rope.theta`"
        ));
    }
    let value = toml_value(value);
    let line = format!("{} = {value}", segments.join("."));
    let (file, at) = src.append_line(OVERRIDES, &line);
    // Each part of the path, and `key = value`, maps to its place in the `--set` line.
    let mut sections = Vec::new();
    let mut offset = at;
    for s in &segments[..segments.len() - 1] {
        sections.push((s.to_string(), src.piece(file, offset..offset + s.len())));
        offset += s.len() + 1;
    }
    let leaf = Leaf {
        sections,
        key: segments[segments.len() - 1].to_string(),
        line: src.piece(file, offset..at + line.len()),
    };
    apply(src, &leaf)
}

/// One key an overriding source sets: its sections from the root, each with the piece to name
/// it by in a new header, and its `key = value` as the source wrote it.
#[derive(Clone, Debug)]
pub(crate) struct Leaf {
    pub sections: Vec<(String, Piece)>,
    pub key: String,
    pub line: Piece,
}

/// Sets one key in the resolved text: an existing `key = value` is replaced by the leaf's; a
/// new key goes right under its section's header (or at the top, for a root key); a new
/// section goes at the end.
pub(crate) fn apply(src: &mut SpecSource, leaf: &Leaf) -> Result<(), String> {
    match find(src.text(), &leaf.sections, Some(&leaf.key))? {
        Some(Found::Key(at)) => src.replace(at, std::slice::from_ref(&leaf.line)),
        Some(Found::Insert(at)) => {
            src.replace(at..at, &[leaf.line.clone(), Piece::synthetic("\n")]);
        }
        None => {
            let at = src.text().len();
            let mut pieces = new_header(src.text(), &leaf.sections);
            pieces.extend([leaf.line.clone(), Piece::synthetic("\n")]);
            src.replace(at..at, &pieces);
        }
    }
    Ok(())
}

/// Makes sure a section exists (an empty section can mean something, like `[mtp]`).
pub(crate) fn ensure_section(
    src: &mut SpecSource,
    sections: &[(String, Piece)],
) -> Result<(), String> {
    if find(src.text(), sections, None)?.is_none() {
        let at = src.text().len();
        src.replace(at..at, &new_header(src.text(), sections));
    }
    Ok(())
}

/// Where a key goes in a section that exists.
enum Found {
    /// The range `key = value` of the key, which exists.
    Key(std::ops::Range<usize>),
    /// The offset a new key line goes at.
    Insert(usize),
}

/// The key `key` (when given) in the section, or where a new key goes; `None` when some part
/// of the section is absent.
fn find(
    text: &str,
    sections: &[(String, Piece)],
    key: Option<&str>,
) -> Result<Option<Found>, String> {
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err("the spec is not valid TOML; fix it before overriding keys".to_string());
    }
    let names: Vec<&str> = sections.iter().map(|(s, _)| s.as_str()).collect();
    let name = names.join(".");
    let mut table: &DeTable = root.get_ref();
    for (i, s) in names.iter().enumerate() {
        match table.get(*s).map(|v| v.get_ref()) {
            Some(DeValue::Table(inner)) => table = inner,
            Some(_) => {
                return Err(format!(
                    "`{}` is a value, not a section",
                    names[..=i].join(".")
                ));
            }
            None => return Ok(None),
        }
    }
    if let Some((k, v)) = key.and_then(|key| table.get_key_value(key)) {
        let path = if name.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{name}.{}", k.get_ref())
        };
        if matches!(v.get_ref(), DeValue::Table(_)) {
            return Err(format!(
                "`{path}` is a section; set its keys one by one, as in `{path}.KEY`"
            ));
        }
        return Ok(Some(Found::Key(k.span().start..v.span().end)));
    }
    if sections.is_empty() {
        return Ok(Some(Found::Insert(0)));
    }
    match header_end(text, &name) {
        Some(at) => Ok(Some(Found::Insert(at))),
        None => Err(format!(
            "[{name}] is written inline or as dotted keys; add the key to the spec itself"
        )),
    }
}

/// `[a.b]` on a line of its own at the end of `text`, each name mapped to where it came from.
fn new_header(text: &str, sections: &[(String, Piece)]) -> Vec<Piece> {
    let sep = if text.ends_with('\n') || text.is_empty() {
        "\n"
    } else {
        "\n\n"
    };
    let mut pieces = vec![Piece::synthetic(format!("{sep}["))];
    for (i, (_, piece)) in sections.iter().enumerate() {
        if i > 0 {
            pieces.push(Piece::synthetic("."));
        }
        pieces.push(piece.clone());
    }
    pieces.push(Piece::synthetic("]\n"));
    pieces
}

/// The value as TOML: itself when it parses as one, else a quoted string.
fn toml_value(value: &str) -> String {
    let v = value.trim();
    let (_, errors) = DeTable::parse_recoverable(&format!("v = {v}"));
    if errors.is_empty() && !v.is_empty() && !v.contains('\n') {
        v.to_string()
    } else {
        let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// The byte just past the line `[name]` (spaces inside the brackets ignored).
fn header_end(text: &str, name: &str) -> Option<usize> {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let body = line.split('#').next().unwrap_or("").trim();
        if let Some(inner) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
            let normalized: String = inner
                .split('.')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(".");
            if !inner.starts_with('[') && normalized == name {
                return Some(at + line.len());
            }
        }
        at += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check_str;

    const TINY: &str = include_str!("../../../specs/tiny.toml");

    #[test]
    fn an_existing_key_is_replaced_in_place() {
        let t = set_key(TINY, "train.lr", "5e-4").unwrap();
        assert_eq!(check_str(&t).unwrap().train.optimizer.lr, 5e-4);
        assert_eq!(t.lines().count(), TINY.lines().count());
        let t = set_key(TINY, "precision.fp8.weight_block", "[128, 64]").unwrap();
        let fp8 = check_str(&t).unwrap().precision.fp8.unwrap();
        assert_eq!(fp8.weight_block, [128, 64]);
        // The checker judges an override as it judges the file.
        let t = set_key(TINY, "train.lr", "\"fast\"").unwrap();
        assert!(check_str(&t).is_err());
    }

    #[test]
    fn a_bare_word_is_a_string_and_new_keys_and_sections_are_added() {
        let t = set_key(TINY, "moe.score", "softmax").unwrap();
        let m = check_str(&t).unwrap();
        assert_eq!(m.moe.unwrap().score, crate::model::ScoreFunc::Softmax);
        let t = set_key(TINY, "train.weight_decay", "0.05").unwrap();
        assert_eq!(check_str(&t).unwrap().train.optimizer.weight_decay, 0.05);
        let t = set_key(TINY, "parallel.dp", "2").unwrap();
        assert_eq!(check_str(&t).unwrap().parallel.dp, 2);
        let t = set_key(TINY, "attention.rope.yarn.factor", "4.0").unwrap();
        assert!(t.contains("[attention.rope.yarn]\nfactor = 4.0"));
    }

    #[test]
    fn bad_paths_say_what_a_path_is() {
        assert!(set_key(TINY, "lr", "1")
            .unwrap_err()
            .contains("by its section"));
        assert!(set_key(TINY, "train..lr", "1").is_err());
        assert!(set_key(TINY, "model.name.x", "1")
            .unwrap_err()
            .contains("is a value"));
    }
}
