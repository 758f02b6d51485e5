//! Placement constraints: co-location groups (union-find) and per-device memory.
//!
//! **Co-location.** [`CoLocation::build`] unions, with a union-find over node ids: nodes sharing
//! an (explicit or inferred) co-location group, nodes sharing a fusion group, every source node
//! (input, weight, KV cache) with all of its consumers (a weight lives where it is used), and the
//! extra groups of an optimisation plan. [`CoLocation::enforce`] then moves each group onto one
//! device — the one where the policy put most of the group's estimated work — whatever the policy
//! proposed.
//!
//! **Memory.** [`peak_memory`] sweeps tensor lifetimes in schedule order per device: weights and
//! KV caches are live for the whole run; an activation is live on its producer's device from its
//! production to its last consumer there (or to the end if it is a graph output), and on every
//! other device that consumes it from its production to its last consumer on that device.
//! [`fit_memory`] moves whole co-location groups off devices whose peak exceeds capacity onto the
//! device with the most headroom, and returns [`crate::Error::OutOfMemory`] with the numbers when
//! no move makes everything fit.

use crate::analysis::Analysis;
use crate::graph::{Consumers, Graph, NodeId, OpKind, Residency};
use crate::topology::DeviceId;
use std::collections::HashMap;

/// Disjoint sets over `0..n` with path halving and union by size.
#[derive(Clone, Debug)]
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    /// `n` singleton sets.
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    /// Representative of `x`'s set.
    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let gp = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = gp;
            x = gp;
        }
        x
    }

    /// Merges the sets of `a` and `b`.
    pub fn union(&mut self, a: u32, b: u32) {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        if self.size[ra as usize] < self.size[rb as usize] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb as usize] = ra;
        self.size[ra as usize] += self.size[rb as usize];
    }
}

/// Co-location groups: every node belongs to exactly one (most to a singleton).
#[derive(Clone, Debug, Default)]
pub struct CoLocation {
    group_of: Vec<u32>,
    offsets: Vec<u32>,
    members: Vec<NodeId>,
}

