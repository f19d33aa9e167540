//! `kiln sweep`: a spec's variants over the values of one or more keys, compared in one table;
//! with `--train`, each variant trained too, its final losses in the table and its curves in
//! one plot.

use std::path::{Path, PathBuf};

use super::diff::{column, ResultRow};
use super::layout::{usage, LayoutArgs};
use crate::spec::{apply_sets, check_source, overrides, read_source};
use crate::{fsutil, other, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec to vary [default: the built-in specs/tiny.toml].
    spec: Option<PathBuf>,
    /// Print the table as JSON: `{specs, spec_changes, metric_changes}`, as `kiln diff` does
    /// for three or more specs.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Train every variant too (one `kiln train` each, in turn), then add their final losses
    /// and throughput to the table and draw their curves in OUT/plot.svg. Runs that finished
    /// are kept and one that was interrupted resumes, so running the sweep again continues it.
    #[arg(long)]
    train: bool,
    /// Optimizer steps of each run [default: the spec's train.steps].
    #[arg(long, requires = "train")]
    steps: Option<u64>,
    /// Where the runs go: OUT/A, OUT/B, … (each variant's column letter), with OUT/sweep.json
    /// (what each letter is) and OUT/plot.svg [default: runs/sweep-<model name>].
    #[arg(long, requires = "train")]
    out: Option<PathBuf>,
    /// Further `kiln train` flags for every run, after `--`: `kiln sweep … --train --steps
    /// 200 -- --data shakespeare.txt --eval-every 50`.
    #[arg(last = true, requires = "train", value_name = "TRAIN FLAGS")]
    train_flags: Vec<String>,
}

/// Splits a `--set` value at its top-level commas: `64,128,256` is three values,
/// `[128,128]` and `"a,b"` one each.
fn values(v: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quoted) = (Vec::new(), String::new(), 0i32, false);
    for c in v.chars() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_string()).collect()
}

