//! The CUDA emitter (`kiln emit cuda`), checked without a GPU:
//!
//! - tier 3: the generated translation unit of every reference spec compiles with nvcc for
//!   sm_90a, and no kernel spills registers or has a stack frame the allow-list does not name;
//!   the resource report for `tiny` is a snapshot, so a regression shows in review;
//! - the manifest agrees with the source: every launch names a kernel of the unit and passes
//!   exactly as many arguments as the kernel declares; every node has its step and work, and
//!   every router its bias update;
//! - the FP8 copies: each is written by exactly one launch, in its writer's step (the
//!   producer's own kernel when fused), before every GEMM that reads it, and every FP8 GEMM
//!   reading an activation as stored reads a copy; the plan for `tiny` is a snapshot;
//! - snapshots of the generated CUDA for `tiny` and `gpt2-124m`;
//! - the decode step (`compile_decode`) of latent, grouped and multi-head specs: its plan,
//!   and its unit compiled for sm_90a without spills or stack.
//!
//! Without nvcc the compile test fails with `nvcc::find`'s message (run
//! `scripts/cuda-toolchain`); `KILN_SKIP_CUDA_COMPILE=1` skips it.

use std::path::{Path, PathBuf};

use kiln::nvcc;

mod common;
use kiln_compiler::check::check;
use kiln_compiler::emit_cuda::{emit, Arg, CudaProgram, Elem, Keep, Pass, Work};
use kiln_compiler::ir::{Def, InputKind};
use kiln_compiler::model::Model;
use kiln_compiler::program::{compile, compile_decode};

/// Not `tests/specs/host-mha-learned.toml`: its attention query-gradient kernel (68-wide heads,
/// three accumulators per lane) spills 12 bytes on sm_90a, a finding left for the kernel
/// rework; tests/cuda_host.rs checks its results.
const SPECS: [&str; 13] = [
    "specs/tiny.toml",
    "specs/gpt2-124m.toml",
    "specs/llama3-8b.toml",
    "specs/deepseek-v2-lite.toml",
    "specs/deepseek-v2.toml",
    "specs/deepseek-v3.toml",
    "tests/specs/micro.toml",
    "tests/specs/micro-yarn.toml",
    "tests/specs/gpt2-micro.toml",
    "tests/specs/hostile-name.toml",
    "tests/specs/host-wide-mla.toml",
    "tests/specs/host-lite-softmax.toml",
    "tests/specs/host-gqa.toml",
];

fn model(path: &str) -> Model {
    check(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()).unwrap()
}

fn cuda(path: &str) -> CudaProgram {
    let m = model(path);
    emit(&compile(&m).unwrap().train)
}

fn scratch(test: &str) -> PathBuf {
    common::scratch("cuda_emit", test)
}

/// The parameter list each `extern "C"` kernel of `source` declares, as written.
fn kernel_params(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") else {
            continue;
        };
        let rest = rest
            .trim_start_matches("__launch_bounds__(256, 4) ")
            .trim_start_matches("__launch_bounds__(256) ");
        let (name, params) = rest.split_once('(').unwrap();
        let params = params.rsplit_once(')').unwrap().0;
        out.push((name.to_string(), params.to_string()));
    }
    out
}

