//! Every generated CUDA kernel against the CPU backend, without a GPU: the generated
//! translation unit is compiled for the CPU with g++ under a small emulation of CUDA's
//! execution model (a block's 256 threads are real threads, `__syncthreads()` is a barrier,
//! `__shared__` memory is shared by the block's threads, warp and block reductions go through
//! shared memory between two barriers, blocks run one after another), and
//! each step of the manifest is run on inputs from the CPU interpreter's run of the same
//! training step. Outputs are poisoned with NaN before each step and compared with the
//! interpreter's twice: by ‖out − ref‖ / ‖ref‖ ≤ 1e-5, and per element by
//! |out − ref| ≤ 1e-5 · max |ref| over the output; a NaN anywhere in an output fails.
//!
//! Shapes: `micro`, `micro-yarn` and `gpt2-micro` fit one 256-thread block per row and one
//! 32-key attention tile. The `host-*` specs of `tests/specs/` force the long paths (each
//! spec's header says which): rows wider than a block (d_model 264, 300, 340 and 520, hidden
//! widths up to 1,360, vocabularies of 1,100), sequences of three to five key tiles with a
//! ragged last one (72, 75, 90 and 100 tokens; 32-key tiles, and 16-key tiles for 104-wide
//! GQA heads), head dimensions over 32 (several accumulators per lane, the last ragged), and
//! between them every op variant of the reference specs: MLA with and without q-LoRA, GQA,
//! MHA, learned positions, YaRN, sigmoid and softmax scores, greedy and group-limited
//! selection (`top2_sum` group scores with the aux-free bias; V2's `max` in the grid-stride
//! test's variant), shared experts, dense layers before MoE ones, MTP, biases, LayerNorm and
//! RMSNorm, and an FP8 policy. Grid-stride loops, which only element counts past
//! `MAX_GRID` × 256 reach, are run by capping every launch of a kernel that reads `gridDim` at
//! 3 blocks. A wrong plan (two launches of a step swapped, two arguments of a launch swapped)
//! fails the comparison.
//!
//! What this checks: each kernel's indexing, its arguments as the manifest passes them, and its
//! arithmetic (expressions and their reverse-mode gradients, norms, RoPE/YaRN, attention and
//! its gradients, cross-entropy, embedding, copies). What it cannot: the warp's lockstep
//! execution and CUDA's own math functions (the host
//! has its own `expf`, `erff`…; `kiln_reduce.cuh`'s shuffles are replaced by reductions
//! through shared memory between barriers) and the GPU's memory model; `scripts/device-check` runs the same comparison on a GPU. GEMM steps
//! (cuBLASLt) and the ops without kernels yet are skipped; a GEMM's outputs that a launch of
//! the same step reads come from the interpreter. The routed experts' steps, whose grouped
//! GEMMs write scratch that their launches read, run whole on the emulated device instead
//! (runtime/tests/device.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_compiler::check::check;
use kiln_compiler::emit_cuda::{emit, Arg, CudaProgram, Gemm, Work};
use kiln_compiler::ir::{DType, Def, Graph, InputKind, ValueId};
use kiln_compiler::lower::Objective;
use kiln_compiler::program::{compile, compile_decode, compile_policy};
use kiln_runtime::cpu::attention::rope_tables;
use kiln_runtime::data::{builtin_corpus, byte_tokens, Batcher, Rng};
use kiln_runtime::exec::{Buf, Executor, Feed};
use kiln_runtime::numerics::quant::{quantize, ScaleFormat};
use kiln_runtime::numerics::Fp8Format;
use kiln_runtime::train::{feed_inputs, init_params, max_token_offset};

mod common;

fn scratch(test: &str) -> PathBuf {
    common::scratch("cuda_host", test)
}

/// CUDA's execution model on the host (`kernels/kiln_host.h`, which the emulated device builds
/// under too).
const SHIM: &str = kiln_compiler::emit_cuda::HOST_HEADER.1;

/// The host program's helpers (the shim's `Pool` runs the blocks).
const POOL: &str = r#"
static float f32(unsigned bits) { float f; memcpy(&f, &bits, 4); return f; }
// Scratch memory holds floats or ints, as the kernel's parameter says.
struct AnyPtr {
    void* p;
    template <class T> operator T*() const { return (T*)p; }
};
"#;

/// One buffer the host program reads: a value from the interpreter, or a RoPE table.
struct Input {
    id: usize,
    floats: Option<Vec<f32>>,
    ids: Option<Vec<u32>>,
}

/// The step's launches and which values they write, for the steps the host runs.
struct Plan {
    node: usize,
    launches: Vec<kiln_compiler::emit_cuda::Launch>,
    /// Values the launches write (outputs of the node no GEMM of the step writes).
    written: Vec<ValueId>,
    /// The step's FP8 GEMMs, whose quantized operands the launches write into scratch.
    fp8: Vec<Gemm>,
}

fn plans(graph: &Graph, cuda: &CudaProgram) -> Vec<Plan> {
    let mut out = Vec::new();
    for step in &cuda.steps {
        let launches: Vec<_> = step
            .work
            .iter()
            .filter_map(|w| match w {
                Work::Launch(l) => Some(l.clone()),
                _ => None,
            })
            .collect();
        // The experts' steps interleave their launches with grouped GEMMs over scratch
        // buffers, which only a device runs: runtime/tests/device.rs checks them on the
        // emulated device, the same kernels under the same shim.
        let grouped = step.work.iter().any(|w| matches!(w, Work::GroupedGemm(_)));
        if launches.is_empty() || grouped {
            continue;
        }
        let by_gemm: HashSet<usize> = step
            .work
            .iter()
            .filter_map(|w| match w {
                Work::Gemm(g) => Some(g.out),
                _ => None,
            })
            .collect();
        let node = &graph.nodes[kiln_compiler::ir::Handle::from_index(step.node)];
        let written = node
            .outputs
            .iter()
            .copied()
            .filter(|v| !by_gemm.contains(&v.index()))
            .collect();
        let fp8 = step
            .work
            .iter()
            .filter_map(|w| match w {
                Work::Gemm(g) if g.fp8.is_some() => Some(g.clone()),
                _ => None,
            })
            .collect();
        out.push(Plan {
            node: step.node,
            launches,
            written,
            fp8,
        });
    }
    out
}

/// Writes `inputs.bin` into `dir`: per buffer its index, its element count and its
/// little-endian 32-bit elements (float bits or ids), as the host program reads them.
fn write_buffers<'a>(dir: &Path, buffers: impl IntoIterator<Item = (usize, &'a [u32])>) {
    let mut data = Vec::new();
    for (id, words) in buffers {
        data.extend((id as u64).to_le_bytes());
        data.extend((words.len() as u64).to_le_bytes());
        for w in words {
            data.extend(w.to_le_bytes());
        }
    }
    std::fs::write(dir.join("inputs.bin"), data).unwrap();
}

