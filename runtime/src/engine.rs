//! A serving engine: many concurrent requests over one [`Driver`], for serving stacks to link.
//!
//! [`Engine::submit`] takes a [`Request`] (prompt token ids, max new tokens, stop tokens, greedy
//! or seeded sampling) from any thread and returns a [`RequestHandle`] that streams the tokens
//! as they are produced; [`Engine::cancel`] (or dropping the handle) ends a request early; each
//! finished request reports its [`Timings`] (queue, prefill, KV transfer, first token, every
//! token).
//!
//! # How requests run
//!
//! Lanes run at once, on disjoint workers of one shared [`Driver`]:
//! - a **prefill lane** per prefill worker (a thread of its own; [`EngineConfig::prefill_worker`]
//!   and the pool [`EngineConfig::prefill_pool`]) prefills one request at a time on its worker,
//!   its KV cache built there. The lane streams the request's first token, from the prefill's
//!   logits, as soon as the prefill is done, and moves the cache to the decode worker in a short
//!   run of its own ([`kv_move_batch`]: every layer read back and sent, each layer travelling
//!   while the next is read), hands the request over, and drops the prefill worker's copy (a
//!   request that ended at its first token ends once the move is over, its cache then freed on
//!   both workers). The move goes in two rounds: the prefill worker posts its sends
//!   ([`StepStream::send_senders`]), then the engine thread has the decode worker take in what
//!   landed between two of its decode steps, on its step stream ([`StepStream::take_in`], or
//!   [`Driver::take_in`] when it has none). The lane sends the prefill worker's runs on a step
//!   stream of its own, each behind the one before: a prefill, its move's first round, the next
//!   waiting prefill, so that the prefill worker goes from one to the next with no round trip
//!   between, and computes the next request while this one's cache travels. A move's first
//!   round is sent once the decode worker took in the last one (the same landing region); the
//!   first move on a link, before its landing region is known, runs whole.
//!   Waiting requests are taken in arrival order (or shortest
//!   prompt first: [`EngineConfig::prefill_order`]), each by the lane where the cost model has
//!   its cache on the decode worker soonest (prompt tokens queued there, and the link to the
//!   decode worker: [`EngineConfig::prefill_pool`]; a lane holds two requests at most: the one
//!   it runs and the next, which it sends behind the first), so several prefills
//!   run at once on a pool. Short prompts waiting one after another go to the lane together
//!   and are prefilled in one forward pass ([`EngineConfig::max_prefill_batch`], up to 64 prompt
//!   tokens in all, each prompt's result bitwise its prefill alone), and their caches move in
//!   one run;
//! - the **decode lane** (the engine thread) runs one batched forward pass per round over every
//!   active sequence on the decode worker ([`EngineConfig::max_batch`] at most per pass), each
//!   against its own KV length. A sequence joins the pass after its cache landed and leaves
//!   when it ends, without draining the others. While every active request is greedy, each
//!   step is sent before the one ahead of it has answered ([`EngineConfig::step_ahead`], a
//!   [`StepStream`]): a sequence in the step in flight takes its next token from that step's
//!   reply on the worker, so the decode worker goes from step to step while the engine streams
//!   the last step's tokens and prepares the next. A finished request's KV cache is dropped by
//!   the worker before its next run (it rides on that run's message; never a round trip that
//!   would hold the engine thread), and at shutdown.
//!
//! So a long prefill never stalls decode steps: the decode worker pauses only to take in a moved
//! cache. When the prefill and decode workers are one worker (a co-located engine), there is one
//! lane: a waiting prefill (or a batch of short ones) runs, its cache built in place, before that
//! worker's next decode pass.
//! Every placement comes from the scheduler (`create_schedule` with the run's worker as its only
//! device and the KV caches' worker as their device, so the co-location constraint keeps each cache
//! with its layer's group); its schedule cache answers repeated shapes. A request's KV cache is
//! freed when it finishes, fails or is cancelled.
//!
//! # Admission
//!
//! Every request reserves its whole KV cache (prompt + max new tokens, every layer) from a pool
//! of [`EngineConfig::kv_pool_bytes`] when it is submitted, and gives it back when it ends. A
//! request that does not fit the free pool is refused at once with
//! [`EngineError::KvPoolFull`]: a caller never waits on a full pool and nothing is dropped later.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use genie_runtime::driver::{Driver, EmbeddedCluster};
//! use genie_runtime::engine::{Engine, EngineConfig, Request};
//! use genie_runtime::kernels::CpuKernels;
//! use genie_runtime::proto::WeightSpec;
//! use genie_scheduler::builders::Gpt2Config;
//!
//! let cluster = EmbeddedCluster::start(2, Arc::new(CpuKernels::new())).unwrap();
//! let driver = Driver::connect(&cluster.cluster, WeightSpec::Seeded(7)).unwrap();
//! let model = Gpt2Config { layers: 2, hidden: 64, heads: 2, vocab: 256, context: 64, ..Gpt2Config::default() };
//! let engine = Engine::start(driver, EngineConfig::disaggregated(model)).unwrap();
//! let handle = engine.submit(Request::greedy(vec![1, 2, 3], 4)).unwrap();
//! let tokens: Vec<i64> = handle.tokens().collect::<Result<_, _>>().unwrap();
//! assert_eq!(tokens.len(), 4);
//! let driver = engine.shutdown().unwrap();
//! cluster.stop(driver).unwrap();
//! ```

use crate::cluster::{Cluster, Role, WorkerLink};
use crate::driver::{Driver, RunOutput, SendersDone, Sending, StepStream};
use crate::error::RuntimeError;
use crate::models::{
    argmax_last, decode_inputs, pick, prefill_inputs, prefill_last, run_decode_batch, run_prefill,
    run_prefill_batch, with_next_tokens, Family, Model,
};
use crate::plan::Placement;
use crate::proto::{Feed, WeightSpec};
use crate::trace::Span;
use candle_core::Tensor;
use genie_scheduler::builders::{kv_move_batch, MAX_DECODE_BATCH};
use genie_scheduler::graph::{Graph, OpKind, TensorRef};
use genie_scheduler::topology::LinkSpec;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the next token is chosen from a step's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Random sampling from a seeded generator: the same request and seed give the same tokens.
    Seeded {
        /// Generator seed.
        seed: u64,
        /// Logits are divided by this (> 0; 1.0 leaves them as they are).
        temperature: f32,
        /// Keep only the `k` most likely tokens (0: all).
        top_k: usize,
        /// Keep the smallest set of most likely tokens whose probability reaches `p` (1.0: all).
        top_p: f32,
    },
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<i64>,
    /// Tokens to generate at most (at least one; the first comes from prefill).
    pub max_new_tokens: usize,
    /// Generation ends after any of these tokens (which is streamed).
    pub stop: Vec<i64>,
    /// How tokens are chosen.
    pub sampling: Sampling,
}

impl Request {
    /// A greedy request without stop tokens.
    pub fn greedy(prompt: Vec<i64>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            stop: Vec::new(),
            sampling: Sampling::Greedy,
        }
    }
}

/// Why the engine refused or ended a request.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum EngineError {
    /// The request is malformed (empty prompt, zero tokens, a token outside the vocabulary,
    /// longer than the model's context, bad sampling parameters).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Its KV cache does not fit the free part of the pool now; retry when requests finish.
    #[error("KV pool full: the request needs {need} bytes, {free} of {pool} are free")]
    KvPoolFull {
        /// Bytes of KV cache the request needs.
        need: u64,
        /// Bytes free now.
        free: u64,
        /// The pool's size.
        pool: u64,
    },
    /// A worker this request ran on failed (died, stalled past the peer timeout, or was
    /// restarted): its KV cache is gone with it.
    #[error("worker {worker} failed: {reason}")]
    WorkerFailed {
        /// The worker's name.
        worker: String,
        /// What was observed.
        reason: String,
    },
    /// A run of this request failed for another reason (a kernel, a malformed graph): the
    /// runtime's error.
    #[error("request failed: {0}")]
    Failed(String),
    /// The engine shut down (or its thread ended) before the request finished.
    #[error("the engine is shut down")]
    ShutDown,
    /// No token arrived within the caller's timeout (the request goes on).
    #[error("no token within {0:?}")]
    Timeout(Duration),
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced `max_new_tokens` tokens.
    Length,
    /// It produced one of its stop tokens.
    Stop,
    /// It was cancelled.
    Cancelled,
}

/// Where a request's time went, each measured by the engine thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Submission to the start of its prefill.
    pub queue: Duration,
    /// The worker that ran its prefill (one of [`EngineConfig::prefill_workers`]).
    pub prefill_worker: usize,
    /// The prefill run (driver wall time).
    pub prefill: Duration,
    /// Requests prefilled in one forward pass with this one, itself included: 1 alone, more
    /// when short prompts waiting together were prefilled as one batch (at most 64 prompt
    /// tokens in all, each prompt's result bitwise its prefill alone).
    pub prefill_batch: usize,
    /// The KV cache's move from the prefill worker to the decode worker (driver wall time of
    /// that run, from the prefill worker's message to the decode worker's reply: it includes
    /// the decode worker finishing the decode step it was running; zero when they are one
    /// worker).
    pub kv_transfer: Duration,
    /// Bytes moved between workers for this request's prefill and KV move.
    pub kv_bytes: u64,
    /// Submission to the first token. It comes from the prefill's logits and is streamed by the
    /// prefill lane as soon as the prefill is done, while the KV cache moves to the decode
    /// worker (so it does not include [`Timings::kv_transfer`]).
    pub first_token: Duration,
    /// Submission to each token (the first included).
    pub tokens: Vec<Duration>,
}

/// A request's end: its tokens, why it ended, and its timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Every generated token.
    pub tokens: Vec<i64>,
    /// Why it ended.
    pub reason: FinishReason,
    /// Where its time went.
    pub timings: Timings,
}

/// What a request's handle receives.
#[derive(Debug)]
enum Event {
    Token(i64),
    Done(FinishReason, Timings),
    Failed(EngineError),
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The model, of any family ([`Model`]; a `Gpt2Config` or `LlamaConfig` converts).
    pub model: Model,
    /// Worker index that runs prefills.
    pub prefill_worker: usize,
    /// Further workers that run prefills beside `prefill_worker` (a prefill pool; empty by
    /// default), each with a prefill lane of its own. A waiting request goes to one of them that
    /// holds fewer than two requests (the one it runs and the next): the one where the cost
    /// model has it ready soonest, that is the prompt tokens queued there and its own at the
    /// measured prefill rate plus its KV cache's transfer to the decode worker over that
    /// worker's link ([`EngineConfig::links`]); then the one that has prefilled the fewest
    /// tokens so far, ties to the first listed (`prefill_worker` first). With every link alike
    /// that is the one with the fewest prompt tokens queued. Requests wait while all are full.
    /// None may be the decode worker.
    pub prefill_pool: Vec<usize>,
    /// Worker index where KV caches are pinned and decode steps run.
    pub decode_worker: usize,
    /// KV pool size in bytes (see the module docs).
    pub kv_pool_bytes: u64,
    /// Requests waiting for prefill at most; more are refused with [`EngineError::KvPoolFull`]
    /// (a bound on what callers can make the engine queue).
    pub max_waiting: usize,
    /// Keep every run's compute and transfer spans (for [`Engine::take_spans`] and a Perfetto
    /// trace); off by default.
    pub record_spans: bool,
    /// Most sequences in one batched decode step (1 to [`MAX_DECODE_BATCH`]; default 32). More
    /// active sequences take several steps per round.
    pub max_batch: usize,
    /// The order in which waiting requests are prefilled (default: as they arrived).
    pub prefill_order: PrefillOrder,
    /// Requests running at most (prefilling or decoding; at least 1; default 256): more wait
    /// for a running one to end before their prefill starts. Each decode step's time grows
    /// with the sequences in it, so this bounds the time per output token, at the cost of the
    /// time to first token of the requests that wait.
    pub max_running: usize,
    /// Most requests one prefill takes (at least 1; default 8): short prompts waiting one after
    /// another go to their lane together, up to 64 prompt tokens in all
    /// ([`crate::kernels::EXACT_BATCH_ROWS`]: each prompt's logits and cache are then bitwise
    /// those of its prefill alone), and are prefilled in one forward pass
    /// ([`Family::prefill_batch`]). 1 prefills every request alone.
    pub max_prefill_batch: usize,
    /// Links between workers that differ from the default ([`crate::plan::cpu_topology`]'s),
    /// as a cluster file's `[[links]]` give them ([`EngineConfig::for_cluster`] copies them):
    /// the scheduler's topology, and so the choice of prefill worker for each request (see
    /// [`EngineConfig::prefill_pool`]). Empty by default: every link alike.
    pub links: Vec<WorkerLink>,
    /// Send each decode step before the one ahead of it has answered (on by default), so that
    /// the decode worker goes from step to step without waiting for the engine to read a
    /// step's reply and send the next ([`crate::driver::StepStream`]; a step's greedy tokens
    /// reach the next on the worker). Applies while every active request is greedy and fits one
    /// pass; the tokens are the same either way.
    pub step_ahead: bool,
}

/// The order in which waiting requests go to prefill ([`EngineConfig::prefill_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillOrder {
    /// First come, first served.
    #[default]
    Arrival,
    /// The shortest prompt first (ties by arrival), so that short requests do not queue behind
    /// long prompts when prefill is the bottleneck: more requests meet a time-to-first-token
    /// bound, long prompts wait longer. None starves: once the oldest waiting request has
    /// waited `max_wait`, it goes next.
    ShortestFirst {
        /// The longest a request waits before it goes next whatever its length.
        max_wait: Duration,
    },
}

