//! The static cluster file: which workers exist, where they listen and what devices they own.
//!
//! ```toml
//! secret_file = "cluster.secret"       # peers authenticate with it at connect time
//!
//! [[workers]]
//! name = "w0"
//! address = "10.0.0.1:7100"
//! devices = ["cpu"]                    # default: ["cpu"]
//! role = "prefill"                     # for the serving engine: prefill | decode | both (default)
//!
//! [[workers]]
//! name = "w1"
//! address = "10.0.0.2:7100"
//! role = "decode"
//! rdma = { device = "mlx5_1", port = 1, gid_index = 3 }   # this worker's NIC (see below)
//!
//! [[links]]                            # optional: what the network between two workers does
//! between = ["w0", "w1"]
//! gbps = 100.0
//! latency_us = 3.0                     # default 0
//! ```
//!
//! # Links
//!
//! Each `[[links]]` entry gives the bandwidth (gigabits per second) and the per-transfer
//! latency (microseconds) between two workers, for the cost model; links left out are alike
//! ([`crate::plan::cpu_topology`]'s default). The serving engine reads them when it picks a
//! prefill worker: a prompt's KV cache crosses the link from its prefill worker to the decode
//! worker ([`crate::engine::EngineConfig::links`]). They describe the network; they do not
//! change how bytes move.
//!
//! # RDMA device, port and GID
//!
//! An optional top-level `rdma = { device = "mlx5_0", port = 1, gid_index = 3 }` applies to every
//! endpoint opened from the file (workers and the driver); a worker's own `rdma` replaces it as a
//! whole for that worker (hosts often name their NICs differently). The fields are those of
//! [`genie_transport::RdmaConfig`] (perftest's `-d`, `-i`, `-x`); each may be left out: no device
//! takes `GENIE_RDMA_DEVICE` or the first active one, port defaults to 1, and no GID index lets
//! the transport pick (RoCE v2 with an IPv4-mapped address first; LID routing on InfiniBand).
//!
//! # Peer timeout
//!
//! An optional top-level `peer_timeout_ms = 5000` (100 to 600000; default 2000, the transport's)
//! is how long a connection may stay silent before its peer is declared dead: the runs in flight
//! on it fail with [`RuntimeError::WorkerFailed`] naming that worker. Give every worker and
//! driver of a cluster the same value (heartbeats are sent at a quarter of each side's own
//! timeout). Raise it where links are lossy or hosts overloaded; lower it to fail faster.
//!
//! # Secure by default
//!
//! Every connection between workers and drivers authenticates with the cluster's shared secret.
//! A cluster whose workers are not all on loopback refuses to load without one, unless the file
//! says `insecure = true` explicitly. Make a secret with
//!
//! ```text
//! genie secret > cluster.secret && chmod 600 cluster.secret
//! ```
//!
//! and name it with `secret_file` (a path relative to the cluster file). A secret file that
//! group or others may read (`mode & 0o077 != 0`) is refused. An inline `secret = "..."` also
//! works (then the cluster file itself is the secret: keep it private). A loopback-only
//! cluster (the embedded demo, tests) needs no secret.
//!
//! Parsing never panics; every rejection names the field (`workers[1].address`).

use crate::error::{Result, RuntimeError};
use genie_transport::RdmaConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A device a worker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The host CPU (the reference kernels).
    Cpu,
    /// A CUDA GPU (needs the `cuda` feature).
    Cuda,
}

/// What a worker does for the serving engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefills requests (and streams their KV caches to decode workers).
    Prefill,
    /// Holds KV caches and runs decode steps.
    Decode,
    /// Either (the default).
    #[default]
    Both,
}

impl Role {
    /// Whether a worker of this role may prefill.
    pub fn prefills(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }

    /// Whether a worker of this role may decode.
    pub fn decodes(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }
}

/// One worker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerSpec {
    /// Unique name, used in errors, traces and `genie worker --name`.
    pub name: String,
    /// Address its transport endpoint listens on.
    pub address: SocketAddr,
    /// Devices it owns (default: one CPU).
    pub devices: Vec<DeviceKind>,
    /// What it does for the serving engine (`role = "prefill" | "decode" | "both"`, default
    /// both).
    pub role: Role,
    /// Its own RDMA device, port and GID index, replacing the cluster's [`Cluster::rdma`].
    pub rdma: Option<RdmaConfig>,
}

