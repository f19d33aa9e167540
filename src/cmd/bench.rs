//! `kiln bench`: the speed of one training step beside the machine's single-GEMM rate,
//! measured in the same run, as docs/perf.md quotes them.

use std::path::PathBuf;
use std::time::Instant;

use kiln_compiler::analyze::analyze;
use kiln_compiler::program::compile;
use kiln_runtime::cpu::matmul::matmul;
use kiln_runtime::exec::KeptBytes;
use kiln_runtime::train::{init_params, TrainConfig};
use serde_json::value::RawValue;

use kiln_compiler::model::Model;

use crate::cmd::gemms;
use crate::engine::{self, Specialized};
use crate::output::{self, number, out};
use crate::spec::load;
use crate::{other, Failure};
use kiln_runtime::device::DeviceKind;

/// The command's arguments (see `kiln bench --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec [default: the built-in specs/tiny.toml].
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub flags: Flags,
}

/// The flags of `kiln bench`, shared with the `bench` command of specialized binaries.
#[derive(clap::Args)]
pub struct Flags {
    /// Timed steps (after two warm-up steps); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Print one JSON object (the keys docs/perf.md quotes).
    #[arg(long)]
    pub json: bool,
    /// Time the step with the spec's precision policy emulated (as `kiln train
    /// --emulate-precision`; interpreter only).
    #[arg(long)]
    pub emulate_precision: bool,
    /// Also measure the heap: the most bytes live during the timed steps (above what was
    /// live before the parameters were made), beside the analyzer's memory report for the
    /// run's storage: every tensor in f32 (and the memory plan's peak of intermediates), or
    /// with --emulate-precision the spec's policy (moments and kept activations stored in
    /// their formats).
    #[arg(long, conflicts_with = "generate")]
    pub memory: bool,
    /// Time KV-cached generation instead of training: `train.batch` sequences from a
    /// one-token prompt, greedy, until the model's positions (at most 128 tokens) are full;
    /// reports tokens/s and the cache's measured bytes per token beside the analyzer's.
    #[arg(long, conflicts_with = "emulate_precision")]
    pub generate: bool,
    /// Where the timed training steps run (as `kiln train --device`): `cpu`,
    /// `cuda-emulated` or `cuda`.
    #[arg(long, default_value = "cpu", conflicts_with = "generate")]
    pub device: DeviceKind,
    /// Time the device's GEMMs instead of training: BF16 against block-scaled FP8 (E4M3,
    /// 1×128 activation tiles, 128×128 weight blocks) for each shape, `y = x · wᵀ`. `v3`
    /// (the default) is DeepSeek-V3's shapes (k × n: 7168×2048, 2048×7168, 7168×18432) with
    /// `--tokens` rows; or `MxNxK,…`. Needs `--device cuda` or `cuda-emulated`.
    #[arg(long, num_args = 0..=1, default_missing_value = "v3", value_name = "SHAPES",
          conflicts_with_all = ["generate", "memory", "emulate_precision"])]
    pub gemms: Option<String>,
    /// Rows (tokens) of `--gemms v3`'s products.
    #[arg(long, default_value_t = 4096)]
    pub tokens: u64,
    /// Sequences per step instead of the spec's `train.batch` (a spec's batch for a long
    /// CPU run may not fit a GPU's memory, or the other way round). Not for a specialized
    /// binary, whose step is built for the spec's shapes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Option<u64>,
    /// Tokens per sequence instead of the spec's `train.seq_len` (at most
    /// `model.max_positions`). Not for a specialized binary.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub seq: Option<u64>,
}

/// `model` with `--batch` and `--seq` in place of its training shapes.
fn with_shape(model: &Model, args: &Flags, built: bool) -> Result<Model, Failure> {
    if args.batch.is_none() && args.seq.is_none() {
        return Ok(model.clone());
    }
    if built {
        return Err(other(
            "--batch and --seq change the step's shapes, which a specialized binary has built in; \
             use `kiln bench SPEC --batch N` instead"
                .to_string(),
        ));
    }
    let mut model = model.clone();
    if let Some(b) = args.batch {
        model.train.batch = b;
    }
    if let Some(t) = args.seq {
        if t > model.max_positions {
            return Err(other(format!(
                "--seq {t} is longer than the model's {} positions (model.max_positions)",
                model.max_positions
            )));
        }
        model.train.seq_len = t;
    }
    Ok(model)
}

