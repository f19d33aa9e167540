//! `--parallel` and `--cluster`, shared by `kiln check`, `kiln diff` and `kiln plan`: a
//! layout override checked against the model, and a cluster from a preset or a file.

use std::path::Path;

use kiln_compiler::model::Model;
use kiln_compiler::parallel::Cluster;

use crate::Failure;

#[derive(clap::Args, Clone, Default)]
pub(crate) struct LayoutArgs {
    /// Override the spec's [parallel] layout: comma-separated `key=value` pairs, as in
    /// `dp=2,ep=64,pp=16,schedule=dualpipe,zero=1,micro_batch=1,recompute=norm+attn_up`.
    /// Checked against the model like the spec's own section.
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub parallel: Option<String>,
    /// The cluster for the per-device report: a preset (h800, h100, h200) with an optional
    /// GPU count (`h800x2048`; default: as many GPUs as the layout uses), or a TOML file with
    /// a [cluster] table (docs/parallel.md). Implies the per-device report.
    #[arg(long, value_name = "PRESET[xGPUS]|FILE")]
    pub cluster: Option<String>,
}

/// Prints a usage error and returns the failure that exits 2.
pub(crate) fn usage(message: &str, help: &str) -> Failure {
    eprintln!("error: {message}");
    if !help.is_empty() {
        eprintln!("  help: {help}");
    }
    Failure::Invalid
}

impl LayoutArgs {
    /// Applies `--parallel` to `model`, checked with the spec's rules.
    pub(crate) fn apply(&self, model: &mut Model) -> Result<(), Failure> {
        match &self.parallel {
            Some(text) => apply_parallel(model, text),
            None => Ok(()),
        }
    }

    /// The cluster of the per-device report: `--cluster`, or the h800 preset when the layout
    /// is not one device (or `always`). `None` when no per-device report is wanted.
    pub(crate) fn cluster(&self, model: &Model, always: bool) -> Result<Option<Cluster>, Failure> {
        let world = model.parallel.world();
        let c = match &self.cluster {
            None if !always && model.parallel.is_single() => return Ok(None),
            None => Cluster::preset("h800", world)
                .expect("a preset")
                .map_err(|e| usage(&e, ""))?,
            Some(text) => resolve(text, world)?,
        };
        if c.gpus < world {
            return Err(usage(
                &format!(
                    "the layout needs {world} GPUs (dp · ep · pp) but cluster `{}` has {}",
                    c.name, c.gpus
                ),
                "give a larger cluster, as in `--cluster h800x2048`, or shrink the layout",
            ));
        }
        Ok(Some(c))
    }
}

/// Applies a `--parallel key=value,…` text to `model`'s layout, checked with the spec's rules.
pub(crate) fn apply_parallel(model: &mut Model, text: &str) -> Result<(), Failure> {
    let mut p = model.parallel;
    for pair in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(usage(
                &format!("--parallel: `{pair}` is not `key=value`"),
                "write pairs like `dp=2,ep=2`",
            ));
        };
        p.set(k.trim(), v.trim())
            .map_err(|e| usage(&format!("--parallel: {e}"), ""))?;
    }
    let experts = model.moe.as_ref().map(|m| m.experts);
    let mla = matches!(
        model.attention.kind,
        kiln_compiler::model::AttentionKind::Latent(_)
    );
    let problems = p.problems(
        model.train.batch,
        model.layers.len() as u64,
        Some(experts),
        Some(mla),
    );
    if let Some(first) = problems.first() {
        for extra in &problems[1..] {
            eprintln!(
                "error: --parallel: {}\n  help: {}",
                extra.message, extra.help
            );
        }
        return Err(usage(
            &format!("--parallel: {}", first.message),
            &first.help,
        ));
    }
    model.parallel = p;
    Ok(())
}

/// A preset (`h800x2048`) or a cluster file.
pub(crate) fn resolve(text: &str, default_gpus: u64) -> Result<Cluster, Failure> {
    if let Some(preset) = Cluster::preset(text, default_gpus) {
        return preset.map_err(|e| usage(&format!("--cluster {e}"), ""));
    }
    let path = Path::new(text);
    if !path.exists() {
        return Err(usage(
            &format!("--cluster `{text}` is neither a preset nor a file"),
            &format!(
                "presets: {} (add `xN` for N GPUs, as in h800x2048); or a TOML file with a [cluster] table (docs/parallel.md)",
                Cluster::preset_names().join(", ")
            ),
        ));
    }
    let bytes = std::fs::read_to_string(path)
        .map_err(|e| Failure::Other(format!("cannot read {text}: {e}")))?;
    Cluster::from_toml(&bytes).map_err(|e| usage(&format!("{text}: {e}"), ""))
}
