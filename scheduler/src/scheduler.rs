//! The [`Scheduler`]: analysis → costs → placement → constraints → recompute → schedule, with a
//! cache.
//!
//! The cache key is `(graph structural hash, topology version, plan hash)`. The graph hash is
//! computed once per graph value ([`Graph::structural_hash`]), so a repeated request costs a hash
//! of the (small) plan and one map lookup.

use crate::analysis::{analyze_with, Analysis, WorkloadClass};
use crate::constraints::{fit_memory, CoLocation, MemoryFit};
use crate::cost::{CostModel, RooflineCostModel};
use crate::graph::{Consumers, Graph, NodeId, Residency};
use crate::placement::{CostTable, EdgeTable, PlacementContext, PolicyKind};
use crate::recompute::choose_recompute;
use crate::schedule::{
    CacheAction, CacheDirective, ExecGroup, ExecutionSchedule, Recompute, ScheduledTransfer, Stage,
    Strategy,
};
use crate::topology::{DeviceId, Topology};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hints that shape a schedule. [`Default`] lets the scheduler choose everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizationPlan {
    /// Execution strategy; `None` picks one from the workload and cluster.
    pub strategy: Option<Strategy>,
    /// Placement policy; `None` follows the strategy.
    pub policy: Option<PolicyKind>,
    /// Extra co-location groups, by node name.
    pub colocate: Vec<Vec<String>>,
    /// Cap on every device's memory, bytes.
    pub memory_cap_bytes: Option<u64>,
    /// Only these devices (by name); `None` allows all.
    pub devices: Option<Vec<String>>,
    /// Turn off recompute-versus-transfer decisions.
    pub no_recompute: bool,
    /// The device (by name) that holds the KV caches: every KV-cache node goes there with its
    /// co-location group, whatever `devices` says. A serving engine names its decode worker, so
    /// that a prefill placed elsewhere builds the caches where decode will read them.
    pub kv_device: Option<String>,
}

/// Counters of a [`Scheduler`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStats {
    /// Schedules computed (cache misses).
    pub created: u64,
    /// Requests answered from the cache.
    pub cache_hits: u64,
    /// Time spent computing schedules (misses only).
    pub total_time: Duration,
    /// `total_time / created`.
    pub avg_time: Duration,
}

type CacheKey = (u64, u64, u64);

/// Makes schedules for graphs on one topology.
pub struct Scheduler {
    topology: Topology,
    cost_model: Box<dyn CostModel>,
    cache: HashMap<CacheKey, Arc<ExecutionSchedule>>,
    stats: SchedulerStats,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("devices", &self.topology.len())
            .field("version", &self.topology.version())
            .field("cached", &self.cache.len())
            .field("stats", &self.stats)
            .finish()
    }
}

struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl Scheduler {
    /// A scheduler over `topology` with the roofline cost model.
    pub fn new(topology: Topology) -> Self {
        Self::with_cost_model(topology, Box::new(RooflineCostModel))
    }

    /// A scheduler with a custom cost model.
    pub fn with_cost_model(topology: Topology, cost_model: Box<dyn CostModel>) -> Self {
        Self {
            topology,
            cost_model,
            cache: HashMap::new(),
            stats: SchedulerStats::default(),
        }
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Mutable topology (calibration, load updates); changes bump its version, which misses the
    /// cache from then on.
    pub fn topology_mut(&mut self) -> &mut Topology {
        &mut self.topology
    }

    /// Counters.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Drops all cached schedules.
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// A schedule for `graph` under `plan`, from the cache when the graph structure, topology
    /// version and plan match an earlier request. A miss validates the graph first
    /// ([`Graph::validate`]) and returns [`Error::Graph`] for a malformed one.
    pub fn create_schedule(
        &mut self,
        graph: &Graph,
        plan: &OptimizationPlan,
    ) -> Result<Arc<ExecutionSchedule>, Error> {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        plan.hash(&mut h);
        let key = (graph.structural_hash(), self.topology.version(), h.finish());
        if let Some(s) = self.cache.get(&key) {
            self.stats.cache_hits += 1;
            tracing::trace!(graph = %graph.name, "schedule cache hit");
            return Ok(Arc::clone(s));
        }
        let start = Instant::now();
        let s = Arc::new(build_schedule(
            graph,
            &self.topology,
            self.cost_model.as_ref(),
            plan,
        )?);
        let took = start.elapsed();
        self.stats.created += 1;
        self.stats.total_time += took;
        self.stats.avg_time = self.stats.total_time / self.stats.created.max(1) as u32;
        tracing::info!(
            graph = %graph.name,
            nodes = graph.len(),
            strategy = ?s.strategy,
            policy = ?s.policy,
            makespan_ms = s.makespan_s * 1e3,
            transfers = s.transfers.len(),
            recompute = s.recompute.len(),
            micros = took.as_micros() as u64,
            "schedule created"
        );
        self.cache.insert(key, Arc::clone(&s));
        Ok(s)
    }
}

fn choose_strategy(plan: &OptimizationPlan, analysis: &Analysis, devices: usize) -> Strategy {
    if let Some(s) = plan.strategy {
        return s;
    }
    if devices <= 1 {
        return Strategy::Sequential;
    }
    match plan.policy {
        Some(PolicyKind::SingleDevice) => Strategy::Sequential,
        Some(PolicyKind::Pipeline) => Strategy::Pipeline,
        Some(_) => Strategy::Parallel,
        None if analysis.workload == WorkloadClass::Vision => Strategy::Pipeline,
        None => Strategy::Parallel,
    }
}

fn choose_policy(plan: &OptimizationPlan, strategy: Strategy, heterogeneous: bool) -> PolicyKind {
    if let Some(p) = plan.policy {
        return p;
    }
    match strategy {
        Strategy::Sequential => PolicyKind::SingleDevice,
        Strategy::Pipeline => PolicyKind::Pipeline,
        Strategy::Parallel if heterogeneous => PolicyKind::Heterogeneous,
        Strategy::Parallel | Strategy::Dynamic | Strategy::Priority => PolicyKind::Heft,
    }
}

/// Computes a schedule without caching (what [`Scheduler::create_schedule`] does on a miss),
/// after validating the graph.
///
/// The phases: analyse the graph; choose devices, strategy and policy; place, then apply the
/// co-location groups, the KV-cache device and the memory capacities; choose what to recompute;
/// simulate the placement for finish times; derive transfers, stages and caching directives.
pub fn build_schedule(
    graph: &Graph,
    topology: &Topology,
    cost_model: &dyn CostModel,
    plan: &OptimizationPlan,
) -> Result<ExecutionSchedule, Error> {
    // Graphs may come from files or other frontends: check before indexing by their ids.
    graph.validate()?;
    let n = graph.len();
    let consumers = graph.consumers();
    let edges = EdgeTable::new(graph);
    let topo_order = if edges.is_id_ordered() {
        (0..n as u32).map(NodeId).collect()
    } else {
        graph.topo_order()?
    };
    let analysis = analyze_with(graph, &consumers);

    let devices = plan_devices(plan, topology)?;
    let strategy = choose_strategy(plan, &analysis, devices.len());
    let policy_kind = choose_policy(plan, strategy, is_heterogeneous(topology, &devices));

    let extra = explicit_groups(graph, plan)?;
    let groups = CoLocation::build(graph, &analysis, &consumers, &extra);
    let costs = CostTable::new(graph, topology, cost_model);
    let cx = PlacementContext {
        graph,
        consumers: &consumers,
        edges: &edges,
        analysis: &analysis,
        topology,
        costs: &costs,
        devices: &devices,
        groups: &groups,
        topo_order: &topo_order,
        use_priority: strategy == Strategy::Priority,
    };
    let placement = policy_kind.policy().place(&cx);
    let mut device = placement.device;
    let order = placement.order;
    groups.enforce(&mut device, &devices, |v, d| costs.time(v, d));
    let mut devices = devices;
    if let Some(name) = &plan.kv_device {
        pin_kv_caches(
            name,
            topology,
            &analysis,
            &groups,
            &mut device,
            &mut devices,
        )?;
    }

    let fit = fit_memory(
        graph,
        &consumers,
        &analysis.residency,
        &groups,
        &order,
        &mut device,
        &devices,
        &capacities(topology, plan),
        |d| {
            topology
                .device(d)
                .map_or_else(|| d.to_string(), |x| x.name.clone())
        },
    )?;

    let recompute = if plan.no_recompute {
        Vec::new()
    } else {
        choose_recompute(graph, topology, &costs, &analysis.residency, &device)
    };
    let recomputed = RecomputeLookup::new(n, &recompute);
    let finish = finish_times(&order, &device, &edges, &costs, topology, &recomputed);
    let makespan_s = finish.iter().copied().fold(0.0, f64::max);
    let transfers = transfers(graph, &device, &finish, &recomputed);
    let levels = StageGroups::new(graph, &topo_order, &order, &device);
    let caching = caching(graph, &consumers, &analysis.residency, &order, &device);
    let metadata = metadata(graph, topology, &analysis, &fit);

    Ok(ExecutionSchedule {
        strategy,
        policy: policy_kind,
        device_names: topology.devices().iter().map(|d| d.name.clone()).collect(),
        stages: levels.stages,
        groups: levels.groups,
        node_stage: levels.node_stage,
        node_group: levels.node_group,
        node_device: device,
        order,
        transfers,
        caching,
        recompute,
        colocation_groups: groups
            .multi_member_groups()
            .map(<[NodeId]>::to_vec)
            .collect(),
        peak_memory: fit.peak,
        makespan_s,
        metadata,
    })
}

/// The devices the plan allows (all of the topology's when it names none), sorted, without
/// duplicates; an error if a name is unknown or none is left.
fn plan_devices(plan: &OptimizationPlan, topology: &Topology) -> Result<Vec<DeviceId>, Error> {
    let devices: Vec<DeviceId> = match &plan.devices {
        None => topology.devices().iter().map(|d| d.id).collect(),
        Some(names) => {
            let mut v = Vec::with_capacity(names.len());
            for name in names {
                let d = topology
                    .device_by_name(name)
                    .ok_or_else(|| Error::UnknownDevice { name: name.clone() })?;
                v.push(d.id);
            }
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    if devices.is_empty() {
        return Err(Error::NoDevices);
    }
    Ok(devices)
}

/// Whether the devices differ in their specs.
fn is_heterogeneous(topology: &Topology, devices: &[DeviceId]) -> bool {
    devices
        .windows(2)
        .any(|w| topology.device(w[0]).map(|d| &d.spec) != topology.device(w[1]).map(|d| &d.spec))
}

/// The plan's co-location groups, node names resolved to ids.
fn explicit_groups(graph: &Graph, plan: &OptimizationPlan) -> Result<Vec<Vec<NodeId>>, Error> {
    if plan.colocate.is_empty() {
        return Ok(Vec::new());
    }
    let by_name: HashMap<&str, NodeId> = graph
        .nodes()
        .iter()
        .map(|x| (x.name.as_str(), x.id))
        .collect();
    let mut out = Vec::with_capacity(plan.colocate.len());
    for grp in &plan.colocate {
        let mut ids = Vec::with_capacity(grp.len());
        for name in grp {
            ids.push(
                *by_name
                    .get(name.as_str())
                    .ok_or_else(|| Error::UnknownNode { name: name.clone() })?,
            );
        }
        out.push(ids);
    }
    Ok(out)
}

/// Moves every co-location group holding a KV cache to the device named `name`, which joins the
/// allowed `devices` if it was not among them.
fn pin_kv_caches(
    name: &str,
    topology: &Topology,
    analysis: &Analysis,
    groups: &CoLocation,
    device: &mut [DeviceId],
    devices: &mut Vec<DeviceId>,
) -> Result<(), Error> {
    let kv = topology
        .device_by_name(name)
        .ok_or_else(|| Error::UnknownDevice {
            name: name.to_owned(),
        })?
        .id;
    let kv_groups: std::collections::HashSet<u32> = analysis
        .residency
        .iter()
        .enumerate()
        .filter(|&(_, &r)| r == Residency::StatefulKvCache)
        .map(|(i, _)| groups.group_of(NodeId(i as u32)))
        .collect();
    for (i, d) in device.iter_mut().enumerate() {
        if kv_groups.contains(&groups.group_of(NodeId(i as u32))) {
            *d = kv;
        }
    }
    if !devices.contains(&kv) {
        devices.push(kv);
        devices.sort_unstable();
    }
    Ok(())
}

/// Memory capacity per device id: the device's memory, lowered to the plan's cap if it has one.
fn capacities(topology: &Topology, plan: &OptimizationPlan) -> Vec<u64> {
    topology
        .devices()
        .iter()
        .map(|d| {
            plan.memory_cap_bytes
                .map_or(d.spec.memory, |c| c.min(d.spec.memory))
        })
        .collect()
}

/// Whether a device recomputes a producer instead of receiving its output.
struct RecomputeLookup {
    /// (producer, device) pairs, sorted.
    pairs: Vec<(NodeId, DeviceId)>,
    /// Per node: recomputed on some device (skips the search for most nodes).
    any: Vec<bool>,
}

impl RecomputeLookup {
    fn new(n: usize, recompute: &[Recompute]) -> Self {
        let mut pairs: Vec<(NodeId, DeviceId)> =
            recompute.iter().map(|r| (r.node, r.device)).collect();
        pairs.sort_unstable();
        let mut any = vec![false; n];
        for r in recompute {
            any[r.node.index()] = true;
        }
        Self { pairs, any }
    }

    fn contains(&self, u: NodeId, d: DeviceId) -> bool {
        self.any[u.index()] && self.pairs.binary_search(&(u, d)).is_ok()
    }
}

/// Simulates the final placement in `order`: each node's finish time, seconds.
fn finish_times(
    order: &[NodeId],
    device: &[DeviceId],
    edges: &EdgeTable,
    costs: &CostTable,
    topology: &Topology,
    recomputed: &RecomputeLookup,
) -> Vec<f64> {
    let mut avail = vec![0.0f64; topology.len()];
    let mut finish = vec![0.0f64; device.len()];
    for &v in order {
        let d = device[v.index()];
        let mut ready = 0.0f64;
        let (prods, sizes) = edges.inputs(v);
        for (&u, &bytes) in prods.iter().zip(sizes) {
            let u = u as usize;
            let mut at = finish[u];
            if device[u] != d {
                if recomputed.contains(NodeId(u as u32), d) {
                    at += costs.time(NodeId(u as u32), d);
                } else {
                    at += topology.transfer_time(device[u], d, bytes);
                }
            }
            ready = ready.max(at);
        }
        let f = ready.max(avail[d.index()]) + costs.time(v, d);
        finish[v.index()] = f;
        avail[d.index()] = f;
    }
    finish
}

/// The transfers, one per (tensor, destination device) that does not recompute the producer.
fn transfers(
    graph: &Graph,
    device: &[DeviceId],
    finish: &[f64],
    recomputed: &RecomputeLookup,
) -> Vec<ScheduledTransfer> {
    let mut transfers: Vec<ScheduledTransfer> = Vec::new();
    for node in graph.nodes() {
        let d = device[node.id.index()];
        for t in &node.inputs {
            let src = device[t.node.index()];
            if src != d && !recomputed.contains(t.node, d) {
                transfers.push(ScheduledTransfer {
                    tensor: *t,
                    src,
                    dst: d,
                    bytes: graph.tensor(*t).map_or(0, |m| m.bytes()),
                    earliest_start_s: finish[t.node.index()],
                });
            }
        }
    }
    transfers.sort_by_key(|t| (t.tensor, t.dst));
    transfers.dedup_by(|a, b| a.tensor == b.tensor && a.dst == b.dst);
    transfers
}

/// Stages are dependency levels; a stage's groups are its nodes by device, in `order`.
struct StageGroups {
    stages: Vec<Stage>,
    groups: Vec<ExecGroup>,
    node_stage: Vec<u32>,
    node_group: Vec<u32>,
}

impl StageGroups {
    fn new(graph: &Graph, topo_order: &[NodeId], order: &[NodeId], device: &[DeviceId]) -> Self {
        let n = graph.len();
        let mut stage = vec![0u32; n];
        for &v in topo_order {
            let node = &graph.nodes()[v.index()];
            stage[v.index()] = node
                .inputs
                .iter()
                .map(|t| stage[t.node.index()] + 1)
                .max()
                .unwrap_or(0);
        }
        let n_stages = stage.iter().copied().max().map_or(0, |s| s as usize + 1);
        let mut group_index: HashMap<(u32, DeviceId), u32> = HashMap::new();
        let mut exec_groups: Vec<ExecGroup> = Vec::new();
        let mut node_group = vec![0u32; n];
        for &v in order {
            let key = (stage[v.index()], device[v.index()]);
            let gi = *group_index.entry(key).or_insert_with(|| {
                exec_groups.push(ExecGroup {
                    stage: key.0,
                    device: key.1,
                    nodes: Vec::new(),
                });
                exec_groups.len() as u32 - 1
            });
            exec_groups[gi as usize].nodes.push(v);
            node_group[v.index()] = gi;
        }
        let mut stages = vec![Stage { groups: Vec::new() }; n_stages];
        for (gi, g) in exec_groups.iter().enumerate() {
            stages[g.stage as usize].groups.push(gi as u32);
        }
        Self {
            stages,
            groups: exec_groups,
            node_stage: stage,
            node_group,
        }
    }
}

/// Caching: resident tensors and graph outputs are kept; others evicted after their last
/// consumer on each device holding a copy.
fn caching(
    graph: &Graph,
    consumers: &Consumers,
    residency: &[Residency],
    order: &[NodeId],
    device: &[DeviceId],
) -> Vec<CacheDirective> {
    let n = graph.len();
    let mut pos = vec![0u32; n];
    for (i, v) in order.iter().enumerate() {
        pos[v.index()] = i as u32;
    }
    let mut is_output = vec![false; n];
    for t in &graph.outputs {
        is_output[t.node.index()] = true;
    }
    let mut caching = Vec::with_capacity(n);
    let mut last: Vec<(DeviceId, NodeId)> = Vec::new();
    for node in graph.nodes() {
        if node.output_bytes() == 0 {
            continue;
        }
        let home = device[node.id.index()];
        let keep = is_output[node.id.index()]
            || residency[node.id.index()] != Residency::EphemeralActivation;
        last.clear();
        last.push((home, node.id));
        for &c in consumers.of(node.id) {
            let d = device[c.index()];
            match last.iter_mut().find(|(x, _)| *x == d) {
                Some(e) if pos[c.index()] > pos[e.1.index()] => e.1 = c,
                Some(_) => {}
                None => last.push((d, c)),
            }
        }
        for &(d, at) in &last {
            caching.push(CacheDirective {
                node: node.id,
                device: d,
                action: if keep && d == home {
                    CacheAction::Keep
                } else {
                    CacheAction::EvictAfter(at)
                },
            });
        }
    }
    caching
}

/// The schedule's metadata: graph name and hash, topology version, workload, memory moves.
fn metadata(
    graph: &Graph,
    topology: &Topology,
    analysis: &Analysis,
    fit: &MemoryFit,
) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    metadata.insert("graph".to_owned(), graph.name.clone());
    metadata.insert(
        "graph_hash".to_owned(),
        format!("{:016x}", graph.structural_hash()),
    );
    metadata.insert(
        "topology_version".to_owned(),
        topology.version().to_string(),
    );
    metadata.insert(
        "workload".to_owned(),
        format!("{:?}", analysis.workload).to_lowercase(),
    );
    metadata.insert("memory_moves".to_owned(), fit.moves.len().to_string());
    metadata
}
