//! `kiln rl`: GRPO fine-tuning of a pretrained run on a built-in rule-checked task
//! (`kiln_runtime::rl::Task`: arithmetic by default, or bracket closing).
//!
//! Each step samples `rl.questions` training questions of the task, draws `rl.group`
//! completions of each with the KV-cached decoder (keeping every drawn token's
//! log-probability), scores them with the task's rule-based verifier, normalizes the rewards
//! within each group, and takes `rl.updates` AdamW steps on the policy-gradient graph
//! (`lower::Objective::PolicyGradient`): a cross-entropy over the completion tokens whose
//! per-token weights are the GRPO objective's gradient with respect to each token's
//! log-probability (`kiln_runtime::rl`). The first update is on-policy and uses the
//! generation's log-probabilities as the current policy's; later ones recompute them with the
//! forward pass. The KL term compares with a frozen reference policy (the starting weights,
//! or the policy every `rl.ref_reset` steps).
//!
//! Held-out accuracy (greedy answers to the task's held-out questions, which no built-in
//! corpus contains and no step trains on) is measured before and after.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_compiler::ir::Graph;
use kiln_compiler::model;
use kiln_compiler::program::{compile, compile_decode, compile_forward, compile_policy};
use kiln_runtime::checkpoint;
use kiln_runtime::data::{decode_bytes, Batch, Batcher, Rng, TOKENIZER_FILE};
use kiln_runtime::decode::Decoder;
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::generate::{generate, log_prob, Completion as Sampled, Sampling};
use kiln_runtime::rl::{self, GrpoConfig, Question, RewardWeights, Task, TaskKind};
use kiln_runtime::train::{feed_inputs, TrainConfig, Trainer};

use crate::engine::load_data;
use crate::fsutil;
use crate::plot::{Plot, Series};
use crate::spec::load;
use crate::{other, Failure};

/// The command's arguments (see `kiln rl --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec whose `[rl]` settings to use; it must describe the run's model [default: the
    /// run's spec.toml].
    spec: Option<PathBuf>,
    /// The pretrained run directory (`kiln train --out`): spec.toml and
    /// checkpoint.safetensors.
    #[arg(long)]
    from: PathBuf,
    /// GRPO steps [default: the spec's rl.steps].
    #[arg(long)]
    steps: Option<u64>,
    /// Output run directory: metrics.jsonl, summary.json, checkpoint.safetensors, spec.toml
    /// [default: FROM-rl].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The task: `arithmetic` (two-digit `+ - *`, the answer compared with the exact one) or
    /// `brackets` (close an unfinished bracket word, the answer checked by a parser). Both
    /// are written in the built-in corpus; docs/rl.md says how to add one.
    #[arg(long, value_enum, default_value_t = TaskArg::Arithmetic)]
    task: TaskArg,
    /// Held-out problems answered (greedily) before and after training.
    #[arg(long, default_value_t = 300)]
    eval_problems: usize,
    /// Seed for sampling questions and completions [default: the spec's train.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Independent GRPO runs from the same start, with seeds SEED, SEED+1, …: each in
    /// OUT/seed-S/, and summary.json gives every seed's held-out gain, their mean and its
    /// standard error.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// After GRPO, spend the same wall-clock time (one seed's) on continued pretraining from
    /// the same start (`pretrain`: the spec's train.data, batch and AdamW, the checkpoint's
    /// moments, at the schedule's final rate train.min_lr) and report its held-out accuracy
    /// beside GRPO's, in OUT/control/ and summary.json's "control".
    #[arg(long, value_enum)]
    control: Option<Control>,
    /// Training data of the control [default: the spec's train.data].
    #[arg(long)]
    control_data: Option<String>,
}

/// `--task`: the built-in tasks of `kiln_runtime::rl::TaskKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TaskArg {
    /// Two-digit addition, subtraction and multiplication.
    Arithmetic,
    /// Closing an unfinished word of `()[]{}<>`.
    Brackets,
}

impl From<TaskArg> for TaskKind {
    fn from(t: TaskArg) -> TaskKind {
        match t {
            TaskArg::Arithmetic => TaskKind::Arithmetic,
            TaskArg::Brackets => TaskKind::Brackets,
        }
    }
}

/// What `--control` spends GRPO's time on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Control {
    /// Continued next-token pretraining on the run's corpus.
    Pretrain,
}

