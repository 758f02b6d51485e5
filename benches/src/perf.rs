//! perftest-style latency and bandwidth measurement of a transport (the logic of `genie-perf`).
//!
//! For each test (write, read, send) and message size it measures
//! - latency: `iterations` operations one after the other, each waited for before the next; the
//!   `t_*` columns are the time from posting an operation to seeing its completion, i.e. one round
//!   trip (a write or read completes when the target answered; a send's time is a ping-pong);
//! - bandwidth: `iterations` operations with up to `window` in flight (one-sided ones submitted in
//!   batches of `window / 4`, at most 32, each asking for one completion, like perftest's
//!   completion moderation); `BW_average` in MB/s (MB = 10^6 bytes) and `MsgRate` in millions of
//!   operations per second.
//!
//! Server and client run in one process on loopback ([`PerfRole::Loopback`]), or as two processes
//! ([`PerfRole::Server`] / [`PerfRole::Client`]).

use clap::builder::TypedValueParser;
use genie_sys::clock;
use genie_transport::codec::{DecodeError, Reader};
use genie_transport::{
    open, BackendChoice, Batch, Connection, Op, PollMode, RdmaConfig, Region, RemoteRegion, Result,
    TcpConfig, Transfer, TransferKind, Transport, TransportConfig, TransportError,
};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which operation to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PerfTest {
    /// One-sided write.
    Write,
    /// One-sided read.
    Read,
    /// Two-sided message (latency is a ping-pong).
    Send,
}

impl std::fmt::Display for PerfTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PerfTest::Write => "write",
            PerfTest::Read => "read",
            PerfTest::Send => "send",
        })
    }
}

/// Where this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PerfRole {
    /// Server and client in this process, on loopback.
    Loopback,
    /// Serve clients on the configured listen address until killed.
    Server,
    /// Connect to a server at this address and measure.
    Client(SocketAddr),
}

/// Arguments of a run (a plain struct: the `genie-perf` binary fills it from [`PerfCli`], other
/// benchmarks fill it themselves).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerfArgs {
    /// Endpoint configuration (backend, poll mode, listen address for servers).
    pub config: TransportConfig,
    /// Tests to run, in order.
    pub tests: Vec<PerfTest>,
    /// Message sizes in bytes.
    pub sizes: Vec<usize>,
    /// Operations per size and measurement.
    pub iterations: usize,
    /// Operations in flight for bandwidth.
    pub window: usize,
    /// Role of this process.
    pub role: PerfRole,
    /// Connections the client opens to the server: the first is measured, the others stay open
    /// and idle (how the figures change with the number of connections). At least 1.
    #[serde(default = "one")]
    pub connections: usize,
}

fn one() -> usize {
    1
}

impl Default for PerfArgs {
    fn default() -> Self {
        Self {
            config: TransportConfig::default(),
            tests: vec![PerfTest::Write, PerfTest::Read, PerfTest::Send],
            sizes: (1..=23).step_by(2).map(|s| 1usize << s).collect(),
            iterations: 1000,
            window: 16,
            role: PerfRole::Loopback,
            connections: 1,
        }
    }
}

/// One output row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerfRow {
    /// The test.
    pub test: PerfTest,
    /// Message size.
    pub bytes: usize,
    /// Operations per measurement.
    pub iterations: usize,
    /// Fastest round trip, µs.
    pub t_min_us: f64,
    /// Median round trip, µs.
    pub t_typical_us: f64,
    /// Mean round trip, µs.
    pub t_avg_us: f64,
    /// 99th percentile round trip, µs.
    pub t_p99_us: f64,
    /// Bandwidth, MB/s (10^6 B/s).
    pub bw_mb_s: f64,
    /// Operation rate, millions per second.
    pub msg_rate_mpps: f64,
}

/// The perftest column header.
pub const HEADER: &str =
    "#bytes #iterations t_min[usec] t_typical[usec] t_avg[usec] 99%[usec] BW_average[MB/s] MsgRate[Mpps]";

const TAG_ECHO: u8 = b'E';
const TAG_SINK: u8 = b'D';
const WAIT: Duration = Duration::from_secs(30);

