//! Placement policies: which device runs each node.
//!
//! A [`PlacementPolicy`] maps a [`PlacementContext`] (graph, per-node per-device cost table,
//! topology, allowed devices, co-location groups) to an [`Assignment`]: a device per node and the
//! order the list scheduler runs nodes in. Policies are pure functions of their input, so a
//! decision can be replayed. Co-location is enforced after the policy by
//! [`crate::constraints::CoLocation::enforce`], whatever the policy proposed; [`Heft`] honours
//! groups already while placing.
//!
//! - [`SingleDevice`]: everything on the fastest allowed device.
//! - [`Heft`]: Topcuoglu et al., *Performance-effective and low-complexity task scheduling for
//!   heterogeneous computing* (IEEE TPDS 2002): upward rank from mean costs, then each ready node
//!   (highest rank first; with `use_priority`, higher [`crate::graph::Semantics::priority`] first)
//!   goes to the device giving the earliest finish time, counting transfers from its producers.
//! - [`Pipeline`]: contiguous stages of the topological order with work balanced across devices
//!   in proportion to their speed — for CNNs and layer stacks.
//! - [`Heterogeneous`]: compute-bound work (prefill, vision, high arithmetic intensity) to the
//!   highest-FLOPS devices, memory-bound work (decode) to the best bandwidth per cost.

use crate::analysis::Analysis;
use crate::constraints::CoLocation;
use crate::cost::{CostModel, DeviceSpec};
use crate::graph::{Consumers, Graph, NodeId, OpKind, Phase};
use crate::topology::{DeviceId, Topology};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Estimated seconds of every node on every device, computed once per distinct device spec.
#[derive(Clone, Debug)]
pub struct CostTable {
    spec_of: Vec<u32>,
    n_specs: usize,
    times: Vec<f64>,
    /// FLOPs / bytes of every node (for intensity-based matching).
    pub intensity: Vec<f64>,
}

impl CostTable {
    /// Costs of `graph`'s nodes on `topology`'s devices under `model`.
    pub fn new(graph: &Graph, topology: &Topology, model: &dyn CostModel) -> Self {
        let mut specs: Vec<&DeviceSpec> = Vec::new();
        let mut spec_of = Vec::with_capacity(topology.len());
        for d in topology.devices() {
            match specs.iter().position(|s| **s == d.spec) {
                Some(i) => spec_of.push(i as u32),
                None => {
                    spec_of.push(specs.len() as u32);
                    specs.push(&d.spec);
                }
            }
        }
        let n_specs = specs.len();
        let mut times = Vec::with_capacity(graph.len() * n_specs);
        let mut intensity = Vec::with_capacity(graph.len());
        for node in graph.nodes() {
            if node.op.is_source() {
                times.extend(std::iter::repeat(0.0).take(n_specs));
                intensity.push(0.0);
                continue;
            }
            let w = model.work(graph, node);
            intensity.push(if w.bytes > 0.0 {
                w.flops / w.bytes
            } else {
                f64::INFINITY
            });
            for s in &specs {
                let t = s.launch_overhead
                    + (w.flops / s.effective_flops()).max(w.bytes / s.mem_bandwidth.max(1.0));
                times.push(t);
            }
        }
        Self {
            spec_of,
            n_specs,
            times,
            intensity,
        }
    }

    /// Seconds of `node` on `device`.
    #[inline]
    pub fn time(&self, node: NodeId, device: DeviceId) -> f64 {
        let s = self.spec_of.get(device.index()).copied().unwrap_or(0) as usize;
        self.times
            .get(node.index() * self.n_specs + s)
            .copied()
            .unwrap_or(0.0)
    }
}

/// Every node's inputs as compact `(producer, bytes)` arrays, so hot loops do not walk the
/// (large) [`crate::graph::Node`] structs in scheduling order.
#[derive(Clone, Debug, Default)]
pub struct EdgeTable {
    offsets: Vec<u32>,
    producer: Vec<u32>,
    bytes: Vec<u64>,
    source: Vec<bool>,
    id_ordered: bool,
}

impl EdgeTable {
    /// The table of `graph`.
    pub fn new(graph: &Graph) -> Self {
        let mut t = EdgeTable {
            offsets: Vec::with_capacity(graph.len() + 1),
            producer: Vec::new(),
            bytes: Vec::new(),
            source: Vec::with_capacity(graph.len()),
            id_ordered: true,
        };
        t.offsets.push(0);
        for node in graph.nodes() {
            for i in &node.inputs {
                t.id_ordered &= i.node < node.id;
                t.producer.push(i.node.0);
                t.bytes.push(graph.tensor(*i).map_or(0, |m| m.bytes()));
            }
            t.offsets.push(t.producer.len() as u32);
            t.source.push(node.op.is_source());
        }
        t
    }