impl CoLocation {
    /// Builds the groups of `graph` from its effective annotations plus `extra` groups of nodes.
    pub fn build(
        graph: &Graph,
        analysis: &Analysis,
        consumers: &Consumers,
        extra: &[Vec<NodeId>],
    ) -> Self {
        let n = graph.len();
        let mut uf = UnionFind::new(n);
        let mut first: HashMap<&str, u32> = HashMap::new();
        for labels in [&analysis.colocation, &analysis.fusion] {
            first.clear();
            for (i, label) in labels.iter().enumerate() {
                if let Some(l) = label {
                    let rep = *first.entry(l.as_str()).or_insert(i as u32);
                    uf.union(rep, i as u32);
                }
            }
        }
        for node in graph.nodes() {
            if node.op.is_source() {
                for &c in consumers.of(node.id) {
                    uf.union(node.id.0, c.0);
                }
            }
        }
        for group in extra {
            if let Some((head, rest)) = group.split_first() {
                for m in rest {
                    if m.index() < n && head.index() < n {
                        uf.union(head.0, m.0);
                    }
                }
            }
        }
        // Dense group ids in order of first member.
        let mut dense = vec![u32::MAX; n];
        let mut group_of = vec![0u32; n];
        let mut count = 0u32;
        for i in 0..n as u32 {
            let r = uf.find(i) as usize;
            if dense[r] == u32::MAX {
                dense[r] = count;
                count += 1;
            }
            group_of[i as usize] = dense[r];
        }
        let mut offsets = vec![0u32; count as usize + 1];
        for &g in &group_of {
            offsets[g as usize + 1] += 1;
        }
        for i in 1..offsets.len() {
            offsets[i] += offsets[i - 1];
        }
        let mut fill = offsets.clone();
        let mut members = vec![NodeId(0); n];
        for (i, &g) in group_of.iter().enumerate() {
            members[fill[g as usize] as usize] = NodeId(i as u32);
            fill[g as usize] += 1;
        }
        Self {
            group_of,
            offsets,
            members,
        }
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Whether there are no groups.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The group of `node`.
    #[inline]
    pub fn group_of(&self, node: NodeId) -> u32 {
        self.group_of[node.index()]
    }

    /// Members of group `g`, ascending.
    pub fn members(&self, g: u32) -> &[NodeId] {
        let g = g as usize;
        match (self.offsets.get(g), self.offsets.get(g + 1)) {
            (Some(&a), Some(&b)) => &self.members[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Groups with more than one member.
    pub fn multi_member_groups(&self) -> impl Iterator<Item = &[NodeId]> {
        (0..self.len() as u32)
            .map(|g| self.members(g))
            .filter(|m| m.len() > 1)
    }

    /// Moves every group onto one device: the device (among `allowed`) carrying the largest share
    /// of the group's work under `placement`, `work(node, device)` giving that work.
    pub fn enforce(
        &self,
        placement: &mut [DeviceId],
        allowed: &[DeviceId],
        mut work: impl FnMut(NodeId, DeviceId) -> f64,
    ) {
        let Some(&fallback) = allowed.first() else {
            return;
        };
        let n_dev = allowed.iter().map(|d| d.index() + 1).max().unwrap_or(1);
        let mut ok = vec![false; n_dev];
        for d in allowed {
            ok[d.index()] = true;
        }
        let mut score = vec![0.0f64; n_dev];
        for g in 0..self.len() as u32 {
            let m = self.members(g);
            if m.len() == 1 {
                let d = &mut placement[m[0].index()];
                if !ok.get(d.index()).copied().unwrap_or(false) {
                    *d = fallback;
                }
                continue;
            }
            score.iter_mut().for_each(|s| *s = 0.0);
            for &v in m {
                let d = placement[v.index()];
                if ok.get(d.index()).copied().unwrap_or(false) {
                    // The epsilon lets groups of zero-cost nodes vote too.
                    score[d.index()] += work(v, d) + 1e-12;
                }
            }
            let mut best = fallback;
            for &d in allowed {
                if score[d.index()] > score[best.index()] {
                    best = d;
                }
            }
            for &v in m {
                placement[v.index()] = best;
            }
        }
    }

    /// Whether every group is on one device under `placement`.
    pub fn respected_by(&self, placement: &[DeviceId]) -> bool {
        self.multi_member_groups().all(|m| {
            let d = placement[m[0].index()];
            m.iter().all(|v| placement[v.index()] == d)
        })
    }
}

/// Whether a node's outputs are resident for the whole run (weights, KV caches).
fn resident(r: Residency) -> bool {
    matches!(r, Residency::PersistentWeight | Residency::StatefulKvCache)
}

/// Peak bytes per device (indexed by [`DeviceId`], `n_devices` long) when executing in `order`
/// with `placement`, using the lifetimes described in the [module docs](self).
pub fn peak_memory(
    graph: &Graph,
    consumers: &Consumers,
    residency: &[Residency],
    order: &[NodeId],
    placement: &[DeviceId],
    n_devices: usize,
) -> Vec<u64> {
    let n = graph.len();
    let steps = order.len().max(1);
    let mut pos = vec![0u32; n];
    for (i, v) in order.iter().enumerate() {
        pos[v.index()] = i as u32;
    }
    let mut is_output = vec![false; n];
    for t in &graph.outputs {
        if let Some(x) = is_output.get_mut(t.node.index()) {
            *x = true;
        }
    }
    let mut base = vec![0u64; n_devices];
    // delta[d * (steps + 1) + t]
    let mut delta = vec![0i64; n_devices * (steps + 1)];
    let mut last_on: Vec<(DeviceId, u32)> = Vec::new();
    for node in graph.nodes() {
        let bytes = node.output_bytes();
        if bytes == 0 {
            continue;
        }
        let home = placement[node.id.index()];
        if resident(residency[node.id.index()]) {
            base[home.index()] = base[home.index()].saturating_add(bytes);
        }
        // Last use per device (home included when the producer's own copy is an activation).
        last_on.clear();
        let start = pos[node.id.index()];
        if !resident(residency[node.id.index()]) {
            let end = if is_output[node.id.index()] {
                steps as u32 - 1
            } else {
                start
            };
            last_on.push((home, end));
        }
        for &c in consumers.of(node.id) {
            let d = placement[c.index()];
            let p = pos[c.index()];
            if d == home && resident(residency[node.id.index()]) {
                continue;
            }
            match last_on.iter_mut().find(|(x, _)| *x == d) {
                Some(e) => e.1 = e.1.max(p),
                None => last_on.push((d, p)),
            }
        }
        // Saturating: a validated graph stays far below (see `graph::MAX_GRAPH_BYTES`).
        let b = i64::try_from(bytes).unwrap_or(i64::MAX);
        for &(d, end) in &last_on {
            let row = d.index() * (steps + 1);
            let (s, e) = (start.min(end) as usize, start.max(end) as usize);
            delta[row + s] = delta[row + s].saturating_add(b);
            delta[row + e + 1] = delta[row + e + 1].saturating_sub(b);
        }
    }
    (0..n_devices)
        .map(|d| {
            let row = &delta[d * (steps + 1)..(d + 1) * (steps + 1)];
            let mut cur = 0i64;
            let mut peak = 0i64;
            for &x in row {
                cur = cur.saturating_add(x);
                peak = peak.max(cur);
            }
            base[d].saturating_add(peak.unsigned_abs())
        })
        .collect()
}

/// What [`fit_memory`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryFit {
    /// Peak bytes per device after any moves.
    pub peak: Vec<u64>,
    /// Groups moved: (first member, from, to).
    pub moves: Vec<(NodeId, DeviceId, DeviceId)>,
}

/// Checks peaks against `capacity` (per device id) and rebalances whole co-location groups until
/// every device fits, or fails with [`crate::Error::OutOfMemory`].
#[allow(clippy::too_many_arguments)]
pub fn fit_memory(
    graph: &Graph,
    consumers: &Consumers,
    residency: &[Residency],
    groups: &CoLocation,
    order: &[NodeId],
    placement: &mut [DeviceId],
    allowed: &[DeviceId],
    capacity: &[u64],
    device_name: impl Fn(DeviceId) -> String,
) -> Result<MemoryFit, crate::Error> {
    let n_dev = capacity.len();
    let mut fit = MemoryFit {
        peak: peak_memory(graph, consumers, residency, order, placement, n_dev),
        moves: Vec::new(),
    };
    let over = |peak: &[u64]| (0..n_dev).find(|&d| peak[d] > capacity[d]);
    let mut budget = groups.len() + allowed.len();
    while let Some(d) = over(&fit.peak) {
        let dev = DeviceId(d as u32);
        // Candidate groups on the full device, biggest footprint first.
        let mut cands: Vec<(u64, u32)> = Vec::new();
        for g in 0..groups.len() as u32 {
            let m = groups.members(g);
            if placement[m[0].index()] != dev {
                continue;
            }
            let bytes = m
                .iter()
                .filter_map(|v| graph.node(*v))
                .filter(|x| !matches!(x.op, OpKind::Input))
                .fold(0u64, |acc, x| acc.saturating_add(x.output_bytes()));
            if bytes > 0 {
                cands.push((bytes, g));
            }
        }
        cands.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut moved = false;
        'cands: for &(_, g) in &cands {
            let mut targets: Vec<DeviceId> =
                allowed.iter().copied().filter(|&t| t != dev).collect();
            targets.sort_by_key(|t| {
                std::cmp::Reverse(capacity[t.index()].saturating_sub(fit.peak[t.index()]))
            });
            for t in targets {
                for v in groups.members(g) {
                    placement[v.index()] = t;
                }
                let peak = peak_memory(graph, consumers, residency, order, placement, n_dev);
                if peak[t.index()] <= capacity[t.index()] && peak[d] < fit.peak[d] {
                    fit.peak = peak;
                    fit.moves.push((groups.members(g)[0], dev, t));
                    moved = true;
                    break 'cands;
                }
                for v in groups.members(g) {
                    placement[v.index()] = dev;
                }
            }
        }
        budget = budget.saturating_sub(1);
        if !moved || budget == 0 {
            let total = fit.peak.iter().fold(0u64, |a, &b| a.saturating_add(b));
            return Err(crate::Error::OutOfMemory {
                device: dev,
                device_name: device_name(dev),
                peak_bytes: fit.peak[d],
                capacity_bytes: capacity[d],
                total_peak_bytes: total,
                total_capacity_bytes: allowed
                    .iter()
                    .fold(0u64, |acc, a| acc.saturating_add(capacity[a.index()])),
            });
        }
        tracing::debug!(
            device = d,
            peak = fit.peak[d],
            "memory rebalance moved a group"
        );
    }
    Ok(fit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;
    use crate::builders::{gpt2_decode, Gpt2Config};

    #[test]
    fn union_find_groups_kv_and_weights() {
        let g = gpt2_decode(
            &Gpt2Config {
                layers: 2,
                ..Gpt2Config::default()
            },
            16,
        )
        .unwrap();
        let cons = g.consumers();
        let a = analyze(&g);
        let co = CoLocation::build(&g, &a, &cons, &[]);
        let cache = a.kv_caches[0];
        let attn = a.attention_blocks[0].attention;
        assert_eq!(co.group_of(cache), co.group_of(attn));
        let w = g
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.attn.c_attn.weight")
            .unwrap()
            .id;
        let lin = g
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.attn.c_attn.out")
            .unwrap()
            .id;
        assert_eq!(co.group_of(w), co.group_of(lin));
        let mut placement: Vec<DeviceId> = (0..g.len()).map(|i| DeviceId((i % 2) as u32)).collect();
        assert!(!co.respected_by(&placement));
        co.enforce(&mut placement, &[DeviceId(0), DeviceId(1)], |_, _| 1.0);
        assert!(co.respected_by(&placement));
    }

    #[test]
    fn peak_memory_counts_weights_and_live_activations() {
        let g = gpt2_decode(
            &Gpt2Config {
                layers: 1,
                ..Gpt2Config::default()
            },
            8,
        )
        .unwrap();
        let cons = g.consumers();
        let a = analyze(&g);
        let order: Vec<NodeId> = (0..g.len() as u32).map(NodeId).collect();
        let one = vec![DeviceId(0); g.len()];
        let peak = peak_memory(&g, &cons, &a.residency, &order, &one, 1)[0];
        let weights: u64 = g
            .nodes()
            .iter()
            .filter(|n| resident(a.residency[n.id.index()]))
            .map(|n| n.output_bytes())
            .sum();
        let largest_act = g
            .nodes()
            .iter()
            .filter(|n| !resident(a.residency[n.id.index()]))
            .map(|n| n.output_bytes())
            .max()
            .unwrap();
        assert!(peak >= weights + largest_act);
        assert!(peak < weights + 4 * largest_act);
        let co = CoLocation::build(&g, &a, &cons, &[]);
        let mut p = one.clone();
        let cap = [peak / 2 + peak / 4, peak];
        let fit = fit_memory(
            &g,
            &cons,
            &a.residency,
            &co,
            &order,
            &mut p,
            &[DeviceId(0), DeviceId(1)],
            &cap,
            |d| d.to_string(),
        )
        .unwrap();
        assert!(fit.peak[0] <= cap[0] && fit.peak[1] <= cap[1]);
        assert!(!fit.moves.is_empty());
        assert!(co.respected_by(&p));
        let mut p = one;
        let err = fit_memory(
            &g,
            &cons,
            &a.residency,
            &co,
            &order,
            &mut p,
            &[DeviceId(0)],
            &[peak / 2],
            |d| d.to_string(),
        );
        match err {
            Err(crate::Error::OutOfMemory {
                peak_bytes,
                capacity_bytes,
                ..
            }) => {
                assert_eq!((peak_bytes, capacity_bytes), (peak, peak / 2));
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
    }
}
