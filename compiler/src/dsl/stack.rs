//! Layer stacks: which kind of block each transformer layer uses, in order.
//!
//! A stack is a comma-separated list of items. An item is a layer kind (`dense` or `moe`) or a
//! parenthesised group, optionally followed by `*` and a repeat count:
//!
//! ```text
//! stack := item (',' item)*
//! item  := atom ('*' count)?
//! atom  := kind | '(' stack ')'
//! kind  := identifier            (`dense` or `moe`)
//! count := decimal integer >= 1
//! ```
//!
//! Whitespace is allowed around every token. `"dense*3, moe*58"` is three dense layers followed
//! by 58 MoE layers, and `"dense, (dense, moe)*2"` expands to dense, dense, moe, dense, moe.
//! A stack expands to at most [`MAX_LAYERS`] layers, and groups nest at most
//! [`MAX_GROUP_DEPTH`] deep; both limits are checked while parsing, before anything is expanded.

use std::fmt;

use nom::character::complete::digit1;
use nom::IResult;

use super::lex::{identifier, is_word_char, symbol, ws, Step};
use super::{closest, DslError};

/// The kind of block a single transformer layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// A layer whose feed-forward part is one dense MLP.
    Dense,
    /// A layer whose feed-forward part is a mixture of experts.
    Moe,
}

impl LayerKind {
    /// Every layer kind, in declaration order.
    pub const ALL: [LayerKind; 2] = [LayerKind::Dense, LayerKind::Moe];

    /// The name of this kind as written in a stack, e.g. `"moe"`.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Dense => "dense",
            LayerKind::Moe => "moe",
        }
    }

    /// The kind with the given name, if there is one.
    fn from_name(name: &str) -> Option<LayerKind> {
        LayerKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The largest number of layers a stack may expand to.
pub const MAX_LAYERS: u64 = 100_000;

/// The deepest that parenthesised groups may nest.
pub const MAX_GROUP_DEPTH: usize = 64;

/// Parses and expands a stack into one [`LayerKind`] per layer, in order.
pub fn parse_stack(src: &str) -> Result<Vec<LayerKind>, DslError> {
    let parser = StackParser { src };
    let (rest, stack) = parser.stack(src, 0, Context::Start)?;
    let rest = ws(rest);
    if !rest.is_empty() {
        let span = parser.token_span(rest);
        let help = if rest.starts_with(')') {
            "this `)` has no matching `(`"
        } else if rest.starts_with('*') {
            "an item takes one repeat count; wrap it in a group to repeat it again, e.g. `(dense*3)*2`"
        } else if rest.starts_with(is_word_char) || rest.starts_with('(') {
            "separate the items of a stack with `,`"
        } else {
            "expected `,` or the end of the stack"
        };
        return Err(unexpected(rest, span).with_help(help));
    }
    // The total was bounded by `MAX_LAYERS` while parsing, so this allocation is small.
    let mut layers = Vec::with_capacity(usize::try_from(stack.len).unwrap_or(0));
    expand(&stack.items, &mut layers);
    Ok(layers)
}

/// Formats layers in the compact run-length form, e.g. `"dense*3, moe"`.
///
/// A run of one layer is written without `*1`. The result parses back to the same layers with
/// [`parse_stack`], except that an empty slice formats as the empty string, which is not a
/// valid stack.
pub fn format_stack(layers: &[LayerKind]) -> String {
    let mut out = String::new();
    for run in layers.chunk_by(|a, b| a == b) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(run[0].name());
        if run.len() > 1 {
            out.push('*');
            out.push_str(&run.len().to_string());
        }
    }
    out
}

/// One parsed item before expansion.
struct Item {
    /// What the item repeats.
    atom: Atom,
    /// How many times the atom is repeated; at least 1.
    count: u64,
}

/// The thing an item repeats.
enum Atom {
    /// A single layer.
    Kind(LayerKind),
    /// A parenthesised group of items.
    Group(Vec<Item>),
}

