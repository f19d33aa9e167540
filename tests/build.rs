//! `kiln build`: a specialized training binary trains exactly like `kiln train` (the same
//! losses, bit for bit, in the same files), and an unchanged spec is not rebuilt.
//!
//! The first run compiles kiln's dependencies in release mode into a target directory kept
//! under cargo's test scratch space, so later runs take seconds.

use std::path::Path;
use std::process::{Command, Output};

fn run(program: &Path, args: &[&str]) -> Output {
    let o = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env(
            "KILN_CACHE_DIR",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/kiln-cache"),
        )
        .output()
        .expect("the program runs");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{} {args:?} failed:\n{}",
        program.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `(step, loss, val_loss)` of every line of a run's metrics, as exact bit patterns.
fn losses(run: &Path) -> Vec<(u64, u64, Option<u64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
                v["val_loss"].as_f64().map(f64::to_bits),
            )
        })
        .collect()
}

#[test]
fn the_built_binary_trains_exactly_like_kiln_train() {
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let work = scratch.join(format!("kiln-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let target = scratch.join("kiln-build-target");
    let (bin_dir, target_s) = (work.join("bin"), target.to_str().unwrap());
    let build = [
        "build",
        "tests/specs/micro.toml",
        "-o",
        bin_dir.to_str().unwrap(),
        "--target-dir",
        target_s,
    ];
    run(kiln, &build);
    let binary = bin_dir.join("micro-train");
    assert!(binary.exists());

    let (a, b) = (work.join("interpreted"), work.join("specialized"));
    let flags = ["--steps", "6", "--eval-every", "3", "--eval-batches", "2"];
    let mut train = vec![
        "train",
        "tests/specs/micro.toml",
        "--out",
        a.to_str().unwrap(),
    ];
    train.extend(flags);
    run(kiln, &train);
    let mut own = vec!["--out", b.to_str().unwrap()];
    own.extend(flags);
    run(&binary, &own);
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "per-step losses and validation losses");
    // The run directory is the same kind kiln's other commands read.
    assert_eq!(
        std::fs::read(a.join("spec.toml")).unwrap(),
        std::fs::read(b.join("spec.toml")).unwrap()
    );
    run(kiln, &["logits", b.to_str().unwrap(), "--tokens", "1,2,3"]);

    // `--device`: the binary runs its spec's CUDA plan as kiln does (the emulated device's
    // atomics may add in another order, so within 1e-6, not bit for bit), and says why it
    // cannot use a GPU here.
    let (c, d) = (
        work.join("kiln-emulated"),
        work.join("specialized-emulated"),
    );
    let flags = [
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cuda-emulated",
    ];
    let mut train = vec![
        "train",
        "tests/specs/micro.toml",
        "--out",
        c.to_str().unwrap(),
    ];
    train.extend(flags);
    run(kiln, &train);
    let mut own = vec!["--out", d.to_str().unwrap()];
    own.extend(flags);
    run(&binary, &own);
    let (lc, ld) = (losses(&c), losses(&d));
    assert_eq!(lc.len(), 2);
    for ((step, x, vx), (_, y, vy)) in lc.iter().zip(&ld) {
        assert_eq!(vx.is_some(), vy.is_some(), "step {step}: validated by both");
        for (x, y) in [(Some(*x), Some(*y)), (*vx, *vy)] {
            let (Some(x), Some(y)) = (x, y) else { continue };
            let (x, y) = (f64::from_bits(x), f64::from_bits(y));
            assert!(
                (x - y).abs() <= 1e-6 * x.abs(),
                "step {step}: {y} from the binary, {x} from kiln"
            );
        }
    }
    let gpu = Command::new(&binary)
        .args(["--steps", "1", "--device", "cuda", "--out"])
        .arg(work.join("gpu"))
        .output()
        .unwrap();
    assert_eq!(gpu.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&gpu.stderr).contains("--device cuda: "),
        "{}",
        String::from_utf8_lossy(&gpu.stderr)
    );

    // Unchanged spec, same kiln: nothing to rebuild.
    let again = run(kiln, &build);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is up to date"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    std::fs::remove_dir_all(&work).unwrap();
}
