//! Expert parallelism: the routed experts of every MoE layer sharded over the ranks of an
//! expert-parallel group, with each routed row sent to its expert's owner and back.
//!
//! Rank `r` of a group of `ep` owns experts `r·E/ep .. (r+1)·E/ep` of each layer (`ep`
//! divides `E`, which the layout checks) and holds only their weights. One `experts` node
//! then runs as four steps:
//!
//! 1. **Dispatch.** The source sorts its (token, slot) pairs by expert, which groups them by
//!    owner, and sends each owner the token rows of its pairs (an all-to-all of rows, after
//!    one of per-expert counts, so the owner knows which of its experts each row is for).
//! 2. **Experts.** The owner runs its experts over the rows it received, in source-rank order
//!    and, within a source, in pair order: the global token order.
//! 3. **Combine.** The owner sends each output row back; the source sums its tokens' outputs
//!    with the routing weights in slot order, exactly as the single-process op does.
//! 4. **Backward**, the same exchange: the source sends `dy` and the routing weight of each
//!    row, the owner returns the rows' input gradients and routing weights' gradients, and
//!    accumulates its experts' weight gradients over every source. The owner computes
//!    exactly what the single-process op computes for those rows.
//!
//! The exchanges are f32 (the CPU's format). The row exchanges move `d` values per row, so a
//! row that leaves its rank costs `4 · 4d` bytes a step, the analyzer's `ep_dispatch +
//! ep_combine` per routed copy in f32 ([`crate::mpi::Traffic::exchange_bytes`]). The per-row
//! routing weights and their gradients (4 bytes each way) and the per-expert counts travel
//! in small exchanges of their own, counted apart. Rows routed to the source's own experts
//! stay on the rank.

use std::cell::Cell;

use kiln_ir::ir::{Graph, Op, ParamId};

use crate::cpu::moe::{self, ExpertFfn, ExpertsGrads, ExpertsSaved};
use crate::cpu::Real;
use crate::mpi::Payload;
use crate::numerics::gemm::GemmNumerics;
use crate::train::Collectives;

/// The expert all-to-all of a group of ranks (MPI's `MPI_Alltoallv` in a run).
pub trait Exchange: Collectives {
    /// Sends `send[i·c .. (i+1)·c]` to rank `i` (`c = send.len() / ranks`) and returns what
    /// each rank sent this one, in rank order.
    fn counts(&self, send: &[u64]) -> Result<Vec<u64>, String>;
    /// Sends consecutive parts of `send`, `send_counts[i]` values to rank `i`, and returns the
    /// `recv_counts[i]` values each rank `i` sent this one, laid end to end in rank order.
    fn rows(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, String>;
    /// [`Exchange::rows`] for values that go with the rows (one per row), counted apart.
    fn small(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, String>;
}

impl Exchange for crate::mpi::Mpi {
    fn counts(&self, send: &[u64]) -> Result<Vec<u64>, String> {
        self.all_to_all_counts(send).map_err(|e| e.to_string())
    }

    fn rows(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, String> {
        self.all_to_all_f32(send, send_counts, recv_counts, Payload::Rows)
            .map_err(|e| e.to_string())
    }

    fn small(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<f32>, String> {
        self.all_to_all_f32(send, send_counts, recv_counts, Payload::Small)
            .map_err(|e| e.to_string())
    }
}

/// The parameters the routed experts' weights are (the gate, up and down operands of every
/// `experts` node): the tensors expert parallelism shards, in parameter order.
pub fn expert_params(graph: &Graph) -> Vec<ParamId> {
    let mut params: Vec<ParamId> = graph
        .nodes
        .iter()
        .filter_map(|(_, node)| match node.op {
            Op::Experts { gated, .. } => Some((node, if gated { 3..6 } else { 3..5 })),
            _ => None,
        })
        .flat_map(|(node, weights)| node.inputs[weights].iter().copied())
        .filter_map(|v| match graph.values[v].def {
            kiln_ir::ir::Def::Param(p) => Some(p),
            _ => None,
        })
        .collect();
    params.sort_by_key(|p| p.index());
    params.dedup();
    params
}

/// One rank's place in an expert-parallel group, which the interpreter's `experts` nodes use
/// to reach the other ranks' experts ([`crate::exec::Executor::run_experts`]).
pub struct ExpertParallel<'a> {
    group: &'a dyn Exchange,
    /// Routed rows this rank's forward exchanges moved to or from other ranks.
    moved: Cell<u64>,
}

/// What a sharded `experts` node keeps for its backward pass, besides the owner's
/// [`ExpertsSaved`] of the rows it received.
pub struct Routed<T> {
    /// `[n·k]`: the pairs `t·k + j` in the order they were sent (by expert, then pair).
    order: Vec<usize>,
    /// `[n·k]`: each pair's place in `order`.
    row_of: Vec<usize>,
    /// Rows sent to each rank, and received from each rank.
    sent: Vec<usize>,
    received: Vec<usize>,
    /// `[received, d]`: the rows this rank's experts ran on.
    x: Vec<T>,
    /// `[received]`: which of this rank's experts each received row went to.
    local: Vec<u32>,
}

/// What [`ExpertParallel::forward`] returns.
pub struct Forward<T> {
    /// `[n, d]`: the op's output.
    pub y: Vec<T>,
    /// What the backward pass needs of the exchange.
    pub routed: Routed<T>,
    /// The owner's state for its experts' backward pass.
    pub saved: ExpertsSaved<T>,
}

fn to_f32<T: Real>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f64() as f32).collect()
}

fn from_f32<T: Real>(x: Vec<f32>) -> Vec<T> {
    x.into_iter().map(|v| T::from_f64(f64::from(v))).collect()
}

impl<'a> ExpertParallel<'a> {
    pub fn new(group: &'a dyn Exchange) -> Self {
        ExpertParallel {
            group,
            moved: Cell::new(0),
        }
    }

