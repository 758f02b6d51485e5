//! Control messages between the driver and workers, and between workers.
//!
//! A message is `[u32 LE header length][JSON header][binary payload]`; tensors travel in the
//! payload (never as JSON numbers), addressed by `(offset, len)` in the header. Decoding never
//! panics: every length is checked against what arrived.

use crate::error::{Result, RuntimeError};
use crate::plan::Placement;
use genie_scheduler::graph::{Graph, TensorMeta, TensorRef};
use genie_transport::RemoteRegion;
use serde::{Deserialize, Serialize};

/// Where parameter values come from (sent to workers at setup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightSpec {
    /// Seeded random weights.
    Seeded(u64),
    /// A safetensors checkpoint path readable by every worker.
    Checkpoint(String),
}

/// A tensor carried in a message's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadTensor {
    /// Input node name or produced tensor.
    pub name: String,
    /// Tensor reference (for outputs).
    pub tensor: Option<TensorRef>,
    /// Shape and dtype.
    pub meta: TensorMeta,
    /// Offset of its bytes in the payload.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
}

/// Rows of a run's `input_ids` (`[N, 1]` I64) that come from the token ids (`[M, 1]` I64, its
/// first wanted output) of the last run on this worker that returned such ids (runs that return
/// none, such as a KV take-in between two decode steps, come between freely): `input_ids[dst]
/// = ids[src]` for each `(dst, src)`. Ids feed one run. The run fails if `run` was not that
/// last run, its ids fed a run already, or a row is out of range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feed {
    /// The run whose token ids are fed.
    pub run: u64,
    /// `(dst, src)` row pairs.
    pub rows: Vec<(u32, u32)>,
}

/// A compute span measured by a worker, µs since the UNIX epoch (comparable across the
/// processes of one host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeRecord {
    /// Node id (index in the run's graph).
    pub node: u32,
    /// Start.
    pub start_us: f64,
    /// Duration.
    pub dur_us: f64,
}

/// Everything a worker tells the driver about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RunStats {
    /// Compute spans.
    pub compute: Vec<ComputeRecord>,
    /// Transfer id → when the sender posted it (µs since the epoch).
    pub posted: Vec<(u32, f64)>,
    /// Transfer id → when the receiver saw its notification (µs since the epoch).
    pub arrived: Vec<(u32, f64)>,
    /// Nodes recomputed here that belong to another worker.
    pub recomputes: u64,
    /// Weights found in the worker's cache.
    pub cache_hits: u64,
    /// Nodes executed.
    pub nodes: u64,
    /// Peak bytes of the tensor store during the run.
    pub peak_store_bytes: u64,
}

/// A change of one tensor's metadata in a graph a worker remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reshape {
    /// Node id.
    pub node: u32,
    /// Output index.
    pub output: u32,
    /// The tensor's new shape and dtype.
    pub meta: TensorMeta,
}

/// The graph (and placement) a run executes.
///
/// A driver sends a graph and placement once, under an id it picks, and refers to them by that
/// id afterwards. A later run of the same structure whose tensors changed shape (a decode step
/// attends over one more position than the last) names the id and the changed tensors only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum GraphRef {
    /// A graph the worker keeps as `id` (replacing any graph of that id) and runs.
    Define {
        /// The id later runs use.
        id: u64,
        /// The graph.
        graph: Graph,
        /// Where nodes run.
        placement: Placement,
    },
    /// The graph kept as `id`, with the tensor metadata in `reshape` changed first (the change
    /// is kept for later runs).
    Cached {
        /// The id the graph was defined under.
        id: u64,
        /// Changed tensor metadata.
        reshape: Vec<Reshape>,
    },
}

impl GraphRef {
    /// The id.
    pub fn id(&self) -> u64 {
        match self {
            GraphRef::Define { id, .. } | GraphRef::Cached { id, .. } => *id,
        }
    }
}

