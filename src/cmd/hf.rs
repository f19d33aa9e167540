//! `kiln import-hf` and `kiln export-hf`: moving models between kiln and Hugging Face.
//!
//! A config maps to a spec through [`kiln_compiler::hf`]; weights map tensor by tensor through
//! [`kiln_compiler::hf_weights`] and [`kiln_runtime::hf`]. Outputs are written into a
//! temporary sibling directory (or file) and renamed into place, so a failure leaves nothing
//! half-written.

use std::path::{Path, PathBuf};

use kiln_compiler::check::check;
use kiln_compiler::hf::{export_config, import_config};
use kiln_compiler::hf_weights::{self, Naming};
use kiln_compiler::ir::Graph;
use kiln_compiler::model::Model;
use kiln_compiler::program::compile;
use kiln_runtime::checkpoint::{self, Checkpoint};
use kiln_runtime::data::{initial_batch_state, TOKENIZER_FILE};
use kiln_runtime::hf::{self as rt_hf, ParamPieces, StoreAs};
use kiln_runtime::train::init_params;

use crate::engine::TokenizerFile;
use crate::fsutil::{self, fresh_dir, write_dir};
use crate::{other, Failure};

/// `kiln import-hf` (see `--help`).
#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// A `config.json` (writes a spec), or a model directory with `config.json` and
    /// safetensors weights, single-file or sharded (writes a run directory).
    pub path: PathBuf,
    /// Where to write: the spec file for a config, a new run directory for a model.
    #[arg(short, long)]
    pub out: PathBuf,
    /// The model name in the spec [default: the directory's or config's parent's name].
    #[arg(long)]
    pub name: Option<String>,
}

/// `kiln export-hf` (see `--help`).
#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// A run directory (`spec.toml` and `checkpoint.safetensors`).
    pub dir: PathBuf,
    /// The directory to write `config.json` and `model.safetensors` into (must not exist, or
    /// be empty).
    #[arg(short, long)]
    pub out: PathBuf,
    /// The element type of the written weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Dtype {
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
}

/// A name for the imported model: `--name`, else the model directory's name (or the
/// config's directory's), made of the characters a spec name allows.
fn model_name(args: &ImportArgs) -> String {
    if let Some(n) = &args.name {
        return n.clone();
    }
    let dir = if args.path.is_dir() {
        Some(args.path.as_path())
    } else {
        args.path.parent()
    };
    let raw = dir
        .and_then(|d| d.canonicalize().ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "imported".into());
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "imported".into()
    } else {
        clean
    }
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| other(format!("cannot read {}: {e}", path.display())))
}

/// The kiln parameters of `graph` with their HF pieces.
fn param_pieces(model: &Model, graph: &Graph) -> Result<Vec<ParamPieces>, Failure> {
    graph
        .params
        .iter()
        .map(|(_, p)| {
            Ok(ParamPieces {
                name: p.name.clone(),
                shape: p.ty.shape.iter().map(|&d| d as usize).collect(),
                pieces: hf_weights::pieces(model, &p.name).map_err(other)?,
            })
        })
        .collect()
}

/// DeepSeek's duplicated MTP tensors, as (HF name, parameter index).
fn copies(model: &Model, params: &[ParamPieces]) -> Vec<(String, usize)> {
    hf_weights::shared_copies(model)
        .into_iter()
        .filter_map(|(hf, kiln)| params.iter().position(|p| p.name == kiln).map(|i| (hf, i)))
        .collect()
}