    pub fn ranks(&self) -> usize {
        self.group.ranks()
    }

    /// The routed rows this rank's forward exchanges sent to and received from other ranks
    /// since the last call (each also crosses back in the backward pass).
    pub fn take_moved(&self) -> u64 {
        self.moved.replace(0)
    }

    fn fail(what: &str) -> impl Fn(String) -> String + '_ {
        move |e| format!("expert-parallel {what}: {e}")
    }

    /// The routed experts' forward pass, sharded: `ffn` is the single-process operands with
    /// `e` the whole layer's experts and `w_gate`, `w_up`, `w_down` this rank's blocks.
    pub fn forward<T: Real>(
        &self,
        ffn: &ExpertFfn<'_, T>,
        num: &GemmNumerics,
    ) -> Result<Forward<T>, String> {
        let (n, d, k, e) = (ffn.n, ffn.d, ffn.k, ffn.e);
        let ranks = self.ranks();
        let per = e / ranks;
        // Pairs by expert: expert `i`'s owner is `i / per`, so this groups them by owner.
        let (order, row_of, offsets) = moe::sort_by_expert(ffn.experts, e);
        let per_expert: Vec<u64> = offsets.windows(2).map(|w| (w[1] - w[0]) as u64).collect();
        let sent: Vec<usize> = (0..ranks)
            .map(|r| offsets[(r + 1) * per] - offsets[r * per])
            .collect();
        // Each owner learns how many rows each source sends each of its experts.
        let counts = self
            .group
            .counts(&per_expert)
            .map_err(Self::fail("dispatch counts"))?;
        let received: Vec<usize> = counts
            .chunks(per)
            .map(|c| c.iter().sum::<u64>() as usize)
            .collect();
        let local: Vec<u32> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n((i % per) as u32, c as usize))
            .collect();

        let rows = to_f32(&moe::gather_sorted(ffn.x, &order, k, d));
        let x: Vec<T> = from_f32(
            self.group
                .rows(&rows, &scaled(&sent, d), &scaled(&received, d))
                .map_err(Self::fail("dispatch"))?,
        );
        let m = local.len();
        let ones = vec![T::ONE; m];
        let owner = ExpertFfn {
            x: &x,
            n: m,
            d,
            weights: &ones,
            experts: &local,
            k: 1,
            e: per,
            ..*ffn
        };
        // With one slot of weight 1, each output row is the expert's output exactly.
        let (y_local, saved) = moe::experts_fwd_with(&owner, num);
        let out: Vec<T> = from_f32(
            self.group
                .rows(&to_f32(&y_local), &scaled(&received, d), &scaled(&sent, d))
                .map_err(Self::fail("combine"))?,
        );
        let me = self.group.rank();
        let off_rank = |c: &[usize]| -> u64 {
            c.iter()
                .enumerate()
                .filter(|&(r, _)| r != me)
                .map(|(_, &c)| c as u64)
                .sum()
        };
        self.moved
            .set(self.moved.get() + off_rank(&sent) + off_rank(&received));

