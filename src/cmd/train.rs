//! `kiln train`: the CLI side of training — reading the spec and data, compiling the model
//! (lower, differentiate, fuse), driving the runtime's trainer, and reporting progress and metrics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_compiler::program::compile;
use kiln_runtime::checkpoint;
use kiln_runtime::data::{self, Batcher, TOKENIZER_FILE};
use kiln_runtime::device::DeviceKind;
use kiln_runtime::mpi::Mpi;
use kiln_runtime::train::{eval_loss, init_params, Collectives, StepStats, TrainConfig, Trainer};
use serde_json::value::RawValue;

use crate::engine::{self, Specialized, TokenizerFile};
use crate::fsutil;
use crate::output::{self, number, out};
use crate::spec::load_text;
use crate::{other, Failure};

/// The command's arguments (see `kiln train --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec [default: the built-in specs/tiny.toml].
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The flags of a training run, shared by `kiln train` and the binaries `kiln build` makes.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Training data: "builtin", a text file (byte-level, or encoded by --tokenizer) or
    /// llm.c shards ("dir/*.bin", as `kiln tokenize` writes them) [default: the spec's
    /// train.data].
    #[arg(long)]
    pub data: Option<String>,
    /// A Hugging Face tokenizer.json that encodes a text --data file (instead of one token
    /// per byte; no special tokens are added). Its vocabulary with added tokens must fit
    /// model.vocab (`--set model.vocab=N`). The run directory keeps a copy, which `kiln
    /// sample`, `kiln export-hf` and `--resume` use without being told. Not for shards, which
    /// hold tokens already: `kiln tokenize` writes them with the tokenizer beside them, and
    /// training on them copies it into the run.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Optimizer steps [default: the spec's train.steps].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Run directory for metrics, checkpoints and a copy of the spec
    /// [default: runs/<model name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint, bit-identically (the spec
    /// defaults to the run's copy).
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Seed for initialization and batching [default: the spec's train.seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop (with a checkpoint) after this many steps in this session, keeping the
    /// schedule of `--steps`; `--resume` continues from there.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Evaluate the validation loss every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Write a checkpoint (and redraw plot.svg) every N steps, and at the end
    /// [default: --eval-every].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Print a progress line every N steps when stderr is not a terminal (a terminal's line
    /// updates every step) [default: --eval-every].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Emulate the spec's `[precision]` policy exactly instead of training in f32: every
    /// linear and expert GEMM rounds its operands to its format (bf16/fp16 to nearest even;
    /// e4m3/e5m2 block-scaled as `[precision.fp8]` says, with the tensor core's limited
    /// accumulation and promotion), activations kept for the backward pass are stored in
    /// the compute format (FP8 tiles where only FP8 GEMMs read them again), and AdamW stores
    /// its moments in `precision.moments`. Slower; other ops compute in f32. See
    /// docs/fp8.md.
    #[arg(long)]
    pub emulate_precision: bool,
    /// Where the training steps run: `cpu` (the interpreter), `cuda-emulated` (the
    /// generated CUDA kernels built for the host and GEMMs on the CPU, as a GPU would run
    /// them: slow, for checking the plan) or `cuda` (a GPU). The optimizer, validation and
    /// checkpoints run on the host, so a run moves between devices with `--resume`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// The layout, as `kiln check --parallel` takes it: `dp=N` trains data-parallel over N
    /// processes, which `scripts/mpirun -n N kiln train … --parallel dp=N` starts (MPI);
    /// `ep=M` shards the routed experts over M of them (on the CPU), so
    /// `scripts/mpirun -n 4 kiln train … --parallel dp=2,ep=2` runs four. `zero=1`,
    /// `micro_batch` and `grad_accum` apply too. Overrides the spec's [parallel].
    #[arg(long, value_name = "dp=N,ep=M")]
    pub parallel: Option<String>,
    /// In a run over MPI: end the job when one collective waits longer than this for the
    /// other ranks (a rank that hung, or died without the launcher noticing), with a message
    /// naming the collective. Seconds.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub collective_timeout: u64,
    /// The share of the data held out for validation (its last tokens, or the `val` shards).
    #[arg(long, default_value_t = engine::VAL_FRACTION)]
    pub val_fraction: f64,
}

/// The tokenizer of a run, and whether it encodes the data (a text file) or only travels
/// with the run (the run's own copy on resume, or the one `kiln tokenize` left beside the
/// shards).
struct RunTokenizer {
    file: TokenizerFile,
    encodes: bool,
}

