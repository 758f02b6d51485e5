//! A worker: a transport endpoint, a tensor store, a KV-cache manager and kernels, serving runs
//! for a driver.
//!
//! The same [`serve`] loop runs in a thread of the embedded cluster and in a `genie worker`
//! process. Per run, a worker
//! 1. takes the graph and placement from the run message, or the ones it keeps under the id the
//!    message names (see [`cache`](crate::cache)), with the [`ExecPlan`](crate::plan::ExecPlan) derived from them,
//! 2. allocates one private, write-only landing region per peer that sends to it and tells
//!    that peer a descriptor granted on its connection alone (and learns the descriptors of the peers it sends to) — only when a link needs
//!    more room than the regions kept from earlier runs,
//! 3. runs its nodes in dataflow order on its own thread; when no node is ready it waits on the
//!    sending peers' connections for the next notification and turns the landed tensor into a
//!    store entry; right after a node finishes, each of its outputs that another worker
//!    consumes is copied into the staging region and posted with `write_notify` — it travels
//!    while the next node computes,
//! 4. reports outputs and timings to the driver.
//!
//! A dead peer surfaces as a transport error on that connection within the transport's peer
//! timeout, and the run fails naming that peer. The next `Setup` heals the mesh: a link whose
//! connection died is connected again (and its regions announced afresh), so a restarted or
//! resumed worker rejoins without restarting the others.
//!
//! Incoming connections are sorted by their first message on the acceptor thread, which polls
//! all of them at once: each gets [`HELLO_TIMEOUT`] overall, at most [`MAX_PENDING_HELLOS`] wait
//! (past that the oldest is dropped), so idle or dripping sockets cannot keep a driver out.
//! After authentication a peer is bound to its name: a `HelloPeer` for a name whose connection
//! is alive is refused. A driver's KV caches belong to its connection (its session): they are
//! dropped when it ends, and no other driver can read or free them. What a driver may make the
//! worker allocate or open is bounded by [`WorkerOptions`] (see [`limits`]).
//!
//! A failed run leaves nothing for later ones: notifications carry their run's epoch (the low
//! 16 bits of its number; drivers start numbering at random), and ones of another run are
//! dropped; region descriptors are applied whenever they are read, the last one winning, so both
//! sides of a link agree on its regions whatever an earlier run did.
//!
//! # Layout
//!
//! This module holds the worker's state and its driver session (`Setup`, `Run`,
//! `FreeSequence`, `Shutdown`); each concern beside it has its own file:
//! - `mesh`: the peer mesh (the acceptor sorting incoming hellos, connecting to peers);
//! - `regions`: landing and staging regions per link, and their negotiation;
//! - `notify`: notification encoding (epoch and transfer id) and the inbox that polls senders;
//! - `exec`: the executor of one run, in dataflow order;
//! - `kv`: the KV-cache nodes' glue to the session's paged caches;
//! - `clock`: the [`WallClock`] that timestamps a run's timeline.
//!
//! Control messages, shared with the driver, are in [`crate::control`].

mod clock;
mod exec;
mod kv;
mod mesh;
mod notify;
mod regions;
#[cfg(test)]
mod tests;

pub use clock::WallClock;
pub(crate) use regions::region_size;

use self::mesh::{accept_loop, PeerMap};
use crate::cache::{apply_reshapes, KeptPlan, WORKER_GRAPHS};
use crate::cluster::Cluster;
use crate::control::{msg_kind, post_msg, recv_msg, send_msg, SETUP_TIMEOUT};
use crate::error::{Result, RuntimeError};
use crate::kernels::Kernels;
use crate::kv::KvCacheManager;
use crate::limits::{self, WorkerOptions};
use crate::plan::Placement;
use crate::proto::{Feed, GraphRef, Msg, PayloadTensor, WeightSpec};
use crate::weights::WeightSource;
use candle_core::Tensor;
use genie_scheduler::builders::MAX_DECODE_BATCH;
use genie_scheduler::dispatch::TaskGraph;
use genie_scheduler::graph::{DType, Graph};
use genie_transport::{Connection, Region, RemoteRegion, Transport, TransportError};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a worker waits for one remote input before giving up on the run.
pub const INPUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Most drivers waiting while another is served (drivers are served one at a time).
pub const MAX_WAITING_DRIVERS: usize = 16;
/// Most sequences one driver session may have open on a worker.
pub const MAX_SESSION_SEQUENCES: usize = 1 << 16;
/// How long an incoming connection may take to send its first message, all told.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most incoming connections waiting for their first message at once; a new one past this
/// drops the oldest (a real driver or peer sends its hello at once, so it is never the oldest
/// for long).
pub const MAX_PENDING_HELLOS: usize = 64;

