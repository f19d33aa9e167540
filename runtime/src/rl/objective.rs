//! The GRPO objective (DeepSeekMath §4.1), per token, with the gradient the trainer needs.
//!
//! # Advantages
//!
//! For each question, G completions are sampled and scored; their rewards `r_1..r_G` form a
//! *group*. [`group_advantages`] gives every completion the advantage
//!
//! ```text
//! A_i = (r_i − mean(r)) / (std(r) + ε_A)        one value for all the tokens of o_i
//! ```
//!
//! - `std` is the **population** standard deviation (divide by G, not G − 1), the plain
//!   "standard deviation of the group" of DeepSeekMath. With ε_A = 0 the advantages of a group
//!   then have mean 0 and population std exactly 1, and rewards `[1, 0, 0, 1]` give
//!   `[1, −1, −1, 1]`. (TRL uses the sample std, which gives `±0.866` there; the two differ by
//!   the constant factor `sqrt((G − 1) / G)` per group size, which only rescales the step.)
//! - ε_A is [`ADVANTAGE_EPS`] = `1e-4`, added to the denominator (TRL's choice), so that
//!   rewards that differ by much less than ε_A give advantages near 0 rather than ±1.
//!   [`group_advantages_with_eps`] takes another ε_A, including 0 (DeepSeekMath's formula as
//!   written).
//! - A group whose rewards are all equal (`==`, so also any group of size 1) carries no signal:
//!   every advantage is exactly `0.0`, never NaN, whatever ε_A.
//! - Rewards must be finite; any finite values work, including ±`f64::MAX` and subnormals
//!   (each group is rescaled by an exact power of two first, which leaves the result unchanged).
//!
//! Group normalization makes the advantages invariant to adding a constant to every reward, and
//! (up to ε_A) to multiplying every reward by a positive constant: only the *relative* weights
//! of reward terms matter (see [`super::rewards::RewardWeights`]).
//!
//! # The objective per token
//!
//! For one completion `o` with advantage `a`, and for each of its tokens `t`, given the
//! log-probabilities of the sampled token under the policy being trained (`logp_new`, π_θ),
//! the policy that sampled it (`logp_old`, π_old) and the frozen reference (`logp_ref`, π_ref):
//!
//! ```text
//! ρ_t   = exp(logp_new − logp_old)                               the ratio
//! S_t   = min(ρ_t · a, clip(ρ_t, 1 − ε, 1 + ε) · a)              the clipped surrogate
//! KL_t  = exp(logp_ref − logp_new) − (logp_ref − logp_new) − 1   the k3 estimator, ≥ 0
//! J_t   = S_t − β · KL_t
//! L(o)  = −(1/|o|) · Σ_t J_t                                     length-normalized
//! L     = (1/N) · Σ_o L(o)                                       mean over the N completions
//! ```
//!
//! `KL_t` is DeepSeekMath's unbiased estimator of KL(π_θ ‖ π_ref) (Schulman's "k3"): zero when
//! the two log-probabilities agree, positive otherwise. An empty completion (`|o| = 0`) has
//! `L(o) = 0` and no tokens, but still counts in `N`.
//!
//! On-policy with one update per batch (μ = 1 in DeepSeekMath), π_old is π_θ itself: pass
//! `logp_old = logp_new` (detached), so every ratio is 1 and nothing is clipped.
//! All three log-probabilities must be computed the same way (same logits processing, e.g. the
//! same temperature), or the ratio and the KL measure that difference too.
//!
//! # The gradient
//!
//! `L` depends on the parameters θ only through the `logp_new[t]` (`logp_old`, `logp_ref` and
//! `a` are constants), and each `logp_new[t]` appears in one term only, so
//!
//! ```text
//! ∂L/∂logp_new[t] = −(1/N) · (1/|o|) · (∂S_t/∂logp_new[t] − β · ∂KL_t/∂logp_new[t])
//! ∂S_t/∂logp_new[t]  = ρ_t · a   where `min` takes the unclipped branch,
//!                    = 0         where it takes the clipped one (clip(ρ) is constant there)
//! ∂KL_t/∂logp_new[t] = 1 − exp(logp_ref − logp_new)
//! ```
//!
//! The clipped branch is taken exactly when clipping *lowers* the value:
//! `a > 0 and ρ > 1 + ε` (a good completion already made more likely), or
//! `a < 0 and ρ < 1 − ε` (a bad one already made less likely). Everywhere else — `ρ` inside
//! the range, `ρ` outside it on the other side (`a > 0, ρ < 1 − ε`: the min is the unclipped
//! `ρ·a`), and `a = 0` — the unclipped branch is used. **Ties** (`ρ` exactly `1 ± ε`, where both
//! branches have the same value) count as unclipped, with gradient `ρ·a`, which is also what
//! autograd gives through an inclusive `clamp`; such tokens are not counted as clipped.
//!
//! # From the gradient to a weighted cross-entropy
//!
//! [`BatchTerms::grads`] holds `g_t = ∂L/∂logp_new[t]`. The trainer does not need `L`'s own
//! graph: with the **detached** weights `c_t = −g_t` ([`BatchTerms::ce_weights`]), the
//! weighted cross-entropy
//!
//! ```text
//! L' = Σ_t c_t · (−logp_new[t])          (summed over every token of every completion)
//! ```
//!
//! has `∇_θ L' = Σ_t −c_t ∇_θ logp_new[t] = Σ_t g_t ∇_θ logp_new[t] = ∇_θ L` by the chain rule,
//! so one backward pass of the ordinary cross-entropy, with each token's loss scaled by `c_t`
//! (on the logits: `c_t · (softmax(z_t) − onehot(token_t))`), gives GRPO's exact gradient. The
//! *values* of `L'` and `L` differ; log [`BatchTerms::loss`]. Mind the sign: `c_t > 0` raises
//! the token's probability (as a supervised target would), `c_t < 0` lowers it. The `1/N` and `1/|o|` factors are
//! already inside `c_t`, so the cross-entropy must be summed, not averaged. A test checks the
//! identity on softmax logits against finite differences.

/// The ε_A that [`group_advantages`] adds to each group's standard deviation.
pub const ADVANTAGE_EPS: f64 = 1e-4;

/// Group-normalized advantages with ε_A = [`ADVANTAGE_EPS`]; see the [module docs](self).
///
/// `rewards` holds the groups one after the other, `group` rewards each; the result is in the
/// same order.
///
/// # Panics
///
/// If `group` is 0, `rewards.len()` is not a multiple of `group`, or a reward is not finite.
pub fn group_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    group_advantages_with_eps(rewards, group, ADVANTAGE_EPS)
}

