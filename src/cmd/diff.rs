//! `kiln diff A B [C …]`: the settings specs change, and how their reports differ — for two
//! specs with the ratio B / A, for more as one table with a column per spec.

use std::fmt::Write;
use std::path::PathBuf;

use kiln_compiler::analyze::{analyze, with_layout, Report};
use kiln_compiler::model::Model;
use kiln_compiler::report;

use super::layout::LayoutArgs;

use crate::output::{out, print_pretty};
use crate::spec::{load, print_errors_json};
use crate::Failure;

pub(crate) fn run(
    specs: &[PathBuf],
    json: bool,
    layout: &LayoutArgs,
    color: bool,
) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let loaded: Vec<_> = specs
        .iter()
        .map(|p| load(Some(p), &mut errors, color))
        .collect();
    print_errors_json(json, errors);
    let mut names = Vec::new();
    let mut models: Vec<Model> = Vec::new();
    for l in loaded {
        let (n, m) = l?;
        names.push(n);
        models.push(m);
    }
    for m in &mut models {
        layout.apply(m)?;
    }
    let reports = reports(&models, layout)?;
    if models.len() > 2 {
        return table(&names, &models, &reports, &[], json);
    }
    let (na, nb) = (&names[0], &names[1]);
    let (ma, mb) = (&models[0], &models[1]);
    let (ra, rb) = (&reports[0], &reports[1]);
    let spec_changes = setting_changes(&ma.settings(), &mb.settings());
    let changes = report::diff(ra, rb);
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
            a: na,
            b: nb,
            spec_changes: spec_changes
                .iter()
                .map(|(key, a, b)| SpecChange { key, a, b })
                .collect(),
            metric_changes: &changes,
        };
        print_pretty(&doc, "diff")?;
    } else {
        out(&report::render_diff(na, nb, &spec_changes, &changes));
    }
    Ok(())
}

/// The settings whose values differ from `a` to `b`, as `(key, a, b)` with `(unset)` for a
/// key one side lacks, in the settings' section order ([`settings_table`]'s), so
/// `attention.rope.yarn.*` stays under `attention`.
fn setting_changes(
    a: &[(String, String)],
    b: &[(String, String)],
) -> Vec<(String, String, String)> {
    settings_table(&[a.to_vec(), b.to_vec()])
        .into_iter()
        .filter_map(|(k, mut v)| {
            let (y, x) = (v.pop()?, v.pop()?);
            (x != y).then_some((k, x, y))
        })
        .collect()
}

/// Every setting key of `sides`, in their sections' order (a key some side lacks is placed
/// after the key that precedes it where it appears), with each side's value or `(unset)`.
fn settings_table(sides: &[Vec<(String, String)>]) -> Vec<(String, Vec<String>)> {
    let mut keys: Vec<&str> = Vec::new();
    for side in sides {
        let mut after = 0;
        for (k, _) in side {
            match keys.iter().position(|x| x == k) {
                Some(i) => after = i + 1,
                None => {
                    keys.insert(after, k);
                    after += 1;
                }
            }
        }
    }
    keys.into_iter()
        .map(|k| {
            let values = sides
                .iter()
                .map(|side| {
                    side.iter()
                        .find(|(x, _)| x == k)
                        .map_or("(unset)".to_string(), |(_, v)| v.clone())
                })
                .collect();
            (k.to_string(), values)
        })
        .collect()
}

/// The reports of `models`, with the per-device figures for all of them or none (so they
/// list the same metrics): for all when one has a layout or `--cluster` names a cluster.
pub(crate) fn reports(models: &[Model], layout: &LayoutArgs) -> Result<Vec<Report>, Failure> {
    let per_device = layout.cluster.is_some() || models.iter().any(|m| !m.parallel.is_single());
    models
        .iter()
        .map(|m| {
            Ok(if per_device {
                let c = layout.cluster(m, true)?.expect("asked for");
                with_layout(m, &c)
            } else {
                analyze(m)
            })
        })
        .collect()
}

/// `kiln diff A B C …`: one table of the settings and metrics that differ among the specs.
/// A column's name in the table: `A`, `B`, … `Z`, then `v26`, `v27`, … (a sweep's runs are
/// named alike).
pub(crate) fn column(i: usize) -> String {
    if i < 26 {
        char::from(b'A' + i as u8).to_string()
    } else {
        format!("v{i}")
    }
}

