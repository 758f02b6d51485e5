//! The executor: one run of this worker's part of a graph, in dataflow order, posting each
//! output another worker consumes the moment its producer finishes.

use super::clock::{wall_us, WallClock};
use super::notify::{epoch_of, notification, Arrival, Inbound, Inbox, TRANSFER_BITS};
use super::regions::{region_size, Staging};
use super::{bad_from_driver, Kept, Worker, INPUT_TIMEOUT};
use crate::control::terr;
use crate::error::{Result, RuntimeError};
use crate::kernels::{tensor_from_bytes, tensor_to_bytes};
use crate::limits::{self, within_budget};
use crate::plan::ExecPlan;
use crate::proto::{self, ComputeRecord, PayloadTensor, RunStats};
use crate::store::{Residency as StoreResidency, TensorStore};
use candle_core::Tensor;
use genie_scheduler::dispatch::{DependencyCounters, TaskGraph};
use genie_scheduler::graph::{Graph, Node, NodeId, OpKind, TensorMeta, TensorRef};
use genie_transport::{Op, TransportError};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

impl Worker {
    pub(super) fn execute(
        &mut self,
        run: u64,
        kept: &mut Kept,
        (seqs, spans, acks_later): (&[u64], bool, bool),
        inputs: &[PayloadTensor],
        payload: &[u8],
        wanted: &[TensorRef],
    ) -> Result<(Vec<PayloadTensor>, Vec<u8>, RunStats)> {
        let t0 = WallClock::now();
        let Kept {
            graph,
            placement,
            plan,
            tasks,
        } = kept;
        self.sync_links();
        let plan = plan.get(graph, placement, wanted)?;
        let me = self.me;
        let mut input_tensors: HashMap<String, Tensor> = HashMap::new();
        let input_nodes: HashMap<&str, &Node> = if inputs.is_empty() {
            HashMap::new()
        } else {
            graph
                .nodes()
                .iter()
                .filter(|n| matches!(n.op, OpKind::Input))
                .map(|n| (n.name.as_str(), n))
                .collect()
        };
        for t in inputs {
            // An input must be one of the graph's Input nodes, with exactly its shape: the
            // kernels trust the graph's metadata.
            let node = input_nodes
                .get(t.name.as_str())
                .ok_or_else(|| bad_from_driver(format!("graph has no input `{}`", t.name)))?;
            if node.outputs.first() != Some(&t.meta) {
                return Err(bad_from_driver(format!(
                    "input `{}` has shape {} but the graph's input is {}",
                    t.name,
                    t.meta,
                    node.outputs
                        .first()
                        .map_or_else(|| "missing".into(), |m| m.to_string())
                )));
            }
            let bytes = proto::payload_slice(payload, t, "driver")?;
            input_tensors.insert(t.name.clone(), tensor_from_bytes(&t.meta, bytes)?);
        }
        for (&(src, dst), &bytes) in &plan.link_bytes {
            if src == me || dst == me {
                within_budget(
                    &self.name,
                    "the region of one link",
                    region_size(bytes),
                    self.opts.memory_budget,
                )?;
            }
        }
        // Notifications carry the run's epoch above the transfer id.
        if plan.transfers.len() > 1 << TRANSFER_BITS {
            return Err(RuntimeError::Plan(format!(
                "a run moves at most {} tensors between workers, this one {}",
                1u32 << TRANSFER_BITS,
                plan.transfers.len()
            )));
        }
        // Landing regions for peers that send to us; tell them where.
        let senders: BTreeSet<usize> = plan
            .transfers
            .iter()
            .filter(|t| t.dst == me)
            .map(|t| t.src)
            .collect();
        let receivers: BTreeSet<usize> = plan
            .transfers
            .iter()
            .filter(|t| t.src == me)
            .map(|t| t.dst)
            .collect();
        // This run rewrites its staging regions: earlier transfers from them must be over.
        self.settle_sends(&receivers)?;
        let landing = self.landing_regions(run, plan, &senders)?;
        let staging = self.staging_regions(plan, &receivers)?;
        // What each sending peer will deliver, and where it lands.
        let mut from = Vec::new();
        for &src in &senders {
            let specs: HashMap<u32, (TensorMeta, u64)> = plan
                .transfers
                .iter()
                .filter(|t| t.src == src && t.dst == me)
                .filter_map(|t| Some((t.id, (graph.tensor(t.tensor)?.clone(), t.dst_offset))))
                .collect();
            let region = landing.get(&src).cloned().ok_or_else(|| {
                RuntimeError::Plan(format!("no landing region for {}", self.peer_name(src)))
            })?;
            from.push(Inbound {
                peer: self.peer_name(src),
                conn: self.peer(src)?,
                region,
                specs,
            });
        }
        let store = TensorStore::new(self.name.clone());
        let driver = self.driver.clone();
        let mut ctx = RunCtx {
            w: self,
            graph,
            plan,
            seqs,
            inputs: input_tensors,
            store,
            inbox: Inbox {
                from,
                turn: 0,
                t0,
                epoch: epoch_of(run),
                driver,
            },
            arrived: HashMap::new(),
            stats: RunStats::default(),
            spans,
            t0,
            kv_layers: None,
        };
        let pending = ctx.run_nodes(tasks, &staging, placement.overlap)?;
        if acks_later {
            let unacked = pending.into_iter().map(|(peer, op)| Unacked {
                run,
                peer,
                op,
                report: true,
            });
            ctx.w.unacked.extend(unacked);
        } else {
            for (dst, op) in pending {
                op.wait(INPUT_TIMEOUT)
                    .map_err(|e| terr(&ctx.w.peer_name(dst), e))?;
            }
        }
        // Wanted outputs produced here.
        let mut outputs = Vec::new();
        let mut out_payload = Vec::new();
        for t in wanted {
            if plan.worker_of.get(t.node.index()) != Some(&me) {
                continue;
            }
            let tensor = ctx.store.consume(&key(t))?;
            let bytes = tensor_to_bytes(&tensor)?;
            let meta = graph
                .tensor(*t)
                .cloned()
                .ok_or_else(|| RuntimeError::Plan(format!("no metadata for {t:?}")))?;
            outputs.push(PayloadTensor {
                name: String::new(),
                tensor: Some(*t),
                meta,
                offset: out_payload.len() as u64,
                len: bytes.len() as u64,
            });
            out_payload.extend_from_slice(&bytes);
        }
        ctx.stats.peak_store_bytes = ctx.store.peak_bytes() as u64;
        ctx.stats.arrived = ctx.arrived.into_iter().collect();
        Ok((outputs, out_payload, ctx.stats))
    }
}

