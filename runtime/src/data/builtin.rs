//! The built-in synthetic corpus: text that needs no files.
//!
//! [`builtin_corpus`] writes lines of three kinds, chosen independently per line:
//!
//! - **Arithmetic** ([`ARITHMETIC_IN_20`] lines in 20, about two thirds of the bytes): one
//!   training problem of the universe below, drawn uniformly, with its answer,
//!   `Q: 12+7=? A: 19`. One addition or subtraction in [`WORKED_ONE_IN`] is written worked,
//!   with the column scratchpad of [`Problem::scratchpad`] before the answer,
//!   `Q: 47+38=? A: <think>7+8=15 4+3+1=08</think>85`, so that a pretrained model can answer
//!   either way and GRPO can find that thinking pays (docs/rl.md). An 8 MiB corpus holds
//!   about 208 000 problems.
//! - **Bracket closing** ([`BRACKETS_IN_20`] lines in 20): one training problem of
//!   [`super::brackets`] with its shortest closing, `B: ([]{(<> = )})`.
//! - **English-like prose** (the other lines): one to three sentences from a small hand-written
//!   grammar (determiners, adjectives, nouns, verbs, prepositions, names; statements, compound
//!   and subordinate clauses, questions, exclamations, quoted speech, appositives), or now and
//!   then a title-cased heading. Prose has no digits, no brackets and no `Q: ` or `B: `, so
//!   problems appear only on their own lines. All of it is ASCII, so every corpus is valid
//!   UTF-8.
//!
//! # The arithmetic universe
//!
//! A [`Problem`] is `a op b` with `a` and `b` in `0..=99` ([`OPERAND_MAX`]) and `op` one of
//! `+`, `-`, `*`: 3 × 100 × 100 = 30 000 problems ([`UNIVERSE_SIZE`]). Subtraction may be
//! negative (`Q: 3-8=? A: -5`). A line is the problem's [`Problem::question_text`] (the prompt,
//! `Q: 12+7=? A: ` with its trailing space), its [`Problem::answer_text`] (`19`), and `\n`.
//!
//! # The scratchpad
//!
//! A worked line writes the column arithmetic between `<think>` and `</think>`, fixed-width so
//! that every step is the same few tokens:
//!
//! - addition, units then tens, each sum with its carry written as two digits:
//!   `47+38` → `7+8=15 4+3+1=08`, answer `85`;
//! - subtraction of the smaller from the larger, each column's borrow then its digit:
//!   `62-38` → `2-8=14 6-3-1=02` (2−8 borrows 1 and leaves 4; 6−3−1 leaves 2), answer `24`;
//!   a negative result opens the scratchpad with `-` and works `b−a`: `38-62` →
//!   `-2-8=14 6-3-1=02`, answer `-24`.
//!
//! The answer follows `</think>` on the same line, written as on a direct line.
//!
//! # The held-out set
//!
//! About a tenth of the universe (2 927 problems) is held out for evaluation (GRPO's
//! arithmetic task reuses it): a problem is held out when a fixed 64-bit hash of
//! `(op, a, b)` is divisible by 10 (see [`is_heldout`]). Held-out problems never appear in a
//! built-in corpus, worked or not, whatever the seed or size; a model that answers them has
//! generalized rather than memorized. Bracket problems have their own rule
//! ([`super::brackets::is_heldout`]). The rule is part of
//! the format: changing it would silently change every evaluation, so a test pins it.
//! Commutation is deliberately not taken into account: `3+5` can be a training problem while
//! `5+3` is held out.

use std::fmt::Write as _;

use super::brackets;
use super::rng::{mix64, Rng};

/// The largest operand: `a` and `b` range over `0..=OPERAND_MAX`.
pub const OPERAND_MAX: u32 = 99;

/// The number of problems in the universe: three operators times 100 × 100 operand pairs.
pub const UNIVERSE_SIZE: usize = 3 * 100 * 100;

/// Of every 20 lines of a built-in corpus, this many are arithmetic problems on average.
pub const ARITHMETIC_IN_20: u64 = 15;

/// Of every 20 lines of a built-in corpus, this many are bracket-closing problems on average.
pub const BRACKETS_IN_20: u64 = 2;

/// One addition or subtraction line in `WORKED_ONE_IN` carries its scratchpad.
pub const WORKED_ONE_IN: u64 = 3;

/// An arithmetic operator of the built-in problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Addition, written `+`.
    Add,
    /// Subtraction, written `-`; the answer may be negative.
    Sub,
    /// Multiplication, written `*`.
    Mul,
}

impl Op {
    /// Every operator, in the order the problem lists use.
    pub const ALL: [Op; 3] = [Op::Add, Op::Sub, Op::Mul];

    /// The character that writes the operator in a problem line.
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    /// The operator written by `symbol`, if any.
    pub fn from_symbol(symbol: char) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.symbol() == symbol)
    }

    /// The operator's position in [`Op::ALL`], which is also its input to the held-out hash.
    fn index(self) -> u64 {
        match self {
            Op::Add => 0,
            Op::Sub => 1,
            Op::Mul => 2,
        }
    }
}

/// One arithmetic problem, `a op b`.
///
/// The fields are public so that callers can build any problem; only those with both operands
/// in `0..=OPERAND_MAX` belong to the universe ([`Problem::in_universe`]), and only those can
/// appear in a corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    /// The left operand.
    pub a: u32,
    /// The right operand.
    pub b: u32,
    /// The operator.
    pub op: Op,
}

impl Problem {
    /// The problem `a op b`.
    pub fn new(a: u32, op: Op, b: u32) -> Problem {
        Problem { a, b, op }
    }

    /// Whether both operands are in `0..=OPERAND_MAX`.
    pub fn in_universe(&self) -> bool {
        self.a <= OPERAND_MAX && self.b <= OPERAND_MAX
    }

