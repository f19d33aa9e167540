//! The plan runner: a training (or forward) Program's CUDA plan on a [`Device`].
//!
//! Built once per Program: the intermediates share one arena, packed by the steps they live
//! in ([`super::arena`]); parameters, inputs and the values a run returns get a buffer each (a
//! reshape's output is its input's place, as the plan's aliases say); every scratch slot the
//! largest size any step asks of it, every FP8 copy its codes and scales, every RoPE table
//! the CPU backend's values. A run
//! uploads the parameters and the step's inputs, then does each step's work in the
//! manifest's order — launches with their arguments resolved to addresses and values, GEMMs
//! as [`GemmCall`]s — reads the error flag, and downloads the values its caller keeps.
//!
//! [`DeviceRunner`] implements the interpreter's [`Run`], so a [`crate::train::Trainer`]
//! built `with_runner` trains on a device with everything else unchanged: batches, the
//! learning-rate schedule, metrics, checkpoints (the same safetensors, so a run moves between
//! devices). It is also [`Resident`]: the trainer puts the parameters and moments on the
//! device once, and each step runs the plan's optimizer launches there (the gradient norm,
//! read back to skip a non-finite step; AdamW with clipping; the router bias update), the
//! state coming back only when the trainer reads it (evaluation, checkpoints).

use std::collections::HashMap;
use std::sync::Mutex;

use kiln_ir::attrs::Format;
use kiln_ir::cuda::{
    Arg, CudaProgram, Gemm, GroupedGemm, Launch, TensorEntry, Work, OPTIMIZER_CHUNK,
};
use kiln_ir::ir::{DType, Def, Graph, InputKind, NodeId, ValueId};
use kiln_ir::program::Program;

use super::arena::{self, Lifetime};
use super::{BufId, Device, DeviceError, Fp8Call, Fp8Operand, GemmCall, GemmOperand, KernelArg};
use crate::cpu::attention::rope_tables;
use crate::exec::{AdamSettings, Buf, ExecError, Feed, Resident, Run, StepScalars};
use crate::numerics::gemm::GemmNumerics;

/// A Program's plan, ready to run on a device.
pub struct DeviceRunner<D: Device> {
    state: Mutex<State<D>>,
}

/// Where a value lives: a buffer and a byte offset in it (the arena's, or 0 in its own), its
/// element type and count.
#[derive(Clone, Copy, Debug)]
struct Place {
    buf: BufId,
    offset: u64,
    dtype: DType,
    elements: u64,
}

/// The device memory a runner's values take, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// The arena of the intermediates nobody keeps (packed by lifetime).
    pub arena: u64,
    /// What those intermediates would take with a buffer each.
    pub unshared: u64,
    /// Parameters, inputs and kept values, a buffer each.
    pub own: u64,
}

struct State<D> {
    device: D,
    cuda: CudaProgram,
    /// Each value's place (aliases share their source's).
    values: Vec<Place>,
    memory: Memory,
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
    /// The AdamW settings the plan's optimizer launches were built with.
    adam: AdamSettings,
    /// The training state on the device, once [`Resident::put_state`] put it there.
    resident: Option<OnDevice>,
}

