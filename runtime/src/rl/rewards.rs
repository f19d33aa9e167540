//! Rule-based rewards (DeepSeek-R1 §2.2.2): a verifiable answer, and optionally a format.
//!
//! # Two answer formats
//!
//! - [`AnswerFormat::Plain`] — **the built-in arithmetic task scores this way.** The prompt is
//!   [`prompt`], the problem's [`Problem::question_text`] (`"Q: 12+7=? A: "`, trailing space
//!   included), exactly the start of the problem's line in the built-in corpus, so a model
//!   pretrained on that corpus continues it with the answer and a newline (`"19\n"`). The
//!   completion's answer is its first line, read by [`parse_answer`], the corpus's own strict
//!   reader: an optional `-` and decimal digits, then a newline or the end of the text; no
//!   spaces, no `+`, nothing else on the line ([`plain_answer_reward`]). No format is
//!   scored: a small pretrained model never writes tags, so the format reward would be 0 for
//!   every completion, a constant that the group normalization removes anyway.
//! - [`AnswerFormat::Tagged`] — for specs whose prompts ask for DeepSeek-R1's template,
//!   `<think> reasoning </think> <answer> answer </answer>`. Two rewards:
//!   [`format_reward`] for the structure, [`accuracy_reward`] for the integer inside the answer
//!   block.
//!
//! # The tagged format, exactly
//!
//! [`parse_tagged`] (and so [`format_reward`]) accepts a completion iff it is
//!
//! ```text
//! W <think> T </think> W <answer> A </answer> W
//! ```
//!
//! - `W`: optional ASCII whitespace (space, `\t`, `\n`, `\r`, form feed) — at the start,
//!   between the two blocks, and at the end. Any other text outside the blocks is rejected.
//! - The four tags are written exactly so, lower case, without spaces or attributes, and each
//!   appears **exactly once** in the whole completion: no duplicated, nested or stray tag
//!   anywhere (in `T` or `A` included). `<think>` comes first, `<answer>` second.
//! - `T`, the reasoning, is any text and **may be empty** (`<think></think>`): the format
//!   reward checks the structure, not the amount of thinking.
//! - `A` must contain something other than whitespace. It need not be an integer: whether it
//!   is right is the accuracy reward's business.
//!
//! # Accuracy in the tagged format
//!
//! [`accuracy_reward`] is 1 iff the completion contains exactly one `<answer>` and exactly one
//! `</answer>`, the opening tag first, and the text between them is the target by
//! [`parse_integer`]: ASCII whitespace around it is ignored, then an optional `+` or `-` and one
//! or more decimal digits (leading zeros allowed), in the `i64` range. `"19"`, `" -3 "`,
//! `"+5"`, `"007"` parse; `"19abc"`, `""`, `"1 9"`, `"- 3"`, `"1e3"`, `"19."` do not.
//!
//! The answer block is required (there is no credit for an integer elsewhere), but the rest of
//! the format is not: a correct answer block in a malformed completion still earns accuracy,
//! so the two rewards measure two different things. With the default weights, accuracy 1 and
//! format 0.1 ([`RewardWeights`]), a right answer always outranks a well-formed wrong one, and
//! a right, well-formed answer (1.1) outranks a right, malformed one (1.0). Only these ratios
//! matter: group normalization removes any constant and any common positive factor.
//!
//! Completions should be cut at the end of the answer: text generated after `</answer>` makes
//! the format wrong (accuracy still counts), so the generator should stop at `</answer>` (or,
//! for the plain format, at the first newline).

use crate::data::builtin::{parse_answer, split_scratchpad, Problem};

/// The tags of the tagged format.
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";
const TAGS: [&str; 4] = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE];

/// The prompt of a built-in problem: [`Problem::question_text`], `"Q: 12+7=? A: "`, the start
/// of the problem's corpus line, so the expected completion is `answer_text() + "\n"`.
pub fn prompt(problem: &Problem) -> String {
    problem.question_text()
}

/// The two parts of a well-formed tagged completion (slices of it, untrimmed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tagged<'a> {
    /// The text between `<think>` and `</think>`; may be empty.
    pub think: &'a str,
    /// The text between `<answer>` and `</answer>`; not blank.
    pub answer: &'a str,
}

