//! `kiln verify`: one training step of a spec's CUDA plan on a device against the interpreter
//! on the same parameters and batch, every value every node computes compared.

use std::path::PathBuf;
use std::time::Instant;

use kiln_compiler::ir::Def;
use kiln_compiler::program::compile;
use kiln_runtime::device::verify::{compare, narrowest, node_values, tolerance, Compared};
use kiln_runtime::device::DeviceKind;
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::numerics::Emulation;
use kiln_runtime::train::{feed_inputs, init_params};

use crate::engine;
use crate::output::out;
use crate::spec::load;
use crate::{other, Failure};

/// The command's arguments (see `kiln verify --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The spec [default: the built-in specs/tiny.toml].
    pub spec: Option<PathBuf>,
    /// The device whose run is checked: `cuda-emulated` or `cuda`.
    #[arg(long, default_value = "cuda-emulated")]
    pub device: DeviceKind,
    /// Seed of the parameters' initialization (the batch is the built-in corpus's first).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The relative L2 distance a value may be from the interpreter's [default: by the
    /// policy's narrowest format and the device, see docs/cuda.md].
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// How many of the farthest values to list.
    #[arg(long, default_value_t = 8)]
    pub show: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    if args.device == DeviceKind::Cpu {
        return Err(other(
            "kiln verify checks a device against the interpreter: use --device cuda-emulated \
             or --device cuda",
        ));
    }
    let (name, model) = load(args.spec.as_ref(), &mut Vec::new(), color)?;
    let compiled = compile(&model).map_err(|e| other(e.to_string()))?;
    let program = &compiled.train;
    let graph = program.graph();
    let settings = program.settings();
    let b = settings.batch as usize;
    let (mut batcher, t) = engine::builtin_batcher(&model, compiled.forward.graph(), 1 << 16)?;
    let batch = batcher.next_batch();
    let params = init_params(compiled.forward.graph(), args.seed);
    let inputs = feed_inputs(graph, &batch, t);
    let feed = Feed {
        params: &params,
        inputs: &inputs,
        weights: None,
    };
    let keep = node_values(graph);
    let format = narrowest(&settings.formats);
    let bound = args
        .tolerance
        .unwrap_or_else(|| tolerance(args.device, format));

    // The device first: a missing driver fails before the interpreter's step.
    let runner = engine::device_runner(program, args.device, &keep, true)?;
    // The interpreter, emulating the policy below f32 as the plan's kernels and GEMMs run it:
    // GEMM operands in their nodes' formats, every value stored in f32 (the plan does not
    // store kept activations in the policy's formats yet).
    let started = Instant::now();
    let exec = Executor::new(program, &keep);
    let exec = if format == kiln_compiler::model::Format::Fp32 {
        exec
    } else {
        exec.emulating(&Emulation::of(&settings.formats).with_f32_storage())
    };
    let cpu = exec
        .run(&feed)
        .map_err(|e| other(format!("the interpreter: {e}")))?;
    let cpu_s = started.elapsed().as_secs_f64();
    eprintln!("interpreter: one step in {cpu_s:.1} s");
    let started = Instant::now();
    let dev = runner
        .run(&feed)
        .map_err(|e| other(format!("--device {}: {e}", args.device)))?;
    let dev_s = started.elapsed().as_secs_f64();
    eprintln!("{}: one step in {dev_s:.1} s", args.device);

    let all = compare(&keep, &cpu, &dev);
    // A value that vanishes in exact arithmetic (a key bias's gradient) holds rounding noise
    // on both sides: beyond the bound but below 1e-7 of the largest norm on both, it is
    // excused, and counted.
    let largest = all
        .iter()
        .filter(|c| c.cpu.is_finite())
        .fold(0f64, |m, c| m.max(c.cpu));
    let floor = 1e-7 * largest;
    // `error` is never NaN (a NaN distance is infinite).
    let beyond = |c: &&Compared| c.error > bound;
    let excused = all
        .iter()
        .filter(beyond)
        .filter(|c| c.vanishes(floor))
        .count();
    let judged: Vec<&Compared> = all
        .iter()
        .filter(|c| !(beyond(c) && c.vanishes(floor)))
        .collect();
    let failed: Vec<&Compared> = judged.iter().copied().filter(beyond).collect();
    let mut worst = judged.clone();
    worst.sort_by(|a, b| b.error.total_cmp(&a.error));
    let shown = if failed.is_empty() {
        &worst[..worst.len().min(args.show)]
    } else {
        &worst[..failed.len().max(args.show.min(worst.len()))]
    };
    let describe = |c: &Compared| {
        let v = &graph.values[c.value];
        match v.def {
            Def::Node { node, .. } => {
                let n = &graph.nodes[node];
                (node.index(), n.op.name(), n.path.clone(), n.format.name())
            }
            _ => (0, "input", String::new(), "-"),
        }
    };
    let nodes = {
        let mut n: Vec<usize> = all.iter().map(|c| describe(c).0).collect();
        n.dedup();
        n.len()
    };
    let worst_error = worst.first().map_or(0.0, |c| c.error);
    if args.json {
        let rows: Vec<serde_json::Value> = shown
            .iter()
            .map(|c| {
                let (node, op, path, format) = describe(c);
                serde_json::json!({
                    "value": c.value.index(), "node": node, "op": op, "path": path,
                    "format": format, "error": finite(c.error), "element": finite(c.element),
                })
            })
            .collect();
        let o = serde_json::json!({
            "spec": name, "model": model.name, "device": args.device.name(),
            "narrowest_format": format.name(), "tolerance": bound,
            "values": all.len(), "nodes": nodes, "vanishing": excused,
            "failed": failed.len(), "worst_error": finite(worst_error),
            "passed": failed.is_empty(), "interpreter_s": cpu_s, "device_s": dev_s,
            "worst": rows,
        });
        out(&format!("{o}\n"));
    } else {
        let mut text = format!(
            "{} ({name}): one training step on {} against the interpreter{}, batch {b} × {t}, \
             buffers poisoned with NaN\n  {} values of {nodes} nodes compared; tolerance {bound:.1e} relative L2 (narrowest \
             format {}); {excused} beyond it excused as vanishing on both sides\n  \
             {:>9}  {:>9}  {:>5}  {:<18} {:<6} path\n",
            model.name,
            args.device,
            if format == kiln_compiler::model::Format::Fp32 {
                ""
            } else {
                " (policy emulated)"
            },
            all.len(),
            format.name(),
            "error",
            "element",
            "node",
            "op",
            "format",
        );
        for c in shown {
            let (node, op, path, format) = describe(c);
            let flag = if c.error <= bound { " " } else { "!" };
            text.push_str(&format!(
                "{flag} {:>9.2e}  {:>9.2e}  {node:>5}  {op:<18} {format:<6} {path}\n",
                c.error, c.element
            ));
        }
        text.push_str(&if failed.is_empty() {
            format!("  all within tolerance (worst {worst_error:.2e})\n")
        } else {
            format!("  {} values beyond tolerance (marked !)\n", failed.len())
        });
        out(&text);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(other(format!(
            "{} of {} values differ from the interpreter by more than {bound:.1e}",
            failed.len(),
            judged.len()
        )))
    }
}

/// JSON has no infinity: an infinite distance (a NaN on the device) is `null`.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}