    /// The exact answer; an `i64` holds it for every pair of `u32` operands.
    pub fn answer(&self) -> i64 {
        let (a, b) = (i64::from(self.a), i64::from(self.b));
        match self.op {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
        }
    }

    /// The prompt: everything on the problem's line before the answer, `Q: 12+7=? A: `
    /// (with the trailing space).
    pub fn question_text(&self) -> String {
        format!("Q: {}{}{}=? A: ", self.a, self.op.symbol(), self.b)
    }

    /// The answer as it is written after the prompt, `19` or `-5`.
    pub fn answer_text(&self) -> String {
        self.answer().to_string()
    }

    /// The problem's whole line: `question_text() + answer_text() + "\n"`.
    pub fn line(&self) -> String {
        let mut line = String::new();
        self.write_line(&mut line);
        line
    }

    /// Appends [`Problem::line`] to `out` without allocating a new string.
    pub fn write_line(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "Q: {}{}{}=? A: {}",
            self.a,
            self.op.symbol(),
            self.b,
            self.answer()
        );
    }

    /// The column scratchpad of an addition or subtraction of the universe, without its
    /// tags: `7+8=15 4+3+1=08` for `47+38` (see the [module docs](self)); `None` for a
    /// multiplication or a problem outside the universe.
    pub fn scratchpad(&self) -> Option<String> {
        if !self.in_universe() {
            return None;
        }
        let digits = |n: u32| (n % 10, n / 10);
        match self.op {
            Op::Add => {
                let ((a0, a1), (b0, b1)) = (digits(self.a), digits(self.b));
                let units = a0 + b0;
                let carry = units / 10;
                let tens = a1 + b1 + carry;
                Some(format!("{a0}+{b0}={units:02} {a1}+{b1}+{carry}={tens:02}"))
            }
            Op::Sub => {
                let negative = self.a < self.b;
                let (x, y) = if negative {
                    (self.b, self.a)
                } else {
                    (self.a, self.b)
                };
                let ((x0, x1), (y0, y1)) = (digits(x), digits(y));
                let borrow = u32::from(x0 < y0);
                let units = x0 + 10 * borrow - y0;
                // x ≥ y, so the tens never borrow.
                let tens = x1 - y1 - borrow;
                let sign = if negative { "-" } else { "" };
                Some(format!(
                    "{sign}{x0}-{y0}={borrow}{units} {x1}-{y1}-{borrow}=0{tens}"
                ))
            }
            Op::Mul => None,
        }
    }

    /// Appends the problem's worked line, `Q: 47+38=? A: <think>7+8=15 4+3+1=08</think>85`
    /// and `\n`, or its plain [`Problem::line`] when it has no [`Problem::scratchpad`].
    pub fn write_worked_line(&self, out: &mut String) {
        match self.scratchpad() {
            Some(work) => {
                // Writing to a String cannot fail.
                let _ = writeln!(
                    out,
                    "{}{THINK_OPEN}{work}{THINK_CLOSE}{}",
                    self.question_text(),
                    self.answer()
                );
            }
            None => self.write_line(out),
        }
    }

    /// Reads a problem line (with or without its `\n`) back into the problem and the answer
    /// it states, which need not be correct, and its scratchpad if it is worked (which need
    /// not be correct either).
    ///
    /// Returns `None` unless the line has exactly the format of [`Problem::line`] or
    /// [`Problem::write_worked_line`]: operands written in decimal without leading zeros or
    /// signs, inside the universe.
    pub fn parse_worked_line(line: &str) -> Option<(Problem, Option<&str>, i64)> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let rest = line.strip_prefix("Q: ")?;
        let (a, rest) = split_number(rest)?;
        let mut chars = rest.chars();
        let op = Op::from_symbol(chars.next()?)?;
        let (b, rest) = split_number(chars.as_str())?;
        let (work, answer) = split_scratchpad(rest.strip_prefix("=? A: ")?)?;
        let answer = parse_answer(answer)?;
        let problem = Problem::new(a, op, b);
        problem.in_universe().then_some((problem, work, answer))
    }

    /// [`Problem::parse_worked_line`] without the scratchpad.
    pub fn parse_line(line: &str) -> Option<(Problem, i64)> {
        Problem::parse_worked_line(line).map(|(p, _, answer)| (p, answer))
    }
}

/// The scratchpad's tags.
pub const THINK_OPEN: &str = "<think>";
/// See [`THINK_OPEN`].
pub const THINK_CLOSE: &str = "</think>";

/// Splits a completion's first line into its scratchpad, if it opens with one, and the text
/// after it: `"<think>7+8=15 4+3+1=08</think>85"` → `(Some("7+8=15 4+3+1=08"), "85")`, `"85"`
/// → `(None, "85")`. `None` when the scratchpad is not closed on the line or holds a tag.
pub fn split_scratchpad(completion: &str) -> Option<(Option<&str>, &str)> {
    let line = completion.split('\n').next().unwrap_or("");
    let Some(rest) = line.strip_prefix(THINK_OPEN) else {
        return Some((None, line));
    };
    let (work, answer) = rest.split_once(THINK_CLOSE)?;
    if work.contains(THINK_OPEN) || answer.contains(THINK_OPEN) || answer.contains(THINK_CLOSE) {
        return None;
    }
    Some((Some(work), answer))
}

