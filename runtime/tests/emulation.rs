//! Training under an emulated precision policy (`Executor::emulating`, `TrainConfig::emulate`):
//! an fp32 policy changes no bit, an FP8 policy changes the numbers by about what FP8's
//! rounding predicts and nothing breaks, gradient GEMMs take `linear_grad`'s format, bf16
//! moments are stored as bf16, and activations kept for the backward pass are stored as the
//! policy says (FP8 tiles for FP8 GEMMs, bf16 otherwise, statistics in f32).

use kiln_compiler::autodiff::differentiate;
use kiln_compiler::check::check_str;
use kiln_compiler::ir::{Def, Graph, Node, Op, ValueId};
use kiln_compiler::lower::lower;
use kiln_compiler::model::{Format, Model};
use kiln_compiler::program::{Program, Settings, TrainOutputs};
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batch, Batcher};
use kiln_runtime::exec::Executor;
use kiln_runtime::numerics::store::{Half, Storage};
use kiln_runtime::numerics::{Emulation, Fp8Format};
use kiln_runtime::train::{init_params, max_token_offset, StepStats, TrainConfig, Trainer};

const MICRO: &str = include_str!("../../tests/specs/micro.toml");

/// micro with a precision policy: FP8 GEMMs in 8-wide tiles and 8×8 blocks (micro's widths
/// are multiples of 8), the paper's keep list, bf16 moments.
fn with_policy(linear: &str, linear_grad: &str) -> Model {
    let spec = format!(
        "{MICRO}\n[precision]\ncompute = \"bf16\"\nlinear = \"{linear}\"\nlinear_grad = \"{linear_grad}\"\n\
         keep = [\"embed\", \"head\", \"moe.router\", \"*norm\", \"attn.core\"]\nmoments = \"bf16\"\n\n\
         [precision.fp8]\nact_tile = [1, 8]\nweight_block = [8, 8]\n"
    );
    check_str(&spec).unwrap_or_else(|e| panic!("{e:?}"))
}

fn all_fp32() -> Model {
    let spec = format!("{MICRO}\n[precision]\ncompute = \"fp32\"\nmoments = \"fp32\"\n");
    check_str(&spec).unwrap_or_else(|e| panic!("{e:?}"))
}

struct Run {
    stats: Vec<StepStats>,
    params: Vec<Vec<f32>>,
    moments: Vec<Vec<f32>>,
}

/// `model`'s forward and training graphs, its `seq_len`, and its first `steps` batches of a
/// fixed corpus.
struct Fixture {
    fwd: Graph,
    full: Program,
    t: usize,
    batches: Vec<Batch>,
}

impl Fixture {
    fn new(model: &Model, steps: u64) -> Fixture {
        let fwd = lower(model).unwrap();
        let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
        let full = Program::new(full, Settings::of(model)).unwrap();
        let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
        let window = t + max_token_offset(&fwd) as usize - 1;
        let tokens: Vec<u32> = byte_tokens(&builtin_corpus(0, 1 << 16))
            .into_iter()
            .map(|x| x % 128)
            .collect();
        let mut batcher = Batcher::new(tokens, b, window, 0).unwrap();
        let batches = (0..steps).map(|_| batcher.next_batch()).collect();
        Fixture {
            fwd,
            full,
            t,
            batches,
        }
    }

    /// A trainer from the initial parameters of seed 0.
    fn trainer(&self, config: TrainConfig) -> Trainer<'_> {
        Trainer::new(&self.full, config, init_params(&self.fwd, 0))
    }
}