impl PrefillOrder {
    /// Which of `waiting` (prompt lengths and time waited, in arrival order) goes next.
    fn next(self, waiting: impl ExactSizeIterator<Item = (usize, Duration)>) -> Option<usize> {
        match self {
            PrefillOrder::Arrival => (waiting.len() > 0).then_some(0),
            PrefillOrder::ShortestFirst { max_wait } => {
                let mut best: Option<(usize, usize)> = None;
                for (i, (len, waited)) in waiting.enumerate() {
                    // The oldest is first in line: once it waited long enough, it goes.
                    if i == 0 && waited >= max_wait {
                        return Some(0);
                    }
                    if best.map_or(true, |(l, _)| len < l) {
                        best = Some((len, i));
                    }
                }
                best.map(|(_, i)| i)
            }
        }
    }
}

impl EngineConfig {
    /// Prefill on worker 0, decode on worker 1, a 256 MiB KV pool.
    pub fn disaggregated(model: impl Into<Model>) -> Self {
        Self {
            model: model.into(),
            prefill_worker: 0,
            prefill_pool: Vec::new(),
            decode_worker: 1,
            kv_pool_bytes: 256 << 20,
            max_waiting: 1024,
            record_spans: false,
            max_batch: 32,
            prefill_order: PrefillOrder::Arrival,
            max_running: 256,
            max_prefill_batch: 8,
            links: Vec::new(),
            step_ahead: true,
        }
    }

    /// The configuration for `cluster`'s roles: prefill on the first worker whose role is
    /// `prefill`, else the first `both`; decode on the first `decode`, else the first other
    /// `both`, else the prefill worker itself (co-located). Every further `prefill` worker joins
    /// the prefill pool. The cluster's links come along ([`EngineConfig::links`]).
    pub fn for_cluster(model: impl Into<Model>, cluster: &Cluster) -> Result<Self, RuntimeError> {
        let first = |want: Role, skip: Option<usize>| {
            cluster
                .workers
                .iter()
                .enumerate()
                .find(|(i, w)| w.role == want && Some(*i) != skip)
                .map(|(i, _)| i)
        };
        let prefill = first(Role::Prefill, None)
            .or_else(|| first(Role::Both, None))
            .ok_or_else(|| {
                RuntimeError::Plan("the cluster has no worker that may prefill".into())
            })?;
        let decode = first(Role::Decode, None)
            .or_else(|| first(Role::Both, Some(prefill)))
            .or_else(|| cluster.workers[prefill].role.decodes().then_some(prefill))
            .ok_or_else(|| {
                RuntimeError::Plan("the cluster has no worker that may decode".into())
            })?;
        let pool = cluster
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| w.role == Role::Prefill && *i != prefill && *i != decode)
            .map(|(i, _)| i)
            .collect();
        Ok(Self {
            prefill_worker: prefill,
            prefill_pool: pool,
            decode_worker: decode,
            links: cluster.links.clone(),
            ..Self::disaggregated(model)
        })
    }

    /// The workers that run prefills: `prefill_worker`, then the pool (each once).
    pub fn prefill_workers(&self) -> Vec<usize> {
        let mut all = vec![self.prefill_worker];
        for &w in &self.prefill_pool {
            if !all.contains(&w) {
                all.push(w);
            }
        }
        all
    }

    /// Bytes of KV cache a sequence of `tokens` positions takes (K and V, every layer, f32).
    pub fn kv_bytes(&self, tokens: usize) -> u64 {
        self.model.kv_bytes(tokens)
    }
}

/// A request in flight: read its tokens as they come.
pub struct RequestHandle {
    id: u64,
    rx: mpsc::Receiver<Event>,
    cmds: mpsc::Sender<Cmd>,
    ended: bool,
}

impl std::fmt::Debug for RequestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandle")
            .field("id", &self.id)
            .finish()
    }
}

/// What [`RequestHandle::next`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The next token.
    Token(i64),
    /// The request ended.
    Done(FinishReason, Timings),
}

impl RequestHandle {
    /// The request's id (for [`Engine::cancel`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits up to `timeout` for the next token or the end.
    pub fn next(&mut self, timeout: Duration) -> Result<Step, EngineError> {
        if self.ended {
            return Err(EngineError::InvalidRequest(format!(
                "request {} already ended",
                self.id
            )));
        }
        let ev = match self.rx.recv_timeout(timeout) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(EngineError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.ended = true;
                return Err(EngineError::ShutDown);
            }
        };
        match ev {
            Event::Token(t) => Ok(Step::Token(t)),
            Event::Done(r, t) => {
                self.ended = true;
                Ok(Step::Done(r, t))
            }
            Event::Failed(e) => {
                self.ended = true;
                Err(e)
            }
        }
    }

    /// Waits for the end and returns every token with the reason and timings.
    pub fn wait(mut self) -> Result<Completion, EngineError> {
        let mut tokens = Vec::new();
        loop {
            match self.next(Duration::from_secs(3600))? {
                Step::Token(t) => tokens.push(t),
                Step::Done(reason, timings) => {
                    return Ok(Completion {
                        tokens,
                        reason,
                        timings,
                    })
                }
            }
        }
    }

    /// The tokens as an iterator (blocking); ends after the last one, or yields the error that
    /// ended the request.
    pub fn tokens(self) -> Tokens {
        Tokens { h: self }
    }
}

impl Drop for RequestHandle {
    /// A request nobody reads is cancelled: its KV cache goes back to the pool.
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.cmds.send(Cmd::Cancel(self.id));
        }
    }
}

/// Blocking iterator over a request's tokens (see [`RequestHandle::tokens`]).
#[derive(Debug)]
pub struct Tokens {
    h: RequestHandle,
}

impl Iterator for Tokens {
    type Item = Result<i64, EngineError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.h.ended {
            return None;
        }
        match self.h.next(Duration::from_secs(3600)) {
            Ok(Step::Token(t)) => Some(Ok(t)),
            Ok(Step::Done(..)) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

enum Cmd {
    Submit {
        id: u64,
        req: Request,
        reserved: u64,
        tx: mpsc::Sender<Event>,
        at: Instant,
    },
    Cancel(u64),
    Shutdown,
    /// Start or stop keeping runs' spans.
    RecordSpans(bool),
    /// The membership changed: the cluster it lists now, or why none can be made of it.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Members(Result<Cluster, RuntimeError>),
    /// The prefill lane finished request `id`'s prefill (its KV cache is about to move), or
    /// failed it.
    Prefilled {
        id: u64,
        result: Result<Box<Prefilled>, RuntimeError>,
    },
    /// Request `id`'s KV cache moved to the decode worker (the run, and when it started), or
    /// the move failed. Follows its `Prefilled`.
    Moved {
        id: u64,
        result: Result<MovedRun, RuntimeError>,
    },
    /// The prefill worker sent these requests' KV caches (a move's first round): the engine
    /// thread has the decode worker take them in ([`Core::take_in_all`]). Follows their
    /// `Prefilled`.
    Sent(Box<TakeIn>),
}

/// A KV move whose senders are done, for the decode worker to take in: its receivers' round,
/// its graph (its spans' names), and what its landing needs.
struct TakeIn {
    senders: Box<SendersDone>,
    graph: Graph,
    taking: Taking,
}

/// A finished prefill: its last position's logits and its run.
struct Prefilled {
    logits: Tensor,
    /// The prefill run, and when it started (shared by the requests prefilled together).
    prefill: Arc<(Instant, RunOutput)>,
    /// Requests prefilled together (this one included), and their prompt tokens.
    batch: (usize, usize),
    /// Whether this is the first of them: its run's spans and rate are counted once, there.
    owner: bool,
    /// The first token, when the lane chose and streamed it itself.
    first: Option<Streamed>,
}

/// A token a prefill lane chose from the prefill's logits and streamed to the request's handle
/// (so that the first token does not wait for the engine thread's decode step in progress).
struct Streamed {
    token: i64,
    /// Submission to the moment it was streamed.
    since: Duration,
    /// Whether the handle was still there to take it.
    sent: bool,
    /// The request's sampling state after choosing it.
    rng: rand_chacha::ChaCha8Rng,
}

/// What a prefill lane needs to stream a request's first token itself.
struct FirstToken {
    tx: mpsc::Sender<Event>,
    sampling: Sampling,
    rng: rand_chacha::ChaCha8Rng,
    /// When the request was submitted.
    at: Instant,
}

impl FirstToken {
    /// Chooses the first token from `logits` and streams it; `None` when it cannot be chosen
    /// (the engine thread then tries and fails the request).
    fn stream(mut self, logits: &Tensor) -> Option<Streamed> {
        let (token, since, sent) =
            stream_token(logits, self.sampling, &mut self.rng, (self.at, &self.tx)).ok()?;
        Some(Streamed {
            token,
            since,
            sent,
            rng: self.rng,
        })
    }
}

/// One prefill for the prefill lane: one request, or several short ones prefilled together.
struct LaneJob {
    reqs: Vec<LaneReq>,
    /// Dropped before the result is sent: an idle lane holds no driver.
    driver: Arc<Driver>,
}

/// A request of a [`LaneJob`].
struct LaneReq {
    id: u64,
    seq: u64,
    prompt: Vec<i64>,
    /// Taken when the prefill is done.
    first: Option<FirstToken>,
}

/// KV caches a lane moves, the ones prefilled together, in one run: per request its id,
/// sequence and cache length.
struct Move {
    reqs: Vec<(u64, u64, usize)>,
    driver: Arc<Driver>,
}

/// A request's part of a KV move ([`Cmd::Moved`]).
struct MovedRun {
    /// The run (shared by the caches moved together), and when it started.
    run: Arc<(Instant, RunOutput)>,
    /// Whether this is the first of them: the run's spans are kept once, there.
    owner: bool,
    /// This request's cache's share of the bytes moved.
    bytes: u64,
}

/// A prefill lane: its worker, its job queue and thread.
struct Lane {
    worker: usize,
    /// Prompt tokens it was given so far (the pool's balance, see [`EngineConfig::prefill_pool`]).
    tokens: u64,
    /// The link from its worker to the decode worker (the scheduler's topology).
    link: LinkSpec,
    jobs: mpsc::Sender<LaneJob>,
    thread: JoinHandle<()>,
    /// Set when the lane stops: it gives up waiting for a take-in the engine will not do.
    stop: Arc<AtomicBool>,
}

/// Jobs a prefill lane holds at most (a job: one request, or several short ones prefilled
/// together): the one it runs and one queued behind it, so that the lane starts its next prefill
/// the moment one ends instead of waiting for the engine thread (busy with a decode step) to hand
/// it one.
const LANE_DEPTH: usize = 2;

/// Most prompt tokens one batched prefill takes (several short waiting prompts in one forward
/// pass, [`Family::prefill_batch`]): the rows for which the kernels' products give every row the
/// bits it has alone ([`crate::kernels::EXACT_BATCH_ROWS`]), so that each request's tokens are
/// the ones it gets served alone.
const PREFILL_BATCH_TOKENS: usize = crate::kernels::EXACT_BATCH_ROWS;

/// The jobs among requests `held` by a lane (each request names its job).
fn jobs(held: &[Active]) -> usize {
    let mut ids: Vec<u64> = held.iter().map(|a| a.job).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

/// What a prefill lane holds, for [`pick_lane`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct LaneLoad {
    /// Jobs it holds (running or queued).
    held: usize,
    /// Their prompt tokens.
    queued: usize,
    /// Prompt tokens it was given so far.
    given: u64,
    /// The link from its worker to the decode worker, as the scheduler's topology has it.
    link: LinkSpec,
}

/// A request for [`pick_lane`]: its prompt tokens and its KV cache's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LaneAsk {
    prompt: usize,
    kv_bytes: u64,
    /// Predicted seconds of prefill per prompt token ([`PrefillRate`]).
    per_token: f64,
}

/// The lane a request goes to: of those holding fewer than [`LANE_DEPTH`] requests, the one
/// where the cost model has its KV cache on the decode worker soonest (the prompt tokens queued
/// there and its own, at `per_token` seconds each, then the cache's transfer over the lane's
/// link), then the one given the fewest tokens so far, ties to the first; `None` when all are
/// full. With every link alike: the fewest prompt tokens queued.
fn pick_lane(loads: &[LaneLoad], ask: LaneAsk) -> Option<usize> {
    let ready =
        |l: &LaneLoad| (l.queued + ask.prompt) as f64 * ask.per_token + l.link.time(ask.kv_bytes);
    (0..loads.len())
        .filter(|&i| loads[i].held < LANE_DEPTH)
        .min_by(|&i, &j| {
            let (a, b) = (&loads[i], &loads[j]);
            ready(a)
                .total_cmp(&ready(b))
                .then(a.given.cmp(&b.given))
                .then(i.cmp(&j))
        })
}

/// Prefills [`PrefillRate`] averages over.
const RATE_SAMPLES: usize = 32;

/// Seconds of prefill per prompt token, for [`pick_lane`]: the scheduler's cost-model estimate
/// until prefills have run, then the measured rate of the last [`RATE_SAMPLES`] (their wall
/// times over their prompt tokens, so the workload's mix of lengths weighs in).
#[derive(Debug, Clone)]
struct PrefillRate {
    estimate: f64,
    recent: VecDeque<(f64, usize)>,
}

impl PrefillRate {
    fn new(estimate: f64) -> Self {
        Self {
            estimate: if estimate.is_finite() && estimate > 0.0 {
                estimate
            } else {
                0.0
            },
            recent: VecDeque::with_capacity(RATE_SAMPLES),
        }
    }

    fn add(&mut self, wall: Duration, tokens: usize) {
        if tokens == 0 {
            return;
        }
        if self.recent.len() == RATE_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back((wall.as_secs_f64(), tokens));
    }

