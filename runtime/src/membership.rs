//! Cluster membership in etcd (cargo feature `etcd`): workers register, drivers discover them.
//!
//! A worker registers under `/genie/<cluster>/workers/<name>` with a lease of
//! [`MembershipConfig::ttl`], kept alive by a background task; the value is its [`Member`]
//! record as JSON (address, transport backend, devices, role). A driver lists the records into
//! a [`Cluster`] (sorted by name, so every reader sees the same order) and can watch them for
//! [`MemberEvent::Joined`] / [`MemberEvent::Left`].
//!
//! ```text
//! /genie/demo/workers/w0  ->  {"name":"w0","address":"10.0.0.1:7100","backend":"tcp",
//!                              "devices":["cpu"],"role":"prefill"}       (lease, TTL 10 s)
//! ```
//!
//! # Failures
//!
//! - etcd unreachable at start: [`Registration::start`] and [`Discovery::connect`] return
//!   [`RuntimeError::EtcdUnreachable`] after [`MembershipConfig::connect_timeout`], never hang.
//! - A worker that dies stops renewing its lease: etcd deletes its record within the TTL, and
//!   watchers see it leave. A worker that stops in order ([`Registration::stop`]) revokes its
//!   lease at once.
//! - etcd restarted (or its leader lost) under a running worker: the keep-alive fails or comes
//!   back with TTL 0, and the registration task grants a new lease and puts the record again,
//!   retrying until etcd answers. A watch re-lists after its stream breaks and reports the
//!   difference, so it converges to what etcd holds.
//!
//! # Trust
//!
//! Secrets never go into etcd: the cluster secret comes from the worker's secret file and the
//! driver's own configuration (see [`crate::cluster`]); a record only says where a worker is,
//! and connecting still needs the secret. What is read from etcd is bounded ([`MAX_MEMBERS`]
//! records of at most [`MAX_MEMBER_BYTES`] each) and checked: a record that does not parse, or
//! whose name is not its key's, is skipped with a warning.
//!
//! # Threads
//!
//! The etcd client is asynchronous (tokio); the rest of the runtime is plain threads. Each
//! [`Registration`] and [`Discovery`] owns a one-thread tokio runtime (`genie-etcd`) that runs its
//! background task; their methods block the calling thread on it, each bounded by a timeout.

use crate::cluster::{Cluster, DeviceKind, Role, WorkerSpec};
use crate::error::{Result, RuntimeError};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use genie_transport::Backend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Most member records a listing reads; more is an error ([`RuntimeError::TooManyMembers`]).
pub const MAX_MEMBERS: usize = 4096;
/// Largest member record read (bytes of JSON); a bigger one is skipped.
pub const MAX_MEMBER_BYTES: usize = 4096;
/// Longest cluster or worker name (each is one etcd key segment).
pub const MAX_NAME_LEN: usize = 64;
/// Most devices one record may list.
pub const MAX_DEVICES: usize = 64;
/// Most events a [`MemberWatch`] holds unread; past that the watch waits for the reader.
pub const MAX_PENDING_EVENTS: usize = 1024;

/// Where the membership lives and how long things may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// etcd client URLs, `http://host:port` (TLS is not built in).
    pub endpoints: Vec<String>,
    /// The cluster's name: its records live under `/genie/<cluster_name>/workers/`.
    pub cluster_name: String,
    /// Lease TTL of a registration (default 10 s; whole seconds, at least 1): how long a dead
    /// worker stays listed.
    pub ttl: Duration,
    /// How long connecting may take before [`RuntimeError::EtcdUnreachable`] (default 5 s).
    pub connect_timeout: Duration,
    /// How long one request may take (default 5 s).
    pub request_timeout: Duration,
}

