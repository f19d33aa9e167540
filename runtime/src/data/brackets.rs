//! Bracket closing: the built-in corpus's second rule-checked task.
//!
//! A [`Brackets`] problem is an unfinished word of four bracket kinds, `()`, `[]`, `{}` and
//! `<>`: a prefix of some balanced word, with at least one bracket still open, at most
//! [`MAX_LEN`] long. Its corpus line is `B: ([]{(<> = )})` and `\n`: the prompt
//! ([`Brackets::question_text`], `"B: ([]{(<> = "` with its trailing space), then the
//! shortest closing ([`Brackets::closing`], the open brackets closed innermost first).
//!
//! The answer is checked by a parser, not against a stored string: [`closes`] accepts any
//! completion line made only of brackets after which the prefix is a balanced word, so
//! `)})` and `)()})` both close `([]{(<>`. The shortest closing is the only one of its
//! length; the corpus always writes it.
//!
//! # The held-out set
//!
//! A prefix is held out when a fixed 64-bit hash of its bytes is divisible by 10
//! ([`is_heldout`]), about a tenth of every length's prefixes. Held-out prefixes never appear
//! in a built-in corpus, nor among the questions GRPO trains on; [`heldout_set`] lists a fixed
//! sample of them for evaluation.

use super::rng::{mix64, Rng};

/// The longest prefix of a problem, in brackets.
pub const MAX_LEN: usize = 10;

/// The shortest prefix of a problem the corpus and the task draw.
pub const MIN_LEN: usize = 2;

/// The bracket pairs, opener then closer.
pub const PAIRS: [(char, char); 4] = [('(', ')'), ('[', ']'), ('{', '}'), ('<', '>')];

/// The closer of an opener, or `None` for any other character.
fn closer_of(open: char) -> Option<char> {
    PAIRS.iter().find(|p| p.0 == open).map(|p| p.1)
}

/// Whether `c` closes some bracket.
fn is_closer(c: char) -> bool {
    PAIRS.iter().any(|p| p.1 == c)
}

/// The brackets left open after `text`, innermost last, as their closers; `None` if `text`
/// holds anything but brackets or closes a bracket that is not the innermost open one.
fn open_stack(text: &str) -> Option<Vec<char>> {
    let mut stack = Vec::new();
    for c in text.chars() {
        if let Some(close) = closer_of(c) {
            stack.push(close);
        } else if !is_closer(c) || stack.pop() != Some(c) {
            return None;
        }
    }
    Some(stack)
}

/// One bracket-closing problem: a prefix of a balanced word with at least one bracket open.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Brackets {
    prefix: String,
}

impl Brackets {
    /// The problem of `prefix`, if it is one: 1 to [`MAX_LEN`] brackets, every closer
    /// matching the innermost open bracket, and at least one bracket left open.
    pub fn new(prefix: &str) -> Option<Brackets> {
        let len = prefix.chars().count();
        let open = open_stack(prefix)?;
        ((1..=MAX_LEN).contains(&len) && !open.is_empty()).then(|| Brackets {
            prefix: prefix.to_string(),
        })
    }

    /// A random problem of [`MIN_LEN`]`..=`[`MAX_LEN`] brackets: the length uniform, then
    /// each bracket closes the innermost open one with probability 2/5 (when one is open)
    /// or opens one of the four kinds; drawn again if nothing is left open.
    pub fn random(rng: &mut Rng) -> Brackets {
        loop {
            let len = MIN_LEN + rng.below_usize(MAX_LEN - MIN_LEN + 1);
            let mut prefix = String::with_capacity(len);
            let mut open = Vec::new();
            for _ in 0..len {
                if !open.is_empty() && rng.below(5) < 2 {
                    prefix.push(open.pop().expect("not empty"));
                } else {
                    let (o, c) = PAIRS[rng.below_usize(PAIRS.len())];
                    prefix.push(o);
                    open.push(c);
                }
            }
            if !open.is_empty() {
                return Brackets { prefix };
            }
        }
    }

    /// The unfinished word.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shortest closing: the open brackets' closers, innermost first.
    pub fn closing(&self) -> String {
        let stack = open_stack(&self.prefix).expect("a problem's prefix is valid");
        stack.iter().rev().collect()
    }

    /// How many brackets are left open (the closing's length).
    pub fn depth(&self) -> usize {
        open_stack(&self.prefix).map_or(0, |s| s.len())
    }

    /// The prompt: `"B: ([]{(<> = "`, with the trailing space.
    pub fn question_text(&self) -> String {
        format!("B: {} = ", self.prefix)
    }

    /// The corpus line: the prompt, the shortest closing and `\n`.
    pub fn line(&self) -> String {
        format!("{}{}\n", self.question_text(), self.closing())
    }

    /// Reads a line of the corpus's format (with or without its `\n`) into the problem and
    /// the answer it states (which need not close it); `None` for any other text.
    pub fn parse_line(line: &str) -> Option<(Brackets, &str)> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (prefix, answer) = line.strip_prefix("B: ")?.split_once(" = ")?;
        Some((Brackets::new(prefix)?, answer))
    }
}

