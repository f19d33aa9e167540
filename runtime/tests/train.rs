//! The trainer refuses to apply a non-finite step, and its schedule follows the spec.

use kiln_compiler::autodiff::differentiate;
use kiln_compiler::check::check_str;
use kiln_compiler::lower::lower;
use kiln_compiler::program::{Program, Settings};
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batcher};
use kiln_runtime::train::{init_params, max_token_offset, TrainConfig, Trainer};

const SPEC: &str = include_str!("../../tests/specs/micro.toml");

fn config() -> TrainConfig {
    TrainConfig {
        steps: 100,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        warmup: 10,
        cosine: true,
        min_lr: 1e-4,
        grad_clip: Some(1.0),
        bias_update: 0.001,
        seed: 0,
        emulate: None,
    }
}

#[test]
fn a_non_finite_step_changes_nothing() {
    let model = check_str(SPEC).unwrap();
    let fwd = lower(&model).unwrap();
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let window = t + max_token_offset(&fwd) as usize - 1;
    let tokens: Vec<u32> = byte_tokens(&builtin_corpus(0, 1 << 16))
        .into_iter()
        .map(|x| x % 128)
        .collect();
    let mut batcher = Batcher::new(tokens, b, window, 0).unwrap();
    let mut params = init_params(&fwd, 0);
    // The first norm weight: every token reads it.
    params[1][0] = f32::NAN;
    let full = Program::new(full, Settings::of(&model)).unwrap();
    let mut trainer = Trainer::new(&full, config(), params.clone());
    let s = trainer.step(&batcher.next_batch(), t).unwrap();
    assert!(s.skipped, "a NaN parameter gives a NaN loss: {s:?}");
    assert_eq!(trainer.step, 0, "a skipped step is not counted");
    let unchanged = trainer
        .params()
        .unwrap()
        .iter()
        .zip(&params)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(unchanged, "a skipped step updates nothing");
}

#[test]
fn the_schedule_warms_up_then_decays_to_min_lr() {
    let c = config();
    assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
    assert!(c.lr_at(55) < 1e-3 && c.lr_at(55) > 1e-4);
    let constant = TrainConfig { cosine: false, ..c };
    assert_eq!(constant.lr_at(80), 1e-3);
}

/// docs/spec.md: warmup reaches `lr` at its last step, and the cosine reaches `min_lr` at the
/// run's last step. (Steps are 0-based here: step 9 is the 10th.)
#[test]
fn the_peak_is_one_step_and_min_lr_is_the_last_steps_rate() {
    let c = TrainConfig {
        min_lr: 2e-4,
        ..config()
    };
    let peak = c.lr_at(9);
    assert!((peak - 1e-3).abs() < 1e-15, "{peak}");
    assert!(c.lr_at(10) < peak, "steps 10 and 11 both at the peak");
    let last = c.lr_at(99);
    assert!((last - 2e-4).abs() < 1e-15, "last step's rate {last}");
    // Strictly decreasing from the peak to the last step.
    assert!((9..99).all(|s| c.lr_at(s + 1) < c.lr_at(s)));
    // Without warmup the first step is the peak.
    let cold = TrainConfig {
        warmup: 0,
        ..c.clone()
    };
    assert_eq!(cold.lr_at(0), 1e-3);
    assert!((cold.lr_at(99) - 2e-4).abs() < 1e-15);
    // A run of one step, or all warmup, never divides by zero.
    let one = TrainConfig {
        steps: 1,
        warmup: 0,
        ..c.clone()
    };
    assert_eq!(one.lr_at(0), 1e-3);
    let all_warm = TrainConfig { steps: 10, ..c };
    assert!((all_warm.lr_at(9) - 1e-3).abs() < 1e-15);
}

/// `--steps` shorter than the warmup ends the run inside the warmup; it does not squeeze it.
#[test]
fn fewer_steps_than_the_warmup_keep_the_warmup() {
    let model = check_str(SPEC).unwrap();
    let mut settings = Settings::of(&model);
    settings.schedule.warmup = 10;
    let c = TrainConfig::of(&settings, 5, 0);
    assert_eq!(c.warmup, 10);
    assert!((c.lr_at(4) - settings.optimizer.lr * 0.5).abs() < 1e-15);
}
