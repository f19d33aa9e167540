//! The CUDA emitter (`kiln emit cuda`), checked without a GPU:
//!
//! - tier 3: the generated translation unit of every reference spec compiles with nvcc for
//!   sm_90a, and no kernel spills registers or has a stack frame the allow-list does not name;
//!   the resource report for `tiny` is a snapshot, so a regression shows in review;
//! - the manifest agrees with the source: every launch names a kernel of the unit and passes
//!   exactly as many arguments as the kernel declares; every node has its step and work, and
//!   every router its bias update;
//! - snapshots of the generated CUDA for `tiny` and `gpt2-124m`.
//!
//! Without nvcc the compile test fails with `nvcc::find`'s message (run
//! `scripts/cuda-toolchain`); `KILN_SKIP_CUDA_COMPILE=1` skips it.

use std::path::{Path, PathBuf};

use kiln::nvcc;
use kiln_compiler::check::check;
use kiln_compiler::emit_cuda::{emit, CudaProgram, Work};
use kiln_compiler::model::Model;
use kiln_compiler::program::compile;

const SPECS: [&str; 10] = [
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
];

fn model(path: &str) -> Model {
    check(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()).unwrap()
}

fn cuda(path: &str) -> CudaProgram {
    let m = model(path);
    emit(&m, &compile(&m).unwrap().train)
}

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda_emit")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number of parameters each `extern "C"` kernel of `source` declares.
fn kernel_arities(source: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") else {
            continue;
        };
        let rest = rest.trim_start_matches("__launch_bounds__(256) ");
        let (name, params) = rest.split_once('(').unwrap();
        let params = params.rsplit_once(')').unwrap().0;
        out.push((name.to_string(), params.split(',').count()));
    }
    out
}

#[test]
fn the_manifest_matches_the_source() {
    for spec in SPECS {
        let p = cuda(spec);
        let arities = kernel_arities(&p.source);
        assert_eq!(
            arities.len(),
            p.kernels.len(),
            "{spec}: one definition per kernel"
        );
        for k in &p.kernels {
            assert!(
                arities.iter().any(|(n, _)| *n == k.name),
                "{spec}: {} is defined",
                k.name
            );
            assert!(!k.nodes.is_empty(), "{spec}: {} is launched", k.name);
        }
        let m = model(spec);
        let graph_nodes = compile(&m).unwrap().train.graph().nodes.len();
        assert_eq!(p.steps.len(), graph_nodes, "{spec}: one step per node");
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
            let (_, arity) = arities
                .iter()
                .find(|(n, _)| *n == l.kernel)
                .unwrap_or_else(|| panic!("{spec}: {} is not in the source", l.kernel));
            assert_eq!(l.args.len(), *arity, "{spec}: arguments of {}", l.kernel);
            assert!(l.grid >= 1 && l.block == 256, "{spec}: {}", l.kernel);
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
