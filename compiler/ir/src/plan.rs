//! The memory plan: where every intermediate tensor of a graph lives in one arena.
//!
//! Each value that a node produces lives from its node to its last reader (or to the end, for
//! values the caller keeps). Values are placed in execution order at the lowest offset whose
//! gap holds them among the values alive at that moment (best fit), so buffers whose
//! lifetimes do not overlap share memory. The arena's size is the planned peak, which
//! `kiln emit ir --after plan` and `kiln bench` report beside the analyzer's estimate.
//! Parameters and graph inputs live outside the arena.

use std::collections::BTreeMap;

use crate::ir::{DType, Graph, ValueId};

/// Where each node-produced value lives, and the arena's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Byte offset of each value in the arena (`None` for inputs and parameters).
    pub offsets: Vec<Option<u64>>,
    /// Bytes of each value.
    pub sizes: Vec<u64>,
    /// `[first node, last node]` during which each value is alive.
    pub lifetimes: Vec<Option<(usize, usize)>>,
    /// The arena's size: the planned peak of intermediate tensors.
    pub peak_bytes: u64,
    /// The sum of all intermediate tensors' sizes: what a plan without reuse would need.
    pub total_bytes: u64,
}

fn bytes(g: &Graph, v: ValueId) -> u64 {
    let ty = &g.values[v].ty;
    let per = match ty.dtype {
        DType::F32 | DType::U32 => 4,
    };
    (ty.elements() as u64).saturating_mul(per)
}

/// Plans the arena for `g`, keeping `keep` alive to the end.
pub fn plan(g: &Graph, keep: &[ValueId]) -> Plan {
    let n_values = g.values.len();
    let n_nodes = g.nodes.len();
    let mut lifetimes: Vec<Option<(usize, usize)>> = vec![None; n_values];
    for (id, node) in g.nodes.iter() {
        for &o in &node.outputs {
            lifetimes[o.index()] = Some((id.index(), id.index()));
        }
        for &i in &node.inputs {
            if let Some((_, last)) = lifetimes[i.index()].as_mut() {
                *last = (*last).max(id.index());
            }
        }
    }
    for &v in keep {
        if let Some((_, last)) = lifetimes[v.index()].as_mut() {
            *last = n_nodes;
        }
    }
    let sizes: Vec<u64> = g.values.iter().map(|(v, _)| bytes(g, v)).collect();
    let mut offsets: Vec<Option<u64>> = vec![None; n_values];
    // Live allocations: offset → (size, value), ordered by offset.
    let mut live: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    let mut peak = 0u64;
    let mut total = 0u64;
    for (id, node) in g.nodes.iter() {
        let now = id.index();
        // Free what died before this node.
        live.retain(|_, &mut (_, v)| lifetimes[v].is_some_and(|(_, last)| last >= now));
        for &o in &node.outputs {
            let (v, size) = (o.index(), sizes[o.index()]);
            total += size;
            // Best fit: the smallest gap between live allocations that holds `size`.
            let mut best: Option<(u64, u64)> = None; // (gap, offset)
            let mut cursor = 0u64;
            for (&off, &(sz, _)) in &live {
                if off >= cursor + size {
                    let gap = off - cursor;
                    if best.is_none_or(|(b, _)| gap < b) {
                        best = Some((gap, cursor));
                    }
                }
                cursor = cursor.max(off + sz);
            }
            let at = best.map_or(cursor, |(_, off)| off);
            offsets[v] = Some(at);
            live.insert(at, (size, v));
            peak = peak.max(at + size);
        }
    }
    Plan {
        offsets,
        sizes,
        lifetimes,
        peak_bytes: peak,
        total_bytes: total,
    }
}

impl Plan {
    /// Checks that no two values alive at the same time overlap in the arena.
    pub fn check(&self) -> Result<(), String> {
        let placed: Vec<(usize, u64, u64, usize, usize)> = self
            .offsets
            .iter()
            .enumerate()
            .filter_map(|(v, off)| {
                let (first, last) = self.lifetimes[v]?;
                Some((v, (*off)?, self.sizes[v], first, last))
            })
            .collect();
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[i + 1..] {
                let time = a.3 <= b.4 && b.3 <= a.4;
                let space = a.1 < b.1 + b.2 && b.1 < a.1 + a.2 && a.2 > 0 && b.2 > 0;
                if time && space {
                    return Err(format!(
                        "values %{} and %{} overlap in time and memory",
                        a.0, b.0
                    ));
                }
            }
        }
        Ok(())
    }
}
