//! The timeline of a run (compute and transfer spans) and its counters, exported as
//! Chrome/Perfetto trace JSON: one track per worker for compute, one per link for transfers.
//!
//! Open the file at <https://ui.perfetto.dev> or `chrome://tracing`.

use crate::error::{Result, RuntimeError};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a span measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SpanKind {
    /// A node computed on a worker.
    Compute {
        /// The worker.
        worker: String,
    },
    /// A tensor moved from one worker to another.
    Transfer {
        /// Sending worker.
        src: String,
        /// Receiving worker.
        dst: String,
        /// Bytes moved.
        bytes: u64,
    },
}

/// One measured interval, in microseconds since the timeline's origin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// Node or tensor name.
    pub name: String,
    /// What was measured.
    pub kind: SpanKind,
    /// Start, µs since the origin.
    pub start_us: f64,
    /// Duration in µs.
    pub dur_us: f64,
}

impl Span {
    /// End time, µs since the origin.
    pub fn end_us(&self) -> f64 {
        self.start_us + self.dur_us
    }
}

/// Run counters. All relaxed: they are statistics, read after the run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes moved between workers.
    pub bytes_moved: AtomicU64,
    /// Transfers posted.
    pub transfers: AtomicU64,
    /// Tensors found already present (cached) instead of being moved or recomputed.
    pub cache_hits: AtomicU64,
    /// Nodes recomputed on a consumer's worker instead of being transferred.
    pub recomputes: AtomicU64,
    /// Nodes executed.
    pub nodes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Bytes moved between workers.
    pub bytes_moved: u64,
    /// Transfers posted.
    pub transfers: u64,
    /// Cache hits.
    pub cache_hits: u64,
    /// Recomputed nodes.
    pub recomputes: u64,
    /// Nodes executed.
    pub nodes: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            bytes_moved: self.bytes_moved.load(Ordering::Relaxed),
            transfers: self.transfers.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            recomputes: self.recomputes.load(Ordering::Relaxed),
            nodes: self.nodes.load(Ordering::Relaxed),
        }
    }

    /// Adds one transfer of `bytes`.
    pub fn add_transfer(&self, bytes: u64) {
        self.transfers.fetch_add(1, Ordering::Relaxed);
        self.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Collects spans from any thread against one clock origin.
#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    spans: Mutex<Vec<Span>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Timeline {
    /// A timeline whose time zero is `origin`.
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            spans: Mutex::new(Vec::new()),
        }
    }

    /// The clock origin.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Microseconds from the origin to `t` (0 when `t` is earlier).
    pub fn us(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.origin).as_secs_f64() * 1e6
    }

    /// Records a span from `start` to `end`.
    pub fn record(&self, name: impl Into<String>, kind: SpanKind, start: Instant, end: Instant) {
        let start_us = self.us(start);
        let dur_us = (self.us(end) - start_us).max(0.0);
        self.push(Span {
            name: name.into(),
            kind,
            start_us,
            dur_us,
        });
    }

    /// Adds a span measured elsewhere (e.g. by a remote worker, already shifted to this origin).
    pub fn push(&self, span: Span) {
        self.spans.lock().push(span);
    }

    /// All spans so far, sorted by start.
    pub fn spans(&self) -> Vec<Span> {
        let mut v = self.spans.lock().clone();
        v.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
        v
    }
}

/// Summary figures of a set of spans.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimelineSummary {
    /// First start to last end, µs.
    pub makespan_us: f64,
    /// Busy compute time per worker, µs.
    pub compute_us: BTreeMap<String, f64>,
    /// Busy transfer time per directed link `src->dst`, µs (union of intervals).
    pub link_us: BTreeMap<String, f64>,
    /// Bytes per directed link.
    pub link_bytes: BTreeMap<String, u64>,
}

impl TimelineSummary {
    /// Largest per-worker compute time, µs.
    pub fn busiest_worker_us(&self) -> f64 {
        self.compute_us.values().copied().fold(0.0, f64::max)
    }
    /// Largest per-link transfer time, µs.
    pub fn busiest_link_us(&self) -> f64 {
        self.link_us.values().copied().fold(0.0, f64::max)
    }
    /// Total bytes over all links.
    pub fn total_bytes(&self) -> u64 {
        self.link_bytes.values().sum()
    }
}

