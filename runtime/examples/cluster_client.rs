//! A driver for `genie worker` processes on other hosts: runs greedy generations of a seeded
//! model with its layers split across every worker of a cluster, and checks each one against
//! the same generation on one in-process worker, bitwise (tokens and every logit).
//! `scripts/netns-cluster.sh` runs it from its own network namespace. Run it on a cluster file
//!
//! ```sh
//! cargo run --release -p genie-runtime --example cluster_client -- --cluster cluster.toml --runs 2
//! ```
//!
//! or on the workers registered in etcd (`genie worker --etcd`; the `etcd` cargo feature), once
//! `--workers` of them are listed:
//!
//! ```sh
//! cargo run --release -p genie-runtime --features etcd --example cluster_client -- \
//!     --etcd http://10.0.0.1:2379 --cluster-name demo --secret-file cluster.secret --workers 3
//! ```
//!
//! It prints the reference's tokens, then one line per run:
//!
//! ```text
//! run=<i> ok tokens=[...] match=<1|0> ms=<run time>
//! run=<i> failed typed=<WorkerFailed|other> worker=<name|-> at_ms=<unix ms> error=<message>
//! ```
//!
//! After a failed run it connects again (bounded by the deadline) before the next run, as a
//! driver must once a worker failed; with etcd it lists the workers afresh first. The last line is the summary
//! `cluster_client runs=<n> ok=<n> mismatched=<n> worker_failed=<n> other_failed=<n> healed=<0|1>`
//! (`healed`: a run succeeded after a failed one). It exits non-zero when a run's result
//! differs from the reference, or when no run at all succeeded.

use clap::Parser;
use genie_runtime::cluster::Cluster;
use genie_runtime::driver::{Driver, EmbeddedCluster};
use genie_runtime::error::RuntimeError;
use genie_runtime::kernels::CpuKernels;
use genie_runtime::models::{generate, prompt, Family, Generation, Model};
use genie_runtime::plan::Placement;
use genie_runtime::proto::WeightSpec;
use genie_scheduler::graph::Graph;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(about = "Generations on a cluster file's workers, checked against one in-process worker")]
struct Args {
    /// Cluster file (as for `genie worker`).
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    cluster: Option<PathBuf>,
    /// etcd client URLs, comma-separated: the workers registered there (needs the `etcd`
    /// cargo feature).
    #[arg(long, value_delimiter = ',', requires_all = ["cluster_name", "workers"])]
    etcd: Option<Vec<String>>,
    /// With `--etcd`: the cluster's name there.
    #[arg(long)]
    cluster_name: Option<String>,
    /// With `--etcd`: the cluster secret's file (never in etcd).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// With `--etcd`: wait (within the deadline) until this many workers are registered, and
    /// use them all.
    #[arg(long)]
    workers: Option<usize>,
    /// With `--etcd`: this driver's RDMA device (default: `GENIE_RDMA_DEVICE`, else the first).
    #[arg(long)]
    rdma_device: Option<String>,
    /// With `--etcd`: silence after which a peer counts as dead, in ms (as the workers'
    /// `--peer-timeout-ms`; a cluster file says `peer_timeout_ms`).
    #[arg(long, default_value_t = 2000)]
    peer_timeout_ms: u64,
    /// `gpt2-small` or another name `genie demo --model` takes.
    #[arg(long, default_value = "gpt2-small")]
    model: String,
    /// Seed of the workers' weights.
    #[arg(long, default_value_t = 5)]
    weights_seed: u64,
    /// Prompt length.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Decode steps per run.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Runs at most.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Stop starting runs (and reconnecting) after this many seconds.
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Stop after the first run that succeeds after a failed one.
    #[arg(long)]
    until_heal: bool,
}

/// A generation's tokens and its logits (prefill, then each step) as bit patterns.
type Answer = (Vec<i64>, Vec<Vec<u32>>);

fn bits(g: &Generation) -> Result<Answer, RuntimeError> {
    let mut logits = Vec::new();
    for r in std::iter::once(&g.prefill).chain(&g.steps) {
        let t = r
            .outputs
            .first()
            .ok_or_else(|| RuntimeError::Plan("a run returned no logits".into()))?;
        let v: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| RuntimeError::Plan(e.to_string()))?;
        logits.push(v.iter().map(|x| x.to_bits()).collect());
    }
    Ok((g.tokens.clone(), logits))
}