/// A link between two workers as a cluster file states it (`[[links]]`, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WorkerLink {
    /// The two workers' indices in the cluster (file order), distinct.
    pub between: (usize, usize),
    /// Bandwidth, gigabits per second (finite, above 0).
    pub gbps: f64,
    /// Latency per transfer, microseconds (finite, 0 or more).
    pub latency_us: f64,
}

impl WorkerLink {
    /// Largest bandwidth a link may state (Gb/s): beyond any network, a typo.
    pub const MAX_GBPS: f64 = 1e6;
    /// Largest latency a link may state (µs; ten seconds).
    pub const MAX_LATENCY_US: f64 = 1e7;

    /// Whether the figures are in range (see [`WorkerLink::gbps`], [`WorkerLink::latency_us`]).
    pub fn check(&self) -> std::result::Result<(), String> {
        let Self {
            between: (a, b),
            gbps,
            latency_us,
        } = *self;
        if a == b {
            return Err(format!("joins worker {a} to itself"));
        }
        if !(gbps > 0.0 && gbps <= Self::MAX_GBPS) {
            return Err(format!("gbps {gbps} (above 0, at most {})", Self::MAX_GBPS));
        }
        if !(0.0..=Self::MAX_LATENCY_US).contains(&latency_us) {
            return Err(format!(
                "latency_us {latency_us} (0 to {})",
                Self::MAX_LATENCY_US
            ));
        }
        Ok(())
    }

    /// Whether it links `a` and `b` (either way round).
    pub fn joins(&self, a: usize, b: usize) -> bool {
        self.between == (a, b) || self.between == (b, a)
    }
}

/// A parsed and checked cluster file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// The workers, in file order. The first one coordinates runs.
    pub workers: Vec<WorkerSpec>,
    /// Shared secret peers authenticate with (none: no authentication, which
    /// [`Cluster::check_secure`] allows only on loopback or with `insecure`).
    pub secret: Option<String>,
    /// The file said `insecure = true`: run without a secret even off loopback.
    pub insecure: bool,
    /// RDMA device, port and GID index of every endpoint opened from this file, unless a worker
    /// names its own ([`WorkerSpec::rdma`]). Default: [`RdmaConfig::default`].
    pub rdma: RdmaConfig,
    /// Silence after which a peer counts as dead (`peer_timeout_ms`, see the module docs).
    /// Default [`DEFAULT_PEER_TIMEOUT`].
    pub peer_timeout: Duration,
    /// Links the file states (`[[links]]`); the others are alike. Empty by default.
    pub links: Vec<WorkerLink>,
}

/// The transport's default peer timeout (2 s), what a cluster without `peer_timeout_ms` uses.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Smallest `peer_timeout_ms`: shorter, an ordinary scheduling delay of a heartbeat (sent at a
/// quarter of it) would declare a healthy peer dead.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest `peer_timeout_ms` (10 minutes).
pub const MAX_PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// A peer timeout given in milliseconds (a cluster file's `peer_timeout_ms`, a
/// `--peer-timeout-ms` flag), or why it cannot be one: it must lie between
/// [`MIN_PEER_TIMEOUT`] and [`MAX_PEER_TIMEOUT`].
pub fn peer_timeout_from_ms(ms: u64) -> std::result::Result<Duration, PeerTimeoutOutOfRange> {
    let d = Duration::from_millis(ms);
    if d < MIN_PEER_TIMEOUT || d > MAX_PEER_TIMEOUT {
        return Err(PeerTimeoutOutOfRange { ms });
    }
    Ok(d)
}

/// A peer timeout outside [`MIN_PEER_TIMEOUT`]..=[`MAX_PEER_TIMEOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{ms} ms is outside {} to {} ms",
    MIN_PEER_TIMEOUT.as_millis(),
    MAX_PEER_TIMEOUT.as_millis()
)]
pub struct PeerTimeoutOutOfRange {
    /// The value given.
    pub ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    secret: Option<String>,
    secret_file: Option<String>,
    insecure: Option<bool>,
    rdma: Option<RdmaConfig>,
    peer_timeout_ms: Option<u64>,
    workers: Vec<RawWorker>,
    links: Option<Vec<RawLink>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: Vec<String>,
    gbps: f64,
    latency_us: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: String,
    address: String,
    devices: Option<Vec<String>>,
    role: Option<String>,
    rdma: Option<RdmaConfig>,
}