/// GFLOP/s of an f32 `n × n × n` matrix product: the best of `reps` runs.
fn gemm_rate(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let b = a.clone();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        matmul(n, n, n, &a, false, &b, false, &mut c, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    let (name, model) = load(args.spec.as_ref(), &mut Vec::new(), color)?;
    run_model(&name, &model, &args.flags, None)
}

/// `kiln bench --memory`: the measured heap peak of the timed steps beside the analyzer's
/// report.
///
/// Plain runs store every tensor in f32, so they are compared with the report for an
/// all-f32 policy, and with the memory plan's peak of intermediates. Emulated runs
/// (`kept` is the executor's packing of activations) store moments and kept activations
/// as the policy says, and are compared with the policy's own report.
fn memory_report(
    name: &str,
    model: &Model,
    compiled: &kiln_compiler::program::Compiled,
    measured: usize,
    kept: Option<KeptBytes>,
    json: bool,
) -> Result<(), Failure> {
    let reported = match kept {
        Some(_) => model.clone(),
        None => Model {
            precision: model
                .precision
                .mapped(|_| kiln_compiler::model::Format::Fp32),
            ..model.clone()
        },
    };
    let m = analyze(&reported).memory;
    let state = m.master_bytes + m.grads_bytes + m.moments_bytes;
    let estimate = m.total_bytes;
    let planned = state + u128::from(compiled.train.plan().peak_bytes);
    let ratio = measured as f64 / estimate as f64;
    let mib = |b: f64| b / (1 << 20) as f64;
    if json {
        let mut o = serde_json::json!({
            "spec": name, "mode": "memory", "emulated": kept.is_some(),
            "measured_peak_bytes": measured, "analyzer_bytes": estimate as f64,
            "state_bytes": state as f64, "weights_bytes": m.weights_bytes as f64,
            "activations_bytes": m.activations_bytes as f64,
            "scales_bytes": m.scales_bytes as f64, "measured_over_analyzer": ratio,
        });
        match kept {
            Some(k) => {
                o["kept_half_bytes"] = k.half.into();
                o["kept_fp8_bytes"] = k.fp8.into();
                o["kept_scale_bytes"] = k.scales.into();
            }
            None => o["planned_bytes"] = (planned as f64).into(),
        }
        out(&format!("{o}\n"));
        return Ok(());
    }
    let storage = match kept {
        Some(_) => "storage as the precision policy says (emulated)",
        None => "every tensor in f32",
    };
    let mut text = format!(
        "{} ({name}), heap during training steps, batch {} × {} tokens, {storage}\n  \
         measured peak   {:>10.2} MiB\n  \
         analyzer        {:>10.2} MiB (master weights, gradients and moments {:.2} MiB + working weight copies {:.2} MiB + saved activations {:.2} MiB + FP8 scales {:.2} MiB)\n",
        model.name,
        model.train.batch,
        model.train.seq_len,
        mib(measured as f64),
        mib(estimate as f64),
        mib(state as f64),
        mib(m.weights_bytes as f64),
        mib(m.activations_bytes as f64),
        mib(m.scales_bytes as f64),
    );
    match kept {
        Some(k) => text += &format!(
            "  kept            {:>10.2} MiB (activations packed for the backward pass: {:.2} MiB 16-bit, {:.2} MiB FP8 + {:.2} MiB scales)\n",
            mib(k.total() as f64),
            mib(k.half as f64),
            mib(k.fp8 as f64),
            mib(k.scales as f64),
        ),
        None => text += &format!(
            "  planned         {:>10.2} MiB (state + the memory plan's peak of intermediates)\n",
            mib(planned as f64)
        ),
    }
    text += &format!("  measured / analyzer {ratio:>6.3}\n");
    out(&text);
    Ok(())
}

/// `kiln bench --generate`: greedy KV-cached generation of `train.batch` sequences.
fn run_generate(name: &str, model: &Model, args: &Flags) -> Result<(), Failure> {
    use kiln_runtime::decode::Decoder;
    use kiln_runtime::generate::{generate_in, Sampling};
    let report = analyze(model);
    let mut m = model.clone();
    m.train.batch = 1;
    m.train.seq_len = 1;
    let program = kiln_compiler::program::compile_forward(&m).map_err(|e| other(e.to_string()))?;
    let graph = program.graph();
    let params = init_params(graph, 0);
    let format = kiln_runtime::decode::cache_format(model.precision.kv_cache);
    let batch = model.train.batch as usize;
    let tokens = (model.max_positions as usize).min(128);
    // One-token prompts and `tokens` more, within the model's positions.
    let capacity = (tokens as u64 + 1).min(model.max_positions);
    let decode = kiln_compiler::program::compile_decode(&m, batch as u64, capacity)
        .map_err(|e| other(e.to_string()))?;
    let decoder = Decoder::new(&decode, graph, &params).map_err(|e| other(e.to_string()))?;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| vec![(i as u32 * 7) % model.vocab as u32])
        .collect();
    let sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_tokens: tokens,
        stop: Vec::new(),
        seed: 0,
    };
    let mut times = Vec::new();
    let mut generated = 0;
    let mut cache_bytes = 0.0;
    for _ in 0..args.steps.clamp(1, 5) {
        let mut cache = decoder
            .cache(batch, tokens, format)
            .map_err(|e| other(e.to_string()))?;
        cache_bytes = cache.bytes_per_token();
        let start = Instant::now();
        let out = generate_in(&decoder, &mut cache, &prompts, &sampling)
            .map_err(|e| other(e.to_string()))?;
        times.push(start.elapsed().as_secs_f64());
        generated = out.iter().map(|c| c.tokens.len()).sum::<usize>();
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tps = generated as f64 / median;
    let analyzer = report.kv_cache.bytes_per_token;
    if args.json {
        out(&format!(
            "{}\n",
            serde_json::json!({
                "spec": name, "mode": "generate", "batch": batch, "tokens_per_sequence": tokens,
                "threads": rayon::current_num_threads(), "seconds": median, "tokens_per_s": tps,
                "cache_format": format.name(), "cache_bytes_per_token": cache_bytes,
                "analyzer_bytes_per_token": analyzer as f64,
            })
        ));
    } else {
        out(&format!(
            "{} ({name}), KV-cached generation: {batch} sequences × {tokens} tokens, greedy, {} threads, median of {} runs\n  \
             time            {:>10.1} ms\n  tokens/s        {:>10.0}\n  \
             cache           {:>10} bytes per token ({format}; the analyzer says {analyzer})\n",
            model.name,
            rayon::current_num_threads(),
            times.len(),
            median * 1e3,
            tps,
            cache_bytes,
        ));
    }
    Ok(())
}

