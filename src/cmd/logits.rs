//! `kiln logits`: the CPU forward pass's logits for a token sequence, as JSON, for comparing
//! kiln with other implementations (Hugging Face transformers, a CUDA backend).

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_compiler::ir::{Def, InputKind};
use kiln_compiler::model::Model;
use kiln_compiler::program::compile_forward;
use kiln_runtime::checkpoint;
use kiln_runtime::exec::{Executor, Feed};

use crate::spec::load;
use crate::{other, Failure};

/// The command's arguments (see `kiln logits --help`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// A run directory (`spec.toml` and `checkpoint.safetensors`), as `kiln train` or
    /// `kiln import-hf` write it.
    pub dir: PathBuf,
    /// The token ids, comma-separated (`--tokens 1,2,3`): one sequence starting at position 0.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub tokens: Vec<u32>,
}

/// The logits `[tokens.len(), vocab]` of the model's forward pass over `tokens` (batch 1,
/// positions from 0), with `params` in the forward graph's parameter order as
/// [`checkpoint::load`] returns them for that graph. The model is compiled at exactly this
/// sequence length.
pub(crate) fn forward_logits(
    model: &Model,
    params_of: impl FnOnce(&kiln_compiler::ir::Graph) -> Result<Vec<Vec<f32>>, String>,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>, String> {
    let vocab = model.vocab as usize;
    if tokens.is_empty() {
        return Err("give at least one token".into());
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "token {bad} is outside the model's vocabulary of {vocab}"
        ));
    }
    if tokens.len() as u64 > model.max_positions {
        return Err(format!(
            "{} tokens are more than the model's {} positions (model.max_positions)",
            tokens.len(),
            model.max_positions
        ));
    }
    let mut model = model.clone();
    model.train.batch = 1;
    model.train.seq_len = tokens.len() as u64;
    let program = compile_forward(&model).map_err(|e| e.to_string())?;
    let graph = program.graph();
    let params = params_of(graph)?;
    let logits_v = graph.output("logits").expect("lowering names the logits");
    let exec = Executor::new(&program, &[logits_v]);
    let inputs = window_inputs(graph, tokens, tokens.len());
    let out = exec
        .run::<f32>(&Feed {
            params: &params,
            inputs: &inputs,
            weights: None,
        })
        .map_err(|e| e.to_string())?;
    Ok(out[&logits_v]
        .floats()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect())
}

/// The inputs of a batch-1 forward graph over a window of `len` positions holding `tokens`
/// from position 0: positions `0..len`, and each token input shifted by its offset, padded
/// with 0 past the end (attention is causal, so logits at real positions do not read the
/// padding; MTP's shifted inputs only feed MTP outputs).
pub(crate) fn window_inputs(
    graph: &kiln_compiler::ir::Graph,
    tokens: &[u32],
    len: usize,
) -> HashMap<InputKind, Vec<u32>> {
    let mut inputs = HashMap::new();
    for (_, v) in graph.values.iter() {
        if let Def::Input(kind) = v.def {
            let data: Vec<u32> = match kind {
                InputKind::Positions => (0..len as u32).collect(),
                InputKind::Tokens { offset } => (0..len)
                    .map(|i| tokens.get(i + offset as usize).copied().unwrap_or(0))
                    .collect(),
                // Only policy-gradient training graphs weigh tokens.
                InputKind::TokenWeights | InputKind::KvCache { .. } => continue,
            };
            inputs.insert(kind, data);
        }
    }
    inputs
}

pub(crate) fn run(args: Args, color: bool) -> Result<(), Failure> {
    let spec = args.dir.join("spec.toml");
    let (_, model) = load(Some(&spec), &mut Vec::new(), color)?;
    let ck_path = args.dir.join("checkpoint.safetensors");
    let logits = forward_logits(
        &model,
        |graph| {
            checkpoint::load(&ck_path, graph)
                .map(|ck| ck.params)
                .map_err(|e| e.to_string())
        },
        &args.tokens,
    )
    .map_err(other)?;
    // Serialized as f32 (the shortest text that reads back to the same f32), not widened.
    #[derive(serde::Serialize)]
    struct Logits {
        logits: Vec<Vec<f32>>,
    }
    let json = serde_json::to_string(&Logits { logits })
        .map_err(|e| other(format!("cannot encode the logits: {e}")))?;
    crate::output::out(&format!("{json}\n"));
    Ok(())
}