/// The generated unit for the host: without the CUDA headers the shim replaces.
fn host_source(cuda: &CudaProgram) -> String {
    cuda.source
        .replace("#include <cuda_runtime.h>\n", "")
        .replace("#include \"kiln_types.cuh\"\n", "")
        .replace("#include \"kiln_reduce.cuh\"\n", "")
}

/// Compiles `SHIM`, the generated unit and `main` with the host C++ compiler, runs it in
/// `dir`, and returns what it wrote to `outputs.bin`.
fn build_and_run(dir: &Path, what: &str, cuda: &CudaProgram, main: &str) -> Vec<u8> {
    let cpp = dir.join("host.cpp");
    std::fs::write(&cpp, format!("{SHIM}\n{}\n{main}", host_source(cuda))).unwrap();
    let exe = dir.join("host");
    let (cxx, command) = common::cxx_command(
        &["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-w"],
        &exe,
        &cpp,
    );
    let built = common::run_cxx(&cxx, command);
    assert!(
        built.status.success(),
        "{what}: {cxx} failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&exe).current_dir(dir).output().unwrap();
    assert!(
        ran.status.success(),
        "{what}: the host run failed ({}; error flag set?)\n{}",
        ran.status,
        String::from_utf8_lossy(&ran.stderr)
    );
    std::fs::read(dir.join("outputs.bin")).unwrap()
}

/// The host program's statement running launch `l` with `args` (C++ expressions) on the pool.
fn launch_line(indent: &str, l: &kiln_compiler::emit_cuda::Launch, args: &[String]) -> String {
    format!(
        "{indent}pool.run({}ULL, [&] {{ {}({}); }});\n",
        l.grid,
        l.kernel,
        args.join(", ")
    )
}

/// The C++ expression for one kernel argument.
fn arg_expr(graph: &Graph, a: &Arg, values: usize) -> String {
    match a {
        Arg::Value { id } => {
            let ty = if graph.values[ValueId::from_index(*id)].ty.dtype == DType::U32 {
                "unsigned"
            } else {
                "float"
            };
            format!("({ty}*)work[{id}]")
        }
        Arg::Scratch { slot, .. } => format!("AnyPtr{{scratch[{slot}]}}"),
        Arg::Fp8Codes { copy, .. } => format!("AnyPtr{{copies[{}]}}", 2 * copy),
        Arg::Fp8Scales { copy, .. } => format!("AnyPtr{{copies[{}]}}", 2 * copy + 1),
        Arg::ErrorFlag => "&error_flag".into(),
        Arg::RopeCos { table } => format!("(float*)work[{}]", values + 2 * table),
        Arg::RopeSin { table } => format!("(float*)work[{}]", values + 2 * table + 1),
        Arg::Int { value } => format!("{value}LL"),
        Arg::Float { value } => format!("f32(0x{:08x}u)", (*value as f32).to_bits()),
        Arg::Tensors { .. } | Arg::ChunkTensor | Arg::ChunkStart | Arg::Hyper { .. } => {
            unreachable!("optimizer launches are not run here")
        }
    }
}

/// Runs every generated kernel of `spec`'s training step on the host and compares it with the
/// interpreter; returns every compared output.
fn run_spec(spec: &str, test: &str, objective: Objective) -> Vec<Compared> {
    run_spec_edited(spec, test, objective, &|_, _| {})
}

/// [`run_spec`] on the plan as `edit` changes it (a wrong plan, or smaller grids).
fn run_spec_edited(
    spec: &str,
    test: &str,
    objective: Objective,
    edit: &dyn Fn(&Graph, &mut CudaProgram),
) -> Vec<Compared> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec);
    let model = check(&std::fs::read(path).unwrap()).unwrap();
    let compiled = match objective {
        Objective::Pretrain => compile(&model).unwrap(),
        Objective::PolicyGradient => compile_policy(&model).unwrap(),
        Objective::Decode { .. } => unreachable!("the training step's kernels"),
    };
    let graph = compiled.train.graph();
    let mut cuda = emit(&compiled.train);
    edit(graph, &mut cuda);

    // The interpreter's run of one step, keeping every value.
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let forward = compiled.forward.graph();
    let window = t + max_token_offset(forward) as usize - 1;
    let mut batcher = Batcher::new(byte_tokens(&builtin_corpus(0, 1 << 15)), b, window, 0).unwrap();
    let batch = batcher.next_batch();
    let inputs = feed_inputs(graph, &batch, t);
    let params = init_params(forward, 7);
    // Policy-gradient weights of both signs, zero on every third token.
    let token_weights: Vec<f32> = (0..b * t)
        .map(|i| {
            if i % 3 == 0 {
                0.0
            } else {
                ((i % 7) as f32 - 3.0) / 50.0
            }
        })
        .collect();
    let weights = (objective == Objective::PolicyGradient).then_some(&token_weights[..]);
    let all: Vec<ValueId> = graph
        .nodes
        .iter()
        .flat_map(|(_, n)| n.outputs.iter().copied())
        .collect();
    let values = Executor::new(&compiled.train, &all)
        .run::<f32>(&Feed {
            params: &params,
            inputs: &inputs,
            weights,
        })
        .unwrap();
    let value_of = |v: ValueId| -> Input {
        let id = v.index();
        match graph.values[v].def {
            kiln_compiler::ir::Def::Param(p) => Input {
                id,
                floats: Some(params[p.index()].clone()),
                ids: None,
            },
            kiln_compiler::ir::Def::Input(InputKind::TokenWeights) => Input {
                id,
                floats: Some(token_weights.clone()),
                ids: None,
            },
            kiln_compiler::ir::Def::Input(kind) => Input {
                id,
                floats: None,
                ids: Some(inputs[&kind].clone()),
            },
            kiln_compiler::ir::Def::Node { .. } => match &values[&v] {
                Buf::F(x) => Input {
                    id,
                    floats: Some(x.clone()),
                    ids: None,
                },
                Buf::U(x) => Input {
                    id,
                    floats: None,
                    ids: Some(x.clone()),
                },
            },
        }
    };

    let rule = match model.precision.fp8.map(|f| f.scale) {
        Some(ScaleFormat::Pow2) => ScaleFormat::Pow2,
        _ => ScaleFormat::Fp32,
    };
    compare_on_host(spec, test, graph, &cuda, &values, &value_of, rule)
}

