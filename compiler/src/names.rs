//! `names`: the one place where strings from a user's spec (the model name, layer and op names)
//! become identifiers, literals or comment text in generated Rust and CUDA source.
//!
//! Spec strings are untrusted. A model name may be `"; std::process::exit(1); "`, contain `*/`,
//! `#include <x>`, a newline, a quote, a backslash or NUL, be empty, start with a digit or be a
//! keyword of either language. Emitters must never splice a spec string into source text;
//! they pass it through one of these functions, each of which states what it guarantees:
//!
//! - [`ident`] makes a valid identifier of a language that is none of its keywords or reserved
//!   names; [`Namer`] hands out such identifiers, unique within one scope. [`module_name`],
//!   [`const_name`] and [`type_name`] make Rust identifiers in the case rustc's lints expect.
//! - [`rust_str_literal`] and [`cuda_str_literal`] make string literals that evaluate to exactly
//!   the given string, written in printable ASCII only.
//! - [`comment_text`] makes text that can sit inside a `//` or `/* */` comment without ending
//!   it or starting a new line.
//!
//! The sanitizing is the same for both languages (only the reserved lists differ), so one spec
//! name becomes the same identifier in the Rust and the CUDA output unless it is reserved in one
//! of them. The CUDA lists cover the C library names that kernels use, not all of them: generated
//! CUDA code should declare its own names at namespace scope inside a namespace, not globally.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// A language kiln generates source code in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    /// Rust, edition 2015 to 2024.
    Rust,
    /// CUDA C++ (C++20 with NVCC's extensions).
    Cuda,
}

/// Rust's keywords of every edition (2015 to 2024), and the names that generated Rust code
/// relies on and that a user's name must therefore not shadow.
#[rustfmt::skip]
const RUST_RESERVED: &[&str] = &[
    // Strict keywords, 2015. `self`, `Self`, `super` and `crate` cannot be raw identifiers
    // either, so appending `_` is the only way to use them.
    "as", "break", "const", "continue", "crate", "else", "enum", "extern", "false", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "self", "Self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
    "where", "while",
    // Strict keywords since 2018.
    "async", "await", "dyn",
    // Reserved keywords (`try` since 2018, `gen` since 2024).
    "abstract", "become", "box", "do", "final", "macro", "override", "priv", "typeof", "unsized",
    "virtual", "yield", "try", "gen",
    // Weak keywords: identifiers only outside the places they are keywords in.
    "macro_rules", "union", "raw", "safe",
    // Primitive types: a module or type of this name shadows the primitive.
    "bool", "char", "str", "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64",
    "i128", "isize", "f16", "f32", "f64", "f128",
    // Crate roots that generated code names by path.
    "std", "core", "alloc",
    // The prelude of every edition up to 2024: a binding named `None` is a pattern, a type named
    // `Option` shadows the prelude's.
    "Copy", "Send", "Sized", "Sync", "Unpin", "Drop", "Fn", "FnMut", "FnOnce", "drop", "Box",
    "ToOwned", "Clone", "PartialEq", "PartialOrd", "Eq", "Ord", "AsRef", "AsMut", "Into", "From",
    "Default", "Iterator", "Extend", "IntoIterator", "DoubleEndedIterator", "ExactSizeIterator",
    "Option", "Some", "None", "Result", "Ok", "Err", "String", "ToString", "Vec", "TryFrom",
    "TryInto", "FromIterator", "Future", "IntoFuture",
];