/// A transfer a run answered before its peer acknowledged it ([`Msg::Run`]'s `acks_later`).
///
/// [`Msg::Run`]: crate::proto::Msg::Run
pub(super) struct Unacked {
    /// The run that posted it.
    run: u64,
    /// The receiving peer.
    peer: usize,
    op: Op,
    /// Whether its failure fails a later run (false once the driver session that ran it ended:
    /// then it is only logged).
    pub(super) report: bool,
}

impl Worker {
    /// Settles the transfers earlier runs left unacknowledged ([`settle`]): waits for those to
    /// `peers` (a run about to rewrite its staging regions for them), drops the others that
    /// completed, and fails with the first that failed (a transport error, or the peer named
    /// when its connection is gone, see [`terr`]).
    pub(super) fn settle_sends(&mut self, peers: &BTreeSet<usize>) -> Result<()> {
        let unacked = std::mem::take(&mut self.unacked);
        let (left, failed) = settle(unacked, peers, INPUT_TIMEOUT, &self.name);
        self.unacked = left;
        match failed {
            None => Ok(()),
            Some((run, peer, e)) => Err(match terr(&self.peer_name(peer), e) {
                RuntimeError::WorkerFailed { worker, reason } => RuntimeError::WorkerFailed {
                    worker,
                    reason: format!("a transfer of run {run} to it failed: {reason}"),
                },
                other => other,
            }),
        }
    }
}

/// Settles `unacked` transfers: waits up to `wait` for those to `peers`, polls the others.
/// Returns the ones still in flight (a wait that timed out keeps its transfer, and is the
/// failure) and the first failure to report (run, peer, error); a failure of an earlier
/// session's transfer is only logged (for worker `name`).
fn settle(
    unacked: Vec<Unacked>,
    peers: &BTreeSet<usize>,
    wait: Duration,
    name: &str,
) -> (Vec<Unacked>, Option<(u64, usize, TransportError)>) {
    let mut failed = None;
    let mut left = Vec::new();
    for u in unacked {
        let done = if peers.contains(&u.peer) {
            Some(u.op.wait(wait))
        } else {
            u.op.poll()
        };
        match done {
            None => left.push(u),
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let (run, peer, report) = (u.run, u.peer, u.report);
                if matches!(e, TransportError::Timeout { .. }) {
                    left.push(u);
                }
                if report && failed.is_none() {
                    failed = Some((run, peer, e));
                } else {
                    tracing::warn!(worker = %name, run, peer, error = %e, report,
                        "a transfer answered before it was acknowledged failed");
                }
            }
        }
    }
    (left, failed)
}

