//! Mixture-of-experts kernels: the router, the grouped expert FFN and the sequence-wise balance
//! loss, with their backward kernels and the aux-loss-free bias update.
//!
//! The semantics follow HF transformers' DeepSeek models: `DeepseekV3TopkRouter` (sigmoid
//! scores, a selection bias, group-limited selection by the sum of each group's two best
//! scores, renormalized weights times a scaling factor) and DeepSeek-V2's gate (softmax scores,
//! greedy or group-limited selection by each group's best score). Where HF leaves an order
//! unspecified (`torch.topk(..., sorted=False)`, ties), these kernels fix one: the `k` slots of
//! a token are ordered by descending selection score, and equal scores go to the lower expert
//! (or group) index, so a routing decision never depends on the thread count.
//!
//! Masked groups follow HF, not DeepSeek's own reference code: experts outside the kept groups
//! get selection score `0.0` (HF's `masked_fill(..., 0.0)`), where DeepSeek's reference uses
//! `-inf`. The two agree whenever the kept experts' selection scores are positive, which is
//! always the case for softmax scores without a bias. With sigmoid scores and a negative
//! enough bias they differ: when fewer than `k` kept experts have a positive selection score,
//! the masked experts (all tied at `0.0`, so the lowest indices first) beat the negative kept
//! ones and a token is routed into a group that group-limited selection dropped.
//!
//! `router.rs` has the router, `experts.rs` the grouped expert FFN, `balance.rs` the balance
//! loss, the expert load and the bias update.

mod balance;
mod experts;
mod router;

pub use balance::{balance_loss_bwd, balance_loss_fwd, expert_load, update_balance_bias};
pub use experts::{
    combine_slots, experts_bwd, experts_bwd_with, experts_fwd, experts_fwd_with, gather_sorted,
    per_element_values, per_element_values_and_grads, sort_by_expert, Activation, ExpertFfn,
    ExpertsGrads, ExpertsSaved, GeluTanh, SwiGlu,
};
pub use router::{
    router_bwd, router_fwd, GroupScore, RouterConfig, RouterOut, ScoreFunc, Selection,
};

#[cfg(test)]
mod tests {
    use super::experts::row_parts;
    use super::*;
    use crate::data::Rng;

