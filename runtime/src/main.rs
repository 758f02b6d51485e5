//! The `genie` command line.
#![forbid(unsafe_code)]

mod cli;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cli::demo::{run_demo, DemoOptions};
use genie_runtime::cluster::{new_secret, Cluster, Role};
use genie_runtime::control::transport_config;
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::{WorkerOptions, DEFAULT_MEMORY_BUDGET};
use genie_runtime::models::run::{run_generate, GenerateOptions};
use genie_runtime::models::Sampling;
use genie_runtime::worker::serve_with;
use genie_scheduler::builders::{by_name, ModelSize};
use genie_scheduler::cost::DeviceSpec;
use genie_scheduler::graph::Graph;
use genie_scheduler::topology::LinkSpec;
use genie_scheduler::{OptimizationPlan, Scheduler, Topology};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// mimalloc keeps freed memory for reuse: with glibc's malloc every tensor over its mmap
/// threshold is a fresh mapping, page-faulted in on first write and unmapped on free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Embedded 2-worker cluster on TCP loopback: prefill on w0, KV streamed to w1,
    /// decode there; compared with the naive placement in the same run.
    Demo {
        /// `gpt2-small` (default), `gpt2-124m`, or a Hugging Face model folder DIR
        /// (gpt2, llama, qwen2, mistral).
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
    /// Generate from a Hugging Face model folder on an embedded 2-worker cluster (prefill on
    /// w0, decode on w1). Prints the text when the folder has tokenizer.json, and as its last
    /// line `tokens=[id, ...]`, the generated ids (the first from the prefill).
    Generate {
        /// Model folder: config.json, model.safetensors or shards with their index,
        /// optionally tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs tokenizer.json).
        #[arg(
            long,
            conflicts_with = "prompt_ids",
            required_unless_present = "prompt_ids"
        )]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Option<Vec<i64>>,
        /// Tokens to generate.
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Keep only the K most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serve as one worker of a cluster file, or registered in etcd (`--etcd`), until a
    /// driver says shut down.
    Worker {
        /// Cluster file (TOML).
        #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
        cluster: Option<PathBuf>,
        /// This worker's name (in the cluster file, or registered in etcd).
        #[arg(long)]
        name: String,
        /// etcd client URLs, comma-separated (`http://host:2379`): register there instead of
        /// reading a cluster file (needs the `etcd` cargo feature).
        #[arg(long, value_delimiter = ',', requires_all = ["cluster_name", "listen"])]
        etcd: Option<Vec<String>>,
        /// The cluster's name in etcd (keys under `/genie/NAME/workers/`).
        #[arg(long)]
        cluster_name: Option<String>,
        /// With `--etcd`: what this worker does for the serving engine.
        #[arg(long, default_value = "both", value_parser = parse_role)]
        role: Role,
        /// With `--etcd`: the address to listen on and publish (ip:port, reachable by peers).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// With `--etcd`: the cluster secret's file (`genie secret`, mode 600). Never sent to
        /// etcd.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// With `--etcd`: run without a secret off loopback (a network you trust entirely).
        #[arg(long)]
        insecure: bool,
        /// With `--etcd`: lease TTL in seconds (how long a dead worker stays listed).
        #[arg(long, default_value_t = 10)]
        lease_ttl_secs: u64,
        /// With `--etcd`: silence after which a peer counts as dead, in ms (give every worker
        /// and driver of the cluster the same; a cluster file says `peer_timeout_ms`).
        #[arg(long, default_value_t = 2000, value_parser = parse_peer_timeout_ms)]
        peer_timeout_ms: u64,
        /// Directory drivers may load checkpoints from (none: seeded weights only).
        #[arg(long)]
        model_dir: Option<PathBuf>,
        /// Memory budget for what a driver may make this worker hold, in MiB.
        #[arg(long, default_value_t = DEFAULT_MEMORY_BUDGET >> 20)]
        memory_budget_mb: u64,
        /// Compute threads of this worker's own (default: one per core, shared by the
        /// process). Give workers that share a machine a share of its cores each.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: Option<u16>,
    },
    /// Print a fresh random cluster secret (32 bytes, hex):
    /// `genie secret > cluster.secret && chmod 600 cluster.secret`, then
    /// `secret_file = "cluster.secret"` in the cluster file.
    Secret,
    /// Schedule a graph on a cluster and print the schedule (JSON) and a summary.
    Schedule {
        /// Graph JSON file.
        #[arg(long, conflicts_with = "model")]
        graph: Option<PathBuf>,
        /// Model builder name (gpt2-decode, gpt2-prefill, bert, resnet50).
        #[arg(long)]
        model: Option<String>,
        /// Cluster file (TOML, as for `genie worker`): one CPU device per worker.
        #[arg(
            long,
            conflicts_with = "topology",
            required_unless_present = "topology"
        )]
        cluster: Option<PathBuf>,
        /// Topology file (TOML or JSON by extension: hosts, devices with specs or presets, links),
        /// e.g. `scheduler/examples/cluster.toml`.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Write the schedule JSON here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
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
        Cmd::Generate {
            model,
            prompt,
            prompt_ids,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            let opts = GenerateOptions {
                model,
                prompt,
                prompt_ids,
                max_tokens,
                sampling: Sampling {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
            };
            let tokens = run_generate(&opts, &mut |line| println!("{line}"))?;
            let ids: Vec<String> = tokens.iter().map(i64::to_string).collect();
            println!("tokens=[{}]", ids.join(", "));
        }
        Cmd::Worker {
            cluster,
            name,
            etcd,
            cluster_name,
            role,
            listen,
            secret_file,
            insecure,
            lease_ttl_secs,
            peer_timeout_ms,
            model_dir,
            memory_budget_mb,
            threads,
        } => {
            let opts = WorkerOptions {
                model_dir,
                memory_budget: memory_budget_mb.saturating_mul(1 << 20),
                threads: threads.map(usize::from),
            };
            let Some(cluster) = cluster else {
                let (Some(endpoints), Some(cluster_name), Some(listen)) =
                    (etcd, cluster_name, listen)
                else {
                    bail!("give --cluster FILE, or --etcd URL with --cluster-name and --listen");
                };
                #[cfg(feature = "etcd")]
                return cli::etcd::run_etcd_worker(cli::etcd::EtcdWorker {
                    endpoints,
                    cluster_name,
                    name,
                    role,
                    listen,
                    secret_file,
                    insecure,
                    ttl_secs: lease_ttl_secs,
                    peer_timeout: std::time::Duration::from_millis(peer_timeout_ms),
                    opts,
                });
                #[cfg(not(feature = "etcd"))]
                {
                    let _ = (endpoints, cluster_name, role, listen, secret_file, insecure);
                    let _ = (lease_ttl_secs, peer_timeout_ms);
                    bail!("--etcd needs genie built with the `etcd` cargo feature");
                }
            };
            let c = Cluster::load(&cluster)?;
            let i = c.index_of(&name)?;
            let cfg = genie_transport::TransportConfig {
                rdma: c.rdma_for(Some(i)),
                ..transport_config(&c, c.workers[i].address)
            };
            let (ep, sel) = genie_transport::open_with_selection(cfg)
                .with_context(|| format!("opening the endpoint of worker {name}"))?;
            eprintln!(
                "worker {name} listening on {} ({} backend: {})",
                ep.local_addr(),
                sel.backend,
                sel.reason
            );
            serve_with(ep, c, &name, Arc::new(CpuKernels::new()), opts)?;
        }
        Cmd::Secret => println!("{}", new_secret()),
        Cmd::Schedule {
            graph,
            model,
            cluster,
            topology,
            out,
        } => {
            let g: Graph = match (graph, model) {
                (Some(p), None) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Graph::from_json(&text)?
                }
                (None, Some(m)) => by_name(&m, &ModelSize::default())?,
                _ => bail!("give exactly one of --graph FILE or --model NAME"),
            };
            let topo = match (cluster, topology) {
                (None, Some(t)) => {
                    Topology::load(&t).with_context(|| format!("topology file {}", t.display()))?
                }
                (Some(c), None) => topology_of_cluster(&Cluster::load(&c)?)?,
                _ => bail!("give exactly one of --cluster FILE or --topology FILE"),
            };
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
    }
    Ok(())
}

/// A `--peer-timeout-ms` value: checked like a cluster file's `peer_timeout_ms`.
fn parse_peer_timeout_ms(s: &str) -> std::result::Result<u64, String> {
    let ms: u64 = s.parse().map_err(|e| format!("`{s}`: {e}"))?;
    genie_runtime::cluster::peer_timeout_from_ms(ms).map_err(|e| e.to_string())?;
    Ok(ms)
}

/// A `--role` value.
fn parse_role(s: &str) -> std::result::Result<Role, String> {
    match s {
        "prefill" => Ok(Role::Prefill),
        "decode" => Ok(Role::Decode),
        "both" => Ok(Role::Both),
        other => Err(format!("`{other}`: expected prefill, decode or both")),
    }
}

/// The topology `genie schedule` assumes for a cluster file: one CPU per worker, 20 Gb/s links
/// between workers on one host and 10 Gb/s across hosts.
fn topology_of_cluster(c: &Cluster) -> Result<Topology> {
    Ok(Topology::new(
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
    )?)
}
