//! The graph IR through the pipeline: every spec lowers to a graph that verifies, whose
//! parameters are exactly the analyzer's (and so HF's) count; it differentiates, fuses and
//! plans to graphs that verify; and the text before and after fusion is reviewed as snapshots.

use std::path::Path;

use kiln_compiler::analyze::analyze;
use kiln_compiler::check::check;
use kiln_compiler::ir::{verify, Def, Graph, Op, TensorType};
use kiln_compiler::lower::lower;
use kiln_compiler::model::Model;

fn model(name: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("specs")
        .join(name);
    check(&std::fs::read(path).unwrap()).unwrap()
}

fn lowered(name: &str) -> Graph {
    lower(&model(name)).unwrap_or_else(|e| panic!("{name} does not lower: {e}"))
}

#[test]
fn every_spec_lowers_to_a_verified_graph_with_the_analyzers_parameters() {
    for name in [
        "tiny.toml",
        "gpt2-124m.toml",
        "llama3-8b.toml",
        "deepseek-v2-lite.toml",
        "deepseek-v2.toml",
        "deepseek-v3.toml",
    ] {
        let m = model(name);
        let g = lower(&m).unwrap();
        if let Err(errors) = verify(&g) {
            panic!("{name}: {errors:#?}");
        }
        let r = analyze(&m);
        assert_eq!(
            g.trainable_elements(),
            r.params.total + r.params.mtp,
            "{name}"
        );
        for out in ["loss", "loss.main", "logits"] {
            assert!(g.output(out).is_some(), "{name} lacks output {out}");
        }
        let loss = g.output("loss").unwrap();
        assert_eq!(
            g.values[loss].ty,
            TensorType::f32(Vec::new()),
            "{name}: loss is a scalar"
        );
    }
}

#[test]
fn graph_text_snapshots() {
    insta::assert_snapshot!("ir-tiny", lowered("tiny.toml").to_string());
    insta::assert_snapshot!("ir-gpt2-124m", lowered("gpt2-124m.toml").to_string());
}

#[test]
fn tied_embeddings_share_one_parameter() {
    let g = lowered("gpt2-124m.toml");
    assert!(g.params.iter().all(|(_, p)| p.name != "head.weight"));
    let head = g.nodes.iter().find(|(_, n)| n.path == "head").unwrap().1;
    let embed = g.nodes.iter().find(|(_, n)| n.path == "embed").unwrap().1;
    assert_eq!(
        head.inputs[1], embed.inputs[0],
        "the head reads the embedding table"
    );
}

#[test]
fn mtp_modules_read_shifted_tokens_and_share_the_head() {
    let g = lowered("tiny.toml");
    let main_head = g.nodes.iter().find(|(_, n)| n.path == "head").unwrap().1;
    let mtp_head = g
        .nodes
        .iter()
        .find(|(_, n)| n.path == "mtp.0.head")
        .unwrap()
        .1;
    assert_eq!(main_head.inputs[1], mtp_head.inputs[1]);
    let offsets: Vec<u32> = g
        .values
        .iter()
        .filter_map(|(_, v)| match v.def {
            Def::Input(kiln_compiler::ir::InputKind::Tokens { offset }) => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(
        offsets,
        [0, 1, 1, 2],
        "inputs, targets, MTP inputs, MTP targets"
    );
}

#[test]
fn the_verifier_rejects_broken_graphs() {
    let good = lowered("tiny.toml");
    assert!(verify(&good).is_ok());

    // A node whose recorded result type disagrees with its shape rule.
    let mut g = good.clone();
    let (_, first) = g.nodes.iter().next().unwrap();
    let out = first.outputs[0];
    g.values[out].ty = TensorType::f32([1, 2, 3]);
    let errors = verify(&g).unwrap_err();
    assert!(
        errors[0].message.contains("the shape rule gives"),
        "{errors:?}"
    );

    // An operand used before the node that defines it.
    let mut g = good.clone();
    let later = g.nodes.iter().nth(5).unwrap().1.outputs[0];
    let first_id = g.nodes.iter().next().unwrap().0;
    g.nodes[first_id].inputs[0] = later;
    let errors = verify(&g).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("does not come before it")),
        "{errors:?}"
    );

    // An op whose operands do not fit: a linear layer fed the wrong weight.
    let mut g = good.clone();
    let (id, _) = g
        .nodes
        .iter()
        .find(|(_, n)| matches!(n.op, Op::Linear { .. }) && n.path == "layers.0.attn.q_b")
        .unwrap();
    let wrong = g
        .nodes
        .iter()
        .find(|(_, n)| n.path == "layers.0.attn.o")
        .unwrap()
        .1
        .inputs[1];
    g.nodes[id].inputs[1] = wrong;
    let errors = verify(&g).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("linear at `layers.0.attn.q_b`")),
        "{errors:?}"
    );

    // An output naming a value the graph does not have.
    let mut g = good;
    let far = *lowered("deepseek-v3.toml")
        .outputs
        .last()
        .map(|(_, v)| v)
        .unwrap();
    g.outputs.push(("ghost".into(), far));
    let errors = verify(&g).unwrap_err();
    assert!(
        errors[0].message.starts_with("output `ghost`"),
        "{errors:?}"
    );
}