/// Reads the answer at the start of a model's completion of [`Problem::question_text`]: an
/// optional `-` and decimal digits, followed by the end of the text or a newline (anything
/// after the newline is ignored). Returns `None` for anything else, including leading spaces.
pub fn parse_answer(completion: &str) -> Option<i64> {
    let text = completion.split('\n').next().unwrap_or("");
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Splits a leading operand (1–2 digits, no leading zero unless it is `0`) off `text`.
fn split_number(text: &str) -> Option<(u32, &str)> {
    let len = text.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 || len > 2 || (len > 1 && text.starts_with('0')) {
        return None;
    }
    let value = text[..len].parse().ok()?;
    Some((value, &text[len..]))
}

/// Whether a problem is held out of every built-in corpus.
///
/// The rule: `h = mix(mix(mix(SALT + op) + a) + b)`, where `mix` is SplitMix64's finalizer,
/// `op` is 0, 1, 2 for `+`, `-`, `*`, and additions wrap; the problem is held out when
/// `h % 10 == 0`. It is defined for every problem; on the universe it selects 2 927 of the
/// 30 000 problems (9.8 %): 1 019 additions, 933 subtractions and 975 multiplications.
pub fn is_heldout(p: &Problem) -> bool {
    /// A fixed constant that makes the held-out set unrelated to the corpus seeds.
    const SALT: u64 = 0x6b69_6c6e_6865_6c64;
    let h = mix64(SALT.wrapping_add(p.op.index()));
    let h = mix64(h.wrapping_add(u64::from(p.a)));
    let h = mix64(h.wrapping_add(u64::from(p.b)));
    h % 10 == 0
}

/// Every problem of the universe, ordered by operator (`+`, `-`, `*`), then `a`, then `b`.
pub fn all_problems() -> Vec<Problem> {
    let mut all = Vec::with_capacity(UNIVERSE_SIZE);
    for op in Op::ALL {
        for a in 0..=OPERAND_MAX {
            for b in 0..=OPERAND_MAX {
                all.push(Problem::new(a, op, b));
            }
        }
    }
    all
}

/// The held-out problems, in the order of [`all_problems`].
pub fn heldout_problems() -> Vec<Problem> {
    all_problems().into_iter().filter(is_heldout).collect()
}

/// The problems a built-in corpus may contain, in the order of [`all_problems`].
pub fn training_problems() -> Vec<Problem> {
    all_problems()
        .into_iter()
        .filter(|p| !is_heldout(p))
        .collect()
}

/// Generates `bytes` bytes of the built-in corpus from `seed`.
///
/// The output is exactly `bytes` long, ASCII (hence valid UTF-8), and, unless empty, ends with
/// `\n`. Every line is complete except the last one, which is an English line cut short to
/// fit (never a problem line, so every problem line in any corpus is whole and correct). The
/// same seed and size always give the same bytes. A longer corpus of the same seed starts
/// with the same lines but ends differently, because of that last line.
pub fn builtin_corpus(seed: u64, bytes: usize) -> Vec<u8> {
    let mut generator = Generator::new(seed);
    let mut out = Vec::with_capacity(bytes);
    let mut line = String::new();
    while out.len() < bytes {
        line.clear();
        let problem = generator.line(&mut line);
        let room = bytes - out.len();
        if line.len() <= room {
            out.extend_from_slice(line.as_bytes());
            continue;
        }
        // The line does not fit: finish with an English line cut to the room left.
        if problem {
            line.clear();
        } else {
            // Drop the line's own newline; a cut line gets a new one below.
            line.pop();
        }
        while line.len() + 1 < room {
            if !line.is_empty() {
                line.push(' ');
            }
            generator.sentence(&mut line);
        }
        out.extend_from_slice(&line.as_bytes()[..room - 1]);
        out.push(b'\n');
    }
    out
}

/// Nouns as (singular, plural). Vowel-initial words all take "an", so "a"/"an" can be chosen
/// from the first letter alone.
const NOUNS: &[(&str, &str)] = &[
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("owl", "owls"),
    ("wolf", "wolves"),
    ("mouse", "mice"),
    ("horse", "horses"),
    ("child", "children"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("sailor", "sailors"),
    ("baker", "bakers"),
    ("painter", "painters"),
    ("king", "kings"),
    ("queen", "queens"),
    ("robot", "robots"),
    ("river", "rivers"),
    ("mountain", "mountains"),
    ("city", "cities"),
    ("village", "villages"),
    ("garden", "gardens"),
    ("forest", "forests"),
    ("island", "islands"),
    ("bridge", "bridges"),
    ("road", "roads"),
    ("market", "markets"),
    ("library", "libraries"),
    ("book", "books"),
    ("letter", "letters"),
    ("story", "stories"),
    ("song", "songs"),
    ("idea", "ideas"),
    ("window", "windows"),
    ("door", "doors"),
    ("lamp", "lamps"),
    ("boat", "boats"),
    ("train", "trains"),
    ("engine", "engines"),
    ("clock", "clocks"),
    ("kettle", "kettles"),
    ("box", "boxes"),
    ("knife", "knives"),
    ("leaf", "leaves"),
    ("apple", "apples"),
    ("egg", "eggs"),
    ("umbrella", "umbrellas"),
    ("map", "maps"),
    ("key", "keys"),
    ("stone", "stones"),
    ("candle", "candles"),
    ("basket", "baskets"),
];

/// Adjectives.
const ADJECTIVES: &[&str] = &[
    "small", "big", "old", "young", "quiet", "loud", "red", "green", "blue", "yellow", "bright",
    "dark", "happy", "tired", "clever", "brave", "gentle", "heavy", "empty", "ancient", "curious",
    "wet", "warm", "cold", "strange", "little", "eager", "shy", "proud", "silver", "wooden", "icy",
    "busy", "lazy", "tall", "narrow", "wide", "lonely", "famous", "hidden",
];

/// Transitive verbs as (base, third person singular, past).
const TRANSITIVE: &[(&str, &str, &str)] = &[
    ("see", "sees", "saw"),
    ("find", "finds", "found"),
    ("carry", "carries", "carried"),
    ("watch", "watches", "watched"),
    ("follow", "follows", "followed"),
    ("build", "builds", "built"),
    ("open", "opens", "opened"),
    ("paint", "paints", "painted"),
    ("chase", "chases", "chased"),
    ("hold", "holds", "held"),
    ("read", "reads", "read"),
    ("write", "writes", "wrote"),
    ("bring", "brings", "brought"),
    ("need", "needs", "needed"),
    ("like", "likes", "liked"),
    ("visit", "visits", "visited"),
    ("fix", "fixes", "fixed"),
    ("push", "pushes", "pushed"),
    ("take", "takes", "took"),
    ("catch", "catches", "caught"),
    ("remember", "remembers", "remembered"),
    ("count", "counts", "counted"),
    ("hide", "hides", "hid"),
    ("draw", "draws", "drew"),
];

/// Intransitive verbs as (base, third person singular, past).
const INTRANSITIVE: &[(&str, &str, &str)] = &[
    ("sleep", "sleeps", "slept"),
    ("run", "runs", "ran"),
    ("sing", "sings", "sang"),
    ("wait", "waits", "waited"),
    ("laugh", "laughs", "laughed"),
    ("smile", "smiles", "smiled"),
    ("fall", "falls", "fell"),
    ("arrive", "arrives", "arrived"),
    ("rest", "rests", "rested"),
    ("dance", "dances", "danced"),
    ("shine", "shines", "shone"),
    ("wander", "wanders", "wandered"),
    ("swim", "swims", "swam"),
    ("listen", "listens", "listened"),
    ("whisper", "whispers", "whispered"),
];

/// Adverbs that can close a clause.
const ADVERBS: &[&str] = &[
    "quickly",
    "slowly",
    "quietly",
    "happily",
    "carefully",
    "suddenly",
    "again",
    "together",
    "at last",
    "for a while",
    "all day",
    "in silence",
];

/// Prepositions that open a place phrase.
const PREPOSITIONS: &[&str] = &[
    "in", "on", "under", "near", "behind", "beside", "across", "over", "through", "into", "toward",
    "with", "without", "after", "before", "around",
];

/// Given names; they are already capitalized.
const NAMES: &[&str] = &[
    "Ada", "Ben", "Clara", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira",
    "Leo", "Maya", "Nils", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tomas", "Uma", "Victor",
    "Wren", "Yusuf", "Zoe",
];

/// Conjunctions that join two independent clauses after a comma.
const COORDINATORS: &[&str] = &["and", "but", "so", "yet"];

/// Subordinators that can open a sentence or follow its main clause.
const SUBORDINATORS: &[&str] = &[
    "when", "because", "although", "while", "after", "before", "until", "since",
];

/// Short words shouted in capitals.
const SHOUTS: &[&str] = &[
    "WAIT", "STOP", "LOOK", "HELP", "QUIET", "NOW", "RUN", "HURRY",
];

/// Number words for chapter headings.
const NUMBER_WORDS: &[&str] = &[
    "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten", "Eleven",
    "Twelve",
];

/// How a subject agrees with a present-tense verb.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Agreement {
    /// He, she, it, a name or a singular noun phrase: "sees".
    Singular,
    /// I, you, we, they or a plural noun phrase: "see".
    Plural,
}

/// The tense of a clause.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tense {
    Past,
    Present,
}

