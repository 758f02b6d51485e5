//! The driver: connects to every worker of a cluster, hands them runs, gathers outputs and
//! measurements. [`EmbeddedCluster`] starts the workers as threads of this process, each with
//! its own transport endpoint on loopback (real TCP between them).

use crate::cache::SentGraphs;
use crate::cluster::{Cluster, DeviceKind, WorkerSpec};
use crate::control::{self, connect_retry, recv_msg, send_msg, transport_config};
use crate::error::{Result, RuntimeError};
use crate::kernels::{tensor_from_bytes, tensor_to_bytes, Kernels};
use crate::limits::WorkerOptions;
use crate::plan::{ExecPlan, Placement};
use crate::proto::{self, Msg, PayloadTensor, RunStats, WeightSpec};
use crate::trace::{CounterSnapshot, Span, SpanKind};
use crate::worker;
use candle_core::Tensor;
use genie_scheduler::graph::{Graph, NodeId, TensorMeta, TensorRef};
use genie_transport::{BackendSelection, Connection, Transport, TransportError};
use parking_lot::{ArcMutexGuard, Mutex, MutexGuard, RawMutex};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a run may take before the driver gives up on it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the driver, waiting for several workers' replies, waits on one before looking at
/// the others (a reply that is already there is taken at once either way; this bounds how late
/// a failure report from one worker is seen while another is still busy).
const REPLY_SLICE: Duration = Duration::from_millis(20);

/// One measured transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferSample {
    /// Sending worker index.
    pub src: usize,
    /// Receiving worker index.
    pub dst: usize,
    /// Bytes.
    pub bytes: u64,
    /// Post to arrival, seconds.
    pub seconds: f64,
}

/// What a run produced and how long it took.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The wanted tensors, in the order asked for.
    pub outputs: Vec<Tensor>,
    /// Compute and transfer spans, µs since the first of them started.
    pub spans: Vec<Span>,
    /// Counters.
    pub counters: CounterSnapshot,
    /// Measured transfers.
    pub transfers: Vec<TransferSample>,
    /// Driver wall time from hand-out to the last worker's reply.
    pub wall: Duration,
    /// Peak tensor-store bytes per worker.
    pub peak_store_bytes: Vec<u64>,
    /// Tensor bytes between the driver and the workers: inputs sent (to every worker taking
    /// part) plus outputs received. With `counters.bytes_moved` (worker to worker), what the
    /// run moved over the network.
    pub driver_bytes: u64,
}

/// Connections to every worker of a cluster.
///
/// Every method takes `&self`: share a driver between threads (`Arc`) to run on disjoint sets
/// of workers at once (a prefill on one worker while decode steps run on another). A run holds
/// each worker it involves, taken in index order, from its message to that worker's reply; a
/// run that needs a worker another run holds waits for it. Runs on several workers go one at a
/// time ([`Driver::run_senders_first`] in two rounds where it can).
pub struct Driver {
    _endpoint: Arc<dyn Transport>,
    names: Vec<String>,
    conns: Vec<Arc<dyn Connection>>,
    next_run: AtomicU64,
    poisoned: Mutex<Option<String>>,
    sent: Mutex<SentGraphs>,
    /// Per sequence: the workers that ran a step of it (the ones that may hold its KV cache).
    seqs: Mutex<std::collections::HashMap<u64, Vec<bool>>>,
    /// One per worker: held by the run (or free) talking to it, so that a worker's replies
    /// always answer the holder's messages (or by a [`StepStream`] for its steps).
    held: Vec<Arc<Mutex<()>>>,
    /// Per worker: how many callers wait for its `held` lock (a [`StepStream`] lets it go).
    waiters: Vec<AtomicUsize>,
    /// Per worker: sequences to free there, carried by the next run it gets
    /// ([`Driver::free_sequence_later`]).
    to_free: Mutex<Vec<Vec<u64>>>,
    /// Held by a run on several workers from its graph's lookup to its last message, so that
    /// no other run of that graph comes between its rounds (see
    /// [`Driver::run_senders_first`]).
    several: Mutex<()>,
    /// Per link (sender, receiver): the size of the landing region the receiver keeps for the
    /// sender, as far as this driver's runs made it (see [`crate::worker::region_size`]).
    landing: Mutex<std::collections::HashMap<(usize, usize), u64>>,
    /// Whether runs report compute spans ([`Driver::set_spans`]).
    spans: AtomicBool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("workers", &self.names)
            .finish()
    }
}

impl Driver {
    /// Connects to every worker and has them connect to each other and set up `weights`.
    /// Refuses a cluster that fails [`Cluster::check_secure`].
    pub fn connect(cluster: &Cluster, weights: WeightSpec) -> Result<Self> {
        cluster.check_secure()?;
        let cfg = transport_config(cluster, SocketAddr::from(([127, 0, 0, 1], 0)));
        let endpoint = genie_transport::open(cfg).map_err(|e| RuntimeError::Transport {
            worker: "driver".into(),
            source: e,
        })?;
        let deadline = Instant::now() + control::SETUP_TIMEOUT;
        let mut conns = Vec::new();
        for w in &cluster.workers {
            let c = connect_retry(&*endpoint, w.address, &w.name, deadline)?;
            send_msg(&*c, &w.name, &Msg::HelloDriver, &[])?;
            conns.push(c);
        }
        for (c, w) in conns.iter().zip(&cluster.workers) {
            send_msg(
                &**c,
                &w.name,
                &Msg::Setup {
                    weights: weights.clone(),
                },
                &[],
            )?;
        }
        for (c, w) in conns.iter().zip(&cluster.workers) {
            match recv_msg(&**c, &w.name, control::SETUP_TIMEOUT)? {
                (Msg::SetupDone, _) => {}
                (Msg::Failed { error, culprit, .. }, _) => {
                    return Err(RuntimeError::WorkerFailed {
                        worker: culprit.unwrap_or_else(|| w.name.clone()),
                        reason: error,
                    })
                }
                (other, _) => {
                    return Err(RuntimeError::BadMessage {
                        worker: w.name.clone(),
                        reason: format!("expected SetupDone, got {other:?}"),
                    })
                }
            }
        }
        Ok(Self {
            _endpoint: endpoint,
            names: cluster.workers.iter().map(|w| w.name.clone()).collect(),
            sent: Mutex::new(SentGraphs::new(conns.len())),
            held: conns.iter().map(|_| Arc::new(Mutex::new(()))).collect(),
            waiters: conns.iter().map(|_| AtomicUsize::new(0)).collect(),
            to_free: Mutex::new(vec![Vec::new(); conns.len()]),
            several: Mutex::new(()),
            landing: Mutex::default(),
            conns,
            // Workers tell runs apart by their numbers (a notification carries the low 16
            // bits), also runs of an earlier driver that failed: start somewhere random.
            next_run: AtomicU64::new(u64::from(rand::random::<u32>()) + 1),
            poisoned: Mutex::new(None),
            seqs: Default::default(),
            spans: AtomicBool::new(true),
        })
    }

    /// Whether later runs report each node's compute span in [`RunOutput::spans`] (on by
    /// default). Off, a run's reply is smaller and its workers keep no per-node record: what
    /// a serving engine that draws no timeline wants. Transfer spans are reported either way.
    pub fn set_spans(&self, on: bool) {
        self.spans.store(on, Ordering::Relaxed);
    }

    /// Worker names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Runs `graph` placed by `placement` for KV sequence `seq`; returns the `wanted` tensors.
    ///
    /// Each worker gets a graph and placement once; later runs of the same structure (a decode
    /// step is the previous step's graph with longer KV tensors) send its id and the tensors
    /// whose shape changed (see [`cache`](crate::cache)).
    pub fn run(
        &self,
        graph: &Graph,
        placement: &Placement,
        inputs: &[(&str, Tensor)],
        wanted: &[TensorRef],
        seq: u64,
    ) -> Result<RunOutput> {
        self.run_batch(graph, placement, inputs, wanted, &[seq])
    }

    /// [`Driver::run`] of a graph over several sequences' KV caches: its cache nodes of slot
    /// `i` read and extend sequence `seqs[i]`'s (a batched decode step, from
    /// [`Family::decode_batch`](crate::models::Family::decode_batch)).
    pub fn run_batch(
        &self,
        graph: &Graph,
        placement: &Placement,
        inputs: &[(&str, Tensor)],
        wanted: &[TensorRef],
        seqs: &[u64],
    ) -> Result<RunOutput> {
        self.run_rounds(graph, placement, (inputs, wanted), seqs, Rounds::One)?
            .done()
    }

