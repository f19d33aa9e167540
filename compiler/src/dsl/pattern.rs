//! Op-selection patterns for the precision policy, such as `"attn.*.proj"`.
//!
//! Every op in a model has a dotted path such as `embed`, `layers.3.attn.q_a`,
//! `layers.5.moe.experts.up`, `final.norm` or `mtp.0.eh_proj`. A pattern is a dotted list of
//! segments, each either `**` or a glob made of letters, digits, `_` and `*`.
//!
//! # Matching
//!
//! - A glob segment matches one path segment. Each `*` in it matches any run of characters,
//!   possibly empty, within that segment; every other character matches itself. So `*norm`
//!   matches `q_norm` and `norm`, and `1*` matches `1`, `10` and `19` but not `21`.
//! - A `**` segment matches zero or more whole path segments.
//! - A pattern matches a path when its segments match some contiguous run of the path's
//!   segments. The run need not start at the first segment or end at the last, so `attn.core`
//!   matches `layers.3.attn.core` and `norm` matches `final.norm` and `layers.3.attn.norm`,
//!   but not `layers.3.attn.q_norm`, because `norm` must match a whole segment.
//!
//! For example `layers.3.**.up` matches `layers.3.moe.experts.up` and `layers.3.up`, and
//! `layers.1*.attn.o` matches the `attn.o` op of layer 1 and of layers 10 to 19.
//!
//! Matching takes time proportional to the product of the pattern's and the path's lengths
//! at worst; it never backtracks exponentially.
//!
//! # Syntax errors
//!
//! A pattern cannot be empty, start or end with `.`, contain `..`, use any character other than
//! letters, digits, `_`, `*` and `.`, use `**` as part of a longer segment (`a**` or `***`), or
//! consist of `**` segments alone.

use std::fmt;
use std::ops::Range;

use nom::bytes::complete::take_while;
use nom::character::complete::char;
use nom::{IResult, Parser};

use super::DslError;

/// One segment of a [`Pattern`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// `**`: zero or more whole path segments.
    Deep,
    /// Literal characters and `*` wildcards, which match any run of characters (possibly
    /// empty) within one path segment.
    Glob(String),
}

/// A parsed op-selection pattern; see the [module documentation](self) for what it matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// The segments, in order; never empty, and never only [`Segment::Deep`].
    pub segments: Vec<Segment>,
}

/// The message for a character that cannot appear in a pattern.
fn bad_character(c: char) -> String {
    format!("unexpected character `{c}` in a pattern; segments use letters, digits, `_` and `*`")
}

/// Whether `c` can appear inside a segment.
fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '*'
}

/// Recognises the (possibly empty) run of segment characters at the start of the input.
fn segment_text(input: &str) -> IResult<&str, &str> {
    take_while(is_segment_char).parse(input)
}

/// Recognises the `.` between two segments.
fn dot(input: &str) -> IResult<&str, char> {
    char('.').parse(input)
}

/// Parses a pattern such as `"layers.*.attn.**.proj"`.
pub fn parse_pattern(src: &str) -> Result<Pattern, DslError> {
    if src.is_empty() {
        return Err(DslError::new(0..0, "a pattern cannot be empty")
            .with_help("name the ops to select, e.g. `attn.*.proj`"));
    }
    let pos = |rest: &str| src.len().saturating_sub(rest.len());
    let mut segments = Vec::new();
    let mut input = src;
    loop {
        let (rest, text) = segment_text(input).unwrap_or((input, ""));
        let start = pos(input);
        let end = pos(rest);
        let dot_result = dot(rest);
        if text.is_empty() {
            if let Some(c) = rest.chars().next().filter(|c| *c != '.') {
                return Err(DslError::new(end..end + c.len_utf8(), bad_character(c)));
            }
            return Err(empty_segment(
                start,
                dot_result.is_ok(),
                segments.is_empty(),
            ));
        }
        segments.push(segment(text, start)?);
        match dot_result {
            Ok((next, _)) => input = next,
            Err(_) => match rest.chars().next() {
                None => break,
                Some(c) => return Err(DslError::new(end..end + c.len_utf8(), bad_character(c))),
            },
        }
    }
    if segments.iter().all(|s| *s == Segment::Deep) {
        return Err(
            DslError::new(0..src.len(), "a pattern must name at least one segment")
                .with_help("`**` alone would match every op; add a segment such as `**.norm`"),
        );
    }
    Ok(Pattern { segments })
}

