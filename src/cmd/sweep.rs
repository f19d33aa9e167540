//! `kiln sweep`: a spec's variants over the values of one or more keys, compared in one table.

use std::path::PathBuf;

use super::layout::{usage, LayoutArgs};
use crate::spec::{apply_sets, check_source, overrides, read_source};
use crate::Failure;

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
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        return Err(Failure::Invalid);
    }
    let reports = super::diff::reports(&models, &args.layout)?;
    super::diff::table(&names, &models, &reports, args.json)
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
