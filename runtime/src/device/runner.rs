//! The plan runner: a training (or forward) Program's CUDA plan on a [`Device`].
//!
//! Built once per Program: every value gets a device buffer (a reshape's output is its input's
//! buffer, as the plan's aliases say), every scratch slot the largest size any step asks of
//! it, every FP8 copy its codes and scales, every RoPE table the CPU backend's values. A run
//! uploads the parameters and the step's inputs, then does each step's work in the
//! manifest's order — launches with their arguments resolved to addresses and values, GEMMs
//! as [`GemmCall`]s — reads the error flag, and downloads the values its caller keeps.
//!
//! [`DeviceRunner`] implements the interpreter's [`Run`], so a [`crate::train::Trainer`]
//! built `with_runner` trains on a device with everything else unchanged: batches, the
//! learning-rate schedule, metrics, checkpoints (the same safetensors, so a run moves between
//! devices). The optimizer then runs on the host over the gradients the device computed.

use std::collections::HashMap;
use std::sync::Mutex;

use kiln_ir::attrs::Format;
use kiln_ir::cuda::{Arg, CudaProgram, Gemm, GroupedGemm, Work};
use kiln_ir::ir::{DType, Def, InputKind, NodeId, ValueId};
use kiln_ir::program::Program;

use super::{BufId, Device, DeviceError, Fp8Call, Fp8Operand, GemmCall, GemmOperand, KernelArg};
use crate::cpu::attention::rope_tables;
use crate::exec::{Buf, ExecError, Feed, Run};
use crate::numerics::gemm::GemmNumerics;

/// A Program's plan, ready to run on a device.
pub struct DeviceRunner<D: Device> {
    state: Mutex<State<D>>,
}

struct State<D> {
    device: D,
    cuda: CudaProgram,
    /// Each value's buffer (aliases share their source's), its element type and count.
    values: Vec<(BufId, DType, u64)>,
    scratch: Vec<BufId>,
    /// Each FP8 copy's codes and scales.
    copies: Vec<(BufId, BufId)>,
    /// Each RoPE table's cos and sin.
    rope: Vec<(BufId, BufId)>,
    error: BufId,
    /// The graph's inputs and parameters: which value each fills.
    inputs: Vec<(ValueId, InputKind)>,
    params: Vec<(usize, ValueId)>,
    /// The values a run returns.
    keep: Vec<ValueId>,
    /// Parameters each kernel takes, by name.
    arity: HashMap<String, usize>,
    /// How FP8 GEMMs accumulate (the policy's `[precision.fp8]`).
    fp8: Option<crate::numerics::accum::Accumulation>,
    /// Every buffer the plan writes (values, scratch, FP8 copies) with its size in bytes, and
    /// whether a run fills them with 0xFF bytes first (see [`DeviceRunner::poisoning`]).
    written: Vec<(BufId, u64)>,
    poison: bool,
}

