//! Hostile drivers and failing workers against real `genie worker` processes, shared by
//! `tests/hostile.rs` and `examples/hostile.rs` (which `scripts/test-hostile.sh` runs).
//!
//! Three groups, each bounded in count and time, on loopback only:
//! - [`hostile_cases`]: an authenticated driver sends messages no honest driver sends (sizes
//!   that overflow or exceed the budget, a KV layer of `u32::MAX`, a checkpoint that is a device
//!   or a FIFO, a placement on worker `usize::MAX`, inputs of the wrong shape, a 3-million-input
//!   Concat). Each must get a typed `Failed` reply within [`REPLY_WITHIN`], and the worker must
//!   answer a small honest run afterwards.
//! - [`accept_starvation`]: idle and dripping sockets, and connections that never say hello,
//!   on the worker's port; a real driver must still be served within [`REPLY_WITHIN`].
//! - [`heal`]: a worker SIGKILLed (then restarted) or SIGSTOPped past the peer timeout (then
//!   resumed); the run in flight fails naming it within the peer timeout + 1 s, and the next
//!   generation gives the same tokens and logits, bitwise, as before. `tests/rdma_backend.rs`
//!   runs the SIGKILL case over rdma in the soft-RoCE VM.
//!
//! More cases (a transport flood, say) go in [`hostile_cases`]'s list or beside the two groups
//! in the runner ([`run_all`]), which adds them to the summary line.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;

use common::bits;
use genie_runtime::cluster::Cluster;
use genie_runtime::control::{connect_retry, send_msg, transport_config, SETUP_TIMEOUT};
use genie_runtime::driver::Driver;
use genie_runtime::error::RuntimeError;
use genie_runtime::models::{generate, prompt};
use genie_runtime::plan::Placement;
use genie_runtime::proto::{self, GraphRef, Msg, PayloadTensor, WeightSpec};
use genie_scheduler::builders::Gpt2Config;
use genie_scheduler::graph::{DType, Graph, OpKind, Semantics, TensorMeta, TensorRef};
use genie_transport::{Connection, Transport, TransportConfig, TransportError};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How fast a hostile request must be refused, and a real driver served.
pub const REPLY_WITHIN: Duration = Duration::from_secs(5);
/// The memory budget the hostile cases' worker runs with.
pub const BUDGET_MB: u64 = 256;
/// The address-space limit (`prlimit --as`) of the hostile cases' worker.
pub const AS_LIMIT: u64 = 8 << 30;

/// What became of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A typed `Failed` reply in time, and the worker still serves.
    RefusedTyped,
    /// Something else came back (the request was carried out, or an untyped end).
    NotRefused(String),
    /// No reply in time while the worker lived.
    Hung,
    /// The worker died.
    Crashed(String),
}

/// A case's name, what it does, and its outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Short name.
    pub name: String,
    /// The outcome.
    pub outcome: Outcome,
    /// Time to the reply.
    pub took: Duration,
    /// The reply (or what happened instead).
    pub detail: String,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A cluster of `n` loopback workers in a scratch directory, with a secret file.
pub struct Scratch {
    /// The cluster.
    pub cluster: Cluster,
    /// Its file.
    pub file: PathBuf,
    /// The directory (holds the file, the secret and `models/`).
    pub dir: PathBuf,
}

