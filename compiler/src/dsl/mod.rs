//! The three small languages that live inside TOML strings of a spec, parsed with nom.
//!
//! 1. [`stack`]: layer stacks such as `"dense*3, moe*58"` or `"dense, (dense, moe)*4"`.
//! 2. [`expr`]: elementwise activation expressions such as `"silu(gate) * up"`.
//! 3. [`pattern`]: op-selection patterns for the precision policy such as `"attn.*.proj"`.
//!
//! Every parser works on the decoded string alone and reports errors as byte ranges inside
//! that string ([`DslError`]); the checker maps them back to columns of the TOML file.

pub mod expr;
mod lex;
pub mod pattern;
pub mod stack;

use std::ops::Range;

/// An error inside one DSL string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DslError {
    /// Byte range inside the DSL string that the error points at. May be empty (an insertion
    /// point, e.g. "expected `)` here" at the end of input); always within `0..=src.len()`
    /// and on `char` boundaries.
    pub span: Range<usize>,
    /// What is wrong, as a full sentence fragment without a trailing period, e.g.
    /// "unknown function `slu`".
    pub message: String,
    /// An optional suggestion, e.g. "did you mean `silu`?" or
    /// "functions are: silu, gelu, gelu_tanh, relu, sigmoid, tanh, exp, softplus".
    pub help: Option<String>,
}

impl DslError {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        DslError {
            span,
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// The closest candidate to `word` by edit distance, if it is close enough to be a plausible
/// typo (distance at most a third of the longer word, and at least one edit allowed).
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let all: Vec<&'a str> = candidates.into_iter().collect();
    let mut best: Option<(usize, &str)> = None;
    for &c in &all {
        let d = edit_distance(word, c);
        let limit = (word.chars().count().max(c.chars().count()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c).or_else(|| {
        // A unique candidate that extends the word (`rms` → `rmsnorm`) is a likely abbreviation.
        let mut prefixed = candidates_by_prefix(word, &all);
        match (prefixed.next(), prefixed.next()) {
            (Some(c), None) if word.chars().count() >= 2 => Some(c),
            _ => None,
        }
    })
}

fn candidates_by_prefix<'a, 'w>(
    word: &'w str,
    all: &'w [&'a str],
) -> impl Iterator<Item = &'a str> + 'w {
    all.iter()
        .copied()
        .filter(move |c| c.starts_with(word) && *c != word)
}

/// Levenshtein distance over chars, with adjacent transpositions counted as one edit
/// (optimal string alignment), so `kv_rnak` is one edit from `kv_rank`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[n][m]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_finds_typos() {
        assert_eq!(closest("kv_rnak", ["kv_rank", "q_rank"]), Some("kv_rank"));
        assert_eq!(closest("slu", ["silu", "gelu"]), Some("silu"));
        assert_eq!(closest("banana", ["silu", "gelu"]), None);
        assert_eq!(closest("rms", ["rmsnorm", "layernorm"]), Some("rmsnorm"));
        assert_eq!(closest("r", ["rmsnorm", "relu"]), None);
    }
}