impl<D: Device> DeviceRunner<D> {
    /// Prepares `program`'s plan `cuda` (its emission) on `device`, returning the values of
    /// `keep` from each run.
    pub fn new(
        program: &Program,
        cuda: CudaProgram,
        mut device: D,
        keep: &[ValueId],
    ) -> Result<DeviceRunner<D>, DeviceError> {
        let graph = program.graph();
        device.load(&cuda)?;
        // Buffers: one per value, an alias sharing its source's.
        let mut source: Vec<usize> = (0..graph.values.len()).collect();
        for step in &cuda.steps {
            for w in &step.work {
                if let Work::Alias { of } = w {
                    let node = &graph.nodes[NodeId::from_index(step.node)];
                    source[node.outputs[0].index()] = source[*of];
                }
            }
        }
        let mut values: Vec<Option<(BufId, DType, u64)>> = vec![None; graph.values.len()];
        let mut written = Vec::new();
        for (id, v) in graph.values.iter() {
            let i = id.index();
            if source[i] != i {
                continue;
            }
            let elements: u64 = v.ty.shape.iter().product();
            let bytes = 4 * elements.max(1);
            let buf = device.alloc(bytes)?;
            values[i] = Some((buf, v.ty.dtype, elements));
            if matches!(v.def, Def::Node { .. }) {
                written.push((buf, bytes));
            }
        }
        let values: Vec<(BufId, DType, u64)> = (0..graph.values.len())
            .map(|i| {
                let (buf, _, _) = values[source[i]].expect("a source value has a buffer");
                let v = &graph.values[ValueId::from_index(i)];
                (buf, v.ty.dtype, v.ty.shape.iter().product())
            })
            .collect();
        // Scratch slots at the largest size any step asks.
        let mut slots: Vec<u64> = Vec::new();
        let launches = cuda
            .steps
            .iter()
            .flat_map(|s| &s.work)
            .filter_map(|w| match w {
                Work::Launch(l) => Some(l),
                _ => None,
            });
        for l in launches.chain(&cuda.optimizer) {
            for a in &l.args {
                if let Arg::Scratch { slot, bytes } = a {
                    let s = *slot as usize;
                    if slots.len() <= s {
                        slots.resize(s + 1, 0);
                    }
                    slots[s] = slots[s].max(*bytes);
                }
            }
        }
        let scratch = slots
            .iter()
            .map(|&b| device.alloc(b.max(4)))
            .collect::<Result<Vec<_>, _>>()?;
        written.extend(scratch.iter().zip(&slots).map(|(&buf, &b)| (buf, b.max(4))));
        let copies = cuda
            .fp8_copies
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (codes, scales) = c.args(i);
                let bytes = |a: &Arg| match a {
                    Arg::Fp8Codes { bytes, .. } | Arg::Fp8Scales { bytes, .. } => *bytes,
                    _ => unreachable!("an FP8 copy's arguments"),
                };
                let (codes, scales) = (bytes(&codes).max(4), bytes(&scales).max(4));
                Ok((
                    (device.alloc(codes)?, codes),
                    (device.alloc(scales)?, scales),
                ))
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        written.extend(copies.iter().flat_map(|&(c, s)| [c, s]));
        let copies = copies.iter().map(|&((c, _), (s, _))| (c, s)).collect();
        let mut rope = Vec::new();
        for t in &cuda.rope_tables {
            let tables =
                rope_tables::<f32>(t.seq as usize, t.dim as usize, t.theta, t.yarn.as_ref());
            let cos = device.alloc(4 * tables.cos.len() as u64)?;
            let sin = device.alloc(4 * tables.sin.len() as u64)?;
            device.upload(cos, &f32_bytes(&tables.cos))?;
            device.upload(sin, &f32_bytes(&tables.sin))?;
            rope.push((cos, sin));
        }
        let error = device.alloc(4)?;
        let inputs = graph
            .values
            .iter()
            .filter_map(|(id, v)| match v.def {
                Def::Input(kind) => Some((id, kind)),
                _ => None,
            })
            .collect();
        let params = graph
            .params
            .iter()
            .filter_map(|(p, _)| graph.param_value(p).map(|v| (p.index(), v)))
            .collect();
        let arity = cuda
            .kernels
            .iter()
            .map(|k| (k.name.clone(), k.params.len()))
            .collect();
        let fp8 = match GemmNumerics::of(Format::E4m3, program.settings().formats.fp8.as_ref()) {
            GemmNumerics::Fp8(f) => Some(f.accumulation),
            _ => None,
        };
        Ok(DeviceRunner {
            state: Mutex::new(State {
                device,
                cuda,
                values,
                scratch,
                copies,
                rope,
                error,
                inputs,
                params,
                keep: keep.to_vec(),
                arity,
                fp8,
                written,
                poison: false,
            }),
        })
    }

    /// Fills every buffer the plan writes with 0xFF bytes (NaN as f32, an id out of every
    /// range as u32) before each run, so that an element a kernel fails to write shows up as
    /// a NaN, not as a zero or a previous step's value that happens to be right.
    pub fn poisoning(self) -> DeviceRunner<D> {
        let mut state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        state.poison = true;
        DeviceRunner {
            state: Mutex::new(state),
        }
    }
}

impl<D: Device> State<D> {
    fn address(&self, v: usize) -> u64 {
        self.device.address(self.values[v].0)
    }