/// Where a worker whose peers come and go (membership in etcd) reads the cluster: called at
/// every driver's `Setup`, so a worker that joined since is part of the next session's mesh.
pub type ClusterSource = Box<dyn FnMut() -> Result<Cluster> + Send>;

struct Worker {
    me: usize,
    name: String,
    cluster: Cluster,
    /// The cluster as the acceptor sees it (peer names to indices); replaced with `cluster`.
    view: Arc<RwLock<Cluster>>,
    /// Re-reads the cluster at `Setup` (none: the cluster is fixed).
    source: Option<ClusterSource>,
    endpoint: Arc<dyn Transport>,
    kernels: Arc<dyn Kernels>,
    peers: Arc<PeerMap>,
    weights: Option<WeightSource>,
    weight_cache: HashMap<String, Tensor>,
    /// The current driver session's KV caches (dropped when its connection ends).
    kv: Option<KvCacheManager>,
    /// The current session's driver connection: a run waiting on peers gives up when it dies.
    driver: Option<Arc<dyn Connection>>,
    /// The sequences the current session ran: the only ones it may free.
    session_seqs: std::collections::HashSet<u64>,
    /// The token ids the last run returned (its number and its first output, when that was
    /// `[M, 1]` I64): what the next run may be fed ([`Feed`]).
    last_ids: Option<(u64, Vec<i64>)>,
    /// Bytes held by `weight_cache`.
    weight_cache_bytes: u64,
    /// Limits on what a driver may ask.
    opts: WorkerOptions,
    /// Per peer: the connection the region state below was set up on; a peer whose
    /// connection changed (a link healed) starts with none.
    links: HashMap<usize, Arc<dyn Connection>>,
    /// Per sending peer: the region its transfers land in, and its size; kept across runs
    /// (and drivers) while big enough, so a run needs no region exchange (see [`region_size`]).
    /// A new one is announced to the peer with a `Regions` message.
    landing: HashMap<usize, (Region, u64)>,
    /// Per receiving peer: our staging region and its size, kept like `landing`.
    staging: HashMap<usize, (Region, u64)>,
    /// Per receiving peer: its landing region for us, from the last `Regions` message it sent
    /// (messages are applied in order whenever they are read, so this always converges to the
    /// peer's current region, also after a run that failed before reading one).
    remote_landing: HashMap<usize, RemoteRegion>,
    /// Graphs the current driver defined, by id.
    graphs: HashMap<u64, Kept>,
    /// Transfers of earlier runs answered before their peers acknowledged them
    /// ([`Msg::Run`]'s `acks_later`), settled by later runs ([`Worker::settle_sends`]).
    unacked: Vec<exec::Unacked>,
}

/// A graph kept across runs, with what is derived from it.
struct Kept {
    graph: Graph,
    placement: Placement,
    plan: KeptPlan,
    /// The dependency structure (independent of tensor shapes).
    tasks: TaskGraph,
}

/// Serves drivers on `endpoint` as worker `name` of `cluster` until a driver sends `Shutdown`,
/// with the default [`WorkerOptions`].
pub fn serve(
    endpoint: Arc<dyn Transport>,
    cluster: Cluster,
    name: &str,
    kernels: Arc<dyn Kernels>,
) -> Result<()> {
    serve_with(endpoint, cluster, name, kernels, WorkerOptions::default())
}