    /// Producers and byte sizes of `v`'s inputs, in input order.
    #[inline]
    pub fn inputs(&self, v: NodeId) -> (&[u32], &[u64]) {
        let i = v.index();
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => (
                &self.producer[a as usize..b as usize],
                &self.bytes[a as usize..b as usize],
            ),
            _ => (&[], &[]),
        }
    }

    /// Whether every producer has a smaller id than its consumer ([`Graph::is_id_ordered`]).
    pub fn is_id_ordered(&self) -> bool {
        self.id_ordered
    }

    /// Whether `v` is a source node.
    #[inline]
    pub fn is_source(&self, v: NodeId) -> bool {
        self.source.get(v.index()).copied().unwrap_or(false)
    }
}

/// Everything a policy may look at.
pub struct PlacementContext<'a> {
    /// The graph.
    pub graph: &'a Graph,
    /// Its consumer lists.
    pub consumers: &'a Consumers,
    /// Its inputs, compactly.
    pub edges: &'a EdgeTable,
    /// Its analysis (effective phases etc.).
    pub analysis: &'a Analysis,
    /// The cluster.
    pub topology: &'a Topology,
    /// Node × device costs.
    pub costs: &'a CostTable,
    /// Devices the plan allows, ascending, non-empty.
    pub devices: &'a [DeviceId],
    /// Co-location groups.
    pub groups: &'a CoLocation,
    /// A topological order of the graph.
    pub topo_order: &'a [NodeId],
    /// Order ready nodes by their priority annotation first.
    pub use_priority: bool,
}

/// A policy's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// Device of every node.
    pub device: Vec<DeviceId>,
    /// A topological order to run nodes in.
    pub order: Vec<NodeId>,
}

/// Which policy to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// [`SingleDevice`].
    SingleDevice,
    /// [`Heft`].
    Heft,
    /// [`Pipeline`].
    Pipeline,
    /// [`Heterogeneous`].
    Heterogeneous,
}

impl PolicyKind {
    /// The policy object.
    pub fn policy(self) -> &'static dyn PlacementPolicy {
        match self {
            PolicyKind::SingleDevice => &SingleDevice,
            PolicyKind::Heft => &Heft,
            PolicyKind::Pipeline => &Pipeline,
            PolicyKind::Heterogeneous => &Heterogeneous,
        }
    }
}

/// Places nodes on devices.
pub trait PlacementPolicy: Send + Sync {
    /// Short name for logs and schedules.
    fn name(&self) -> &'static str;
    /// Proposes a placement.
    fn place(&self, cx: &PlacementContext<'_>) -> Assignment;
}

/// Everything on the allowed device with the highest effective FLOPS (ties: lowest id).
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleDevice;

impl PlacementPolicy for SingleDevice {
    fn name(&self) -> &'static str {
        "single_device"
    }
    fn place(&self, cx: &PlacementContext<'_>) -> Assignment {
        let best = best_by(cx, |s| s.effective_flops());
        Assignment {
            device: vec![best; cx.graph.len()],
            order: cx.topo_order.to_vec(),
        }
    }
}

fn best_by(cx: &PlacementContext<'_>, key: impl Fn(&DeviceSpec) -> f64) -> DeviceId {
    let mut best = cx.devices[0];
    let mut best_key = f64::NEG_INFINITY;
    for &d in cx.devices {
        if let Some(dev) = cx.topology.device(d) {
            let k = key(&dev.spec);
            if k > best_key {
                best = d;
                best_key = k;
            }
        }
    }
    best
}

/// Heterogeneous earliest-finish-time list scheduling (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default)]
pub struct Heft;