/// The completion of one question, as a training row.
struct Row {
    prompt: Vec<u32>,
    completion: Sampled,
    reward: rl::Reward,
}

/// Greedy accuracy of `decoder` on `questions`.
fn accuracy(
    decoder: &Decoder,
    task: &dyn Task,
    questions: &[Question],
    max_completion: u64,
    cache: model::Format,
) -> Result<f64, Failure> {
    if questions.is_empty() {
        return Ok(f64::NAN);
    }
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| bytes(&q.prompt)).collect();
    let sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_tokens: max_completion as usize,
        stop: vec![bytes(task.stop())],
        seed: 0,
    };
    let mut right = 0.0;
    for (chunk, qs) in prompts.chunks(64).zip(questions.chunks(64)) {
        let out = generate(decoder, chunk, &sampling, cache).map_err(fail)?;
        for (c, q) in out.iter().zip(qs) {
            right += task.score(q, &text(c)).accuracy;
        }
    }
    Ok(right / questions.len() as f64)
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// A completion's text as it is scored, stop sequence included: tagged answers end with
/// `</answer>`, plain ones with the newline their first line ends at.
fn text(c: &Sampled) -> String {
    decode_bytes(&c.tokens)
}

fn answer_format(cfg: &model::Rl) -> rl::AnswerFormat {
    match cfg.answer {
        model::AnswerFormat::Plain => rl::AnswerFormat::Plain,
        model::AnswerFormat::Tagged => rl::AnswerFormat::Tagged,
    }
}

/// Parameters of `to` (by name) from those of `from`.
fn by_name(from: &Graph, values: &[Vec<f32>], to: &Graph) -> Result<Vec<Vec<f32>>, Failure> {
    to.params
        .iter()
        .map(|(_, p)| {
            from.params
                .iter()
                .position(|(_, q)| q.name == p.name)
                .map(|i| values[i].clone())
                .ok_or_else(|| other(format!("the checkpoint has no parameter `{}`", p.name)))
        })
        .collect()
}

/// The rows as one batch of `window + 1`-token sequences (prompt, completion, zero padding)
/// and the target positions of each completion token.
fn batch_of(rows: &[Row], window: usize) -> (Batch, Vec<Vec<usize>>) {
    let mut inputs = Vec::with_capacity(rows.len() * window);
    let mut targets = Vec::with_capacity(rows.len() * window);
    let mut positions = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let mut seq: Vec<u32> = row.prompt.clone();
        seq.extend(&row.completion.tokens);
        seq.resize(window + 1, 0);
        inputs.extend(&seq[..window]);
        targets.extend(&seq[1..=window]);
        // Completion token j is the target of input position prompt_len + j − 1.
        let first = row.prompt.len() - 1;
        positions.push(
            (0..row.completion.tokens.len())
                .map(|j| r * window + first + j)
                .collect(),
        );
    }
    let batch = Batch {
        inputs,
        targets,
        rows: rows.len(),
        seq_len: window,
    };
    (batch, positions)
}

/// Log-probabilities of each completion token under `params`, by the forward pass.
fn logprobs(
    exec: &Executor,
    graph: &Graph,
    params: &[Vec<f32>],
    batch: &Batch,
    positions: &[Vec<usize>],
    vocab: usize,
) -> Result<Vec<Vec<f64>>, Failure> {
    let inputs = feed_inputs(graph, batch, batch.seq_len);
    let zeros = vec![0f32; batch.rows * batch.seq_len];
    let logits_v = graph.output("logits").expect("lowering names the logits");
    let out = exec
        .run::<f32>(&Feed {
            params,
            inputs: &inputs,
            weights: Some(&zeros),
        })
        .map_err(fail)?;
    let logits = out[&logits_v].floats();
    Ok(positions
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|&at| log_prob(&logits[at * vocab..(at + 1) * vocab], batch.targets[at]))
                .collect()
        })
        .collect())
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// One step of a GRPO run, as `curves.jsonl` records it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Curve {
    step: u64,
    reward_mean: f64,
    reward_std: f64,
    /// The share of the step's completions that are right.
    accuracy: f64,
    kl: f64,
    clip_fraction: f64,
    /// Mean completion length in tokens.
    completion_length: f64,
    loss: f64,
    /// Policy updates taken on the step's batch (0 when no group had reward variance).
    updates: u64,
    /// Seconds since the run's first step began.
    seconds: f64,
}

