//! Reinforcement learning with GRPO (Group Relative Policy Optimization, DeepSeekMath §4.1,
//! used again by DeepSeek-R1): the math and the rewards, as a pure library.
//!
//! One GRPO step, and where each part lives:
//!
//! ```text
//! question q ──prompt──▶ G completions o_1..o_G (sampled by π_old; the generation path)
//!            ──rewards──▶ r_1..r_G                       (rewards: rule-based, verifiable)
//!            ──group_advantages──▶ A_1..A_G               (objective: (r − mean) / std)
//!  log-probs of every completion token under π_θ (new), π_old and π_ref
//!            ──batch_terms──▶ loss, statistics, per-token gradients ∂L/∂logp_new
//!            ──the trainer──▶ a weighted cross-entropy with the same gradient as the loss
//! ```
//!
//! - [`objective`]: group-normalized advantages and the clipped, KL-regularized objective per
//!   token, with its exact derivative with respect to each token's log-probability and the
//!   batch statistics (mean surrogate, mean KL, clip fraction, mean ratio).
//! - [`rewards`]: the prompt of a built-in arithmetic problem, the `<think>…</think>
//!   <answer>…</answer>` format reward, answer accuracy against an integer target (in the
//!   answer block, or — for the built-in task — on the completion's first line), and the
//!   weighted total.
//! - [`task`]: the [`Task`] interface — a generator of prompts plus a pure scoring function —
//!   and the built-in tasks, arithmetic and bracket closing.
//!
//! Nothing here generates text or touches a model: the inputs are strings and log-probabilities
//! (`f64`), so every formula is tested on its own, including the gradient against finite
//! differences.

pub mod objective;
pub mod rewards;
pub mod task;

pub use objective::{
    batch_terms, completion_terms, group_advantages, group_advantages_with_eps, token_terms,
    BatchTerms, Completion, CompletionTerms, GrpoConfig, GrpoStats, TokenTerms, ADVANTAGE_EPS,
};
pub use rewards::{
    accuracy_reward, extract_answer, format_reward, parse_integer, parse_tagged, plain_answer,
    plain_answer_reward, prompt, score, AnswerFormat, Reward, RewardWeights, Tagged,
};
pub use task::{Arithmetic, BracketClosing, Question, Task, TaskKind};
