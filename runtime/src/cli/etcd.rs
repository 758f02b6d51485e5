//! `genie worker --etcd`: a worker that registers itself in etcd instead of being listed in a
//! cluster file (see [`genie_runtime::membership`]).

use anyhow::{Context, Result};
use genie_runtime::cluster::{read_secret_file, Cluster, DeviceKind, Role, WorkerSpec};
use genie_runtime::control::transport_config;
use genie_runtime::kernels::CpuKernels;
use genie_runtime::limits::WorkerOptions;
use genie_runtime::membership::{Discovery, Member, MembershipConfig, Registration};
use genie_runtime::worker::serve_from;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What `genie worker --etcd` was given.
pub struct EtcdWorker {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// The cluster's name in etcd.
    pub cluster_name: String,
    /// This worker's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Where its endpoint listens (and what it publishes).
    pub listen: SocketAddr,
    /// The cluster secret's file (never sent to etcd).
    pub secret_file: Option<PathBuf>,
    /// Run without a secret off loopback.
    pub insecure: bool,
    /// Lease TTL in seconds.
    pub ttl_secs: u64,
    /// Silence after which a peer counts as dead (the same on every worker and driver).
    pub peer_timeout: Duration,
    /// Limits on what drivers may ask.
    pub opts: WorkerOptions,
}

/// The cluster as etcd lists it (connecting first if `discovery` is not yet), with this
/// worker's secret, insecure flag and peer timeout.
fn read_cluster(
    discovery: &mut Option<Discovery>,
    cfg: &MembershipConfig,
    (secret, insecure, peer_timeout): (Option<String>, bool, Duration),
) -> genie_runtime::error::Result<Cluster> {
    let d = match discovery {
        Some(d) => d,
        None => discovery.insert(Discovery::connect(cfg)?),
    };
    let mut c = d.cluster(secret, insecure)?;
    c.peer_timeout = peer_timeout;
    Ok(c)
}

/// Registers, serves until a driver says shut down, deregisters.
pub fn run_etcd_worker(w: EtcdWorker) -> Result<()> {
    let secret = w.secret_file.as_deref().map(read_secret_file).transpose()?;
    let spec = WorkerSpec {
        name: w.name.clone(),
        address: w.listen,
        devices: vec![DeviceKind::Cpu],
        role: w.role,
        rdma: None,
    };
    let alone = Cluster {
        workers: vec![spec],
        secret,
        insecure: w.insecure,
        // The RDMA device from `GENIE_RDMA_DEVICE`, else the defaults.
        rdma: genie_transport::RdmaConfig::default(),
        peer_timeout: w.peer_timeout,
        links: Vec::new(),
    };
    alone.check_secure()?;
    let mut cfg = MembershipConfig::new(w.endpoints, w.cluster_name);
    cfg.ttl = Duration::from_secs(w.ttl_secs);
    cfg.check()?;
    let (ep, sel) = genie_transport::open_with_selection(transport_config(&alone, w.listen))
        .with_context(|| format!("opening the endpoint of worker {}", w.name))?;
    let member = Member {
        name: w.name.clone(),
        address: w.listen,
        backend: sel.backend,
        devices: vec![DeviceKind::Cpu],
        role: w.role,
    };
    let registration = Registration::start(&cfg, &member)?;
    eprintln!(
        "worker {} listening on {} ({} backend: {}), registered as {}",
        w.name,
        ep.local_addr(),
        sel.backend,
        sel.reason,
        registration.key(),
    );
    // The peers: the cluster as etcd lists it at each driver's Setup (this worker included),
    // with the secret from this worker's own file. etcd may be away for a moment right after the
    // registration (restarting): the worker then starts with itself alone, and reads the
    // cluster again at the first driver's Setup, as it does whenever etcd is away.
    let (secret, insecure, peer_timeout) =
        (alone.secret.clone(), alone.insecure, alone.peer_timeout);
    let mut discovery: Option<Discovery> = None;
    let mut first = Some(alone);
    let name = w.name.clone();
    let source = Box::new(move || {
        let read = read_cluster(
            &mut discovery,
            &cfg,
            (secret.clone(), insecure, peer_timeout),
        );
        match (read, first.take()) {
            (Ok(c), _) => Ok(c),
            (Err(e), Some(alone)) => {
                tracing::warn!(worker = %name, error = %e, "etcd unreadable at start; serving alone until a driver's Setup");
                Ok(alone)
            }
            (Err(e), None) => Err(e),
        }
    });
    let served = serve_from(ep, source, &w.name, Arc::new(CpuKernels::new()), w.opts);
    let deregistered = registration.stop();
    served?;
    deregistered?;
    Ok(())
}