/// The run's tokenizer: `--tokenizer` (for a text file only, and on resume only the run's
/// own), else the resumed run's copy, else the `tokenizer.json` beside the shards.
fn run_tokenizer(
    source: &data::Source,
    given: Option<&Path>,
    resume: Option<&Path>,
) -> Result<Option<RunTokenizer>, Failure> {
    let kept = match resume {
        Some(dir) => TokenizerFile::in_dir(dir)?,
        None => None,
    };
    let is_text = matches!(source, data::Source::Text(_));
    if let Some(path) = given {
        if !is_text {
            let help = match source {
                data::Source::Builtin { .. } => {
                    "the built-in corpus is byte-level; give the text to encode with --data FILE"
                }
                _ => {
                    "shards hold token ids already: drop --tokenizer (`kiln tokenize` leaves \
                     its tokenizer beside the shards, and training copies it into the run)"
                }
            };
            return Err(super::layout::usage(
                &format!("--tokenizer encodes a text file, but the data is {source}"),
                help,
            ));
        }
        let file = TokenizerFile::read(path)?;
        if kept.as_ref().is_some_and(|k| k.bytes != file.bytes) {
            return Err(super::layout::usage(
                &format!(
                    "the run was trained with its own {TOKENIZER_FILE}, which differs from {}",
                    path.display()
                ),
                "resume without --tokenizer: the run's copy encodes the data",
            ));
        }
        return Ok(Some(RunTokenizer {
            file,
            encodes: true,
        }));
    }
    if let Some(file) = kept {
        return Ok(Some(RunTokenizer {
            file,
            encodes: is_text,
        }));
    }
    let data::Source::Shards(paths) = source else {
        return Ok(None);
    };
    let mut dirs = paths.iter().map(|p| p.parent().unwrap_or(Path::new("")));
    let first = dirs.next().unwrap_or(Path::new(""));
    if dirs.any(|d| d != first) {
        return Ok(None);
    }
    let dir = if first.as_os_str().is_empty() {
        Path::new(".")
    } else {
        first
    };
    Ok(TokenizerFile::in_dir(dir)?.map(|file| RunTokenizer {
        file,
        encodes: false,
    }))
}

/// Keeps the run's tokenizer in its directory (so later commands find it), or removes a
/// stale copy that an earlier run in the same directory left, so that a byte-level run is
/// never decoded with another run's tokenizer.
fn record_tokenizer(dir: &Path, tokenizer: Option<&RunTokenizer>) -> Result<(), Failure> {
    let path = dir.join(TOKENIZER_FILE);
    match tokenizer {
        Some(t) => {
            if std::fs::read(&path).ok().as_deref() != Some(t.file.bytes.as_slice()) {
                fsutil::write_atomic(&path, &t.file.bytes)
                    .map_err(|e| other(format!("cannot write {}: {e}", path.display())))?;
            }
            Ok(())
        }
        None if path.exists() => std::fs::remove_file(&path).map_err(|e| {
            other(format!(
                "cannot remove the stale {} (this run has no tokenizer): {e}",
                path.display()
            ))
        }),
        None => Ok(()),
    }
}

/// Consecutive non-finite steps `train.skip_nonfinite` tolerates before giving up.
const MAX_SKIPPED: u32 = 100;

/// The checkpoint file of a run directory.
fn checkpoint_path(dir: &std::path::Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    run_with(args.spec, args.run, color, None)
}

/// Trains the spec at `spec` with the interpreter, or a specialized binary's own spec with its
/// generated step (`built`).
pub(crate) fn run_with(
    spec: Option<PathBuf>,
    args: RunArgs,
    color: bool,
    built: Option<&Specialized>,
) -> Result<(), Failure> {
    // Data parallelism across processes: a launcher (scripts/mpirun) started this one.
    if !Mpi::launched() {
        return train(spec, args, color, built, None);
    }
    let mpi = Mpi::init().map_err(|e| other(e.to_string()))?;
    if mpi.size() > 1 {
        mpi.set_timeout(std::time::Duration::from_secs(
            args.collective_timeout.max(1),
        ));
    }
    let result = train(spec, args, color, built, Some(&mpi));
    match &result {
        // A failure on one rank ends the job on every rank: none may wait for it in a
        // collective.
        Err(Failure::Other(text)) if mpi.size() > 1 => mpi.abort(text, 1),
        // Success, or an invalid spec or command line, which every rank finds alike.
        _ => mpi.finish(),
    }
    result
}