/// A row of measured results beside the specs' columns (`kiln sweep --train`): a name, one
/// value per spec (`None` where there is none) and the decimals to print.
pub(crate) type ResultRow = (String, Vec<Option<f64>>, usize);

pub(crate) fn table(
    names: &[String],
    models: &[Model],
    reports: &[Report],
    results: &[ResultRow],
    json: bool,
) -> Result<(), Failure> {
    let sides: Vec<Vec<(String, String)>> = models.iter().map(Model::settings).collect();
    let settings: Vec<(String, Vec<String>)> = settings_table(&sides)
        .into_iter()
        .filter(|(_, v)| v.iter().any(|x| x != &v[0]))
        .collect();
    let metrics: Vec<Vec<(String, u128, report::Unit)>> =
        reports.iter().map(report::metrics).collect();
    let changed: Vec<usize> = (0..metrics[0].len())
        .filter(|&i| metrics.iter().any(|m| m[i].1 != metrics[0][i].1))
        .collect();
    if json {
        #[derive(serde::Serialize)]
        struct Row<'a, T> {
            key: &'a str,
            values: Vec<T>,
        }
        #[derive(serde::Serialize)]
        struct Table<'a> {
            specs: &'a [String],
            spec_changes: Vec<Row<'a, &'a str>>,
            /// Exact integers (u128), never rounded through f64.
            metric_changes: Vec<Row<'a, u128>>,
            /// Measured results (`kiln sweep --train`), `null` where there is none.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            results: Vec<Row<'a, Option<f64>>>,
        }
        let doc = Table {
            specs: names,
            spec_changes: settings
                .iter()
                .map(|(k, v)| Row {
                    key: k,
                    values: v.iter().map(String::as_str).collect(),
                })
                .collect(),
            metric_changes: changed
                .iter()
                .map(|&i| Row {
                    key: &metrics[0][i].0,
                    values: metrics.iter().map(|m| m[i].1).collect(),
                })
                .collect(),
            results: results
                .iter()
                .map(|(k, v, _)| Row {
                    key: k,
                    values: v.clone(),
                })
                .collect(),
        };
        return print_pretty(&doc, "diff");
    }
    // Every cell as printed, so each column can be as wide as its widest cell (up to 24;
    // a longer value, such as a keep list, runs past its column on its own row).
    let metric_rows: Vec<(String, Vec<String>)> = changed
        .iter()
        .map(|&i| {
            let values = metrics
                .iter()
                .map(|m| report::human(m[i].1, m[i].2))
                .collect();
            (metrics[0][i].0.clone(), values)
        })
        .collect();
    let result_rows: Vec<(String, Vec<String>)> = results
        .iter()
        .map(|(k, v, digits)| {
            let cells = v
                .iter()
                .map(|x| x.map_or("–".to_string(), |x| format!("{x:.digits$}")))
                .collect();
            (k.clone(), cells)
        })
        .collect();
    let rows = settings.iter().chain(&metric_rows).chain(&result_rows);
    let key_width = rows
        .clone()
        .map(|(k, _)| k.len() + 2)
        .max()
        .unwrap_or(0)
        .max(36);
    let widths: Vec<usize> = (0..names.len())
        .map(|c| {
            rows.clone()
                .map(|(_, v)| v[c].chars().count() + 2)
                .max()
                .unwrap_or(0)
                .clamp(12, 24)
        })
        .collect();
    let mut o = String::new();
    for (i, n) in names.iter().enumerate() {
        let _ = writeln!(o, "{}: {n}", column(i));
    }
    let line = |o: &mut String, key: &str, cells: &mut dyn Iterator<Item = String>| {
        let _ = write!(o, "  {key:<key_width$}");
        for (cell, w) in cells.zip(&widths) {
            // At least one space between cells, however long.
            let _ = write!(o, " {cell:>w$}", w = w - 1);
        }
        o.push('\n');
    };
    for (title, rows, none) in [
        ("spec setting", &settings, "the specs set the same values"),
        ("metric", &metric_rows, "no reported metric changes"),
        ("result", &result_rows, ""),
    ] {
        if rows.is_empty() && none.is_empty() {
            continue;
        }
        o.push('\n');
        if rows.is_empty() {
            let _ = writeln!(o, "{none}");
            continue;
        }
        line(&mut o, title, &mut (0..names.len()).map(column));
        for (k, values) in rows {
            line(&mut o, k, &mut values.iter().cloned());
        }
    }
    out(&o);
    Ok(())
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