    /// A launch argument as the device takes it.
    fn arg(&self, a: &Arg) -> Result<KernelArg, DeviceError> {
        let ptr = |b: BufId| KernelArg::Ptr(self.device.address(b));
        Ok(match a {
            Arg::Value { id } => KernelArg::Ptr(self.address(*id)),
            Arg::Scratch { slot, .. } => ptr(self.scratch[*slot as usize]),
            Arg::Fp8Codes { copy, .. } => ptr(self.copies[*copy].0),
            Arg::Fp8Scales { copy, .. } => ptr(self.copies[*copy].1),
            Arg::ErrorFlag => ptr(self.error),
            Arg::RopeCos { table } => ptr(self.rope[*table].0),
            Arg::RopeSin { table } => ptr(self.rope[*table].1),
            Arg::Int { value } => KernelArg::I64(*value),
            Arg::Float { value } => KernelArg::F32(*value as f32),
            Arg::Tensors { .. } | Arg::ChunkTensor | Arg::ChunkStart | Arg::Hyper { .. } => {
                return Err(DeviceError::Call(format!(
                    "{a:?} is the optimizer's, which a step does not launch"
                )))
            }
        })
    }

    /// The manifest's GEMM with its operands' addresses.
    fn gemm_call(&self, g: &Gemm) -> Result<GemmCall, DeviceError> {
        let fp8 = match &g.fp8 {
            None => None,
            Some(f) => {
                let operand = |o: &kiln_ir::cuda::Fp8Operand| -> Result<Fp8Operand, DeviceError> {
                    let addr = |a: &Arg| match self.arg(a)? {
                        KernelArg::Ptr(p) => Ok(p),
                        other => Err(DeviceError::Call(format!(
                            "an FP8 operand's buffer is {other:?}"
                        ))),
                    };
                    Ok(Fp8Operand {
                        codes: addr(&o.codes)?,
                        scales: addr(&o.scales)?,
                        block: o.block,
                    })
                };
                let accumulation = self.fp8.ok_or_else(|| {
                    DeviceError::Call("an FP8 GEMM in a Program without FP8 settings".into())
                })?;
                Some(Fp8Call {
                    a: operand(&f.a)?,
                    b: operand(&f.b)?,
                    accumulation,
                })
            }
        };
        Ok(GemmCall {
            m: g.m,
            n: g.n,
            k: g.k,
            a: GemmOperand {
                ptr: self.address(g.a),
                trans: g.a_trans,
                ld: if g.a_trans { g.m } else { g.k },
            },
            b: GemmOperand {
                ptr: self.address(g.b),
                trans: g.b_trans,
                ld: if g.b_trans { g.k } else { g.n },
            },
            c: self.address(g.out),
            ldc: g.n,
            bias: g.bias.map(|b| self.address(b)),
            batch: 1,
            strides: [0; 3],
            format: g.format,
            fp8,
            accumulate: false,
        })
    }

    /// The address an argument naming a buffer carries.
    fn pointer(&self, a: &Arg) -> Result<u64, DeviceError> {
        match self.arg(a)? {
            KernelArg::Ptr(p) => Ok(p),
            other => Err(DeviceError::Call(format!(
                "a GEMM operand's buffer is {other:?}"
            ))),
        }
    }

    /// The buffer holding a grouped GEMM's offsets.
    fn offsets_buffer(&self, g: &GroupedGemm) -> Result<BufId, DeviceError> {
        match g.offsets {
            Arg::Scratch { slot, .. } => Ok(self.scratch[slot as usize]),
            Arg::Value { id } => Ok(self.values[id].0),
            ref other => Err(DeviceError::Call(format!(
                "a grouped GEMM's offsets in {other:?}"
            ))),
        }
    }

