//! The runtime's error type, split by cause.

use std::path::PathBuf;

/// Everything the runtime can fail with.
///
/// Variants are grouped by whose fault it is:
/// - **configuration** (fix the file or flag): [`ClusterRead`](Self::ClusterRead),
///   [`ClusterParse`](Self::ClusterParse), [`ClusterField`](Self::ClusterField),
///   [`UnknownWorker`](Self::UnknownWorker), [`InsecureCluster`](Self::InsecureCluster),
///   [`SecretFile`](Self::SecretFile), [`Checkpoint`](Self::Checkpoint),
///   [`MembershipConfig`](Self::MembershipConfig);
/// - **etcd** (start or reach etcd, then retry): [`EtcdUnreachable`](Self::EtcdUnreachable),
///   [`Etcd`](Self::Etcd), [`NoMembers`](Self::NoMembers),
///   [`TooManyMembers`](Self::TooManyMembers);
/// - **the graph or the caller** (fix the graph, inputs or placement):
///   [`MissingTensor`](Self::MissingTensor), [`BadInputs`](Self::BadInputs),
///   [`Weight`](Self::Weight), [`Plan`](Self::Plan), [`ShapeOverflow`](Self::ShapeOverflow),
///   [`Scheduler`](Self::Scheduler) (carries the scheduler's typed [`genie_scheduler::Error`]);
/// - **resources** (free some, or raise the limit): [`KvCache`](Self::KvCache),
///   [`OverBudget`](Self::OverBudget), [`Refused`](Self::Refused);
/// - **a peer** (retry, or restart that worker): [`Transport`](Self::Transport) (carries the
///   transport's typed [`TransportError`](genie_transport::TransportError)),
///   [`WorkerFailed`](Self::WorkerFailed), [`BadMessage`](Self::BadMessage);
/// - **compute and output**: [`Kernel`](Self::Kernel), [`Write`](Self::Write).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A cluster file could not be read.
    #[error("cannot read cluster file {path}: {source}")]
    ClusterRead {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A cluster file is not valid TOML or misses/mistypes a field.
    #[error("cluster file {path}: {message}")]
    ClusterParse {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// The parser's message, naming the field.
        message: String,
    },
    /// A cluster file field has a value that parses but is not acceptable.
    #[error("cluster file {path}: field `{field}`: {reason}")]
    ClusterField {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// Dotted path of the offending field, e.g. `workers[1].address`.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
    /// A worker name was asked for that the cluster does not define.
    #[error("no worker named `{name}` in the cluster")]
    UnknownWorker {
        /// The name asked for.
        name: String,
    },
    /// A tensor was asked for that the store does not hold.
    #[error("worker {worker}: tensor `{tensor}` is not in the store")]
    MissingTensor {
        /// The worker whose store was asked.
        worker: String,
        /// The tensor's name.
        tensor: String,
    },
    /// A kernel was given inputs it cannot use (wrong count, shape or dtype).
    #[error("node `{node}` ({op}): {reason}")]
    BadInputs {
        /// The node being executed.
        node: String,
        /// Its operation.
        op: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensor library failed.
    #[error("node `{node}`: kernel failed: {source}")]
    Kernel {
        /// The node being executed.
        node: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// A weight could not be produced (missing in a checkpoint, wrong shape).
    #[error("weight `{name}`: {reason}")]
    Weight {
        /// The parameter's name (Hugging Face layout).
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// A checkpoint file could not be read.
    #[error("cannot load checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The KV-cache manager ran out of blocks or was asked about an unknown sequence.
    #[error("kv cache: {reason}")]
    KvCache {
        /// What went wrong.
        reason: String,
    },
    /// The transport failed on a link to a worker (or opening this side's endpoint). A dead or
    /// closed peer is reported as [`WorkerFailed`](Self::WorkerFailed) instead; what is left
    /// here says, by its source's variant, whose fault it is (see
    /// [`TransportError`](genie_transport::TransportError)).
    #[error("transport error talking to worker {worker}: {source}")]
    Transport {
        /// The worker at the other end (`driver` or `embedded` for this side's endpoint).
        worker: String,
        /// The transport's error.
        #[source]
        source: genie_transport::TransportError,
    },
    /// A worker stopped answering or died mid-run.
    #[error("worker {worker} failed: {reason}")]
    WorkerFailed {
        /// The worker.
        worker: String,
        /// What was observed.
        reason: String,
    },
    /// A peer sent a control message that does not decode or does not fit the run.
    #[error("worker {worker} sent a bad message: {reason}")]
    BadMessage {
        /// The sender.
        worker: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The scheduler rejected the graph or could not build a schedule.
    #[error("scheduler: {0}")]
    Scheduler(#[from] genie_scheduler::Error),
    /// The graph and the schedule do not fit together or the graph uses something unsupported.
    #[error("plan: {0}")]
    Plan(String),
    /// The cluster is reachable from other hosts but has no secret, and does not say
    /// `insecure = true`: anyone who can reach a worker could drive it.
    #[error("{reason}")]
    InsecureCluster {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A secret file could not be used (missing, empty, or readable by others).
    #[error("secret file {path}: {reason}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A tensor's size (the product of its shape and element size) does not fit in 64 bits.
    #[error("tensor `{tensor}`: shape {shape:?} overflows (its size does not fit in 64 bits)")]
    ShapeOverflow {
        /// The tensor (node name, output index).
        tensor: String,
        /// Its declared shape.
        shape: Vec<usize>,
    },
    /// A request would make the worker hold more memory than its budget allows; nothing was
    /// allocated. Raise the worker's `--memory-budget-mb` if the request is genuine.
    #[error("worker {worker}: {what} needs {bytes} bytes, over the memory budget of {budget}")]
    OverBudget {
        /// The worker.
        worker: String,
        /// What asked for the memory.
        what: String,
        /// Bytes it needs.
        bytes: u64,
        /// The worker's budget in bytes.
        budget: u64,
    },
    /// A peer or driver was refused (a name already connected, a sequence of another driver).
    #[error("refused by worker {worker}: {reason}")]
    Refused {
        /// The worker that refused.
        worker: String,
        /// Why.
        reason: String,
    },
    /// A membership setting is unusable: a cluster or worker name that cannot be an etcd key
    /// segment, an endpoint that is not `http://host:port`, a zero TTL.
    #[error("membership: `{field}`: {reason}")]
    MembershipConfig {
        /// The setting (`cluster_name`, `name`, `endpoints[0]`, `ttl`).
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// etcd did not answer within the connect timeout (not running, wrong address, a
    /// firewall). Nothing was registered.
    #[error("etcd at {endpoints} unreachable (waited {waited_ms} ms): {reason}")]
    EtcdUnreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// How long it waited.
        waited_ms: u64,
        /// The last thing the client said.
        reason: String,
    },
    /// An etcd request failed after etcd had been reached (it went away, or refused it).
    #[error("etcd {op} failed: {reason}")]
    Etcd {
        /// The request (`list members`, `grant lease`, `register`, `watch`).
        op: &'static str,
        /// What the client said.
        reason: String,
    },
    /// No worker is registered under the cluster's prefix.
    #[error("no worker is registered in etcd under {prefix}")]
    NoMembers {
        /// The key prefix listed (`/genie/<cluster>/workers/`).
        prefix: String,
    },
    /// More workers are registered than a listing reads (a runaway registration, or a shared
    /// prefix): nothing past the limit is trusted.
    #[error("more than {limit} workers are registered in etcd under {prefix}")]
    TooManyMembers {
        /// The key prefix listed.
        prefix: String,
        /// The most a listing reads (`membership::MAX_MEMBERS`, feature `etcd`).
        limit: usize,
    },
    /// Writing a trace or report file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
