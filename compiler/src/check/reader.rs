//! Typed, span-aware reading of a parsed TOML table, collecting every error instead of stopping
//! at the first one.
//!
//! A [`Section`] wraps one TOML table and the list of keys it accepts. Getters return `None`
//! both when a key is absent and when it is invalid (the error is already recorded), so callers
//! fall back to a default or skip dependent rules without reporting cascades.

use std::cell::RefCell;
use std::ops::{Range, RangeInclusive};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{Diagnostic, Rule};
use crate::dsl::{closest, DslError};

/// Collects diagnostics; shared by every section reader of one check.
pub struct Sink<'t> {
    pub text: &'t str,
    diags: RefCell<Vec<Diagnostic>>,
}

impl<'t> Sink<'t> {
    pub fn new(text: &'t str) -> Self {
        Sink {
            text,
            diags: RefCell::new(Vec::new()),
        }
    }

    pub fn push(&self, d: Diagnostic) {
        self.diags.borrow_mut().push(d);
    }

    pub fn error(
        &self,
        rule: Rule,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) {
        self.push(Diagnostic::new(rule, span, message, label));
    }

    pub fn has_errors(&self) -> bool {
        !self.diags.borrow().is_empty()
    }

    /// All diagnostics, ordered by position in the file.
    pub fn finish(self) -> Vec<Diagnostic> {
        let mut d = self.diags.into_inner();
        d.sort_by_key(|d| (d.span.start, d.span.end));
        d
    }

    /// Maps an error inside a DSL string value back to the TOML file. When the string literal's
    /// raw text equals its decoded value (no escapes), columns are exact; otherwise the whole
    /// literal is underlined.
    pub fn dsl_error(&self, value: &SpannedStr, what: &str, e: DslError) {
        let span = value.map(e.span.clone());
        let label = e.message.clone();
        self.push(
            Diagnostic::new(
                Rule::Dsl,
                span,
                format!("invalid {what}: {}", e.message),
                label,
            )
            .with_help_opt(e.help),
        );
    }
}

/// A string value with its location.
pub struct SpannedStr {
    pub value: String,
    /// The literal's span, quotes included.
    pub span: Range<usize>,
    /// Byte offset in the file of the string's first decoded byte, if the mapping is exact.
    base: usize,
    pub exact: bool,
}

impl SpannedStr {
    fn new(text: &str, value: &str, span: Range<usize>) -> Self {
        let raw = text.get(span.clone()).unwrap_or("");
        let mut exact = None;
        for q in ["\"\"\"", "'''", "\"", "'"] {
            if raw.len() >= 2 * q.len() && raw.starts_with(q) && raw.ends_with(q) {
                let inner = &raw[q.len()..raw.len() - q.len()];
                if inner == value {
                    exact = Some(span.start + q.len());
                }
                break;
            }
        }
        SpannedStr {
            value: value.to_string(),
            base: exact.unwrap_or(span.start),
            exact: exact.is_some(),
            span,
        }
    }

    /// Maps a byte range inside the value to a byte range in the file.
    pub fn map(&self, r: Range<usize>) -> Range<usize> {
        if self.exact {
            self.base + r.start..self.base + r.end
        } else {
            self.span.clone()
        }
    }
}

/// One TOML table being read: `[attention]`, `[attention.rope]`, an inline table...
pub struct Section<'a, 't> {
    pub sink: &'a Sink<'t>,
    /// Dotted name used in messages, e.g. `attention.rope`.
    pub name: String,
    table: &'a DeTable<'t>,
    /// Span of the table's header or inline table, for "missing key" errors.
    pub span: Range<usize>,
    keys: &'static [&'static str],
    /// Required keys found missing, with what each holds; reported together as one error
    /// when the section is dropped.
    missing: RefCell<Vec<(String, String)>>,
}

