//! A spec as the checker reads it, and where each of its bytes came from.
//!
//! The checker reads one TOML text. A spec that `extends` another, or a command line with
//! `--set` overrides, gives a *resolved* text assembled from several sources: the files of the
//! `extends` chain and the overrides. [`SpecSource`] holds that text with a map from each of its
//! byte ranges back to the source that wrote it, so a diagnostic (whose spans index the
//! resolved text) is rendered at the line of the file that holds the offending key.
//!
//! The resolved text is built by [`SpecSource::apply`]: each key of an overriding source
//! replaces the base's `key = value` (or is added under its section, or in a new section at the
//! end), copied verbatim from its source so the map is exact. Bytes no source wrote (the
//! brackets of a new section's header, line breaks) map to no source; a diagnostic there is
//! shown against the resolved text itself.

use std::ops::Range;

use ariadne::{Config, IndexType, Label, Report, ReportKind};

use crate::diag::{Diagnostic, Rule};

/// One source of spec text: a file of the `extends` chain, or the `--set` overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// What diagnostics call it: a path as the user wrote it, or `--set`.
    pub name: String,
    pub text: String,
}

/// A byte range of the resolved text and the source position its first byte came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    start: usize,
    len: usize,
    /// `(file, offset)`: the segment is `files[file].text[offset..offset + len]`.
    origin: Option<(usize, usize)>,
}

/// A piece of text to place in the resolved text, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// `(file, offset)` of its first byte; `None` for text no source wrote.
    pub origin: Option<(usize, usize)>,
}

impl Piece {
    /// Text no source wrote.
    pub fn synthetic(text: impl Into<String>) -> Self {
        Piece {
            text: text.into(),
            origin: None,
        }
    }
}

/// Where a span of the resolved text lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In `files[file]`, at this range of its text.
    File(usize, Range<usize>),
    /// In bytes no source wrote; the range is in the resolved text.
    Resolved(Range<usize>),
}

/// A spec's resolved text and the sources it came from.
#[derive(Clone, Debug)]
pub struct SpecSource {
    /// What the footer of a rendering names: the spec the user gave, with its overrides.
    name: String,
    text: String,
    files: Vec<SourceFile>,
    segments: Vec<Segment>,
}

impl SpecSource {
    /// A spec that is one file, as written.
    pub fn single(name: impl Into<String>, text: impl Into<String>) -> Self {
        let name = name.into();
        let text = text.into();
        let segments = vec![Segment {
            start: 0,
            len: text.len(),
            origin: Some((0, 0)),
        }];
        SpecSource {
            files: vec![SourceFile {
                name: name.clone(),
                text: text.clone(),
            }],
            name,
            text,
            segments,
        }
    }

    /// The text the checker reads.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The name renderings give the spec as a whole.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// The sources, in the order they were added (the root of the `extends` chain first).
    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// Adds a source whose pieces [`Self::replace`] can then place; returns its index.
    pub fn add_file(&mut self, name: impl Into<String>, text: impl Into<String>) -> usize {
        self.files.push(SourceFile {
            name: name.into(),
            text: text.into(),
        });
        self.files.len() - 1
    }

    /// `files[file].text[range]`, as a piece that maps back to it.
    pub fn piece(&self, file: usize, range: Range<usize>) -> Piece {
        Piece {
            text: self.files[file].text[range.clone()].to_string(),
            origin: Some((file, range.start)),
        }
    }