/// Each kernel's parameters in the manifest are the ones its source declares, and every
/// launch (of the steps and the optimizer) passes one argument per parameter, of the kind the
/// parameter's type takes.
fn assert_signatures_agree(spec: &str, p: &CudaProgram) {
    let declared = kernel_params(&p.source);
    assert_eq!(
        declared.len(),
        p.kernels.len(),
        "{spec}: one definition per kernel"
    );
    for k in &p.kernels {
        let (_, params) = declared
            .iter()
            .find(|(n, _)| *n == k.name)
            .unwrap_or_else(|| panic!("{spec}: {} is defined", k.name));
        let manifest: Vec<String> = k.params.iter().map(|p| p.c_decl()).collect();
        assert_eq!(*params, manifest.join(", "), "{spec}: {}", k.name);
        assert!(!k.nodes.is_empty(), "{spec}: {} is launched", k.name);
    }
    let launches = p
        .steps
        .iter()
        .flat_map(|s| s.work.iter())
        .filter_map(|w| match w {
            Work::Launch(l) => Some(l),
            _ => None,
        })
        .chain(&p.optimizer);
    for l in launches {
        let k = p
            .kernels
            .iter()
            .find(|k| k.name == l.kernel)
            .unwrap_or_else(|| panic!("{spec}: {} is not in the source", l.kernel));
        assert_eq!(
            l.args.len(),
            k.params.len(),
            "{spec}: arguments of {}",
            l.kernel
        );
        for (param, arg) in k.params.iter().zip(&l.args) {
            let fits = match arg {
                Arg::Int { .. } => param.pass == Pass::Value && param.elem == Elem::I64,
                Arg::Float { .. } | Arg::Hyper { .. } => {
                    param.pass == Pass::Value && param.elem == Elem::F32
                }
                _ => param.pass != Pass::Value,
            };
            assert!(
                fits,
                "{spec}: {} takes {arg:?} for {}",
                l.kernel,
                param.c_decl()
            );
        }
        assert!(l.grid >= 1 && l.block == 256, "{spec}: {}", l.kernel);
    }
}

#[test]
fn the_manifest_matches_the_source() {
    for spec in SPECS {
        let p = cuda(spec);
        assert_signatures_agree(spec, &p);
        let m = model(spec);
        let graph_nodes = compile(&m).unwrap().train.graph().nodes.len();
        assert_eq!(p.steps.len(), graph_nodes, "{spec}: one step per node");
    }
}

/// The manifest states the Program's keep plan, and the plan's backward steps are the ones
/// that read each kept value (directly, or through a reshape's alias).
#[test]
fn the_manifest_keeps_what_the_backward_steps_read() {
    for spec in SPECS {
        let train = compile(&model(spec)).unwrap().train;
        let p = emit(&train);
        assert_eq!(p.keep, Keep::of(train.keep()), "{spec}");
        let boundary = p
            .keep
            .boundary
            .expect("a training step has a backward pass");
        assert!(!p.keep.kept.is_empty(), "{spec}");
        // Each value's buffer: an alias reads its source's.
        let mut buffer: Vec<usize> = (0..train.graph().values.len()).collect();
        for s in &p.steps {
            for w in &s.work {
                if let Work::Alias { of } = w {
                    let node = &train.graph().nodes[kiln_compiler::ir::NodeId::from_index(s.node)];
                    buffer[node.outputs[0].index()] = buffer[*of];
                }
            }
        }
        for k in &p.keep.kept {
            assert!(
                k.after < boundary,
                "{spec}: value {} packed in the forward pass",
                k.value
            );
            let read_after = p.steps.iter().filter(|s| s.node >= boundary).any(|s| {
                s.work.iter().any(|w| match w {
                    Work::Launch(l) => l
                        .args
                        .iter()
                        .any(|a| matches!(a, Arg::Value { id } if buffer[*id] == buffer[k.value])),
                    Work::Gemm(g) => [Some(g.a), Some(g.b), g.bias]
                        .into_iter()
                        .flatten()
                        .any(|v| buffer[v] == buffer[k.value]),
                    Work::GroupedGemm(g) => [&g.a, &g.b]
                        .into_iter()
                        .any(|a| matches!(a, Arg::Value { id } if buffer[*id] == buffer[k.value])),
                    Work::Alias { .. } => false,
                })
            });
            assert!(
                read_after,
                "{spec}: kept value {} is read by the backward steps",
                k.value
            );
        }
    }
}

#[test]
fn every_node_has_its_work() {
    for spec in SPECS {
        let p = cuda(spec);
        for s in &p.steps {
            assert!(
                !s.work.is_empty(),
                "{spec}: {} {} does nothing",
                s.op,
                s.path
            );
        }
        let m = model(spec);
        let routers = p.steps.iter().filter(|s| s.op == "router").count();
        let updates = p
            .optimizer
            .iter()
            .filter(|l| l.kernel == "bias_update")
            .count();
        let gamma = m.moe.as_ref().map_or(0.0, |moe| moe.bias_update);
        assert_eq!(
            updates,
            if gamma > 0.0 { routers } else { 0 },
            "{spec}: bias updates"
        );
    }
}

