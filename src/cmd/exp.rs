//! `kiln exp`: experiments that reproduce published claims with numbers anyone can rerun.
//!
//! - `fp8-accum`: DeepSeek-V3 §3.3.2's accumulation-precision experiment, on the CPU
//!   emulation of Hopper's FP8 tensor core ([`kiln_runtime::numerics::accum`]).
//! - `fp8-vs-bf16`: the same spec, data and seed trained under its FP8 policy and under BF16,
//!   both emulated exactly; the relative difference of the final validation losses against
//!   the paper's 0.25%.
//!
//! docs/fp8.md explains the models and records results.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use kiln_compiler::model::{Format, Model};
use kiln_compiler::program::compile;
use kiln_runtime::data::{self, Batcher, Rng};
use kiln_runtime::numerics::accum::{fp8_product, Accumulation, Datapath, MMA_K};
use kiln_runtime::numerics::quant::{quantize, Quantized, ScaleFormat};
use kiln_runtime::numerics::Fp8Format;
use kiln_runtime::train::{eval_loss, init_params, max_token_offset, TrainConfig, Trainer};

use crate::engine::load_data;
use crate::fsutil;
use crate::output::out;
use crate::plot::{Plot, Series};
use crate::spec::load;
use crate::{other, Failure};

#[derive(clap::Subcommand)]
pub(crate) enum Exp {
    /// DeepSeek-V3's FP8 accumulation experiment: random E4M3 matrices multiplied with the
    /// emulated tensor core (H100's FP8 datapath, bit for bit, or `--accumulator truncate`),
    /// promoted to f32 every N_C elements or never; the error against an f64 product of the
    /// same quantized inputs, for K from 512 to 16384 and N_C ∈ {none, 32, 128, 512}.
    ///
    /// The paper reports a maximum relative error near 2% at K = 4096 without promotion, for
    /// "two random matrices" of a distribution it does not name: all-positive inputs give
    /// about four times that, standard normal ones a tenth; normal inputs with a mean near
    /// 0.65 standard deviations give 2% (docs/fp8.md).
    Fp8Accum(AccumArgs),
    /// Compare FP8 products a GPU computed with each accumulation model: DIR holds
    /// `meta.json` (`m`, `n`, `k`, `format`, and optional `instruction` and `promote_every`),
    /// `a.bin` (FP8 codes, `[m, k]`), `b.bin` (`[n, k]`) and `d.bin` (the GPU's f32
    /// results, little-endian `[m, n]`), as `scripts/fp8_tensor_core.py` writes them on the
    /// device. Prints, per model, how many results it reproduces bit for bit.
    Fp8Calibrate(CalibrateArgs),
    /// Train one spec twice from the same initialization, data and seed: under its FP8
    /// precision policy and with every FP8 format replaced by BF16, both emulated exactly
    /// (as `kiln train --emulate-precision`). Writes DIR/curves.jsonl (one line per step and
    /// run), DIR/plot.svg (both loss curves) and DIR/summary.json, and prints the relative
    /// difference of the final validation losses (DeepSeek-V3 reports below 0.25%).
    Fp8VsBf16(VsArgs),
}