/// Group-normalized advantages `(r − mean) / (population std + eps)`, with `eps ≥ 0`
/// (0 is DeepSeekMath's formula as written). All-equal groups give exact zeros.
///
/// # Panics
///
/// As [`group_advantages`], and if `eps` is negative or not finite.
pub fn group_advantages_with_eps(rewards: &[f64], group: usize, eps: f64) -> Vec<f64> {
    assert!(group > 0, "GRPO: the group size must be at least 1");
    assert!(
        rewards.len() % group == 0,
        "GRPO: {} rewards do not split into groups of {group}",
        rewards.len()
    );
    assert!(
        eps >= 0.0 && eps.is_finite(),
        "GRPO: the advantage epsilon must be finite and non-negative, not {eps}"
    );
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        panic!("GRPO: reward {i} is {r}; rewards must be finite");
    }
    let mut out = Vec::with_capacity(rewards.len());
    for chunk in rewards.chunks_exact(group) {
        normalize_group(chunk, eps, &mut out);
    }
    out
}

/// Appends the advantages of one group of finite rewards to `out`.
///
/// The arithmetic is exact `(r − mean) / (std + ε)` after two changes that do not alter the
/// result: every reward is divided by the power of two `2^k ≤ max |r| < 2^(k+1)` (exact, and
/// it keeps sums of ±`f64::MAX` from overflowing) and shifted by the group's first reward (so
/// that rewards close to each other keep exact differences), and ε becomes `ε / 2^k`.
fn normalize_group(rewards: &[f64], eps: f64, out: &mut Vec<f64>) {
    let first = rewards[0];
    if rewards.iter().all(|&r| r == first) {
        out.extend(std::iter::repeat_n(0.0, rewards.len()));
        return;
    }
    // Not all equal, so not all zero: `max > 0`.
    let max = rewards.iter().fold(0.0f64, |m, r| m.max(r.abs()));
    let scale = power_of_two_floor(max);
    let pivot = first / scale;
    let shifted: Vec<f64> = rewards.iter().map(|r| r / scale - pivot).collect();
    let n = rewards.len() as f64;
    let mean = shifted.iter().sum::<f64>() / n;
    let variance = shifted.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / n;
    // `eps / scale` may be +∞ for subnormal rewards; the advantages are then 0, not NaN.
    let denominator = variance.sqrt() + eps / scale;
    if denominator > 0.0 {
        out.extend(shifted.iter().map(|s| (s - mean) / denominator));
    } else {
        // Unreachable for distinct finite rewards (the variance is then positive); kept so that
        // no input can divide 0 by 0.
        out.extend(std::iter::repeat_n(0.0, rewards.len()));
    }
}

/// The largest power of two `≤ x`, for a finite `x > 0` (subnormal or not).
fn power_of_two_floor(x: f64) -> f64 {
    const EXPONENT: u64 = 0x7ff0_0000_0000_0000;
    let bits = x.to_bits();
    if bits & EXPONENT != 0 {
        f64::from_bits(bits & EXPONENT)
    } else {
        // Subnormal: the value is `bits · 2^-1074`; keep its highest set bit.
        f64::from_bits(1u64 << (63 - bits.leading_zeros()))
    }
}

/// GRPO's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrpoConfig {
    /// ε: the ratio is clipped to `[1 − ε, 1 + ε]`. Finite, `≥ 0`.
    pub clip_eps: f64,
    /// β: the weight of the k3 KL penalty against the reference policy. Finite, `≥ 0`
    /// (0 drops the penalty).
    pub beta: f64,
}

impl Default for GrpoConfig {
    /// ε = 0.2 (PPO's usual value), β = 0.04 (DeepSeekMath §4.2's KL coefficient).
    fn default() -> GrpoConfig {
        GrpoConfig {
            clip_eps: 0.2,
            beta: 0.04,
        }
    }
}

impl GrpoConfig {
    /// Checks that ε and β are finite and non-negative.
    pub fn check(&self) -> Result<(), String> {
        if !(self.clip_eps >= 0.0 && self.clip_eps.is_finite()) {
            return Err(format!(
                "GRPO: clip_eps must be finite and non-negative, not {}",
                self.clip_eps
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(format!(
                "GRPO: beta must be finite and non-negative, not {}",
                self.beta
            ));
        }
        Ok(())
    }

    /// Panics with [`GrpoConfig::check`]'s message.
    fn assert_valid(&self) {
        if let Err(message) = self.check() {
            panic!("{message}");
        }
    }
}

/// Everything about one token; see the [module docs](self) for the formulas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTerms {
    /// ρ = exp(logp_new − logp_old).
    pub ratio: f64,
    /// S = min(ρ·a, clip(ρ, 1 − ε, 1 + ε)·a).
    pub surrogate: f64,
    /// The k3 estimator exp(logp_ref − logp_new) − (logp_ref − logp_new) − 1, `≥ 0`.
    pub kl: f64,
    /// Whether `min` took the clipped branch and it is strictly lower than the unclipped one
    /// (ties are not clipped).
    pub clipped: bool,
    /// J = S − β·KL, the per-token objective (to maximize).
    pub objective: f64,
    /// ∂J/∂logp_new: `ρ·a` (0 if clipped) − β·(1 − exp(logp_ref − logp_new)).
    pub d_objective: f64,
}

/// The terms of one token with advantage `advantage`.
///
/// # Panics
///
/// If the configuration fails [`GrpoConfig::check`].
pub fn token_terms(
    config: &GrpoConfig,
    logp_new: f64,
    logp_old: f64,
    logp_ref: f64,
    advantage: f64,
) -> TokenTerms {
    config.assert_valid();
    let ratio = (logp_new - logp_old).exp();
    let (surrogate, d_surrogate, clipped) = surrogate_terms(ratio, advantage, config.clip_eps);
    let (kl, d_kl) = k3_terms(logp_new, logp_ref);
    TokenTerms {
        ratio,
        surrogate,
        kl,
        clipped,
        objective: surrogate - config.beta * kl,
        d_objective: d_surrogate - config.beta * d_kl,
    }
}

/// `(S, ∂S/∂logp_new, clipped)` for ratio `ratio`, advantage `a` and clip `eps ≥ 0`.
///
/// `∂S/∂logp_new = ∂S/∂ρ · ρ`, and `∂S/∂ρ` is `a` on the unclipped branch, 0 on the clipped one.
fn surrogate_terms(ratio: f64, a: f64, eps: f64) -> (f64, f64, bool) {
    let (low, high) = (1.0 - eps, 1.0 + eps);
    let clipped = (a > 0.0 && ratio > high) || (a < 0.0 && ratio < low);
    if clipped {
        (ratio.clamp(low, high) * a, 0.0, true)
    } else {
        (ratio * a, ratio * a, false)
    }
}

/// `(KL, ∂KL/∂logp_new)` for the k3 estimator, with `d = logp_ref − logp_new`:
/// `KL = e^d − d − 1 = expm1(d) − d` (accurate for small `d`, clamped at 0 against rounding)
/// and `∂KL/∂logp_new = 1 − e^d = −expm1(d)`.
fn k3_terms(logp_new: f64, logp_ref: f64) -> (f64, f64) {
    let d = logp_ref - logp_new;
    let e = d.exp_m1();
    ((e - d).max(0.0), -e)
}

/// One completion's log-probabilities (one entry per completion token, all three the same
/// length) and its advantage.
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    /// log π_θ(o_t | q, o_<t): the policy being trained.
    pub logp_new: &'a [f64],
    /// log π_old(o_t | q, o_<t): the policy that sampled the completion.
    pub logp_old: &'a [f64],
    /// log π_ref(o_t | q, o_<t): the frozen reference policy.
    pub logp_ref: &'a [f64],
    /// The completion's advantage, from [`group_advantages`].
    pub advantage: f64,
}