fn train(
    spec: Option<PathBuf>,
    args: RunArgs,
    color: bool,
    built: Option<&Specialized>,
    mpi: Option<&Mpi>,
) -> Result<(), Failure> {
    // On resume, the spec defaults to the copy the run saved.
    let spec_path = match (&spec, &args.resume) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(dir)) => Some(dir.join("spec.toml")),
        (None, None) => None,
    };
    let (spec_name, spec_bytes, mut model) = match built {
        // A specialized binary trains its own spec; resuming checks the run's hash below.
        Some(b) => {
            let bytes = b.spec.as_bytes().to_vec();
            let model = kiln_compiler::check::check(&bytes).map_err(|_| {
                other("the built-in spec does not check; rebuild with `kiln build`")
            })?;
            ("built-in spec".to_string(), bytes, model)
        }
        None => load_text(spec_path.as_ref(), &mut Vec::new(), color)?,
    };
    if let Some(text) = &args.parallel {
        super::layout::apply_parallel(&mut model, text)?;
    }
    let ranks = mpi.map_or(1, Mpi::size) as u64;
    let rank = mpi.map_or(0, Mpi::rank);
    let lead = rank == 0;
    let layout = model.parallel;
    if layout.pp > 1 {
        return Err(super::layout::usage(
            &format!(
                "kiln train runs data- and expert-parallel layouts across processes; pipeline \
                 parallelism is not built yet (pp {})",
                layout.pp
            ),
            "train with --parallel dp=N,ep=M; `kiln check` and `kiln plan` report any layout (docs/parallel.md)",
        ));
    }
    if layout.ep > 1 && (args.device != DeviceKind::Cpu || built.is_some()) {
        return Err(super::layout::usage(
            &format!(
                "expert parallelism (ep {}) runs on the interpreter; {} cannot shard the experts",
                layout.ep,
                if built.is_some() {
                    "a specialized binary's generated step".to_string()
                } else {
                    format!("--device {}", args.device)
                }
            ),
            "train with --device cpu and the kiln binary, or with --parallel dp=N alone",
        ));
    }
    if layout.world() != ranks {
        let shape = if layout.ep > 1 {
            format!("dp {} × ep {}", layout.dp, layout.ep)
        } else {
            format!("dp {}", layout.dp)
        };
        let message = if ranks == 1 {
            format!(
                "this layout trains on {} processes ({shape})",
                layout.world()
            )
        } else {
            match layout.ep {
                1 => format!(
                    "{ranks} processes were started, but the layout has dp = {}",
                    layout.dp
                ),
                _ => format!(
                    "{ranks} processes were started, but the layout ({shape}) needs {}",
                    layout.world()
                ),
            }
        };
        let flags = if layout.ep > 1 {
            format!("dp={},ep={}", layout.dp, layout.ep)
        } else {
            format!("dp={}", layout.dp.max(ranks))
        };
        let n = if layout.ep > 1 {
            layout.world()
        } else {
            layout.dp.max(ranks)
        };
        let help = format!(
            "start one process per rank: scripts/mpirun -n {n} kiln train … --parallel {flags}"
        );
        return Err(super::layout::usage(&message, &help));
    }
    // Gradient accumulation: the step's graph takes one micro-batch of a rank's rows.
    let micro = layout.micro_batch(model.train.batch) as usize;
    let accumulate = layout.micro_batches(model.train.batch) as usize;
    // Ranks on GPUs sum over NCCL, one GPU each; the others over MPI.
    let nccl = match (mpi, args.device) {
        (Some(m), DeviceKind::Cuda) if layout.dp > 1 => Some(nccl(m)?),
        _ => None,
    };
    preflight(&model, micro as u64, args.emulate_precision)?;
    let steps = args.steps.unwrap_or(model.train.steps);
    let seed = args.seed.unwrap_or(model.train.seed);
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    // Each rank runs the step on its share of the rows of the batch a single process draws.
    let data_ranks = layout.data_ranks() as usize;
    let ep = layout.ep as usize;
    let rows = b / data_ranks;
    let mut rank_model = model.clone();
    rank_model.train.batch = micro as u64;

    let compiled = compile(&rank_model).map_err(|e| other(e.to_string()))?;
    let (full, forward) = (compiled.train.graph(), compiled.forward.graph());

    let source = engine::data_source(&model, args.data.as_deref(), seed)?;
    let tokenizer = run_tokenizer(&source, args.tokenizer.as_deref(), args.resume.as_deref())?;
    if let Some(t) = &tokenizer {
        t.file.check_vocab(&model)?;
    }
    let encoder = tokenizer
        .as_ref()
        .filter(|t| t.encodes)
        .map(|t| &t.file.tokenizer);
    let dataset = engine::load_source(&model, &source, args.val_fraction, encoder)?;
    let window = engine::window(forward, t);
    // The data must hold one validation batch, checked now rather than at the first
    // evaluation (whose loss would be NaN).
    let need = rows * window + 1;
    if dataset.val.len() < need {
        let total = (dataset.train.len() + dataset.val.len()) as f64;
        let fraction = need as f64 / total;
        let help = if fraction < 0.5 {
            format!(
                "use more data, or hold out more of it: --val-fraction {:.2} (now {})",
                (fraction * 100.0).ceil() / 100.0,
                args.val_fraction
            )
        } else {
            "use more data, or a smaller train.batch or train.seq_len".to_string()
        };
        return Err(super::layout::usage(
            &format!(
                "the validation split has {} tokens, fewer than one validation batch needs ({rows} × {window} + 1 = {need})",
                dataset.val.len()
            ),
            &help,
        ));
    }
    let mut batcher =
        Batcher::new(dataset.train.clone(), b, window, seed).map_err(|e| other(e.to_string()))?;

    let out_dir = match (&args.resume, args.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir,
        (None, None) => PathBuf::from("runs").join(&model.name),
    };
    let metrics_path = out_dir.join("metrics.jsonl");
    let ck_path = checkpoint_path(&out_dir);
    // The run records the resolved spec: the file with its --set overrides, and --steps, so
    // the run is reproducible from its directory alone. (Not the layout: a run resumes in any.)
    // A --steps the spec's rules refuse (shorter than its warmup) is left unrecorded.
    let recorded = match (&args.resume, args.steps) {
        (None, Some(n)) => {
            let text = String::from_utf8_lossy(&spec_bytes);
            let mut src = kiln_compiler::source::SpecSource::single("spec", text);
            crate::spec::apply_sets(&mut src, &[format!("train.steps={n}")])?;
            let with_steps = src.text().as_bytes().to_vec();
            if kiln_compiler::check::check(&with_steps).is_ok() {
                with_steps
            } else {
                spec_bytes.clone()
            }
        }
        _ => spec_bytes.clone(),
    };
    let hash = checkpoint::spec_hash(&recorded);

    let settings = compiled.train.settings();
    let config = TrainConfig::of(settings, steps, seed);
    engine::check_device(args.device, args.emulate_precision)?;
    let config = engine::emulating(config, settings, args.emulate_precision, built, "train")?;
    let params = init_params(forward, seed);
    let trainer = engine::trainer(&compiled.train, config, params, built, args.device)?;
    // Gradients are combined (over ranks, or micro-batches) before the update, on the host.
    let trainer = if data_ranks > 1 || accumulate > 1 {
        trainer.updating_on_host()
    } else {
        trainer
    };
    // The first rank writes the run directory (once the step is ready, so a run refused for
    // its device leaves nothing behind); the others compute.
    if lead {
        fsutil::create_dir(&out_dir)?;
        record_tokenizer(&out_dir, tokenizer.as_ref())?;
    }
    let collectives: Option<&dyn Collectives> = match (&nccl, mpi) {
        (Some(n), _) => Some(n.as_ref()),
        (None, Some(m)) => Some(m),
        (None, None) => None,
    };
    // Expert parallelism: rank `r` is expert rank `r mod ep` of group `r / ep`; the ranks
    // holding the same experts (`r mod ep` alike) reduce their gradients together.
    let groups = match mpi {
        Some(m) if ep > 1 => {
            let split = |color: usize| m.split(color, rank).map_err(|e| other(e.to_string()));
            Some((split(rank / ep)?, split(rank % ep)?))
        }
        _ => None,
    };
    let mut trainer = match collectives {
        Some(c) if data_ranks > 1 => trainer.data_parallel(c),
        _ => trainer,
    };
    if let Some((group, replicas)) = &groups {
        trainer = trainer.expert_parallel(group, replicas);
    }
    // ZeRO-1: each rank keeps the AdamW moments of its chunk of the parameters.
    let mut trainer = match layout.zero {
        1 if data_ranks > 1 => trainer.zero_1(),
        _ => trainer,
    }
    .accumulating(accumulate);
    let mut kept_metrics = String::new();
    if args.resume.is_some() {
        let ck = checkpoint::load(&ck_path, forward).map_err(|e| other(e.to_string()))?;
        if ck.spec_hash != hash {
            return Err(other(format!(
                "{} was written for another spec (hash {}, this spec {hash}); resume with the run's spec.toml",
                ck_path.display(),
                ck.spec_hash
            )));
        }
        batcher.restore(ck.data_rng);
        let at = ck.step;
        trainer.restore(ck.step, ck.params, ck.m, ck.v);
        // Keep the metrics up to the checkpoint; later lines belong to lost work.
        let old = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        let mut recorded_lr = None;
        for line in old.lines() {
            let row = serde_json::from_str::<serde_json::Value>(line).ok();
            let step = row.as_ref().and_then(|v| v["step"].as_u64());
            if step.is_some_and(|s| s <= at) {
                kept_metrics.push_str(line);
                kept_metrics.push('\n');
            }
            if step == Some(at) {
                recorded_lr = row.and_then(|v| v["lr"].as_f64());
            }
        }
        if lead {
            eprintln!(
                "resuming {} at step {at} from {}",
                model.name,
                ck_path.display()
            );
        }
        // The schedule spans the whole run: another step count reshapes it.
        if let (Some(was), true, true) = (recorded_lr, at > 0, lead) {
            let now = trainer.config.lr_at(at - 1);
            if (now - was).abs() > 1e-9 * was.abs().max(1e-30) {
                eprintln!(
                    "note: the schedule now spans {steps} steps, so step {at}'s learning rate \
                     is {now:.3e} where the run had {was:.3e}; training continues from {:.3e}",
                    trainer.config.lr_at(at)
                );
            }
        }
    } else if lead {
        fsutil::write_atomic(&out_dir.join("spec.toml"), &recorded)
            .map_err(|e| other(format!("cannot write the run's spec copy: {e}")))?;
    }
    let mut metrics: Box<dyn Write> = if lead {
        Box::new(fsutil::create_file(&metrics_path)?)
    } else {
        Box::new(std::io::sink())
    };
    metrics
        .write_all(kept_metrics.as_bytes())
        .map_err(|e| other(format!("cannot write metrics: {e}")))?;

    let warmup = trainer.config.warmup;
    if steps < warmup && lead {
        eprintln!(
            "note: {steps} steps end inside the {warmup}-step warmup: the learning rate rises \
             to {:.3e} of train.lr = {:.3e}, and no decay follows",
            trainer.config.lr_at(steps.saturating_sub(1)),
            trainer.config.lr
        );
    }
    if lead {
        let mut ranks_text = match (data_ranks, ep) {
            (1, _) => String::new(),
            (n, 1) => format!(" on {n} data-parallel ranks of {rows} sequences"),
            (n, ep) => format!(
                " on {n} ranks of {rows} sequences (dp {} × ep {ep}), each holding {} of every \
                 layer's {} routed experts",
                layout.dp,
                model.moe.as_ref().map_or(0, |m| m.experts) / ep as u64,
                model.moe.as_ref().map_or(0, |m| m.experts)
            ),
        };
        if accumulate > 1 {
            ranks_text.push_str(&format!(
                ", accumulated over {accumulate} micro-batches of {micro}"
            ));
        }
        eprintln!(
            "training {} ({spec_name}) on {}: {steps} steps of {b} × {t} tokens{ranks_text}, vocabulary {}, {} parameters",
            model.name,
            dataset.description,
            model.vocab,
            full.trainable_elements()
        );
        if let Some(t) = tokenizer.as_ref().filter(|t| !t.encodes) {
            eprintln!(
                "tokenizer: {} (the data's tokens are its ids; the run keeps a copy for kiln \
                 sample)",
                t.file.path.display()
            );
        }
    }

    let val = |params: &[Vec<f32>],
               emulate: Option<&kiln_runtime::numerics::Emulation>|
     -> Result<f64, Failure> {
        // The graph takes one micro-batch of a rank's rows: the same validation rows in
        // `ranks × accumulate` times the batches.
        let batches = data::val_batches(&dataset.val, micro, window)
            .map_err(|e| other(e.to_string()))?
            .filter(|batch| batch.inputs.len() == micro * window)
            .take(args.eval_batches * data_ranks * accumulate);
        eval_loss(&compiled.forward, params, batches, t, emulate).map_err(|e| other(e.to_string()))
    };
    let save = |trainer: &Trainer,
                batcher: &Batcher,
                params: Vec<Vec<f32>>,
                (m, v): (Vec<Vec<f32>>, Vec<Vec<f32>>)|
     -> Result<(), Failure> {
        let ck = checkpoint::Checkpoint {
            step: trainer.step,
            params,
            m,
            v,
            data_rng: batcher.state(),
            spec_hash: hash.clone(),
        };
        checkpoint::save(&ck_path, forward, &ck).map_err(|e| other(e.to_string()))
    };

    let start = Instant::now();
    let first = trainer.step;
    let mut last_finite = f64::NAN;
    let mut last_main = f64::NAN;
    let mut last_val = f64::NAN;
    let mut saved_at: Option<u64> = None;
    let mut skipped = 0u32;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let tokens_per_step = (b * t) as f64;
    let stop = args.stop_after.map_or(steps, |n| (first + n).min(steps));
    // Bytes sent reducing gradients and sharing parameters (every rank, and the experts'
    // replicas), and in the experts' all-to-alls.
    let sent = || {
        collectives.map(|c| {
            let mut t = c.traffic();
            if let Some((group, replicas)) = &groups {
                let (g, r) = (group.traffic(), replicas.traffic());
                t.reduce_bytes += r.reduce_bytes;
                t.gather_bytes += r.gather_bytes;
                t.exchange_bytes += g.exchange_bytes;
            }
            t
        })
    };
    while trainer.step < stop {
        let batch = batcher.next_batch();
        let batch = if data_ranks > 1 {
            batch.rows_range(rank * rows, rows)
        } else {
            batch
        };
        let before = sent();
        let s = trainer.step(&batch, t).map_err(|e| other(e.to_string()))?;
        let traffic = sent()
            .zip(before)
            .filter(|_| data_ranks > 1)
            .map(|(a, b)| StepTraffic {
                comm_bytes: a.reduce_bytes + a.gather_bytes - b.reduce_bytes - b.gather_bytes,
                ep: trainer
                    .take_moved_rows()
                    .map(|rows| (a.exchange_bytes - b.exchange_bytes, rows)),
            });
        if s.skipped {
            let at = trainer.step + 1;
            let newest = match saved_at {
                Some(at) => format!(
                    "the newest good checkpoint is {} (step {at})",
                    ck_path.display()
                ),
                None => "no checkpoint was written yet".to_string(),
            };
            if !model.train.skip_nonfinite {
                return Err(other(format!(
                    "the loss became {} (gradient norm {}) at step {at}; the last finite loss was \
                     {last_finite:.4}; {newest}. Lower train.lr, raise train.warmup, or set \
                     train.skip_nonfinite = true to skip such steps",
                    s.loss, s.grad_norm
                )));
            }
            skipped += 1;
            if skipped > MAX_SKIPPED {
                return Err(other(format!(
                    "{skipped} consecutive steps had a non-finite loss (at step {at}); {newest}"
                )));
            }
            if lead {
                eprintln!(
                    "\nskipping step {at}: the loss is {} (gradient norm {})",
                    s.loss, s.grad_norm
                );
            }
            continue;
        }
        skipped = 0;
        let done = trainer.step;
        last_finite = s.loss;
        last_main = s.main_loss;
        let elapsed = start.elapsed().as_secs_f64();
        let tps = tokens_per_step * (done - first) as f64 / elapsed.max(1e-9);
        let every = |n: u64| done % n.max(1) == 0 || done == stop;
        let eval_now = every(args.eval_every);
        let save_now = every(args.checkpoint_every.unwrap_or(args.eval_every));
        let log_now = every(args.log_every.unwrap_or(args.eval_every));
        // A sharded optimizer state, and sharded experts, are gathered from every rank for
        // the checkpoint and the validation loss.
        let moments = match save_now {
            true => Some(trainer.moments().map_err(|e| other(e.to_string()))?),
            false => None,
        };
        let params = match eval_now || save_now {
            true => Some(trainer.whole_params().map_err(|e| other(e.to_string()))?),
            false => None,
        };
        if !lead {
            continue;
        }
        if let (true, Some(p)) = (eval_now, &params) {
            last_val = val(p, trainer.config.emulate.as_ref())?;
        }
        let line = metrics_row(done, &s, tps, eval_now.then_some(last_val), traffic);
        writeln!(metrics, "{line}").map_err(|e| other(format!("cannot write metrics: {e}")))?;
        if let (Some(moments), Some(params)) = (moments, params) {
            metrics
                .flush()
                .map_err(|e| other(format!("cannot write metrics: {e}")))?;
            save(&trainer, &batcher, params, moments)?;
            saved_at = Some(done);
            write_plot(&out_dir, &model.name)?;
        }
        let eta = elapsed / (done - first) as f64 * (stop - done) as f64;
        // Before the first evaluation there is no validation loss to show.
        let val_text = if last_val.is_nan() {
            "–".to_string()
        } else {
            format!("{last_val:.4}")
        };
        let mut terms = String::new();
        if let Some(x) = s.mtp_loss {
            terms.push_str(&format!("  mtp_loss {x:.4}"));
        }
        if let Some(x) = s.balance_loss {
            terms.push_str(&format!("  balance_loss {x:.2e}"));
        }
        let progress = format!(
            "step {done}/{steps}  loss {:.4}  main_loss {:.4}{terms}  val_loss {val_text}  \
             lr {:.2e}  tokens_per_s {tps:.0}  ETA {:.0}s",
            s.loss, s.main_loss, s.lr, eta
        );
        // Named as metrics.jsonl names them. On a terminal, one line that updates; in a log,
        // a line every --log-every steps.
        if tty {
            eprint!("\r{progress}   ");
        } else if log_now || done == first + 1 {
            eprintln!("{progress}");
        }
    }
    if !lead {
        return Ok(());
    }
    if tty {
        eprintln!();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ran = stop.saturating_sub(first);
    out(&format!(
        "trained {} to step {stop} of {steps} ({ran} steps in {elapsed:.1} s, {:.0} tokens/s): main_loss {last_main:.4}, \
         val_loss {last_val:.4} (ln {} = {:.4})\nrun: {} (metrics.jsonl, plot.svg, checkpoint.safetensors, spec.toml)\n",
        model.name,
        tokens_per_step * ran as f64 / elapsed.max(1e-9),
        model.vocab,
        (model.vocab as f64).ln(),
        out_dir.display()
    ));
    Ok(())
}

