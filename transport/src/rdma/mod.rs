//! The RDMA backend: reliable-connected queue pairs over ibverbs (`genie_sys::verbs`, feature `rdma`).
//!
//! # Connections
//!
//! Each connection has a TCP side channel (the listening address of the endpoint) and one RC QP
//! with its own completion queue. Set-up runs [`handshake`] over the side channel: the shared
//! [`crate::auth`] exchange first (the client proves the secret, then the server), and only then
//! does either side create its CQ, QP and buffers, swap QP number, PSN, GID, MTU and receive
//! credits (sealed with the connection's key), move the QP INIT→RTR→RTS with the path MTU set to
//! the smaller side, and swap `Ready`. Handshakes run on their own threads, at most
//! [`crate::accept::MAX_HANDSHAKES`] at once, each within one peer timeout.
//!
//! # Lanes: several QPs and NICs per connection
//!
//! With [`crate::config::RdmaConfig::qps`] > 1 a connection has further QPs ("lanes"), each with
//! its own CQ, going round the endpoint's device and [`crate::config::RdmaConfig::devices`] (the
//! further devices ordered by NUMA affinity to the opening thread, where sysfs says; every region
//! is registered on each device). The handshake's QP info lists every lane's QP number, PSN and
//! address; the connection uses as many lanes as the side with fewer offers. The first lane is
//! the connection of one QP (messages, notifications, credits, memory windows). A one-sided
//! transfer of at least 256 KiB to a region the lanes can reach is cut into one part per lane
//! ([`crate::tcp::stripe::plan`]) and completes when every part has
//! (`completion::joint`); a private (granted) region is reached on the first lane only.
//! The peer says a region's key on each lane in its region-check answer. Further lanes' requests
//! are posted by one lane-poster thread per endpoint (soft-RoCE moves a request's data inside the
//! post). Order: a notification or message posted after a striped transfer is held back until
//! every earlier part on the further lanes has completed, and then posted by whichever thread
//! sees that completion, so neither the peer sees it before the data nor does the submitter wait.
//! A read does not wait for a striped write in flight: wait for the write before reading back the
//! same bytes.
//!
//! # Addressing
//!
//! The device, port and GID index come from [`crate::config::RdmaConfig`] (perftest's `-d`, `-i`,
//! `-x`); [`genie_sys::addressing`] decides from the port's attributes, read again at each
//! connection: an InfiniBand port goes by LID, with a GRH only across subnets or when a GID index
//! was given; a RoCE port picks a RoCE v2 GID, IPv4-mapped first, preferring the one holding the
//! side channel's local address (on soft-RoCE over `lo`: `::ffff:127.0.0.1`), unless a GID index
//! was given. The QP info of the handshake carries link layer, GID type, LID, GID and MTU; a peer
//! on the other link layer or RoCE version fails the connection with
//! [`TransportError::Addressing`] naming both.
//!
//! The side channel stays open for the connection's life: credit returns, remote-region checks and
//! heartbeats travel on it, and its loss (the peer process died) fails the connection at once.
//! The rules of that traffic (credits, reassembly, region checks, liveness) are plain state
//! machines with time passed in, in [`proto`], tested two-sided in memory.
//!
//! # Progress
//!
//! Each endpoint runs one [`poller`] thread (mio) over all of its connections' completion
//! channels and side-channel sockets; a connection has no thread of its own. Besides it, an
//! endpoint has its accept thread and short-lived handshake threads.
//!
//! # Operations
//!
//! - `write` / `read` are RDMA WRITE / READ; `write_notify` ends with an RDMA WRITE WITH IMM, whose
//!   immediate is the notification (delivered by the target's receive completion, after the data);
//!   `send` is a SEND into one of the peer's pre-posted receive buffers. Receive buffers hold one
//!   segment (at most 64 KiB of payload plus a 1-byte header), not a whole `max_message_size`
//!   message: a larger message goes as several SENDs marked "more follows" / "last", which RC
//!   delivers in order and the receiver reassembles (a peer exceeding the receiver's
//!   `max_message_size` loses its connection). Sends (each segment) and notifications consume a
//!   credit; the receiver re-posts its buffer and returns credits over the side channel.
//! - Selective signalling: only the last work request of each submission (and one in every half
//!   send queue) asks for a completion; RC completes in order, so one completion retires every
//!   earlier request. The send queue depth is bounded: submitters wait for room (back-pressure).
//! - Payloads up to the QP's inline limit are copied into the work request (inline); transfers over
//!   the device's maximum message size (or 16 MiB) are split into chunks.
//! - Completions: in [`PollMode::BusyPoll`] the thread waiting on an operation (or a message or
//!   notification) polls the CQ itself, like perftest, through the operation's progress hook (no
//!   thread hand-off on the hot path); the endpoint's poller leaves a CQ alone while waiters
//!   drive it and takes over on its completion channel when nobody does. In
//!   [`PollMode::Blocking`] the poller sleeps on the channels and wakes the waiters.
//!
//! # Remote access checks and errors
//!
//! Before the first access to a peer's region, the requester asks the peer (side channel) whether
//! the region exists with that key, how long it is and what it allows, and caches the answer; so
//! an unknown region, an out-of-bounds access or one the region does not allow fails with its
//! typed error *before* anything is posted, and the connection stays usable. A wrong key is
//! answered and then closes the connection (as a wrong rkey on the wire kills the QP): rkeys are
//! 32 bits, so a peer gets no free guesses. The NIC itself enforces the rkey, the registration's
//! bounds and its access flags (message buffers have no remote access at all); an access it
//! refuses (e.g. the region was dropped after the check) fails with
//! [`TransportError::UnknownRegion`]. Any error completion moves the QP to the error state: every
//! pending operation of the connection fails, the connection is marked dead, and connecting again
//! gives a fresh one. A region's own descriptor (its registration's rkey) is valid on every
//! connection of the endpoint (one protection domain per endpoint); a private region is
//! registered with no remote access of its own and is reached only through a type-2 memory window
//! that [`crate::Connection::grant`] binds to one connection's QP.