    /// Appends a line to the source named `name` (added if absent, as the `--set` overrides
    /// are); returns the source and the line's offset in it.
    pub fn append_line(&mut self, name: &str, line: &str) -> (usize, usize) {
        let file = match self.files.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => self.add_file(name, ""),
        };
        let text = &mut self.files[file].text;
        let at = text.len();
        text.push_str(line);
        text.push('\n');
        (file, at)
    }

    /// Replaces `at` of the resolved text with `pieces`, in order, keeping the map exact.
    pub fn replace(&mut self, at: Range<usize>, pieces: &[Piece]) {
        let inserted: usize = pieces.iter().map(|p| p.text.len()).sum();
        let mut segments = Vec::with_capacity(self.segments.len() + pieces.len() + 1);
        for s in &self.segments {
            let end = s.start + s.len;
            if s.start < at.start {
                let len = end.min(at.start) - s.start;
                segments.push(Segment { len, ..*s });
            }
        }
        let mut pos = at.start;
        for p in pieces.iter().filter(|p| !p.text.is_empty()) {
            segments.push(Segment {
                start: pos,
                len: p.text.len(),
                origin: p.origin,
            });
            pos += p.text.len();
        }
        for s in &self.segments {
            let end = s.start + s.len;
            if end > at.end {
                let from = s.start.max(at.end);
                segments.push(Segment {
                    start: from - at.end + pos,
                    len: end - from,
                    origin: s.origin.map(|(f, o)| (f, o + from - s.start)),
                });
            }
        }
        let mut text = String::with_capacity(self.text.len() + inserted);
        text.push_str(&self.text[..at.start]);
        for p in pieces {
            text.push_str(&p.text);
        }
        text.push_str(&self.text[at.end..]);
        self.text = text;
        self.segments = segments;
        debug_assert_eq!(
            self.segments.iter().map(|s| s.len).sum::<usize>(),
            self.text.len()
        );
    }

    /// Where a span of the resolved text came from. A span that starts in one source and runs
    /// past the bytes it wrote is cut at their end.
    pub fn locate(&self, span: &Range<usize>) -> Location {
        let start = span.start.min(self.text.len());
        // The segment holding `start`; an empty span at a segment's end belongs to it.
        let seg = self
            .segments
            .iter()
            .find(|s| start < s.start + s.len || (start == s.start + s.len && span.is_empty()))
            .or(self.segments.last());
        match seg {
            Some(Segment {
                start: s,
                len,
                origin: Some((file, offset)),
            }) => {
                let end = span.end.clamp(start, s + len);
                File(*file, offset + start - s..offset + end - s)
            }
            _ => Location::Resolved(span.clone()),
        }
    }

    /// Renders diagnostics (spans in the resolved text) like rustc, each at the file and line
    /// that holds it, then a count: `N errors in NAME`.
    pub fn render(&self, diags: &[Diagnostic], color: bool) -> String {
        let resolved = format!("{} (resolved)", self.name);
        // A location as ariadne takes it, and the source's index (the resolved text last).
        let id = |loc: Location| -> (usize, (String, Range<usize>)) {
            match loc {
                File(f, r) => (
                    f,
                    (self.files[f].name.clone(), clamp(&self.files[f].text, &r)),
                ),
                Location::Resolved(r) => {
                    (self.files.len(), (resolved.clone(), clamp(&self.text, &r)))
                }
            }
        };
        let mut cache = ariadne::sources(
            self.files
                .iter()
                .map(|f| (f.name.clone(), f.text.clone()))
                .chain([(resolved.clone(), self.text.clone())]),
        );
        let config = Config::default()
            .with_color(color)
            .with_index_type(IndexType::Byte)
            .with_compact(false);
        let mut out = Vec::new();
        for d in diags {
            let (first, primary) = id(self.locate(&d.span));
            // Labels in the primary's source come first, each source's in position order.
            let rank = |f: usize| if f == first { 0 } else { f + 1 };
            let mut report = Report::build(ReportKind::Error, primary.clone())
                .with_config(config)
                .with_code(d.rule)
                .with_message(&d.message)
                .with_label(label(0, primary, &d.label));
            for (span, msg) in &d.related {
                let (f, at) = id(self.locate(span));
                report = report.with_label(label(rank(f), at, msg));
            }
            if let Some(help) = &d.help {
                report = report.with_help(help);
            }
            // Writing into a Vec cannot fail.
            let _ = report.finish().write(&mut cache, &mut out);
        }
        let mut s = String::from_utf8_lossy(&out).into_owned();
        let n = diags.len();
        s.push_str(&format!(
            "{n} error{} in {}\n",
            if n == 1 { "" } else { "s" },
            self.name
        ));
        s
    }

    /// The JSON form of diagnostics, one object per error, each naming the file and the
    /// 1-based line and column that hold it.
    pub fn errors_json(&self, diags: &[Diagnostic]) -> Vec<serde_json::Value> {
        diags
            .iter()
            .map(|d| {
                let (file, text, span) = match self.locate(&d.span) {
                    File(f, r) => (self.files[f].name.as_str(), &self.files[f].text, r),
                    Location::Resolved(r) => (self.name.as_str(), &self.text, r),
                };
                let (line, col) = crate::diag::line_col(text, span.start);
                serde_json::json!({
                    "rule": d.rule.name(),
                    "message": d.message,
                    "file": file,
                    "line": line,
                    "col": col,
                    "span": [span.start, span.end],
                    "label": d.label,
                    "help": d.help,
                })
            })
            .collect()
    }
}

