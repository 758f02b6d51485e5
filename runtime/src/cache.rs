//! Graphs, placements and execution plans kept across runs.
//!
//! A driver sends a graph and its placement to a worker once ([`GraphRef::Define`]) and names
//! them by id afterwards ([`GraphRef::Cached`]); a run whose graph has the same structure but
//! differently shaped tensors (each decode step attends over one more position) carries only the
//! changed tensor metadata. Both ends keep the derived [`ExecPlan`] too, and derive it again only
//! when the wanted tensors change or a reshaped tensor crosses a link (its bytes and region
//! offsets change).
//!
//! The driver's side ([`SentGraphs`]) keeps one invariant for its caller: a worker marked as
//! keeping a graph holds exactly the driver's copy of it. [`SentGraphs::lookup`] brings the
//! driver's copy to a run's shapes at once, so every worker that the run's message does not
//! reach (it takes no part, or the run fails before its message is sent) must be marked with
//! [`SentGraphs::skip`], and its next run defines the graph whole. A message made and never sent
//! also hands back the graph ids it told the worker to forget ([`SentGraphs::forget_later`]).
//! The driver does both on every path with one guard per run (`Looked` in `driver.rs`, which a
//! KV move's receivers' round hands over to its `SendersDone`).

use crate::error::{Result, RuntimeError};
use crate::plan::{ExecPlan, Placement};
use crate::proto::{GraphRef, Reshape};
use genie_scheduler::graph::{Graph, NodeId, TensorRef};

/// Graphs a driver keeps (and so its workers keep) at most.
pub const DRIVER_GRAPHS: usize = 8;

/// Graphs a worker keeps at most; a driver that defines more is refused (it should have told the
/// worker to forget some).
pub const WORKER_GRAPHS: usize = 64;

/// Whether `a` and `b` differ at most in their tensors' metadata (shapes, dtypes).
pub fn same_structure(a: &Graph, b: &Graph) -> bool {
    a.len() == b.len()
        && a.name == b.name
        && a.outputs == b.outputs
        && a.nodes().iter().zip(b.nodes()).all(|(x, y)| {
            x.id == y.id
                && x.outputs.len() == y.outputs.len()
                && x.op == y.op
                && x.inputs == y.inputs
                && x.name == y.name
                && x.semantics == y.semantics
        })
}

/// The metadata changes that turn `old` into `new` (graphs of the same structure).
fn reshapes(old: &Graph, new: &Graph) -> Vec<Reshape> {
    let mut out = Vec::new();
    for (a, b) in old.nodes().iter().zip(new.nodes()) {
        for (o, (ma, mb)) in a.outputs.iter().zip(&b.outputs).enumerate() {
            if ma != mb {
                out.push(Reshape {
                    node: b.id.0,
                    output: o as u32,
                    meta: mb.clone(),
                });
            }
        }
    }
    out
}

/// Applies `reshape` to `graph`; returns the tensors changed. Indices are checked (the changes
/// may come from the network); the caller validates the graph afterwards.
pub fn apply_reshapes(
    graph: &mut Graph,
    reshape: &[Reshape],
    from: &str,
) -> Result<Vec<TensorRef>> {
    let mut changed = Vec::with_capacity(reshape.len());
    for r in reshape {
        let slot = graph
            .node_mut(NodeId(r.node))
            .and_then(|n| n.outputs.get_mut(r.output as usize))
            .ok_or_else(|| RuntimeError::BadMessage {
                worker: from.into(),
                reason: format!("reshape names no tensor {}:{}", r.node, r.output),
            })?;
        *slot = r.meta.clone();
        changed.push(TensorRef::new(NodeId(r.node), r.output));
    }
    Ok(changed)
}

/// A plan kept with the wanted tensors it was derived for.
#[derive(Debug, Default)]
pub struct KeptPlan {
    plan: Option<(Vec<TensorRef>, ExecPlan)>,
}

impl KeptPlan {
    /// Forgets the plan if one of `changed` crosses a link (its transfer's size changed).
    pub fn invalidate(&mut self, changed: &[TensorRef]) {
        if let Some((_, p)) = &self.plan {
            if changed.iter().any(|t| p.outgoing.contains_key(t)) {
                self.plan = None;
            }
        }
    }