/// One line of `metrics.jsonl`: `step`, `loss` (the total), `main_loss`, `mtp_loss` and
/// `balance_loss` when the model has those terms, `lr`, `grad_norm`, `tokens_per_s`,
/// `val_loss` at evaluation steps, `comm_bytes` in parallel runs and `ep_bytes`, `ep_rows`
/// with expert parallelism, with the digits they have always had; a value that is not finite
/// is `null`.
fn metrics_row(
    step: u64,
    s: &StepStats,
    tokens_per_s: f64,
    val_loss: Option<f64>,
    traffic: Option<StepTraffic>,
) -> String {
    #[derive(serde::Serialize)]
    struct Row {
        step: u64,
        loss: Box<RawValue>,
        main_loss: Box<RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mtp_loss: Option<Box<RawValue>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        balance_loss: Option<Box<RawValue>>,
        lr: Box<RawValue>,
        grad_norm: Box<RawValue>,
        tokens_per_s: Box<RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        val_loss: Option<Box<RawValue>>,
        /// Parallel runs: bytes this rank sent reducing the step's gradients (and sharing
        /// the parameters, with ZeRO-1).
        #[serde(skip_serializing_if = "Option::is_none")]
        comm_bytes: Option<u64>,
        /// Expert parallelism: bytes this rank sent in the experts' all-to-alls.
        #[serde(skip_serializing_if = "Option::is_none")]
        ep_bytes: Option<u64>,
        /// Expert parallelism: routed rows this rank's forward exchanges sent to or received
        /// from other ranks (the backward pass moves them again).
        #[serde(skip_serializing_if = "Option::is_none")]
        ep_rows: Option<u64>,
    }
    let six = |x: f64| format!("{x:.6}");
    output::line(&Row {
        step,
        loss: number(s.loss, six),
        main_loss: number(s.main_loss, six),
        mtp_loss: s.mtp_loss.map(|x| number(x, six)),
        balance_loss: s.balance_loss.map(|x| number(x, |x| format!("{x:.6e}"))),
        lr: number(s.lr, |x| format!("{x:.6e}")),
        grad_norm: number(s.grad_norm, |x| format!("{x:.4}")),
        tokens_per_s: number(tokens_per_s, |x| format!("{x:.1}")),
        val_loss: val_loss.map(|v| number(v, six)),
        comm_bytes: traffic.map(|t| t.comm_bytes),
        ep_bytes: traffic.and_then(|t| t.ep).map(|(bytes, _)| bytes),
        ep_rows: traffic.and_then(|t| t.ep).map(|(_, rows)| rows),
    })
}

