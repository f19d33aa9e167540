//! `kiln train`: the CLI side of training — reading the spec and data, lowering and
//! differentiating, driving the runtime's trainer, and reporting progress and metrics.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kiln_compiler::autodiff::differentiate;
use kiln_compiler::ir::verify;
use kiln_compiler::lower::lower;
use kiln_compiler::model::{DataSource, Model, ScheduleKind};
use kiln_runtime::data::{self, Batcher, Dataset};
use kiln_runtime::train::{eval_loss, init_params, max_token_offset, TrainConfig, Trainer};

use crate::{load, Failure};

pub(crate) struct Args {
    pub spec: Option<PathBuf>,
    pub data: Option<String>,
    pub steps: Option<u64>,
    pub out: Option<PathBuf>,
    pub seed: Option<u64>,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub color: bool,
}

fn other(msg: impl Into<String>) -> Failure {
    Failure::Other(msg.into())
}

/// Share of the data held out for validation.
const VAL_FRACTION: f64 = 0.1;

fn config(model: &Model, steps: u64, seed: u64) -> TrainConfig {
    let t = &model.train;
    TrainConfig {
        steps,
        lr: t.optimizer.lr,
        beta1: t.optimizer.beta1,
        beta2: t.optimizer.beta2,
        eps: t.optimizer.eps,
        weight_decay: t.optimizer.weight_decay,
        warmup: t.schedule.warmup.min(steps),
        cosine: t.schedule.kind == ScheduleKind::Cosine,
        min_lr: t.schedule.min_lr,
        grad_clip: t.grad_clip,
        bias_update: model.moe.as_ref().map_or(0.0, |m| m.bias_update),
        seed,
    }
}

fn load_data(model: &Model, arg: Option<&str>, seed: u64) -> Result<Dataset, Failure> {
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

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let (spec_name, model) = load(args.spec.as_ref(), &mut Vec::new(), args.color)?;
    let steps = args.steps.unwrap_or(model.train.steps);
    let seed = args.seed.unwrap_or(model.train.seed);
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);

    let forward =
        lower(&model).map_err(|e| other(format!("internal error while lowering: {e}")))?;
    let full = differentiate(
        &forward,
        forward.output("loss").expect("lowering names the loss"),
    )
    .map_err(|e| other(format!("internal error while differentiating: {e}")))?;
    for g in [&forward, &full] {
        if let Err(errors) = verify(g) {
            return Err(other(format!(
                "internal error: {} does not verify: {}",
                g.name, errors[0]
            )));
        }
    }

    let dataset = load_data(&model, args.data.as_deref(), seed)?;
    let window = t + max_token_offset(&forward) as usize - 1;
    let mut batcher =
        Batcher::new(dataset.train.clone(), b, window, seed).map_err(|e| other(e.to_string()))?;

    let out_dir = args
        .out
        .unwrap_or_else(|| PathBuf::from("runs").join(&model.name));
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| other(format!("cannot create {}: {e}", out_dir.display())))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .map_err(|e| other(format!("cannot write {}: {e}", metrics_path.display())))?;

    eprintln!(
        "training {} ({spec_name}) on {}: {steps} steps of {b} × {t} tokens, {} parameters",
        model.name,
        dataset.description,
        full.trainable_elements()
    );
    let params = init_params(&forward, seed);
    let mut trainer = Trainer::new(&full, config(&model, steps, seed), params);

    let val = |trainer: &Trainer| -> Result<f64, Failure> {
        let batches = data::val_batches(&dataset.val, b, window)
            .map_err(|e| other(e.to_string()))?
            .filter(|batch| batch.inputs.len() == b * window)
            .take(args.eval_batches);
        eval_loss(&forward, &trainer.params, batches, t).map_err(|e| other(e.to_string()))
    };

    let start = Instant::now();
    let mut last_finite = f64::NAN;
    let mut last_main = f64::NAN;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_val = f64::NAN;
    let tokens_per_step = (b * t) as f64;
    for step in 0..steps {
        let batch = batcher.next_batch();
        let s = trainer.step(&batch, t).map_err(|e| other(e.to_string()))?;
        if !s.loss.is_finite() {
            return Err(other(format!(
                "the loss became {} at step {}; the last finite loss was {last_finite:.4}. \
                 Lower train.lr or raise train.warmup",
                s.loss,
                step + 1
            )));
        }
        last_finite = s.loss;
        last_main = s.main_loss;
        let elapsed = start.elapsed().as_secs_f64();
        let tps = tokens_per_step * (step + 1) as f64 / elapsed.max(1e-9);
        let done = step + 1;
        let eval_now = done % args.eval_every.max(1) == 0 || done == steps;
        let mut line = format!(
            "{{\"step\":{done},\"loss\":{:.6},\"main_loss\":{:.6},\"lr\":{:.6e},\"grad_norm\":{:.4},\"tokens_per_s\":{tps:.1}",
            s.loss, s.main_loss, s.lr, s.grad_norm
        );
        if eval_now {
            last_val = val(&trainer)?;
            line.push_str(&format!(",\"val_loss\":{last_val:.6}"));
        }
        line.push('}');
        writeln!(metrics, "{line}").map_err(|e| other(format!("cannot write metrics: {e}")))?;
        let eta = elapsed / done as f64 * (steps - done) as f64;
        let progress = format!(
            "step {done}/{steps}  loss {:.4}  val {:.4}  lr {:.2e}  {tps:.0} tok/s  ETA {:.0}s",
            s.main_loss, last_val, s.lr, eta
        );
        // On a terminal, one line that updates; in a log, a line per evaluation.
        if tty {
            eprint!("\r{progress}   ");
        } else if eval_now || done == 1 {
            eprintln!("{progress}");
        }
    }
    if tty {
        eprintln!();
    }
    let elapsed = start.elapsed().as_secs_f64();
    crate::out(&format!(
        "trained {} for {steps} steps in {elapsed:.1} s ({:.0} tokens/s): train loss {last_main:.4}, \
         validation loss {last_val:.4} (ln {} = {:.4})\nmetrics: {}\n",
        model.name,
        tokens_per_step * steps as f64 / elapsed.max(1e-9),
        model.vocab,
        (model.vocab as f64).ln(),
        metrics_path.display()
    ));
    Ok(())
}