    fn per_token(&self) -> f64 {
        let (secs, tokens) = self
            .recent
            .iter()
            .fold((0.0, 0usize), |(s, t), &(w, n)| (s + w, t + n));
        if tokens == 0 {
            self.estimate
        } else {
            secs / tokens as f64
        }
    }
}

/// Prompt length of the prefill whose cost-model estimate seeds [`PrefillRate`] (shorter where
/// the model's context is).
const RATE_PROMPT: usize = 128;

/// The scheduler's estimate of seconds of prefill per prompt token on worker `pw` (its
/// predicted makespan of a [`RATE_PROMPT`]-token prefill, over the tokens).
fn estimated_rate(
    scheduler: &mut genie_scheduler::Scheduler,
    model: &Model,
    pw: usize,
) -> Result<f64, RuntimeError> {
    let n = RATE_PROMPT.min(model.context()).max(1);
    let (g, _) = prefill_last(model, n)?;
    let (_, makespan) = Placement::scheduled_with_makespan(scheduler, &g, pw, pw)?;
    Ok(makespan / n as f64)
}

/// No request in any of `lanes` prefill lanes (one slot for inline prefills when there are none).
fn idle_lanes(lanes: usize) -> Vec<Vec<Active>> {
    (0..lanes.max(1)).map(|_| Vec::new()).collect()
}

impl Lane {
    /// A lane per prefill worker of `cfg` (none when prefill and decode share one worker),
    /// reporting to `done`.
    fn start_all(
        cfg: &EngineConfig,
        topology: &genie_scheduler::Topology,
        done: &mpsc::Sender<Cmd>,
    ) -> Result<Vec<Self>, RuntimeError> {
        if cfg.prefill_worker == cfg.decode_worker {
            return Ok(Vec::new());
        }
        let mut lanes = Vec::new();
        for pw in cfg.prefill_workers() {
            match Self::start(pw, cfg, topology, done) {
                Ok(l) => lanes.push(l),
                Err(e) => {
                    lanes.into_iter().for_each(Lane::stop);
                    return Err(e);
                }
            }
        }
        Ok(lanes)
    }

    /// The lane of prefill worker `pw`.
    fn start(
        pw: usize,
        cfg: &EngineConfig,
        topology: &genie_scheduler::Topology,
        done: &mpsc::Sender<Cmd>,
    ) -> Result<Self, RuntimeError> {
        let (jobs, queue) = mpsc::channel();
        let (done, model) = (done.clone(), cfg.model.clone());
        let workers = (pw, cfg.decode_worker);
        let id = |i: usize| genie_scheduler::topology::DeviceId(i as u32);
        let link = topology.link(id(pw), id(cfg.decode_worker));
        let scheduler = genie_scheduler::Scheduler::new(topology.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("genie-prefill".into())
            .spawn(move || prefill_lane(&queue, &done, scheduler, &model, (workers, &stopping)))
            .map_err(|e| {
                RuntimeError::Plan(format!("engine: cannot spawn its prefill lane: {e}"))
            })?;
        Ok(Self {
            worker: pw,
            tokens: 0,
            link,
            jobs,
            thread,
            stop,
        })
    }

    /// Ends the lane after the prefill it is running (whose result is not waited for).
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        drop(self.jobs);
        if self.thread.join().is_err() {
            tracing::warn!("engine: the prefill lane panicked");
        }
    }
}

/// The pool and the waiting count, shared by submitters and the engine thread.
#[derive(Debug)]
struct Pool {
    free: u64,
    waiting: usize,
}

/// A thread-safe serving engine (share it with `Arc`; every method takes `&self`).
pub struct Engine {
    cmds: parking_lot::Mutex<mpsc::Sender<Cmd>>,
    pool: Arc<parking_lot::Mutex<Pool>>,
    cfg: EngineConfig,
    next_id: AtomicU64,
    spans: Arc<parking_lot::Mutex<Vec<Span>>>,
    thread: parking_lot::Mutex<Option<JoinHandle<Result<Driver, RuntimeError>>>>,
    /// The membership watch's thread and its stop flag ([`Engine::discover`]).
    watcher: parking_lot::Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

impl Engine {
    /// Starts the engine thread on `driver`. Checks that the configured workers exist. After a
    /// worker failure every later run fails too (the driver's session is gone): use
    /// [`Engine::connect`] for an engine that reconnects.
    pub fn start(driver: Driver, cfg: EngineConfig) -> Result<Self, RuntimeError> {
        Self::start_with(driver, cfg, None, false)
    }

    /// Connects to `cluster`'s workers (which load `weights`) and starts the engine. When a
    /// worker fails, the requests running on the cluster fail with
    /// [`EngineError::WorkerFailed`] naming it (their KV caches went with the driver's
    /// session), and the engine connects again before its next run, so waiting and later
    /// requests are served once the worker is back (restarted, or resumed); while it is not,
    /// each waiting request fails with the reconnection's error.
    pub fn connect(
        cluster: &Cluster,
        weights: WeightSpec,
        cfg: EngineConfig,
    ) -> Result<Self, RuntimeError> {
        let driver = Driver::connect(cluster, weights.clone())?;
        Self::start_with(driver, cfg, Some((cluster.clone(), weights)), false)
    }

    fn start_with(
        driver: Driver,
        cfg: EngineConfig,
        reconnect: Option<(Cluster, WeightSpec)>,
        follow: bool,
    ) -> Result<Self, RuntimeError> {
        let n = driver.names().len();
        if cfg.max_batch == 0 || cfg.max_batch > MAX_DECODE_BATCH {
            return Err(RuntimeError::Plan(format!(
                "engine: max_batch {} (1 to {MAX_DECODE_BATCH})",
                cfg.max_batch
            )));
        }
        if cfg.max_running == 0 {
            return Err(RuntimeError::Plan(
                "engine: max_running 0 (at least 1)".into(),
            ));
        }
        if cfg.max_prefill_batch == 0 || cfg.max_prefill_batch > MAX_DECODE_BATCH {
            return Err(RuntimeError::Plan(format!(
                "engine: max_prefill_batch {} (1 to {MAX_DECODE_BATCH})",
                cfg.max_prefill_batch
            )));
        }
        let prefill = cfg.prefill_workers();
        if prefill.iter().any(|&w| w >= n) || cfg.decode_worker >= n {
            return Err(RuntimeError::Plan(format!(
                "engine: prefill workers {prefill:?} / decode worker {} outside the cluster of {n}",
                cfg.decode_worker
            )));
        }
        if prefill.len() > 1 && prefill.contains(&cfg.decode_worker) {
            return Err(RuntimeError::Plan(format!(
                "engine: the prefill pool {prefill:?} includes the decode worker {}",
                cfg.decode_worker
            )));
        }
        let topology = crate::plan::topology_with_links(n, &cfg.links)?;
        let mut scheduler = genie_scheduler::Scheduler::new(topology.clone());
        // The prefill rate only weighs in where there is a choice of prefill worker.
        let rate = PrefillRate::new(if prefill.len() > 1 {
            estimated_rate(&mut scheduler, &cfg.model, cfg.prefill_worker)?
        } else {
            0.0
        });
        let spans = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pool = Arc::new(parking_lot::Mutex::new(Pool {
            free: cfg.kv_pool_bytes,
            waiting: 0,
        }));
        let lanes = Lane::start_all(&cfg, &topology, &tx)?;
        driver.set_spans(cfg.record_spans);
        let core = Core {
            driver: Some(Arc::new(driver)),
            prefilling: idle_lanes(lanes.len()),
            lanes,
            cmds: tx.clone(),
            follow,
            pending: None,
            cfg: cfg.clone(),
            pool: pool.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            cancelled: HashSet::new(),
            reconnect,
            lost: None,
            scheduler,
            rate,
            spans: (Instant::now(), spans.clone()),
            recording: cfg.record_spans,
            decode_places: HashMap::new(),
            flight: None,
            take_ins: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("genie-engine".into())
            .spawn(move || core.run(rx))
            .map_err(|e| RuntimeError::Plan(format!("engine: cannot spawn its thread: {e}")))?;
        Ok(Self {
            cmds: parking_lot::Mutex::new(tx),
            pool,
            cfg,
            next_id: AtomicU64::new(1),
            spans,
            thread: parking_lot::Mutex::new(Some(thread)),
            watcher: parking_lot::Mutex::new(None),
        })
    }

    /// Submits a request; its tokens stream through the returned handle.
    pub fn submit(&self, req: Request) -> Result<RequestHandle, EngineError> {
        let m = &self.cfg.model;
        if req.prompt.is_empty() || req.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "a request needs at least one prompt token and one new token".into(),
            ));
        }
        if let Some(t) = req
            .prompt
            .iter()
            .find(|&&t| t < 0 || t as u64 >= m.vocab() as u64)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token {t} is outside the vocabulary of {}",
                m.vocab()
            )));
        }
        let total = req.prompt.len().saturating_add(req.max_new_tokens);
        if total > m.context() {
            return Err(EngineError::InvalidRequest(format!(
                "prompt {} + {} new tokens exceed the context of {}",
                req.prompt.len(),
                req.max_new_tokens,
                m.context()
            )));
        }
        if let Sampling::Seeded {
            temperature, top_p, ..
        } = req.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                return Err(EngineError::InvalidRequest(format!(
                    "temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}"
                )));
            }
        }
        // The whole KV cache this request may grow to (the last token is never fed back).
        let need = self.cfg.kv_bytes(total.saturating_sub(1));
        {
            let mut p = self.pool.lock();
            if need > p.free || p.waiting >= self.cfg.max_waiting {
                return Err(EngineError::KvPoolFull {
                    need,
                    free: p.free,
                    pool: self.cfg.kv_pool_bytes,
                });
            }
            p.free -= need;
            p.waiting += 1;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cmds = self.cmds.lock().clone();
        let sent = cmds.send(Cmd::Submit {
            id,
            req,
            reserved: need,
            tx,
            at: Instant::now(),
        });
        if sent.is_err() {
            let mut p = self.pool.lock();
            p.free += need;
            p.waiting -= 1;
            return Err(EngineError::ShutDown);
        }
        Ok(RequestHandle {
            id,
            rx,
            cmds,
            ended: false,
        })
    }

    /// Cancels request `id` (no effect once it ended): its handle gets
    /// [`FinishReason::Cancelled`] after the tokens already produced, and its KV cache is freed.
    pub fn cancel(&self, id: u64) {
        let _ = self.cmds.lock().send(Cmd::Cancel(id));
    }

    /// Starts (or stops) keeping every run's spans, as [`EngineConfig::record_spans`] does from
    /// the start: e.g. for the trace of one part of a benchmark. Runs already handed out keep
    /// the setting they were handed out with.
    pub fn record_spans(&self, on: bool) {
        let _ = self.cmds.lock().send(Cmd::RecordSpans(on));
    }

    /// The spans recorded since the last call (with [`EngineConfig::record_spans`]), µs since
    /// the engine started: one track per worker for compute, one per link for transfers
    /// ([`write_chrome_trace`](crate::trace::write_chrome_trace) makes a Perfetto trace of them).
    pub fn take_spans(&self) -> Vec<Span> {
        std::mem::take(&mut *self.spans.lock())
    }

    /// Bytes of the KV pool free now.
    pub fn kv_free(&self) -> u64 {
        self.pool.lock().free
    }

    /// Stops the engine: requests still running fail with [`EngineError::ShutDown`]; returns the
    /// driver (for [`EmbeddedCluster::stop`](crate::driver::EmbeddedCluster::stop)), or the
    /// worker failure that left the engine without one.
    pub fn shutdown(self) -> Result<Driver, RuntimeError> {
        self.stop_watching();
        let _ = self.cmds.lock().send(Cmd::Shutdown);
        let thread = self.thread.lock().take();
        match thread.map(JoinHandle::join) {
            Some(Ok(driver)) => driver,
            _ => Err(RuntimeError::Plan("the engine thread panicked".into())),
        }
    }
}

