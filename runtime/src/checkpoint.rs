//! Training checkpoints as safetensors: weights (router biases included), AdamW moments, the
//! step, the data order's PRNG state and the spec's hash.
//!
//! Tensors are named after the graph's parameters (`layers.3.attn.kv_a.weight`), with the
//! moments under `adam.m.<name>` and `adam.v.<name>`; the rest is string metadata. Writes are
//! atomic — a temporary file in the same directory, flushed to disk, then renamed over the old
//! checkpoint — so a kill at any moment leaves the last good checkpoint loadable.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_ir::ir::Graph;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// The value of the `format` metadata key this version writes and reads.
pub const FORMAT: &str = "kiln-checkpoint-1";

/// Everything needed to continue a run exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// Parameter values, in the graph's parameter order.
    pub params: Vec<Vec<f32>>,
    /// AdamW first and second moments, in the same order.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// State of the batcher's PRNG.
    pub data_rng: [u64; 2],
    /// Hash of the spec text the run was started with.
    pub spec_hash: String,
}

#[derive(Debug)]
pub enum CheckpointError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        reason: String,
    },
    Mismatch {
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io { path, error } => write!(f, "cannot access checkpoint {}: {error}", path.display()),
            CheckpointError::Corrupt { path, reason } => write!(
                f,
                "checkpoint {} is damaged or not a kiln checkpoint ({reason}); restart the run or restore an older copy",
                path.display()
            ),
            CheckpointError::Mismatch { path, reason } => write!(
                f,
                "checkpoint {} does not belong to this model: {reason}; resume with the spec the run started with",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CheckpointError {}

/// A stable 64-bit FNV-1a hash of the spec text, in hex.
pub fn spec_hash(text: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in text {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes a checkpoint of `graph`'s parameters.
pub fn to_bytes(graph: &Graph, ck: &Checkpoint) -> Result<Vec<u8>, String> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for ((_, p), i) in graph.params.iter().zip(0..) {
        let shape: Vec<usize> = p.ty.shape.iter().map(|&d| d as usize).collect();
        buffers.push((p.name.clone(), shape.clone(), bytes_of(&ck.params[i])));
        buffers.push((
            format!("adam.m.{}", p.name),
            shape.clone(),
            bytes_of(&ck.m[i]),
        ));
        buffers.push((format!("adam.v.{}", p.name), shape, bytes_of(&ck.v[i])));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), ck.step.to_string()),
        (
            "data_rng".to_string(),
            format!("{},{}", ck.data_rng[0], ck.data_rng[1]),
        ),
        ("spec_hash".to_string(), ck.spec_hash.clone()),
    ]
    .into_iter()
    .collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
    Ok(sorted_header(bytes))
}

/// The file with its JSON header's keys in sorted order, so one state is always the same
/// bytes: safetensors writes the metadata from a `HashMap`, in an order that varies from run
/// to run. Sorting keeps the header's length, so nothing else moves.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    // serde_json's map is ordered by key (no `preserve_order`), at every level.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else {
        return bytes;
    };
    let Ok(mut sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    if sorted.len() > n {
        return bytes;
    }
    // The original's padding (spaces, to 8-byte alignment) is kept.
    sorted.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&sorted);
    bytes
}

/// Writes a checkpoint atomically to `path`.
pub fn save(path: &Path, graph: &Graph, ck: &Checkpoint) -> Result<(), CheckpointError> {
    let io = |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    };
    let bytes = to_bytes(graph, ck).map_err(|reason| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads and validates a checkpoint for `graph`.
pub fn load(path: &Path, graph: &Graph) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    from_bytes(&bytes, graph).map_err(|e| match e {
        Err(reason) => CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
        Ok(reason) => CheckpointError::Mismatch {
            path: path.to_path_buf(),
            reason,
        },
    })
}

/// Parses a checkpoint. The error is `Err(reason)` for damaged data and `Ok(reason)` for a
/// well-formed checkpoint of another model.
pub fn from_bytes(bytes: &[u8], graph: &Graph) -> Result<Checkpoint, Result<String, String>> {
    let corrupt = |r: String| Err(r);
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        info.get(k)
            .cloned()
            .ok_or_else(|| corrupt(format!("no `{k}` metadata")))
    };
    if get("format")? != FORMAT {
        return Err(corrupt(format!(
            "format `{}`, expected `{FORMAT}`",
            get("format")?
        )));
    }
    let step = get("step")?
        .parse::<u64>()
        .map_err(|e| corrupt(format!("step: {e}")))?;
    let rng_text = get("data_rng")?;
    let rng: Vec<u64> = rng_text
        .split(',')
        .map(|s| s.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| corrupt(format!("data_rng: {e}")))?;
    if rng.len() != 2 {
        return Err(corrupt("data_rng must hold two numbers".into()));
    }
    let read = |name: &str, shape: &[u64]| -> Result<Vec<f32>, Result<String, String>> {
        let t = st
            .tensor(name)
            .map_err(|_| Ok(format!("it has no tensor `{name}`")))?;
        let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if t.shape() != want.as_slice() {
            return Err(Ok(format!(
                "`{name}` has shape {:?}, the model needs {want:?}",
                t.shape()
            )));
        }
        if t.dtype() != Dtype::F32 {
            return Err(corrupt(format!("`{name}` is {:?}, not F32", t.dtype())));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (_, p) in graph.params.iter() {
        params.push(read(&p.name, &p.ty.shape)?);
        m.push(read(&format!("adam.m.{}", p.name), &p.ty.shape)?);
        v.push(read(&format!("adam.v.{}", p.name), &p.ty.shape)?);
    }
    Ok(Checkpoint {
        step,
        params,
        m,
        v,
        data_rng: [rng[0], rng[1]],
        spec_hash: get("spec_hash")?,
    })
}