/// Runs every launch of `cuda` on the host, each step on fresh copies of the interpreter's
/// `values` (`value_of` gives any value, input or parameter, as the step reads it), and
/// compares what each writes with the interpreter's; FP8 operands (scaled by `rule`) are
/// compared bit for bit. Returns `(node path, value, relative error)` per compared output.
fn compare_on_host(
    spec: &str,
    test: &str,
    graph: &Graph,
    cuda: &CudaProgram,
    values: &HashMap<ValueId, Buf<f32>>,
    value_of: &dyn Fn(ValueId) -> Input,
    rule: ScaleFormat,
) -> Vec<Compared> {
    let plans = plans(graph, cuda);

    // Every buffer any launch reads, and the RoPE tables.
    let mut needed: BTreeMap<usize, Input> = BTreeMap::new();
    for plan in &plans {
        for l in &plan.launches {
            for a in &l.args {
                if let Arg::Value { id } = a {
                    needed
                        .entry(*id)
                        .or_insert_with(|| value_of(ValueId::from_index(*id)));
                }
            }
        }
    }
    let nvalues = graph.values.len();
    for (k, table) in cuda.rope_tables.iter().enumerate() {
        let tables = rope_tables::<f32>(
            table.seq as usize,
            table.dim as usize,
            table.theta,
            table.yarn.as_ref(),
        );
        for (i, data) in [tables.cos, tables.sin].into_iter().enumerate() {
            let id = nvalues + 2 * k + i;
            needed.insert(
                id,
                Input {
                    id,
                    floats: Some(data),
                    ids: None,
                },
            );
        }
    }

    // The data file: per buffer its index, element count and little-endian 32-bit elements.
    let dir = scratch(test);
    let words: Vec<(usize, Vec<u32>)> = needed
        .values()
        .map(|input| {
            let words = match (&input.floats, &input.ids) {
                (Some(f), _) => f.iter().map(|x| x.to_bits()).collect(),
                (_, Some(u)) => u.clone(),
                _ => unreachable!(),
            };
            (input.id, words)
        })
        .collect();
    write_buffers(&dir, words.iter().map(|(id, w)| (*id, &w[..])));

    // The host program: the generated unit under the shim, then one block per step.
    let mut main = String::from(POOL);
    let total = nvalues + 2 * cuda.rope_tables.len();
    writeln!(
        main,
        "int main() {{\n    static std::vector<void*> pristine({total}, nullptr), work({total}, nullptr);\n    \
         static std::vector<size_t> count({total}, 0);\n    \
         static std::vector<void*> copies({}, nullptr);\n    int error_flag = 0;\n    \
         FILE* in = fopen(\"inputs.bin\", \"rb\");\n    unsigned long long hdr[2];\n    \
         while (fread(hdr, 8, 2, in) == 2) {{\n        pristine[hdr[0]] = malloc(hdr[1] * 4 + 4);\n        \
         count[hdr[0]] = hdr[1];\n        if (fread(pristine[hdr[0]], 4, hdr[1], in) != hdr[1]) return 3;\n    }}\n    \
         fclose(in);\n    FILE* out = fopen(\"outputs.bin\", \"wb\");\n    Pool pool;",
        2 * cuda.fp8_copies.len().max(1)
    )
    .unwrap();
    for plan in &plans {
        let _ = writeln!(main, "    {{ // node {}", plan.node);
        // Fresh copies of what the step reads; NaN in what it writes.
        let mut seen = HashSet::new();
        for l in &plan.launches {
            for a in &l.args {
                if let Arg::Value { id } = a {
                    if seen.insert(*id) {
                        let _ = writeln!(
                            main,
                            "        work[{id}] = malloc(count[{id}] * 4 + 4); memcpy(work[{id}], pristine[{id}], count[{id}] * 4);"
                        );
                    }
                }
            }
        }
        for v in &plan.written {
            let id = v.index();
            let _ = writeln!(
                main,
                "        for (size_t i = 0; i < count[{id}]; ++i) ((float*)work[{id}])[i] = NAN;"
            );
        }
        // Scratch slots and the FP8 copies the step writes, NaN until written.
        let mut slots = BTreeMap::new();
        let mut copies = BTreeMap::new();
        for l in &plan.launches {
            for a in &l.args {
                match a {
                    Arg::Scratch { slot, bytes } => {
                        slots.insert(*slot, *bytes);
                    }
                    Arg::Fp8Codes { copy, bytes } => {
                        copies.insert(2 * copy, (format!("fp8copy-{copy}-codes.bin"), *bytes));
                    }
                    Arg::Fp8Scales { copy, bytes } => {
                        copies.insert(2 * copy + 1, (format!("fp8copy-{copy}-scales.bin"), *bytes));
                    }
                    _ => {}
                }
            }
        }
        let _ = writeln!(
            main,
            "        void* scratch[{}] = {{}};",
            slots.keys().max().map_or(1, |&s| s as usize + 1)
        );
        for (slot, bytes) in &slots {
            let _ = writeln!(
                main,
                "        scratch[{slot}] = malloc({bytes}); for (size_t i = 0; i < {bytes} / 4; ++i) ((float*)scratch[{slot}])[i] = NAN;"
            );
        }
        for (at, (_, bytes)) in &copies {
            let _ = writeln!(
                main,
                "        copies[{at}] = malloc({bytes}); for (size_t i = 0; i < {bytes} / 4; ++i) ((float*)copies[{at}])[i] = NAN;"
            );
        }
        for t in 0..cuda.rope_tables.len() {
            for k in 0..2 {
                let id = nvalues + 2 * t + k;
                let _ = writeln!(main, "        work[{id}] = pristine[{id}];");
            }
        }
        for l in &plan.launches {
            let args: Vec<String> = l.args.iter().map(|a| arg_expr(graph, a, nvalues)).collect();
            main.push_str(&launch_line("        ", l, &args));
        }
        for v in &plan.written {
            let id = v.index();
            let _ = writeln!(
                main,
                "        {{ unsigned long long h[2] = {{{id}ULL, count[{id}]}}; fwrite(h, 8, 2, out); fwrite(work[{id}], 4, count[{id}], out); }}"
            );
        }
        // The FP8 GEMMs' quantized operands, one file per scratch slot.
        for g in &plan.fp8 {
            let q = g.fp8.as_ref().unwrap();
            for operand in [&q.a, &q.b] {
                for arg in [&operand.codes, &operand.scales] {
                    let Arg::Scratch { slot, bytes } = arg else {
                        continue; // an FP8 copy, written out by its writer's step
                    };
                    let _ = writeln!(
                        main,
                        "        {{ FILE* f = fopen(\"fp8-{}-{slot}.bin\", \"wb\"); fwrite(scratch[{slot}], 1, {bytes}, f); fclose(f); }}",
                        plan.node
                    );
                }
            }
        }
        // The FP8 copies the step wrote, one file each.
        for (at, (file, bytes)) in &copies {
            let _ = writeln!(
                main,
                "        {{ FILE* f = fopen(\"{file}\", \"wb\"); fwrite(copies[{at}], 1, {bytes}, f); fclose(f); free(copies[{at}]); }}"
            );
        }
        for id in &seen {
            let _ = writeln!(main, "        free(work[{id}]); work[{id}] = nullptr;");
        }
        for slot in slots.keys() {
            let _ = writeln!(main, "        free(scratch[{slot}]);");
        }
        let _ = writeln!(main, "    }}");
    }
    main.push_str("    fclose(out);\n    return error_flag;\n}\n");
    let bytes = build_and_run(&dir, spec, cuda, &main);

    // Compare every written value with the interpreter's.
    let mut results = Vec::new();
    // What the kernels wrote, by value (fused FP8 copies are the quantization of these).
    let mut computed: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut at = 0;
    let mut order = plans
        .iter()
        .flat_map(|p| p.written.iter().map(move |&v| (p.node, v)));
    while at < bytes.len() {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap()) as usize;
        let (id, n) = (word(at), word(at + 8));
        at += 16;
        let words: Vec<[u8; 4]> = bytes[at..at + 4 * n]
            .chunks_exact(4)
            .map(|c| c.try_into().unwrap())
            .collect();
        at += 4 * n;
        let (node, v) = order.next().expect("one record per written value");
        assert_eq!(v.index(), id);
        let path_of = |node: usize| {
            graph.nodes[kiln_compiler::ir::Handle::from_index(node)]
                .path
                .clone()
        };
        // Ids (the router's choice of experts) must be equal.
        if let Buf::U(want) = &values[&v] {
            let got: Vec<u32> = words.iter().map(|w| u32::from_le_bytes(*w)).collect();
            let differ = got.iter().zip(want).filter(|(g, w)| g != w).count() as f64;
            results.push(Compared {
                path: path_of(node),
                id,
                rel: differ,
                max: differ,
            });
            continue;
        }
        let got: Vec<f32> = words.iter().map(|w| f32::from_le_bytes(*w)).collect();
        computed.insert(id, got.clone());
        let want = values[&v].floats();
        assert_eq!(want.len(), got.len(), "{spec}: %{id} size");
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        // The largest |out − ref| and |ref|; a NaN anywhere in the output makes both NaN
        // (`f64::max` would drop it).
        let (mut worst, mut peak) = (0.0f64, 0.0f64);
        let nan_max = |m: f64, x: f64| if x.is_nan() || x > m { x } else { m };
        for (&g, &w) in got.iter().zip(want) {
            let e = f64::from(g) - f64::from(w);
            diff += e.powi(2);
            norm += f64::from(w).powi(2);
            worst = nan_max(worst, e.abs());
            peak = nan_max(peak, f64::from(w).abs());
        }
        let nan = got.iter().any(|g| g.is_nan());
        let rel = if nan {
            f64::NAN
        } else if norm > 0.0 {
            (diff / norm).sqrt()
        } else {
            diff.sqrt()
        };
        // Per element: |out − ref| against the reference's scale, its largest element.
        let max = if nan {
            f64::NAN
        } else if peak > 0.0 {
            worst / peak
        } else {
            worst
        };
        let node_ref = &graph.nodes[kiln_compiler::ir::Handle::from_index(node)];
        let path = node_ref.path.clone();
        // The step's largest float operand: what the output is computed from.
        let scale = node_ref
            .inputs
            .iter()
            .filter_map(|&x| match graph.values[x].def {
                kiln_compiler::ir::Def::Node { .. } => match &values[&x] {
                    Buf::F(f) => Some(f.iter().map(|&e| f64::from(e).powi(2)).sum::<f64>().sqrt()),
                    Buf::U(_) => None,
                },
                _ => None,
            })
            .fold(0.0, f64::max);
        // An output that is zero up to the rounding of what it is computed from (the key
        // bias's gradient: softmax ignores a shift shared by all keys, so it is exactly zero
        // in exact arithmetic) has no relative accuracy to compare; it passes when both
        // results are that small.
        let noise = 1e-9 * scale;
        if !nan && norm.sqrt() <= noise && diff.sqrt() <= noise {
            println!(
                "%{id} {path}: zero up to rounding (|ref| {:.2e}, |out - ref| {:.2e}, |input| {scale:.2e})",
                norm.sqrt(),
                diff.sqrt()
            );
            results.push(Compared {
                path,
                id,
                rel: 0.0,
                max: 0.0,
            });
            continue;
        }
        results.push(Compared { path, id, rel, max });
    }
    // Every FP8 GEMM's operands: the launches' codes and scales must be the CPU emulation's
    // quantization of the same values, bit for bit (mismatches are counted).
    for plan in &plans {
        for g in &plan.fp8 {
            let q = g.fp8.as_ref().unwrap();
            let format = match q.format {
                kiln_compiler::model::Format::E5m2 => Fp8Format::E5m2,
                _ => Fp8Format::E4m3,
            };
            // Each operand as [outer, k] row-major, from how the GEMM stores it.
            let operands = [(&q.a, g.a, g.m, g.a_trans), (&q.b, g.b, g.n, !g.b_trans)];
            for (operand, source, outer, stored_transposed) in operands {
                // A scratch operand is quantized from the interpreter's value in the GEMM's
                // step; a copy from the interpreter's value in its first reader's step, or
                // as its producer computes it (fused): from what that kernel wrote.
                let (x, file, kind) = match operand.codes {
                    Arg::Scratch { slot, .. } => (
                        value_of(ValueId::from_index(source)).floats.unwrap(),
                        format!("fp8-{}-{slot}", plan.node),
                        "scratch",
                    ),
                    Arg::Fp8Codes { copy, .. } => {
                        let c = &cuda.fp8_copies[copy];
                        let (x, kind) = if c.fused {
                            (computed[&c.value].clone(), "copy fused into its producer")
                        } else {
                            (
                                value_of(ValueId::from_index(c.value)).floats.unwrap(),
                                "copy",
                            )
                        };
                        (x, format!("fp8copy-{copy}"), kind)
                    }
                    _ => unreachable!("FP8 operands live in scratch or in copies"),
                };
                let (outer, k) = (outer as usize, g.k as usize);
                let kmajor: Vec<f32> = if stored_transposed {
                    (0..outer * k).map(|e| x[(e % k) * outer + e / k]).collect()
                } else {
                    x
                };
                let block = operand.block.map(|b| b as usize);
                let want = quantize(&kmajor, outer, k, block, format, rule).unwrap();
                let read = |arg: &Arg| {
                    let name = match arg {
                        Arg::Scratch { slot, .. } => format!("fp8-{}-{slot}.bin", plan.node),
                        Arg::Fp8Codes { .. } => format!("{file}-codes.bin"),
                        _ => format!("{file}-scales.bin"),
                    };
                    std::fs::read(dir.join(name)).unwrap()
                };
                let codes = read(&operand.codes);
                let scales: Vec<u32> = read(&operand.scales)
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let bad_codes = (0..want.codes.len())
                    .filter(|&i| codes[i] != want.codes[i])
                    .count();
                let bad_scales = (0..want.scales.len())
                    .filter(|&i| scales[i] != want.scales[i].to_bits())
                    .count();
                let node = &graph.nodes[kiln_compiler::ir::Handle::from_index(plan.node)];
                println!(
                    "%{source} {} as FP8 [{outer}, {k}] in {:?} blocks ({kind}): {bad_codes} of {} codes, {bad_scales} of {} scales differ",
                    node.path,
                    operand.block,
                    want.codes.len(),
                    want.scales.len()
                );
                let bad = (bad_codes + bad_scales) as f64;
                results.push(Compared {
                    path: format!("{} FP8 operand %{source}", node.path),
                    id: source,
                    rel: bad,
                    max: bad,
                });
            }
        }
    }
    let _ = std::io::stdout().flush();
    results
}

