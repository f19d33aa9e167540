//! `kiln check`: a spec's diagnostics, or its report (parameters, FLOPs, KV cache, memory, and
//! for a parallel layout the per-device figures) as text or JSON.

use std::path::PathBuf;

use kiln_compiler::analyze::{analyze, with_layout};
use kiln_compiler::report;

use super::layout::LayoutArgs;
use crate::output::{out, print_pretty};
use crate::spec::{load, print_errors_json};
use crate::Failure;

pub(crate) fn run(
    spec: Option<PathBuf>,
    json: bool,
    layout: &LayoutArgs,
    color: bool,
) -> Result<(), Failure> {
    let mut errors = Vec::new();
    let loaded = load(spec.as_ref(), &mut errors, color);
    print_errors_json(json, errors);
    let (_, mut model) = loaded?;
    layout.apply(&mut model)?;
    let r = match layout.cluster(&model, false)? {
        Some(c) => with_layout(&model, &c),
        None => analyze(&model),
    };
    if json {
        print_pretty(&r, "report")?;
    } else {
        out(&report::render(&r));
    }
    Ok(())
}