    /// [`Driver::run_batch`] for a run whose workers either only send or only receive (KV
    /// caches' move from a prefill worker to a decode worker), senders first: once every receiver keeps
    /// a landing region big enough for what it gets (after the first such run), it goes in two
    /// rounds, the senders first, holding only them, then the receivers once the senders are
    /// done, so that a receiver busy with another run (a decode step) finishes it while the
    /// bytes travel and then only takes in what has landed. A sender answers its round once
    /// its transfers are posted, before the receiver acknowledged them (the message's
    /// `acks_later`): its next run (the next prefill) computes while they travel, and settles
    /// them before it rewrites the same staging region; the receivers' round waits for every
    /// byte to land, and fails as soon as a sender's connection is gone. `senders_done` is
    /// called as soon as the first round's workers have replied (for a move, the prefill
    /// worker has posted every byte); for a run in one round, once it is over; not when the
    /// run fails first. (Other
    /// runs go in one round: a prefill that streams its KV cache to the decode worker wants
    /// that worker appending while it computes.)
    pub fn run_senders_first(
        &self,
        graph: &Graph,
        placement: &Placement,
        inputs: &[(&str, Tensor)],
        wanted: &[TensorRef],
        seqs: &[u64],
        senders_done: impl FnOnce(),
    ) -> Result<RunOutput> {
        let mut once = Some(senders_done);
        let mut call = || {
            if let Some(f) = once.take() {
                f();
            }
        };
        self.run_rounds(
            graph,
            placement,
            (inputs, wanted),
            seqs,
            Rounds::SendersFirst(&mut call),
        )?
        .done()
    }

    /// The first round of [`Driver::run_senders_first`] (the senders, the prefill worker of a
    /// KV move): once it is over, the receivers' round waits in the returned [`SendersDone`]
    /// for whoever runs the receiver next ([`Driver::take_in`]), so that the caller need not
    /// wait for the receiver (a decode worker busy with its decode steps) to be free. Its
    /// messages are made now, with the senders' (no other run of the graph comes between
    /// them). A run that goes in one round (the first move to a receiver, before
    /// its landing region is known) runs whole: [`Sending::Done`].
    ///
    /// The senders write into the receivers' landing regions: the caller sends no other run
    /// to the same links before this one's receivers have taken it in (or it was dropped).
    pub fn send_senders(
        self: &Arc<Self>,
        graph: &Graph,
        placement: &Placement,
        seqs: &[u64],
    ) -> Result<Sending> {
        Ok(
            match self.run_rounds(graph, placement, (&[], &[]), seqs, Rounds::SendersOnly)? {
                Ran::Done(out) => Sending::Done(out),
                Ran::Senders(mut p) => {
                    p.driver = Some(self.clone());
                    Sending::Senders(p)
                }
            },
        )
    }

    /// The receivers' round of a run whose senders are done ([`Driver::send_senders`]), held
    /// like any run (after a [`StepStream`] on a receiver lets it go); the whole run's output
    /// (its wall time from the senders' round on). `graph` is the run's graph (for the
    /// spans' names).
    pub fn take_in(&self, senders: Box<SendersDone>, graph: &Graph) -> Result<RunOutput> {
        self.check_poisoned()?;
        let workers = senders.receivers();
        let mut held = self.hold(workers.iter().copied());
        self.check_poisoned()?;
        let now = Instant::now();
        let f = senders.send(self)?;
        let replies = self
            .gather(workers, now + RUN_TIMEOUT, &mut held)
            .map_err(|(worker, reason)| self.fail(worker, reason))?;
        drop(held);
        self.landed(f, replies, graph)
    }

    /// The output of run `f`, its messages out, from `replies` (the last workers'; a
    /// take-in's senders replied before); `graph` names its spans.
    fn landed(
        &self,
        f: InFlight,
        replies: Vec<(usize, Msg, Vec<u8>)>,
        graph: &Graph,
    ) -> Result<RunOutput> {
        let wall = f.start.elapsed();
        let replies = f.senders.into_iter().chain(replies).collect();
        let (outputs, stats, out_bytes) = self.outputs(replies, f.run, f.used, &f.wanted)?;
        let mut out = assemble(&self.names, graph, &f.plan, stats, outputs, wall);
        out.driver_bytes = f.in_bytes + out_bytes;
        Ok(out)
    }

    fn run_rounds(
        &self,
        graph: &Graph,
        placement: &Placement,
        (inputs, wanted): (&[(&str, Tensor)], &[TensorRef]),
        seqs: &[u64],
        mut mode: Rounds<'_>,
    ) -> Result<Ran> {
        self.check_poisoned()?;
        let (used, active, all) = self.involved(placement)?;
        // One worker: held before its graph is looked up, as every run of that graph needs it.
        // Several: runs on several workers take turns from the lookup to the last message.
        let mut first_held = (all.len() == 1).then(|| self.hold(all.iter().copied()));
        let _several = (all.len() > 1).then(|| self.several.lock());
        // A run on other workers may have failed while this one waited for its workers.
        self.check_poisoned()?;
        let (mut looked, plan) = Looked::new(self, graph, placement, wanted)?;
        let rounds = match mode {
            Rounds::SendersFirst(_) | Rounds::SendersOnly => {
                rounds(&plan, &self.landing.lock(), all)
            }
            Rounds::One => vec![all],
        };
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        let (ins, payload) = encode_inputs(graph, inputs)?;
        self.note_seqs(seqs, &active);
        // Wait first on the workers that return nothing (they usually finish first), so that
        // their replies are read while the others still compute.
        let returns = |i: usize| {
            wanted
                .iter()
                .any(|t| plan.worker_of.get(t.node.index()) == Some(&i))
        };
        let mut start = None;
        let mut replies = Vec::new();
        let mut order_len = 0;
        for (r, workers) in rounds.iter().enumerate() {
            if r > 0 && matches!(mode, Rounds::SendersOnly) {
                let mut done = self.receivers_round(
                    (&mut looked, &plan),
                    (run, seqs),
                    (&ins, &payload, wanted),
                    workers,
                    used,
                )?;
                // The pin goes with them (until they are sent, or dropped unsent).
                looked.hand_over(&mut done);
                done.replies = replies;
                done.start = start.unwrap_or_else(Instant::now);
                done.in_bytes = payload.len() as u64 * (order_len + workers.len()) as u64;
                return Ok(Ran::Senders(done));
            }
            let mut held = match first_held.take() {
                Some(h) => h,
                None => self.hold(workers.iter().copied()),
            };
            self.check_poisoned()?;
            // What each worker is sent comes from the graph cache, under its lock: the messages
            // a worker gets are made in the order they are sent (its lock is held from here on).
            // Each worker gets the graph once, then its id (and the tensors that changed shape).
            let mut msgs = Vec::with_capacity(workers.len());
            {
                let mut sent = self.sent.lock();
                for &i in workers {
                    // The senders' round: each answers once its transfers are posted, and
                    // computes its next run while they travel (the receivers' round waits for
                    // them to land).
                    let later = r + 1 < rounds.len();
                    let msg = self.run_msg(
                        &mut sent,
                        &mut looked,
                        i,
                        (run, seqs),
                        (&ins, wanted),
                        (None, later),
                    )?;
                    msgs.push((i, proto::encode(&msg, &payload)?));
                }
            }
            let now = Instant::now();
            start.get_or_insert(now);
            for (i, bytes) in &msgs {
                // The reply says whether it arrived; no need to wait for the send itself.
                if let Err(e) = self.conns[*i].send(bytes) {
                    return Err(self.fail(self.names[*i].clone(), e.to_string()));
                }
                looked.told(*i);
            }
            let (last, first): (Vec<usize>, Vec<usize>) =
                workers.iter().copied().partition(|&i| returns(i));
            let order: Vec<usize> = first.into_iter().chain(last).collect();
            order_len += order.len();
            match self.gather(order, now + RUN_TIMEOUT, &mut held) {
                Ok(got) => replies.extend(got),
                Err((worker, reason)) => return Err(self.fail(worker, reason)),
            }
            if let (0, Rounds::SendersFirst(done)) = (r, &mut mode) {
                done();
            }
        }
        {
            // The receivers keep landing regions at least this big now.
            let mut landing = self.landing.lock();
            for (&link, &bytes) in &plan.link_bytes {
                let have = landing.entry(link).or_insert(0);
                *have = (*have).max(crate::worker::region_size(bytes));
            }
        }
        let start = start.unwrap_or_else(Instant::now);
        let wall = Instant::now() - start;
        let in_bytes = payload.len() as u64 * order_len as u64;
        let (outputs, stats, out_bytes) = self.outputs(replies, run, used, wanted)?;
        let mut out = assemble(&self.names, graph, &plan, stats, outputs, wall);
        out.driver_bytes = in_bytes + out_bytes;
        Ok(Ran::Done(out))
    }

    /// The workers a run placed by `placement` involves: how many the placement spans, which of
    /// them hold a node of it (the others, a decode step placed whole on the decode worker, get
    /// no message and send no reply), and those in order. An error where it spans more
    /// workers than the cluster has.
    fn involved(&self, placement: &Placement) -> Result<(usize, Vec<bool>, Vec<usize>)> {
        let used = placement.workers();
        if used > self.conns.len() {
            return Err(RuntimeError::Plan(format!(
                "placement uses {used} workers, the cluster has {}",
                self.conns.len()
            )));
        }
        let mut active = vec![false; used];
        for &w in &placement.worker_of {
            if let Some(a) = active.get_mut(w) {
                *a = true;
            }
        }
        let all = (0..used).filter(|&i| active[i]).collect();
        Ok((used, active, all))
    }

