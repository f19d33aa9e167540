//! `kiln plan`: the parallel layouts of a spec that fit a cluster, fastest first, and why
//! the others do not.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use kiln_compiler::parallel::{plan, Plan, Rejection, Tried};
use kiln_compiler::report::{bytes_h, group, seconds_h};

use super::layout::resolve;
use crate::output::{out, print_pretty};
use crate::spec::{load, print_errors_json};
use crate::Failure;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec to plan for [default: the built-in specs/tiny.toml].
    spec: Option<PathBuf>,
    /// The cluster: a preset with its GPU count (`h800x2048`; presets h800, h100, h200) or a
    /// TOML file with a [cluster] table (docs/parallel.md). Every layout uses all its GPUs.
    #[arg(long, value_name = "PRESETxGPUS|FILE")]
    cluster: String,
    /// How many fitting layouts, and how many near misses, to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// List every rejected layout with its reason.
    #[arg(long)]
    all: bool,
    /// Print the whole plan as JSON: `fits` (per-device reports, fastest first) and
    /// `rejected` (each layout with its reason).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args, color: bool) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let loaded = load(args.spec.as_ref(), &mut errors, color);
    print_errors_json(args.json, errors);
    let (_, model) = loaded?;
    let cluster = resolve(&args.cluster, 8)?;
    let p = plan(&model, &cluster);
    if args.json {
        return print_pretty(&p, "plan");
    }
    let recompute = model.parallel.recompute.names();
    out(&render(&model.name, &p, &recompute, args.top, args.all));
    Ok(())
}

fn describe(t: &Tried) -> String {
    format!(
        "dp {} · ep {} · pp {}, {}, ZeRO-{}, micro-batch {}",
        t.dp,
        t.ep,
        t.pp,
        t.schedule.name(),
        t.zero,
        t.micro_batch
    )
}

fn render(name: &str, p: &Plan, recompute: &[&str], top: usize, all: bool) -> String {
    let c = &p.cluster;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{name} on {} × {} ({} per node, {} each), recompute {}",
        c.name,
        group(c.gpus as u128),
        c.gpus_per_node,
        bytes_h(c.memory_bytes()),
        if recompute.is_empty() {
            "nothing".to_string()
        } else {
            recompute.join(" and ")
        }
    );
    let memory: Vec<&(Tried, Rejection)> = p
        .rejected
        .iter()
        .filter(|(_, r)| matches!(r, Rejection::Memory { .. }))
        .collect();
    let rules = p.rejected.len() - memory.len();
    let _ = writeln!(
        o,
        "tried {} layouts of {} GPUs: {} fit, {} need more memory, {} break a layout rule",
        group(p.tried as u128),
        group(c.gpus as u128),
        group(p.fits.len() as u128),
        group(memory.len() as u128),
        group(rules as u128)
    );
    if p.fits.is_empty() {
        let _ = writeln!(o, "\nno layout fits");
    } else {
        let _ = writeln!(
            o,
            "\nfastest that fit (step estimated at peak rates; docs/parallel.md)"
        );
        let _ = writeln!(
            o,
            "  {:>3} {:>5} {:>5} {:>4}  {:<9} {:>4} {:>12}  {:>11} {:>9} {:>6}",
            "#", "dp", "ep", "pp", "schedule", "ZeRO", "micro-batch", "memory", "step", "MFU"
        );
        for (i, d) in p.fits.iter().take(top).enumerate() {
            let l = &d.layout;
            let _ = writeln!(
                o,
                "  {:>3} {:>5} {:>5} {:>4}  {:<9} {:>4} {:>12}  {:>11} {:>9} {:>5.1}%",
                i + 1,
                l.dp,
                l.ep,
                l.pp,
                l.schedule.name(),
                l.zero,
                format!("{} × {}", l.micro_batch, l.micro_batches),
                bytes_h(d.memory.total_bytes),
                seconds_h(d.time.step_s),
                d.time.mfu * 100.0
            );
        }
    }
    let mut near: Vec<&(Tried, Rejection)> = memory.clone();
    let over = |r: &Rejection| match r {
        Rejection::Memory {
            needed_bytes,
            capacity_bytes,
        } => needed_bytes - capacity_bytes,
        Rejection::Rule { .. } => 0,
    };
    near.sort_by_key(|(_, r)| over(r));
    if !near.is_empty() {
        let shown = if all { near.len() } else { top.min(near.len()) };
        let _ = writeln!(
            o,
            "\nnearest that do not fit ({shown} of {}; memory of the fullest device)",
            near.len()
        );
        for (t, r) in near.iter().take(shown) {
            if let Rejection::Memory {
                needed_bytes,
                capacity_bytes,
            } = r
            {
                let _ = writeln!(
                    o,
                    "  {}: needs {} of {}, {} over",
                    describe(t),
                    bytes_h(*needed_bytes),
                    bytes_h(*capacity_bytes),
                    bytes_h(needed_bytes - capacity_bytes)
                );
            }
        }
    }
    let mut by_rule: BTreeMap<&str, Vec<(&Tried, &str)>> = BTreeMap::new();
    for (t, r) in &p.rejected {
        if let Rejection::Rule { key, message } = r {
            by_rule.entry(key).or_default().push((t, message));
        }
    }
    if !by_rule.is_empty() {
        let _ = writeln!(o, "\nlayout rules broken (by the [parallel] key at fault)");
        for (key, v) in &by_rule {
            let _ = writeln!(o, "  {key}: {} layouts", group(v.len() as u128));
            let shown = if all { v.len() } else { 1 };
            for (t, message) in v.iter().take(shown) {
                let _ = writeln!(o, "    {}: {message}", describe(t));
            }
        }
    }
    o
}