/// Splits a completion in the tagged format into its two blocks, or returns `None` if the
/// format is wrong (see the [module docs](self) for the exact rules).
pub fn parse_tagged(completion: &str) -> Option<Tagged<'_>> {
    let text = completion.trim_ascii();
    let rest = text.strip_prefix(THINK_OPEN)?;
    let (think, rest) = rest.split_once(THINK_CLOSE)?;
    let rest = rest.trim_ascii_start().strip_prefix(ANSWER_OPEN)?;
    let answer = rest.strip_suffix(ANSWER_CLOSE)?;
    let has_tag = |s: &str| TAGS.iter().any(|tag| s.contains(tag));
    if has_tag(think) || has_tag(answer) || answer.trim_ascii().is_empty() {
        return None;
    }
    Some(Tagged { think, answer })
}

/// 1.0 if the completion has the tagged format ([`parse_tagged`]), else 0.0.
pub fn format_reward(completion: &str) -> f64 {
    indicator(parse_tagged(completion).is_some())
}

/// The text of the completion's one answer block: the text between its only `<answer>` and its
/// only `</answer>`, which must come after it. `None` without exactly one of each. The rest of
/// the completion is not looked at.
pub fn extract_answer(completion: &str) -> Option<&str> {
    if completion.matches(ANSWER_OPEN).count() != 1 || completion.matches(ANSWER_CLOSE).count() != 1
    {
        return None;
    }
    let (_, after) = completion.split_once(ANSWER_OPEN)?;
    let (answer, _) = after.split_once(ANSWER_CLOSE)?;
    Some(answer)
}

/// Reads an integer strictly: optional surrounding ASCII whitespace, an optional `+` or `-`,
/// then one or more ASCII digits, and nothing else; `None` outside the `i64` range.
pub fn parse_integer(text: &str) -> Option<i64> {
    let text = text.trim_ascii();
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// 1.0 if the completion's answer block ([`extract_answer`]) holds `target` ([`parse_integer`]),
/// else 0.0. The rest of the format is not required; see the [module docs](self).
pub fn accuracy_reward(completion: &str, target: i64) -> f64 {
    indicator(extract_answer(completion).and_then(parse_integer) == Some(target))
}

/// The answer of a plain completion: its first line as the built-in corpus writes answers
/// ([`parse_answer`]: `19`, `-5`, nothing else on the line), after an optional scratchpad
/// that opens the completion, `<think>…</think>`, closed on the same line and holding no
/// other tag. `"<think>7+2=09 1+0+0=01</think>19\n"` answers 19 as `"19\n"` does; an
/// unclosed, nested or repeated scratchpad answers nothing.
pub fn plain_answer(completion: &str) -> Option<i64> {
    let (work, answer) = split_scratchpad(completion)?;
    let has_tag = |s: &str| TAGS.iter().any(|tag| s.contains(tag));
    if work.is_some_and(has_tag) || has_tag(answer) {
        return None;
    }
    parse_answer(answer)
}

/// 1.0 if the completion's [`plain_answer`] is `target`, else 0.0. **The built-in task's
/// accuracy reward.**
pub fn plain_answer_reward(completion: &str, target: i64) -> f64 {
    indicator(plain_answer(completion) == Some(target))
}

/// 1.0 or 0.0.
fn indicator(yes: bool) -> f64 {
    if yes {
        1.0
    } else {
        0.0
    }
}

/// How completions write their answers; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerFormat {
    /// The answer is the first line, as in the built-in corpus; no format reward.
    Plain,
    /// `<think>…</think><answer>…</answer>`, with a format reward.
    Tagged,
}

/// The weights of the reward terms in [`Reward::total`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardWeights {
    /// The weight of accuracy; default 1.0.
    pub accuracy: f64,
    /// The weight of the format; default 0.1, so a right answer always outranks a good format.
    pub format: f64,
}

impl Default for RewardWeights {
    fn default() -> RewardWeights {
        RewardWeights {
            accuracy: 1.0,
            format: 0.1,
        }
    }
}

/// The reward terms of one completion, each 0.0 or 1.0.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reward {
    /// Whether the answer is right.
    pub accuracy: f64,
    /// Whether the format is right (always 0.0 for [`AnswerFormat::Plain`], which has none).
    pub format: f64,
}

