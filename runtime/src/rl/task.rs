//! GRPO tasks: where a task's questions come from and how an answer is checked.
//!
//! A [`Task`] is a generator of prompts plus a pure scoring function. `kiln rl` needs nothing
//! else: it draws [`Task::sample`] questions to train on, greedily answers the fixed
//! [`Task::heldout`] questions before and after, and rewards each completion with
//! [`Task::score`]. Two tasks are built in, with verifiers of different kinds:
//!
//! - [`Arithmetic`] (`--task arithmetic`, the default): `Q: 47+38=? A: ` → `85`, or a worked
//!   `<think>7+8=15 4+3+1=08</think>85`; the answer is read as an integer and compared with
//!   the one known answer.
//! - [`BracketClosing`] (`--task brackets`): `B: ([]{(<> = ` → `)})`; the answer is checked
//!   by a parser, which accepts any bracket string that balances the prefix (`)()})` too).
//!
//! # Adding a task
//!
//! Implement [`Task`] (its contract is on each method) and list it in [`TaskKind`]:
//!
//! - the held-out questions must never be drawn by `sample` nor appear in the pretraining
//!   corpus: decide membership with a fixed rule on the question itself (a hash, as the
//!   built-in tasks do), not on the random stream;
//! - `score` must depend on its arguments alone (no model, no randomness, no clock), so that a
//!   seeded run is reproducible and the verifier is tested on its own;
//! - the prompt should be what the corpus writes before an answer, so that the pretrained model
//!   already continues it with something the verifier can read.

use super::rewards::{self, AnswerFormat, Reward};
use crate::data::brackets::{self, Brackets};
use crate::data::builtin::{heldout_problems, training_problems, Problem};
use crate::data::Rng;

/// One question: the prompt the model continues and what its verifier checks against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// The text the model continues, e.g. `"Q: 47+38=? A: "`.
    pub prompt: String,
    /// What [`Task::score`] needs beyond the completion: the arithmetic answer (`"85"`), the
    /// bracket prefix (`"([]{(<>"`).
    pub reference: String,
}

/// A rule-checked task for GRPO; see the [module docs](self).
pub trait Task: Sync {
    /// The name `kiln rl --task` takes and summary.json records.
    fn name(&self) -> &'static str;

    /// One training question drawn with `rng`: never a held-out one. The same stream gives
    /// the same questions.
    fn sample(&self, rng: &mut Rng) -> Question;

    /// `n` held-out questions (fewer only if the task has fewer), always the same ones for the
    /// same `n`.
    fn heldout(&self, n: usize) -> Vec<Question>;

    /// An upper bound on the bytes of any prompt `sample` or `heldout` returns: it sizes the
    /// context window of the policy.
    fn max_prompt_len(&self) -> usize;

    /// Where sampling stops: the text that ends an answer, kept in the completion.
    fn stop(&self) -> &'static str;

    /// The reward terms of `completion` (the generated text, stop included) for `question`,
    /// each 0.0 or 1.0. A pure function of its arguments.
    fn score(&self, question: &Question, completion: &str) -> Reward;
}

/// The built-in tasks, as `kiln rl --task` names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskKind {
    /// [`Arithmetic`].
    #[default]
    Arithmetic,
    /// [`BracketClosing`].
    Brackets,
}

impl TaskKind {
    /// Every built-in task.
    pub const ALL: [TaskKind; 2] = [TaskKind::Arithmetic, TaskKind::Brackets];

    /// The task, with the spec's `rl.answer` format. Only arithmetic has a tagged form.
    pub fn build(self, answer: AnswerFormat) -> Result<Box<dyn Task>, String> {
        match (self, answer) {
            (TaskKind::Arithmetic, _) => Ok(Box::new(Arithmetic::new(answer))),
            (TaskKind::Brackets, AnswerFormat::Plain) => Ok(Box::new(BracketClosing)),
            (TaskKind::Brackets, AnswerFormat::Tagged) => Err(
                "the brackets task answers in the corpus's plain format only; set \
                 rl.answer = \"plain\""
                    .to_string(),
            ),
        }
    }
}

/// Two-digit `+`, `-` and `*` of the built-in corpus ([`crate::data::builtin`]): questions
/// drawn uniformly from its training problems, held out by its held-out rule, scored by
/// [`rewards::score`] against the exact answer.
pub struct Arithmetic {
    format: AnswerFormat,
    pool: Vec<Problem>,
    heldout: Vec<Problem>,
}

impl Arithmetic {
    /// The task, with answers in `format`.
    pub fn new(format: AnswerFormat) -> Arithmetic {
        Arithmetic {
            format,
            pool: training_problems(),
            heldout: heldout_problems(),
        }
    }

    fn question(p: &Problem) -> Question {
        Question {
            prompt: rewards::prompt(p),
            reference: p.answer_text(),
        }
    }
}

impl Task for Arithmetic {
    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn sample(&self, rng: &mut Rng) -> Question {
        Arithmetic::question(&self.pool[rng.below(self.pool.len() as u64) as usize])
    }

    /// Every `len / n`-th held-out problem, so that all three operators and all operand sizes
    /// are evaluated.
    fn heldout(&self, n: usize) -> Vec<Question> {
        let stride = (self.heldout.len() / n.max(1)).max(1);
        self.heldout
            .iter()
            .step_by(stride)
            .take(n)
            .map(Arithmetic::question)
            .collect()
    }

