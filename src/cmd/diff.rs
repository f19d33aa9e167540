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
    let sa = ma.settings();
    let sb = mb.settings();
    let mut spec_changes = Vec::new();
    for (k, va) in &sa {
        let vb = sb
            .iter()
            .find(|(kb, _)| kb == k)
            .map_or("(unset)", |(_, v)| v.as_str());
        if vb != va {
            spec_changes.push((k.clone(), va.clone(), vb.to_string()));
        }
    }
    for (k, vb) in &sb {
        if !sa.iter().any(|(ka, _)| ka == k) {
            spec_changes.push((k.clone(), "(unset)".to_string(), vb.clone()));
        }
    }
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
