//! `kiln rl` as a user runs it: GRPO from a pretrained micro run writes its metrics, summary
//! and a run directory `kiln sample` reads; bad `[rl]` settings are refused.

mod common;

use common::{kiln, scratch, text};

fn micro_with(dir: &std::path::Path, rl: &str) -> String {
    common::micro_with(dir, "micro-rl.toml", &format!("[rl]\n{rl}"))
}

/// `kiln train SPEC --steps N` into `dir/pre`.
fn pretrain(spec: &str, dir: &std::path::Path, steps: u32) -> std::path::PathBuf {
    let pre = dir.join("pre");
    let steps = steps.to_string();
    let o = kiln(&[
        "train",
        spec,
        "--steps",
        &steps,
        "--out",
        pre.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    pre
}

#[test]
fn grpo_from_a_pretrained_run_writes_metrics_a_summary_and_a_run() {
    let dir = scratch("rl", "run");
    let spec = micro_with(
        &dir,
        "group = 4\nquestions = 2\nmax_completion = 4\nupdates = 2\nref_reset = 2\n",
    );
    let pre = pretrain(&spec, &dir, 10);
    let out = dir.join("rl");
    let o = kiln(&[
        "rl",
        "--from",
        pre.to_str().unwrap(),
        "--steps",
        "3",
        "--eval-problems",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("held-out accuracy"),
        "{}",
        text(&o.stdout)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in ["heldout_accuracy_before", "heldout_accuracy_after"] {
        let a = summary[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{key} = {a}");
    }
    assert_eq!(summary["heldout_problems"], 16);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for key in [
        "reward_mean",
        "reward_std",
        "accuracy",
        "kl",
        "clip_fraction",
        "completion_length",
    ] {
        assert!(rows[0][key].is_f64(), "metrics lack {key}: {}", rows[0]);
    }
    // On-policy first step: the generation's log-probabilities are the forward pass's, so the
    // KL to the reference (the same weights) is zero up to rounding.
    assert!(rows[0]["kl"].as_f64().unwrap() < 1e-6, "{}", rows[0]);
    let o = kiln(&["sample", out.to_str().unwrap(), "--max-tokens", "5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn bad_rl_settings_are_refused() {
    let dir = scratch("rl", "bad");
    let spec = micro_with(&dir, "group = 1\nclip = 1.5\n");
    let o = kiln(&["check", &spec]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("rl.group") || err.contains("`group`"), "{err}");
    assert!(err.contains("clip"), "{err}");
    // Within the checker's bounds but too long for the prompts of the task: refused by `kiln
    // rl` before anything is written.
    let spec = micro_with(&dir, "max_completion = 25\n");
    let pre = pretrain(&spec, &dir, 1);
    let out = dir.join("rl");
    let o = kiln(&[
        "rl",
        "--from",
        pre.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("lower rl.max_completion"),
        "{}",
        text(&o.stderr)
    );
    assert!(!out.exists());
}