/// C++20's keywords, CUDA's qualifiers and built-ins, and the names from C, C++ and CUDA
/// headers that generated CUDA code relies on (macros, types, math functions).
#[rustfmt::skip]
const CUDA_RESERVED: &[&str] = &[
    // C++20 keywords, including the alternative operator spellings.
    "alignas", "alignof", "and", "and_eq", "asm", "auto", "bitand", "bitor", "bool", "break",
    "case", "catch", "char", "char8_t", "char16_t", "char32_t", "class", "compl", "concept",
    "const", "consteval", "constexpr", "constinit", "const_cast", "continue", "co_await",
    "co_return", "co_yield", "decltype", "default", "delete", "do", "double", "dynamic_cast",
    "else", "enum", "explicit", "export", "extern", "false", "float", "for", "friend", "goto",
    "if", "inline", "int", "long", "mutable", "namespace", "new", "noexcept", "not", "not_eq",
    "nullptr", "operator", "or", "or_eq", "private", "protected", "public", "register",
    "reinterpret_cast", "requires", "return", "short", "signed", "sizeof", "static",
    "static_assert", "static_cast", "struct", "switch", "template", "this", "thread_local",
    "throw", "true", "try", "typedef", "typeid", "typename", "union", "unsigned", "using",
    "virtual", "void", "volatile", "wchar_t", "while", "xor", "xor_eq",
    // Identifiers with a special meaning in some contexts, and keywords of C and of C++
    // technical specifications that compilers accept as extensions.
    "final", "override", "import", "module", "restrict", "typeof", "typeof_unqual", "reflexpr",
    "synchronized", "atomic_cancel", "atomic_commit", "atomic_noexcept", "transaction_safe",
    "transaction_safe_dynamic",
    // CUDA's qualifiers and intrinsics (also covered by the rule on `__`, listed to be explicit).
    "__global__", "__device__", "__host__", "__shared__", "__constant__", "__managed__",
    "__grid_constant__", "__restrict__", "__noinline__", "__forceinline__", "__launch_bounds__",
    "__syncthreads",
    // CUDA's built-in variables.
    "threadIdx", "blockIdx", "blockDim", "gridDim", "warpSize", "clusterIdx", "clusterDim",
    // CUDA's vector and half-precision types.
    "dim3", "char1", "char2", "char3", "char4", "uchar1", "uchar2", "uchar3", "uchar4", "short1",
    "short2", "short3", "short4", "ushort1", "ushort2", "ushort3", "ushort4", "int1", "int2",
    "int3", "int4", "uint1", "uint2", "uint3", "uint4", "long1", "long2", "long3", "long4",
    "ulong1", "ulong2", "ulong3", "ulong4", "longlong1", "longlong2", "longlong3", "longlong4",
    "ulonglong1", "ulonglong2", "ulonglong3", "ulonglong4", "float1", "float2", "float3",
    "float4", "double1", "double2", "double3", "double4", "half", "half2", "nv_bfloat16",
    "nv_bfloat162", "uint", "ushort", "ulong", "uchar",
    // Types from <cstdint> and <cstddef>.
    "int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t", "uint64_t",
    "size_t", "ptrdiff_t", "intptr_t", "uintptr_t", "nullptr_t", "max_align_t",
    // Object-like macros of the C headers: the preprocessor would replace the name.
    "NULL", "EOF", "INFINITY", "NAN", "HUGE_VAL", "HUGE_VALF", "FLT_MAX", "FLT_MIN",
    "FLT_EPSILON", "DBL_MAX", "DBL_MIN", "DBL_EPSILON", "CHAR_BIT", "INT_MAX", "INT_MIN",
    "UINT_MAX", "LLONG_MAX", "LLONG_MIN", "SIZE_MAX", "M_E", "M_LOG2E", "M_LOG10E", "M_LN2",
    "M_LN10", "M_PI", "M_PI_2", "M_PI_4", "M_1_PI", "M_2_PI", "M_2_SQRTPI", "M_SQRT2",
    "M_SQRT1_2", "errno", "stdin", "stdout", "stderr", "assert", "offsetof",
    // Functions and namespaces that kernels call: a local of the same name would hide them.
    "main", "std", "cuda", "cub", "cute", "cutlass", "nvcuda", "cooperative_groups", "printf",
    "malloc", "free", "memcpy", "memset", "min", "max", "abs", "fabs", "fabsf", "exp", "expf",
    "exp2f", "log", "logf", "log2f", "sqrt", "sqrtf", "rsqrt", "rsqrtf", "tanh", "tanhf", "erf",
    "erff", "pow", "powf", "fmax", "fmaxf", "fmin", "fminf", "fma", "fmaf", "floor", "floorf",
    "ceil", "ceilf", "round", "roundf", "sin", "sinf", "cos", "cosf", "isnan", "isinf",
    "isfinite", "signbit", "atomicAdd", "atomicSub", "atomicMax", "atomicMin", "atomicCAS",
    "atomicExch",
];

/// Whether `name` is reserved in `lang`, i.e. may not be used as an identifier of generated
/// code even though it is one syntactically.
///
/// Reserved are the language's keywords of every edition or standard (contextual ones too),
/// and the names generated code relies on: for Rust the primitive types, `std`, `core`,
/// `alloc` and the prelude; for CUDA the qualifiers, built-in variables (`threadIdx`, …),
/// vector types, common macros (`NULL`, `M_PI`, …) and math functions. For CUDA also every
/// name that contains `__` or starts with `_`, which C++ reserves to the implementation (the
/// latter at namespace scope, where generated names may land). For Rust also `_`, which is not
/// an identifier.
pub fn is_reserved(name: &str, lang: Lang) -> bool {
    match lang {
        Lang::Rust => name == "_" || RUST_RESERVED.contains(&name),
        Lang::Cuda => name.starts_with('_') || name.contains("__") || CUDA_RESERVED.contains(&name),
    }
}

/// A valid identifier of `lang` derived from `raw`, for any string `raw`.
///
/// The result matches `[A-Za-z][A-Za-z0-9_]*`, contains no `__`, and is not reserved in
/// `lang` (see [`is_reserved`]). It is derived readably:
///
/// - each character outside `[A-Za-z0-9_]` (non-ASCII ones too) becomes `_`, then each run of
///   `_` becomes a single `_`, and a leading `_` is dropped: `a-b`, `a b`, `a__b` → `a_b`;
/// - an empty result becomes `unnamed`, one starting with a digit gets the prefix `n_`
///   (`3d` → `n_3d`);
/// - a reserved result gets a trailing `_` (`fn` → `fn_`, `threadIdx` → `threadIdx_` in CUDA).
///
/// Different inputs can give the same identifier (`a-b` and `a_b`); use a [`Namer`] where
/// names must be distinct. `ident` is idempotent: `ident(&ident(x, l), l) == ident(x, l)`.
pub fn ident(raw: &str, lang: Lang) -> String {
    let mut out = String::with_capacity(raw.len() + 2);
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        // Dropping a `_` that would lead or double another one keeps `out` free of leading
        // underscores and of `__`.
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push_str("unnamed");
    } else if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "n_");
    }
    // No reserved name that `out` can be here ends with `_` (a test checks it), so this adds no
    // `__`, and the result is not reserved either (tested for every reserved name).
    if is_reserved(&out, lang) {
        out.push('_');
    }
    out
}