use Location::File;

/// Clamps a span into `text` on char boundaries, so rendering never panics on odd spans.
fn clamp(text: &str, span: &Range<usize>) -> Range<usize> {
    let floor = |mut i: usize| {
        i = i.min(text.len());
        while i > 0 && !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = floor(span.start);
    start..floor(span.end).max(start)
}

/// A label ordered by its source's rank, then its position: ariadne starts a new snippet
/// (under a header repeating the primary location) whenever a label's line precedes the
/// previous one's, and shows snippets in label order.
fn label(rank: usize, at: (String, Range<usize>), msg: &str) -> Label<(String, Range<usize>)> {
    const POSITIONS: usize = 1 << 20;
    let order = rank.saturating_mul(POSITIONS) + at.1.start.min(POSITIONS - 1);
    let order = i32::try_from(order).unwrap_or(i32::MAX);
    Label::new(at).with_message(msg).with_order(order)
}

/// A diagnostic about the `extends` chain itself, at `span` of the file that holds it.
pub(crate) fn extends_error(span: Range<usize>, message: String, label: &str) -> Diagnostic {
    Diagnostic::new(Rule::Extends, span, message, label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_keeps_every_byte_mapped_to_its_source() {
        let mut s = SpecSource::single("base.toml", "[a]\nx = 1\ny = 2\n");
        let child = s.add_file("child.toml", "[a]\nx = 10\n");
        // Replace `x = 1` (bytes 4..9) with the child's `x = 10` (bytes 4..10 there).
        s.replace(4..9, &[s.piece(child, 4..10)]);
        assert_eq!(s.text(), "[a]\nx = 10\ny = 2\n");
        // `10` in the resolved text is the child's `10`; `2` is still the base's.
        assert_eq!(s.locate(&(8..10)), File(child, 8..10));
        assert_eq!(s.locate(&(15..16)), File(0, 14..15));
        // A span running past the child's bytes is cut at their end.
        assert_eq!(s.locate(&(8..16)), File(child, 8..10));
        s.replace(0..0, &[Piece::synthetic("# top\n")]);
        assert_eq!(s.locate(&(0..3)), Location::Resolved(0..3));
        assert_eq!(s.locate(&(14..16)), File(child, 8..10));
    }

    #[test]
    fn a_diagnostic_renders_in_the_file_that_holds_it() {
        let mut s = SpecSource::single("base.toml", "[a]\nx = 1\ny = 2\n");
        let child = s.add_file("child.toml", "# mine\n[a]\nx = 10\n");
        s.replace(4..9, &[s.piece(child, 11..17)]);
        let d = Diagnostic::new(Rule::Range, 8..10, "x is too big", "here");
        let text = s.render(std::slice::from_ref(&d), false);
        assert!(text.contains("child.toml:3:5"), "{text}");
        assert!(text.ends_with("1 error in base.toml\n"), "{text}");
        let json = s.errors_json(&[d]);
        assert_eq!(json[0]["file"], "child.toml");
        assert_eq!(json[0]["line"], 3);
    }
}