/// One compared output of a step.
#[derive(Debug)]
struct Compared {
    /// The node's path (and, for an FP8 operand, which).
    path: String,
    /// The value's index.
    id: usize,
    /// ‖out − ref‖ / ‖ref‖ for floats; for ids and FP8 operands, how many elements differ.
    rel: f64,
    /// max |out − ref| / max |ref| for floats (every element within this much of the
    /// reference's scale); for ids and FP8 operands, how many elements differ. NaN when the
    /// output holds a NaN.
    max: f64,
}

impl Compared {
    /// Within both tolerances (a NaN never is).
    fn passes(&self) -> bool {
        self.rel <= TOLERANCE && self.max <= ELEMENT_TOLERANCE
    }
}

/// f32 kernels against the f32 interpreter: the orders of summation differ, nothing else.
const TOLERANCE: f64 = 1e-5;

/// The bound on every element: |out − ref| ≤ this · max |ref| over the output.
const ELEMENT_TOLERANCE: f64 = 1e-5;

fn check_spec(spec: &str, test: &str) {
    check_spec_for(spec, test, Objective::Pretrain);
}

fn check_spec_for(spec: &str, test: &str, objective: Objective) {
    let results = run_spec(spec, test, objective);
    check_results(spec, &results);
}

fn check_results(spec: &str, results: &[Compared]) {
    assert!(!results.is_empty());
    let worst = results
        .iter()
        .max_by(|a, b| a.rel.total_cmp(&b.rel))
        .unwrap();
    let worst_max = results
        .iter()
        .max_by(|a, b| a.max.total_cmp(&b.max))
        .unwrap();
    println!(
        "{spec}: {} outputs compared, worst {:.2e} at {} (%{}); worst element {:.2e} of its \
         output's scale at {} (%{})",
        results.len(),
        worst.rel,
        worst.path,
        worst.id,
        worst_max.max,
        worst_max.path,
        worst_max.id
    );
    let bad = failures(results);
    assert!(
        bad.is_empty(),
        "{spec}: outside {TOLERANCE:e} (norm) or {ELEMENT_TOLERANCE:e} (element):\n{}",
        bad.join("\n")
    );
}