impl Scratch {
    /// Writes the files.
    pub fn new(n: usize, tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut cluster = Cluster::loopback(&ports);
        let dir = std::env::temp_dir().join(format!("genie-hostile-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("models")).expect("scratch dir");
        let secret = genie_runtime::cluster::new_secret();
        let sfile = dir.join("cluster.secret");
        std::fs::write(&sfile, &secret).expect("secret file");
        std::fs::set_permissions(&sfile, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = cluster.to_toml();
        std::fs::write(
            dir.join("cluster.toml"),
            format!("secret_file = \"cluster.secret\"\n{text}"),
        )
        .expect("cluster file");
        cluster.secret = Some(secret);
        Self {
            cluster,
            file: dir.join("cluster.toml"),
            dir,
        }
    }

    /// Starts worker `i` (under `prlimit --as` when `as_limit` is given).
    pub fn spawn(&self, genie: &Path, i: usize, as_limit: Option<u64>, budget_mb: u64) -> Child {
        let name = &self.cluster.workers[i].name;
        let mut cmd = match as_limit {
            Some(b) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--as={b}")).arg(genie);
                c
            }
            None => Command::new(genie),
        };
        cmd.args(["worker", "--cluster"])
            .arg(&self.file)
            .args(["--name", name])
            .arg("--model-dir")
            .arg(self.dir.join("models"))
            .args(["--memory-budget-mb", &budget_mb.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn genie worker")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Worker processes, killed on drop.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Peak resident set of a process in MiB (`VmHWM`), 0 when unknown.
pub fn max_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// An authenticated driver connection that sends whatever it is told.
pub struct RawDriver {
    _endpoint: Arc<dyn Transport>,
    conn: Arc<dyn Connection>,
    run: u64,
}

impl RawDriver {
    /// Connects to worker 0 of `c`, says hello and sets up seeded weights.
    pub fn connect(c: &Cluster) -> Self {
        let ep = genie_transport::open(transport_config(c, SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("driver endpoint");
        let w = &c.workers[0];
        let conn = connect_retry(&*ep, w.address, &w.name, Instant::now() + SETUP_TIMEOUT)
            .expect("connect to the worker");
        send_msg(&*conn, &w.name, &Msg::HelloDriver, &[]).expect("hello");
        let mut d = Self {
            _endpoint: ep,
            conn,
            run: 1000,
        };
        let setup = Msg::Setup {
            weights: WeightSpec::Seeded(1),
        };
        assert_eq!(
            d.ask(&proto::encode(&setup, &[]).expect("encode")),
            Ok("SetupDone".into()),
            "honest setup"
        );
        d
    }

    /// Sends a framed message and names the reply: `Ok(kind)` for a reply, `Err(outcome)` for
    /// none (hung or gone).
    pub fn ask(&mut self, framed: &[u8]) -> Result<String, Outcome> {
        if let Err(e) = self.conn.send(framed) {
            return Err(Outcome::Crashed(format!("send: {e}")));
        }
        match self.conn.recv(REPLY_WITHIN) {
            Ok(bytes) => match proto::decode(&bytes, "w0") {
                Ok((Msg::Failed { error, .. }, _)) => Ok(format!("Failed: {error}")),
                Ok((Msg::SetupDone, _)) => Ok("SetupDone".into()),
                Ok((Msg::Done { .. }, _)) => Ok("Done".into()),
                Ok((Msg::Freed { blocks, .. }, _)) => Ok(format!("Freed {blocks}")),
                Ok((other, _)) => Ok(format!("{other:?}")),
                Err(e) => Ok(format!("undecodable: {e}")),
            },
            Err(TransportError::Timeout { .. }) => Err(Outcome::Hung),
            Err(e) => Err(Outcome::Crashed(e.to_string())),
        }
    }

    /// A run message defining graph `id` (as JSON, so that it can be anything).
    pub fn run_json(&mut self, graph: &str, placement: &str, inputs: &str) -> Vec<u8> {
        self.run += 1;
        let header = format!(
            "{{\"Run\":{{\"run\":{},\"forget\":[],\"graph\":{{\"Define\":{{\"id\":{},\
             \"graph\":{graph},\"placement\":{placement}}}}},\"seqs\":[0],\"inputs\":{inputs},\
             \"wanted\":[]}}}}",
            self.run,
            self.run % 4
        );
        let mut out = (header.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out
    }

    /// A small honest run (`relu` of 4 values) must come back `Done`.
    pub fn probe(&mut self) -> Result<(), String> {
        let (g, x, y) = relu_graph(4);
        self.run += 1;
        let msg = Msg::Run {
            run: self.run,
            forget: vec![0, 1, 2, 3],
            graph: GraphRef::Define {
                id: 99,
                placement: Placement::single(&g),
                graph: g,
            },
            seqs: vec![0],
            inputs: vec![PayloadTensor {
                name: "x".into(),
                tensor: None,
                meta: x,
                offset: 0,
                len: 16,
            }],
            wanted: vec![y],
            spans: true,
            free: vec![],
            feed: None,
            // Harmless on a run with no transfers: it answers as ever.
            acks_later: true,
        };
        match self.ask(&proto::encode(&msg, &[0u8; 16]).map_err(|e| e.to_string())?) {
            Ok(k) if k == "Done" => Ok(()),
            other => Err(format!("probe: {other:?}")),
        }
    }
}

/// `x [n] → relu → y`.
pub fn relu_graph(n: usize) -> (Graph, TensorMeta, TensorRef) {
    let mut g = Graph::new("probe");
    let meta = TensorMeta::new(vec![n], DType::F32);
    let x = g
        .add_with_outputs(
            "x",
            OpKind::Input,
            vec![],
            vec![meta.clone()],
            Semantics::default(),
        )
        .expect("input");
    let y = g
        .add(
            "y",
            OpKind::Relu,
            vec![TensorRef::new(x, 0)],
            Semantics::default(),
        )
        .expect("relu");
    (g, meta, TensorRef::new(y, 0))
}

/// One node's JSON (`op` as the graph format spells it: `{"kind": .., "attrs": ..}`).
fn node(id: usize, name: &str, op: &str, inputs: &str, shape: &str) -> String {
    format!(
        "{{\"id\":{id},\"name\":\"{name}\",\"op\":{op},\"inputs\":{inputs},\
         \"outputs\":[{{\"shape\":{shape},\"dtype\":\"f32\"}}]}}"
    )
}

fn graph(nodes: &[String]) -> String {
    format!("{{\"name\":\"hostile\",\"nodes\":[{}]}}", nodes.join(","))
}

fn single(n: usize) -> String {
    format!(
        "{{\"worker_of\":[{}],\"recompute\":[],\"overlap\":true}}",
        vec!["0"; n].join(",")
    )
}

/// A hostile request: its name, the refusal its reply must contain, the framed message.
pub type HostileCase = (&'static str, &'static str, Vec<u8>);

/// The hostile requests (one is 30 MB).
pub fn hostile_cases(d: &mut RawDriver, model_dir: &Path) -> Vec<HostileCase> {
    let relu = |shape: &str| {
        graph(&[
            node(0, "x", "{\"kind\":\"input\"}", "[]", shape),
            node(1, "y", "{\"kind\":\"relu\"}", "[{\"node\":0}]", shape),
        ])
    };
    let param = |shape: &str| {
        graph(&[
            node(
                0,
                "p",
                "{\"kind\":\"parameter\",\"attrs\":{\"trainable\":true}}",
                "[]",
                shape,
            ),
            node(1, "y", "{\"kind\":\"relu\"}", "[{\"node\":0}]", shape),
        ])
    };
    let fifo = model_dir.join("fifo.safetensors");
    let _ = Command::new("mkfifo").arg(&fifo).status();
    let _ = std::os::unix::fs::symlink("/dev/zero", model_dir.join("zero.safetensors"));
    let checkpoint = |p: &str| {
        proto::encode(
            &Msg::Setup {
                weights: WeightSpec::Checkpoint(p.into()),
            },
            &[],
        )
        .expect("encode")
    };
    let mut cases = vec![
        (
            "huge_parameter",
            "over the memory budget",
            d.run_json(&param("[1099511627776]"), &single(2), "[]"),
        ),
        (
            "kv_layer_u32_max",
            "at most 1024 layers",
            d.run_json(
                &graph(&[node(
                    0,
                    "kv",
                    "{\"kind\":\"kv_cache\",\"attrs\":{\"layer\":4294967295}}",
                    "[]",
                    "[2,1,4,8]",
                )]),
                &single(1),
                "[]",
            ),
        ),
        (
            "shape_product_overflows",
            "overflows",
            d.run_json(
                &relu("[8589934592,8589934592,8589934592]"),
                &single(2),
                "[]",
            ),
        ),
        (
            "shape_product_wraps_to_small",
            "overflows",
            // 2^62 × 4 bytes wraps to 0 in 64 bits.
            d.run_json(&relu("[4611686018427387904]"), &single(2), "[]"),
        ),
        (
            "checkpoint_dev_zero",
            "outside the model directory",
            checkpoint("/dev/zero"),
        ),
        (
            "checkpoint_symlink_to_dev_zero",
            "outside the model directory",
            checkpoint("zero.safetensors"),
        ),
        (
            "checkpoint_fifo",
            "not a regular file",
            checkpoint("fifo.safetensors"),
        ),
        (
            "checkpoint_outside_model_dir",
            "outside the model directory",
            checkpoint("../cluster.secret"),
        ),
        (
            "worker_of_usize_max",
            "placement puts node 0 on worker 18446744073709551615",
            d.run_json(
                &relu("[4]"),
                &format!(
                    "{{\"worker_of\":[{m},{m}],\"recompute\":[],\"overlap\":true}}",
                    m = usize::MAX
                ),
                "[]",
            ),
        ),
        ("input_shape_disagrees", "but the graph's input is", {
            let mut m = d.run_json(
                &relu("[4]"),
                &single(2),
                "[{\"name\":\"x\",\"tensor\":null,\"meta\":{\"shape\":[8],\"dtype\":\"f32\"},\
                     \"offset\":0,\"len\":32}]",
            );
            m.extend_from_slice(&[0u8; 32]);
            m
        }),
    ];
    // A Concat of three million inputs (validation must stay linear, and so must the worker).
    let n = 3_000_000;
    let mut inputs = String::with_capacity(n * 11 + 2);
    inputs.push('[');
    for i in 0..n {
        if i > 0 {
            inputs.push(',');
        }
        inputs.push_str("{\"node\":0}");
    }
    inputs.push(']');
    let concat = |out: &str| {
        let op = "{\"kind\":\"concat\",\"attrs\":{\"axis\":0}}";
        graph(&[
            node(0, "x", "{\"kind\":\"input\"}", "[]", "[1]"),
            node(1, "c", op, &inputs, out),
        ])
    };
    // Declared wrong: validation refuses it.
    let bad = d.run_json(&concat("[1]"), &single(2), "[]");
    cases.push(("concat_3m_inputs", "invalid graph", bad));
    // Declared right, input withheld: the whole per-run path up to the kernel.
    let valid = d.run_json(&concat(&format!("[{n}]")), &single(2), "[]");
    cases.push(("concat_3m_inputs_valid", "is not in the store", valid));
    cases
}

/// Runs the hostile cases against a fresh worker under `prlimit --as`; returns the results and
/// the worker's peak RSS.
pub fn run_hostile(genie: &Path) -> (Vec<CaseResult>, f64) {
    let s = Scratch::new(1, "cases");
    let mut procs = Procs(vec![s.spawn(genie, 0, Some(AS_LIMIT), BUDGET_MB)]);
    let pid = procs.0[0].id();
    let mut d = RawDriver::connect(&s.cluster);
    d.probe().expect("the worker serves an honest run");
    let cases = hostile_cases(&mut d, &s.dir.join("models"));
    let mut out = Vec::new();
    let mut peak = 0f64;
    for (name, expect, framed) in cases {
        let t = Instant::now();
        let reply = d.ask(&framed);
        let took = t.elapsed();
        let detail = format!("{reply:?}");
        let alive = matches!(procs.0[0].try_wait(), Ok(None));
        let outcome = match reply {
            _ if !alive => Outcome::Crashed("the worker exited".into()),
            Ok(k) if k.starts_with("Failed") && k.contains(expect) => match d.probe() {
                Ok(()) => Outcome::RefusedTyped,
                Err(e) => Outcome::NotRefused(format!("{k}; then {e}")),
            },
            Ok(k) => Outcome::NotRefused(k),
            Err(Outcome::Crashed(e)) => Outcome::NotRefused(format!("connection ended: {e}")),
            Err(o) => o,
        };

        peak = peak.max(max_rss_mb(procs.0[0].id()));
        let fresh = outcome != Outcome::RefusedTyped;
        out.push(CaseResult {
            name: name.into(),
            outcome,
            took,
            detail,
        });
        // Later cases need a worker that serves, and a session of their own.
        if !alive {
            let _ = procs.0[0].wait();
            procs.0[0] = s.spawn(genie, 0, Some(AS_LIMIT), BUDGET_MB);
        } else if fresh {
            let _ = procs.0[0].kill();
            let _ = procs.0[0].wait();
            procs.0[0] = s.spawn(genie, 0, Some(AS_LIMIT), BUDGET_MB);
        }
        if fresh {
            d = RawDriver::connect(&s.cluster);
        }
    }
    let rss = peak.max(max_rss_mb(procs.0[0].id()));
    let _ = pid;
    (out, rss)
}

/// Idle, dripping and silent connections on a worker's port; then a real driver must be
/// served (connected and set up) within [`REPLY_WITHIN`].
pub fn accept_starvation(genie: &Path) -> CaseResult {
    let s = Scratch::new(1, "starve");
    let _procs = Procs(vec![s.spawn(genie, 0, None, BUDGET_MB)]);
    let addr = s.cluster.workers[0].address;
    // The worker is up once an honest driver got through; then let it go.
    drop(RawDriver::connect(&s.cluster));
    let mut raw = Vec::new();
    for _ in 0..50 {
        if let Ok(t) = TcpStream::connect(addr) {
            raw.push(t);
        }
    }
    // Drippers: one byte each, now and again below.
    for t in raw.iter_mut().take(25) {
        let _ = t.write_all(&[0]);
    }
    // Authenticated connections that never say hello.
    let ep = genie_transport::open(transport_config(
        &s.cluster,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ))
    .expect("endpoint");
    let mut silent = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = ep.connect(addr) {
            silent.push(c);
        }
    }
    for t in raw.iter_mut().take(25) {
        let _ = t.write_all(&[0]);
    }
    let t = Instant::now();
    let (outcome, detail) = match Driver::connect(&s.cluster, WeightSpec::Seeded(1)) {
        Ok(d) if t.elapsed() <= REPLY_WITHIN => {
            drop(d);
            (Outcome::RefusedTyped, "a real driver was served".into())
        }
        Ok(_) => (Outcome::Hung, "a real driver was served late".into()),
        Err(e) => (Outcome::NotRefused(e.to_string()), e.to_string()),
    };
    CaseResult {
        name: "accept_starvation".into(),
        outcome,
        took: t.elapsed(),
        detail: format!(
            "{} idle/dripping sockets, {} silent connections: {detail}",
            raw.len(),
            silent.len()
        ),
    }
}

/// A GPT-2 small enough to generate quickly across three workers.
pub fn small() -> Gpt2Config {
    Gpt2Config {
        layers: 3,
        hidden: 64,
        heads: 2,
        vocab: 256,
        context: 256,
        ..Gpt2Config::default()
    }
}

/// One generation's tokens, and its logits (prefill, then each step) as bit patterns.
pub type Generated = (Vec<i64>, Vec<Vec<u32>>);

/// One generation of sequence `seq` across the three workers.
pub fn generation(d: &mut Driver, steps: usize, seq: u64) -> Result<Generated, RuntimeError> {
    let cfg = small();
    let place = |g: &Graph| Placement::by_layer(g, 3, cfg.layers);
    let g = generate(d, &cfg, &prompt(8, cfg.vocab), steps, seq, place, place)?;
    let logits = std::iter::once(&g.prefill)
        .chain(&g.steps)
        .map(|r| bits(&r.outputs[0]))
        .collect();
    Ok((g.tokens, logits))
}

/// How a worker is made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then start it again.
    Kill,
    /// SIGSTOP for longer than the peer timeout, then SIGCONT.
    Stop,
}

/// Three workers; a generation; `fault` on w1 while a long generation runs: that run must
/// fail naming w1 within the peer timeout + 1 s; after the restart (or SIGCONT) a new driver's
/// generation must give the first one's tokens and logits, bitwise. The backend is whatever
/// [`transport_config`] picks (TCP, or RDMA under soft-RoCE). `Ok(detail)` or `Err(why)`.
pub fn heal(genie: &Path, fault: Fault) -> Result<String, String> {
    let s = Scratch::new(3, if fault == Fault::Kill { "kill" } else { "stop" });
    let mut procs = Procs((0..3).map(|i| s.spawn(genie, i, None, 1024)).collect());
    let peer_timeout = TransportConfig::default().peer_timeout;
    let mut d = Driver::connect(&s.cluster, WeightSpec::Seeded(5)).map_err(|e| e.to_string())?;
    let want = generation(&mut d, 4, 0).map_err(|e| e.to_string())?;
    let run = std::thread::spawn(move || {
        let r = generation(&mut d, 240, 1);
        (r, Instant::now(), d)
    });
    let pid = procs.0[1].id().to_string();
    let faulted = Instant::now();
    match fault {
        Fault::Kill => {
            procs.0[1].kill().map_err(|e| e.to_string())?;
            let _ = procs.0[1].wait();
        }
        Fault::Stop => {
            Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .map_err(|e| e.to_string())?;
        }
    }
    let (res, failed_at, d) = run.join().map_err(|_| "the run panicked".to_string())?;
    let took = failed_at.saturating_duration_since(faulted);
    let err = match res {
        Ok(_) => return Err("the run survived the fault".into()),
        Err(e) => e,
    };
    if !matches!(&err, RuntimeError::WorkerFailed { worker, .. } if worker == "w1") {
        return Err(format!("not a WorkerFailed naming w1: {err:?}"));
    }
    if took > peer_timeout + Duration::from_secs(1) {
        return Err(format!("the run failed only after {took:?}: {err}"));
    }
    drop(d);
    match fault {
        Fault::Kill => procs.0[1] = s.spawn(genie, 1, None, 1024),
        Fault::Stop => {
            // Stay stopped past the peer timeout, so that every peer declared w1 dead.
            let until = faulted + peer_timeout + Duration::from_millis(500);
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            Command::new("kill")
                .args(["-CONT", &pid])
                .status()
                .map_err(|e| e.to_string())?;
        }
    }
    let mut d = Driver::connect(&s.cluster, WeightSpec::Seeded(5))
        .map_err(|e| format!("reconnect: {e}"))?;
    let again = generation(&mut d, 4, 0).map_err(|e| format!("after healing: {e}"))?;
    let _ = d.shutdown();
    if again.0 != want.0 {
        return Err(format!(
            "tokens differ after healing: {:?} vs {:?}",
            again.0, want.0
        ));
    }
    if again.1 != want.1 {
        return Err("logits differ bitwise after healing".into());
    }
    Ok(format!("run failed after {took:?}: {err}; healed"))
}