pub(crate) fn run(args: &Args, color: bool) -> Result<(), Failure> {
    let base = read_source(args.spec.as_ref(), &mut Vec::new(), color)?;
    // `--set key=a,b,c` sweeps the key over its values; a single value is fixed.
    let mut fixed = Vec::new();
    let mut swept: Vec<(String, Vec<String>)> = Vec::new();
    for set in overrides() {
        let Some((key, value)) = set.split_once('=') else {
            return Err(usage(
                &format!("--set `{set}` is not `section.key=value`"),
                "sweep a key with --set moe.experts=64,128,256",
            ));
        };
        let vs = values(value);
        if vs.len() > 1 {
            swept.push((key.trim().to_string(), vs));
        } else {
            fixed.push(set.clone());
        }
    }
    if swept.is_empty() {
        return Err(usage(
            "kiln sweep needs a key with several values",
            "for example: kiln sweep SPEC --set moe.experts=64,128,256",
        ));
    }
    // Every combination of the swept values, the last key varying fastest.
    let mut variants: Vec<Vec<String>> = vec![Vec::new()];
    for (key, vs) in &swept {
        variants = variants
            .into_iter()
            .flat_map(|v| {
                vs.iter().map(move |x| {
                    let mut v = v.clone();
                    v.push(format!("{key}={x}"));
                    v
                })
            })
            .collect();
    }
    let mut names = Vec::new();
    let mut models = Vec::new();
    let mut all_sets = Vec::new();
    let mut failed = false;
    for v in &variants {
        let sets: Vec<String> = fixed.iter().chain(v).cloned().collect();
        let label = v.join(" ");
        let mut src = base.clone();
        apply_sets(&mut src, &sets)?;
        match check_source(&src, &mut Vec::new(), color) {
            Ok(mut m) => {
                args.layout.apply(&mut m)?;
                names.push(label);
                models.push(m);
                all_sets.push(sets);
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        return Err(Failure::Invalid);
    }
    let reports = super::diff::reports(&models, &args.layout)?;
    let (results, trained) = if args.train {
        train_all(args, &names, &all_sets, &models)?
    } else {
        (Vec::new(), Ok(()))
    };
    super::diff::table(&names, &models, &reports, &results, args.json)?;
    trained
}

/// The rows of a run's `metrics.jsonl` (none when it has not started).
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Trains each variant with `kiln train` in OUT/<letter>, in turn, and returns the result rows
/// of the table, and whether every run trained (after the table is printed, a failure ends
/// the command with status 1).
fn train_all(
    args: &Args,
    names: &[String],
    sets: &[Vec<String>],
    models: &[kiln_compiler::model::Model],
) -> Result<(Vec<ResultRow>, Result<(), Failure>), Failure> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("sweep-{}", models[0].name)));
    let spec = args
        .spec
        .as_ref()
        .map_or("(built in)".to_string(), |p| p.display().to_string());
    // What each letter is, so a second sweep into the same directory cannot mix its runs up
    // with another sweep's. (Not the train flags: a run can resume with others, as
    // `kiln train --resume` can.)
    let record = serde_json::json!({
        "spec": spec,
        "steps": args.steps,
        "variants": names.iter().zip(sets).enumerate().map(|(i, (n, s))| serde_json::json!({
            "run": column(i), "variant": n, "set": s,
        })).collect::<Vec<_>>(),
    });
    let record_path = out.join("sweep.json");
    if let Ok(text) = std::fs::read_to_string(&record_path) {
        let old: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if old != record {
            return Err(usage(
                &format!("{} holds another sweep's runs", out.display()),
                "choose another --out, or remove that directory to start over",
            ));
        }
    }
    fsutil::create_dir(&out)?;
    fsutil::write(&record_path, format!("{record:#}\n").as_bytes())?;
    let exe =
        std::env::current_exe().map_err(|e| other(format!("cannot find kiln itself: {e}")))?;
    let mut failed = Vec::new();
    for (i, (name, model)) in names.iter().zip(models).enumerate() {
        let dir = out.join(column(i));
        let steps = args.steps.unwrap_or(model.train.steps);
        let done = metrics(&dir)
            .last()
            .and_then(|r| r["step"].as_u64())
            .is_some_and(|s| s >= steps);
        let of = format!("{} ({}/{}): {name}", column(i), i + 1, names.len());
        if done && dir.join("checkpoint.safetensors").exists() {
            eprintln!("sweep: {of}: trained already, in {}", dir.display());
            continue;
        }
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("train");
        if dir.join("checkpoint.safetensors").exists() {
            eprintln!("sweep: resuming {of}");
            cmd.arg("--resume").arg(&dir);
        } else {
            eprintln!("sweep: training {of}");
            cmd.args(args.spec.iter()).arg("--out").arg(&dir);
            for s in &sets[i] {
                cmd.arg("--set").arg(s);
            }
        }
        if let Some(n) = args.steps {
            cmd.arg("--steps").arg(n.to_string());
        }
        cmd.args(&args.train_flags);
        // The table (or its JSON) is this command's output; a run's summary goes with its
        // progress, to stderr.
        cmd.stdout(std::io::stderr());
        let status = cmd
            .status()
            .map_err(|e| other(format!("cannot start kiln train: {e}")))?;
        if !status.success() {
            eprintln!("sweep: {of}: kiln train failed ({status})");
            failed.push(column(i));
        }
    }
    let runs: Vec<Vec<serde_json::Value>> = (0..names.len())
        .map(|i| metrics(&out.join(column(i))))
        .collect();
    // A row's last value of `key`: the final loss, or the last evaluation's.
    let last = |key: &str| -> Vec<Option<f64>> {
        runs.iter()
            .map(|rows| rows.iter().rev().find_map(|r| r[key].as_f64()))
            .collect()
    };
    let mut results: Vec<ResultRow> = Vec::new();
    let steps: Vec<Option<f64>> = runs
        .iter()
        .map(|rows| rows.last().and_then(|r| r["step"].as_f64()))
        .collect();
    results.push(("steps trained".to_string(), steps, 0));
    for (label, key, digits) in [
        ("final loss", "loss", 4),
        ("final main_loss", "main_loss", 4),
        ("final mtp_loss", "mtp_loss", 4),
        ("final val_loss", "val_loss", 4),
        ("tokens_per_s", "tokens_per_s", 0),
    ] {
        let values = last(key);
        if values.iter().any(Option::is_some) {
            results.push((label.to_string(), values, digits));
        }
    }
    plot(&out, names, &runs)?;
    eprintln!(
        "sweep: {} runs in {} (sweep.json, plot.svg)",
        names.len(),
        out.display()
    );
    let trained = if failed.is_empty() {
        Ok(())
    } else {
        Err(other(format!(
            "training failed for {}; see their runs in {}",
            failed.join(", "),
            out.display()
        )))
    };
    Ok((results, trained))
}

/// OUT/plot.svg: every run's main loss, then its validation loss, against the step.
fn plot(out: &Path, names: &[String], runs: &[Vec<serde_json::Value>]) -> Result<(), Failure> {
    use crate::plot::{stack, Plot, Series};
    let curves = |key: &str, dashed: bool| -> Vec<Series> {
        names
            .iter()
            .zip(runs)
            .enumerate()
            .map(|(i, (name, rows))| Series {
                name: format!("{}: {name}", column(i)),
                points: rows
                    .iter()
                    .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
                    .collect(),
                dashed,
            })
            .collect()
    };
    let panel = |title: &str, series| Plot {
        title: title.to_string(),
        x_label: "step".into(),
        y_label: "cross-entropy (nats)".into(),
        series,
    };
    let svg = stack(&[
        panel("main loss", curves("main_loss", false)),
        panel("validation loss (main)", curves("val_loss", true)),
    ]);
    fsutil::write_atomic(&out.join("plot.svg"), svg.as_bytes())
        .map_err(|e| other(format!("cannot write the plot: {e}")))
}

#[cfg(test)]
mod tests {
    use super::values;

    #[test]
    fn values_split_at_top_level_commas_only() {
        assert_eq!(values("64,128,256"), ["64", "128", "256"]);
        assert_eq!(values("[128,128],[128,64]"), ["[128,128]", "[128,64]"]);
        assert_eq!(values("\"a,b\""), ["\"a,b\""]);
        assert_eq!(values("3e-4"), ["3e-4"]);
    }
}
