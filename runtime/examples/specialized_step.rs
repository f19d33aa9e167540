//! Times `tiny`'s training step run by the interpreter and by the module `kiln_macros::model!`
//! generates, alternately in one process: `cargo run --release -p kiln-runtime --example
//! specialized_step [ROUNDS]`.

use kiln_compiler::check::check;
use kiln_compiler::program::compile;
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batcher};
use kiln_runtime::train::{init_params, max_token_offset, TrainConfig, Trainer};

kiln_macros::model!("../specs/tiny.toml");

fn main() {
    kiln_runtime::memory::keep_freed_memory();
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(3, |s| s.parse().expect("a count"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../specs/tiny.toml");
    let model = check(&std::fs::read(path).unwrap()).unwrap();
    let compiled = compile(&model).unwrap();
    let forward = compiled.forward.graph();
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let tokens = byte_tokens(&builtin_corpus(0, 1 << 20));
    let window = t + max_token_offset(forward) as usize - 1;
    let mut batcher = Batcher::new(tokens, b, window, 0).unwrap();
    let params = init_params(forward, 0);
    let config = TrainConfig::of(compiled.train.settings(), 1000, 0);
    let mut interpreted = Trainer::new(&compiled.train, config.clone(), params.clone());
    let mut specialized = Trainer::with_runner(
        &compiled.train,
        config,
        params,
        Box::new(tiny::Train::new()),
    );
    const STEPS: usize = 10;
    for round in 0..rounds {
        for (name, trainer) in [
            ("interpreter", &mut interpreted),
            ("specialized", &mut specialized),
        ] {
            let start = std::time::Instant::now();
            for _ in 0..STEPS {
                trainer.step(&batcher.next_batch(), t).unwrap();
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
            println!("round {round}: {name:<12} {ms:.1} ms per step");
        }
    }
}