/// The error for an empty segment starting at `at`. `before_dot` says whether a `.` follows it
/// (otherwise the input ends there), and `first` whether it is the first segment.
fn empty_segment(at: usize, before_dot: bool, first: bool) -> DslError {
    match (first, before_dot) {
        (true, _) => DslError::new(at..at + 1, "a pattern cannot start with `.`"),
        (false, true) => DslError::new(at..at + 1, "empty segment between two dots")
            .with_help("remove one of the dots"),
        // The segment is empty because the input ends right after a dot; point at that dot.
        (false, false) => DslError::new(at.saturating_sub(1)..at, "a pattern cannot end with `.`"),
    }
}

/// Turns the non-empty segment text `text`, which starts at byte `at`, into a [`Segment`].
fn segment(text: &str, at: usize) -> Result<Segment, DslError> {
    if text == "**" {
        return Ok(Segment::Deep);
    }
    if let Some(offset) = text.find("**") {
        let run = text[offset..]
            .find(|c| c != '*')
            .unwrap_or(text.len() - offset);
        let span: Range<usize> = at + offset..at + offset + run;
        return Err(
            DslError::new(span, "`**` must be a whole segment").with_help(
                "use `*` to match characters within a segment, or `.**.` for whole segments",
            ),
        );
    }
    Ok(Segment::Glob(text.to_string()))
}

impl Pattern {
    /// Whether the pattern matches some contiguous run of the dot-separated segments of
    /// `path`; see the [module documentation](self).
    pub fn matches(&self, path: &str) -> bool {
        let path: Vec<&str> = path.split('.').collect();
        // The pattern is unanchored at both ends, as if it began and ended with `**`. Pattern
        // index 0 and `n + 1` stand for those implicit `**` segments.
        let n = self.segments.len();
        let segment = |i: usize| i.checked_sub(1).and_then(|i| self.segments.get(i));
        wildcard_match(
            n + 2,
            path.len(),
            |i| segment(i).is_none_or(|s| *s == Segment::Deep),
            |i, j| match segment(i) {
                Some(Segment::Glob(glob)) => glob_matches(glob, path[j]),
                _ => false,
            },
        )
    }
}

/// Whether the glob `glob` (literal characters and `*`) matches all of `text`.
fn glob_matches(glob: &str, text: &str) -> bool {
    let (glob, text) = (glob.as_bytes(), text.as_bytes());
    // Comparing bytes is the same as comparing characters here: glob characters are ASCII, and
    // an ASCII byte never equals a byte inside a multi-byte UTF-8 character.
    wildcard_match(
        glob.len(),
        text.len(),
        |i| glob[i] == b'*',
        |i, j| glob[i] == text[j],
    )
}

