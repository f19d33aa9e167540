//! Whole-model gradient checks: the backward graph, run by the CPU interpreter in f64, agrees
//! with central finite differences of the forward loss for every family of model kiln lowers;
//! and the fused training graph (what `kiln train` runs) computes exactly, bit for bit, what
//! the unfused one does.

use std::collections::HashMap;

use kiln_compiler::autodiff::differentiate;
use kiln_compiler::check::check_str;
use kiln_compiler::ir::{verify, Def, Graph, InputKind, Update};
use kiln_compiler::lower::{lower_for, Objective};
use kiln_compiler::program::{compile, compile_policy, Program, Settings};
use kiln_runtime::data::Rng;
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::train::init_params;

/// A small DeepSeek-style model: MLA with query compression, MoE with a shared expert and
/// group-limited sigmoid routing, the balance loss and one MTP module.
const SMALL_MLA: &str = r#"
[model]
name = "small-mla"
vocab = 19
d_model = 16
layers = "dense, moe"
max_positions = 16
init_std = 0.3
[attention]
kind = "mla"
heads = 2
q_rank = 8
kv_rank = 6
nope_dim = 4
rope_dim = 4
v_dim = 3
[attention.rope.yarn]
factor = 4.0
original_max_positions = 4
mscale = 0.8
mscale_all_dim = 0.7
[ffn]
hidden = 12
[moe]
experts = 4
shared = 1
top_k = 2
expert_hidden = 5
score = "sigmoid"
select = "group_limited"
groups = 2
groups_kept = 1
normalize_top_k = true
route_scale = 1.5
seq_aux = 0.01
[mtp]
depth = 1
weight = 0.3
[train]
batch = 2
seq_len = 5
"#;

/// GPT-2 style: MHA with biases, LayerNorm, GELU (tanh), learned positions, tied embeddings.
const SMALL_GPT: &str = r#"
[model]
name = "small-gpt"
vocab = 13
d_model = 12
layers = "dense*2"
max_positions = 8
positions = "learned"
norm = "layernorm"
tie_embeddings = true
init_std = 0.3
[attention]
kind = "mha"
heads = 3
bias = true
[ffn]
hidden = 20
act = "gelu_tanh(x)"
bias = true
[train]
batch = 2
seq_len = 6
"#;

/// Llama style: GQA with RoPE, SwiGLU, RMSNorm, untied head; softmax greedy MoE as in V2.
const SMALL_GQA_MOE: &str = r#"
[model]
name = "small-gqa"
vocab = 11
d_model = 16
layers = "moe, dense"
max_positions = 8
init_std = 0.3
[attention]
kind = "gqa"
heads = 4
kv_heads = 2
[ffn]
hidden = 10
[moe]
experts = 3
top_k = 2
expert_hidden = 6
score = "softmax"
route_scale = 2.0
[train]
batch = 2
seq_len = 7
"#;

fn inputs(graph: &Graph, seed: u64) -> HashMap<InputKind, Vec<u32>> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for (_, v) in graph.values.iter() {
        if let Def::Input(kind) = v.def {
            let n = v.ty.elements() as usize;
            let data = match kind {
                InputKind::Positions => {
                    let t = v.ty.shape[1] as usize;
                    (0..n).map(|i| (i % t) as u32).collect()
                }
                InputKind::Tokens { .. } => {
                    let vocab = graph
                        .params
                        .iter()
                        .find(|(_, p)| p.name == "embed.weight")
                        .unwrap()
                        .1
                        .ty
                        .shape[0];
                    (0..n).map(|_| rng.below(vocab) as u32).collect()
                }
                InputKind::TokenWeights | InputKind::KvCache { .. } => continue,
            };
            out.insert(kind, data);
        }
    }
    out
}

fn gradcheck(spec: &str) {
    gradcheck_for(spec, Objective::Pretrain);
}

fn gradcheck_for(spec: &str, objective: Objective) {
    let model = check_str(spec).unwrap_or_else(|d| panic!("{d:#?}"));
    let fwd = lower_for(&model, objective).unwrap();
    // Policy-gradient weights: both signs, and zeros (prompt and padding positions).
    let tokens = (model.train.batch * model.train.seq_len) as usize;
    let mut wrng = Rng::new(17);
    let token_weights: Vec<f32> = (0..tokens)
        .map(|i| {
            if i % 4 == 0 {
                0.0
            } else {
                wrng.next_f64() as f32 * 2.0 - 1.0
            }
        })
        .collect();
    let weights = (objective == Objective::PolicyGradient).then_some(&token_weights[..]);
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    verify(&full).unwrap();
    let program = |g: &Graph| Program::new(g.clone(), Settings::of(&model)).unwrap();
    let (fwd_p, full_p) = (program(&fwd), program(&full));
    let params: Vec<Vec<f64>> = init_params(&fwd, 3)
        .into_iter()
        .map(|p| p.into_iter().map(f64::from).collect())
        .collect();
    let feed_inputs = inputs(&fwd, 11);
    let loss_of = |params: &[Vec<f64>]| -> f64 {
        let loss = fwd.output("loss").unwrap();
        let exec = Executor::new(&fwd_p, &[loss]);
        let out = exec
            .run::<f64>(&Feed {
                params,
                inputs: &feed_inputs,
                weights,
            })
            .unwrap();
        out[&loss].floats()[0]
    };
    let grads: Vec<_> = fwd
        .params
        .iter()
        .filter(|(_, p)| p.update != Update::BalanceBias)
        .map(|(id, p)| (id, full.output(&format!("grad.{}", p.name)).unwrap()))
        .collect();
    let keep: Vec<_> = grads.iter().map(|&(_, g)| g).collect();
    let compiled = match objective {
        Objective::Pretrain => compile(&model),
        Objective::PolicyGradient => compile_policy(&model),
        Objective::Decode { .. } => unreachable!("decode graphs have no gradients"),
    };
    fused_equals_unfused(
        &full_p,
        &compiled.unwrap().train,
        &feed_inputs,
        &params,
        weights,
    );
    let exec = Executor::new(&full_p, &keep);
    let out = exec
        .run::<f64>(&Feed {
            params: &params,
            inputs: &feed_inputs,
            weights,
        })
        .unwrap();

    let mut rng = Rng::new(5);
    let mut worst = 0.0f64;
    for &(id, g) in &grads {
        let analytic = out[&g].floats();
        // A few entries of every parameter tensor.
        for _ in 0..3 {
            let i = rng.below(analytic.len() as u64) as usize;
            let h = 1e-5;
            let mut plus = params.clone();
            plus[id.index()][i] += h;
            let mut minus = params.clone();
            minus[id.index()][i] -= h;
            let numeric = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h);
            let err =
                (numeric - analytic[i]).abs() / numeric.abs().max(analytic[i].abs()).max(1e-3);
            worst = worst.max(err);
            assert!(
                err <= 1e-6 || (numeric - analytic[i]).abs() < 1e-9,
                "{}: d loss / d {}[{i}] = {} analytically, {numeric} by finite differences",
                model.name,
                fwd.params[id].name,
                analytic[i]
            );
        }
    }
    eprintln!("{}: worst relative error {worst:.2e}", model.name);
}