/// The outputs outside the tolerances, one line each.
fn failures(results: &[Compared]) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.passes())
        .map(|r| {
            format!(
                "{} %{}: norm {:.3e}, element {:.3e}",
                r.path, r.id, r.rel, r.max
            )
        })
        .collect()
}

#[test]
fn micro_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/micro.toml", "micro");
}

/// The policy-gradient graph's weighted cross-entropy (forward and gradient kernels).
#[test]
fn micro_policy_gradient_kernels_match_the_cpu_backend() {
    check_spec_for(
        "tests/specs/micro.toml",
        "micro-pg",
        Objective::PolicyGradient,
    );
}

/// micro under an FP8 policy (E4M3 forward, E5M2 gradients, 1×8 tiles and 8×8 blocks, as
/// micro's widths allow): every FP8 GEMM's operand quantization (activation tiles, weight
/// blocks, both transposed for the gradients) against `numerics::quant`, bit for bit.
#[test]
fn micro_fp8_quantization_matches_the_cpu_emulation() {
    // Each of the 25 FP8 linear ops: forward and both gradient GEMMs, two operands each.
    micro_fp8("micro-fp8", "e5m2", 150);
}

/// The same with FP8 forward GEMMs only (`linear_grad = "bf16"`, the ablation of docs/fp8.md):
/// each weight is read in one layout, so its copy is quantized alone, not as a pair.
#[test]
fn micro_fp8_forward_only_quantization_matches_the_cpu_emulation() {
    micro_fp8("micro-fp8-forward", "bf16", 50);
}

/// Runs micro under an E4M3 policy for linear layers (`linear_grad` as given) with 1×8 tiles
/// and 8×8 blocks, and checks that `operands` FP8 operands were compared, all bit for bit.
fn micro_fp8(test: &str, linear_grad: &str, operands: usize) {
    let dir = scratch(&format!("{test}-spec"));
    let spec = dir.join(format!("{test}.toml"));
    let micro = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs/micro.toml"),
    )
    .unwrap();
    std::fs::write(
        &spec,
        format!(
            "{micro}\n[precision]\nlinear = \"e4m3\"\nlinear_grad = \"{linear_grad}\"\n\
             keep = [\"embed\", \"head\", \"moe.router\", \"*norm\", \"attn.core\"]\n\n\
             [precision.fp8]\nact_tile = [1, 8]\nweight_block = [8, 8]\n"
        ),
    )
    .unwrap();
    let results = run_spec(spec.to_str().unwrap(), test, Objective::Pretrain);
    let fp8: Vec<_> = results
        .iter()
        .filter(|r| r.path.contains("FP8 operand"))
        .collect();
    assert_eq!(fp8.len(), operands, "{fp8:?}");
    check_results(spec.to_str().unwrap(), &results);
}

#[test]
fn gpt2_micro_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/gpt2-micro.toml", "gpt2-micro");
}

#[test]
fn micro_yarn_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/micro-yarn.toml", "micro-yarn");
}

/// DeepSeek-V3's ops (MLA with q-LoRA, YaRN, sigmoid scores, group-limited top2_sum
/// selection with the aux-free bias, a shared expert, MTP, FP8) at widths past one block
/// (d_model 520), a vocabulary past 1,024, three key tiles with a ragged last one and head
/// dimensions over 32: see the spec's header.
#[test]
fn host_wide_mla_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/host-wide-mla.toml", "host-wide-mla");
}

/// DeepSeek-V2-Lite's ops (MLA without q-LoRA, softmax scores, greedy selection, two shared
/// experts, two dense layers first) at widths past one block and a ragged third key tile.
#[test]
fn host_lite_softmax_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/host-lite-softmax.toml", "host-lite-softmax");
}