fn train(model: &Model, emulate: bool, steps: u64) -> Run {
    let f = Fixture::new(model, steps);
    let mut config = TrainConfig::of(f.full.settings(), steps, 0);
    if emulate {
        config = config.emulating(f.full.settings());
    }
    let mut trainer = f.trainer(config);
    let stats = f
        .batches
        .iter()
        .map(|batch| trainer.step(batch, f.t).unwrap())
        .collect();
    Run {
        stats,
        moments: trainer.moments().unwrap().0.to_vec(),
        params: trainer.params().unwrap().to_vec(),
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|t| t.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn an_fp32_policy_emulates_to_the_same_bits() {
    let model = all_fp32();
    let (plain, emulated) = (train(&model, false, 3), train(&model, true, 3));
    assert_eq!(plain.stats, emulated.stats);
    assert_eq!(bits(&plain.params), bits(&emulated.params));
}

#[test]
fn an_fp8_policy_moves_the_loss_a_little_and_stores_bf16_moments() {
    let model = with_policy("e4m3", "e4m3");
    let (plain, fp8) = (train(&model, false, 6), train(&model, true, 6));
    for (p, q) in plain.stats.iter().zip(&fp8.stats) {
        assert!(
            !q.skipped && q.loss.is_finite() && q.grad_norm.is_finite(),
            "{q:?}"
        );
        let rel = (p.loss - q.loss).abs() / p.loss;
        // E4M3 keeps 3 fraction bits (relative rounding up to 1/16 per operand); averaged
        // over a loss, the difference is far smaller but never zero.
        assert!(
            rel > 1e-7 && rel < 2e-2,
            "step loss {} vs {}: {rel}",
            p.loss,
            q.loss
        );
    }
    assert_ne!(bits(&plain.params), bits(&fp8.params));
    // Every stored moment is a bf16 value (its low 16 bits are zero), and some are not zero.
    assert!(fp8
        .moments
        .iter()
        .flatten()
        .all(|m| m.to_bits() & 0xFFFF == 0));
    assert!(fp8.moments.iter().flatten().any(|m| *m != 0.0));
    assert!(plain
        .moments
        .iter()
        .flatten()
        .any(|m| m.to_bits() & 0xFFFF != 0));
}

fn formats(g: &Graph, pick: impl Fn(&Op) -> bool) -> Vec<(String, Format)> {
    g.nodes
        .iter()
        .filter(|(_, n)| pick(&n.op))
        .map(|(_, n)| (n.path.clone(), n.format))
        .collect()
}

#[test]
fn gradient_gemms_take_the_linear_grad_format() {
    let model = with_policy("e4m3", "bf16");
    let fwd = lower(&model).unwrap();
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    let grads = formats(&full, |op| {
        matches!(op, Op::LinearGrad { .. } | Op::ExpertsGrad { .. })
    });
    let fwds = formats(&full, |op| {
        matches!(op, Op::Linear { .. } | Op::Experts { .. })
    });
    assert!(fwds.iter().any(|(_, f)| *f == Format::E4m3));
    for (path, f) in &grads {
        assert_eq!(*f, Format::Bf16, "{path}");
        let op = path.trim_end_matches(".grad");
        let kept = op.ends_with("head");
        let fwd_format = fwds.iter().find(|(p, _)| p == op).map(|(_, f)| *f);
        assert_eq!(
            fwd_format,
            Some(if kept { Format::Bf16 } else { Format::E4m3 }),
            "{op}"
        );
    }
    // And the other way round: FP8 only in the gradient GEMMs.
    let model = with_policy("bf16", "e4m3");
    let fwd = lower(&model).unwrap();
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    let grads = formats(&full, |op| matches!(op, Op::LinearGrad { .. }));
    let fp8: Vec<_> = grads.iter().filter(|(_, f)| *f == Format::E4m3).collect();
    assert!(
        !fp8.is_empty() && fp8.iter().all(|(p, _)| !p.contains("head")),
        "{grads:?}"
    );
}

/// The training Program of `model` and the index of the node computing its loss.
fn emulated(model: &Model) -> (Program, usize) {
    let fwd = lower(model).unwrap();
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    let loss = full.output("loss").unwrap();
    let Def::Node { node, .. } = full.values[loss].def else {
        panic!("the loss is computed")
    };
    (
        Program::new(full, Settings::of(model)).unwrap(),
        node.index(),
    )
}

#[test]
fn kept_activations_are_fp8_tiles_for_fp8_gemms_and_bf16_otherwise() {
    let model = with_policy("e4m3", "e4m3");
    let (program, loss_node) = emulated(&model);
    let g = program.graph();
    let keep = TrainOutputs::of(g).unwrap().values();
    let exec =
        Executor::new(&program, &keep).emulating(&Emulation::of(&program.settings().formats));
    let kept = exec.kept_activations();
    let readers = |v: ValueId| -> Vec<(usize, usize, &Node)> {
        g.nodes
            .iter()
            .flat_map(|(id, n)| {
                n.inputs
                    .iter()
                    .enumerate()
                    .filter(move |(_, &i)| i == v)
                    .map(move |(at, _)| (id.index(), at, n))
            })
            .collect()
    };
    let (mut fp8, mut half) = (0, 0);
    for &(v, storage) in &kept {
        let value = &g.values[v];
        let Def::Node { node, output } = value.def else {
            panic!("only computed values are kept")
        };
        let producer = &g.nodes[node];
        assert!(node.index() <= loss_node, "{}", producer.path);
        let r = readers(v);
        assert!(
            r.iter().any(|(n, _, _)| *n > loss_node),
            "{}",
            producer.path
        );
        // Statistics stay f32.
        assert!(!value.ty.shape.is_empty(), "{}", producer.path);
        assert!(!matches!(producer.op, Op::Router(_)), "{}", producer.path);
        assert!(
            !(matches!(producer.op, Op::Attention { .. }) && output == 1),
            "{}",
            producer.path
        );
        assert!(
            !r.iter()
                .any(|(_, at, n)| matches!(n.op, Op::CrossEntropyGrad) && *at == 0),
            "{}",
            producer.path
        );
        match storage {
            Storage::Fp8 { format, tile, .. } => {
                fp8 += 1;
                assert_eq!((format, tile), (Fp8Format::E4m3, 8));
                // Read as the activation operand of an FP8 GEMM forward, and only by FP8
                // weight-gradient GEMMs backward.
                for (n, at, reader) in r {
                    let gemm = if n > loss_node {
                        matches!(reader.op, Op::LinearGrad { .. } | Op::ExpertsGrad { .. })
                    } else {
                        matches!(reader.op, Op::Linear { .. } | Op::Experts { .. })
                    };
                    assert!(
                        gemm && at == 0 && reader.format == Format::E4m3,
                        "{} read by {}",
                        producer.path,
                        reader.path
                    );
                }
            }
            Storage::Half(h) => {
                half += 1;
                assert_eq!(h, Half::Bf16);
            }
        }
    }
    assert!(fp8 > 0 && half > 0, "{kept:?}");
    let bytes = exec.kept_bytes();
    assert!(
        bytes.fp8 > 0 && bytes.scales > 0 && bytes.half > bytes.fp8,
        "{bytes:?}"
    );

    // An fp32 policy keeps every activation as computed.
    let model = all_fp32();
    let (program, _) = emulated(&model);
    let keep = TrainOutputs::of(program.graph()).unwrap().values();
    let exec =
        Executor::new(&program, &keep).emulating(&Emulation::of(&program.settings().formats));
    assert!(exec.kept_activations().is_empty());
    assert_eq!(exec.kept_bytes().total(), 0);
}

/// One step of `model`'s training under `emulation`, from the same parameters and batch.
fn one_step(model: &Model, emulation: Emulation) -> StepStats {
    let f = Fixture::new(model, 1);
    let mut trainer = f.trainer(TrainConfig {
        emulate: Some(emulation),
        ..TrainConfig::of(f.full.settings(), 1, 0)
    });
    trainer.step(&f.batches[0], f.t).unwrap()
}

#[test]
fn storing_kept_activations_in_bf16_changes_the_gradients_not_the_forward_pass() {
    let model = with_policy("e4m3", "e4m3");
    let stored = Emulation::of(&Settings::of(&model).formats);
    let f32_kept = Emulation {
        activations: Format::Fp32,
        ..stored.clone()
    };
    let (a, b) = (one_step(&model, stored), one_step(&model, f32_kept));
    // Packing happens after the forward pass's last use: the losses agree to the bit.
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert_eq!(a.main_loss.to_bits(), b.main_loss.to_bits());
    // The backward pass reads bf16 values (relative rounding up to 2^-9 each; the norm of
    // the gradients moves by 3e-5).
    let rel = (a.grad_norm - b.grad_norm).abs() / b.grad_norm;
    assert!(
        rel > 1e-7 && rel < 1e-3,
        "{} vs {}: {rel}",
        a.grad_norm,
        b.grad_norm
    );
}

#[test]
fn bf16_moments_survive_a_checkpoint_round_trip() {
    // Three steps in one go equal two steps, a restore of the state into a new trainer (as
    // `kiln train` resumes), and a third step: the u16 moments decode and re-encode exactly.
    let model = with_policy("e4m3", "e4m3");
    let f = Fixture::new(&model, 3);
    let config = || TrainConfig::of(f.full.settings(), 3, 0).emulating(f.full.settings());
    let mut straight = f.trainer(config());
    for batch in &f.batches {
        straight.step(batch, f.t).unwrap();
    }
    let mut first = f.trainer(config());
    for batch in &f.batches[..2] {
        first.step(batch, f.t).unwrap();
    }
    let (m, v) = first.moments().unwrap();
    let mut resumed = Trainer::new(&f.full, config(), init_params(&f.fwd, 1));
    resumed.restore(first.step, first.params().unwrap().to_vec(), m, v);
    resumed.step(&f.batches[2], f.t).unwrap();
    assert_eq!(
        bits(straight.params().unwrap()),
        bits(resumed.params().unwrap())
    );
    assert_eq!(
        bits(&straight.moments().unwrap().0),
        bits(&resumed.moments().unwrap().0)
    );
    // bf16 moments take two bytes each.
    let elements: usize = straight.params().unwrap().iter().map(Vec::len).sum();
    assert_eq!(straight.moment_bytes(), 2 * 2 * elements);
}
