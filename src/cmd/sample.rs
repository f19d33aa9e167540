//! `kiln sample`: generate text from a trained run with the KV-cached CPU decoder
//! ([`kiln_runtime::generate`]).
//!
//! The cache stores in the spec's `precision.kv_cache` format (fp32, bf16 or fp16; FP8 caches
//! fall back to bf16). A sequence longer than the model's positions continues from its last
//! half window, re-read into a fresh cache.

use std::path::PathBuf;

use kiln_compiler::program::{compile_decode, compile_forward};
use kiln_runtime::checkpoint;
use kiln_runtime::data::decode_bytes;
use kiln_runtime::decode::{cache_format, Decoder};
use kiln_runtime::generate::{generate, Finish, Sampling};

use crate::spec::load;
use crate::{other, Failure};

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
    /// Sample among the most likely tokens that together reach this probability; 1 for all.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Stop when the text ends with this string (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(other(format!(
            "--top-p must be in (0, 1], found {}",
            args.top_p
        )));
    }
    let spec = args.dir.join("spec.toml");
    let (_, mut model) = load(Some(&spec), &mut Vec::new(), color)?;
    model.train.batch = 1;
    let program = compile_forward(&model).map_err(|e| other(e.to_string()))?;
    let graph = program.graph();
    let ck_path = args.dir.join("checkpoint.safetensors");
    let ck = checkpoint::load(&ck_path, graph).map_err(|e| other(e.to_string()))?;
    // One sequence at a time, up to the model's positions.
    let decode =
        compile_decode(&model, 1, model.max_positions).map_err(|e| other(e.to_string()))?;
    let decoder = Decoder::new(&decode, graph, &ck.params).map_err(|e| other(e.to_string()))?;
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
    let format = cache_format(model.precision.kv_cache);
    let stop: Vec<Vec<u32>> = args
        .stop
        .iter()
        .map(|s| s.bytes().map(u32::from).collect())
        .collect();
    let positions = model.max_positions as usize;
    let mut context = tokens[tokens.len().saturating_sub(positions)..].to_vec();
    let mut generated: Vec<u32> = Vec::new();
    let mut round = 0u64;
    while generated.len() < args.max_tokens {
        let sampling = Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            max_tokens: args.max_tokens - generated.len(),
            stop: stop.clone(),
            seed: args.seed.wrapping_add(round),
        };
        let c = generate(&decoder, std::slice::from_ref(&context), &sampling, format)
            .map_err(|e| other(e.to_string()))?
            .remove(0);
        generated.extend(c.text_tokens());
        if c.finish != Finish::Context || c.tokens.is_empty() {
            break;
        }
        // Slide: continue from the last half window of everything so far.
        let all: Vec<u32> = context.iter().chain(&c.tokens).copied().collect();
        context = all[all.len().saturating_sub(positions / 2)..].to_vec();
        round += 1;
    }
    crate::output::out(&format!("{}{}\n", args.prompt, decode_bytes(&generated)));
    Ok(())
}