    /// Uniform values in `[-scale, scale)`.
    fn uniform(rng: &mut Rng, len: usize, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// The `e × e` identity, so that a router with `w = eye(e)` has `logits = x`.
    fn eye(e: usize) -> Vec<f64> {
        let mut w = vec![0.0; e * e];
        for i in 0..e {
            w[i * e + i] = 1.0;
        }
        w
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn config(score: ScoreFunc, top_k: usize) -> RouterConfig {
        RouterConfig {
            score,
            select: Selection::Greedy,
            groups: 1,
            groups_kept: 1,
            group_score: GroupScore::Top2Sum,
            top_k,
            normalize: false,
            scale: 1.0,
        }
    }

    fn grouped(group_score: GroupScore, groups: usize, kept: usize, top_k: usize) -> RouterConfig {
        RouterConfig {
            select: Selection::GroupLimited,
            groups,
            groups_kept: kept,
            group_score,
            ..config(ScoreFunc::Sigmoid, top_k)
        }
    }

    /// Routes rows of logits directly (`w` is the identity).
    fn route(logits: &[f64], e: usize, bias: &[f64], cfg: &RouterConfig) -> RouterOut<f64> {
        router_fwd(logits, logits.len() / e, e, &eye(e), e, bias, cfg)
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs() / (1.0 + w.abs());
            assert!(err < tol, "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// Central finite differences of `f` at `p`.
    fn numeric_grad(p: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let eps = 1e-6;
        let mut q = p.to_vec();
        (0..p.len())
            .map(|i| {
                q[i] = p[i] + eps;
                let up = f(&q);
                q[i] = p[i] - eps;
                let down = f(&q);
                q[i] = p[i];
                (up - down) / (2.0 * eps)
            })
            .collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn greedy_softmax_picks_the_two_best_in_descending_order() {
        let logits = [1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 5.0, 1.0];
        let out = route(&logits, 4, &[0.0; 4], &config(ScoreFunc::Softmax, 2));
        assert_eq!(out.experts, [1, 2, 2, 3]);
        let z0: f64 = [1.0f64, 3.0, 2.0, 0.0].iter().map(|v| v.exp()).sum();
        let z1: f64 = [0.0f64, 0.0, 5.0, 1.0].iter().map(|v| v.exp()).sum();
        let want = [
            3f64.exp() / z0,
            2f64.exp() / z0,
            5f64.exp() / z1,
            1f64.exp() / z1,
        ];
        assert_close(&out.weights, &want, 1e-14, "weights");
        assert_close(
            &out.scores[..4],
            &[1f64.exp() / z0, want[0], want[1], 1.0 / z0],
            1e-14,
            "scores",
        );
    }

    #[test]
    fn the_bias_changes_the_selection_but_not_the_weights() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let cfg = config(ScoreFunc::Sigmoid, 2);
        let plain = route(&logits, 4, &[0.0; 4], &cfg);
        assert_eq!(plain.experts, [0, 1]);
        assert_close(&plain.weights, &[sig(2.0), sig(1.0)], 1e-14, "unbiased");
        let biased = route(&logits, 4, &[0.0, 0.0, 2.0, 0.0], &cfg);
        assert_eq!(biased.experts, [2, 0]);
        assert_close(&biased.weights, &[0.5, sig(2.0)], 1e-14, "biased");
        assert_eq!(plain.scores, biased.scores);
    }

    /// Eight experts in four groups of two whose best groups differ by the group score:
    /// top-2 sums 1.0, 1.442, 1.312, 1.150; maxima 0.953, 0.731, 0.690, 0.881.
    const GROUP_LOGITS: [f64; 8] = [3.0, -3.0, 1.0, 0.9, 0.5, 0.8, -1.0, 2.0];

    #[test]
    fn top2sum_keeps_the_groups_with_the_best_two_scores() {
        let out = route(
            &GROUP_LOGITS,
            8,
            &[0.0; 8],
            &grouped(GroupScore::Top2Sum, 4, 2, 3),
        );
        assert_eq!(out.experts, [2, 3, 5]);
        assert_close(
            &out.weights,
            &[sig(1.0), sig(0.9), sig(0.8)],
            1e-14,
            "weights",
        );
        let greedy = route(&GROUP_LOGITS, 8, &[0.0; 8], &config(ScoreFunc::Sigmoid, 3));
        assert_eq!(greedy.experts, [0, 7, 2]);
    }

    #[test]
    fn max_keeps_the_groups_with_the_best_single_score() {
        let out = route(
            &GROUP_LOGITS,
            8,
            &[0.0; 8],
            &grouped(GroupScore::Max, 4, 2, 3),
        );
        assert_eq!(out.experts, [0, 7, 6]);
        assert_close(
            &out.weights,
            &[sig(3.0), sig(2.0), sig(-1.0)],
            1e-14,
            "weights",
        );
    }

    #[test]
    fn group_scores_use_the_biased_selection_scores() {
        // A bias of +1 on expert 1 lifts group 0's top-2 sum to 2.0 and keeps it.
        let mut bias = [0.0; 8];
        bias[1] = 1.0;
        let out = route(
            &GROUP_LOGITS,
            8,
            &bias,
            &grouped(GroupScore::Top2Sum, 4, 2, 3),
        );
        assert_eq!(out.experts, [1, 0, 2]);
        assert_close(
            &out.weights,
            &[sig(-3.0), sig(3.0), sig(1.0)],
            1e-14,
            "weights",
        );
    }

    #[test]
    fn normalized_weights_sum_to_the_scale() {
        let mut rng = Rng::new(3);
        let (n, d, e) = (9, 6, 8);
        let x = uniform(&mut rng, n * d, 1.0);
        let w = uniform(&mut rng, e * d, 1.0);
        let bias = uniform(&mut rng, e, 0.1);
        for score in [ScoreFunc::Sigmoid, ScoreFunc::Softmax] {
            for select in [Selection::Greedy, Selection::GroupLimited] {
                let cfg = RouterConfig {
                    score,
                    select,
                    groups: 4,
                    groups_kept: 2,
                    normalize: true,
                    scale: 2.5,
                    ..config(score, 3)
                };
                let out = router_fwd(&x, n, d, &w, e, &bias, &cfg);
                for row in out.weights.chunks(3) {
                    let sum: f64 = row.iter().sum();
                    assert!((sum - 2.5).abs() < 1e-12, "{score:?} {select:?}: {sum}");
                }
                // Slots are in descending order of selection score.
                for (t, row) in out.experts.chunks(3).enumerate() {
                    let sel =
                        |j: usize| out.scores[t * e + row[j] as usize] + bias[row[j] as usize];
                    assert!(sel(0) >= sel(1) && sel(1) >= sel(2), "{row:?}");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let out = route(&[0.0; 6], 6, &[0.0; 6], &config(ScoreFunc::Sigmoid, 3));
        assert_eq!(out.experts, [0, 1, 2]);
        let out = route(
            &[0.0, 1.0, 0.0, 1.0],
            4,
            &[0.0; 4],
            &config(ScoreFunc::Softmax, 3),
        );
        assert_eq!(out.experts, [1, 3, 0]);
        // Tied groups: the lower-index group is kept.
        let out = route(
            &[0.0; 6],
            6,
            &[0.0; 6],
            &grouped(GroupScore::Top2Sum, 3, 1, 2),
        );
        assert_eq!(out.experts, [0, 1]);
        let out = route(
            &[0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
            6,
            &[0.0; 6],
            &grouped(GroupScore::Max, 3, 2, 3),
        );
        assert_eq!(out.experts, [1, 2, 0]);
    }

    /// HF masks dropped groups with 0.0, not −inf: when every kept expert's selection score is
    /// negative, the masked experts (tied at 0.0, lowest index first) win the top-k, so the
    /// token is routed into the group that group-limited selection dropped. DeepSeek's
    /// reference code (−inf) would choose experts 0 and 1 here.
    #[test]
    fn masked_experts_score_zero_and_beat_negative_kept_ones() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let bias = [-1.0; 4];
        // Selection scores −0.119, −0.269, −0.5, −0.731: group 0 wins (−0.388 vs −1.231).
        let out = route(&logits, 4, &bias, &grouped(GroupScore::Top2Sum, 2, 1, 2));
        assert_eq!(out.experts, [2, 3]);
        assert_close(&out.weights, &[0.5, sig(-1.0)], 1e-14, "weights");
        // With a positive selection score the kept group wins as expected.
        let out = route(
            &logits,
            4,
            &[0.0; 4],
            &grouped(GroupScore::Top2Sum, 2, 1, 2),
        );
        assert_eq!(out.experts, [0, 1]);
        // Only one kept expert is negative: it loses to the first masked expert.
        let out = route(
            &logits,
            4,
            &[0.0, -1.0, 0.0, 0.0],
            &grouped(GroupScore::Max, 2, 1, 2),
        );
        assert_eq!(out.experts, [0, 2]);
    }

    #[test]
    fn router_bwd_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let (n, d, e, k) = (5, 4, 8, 3);
        let x = uniform(&mut rng, n * d, 1.0);
        let w = uniform(&mut rng, e * d, 1.0);
        let bias = uniform(&mut rng, e, 0.2);
        let gw = uniform(&mut rng, n * k, 1.0);
        let gs = uniform(&mut rng, n * e, 1.0);
        let configs = [
            RouterConfig {
                normalize: true,
                scale: 2.5,
                ..grouped(GroupScore::Top2Sum, 4, 2, k)
            },
            config(ScoreFunc::Softmax, k),
            RouterConfig {
                normalize: true,
                ..config(ScoreFunc::Softmax, k)
            },
            config(ScoreFunc::Sigmoid, k),
        ];
        for cfg in &configs {
            let base = router_fwd(&x, n, d, &w, e, &bias, cfg);
            for d_scores in [None, Some(&gs[..])] {
                // The loss Σ gw·weights (+ Σ gs·scores); the selection must not move.
                let loss = |x: &[f64], w: &[f64]| {
                    let out = router_fwd(x, n, d, w, e, &bias, cfg);
                    assert_eq!(out.experts, base.experts, "the selection moved");
                    dot(&gw, &out.weights) + d_scores.map_or(0.0, |g| dot(g, &out.scores))
                };
                let (dx, dw) = router_bwd(&x, n, d, &w, e, &base, cfg, &gw, d_scores);
                let want_dx = numeric_grad(&x, |p| loss(p, &w));
                let want_dw = numeric_grad(&w, |p| loss(&x, p));
                assert_close(&dx, &want_dx, 1e-7, &format!("{cfg:?} dx"));
                assert_close(&dw, &want_dw, 1e-7, &format!("{cfg:?} dw"));
            }
        }
    }

    #[test]
    fn expert_load_counts_and_the_bias_moves_toward_balance() {
        let load = expert_load(&[0, 2, 2, 3, 0, 2], 5);
        assert_eq!(load, [2, 0, 3, 1, 0]);
        // The mean load is 1.2.
        let mut bias = vec![0.5f64; 5];
        update_balance_bias(&mut bias, &load, 0.01);
        assert_close(&bias, &[0.49, 0.51, 0.49, 0.51, 0.51], 1e-15, "bias");
        // Experts exactly at the mean (1) keep their bias.
        let mut bias = vec![0.0f32; 4];
        update_balance_bias(&mut bias, &[1, 1, 2, 0], 0.5);
        assert_eq!(bias, [0.0, 0.0, -0.5, 0.5]);
    }

    /// Experts' weights and inputs for the tests.
    struct Ffn {
        n: usize,
        d: usize,
        k: usize,
        e: usize,
        h: usize,
        x: Vec<f64>,
        weights: Vec<f64>,
        experts: Vec<u32>,
        w_gate: Option<Vec<f64>>,
        w_up: Vec<f64>,
        w_down: Vec<f64>,
    }

    impl Ffn {
        /// Routes token `t`'s slot `j` to `(t·(j + 1) + j) mod (e − 1)`, so expert `e − 1`
        /// never receives a token, and no token picks an expert twice when `k ≤ 2`.
        fn new(seed: u64, n: usize, d: usize, k: usize, e: usize, h: usize, gated: bool) -> Ffn {
            let mut rng = Rng::new(seed);
            let experts: Vec<u32> = (0..n * k)
                .map(|p| {
                    let (t, j) = (p / k, p % k);
                    ((t * (j + 1) + j) % (e - 1)) as u32
                })
                .collect();
            Ffn {
                n,
                d,
                k,
                e,
                h,
                x: uniform(&mut rng, n * d, 1.0),
                weights: uniform(&mut rng, n * k, 1.0),
                experts,
                w_gate: gated.then(|| uniform(&mut rng, e * h * d, 0.5)),
                w_up: uniform(&mut rng, e * h * d, 0.5),
                w_down: uniform(&mut rng, e * d * h, 0.5),
            }
        }

        fn act(&self) -> &'static dyn Activation<f64> {
            if self.w_gate.is_some() {
                &SwiGlu
            } else {
                &GeluTanh
            }
        }

        fn args(&self) -> ExpertFfn<'_, f64> {
            ExpertFfn {
                x: &self.x,
                n: self.n,
                d: self.d,
                weights: &self.weights,
                experts: &self.experts,
                k: self.k,
                w_gate: self.w_gate.as_deref(),
                w_up: &self.w_up,
                w_down: &self.w_down,
                e: self.e,
                h: self.h,
                act: self.act(),
            }
        }

        fn fwd(&self) -> (Vec<f64>, ExpertsSaved<f64>) {
            experts_fwd(&self.args())
        }

        fn bwd(&self, saved: &ExpertsSaved<f64>, dy: &[f64]) -> ExpertsGrads<f64> {
            experts_bwd(&self.args(), saved, dy)
        }

        /// Token by token, expert by expert, with plain loops.
        fn naive(&self) -> Vec<f64> {
            let (d, h, k) = (self.d, self.h, self.k);
            let act = self.act();
            let mut y = vec![0.0; self.n * d];
            for t in 0..self.n {
                let xt = &self.x[t * d..(t + 1) * d];
                for j in 0..k {
                    let ex = self.experts[t * k + j] as usize;
                    let proj =
                        |w: &[f64], i: usize| dot(&w[(ex * h + i) * d..(ex * h + i + 1) * d], xt);
                    let a: Vec<f64> = (0..h)
                        .map(|i| {
                            let g = self.w_gate.as_ref().map_or(0.0, |w| proj(w, i));
                            act.value(g, proj(&self.w_up, i))
                        })
                        .collect();
                    for c in 0..d {
                        let o = dot(&self.w_down[(ex * d + c) * h..(ex * d + c + 1) * h], &a);
                        y[t * d + c] += self.weights[t * k + j] * o;
                    }
                }
            }
            y
        }
    }

    #[test]
    fn experts_fwd_matches_the_naive_reference() {
        for gated in [true, false] {
            for k in [1, 2] {
                let ffn = Ffn::new(5, 7, 5, k, 4, 6, gated);
                let (y, saved) = ffn.fwd();
                assert_eq!(saved.offsets[4] - saved.offsets[3], 0, "expert 3 is idle");
                assert_close(&y, &ffn.naive(), 1e-13, &format!("gated {gated} k {k}"));
            }
        }
    }

    #[test]
    fn experts_fwd_in_f32_agrees_with_f64() {
        let ffn = Ffn::new(8, 6, 4, 2, 4, 5, true);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (x, weights, w_up, w_down) = (f(&ffn.x), f(&ffn.weights), f(&ffn.w_up), f(&ffn.w_down));
        let w_gate = f(ffn.w_gate.as_ref().unwrap());
        let (y, _) = experts_fwd(&ExpertFfn {
            x: &x,
            n: ffn.n,
            d: ffn.d,
            weights: &weights,
            experts: &ffn.experts,
            k: ffn.k,
            w_gate: Some(&w_gate),
            w_up: &w_up,
            w_down: &w_down,
            e: ffn.e,
            h: ffn.h,
            act: &SwiGlu,
        });
        let y: Vec<f64> = y.iter().map(|&a| a as f64).collect();
        assert_close(&y, &ffn.naive(), 1e-5, "f32");
    }

    #[test]
    fn experts_bwd_matches_finite_differences() {
        for gated in [true, false] {
            for k in [1, 2] {
                let ffn = Ffn::new(21, 5, 4, k, 4, 3, gated);
                let mut rng = Rng::new(99);
                let dy = uniform(&mut rng, ffn.n * ffn.d, 1.0);
                let (_, saved) = ffn.fwd();
                let grads = ffn.bwd(&saved, &dy);
                let what = |name: &str| format!("gated {gated} k {k} {name}");
                // The loss Σ dy·y as a function of one perturbed input.
                let check = |got: &[f64], field: fn(&mut Ffn) -> &mut Vec<f64>, name: &str| {
                    let mut probe = Ffn::new(21, 5, 4, k, 4, 3, gated);
                    let p = field(&mut probe).clone();
                    let want = numeric_grad(&p, |v| {
                        let mut q = Ffn::new(21, 5, 4, k, 4, 3, gated);
                        *field(&mut q) = v.to_vec();
                        dot(&dy, &q.fwd().0)
                    });
                    assert_close(got, &want, 1e-7, &what(name));
                };
                check(&grads.dx, |f| &mut f.x, "dx");
                check(&grads.d_weights, |f| &mut f.weights, "d_weights");
                check(&grads.dw_up, |f| &mut f.w_up, "dw_up");
                check(&grads.dw_down, |f| &mut f.w_down, "dw_down");
                match &grads.dw_gate {
                    Some(g) => check(g, |f| f.w_gate.as_mut().unwrap(), "dw_gate"),
                    None => assert!(!gated),
                }
                // The idle expert's gradients are zero.
                let hd = ffn.h * ffn.d;
                assert!(grads.dw_up[3 * hd..].iter().all(|&v| v == 0.0));
                assert!(grads.dw_down[3 * hd..].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn experts_results_do_not_depend_on_the_thread_count() {
        // Large enough that the sorted rows are split into one part per thread, with parts
        // that cut experts in two.
        let ffn = Ffn::new(4, 200, 32, 2, 8, 48, true);
        let dy = uniform(&mut Rng::new(5), ffn.n * ffn.d, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert_eq!(row_parts(ffn.n * ffn.k, 3 * ffn.h * ffn.d), threads);
                let (y, saved) = ffn.fwd();
                (y, ffn.bwd(&saved, &dy))
            })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(4));
        assert_close(&one.0, &ffn.naive(), 1e-12, "split forward");
    }

    #[test]
    fn empty_shapes_give_empty_or_zero_results() {
        let cfg = config(ScoreFunc::Softmax, 0);
        let out = router_fwd(&[1.0, 2.0], 1, 2, &[1.0, 0.0, 0.0, 1.0], 2, &[0.0; 2], &cfg);
        assert!(out.weights.is_empty() && out.experts.is_empty());
        assert_close(
            &out.scores,
            &[1.0 / (1.0 + 1f64.exp()), 1.0 / (1.0 + (-1f64).exp())],
            1e-15,
            "scores",
        );
        let out = router_fwd::<f64>(
            &[],
            0,
            2,
            &[0.0; 4],
            2,
            &[0.0; 2],
            &config(ScoreFunc::Sigmoid, 1),
        );
        assert!(out.scores.is_empty());
        let (dx, dw) = router_bwd::<f64>(
            &[],
            0,
            2,
            &[0.0; 4],
            2,
            &out,
            &config(ScoreFunc::Sigmoid, 1),
            &[],
            None,
        );
        assert!(dx.is_empty() && dw == [0.0; 4]);
        // No hidden units: the experts output zeros.
        let no_hidden = ExpertFfn {
            x: &[1.0, 2.0],
            n: 1,
            d: 2,
            weights: &[1.0],
            experts: &[0],
            k: 1,
            w_gate: None,
            w_up: &[],
            w_down: &[],
            e: 1,
            h: 0,
            act: &GeluTanh,
        };
        let (y, saved) = experts_fwd(&no_hidden);
        assert_eq!(y, [0.0, 0.0]);
        let g = experts_bwd(&no_hidden, &saved, &[1.0, 1.0]);
        assert_eq!((g.dx, g.d_weights), (vec![0.0, 0.0], vec![0.0]));
        // No tokens.
        let (y, saved) = experts_fwd::<f64>(&ExpertFfn {
            x: &[],
            n: 0,
            d: 2,
            weights: &[],
            experts: &[],
            k: 1,
            w_gate: None,
            w_up: &[0.0; 4],
            w_down: &[0.0; 4],
            e: 2,
            h: 1,
            act: &GeluTanh,
        });
        assert!(y.is_empty() && saved.order.is_empty());
        assert_eq!(balance_loss_fwd::<f64>(&[], &[], 2, 0, 3, 1, 0.1), 0.0);
        assert!(balance_loss_bwd::<f64>(&[], &[], 0, 4, 3, 1, 0.1, 1.0).is_empty());
    }

    #[test]
    fn balance_loss_on_a_hand_example() {
        // Sequence 0: unnormalized sigmoid-like scores that normalize to [0.75, 0.25] and
        // [0.5, 0.5], both tokens routed to expert 0: f = [2, 0], P₀ = 0.625, Σ fP = 1.25.
        // Sequence 1: uniform scores, one token per expert: f = [1, 1], P = [0.5, 0.5], Σ = 1.
        let scores = [0.6, 0.2, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5];
        let experts = [0, 0, 0, 1];
        let loss: f64 = balance_loss_fwd(&scores, &experts, 2, 2, 2, 1, 0.1);
        assert!((loss - 0.1 * 1.125).abs() < 1e-15, "{loss}");
        let one: f64 = balance_loss_fwd(&scores[..4], &experts[..2], 1, 2, 2, 1, 0.1);
        assert!((one - 0.125).abs() < 1e-15, "{one}");
    }

    #[test]
    fn balance_loss_bwd_matches_finite_differences() {
        let (b, t, e, k) = (2, 3, 4, 2);
        let mut rng = Rng::new(17);
        let scores: Vec<f64> = uniform(&mut rng, b * t * e, 2.0)
            .into_iter()
            .map(sig)
            .collect();
        let experts: Vec<u32> = (0..b * t * k)
            .map(|p| ((p * 3 + p / 5) % e) as u32)
            .collect();
        let dloss = 1.7;
        let got = balance_loss_bwd(&scores, &experts, b, t, e, k, 0.3, dloss);
        let want = numeric_grad(&scores, |s| {
            dloss * balance_loss_fwd(s, &experts, b, t, e, k, 0.3)
        });
        assert_close(&got, &want, 1e-8, "d_scores");
    }

    #[test]
    fn swiglu_and_gelu_derivatives_match_finite_differences() {
        for &(g, u) in &[(0.3, -1.2), (-2.0, 0.7), (1.5, 2.0)] {
            let (dg, du) = Activation::<f64>::grad(&SwiGlu, g, u);
            let want = numeric_grad(&[g, u], |p| SwiGlu.value(p[0], p[1]));
            assert_close(&[dg, du], &want, 1e-8, "swiglu");
            let (_, dx) = Activation::<f64>::grad(&GeluTanh, 0.0, g);
            let want = numeric_grad(&[g], |p| GeluTanh.value(0.0, p[0]));
            assert_close(&[dx], &want, 1e-8, "gelu");
        }
    }
}
