//! The scheduler's output: an [`ExecutionSchedule`].
//!
//! Stages are dependency levels: a node's stage is one more than the latest stage of its
//! producers (sources are stage 0), so every node of a stage can start once the previous stages
//! are done. Within a stage, nodes are grouped per device; the groups of one stage may run in
//! parallel, and a group's nodes run in the schedule's `order`. A tensor consumed on another
//! device than its producer's appears once per destination in `transfers`, unless that consumer
//! device recomputes the producer (`recompute`).

use crate::graph::{Graph, NodeId, TensorRef};
use crate::placement::PolicyKind;
use crate::topology::DeviceId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How the schedule is meant to be executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One device, one node after another.
    Sequential,
    /// Independent nodes on different devices at once (HEFT placement).
    Parallel,
    /// Contiguous stages on consecutive devices, micro-batches flowing through.
    Pipeline,
    /// Placement fixed, execution order decided at run time by the ready queue
    /// ([`crate::dispatch`]).
    Dynamic,
    /// Like parallel, but ready nodes are ordered by their priority annotation first.
    Priority,
}

/// Nodes of one stage on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecGroup {
    /// Its stage.
    pub stage: u32,
    /// Its device.
    pub device: DeviceId,
    /// Its nodes, in execution order.
    pub nodes: Vec<NodeId>,
}

/// One stage: groups that may run in parallel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Indices into [`ExecutionSchedule::groups`].
    pub groups: Vec<u32>,
}

/// A tensor to ship between devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduledTransfer {
    /// The tensor.
    pub tensor: TensorRef,
    /// Producer's device.
    pub src: DeviceId,
    /// Consumer's device.
    pub dst: DeviceId,
    /// Size.
    pub bytes: u64,
    /// Predicted time (seconds from the start) at which the producer finishes.
    pub earliest_start_s: f64,
}

/// What to do with a node's outputs on a device once used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheAction {
    /// Keep resident (weights, KV caches, graph outputs).
    Keep,
    /// Free after this node has run.
    EvictAfter(NodeId),
}

/// A caching directive for a node's outputs on one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheDirective {
    /// The producing node (all its outputs).
    pub node: NodeId,
    /// Where the copy lives.
    pub device: DeviceId,
    /// What to do.
    pub action: CacheAction,
}

/// A producer recomputed on a consumer's device instead of shipping its output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recompute {
    /// The producer.
    pub node: NodeId,
    /// The consumer's device, which runs the producer again.
    pub device: DeviceId,
    /// Predicted transfer time avoided, seconds.
    pub transfer_s: f64,
    /// Predicted recompute time, seconds.
    pub compute_s: f64,
}

/// The full plan for running a graph on a cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionSchedule {
    /// Execution strategy.
    pub strategy: Strategy,
    /// Placement policy used.
    pub policy: PolicyKind,
    /// Device names, indexed by [`DeviceId`].
    pub device_names: Vec<String>,
    /// Stages in order.
    pub stages: Vec<Stage>,
    /// Groups, each in one stage on one device.
    pub groups: Vec<ExecGroup>,
    /// Stage of every node.
    pub node_stage: Vec<u32>,
    /// Group of every node.
    pub node_group: Vec<u32>,
    /// Device of every node.
    pub node_device: Vec<DeviceId>,
    /// A topological order of all nodes (the simulated execution order).
    pub order: Vec<NodeId>,
    /// Cross-device tensors.
    pub transfers: Vec<ScheduledTransfer>,
    /// Keep/evict directives, one per (node with outputs, device holding a copy).
    pub caching: Vec<CacheDirective>,
    /// Producers recomputed on consumer devices.
    pub recompute: Vec<Recompute>,
    /// Co-location groups with more than one node (all on one device).
    pub colocation_groups: Vec<Vec<NodeId>>,
    /// Predicted peak memory per device, bytes.
    pub peak_memory: Vec<u64>,
    /// Predicted end-to-end time, seconds.
    pub makespan_s: f64,
    /// Free-form facts: graph name and hash, topology version, workload class, ...
    pub metadata: BTreeMap<String, String>,
}

