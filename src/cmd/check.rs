//! `kiln check`: a spec's diagnostics, or its report (parameters, FLOPs, KV cache, memory) as
//! text or JSON.

use std::path::PathBuf;

use kiln_compiler::analyze::analyze;
use kiln_compiler::report;

use crate::output::{out, print_pretty};
use crate::spec::{load, print_errors_json};
use crate::Failure;

pub(crate) fn run(spec: Option<PathBuf>, json: bool, color: bool) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let loaded = load(spec.as_ref(), &mut errors, color);
    print_errors_json(json, errors);
    let (_, model) = loaded?;
    let r = analyze(&model);
    if json {
        print_pretty(&r, "report")?;
    } else {
        out(&report::render(&r));
    }
    Ok(())
}