impl MembershipConfig {
    /// A configuration with the defaults above.
    pub fn new(endpoints: Vec<String>, cluster_name: impl Into<String>) -> Self {
        Self {
            endpoints,
            cluster_name: cluster_name.into(),
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The key prefix of this cluster's workers, `/genie/<cluster>/workers/`.
    pub fn prefix(&self) -> String {
        format!("/genie/{}/workers/", self.cluster_name)
    }

    /// Checks names, endpoints and durations.
    pub fn check(&self) -> Result<()> {
        check_name("cluster_name", &self.cluster_name)?;
        if self.endpoints.is_empty() {
            return Err(config_err("endpoints", "give at least one etcd URL"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let ok = e
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(config_err(
                    &format!("endpoints[{i}]"),
                    &format!("`{e}` is not http://host:port"),
                ));
            }
        }
        if self.ttl.as_secs() == 0 {
            return Err(config_err("ttl", "must be at least one second"));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(config_err("timeouts", "must not be zero"));
        }
        Ok(())
    }

    fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }
}

fn config_err(field: &str, reason: &str) -> RuntimeError {
    RuntimeError::MembershipConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A cluster or worker name must be one key segment: 1..=64 of `[A-Za-z0-9._-]`, not `.`/`..`.
fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(config_err(
            field,
            &format!("`{name}` must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -"),
        ))
    }
}

/// What a worker publishes about itself. No secrets: connecting still needs the cluster's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The worker's name (also the last segment of its key).
    pub name: String,
    /// Where its transport endpoint listens.
    pub address: SocketAddr,
    /// The transport backend it opened.
    pub backend: Backend,
    /// Devices it owns.
    pub devices: Vec<DeviceKind>,
    /// What it does for the serving engine.
    pub role: Role,
}

impl Member {
    /// The cluster entry of this member.
    pub fn spec(&self) -> WorkerSpec {
        WorkerSpec {
            name: self.name.clone(),
            address: self.address,
            devices: self.devices.clone(),
            role: self.role,
            // A host's NIC choice is its own (its environment, defaults): not published.
            rdma: None,
        }
    }

    fn check(&self) -> Result<()> {
        check_name("name", &self.name)?;
        if self.address.port() == 0 || self.address.ip().is_unspecified() {
            return Err(config_err(
                "address",
                &format!("{} cannot be reached by peers", self.address),
            ));
        }
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICES {
            return Err(config_err(
                "devices",
                &format!("must list 1 to {MAX_DEVICES} devices"),
            ));
        }
        Ok(())
    }

    /// Decodes the record stored under `key` (of the cluster's `prefix`): `None`, with a
    /// warning, when it is too big, not a member, or names another worker than its key.
    fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
        let key_name = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix))
            .unwrap_or("");
        let why = if value.len() > MAX_MEMBER_BYTES {
            format!("{} bytes, over {MAX_MEMBER_BYTES}", value.len())
        } else {
            match serde_json::from_slice::<Member>(value) {
                Err(e) => format!("not a member record: {e}"),
                Ok(m) if m.name != key_name => format!("names `{}`, not its key", m.name),
                Ok(m) => match m.check() {
                    Ok(()) => return Some(m),
                    Err(e) => e.to_string(),
                },
            }
        };
        tracing::warn!(key = %String::from_utf8_lossy(key), %why, "skipped a member record");
        None
    }
}

/// A change in the membership, as a [`MemberWatch`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A worker registered, or its record changed (the new record).
    Joined(Member),
    /// A worker's record went away: it stopped, or its lease expired.
    Left {
        /// Its name.
        name: String,
    },
}

/// The cluster of `members` (sorted by name), with the secret and `insecure` flag the caller
/// has from its own configuration; checked like a cluster file ([`Cluster::check_secure`],
/// unique addresses). Its peer timeout is the default: a caller configured otherwise sets
/// [`Cluster::peer_timeout`] on the result.
pub fn cluster_of(members: &[Member], secret: Option<String>, insecure: bool) -> Result<Cluster> {
    let mut workers: Vec<WorkerSpec> = members.iter().map(Member::spec).collect();
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in workers.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(config_err(
                "name",
                &format!("`{}` is listed twice", pair[0].name),
            ));
        }
    }
    for (i, w) in workers.iter().enumerate() {
        if let Some(o) = workers[..i].iter().find(|o| o.address == w.address) {
            return Err(config_err(
                "address",
                &format!("{} and {} both claim {}", o.name, w.name, w.address),
            ));
        }
    }
    let cluster = Cluster {
        workers,
        secret,
        insecure,
        // Each endpoint picks its own RDMA device, port and GID (`GENIE_RDMA_DEVICE`, else the
        // defaults): nothing about a host's NICs goes into etcd.
        rdma: genie_transport::RdmaConfig::default(),
        // The caller's own, like the secret (set the field on the result).
        peer_timeout: crate::cluster::DEFAULT_PEER_TIMEOUT,
        // Links are a cluster file's; a discovered membership has none (all alike).
        links: Vec::new(),
    };
    cluster.check_secure()?;
    Ok(cluster)
}