        let y = moe::combine_slots(&out, &row_of, Some(ffn.weights), n, k, d);
        let routed = Routed {
            order,
            row_of,
            sent,
            received,
            x,
            local,
        };
        Ok(Forward { y, routed, saved })
    }

    /// The backward pass of [`ExpertParallel::forward`], given `dy: [n, d]`: the gradients of
    /// `x` and the routing weights, and of this rank's experts' weights (its blocks only).
    pub fn backward<T: Real>(
        &self,
        ffn: &ExpertFfn<'_, T>,
        routed: &Routed<T>,
        saved: &ExpertsSaved<T>,
        dy: &[T],
        num: &GemmNumerics,
    ) -> Result<ExpertsGrads<T>, String> {
        let (n, d, k) = (ffn.n, ffn.d, ffn.k);
        let per = ffn.e / self.ranks();
        let (sent, received) = (&routed.sent, &routed.received);
        let rows = to_f32(&moe::gather_sorted(dy, &routed.order, k, d));
        let dy_local: Vec<T> = from_f32(
            self.group
                .rows(&rows, &scaled(sent, d), &scaled(received, d))
                .map_err(Self::fail("backward dispatch"))?,
        );
        let weights: Vec<f32> = routed
            .order
            .iter()
            .map(|&p| ffn.weights[p].to_f64() as f32)
            .collect();
        let w_local: Vec<T> = from_f32(
            self.group
                .small(&weights, sent, received)
                .map_err(Self::fail("backward routing weights"))?,
        );
        let m = routed.local.len();
        let owner = ExpertFfn {
            x: &routed.x,
            n: m,
            d,
            weights: &w_local,
            experts: &routed.local,
            k: 1,
            e: per,
            ..*ffn
        };
        let g = moe::experts_bwd_with(&owner, saved, &dy_local, num);
        let d_sent: Vec<T> = from_f32(
            self.group
                .small(&to_f32(&g.d_weights), received, sent)
                .map_err(Self::fail("backward routing weights' gradients"))?,
        );
        let d_weights = routed.row_of.iter().map(|&r| d_sent[r]).collect();
        let dx_rows: Vec<T> = from_f32(
            self.group
                .rows(
                    &to_f32(&g.dx),
                    &scaled(&routed.received, d),
                    &scaled(&routed.sent, d),
                )
                .map_err(Self::fail("backward combine"))?,
        );
        let dx = moe::combine_slots(&dx_rows, &routed.row_of, None, n, k, d);
        Ok(ExpertsGrads {
            dx,
            d_weights,
            dw_gate: g.dw_gate,
            dw_up: g.dw_up,
            dw_down: g.dw_down,
        })
    }
}

