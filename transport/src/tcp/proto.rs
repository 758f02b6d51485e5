//! One TCP connection's protocol as a plain state machine: handshake, request bookkeeping,
//! target-side access checks, heartbeats and liveness (the timers are [`crate::liveness`]'s).
//! No sockets, no clocks, no threads.
//!
//! Contract (after quinn-proto): time is passed in (`now`), randomness is passed in (nonces),
//! and bytes move only through `std::io::Read`/`Write` objects the caller supplies — a mio socket
//! in [`super::endpoint`], a `&[u8]`/`Vec<u8>` in tests. The API sorts into
//! - inputs: [`Conn::read_from`] (bytes from the peer), [`Conn::handle_timeout`];
//! - commands: [`Conn::submit`], [`Conn::close`];
//! - outputs: [`Conn::write_to`] (bytes for the peer), [`Conn::poll_event`], [`Conn::poll_timeout`].
//!
//! After any input or command, drain `poll_event`, then call `write_to`, then re-read
//! `poll_timeout`.
//!
//! Incoming payloads are read from the source straight into the target region (the region's
//! write lock is held for the read call) once the frame header has been checked against region
//! id, key and bounds; outgoing frames go out with one vectored write for header and payload.
//!
//! Device regions ([`crate::device`]) are staged, one frame's chunk per host buffer, pipelined
//! [`STAGE_DEPTH`] deep. Sending (a write's source, a read's source on the target): `write_to`
//! keeps up to [`STAGE_DEPTH`] of the queued chunks copying device→host ahead of the socket and
//! waits only for the one it is about to send. Receiving (a write's target, a read's
//! destination): a chunk is read from the socket into a host buffer, then its host→device copy
//! is started and the next chunk is read while it runs; at most [`STAGE_DEPTH`] copies are in
//! flight, and all are waited for before anything that says the data has landed (a write's ACK
//! and notification, a read's completion) and before any other request is served, so a peer
//! sees the same order as with host regions. A failed device copy closes the connection with
//! [`TransportError::Device`] (or the driver's error).

use super::codec::{
    AccessError, FrameKind, Header, Hello, RefuseCode, FLAG_LAST, FLAG_NOTIFY, HEADER_LEN,
    MAX_REASON, NONCE_LEN, PROTOCOL_VERSION,
};
use crate::auth::{Auth, AuthError, Role as AuthRole, PROOF_LEN};
use crate::codec::DecodeError;
use crate::completion::Completer;
use crate::config::TcpConfig;
use crate::device::{self, CopyInFlight, Staging, STAGE_DEPTH};
use crate::error::TransportError;
use crate::liveness::{heartbeat_interval, Liveness, Timer};
use crate::region::{Region, RegionTable, RemoteOp, RemoteRegion};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest chunk of write data or read response per frame: bounds how long one frame holds the
/// connection and how much a refused chunk makes the target discard.
pub const CHUNK: usize = 1 << 20;
/// Most bytes [`Conn::read_from`] takes in one call before yielding to other connections.
pub const READ_BUDGET: usize = 16 << 20;
const MAX_IOV: usize = 64;
const MAX_STREAMS: usize = TcpConfig::MAX_STREAMS;
/// Frames queued for the peer past which we stop reading its requests: a peer that sends
/// requests (reads, writes, messages: each queues a reply) and never reads the replies is held
/// by TCP flow control instead of growing our queue.
pub const MAX_QUEUED_FRAMES: usize = 1 << 16;
/// Granularity of a message body's buffer growth: memory follows the bytes that actually
/// arrived, not the length a header claims.
const BODY_STEP: usize = 64 * 1024;
/// The shortest heartbeat interval, however short the peer timeout (a zero interval would ask for
/// a ping on every timer call).
const MIN_HEARTBEAT: Duration = Duration::from_millis(1);

/// Settings of one connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Our endpoint id.
    pub endpoint: u64,
    /// Shared secret, if any.
    pub secret: Option<Vec<u8>>,
    /// Silence after which the peer is dead; heartbeats go out every quarter of it.
    pub peer_timeout: Duration,
    /// Largest message accepted or sent.
    pub max_message_size: usize,
    /// Keys this connection granted (region id → key; see [`crate::Connection::grant`]),
    /// written by the application's thread, read when a peer's access is checked.
    pub grants: Grants,
    /// TCP streams we want per connection (1: one; see [`crate::config::TcpConfig::streams`]).
    pub streams: usize,
    /// The id a server offers for further streams to join this connection (random; unused
    /// unless the client asks for more than one stream).
    pub conn_id: u64,
    /// The endpoint's connections that further streams may join (server side).
    pub joins: Joins,
}

/// A connection's granted keys: region id → key.
pub type Grants = std::sync::Arc<parking_lot::RwLock<HashMap<u64, u64>>>;

/// Connections that further streams may join, by connection id (one entry per striped
/// connection a server accepted, removed when it closes: bounded by the connections).
pub type Joins = std::sync::Arc<parking_lot::Mutex<HashMap<u64, JoinSlot>>>;

/// What a joining stream is checked against ([`Joins`]).
#[derive(Debug, Clone)]
pub struct JoinSlot {
    /// The endpoint id the connection's first stream authenticated as.
    pub peer_endpoint: u64,
    /// Streams that may still join.
    pub room: usize,
    /// The connection's granted keys, which its further streams check too.
    pub grants: Grants,
}

/// Which part of a (possibly striped) connection a stream is, once established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stripe {
    /// The connection's only stream.
    Single,
    /// The first stream of a connection of `streams` streams; the others join with `conn_id`.
    First {
        /// The connection id.
        conn_id: u64,
        /// Streams agreed (at least 2).
        streams: usize,
    },
    /// A further stream of the connection `conn_id`.
    Joined {
        /// The connection id.
        conn_id: u64,
    },
}

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We connected.
    Client,
    /// We accepted.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientWaitHelloAck,
    ClientWaitReady,
    ServerWaitHello,
    ServerWaitAuth,
    Established,
    /// Refused or failed: flushing what is queued (a REFUSE), then the socket closes.
    Closing,
    Closed,
}

/// Something the endpoint must act on.
#[derive(Debug)]
pub enum Event {
    /// The handshake finished; the peer's endpoint id.
    Established {
        /// Peer endpoint id.
        peer_endpoint: u64,
        /// Which stream of its connection this is.
        stripe: Stripe,
    },
    /// A message arrived.
    Message(Vec<u8>),
    /// A notification arrived (its data has landed).
    Notification(u32),
    /// The connection failed or closed; every pending operation has been failed with this error.
    Closed(TransportError),
}

/// A request from the local user.
#[derive(Debug)]
pub enum Request {
    /// One-sided write (with an optional notification).
    Write {
        /// Source region.
        local: Region,
        /// Offset in it.
        local_offset: usize,
        /// Target.
        remote: RemoteRegion,
        /// Offset in the target.
        remote_offset: u64,
        /// Length.
        len: usize,
        /// Notification to deliver after the data.
        notify: Option<u32>,
    },
    /// One-sided read.
    Read {
        /// Destination region.
        local: Region,
        /// Offset in it.
        local_offset: usize,
        /// Source.
        remote: RemoteRegion,
        /// Offset in the source.
        remote_offset: u64,
        /// Length.
        len: usize,
    },
    /// Two-sided message.
    Send(Vec<u8>),
}

enum Payload {
    None,
    Bytes(Vec<u8>),
    Region {
        region: Region,
        offset: usize,
        len: usize,
    },
    /// A chunk of a device region, sent from a host staging buffer.
    Staged(StagedOut),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Bytes(b) => b.len(),
            Payload::Region { len, .. } => *len,
            Payload::Staged(s) => s.len,
        }
    }

    /// A chunk of `region` at `offset`: straight from host memory, or staged from a device.
    fn chunk(region: &Region, offset: usize, len: usize) -> Self {
        if region.is_device() {
            Payload::Staged(StagedOut {
                region: region.clone(),
                offset,
                len,
                stage: OutStage::Idle,
            })
        } else {
            Payload::Region {
                region: region.clone(),
                offset,
                len,
            }
        }
    }
}

/// A staged chunk on its way out: not started, copying device→host, or in host memory.
struct StagedOut {
    region: Region,
    offset: usize,
    len: usize,
    stage: OutStage,
}

enum OutStage {
    Idle,
    Copying(CopyInFlight),
    Ready(Staging),
}

struct OutFrame {
    header: [u8; HEADER_LEN],
    payload: Payload,
    sent: usize,
}

enum Pending {
    Write(Completer),
    Msg(Completer),
    Read {
        done: Completer,
        local: Region,
        offset: usize,
        len: usize,
        got: usize,
    },
}

enum BodyDest {
    /// Collect into a buffer (control frames, messages).
    Buffer(Vec<u8>),
    /// Straight into a region at this offset.
    Region { region: Region, offset: usize },
    /// Into a host staging buffer, then copied to a device region at this offset.
    Staged {
        region: Region,
        offset: usize,
        buf: Staging,
    },
    /// Read and drop (a refused write chunk).
    Discard,
}

enum Rx {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    Body {
        hdr: Header,
        dest: BodyDest,
        got: usize,
    },
}