/// A tensor's key in a run's store (no string formatting per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key(TensorRef);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0.node.0, self.0.output)
    }
}

/// A node's first output's metadata.
pub(super) fn first_output(node: &Node) -> Result<&TensorMeta> {
    node.outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan(format!("{} has no output", node.name)))
}

pub(super) fn key(t: &TensorRef) -> Key {
    Key(*t)
}

pub(super) struct RunCtx<'a> {
    pub(super) w: &'a mut Worker,
    pub(super) graph: &'a Graph,
    pub(super) plan: &'a ExecPlan,
    /// The run's sequences, by cache slot.
    pub(super) seqs: &'a [u64],
    pub(super) inputs: HashMap<String, Tensor>,
    pub(super) store: TensorStore<Key>,
    pub(super) inbox: Inbox,
    pub(super) arrived: HashMap<u32, f64>,
    pub(super) stats: RunStats,
    /// Whether to record each node's compute span.
    pub(super) spans: bool,
    pub(super) t0: WallClock,
    /// Layers of the run's KV caches, once counted (see `kv_manager`).
    pub(super) kv_layers: Option<usize>,
}

impl<'a> RunCtx<'a> {
    pub(super) fn node(&self, id: NodeId) -> Result<&'a Node> {
        self.graph
            .node(id)
            .ok_or_else(|| RuntimeError::Plan(format!("missing node {id}")))
    }

    pub(super) fn us(&self) -> f64 {
        wall_us(self.t0)
    }

    /// Runs this worker's nodes; returns the transfers still in flight.
    ///
    /// Dataflow order with the scheduler's dispatcher counters ([`DependencyCounters`]): a node
    /// becomes ready when its last local producer finishes or its last remote input lands;
    /// among ready nodes the earliest in topological order runs first. When nothing is ready
    /// the worker blocks on the next arrival.
    fn run_nodes(
        &mut self,
        tasks: &TaskGraph,
        staging: &Staging,
        overlap: bool,
    ) -> Result<Vec<(usize, Op)>> {
        let me = self.w.me;
        let mut pending = Vec::new();
        let counters = DependencyCounters::new(tasks);
        let n = self.graph.len();
        let mut pos = vec![0usize; n];
        for (p, id) in self.plan.order.iter().enumerate() {
            if let Some(slot) = pos.get_mut(id.index()) {
                *slot = p;
            }
        }
        let local = |i: usize| !self.plan.replicated[i] && self.plan.worker_of[i] == me;
        let mut ready: BinaryHeap<Reverse<(usize, u32)>> = BinaryHeap::new();
        let mut left = (0..n).filter(|&i| local(i)).count();
        for r in tasks.roots() {
            if local(r as usize) {
                ready.push(Reverse((pos[r as usize], r)));
            }
        }
        // Parameters, inputs and recomputed nodes are available from the start.
        for i in 0..n {
            if self.plan.replicated[i] {
                counters.complete(tasks, i as u32, |c| {
                    if local(c as usize) {
                        ready.push(Reverse((pos[c as usize], c)));
                    }
                });
            }
        }
        // Remote producers complete (for this worker) when all their transfers to it landed.
        let mut awaiting: HashMap<u32, usize> = HashMap::new();
        for t in self.plan.transfers.iter().filter(|t| t.dst == me) {
            *awaiting.entry(t.tensor.node.0).or_default() += 1;
        }
        while left > 0 {
            // Absorb whatever has landed, without blocking while there is work.
            loop {
                let arrival = if ready.is_empty() {
                    match self.inbox.next(INPUT_TIMEOUT)? {
                        Some(a) => a,
                        None => {
                            return Err(RuntimeError::WorkerFailed {
                                worker: self.waited_on(&awaiting),
                                reason: format!("no input arrived within {INPUT_TIMEOUT:?}"),
                            })
                        }
                    }
                } else {
                    match self.inbox.try_next()? {
                        Some(a) => a,
                        None => break,
                    }
                };
                let producer = self.absorb(arrival)?;
                let done = awaiting.get_mut(&producer).is_some_and(|c| {
                    *c -= 1;
                    *c == 0
                });
                if done {
                    counters.complete(tasks, producer, |c| {
                        if local(c as usize) {
                            ready.push(Reverse((pos[c as usize], c)));
                        }
                    });
                }
            }
            let Some(Reverse((_, task))) = ready.pop() else {
                continue;
            };
            left -= 1;
            let id = NodeId(task);
            let node = self.node(id)?;
            let outs = self.compute(node, false)?;
            for (o, t) in outs.into_iter().enumerate() {
                let tref = TensorRef::new(id, o as u32);
                if let Some(ids) = self.plan.outgoing.get(&tref) {
                    let bytes = tensor_to_bytes(&t)?;
                    for &tid in ids {
                        let spec = &self.plan.transfers[tid as usize];
                        let peer = self.w.peer_name(spec.dst);
                        let (local, remote, conn) = staging.get(&spec.dst).ok_or_else(|| {
                            RuntimeError::Plan(format!("no staging region for {peer}"))
                        })?;
                        local
                            .write(spec.src_offset as usize, &bytes)
                            .map_err(|e| terr(&peer, e))?;
                        self.stats.posted.push((tid, self.us()));
                        let op = conn
                            .write_notify(
                                local,
                                spec.src_offset as usize,
                                remote,
                                spec.dst_offset,
                                bytes.len(),
                                notification(self.inbox.epoch, tid),
                            )
                            .map_err(|e| terr(&peer, e))?;
                        if overlap {
                            pending.push((spec.dst, op));
                        } else {
                            op.wait(INPUT_TIMEOUT).map_err(|e| terr(&peer, e))?;
                        }
                    }
                }
                let uses = self.plan.uses.get(&(tref, me)).copied().unwrap_or(0);
                self.store
                    .insert(key(&tref), t, StoreResidency::Ephemeral { remaining: uses });
            }
            counters.complete(tasks, task, |c| {
                if local(c as usize) {
                    ready.push(Reverse((pos[c as usize], c)));
                }
            });
        }
        Ok(pending)
    }

    /// The worker a blocked run is waiting on (the first with transfers still due).
    fn waited_on(&self, awaiting: &HashMap<u32, usize>) -> String {
        self.plan
            .transfers
            .iter()
            .find(|t| t.dst == self.w.me && awaiting.get(&t.tensor.node.0).is_some_and(|c| *c > 0))
            .map_or_else(|| "unknown".into(), |t| self.w.peer_name(t.src))
    }

    /// Stores a landed tensor; returns its producer node.
    fn absorb(&mut self, arrival: Arrival) -> Result<u32> {
        let spec = self
            .plan
            .transfers
            .get(arrival.id as usize)
            .ok_or_else(|| RuntimeError::Plan(format!("unknown transfer {}", arrival.id)))?;
        let uses = self
            .plan
            .uses
            .get(&(spec.tensor, self.w.me))
            .copied()
            .unwrap_or(0);
        let (k, producer) = (key(&spec.tensor), spec.tensor.node.0);
        self.store.insert(
            k,
            arrival.tensor,
            StoreResidency::Ephemeral { remaining: uses },
        );
        self.arrived.insert(arrival.id, arrival.at_us);
        Ok(producer)
    }

    /// Computes a node here (a replicated one on demand when `recompute`).
    fn compute(&mut self, node: &Node, recompute: bool) -> Result<Vec<Tensor>> {
        let mut ins = Vec::with_capacity(node.inputs.len());
        for t in &node.inputs {
            ins.push(self.fetch(t)?);
        }
        // What the node will add to the run's store, checked before the kernel allocates it.
        let mut out_bytes = 0u64;
        for (o, meta) in node.outputs.iter().enumerate() {
            out_bytes = out_bytes.saturating_add(limits::tensor_bytes(&node.name, o, meta)?);
        }
        limits::within_budget_of(
            &self.w.name,
            || format!("node `{}` with the run's live tensors", node.name),
            out_bytes.saturating_add(self.store.bytes() as u64),
            self.w.opts.memory_budget,
        )?;
        let _span = tracing::debug_span!("node", name = %node.name).entered();
        let start = if self.spans { self.us() } else { 0.0 };
        let outs = match &node.op {
            OpKind::KvCache { layer, slot } => {
                vec![self.kv_read(node, *layer as usize, *slot)?]
            }
            OpKind::KvCacheAppend if self.appends_in_place(node) => {
                vec![self.kv_append_in_place(node, &ins)?]
            }
            OpKind::CachedAttention { .. } => vec![self.kv_cached_attention(node, &ins)?],
            _ => {
                let outs = self.w.kernels.run(node, &ins)?;
                if matches!(node.op, OpKind::KvCacheAppend) {
                    if let Some(t) = outs.first() {
                        self.kv_write(node, t)?;
                    }
                }
                outs
            }
        };
        self.stats.nodes += 1;
        if recompute {
            self.stats.recomputes += 1;
        }
        if self.spans {
            let end = self.us();
            self.stats.compute.push(ComputeRecord {
                node: node.id.0,
                start_us: start,
                dur_us: end - start,
            });
        }
        Ok(outs)
    }

    /// One read of `t` by a node on this worker.
    fn fetch(&mut self, t: &TensorRef) -> Result<Tensor> {
        let i = t.node.index();
        let node = self.node(t.node)?;
        match &node.op {
            OpKind::Parameter { .. } => {
                if let Some(w) = self.w.weight_cache.get(&node.name) {
                    self.stats.cache_hits += 1;
                    return Ok(w.clone());
                }
                let src = self.w.weights.as_ref().ok_or_else(|| {
                    RuntimeError::Plan("no weight source (Setup not received)".into())
                })?;
                // Sizes were checked against the budget with the graph; the cache as a whole
                // is held to it too (a driver may name many large parameters).
                let bytes = limits::tensor_bytes(&node.name, 0, first_output(node)?)?;
                let budget = self.w.opts.memory_budget;
                within_budget(
                    &self.w.name,
                    &format!("parameter `{}`", node.name),
                    bytes,
                    budget,
                )?;
                let v = src.value(node)?;
                if self.w.weight_cache_bytes.saturating_add(bytes) > budget {
                    self.w.weight_cache.clear();
                    self.w.weight_cache_bytes = 0;
                }
                self.w.weight_cache_bytes += bytes;
                self.w.weight_cache.insert(node.name.clone(), v.clone());
                return Ok(v);
            }
            OpKind::Input => {
                return self.inputs.get(&node.name).cloned().ok_or_else(|| {
                    RuntimeError::MissingTensor {
                        worker: self.w.name.clone(),
                        tensor: node.name.clone(),
                    }
                })
            }
            _ => {}
        }
        if self.plan.replicated[i] {
            let outs = self.compute(node, self.plan.worker_of[i] != self.w.me)?;
            return outs.into_iter().nth(t.output as usize).ok_or_else(|| {
                RuntimeError::Plan(format!("{} has no output {}", node.name, t.output))
            });
        }
        let k = key(t);
        if self.plan.worker_of[i] != self.w.me && !self.store.contains(&k) {
            // The dispatcher only readies a node once all its remote inputs landed.
            return Err(RuntimeError::Plan(format!(
                "remote input `{}` used before it arrived",
                node.name
            )));
        }
        self.store.consume(&k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genie_transport::PollMode;

    fn unacked(run: u64, peer: usize, op: Op, report: bool) -> Unacked {
        Unacked {
            run,
            peer,
            op,
            report,
        }
    }

    fn closed() -> TransportError {
        TransportError::ConnectionClosed {
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
        }
    }

    /// Transfers answered before they were acknowledged: settling keeps those in flight to
    /// other peers, waits for those to the peers a run sends to (and keeps one whose wait ran
    /// out, as the failure), drops the completed, and reports the first failure of this
    /// session's (an earlier session's is dropped, not reported).
    #[test]
    fn unacknowledged_transfers_are_settled_before_staging_is_reused() {
        let mode = PollMode::Blocking;
        let (in_flight, _keep) = Op::new(mode, Vec::new());
        let (landing, completer) = Op::new(mode, Vec::new());
        let list = vec![
            unacked(1, 1, Op::done(), true),
            unacked(2, 1, in_flight, true),
            unacked(3, 2, landing, true),
            unacked(4, 3, Op::failed(mode, closed()), false),
        ];
        // The transfer to peer 2 lands while the run that sends there waits for it.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            completer.complete(Ok(()));
        });
        let peers = BTreeSet::from([2]);
        let (left, failed) = settle(list, &peers, Duration::from_secs(10), "w0");
        t.join().unwrap();
        assert!(failed.is_none(), "{failed:?}");
        assert_eq!(left.iter().map(|u| u.run).collect::<Vec<_>>(), [2]);

        // A failed transfer of this session is reported, whatever the peers.
        let mut left = left;
        left.push(unacked(5, 4, Op::failed(mode, closed()), true));
        let (left, failed) = settle(left, &BTreeSet::new(), Duration::ZERO, "w0");
        assert!(matches!(
            failed,
            Some((5, 4, TransportError::ConnectionClosed { .. }))
        ));
        assert_eq!(left.iter().map(|u| u.run).collect::<Vec<_>>(), [2]);
        // Run 2's transfer is still in flight when a run sends to peer 1: the wait runs out,
        // the run fails, and the transfer stays to be settled.
        let (left, failed) = settle(left, &BTreeSet::from([1]), Duration::from_millis(10), "w0");
        assert!(matches!(
            failed,
            Some((2, 1, TransportError::Timeout { .. }))
        ));
        assert_eq!(left.iter().map(|u| u.run).collect::<Vec<_>>(), [2]);
    }
}