#[derive(clap::Args)]
pub(crate) struct AccumArgs {
    /// The tensor core's model: `h100` (bit-accurate, 13 fraction bits) or `truncate`
    /// (products summed in f32, a running sum truncated to `--bits`), as `[precision.fp8]
    /// accumulator` names them.
    #[arg(long, default_value = "h100", value_parser = ["h100", "truncate"])]
    accumulator: String,
    /// Fraction bits of the `truncate` model's running sum [default: 14].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=23))]
    bits: Option<u32>,
    /// The random matrices: `uniform` (in [0, 1), all positive, like torch.rand: no dot
    /// product cancels) or `normal` (standard deviation 1, mean `--mean`, like torch.randn:
    /// dot products cancel, and the table shows ‖c − ref‖ / ‖ref‖ over the whole product).
    #[arg(long, default_value = "uniform", value_parser = ["uniform", "normal"])]
    inputs: String,
    /// The mean of normal inputs, in standard deviations.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    mean: f64,
    /// Rows of A and of B (the product is size × size, each element a length-K dot product).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    size: u64,
    /// Products the tensor core sums before each limited-precision addition: 32 (one
    /// Hopper FP8 wgmma step); 1 aligns and truncates every product on its own.
    #[arg(long, default_value_t = MMA_K as u64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    step: u64,
    /// Seed of the random matrices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the table as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct CalibrateArgs {
    /// Directories of measured products, one case each.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct VsArgs {
    /// The spec; its precision policy must use FP8 somewhere [default: the built-in
    /// specs/tiny.toml].
    spec: Option<PathBuf>,
    /// Optimizer steps of each run [default: the spec's train.steps].
    #[arg(long)]
    steps: Option<u64>,
    /// Output directory [default: runs/<model name>-fp8-vs-bf16].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Evaluate the validation loss every N steps (and at the end) [default: steps / 10].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Seed for initialization and batching [default: the spec's train.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Run this many seeds (--seed, --seed + 1, …), each training both runs; the summary
    /// reports every seed's relative difference, their mean and its standard error.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Training data, as for `kiln train` [default: the spec's train.data].
    #[arg(long)]
    data: Option<String>,
}

pub(crate) fn run(exp: Exp, color: bool) -> Result<(), Failure> {
    match exp {
        Exp::Fp8Accum(args) => fp8_accum(&args),
        Exp::Fp8Calibrate(args) => fp8_calibrate(&args),
        Exp::Fp8VsBf16(args) => fp8_vs_bf16(args, color),
    }
}

/// The contraction lengths of the paper's experiment.
pub const ACCUM_K: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];
/// Promotion intervals compared (`None`: never promoted).
pub const ACCUM_PROMOTE: [Option<usize>; 4] = [None, Some(32), Some(128), Some(512)];

/// One cell of the accumulation table.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct AccumCell {
    pub k: usize,
    /// `None`: the whole contraction in the limited accumulator.
    pub promote_every: Option<usize>,
    /// Largest and mean `|c − ref| / |ref|` over the product's elements.
    pub max_rel_error: f64,
    pub mean_rel_error: f64,
    /// `‖c − ref‖ / ‖ref‖` over the whole product (Frobenius norms): defined however the dot
    /// products cancel.
    pub norm_rel_error: f64,
}

/// The random matrices of the experiment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Inputs {
    /// Normal with this mean and standard deviation 1: dot products cancel, less so as the
    /// mean grows.
    Normal { mean: f64 },
    /// Uniform in [0, 1): no dot product cancels.
    Uniform,
}

impl Inputs {
    fn describe(self) -> String {
        match self {
            Inputs::Normal { mean: 0.0 } => "standard normal".to_string(),
            Inputs::Normal { mean } => format!("normal (mean {mean}, standard deviation 1)"),
            Inputs::Uniform => "uniform in [0, 1)".to_string(),
        }
    }
}