    /// The receivers' round of run `run` (graph lookup `look`, plan `plan`) on `workers`: their
    /// messages made now, under the graph cache's lock, to be sent when the receivers are free
    /// ([`Driver::take_in`], [`StepStream::take_in`]); the caller hands it the graph's pin and
    /// fills in the senders' replies, start and input bytes.
    fn receivers_round(
        &self,
        (looked, plan): (&mut Looked<'_>, &ExecPlan),
        (run, seqs): (u64, &[u64]),
        (ins, payload, wanted): (&[PayloadTensor], &[u8], &[TensorRef]),
        workers: &[usize],
        used: usize,
    ) -> Result<Box<SendersDone>> {
        let mut msgs = Vec::with_capacity(workers.len());
        let mut sent = self.sent.lock();
        for &i in workers {
            let msg = self.run_msg(
                &mut sent,
                looked,
                i,
                (run, seqs),
                (ins, wanted),
                (None, false),
            )?;
            msgs.push((i, proto::encode(&msg, payload)?));
        }
        Ok(Box::new(SendersDone {
            driver: None,
            look: looked.look.clone(),
            carried: Vec::new(),
            run,
            plan: plan.clone(),
            msgs,
            sent_all: false,
            replies: Vec::new(),
            start: Instant::now(),
            in_bytes: 0,
            wanted: wanted.to_vec(),
            used,
        }))
    }

    /// The `wanted` tensors in `replies` to run `run` (on `used` workers), each worker's
    /// statistics, and the tensor bytes that came back.
    #[allow(clippy::type_complexity)]
    fn outputs(
        &self,
        replies: Vec<(usize, Msg, Vec<u8>)>,
        run: u64,
        used: usize,
        wanted: &[TensorRef],
    ) -> Result<(Vec<Tensor>, Vec<Option<RunStats>>, u64)> {
        let mut bytes = 0;
        let mut stats: Vec<Option<RunStats>> = vec![None; used];
        let mut outputs: Vec<Option<Tensor>> = vec![None; wanted.len()];
        for (i, msg, pl) in replies {
            match msg {
                Msg::Done {
                    run: r,
                    outputs: outs,
                    stats: s,
                } if r == run => {
                    for o in outs {
                        let Some(t) = o.tensor else { continue };
                        let slice = proto::payload_slice(&pl, &o, &self.names[i])?;
                        let tensor = tensor_from_bytes(&o.meta, slice)?;
                        bytes += slice.len() as u64;
                        for (k, w) in wanted.iter().enumerate() {
                            if *w == t {
                                outputs[k] = Some(tensor.clone());
                            }
                        }
                    }
                    if let Some(slot) = stats.get_mut(i) {
                        *slot = Some(s);
                    }
                }
                other => {
                    let reason = format!("unexpected reply {other:?}");
                    return Err(self.fail(self.names[i].clone(), reason));
                }
            }
        }
        let outputs = outputs
            .into_iter()
            .zip(wanted)
            .map(|(o, w)| o.ok_or_else(|| RuntimeError::Plan(format!("no worker returned {w:?}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok((outputs, stats, bytes))
    }

    /// Notes that `seqs` ran on the workers marked in `active` (the ones that may hold their
    /// KV caches).
    fn note_seqs(&self, seqs: &[u64], active: &[bool]) {
        let mut known = self.seqs.lock();
        for &seq in seqs {
            let ran = known
                .entry(seq)
                .or_insert_with(|| vec![false; self.conns.len()]);
            for (r, &a) in ran.iter_mut().zip(active) {
                *r |= a;
            }
        }
    }

    /// The `Run` message of run `run` (of `seqs`, with inputs `ins` and outputs `wanted`) for
    /// worker `i` of a looked-up graph; it carries the sequences waiting to be freed there
    /// ([`Driver::free_sequence_later`]), and `feed` and `acks_later` (a senders' round: the
    /// worker answers once its transfers are posted). The caller holds worker `i` and `sent`.
    fn run_msg(
        &self,
        sent: &mut SentGraphs,
        looked: &mut Looked<'_>,
        i: usize,
        (run, seqs): (u64, &[u64]),
        (ins, wanted): (&[PayloadTensor], &[TensorRef]),
        (feed, acks_later): (Option<proto::Feed>, bool),
    ) -> Result<Msg> {
        let (g, forget) = sent.message(&looked.look, i)?;
        let free = self.take_frees(i);
        if let Some(c) = looked.carried.get_mut(i) {
            c.free.extend_from_slice(&free);
            c.forget.extend_from_slice(&forget);
        }
        Ok(Msg::Run {
            run,
            forget,
            graph: g,
            seqs: seqs.to_vec(),
            inputs: ins.to_vec(),
            wanted: wanted.to_vec(),
            spans: self.spans.load(Ordering::Relaxed),
            free,
            feed,
            acks_later,
        })
    }

    /// Marks the driver unusable after a failure on `worker` (later runs refuse to start until
    /// it reconnects) and returns the run's error.
    fn fail(&self, worker: String, reason: String) -> RuntimeError {
        self.poisoned.lock().get_or_insert_with(|| worker.clone());
        RuntimeError::WorkerFailed { worker, reason }
    }

    /// The error of a driver an earlier run left unusable.
    fn check_poisoned(&self) -> Result<()> {
        match &*self.poisoned.lock() {
            Some(p) => Err(RuntimeError::WorkerFailed {
                worker: p.clone(),
                reason: "an earlier run failed on this worker; reconnect".into(),
            }),
            None => Ok(()),
        }
    }

    /// Holds `workers` (ascending, so that two callers never wait on each other in a cycle)
    /// until the guards drop; the guards are by worker index.
    fn hold(&self, workers: impl Iterator<Item = usize>) -> Vec<Option<MutexGuard<'_, ()>>> {
        let mut guards: Vec<Option<MutexGuard<'_, ()>>> = Vec::new();
        for i in workers {
            let Some(m) = self.held.get(i) else { continue };
            if guards.len() <= i {
                guards.resize_with(i + 1, || None);
            }
            // Counted while it waits, so that a step stream holding the worker lets it go.
            self.waiters[i].fetch_add(1, Ordering::Relaxed);
            guards[i] = Some(m.lock());
            self.waiters[i].fetch_sub(1, Ordering::Relaxed);
        }
        guards
    }

    /// Whether a run waits for worker `worker` (held by someone else, such as a
    /// [`StepStream`], which should then let it go).
    pub fn contended(&self, worker: usize) -> bool {
        self.waiters
            .get(worker)
            .is_some_and(|w| w.load(Ordering::Relaxed) > 0)
    }

    /// The replies of workers `order` to the run just handed out, as they arrive (on this
    /// thread: each connection is polled, and the wait sleeps on one of them, in that order).
    /// A failure reported by any worker, a dead connection or no reply by `deadline` ends the
    /// wait with the worker to blame and why.
    ///
    /// A worker whose part is done is let go at once (its guard in `held` dropped): a run on it
    /// alone may start while this one's other workers still compute (a prefill on the prefill
    /// worker while the decode worker appends the cache just moved to it).
    #[allow(clippy::type_complexity)]
    fn gather(
        &self,
        order: Vec<usize>,
        deadline: Instant,
        held: &mut [Option<MutexGuard<'_, ()>>],
    ) -> std::result::Result<Vec<(usize, Msg, Vec<u8>)>, (String, String)> {
        let mut replies = Vec::with_capacity(order.len());
        let mut waiting = order;
        let mut turn = 0usize;
        while !waiting.is_empty() {
            let mut got = None;
            for (pos, &i) in waiting.iter().enumerate() {
                match self.conns[i].try_recv() {
                    Ok(None) => {}
                    other => {
                        got = Some((pos, other.map(|b| b.unwrap_or_default())));
                        break;
                    }
                }
            }
            let (pos, res) = match got {
                Some(g) => g,
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let i = waiting[0];
                    if left.is_zero() {
                        return Err((
                            self.names[i].clone(),
                            format!("no reply within {RUN_TIMEOUT:?}"),
                        ));
                    }
                    let pos = turn % waiting.len();
                    turn = turn.wrapping_add(1);
                    let i = waiting[pos];
                    let slice = if waiting.len() == 1 {
                        left.min(Duration::from_millis(200))
                    } else {
                        left.min(REPLY_SLICE)
                    };
                    // A timeout is never final: the next receive returns a reply that came in
                    // just before the connection closed, then the connection's end.
                    match self.conns[i].recv(slice) {
                        Err(TransportError::Timeout { .. }) => continue,
                        res => (pos, res),
                    }
                }
            };
            let i = waiting.remove(pos);
            let name = &self.names[i];
            let bytes = res.map_err(|e| (name.clone(), e.to_string()))?;
            match proto::decode(&bytes, name) {
                Ok((Msg::Failed { error, culprit, .. }, _)) => {
                    return Err((culprit.unwrap_or_else(|| name.clone()), error))
                }
                Ok((msg, pl)) => {
                    // Its connection carries nothing more of this run.
                    if let Some(g) = held.get_mut(i) {
                        g.take();
                    }
                    replies.push((i, msg, pl));
                }
                Err(e) => return Err((name.clone(), e.to_string())),
            }
        }
        Ok(replies)
    }

    /// Drops a sequence's KV cache on every worker that ran a step of it; returns the KV blocks
    /// released in all.
    pub fn free_sequence(&self, seq: u64) -> Result<u64> {
        let Some(ran) = self.seqs.lock().remove(&seq) else {
            return Ok(0);
        };
        let held: Vec<usize> = (0..self.conns.len())
            .filter(|&i| ran.get(i) == Some(&true))
            .collect();
        self.free_on(seq, &held)
    }

    /// Drops a sequence's KV cache on `worker` alone (if it ran a step of it): after its cache
    /// moved to another worker. Returns the KV blocks released.
    pub fn free_sequence_on(&self, seq: u64, worker: usize) -> Result<u64> {
        let ran_there = {
            let mut known = self.seqs.lock();
            match known.get_mut(&seq).and_then(|r| r.get_mut(worker)) {
                Some(r) => std::mem::replace(r, false),
                None => false,
            }
        };
        if !ran_there {
            return Ok(0);
        }
        self.free_on(seq, &[worker])
    }

    /// [`Driver::free_sequence`] without a round trip of its own: the sequence is dropped on
    /// each worker that ran it before the next run there starts (carried by that run's
    /// message), or by [`Driver::flush_frees_on`]. For a caller that runs more steps soon (a
    /// serving engine freeing a finished request between decode steps).
    pub fn free_sequence_later(&self, seq: u64) {
        let Some(ran) = self.seqs.lock().remove(&seq) else {
            return;
        };
        let mut to_free = self.to_free.lock();
        for (list, _) in to_free.iter_mut().zip(ran).filter(|(_, ran)| *ran) {
            list.push(seq);
        }
    }

    /// [`Driver::free_sequence_on`] carried by the next run on `worker` (see
    /// [`Driver::free_sequence_later`]).
    pub fn free_sequence_on_later(&self, seq: u64, worker: usize) {
        let ran_there = {
            let mut known = self.seqs.lock();
            match known.get_mut(&seq).and_then(|r| r.get_mut(worker)) {
                Some(r) => std::mem::replace(r, false),
                None => false,
            }
        };
        if ran_there {
            if let Some(list) = self.to_free.lock().get_mut(worker) {
                list.push(seq);
            }
        }
    }

    /// Frees now on `worker` (a `FreeSequence` round trip each) the sequences
    /// [`Driver::free_sequence_later`] left for its next run: for a caller with no run coming.
    pub fn flush_frees_on(&self, worker: usize) -> Result<()> {
        let _held = self.hold(std::iter::once(worker));
        // Taken under the worker's lock: no run of another caller carries them meanwhile.
        for seq in self.take_frees(worker) {
            self.free_held(seq, &[worker])?;
        }
        Ok(())
    }

    /// The sequences waiting to be freed on `worker`, taken (the caller holds the worker and
    /// sends them).
    fn take_frees(&self, worker: usize) -> Vec<u64> {
        self.to_free
            .lock()
            .get_mut(worker)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// [`Driver::flush_frees_on`] every worker.
    pub fn flush_frees(&self) -> Result<()> {
        (0..self.conns.len()).try_for_each(|i| self.flush_frees_on(i))
    }

    /// Sequences waiting for the next run on some worker to free them.
    pub fn frees_pending(&self) -> usize {
        self.to_free.lock().iter().map(Vec::len).sum()
    }

    fn free_on(&self, seq: u64, held: &[usize]) -> Result<u64> {
        let _held = self.hold(held.iter().copied());
        self.free_held(seq, held)
    }

    /// Frees `seq` on workers `held`, which the caller holds.
    fn free_held(&self, seq: u64, held: &[usize]) -> Result<u64> {
        for &i in held {
            send_msg(
                &*self.conns[i],
                &self.names[i],
                &Msg::FreeSequence { seq },
                &[],
            )?;
        }
        let mut blocks = 0;
        for &i in held {
            let (c, n) = (&self.conns[i], &self.names[i]);
            match recv_msg(&**c, n, control::SETUP_TIMEOUT)? {
                (Msg::Freed { seq: s, blocks: b }, _) if s == seq => blocks += b,
                (Msg::Failed { error, .. }, _) => {
                    return Err(RuntimeError::WorkerFailed {
                        worker: n.clone(),
                        reason: error,
                    })
                }
                (other, _) => {
                    return Err(RuntimeError::BadMessage {
                        worker: n.clone(),
                        reason: format!("expected Freed, got {other:?}"),
                    })
                }
            }
        }
        Ok(blocks)
    }

    /// Tells every worker to stop serving.
    pub fn shutdown(self) -> Result<()> {
        for (c, n) in self.conns.iter().zip(&self.names) {
            // A worker that is already gone needs no shutdown.
            let _ = send_msg(&**c, n, &Msg::Shutdown, &[]);
        }
        Ok(())
    }
}

/// A run's inputs as the message's tensors and payload (each input named after its `graph`
/// node, which gives its shape and dtype).
fn encode_inputs(
    graph: &Graph,
    inputs: &[(&str, Tensor)],
) -> Result<(Vec<PayloadTensor>, Vec<u8>)> {
    let mut payload = Vec::new();
    let mut ins = Vec::new();
    for (name, t) in inputs {
        let bytes = tensor_to_bytes(t)?;
        let node = graph
            .nodes()
            .iter()
            .find(|n| n.name == *name)
            .ok_or_else(|| RuntimeError::Plan(format!("graph has no input `{name}`")))?;
        let meta: TensorMeta = node
            .outputs
            .first()
            .cloned()
            .ok_or_else(|| RuntimeError::Plan(format!("input `{name}` has no output")))?;
        ins.push(PayloadTensor {
            name: name.to_string(),
            tensor: None,
            meta,
            offset: payload.len() as u64,
            len: bytes.len() as u64,
        });
        payload.extend_from_slice(&bytes);
    }
    Ok((ins, payload))
}

/// What a [`StepStream`] sent whose reply is not read yet.
enum Flown {
    /// A run ([`StepStream::send`], [`StepStream::take_in`]).
    Run(Box<InFlight>),
    /// The senders' round of a run in two rounds ([`StepStream::send_senders`]).
    Senders(Box<SendersDone>),
}

/// A step a [`StepStream`] sent whose reply is not read yet.
struct InFlight {
    run: u64,
    plan: ExecPlan,
    wanted: Vec<TensorRef>,
    start: Instant,
    in_bytes: u64,
    /// A take-in's: the replies of its senders' round ([`StepStream::take_in`]).
    senders: Vec<(usize, Msg, Vec<u8>)>,
    /// The workers of the run (a take-in's include its senders).
    used: usize,
}

/// Runs on one worker, each sent before the one ahead of it has answered
/// ([`Driver::stream`]): the worker starts a step as soon as it is done with the last one,
/// while the caller reads that one's reply and prepares the next (without a stream, the worker
/// idles for the caller's whole turn around between two steps). With [`Feed`](proto::Feed), a
/// step's token ids come from the step before it, on the worker.
///
/// The stream holds its worker: other runs on it wait until the stream is dropped (see
/// [`Driver::contended`]). Replies are read in order, one [`StepStream::wait`] per
/// [`StepStream::send`]; dropping the stream reads (and discards) those still due.
pub struct StepStream {
    driver: Arc<Driver>,
    worker: usize,
    hold: Option<ArcMutexGuard<RawMutex, ()>>,
    flying: std::collections::VecDeque<Flown>,
    /// When the last reply was read.
    last_reply: Instant,
}

impl std::fmt::Debug for StepStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepStream")
            .field("worker", &self.worker)
            .field("in_flight", &self.flying.len())
            .finish()
    }
}

impl Driver {
    /// A [`StepStream`] on `worker`, once no other run holds it.
    pub fn stream(self: &Arc<Self>, worker: usize) -> Result<StepStream> {
        self.check_poisoned()?;
        let Some(m) = self.held.get(worker) else {
            return Err(RuntimeError::Plan(format!(
                "a step stream on worker {worker}; the cluster has {}",
                self.conns.len()
            )));
        };
        self.waiters[worker].fetch_add(1, Ordering::Relaxed);
        let hold = m.lock_arc();
        self.waiters[worker].fetch_sub(1, Ordering::Relaxed);
        Ok(StepStream {
            driver: self.clone(),
            worker,
            hold: Some(hold),
            flying: Default::default(),
            last_reply: Instant::now(),
        })
    }
}

impl StepStream {
    /// The worker it holds.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Steps sent whose replies are not read yet.
    pub fn in_flight(&self) -> usize {
        self.flying.len()
    }

    /// Sends a run of `graph`, placed by `placement` wholly on this stream's worker, as
    /// [`Driver::run_batch`] would; its reply is read by a later [`StepStream::wait`]. `feed`
    /// takes rows of its `input_ids` from the token ids of the step sent just before it (whose
    /// run number `send` returned). Returns its run number.
    pub fn send(
        &mut self,
        graph: &Graph,
        placement: &Placement,
        (inputs, wanted): (&[(&str, Tensor)], &[TensorRef]),
        seqs: &[u64],
        feed: Option<proto::Feed>,
    ) -> Result<u64> {
        let d = &*self.driver;
        d.check_poisoned()?;
        if let Some(&w) = placement.worker_of.iter().find(|&&w| w != self.worker) {
            return Err(RuntimeError::Plan(format!(
                "a step on a stream to worker {} places a node on worker {w}",
                self.worker
            )));
        }
        let used = placement.workers().max(self.worker + 1);
        if used > d.conns.len() {
            return Err(RuntimeError::Plan(format!(
                "placement uses {used} workers, the cluster has {}",
                d.conns.len()
            )));
        }
        let run = d.next_run.fetch_add(1, Ordering::Relaxed);
        let (mut looked, plan) = Looked::new(d, graph, placement, wanted)?;
        let (ins, payload) = encode_inputs(graph, inputs)?;
        let bytes = {
            let mut sent = d.sent.lock();
            let msg = d.run_msg(
                &mut sent,
                &mut looked,
                self.worker,
                (run, seqs),
                (&ins, wanted),
                (feed, false),
            )?;
            proto::encode(&msg, &payload)?
        };
        let mut active = vec![false; used];
        active[self.worker] = true;
        d.note_seqs(seqs, &active);
        let start = Instant::now();
        if let Err(e) = d.conns[self.worker].send(&bytes) {
            return Err(d.fail(d.names[self.worker].clone(), e.to_string()));
        }
        looked.told(self.worker);
        drop(looked);
        self.flying.push_back(Flown::Run(Box::new(InFlight {
            run,
            plan,
            wanted: wanted.to_vec(),
            start,
            in_bytes: payload.len() as u64,
            senders: Vec::new(),
            used: d.conns.len(),
        })));
        Ok(run)
    }

    /// Sends the senders' round of a run in two rounds whose only sender is this stream's
    /// worker (a KV move from a prefill worker, sent right behind the prefill that builds the
    /// caches, so that the worker goes from one to the other), as [`Driver::send_senders`]
    /// does: the worker answers once its transfers are posted, and the receivers' messages are
    /// made now. [`StepStream::wait_senders`] reads its reply. `None`, nothing sent, when the run
    /// would go in one round (a receiver's landing region is not known to be big enough: the
    /// first move on a link; [`Driver::send_senders`] runs it whole) or has other senders.
    ///
    /// As with [`Driver::send_senders`], the caller sends no other run to the same links before
    /// this one's receivers have taken it in (or it was dropped).
    pub fn send_senders(
        &mut self,
        graph: &Graph,
        placement: &Placement,
        seqs: &[u64],
    ) -> Result<Option<u64>> {
        let d = &*self.driver;
        d.check_poisoned()?;
        let (used, active, all) = d.involved(placement)?;
        // As any run on several workers: no other run of the graph between its rounds.
        let _several = d.several.lock();
        d.check_poisoned()?;
        let (mut looked, plan) = Looked::new(d, graph, placement, &[])?;
        let rounds = rounds(&plan, &d.landing.lock(), all);
        let [senders, receivers] = rounds.as_slice() else {
            // Not told: each worker gets the graph whole next time (the lookup brought the
            // driver's copy to this run's shapes).
            return Ok(None);
        };
        if senders != &[self.worker] {
            return Ok(None);
        }
        let run = d.next_run.fetch_add(1, Ordering::Relaxed);
        let (ins, payload) = encode_inputs(graph, &[])?;
        d.note_seqs(seqs, &active);
        let bytes = {
            let mut sent = d.sent.lock();
            let msg = d.run_msg(
                &mut sent,
                &mut looked,
                self.worker,
                (run, seqs),
                (&ins, &[]),
                (None, true),
            )?;
            proto::encode(&msg, &payload)?
        };
        let mut done = d.receivers_round(
            (&mut looked, &plan),
            (run, seqs),
            (&ins, &payload, &[]),
            receivers,
            used,
        )?;
        done.driver = Some(self.driver.clone());
        done.in_bytes = payload.len() as u64 * (1 + receivers.len()) as u64;
        if let Err(e) = d.conns[self.worker].send(&bytes) {
            return Err(d.fail(d.names[self.worker].clone(), e.to_string()));
        }
        looked.told(self.worker);
        looked.hand_over(&mut done);
        self.flying.push_back(Flown::Senders(done));
        Ok(Some(run))
    }

    /// The reply to the senders' round that is the oldest thing still due
    /// ([`StepStream::send_senders`]): the run, its senders done, for [`Driver::take_in`] or a
    /// decode worker's [`StepStream::take_in`]. Its start is when the worker started it: the
    /// later of its sending and the reply before it.
    pub fn wait_senders(&mut self) -> Result<Box<SendersDone>> {
        let mut done = self.pop("a senders' round", |f| match f {
            Flown::Senders(done) => Ok(done),
            f => Err(f),
        })?;
        done.start = done.start.max(self.last_reply);
        done.replies = self.gather()?;
        Ok(done)
    }

    /// The oldest thing still due, which `take` (a senders' round or a run, `what`) takes out;
    /// an error, and it stays due, where it is the other kind.
    fn pop<T>(
        &mut self,
        what: &str,
        take: fn(Flown) -> std::result::Result<T, Flown>,
    ) -> Result<T> {
        let Some(f) = self.flying.pop_front() else {
            return Err(RuntimeError::Plan(format!(
                "a step stream waited for {what} with none sent"
            )));
        };
        take(f).map_err(|f| {
            self.flying.push_front(f);
            RuntimeError::Plan(format!(
                "a step stream waited for {what} with another kind of reply due first"
            ))
        })
    }

    /// The stream worker's next reply.
    fn gather(&mut self) -> Result<Vec<(usize, Msg, Vec<u8>)>> {
        let d = &*self.driver;
        let replies = d
            .gather(vec![self.worker], Instant::now() + RUN_TIMEOUT, &mut [])
            .map_err(|(worker, reason)| d.fail(worker, reason))?;
        self.last_reply = Instant::now();
        Ok(replies)
    }

    /// Sends the receivers' round of a run whose senders are done ([`Driver::send_senders`])
    /// when this stream's worker is its only receiver (a KV take-in between two decode steps:
    /// the worker goes from one to the other without being let go); its reply is read by a
    /// later [`StepStream::wait`] (with the run's graph), which returns the whole run's output
    /// as [`Driver::take_in`] would. Token ids a step returned still feed the step after the
    /// take-in ([`Feed`](proto::Feed)).
    pub fn take_in(&mut self, senders: Box<SendersDone>) -> Result<u64> {
        let d = &*self.driver;
        d.check_poisoned()?;
        if senders.receivers() != [self.worker] {
            return Err(RuntimeError::Plan(format!(
                "a take-in on a stream to worker {} has receivers {:?}",
                self.worker,
                senders.receivers()
            )));
        }
        let f = senders.send(d)?;
        let run = f.run;
        self.flying.push_back(Flown::Run(Box::new(f)));
        Ok(run)
    }

    /// The reply to the oldest step still due (its `graph` names the spans); its outputs as
    /// [`Driver::run_batch`] returns them. A worker's failure poisons the driver, as a run's.
    pub fn wait(&mut self, graph: &Graph) -> Result<RunOutput> {
        self.wait_run(graph, false).map(|(_, out)| out)
    }

    /// [`StepStream::wait`] for a run sent behind others: its wall time counts from when the
    /// worker started it (the later of its sending and the reading of the reply before it),
    /// which is returned with it.
    pub fn wait_started(&mut self, graph: &Graph) -> Result<(Instant, RunOutput)> {
        self.wait_run(graph, true)
    }

    fn wait_run(&mut self, graph: &Graph, from_start: bool) -> Result<(Instant, RunOutput)> {
        let mut f = self.pop("a run", |f| match f {
            Flown::Run(f) => Ok(f),
            f => Err(f),
        })?;
        if from_start {
            f.start = f.start.max(self.last_reply);
        }
        let start = f.start;
        let replies = self.gather()?;
        Ok((start, self.driver.landed(*f, replies, graph)?))
    }
}

impl Drop for StepStream {
    fn drop(&mut self) {
        // The replies still due are read here, so that the worker's next holder reads its own.
        for _ in 0..self.flying.len() {
            let deadline = Instant::now() + RUN_TIMEOUT;
            if let Err((worker, reason)) = self.driver.gather(vec![self.worker], deadline, &mut [])
            {
                self.driver.fail(worker, reason);
                break;
            }
        }
        // Handed straight to a run waiting for the worker, if any.
        if let Some(h) = self.hold.take() {
            ArcMutexGuard::unlock_fair(h);
        }
    }
}

/// The rounds in which a run of `plan` on workers `all` hands out its messages: the senders,
/// then the receivers, when no worker does both and every receiver keeps a landing region big
/// enough for its senders (`landing`, per link: so that no sender waits for a receiver that
/// has not got the run yet); else all at once.
fn rounds(
    plan: &ExecPlan,
    landing: &std::collections::HashMap<(usize, usize), u64>,
    all: Vec<usize>,
) -> Vec<Vec<usize>> {
    let to: std::collections::BTreeSet<usize> = plan.transfers.iter().map(|t| t.dst).collect();
    let from: std::collections::BTreeSet<usize> = plan.transfers.iter().map(|t| t.src).collect();
    if to.is_empty() || !to.is_disjoint(&from) {
        return vec![all];
    }
    let fits = plan.link_bytes.iter().all(|(link, &bytes)| {
        landing
            .get(link)
            .is_some_and(|&have| have >= crate::worker::region_size(bytes))
    });
    if !fits {
        return vec![all];
    }
    let (second, first): (Vec<usize>, Vec<usize>) = all.into_iter().partition(|i| to.contains(i));
    [first, second]
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect()
}

/// A graph looked up in the driver's graph cache for one run ([`SentGraphs::lookup`], which
/// brings the driver's copy to the run's shapes at once), pinned, until the run's messages are
/// out. On every path, each worker of the cluster that no message of the run reached (an
/// error came first, or it takes no part) is marked as missing the lookup's reshapes
/// ([`SentGraphs::skip`]: its next run defines the graph there whole), what a message made for
/// it but not sent carried (sequences to free, graphs to forget) waits for its next message
/// again, and the pin goes; [`Looked::hand_over`] leaves the receivers' part and the pin to a
/// [`SendersDone`].
struct Looked<'a> {
    d: &'a Driver,
    look: crate::cache::Lookup,
    /// Per worker: the run's message to it is out (or a [`SendersDone`] holds it).
    told: Vec<bool>,
    /// Per worker: what a message made for it carries, until it is out.
    carried: Vec<Carried>,
    /// Whether the pin is still this guard's to let go.
    pinned: bool,
}

/// What a `Run` message carries beside the run: the sequences the worker frees and the graphs
/// it forgets first; given back to the driver when the message is never sent.
#[derive(Debug, Default)]
struct Carried {
    free: Vec<u64>,
    forget: Vec<u64>,
}

impl Carried {
    /// Back to `d`'s lists for `worker`'s next message (`sent` is `d`'s graph cache, held).
    fn give_back(self, d: &Driver, sent: &mut SentGraphs, worker: usize) {
        sent.forget_later(worker, self.forget);
        if !self.free.is_empty() {
            if let Some(list) = d.to_free.lock().get_mut(worker) {
                list.extend(self.free);
            }
        }
    }
}

impl<'a> Looked<'a> {
    /// Looks `graph` placed by `placement` up and pins it; its plan for `wanted`.
    fn new(
        d: &'a Driver,
        graph: &Graph,
        placement: &Placement,
        wanted: &[TensorRef],
    ) -> Result<(Self, ExecPlan)> {
        let mut sent = d.sent.lock();
        let look = sent.lookup(graph, placement);
        sent.pin(&look, true);
        let plan = sent.plan(&look, wanted).cloned();
        drop(sent);
        let guard = Looked {
            d,
            look,
            told: vec![false; d.conns.len()],
            carried: (0..d.conns.len()).map(|_| Carried::default()).collect(),
            pinned: true,
        };
        Ok((guard, plan?))
    }

    /// The run's message to `worker` is out.
    fn told(&mut self, worker: usize) {
        if let Some(t) = self.told.get_mut(worker) {
            *t = true;
        }
        if let Some(c) = self.carried.get_mut(worker) {
            *c = Carried::default();
        }
    }

    /// `done` holds the receivers' messages (and what they carry) and takes the pin over (its
    /// drop settles them, once its `driver` is set); the other workers not told are settled
    /// now.
    fn hand_over(mut self, done: &mut SendersDone) {
        for (i, _) in &done.msgs {
            if let Some(c) = self.carried.get_mut(*i) {
                done.carried.push((*i, std::mem::take(c)));
            }
            self.told(*i);
        }
        self.pinned = false;
    }
}

impl Drop for Looked<'_> {
    fn drop(&mut self) {
        let mut sent = self.d.sent.lock();
        for (i, told) in self.told.iter().enumerate() {
            if !*told {
                sent.skip(&self.look, i);
                std::mem::take(&mut self.carried[i]).give_back(self.d, &mut sent, i);
            }
        }
        if self.pinned {
            sent.pin(&self.look, false);
        }
    }
}

/// How [`Driver::run_rounds`] hands a run out.
enum Rounds<'a> {
    /// To every worker at once.
    One,
    /// Senders first when it can ([`rounds`]), then the receivers; the callback once the
    /// senders are done.
    SendersFirst(&'a mut dyn FnMut()),
    /// Senders first when it can, and the receivers' round left to the caller
    /// ([`Driver::send_senders`]).
    SendersOnly,
}

/// What [`Driver::run_rounds`] did.
enum Ran {
    Done(RunOutput),
    Senders(Box<SendersDone>),
}

impl Ran {
    /// The output of a run whose mode runs it whole ([`Rounds::One`],
    /// [`Rounds::SendersFirst`]).
    fn done(self) -> Result<RunOutput> {
        match self {
            Ran::Done(out) => Ok(out),
            Ran::Senders(_) => Err(RuntimeError::Plan(
                "a run handed out whole stopped after its senders".into(),
            )),
        }
    }
}

/// What [`Driver::send_senders`] did: the whole run (it went in one round), or its senders'
/// round.
#[derive(Debug)]
pub enum Sending {
    /// The run is over.
    Done(RunOutput),
    /// The senders are done; the receivers' round waits.
    Senders(Box<SendersDone>),
}

/// A run whose senders are done and whose receivers' round waits ([`Driver::send_senders`]):
/// give it to [`Driver::take_in`]. Dropped unsent, its receivers are told the graph again with
/// their next run (what landed for it is never read), and the landing regions are free again.
pub struct SendersDone {
    /// Set once it is handed out (the pin and the unsent messages are its to settle).
    driver: Option<Arc<Driver>>,
    look: crate::cache::Lookup,
    run: u64,
    plan: ExecPlan,
    /// The receivers' messages, by worker.
    msgs: Vec<(usize, Vec<u8>)>,
    /// What they carry, by worker (given back where they are never sent).
    carried: Vec<(usize, Carried)>,
    sent_all: bool,
    /// The senders' replies.
    replies: Vec<(usize, Msg, Vec<u8>)>,
    start: Instant,
    in_bytes: u64,
    wanted: Vec<TensorRef>,
    used: usize,
}

impl SendersDone {
    /// When the senders' round started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// The workers of the receivers' round.
    pub fn receivers(&self) -> Vec<usize> {
        self.msgs.iter().map(|(i, _)| *i).collect()
    }

