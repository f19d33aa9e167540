//! Whole-model gradient checks: the backward graph, run by the CPU interpreter in f64, agrees
//! with central finite differences of the forward loss for every family of model kiln lowers;
//! and the fused training graph (what `kiln train` runs) computes exactly, bit for bit, what
//! the unfused one does.

use std::collections::HashMap;

use kiln_compiler::autodiff::differentiate;
use kiln_compiler::check::check_str;
use kiln_compiler::ir::{verify, Def, Graph, InputKind, Update};
use kiln_compiler::lower::lower;
use kiln_compiler::program::compile;
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
            };
            out.insert(kind, data);
        }
    }
    out
}

fn gradcheck(spec: &str) {
    let model = check_str(spec).unwrap_or_else(|d| panic!("{d:#?}"));
    let fwd = lower(&model).unwrap();
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    verify(&full).unwrap();
    let params: Vec<Vec<f64>> = init_params(&fwd, 3)
        .into_iter()
        .map(|p| p.into_iter().map(f64::from).collect())
        .collect();
    let feed_inputs = inputs(&fwd, 11);
    let loss_of = |params: &[Vec<f64>]| -> f64 {
        let loss = fwd.output("loss").unwrap();
        let exec = Executor::new(&fwd, &[loss]);
        let out = exec
            .run::<f64>(&Feed {
                params,
                inputs: &feed_inputs,
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
    fused_equals_unfused(
        &full,
        &compile(&model).unwrap().train,
        &feed_inputs,
        &params,
    );
    let exec = Executor::new(&full, &keep);
    let out = exec
        .run::<f64>(&Feed {
            params: &params,
            inputs: &feed_inputs,
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
    full: &Graph,
    fused: &kiln_compiler::program::Program,
    inputs: &HashMap<InputKind, Vec<u32>>,
    params: &[Vec<f64>],
) {
    let fused = fused.graph();
    assert!(
        fused.nodes.len() < full.nodes.len(),
        "{}: nothing was fused",
        full.name
    );
    fn outputs<T: kiln_runtime::cpu::Real>(
        g: &Graph,
        inputs: &HashMap<InputKind, Vec<u32>>,
        params: &[Vec<T>],
    ) -> Vec<(String, Vec<T>)> {
        let keep: Vec<_> = g.outputs.iter().map(|&(_, v)| v).collect();
        let out = Executor::new(g, &keep)
            .run::<T>(&Feed { params, inputs })
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
        outputs(full, inputs, params),
        outputs(fused, inputs, params)
    );
    assert_eq!(
        outputs(full, inputs, &params32),
        outputs(fused, inputs, &params32)
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