impl Cluster {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::ClusterRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks cluster TOML; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawCluster = toml::from_str(text).map_err(|e| RuntimeError::ClusterParse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let field = |field: String, reason: String| RuntimeError::ClusterField {
            path: path.to_path_buf(),
            field,
            reason,
        };
        if raw.workers.is_empty() {
            return Err(field(
                "workers".into(),
                "at least one worker is needed".into(),
            ));
        }
        if let Some(s) = &raw.secret {
            if s.is_empty() {
                return Err(field(
                    "secret".into(),
                    "must not be empty when given".into(),
                ));
            }
        }
        let secret = match (raw.secret, raw.secret_file) {
            (Some(_), Some(_)) => {
                return Err(field(
                    "secret_file".into(),
                    "give `secret` or `secret_file`, not both".into(),
                ))
            }
            (Some(s), None) => Some(s),
            (None, Some(f)) => {
                let base = path.parent().unwrap_or_else(|| Path::new(""));
                Some(read_secret_file(&base.join(f))?)
            }
            (None, None) => None,
        };
        let mut workers: Vec<WorkerSpec> = Vec::with_capacity(raw.workers.len());
        for (i, w) in raw.workers.into_iter().enumerate() {
            if w.name.is_empty() {
                return Err(field(
                    format!("workers[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if workers.iter().any(|o| o.name == w.name) {
                return Err(field(
                    format!("workers[{i}].name"),
                    format!("duplicate worker name `{}`", w.name),
                ));
            }
            let address: SocketAddr = w.address.parse().map_err(|e| {
                field(
                    format!("workers[{i}].address"),
                    format!("`{}` is not an ip:port address ({e})", w.address),
                )
            })?;
            if address.port() == 0 {
                return Err(field(
                    format!("workers[{i}].address"),
                    "port 0 cannot be reached by peers".into(),
                ));
            }
            if workers.iter().any(|o| o.address == address) {
                return Err(field(
                    format!("workers[{i}].address"),
                    format!("address {address} is used by another worker"),
                ));
            }
            let devices = match w.devices {
                None => vec![DeviceKind::Cpu],
                Some(list) => {
                    if list.is_empty() {
                        return Err(field(
                            format!("workers[{i}].devices"),
                            "must list at least one device".into(),
                        ));
                    }
                    let mut out = Vec::with_capacity(list.len());
                    for (j, d) in list.iter().enumerate() {
                        out.push(match d.as_str() {
                            "cpu" => DeviceKind::Cpu,
                            "cuda" => DeviceKind::Cuda,
                            other => {
                                return Err(field(
                                    format!("workers[{i}].devices[{j}]"),
                                    format!("unknown device `{other}` (expected `cpu` or `cuda`)"),
                                ))
                            }
                        });
                    }
                    out
                }
            };
            let role = match w.role.as_deref() {
                None | Some("both") => Role::Both,
                Some("prefill") => Role::Prefill,
                Some("decode") => Role::Decode,
                Some(other) => {
                    return Err(field(
                        format!("workers[{i}].role"),
                        format!("unknown role `{other}` (expected `prefill`, `decode` or `both`)"),
                    ))
                }
            };
            if w.rdma.as_ref().is_some_and(|r| r.port == 0) {
                return Err(field(
                    format!("workers[{i}].rdma.port"),
                    "ports count from 1".into(),
                ));
            }
            if let Some(Err(e)) = w.rdma.as_ref().map(RdmaConfig::validate) {
                return Err(field(format!("workers[{i}].rdma"), e));
            }
            workers.push(WorkerSpec {
                name: w.name,
                address,
                devices,
                role,
                rdma: w.rdma,
            });
        }
        let rdma = raw.rdma.unwrap_or_default();
        if rdma.port == 0 {
            return Err(field("rdma.port".into(), "ports count from 1".into()));
        }
        let peer_timeout = match raw.peer_timeout_ms {
            None => DEFAULT_PEER_TIMEOUT,
            Some(ms) => peer_timeout_from_ms(ms)
                .map_err(|e| field("peer_timeout_ms".into(), e.to_string()))?,
        };
        rdma.validate().map_err(|e| field("rdma".into(), e))?;
        let mut links: Vec<WorkerLink> = Vec::new();
        for (i, l) in raw.links.unwrap_or_default().into_iter().enumerate() {
            let at = |name: &str| {
                workers.iter().position(|w| w.name == name).ok_or_else(|| {
                    field(format!("links[{i}].between"), format!("no worker `{name}`"))
                })
            };
            let between = match l.between.as_slice() {
                [a, b] => (at(a)?, at(b)?),
                other => {
                    return Err(field(
                        format!("links[{i}].between"),
                        format!("names {} workers; a link joins two", other.len()),
                    ))
                }
            };
            let link = WorkerLink {
                between,
                gbps: l.gbps,
                latency_us: l.latency_us.unwrap_or(0.0),
            };
            link.check().map_err(|e| field(format!("links[{i}]"), e))?;
            if links.iter().any(|o| o.joins(between.0, between.1)) {
                return Err(field(
                    format!("links[{i}].between"),
                    format!(
                        "`{}` and `{}` are linked already",
                        workers[between.0].name, workers[between.1].name
                    ),
                ));
            }
            links.push(link);
        }
        let cluster = Self {
            workers,
            secret,
            insecure: raw.insecure.unwrap_or(false),
            rdma,
            peer_timeout,
            links,
        };
        cluster.check_secure().map_err(|e| match e {
            RuntimeError::InsecureCluster { reason } => RuntimeError::InsecureCluster {
                reason: format!("cluster file {}: {reason}", path.display()),
            },
            other => other,
        })?;
        Ok(cluster)
    }

    /// Refuses a cluster that anyone on the network could drive: one with a worker off
    /// loopback, no secret, and no explicit `insecure = true`. Workers and drivers call it
    /// before they open an endpoint.
    pub fn check_secure(&self) -> Result<()> {
        if self.secret.is_some() || self.insecure {
            return Ok(());
        }
        match self.workers.iter().find(|w| !w.address.ip().is_loopback()) {
            None => Ok(()),
            Some(w) => Err(RuntimeError::InsecureCluster {
                reason: format!(
                    "worker `{}` listens on {}, off loopback, and the cluster has no secret: \
                     anyone who can reach it could drive it. Make one with \
                     `genie secret > cluster.secret && chmod 600 cluster.secret` and add \
                     `secret_file = \"cluster.secret\"` to the cluster file (or, on a \
                     network you trust entirely, `insecure = true`)",
                    w.name, w.address
                ),
            }),
        }
    }

    /// A loopback cluster of `n` workers named `w0..`, on the given ports.
    pub fn loopback(ports: &[u16]) -> Self {
        Self {
            workers: ports
                .iter()
                .enumerate()
                .map(|(i, p)| WorkerSpec {
                    name: format!("w{i}"),
                    address: SocketAddr::from(([127, 0, 0, 1], *p)),
                    devices: vec![DeviceKind::Cpu],
                    role: Role::Both,
                    rdma: None,
                })
                .collect(),
            secret: None,
            insecure: false,
            rdma: RdmaConfig::default(),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            links: Vec::new(),
        }
    }

    /// The RDMA settings of worker `index`'s endpoint (its own, else the cluster's); `None`:
    /// the cluster's (a driver's endpoint).
    pub fn rdma_for(&self, index: Option<usize>) -> RdmaConfig {
        index
            .and_then(|i| self.workers.get(i))
            .and_then(|w| w.rdma.clone())
            .unwrap_or_else(|| self.rdma.clone())
    }

    /// Renders the cluster as TOML that [`Cluster::parse`] reads back.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        if let Some(secret) = &self.secret {
            s.push_str(&format!("secret = {secret:?}\n"));
        }
        if self.insecure {
            s.push_str("insecure = true\n");
        }
        if self.rdma != RdmaConfig::default() {
            s.push_str(&format!("rdma = {}\n", rdma_toml(&self.rdma)));
        }
        if self.peer_timeout != DEFAULT_PEER_TIMEOUT {
            s.push_str(&format!(
                "peer_timeout_ms = {}\n",
                self.peer_timeout.as_millis()
            ));
        }
        for w in &self.workers {
            let devs: Vec<&str> = w
                .devices
                .iter()
                .map(|d| match d {
                    DeviceKind::Cpu => "\"cpu\"",
                    DeviceKind::Cuda => "\"cuda\"",
                })
                .collect();
            s.push_str(&format!(
                "\n[[workers]]\nname = {:?}\naddress = \"{}\"\ndevices = [{}]\n",
                w.name,
                w.address,
                devs.join(", ")
            ));
            match w.role {
                Role::Both => {}
                Role::Prefill => s.push_str("role = \"prefill\"\n"),
                Role::Decode => s.push_str("role = \"decode\"\n"),
            }
            if let Some(r) = &w.rdma {
                s.push_str(&format!("rdma = {}\n", rdma_toml(r)));
            }
        }
        for l in &self.links {
            let name = |i: usize| self.workers.get(i).map_or("", |w| w.name.as_str());
            s.push_str(&format!(
                "\n[[links]]\nbetween = [{:?}, {:?}]\ngbps = {:?}\nlatency_us = {:?}\n",
                name(l.between.0),
                name(l.between.1),
                l.gbps,
                l.latency_us
            ));
        }
        s
    }

    /// Index of the worker called `name`.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.workers
            .iter()
            .position(|w| w.name == name)
            .ok_or_else(|| RuntimeError::UnknownWorker { name: name.into() })
    }