/// Matches a pattern of `pattern_len` elements against a text of `text_len` elements, where
/// `is_star(i)` says whether pattern element `i` matches any run of text elements (possibly
/// empty), and `matches(i, j)` whether the other pattern element `i` matches text element `j`.
///
/// This is the classic greedy algorithm: it remembers only the most recent star and, on a
/// mismatch, lets that star swallow one more text element. That is enough because the pieces
/// between stars can always be matched at their earliest position, so it runs in
/// `O(pattern_len * text_len)` time and constant space.
fn wildcard_match(
    pattern_len: usize,
    text_len: usize,
    is_star: impl Fn(usize) -> bool,
    matches: impl Fn(usize, usize) -> bool,
) -> bool {
    let (mut p, mut t) = (0, 0);
    // The pattern index just after the last star seen, and the text index it resumes from.
    let mut resume: Option<(usize, usize)> = None;
    while t < text_len {
        if p < pattern_len && is_star(p) {
            p += 1;
            resume = Some((p, t));
        } else if p < pattern_len && matches(p, t) {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = resume {
            p = star_p;
            t = star_t + 1;
            resume = Some((star_p, t));
        } else {
            return false;
        }
    }
    (p..pattern_len).all(is_star)
}

/// Prints the pattern as written, e.g. `attn.*.proj`; the result parses back to an equal
/// pattern.
impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match segment {
                Segment::Deep => f.write_str("**")?,
                Segment::Glob(glob) => f.write_str(glob)?,
            }
        }
        Ok(())
    }
}

