//! perftest-style transport benchmark: `genie-perf --help`.
//!
//! Loopback (server and client in one process):   `genie-perf --test write --sizes 64,1048576`
//! Two processes: `genie-perf --server --listen 0.0.0.0:18515` and `genie-perf --client HOST:18515`.
use anyhow::Context;
use clap::Parser;
use genie_transport::perf::{run, PerfArgs, PerfRole, PerfTest};
use genie_transport::{BackendChoice, PollMode, TransportConfig};
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(about = "perftest-style latency and bandwidth of Genie's transport")]
struct Cli {
    /// Backend: auto, tcp or rdma.
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// Tests to run (comma-separated): write, read, send.
    #[arg(long, default_value = "write,read,send", value_delimiter = ',')]
    test: Vec<String>,
    /// Message sizes in bytes (comma-separated); default 2, 8, 32, ... 8 MiB.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Operations per size.
    #[arg(long, short = 'n', default_value_t = 1000)]
    iterations: usize,
    /// Operations in flight for bandwidth.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Spin instead of sleeping while waiting (lower latency, burns cores).
    #[arg(long)]
    busy_poll: bool,
    /// Run as a server on --listen.
    #[arg(long, conflicts_with = "client")]
    server: bool,
    /// Run as a client of the server at this address.
    #[arg(long)]
    client: Option<SocketAddr>,
    /// Listen address (server, or the loopback pair).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// RDMA device (e.g. rxe0).
    #[arg(long)]
    rdma_device: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let backend = match cli.backend.as_str() {
        "auto" => BackendChoice::Auto,
        "tcp" => BackendChoice::Tcp,
        "rdma" => BackendChoice::Rdma,
        other => anyhow::bail!("unknown backend {other:?} (auto, tcp, rdma)"),
    };
    let tests = cli
        .test
        .iter()
        .map(|t| match t.as_str() {
            "write" => Ok(PerfTest::Write),
            "read" => Ok(PerfTest::Read),
            "send" => Ok(PerfTest::Send),
            other => Err(anyhow::anyhow!(
                "unknown test {other:?} (write, read, send)"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = TransportConfig {
        backend,
        listen: cli.listen,
        poll_mode: if cli.busy_poll {
            PollMode::BusyPoll
        } else {
            PollMode::Blocking
        },
        rdma_device: cli.rdma_device,
        ..TransportConfig::default()
    };
    let role = match (cli.server, cli.client) {
        (true, _) => PerfRole::Server,
        (false, Some(addr)) => PerfRole::Client(addr),
        (false, None) => PerfRole::Loopback,
    };
    let mut args = PerfArgs {
        config,
        tests,
        iterations: cli.iterations,
        window: cli.window,
        role,
        ..PerfArgs::default()
    };
    if !cli.sizes.is_empty() {
        args.sizes = cli.sizes;
    }
    run(&args, &mut std::io::stdout().lock()).context("genie perf")?;
    Ok(())
}
