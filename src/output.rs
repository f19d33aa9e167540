//! What the commands print and the JSON they write: stdout that survives a closed pipe, and
//! JSON documents made by serde_json, so a string is always escaped and a number that is not
//! finite is `null` (JSON has no NaN or infinity).

use serde::Serialize;
use serde_json::value::RawValue;

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

/// `value` as one line of JSON (a `metrics.jsonl` row, a `--json` line), without the newline.
pub(crate) fn line(value: &impl Serialize) -> String {
    // Serializing plain structs, maps of strings and numbers cannot fail.
    serde_json::to_string(value).expect("a JSON row serializes")
}

/// A number for a JSON document, written as `text` writes it (a fixed number of digits, as
/// users' scripts have always read it), or `null` when it is not finite.
pub(crate) fn number(x: f64, text: impl FnOnce(f64) -> String) -> Box<RawValue> {
    let text = if x.is_finite() {
        text(x)
    } else {
        "null".to_string()
    };
    RawValue::from_string(text).expect("a finite f64 formats as a JSON number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_format_and_non_finite_ones_are_null() {
        let six = |x: f64| format!("{x:.6}");
        assert_eq!(number(2.5, six).get(), "2.500000");
        assert_eq!(number(3e-4, |x| format!("{x:.6e}")).get(), "3.000000e-4");
        assert_eq!(number(-0.0, six).get(), "-0.000000");
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(number(x, six).get(), "null");
        }
    }
}