/// The control protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// First message of a driver's connection.
    HelloDriver,
    /// First message of a worker-to-worker connection, answered with [`Msg::Welcome`], or
    /// with [`Msg::Failed`] while another live connection holds that name.
    HelloPeer {
        /// Sender's name.
        name: String,
    },
    /// Worker → worker: the `HelloPeer` was accepted.
    Welcome,
    /// Driver → worker: connect to the other workers and prepare weights.
    Setup {
        /// Weight source.
        weights: WeightSpec,
    },
    /// Worker → driver: mesh connected.
    SetupDone,
    /// Driver → worker: run a graph. Inputs in the payload.
    Run {
        /// Run number.
        run: u64,
        /// Ids of kept graphs the worker drops first (the driver no longer refers to them).
        forget: Vec<u64>,
        /// The graph and placement, or the id of kept ones.
        graph: GraphRef,
        /// The sequences whose KV caches the run reads and extends: a cache node of slot `i`
        /// belongs to `seqs[i]` (one sequence for prefill and one-sequence steps; a batched
        /// decode step's, in slot order). 1 to [`MAX_DECODE_BATCH`](genie_scheduler::builders::MAX_DECODE_BATCH), distinct.
        seqs: Vec<u64>,
        /// Model inputs (in the payload).
        inputs: Vec<PayloadTensor>,
        /// Tensors to send back to the driver.
        wanted: Vec<TensorRef>,
        /// Whether to report each node's compute span ([`RunStats::compute`]); without, a
        /// reply carries counts and transfer times only (absent: yes).
        #[serde(default = "yes")]
        spans: bool,
        /// Sequences whose KV caches the worker drops before this run, as
        /// [`Msg::FreeSequence`] would (unanswered; one this session did not run here fails
        /// the run). Lets a driver free finished sequences without a round trip of its own.
        #[serde(default)]
        free: Vec<u64>,
        /// Rows of the `input_ids` input taken from the token ids the worker's previous run
        /// returned (see [`Feed`]), so that a decode step can be sent before the step it
        /// follows has answered.
        #[serde(default)]
        feed: Option<Feed>,
        /// Whether the worker answers once its transfers to peers are posted, before the peers
        /// acknowledge them (the sending round of a run in two rounds, see
        /// [`Driver::run_senders_first`](crate::driver::Driver::run_senders_first)), so that
        /// its next run computes while they travel. It settles them before its next run that
        /// sends to the same peer (whose staging region that run rewrites) and checks the
        /// others at the start of every run: one that failed fails that run (absent: no).
        #[serde(default)]
        acks_later: bool,
    },
    /// Worker → worker: the landing region for this run's transfers from the receiver.
    Regions {
        /// Run number.
        run: u64,
        /// The region.
        region: RemoteRegion,
    },
    /// Worker → driver: its part of a run finished. Outputs in the payload.
    Done {
        /// Run number.
        run: u64,
        /// Wanted tensors produced here.
        outputs: Vec<PayloadTensor>,
        /// Measurements.
        stats: RunStats,
    },
    /// Worker → driver: the run failed here.
    Failed {
        /// Run number.
        run: u64,
        /// The error.
        error: String,
        /// The worker the failure is attributed to (a dead peer), if any.
        culprit: Option<String>,
    },
    /// Driver → worker: drop a sequence's KV cache (answered with [`Msg::Freed`]). Sequences
    /// belong to the driver connection that made them: another driver's sequence of the same
    /// number is a different one.
    FreeSequence {
        /// Sequence id.
        seq: u64,
    },
    /// Worker → driver: a `FreeSequence` was carried out.
    Freed {
        /// Sequence id.
        seq: u64,
        /// KV blocks it released (0: this driver held nothing under that id here).
        blocks: u64,
    },
    /// Driver → worker: stop serving.
    Shutdown,
}

/// Encodes a message with its payload.
pub fn encode(msg: &Msg, payload: &[u8]) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(msg).map_err(|e| RuntimeError::Plan(e.to_string()))?;
    let mut out = Vec::with_capacity(4 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}

fn yes() -> bool {
    true
}

/// Decodes a message; `from` names the sender for errors.
pub fn decode(bytes: &[u8], from: &str) -> Result<(Msg, Vec<u8>)> {
    let bad = |reason: String| RuntimeError::BadMessage {
        worker: from.into(),
        reason,
    };
    let len_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("shorter than its length prefix".into()))?;
    let hlen = u32::from_le_bytes(len_bytes) as usize;
    let header = bytes
        .get(4..4 + hlen)
        .ok_or_else(|| bad(format!("header of {hlen} bytes does not fit")))?;
    let msg: Msg = serde_json::from_slice(header).map_err(|e| bad(e.to_string()))?;
    Ok((msg, bytes.get(4 + hlen..).unwrap_or(&[]).to_vec()))
}

/// Bytes of one payload tensor, checked against the payload.
pub fn payload_slice<'a>(payload: &'a [u8], t: &PayloadTensor, from: &str) -> Result<&'a [u8]> {
    let start = usize::try_from(t.offset).ok();
    let end = start.and_then(|s| s.checked_add(usize::try_from(t.len).ok()?));
    match (start, end) {
        (Some(s), Some(e)) if e <= payload.len() => Ok(&payload[s..e]),
        _ => Err(RuntimeError::BadMessage {
            worker: from.into(),
            reason: format!("tensor `{}` lies outside the payload", t.name),
        }),
    }
}

/// Fuzzing hook (`fuzz/fuzz_targets/runtime_msg.rs`): decodes `data` as a message; one that
/// decodes must encode, and decode and encode again to the same bytes. Never panics otherwise.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    if let Ok((msg, payload)) = decode(data, "fuzz") {
        let bytes = encode(&msg, &payload).expect("a decoded message encodes");
        let again = decode(&bytes, "fuzz").and_then(|(m, p)| encode(&m, &p));
        assert_eq!(again.ok(), Some(bytes), "a message does not round-trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let m = Msg::FreeSequence { seq: 3 };
        let b = encode(&m, b"xyz").unwrap();
        let (back, payload) = decode(&b, "w1").unwrap();
        assert!(matches!(back, Msg::FreeSequence { seq: 3 }));
        assert_eq!(payload, b"xyz");
        assert!(decode(&[1, 2], "w1").is_err());
        assert!(decode(&[255, 0, 0, 0, b'{'], "w1").is_err());
        assert!(decode(&[1, 0, 0, 0, b'{'], "w1").is_err());
        let t = PayloadTensor {
            name: "x".into(),
            tensor: None,
            meta: TensorMeta::new([1], genie_scheduler::graph::DType::F32),
            offset: 2,
            len: 4,
        };
        assert!(payload_slice(b"abc", &t, "w").is_err());
        assert_eq!(payload_slice(b"abcdef", &t, "w").unwrap(), b"cdef");
    }
}