    /// A grouped GEMM as one [`GemmCall`] per group with rows, given its `offsets` as the
    /// device holds them.
    fn grouped_calls(
        &self,
        g: &GroupedGemm,
        offsets: &[u64],
    ) -> Result<Vec<GemmCall>, DeviceError> {
        let total = if g.contract_rows { g.k } else { g.m };
        if offsets[0] != 0
            || offsets.windows(2).any(|w| w[0] > w[1])
            || offsets[g.groups as usize] > total
        {
            return Err(DeviceError::Call(format!(
                "a grouped GEMM's offsets {offsets:?} are not ascending rows within {total}"
            )));
        }
        // The layouts GroupedGemm describes: rows are the output's with `a` as stored, or
        // the contraction with `a` transposed and `b` as stored.
        if g.contract_rows != g.a_trans || (g.contract_rows && g.b_trans) {
            return Err(DeviceError::Call(format!(
                "a grouped GEMM with contract_rows = {} and transposes ({}, {})",
                g.contract_rows, g.a_trans, g.b_trans
            )));
        }
        let (a, b, c) = (
            self.pointer(&g.a)?,
            self.pointer(&g.b)?,
            self.pointer(&g.c)?,
        );
        let fp8 = match &g.fp8 {
            None => None,
            Some(f) => {
                let accumulation = self.fp8.ok_or_else(|| {
                    DeviceError::Call("an FP8 GEMM in a Program without FP8 settings".into())
                })?;
                let operand = |o: &kiln_ir::cuda::Fp8Operand| -> Result<Fp8Operand, DeviceError> {
                    Ok(Fp8Operand {
                        codes: self.pointer(&o.codes)?,
                        scales: self.pointer(&o.scales)?,
                        block: o.block,
                    })
                };
                Some(Fp8Call {
                    a: operand(&f.a)?,
                    b: operand(&f.b)?,
                    accumulation,
                })
            }
        };
        let mut calls = Vec::new();
        // Scale tiles before group g along a contraction over the rows (FP8 only).
        let mut tiles_before = 0u64;
        for group in 0..g.groups {
            let (lo, hi) = (offsets[group as usize], offsets[group as usize + 1]);
            let rows = hi - lo;
            let (m, n, k) = if g.contract_rows {
                (g.m, g.n, rows)
            } else {
                (rows, g.n, g.k)
            };
            // Operands and output of this group: (a, b, c) element offsets.
            let (oa, ob, oc) = if g.contract_rows {
                (lo * m, lo * n, group * m * n)
            } else {
                (lo * k, group * n * k, lo * n)
            };
            let fp8 = fp8.map(|mut f| {
                if g.contract_rows {
                    let t = f.a.block[1];
                    f.a.codes += m * lo;
                    f.a.scales += 4 * m * tiles_before;
                    f.b.codes += n * lo;
                    f.b.scales += 4 * n * tiles_before;
                    tiles_before += rows.div_ceil(t);
                } else {
                    f.a.codes += lo * k;
                    f.a.scales += 4 * lo * k.div_ceil(f.a.block[1]);
                    f.b.codes += group * n * k;
                    f.b.scales += 4 * group * n.div_ceil(f.b.block[0]) * k.div_ceil(f.b.block[1]);
                }
                f
            });
            if m == 0 {
                continue;
            }
            calls.push(GemmCall {
                m,
                n,
                k,
                a: GemmOperand {
                    ptr: a + 4 * oa,
                    trans: g.a_trans,
                    ld: if g.a_trans { m } else { k },
                },
                b: GemmOperand {
                    ptr: b + 4 * ob,
                    trans: g.b_trans,
                    ld: if g.b_trans { k } else { n },
                },
                c: c + 4 * oc,
                ldc: n,
                bias: None,
                batch: 1,
                strides: [0; 3],
                format: g.format,
                fp8,
                accumulate: g.accumulate,
            });
        }
        Ok(calls)
    }

