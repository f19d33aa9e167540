//! What `kiln train`, `kiln bench` (and `kiln exp`) share, so that neither command reaches into
//! the other: the generated step a specialized binary brings, the trainer that runs either it
//! or the interpreter, and a run's data.

use kiln_compiler::ir::Graph;
use kiln_compiler::model::{DataSource, Model};
use kiln_compiler::program::{Program, Settings};
use kiln_runtime::data::{self, Dataset};
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

/// A trainer of `full` that runs the interpreter, or `built`'s generated step.
pub(crate) fn trainer<'g>(
    full: &'g Program,
    config: TrainConfig,
    params: Vec<Vec<f32>>,
    built: Option<&Specialized>,
) -> Trainer<'g> {
    match built {
        Some(b) => Trainer::with_runner(full, config, params, (b.runner)()),
        None => Trainer::new(full, config, params),
    }
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

/// Share of the data held out for validation.
const VAL_FRACTION: f64 = 0.1;

/// The training data of a run: `arg` (`--data`), else the spec's `train.data`.
pub(crate) fn load_data(model: &Model, arg: Option<&str>, seed: u64) -> Result<Dataset, Failure> {
    let spec_data = match &model.train.data {
        DataSource::Builtin => "builtin".to_string(),
        DataSource::Path(p) => p.clone(),
    };
    let which = arg.unwrap_or(&spec_data);
    let mut source = data::resolve(which).map_err(|e| other(e.to_string()))?;
    if let data::Source::Builtin { seed: s, .. } = &mut source {
        *s = seed;
    }
    let ds = data::load(&source, VAL_FRACTION).map_err(|e| other(e.to_string()))?;
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