/// Why a schedule does not fit its graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// A per-node table has the wrong length.
    #[error("{table} has {found} entries for {nodes} nodes")]
    Length {
        /// Which table.
        table: &'static str,
        /// Its length.
        found: usize,
        /// Graph size.
        nodes: usize,
    },
    /// A node is missing from its group, or is in several.
    #[error("node {0} is not placed exactly once")]
    NotPlacedOnce(NodeId),
    /// A node's device is not in the schedule's device list.
    #[error("node {node} is on unknown device {device}")]
    UnknownDevice {
        /// The node.
        node: NodeId,
        /// The device.
        device: DeviceId,
    },
    /// A group's stage or device disagrees with its node's.
    #[error("node {0} disagrees with its group on stage or device")]
    GroupMismatch(NodeId),
    /// A node's stage is not after a producer's.
    #[error("node {node} in stage {stage} does not come after producer {producer} in stage {producer_stage}")]
    StageOrder {
        /// The consumer.
        node: NodeId,
        /// Its stage.
        stage: u32,
        /// The producer.
        producer: NodeId,
        /// The producer's stage.
        producer_stage: u32,
    },
    /// The order is not a topological permutation.
    #[error("order is not a topological order of all nodes (at node {0})")]
    BadOrder(NodeId),
    /// A co-location group spans devices.
    #[error("co-location group of node {0} spans devices")]
    ColocationViolated(NodeId),
    /// A cross-device edge has neither a transfer nor a recompute.
    #[error("tensor {tensor:?} is consumed on {dst} without a transfer or recompute")]
    MissingTransfer {
        /// The tensor.
        tensor: TensorRef,
        /// The consumer's device.
        dst: DeviceId,
    },
    /// A transfer disagrees with the graph.
    #[error("transfer of {tensor:?} to {dst} is inconsistent with the graph or placement")]
    BadTransfer {
        /// The tensor.
        tensor: TensorRef,
        /// Destination.
        dst: DeviceId,
    },
}