#[test]
fn generated_cuda_compiles_for_sm_90a_without_spills_or_stack() {
    let Some(nvcc) = nvcc::find_or_skip("generated CUDA compile").unwrap_or_else(|e| panic!("{e}"))
    else {
        return;
    };
    let allow = nvcc::AllowList::load(&nvcc::allowlist_path()).unwrap();
    let dir = scratch("compile");
    for spec in SPECS {
        let p = cuda(spec);
        let name = spec.rsplit('/').next().unwrap().trim_end_matches(".toml");
        let path = dir.join(format!("{name}.cu"));
        std::fs::write(&path, &p.source).unwrap();
        let compiled = nvcc
            .compile(&path, &dir)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        let problems = nvcc::check(&compiled.resources, &allow);
        assert!(problems.is_empty(), "{spec}:\n{}", problems.join("\n"));
        for k in &p.kernels {
            assert!(
                compiled
                    .resources
                    .iter()
                    .any(|r| r.entry && r.name == k.name),
                "{spec}: ptxas reports {}",
                k.name
            );
        }
        if spec == "specs/tiny.toml" {
            let mut rows: Vec<String> = compiled
                .resources
                .iter()
                .filter(|r| r.entry)
                .map(|r| {
                    let f = r.frame.unwrap_or_default();
                    format!(
                        "{:<32} regs {:>3}  smem {:>5}  stack {}  spills {}/{}",
                        r.name,
                        r.registers.unwrap_or(0),
                        r.smem_bytes,
                        r.stack_bytes(),
                        f.spill_store_bytes,
                        f.spill_load_bytes
                    )
                })
                .collect();
            rows.sort();
            insta::assert_snapshot!("cuda-resources-tiny", rows.join("\n"));
        }
    }
}

#[test]
fn generated_cuda_snapshots() {
    insta::assert_snapshot!("emit-cuda-tiny", cuda("specs/tiny.toml").source);
    insta::assert_snapshot!("emit-cuda-gpt2-124m", cuda("specs/gpt2-124m.toml").source);
}

#[test]
fn fp8_copies_are_written_once_before_their_readers() {
    let mut planned = 0;
    for spec in SPECS {
        let p = cuda(spec);
        planned += p.fp8_copies.len();
        let step_of = |node: usize| p.steps.iter().find(|s| s.node == node).unwrap();
        for (i, c) in p.fp8_copies.iter().enumerate() {
            let what = format!("{spec}: copy {i} of %{}", c.value);
            // Exactly one launch writes it, in the writer's step.
            let writes: Vec<(usize, &str)> = p
                .steps
                .iter()
                .flat_map(|s| s.work.iter().map(move |w| (s.node, w)))
                .filter_map(|(node, w)| match w {
                    Work::Launch(l) => Some((node, l)),
                    _ => None,
                })
                .filter(|(_, l)| {
                    let scales = c.outer.div_ceil(c.block[0]) * c.k.div_ceil(c.block[1]);
                    l.args.contains(&Arg::Fp8Codes {
                        copy: i,
                        bytes: c.outer * c.k,
                    }) && l.args.contains(&Arg::Fp8Scales {
                        copy: i,
                        bytes: 4 * scales,
                    })
                })
                .map(|(node, l)| (node, l.kernel.as_str()))
                .collect();
            assert_eq!(writes.len(), 1, "{what}: written by {writes:?}");
            let (node, kernel) = writes[0];
            assert_eq!(node, c.writer, "{what}: written in its writer's step");
            assert_eq!(
                kernel.starts_with("fp8_"),
                !c.fused,
                "{what}: {kernel} (fused {})",
                c.fused
            );
            // Readers come at or after the writer, in order, and each has a GEMM on the copy.
            assert!(!c.readers.is_empty(), "{what}: no reader");
            assert!(c.readers.windows(2).all(|w| w[0] < w[1]), "{what}");
            assert!(c.writer <= c.readers[0], "{what}: read before written");
            let first = match c.pair {
                // A weight's two layouts are written together, at the first reader of either.
                Some(t) => {
                    let pair = &p.fp8_copies[t];
                    assert_eq!(pair.pair, Some(i), "{what}: pairs pair");
                    assert_eq!((pair.value, pair.writer), (c.value, c.writer), "{what}");
                    assert_ne!(pair.transposed, c.transposed, "{what}");
                    c.readers[0].min(pair.readers[0])
                }
                None => c.readers[0],
            };
            assert_eq!(c.fused, c.writer < first, "{what}");
            for &r in &c.readers {
                let reads = step_of(r).work.iter().any(|w| {
                    let Work::Gemm(g) = w else { return false };
                    let Some(f) = &g.fp8 else { return false };
                    [&f.a.codes, &f.b.codes]
                        .into_iter()
                        .any(|a| matches!(a, Arg::Fp8Codes { copy, .. } if *copy == i))
                });
                assert!(reads, "{what}: node {r} does not read it");
            }
        }
        // Every FP8 GEMM reads its left operand from a copy exactly when it reads it as stored,
        // its right one exactly when it is a weight (the forward and input-gradient GEMMs),
        // and only its planned readers read a copy.
        for s in &p.steps {
            for w in &s.work {
                let Work::Gemm(g) = w else { continue };
                let Some(f) = &g.fp8 else { continue };
                match f.a.codes {
                    Arg::Fp8Codes { copy, .. } => {
                        assert!(!g.a_trans, "{spec}: node {}", s.node);
                        assert!(p.fp8_copies[copy].readers.contains(&s.node));
                    }
                    _ => assert!(
                        g.a_trans,
                        "{spec}: node {} quantizes a stored operand itself",
                        s.node
                    ),
                }
                match f.b.codes {
                    Arg::Fp8Codes { copy, .. } => {
                        let c = &p.fp8_copies[copy];
                        assert_eq!(c.value, g.b, "{spec}: node {}", s.node);
                        assert_eq!(c.transposed, !g.b_trans, "{spec}: node {}", s.node);
                        assert!(c.readers.contains(&s.node));
                    }
                    _ => assert!(
                        g.a_trans,
                        "{spec}: node {} quantizes a weight itself",
                        s.node
                    ),
                }
            }
        }
    }
    assert!(planned > 0, "some spec has FP8 GEMMs");
}

