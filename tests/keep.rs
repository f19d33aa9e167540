//! The keep plan (what a training Program's backward pass reads from its forward pass, and in
//! which format) against the analyzer's report of saved activations.

use std::path::Path;

use kiln_compiler::analyze::analyze;
use kiln_compiler::check::check;
use kiln_compiler::keep::Storage;
use kiln_compiler::model::{Format, Model};
use kiln_compiler::program::compile;

fn model(path: &str) -> Model {
    check(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()).unwrap()
}

/// The analyzer estimates saved activations per op from the Model (each op's input once per
/// site and format, plus the FP8 tiles' scales); the keep plan lists the values of the fused
/// training graph. They are two accounts of the same memory and must stay close: the plan
/// over the analyzer measured 0.87–0.89 on tiny and anchor-tiny, 0.91–0.92 on micro and
/// 1.04–1.05 on gpt2-micro, under each spec's policy and under f32 (the gap is not yet
/// reconciled value by value). A change that moves one account and not the other fails here.
#[test]
fn the_keep_plan_holds_what_the_analyzer_reports() {
    for spec in [
        "specs/tiny.toml",
        "tests/specs/anchor-tiny.toml",
        "tests/specs/micro.toml",
        "tests/specs/gpt2-micro.toml",
    ] {
        for policy in ["spec", "fp32"] {
            let mut m = model(spec);
            if policy == "fp32" {
                m.precision = m.precision.mapped(|_| Format::Fp32);
            }
            let memory = analyze(&m).memory;
            let compiled = compile(&m).unwrap();
            let program = &compiled.train;
            let kept = program
                .keep()
                .bytes(program.graph(), program.settings().formats.compute);
            let analyzer = memory.activations_bytes + memory.scales_bytes;
            let ratio = kept.total() as f64 / analyzer as f64;
            assert!(
                (0.85..=1.10).contains(&ratio),
                "{spec} ({policy}): keep plan {kept:?} vs analyzer {analyzer}: {ratio:.3}"
            );
            // Under f32 nothing is stored below f32.
            if policy == "fp32" {
                assert_eq!(kept.packed(), 0, "{spec}");
            }
        }
    }
}

/// tiny's policy stores the inputs of FP8 GEMMs as FP8 tiles, statistics in f32 and the rest
/// in bf16, each packed after its last forward reader, before the backward pass.
#[test]
fn tiny_keeps_fp8_tiles_bf16_and_f32_statistics() {
    let m = model("specs/tiny.toml");
    let compiled = compile(&m).unwrap();
    let keep = compiled.train.keep();
    let boundary = keep.boundary.expect("a training graph has a backward pass");
    let count = |f: fn(&Storage) -> bool| keep.kept.iter().filter(|k| f(&k.storage)).count();
    assert!(
        count(|s| matches!(
            s,
            Storage::Fp8 {
                format: Format::E4m3,
                tile: 128,
                ..
            }
        )) > 0
    );
    assert!(count(|s| *s == Storage::Compute) > 0);
    assert!(count(|s| *s == Storage::F32) > 0);
    assert!(keep.kept.iter().all(|k| k.after < boundary));
    assert!(!keep.experts.is_empty());
    // A forward Program has no backward pass and keeps nothing.
    assert_eq!(compiled.forward.keep().boundary, None);
    assert!(compiled.forward.keep().kept.is_empty());
}