    /// Sends the receivers' messages (the caller holds them, or a stream on the one); the
    /// run in flight, its senders' replies with it.
    fn send(mut self: Box<Self>, d: &Driver) -> Result<InFlight> {
        for (i, bytes) in &self.msgs {
            if let Err(e) = d.conns[*i].send(bytes) {
                return Err(d.fail(d.names[*i].clone(), e.to_string()));
            }
        }
        self.sent_all = true;
        Ok(InFlight {
            run: self.run,
            plan: self.plan.clone(),
            wanted: std::mem::take(&mut self.wanted),
            start: self.start,
            in_bytes: self.in_bytes,
            senders: std::mem::take(&mut self.replies),
            used: self.used,
        })
    }
}

impl std::fmt::Debug for SendersDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendersDone")
            .field("run", &self.run)
            .field("receivers", &self.receivers())
            .finish()
    }
}

impl Drop for SendersDone {
    fn drop(&mut self) {
        let Some(d) = &self.driver else { return };
        let mut sent = d.sent.lock();
        if !self.sent_all {
            // Their messages defined or reshaped the graph for them: not delivered, so told
            // again next time, with the sequences to free and graphs to forget they carried.
            for (i, _) in &self.msgs {
                sent.skip(&self.look, *i);
            }
            for (i, c) in std::mem::take(&mut self.carried) {
                c.give_back(d, &mut sent, i);
            }
        }
        sent.pin(&self.look, false);
    }
}

