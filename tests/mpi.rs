//! Data- and expert-parallel training across processes over MPI (`scripts/mpirun`, which
//! installs MPICH from PyPI into `.venv-mpi/` on first use): the losses a single process gets,
//! the bytes the analyzer predicts, checkpoints a single process resumes, and a failing rank
//! that ends the job. `KILN_SKIP_MPI=1` skips these tests on a machine that cannot reach PyPI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{kiln, text};

const SPEC: &str = "tests/specs/micro.toml";

fn skip() -> bool {
    if std::env::var_os("KILN_SKIP_MPI").is_some_and(|v| v == "1") {
        eprintln!("skipped: KILN_SKIP_MPI=1");
        return true;
    }
    false
}

/// `scripts/mpirun -n RANKS kiln ARGS…` with this build's binary.
fn mpirun(ranks: usize, args: &[&str]) -> Output {
    Command::new("scripts/mpirun")
        .arg("-n")
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env("MPIEXEC_TIMEOUT", "300")
        .output()
        .expect("scripts/mpirun runs")
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-mpi-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        SPEC,
        "--steps",
        steps,
        "--out",
        out,
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
    ]
}

/// The largest relative difference of the losses of two runs, step by step.
fn worst_loss_gap(a: &[serde_json::Value], b: &[serde_json::Value]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            (x - y).abs() / x.abs()
        })
        .fold(0.0, f64::max)
}

