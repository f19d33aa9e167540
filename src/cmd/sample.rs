//! `kiln sample`: generate text from a trained run with the KV-cached CPU decoder
//! ([`kiln_runtime::generate`]).
//!
//! The cache stores in the spec's `precision.kv_cache` format (fp32, bf16 or fp16; FP8 caches
//! fall back to bf16). A sequence longer than the model's positions continues from its last
//! half window, re-read into a fresh cache.
//!
//! Text is byte-level (one token per byte) unless the run has a `tokenizer.json` (as `kiln
//! train --tokenizer` and `kiln import-hf` leave) or `--tokenizer` names one: then the prompt
//! and the stop strings are encoded with it (without special tokens) and the tokens decoded.

use std::path::PathBuf;

use kiln_compiler::program::{compile_decode, compile_forward};
use kiln_runtime::checkpoint;
use kiln_runtime::data::decode_bytes;
use kiln_runtime::decode::{cache_format, Decoder};
use kiln_runtime::generate::{generate, Finish, Sampling};

use crate::engine::TokenizerFile;
use crate::spec::load;
use crate::{other, Failure};

/// The command's arguments (see `kiln sample --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The run directory `kiln train` wrote.
    pub dir: PathBuf,
    /// Text to continue (encoded with the run's tokenizer, else one token per byte).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// A tokenizer.json to encode the prompt and decode the tokens with [default: the run's
    /// tokenizer.json, else byte-level].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
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
    /// Stop when the text ends with this string (repeatable); it is not printed. With a
    /// tokenizer, when the tokens end with the string's own encoding.
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

    let text = match &args.tokenizer {
        Some(path) => Text::Tokenizer(Box::new(TokenizerFile::read(path)?)),
        None => {
            TokenizerFile::in_dir(&args.dir)?.map_or(Text::Bytes, |t| Text::Tokenizer(Box::new(t)))
        }
    };
    if let Text::Tokenizer(t) = &text {
        t.check_vocab(&model)?;
    }
    let mut tokens = text.encode(&args.prompt)?;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(other(format!(
            "the prompt has token {bad}, outside the model's vocabulary of {vocab}"
        )));
    }
    // An empty prompt starts from a line end.
    let prompt_tokens = tokens.len();
    if tokens.is_empty() {
        tokens = text.encode("\n")?;
    }
    if tokens.is_empty() {
        return Err(other(
            "the tokenizer encodes neither the prompt nor a line end to any token; give a \
             --prompt it encodes",
        ));
    }
    let format = cache_format(model.precision.kv_cache);
    let stop: Vec<Vec<u32>> = args
        .stop
        .iter()
        .map(|s| text.encode(s))
        .filter(|stop| !matches!(stop, Ok(ids) if ids.is_empty()))
        .collect::<Result<_, _>>()?;
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
    let continuation = text.continuation(&tokens[..prompt_tokens], &generated)?;
    crate::output::out(&format!("{}{continuation}\n", args.prompt));
    Ok(())
}

/// How a run's text becomes tokens and back.
enum Text {
    /// One token per byte.
    Bytes,
    /// A tokenizer.json.
    Tokenizer(Box<TokenizerFile>),
}

impl Text {
    /// The tokens of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>, Failure> {
        match self {
            Text::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Text::Tokenizer(t) => t.tokenizer.encode(text).map_err(|e| other(e.to_string())),
        }
    }

    /// The text `generated` adds after the prompt's tokens. A tokenizer decodes them together,
    /// since a token's text can depend on the one before it (a leading space, a character
    /// split across tokens), and the prompt's own text is cut off.
    fn continuation(&self, prompt: &[u32], generated: &[u32]) -> Result<String, Failure> {
        let Text::Tokenizer(t) = self else {
            return Ok(decode_bytes(generated));
        };
        let decode = |ids: &[u32]| t.tokenizer.decode(ids).map_err(|e| other(e.to_string()));
        let before = decode(prompt)?;
        let all = decode(&[prompt, generated].concat())?;
        Ok(match all.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => decode(generated)?,
        })
    }
}
