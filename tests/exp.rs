//! `kiln exp` as a user runs it: the FP8 accumulation table and the FP8-vs-BF16 comparison,
//! their files and their refusals; and `kiln train --emulate-precision`.

mod common;

use common::{kiln, micro_with, scratch, text};

/// micro with FP8 GEMMs in 8-wide tiles (its widths are multiples of 8).
fn micro_fp8(dir: &std::path::Path) -> String {
    micro_with(
        dir,
        "micro-fp8.toml",
        "[precision]\nlinear = \"e4m3\"\nlinear_grad = \"e4m3\"\n\
         keep = [\"embed\", \"head\", \"moe.router\", \"*norm\", \"attn.core\"]\n\n\
         [precision.fp8]\nact_tile = [1, 8]\nweight_block = [8, 8]\n",
    )
}

#[test]
fn fp8_accum_prints_every_k_and_promotion_interval() {
    let o = kiln(&["exp", "fp8-accum", "--json", "--size", "4"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cells = v["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6 * 4);
    assert_eq!(v["accumulator"], "h100", "H100's datapath is the default");
    assert!(v["model"].as_str().unwrap().contains("bit for bit"));
    assert_eq!(v["products_per_step"], 32);
    let err = |k: u64, p: Option<u64>| {
        cells
            .iter()
            .find(|c| c["k"] == k && c["promote_every"].as_u64() == p)
            .unwrap()["max_rel_error"]
            .as_f64()
            .unwrap()
    };
    assert!(err(16384, None) > err(16384, Some(128)));
    assert!(err(16384, None) > err(512, None));
    // The table form names the paper's figure next to kiln's.
    let o = kiln(&["exp", "fp8-accum", "--size", "4"]);
    assert!(
        text(&o.stdout).contains("N_C = none"),
        "{}",
        text(&o.stdout)
    );
    assert!(text(&o.stdout).contains("2% max at K = 4096"));
    // Without promotion, a sum that never cancels loses several percent by K = 4096 on
    // H100's datapath (docs/fp8.md).
    assert!(err(4096, None) > 0.02, "{}", err(4096, None));
    let o = kiln(&[
        "exp",
        "fp8-accum",
        "--accumulator",
        "truncate",
        "--bits",
        "12",
        "--json",
        "--size",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["accumulator_bits"], 12);
    let o = kiln(&[
        "exp",
        "fp8-accum",
        "--accumulator",
        "truncate",
        "--bits",
        "40",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "bits beyond f32's 23 are a usage error"
    );
    // --bits is the truncating model's: with the h100 model it is refused, not ignored.
    let o = kiln(&["exp", "fp8-accum", "--bits", "12"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--accumulator truncate"),
        "{}",
        text(&o.stderr)
    );
}

/// A measured case for `kiln exp fp8-calibrate`: 1 + 2^-14 as the products 1 · 1 and
/// 2^-7 · 2^-7 (E4M3 codes 0x38 and 0x04), with `d` as the "GPU" said.
fn calibration_case(dir: &std::path::Path, d: f32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut row = vec![0u8; 32];
    row[0] = 0x38;
    row[1] = 0x04;
    std::fs::write(dir.join("a.bin"), &row).unwrap();
    std::fs::write(dir.join("b.bin"), &row).unwrap();
    std::fs::write(dir.join("d.bin"), d.to_le_bytes()).unwrap();
    std::fs::write(
        dir.join("meta.json"),
        r#"{"m": 1, "n": 1, "k": 32, "format": "e4m3", "instruction": "by hand"}"#,
    )
    .unwrap();
}

#[test]
fn fp8_calibrate_says_which_model_reproduces_measured_products() {
    let dir = scratch("exp", "calibrate");
    // H100 drops 2^-14 beside 1 (outside its 13 bits); an f32 accumulator keeps it.
    calibration_case(&dir.join("h100"), 1.0);
    calibration_case(&dir.join("f32"), 1.0 + 2f32.powi(-14));
    let o = kiln(&[
        "exp",
        "fp8-calibrate",
        dir.join("h100").to_str().unwrap(),
        dir.join("f32").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exact = |case: usize, model: &str| {
        v["cases"][case]["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == model)
            .unwrap()["bit_exact"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((exact(0, "h100"), exact(0, "truncate:23")), (1, 0));
    assert_eq!((exact(1, "h100"), exact(1, "truncate:23")), (0, 1));
    // The text form, and a case that is not there.
    let o = kiln(&["exp", "fp8-calibrate", dir.join("h100").to_str().unwrap()]);
    assert!(
        text(&o.stdout).contains("1 of 1 bit for bit"),
        "{}",
        text(&o.stdout)
    );
    let o = kiln(&[
        "exp",
        "fp8-calibrate",
        dir.join("missing").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("meta.json"), "{}", text(&o.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fp8_vs_bf16_writes_both_curves_a_plot_and_a_summary() {
    let dir = scratch("exp", "vs");
    let spec = micro_fp8(&dir);
    let out = dir.join("out");
    let o = kiln(&[
        "exp",
        "fp8-vs-bf16",
        &spec,
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("final validation loss: BF16"),
        "{}",
        text(&o.stdout)
    );
    let curves = std::fs::read_to_string(out.join("curves.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = curves
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 8, "four steps per run");
    for run in ["bf16", "fp8"] {
        let vals = rows
            .iter()
            .filter(|r| r["run"] == run && r.get("val_loss").is_some())
            .count();
        assert_eq!(vals, 2, "{run}: evaluated at steps 2 and 4");
    }
    // Same data and initialization, different numerics: close, but not the same.
    let (b, f) = (&rows[0]["loss"], &rows[4]["loss"]);
    assert_ne!(b, f);
    assert!((b.as_f64().unwrap() - f.as_f64().unwrap()).abs() < 0.05);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "final_val_loss_bf16",
        "final_val_loss_fp8",
        "relative_difference",
        "seconds_fp8",
    ] {
        assert!(summary[key].is_f64(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["fp8"]["act_tile"], serde_json::json!([1, 8]));
    assert!(summary["standard_error"].is_null(), "one seed: {summary}");
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("FP8 validation"));

    // Two seeds: each trains both runs; the summary averages their relative differences.
    let out2 = dir.join("out2");
    let o = kiln(&[
        "exp",
        "fp8-vs-bf16",
        &spec,
        "--steps",
        "2",
        "--eval-batches",
        "1",
        "--seed",
        "3",
        "--seeds",
        "2",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let printed = text(&o.stdout);
    assert!(
        printed.contains("seed 3:")
            && printed.contains("seed 4:")
            && printed.contains("mean over 2 seeds"),
        "{printed}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("summary.json")).unwrap()).unwrap();
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{summary}");
    let rel: Vec<f64> = runs
        .iter()
        .map(|r| r["relative_difference"].as_f64().unwrap())
        .collect();
    let mean = summary["relative_difference"].as_f64().unwrap();
    assert!((mean - (rel[0] + rel[1]) / 2.0).abs() < 1e-12, "{summary}");
    let se = summary["standard_error"].as_f64().unwrap();
    assert!(
        (se - (rel[0] - rel[1]).abs() / 2.0).abs() < 1e-12,
        "{summary}"
    );
    let curves = std::fs::read_to_string(out2.join("curves.jsonl")).unwrap();
    let seeds: Vec<u64> = curves
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seed"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seeds,
        [3, 3, 3, 3, 4, 4, 4, 4],
        "two steps per run, two runs per seed"
    );
    assert!(out2.join("plot.svg").exists() && out2.join("plot-seed4.svg").exists());
    let o = kiln(&["exp", "fp8-vs-bf16", &spec, "--seeds", "0"]);
    assert_eq!(o.status.code(), Some(2), "no seeds is a usage error");
}

#[test]
fn fp8_vs_bf16_refuses_a_spec_without_fp8() {
    let dir = scratch("exp", "no-fp8");
    let o = kiln(&[
        "exp",
        "fp8-vs-bf16",
        "tests/specs/micro.toml",
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("uses no FP8 format"),
        "{}",
        text(&o.stderr)
    );
    assert!(!dir.join("out").exists(), "nothing is written");
}

#[test]
fn train_emulates_the_precision_policy_when_asked() {
    let dir = scratch("exp", "train");
    let spec = micro_fp8(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec![
            "train",
            &spec,
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect::<Vec<f64>>()
    };
    let (plain, emulated) = (run("plain", &[]), run("emulated", &["--emulate-precision"]));
    assert_eq!(plain.len(), 3);
    for (p, e) in plain.iter().zip(&emulated) {
        assert!(
            p != e && (p - e).abs() < 0.05,
            "losses {plain:?} vs {emulated:?}"
        );
    }
}