pub(crate) fn run_import(args: ImportArgs) -> Result<(), Failure> {
    let name = model_name(&args);
    let config_path = if args.path.is_dir() {
        args.path.join("config.json")
    } else {
        args.path.clone()
    };
    let mut imported = import_config(&read(&config_path)?, &name)
        .map_err(|e| other(format!("{}: {e}", config_path.display())))?;
    // kiln's own settings (precision policy, training, name), when kiln exported the model.
    let sidecar = config_path.with_file_name(SIDECAR);
    if sidecar.exists() {
        match restore_sidecar(&sidecar, &imported.spec) {
            Ok(spec) => {
                imported.spec = spec;
                imported.notes.push(format!(
                    "kiln's own settings (precision, training, name) restored from {}",
                    sidecar.display()
                ));
            }
            Err(why) => imported
                .notes
                .push(format!("{} ignored: {why}", sidecar.display())),
        }
    }
    if !args.path.is_dir() {
        // A config alone: write the spec (through a temporary file, renamed into place).
        fsutil::write_atomic(&args.out, imported.spec.as_bytes())
            .map_err(|e| other(format!("cannot write {}: {e}", args.out.display())))?;
        eprintln!(
            "wrote {} ({} model `{name}`); check it with `kiln check {}`",
            args.out.display(),
            imported.family.model_type(),
            args.out.display()
        );
        for note in &imported.notes {
            eprintln!("note: {note}");
        }
        return Ok(());
    }
    fresh_dir(&args.out)?;
    let model = check(imported.spec.as_bytes())
        .map_err(|_| other("the imported spec does not check; this is a bug in kiln's importer"))?;
    let compiled = compile(&model).map_err(|e| other(e.to_string()))?;
    let graph = compiled.forward.graph();
    let params = param_pieces(&model, graph)?;
    let naming = Naming::of(&model);
    let ck = rt_hf::read_dir(&args.path, |n| hf_weights::canonical(naming, n))
        .map_err(|e| other(e.to_string()))?;
    let copies = copies(&model, &params);
    let result = rt_hf::import_params(
        &params,
        &ck,
        &copies,
        |n| n.starts_with("mtp."),
        |n| hf_weights::is_buffer(naming, n),
    )
    .map_err(|e| other(format!("{}: {e}", args.path.display())))?;

    // MTP modules are all present or all absent (HF's own saves drop them).
    let mtp: Vec<usize> = (0..params.len())
        .filter(|&i| params[i].name.starts_with("mtp."))
        .collect();
    let absent: Vec<usize> = mtp
        .iter()
        .copied()
        .filter(|&i| result.params[i].is_none())
        .collect();
    if !absent.is_empty() && absent.len() != mtp.len() {
        return Err(other(format!(
            "{}: the checkpoint has some MTP tensors but not `{}` (kiln's `{}`)",
            args.path.display(),
            params[absent[0]].pieces[0].name,
            params[absent[0]].name
        )));
    }
    let init = if absent.is_empty() {
        Vec::new()
    } else {
        init_params(graph, model.train.seed)
    };
    let values: Vec<Vec<f32>> = result
        .params
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.unwrap_or_else(|| init[i].clone()))
        .collect();
    let zeros: Vec<Vec<f32>> = values.iter().map(|v| vec![0.0; v.len()]).collect();
    let ck_out = Checkpoint {
        step: 0,
        params: values,
        m: zeros.clone(),
        v: zeros,
        data_rng: initial_batch_state(model.train.seed),
        spec_hash: checkpoint::spec_hash(imported.spec.as_bytes()),
    };
    let bytes = checkpoint::to_bytes(graph, &ck_out).map_err(other)?;
    let mut files = vec![
        ("spec.toml", imported.spec.clone().into_bytes()),
        ("checkpoint.safetensors", bytes),
    ];
    if let Some(tokenizer) = import_tokenizer(&args.path, &model, &mut imported.notes) {
        files.push((TOKENIZER_FILE, tokenizer));
    }
    write_dir(&args.out, &files)?;

    let dtypes: Vec<String> = ck.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
    eprintln!(
        "imported {} model `{name}` from {} ({} file{}, {} tensors: {}) into {}",
        imported.family.model_type(),
        args.path.display(),
        ck.files.len(),
        if ck.files.len() == 1 { "" } else { "s" },
        ck.tensors.len(),
        dtypes.join(", "),
        args.out.display()
    );
    if ck.dtypes.keys().any(|d| d != "F32") {
        eprintln!(
            "note: weights stored in {} are upcast exactly to kiln's {} master weights",
            dtypes.join(" and "),
            model.precision.master
        );
    }
    if !absent.is_empty() {
        eprintln!(
            "note: the checkpoint has no MTP weights (transformers drops them); the {} MTP \
             parameter tensors start from kiln's initializer (seed {})",
            absent.len(),
            model.train.seed
        );
    }
    for z in &result.zeroed {
        eprintln!("note: `{z}` has no Hugging Face tensor and starts at zero");
    }
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    eprintln!(
        "next: `kiln logits {0} --tokens …`, `kiln sample {0}`, `kiln train --resume {0}`",
        args.out.display()
    );
    Ok(())
}

