//! The `kiln` command line: the only part of kiln that touches the file system on a user's
//! behalf. Libraries receive bytes and return values; this file reads, prints and exits.
//!
//! Exit codes: 0 success, 2 invalid spec or usage, 1 any other failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kiln_compiler::analyze::{analyze, Report};
use kiln_compiler::check::check;
use kiln_compiler::diag::{self, Diagnostic};
use kiln_compiler::model::Model;
use kiln_compiler::program;
use kiln_compiler::report;

mod bench;
mod hf;
mod logits;
mod sample;
mod train;

/// The default spec, compiled in so `kiln check` works anywhere.
const TINY: &str = include_str!("../specs/tiny.toml");
const TINY_NAME: &str = "specs/tiny.toml (built in)";

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A model-config compiler for DeepSeek-style language models",
    long_about = "kiln checks a model spec (TOML) with precise diagnostics and reports what the \
                  model costs: parameters, FLOPs, KV cache and training memory.\n\n\
                  Spec reference: docs/spec.md. Exit codes: 0 ok, 2 invalid spec or usage, \
                  1 any other failure."
)]
struct Cli {
    /// When to color diagnostics.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec and report its parameters, FLOPs, KV cache and training memory.
    ///
    /// Every error in the file is reported at once, each with file:line:col, the source line,
    /// the rule broken and a suggestion where one exists.
    Check {
        /// The spec to check [default: the built-in specs/tiny.toml].
        spec: Option<PathBuf>,
        /// Print the report as JSON (keys documented in docs/spec.md). Errors go to stdout as
        /// JSON too, and rendered to stderr.
        #[arg(long)]
        json: bool,
    },
    /// Train a model on the CPU: lower, differentiate, and run AdamW steps on the spec's
    /// batch and sequence length, with validation loss every `--eval-every` steps.
    ///
    /// Writes `OUT/metrics.jsonl` (one JSON object per step: step, loss, lr, tokens_per_s, and
    /// val_loss at evaluation steps) and prints a progress line and a final summary.
    Train(train::Args),
    /// Generate text from a trained run (its spec.toml and checkpoint.safetensors).
    Sample(sample::Args),
    /// Import a Hugging Face model: a config.json becomes a spec; a model directory
    /// (config.json and safetensors weights, single-file or sharded) becomes a run directory
    /// that `kiln logits`, `kiln sample`, `kiln train --resume` and `kiln export-hf` accept.
    ///
    /// Families: deepseek_v3, deepseek_v2, llama, gpt2. Unknown config fields, unsupported
    /// features and tensors that do not fit are reported by name. See docs/hf.md.
    ImportHf(hf::ImportArgs),
    /// Export a run directory as a Hugging Face model: config.json and model.safetensors with
    /// HF's tensor names and layouts, loadable by transformers' from_pretrained.
    ExportHf(hf::ExportArgs),
    /// Print the CPU forward pass's logits for a token sequence as JSON:
    /// `{"logits": [[…vocab floats…], …]}`, one row per token.
    ///
    /// For comparing kiln with other implementations, e.g. Hugging Face transformers on a
    /// model exported with `kiln export-hf`.
    Logits(logits::Args),
    /// Time training steps of a spec and compare the achieved GFLOP/s with a single large
    /// f32 GEMM measured in the same run.
    Bench(bench::Args),
    /// Print what kiln compiles a spec to.
    Emit {
        #[command(subcommand)]
        what: Emit,
    },
    /// Compare two specs: changed settings, and how parameters, FLOPs, KV cache and memory
    /// change from A to B.
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Emit {
    /// The specialized Rust module `kiln::model!` expands the spec to: dimensions as
    /// constants, parameter names and shapes, and the training step as straight-line code
    /// calling kiln-runtime's kernels with constant shapes (formatted with prettyplease).
    Rust {
        /// The spec [default: the built-in specs/tiny.toml].
        spec: Option<PathBuf>,
    },
    /// The forward graph IR at the spec's batch size and sequence length: parameters, inputs,
    /// one line per op (result types, operands, resolved format, op path), named outputs.
    Ir {
        /// The spec [default: the built-in specs/tiny.toml].
        spec: Option<PathBuf>,
        /// The pass whose output to print: `lower` (the forward graph), `autodiff` (forward
        /// and backward, with one `grad.<param>` output per trainable parameter), `fuse`
        /// (elementwise chains, residual adds with norms and bias with activation fused into
        /// single nodes) or `plan` (the fused graph and its memory plan).
        #[arg(long, value_enum, default_value_t = Pass::Lower)]
        after: Pass,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pass {
    Lower,
    Autodiff,
    Fuse,
    /// The fused forward and backward graph, then its memory plan: every intermediate's
    /// arena offset and lifetime, and the planned peak beside the analyzer's estimate.
    Plan,
}

/// Why a command failed, mapped to the exit code.
pub(crate) enum Failure {
    /// The spec is invalid (diagnostics already printed): exit 2.
    Invalid,
    /// Anything else: exit 1.
    Other(String),
}

fn main() -> ExitCode {
    kiln_runtime::memory::keep_freed_memory();
    let cli = Cli::parse();
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let result = match cli.command {
        Command::Check { spec, json } => cmd_check(spec, json, color),
        Command::Diff { a, b, json } => cmd_diff(&a, &b, json, color),
        Command::Emit {
            what: Emit::Ir { spec, after },
        } => cmd_emit_ir(spec, after, color),
        Command::Emit {
            what: Emit::Rust { spec },
        } => cmd_emit_rust(spec, color),
        Command::Sample(args) => sample::run(args, color),
        Command::Logits(args) => logits::run(args, color),
        Command::ImportHf(args) => hf::run_import(args),
        Command::ExportHf(args) => hf::run_export(args, color),
        Command::Bench(args) => bench::run(args, color),
        Command::Train(args) => train::run(args, color),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid) => ExitCode::from(2),
        Err(Failure::Other(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

/// A failure other than an invalid spec (exit code 1).
pub(crate) fn other(msg: impl Into<String>) -> Failure {
    Failure::Other(msg.into())
}

/// Writes to stdout. A closed pipe (`kiln check … | head`) ends the process quietly instead of
/// panicking as `print!` would.
pub(crate) fn out(s: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// A spec's display name and bytes.
pub(crate) fn read_spec(path: Option<&PathBuf>) -> Result<(String, Vec<u8>), Failure> {
    match path {
        None => Ok((TINY_NAME.to_string(), TINY.as_bytes().to_vec())),
        Some(p) => std::fs::read(p)
            .map(|b| (p.display().to_string(), b))
            .map_err(|e| Failure::Other(format!("cannot read {}: {e}", p.display()))),
    }
}

/// The JSON form of diagnostics, one object per error.
fn errors_json(file: &str, text: &str, diags: &[Diagnostic]) -> Vec<serde_json::Value> {
    diags
        .iter()
        .map(|d| {
            let (line, col) = d.line_col(text);
            serde_json::json!({
                "rule": d.rule.name(),
                "message": d.message,
                "file": file,
                "line": line,
                "col": col,
                "span": [d.span.start, d.span.end],
                "label": d.label,
                "help": d.help,
            })
        })
        .collect()
}

/// Checks one spec. On failure, renders its diagnostics to stderr and appends their JSON form
/// to `json_errors`.
pub(crate) fn load(
    path: Option<&PathBuf>,
    json_errors: &mut Vec<serde_json::Value>,
    color: bool,
) -> Result<(String, Model), Failure> {
    let (name, bytes) = read_spec(path)?;
    check(&bytes).map(|m| (name.clone(), m)).map_err(|diags| {
        let text = String::from_utf8_lossy(&bytes);
        eprint!("{}", diag::render(&name, &text, &diags, color));
        json_errors.extend(errors_json(&name, &text, &diags));
        Failure::Invalid
    })
}

/// With `--json`, an invalid spec's errors go to stdout as `{"errors": [...]}`.
fn print_errors_json(json: bool, errors: Vec<serde_json::Value>) {
    if json && !errors.is_empty() {
        out(&format!("{:#}\n", serde_json::json!({ "errors": errors })));
    }
}

fn cmd_check(spec: Option<PathBuf>, json: bool, color: bool) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let loaded = load(spec.as_ref(), &mut errors, color);
    print_errors_json(json, errors);
    let (_, model) = loaded?;
    let r = analyze(&model);
    if json {
        print_json(&r)?;
    } else {
        out(&report::render(&r));
    }
    Ok(())
}

fn cmd_emit_ir(spec: Option<PathBuf>, after: Pass, color: bool) -> Result<(), Failure> {
    let (_, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let pass = match after {
        Pass::Lower => program::Pass::Lower,
        Pass::Autodiff => program::Pass::Autodiff,
        Pass::Fuse | Pass::Plan => program::Pass::Fuse,
    };
    let graph = program::graph_after(&model, pass).map_err(|e| Failure::Other(e.to_string()))?;
    out(&graph.to_string());
    if after == Pass::Plan {
        let program = program::Program::new(graph).map_err(|e| Failure::Other(e.to_string()))?;
        let plan = program.plan();
        let mut text = String::from("plan\n");
        for (v, off) in plan.offsets.iter().enumerate() {
            if let (Some(off), Some((first, last))) = (off, plan.lifetimes[v]) {
                text.push_str(&format!(
                    "  %{v}: {} bytes at {off}, nodes {first}..={last}\n",
                    plan.sizes[v]
                ));
            }
        }
        let report = kiln_compiler::analyze::analyze(&model);
        text.push_str(&format!(
            "planned peak of intermediates: {} ({} bytes; {} without reuse)\n\
             analyzer's activation estimate: {} ({} bytes; stored formats, saved tensors only)\n",
            report::bytes_h(u128::from(plan.peak_bytes)),
            plan.peak_bytes,
            report::bytes_h(u128::from(plan.total_bytes)),
            report::bytes_h(report.memory.activations_bytes),
            report.memory.activations_bytes
        ));
        out(&text);
    }
    Ok(())
}

fn cmd_emit_rust(spec: Option<PathBuf>, color: bool) -> Result<(), Failure> {
    let (_, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let compiled = program::compile(&model).map_err(|e| Failure::Other(e.to_string()))?;
    let text =
        kiln_compiler::emit_rust::emit_text(&model, &compiled.train).map_err(Failure::Other)?;
    out(&text);
    Ok(())
}

fn print_json(r: &Report) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(r)
        .map_err(|e| Failure::Other(format!("cannot encode the report: {e}")))?;
    out(&format!("{s}\n"));
    Ok(())
}

fn cmd_diff(a: &PathBuf, b: &PathBuf, json: bool, color: bool) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let ma = load(Some(a), &mut errors, color);
    let mb = load(Some(b), &mut errors, color);
    print_errors_json(json, errors);
    let ((na, ma), (nb, mb)) = (ma?, mb?);
    let (ra, rb) = (analyze(&ma), analyze(&mb));
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
        let s = serde_json::to_string_pretty(&doc)
            .map_err(|e| Failure::Other(format!("cannot encode the diff: {e}")))?;
        out(&format!("{s}\n"));
    } else {
        out(&report::render_diff(&na, &nb, &spec_changes, &changes));
    }
    Ok(())
}