#[cfg(feature = "etcd")]
impl Engine {
    /// Serves on the workers registered in etcd under `membership` (feature `etcd`), following
    /// the membership as it changes:
    /// - the prefill and decode workers are chosen by role from the registered workers
    ///   ([`EngineConfig::for_cluster`]; `cfg`'s own indices are ignored), sorted by name;
    /// - a worker that joins is used without a restart: the engine starts no new prefill until
    ///   the requests decoding finish, then connects to the new cluster and chooses the workers
    ///   again (waiting requests are served there);
    /// - a worker the engine runs on whose registration ends (it stopped, or its lease expired
    ///   after it died or lost etcd) takes the requests in flight with it: they fail with
    ///   [`EngineError::WorkerFailed`] naming it, and waiting ones are served on the workers
    ///   left, as [`Engine::connect`] does after a failure.
    ///
    /// The secret comes from the caller's own configuration: etcd never holds it.
    /// [`RuntimeError::NoMembers`] when no worker is registered yet.
    pub fn discover(
        membership: &crate::membership::MembershipConfig,
        (secret, insecure): (Option<String>, bool),
        weights: WeightSpec,
        cfg: EngineConfig,
    ) -> Result<Self, RuntimeError> {
        use crate::membership::{cluster_of, Discovery, MemberEvent};
        use std::collections::BTreeMap;
        let discovery = Discovery::connect(membership)?;
        let watch = discovery.watch()?;
        if watch.initial.is_empty() {
            return Err(RuntimeError::NoMembers {
                prefix: membership.prefix(),
            });
        }
        let mut members: BTreeMap<String, crate::membership::Member> = watch
            .initial
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect();
        let listed: Vec<_> = members.values().cloned().collect();
        let cluster = cluster_of(&listed, secret.clone(), insecure)?;
        let picked = EngineConfig::for_cluster(cfg.model.clone(), &cluster)?;
        let cfg = EngineConfig {
            prefill_worker: picked.prefill_worker,
            prefill_pool: picked.prefill_pool,
            decode_worker: picked.decode_worker,
            ..cfg
        };
        let driver = Driver::connect(&cluster, weights.clone())?;
        let engine = Self::start_with(driver, cfg, Some((cluster, weights)), true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let cmds = engine.cmds.lock().clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("genie-members".into())
            .spawn(move || {
                let _discovery = discovery;
                while !flag.load(Ordering::Relaxed) {
                    let Some(event) = watch.next(Duration::from_millis(200)) else {
                        continue;
                    };
                    match event {
                        MemberEvent::Joined(m) => {
                            members.insert(m.name.clone(), m);
                        }
                        MemberEvent::Left { name } => {
                            members.remove(&name);
                        }
                    }
                    let listed: Vec<_> = members.values().cloned().collect();
                    let cluster = if listed.is_empty() {
                        Err(RuntimeError::Plan("no worker is registered".into()))
                    } else {
                        cluster_of(&listed, secret.clone(), insecure)
                    };
                    if cmds.send(Cmd::Members(cluster)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RuntimeError::Plan(format!("engine: cannot spawn its watch: {e}")))?;
        *engine.watcher.lock() = Some((stop, thread));
        Ok(engine)
    }
}

impl Engine {
    fn stop_watching(&self) {
        if let Some((stop, thread)) = self.watcher.lock().take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    /// An engine dropped without [`Engine::shutdown`] shuts down the same way (its requests
    /// fail with [`EngineError::ShutDown`]) and drops its driver.
    fn drop(&mut self) {
        self.stop_watching();
        if let Some(thread) = self.thread.lock().take() {
            let _ = self.cmds.lock().send(Cmd::Shutdown);
            let _ = thread.join();
        }
    }
}

/// A request between prefill and its end.
struct Active {
    id: u64,
    seq: u64,
    /// The lane job it was prefilled in (its first request's id).
    job: u64,
    req: Request,
    tx: mpsc::Sender<Event>,
    reserved: u64,
    at: Instant,
    tokens: Vec<i64>,
    timings: Timings,
    rng: rand_chacha::ChaCha8Rng,
    /// How it ended while its KV cache was still moving (at its first token, cancelled, or
    /// failed): it is finished once the move is over, its cache then freed on both workers.
    ended: Option<Result<FinishReason, EngineError>>,
}

struct Waiting {
    id: u64,
    req: Request,
    reserved: u64,
    tx: mpsc::Sender<Event>,
    at: Instant,
}

/// The engine thread's state.
struct Core {
    /// `None` only between dropping a failed session's driver and connecting again. Shared
    /// with the prefill lane for the length of a job.
    driver: Option<Arc<Driver>>,
    /// The prefill lanes, one per prefill worker (none when prefill and decode share a worker:
    /// prefills run inline).
    lanes: Vec<Lane>,
    /// The requests each lane holds, the running one first ([`LANE_DEPTH`] at most; slot 0
    /// for an inline prefill, one at most).
    prefilling: Vec<Vec<Active>>,
    /// Where the lane reports (a lane started after a cluster change needs it).
    cmds: mpsc::Sender<Cmd>,
    /// Whether the cluster follows a membership ([`Engine::discover`]): the prefill and decode
    /// workers are chosen again by role from each new cluster.
    follow: bool,
    /// A cluster the membership changed to, used once nothing is in flight.
    pending: Option<Cluster>,
    cfg: EngineConfig,
    pool: Arc<parking_lot::Mutex<Pool>>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    cancelled: HashSet<u64>,
    /// Places every run (prefill and decode) on the cluster's workers as devices `dev0..`.
    scheduler: genie_scheduler::Scheduler,
    /// Seconds of prefill per prompt token, for the choice of lane.
    rate: PrefillRate,
    /// The engine's start and where runs' spans go (while `recording`).
    spans: (Instant, Arc<parking_lot::Mutex<Vec<Span>>>),
    /// Whether runs' spans are kept ([`EngineConfig::record_spans`], [`Engine::record_spans`]).
    recording: bool,
    /// The scheduler's placement of a batched decode step, by batch size and whether its tokens
    /// are chosen on the worker (all greedy): steps of one such kind differ in their KV lengths
    /// only, which never move a node of a one-worker schedule.
    decode_places: HashMap<(usize, bool), Placement>,
    /// Decode steps sent ahead on the decode worker (see [`Core::step_ahead`]).
    flight: Option<Flight>,
    /// KV moves whose senders are done, for the decode worker to take in
    /// ([`Core::take_in_all`]).
    take_ins: Vec<TakeIn>,
    /// Where to connect again after a worker failure ([`Engine::connect`]).
    reconnect: Option<(Cluster, WeightSpec)>,
    /// The worker whose failure poisoned the driver, until a reconnection succeeded.
    lost: Option<(String, String)>,
}

/// The decode steps in flight on the decode worker's [`StepStream`] (one or two): each sent
/// before the one ahead of it answered, so that the worker goes from step to step while the
/// engine streams the last step's tokens and prepares the next.
struct Flight {
    stream: StepStream,
    /// Oldest first: the steps, and the KV take-ins sent between them.
    steps: VecDeque<Flying>,
    /// When the last reply was read (the step after it was under way by then).
    landed: Option<Instant>,
}

/// What a [`Flight`] carries.
enum Flying {
    /// A decode step: its graph (which names its spans), its rows' request ids, its run number,
    /// and when it was sent.
    Step(Graph, Vec<u64>, u64, Instant),
    /// A KV take-in sent between two steps ([`StepStream::take_in`]): the move's graph, and
    /// what its landing needs.
    TakeIn(Graph, Taking),
}

impl Flying {
    fn is_step(&self) -> bool {
        matches!(self, Flying::Step(..))
    }
}

/// A KV take-in under way.
struct Taking {
    /// Per request: its id, sequence and cache length.
    reqs: Vec<(u64, u64, usize)>,
    /// The prefill worker (its copies go once the move is over).
    pw: usize,
    driver: Arc<Driver>,
    /// Dropped once the caches are taken in (or never will be): the lane then sends its next
    /// move into the same landing region.
    _landing: mpsc::Sender<()>,
    /// When the move started.
    started: Instant,
}

/// How long the engine thread sleeps when it has nothing to do (it wakes on any command).
const IDLE: Duration = Duration::from_millis(50);

impl Core {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) -> Result<Driver, RuntimeError> {
        loop {
            // Nothing to decode and no prefill to start: sleep until a command (a prefill the
            // lane finished is one).
            let idle = self.active.is_empty() && (self.waiting.is_empty() || !self.lane_has_room());
            let first = if idle {
                self.land();
                match rx.recv_timeout(IDLE) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                None
            };
            let mut stop = false;
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match cmd {
                    Cmd::Submit {
                        id,
                        req,
                        reserved,
                        tx,
                        at,
                    } => self.waiting.push_back(Waiting {
                        id,
                        req,
                        reserved,
                        tx,
                        at,
                    }),
                    Cmd::Cancel(id) => {
                        self.cancelled.insert(id);
                    }
                    Cmd::Shutdown => stop = true,
                    Cmd::RecordSpans(on) => {
                        self.recording = on;
                        if let Some(d) = &self.driver {
                            d.set_spans(on);
                        }
                    }
                    Cmd::Prefilled { id, result } => self.prefilled(id, result.map(|p| *p)),
                    Cmd::Moved { id, result } => self.moved(id, result.map(Some)),
                    Cmd::Sent(t) => self.take_ins.push(*t),
                    Cmd::Members(m) => self.members(m),
                }
            }
            if stop {
                break;
            }
            self.apply_cancels();
            self.take_in_all();
            if self.lost.is_some() && self.reconnect.is_some() && !self.heal() {
                continue;
            }
            if self.pending.is_some() && self.active.is_empty() && !self.prefilling_any() {
                self.switch_cluster();
            }
            // A changed membership waits for the decode pass to drain: no new prefill starts.
            // Each free lane takes a waiting request; an inline prefill runs one per round.
            while self.pending.is_none()
                && self.running() < self.cfg.max_running
                && self.lane_has_room()
            {
                let Some(i) = self.next_waiting() else { break };
                let Some(lane) = self.waiting.get(i).and_then(|w| self.lane_for(&w.req)) else {
                    break;
                };
                let Some(w) = self.waiting.remove(i) else {
                    break;
                };
                self.pool.lock().waiting -= 1;
                let batch = self.batch_with(w);
                self.prefill(batch, lane);
                if self.lanes.is_empty() {
                    break;
                }
            }
            if self.pipelines() {
                self.step_ahead();
                continue;
            }
            self.land();
            let mut active = std::mem::take(&mut self.active);
            while !active.is_empty() {
                let rest = active.split_off(active.len().min(self.cfg.max_batch));
                self.decode(active);
                active = rest;
            }
        }
        self.land();
        // Moves not taken in: their requests fail below with the others in the lanes.
        self.take_ins.clear();
        std::mem::take(&mut self.lanes)
            .into_iter()
            .for_each(Lane::stop);
        for w in std::mem::take(&mut self.waiting) {
            self.release(w.reserved, None);
            let _ = w.tx.send(Event::Failed(EngineError::ShutDown));
        }
        let prefilling = std::mem::take(&mut self.prefilling);
        for a in std::mem::take(&mut self.active)
            .into_iter()
            .chain(prefilling.into_iter().flatten())
        {
            self.release(a.reserved, Some(a.seq));
            let _ = a.tx.send(Event::Failed(EngineError::ShutDown));
        }
        // What ended sequences left on the workers goes now: the driver outlives the engine.
        if let Some(d) = self.driver.as_ref().filter(|_| self.lost.is_none()) {
            if let Err(e) = d.flush_frees() {
                tracing::warn!(error = %e, "engine: freeing finished KV caches failed");
            }
        }
        let driver = self.driver.take().ok_or_else(|| {
            let (worker, reason) = self.lost.clone().unwrap_or_default();
            RuntimeError::WorkerFailed { worker, reason }
        })?;
        Arc::try_unwrap(driver).map_err(|_| {
            RuntimeError::Plan("engine: the driver is still shared at shutdown".into())
        })
    }

    /// The driver, or the failure that took it.
    fn driver(&self) -> Result<&Driver, RuntimeError> {
        match (&self.driver, &self.lost) {
            (Some(d), _) => Ok(d),
            (None, Some((worker, reason))) => Err(RuntimeError::WorkerFailed {
                worker: worker.clone(),
                reason: reason.clone(),
            }),
            (None, None) => Err(RuntimeError::Plan("the engine has no driver".into())),
        }
    }

    /// Ends cancelled requests, waiting or active.
    fn apply_cancels(&mut self) {
        if self.cancelled.is_empty() {
            return;
        }
        let mut cancelled = std::mem::take(&mut self.cancelled);
        // A request in a prefill lane ends when its prefill comes back.
        for a in self.prefilling.iter().flatten() {
            if cancelled.remove(&a.id) {
                self.cancelled.insert(a.id);
            }
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| cancelled.contains(&w.id));
        self.waiting = kept.into();
        for w in gone {
            self.pool.lock().waiting -= 1;
            self.release(w.reserved, None);
            let _ =
                w.tx.send(Event::Done(FinishReason::Cancelled, Timings::default()));
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| cancelled.contains(&a.id));
        self.active = kept;
        for a in gone {
            self.release(a.reserved, Some(a.seq));
            let _ = a.tx.send(Event::Done(FinishReason::Cancelled, a.timings));
        }
    }

    /// Frees a sequence's KV cache (if it had one: the workers drop it before their next run,
    /// see [`Driver::free_sequence_later`]) and gives its reservation back: called before the
    /// handle hears of the end, so a caller that saw a request end can count on its bytes.
    fn release(&mut self, reserved: u64, seq: Option<u64>) {
        if let (Some(seq), Some(d)) = (seq, &self.driver) {
            // Dropped before the worker's next run (a decode step on its way may still read it).
            d.free_sequence_later(seq);
        }
        self.pool.lock().free += reserved;
    }

    /// Requests running: prefilling (in a lane, or inline) or decoding.
    fn running(&self) -> usize {
        self.active.len() + self.prefilling.iter().map(Vec::len).sum::<usize>()
    }

    /// Whether a prefill is running (in a lane, or inline).
    fn prefilling_any(&self) -> bool {
        self.prefilling.iter().any(|l| !l.is_empty())
    }

    /// Whether a lane (or the inline slot, when there are no lanes) can take a request.
    fn lane_has_room(&self) -> bool {
        if self.lanes.is_empty() {
            return self.prefilling.first().is_some_and(Vec::is_empty);
        }
        self.prefilling.iter().any(|held| jobs(held) < LANE_DEPTH)
    }

    /// The lane `req` goes to ([`pick_lane`]: where the cost model has its KV cache on the
    /// decode worker soonest); the inline slot when there are no lanes and it is free.
    fn lane_for(&self, req: &Request) -> Option<usize> {
        if self.lanes.is_empty() {
            return Some(0).filter(|_| self.lane_has_room());
        }
        let loads: Vec<LaneLoad> = self
            .lanes
            .iter()
            .zip(&self.prefilling)
            .map(|(l, held)| LaneLoad {
                held: jobs(held),
                queued: held.iter().map(|a| a.req.prompt.len()).sum(),
                given: l.tokens,
                link: l.link,
            })
            .collect();
        let ask = LaneAsk {
            prompt: req.prompt.len(),
            kv_bytes: self.cfg.kv_bytes(req.prompt.len()),
            per_token: self.rate.per_token(),
        };
        pick_lane(&loads, ask)
    }

    /// Starts the prefill of `batch` (one request, or several short ones prefilled together) in
    /// lane `lane` (the inline slot when there are no lanes).
    fn prefill(&mut self, batch: Vec<Waiting>, lane: usize) {
        let started = Instant::now();
        let job = batch.first().map_or(0, |w| w.id);
        let prefill_worker = self
            .lanes
            .get(lane)
            .map_or(self.cfg.prefill_worker, |l| l.worker);
        let mut reqs: Vec<Active> = batch
            .into_iter()
            .map(|w| {
                let seed = match w.req.sampling {
                    Sampling::Seeded { seed, .. } => seed,
                    Sampling::Greedy => 0,
                };
                Active {
                    id: w.id,
                    seq: w.id,
                    job,
                    tx: w.tx,
                    reserved: w.reserved,
                    at: w.at,
                    tokens: Vec::new(),
                    timings: Timings {
                        queue: started.duration_since(w.at),
                        prefill_worker,
                        ..Timings::default()
                    },
                    rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
                    ended: None,
                    req: w.req,
                }
            })
            .collect();
        let driver = match self.driver() {
            Ok(_) => self.driver.clone(),
            Err(e) => {
                let err = self.engine_error(e);
                return reqs
                    .into_iter()
                    .for_each(|a| self.fail_with(a, err.clone()));
            }
        };
        let Some(driver) = driver else { return };
        match self.lanes.get_mut(lane) {
            Some(l) => {
                let job = LaneJob {
                    reqs: reqs
                        .iter()
                        .map(|a| LaneReq {
                            id: a.id,
                            seq: a.seq,
                            prompt: a.req.prompt.clone(),
                            first: Some(FirstToken {
                                tx: a.tx.clone(),
                                sampling: a.req.sampling,
                                rng: a.rng.clone(),
                                at: a.at,
                            }),
                        })
                        .collect(),
                    driver,
                };
                l.tokens += reqs.iter().map(|a| a.req.prompt.len() as u64).sum::<u64>();
                if l.jobs.send(job).is_err() {
                    let err = EngineError::Failed("engine: a prefill lane is gone".into());
                    return reqs
                        .into_iter()
                        .for_each(|a| self.fail_with(a, err.clone()));
                }
                self.prefilling[lane].append(&mut reqs);
            }
            None => {
                // No lanes: prefill and decode share one worker, the caches are built in place
                // (after the decode steps in flight there).
                self.land();
                let job: Vec<(&[i64], u64)> = reqs
                    .iter()
                    .map(|a| (a.req.prompt.as_slice(), a.seq))
                    .collect();
                let pw = self.cfg.decode_worker;
                let r = prefill_here(&driver, &mut self.scheduler, &self.cfg.model, pw, &job);
                drop(driver);
                let ids: Vec<u64> = reqs.iter().map(|a| a.id).collect();
                self.prefilling[0].append(&mut reqs);
                match r {
                    Ok(prefilled) => {
                        for (&id, p) in ids.iter().zip(prefilled) {
                            self.prefilled(id, Ok(p));
                            // Built in place: nothing to move.
                            self.moved(id, Ok(None));
                        }
                    }
                    Err(e) => {
                        let errors = shared_errors(e, ids.len(), "batched prefill");
                        for (&id, e) in ids.iter().zip(errors) {
                            self.prefilled(id, Err(e));
                        }
                    }
                }
            }
        }
    }

    /// The waiting request that goes to prefill next ([`EngineConfig::prefill_order`]).
    fn next_waiting(&self) -> Option<usize> {
        let now = Instant::now();
        self.cfg.prefill_order.next(
            self.waiting
                .iter()
                .map(|w| (w.req.prompt.len(), now.saturating_duration_since(w.at))),
        )
    }

    /// `first` and the waiting requests that come next in prefill order while they fit one
    /// batched prefill with it ([`PREFILL_BATCH_TOKENS`] prompt tokens and
    /// [`EngineConfig::max_prefill_batch`] requests at most, within
    /// [`EngineConfig::max_running`]); `first` alone when it is long.
    fn batch_with(&mut self, first: Waiting) -> Vec<Waiting> {
        let mut tokens = first.req.prompt.len();
        let mut batch = vec![first];
        while batch.len() < self.cfg.max_prefill_batch
            && self.running() + batch.len() < self.cfg.max_running
        {
            let Some(i) = self.next_waiting() else { break };
            let len = self
                .waiting
                .get(i)
                .map_or(usize::MAX, |w| w.req.prompt.len());
            if tokens.saturating_add(len) > PREFILL_BATCH_TOKENS {
                break;
            }
            let Some(w) = self.waiting.remove(i) else {
                break;
            };
            self.pool.lock().waiting -= 1;
            tokens += len;
            batch.push(w);
        }
        batch
    }

    /// Request `id`'s prefill came back: its first token is streamed at once (its KV cache
    /// still moving to the decode worker); it stays in its lane until the move is over
    /// ([`Core::moved`]). A failed prefill ends it.
    fn prefilled(&mut self, id: u64, result: Result<Prefilled, RuntimeError>) {
        let Some((lane, at)) = self.in_lane(id) else {
            tracing::warn!(
                request = id,
                "engine: a prefill result for no request in the lane"
            );
            return;
        };
        let mut a = self.prefilling[lane].remove(at);
        let p = match result {
            Ok(p) => p,
            Err(e) => return self.fail(a, e),
        };
        let (started, out) = &*p.prefill;
        if p.owner {
            self.rate.add(out.wall, p.batch.1);
            self.record(*started, out);
            a.timings.kv_bytes = out.counters.bytes_moved;
        }
        // A request may have waited in its lane's queue behind another prefill.
        a.timings.queue = started.saturating_duration_since(a.at);
        a.timings.prefill = out.wall;
        a.timings.prefill_batch = p.batch.0;
        a.ended = match p.first {
            // The lane streamed it: the handle may see it even if it was cancelled meanwhile.
            Some(f) => {
                a.rng = f.rng;
                let ended = Self::took(&mut a, f.token, f.since, f.sent);
                if self.cancelled.remove(&a.id) {
                    Some(Ok(FinishReason::Cancelled))
                } else {
                    ended.map(Ok)
                }
            }
            None if self.cancelled.remove(&a.id) => Some(Ok(FinishReason::Cancelled)),
            None => match self.next(&mut a, &p.logits) {
                Ok(ended) => ended.map(Ok),
                Err(e) => Some(Err(self.engine_error(e))),
            },
        };
        self.prefilling[lane].insert(at, a);
    }

    /// Request `id`'s KV cache moved to the decode worker (`None`: it was built there): it
    /// joins the decode pass, or ends (how it ended meanwhile, or the move's failure).
    fn moved(&mut self, id: u64, result: Result<Option<MovedRun>, RuntimeError>) {
        let Some((lane, at)) = self.in_lane(id) else {
            tracing::warn!(request = id, "engine: a KV move for no request in the lane");
            return;
        };
        let mut a = self.prefilling[lane].remove(at);
        match result {
            Ok(moved) => {
                if let Some(m) = moved {
                    let (started, out) = &*m.run;
                    if m.owner {
                        self.record(*started, out);
                    }
                    a.timings.kv_transfer = out.wall;
                    a.timings.kv_bytes += m.bytes;
                }
            }
            Err(e) => {
                let err = self.engine_error(e);
                // One that streamed its every token is done whatever became of its cache.
                if a.ended.is_none() {
                    a.ended = Some(Err(err));
                }
            }
        }
        if a.ended.is_none() && self.cancelled.remove(&a.id) {
            a.ended = Some(Ok(FinishReason::Cancelled));
        }
        match a.ended.take() {
            None => self.active.push(a),
            Some(Ok(r)) => self.finish(a, r),
            Some(Err(err)) => self.fail_with(a, err),
        }
    }

    /// Has the decode worker take in the KV caches the lanes sent (each move's
    /// receivers' round): on the step stream when there is one, between the step in flight and
    /// the next ([`StepStream::take_in`], landed with the steps), else on this thread
    /// ([`Driver::take_in`]). See [`Core::took_in`].
    fn take_in_all(&mut self) {
        for t in std::mem::take(&mut self.take_ins) {
            let TakeIn {
                senders,
                graph,
                taking,
            } = t;
            let result = match self.flight.as_mut() {
                Some(f) => match f.stream.take_in(senders) {
                    Ok(_) => {
                        f.steps.push_back(Flying::TakeIn(graph, taking));
                        continue;
                    }
                    Err(e) => Err(e),
                },
                None => taking.driver.take_in(senders, &graph),
            };
            self.took_in(taking, result);
        }
    }

    /// Reports the requests of a take-in moved (they join the decode pass) or failed, and
    /// leaves the prefill worker's copies to its next run to drop. A failed take-in frees what
    /// was built.
    fn took_in(&mut self, t: Taking, result: Result<RunOutput, RuntimeError>) {
        let result = result.map(|out| (t.started, out));
        for (id, r) in move_over(&t.driver, t.pw, &t.reqs, result) {
            self.moved(id, r.map(Some));
        }
    }

    /// Where request `id` is in the prefill lanes (lane, position).
    fn in_lane(&self, id: u64) -> Option<(usize, usize)> {
        self.prefilling
            .iter()
            .enumerate()
            .find_map(|(l, lane)| Some((l, lane.iter().position(|a| a.id == id)?)))
    }

    /// Keeps a run's spans (when recording), moved from the run's own origin to the engine's.
    fn record(&self, started: Instant, out: &RunOutput) {
        if self.recording {
            let (origin, spans) = &self.spans;
            let shift = started.saturating_duration_since(*origin).as_secs_f64() * 1e6;
            spans.lock().extend(out.spans.iter().cloned().map(|mut s| {
                s.start_us += shift;
                s
            }));
        }
    }

    /// One batched decode step of `batch` (one forward pass over all of them, each against
    /// its own KV length); the requests that go on return to the active set.
    fn decode(&mut self, batch: Vec<Active>) {
        match self.run_decode(&batch) {
            Ok(logits) => {
                for (i, a) in batch.into_iter().enumerate() {
                    let next = self.emit_row(a, &logits, i);
                    self.active.extend(next);
                }
            }
            Err(e) => {
                let err = self.engine_error(e);
                for a in batch {
                    self.fail_with(a, err.clone());
                }
            }
        }
    }

    /// The logits `[N, 1, V]` of one decode step of `batch`, row `i` request `i`'s; when every
    /// request of the batch is greedy, their next tokens `[N, 1]` instead (chosen on the decode
    /// worker: one id per sequence comes back, not `V` logits).
    fn run_decode(&mut self, batch: &[Active]) -> Result<Tensor, RuntimeError> {
        let lens: Vec<usize> = batch
            .iter()
            .map(|a| a.req.prompt.len() + a.tokens.len() - 1)
            .collect();
        let toks: Vec<i64> = batch
            .iter()
            .map(|a| a.tokens.last().copied().unwrap_or(0))
            .collect();
        let seqs: Vec<u64> = batch.iter().map(|a| a.seq).collect();
        let greedy = batch.iter().all(|a| a.req.sampling == Sampling::Greedy);
        let (g, place) = self.decode_graph(&lens, greedy)?;
        let started = Instant::now();
        let out = run_decode_batch(self.driver()?, &g, &place, &toks, &lens, &seqs)?;
        self.record(started, &out);
        out.outputs
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))
    }

    /// The graph of a batched decode step at KV lengths `lens` (its tokens chosen on the
    /// worker when `greedy`) and the scheduler's placement of it on the decode worker.
    fn decode_graph(
        &mut self,
        lens: &[usize],
        greedy: bool,
    ) -> Result<(Graph, Placement), RuntimeError> {
        let mut g = self.cfg.model.decode_batch(lens)?;
        if greedy {
            g = with_next_tokens(g)?;
        }
        let dw = self.cfg.decode_worker;
        let key = (lens.len(), greedy);
        let place = match self.decode_places.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Placement::scheduled(&mut self.scheduler, &g, dw, dw)?;
                self.decode_places.insert(key, p.clone());
                p
            }
        };
        Ok((g, place))
    }

    /// Whether the next decode step goes ahead on the stream ([`Core::step_ahead`]): every
    /// active request greedy (its token chosen on the worker, where the next step reads it),
    /// all in one pass, and the session sound.
    fn pipelines(&self) -> bool {
        self.cfg.step_ahead
            && !self.active.is_empty()
            && self.active.len() <= self.cfg.max_batch
            && self.lost.is_none()
            && self.pending.is_none()
            && self.driver.is_some()
            && self
                .active
                .iter()
                .all(|a| a.req.sampling == Sampling::Greedy)
    }

    /// Sends the next decode step before the one in flight has answered, then reads that
    /// one's reply and streams its tokens while the worker computes the next. A request in
    /// the step in flight takes its next token from that step's reply on the worker
    /// ([`Feed`]); one whose next token there is its last is left out (its row of a step it
    /// ended in by a stop token is dropped). A request whose cache landed joins at once, with
    /// its first token from the engine. A moved KV cache is taken in on the stream between two
    /// steps ([`Core::take_in_all`]). When another run waits for the decode worker, the steps
    /// in flight land first and the stream lets the worker go.
    fn step_ahead(&mut self) {
        let dw = self.cfg.decode_worker;
        if self.flight.as_ref().is_some_and(|f| {
            f.steps.iter().filter(|s| s.is_step()).count() > 1
                || self.driver.as_ref().is_some_and(|d| d.contended(dw))
        }) {
            self.land();
        }
        // The newest step in flight (take-ins sent after it leave its token ids to the next).
        let last = self.flight.as_ref().and_then(|f| {
            f.steps.iter().rev().find_map(|s| match s {
                Flying::Step(_, ids, run, _) => Some((ids, *run)),
                Flying::TakeIn(..) => None,
            })
        });
        let mut rows: Vec<(u64, u64)> = Vec::new();
        let (mut lens, mut toks, mut fed) = (Vec::new(), Vec::new(), Vec::new());
        for a in &self.active {
            if self.cancelled.contains(&a.id) {
                continue;
            }
            let in_flight = last.and_then(|(ids, _)| ids.iter().position(|&id| id == a.id));
            match in_flight {
                // Its token of the step in flight is its last: no step after it.
                Some(_) if a.tokens.len() + 1 >= a.req.max_new_tokens => continue,
                Some(r) => {
                    fed.push((rows.len() as u32, r as u32));
                    lens.push(a.req.prompt.len() + a.tokens.len());
                    toks.push(0);
                }
                None => {
                    lens.push(a.req.prompt.len() + a.tokens.len() - 1);
                    toks.push(a.tokens.last().copied().unwrap_or(0));
                }
            }
            rows.push((a.id, a.seq));
        }
        if rows.is_empty() {
            return self.land();
        }
        let feed = last
            .filter(|_| !fed.is_empty())
            .map(|(_, run)| Feed { run, rows: fed });
        let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let seqs: Vec<u64> = rows.iter().map(|r| r.1).collect();
        match self.send_step(&lens, &toks, &seqs, feed) {
            Ok((g, run)) => {
                if let Some(f) = self.flight.as_mut() {
                    f.steps.push_back(Flying::Step(g, ids, run, Instant::now()));
                }
            }
            Err(e) => {
                let err = self.engine_error(e);
                self.land();
                return self.fail_active(&ids.into_iter().collect(), &err);
            }
        }
        // What was sent before this step lands now (a step, and the take-ins after it).
        while self.flight.as_ref().is_some_and(|f| f.steps.len() > 1) {
            self.land_one();
        }
    }

    /// Sends a greedy decode step of sequences `seqs` (tokens `toks` at KV lengths `lens`,
    /// rows `feed` taken from the step in flight) on the stream, opened if need be; the step's
    /// graph and run number.
    fn send_step(
        &mut self,
        lens: &[usize],
        toks: &[i64],
        seqs: &[u64],
        feed: Option<Feed>,
    ) -> Result<(Graph, u64), RuntimeError> {
        let (g, place) = self.decode_graph(lens, true)?;
        if self.flight.is_none() {
            self.driver()?;
            let Some(d) = self.driver.clone() else {
                return Err(RuntimeError::Plan("engine: no driver".into()));
            };
            let stream = d.stream(self.cfg.decode_worker)?;
            self.flight = Some(Flight {
                stream,
                steps: VecDeque::new(),
                landed: None,
            });
        }
        let Some(f) = self.flight.as_mut() else {
            return Err(RuntimeError::Plan("engine: no step stream".into()));
        };
        let inputs = decode_inputs(toks, lens)?;
        let next = *g
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("decode graph has no outputs".into()))?;
        let run = f.stream.send(&g, &place, (&inputs, &[next]), seqs, feed)?;
        Ok((g, run))
    }

    /// Reads the reply of the oldest step or take-in in flight: a step's tokens are streamed
    /// (rows of requests that ended meanwhile are dropped), a take-in's requests join the
    /// decode pass ([`Core::took_in`]). A failure fails the requests of everything in flight.
    fn land_one(&mut self) {
        let Some(f) = self.flight.as_mut() else {
            return;
        };
        let Some(entry) = f.steps.pop_front() else {
            return;
        };
        let (Flying::Step(g, ..) | Flying::TakeIn(g, _)) = &entry;
        let out = f.stream.wait(g);
        let before = f.landed.replace(Instant::now());
        let (ids, sent) = match entry {
            Flying::TakeIn(_, taking) => {
                return match out {
                    Ok(out) => self.took_in(taking, Ok(out)),
                    Err(e) => self.fail_flight(e, Some(taking), Vec::new()),
                };
            }
            Flying::Step(_, ids, _, sent) => (ids, sent),
        };
        // The worker started this step once it was done with the one before (as its reply
        // came in) or once it was sent, whichever came last.
        let started = before.map_or(sent, |l| l.max(sent));
        let next = out.and_then(|out| {
            self.record(started, &out);
            out.outputs
                .into_iter()
                .next()
                .ok_or_else(|| RuntimeError::Plan("decode returned nothing".into()))
        });
        let next = match next {
            Ok(t) => t,
            Err(e) => return self.fail_flight(e, None, ids),
        };
        for (i, id) in ids.into_iter().enumerate() {
            let Some(at) = self.active.iter().position(|a| a.id == id) else {
                continue;
            };
            let a = self.active.remove(at);
            if let Some(a) = self.emit_row(a, &next, i) {
                self.active.insert(at, a);
            }
        }
    }

    /// A step or take-in in flight failed with `e` (`taking` and the step's rows `ids`, the
    /// one that failed): it fails the requests of everything in flight, and the stream goes.
    fn fail_flight(&mut self, e: RuntimeError, taking: Option<Taking>, ids: Vec<u64>) {
        let rest = self.flight.take().map(|f| f.steps).unwrap_or_default();
        let (mut failed, mut takings): (HashSet<u64>, Vec<Taking>) =
            (ids.into_iter().collect(), taking.into_iter().collect());
        for entry in rest {
            match entry {
                Flying::Step(_, ids, ..) => failed.extend(ids),
                Flying::TakeIn(_, t) => takings.push(t),
            }
        }
        let mut errors = shared_errors(e, 1 + takings.len(), "decode step stream");
        let first = errors.remove(0);
        for (t, e) in takings.into_iter().zip(errors) {
            self.took_in(t, Err(e));
        }
        let err = self.engine_error(first);
        self.fail_active(&failed, &err);
    }

    /// Fails the active requests `ids` with `err`.
    fn fail_active(&mut self, ids: &HashSet<u64>, err: &EngineError) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| ids.contains(&a.id));
        self.active = kept;
        for a in gone {
            self.fail_with(a, err.clone());
        }
    }

    /// Lands every step in flight and lets the decode worker go.
    fn land(&mut self) {
        while self.flight.as_ref().is_some_and(|f| !f.steps.is_empty()) {
            self.land_one();
        }
        self.flight = None;
    }

    /// [`Core::emit`] of row `i` of a decode step's output `out` (its logits, or the tokens
    /// chosen on the worker) for `a`; a row that cannot be read fails `a`.
    fn emit_row(&mut self, a: Active, out: &Tensor, i: usize) -> Option<Active> {
        match out.narrow(0, i, 1) {
            Ok(row) => self.emit(a, &row),
            Err(source) => {
                let node = if out.dtype() == candle_core::DType::I64 {
                    "next_tokens"
                } else {
                    "logits"
                };
                let e = RuntimeError::Kernel {
                    node: node.into(),
                    source,
                };
                self.fail(a, e);
                None
            }
        }
    }

    /// Chooses and streams the next token of `a`; ends it when done.
    fn emit(&mut self, mut a: Active, logits: &Tensor) -> Option<Active> {
        match self.next(&mut a, logits) {
            Ok(None) => Some(a),
            Ok(Some(r)) => {
                self.finish(a, r);
                None
            }
            Err(e) => {
                self.fail(a, e);
                None
            }
        }
    }

    /// Chooses and streams the next token of `a`; whether that ended it (its last token, a
    /// stop token, or nobody reading: as cancelled).
    fn next(
        &mut self,
        a: &mut Active,
        logits: &Tensor,
    ) -> Result<Option<FinishReason>, RuntimeError> {
        let (tok, since, sent) = stream_token(logits, a.req.sampling, &mut a.rng, (a.at, &a.tx))?;
        Ok(Self::took(a, tok, since, sent))
    }

    /// Records token `tok`, streamed `since` submission (`sent`: whether the handle took it),
    /// as `a`'s next; whether that ended it.
    fn took(a: &mut Active, tok: i64, since: Duration, sent: bool) -> Option<FinishReason> {
        if a.tokens.is_empty() {
            a.timings.first_token = since;
        }
        a.timings.tokens.push(since);
        a.tokens.push(tok);
        if !sent {
            Some(FinishReason::Cancelled)
        } else if a.req.stop.contains(&tok) {
            Some(FinishReason::Stop)
        } else if a.tokens.len() >= a.req.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Ends `a` for `reason`: its KV cache freed and its reservation back, then its handle told.
    fn finish(&mut self, mut a: Active, reason: FinishReason) {
        let timings = std::mem::take(&mut a.timings);
        self.release(a.reserved, Some(a.seq));
        let _ = a.tx.send(Event::Done(reason, timings));
    }

    fn fail(&mut self, a: Active, e: RuntimeError) {
        let err = self.engine_error(e);
        self.fail_with(a, err);
    }

    /// A run's error as its requests see it; a worker failure is remembered (the engine
    /// reconnects before the next run).
    fn engine_error(&mut self, e: RuntimeError) -> EngineError {
        match e {
            RuntimeError::WorkerFailed { worker, reason } => {
                if self.lost.is_none() {
                    self.lost = Some((worker.clone(), reason.clone()));
                }
                EngineError::WorkerFailed { worker, reason }
            }
            other => EngineError::Failed(other.to_string()),
        }
    }

    fn fail_with(&mut self, a: Active, err: EngineError) {
        tracing::warn!(request = a.id, error = %err, "engine: request failed");
        self.release(a.reserved, Some(a.seq));
        let _ = a.tx.send(Event::Failed(err));
    }

    /// After a worker failure: fails the requests whose KV caches were in the lost session and
    /// connects again. Returns whether the engine can run again; if not, each waiting request
    /// fails with the reconnection's error (one attempt per round with work waiting).
    fn heal(&mut self) -> bool {
        let Some((worker, reason)) = self.lost.clone() else {
            return true;
        };
        self.land();
        for a in std::mem::take(&mut self.active) {
            self.pool.lock().free += a.reserved;
            let _ = a.tx.send(Event::Failed(EngineError::WorkerFailed {
                worker: worker.clone(),
                reason: format!("{reason} (the request's KV cache was lost with it)"),
            }));
        }
        if self.prefilling_any() {
            // A lane holds the driver until its run comes back (failing, on a lost session).
            return false;
        }
        if self.waiting.is_empty() {
            // Nothing to serve: connect when a request comes.
            return false;
        }
        let Some((cluster, weights)) = self.reconnect.clone() else {
            return false;
        };
        // The membership's latest cluster, if it changed since.
        let cluster = self.pending.take().unwrap_or(cluster);
        match self.connect_to(cluster, weights) {
            Ok(()) => {
                tracing::info!(worker = %worker, "engine: reconnected after a worker failure");
                true
            }
            Err(e) => {
                let (worker, reason) = match e {
                    RuntimeError::WorkerFailed { worker, reason } => (worker, reason),
                    other => (worker, format!("reconnecting failed: {other}")),
                };
                for w in std::mem::take(&mut self.waiting) {
                    self.pool.lock().waiting -= 1;
                    self.pool.lock().free += w.reserved;
                    let _ = w.tx.send(Event::Failed(EngineError::WorkerFailed {
                        worker: worker.clone(),
                        reason: reason.clone(),
                    }));
                }
                false
            }
        }
    }
}