/// What one rank sent in one step of a parallel run.
#[derive(Clone, Copy, Debug)]
struct StepTraffic {
    /// Gradient reductions and parameter gathers.
    comm_bytes: u64,
    /// With expert parallelism: bytes of the experts' all-to-alls, and the routed rows their
    /// forward exchanges moved.
    ep: Option<(u64, u64)>,
}

/// `OUT/plot.svg`, drawn from `OUT/metrics.jsonl`: the losses (total, main, MTP, validation),
/// the balance loss when there is one, the learning rate, the gradient norm and the
/// throughput against the step.
fn write_plot(out_dir: &std::path::Path, name: &str) -> Result<(), Failure> {
    use crate::plot::{stack, Plot, Series};
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .map_err(|e| other(format!("cannot read metrics for the plot: {e}")))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |label: &str, key: &str, dashed: bool| Series {
        name: label.to_string(),
        points: rows
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .collect(),
        dashed,
    };
    let panel = |what: &str, y: &str, series: Vec<Series>| Plot {
        title: format!("{name}: {what}"),
        x_label: "step".into(),
        y_label: y.into(),
        series,
    };
    let losses = [
        series("total (main + MTP + balance)", "loss", false),
        series("main", "main_loss", false),
        series("MTP (mean over depths)", "mtp_loss", false),
        series("validation (main)", "val_loss", true),
    ];
    let mut panels = vec![panel(
        "loss",
        "cross-entropy (nats)",
        losses
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect(),
    )];
    let balance = series("balance (sum over MoE layers)", "balance_loss", false);
    if !balance.points.is_empty() {
        panels.push(panel(
            "balance loss",
            "scaled by moe.seq_aux",
            vec![balance],
        ));
    }
    panels.extend([
        panel("learning rate", "lr", vec![series("lr", "lr", false)]),
        panel(
            "gradient norm",
            "global L2 norm, before clipping",
            vec![series("gradient norm", "grad_norm", false)],
        ),
        panel(
            "throughput",
            "tokens/s",
            vec![series("tokens/s", "tokens_per_s", false)],
        ),
    ]);
    let svg = stack(&panels);
    fsutil::write_atomic(&out_dir.join("plot.svg"), svg.as_bytes())
        .map_err(|e| other(format!("cannot write the plot: {e}")))
}

