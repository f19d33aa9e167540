//! Hugging Face safetensors checkpoints: read them into kiln parameters, write kiln parameters
//! out in HF's names and layouts.
//!
//! Which HF tensor holds which kiln parameter is the compiler's knowledge (kiln-compiler's
//! `hf_weights`, as the data of [`kiln_ir::hf_layout`]); callers pass it in as one
//! [`ParamPieces`] per parameter, so this module never looks at a spec. A checkpoint is one
//! `model.safetensors` or shards listed by `model.safetensors.index.json`. Tensors may be F32,
//! BF16 or F16; every value converts to f32 exactly (kiln's master weights are f32), and
//! [`HfCheckpoint::dtypes`] reports what the file held so the caller can say so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use kiln_ir::hf_layout::{Layout, Piece};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// One kiln parameter and where its values live in an HF checkpoint.
#[derive(Clone, Debug)]
pub struct ParamPieces {
    /// The kiln parameter name (`layers.0.attn.q.weight`).
    pub name: String,
    /// Its kiln shape.
    pub shape: Vec<usize>,
    /// The HF pieces that, concatenated along the first axis, make it; empty when HF has no
    /// such tensor (the parameter is then zero, and must be zero to export).
    pub pieces: Vec<Piece>,
}

/// A tensor of an HF checkpoint, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every tensor of an HF checkpoint, by name.
#[derive(Clone, Debug, Default)]
pub struct HfCheckpoint {
    pub tensors: BTreeMap<String, Tensor>,
    /// How many tensors each stored dtype had (`"BF16" → 412`).
    pub dtypes: BTreeMap<String, usize>,
    /// The safetensors files read, in order.
    pub files: Vec<PathBuf>,
}

/// What went wrong reading or mapping an HF checkpoint. Mapping problems are collected and
/// reported together.
#[derive(Debug)]
pub enum HfError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        reason: String,
    },
    /// Problems matching the checkpoint's tensors to the model's parameters, one per line.
    Mismatch(Vec<String>),
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HfError::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            HfError::Corrupt { path, reason } => write!(
                f,
                "{} is not a readable safetensors checkpoint: {reason}",
                path.display()
            ),
            HfError::Mismatch(problems) => {
                write!(
                    f,
                    "the checkpoint does not fit the model ({} problem{}):",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                )?;
                for p in problems {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for HfError {}

/// The single-file checkpoint's name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index's name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads the checkpoint in `dir`: the shards `model.safetensors.index.json` lists, or else
/// `model.safetensors`. Tensor names pass through `canonical` (GPT-2's optional prefix).
pub fn read_dir(dir: &Path, canonical: impl Fn(&str) -> String) -> Result<HfCheckpoint, HfError> {
    let index = dir.join(INDEX_FILE);
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|error| HfError::Io {
            path: index.clone(),
            error,
        })?;
        let corrupt = |reason: String| HfError::Corrupt {
            path: index.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| corrupt("no `weight_map` object".into()))?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| corrupt(format!("`{name}` maps to a non-string")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(corrupt(format!(
                    "shard name `{file}` is not a plain file name"
                )));
            }
            shards.insert(file.to_string());
        }
        let missing: Vec<_> = shards.iter().filter(|f| !dir.join(f).exists()).collect();
        if !missing.is_empty() {
            return Err(corrupt(format!(
                "it lists shard{} that {} not in {}: {}",
                if missing.len() == 1 { "" } else { "s" },
                if missing.len() == 1 { "is" } else { "are" },
                dir.display(),
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        let single = dir.join(SINGLE_FILE);
        if !single.exists() {
            return Err(HfError::Io {
                path: single,
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} is there"),
                ),
            });
        }
        vec![single]
    };
    let mut ck = HfCheckpoint::default();
    for path in files {
        add_file(&path, &canonical, &mut ck)?;
    }
    Ok(ck)
}

/// Reads one safetensors file (any tensor names, no renaming).
pub fn read_safetensors(path: &Path) -> Result<HfCheckpoint, HfError> {
    let mut ck = HfCheckpoint::default();
    add_file(path, &|n: &str| n.to_string(), &mut ck)?;
    Ok(ck)
}

fn add_file(
    path: &Path,
    canonical: &impl Fn(&str) -> String,
    ck: &mut HfCheckpoint,
) -> Result<(), HfError> {
    let bytes = std::fs::read(path).map_err(|error| HfError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    read_file(&bytes, canonical, ck).map_err(|reason| HfError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })?;
    ck.files.push(path.to_path_buf());
    Ok(())
}

/// Adds the tensors of one safetensors file to `ck`.
fn read_file(
    bytes: &[u8],
    canonical: &impl Fn(&str) -> String,
    ck: &mut HfCheckpoint,
) -> Result<(), String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    for (name, view) in st.tensors() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "tensor `{name}` is {other:?}; kiln reads F32, BF16 and F16 checkpoints"
                ))
            }
        };
        *ck.dtypes.entry(format!("{:?}", view.dtype())).or_default() += 1;
        let key = canonical(&name);
        let tensor = Tensor {
            shape: view.shape().to_vec(),
            data,
        };
        if ck.tensors.insert(key.clone(), tensor).is_some() {
            return Err(format!("tensor `{key}` appears twice"));
        }
    }
    Ok(())
}