/// The optimizer's state on the device: each trainable tensor's moments (by parameter index),
/// the `KilnTensor` table and the chunks' tensors and starts.
struct OnDevice {
    moments: HashMap<usize, (BufId, BufId)>,
    table: BufId,
    chunk_tensor: BufId,
    chunk_start: BufId,
    /// The gradients, which a run no longer reads back.
    grads: std::collections::HashSet<ValueId>,
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
        // The intermediates nobody keeps share one arena by their lifetimes in steps; kept
        // values (read back after the run), parameters and inputs have buffers of their own.
        let kept: std::collections::HashSet<usize> =
            keep.iter().map(|v| source[v.index()]).collect();
        let lifetimes = step_lifetimes(graph, &cuda, &source);
        let in_arena = |i: usize| {
            let v = &graph.values[ValueId::from_index(i)];
            source[i] == i
                && matches!(v.def, Def::Node { .. })
                && !kept.contains(&i)
                && lifetimes[i].is_some()
        };
        let bytes_of =
            |i: usize| 4 * graph.values[ValueId::from_index(i)].ty.elements().max(1) as u64;
        let members: Vec<usize> = (0..graph.values.len()).filter(|&i| in_arena(i)).collect();
        let packed = arena::pack(
            &members
                .iter()
                .map(|&i| {
                    let (first, last) = lifetimes[i].expect("an arena value is named by a step");
                    Lifetime {
                        first,
                        last,
                        bytes: bytes_of(i),
                    }
                })
                .collect::<Vec<_>>(),
        );
        // Before building kernels or allocating anything: does the plan fit?
        if let Some((free, total)) = device.memory() {
            let need = plan_bytes(graph, &cuda, &source, packed.bytes, |i| {
                !in_arena(i) && source[i] == i
            });
            if need > free {
                return Err(DeviceError::Memory { need, free, total });
            }
        }
        device.load(&cuda)?;
        let arena_buf = device.alloc(packed.bytes.max(4))?;
        let mut written = vec![(arena_buf, packed.bytes.max(4))];
        let mut places: Vec<Option<(BufId, u64)>> = vec![None; graph.values.len()];
        for (&i, &offset) in members.iter().zip(&packed.offsets) {
            places[i] = Some((arena_buf, offset));
        }
        let mut own = 0u64;
        for (id, v) in graph.values.iter() {
            let i = id.index();
            if source[i] != i || places[i].is_some() {
                continue;
            }
            let bytes = bytes_of(i);
            let buf = device.alloc(bytes)?;
            own += bytes;
            places[i] = Some((buf, 0));
            if matches!(v.def, Def::Node { .. }) {
                written.push((buf, bytes));
            }
        }
        let values: Vec<Place> = (0..graph.values.len())
            .map(|i| {
                let (buf, offset) = places[source[i]].expect("a source value has a place");
                let v = &graph.values[ValueId::from_index(i)];
                Place {
                    buf,
                    offset,
                    dtype: v.ty.dtype,
                    elements: v.ty.shape.iter().product(),
                }
            })
            .collect();
        let memory = Memory {
            arena: packed.bytes,
            unshared: packed.unshared,
            own,
        };
        // Scratch slots at the largest size any step asks.
        let mut slots: Vec<u64> = Vec::new();
        for l in launches(&cuda) {
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
        let settings = program.settings();
        let adam = AdamSettings {
            beta1: settings.optimizer.beta1,
            beta2: settings.optimizer.beta2,
            eps: settings.optimizer.eps,
            weight_decay: settings.optimizer.weight_decay,
            grad_clip: settings.grad_clip,
            bias_update: settings.bias_update,
        };
        Ok(DeviceRunner {
            state: Mutex::new(State {
                device,
                cuda,
                values,
                memory,
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
                adam,
                resident: None,
            }),
        })
    }