/// Refuses a run that cannot fit in memory before anything is allocated: the analyzer's
/// memory for one step as the CPU trains it (f32 weights, gradients and moments, f32
/// activations of `rows`, one micro-batch of this rank's; the moments in their spec format
/// when emulating) is a
/// lower bound of what the interpreter holds, compared with the memory available now.
fn preflight(model: &kiln_compiler::model::Model, rows: u64, emulate: bool) -> Result<(), Failure> {
    use kiln_compiler::model::Format;
    use kiln_compiler::report::bytes_h;
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let mut f32_model = model.clone();
    let moments = model.precision.moments;
    f32_model.precision = model.precision.mapped(|_| Format::Fp32);
    if emulate {
        f32_model.precision.moments = moments;
    }
    f32_model.train.batch = rows.max(1);
    let need = kiln_compiler::analyze::analyze(&f32_model)
        .memory
        .total_bytes;
    if need <= available as u128 {
        return Ok(());
    }
    Err(super::layout::usage(
        &format!(
            "{} needs at least {} to train ({} × {} tokens per step, in f32 on the CPU), but {} is available",
            model.name,
            bytes_h(need),
            f32_model.train.batch,
            model.train.seq_len,
            bytes_h(available as u128)
        ),
        "shrink train.batch or train.seq_len (activations), or the model (weights, gradients and AdamW moments take 16 bytes per parameter); `kiln check` reports both",
    ))
}