#[test]
fn every_spec_differentiates_to_a_verified_graph_with_one_gradient_per_parameter() {
    use kiln_compiler::autodiff::differentiate;
    use kiln_compiler::ir::Update;
    for name in [
        "tiny.toml",
        "gpt2-124m.toml",
        "llama3-8b.toml",
        "deepseek-v2-lite.toml",
        "deepseek-v3.toml",
    ] {
        let fwd = lowered(name);
        let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
        if let Err(errors) = verify(&full) {
            panic!("{name}: {:#?}", &errors[..errors.len().min(5)]);
        }
        for (_, p) in fwd.params.iter() {
            let grad = full.output(&format!("grad.{}", p.name));
            if p.update == Update::BalanceBias {
                assert!(
                    grad.is_none(),
                    "{name}: {} is not trained by gradients",
                    p.name
                );
            } else {
                let grad = grad.unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
                assert_eq!(full.values[grad].ty, p.ty, "{name}: {}", p.name);
            }
        }
    }
}

#[test]
fn backward_snapshot_of_tiny() {
    use kiln_compiler::autodiff::differentiate;
    let fwd = lowered("tiny.toml");
    let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
    insta::assert_snapshot!("ir-tiny-backward", full.to_string());
}

/// Every spec in specs/ compiles through the whole pipeline, and fusion removes what its
/// rules promise: no residual add is left feeding a norm, no norm gradient's input gradient
/// is left to a separate add, no map's result is read only by another map.
#[test]
fn every_spec_compiles_and_fusion_leaves_no_fusable_chain() {
    use kiln_compiler::program::compile;
    for name in [
        "tiny.toml",
        "gpt2-124m.toml",
        "llama3-8b.toml",
        "deepseek-v2.toml",
        "deepseek-v2-lite.toml",
        "deepseek-v3.toml",
    ] {
        let compiled = compile(&model(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for program in [&compiled.train, &compiled.forward] {
            let g = program.graph();
            let producer = |v| match g.values[v].def {
                Def::Node { node, .. } => Some(&g.nodes[node]),
                _ => None,
            };
            let readers = |v| g.nodes.iter().filter(move |(_, n)| n.inputs.contains(&v));
            for (_, node) in g.nodes.iter() {
                let first = producer(node.inputs.first().copied().unwrap_or(node.outputs[0]));
                match (&node.op, first.map(|p| &p.op)) {
                    (Op::RmsNorm { .. } | Op::LayerNorm { .. }, Some(Op::Map { expr, .. })) => {
                        assert_ne!(expr.to_string(), "a + b", "{name}: {}", node.path)
                    }
                    (Op::Map { .. }, _) => {
                        for &x in &node.inputs {
                            if let Some(p) = producer(x) {
                                let only = readers(x).count() == 1;
                                let named = g.outputs.iter().any(|&(_, v)| v == x);
                                assert!(
                                    !(matches!(p.op, Op::Map { .. }) && only && !named),
                                    "{name}: {} should have been inlined into {}",
                                    p.path,
                                    node.path
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
            let count = |op: &str| g.nodes.iter().filter(|(_, n)| n.op.name() == op).count();
            // tiny: every norm that reads a residual sum (7 in the main model, after layer 0's
            // attention; 2 in the MTP module; the final norm) fuses with it. Backward, each of
            // the 11 sums of a norm's input gradient with the stream's gradient fuses (the
            // final hidden state feeds two norms, final.norm and MTP's hnorm; one joins).
            if name == "tiny.toml" && g.output("grad.head.weight").is_some() {
                assert_eq!(count("add_rms_norm"), 10, "{name}");
                assert_eq!(count("add_rms_norm_grad"), 11, "{name}");
            }
            if name == "gpt2-124m.toml" && g.output("grad.head.weight").is_some() {
                assert_eq!(count("linear_map"), 12, "{name}: one per layer's fc + gelu");
            }
        }
    }
}

#[test]
fn fusion_snapshots_before_and_after() {
    use kiln_compiler::program::{graph_after, Pass};
    let tiny = model("tiny.toml");
    insta::assert_snapshot!(
        "ir-tiny-fused",
        graph_after(&tiny, Pass::Fuse).unwrap().to_string()
    );
    let gpt2 = model("gpt2-124m.toml");
    insta::assert_snapshot!(
        "ir-gpt2-124m-backward",
        graph_after(&gpt2, Pass::Autodiff).unwrap().to_string()
    );
    insta::assert_snapshot!(
        "ir-gpt2-124m-fused",
        graph_after(&gpt2, Pass::Fuse).unwrap().to_string()
    );
}

#[test]
fn the_memory_plan_reuses_buffers_without_overlap() {
    use kiln_compiler::autodiff::differentiate;
    use kiln_compiler::plan::plan;
    for name in ["tiny.toml", "gpt2-124m.toml"] {
        let fwd = lowered(name);
        let full = differentiate(&fwd, fwd.output("loss").unwrap()).unwrap();
        let keep: Vec<_> = full.outputs.iter().map(|&(_, v)| v).collect();
        let p = plan(&full, &keep);
        p.check().unwrap_or_else(|e| panic!("{name}: {e}"));
        let largest = p
            .sizes
            .iter()
            .zip(&p.offsets)
            .filter(|(_, o)| o.is_some())
            .map(|(s, _)| *s)
            .max()
            .unwrap();
        assert!(p.peak_bytes >= largest, "{name}");
        assert!(
            p.peak_bytes * 2 < p.total_bytes,
            "{name}: reuse should at least halve the arena"
        );
    }
}