/// `kiln bench --gemms`: BF16 against FP8 GEMMs on the device, one line per shape.
fn run_gemms(shapes: &str, args: &Flags) -> Result<(), Failure> {
    let shapes =
        gemms::parse_shapes(shapes, args.tokens).map_err(|e| other(format!("--gemms {e}")))?;
    if args.device == DeviceKind::Cpu {
        return Err(other(
            "--gemms times a device's GEMMs: add --device cuda (or cuda-emulated)",
        ));
    }
    let mut device = engine::open(args.device)?;
    let what = device.describe();
    let timings = gemms::run(&mut *device, &shapes, args.steps as usize, |line| {
        eprintln!("{line}")
    })
    .map_err(other)?;
    if args.json {
        let o = serde_json::json!({
            "mode": "gemms", "device": args.device.name(), "describe": what,
            "reps": args.steps, "gemms": timings,
        });
        out(&format!("{o}\n"));
    } else {
        let mut text = format!(
            "GEMMs on {what}, y = x · wᵀ, median of {} runs\n  {:>22}  {:>10} {:>10}  {:>10} {:>10}  {:>7}\n",
            args.steps, "m × n × k", "bf16 ms", "TFLOP/s", "fp8 ms", "TFLOP/s", "fp8 ×"
        );
        for g in &timings {
            text.push_str(&format!(
                "  {:>22}  {:>10.3} {:>10.1}  {:>10.3} {:>10.1}  {:>7.2}\n",
                format!("{} × {} × {}", g.m, g.n, g.k),
                g.bf16_ms,
                g.bf16_tflops,
                g.fp8_ms,
                g.fp8_tflops,
                g.fp8_speedup
            ));
        }
        out(&text);
    }
    Ok(())
}

