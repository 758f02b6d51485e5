//! Placement of a graph's nodes on workers, and the execution plan derived from it: which
//! tensors cross which links, where each lands in the receiver's registered region, and how
//! many local consumers each tensor has (so ephemeral tensors are freed after their last use).
//!
//! Every worker derives the same [`ExecPlan`] from the same graph and [`Placement`], so the
//! only thing exchanged per run is the region descriptors.

use crate::error::{Result, RuntimeError};
use genie_scheduler::graph::{Graph, NodeId, OpKind, Residency, TensorRef};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The scheduler's view of `workers` CPU workers joined by loopback-class links (20 Gb/s, 30 µs:
/// an initial guess, which [`crate::feedback::calibrate_links`] corrects from measured transfers).
pub fn cpu_topology(workers: usize) -> Result<genie_scheduler::Topology> {
    genie_scheduler::Topology::uniform(
        workers,
        genie_scheduler::cost::DeviceSpec::cpu(),
        genie_scheduler::topology::LinkSpec::gbps(20.0, 30.0),
    )
    .map_err(|e| RuntimeError::Scheduler(e.into()))
}

/// [`cpu_topology`] with the links a cluster file states ([`crate::cluster::WorkerLink`]) in
/// place of the default; an error names a link that is out of range or joins a worker beyond
/// `workers`.
pub fn topology_with_links(
    workers: usize,
    links: &[crate::cluster::WorkerLink],
) -> Result<genie_scheduler::Topology> {
    let mut t = cpu_topology(workers)?;
    for l in links {
        let (a, b) = l.between;
        if a >= workers || b >= workers {
            return Err(RuntimeError::Plan(format!(
                "a link joins workers {a} and {b}; the cluster has {workers}"
            )));
        }
        l.check()
            .map_err(|e| RuntimeError::Plan(format!("link between workers {a} and {b}: {e}")))?;
        let id = |i: usize| genie_scheduler::topology::DeviceId(i as u32);
        t.set_link(
            id(a),
            id(b),
            genie_scheduler::topology::LinkSpec::gbps(l.gbps, l.latency_us),
        )
        .map_err(|e| RuntimeError::Scheduler(e.into()))?;
    }
    Ok(t)
}

/// Which worker runs each node, plus the scheduler's directives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Worker index per node, indexed by `NodeId`. Ignored for parameters and inputs, which are
    /// materialised on every worker that consumes them (weights are never shipped per step).
    pub worker_of: Vec<usize>,
    /// Nodes recomputed on each consumer's worker instead of being transferred.
    pub recompute: BTreeSet<u32>,
    /// Post transfers as soon as their producer finishes (true) or wait for each transfer to
    /// complete before computing on (false: the "no overlap" baseline).
    pub overlap: bool,
}

impl Placement {
    /// Everything on worker 0.
    pub fn single(graph: &Graph) -> Self {
        Self {
            worker_of: vec![0; graph.len()],
            recompute: BTreeSet::new(),
            overlap: true,
        }
    }

    /// Contiguous pipeline stages: the compute nodes, in topological order, cut into `workers`
    /// runs of about equal count.
    pub fn contiguous(graph: &Graph, workers: usize) -> Result<Self> {
        let order = graph
            .topo_order()
            .map_err(|e| RuntimeError::Plan(e.to_string()))?;
        let compute: Vec<NodeId> = order
            .into_iter()
            .filter(|id| {
                graph
                    .nodes()
                    .get(id.index())
                    .is_some_and(|n| !is_replicated_source(&n.op))
            })
            .collect();
        let mut worker_of = vec![0; graph.len()];
        let n = compute.len().max(1);
        for (i, id) in compute.iter().enumerate() {
            worker_of[id.index()] = (i * workers.max(1)) / n;
        }
        Ok(Self {
            worker_of,
            recompute: BTreeSet::new(),
            overlap: true,
        })
    }