impl Drop for Section<'_, '_> {
    fn drop(&mut self) {
        let missing = self.missing.take();
        let Some(((first, _), rest)) = missing.split_first() else {
            return;
        };
        let names: Vec<String> = missing.iter().map(|(k, _)| format!("`{k}`")).collect();
        let (message, label) = if rest.is_empty() {
            let what = &missing[0].1;
            (
                format!("missing required key `{first}` in [{}]", self.name),
                format!("add `{first}` ({what}) here"),
            )
        } else {
            let (last, init) = names.split_last().expect("two or more");
            let wanted: Vec<String> = missing
                .iter()
                .map(|(k, w)| format!("`{k}` ({w})"))
                .collect();
            (
                format!(
                    "missing required keys {} and {last} in [{}]",
                    init.join(", "),
                    self.name
                ),
                format!("add {} here", wanted.join(", ")),
            )
        };
        self.sink.push(Diagnostic::new(
            Rule::MissingKey,
            self.span.clone(),
            message,
            label,
        ));
    }
}

fn type_name(v: &DeValue) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// "remove the quotes" when a quoted string holds exactly the scalar the key expects:
/// `heads = "4"` for an integer, `"1e-3"` for a number, `"true"` for a boolean.
fn unquote_help(key: &str, v: &DeValue, expected: &str) -> Option<String> {
    let DeValue::String(s) = v else {
        return None;
    };
    let text: &str = s.as_ref();
    let fits = match expected {
        "an integer" => text.parse::<i64>().is_ok(),
        "a number" => {
            text.parse::<f64>().is_ok() && text.bytes().all(|b| b"0123456789+-.eE".contains(&b))
        }
        e if e.starts_with("a boolean") => text == "true" || text == "false",
        _ => false,
    };
    fits.then(|| format!("remove the quotes: `{key} = {text}`"))
}

/// Formats an inclusive integer range for messages ("at least 1", "between 1 and 65536").
fn describe_range(r: &RangeInclusive<u64>) -> String {
    if *r.end() == u64::MAX {
        format!("at least {}", r.start())
    } else {
        format!("between {} and {}", r.start(), r.end())
    }
}

