//! The `kiln` binary as a user runs it: exit codes, JSON keys, the default spec, `diff`.

mod common;

use std::path::Path;
use std::process::Output;

use common::kiln;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_without_a_spec_uses_the_built_in_tiny() {
    let o = kiln(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("tiny — 4 layers"), "{}", stdout(&o));
}

#[test]
fn check_json_has_the_documented_keys() {
    let o = kiln(&["check", "specs/deepseek-v3.toml", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["params"]["total"], 671_026_404_352u64);
    assert_eq!(v["params"]["active"], 37_552_282_624u64);
    assert_eq!(v["params"]["mtp"], 11_610_067_968u64);
    assert_eq!(v["kv_cache"]["elements_per_token"], 35_136);
    assert_eq!(v["kv_cache"]["bytes_per_token"], 70_272);
    for key in ["forward_per_token", "train_per_token"] {
        assert!(v["flops"][key].as_u64().unwrap() > 0, "flops.{key}");
    }
    for c in [
        "embedding",
        "attention",
        "dense_ffn",
        "routed_experts",
        "shared_experts",
        "router",
        "norms",
        "head",
    ] {
        assert!(
            v["params"]["by_component"][c].is_u64(),
            "params.by_component.{c}"
        );
    }
    for part in [
        "weights",
        "master",
        "grads",
        "moments",
        "scales",
        "activations",
        "total",
    ] {
        assert!(
            v["memory"][format!("{part}_bytes")].is_u64(),
            "memory.{part}_bytes"
        );
    }
}

/// specs/tiny.toml with each `(from, to)` replaced, written to `bad.toml` in a fresh
/// directory named `tag` and the process id; returns the directory and the spec.
fn tiny_with(tag: &str, edits: &[(&str, &str)]) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("{tag}{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("bad.toml");
    let mut text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/tiny.toml"))
            .unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "specs/tiny.toml has no `{from}`");
        text = text.replace(from, to);
    }
    std::fs::write(&spec, text).unwrap();
    (dir, spec)
}

