//! Hugging Face interop through the `kiln` binary, against the golden fixtures in `tests/hf/`
//! (written by `scripts/hf-fixtures` with pinned torch and transformers; no Python here).
//!
//! For every fixture: `import-hf` the model directory, compare `kiln logits` with
//! transformers' logits (max |Δ| ≤ 1e-4), `export-hf` it, check the exported tensors equal
//! the originals, and import the export again to get the same logits bit for bit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::kiln;

use kiln_runtime::hf::{read_dir, read_safetensors, HfCheckpoint};

/// The tolerance the issue sets: max absolute logit difference in f32.
const TOLERANCE: f32 = 1e-4;

fn ok(o: &Output, what: &str) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    common::scratch("hf", name)
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/hf exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("fixture.json").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 8,
        "expected the eight fixtures, found {dirs:?}"
    );
    dirs
}

fn logits(run: &Path, tokens: &str) -> Vec<Vec<f32>> {
    let out = ok(
        &kiln(&["logits", run.to_str().unwrap(), "--tokens", tokens]),
        "kiln logits",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn tensors(dir: &Path) -> HfCheckpoint {
    read_dir(dir, |n| n.to_string()).unwrap()
}

#[test]
fn every_fixture_imports_matches_transformers_and_round_trips() {
    let work = scratch("parity");
    let mut report = Vec::new();
    for fixture in fixtures() {
        let case = fixture.file_name().unwrap().to_string_lossy().into_owned();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("fixture.json")).unwrap())
                .unwrap();
        let tokens: Vec<String> = meta["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap().to_string())
            .collect();
        let tokens = tokens.join(",");
        let expected = read_safetensors(&fixture.join("expected.safetensors")).unwrap();
        let expected = &expected.tensors["logits"];

        let run = work.join(format!("{case}-run"));
        ok(
            &kiln(&[
                "import-hf",
                fixture.to_str().unwrap(),
                "-o",
                run.to_str().unwrap(),
            ]),
            &format!("import-hf {case}"),
        );
        let got = logits(&run, &tokens);
        assert_eq!(
            [got.len(), got[0].len()],
            [expected.shape[0], expected.shape[1]],
            "{case}: logits shape"
        );
        let max_diff = got
            .iter()
            .flatten()
            .zip(&expected.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        report.push(format!("{case}: max |Δ| = {max_diff:.2e}"));
        assert!(
            max_diff <= TOLERANCE,
            "{case}: kiln's logits differ from transformers' by {max_diff}"
        );

        // Export: the same tensors under the same names (bf16 checkpoints come back as the
        // f32 values they upcast to).
        let hf = work.join(format!("{case}-hf"));
        ok(
            &kiln(&[
                "export-hf",
                run.to_str().unwrap(),
                "-o",
                hf.to_str().unwrap(),
            ]),
            &format!("export-hf {case}"),
        );
        let (orig, back) = (tensors(&fixture), tensors(&hf));
        let names = |c: &HfCheckpoint| c.tensors.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&back), names(&orig), "{case}: exported tensor names");
        for (name, t) in &orig.tensors {
            assert_eq!(back.tensors[name], *t, "{case}: exported `{name}`");
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], meta["family"], "{case}: model_type");

        // And back in: the same logits, bit for bit.
        let again = work.join(format!("{case}-again"));
        ok(
            &kiln(&[
                "import-hf",
                hf.to_str().unwrap(),
                "-o",
                again.to_str().unwrap(),
            ]),
            &format!("re-import {case}"),
        );
        assert_eq!(
            logits(&again, &tokens),
            got,
            "{case}: logits after a round trip"
        );
    }
    eprintln!("{}", report.join("\n"));
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn a_config_alone_becomes_a_spec_that_checks() {
    let work = scratch("config");
    let spec = work.join("imported.toml");
    let o = kiln(&[
        "import-hf",
        "tests/hf/deepseek_v3-qlora-groups/config.json",
        "-o",
        spec.to_str().unwrap(),
    ]);
    ok(&o, "import-hf config.json");
    let report = ok(&kiln(&["check", spec.to_str().unwrap()]), "kiln check");
    assert!(report.contains("3 layers (1 dense, 2 moe)"), "{report}");
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn config_problems_are_named_on_the_command_line() {
    let work = scratch("badconfig");
    let config = work.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/hf/llama-gqa-tied/config.json").unwrap(),
    )
    .unwrap();
    v["hidden_sizee"] = 3.into();
    v["hidden_act"] = "relu".into();
    std::fs::write(&config, v.to_string()).unwrap();
    let spec = work.join("out.toml");
    let o = kiln(&[
        "import-hf",
        config.to_str().unwrap(),
        "-o",
        spec.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("hidden_sizee"), "{e}");
    assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
    assert!(!spec.exists(), "no spec is written for a bad config");
    std::fs::remove_dir_all(&work).unwrap();
}

/// Copies a fixture's model files into `dir` so a test can damage them.
fn copy_fixture(case: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(Path::new("tests/hf").join(case)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn damaged_checkpoints_give_clear_errors_and_write_nothing() {
    let work = scratch("damaged");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = work.join("run");
    let import = |dir: &Path| {
        kiln(&[
            "import-hf",
            root.join(dir).to_str().unwrap(),
            "-o",
            run.to_str().unwrap(),
        ])
    };
    let err = |o: &Output| {
        assert_eq!(o.status.code(), Some(1));
        assert!(!run.exists(), "nothing is written on failure");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    // A missing shard is named.
    let sharded = work.join("sharded");
    copy_fixture("llama-mha-untied-sharded", &sharded);
    let shard = std::fs::read_dir(&sharded)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("-of-"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let e = err(&import(&sharded));
    let shard_name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert!(e.contains(&shard_name), "{e}");

    // A truncated file is refused as damaged.
    let truncated = work.join("truncated");
    copy_fixture("gpt2", &truncated);
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&import(&truncated));
    assert!(e.contains("not a readable safetensors checkpoint"), "{e}");

    // A config that disagrees with the weights: every mismatched tensor is named with both
    // shapes.
    let wrong = work.join("wrong");
    copy_fixture("llama-gqa-tied", &wrong);
    let config_path = wrong.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let inter = config["intermediate_size"].as_u64().unwrap();
    config["intermediate_size"] = (inter * 2).into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let e = err(&import(&wrong));
    assert!(
        e.contains(&format!(
            "`model.layers.0.mlp.up_proj.weight` has shape [{inter}, "
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("the model needs [{}, ", inter * 2)),
        "{e}"
    );

    // An existing, non-empty output is never overwritten.
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("keep.txt"), "mine").unwrap();
    let o = kiln(&[
        "import-hf",
        root.join("tests/hf/gpt2").to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not empty"));
    assert_eq!(
        std::fs::read_to_string(run.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn an_imported_run_fine_tunes_and_exports_again() {
    let work = scratch("finetune");
    let run = work.join("run");
    ok(
        &kiln(&[
            "import-hf",
            "tests/hf/deepseek_v3-qlora-groups",
            "-o",
            run.to_str().unwrap(),
        ]),
        "import-hf",
    );
    // The fixture's vocabulary has 96 ids, fewer than the built-in corpus's bytes: train on a
    // text whose bytes (digits and spaces) are all below 96.
    let text = work.join("data.txt");
    // Enough of it that the held-out tenth fills a validation batch (8 × 64 + 1 tokens).
    std::fs::write(&text, "0120120123 ".repeat(600)).unwrap();
    ok(
        &kiln(&[
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--data",
            text.to_str().unwrap(),
            "--steps",
            "3",
        ]),
        "train --resume",
    );
    let hf = work.join("hf");
    ok(
        &kiln(&[
            "export-hf",
            run.to_str().unwrap(),
            "-o",
            hf.to_str().unwrap(),
            "--dtype",
            "bf16",
        ]),
        "export-hf --dtype bf16",
    );
    let back = tensors(&hf);
    assert_eq!(back.dtypes.keys().collect::<Vec<_>>(), ["BF16"]);
    std::fs::remove_dir_all(&work).unwrap();
}