    /// The plan of `graph` placed by `placement` delivering `wanted`, derived again only when
    /// needed.
    pub fn get(
        &mut self,
        graph: &Graph,
        placement: &Placement,
        wanted: &[TensorRef],
    ) -> Result<&ExecPlan> {
        if self.plan.as_ref().is_some_and(|(w, _)| w != wanted) {
            self.plan = None;
        }
        let plan = match self.plan.take() {
            Some(p) => p,
            None => (wanted.to_vec(), ExecPlan::new(graph, placement, wanted)?),
        };
        Ok(&self.plan.insert(plan).1)
    }
}

/// One graph a driver has sent.
#[derive(Debug)]
struct Sent {
    id: u64,
    graph: Graph,
    placement: Placement,
    /// Per worker: whether it keeps this graph.
    defined_on: Vec<bool>,
    plan: KeptPlan,
    last_used: u64,
    /// A run between its first and last message (see [`SentGraphs::pin`]): not forgotten.
    pinned: bool,
}

/// The driver's side: which graphs each worker keeps, under which ids.
#[derive(Debug)]
pub struct SentGraphs {
    sent: Vec<Sent>,
    next_id: u64,
    clock: u64,
    /// Per worker: ids to tell it to forget with its next run.
    forget: Vec<Vec<u64>>,
}

/// A graph looked up for one run: its id, and what changed since its last run.
#[derive(Debug, Clone)]
pub struct Lookup {
    id: u64,
    reshape: Vec<Reshape>,
}

