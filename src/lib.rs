//! The `kiln` command line: the only part of kiln that touches the file system on a user's
//! behalf. Libraries receive bytes and return values; this crate reads, prints and exits.
//! `src/main.rs` calls [`main`]; the specialized training binaries `kiln build` makes call
//! [`specialized::main`], so they take the same flags and write the same files. This file is
//! the command line (clap), the dispatch to the command bodies in `cmd/`, and the mapping of
//! failures to exit codes.
//!
//! Exit codes: 0 success, 2 invalid spec or usage, 1 any other failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod cmd;
mod engine;
mod fsutil;
pub mod heap;
pub mod nvcc;
mod output;
/// SVG line plots of training curves, written without dependencies.
pub mod plot;
mod spec;
pub mod specialized;

use cmd::{bench, build, emit, exp, hf, logits, plan, rl, sample, sweep, tokenize, train, verify};

/// Every binary linking kiln counts its heap (see [`heap`]); `kiln bench --memory` reads it.
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

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
    /// Override a key of the spec a command reads, as if the file said it: `--set
    /// train.lr=3e-4`, `--set moe.experts=64`, `--set precision.fp8.weight_block=[128,128]`
    /// (a bare word is a string: `--set moe.score=sigmoid`). Repeatable; checked with the
    /// spec's rules. `kiln train` records the resolved spec in the run directory.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", global = true)]
    set: Vec<String>,
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
    /// the rule broken and a suggestion where one exists. For a parallel layout ([parallel],
    /// `--parallel` or `--cluster`) it adds the figures of one device: memory, communication
    /// per step by collective, pipeline bubble and an estimated step time (docs/parallel.md).
    Check {
        /// The spec to check [default: the built-in specs/tiny.toml].
        spec: Option<PathBuf>,
        /// Print the report as JSON (keys documented in docs/spec.md). Errors go to stdout as
        /// JSON too, and rendered to stderr.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        layout: cmd::layout::LayoutArgs,
    },
    /// Train a model on the CPU: lower, differentiate, and run AdamW steps on the spec's
    /// batch and sequence length, with validation loss every `--eval-every` steps.
    ///
    /// Writes `OUT/metrics.jsonl` (one JSON object per step: step, loss, main_loss, lr,
    /// grad_norm, tokens_per_s, and val_loss at evaluation steps) and `OUT/plot.svg` (those
    /// curves, redrawn at every evaluation), and prints a progress line under the same names
    /// and a final summary.
    ///
    /// `scripts/mpirun -n N kiln train SPEC --parallel dp=N` trains data-parallel across N
    /// processes over MPI, with the losses of one process (docs/parallel.md).
    Train(train::Args),
    /// Generate text from a trained run (its spec.toml and checkpoint.safetensors), with the
    /// run's tokenizer.json when it has one (else one token per byte).
    Sample(sample::Args),
    /// Encode text corpora with a Hugging Face tokenizer.json into llm.c token shards for
    /// `kiln train --data 'DIR/*.bin'`.
    ///
    /// Writes DIR/STEM_val_000000.bin (the last --val-fraction of each corpus's tokens) and
    /// DIR/STEM_train_000000.bin… (the rest, at most --shard-tokens a shard), in llm.c's u16
    /// format when the tokenizer's ids fit 16 bits, else its u32 format, and a copy of the
    /// tokenizer, which training carries into the run for `kiln sample`. Encodes in parallel
    /// chunks cut at line starts: the shards are the same on any number of threads, and
    /// (at the default --chunk-bytes and --val-fraction) hold the tokens and the split that
    /// `kiln train --data FILE --tokenizer` trains on. Reports progress
    /// (bytes done, MiB/s) on stderr.
    Tokenize(tokenize::Args),
    /// Fine-tune a pretrained run with GRPO (reinforcement learning with rule-based rewards)
    /// on a built-in rule-checked task (`--task`: arithmetic or brackets), as the spec's
    /// `[rl]` section says.
    ///
    /// Prints a progress line per step (reward mean and std, accuracy, KL, clip fraction,
    /// completion length) and the held-out accuracy before and after; writes
    /// OUT/curves.jsonl (those quantities per step), OUT/plot.svg (them drawn),
    /// OUT/summary.json (`heldout_accuracy_before`, `heldout_accuracy_after`, and with
    /// `--seeds N` each seed's gain with the mean and its standard error) and a run directory
    /// `kiln sample` reads. `--control pretrain` spends the same time on continued
    /// pretraining from the same start and reports its held-out accuracy beside GRPO's.
    Rl(rl::Args),
    /// Import a Hugging Face model: a config.json becomes a spec; a model directory
    /// (config.json and safetensors weights, single-file or sharded) becomes a run directory
    /// that `kiln logits`, `kiln sample`, `kiln train --resume` and `kiln export-hf` accept.
    /// The directory's tokenizer.json, when kiln reads it and its ids fit the model, goes into
    /// the run, where `kiln sample` encodes and decodes with it.
    ///
    /// Families: deepseek_v3, deepseek_v2, llama, gpt2. Unknown config fields, unsupported
    /// features and tensors that do not fit are reported by name. See docs/hf.md.
    ImportHf(hf::ImportArgs),
    /// Export a run directory as a Hugging Face model: config.json and model.safetensors with
    /// HF's tensor names and layouts, loadable by transformers' from_pretrained, and the run's
    /// tokenizer.json when it has one.
    ExportHf(hf::ExportArgs),
    /// Build a training binary specialized to a spec: DIR/<model>-train, with every
    /// dimension a constant and the training step generated by `kiln::model!`.
    ///
    /// The binary takes the flags of `kiln train` and writes the same metrics, checkpoints and
    /// run directories, with the same losses bit for bit. Builds go through cargo with a shared
    /// target directory; an unchanged spec is not rebuilt.
    Build(build::Args),
    /// Print the CPU forward pass's logits for a token sequence as JSON:
    /// `{"logits": [[…vocab floats…], …]}`, one row per token.
    ///
    /// For comparing kiln with other implementations, e.g. Hugging Face transformers on a
    /// model exported with `kiln export-hf`.
    Logits(logits::Args),
    /// Time training steps of a spec and compare the achieved GFLOP/s with a single large
    /// f32 GEMM measured in the same run.
    Bench(bench::Args),
    /// Check a device's run of the spec's CUDA plan: one training step on the device and on
    /// the interpreter, same parameters and batch, every value of every node compared.
    ///
    /// The device's buffers are filled with NaN before the step, so an element no kernel
    /// writes fails. Each value's relative L2 distance must be within the tolerance of the
    /// policy's narrowest format (docs/cuda.md); prints the farthest values and exits 1 if
    /// any is beyond it.
    Verify(verify::Args),
    /// Print what kiln compiles a spec to.
    Emit {
        #[command(subcommand)]
        what: Emit,
    },
    /// Experiments that reproduce published claims: `fp8-accum` (DeepSeek-V3's FP8
    /// accumulation error) and `fp8-vs-bf16` (FP8 against BF16 training of one spec).
    Exp {
        #[command(subcommand)]
        what: exp::Exp,
    },
    /// Compare specs: changed settings, and how parameters, FLOPs, KV cache and memory change
    /// from A to B (`kiln diff A B`), or across any number of variants (`kiln diff A B C …`,
    /// one table with a column per spec).
    Diff {
        /// Two specs (A and B, with the ratio B / A), or more (one table, a column each).
        #[arg(num_args = 2.., required = true, value_name = "SPEC")]
        specs: Vec<PathBuf>,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
        /// `--parallel` applies to both specs; with a layout on either side (or `--cluster`),
        /// the per-device figures are compared too.
        #[command(flatten)]
        layout: cmd::layout::LayoutArgs,
    },
    /// Rank the parallel layouts of a spec that fit a cluster by estimated step time.
    ///
    /// Tries every data, expert and pipeline degree that multiplies to the cluster's GPUs,
    /// both schedules, ZeRO 0 and 1, and power-of-two micro-batches, with the spec's
    /// `parallel.recompute`. Prints the fastest that fit, then why the others were rejected:
    /// the rule a layout breaks, or the memory it needs beyond the GPU's. See
    /// docs/parallel.md.
    Plan(plan::Args),
    /// Compare a spec's variants in one table: `kiln sweep SPEC --set moe.experts=64,128,256`
    /// checks and analyzes the spec with each value (every combination when several keys
    /// have several values) and prints the settings and metrics that differ, as `kiln diff A
    /// B C …` does.
    Sweep(sweep::Args),
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
    /// The CUDA kernels of the spec's training step: prints the translation unit, or with
    /// `--out DIR` writes `DIR/<model>.cu`, the building blocks it includes (`kiln_*.cuh`) and
    /// `DIR/manifest.json` (every kernel with its block size and the nodes that launch it; per
    /// Program node, its launches with grid and arguments and its cuBLASLt GEMMs; the
    /// optimizer's launches; the FP8 copies of GEMM operands, with the node that writes each
    /// and the nodes that read it). `--check` compiles the unit with
    /// nvcc for sm_90a and refuses register spills and unlisted stack frames.
    Cuda {
        /// The spec [default: the built-in specs/tiny.toml].
        spec: Option<PathBuf>,
        /// Write the directory (it must not exist or be empty) instead of printing.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Compile with nvcc (`$KILN_NVCC`, or the one `scripts/cuda-toolchain` installs) and
        /// print each kernel's registers, shared memory, stack and spills.
        #[arg(long)]
        check: bool,
    },
    /// The Hugging Face `config.json` of the spec, as `kiln export-hf` writes it beside the
    /// weights: for building the same model in transformers (deepseek_v3, deepseek_v2, llama
    /// and gpt2 families).
    HfConfig {
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
pub(crate) enum Pass {
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

/// Runs the `kiln` command line with the process's arguments.
pub fn main() -> ExitCode {
    kiln_runtime::memory::keep_freed_memory();
    let cli = Cli::parse();
    spec::set_overrides(cli.set.clone());
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let result = match cli.command {
        Command::Check { spec, json, layout } => cmd::check::run(spec, json, &layout, color),
        Command::Diff {
            specs,
            json,
            layout,
        } => cmd::diff::run(&specs, json, &layout, color),
        Command::Plan(args) => plan::run(&args, color),
        Command::Sweep(args) => sweep::run(&args, color),
        Command::Emit {
            what: Emit::Ir { spec, after },
        } => emit::ir(spec, after, color),
        Command::Emit {
            what: Emit::Rust { spec },
        } => emit::rust(spec, color),
        Command::Emit {
            what: Emit::HfConfig { spec },
        } => emit::hf_config(spec, color),
        Command::Emit {
            what: Emit::Cuda { spec, out, check },
        } => emit::cuda(spec, out, check, color),
        Command::Sample(args) => sample::run(args, color),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Rl(args) => rl::run(args, color),
        Command::Logits(args) => logits::run(args, color),
        Command::Build(args) => build::run(args, color),
        Command::ImportHf(args) => hf::run_import(args),
        Command::ExportHf(args) => hf::run_export(args, color),
        Command::Bench(args) => bench::run(args, color),
        Command::Verify(args) => verify::run(args, color),
        Command::Train(args) => train::run(args, color),
        Command::Exp { what } => exp::run(what, color),
    };
    exit_code(result)
}

/// The exit code of a command's result (printing the error of a failure).
pub(crate) fn exit_code(result: Result<(), Failure>) -> ExitCode {
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