/// Grouped-query attention with 104-dimensional heads (16-key tiles, four accumulators per
/// lane) over five key tiles, the last ragged.
#[test]
fn host_gqa_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/host-gqa.toml", "host-gqa");
}

/// GPT-2's ops (MHA with biases, learned positions, LayerNorm, GELU) at widths past one
/// block, a vocabulary past 1,024 and four key tiles with a ragged last one.
#[test]
fn host_mha_learned_kernels_match_the_cpu_backend() {
    check_spec("tests/specs/host-mha-learned.toml", "host-mha-learned");
}

/// The text of kernel `name` in the generated unit: from its declaration to the next kernel.
fn kernel_text<'a>(source: &'a str, name: &str) -> &'a str {
    let start = source
        .match_indices("__global__")
        .map(|(at, _)| at)
        .find(|&at| {
            // `__global__ void __launch_bounds__(256, 4) NAME(…) {`
            let head = &source[at..];
            head[..head.find('{').unwrap_or(head.len())].contains(&format!(" {name}("))
        })
        .unwrap_or_else(|| panic!("kernel {name} in the unit"));
    let rest = &source[start + 10..];
    let end = rest
        .find("__global__")
        .map_or(source.len(), |e| start + 10 + e);
    &source[start..end]
}

/// Caps at `cap` blocks every launch of a kernel that loops over its grid (reads
/// `gridDim`), so each of those loops repeats; returns how many launches it cut.
fn cap_grids(cuda: &mut CudaProgram, cap: u64) -> usize {
    let source = cuda.source.clone();
    let mut cut = 0;
    for step in &mut cuda.steps {
        for w in &mut step.work {
            if let Work::Launch(l) = w {
                if l.grid > cap && kernel_text(&source, &l.kernel).contains("gridDim") {
                    l.grid = cap;
                    cut += 1;
                }
            }
        }
    }
    cut
}

/// Grid-stride loops past their first pass: the elementwise launches use at most
/// `MAX_GRID` blocks of 256 threads and stride over the rest, which only element counts above
/// 540,672 reach. Instead, every launch of a kernel that reads `gridDim` runs here on 3
/// blocks, so its loop repeats (a 300-wide activation of 180 tokens takes 71 passes), and must
/// still match the interpreter. The spec is host-lite-softmax with DeepSeek-V2's routing
/// (softmax scores, group-limited by each group's best expert), which no spec of
/// `tests/specs/` has: V2 is the only HF family with it, and the other MLA specs are V3's and
/// V2-Lite's.
#[test]
fn grid_stride_loops_repeat_on_small_grids() {
    let lite = spec_text("tests/specs/host-lite-softmax.toml");
    let v2 = lite.replace(
        "select = \"greedy\"\n",
        "select = \"group_limited\"\ngroups = 3\ngroups_kept = 2\ngroup_score = \"max\"\n",
    );
    assert_ne!(v2, lite);
    let dir = scratch("host-v2-spec");
    let spec = dir.join("host-v2.toml");
    std::fs::write(&spec, v2).unwrap();
    let spec = spec.to_str().unwrap();
    let cut = std::cell::Cell::new(0);
    let results = run_spec_edited(
        spec,
        "host-v2-small-grids",
        Objective::Pretrain,
        &|_, cuda| cut.set(cap_grids(cuda, 3)),
    );
    println!("{} launches cut to 3 blocks", cut.get());
    assert!(cut.get() > 50, "{} launches cut", cut.get());
    check_results(spec, &results);
}

/// A wrong plan fails the comparison. GEMM steps are the interpreter's here (a transpose flag
/// is never read), so the mutations are of launches: in the first attention backward step of
/// gpt2-micro's plan (the last layer's) the delta launch runs after the query gradient's,
/// which then reads delta's scratch before it is written (NaN); and its first attention
/// forward reads `v` as keys and `k` as values (same shapes: finite and wrong). Both steps must
/// fail, every other step still pass.
#[test]
fn a_wrong_plan_is_caught() {
    let mutated = std::cell::RefCell::new(Vec::new());
    let results = run_spec_edited(
        "tests/specs/gpt2-micro.toml",
        "gpt2-micro-wrong-plan",
        Objective::Pretrain,
        &|graph, cuda| {
            // Each mutated step: its path and the values it writes.
            let outputs = |node: usize| -> Vec<usize> {
                graph.nodes[kiln_compiler::ir::Handle::from_index(node)]
                    .outputs
                    .iter()
                    .map(|v| v.index())
                    .collect()
            };
            let grad = cuda
                .steps
                .iter_mut()
                .find(|s| s.op == "attention_grad")
                .expect("an attention backward step");
            grad.work.swap(0, 1);
            mutated
                .borrow_mut()
                .push((grad.path.clone(), outputs(grad.node)));
            let fwd = cuda
                .steps
                .iter_mut()
                .find(|s| s.op == "attention")
                .expect("an attention forward step");
            let Work::Launch(l) = &mut fwd.work[0] else {
                panic!("the attention forward is a launch")
            };
            l.args.swap(1, 2);
            mutated
                .borrow_mut()
                .push((fwd.path.clone(), outputs(fwd.node)));
        },
    );
    let mutated = mutated.into_inner();
    let bad = failures(&results);
    println!("failed as expected:\n{}", bad.join("\n"));
    for (path, ids) in &mutated {
        assert!(
            results.iter().any(|r| ids.contains(&r.id) && !r.passes()),
            "the mutated step {path} passed"
        );
    }
    let others: Vec<_> = results
        .iter()
        .filter(|r| !mutated.iter().any(|(_, ids)| ids.contains(&r.id)) && !r.passes())
        .collect();
    assert!(others.is_empty(), "unmutated steps failed: {others:?}");
}

/// Rows of the decode checks, their positions in caches of 8 tokens: the first token (the
/// entry alone), one in the middle, the last slot.
const DECODE_POSITIONS: [u32; 3] = [0, 3, 7];

