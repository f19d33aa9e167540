//! Times one training step of a spec per op kind: `cargo run --release -p kiln-runtime
//! --example profile_step -- specs/tiny.toml [STEPS]`.
use std::collections::HashMap;

use kiln_compiler::check::check;
use kiln_compiler::program::compile;
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batcher};
use kiln_runtime::exec::{Executor, Feed};
use kiln_runtime::train::{feed_inputs, init_params, max_token_offset};

fn main() {
    kiln_runtime::memory::keep_freed_memory();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "specs/tiny.toml".into());
    let model = check(&std::fs::read(&path).expect("read the spec")).expect("a valid spec");
    let compiled = compile(&model).expect("the pipeline runs");
    let (full, fwd) = (compiled.train.graph(), compiled.forward.graph());
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let tokens = byte_tokens(&builtin_corpus(0, 1 << 20));
    let window = t + max_token_offset(fwd) as usize - 1;
    let mut batcher = Batcher::new(tokens, b, window, 0).unwrap();
    let params = init_params(fwd, 0);
    let keep: Vec<_> = full.outputs.iter().map(|(_, v)| *v).collect();
    let exec = Executor::new(&compiled.train, &keep);
    let mut profile = HashMap::new();
    let steps: usize = std::env::args()
        .nth(2)
        .map_or(5, |s| s.parse().expect("a step count"));
    let start = std::time::Instant::now();
    for _ in 0..steps {
        let inputs = feed_inputs(fwd, &batcher.next_batch(), t);
        exec.run_timed::<f32>(
            &Feed {
                params: &params,
                inputs: &inputs,
                weights: None,
            },
            Some(&mut profile),
        )
        .unwrap();
    }
    let total = start.elapsed().as_secs_f64() / steps as f64;
    let mut rows: Vec<_> = profile.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!(
        "{path}: {:.1} ms per step, {:.0} tokens/s",
        total * 1e3,
        (b * t) as f64 / total
    );
    for (op, d) in rows {
        println!(
            "  {op:<20} {:>8.1} ms",
            d.as_secs_f64() * 1e3 / steps as f64
        );
    }
}
