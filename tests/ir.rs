//! The forward graph IR: every spec lowers to a graph that verifies, whose parameters are
//! exactly the analyzer's (and so HF's) count, and whose text is reviewed as a snapshot.

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