    /// Uploads the parameters and inputs of `feed` (after the poison, if asked).
    fn upload(&mut self, feed: &Feed<f32>) -> Result<(), ExecError> {
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        if self.poison {
            let largest = self.written.iter().map(|&(_, b)| b).max().unwrap_or(0);
            let poison = vec![0xFF; largest as usize];
            for &(buf, bytes) in &self.written {
                self.device
                    .upload(buf, &poison[..bytes as usize])
                    .map_err(device_err)?;
            }
        }
        for &(p, v) in &self.params {
            let data = feed
                .params
                .get(p)
                .ok_or_else(|| ExecError::Param(format!("parameter {p} was not supplied")))?;
            let (buf, _, n) = self.values[v.index()];
            if data.len() as u64 != n {
                return Err(ExecError::Param(format!(
                    "parameter {p} has {} elements, the graph {n}",
                    data.len()
                )));
            }
            self.device
                .upload(buf, &f32_bytes(data))
                .map_err(device_err)?;
        }
        for &(v, kind) in &self.inputs {
            let (buf, _, n) = self.values[v.index()];
            let bytes = match kind {
                InputKind::TokenWeights => {
                    let w = feed.weights.ok_or_else(|| {
                        ExecError::Input("the token weights were not supplied".into())
                    })?;
                    check_len(w.len(), n, "token weights")?;
                    f32_bytes(w)
                }
                InputKind::KvCache { .. } => {
                    return Err(ExecError::Input(
                        "a decode step's caches are not run on a device yet".into(),
                    ))
                }
                kind => {
                    let ids = feed.inputs.get(&kind).ok_or_else(|| {
                        ExecError::Input(format!("input {kind:?} was not supplied"))
                    })?;
                    check_len(ids.len(), n, &format!("input {kind:?}"))?;
                    ids.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
            };
            self.device.upload(buf, &bytes).map_err(device_err)?;
        }
        self.device.upload(self.error, &[0; 4]).map_err(device_err)
    }

    /// Every step's work, in order.
    fn steps(&mut self) -> Result<(), DeviceError> {
        for step in &self.cuda.steps {
            for w in &step.work {
                match w {
                    Work::Launch(l) => {
                        let args = l
                            .args
                            .iter()
                            .map(|a| self.arg(a))
                            .collect::<Result<Vec<_>, _>>()?;
                        if self.arity.get(&l.kernel) != Some(&args.len()) {
                            return Err(DeviceError::Call(format!(
                                "step {} ({}): {} launched with {} arguments, declared with {:?}",
                                step.node,
                                step.path,
                                l.kernel,
                                args.len(),
                                self.arity.get(&l.kernel)
                            )));
                        }
                        self.device
                            .launch(&l.kernel, l.grid, l.block, l.shared_bytes, &args)?;
                    }
                    Work::Gemm(g) => {
                        let call = self.gemm_call(g)?;
                        self.device.gemm(&call)?;
                    }
                    Work::GroupedGemm(g) => {
                        let buf = self.offsets_buffer(g)?;
                        let offsets = read_offsets(&mut self.device, buf, g.groups)?;
                        for call in self.grouped_calls(g, &offsets)? {
                            self.device.gemm(&call)?;
                        }
                    }
                    Work::Alias { .. } => {}
                }
            }
        }
        self.device.synchronize()
    }
}

/// The `groups + 1` offsets a sort wrote to `buf`, read back (which waits for the sort). A
/// negative one reads as `u64::MAX`, which no range check lets through.
fn read_offsets<D: Device>(
    device: &mut D,
    buf: BufId,
    groups: u64,
) -> Result<Vec<u64>, DeviceError> {
    let mut bytes = vec![0u8; 4 * (groups as usize + 1)];
    device.download(buf, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .map(|o| u64::try_from(o).unwrap_or(u64::MAX))
        .collect())
}

fn check_len(got: usize, want: u64, what: &str) -> Result<(), ExecError> {
    if got as u64 == want {
        Ok(())
    } else {
        Err(ExecError::Input(format!(
            "{what} has {got} elements, the graph reads {want}"
        )))
    }
}

/// The little-endian bytes of f32s.
fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// What the error flag's code means.
fn flag_message(code: i32) -> String {
    match code {
        1 => "a token id outside the vocabulary".into(),
        2 => "a target outside the vocabulary".into(),
        3 => "an expert id out of range".into(),
        4 => "a decode position at or beyond the KV cache".into(),
        c => format!("error code {c}"),
    }
}

impl<D: Device> Run for DeviceRunner<D> {
    fn run(&self, feed: &Feed<f32>) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.upload(feed)?;
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        s.steps().map_err(device_err)?;
        let mut flag = [0u8; 4];
        let error = s.error;
        s.device.download(error, &mut flag).map_err(device_err)?;
        let code = i32::from_le_bytes(flag);
        if code != 0 {
            return Err(ExecError::OutOfRange(format!(
                "the device reported {} (error flag {code})",
                flag_message(code)
            )));
        }
        let mut out = HashMap::new();
        for v in s.keep.clone() {
            let (buf, dtype, n) = s.values[v.index()];
            let mut bytes = vec![0u8; 4 * n as usize];
            s.device.download(buf, &mut bytes).map_err(device_err)?;
            let words = bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
            let b = match dtype {
                DType::U32 => Buf::U(words.map(u32::from_le_bytes).collect()),
                _ => Buf::F(words.map(f32::from_le_bytes).collect()),
            };
            out.insert(v, b);
        }
        Ok(out)
    }
}