/// Spans, counters and transfer samples of a run from its workers' statistics.
fn assemble(
    names: &[String],
    graph: &Graph,
    plan: &ExecPlan,
    stats: Vec<Option<RunStats>>,
    outputs: Vec<Tensor>,
    wall: Duration,
) -> RunOutput {
    let mut spans = Vec::new();
    let mut counters = CounterSnapshot::default();
    let mut posted = std::collections::HashMap::new();
    let mut arrived = std::collections::HashMap::new();
    let mut peak = Vec::new();
    for (i, s) in stats.iter().enumerate() {
        let Some(s) = s else {
            peak.push(0);
            continue;
        };
        peak.push(s.peak_store_bytes);
        for c in &s.compute {
            let name = graph
                .node(NodeId(c.node))
                .map_or_else(|| format!("#{}", c.node), |n| n.name.clone());
            spans.push(Span {
                name,
                kind: SpanKind::Compute {
                    worker: names[i].clone(),
                },
                start_us: c.start_us,
                dur_us: c.dur_us,
            });
        }
        posted.extend(s.posted.iter().copied());
        arrived.extend(s.arrived.iter().copied());
        counters.recomputes += s.recomputes;
        counters.cache_hits += s.cache_hits;
        counters.nodes += s.nodes;
    }
    let mut transfers = Vec::new();
    for t in &plan.transfers {
        counters.transfers += 1;
        counters.bytes_moved += t.bytes;
        if let (Some(&p), Some(&a)) = (posted.get(&t.id), arrived.get(&t.id)) {
            let name = graph
                .node(t.tensor.node)
                .map_or_else(String::new, |n| n.name.clone());
            let dur = (a - p).max(0.0);
            spans.push(Span {
                name,
                kind: SpanKind::Transfer {
                    src: names[t.src].clone(),
                    dst: names[t.dst].clone(),
                    bytes: t.bytes,
                },
                start_us: p,
                dur_us: dur,
            });
            transfers.push(TransferSample {
                src: t.src,
                dst: t.dst,
                bytes: t.bytes,
                seconds: dur / 1e6,
            });
        }
    }
    // Workers stamp µs since the epoch; make the run start at 0.
    let origin = spans
        .iter()
        .map(|s| s.start_us)
        .fold(f64::INFINITY, f64::min);
    if origin.is_finite() {
        for s in &mut spans {
            s.start_us -= origin;
        }
    }
    spans.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
    RunOutput {
        outputs,
        spans,
        counters,
        transfers,
        wall,
        peak_store_bytes: peak,
        driver_bytes: 0,
    }
}