/// Runs the measurement described by `args`, printing perftest-style tables to `out`; returns the
/// rows (empty for a server, which runs until killed).
pub fn run(args: &PerfArgs, out: &mut dyn Write) -> Result<Vec<PerfRow>> {
    if args.iterations == 0 || args.window == 0 || args.connections == 0 {
        return Err(TransportError::InvalidArgument(
            "iterations, window and connections must be at least 1".into(),
        ));
    }
    let max = args.sizes.iter().copied().max().unwrap_or(0);
    let region_len = max.saturating_mul(args.window).max(4096);
    match args.role {
        PerfRole::Server => {
            let t = open(args.config.clone())?;
            writeln!(
                out,
                "# genie-perf server: backend {} listening on {}",
                t.backend(),
                t.local_addr()
            )
            .map_err(|e| TransportError::io("write", e))?;
            serve(t, region_len, None)
        }
        PerfRole::Loopback => {
            let server = open(args.config.clone())?;
            let addr = server.local_addr();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            let h = std::thread::spawn(move || serve(server, region_len, Some(s2)));
            let rows = client(args, addr, out);
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            match h.join() {
                Ok(r) => r.map(|_| ())?,
                Err(_) => {
                    return Err(TransportError::InvalidArgument(
                        "perf server thread panicked".into(),
                    ))
                }
            }
            rows
        }
        PerfRole::Client(addr) => client(args, addr, out),
    }
}

/// Accepts connections; on each, sends a region descriptor and echoes `E`-tagged messages.
fn serve(
    t: Arc<dyn Transport>,
    region_len: usize,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<Vec<PerfRow>> {
    let region = t.alloc_region(region_len)?;
    let desc = serde_json_like(&region.descriptor());
    let stopped = || {
        stop.as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut workers = Vec::new();
    while !stopped() {
        let conn = match t.accept(Duration::from_millis(100)) {
            Ok(c) => c,
            Err(TransportError::Timeout { .. }) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "perf server: accept failed");
                continue;
            }
        };
        conn.send(&desc)?.wait(WAIT)?;
        let busy = t.config().poll_mode == PollMode::BusyPoll;
        workers.push(std::thread::spawn(move || echo(conn, busy)));
    }
    for w in workers {
        let _ = w.join();
    }
    drop(region);
    Ok(Vec::new())
}

/// Busy-poll echo: after this long without a message the echo thread naps between polls, so that
/// an idle server (during the write and read tests, which send no messages) leaves the CPU to the
/// client, like perftest's servers, which wait in a blocking socket read. Its naps double from
/// [`ECHO_NAP`] up to [`ECHO_NAP_MAX`] while nothing comes: a fixed 500 us nap put 2000 wake-ups
/// a second beside the measured thread for a whole read test. The first message after an idle
/// spell waits up to one nap, which the warm-up iterations absorb.
const ECHO_SPIN: Duration = Duration::from_millis(2);
const ECHO_NAP: Duration = Duration::from_micros(100);
const ECHO_NAP_MAX: Duration = Duration::from_millis(10);