/// Random `[rows, k]` from `inputs`, quantized to E4M3 with `block` scaling.
fn random_e4m3(
    rng: &mut Rng,
    rows: usize,
    k: usize,
    block: [usize; 2],
    inputs: Inputs,
) -> Quantized {
    let x: Vec<f32> = (0..rows * k)
        .map(|_| match inputs {
            Inputs::Uniform => rng.next_f64() as f32,
            Inputs::Normal { mean } => {
                // Box–Muller.
                let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
                let u2 = rng.next_f64();
                (mean + (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            }
        })
        .collect();
    quantize(&x, rows, k, block, Fp8Format::E4m3, ScaleFormat::Fp32).expect("finite")
}

/// `Σ_k a[r, k] · b[c, k]` of the dequantized operands in f64: exact products of codes and
/// scales, summed in f64.
fn reference(a: &Quantized, b: &Quantized) -> Vec<f64> {
    let (av, bv) = (a.code_values(), b.code_values());
    let k = a.cols;
    let mut c = Vec::with_capacity(a.rows * b.rows);
    for r in 0..a.rows {
        for j in 0..b.rows {
            let dot: f64 = (0..k)
                .map(|i| {
                    let x = f64::from(av[r * k + i]) * f64::from(a.scale(r, i));
                    let y = f64::from(bv[j * k + i]) * f64::from(b.scale(j, i));
                    x * y
                })
                .sum();
            c.push(dot);
        }
    }
    c
}

/// The table of `kiln exp fp8-accum`: for each K, the error of each promotion interval on
/// the same random product (A in 1×128 activation tiles, B in 128×128 weight blocks).
pub fn accumulation_table(
    datapath: Datapath,
    step: usize,
    size: usize,
    seed: u64,
    inputs: Inputs,
) -> Vec<AccumCell> {
    let mut cells = Vec::new();
    for &k in &ACCUM_K {
        let mut rng = Rng::with_stream(seed, k as u64);
        let a = random_e4m3(&mut rng, size, k, [1, 128], inputs);
        let b = random_e4m3(&mut rng, size, k, [128, 128], inputs);
        let want = reference(&a, &b);
        for &promote_every in &ACCUM_PROMOTE {
            let acc = Accumulation {
                datapath,
                promote_every,
                step,
            };
            let got = fp8_product(&a, &b, acc, false);
            let rel: Vec<f64> = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (f64::from(g) - w).abs() / w.abs())
                .collect();
            let sq = |f: &dyn Fn(f64, f64) -> f64| -> f64 {
                got.iter()
                    .zip(&want)
                    .map(|(&g, &w)| f(f64::from(g), w).powi(2))
                    .sum::<f64>()
                    .sqrt()
            };
            cells.push(AccumCell {
                k,
                promote_every,
                max_rel_error: rel.iter().copied().fold(0.0, f64::max),
                mean_rel_error: rel.iter().sum::<f64>() / rel.len() as f64,
                norm_rel_error: sq(&|g, w| g - w) / sq(&|_, w| w),
            });
        }
    }
    cells
}

fn promote_name(p: Option<usize>) -> String {
    p.map_or("none".to_string(), |n| n.to_string())
}

fn fp8_accum(args: &AccumArgs) -> Result<(), Failure> {
    let datapath = match (args.accumulator.as_str(), args.bits) {
        ("h100", None) => Datapath::H100,
        ("h100", Some(_)) => return Err(crate::cmd::layout::usage(
            "--bits sets the width of the `truncate` model; the h100 model keeps 13 fraction bits",
            "add --accumulator truncate, or leave --bits out",
        )),
        (_, bits) => Datapath::Truncating {
            bits: bits.unwrap_or(14),
        },
    };
    let inputs = match args.inputs.as_str() {
        "uniform" if args.mean == 0.0 => Inputs::Uniform,
        "uniform" => {
            return Err(crate::cmd::layout::usage(
                "--mean shifts normal inputs; uniform ones lie in [0, 1)",
                "add --inputs normal, or leave --mean out",
            ))
        }
        _ => Inputs::Normal { mean: args.mean },
    };
    let size = args.size as usize;
    let started = Instant::now();
    let cells = accumulation_table(datapath, args.step as usize, size, args.seed, inputs);
    let model = match datapath {
        Datapath::H100 => "H100's FP8 tensor core, bit for bit (13 fraction bits; Khattak and \
                           Mikaitis, arXiv 2512.07004)"
            .to_string(),
        Datapath::Truncating { bits } => {
            format!("products summed in f32, a running sum truncated to {bits} fraction bits")
        }
    };
    if args.json {
        let mut json = serde_json::json!({
            "accumulator": args.accumulator,
            "model": model,
            "products_per_step": args.step,
            "size": size,
            "seed": args.seed,
            "inputs": format!("{}, E4M3; A in 1x128 tiles, B in 128x128 blocks", inputs.describe()),
            "cells": cells,
        });
        if let Datapath::Truncating { bits } = datapath {
            json["accumulator_bits"] = bits.into();
        }
        out(&format!("{json:#}\n"));
        return Ok(());
    }
    // Relative error per element where no dot product cancels; over the whole product where
    // they do (an element near zero has no meaningful relative error).
    let per_element = inputs != Inputs::Normal { mean: 0.0 };
    let mut s = format!(
        "FP8 (E4M3) GEMM accumulation error: {size}×K · K×{size}, inputs {}, with {model}, \
         {} products per step,\npromoted to f32 every N_C elements; against f64, {}\n\n",
        inputs.describe(),
        args.step,
        if per_element {
            format!(
                "max / mean relative error over the {} elements",
                size * size
            )
        } else {
            "‖c − ref‖ / ‖ref‖ over the whole product".to_string()
        }
    );
    s.push_str(&format!("{:>7}", "K"));
    for p in ACCUM_PROMOTE {
        s.push_str(&format!("  {:>21}", format!("N_C = {}", promote_name(p))));
    }
    s.push('\n');
    for row in cells.chunks(ACCUM_PROMOTE.len()) {
        s.push_str(&format!("{:>7}", row[0].k));
        for c in row {
            let cell = if per_element {
                format!(
                    "{:.3}% / {:.3}%",
                    100.0 * c.max_rel_error,
                    100.0 * c.mean_rel_error
                )
            } else {
                format!("{:.3}%", 100.0 * c.norm_rel_error)
            };
            s.push_str(&format!("  {cell:>21}"));
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "\n(DeepSeek-V3 §3.3.2: about 2% max at K = 4096 without promotion; {:.1} s)\n",
        started.elapsed().as_secs_f64()
    ));
    out(&s);
    Ok(())
}

/// One measured case of `kiln exp fp8-calibrate`.
struct Measured {
    name: String,
    a: Quantized,
    b: Quantized,
    d: Vec<f32>,
    promote_every: Option<usize>,
    instruction: String,
}

fn read_measured(dir: &std::path::Path) -> Result<Measured, Failure> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| other(format!("cannot read {}: {e}", dir.join(name).display())))
    };
    let meta: serde_json::Value = serde_json::from_slice(&read("meta.json")?)
        .map_err(|e| other(format!("{}: {e}", dir.join("meta.json").display())))?;
    let dim = |key: &str| {
        meta[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| other(format!("{}: no `{key}`", dir.join("meta.json").display())))
    };
    let (m, n, k) = (dim("m")?, dim("n")?, dim("k")?);
    let format = match meta["format"].as_str() {
        Some("e4m3") => Fp8Format::E4m3,
        Some("e5m2") => Fp8Format::E5m2,
        other_format => {
            return Err(other(format!(
                "{}: `format` is {other_format:?}; expected \"e4m3\" or \"e5m2\"",
                dir.join("meta.json").display()
            )))
        }
    };
    let (a, b, d) = (read("a.bin")?, read("b.bin")?, read("d.bin")?);
    if a.len() != m * k || b.len() != n * k || d.len() != 4 * m * n {
        return Err(other(format!(
            "{}: a.bin, b.bin and d.bin hold {}, {} and {} bytes; m = {m}, n = {n}, k = {k} need \
             {}, {} and {}",
            dir.display(),
            a.len(),
            b.len(),
            d.len(),
            m * k,
            n * k,
            4 * m * n
        )));
    }
    // Unit scales: the tensor core's own arithmetic on the codes. The block spans K rounded
    // up to whole tensor-core steps, so that the last step is a partial one, as the
    // hardware's zero padding makes it.
    let operand = |codes: Vec<u8>, rows: usize| Quantized {
        format,
        rows,
        cols: k,
        block: [rows.max(1), k.max(1).next_multiple_of(MMA_K)],
        codes,
        scales: vec![1.0],
    };
    Ok(Measured {
        name: dir.display().to_string(),
        a: operand(a, m),
        b: operand(b, n),
        d: d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        promote_every: meta["promote_every"].as_u64().map(|p| p as usize),
        instruction: meta["instruction"].as_str().unwrap_or("").to_string(),
    })
}