/// A parsed list of items together with the number of layers it expands to.
struct Stack {
    items: Vec<Item>,
    /// The number of layers the items expand to; never more than [`MAX_LAYERS`].
    len: u64,
}

/// What came right before the position where an item is expected, used to explain why an
/// item is missing.
#[derive(Clone, Copy)]
enum Context {
    /// The very start of the stack.
    Start,
    /// Right after the `(` at this byte offset.
    AfterParen(usize),
    /// Right after the `,` at this byte offset.
    AfterComma(usize),
}

/// The error for an unexpected token, which starts `rest` and covers `span`.
fn unexpected(rest: &str, span: std::ops::Range<usize>) -> DslError {
    let len = span.len().min(rest.len());
    let token = rest.get(..len).unwrap_or(rest);
    DslError::new(span, format!("unexpected `{token}`"))
}

/// The error for a stack that expands to too many layers.
fn too_many_layers(span: std::ops::Range<usize>) -> DslError {
    DslError::new(
        span,
        format!("the stack expands to more than {MAX_LAYERS} layers"),
    )
}

/// Appends the expansion of `items` to `out`.
fn expand(items: &[Item], out: &mut Vec<LayerKind>) {
    for item in items {
        match &item.atom {
            Atom::Kind(kind) => {
                let count = usize::try_from(item.count).unwrap_or(0);
                out.extend(std::iter::repeat_n(*kind, count));
            }
            Atom::Group(inner) => {
                for _ in 0..item.count {
                    expand(inner, out);
                }
            }
        }
    }
}

/// A recursive-descent parser over one stack string, which it keeps to turn the remaining
/// input at any point into a byte offset.
struct StackParser<'a> {
    src: &'a str,
}

impl<'a> StackParser<'a> {
    /// The byte offset at which `rest` starts inside the source.
    fn pos(&self, rest: &str) -> usize {
        self.src.len().saturating_sub(rest.len())
    }

    /// The span of the token that starts `rest`: a whole word or number, or one character.
    fn token_span(&self, rest: &str) -> std::ops::Range<usize> {
        let start = self.pos(rest);
        let len = match rest.chars().next() {
            Some(c) if is_word_char(c) => rest.find(|c| !is_word_char(c)).unwrap_or(rest.len()),
            Some(c) => c.len_utf8(),
            None => 0,
        };
        start..start + len
    }