mod affinity;
mod conn;
mod device;
pub mod handshake;
mod lanes;
mod poller;
pub mod proto;
pub mod wire;

use crate::accept::{AcceptQueue, HandshakeSlots, ACCEPT_QUEUE, MAX_HANDSHAKES};
use crate::config::{Backend, PollMode, TransportConfig};
use crate::error::{Result, TransportError};
use crate::region::{EndpointId, NewRegion, Region, RegionAccess, RegionTable};
use crate::{Connection, Transport};
use conn::RdmaConn;
use genie_sys::addressing::choose_local;
use genie_sys::mem::SharedBuf;
use genie_sys::verbs::describe;
use genie_sys::verbs::{self, Context, Mr, ProtectionDomain};
use lanes::LanePoster;
use parking_lot::Mutex;
use poller::Poller;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Returns the device an endpoint with `config` would use, or why RDMA is not usable.
pub(crate) fn probe(config: &TransportConfig) -> std::result::Result<String, String> {
    let devices = verbs::rdma_available().map_err(|e| e.to_string())?;
    let want = config
        .rdma
        .device
        .clone()
        .or_else(|| std::env::var("GENIE_RDMA_DEVICE").ok());
    match want {
        Some(name) => match devices.iter().find(|d| d.name == name) {
            // `port_active` is port 1's; another port is checked when the endpoint opens it.
            Some(d) if d.port_active || config.rdma.port != verbs::PORT => Ok(d.name.clone()),
            Some(_) => Err(format!("RDMA device {name} has no active port")),
            None => Err(format!(
                "no RDMA device named {name} (found: {})",
                devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        None => devices
            .iter()
            .find(|d| d.port_active)
            .map(|d| d.name.clone())
            .ok_or_else(|| "no RDMA device with an active port".into()),
    }
}

fn verbs_err(e: verbs::VerbsError) -> TransportError {
    TransportError::BackendUnavailable {
        backend: Backend::Rdma,
        reason: describe(&e),
    }
}

/// Opens an RDMA endpoint.
pub(crate) fn open(config: TransportConfig) -> Result<Arc<dyn Transport>> {
    let device = probe(&config).map_err(|reason| TransportError::BackendUnavailable {
        backend: Backend::Rdma,
        reason,
    })?;
    let ctx = Context::open_port(Some(&device), config.rdma.port).map_err(verbs_err)?;
    // Refuse a port or GID index that cannot work now, rather than at the first connection (each
    // connection decides again: GIDs follow the addresses of the netdev).
    let attrs = ctx.port_attrs().map_err(verbs_err)?;
    choose_local(&attrs, config.rdma.gid_index, None)
        .map_err(|reason| TransportError::Addressing { peer: None, reason })?;
    let pd = ctx.alloc_pd().map_err(verbs_err)?;
    let extra = open_extra_devices(&config)?;
    let listener = TcpListener::bind(config.listen).map_err(|e| TransportError::io("bind", e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| TransportError::io("getsockname", e))?;
    let id: EndpointId = rand::random();
    let (poller, poll_thread) = Poller::start()?;
    let (lane_poster, lane_thread) = if config.rdma.qps > 1 {
        match LanePoster::start() {
            Ok((p, t)) => (Some(p), Some(t)),
            Err(e) => {
                poller.stop();
                let _ = poll_thread.join();
                return Err(e);
            }
        }
    } else {
        (None, None)
    };
    let ep = Arc::new(Endpoint {
        poller,
        lane_poster,
        table: RegionTable::new(id, Backend::Rdma),
        config,
        id,
        local_addr,
        ctx,
        pd,
        extra,
        incoming: AcceptQueue::new(ACCEPT_QUEUE),
        conns: Mutex::new(Vec::new()),
        shutdown: AtomicBool::new(false),
    });
    let ep2 = Arc::clone(&ep);
    let accept_thread = std::thread::Builder::new()
        .name("genie-rdma-accept".into())
        .spawn(move || accept_loop(&ep2, listener));
    let accept_thread = match accept_thread {
        Ok(t) => t,
        Err(e) => {
            ep.poller.stop();
            let _ = poll_thread.join();
            if let Some(p) = &ep.lane_poster {
                p.stop();
            }
            if let Some(t) = lane_thread {
                let _ = t.join();
            }
            return Err(TransportError::io("spawn", e));
        }
    };
    tracing::debug!(device = %ep.ctx.name(), addr = %local_addr, "rdma endpoint open");
    Ok(Arc::new(RdmaTransport {
        ep,
        accept_thread: Some(accept_thread),
        poll_thread: Some(poll_thread),
        lane_thread,
    }))
}

/// Opens the further devices of `config.rdma.devices` (each on `config.rdma.port`, each with an
/// addressable GID), in lane order: by NUMA affinity to the opening thread where the kernel says.
fn open_extra_devices(config: &TransportConfig) -> Result<Vec<Device>> {
    if config.rdma.devices.is_empty() {
        return Ok(Vec::new());
    }
    let available = verbs::rdma_available().map_err(|e| TransportError::BackendUnavailable {
        backend: Backend::Rdma,
        reason: e.to_string(),
    })?;
    let here = affinity::current_node();
    let named: Vec<(String, Option<i32>)> = config
        .rdma
        .devices
        .iter()
        .map(|n| (n.clone(), affinity::device_node(n)))
        .collect();
    let mut out = Vec::new();
    for name in affinity::order(named, here) {
        if !available.iter().any(|d| d.name == name) {
            return Err(TransportError::BackendUnavailable {
                backend: Backend::Rdma,
                reason: format!(
                    "rdma.devices: no RDMA device named {name} (found: {})",
                    available
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let ctx = Context::open_port(Some(&name), config.rdma.port).map_err(verbs_err)?;
        let attrs = ctx.port_attrs().map_err(verbs_err)?;
        choose_local(&attrs, None, None)
            .map_err(|reason| TransportError::Addressing { peer: None, reason })?;
        let pd = ctx.alloc_pd().map_err(verbs_err)?;
        out.push(Device { ctx, pd });
    }
    Ok(out)
}

/// A further device of an endpoint ([`crate::config::RdmaConfig::devices`]): its own context and
/// protection domain, where every region is registered too.
pub(crate) struct Device {
    pub(crate) ctx: Context,
    pub(crate) pd: ProtectionDomain,
}

/// An RDMA region's registrations: on the endpoint's device, and on each further device (in
/// [`Endpoint::extra`]'s order).
pub(crate) struct Regs {
    pub(crate) main: Mr,
    pub(crate) extra: Vec<Mr>,
}

impl Regs {
    /// The registrations of `region`, if it is RDMA-registered.
    pub(crate) fn of(region: &Region) -> Option<&Regs> {
        region.registration().and_then(|r| r.downcast_ref::<Regs>())
    }

    /// The registration on device `dev` (0: the endpoint's, `i`: the `i`-th further one).
    pub(crate) fn on(&self, dev: usize) -> Option<&Mr> {
        match dev {
            0 => Some(&self.main),
            d => self.extra.get(d - 1),
        }
    }
}

/// What an endpoint's connections share.
pub(crate) struct Endpoint {
    pub(crate) config: TransportConfig,
    pub(crate) id: EndpointId,
    local_addr: SocketAddr,
    pub(crate) ctx: Context,
    pub(crate) pd: ProtectionDomain,
    /// Further devices that connections' lanes spread over (see [`Device`]).
    pub(crate) extra: Vec<Device>,
    pub(crate) table: Arc<RegionTable>,
    /// The poller of all connections' completion and side channels.
    pub(crate) poller: Poller,
    /// Posts striped parts on connections' further lanes (only with `rdma.qps` > 1).
    pub(crate) lane_poster: Option<LanePoster>,
    incoming: AcceptQueue<Arc<dyn Connection>>,
    conns: Mutex<Vec<Weak<RdmaConn>>>,
    shutdown: AtomicBool,
}

impl Endpoint {
    fn track(&self, c: &Arc<RdmaConn>) {
        let mut v = self.conns.lock();
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(c));
    }

    pub(crate) fn poll_mode(&self) -> PollMode {
        self.config.poll_mode
    }
}

/// Accepts side-channel connections and runs each handshake on its own thread, at most
/// [`MAX_HANDSHAKES`] at once, each within one peer timeout: a peer that connects and stalls (or
/// drips bytes) holds one slot for at most that long and delays nobody else. Verbs resources are
/// created only once the peer has authenticated (see [`handshake`]).
fn accept_loop(ep: &Arc<Endpoint>, listener: TcpListener) {
    let slots = HandshakeSlots::new(MAX_HANDSHAKES);
    for stream in listener.incoming() {
        if ep.shutdown.load(Ordering::Acquire) {
            break;
        }
        let s = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Some(slot) = slots.try_take() else {
            tracing::debug!(peer = ?s.peer_addr().ok(), "too many rdma handshakes in progress; closing");
            continue;
        };
        let ep2 = Arc::clone(ep);
        let spawned = std::thread::Builder::new()
            .name("genie-rdma-hs".into())
            .spawn(move || {
                let r = conn::establish(&ep2, s, crate::auth::Role::Server).map(|c| {
                    ep2.track(&c);
                    Arc::new(conn::RdmaConnection::new(c)) as Arc<dyn Connection>
                });
                drop(slot);
                if let Err(e) = &r {
                    tracing::info!(error = %e, "incoming rdma connection failed");
                }
                if let Some(c) = ep2.incoming.push(r) {
                    tracing::warn!(peer = %c.peer_addr(), "accept queue full; closing");
                    c.close();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a handshake thread");
        }
    }
}

/// An RDMA endpoint (see the module docs).
pub struct RdmaTransport {
    ep: Arc<Endpoint>,
    accept_thread: Option<JoinHandle<()>>,
    poll_thread: Option<JoinHandle<()>>,
    lane_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("device", &self.ep.ctx.name())
            .field("addr", &self.ep.local_addr)
            .field("endpoint", &self.ep.id)
            .finish()
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.ep.shutdown.store(true, Ordering::Release);
        for c in self.ep.conns.lock().drain(..) {
            if let Some(c) = c.upgrade() {
                c.die(TransportError::EndpointClosed);
            }
        }
        drop(self.ep.incoming.close());
        // Wake the blocking accept() with a connection to ourselves.
        let _ = TcpStream::connect_timeout(&self.ep.local_addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // After the accept thread: no handshake adds a connection any more once it is gone...
        // except those still running, whose connections die at once (their endpoint is closing)
        // and are dropped with the poller's list.
        self.ep.poller.stop();
        if let Some(t) = self.poll_thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.ep.lane_poster {
            p.stop();
        }
        if let Some(t) = self.lane_thread.take() {
            let _ = t.join();
        }
    }
}

impl RdmaTransport {
    fn register_mem(&self, mem: SharedBuf, access: RegionAccess, private: bool) -> Result<Region> {
        let mem = Arc::new(mem);
        if mem.is_empty() {
            // Nothing to register: zero-length transfers never touch memory.
            return Ok(self.ep.table.insert(NewRegion {
                mem,
                key: None,
                remote_addr: 0,
                registration: None,
                access,
                private,
            }));
        }
        // The NIC enforces the access: the registration grants exactly what `access` allows.
        let remote = match access {
            // Reachable only through memory windows bound per connection (`Connection::grant`).
            _ if private => verbs::RemoteAccess::WindowsOnly,
            RegionAccess::Read => verbs::RemoteAccess::Read,
            RegionAccess::Write => verbs::RemoteAccess::Write,
            RegionAccess::Local => verbs::RemoteAccess::None,
            _ => verbs::RemoteAccess::ReadWrite,
        };
        // The MR keeps its own `Arc` of the memory, so it can never outlive it.
        let mr = self
            .ep
            .pd
            .register_with(Arc::clone(&mem), remote)
            .map_err(verbs_err)?;
        let (key, remote_addr) = (u64::from(mr.rkey()), mr.addr());
        // The same memory on every further device: a lane there reaches it with that
        // registration's key (told to the peer in region checks). Private regions are reached
        // through windows bound to the first lane only, so they need none.
        let extra = if private || matches!(access, RegionAccess::Local) {
            Vec::new()
        } else {
            self.ep
                .extra
                .iter()
                .map(|d| d.pd.register_with(Arc::clone(&mem), remote))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(verbs_err)?
        };
        Ok(self.ep.table.insert(NewRegion {
            mem,
            key: Some(key),
            remote_addr,
            registration: Some(Arc::new(Regs { main: mr, extra })),
            access,
            private,
        }))
    }
}

impl Transport for RdmaTransport {
    fn backend(&self) -> Backend {
        Backend::Rdma
    }
    fn endpoint_id(&self) -> EndpointId {
        self.ep.id
    }
    fn local_addr(&self) -> SocketAddr {
        self.ep.local_addr
    }
    fn config(&self) -> &TransportConfig {
        &self.ep.config
    }
    fn alloc_region_with(&self, len: usize, access: RegionAccess) -> Result<Region> {
        self.register_mem(SharedBuf::zeroed(len)?, access, false)
    }
    fn register_with(&self, buf: Vec<u8>, access: RegionAccess) -> Result<Region> {
        self.register_mem(SharedBuf::from_vec(buf), access, false)
    }

    fn register_shared(&self, mem: SharedBuf, access: RegionAccess) -> Result<Region> {
        self.register_mem(mem, access, false)
    }

    fn register_device(&self, mem: crate::DeviceMem, access: RegionAccess) -> Result<Region> {
        device::register(&self.ep, mem, access)
    }
    fn alloc_private_region(&self, len: usize, access: RegionAccess) -> Result<Region> {
        self.register_mem(SharedBuf::zeroed(len)?, access, true)
    }
    fn connect(&self, addr: SocketAddr) -> Result<Arc<dyn Connection>> {
        let s = TcpStream::connect_timeout(&addr, self.ep.config.peer_timeout).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                TransportError::PeerDead {
                    peer: addr,
                    reason: "connect timed out".into(),
                }
            } else {
                TransportError::io("connect", e)
            }
        })?;
        let c = conn::establish(&self.ep, s, crate::auth::Role::Client)?;
        self.ep.track(&c);
        Ok(Arc::new(conn::RdmaConnection::new(c)))
    }
    fn accept(&self, timeout: Duration) -> Result<Arc<dyn Connection>> {
        self.ep
            .incoming
            .pop(timeout, || self.ep.shutdown.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{BackendChoice, RdmaConfig, TransportConfig};
    use crate::TransportError;
    use genie_sys::addressing::{AddressingError, GidType};
    use genie_sys::verbs::{gid_of_ip, Context};
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    /// An RDMA endpoint's configuration on the harness's device with `gid_index`; `None` where
    /// the soft-RoCE harness set no `GENIE_RDMA_DEVICE`.
    fn config(gid_index: Option<u8>) -> Option<TransportConfig> {
        Some(TransportConfig {
            backend: BackendChoice::Rdma,
            peer_timeout: Duration::from_secs(5),
            rdma: RdmaConfig {
                device: Some(std::env::var("GENIE_RDMA_DEVICE").ok()?),
                port: 1,
                gid_index,
                ..RdmaConfig::default()
            },
            ..TransportConfig::default()
        })
    }

    /// On soft-RoCE over `lo`: the RoCE v2 entry of `::ffff:127.0.0.1` named explicitly connects
    /// to a peer that picked its GID itself, and moves a message; an empty entry is refused when
    /// the endpoint opens; the RoCE v1 entry of the same address against a v2 peer fails the
    /// connection with the typed version mismatch naming both.
    #[test]
    fn explicit_gid_indexes_on_soft_roce() {
        let Some(auto) = config(None) else {
            return;
        };
        let ctx = Context::open(auto.rdma.device.as_deref()).unwrap();
        let attrs = ctx.port_attrs().unwrap();
        let lo = gid_of_ip("127.0.0.1".parse().unwrap());
        let entry = |kind| attrs.gids.iter().find(|e| e.gid == lo && e.kind == kind);
        let v2 = entry(GidType::RoceV2)
            .expect("no RoCE v2 GID for 127.0.0.1")
            .index;

        let server = crate::open(auto).unwrap();
        let client = crate::open(config(Some(v2)).unwrap()).unwrap();
        let conn = client.connect(server.local_addr()).unwrap();
        let peer = server.accept(WAIT).unwrap();
        conn.send(b"gid").unwrap().wait(WAIT).unwrap();
        assert_eq!(peer.recv(WAIT).unwrap(), b"gid");

        if let Some(zero) = attrs.gids.iter().find(|e| e.gid == [0; 16]) {
            match crate::open(config(Some(zero.index)).unwrap()) {
                Err(TransportError::Addressing {
                    peer: None,
                    reason: AddressingError::ZeroGid { index, port: 1 },
                }) => assert_eq!(index, zero.index),
                other => panic!("an empty GID index opened: {other:?}"),
            }
        }

        if let Some(v1) = entry(GidType::RoceV1) {
            let old = crate::open(config(Some(v1.index)).unwrap()).unwrap();
            match old.connect(server.local_addr()) {
                Err(TransportError::Addressing {
                    peer: Some(_),
                    reason:
                        AddressingError::RoceVersionMismatch {
                            ours: GidType::RoceV1,
                            theirs: GidType::RoceV2,
                        },
                }) => {}
                other => panic!("RoCE v1 against v2: {other:?}"),
            }
        }
    }
}
