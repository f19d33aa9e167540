//! The device arena: the plan's intermediate buffers packed into one allocation by their
//! lifetimes, as the compiler's memory plan (`kiln_ir::plan`) packs a graph's values.
//!
//! A buffer lives from the first step of the plan that names it to the last (both included:
//! a step reads its inputs while it writes its outputs, so a buffer whose last step is
//! another's first may not share its memory). Buffers are placed in order of their first
//! step at the lowest-waste gap among the buffers alive then (best fit), each at a multiple
//! of [`ALIGN`] bytes, so that every GEMM operand is as aligned as cuBLASLt's heuristics
//! assume by default.

use std::collections::BTreeMap;

/// The alignment of every buffer in the arena, in bytes (cuBLASLt's default assumption).
pub const ALIGN: u64 = 256;

/// One buffer to place: the steps it lives in, `first ..= last`, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub first: usize,
    pub last: usize,
    pub bytes: u64,
}

/// Where each buffer lives, and the arena's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arena {
    /// Byte offset of each buffer, in the order given.
    pub offsets: Vec<u64>,
    /// The arena's size: the peak of the buffers alive at once, with alignment.
    pub bytes: u64,
    /// What one allocation per buffer would take (with the same alignment).
    pub unshared: u64,
}

/// Packs `buffers` into one arena.
pub fn pack(buffers: &[Lifetime]) -> Arena {
    let size = |b: &Lifetime| b.bytes.max(1).div_ceil(ALIGN) * ALIGN;
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&i| (buffers[i].first, i));
    let mut offsets = vec![0u64; buffers.len()];
    // Live buffers: offset → (size, last step).
    let mut live: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    let (mut bytes, mut unshared) = (0u64, 0u64);
    for i in order {
        let b = &buffers[i];
        let want = size(b);
        unshared += want;
        live.retain(|_, &mut (_, last)| last >= b.first);
        // The smallest gap that holds it; past the last live buffer if none does.
        let mut best: Option<(u64, u64)> = None; // (gap, offset)
        let mut cursor = 0u64;
        for (&off, &(sz, _)) in &live {
            if off >= cursor + want {
                let gap = off - cursor;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(off + sz);
        }
        let at = best.map_or(cursor, |(_, o)| o);
        live.insert(at, (want, b.last));
        offsets[i] = at;
        bytes = bytes.max(at + want);
    }
    Arena {
        offsets,
        bytes,
        unshared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of buffers alive in a common step occupies disjoint bytes.
    fn assert_disjoint(buffers: &[Lifetime], arena: &Arena) {
        for (i, a) in buffers.iter().enumerate() {
            let (ao, ae) = (arena.offsets[i], arena.offsets[i] + a.bytes);
            assert_eq!(ao % ALIGN, 0);
            assert!(ae <= arena.bytes);
            for (j, b) in buffers.iter().enumerate().skip(i + 1) {
                let overlap_in_time = a.first <= b.last && b.first <= a.last;
                let (bo, be) = (arena.offsets[j], arena.offsets[j] + b.bytes);
                if overlap_in_time {
                    assert!(
                        ae <= bo || be <= ao,
                        "{i} {a:?} at {ao} and {j} {b:?} at {bo}"
                    );
                }
            }
        }
    }

    #[test]
    fn buffers_alive_together_never_share_bytes_and_dead_ones_are_reused() {
        let mut rng = crate::data::Rng::new(5);
        let buffers: Vec<Lifetime> = (0..300)
            .map(|_| {
                let first = (rng.next_f64() * 100.0) as usize;
                let len = (rng.next_f64() * 12.0) as usize;
                Lifetime {
                    first,
                    last: first + len,
                    bytes: 4 * (1 + (rng.next_f64() * 5000.0) as u64),
                }
            })
            .collect();
        let arena = pack(&buffers);
        assert_disjoint(&buffers, &arena);
        assert!(
            arena.bytes * 3 < arena.unshared,
            "{} of {}",
            arena.bytes,
            arena.unshared
        );
    }

    #[test]
    fn a_step_that_reads_one_buffer_last_and_writes_another_keeps_them_apart() {
        let buffers = [
            Lifetime {
                first: 0,
                last: 1,
                bytes: 1024,
            },
            Lifetime {
                first: 1,
                last: 2,
                bytes: 1024,
            },
            Lifetime {
                first: 2,
                last: 3,
                bytes: 1024,
            },
        ];
        let arena = pack(&buffers);
        assert_disjoint(&buffers, &arena);
        // The third reuses the first's bytes: it starts after the first's last step.
        assert_eq!(arena.offsets[2], arena.offsets[0]);
        assert_eq!(arena.bytes, 2048);
    }
}
