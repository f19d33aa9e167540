//! `kiln diff A B`: the settings two specs change, and how their reports differ.

use std::path::PathBuf;

use kiln_compiler::analyze::{analyze, with_layout};
use kiln_compiler::report;

use super::layout::LayoutArgs;

use crate::output::{out, print_pretty};
use crate::spec::{load, print_errors_json};
use crate::Failure;

pub(crate) fn run(
    a: &PathBuf,
    b: &PathBuf,
    json: bool,
    layout: &LayoutArgs,
    color: bool,
) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let ma = load(Some(a), &mut errors, color);
    let mb = load(Some(b), &mut errors, color);
    print_errors_json(json, errors);
    let ((na, mut ma), (nb, mut mb)) = (ma?, mb?);
    layout.apply(&mut ma)?;
    layout.apply(&mut mb)?;
    // Per-device figures for both or neither, so the two reports list the same metrics.
    let per_device =
        layout.cluster.is_some() || !ma.parallel.is_single() || !mb.parallel.is_single();
    let (ra, rb) = if per_device {
        let ca = layout.cluster(&ma, true)?.expect("asked for");
        let cb = layout.cluster(&mb, true)?.expect("asked for");
        (with_layout(&ma, &ca), with_layout(&mb, &cb))
    } else {
        (analyze(&ma), analyze(&mb))
    };
    let spec_changes = setting_changes(&ma.settings(), &mb.settings());
    let changes = report::diff(&ra, &rb);
    if json {
        #[derive(serde::Serialize)]
        struct SpecChange<'a> {
            key: &'a str,
            a: &'a str,
            b: &'a str,
        }
        #[derive(serde::Serialize)]
        struct DiffJson<'a> {
            a: &'a str,
            b: &'a str,
            spec_changes: Vec<SpecChange<'a>>,
            /// Serialized with exact integers (u128), never rounded through f64.
            metric_changes: &'a [report::Change],
        }
        let doc = DiffJson {
            a: &na,
            b: &nb,
            spec_changes: spec_changes
                .iter()
                .map(|(key, a, b)| SpecChange { key, a, b })
                .collect(),
            metric_changes: &changes,
        };
        print_pretty(&doc, "diff")?;
    } else {
        out(&report::render_diff(&na, &nb, &spec_changes, &changes));
    }
    Ok(())
}

/// The settings whose values differ from `a` to `b`, as `(key, a, b)` with `(unset)` for a
/// key one side lacks, in the settings' section order: a key only `b` has is placed after
/// the key that precedes it in `b`, so `attention.rope.yarn.*` stays under `attention`.
fn setting_changes(
    a: &[(String, String)],
    b: &[(String, String)],
) -> Vec<(String, String, String)> {
    let mut keys: Vec<&str> = a.iter().map(|(k, _)| k.as_str()).collect();
    let mut after = 0;
    for (k, _) in b {
        match keys.iter().position(|x| x == k) {
            Some(i) => after = i + 1,
            None => {
                keys.insert(after, k);
                after += 1;
            }
        }
    }
    let value = |side: &[(String, String)], k: &str| {
        side.iter()
            .find(|(x, _)| x == k)
            .map_or("(unset)".to_string(), |(_, v)| v.clone())
    };
    keys.into_iter()
        .map(|k| (k.to_string(), value(a, k), value(b, k)))
        .filter(|(_, x, y)| x != y)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::setting_changes;

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_only_b_has_sit_in_their_section() {
        let a = s(&[
            ("attention.heads", "4"),
            ("attention.rope.theta", "1e4"),
            ("moe.top_k", "2"),
        ]);
        let b = s(&[
            ("attention.heads", "4"),
            ("attention.rope.theta", "1e4"),
            ("attention.rope.yarn.factor", "4.0"),
            ("moe.top_k", "2"),
            ("mtp.depth", "1"),
        ]);
        let keys: Vec<String> = setting_changes(&a, &b).into_iter().map(|c| c.0).collect();
        assert_eq!(keys, ["attention.rope.yarn.factor", "mtp.depth"]);
        let back: Vec<(String, String, String)> = setting_changes(&b, &a);
        assert_eq!(
            back[0],
            (
                "attention.rope.yarn.factor".into(),
                "4.0".into(),
                "(unset)".into()
            )
        );
    }
}