/// Workers running as threads of this process, each with its own endpoint on loopback.
pub struct EmbeddedCluster {
    /// The cluster they form.
    pub cluster: Cluster,
    /// Which transport backend they use and why.
    pub selection: BackendSelection,
    workers: Vec<EmbeddedWorker>,
}

/// One worker thread of an [`EmbeddedCluster`].
struct EmbeddedWorker {
    name: String,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

/// How long [`EmbeddedCluster::stop`] waits for a worker to act on the driver's `Shutdown`
/// before stopping it through its flag.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl std::fmt::Debug for EmbeddedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCluster")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl EmbeddedCluster {
    /// Starts `n` workers `w0..` on ephemeral loopback ports.
    pub fn start(n: usize, kernels: Arc<dyn Kernels>) -> Result<Self> {
        Self::start_with(n, kernels, WorkerOptions::default())
    }

    /// Starts `n` workers like [`EmbeddedCluster::start`], each limited by `opts`.
    pub fn start_with(n: usize, kernels: Arc<dyn Kernels>, opts: WorkerOptions) -> Result<Self> {
        let mut endpoints = Vec::new();
        let proto_cluster = Cluster {
            workers: vec![],
            secret: None,
            insecure: false,
            rdma: Default::default(),
            peer_timeout: crate::cluster::DEFAULT_PEER_TIMEOUT,
            links: Vec::new(),
        };
        let mut selection = None;
        for _ in 0..n {
            let cfg = transport_config(&proto_cluster, SocketAddr::from(([127, 0, 0, 1], 0)));
            let (ep, sel) =
                genie_transport::open_with_selection(cfg).map_err(|e| RuntimeError::Transport {
                    worker: "embedded".into(),
                    source: e,
                })?;
            selection = Some(sel);
            endpoints.push(ep);
        }
        let cluster = Cluster {
            workers: endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| WorkerSpec {
                    name: format!("w{i}"),
                    address: e.local_addr(),
                    devices: vec![DeviceKind::Cpu],
                    role: crate::cluster::Role::Both,
                    rdma: None,
                })
                .collect(),
            secret: None,
            insecure: false,
            rdma: Default::default(),
            peer_timeout: crate::cluster::DEFAULT_PEER_TIMEOUT,
            links: Vec::new(),
        };
        let mut workers = Vec::new();
        for (i, ep) in endpoints.into_iter().enumerate() {
            let (c, k, o) = (cluster.clone(), kernels.clone(), opts.clone());
            let name = format!("w{i}");
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread_name = name.clone();
            let thread = std::thread::Builder::new()
                .name(format!("genie-{name}"))
                .spawn(move || worker::serve_until(ep, c, &thread_name, k, o, flag))
                .map_err(|e| RuntimeError::WorkerFailed {
                    worker: name.clone(),
                    reason: e.to_string(),
                })?;
            workers.push(EmbeddedWorker { name, stop, thread });
        }
        let selection = selection.ok_or_else(|| RuntimeError::Plan("no workers".into()))?;
        Ok(Self {
            cluster,
            selection,
            workers,
        })
    }

    /// Shuts the workers down (through `driver`) and joins their threads. A worker that has not
    /// stopped 5 s after the driver's `Shutdown` (its driver connection ended
    /// before the message reached it) is stopped through its flag, and the first such worker is
    /// the error: never a hang.
    pub fn stop(self, driver: Driver) -> Result<()> {
        driver.shutdown()?;
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut missed = None;
        let mut failed = None;
        for w in self.workers {
            while !w.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !w.thread.is_finished() {
                w.stop.store(true, Ordering::Relaxed);
                missed.get_or_insert_with(|| w.name.clone());
            }
            let r = w.thread.join().unwrap_or_else(|_| {
                Err(RuntimeError::WorkerFailed {
                    worker: w.name.clone(),
                    reason: "worker thread panicked".into(),
                })
            });
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        match missed {
            Some(worker) => Err(RuntimeError::WorkerFailed {
                worker,
                reason: format!(
                    "did not see the driver's shutdown within {SHUTDOWN_GRACE:?}; stopped through its flag"
                ),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuKernels;

    /// A GPT-2 small enough for a test's moves.
    fn tiny() -> genie_scheduler::builders::Gpt2Config {
        genie_scheduler::builders::Gpt2Config {
            layers: 2,
            hidden: 32,
            heads: 2,
            vocab: 64,
            context: 32,
            ..Default::default()
        }
    }

    /// Two embedded workers and a driver on them (shared, as an engine's lanes share it).
    fn two_workers(seed: u64) -> (EmbeddedCluster, Arc<Driver>) {
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(seed)).unwrap();
        (cluster, Arc::new(driver))
    }

    /// The move of a `len`-token prompt's KV cache of `cfg` from w0 to w1, placed.
    fn move_of(cfg: &genie_scheduler::builders::Gpt2Config, len: usize) -> (Graph, Placement) {
        use genie_scheduler::graph::OpKind;
        let mv = genie_scheduler::builders::kv_move(cfg.layers, cfg.hidden, len).unwrap();
        let place = Placement::by_rule(&mv, |n| usize::from(matches!(n.op, OpKind::KvCacheAppend)));
        (mv, place)
    }

    /// A KV cache's move (reads on w0, appends on w1) goes in one round while the driver does
    /// not know w1's landing region for w0, in two (w0, then w1) once it does; the callback of
    /// `run_senders_first` comes once either way; the moved cache is the source's bit for bit
    /// (a decode step over either gives the same logits). A run where a worker both receives
    /// and sends (a pipeline over three workers) stays in one round.
    #[test]
    fn a_kv_move_goes_in_two_rounds_once_the_landing_region_is_known() {
        use crate::models::{prefill_last, run_decode_step, run_prefill, Family};
        use genie_scheduler::builders::gpt2_prefill;
        let cfg = tiny();
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(3)).unwrap();
        let prompt: Vec<i64> = (1..=6).collect();
        for seq in 1..=3u64 {
            let (g, last) = prefill_last(&cfg, prompt.len()).unwrap();
            run_prefill(&driver, &g, &Placement::single(&g), &prompt, last, seq).unwrap();
            let (mv, place) = move_of(&cfg, prompt.len());
            let plan = ExecPlan::new(&mv, &place, &[]).unwrap();
            let split = rounds(&plan, &driver.landing.lock(), vec![0, 1]);
            let want = if seq == 1 {
                vec![vec![0, 1]]
            } else {
                vec![vec![0], vec![1]]
            };
            assert_eq!(split, want, "move {seq}");
            let mut called = 0;
            driver
                .run_senders_first(&mv, &place, &[], &[], &[seq], || called += 1)
                .unwrap();
            assert_eq!(called, 1, "move {seq}");
            let d = cfg.decode(prompt.len()).unwrap();
            let on = |w: usize| -> Vec<f32> {
                let place = Placement::by_rule(&d, |_| w);
                let out = run_decode_step(&driver, &d, &place, 7, prompt.len(), seq).unwrap();
                out.outputs[0].flatten_all().unwrap().to_vec1().unwrap()
            };
            assert_eq!(on(0), on(1), "move {seq}");
        }
        // w1 receives from w0 and sends to w2: one round, whatever the driver knows.
        let g = gpt2_prefill(&cfg, 4).unwrap();
        let plan = ExecPlan::new(&g, &Placement::contiguous(&g, 3).unwrap(), &[]).unwrap();
        let all_known = plan.link_bytes.keys().map(|&l| (l, u64::MAX)).collect();
        assert_eq!(rounds(&plan, &all_known, vec![0, 1, 2]).len(), 1);
        cluster.stop(driver).unwrap();
    }

    /// A move's senders' round alone (`send_senders`) and its receivers' round later
    /// (`take_in`), with a decode step on the receiver between them: the cache lands bit for bit
    /// (a decode step over either copy gives the same logits). A senders' round dropped before
    /// its take-in breaks nothing: the receiver is told the graph again, skips what landed for
    /// it, and the next move of that cache lands as well.
    #[test]
    fn a_kv_move_is_taken_in_later_or_never() {
        use crate::models::{prefill_last, run_decode_step, run_prefill, Family};
        let cfg = tiny();
        let (cluster, driver) = two_workers(5);
        let prompt: Vec<i64> = (1..=6).collect();
        let (mv, place) = move_of(&cfg, prompt.len());
        let d = cfg.decode(prompt.len()).unwrap();
        let step = |w: usize, seq: u64| -> Vec<f32> {
            let place = Placement::by_rule(&d, |_| w);
            let out = run_decode_step(&driver, &d, &place, 7, prompt.len(), seq).unwrap();
            out.outputs[0].flatten_all().unwrap().to_vec1().unwrap()
        };
        let senders = |seq: u64| match driver.send_senders(&mv, &place, &[seq]).unwrap() {
            Sending::Senders(s) => s,
            Sending::Done(_) => panic!("move of {seq} in one round"),
        };
        for seq in 1..=3u64 {
            let (g, last) = prefill_last(&cfg, prompt.len()).unwrap();
            run_prefill(&driver, &g, &Placement::single(&g), &prompt, last, seq).unwrap();
        }
        // The first move goes in one round (w1's landing region is not known yet).
        assert!(matches!(
            driver.send_senders(&mv, &place, &[1]).unwrap(),
            Sending::Done(_)
        ));
        let s = senders(2);
        assert_eq!(s.receivers(), [1]);
        let between = step(1, 1);
        driver.take_in(s, &mv).unwrap();
        assert_eq!(step(0, 2), step(1, 2));
        assert_eq!(between, step(0, 1), "the step run between the rounds");
        drop(senders(3));
        driver.take_in(senders(3), &mv).unwrap();
        assert_eq!(step(0, 3), step(1, 3));
        cluster.stop(Arc::try_unwrap(driver).unwrap()).unwrap();
    }

    /// A prefill lane's runs on one stream: a prefill, its move's senders' round right behind
    /// it, the next prefill behind that, the replies read in order; the moved cache lands bit
    /// for bit once taken in, and a prefill on the stream gives the logits a plain run gives.
    /// A senders' round that cannot go on the stream (the first move on the link; a cache
    /// bigger than the landing region) sends nothing, and the move then runs whole, with the
    /// shapes of its graph right on both workers.
    #[test]
    fn a_stream_carries_prefills_and_moves_back_to_back() {
        use crate::models::{prefill_inputs, prefill_last, run_decode_step, run_prefill, Family};
        let cfg = tiny();
        let (cluster, driver) = two_workers(9);
        let prompts: Vec<Vec<i64>> = [6, 4, 9].iter().map(|&n| (1..=n).collect()).collect();
        let moves: Vec<(Graph, Placement)> =
            prompts.iter().map(|p| move_of(&cfg, p.len())).collect();
        let step = |w: usize, seq: u64| -> Vec<f32> {
            let len = prompts[seq as usize - 1].len();
            let d = cfg.decode(len).unwrap();
            let place = Placement::by_rule(&d, |_| w);
            let out = run_decode_step(&driver, &d, &place, 7, len, seq).unwrap();
            out.outputs[0].flatten_all().unwrap().to_vec1().unwrap()
        };
        let send_prefill = |s: &mut StepStream, seq: u64| {
            let prompt = &prompts[seq as usize - 1];
            let (g, last) = prefill_last(&cfg, prompt.len()).unwrap();
            let inputs = prefill_inputs(&[prompt]).unwrap();
            s.send(&g, &Placement::single(&g), (&inputs, &[last]), &[seq], None)
                .unwrap();
            g
        };
        let mut s = driver.stream(0).unwrap();
        // Sequence 1: its move cannot go on the stream (w1's landing region is not known).
        let g1 = send_prefill(&mut s, 1);
        let (mv, place) = &moves[0];
        assert_eq!(s.send_senders(mv, place, &[1]).unwrap(), None);
        s.wait_started(&g1).unwrap();
        drop(s);
        assert!(matches!(
            driver.send_senders(mv, place, &[1]).unwrap(),
            Sending::Done(_)
        ));
        // Sequence 2: prefill, move, and the prefill of 3 behind them.
        let mut s = driver.stream(0).unwrap();
        let g2 = send_prefill(&mut s, 2);
        let (mv, place) = &moves[1];
        assert!(s.send_senders(mv, place, &[2]).unwrap().is_some());
        let g3 = send_prefill(&mut s, 3);
        assert!(s.wait_senders().is_err(), "a prefill's reply is due first");
        let (_, p2) = s.wait_started(&g2).unwrap();
        let senders = s.wait_senders().unwrap();
        assert_eq!(senders.receivers(), [1]);
        s.wait_started(&g3).unwrap();
        // Sequence 3's cache is bigger than the landing region: one round, off the stream.
        let (mv3, place3) = &moves[2];
        assert_eq!(s.send_senders(mv3, place3, &[3]).unwrap(), None);
        drop(s);
        driver.take_in(senders, mv).unwrap();
        assert!(matches!(
            driver.send_senders(mv3, place3, &[3]).unwrap(),
            Sending::Done(_)
        ));
        for seq in 1..=3 {
            assert_eq!(step(0, seq), step(1, seq), "sequence {seq}");
        }
        // The stream's prefill gave what a plain run gives.
        let (g, last) = prefill_last(&cfg, prompts[1].len()).unwrap();
        let plain = run_prefill(&driver, &g, &Placement::single(&g), &prompts[1], last, 4).unwrap();
        let bits =
            |o: &RunOutput| -> Vec<f32> { o.outputs[0].flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(bits(&p2), bits(&plain));
        cluster.stop(Arc::try_unwrap(driver).unwrap()).unwrap();
    }

    /// A move's receivers' round dropped unsent gives back what its message carried: the
    /// sequence the decode worker was to free with it waits for its next message again.
    #[test]
    fn a_receivers_round_dropped_unsent_gives_its_frees_back() {
        use crate::models::{prefill_last, run_prefill};
        let cfg = tiny();
        let (cluster, driver) = two_workers(9);
        let prompt: Vec<i64> = (1..=5).collect();
        let (g, last) = prefill_last(&cfg, prompt.len()).unwrap();
        let (mv, place) = move_of(&cfg, prompt.len());
        for seq in [1, 2] {
            run_prefill(&driver, &g, &Placement::single(&g), &prompt, last, seq).unwrap();
        }
        // The first move runs whole (w1's landing region is known after it).
        assert!(matches!(
            driver.send_senders(&mv, &place, &[1]).unwrap(),
            Sending::Done(_)
        ));
        // Sequence 1 ends: both workers drop it with their next message.
        driver.free_sequence_later(1);
        assert_eq!(driver.frees_pending(), 2);
        let Sending::Senders(done) = driver.send_senders(&mv, &place, &[2]).unwrap() else {
            panic!("the second move goes in two rounds");
        };
        // The senders' message (w0) went with its free, the receivers' (w1) holds the other.
        assert_eq!(driver.frees_pending(), 0);
        drop(done);
        assert_eq!(
            driver.frees_pending(),
            1,
            "the unsent message's free is back"
        );
        driver.flush_frees().unwrap();
        assert_eq!(driver.frees_pending(), 0);
        cluster.stop(Arc::try_unwrap(driver).unwrap()).unwrap();
    }

    /// A worker whose driver connection ended before the driver's `Shutdown` reached it is
    /// stopped through its flag: `stop` returns (never hangs) with an error naming it, after the
    /// grace period; the other worker stops on the message as usual.
    #[test]
    fn stop_never_hangs_on_a_worker_that_missed_the_shutdown() {
        let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
        let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(1)).unwrap();
        driver.conns[1].close();
        let started = Instant::now();
        let e = cluster.stop(driver).unwrap_err().to_string();
        assert!(
            e.contains("w1") && e.contains("did not see the driver's shutdown"),
            "{e}"
        );
        assert!(started.elapsed() < SHUTDOWN_GRACE + Duration::from_secs(2));
    }
}
