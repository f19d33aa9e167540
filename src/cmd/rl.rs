//! `kiln rl`: GRPO fine-tuning of a pretrained run on the built-in arithmetic task.
//!
//! Each step samples `rl.questions` training problems, draws `rl.group` completions of each
//! with the KV-cached decoder (keeping every drawn token's log-probability), scores them with
//! the rule-based rewards, normalizes the rewards within each group, and takes `rl.updates`
//! AdamW steps on the policy-gradient graph (`lower::Objective::PolicyGradient`): a
//! cross-entropy over the completion tokens whose per-token weights are the GRPO objective's
//! gradient with respect to each token's log-probability (`kiln_runtime::rl`). The first
//! update is on-policy and uses the generation's log-probabilities as the current policy's;
//! later ones recompute them with the forward pass. The KL term compares with a frozen
//! reference policy (the starting weights, or the policy every `rl.ref_reset` steps).
//!
//! Held-out accuracy (greedy answers to problems no built-in corpus contains) is measured
//! before and after.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use kiln_compiler::ir::Graph;
use kiln_compiler::model;
use kiln_compiler::program::{compile_decode, compile_forward, compile_policy};
use kiln_runtime::checkpoint;
use kiln_runtime::data::builtin::{heldout_problems, training_problems, Problem};
use kiln_runtime::data::{decode_bytes, Batch, Rng};
use kiln_runtime::decode::Decoder;
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::generate::{generate, log_prob, Completion as Sampled, Sampling};
use kiln_runtime::rl::{self, GrpoConfig, RewardWeights};
use kiln_runtime::train::{feed_inputs, TrainConfig, Trainer};

use crate::fsutil;
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
    /// Held-out problems answered (greedily) before and after training.
    #[arg(long, default_value_t = 300)]
    eval_problems: usize,
    /// Seed for sampling questions and completions [default: the spec's train.seed].
    #[arg(long)]
    seed: Option<u64>,
}

/// The completion of one question, as a training row.
struct Row {
    prompt: Vec<u32>,
    completion: Sampled,
    reward: rl::Reward,
}

/// Greedy accuracy on `problems` (plain answers, or tagged ones).
fn accuracy(
    decoder: &Decoder,
    problems: &[Problem],
    cfg: &model::Rl,
    cache: model::Format,
) -> Result<f64, Failure> {
    if problems.is_empty() {
        return Ok(f64::NAN);
    }
    let prompts: Vec<Vec<u32>> = problems.iter().map(|p| bytes(&rl::prompt(p))).collect();
    let sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_tokens: cfg.max_completion as usize,
        stop: stops(cfg),
        seed: 0,
    };
    let mut right = 0.0;
    for (chunk, probs) in prompts.chunks(64).zip(problems.chunks(64)) {
        let out = generate(decoder, chunk, &sampling, cache).map_err(|e| other(e.to_string()))?;
        for (c, p) in out.iter().zip(probs) {
            right += rl::score(&text(c), p.answer(), answer_format(cfg)).accuracy;
        }
    }
    Ok(right / problems.len() as f64)
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// A completion's text as it is scored, stop sequence included: tagged answers end with
/// `</answer>`, plain ones with the newline their first line ends at.
fn text(c: &Sampled) -> String {
    decode_bytes(&c.tokens)
}