/// The corpus generator: one PRNG and the grammar that consumes it.
struct Generator {
    rng: Rng,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::new(seed),
        }
    }

    /// True with probability `1 / n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.rng.below(n) == 0
    }

    /// A uniformly chosen element of a non-empty list.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below_usize(items.len())]
    }

    /// Appends one line with its `\n`; returns whether it is a problem line (arithmetic or
    /// brackets).
    fn line(&mut self, out: &mut String) -> bool {
        let kind = self.rng.below(20);
        if kind < ARITHMETIC_IN_20 {
            let problem = self.problem();
            if problem.op != Op::Mul && self.one_in(WORKED_ONE_IN) {
                problem.write_worked_line(out);
            } else {
                problem.write_line(out);
            }
            return true;
        }
        if kind < ARITHMETIC_IN_20 + BRACKETS_IN_20 {
            out.push_str(&brackets::training_problem(&mut self.rng).line());
            return true;
        }
        if self.one_in(20) {
            self.heading(out);
        } else {
            let sentences = match self.rng.below(20) {
                0..=9 => 1,
                10..=16 => 2,
                _ => 3,
            };
            for i in 0..sentences {
                if i > 0 {
                    out.push(' ');
                }
                self.sentence(out);
            }
        }
        out.push('\n');
        false
    }

    /// A uniformly chosen training problem (rejection sampling over the universe).
    fn problem(&mut self) -> Problem {
        loop {
            let op = self.pick(&Op::ALL);
            let a = self.rng.below(u64::from(OPERAND_MAX) + 1) as u32;
            let b = self.rng.below(u64::from(OPERAND_MAX) + 1) as u32;
            let problem = Problem::new(a, op, b);
            if !is_heldout(&problem) {
                return problem;
            }
        }
    }

    /// A heading in title case: "The Curious Fox" or "Chapter Nine: The Old Bridge".
    fn heading(&mut self, out: &mut String) {
        let start = out.len();
        if self.one_in(2) {
            out.push_str("Chapter ");
            out.push_str(self.pick(NUMBER_WORDS));
            out.push_str(": ");
        }
        let title = out.len();
        out.push_str("the ");
        out.push_str(self.pick(ADJECTIVES));
        out.push(' ');
        let (singular, _) = self.pick(NOUNS);
        out.push_str(singular);
        title_case(out, title);
        debug_assert!(out[start..].is_ascii());
    }

    /// Appends one sentence with its final punctuation and a capital first letter.
    fn sentence(&mut self, out: &mut String) {
        let start = out.len();
        let tense = self.tense();
        match self.rng.below(100) {
            0..=39 => {
                self.clause(out, tense);
                out.push('.');
            }
            40..=51 => {
                self.clause(out, tense);
                out.push_str(", ");
                out.push_str(self.pick(COORDINATORS));
                out.push(' ');
                self.clause(out, tense);
                out.push('.');
            }
            52..=59 => {
                let subordinator = self.pick(SUBORDINATORS);
                if self.one_in(2) {
                    out.push_str(subordinator);
                    out.push(' ');
                    self.clause(out, tense);
                    out.push_str(", ");
                    self.clause(out, tense);
                } else {
                    self.clause(out, tense);
                    out.push(' ');
                    out.push_str(subordinator);
                    out.push(' ');
                    self.clause(out, tense);
                }
                out.push('.');
            }
            60..=69 => self.question(out),
            70..=75 => self.exclamation(out),
            76..=83 => self.quotation(out, tense),
            84..=88 => {
                self.clause(out, tense);
                out.push_str("; ");
                self.clause(out, tense);
                out.push('.');
            }
            89..=94 => {
                // An appositive: "Ada, the clever farmer, found a lamp."
                out.push_str(self.pick(NAMES));
                out.push_str(", the ");
                out.push_str(self.pick(ADJECTIVES));
                out.push(' ');
                out.push_str(self.pick(NOUNS).0);
                out.push_str(", ");
                self.predicate(out, tense, Agreement::Singular);
                out.push('.');
            }
            _ => {
                // A shout: "STOP! The dog ran into the river."
                out.push_str(self.pick(SHOUTS));
                out.push_str("! ");
                let rest = out.len();
                self.clause(out, tense);
                out.push('.');
                capitalize_first(out, rest);
            }
        }
        capitalize_first(out, start);
    }

    /// Past tense two times in three, otherwise present.
    fn tense(&mut self) -> Tense {
        if self.one_in(3) {
            Tense::Present
        } else {
            Tense::Past
        }
    }

    /// A subject and its predicate, in lower case unless a name starts it.
    fn clause(&mut self, out: &mut String, tense: Tense) {
        let agreement = self.subject(out);
        out.push(' ');
        self.predicate(out, tense, agreement);
    }

    /// Appends a subject and returns how it agrees with a present-tense verb.
    fn subject(&mut self, out: &mut String) -> Agreement {
        match self.rng.below(10) {
            0..=5 => self.noun_phrase(out),
            6..=7 => {
                out.push_str(self.pick(NAMES));
                Agreement::Singular
            }
            _ => {
                let (pronoun, agreement) = self.pick(&[
                    ("he", Agreement::Singular),
                    ("she", Agreement::Singular),
                    ("it", Agreement::Singular),
                    ("they", Agreement::Plural),
                    ("we", Agreement::Plural),
                    ("you", Agreement::Plural),
                    ("I", Agreement::Plural),
                ]);
                out.push_str(pronoun);
                agreement
            }
        }
    }

    /// Appends an object: a noun phrase, a name, a possessive or an object pronoun.
    fn object(&mut self, out: &mut String) {
        match self.rng.below(10) {
            0..=5 => {
                self.noun_phrase(out);
            }
            6 => out.push_str(self.pick(NAMES)),
            7 => {
                out.push_str(self.pick(NAMES));
                out.push_str("'s ");
                let (singular, plural) = self.pick(NOUNS);
                out.push_str(if self.one_in(3) { plural } else { singular });
            }
            _ => out.push_str(self.pick(&["him", "her", "it", "them", "us", "me"])),
        }
    }

    /// Appends a determiner, up to two adjectives and a noun; returns its agreement.
    fn noun_phrase(&mut self, out: &mut String) -> Agreement {
        let plural = self.one_in(3);
        let determiner = if plural {
            self.pick(&[
                "the", "some", "many", "these", "those", "two", "three", "few", "all the",
            ])
        } else {
            self.pick(&[
                "the", "the", "a", "a", "this", "that", "every", "one", "my", "our",
            ])
        };
        let mut words = Vec::with_capacity(3);
        let adjectives = match self.rng.below(10) {
            0..=4 => 0,
            5..=8 => 1,
            _ => 2,
        };
        for _ in 0..adjectives {
            words.push(self.pick(ADJECTIVES));
        }
        let (singular, plural_form) = self.pick(NOUNS);
        words.push(if plural { plural_form } else { singular });
        if determiner == "a" && words[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
            out.push_str("an");
        } else {
            out.push_str(determiner);
        }
        for word in words {
            out.push(' ');
            out.push_str(word);
        }
        if plural {
            Agreement::Plural
        } else {
            Agreement::Singular
        }
    }

    /// Appends a verb phrase that agrees with its subject, maybe with a place and an adverb.
    fn predicate(&mut self, out: &mut String, tense: Tense, agreement: Agreement) {
        let transitive = !self.one_in(3);
        let forms = if transitive {
            self.pick(TRANSITIVE)
        } else {
            self.pick(INTRANSITIVE)
        };
        out.push_str(match (tense, agreement) {
            (Tense::Past, _) => forms.2,
            (Tense::Present, Agreement::Singular) => forms.1,
            (Tense::Present, Agreement::Plural) => forms.0,
        });
        if transitive {
            out.push(' ');
            self.object(out);
        }
        if self.one_in(3) {
            out.push(' ');
            out.push_str(self.pick(PREPOSITIONS));
            out.push(' ');
            self.object(out);
        }
        if self.one_in(4) {
            out.push(' ');
            out.push_str(self.pick(ADVERBS));
        }
    }

    /// Appends a question: "Did the fox see a lamp?", "Where is the old key?", …
    fn question(&mut self, out: &mut String) {
        match self.rng.below(4) {
            0 => {
                out.push_str(self.pick(&["did ", "will ", "can ", "should "]));
                self.subject(out);
                out.push(' ');
                out.push_str(self.pick(TRANSITIVE).0);
                out.push(' ');
                self.object(out);
            }
            1 => {
                out.push_str(self.pick(&["where ", "why ", "how "]));
                let is_plural = self.one_in(3);
                out.push_str(match (is_plural, self.one_in(2)) {
                    (false, false) => "is ",
                    (false, true) => "was ",
                    (true, false) => "are ",
                    (true, true) => "were ",
                });
                out.push_str("the ");
                if self.one_in(2) {
                    out.push_str(self.pick(ADJECTIVES));
                    out.push(' ');
                }
                let (singular, plural) = self.pick(NOUNS);
                out.push_str(if is_plural { plural } else { singular });
            }
            2 => {
                out.push_str("who ");
                out.push_str(self.pick(TRANSITIVE).2);
                out.push(' ');
                self.object(out);
            }
            _ => {
                out.push_str("what did ");
                out.push_str(self.pick(NAMES));
                out.push(' ');
                out.push_str(self.pick(&["find", "see", "bring", "write", "hide", "draw"]));
                if self.one_in(2) {
                    out.push(' ');
                    out.push_str(self.pick(PREPOSITIONS));
                    out.push(' ');
                    self.object(out);
                }
            }
        }
        out.push('?');
    }

    /// Appends an exclamation: "What an icy river!" or "How quiet the foxes were!"
    fn exclamation(&mut self, out: &mut String) {
        let adjective = self.pick(ADJECTIVES);
        let (singular, plural) = self.pick(NOUNS);
        if self.one_in(2) {
            out.push_str(if adjective.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "what an "
            } else {
                "what a "
            });
            out.push_str(adjective);
            out.push(' ');
            out.push_str(singular);
        } else {
            out.push_str("how ");
            out.push_str(adjective);
            out.push_str(" the ");
            if self.one_in(2) {
                out.push_str(plural);
                out.push_str(" were");
            } else {
                out.push_str(singular);
                out.push_str(" was");
            }
        }
        out.push('!');
    }

    /// Appends quoted speech: `"The dog ran," said Ada.` or `Ada asked, "Where is the key?"`
    fn quotation(&mut self, out: &mut String, tense: Tense) {
        let name = self.pick(NAMES);
        match self.rng.below(3) {
            0 => {
                out.push('"');
                let quote = out.len();
                self.clause(out, tense);
                capitalize_first(out, quote);
                out.push_str(",\" said ");
                out.push_str(name);
                out.push('.');
            }
            1 => {
                out.push_str(name);
                out.push_str(" said, \"");
                let quote = out.len();
                self.clause(out, tense);
                capitalize_first(out, quote);
                out.push_str(if self.one_in(2) { "!\"" } else { ".\"" });
            }
            _ => {
                out.push('"');
                let quote = out.len();
                self.question(out);
                capitalize_first(out, quote);
                out.push_str("\" asked ");
                out.push_str(name);
                out.push('.');
            }
        }
    }
}