fn fp8_calibrate(args: &CalibrateArgs) -> Result<(), Failure> {
    let models = [
        ("h100", Datapath::H100),
        ("truncate:14", Datapath::Truncating { bits: 14 }),
        ("truncate:23", Datapath::Truncating { bits: 23 }),
    ];
    let mut cases = Vec::new();
    let mut text = String::new();
    for dir in &args.dirs {
        let c = read_measured(dir)?;
        let (m, n, k) = (c.a.rows, c.b.rows, c.a.cols);
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "{}: {m}×{k} · {k}×{n} {:?}{}, promoted {}\n",
                c.name,
                c.a.format,
                if c.instruction.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.instruction)
                },
                c.promote_every
                    .map_or("never".to_string(), |p| format!("every {p}"))
            ),
        );
        let mut rows = Vec::new();
        for (name, datapath) in models {
            let acc = Accumulation {
                datapath,
                promote_every: c.promote_every,
                step: MMA_K,
            };
            let got = fp8_product(&c.a, &c.b, acc, false);
            let exact = got
                .iter()
                .zip(&c.d)
                .filter(|(g, d)| g.to_bits() == d.to_bits())
                .count();
            let worst = got
                .iter()
                .zip(&c.d)
                .map(|(&g, &d)| {
                    (f64::from(g) - f64::from(d)).abs() / f64::from(d).abs().max(f64::MIN_POSITIVE)
                })
                .fold(0.0, f64::max);
            let _ = std::fmt::Write::write_fmt(
                &mut text,
                format_args!(
                    "  {name:<12} {exact:>7} of {} bit for bit ({:.2}%), largest relative difference {worst:.2e}\n",
                    got.len(),
                    100.0 * exact as f64 / got.len().max(1) as f64
                ),
            );
            rows.push(serde_json::json!({
                "model": name,
                "bit_exact": exact,
                "of": got.len(),
                "max_rel_difference": worst,
            }));
        }
        cases.push(serde_json::json!({
            "dir": c.name,
            "m": m, "n": n, "k": k,
            "instruction": c.instruction,
            "promote_every": c.promote_every,
            "models": rows,
        }));
    }
    if args.json {
        out(&format!("{:#}\n", serde_json::json!({ "cases": cases })));
    } else {
        out(&text);
    }
    Ok(())
}

