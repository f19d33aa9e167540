//! Lexing helpers shared by the stack and expression parsers.

use nom::bytes::complete::take_while;
use nom::character::complete::{char, multispace0, satisfy};
use nom::combinator::recognize;
use nom::{IResult, Parser};

use super::DslError;

/// The result of one parsing step: the remaining input and what was parsed, or an error.
pub(crate) type Step<'a, T> = Result<(&'a str, T), DslError>;

/// Skips whitespace.
pub(crate) fn ws(input: &str) -> &str {
    let parsed: IResult<&str, &str> = multispace0(input);
    parsed.map_or(input, |(rest, _)| rest)
}

/// Whether `c` can be part of an identifier or a number.
pub(crate) fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Recognises an identifier: a letter or `_` followed by letters, digits and `_`.
pub(crate) fn identifier(input: &str) -> IResult<&str, &str> {
    recognize((
        satisfy(|c| c.is_ascii_alphabetic() || c == '_'),
        take_while(is_word_char),
    ))
    .parse(input)
}

/// Recognises one character.
pub(crate) fn symbol(c: char) -> impl Fn(&str) -> IResult<&str, char> {
    move |input| char(c).parse(input)
}