/// Serializes a pattern as its [`Display`](fmt::Display) string.
impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses `src`, failing the test on an error.
    fn parse(src: &str) -> Pattern {
        parse_pattern(src).unwrap_or_else(|e| panic!("`{src}` failed: {e:?}"))
    }

    /// Asserts the error's message and span, returning it for further checks.
    fn assert_err(src: &str, span: Range<usize>, message: &str) -> DslError {
        let e = match parse_pattern(src) {
            Ok(p) => panic!("`{src}` parsed to {p:?}"),
            Err(e) => e,
        };
        assert_eq!(e.message, message, "message for `{src}`");
        assert_eq!(e.span, span, "span for `{src}`");
        e
    }

    fn glob(s: &str) -> Segment {
        Segment::Glob(s.to_string())
    }

    const PATHS: &[&str] = &[
        "embed",
        "layers.3.attn.q_a",
        "layers.3.attn.q_norm",
        "layers.3.attn.core",
        "layers.3.attn.norm",
        "layers.5.moe.router",
        "layers.5.moe.experts.up",
        "final.norm",
        "head",
        "mtp.0.eh_proj",
    ];

    /// The paths among [`PATHS`] that `pattern` matches.
    fn selected(pattern: &str) -> Vec<&'static str> {
        let p = parse(pattern);
        PATHS
            .iter()
            .copied()
            .filter(|path| p.matches(path))
            .collect()
    }

    #[test]
    fn parses_segments() {
        assert_eq!(
            parse("attn.*.proj").segments,
            [glob("attn"), glob("*"), glob("proj")]
        );
        assert_eq!(
            parse("layers.3.**.up").segments,
            [glob("layers"), glob("3"), Segment::Deep, glob("up")]
        );
        assert_eq!(parse("**.norm").segments, [Segment::Deep, glob("norm")]);
        assert_eq!(parse("*").segments, [glob("*")]);
        assert_eq!(parse("q_*_A9").segments, [glob("q_*_A9")]);
    }

    #[test]
    fn displays_and_serializes_as_written() {
        for src in [
            "attn.*.proj",
            "layers.3.**.up",
            "**.norm",
            "*",
            "a.**.**.b",
            "layers.1*.attn.o",
        ] {
            let p = parse(src);
            assert_eq!(p.to_string(), src);
            assert_eq!(parse(&p.to_string()), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{src}\""));
        }
    }

    #[test]
    fn matches_contiguous_runs_of_segments() {
        assert_eq!(selected("attn.core"), ["layers.3.attn.core"]);
        assert_eq!(selected("norm"), ["layers.3.attn.norm", "final.norm"]);
        assert_eq!(
            selected("*norm"),
            ["layers.3.attn.q_norm", "layers.3.attn.norm", "final.norm"]
        );
        assert_eq!(selected("layers.3.**.up"), Vec::<&str>::new());
        assert_eq!(selected("layers.5.**.up"), ["layers.5.moe.experts.up"]);
        assert_eq!(
            selected("moe"),
            ["layers.5.moe.router", "layers.5.moe.experts.up"]
        );
        assert_eq!(selected("embed"), ["embed"]);
        assert_eq!(selected("mtp.*.eh_proj"), ["mtp.0.eh_proj"]);
        assert_eq!(
            selected("layers.*.attn.q_*"),
            ["layers.3.attn.q_a", "layers.3.attn.q_norm"]
        );
        assert_eq!(selected("head.*"), Vec::<&str>::new());
        assert_eq!(selected("embed.**"), ["embed"]);
        assert_eq!(selected("**.head.**"), ["head"]);
        assert_eq!(
            selected("3.attn"),
            [
                "layers.3.attn.q_a",
                "layers.3.attn.q_norm",
                "layers.3.attn.core",
                "layers.3.attn.norm"
            ]
        );
    }

    #[test]
    fn deep_segments_match_zero_or_more_segments() {
        let p = parse("layers.3.**.up");
        assert!(p.matches("layers.3.moe.experts.up"));
        assert!(p.matches("layers.3.up"));
        assert!(p.matches("layers.3.a.b.c.d.up"));
        assert!(!p.matches("layers.4.moe.experts.up"));
        assert!(!p.matches("layers.3.moe.experts.down"));
        assert!(parse("a.**.**.b").matches("a.b"));
        assert!(parse("a.**.b.**.c").matches("x.a.b.b.b.c.y"));
        assert!(!parse("a.**.b.**.c").matches("a.c.b"));
    }

    #[test]
    fn globs_match_within_one_segment() {
        let p = parse("layers.1*.attn.o");
        for layer in [1, 10, 15, 19, 100] {
            assert!(
                p.matches(&format!("layers.{layer}.attn.o")),
                "layer {layer}"
            );
        }
        for layer in [0, 2, 21, 31] {
            assert!(
                !p.matches(&format!("layers.{layer}.attn.o")),
                "layer {layer}"
            );
        }
        assert!(!parse("a*b").matches("a.b"));
        assert!(parse("a*b").matches("ab"));
        assert!(parse("a*b").matches("axxb"));
        assert!(parse("*a*b*").matches("xxaxxbxx"));
        assert!(!parse("*a*b*").matches("xxbxxaxx"));
        assert!(parse("*").matches("layers.3"));
        assert!(parse("*").matches(""));
        assert!(parse("a*").matches("a.é"));
        assert!(parse("*_*").matches("é_ü"));
        assert!(!parse("*x*").matches("é"));
    }

    #[test]
    fn glob_matching_is_not_exponential() {
        let p = parse(&format!("{}b", "a*".repeat(40)));
        let text = "a".repeat(5_000);
        assert!(!p.matches(&text));
        let p = parse(&["**.a"; 40].join("."));
        let path = ["a"; 2_000].join(".");
        assert!(p.matches(&path));
        assert!(!p.matches(&path.replace('a', "b")));
    }

    #[test]
    fn glob_matcher_agrees_with_a_reference() {
        /// A slow, obviously correct recursive matcher.
        fn reference(glob: &[u8], text: &[u8]) -> bool {
            match glob.split_first() {
                None => text.is_empty(),
                Some((b'*', rest)) => (0..=text.len()).any(|k| reference(rest, &text[k..])),
                Some((c, rest)) => text.first() == Some(c) && reference(rest, &text[1..]),
            }
        }
        let globs = [
            "", "*", "a", "a*", "*a", "a*b", "*ab*", "a*a*a", "**", "ab*ba", "*b*",
        ];
        let texts = [
            "", "a", "b", "ab", "ba", "aab", "abab", "aaa", "abba", "abbba", "bab",
        ];
        for g in globs {
            for t in texts {
                assert_eq!(
                    glob_matches(g, t),
                    reference(g.as_bytes(), t.as_bytes()),
                    "`{g}` vs `{t}`"
                );
            }
        }
    }

    #[test]
    fn rejects_empty_patterns() {
        let e = assert_err("", 0..0, "a pattern cannot be empty");
        assert!(e.help.is_some());
    }

    #[test]
    fn rejects_empty_segments() {
        assert_err(".attn", 0..1, "a pattern cannot start with `.`");
        assert_err(".", 0..1, "a pattern cannot start with `.`");
        let e = assert_err("attn..core", 5..6, "empty segment between two dots");
        assert_eq!(e.help.as_deref(), Some("remove one of the dots"));
        assert_err("a.b...c", 4..5, "empty segment between two dots");
        assert_err("attn.", 4..5, "a pattern cannot end with `.`");
        assert_err("a.**.", 4..5, "a pattern cannot end with `.`");
    }

    #[test]
    fn rejects_illegal_characters() {
        let message = |c: &str| {
            format!("unexpected character `{c}` in a pattern; segments use letters, digits, `_` and `*`")
        };
        assert_err("attn/core", 4..5, &message("/"));
        assert_err("/attn", 0..1, &message("/"));
        assert_err("attn.-core", 5..6, &message("-"));
        assert_err(" attn", 0..1, &message(" "));
        assert_err("attn ", 4..5, &message(" "));
        assert_err("attn.é", 5..7, &message("é"));
        assert_err("a?", 1..2, &message("?"));
        assert_err("a.日本", 2..5, &message("日"));
    }

    #[test]
    fn rejects_partial_deep_segments() {
        let message = "`**` must be a whole segment";
        let e = assert_err("a**", 1..3, message);
        assert!(e.help.is_some());
        assert_err("x.**b", 2..4, message);
        assert_err("***", 0..3, message);
        assert_err("a.b*c***d", 5..8, message);
    }

    #[test]
    fn rejects_deep_only_patterns() {
        let message = "a pattern must name at least one segment";
        let e = assert_err("**", 0..2, message);
        assert!(e.help.is_some());
        assert_err("**.**", 0..5, message);
    }

    /// A strategy for valid pattern strings.
    fn arb_pattern() -> impl Strategy<Value = String> {
        prop::collection::vec("\\*\\*|[a-c1*_]{1,4}", 1..6).prop_map(|mut segments| {
            // Runs of `*` inside a glob are not allowed, and neither are patterns made only of
            // `**`, so collapse the runs and make sure there is a glob.
            for segment in segments.iter_mut().filter(|s| *s != "**") {
                while segment.contains("**") {
                    *segment = segment.replace("**", "*");
                }
            }
            if segments.iter().all(|s| s == "**") {
                segments.push("x".to_string());
            }
            segments.join(".")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_and_spans_are_valid(
            src in prop_oneof![any::<String>(), "[a-c*._/é ]{0,12}"],
            path in prop_oneof![any::<String>(), "[a-c1._é]{0,12}"],
        ) {
            match parse_pattern(&src) {
                Ok(p) => {
                    prop_assert!(!p.segments.is_empty());
                    prop_assert_eq!(parse_pattern(&p.to_string()), Ok(p.clone()));
                    let _ = p.matches(&path);
                }
                Err(e) => {
                    prop_assert!(e.span.start <= e.span.end);
                    prop_assert!(e.span.end <= src.len());
                    prop_assert!(src.is_char_boundary(e.span.start));
                    prop_assert!(src.is_char_boundary(e.span.end));
                    prop_assert!(!e.message.is_empty());
                }
            }
        }

        #[test]
        fn valid_patterns_round_trip_and_match_themselves(src in arb_pattern()) {
            let p = parse_pattern(&src).unwrap();
            prop_assert_eq!(p.to_string(), src.clone());
            // Replacing every `*` with nothing turns the pattern into a path it matches.
            let path: Vec<String> = p
                .segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Glob(g) => Some(g.replace('*', "")),
                    Segment::Deep => None,
                })
                .collect();
            prop_assert!(p.matches(&path.join(".")), "`{}` vs `{}`", src, path.join("."));
        }
    }
}