/// `model` with every FP8 format of its policy replaced by BF16: the baseline of
/// `fp8-vs-bf16`. `None` when the policy uses no FP8.
pub fn bf16_baseline(model: &Model) -> Option<Model> {
    let p = &model.precision;
    let uses_fp8 = [p.linear, p.linear_grad, p.head, p.kv_cache]
        .iter()
        .any(|f| f.is_fp8());
    uses_fp8.then(|| Model {
        precision: p.mapped(|f| if f.is_fp8() { Format::Bf16 } else { f }),
        ..model.clone()
    })
}

/// One run's curve: `(step, loss, main_loss)` per step and `(step, val_loss)` per evaluation.
struct Curve {
    train: Vec<(u64, f64, f64)>,
    val: Vec<(u64, f64)>,
    seconds: f64,
}

struct Setup<'a> {
    steps: u64,
    seed: u64,
    eval_every: u64,
    eval_batches: usize,
    dataset: &'a data::Dataset,
    curves: &'a mut std::fs::File,
}

fn train_curve(label: &str, model: &Model, s: &mut Setup) -> Result<Curve, Failure> {
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let compiled = compile(model).map_err(|e| other(e.to_string()))?;
    let forward = compiled.forward.graph();
    let window = t + max_token_offset(forward) as usize - 1;
    let mut batcher = Batcher::new(s.dataset.train.clone(), b, window, s.seed)
        .map_err(|e| other(e.to_string()))?;
    let settings = compiled.train.settings();
    let config = TrainConfig::of(settings, s.steps, s.seed).emulating(settings);
    let emulate = config.emulate.clone();
    let mut trainer = Trainer::new(&compiled.train, config, init_params(forward, s.seed));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut curve = Curve {
        train: Vec::new(),
        val: Vec::new(),
        seconds: 0.0,
    };
    while trainer.step < s.steps {
        let st = trainer
            .step(&batcher.next_batch(), t)
            .map_err(|e| other(e.to_string()))?;
        let step = trainer.step;
        if st.skipped {
            return Err(other(format!(
                "the {label} run's loss became {} at step {}; lower train.lr or raise \
                 train.warmup",
                st.loss,
                step + 1
            )));
        }
        curve.train.push((step, st.loss, st.main_loss));
        let mut line = serde_json::json!({
            "run": label, "seed": s.seed, "step": step, "loss": st.loss, "main_loss": st.main_loss,
            "lr": st.lr, "grad_norm": st.grad_norm,
        });
        let eval_now = step % s.eval_every == 0 || step == s.steps;
        if eval_now {
            let batches = data::val_batches(&s.dataset.val, b, window)
                .map_err(|e| other(e.to_string()))?
                .filter(|batch| batch.inputs.len() == b * window)
                .take(s.eval_batches);
            let val = eval_loss(
                &compiled.forward,
                trainer.params().map_err(|e| other(e.to_string()))?,
                batches,
                t,
                emulate.as_ref(),
            )
            .map_err(|e| other(e.to_string()))?;
            curve.val.push((step, val));
            line["val_loss"] = val.into();
        }
        writeln!(s.curves, "{line}").map_err(|e| other(format!("cannot write curves: {e}")))?;
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / step as f64 * (s.steps - step) as f64;
        let val = curve
            .val
            .last()
            .map_or("–".to_string(), |v| format!("{:.4}", v.1));
        let progress = format!(
            "{label}: step {step}/{}  loss {:.4}  val {val}  ETA {eta:.0}s",
            s.steps, st.main_loss
        );
        if tty {
            eprint!("\r{progress}   ");
        } else if eval_now {
            eprintln!("{progress}");
        }
    }
    if tty {
        eprintln!();
    }
    curve.seconds = started.elapsed().as_secs_f64();
    Ok(curve)
}

