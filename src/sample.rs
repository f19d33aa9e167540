//! `kiln sample`: generate text from a trained run with the CPU forward pass.
//!
//! The model runs at batch 1 over a window of up to `train.seq_len` tokens. Attention is
//! causal, so the logits at the last real position do not depend on the padding after it;
//! longer contexts slide the window. (A KV-cached generation path arrives with the GRPO work.)

use std::path::PathBuf;

use kiln_compiler::program::compile_forward;
use kiln_runtime::checkpoint;
use kiln_runtime::data::{decode_bytes, Rng};
use kiln_runtime::exec::{Executor, Feed};

use crate::{load, other, Failure};

/// The command's arguments (see `kiln sample --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The run directory `kiln train` wrote.
    pub dir: PathBuf,
    /// Text to continue (byte-level).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 takes the most likely token.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely tokens; 0 for all.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Draws a token from `logits` with temperature and top-k (temperature 0: the argmax).
pub(crate) fn draw(logits: &[f32], temperature: f64, top_k: usize, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return order[0] as u32;
    }
    let k = if top_k == 0 {
        order.len()
    } else {
        top_k.min(order.len())
    };
    let top = &order[..k];
    let max = f64::from(logits[top[0]]);
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.next_f64() * total;
    for (&i, w) in top.iter().zip(&weights) {
        if x < *w {
            return i as u32;
        }
        x -= w;
    }
    top[k - 1] as u32
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    let spec = args.dir.join("spec.toml");
    let (_, mut model) = load(Some(&spec), &mut Vec::new(), color)?;
    let window = model.train.seq_len as usize;
    model.train.batch = 1;
    let program = compile_forward(&model).map_err(|e| other(e.to_string()))?;
    let graph = program.graph();
    let ck_path = args.dir.join("checkpoint.safetensors");
    let ck = checkpoint::load(&ck_path, graph).map_err(|e| other(e.to_string()))?;
    let logits_v = graph.output("logits").expect("lowering names the logits");
    let exec = Executor::new(graph, &[logits_v]);
    let vocab = model.vocab as usize;

    let mut tokens: Vec<u32> = args.prompt.bytes().map(u32::from).collect();
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(other(format!(
            "the prompt has byte {bad}, outside the model's vocabulary of {vocab}"
        )));
    }
    if tokens.is_empty() {
        tokens.push(u32::from(b'\n'));
    }
    let prompt_len = tokens.len();
    let mut rng = Rng::new(args.seed);
    for _ in 0..args.max_tokens {
        let start = tokens.len().saturating_sub(window);
        let ctx = &tokens[start..];
        let inputs = crate::logits::window_inputs(graph, ctx, window);
        let out = exec
            .run::<f32>(&Feed {
                params: &ck.params,
                inputs: &inputs,
            })
            .map_err(|e| other(e.to_string()))?;
        let logits = out[&logits_v].floats();
        let last = ctx.len() - 1;
        let next = draw(
            &logits[last * vocab..(last + 1) * vocab],
            args.temperature,
            args.top_k,
            &mut rng,
        );
        tokens.push(next);
    }
    crate::out(&format!(
        "{}{}\n",
        args.prompt,
        decode_bytes(&tokens[prompt_len..])
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawing_respects_temperature_and_top_k() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        assert_eq!(draw(&logits, 0.0, 0, &mut rng), 1);
        for _ in 0..200 {
            let t = draw(&logits, 1.0, 2, &mut rng);
            assert!(t == 1 || t == 3, "top-2 draws only the two best, got {t}");
        }
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[draw(&logits, 1.0, 0, &mut rng) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| c > 0),
            "every token has a chance: {seen:?}"
        );
        assert!(seen[1] > seen[0] * 10, "{seen:?}");
    }
}