fn run(
    d: &mut Driver,
    model: &Model,
    p: &[i64],
    steps: usize,
    seq: u64,
    workers: usize,
) -> Result<Answer, RuntimeError> {
    let place = |g: &Graph| Placement::by_layer(g, workers, model.layers());
    bits(&generate(d, model, p, steps, seq, place, place)?)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn tokens_text(t: &[i64]) -> String {
    let v: Vec<String> = t.iter().map(i64::to_string).collect();
    format!("[{}]", v.join(", "))
}

/// Where the workers come from: a cluster file, or etcd.
enum Source {
    File(Cluster),
    #[cfg(feature = "etcd")]
    Etcd {
        discovery: genie_runtime::membership::Discovery,
        secret: Option<String>,
        workers: usize,
        rdma_device: Option<String>,
        peer_timeout: Duration,
    },
}

impl Source {
    fn new(args: &Args) -> anyhow::Result<Self> {
        if let Some(path) = &args.cluster {
            return Ok(Self::File(Cluster::load(path)?));
        }
        #[cfg(feature = "etcd")]
        {
            use genie_runtime::membership::{Discovery, MembershipConfig};
            let (Some(endpoints), Some(name), Some(workers)) =
                (&args.etcd, &args.cluster_name, args.workers)
            else {
                anyhow::bail!(
                    "give --cluster FILE, or --etcd URL with --cluster-name and --workers"
                );
            };
            if workers == 0 {
                anyhow::bail!("--workers: at least one");
            }
            let cfg = MembershipConfig::new(endpoints.clone(), name.clone());
            cfg.check()?;
            let secret = args
                .secret_file
                .as_deref()
                .map(genie_runtime::cluster::read_secret_file)
                .transpose()?;
            let peer_timeout = genie_runtime::cluster::peer_timeout_from_ms(args.peer_timeout_ms)
                .map_err(|e| anyhow::anyhow!("--peer-timeout-ms: {e}"))?;
            Ok(Self::Etcd {
                discovery: Discovery::connect(&cfg)?,
                secret,
                workers,
                rdma_device: args.rdma_device.clone(),
                peer_timeout,
            })
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = (
                &args.etcd,
                &args.cluster_name,
                &args.secret_file,
                &args.rdma_device,
            );
            let _ = (args.workers, args.peer_timeout_ms);
            anyhow::bail!("--etcd needs the `etcd` cargo feature (cargo run --features etcd ...)")
        }
    }

    /// The cluster to connect to now: the file's, or the workers etcd lists once there are as
    /// many as asked for (an error when there are not, yet).
    fn cluster(&self) -> anyhow::Result<Cluster> {
        match self {
            Self::File(c) => Ok(c.clone()),
            #[cfg(feature = "etcd")]
            Self::Etcd {
                discovery,
                secret,
                workers,
                rdma_device,
                peer_timeout,
            } => {
                let mut c = discovery.cluster(secret.clone(), false)?;
                if c.workers.len() != *workers {
                    anyhow::bail!(
                        "{} workers registered, waiting for {workers}",
                        c.workers.len()
                    );
                }
                c.peer_timeout = *peer_timeout;
                c.rdma.device = rdma_device.clone();
                Ok(c)
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = genie_runtime::models::Model::named(&args.model)?;
    let source = Source::new(&args)?;
    let p = prompt(args.prompt_len, model.vocab());
    let weights = WeightSpec::Seeded(args.weights_seed);

    // The reference: the whole model on one in-process worker.
    let emb = EmbeddedCluster::start(1, Arc::new(CpuKernels::new()))?;
    let mut d = Driver::connect(&emb.cluster, weights.clone())?;
    let want = run(&mut d, &model, &p, args.steps, 0, 1)?;
    emb.stop(d)?;
    println!("reference tokens={}", tokens_text(&want.0));

    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
    let mut n = 0;
    let mut driver: Option<Driver> = None;
    let mut last_connect_error: Option<String> = None;
    let (mut runs, mut ok, mut mismatched, mut worker_failed, mut other_failed) = (0, 0, 0, 0, 0);
    let mut healed = false;
    while runs < args.runs && Instant::now() < deadline {
        let d = match driver.as_mut() {
            Some(d) => d,
            None => match source.cluster().and_then(|c| {
                n = c.workers.len();
                let names: Vec<&str> = c.workers.iter().map(|w| w.name.as_str()).collect();
                let d = Driver::connect(&c, weights.clone())?;
                println!("connected to {n} workers: {}", names.join(" "));
                Ok(d)
            }) {
                Ok(d) => {
                    last_connect_error = None;
                    driver.insert(d)
                }
                Err(e) => {
                    // Once per distinct reason: waiting for workers to register repeats it.
                    let why = format!("{e:#}");
                    if last_connect_error.as_deref() != Some(why.as_str()) {
                        println!("connect failed at_ms={} error={why}", unix_ms());
                        last_connect_error = Some(why);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
            },
        };
        runs += 1;
        let t = Instant::now();
        match run(d, &model, &p, args.steps, runs as u64, n) {
            Ok(got) => {
                ok += 1;
                let same = got == want;
                mismatched += usize::from(!same);
                println!(
                    "run={runs} ok tokens={} match={} ms={}",
                    tokens_text(&got.0),
                    u8::from(same),
                    t.elapsed().as_millis()
                );
                if worker_failed + other_failed > 0 {
                    healed = true;
                    if args.until_heal {
                        break;
                    }
                }
            }
            Err(e) => {
                let (typed, worker) = match &e {
                    RuntimeError::WorkerFailed { worker, .. } => ("WorkerFailed", worker.as_str()),
                    _ => ("other", "-"),
                };
                if typed == "WorkerFailed" {
                    worker_failed += 1;
                } else {
                    other_failed += 1;
                }
                println!(
                    "run={runs} failed typed={typed} worker={worker} at_ms={} error={e}",
                    unix_ms()
                );
                // The driver's session is gone with the worker: connect again.
                driver = None;
            }
        }
    }
    println!(
        "cluster_client runs={runs} ok={ok} mismatched={mismatched} worker_failed={worker_failed} \
         other_failed={other_failed} healed={}",
        u8::from(healed)
    );
    if mismatched > 0 {
        anyhow::bail!("{mismatched} runs differ from the in-process reference");
    }
    if ok == 0 {
        anyhow::bail!("no run succeeded");
    }
    Ok(())
}