/// Serves drivers like [`serve`], limited by `opts`. Refuses a cluster that fails
/// [`Cluster::check_secure`].
pub fn serve_with(
    endpoint: Arc<dyn Transport>,
    cluster: Cluster,
    name: &str,
    kernels: Arc<dyn Kernels>,
    opts: WorkerOptions,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    serve_until(endpoint, cluster, name, kernels, opts, stop)
}

/// Serves like [`serve_with`] with the cluster read from `source`, now and again at every
/// driver's `Setup`: the peers are whoever the source lists then (e.g.
/// `membership::Discovery::cluster`, feature `etcd`). When the
/// list changed, the peer mesh starts afresh, since peer indices follow it.
///
/// A driver must list the same cluster (same names, same order) as its workers do at its
/// `Setup`; a change between the two fails that session's runs, and the next `Setup` heals.
pub fn serve_from(
    endpoint: Arc<dyn Transport>,
    mut source: ClusterSource,
    name: &str,
    kernels: Arc<dyn Kernels>,
    opts: WorkerOptions,
) -> Result<()> {
    let cluster = source()?;
    let stop = Arc::new(AtomicBool::new(false));
    on_own_pool(name, opts.threads, || {
        serve_inner(endpoint, cluster, Some(source), name, kernels, opts, stop)
    })
}

/// [`serve_with`], also ending (between driver sessions) once `stop` is set: how an
/// [`crate::driver::EmbeddedCluster`] stops a worker whose driver connection ended before the
/// driver's `Shutdown` reached it. The flag is the accept loop's own: set, the loop ends and
/// drops its end of the channel the worker waits on for drivers.
pub(crate) fn serve_until(
    endpoint: Arc<dyn Transport>,
    cluster: Cluster,
    name: &str,
    kernels: Arc<dyn Kernels>,
    opts: WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    on_own_pool(name, opts.threads, || {
        serve_inner(endpoint, cluster, None, name, kernels, opts, stop)
    })
}

/// Runs `f` (a worker's serve loop) on a compute pool of its own when `threads` asks for one
/// (see [`WorkerOptions::threads`]): the whole loop is one job on that pool, so the kernels'
/// parallel parts use its threads only (and, with one thread, run inline: no hand-off).
fn on_own_pool(
    name: &str,
    threads: Option<usize>,
    f: impl FnOnce() -> Result<()> + Send,
) -> Result<()> {
    let Some(threads) = threads else {
        return f();
    };
    let prefix = format!("genie-{name}-c");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{prefix}{i}"))
        .build()
        .map_err(|e| RuntimeError::WorkerFailed {
            worker: name.to_string(),
            reason: format!("cannot start its {threads} compute threads: {e}"),
        })?;
    pool.install(f)
}