/// Result of [`Conn::read_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The source has no more bytes now (`WouldBlock`).
    Drained,
    /// Reading stopped for back-pressure: the user's queues have no room
    /// ([`Conn::set_inbound_room`]) or the peer is not reading our replies
    /// ([`MAX_QUEUED_FRAMES`]). Call again once that changed.
    Held,
    /// The read budget was used up; call again (more bytes may be waiting).
    MoreReady,
    /// The connection is closed (EOF, error, protocol violation); see [`Event::Closed`].
    Closed,
}

/// Result of [`Conn::write_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Everything queued has been written.
    Flushed,
    /// The sink is full (`WouldBlock`); call again when it is writable.
    Blocked,
    /// The connection is finished: close the socket.
    Closed,
}

/// The protocol state of one connection. See the [module docs](self).
pub struct Conn {
    role: Role,
    phase: Phase,
    cfg: ConnConfig,
    peer: SocketAddr,
    auth: Auth,
    peer_endpoint: u64,
    /// Messages and notifications the user side can still take, and their bytes.
    room: (usize, usize),
    /// The handshake's deadline runs from here.
    started: Instant,
    live: Liveness,
    next_op: u64,
    pending: HashMap<u64, Pending>,
    out: VecDeque<OutFrame>,
    events: VecDeque<Event>,
    rx: Rx,
    scratch: Vec<u8>,
    /// Host→device copies of received chunks still in flight, oldest first.
    landing: VecDeque<CopyInFlight>,
    /// Staged payloads queued in `out` (an upper bound after a failure drops frames; exact again
    /// once `out` is empty), so that host-only traffic never looks for them.
    staged_out: usize,
    error: Option<TransportError>,
    /// Which stream of its connection this is (agreed in the handshake).
    stripe: Stripe,
    /// A client's further stream: the connection id it joins.
    join: Option<u64>,
    /// A server registered this connection in [`ConnConfig::joins`] (removed when it closes).
    registered: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("role", &self.role)
            .field("phase", &self.phase)
            .field("peer", &self.peer)
            .field("pending", &self.pending.len())
            .field("queued", &self.out.len())
            .finish()
    }
}

impl Conn {
    /// A client connection: queues HELLO.
    pub fn client(cfg: ConnConfig, peer: SocketAddr, now: Instant, nonce: [u8; NONCE_LEN]) -> Self {
        Self::client_stream(cfg, peer, now, nonce, None)
    }

    /// A client's further stream of the connection `conn_id` (learnt on its first stream):
    /// queues HELLO naming it.
    pub fn client_join(
        cfg: ConnConfig,
        peer: SocketAddr,
        now: Instant,
        nonce: [u8; NONCE_LEN],
        conn_id: u64,
    ) -> Self {
        Self::client_stream(cfg, peer, now, nonce, Some(conn_id))
    }

    fn client_stream(
        cfg: ConnConfig,
        peer: SocketAddr,
        now: Instant,
        nonce: [u8; NONCE_LEN],
        join: Option<u64>,
    ) -> Self {
        let mut c = Self::new(Role::Client, cfg, peer, now, nonce);
        c.join = join;
        let mut h = Header::new(FrameKind::Hello);
        match join {
            Some(id) => h.op_id = id,
            // Zero for one stream: the handshake of before, byte for byte.
            None if c.cfg.streams > 1 => h.arg = c.cfg.streams.min(MAX_STREAMS) as u32,
            None => {}
        }
        let body = Hello(c.auth.hello()).encode();
        c.queue_bytes(h, body);
        c
    }

    /// A server connection: waits for HELLO.
    pub fn server(cfg: ConnConfig, peer: SocketAddr, now: Instant, nonce: [u8; NONCE_LEN]) -> Self {
        Self::new(Role::Server, cfg, peer, now, nonce)
    }

    fn new(
        role: Role,
        cfg: ConnConfig,
        peer: SocketAddr,
        now: Instant,
        nonce: [u8; NONCE_LEN],
    ) -> Self {
        let auth = Auth::new(
            match role {
                Role::Client => AuthRole::Client,
                Role::Server => AuthRole::Server,
            },
            cfg.secret.as_deref(),
            cfg.endpoint,
            nonce,
        );
        let beat = heartbeat_interval(cfg.peer_timeout, MIN_HEARTBEAT);
        let live = Liveness::new(cfg.peer_timeout, beat, now);
        Self {
            role,
            phase: if role == Role::Client {
                Phase::ClientWaitHelloAck
            } else {
                Phase::ServerWaitHello
            },
            cfg,
            peer,
            auth,
            peer_endpoint: 0,
            room: (usize::MAX, usize::MAX),
            started: now,
            live,
            next_op: 1,
            pending: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            rx: Rx::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
            scratch: Vec::new(),
            landing: VecDeque::new(),
            staged_out: 0,
            error: None,
            stripe: Stripe::Single,
            join: None,
            registered: false,
        }
    }