fn stops(cfg: &model::Rl) -> Vec<Vec<u32>> {
    match cfg.answer {
        model::AnswerFormat::Plain => vec![bytes("\n")],
        model::AnswerFormat::Tagged => vec![bytes("</answer>")],
    }
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
        .map_err(|e| other(e.to_string()))?;
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

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    let spec_path = args
        .spec
        .clone()
        .unwrap_or_else(|| args.from.join("spec.toml"));
    let (spec_name, model) = load(Some(&spec_path), &mut Vec::new(), color)?;
    let cfg = model.rl;
    let steps = args.steps.unwrap_or(cfg.steps);
    let seed = args.seed.unwrap_or(model.train.seed);
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-rl", args.from.display())));

    // The pretrained weights, by the pretraining graph's parameter order.
    let pre_graph_program = compile_forward(&model).map_err(|e| other(e.to_string()))?;
    let pre_graph = pre_graph_program.graph();
    let ck_path = args.from.join("checkpoint.safetensors");
    let ck = checkpoint::load(&ck_path, pre_graph).map_err(|e| other(e.to_string()))?;

    // The policy-gradient graph at (questions × group) rows of the longest prompt plus
    // completion.
    let longest_prompt = training_problems()
        .iter()
        .chain(heldout_problems().iter())
        .map(|p| rl::prompt(p).len())
        .max()
        .unwrap_or(1);
    let window = longest_prompt + cfg.max_completion as usize - 1;
    if window as u64 > model.max_positions {
        return Err(other(format!(
            "prompts of up to {longest_prompt} tokens plus rl.max_completion = {} need {window} \
             positions, but model.max_positions is {}; lower rl.max_completion",
            cfg.max_completion, model.max_positions
        )));
    }
    let rows = (cfg.questions * cfg.group) as usize;
    let mut pg_model = model.clone();
    pg_model.train.batch = rows as u64;
    pg_model.train.seq_len = window as u64;
    let compiled = compile_policy(&pg_model).map_err(|e| other(e.to_string()))?;
    let forward = compiled.forward.graph();
    let params = by_name(pre_graph, &ck.params, forward)?;
    let mut reference = params.clone();

    let mut config = TrainConfig::of(compiled.train.settings(), steps, seed);
    config.lr = cfg.lr;
    config.min_lr = cfg.lr;
    config.warmup = 0;
    config.cosine = false;
    let mut trainer = Trainer::new(&compiled.train, config, params);
    let fwd_exec = {
        let logits = forward.output("logits").expect("lowering names the logits");
        Executor::new(&compiled.forward, &[logits])
    };
    let grpo = GrpoConfig {
        clip_eps: cfg.clip,
        beta: cfg.kl,
    };
    let weights = RewardWeights {
        accuracy: cfg.accuracy_weight,
        format: cfg.format_weight,
    };
    // An f32 cache, so that the log-probabilities of generation are those of the training
    // forward pass (to about 1e-6; a bf16 cache would show up as KL to the reference).
    let cache = model::Format::Fp32;
    let vocab = model.vocab as usize;
    let pool = training_problems();
    let heldout: Vec<Problem> = {
        let all = heldout_problems();
        let stride = (all.len() / args.eval_problems.max(1)).max(1);
        all.into_iter()
            .step_by(stride)
            .take(args.eval_problems)
            .collect()
    };

    fsutil::create_dir(&out_dir)?;
    let mut metrics = fsutil::create_file(&out_dir.join("metrics.jsonl"))?;
    eprintln!(
        "GRPO on {} ({spec_name}) from {}: {steps} steps of {} questions × {} completions (≤ {} \
         tokens), lr {:e}, clip {}, kl {}",
        model.name,
        args.from.display(),
        cfg.questions,
        cfg.group,
        cfg.max_completion,
        cfg.lr,
        cfg.clip,
        cfg.kl
    );
    // Decode Programs for the sampled groups and for the held-out set, with caches for the
    // longest prompt and completion.
    let capacity = (window as u64 + 1).min(model.max_positions);
    let decode = |rows: usize| {
        compile_decode(&pg_model, rows.max(1) as u64, capacity).map_err(|e| other(e.to_string()))
    };
    let (sample_program, eval_program) = (decode(rows)?, decode(heldout.len())?);
    let decoder_of = |params: &[Vec<f32>]| -> Result<f64, Failure> {
        let d = Decoder::new(&eval_program, forward, params).map_err(|e| other(e.to_string()))?;
        accuracy(&d, &heldout, &cfg, cache)
    };
    let started = Instant::now();
    let before = decoder_of(trainer.params().map_err(|e| other(e.to_string()))?)?;
    eprintln!(
        "held-out accuracy before: {:.1}% of {} problems",
        100.0 * before,
        heldout.len()
    );

    let mut rng = Rng::with_stream(seed, 0x726c);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = String::new();
    for step in 1..=steps {
        // Sample questions and their completions.
        let questions: Vec<&Problem> = (0..cfg.questions)
            .map(|_| &pool[rng.below(pool.len() as u64) as usize])
            .collect();
        let prompts: Vec<Vec<u32>> = questions
            .iter()
            .flat_map(|q| std::iter::repeat_n(bytes(&rl::prompt(q)), cfg.group as usize))
            .collect();
        let sampling = Sampling {
            temperature: cfg.temperature,
            top_k: cfg.top_k as usize,
            top_p: 1.0,
            max_tokens: cfg.max_completion as usize,
            stop: stops(&cfg),
            seed: seed.wrapping_mul(1_000_003).wrapping_add(step),
        };
        let decoder = Decoder::new(
            &sample_program,
            forward,
            trainer.params().map_err(|e| other(e.to_string()))?,
        )
        .map_err(|e| other(e.to_string()))?;
        let sampled =
            generate(&decoder, &prompts, &sampling, cache).map_err(|e| other(e.to_string()))?;
        let rows: Vec<Row> = prompts
            .into_iter()
            .zip(sampled)
            .enumerate()
            .map(|(i, (prompt, completion))| {
                let q = questions[i / cfg.group as usize];
                let reward = rl::score(&text(&completion), q.answer(), answer_format(&cfg));
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
        // A batch whose groups all have equal rewards carries no policy-gradient signal, and
        // its only gradient (the KL term, about zero while the policy is near the reference)
        // would still move every weight a full step under AdamW's normalization: skip it.
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
                logprobs(
                    &fwd_exec,
                    forward,
                    trainer.params().map_err(|e| other(e.to_string()))?,
                    &batch,
                    &positions,
                    vocab,
                )?
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
                .map_err(|e| other(e.to_string()))?;
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
            reference = trainer.params().map_err(|e| other(e.to_string()))?.to_vec();
        }
        let (reward_mean, reward_std) = mean_std(&rewards);
        let acc: Vec<f64> = rows.iter().map(|r| r.reward.accuracy).collect();
        let accuracy_mean = acc.iter().sum::<f64>() / acc.len().max(1) as f64;
        let length = rows
            .iter()
            .map(|r| r.completion.tokens.len() as f64)
            .sum::<f64>()
            / rows.len().max(1) as f64;
        let line = serde_json::json!({
            "step": step, "reward_mean": reward_mean, "reward_std": reward_std,
            "accuracy": accuracy_mean, "kl": stats.kl_mean, "clip_fraction": stats.clip_fraction,
            "completion_length": length, "loss": loss, "updates": updates,
        });
        writeln!(metrics, "{line}").map_err(|e| other(format!("cannot write metrics: {e}")))?;
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / step as f64 * (steps - step) as f64;
        last_line = format!(
            "step {step}/{steps}  reward {reward_mean:.3} ± {reward_std:.3}  accuracy {:.1}%  kl {:.4}  \
             clip {:.3}  length {length:.1}  ETA {eta:.0}s",
            100.0 * accuracy_mean,
            stats.kl_mean,
            stats.clip_fraction
        );
        if tty {
            eprint!("\r{last_line}   ");
        } else if step % 10 == 0 || step == steps {
            eprintln!("{last_line}");
        }
    }
    if tty {
        eprintln!();
    }
    let after = decoder_of(trainer.params().map_err(|e| other(e.to_string()))?)?;
    let seconds = started.elapsed().as_secs_f64();

    // The run directory: the whole model (MTP modules unchanged), loadable by `kiln sample`.
    let mut full_params = ck.params.clone();
    for (i, (_, p)) in pre_graph.params.iter().enumerate() {
        if let Some(j) = forward.params.iter().position(|(_, q)| q.name == p.name) {
            full_params[i] = trainer.params().map_err(|e| other(e.to_string()))?[j].clone();
        }
    }
    let spec_bytes = std::fs::read(&spec_path)
        .map_err(|e| other(format!("cannot read {}: {e}", spec_path.display())))?;
    fsutil::write_atomic(&out_dir.join("spec.toml"), &spec_bytes)
        .map_err(|e| other(format!("cannot write the run's spec copy: {e}")))?;
    let zeros: Vec<Vec<f32>> = full_params.iter().map(|p| vec![0.0; p.len()]).collect();
    checkpoint::save(
        &out_dir.join("checkpoint.safetensors"),
        pre_graph,
        &checkpoint::Checkpoint {
            step: 0,
            params: full_params,
            m: zeros.clone(),
            v: zeros,
            data_rng: [seed, 0],
            spec_hash: checkpoint::spec_hash(&spec_bytes),
        },
    )
    .map_err(|e| other(e.to_string()))?;
    let summary = serde_json::json!({
        "spec": spec_name, "from": args.from.display().to_string(), "steps": steps,
        "questions": cfg.questions, "group": cfg.group, "max_completion": cfg.max_completion,
        "lr": cfg.lr, "clip": cfg.clip, "kl": cfg.kl, "updates": cfg.updates, "seed": seed,
        "heldout_problems": heldout.len(),
        "heldout_accuracy_before": before, "heldout_accuracy_after": after,
        "seconds": seconds,
    });
    fsutil::write_atomic(
        &out_dir.join("summary.json"),
        format!("{summary:#}\n").as_bytes(),
    )
    .map_err(|e| other(format!("cannot write summary.json: {e}")))?;
    crate::output::out(&format!(
        "GRPO: {steps} steps in {seconds:.0} s; held-out accuracy {:.1}% → {:.1}% ({} problems)\n\
         last step: {last_line}\nrun: {} (metrics.jsonl, summary.json, checkpoint.safetensors, spec.toml)\n",
        100.0 * before,
        100.0 * after,
        heldout.len(),
        out_dir.display()
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