fn serve_inner(
    endpoint: Arc<dyn Transport>,
    cluster: Cluster,
    source: Option<ClusterSource>,
    name: &str,
    kernels: Arc<dyn Kernels>,
    opts: WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    cluster.check_secure()?;
    let me = cluster.index_of(name)?;
    let peers = Arc::new(PeerMap::default());
    let view = Arc::new(RwLock::new(cluster.clone()));
    let (ctrl_tx, ctrl_rx) = mpsc::sync_channel::<Arc<dyn Connection>>(MAX_WAITING_DRIVERS);
    let acceptor = {
        let (endpoint, peers, stop, view) =
            (endpoint.clone(), peers.clone(), stop.clone(), view.clone());
        let name = name.to_string();
        let thread_name = format!("genie-accept-{name}");
        std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || accept_loop(&*endpoint, &view, &name, &peers, &stop, &ctrl_tx))
            .map_err(|e| RuntimeError::WorkerFailed {
                worker: thread_name,
                reason: format!("cannot spawn a thread: {e}"),
            })?
    };
    let mut w = Worker {
        me,
        name: name.to_string(),
        cluster,
        view,
        source,
        endpoint,
        kernels,
        peers,
        weights: None,
        weight_cache: HashMap::new(),
        weight_cache_bytes: 0,
        opts,
        links: HashMap::new(),
        kv: None,
        session_seqs: Default::default(),
        last_ids: None,
        unacked: Vec::new(),
        driver: None,
        landing: HashMap::new(),
        staging: HashMap::new(),
        remote_landing: HashMap::new(),
        graphs: HashMap::new(),
    };
    let result = loop {
        let Ok(ctrl) = ctrl_rx.recv() else {
            break Ok(());
        };
        match w.handle_driver(&ctrl) {
            Ok(true) => break Ok(()),
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(worker = %w.name, error = %e, "driver connection ended");
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
    result
}

/// The token ids a run returned: its first output, when that is `[M, 1]` I64 with
/// `M <= MAX_DECODE_BATCH` (a decode step's greedy next tokens); what a next run may be fed.
fn token_ids(outputs: &[PayloadTensor], payload: &[u8]) -> Option<Vec<i64>> {
    let t = outputs.first()?;
    match (t.meta.dtype, t.meta.shape.as_slice()) {
        (DType::I64, &[m, 1]) if m <= MAX_DECODE_BATCH && t.len == 8 * m as u64 => {}
        _ => return None,
    }
    let start = usize::try_from(t.offset).ok()?;
    let bytes = payload.get(start..start.checked_add(8 * t.meta.shape[0])?)?;
    Some(
        bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect(),
    )
}

impl Worker {
    fn peer_name(&self, i: usize) -> String {
        self.cluster
            .workers
            .get(i)
            .map_or_else(|| format!("#{i}"), |w| w.name.clone())
    }

    /// Handles one driver connection (a session); `Ok(true)` on shutdown. Graph ids and KV
    /// caches belong to the session: none survive it.
    fn handle_driver(&mut self, ctrl: &Arc<dyn Connection>) -> Result<bool> {
        self.graphs.clear();
        self.kv = None;
        self.session_seqs.clear();
        self.last_ids = None;
        // An earlier session's transfers still in flight are settled as ever (their staging
        // regions stay), but a failure among them is that session's, not this one's.
        for u in &mut self.unacked {
            u.report = false;
        }
        self.driver = Some(ctrl.clone());
        let r = self.serve_session(&**ctrl);
        self.driver = None;
        self.graphs.clear();
        self.kv = None;
        self.session_seqs.clear();
        r
    }

    fn serve_session(&mut self, ctrl: &dyn Connection) -> Result<bool> {
        loop {
            let (msg, mut payload) = match recv_msg(ctrl, "driver", Duration::from_millis(500)) {
                Ok(m) => m,
                // Nothing from the driver yet: wait on, even if the connection has just died:
                // the next receive still returns what arrived before it closed (the `Shutdown`
                // a driver sends just before closing), then the connection's end. Any other
                // failure ends the session.
                Err(RuntimeError::Transport {
                    source: TransportError::Timeout { .. },
                    ..
                }) => continue,
                // The framing held: say what was wrong and read on.
                Err(e @ RuntimeError::BadMessage { .. }) => {
                    post_msg(ctrl, "driver", &failed(0, &e), &[])?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match msg {
                Msg::Setup { weights } => {
                    let reply = match self.setup(weights) {
                        Ok(()) => Msg::SetupDone,
                        Err(e) => failed(0, &e),
                    };
                    send_msg(ctrl, "driver", &reply, &[])?;
                }
                Msg::Run {
                    run,
                    forget,
                    graph,
                    seqs,
                    inputs,
                    wanted,
                    spans,
                    free,
                    feed,
                    acks_later,
                } => {
                    let _span = tracing::info_span!("run", worker = %self.name, run).entered();
                    for id in &forget {
                        self.graphs.remove(id);
                    }
                    let id = graph.id();
                    // The token ids of the last run that returned some: taken by a run fed
                    // from them (used once); a run with no feed leaves them (a KV take-in
                    // between two decode steps, the second fed from the first).
                    let last = match feed {
                        Some(_) => self.last_ids.take(),
                        None => None,
                    };
                    let res = self
                        .free_listed(&free)
                        .and_then(|()| match &feed {
                            Some(f) => self.apply_feed(f, last, &inputs, &mut payload),
                            None => Ok(()),
                        })
                        .and_then(|()| self.note_sequences(&seqs));
                    let res = res
                        .and_then(|()| self.take_graph(graph))
                        .and_then(|mut kept| {
                            let r = self.execute(
                                run,
                                &mut kept,
                                (&seqs, spans, acks_later),
                                &inputs,
                                &payload,
                                &wanted,
                            );
                            self.graphs.insert(id, kept);
                            r
                        });
                    // The driver learns from the reply (or its absence) whether it arrived: no
                    // need to wait here until the transport has taken it.
                    match res {
                        Ok((outputs, out_payload, stats)) => {
                            if let Some(ids) = token_ids(&outputs, &out_payload) {
                                self.last_ids = Some((run, ids));
                            }
                            post_msg(
                                ctrl,
                                "driver",
                                &Msg::Done {
                                    run,
                                    outputs,
                                    stats,
                                },
                                &out_payload,
                            )?
                        }
                        Err(e) => post_msg(ctrl, "driver", &failed(run, &e), &[])?,
                    };
                }
                Msg::FreeSequence { seq } => {
                    let reply = match self.free_one(seq) {
                        Ok(blocks) => Msg::Freed {
                            seq,
                            blocks: blocks as u64,
                        },
                        Err(e) => failed(0, &e),
                    };
                    post_msg(ctrl, "driver", &reply, &[])?;
                }
                Msg::Shutdown => return Ok(true),
                other => {
                    let e = bad_from_driver(format!("unexpected {}", msg_kind(&other)));
                    post_msg(ctrl, "driver", &failed(0, &e), &[])?;
                }
            }
        }
    }

    /// Drops sequence `seq`'s KV cache (a sequence this session ran here; any other is
    /// refused); the KV blocks it released.
    fn free_one(&mut self, seq: u64) -> Result<usize> {
        if !self.session_seqs.remove(&seq) {
            return Err(RuntimeError::Refused {
                worker: self.name.clone(),
                reason: format!("sequence {seq} is not this driver's (it ran no step of it here)"),
            });
        }
        Ok(self.kv.as_mut().map_or(0, |kv| {
            let before = kv.blocks_in_use();
            kv.free_sequence(seq);
            before.saturating_sub(kv.blocks_in_use())
        }))
    }

    /// [`Worker::free_one`] for each of a run's `free` list.
    fn free_listed(&mut self, free: &[u64]) -> Result<()> {
        free.iter()
            .try_for_each(|&seq| self.free_one(seq).map(|_| ()))
    }

    /// Writes the rows `feed` names into the run's `input_ids` (in `payload`), from `last`:
    /// the token ids of the run before this one, if it returned some.
    fn apply_feed(
        &self,
        feed: &Feed,
        last: Option<(u64, Vec<i64>)>,
        inputs: &[PayloadTensor],
        payload: &mut [u8],
    ) -> Result<()> {
        let refuse = |reason: String| bad_from_driver(format!("a run's feed: {reason}"));
        let ids = match last {
            Some((run, ids)) if run == feed.run => ids,
            Some((run, _)) => {
                return Err(refuse(format!(
                    "run {} fed, but the last run here to return token ids was {run}",
                    feed.run
                )))
            }
            None => {
                return Err(refuse(format!(
                    "run {} fed, but no run here returned token ids since the last feed",
                    feed.run
                )))
            }
        };
        let t = inputs
            .iter()
            .find(|t| t.name == "input_ids")
            .ok_or_else(|| refuse("the run has no `input_ids`".into()))?;
        if t.meta.dtype != DType::I64 {
            return Err(refuse(format!(
                "`input_ids` is {:?}, not I64",
                t.meta.dtype
            )));
        }
        let rows = usize::try_from(t.len / 8).unwrap_or(0);
        let start = usize::try_from(t.offset).unwrap_or(usize::MAX);
        for &(dst, src) in &feed.rows {
            let (dst, src) = (dst as usize, src as usize);
            let (Some(&id), true) = (ids.get(src), dst < rows) else {
                return Err(refuse(format!(
                    "row {dst} from row {src}: {rows} rows, {} ids",
                    ids.len()
                )));
            };
            let slot = start
                .checked_add(dst * 8)
                .and_then(|at| payload.get_mut(at..at.checked_add(8)?))
                .ok_or_else(|| refuse("`input_ids` lies outside the payload".into()))?;
            slot.copy_from_slice(&id.to_le_bytes());
        }
        Ok(())
    }

    /// Records that the session runs sequences `seqs` (1 to [`MAX_DECODE_BATCH`], distinct;
    /// bounded: a session holds at most [`MAX_SESSION_SEQUENCES`] unfreed sequences).
    fn note_sequences(&mut self, seqs: &[u64]) -> Result<()> {
        let refuse = |reason: String| RuntimeError::Refused {
            worker: self.name.clone(),
            reason,
        };
        if seqs.is_empty() || seqs.len() > MAX_DECODE_BATCH {
            return Err(refuse(format!(
                "a run names {} sequences (1 to {MAX_DECODE_BATCH})",
                seqs.len()
            )));
        }
        let distinct: std::collections::HashSet<u64> = seqs.iter().copied().collect();
        if distinct.len() != seqs.len() {
            return Err(refuse(format!("a run names a sequence twice: {seqs:?}")));
        }
        let new = distinct.difference(&self.session_seqs).count();
        if self.session_seqs.len() + new > MAX_SESSION_SEQUENCES {
            return Err(refuse(format!(
                "{MAX_SESSION_SEQUENCES} sequences are open in this session; free some first"
            )));
        }
        self.session_seqs.extend(distinct);
        Ok(())
    }

    /// The graph a run names, taken out of the kept ones (the caller puts it back): a new
    /// definition is checked whole; a kept graph gets the run's reshapes and is checked again
    /// if any. A graph that fails its check is dropped.
    fn take_graph(&mut self, g: GraphRef) -> Result<Kept> {
        let kept = match g {
            GraphRef::Define {
                id,
                graph,
                placement,
            } => {
                if self.graphs.len() >= WORKER_GRAPHS && !self.graphs.contains_key(&id) {
                    return Err(bad_from_driver(format!(
                        "graph {id} defined while {WORKER_GRAPHS} graphs are kept (forget some first)"
                    )));
                }
                self.graphs.remove(&id);
                self.check_graph(&graph, &placement)?;
                let tasks = TaskGraph::from_graph(&graph);
                Kept {
                    graph,
                    placement,
                    plan: KeptPlan::default(),
                    tasks,
                }
            }
            GraphRef::Cached { id, reshape } => {
                let mut kept = self.graphs.remove(&id).ok_or_else(|| {
                    bad_from_driver(format!("run names graph {id}, which was never defined"))
                })?;
                if !reshape.is_empty() {
                    let changed = apply_reshapes(&mut kept.graph, &reshape, "driver")?;
                    self.check_graph(&kept.graph, &kept.placement)?;
                    kept.plan.invalidate(&changed);
                }
                kept
            }
        };
        Ok(kept)
    }

    /// A graph and placement that came over the network, checked before anything is indexed
    /// by them.
    fn check_graph(&self, graph: &Graph, placement: &Placement) -> Result<()> {
        limits::check_graph_sizes(&self.name, graph, self.opts.memory_budget)?;
        graph
            .validate()
            .map_err(|e| bad_from_driver(format!("invalid graph: {e}")))?;
        if placement.worker_of.len() != graph.len() {
            return Err(bad_from_driver(format!(
                "placement covers {} nodes, the graph has {}",
                placement.worker_of.len(),
                graph.len()
            )));
        }
        let n = self.cluster.workers.len();
        if let Some((i, w)) = placement
            .worker_of
            .iter()
            .enumerate()
            .find(|(_, &w)| w >= n)
        {
            return Err(bad_from_driver(format!(
                "placement puts node {i} on worker {w}, the cluster has {n}"
            )));
        }
        Ok(())
    }

    fn setup(&mut self, weights: WeightSpec) -> Result<()> {
        self.refresh_cluster()?;
        self.weights = Some(match weights {
            WeightSpec::Seeded(s) => WeightSource::Seeded(s),
            WeightSpec::Checkpoint(p) => WeightSource::load(&limits::checkpoint_path(
                self.opts.model_dir.as_deref(),
                &p,
                self.opts.memory_budget,
            )?)?,
        });
        self.weight_cache.clear();
        self.weight_cache_bytes = 0;
        // Landing and staging regions stay while their link does: peers keep the descriptors
        // they were sent. A link whose connection died is connected again.
        let deadline = Instant::now() + SETUP_TIMEOUT;
        for j in self.me + 1..self.cluster.workers.len() {
            if self
                .peers
                .conns
                .lock()
                .get(&j)
                .is_some_and(|c| c.is_alive())
            {
                continue;
            }
            let conn = self.connect_peer(j, deadline)?;
            self.peers.conns.lock().insert(j, conn);
        }
        let mut g = self.peers.conns.lock();
        for j in 0..self.me {
            // Lower-numbered peers connect to us; a dead connection of theirs is replaced by
            // the acceptor when they reconnect. Liveness changes unannounced: look again often.
            while !g.get(&j).is_some_and(|c| c.is_alive()) {
                if Instant::now() >= deadline {
                    return Err(RuntimeError::WorkerFailed {
                        worker: self.peer_name(j),
                        reason: "did not connect in time".into(),
                    });
                }
                self.peers.cv.wait_for(&mut g, Duration::from_millis(20));
            }
        }
        drop(g);
        self.sync_links();
        Ok(())
    }
}

impl Worker {
    /// Re-reads the cluster from the source, if any. When it changed, peer indices changed
    /// with it: every peer connection and its regions go, and the mesh is built afresh. When
    /// the source cannot be read (etcd restarting), the worker serves on with the cluster it
    /// has: the membership store going away must not stop a running cluster.
    fn refresh_cluster(&mut self) -> Result<()> {
        let Some(source) = self.source.as_mut() else {
            return Ok(());
        };
        let fresh = match source() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %self.name, error = %e, "kept the cluster it had");
                return Ok(());
            }
        };
        if fresh == self.cluster {
            return Ok(());
        }
        fresh.check_secure()?;
        let me = fresh.index_of(&self.name)?;
        tracing::info!(
            worker = %self.name,
            workers = fresh.workers.len(),
            "the cluster changed: rebuilding the peer mesh"
        );
        *self.view.write() = fresh.clone();
        for (_, conn) in self.peers.conns.lock().drain() {
            conn.close();
        }
        self.links.clear();
        self.landing.clear();
        self.staging.clear();
        self.remote_landing.clear();
        self.cluster = fresh;
        self.me = me;
        Ok(())
    }
}

/// The `Failed` reply of run `run` for `e`. A peer failure names its culprit, and its error is
/// the reason alone: the driver reports `worker <culprit> failed: <reason>` once.
fn failed(run: u64, e: &RuntimeError) -> Msg {
    let (error, culprit) = match e {
        RuntimeError::WorkerFailed { worker, reason } => (reason.clone(), Some(worker.clone())),
        other => (other.to_string(), None),
    };
    Msg::Failed {
        run,
        error,
        culprit,
    }
}

/// A malformed or unexpected message from the driver.
fn bad_from_driver(reason: String) -> RuntimeError {
    RuntimeError::BadMessage {
        worker: "driver".into(),
        reason,
    }
}