impl Curve {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "step": self.step, "reward_mean": self.reward_mean, "reward_std": self.reward_std,
            "accuracy": self.accuracy, "kl": self.kl, "clip_fraction": self.clip_fraction,
            "completion_length": self.completion_length, "loss": self.loss,
            "updates": self.updates, "seconds": self.seconds,
        })
    }
}

/// `plot.svg`: one panel per quantity of [`Curve`] that GRPO's progress is read from
/// (reward and training accuracy, KL, clip fraction, completion length), one series per run.
fn curves_plot(title: &str, runs: &[(String, &[Curve])]) -> String {
    type Pick = fn(&Curve) -> f64;
    /// A panel's title, its y axis, and its series (name, value).
    type Panel<'a> = (&'a str, &'a str, &'a [(&'a str, Pick)]);
    let panels: [Panel; 4] = [
        (
            "reward and training accuracy",
            "share of completions",
            &[("reward", |c| c.reward_mean), ("accuracy", |c| c.accuracy)],
        ),
        ("KL to the reference (k3)", "KL", &[("KL", |c| c.kl)]),
        (
            "clip fraction",
            "share of tokens",
            &[("clip fraction", |c| c.clip_fraction)],
        ),
        (
            "completion length",
            "tokens",
            &[("length", |c| c.completion_length)],
        ),
    ];
    let plots: Vec<Plot> = panels
        .iter()
        .map(|(what, y_label, picks)| {
            let mut series = Vec::new();
            for (label, curves) in runs {
                for (i, (name, pick)) in picks.iter().enumerate() {
                    let name = match (runs.len(), picks.len()) {
                        (1, _) => (*name).to_string(),
                        (_, 1) => label.clone(),
                        _ => format!("{name}, {label}"),
                    };
                    series.push(Series {
                        name,
                        points: curves.iter().map(|c| (c.step as f64, pick(c))).collect(),
                        dashed: i > 0,
                    });
                }
            }
            Plot {
                title: format!("{title}: {what}"),
                x_label: "GRPO step".into(),
                y_label: (*y_label).into(),
                series,
            }
        })
        .collect();
    crate::plot::stack(&plots)
}

/// Mean and standard error of the mean (sample standard deviation over √n; `None` below two
/// values).
fn mean_stderr(x: &[f64]) -> (f64, Option<f64>) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n.max(1.0);
    if x.len() < 2 {
        return (mean, None);
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// Everything a GRPO run needs that does not depend on its seed.
struct Setup {
    model: model::Model,
    cfg: model::Rl,
    spec_name: String,
    spec_bytes: Vec<u8>,
    from: PathBuf,
    steps: u64,
    /// The pretraining graph and its checkpoint (the run directory keeps the whole model).
    pre_graph: Graph,
    ck: checkpoint::Checkpoint,
    compiled: kiln_compiler::program::Compiled,
    /// The starting policy, by the policy graph's parameter order.
    params: Vec<Vec<f32>>,
    sample_program: kiln_compiler::program::Program,
    eval_program: kiln_compiler::program::Program,
    window: usize,
    task: Box<dyn Task>,
    heldout: Vec<Question>,
}

/// An f32 cache, so that the log-probabilities of generation are those of the training
/// forward pass (to about 1e-6; a bf16 cache would show up as KL to the reference).
const CACHE: model::Format = model::Format::Fp32;

impl Setup {
    fn new(args: &Args, color: bool) -> Result<Setup, Failure> {
        let spec_path = args
            .spec
            .clone()
            .unwrap_or_else(|| args.from.join("spec.toml"));
        let (spec_name, model) = load(Some(&spec_path), &mut Vec::new(), color)?;
        let tokenizer = args.from.join(TOKENIZER_FILE);
        if tokenizer.exists() {
            return Err(other(format!(
                "the tasks of kiln rl are byte-level (one token per byte), but {} was trained \
                 with the tokenizer {}; fine-tune a run trained byte-level",
                args.from.display(),
                tokenizer.display()
            )));
        }
        let cfg = model.rl;
        let spec_bytes = std::fs::read(&spec_path)
            .map_err(|e| other(format!("cannot read {}: {e}", spec_path.display())))?;

        // The pretrained weights, by the pretraining graph's parameter order.
        let pre_program = compile_forward(&model).map_err(fail)?;
        let pre_graph = pre_program.graph().clone();
        let ck_path = args.from.join("checkpoint.safetensors");
        let ck = checkpoint::load(&ck_path, &pre_graph).map_err(fail)?;

        // The policy-gradient graph at (questions × group) rows of the longest prompt plus
        // completion.
        let task = TaskKind::from(args.task)
            .build(answer_format(&cfg))
            .map_err(other)?;
        let longest_prompt = task.max_prompt_len();
        let window = longest_prompt + cfg.max_completion as usize - 1;
        if window as u64 > model.max_positions {
            return Err(other(format!(
                "prompts of up to {longest_prompt} tokens plus rl.max_completion = {} need \
                 {window} positions, but model.max_positions is {}; lower rl.max_completion",
                cfg.max_completion, model.max_positions
            )));
        }
        let rows = cfg.questions * cfg.group;
        let mut pg_model = model.clone();
        pg_model.train.batch = rows;
        pg_model.train.seq_len = window as u64;
        let compiled = compile_policy(&pg_model).map_err(fail)?;
        let forward = compiled.forward.graph();
        let params = by_name(&pre_graph, &ck.params, forward)?;
        let heldout = task.heldout(args.eval_problems);
        // Decode Programs for the sampled groups and for the held-out set, with caches for
        // the longest prompt and completion.
        let capacity = (window as u64 + 1).min(model.max_positions);
        let decode = |rows: u64| compile_decode(&pg_model, rows.max(1), capacity).map_err(fail);
        let (sample_program, eval_program) = (decode(rows)?, decode(heldout.len() as u64)?);
        Ok(Setup {
            cfg,
            spec_name,
            spec_bytes,
            from: args.from.clone(),
            steps: args.steps.unwrap_or(cfg.steps),
            pre_graph,
            ck,
            compiled,
            params,
            sample_program,
            eval_program,
            window,
            task,
            heldout,
            model,
        })
    }

    fn forward(&self) -> &Graph {
        self.compiled.forward.graph()
    }

    /// Greedy accuracy of `params` (by the policy graph's order) on the held-out problems.
    fn heldout_accuracy(&self, params: &[Vec<f32>]) -> Result<f64, Failure> {
        let d = Decoder::new(&self.eval_program, self.forward(), params).map_err(fail)?;
        accuracy(
            &d,
            self.task.as_ref(),
            &self.heldout,
            self.cfg.max_completion,
            CACHE,
        )
    }

    /// One GRPO run from the starting policy with `seed`, written to `dir` as a run
    /// directory (`curves.jsonl` step by step, then `plot.svg`, the checkpoint and the
    /// spec). `label` prefixes its progress lines. Returns the held-out accuracy after the
    /// last step and the curves.
    fn train(&self, seed: u64, dir: &Path, label: &str) -> Result<(f64, Vec<Curve>), Failure> {
        let (cfg, steps, window) = (&self.cfg, self.steps, self.window);
        let forward = self.forward();
        let vocab = self.model.vocab as usize;
        let fwd_exec = {
            let logits = forward.output("logits").expect("lowering names the logits");
            Executor::new(&self.compiled.forward, &[logits])
        };
        let mut config = TrainConfig::of(self.compiled.train.settings(), steps, seed);
        config.lr = cfg.lr;
        config.min_lr = cfg.lr;
        config.warmup = 0;
        config.cosine = false;
        let mut trainer = Trainer::new(&self.compiled.train, config, self.params.clone());
        let mut reference = self.params.clone();
        let grpo = GrpoConfig {
            clip_eps: cfg.clip,
            beta: cfg.kl,
        };
        let weights = RewardWeights {
            accuracy: cfg.accuracy_weight,
            format: cfg.format_weight,
        };
        fsutil::create_dir(dir)?;
        let curves_path = dir.join("curves.jsonl");
        let mut curves_file = fsutil::create_file(&curves_path)?;
        let mut curves = Vec::with_capacity(steps as usize);
        let mut rng = Rng::with_stream(seed, 0x726c);
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = Instant::now();
        let task = self.task.as_ref();
        for step in 1..=steps {
            // Sample questions and their completions.
            let questions: Vec<Question> =
                (0..cfg.questions).map(|_| task.sample(&mut rng)).collect();
            let prompts: Vec<Vec<u32>> = questions
                .iter()
                .flat_map(|q| std::iter::repeat_n(bytes(&q.prompt), cfg.group as usize))
                .collect();
            let sampling = Sampling {
                temperature: cfg.temperature,
                top_k: cfg.top_k as usize,
                top_p: 1.0,
                max_tokens: cfg.max_completion as usize,
                stop: vec![bytes(task.stop())],
                seed: seed.wrapping_mul(1_000_003).wrapping_add(step),
            };
            let decoder = Decoder::new(
                &self.sample_program,
                forward,
                trainer.params().map_err(fail)?,
            )
            .map_err(fail)?;
            let sampled = generate(&decoder, &prompts, &sampling, CACHE).map_err(fail)?;
            let rows: Vec<Row> = prompts
                .into_iter()
                .zip(sampled)
                .enumerate()
                .map(|(i, (prompt, completion))| {
                    let q = &questions[i / cfg.group as usize];
                    let reward = task.score(q, &text(&completion));
                    Row {
                        prompt,
                        completion,
                        reward,
                    }
                })
                .collect();
            let rewards: Vec<f64> = rows.iter().map(|r| r.reward.total(&weights)).collect();
            let advantages = rl::group_advantages(&rewards, cfg.group as usize);
            let (batch, positions) = batch_of(&rows, window);
            let logp_old: Vec<Vec<f64>> = rows
                .iter()
                .map(|r| {
                    r.completion
                        .logprobs
                        .iter()
                        .map(|&l| f64::from(l))
                        .collect()
                })
                .collect();
            let logp_ref = logprobs(&fwd_exec, forward, &reference, &batch, &positions, vocab)?;
            let mut stats = rl::GrpoStats::default();
            let mut loss = 0.0;
            // A batch whose groups all have equal rewards carries no policy-gradient signal,
            // and its only gradient (the KL term, about zero while the policy is near the
            // reference) would still move every weight a full step under AdamW's
            // normalization: skip it.
            let updates = if advantages.iter().all(|&a| a == 0.0) {
                0
            } else {
                cfg.updates
            };
            if updates == 0 {
                let completions: Vec<rl::Completion> = (0..rows.len())
                    .map(|i| rl::Completion {
                        logp_new: &logp_old[i],
                        logp_old: &logp_old[i],
                        logp_ref: &logp_ref[i],
                        advantage: 0.0,
                    })
                    .collect();
                let terms = rl::batch_terms(&grpo, &completions);
                (stats, loss) = (terms.stats, terms.loss);
            }
            for update in 0..updates {
                let logp_new = if update == 0 {
                    logp_old.clone()
                } else {
                    let params = trainer.params().map_err(fail)?;
                    logprobs(&fwd_exec, forward, params, &batch, &positions, vocab)?
                };
                let completions: Vec<rl::Completion> = (0..rows.len())
                    .map(|i| rl::Completion {
                        logp_new: &logp_new[i],
                        logp_old: &logp_old[i],
                        logp_ref: &logp_ref[i],
                        advantage: advantages[i],
                    })
                    .collect();
                let terms = rl::batch_terms(&grpo, &completions);
                let mut token_weights = vec![0f32; rows.len() * window];
                for (ps, ws) in positions.iter().zip(terms.ce_weights()) {
                    for (&at, w) in ps.iter().zip(ws) {
                        token_weights[at] = w as f32;
                    }
                }
                let s = trainer
                    .step_weighted(&batch, window, Some(&token_weights))
                    .map_err(fail)?;
                if s.skipped {
                    return Err(other(format!(
                        "the GRPO loss became {} at step {step}; lower rl.lr",
                        s.loss
                    )));
                }
                if update == 0 {
                    stats = terms.stats;
                    loss = terms.loss;
                }
            }
            if cfg.ref_reset.is_some_and(|n| step % n == 0) {
                reference = trainer.params().map_err(fail)?.to_vec();
            }
            let (reward_mean, reward_std) = mean_std(&rewards);
            let n = rows.len().max(1) as f64;
            let curve = Curve {
                step,
                reward_mean,
                reward_std,
                accuracy: rows.iter().map(|r| r.reward.accuracy).sum::<f64>() / n,
                kl: stats.kl_mean,
                clip_fraction: stats.clip_fraction,
                completion_length: rows
                    .iter()
                    .map(|r| r.completion.tokens.len() as f64)
                    .sum::<f64>()
                    / n,
                loss,
                updates,
                seconds: started.elapsed().as_secs_f64(),
            };
            // Each step's line is on disk before the next step begins: an interrupted run
            // keeps its curve.
            writeln!(curves_file, "{}", curve.json())
                .and_then(|()| curves_file.flush())
                .map_err(|e| other(format!("cannot write {}: {e}", curves_path.display())))?;
            curves.push(curve);
            let eta = curve.seconds / step as f64 * (steps - step) as f64;
            let line = format!(
                "{label}step {step}/{steps}  reward {reward_mean:.3} ± {reward_std:.3}  accuracy \
                 {:.1}%  kl {:.4}  clip {:.3}  length {:.1}  ETA {eta:.0}s",
                100.0 * curve.accuracy,
                curve.kl,
                curve.clip_fraction,
                curve.completion_length,
            );
            if tty {
                eprint!("\r{line}   ");
            } else if step % 10 == 0 || step == steps {
                eprintln!("{line}");
            }
        }
        if tty {
            eprintln!();
        }
        let params = trainer.params().map_err(fail)?;
        let after = self.heldout_accuracy(params)?;
        self.save_run(dir, params, seed)?;
        let svg = curves_plot(&format!("GRPO, seed {seed}"), &[(String::new(), &curves)]);
        fsutil::write(&dir.join("plot.svg"), svg.as_bytes())?;
        Ok((after, curves))
    }

    /// The control: continued pretraining from the same checkpoint for `budget` seconds of
    /// wall-clock time, then the same greedy held-out evaluation. Writes a run directory to
    /// `dir` and returns the held-out accuracy and the steps taken.
    fn control(
        &self,
        data: Option<&str>,
        seed: u64,
        budget: f64,
        dir: &Path,
    ) -> Result<(f64, u64), Failure> {
        let compiled = compile(&self.model).map_err(fail)?;
        let forward = compiled.forward.graph();
        let t = self.model.train.seq_len as usize;
        let dataset = load_data(&self.model, data, seed)?;
        let window = crate::engine::window(forward, t);
        let mut batcher =
            Batcher::new(dataset.train, self.model.train.batch as usize, window, seed)
                .map_err(fail)?;
        let mut config = TrainConfig::of(compiled.train.settings(), u64::MAX, seed);
        config.lr = self.model.train.schedule.min_lr;
        config.min_lr = config.lr;
        config.warmup = 0;
        config.cosine = false;
        let params = by_name(&self.pre_graph, &self.ck.params, forward)?;
        let (m, v) = (
            by_name(&self.pre_graph, &self.ck.m, forward)?,
            by_name(&self.pre_graph, &self.ck.v, forward)?,
        );
        let mut trainer = Trainer::new(&compiled.train, config, params.clone());
        trainer.restore(self.ck.step, params, m, v);
        let started = Instant::now();
        let mut steps = 0;
        // At least one step, then until the budget is spent.
        while steps == 0 || started.elapsed().as_secs_f64() < budget {
            let s = trainer.step(&batcher.next_batch(), t).map_err(fail)?;
            if s.skipped {
                return Err(other(format!(
                    "the control's loss became {} at step {}",
                    s.loss,
                    steps + 1
                )));
            }
            steps += 1;
            if steps % 100 == 0 {
                eprintln!(
                    "control: {steps} pretraining steps, {:.0}/{budget:.0} s, loss {:.4}",
                    started.elapsed().as_secs_f64(),
                    s.loss
                );
            }
        }
        let trained = trainer.params().map_err(fail)?;
        let policy = by_name(forward, trained, self.forward())?;
        fsutil::create_dir(dir)?;
        self.save_run(dir, &policy, seed)?;
        Ok((self.heldout_accuracy(&policy)?, steps))
    }

    /// The run directory's model: the whole pretrained model (MTP modules unchanged) with the
    /// policy's parameters, loadable by `kiln sample`, and the spec.
    fn save_run(&self, dir: &Path, params: &[Vec<f32>], seed: u64) -> Result<(), Failure> {
        let forward = self.forward();
        let mut full = self.ck.params.clone();
        for (i, (_, p)) in self.pre_graph.params.iter().enumerate() {
            if let Some(j) = forward.params.iter().position(|(_, q)| q.name == p.name) {
                full[i] = params[j].clone();
            }
        }
        fsutil::write_atomic(&dir.join("spec.toml"), &self.spec_bytes)
            .map_err(|e| other(format!("cannot write the run's spec copy: {e}")))?;
        let zeros: Vec<Vec<f32>> = full.iter().map(|p| vec![0.0; p.len()]).collect();
        checkpoint::save(
            &dir.join("checkpoint.safetensors"),
            &self.pre_graph,
            &checkpoint::Checkpoint {
                step: 0,
                params: full,
                m: zeros.clone(),
                v: zeros,
                data_rng: [seed, 0],
                spec_hash: checkpoint::spec_hash(&self.spec_bytes),
            },
        )
        .map_err(fail)
    }
}

fn fail(e: impl std::fmt::Display) -> Failure {
    other(e.to_string())
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    if args.seeds == 0 {
        return Err(other("--seeds must be at least 1".to_string()));
    }
    let setup = Setup::new(&args, color)?;
    let (cfg, steps) = (setup.cfg, setup.steps);
    let first_seed = args.seed.unwrap_or(setup.model.train.seed);
    let seeds: Vec<u64> = (0..args.seeds)
        .map(|i| first_seed.wrapping_add(i))
        .collect();
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-rl", args.from.display())));
    fsutil::create_dir(&out_dir)?;
    eprintln!(
        "GRPO on the {} task, {} ({}) from {}: {steps} steps of {} questions × {} completions (≤ {} \
         tokens), lr {:e}, clip {}, kl {}, {}",
        setup.task.name(),
        setup.model.name,
        setup.spec_name,
        setup.from.display(),
        cfg.questions,
        cfg.group,
        cfg.max_completion,
        cfg.lr,
        cfg.clip,
        cfg.kl,
        if seeds.len() == 1 {
            format!("seed {first_seed}")
        } else {
            format!("seeds {}–{}", seeds[0], seeds[seeds.len() - 1])
        }
    );
    let started = Instant::now();
    // Greedy answers depend on the weights alone: the starting accuracy is every seed's.
    let before = setup.heldout_accuracy(&setup.params)?;
    eprintln!(
        "held-out accuracy before: {:.1}% of {} problems",
        100.0 * before,
        setup.heldout.len()
    );
    let mut runs = Vec::with_capacity(seeds.len());
    for (i, &seed) in seeds.iter().enumerate() {
        let (dir, label) = if seeds.len() == 1 {
            (out_dir.clone(), String::new())
        } else {
            (
                out_dir.join(format!("seed-{seed}")),
                format!("seed {seed} ({}/{}): ", i + 1, seeds.len()),
            )
        };
        let run_started = Instant::now();
        let (after, curves) = setup.train(seed, &dir, &label)?;
        let seconds = run_started.elapsed().as_secs_f64();
        eprintln!(
            "{label}held-out accuracy {:.1}% → {:.1}% ({:+.1} points) in {seconds:.0} s",
            100.0 * before,
            100.0 * after,
            100.0 * (after - before)
        );
        runs.push((seed, dir, after, seconds, curves));
    }
    let control = match args.control {
        None => None,
        Some(Control::Pretrain) => {
            let budget = runs.iter().map(|r| r.3).sum::<f64>() / runs.len() as f64;
            eprintln!("control: continued pretraining from the same start for {budget:.0} s");
            let dir = out_dir.join("control");
            let (after, steps) =
                setup.control(args.control_data.as_deref(), first_seed, budget, &dir)?;
            eprintln!(
                "control: held-out accuracy {:.1}% → {:.1}% ({:+.1} points) after {steps} \
                 pretraining steps",
                100.0 * before,
                100.0 * after,
                100.0 * (after - before)
            );
            Some(serde_json::json!({
                "kind": "pretrain", "run": dir.display().to_string(), "steps": steps,
                "seconds": budget, "lr": setup.model.train.schedule.min_lr,
                "heldout_accuracy_after": after, "gain": after - before,
            }))
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let afters: Vec<f64> = runs.iter().map(|r| r.2).collect();
    let gains: Vec<f64> = afters.iter().map(|a| a - before).collect();
    let (after_mean, after_se) = mean_stderr(&afters);
    let (gain_mean, gain_se) = mean_stderr(&gains);
    if seeds.len() > 1 {
        let labelled: Vec<(String, &[Curve])> = runs
            .iter()
            .map(|r| (format!("seed {}", r.0), r.4.as_slice()))
            .collect();
        let svg = curves_plot(&format!("GRPO, {} seeds", seeds.len()), &labelled);
        fsutil::write(&out_dir.join("plot.svg"), svg.as_bytes())?;
    }
    let summary = serde_json::json!({
        "task": setup.task.name(), "spec": setup.spec_name, "from": setup.from.display().to_string(), "steps": steps,
        "questions": cfg.questions, "group": cfg.group, "max_completion": cfg.max_completion,
        "lr": cfg.lr, "clip": cfg.clip, "kl": cfg.kl, "updates": cfg.updates,
        "seed": first_seed,
        "heldout_problems": setup.heldout.len(),
        "heldout_accuracy_before": before,
        "heldout_accuracy_after": after_mean,
        "heldout_accuracy_after_stderr": after_se,
        "gain": gain_mean, "gain_stderr": gain_se,
        "seeds": runs.iter().map(|(seed, dir, after, seconds, _)| serde_json::json!({
            "seed": seed, "run": dir.display().to_string(),
            "heldout_accuracy_after": after, "gain": after - before, "seconds": seconds,
        })).collect::<Vec<_>>(),
        "control": control,
        "seconds": seconds,
    });
    fsutil::write_atomic(
        &out_dir.join("summary.json"),
        format!("{summary:#}\n").as_bytes(),
    )
    .map_err(|e| other(format!("cannot write summary.json: {e}")))?;
    let spread = gain_se.map_or(String::new(), |se| format!(" ± {:.1}", 100.0 * se));
    let per_seed = if runs.len() > 1 {
        let each: Vec<String> = gains.iter().map(|g| format!("{:+.1}", 100.0 * g)).collect();
        format!(" (per seed: {})", each.join(", "))
    } else {
        String::new()
    };
    let control_line = control.as_ref().map_or(String::new(), |c| {
        format!(
            "control (continued pretraining, {} steps in the same time): held-out accuracy \
             {:.1}%, {:+.1} points\n",
            c["steps"],
            100.0 * c["heldout_accuracy_after"].as_f64().unwrap_or(f64::NAN),
            100.0 * c["gain"].as_f64().unwrap_or(f64::NAN),
        )
    });
    let written = if runs.len() > 1 {
        format!(
            "runs: {}/seed-S/ for each seed (curves.jsonl, plot.svg, checkpoint.safetensors, \
             spec.toml); {} (summary.json, plot.svg of every seed)",
            out_dir.display(),
            out_dir.display()
        )
    } else {
        format!(
            "run: {} (curves.jsonl, plot.svg, summary.json, checkpoint.safetensors, spec.toml)",
            out_dir.display()
        )
    };
    crate::output::out(&format!(
        "GRPO: {steps} steps × {} seed(s) in {seconds:.0} s; held-out accuracy {:.1}% → \
         {:.1}%, {:+.1}{spread} points{per_seed} ({} problems)\n{control_line}{written}\n",
        runs.len(),
        100.0 * before,
        100.0 * after_mean,
        100.0 * gain_mean,
        setup.heldout.len(),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::generate::Finish;

    fn row(prompt: &[u32], completion: &[u32]) -> Row {
        Row {
            prompt: prompt.to_vec(),
            completion: Sampled {
                tokens: completion.to_vec(),
                logprobs: vec![0.0; completion.len()],
                finish: Finish::Length,
                stop_len: 0,
            },
            reward: rl::Reward::default(),
        }
    }

    #[test]
    fn completion_tokens_are_the_targets_at_their_positions() {
        let rows = [row(&[1, 2, 3], &[4, 5]), row(&[7], &[8, 9, 10])];
        let (batch, positions) = batch_of(&rows, 5);
        assert_eq!(batch.inputs, [1, 2, 3, 4, 5, 7, 8, 9, 10, 0]);
        assert_eq!(batch.targets, [2, 3, 4, 5, 0, 8, 9, 10, 0, 0]);
        assert_eq!(positions, [vec![2, 3], vec![5, 6, 7]]);
        for (r, ps) in rows.iter().zip(&positions) {
            let got: Vec<u32> = ps.iter().map(|&p| batch.targets[p]).collect();
            assert_eq!(got, r.completion.tokens);
        }
    }
}
