//! What `kiln train`, `kiln bench` (and `kiln exp`) share, so that neither command reaches into
//! the other: the generated step a specialized binary brings, the trainer that runs either it
//! or the interpreter, and a run's data.

use std::path::{Path, PathBuf};

use kiln_compiler::emit_cuda;
use kiln_compiler::ir::{Graph, ValueId};
use kiln_compiler::model::{DataSource, Model};
use kiln_compiler::program::{Program, Settings, TrainOutputs};
use kiln_compiler::report::bytes_h;
use kiln_runtime::data::{
    self, builtin_corpus, byte_tokens, Batcher, Dataset, Tokenizer, TOKENIZER_FILE,
};
use kiln_runtime::device::emulated::Emulated;
use kiln_runtime::device::runner::DeviceRunner;
use kiln_runtime::device::{Device, DeviceError, DeviceKind};
use kiln_runtime::exec::Run;
use kiln_runtime::train::{max_token_offset, TrainConfig, Trainer};

use crate::{other, Failure};

/// A training binary specialized to one spec by `kiln build`: the spec it was built from and
/// its generated training step.
pub struct Specialized {
    /// The spec's text, compiled into the binary.
    pub spec: &'static str,
    /// The `Train` runner of the spec's `kiln::model!` module.
    pub runner: fn() -> Box<dyn Run>,
}

/// A trainer of `full` that runs on `device`: the interpreter (or `built`'s generated step)
/// for `cpu`, else the Program's CUDA plan on that device (a specialized binary's plan is
/// emitted from its own spec).
pub(crate) fn trainer<'g>(
    full: &'g Program,
    config: TrainConfig,
    params: Vec<Vec<f32>>,
    built: Option<&Specialized>,
    device: DeviceKind,
) -> Result<Trainer<'g>, Failure> {
    match (device, built) {
        (DeviceKind::Cpu, Some(b)) => Ok(Trainer::with_runner(full, config, params, (b.runner)())),
        (DeviceKind::Cpu, None) => Ok(Trainer::new(full, config, params)),
        (device, _) => {
            let keep = TrainOutputs::of(full.graph())
                .expect("a training Program has losses")
                .values();
            let runner = device_runner(full, device, &keep, false)?;
            Ok(Trainer::with_runner(full, config, params, runner))
        }
    }
}

/// `program`'s CUDA plan on `device` (not `cpu`), returning the values of `keep` from each
/// run; with `poison`, every buffer the plan writes is filled with NaN before each run.
pub(crate) fn device_runner(
    program: &Program,
    device: DeviceKind,
    keep: &[ValueId],
    poison: bool,
) -> Result<Box<dyn Run>, Failure> {
    let runner = DeviceRunner::new(program, emit_cuda::emit(program), open(device)?, keep)
        .map_err(|e| match e {
            // Refused before anything was built or allocated: say what to shrink.
            DeviceError::Memory { need, free, total } => crate::cmd::layout::usage(
                &format!(
                    "--device {device}: the training step's plan needs {} of device memory, but \
                     {} of the device's {} is free",
                    bytes_h(u128::from(need)),
                    bytes_h(u128::from(free)),
                    bytes_h(u128::from(total))
                ),
                "shrink train.batch or train.seq_len (activations), or the model; `kiln check` \
                 reports the memory of one step",
            ),
            e => other(format!("--device {device}: {e}")),
        })?;
    Ok(Box::new(if poison { runner.poisoning() } else { runner }))
}

/// `KILN_EMULATED_MEMORY`: the memory the emulated device claims (bytes, or with a `K`,
/// `M`, `G` suffix for KiB, MiB, GiB), to rehearse a GPU's limit; unlimited when unset.
fn emulated_memory() -> Result<Option<u64>, Failure> {
    let Ok(text) = std::env::var("KILN_EMULATED_MEMORY") else {
        return Ok(None);
    };
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .map(Some)
        .ok_or_else(|| {
            crate::cmd::layout::usage(
                &format!("KILN_EMULATED_MEMORY={text} is not a size"),
                "write bytes, or a number with K, M or G (KiB, MiB, GiB): KILN_EMULATED_MEMORY=80G",
            )
        })
}