/// One completion's loss and gradient, as if it were a batch of one (no `1/N`).
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionTerms {
    /// `L(o) = −(1/|o|) Σ_t J_t`; 0 for an empty completion.
    pub loss: f64,
    /// `∂L(o)/∂logp_new[t]` for every token.
    pub grad: Vec<f64>,
    /// Σ_t S_t over the completion's tokens.
    pub surrogate_sum: f64,
    /// Σ_t KL_t.
    pub kl_sum: f64,
    /// Σ_t ρ_t.
    pub ratio_sum: f64,
    /// The number of tokens where the clipped branch was taken.
    pub clipped_tokens: usize,
    /// `|o|`.
    pub tokens: usize,
}

impl CompletionTerms {
    /// The detached cross-entropy weights `c_t = −∂L(o)/∂logp_new[t]`.
    pub fn ce_weights(&self) -> Vec<f64> {
        self.grad.iter().map(|g| -g).collect()
    }

    /// The mean of KL_t over the completion's tokens (0 if it has none).
    pub fn kl_mean(&self) -> f64 {
        mean_or_zero(self.kl_sum, self.tokens)
    }
}

/// `sum / count`, or 0 when `count` is 0.
fn mean_or_zero(sum: f64, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// The terms of one completion.
///
/// # Panics
///
/// If the three log-probability slices differ in length, or the configuration fails
/// [`GrpoConfig::check`].
pub fn completion_terms(config: &GrpoConfig, completion: &Completion<'_>) -> CompletionTerms {
    config.assert_valid();
    let Completion {
        logp_new,
        logp_old,
        logp_ref,
        advantage,
    } = *completion;
    assert!(
        logp_old.len() == logp_new.len() && logp_ref.len() == logp_new.len(),
        "GRPO: a completion has {} new, {} old and {} reference log-probabilities",
        logp_new.len(),
        logp_old.len(),
        logp_ref.len()
    );
    let tokens = logp_new.len();
    let scale = if tokens == 0 {
        0.0
    } else {
        1.0 / tokens as f64
    };
    let mut terms = CompletionTerms {
        loss: 0.0,
        grad: Vec::with_capacity(tokens),
        surrogate_sum: 0.0,
        kl_sum: 0.0,
        ratio_sum: 0.0,
        clipped_tokens: 0,
        tokens,
    };
    let mut objective_sum = 0.0;
    for t in 0..tokens {
        let token = token_terms(config, logp_new[t], logp_old[t], logp_ref[t], advantage);
        objective_sum += token.objective;
        terms.grad.push(-scale * token.d_objective);
        terms.surrogate_sum += token.surrogate;
        terms.kl_sum += token.kl;
        terms.ratio_sum += token.ratio;
        terms.clipped_tokens += usize::from(token.clipped);
    }
    terms.loss = -scale * objective_sum;
    terms
}

/// Statistics of a batch, over all its tokens (each token counts once, whatever the length of
/// its completion); all 0 when the batch has no tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GrpoStats {
    /// The mean of S_t.
    pub surrogate_mean: f64,
    /// The mean of KL_t.
    pub kl_mean: f64,
    /// The fraction of tokens where the clipped branch was taken (strictly lower than the
    /// unclipped value).
    pub clip_fraction: f64,
    /// The mean of ρ_t.
    pub ratio_mean: f64,
    /// The number of tokens.
    pub tokens: usize,
    /// The number of completions, `N`.
    pub completions: usize,
}

/// The loss, gradient and statistics of a batch of completions.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchTerms {
    /// `L = (1/N) Σ_o L(o)`; 0 for an empty batch.
    pub loss: f64,
    /// `∂L/∂logp_new[t]` for every token of every completion, in the batch's order
    /// (`1/N` and `1/|o|` included).
    pub grads: Vec<Vec<f64>>,
    /// Token-level statistics.
    pub stats: GrpoStats,
}

impl BatchTerms {
    /// The detached cross-entropy weights `c_t = −∂L/∂logp_new[t]`: the trainer's loss
    /// `Σ_t c_t · (−logp_new[t])`, summed over every token, has the gradient of [`Self::loss`].
    pub fn ce_weights(&self) -> Vec<Vec<f64>> {
        self.grads
            .iter()
            .map(|g| g.iter().map(|g| -g).collect())
            .collect()
    }
}