impl Reward {
    /// `weights.accuracy · accuracy + weights.format · format`: the scalar reward that goes into
    /// [`super::objective::group_advantages`].
    pub fn total(&self, weights: &RewardWeights) -> f64 {
        weights.accuracy * self.accuracy + weights.format * self.format
    }
}

/// Scores one completion against an integer target.
///
/// - [`AnswerFormat::Plain`]: accuracy by [`plain_answer_reward`], format 0.
/// - [`AnswerFormat::Tagged`]: accuracy by [`accuracy_reward`], format by [`format_reward`].
pub fn score(completion: &str, target: i64, format: AnswerFormat) -> Reward {
    match format {
        AnswerFormat::Plain => Reward {
            accuracy: plain_answer_reward(completion, target),
            format: 0.0,
        },
        AnswerFormat::Tagged => Reward {
            accuracy: accuracy_reward(completion, target),
            format: format_reward(completion),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::builtin::{heldout_problems, training_problems, Op};
    use proptest::prelude::*;

    #[test]
    fn prompts_continue_like_corpus_lines() {
        let p = Problem::new(12, Op::Add, 7);
        assert_eq!(prompt(&p), "Q: 12+7=? A: ");
        assert_eq!(prompt(&Problem::new(3, Op::Sub, 8)), "Q: 3-8=? A: ");
        for p in heldout_problems().into_iter().chain(training_problems()) {
            let completion = format!("{}\n", p.answer_text());
            assert_eq!(format!("{}{completion}", prompt(&p)), p.line());
            assert_eq!(plain_answer_reward(&completion, p.answer()), 1.0, "{p:?}");
            assert_eq!(
                plain_answer_reward(&completion, p.answer() + 1),
                0.0,
                "{p:?}"
            );
        }
    }

    #[test]
    fn plain_answers_follow_the_corpus_format() {
        let right = [
            ("19", 19),
            ("19\n", 19),
            ("19\nQ: 1+1=? A: 2\n", 19),
            ("-5\n", -5),
            ("0\nanything", 0),
            ("<think>7+2=09 1+0+0=01</think>19\n", 19),
            ("<think></think>-5", -5),
            ("<think>whatever it likes</think>19\nQ: 1+1=? A: 2\n", 19),
        ];
        for (completion, target) in right {
            assert_eq!(
                plain_answer_reward(completion, target),
                1.0,
                "{completion:?}"
            );
        }
        let wrong = [
            ("18\n", 19),
            (" 19\n", 19),
            ("19 \n", 19),
            ("+19\n", 19),
            ("19abc", 19),
            ("1 9", 19),
            ("", 19),
            ("\n19", 19),
            ("- 5", -5),
            ("5", -5),
            ("<think></think><answer>19</answer>", 19),
            ("<think>7+2=09", 19),
            ("<think>7+2\n</think>19", 19),
            ("<think><think></think>19", 19),
            ("<think></think>19</think>", 19),
            ("<think></think><think></think>19", 19),
            ("<think></think> 19", 19),
            ("19<think></think>", 19),
        ];
        for (completion, target) in wrong {
            assert_eq!(
                plain_answer_reward(completion, target),
                0.0,
                "{completion:?}"
            );
        }
    }

    #[test]
    fn formats_accepted() {
        let cases = [
            ("<think>7+12</think><answer>19</answer>", "7+12", "19"),
            (
                "\n <think>\nadd them\n</think>\n\n<answer>\n19\n</answer>\n",
                "\nadd them\n",
                "\n19\n",
            ),
            ("<think></think><answer>1</answer>", "", "1"),
            ("<think> </think> \t<answer>x</answer>", " ", "x"),
            (
                "<think>a<b and b>c, <thin</think><answer>nineteen</answer>",
                "a<b and b>c, <thin",
                "nineteen",
            ),
            (
                "<think>think</think><answer>answer tags: <answer</answer>",
                "think",
                "answer tags: <answer",
            ),
        ];
        for (completion, think, answer) in cases {
            assert_eq!(
                parse_tagged(completion),
                Some(Tagged { think, answer }),
                "{completion:?}"
            );
            assert_eq!(format_reward(completion), 1.0, "{completion:?}");
        }
    }

    #[test]
    fn formats_rejected() {
        for completion in [
            "",
            "19",
            // Missing blocks or tags.
            "<answer>19</answer>",
            "<think>x</think>",
            "<think>x<answer>19</answer>",
            "<think>x</think><answer>19",
            "x</think><answer>19</answer>",
            "<think>x</think>19</answer>",
            // Wrong order.
            "<answer>19</answer><think>x</think>",
            "</think>x<think><answer>19</answer>",
            // Text outside the blocks.
            "So: <think>x</think><answer>19</answer>",
            "<think>x</think> so <answer>19</answer>",
            "<think>x</think><answer>19</answer> done",
            "<think>x</think><answer>19</answer>\n<think>",
            // Duplicated or nested tags.
            "<think>a</think><think>b</think><answer>1</answer>",
            "<think>a<think>b</think>c</think><answer>1</answer>",
            "<think>a</think><answer>1</answer><answer>2</answer>",
            "<think>a</think><answer><answer>1</answer></answer>",
            "<think>a</answer></think><answer>1</answer>",
            "<think>a</think><answer>1</think></answer>",
            "<think>a</think><answer>1<think></answer>",
            // A blank answer.
            "<think>a</think><answer></answer>",
            "<think>a</think><answer> \n </answer>",
            // Tags not written exactly.
            "<THINK>a</THINK><answer>1</answer>",
            "<think >a</think><answer>1</answer>",
            "<think>a</think><answer >1</answer>",
            "< think>a</think><answer>1</answer>",
            // Non-ASCII whitespace outside is text.
            "\u{a0}<think>a</think><answer>1</answer>",
        ] {
            assert_eq!(parse_tagged(completion), None, "{completion:?}");
            assert_eq!(format_reward(completion), 0.0, "{completion:?}");
        }
    }

    #[test]
    fn integers_parse_strictly() {
        for (text, value) in [
            ("19", 19),
            (" -3 ", -3),
            ("+5", 5),
            ("\n42\n", 42),
            ("007", 7),
            ("-0", 0),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(parse_integer(text), Some(value), "{text:?}");
        }
        for text in [
            "",
            " ",
            "+",
            "-",
            "19abc",
            "abc19",
            "1 9",
            "- 3",
            "+-3",
            "--3",
            "++3",
            "1e3",
            "19.",
            "19.0",
            "0x13",
            "١٩",
            "−3",
            "9223372036854775808",
            "nineteen",
        ] {
            assert_eq!(parse_integer(text), None, "{text:?}");
        }
    }

    #[test]
    fn accuracy_reads_the_answer_block() {
        let right = [
            ("<think>12+7</think><answer>19</answer>", 19),
            ("<think></think><answer> 19 </answer>", 19),
            ("<think>x</think><answer>+19</answer>", 19),
            ("<think>x</think><answer>\n-3\n</answer>", -3),
            // Accuracy does not need the rest of the format: one answer block is enough.
            ("<answer>19</answer>", 19),
            ("I think it is <answer>19</answer>, right?", 19),
            ("<think>x</think><think>y</think><answer>19</answer>", 19),
        ];
        for (completion, target) in right {
            assert_eq!(accuracy_reward(completion, target), 1.0, "{completion:?}");
        }
        let wrong = [
            ("<think>x</think><answer>18</answer>", 19),
            ("<think>x</think><answer>-19</answer>", 19),
            ("<think>x</think><answer>19abc</answer>", 19),
            ("<think>x</think><answer></answer>", 19),
            ("<think>x</think><answer>1 9</answer>", 19),
            ("<think>x</think><answer>- 3</answer>", -3),
            ("<think>x</think><answer>19.0</answer>", 19),
            // No answer block: an integer elsewhere earns nothing.
            ("19", 19),
            ("<think>19</think>", 19),
            ("<think>x</think>19</answer>", 19),
            ("<think>x</think><answer>19", 19),
            ("</answer>19<answer>", 19),
            // More than one answer block: no hedging.
            ("<answer>19</answer><answer>19</answer>", 19),
            ("<answer>18</answer><answer>19</answer>", 19),
            ("<answer><answer>19</answer></answer>", 19),
        ];
        for (completion, target) in wrong {
            assert_eq!(accuracy_reward(completion, target), 0.0, "{completion:?}");
        }
    }

    #[test]
    fn scores_and_totals() {
        let w = RewardWeights::default();
        assert_eq!(
            w,
            RewardWeights {
                accuracy: 1.0,
                format: 0.1
            }
        );
        let tagged = |c: &str| score(c, 19, AnswerFormat::Tagged);
        let right_formatted = tagged("<think>12+7</think><answer>19</answer>");
        assert_eq!(
            right_formatted,
            Reward {
                accuracy: 1.0,
                format: 1.0
            }
        );
        let right_malformed = tagged("<answer>19</answer> done");
        assert_eq!(
            right_malformed,
            Reward {
                accuracy: 1.0,
                format: 0.0
            }
        );
        let wrong_formatted = tagged("<think>12+7</think><answer>20</answer>");
        assert_eq!(
            wrong_formatted,
            Reward {
                accuracy: 0.0,
                format: 1.0
            }
        );
        assert_eq!(tagged("19"), Reward::default());
        let totals: Vec<f64> = [
            right_formatted,
            right_malformed,
            wrong_formatted,
            Reward::default(),
        ]
        .iter()
        .map(|r| r.total(&w))
        .collect();
        assert_eq!(totals, [1.1, 1.0, 0.1, 0.0]);
        let custom = RewardWeights {
            accuracy: 2.0,
            format: 0.5,
        };
        assert_eq!(right_formatted.total(&custom), 2.5);
        // The built-in task: accuracy from the first line, no format.
        assert_eq!(
            score("19\n", 19, AnswerFormat::Plain),
            Reward {
                accuracy: 1.0,
                format: 0.0
            }
        );
        assert_eq!(score("18\n", 19, AnswerFormat::Plain), Reward::default());
        assert_eq!(
            score(
                "<think>x</think><answer>19</answer>",
                19,
                AnswerFormat::Plain
            ),
            Reward::default()
        );
    }

    proptest! {
        #[test]
        fn integers_round_trip(n in any::<i64>(), left in "[ \t\n\r]{0,3}", right in "[ \t\n\r]{0,3}", plus in any::<bool>()) {
            let sign = if plus && n >= 0 { "+" } else { "" };
            let text = format!("{left}{sign}{n}{right}");
            prop_assert_eq!(parse_integer(&text), Some(n));
            let completion = format!("<think>{n}?</think>{left}<answer>{text}</answer>{right}");
            prop_assert_eq!(score(&completion, n, AnswerFormat::Tagged), Reward { accuracy: 1.0, format: 1.0 });
            prop_assert_eq!(accuracy_reward(&completion, n.wrapping_add(1)), 0.0);
        }

        #[test]
        fn tag_free_blocks_are_well_formed(
            think in "[a-z0-9 >/=+*\n-]{0,24}",
            answer in "[a-z0-9 >/=+*\n-]{0,12}[a-z0-9]",
            gap in "[ \n]{0,2}",
        ) {
            let completion = format!("<think>{think}</think>{gap}<answer>{answer}</answer>");
            prop_assert_eq!(parse_tagged(&completion), Some(Tagged { think: &think, answer: &answer }));
        }

        #[test]
        fn an_extra_tag_anywhere_is_rejected(
            think in "[a-z ]{0,10}",
            tag in prop::sample::select(TAGS.to_vec()),
            at in 0usize..1000,
        ) {
            let good = format!("<think>{think}</think><answer>7</answer>");
            // Insert at a char boundary outside the existing tags' middles: the text is ASCII,
            // and inserting a whole tag anywhere adds a fifth tag occurrence.
            let at = at % (good.len() + 1);
            let bad = format!("{}{tag}{}", &good[..at], &good[at..]);
            prop_assert_eq!(format_reward(&bad), 0.0, "{:?}", bad);
        }

        #[test]
        fn any_text_is_scored_without_panicking(completion in "\\PC{0,40}|[<>/a-z0-9 ]{0,60}", target in -100i64..100) {
            let reward = score(&completion, target, AnswerFormat::Tagged);
            prop_assert!(reward.accuracy == 0.0 || reward.accuracy == 1.0);
            prop_assert!(reward.format == 0.0 || reward.format == 1.0);
            let plain = score(&completion, target, AnswerFormat::Plain);
            prop_assert_eq!(plain.format, 0.0);
        }
    }
}