fn echo(conn: Arc<dyn Connection>, busy: bool) {
    let mut last_msg = Instant::now();
    let mut polls = 0u32;
    // The next nap while idle (`None`: spinning).
    let mut nap: Option<Duration> = None;
    loop {
        let msg = if busy {
            match conn.try_recv() {
                Ok(Some(m)) => {
                    last_msg = Instant::now();
                    nap = None;
                    m
                }
                Ok(None) => {
                    polls = polls.wrapping_add(1);
                    if nap.is_none() && polls % 256 == 0 && last_msg.elapsed() > ECHO_SPIN {
                        nap = Some(ECHO_NAP);
                    }
                    if let Some(d) = nap {
                        std::thread::sleep(d);
                        nap = Some((d * 2).min(ECHO_NAP_MAX));
                    } else {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                Err(_) => return,
            }
        } else {
            match conn.recv(Duration::from_secs(3600)) {
                Ok(m) => m,
                Err(_) => return,
            }
        };
        if msg.first() == Some(&TAG_ECHO) {
            match conn.send(&msg) {
                Ok(op) => {
                    if op.wait(WAIT).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// Descriptor encoding for the perf exchange: the fields as little-endian u64s.
fn serde_json_like(d: &RemoteRegion) -> Vec<u8> {
    [d.endpoint, d.region, d.len, d.key, d.addr]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

fn parse_desc(b: &[u8]) -> Result<RemoteRegion> {
    let mut r = Reader::new(b);
    let bad = |e: DecodeError| e.into_error(None);
    let d = RemoteRegion {
        endpoint: r.u64().map_err(bad)?,
        region: r.u64().map_err(bad)?,
        len: r.u64().map_err(bad)?,
        key: r.u64().map_err(bad)?,
        addr: r.u64().map_err(bad)?,
    };
    r.finish().map_err(bad)?;
    Ok(d)
}

fn client(args: &PerfArgs, addr: SocketAddr, out: &mut dyn Write) -> Result<Vec<PerfRow>> {
    let io = |e| TransportError::io("write", e);
    let t = open(args.config.clone())?;
    let conn = t.connect(addr)?;
    let remote = parse_desc(&conn.recv(WAIT)?)?;
    let idle = (1..args.connections)
        .map(|_| t.connect(addr))
        .collect::<Result<Vec<_>>>()?;
    let max = args.sizes.iter().copied().max().unwrap_or(0);
    let local = t.alloc_region(max.saturating_mul(args.window).max(4096))?;
    local.with_mut(|b| b.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8));
    let mut rows = Vec::new();
    for &test in &args.tests {
        writeln!(
            out,
            "# genie-perf: test {test}, backend {}, poll_mode {:?}, window {}, connections {}; t = post-to-completion round trip",
            t.backend(),
            args.config.poll_mode,
            args.window,
            args.connections
        )
        .map_err(io)?;
        writeln!(out, "{HEADER}").map_err(io)?;
        for &size in &args.sizes {
            if test == PerfTest::Send && size + 1 > args.config.max_message_size {
                continue;
            }
            if (size as u64).saturating_mul(args.window as u64) > remote.len {
                continue;
            }
            let row = measure(test, size, args, &*conn, &local, &remote)?;
            writeln!(
                out,
                "{:<6} {:<11} {:<11.2} {:<15.2} {:<11.2} {:<9.2} {:<16.2} {:.6}",
                row.bytes,
                row.iterations,
                row.t_min_us,
                row.t_typical_us,
                row.t_avg_us,
                row.t_p99_us,
                row.bw_mb_s,
                row.msg_rate_mpps
            )
            .map_err(io)?;
            rows.push(row);
        }
    }
    conn.close();
    idle.iter().for_each(|c| c.close());
    Ok(rows)
}

fn post(
    test: PerfTest,
    conn: &dyn Connection,
    local: &Region,
    slot: usize,
    size: usize,
    remote: &RemoteRegion,
    msg: &[u8],
) -> Result<Op> {
    let off = slot * size;
    match test {
        PerfTest::Write => conn.write(local, off, remote, off as u64, size),
        PerfTest::Read => conn.read(local, off, remote, off as u64, size),
        PerfTest::Send => conn.send(msg),
    }
}

/// The transfer kind of a one-sided test; `None` for messages.
fn one_sided(test: PerfTest) -> Option<TransferKind> {
    match test {
        PerfTest::Write => Some(TransferKind::Write),
        PerfTest::Read => Some(TransferKind::Read),
        PerfTest::Send => None,
    }
}

/// One-sided bandwidth: `n` transfers of `size` bytes, at most `window` in flight, submitted in
/// batches of `window / 4` (at most 32): a batch asks for one completion, as perftest's
/// completion moderation (`--cq-mod`) does, where one operation at a time would ask for one each.
fn bandwidth_batched(
    kind: TransferKind,
    n: usize,
    size: usize,
    window: usize,
    conn: &dyn Connection,
    local: &Region,
    remote: &RemoteRegion,
) -> Result<()> {
    let per = (window / 4).clamp(1, 32);
    let wait = |b: &Batch| -> Result<()> {
        let st = b.wait(WAIT)?;
        if st.failed > 0 {
            for r in b.results().into_iter().flatten() {
                r?;
            }
        }
        Ok(())
    };
    let mut flying: std::collections::VecDeque<Batch> = std::collections::VecDeque::new();
    let (mut inflight, mut i) = (0, 0);
    while i < n {
        let b = per.min(n - i);
        while inflight + b > window {
            match flying.pop_front() {
                Some(batch) => {
                    wait(&batch)?;
                    inflight -= batch.len();
                }
                None => break,
            }
        }
        // Slots `j % window`: no two transfers in flight share one.
        let transfers: Vec<Transfer<'_>> = (i..i + b)
            .map(|j| {
                let off = (j % window) * size;
                Transfer {
                    kind,
                    local,
                    local_offset: off,
                    remote,
                    remote_offset: off as u64,
                    len: size,
                }
            })
            .collect();
        flying.push_back(conn.post_batch(&transfers)?);
        inflight += b;
        i += b;
    }
    for batch in flying {
        wait(&batch)?;
    }
    Ok(())
}

fn measure(
    test: PerfTest,
    size: usize,
    args: &PerfArgs,
    conn: &dyn Connection,
    local: &Region,
    remote: &RemoteRegion,
) -> Result<PerfRow> {
    let n = args.iterations;
    // Latency.
    let mut echo = vec![0u8; size.max(1)];
    if let Some(b) = echo.first_mut() {
        *b = TAG_ECHO;
    }
    let warm = (n / 10).clamp(1, 100);
    // Timestamps from the time-stamp counter, like perftest's (see `genie_sys::clock`: the OS
    // clock would add its own cost to every operation on an emulated CPU).
    let cal = clock::Calibration::start();
    let mut counts = Vec::with_capacity(n);
    for i in 0..n + warm {
        let c0 = clock::cycles();
        post(test, conn, local, 0, size, remote, &echo)?.wait(WAIT)?;
        if test == PerfTest::Send {
            recv_reply(conn, args.config.poll_mode)?;
        }
        if i >= warm {
            counts.push(clock::cycles().saturating_sub(c0));
        }
    }
    let rate = cal.finish().ok_or_else(|| {
        TransportError::io(
            "rdtsc",
            std::io::Error::other("the time-stamp counter does not advance"),
        )
    })?;
    counts.sort_unstable();
    let us = |c: u64| rate.us(0, c);
    let pick = |q: f64| {
        counts
            .get(((counts.len() - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let avg = counts.iter().sum::<u64>() / counts.len().max(1) as u64;
    // Bandwidth: keep `window` operations in flight.
    let mut sink = vec![0u8; size.max(1)];
    if let Some(b) = sink.first_mut() {
        *b = TAG_SINK;
    }
    let start = Instant::now();
    match one_sided(test) {
        Some(kind) => bandwidth_batched(kind, n, size, args.window, conn, local, remote)?,
        None => {
            let mut inflight = std::collections::VecDeque::with_capacity(args.window);
            for i in 0..n {
                if inflight.len() == args.window {
                    if let Some(op) = inflight.pop_front() {
                        Op::wait(&op, WAIT)?;
                    }
                }
                inflight.push_back(post(
                    test,
                    conn,
                    local,
                    i % args.window,
                    size,
                    remote,
                    &sink,
                )?);
            }
            for op in inflight {
                op.wait(WAIT)?;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(PerfRow {
        test,
        bytes: size,
        iterations: n,
        t_min_us: us(pick(0.0)),
        t_typical_us: us(pick(0.5)),
        t_avg_us: us(avg),
        t_p99_us: us(pick(0.99)),
        bw_mb_s: (size * n) as f64 / secs / 1e6,
        msg_rate_mpps: n as f64 / secs / 1e6,
    })
}

fn recv_reply(conn: &dyn Connection, mode: PollMode) -> Result<Vec<u8>> {
    if mode == PollMode::Blocking {
        return conn.recv(WAIT);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(m) = conn.try_recv()? {
            return Ok(m);
        }
        if Instant::now() > deadline {
            return Err(TransportError::Timeout { after: WAIT });
        }
        std::thread::yield_now();
    }
}

/// The command-line arguments of a perf run (those of the `genie-perf` binary). Flatten it into a
/// clap parser and call [`PerfCli::to_args`].
#[derive(Debug, Clone, clap::Args)]
pub struct PerfCli {
    /// Backend.
    #[arg(long, value_parser = backend_parser(), default_value = "tcp")]
    pub backend: BackendChoice,
    /// Tests to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "write,read,send"
    )]
    pub test: Vec<PerfTest>,
    /// Message sizes in bytes (comma-separated); default 2, 8, 32, ... 8 MiB.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Operations per size.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub iterations: usize,
    /// Operations in flight for bandwidth.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Spin instead of sleeping while waiting (lower latency, burns cores).
    #[arg(long)]
    pub busy_poll: bool,
    /// Run as a server on --listen.
    #[arg(long, conflicts_with = "client")]
    pub server: bool,
    /// Run as a client of the server at this address.
    #[arg(long)]
    pub client: Option<std::net::SocketAddr>,
    /// Listen address (server, or the loopback pair).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// RDMA device (e.g. rxe0, mlx5_0), as perftest's -d; default: `GENIE_RDMA_DEVICE`, else
    /// the first with an active port.
    #[arg(long = "device", short = 'd', alias = "rdma-device")]
    pub rdma_device: Option<String>,
    /// Port of the RDMA device, as perftest's -i.
    #[arg(long = "ib-port", short = 'i', default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub ib_port: u8,
    /// GID index, as perftest's -x; default: on RoCE a RoCE v2 GID (IPv4-mapped preferred), on
    /// InfiniBand LID routing without a GRH (given, it forces a GRH).
    #[arg(long = "gid-index", short = 'x')]
    pub gid_index: Option<u8>,
    /// Connections to open: the first is measured, the others stay idle.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// TCP streams per connection (`tcp.streams`; both ends use the smaller of their settings).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// RDMA queue pairs per connection (`rdma.qps`, 1 to 8; both ends use the smaller of their
    /// settings): transfers of 256 KiB or more are striped over them.
    #[arg(long, default_value_t = 1)]
    pub qps: usize,
    /// Further RDMA devices the queue pairs spread over (`rdma.devices`, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
}

/// Parses `--backend`, listing its values in `--help` as a clap value enum would.
fn backend_parser() -> impl TypedValueParser<Value = BackendChoice> {
    clap::builder::PossibleValuesParser::new(["auto", "tcp", "rdma"]).map(|s| match s.as_str() {
        "auto" => BackendChoice::Auto,
        "rdma" => BackendChoice::Rdma,
        // The only value left: the possible-values parser refused any other.
        _ => BackendChoice::Tcp,
    })
}

impl PerfCli {
    /// The run these arguments describe.
    pub fn to_args(&self) -> PerfArgs {
        let config = TransportConfig {
            backend: self.backend,
            listen: self.listen,
            poll_mode: if self.busy_poll {
                PollMode::BusyPoll
            } else {
                PollMode::Blocking
            },
            rdma: RdmaConfig {
                device: self.rdma_device.clone(),
                port: self.ib_port,
                gid_index: self.gid_index,
                qps: self.qps,
                devices: self.devices.clone(),
            },
            tcp: TcpConfig {
                streams: self.streams,
            },
            ..TransportConfig::default()
        };
        let role = match (self.server, self.client) {
            (true, _) => PerfRole::Server,
            (false, Some(addr)) => PerfRole::Client(addr),
            (false, None) => PerfRole::Loopback,
        };
        let mut args = PerfArgs {
            config,
            tests: self.test.clone(),
            iterations: self.iterations,
            window: self.window,
            role,
            connections: self.connections,
            ..PerfArgs::default()
        };
        if !self.sizes.is_empty() {
            args.sizes = self.sizes.clone();
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_run_prints_perftest_columns() {
        let args = PerfArgs {
            config: TransportConfig::tcp(),
            sizes: vec![1, 4096],
            iterations: 20,
            window: 4,
            ..PerfArgs::default()
        };
        let mut out = Vec::new();
        let rows = run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(rows.len(), 6, "{text}");
        assert!(text.contains(HEADER));
        for r in rows {
            assert!(
                r.t_min_us <= r.t_typical_us && r.t_typical_us <= r.t_p99_us && r.bw_mb_s > 0.0,
                "{r:?}"
            );
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        perf: PerfCli,
    }

    #[test]
    fn command_line_backend_values() {
        use clap::Parser;
        let parse = |b: &str| Cli::try_parse_from(["genie-perf", "--backend", b]);
        assert_eq!(parse("auto").unwrap().perf.backend, BackendChoice::Auto);
        assert_eq!(parse("tcp").unwrap().perf.backend, BackendChoice::Tcp);
        assert_eq!(parse("rdma").unwrap().perf.backend, BackendChoice::Rdma);
        assert!(parse("ib").is_err());
        let args = Cli::try_parse_from(["genie-perf"]).unwrap().perf.to_args();
        assert_eq!(args.config.backend, BackendChoice::Tcp);
        assert_eq!(args.role, PerfRole::Loopback);
        assert_eq!(args.config.rdma, RdmaConfig::default());
    }

    /// perftest's `-d`, `-i`, `-x` (and their long forms) reach the transport's RDMA settings.
    #[test]
    fn command_line_device_port_and_gid_index() {
        use clap::Parser;
        let rdma = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("genie-perf").chain(argv.iter().copied()))
                .map(|c| c.perf.to_args().config.rdma)
        };
        let want = RdmaConfig {
            device: Some("mlx5_1".into()),
            port: 2,
            gid_index: Some(3),
            ..RdmaConfig::default()
        };
        assert_eq!(rdma(&["-d", "mlx5_1", "-i", "2", "-x", "3"]).unwrap(), want);
        assert_eq!(
            rdma(&["--device", "mlx5_1", "--ib-port", "2", "--gid-index", "3"]).unwrap(),
            want
        );
        assert_eq!(
            rdma(&["--rdma-device", "rxe0"]).unwrap().device.as_deref(),
            Some("rxe0")
        );
        let lanes = rdma(&["--qps", "4", "--devices", "rxe1,rxe2"]).unwrap();
        assert_eq!(
            (lanes.qps, lanes.devices.join(",")),
            (4, "rxe1,rxe2".into())
        );
        assert!(rdma(&["-i", "0"]).is_err(), "ports count from 1");
        assert!(rdma(&["-x", "256"]).is_err());
    }
}