/// The verifier: whether the completion's first line closes `prefix`, i.e. is one or more
/// brackets after which `prefix` followed by it is a balanced word. Anything else on the
/// line (a space, a letter) fails it; text after the first newline is not read.
pub fn closes(prefix: &str, completion: &str) -> bool {
    let line = completion.split('\n').next().unwrap_or("");
    // One parse of the whole word: a mismatch anywhere, or any other character, fails it.
    !line.is_empty() && open_stack(&format!("{prefix}{line}")).is_some_and(|s| s.is_empty())
}

/// Whether a problem is held out of every built-in corpus and of GRPO's training questions:
/// `h = mix(…mix(mix(SALT + b₀) + b₁)… + bₙ)` over the prefix's bytes, where `mix` is
/// SplitMix64's finalizer and additions wrap; held out when `h % 10 == 0`.
pub fn is_heldout(problem: &Brackets) -> bool {
    /// A fixed constant, unrelated to the arithmetic rule's.
    const SALT: u64 = 0x6b69_6c6e_6272_6b74;
    let h = problem
        .prefix
        .bytes()
        .fold(mix64(SALT), |h, b| mix64(h.wrapping_add(u64::from(b))));
    h % 10 == 0
}

/// `n` distinct held-out problems, always the same: drawn by [`Brackets::random`] from a fixed
/// seed, keeping the held-out ones not drawn before.
pub fn heldout_set(n: usize) -> Vec<Brackets> {
    let mut rng = Rng::with_stream(0x6272_6b74, 0x6865_6c64);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let b = Brackets::random(&mut rng);
        if is_heldout(&b) && seen.insert(b.clone()) {
            out.push(b);
        }
    }
    out
}

/// A random problem that is not held out ([`Brackets::random`], drawn again while held out).
pub fn training_problem(rng: &mut Rng) -> Brackets {
    loop {
        let b = Brackets::random(rng);
        if !is_heldout(&b) {
            return b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_format() {
        let b = Brackets::new("([]{(<>").expect("a valid prefix");
        assert_eq!(b.question_text(), "B: ([]{(<> = ");
        assert_eq!(b.closing(), ")})");
        assert_eq!(b.depth(), 3);
        assert_eq!(b.line(), "B: ([]{(<> = )})\n");
        assert_eq!(Brackets::parse_line(&b.line()), Some((b.clone(), ")})")));
        assert_eq!(
            Brackets::parse_line("B: (( = x"),
            Some((Brackets::new("((").unwrap(), "x"))
        );
        for bad in [
            "B: () = ",
            "B: (] = ]",
            "B: ( =)",
            "Q: ( = )",
            "B: a( = )",
            "B:  ( = )",
        ] {
            assert_eq!(Brackets::parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_rejects_what_is_not_an_open_prefix() {
        for bad in ["", "()", "(]", ")", "(((((((((((", "( ", "x"] {
            assert_eq!(Brackets::new(bad), None, "{bad:?}");
        }
        assert!(Brackets::new("((((((((((").is_some());
    }

    #[test]
    fn the_parser_accepts_every_closing_and_nothing_else() {
        let p = "([]{(<>";
        for good in [")})", ")()})", ")}[<>])", ")})\nanything"] {
            assert!(closes(p, good), "{good:?}");
        }
        for bad in [
            "", ")}", ")}))", ")})x", " )})", ")] )", "}))", ")})(", "\n)})",
        ] {
            assert!(!closes(p, bad), "{bad:?}");
        }
        assert!(!closes("(]", "]"), "an invalid prefix is closed by nothing");
    }

    #[test]
    fn random_problems_span_the_lengths_and_close_by_their_closing() {
        let mut rng = Rng::new(3);
        let mut lengths = [0usize; MAX_LEN + 1];
        for _ in 0..5_000 {
            let b = Brackets::random(&mut rng);
            assert_eq!(Brackets::new(b.prefix()).as_ref(), Some(&b));
            assert!(closes(b.prefix(), &b.closing()));
            lengths[b.prefix().len()] += 1;
        }
        assert!(lengths[..MIN_LEN].iter().all(|&n| n == 0));
        assert!(lengths[MIN_LEN..].iter().all(|&n| n > 300), "{lengths:?}");
    }

    #[test]
    fn the_heldout_rule_is_pinned_and_the_set_is_fixed() {
        let mut rng = Rng::new(8);
        let draws: Vec<Brackets> = (0..20_000).map(|_| Brackets::random(&mut rng)).collect();
        let share = draws.iter().filter(|b| is_heldout(b)).count() as f64 / draws.len() as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
        let set = heldout_set(200);
        assert_eq!(set, heldout_set(200));
        assert!(set.iter().all(is_heldout));
        let distinct: std::collections::HashSet<_> = set.iter().collect();
        assert_eq!(distinct.len(), 200);
        // Changing the rule would silently change every evaluation.
        let pinned: Vec<&str> = set[..4].iter().map(Brackets::prefix).collect();
        assert_eq!(pinned, ["[[<>][", "[[<><", "<<((<<", "({}{"]);
        let mut rng = Rng::new(9);
        assert!((0..2_000).all(|_| !is_heldout(&training_problem(&mut rng))));
    }
}