/// A connection to etcd and the one-thread runtime that drives it.
struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    cfg: MembershipConfig,
}

fn etcd_err(op: &'static str) -> impl Fn(etcd_client::Error) -> RuntimeError {
    move |e| RuntimeError::Etcd {
        op,
        reason: e.to_string(),
    }
}

fn timed_out(op: &'static str, after: Duration) -> RuntimeError {
    RuntimeError::Etcd {
        op,
        reason: format!("no answer within {} ms", after.as_millis()),
    }
}

/// Connects and asks etcd for its status, all within the connect timeout.
async fn connect_client(cfg: &MembershipConfig) -> Result<Client> {
    let started = Instant::now();
    let unreachable = |reason: String| RuntimeError::EtcdUnreachable {
        endpoints: cfg.endpoints_text(),
        waited_ms: started.elapsed().as_millis() as u64,
        reason,
    };
    let opts = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        .with_timeout(cfg.request_timeout);
    let attempt = async {
        let mut client = Client::connect(&cfg.endpoints, Some(opts)).await?;
        client.status().await?;
        Ok::<_, etcd_client::Error>(client)
    };
    match tokio::time::timeout(cfg.connect_timeout, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable("no answer".into())),
    }
}

impl Etcd {
    fn connect(cfg: &MembershipConfig) -> Result<Self> {
        cfg.check()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("genie-etcd")
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::Etcd {
                op: "start the client runtime",
                reason: e.to_string(),
            })?;
        let client = rt.block_on(connect_client(cfg))?;
        Ok(Self {
            rt,
            client,
            cfg: cfg.clone(),
        })
    }

    fn list(&self) -> Result<(Vec<Member>, i64)> {
        let mut client = self.client.clone();
        self.rt.block_on(list_members(&mut client, &self.cfg))
    }
}