/// Length of the union of intervals (so overlapping spans on one track count once).
fn union_len(mut iv: Vec<(f64, f64)>) -> f64 {
    iv.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (s, e) in iv {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

/// Summarises spans.
pub fn summarize(spans: &[Span]) -> TimelineSummary {
    let mut out = TimelineSummary::default();
    if spans.is_empty() {
        return out;
    }
    let start = spans
        .iter()
        .map(|s| s.start_us)
        .fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(Span::end_us).fold(0.0, f64::max);
    out.makespan_us = end - start;
    let mut compute: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut links: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in spans {
        match &s.kind {
            SpanKind::Compute { worker } => compute
                .entry(worker.clone())
                .or_default()
                .push((s.start_us, s.end_us())),
            SpanKind::Transfer { src, dst, bytes } => {
                let key = format!("{src}->{dst}");
                *out.link_bytes.entry(key.clone()).or_default() += bytes;
                links.entry(key).or_default().push((s.start_us, s.end_us()));
            }
        }
    }
    out.compute_us = compute
        .into_iter()
        .map(|(k, v)| (k, union_len(v)))
        .collect();
    out.link_us = links.into_iter().map(|(k, v)| (k, union_len(v))).collect();
    out
}

#[derive(Serialize)]
struct ChromeEvent<'a> {
    name: &'a str,
    cat: &'static str,
    ph: &'static str,
    ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    pid: u32,
    tid: u32,
    args: serde_json::Value,
}

/// Renders spans as Chrome trace JSON (`{"traceEvents": [...]}`): process 1 holds one thread
/// (track) per worker for compute, process 2 one track per directed link for transfers.
pub fn chrome_trace_json(spans: &[Span], counters: &CounterSnapshot) -> serde_json::Value {
    let mut tracks: BTreeMap<(u32, String), u32> = BTreeMap::new();
    for s in spans {
        let key = match &s.kind {
            SpanKind::Compute { worker } => (1, format!("compute {worker}")),
            SpanKind::Transfer { src, dst, .. } => (2, format!("link {src}->{dst}")),
        };
        let next = tracks.len() as u32 + 1;
        tracks.entry(key).or_insert(next);
    }
    let mut events: Vec<serde_json::Value> = Vec::new();
    events.push(serde_json::json!({"name":"process_name","ph":"M","pid":1,"tid":0,"args":{"name":"workers (compute)"}}));
    events.push(serde_json::json!({"name":"process_name","ph":"M","pid":2,"tid":0,"args":{"name":"links (transfers)"}}));
    for ((pid, name), tid) in &tracks {
        events.push(
            serde_json::json!({"name":"thread_name","ph":"M","pid":pid,"tid":tid,"args":{"name":name}}),
        );
    }
    for s in spans {
        let (key, cat, args) = match &s.kind {
            SpanKind::Compute { worker } => (
                (1, format!("compute {worker}")),
                "compute",
                serde_json::json!({}),
            ),
            SpanKind::Transfer { src, dst, bytes } => (
                (2, format!("link {src}->{dst}")),
                "transfer",
                serde_json::json!({ "bytes": bytes }),
            ),
        };
        let tid = tracks.get(&key).copied().unwrap_or(0);
        let ev = ChromeEvent {
            name: &s.name,
            cat,
            ph: "X",
            ts: s.start_us,
            dur: Some(s.dur_us),
            pid: key.0,
            tid,
            args,
        };
        if let Ok(v) = serde_json::to_value(ev) {
            events.push(v);
        }
    }
    serde_json::json!({ "traceEvents": events, "otherData": { "counters": counters } })
}

/// Writes [`chrome_trace_json`] to `path`.
pub fn write_chrome_trace(path: &Path, spans: &[Span], counters: &CounterSnapshot) -> Result<()> {
    let v = chrome_trace_json(spans, counters);
    let text = serde_json::to_string(&v).map_err(|e| RuntimeError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|source| RuntimeError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, kind: SpanKind, s: f64, d: f64) -> Span {
        Span {
            name: name.into(),
            kind,
            start_us: s,
            dur_us: d,
        }
    }

    #[test]
    fn summary_and_trace_tracks() {
        let c = |w: &str| SpanKind::Compute { worker: w.into() };
        let t = SpanKind::Transfer {
            src: "a".into(),
            dst: "b".into(),
            bytes: 100,
        };
        let spans = vec![
            span("n1", c("a"), 0.0, 10.0),
            span("n2", c("a"), 5.0, 10.0),
            span("x", t.clone(), 10.0, 4.0),
            span("x2", t, 20.0, 2.0),
            span("n3", c("b"), 14.0, 10.0),
        ];
        let s = summarize(&spans);
        assert_eq!(s.makespan_us, 24.0);
        assert_eq!(s.compute_us["a"], 15.0);
        assert_eq!(s.link_us["a->b"], 6.0);
        assert_eq!(s.total_bytes(), 200);
        let j = chrome_trace_json(&spans, &CounterSnapshot::default());
        let ev = j["traceEvents"].as_array().unwrap();
        let names: Vec<&str> = ev
            .iter()
            .filter(|e| e["name"] == "thread_name")
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["compute a", "compute b", "link a->b"]);
        assert_eq!(ev.iter().filter(|e| e["ph"] == "X").count(), 5);
    }
}
