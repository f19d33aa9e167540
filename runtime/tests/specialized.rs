//! `kiln_macros::model!`: the generated straight-line training step computes exactly what
//! the interpreter computes, step after step (losses, gradient norms and parameters equal bit
//! for bit), for the three model families of the test specs.

use kiln_compiler::check::check;
use kiln_compiler::program::compile;
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batcher};
use kiln_runtime::exec::Run;
use kiln_runtime::train::{init_params, max_token_offset, TrainConfig, Trainer};

kiln_macros::model!("../specs/tiny.toml");
kiln_macros::model!("../tests/specs/micro.toml");
kiln_macros::model!("../tests/specs/gpt2-micro.toml");
kiln_macros::model!("../tests/specs/micro-yarn.toml");
// micro under a name that tries to inject code: module `std_process_exit_1_include_x`.
kiln_macros::model!("../tests/specs/hostile-name.toml");

/// Trains `steps` steps of `spec` with the interpreter and with `generated`, on the same
/// batches from the same initial parameters, and requires identical results.
fn same_training(spec: &str, generated: Box<dyn Run>, steps: u64) -> Vec<u64> {
    let path = format!("{}/../{spec}", env!("CARGO_MANIFEST_DIR"));
    let model = check(&std::fs::read(&path).unwrap()).unwrap();
    let compiled = compile(&model).unwrap();
    let forward = compiled.forward.graph();
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let tokens = byte_tokens(&builtin_corpus(0, 1 << 16));
    let window = t + max_token_offset(forward) as usize - 1;
    let mut batcher = Batcher::new(tokens, b, window, 0).unwrap();
    let params = init_params(forward, 0);
    let config = TrainConfig::of(compiled.train.settings(), steps, 0);
    let mut interpreted = Trainer::new(&compiled.train, config.clone(), params.clone());
    let mut specialized = Trainer::with_runner(&compiled.train, config, params, generated);
    let mut losses = Vec::new();
    for step in 0..steps {
        let batch = batcher.next_batch();
        let a = interpreted.step(&batch, t).unwrap();
        let s = specialized.step(&batch, t).unwrap();
        losses.push(a.loss.to_bits());
        assert_eq!(
            a.loss.to_bits(),
            s.loss.to_bits(),
            "{spec} step {step}: loss"
        );
        assert_eq!(
            a.grad_norm.to_bits(),
            s.grad_norm.to_bits(),
            "{spec} step {step}: grad norm"
        );
    }
    assert!(
        interpreted.params().unwrap() == specialized.params().unwrap(),
        "{spec}: parameters after {steps} steps"
    );
    losses
}

#[test]
fn the_module_carries_the_cuda_emitters_source() {
    let path = format!("{}/../specs/tiny.toml", env!("CARGO_MANIFEST_DIR"));
    let model = check(&std::fs::read(&path).unwrap()).unwrap();
    let cuda = kiln_compiler::emit_cuda::emit(&compile(&model).unwrap().train);
    assert_eq!(tiny::CUDA_SOURCE, cuda.source);
    assert!(tiny::CUDA_SOURCE.contains("extern \"C\" __global__ void"));
}

#[test]
fn tiny_trains_bit_identically() {
    assert_eq!(tiny::NAME, "tiny");
    assert_eq!((tiny::BATCH, tiny::SEQ_LEN, tiny::LAYERS), (8, 128, 4));
    same_training("specs/tiny.toml", Box::new(tiny::Train::new()), 3);
}

#[test]
fn micro_trains_bit_identically() {
    same_training("tests/specs/micro.toml", Box::new(micro::Train::new()), 5);
}

#[test]
fn a_hostile_model_name_compiles_and_trains_like_the_plain_one() {
    use std_process_exit_1_include_x as hostile;
    assert_eq!(
        hostile::NAME,
        "\"; std::process::exit(1); \" */ #include <x> }"
    );
    let plain = same_training("tests/specs/micro.toml", Box::new(micro::Train::new()), 2);
    let named = same_training(
        "tests/specs/hostile-name.toml",
        Box::new(hostile::Train::new()),
        2,
    );
    assert_eq!(plain, named);
}

