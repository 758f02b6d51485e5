//! A worker: a transport endpoint, a tensor store, a KV-cache manager and kernels, serving runs
//! for a driver.
//!
//! The same [`serve`] loop runs in a thread of the embedded cluster and in a `genie worker`
//! process. Per run, a worker
//! 1. takes the graph and placement from the run message, or the ones it keeps under the id the
//!    message names (see [`cache`](crate::cache)), with the [`ExecPlan`] derived from them,
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

use crate::cache::{apply_reshapes, KeptPlan, WORKER_GRAPHS};
use crate::cluster::Cluster;
use crate::error::{Result, RuntimeError};
use crate::kernels::{tensor_from_bytes, tensor_to_bytes, Kernels};
use crate::kv::{KvCacheManager, KvConfig};
use crate::limits::{self, within_budget, WorkerOptions, MAX_KV_LAYERS};
use crate::plan::{layer_of, ExecPlan, Placement};
use crate::proto::{self, ComputeRecord, GraphRef, Msg, PayloadTensor, RunStats, WeightSpec};
use crate::store::{Residency as StoreResidency, TensorStore};
use crate::weights::WeightSource;
use candle_core::Tensor;
use genie_scheduler::dispatch::{DependencyCounters, TaskGraph};
use genie_scheduler::graph::{Graph, Node, NodeId, OpKind, TensorMeta, TensorRef};
use genie_transport::{
    BackendChoice, Connection, Op, Region, RegionAccess, RemoteRegion, Transport, TransportConfig,
    TransportError,
};
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long set-up steps (connecting to peers, exchanging descriptors) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a worker waits for one remote input before giving up on the run.
pub const INPUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest control message (inputs, outputs).
pub const MAX_MESSAGE: usize = 64 << 20;
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

/// The transport configuration of a worker or driver endpoint listening on `listen`.
pub fn transport_config(cluster: &Cluster, listen: SocketAddr) -> TransportConfig {
    TransportConfig {
        backend: BackendChoice::Auto,
        listen,
        secret: cluster.secret.clone(),
        max_message_size: MAX_MESSAGE,
        ..TransportConfig::default()
    }
}

fn terr(worker: &str, e: TransportError) -> RuntimeError {
    match e {
        TransportError::PeerDead { .. } | TransportError::ConnectionClosed { .. } => {
            RuntimeError::WorkerFailed {
                worker: worker.into(),
                reason: e.to_string(),
            }
        }
        other => RuntimeError::Transport {
            worker: worker.into(),
            reason: other.to_string(),
        },
    }
}

/// Sends a control message and waits until the transport has taken it.
pub fn send_msg(conn: &dyn Connection, peer: &str, msg: &Msg, payload: &[u8]) -> Result<()> {
    let bytes = proto::encode(msg, payload)?;
    conn.send(&bytes)
        .and_then(|op| op.wait(SETUP_TIMEOUT))
        .map_err(|e| terr(peer, e))
}

/// Hands a control message to the transport without waiting until it has been taken.
pub fn post_msg(conn: &dyn Connection, peer: &str, msg: &Msg, payload: &[u8]) -> Result<()> {
    let bytes = proto::encode(msg, payload)?;
    conn.send(&bytes).map(drop).map_err(|e| terr(peer, e))
}

/// Receives the next control message, waiting up to `timeout`.
pub fn recv_msg(conn: &dyn Connection, peer: &str, timeout: Duration) -> Result<(Msg, Vec<u8>)> {
    let bytes = conn.recv(timeout).map_err(|e| terr(peer, e))?;
    proto::decode(&bytes, peer)
}