impl ExecutionSchedule {
    /// Checks the schedule against `graph`.
    pub fn validate(&self, graph: &Graph) -> Result<(), ScheduleError> {
        let n = graph.len();
        for (table, found) in [
            ("node_stage", self.node_stage.len()),
            ("node_group", self.node_group.len()),
            ("node_device", self.node_device.len()),
            ("order", self.order.len()),
        ] {
            if found != n {
                return Err(ScheduleError::Length {
                    table,
                    found,
                    nodes: n,
                });
            }
        }
        let mut count = vec![0u32; n];
        for (gi, grp) in self.groups.iter().enumerate() {
            for &v in &grp.nodes {
                let Some(c) = count.get_mut(v.index()) else {
                    return Err(ScheduleError::NotPlacedOnce(v));
                };
                *c += 1;
                if self.node_group[v.index()] as usize != gi
                    || self.node_stage[v.index()] != grp.stage
                    || self.node_device[v.index()] != grp.device
                {
                    return Err(ScheduleError::GroupMismatch(v));
                }
            }
        }
        if let Some(v) = count.iter().position(|&c| c != 1) {
            return Err(ScheduleError::NotPlacedOnce(NodeId(v as u32)));
        }
        for (i, d) in self.node_device.iter().enumerate() {
            if d.index() >= self.device_names.len() {
                return Err(ScheduleError::UnknownDevice {
                    node: NodeId(i as u32),
                    device: *d,
                });
            }
        }
        for (si, st) in self.stages.iter().enumerate() {
            for &g in &st.groups {
                match self.groups.get(g as usize) {
                    Some(grp) if grp.stage as usize == si => {}
                    Some(grp) => {
                        return Err(ScheduleError::GroupMismatch(
                            grp.nodes.first().copied().unwrap_or_default(),
                        ))
                    }
                    None => return Err(ScheduleError::NotPlacedOnce(NodeId(0))),
                }
            }
        }
        let mut pos = vec![u32::MAX; n];
        for (i, v) in self.order.iter().enumerate() {
            match pos.get_mut(v.index()) {
                Some(p) if *p == u32::MAX => *p = i as u32,
                _ => return Err(ScheduleError::BadOrder(*v)),
            }
        }
        let mut rc: Vec<(NodeId, DeviceId)> =
            self.recompute.iter().map(|r| (r.node, r.device)).collect();
        rc.sort_unstable();
        let recomputed = |node: NodeId, d: DeviceId| rc.binary_search(&(node, d)).is_ok();
        let mut transfers: Vec<(TensorRef, DeviceId)> =
            self.transfers.iter().map(|t| (t.tensor, t.dst)).collect();
        transfers.sort_unstable();
        for t in &self.transfers {
            let ok = graph.tensor(t.tensor).is_some_and(|m| m.bytes() == t.bytes)
                && self.node_device.get(t.tensor.node.index()) == Some(&t.src)
                && t.src != t.dst;
            if !ok {
                return Err(ScheduleError::BadTransfer {
                    tensor: t.tensor,
                    dst: t.dst,
                });
            }
        }
        for node in graph.nodes() {
            let v = node.id;
            let d = self.node_device[v.index()];
            for t in &node.inputs {
                let u = t.node;
                if self.node_stage[v.index()] <= self.node_stage[u.index()] {
                    return Err(ScheduleError::StageOrder {
                        node: v,
                        stage: self.node_stage[v.index()],
                        producer: u,
                        producer_stage: self.node_stage[u.index()],
                    });
                }
                if pos[u.index()] >= pos[v.index()] {
                    return Err(ScheduleError::BadOrder(v));
                }
                if self.node_device[u.index()] != d
                    && transfers.binary_search(&(*t, d)).is_err()
                    && !recomputed(u, d)
                {
                    return Err(ScheduleError::MissingTransfer { tensor: *t, dst: d });
                }
            }
        }
        for grp in &self.colocation_groups {
            if let Some(first) = grp.first() {
                let d = self.node_device.get(first.index());
                if grp.iter().any(|v| self.node_device.get(v.index()) != d) {
                    return Err(ScheduleError::ColocationViolated(*first));
                }
            }
        }
        Ok(())
    }

    /// Total bytes of all transfers (saturating at `u64::MAX`).
    pub fn transfer_bytes(&self) -> u64 {
        self.transfers
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.bytes))
    }

    /// Serializes to pretty JSON.
    pub fn to_json(&self) -> Result<String, crate::Error> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < U.len() {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.1} {}", U[i])
}

impl fmt::Display for ExecutionSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let graph = self.metadata.get("graph").map_or("?", String::as_str);
        writeln!(
            f,
            "schedule of `{graph}`: {} nodes, strategy {:?}, policy {:?}, {} stages, {} groups",
            self.node_device.len(),
            self.strategy,
            self.policy,
            self.stages.len(),
            self.groups.len()
        )?;
        writeln!(f, "  predicted makespan: {:.3} ms", self.makespan_s * 1e3)?;
        writeln!(f, "  {:<12} {:>8} {:>12}", "device", "nodes", "peak memory")?;
        for (i, name) in self.device_names.iter().enumerate() {
            let nodes = self.node_device.iter().filter(|d| d.index() == i).count();
            let peak = self.peak_memory.get(i).copied().unwrap_or(0);
            if nodes > 0 {
                writeln!(f, "  {name:<12} {nodes:>8} {:>12}", human_bytes(peak))?;
            }
        }
        writeln!(
            f,
            "  transfers: {} ({}), recomputed producers: {}, co-location groups: {}",
            self.transfers.len(),
            human_bytes(self.transfer_bytes()),
            self.recompute.len(),
            self.colocation_groups.len()
        )?;
        for (k, v) in &self.metadata {
            writeln!(f, "  {k}: {v}")?;
        }
        Ok(())
    }
}
