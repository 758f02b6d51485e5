//! perftest-style transport benchmark: `genie-perf --help`.
//!
//! Loopback (server and client in one process):   `genie-perf --test write --sizes 64,1048576`
//! Two processes: `genie-perf --server --listen 0.0.0.0:18515` and `genie-perf --client HOST:18515`.
use anyhow::Context;
use clap::Parser;
use genie_benches::perf::{run, PerfCli};

#[derive(Parser, Debug)]
#[command(about = "perftest-style latency and bandwidth of Genie's transport")]
struct Cli {
    #[command(flatten)]
    perf: PerfCli,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    run(&cli.perf.to_args(), &mut std::io::stdout().lock()).context("genie-perf")?;
    Ok(())
}