/// The words of `raw` for the case conversions: its maximal runs of ASCII letters and digits,
/// each split further before an uppercase letter that follows a lowercase letter
/// (`DeepSeek` → `Deep`, `Seek`) or that a lowercase letter follows (`HTTPServer` → `HTTP`,
/// `Server`; `V3Lite` → `V3`, `Lite`; but `8B` and `FP8E4M3` stay one word).
fn words(raw: &str) -> Vec<&str> {
    let b = raw.as_bytes();
    let mut words = Vec::new();
    // The start of the word being scanned, if any.
    let mut start = None;
    for i in 0..=b.len() {
        let alnum = b.get(i).is_some_and(u8::is_ascii_alphanumeric);
        match (start, alnum) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                words.push(&raw[s..i]);
                start = None;
            }
            (Some(s), true) if b[i].is_ascii_uppercase() => {
                let prev = b[i - 1];
                let next_is_lower = b.get(i + 1).is_some_and(u8::is_ascii_lowercase);
                if prev.is_ascii_lowercase() || next_is_lower {
                    words.push(&raw[s..i]);
                    start = Some(i);
                }
            }
            _ => {}
        }
    }
    words
}

/// A Rust module (or function, variable) name for `raw` in snake_case: its words (runs of
/// ASCII letters and digits, split at case changes: `DeepSeek-V3` → `deep_seek_v3`) in lowercase,
/// joined by `_`, then passed through [`ident`] for Rust.
///
/// The result has [`ident`]'s guarantees, and holds only lowercase letters, digits and single
/// `_` (`unnamed` for a `raw` without words, prefix `n_` before a digit, trailing `_` on a
/// reserved word: `self` → `self_`), so rustc's `non_snake_case` lint accepts it.
pub fn module_name(raw: &str) -> String {
    let snake: Vec<String> = words(raw).iter().map(|w| w.to_ascii_lowercase()).collect();
    ident(&snake.join("_"), Lang::Rust)
}

/// A Rust `const` or `static` name for `raw` in UPPER_SNAKE_CASE: its words as for
/// [`module_name`] in uppercase, joined by `_` (`DeepSeek-V3` → `DEEP_SEEK_V3`), then passed
/// through [`ident`] for Rust.
///
/// The result has [`ident`]'s guarantees, and holds only uppercase letters, digits and single
/// `_` (`UNNAMED` for a `raw` without words, prefix `N_` before a digit), so rustc's
/// `non_upper_case_globals` lint accepts it.
pub fn const_name(raw: &str) -> String {
    let upper: Vec<String> = words(raw).iter().map(|w| w.to_ascii_uppercase()).collect();
    let mut name = upper.join("_");
    if name.is_empty() {
        name.push_str("UNNAMED");
    } else if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "N_");
    }
    ident(&name, Lang::Rust)
}

/// A Rust type (or trait, variant) name for `raw` in CamelCase: its words as for
/// [`module_name`], each with its first letter in uppercase and the rest in lowercase, joined
/// without separator except for a `_` between two digits (`DeepSeek-V3` → `DeepSeekV3`,
/// `Llama-3.1-8B` → `Llama3_1_8b`, `HTTPServer` → `HttpServer`), then passed through [`ident`]
/// for Rust.
///
/// The result has [`ident`]'s guarantees, starts with an uppercase letter (`Unnamed` for a
/// `raw` without words, prefix `N` before a digit), and has `_` only between two digits or at
/// the end of a reserved word (`Self` → `Self_`, `Option` → `Option_`), so rustc's
/// `non_camel_case_types` lint accepts it.
pub fn type_name(raw: &str) -> String {
    let mut name = String::new();
    for word in words(raw) {
        let starts_with_digit = word.starts_with(|c: char| c.is_ascii_digit());
        if starts_with_digit && name.ends_with(|c: char| c.is_ascii_digit()) {
            name.push('_');
        }
        let (first, rest) = word.split_at(1);
        name.push_str(&first.to_ascii_uppercase());
        name.push_str(&rest.to_ascii_lowercase());
    }
    if name.is_empty() {
        name.push_str("Unnamed");
    } else if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, 'N');
    }
    ident(&name, Lang::Rust)
}

/// A Rust string literal, quotes included, whose value is exactly `raw`.
///
/// The literal is written in printable ASCII only (no raw string, so no `"#` can end it
/// early): `"` and `\` are escaped, tab, line feed, carriage return and NUL become `\t`, `\n`,
/// `\r` and `\0`, and every other character outside `' '..='~'` becomes `\u{…}`, which also
/// keeps Unicode direction overrides out of the source. It is an expression, not a format
/// string: pass it to `format!` and friends as an argument, never as the format.
pub fn rust_str_literal(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('"');
    for c in raw.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            ' '..='~' => out.push(c),
            _ => write!(out, "\\u{{{:x}}}", u32::from(c)).unwrap(),
        }
    }
    out.push('"');
    out
}