#[test]
fn micro_with_yarn_trains_bit_identically() {
    same_training(
        "tests/specs/micro-yarn.toml",
        Box::new(micro_yarn::Train::new()),
        3,
    );
}

#[test]
fn gpt2_micro_trains_bit_identically() {
    assert_eq!(gpt2_micro::PARAM_NAMES[0], "embed.weight");
    same_training(
        "tests/specs/gpt2-micro.toml",
        Box::new(gpt2_micro::Train::new()),
        5,
    );
}

#[test]
fn typed_parameters_name_every_tensor_and_round_trip() {
    let path = format!("{}/../specs/tiny.toml", env!("CARGO_MANIFEST_DIR"));
    let model = check(&std::fs::read(&path).unwrap()).unwrap();
    let compiled = compile(&model).unwrap();
    let flat = init_params(compiled.forward.graph(), 0);
    let p = tiny::Params::from_flat(flat.clone());
    // Named fields per layer, as the spec's op paths read.
    assert_eq!(p.layers.len(), 4);
    assert_eq!(p.layers[3].attn.kv_b.weight.len(), 256 * 64);
    assert!(p.layers[0].moe.is_none() && p.layers[1].ffn.is_none());
    let moe = p.layers[1].moe.as_ref().unwrap();
    assert_eq!(moe.experts.up.weight.len(), 8 * 128 * 256);
    assert_eq!(moe.router.bias.len(), 8);
    assert_eq!(p.mtp[0].eh_proj.weight.len(), 256 * 512);
    assert_eq!(p.final_.norm.weight.len(), 256);
    // The order of PARAM_NAMES, both ways.
    let index = tiny::PARAM_NAMES
        .iter()
        .position(|&n| n == "layers.3.attn.kv_b.weight")
        .unwrap();
    assert_eq!(p.flat()[index], &flat[index][..]);
    assert_eq!(p.into_flat(), flat);
}

#[test]
fn the_generated_forward_pass_equals_the_interpreters() {
    use kiln_runtime::exec::{Executor, Feed};
    use kiln_runtime::train::feed_inputs;
    for (spec, generated) in [
        (
            "specs/tiny.toml",
            Box::new(tiny::Forward::new()) as Box<dyn Run>,
        ),
        (
            "tests/specs/gpt2-micro.toml",
            Box::new(gpt2_micro::Forward::new()),
        ),
    ] {
        let path = format!("{}/../{spec}", env!("CARGO_MANIFEST_DIR"));
        let model = check(&std::fs::read(&path).unwrap()).unwrap();
        let compiled = compile(&model).unwrap();
        let forward = compiled.forward.graph();
        let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
        let window = t + max_token_offset(forward) as usize - 1;
        let tokens = byte_tokens(&builtin_corpus(1, 1 << 16));
        let batch = Batcher::new(tokens, b, window, 1).unwrap().next_batch();
        let params = init_params(forward, 3);
        let inputs = feed_inputs(forward, &batch, t);
        let feed = Feed {
            params: &params,
            inputs: &inputs,
            weights: None,
        };
        let keep: Vec<_> = forward.outputs.iter().map(|&(_, v)| v).collect();
        let want = Executor::new(&compiled.forward, &keep)
            .run::<f32>(&feed)
            .unwrap();
        let got = generated.run(&feed).unwrap();
        assert_eq!(got.len(), want.len(), "{spec}");
        for (name, v) in &forward.outputs {
            assert!(got[v] == want[v], "{spec}: output {name}");
        }
    }
    assert_eq!(
        tiny::FORWARD_OUTPUTS
            .iter()
            .filter(|(n, _)| *n == "logits")
            .count(),
        1
    );
}