/// The terms of a batch: the mean of the completions' losses, with their gradients scaled by
/// `1/N`.
///
/// # Panics
///
/// As [`completion_terms`].
pub fn batch_terms(config: &GrpoConfig, completions: &[Completion<'_>]) -> BatchTerms {
    config.assert_valid();
    let n = completions.len();
    let scale = if n == 0 { 0.0 } else { 1.0 / n as f64 };
    let mut loss = 0.0;
    let mut grads = Vec::with_capacity(n);
    let (mut surrogate, mut kl, mut ratio) = (0.0, 0.0, 0.0);
    let (mut clipped, mut tokens) = (0, 0);
    for completion in completions {
        let terms = completion_terms(config, completion);
        loss += terms.loss;
        grads.push(terms.grad.iter().map(|g| g * scale).collect());
        surrogate += terms.surrogate_sum;
        kl += terms.kl_sum;
        ratio += terms.ratio_sum;
        clipped += terms.clipped_tokens;
        tokens += terms.tokens;
    }
    BatchTerms {
        loss: loss * scale,
        grads,
        stats: GrpoStats {
            surrogate_mean: mean_or_zero(surrogate, tokens),
            kl_mean: mean_or_zero(kl, tokens),
            clip_fraction: mean_or_zero(clipped as f64, tokens),
            ratio_mean: mean_or_zero(ratio, tokens),
            tokens,
            completions: n,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    fn assert_all_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g, *w, tol), "{got:?} vs {want:?}");
        }
    }

    // ---- advantages -------------------------------------------------------------------------

    #[test]
    fn advantages_by_hand() {
        // mean 0.5, population std 0.5.
        assert_eq!(
            group_advantages_with_eps(&[1.0, 0.0, 0.0, 1.0], 4, 0.0),
            [1.0, -1.0, -1.0, 1.0]
        );
        // With ε_A = 1e-4: ±0.5 / 0.5001.
        let a = 0.5 / 0.5001;
        assert_all_close(
            &group_advantages(&[1.0, 0.0, 0.0, 1.0], 4),
            &[a, -a, -a, a],
            1e-15,
        );
        assert!(close(a, 0.999_800_039_992_001_6, 1e-15));
        // mean 0.25, population std sqrt(0.1875) = 0.4330127: +0.75/σ = √3, −0.25/σ = −1/√3.
        // (The sample std, 0.5, would give 1.5 and −0.5.)
        let (s3, r3) = (3f64.sqrt(), 1.0 / 3f64.sqrt());
        assert_all_close(
            &group_advantages_with_eps(&[1.0, 0.0, 0.0, 0.0], 4, 0.0),
            &[s3, -r3, -r3, -r3],
            1e-15,
        );
        // Rewards 1.1 / 0.1 / 1.0 / 0.0 (accuracy 1, format 0.1): mean 0.55, σ = 0.5025.
        let sigma = (0.25f64 * (0.55f64.powi(2) * 2.0 + 0.45f64.powi(2) * 2.0)).sqrt();
        assert!(close(sigma, 0.502_493_781_056_044_2, 1e-15));
        assert_all_close(
            &group_advantages_with_eps(&[1.1, 0.1, 1.0, 0.0], 4, 0.0),
            &[0.55 / sigma, -0.45 / sigma, 0.45 / sigma, -0.55 / sigma],
            1e-14,
        );
        // Groups are independent: [1, 0] → ±1, [3, 3] → 0.
        assert_eq!(
            group_advantages_with_eps(&[1.0, 0.0, 3.0, 3.0], 2, 0.0),
            [1.0, -1.0, 0.0, 0.0]
        );
        // The epsilon damps differences far below 1e-4: ±0.5e-9 / (0.5e-9 + 1e-4).
        let tiny = group_advantages(&[0.0, 1e-9], 2);
        let want = 0.5e-9 / (0.5e-9 + 1e-4);
        assert_all_close(&tiny, &[-want, want], 1e-12);
        assert!(tiny[1] < 1e-5);
        // ...and with ε_A = 0 they are ±1, as for any two distinct rewards.
        assert_eq!(group_advantages_with_eps(&[0.0, 1e-9], 2, 0.0), [-1.0, 1.0]);
        assert_eq!(group_advantages(&[], 3), Vec::<f64>::new());
    }

    #[test]
    fn equal_rewards_give_exact_zeros() {
        for eps in [0.0, ADVANTAGE_EPS, 1.0] {
            for group in [
                vec![0.1, 0.1, 0.1],
                vec![0.0; 8],
                vec![0.0, -0.0],
                vec![-7.5; 5],
                vec![f64::MAX; 4],
                vec![f64::MIN_POSITIVE / 8.0; 2],
            ] {
                let a = group_advantages_with_eps(&group, group.len(), eps);
                assert!(a.iter().all(|&x| x == 0.0), "{group:?} → {a:?}");
            }
            // Group size 1: always zero.
            let a = group_advantages_with_eps(&[5.0, -2.0, 0.0, 1e300], 1, eps);
            assert_eq!(a, [0.0; 4]);
        }
    }

    #[test]
    fn extreme_rewards_do_not_overflow() {
        assert_eq!(
            group_advantages_with_eps(&[f64::MAX, -f64::MAX], 2, 0.0),
            [1.0, -1.0]
        );
        assert_eq!(
            group_advantages(&[1e300, -1e300, 1e300, -1e300], 4),
            [1.0, -1.0, 1.0, -1.0]
        );
        // Subnormal rewards: ε_A dominates completely (ε/scale = +∞) and gives zeros, not NaN.
        let a = group_advantages(&[0.0, 5e-324], 2);
        assert!(a.iter().all(|x| *x == 0.0), "{a:?}");
        assert_eq!(
            group_advantages_with_eps(&[0.0, 5e-324], 2, 0.0),
            [-1.0, 1.0]
        );
    }

    #[test]
    fn nearby_rewards_keep_exact_differences() {
        // [x, y, y] with y − x tiny next to x: like [0, 1, 1], mean 2/3, population std √2/3.
        let (x, y) = (1e16, 1e16 + 2.0);
        let (a, b) = (-(2f64.sqrt()), 1.0 / 2f64.sqrt());
        assert_all_close(
            &group_advantages_with_eps(&[x, y, y], 3, 0.0),
            &[a, b, b],
            1e-15,
        );
        assert_all_close(
            &group_advantages_with_eps(&[0.0, 1.0, 1.0], 3, 0.0),
            &[a, b, b],
            1e-15,
        );
    }

    #[test]
    fn power_of_two_floor_is_exact() {
        assert_eq!(power_of_two_floor(1.0), 1.0);
        assert_eq!(power_of_two_floor(1.9999), 1.0);
        assert_eq!(power_of_two_floor(3.0), 2.0);
        assert_eq!(power_of_two_floor(0.3), 0.25);
        assert_eq!(power_of_two_floor(f64::MAX), 2f64.powi(1023));
        assert_eq!(power_of_two_floor(f64::MIN_POSITIVE), f64::MIN_POSITIVE);
        assert_eq!(power_of_two_floor(5e-324), 5e-324);
        assert_eq!(
            power_of_two_floor(f64::MIN_POSITIVE * 0.75),
            f64::MIN_POSITIVE * 0.5
        );
    }

    #[test]
    #[should_panic(expected = "group size")]
    fn group_zero_panics() {
        group_advantages(&[1.0], 0);
    }

    #[test]
    #[should_panic(expected = "do not split")]
    fn ragged_groups_panic() {
        group_advantages(&[1.0, 2.0, 3.0], 2);
    }

    #[test]
    #[should_panic(expected = "must be finite")]
    fn nan_reward_panics() {
        group_advantages(&[1.0, f64::NAN], 2);
    }

    /// Finite rewards of every kind: small integers (many ties), reward-like values, and any
    /// finite `f64`.
    fn reward() -> impl Strategy<Value = f64> {
        prop_oneof![
            (-2i32..3).prop_map(f64::from),
            prop::sample::select(vec![0.0, 0.1, 1.0, 1.1]),
            prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
        ]
    }

    proptest! {
        #[test]
        fn advantages_are_finite_centered_and_standardized(
            group in 1usize..9,
            groups in 1usize..5,
            pool in prop::collection::vec(reward(), 40),
            eps in prop::sample::select(vec![0.0, ADVANTAGE_EPS, 0.5]),
        ) {
            let rewards: Vec<f64> = pool.iter().copied().cycle().take(group * groups).collect();
            let advantages = group_advantages_with_eps(&rewards, group, eps);
            prop_assert_eq!(advantages.len(), rewards.len());
            for (r, a) in rewards.chunks(group).zip(advantages.chunks(group)) {
                prop_assert!(a.iter().all(|x| x.is_finite()), "{:?} → {:?}", r, a);
                let sum: f64 = a.iter().sum();
                prop_assert!(sum.abs() <= 1e-12 * group as f64, "{:?} → {:?}", r, a);
                // |z| ≤ sqrt(G − 1) for population z-scores, and ε_A only shrinks them.
                let bound = ((group - 1) as f64).sqrt() * (1.0 + 1e-12);
                prop_assert!(a.iter().all(|x| x.abs() <= bound), "{:?} → {:?}", r, a);
                if r.iter().all(|&x| x == r[0]) {
                    prop_assert!(a.iter().all(|&x| x == 0.0), "{:?} → {:?}", r, a);
                } else if eps == 0.0 {
                    // Mean 0 and population std 1.
                    let var = a.iter().map(|x| x * x).sum::<f64>() / group as f64;
                    prop_assert!((var - 1.0).abs() < 1e-9, "{:?} → {:?}", r, a);
                }
                // Order is kept: a larger reward never gets a smaller advantage.
                for i in 0..group {
                    for j in 0..group {
                        if r[i] > r[j] {
                            prop_assert!(a[i] >= a[j], "{:?} → {:?}", r, a);
                        }
                    }
                }
            }
        }

        #[test]
        fn advantages_ignore_shifts_and_scales(
            pool in prop::collection::vec(-3i32..4, 6),
            shift in -100.0f64..100.0,
            scale in 0.01f64..100.0,
        ) {
            let r: Vec<f64> = pool.iter().map(|&x| f64::from(x)).collect();
            let moved: Vec<f64> = r.iter().map(|x| x * scale + shift).collect();
            let a = group_advantages_with_eps(&r, 3, 0.0);
            let b = group_advantages_with_eps(&moved, 3, 0.0);
            for (x, y) in a.iter().zip(&b) {
                prop_assert!((x - y).abs() < 1e-9, "{:?} vs {:?}", a, b);
            }
        }
    }

    // ---- the objective ----------------------------------------------------------------------

    const CONFIG: GrpoConfig = GrpoConfig {
        clip_eps: 0.2,
        beta: 0.04,
    };

    #[test]
    fn defaults() {
        assert_eq!(GrpoConfig::default(), CONFIG);
        assert!(CONFIG.check().is_ok());
        for bad in [
            GrpoConfig {
                clip_eps: -0.1,
                beta: 0.0,
            },
            GrpoConfig {
                clip_eps: f64::NAN,
                beta: 0.0,
            },
            GrpoConfig {
                clip_eps: 0.2,
                beta: -1.0,
            },
            GrpoConfig {
                clip_eps: 0.2,
                beta: f64::INFINITY,
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    #[should_panic(expected = "clip_eps")]
    fn invalid_config_panics() {
        let config = GrpoConfig {
            clip_eps: -1.0,
            beta: 0.0,
        };
        token_terms(&config, 0.0, 0.0, 0.0, 1.0);
    }

    #[test]
    fn ratio_and_clipping_by_hand() {
        let no_kl = GrpoConfig {
            clip_eps: 0.2,
            beta: 0.0,
        };
        let ln = f64::ln;
        // (logp_new − logp_old, advantage) → (ratio, surrogate, ∂S/∂logp_new, clipped)
        let cases = [
            // On-policy: ρ = 1, S = a, gradient a.
            (0.0, 2.0, 1.0, 2.0, 2.0, false),
            (0.0, -0.5, 1.0, -0.5, -0.5, false),
            // Inside the range: unclipped.
            (ln(1.1), 2.0, 1.1, 2.2, 2.2, false),
            (ln(0.9), -1.0, 0.9, -0.9, -0.9, false),
            // a > 0, ρ above 1 + ε: clipped to 1.2·a, no gradient.
            (ln(1.5), 2.0, 1.5, 2.4, 0.0, true),
            // a > 0, ρ below 1 − ε: min keeps ρ·a (smaller than 0.8·a), gradient ρ·a.
            (ln(0.5), 2.0, 0.5, 1.0, 1.0, false),
            // a < 0, ρ below 1 − ε: clipped to 0.8·a, no gradient.
            (ln(0.5), -1.0, 0.5, -0.8, 0.0, true),
            // a < 0, ρ above 1 + ε: min keeps ρ·a = −1.5 (below −1.2), gradient ρ·a.
            (ln(1.5), -1.0, 1.5, -1.5, -1.5, false),
            // a = 0: nothing, never clipped.
            (ln(3.0), 0.0, 3.0, 0.0, 0.0, false),
            (ln(0.1), 0.0, 0.1, 0.0, 0.0, false),
        ];
        for (delta, a, ratio, surrogate, grad, clipped) in cases {
            let old = -1.3;
            let t = token_terms(&no_kl, old + delta, old, old + delta, a);
            let what = format!("Δ={delta} a={a}: {t:?}");
            assert!(close(t.ratio, ratio, 1e-14), "{what}");
            assert!(close(t.surrogate, surrogate, 1e-14), "{what}");
            assert!(close(t.d_objective, grad, 1e-14), "{what}");
            assert_eq!(t.clipped, clipped, "{what}");
            assert_eq!(t.kl, 0.0, "{what}");
            assert_eq!(t.objective, t.surrogate, "{what}");
            // S is the literal min of the two branches.
            let min = (t.ratio * a).min(t.ratio.clamp(0.8, 1.2) * a);
            assert!(close(t.surrogate, min, 1e-15), "{what}");
        }
    }

    #[test]
    fn clip_ties_count_as_unclipped() {
        let eps = 0.2;
        for ratio in [1.0 + eps, 1.0 - eps] {
            for a in [2.0, -2.0] {
                let (s, g, clipped) = surrogate_terms(ratio, a, eps);
                assert_eq!(s, ratio * a);
                assert_eq!(g, ratio * a, "ratio {ratio}, a {a}");
                assert!(!clipped);
            }
        }
        // Just past the boundary, on the side where clipping lowers the value: clipped.
        let above = f64::from_bits((1.0f64 + eps).to_bits() + 1);
        assert_eq!(
            surrogate_terms(above, 2.0, eps),
            ((1.0 + eps) * 2.0, 0.0, true)
        );
        let below = f64::from_bits((1.0f64 - eps).to_bits() - 1);
        assert_eq!(
            surrogate_terms(below, -2.0, eps),
            ((1.0 - eps) * -2.0, 0.0, true)
        );
        // ε = 0: every ratio but 1 is clipped on one side.
        assert_eq!(surrogate_terms(1.0, 1.0, 0.0), (1.0, 1.0, false));
        assert!(surrogate_terms(1.01, 1.0, 0.0).2);
        assert!(!surrogate_terms(0.99, 1.0, 0.0).2);
    }

    #[test]
    fn k3_kl_by_hand() {
        let kl_only = GrpoConfig {
            clip_eps: 0.2,
            beta: 1.0,
        };
        // logp_ref == logp_new: zero, with zero gradient, whatever the value.
        for lp in [0.0, -0.1, -3.7, -40.0] {
            let t = token_terms(&kl_only, lp, lp, lp, 0.0);
            assert_eq!((t.kl, t.d_objective), (0.0, 0.0));
        }
        // ref − new = ln 2: KL = 2 − ln 2 − 1 = 1 − ln 2; ∂KL/∂new = 1 − 2 = −1,
        // so ∂J/∂new = −β·(−1) = +1 (raising logp_new towards the reference lowers the KL).
        let ln2 = std::f64::consts::LN_2;
        let t = token_terms(&kl_only, -2.0, -2.0, -2.0 + ln2, 0.0);
        assert!(close(t.kl, 1.0 - ln2, 1e-15), "{t:?}");
        assert!(close(t.kl, 0.306_852_819_440_054_7, 1e-15), "{t:?}");
        assert!(close(t.d_objective, 1.0, 1e-15), "{t:?}");
        // ref − new = −ln 2: KL = 1/2 + ln 2 − 1 = ln 2 − 1/2; ∂KL/∂new = 1 − 1/2 = 1/2.
        let t = token_terms(&kl_only, -2.0, -2.0, -2.0 - ln2, 0.0);
        assert!(close(t.kl, ln2 - 0.5, 1e-15), "{t:?}");
        assert!(close(t.d_objective, -0.5, 1e-15), "{t:?}");
        // β scales the penalty: J = S − β·KL.
        let t = token_terms(&CONFIG, -2.0, -2.0, -2.0 + ln2, 1.5);
        assert!(close(t.objective, 1.5 - 0.04 * (1.0 - ln2), 1e-15), "{t:?}");
        assert!(close(t.d_objective, 1.5 + 0.04, 1e-15), "{t:?}");
        // Tiny differences stay accurate (expm1) and non-negative: KL ≈ d²/2.
        let t = token_terms(&kl_only, -1.0, -1.0, -1.0 + 1e-6, 0.0);
        assert!(close(t.kl, 0.5e-12, 1e-5), "{t:?}");
    }

    proptest! {
        #[test]
        fn k3_kl_is_non_negative(new in -30.0f64..0.0, reference in -30.0f64..0.0) {
            let (kl, _) = k3_terms(new, reference);
            prop_assert!(kl >= 0.0);
            if new == reference {
                prop_assert_eq!(kl, 0.0);
            }
            if (new - reference).abs() > 1e-6 {
                prop_assert!(kl > 0.0);
            }
        }
    }

    #[test]
    fn length_normalization_and_batch_mean_by_hand() {
        // On-policy, at the reference: every J_t = a, so L(o) = −a whatever |o|.
        let short = [-0.5, -1.5];
        let long = [-0.1, -2.0, -0.7, -3.0];
        let c_short = Completion {
            logp_new: &short,
            logp_old: &short,
            logp_ref: &short,
            advantage: 1.0,
        };
        let c_long = Completion {
            logp_new: &long,
            logp_old: &long,
            logp_ref: &long,
            advantage: -1.0,
        };
        let t = completion_terms(&CONFIG, &c_short);
        assert_eq!(t.loss, -1.0);
        assert_eq!(t.grad, [-0.5, -0.5]);
        assert_eq!(t.ce_weights(), [0.5, 0.5]);
        assert_eq!((t.tokens, t.clipped_tokens, t.kl_mean()), (2, 0, 0.0));
        let t = completion_terms(&CONFIG, &c_long);
        assert_eq!(t.loss, 1.0);
        assert_eq!(t.grad, [0.25; 4]);
        // The batch: L = (−1 + 1) / 2 = 0; gradients gain 1/N = 1/2.
        let b = batch_terms(&CONFIG, &[c_short, c_long]);
        assert_eq!(b.loss, 0.0);
        assert_eq!(b.grads, [vec![-0.25; 2], vec![0.125; 4]]);
        assert_eq!(b.ce_weights(), [vec![0.25; 2], vec![-0.125; 4]]);
        assert_eq!(
            b.stats,
            GrpoStats {
                surrogate_mean: (2.0 - 4.0) / 6.0,
                kl_mean: 0.0,
                clip_fraction: 0.0,
                ratio_mean: 1.0,
                tokens: 6,
                completions: 2,
            }
        );
        // Repeating every token of a completion changes neither its loss nor its total weight.
        let doubled: Vec<f64> = short.iter().flat_map(|&x| [x, x]).collect();
        let c = Completion {
            logp_new: &doubled,
            logp_old: &doubled,
            logp_ref: &doubled,
            advantage: 1.0,
        };
        let t = completion_terms(&CONFIG, &c);
        assert_eq!(t.loss, -1.0);
        assert_eq!(t.grad.iter().sum::<f64>(), -1.0);
    }

    #[test]
    fn batch_statistics_by_hand() {
        let ln = f64::ln;
        let ln2 = std::f64::consts::LN_2;
        // Completion 1 (a = 1): ρ = 1.5 (clipped), ρ = 1 (at the reference + ln 2).
        let new1 = [ln(0.3), ln(0.2)];
        let old1 = [ln(0.2), ln(0.2)];
        let ref1 = [ln(0.3), ln(0.2) + ln2];
        // Completion 2 (a = −1): ρ = 0.5 (clipped), ρ = 1.5 (not clipped: the min is −1.5).
        let new2 = [ln(0.1), ln(0.3)];
        let old2 = [ln(0.2), ln(0.2)];
        let ref2 = new2;
        let config = GrpoConfig {
            clip_eps: 0.2,
            beta: 0.5,
        };
        let batch = [
            Completion {
                logp_new: &new1,
                logp_old: &old1,
                logp_ref: &ref1,
                advantage: 1.0,
            },
            Completion {
                logp_new: &new2,
                logp_old: &old2,
                logp_ref: &ref2,
                advantage: -1.0,
            },
        ];
        let b = batch_terms(&config, &batch);
        let s = b.stats;
        assert_eq!((s.tokens, s.completions), (4, 2));
        assert_eq!(s.clip_fraction, 0.5);
        assert!(
            close(s.ratio_mean, (1.5 + 1.0 + 0.5 + 1.5) / 4.0, 1e-14),
            "{s:?}"
        );
        assert!(
            close(s.surrogate_mean, (1.2 + 1.0 - 0.8 - 1.5) / 4.0, 1e-14),
            "{s:?}"
        );
        assert!(close(s.kl_mean, (1.0 - ln2) / 4.0, 1e-14), "{s:?}");
        // L(o1) = −(1.2 + 1 − 0.5·(1 − ln 2)) / 2, L(o2) = −(−0.8 − 1.5) / 2.
        let l1 = -(1.2 + 1.0 - 0.5 * (1.0 - ln2)) / 2.0;
        let l2 = 2.3 / 2.0;
        assert!(close(b.loss, (l1 + l2) / 2.0, 1e-14), "{b:?}");
        // Gradients: clipped tokens get only the KL part (zero here); the unclipped ones ρ·a
        // and −β·(1 − 2) = +0.5 from the KL; all times −1/(|o|·N) = −1/4.
        assert_all_close(&b.grads[0], &[0.0, -(1.0 + 0.5) / 4.0], 1e-14);
        assert_all_close(&b.grads[1], &[0.0, 1.5 / 4.0], 1e-14);
        assert_eq!(batch_terms(&config, &[]).loss, 0.0);
        assert_eq!(batch_terms(&config, &[]).stats, GrpoStats::default());
    }

    #[test]
    fn empty_completions_have_no_loss_but_count() {
        let lp = [-1.0];
        let empty = Completion {
            logp_new: &[],
            logp_old: &[],
            logp_ref: &[],
            advantage: 1.0,
        };
        let one = Completion {
            logp_new: &lp,
            logp_old: &lp,
            logp_ref: &lp,
            advantage: 1.0,
        };
        let t = completion_terms(&CONFIG, &empty);
        assert_eq!(
            (t.loss, t.tokens, t.grad.len(), t.kl_mean()),
            (0.0, 0, 0, 0.0)
        );
        let b = batch_terms(&CONFIG, &[empty, one]);
        assert_eq!(b.loss, -0.5);
        assert_eq!(b.grads, [vec![], vec![-0.5]]);
        assert_eq!((b.stats.tokens, b.stats.completions), (1, 2));
    }

    #[test]
    #[should_panic(expected = "log-probabilities")]
    fn mismatched_lengths_panic() {
        let c = Completion {
            logp_new: &[-1.0, -2.0],
            logp_old: &[-1.0],
            logp_ref: &[-1.0, -2.0],
            advantage: 1.0,
        };
        completion_terms(&CONFIG, &c);
    }

    // ---- the gradient against finite differences ------------------------------------------

    /// One batch as owned vectors, to perturb.
    #[derive(Clone, Debug)]
    struct Owned {
        new: Vec<Vec<f64>>,
        old: Vec<Vec<f64>>,
        reference: Vec<Vec<f64>>,
        advantages: Vec<f64>,
    }

    impl Owned {
        fn terms(&self, config: &GrpoConfig) -> BatchTerms {
            let completions: Vec<Completion<'_>> = (0..self.new.len())
                .map(|i| Completion {
                    logp_new: &self.new[i],
                    logp_old: &self.old[i],
                    logp_ref: &self.reference[i],
                    advantage: self.advantages[i],
                })
                .collect();
            batch_terms(config, &completions)
        }

        /// Whether token (i, t)'s ratio is within `margin` of a clip kink.
        fn near_kink(&self, config: &GrpoConfig, i: usize, t: usize, margin: f64) -> bool {
            let ratio = (self.new[i][t] - self.old[i][t]).exp();
            (ratio - (1.0 + config.clip_eps)).abs() < margin
                || (ratio - (1.0 - config.clip_eps)).abs() < margin
        }

        /// Checks every analytic ∂L/∂logp_new[t] against a central difference of the loss;
        /// returns how many tokens were checked.
        fn check_gradient(&self, config: &GrpoConfig) -> Result<usize, String> {
            let analytic = self.terms(config).grads;
            let h = 1e-6;
            let mut checked = 0;
            for (i, grads) in analytic.iter().enumerate() {
                for (t, &g) in grads.iter().enumerate() {
                    if self.near_kink(config, i, t, 1e-4) {
                        continue;
                    }
                    let mut plus = self.clone();
                    plus.new[i][t] += h;
                    let mut minus = self.clone();
                    minus.new[i][t] -= h;
                    let numeric = (plus.terms(config).loss - minus.terms(config).loss) / (2.0 * h);
                    if (numeric - g).abs() > 1e-7 * (1.0 + g.abs()) {
                        return Err(format!("token ({i}, {t}): analytic {g}, numeric {numeric}"));
                    }
                    checked += 1;
                }
            }
            Ok(checked)
        }
    }

    #[test]
    fn gradient_matches_finite_differences_by_hand() {
        let ln = f64::ln;
        // Every regime: clipped and unclipped on both sides for both signs of the advantage,
        // with and without KL, and a zero advantage.
        let batch = Owned {
            new: vec![
                vec![ln(0.3), ln(0.1), ln(0.23), -4.0, -0.01],
                vec![ln(0.1), ln(0.3), ln(0.21), -0.5],
                vec![-1.0, -2.0],
            ],
            old: vec![
                vec![ln(0.2), ln(0.2), ln(0.2), -3.0, -0.02],
                vec![ln(0.2), ln(0.2), ln(0.2), -0.4],
                vec![-1.5, -1.0],
            ],
            reference: vec![
                vec![ln(0.25), ln(0.1), ln(0.5), -0.2, -0.01],
                vec![ln(0.05), ln(0.2), ln(0.2), -6.0],
                vec![-0.3, -2.5],
            ],
            advantages: vec![1.3, -0.7, 0.0],
        };
        for config in [
            CONFIG,
            GrpoConfig {
                clip_eps: 0.1,
                beta: 0.0,
            },
            GrpoConfig {
                clip_eps: 0.3,
                beta: 2.0,
            },
        ] {
            let checked = batch.check_gradient(&config).unwrap();
            assert_eq!(checked, 11, "no token is near a kink here");
            let stats = batch.terms(&config).stats;
            assert!(
                stats.clip_fraction > 0.0 && stats.clip_fraction < 1.0,
                "{stats:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The key test: the per-token weights are the loss's derivative.
        #[test]
        fn gradient_matches_finite_differences(
            lengths in prop::collection::vec(0usize..6, 1..5),
            seed in prop::collection::vec((-6.0f64..-0.01, -0.6f64..0.6, -6.0f64..-0.01), 30),
            advantages in prop::collection::vec(-2.5f64..2.5, 4),
            clip_eps in 0.05f64..0.4,
            beta in prop::sample::select(vec![0.0, 0.04, 0.5]),
        ) {
            let mut tokens = seed.iter().cycle();
            let mut batch = Owned { new: vec![], old: vec![], reference: vec![], advantages: vec![] };
            for (i, &len) in lengths.iter().enumerate() {
                let (mut new, mut old, mut reference) = (vec![], vec![], vec![]);
                for _ in 0..len {
                    let &(lp, delta, lr) = tokens.next().unwrap();
                    new.push(lp);
                    old.push(lp - delta);
                    reference.push(lr);
                }
                batch.new.push(new);
                batch.old.push(old);
                batch.reference.push(reference);
                batch.advantages.push(advantages[i]);
            }
            let config = GrpoConfig { clip_eps, beta };
            batch.check_gradient(&config).map_err(TestCaseError::fail)?;
            // The loss is the mean of the completions' own losses.
            let terms = batch.terms(&config);
            let singles: f64 = (0..batch.new.len())
                .map(|i| {
                    let c = Completion {
                        logp_new: &batch.new[i],
                        logp_old: &batch.old[i],
                        logp_ref: &batch.reference[i],
                        advantage: batch.advantages[i],
                    };
                    completion_terms(&config, &c).loss
                })
                .sum();
            prop_assert!(close(terms.loss, singles / batch.new.len() as f64, 1e-12));
            prop_assert!(terms.stats.kl_mean >= 0.0);
            prop_assert!((0.0..=1.0).contains(&terms.stats.clip_fraction));
        }
    }

    /// The weighted cross-entropy of the module docs has the GRPO gradient on the logits.
    #[test]
    fn weighted_cross_entropy_has_the_grpo_gradient() {
        const VOCAB: usize = 5;
        fn log_softmax(z: &[f64]) -> Vec<f64> {
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            z.iter().map(|x| x - lse).collect()
        }
        // Two completions of 3 and 2 tokens: logits per position, the sampled tokens, and
        // fixed old and reference log-probabilities of those tokens.
        let mut logits: Vec<Vec<[f64; VOCAB]>> = vec![
            vec![
                [0.1, 1.2, -0.3, 0.5, 0.0],
                [2.0, -1.0, 0.3, 0.3, 0.7],
                [-0.5, 0.0, 0.9, 1.1, -2.0],
            ],
            vec![[0.4, 0.4, 0.4, -0.2, 1.5], [1.0, 0.0, -1.0, 0.5, 0.2]],
        ];
        let sampled = [vec![1, 0, 3], vec![4, 2]];
        let old = [vec![-1.0, -0.9, -1.4], vec![-0.9, -2.0]];
        let reference = [vec![-1.3, -0.5, -1.0], vec![-1.1, -2.8]];
        let advantages = [0.8, -1.1];
        let config = GrpoConfig {
            clip_eps: 0.2,
            beta: 0.3,
        };
        let grpo = |logits: &Vec<Vec<[f64; VOCAB]>>| {
            let new: Vec<Vec<f64>> = logits
                .iter()
                .zip(&sampled)
                .map(|(rows, ys)| {
                    rows.iter()
                        .zip(ys)
                        .map(|(z, &y)| log_softmax(z)[y])
                        .collect()
                })
                .collect();
            let completions: Vec<Completion<'_>> = (0..2)
                .map(|i| Completion {
                    logp_new: &new[i],
                    logp_old: &old[i],
                    logp_ref: &reference[i],
                    advantage: advantages[i],
                })
                .collect();
            batch_terms(&config, &completions)
        };
        let terms = grpo(&logits);
        assert!(terms.stats.clip_fraction > 0.0, "{:?}", terms.stats);
        let weights = terms.ce_weights();
        for i in 0..2 {
            for t in 0..sampled[i].len() {
                // ∂/∂z of c_t · (−log softmax(z)[y]) = c_t · (softmax(z) − onehot(y)).
                let probs: Vec<f64> = log_softmax(&logits[i][t]).iter().map(|x| x.exp()).collect();
                for v in 0..VOCAB {
                    let onehot = if v == sampled[i][t] { 1.0 } else { 0.0 };
                    let ce_grad = weights[i][t] * (probs[v] - onehot);
                    let h = 1e-6;
                    logits[i][t][v] += h;
                    let plus = grpo(&logits).loss;
                    logits[i][t][v] -= 2.0 * h;
                    let minus = grpo(&logits).loss;
                    logits[i][t][v] += h;
                    let numeric = (plus - minus) / (2.0 * h);
                    assert!(
                        (numeric - ce_grad).abs() < 1e-8,
                        "({i}, {t}, {v}): CE {ce_grad}, GRPO {numeric}"
                    );
                }
            }
        }
    }
}