/// The shape a piece has in its HF tensor (for `Conv1d` pieces, the whole HF tensor's shape).
/// A 3-D kiln parameter is a stack of experts, one piece per slice of its first axis; any
/// other parameter is one piece.
fn hf_shape(kiln: &[usize], layout: Layout) -> Vec<usize> {
    let piece = if kiln.len() == 3 { &kiln[1..] } else { kiln };
    match (layout, piece) {
        (Layout::Conv1d { count, .. }, [out, inp]) => vec![*inp, out * count],
        (Layout::Conv1d { count, .. }, [out]) => vec![out * count],
        _ => piece.to_vec(),
    }
}

/// Reads a piece's values (kiln layout) out of its HF tensor.
fn take_piece(t: &Tensor, layout: Layout) -> Vec<f32> {
    match layout {
        Layout::Same => t.data.clone(),
        Layout::Conv1d { index, count } => match t.shape.as_slice() {
            [inp, total] => {
                let out = total / count;
                let mut v = Vec::with_capacity(out * inp);
                for o in index * out..(index + 1) * out {
                    v.extend((0..*inp).map(|i| t.data[i * total + o]));
                }
                v
            }
            [total] => {
                let out = total / count;
                t.data[index * out..(index + 1) * out].to_vec()
            }
            _ => t.data.clone(),
        },
    }
}

/// The result of matching a checkpoint to a model's parameters.
#[derive(Clone, Debug)]
pub struct Imported {
    /// Per parameter, in the order given: its values, or `None` when the checkpoint does not
    /// have it and `absent_ok` allowed that (the caller initializes it).
    pub params: Vec<Option<Vec<f32>>>,
    /// Parameters that HF does not store and that were set to zero.
    pub zeroed: Vec<String>,
}