    /// The scheduler's placement: device `i` of the schedule's topology is worker `i`; its
    /// recompute decisions become recompute directives (a producer recomputed on any consumer
    /// device is recomputed wherever it is consumed).
    pub fn from_schedule(schedule: &genie_scheduler::ExecutionSchedule) -> Self {
        Self {
            worker_of: schedule.node_device.iter().map(|d| d.index()).collect(),
            recompute: schedule.recompute.iter().map(|r| r.node.0).collect(),
            overlap: true,
        }
    }

    /// The scheduler's placement of `graph` with its compute on worker `on` and its KV caches on
    /// worker `kv` (device `devN` of the scheduler's topology is worker `N`): the co-location
    /// constraint moves each cache's group to `kv`, so a prefill on `on` builds the caches where
    /// decode on `kv` will read them. Repeated shapes come from the scheduler's cache. How the
    /// engine, the demo and `genie generate` place every run.
    pub fn scheduled(
        scheduler: &mut genie_scheduler::Scheduler,
        graph: &Graph,
        on: usize,
        kv: usize,
    ) -> Result<Self> {
        Self::scheduled_with_makespan(scheduler, graph, on, kv).map(|(p, _)| p)
    }

    /// [`Placement::scheduled`], with the schedule's predicted makespan in seconds (the cost
    /// model's estimate of the run's time).
    pub fn scheduled_with_makespan(
        scheduler: &mut genie_scheduler::Scheduler,
        graph: &Graph,
        on: usize,
        kv: usize,
    ) -> Result<(Self, f64)> {
        let plan = genie_scheduler::OptimizationPlan {
            devices: Some(vec![format!("dev{on}")]),
            kv_device: Some(format!("dev{kv}")),
            no_recompute: true,
            ..Default::default()
        };
        let s = scheduler
            .create_schedule(graph, &plan)
            .map_err(RuntimeError::Scheduler)?;
        Ok((Self::from_schedule(&s), s.makespan_s))
    }

    /// The hand-made co-located prefill, a baseline for [`Placement::scheduled`]: everything on
    /// w0 except the KV caches' appends, which run on w1 (where decode reads the caches).
    pub fn colocated_prefill(graph: &Graph) -> Self {
        Self::by_rule(graph, |n| {
            usize::from(matches!(n.op, OpKind::KvCacheAppend))
        })
    }

    /// The hand-made co-located decode step, a baseline for [`Placement::scheduled`]: the whole
    /// step on w1, the decode worker, where the sequence's KV caches are pinned.
    pub fn colocated_decode(graph: &Graph) -> Self {
        Self::by_rule(graph, |_| 1)
    }

    /// Places nodes by a rule on the node.
    pub fn by_rule(
        graph: &Graph,
        mut rule: impl FnMut(&genie_scheduler::graph::Node) -> usize,
    ) -> Self {
        Self {
            worker_of: graph.nodes().iter().map(&mut rule).collect(),
            recompute: BTreeSet::new(),
            overlap: true,
        }
    }

    /// Layer-wise stages over `workers`: decoder/encoder layer `l` of `layers` (and its KV
    /// cache) on worker `l·workers/layers`, everything before the first layer on worker 0,
    /// everything after the last on the last worker. The same layer lands on the same worker in
    /// the prefill and decode graphs, so KV caches stay where they were made. Layers are the
    /// nodes' own ([`layer_of`]); a graph whose nodes carry none runs wholly on worker 0.
    pub fn by_layer(graph: &Graph, workers: usize, layers: usize) -> Result<Self> {
        let order = graph
            .topo_order()
            .map_err(|e| RuntimeError::Plan(e.to_string()))?;
        let workers = workers.max(1);
        let mut worker_of = vec![0; graph.len()];
        let mut seen_layer = false;
        for id in order {
            let w = match layer_of(graph, id) {
                Some(l) => {
                    seen_layer = true;
                    (l * workers) / layers.max(1)
                }
                None if seen_layer => workers - 1,
                None => 0,
            };
            worker_of[id.index()] = w.min(workers - 1);
        }
        Ok(Self {
            worker_of,
            recompute: BTreeSet::new(),
            overlap: true,
        })
    }