/// Upper-cases the first letter at or after byte `from` (text here is ASCII).
fn capitalize_first(text: &mut str, from: usize) {
    if let Some(offset) = text[from..].find(|c: char| c.is_ascii_alphabetic()) {
        let at = from + offset;
        if let Some(letter) = text.get_mut(at..at + 1) {
            letter.make_ascii_uppercase();
        }
    }
}

/// Upper-cases the first letter of every word at or after byte `from`.
fn title_case(text: &mut String, from: usize) {
    // The text is ASCII, so every word start is a one-byte slice whose case can change in
    // place.
    let mut at_word_start = true;
    let mut i = from;
    while i < text.len() {
        let is_space = text.as_bytes()[i] == b' ';
        if at_word_start && !is_space {
            if let Some(letter) = text.get_mut(i..i + 1) {
                letter.make_ascii_uppercase();
            }
        }
        at_word_start = is_space;
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_format() {
        let p = Problem::new(12, Op::Add, 7);
        assert_eq!(p.question_text(), "Q: 12+7=? A: ");
        assert_eq!(p.answer_text(), "19");
        assert_eq!(p.line(), "Q: 12+7=? A: 19\n");
        let p = Problem::new(3, Op::Sub, 8);
        assert_eq!(p.line(), "Q: 3-8=? A: -5\n");
        assert_eq!(Problem::new(99, Op::Mul, 99).answer(), 9801);
        for p in all_problems() {
            assert_eq!(
                p.line(),
                format!("{}{}\n", p.question_text(), p.answer_text())
            );
            assert_eq!(Problem::parse_line(&p.line()), Some((p, p.answer())));
        }
    }

    #[test]
    fn parse_line_rejects_other_text() {
        for bad in [
            "",
            "Q: 1+2=? A:",
            "Q: 1+2=? A: ",
            "Q: 1+2=? A: 3 ",
            "Q: 1+2=? A:3",
            "Q: 01+2=? A: 3",
            "Q: 100+2=? A: 102",
            "Q: 1/2=? A: 0",
            "Q: +2=? A: 2",
            "Q: 1+2=? A: --3",
            "Q: 1+2=? A: 99999999999999999999999",
            "q: 1+2=? A: 3",
            "The dog ran.",
        ] {
            assert_eq!(Problem::parse_line(bad), None, "{bad:?}");
        }
        // The stated answer is read even when it is wrong.
        assert_eq!(
            Problem::parse_line("Q: 1+2=? A: 4"),
            Some((Problem::new(1, Op::Add, 2), 4))
        );
    }

    #[test]
    fn parse_answer_reads_a_completion() {
        assert_eq!(parse_answer("19"), Some(19));
        assert_eq!(parse_answer("-5\nQ: 1+1=? A: 2"), Some(-5));
        assert_eq!(parse_answer(" 19"), None);
        assert_eq!(parse_answer("19 apples"), None);
        assert_eq!(parse_answer("-"), None);
        assert_eq!(parse_answer(""), None);
    }

    #[test]
    fn heldout_and_training_partition_the_universe() {
        let all = all_problems();
        assert_eq!(all.len(), UNIVERSE_SIZE);
        let heldout = heldout_problems();
        let training = training_problems();
        assert_eq!(heldout.len() + training.len(), UNIVERSE_SIZE);
        assert!(heldout.iter().all(is_heldout));
        assert!(!training.iter().any(is_heldout));
        // Both lists keep the universe's order, so merging them gives the universe back.
        let mut merged = Vec::with_capacity(UNIVERSE_SIZE);
        let (mut h, mut t) = (heldout.iter().peekable(), training.iter().peekable());
        for p in &all {
            if h.peek() == Some(&p) {
                merged.push(*h.next().unwrap_or(p));
            } else if t.peek() == Some(&p) {
                merged.push(*t.next().unwrap_or(p));
            }
        }
        assert_eq!(merged, all);
        // Every operator has held-out problems.
        for op in Op::ALL {
            let count = heldout.iter().filter(|p| p.op == op).count();
            assert!((800..1200).contains(&count), "{op:?}: {count}");
        }
        // The set is spread out: every row of the table (one operator and one `a`) has some
        // held-out problems and keeps most of its problems for training.
        for op in Op::ALL {
            for a in 0..=OPERAND_MAX {
                let row = heldout.iter().filter(|p| p.op == op && p.a == a).count();
                assert!((1..30).contains(&row), "{op:?} {a}: {row} of 100 held out");
            }
        }
    }

    #[test]
    fn the_heldout_rule_is_pinned() {
        // The held-out set is part of the format: evaluations depend on it. If this test
        // fails, the rule changed; that must be a deliberate, documented decision.
        let heldout = heldout_problems();
        assert_eq!(heldout.len(), 2927);
        let per_op: Vec<usize> = Op::ALL
            .iter()
            .map(|&op| heldout.iter().filter(|p| p.op == op).count())
            .collect();
        assert_eq!(per_op, [1019, 933, 975]);
        let ends: Vec<String> = [0, 1, 2, 3, heldout.len() - 2, heldout.len() - 1]
            .iter()
            .map(|&i| heldout[i].line())
            .collect();
        assert_eq!(
            ends,
            [
                "Q: 0+3=? A: 3\n",
                "Q: 0+10=? A: 10\n",
                "Q: 0+35=? A: 35\n",
                "Q: 0+53=? A: 53\n",
                "Q: 99*77=? A: 7623\n",
                "Q: 99*90=? A: 8910\n",
            ]
        );
    }

    #[test]
    fn corpus_is_deterministic_and_exactly_sized() {
        assert_eq!(builtin_corpus(1, 50_000), builtin_corpus(1, 50_000));
        assert_ne!(builtin_corpus(1, 50_000), builtin_corpus(2, 50_000));
        for bytes in [0, 1, 2, 3, 10, 17, 100, 1000, 4097] {
            for seed in 0..20 {
                let corpus = builtin_corpus(seed, bytes);
                assert_eq!(corpus.len(), bytes);
                if bytes > 0 {
                    assert_eq!(corpus.last(), Some(&b'\n'));
                }
                assert!(corpus.is_ascii());
            }
        }
    }

    #[test]
    fn corpus_lines_look_like_the_grammar() {
        let corpus = builtin_corpus(3, 200_000);
        let text = std::str::from_utf8(&corpus).expect("the corpus is ASCII");
        let mut complete: Vec<&str> = text.lines().collect();
        complete.pop();
        for line in complete {
            if line.starts_with("Q: ") || line.starts_with("B: ") {
                continue;
            }
            let first = line.chars().next().expect("no empty lines");
            assert!(
                first.is_ascii_uppercase() || first == '"',
                "line starts in lower case: {line:?}"
            );
            let last = line.chars().last().expect("no empty lines");
            assert!(
                matches!(last, '.' | '!' | '?' | '"') || !line.contains(['.', '!', '?']),
                "line ends without punctuation: {line:?}"
            );
            assert!(!line.contains("  "), "double space: {line:?}");
            assert!(!line.contains(" a a") && !line.contains(" a e"), "{line:?}");
        }
        for mark in [", ", "; ", "?", "!", "\"", "'s ", ": "] {
            assert!(text.contains(mark), "the corpus never uses {mark:?}");
        }
    }

    /// The complete lines of a corpus: all but the last, which may be cut short.
    fn complete_lines(corpus: &[u8]) -> Vec<&str> {
        let text = std::str::from_utf8(corpus).expect("the corpus is ASCII");
        let mut lines: Vec<&str> = text.lines().collect();
        lines.pop();
        lines
    }

    #[test]
    fn problem_lines_are_correct_and_in_their_shares() {
        for seed in [0, 1, 2] {
            let corpus = builtin_corpus(seed, 1 << 20);
            let lines = complete_lines(&corpus);
            let (mut arithmetic, mut worked, mut add_sub, mut bracket) = (0, 0, 0, 0);
            for line in &lines {
                if line.starts_with("Q:") {
                    let (problem, work, stated) = Problem::parse_worked_line(line)
                        .unwrap_or_else(|| panic!("unparseable arithmetic line {line:?}"));
                    assert_eq!(stated, problem.answer(), "{line:?}");
                    assert!(!is_heldout(&problem), "{line:?} is held out");
                    if let Some(work) = work {
                        assert_eq!(Some(work.to_string()), problem.scratchpad(), "{line:?}");
                        worked += 1;
                    }
                    add_sub += usize::from(problem.op != Op::Mul);
                    arithmetic += 1;
                } else if line.starts_with("B:") {
                    let (b, closing) = brackets::Brackets::parse_line(line)
                        .unwrap_or_else(|| panic!("unparseable brackets line {line:?}"));
                    assert_eq!(closing, b.closing(), "{line:?}");
                    assert!(!brackets::is_heldout(&b), "{line:?} is held out");
                    bracket += 1;
                } else {
                    assert!(!line.contains("=?") && !line.contains(" = "), "{line:?}");
                    assert!(!line.bytes().any(|b| b.is_ascii_digit()), "{line:?}");
                    assert!(!line.contains(['(', '[', '{', '<', '>']), "{line:?}");
                }
            }
            let share = |n: usize| n as f64 / lines.len() as f64;
            assert!((0.73..0.77).contains(&share(arithmetic)), "seed {seed}");
            assert!((0.09..0.11).contains(&share(bracket)), "seed {seed}");
            let worked_share = worked as f64 / add_sub as f64;
            assert!(
                (0.31..0.36).contains(&worked_share),
                "seed {seed}: {worked_share}"
            );
        }
    }

    #[test]
    fn scratchpads_are_the_documented_column_arithmetic() {
        let cases = [
            (47, Op::Add, 38, "7+8=15 4+3+1=08", 85),
            (64, Op::Add, 67, "4+7=11 6+6+1=13", 131),
            (90, Op::Add, 6, "0+6=06 9+0+0=09", 96),
            (62, Op::Sub, 38, "2-8=14 6-3-1=02", 24),
            (38, Op::Sub, 62, "-2-8=14 6-3-1=02", -24),
            (85, Op::Sub, 55, "5-5=00 8-5-0=03", 30),
            (7, Op::Sub, 89, "-9-7=02 8-0-0=08", -82),
        ];
        for (a, op, b, work, answer) in cases {
            let p = Problem::new(a, op, b);
            assert_eq!(p.scratchpad().as_deref(), Some(work), "{p:?}");
            assert_eq!(p.answer(), answer);
            let mut line = String::new();
            p.write_worked_line(&mut line);
            assert_eq!(
                line,
                format!("{}<think>{work}</think>{answer}\n", p.question_text())
            );
        }
        assert_eq!(Problem::new(7, Op::Mul, 8).scratchpad(), None);
        assert_eq!(Problem::new(100, Op::Add, 8).scratchpad(), None);
        // Every scratchpad's columns compute its answer: the tens digit pair, then the units.
        for p in all_problems().iter().filter(|p| p.op != Op::Mul) {
            let work = p.scratchpad().expect("+ and - have one");
            let (sign, work) = match work.strip_prefix('-') {
                Some(rest) => (-1, rest),
                None => (1, work.as_str()),
            };
            let (units, tens) = work.split_once(' ').expect("two columns");
            let digit = |col: &str, at: usize| i64::from(col.as_bytes()[col.len() - at] - b'0');
            let value = 10 * (10 * digit(tens, 2) + digit(tens, 1)) + digit(units, 1);
            assert_eq!(sign * value, p.answer(), "{p:?} {work}");
            if p.op == Op::Sub {
                // The tens column's borrow out is never set: the larger operand comes first.
                assert_eq!(digit(tens, 2), 0, "{p:?}");
            }
            assert_eq!(work.len(), 15, "fixed width: {p:?}");
        }
    }

    #[test]
    fn split_scratchpad_reads_only_a_leading_closed_block() {
        assert_eq!(split_scratchpad("85\nmore"), Some((None, "85")));
        assert_eq!(
            split_scratchpad("<think>7+8=15</think>85\n"),
            Some((Some("7+8=15"), "85"))
        );
        for bad in [
            "<think>7+8\n</think>85",
            "<think><think></think>8",
            "<think></think>8</think>",
        ] {
            assert_eq!(split_scratchpad(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_heldout_problem_appears_in_8_mib() {
        let corpus = builtin_corpus(11, 8 << 20);
        assert_eq!(corpus.len(), 8 << 20);
        let mut heldout = vec![false; UNIVERSE_SIZE];
        for p in heldout_problems() {
            heldout[table_index(&p)] = true;
        }
        let mut seen = vec![false; UNIVERSE_SIZE];
        // Scan the raw bytes rather than only parsed lines, so that a held-out question
        // anywhere (even inside a cut or malformed line) is caught.
        let text = std::str::from_utf8(&corpus).expect("the corpus is ASCII");
        let mut questions = 0;
        for (at, _) in text.match_indices("Q: ") {
            let rest = &text[at..];
            let line = rest.split('\n').next().unwrap_or(rest);
            let (problem, _) = Problem::parse_line(line)
                .unwrap_or_else(|| panic!("unparseable arithmetic line {line:?}"));
            assert!(!heldout[table_index(&problem)], "{line:?} is held out");
            seen[table_index(&problem)] = true;
            questions += 1;
        }
        // An 8 MiB corpus holds about 208 000 problems, drawn uniformly from the 27 073
        // training problems: nearly all of them appear, so the scan above is not a check of
        // a narrow corner of the training set.
        let training_seen = seen.iter().filter(|&&s| s).count();
        assert!(questions > 190_000, "{questions}");
        assert!(training_seen > 26_000, "{training_seen}");
        let mut brackets_seen = 0;
        for (at, _) in text.match_indices("B: ") {
            let rest = &text[at..];
            let line = rest.split('\n').next().unwrap_or(rest);
            let (b, _) = brackets::Brackets::parse_line(line)
                .unwrap_or_else(|| panic!("unparseable brackets line {line:?}"));
            assert!(!brackets::is_heldout(&b), "{line:?} is held out");
            brackets_seen += 1;
        }
        assert!(brackets_seen > 25_000, "{brackets_seen}");
    }

    /// The position of a universe problem in [`all_problems`].
    fn table_index(p: &Problem) -> usize {
        let op = match p.op {
            Op::Add => 0,
            Op::Sub => 1,
            Op::Mul => 2,
        };
        (op * 100 + p.a as usize) * 100 + p.b as usize
    }

    #[test]
    fn table_index_matches_the_universe_order() {
        for (i, p) in all_problems().iter().enumerate() {
            assert_eq!(table_index(p), i);
        }
    }
}
