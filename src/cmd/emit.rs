//! `kiln emit ir|rust|cuda`: what kiln compiles a spec to, printed or written to a directory.

use std::path::PathBuf;

use kiln_compiler::{program, report};

use crate::output::out;
use crate::spec::load;
use crate::{fsutil, nvcc, Failure, Pass};

pub(crate) fn ir(spec: Option<PathBuf>, after: Pass, color: bool) -> Result<(), Failure> {
    let (_, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let pass = match after {
        Pass::Lower => program::Pass::Lower,
        Pass::Autodiff => program::Pass::Autodiff,
        Pass::Fuse | Pass::Plan => program::Pass::Fuse,
    };
    let graph = program::graph_after(&model, pass).map_err(|e| Failure::Other(e.to_string()))?;
    out(&graph.to_string());
    if after == Pass::Plan {
        let program = program::Program::new(graph, program::Settings::of(&model))
            .map_err(|e| Failure::Other(e.to_string()))?;
        let plan = program.plan();
        let mut text = String::from("plan\n");
        for (v, off) in plan.offsets.iter().enumerate() {
            if let (Some(off), Some((first, last))) = (off, plan.lifetimes[v]) {
                text.push_str(&format!(
                    "  %{v}: {} bytes at {off}, nodes {first}..={last}\n",
                    plan.sizes[v]
                ));
            }
        }
        let report = kiln_compiler::analyze::analyze(&model);
        text.push_str(&format!(
            "planned peak of intermediates: {} ({} bytes; {} without reuse)\n\
             analyzer's activation estimate: {} ({} bytes; stored formats, saved tensors only)\n",
            report::bytes_h(u128::from(plan.peak_bytes)),
            plan.peak_bytes,
            report::bytes_h(u128::from(plan.total_bytes)),
            report::bytes_h(report.memory.activations_bytes),
            report.memory.activations_bytes
        ));
        out(&text);
    }
    Ok(())
}

pub(crate) fn rust(spec: Option<PathBuf>, color: bool) -> Result<(), Failure> {
    let (_, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let compiled = program::compile(&model).map_err(|e| Failure::Other(e.to_string()))?;
    let text = kiln_compiler::emit_rust::emit_text(&compiled).map_err(Failure::Other)?;
    out(&text);
    Ok(())
}

pub(crate) fn hf_config(spec: Option<PathBuf>, color: bool) -> Result<(), Failure> {
    let (name, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let config = kiln_compiler::hf::export_config(&model)
        .map_err(|e| Failure::Other(format!("{name}: {e}")))?;
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Failure::Other(format!("cannot encode config.json: {e}")))?;
    out(&format!("{text}\n"));
    Ok(())
}

pub(crate) fn cuda(
    spec: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    check: bool,
    color: bool,
) -> Result<(), Failure> {
    use kiln_compiler::emit_cuda;
    let (_, model) = load(spec.as_ref(), &mut Vec::new(), color)?;
    let compiled = program::compile(&model).map_err(|e| Failure::Other(e.to_string()))?;
    let cuda = emit_cuda::emit(&compiled.train);
    let unit = format!(
        "{}.cu",
        kiln_compiler::names::ident(&model.name, kiln_compiler::names::Lang::Cuda)
    );
    if check {
        let nvcc = nvcc::find().map_err(|e| Failure::Other(e.to_string()))?;
        let dir = std::env::temp_dir().join(format!("kiln-emit-cuda-{}", std::process::id()));
        fsutil::create_dir(&dir)?;
        let path = dir.join(&unit);
        let result = fsutil::write(&path, cuda.source.as_bytes()).and_then(|()| {
            nvcc.compile(&path, &dir)
                .map_err(|e| Failure::Other(e.to_string()))
        });
        let _ = std::fs::remove_dir_all(&dir);
        let compiled = result?;
        let allow = nvcc::AllowList::load(&nvcc::allowlist_path()).map_err(Failure::Other)?;
        let mut table = format!(
            "{:<40} {:>5} {:>7} {:>6} {:>7}\n",
            "kernel (sm_90a)", "regs", "smem", "stack", "spills"
        );
        for k in compiled.resources.iter().filter(|k| k.entry) {
            let spills = k
                .frame
                .map_or(0, |f| f.spill_store_bytes + f.spill_load_bytes);
            table.push_str(&format!(
                "{:<40} {:>5} {:>7} {:>6} {:>7}\n",
                k.readable,
                k.registers.map_or("?".into(), |r| r.to_string()),
                k.smem_bytes,
                k.stack_bytes(),
                spills
            ));
        }
        eprint!("{table}");
        let problems = nvcc::check(&compiled.resources, &allow);
        if !problems.is_empty() {
            return Err(Failure::Other(problems.join("\n")));
        }
    }
    match out_dir {
        None => out(&cuda.source),
        Some(dir) => {
            fsutil::fresh_dir(&dir)?;
            let manifest = serde_json::to_vec_pretty(&cuda)
                .map_err(|e| Failure::Other(format!("cannot encode the manifest: {e}")))?;
            let mut files = vec![
                (unit.as_str(), cuda.source.clone().into_bytes()),
                ("manifest.json", manifest),
            ];
            for (name, text) in emit_cuda::HEADERS {
                files.push((name, text.as_bytes().to_vec()));
            }
            fsutil::write_dir(&dir, &files)?;
            let launches = cuda
                .steps
                .iter()
                .flat_map(|s| &s.work)
                .filter(|w| matches!(w, emit_cuda::Work::Launch(_)))
                .count();
            let copies = if cuda.fp8_copies.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} FP8 copies, {} of them fused into their producers",
                    cuda.fp8_copies.len(),
                    cuda.fp8_copies.iter().filter(|c| c.fused).count()
                )
            };
            eprintln!(
                "wrote {}: {unit} ({} kernels), manifest.json ({} steps, {launches} launches, \
                 {} optimizer launches{copies})",
                dir.display(),
                cuda.kernels.len(),
                cuda.steps.len(),
                cuda.optimizer.len()
            );
        }
    }
    Ok(())
}