    /// Parses `item (',' item)*`, stopping before anything that is not a `,`.
    fn stack(&self, input: &'a str, depth: usize, context: Context) -> Step<'a, Stack> {
        let mut items = Vec::new();
        let mut len: u64 = 0;
        let mut input = input;
        let mut context = context;
        loop {
            let start = self.pos(ws(input));
            let (rest, item, item_len) = self.item(input, depth, context)?;
            len = len
                .checked_add(item_len)
                .filter(|total| *total <= MAX_LAYERS)
                .ok_or_else(|| too_many_layers(start..self.pos(rest)))?;
            items.push(item);
            let after = ws(rest);
            match symbol(',')(after) {
                Ok((next, _)) => {
                    context = Context::AfterComma(self.pos(after));
                    input = next;
                }
                Err(_) => return Ok((rest, Stack { items, len })),
            }
        }
    }

    /// Parses `atom ('*' count)?` and returns the item with the number of layers it expands to.
    fn item(
        &self,
        input: &'a str,
        depth: usize,
        context: Context,
    ) -> Result<(&'a str, Item, u64), DslError> {
        let (rest, atom, atom_len) = self.atom(input, depth, context)?;
        let after = ws(rest);
        let Ok((after_star, _)) = symbol('*')(after) else {
            return Ok((rest, Item { atom, count: 1 }, atom_len));
        };
        let digits_at = ws(after_star);
        let parsed: IResult<&str, &str> = digit1(digits_at);
        let Ok((rest, digits)) = parsed else {
            let span = self.token_span(digits_at);
            return Err(DslError::new(span, "expected a repeat count after `*`")
                .with_help("a repeat count is a whole number, e.g. `dense*3`"));
        };
        let span = self.pos(digits_at)..self.pos(rest);
        // A number too large for `u64` certainly makes the stack too long.
        let count: u64 = digits.parse().map_err(|_| too_many_layers(span.clone()))?;
        if count == 0 {
            return Err(DslError::new(span, "a repeat count must be at least 1"));
        }
        let len = atom_len
            .checked_mul(count)
            .filter(|len| *len <= MAX_LAYERS)
            .ok_or_else(|| too_many_layers(span))?;
        Ok((rest, Item { atom, count }, len))
    }

    /// Parses a layer kind or a parenthesised group and returns it with the number of layers
    /// it expands to.
    fn atom(
        &self,
        input: &'a str,
        depth: usize,
        context: Context,
    ) -> Result<(&'a str, Atom, u64), DslError> {
        let input = ws(input);
        let at = self.pos(input);
        if let Ok((rest, name)) = identifier(input) {
            return match LayerKind::from_name(name) {
                Some(kind) => Ok((rest, Atom::Kind(kind), 1)),
                None => Err(self.unknown_kind(name, at)),
            };
        }
        if let Ok((inner, _)) = symbol('(')(input) {
            if depth >= MAX_GROUP_DEPTH {
                return Err(DslError::new(
                    at..at + 1,
                    format!("groups are nested more than {MAX_GROUP_DEPTH} deep"),
                ));
            }
            let (rest, stack) = self.stack(inner, depth + 1, Context::AfterParen(at))?;
            let after = ws(rest);
            if let Ok((rest, _)) = symbol(')')(after) {
                return Ok((rest, Atom::Group(stack.items), stack.len));
            }
            if after.is_empty() {
                let end = self.pos(rest);
                return Err(DslError::new(end..end, "expected `)` to close the group")
                    .with_help("every `(` needs a matching `)`"));
            }
            let help = if after.starts_with(is_word_char) || after.starts_with('(') {
                "separate the items of a group with `,`"
            } else {
                "expected `,` or `)`"
            };
            return Err(unexpected(after, self.token_span(after)).with_help(help));
        }
        Err(self.missing_item(input, context))
    }

    /// The error for an identifier that is not a layer kind.
    fn unknown_kind(&self, name: &str, at: usize) -> DslError {
        let error = DslError::new(at..at + name.len(), format!("unknown layer kind `{name}`"));
        match closest(name, LayerKind::ALL.map(LayerKind::name)) {
            Some(suggestion) => error.with_help(format!("did you mean `{suggestion}`?")),
            None => error.with_help("layer kinds are `dense` and `moe`"),
        }
    }

    /// The error for a position where an item was expected but `input` does not start one.
    fn missing_item(&self, input: &str, context: Context) -> DslError {
        let at = self.pos(input);
        match (context, input.chars().next()) {
            (Context::Start, None) => {
                DslError::new(0..self.src.len(), "a layer stack needs at least one layer")
                    .with_help("list layer kinds, e.g. `dense*3, moe*58`")
            }
            (Context::AfterComma(comma), None | Some(')')) => {
                DslError::new(comma..comma + 1, "expected a layer kind or `(` after `,`")
                    .with_help("remove the trailing `,`")
            }
            (Context::AfterParen(open), Some(')')) => {
                DslError::new(open..at + 1, "a group needs at least one layer")
            }
            (_, None) => DslError::new(at..at, "expected a layer kind or `(`")
                .with_help("layer kinds are `dense` and `moe`"),
            (_, Some(c)) if c.is_ascii_digit() => {
                unexpected(input, self.token_span(input)).with_help(count_first_help(input))
            }
            (_, Some(_)) => unexpected(input, self.token_span(input))
                .with_help("expected a layer kind (`dense` or `moe`) or `(`"),
        }
    }
}

/// The help for an item that opens with a number, as in `15*moe` or `2*(dense, moe)`: the
/// count goes after the item, `moe*15`.
fn count_first_help(input: &str) -> String {
    let digits = input.bytes().take_while(u8::is_ascii_digit).count();
    let count = &input[..digits];
    let Some(after) = ws(&input[digits..]).strip_prefix('*') else {
        return format!("a repeat count follows its item, e.g. `moe*{count}`");
    };
    let item = ws(after);
    // The item runs to the next `,` or `)` outside parentheses (or the end).
    let mut depth = 0usize;
    let end = item
        .char_indices()
        .find(|&(_, c)| match c {
            '(' => {
                depth += 1;
                false
            }
            ')' if depth > 0 => {
                depth -= 1;
                false
            }
            ',' | ')' => depth == 0,
            _ => false,
        })
        .map_or(item.len(), |(i, _)| i);
    let item = item[..end].trim_end();
    if item.is_empty() {
        format!("a repeat count follows its item, e.g. `moe*{count}`")
    } else {
        format!("the count goes after the item: `{item}*{count}`")
    }
}

#[cfg(test)]
mod tests {
    use super::LayerKind::{Dense, Moe};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_count_before_its_item_is_turned_around() {
        let e = err("dense, 15*moe");
        assert_eq!(e.span, 7..9);
        assert_eq!(
            e.help.as_deref(),
            Some("the count goes after the item: `moe*15`")
        );
        let e = err("2 * (dense, moe), moe");
        assert_eq!(
            e.help.as_deref(),
            Some("the count goes after the item: `(dense, moe)*2`")
        );
        let e = err("(dense, 3*moe)");
        assert_eq!(
            e.help.as_deref(),
            Some("the count goes after the item: `moe*3`")
        );
        let e = err("dense, 15");
        assert_eq!(
            e.help.as_deref(),
            Some("a repeat count follows its item, e.g. `moe*15`")
        );
    }