/// The analyzer's per-device communication for `layout` (`kiln check --json`), with the
/// formats the CPU trains in when `f32` (the analyzer's default is a GPU's bf16 working
/// weights, which halves ZeRO-1's all-gather).
fn predicted_comm(layout: &str, f32: bool) -> serde_json::Value {
    let mut args = vec!["check", SPEC, "--json", "--parallel", layout];
    if f32 {
        args.extend(["--set", "precision.compute=fp32"]);
    }
    let o = kiln(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["per_device"]["comm"].clone()
}

/// The bytes a prediction counts for collective `key`, over every link.
fn sent(comm: &serde_json::Value, key: &str) -> u64 {
    comm[key]["nvlink_bytes"].as_u64().unwrap() + comm[key]["ib_bytes"].as_u64().unwrap()
}

/// The analyzer's prediction of the bytes one rank sends reducing a step's gradients.
fn predicted_dp_bytes(dp: usize) -> u64 {
    sent(&predicted_comm(&format!("dp={dp}"), false), "dp_grads")
}

#[test]
fn data_parallel_training_matches_one_process_and_the_analyzer() {
    if skip() {
        return;
    }
    let single = scratch("single");
    let o = kiln(&train_args(single.to_str().unwrap(), "20"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let one = rows(&single);
    for dp in [2, 4] {
        let dir = scratch(&format!("dp{dp}"));
        let layout = format!("dp={dp}");
        let mut args = train_args(dir.to_str().unwrap(), "20");
        args.extend(["--parallel", &layout]);
        let o = mpirun(dp, &args);
        let out = text(&o.stdout);
        // mpirun's status alone can be 0 when a rank quit early: look for the summary too.
        assert!(
            o.status.success() && out.contains("trained micro to step 20 of 20"),
            "dp={dp}: {}\n{out}",
            text(&o.stderr)
        );
        let many = rows(&dir);
        let gap = worst_loss_gap(&one, &many);
        assert!(gap <= 1e-6, "dp={dp}: losses differ by {gap:e} (relative)");
        assert_eq!(
            one.last().unwrap()["val_loss"],
            many.last().unwrap()["val_loss"],
            "dp={dp}: the same validation rows give the same loss"
        );
        // The bytes each rank sent per step, measured, are the analyzer's prediction.
        let predicted = predicted_dp_bytes(dp);
        for r in &many {
            assert_eq!(r["comm_bytes"].as_u64(), Some(predicted), "dp={dp}: {r}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&single).ok();
}

#[test]
fn a_data_parallel_checkpoint_resumes_in_another_layout() {
    if skip() {
        return;
    }
    // Ten steps on two ranks, then ten more in one process, against twenty in one process.
    let dir = scratch("resume");
    let d = dir.to_str().unwrap();
    let o = mpirun(2, &{
        let mut a = train_args(d, "20");
        a.extend(["--stop-after", "10", "--parallel", "dp=2"]);
        a
    });
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = kiln(&[
        "train",
        "--resume",
        d,
        "--steps",
        "20",
        "--eval-batches",
        "2",
        "--eval-every",
        "10",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let resumed = rows(&dir);
    assert_eq!(resumed.len(), 20);
    let whole = scratch("whole");
    let o = kiln(&train_args(whole.to_str().unwrap(), "20"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let gap = worst_loss_gap(&rows(&whole), &resumed);
    assert!(
        gap <= 1e-6,
        "losses differ by {gap:e} after a change of layout"
    );
    // And the other way: a single process's checkpoint continues on four ranks.
    let o = mpirun(
        4,
        &[
            "train",
            "--resume",
            whole.to_str().unwrap(),
            "--steps",
            "24",
            "--parallel",
            "dp=4",
            "--eval-batches",
            "2",
        ],
    );
    assert!(
        o.status.success() && text(&o.stdout).contains("trained micro to step 24 of 24"),
        "{}",
        text(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&whole).ok();
}

#[test]
fn zero_1_shards_the_optimizer_state_and_changes_nothing_else() {
    if skip() {
        return;
    }
    let run = |tag: &str, ranks: usize, layout: &str| {
        let dir = scratch(tag);
        let mut args = train_args(dir.to_str().unwrap(), "20");
        args.extend(["--parallel", layout]);
        let o = mpirun(ranks, &args);
        assert!(
            o.status.success() && text(&o.stdout).contains("trained micro to step 20 of 20"),
            "{layout}: {}",
            text(&o.stderr)
        );
        dir
    };
    let plain = run("z0", 2, "dp=2");
    for (ranks, layout) in [(2, "dp=2,zero=1"), (4, "dp=4,zero=1")] {
        let sharded = run(&format!("z1-{ranks}"), ranks, layout);
        let rows_z = rows(&sharded);
        if ranks == 2 {
            // Sharding the moments changes no arithmetic: the same losses and the same
            // checkpoint bytes (the moments gathered back from both ranks).
            let losses = |rs: &[serde_json::Value]| -> Vec<f64> {
                rs.iter().map(|r| r["loss"].as_f64().unwrap()).collect()
            };
            assert_eq!(losses(&rows(&plain)), losses(&rows_z));
            let ck = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).unwrap();
            assert!(ck(&plain) == ck(&sharded), "the checkpoints differ");
        }
        // A reduce-scatter of f32 gradients and an all-gather of the f32 parameters: what the
        // analyzer predicts for this layout with the formats the CPU trains in.
        let comm = predicted_comm(layout, true);
        let bytes = |k: &str| sent(&comm, k);
        let predicted = bytes("dp_grads") + bytes("dp_params");
        assert!(bytes("dp_params") > 0);
        for r in &rows_z {
            assert_eq!(r["comm_bytes"].as_u64(), Some(predicted), "{layout}: {r}");
        }
        // Its checkpoint is a whole one: one process resumes it.
        let o = kiln(&[
            "train",
            "--resume",
            sharded.to_str().unwrap(),
            "--steps",
            "22",
            "--eval-batches",
            "2",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        std::fs::remove_dir_all(&sharded).ok();
    }
    // A whole checkpoint resumes sharded, to the same bytes as unsharded.
    let copy = scratch("z0-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["checkpoint.safetensors", "metrics.jsonl", "spec.toml"] {
        std::fs::copy(plain.join(f), copy.join(f)).unwrap();
    }
    for (dir, layout) in [(&plain, "dp=2,zero=1"), (&copy, "dp=2")] {
        let d = dir.to_str().unwrap();
        let o = mpirun(
            2,
            &[
                "train",
                "--resume",
                d,
                "--steps",
                "22",
                "--parallel",
                layout,
                "--eval-batches",
                "2",
            ],
        );
        assert!(o.status.success(), "{layout}: {}", text(&o.stderr));
    }
    let ck = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    assert!(
        ck(&plain) == ck(&copy),
        "resumed sharded and unsharded differ"
    );
    std::fs::remove_dir_all(&plain).ok();
    std::fs::remove_dir_all(&copy).ok();
}

#[test]
fn gradient_accumulation_matches_the_whole_batch() {
    if skip() {
        return;
    }
    // Four rows a step: in one process as 2 micro-batches of 2, and on 2 ranks as 2
    // micro-batches of 1 each (with ZeRO-1), against the whole batch at once.
    let single = scratch("ga-single");
    let o = kiln(&train_args(single.to_str().unwrap(), "20"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let one = rows(&single);
    for (ranks, layout) in [(1, "grad_accum=2"), (2, "dp=2,micro_batch=1,zero=1")] {
        let dir = scratch(&format!("ga-{ranks}"));
        let mut args = train_args(dir.to_str().unwrap(), "20");
        args.extend(["--parallel", layout]);
        let o = if ranks == 1 {
            kiln(&args)
        } else {
            mpirun(ranks, &args)
        };
        assert!(o.status.success(), "{layout}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(err.contains("accumulated over 2 micro-batches"), "{err}");
        let many = rows(&dir);
        let gap = worst_loss_gap(&one, &many);
        assert!(gap <= 1e-6, "{layout}: losses differ by {gap:e} (relative)");
        assert_eq!(
            one.last().unwrap()["val_loss"],
            many.last().unwrap()["val_loss"],
            "{layout}: the same validation rows give the same loss"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&single).ok();
}

/// The analyzer's figures for `layout` with the formats the CPU trains in: the bytes one
/// rank sends reducing gradients (and gathering parameters), those of the expert
/// all-to-alls, and the routed copies those carry.
fn predicted_f32(layout: &str) -> (u64, u64, f64) {
    let comm = predicted_comm(layout, true);
    (
        sent(&comm, "dp_grads") + sent(&comm, "dp_params"),
        sent(&comm, "ep_dispatch") + sent(&comm, "ep_combine"),
        comm["ep_rows_out"].as_f64().unwrap(),
    )
}

#[test]
fn expert_parallel_training_matches_one_process_and_the_analyzer() {
    if skip() {
        return;
    }
    // Twenty-four steps in one process; each layout stops after twenty of them, and two of
    // those runs are resumed below, in other layouts, for the last four.
    let single = scratch("ep-single");
    let o = kiln(&train_args(single.to_str().unwrap(), "24"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let reference = rows(&single);
    let one = &reference[..20];
    let mut checkpoints = Vec::new();
    for (ranks, layout) in [
        (2, "ep=2"),
        (4, "ep=4"),
        (4, "dp=2,ep=2"),
        (4, "dp=2,ep=2,zero=1"),
    ] {
        let dir = scratch(&format!("ep-{}", layout.replace([',', '='], "")));
        let mut args = train_args(dir.to_str().unwrap(), "24");
        args.extend(["--parallel", layout, "--stop-after", "20"]);
        let o = mpirun(ranks, &args);
        let out = text(&o.stdout);
        assert!(
            o.status.success() && out.contains("trained micro to step 20 of 24"),
            "{layout}: {}\n{out}",
            text(&o.stderr)
        );
        assert!(
            text(&o.stderr).contains("routed experts"),
            "{layout}: {}",
            text(&o.stderr)
        );
        let many = rows(&dir);
        let gap = worst_loss_gap(one, &many);
        assert!(gap <= 1e-6, "{layout}: losses differ by {gap:e} (relative)");
        assert_eq!(
            one.last().unwrap()["val_loss"],
            many.last().unwrap()["val_loss"],
            "{layout}: the same validation rows give the same loss"
        );
        let (dp_bytes, ep_bytes, ep_rows_out) = predicted_f32(layout);
        // Each routed copy that leaves a rank costs what the analyzer counts for one; how
        // many leave depends on the routing, which the analyzer takes to be uniform.
        let per_copy = ep_bytes as f64 / ep_rows_out;
        let mut moved = 0.0;
        for r in &many {
            assert_eq!(r["comm_bytes"].as_u64(), Some(dp_bytes), "{layout}: {r}");
            let (bytes, rows) = (
                r["ep_bytes"].as_u64().unwrap(),
                r["ep_rows"].as_u64().unwrap(),
            );
            // `ep_rows` counts rows sent and rows received: each is half of a copy's round trip.
            assert_eq!(2.0 * bytes as f64, rows as f64 * per_copy, "{layout}: {r}");
            moved += rows as f64 / 2.0 / many.len() as f64;
        }
        let ratio = moved / ep_rows_out;
        eprintln!("{layout}: {moved:.1} routed copies a step left rank 0, {ep_rows_out} predicted");
        assert!(
            (0.8..1.25).contains(&ratio),
            "{layout}: {moved} routed copies left rank 0 a step, the analyzer expects {ep_rows_out}"
        );
        checkpoints.push((layout, dir));
    }
    // ZeRO-1 changes no arithmetic: the same checkpoint, gathered whole.
    let ck = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    assert!(
        ck(&checkpoints[2].1) == ck(&checkpoints[3].1),
        "dp=2,ep=2 with and without ZeRO-1 differ"
    );
    // An expert-parallel checkpoint is a whole one: one process resumes it, and so does
    // another layout, and both continue as the single process did.
    for (i, (ranks, layout)) in [(1, "dp=1"), (4, "dp=2,ep=2,zero=1")]
        .into_iter()
        .enumerate()
    {
        let dir = &checkpoints[i].1;
        let d = dir.to_str().unwrap();
        let args = [
            "train",
            "--resume",
            d,
            "--steps",
            "24",
            "--eval-batches",
            "2",
            "--eval-every",
            "10",
            "--parallel",
            layout,
        ];
        let o = if ranks == 1 {
            kiln(&args)
        } else {
            mpirun(ranks, &args)
        };
        assert!(
            o.status.success() && text(&o.stdout).contains("trained micro to step 24 of 24"),
            "resuming {} as {layout}: {}",
            checkpoints[i].0,
            text(&o.stderr)
        );
        let gap = worst_loss_gap(&reference, &rows(dir));
        assert!(
            gap <= 1e-6,
            "{} resumed as {layout}: losses differ by {gap:e}",
            checkpoints[i].0
        );
    }
    for (_, dir) in checkpoints {
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::remove_dir_all(&single).ok();
}

#[test]
fn a_failing_rank_ends_the_job_with_its_message() {
    if skip() {
        return;
    }
    // Rank 0 cannot write its metrics: the job ends at once on both ranks, no hang.
    let dir = scratch("fail");
    std::fs::create_dir_all(dir.join("metrics.jsonl")).unwrap();
    let start = std::time::Instant::now();
    let o = mpirun(2, &{
        let mut a = train_args(dir.to_str().unwrap(), "20");
        a.extend(["--parallel", "dp=2"]);
        a
    });
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("rank 0 of 2: cannot write") && err.contains("ending the job"),
        "{err}"
    );
    assert!(
        start.elapsed().as_secs() < 60,
        "the job took {:?}",
        start.elapsed()
    );
    std::fs::remove_dir_all(&dir).ok();
    // A layout that does not match the processes started is refused on every rank.
    let o = mpirun(2, &["train", SPEC, "--steps", "1", "--parallel", "dp=4"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("2 processes were started, but the layout has dp = 4"),
        "{}",
        text(&o.stderr)
    );
}

/// The pid of the rank-`rank` process of the job whose environment holds `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<String> {
    let want = [
        format!("KILN_TEST_JOB={marker}"),
        format!("PMI_RANK={rank}"),
    ];
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        pid.parse::<u32>().ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        want.iter()
            .all(|w| vars.contains(&w.as_bytes()))
            .then_some(pid)
    })
}

#[test]
fn a_rank_that_hangs_is_caught_by_the_collective_timeout() {
    if skip() {
        return;
    }
    use std::io::{BufRead, BufReader};
    let dir = scratch("hang");
    let marker = format!("hang-{}", std::process::id());
    let mut child = Command::new("scripts/mpirun")
        .arg("-n")
        .arg("2")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            SPEC,
            "--steps",
            "100000",
            "--eval-every",
            "100000",
            "--out",
        ])
        .arg(&dir)
        .args(["--parallel", "dp=2", "--collective-timeout", "3"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env("MPIEXEC_TIMEOUT", "120")
        .env("KILN_TEST_JOB", &marker)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/mpirun runs");
    // Once the first step is done, rank 1 stops (SIGSTOP): it hangs without dying, and the
    // launcher cannot tell.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 {
        text.push_str(&line);
        if line.starts_with("step 1/") {
            break;
        }
        line.clear();
    }
    let pid = rank_pid(&marker, 1).expect("rank 1 is running");
    let stopped = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stopped.success());
    let start = std::time::Instant::now();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).ok();
    text.push_str(&rest);
    let status = child.wait().unwrap();
    // Rank 0 waited 3 s in a collective, said so, and the job ended (well before the
    // launcher's own 120 s limit).
    assert!(start.elapsed().as_secs() < 60, "{text}");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("error: rank 0 of 2: MPI_") && text.contains("waited more than 3 s"),
        "{text}"
    );
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gpu_ranks_say_what_they_need() {
    if skip() {
        return;
    }
    // GPU ranks sum over NCCL (bootstrapped over MPI), which needs the `cuda` feature, then
    // a GPU per rank: without either, every rank says so and the job ends.
    let o = mpirun(
        2,
        &[
            "train",
            "--steps",
            "1",
            "--parallel",
            "dp=2",
            "--device",
            "cuda",
        ],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    let why = if cfg!(feature = "cuda") {
        "--device cuda over 2 ranks"
    } else {
        "built without the `cuda` feature"
    };
    assert!(err.contains(why), "{err}");
}