    /// Whether the handshake has finished and the connection is open.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Whether the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Closed)
    }

    /// Why it closed.
    pub fn error(&self) -> Option<&TransportError> {
        self.error.as_ref()
    }

    /// The peer's endpoint id (0 before the handshake).
    pub fn peer_endpoint(&self) -> u64 {
        self.peer_endpoint
    }

    /// Operations waiting for the peer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Frames queued for sending.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// The next event for the endpoint.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            // A refusal gets one peer timeout to flush.
            Phase::Closing => Some(self.live.last_sent() + self.cfg.peer_timeout),
            Phase::Established => Some(self.live.poll_timeout()),
            _ => Some(self.started + self.cfg.peer_timeout),
        }
    }

    /// Timers: heartbeats, the dead-peer bound, the handshake deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::Closing => {
                if now >= self.live.last_sent() + self.cfg.peer_timeout {
                    self.out.clear();
                    self.phase = Phase::Closed;
                }
            }
            Phase::Established => {
                if self.held_for_room() {
                    // We stopped reading; the peer's bytes (heartbeats too) wait in our socket.
                    self.live.heard(now);
                }
                match self.live.handle_timeout(now) {
                    Timer::Dead(silent) => {
                        let reason = format!("nothing received for {silent:?}");
                        self.fail(
                            TransportError::PeerDead {
                                peer: self.peer,
                                reason,
                            },
                            None,
                        );
                    }
                    // Frames already queued go out before a ping would, and serve as one.
                    Timer::Heartbeat if self.out.is_empty() => {
                        self.queue(Header::new(FrameKind::Ping), Payload::None);
                    }
                    Timer::Heartbeat | Timer::Idle => {}
                }
            }
            _ => {
                if now >= self.started + self.cfg.peer_timeout {
                    self.fail(
                        TransportError::Timeout {
                            after: self.cfg.peer_timeout,
                        },
                        None,
                    );
                }
            }
        }
    }

    /// Closes the connection locally: pending operations fail with `err`.
    pub fn close(&mut self, err: TransportError) {
        if !self.is_closed() {
            self.fail(err, None);
        }
        self.out.clear();
        self.phase = Phase::Closed;
    }

    /// Submits a request; `done` completes when the peer acknowledged it (or it failed).
    pub fn submit(&mut self, req: Request, done: Completer) {
        if self.is_closed() || !self.is_established() {
            let err = self
                .error
                .clone()
                .unwrap_or(TransportError::ConnectionClosed { peer: self.peer });
            done.complete(Err(err));
            return;
        }
        let op_id = self.next_op;
        self.next_op += 1;
        match req {
            Request::Send(msg) => {
                if msg.len() > self.cfg.max_message_size {
                    done.complete(Err(TransportError::MessageTooLarge {
                        len: msg.len(),
                        max: self.cfg.max_message_size,
                    }));
                    return;
                }
                let mut h = Header::new(FrameKind::Msg);
                h.op_id = op_id;
                self.queue_bytes(h, msg);
                self.pending.insert(op_id, Pending::Msg(done));
            }
            Request::Write {
                local,
                local_offset,
                remote,
                remote_offset,
                len,
                notify,
            } => {
                if let Err(e) =
                    self.check_request(&local, local_offset, &remote, remote_offset, len)
                {
                    done.complete(Err(e));
                    return;
                }
                let mut sent = 0usize;
                loop {
                    let n = (len - sent).min(CHUNK);
                    let last = sent + n == len;
                    let mut h = Header::new(FrameKind::Write);
                    h.op_id = op_id;
                    h.region = remote.region;
                    h.key = remote.key;
                    h.offset = remote_offset + sent as u64;
                    h.body_len = n as u32;
                    if last {
                        h.flags |= FLAG_LAST;
                        if let Some(imm) = notify {
                            h.flags |= FLAG_NOTIFY;
                            h.arg = imm;
                        }
                    }
                    self.queue(h, Payload::chunk(&local, local_offset + sent, n));
                    sent += n;
                    if last {
                        break;
                    }
                }
                self.pending.insert(op_id, Pending::Write(done));
            }
            Request::Read {
                local,
                local_offset,
                remote,
                remote_offset,
                len,
            } => {
                if let Err(e) =
                    self.check_request(&local, local_offset, &remote, remote_offset, len)
                {
                    done.complete(Err(e));
                    return;
                }
                let mut h = Header::new(FrameKind::ReadReq);
                h.op_id = op_id;
                h.region = remote.region;
                h.key = remote.key;
                h.offset = remote_offset;
                self.queue_bytes(h, (len as u64).to_le_bytes().to_vec());
                self.pending.insert(
                    op_id,
                    Pending::Read {
                        done,
                        local,
                        offset: local_offset,
                        len,
                        got: 0,
                    },
                );
            }
        }
    }

    fn check_request(
        &self,
        local: &Region,
        local_offset: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), TransportError> {
        local.check_local(local_offset, len)?;
        if remote.endpoint != self.peer_endpoint {
            return Err(TransportError::ForeignDescriptor {
                descriptor_endpoint: remote.endpoint,
                peer_endpoint: self.peer_endpoint,
            });
        }
        if remote_offset.checked_add(len as u64).is_none() {
            return Err(TransportError::RegionOutOfBounds {
                region: remote.region,
                offset: remote_offset,
                len: len as u64,
                size: remote.len,
            });
        }
        Ok(())
    }

    fn queue(&mut self, mut h: Header, payload: Payload) {
        h.body_len = payload.len() as u32;
        if let Payload::Staged(_) = payload {
            self.staged_out += 1;
        }
        self.out.push_back(OutFrame {
            header: h.encode(),
            payload,
            sent: 0,
        });
    }

    fn queue_bytes(&mut self, h: Header, body: Vec<u8>) {
        self.queue(
            h,
            if body.is_empty() {
                Payload::None
            } else {
                Payload::Bytes(body)
            },
        );
    }

    fn refuse(&mut self, code: RefuseCode, err: TransportError) {
        let mut reason = err.to_string();
        reason.truncate(MAX_REASON);
        let mut h = Header::new(FrameKind::Refuse);
        h.arg = code as u32;
        self.fail(err, Some((h, reason.into_bytes())));
    }

    /// Fails the connection: every pending operation gets `err`, then [`Event::Closed`].
    fn fail(&mut self, err: TransportError, last_words: Option<(Header, Vec<u8>)>) {
        if self.is_closed() {
            return;
        }
        tracing::debug!(peer = %self.peer, error = %err, "tcp connection closed");
        // Dropping a staging copy waits for it, so no buffer is freed under a device.
        self.landing.clear();
        // Requests not yet sent are dropped; a refusal goes out alone.
        self.out.retain(|f| f.sent > 0);
        for (_, p) in self.pending.drain() {
            let done = match p {
                Pending::Write(d) | Pending::Msg(d) => d,
                Pending::Read { done, .. } => done,
            };
            done.complete(Err(err.clone()));
        }
        self.error = Some(err.clone());
        self.unregister();
        self.events.push_back(Event::Closed(err));
        match last_words {
            Some((h, body)) => {
                self.queue_bytes(h, body);
                self.phase = Phase::Closing;
            }
            None => {
                self.out.clear();
                self.phase = Phase::Closed;
            }
        }
    }

    /// Removes this connection from [`ConnConfig::joins`]: no stream joins a closed connection.
    fn unregister(&mut self) {
        if std::mem::take(&mut self.registered) {
            if let Stripe::First { conn_id, .. } = self.stripe {
                self.cfg.joins.lock().remove(&conn_id);
            }
        }
    }

    /// Which stream of its connection this is (meaningful once established).
    pub fn stripe(&self) -> Stripe {
        self.stripe
    }

    fn violation(&mut self, what: String) {
        let err = TransportError::PeerMisbehaved {
            peer: Some(self.peer),
            what,
        };
        self.fail(err, None);
    }

    fn invalid(&mut self, e: DecodeError) {
        let err = e.into_error(Some(self.peer));
        if self.is_established() {
            self.fail(err, None);
        } else {
            self.refuse(RefuseCode::Protocol, err);
        }
    }

    /// How many messages/notifications (and bytes of messages) the user side can still queue.
    /// Once a read delivered that many, reading stops ([`ReadOutcome::Held`]) until more room
    /// is given; the peer is then held by TCP flow control. While held for room, the peer's
    /// silence does not count against it (its bytes are waiting in our socket). Default:
    /// unlimited.
    pub fn set_inbound_room(&mut self, messages: usize, bytes: usize) {
        self.room = (messages, bytes);
    }

    /// The key this connection granted for `region`, if any.
    fn granted(&self, region: u64) -> Option<u64> {
        self.cfg.grants.read().get(&region).copied()
    }

    /// This connection's granted keys (shared with the application's handle).
    pub fn grants(&self) -> &Grants {
        &self.cfg.grants
    }

    /// Whether reading is stopped because the user side has no room (see
    /// [`Conn::set_inbound_room`]).
    pub fn is_held_for_room(&self) -> bool {
        self.held_for_room()
    }

    fn held_for_room(&self) -> bool {
        self.phase == Phase::Established && (self.room.0 == 0 || self.room.1 == 0)
    }

    fn deliver(&mut self, ev: Event) {
        let bytes = match &ev {
            Event::Message(m) => m.len(),
            _ => 0,
        };
        self.room.0 = self.room.0.saturating_sub(1);
        self.room.1 = self.room.1.saturating_sub(bytes.max(1));
        self.events.push_back(ev);
    }

    /// Reads what `src` has (until `WouldBlock`, EOF or the read budget) and processes it.
    pub fn read_from<R: Read>(
        &mut self,
        src: &mut R,
        regions: &RegionTable,
        now: Instant,
    ) -> ReadOutcome {
        let mut budget = READ_BUDGET;
        loop {
            if self.is_closed() {
                return ReadOutcome::Closed;
            }
            if budget == 0 {
                return ReadOutcome::MoreReady;
            }
            if self.held_for_room() || self.out.len() >= MAX_QUEUED_FRAMES {
                return ReadOutcome::Held;
            }
            let res = match &mut self.rx {
                Rx::Header { buf, got } => match src.read(buf.get_mut(*got..).unwrap_or(&mut [])) {
                    Ok(n) => {
                        *got += n;
                        Ok(n)
                    }
                    Err(e) => Err(e),
                },
                Rx::Body { hdr, dest, got } => {
                    let total = hdr.body_len as usize;
                    let want = (total - *got).min(budget);
                    let r = match dest {
                        BodyDest::Buffer(v) => {
                            // Grow with the bytes that arrive (see BODY_STEP).
                            let want = want.min(BODY_STEP);
                            v.resize(*got + want, 0);
                            let r = src.read(v.get_mut(*got..*got + want).unwrap_or(&mut []));
                            v.truncate(*got + *r.as_ref().unwrap_or(&0));
                            r
                        }
                        BodyDest::Region { region, offset } => {
                            let mut g = region.lock_mut();
                            let at = *offset + *got;
                            src.read(g.get_mut(at..at + want).unwrap_or(&mut []))
                        }
                        BodyDest::Staged { buf, .. } => {
                            let at = *got;
                            src.read(buf.bytes_mut().get_mut(at..at + want).unwrap_or(&mut []))
                        }
                        BodyDest::Discard => {
                            self.scratch.resize(want.min(64 * 1024), 0);
                            src.read(&mut self.scratch)
                        }
                    };
                    if let Ok(n) = r {
                        *got += n;
                    }
                    r
                }
            };
            match res {
                Ok(0) => {
                    // EOF (or a zero-length buffer, which the state machine never asks for).
                    let err = TransportError::ConnectionClosed { peer: self.peer };
                    self.fail(err, None);
                    return ReadOutcome::Closed;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    self.live.heard(now);
                    self.advance_rx(regions);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let err = TransportError::PeerDead {
                        peer: self.peer,
                        reason: format!("recv: {e}"),
                    };
                    self.fail(err, None);
                    return ReadOutcome::Closed;
                }
            }
        }
    }

    /// Moves the receive state forward after bytes arrived.
    fn advance_rx(&mut self, regions: &RegionTable) {
        loop {
            match &self.rx {
                Rx::Header { buf, got } if *got == HEADER_LEN => {
                    let buf = *buf;
                    let hdr = match Header::decode(&buf) {
                        Ok(h) => h,
                        Err(e) => return self.invalid(e),
                    };
                    let dest = match self.on_header(&hdr, regions) {
                        Some(d) => d,
                        None => return, // closed
                    };
                    self.rx = Rx::Body { hdr, dest, got: 0 };
                    // A frame with no body completes at once.
                }
                Rx::Body { hdr, got, .. } if *got == hdr.body_len as usize => {
                    let Rx::Body { hdr, dest, .. } = std::mem::replace(
                        &mut self.rx,
                        Rx::Header {
                            buf: [0; HEADER_LEN],
                            got: 0,
                        },
                    ) else {
                        return;
                    };
                    self.on_frame(hdr, dest, regions);
                    return;
                }
                _ => return,
            }
        }
    }

    /// Validates a header and decides where its body goes. `None` when the connection failed.
    fn on_header(&mut self, h: &Header, regions: &RegionTable) -> Option<BodyDest> {
        if h.version != PROTOCOL_VERSION {
            let err = TransportError::VersionMismatch {
                peer: Some(self.peer),
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            };
            if self.is_established() {
                self.fail(err, None);
            } else {
                self.refuse(RefuseCode::Version, err);
            }
            return None;
        }
        let len = h.body_len as usize;
        let expected = match (self.phase, h.kind) {
            (Phase::ServerWaitHello, FrameKind::Hello)
            | (Phase::ClientWaitHelloAck, FrameKind::HelloAck)
            | (Phase::ServerWaitAuth, FrameKind::Auth)
            | (Phase::ClientWaitReady, FrameKind::Ready)
            | (
                Phase::ClientWaitHelloAck | Phase::ClientWaitReady | Phase::ServerWaitAuth,
                FrameKind::Refuse,
            ) => {
                if len > MAX_REASON.max(2 * NONCE_LEN + 9) {
                    self.invalid(DecodeError::Unexpected {
                        expected: "a short handshake frame",
                        got: format!("{len} bytes"),
                    });
                    return None;
                }
                return Some(BodyDest::Buffer(Vec::with_capacity(len)));
            }
            (Phase::Established, k) => k,
            (_, k) => {
                let e = DecodeError::Unexpected {
                    expected: self.expected_in_phase(),
                    got: format!("{k:?}"),
                };
                self.invalid(e);
                return None;
            }
        };
        match expected {
            FrameKind::Write => {
                if len > CHUNK {
                    self.violation(format!("write chunk of {len} bytes exceeds {CHUNK}"));
                    return None;
                }
                let granted = self.granted(h.region);
                match regions.check_remote_granted(
                    h.region,
                    h.key,
                    granted,
                    Some(RemoteOp::Write),
                    h.offset,
                    len as u64,
                ) {
                    Ok(region) => match usize::try_from(h.offset) {
                        Ok(offset) => self.body_dest(region, offset, len),
                        Err(_) => Some(BodyDest::Discard),
                    },
                    Err(e) => {
                        self.reply_error(h.op_id, &e);
                        Some(BodyDest::Discard)
                    }
                }
            }
            FrameKind::Msg => {
                if len > self.cfg.max_message_size {
                    self.violation(format!(
                        "message of {len} bytes exceeds the maximum of {}",
                        self.cfg.max_message_size
                    ));
                    return None;
                }
                Some(BodyDest::Buffer(Vec::with_capacity(len.min(BODY_STEP))))
            }
            FrameKind::ReadReq => {
                if len != 8 {
                    self.invalid(DecodeError::Unexpected {
                        expected: "READ_REQ body of 8 bytes",
                        got: format!("{len} bytes"),
                    });
                    return None;
                }
                Some(BodyDest::Buffer(vec![0; 8]))
            }
            FrameKind::Err => {
                if len != 32 {
                    self.invalid(DecodeError::Unexpected {
                        expected: "ERR body of 32 bytes",
                        got: format!("{len} bytes"),
                    });
                    return None;
                }
                Some(BodyDest::Buffer(vec![0; 32]))
            }
            FrameKind::Ack | FrameKind::Ping => {
                if len != 0 {
                    self.invalid(DecodeError::Unexpected {
                        expected: "an empty body",
                        got: format!("{len} bytes"),
                    });
                    return None;
                }
                Some(BodyDest::Buffer(Vec::new()))
            }
            FrameKind::ReadResp => {
                let (local, base, want, got) = match self.pending.get(&h.op_id) {
                    Some(Pending::Read {
                        local,
                        offset,
                        len,
                        got,
                        ..
                    }) => (local.clone(), *offset, *len, *got),
                    _ => {
                        self.violation(format!("read response for unknown read {}", h.op_id));
                        return None;
                    }
                };
                if h.offset != got as u64
                    || len > want - got
                    || len > CHUNK
                    || (h.last() && got + len != want)
                {
                    self.violation(format!(
                        "read response [{}, +{len}) does not continue read {} at {got} of {want}",
                        h.offset, h.op_id
                    ));
                    return None;
                }
                self.body_dest(local, base + got, len)
            }
            k => {
                let e = DecodeError::Unexpected {
                    expected: "a data frame",
                    got: format!("{k:?}"),
                };
                self.invalid(e);
                None
            }
        }
    }

    fn expected_in_phase(&self) -> &'static str {
        match self.phase {
            Phase::ServerWaitHello => "HELLO",
            Phase::ClientWaitHelloAck => "HELLO_ACK",
            Phase::ServerWaitAuth => "AUTH",
            Phase::ClientWaitReady => "READY",
            _ => "a data frame",
        }
    }

    fn reply_error(&mut self, op_id: u64, e: &TransportError) {
        if let Some((code, body)) = AccessError::from_error(e) {
            let mut h = Header::new(FrameKind::Err);
            h.op_id = op_id;
            h.arg = code as u32;
            if let TransportError::BadKey { region } = e {
                // A wrong key is never an honest mistake worth a retry: the same rule as RDMA,
                // where the NIC kills the QP, so that a peer gets no free guesses. The ERR goes
                // out as last words, then the connection closes.
                let err = TransportError::PeerMisbehaved {
                    peer: Some(self.peer),
                    what: format!("presented a wrong key for region {region}"),
                };
                return self.fail(err, Some((h, body.encode())));
            }
            self.queue_bytes(h, body.encode());
        }
    }

    fn on_frame(&mut self, h: Header, dest: BodyDest, regions: &RegionTable) {
        let body = match dest {
            BodyDest::Buffer(b) => b,
            BodyDest::Discard => return, // refused write chunk: already answered
            BodyDest::Staged {
                region,
                offset,
                buf,
            } => {
                if !self.land(&region, offset, buf, h.body_len as usize) {
                    return;
                }
                self.on_region_frame(&h);
                return;
            }
            BodyDest::Region { .. } => {
                self.on_region_frame(&h);
                return;
            }
        };
        // Whatever this frame answers or delivers comes after the data received before it.
        if !self.settle_landing() {
            return;
        }
        match h.kind {
            FrameKind::Hello => self.on_hello(&h, &body),
            FrameKind::HelloAck => self.on_hello_ack(&h, &body),
            FrameKind::Auth => self.on_auth(&body),
            FrameKind::Ready => self.on_ready(&body),
            FrameKind::Refuse => {
                let reason = String::from_utf8_lossy(&body).into_owned();
                let err = match h.arg {
                    x if x == RefuseCode::Auth as u32 => TransportError::AuthFailed {
                        peer: Some(self.peer),
                        reason: format!("refused by peer: {reason}"),
                    },
                    x if x == RefuseCode::Stream as u32 => TransportError::StreamRefused {
                        peer: Some(self.peer),
                        reason: format!("refused by peer: {reason}"),
                    },
                    x if x == RefuseCode::Version as u32 => TransportError::VersionMismatch {
                        peer: Some(self.peer),
                        ours: PROTOCOL_VERSION,
                        theirs: h.version,
                    },
                    _ => TransportError::PeerMisbehaved {
                        peer: Some(self.peer),
                        what: format!("refused: {reason}"),
                    },
                };
                self.fail(err, None);
            }
            FrameKind::Msg => {
                self.deliver(Event::Message(body));
                let mut a = Header::new(FrameKind::Ack);
                a.op_id = h.op_id;
                self.queue(a, Payload::None);
            }
            FrameKind::Ack => match self.pending.remove(&h.op_id) {
                Some(Pending::Write(d) | Pending::Msg(d)) => d.complete(Ok(())),
                Some(p @ Pending::Read { .. }) => {
                    self.pending.insert(h.op_id, p);
                    self.violation(format!("ACK for read {}", h.op_id));
                }
                // An operation already failed by an earlier ERR (a refused multi-chunk write).
                None => {}
            },
            FrameKind::Err => match AccessError::decode(h.arg, &body) {
                Ok(e) => match self.pending.remove(&h.op_id) {
                    Some(Pending::Write(d) | Pending::Msg(d)) => d.complete(Err(e)),
                    Some(Pending::Read { done, .. }) => done.complete(Err(e)),
                    None => {}
                },
                Err(e) => self.invalid(e),
            },
            FrameKind::ReadReq => self.on_read_req(&h, &body, regions),
            FrameKind::Ping => {}
            FrameKind::ReadResp | FrameKind::Write => {} // always region-bound, handled above
        }
    }

    /// A data frame (write chunk, read response) whose payload has been received (for a device
    /// region: its copy to the device started).
    fn on_region_frame(&mut self, h: &Header) {
        // What says the data landed waits for every staged copy before it.
        if h.last() && !self.settle_landing() {
            return;
        }
        match h.kind {
            FrameKind::Write if h.last() => {
                if h.notify() {
                    self.deliver(Event::Notification(h.arg));
                }
                let mut a = Header::new(FrameKind::Ack);
                a.op_id = h.op_id;
                self.queue(a, Payload::None);
            }
            FrameKind::ReadResp => self.on_read_data(h),
            _ => {}
        }
    }

    /// Where a data frame's `len` payload bytes for `region` at `offset` go: straight into a host
    /// region, or a staging buffer for a device region. `None` when the connection failed.
    fn body_dest(&mut self, region: Region, offset: usize, len: usize) -> Option<BodyDest> {
        let Some(mem) = region.device().filter(|_| len > 0) else {
            return Some(BodyDest::Region { region, offset });
        };
        match mem.staging(len) {
            Ok(buf) => Some(BodyDest::Staged {
                region,
                offset,
                buf,
            }),
            Err(e) => {
                self.fail(e, None);
                None
            }
        }
    }

    /// Starts the copy of a received chunk to its device region, keeping at most
    /// [`STAGE_DEPTH`] in flight. `false` when a copy failed (the connection is closed).
    fn land(&mut self, region: &Region, offset: usize, buf: Staging, len: usize) -> bool {
        let Some(mem) = region.device() else {
            return true;
        };
        match device::start_from_host(mem.as_ref(), buf, len, offset) {
            Ok(c) => self.landing.push_back(c),
            Err(e) => {
                self.fail(e, None);
                return false;
            }
        }
        while self.landing.len() > STAGE_DEPTH {
            let Some(oldest) = self.landing.pop_front() else {
                break;
            };
            if let Err(e) = oldest.wait() {
                self.fail(e, None);
                return false;
            }
        }
        true
    }

    /// Waits for every received chunk's copy to its device. `false` when one failed (the
    /// connection is closed).
    fn settle_landing(&mut self) -> bool {
        while let Some(c) = self.landing.pop_front() {
            if let Err(e) = c.wait() {
                self.fail(e, None);
                return false;
            }
        }
        true
    }

    fn on_read_data(&mut self, h: &Header) {
        let Some(Pending::Read { got, len, .. }) = self.pending.get_mut(&h.op_id) else {
            return;
        };
        *got += h.body_len as usize;
        if h.last() && *got == *len {
            if let Some(Pending::Read { done, .. }) = self.pending.remove(&h.op_id) {
                done.complete(Ok(()));
            }
        }
    }

    fn on_read_req(&mut self, h: &Header, body: &[u8], regions: &RegionTable) {
        let mut r = crate::codec::Reader::new(body);
        let len = match r.u64().and_then(|l| r.finish().map(|()| l)) {
            Ok(l) => l,
            Err(e) => return self.invalid(e),
        };
        let granted = self.granted(h.region);
        let region = match regions.check_remote_granted(
            h.region,
            h.key,
            granted,
            Some(RemoteOp::Read),
            h.offset,
            len,
        ) {
            Ok(region) => region,
            Err(e) => return self.reply_error(h.op_id, &e),
        };
        // In bounds of a live region, so both fit in usize.
        let (Ok(base), Ok(len)) = (usize::try_from(h.offset), usize::try_from(len)) else {
            return;
        };
        // Writes received before this read must have landed in the device first.
        if region.is_device() && !self.settle_landing() {
            return;
        }
        let mut sent = 0usize;
        loop {
            let n = (len - sent).min(CHUNK);
            let mut rh = Header::new(FrameKind::ReadResp);
            rh.op_id = h.op_id;
            rh.offset = sent as u64;
            if sent + n == len {
                rh.flags = FLAG_LAST;
            }
            self.queue(rh, Payload::chunk(&region, base + sent, n));
            sent += n;
            if sent == len {
                break;
            }
        }
    }

    fn auth_failed(&mut self, e: AuthError) {
        let err = TransportError::AuthFailed {
            peer: Some(self.peer),
            reason: e.to_string(),
        };
        self.refuse(RefuseCode::Auth, err);
    }

    /// A proof body: empty without a secret, else exactly [`PROOF_LEN`] bytes.
    fn proof_body(proof: Option<[u8; PROOF_LEN]>) -> Vec<u8> {
        proof.map(|p| p.to_vec()).unwrap_or_default()
    }

    fn on_hello(&mut self, h: &Header, body: &[u8]) {
        let hello = match Hello::decode(body) {
            Ok(h) => h.0,
            Err(e) => return self.invalid(e),
        };
        if let Err(e) = self.auth.on_peer_hello(hello) {
            return self.auth_failed(e);
        }
        self.peer_endpoint = hello.endpoint;
        let mut ack_h = Header::new(FrameKind::HelloAck);
        if h.op_id != 0 {
            if h.arg > 1 {
                return self.invalid(DecodeError::Unexpected {
                    expected: "a joining stream asking for no streams of its own",
                    got: format!("{} streams", h.arg),
                });
            }
            // Checked once the stream has authenticated (`on_auth`).
            self.join = Some(h.op_id);
        } else {
            let granted = (h.arg as usize).min(self.cfg.streams).min(MAX_STREAMS);
            if granted > 1 {
                self.stripe = Stripe::First {
                    conn_id: self.cfg.conn_id,
                    streams: granted,
                };
                ack_h.arg = granted as u32;
                ack_h.op_id = self.cfg.conn_id;
            }
        }
        // No proof yet: the client proves first.
        let ack = Hello(self.auth.hello()).encode();
        self.queue_bytes(ack_h, ack);
        self.phase = Phase::ServerWaitAuth;
    }

    /// A server's check of a joining stream, after it authenticated: the connection it names
    /// must be open, of the same peer endpoint, and have room.
    fn check_join(&mut self, conn_id: u64) -> Result<(), TransportError> {
        let mut joins = self.cfg.joins.lock();
        let refused = |reason: &str| TransportError::StreamRefused {
            peer: Some(self.peer),
            reason: reason.to_string(),
        };
        match joins.get_mut(&conn_id) {
            Some(slot) if slot.peer_endpoint == self.peer_endpoint => {
                if slot.room == 0 {
                    return Err(refused("the connection has all its streams"));
                }
                slot.room -= 1;
                self.cfg.grants = slot.grants.clone();
                self.stripe = Stripe::Joined { conn_id };
                Ok(())
            }
            // Another endpoint's connection is as unknown to this peer as a made-up id.
            _ => Err(refused("unknown connection")),
        }
    }

    fn on_hello_ack(&mut self, h: &Header, body: &[u8]) {
        let ack = match Hello::decode(body) {
            Ok(a) => a.0,
            Err(e) => return self.invalid(e),
        };
        let granted = (h.arg as usize).max(1);
        let wanted = if self.join.is_some() {
            1
        } else {
            self.cfg.streams.clamp(1, MAX_STREAMS)
        };
        if granted > wanted || (granted > 1 && h.op_id == 0) {
            return self.invalid(DecodeError::Unexpected {
                expected: "at most the streams asked for, with a connection id",
                got: format!("{granted} streams, connection id {:#x}", h.op_id),
            });
        }
        self.stripe = match self.join {
            Some(conn_id) => Stripe::Joined { conn_id },
            None if granted > 1 => Stripe::First {
                conn_id: h.op_id,
                streams: granted,
            },
            None => Stripe::Single,
        };
        let proof = self
            .auth
            .on_peer_hello(ack)
            .and_then(|()| self.auth.our_proof());
        match proof {
            Ok(p) => {
                self.peer_endpoint = ack.endpoint;
                self.queue_bytes(Header::new(FrameKind::Auth), Self::proof_body(p));
                self.phase = Phase::ClientWaitReady;
            }
            Err(e) => self.auth_failed(e),
        }
    }

    fn on_auth(&mut self, body: &[u8]) {
        let ours = self
            .auth
            .on_peer_proof((!body.is_empty()).then_some(body))
            .and_then(|()| self.auth.our_proof());
        let p = match ours {
            Ok(p) => p,
            Err(e) => return self.auth_failed(e),
        };
        if let Some(conn_id) = self.join {
            if let Err(e) = self.check_join(conn_id) {
                return self.refuse(RefuseCode::Stream, e);
            }
        }
        if let Stripe::First { conn_id, streams } = self.stripe {
            let slot = JoinSlot {
                peer_endpoint: self.peer_endpoint,
                room: streams - 1,
                grants: self.cfg.grants.clone(),
            };
            // A random 64-bit id: a clash is as likely as guessing it; refuse rather than mix.
            if self.cfg.joins.lock().insert(conn_id, slot).is_some() {
                return self.refuse(
                    RefuseCode::Protocol,
                    TransportError::InvalidArgument(format!("connection id {conn_id:#x} in use")),
                );
            }
            self.registered = true;
        }
        self.queue_bytes(Header::new(FrameKind::Ready), Self::proof_body(p));
        self.phase = Phase::Established;
        self.events.push_back(Event::Established {
            peer_endpoint: self.peer_endpoint,
            stripe: self.stripe,
        });
    }

    fn on_ready(&mut self, body: &[u8]) {
        if let Err(e) = self.auth.on_peer_proof((!body.is_empty()).then_some(body)) {
            // The server accepted us but could not prove itself: an impostor.
            return self.fail(
                TransportError::AuthFailed {
                    peer: Some(self.peer),
                    reason: e.to_string(),
                },
                None,
            );
        }
        self.phase = Phase::Established;
        self.events.push_back(Event::Established {
            peer_endpoint: self.peer_endpoint,
            stripe: self.stripe,
        });
    }

    /// The send side of staging: starts device→host copies for the first [`STAGE_DEPTH`] staged
    /// chunks queued (in queue order, so they run while earlier frames are on the wire), then
    /// waits for the copy of the payload the next write reaches, if it is staged.
    fn stage_out(&mut self) -> Result<(), TransportError> {
        let mut busy = 0usize;
        for f in self.out.iter_mut().take(MAX_IOV) {
            if busy == STAGE_DEPTH {
                break;
            }
            let Payload::Staged(st) = &mut f.payload else {
                continue;
            };
            busy += 1;
            if let OutStage::Idle = st.stage {
                let Some(mem) = st.region.device() else {
                    continue;
                };
                let buf = mem.staging(st.len)?;
                st.stage =
                    OutStage::Copying(device::start_to_host(mem.as_ref(), st.offset, buf, st.len)?);
            }
        }
        let next = self
            .out
            .iter_mut()
            .take(MAX_IOV)
            .map(|f| &mut f.payload)
            .find(|p| matches!(p, Payload::Region { .. } | Payload::Staged(_)));
        if let Some(Payload::Staged(st)) = next {
            if let OutStage::Copying(_) = st.stage {
                let OutStage::Copying(c) = std::mem::replace(&mut st.stage, OutStage::Idle) else {
                    return Ok(());
                };
                st.stage = OutStage::Ready(c.wait()?);
            }
        }
        Ok(())
    }

    /// Writes queued frames to `dst` (vectored: header and payload in one call).
    pub fn write_to<W: Write>(&mut self, dst: &mut W, now: Instant) -> WriteOutcome {
        loop {
            if self.out.is_empty() {
                self.staged_out = 0;
                return match self.phase {
                    Phase::Closing | Phase::Closed => {
                        self.phase = Phase::Closed;
                        WriteOutcome::Closed
                    }
                    _ => WriteOutcome::Flushed,
                };
            }
            if self.staged_out > 0 {
                if let Err(e) = self.stage_out() {
                    self.fail(e, None);
                    return WriteOutcome::Closed;
                }
            }
            let res = {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(8);
                let mut guard = None;
                for f in self.out.iter() {
                    if slices.len() + 2 > MAX_IOV {
                        break;
                    }
                    if let Some(h) = f.header.get(f.sent.min(HEADER_LEN)..) {
                        if !h.is_empty() {
                            slices.push(IoSlice::new(h));
                        }
                    }
                    let psent = f.sent.saturating_sub(HEADER_LEN);
                    match &f.payload {
                        Payload::None => {}
                        Payload::Bytes(b) => {
                            if let Some(p) = b.get(psent..) {
                                if !p.is_empty() {
                                    slices.push(IoSlice::new(p));
                                }
                            }
                        }
                        Payload::Region {
                            region,
                            offset,
                            len,
                        } => {
                            // One region payload per call: the guard lives until the write returns,
                            // and never two read guards at once (fair locks would deadlock with a
                            // waiting writer).
                            let g = guard.insert(region.lock());
                            if let Some(p) = g.get(offset + psent..offset + len) {
                                if !p.is_empty() {
                                    slices.push(IoSlice::new(p));
                                }
                            }
                            break;
                        }
                        Payload::Staged(st) => {
                            // `stage_out` made the first staged payload ready; like a region
                            // payload, one per call.
                            if let OutStage::Ready(b) = &st.stage {
                                if let Some(p) = b.bytes().get(psent..st.len) {
                                    if !p.is_empty() {
                                        slices.push(IoSlice::new(p));
                                    }
                                }
                            }
                            break;
                        }
                    }
                }
                dst.write_vectored(&slices)
            };
            match res {
                Ok(0) => {
                    let err = TransportError::PeerDead {
                        peer: self.peer,
                        reason: "send: wrote 0 bytes".into(),
                    };
                    self.fail(err, None);
                    return WriteOutcome::Closed;
                }
                Ok(mut n) => {
                    self.live.sent(now);
                    while n > 0 {
                        let Some(f) = self.out.front_mut() else { break };
                        let rem = HEADER_LEN + f.payload.len() - f.sent;
                        if n >= rem {
                            n -= rem;
                            if let Some(OutFrame {
                                payload: Payload::Staged(_),
                                ..
                            }) = self.out.pop_front()
                            {
                                self.staged_out = self.staged_out.saturating_sub(1);
                            }
                        } else {
                            f.sent += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return WriteOutcome::Blocked,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let err = TransportError::PeerDead {
                        peer: self.peer,
                        reason: format!("send: {e}"),
                    };
                    self.fail(err, None);
                    self.out.clear();
                    self.phase = Phase::Closed;
                    return WriteOutcome::Closed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two state machines against each other in memory, with simulated time: no sockets, no sleeps.
    use super::*;
    use crate::completion::Op;
    use crate::config::{Backend, PollMode};
    use crate::tcp::codec::{encode_frame, plain_client_handshake};

    /// Bytes in flight one way; reads past the end say `WouldBlock`, like a non-blocking socket.
    #[derive(Default)]
    struct Wire {
        buf: Vec<u8>,
        pos: usize,
    }

    impl Read for Wire {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let rest = &self.buf[self.pos..];
            if rest.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = rest.len().min(out.len());
            out[..n].copy_from_slice(&rest[..n]);
            self.pos += n;
            Ok(n)
        }
    }

    struct Side {
        conn: Conn,
        regions: Arc<RegionTable>,
        events: Vec<Event>,
    }
    use std::sync::Arc;

    fn cfg(endpoint: u64, secret: Option<&str>) -> ConnConfig {
        ConnConfig {
            endpoint,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            peer_timeout: Duration::from_secs(2),
            max_message_size: 1024,
            grants: Grants::default(),
            streams: 1,
            conn_id: 0x5eed,
            joins: Joins::default(),
        }
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn pair(cs: Option<&str>, ss: Option<&str>, now: Instant) -> (Side, Side) {
        let c = Side {
            conn: Conn::client(cfg(1, cs), addr(), now, [1; NONCE_LEN]),
            regions: RegionTable::new(1, Backend::Tcp),
            events: Vec::new(),
        };
        let s = Side {
            conn: Conn::server(cfg(2, ss), addr(), now, [2; NONCE_LEN]),
            regions: RegionTable::new(2, Backend::Tcp),
            events: Vec::new(),
        };
        (c, s)
    }

    /// Moves bytes both ways until neither side has anything to send.
    fn pump(a: &mut Side, b: &mut Side, now: Instant) {
        for _ in 0..1000 {
            let moved = step(a, b, now) | step(b, a, now);
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }

    fn step(x: &mut Side, y: &mut Side, now: Instant) -> bool {
        let mut w = Wire::default();
        let _ = x.conn.write_to(&mut w.buf, now);
        let moved = !w.buf.is_empty();
        if moved {
            y.conn.read_from(&mut w, &y.regions, now);
        }
        x.events.extend(std::iter::from_fn(|| x.conn.poll_event()));
        y.events.extend(std::iter::from_fn(|| y.conn.poll_event()));
        moved
    }

    fn established(now: Instant) -> (Side, Side) {
        let (mut c, mut s) = pair(None, None, now);
        pump(&mut c, &mut s, now);
        assert!(c.conn.is_established() && s.conn.is_established());
        (c, s)
    }

    fn op() -> (Op, Completer) {
        Op::new(PollMode::Blocking, Vec::new())
    }

    #[test]
    fn handshake_plain_and_with_secret() {
        let now = Instant::now();
        let (c, s) = established(now);
        assert_eq!(c.conn.peer_endpoint(), 2);
        assert_eq!(s.conn.peer_endpoint(), 1);
        let (mut c, mut s) = pair(Some("k"), Some("k"), now);
        pump(&mut c, &mut s, now);
        assert!(c.conn.is_established() && s.conn.is_established());
        assert!(matches!(
            c.events[..],
            [Event::Established {
                peer_endpoint: 2,
                stripe: Stripe::Single
            }]
        ));
    }

    /// A client of `streams` against a server of `server_streams`, both with secret "k" and the
    /// server's `joins` table: established.
    fn striped(streams: usize, server_streams: usize, joins: &Joins, now: Instant) -> (Side, Side) {
        let (mut c, mut s) = pair(Some("k"), Some("k"), now);
        c.conn = Conn::client(
            ConnConfig {
                streams,
                ..cfg(1, Some("k"))
            },
            addr(),
            now,
            [1; NONCE_LEN],
        );
        s.conn = Conn::server(
            ConnConfig {
                streams: server_streams,
                joins: joins.clone(),
                ..cfg(2, Some("k"))
            },
            addr(),
            now,
            [2; NONCE_LEN],
        );
        pump(&mut c, &mut s, now);
        (c, s)
    }

    /// A further stream from endpoint `endpoint` joining `conn_id` on a server sharing `joins`.
    fn join(endpoint: u64, conn_id: u64, joins: &Joins, now: Instant) -> (Side, Side) {
        let (mut c, mut s) = pair(Some("k"), Some("k"), now);
        c.conn = Conn::client_join(
            cfg(endpoint, Some("k")),
            addr(),
            now,
            [3; NONCE_LEN],
            conn_id,
        );
        s.conn = Conn::server(
            ConnConfig {
                streams: 8,
                joins: joins.clone(),
                ..cfg(2, Some("k"))
            },
            addr(),
            now,
            [4; NONCE_LEN],
        );
        pump(&mut c, &mut s, now);
        (c, s)
    }

    #[test]
    fn streams_are_the_smaller_setting_and_join_by_id() {
        let now = Instant::now();
        let joins = Joins::default();
        let (c, s) = striped(3, 2, &joins, now);
        let first = Stripe::First {
            conn_id: 0x5eed,
            streams: 2,
        };
        assert_eq!((c.conn.stripe(), s.conn.stripe()), (first, first));
        assert_eq!(joins.lock().get(&0x5eed).map(|j| j.room), Some(1));
        // The one further stream joins; a second is one too many.
        let (jc, js) = join(1, 0x5eed, &joins, now);
        assert!(jc.conn.is_established() && js.conn.is_established());
        assert_eq!(js.conn.stripe(), Stripe::Joined { conn_id: 0x5eed });
        for (endpoint, id) in [(1, 0x5eed), (1, 0x5eee), (9, 0x5eed)] {
            let (jc, js) = join(endpoint, id, &joins, now);
            for side in [&jc, &js] {
                assert!(
                    matches!(
                        side.conn.error(),
                        Some(TransportError::StreamRefused { .. })
                    ),
                    "endpoint {endpoint} id {id:#x}: {:?}",
                    side.conn.error()
                );
            }
        }
        // The id is withdrawn when the connection closes.
        drop((c, s));
        assert!(joins.lock().is_empty());
        // One stream on either side: the handshake of one stream, nothing registered.
        for (a, b) in [(1, 4), (4, 1)] {
            let (c, s) = striped(a, b, &joins, now);
            assert_eq!(
                (c.conn.stripe(), s.conn.stripe()),
                (Stripe::Single, Stripe::Single)
            );
            assert!(joins.lock().is_empty());
        }
    }

    #[test]
    fn a_join_without_the_secret_is_refused_before_its_id_is_checked() {
        let now = Instant::now();
        let joins = Joins::default();
        let (_c, _s) = striped(2, 2, &joins, now);
        let (mut jc, mut js) = pair(Some("wrong"), Some("k"), now);
        jc.conn = Conn::client_join(cfg(1, Some("wrong")), addr(), now, [3; NONCE_LEN], 0x5eed);
        js.conn = Conn::server(
            ConnConfig {
                joins: joins.clone(),
                ..cfg(2, Some("k"))
            },
            addr(),
            now,
            [4; NONCE_LEN],
        );
        pump(&mut jc, &mut js, now);
        assert!(matches!(
            js.conn.error(),
            Some(TransportError::AuthFailed { .. })
        ));
        assert_eq!(
            joins.lock().get(&0x5eed).map(|j| j.room),
            Some(1),
            "no room taken"
        );
    }

    #[test]
    fn handshake_refusals_are_clear_on_both_sides() {
        let now = Instant::now();
        for (cs, ss) in [(Some("a"), Some("b")), (None, Some("b")), (Some("a"), None)] {
            let (mut c, mut s) = pair(cs, ss, now);
            pump(&mut c, &mut s, now);
            assert!(c.conn.is_closed() && s.conn.is_closed(), "{cs:?} {ss:?}");
            for side in [&c, &s] {
                assert!(
                    matches!(side.conn.error(), Some(TransportError::AuthFailed { .. })),
                    "{cs:?} {ss:?}: {:?}",
                    side.conn.error()
                );
            }
        }
    }

    #[test]
    fn the_server_proves_nothing_before_the_client_did() {
        let now = Instant::now();
        let (mut c, mut s) = pair(Some("k"), Some("k"), now);
        let mut w = Wire::default();
        let _ = c.conn.write_to(&mut w.buf, now);
        s.conn.read_from(&mut w, &s.regions, now);
        let mut ack = Vec::new();
        let _ = s.conn.write_to(&mut ack, now);
        // HELLO_ACK: a header and a bare hello (id, nonce, flag), nothing derived from the secret.
        let h = Header::decode(&ack[..HEADER_LEN]).unwrap();
        assert_eq!(h.kind, FrameKind::HelloAck);
        assert_eq!(ack.len(), HEADER_LEN + Hello::LEN);
        // A client that echoes the server's own nonce (reflection) is refused.
        let mut evil = Side {
            conn: Conn::client(cfg(9, Some("k")), addr(), now, [2; NONCE_LEN]),
            regions: RegionTable::new(9, Backend::Tcp),
            events: Vec::new(),
        };
        let (_, mut s) = pair(Some("k"), Some("k"), now);
        pump(&mut evil, &mut s, now);
        assert!(
            matches!(s.conn.error(), Some(TransportError::AuthFailed { reason, .. }) if reason.contains("reflection")),
            "{:?}",
            s.conn.error()
        );
        assert!(!s.conn.is_established());
    }

    #[test]
    fn version_mismatch_is_refused() {
        let now = Instant::now();
        let (mut c, mut s) = pair(None, None, now);
        let mut hello = Wire::default();
        let _ = c.conn.write_to(&mut hello.buf, now);
        hello.buf[2] = PROTOCOL_VERSION + 1;
        s.conn.read_from(&mut hello, &s.regions, now);
        assert!(
            matches!(s.conn.error(), Some(TransportError::VersionMismatch { theirs, .. }) if *theirs == PROTOCOL_VERSION + 1)
        );
        let mut refusal = Wire::default();
        assert_eq!(s.conn.write_to(&mut refusal.buf, now), WriteOutcome::Closed);
        c.conn.read_from(&mut refusal, &c.regions, now);
        assert!(matches!(
            c.conn.error(),
            Some(TransportError::VersionMismatch { .. })
        ));
    }

    /// Bytes that arrive in pieces, as on a socket: each `arrive` makes the next piece readable;
    /// reading past it says `WouldBlock`.
    struct Trickle {
        wire: Wire,
        cuts: Vec<usize>,
        next: usize,
        upto: usize,
    }

    impl Trickle {
        fn arrive(&mut self) -> bool {
            let Some(&n) = self.cuts.get(self.next) else {
                return false;
            };
            self.next += 1;
            self.upto = (self.upto + n).min(self.wire.buf.len());
            true
        }
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = (self.upto - self.wire.pos).min(out.len());
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.wire.read(&mut out[..n])
        }
    }

    /// Writes, messages and reads of every size around the frame header, arriving in pieces of
    /// every size: the same data lands and the same events come.
    #[test]
    fn frames_arriving_in_any_pieces_are_received_whole() {
        let now = Instant::now();
        let sizes = [1, 47, 48, 49, 1000, 4047, 4096, 4097, 70_000, CHUNK + 3];
        for piece in [1usize, 7, 48, 1023, 4096, 65_536, 1 << 22] {
            let (mut c, mut s) = established(now);
            s.events.clear();
            let total: usize = sizes.iter().sum();
            let target = s.regions.alloc(total).unwrap();
            let src = c.regions.alloc(total).unwrap();
            src.with_mut(|b| {
                b.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i * 7 % 253) as u8)
            });
            let mut ops = Vec::new();
            let mut at = 0;
            for (i, &n) in sizes.iter().enumerate() {
                let (w, done) = op();
                let req = Request::Write {
                    local: src.clone(),
                    local_offset: at,
                    remote: target.descriptor(),
                    remote_offset: at as u64,
                    len: n,
                    notify: Some(i as u32),
                };
                c.conn.submit(req, done);
                ops.push(w);
                let (m, done) = op();
                c.conn
                    .submit(Request::Send(vec![i as u8; n.min(1024)]), done);
                ops.push(m);
                at += n;
            }
            // A read of what the first write carries (READ_REQ: a body of fixed size) and a write
            // to a region that does not exist (refused: an ERR frame comes back).
            let back = c.regions.alloc(64).unwrap();
            let (r, done) = op();
            let req = Request::Read {
                local: back.clone(),
                local_offset: 0,
                remote: target.descriptor(),
                remote_offset: 0,
                len: 64,
            };
            c.conn.submit(req, done);
            let (bad, done) = op();
            let req = Request::Write {
                local: src.clone(),
                local_offset: 0,
                remote: RemoteRegion {
                    region: 999,
                    ..target.descriptor()
                },
                remote_offset: 0,
                len: 10,
                notify: None,
            };
            c.conn.submit(req, done);
            let mut wire = Wire::default();
            let _ = c.conn.write_to(&mut wire.buf, now);
            // Pieces of `piece` bytes, every third one cut short to move the boundaries around.
            let cuts = (0..)
                .map(|k| if k % 3 == 2 { piece / 2 + 1 } else { piece })
                .take(wire.buf.len() + 1)
                .collect();
            let mut t = Trickle {
                wire,
                cuts,
                next: 0,
                upto: 0,
            };
            while t.arrive() {
                let out = s.conn.read_from(&mut t, &s.regions, now);
                assert_eq!(out, ReadOutcome::Drained, "piece={piece}");
                if t.wire.pos == t.wire.buf.len() {
                    break;
                }
            }
            assert_eq!(t.wire.pos, t.wire.buf.len(), "piece={piece}: all read");
            s.events.extend(std::iter::from_fn(|| s.conn.poll_event()));
            let want: Vec<String> = sizes
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| [format!("n{i}"), format!("m{i}x{}", n.min(1024))])
                .collect();
            let got: Vec<String> = s
                .events
                .iter()
                .map(|e| match e {
                    Event::Notification(i) => format!("n{i}"),
                    Event::Message(m) if m.iter().all(|&b| Some(&b) == m.first()) => {
                        format!("m{}x{}", m[0], m.len())
                    }
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(got, want, "piece={piece}");
            assert!(target.with(|t| src.with(|s| t == s)), "piece={piece}");
            // The acknowledgements, back in one piece: every operation completes.
            pump(&mut c, &mut s, now);
            assert!(ops.iter().all(|o| matches!(o.poll(), Some(Ok(())))));
            assert!(matches!(r.poll(), Some(Ok(()))), "piece={piece}");
            assert!(back.with(|b| src.with(|s| b[..] == s[..64])));
            assert!(matches!(bad.poll(), Some(Err(_))), "piece={piece}");
        }
    }

    #[test]
    fn write_notify_read_and_access_errors() {
        let now = Instant::now();
        let (mut c, mut s) = established(now);
        let target = s.regions.alloc(3 * CHUNK + 5).unwrap();
        let src = c.regions.alloc(3 * CHUNK + 5).unwrap();
        src.with_mut(|b| {
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i % 251) as u8)
        });
        let d = target.descriptor();
        let (w, done) = op();
        let req = Request::Write {
            local: src.clone(),
            local_offset: 3,
            remote: d,
            remote_offset: 1,
            len: 3 * CHUNK,
            notify: Some(77),
        };
        c.conn.submit(req, done);
        pump(&mut c, &mut s, now);
        assert!(matches!(w.poll(), Some(Ok(()))));
        assert!(matches!(
            s.events[..],
            [Event::Established { .. }, Event::Notification(77)]
        ));
        assert!(target.with(|t| src.with(|s| t[1..1 + 3 * CHUNK] == s[3..3 + 3 * CHUNK])));

        let back = c.regions.alloc(100).unwrap();
        let (r, done) = op();
        c.conn.submit(
            Request::Read {
                local: back.clone(),
                local_offset: 10,
                remote: d,
                remote_offset: 1000,
                len: 90,
            },
            done,
        );
        pump(&mut c, &mut s, now);
        assert!(matches!(r.poll(), Some(Ok(()))));
        assert!(back.with(|b| target.with(|t| b[10..100] == t[1000..1090])));

        let cases = [
            (
                RemoteRegion { region: 999, ..d },
                0,
                TransportError::UnknownRegion { region: 999 },
            ),
            (
                d,
                d.len - 1,
                TransportError::RegionOutOfBounds {
                    region: d.region,
                    offset: d.len - 1,
                    len: 2,
                    size: d.len,
                },
            ),
        ];
        for (remote, off, want) in cases {
            let (w, done) = op();
            let req = Request::Write {
                local: src.clone(),
                local_offset: 0,
                remote,
                remote_offset: off,
                len: 2,
                notify: None,
            };
            c.conn.submit(req, done);
            let (r, done) = op();
            c.conn.submit(
                Request::Read {
                    local: back.clone(),
                    local_offset: 0,
                    remote,
                    remote_offset: off,
                    len: 2,
                },
                done,
            );
            pump(&mut c, &mut s, now);
            for o in [w, r] {
                let got = o.poll().unwrap().unwrap_err();
                assert_eq!(got.to_string(), want.to_string());
            }
        }
        assert!(c.conn.is_established() && s.conn.is_established());
        // A wrong key: the ERR goes out as the target's last words, then it closes.
        let (w, done) = op();
        let bad_key = RemoteRegion {
            key: d.key ^ 1,
            ..d
        };
        c.conn.submit(
            Request::Write {
                local: src.clone(),
                local_offset: 0,
                remote: bad_key,
                remote_offset: 0,
                len: 2,
                notify: None,
            },
            done,
        );
        pump(&mut c, &mut s, now);
        let got = w.poll().unwrap().unwrap_err();
        assert_eq!(
            got.to_string(),
            TransportError::BadKey { region: d.region }.to_string()
        );
        assert!(s.conn.is_closed());
        assert!(matches!(
            s.conn.error(),
            Some(TransportError::PeerMisbehaved { .. })
        ));
    }

    #[test]
    fn reading_stops_when_the_user_side_has_no_room() {
        let now = Instant::now();
        let (mut c, mut s) = established(now);
        for i in 0..5u8 {
            let (_, done) = op();
            c.conn.submit(Request::Send(vec![i; 10]), done);
        }
        let mut w = Wire::default();
        let _ = c.conn.write_to(&mut w.buf, now);
        s.conn.set_inbound_room(2, usize::MAX);
        assert_eq!(s.conn.read_from(&mut w, &s.regions, now), ReadOutcome::Held);
        let got: Vec<_> = std::iter::from_fn(|| s.conn.poll_event()).collect();
        assert!(
            matches!(&got[..], [Event::Message(_), Event::Message(_)]),
            "{got:?}"
        );
        // Held for room, silence does not count: the peer stays alive past the timeout.
        let later = now + Duration::from_secs(10);
        s.conn.handle_timeout(later);
        assert!(s.conn.is_established());
        // Bytes bound: one 10-byte message uses up 5 bytes of room (it may overshoot by one).
        s.conn.set_inbound_room(usize::MAX, 5);
        assert_eq!(
            s.conn.read_from(&mut w, &s.regions, later),
            ReadOutcome::Held
        );
        assert_eq!(std::iter::from_fn(|| s.conn.poll_event()).count(), 1);
        s.conn.set_inbound_room(usize::MAX, usize::MAX);
        assert_eq!(
            s.conn.read_from(&mut w, &s.regions, later),
            ReadOutcome::Drained
        );
        assert_eq!(std::iter::from_fn(|| s.conn.poll_event()).count(), 2);
    }

    #[test]
    fn messages_and_oversized_message() {
        let now = Instant::now();
        let (mut c, mut s) = established(now);
        let (m, done) = op();
        c.conn.submit(Request::Send(b"hi".to_vec()), done);
        let (big, done) = op();
        c.conn.submit(Request::Send(vec![0; 1025]), done);
        pump(&mut c, &mut s, now);
        assert!(matches!(m.poll(), Some(Ok(()))));
        assert!(matches!(
            big.poll(),
            Some(Err(TransportError::MessageTooLarge {
                len: 1025,
                max: 1024
            }))
        ));
        assert!(matches!(&s.events[1], Event::Message(b) if b == b"hi"));
        // A peer that sends one anyway loses its connection.
        let mut h = Header::new(FrameKind::Msg);
        h.op_id = 9;
        let mut w = Wire {
            buf: encode_frame(h, &[0; 1025]),
            pos: 0,
        };
        assert_eq!(
            s.conn.read_from(&mut w, &s.regions, now),
            ReadOutcome::Closed
        );
        assert!(matches!(
            s.conn.error(),
            Some(TransportError::PeerMisbehaved { .. })
        ));
    }

    #[test]
    fn malformed_frame_closes_with_invalid_frame() {
        let now = Instant::now();
        let (_c, mut s) = established(now);
        let mut w = Wire {
            buf: vec![0xff; 100],
            pos: 0,
        };
        assert_eq!(
            s.conn.read_from(&mut w, &s.regions, now),
            ReadOutcome::Closed
        );
        assert!(matches!(
            s.conn.error(),
            Some(TransportError::InvalidFrame {
                expected: "magic \"GN\"",
                ..
            })
        ));
    }

    #[test]
    fn silent_peer_is_dead_within_the_timeout_and_pending_ops_fail() {
        let t0 = Instant::now();
        let (mut c, mut s) = established(t0);
        let target = s.regions.alloc(10).unwrap();
        let src = c.regions.alloc(10).unwrap();
        let (w, done) = op();
        let req = Request::Write {
            local: src,
            local_offset: 0,
            remote: target.descriptor(),
            remote_offset: 0,
            len: 10,
            notify: None,
        };
        c.conn.submit(req, done);
        let _ = c.conn.write_to(&mut Vec::new(), t0); // sent, never answered
                                                      // Heartbeats keep an idle but live pair alive.
        let mut now = t0;
        for _ in 0..8 {
            now += Duration::from_millis(500);
            s.conn.handle_timeout(now);
            c.conn.handle_timeout(now);
            assert!(step(&mut s, &mut c, now), "heartbeat expected");
            assert!(step(&mut c, &mut s, now), "heartbeat expected");
            assert!(c.conn.is_established() && s.conn.is_established());
        }
        // Then the server goes silent: the client declares it dead at the timeout, not before.
        let silent_from = now;
        c.conn
            .handle_timeout(silent_from + Duration::from_millis(1999));
        assert!(w.poll().is_none());
        let deadline = c.conn.poll_timeout().unwrap();
        assert!(deadline <= silent_from + Duration::from_secs(2));
        c.conn.handle_timeout(silent_from + Duration::from_secs(2));
        assert!(matches!(
            w.poll(),
            Some(Err(TransportError::PeerDead { .. }))
        ));
    }

    #[test]
    fn raw_client_handshake_bytes_establish() {
        let now = Instant::now();
        let (_, mut s) = pair(None, None, now);
        let mut w = Wire {
            buf: plain_client_handshake(5, [3; NONCE_LEN]),
            pos: 0,
        };
        assert_eq!(
            s.conn.read_from(&mut w, &s.regions, now),
            ReadOutcome::Drained
        );
        assert!(s.conn.is_established());
        assert_eq!(s.conn.peer_endpoint(), 5);
    }
}