impl<'a, 't> Section<'a, 't> {
    pub fn new(
        sink: &'a Sink<'t>,
        name: impl Into<String>,
        table: &'a DeTable<'t>,
        span: Range<usize>,
        keys: &'static [&'static str],
    ) -> Self {
        let s = Section {
            sink,
            name: name.into(),
            table,
            span,
            keys,
            missing: RefCell::new(Vec::new()),
        };
        s.reject_unknown();
        s
    }

    fn reject_unknown(&self) {
        for (k, _) in self.table.iter() {
            let key: &str = k.get_ref();
            if !self.keys.contains(&key) {
                let help = match closest(key, self.keys.iter().copied()) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!("[{}] accepts: {}", self.name, self.keys.join(", ")),
                };
                self.sink.push(
                    Diagnostic::new(
                        Rule::UnknownKey,
                        k.span(),
                        format!("unknown key `{key}` in [{}]", self.name),
                        "unknown key",
                    )
                    .with_help(help),
                );
            }
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&'a Spanned<DeValue<'t>>> {
        self.table.get(key)
    }

    /// The span of a key's value, or the section header if the key is absent.
    pub fn span_of(&self, key: &str) -> Range<usize> {
        self.get(key).map_or(self.span.clone(), |v| v.span())
    }

    pub fn missing(&self, key: &str, what: &str) {
        // A misspelled key is already reported with this key as its suggestion.
        let misspelled = self.table.iter().any(|(k, _)| {
            let k: &str = k.get_ref();
            !self.keys.contains(&k) && closest(k, self.keys.iter().copied()) == Some(key)
        });
        if !misspelled {
            let entry = (key.to_string(), what.to_string());
            self.missing.borrow_mut().push(entry);
        }
    }

    fn wrong_type(&self, key: &str, v: &Spanned<DeValue>, expected: &str) {
        self.sink.push(
            Diagnostic::new(
                Rule::Type,
                v.span(),
                format!(
                    "`{}.{key}` must be {expected}, found {}",
                    self.name,
                    type_name(v.get_ref())
                ),
                format!("expected {expected}"),
            )
            .with_help_opt(unquote_help(key, v.get_ref(), expected)),
        );
    }

    fn out_of_range(&self, key: &str, span: Range<usize>, found: &str, rule: &str) {
        self.sink.push(Diagnostic::new(
            Rule::Range,
            span,
            format!("`{}.{key}` must be {rule}, found {found}", self.name),
            format!("must be {rule}"),
        ));
    }

    /// A non-negative integer value and its span, without reporting anything if the key is
    /// absent or not such an integer.
    pub fn raw_int(&self, key: &str) -> Option<(u64, Range<usize>)> {
        let v = self.get(key)?;
        let DeValue::Integer(i) = v.get_ref() else {
            return None;
        };
        let n = u64::from_str_radix(i.as_str(), i.radix()).ok()?;
        Some((n, v.span()))
    }

    /// `value` if the key is present (`None` when it was invalid), else `default`.
    fn or_default<T>(&self, key: &str, value: Option<T>, default: T) -> Option<T> {
        if self.has(key) {
            value
        } else {
            Some(default)
        }
    }

    /// An integer in `range`, or `default` when the key is absent.
    pub fn int_or(&self, key: &str, range: RangeInclusive<u64>, default: u64) -> Option<u64> {
        self.or_default(key, self.int(key, range), default)
    }

    /// A float satisfying `ok`, or `default` when the key is absent.
    pub fn float_or(
        &self,
        key: &str,
        ok: impl Fn(f64) -> bool,
        rule: &str,
        default: f64,
    ) -> Option<f64> {
        self.or_default(key, self.float(key, ok, rule), default)
    }

    /// A boolean, or `default` when the key is absent.
    pub fn boolean_or(&self, key: &str, default: bool) -> Option<bool> {
        self.or_default(key, self.boolean(key), default)
    }

    /// One of `choices`, or `default` when the key is absent.
    pub fn choice_or<T: Copy>(
        &self,
        key: &str,
        choices: &[(&'static str, T)],
        default: T,
    ) -> Option<T> {
        self.or_default(key, self.choice(key, choices), default)
    }

    /// An array of `N` integers in `range`, or `default` when the key is absent.
    pub fn int_array_or<const N: usize>(
        &self,
        key: &str,
        range: RangeInclusive<u64>,
        default: [u64; N],
    ) -> Option<[u64; N]> {
        self.or_default(key, self.int_array::<N>(key, range), default)
    }

    /// An integer in `range`.
    pub fn int(&self, key: &str, range: RangeInclusive<u64>) -> Option<u64> {
        let v = self.get(key)?;
        self.int_value(key, v, &range)
    }

    fn int_value(
        &self,
        key: &str,
        v: &Spanned<DeValue>,
        range: &RangeInclusive<u64>,
    ) -> Option<u64> {
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(key, v, "an integer");
            return None;
        };
        let parsed = i128::from_str_radix(i.as_str(), i.radix()).ok();
        match parsed {
            Some(n) if n >= *range.start() as i128 && n <= *range.end() as i128 => Some(n as u64),
            _ => {
                self.out_of_range(key, v.span(), &i.to_string(), &describe_range(range));
                None
            }
        }
    }

    /// A required integer in `range`.
    pub fn req_int(&self, key: &str, range: RangeInclusive<u64>, what: &str) -> Option<u64> {
        if !self.has(key) {
            self.missing(key, what);
            return None;
        }
        self.int(key, range)
    }

    /// A finite float (integers are accepted too) satisfying `ok`, described by `rule` in errors.
    pub fn float(&self, key: &str, ok: impl Fn(f64) -> bool, rule: &str) -> Option<f64> {
        let v = self.get(key)?;
        let x = match v.get_ref() {
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            _ => {
                self.wrong_type(key, v, "a number");
                return None;
            }
        };
        match x {
            Some(x) if x.is_finite() && ok(x) => Some(x),
            _ => {
                let raw = self.sink.text.get(v.span()).unwrap_or("?").to_string();
                self.out_of_range(key, v.span(), &raw, rule);
                None
            }
        }
    }

    pub fn req_float(
        &self,
        key: &str,
        ok: impl Fn(f64) -> bool,
        rule: &str,
        what: &str,
    ) -> Option<f64> {
        if !self.has(key) {
            self.missing(key, what);
            return None;
        }
        self.float(key, ok, rule)
    }

    pub fn boolean(&self, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(key, v, "a boolean (true or false)");
                None
            }
        }
    }

    pub fn string(&self, key: &str) -> Option<SpannedStr> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(SpannedStr::new(self.sink.text, s, v.span())),
            _ => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    /// A required string.
    pub fn req_string(&self, key: &str, what: &str) -> Option<SpannedStr> {
        if !self.has(key) {
            self.missing(key, what);
            return None;
        }
        self.string(key)
    }

    /// A required string naming one of `choices` (listed in the missing-key error).
    pub fn req_choice<T: Copy>(&self, key: &str, choices: &[(&'static str, T)]) -> Option<T> {
        if !self.has(key) {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            let what = match names.split_last() {
                Some((last, init)) if !init.is_empty() => format!("{} or {last}", init.join(", ")),
                _ => names.join(""),
            };
            self.missing(key, &what);
            return None;
        }
        self.choice(key, choices)
    }

    /// A string naming one of `choices`.
    pub fn choice<T: Copy>(&self, key: &str, choices: &[(&'static str, T)]) -> Option<T> {
        let s = self.string(key)?;
        self.lookup(key, &s, choices)
    }

    pub fn lookup<T: Copy>(
        &self,
        key: &str,
        s: &SpannedStr,
        choices: &[(&'static str, T)],
    ) -> Option<T> {
        if let Some((_, t)) = choices.iter().find(|(n, _)| *n == s.value) {
            return Some(*t);
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let help = match closest(&s.value, names.iter().copied()) {
            Some(c) => format!("did you mean `{c}`?"),
            None => format!("expected one of: {}", names.join(", ")),
        };
        self.sink.push(
            Diagnostic::new(
                Rule::UnknownValue,
                s.span.clone(),
                format!("unknown value `{}` for `{}.{key}`", s.value, self.name),
                format!("not one of: {}", names.join(", ")),
            )
            .with_help(help),
        );
        None
    }

    /// An array of `n` integers, each in `range`.
    pub fn int_array<const N: usize>(
        &self,
        key: &str,
        range: RangeInclusive<u64>,
    ) -> Option<[u64; N]> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, &format!("an array of {N} integers"));
            return None;
        };
        let items: Vec<_> = items.iter().collect();
        if items.len() != N {
            self.sink.error(
                Rule::Type,
                v.span(),
                format!(
                    "`{}.{key}` must have exactly {N} elements, found {}",
                    self.name,
                    items.len()
                ),
                format!("expected {N} integers"),
            );
            return None;
        }
        let mut out = [0u64; N];
        let mut ok = true;
        for (slot, item) in out.iter_mut().zip(items) {
            match self.int_value(key, item, &range) {
                Some(n) => *slot = n,
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An array of strings, each with its span.
    pub fn string_array(&self, key: &str) -> Option<Vec<SpannedStr>> {
        let v = self.get(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, "an array of strings");
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(SpannedStr::new(self.sink.text, s, item.span())),
                _ => self.wrong_type(key, item, "a string"),
            }
        }
        Some(out)
    }

    /// A nested table (`[attention.rope]` or an inline `rope = { … }`), read with its own keys.
    pub fn table(&self, key: &str, keys: &'static [&'static str]) -> Option<Section<'a, 't>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Section::new(
                self.sink,
                format!("{}.{key}", self.name),
                t,
                v.span(),
                keys,
            )),
            _ => {
                self.wrong_type(key, v, "a table");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(text: &str) -> DeValue<'static> {
        DeValue::String(text.to_string().into())
    }

    #[test]
    fn quoted_scalars_of_the_expected_type_get_remove_the_quotes() {
        let help = |text: &str, expected: &str| unquote_help("k", &string(text), expected);
        assert_eq!(
            help("4", "an integer").as_deref(),
            Some("remove the quotes: `k = 4`")
        );
        assert_eq!(
            help("1e-3", "a number").as_deref(),
            Some("remove the quotes: `k = 1e-3`")
        );
        assert_eq!(
            help("true", "a boolean (true or false)").as_deref(),
            Some("remove the quotes: `k = true`")
        );
        for (text, expected) in [
            ("four", "an integer"),
            ("4.5", "an integer"),
            ("inf", "a number"),
            ("yes", "a boolean (true or false)"),
            ("4", "a string"),
        ] {
            assert_eq!(help(text, expected), None, "{text:?} as {expected}");
        }
        assert_eq!(
            unquote_help("k", &DeValue::Boolean(true), "an integer"),
            None
        );
    }
}
