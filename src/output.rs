//! What the commands print: stdout that survives a closed pipe, and indented JSON documents.

use serde::Serialize;

use crate::{other, Failure};

/// Writes to stdout. A closed pipe (`kiln check … | head`) ends the process quietly instead of
/// panicking as `print!` would.
pub(crate) fn out(s: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Prints `value` as indented JSON and a newline; `what` names it in the error.
pub(crate) fn print_pretty(value: &impl Serialize, what: &str) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| other(format!("cannot encode the {what}: {e}")))?;
    out(&format!("{s}\n"));
    Ok(())
}