/// Tiny's FP8 copies: each line says what is quantized (ᵀ: transposed), where, and which GEMMs
/// read it.
#[test]
fn fp8_copies_snapshot() {
    let m = model("specs/tiny.toml");
    let compiled = compile(&m).unwrap();
    let graph = compiled.train.graph();
    let p = emit(&compiled.train);
    let path = |node: usize| {
        p.steps
            .iter()
            .find(|s| s.node == node)
            .unwrap()
            .path
            .clone()
    };
    let mut rows = vec![format!(
        "{} copies, {} fused into their producer, {} GEMM operands read from them",
        p.fp8_copies.len(),
        p.fp8_copies.iter().filter(|c| c.fused).count(),
        p.fp8_copies.iter().map(|c| c.readers.len()).sum::<usize>()
    )];
    for c in &p.fp8_copies {
        let value = kiln_compiler::ir::ValueId::from_index(c.value);
        let written = match (c.fused, c.pair) {
            (true, _) => format!("fused into {}", path(c.writer)),
            (false, None) => format!("quantized at {}", path(c.writer)),
            (false, Some(_)) => format!("quantized with its pair at {}", path(c.writer)),
        };
        let readers: Vec<String> = c.readers.iter().map(|&r| path(r)).collect();
        rows.push(format!(
            "%{} {:?}{} {} [{}, {}] {written}; read by {}",
            c.value,
            graph.values[value].ty.shape,
            if c.transposed { "ᵀ" } else { "" },
            c.format.name(),
            c.outer,
            c.k,
            readers.join(", ")
        ));
    }
    insta::assert_snapshot!("fp8-copies-tiny", rows.join("\n"));
}

/// The unit a user gets from `kiln emit cuda` builds in a whole nvcc compile too (host and
/// device passes, as `nvcc -c` runs them; kiln itself builds device code only), without a
/// warning: no unread temporaries in the gradient kernels, no device-only call from host code.
#[test]
fn generated_cuda_builds_warning_free_with_nvcc_c() {
    let Some(nvcc) = common::nvcc("whole nvcc compile") else {
        return;
    };
    let dir = scratch("whole");
    let path = dir.join("tiny.cu");
    std::fs::write(&path, cuda("specs/tiny.toml").source).unwrap();
    let out = common::nvcc_command(&nvcc, &["-c", nvcc::GENCODE], &dir.join("tiny.o"), &path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("warning"), "{said}");
}