impl SentGraphs {
    /// Nothing sent yet to any of `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self {
            sent: Vec::new(),
            next_id: 1,
            clock: 0,
            forget: vec![Vec::new(); workers],
        }
    }

    /// Finds `graph` placed by `placement` among the graphs sent (same structure and placement),
    /// bringing the kept copy's metadata up to date, or keeps it as a new one (forgetting the
    /// least recently used if the cache is full).
    pub fn lookup(&mut self, graph: &Graph, placement: &Placement) -> Lookup {
        self.clock += 1;
        let hit = self
            .sent
            .iter()
            .position(|s| s.placement == *placement && same_structure(&s.graph, graph));
        let id = match hit {
            Some(i) => {
                let s = &mut self.sent[i];
                s.last_used = self.clock;
                let reshape = reshapes(&s.graph, graph);
                if !reshape.is_empty() {
                    // Same structure, so every change lands on an existing tensor.
                    match apply_reshapes(&mut s.graph, &reshape, "driver") {
                        Ok(changed) => s.plan.invalidate(&changed),
                        Err(_) => s.plan = KeptPlan::default(),
                    }
                }
                return Lookup { id: s.id, reshape };
            }
            None => {
                // The least recently used goes, unless a run still has messages of it to make
                // (then the cache holds one more for a while).
                let oldest = self
                    .sent
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.pinned)
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(i, _)| i);
                if let Some(oldest) = oldest.filter(|_| self.sent.len() >= DRIVER_GRAPHS) {
                    let gone = self.sent.swap_remove(oldest);
                    for (w, on) in gone.defined_on.iter().enumerate() {
                        if *on {
                            if let Some(f) = self.forget.get_mut(w) {
                                f.push(gone.id);
                            }
                        }
                    }
                }
                self.sent.push(Sent {
                    id: self.next_id,
                    graph: graph.clone(),
                    placement: placement.clone(),
                    defined_on: vec![false; self.forget.len()],
                    plan: KeptPlan::default(),
                    last_used: self.clock,
                    pinned: false,
                });
                self.next_id += 1;
                self.next_id - 1
            }
        };
        Lookup {
            id,
            reshape: Vec::new(),
        }
    }

    fn slot(&mut self, l: &Lookup) -> Result<&mut Sent> {
        self.sent
            .iter_mut()
            .find(|s| s.id == l.id)
            .ok_or_else(|| RuntimeError::Plan("graph cache slot vanished".into()))
    }

    /// Keeps a looked-up graph from being forgotten (`true`) until a run has made all its
    /// messages (a run on several workers waits for them after its lookup, and may make its
    /// messages in two rounds: [`crate::driver::Driver::run_senders_first`]), or lets it go
    /// (`false`).
    pub fn pin(&mut self, l: &Lookup, on: bool) {
        if let Ok(s) = self.slot(l) {
            s.pinned = on;
        }
    }

    /// The plan of a looked-up graph for `wanted`.
    pub fn plan(&mut self, l: &Lookup, wanted: &[TensorRef]) -> Result<&ExecPlan> {
        let s = self.slot(l)?;
        s.plan.get(&s.graph, &s.placement, wanted)
    }

    /// `worker` takes no part in this run of a looked-up graph (no node placed there), so it is
    /// sent nothing: its copy, if any, misses this run's reshapes, and the next run it takes
    /// part in defines the graph there again, whole.
    pub fn skip(&mut self, l: &Lookup, worker: usize) {
        if let Some(on) = self.slot(l).ok().and_then(|s| s.defined_on.get_mut(worker)) {
            *on = false;
        }
    }

    /// Graph ids `worker` is told to forget with its next message again (a message that
    /// carried them was never sent).
    pub fn forget_later(&mut self, worker: usize, ids: Vec<u64>) {
        if let Some(f) = self.forget.get_mut(worker) {
            f.extend(ids);
        }
    }

    /// What to send `worker` for a looked-up graph, and the ids it should forget first; marks
    /// the graph as kept there.
    pub fn message(&mut self, l: &Lookup, worker: usize) -> Result<(GraphRef, Vec<u64>)> {
        let s = self.slot(l)?;
        let on = s
            .defined_on
            .get_mut(worker)
            .ok_or_else(|| RuntimeError::Plan(format!("no worker {worker}")))?;
        let g = if *on {
            GraphRef::Cached {
                id: s.id,
                reshape: l.reshape.clone(),
            }
        } else {
            *on = true;
            GraphRef::Define {
                id: s.id,
                graph: s.graph.clone(),
                placement: s.placement.clone(),
            }
        };
        let forget = self
            .forget
            .get_mut(worker)
            .map(std::mem::take)
            .unwrap_or_default();
        Ok((g, forget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::small;
    use genie_scheduler::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};

    #[test]
    fn decode_steps_differ_in_shapes_only() {
        let (a, b) = (
            gpt2_decode(&small(), 8).unwrap(),
            gpt2_decode(&small(), 9).unwrap(),
        );
        assert!(same_structure(&a, &b));
        let r = reshapes(&a, &b);
        assert!(!r.is_empty());
        let mut c = a.clone();
        apply_reshapes(&mut c, &r, "t").unwrap();
        assert_eq!(c, b);
        c.validate().unwrap();
        assert!(!same_structure(&a, &gpt2_prefill(&small(), 8).unwrap()));
        let bad = Reshape {
            node: 10_000,
            output: 0,
            meta: r[0].meta.clone(),
        };
        assert!(matches!(
            apply_reshapes(&mut c, &[bad], "t"),
            Err(RuntimeError::BadMessage { .. })
        ));
    }

    #[test]
    fn driver_defines_once_then_reshapes_and_forgets_the_oldest() {
        let mut s = SentGraphs::new(2);
        let g8 = gpt2_decode(&small(), 8).unwrap();
        let p = Placement::single(&g8);
        let l = s.lookup(&g8, &p);
        assert!(matches!(
            s.message(&l, 0).unwrap().0,
            GraphRef::Define { id: 1, .. }
        ));
        let g9 = gpt2_decode(&small(), 9).unwrap();
        let l = s.lookup(&g9, &p);
        match s.message(&l, 0).unwrap().0 {
            GraphRef::Cached { id: 1, reshape } => assert!(!reshape.is_empty()),
            other => panic!("expected a reshape of graph 1, got {other:?}"),
        }
        // Worker 1 has not seen it yet.
        assert!(matches!(
            s.message(&l, 1).unwrap().0,
            GraphRef::Define { id: 1, .. }
        ));
        // Filling the cache with other graphs forgets graph 1 on both workers.
        for layers in 1..=DRIVER_GRAPHS {
            let cfg = Gpt2Config { layers, ..small() };
            let g = gpt2_prefill(&cfg, 4).unwrap();
            let l = s.lookup(&g, &Placement::single(&g));
            s.message(&l, 1).unwrap();
        }
        let l = s.lookup(&g9, &p);
        let (g, forget) = s.message(&l, 0).unwrap();
        assert!(forget.contains(&1));
        assert!(matches!(g, GraphRef::Define { .. }));
    }
}
