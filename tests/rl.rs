//! `kiln rl` as a user runs it: GRPO from a pretrained micro run writes its curves, plot, summary
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
fn grpo_from_a_pretrained_run_writes_curves_a_plot_a_summary_and_a_run() {
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
        "--control",
        "pretrain",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("control (continued pretraining"),
        "{}",
        text(&o.stdout)
    );
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
    // The control spent GRPO's time on pretraining from the same start, and is a run.
    let control = &summary["control"];
    assert_eq!(control["kind"], "pretrain", "{summary}");
    assert!(control["steps"].as_u64().unwrap() >= 1, "{control}");
    let after = control["heldout_accuracy_after"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&after), "{control}");
    let o = kiln(&[
        "sample",
        out.join("control").to_str().unwrap(),
        "--max-tokens",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let rows = curves(&out);
    assert_eq!(rows.len(), 3);
    for key in [
        "reward_mean",
        "reward_std",
        "accuracy",
        "kl",
        "clip_fraction",
        "completion_length",
        "seconds",
    ] {
        assert!(rows[0][key].is_f64(), "curves lack {key}: {}", rows[0]);
    }
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    for panel in [
        "reward and training accuracy",
        "KL",
        "clip fraction",
        "completion length",
    ] {
        assert!(svg.contains(panel), "plot.svg lacks {panel}");
    }
    // On-policy first step: the generation's log-probabilities are the forward pass's, so the
    // KL to the reference (the same weights) is zero up to rounding.
    assert!(rows[0]["kl"].as_f64().unwrap() < 1e-6, "{}", rows[0]);
    let o = kiln(&["sample", out.to_str().unwrap(), "--max-tokens", "5"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

/// `curves.jsonl` of a run directory, one JSON object per step.
fn curves(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("curves.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The curves without their wall-clock times.
fn timeless(mut rows: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    for row in &mut rows {
        row.as_object_mut().unwrap().remove("seconds");
    }
    rows
}

#[test]
fn seeds_run_apart_and_each_seeded_run_is_reproducible() {
    let dir = scratch("rl", "seeds");
    let spec = micro_with(
        &dir,
        "group = 4\nquestions = 2\nmax_completion = 4\nlr = 1e-3\n",
    );
    let pre = pretrain(&spec, &dir, 10);
    let grpo = |out: &std::path::Path, seed: &str, seeds: &str| {
        let o = kiln(&[
            "rl",
            "--from",
            pre.to_str().unwrap(),
            "--steps",
            "3",
            "--eval-problems",
            "8",
            "--seed",
            seed,
            "--seeds",
            seeds,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(out.join("summary.json")).unwrap(),
        )
        .unwrap()
    };
    let both = dir.join("both");
    let summary = grpo(&both, "5", "2");
    let seeds = summary["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    let before = summary["heldout_accuracy_before"].as_f64().unwrap();
    let mut gains = Vec::new();
    for (s, want) in seeds.iter().zip([5, 6]) {
        assert_eq!(s["seed"], want);
        let after = s["heldout_accuracy_after"].as_f64().unwrap();
        let gain = s["gain"].as_f64().unwrap();
        assert!((gain - (after - before)).abs() < 1e-12, "{s}");
        gains.push(gain);
        assert_eq!(curves(&both.join(format!("seed-{want}"))).len(), 3);
    }
    let mean = (gains[0] + gains[1]) / 2.0;
    assert!(
        (summary["gain"].as_f64().unwrap() - mean).abs() < 1e-12,
        "{summary}"
    );
    // The standard error of two values is half their distance.
    let se = (gains[0] - gains[1]).abs() / 2.0;
    assert!(
        (summary["gain_stderr"].as_f64().unwrap() - se).abs() < 1e-12,
        "{summary}"
    );
    assert!(std::fs::read_to_string(both.join("plot.svg"))
        .unwrap()
        .contains("seed 6"));
    // A seeded run is reproducible, alone or as one of several.
    let alone = dir.join("alone");
    let summary = grpo(&alone, "6", "1");
    assert!(summary["gain_stderr"].is_null(), "{summary}");
    assert_eq!(
        timeless(curves(&alone)),
        timeless(curves(&both.join("seed-6")))
    );
    assert_eq!(
        summary["heldout_accuracy_after"],
        seeds[1]["heldout_accuracy_after"]
    );
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

#[test]
fn the_brackets_task_runs_through_the_same_interface() {
    let dir = scratch("rl", "brackets");
    let spec = micro_with(&dir, "group = 4\nquestions = 2\nmax_completion = 6\n");
    let pre = pretrain(&spec, &dir, 5);
    let out = dir.join("rl");
    let o = kiln(&[
        "rl",
        "--from",
        pre.to_str().unwrap(),
        "--task",
        "brackets",
        "--steps",
        "2",
        "--eval-problems",
        "12",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("the brackets task"),
        "{}",
        text(&o.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["task"], "brackets", "{summary}");
    assert_eq!(summary["heldout_problems"], 12, "{summary}");
    assert_eq!(curves(&out).len(), 2);
    // The tagged answer format is arithmetic's alone: refused before anything is written.
    let tagged = micro_with(&dir, "answer = \"tagged\"\nmax_completion = 6\n");
    let refused = dir.join("tagged");
    let o = kiln(&[
        "rl",
        &tagged,
        "--from",
        pre.to_str().unwrap(),
        "--task",
        "brackets",
        "--out",
        refused.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("rl.answer"), "{}", text(&o.stderr));
    assert!(!refused.exists());
}