impl Core {
    /// Drops the driver (the workers serve one driver at a time: this session's goes first)
    /// and connects to `cluster`; when following a membership, the prefill and decode workers
    /// are chosen by role again ([`EngineConfig::for_cluster`]) and the lane restarted on them.
    /// The caller has nothing in flight.
    fn connect_to(&mut self, cluster: Cluster, weights: WeightSpec) -> Result<(), RuntimeError> {
        self.land();
        drop(self.driver.take());
        std::mem::take(&mut self.lanes)
            .into_iter()
            .for_each(Lane::stop);
        self.prefilling = idle_lanes(0);
        self.reconnect = Some((cluster.clone(), weights.clone()));
        if self.follow {
            let picked = EngineConfig::for_cluster(self.cfg.model.clone(), &cluster)?;
            self.cfg.prefill_worker = picked.prefill_worker;
            self.cfg.prefill_pool = picked.prefill_pool;
            self.cfg.decode_worker = picked.decode_worker;
            self.cfg.links = picked.links;
        }
        let topology = crate::plan::topology_with_links(cluster.workers.len(), &self.cfg.links)?;
        let d = Driver::connect(&cluster, weights)?;
        d.set_spans(self.recording);
        self.lanes = Lane::start_all(&self.cfg, &topology, &self.cmds)?;
        self.prefilling = idle_lanes(self.lanes.len());
        self.scheduler = genie_scheduler::Scheduler::new(topology);
        self.decode_places.clear();
        self.driver = Some(Arc::new(d));
        self.lost = None;
        Ok(())
    }