/// The decode step (`compile_decode`) of tiny and of DeepSeek-V3's shapes (latent caches), of
/// Llama 3 8B (grouped) and GPT-2 124M (multi-head, learned positions): every node has its
/// work and every launch names a kernel of the unit with as many arguments as it declares;
/// cached attention runs one block per (row, head), RoPE at positions reads a table covering
/// the cache, each block's KV cache input is passed like any other value; and the unit
/// compiles for sm_90a without spills or a stack frame.
#[test]
fn decode_step_emits_and_compiles_for_sm_90a_without_spills_or_stack() {
    let compiler = common::nvcc("decode step CUDA compile");
    let allow = nvcc::AllowList::load(&nvcc::allowlist_path()).unwrap();
    let dir = scratch("decode");
    for (spec, rows, capacity) in [
        ("specs/tiny.toml", 4, 256),
        ("specs/deepseek-v3.toml", 8, 4096),
        ("specs/llama3-8b.toml", 8, 8192),
        ("specs/gpt2-124m.toml", 8, 1024),
    ] {
        let m = model(spec);
        let program = compile_decode(&m, rows, capacity).unwrap();
        let graph = program.graph();
        let p = emit(&program);
        assert!(
            p.source.contains("the kernels of one\n// decode step"),
            "{spec}"
        );
        assert!(p.optimizer.is_empty(), "{spec}: decoding trains nothing");
        assert_eq!(
            p.steps.len(),
            graph.nodes.len(),
            "{spec}: one step per node"
        );
        assert_signatures_agree(spec, &p);
        let launches: Vec<_> = p
            .steps
            .iter()
            .flat_map(|s| {
                assert!(
                    !s.work.is_empty(),
                    "{spec}: {} {} does nothing",
                    s.op,
                    s.path
                );
                s.work.iter().filter_map(move |w| match w {
                    Work::Launch(l) => Some((s, l)),
                    _ => None,
                })
            })
            .collect();
        for (s, l) in &launches {
            if s.op == "cached_attention" {
                assert_eq!(l.grid, rows * m.attention.heads, "{spec}: {}", s.path);
            }
        }
        let attention = p.steps.iter().filter(|s| s.op == "cached_attention");
        assert_eq!(attention.count(), m.layers.len(), "{spec}");
        let rotary = m.positions == kiln_compiler::model::Positions::Rope;
        assert_eq!(p.steps.iter().any(|s| s.op == "rope_at"), rotary, "{spec}");
        assert!(
            p.rope_tables.iter().all(|t| t.seq == capacity),
            "{spec}: RoPE tables cover the cache"
        );
        for (v, value) in graph.values.iter() {
            if let Def::Input(InputKind::KvCache { layer }) = value.def {
                let read = launches
                    .iter()
                    .any(|(_, l)| l.args.contains(&Arg::Value { id: v.index() }));
                assert!(read, "{spec}: the KV cache of block {layer} is read");
            }
        }
        let Some(compiler) = &compiler else { continue };
        let name = spec.rsplit('/').next().unwrap().trim_end_matches(".toml");
        let path = dir.join(format!("{name}-decode.cu"));
        std::fs::write(&path, &p.source).unwrap();
        let compiled = compiler
            .compile(&path, &dir)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        let problems = nvcc::check(&compiled.resources, &allow);
        assert!(problems.is_empty(), "{spec}:\n{}", problems.join("\n"));
        for k in &p.kernels {
            assert!(
                compiled
                    .resources
                    .iter()
                    .any(|r| r.entry && r.name == k.name),
                "{spec}: ptxas reports {}",
                k.name
            );
        }
        for r in compiled.resources.iter().filter(|r| {
            r.entry && (r.name.starts_with("cached_attention") || r.name.starts_with("rope_at"))
        }) {
            println!(
                "{spec}: {} regs {} smem {}",
                r.name,
                r.registers.unwrap_or(0),
                r.smem_bytes
            );
        }
    }
}
