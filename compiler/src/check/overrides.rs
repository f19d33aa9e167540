//! `--set section.key=value`: a spec text with one key set, so the checker sees an override
//! exactly as if the file said it (its rules, its types, its diagnostics), and a run can
//! record the resolved spec.

use toml::de::{DeTable, DeValue};

/// `text` with `path` (`train.lr`, `attention.rope.theta`) set to `value`. The value is TOML
/// as written (`3e-4`, `[128, 128]`, `true`, `"bf16"`); anything that is not a TOML value is
/// taken as a string (`moe.score=sigmoid`). An existing key has its value replaced in place;
/// a new key goes right under its section's header; a new section goes at the end.
pub fn set_key(text: &str, path: &str, value: &str) -> Result<String, String> {
    let segments: Vec<&str> = path.split('.').map(str::trim).collect();
    if segments.len() < 2 || segments.iter().any(|s| s.is_empty()) {
        return Err(format!(
            "`{path}`: name a key by its section, as in `train.lr` or `attention.rope.theta`"
        ));
    }
    let (sections, key) = segments.split_at(segments.len() - 1);
    let key = key[0];
    let value = toml_value(value);
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err("the spec is not valid TOML; fix it before overriding keys".to_string());
    }
    // Walk to the section; `None` when some part of it is absent.
    let mut table: Option<&DeTable> = Some(root.get_ref());
    for s in sections {
        table = table.and_then(|t| match t.get(*s).map(|v| v.get_ref()) {
            Some(DeValue::Table(inner)) => Some(inner),
            Some(_) => None,
            None => None,
        });
        if table.is_none() {
            if let Some(v) = walk_value(root.get_ref(), sections) {
                if !matches!(v, DeValue::Table(_)) {
                    return Err(format!(
                        "`{}` is a value, not a section",
                        sections.join(".")
                    ));
                }
            }
            break;
        }
    }
    let name = sections.join(".");
    match table {
        Some(t) => match t.get(key) {
            Some(v) => {
                let span = v.span();
                Ok(format!(
                    "{}{value}{}",
                    &text[..span.start],
                    &text[span.end..]
                ))
            }
            None => match header_end(text, &name) {
                Some(at) => Ok(format!("{}{key} = {value}\n{}", &text[..at], &text[at..])),
                None => Err(format!(
                    "[{name}] is written inline or as dotted keys; add `{key}` to the spec itself"
                )),
            },
        },
        None => {
            let sep = if text.ends_with('\n') || text.is_empty() {
                ""
            } else {
                "\n"
            };
            Ok(format!("{text}{sep}\n[{name}]\n{key} = {value}\n"))
        }
    }
}

fn walk_value<'a>(root: &'a DeTable<'a>, sections: &[&str]) -> Option<&'a DeValue<'a>> {
    let (first, rest) = sections.split_first()?;
    let mut v = root.get(*first)?.get_ref();
    for s in rest {
        match v {
            DeValue::Table(t) => v = t.get(*s)?.get_ref(),
            _ => return Some(v),
        }
    }
    Some(v)
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