    /// Number of workers this placement uses (highest index + 1).
    pub fn workers(&self) -> usize {
        self.worker_of.iter().copied().max().map_or(1, |m| m + 1)
    }
}

/// Parameters and inputs: available on every worker, never transferred.
pub fn is_replicated_source(op: &OpKind) -> bool {
    matches!(op, OpKind::Input | OpKind::Parameter { .. })
}

/// One tensor crossing from one worker to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSpec {
    /// Index in [`ExecPlan::transfers`]; also the notification value.
    pub id: u32,
    /// The tensor.
    pub tensor: TensorRef,
    /// Sending worker.
    pub src: usize,
    /// Receiving worker.
    pub dst: usize,
    /// Bytes.
    pub bytes: u64,
    /// Offset in the sender's staging region for `dst`.
    pub src_offset: u64,
    /// Offset in the receiver's landing region for `src`.
    pub dst_offset: u64,
}

/// Everything a worker needs to run its part of a graph.
#[derive(Debug, Clone)]
pub struct ExecPlan {
    /// Worker per node (replicated nodes: their nominal worker).
    pub worker_of: Vec<usize>,
    /// Nodes materialised wherever they are consumed (parameters, inputs, recomputed nodes).
    pub replicated: Vec<bool>,
    /// Every cross-worker transfer.
    pub transfers: Vec<TransferSpec>,
    /// Transfers leaving each tensor, by tensor.
    pub outgoing: HashMap<TensorRef, Vec<u32>>,
    /// Transfer delivering a tensor to a worker.
    pub incoming: HashMap<(TensorRef, usize), u32>,
    /// Reads of each tensor on each worker (ephemeral lifetimes), by (tensor, worker).
    pub uses: HashMap<(TensorRef, usize), usize>,
    /// Bytes of the staging region from `src` to `dst` (both directions' regions are this size).
    pub link_bytes: BTreeMap<(usize, usize), u64>,
    /// Topological order of all nodes.
    pub order: Vec<NodeId>,
    /// Number of workers.
    pub workers: usize,
}