/// Benchmarks `model`'s training step, run by the interpreter or, for a specialized binary, by
/// its generated step (or, with `--generate`, its KV-cached generation).
pub(crate) fn run_model(
    name: &str,
    model: &Model,
    args: &Flags,
    built: Option<&Specialized>,
) -> Result<(), Failure> {
    if args.generate {
        // Generation runs kiln's decoder, the same in a specialized binary.
        return run_generate(name, model, args);
    }
    if let Some(shapes) = &args.gemms {
        return run_gemms(shapes, args);
    }
    let model = &with_shape(model, args, built.is_some())?;
    let report = analyze(model);
    let compiled = compile(model).map_err(|e| other(e.to_string()))?;
    let forward = compiled.forward.graph();
    let b = model.train.batch as usize;
    let (mut batcher, t) = engine::builtin_batcher(model, forward, 1 << 20)?;
    let settings = compiled.train.settings();
    // The spec's AdamW (a device's optimizer launches bake it in), at a small constant rate.
    let config = TrainConfig {
        lr: 1e-4,
        warmup: 0,
        cosine: false,
        min_lr: 0.0,
        ..TrainConfig::of(settings, args.steps + 2, 0)
    };
    engine::check_device(args.device, args.emulate_precision)?;
    let config = engine::emulating(config, settings, args.emulate_precision, built, "bench")?;
    let heap_before = crate::heap::live();
    let params = init_params(forward, 0);
    let mut trainer = engine::trainer(&compiled.train, config, params, built, args.device)?;
    let engine = match (args.device, built.is_some(), args.emulate_precision) {
        (DeviceKind::CudaEmulated, ..) => "CUDA plan, emulated on the host",
        (DeviceKind::Cuda, ..) => "CUDA plan on the GPU",
        (_, true, _) => "generated step",
        (_, false, true) => "interpreter, emulated precision",
        (_, false, false) => "interpreter",
    };
    // The ceiling: the CPU's f32 product, or the device's bf16 one.
    let (ceiling, ceiling_what) = match args.device {
        DeviceKind::Cpu => (gemm_rate(1024, 5), "f32 1024³".to_string()),
        device => {
            let n = if device == DeviceKind::Cuda {
                8192
            } else {
                256
            };
            let mut d = engine::open(device)?;
            let s = gemms::bf16_time(&mut *d, [n; 3], 5)
                .map_err(|e| other(format!("--device {device}: {e}")))?;
            (
                2.0 * (n as f64).powi(3) / s / 1e9,
                format!("bf16 {n}³ on the device"),
            )
        }
    };
    // Warm up, then time each step; report the median.
    for _ in 0..2 {
        trainer
            .step(&batcher.next_batch(), t)
            .map_err(|e| other(e.to_string()))?;
    }
    let mut times = Vec::new();
    crate::heap::reset_peak();
    for _ in 0..args.steps.max(1) {
        let batch = batcher.next_batch();
        let start = Instant::now();
        trainer.step(&batch, t).map_err(|e| other(e.to_string()))?;
        times.push(start.elapsed().as_secs_f64());
    }
    let heap_peak = crate::heap::peak().saturating_sub(heap_before);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if args.memory {
        let kept = if args.emulate_precision {
            trainer.kept_bytes()
        } else {
            None
        };
        return memory_report(name, model, &compiled, heap_peak, kept, args.json);
    }
    let tokens = (b * t) as f64;
    let flops = report.flops.train_per_step as f64;
    let achieved = flops / median / 1e9;
    let threads = rayon::current_num_threads();
    if args.json {
        #[derive(serde::Serialize)]
        struct Step<'a> {
            spec: &'a str,
            engine: &'a str,
            threads: usize,
            batch: usize,
            seq_len: usize,
            step_s: Box<RawValue>,
            tokens_per_s: Box<RawValue>,
            train_gflop_per_step: Box<RawValue>,
            achieved_gflops: Box<RawValue>,
            gemm_gflops: Box<RawValue>,
            gemm: &'a str,
            fraction_of_gemm: Box<RawValue>,
        }
        let digits = |n: usize| move |x: f64| format!("{x:.n$}");
        let line = output::line(&Step {
            spec: name,
            engine,
            threads,
            batch: b,
            seq_len: t,
            step_s: number(median, digits(5)),
            tokens_per_s: number(tokens / median, digits(1)),
            train_gflop_per_step: number(flops / 1e9, digits(3)),
            achieved_gflops: number(achieved, digits(1)),
            gemm_gflops: number(ceiling, digits(1)),
            gemm: &ceiling_what,
            fraction_of_gemm: number(achieved / ceiling, digits(3)),
        });
        out(&format!("{line}\n"));
    } else {
        out(&format!(
            "{} ({name}, {engine}), batch {b} × {t} tokens, {threads} threads, median of {} steps\n  \
             step            {:>10.1} ms\n  tokens/s        {:>10.0}\n  achieved        {:>10.1} GFLOP/s ({:.3} GFLOP per step by the analyzer's count)\n  \
             single GEMM     {:>10.1} GFLOP/s ({}, same run)\n  fraction        {:>10.1} % of the GEMM rate\n",
            model.name,
            times.len(),
            median * 1e3,
            tokens / median,
            achieved,
            flops / 1e9,
            ceiling,
            ceiling_what,
            100.0 * achieved / ceiling
        ));
    }
    Ok(())
}