/// Builds the parameters from a checkpoint.
///
/// Every piece must be present with the right shape, unless `absent_ok(param)` allows the
/// whole parameter to be missing. `copies` lists checkpoint tensors that duplicate a parameter
/// (`(HF name, index into params)`): they must equal it where present. Every other
/// checkpoint tensor must be used, except those `skip` names (buffers). All problems are
/// reported together.
pub fn import_params(
    params: &[ParamPieces],
    ck: &HfCheckpoint,
    copies: &[(String, usize)],
    absent_ok: impl Fn(&str) -> bool,
    skip: impl Fn(&str) -> bool,
) -> Result<Imported, HfError> {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut out = Vec::with_capacity(params.len());
    let mut zeroed = Vec::new();
    for p in params {
        let elements: usize = p.shape.iter().product();
        if p.pieces.is_empty() {
            zeroed.push(p.name.clone());
            out.push(Some(vec![0.0; elements]));
            continue;
        }
        let missing: Vec<&Piece> = p
            .pieces
            .iter()
            .filter(|piece| !ck.tensors.contains_key(&piece.name))
            .collect();
        if missing.len() == p.pieces.len() && absent_ok(&p.name) {
            out.push(None);
            continue;
        }
        let mut values = Vec::with_capacity(elements);
        for piece in &p.pieces {
            let Some(t) = ck.tensors.get(&piece.name) else {
                problems.push(format!(
                    "missing tensor `{}` (kiln's `{}`)",
                    piece.name, p.name
                ));
                continue;
            };
            used.insert(piece.name.clone());
            let want = hf_shape(&p.shape, piece.layout);
            if t.shape != want {
                problems.push(format!(
                    "tensor `{}` has shape {:?}, the model needs {want:?} (kiln's `{}`)",
                    piece.name, t.shape, p.name
                ));
                continue;
            }
            values.extend(take_piece(t, piece.layout));
        }
        out.push((values.len() == elements).then_some(values));
    }
    for (name, index) in copies {
        let Some(t) = ck.tensors.get(name) else {
            continue;
        };
        used.insert(name.clone());
        if let Some(Some(v)) = out.get(*index) {
            if t.data != *v {
                problems.push(format!(
                    "tensor `{name}` differs from `{}`; kiln shares one copy between the main model and the MTP modules",
                    params[*index].name
                ));
            }
        }
    }
    let unused: Vec<&String> = ck
        .tensors
        .keys()
        .filter(|n| !used.contains(*n) && !skip(n))
        .collect();
    const SHOWN: usize = 12;
    if !unused.is_empty() {
        let mut names: Vec<String> = unused
            .iter()
            .take(SHOWN)
            .map(|n| format!("`{n}`"))
            .collect();
        if unused.len() > SHOWN {
            names.push(format!("and {} more", unused.len() - SHOWN));
        }
        problems.push(format!(
            "{} tensor{} the model has no place for: {}",
            unused.len(),
            if unused.len() == 1 { "" } else { "s" },
            names.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(Imported {
            params: out,
            zeroed,
        })
    } else {
        Err(HfError::Mismatch(problems))
    }
}

/// Lays kiln parameters out as HF tensors: `values[i]` is `params[i]`'s data. `copies` adds
/// duplicate tensors (`(HF name, index into params)`). A parameter without pieces must be all
/// zeros (HF has nowhere to keep it).
pub fn export_tensors(
    params: &[ParamPieces],
    values: &[Vec<f32>],
    copies: &[(String, usize)],
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (p, v) in params.iter().zip(values) {
        if p.pieces.is_empty() {
            if v.iter().any(|&x| x != 0.0) {
                return Err(format!(
                    "`{}` is not zero, but Hugging Face's format for this model has no tensor for it",
                    p.name
                ));
            }
            continue;
        }
        let chunk = v.len() / p.pieces.len();
        for (piece, data) in p.pieces.iter().zip(v.chunks(chunk.max(1))) {
            let shape = hf_shape(&p.shape, piece.layout);
            match piece.layout {
                Layout::Same => {
                    out.insert(
                        piece.name.clone(),
                        Tensor {
                            shape,
                            data: data.to_vec(),
                        },
                    );
                }
                Layout::Conv1d { index, count } => {
                    let t = out.entry(piece.name.clone()).or_insert_with(|| Tensor {
                        data: vec![0.0; shape.iter().product()],
                        shape: shape.clone(),
                    });
                    match shape.as_slice() {
                        [inp, total] => {
                            let outs = total / count;
                            for (o, row) in data.chunks(*inp).enumerate() {
                                for (i, &x) in row.iter().enumerate() {
                                    t.data[i * total + index * outs + o] = x;
                                }
                            }
                        }
                        _ => {
                            let outs = data.len();
                            t.data[index * outs..(index + 1) * outs].copy_from_slice(data);
                        }
                    }
                }
            }
        }
    }
    for (name, index) in copies {
        let p = &params[*index];
        out.insert(
            name.clone(),
            Tensor {
                shape: p.shape.clone(),
                data: values[*index].clone(),
            },
        );
    }
    Ok(out)
}

/// The element type [`to_safetensors`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreAs {
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
}

/// Serializes tensors as one safetensors file with HF's `{"format": "pt"}` metadata.
pub fn to_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    dtype: StoreAs,
) -> Result<Vec<u8>, String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let data = match dtype {
                StoreAs::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                StoreAs::Bf16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            (name.clone(), t.shape.clone(), data)
        })
        .collect();
    let st_dtype = match dtype {
        StoreAs::F32 => Dtype::F32,
        StoreAs::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(st_dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(name: &str, layout: Layout) -> Piece {
        Piece {
            name: name.into(),
            layout,
        }
    }

    fn checkpoint(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> HfCheckpoint {
        HfCheckpoint {
            tensors: tensors
                .iter()
                .map(|(n, s, d)| {
                    (
                        n.to_string(),
                        Tensor {
                            shape: s.clone(),
                            data: d.clone(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    /// GPT-2's fused, transposed `c_attn`: kiln's q, k and v are output chunks 0, 1, 2 of a
    /// `[in, 3·out]` tensor; export puts them back exactly.
    #[test]
    fn conv1d_chunks_round_trip() {
        // in = 2, out = 2 per chunk: c_attn is [2, 6], row i holds input i's weights.
        let c_attn: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let ck = checkpoint(&[
            ("c.weight", vec![2, 6], c_attn.clone()),
            ("c.bias", vec![6], (0..6).map(|x| x as f32 * 10.0).collect()),
        ]);
        let params: Vec<ParamPieces> = ["q", "k", "v"]
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                let layout = Layout::Conv1d { index: i, count: 3 };
                [
                    ParamPieces {
                        name: format!("{n}.weight"),
                        shape: vec![2, 2],
                        pieces: vec![piece("c.weight", layout)],
                    },
                    ParamPieces {
                        name: format!("{n}.bias"),
                        shape: vec![2],
                        pieces: vec![piece("c.bias", layout)],
                    },
                ]
            })
            .collect();
        let got = import_params(&params, &ck, &[], |_| false, |_| false).unwrap();
        let values: Vec<Vec<f32>> = got.params.into_iter().map(Option::unwrap).collect();
        // k = output columns 2, 3; kiln stores [out, in]: row o = column o of c_attn.
        assert_eq!(values[2], [2.0, 8.0, 3.0, 9.0]);
        assert_eq!(values[3], [20.0, 30.0]);
        let back = export_tensors(&params, &values, &[]).unwrap();
        assert_eq!(back["c.weight"].data, c_attn);
        assert_eq!(back["c.weight"].shape, [2, 6]);
        assert_eq!(back["c.bias"], ck.tensors["c.bias"]);
    }

    #[test]
    fn experts_stack_and_unstack() {
        let ck = checkpoint(&[
            ("e.0", vec![2, 3], vec![1.0; 6]),
            ("e.1", vec![2, 3], vec![2.0; 6]),
        ]);
        let params = [ParamPieces {
            name: "experts".into(),
            shape: vec![2, 2, 3],
            pieces: vec![piece("e.0", Layout::Same), piece("e.1", Layout::Same)],
        }];
        let got = import_params(&params, &ck, &[], |_| false, |_| false).unwrap();
        let v = got.params[0].clone().unwrap();
        assert_eq!(v, [[1.0; 6], [2.0; 6]].concat());
        let back = export_tensors(&params, &[v], &[]).unwrap();
        assert_eq!(back["e.1"], ck.tensors["e.1"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let ck = checkpoint(&[
            ("a", vec![3], vec![0.0; 3]),
            ("stray", vec![1], vec![0.0]),
            ("dup", vec![2], vec![9.0, 9.0]),
            ("b", vec![2], vec![1.0, 2.0]),
        ]);
        let params = [
            ParamPieces {
                name: "A".into(),
                shape: vec![2],
                pieces: vec![piece("a", Layout::Same)],
            },
            ParamPieces {
                name: "B".into(),
                shape: vec![2],
                pieces: vec![piece("b", Layout::Same)],
            },
            ParamPieces {
                name: "C".into(),
                shape: vec![4],
                pieces: vec![piece("c", Layout::Same)],
            },
        ];
        let err = import_params(&params, &ck, &[("dup".into(), 1)], |_| false, |_| false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 problems"), "{err}");
        assert!(
            err.contains("`a` has shape [3], the model needs [2]"),
            "{err}"
        );
        assert!(err.contains("missing tensor `c` (kiln's `C`)"), "{err}");
        assert!(err.contains("`dup` differs from `B`"), "{err}");
        assert!(
            err.contains("1 tensor the model has no place for: `stray`"),
            "{err}"
        );
        // A parameter allowed to be absent comes back as None; skipped names are not strays.
        let ok = import_params(
            &params,
            &ck,
            &[],
            |n| n == "C",
            |n| n == "stray" || n == "dup",
        );
        assert!(ok.is_err(), "`a` still has the wrong shape");
    }

    #[test]
    fn parameters_hf_lacks_are_zero_and_must_stay_zero() {
        let params = [ParamPieces {
            name: "router.bias".into(),
            shape: vec![2],
            pieces: vec![],
        }];
        let got =
            import_params(&params, &HfCheckpoint::default(), &[], |_| false, |_| false).unwrap();
        assert_eq!(got.params[0], Some(vec![0.0, 0.0]));
        assert_eq!(got.zeroed, ["router.bias"]);
        assert!(export_tensors(&params, &[vec![0.0, 0.0]], &[])
            .unwrap()
            .is_empty());
        let err = export_tensors(&params, &[vec![0.5, 0.0]], &[]).unwrap_err();
        assert!(err.contains("`router.bias` is not zero"), "{err}");
    }

    #[test]
    fn safetensors_round_trip_in_f32_and_bf16() {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            Tensor {
                shape: vec![2, 2],
                data: vec![1.0, -2.5, 3.0e-3, 1.0 + 1.0 / 256.0],
            },
        );
        let dir = std::env::temp_dir().join(format!("kiln-hf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (dtype, name) in [(StoreAs::F32, "F32"), (StoreAs::Bf16, "BF16")] {
            std::fs::write(
                dir.join(SINGLE_FILE),
                to_safetensors(&tensors, dtype).unwrap(),
            )
            .unwrap();
            let ck = read_dir(&dir, |n| n.to_string()).unwrap();
            assert_eq!(ck.dtypes[name], 1);
            let got = &ck.tensors["w"];
            let want: Vec<f32> = match dtype {
                StoreAs::F32 => tensors["w"].data.clone(),
                StoreAs::Bf16 => tensors["w"]
                    .data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
            };
            assert_eq!(got.data, want);
        }
        // 1 + 2⁻⁸ is halfway between two bf16 values and rounds to even (1.0).
        assert_eq!(half::bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_and_shards_are_named() {
        let dir = std::env::temp_dir().join(format!("kiln-hf-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_dir(&dir, |n| n.to_string()).unwrap_err().to_string();
        assert!(err.contains("neither model.safetensors nor"), "{err}");
        std::fs::write(
            dir.join(INDEX_FILE),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = read_dir(&dir, |n| n.to_string()).unwrap_err().to_string();
        assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
        std::fs::write(dir.join(INDEX_FILE), "{ not json").unwrap();
        let err = read_dir(&dir, |n| n.to_string()).unwrap_err().to_string();
        assert!(
            err.contains("not a readable safetensors checkpoint"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