    /// Path placeholder for errors on clusters parsed from memory.
    pub fn inline_path() -> PathBuf {
        PathBuf::from("<inline>")
    }
}

/// `r` as a TOML inline table.
fn rdma_toml(r: &RdmaConfig) -> String {
    let mut fields = Vec::new();
    if let Some(d) = &r.device {
        fields.push(format!("device = {d:?}"));
    }
    fields.push(format!("port = {}", r.port));
    if let Some(x) = r.gid_index {
        fields.push(format!("gid_index = {x}"));
    }
    if r.qps != 1 {
        fields.push(format!("qps = {}", r.qps));
    }
    if !r.devices.is_empty() {
        fields.push(format!("devices = {:?}", r.devices));
    }
    format!("{{ {} }}", fields.join(", "))
}

/// Largest secret file read (a secret is a line of hex; anything longer is a mistake).
const MAX_SECRET_FILE: u64 = 4096;

/// The secret in `path`: a regular file, private to its owner, holding one non-empty line
/// (what `secret_file` in a cluster file and `genie worker --secret-file` name).
pub fn read_secret_file(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let err = |reason: String| RuntimeError::SecretFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "group or others may read it (mode {:03o}); run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_string(&mut text))
        .map_err(|e| err(format!("cannot read it: {e}")))?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(err(format!("longer than {MAX_SECRET_FILE} bytes")));
    }
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err(
            "is empty; fill it with `genie secret > FILE && chmod 600 FILE`".into(),
        ));
    }
    Ok(secret.to_string())
}