#[test]
fn an_invalid_spec_exits_2_with_every_error() {
    let (dir, spec) = tiny_with(
        "kiln-cli-",
        &[
            ("kv_rank = 64", "kv_rnak = 64"),
            ("score = \"sigmoid\"", "score = \"sigmod\""),
            ("groups_kept = 1", "groups_kept = 3"),
        ],
    );
    let o = kiln(&["check", spec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("did you mean `kv_rank`?"), "{err}");
    assert!(err.contains("did you mean `sigmoid`?"), "{err}");
    assert!(
        err.contains("`moe.groups_kept` (3) cannot exceed `moe.groups` (2)"),
        "{err}"
    );
    assert!(err.contains("3 errors in"), "{err}");

    let o = kiln(&["check", spec.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3);
    assert_eq!(errors[0]["rule"], "unknown-key");
    assert_eq!(errors[0]["line"], 20);
    assert_eq!(errors[0]["col"], 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn check_suggests_the_fix_for_quoted_numbers_and_counts_before_items() {
    let (dir, spec) = tiny_with(
        "kiln-cli-fix-",
        &[
            ("top_k = 2", "top_k = \"2\""),
            ("layers = \"dense, moe*3\"", "layers = \"dense, 3*moe\""),
        ],
    );
    let o = kiln(&["check", spec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("remove the quotes: `top_k = 2`"), "{err}");
    assert!(
        err.contains("the count goes after the item: `moe*3`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn usage_errors_exit_2_and_io_errors_exit_1() {
    assert_eq!(kiln(&["check", "--frobnicate"]).status.code(), Some(2));
    assert_eq!(kiln(&["frobnicate"]).status.code(), Some(2));
    let o = kiln(&["check", "specs/does-not-exist.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read specs/does-not-exist.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn diff_reports_what_an_ablation_changes() {
    let o = kiln(&[
        "diff",
        "specs/deepseek-v2.toml",
        "specs/deepseek-v2-lite.toml",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("model.d_model"), "{out}");
    assert!(out.contains("5120 → 2048"), "{out}");
    assert!(out.contains("params.total"), "{out}");

    // Keys only B has stay in their section: YaRN under attention, FP8 under precision.
    let o = kiln(&["diff", "specs/tiny.toml", "specs/deepseek-v3.toml"]);
    let out = stdout(&o);
    let at = |key: &str| out.find(key).unwrap_or_else(|| panic!("no {key}:\n{out}"));
    assert!(at("attention.rope.yarn.factor") < at("ffn.hidden"), "{out}");
    assert!(at("precision.keep") < at("train.batch"), "{out}");

    let o = kiln(&["diff", "specs/tiny.toml", "specs/tiny.toml", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec_changes"].as_array().unwrap().len(), 0);
    assert_eq!(v["metric_changes"].as_array().unwrap().len(), 0);
}

#[test]
fn help_explains_the_commands() {
    let o = kiln(&["--help"]);
    let out = stdout(&o);
    for word in ["check", "diff", "docs/spec.md", "Exit codes"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
}

#[test]
fn emit_ir_prints_the_verified_forward_graph() {
    let o = kiln(&["emit", "ir"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("graph tiny (batch 8 × seq_len 128)\nparams\n"),
        "{out}"
    );
    assert!(out.contains("= attention[causal, scale="), "{out}");
    assert!(
        out.lines().last().unwrap().starts_with("  loss = %"),
        "{out}"
    );
    let o = kiln(&["emit", "ir", "specs/does-not-exist.toml"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn train_lowers_the_loss_on_the_builtin_corpus() {
    let dir = std::env::temp_dir().join(format!("kiln-train-{}", std::process::id()));
    let o = kiln(&[
        "train",
        "tests/specs/micro.toml",
        "--out",
        dir.to_str().unwrap(),
        "--eval-every",
        "20",
        "--eval-batches",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 40);
    let first = rows[0]["main_loss"].as_f64().unwrap();
    let last = rows[39]["main_loss"].as_f64().unwrap();
    let val = rows[39]["val_loss"].as_f64().unwrap();
    assert!(
        (first - 128f64.ln()).abs() < 0.5,
        "initial loss {first} should be near ln 128"
    );
    assert!(last < first - 1.0, "loss went from {first} to {last}");
    assert!(
        val < first - 1.0,
        "validation loss {val} vs initial {first}"
    );
    for key in ["step", "loss", "lr", "tokens_per_s", "grad_norm"] {
        assert!(rows[5].get(key).is_some(), "metrics lack {key}");
    }
    assert!(
        stdout(&o).contains("trained micro to step 40 of 40"),
        "{}",
        stdout(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn losses(dir: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

#[test]
fn resume_continues_bit_identically_and_damaged_checkpoints_are_refused() {
    let base = std::env::temp_dir().join(format!("kiln-resume-{}", std::process::id()));
    let (whole, split) = (base.join("whole"), base.join("split"));
    let spec = "tests/specs/micro.toml";
    let o = kiln(&[
        "train",
        spec,
        "--steps",
        "40",
        "--out",
        whole.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = kiln(&[
        "train",
        spec,
        "--steps",
        "40",
        "--stop-after",
        "20",
        "--out",
        split.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = kiln(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "40",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("resuming micro at step 20"),
        "{}",
        stderr(&o)
    );
    let (a, b) = (losses(&whole), losses(&split));
    assert_eq!(a.len(), 40);
    assert_eq!(
        a, b,
        "20 steps + resume + 20 steps must equal 40 steps exactly"
    );

    // A truncated checkpoint is refused with a clear message, not a panic.
    let ck = split.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let o = kiln(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "50",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is damaged or not a kiln checkpoint"),
        "{}",
        stderr(&o)
    );
    // Garbage is refused the same way.
    std::fs::write(&ck, b"not a checkpoint at all").unwrap();
    let o = kiln(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "50",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is damaged or not a kiln checkpoint"),
        "{}",
        stderr(&o)
    );
    // A checkpoint of another spec is refused by its hash.
    let other = std::fs::read_to_string(spec)
        .unwrap()
        .replace("lr = 3e-3", "lr = 2e-3");
    std::fs::write(whole.join("spec.toml"), other).unwrap();
    let o = kiln(&[
        "train",
        "--resume",
        whole.to_str().unwrap(),
        "--steps",
        "50",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("was written for another spec"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn sample_and_bench_run_on_a_trained_micro_model() {
    let dir = std::env::temp_dir().join(format!("kiln-sample-{}", std::process::id()));
    let o = kiln(&[
        "train",
        "tests/specs/micro.toml",
        "--steps",
        "5",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = kiln(&[
        "sample",
        dir.to_str().unwrap(),
        "--prompt",
        "Q: 1+1=? A:",
        "--max-tokens",
        "12",
        "--seed",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("Q: 1+1=? A:"), "{text}");
    assert!(text.trim_end().len() >= "Q: 1+1=? A:".len(), "{text}");
    // Greedy sampling is deterministic.
    let greedy = |_: ()| {
        stdout(&kiln(&[
            "sample",
            dir.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ]))
    };
    assert_eq!(greedy(()), greedy(()));
    // A run directory without a checkpoint is a clear error.
    let o = kiln(&["sample", "tests", "--max-tokens", "1"]);
    assert_eq!(o.status.code(), Some(1));

    let o = kiln(&["bench", "tests/specs/micro.toml", "--steps", "2", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for key in [
        "tokens_per_s",
        "achieved_gflops",
        "gemm_gflops",
        "fraction_of_gemm",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    // Other shapes than the spec's (micro: batch 4 × 32, 32 positions).
    let o = kiln(&[
        "bench",
        "tests/specs/micro.toml",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "16",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["batch"].as_u64(), v["seq_len"].as_u64()),
        (Some(2), Some(16))
    );
    let o = kiln(&["bench", "tests/specs/micro.toml", "--seq", "33"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("32 positions"), "{}", stderr(&o));
    // Generation: longer than the model's 32 positions slides the window; stop strings end
    // the text.
    let o = kiln(&[
        "sample",
        dir.to_str().unwrap(),
        "--max-tokens",
        "80",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // micro's vocabulary is ASCII, so one character per token (the trailing newline aside).
    let text = stdout(&o);
    assert_eq!(text.chars().count() - 1, 80, "{text}");
    let o = kiln(&["bench", "tests/specs/micro.toml", "--generate", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(
        v["cache_bytes_per_token"], v["analyzer_bytes_per_token"],
        "{v}"
    );
    // The heap counter sees at least the parameters, gradients and moments a step holds.
    let o = kiln(&[
        "bench",
        "tests/specs/micro.toml",
        "--memory",
        "--steps",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let measured = v["measured_peak_bytes"].as_f64().unwrap();
    let state = v["state_bytes"].as_f64().unwrap();
    assert!(measured > state && state > 0.0, "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_emulated_step_of_tiny_holds_what_the_analyzer_reports_for_its_fp8_policy() {
    // The built-in tiny: moments in bf16, kept activations in bf16 or FP8 tiles, as
    // `kiln check` reports them.
    let o = kiln(&[
        "bench",
        "--memory",
        "--emulate-precision",
        "--steps",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["emulated"], true, "{v}");
    let ratio = v["measured_over_analyzer"].as_f64().unwrap();
    assert!((0.85..=1.15).contains(&ratio), "{v}");
    assert!(v["kept_fp8_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["kept_scale_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["scales_bytes"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn build_refuses_an_invalid_spec_or_a_wrong_source_tree_before_writing_anything() {
    let out = std::env::temp_dir().join(format!("kiln-build-refused-{}", std::process::id()));
    let out_s = out.to_str().unwrap();
    let o = kiln(&[
        "build",
        "tests/invalid/04-unknown-key-kv-rnak.toml",
        "-o",
        out_s,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did you mean `kv_rank`?"),
        "{}",
        stderr(&o)
    );
    let o = kiln(&[
        "build",
        "tests/specs/micro.toml",
        "-o",
        out_s,
        "--kiln-source",
        "tests",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("does not look like kiln's source tree"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "nothing is written before the checks pass");
}

/// `kiln emit cuda --out DIR` writes the unit, its headers and a manifest whose FP8 copies are
/// the emitter's, and says what it wrote; a second run into the same directory is refused.
#[test]
fn emit_cuda_writes_the_unit_headers_and_manifest() {
    let dir = common::scratch("cli", "emit-cuda").join("out");
    let out = kiln(&["emit", "cuda", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let said = common::text(&out.stderr);
    assert!(
        said.contains("tiny.cu (62 kernels)")
            && said.contains("517 launches")
            && said.contains("99 FP8 copies, 42 of them fused into their producers"),
        "{said}"
    );
    for (name, _) in kiln_compiler::emit_cuda::HEADERS {
        assert!(dir.join(name).is_file(), "{name} written");
    }
    let unit = std::fs::read_to_string(dir.join("tiny.cu")).unwrap();
    assert!(unit.contains("#include \"kiln_fp8.cuh\""));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let copies = manifest["fp8_copies"].as_array().unwrap();
    assert_eq!(copies.len(), 99);
    let fused = copies.iter().filter(|c| c["fused"] == true).count();
    assert_eq!(fused, 42);
    let again = kiln(&["emit", "cuda", "--out", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(common::text(&again.stderr).contains("exists and is not empty"));
}

/// `--device cuda` without a driver exits 1 saying what is missing; a run started on the
/// emulated device resumes on the CPU and ends where a CPU-only run does.
#[test]
fn devices_fail_clearly_and_a_run_moves_between_them() {
    let base = common::scratch("cli", "devices");
    let o = kiln(&[
        "train",
        "--device",
        "cuda",
        "--steps",
        "1",
        "--out",
        base.join("cuda").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--device cuda: ") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );
    // An fp32 policy: the plan's GEMMs then compute what the interpreter does.
    let spec = common::micro_with(
        &base,
        "micro-fp32.toml",
        "[precision]\ncompute = \"fp32\"\n",
    );
    let (cpu, moved) = (base.join("cpu"), base.join("moved"));
    let train = |extra: &[&str], out: &Path| {
        let mut args = vec!["train", spec.as_str(), "--steps", "4", "--eval-every", "2"];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    };
    train(&[], &cpu);
    train(&["--device", "cuda-emulated", "--stop-after", "2"], &moved);
    let o = kiln(&["train", "--resume", moved.to_str().unwrap(), "--steps", "4"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (a, b) = (losses(&cpu), losses(&moved));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {step}: {y} after moving devices, {x} on the CPU alone"
        );
    } // `kiln verify`: every value of a step against the interpreter, with a verdict.
    let o = kiln(&["verify", spec.as_str(), "--show", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = common::text(&o.stdout);
    assert!(
        out.contains("buffers poisoned with NaN")
            && out.contains("tolerance 1.0e-5 relative L2 (narrowest format fp32)")
            && out.contains("all within tolerance"),
        "{out}"
    );
    let o = kiln(&["verify", spec.as_str(), "--tolerance", "1e-12", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["passed"], false);
    assert!(report["failed"].as_u64().unwrap() > 0, "{report}");
    assert!(stderr(&o).contains("differ from the interpreter by more than 1.0e-12"));
    let o = kiln(&["verify", spec.as_str(), "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("checks a device against the interpreter"));
}

#[test]
fn check_reports_a_parallel_layout_per_device() {
    // DeepSeek-V3's spec carries the report's own layout: it fits an 80 GB H800.
    let o = kiln(&["check", "specs/deepseek-v3.toml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "per device: dp 2 × ep 64 × pp 16 = 2,048 GPUs of h800 × 2,048",
        "schedule dualpipe, ZeRO-1, 120 micro-batches of 1 sequence per data rank",
        "activations (17 micro-batches in flight)",
        "fits:",
        "node-limited routing: 3.15 other nodes per token",
        "pipeline bubble (PP/2-1)(F&B+B-3W)",
    ] {
        assert!(out.contains(want), "lacks `{want}`:\n{out}");
    }
    // The JSON carries the same figures.
    let o = kiln(&["check", "specs/deepseek-v3.toml", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = &v["per_device"];
    assert_eq!(d["layout"]["world"], 2048);
    assert_eq!(d["fits"], true);
    assert!(d["memory"]["total_bytes"].as_u64().unwrap() < 80_000_000_000);
    assert!(d["comm"]["ep_dispatch"]["ib_bytes"].as_u64().unwrap() > 0);

    // `--parallel` overrides the spec's layout; 1F1B with the same degrees needs less memory
    // for parameters (one stage per device) and idles longer.
    let o = kiln(&[
        "check",
        "specs/deepseek-v3.toml",
        "--json",
        "--parallel",
        "schedule=1f1b",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &w["per_device"];
    assert_eq!(e["layout"]["schedule"], "1f1b");
    let bubble = |x: &serde_json::Value| x["time"]["bubble_s"].as_f64().unwrap();
    assert!(bubble(e) > bubble(d));

    // A spec without [parallel] gets a per-device report when a cluster is named.
    let o = kiln(&["check", "--cluster", "h100"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("= 1 GPUs of h100 × 1"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&kiln(&["check"])).contains("per device"));
}

#[test]
fn bad_layouts_and_clusters_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--parallel", "ep=3"],
            "`ep = 3` does not divide the 8 routed experts",
        ),
        (
            &["--parallel", "dp=3"],
            "do not split over dp · ep = 3 data ranks",
        ),
        (
            &["--parallel", "tp=2"],
            "tensor parallelism is not supported",
        ),
        (&["--parallel", "dp"], "`dp` is not `key=value`"),
        (&["--parallel", "zero=2"], "`zero` must be 0 or 1"),
        (
            &["--parallel", "recompute=norms"],
            "`recompute` takes `none`",
        ),
        (
            &["--parallel", "pipeline=2"],
            "unknown layout key `pipeline`",
        ),
        (&["--cluster", "a100x8"], "neither a preset nor a file"),
        (&["--cluster", "h800x0"], "must be a positive integer"),
        (
            &["--parallel", "dp=2", "--cluster", "h800x1"],
            "needs 2 GPUs",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        let o = kiln(&all);
        assert_eq!(o.status.code(), Some(2), "{all:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{all:?}:\n{}", stderr(&o));
    }
    // A cluster file with a typo names the key.
    let (dir, _) = tiny_with("cluster", &[]);
    let file = dir.join("lab.toml");
    std::fs::write(
        &file,
        "[cluster]\nname = \"lab\"\ngpus = 4\ngpus_per_node = 4\nmemory_gib = 40\n\
         nvlink_gb_s = 300\nib_gbs = 25\nbf16_tflops = 312\nfp8_tflops = 312\n",
    )
    .unwrap();
    let o = kiln(&["check", "--cluster", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ib_gbs"), "{}", stderr(&o));
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("ib_gbs", "ib_gb_s"),
    )
    .unwrap();
    let o = kiln(&[
        "check",
        "--cluster",
        file.to_str().unwrap(),
        "--parallel",
        "dp=2,ep=2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("GPUs of lab × 4 (4 per node"),
        "{}",
        stdout(&o)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_refuses_a_layout_it_cannot_run_and_says_how_to_run_it() {
    let (dir, spec) = tiny_with("layout", &[("[train]", "[parallel]\ndp = 2\n\n[train]")]);
    let o = kiln(&["train", spec.to_str().unwrap(), "--steps", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("this layout trains on 2 processes"), "{err}");
    assert!(err.contains("scripts/mpirun -n 2 kiln train"), "{err}");
    assert!(!dir.join("runs").exists());
    // An expert-parallel layout needs its ranks, and a device that can shard the experts.
    let o = kiln(&["train", "--steps", "1", "--parallel", "dp=2,ep=2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("this layout trains on 4 processes (dp 2 × ep 2)"),
        "{}",
        stderr(&o)
    );
    let o = kiln(&[
        "train",
        "--steps",
        "1",
        "--parallel",
        "ep=2",
        "--device",
        "cuda-emulated",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expert parallelism (ep 2) runs on the interpreter"),
        "{}",
        stderr(&o)
    );
    // What the runtime does not do yet is refused, not ignored.
    let o = kiln(&["train", "--steps", "1", "--parallel", "pp=2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not built yet"), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plan_ranks_the_layouts_that_fit_and_says_why_the_rest_do_not() {
    let o = kiln(&[
        "plan",
        "specs/deepseek-v3.toml",
        "--cluster",
        "h800x2048",
        "--top",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "deepseek-v3 on h800 × 2,048",
        "fastest that fit",
        "nearest that do not fit (3 of",
        "layout rules broken",
        "over",
    ] {
        assert!(out.contains(want), "lacks `{want}`:\n{out}");
    }
    let o = kiln(&[
        "plan",
        "specs/deepseek-v3.toml",
        "--cluster",
        "h800x2048",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fits = v["fits"].as_array().unwrap();
    let steps: Vec<f64> = fits
        .iter()
        .map(|d| d["time"]["step_s"].as_f64().unwrap())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]));
    let rejected = v["rejected"].as_array().unwrap();
    assert_eq!(
        v["tried"].as_u64().unwrap() as usize,
        fits.len() + rejected.len()
    );
    assert!(rejected.iter().any(|r| r[1]["reason"] == "memory"));
    // Without a cluster there is nothing to plan for.
    assert_eq!(
        kiln(&["plan", "specs/deepseek-v3.toml"]).status.code(),
        Some(2)
    );
}

#[test]
fn diff_compares_two_layouts_per_device() {
    let (dir, spec) = tiny_with(
        "difflayout",
        &[("[train]", "[parallel]\nep = 2\ndp = 2\n\n[train]")],
    );
    let o = kiln(&["diff", "specs/tiny.toml", spec.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("parallel.ep"), "{out}");
    assert!(out.contains("per_device.memory.params"), "{out}");
    assert!(
        out.contains("per_device.comm.ep_dispatch.nvlink_bytes"),
        "{out}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_terminal_says_when_steps_reshape_the_schedule() {
    let dir = std::env::temp_dir().join(format!("kiln-sched-{}", std::process::id()));
    let spec = "tests/specs/micro.toml";
    // micro.toml warms up over 5 steps: 3 steps end inside the warmup.
    let args = |steps: &'static str| {
        vec![
            "train",
            spec,
            "--steps",
            steps,
            "--out",
            dir.to_str().unwrap(),
            "--eval-batches",
            "1",
        ]
    };
    let o = kiln(&args("3"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 steps end inside the 5-step warmup"),
        "{}",
        stderr(&o)
    );
    // The run's rates: 1/5, 2/5 and 3/5 of train.lr, unsqueezed.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lr = |i: usize| rows[i]["lr"].as_f64().unwrap();
    assert!((lr(2) / lr(0) - 3.0).abs() < 1e-9, "{rows:?}");
    // Resuming the finished 3-step run for 8 steps reshapes its schedule: said, not silent.
    let o = kiln(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--steps",
        "8",
        "--eval-batches",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("the schedule now spans"),
        "an unchanged warmup prefix is the same schedule:\n{}",
        stderr(&o)
    );
    // After warmup, a longer run moves the cosine: resuming the 8-step run for 40 steps.
    let o = kiln(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--steps",
        "40",
        "--stop-after",
        "1",
        "--eval-batches",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the schedule now spans 40 steps, so step 8's learning rate"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fp8_tiling_errors_point_at_the_cause() {
    let (dir, spec) = tiny_with(
        "fp8cause",
        &[("weight_block = [128, 128]", "weight_block = [128, 96]")],
    );
    let o = kiln(&["check", spec.to_str().unwrap(), "--color", "never"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("`precision.fp8.weight_block` = [128, 96]"),
        "{err}"
    );
    assert!(err.contains("1 error in"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn diff_of_many_specs_is_one_table() {
    let o = kiln(&[
        "diff",
        "specs/tiny.toml",
        "specs/deepseek-v2-lite.toml",
        "specs/deepseek-v3.toml",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let row = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key}:\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("moe.experts"), ["moe.experts", "8", "64", "256"]);
    assert_eq!(
        row("params.total"),
        ["params.total", "3.70", "M", "15.71", "B", "671.03", "B"]
    );
    // Settings every spec shares are left out.
    assert!(!out.contains("train.eps"), "{out}");
    let o = kiln(&[
        "diff",
        "--json",
        "specs/tiny.toml",
        "specs/deepseek-v2-lite.toml",
        "specs/deepseek-v3.toml",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["specs"].as_array().unwrap().len(), 3);
    let total = v["metric_changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "params.total")
        .unwrap();
    assert_eq!(total["values"][2], 671_026_404_352u64);
    // One spec is a usage error.
    assert_eq!(kiln(&["diff", "specs/tiny.toml"]).status.code(), Some(2));
}

#[test]
fn train_checks_memory_and_data_before_the_first_step() {
    // A 16-layer DeepSeek-V3: refused at once with both numbers, not an abort after a minute.
    let dir = std::env::temp_dir().join(format!("kiln-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v3 = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/deepseek-v3.toml"),
    )
    .unwrap();
    let v3 = v3[..v3.find("# The training layout").unwrap()].replace(
        "layers = \"dense*3, moe*58\"",
        "layers = \"dense*3, moe*13\"",
    );
    let spec = dir.join("v3-16.toml");
    std::fs::write(&spec, v3).unwrap();
    let start = std::time::Instant::now();
    let o = kiln(&[
        "train",
        spec.to_str().unwrap(),
        "--out",
        dir.join("run").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("needs at least") && err.contains("is available"),
        "{err}"
    );
    assert!(start.elapsed().as_secs() < 10);
    assert!(!dir.join("run").exists());

    // Too little data for one validation batch: said at start, with the flag that fixes it.
    let text = dir.join("small.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(6),
    )
    .unwrap();
    let out = dir.join("small");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "tests/specs/micro.toml",
            "--data",
            text.to_str().unwrap(),
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("fewer than one validation batch needs"),
        "{err}"
    );
    let flag = err
        .split("--val-fraction ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no suggested --val-fraction:\n{err}"))
        .to_string();
    let o = run(&["--val-fraction", &flag]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("val_loss"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("NaN"), "{}", stdout(&o));
    // The header names the spec's vocabulary, not the data's largest id.
    assert!(stderr(&o).contains("vocabulary 128"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn set_overrides_a_key_everywhere_and_train_records_the_resolved_spec() {
    // Typed as the key is: a number stays a number, a bare word is a string.
    let o = kiln(&[
        "check",
        "--json",
        "--set",
        "moe.experts=16",
        "--set",
        "moe.score=softmax",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shape"]["experts"], 16);
    // An override is checked with the spec's rules, and the diagnostic says where it came from.
    let o = kiln(&["check", "--set", "moe.experts=9"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("with --set moe.experts=9"), "{err}");
    assert!(err.contains("experts = 9"), "{err}");
    for bad in ["lr=1", "train.lr", "model.name.x=1"] {
        let o = kiln(&["check", "--set", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
    }
    // The run directory's spec.toml is the resolved spec: --set and --steps included, so a
    // resume needs nothing but the directory.
    let dir = std::env::temp_dir().join(format!("kiln-set-{}", std::process::id()));
    let o = kiln(&[
        "train",
        "tests/specs/micro.toml",
        "--steps",
        "12",
        "--set",
        "train.lr=2e-3",
        "--out",
        dir.to_str().unwrap(),
        "--eval-batches",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let recorded = std::fs::read_to_string(dir.join("spec.toml")).unwrap();
    assert!(
        recorded.contains("lr = 2e-3") && recorded.contains("steps = 12"),
        "{recorded}"
    );
    let o = kiln(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--eval-batches",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("to step 12 of 12"), "{}", stdout(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_spec_extends_another_and_errors_point_into_the_file_that_holds_them() {
    // The child changes three keys of micro; everything else is micro's.
    let o = kiln(&[
        "diff",
        "tests/specs/micro.toml",
        "tests/extends/micro-wide.toml",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("d_model") && out.contains("experts"), "{out}");
    assert!(!out.contains("kv_rank") && !out.contains("top_k"), "{out}");

    // Each error is shown at its own file's line: the base's, the grandparent's, the child's.
    let o = kiln(&["check", "tests/extends/bad-child.toml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    for place in [
        "tests/extends/bad-base.toml:5:10",
        "tests/specs/micro.toml:30:10",
        "tests/extends/bad-child.toml:5:11",
        "tests/extends/bad-child.toml:8:6",
        "3 errors in tests/extends/bad-child.toml",
    ] {
        assert!(err.contains(place), "{place} missing:\n{err}");
    }
    let o = kiln(&["check", "--json", "tests/extends/bad-child.toml"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let files: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            "tests/extends/bad-base.toml",
            "tests/specs/micro.toml",
            "tests/extends/bad-child.toml"
        ]
    );
    // A loop and a missing base are errors at the `extends` line.
    let o = kiln(&["check", "tests/extends/loop-a.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("[extends] Error: the specs extend each other in a loop"));
    let dir = std::env::temp_dir().join(format!("kiln-extends-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let orphan = dir.join("orphan.toml");
    std::fs::write(&orphan, "extends = \"gone.toml\"\n").unwrap();
    let o = kiln(&["check", orphan.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read `gone.toml`"),
        "{}",
        stderr(&o)
    );

    // A run records the resolved spec, which checks on its own and trains the same model.
    let run = dir.join("run");
    let o = kiln(&[
        "train",
        "tests/extends/micro-wide.toml",
        "--steps",
        "2",
        "--set",
        "moe.top_k=1",
        "--out",
        run.to_str().unwrap(),
        "--eval-batches",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let recorded = std::fs::read_to_string(run.join("spec.toml")).unwrap();
    assert!(!recorded.contains("extends"), "{recorded}");
    let o = kiln(&["check", "--json", run.join("spec.toml").to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shape"]["d_model"], 48, "{v}");
    assert_eq!(v["shape"]["top_k"], 1, "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_compares_a_specs_variants_in_one_table() {
    let o = kiln(&[
        "sweep",
        "--set",
        "moe.experts=8,16,32",
        "--set",
        "train.lr=1e-3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("A: moe.experts=8\nB: moe.experts=16\nC: moe.experts=32"),
        "{out}"
    );
    assert!(out.contains("params.by_component.routed_experts"), "{out}");
    // Two swept keys: every combination.
    let o = kiln(&[
        "sweep",
        "--json",
        "--set",
        "moe.experts=8,16",
        "--set",
        "precision.fp8.weight_block=[128,128],[128,64]",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["specs"].as_array().unwrap().len(), 4);
    // A variant that breaks a rule is reported like a spec that does.
    let o = kiln(&["sweep", "--set", "moe.experts=8,9"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("with --set moe.experts=9"),
        "{}",
        stderr(&o)
    );
    // Nothing to sweep is a usage error.
    assert_eq!(
        kiln(&["sweep", "--set", "moe.experts=8"]).status.code(),
        Some(2)
    );
}

#[test]
fn a_device_without_the_memory_for_the_plan_is_refused_before_building_anything() {
    // The emulated device claims 1 MiB, as a GPU of that size would; micro's plan needs more.
    let dir = std::env::temp_dir().join(format!("kiln-gpu-preflight-{}", std::process::id()));
    let start = std::time::Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            "tests/specs/micro.toml",
            "--device",
            "cuda-emulated",
            "--out",
        ])
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("KILN_EMULATED_MEMORY", "1M")
        // Refused before the kernels are built: no compiler is needed.
        .env("KILN_NVCC", "/nonexistent/nvcc")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("the training step's plan needs 1.73 MiB of device memory")
            && err.contains("1.00 MiB of the device's 1.00 MiB is free")
            && err.contains("shrink train.batch"),
        "{err}"
    );
    assert!(start.elapsed().as_secs() < 10);
    assert!(!dir.exists(), "a refused run leaves no directory");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--device", "cuda-emulated"])
        .env("KILN_EMULATED_MEMORY", "lots")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is not a size"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sweep_trains_each_variant_and_an_interrupted_sweep_resumes() {
    let dir = std::env::temp_dir().join(format!("kiln-sweep-train-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let sweep = |extra: &[&str]| {
        let mut a = vec![
            "sweep",
            "tests/specs/micro.toml",
            "--set",
            "moe.top_k=1,2",
            "--train",
            "--steps",
            "4",
            "--out",
            d,
            "--json",
            "--",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
        ];
        a.extend(extra);
        kiln(&a)
    };
    let results = |o: &std::process::Output| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["results"].clone()
    };
    let row = |r: &serde_json::Value, key: &str| -> Vec<f64> {
        let row = r
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["key"] == key)
            .unwrap();
        row["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    // Interrupted after 2 of 4 steps (the train flag stops each run), then run again: the
    // runs resume, and a third time they are kept.
    let o = sweep(&["--stop-after", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(row(&results(&o), "steps trained"), [2.0, 2.0]);
    let o = sweep(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sweep: resuming B (2/2): moe.top_k=2"),
        "{}",
        stderr(&o)
    );
    let r = results(&o);
    assert_eq!(row(&r, "steps trained"), [4.0, 4.0]);
    // Each column is its own run: the final losses are the runs' last rows.
    for (i, run) in ["A", "B"].iter().enumerate() {
        let text = std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            row(&r, "final main_loss")[i],
            last["main_loss"].as_f64().unwrap()
        );
        assert_eq!(
            row(&r, "final val_loss")[i],
            last["val_loss"].as_f64().unwrap()
        );
    }
    assert_ne!(row(&r, "final loss")[0], row(&r, "final loss")[1]);
    let svg = std::fs::read_to_string(dir.join("plot.svg")).unwrap();
    assert!(
        svg.contains("A: moe.top_k=1") && svg.contains("validation loss"),
        "{svg}"
    );
    let o = sweep(&[]);
    assert!(stderr(&o).contains("trained already"), "{}", stderr(&o));
    assert_eq!(results(&o), r);
    // Another sweep into the same directory is refused rather than mixed in.
    let o = kiln(&[
        "sweep",
        "tests/specs/micro.toml",
        "--set",
        "moe.top_k=1,2",
        "--train",
        "--steps",
        "6",
        "--out",
        d,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("holds another sweep's runs"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_draws_its_curves_and_names_them_as_the_metrics_do() {
    let dir = std::env::temp_dir().join(format!("kiln-plot-{}", std::process::id()));
    let o = kiln(&[
        "train",
        "tests/specs/micro.toml",
        "--steps",
        "10",
        "--eval-every",
        "5",
        "--eval-batches",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let svg = std::fs::read_to_string(dir.join("plot.svg")).unwrap();
    for title in [
        "micro: loss",
        "micro: learning rate",
        "micro: gradient norm",
        "micro: throughput",
    ] {
        assert!(svg.contains(title), "plot.svg lacks {title}");
    }
    assert!(svg.contains("validation (main)"));
    assert!(svg.contains("MTP (mean over depths)") && svg.contains("micro: balance loss"));
    // The terminal and metrics.jsonl name the same quantities alike.
    let err = stderr(&o);
    let progress = err.lines().find(|l| l.starts_with("step 5/10")).unwrap();
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .nth(4)
            .unwrap(),
    )
    .unwrap();
    for key in [
        "loss",
        "main_loss",
        "mtp_loss",
        "balance_loss",
        "val_loss",
        "lr",
        "tokens_per_s",
    ] {
        assert!(progress.contains(&format!("  {key} ")), "{progress}");
        assert!(row.get(key).is_some(), "{row}");
    }
    // The terms add up to the total: main + mtp.weight (0.3) × MTP + balance.
    let term = |k: &str| row[k].as_f64().unwrap();
    let sum = term("main_loss") + 0.3 * term("mtp_loss") + term("balance_loss");
    assert!((sum - term("loss")).abs() < 2e-6, "{row}");
    assert!(
        term("balance_loss") > 0.0 && term("mtp_loss") > 1.0,
        "{row}"
    );
    assert!(stdout(&o).contains("main_loss") && stdout(&o).contains("val_loss"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_hf_round_trip_keeps_kilns_own_settings() {
    let dir = std::env::temp_dir().join(format!("kiln-sidecar-{}", std::process::id()));
    let (run, hf, back) = (dir.join("run"), dir.join("hf"), dir.join("back"));
    let p = |d: &Path| d.to_str().unwrap().to_string();
    let o = kiln(&[
        "train",
        "--steps",
        "1",
        "--eval-batches",
        "1",
        "--out",
        &p(&run),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = kiln(&["export-hf", &p(&run), "-o", &p(&hf)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(hf.join("kiln.toml").exists());
    let o = kiln(&["import-hf", &p(&hf), "-o", &p(&back)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("restored from"), "{}", stderr(&o));
    // export → import → diff is empty: the FP8 policy, training settings and name survive.
    let o = kiln(&[
        "diff",
        &p(&run.join("spec.toml")),
        &p(&back.join("spec.toml")),
    ]);
    let out = stdout(&o);
    assert!(out.contains("the specs set the same values"), "{out}");
    assert!(out.contains("no reported metric changes"), "{out}");
    // A sidecar that does not describe config.json's model is ignored, and said so.
    let sidecar = std::fs::read_to_string(hf.join("kiln.toml")).unwrap();
    std::fs::write(
        hf.join("kiln.toml"),
        sidecar.replace("heads = 4", "heads = 8"),
    )
    .unwrap();
    let again = dir.join("again");
    let o = kiln(&["import-hf", &p(&hf), "-o", &p(&again)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kiln.toml ignored: its architecture"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn evaluation_checkpoints_and_logging_have_their_own_intervals() {
    let dir = std::env::temp_dir().join(format!("kiln-intervals-{}", std::process::id()));
    let o = kiln(&[
        "train",
        "tests/specs/micro.toml",
        "--steps",
        "12",
        "--eval-every",
        "6",
        "--checkpoint-every",
        "4",
        "--log-every",
        "3",
        "--eval-batches",
        "1",
        "--stop-after",
        "9",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    let logged: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|l| l.split('/').next().unwrap())
        .collect();
    assert_eq!(logged, ["1", "3", "6", "9"], "{err}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evaluated: Vec<u64> = rows
        .iter()
        .filter(|r| r.get("val_loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, [6, 9]);
    // The session stops at step 9 with a checkpoint, whatever the interval.
    let o = kiln(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--eval-batches",
        "1",
    ]);
    assert!(stderr(&o).contains("at step 9"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}