    fn max_prompt_len(&self) -> usize {
        // "Q: 99*99=? A: ": the operands have at most two digits.
        Problem::new(99, crate::data::builtin::Op::Mul, 99)
            .question_text()
            .len()
    }

    fn stop(&self) -> &'static str {
        match self.format {
            AnswerFormat::Plain => "\n",
            AnswerFormat::Tagged => "</answer>",
        }
    }

    fn score(&self, question: &Question, completion: &str) -> Reward {
        match question.reference.parse::<i64>() {
            Ok(target) => rewards::score(completion, target, self.format),
            Err(_) => Reward::default(),
        }
    }
}

/// Bracket closing ([`crate::data::brackets`]): questions drawn by its generator, held out by
/// its held-out rule, and a completion rewarded when the bracket parser accepts the prefix
/// followed by the completion's first line as one balanced word ([`brackets::closes`]).
pub struct BracketClosing;

impl BracketClosing {
    fn question(b: &Brackets) -> Question {
        Question {
            prompt: b.question_text(),
            reference: b.prefix().to_string(),
        }
    }
}

impl Task for BracketClosing {
    fn name(&self) -> &'static str {
        "brackets"
    }

    fn sample(&self, rng: &mut Rng) -> Question {
        BracketClosing::question(&brackets::training_problem(rng))
    }

    fn heldout(&self, n: usize) -> Vec<Question> {
        brackets::heldout_set(n)
            .iter()
            .map(BracketClosing::question)
            .collect()
    }

    fn max_prompt_len(&self) -> usize {
        "B:  = ".len() + brackets::MAX_LEN
    }

    fn stop(&self) -> &'static str {
        "\n"
    }

    fn score(&self, question: &Question, completion: &str) -> Reward {
        Reward {
            accuracy: f64::from(u8::from(brackets::closes(&question.reference, completion))),
            format: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::builtin::is_heldout;

    fn tasks() -> Vec<Box<dyn Task>> {
        TaskKind::ALL
            .iter()
            .map(|k| k.build(AnswerFormat::Plain).expect("plain answers"))
            .collect()
    }

    #[test]
    fn the_corpus_answer_scores_one_and_a_wrong_one_zero() {
        for task in tasks() {
            let mut rng = Rng::new(1);
            for q in (0..200)
                .map(|_| task.sample(&mut rng))
                .chain(task.heldout(50))
            {
                assert!(q.prompt.len() <= task.max_prompt_len(), "{q:?}");
                let right = match task.name() {
                    "arithmetic" => format!("{}\n", q.reference),
                    _ => format!("{}\n", Brackets::new(&q.reference).unwrap().closing()),
                };
                assert_eq!(task.score(&q, &right).accuracy, 1.0, "{q:?} {right:?}");
                let wrong = format!("{}x\n", right.trim_end());
                assert_eq!(task.score(&q, &wrong).accuracy, 0.0, "{q:?} {wrong:?}");
                assert_eq!(task.score(&q, "").accuracy, 0.0, "{q:?}");
            }
        }
    }

    #[test]
    fn training_questions_are_never_heldout_and_seeded_draws_repeat() {
        for task in tasks() {
            let heldout: std::collections::HashSet<String> =
                task.heldout(300).into_iter().map(|q| q.prompt).collect();
            assert_eq!(heldout.len(), 300, "{}", task.name());
            let draw = |seed| {
                let mut rng = Rng::new(seed);
                (0..3_000)
                    .map(|_| task.sample(&mut rng))
                    .collect::<Vec<_>>()
            };
            let (a, b) = (draw(4), draw(4));
            assert_eq!(a, b, "{}", task.name());
            assert_ne!(a, draw(5), "{}", task.name());
            assert!(
                a.iter().all(|q| !heldout.contains(&q.prompt)),
                "{}",
                task.name()
            );
        }
        let arithmetic = Arithmetic::new(AnswerFormat::Plain);
        let mut rng = Rng::new(6);
        for _ in 0..3_000 {
            let q = arithmetic.sample(&mut rng);
            let (p, _) = Problem::parse_line(&format!("{}{}", q.prompt, q.reference)).unwrap();
            assert!(!is_heldout(&p), "{q:?}");
        }
    }

    #[test]
    fn the_brackets_verifier_is_a_parser() {
        let task = BracketClosing;
        let q = BracketClosing::question(&Brackets::new("([]{(<>").unwrap());
        assert_eq!(q.prompt, "B: ([]{(<> = ");
        for (completion, right) in [
            (")})\n", 1.0),
            (")()})\n", 1.0),
            (")}[]){}\n", 1.0),
            (")}\n", 0.0),
            ("})\n", 0.0),
            (") })\n", 0.0),
        ] {
            assert_eq!(task.score(&q, completion).accuracy, right, "{completion:?}");
        }
    }

    #[test]
    fn brackets_have_no_tagged_form() {
        assert!(TaskKind::Brackets.build(AnswerFormat::Tagged).is_err());
        let tagged = TaskKind::Arithmetic.build(AnswerFormat::Tagged).unwrap();
        assert_eq!(tagged.stop(), "</answer>");
    }
}
