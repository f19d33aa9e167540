//! Diagnostics: what the checker reports, and their rustc-style rendering.
//!
//! A [`Diagnostic`] is plain data (byte spans into the spec text, a rule, messages); rendering
//! to text happens only in [`render`], so tests can assert on either.

use std::fmt;
use std::ops::Range;

/// The rule a diagnostic reports as broken. Its name appears in the rendered header as
/// `[name] Error:` and is listed in `docs/spec.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// The file is not UTF-8 or not TOML.
    Syntax,
    UnknownSection,
    UnknownKey,
    MissingKey,
    /// A value has the wrong TOML type.
    Type,
    /// A string is not one of the accepted names.
    UnknownValue,
    /// A number lies outside its accepted range.
    Range,
    /// A DSL string (layer stack, activation, pattern) does not parse.
    Dsl,
    /// One value must divide another.
    Divisible,
    /// A value is limited by another value.
    Bound,
    /// Keys or sections that contradict each other or have no effect together.
    Conflict,
    /// An FP8 GEMM dimension is not a multiple of its tile or block.
    Fp8Tile,
    /// A precision pattern selects no op of the model.
    UnmatchedPattern,
    /// A `[parallel]` layout that does not fit the model or its batch.
    Layout,
    /// An `extends` that names no readable spec, or a chain that loops.
    Extends,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::UnknownSection => "unknown-section",
            Rule::UnknownKey => "unknown-key",
            Rule::MissingKey => "missing-key",
            Rule::Type => "type",
            Rule::UnknownValue => "unknown-value",
            Rule::Range => "range",
            Rule::Dsl => "dsl",
            Rule::Divisible => "divisible",
            Rule::Bound => "bound",
            Rule::Conflict => "conflict",
            Rule::Fp8Tile => "fp8-tile",
            Rule::Layout => "layout",
            Rule::Extends => "extends",
            Rule::UnmatchedPattern => "unmatched-pattern",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One error in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub rule: Rule,
    /// The headline, e.g. "unknown key `kv_rnk` in \[attention\]".
    pub message: String,
    /// Byte range in the spec text the error is about (the primary label).
    pub span: Range<usize>,
    /// Text under the primary underline.
    pub label: String,
    /// Further places that explain the error, with their own text.
    pub related: Vec<(Range<usize>, String)>,
    /// A suggestion, e.g. "did you mean `kv_rank`?".
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(
        rule: Rule,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Self {
        Diagnostic {
            rule,
            message: message.into(),
            span,
            label: label.into(),
            related: Vec::new(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_help_opt(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    pub fn with_related(mut self, span: Range<usize>, text: impl Into<String>) -> Self {
        self.related.push((span, text.into()));
        self
    }

    /// 1-based line and column (in chars) of the primary span's start.
    pub fn line_col(&self, text: &str) -> (usize, usize) {
        line_col(text, self.span.start)
    }
}

/// 1-based line and column (counted in chars) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Renders diagnostics like rustc: `[rule] Error: message`, then `file:line:col`, the source line
/// with an underline and label, related labels, and help. `color` adds ANSI colors.
pub fn render(file: &str, text: &str, diags: &[Diagnostic], color: bool) -> String {
    crate::source::SpecSource::single(file, text).render(diags, color)
}