/// One seed's pair of runs.
struct Pair {
    seed: u64,
    data: String,
    bf16: Curve,
    fp8: Curve,
}

impl Pair {
    fn final_val(c: &Curve) -> f64 {
        c.val.last().map_or(f64::NAN, |v| v.1)
    }

    /// The FP8 run's final validation loss relative to the BF16 run's.
    fn relative(&self) -> f64 {
        let (vb, vf) = (Pair::final_val(&self.bf16), Pair::final_val(&self.fp8));
        (vf - vb) / vb
    }
}

/// The mean of `xs` and its standard error (the sample standard deviation over √n; `None`
/// for fewer than two values).
pub fn mean_and_error(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let error = (xs.len() > 1).then(|| {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    });
    (mean, error)
}

fn fp8_vs_bf16(args: VsArgs, color: bool) -> Result<(), Failure> {
    let (spec_name, fp8) = load(args.spec.as_ref(), &mut Vec::new(), color)?;
    let Some(bf16) = bf16_baseline(&fp8) else {
        return Err(other(format!(
            "{spec_name} uses no FP8 format in [precision], so there is nothing to compare; \
             set e.g. linear = \"e4m3\" and linear_grad = \"e4m3\""
        )));
    };
    let steps = args.steps.unwrap_or(fp8.train.steps).max(1);
    let first_seed = args.seed.unwrap_or(fp8.train.seed);
    let eval_every = args.eval_every.unwrap_or((steps / 10).max(1)).max(1);
    let dir = args
        .out
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-fp8-vs-bf16", fp8.name)));
    fsutil::create_dir(&dir)?;
    let mut curves = fsutil::create_file(&dir.join("curves.jsonl"))?;
    let write = |name: &str, text: String| {
        fsutil::write_atomic(&dir.join(name), text.as_bytes())
            .map_err(|e| other(format!("cannot write {}: {e}", dir.join(name).display())))
    };
    let mut pairs: Vec<Pair> = Vec::new();
    for seed in first_seed..first_seed + args.seeds {
        let dataset = load_data(&fp8, args.data.as_deref(), seed)?;
        eprintln!(
            "fp8-vs-bf16 on {spec_name} ({}): {steps} steps of {} × {} tokens per run on {}, \
             seed {seed}{}, precision emulated",
            fp8.name,
            fp8.train.batch,
            fp8.train.seq_len,
            dataset.description,
            if args.seeds > 1 {
                format!(" ({} of {})", seed - first_seed + 1, args.seeds)
            } else {
                String::new()
            }
        );
        let mut setup = Setup {
            steps,
            seed,
            eval_every,
            eval_batches: args.eval_batches,
            dataset: &dataset,
            curves: &mut curves,
        };
        let pair = Pair {
            seed,
            data: dataset.description.clone(),
            bf16: train_curve("bf16", &bf16, &mut setup)?,
            fp8: train_curve("fp8", &fp8, &mut setup)?,
        };
        let name = if seed == first_seed {
            "plot.svg".to_string()
        } else {
            format!("plot-seed{seed}.svg")
        };
        write(&name, pair_plot(&fp8.name, &pair).to_svg())?;
        pairs.push(pair);
    }

    let relatives: Vec<f64> = pairs.iter().map(Pair::relative).collect();
    let (mean, error) = mean_and_error(&relatives);
    let first = &pairs[0];
    let runs: Vec<serde_json::Value> = pairs
        .iter()
        .map(|p| {
            serde_json::json!({
                "seed": p.seed,
                "data": p.data,
                "final_val_loss_bf16": Pair::final_val(&p.bf16),
                "final_val_loss_fp8": Pair::final_val(&p.fp8),
                "relative_difference": p.relative(),
                "seconds_bf16": p.bf16.seconds,
                "seconds_fp8": p.fp8.seconds,
            })
        })
        .collect();
    let summary = serde_json::json!({
        "spec": spec_name,
        "model": fp8.name,
        "steps": steps,
        "seed": first_seed,
        "seeds": args.seeds,
        "batch": fp8.train.batch,
        "seq_len": fp8.train.seq_len,
        "data": first.data,
        "eval_batches": args.eval_batches,
        "fp8": fp8.precision.fp8,
        "fp8_linear": fp8.precision.linear,
        "fp8_linear_grad": fp8.precision.linear_grad,
        "final_val_loss_bf16": Pair::final_val(&first.bf16),
        "final_val_loss_fp8": Pair::final_val(&first.fp8),
        "relative_difference": mean,
        "standard_error": error,
        "runs": runs,
        "paper_bound": 0.0025,
        "seconds_bf16": pairs.iter().map(|p| p.bf16.seconds).sum::<f64>(),
        "seconds_fp8": pairs.iter().map(|p| p.fp8.seconds).sum::<f64>(),
    });
    write("summary.json", format!("{summary:#}\n"))?;
    let mut text = String::new();
    for p in &pairs {
        text += &format!(
            "seed {}: final validation loss BF16 {:.4}, FP8 {:.4}: FP8 is {:+.3}% relative\n",
            p.seed,
            Pair::final_val(&p.bf16),
            Pair::final_val(&p.fp8),
            100.0 * p.relative()
        );
    }
    let verdict = |x: f64| {
        if x.abs() < 0.0025 {
            "within"
        } else {
            "outside"
        }
    };
    match error {
        None => {
            let (vb, vf) = (Pair::final_val(&first.bf16), Pair::final_val(&first.fp8));
            text = format!(
                "final validation loss: BF16 {vb:.4}, FP8 {vf:.4}: FP8 is {:+.3}% relative ({} the paper's 0.25%)\n",
                100.0 * mean,
                verdict(mean)
            );
        }
        Some(se) => {
            text += &format!(
                "mean over {} seeds: FP8 is {:+.3}% ± {:.3}% (standard error) relative ({} the paper's 0.25%; \
                 ±2 standard errors span {:+.3}% to {:+.3}%)\n",
                pairs.len(),
                100.0 * mean,
                100.0 * se,
                verdict(mean),
                100.0 * (mean - 2.0 * se),
                100.0 * (mean + 2.0 * se)
            );
        }
    }
    text += &format!(
        "runs took {:.0} s (BF16) and {:.0} s (FP8)\nwritten: {} (curves.jsonl, plot.svg{}, summary.json)\n",
        summary["seconds_bf16"].as_f64().unwrap_or(0.0),
        summary["seconds_fp8"].as_f64().unwrap_or(0.0),
        dir.display(),
        if pairs.len() > 1 { ", plot-seed*.svg" } else { "" }
    );
    out(&text);
    Ok(())
}