/// A device of kind `device` (not `cpu`), reporting its progress (kernel builds) on stderr.
pub(crate) fn open(device: DeviceKind) -> Result<Box<dyn Device>, Failure> {
    match device {
        DeviceKind::Cpu => Err(other(
            "--device cpu is the interpreter, which runs no CUDA plan",
        )),
        DeviceKind::CudaEmulated => {
            let cache = kiln_runtime::device::cache_dir().join("emulated");
            let device = Emulated::new(&cache).with_progress(|line| eprintln!("{line}"));
            Ok(Box::new(match emulated_memory()? {
                Some(bytes) => device.with_capacity(bytes),
                None => device,
            }))
        }
        DeviceKind::Cuda => cuda(),
    }
}

/// The first GPU (`CUDA_VISIBLE_DEVICES` chooses which), through cudarc.
#[cfg(feature = "cuda")]
fn cuda() -> Result<Box<dyn Device>, Failure> {
    let gpu = kiln_runtime::device::cuda::Cuda::new(gpu_ordinal()).map_err(|e| {
        other(format!(
            "--device cuda: {e}. `--device cuda-emulated` runs the same CUDA plan on the CPU"
        ))
    })?;
    eprintln!("device: {}", gpu.describe());
    Ok(Box::new(gpu))
}

/// The GPU this process drives: `CUDA_VISIBLE_DEVICES` chooses which GPUs it sees, and a
/// data-parallel rank takes its own of them ([`use_gpu`]).
#[cfg(feature = "cuda")]
static GPU: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Makes `--device cuda` open the `ordinal`-th visible GPU (a data-parallel rank's own).
#[cfg(feature = "cuda")]
pub(crate) fn use_gpu(ordinal: usize) {
    let _ = GPU.set(ordinal);
}

#[cfg(feature = "cuda")]
fn gpu_ordinal() -> usize {
    GPU.get().copied().unwrap_or(0)
}

/// Without the `cuda` feature there is no GPU device: say why, and what to do.
#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Box<dyn Device>, Failure> {
    Err(other(cuda_unavailable()))
}

/// Why `--device cuda` cannot run in a kiln built without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
fn cuda_unavailable() -> String {
    let driver = ["libcuda.so.1", "libcuda.so"];
    match kiln_runtime::device::find_library("the CUDA driver library", &driver) {
        Err(e) => format!(
            "--device cuda: {e}: this machine has no NVIDIA driver. `--device cuda-emulated` \
             runs the same CUDA plan on the CPU"
        ),
        Ok(()) => "--device cuda: this kiln was built without its GPU device; build it with \
                   `cargo build --release --features cuda` (or scripts/device-build). \
                   `--device cuda-emulated` runs the same CUDA plan on the CPU"
            .to_string(),
    }
}

/// `--emulate-precision` is the interpreter's: a device runs the policy's formats itself.
pub(crate) fn check_device(device: DeviceKind, emulate: bool) -> Result<(), Failure> {
    if emulate && device != DeviceKind::Cpu {
        return Err(other(format!(
            "--emulate-precision is the interpreter's (--device cpu); --device {device} runs \
             the policy's GEMM formats itself"
        )));
    }
    Ok(())
}

/// `config`, emulating the precision policy of `settings` when asked. Only the interpreter
/// emulates, so a specialized binary refuses; `command` is the `kiln` command to use instead.
pub(crate) fn emulating(
    config: TrainConfig,
    settings: &Settings,
    emulate: bool,
    built: Option<&Specialized>,
    command: &str,
) -> Result<TrainConfig, Failure> {
    match (emulate, built) {
        (false, _) => Ok(config),
        (true, None) => Ok(config.emulating(settings)),
        (true, Some(_)) => Err(other(format!(
            "--emulate-precision runs on kiln's interpreter, not on a specialized binary's \
             generated step; use `kiln {command} SPEC --emulate-precision`"
        ))),
    }
}

/// The tokens a batch row holds: the sequence length and the extra targets the forward
/// graph's multi-token prediction reads.
pub(crate) fn window(forward: &Graph, seq_len: usize) -> usize {
    seq_len + max_token_offset(forward) as usize - 1
}

/// Batches of the spec's shape from the first `bytes` of the built-in corpus (ids folded into
/// the vocabulary), as the benchmarks and `kiln verify` read them, and the sequence length.
pub(crate) fn builtin_batcher(
    model: &Model,
    forward: &Graph,
    bytes: usize,
) -> Result<(Batcher, usize), Failure> {
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let tokens = byte_tokens(&builtin_corpus(0, bytes))
        .into_iter()
        .map(|x| x % model.vocab as u32)
        .collect();
    let batcher =
        Batcher::new(tokens, b, window(forward, t), 0).map_err(|e| other(e.to_string()))?;
    Ok((batcher, t))
}