/// Row counts as value counts, `width` values a row.
fn scaled(rows: &[usize], width: usize) -> Vec<usize> {
    rows.iter().map(|&r| r * width).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;
    use crate::cpu::moe::SwiGlu;
    use crate::data::Rng;
    use crate::mpi::Traffic;

    /// An exchange between threads of one process, standing in for MPI: each rank posts its
    /// parts on a shared board, and after a barrier reads those addressed to it.
    struct Threads {
        rank: usize,
        ranks: usize,
        barrier: Arc<Barrier>,
        /// `[from · ranks + to]`: the values in flight.
        board: Arc<Mutex<Vec<Vec<f32>>>>,
    }

    impl Threads {
        fn group(ranks: usize) -> Vec<Threads> {
            let barrier = Arc::new(Barrier::new(ranks));
            let board = Arc::new(Mutex::new(vec![Vec::new(); ranks * ranks]));
            (0..ranks)
                .map(|rank| Threads {
                    rank,
                    ranks,
                    barrier: Arc::clone(&barrier),
                    board: Arc::clone(&board),
                })
                .collect()
        }

        fn swap(&self, parts: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
            {
                let mut b = self.board.lock().unwrap();
                for (to, part) in parts.into_iter().enumerate() {
                    b[self.rank * self.ranks + to] = part;
                }
            }
            self.barrier.wait();
            let got = {
                let mut b = self.board.lock().unwrap();
                (0..self.ranks)
                    .map(|from| std::mem::take(&mut b[from * self.ranks + self.rank]))
                    .collect()
            };
            self.barrier.wait();
            got
        }
    }

    impl Collectives for Threads {
        fn ranks(&self) -> usize {
            self.ranks
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn sum_f32(&self, _: &mut [f32]) -> Result<(), String> {
            unreachable!("only the expert exchange is tested")
        }
        fn reduce_scatter_f32(&self, _: &[f32]) -> Result<Vec<f32>, String> {
            unreachable!("only the expert exchange is tested")
        }
        fn all_gather_f32(&self, _: &[f32], _: &mut [f32]) -> Result<(), String> {
            unreachable!("only the expert exchange is tested")
        }
        fn sum_f64(&self, _: &mut [f64]) -> Result<(), String> {
            unreachable!("only the expert exchange is tested")
        }
        fn traffic(&self) -> Traffic {
            Traffic::default()
        }
    }

    impl Exchange for Threads {
        fn counts(&self, send: &[u64]) -> Result<Vec<u64>, String> {
            let each = send.len() / self.ranks;
            let parts = send
                .chunks(each)
                .map(|c| c.iter().map(|&x| x as f32).collect())
                .collect();
            Ok(self
                .swap(parts)
                .concat()
                .into_iter()
                .map(|x| x as u64)
                .collect())
        }

        fn rows(&self, send: &[f32], counts: &[usize], recv: &[usize]) -> Result<Vec<f32>, String> {
            let mut parts = Vec::new();
            let mut at = 0;
            for &c in counts {
                parts.push(send[at..at + c].to_vec());
                at += c;
            }
            let got = self.swap(parts);
            assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), recv);
            Ok(got.concat())
        }

        fn small(
            &self,
            send: &[f32],
            counts: &[usize],
            recv: &[usize],
        ) -> Result<Vec<f32>, String> {
            self.rows(send, counts, recv)
        }
    }

    fn uniform(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    }

    /// Sharded over 1, 2 and 4 ranks (threads), each taking an equal share of the tokens, the
    /// experts op gives the single-process op's outputs and gradients bit for bit, and each
    /// rank's weight gradients are its experts' blocks of the single-process ones.
    #[test]
    fn sharded_experts_equal_the_single_process_op() {
        let (n, d, k, e, h) = (24, 8, 2, 4, 6);
        let mut rng = Rng::new(3);
        let x = uniform(&mut rng, n * d);
        let weights = uniform(&mut rng, n * k);
        let dy = uniform(&mut rng, n * d);
        // Two distinct experts per token, skewed towards expert 0.
        let experts: Vec<u32> = (0..n)
            .flat_map(|t| {
                let a = (t * t % 7 % e) as u32;
                [a, (a + 1 + (t % 3) as u32) % e as u32]
            })
            .collect();
        let (w_gate, w_up, w_down) = (
            uniform(&mut rng, e * h * d),
            uniform(&mut rng, e * h * d),
            uniform(&mut rng, e * d * h),
        );
        let ffn = ExpertFfn {
            x: &x,
            n,
            d,
            weights: &weights,
            experts: &experts,
            k,
            w_gate: Some(&w_gate),
            w_up: &w_up,
            w_down: &w_down,
            e,
            h,
            act: &SwiGlu,
        };
        let num = GemmNumerics::Exact;
        let (y, saved) = moe::experts_fwd_with(&ffn, &num);
        let want = moe::experts_bwd_with(&ffn, &saved, &dy, &num);

        for ranks in [1, 2, 4] {
            let rows = n / ranks;
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = Threads::group(ranks)
                    .into_iter()
                    .map(|group| {
                        let (x, weights, experts, dy) = (&x, &weights, &experts, &dy);
                        let (w_gate, w_up, w_down) = (&w_gate, &w_up, &w_down);
                        s.spawn(move || {
                            let r = group.rank;
                            let ep = ExpertParallel::new(&group);
                            let block =
                                |w: &[f32]| w[crate::mpi::chunk(w.len(), r, ranks)].to_vec();
                            let (gate, up, down) = (block(w_gate), block(w_up), block(w_down));
                            let tokens = r * rows..(r + 1) * rows;
                            let pairs = tokens.start * k..tokens.end * k;
                            let mine = ExpertFfn {
                                x: &x[tokens.start * d..tokens.end * d],
                                n: rows,
                                weights: &weights[pairs.clone()],
                                experts: &experts[pairs],
                                w_gate: Some(&gate),
                                w_up: &up,
                                w_down: &down,
                                ..ffn
                            };
                            let f = ep.forward(&mine, &num).unwrap();
                            let dy = &dy[tokens.start * d..tokens.end * d];
                            let g = ep.backward(&mine, &f.routed, &f.saved, dy, &num).unwrap();
                            (f.y, g, ep.take_moved())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            type Rank = (Vec<f32>, ExpertsGrads<f32>, u64);
            let cat =
                |f: &dyn Fn(&Rank) -> Vec<f32>| results.iter().flat_map(f).collect::<Vec<f32>>();
            assert_eq!(cat(&|r| r.0.clone()), y, "y over {ranks} ranks");
            assert_eq!(cat(&|r| r.1.dx.clone()), want.dx, "dx over {ranks} ranks");
            assert_eq!(
                cat(&|r| r.1.d_weights.clone()),
                want.d_weights,
                "d_weights over {ranks} ranks"
            );
            // The blocks, rank by rank, are the whole weight gradients.
            assert_eq!(
                cat(&|r| r.1.dw_up.clone()),
                want.dw_up,
                "dw_up over {ranks}"
            );
            assert_eq!(cat(&|r| r.1.dw_down.clone()), want.dw_down);
            assert_eq!(
                cat(&|r| r.1.dw_gate.clone().unwrap()),
                want.dw_gate.clone().unwrap()
            );
            // Every routed row whose expert lives elsewhere left its rank and came back.
            let per = e / ranks;
            let away = (0..n * k)
                .filter(|&p| experts[p] as usize / per != p / k / rows)
                .count() as u64;
            let moved: u64 = results.iter().map(|r| r.2).sum();
            assert_eq!(moved, 2 * away, "over {ranks} ranks");
        }
    }
}