/// Both runs of one seed: training and validation curves.
fn pair_plot(model: &str, pair: &Pair) -> Plot {
    let series = |name: &str, pts: Vec<(f64, f64)>, dashed| Series {
        name: name.to_string(),
        points: pts,
        dashed,
    };
    let train_pts = |c: &Curve| c.train.iter().map(|&(s, _, l)| (s as f64, l)).collect();
    let val_pts = |c: &Curve| c.val.iter().map(|&(s, v)| (s as f64, v)).collect();
    Plot {
        title: format!("{model}: FP8 vs BF16 (emulated), seed {}", pair.seed),
        x_label: "step".into(),
        y_label: "cross-entropy (main)".into(),
        series: vec![
            series("BF16 train", train_pts(&pair.bf16), false),
            series("FP8 train", train_pts(&pair.fp8), false),
            series("BF16 validation", val_pts(&pair.bf16), true),
            series("FP8 validation", val_pts(&pair.fp8), true),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_replaces_every_fp8_format_and_only_those() {
        let tiny = kiln_compiler::check::check(crate::spec::TINY.as_bytes()).unwrap();
        let base = bf16_baseline(&tiny).expect("tiny trains in FP8");
        assert_eq!(base.precision.linear, Format::Bf16);
        assert_eq!(base.precision.linear_grad, Format::Bf16);
        assert_eq!(base.precision.fp8, None);
        assert_eq!(base.precision.norm, tiny.precision.norm, "fp32 norms stay");
        assert_eq!(base.precision.moments, tiny.precision.moments);
        assert_eq!(bf16_baseline(&base), None, "nothing left to replace");
    }

    #[test]
    fn promotion_keeps_the_accumulation_error_from_growing_with_k() {
        let cells = accumulation_table(
            Datapath::Truncating { bits: 14 },
            MMA_K,
            8,
            1,
            Inputs::Uniform,
        );
        let at = |k, p| {
            cells
                .iter()
                .find(|c| c.k == k && c.promote_every == p)
                .copied()
                .unwrap()
        };
        // Without promotion the error grows with K; with promotion every 128 it does not.
        assert!(at(16384, None).max_rel_error > 4.0 * at(1024, None).max_rel_error);
        assert!(at(16384, Some(128)).max_rel_error < 2.0 * at(1024, Some(128)).max_rel_error);
        for k in ACCUM_K {
            assert!(
                at(k, Some(128)).max_rel_error < at(k, None).max_rel_error,
                "K = {k}"
            );
            assert!(
                at(k, Some(32)).max_rel_error <= at(k, Some(512)).max_rel_error,
                "K = {k}"
            );
        }
        assert_eq!(cells.len(), ACCUM_K.len() * ACCUM_PROMOTE.len());
    }
}