    /// The membership changed. A worker this engine runs on that left takes the requests in
    /// flight with it (they fail naming it); any change is used once nothing is in flight.
    fn members(&mut self, fresh: Result<Cluster, RuntimeError>) {
        let Some((current, _)) = self.reconnect.clone() else {
            return;
        };
        let listed = |name: &str| {
            fresh
                .as_ref()
                .is_ok_and(|c| c.workers.iter().any(|w| w.name == name))
        };
        let mut used = self.cfg.prefill_workers();
        if !used.contains(&self.cfg.decode_worker) {
            used.push(self.cfg.decode_worker);
        }
        for i in used {
            let Some(name) = current.workers.get(i).map(|w| w.name.clone()) else {
                continue;
            };
            if !listed(&name) && self.lost.is_none() {
                tracing::warn!(worker = %name, "engine: a worker it runs on left the cluster");
                let reason = "left the cluster (its registration ended or its lease expired)";
                self.lost = Some((name, reason.into()));
            }
        }
        match fresh {
            Ok(c) if c != current => self.pending = Some(c),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "engine: no usable cluster in the membership"),
        }
    }

    /// Moves to the pending cluster (nothing is in flight).
    fn switch_cluster(&mut self) {
        let (Some(fresh), Some((_, weights))) = (self.pending.take(), self.reconnect.clone())
        else {
            return;
        };
        let workers: Vec<&str> = fresh.workers.iter().map(|w| w.name.as_str()).collect();
        tracing::info!(?workers, "engine: the cluster changed; connecting to it");
        if let Err(e) = self.connect_to(fresh, weights) {
            let (worker, reason) = match e {
                RuntimeError::WorkerFailed { worker, reason } => (worker, reason),
                other => ("cluster".into(), other.to_string()),
            };
            self.lost = Some((worker, reason));
        }
    }
}