/// Runs every generated kernel of the decode step of `spec` (TOML text), one row per position
/// of `positions` over KV caches of `capacity` tokens filled with random values, on the host,
/// and compares it with the interpreter's `run_cached`.
fn check_decode(spec: &str, test: &str, positions: &[u32], capacity: u64) {
    let model = check(spec.as_bytes()).unwrap();
    let rows = positions.len();
    let program = compile_decode(&model, rows as u64, capacity).unwrap();
    let graph = program.graph();
    let cuda = emit(&program);
    assert!(
        cuda.steps
            .iter()
            .any(|s| s.op == "cached_attention" && !s.work.is_empty()),
        "{test}: the decode step has cached attention kernels"
    );
    let params = init_params(graph, 7);
    let vocab = model.vocab as u32;
    let mut inputs = HashMap::new();
    inputs.insert(
        InputKind::Tokens { offset: 0 },
        (0..rows as u32)
            .map(|r| (5 + 37 * r) % vocab)
            .collect::<Vec<_>>(),
    );
    inputs.insert(InputKind::Positions, positions.to_vec());
    // Each block's cache, by layer, random in [-1, 1).
    let mut layers: Vec<(u32, usize)> = graph
        .values
        .iter()
        .filter_map(|(_, v)| match v.def {
            Def::Input(InputKind::KvCache { layer }) => {
                Some((layer, v.ty.shape.iter().product::<u64>() as usize))
            }
            _ => None,
        })
        .collect();
    layers.sort_unstable();
    let mut rng = Rng::new(11);
    let caches: Vec<Vec<f32>> = layers
        .iter()
        .enumerate()
        .map(|(i, &(layer, n))| {
            assert_eq!(layer as usize, i, "{test}: one cache per block");
            (0..n)
                .map(|_| (2.0 * rng.next_f64() - 1.0) as f32)
                .collect()
        })
        .collect();
    let all: Vec<ValueId> = graph
        .nodes
        .iter()
        .flat_map(|(_, n)| n.outputs.iter().copied())
        .collect();
    let values = Executor::new(&program, &all)
        .run_cached::<f32>(
            &Feed {
                params: &params,
                inputs: &inputs,
                weights: None,
            },
            &caches,
        )
        .unwrap();
    let value_of = |v: ValueId| -> Input {
        let id = v.index();
        let (floats, ids) = match graph.values[v].def {
            Def::Param(p) => (Some(params[p.index()].clone()), None),
            Def::Input(InputKind::KvCache { layer }) => {
                (Some(caches[layer as usize].clone()), None)
            }
            Def::Input(kind) => (None, Some(inputs[&kind].clone())),
            Def::Node { .. } => match &values[&v] {
                Buf::F(x) => (Some(x.clone()), None),
                Buf::U(x) => (None, Some(x.clone())),
            },
        };
        Input { id, floats, ids }
    };
    let results = compare_on_host(
        test,
        test,
        graph,
        &cuda,
        &values,
        &value_of,
        ScaleFormat::Fp32,
    );
    for op in ["rope_at", "cached_attention"] {
        let worst = results
            .iter()
            .filter(|r| match graph.values[ValueId::from_index(r.id)].def {
                Def::Node { node, .. } => graph.nodes[node].op.name() == op,
                _ => false,
            })
            .map(|r| r.rel)
            // NaN wins (`f64::max` would drop it).
            .fold(None, |w: Option<f64>, e| {
                Some(w.map_or(e, |w| if e.is_nan() || e > w { e } else { w }))
            });
        println!("{test}: worst {op} error {worst:?}");
    }
    check_results(test, &results);
}

/// The decode step of micro (MLA with YaRN-free RoPE, MoE): RoPE at positions and the latent
/// cached attention with kv_b absorbed.
#[test]
fn micro_decode_kernels_match_the_cpu_backend() {
    check_decode(
        &spec_text("tests/specs/micro.toml"),
        "micro-decode",
        &DECODE_POSITIONS,
        8,
    );
}

/// gpt2-micro's decode step: multi-head attention over its cache, learned positions (no
/// RoPE).
#[test]
fn gpt2_micro_decode_kernels_match_the_cpu_backend() {
    check_decode(
        &spec_text("tests/specs/gpt2-micro.toml"),
        "gpt2-micro-decode",
        &DECODE_POSITIONS,
        8,
    );
}

/// micro with grouped-query attention (4 query heads over 2 KV heads), RoPE in halves.
#[test]
fn gqa_decode_kernels_match_the_cpu_backend() {
    check_decode(&gqa_spec(), "gqa-decode", &DECODE_POSITIONS, 8);
}

/// micro with grouped-query attention: 4 query heads over 2 KV heads of 8 dimensions.
fn gqa_spec() -> String {
    let micro = spec_text("tests/specs/micro.toml");
    let (start, end) = (
        micro.find("[attention]").unwrap(),
        micro.find("[ffn]").unwrap(),
    );
    let attention = "[attention]\nkind = \"gqa\"\nheads = 4\nkv_heads = 2\nhead_dim = 8\n\n\
                     [attention.rope]\ntheta = 10000.0\n\n";
    format!("{}{attention}{}", &micro[..start], &micro[end..])
}

/// Caches longer than a tile of 256 keys: the online softmax's rescaling across tiles, for
/// both layouts (positions in the first, second and third tile; the last slot).
#[test]
fn decode_kernels_span_several_key_tiles() {
    let micro = spec_text("tests/specs/micro.toml");
    check_decode(&micro, "micro-decode-long", &[255, 256, 599], 600);
    check_decode(&gqa_spec(), "gqa-decode-long", &[1, 300, 511], 512);
}