impl ExecPlan {
    /// Derives the plan; `wanted` tensors are delivered to the caller from their producer.
    pub fn new(graph: &Graph, placement: &Placement, wanted: &[TensorRef]) -> Result<Self> {
        let nodes = graph.nodes();
        if placement.worker_of.len() != nodes.len() {
            return Err(RuntimeError::Plan(format!(
                "placement covers {} nodes, graph has {}",
                placement.worker_of.len(),
                nodes.len()
            )));
        }
        let order = graph
            .topo_order()
            .map_err(|e| RuntimeError::Plan(e.to_string()))?;
        let workers = placement.workers();
        let replicated: Vec<bool> = nodes
            .iter()
            .map(|n| is_replicated_source(&n.op) || placement.recompute.contains(&n.id.0))
            .collect();
        // A recomputed node must be computable from replicated inputs alone.
        for n in nodes {
            if replicated[n.id.index()] && !is_replicated_source(&n.op) {
                if matches!(n.residency(), Residency::StatefulKvCache) {
                    return Err(RuntimeError::Plan(format!(
                        "node `{}` holds KV state and cannot be recomputed",
                        n.name
                    )));
                }
                for i in &n.inputs {
                    if !replicated.get(i.node.index()).copied().unwrap_or(false) {
                        return Err(RuntimeError::Plan(format!(
                            "node `{}` is marked for recompute but its input {} is not \
                             available on every worker",
                            n.name, i.node
                        )));
                    }
                }
            }
        }
        let mut uses: HashMap<(TensorRef, usize), usize> = HashMap::new();
        let mut need: BTreeMap<TensorRef, BTreeSet<usize>> = BTreeMap::new();
        // Reads by replicated nodes are counted per worker on demand (see the worker), so only
        // non-replicated consumers are counted here.
        for n in nodes {
            if replicated[n.id.index()] {
                continue;
            }
            let w = placement.worker_of[n.id.index()];
            for i in &n.inputs {
                *uses.entry((*i, w)).or_default() += 1;
                let pw = placement
                    .worker_of
                    .get(i.node.index())
                    .copied()
                    .unwrap_or(0);
                if !replicated.get(i.node.index()).copied().unwrap_or(true) && pw != w {
                    need.entry(*i).or_default().insert(w);
                }
            }
        }
        for t in wanted {
            let pw = placement
                .worker_of
                .get(t.node.index())
                .copied()
                .ok_or_else(|| {
                    RuntimeError::Plan(format!("wanted tensor {t:?} is not in the graph"))
                })?;
            if replicated.get(t.node.index()).copied().unwrap_or(true) {
                return Err(RuntimeError::Plan(format!(
                    "wanted tensor {t:?} is a parameter, input or recomputed node"
                )));
            }
            *uses.entry((*t, pw)).or_default() += 1;
        }
        let mut transfers = Vec::new();
        let mut outgoing: HashMap<TensorRef, Vec<u32>> = HashMap::new();
        let mut incoming = HashMap::new();
        let mut link_bytes: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        for (t, dsts) in need {
            let src = placement.worker_of[t.node.index()];
            let bytes = nodes
                .get(t.node.index())
                .and_then(|n| n.outputs.get(t.output as usize))
                .map(|m| m.bytes())
                .ok_or_else(|| RuntimeError::Plan(format!("tensor {t:?} has no metadata")))?;
            for dst in dsts {
                let id = transfers.len() as u32;
                let off = link_bytes.entry((src, dst)).or_default();
                // 64-byte alignment keeps every tensor on its own cache lines.
                let offset = *off;
                *off = off.saturating_add(bytes.div_ceil(64).saturating_mul(64));
                transfers.push(TransferSpec {
                    id,
                    tensor: t,
                    src,
                    dst,
                    bytes,
                    src_offset: offset,
                    dst_offset: offset,
                });
                outgoing.entry(t).or_default().push(id);
                incoming.insert((t, dst), id);
            }
        }
        Ok(Self {
            worker_of: placement.worker_of.clone(),
            replicated,
            transfers,
            outgoing,
            incoming,
            uses,
            link_bytes,
            order,
            workers,
        })
    }

    /// Total bytes crossing links in one run.
    pub fn bytes_moved(&self) -> u64 {
        self.transfers.iter().map(|t| t.bytes).sum()
    }
}