/// `MemAvailable` of /proc/meminfo, in bytes (Linux); `None` elsewhere.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An NCCL communicator over the MPI job's ranks, each driving its own GPU.
#[cfg(feature = "cuda")]
fn nccl(mpi: &Mpi) -> Result<Box<dyn Collectives>, Failure> {
    let n = kiln_runtime::nccl::Nccl::bootstrap(mpi)
        .map_err(|e| other(format!("--device cuda over {} ranks: {e}", mpi.size())))?;
    engine::use_gpu(n.gpu());
    Ok(Box::new(n))
}

/// Without the `cuda` feature there is no GPU, so no NCCL either.
#[cfg(not(feature = "cuda"))]
fn nccl(_mpi: &Mpi) -> Result<Box<dyn Collectives>, Failure> {
    Err(other(
        "--device cuda: this kiln was built without the `cuda` feature; build one with \
         scripts/device-build",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(loss: f64) -> StepStats {
        StepStats {
            loss,
            main_loss: loss,
            mtp_loss: None,
            balance_loss: None,
            grad_norm: 0.25,
            lr: 3e-4,
            skipped: false,
        }
    }

    #[test]
    fn a_metrics_row_keeps_its_keys_and_digits() {
        assert_eq!(
            metrics_row(3, &stats(2.5), 1234.56, Some(2.75), None),
            "{\"step\":3,\"loss\":2.500000,\"main_loss\":2.500000,\"lr\":3.000000e-4,\
             \"grad_norm\":0.2500,\"tokens_per_s\":1234.6,\"val_loss\":2.750000}"
        );
        assert!(!metrics_row(3, &stats(2.5), 1.0, None, None).contains("val_loss"));
        // With MTP and a balance loss, each term by its name, after the main loss.
        let s = StepStats {
            mtp_loss: Some(2.625),
            balance_loss: Some(1.25e-5),
            ..stats(2.5)
        };
        assert_eq!(
            metrics_row(3, &s, 1234.56, None, None),
            "{\"step\":3,\"loss\":2.500000,\"main_loss\":2.500000,\"mtp_loss\":2.625000,\
             \"balance_loss\":1.250000e-5,\"lr\":3.000000e-4,\"grad_norm\":0.2500,\
             \"tokens_per_s\":1234.6}"
        );
    }

    /// The row as kiln wrote it by hand before serde_json wrote it.
    fn hand_built(done: u64, s: &StepStats, tps: f64, val: Option<f64>) -> String {
        let mut line = format!(
            "{{\"step\":{done},\"loss\":{:.6},\"main_loss\":{:.6},\"lr\":{:.6e},\"grad_norm\":{:.4},\"tokens_per_s\":{tps:.1}",
            s.loss, s.main_loss, s.lr, s.grad_norm
        );
        if let Some(v) = val {
            line.push_str(&format!(",\"val_loss\":{v:.6}"));
        }
        line.push('}');
        line
    }

    #[test]
    fn finite_rows_are_written_as_before() {
        for (i, loss) in [0.0, 1e-9, 0.5, 2.718_281_9, 10.999_999_9, 123456.789]
            .into_iter()
            .enumerate()
        {
            let s = StepStats {
                loss,
                main_loss: loss * 0.97,
                mtp_loss: None,
                balance_loss: None,
                grad_norm: loss * 3.1,
                lr: 6e-4 / (i + 1) as f64,
                skipped: false,
            };
            for val in [None, Some(loss + 0.25)] {
                let tps = 1234.567 * i as f64;
                assert_eq!(
                    metrics_row(i as u64, &s, tps, val, None),
                    hand_built(i as u64, &s, tps, val)
                );
            }
        }
    }

    #[test]
    fn a_nan_loss_row_is_valid_json() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let line = metrics_row(7, &stats(bad), f64::NAN, Some(bad), None);
            let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
            assert_eq!(v["step"], 7);
            for key in ["loss", "main_loss", "tokens_per_s", "val_loss"] {
                assert!(v[key].is_null(), "{key} in {line}");
            }
            assert_eq!(v["lr"], 3e-4);
        }
    }
}