    /// The device memory its values take: the arena of the intermediates and the buffers of
    /// its own.
    pub fn memory(&self) -> Memory {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).memory
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
        let p = self.values[v];
        self.device.address(p.buf) + p.offset
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
            Arg::Value { id } if self.values[id].offset == 0 => Ok(self.values[id].buf),
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
        // A resident state's parameters are the device's own.
        let params = if self.resident.is_some() {
            &[][..]
        } else {
            &self.params[..]
        };
        for &(p, v) in params {
            let data = feed
                .params
                .get(p)
                .ok_or_else(|| ExecError::Param(format!("parameter {p} was not supplied")))?;
            let Place {
                buf, elements: n, ..
            } = self.values[v.index()];
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
            let Place {
                buf, elements: n, ..
            } = self.values[v.index()];
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
                        let what = || format!("step {} ({})", step.node, step.path);
                        launch(&mut self.device, &self.arity, l, &args, what)?;
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

/// Launches `l` with `args`, checked against the kernel's declared parameters (`what` says
/// where the launch comes from, for the error).
fn launch<D: Device>(
    device: &mut D,
    arity: &HashMap<String, usize>,
    l: &Launch,
    args: &[KernelArg],
    what: impl Fn() -> String,
) -> Result<(), DeviceError> {
    if arity.get(&l.kernel) != Some(&args.len()) {
        return Err(DeviceError::Call(format!(
            "{}: {} launched with {} arguments, declared with {:?}",
            what(),
            l.kernel,
            args.len(),
            arity.get(&l.kernel)
        )));
    }
    device.launch(&l.kernel, l.grid, l.block, l.shared_bytes, args)
}

/// The first and last step that names each buffer (by its source value: an alias counts for
/// its source), from every launch argument, GEMM operand and alias of the plan; `None` for
/// values no step names.
fn step_lifetimes(
    graph: &Graph,
    cuda: &CudaProgram,
    source: &[usize],
) -> Vec<Option<(usize, usize)>> {
    let mut life: Vec<Option<(usize, usize)>> = vec![None; source.len()];
    for (s, step) in cuda.steps.iter().enumerate() {
        let mut touch = |v: usize| {
            let g = source[v];
            life[g] = Some(life[g].map_or((s, s), |(a, b)| (a.min(s), b.max(s))));
        };
        let touch_arg = |a: &Arg, touch: &mut dyn FnMut(usize)| {
            if let Arg::Value { id } = a {
                touch(*id);
            }
        };
        for w in &step.work {
            match w {
                Work::Launch(l) => l.args.iter().for_each(|a| touch_arg(a, &mut touch)),
                Work::Gemm(g) => {
                    for v in [Some(g.a), Some(g.b), Some(g.out), g.bias]
                        .into_iter()
                        .flatten()
                    {
                        touch(v);
                    }
                }
                Work::GroupedGemm(g) => {
                    for a in [&g.a, &g.b, &g.c, &g.offsets] {
                        touch_arg(a, &mut touch);
                    }
                }
                Work::Alias { of } => {
                    touch(*of);
                    let node = &graph.nodes[NodeId::from_index(step.node)];
                    touch(node.outputs[0].index());
                }
            }
        }
    }
    life
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
    fn resident(&self) -> Option<&dyn Resident> {
        Some(self)
    }

    fn run(&self, feed: &Feed<f32>) -> Result<HashMap<ValueId, Buf<f32>>, ExecError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.upload(feed)?;
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        s.steps().map_err(device_err)?;
        s.check_error_flag("the device")?;
        let mut out = HashMap::new();
        for v in s.keep.clone() {
            if s.resident.as_ref().is_some_and(|r| r.grads.contains(&v)) {
                continue;
            }
            let Place {
                buf,
                dtype,
                elements: n,
                ..
            } = s.values[v.index()];
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

impl<D: Device> State<D> {
    /// Reads the kernels' error flag: an error naming `who` and the flag's meaning if a
    /// kernel raised it.
    fn check_error_flag(&mut self, who: &str) -> Result<(), ExecError> {
        let mut flag = [0u8; 4];
        self.device
            .download(self.error, &mut flag)
            .map_err(|e| ExecError::Device(e.to_string()))?;
        match i32::from_le_bytes(flag) {
            0 => Ok(()),
            code => Err(ExecError::OutOfRange(format!(
                "{who} reported {} (error flag {code})",
                flag_message(code)
            ))),
        }
    }

    /// The optimizer's table of trainable tensors (`KilnTensor`, 48 bytes each: parameter,
    /// moments and gradient addresses, elements, decay) and its chunks, as the launches read
    /// them.
    fn optimizer_tables(
        &mut self,
        entries: &[TensorEntry],
        moments: &HashMap<usize, (BufId, BufId)>,
        param_of: &HashMap<usize, usize>,
    ) -> Result<(BufId, BufId, BufId), DeviceError> {
        let (mut table, mut tensor, mut start) = (Vec::new(), Vec::new(), Vec::new());
        for (i, e) in entries.iter().enumerate() {
            let (m, v) = moments[&param_of[&e.param]];
            for addr in [
                self.address(e.param),
                self.device.address(m),
                self.device.address(v),
                self.address(e.grad),
            ] {
                table.extend(addr.to_le_bytes());
            }
            table.extend((e.elements as i64).to_le_bytes());
            table.extend((e.decay as f32).to_le_bytes());
            table.extend([0u8; 4]);
            for first in (0..e.elements).step_by(OPTIMIZER_CHUNK as usize) {
                tensor.extend((i as i32).to_le_bytes());
                start.extend((first as i64).to_le_bytes());
            }
        }
        let mut put = |bytes: &[u8]| -> Result<BufId, DeviceError> {
            let buf = self.device.alloc(bytes.len().max(8) as u64)?;
            self.device.upload(buf, bytes)?;
            Ok(buf)
        };
        Ok((put(&table)?, put(&tensor)?, put(&start)?))
    }

    /// An optimizer launch's argument.
    fn optimizer_arg(&self, a: &Arg, scalars: StepScalars) -> Result<KernelArg, DeviceError> {
        let r = self.resident.as_ref().ok_or_else(|| {
            DeviceError::Call("the optimizer before the state is on the device".into())
        })?;
        let ptr = |b: BufId| KernelArg::Ptr(self.device.address(b));
        Ok(match a {
            Arg::Tensors { .. } => ptr(r.table),
            Arg::ChunkTensor => ptr(r.chunk_tensor),
            Arg::ChunkStart => ptr(r.chunk_start),
            Arg::Hyper { name } => KernelArg::F32(match *name {
                "lr" => scalars.lr,
                "bias1" => scalars.bias1,
                "bias2" => scalars.bias2,
                other => {
                    return Err(DeviceError::Call(format!(
                        "the optimizer's scalar `{other}` is unknown"
                    )))
                }
            } as f32),
            other => self.arg(other)?,
        })
    }

    fn optimizer_launch(&mut self, l: &Launch, scalars: StepScalars) -> Result<(), DeviceError> {
        let args = l
            .args
            .iter()
            .map(|a| self.optimizer_arg(a, scalars))
            .collect::<Result<Vec<_>, _>>()?;
        launch(&mut self.device, &self.arity, l, &args, || {
            "the optimizer".to_string()
        })
    }
}

impl<D: Device> Resident for DeviceRunner<D> {
    fn settings(&self) -> AdamSettings {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).adam
    }

    fn put_state(
        &self,
        params: &[Vec<f32>],
        m: &[Vec<f32>],
        v: &[Vec<f32>],
    ) -> Result<(), ExecError> {
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let entries = s
            .cuda
            .optimizer
            .iter()
            .flat_map(|l| &l.args)
            .find_map(|a| match a {
                Arg::Tensors { entries } => Some(entries.clone()),
                _ => None,
            })
            .ok_or_else(|| ExecError::Device("the plan has no optimizer".into()))?;
        // Each trainable tensor's parameter index, by its value.
        let param_of: HashMap<usize, usize> =
            s.params.iter().map(|&(p, v)| (v.index(), p)).collect();
        if s.resident.is_none() {
            let mut moments = HashMap::new();
            for e in &entries {
                let bytes = 4 * e.elements.max(1);
                let (mb, vb) = (
                    s.device.alloc(bytes).map_err(device_err)?,
                    s.device.alloc(bytes).map_err(device_err)?,
                );
                moments.insert(param_of[&e.param], (mb, vb));
            }
            let (table, chunk_tensor, chunk_start) = s
                .optimizer_tables(&entries, &moments, &param_of)
                .map_err(device_err)?;
            s.resident = Some(OnDevice {
                moments,
                table,
                chunk_tensor,
                chunk_start,
                grads: entries
                    .iter()
                    .map(|e| ValueId::from_index(e.grad))
                    .collect(),
            });
        }
        for &(p, value) in &s.params.clone() {
            let place = s.values[value.index()];
            let data = params
                .get(p)
                .ok_or_else(|| ExecError::Param(format!("parameter {p} was not supplied")))?;
            check_len(data.len(), place.elements, &format!("parameter {p}"))?;
            s.device
                .upload(place.buf, &f32_bytes(data))
                .map_err(device_err)?;
        }
        let moments = s
            .resident
            .as_ref()
            .map(|r| r.moments.clone())
            .unwrap_or_default();
        for (p, (mb, vb)) in moments {
            for (buf, x, what) in [(mb, m, "first"), (vb, v, "second")] {
                let data = x.get(p).ok_or_else(|| {
                    ExecError::Param(format!(
                        "the {what} moment of parameter {p} was not supplied"
                    ))
                })?;
                s.device.upload(buf, &f32_bytes(data)).map_err(device_err)?;
            }
        }
        Ok(())
    }

    fn optimizer_step(
        &self,
        scalars: StepScalars,
        loss_finite: bool,
    ) -> Result<(f64, bool), ExecError> {
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let launches = s.cuda.optimizer.clone();
        // The launches before the first that takes a step scalar compute the gradient norm
        // into the scratch the AdamW launch reads as `norm`: [norm, clipping factor].
        let update = launches
            .iter()
            .position(|l| l.args.iter().any(|a| matches!(a, Arg::Hyper { .. })))
            .ok_or_else(|| ExecError::Device("the optimizer has no AdamW launch".into()))?;
        let norm_slot = launches[update]
            .args
            .iter()
            .find_map(|a| match a {
                Arg::Scratch { slot, .. } => Some(*slot as usize),
                _ => None,
            })
            .ok_or_else(|| ExecError::Device("AdamW reads no gradient norm".into()))?;
        for l in &launches[..update] {
            s.optimizer_launch(l, scalars).map_err(device_err)?;
        }
        let mut norm = [0u8; 8];
        let buf = s.scratch[norm_slot];
        s.device.download(buf, &mut norm).map_err(device_err)?;
        let norm = f64::from(f32::from_le_bytes([norm[0], norm[1], norm[2], norm[3]]));
        if !(loss_finite && norm.is_finite()) {
            return Ok((norm, true));
        }
        for l in &launches[update..] {
            s.optimizer_launch(l, scalars).map_err(device_err)?;
        }
        s.device.synchronize().map_err(device_err)?;
        s.check_error_flag("the device's optimizer")?;
        Ok((norm, false))
    }

    fn get_state(
        &self,
        params: &mut [Vec<f32>],
        m: &mut [Vec<f32>],
        v: &mut [Vec<f32>],
    ) -> Result<(), ExecError> {
        let device_err = |e: DeviceError| ExecError::Device(e.to_string());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let read = |s: &mut State<D>, buf: BufId, out: &mut Vec<f32>| -> Result<(), ExecError> {
            let mut bytes = vec![0u8; 4 * out.len()];
            s.device.download(buf, &mut bytes).map_err(device_err)?;
            for (x, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Ok(())
        };
        for (p, value) in s.params.clone() {
            let buf = s.values[value.index()].buf;
            if let Some(out) = params.get_mut(p) {
                read(&mut s, buf, out)?;
            }
        }
        let moments = s
            .resident
            .as_ref()
            .map(|r| r.moments.clone())
            .unwrap_or_default();
        for (p, (mb, vb)) in moments {
            if let (Some(mo), Some(vo)) = (m.get_mut(p), v.get_mut(p)) {
                read(&mut s, mb, mo)?;
                read(&mut s, vb, vo)?;
            }
        }
        Ok(())
    }
}

/// Every launch of a plan: its steps', then its optimizer's.
fn launches(cuda: &CudaProgram) -> impl Iterator<Item = &Launch> {
    cuda.steps
        .iter()
        .flat_map(|s| &s.work)
        .filter_map(|w| match w {
            Work::Launch(l) => Some(l),
            _ => None,
        })
        .chain(&cuda.optimizer)
}

/// The device memory a plan allocates: the arena, each value with a buffer of its own, the
/// scratch slots, the FP8 copies and the optimizer's moments (its small tables aside).
fn plan_bytes(
    graph: &kiln_ir::ir::Graph,
    cuda: &CudaProgram,
    source: &[usize],
    arena: u64,
    own: impl Fn(usize) -> bool,
) -> u64 {
    let values: u64 = (0..graph.values.len())
        .filter(|&i| source[i] == i && own(i))
        .map(|i| 4 * graph.values[ValueId::from_index(i)].ty.elements().max(1) as u64)
        .sum();
    let mut slots: HashMap<u32, u64> = HashMap::new();
    let mut moments = 0u64;
    for a in launches(cuda).flat_map(|l| &l.args) {
        match a {
            Arg::Scratch { slot, bytes } => {
                let s = slots.entry(*slot).or_default();
                *s = (*s).max(*bytes);
            }
            Arg::Tensors { entries } => {
                moments = entries.iter().map(|e| 2 * 4 * e.elements.max(1)).sum();
            }
            _ => {}
        }
    }
    let copies: u64 = (0..cuda.fp8_copies.len())
        .map(|i| {
            let (codes, scales) = cuda.fp8_copies[i].args(i);
            [codes, scales]
                .iter()
                .map(|a| match a {
                    Arg::Fp8Codes { bytes, .. } | Arg::Fp8Scales { bytes, .. } => *bytes,
                    _ => 0,
                })
                .sum::<u64>()
        })
        .sum();
    arena + values + slots.values().sum::<u64>() + copies + moments
}