/// The layer a node belongs to: its semantic layer ([`Node::layer`], set by the model builders
/// or the frontend), or for a KV-cache read, the op's layer. Names are never parsed: a node
/// without a layer is outside every layer (the front end, or a graph that does not say).
///
/// [`Node::layer`]: genie_scheduler::graph::Node::layer
pub fn layer_of(graph: &Graph, id: NodeId) -> Option<usize> {
    graph.node(id)?.layer().map(|l| l as usize)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use genie_scheduler::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};

    /// `g` with its blocks named as Llama-style checkpoints name them: `h.{i}.…` becomes
    /// `model.layers.{i}.…` in every node name and module path; layers and all else unchanged.
    pub(crate) fn llama_named(g: &Graph) -> Graph {
        let rename = |s: &mut String| {
            if let Some(rest) = s.strip_prefix("h.") {
                *s = format!("model.layers.{rest}");
            }
        };
        let mut g = g.clone();
        for n in g.nodes_mut() {
            rename(&mut n.name);
            rename(&mut n.semantics.module_path);
        }
        g
    }

    /// A GPT-2 small enough for unit tests (also used by the graph cache's tests).
    pub(crate) fn small() -> Gpt2Config {
        Gpt2Config {
            layers: 2,
            hidden: 32,
            heads: 2,
            vocab: 64,
            context: 64,
            ..Gpt2Config::default()
        }
    }

    #[test]
    fn transfers_follow_cross_edges_only() {
        let g = gpt2_decode(&small(), 8).unwrap();
        let single = ExecPlan::new(&g, &Placement::single(&g), &[g.outputs[0]]).unwrap();
        assert!(single.transfers.is_empty());
        let p = Placement::contiguous(&g, 3).unwrap();
        assert_eq!(p.workers(), 3);
        let plan = ExecPlan::new(&g, &p, &[g.outputs[0]]).unwrap();
        assert!(!plan.transfers.is_empty());
        for t in &plan.transfers {
            assert_ne!(t.src, t.dst);
            assert!(!plan.replicated[t.tensor.node.index()]);
            assert_eq!(plan.incoming[&(t.tensor, t.dst)], t.id);
        }
        let layers: BTreeSet<usize> = (0..g.len() as u32)
            .filter_map(|i| layer_of(&g, NodeId(i)))
            .collect();
        assert_eq!(layers, BTreeSet::from([0, 1]));
    }

    /// A model whose blocks are `model.layers.{i}` gets the same layers, KV-cache layers and
    /// per-layer placement as GPT-2's `h.{i}`: the layer is read from the node, not its name.
    #[test]
    fn llama_style_names_place_like_gpt2_names() {
        let cfg = Gpt2Config {
            layers: 4,
            ..small()
        };
        for g in [
            gpt2_prefill(&cfg, 5).unwrap(),
            gpt2_decode(&cfg, 5).unwrap(),
        ] {
            let llama = llama_named(&g);
            assert!(llama
                .nodes()
                .iter()
                .any(|n| n.name == "model.layers.3.attn.present"));
            let ids = (0..g.len() as u32).map(NodeId);
            for id in ids {
                assert_eq!(layer_of(&llama, id), layer_of(&g, id), "{}", g.name);
            }
            let kv: Vec<Option<usize>> = llama
                .nodes()
                .iter()
                .filter(|n| matches!(n.op, OpKind::KvCacheAppend))
                .map(|n| layer_of(&llama, n.id))
                .collect();
            assert_eq!(kv, [Some(0), Some(1), Some(2), Some(3)]);
            let by_name = Placement::by_layer(&g, 2, cfg.layers).unwrap();
            let by_layer = Placement::by_layer(&llama, 2, cfg.layers).unwrap();
            assert_eq!(by_layer, by_name);
            assert_eq!(by_layer.workers(), 2);
        }
    }

    /// Without layers on its nodes, a graph has no per-layer placement, whatever its names say.
    #[test]
    fn names_are_never_parsed_for_layers() {
        let mut g = gpt2_prefill(&small(), 5).unwrap();
        for n in g.nodes_mut() {
            n.semantics.layer = None;
        }
        assert!((0..g.len() as u32).all(|i| layer_of(&g, NodeId(i)).is_none()));
        let p = Placement::by_layer(&g, 2, 2).unwrap();
        assert_eq!(p.workers(), 1);
    }

    #[test]
    fn recompute_needs_replicated_inputs() {
        let g = gpt2_decode(&small(), 8).unwrap();
        let mut p = Placement::contiguous(&g, 2).unwrap();
        for name in ["wte.embed", "wpe.embed"] {
            let id = g.nodes().iter().find(|n| n.name == name).unwrap().id;
            p.recompute.insert(id.0);
        }
        ExecPlan::new(&g, &p, &[]).unwrap();
        let sum = g.nodes().iter().find(|n| n.name == "embed_sum").unwrap().id;
        p.recompute.insert(sum.0);
        ExecPlan::new(&g, &p, &[]).unwrap();
        let ln = g
            .nodes()
            .iter()
            .find(|n| n.name == "h.0.ln_1.out")
            .unwrap()
            .id;
        let mut q = Placement::contiguous(&g, 2).unwrap();
        q.recompute.insert(ln.0);
        assert!(matches!(
            ExecPlan::new(&g, &q, &[]),
            Err(RuntimeError::Plan(_))
        ));
    }
}