fn spec_text(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The optimizer's kernels against `Trainer::step`: the gradient norm and clipping factor,
/// AdamW on every tensor in one launch (first step, zero moments) and the aux-free bias
/// update, from the gradients and expert choices of the interpreter's run of the same step.
#[test]
fn optimizer_kernels_match_the_trainer() {
    use kiln_compiler::program::TrainOutputs;
    use kiln_runtime::train::{TrainConfig, Trainer};

    let spec = "tests/specs/micro.toml";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec);
    let model = check(&std::fs::read(path).unwrap()).unwrap();
    let compiled = compile(&model).unwrap();
    let graph = compiled.train.graph();
    let forward = compiled.forward.graph();
    let cuda = emit(&compiled.train);
    let (b, t) = (model.train.batch as usize, model.train.seq_len as usize);
    let window = t + max_token_offset(forward) as usize - 1;
    let mut batcher = Batcher::new(byte_tokens(&builtin_corpus(0, 1 << 15)), b, window, 0).unwrap();
    let batch = batcher.next_batch();
    let params = init_params(forward, 7);
    let outputs = TrainOutputs::of(graph).unwrap();
    let ran = Executor::new(&compiled.train, &outputs.values())
        .run::<f32>(&Feed {
            params: &params,
            inputs: &feed_inputs(graph, &batch, t),
            weights: None,
        })
        .unwrap();
    let config = TrainConfig::of(compiled.train.settings(), 10, 0);
    let mut trainer = Trainer::new(&compiled.train, config.clone(), params.clone());
    let stats = trainer.step(&batch, t).unwrap();
    assert!(!stats.skipped);

    // The per-step scalars the runtime supplies, as the trainer computes them.
    let hyper = |name: &str| -> f64 {
        match name {
            "lr" => config.lr_at(0),
            "bias1" => 1.0 - config.beta1,
            "bias2" => 1.0 - config.beta2,
            other => panic!("unknown optimizer scalar {other}"),
        }
    };
    // Buffers: every parameter and gradient by value index, moments by parameter.
    let param_value = |p| {
        graph
            .param_value(p)
            .expect("the training graph reads every parameter")
    };
    let mut buffers: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (p, _) in graph.params.iter() {
        buffers.insert(
            param_value(p).index(),
            params[p.index()].iter().map(|x| x.to_bits()).collect(),
        );
    }
    for &(_, g) in &outputs.grads {
        buffers.insert(
            g.index(),
            ran[&g].floats().iter().map(|x| x.to_bits()).collect(),
        );
    }
    for &(_, experts, _) in &outputs.routers {
        let Buf::U(ids) = &ran[&experts] else {
            panic!("ids")
        };
        buffers.insert(experts.index(), ids.clone());
    }
    let dir = scratch("optimizer");
    write_buffers(&dir, buffers.iter().map(|(id, w)| (*id, &w[..])));
    let total = graph.values.len();
    let mut main = String::from(POOL);
    writeln!(
        main,
        "int main() {{\n    static std::vector<void*> buf({total}, nullptr), m({total}, nullptr), v({total}, nullptr);\n    \
         static std::vector<size_t> count({total}, 0);\n    FILE* in = fopen(\"inputs.bin\", \"rb\");\n    \
         unsigned long long hdr[2];\n    while (fread(hdr, 8, 2, in) == 2) {{\n        buf[hdr[0]] = malloc(hdr[1] * 4 + 4);\n        \
         m[hdr[0]] = calloc(hdr[1] + 1, 4);\n        v[hdr[0]] = calloc(hdr[1] + 1, 4);\n        count[hdr[0]] = hdr[1];\n        \
         if (fread(buf[hdr[0]], 4, hdr[1], in) != hdr[1]) return 3;\n    }}\n    fclose(in);\n    \
         FILE* out = fopen(\"outputs.bin\", \"wb\");\n    Pool pool;\n    int error_flag = 0;"
    )
    .unwrap();
    // The tables the runtime builds: every tensor, and the chunks of each in order.
    let Some(Arg::Tensors { entries }) = cuda.optimizer[0].args.first() else {
        panic!("the first optimizer launch reads the tensor table");
    };
    let _ = writeln!(main, "    static std::vector<KilnTensor> tensors;");
    let _ = writeln!(
        main,
        "    static std::vector<int> chunk_tensor;\n    static std::vector<long long> chunk_start;"
    );
    for (i, t) in entries.iter().enumerate() {
        let _ = writeln!(
            main,
            "    tensors.push_back(KilnTensor{{(float*)buf[{p}], (float*)m[{p}], (float*)v[{p}], (const float*)buf[{g}], {n}LL, f32(0x{d:08x}u)}});\n    \
             for (long long s = 0; s < {n}LL; s += {c}) {{ chunk_tensor.push_back({i}); chunk_start.push_back(s); }}",
            p = t.param,
            g = t.grad,
            n = t.elements,
            d = (t.decay as f32).to_bits(),
            c = kiln_compiler::emit_cuda::OPTIMIZER_CHUNK,
        );
    }
    // Scratch slots at the largest size a launch names (the bias update's counts in slot 2).
    let mut slot_bytes: Vec<u64> = Vec::new();
    for l in &cuda.optimizer {
        for a in &l.args {
            if let Arg::Scratch { slot, bytes } = a {
                let s = *slot as usize;
                if slot_bytes.len() <= s {
                    slot_bytes.resize(s + 1, 4);
                }
                slot_bytes[s] = slot_bytes[s].max(*bytes);
            }
        }
    }
    let allocs: Vec<String> = slot_bytes
        .iter()
        .map(|b| format!("(float*)calloc({}, 1)", b + 4))
        .collect();
    let _ = writeln!(
        main,
        "    static float* slots[{}] = {{{}}};",
        allocs.len(),
        allocs.join(", ")
    );
    for l in &cuda.optimizer {
        let args: Vec<String> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Value { id } => format!("AnyPtr{{buf[{id}]}}"),
                Arg::Tensors { .. } => "tensors.data()".into(),
                Arg::ChunkTensor => "chunk_tensor.data()".into(),
                Arg::ChunkStart => "chunk_start.data()".into(),
                Arg::Hyper { name } => {
                    format!("f32(0x{:08x}u)", (hyper(name) as f32).to_bits())
                }
                Arg::Scratch { slot, .. } => format!("AnyPtr{{slots[{slot}]}}"),
                other => arg_expr(graph, other, total),
            })
            .collect();
        main.push_str(&launch_line("    ", l, &args));
    }
    let _ = writeln!(
        main,
        "    double norm = slots[1][0];\n    fwrite(&norm, 8, 1, out);"
    );
    for (p, _) in graph.params.iter() {
        let id = param_value(p).index();
        let _ = writeln!(main, "    fwrite(buf[{id}], 4, count[{id}], out);");
    }
    main.push_str("    fclose(out);\n    return 0;\n}\n");
    let bytes = build_and_run(&dir, "the optimizer", &cuda, &main);
    let norm = f64::from_le_bytes(bytes[..8].try_into().unwrap());
    let rel_norm = (norm - stats.grad_norm).abs() / stats.grad_norm;
    println!(
        "gradient norm: host {norm:.9e}, trainer {:.9e} (rel {rel_norm:.2e})",
        stats.grad_norm
    );
    assert!(
        rel_norm < 1e-5,
        "gradient norm {norm} vs {}",
        stats.grad_norm
    );

    // Every parameter against the trainer's. The kernel computes in f32 where the trainer
    // computes in f64 and rounds once. An Adam update is at most about lr in size (|m̂/√v̂| ≤ 1
    // on a first step), so each parameter must be within 1e-5 · lr of the trainer's, plus
    // the rounding of the result (2 ulp).
    let lr = config.lr_at(0);
    let mut at = 8;
    let mut worst: (f64, String) = (0.0, String::new());
    let trained = trainer.params().unwrap().to_vec();
    for (p, param) in graph.params.iter() {
        let n = params[p.index()].len();
        let got: Vec<f32> = bytes[at..at + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        at += 4 * n;
        for (i, &have) in got.iter().enumerate() {
            let want = trained[p.index()][i];
            let ulp = f64::from(f32::from_bits(want.abs().to_bits() + 1) - want.abs());
            let err = (f64::from(have) - f64::from(want)).abs();
            let allowed = 1e-5 * lr + 2.0 * ulp;
            assert!(
                err <= allowed,
                "{}[{i}]: {have} vs the trainer's {want} (off by {err:.3e}, lr {lr:.3e})",
                param.name
            );
            let in_lr = (err - 2.0 * ulp).max(0.0) / lr;
            if in_lr > worst.0 {
                worst = (in_lr, param.name.clone());
            }
        }
    }
    println!(
        "parameters: within 2 ulp + {:.2e} · lr of the trainer's (worst {})",
        worst.0, worst.1
    );
}