/// Share of the data held out for validation.
/// The share of the tokens held out for validation unless `kiln train --val-fraction` says.
pub(crate) const VAL_FRACTION: f64 = 0.1;

/// The training data of a run: `arg` (`--data`), else the spec's `train.data`, byte-level,
/// with the last [`VAL_FRACTION`] of the tokens held out for validation.
pub(crate) fn load_data(model: &Model, arg: Option<&str>, seed: u64) -> Result<Dataset, Failure> {
    let source = data_source(model, arg, seed)?;
    load_source(model, &source, VAL_FRACTION, None)
}

/// The source of a run's data: `arg` (`--data`), else the spec's `train.data`; the built-in
/// corpus with `seed`.
pub(crate) fn data_source(
    model: &Model,
    arg: Option<&str>,
    seed: u64,
) -> Result<data::Source, Failure> {
    let spec_data = match &model.train.data {
        DataSource::Builtin => "builtin".to_string(),
        DataSource::Path(p) => p.clone(),
    };
    let which = arg.unwrap_or(&spec_data);
    let mut source = data::resolve(which).map_err(|e| other(e.to_string()))?;
    if let data::Source::Builtin { seed: s, .. } = &mut source {
        *s = seed;
    }
    Ok(source)
}

/// Loads `source` (a text file encoded by `tokenizer` when one is given) and checks that its
/// token ids fit the model's vocabulary.
pub(crate) fn load_source(
    model: &Model,
    source: &data::Source,
    val_fraction: f64,
    tokenizer: Option<&Tokenizer>,
) -> Result<Dataset, Failure> {
    let ds = data::load_with(source, val_fraction, tokenizer).map_err(|e| other(e.to_string()))?;
    if u64::from(ds.vocab) > model.vocab {
        return Err(other(format!(
            "the data ({}) has token ids up to {}, but the model's vocabulary is {}; raise model.vocab",
            ds.description,
            ds.vocab - 1,
            model.vocab
        )));
    }
    Ok(ds)
}

/// A `tokenizer.json` a command read: the parsed tokenizer, the file's bytes (copied into run
/// directories as they are) and where it came from.
pub(crate) struct TokenizerFile {
    pub tokenizer: Tokenizer,
    pub bytes: Vec<u8>,
    pub path: PathBuf,
}

impl TokenizerFile {
    /// Reads and parses `path`; a missing, unreadable or invalid file is an error naming it.
    pub(crate) fn read(path: &Path) -> Result<TokenizerFile, Failure> {
        let bytes = std::fs::read(path)
            .map_err(|e| other(format!("cannot read the tokenizer {}: {e}", path.display())))?;
        let tokenizer = Tokenizer::from_bytes(&bytes, &path.display().to_string())
            .map_err(|e| other(e.to_string()))?;
        Ok(TokenizerFile {
            tokenizer,
            bytes,
            path: path.to_path_buf(),
        })
    }

    /// The `tokenizer.json` in `dir` (a run or shard directory), if there is one.
    pub(crate) fn in_dir(dir: &Path) -> Result<Option<TokenizerFile>, Failure> {
        let path = dir.join(TOKENIZER_FILE);
        if path.is_file() {
            TokenizerFile::read(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Refuses a tokenizer whose ids do not all fit `model.vocab` (a usage error: the fix is
    /// a flag).
    pub(crate) fn check_vocab(&self, model: &Model) -> Result<(), Failure> {
        let needed = self.tokenizer.vocab_size();
        if u64::from(needed) <= model.vocab {
            return Ok(());
        }
        Err(crate::cmd::layout::usage(
            &format!(
                "the tokenizer {} has a vocabulary of {needed} tokens (with its added tokens), \
                 more than the model's vocabulary of {} (model.vocab)",
                self.path.display(),
                model.vocab
            ),
            &match needed.div_ceil(64) * 64 {
                round if round != needed => format!(
                    "raise the model's vocabulary to fit it: --set model.vocab={needed} (or a \
                     rounder size above it, such as {round})"
                ),
                _ => format!("raise the model's vocabulary to fit it: --set model.vocab={needed}"),
            },
        ))
    }
}