/// A fresh random secret: 32 bytes from the operating system's generator (through `rand`'s
/// thread-local CSPRNG, seeded from it), as 64 hex digits. `genie secret` prints one.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Cluster> {
        Cluster::parse(s, Path::new("c.toml"))
    }

    #[test]
    fn links_between_named_workers_parse_round_trip_and_are_checked() {
        let workers = "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n\
                       [[workers]]\nname = \"b\"\naddress = \"127.0.0.1:7001\"\n\
                       [[workers]]\nname = \"c\"\naddress = \"127.0.0.1:7002\"\n";
        let with = |links: &str| parse(&format!("{workers}{links}"));
        assert!(with("").unwrap().links.is_empty());
        let c = with(
            "[[links]]\nbetween = [\"c\", \"a\"]\ngbps = 100.0\nlatency_us = 2.5\n\
             [[links]]\nbetween = [\"b\", \"c\"]\ngbps = 1\n",
        )
        .unwrap();
        assert_eq!(
            c.links,
            vec![
                WorkerLink {
                    between: (2, 0),
                    gbps: 100.0,
                    latency_us: 2.5
                },
                WorkerLink {
                    between: (1, 2),
                    gbps: 1.0,
                    latency_us: 0.0
                },
            ]
        );
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for (bad, field, says) in [
            (
                "between = [\"a\", \"d\"]\ngbps = 1",
                "links[0].between",
                "no worker `d`",
            ),
            (
                "between = [\"a\"]\ngbps = 1",
                "links[0].between",
                "names 1 workers",
            ),
            (
                "between = [\"a\", \"a\"]\ngbps = 1",
                "links[0]",
                "to itself",
            ),
            ("between = [\"a\", \"b\"]\ngbps = 0", "links[0]", "gbps 0"),
            (
                "between = [\"a\", \"b\"]\ngbps = nan",
                "links[0]",
                "gbps NaN",
            ),
            ("between = [\"a\", \"b\"]\ngbps = 1e9", "links[0]", "gbps"),
            (
                "between = [\"a\", \"b\"]\ngbps = 1\nlatency_us = -1",
                "links[0]",
                "latency_us -1",
            ),
            (
                "between = [\"a\", \"b\"]\ngbps = 1\nlatency_us = inf",
                "links[0]",
                "latency_us inf",
            ),
        ] {
            let e = with(&format!("[[links]]\n{bad}\n")).expect_err(bad);
            match &e {
                RuntimeError::ClusterField {
                    field: f, reason, ..
                } => assert!(f == field && reason.contains(says), "{bad}: {e}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // A pair linked twice (either way round) is refused.
        let e = with(
            "[[links]]\nbetween = [\"a\", \"b\"]\ngbps = 1\n\
             [[links]]\nbetween = [\"b\", \"a\"]\ngbps = 2\n",
        )
        .expect_err("linked twice");
        assert!(e.to_string().contains("links[1].between"), "{e}");
        // Unknown fields are refused like everywhere in the file.
        assert!(with("[[links]]\nbetween = [\"a\", \"b\"]\ngbps = 1\nmtu = 9000\n").is_err());
    }

    #[test]
    fn rdma_device_port_and_gid_index_per_cluster_and_per_worker() {
        let c = parse(
            "rdma = { device = \"mlx5_0\", gid_index = 3 }\n\
             [[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n\
             [[workers]]\nname = \"b\"\naddress = \"127.0.0.1:7001\"\n\
             rdma = { device = \"mlx5_1\", port = 2 }\n",
        )
        .unwrap();
        let want = |device: &str, port, gid_index| RdmaConfig {
            device: Some(device.into()),
            port,
            gid_index,
            ..RdmaConfig::default()
        };
        assert_eq!(c.rdma_for(None), want("mlx5_0", 1, Some(3)));
        assert_eq!(c.rdma_for(Some(0)), want("mlx5_0", 1, Some(3)));
        assert_eq!(c.rdma_for(Some(1)), want("mlx5_1", 2, None));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        // Lanes: several QPs, spread over further devices; round-trips too.
        let c = parse(
            "rdma = { device = \"mlx5_0\", qps = 4, devices = [\"mlx5_1\"] }\n\
             [[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let r = c.rdma_for(Some(0));
        assert_eq!(
            (r.qps, r.devices.as_slice()),
            (4, &["mlx5_1".to_string()][..])
        );
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for bad in [
            "rdma = { port = 0 }\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n",
            "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\nrdma = { port = 0 }\n",
            "rdma = { gid_index = 300 }\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n",
            "rdma = { gid = 3 }\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n",
            "rdma = { qps = 9 }\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n",
            "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\nrdma = { devices = [\"x\"] }\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn peer_timeout_is_checked_and_round_trips() {
        let one = "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n";
        assert_eq!(parse(one).unwrap().peer_timeout, DEFAULT_PEER_TIMEOUT);
        let c = parse(&format!("peer_timeout_ms = 8000\n{one}")).unwrap();
        assert_eq!(c.peer_timeout, Duration::from_secs(8));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for bad in [
            "peer_timeout_ms = 99",
            "peer_timeout_ms = 600001",
            "peer_timeout_ms = -1",
        ] {
            match parse(&format!("{bad}\n{one}")) {
                Err(RuntimeError::ClusterField { field, .. }) => {
                    assert_eq!(field, "peer_timeout_ms")
                }
                Err(RuntimeError::ClusterParse { .. }) => assert!(bad.contains('-')),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn parses_a_good_file_and_round_trips() {
        let c = parse(
            "secret = \"s3\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n\
             [[workers]]\nname = \"b\"\naddress = \"127.0.0.1:7001\"\ndevices = [\"cpu\", \"cuda\"]\n",
        )
        .unwrap();
        assert_eq!(c.workers.len(), 2);
        assert_eq!(c.workers[0].devices, vec![DeviceKind::Cpu]);
        assert_eq!(
            c.workers[1].devices,
            vec![DeviceKind::Cpu, DeviceKind::Cuda]
        );
        assert_eq!(c.secret.as_deref(), Some("s3"));
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        assert_eq!(c.index_of("b").unwrap(), 1);
        assert!(matches!(
            c.index_of("z"),
            Err(RuntimeError::UnknownWorker { .. })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[[workers]]\nname = \"a\"\naddress = \"nope\"\n", "workers[0].address"),
            (
                "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n",
                "workers[1].name",
            ),
            (
                "[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\ndevices = [\"tpu\"]\n",
                "workers[0].devices[0]",
            ),
            ("workers = []\n", "workers"),
            ("[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\n", "workers[0].address"),
            (
                "secret = \"\"\n[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
                "secret",
            ),
        ];
        for (text, want) in cases {
            match parse(text) {
                Err(RuntimeError::ClusterField { field, .. }) => assert_eq!(field, want, "{text}"),
                other => panic!("{text}: expected a field error, got {other:?}"),
            }
        }
        // Missing field / unknown field: the TOML layer names it.
        let e = parse("[[workers]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("address"), "{e}");
        let e = parse("[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nport = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    const OFF_LOOPBACK: &str = "[[workers]]\nname = \"a\"\naddress = \"10.1.2.3:7000\"\n";

    /// A scratch directory for secret files.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("genie-secret-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn off_loopback_without_secret_is_refused_unless_insecure() {
        let e = parse(OFF_LOOPBACK).unwrap_err();
        assert!(matches!(e, RuntimeError::InsecureCluster { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("genie secret") && msg.contains("secret_file"),
            "{msg}"
        );
        let ok = parse(&format!("insecure = true\n{OFF_LOOPBACK}")).unwrap();
        assert!(ok.insecure && ok.secret.is_none());
        assert_eq!(parse(&ok.to_toml()).unwrap(), ok);
        let inline = parse(&format!("secret = \"s\"\n{OFF_LOOPBACK}")).unwrap();
        assert_eq!(inline.secret.as_deref(), Some("s"));
        // Loopback needs nothing; a cluster built in code is checked the same way.
        parse("[[workers]]\nname = \"a\"\naddress = \"127.0.0.1:7000\"\n").unwrap();
        let mut c = Cluster::loopback(&[7000]);
        c.check_secure().unwrap();
        c.workers[0].address = "0.0.0.0:7000".parse().unwrap();
        assert!(matches!(
            c.check_secure(),
            Err(RuntimeError::InsecureCluster { .. })
        ));
    }

    #[test]
    fn secret_file_is_relative_to_the_cluster_file_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("file");
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let file = dir.join("cluster.secret");
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!("secret_file = \"cluster.secret\"\n{OFF_LOOPBACK}");
        let cfile = dir.join("cluster.toml");
        std::fs::write(&cfile, &text).unwrap();
        let c = Cluster::load(&cfile).unwrap();
        assert_eq!(c.secret.as_deref(), Some(secret.as_str()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Cluster::load(&cfile).unwrap_err();
        assert!(matches!(e, RuntimeError::SecretFile { .. }), "{e:?}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Cluster::load(&cfile),
            Err(RuntimeError::SecretFile { .. })
        ));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            Cluster::load(&cfile),
            Err(RuntimeError::SecretFile { .. })
        ));
        let both = format!("secret = \"x\"\nsecret_file = \"f\"\n{OFF_LOOPBACK}");
        assert!(matches!(
            parse(&both),
            Err(RuntimeError::ClusterField { field, .. }) if field == "secret_file"
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