/// Every named output of the fused graph equals the unfused graph's, exactly, in f64 and f32.
fn fused_equals_unfused(
    full: &Program,
    fused: &Program,
    inputs: &HashMap<InputKind, Vec<u32>>,
    params: &[Vec<f64>],
    weights: Option<&[f32]>,
) {
    assert!(
        fused.graph().nodes.len() < full.graph().nodes.len(),
        "{}: nothing was fused",
        full.graph().name
    );
    fn outputs<T: kiln_runtime::cpu::Real>(
        p: &Program,
        inputs: &HashMap<InputKind, Vec<u32>>,
        params: &[Vec<T>],
        weights: Option<&[f32]>,
    ) -> Vec<(String, Vec<T>)> {
        let g = p.graph();
        let keep: Vec<_> = g.outputs.iter().map(|&(_, v)| v).collect();
        let out = Executor::new(p, &keep)
            .run::<T>(&Feed {
                params,
                inputs,
                weights,
            })
            .unwrap();
        g.outputs
            .iter()
            .map(|(name, v)| (name.clone(), out[v].floats().to_vec()))
            .collect()
    }
    let params32: Vec<Vec<f32>> = params
        .iter()
        .map(|p| p.iter().map(|&x| x as f32).collect())
        .collect();
    assert_eq!(
        outputs(full, inputs, params, weights),
        outputs(fused, inputs, params, weights)
    );
    assert_eq!(
        outputs(full, inputs, &params32, weights),
        outputs(fused, inputs, &params32, weights)
    );
}

#[test]
fn deepseek_style_model_gradients_match_finite_differences() {
    gradcheck(SMALL_MLA);
}

#[test]
fn gpt2_style_model_gradients_match_finite_differences() {
    gradcheck(SMALL_GPT);
}

#[test]
fn gqa_and_softmax_moe_gradients_match_finite_differences() {
    gradcheck(SMALL_GQA_MOE);
}

#[test]
fn policy_gradient_loss_gradients_match_finite_differences() {
    // Σ wᵢ · CEᵢ with weights of both signs and zeros: what a GRPO step differentiates.
    gradcheck_for(SMALL_MLA, Objective::PolicyGradient);
    gradcheck_for(SMALL_GPT, Objective::PolicyGradient);
}

#[test]
fn uniform_token_weights_give_the_mean_cross_entropy() {
    let model = check_str(SMALL_MLA).unwrap();
    let (pre, pg) = (
        lower_for(&model, Objective::Pretrain).unwrap(),
        lower_for(&model, Objective::PolicyGradient).unwrap(),
    );
    // The policy-gradient graph has the main model's parameters, in the same order, and no
    // MTP module's.
    let names =
        |g: &Graph| -> Vec<String> { g.params.iter().map(|(_, p)| p.name.clone()).collect() };
    let (pre_names, pg_names) = (names(&pre), names(&pg));
    assert!(pre_names.starts_with(&pg_names) && pg_names.iter().all(|n| !n.starts_with("mtp.")));
    let params: Vec<Vec<f64>> = init_params(&pre, 3)
        .into_iter()
        .map(|p| p.into_iter().map(f64::from).collect())
        .collect();
    let feed_inputs = inputs(&pre, 11);
    let n = (model.train.batch * model.train.seq_len) as usize;
    let uniform = vec![1.0 / n as f32; n];
    let run = |g: &Graph, output: &str, weights: Option<&[f32]>| -> f64 {
        let v = g.output(output).unwrap();
        let program = Program::new(g.clone(), Settings::of(&model)).unwrap();
        let out = Executor::new(&program, &[v])
            .run::<f64>(&Feed {
                params: &params[..g.params.len()],
                inputs: &feed_inputs,
                weights,
            })
            .unwrap();
        out[&v].floats()[0]
    };
    let mean = run(&pre, "loss.main", None);
    let weighted = run(&pg, "loss", Some(&uniform));
    assert!(
        (mean - weighted).abs() < 1e-6 * mean,
        "{mean} vs {weighted}"
    );
    let doubled: Vec<f32> = uniform.iter().map(|w| 2.0 * w).collect();
    assert!((run(&pg, "loss", Some(&doubled)) - 2.0 * weighted).abs() < 1e-9);
}
