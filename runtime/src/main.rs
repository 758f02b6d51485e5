//! The `genie` command line.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use genie_runtime::cluster::Cluster;
use genie_runtime::demo::{run_demo, DemoOptions};
use genie_runtime::kernels::CpuKernels;
use genie_runtime::worker::{serve, transport_config};
use genie_scheduler::builders::{by_name, ModelSize};
use genie_scheduler::cost::DeviceSpec;
use genie_scheduler::graph::Graph;
use genie_scheduler::topology::{DeviceId, LinkSpec};
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};
use genie_transport::TransportConfig;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "genie",
    version,
    about = "Genie: disaggregated model serving over RDMA/TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embedded 2-worker cluster on TCP loopback: GPT-2 prefill on w0, KV streamed to w1,
    /// decode there; compared with the naive placement in the same run.
    Demo {
        /// `gpt2-small` (default) or `gpt2-124m`.
        #[arg(long, default_value = "gpt2-small")]
        model: String,
        /// Prompt length (KV length of the decode steps).
        #[arg(long, default_value_t = 1000)]
        seq_len: usize,
        /// Decode steps per placement.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Trace file (Chrome/Perfetto JSON).
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Safetensors checkpoint (HF GPT-2 layout) instead of seeded weights.
        #[arg(long)]
        weights: Option<PathBuf>,
    },
    /// Serve as one worker of a cluster file until a driver says shut down.
    Worker {
        /// Cluster file (TOML).
        #[arg(long)]
        cluster: PathBuf,
        /// This worker's name in the file.
        #[arg(long)]
        name: String,
    },
    /// Schedule a graph on a cluster and print the schedule (JSON) and a summary.
    Schedule {
        /// Graph JSON file.
        #[arg(long, conflicts_with = "model")]
        graph: Option<PathBuf>,
        /// Model builder name (gpt2-decode, gpt2-prefill, bert, resnet50).
        #[arg(long)]
        model: Option<String>,
        /// Cluster file (TOML): one CPU device per worker.
        #[arg(long)]
        cluster: PathBuf,
        /// Write the schedule JSON here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Transport benchmark on loopback: write-with-notification latency and bandwidth.
    Perf {
        /// Message sizes in bytes.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "8,4096,65536,1048576,16777216"
        )]
        sizes: Vec<usize>,
        /// Iterations per size.
        #[arg(long, default_value_t = 200)]
        iters: usize,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Demo {
            model,
            seq_len,
            steps,
            trace,
            weights,
        } => {
            let mut opts = DemoOptions {
                model,
                seq_len,
                steps,
                weights,
                ..DemoOptions::default()
            };
            if let Some(t) = trace {
                opts.trace = t;
            }
            let figures = run_demo(&opts, &mut |line| println!("{line}"))?;
            println!("{}", figures.last_line());
        }
        Cmd::Worker { cluster, name } => {
            let c = Cluster::load(&cluster)?;
            let i = c.index_of(&name)?;
            let cfg = transport_config(&c, c.workers[i].address);
            let (ep, sel) = genie_transport::open_with_selection(cfg)
                .with_context(|| format!("opening the endpoint of worker {name}"))?;
            eprintln!(
                "worker {name} listening on {} ({} backend: {})",
                ep.local_addr(),
                sel.backend,
                sel.reason
            );
            serve(ep, c, &name, Arc::new(CpuKernels::new()))?;
        }
        Cmd::Schedule {
            graph,
            model,
            cluster,
            out,
        } => {
            let c = Cluster::load(&cluster)?;
            let g: Graph = match (graph, model) {
                (Some(p), None) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Graph::from_json(&text)?
                }
                (None, Some(m)) => by_name(&m, &ModelSize::default())?,
                _ => bail!("give exactly one of --graph FILE or --model NAME"),
            };
            let topo = Topology::new(
                c.workers
                    .iter()
                    .map(|w| {
                        (
                            w.name.clone(),
                            w.address.ip().to_string(),
                            DeviceSpec::cpu(),
                        )
                    })
                    .collect(),
                LinkSpec::gbps(20.0, 30.0),
                LinkSpec::gbps(10.0, 50.0),
            )?;
            let mut s = Scheduler::new(topo);
            let sched = s.create_schedule(&g, &OptimizationPlan::default())?;
            let json = sched.to_json()?;
            match out {
                Some(p) => {
                    std::fs::write(&p, &json)
                        .with_context(|| format!("writing {}", p.display()))?;
                    println!("schedule written to {}", p.display());
                }
                None => println!("{json}"),
            }
            println!("{sched}");
        }
        Cmd::Perf { sizes, iters } => perf(&sizes, iters)?,
    }
    Ok(())
}

/// One-sided write-with-notification between two endpoints on loopback: per size, the median
/// round trip (write, peer notified, peer writes back) and one-way streaming bandwidth.
fn perf(sizes: &[usize], iters: usize) -> Result<()> {
    let t = Duration::from_secs(10);
    let cfg = TransportConfig {
        max_message_size: 1 << 20,
        ..TransportConfig::default()
    };
    let (a, sel) = genie_transport::open_with_selection(cfg.clone())?;
    let b = genie_transport::open(cfg)?;
    println!("transport: {} backend ({})", sel.backend, sel.reason);
    let max = sizes.iter().copied().max().unwrap_or(8).max(8);
    let ra = a.alloc_region(max)?;
    let rb = b.alloc_region(max)?;
    let ca = a.connect(b.local_addr())?;
    let cb = b.accept(t)?;
    let da = ra.descriptor();
    let db = rb.descriptor();
    println!(
        "{:>10} {:>8} {:>14} {:>14}",
        "#bytes", "#iters", "t_rtt_med[us]", "BW[MB/s]"
    );
    let _ = DeviceId(0);
    for &size in sizes {
        let size = size.max(1);
        let mut rtts = Vec::with_capacity(iters);
        for i in 0..iters {
            let s = Instant::now();
            ca.write_notify(&ra, 0, &db, 0, size, i as u32)?.wait(t)?;
            cb.recv_notification(t)?;
            cb.write_notify(&rb, 0, &da, 0, size, i as u32)?.wait(t)?;
            ca.recv_notification(t)?;
            rtts.push(s.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(f64::total_cmp);
        let med = rtts.get(rtts.len() / 2).copied().unwrap_or(0.0);
        let s = Instant::now();
        let mut ops = Vec::with_capacity(iters);
        for i in 0..iters {
            ops.push(ca.write_notify(&ra, 0, &db, 0, size, i as u32)?);
        }
        for _ in 0..iters {
            cb.recv_notification(t)?;
        }
        for op in ops {
            op.wait(t)?;
        }
        let secs = s.elapsed().as_secs_f64();
        println!(
            "{size:>10} {iters:>8} {med:>14.2} {:>14.1}",
            (size * iters) as f64 / secs / 1e6
        );
    }
    Ok(())
}