    /// Parses `src` and returns the error, failing the test if it parses.
    fn err(src: &str) -> DslError {
        match parse_stack(src) {
            Ok(layers) => panic!("`{src}` parsed to {layers:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's message and span, returning it for further checks.
    fn assert_err(src: &str, span: std::ops::Range<usize>, message: &str) -> DslError {
        let e = err(src);
        assert_eq!(e.message, message, "message for `{src}`");
        assert_eq!(e.span, span, "span for `{src}`");
        e
    }

    #[test]
    fn kinds_have_names() {
        assert_eq!(LayerKind::ALL, [Dense, Moe]);
        assert_eq!(Dense.name(), "dense");
        assert_eq!(Moe.to_string(), "moe");
        assert_eq!(format!("{:>6}", Moe), "   moe");
        assert_eq!(serde_json::to_string(&Dense).unwrap(), "\"dense\"");
        assert_eq!(serde_json::to_string(&Moe).unwrap(), "\"moe\"");
        assert!(Dense < Moe);
    }

    #[test]
    fn parses_single_kinds() {
        assert_eq!(parse_stack("dense").unwrap(), vec![Dense]);
        assert_eq!(parse_stack("moe").unwrap(), vec![Moe]);
        assert_eq!(parse_stack("  moe \n").unwrap(), vec![Moe]);
    }

    #[test]
    fn parses_lists_and_counts() {
        assert_eq!(
            parse_stack("dense*3, moe").unwrap(),
            vec![Dense, Dense, Dense, Moe]
        );
        assert_eq!(parse_stack("dense , moe*2").unwrap(), vec![Dense, Moe, Moe]);
        assert_eq!(parse_stack("dense\t*\t2").unwrap(), vec![Dense, Dense]);
        assert_eq!(parse_stack("moe*1").unwrap(), vec![Moe]);
        assert_eq!(parse_stack("moe*007").unwrap(), vec![Moe; 7]);
        let big = parse_stack("dense*3, moe*58").unwrap();
        assert_eq!(big.len(), 61);
        assert_eq!(big[..3], [Dense; 3]);
        assert!(big[3..].iter().all(|k| *k == Moe));
    }

    #[test]
    fn expands_groups_in_order() {
        assert_eq!(
            parse_stack("(dense, moe)*2").unwrap(),
            vec![Dense, Moe, Dense, Moe]
        );
        assert_eq!(
            parse_stack("dense, (dense, moe)*2, moe").unwrap(),
            vec![Dense, Dense, Moe, Dense, Moe, Moe]
        );
        assert_eq!(parse_stack("((moe))").unwrap(), vec![Moe]);
        assert_eq!(
            parse_stack("( (dense*2, moe) * 2 , dense ) * 2").unwrap(),
            [Dense, Dense, Moe, Dense, Dense, Moe, Dense].repeat(2)
        );
    }

    #[test]
    fn allows_exactly_the_maximum() {
        assert_eq!(parse_stack("dense*100000").unwrap().len(), 100_000);
        assert_eq!(
            parse_stack("(dense*1000, moe*1000)*50").unwrap().len(),
            100_000
        );
        assert_eq!(parse_stack("dense*99999, moe").unwrap().len(), 100_000);
    }

    #[test]
    fn allows_the_maximum_nesting() {
        let src = format!("{}dense{}", "(".repeat(64), ")".repeat(64));
        assert_eq!(parse_stack(&src).unwrap(), vec![Dense]);
    }

    #[test]
    fn formats_run_lengths() {
        assert_eq!(format_stack(&[Dense, Dense, Dense, Moe]), "dense*3, moe");
        assert_eq!(format_stack(&[Moe]), "moe");
        assert_eq!(format_stack(&[Dense, Moe, Dense]), "dense, moe, dense");
        assert_eq!(format_stack(&[]), "");
    }

    #[test]
    fn format_round_trips() {
        for src in [
            "dense*3, moe*58",
            "(dense, moe)*3",
            "moe, dense*2, moe*2",
            "dense",
        ] {
            let layers = parse_stack(src).unwrap();
            let formatted = format_stack(&layers);
            assert_eq!(parse_stack(&formatted).unwrap(), layers, "`{formatted}`");
        }
        assert_eq!(
            format_stack(&parse_stack("(dense, dense)*2, moe").unwrap()),
            "dense*4, moe"
        );
    }

    #[test]
    fn rejects_empty_stacks() {
        let e = assert_err("", 0..0, "a layer stack needs at least one layer");
        assert!(e.help.is_some());
        assert_err("   ", 0..3, "a layer stack needs at least one layer");
    }

    #[test]
    fn rejects_unknown_kinds_with_suggestions() {
        let e = assert_err("dense, mo", 7..9, "unknown layer kind `mo`");
        assert_eq!(e.help.as_deref(), Some("did you mean `moe`?"));
        let e = assert_err("Dense*2", 0..5, "unknown layer kind `Dense`");
        assert_eq!(e.help.as_deref(), Some("did you mean `dense`?"));
        let e = assert_err("(attention)", 1..10, "unknown layer kind `attention`");
        assert_eq!(e.help.as_deref(), Some("layer kinds are `dense` and `moe`"));
    }

    #[test]
    fn rejects_zero_counts() {
        let e = assert_err("dense*0", 6..7, "a repeat count must be at least 1");
        assert_eq!(e.help, None);
        assert_err("moe * 000", 6..9, "a repeat count must be at least 1");
    }

    #[test]
    fn rejects_missing_counts() {
        assert_err("dense*", 6..6, "expected a repeat count after `*`");
        assert_err("dense* ", 7..7, "expected a repeat count after `*`");
        assert_err("dense*-1", 6..7, "expected a repeat count after `*`");
        assert_err("dense*x2", 6..8, "expected a repeat count after `*`");
        assert_err("dense*é", 6..8, "expected a repeat count after `*`");
    }

    #[test]
    fn rejects_oversized_stacks() {
        let message = "the stack expands to more than 100000 layers";
        assert_err("dense*100001", 6..12, message);
        assert_err("dense*99999999999999999999999", 6..29, message);
        assert_err("moe*18446744073709551615", 4..24, message);
        assert_err("(dense*1000)*101", 13..16, message);
        assert_err("(dense*50000, moe)*18446744073709551615", 19..39, message);
        assert_err("dense*100000, moe", 14..17, message);
        assert_err("dense*50000, moe*50000, (dense)*2", 24..33, message);
    }

    #[test]
    fn rejects_trailing_commas() {
        let e = assert_err("dense,", 5..6, "expected a layer kind or `(` after `,`");
        assert_eq!(e.help.as_deref(), Some("remove the trailing `,`"));
        assert_err(
            "dense, moe , ",
            11..12,
            "expected a layer kind or `(` after `,`",
        );
        assert_err("(dense,)", 6..7, "expected a layer kind or `(` after `,`");
    }

    #[test]
    fn rejects_unclosed_groups() {
        let e = assert_err("(dense, moe", 11..11, "expected `)` to close the group");
        assert_eq!(e.help.as_deref(), Some("every `(` needs a matching `)`"));
        assert_err("dense, (moe*2  ", 13..13, "expected `)` to close the group");
        assert_err("((moe)", 6..6, "expected `)` to close the group");
        assert_err("(", 1..1, "expected a layer kind or `(`");
    }

    #[test]
    fn rejects_empty_groups() {
        assert_err("dense, ()", 7..9, "a group needs at least one layer");
        assert_err("( )*2", 0..3, "a group needs at least one layer");
    }

    #[test]
    fn rejects_garbage() {
        let e = assert_err("dense moe", 6..9, "unexpected `moe`");
        assert_eq!(
            e.help.as_deref(),
            Some("separate the items of a stack with `,`")
        );
        let e = assert_err("dense)", 5..6, "unexpected `)`");
        assert_eq!(e.help.as_deref(), Some("this `)` has no matching `(`"));
        let e = assert_err("dense*3*2", 7..8, "unexpected `*`");
        assert!(e.help.unwrap().contains("(dense*3)*2"));
        assert_err("dense; moe", 5..6, "unexpected `;`");
        assert_err("dense, ,moe", 7..8, "unexpected `,`");
        assert_err("3*dense", 0..1, "unexpected `3`");
        assert_err("*dense", 0..1, "unexpected `*`");
        assert_err("dense, 日本", 7..10, "unexpected `日`");
        assert_err("(dense moe)", 7..10, "unexpected `moe`");
        let e = assert_err("(dense;moe)", 6..7, "unexpected `;`");
        assert_eq!(e.help.as_deref(), Some("expected `,` or `)`"));
        assert_err("dense*2.5", 7..8, "unexpected `.`");
    }

    #[test]
    fn rejects_deep_nesting_without_overflowing() {
        let src = format!("{}dense{}", "(".repeat(65), ")".repeat(65));
        assert_err(&src, 64..65, "groups are nested more than 64 deep");
        let src = "(".repeat(100_000);
        assert_err(&src, 64..65, "groups are nested more than 64 deep");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_and_spans_are_valid(src in prop_oneof![
            any::<String>(),
            "[a-z()*,0-9 é]{0,30}",
            "(dense|moe|\\(|\\)|\\*|,| |[0-9]{1,25}){0,20}",
        ]) {
            match parse_stack(&src) {
                Ok(layers) => {
                    prop_assert!(!layers.is_empty());
                    prop_assert!(layers.len() as u64 <= MAX_LAYERS);
                    prop_assert_eq!(parse_stack(&format_stack(&layers)).unwrap(), layers);
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
    }
}