#[derive(PartialEq)]
struct Ready {
    priority: i32,
    rank: f64,
    node: u32,
}
impl Eq for Ready {}
impl Ord for Ready {
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority
            .cmp(&o.priority)
            .then(self.rank.total_cmp(&o.rank))
            .then(o.node.cmp(&self.node))
    }
}
impl PartialOrd for Ready {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Upward ranks from mean costs and mean communication.
pub fn upward_ranks(cx: &PlacementContext<'_>) -> Vec<f64> {
    let g = cx.graph;
    let nd = cx.devices.len();
    let (mut lat, mut inv_bw, mut pairs) = (0.0, 0.0, 0usize);
    for &a in cx.devices {
        for &b in cx.devices {
            if a != b {
                let l = cx.topology.link(a, b);
                lat += l.latency;
                inv_bw += 1.0 / l.bandwidth.max(1.0);
                pairs += 1;
            }
        }
    }
    if pairs > 0 {
        lat /= pairs as f64;
        inv_bw /= pairs as f64;
    }
    // Probability that a consumer lands on another device under a random placement.
    let p_remote = if nd > 1 {
        (nd - 1) as f64 / nd as f64
    } else {
        0.0
    };
    let mut rank = vec![0.0; g.len()];
    for &v in cx.topo_order.iter().rev() {
        let node = &g.nodes()[v.index()];
        let mean: f64 = cx.devices.iter().map(|&d| cx.costs.time(v, d)).sum::<f64>() / nd as f64;
        let comm = p_remote * (lat + node.output_bytes() as f64 * inv_bw);
        let succ = cx
            .consumers
            .of(v)
            .iter()
            .map(|s| rank[s.index()])
            .fold(0.0, f64::max);
        rank[v.index()] = mean
            + if cx.consumers.of(v).is_empty() {
                0.0
            } else {
                comm + succ
            };
    }
    rank
}

impl PlacementPolicy for Heft {
    fn name(&self) -> &'static str {
        "heft"
    }
    fn place(&self, cx: &PlacementContext<'_>) -> Assignment {
        let g = cx.graph;
        let n = g.len();
        let nodes = g.nodes();
        let rank = upward_ranks(cx);
        let mut indeg = vec![0u32; n];
        for node in nodes {
            for &c in cx.consumers.of(node.id) {
                indeg[c.index()] += 1;
            }
        }
        let mut heap = BinaryHeap::with_capacity(n);
        let push = |heap: &mut BinaryHeap<Ready>, v: NodeId| {
            heap.push(Ready {
                priority: if cx.use_priority {
                    nodes[v.index()].semantics.priority
                } else {
                    0
                },
                rank: rank[v.index()],
                node: v.0,
            })
        };
        for v in 0..n as u32 {
            if indeg[v as usize] == 0 {
                push(&mut heap, NodeId(v));
            }
        }
        let max_dev = cx.devices.iter().map(|d| d.index() + 1).max().unwrap_or(1);
        let mut avail = vec![0.0f64; max_dev];
        let mut finish = vec![0.0f64; n];
        let unset = DeviceId(u32::MAX);
        let mut device = vec![unset; n];
        let mut pinned = vec![unset; cx.groups.len()];
        let mut order = Vec::with_capacity(n);
        while let Some(Ready { node, .. }) = heap.pop() {
            let v = NodeId(node);
            order.push(v);
            if !cx.edges.is_source(v) {
                let (prods, sizes) = cx.edges.inputs(v);
                let grp = cx.groups.group_of(v) as usize;
                let one = [pinned[grp]];
                let cands: &[DeviceId] = if pinned[grp] != unset {
                    &one
                } else {
                    cx.devices
                };
                let mut best = (f64::INFINITY, cands[0]);
                for &d in cands {
                    let mut ready = 0.0f64;
                    for (&u, &bytes) in prods.iter().zip(sizes) {
                        let u = u as usize;
                        if device[u] == unset {
                            continue; // a source: co-located with v by construction
                        }
                        let mut at = finish[u];
                        if device[u] != d {
                            at += cx.topology.transfer_time(device[u], d, bytes);
                        }
                        ready = ready.max(at);
                    }
                    let eft = ready.max(avail[d.index()]) + cx.costs.time(v, d);
                    if eft < best.0 {
                        best = (eft, d);
                    }
                }
                let (eft, d) = best;
                device[v.index()] = d;
                pinned[grp] = d;
                finish[v.index()] = eft;
                avail[d.index()] = eft;
            }
            for &c in cx.consumers.of(v) {
                indeg[c.index()] -= 1;
                if indeg[c.index()] == 0 {
                    push(&mut heap, c);
                }
            }
        }
        // Sources follow their group; groups of sources only go to the first device.
        for (i, d) in device.iter_mut().enumerate() {
            if *d == unset {
                let p = pinned[cx.groups.group_of(NodeId(i as u32)) as usize];
                *d = if p != unset { p } else { cx.devices[0] };
            }
        }
        Assignment { device, order }
    }
}

/// Balanced contiguous stages over the topological order (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pipeline;