/// Connects to `addr`, retrying until `deadline` (the peer may still be starting).
pub fn connect_retry(
    endpoint: &dyn Transport,
    addr: SocketAddr,
    peer: &str,
    deadline: Instant,
) -> Result<Arc<dyn Connection>> {
    loop {
        match endpoint.connect(addr) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return Err(RuntimeError::WorkerFailed {
                    worker: peer.into(),
                    reason: format!("cannot connect to {addr}: {e}"),
                })
            }
            Err(TransportError::AuthFailed { .. }) => {
                return Err(RuntimeError::Transport {
                    worker: peer.into(),
                    reason: "authentication failed (cluster secrets differ)".into(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[derive(Default)]
struct PeerMap {
    conns: Mutex<HashMap<usize, Arc<dyn Connection>>>,
    cv: Condvar,
}

struct Worker {
    me: usize,
    name: String,
    cluster: Cluster,
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
}

/// A graph kept across runs, with what is derived from it.
struct Kept {
    graph: Graph,
    placement: Placement,
    plan: KeptPlan,
    /// The dependency structure (independent of tensor shapes).
    tasks: TaskGraph,
}

/// How often a worker waiting on one sending peer looks whether its driver is still there.
const DRIVER_CHECK: Duration = Duration::from_millis(100);

/// How long a worker waiting on several sending peers waits on one before looking at the
/// others.
const PEER_SLICE: Duration = Duration::from_micros(200);

/// Size of a run's landing (and staging) region for a link carrying `bytes`: rounded up to a
/// power of two so that growing transfers (a naive decode's K/V) reuse it for many runs. Both
/// ends compute it from the same plan, so both know without asking whether the receiver
/// allocates a new region (and sends its descriptor) or both reuse the last one.
fn region_size(bytes: u64) -> u64 {
    bytes
        .max(64)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
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
    cluster.check_secure()?;
    let me = cluster.index_of(name)?;
    let peers = Arc::new(PeerMap::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (ctrl_tx, ctrl_rx) = mpsc::sync_channel::<Arc<dyn Connection>>(MAX_WAITING_DRIVERS);
    let acceptor = {
        let (endpoint, peers, stop, cluster) = (
            endpoint.clone(),
            peers.clone(),
            stop.clone(),
            cluster.clone(),
        );
        let name = name.to_string();
        let thread_name = format!("genie-accept-{name}");
        std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || accept_loop(&*endpoint, &cluster, &name, &peers, &stop, &ctrl_tx))
            .map_err(|e| RuntimeError::WorkerFailed {
                worker: thread_name,
                reason: format!("cannot spawn a thread: {e}"),
            })?
    };
    let mut w = Worker {
        me,
        name: name.to_string(),
        cluster,
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

/// Sorts incoming connections by their first message (see the module doc): all pending ones
/// are polled together, each within [`HELLO_TIMEOUT`], at most [`MAX_PENDING_HELLOS`] of them.
fn accept_loop(
    endpoint: &dyn Transport,
    cluster: &Cluster,
    name: &str,
    peers: &PeerMap,
    stop: &AtomicBool,
    ctrl_tx: &mpsc::SyncSender<Arc<dyn Connection>>,
) {
    let mut pending: VecDeque<(Arc<dyn Connection>, Instant)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        // While hellos are due, look at them often; otherwise sleep in accept.
        let wait = if pending.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(2)
        };
        match endpoint.accept(wait) {
            Ok(conn) => {
                if pending.len() >= MAX_PENDING_HELLOS {
                    if let Some((old, _)) = pending.pop_front() {
                        tracing::warn!(
                            worker = name,
                            "too many silent connections: dropped the oldest"
                        );
                        old.close();
                    }
                }
                pending.push_back((conn, Instant::now() + HELLO_TIMEOUT));
            }
            Err(TransportError::Timeout { .. }) => {}
            Err(TransportError::EndpointClosed) => return,
            Err(e) => tracing::warn!(worker = name, error = %e, "refused an incoming connection"),
        }
        let now = Instant::now();
        let mut k = 0;
        while k < pending.len() {
            let (conn, deadline) = &pending[k];
            let first = match conn.try_recv() {
                Ok(Some(bytes)) => Some(bytes),
                Ok(None) if now < *deadline && conn.is_alive() => {
                    k += 1;
                    continue;
                }
                Ok(None) => {
                    tracing::warn!(worker = name, "no hello within {HELLO_TIMEOUT:?}");
                    None
                }
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "connection ended before its hello");
                    None
                }
            };
            let Some((conn, _)) = pending.remove(k) else {
                break;
            };
            match first {
                Some(bytes) => {
                    if !hello(&conn, &bytes, cluster, name, peers, ctrl_tx) {
                        return;
                    }
                }
                None => conn.close(),
            }
        }
    }
}

/// Acts on the first message of an incoming connection; `false` when the worker is stopping.
fn hello(
    conn: &Arc<dyn Connection>,
    bytes: &[u8],
    cluster: &Cluster,
    name: &str,
    peers: &PeerMap,
    ctrl_tx: &mpsc::SyncSender<Arc<dyn Connection>>,
) -> bool {
    let refuse = |reason: String| {
        tracing::warn!(worker = name, %reason, "refused a hello");
        let msg = Msg::Failed {
            run: 0,
            error: RuntimeError::Refused {
                worker: name.into(),
                reason,
            }
            .to_string(),
            culprit: None,
        };
        let _ = post_msg(&**conn, "<incoming>", &msg, &[]);
        conn.close();
    };
    match proto::decode(bytes, "<incoming>") {
        Ok((Msg::HelloDriver, _)) => match ctrl_tx.try_send(conn.clone()) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => refuse(format!(
                "{MAX_WAITING_DRIVERS} drivers are already waiting for this worker"
            )),
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
        },
        Ok((Msg::HelloPeer { name: peer }, _)) => match cluster.index_of(&peer) {
            Ok(_) if peer == name => refuse(format!("a peer claims to be `{peer}`, this worker")),
            Ok(i) => {
                let mut conns = peers.conns.lock();
                if conns.get(&i).is_some_and(|c| c.is_alive()) {
                    drop(conns);
                    refuse(format!("peer `{peer}` is already connected"));
                } else if post_msg(&**conn, &peer, &Msg::Welcome, &[]).is_ok() {
                    conns.insert(i, conn.clone());
                    peers.cv.notify_all();
                }
            }
            Err(e) => refuse(e.to_string()),
        },
        Ok((other, _)) => refuse(format!("expected a hello, got {}", msg_kind(&other))),
        Err(e) => refuse(e.to_string()),
    }
    true
}

/// A message's variant name (for refusals: never echo what a peer sent in full).
fn msg_kind(m: &Msg) -> &'static str {
    match m {
        Msg::HelloDriver => "HelloDriver",
        Msg::HelloPeer { .. } => "HelloPeer",
        Msg::Welcome => "Welcome",
        Msg::Setup { .. } => "Setup",
        Msg::SetupDone => "SetupDone",
        Msg::Run { .. } => "Run",
        Msg::Regions { .. } => "Regions",
        Msg::Done { .. } => "Done",
        Msg::Failed { .. } => "Failed",
        Msg::FreeSequence { .. } => "FreeSequence",
        Msg::Freed { .. } => "Freed",
        Msg::Shutdown => "Shutdown",
    }
}

/// Whether two handles are the same connection.
fn same_conn(a: &Arc<dyn Connection>, b: &Arc<dyn Connection>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// A tensor that landed from a peer.
struct Arrival {
    id: u32,
    tensor: Tensor,
    at_us: f64,
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
            let (msg, payload) = match recv_msg(ctrl, "driver", Duration::from_millis(500)) {
                Ok(m) => m,
                Err(RuntimeError::Transport { .. }) if ctrl.is_alive() => continue,
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
                        Err(e) => Msg::Failed {
                            run: 0,
                            error: e.to_string(),
                            culprit: culprit(&e),
                        },
                    };
                    send_msg(ctrl, "driver", &reply, &[])?;
                }
                Msg::Run {
                    run,
                    forget,
                    graph,
                    seq,
                    inputs,
                    wanted,
                } => {
                    let _span = tracing::info_span!("run", worker = %self.name, run).entered();
                    for id in &forget {
                        self.graphs.remove(id);
                    }
                    let id = graph.id();
                    let res = self.note_sequence(seq);
                    let res = res
                        .and_then(|()| self.take_graph(graph))
                        .and_then(|mut kept| {
                            let r = self.execute(run, &mut kept, seq, &inputs, &payload, &wanted);
                            self.graphs.insert(id, kept);
                            r
                        });
                    // The driver learns from the reply (or its absence) whether it arrived: no
                    // need to wait here until the transport has taken it.
                    match res {
                        Ok((outputs, out_payload, stats)) => post_msg(
                            ctrl,
                            "driver",
                            &Msg::Done {
                                run,
                                outputs,
                                stats,
                            },
                            &out_payload,
                        )?,
                        Err(e) => post_msg(
                            ctrl,
                            "driver",
                            &Msg::Failed {
                                run,
                                error: e.to_string(),
                                culprit: culprit(&e),
                            },
                            &[],
                        )?,
                    };
                }
                Msg::FreeSequence { seq } => {
                    let reply = if self.session_seqs.remove(&seq) {
                        let blocks = self.kv.as_mut().map_or(0, |kv| {
                            let before = kv.blocks_in_use();
                            kv.free_sequence(seq);
                            before.saturating_sub(kv.blocks_in_use())
                        });
                        Msg::Freed {
                            seq,
                            blocks: blocks as u64,
                        }
                    } else {
                        let e = RuntimeError::Refused {
                            worker: self.name.clone(),
                            reason: format!(
                                "sequence {seq} is not this driver's (it ran no step of it here)"
                            ),
                        };
                        failed(0, &e)
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

    /// Records that the session runs sequence `seq` (bounded: a session holds at most
    /// [`MAX_SESSION_SEQUENCES`] unfreed sequences).
    fn note_sequence(&mut self, seq: u64) -> Result<()> {
        if self.session_seqs.len() >= MAX_SESSION_SEQUENCES && !self.session_seqs.contains(&seq) {
            return Err(RuntimeError::Refused {
                worker: self.name.clone(),
                reason: format!(
                    "{MAX_SESSION_SEQUENCES} sequences are open in this session; free some first"
                ),
            });
        }
        self.session_seqs.insert(seq);
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

    /// Connects to peer `j` and introduces ourselves; a refusal (our old connection is not yet
    /// seen dead there) is retried until `deadline`.
    fn connect_peer(&self, j: usize, deadline: Instant) -> Result<Arc<dyn Connection>> {
        let peer = self.peer_name(j);
        let addr = self.cluster.workers[j].address;
        loop {
            let conn = connect_retry(&*self.endpoint, addr, &peer, deadline)?;
            let hello = Msg::HelloPeer {
                name: self.name.clone(),
            };
            send_msg(&*conn, &peer, &hello, &[])?;
            let left = deadline.saturating_duration_since(Instant::now());
            let reason = match recv_msg(&*conn, &peer, left.max(Duration::from_millis(1))) {
                Ok((Msg::Welcome, _)) => return Ok(conn),
                Ok((Msg::Failed { error, .. }, _)) => error,
                Ok((other, _)) => format!("answered the hello with {}", msg_kind(&other)),
                Err(e) => e.to_string(),
            };
            conn.close();
            if Instant::now() >= deadline {
                return Err(RuntimeError::WorkerFailed {
                    worker: peer,
                    reason,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets the regions of every link whose connection changed since they were set up: the
    /// peer at the other end (restarted, or reconnected) knows none of them.
    fn sync_links(&mut self) {
        let conns: Vec<(usize, Arc<dyn Connection>)> = self
            .peers
            .conns
            .lock()
            .iter()
            .map(|(j, c)| (*j, c.clone()))
            .collect();
        for (j, conn) in conns {
            if self.links.get(&j).is_some_and(|l| same_conn(l, &conn)) {
                continue;
            }
            self.landing.remove(&j);
            self.staging.remove(&j);
            self.remote_landing.remove(&j);
            self.links.insert(j, conn);
        }
    }

    /// Applies a message from receiving peer `j`: only `Regions` (its landing region for us)
    /// travels on peer connections.
    fn apply_regions(&mut self, j: usize, peer: &str, bytes: &[u8]) -> Result<()> {
        match proto::decode(bytes, peer)? {
            (Msg::Regions { region, .. }, _) => {
                self.remote_landing.insert(j, region);
                Ok(())
            }
            (other, _) => Err(RuntimeError::BadMessage {
                worker: peer.to_string(),
                reason: format!("expected a landing region, got {other:?}"),
            }),
        }
    }

    fn peer(&self, i: usize) -> Result<Arc<dyn Connection>> {
        self.peers
            .conns
            .lock()
            .get(&i)
            .cloned()
            .ok_or_else(|| RuntimeError::WorkerFailed {
                worker: self.peer_name(i),
                reason: "not connected (was Setup sent?)".into(),
            })
    }

    fn execute(
        &mut self,
        run: u64,
        kept: &mut Kept,
        seq: u64,
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
        let mut landing: HashMap<usize, Region> = HashMap::new();
        for &src in &senders {
            let size = region_size(plan.link_bytes.get(&(src, me)).copied().unwrap_or(0));
            if let Some((region, have)) = self.landing.get(&src) {
                if *have >= size {
                    landing.insert(src, region.clone());
                    continue;
                }
            }
            let peer = self.peer_name(src);
            // Least privilege: the sending peer only ever writes into its landing region, and
            // only over its own connection (a private region, granted to that connection alone).
            let region = self
                .endpoint
                .alloc_private_region(size as usize, RegionAccess::Write)
                .map_err(|e| terr(&self.name, e))?;
            let conn = self.peer(src)?;
            let granted = conn.grant(&region).map_err(|e| terr(&peer, e))?;
            send_msg(
                &*conn,
                &peer,
                &Msg::Regions {
                    run,
                    region: granted,
                },
                &[],
            )?;
            self.landing.insert(src, (region.clone(), size));
            landing.insert(src, region);
        }
        let mut staging: Staging = HashMap::new();
        for &dst in &receivers {
            let conn = self.peer(dst)?;
            let peer = self.peer_name(dst);
            let size = region_size(plan.link_bytes.get(&(me, dst)).copied().unwrap_or(0));
            // The peer's landing region: apply the descriptors it sent (this run's, or ones a
            // failed run left unread), then wait for one while what we know is too small (the
            // peer sends one in this run exactly then: it sizes the region from the same plan).
            while let Some(bytes) = conn.try_recv().map_err(|e| terr(&peer, e))? {
                self.apply_regions(dst, &peer, &bytes)?;
            }
            let deadline = Instant::now() + SETUP_TIMEOUT;
            let remote = loop {
                if let Some(r) = self.remote_landing.get(&dst).filter(|r| r.len >= size) {
                    break *r;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let bytes = conn.recv(left).map_err(|e| terr(&peer, e))?;
                self.apply_regions(dst, &peer, &bytes)?;
            };
            let local = match self.staging.get(&dst) {
                Some((local, have)) if *have >= size => local.clone(),
                _ => {
                    // Only our own writes read it: no remote access at all.
                    let local = self
                        .endpoint
                        .alloc_region_with(size as usize, RegionAccess::Local)
                        .map_err(|e| terr(&self.name, e))?;
                    self.staging.insert(dst, (local.clone(), size));
                    local
                }
            };
            staging.insert(dst, (local, remote, conn));
        }
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
            seq,
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
            t0,
        };
        let pending = ctx.run_nodes(tasks, &staging, placement.overlap)?;
        for (dst, op) in pending {
            op.wait(INPUT_TIMEOUT)
                .map_err(|e| terr(&ctx.w.peer_name(dst), e))?;
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

/// The `Failed` reply of run `run` for `e`.
fn failed(run: u64, e: &RuntimeError) -> Msg {
    Msg::Failed {
        run,
        error: e.to_string(),
        culprit: culprit(e),
    }
}

/// Which worker an error blames, if it is a peer failure.
fn culprit(e: &RuntimeError) -> Option<String> {
    match e {
        RuntimeError::WorkerFailed { worker, .. } => Some(worker.clone()),
        _ => None,
    }
}

/// A tensor's key in a run's store (no string formatting per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key(TensorRef);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0.node.0, self.0.output)
    }
}

/// A node's first output's metadata.
fn first_output(node: &Node) -> Result<&TensorMeta> {
    node.outputs
        .first()
        .ok_or_else(|| RuntimeError::Plan(format!("{} has no output", node.name)))
}

/// A malformed or unexpected message from the driver.
fn bad_from_driver(reason: String) -> RuntimeError {
    RuntimeError::BadMessage {
        worker: "driver".into(),
        reason,
    }
}

fn key(t: &TensorRef) -> Key {
    Key(*t)
}

/// A monotonic clock anchored to wall-clock time, so that timestamps taken by different
/// workers (threads or processes on one host) are comparable.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    epoch_us: f64,
}

impl WallClock {
    /// Anchors now.
    pub fn now() -> Self {
        let epoch_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        Self {
            at: Instant::now(),
            epoch_us,
        }
    }
}

/// µs since the UNIX epoch, advancing monotonically from the anchor.
fn wall_us(c: WallClock) -> f64 {
    c.epoch_us + c.at.elapsed().as_secs_f64() * 1e6
}

/// The transfers one sending peer still owes this run.
struct Inbound {
    peer: String,
    conn: Arc<dyn Connection>,
    region: Region,
    /// Transfer id → the tensor's metadata and its offset in the landing region; an entry
    /// goes when its notification arrives.
    specs: HashMap<u32, (TensorMeta, u64)>,
}

/// Bits of a notification that carry the transfer id; the bits above carry the run's epoch.
const TRANSFER_BITS: u32 = 16;

/// The epoch of run `run` in its notifications.
fn epoch_of(run: u64) -> u32 {
    (run & ((1 << (32 - TRANSFER_BITS)) - 1)) as u32
}

/// The notification of transfer `tid` in a run of epoch `epoch`.
fn notification(epoch: u32, tid: u32) -> u32 {
    epoch << TRANSFER_BITS | tid
}

/// A notification's epoch and transfer id.
fn split_notification(imm: u32) -> (u32, u32) {
    (imm >> TRANSFER_BITS, imm & ((1 << TRANSFER_BITS) - 1))
}

/// The sending peers of a run, polled by the worker's own thread (no receiver threads: a
/// notification wakes the thread that computes on it).
struct Inbox {
    from: Vec<Inbound>,
    /// This run's epoch: notifications of other runs (left unread by a run that failed) are
    /// dropped, never taken for this run's transfers.
    epoch: u32,
    /// Which peer to wait on next when several owe transfers.
    turn: usize,
    /// The driver's connection: when it dies nobody wants the run any more (a peer that failed
    /// may never send what is due), so the wait ends.
    driver: Option<Arc<dyn Connection>>,
    t0: WallClock,
}

impl Inbox {
    /// The tensor of transfer `imm` from peer `k`, read out of the landing region; `None` for a
    /// notification of another run.
    fn take(&mut self, k: usize, imm: u32) -> Result<Option<Arrival>> {
        let (epoch, imm) = split_notification(imm);
        if epoch != self.epoch {
            tracing::debug!(
                peer = %self.from[k].peer,
                epoch,
                imm,
                "dropped a notification of an earlier run"
            );
            return Ok(None);
        }
        let at_us = wall_us(self.t0);
        let f = &mut self.from[k];
        let (meta, offset) = f
            .specs
            .remove(&imm)
            .ok_or_else(|| RuntimeError::BadMessage {
                worker: f.peer.clone(),
                reason: format!("notification {imm} names no transfer due in this run"),
            })?;
        // The plan placed the tensor inside the region; check anyway before allocating.
        let len = limits::checked_bytes(&meta)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| {
                usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(b))
                    .is_some_and(|end| end <= f.region.len())
            })
            .ok_or_else(|| RuntimeError::BadMessage {
                worker: f.peer.clone(),
                reason: format!("transfer {imm} of {meta} does not fit its landing region"),
            })?;
        let mut buf = vec![0u8; len];
        f.region
            .read(offset as usize, &mut buf)
            .map_err(|e| terr(&f.peer, e))?;
        Ok(Some(Arrival {
            id: imm,
            tensor: tensor_from_bytes(&meta, &buf)?,
            at_us,
        }))
    }

    /// A transfer that has landed, if any, without waiting.
    fn try_next(&mut self) -> Result<Option<Arrival>> {
        for k in 0..self.from.len() {
            let f = &self.from[k];
            if f.specs.is_empty() {
                continue;
            }
            loop {
                match self.from[k].conn.try_recv_notification() {
                    Ok(Some(imm)) => match self.take(k, imm)? {
                        Some(a) => return Ok(Some(a)),
                        None => continue,
                    },
                    Ok(None) => break,
                    Err(e) => return Err(terr(&self.from[k].peer, e)),
                }
            }
        }
        Ok(None)
    }

    /// The next transfer to land, waiting up to `timeout`; `Ok(None)` when none landed in time.
    fn next(&mut self, timeout: Duration) -> Result<Option<Arrival>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.try_next()? {
                return Ok(Some(a));
            }
            let due: Vec<usize> = (0..self.from.len())
                .filter(|&k| !self.from[k].specs.is_empty())
                .collect();
            if due.is_empty() {
                return Err(RuntimeError::Plan(
                    "no node is ready and no transfer is due".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // One peer: sleep on its connection until the notification. Several: take turns,
            // a short slice each, so that none waits long behind another.
            let k = due[self.turn % due.len()];
            self.turn = self.turn.wrapping_add(1);
            if self.driver.as_ref().is_some_and(|d| !d.is_alive()) {
                return Err(RuntimeError::WorkerFailed {
                    worker: "driver".into(),
                    reason: "the driver's connection died during the run".into(),
                });
            }
            let slice = if due.len() == 1 {
                left.min(DRIVER_CHECK)
            } else {
                left.min(PEER_SLICE)
            };
            let f = &self.from[k];
            match f.conn.recv_notification(slice) {
                Ok(imm) => match self.take(k, imm)? {
                    Some(a) => return Ok(Some(a)),
                    None => continue,
                },
                Err(TransportError::Timeout { .. }) => continue,
                Err(e) => return Err(terr(&f.peer, e)),
            }
        }
    }
}

struct RunCtx<'a> {
    w: &'a mut Worker,
    graph: &'a Graph,
    plan: &'a ExecPlan,
    seq: u64,
    inputs: HashMap<String, Tensor>,
    store: TensorStore<Key>,
    inbox: Inbox,
    arrived: HashMap<u32, f64>,
    stats: RunStats,
    t0: WallClock,
}

type Staging = HashMap<usize, (Region, RemoteRegion, Arc<dyn Connection>)>;

impl<'a> RunCtx<'a> {
    fn node(&self, id: NodeId) -> Result<&'a Node> {
        self.graph
            .node(id)
            .ok_or_else(|| RuntimeError::Plan(format!("missing node {id}")))
    }

    fn us(&self) -> f64 {
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
        within_budget(
            &self.w.name,
            &format!("node `{}` with the run's live tensors", node.name),
            out_bytes.saturating_add(self.store.bytes() as u64),
            self.w.opts.memory_budget,
        )?;
        let _span = tracing::debug_span!("node", name = %node.name).entered();
        let start = self.us();
        let outs = match &node.op {
            OpKind::KvCache { layer } => vec![self.kv_read(node, *layer as usize)?],
            OpKind::KvCacheAppend if self.appends_in_place(node) => {
                vec![self.kv_append_in_place(node, &ins)?]
            }
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
        let end = self.us();
        self.stats.nodes += 1;
        if recompute {
            self.stats.recomputes += 1;
        }
        self.stats.compute.push(ComputeRecord {
            node: node.id.0,
            start_us: start,
            dur_us: end - start,
        });
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

    fn kv_manager(&mut self, width: usize) -> Result<&mut KvCacheManager> {
        let layers = self
            .graph
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, OpKind::KvCache { .. } | OpKind::KvCacheAppend))
            .filter_map(|n| layer_of(self.graph, n.id))
            .max()
            .map_or(1, |m| m.saturating_add(1));
        if layers > MAX_KV_LAYERS || width == 0 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "a cache of {layers} layers × {width} wide (at most {MAX_KV_LAYERS} layers, \
                     width at least 1)"
                ),
            });
        }
        // The pool holds at most half the budget: blocks of K and V rows of f32.
        const BLOCK_TOKENS: usize = 16;
        let block_bytes = (2 * BLOCK_TOKENS * 4) as u64 * width as u64;
        let max_blocks =
            usize::try_from(self.w.opts.memory_budget / 2 / block_bytes).unwrap_or(usize::MAX);
        let kv = self.w.kv.get_or_insert_with(|| {
            KvCacheManager::new(KvConfig {
                layers,
                width,
                block_tokens: BLOCK_TOKENS,
                max_blocks,
            })
        });
        let cfg = kv.config();
        if cfg.width != width || cfg.layers < layers {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "cache holds {} layers × {} wide, graph needs {layers} × {width}",
                    cfg.layers, cfg.width
                ),
            });
        }
        Ok(kv)
    }

    fn kv_read(&mut self, node: &Node, layer: usize) -> Result<Tensor> {
        let meta = node
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan(format!("{} has no output", node.name)))?;
        let (b, l, e) = match meta.shape.as_slice() {
            [2, b, l, e] => (*b, *l, *e),
            s => {
                return Err(RuntimeError::KvCache {
                    reason: format!("{}: cache shape {s:?} is not [2, B, L, E]", node.name),
                })
            }
        };
        if b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: only batch 1 per sequence is supported", node.name),
            });
        }
        let seq = self.seq;
        let kv = self.kv_manager(e)?;
        let have = kv.len(seq, layer);
        if have != l {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "sequence {seq} layer {layer} holds {have} positions, graph expects {l}"
                ),
            });
        }
        let view = kv.view(seq, layer)?;
        self.stats.cache_hits += 1;
        Ok(view)
    }

    /// A decode step's append (`past`, new K, new V) whose `past` is this worker's own pinned
    /// cache: the new rows go straight into the cache, no copy of `past` is made.
    fn appends_in_place(&self, node: &Node) -> bool {
        node.inputs.len() == 3
            && node.inputs.first().is_some_and(|p| {
                self.graph
                    .node(p.node)
                    .is_some_and(|n| matches!(n.op, OpKind::KvCache { .. }))
                    && self.plan.worker_of.get(p.node.index()) == Some(&self.w.me)
            })
    }

    fn kv_append_in_place(&mut self, node: &Node, ins: &[Tensor]) -> Result<Tensor> {
        let layer = self.layer_of_append(node)?;
        let kerr = |source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        };
        let (past, k, v) = match ins {
            [p, k, v] => (p, k, v),
            _ => return Err(RuntimeError::Plan(format!("{} needs 3 inputs", node.name))),
        };
        let (two, b, l, e) = past.dims4().map_err(kerr)?;
        if two != 2 || b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "{}: cache of shape {:?} (need [2, 1, L, E])",
                    node.name,
                    past.dims()
                ),
            });
        }
        let seq = self.seq;
        let kv = self.kv_manager(e)?;
        let have = kv.len(seq, layer);
        if have != l {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: cache holds {have} positions, past has {l}", node.name),
            });
        }
        let new = Tensor::stack(&[k, v], 0).map_err(kerr)?;
        kv.append_rows(seq, layer, &new)
    }

    fn layer_of_append(&self, node: &Node) -> Result<usize> {
        layer_of(self.graph, node.id)
            .or_else(|| {
                node.inputs
                    .first()
                    .and_then(|i| match self.graph.node(i.node)?.op {
                        OpKind::KvCache { layer } => Some(layer as usize),
                        _ => None,
                    })
            })
            .ok_or_else(|| RuntimeError::KvCache {
                reason: format!("cannot tell which layer `{}` belongs to", node.name),
            })
    }

    fn kv_write(&mut self, node: &Node, t: &Tensor) -> Result<()> {
        let layer = self.layer_of_append(node)?;
        let kerr = |source| RuntimeError::Kernel {
            node: node.name.clone(),
            source,
        };
        let (two, b, l, e) = t.dims4().map_err(kerr)?;
        if two != 2 || b != 1 {
            return Err(RuntimeError::KvCache {
                reason: format!(
                    "{}: cache of shape {:?} (need [2, 1, L, E])",
                    node.name,
                    t.dims()
                ),
            });
        }
        let seq = self.seq;
        let have = self.kv_manager(e)?.len(seq, layer);
        if have > l {
            return Err(RuntimeError::KvCache {
                reason: format!("{}: cache shrank from {have} to {l}", node.name),
            });
        }
        let new = t.narrow(2, have, l - have).map_err(kerr)?;
        self.kv_manager(e)?.append_rows(seq, layer, &new)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::EmbeddedCluster;
    use crate::kernels::CpuKernels;
    use crate::proto::Reshape;
    use genie_scheduler::builders::{gpt2_decode, gpt2_prefill, Gpt2Config};
    use genie_scheduler::graph::DType;

    /// Runs naming graphs the worker does not keep, or reshaping them into something invalid,
    /// are refused with a typed failure; the worker goes on serving.
    #[test]
    fn malformed_graph_refs_are_refused() {
        let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
        let endpoint = genie_transport::open(transport_config(
            &cluster.cluster,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ))
        .unwrap();
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let addr = cluster.cluster.workers[0].address;
        let c = connect_retry(&*endpoint, addr, "w0", deadline).unwrap();
        send_msg(&*c, "w0", &Msg::HelloDriver, &[]).unwrap();
        send_msg(
            &*c,
            "w0",
            &Msg::Setup {
                weights: WeightSpec::Seeded(1),
            },
            &[],
        )
        .unwrap();
        assert!(matches!(
            recv_msg(&*c, "w0", SETUP_TIMEOUT).unwrap().0,
            Msg::SetupDone
        ));
        let cfg = Gpt2Config {
            layers: 1,
            hidden: 32,
            heads: 2,
            vocab: 64,
            context: 64,
            ..Gpt2Config::default()
        };
        let g = gpt2_decode(&cfg, 4).unwrap();
        let placement = Placement::single(&g);
        let mut run = 0;
        let mut ask = |graph: GraphRef, forget: Vec<u64>| -> String {
            run += 1;
            let msg = Msg::Run {
                run,
                forget,
                graph,
                seq: 0,
                inputs: vec![],
                wanted: vec![],
            };
            send_msg(&*c, "w0", &msg, &[]).unwrap();
            match recv_msg(&*c, "w0", SETUP_TIMEOUT).unwrap().0 {
                Msg::Failed { error, .. } => error,
                other => panic!("expected a failure, got {other:?}"),
            }
        };
        let never = ask(
            GraphRef::Cached {
                id: 7,
                reshape: vec![],
            },
            vec![],
        );
        assert!(never.contains("never defined"), "{never}");
        // A good definition (the run itself fails: no KV cache, no inputs).
        let define = GraphRef::Define {
            id: 1,
            graph: g.clone(),
            placement: placement.clone(),
        };
        let e = ask(define.clone(), vec![]);
        assert!(e.contains("kv cache"), "{e}");
        let out_of_range = ask(
            GraphRef::Cached {
                id: 1,
                reshape: vec![Reshape {
                    node: g.len() as u32,
                    output: 0,
                    meta: TensorMeta::new([1], DType::F32),
                }],
            },
            vec![],
        );
        assert!(
            out_of_range.contains("reshape names no tensor"),
            "{out_of_range}"
        );
        // The failed reshape dropped graph 1; define it again and break a shape.
        ask(define.clone(), vec![]);
        let inconsistent = ask(
            GraphRef::Cached {
                id: 1,
                reshape: vec![Reshape {
                    node: g.outputs[0].node.0,
                    output: 0,
                    meta: TensorMeta::new([3, 5, 7], DType::F32),
                }],
            },
            vec![],
        );
        assert!(inconsistent.contains("invalid graph"), "{inconsistent}");
        // A forgotten graph is gone.
        ask(define, vec![]);
        let forgotten = ask(
            GraphRef::Cached {
                id: 1,
                reshape: vec![],
            },
            vec![1],
        );
        assert!(forgotten.contains("never defined"), "{forgotten}");
        // Too many definitions without forgetting.
        let mut last = String::new();
        for id in 0..=WORKER_GRAPHS as u64 {
            last = ask(
                GraphRef::Define {
                    id: 100 + id,
                    graph: g.clone(),
                    placement: placement.clone(),
                },
                vec![],
            );
        }
        assert!(last.contains("forget some first"), "{last}");
        // Malformed JSON of a run is a bad message, not a panic.
        let bad = br#"{"Run":{"run":1,"forget":[],"graph":{"Cached":{"id":"x"}}}}"#;
        let mut framed = (bad.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(bad);
        assert!(matches!(
            proto::decode(&framed, "d"),
            Err(RuntimeError::BadMessage { .. })
        ));
        // The worker thread ends on shutdown.
        send_msg(&*c, "w0", &Msg::Shutdown, &[]).unwrap();
    }

    /// A raw driver connection to `addr`, past its hello.
    fn raw_driver(
        cluster: &Cluster,
        addr: SocketAddr,
    ) -> (Arc<dyn Transport>, Arc<dyn Connection>) {
        let ep = genie_transport::open(transport_config(
            cluster,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ))
        .unwrap();
        let c = connect_retry(&*ep, addr, "w", Instant::now() + SETUP_TIMEOUT).unwrap();
        (ep, c)
    }

    fn refusal(c: &dyn Connection) -> String {
        match recv_msg(c, "w", SETUP_TIMEOUT).unwrap().0 {
            Msg::Failed { error, .. } => error,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Once a peer's connection is up, nobody else may take its name (nor the worker's own);
    /// the mesh keeps working.
    #[test]
    fn hello_peer_for_a_live_name_is_refused() {
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let mut driver =
            crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
        let w1 = cluster.cluster.workers[1].address;
        for name in ["w0", "w1"] {
            let (_ep, c) = raw_driver(&cluster.cluster, w1);
            let hello = Msg::HelloPeer { name: name.into() };
            send_msg(&*c, "w1", &hello, &[]).unwrap();
            let e = refusal(&*c);
            assert!(e.contains("refused by worker w1"), "{name}: {e}");
        }
        let cfg = crate::plan::tests::small();
        let g = genie_scheduler::builders::gpt2_prefill(&cfg, 4).unwrap();
        let p = Placement::by_layer(&g, 2, cfg.layers).unwrap();
        let ids = Tensor::new(&[[1i64, 2, 3, 4]], &candle_core::Device::Cpu).unwrap();
        let pos = Tensor::new(&[[0i64, 1, 2, 3]], &candle_core::Device::Cpu).unwrap();
        let inputs = [("input_ids", ids), ("position_ids", pos)];
        driver.run(&g, &p, &inputs, &[g.outputs[0]], 0).unwrap();
        cluster.stop(driver).unwrap();
    }

    /// A decoder whose blocks are named as Llama-style checkpoints name them
    /// (`model.layers.{i}`) keeps its KV caches per layer and runs layer-wise on two workers,
    /// prefill then decode steps, bitwise equal to one worker: layers come from the nodes.
    #[test]
    fn llama_style_names_run_layer_wise() {
        use crate::models::{argmax_last, prompt, row_i64};
        use crate::plan::tests::llama_named;
        let cfg = crate::plan::tests::small();
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let mut driver =
            crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(3)).unwrap();
        let s = 5;
        let mut runs: Vec<Vec<Vec<u32>>> = Vec::new();
        for (seq, workers) in [(0u64, 1usize), (1, 2)] {
            let place = |g: &Graph| {
                let p = Placement::by_layer(g, workers, cfg.layers).unwrap();
                assert_eq!(p.workers(), workers);
                p
            };
            let mut run = |g: &Graph, ids: Vec<i64>, pos: Vec<i64>| {
                let inputs = [
                    ("input_ids", row_i64(ids).unwrap()),
                    ("position_ids", row_i64(pos).unwrap()),
                ];
                let out = driver
                    .run(g, &place(g), &inputs, &[g.outputs[0]], seq)
                    .unwrap();
                let logits = &out.outputs[0];
                let bits: Vec<u32> = logits
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                (argmax_last(logits).unwrap(), bits)
            };
            let g = llama_named(&gpt2_prefill(&cfg, s).unwrap());
            let (mut tok, bits) = run(&g, prompt(s, cfg.vocab), (0..s as i64).collect());
            let mut steps = vec![bits];
            for l in s..s + 2 {
                let g = llama_named(&gpt2_decode(&cfg, l).unwrap());
                let (next, bits) = run(&g, vec![tok], vec![l as i64]);
                tok = next;
                steps.push(bits);
            }
            runs.push(steps);
        }
        assert_eq!(runs[0], runs[1]);
        cluster.stop(driver).unwrap();
    }

    /// A driver's sequences are its own: after it leaves, another driver can neither read its
    /// KV cache nor free it; each gets a typed refusal.
    #[test]
    fn sequences_belong_to_their_driver() {
        let cluster = EmbeddedCluster::start(1, Arc::new(CpuKernels::new())).unwrap();
        let cfg = crate::plan::tests::small();
        let mut a =
            crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
        let one = |g: &Graph| Ok(Placement::single(g));
        let p = crate::models::prompt(6, cfg.vocab);
        crate::models::generate(&mut a, &cfg, &p, 1, 5, one, one).unwrap();
        drop(a);
        // Driver B: a decode step of sequence 5 finds no cache of its own.
        let mut b =
            crate::driver::Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
        let g = gpt2_decode(&cfg, 7).unwrap();
        let ids = Tensor::new(&[[1i64]], &candle_core::Device::Cpu).unwrap();
        let pos = Tensor::new(&[[7i64]], &candle_core::Device::Cpu).unwrap();
        let e = b
            .run(
                &g,
                &Placement::single(&g),
                &[("input_ids", ids), ("position_ids", pos)],
                &[g.outputs[0]],
                5,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv cache"), "{e}");
        drop(b);
        // A raw driver frees sequence 5 without having run it: refused, typed.
        let (_ep, c) = raw_driver(&cluster.cluster, cluster.cluster.workers[0].address);
        send_msg(&*c, "w0", &Msg::HelloDriver, &[]).unwrap();
        send_msg(&*c, "w0", &Msg::FreeSequence { seq: 5 }, &[]).unwrap();
        let e = refusal(&*c);
        assert!(e.contains("not this driver's"), "{e}");
        send_msg(&*c, "w0", &Msg::Shutdown, &[]).unwrap();
    }
}