/// A TOML basic string (with quotes) that reads back as exactly `raw`: quotes and backslashes
/// escaped, control characters as `\uXXXX`. For the spec files and cargo manifests kiln
/// writes.
pub fn toml_str_literal(raw: &str) -> String {
    let mut out = String::from("\"");
    for c in raw.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A C/CUDA narrow string literal, quotes included, whose bytes are exactly the UTF-8 bytes of
/// `raw` (followed by the terminating NUL, as for every C string literal).
///
/// The literal is written in printable ASCII only: `"`, `\` and `?` are escaped (`\?` keeps
/// trigraphs such as `??/` from forming under pre-C++17 compilers), tab, line feed and carriage
/// return become `\t`, `\n` and `\r`, and every other byte outside `' '..='~'` (control bytes,
/// NUL, the bytes of non-ASCII characters) becomes a three-digit octal escape such as `\000` or
/// `\303`. Octal escapes end after three digits, so unlike `\x` escapes they never swallow a
/// following digit. An escape of a byte above `\177` has that byte's value in GCC, Clang and
/// NVCC (and by C++23's rules). A `raw` containing NUL gives a literal with an embedded NUL, so
/// C string functions see only the part before it. It is not a format string: `%` is kept, so
/// pass it to `printf` as an argument of `"%s"`, never as the format.
pub fn cuda_str_literal(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('"');
    for &b in raw.as_bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'?' => out.push_str("\\?"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b' '..=b'~' => out.push(char::from(b)),
            _ => write!(out, "\\{b:03o}").unwrap(),
        }
    }
    out.push('"');
    out
}

/// Text for a comment of generated Rust or CUDA code that shows `raw` as readably as it
/// safely can, on one line.
///
/// Put it after `// ` or between `/* ` and ` */`, with the spaces (without them, a leading `/`
/// or `!` would turn the comment into a Rust doc comment). The result:
///
/// - contains only printable ASCII and non-ASCII letters and digits
///   ([`char::is_alphanumeric`]): tab, line feed, carriage return, vertical tab and form feed
///   become a space, every other character becomes `<U+XXXX>` (so no line or paragraph
///   separator, and no Unicode direction override, which rustc rejects in comments);
/// - contains no `\` (it becomes `<U+005C>`), so no line of C or CUDA can end with a backslash
///   that splices the next line into the comment, and no `??/`, the trigraph for `\`;
/// - contains neither `*/` nor `/*` (a space is put between the two characters), so it neither
///   ends a block comment nor opens a nested one, which Rust's block comments allow.
pub fn comment_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '\t' | '\n' | '\r' | '\x0b' | '\x0c' => out.push(' '),
            '/' if out.ends_with('*') || out.ends_with("??") => out.push_str(" /"),
            '*' if out.ends_with('/') => out.push_str(" *"),
            '\\' => out.push_str("<U+005C>"),
            ' '..='~' => out.push(c),
            _ if c.is_alphanumeric() => out.push(c),
            _ => write!(out, "<U+{:04X}>", u32::from(c)).unwrap(),
        }
    }
    out
}

/// Hands out identifiers that are distinct within one scope of generated code (a module, a
/// kernel's locals), after naga's `Namer`.
///
/// Every name it returns is a valid, unreserved identifier of its language as [`ident`]
/// guarantees, and differs from every name it returned or was told about with
/// [`Namer::reserve`] before.
///
/// Names are compared exactly. For a name in a case convention, pass its case form:
/// `namer.call(&module_name(raw))` returns `module_name(raw)` while that is free, and a
/// snake_case name with a suffix otherwise. In Rust, one scope's consts, statics, functions and
/// locals share a namespace (and a `let` whose name is a const in scope is a pattern, not a new
/// variable), so give them one namer.
#[derive(Clone, Debug)]
pub struct Namer {
    lang: Lang,
    /// Every name handed out or reserved.
    used: HashSet<String>,
    /// For a base name, the suffix to try next when the base is taken.
    next_suffix: HashMap<String, u64>,
}

impl Namer {
    /// A namer for one scope of `lang` code, with no names taken yet.
    pub fn new(lang: Lang) -> Self {
        Namer {
            lang,
            used: HashSet::new(),
            next_suffix: HashMap::new(),
        }
    }

    /// The language whose identifiers this namer hands out.
    pub fn lang(&self) -> Lang {
        self.lang
    }

    /// Marks `name` as taken, so that [`Namer::call`] never returns it: for the names that the
    /// emitter itself uses in the scope (`kiln_runtime`, `x`, `tid`, …). Returns whether it was
    /// free.
    pub fn reserve(&mut self, name: &str) -> bool {
        self.used.insert(name.to_string())
    }