/// The cluster's members (sorted by name) and the revision they were read at.
async fn list_members(client: &mut Client, cfg: &MembershipConfig) -> Result<(Vec<Member>, i64)> {
    let prefix = cfg.prefix();
    let opts = GetOptions::new()
        .with_prefix()
        .with_limit(MAX_MEMBERS as i64 + 1);
    let resp = tokio::time::timeout(cfg.request_timeout, client.get(prefix.clone(), Some(opts)))
        .await
        .map_err(|_| timed_out("list members", cfg.request_timeout))?
        .map_err(etcd_err("list members"))?;
    if resp.more() || resp.kvs().len() > MAX_MEMBERS {
        return Err(RuntimeError::TooManyMembers {
            prefix,
            limit: MAX_MEMBERS,
        });
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut members: Vec<Member> = resp
        .kvs()
        .iter()
        .filter_map(|kv| Member::decode(&prefix, kv.key(), kv.value()))
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((members, revision))
}

/// Grants a lease and puts `value` under `key` with it; returns the lease id.
async fn register(
    client: &mut Client,
    cfg: &MembershipConfig,
    key: &str,
    value: &str,
) -> Result<i64> {
    let t = cfg.request_timeout;
    let ttl = cfg.ttl.as_secs().min(i64::MAX as u64) as i64;
    let lease = tokio::time::timeout(t, client.lease_grant(ttl, None))
        .await
        .map_err(|_| timed_out("grant lease", t))?
        .map_err(etcd_err("grant lease"))?
        .id();
    tokio::time::timeout(
        t,
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .map_err(|_| timed_out("register", t))?
    .map_err(etcd_err("register"))?;
    Ok(lease)
}

/// A worker's registration: its record stays in etcd while this lives (and the process does).
///
/// Dropping it stops the keep-alive and revokes the lease, like [`Registration::stop`].
pub struct Registration {
    etcd: Etcd,
    key: String,
    lease: Arc<AtomicI64>,
    registrations: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Registration {
    /// Connects to etcd, registers `member` under a fresh lease and starts keeping it alive.
    /// Fails with [`RuntimeError::EtcdUnreachable`] when etcd does not answer in time.
    pub fn start(cfg: &MembershipConfig, member: &Member) -> Result<Self> {
        member.check()?;
        let etcd = Etcd::connect(cfg)?;
        let key = format!("{}{}", cfg.prefix(), member.name);
        let value = serde_json::to_string(member).map_err(|e| RuntimeError::Etcd {
            op: "encode the member record",
            reason: e.to_string(),
        })?;
        let mut client = etcd.client.clone();
        let first = etcd.rt.block_on(register(&mut client, cfg, &key, &value))?;
        let lease = Arc::new(AtomicI64::new(first));
        let registrations = Arc::new(AtomicU64::new(1));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = etcd.rt.spawn(keep_registered(
            client,
            cfg.clone(),
            key.clone(),
            value,
            lease.clone(),
            registrations.clone(),
            stop_rx,
        ));
        tracing::info!(%key, lease = first, "registered in etcd");
        Ok(Self {
            etcd,
            key,
            lease,
            registrations,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The key the record lives under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the record is held by now (a new one after each re-registration).
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// How many times the record was put: 1, plus one per re-registration after etcd lost it.
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    /// Stops keeping the record alive and revokes its lease, so watchers see the worker leave
    /// now rather than after the TTL. Bounded by the request timeout.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let (Some(stop), Some(task)) = (self.stop.take(), self.task.take()) else {
            return Ok(());
        };
        let _ = stop.send(());
        let wait = self.etcd.cfg.request_timeout + Duration::from_secs(1);
        let joined = self
            .etcd
            .rt
            .block_on(async { tokio::time::timeout(wait, task).await });
        if joined.is_err() {
            return Err(timed_out("deregister", wait));
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(key = %self.key, error = %e, "deregistering");
        }
    }
}

/// Why keeping a lease alive ended.
enum KeepEnd {
    Stopped,
    Lost(String),
}

/// Keeps the record alive; when etcd loses it (restart, expired lease, broken stream), puts it
/// again under a new lease, retrying until etcd answers. On stop, revokes the current lease.
async fn keep_registered(
    mut client: Client,
    cfg: MembershipConfig,
    key: String,
    value: String,
    lease: Arc<AtomicI64>,
    registrations: Arc<AtomicU64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // A retry every quarter TTL (at most 1 s): a restarted etcd sees the worker again well
    // within one TTL of coming back.
    let backoff = (cfg.ttl / 4).min(Duration::from_secs(1));
    loop {
        let id = lease.load(Ordering::Relaxed);
        match keep_alive(&mut client, &cfg, id, &mut stop).await {
            KeepEnd::Stopped => {
                let t = cfg.request_timeout;
                match tokio::time::timeout(t, client.lease_revoke(id)).await {
                    Ok(Ok(_)) => tracing::info!(%key, "deregistered from etcd"),
                    Ok(Err(e)) => tracing::warn!(%key, error = %e, "revoking the lease"),
                    Err(_) => tracing::warn!(%key, "revoking the lease timed out"),
                }
                return;
            }
            KeepEnd::Lost(why) => tracing::warn!(%key, %why, "etcd lost the registration"),
        }
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            // A fresh client: the old one's channel may be stuck on the etcd that went away.
            let attempt = async {
                let mut fresh = connect_client(&cfg).await?;
                let id = register(&mut fresh, &cfg, &key, &value).await?;
                Ok::<_, RuntimeError>((fresh, id))
            };
            let outcome = tokio::select! {
                _ = &mut stop => return,
                r = attempt => r,
            };
            match outcome {
                Ok((fresh, id)) => {
                    client = fresh;
                    lease.store(id, Ordering::Relaxed);
                    registrations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%key, lease = id, "registered in etcd again");
                    break;
                }
                Err(e) => tracing::debug!(%key, error = %e, "re-registering"),
            }
        }
    }
}

/// Renews lease `id` every third of the TTL until stopped or the lease is lost.
async fn keep_alive(
    client: &mut Client,
    cfg: &MembershipConfig,
    id: i64,
    stop: &mut tokio::sync::oneshot::Receiver<()>,
) -> KeepEnd {
    // Each request must finish well inside the TTL, or a slow answer costs the lease.
    let t = cfg.request_timeout.min(cfg.ttl / 2);
    let (mut keeper, mut stream) = match tokio::time::timeout(t, client.lease_keep_alive(id)).await
    {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return KeepEnd::Lost(e.to_string()),
        Err(_) => return KeepEnd::Lost("keep-alive stream did not open".into()),
    };
    let mut tick = tokio::time::interval(cfg.ttl / 3);
    loop {
        tokio::select! {
            _ = &mut *stop => return KeepEnd::Stopped,
            _ = tick.tick() => {}
        }
        let renewed = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(t, renewed).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return KeepEnd::Lost("the lease expired".into()),
            Ok(Ok(None)) => return KeepEnd::Lost("keep-alive stream ended".into()),
            Ok(Err(e)) => return KeepEnd::Lost(e.to_string()),
            Err(_) => return KeepEnd::Lost("keep-alive timed out".into()),
        }
    }
}

/// A driver's view of the membership: lists and watches the workers of one cluster.
pub struct Discovery {
    etcd: Arc<Etcd>,
}

impl Discovery {
    /// Connects to etcd; [`RuntimeError::EtcdUnreachable`] when it does not answer in time.
    pub fn connect(cfg: &MembershipConfig) -> Result<Self> {
        Ok(Self {
            etcd: Arc::new(Etcd::connect(cfg)?),
        })
    }

    /// The registered workers, sorted by name (invalid records skipped).
    pub fn members(&self) -> Result<Vec<Member>> {
        Ok(self.etcd.list()?.0)
    }

    /// The registered workers as a [`Cluster`] for [`crate::driver::Driver::connect`], with
    /// the secret the caller has from its own configuration (see [`cluster_of`]).
    /// [`RuntimeError::NoMembers`] when none is registered.
    pub fn cluster(&self, secret: Option<String>, insecure: bool) -> Result<Cluster> {
        let members = self.members()?;
        if members.is_empty() {
            return Err(RuntimeError::NoMembers {
                prefix: self.etcd.cfg.prefix(),
            });
        }
        cluster_of(&members, secret, insecure)
    }

    /// Starts watching: the members now, then every change as a [`MemberEvent`].
    pub fn watch(&self) -> Result<MemberWatch> {
        let (initial, revision) = self.etcd.list()?;
        let (tx, rx) = mpsc::sync_channel(MAX_PENDING_EVENTS);
        let known: BTreeMap<String, Member> = initial
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect();
        let task = self.etcd.rt.spawn(watch_members(
            self.etcd.client.clone(),
            self.etcd.cfg.clone(),
            known,
            revision,
            tx,
        ));
        Ok(MemberWatch {
            initial,
            events: rx,
            task,
            _etcd: self.etcd.clone(),
        })
    }
}

/// The members when the watch started, and a channel of what changed since.
///
/// Dropping it ends the watch.
pub struct MemberWatch {
    /// The members when the watch started, sorted by name.
    pub initial: Vec<Member>,
    events: mpsc::Receiver<MemberEvent>,
    task: tokio::task::JoinHandle<()>,
    _etcd: Arc<Etcd>,
}

impl MemberWatch {
    /// The next change, waiting at most `timeout`; `None` when there was none.
    pub fn next(&self, timeout: Duration) -> Option<MemberEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The channel of changes, for a caller that selects over several.
    pub fn events(&self) -> &mpsc::Receiver<MemberEvent> {
        &self.events
    }
}

impl Drop for MemberWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `event`, waiting (without blocking the runtime) while the reader is behind;
/// `false` when the reader is gone.
async fn deliver(tx: &mpsc::SyncSender<MemberEvent>, mut event: MemberEvent) -> bool {
    loop {
        match tx.try_send(event) {
            Ok(()) => return true,
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
            Err(mpsc::TrySendError::Full(e)) => {
                event = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Applies one observed state of `name` (`None`: gone) to `known`, yielding the event it
/// means, if any.
fn observe(
    known: &mut BTreeMap<String, Member>,
    name: &str,
    now: Option<Member>,
) -> Option<MemberEvent> {
    match now {
        Some(m) => {
            if known.get(name) == Some(&m) {
                return None;
            }
            if !known.contains_key(name) && known.len() >= MAX_MEMBERS {
                tracing::warn!(%name, "ignored a member past the limit of {MAX_MEMBERS}");
                return None;
            }
            known.insert(name.to_string(), m.clone());
            Some(MemberEvent::Joined(m))
        }
        None => known.remove(name).map(|_| MemberEvent::Left {
            name: name.to_string(),
        }),
    }
}

/// The differences between `known` and a fresh listing, applied to `known`.
fn diff(known: &mut BTreeMap<String, Member>, now: Vec<Member>) -> Vec<MemberEvent> {
    let mut events = Vec::new();
    let gone: Vec<String> = known
        .keys()
        .filter(|k| !now.iter().any(|m| &m.name == *k))
        .cloned()
        .collect();
    for name in gone {
        events.extend(observe(known, &name, None));
    }
    for m in now {
        let name = m.name.clone();
        events.extend(observe(known, &name, Some(m)));
    }
    events
}

/// Watches the prefix from `revision + 1`; when the stream breaks, re-lists (with a fresh
/// client, retrying) and reports the difference before watching again.
async fn watch_members(
    mut client: Client,
    cfg: MembershipConfig,
    mut known: BTreeMap<String, Member>,
    mut revision: i64,
    tx: mpsc::SyncSender<MemberEvent>,
) {
    let prefix = cfg.prefix();
    let backoff = (cfg.ttl / 4).min(Duration::from_secs(1));
    loop {
        let why = watch_from(&mut client, &cfg, &mut known, revision, &tx).await;
        match why {
            None => return,
            Some(why) => tracing::warn!(%prefix, %why, "membership watch broke; re-listing"),
        }
        loop {
            tokio::time::sleep(backoff).await;
            let relisted = async {
                let mut fresh = connect_client(&cfg).await?;
                let listed = list_members(&mut fresh, &cfg).await?;
                Ok::<_, RuntimeError>((fresh, listed))
            };
            match relisted.await {
                Ok((fresh, (members, rev))) => {
                    client = fresh;
                    revision = rev;
                    for e in diff(&mut known, members) {
                        if !deliver(&tx, e).await {
                            return;
                        }
                    }
                    break;
                }
                Err(e) => tracing::debug!(%prefix, error = %e, "re-listing members"),
            }
        }
    }
}

/// One watch stream; `None` when the reader is gone, else why the stream ended.
async fn watch_from(
    client: &mut Client,
    cfg: &MembershipConfig,
    known: &mut BTreeMap<String, Member>,
    revision: i64,
    tx: &mpsc::SyncSender<MemberEvent>,
) -> Option<String> {
    let prefix = cfg.prefix();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision.saturating_add(1));
    let t = cfg.request_timeout;
    let mut stream = match tokio::time::timeout(t, client.watch(prefix.clone(), Some(opts))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Some(e.to_string()),
        Err(_) => return Some("watch did not open".into()),
    };
    // A stream on an etcd that died can stay silent: ask for progress now and then, and count
    // no answer as a break.
    let quiet = cfg.ttl.max(Duration::from_secs(1));
    loop {
        let msg = match tokio::time::timeout(quiet, stream.message()).await {
            Ok(m) => m,
            Err(_) => {
                if let Err(e) = stream.request_progress().await {
                    return Some(e.to_string());
                }
                match tokio::time::timeout(t, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => return Some("watch went silent".into()),
                }
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Some("watch stream ended".into()),
            Err(e) => return Some(e.to_string()),
        };
        if resp.canceled() {
            return Some(format!("watch cancelled: {}", resp.cancel_reason()));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(name) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .map(str::to_string)
            else {
                continue;
            };
            let now = match ev.event_type() {
                EventType::Put => Member::decode(&prefix, kv.key(), kv.value()),
                EventType::Delete => None,
            };
            if let Some(e) = observe(known, &name, now) {
                if !deliver(tx, e).await {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            backend: Backend::Tcp,
            devices: vec![DeviceKind::Cpu],
            role: Role::Decode,
        }
    }

    #[test]
    fn records_decode_only_when_sound() {
        let p = "/genie/c/workers/";
        let good = serde_json::to_vec(&member("w0", 7000)).unwrap();
        assert_eq!(
            Member::decode(p, b"/genie/c/workers/w0", &good),
            Some(member("w0", 7000))
        );
        // Another name than its key, garbage, too big, port 0, no devices.
        assert_eq!(Member::decode(p, b"/genie/c/workers/w1", &good), None);
        assert_eq!(Member::decode(p, b"/genie/c/workers/w0", b"{]"), None);
        let mut big = member("w0", 7000);
        big.devices = vec![DeviceKind::Cpu; MAX_MEMBER_BYTES];
        let big = serde_json::to_vec(&big).unwrap();
        assert_eq!(Member::decode(p, b"/genie/c/workers/w0", &big), None);
        let zero = serde_json::to_vec(&member("w0", 0)).unwrap();
        assert_eq!(Member::decode(p, b"/genie/c/workers/w0", &zero), None);
        let mut none = member("w0", 7000);
        none.devices.clear();
        let none = serde_json::to_vec(&none).unwrap();
        assert_eq!(Member::decode(p, b"/genie/c/workers/w0", &none), None);
        // The record carries no secret field.
        let text = String::from_utf8(good).unwrap();
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn names_and_endpoints_are_checked() {
        let ok = MembershipConfig::new(vec!["http://127.0.0.1:2379".into()], "prod-1");
        ok.check().unwrap();
        for bad in ["", "a/b", "..", "x y", &"n".repeat(MAX_NAME_LEN + 1)] {
            let c = MembershipConfig::new(ok.endpoints.clone(), bad);
            assert!(
                matches!(c.check(), Err(RuntimeError::MembershipConfig { .. })),
                "{bad:?}"
            );
        }
        for bad in ["127.0.0.1:2379", "https://h:1", "http://", "http://h:1/x"] {
            let c = MembershipConfig::new(vec![bad.into()], "c");
            assert!(c.check().is_err(), "{bad}");
        }
        let mut c = ok.clone();
        c.ttl = Duration::from_millis(500);
        assert!(c.check().is_err());
    }

    #[test]
    fn diff_and_observe_report_changes_once() {
        let mut known = BTreeMap::new();
        let ev = diff(&mut known, vec![member("a", 1), member("b", 2)]);
        assert_eq!(ev.len(), 2);
        assert!(diff(&mut known, vec![member("a", 1), member("b", 2)]).is_empty());
        let ev = diff(&mut known, vec![member("b", 3)]);
        assert_eq!(
            ev,
            vec![
                MemberEvent::Left { name: "a".into() },
                MemberEvent::Joined(member("b", 3))
            ]
        );
        assert_eq!(observe(&mut known, "zz", None), None);
    }

    #[test]
    fn cluster_of_sorts_and_checks() {
        let c = cluster_of(&[member("b", 2), member("a", 1)], None, false).unwrap();
        assert_eq!(c.workers[0].name, "a");
        assert_eq!(c.workers[1].role, Role::Decode);
        assert!(cluster_of(&[member("a", 1), member("b", 1)], None, false).is_err());
        let mut far = member("a", 1);
        far.address = "10.1.2.3:7000".parse().unwrap();
        assert!(matches!(
            cluster_of(std::slice::from_ref(&far), None, false),
            Err(RuntimeError::InsecureCluster { .. })
        ));
        cluster_of(&[far], Some("s".into()), false).unwrap();
    }
}