impl PlacementPolicy for Pipeline {
    fn name(&self) -> &'static str {
        "pipeline"
    }
    fn place(&self, cx: &PlacementContext<'_>) -> Assignment {
        let n = cx.graph.len();
        let reference = cx.devices[0];
        let speed: Vec<f64> = cx
            .devices
            .iter()
            .map(|&d| {
                cx.topology
                    .device(d)
                    .map_or(1.0, |x| x.spec.effective_flops())
            })
            .collect();
        let total_speed: f64 = speed.iter().sum();
        let work: Vec<f64> = cx
            .topo_order
            .iter()
            .map(|&v| cx.costs.time(v, reference))
            .collect();
        let total: f64 = work.iter().sum();
        // Stage k ends where the prefix sum is nearest to its share of the total.
        let mut bounds = Vec::with_capacity(cx.devices.len());
        let mut target = 0.0;
        let mut prefix = 0.0;
        let mut i = 0;
        for s in &speed[..speed.len() - 1] {
            target += total * s / total_speed;
            while i < work.len() && (prefix + work[i] - target).abs() <= (prefix - target).abs() {
                prefix += work[i];
                i += 1;
            }
            bounds.push(i);
        }
        bounds.push(work.len());
        let mut device = vec![reference; n];
        let mut stage = 0;
        for (pos, &v) in cx.topo_order.iter().enumerate() {
            while pos >= bounds[stage] && stage + 1 < bounds.len() {
                stage += 1;
            }
            device[v.index()] = cx.devices[stage];
        }
        Assignment {
            device,
            order: cx.topo_order.to_vec(),
        }
    }
}

/// Compute-bound work to high-FLOPS devices, memory-bound work to bandwidth per cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Heterogeneous;

impl PlacementPolicy for Heterogeneous {
    fn name(&self) -> &'static str {
        "heterogeneous"
    }
    fn place(&self, cx: &PlacementContext<'_>) -> Assignment {
        let flops_best = best_by(cx, |s| s.effective_flops());
        let bw_best = best_by(cx, |s| s.mem_bandwidth / s.cost_per_hour.max(1e-9));
        let ridge = cx.topology.device(flops_best).map_or(1.0, |d| {
            d.spec.effective_flops() / d.spec.mem_bandwidth.max(1.0)
        });
        let device = cx
            .graph
            .nodes()
            .iter()
            .map(|node| {
                let compute_bound = match cx.analysis.phase[node.id.index()] {
                    Phase::Prefill | Phase::Vision => true,
                    Phase::Decode => false,
                    Phase::Embedding | Phase::Unknown => {
                        cx.costs.intensity[node.id.index()] >= ridge
                    }
                };
                if compute_bound {
                    flops_best
                } else {
                    bw_best
                }
            })
            .collect();
        Assignment {
            device,
            order: cx.topo_order.to_vec(),
        }
    }
}

/// The naive baseline: non-weight nodes round-robin over `devices` in id order, each weight with
/// its first consumer. Used to measure what co-location saves.
pub fn round_robin(graph: &Graph, consumers: &Consumers, devices: &[DeviceId]) -> Vec<DeviceId> {
    let d0 = devices.first().copied().unwrap_or_default();
    let mut out = vec![d0; graph.len()];
    let mut k = 0usize;
    for node in graph.nodes() {
        if !matches!(node.op, OpKind::Parameter { .. }) {
            out[node.id.index()] = devices[k % devices.len().max(1)];
            k += 1;
        }
    }
    for node in graph.nodes() {
        if matches!(node.op, OpKind::Parameter { .. }) {
            if let Some(c) = consumers.of(node.id).first() {
                out[node.id.index()] = out[c.index()];
            }
        }
    }
    out
}

/// Bytes that cross devices under `placement`: each tensor once per distinct remote device that
/// consumes it.
pub fn cross_device_bytes(graph: &Graph, placement: &[DeviceId]) -> u64 {
    let mut seen: Vec<(u32, u32, DeviceId)> = Vec::new();
    for node in graph.nodes() {
        let d = placement[node.id.index()];
        for t in &node.inputs {
            if placement[t.node.index()] != d {
                seen.push((t.node.0, t.output, d));
            }
        }
    }
    seen.sort_unstable();
    seen.dedup();
    seen.iter()
        .filter_map(|&(n, o, _)| graph.tensor(crate::graph::TensorRef::new(NodeId(n), o)))
        .fold(0u64, |acc, m| acc.saturating_add(m.bytes()))
}