    /// A fresh identifier for `raw`: `ident(raw)` if that is not taken yet, else the first free
    /// one of `ident(raw)` followed by `_1`, `_2`, … (by `1`, `2`, … where `ident(raw)` already
    /// ends with `_`). The result is marked as taken.
    pub fn call(&mut self, raw: &str) -> String {
        let base = ident(raw, self.lang);
        if self.used.insert(base.clone()) {
            return base;
        }
        let sep = if base.ends_with('_') { "" } else { "_" };
        let next = self.next_suffix.entry(base.clone()).or_insert(1);
        loop {
            let candidate = format!("{base}{sep}{next}");
            *next += 1;
            if !is_reserved(&candidate, self.lang) && self.used.insert(candidate.clone()) {
                return candidate;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn toml_literals_read_back_exactly() {
        for raw in [
            "plain",
            "quote \" and \\ back",
            "tab\tnew\nline\u{0}nul",
            "ünï 🦀",
            "\"\"\"",
            "",
        ] {
            let doc = format!("k = {}", super::toml_str_literal(raw));
            let v: toml::Table = toml::from_str(&doc).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(v["k"].as_str(), Some(raw));
        }
    }

    use super::*;
    use proptest::prelude::*;

    const LANGS: [Lang; 2] = [Lang::Rust, Lang::Cuda];

    /// Spec strings an attacker or a careless user might write.
    const NASTY: &[&str] = &[
        "\"; std::process::exit(1); \"",
        "; std::process::exit(1); ",
        "*/",
        "/*",
        "*/ int main() { return 1; } /*",
        "#include <x>",
        "\n#include <stdlib.h>\n",
        "}",
        "{",
        "}; fn evil() {",
        "line1\nline2",
        "line1\r\nline2",
        "\r",
        "\"",
        "'",
        "\\",
        "\\\n",
        "??/",
        "\0",
        "a\0b",
        "",
        " ",
        "_",
        "__",
        "___",
        "0",
        "3d",
        "123abc",
        "_1",
        "é",
        "Ünïcödé",
        "模型",
        "🦀",
        "\u{202e}evil\u{202c}",
        "\u{feff}bom",
        "a-b",
        "a_b",
        "a b",
        "a__b",
        "a.b",
        "fn",
        "mod",
        "self",
        "Self",
        "crate",
        "super",
        "async",
        "await",
        "dyn",
        "try",
        "gen",
        "r#type",
        "r#fn",
        "union",
        "macro_rules",
        "static",
        "'static",
        "type",
        "match",
        "__global__",
        "__device__",
        "__shared__",
        "__host__",
        "int",
        "float",
        "template",
        "namespace",
        "class",
        "threadIdx",
        "blockIdx",
        "blockDim",
        "gridDim",
        "warpSize",
        "NULL",
        "M_PI",
        "_Bool",
        "_Reserved",
        "__x",
        "x__y",
        "fn_",
        "self_",
        "None",
        "Option",
        "f32",
        "u8",
        "std",
        "DeepSeek-V3",
        "Llama-3.1-8B",
        "HTTPServer",
    ];

    /// Whether `s` matches `^[A-Za-z_][A-Za-z0-9_]*$`.
    fn is_plain_ident(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Fails unless `id` is a valid, unreserved identifier of `lang`; for Rust, syn must parse
    /// it as an identifier (which rejects keywords).
    fn assert_valid_ident(id: &str, lang: Lang, raw: &str) {
        assert!(
            is_plain_ident(id),
            "{lang:?} ident {id:?} of {raw:?} is malformed"
        );
        assert!(
            !id.contains("__"),
            "{lang:?} ident {id:?} of {raw:?} contains `__`"
        );
        assert!(
            !is_reserved(id, lang),
            "{lang:?} ident {id:?} of {raw:?} is reserved"
        );
        if lang == Lang::Rust {
            let parsed = syn::parse_str::<syn::Ident>(id)
                .unwrap_or_else(|e| panic!("syn rejects {id:?} (of {raw:?}): {e}"));
            assert_eq!(parsed.to_string(), id);
        }
    }

    /// Strings built from fragments that break naive escaping, plus arbitrary characters.
    fn nasty_string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            prop::sample::select(NASTY).prop_map(str::to_string),
            prop::sample::select(LITERAL_BREAKERS).prop_map(str::to_string),
            prop::sample::select(&["*", "/", "?", "\\", "\"", "_", "0", "7", "f", "#", "\n"][..])
                .prop_map(str::to_string),
            any::<char>().prop_map(String::from),
        ];
        prop_oneof![
            prop::collection::vec(piece, 0..12).prop_map(|v| v.concat()),
            any::<String>(),
        ]
    }

    #[test]
    fn names_ident_examples() {
        let rust = |s| ident(s, Lang::Rust);
        let cuda = |s| ident(s, Lang::Cuda);
        assert_eq!(rust("model"), "model");
        assert_eq!(rust("DeepSeek-V3"), "DeepSeek_V3");
        assert_eq!(rust("a-b"), "a_b");
        assert_eq!(rust("a__b"), "a_b");
        assert_eq!(rust("__a__"), "a_");
        assert_eq!(rust("3d"), "n_3d");
        assert_eq!(rust(""), "unnamed");
        assert_eq!(rust("_"), "unnamed");
        assert_eq!(rust("é"), "unnamed");
        assert_eq!(rust("\"; std::process::exit(1); \""), "std_process_exit_1_");
        assert_eq!(rust("#include <x>"), "include_x_");
        assert_eq!(rust("fn"), "fn_");
        assert_eq!(rust("Self"), "Self_");
        assert_eq!(rust("r#type"), "r_type");
        assert_eq!(rust("int"), "int");
        assert_eq!(cuda("int"), "int_");
        assert_eq!(cuda("fn"), "fn");
        assert_eq!(cuda("__global__"), "global_");
        assert_eq!(cuda("threadIdx"), "threadIdx_");
        assert_eq!(cuda("_Bool"), "Bool");
    }

    #[test]
    fn names_ident_of_nasty_inputs_is_valid() {
        for lang in LANGS {
            for raw in NASTY {
                let id = ident(raw, lang);
                assert_valid_ident(&id, lang, raw);
                assert_eq!(ident(&id, lang), id, "ident is not idempotent on {raw:?}");
            }
        }
    }

    #[test]
    fn names_ident_of_every_reserved_name_is_valid() {
        for lang in LANGS {
            for raw in RUST_RESERVED.iter().chain(CUDA_RESERVED) {
                assert_valid_ident(&ident(raw, lang), lang, raw);
            }
        }
    }

    #[test]
    fn names_reserved_lists_are_well_formed() {
        // `ident` appends `_` to a reserved name it produced; that must not create `__`. It
        // never produces one that starts with `_` (CUDA's `__global__` and such).
        for name in RUST_RESERVED.iter().chain(CUDA_RESERVED) {
            assert!(is_plain_ident(name), "{name:?}");
            assert!(
                name.starts_with('_') || !name.ends_with('_'),
                "{name:?} ends with `_`"
            );
        }
    }

    #[test]
    fn names_named_keywords_are_reserved() {
        for k in [
            "fn",
            "mod",
            "self",
            "Self",
            "crate",
            "super",
            "async",
            "await",
            "dyn",
            "try",
            "gen",
            "union",
            "type",
            "abstract",
            "become",
            "box",
            "do",
            "final",
            "macro",
            "override",
            "priv",
            "typeof",
            "unsized",
            "virtual",
            "yield",
            "macro_rules",
            "raw",
            "safe",
            "_",
        ] {
            assert!(is_reserved(k, Lang::Rust), "{k}");
        }
        for k in [
            "int",
            "float",
            "template",
            "namespace",
            "class",
            "union",
            "co_await",
            "concept",
            "requires",
            "char8_t",
            "and",
            "xor_eq",
            "__global__",
            "__device__",
            "__shared__",
            "threadIdx",
            "blockIdx",
            "blockDim",
            "gridDim",
            "warpSize",
            "NULL",
            "_Bool",
            "__x",
            "x__y",
            "_",
        ] {
            assert!(is_reserved(k, Lang::Cuda), "{k}");
        }
        assert!(!is_reserved("model", Lang::Rust));
        assert!(!is_reserved("model", Lang::Cuda));
    }

    /// syn knows Rust's keywords independently of our list: every word it refuses as an
    /// identifier must be reserved.
    #[test]
    fn names_every_word_syn_rejects_is_reserved() {
        let candidates = RUST_RESERVED.iter().chain(CUDA_RESERVED).chain(NASTY);
        for word in candidates {
            if is_plain_ident(word) && syn::parse_str::<syn::Ident>(word).is_err() {
                assert!(is_reserved(word, Lang::Rust), "syn rejects {word:?}");
            }
        }
    }

    #[test]
    fn names_namer_examples() {
        let mut namer = Namer::new(Lang::Rust);
        assert_eq!(namer.call("a-b"), "a_b");
        assert_eq!(namer.call("a_b"), "a_b_1");
        assert_eq!(namer.call("a b"), "a_b_2");
        assert_eq!(namer.call("a_b_1"), "a_b_1_1");
        assert_eq!(namer.call("fn"), "fn_");
        assert_eq!(namer.call("fn"), "fn_1");
        assert_eq!(namer.call("fn_"), "fn_2");
        assert!(namer.reserve("x"));
        assert!(!namer.reserve("x"));
        assert_eq!(namer.call("x"), "x_1");
        assert_eq!(namer.call(&module_name("DeepSeek-V3")), "deep_seek_v3");
        assert_eq!(namer.call(&module_name("deep seek v3")), "deep_seek_v3_1");
        assert_eq!(namer.call(&const_name("DeepSeek-V3")), "DEEP_SEEK_V3");
        let mut cuda = Namer::new(Lang::Cuda);
        assert_eq!(cuda.call("int"), "int_");
        assert_eq!(cuda.call("int"), "int_1");
    }

    #[test]
    fn names_namer_gives_colliding_inputs_distinct_names() {
        for lang in LANGS {
            let mut namer = Namer::new(lang);
            let mut seen = HashSet::new();
            let inputs = [
                "a-b", "a_b", "a b", "a__b", "a.b", "a_b_1", "a_b_2", "_a_b", "a_b_",
            ];
            for round in 0..50 {
                for raw in inputs.iter().chain(NASTY) {
                    let name = namer.call(raw);
                    assert_valid_ident(&name, lang, raw);
                    assert!(
                        seen.insert(name.clone()),
                        "{name:?} handed out twice ({round})"
                    );
                }
            }
        }
    }

    /// Strings that break naive literal escaping.
    const LITERAL_BREAKERS: &[&str] = &[
        "",
        "\"",
        "\\",
        "\\\"",
        "\"#",
        "\"##",
        "#\"",
        "r#\"x\"#",
        "\0",
        "\0\x31",
        "\u{1}7",
        "\r",
        "\n",
        "\r\n",
        "\t",
        "\x7f",
        "\u{85}",
        "\u{2028}\u{2029}",
        "\u{202e}",
        "\u{feff}",
        "é",
        "模型",
        "🦀",
        "👩‍👩‍👧",
        "??/",
        "??=??(??)??'??<??>??!??-",
        "a?",
        "%s%n%%",
        "{}",
        "{0}",
        "\\u{41}",
        "\\x41",
        "\\101",
        "*/",
        "\\\n",
    ];

    /// Decodes a C string literal the way a C compiler does (escapes, octal up to three
    /// digits, greedy hex), returning its bytes without the terminating NUL. Rejects what is
    /// not a single well-formed literal in printable ASCII, and trigraph sequences.
    fn decode_c_literal(lit: &str) -> Result<Vec<u8>, String> {
        if !lit.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err("not printable ASCII".into());
        }
        if lit.contains("??") {
            return Err("contains a trigraph prefix".into());
        }
        let body = lit
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
            .ok_or("not quoted")?
            .as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            let b = body[i];
            i += 1;
            match b {
                b'"' => return Err(format!("unescaped quote at {i}")),
                b'\\' => {
                    let e = *body.get(i).ok_or("dangling backslash")?;
                    i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'a' => out.push(0x07),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'v' => out.push(0x0b),
                        b'\\' | b'"' | b'\'' | b'?' => out.push(e),
                        b'0'..=b'7' => {
                            let mut v = u32::from(e - b'0');
                            for _ in 0..2 {
                                match body.get(i) {
                                    Some(&d @ b'0'..=b'7') => {
                                        v = v * 8 + u32::from(d - b'0');
                                        i += 1;
                                    }
                                    _ => break,
                                }
                            }
                            out.push(u8::try_from(v).map_err(|_| "octal escape above 255")?);
                        }
                        b'x' => {
                            let start = i;
                            while body.get(i).is_some_and(u8::is_ascii_hexdigit) {
                                i += 1;
                            }
                            let digits = std::str::from_utf8(&body[start..i]).unwrap();
                            let v = u32::from_str_radix(digits, 16).map_err(|e| e.to_string())?;
                            out.push(u8::try_from(v).map_err(|_| "hex escape above 255")?);
                        }
                        _ => return Err(format!("unknown escape \\{}", char::from(e))),
                    }
                }
                _ => out.push(b),
            }
        }
        Ok(out)
    }

    /// Fails unless `rust_str_literal(raw)` is printable ASCII and syn reads back `raw`.
    fn assert_rust_literal_round_trips(raw: &str) {
        let lit = rust_str_literal(raw);
        assert!(lit.bytes().all(|b| (b' '..=b'~').contains(&b)), "{lit}");
        let parsed = syn::parse_str::<syn::LitStr>(&lit)
            .unwrap_or_else(|e| panic!("syn rejects {lit} (of {raw:?}): {e}"));
        assert_eq!(parsed.value(), raw, "{lit}");
    }

    /// Fails unless `cuda_str_literal(raw)` decodes to the bytes of `raw`.
    fn assert_cuda_literal_round_trips(raw: &str) {
        let lit = cuda_str_literal(raw);
        let bytes = decode_c_literal(&lit).unwrap_or_else(|e| panic!("{lit} (of {raw:?}): {e}"));
        assert_eq!(bytes, raw.as_bytes(), "{lit}");
    }

    #[test]
    fn names_literal_examples() {
        assert_eq!(rust_str_literal("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(rust_str_literal("\0\n\u{202e}é"), r#""\0\n\u{202e}\u{e9}""#);
        assert_eq!(cuda_str_literal("a\"b\\c?"), r#""a\"b\\c\?""#);
        assert_eq!(cuda_str_literal("\0\x01"), r#""\000\001""#);
        assert_eq!(cuda_str_literal("é1"), r#""\303\2511""#);
    }

    #[test]
    fn names_c_literal_decoder_decodes() {
        // The decoder is the test's reference; check it on literals written by hand.
        let cases: &[(&str, &[u8])] = &[
            (r#""ab""#, b"ab"),
            (r#""\"\\\?\'""#, b"\"\\?'"),
            (r#""\n\t\r\a\b\f\v""#, b"\n\t\r\x07\x08\x0c\x0b"),
            (r#""\0""#, b"\0"),
            (r#""\0011""#, b"\x011"),
            (r#""\1234""#, b"S4"),
            (r#""\x41g""#, b"Ag"),
        ];
        for (lit, bytes) in cases {
            assert_eq!(decode_c_literal(lit).as_deref(), Ok(*bytes), "{lit}");
        }
        for bad in [
            r#""a"b""#,
            r#""\""#,
            r#""\x100""#,
            r#""\q""#,
            r#""??/""#,
            "\"\n\"",
        ] {
            assert!(decode_c_literal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_literals_round_trip() {
        for raw in LITERAL_BREAKERS.iter().chain(NASTY) {
            assert_rust_literal_round_trips(raw);
            assert_cuda_literal_round_trips(raw);
        }
    }

    /// Fails unless `comment_text(raw)` is one line, cannot end or nest a comment, and lets a
    /// Rust lexer see the comment end where it should.
    fn assert_comment_is_safe(raw: &str) {
        let text = comment_text(raw);
        for bad in ["\n", "\r", "*/", "/*", "\\", "??/"] {
            assert!(
                !text.contains(bad),
                "{text:?} (of {raw:?}) contains {bad:?}"
            );
        }
        for c in text.chars() {
            assert!(
                (' '..='~').contains(&c) || c.is_alphanumeric(),
                "{text:?} (of {raw:?}) contains {c:?}"
            );
        }
        assert!(text.lines().count() <= 1, "{text:?} (of {raw:?})");
        // After the comment, exactly the identifier `x` must remain.
        for src in [format!("// {text}\nx"), format!("/* {text} */ x")] {
            let parsed = syn::parse_str::<syn::Ident>(&src)
                .unwrap_or_else(|e| panic!("{src:?} (of {raw:?}): {e}"));
            assert_eq!(parsed, "x", "{src:?}");
        }
    }

    #[test]
    fn names_comment_text_examples() {
        assert_eq!(
            comment_text("DeepSeek-V3 (é, 模型)"),
            "DeepSeek-V3 (é, 模型)"
        );
        assert_eq!(comment_text("a\nb\r\nc\td"), "a b  c d");
        assert_eq!(comment_text("*/ x /* y"), "* / x / * y");
        assert_eq!(comment_text("/*/"), "/ * /");
        assert_eq!(comment_text("C:\\x\\"), "C:<U+005C>x<U+005C>");
        assert_eq!(comment_text("??/"), "?? /");
        assert_eq!(
            comment_text("\0\u{202e}🦀\u{2028}"),
            "<U+0000><U+202E><U+1F980><U+2028>"
        );
    }

    #[test]
    fn names_comment_text_is_safe() {
        for raw in NASTY.iter().chain(LITERAL_BREAKERS) {
            assert_comment_is_safe(raw);
        }
    }

    /// Fails unless the three case forms of `raw` are valid, unreserved Rust identifiers in the
    /// form rustc's case lints accept (the lints' rules, restated).
    fn assert_case_names_are_valid(raw: &str) {
        let module = module_name(raw);
        assert_valid_ident(&module, Lang::Rust, raw);
        assert!(
            module
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "module name {module:?} of {raw:?} is not snake_case"
        );
        let konst = const_name(raw);
        assert_valid_ident(&konst, Lang::Rust, raw);
        assert!(
            konst
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "const name {konst:?} of {raw:?} is not UPPER_SNAKE_CASE"
        );
        let ty = type_name(raw);
        assert_valid_ident(&ty, Lang::Rust, raw);
        let trimmed = ty.trim_end_matches('_');
        let camel = trimmed.starts_with(|c: char| c.is_ascii_uppercase())
            && trimmed.as_bytes().windows(2).all(|w| match w {
                [a, b'_'] | [b'_', a] => a.is_ascii_digit(),
                _ => true,
            });
        assert!(camel, "type name {ty:?} of {raw:?} is not CamelCase");
    }

    #[test]
    fn names_case_examples() {
        let cases = [
            ("DeepSeek-V3", "deep_seek_v3", "DEEP_SEEK_V3", "DeepSeekV3"),
            ("deepseek_v3", "deepseek_v3", "DEEPSEEK_V3", "DeepseekV3"),
            (
                "Llama-3.1-8B",
                "llama_3_1_8b",
                "LLAMA_3_1_8B",
                "Llama3_1_8b",
            ),
            ("HTTPServer", "http_server", "HTTP_SERVER", "HttpServer"),
            (
                "DeepSeekV3Lite",
                "deep_seek_v3_lite",
                "DEEP_SEEK_V3_LITE",
                "DeepSeekV3Lite",
            ),
            ("gpt2", "gpt2", "GPT2", "Gpt2"),
            ("FP8E4M3", "fp8e4m3", "FP8E4M3", "Fp8e4m3"),
            ("3d", "n_3d", "N_3D", "N3d"),
            ("", "unnamed", "UNNAMED", "Unnamed"),
            ("é", "unnamed", "UNNAMED", "Unnamed"),
            ("self", "self_", "SELF", "Self_"),
            ("Self", "self_", "SELF", "Self_"),
            ("option", "option", "OPTION", "Option_"),
            ("fn", "fn_", "FN", "Fn_"),
            ("r#type", "r_type", "R_TYPE", "RType"),
            (
                "\"; std::process::exit(1); \"",
                "std_process_exit_1",
                "STD_PROCESS_EXIT_1",
                "StdProcessExit1",
            ),
        ];
        for (raw, module, konst, ty) in cases {
            assert_eq!(module_name(raw), module, "module_name({raw:?})");
            assert_eq!(const_name(raw), konst, "const_name({raw:?})");
            assert_eq!(type_name(raw), ty, "type_name({raw:?})");
        }
    }

    #[test]
    fn names_case_names_of_nasty_inputs_are_valid() {
        for raw in NASTY.iter().chain(RUST_RESERVED).chain(CUDA_RESERVED) {
            assert_case_names_are_valid(raw);
        }
    }

    proptest! {
        #[test]
        fn names_case_names_are_valid(raw in nasty_string()) {
            assert_case_names_are_valid(&raw);
        }

        #[test]
        fn names_comment_text_is_safe_on_any_string(raw in nasty_string()) {
            assert_comment_is_safe(&raw);
        }

        #[test]
        fn names_literals_round_trip_on_any_string(raw in nasty_string()) {
            assert_rust_literal_round_trips(&raw);
            assert_cuda_literal_round_trips(&raw);
        }

        #[test]
        fn names_ident_is_valid_and_idempotent(raw in nasty_string()) {
            for lang in LANGS {
                let id = ident(&raw, lang);
                assert_valid_ident(&id, lang, &raw);
                prop_assert_eq!(ident(&id, lang), id);
            }
        }

        #[test]
        fn names_namer_names_are_distinct(raws in prop::collection::vec(nasty_string(), 0..40)) {
            for lang in LANGS {
                let mut namer = Namer::new(lang);
                let mut seen = HashSet::new();
                for raw in &raws {
                    let name = namer.call(raw);
                    assert_valid_ident(&name, lang, raw);
                    prop_assert!(seen.insert(name));
                }
            }
        }
    }
}