/// The prefill lane: runs each job's prefill on its worker, streams the requests' first tokens,
/// reports the prefill to the engine and moves the KV caches to the decode worker. The prefill
/// worker's runs go on a [`StepStream`], each sent behind the one before it, so that the worker
/// goes from one to the next without waiting for the lane's turn around: a prefill; right behind
/// it the senders' round of its move ([`StepStream::send_senders`]: the prefill worker posts the
/// caches' sends, then the engine thread has the decode worker take them in between two decode
/// steps, [`Cmd::Sent`]); right behind that, the next job's prefill when one waits, which
/// computes while the caches travel. Their replies are read in that order. A move's senders'
/// round is sent once the decode worker took in the last move (the same landing region). The
/// first move on the link (its landing region not known yet) runs whole, the stream let go
/// first. The lane lets the worker go whenever nothing is in flight (an idle lane holds no
/// driver), and sends nothing ahead while another run waits for the worker. Ends when the engine
/// drops its queue.
fn prefill_lane(
    jobs: &mpsc::Receiver<LaneJob>,
    done: &mpsc::Sender<Cmd>,
    mut scheduler: genie_scheduler::Scheduler,
    model: &Model,
    (workers, stop): ((usize, usize), &AtomicBool),
) {
    let pw = workers.0;
    let mut stream: Option<StepStream> = None;
    // The last move's take-in, while the decode worker has not done it.
    let mut landing: Option<mpsc::Receiver<()>> = None;
    // A job taken from the queue and not sent yet; a job whose prefill is in flight.
    let mut queued: Option<LaneJob> = None;
    let mut next: Option<SentPrefill> = None;
    loop {
        let cur = match next.take() {
            Some(p) => p,
            None => {
                // Nothing in flight: the worker goes free while the lane waits.
                stream = None;
                let job = match queued.take().map_or_else(|| jobs.recv(), Ok) {
                    Ok(job) => job,
                    Err(_) => break,
                };
                match send_prefill(&mut stream, &job, &mut scheduler, model, pw) {
                    Ok(graph) => SentPrefill { job, graph },
                    Err(e) => {
                        stream = None;
                        if !prefill_failed(job, e, done) {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        let first = cur.job.reqs.first().map_or(0, |r| r.id);
        let n = cur.job.reqs.len();
        let _span = tracing::info_span!("prefill", request = first, requests = n).entered();
        // The move's senders' round right behind its prefill, once the last move is taken in.
        if landing.take().is_some_and(|l| !taken_in(&l, stop)) {
            // The lane stops: its requests end with the engine's.
            break;
        }
        let m = Move {
            reqs: cur
                .job
                .reqs
                .iter()
                .map(|r| (r.id, r.seq, r.prompt.len()))
                .collect(),
            driver: cur.job.driver.clone(),
        };
        let senders = match stream.as_mut() {
            Some(s) => send_move(s, model, workers, &m),
            None => Ok(None),
        };
        // The next prefill right behind it, when a job waits and no other run waits for the
        // worker.
        if matches!(senders, Ok(Some(_))) && !cur.job.driver.contended(pw) {
            queued = queued.or_else(|| jobs.try_recv().ok());
            if let Some(job) = queued.take_if(|j| Arc::ptr_eq(&j.driver, &cur.job.driver)) {
                match send_prefill(&mut stream, &job, &mut scheduler, model, pw) {
                    Ok(graph) => next = Some(SentPrefill { job, graph }),
                    Err(e) => {
                        if !prefill_failed(job, e, done) {
                            break;
                        }
                    }
                }
            }
        }
        // The prefill's reply: the first tokens go out now.
        let reply = match stream.as_mut() {
            Some(s) => s.wait_started(&cur.graph),
            None => Err(RuntimeError::Plan("a prefill lane lost its stream".into())),
        };
        let prefilled = reply.and_then(|(started, out)| {
            prefilled_parts(
                out,
                started,
                n,
                cur.job.reqs.iter().map(|r| r.prompt.len()).sum(),
            )
        });
        let mut job = cur.job;
        let prefilled = match prefilled {
            Ok(p) => p,
            Err(e) => {
                // What is in flight behind it fails with it.
                stream = None;
                let listening = next_failed(&mut next, &e, done);
                if !(prefill_failed(job, e, done) && listening) {
                    break;
                }
                continue;
            }
        };
        let mut listening = true;
        for (r, mut p) in job.reqs.iter_mut().zip(prefilled) {
            p.first = r.first.take().and_then(|f| f.stream(&p.logits));
            let result = Ok(Box::new(p));
            listening &= done.send(Cmd::Prefilled { id: r.id, result }).is_ok();
        }
        drop(job);
        if !listening {
            break;
        }
        // The move: its senders' reply, for the engine to have the caches taken in; or, where
        // it could not go on the stream, the whole move here.
        let _move = tracing::info_span!("kv_move", request = first, requests = n).entered();
        let end = match (senders, stream.as_mut()) {
            (Ok(Some(graph)), Some(s)) => match s.wait_senders() {
                Ok(senders) => take_in_later(m, senders, graph, done, pw),
                Err(e) => {
                    stream = None;
                    if !next_failed(&mut next, &e, done) {
                        break;
                    }
                    report_move(m, Err(e), done, pw)
                }
            },
            (Ok(_), _) => {
                stream = None;
                move_and_report(m, done, model, workers)
            }
            (Err(e), _) => {
                stream = None;
                report_move(m, Err(e), done, pw)
            }
        };
        match end {
            MoveEnd::Reported(true) => {}
            MoveEnd::Reported(false) => break,
            MoveEnd::Sent(l) => landing = Some(l),
        }
    }
}

/// A job whose prefill is on its lane's stream.
struct SentPrefill {
    job: LaneJob,
    graph: Graph,
}

/// Sends `job`'s prefill on worker `pw` on `stream` (opened on the job's driver when there is
/// none): one prompt's alone, several in one batched pass ([`Family::prefill_batch`]); its
/// graph.
fn send_prefill(
    stream: &mut Option<StepStream>,
    job: &LaneJob,
    scheduler: &mut genie_scheduler::Scheduler,
    model: &Model,
    pw: usize,
) -> Result<Graph, RuntimeError> {
    let prompts: Vec<&[i64]> = job.reqs.iter().map(|r| r.prompt.as_slice()).collect();
    let (g, last) = prefill_graph(model, &prompts)?;
    let place = Placement::scheduled(scheduler, &g, pw, pw)?;
    let s = match stream {
        Some(s) => s,
        None => stream.insert(job.driver.stream(pw)?),
    };
    let seqs: Vec<u64> = job.reqs.iter().map(|r| r.seq).collect();
    let inputs = prefill_inputs(&prompts)?;
    s.send(&g, &place, (&inputs, &[last]), &seqs, None)?;
    Ok(g)
}

/// Fails `job`'s requests with `e` (the first gets it, the others a copy); whatever part of
/// their caches was built goes with the worker's next run ([`Driver::free_sequence_later`]:
/// the lane may hold the worker). `false` once the engine no longer listens.
fn prefill_failed(job: LaneJob, e: RuntimeError, done: &mpsc::Sender<Cmd>) -> bool {
    let mut listening = true;
    let errors = shared_errors(e, job.reqs.len(), "batched prefill");
    for (r, err) in job.reqs.iter().zip(errors) {
        job.driver.free_sequence_later(r.seq);
        let result = Err(err);
        listening &= done.send(Cmd::Prefilled { id: r.id, result }).is_ok();
    }
    listening
}

/// Fails the prefill in flight behind one that failed with `e` (its stream was let go), if any,
/// with a copy of `e`; `false` once the engine no longer listens.
fn next_failed(next: &mut Option<SentPrefill>, e: &RuntimeError, done: &mpsc::Sender<Cmd>) -> bool {
    next.take().map_or(true, |n| {
        let e = copy_error(e, "the prefill before it on its worker failed");
        prefill_failed(n.job, e, done)
    })
}

/// Sends the senders' round of `job`'s KV move from its lane's worker `pw` to the decode worker
/// `dw` on the lane's stream ([`StepStream::send_senders`]); its graph, or `None` (nothing
/// sent) when the move goes in one round.
fn send_move(
    stream: &mut StepStream,
    model: &Model,
    (pw, dw): (usize, usize),
    job: &Move,
) -> Result<Option<Graph>, RuntimeError> {
    let (g, place, seqs) = move_graph(model, (pw, dw), &job.reqs)?;
    Ok(stream.send_senders(&g, &place, &seqs)?.map(|_| g))
}

/// A move whose senders are done, handed to the engine thread to have the decode worker take
/// its caches in ([`Cmd::Sent`]); the lane sends its next move once that is over.
fn take_in_later(
    job: Move,
    senders: Box<SendersDone>,
    graph: Graph,
    done: &mpsc::Sender<Cmd>,
    pw: usize,
) -> MoveEnd {
    let (landing, taken) = mpsc::channel();
    let taking = Taking {
        reqs: job.reqs,
        pw,
        driver: job.driver,
        _landing: landing,
        started: senders.started(),
    };
    let take = TakeIn {
        senders,
        graph,
        taking,
    };
    if done.send(Cmd::Sent(Box::new(take))).is_err() {
        return MoveEnd::Reported(false);
    }
    MoveEnd::Sent(taken)
}

/// Reports a move's end to the engine, request by request ([`move_over`]).
fn report_move(
    job: Move,
    result: Result<(Instant, RunOutput), RuntimeError>,
    done: &mpsc::Sender<Cmd>,
    pw: usize,
) -> MoveEnd {
    let mut listening = true;
    for (id, result) in move_over(&job.driver, pw, &job.reqs, result) {
        listening &= done.send(Cmd::Moved { id, result }).is_ok();
    }
    MoveEnd::Reported(listening)
}

/// The error that failed a run `n` requests shared (`run` names it), once per request: the
/// first gets `e`, the others a copy (a worker's failure as it is, any other error described).
fn shared_errors(e: RuntimeError, n: usize, run: &str) -> Vec<RuntimeError> {
    let copies: Vec<RuntimeError> = (1..n)
        .map(|_| copy_error(&e, &format!("the {run} it shared failed")))
        .collect();
    std::iter::once(e).chain(copies).collect()
}

/// A copy of `e` for another request: a worker's failure as it is, any other error described
/// after `what`.
fn copy_error(e: &RuntimeError, what: &str) -> RuntimeError {
    match e {
        RuntimeError::WorkerFailed { worker, reason } => RuntimeError::WorkerFailed {
            worker: worker.clone(),
            reason: reason.clone(),
        },
        other => RuntimeError::Plan(format!("{what}: {other}")),
    }
}

/// Waits until the engine took in (or dropped) a move whose senders are done: `landing`
/// disconnects. `false` if the lane stops first (`stop`), after which the engine takes in
/// nothing more.
fn taken_in(landing: &mpsc::Receiver<()>, stop: &AtomicBool) -> bool {
    loop {
        match landing.recv_timeout(Duration::from_millis(10)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return true,
            Err(mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return false,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// What became of a move ([`move_and_report`]).
enum MoveEnd {
    /// Reported to the engine (moved, or failed); `false` once the engine no longer listens.
    Reported(bool),
    /// Its senders are done and the engine has the decode worker take the caches in; the
    /// landing region is busy until this disconnects.
    Sent(mpsc::Receiver<()>),
}

/// Moves `job`'s KV caches (those prefilled together) from the prefill worker `pw` to the
/// decode worker `dw` in one [`kv_move_batch`] run. Once the decode worker keeps a landing
/// region big enough (after the first move), the run stops after its senders: the engine
/// thread has the decode worker take the caches in between its decode steps ([`Cmd::Sent`],
/// [`MoveEnd::Sent`]). A run in one round is reported here, and the prefill worker's copies left
/// to its next run to drop ([`Driver::free_sequence_on_later`]: the requests' next decode step
/// does not wait for it, nor the next prefill for a round trip). A failed move frees what was
/// built and reports the error to each.
fn move_and_report(
    job: Move,
    done: &mpsc::Sender<Cmd>,
    model: &Model,
    (pw, dw): (usize, usize),
) -> MoveEnd {
    let moved = move_graph(model, (pw, dw), &job.reqs).and_then(|(g, place, seqs)| {
        let t = Instant::now();
        Ok((t, job.driver.send_senders(&g, &place, &seqs)?, g))
    });
    match moved {
        Ok((_, Sending::Senders(senders), graph)) => take_in_later(job, senders, graph, done, pw),
        Ok((started, Sending::Done(out), _)) => report_move(job, Ok((started, out)), done, pw),
        Err(e) => report_move(job, Err(e), done, pw),
    }
}

/// The end of a KV move of `reqs` (id, sequence, cache length) from prefill worker `pw`, per
/// request: its part of the run (started when given; the run shared, its bytes split by cache
/// length), the prefill worker's copies left to its next run to drop (without a round trip of
/// their own); or, the move failed, the error (a copy for all but the first), what was built
/// freed.
fn move_over(
    driver: &Driver,
    pw: usize,
    reqs: &[(u64, u64, usize)],
    result: Result<(Instant, RunOutput), RuntimeError>,
) -> Vec<(u64, Result<MovedRun, RuntimeError>)> {
    match result {
        Ok((started, out)) => {
            let total: u64 = reqs.iter().map(|&(_, _, len)| len as u64).sum();
            let bytes = out.counters.bytes_moved;
            let run = Arc::new((started, out));
            for &(_, seq, _) in reqs {
                driver.free_sequence_on_later(seq, pw);
            }
            reqs.iter()
                .enumerate()
                .map(|(i, &(id, _, len))| {
                    let part = MovedRun {
                        run: run.clone(),
                        owner: i == 0,
                        bytes: bytes * len as u64 / total.max(1),
                    };
                    (id, Ok(part))
                })
                .collect()
        }
        Err(e) => {
            let errors = shared_errors(e, reqs.len(), "batched KV move");
            reqs.iter()
                .zip(errors)
                .map(|(&(id, seq, _), e)| {
                    let _ = driver.free_sequence(seq);
                    (id, Err(e))
                })
                .collect()
        }
    }
}

/// The prefill of `reqs` (prompt, sequence) on worker `pw`, their KV caches built there: one
/// prompt's alone, several in one batched pass ([`Family::prefill_batch`]); one result per
/// request, in order.
fn prefill_here(
    driver: &Driver,
    scheduler: &mut genie_scheduler::Scheduler,
    model: &Model,
    pw: usize,
    reqs: &[(&[i64], u64)],
) -> Result<Vec<Prefilled>, RuntimeError> {
    let prompts: Vec<&[i64]> = reqs.iter().map(|(p, _)| *p).collect();
    let (g, last) = prefill_graph(model, &prompts)?;
    let place = Placement::scheduled(scheduler, &g, pw, pw)?;
    let started = Instant::now();
    let out = match reqs {
        [(prompt, seq)] => run_prefill(driver, &g, &place, prompt, last, *seq)?,
        _ => {
            let seqs: Vec<u64> = reqs.iter().map(|(_, s)| *s).collect();
            run_prefill_batch(driver, &g, &place, &prompts, last, &seqs)?
        }
    };
    let tokens = prompts.iter().map(|p| p.len()).sum();
    prefilled_parts(out, started, reqs.len(), tokens)
}

/// The prefill graph of `prompts` (one alone: [`prefill_last`]; several in one pass:
/// [`Family::prefill_batch`]) and its logits `[N, 1, V]`.
fn prefill_graph(model: &Model, prompts: &[&[i64]]) -> Result<(Graph, TensorRef), RuntimeError> {
    match prompts {
        [prompt] => prefill_last(model, prompt.len()),
        _ => {
            let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
            let g = model.prefill_batch(&lens)?;
            let last = *g
                .outputs
                .first()
                .ok_or_else(|| RuntimeError::Plan("a batched prefill has no outputs".into()))?;
            Ok((g, last))
        }
    }
}

/// The results of a prefill run `out` (started at `started`) of `n` requests of `tokens`
/// prompt tokens in all: one per request, in order, each with its row of the logits.
fn prefilled_parts(
    out: RunOutput,
    started: Instant,
    n: usize,
    tokens: usize,
) -> Result<Vec<Prefilled>, RuntimeError> {
    let logits = out
        .outputs
        .first()
        .cloned()
        .ok_or_else(|| RuntimeError::Plan("prefill returned nothing".into()))?;
    let run = Arc::new((started, out));
    (0..n)
        .map(|i| {
            let row = logits
                .narrow(0, i, 1)
                .map_err(|source| RuntimeError::Kernel {
                    node: "logits".into(),
                    source,
                })?;
            Ok(Prefilled {
                logits: row,
                prefill: run.clone(),
                batch: (n, tokens),
                owner: i == 0,
                first: None,
            })
        })
        .collect()
}

/// The run that moves KV caches `reqs` (id, sequence, cache length) from the prefill worker
/// `pw` to the decode worker `dw` ([`kv_move_batch`]), its placement and its sequences.
fn move_graph(
    model: &Model,
    (pw, dw): (usize, usize),
    reqs: &[(u64, u64, usize)],
) -> Result<(Graph, Placement, Vec<u64>), RuntimeError> {
    let lens: Vec<usize> = reqs.iter().map(|&(_, _, len)| len).collect();
    let seqs: Vec<u64> = reqs.iter().map(|&(_, seq, _)| seq).collect();
    let g =
        kv_move_batch(model.layers(), model.kv_width(), &lens).map_err(RuntimeError::Scheduler)?;
    // A copy, not a scheduling decision: reads where the caches are, appends (to empty caches)
    // where they go.
    let place = Placement::by_rule(&g, |n| {
        let empty = matches!(n.op, OpKind::KvCache { .. })
            && n.outputs.first().and_then(|m| m.shape.get(2)) == Some(&0);
        if empty || matches!(n.op, OpKind::KvCacheAppend) {
            dw
        } else {
            pw
        }
    });
    Ok((g, place, seqs))
}

/// Chooses the next token from `logits` under `sampling` ([`next_token`]) and streams it on
/// `tx`: the token, the time since the request's submission `at`, and whether the handle took
/// it.
fn stream_token(
    logits: &Tensor,
    sampling: Sampling,
    rng: &mut rand_chacha::ChaCha8Rng,
    (at, tx): (Instant, &mpsc::Sender<Event>),
) -> Result<(i64, Duration, bool), RuntimeError> {
    let tok = next_token(logits, sampling, rng)?;
    let since = at.elapsed();
    Ok((tok, since, tx.send(Event::Token(tok)).is_ok()))
}

/// The next token from the last row of `logits` under `sampling`, or the token a greedy step
/// chose on the decode worker (`[1, 1]` I64, see [`with_next_tokens`]).
fn next_token(
    logits: &Tensor,
    sampling: Sampling,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<i64, RuntimeError> {
    // A greedy step whose token the decode worker chose (`with_next_tokens`).
    if logits.dtype() == candle_core::DType::I64 {
        return match logits.flatten_all().and_then(|t| t.to_vec1::<i64>()) {
            Ok(t) if t.len() == 1 => Ok(t[0]),
            _ => Err(RuntimeError::Plan(format!(
                "a decode step chose {:?} tokens for one sequence",
                logits.dims()
            ))),
        };
    }
    let Sampling::Seeded {
        temperature,
        top_k,
        top_p,
        ..
    } = sampling
    else {
        return argmax_last(logits);
    };
    let s = crate::models::Sampling {
        temperature,
        top_k,
        top_p,
        seed: 0,
    };
    pick(logits, &s, rng)
}

#[cfg(test)]
mod tests {
    use super::{pick_lane, LaneAsk, LaneLoad, LinkSpec, PrefillOrder, PrefillRate, RATE_SAMPLES};
    use crate::models::sample;
    use std::time::Duration;

    #[test]
    fn roles_choose_the_prefill_and_decode_workers() {
        use super::EngineConfig;
        use crate::cluster::Cluster;
        use genie_scheduler::builders::Gpt2Config;
        let pick = |roles: &[&str]| {
            let mut text = String::new();
            for (i, r) in roles.iter().enumerate() {
                text.push_str(&format!(
                    "[[workers]]\nname = \"w{i}\"\naddress = \"127.0.0.1:{}\"\nrole = \"{r}\"\n",
                    7000 + i
                ));
            }
            let c = Cluster::parse(&text, std::path::Path::new("<test>")).unwrap();
            assert_eq!(
                Cluster::parse(&c.to_toml(), std::path::Path::new("<rt>")).unwrap(),
                c
            );
            EngineConfig::for_cluster(Gpt2Config::default(), &c)
                .map(|e| (e.prefill_worker, e.decode_worker, e.prefill_pool))
        };
        assert_eq!(pick(&["decode", "prefill"]).unwrap(), (1, 0, vec![]));
        assert_eq!(pick(&["both", "both"]).unwrap(), (0, 1, vec![]));
        assert_eq!(pick(&["both"]).unwrap(), (0, 0, vec![]));
        assert_eq!(
            pick(&["prefill", "both", "decode"]).unwrap(),
            (0, 2, vec![])
        );
        // Every further prefill worker joins the pool.
        let p = pick(&["prefill", "decode", "prefill", "both", "prefill"]).unwrap();
        assert_eq!(p, (0, 1, vec![2, 4]));
        assert_eq!(
            pick(&["prefill", "prefill", "both"]).unwrap(),
            (0, 2, vec![1])
        );
        assert!(pick(&["decode"]).is_err());
        assert!(pick(&["prefill"]).is_err());
        let bad = "[[workers]]\nname = \"w0\"\naddress = \"127.0.0.1:7000\"\nrole = \"chef\"\n";
        let e = Cluster::parse(bad, std::path::Path::new("<test>")).unwrap_err();
        assert!(e.to_string().contains("workers[0].role"), "{e}");
        // The cluster's links come along.
        let linked = "[[workers]]\nname = \"p\"\naddress = \"127.0.0.1:7000\"\n\
                      [[workers]]\nname = \"d\"\naddress = \"127.0.0.1:7001\"\n\
                      [[links]]\nbetween = [\"p\", \"d\"]\ngbps = 25.0\n";
        let c = Cluster::parse(linked, std::path::Path::new("<test>")).unwrap();
        let e = EngineConfig::for_cluster(Gpt2Config::default(), &c).unwrap();
        assert_eq!(e.links, c.links);
        assert_eq!(e.links.len(), 1);
    }

    #[test]
    fn a_request_goes_to_the_least_loaded_lane_that_has_room() {
        // Every link alike (the default topology's): the fewest prompt tokens queued.
        let link = LinkSpec::gbps(20.0, 30.0);
        let load = |held, queued, given| LaneLoad {
            held,
            queued,
            given,
            link,
        };
        let ask = LaneAsk {
            prompt: 100,
            kv_bytes: 400_000,
            per_token: 40e-6,
        };
        let pick = |loads: &[LaneLoad]| pick_lane(loads, ask);
        // Fewest tokens queued first, whatever was given before.
        assert_eq!(
            pick(&[load(1, 300, 0), load(1, 20, 5000), load(0, 0, 9000)]),
            Some(2)
        );
        // A lane with the one it runs and one queued takes no more, however short they are.
        assert_eq!(pick(&[load(2, 10, 0), load(1, 380, 0)]), Some(1));
        assert_eq!(pick(&[load(2, 10, 0), load(2, 380, 0)]), None);
        // Equal queues: the one given the fewest tokens so far, then the first.
        assert_eq!(pick(&[load(0, 0, 70), load(0, 0, 40)]), Some(1));
        assert_eq!(pick(&[load(1, 8, 0), load(1, 8, 0)]), Some(0));
        assert_eq!(pick(&[]), None);
        // Before any prefill was measured the rate may be 0: then the links alone decide.
        let unrated = LaneAsk {
            per_token: 0.0,
            ..ask
        };
        assert_eq!(
            pick_lane(&[load(0, 0, 70), load(1, 300, 40)], unrated),
            Some(1)
        );
    }

    #[test]
    fn the_link_to_the_decode_worker_weighs_in_the_choice_of_lane() {
        let (fast, slow) = (LinkSpec::gbps(100.0, 5.0), LinkSpec::gbps(1.0, 50.0));
        let lane = |queued, link| LaneLoad {
            held: usize::from(queued > 0),
            queued,
            given: 0,
            link,
        };
        // 40 µs a token; a 374-token prompt's cache is 1.5 MB: 0.1 ms on the fast link, 12 ms
        // on the slow one (300 tokens of prefill).
        let long = LaneAsk {
            prompt: 374,
            kv_bytes: 1_531_904,
            per_token: 40e-6,
        };
        // Both idle: the fast link, though the slow one is listed first.
        assert_eq!(pick_lane(&[lane(0, slow), lane(0, fast)], long), Some(1));
        // 200 tokens queued behind the fast link (8 ms) still beat the slow link's 12 ms...
        assert_eq!(pick_lane(&[lane(0, slow), lane(200, fast)], long), Some(1));
        // ...400 (16 ms) do not.
        assert_eq!(pick_lane(&[lane(0, slow), lane(400, fast)], long), Some(0));
        // A short prompt's cache (8 tokens, 33 KB: 0.3 ms on the slow link) goes where the
        // queue is shorter.
        let short = LaneAsk {
            prompt: 8,
            kv_bytes: 32_768,
            ..long
        };
        assert_eq!(pick_lane(&[lane(0, slow), lane(20, fast)], short), Some(0));
    }

    #[test]
    fn the_prefill_rate_is_the_estimate_until_prefills_are_measured() {
        let mut r = PrefillRate::new(2e-6);
        assert_eq!(r.per_token(), 2e-6);
        r.add(Duration::from_millis(10), 0);
        assert_eq!(r.per_token(), 2e-6, "a prompt of no tokens says nothing");
        r.add(Duration::from_millis(4), 100);
        r.add(Duration::from_millis(16), 400);
        // Wall over tokens of the recent prefills together: 20 ms / 500.
        assert!((r.per_token() - 40e-6).abs() < 1e-12);
        // Only the last RATE_SAMPLES count.
        for _ in 0..RATE_SAMPLES {
            r.add(Duration::from_millis(1), 100);
        }
        assert!((r.per_token() - 10e-6).abs() < 1e-12);
        // A meaningless estimate becomes 0 (the links alone decide until a prefill ran).
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            assert_eq!(PrefillRate::new(bad).per_token(), 0.0);
        }
    }

    #[test]
    fn shortest_first_passes_long_prompts_until_one_waited_too_long() {
        let ms = Duration::from_millis;
        let waiting = [
            (300, ms(40)),
            (20, ms(30)),
            (8, ms(10)),
            (8, ms(5)),
            (380, ms(1)),
        ];
        assert_eq!(PrefillOrder::Arrival.next(waiting.iter().copied()), Some(0));
        let sjf = PrefillOrder::ShortestFirst { max_wait: ms(50) };
        // The shortest, the first of equals.
        assert_eq!(sjf.next(waiting.iter().copied()), Some(2));
        // The oldest has waited its time: it goes, however long.
        let late = PrefillOrder::ShortestFirst { max_wait: ms(40) };
        assert_eq!(late.next(waiting.iter().copied()), Some(0));
        for order in [PrefillOrder::Arrival, sjf] {
            assert_eq!(order.next(std::iter::empty()), None);
        }
    }

    #[test]
    fn sampling_respects_top_k_and_top_p() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        // top_k = 1 is greedy whatever the draw.
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample(&logits, 1.0, 1, 1.0, u), 1);
        }
        // top_p small: only the most likely token.
        assert_eq!(sample(&logits, 1.0, 0, 0.1, 0.99), 1);
        // top_k = 2: the draw lands on token 1 or 2 only, by its position.
        assert_eq!(sample(&logits, 1.0, 2, 1.0, 0.0), 1);
        assert_eq!(sample(&logits, 1.0, 2, 1.0, 0.999), 2);
        // Very low temperature concentrates on the best.
        assert_eq!(sample(&logits, 1e-3, 0, 1.0, 0.999), 1);
    }
}