/// The bytes of the model directory's `tokenizer.json` to carry into the run, if it has one
/// that kiln reads and whose ids fit the model; otherwise a note says why it stays behind.
fn import_tokenizer(dir: &Path, model: &Model, notes: &mut Vec<String>) -> Option<Vec<u8>> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return None;
    }
    let file = match TokenizerFile::read(&path) {
        Ok(file) => file,
        Err(Failure::Other(why)) => {
            notes.push(format!("{TOKENIZER_FILE} not carried into the run: {why}"));
            return None;
        }
        Err(Failure::Invalid) => return None,
    };
    let vocab = file.tokenizer.vocab_size();
    if u64::from(vocab) > model.vocab {
        notes.push(format!(
            "{} not carried into the run: its {vocab} tokens exceed the model's vocabulary of {}",
            path.display(),
            model.vocab
        ));
        return None;
    }
    notes.push(format!(
        "{} ({vocab} tokens) carried into the run: kiln sample encodes and decodes with it",
        path.display()
    ));
    Some(file.bytes)
}

/// The file beside `config.json` that keeps what HF's config has no place for: the run's
/// whole spec. transformers ignores it; `kiln import-hf` restores it.
const SIDECAR: &str = "kiln.toml";

/// The sidecar's spec, if it describes the architecture `config_spec` does (the same HF
/// config): then the weights fit it, and its precision, training and name are restored.
fn restore_sidecar(path: &std::path::Path, config_spec: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let kept =
        check(text.as_bytes()).map_err(|d| format!("it does not check ({} errors)", d.len()))?;
    let from_config = check(config_spec.as_bytes())
        .map_err(|_| "the config's spec does not check".to_string())?;
    let (a, b) = (export_config(&kept), export_config(&from_config));
    match (a, b) {
        (Ok(a), Ok(b)) if a == b => Ok(text),
        _ => Err("its architecture is not config.json's".to_string()),
    }
}

pub(crate) fn run_export(args: ExportArgs, color: bool) -> Result<(), Failure> {
    fresh_dir(&args.out)?;
    let spec_path = args.dir.join("spec.toml");
    let (_, spec_bytes, model) = crate::spec::load_text(Some(&spec_path), &mut Vec::new(), color)?;
    let mut config = export_config(&model).map_err(|e| other(e.to_string()))?;
    let compiled = compile(&model).map_err(|e| other(e.to_string()))?;
    let graph = compiled.forward.graph();
    let ck = checkpoint::load(&args.dir.join("checkpoint.safetensors"), graph)
        .map_err(|e| other(e.to_string()))?;
    let params = param_pieces(&model, graph)?;
    let tensors = rt_hf::export_tensors(&params, &ck.params, &copies(&model, &params))
        .map_err(|e| other(format!("cannot export: {e}")))?;
    let (store, dtype_name) = match args.dtype {
        Dtype::F32 => (StoreAs::F32, "float32"),
        Dtype::Bf16 => (StoreAs::Bf16, "bfloat16"),
    };
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), dtype_name.into());
        obj.insert("dtype".into(), dtype_name.into());
    }
    let weights = rt_hf::to_safetensors(&tensors, store).map_err(other)?;
    let config_text = serde_json::to_string_pretty(&config)
        .map_err(|e| other(format!("cannot encode config.json: {e}")))?;
    let mut files = vec![
        ("config.json", format!("{config_text}\n").into_bytes()),
        (rt_hf::SINGLE_FILE, weights),
        (SIDECAR, spec_bytes),
    ];
    // The run's tokenizer goes beside the config, where transformers' AutoTokenizer looks.
    let mut with_tokenizer = String::new();
    if let Some(t) = TokenizerFile::in_dir(&args.dir)? {
        files.push((TOKENIZER_FILE, t.bytes));
        with_tokenizer = format!(", its {TOKENIZER_FILE}");
    }
    write_dir(&args.out, &files)?;
    eprintln!(
        "exported `{}` at step {} to {} ({} tensors, {dtype_name}{with_tokenizer}, and kiln's \
         settings in {SIDECAR}); load it with transformers' AutoModelForCausalLM.from_pretrained",
        model.name,
        ck.step,
        args.out.display(),
        tensors.len()
    );
    Ok(())
}
