//! The TCP endpoint: a progress thread on a mio event loop driving [`Conn`] state machines, with
//! a direct path on which callers write their small requests themselves.
//!
//! Each connection's socket and state machine sit in a `Link` under one lock (`wire`), shared by
//! the progress thread and the connection's handles. The progress thread reads every socket, runs
//! the timers (heartbeats, dead peers, handshakes), routes events to the user-facing side (the
//! accept queue, each connection's message and notification queues, the operations' completions)
//! and writes whatever is left queued.
//!
//! Submitting. A request whose frames carry only owned bytes (a message, a read request), at most
//! [`DIRECT_MAX`] of them, takes the *direct path*: the caller tries `wire` (it never waits for
//! it), checks that the connection's outbox is empty, queues the request in the state machine and,
//! if nothing was queued before it, writes it to the socket itself. The caller's own progress
//! thread is not woken (no eventfd wake-up before the write): only the peer's progress thread
//! wakes (on the socket) and hands the message over. Otherwise
//! the request goes to the connection's *outbox* and a `Cmd::Service` wakes the progress thread
//! (with a [`mio::Waker`] in [`PollMode::Blocking`]; in [`PollMode::BusyPoll`] the thread spins on
//! `poll` with a zero timeout and needs no wake-up), which moves the outbox into the state machine
//! and writes. That is the path of one-sided writes (their payload is a region, whose lock a
//! caller must not take under `wire`, see below), of large messages (the progress thread copies
//! bulk data, so `submit` stays quick), of submissions that find `wire` busy, and of any request
//! behind one in the outbox.
//!
//! Order. Frames leave in the order requests enter the state machine's queue (`Conn::write_to`
//! sends it front to back). A request enters it directly only while the outbox is empty, and only
//! the progress thread moves the outbox into it, in order, under `wire`. So a request never
//! overtakes one submitted before it on the same connection.
//!
//! Who writes queued bytes. Sockets are edge-triggered (mio): a WRITABLE event comes only after a
//! send returned `WouldBlock`, once space frees, whichever thread got the `WouldBlock`. Every
//! holder of `wire` that queues bytes therefore either calls `Conn::write_to` before releasing it
//! (which returns only when the queue is empty, on `WouldBlock`, or closed), or is the progress
//! thread with that connection on its list to write in the same loop iteration. Hence a caller
//! that finds bytes already queued only appends its frames: a WRITABLE event or the progress
//! thread's pass is due and carries them too. A direct write that finds the connection failed
//! (`WriteOutcome::Closed`) sends a `Cmd::Service` so the progress thread routes the error and
//! drops the socket.
//!
//! Lock order: `Link::wire`, then `Link::outbox`. Under them a holder may take region locks (the
//! progress thread only) and complete operations; those never take either. `Shared::cmds`, the
//! accept queue and a connection's user-facing queues are never taken with `wire` held: events are
//! drained from the state machine under `wire` and routed after releasing it (which also lets a
//! woken caller find `wire` free). Callers only *try* `wire`: a caller holding a region guard while
//! it submits cannot deadlock with the progress thread, which may hold `wire` while it waits for
//! that region.
//!
//! Several streams ([`crate::config::TcpConfig::streams`] > 1). The first stream's `Link` is the
//! connection (its handles, outbox and user-facing queues); the others are `ConnIo`s of their own
//! that point at it (`primary`) and feed its queues. Only the progress thread touches them: it
//! routes the first stream's outbox through the connection's `Group`, which cuts transfers into
//! parts ([`super::stripe`]) and holds back what must wait for writes in flight on the other
//! streams (then `Outbox::fenced` keeps callers off the direct path). Lock order: the first
//! stream's `wire`, then another stream's `wire`, then an `outbox`.
//!
//! Sockets are read until `WouldBlock` (or a per-connection budget, after which the thread polls
//! again without sleeping) and written until the queue is empty or `WouldBlock`.

use super::proto::{Conn, ConnConfig, Event, Joins, ReadOutcome, Request, Stripe, WriteOutcome};
use super::stripe::{self, Part, STRIPE_MIN};
use crate::accept::{AcceptQueue, HandshakeSlots, Slot, ACCEPT_QUEUE, MAX_HANDSHAKES};
use crate::completion::{Batch, BatchBuilder, Completer, Op};
use crate::config::{Backend, PollMode, TcpConfig, TransportConfig};
use crate::error::{Result, TransportError};
use crate::inbound::InboundQueue;
use crate::region::{EndpointId, Region, RegionAccess, RegionTable, RemoteRegion};
use crate::{Connection, SharedBuf, Transfer, TransferKind, Transport};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// Largest request (bytes of owned payload) a caller writes to the socket itself; larger ones are
/// left to the progress thread so that `submit` does not copy bulk data.
pub const DIRECT_MAX: usize = 64 * 1024;

type ConnReply = mpsc::SyncSender<Result<Arc<TcpConnection>>>;

enum Cmd {
    Adopt {
        stream: TcpStream,
        peer: SocketAddr,
        token: Token,
        reply: ConnReply,
    },
    /// The connection needs the progress thread: requests wait in its outbox, or a caller's write
    /// found it failed and its error must be routed.
    Service {
        token: Token,
    },
    Close {
        token: Token,
    },
    /// The application made room in a connection's queues after the progress thread stopped
    /// reading it: read again.
    Resume {
        token: Token,
    },
}

struct Shared {
    config: TransportConfig,
    endpoint: EndpointId,
    regions: Arc<RegionTable>,
    waker: Waker,
    /// `None` once the progress thread has stopped: submissions then fail at once.
    cmds: Mutex<Option<Vec<Cmd>>>,
    accepted: AcceptQueue<Arc<TcpConnection>>,
    shutdown: AtomicBool,
    next_token: AtomicUsize,
    /// Striped connections that further streams may join (see [`super::proto::Joins`]).
    joins: Joins,
}

impl Shared {
    fn push(&self, cmds: impl IntoIterator<Item = Cmd>) -> Result<()> {
        {
            let mut g = self.cmds.lock();
            let Some(q) = g.as_mut() else {
                return Err(TransportError::EndpointClosed);
            };
            q.extend(cmds);
        }
        if self.config.poll_mode == PollMode::Blocking {
            self.waker
                .wake()
                .map_err(|e| TransportError::io("eventfd write (mio::Waker::wake)", e))?;
        }
        Ok(())
    }
}

/// A TCP endpoint. Dropping it stops its progress thread and closes every connection.
pub struct TcpTransport {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("endpoint", &format_args!("{:#x}", self.shared.endpoint))
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl TcpTransport {
    /// Binds the listening socket and starts the progress thread.
    pub fn open(config: TransportConfig) -> Result<Self> {
        if !(1..=TcpConfig::MAX_STREAMS).contains(&config.tcp.streams) {
            return Err(TransportError::InvalidArgument(format!(
                "tcp.streams = {}: must be 1 to {}",
                config.tcp.streams,
                TcpConfig::MAX_STREAMS
            )));
        }
        let poll =
            Poll::new().map_err(|e| TransportError::io("epoll_create (mio::Poll::new)", e))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| TransportError::io("eventfd (mio::Waker)", e))?;
        let mut listener =
            TcpListener::bind(config.listen).map_err(|e| TransportError::io("bind", e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| TransportError::io("epoll_ctl (register listener)", e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| TransportError::io("getsockname", e))?;
        let endpoint: EndpointId = rand::random();
        let shared = Arc::new(Shared {
            config,
            endpoint,
            regions: RegionTable::new(endpoint, Backend::Tcp),
            waker,
            cmds: Mutex::new(Some(Vec::new())),
            accepted: AcceptQueue::new(ACCEPT_QUEUE),
            shutdown: AtomicBool::new(false),
            next_token: AtomicUsize::new(2),
            joins: Joins::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("genie-tcp-{}", local_addr.port()))
            .spawn(move || ProgressThread::new(s, poll, listener).run())
            .map_err(|e| TransportError::io("pthread_create (progress thread)", e))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            local_addr,
        })
    }

    /// The endpoint's region table (for tests and tools that inspect registrations).
    pub fn regions(&self) -> &Arc<RegionTable> {
        &self.shared.regions
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Release: pairs with the Acquire loads in the progress loop and `accept`. The flag
        // publishes nothing else (the thread is also woken, and joined below).
        self.shared.shutdown.store(true, Ordering::Release);
        if let Err(e) = self.shared.waker.wake() {
            tracing::warn!(error = %e, "cannot wake the TCP progress thread for shutdown");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the TCP progress thread panicked");
            }
        }
    }
}

impl Transport for TcpTransport {
    fn backend(&self) -> Backend {
        Backend::Tcp
    }

    fn endpoint_id(&self) -> EndpointId {
        self.shared.endpoint
    }

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn config(&self) -> &TransportConfig {
        &self.shared.config
    }

    fn alloc_region_with(&self, len: usize, access: RegionAccess) -> Result<Region> {
        self.shared.regions.alloc_with(len, access)
    }

    fn alloc_private_region(&self, len: usize, access: RegionAccess) -> Result<Region> {
        self.shared.regions.alloc_scoped(len, access, true)
    }

    fn register_with(&self, buf: Vec<u8>, access: RegionAccess) -> Result<Region> {
        Ok(self.shared.regions.register_with(buf, access))
    }

    fn register_device(&self, mem: crate::DeviceMem, access: RegionAccess) -> Result<Region> {
        // Staged through host buffers by the connections' state machines (`proto`).
        Ok(self.shared.regions.register_device(mem, access))
    }

    fn register_shared(&self, mem: SharedBuf, access: RegionAccess) -> Result<Region> {
        Ok(self.shared.regions.register_shared(mem, access))
    }

    fn connect(&self, addr: SocketAddr) -> Result<Arc<dyn Connection>> {
        let timeout = self.shared.config.peer_timeout;
        let std = std::net::TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| TransportError::io("connect", e))?;
        std.set_nodelay(true)
            .map_err(|e| TransportError::io("setsockopt(TCP_NODELAY)", e))?;
        std.set_nonblocking(true)
            .map_err(|e| TransportError::io("fcntl(O_NONBLOCK)", e))?;
        // Relaxed: only uniqueness matters (atomicity gives it); the token reaches the progress
        // thread through the command queue's lock, which orders everything else.
        let token = Token(self.shared.next_token.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::sync_channel(1);
        self.shared.push([Cmd::Adopt {
            stream: TcpStream::from_std(std),
            peer: addr,
            token,
            reply: tx,
        }])?;
        // The handshake is bounded by the peer timeout inside the state machine; the margin here
        // only covers a stalled progress thread.
        match rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(r) => r.map(|c| c as Arc<dyn Connection>),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(TransportError::Timeout { after: timeout }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(TransportError::EndpointClosed),
        }
    }

    fn accept(&self, timeout: Duration) -> Result<Arc<dyn Connection>> {
        self.shared
            .accepted
            // Acquire: pairs with the Release store in `Drop`.
            .pop(timeout, || self.shared.shutdown.load(Ordering::Acquire))
            .map(|c| c as Arc<dyn Connection>)
    }
}

#[derive(Default)]
struct Queues {
    msgs: VecDeque<Vec<u8>>,
    notifs: VecDeque<u32>,
    /// Bytes in `msgs`.
    bytes: usize,
    /// The progress thread stopped reading this connection because these queues were full: the
    /// next take that makes room wakes it (`Cmd::Service`).
    held: bool,
    closed: Option<TransportError>,
}

impl Queues {
    fn take_msg(&mut self) -> Option<Vec<u8>> {
        let m = self.msgs.pop_front()?;
        self.bytes -= m.len();
        Some(m)
    }

    /// Room left under the endpoint's bounds: (messages and notifications, bytes).
    fn room(&self, cfg: &TransportConfig) -> (usize, usize) {
        (
            cfg.max_inbound_queue
                .saturating_sub(self.msgs.len() + self.notifs.len()),
            cfg.max_inbound_bytes.saturating_sub(self.bytes),
        )
    }
}

struct UserQueues {
    q: Mutex<Queues>,
    cv: Condvar,
    alive: AtomicBool,
}

impl UserQueues {
    fn push(&self, f: impl FnOnce(&mut Queues)) {
        let mut q = self.q.lock();
        f(&mut q);
        self.cv.notify_all();
    }
}

/// What the progress thread and a connection's handles share. See the module docs for who takes
/// which lock when.
struct Link {
    token: Token,
    wire: Mutex<Wire>,
    outbox: Mutex<Outbox>,
    /// The keys this connection granted, shared with its state machine (which checks them):
    /// never under `wire`, so granting never waits for the progress thread.
    grants: super::proto::Grants,
}

/// The socket and the protocol state of one connection.
struct Wire {
    /// `None` once the progress thread has dropped the connection (the socket is closed).
    stream: Option<TcpStream>,
    conn: Conn,
}

/// Requests waiting for the progress thread to move them into the state machine.
#[derive(Default)]
struct Outbox {
    reqs: Vec<(Request, Completer)>,
    /// Set once the connection is gone: later requests fail with it at once.
    closed: Option<TransportError>,
    /// A striped connection has writes in flight on its further streams that later requests
    /// must wait for ([`Group`]): no direct path until they landed.
    fenced: bool,
}

/// Bytes a request puts on the wire if a caller may write it itself (owned bytes, at most
/// [`DIRECT_MAX`]); `None` for a one-sided write, whose payload is a region, and for a read
/// that a connection of several streams (`striped`) cuts into parts.
fn direct_len(req: &Request, striped: bool) -> Option<usize> {
    match req {
        Request::Send(m) => Some(m.len()),
        Request::Read { len, .. } if striped && *len >= STRIPE_MIN => None,
        Request::Read { .. } => Some(8),
        Request::Write { .. } => None,
    }
}

impl Link {
    fn new(token: Token, stream: TcpStream, conn: Conn) -> Arc<Self> {
        Arc::new(Self {
            token,
            grants: conn.grants().clone(),
            wire: Mutex::new(Wire {
                stream: Some(stream),
                conn,
            }),
            outbox: Mutex::new(Outbox::default()),
        })
    }

    /// Submits requests in order: on the direct path when `direct` and `wire` is free and the outbox
    /// empty, else through the outbox (see the module docs).
    fn submit(
        &self,
        endpoint: &Shared,
        direct: bool,
        reqs: impl IntoIterator<Item = (Request, Completer)>,
    ) -> Result<()> {
        if direct {
            if let Some(mut w) = self.wire.try_lock() {
                // Only the progress thread empties the outbox, and it holds `wire` to do so: empty
                // now means nothing submitted before us is waiting there.
                let clear = {
                    let ob = self.outbox.lock();
                    ob.reqs.is_empty() && !ob.fenced
                };
                if clear {
                    let Wire { stream, conn } = &mut *w;
                    // Bytes already queued mean a WRITABLE event or the progress thread's write
                    // pass is due (module docs): append only, it will carry our frames.
                    let idle = conn.queued() == 0;
                    // On a closed connection this fails the requests at once.
                    reqs.into_iter()
                        .for_each(|(req, done)| conn.submit(req, done));
                    let failed = match stream {
                        Some(s) if idle => conn.write_to(s, Instant::now()) == WriteOutcome::Closed,
                        _ => false,
                    };
                    drop(w);
                    if failed {
                        // Our operations have failed already; the progress thread routes the error
                        // to the connection's queues and drops the socket. If the endpoint is
                        // stopping, that closes the connection anyway.
                        let _ = endpoint.push([Cmd::Service { token: self.token }]);
                    }
                    return Ok(());
                }
            }
        }
        let first = {
            let mut outbox = self.outbox.lock();
            if let Some(e) = outbox.closed.clone() {
                drop(outbox);
                reqs.into_iter()
                    .for_each(|(_, done)| done.complete(Err(e.clone())));
                return Ok(());
            }
            let first = outbox.reqs.is_empty();
            outbox.reqs.extend(reqs);
            first
        };
        // The progress thread takes the whole outbox on each `Service`: one per empty → non-empty
        // transition suffices, as every later request lands before the take that empties it.
        if first {
            endpoint.push([Cmd::Service { token: self.token }])?;
        }
        Ok(())
    }
}

/// A connection of a [`TcpTransport`]. Dropping the last handle closes it.
pub struct TcpConnection {
    endpoint: Arc<Shared>,
    link: Arc<Link>,
    peer_addr: SocketAddr,
    peer_endpoint: EndpointId,
    state: Arc<UserQueues>,
    /// Streams agreed for this connection (1: not striped).
    streams: usize,
}

impl std::fmt::Debug for TcpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnection")
            .field("peer_addr", &self.peer_addr)
            .field("peer_endpoint", &format_args!("{:#x}", self.peer_endpoint))
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        // AcqRel: the swap decides who closes, exactly once (atomicity does that); the ordering
        // makes the queue state written before it visible to whoever reads `false`.
        if self.state.alive.swap(false, Ordering::AcqRel) {
            // The endpoint may already be gone; then the socket is closed anyway.
            let _ = self.endpoint.push([Cmd::Close {
                token: self.link.token,
            }]);
        }
    }
}

impl TcpConnection {
    fn mode(&self) -> PollMode {
        self.endpoint.config.poll_mode
    }

    fn closed_error(&self) -> TransportError {
        self.state
            .q
            .lock()
            .closed
            .clone()
            .unwrap_or(TransportError::ConnectionClosed {
                peer: self.peer_addr,
            })
    }

    fn check_local(&self, local: &Region, offset: usize, len: usize) -> Result<()> {
        if local.endpoint() != self.endpoint.endpoint || local.backend() != Backend::Tcp {
            return Err(TransportError::InvalidArgument(format!(
                "local region {} belongs to another endpoint ({:#x})",
                local.id(),
                local.endpoint()
            )));
        }
        local.check_local(offset, len)
    }

    fn request(&self, t: &Transfer<'_>) -> Result<Request> {
        self.check_local(t.local, t.local_offset, t.len)?;
        if t.remote.endpoint != self.peer_endpoint {
            return Err(TransportError::ForeignDescriptor {
                descriptor_endpoint: t.remote.endpoint,
                peer_endpoint: self.peer_endpoint,
            });
        }
        Ok(match t.kind {
            TransferKind::Write | TransferKind::WriteNotify(_) => Request::Write {
                local: t.local.clone(),
                local_offset: t.local_offset,
                remote: *t.remote,
                remote_offset: t.remote_offset,
                len: t.len,
                notify: match t.kind {
                    TransferKind::WriteNotify(imm) => Some(imm),
                    _ => None,
                },
            },
            TransferKind::Read => Request::Read {
                local: t.local.clone(),
                local_offset: t.local_offset,
                remote: *t.remote,
                remote_offset: t.remote_offset,
                len: t.len,
            },
        })
    }

    fn submit_one(&self, req: Request) -> Result<Op> {
        if !self.is_alive() {
            return Err(self.closed_error());
        }
        let (op, done) = Op::new(self.mode(), Vec::new());
        let direct = direct_len(&req, self.streams > 1).is_some_and(|n| n <= DIRECT_MAX);
        self.link.submit(&self.endpoint, direct, [(req, done)])?;
        Ok(op)
    }

    /// The user-facing queues as [`InboundQueue`] takes from them. The progress thread fills them
    /// in either poll mode (in busy-poll mode it spins itself), so a waiting caller sleeps.
    fn inbound(&self) -> InboundQueue<'_, Queues> {
        InboundQueue::new(&self.state.q, &self.state.cv, None)
    }

    /// `take`, then [`TcpConnection::resume_if_held`] after a successful one (under the queues'
    /// lock, see there).
    fn take_and_resume<T>(
        &self,
        q: &mut Queues,
        take: impl Fn(&mut Queues) -> Option<T>,
    ) -> Option<T> {
        let v = take(q)?;
        self.resume_if_held(q);
        Some(v)
    }

    fn wait_queue<T>(
        &self,
        timeout: Duration,
        take: impl Fn(&mut Queues) -> Option<T>,
    ) -> Result<T> {
        self.inbound().wait(
            timeout,
            |q| self.take_and_resume(q, &take),
            |q| q.closed.clone(),
        )
    }

    /// After a take: if the progress thread stopped reading for lack of room and there is room
    /// now, wake it. Under the queues' lock, as the thread sets `held`, so no wake-up is lost.
    fn resume_if_held(&self, q: &mut Queues) {
        let (m, b) = q.room(&self.endpoint.config);
        if q.held && m > 0 && b > 0 {
            q.held = false;
            let _ = self.endpoint.push([Cmd::Resume {
                token: self.link.token,
            }]);
        }
    }

    fn try_queue<T>(&self, take: impl Fn(&mut Queues) -> Option<T>) -> Result<Option<T>> {
        self.inbound()
            .try_take(|q| self.take_and_resume(q, &take), |q| q.closed.clone())
    }
}

impl Connection for TcpConnection {
    fn backend(&self) -> Backend {
        Backend::Tcp
    }

    fn grant(&self, region: &Region) -> Result<RemoteRegion> {
        if region.endpoint() != self.endpoint.endpoint {
            return Err(TransportError::InvalidArgument(format!(
                "region {} belongs to another endpoint",
                region.id()
            )));
        }
        if !region.is_private() {
            return Ok(region.descriptor());
        }
        let key = *self
            .link
            .grants
            .write()
            .entry(region.id())
            .or_insert_with(rand::random);
        Ok(RemoteRegion {
            key,
            ..region.descriptor()
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    fn peer_endpoint(&self) -> EndpointId {
        self.peer_endpoint
    }

    fn submit(&self, transfer: Transfer<'_>) -> Result<Op> {
        let req = self.request(&transfer)?;
        self.submit_one(req)
    }

    fn send(&self, msg: &[u8]) -> Result<Op> {
        let max = self.endpoint.config.max_message_size;
        if msg.len() > max {
            return Err(TransportError::MessageTooLarge {
                len: msg.len(),
                max,
            });
        }
        self.submit_one(Request::Send(msg.to_vec()))
    }

    fn recv(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.wait_queue(timeout, Queues::take_msg)
    }

    fn try_recv(&self) -> Result<Option<Vec<u8>>> {
        self.try_queue(Queues::take_msg)
    }

    fn recv_notification(&self, timeout: Duration) -> Result<u32> {
        self.wait_queue(timeout, |q| q.notifs.pop_front())
    }

    fn try_recv_notification(&self) -> Result<Option<u32>> {
        self.try_queue(|q| q.notifs.pop_front())
    }

    fn post_batch(&self, transfers: &[Transfer<'_>]) -> Result<Batch> {
        if !self.is_alive() {
            return Err(self.closed_error());
        }
        let mut b = BatchBuilder::new(self.mode(), transfers.len());
        let mut reqs = Vec::with_capacity(transfers.len());
        let mut direct = Some(0usize);
        for t in transfers {
            match self.request(t) {
                Ok(req) => {
                    direct = direct
                        .zip(direct_len(&req, self.streams > 1))
                        .map(|(a, n)| a.saturating_add(n));
                    reqs.push((req, b.op(Vec::new())));
                }
                Err(e) => b.failed(e),
            }
        }
        if !reqs.is_empty() {
            let direct = direct.is_some_and(|n| n <= DIRECT_MAX);
            self.link.submit(&self.endpoint, direct, reqs)?;
        }
        Ok(b.build())
    }

    fn is_alive(&self) -> bool {
        // Acquire: pairs with the stores that clear it (close, drop, the progress thread).
        self.state.alive.load(Ordering::Acquire)
    }

    fn close(&self) {
        // AcqRel: as in `Drop`; the one that clears the flag closes.
        if self.state.alive.swap(false, Ordering::AcqRel) {
            self.state.push(|q| {
                q.closed.get_or_insert(TransportError::ConnectionClosed {
                    peer: self.peer_addr,
                });
            });
            let _ = self.endpoint.push([Cmd::Close {
                token: self.link.token,
            }]);
        }
    }
}

/// One connection as the progress thread sees it.
struct ConnIo {
    link: Arc<Link>,
    peer: SocketAddr,
    /// The user-facing queues, once established.
    shared: Option<Arc<UserQueues>>,
    /// A `connect` call waiting for the handshake.
    reply: Option<ConnReply>,
    /// Bytes may still be waiting (the read budget ran out).
    more: bool,
    /// An incoming connection's handshake slot, held until it is established or closed.
    slot: Option<Slot>,
    /// A further stream of a striped connection: that connection's first stream.
    primary: Option<Token>,
    /// `Conn::poll_timeout` when the progress thread last held `wire`. Callers between two such
    /// times only submit and write, which never moves it earlier (a write moves the heartbeat
    /// later; a failed write sends a `Service`), so the thread may sleep until it.
    deadline: Option<Instant>,
}

struct ProgressThread {
    shared: Arc<Shared>,
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, ConnIo>,
    /// Events drained from a state machine under `wire`, routed after releasing it.
    events: Vec<Event>,
    /// Incoming handshakes in progress (capped).
    handshakes: HandshakeSlots,
    /// Striped connections, by their first stream's token.
    groups: HashMap<Token, Group>,
    /// Striped connections' first streams by connection id (for joining streams).
    by_id: HashMap<u64, Token>,
    /// Connections with frames queued outside their own service pass: written this iteration.
    dirty: Vec<Token>,
    /// Connections closed outside their own service pass: routed and removed this iteration.
    dying: Vec<Token>,
}

/// A striped transfer in flight: its parts on the streams, completed as one.
struct StripeOp {
    parts: Vec<Op>,
    done: Completer,
    /// A striped write's notification: an empty write with it, sent on the first stream once
    /// every part has landed.
    then: Option<Request>,
}

impl StripeOp {
    fn is_done(&self) -> bool {
        self.parts.iter().all(Op::is_done)
    }

    /// The error of a part that failed, if any: a refused access (what the transfer did wrong)
    /// before the connection's failure that follows it.
    fn result(&self) -> Result<()> {
        let errs: Vec<TransportError> = self
            .parts
            .iter()
            .filter_map(|p| p.poll().and_then(|r| r.err()))
            .collect();
        let access = errs.iter().position(|e| {
            matches!(
                e,
                TransportError::BadKey { .. }
                    | TransportError::RegionOutOfBounds { .. }
                    | TransportError::AccessDenied { .. }
                    | TransportError::UnknownRegion { .. }
            )
        });
        match errs.into_iter().nth(access.unwrap_or(0)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A connection of several TCP streams, as the progress thread sees it: the first stream's
/// `ConnIo` is the connection; this holds the others and the striped transfers in flight.
///
/// Order (see [`super::stripe`]): while a write has parts on other streams than the first
/// (`writes`), every request that must come after it (a notification, a message, a read) waits
/// in `gate`, and so does everything behind it; writes without a notification go on at once.
/// `writes` completes front to back, so a notification never passes an earlier write.
struct Group {
    /// The further streams that have joined (stream `i + 1`).
    streams: Vec<Arc<Link>>,
    /// Streams agreed, the first included.
    want: usize,
    conn_id: u64,
    /// The stream of the next uncut write.
    turn: usize,
    mode: PollMode,
    writes: VecDeque<StripeOp>,
    reads: Vec<StripeOp>,
    gate: VecDeque<(Request, Completer)>,
    /// A client's answer to `connect`, held until every stream has joined.
    reply: Option<(ConnReply, Arc<TcpConnection>)>,
}

impl Group {
    fn fenced(&self) -> bool {
        !self.writes.is_empty() || !self.gate.is_empty()
    }

    fn ready(&self) -> bool {
        self.reads.iter().any(StripeOp::is_done)
            || self.writes.front().is_some_and(StripeOp::is_done)
    }

    /// Submits `parts` of a transfer, each made by `make`, on their streams.
    fn send_parts(
        &self,
        parts: &[Part],
        make: impl Fn(&Part) -> Request,
        first: &mut Conn,
        dirty: &mut Vec<Token>,
    ) -> Vec<Op> {
        parts
            .iter()
            .map(|p| {
                let (op, c) = Op::new(self.mode, Vec::new());
                let req = make(p);
                match p.stream.checked_sub(1) {
                    None => first.submit(req, c),
                    Some(i) => match self.streams.get(i) {
                        Some(l) => {
                            l.wire.lock().conn.submit(req, c);
                            dirty.push(l.token);
                        }
                        // Not reached (parts name joined streams only); the dropped completer
                        // fails the part.
                        None => drop(c),
                    },
                }
                op
            })
            .collect()
    }

    /// Sends or holds one request (in submission order). `first` is the first stream's state
    /// machine, whose `wire` the caller holds; further streams' `wire`s are taken after it.
    fn route(&mut self, req: Request, done: Completer, first: &mut Conn, dirty: &mut Vec<Token>) {
        if !self.gate.is_empty() {
            self.gate.push_back((req, done));
            return;
        }
        let k = 1 + self.streams.len();
        let fenced = !self.writes.is_empty();
        match req {
            Request::Write {
                local,
                local_offset,
                remote,
                remote_offset,
                len,
                notify,
            } if k > 1 && (len >= STRIPE_MIN || notify.is_none()) => {
                let parts = stripe::plan(len, k, self.turn, false);
                self.turn = self.turn.wrapping_add(1);
                if let [p] = parts[..] {
                    if p.stream == 0 {
                        let req = Request::Write {
                            local,
                            local_offset,
                            remote,
                            remote_offset,
                            len,
                            notify,
                        };
                        return first.submit(req, done);
                    }
                }
                let make = |p: &Part| Request::Write {
                    local: local.clone(),
                    local_offset: local_offset + p.offset,
                    remote,
                    remote_offset: remote_offset + p.offset as u64,
                    len: p.len,
                    notify: None,
                };
                let parts = self.send_parts(&parts, make, first, dirty);
                let then = notify.map(|imm| Request::Write {
                    local,
                    local_offset: local_offset + len,
                    remote,
                    remote_offset: remote_offset + len as u64,
                    len: 0,
                    notify: Some(imm),
                });
                self.writes.push_back(StripeOp { parts, done, then });
            }
            Request::Read {
                local,
                local_offset,
                remote,
                remote_offset,
                len,
            } if k > 1 && len >= STRIPE_MIN && !fenced => {
                let parts = stripe::plan(len, k, 0, true);
                let make = |p: &Part| Request::Read {
                    local: local.clone(),
                    local_offset: local_offset + p.offset,
                    remote,
                    remote_offset: remote_offset + p.offset as u64,
                    len: p.len,
                };
                let parts = self.send_parts(&parts, make, first, dirty);
                self.reads.push(StripeOp {
                    parts,
                    done,
                    then: None,
                });
            }
            req if fenced => self.gate.push_back((req, done)),
            req => first.submit(req, done),
        }
    }

    /// Completes the striped transfers whose parts are all done (writes front to back, sending
    /// their notifications), then lets the gate through once no write is left in flight.
    fn advance(&mut self, first: &mut Conn, dirty: &mut Vec<Token>) {
        let mut i = 0;
        while i < self.reads.len() {
            if self.reads[i].is_done() {
                let op = self.reads.swap_remove(i);
                let r = op.result();
                op.done.complete(r);
            } else {
                i += 1;
            }
        }
        while self.writes.front().is_some_and(StripeOp::is_done) {
            let Some(op) = self.writes.pop_front() else {
                break;
            };
            match (op.result(), op.then) {
                (Ok(()), Some(then)) => first.submit(then, op.done),
                (r, _) => op.done.complete(r),
            }
        }
        if self.writes.is_empty() && !self.gate.is_empty() {
            for (req, done) in std::mem::take(&mut self.gate) {
                self.route(req, done, first, dirty);
            }
        }
    }

    /// Fails everything held or in flight (the connection is gone).
    fn fail(&mut self, err: &TransportError) {
        for (_, done) in self.gate.drain(..) {
            done.complete(Err(err.clone()));
        }
        for op in self.writes.drain(..).chain(self.reads.drain(..)) {
            let r = op.result().and(Err(err.clone()));
            op.done.complete(r);
        }
        if let Some((reply, _)) = self.reply.take() {
            let _ = reply.send(Err(err.clone()));
        }
    }
}

fn nonce() -> [u8; super::codec::NONCE_LEN] {
    rand::random()
}

impl ProgressThread {
    fn new(shared: Arc<Shared>, poll: Poll, listener: TcpListener) -> Self {
        Self {
            shared,
            poll,
            listener,
            conns: HashMap::new(),
            events: Vec::new(),
            handshakes: HandshakeSlots::new(MAX_HANDSHAKES),
            groups: HashMap::new(),
            by_id: HashMap::new(),
            dirty: Vec::new(),
            dying: Vec::new(),
        }
    }

    fn conn_config(&self) -> ConnConfig {
        let c = &self.shared.config;
        ConnConfig {
            endpoint: self.shared.endpoint,
            secret: c.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            peer_timeout: c.peer_timeout,
            max_message_size: c.max_message_size,
            grants: Default::default(),
            streams: c.tcp.streams,
            // Non-zero: zero in a HELLO means "a new connection".
            conn_id: rand::random::<u64>() | 1,
            joins: self.shared.joins.clone(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let busy = self.shared.config.poll_mode == PollMode::BusyPoll;
        let mut touched: Vec<Token> = Vec::new();
        // Acquire: pairs with the Release store in `TcpTransport::drop`.
        while !self.shared.shutdown.load(Ordering::Acquire) {
            let now = Instant::now();
            let timeout = if busy || self.conns.values().any(|c| c.more) {
                Some(Duration::ZERO)
            } else {
                self.conns
                    .values()
                    .filter_map(|c| c.deadline)
                    .min()
                    .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "epoll_wait failed; TCP endpoint stops");
                    break;
                }
            }
            if busy && events.is_empty() {
                // Spinning: give other threads (maybe the waiting caller) the core when idle.
                std::thread::yield_now();
            }
            let now = Instant::now();
            touched.clear();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(now, &mut touched),
                    WAKER => {}
                    t => touched.push(t),
                }
            }
            touched.extend(self.conns.iter().filter(|(_, c)| c.more).map(|(t, _)| *t));
            let cmds = self
                .shared
                .cmds
                .lock()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            let mut write_only = Vec::new();
            for cmd in cmds {
                if let Some(t) = self.command(cmd, now) {
                    write_only.push(t);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for t in &touched {
                self.service(*t, true, now);
            }
            write_only.sort_unstable();
            write_only.dedup();
            for t in write_only {
                if touched.binary_search(&t).is_err() {
                    self.service(t, false, now);
                }
            }
            let due: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
                .map(|(t, _)| *t)
                .collect();
            for t in due {
                if let Some(c) = self.conns.get(&t) {
                    c.link.wire.lock().conn.handle_timeout(now);
                }
                self.service(t, false, now);
            }
            self.settle(now);
        }
        self.stop();
    }

    /// Striped connections: completes finished transfers, writes what that and the routing
    /// queued on other streams, and removes the connections closed along the way.
    fn settle(&mut self, now: Instant) {
        if !self.groups.is_empty() {
            self.advance_groups();
        }
        while !self.dirty.is_empty() || !self.dying.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for t in dirty {
                self.service(t, false, now);
            }
            while let Some(t) = self.dying.pop() {
                self.service(t, false, now);
            }
            if !self.groups.is_empty() {
                self.advance_groups();
            }
        }
    }

    fn stop(&mut self) {
        // Refuse new commands, then fail what was queued and every open connection.
        let cmds = self.shared.cmds.lock().take().unwrap_or_default();
        drop(cmds); // dropped completers fail their operations with EndpointClosed
        let now = Instant::now();
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            if let Some(c) = self.conns.get(&t) {
                c.link
                    .wire
                    .lock()
                    .conn
                    .close(TransportError::EndpointClosed);
            }
            // Routes the Closed event, then removes the connection (its write outcome is Closed).
            self.service(t, false, now);
        }
        // Break the cycle accepted connection → endpoint.
        drop(self.shared.accepted.close());
    }

    fn insert(&mut self, token: Token, stream: TcpStream, conn: Conn, peer: SocketAddr) {
        let deadline = conn.poll_timeout();
        self.conns.insert(
            token,
            ConnIo {
                link: Link::new(token, stream, conn),
                peer,
                shared: None,
                reply: None,
                more: false,
                slot: None,
                primary: None,
                deadline,
            },
        );
    }

    fn accept_all(&mut self, now: Instant, touched: &mut Vec<Token>) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    // A peer that opens connections and never finishes a handshake holds at most
                    // MAX_HANDSHAKES of them (each for at most the peer timeout); the rest are
                    // closed before any work is done for them.
                    let Some(slot) = self.handshakes.try_take() else {
                        tracing::debug!(%peer, "too many handshakes in progress; closing");
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!(%peer, error = %e, "setsockopt(TCP_NODELAY) failed");
                    }
                    // Relaxed: as in `connect`, a unique number and nothing to publish.
                    let token = Token(self.shared.next_token.fetch_add(1, Ordering::Relaxed));
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!(%peer, error = %e, "epoll_ctl(ADD) failed; dropping connection");
                        continue;
                    }
                    let conn = Conn::server(self.conn_config(), peer, now, nonce());
                    self.insert(token, stream, conn, peer);
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.slot = Some(slot);
                    }
                    touched.push(token);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: log, and try again on the next readiness event.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Applies a command; returns the connection that now has something to send.
    fn command(&mut self, cmd: Cmd, now: Instant) -> Option<Token> {
        match cmd {
            Cmd::Adopt {
                mut stream,
                peer,
                token,
                reply,
            } => {
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    let _ = reply.send(Err(TransportError::io("epoll_ctl(ADD)", e)));
                    return None;
                }
                let conn = Conn::client(self.conn_config(), peer, now, nonce());
                self.insert(token, stream, conn, peer);
                if let Some(c) = self.conns.get_mut(&token) {
                    c.reply = Some(reply);
                }
                Some(token)
            }
            Cmd::Resume { token } => {
                // Read on the next pass: the bytes have waited in the socket, and no new
                // readiness edge will come for them.
                self.conns.get_mut(&token)?.more = true;
                // The connection's other streams feed the same queues: they may be held too.
                let streams: Vec<Token> = self
                    .groups
                    .get(&token)
                    .map(|g| g.streams.iter().map(|l| l.token).collect())
                    .unwrap_or_default();
                for t in streams {
                    if let Some(c) = self.conns.get_mut(&t) {
                        c.more = true;
                    }
                }
                None
            }
            Cmd::Service { token } => {
                // A connection already removed has closed its outbox and failed what was in it.
                let c = self.conns.get(&token)?;
                let mut w = c.link.wire.lock();
                let reqs = std::mem::take(&mut c.link.outbox.lock().reqs);
                match self.groups.get_mut(&token) {
                    Some(g) => {
                        for (req, done) in reqs {
                            g.route(req, done, &mut w.conn, &mut self.dirty);
                        }
                        c.link.outbox.lock().fenced = g.fenced();
                    }
                    None => {
                        for (req, done) in reqs {
                            w.conn.submit(req, done);
                        }
                    }
                }
                Some(token)
            }
            Cmd::Close { token } => {
                if let Some(c) = self.conns.get(&token) {
                    let peer = c.peer;
                    let mut w = c.link.wire.lock();
                    w.conn.close(TransportError::ConnectionClosed { peer });
                }
                Some(token)
            }
        }
    }

    fn service(&mut self, t: Token, read: bool, now: Instant) {
        let regions = &self.shared.regions;
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        // The user-facing queues before `wire` (lock order): what they can still take.
        let room = c
            .shared
            .as_ref()
            .map(|s| s.q.lock().room(&self.shared.config));
        let mut held_for_room = false;
        let out = {
            let mut w = c.link.wire.lock();
            let Wire { stream, conn } = &mut *w;
            let out = match stream {
                Some(s) => {
                    if let Some((m, b)) = room {
                        conn.set_inbound_room(m, b);
                    }
                    let mut rd = None;
                    if read || c.more {
                        rd = Some(conn.read_from(s, regions, now));
                    }
                    let out = conn.write_to(s, now);
                    c.more = match rd {
                        Some(ReadOutcome::MoreReady) => true,
                        // Held because the peer does not read our replies: read again once a
                        // write made room (else the next WRITABLE event brings us back).
                        Some(ReadOutcome::Held) if !conn.is_held_for_room() => {
                            conn.queued() < super::proto::MAX_QUEUED_FRAMES
                        }
                        Some(ReadOutcome::Held) => {
                            held_for_room = true;
                            false
                        }
                        _ => false,
                    };
                    out
                }
                None => WriteOutcome::Closed,
            };
            c.deadline = conn.poll_timeout();
            self.events.extend(std::iter::from_fn(|| conn.poll_event()));
            out
        };
        self.dispatch(t);
        if held_for_room {
            // Mark the queues held, unless a take made room since we looked: then read again.
            if let Some(c) = self.conns.get_mut(&t) {
                if let Some(s) = &c.shared {
                    let mut q = s.q.lock();
                    let (m, b) = q.room(&self.shared.config);
                    if m > 0 && b > 0 {
                        c.more = true;
                    } else {
                        q.held = true;
                    }
                }
            }
        }
        if out == WriteOutcome::Closed {
            self.remove(t);
        }
    }

    /// Routes the events drained into `self.events` to the user-facing side (no `wire` held).
    fn dispatch(&mut self, t: Token) {
        let endpoint = self.shared.clone();
        let Some(c) = self.conns.get_mut(&t) else {
            self.events.clear();
            return;
        };
        // What needs other connections than `c`, done after the loop.
        let mut joined = None;
        let mut first = None;
        let mut fail_primary = None;
        for ev in self.events.drain(..) {
            match ev {
                Event::Established {
                    stripe: Stripe::Joined { conn_id },
                    ..
                } => {
                    c.slot = None;
                    joined = Some(conn_id);
                }
                Event::Established {
                    peer_endpoint,
                    stripe,
                } => {
                    c.slot = None;
                    let state = Arc::new(UserQueues {
                        q: Mutex::new(Queues::default()),
                        cv: Condvar::new(),
                        alive: AtomicBool::new(true),
                    });
                    c.shared = Some(state.clone());
                    let streams = match stripe {
                        Stripe::First { streams, .. } => streams,
                        _ => 1,
                    };
                    let handle = Arc::new(TcpConnection {
                        endpoint: endpoint.clone(),
                        link: c.link.clone(),
                        peer_addr: c.peer,
                        peer_endpoint,
                        state,
                        streams,
                    });
                    if let Stripe::First { conn_id, streams } = stripe {
                        // A client answers `connect` once the other streams have joined.
                        let reply = c.reply.take().map(|r| (r, handle.clone()));
                        let server = reply.is_none();
                        first = Some((conn_id, streams, reply));
                        if !server {
                            continue;
                        }
                    }
                    match c.reply.take() {
                        Some(reply) => {
                            // If `connect` gave up waiting, dropping the handle closes the connection.
                            let _ = reply.send(Ok(handle));
                        }
                        None => {
                            if let Some(h) = endpoint.accepted.push(Ok(handle)) {
                                tracing::warn!(peer = %h.peer_addr, "accept queue full; closing");
                                h.close();
                            }
                        }
                    }
                }
                Event::Message(m) => {
                    if let Some(s) = &c.shared {
                        s.push(|q| {
                            q.bytes += m.len();
                            q.msgs.push_back(m);
                        });
                    }
                }
                Event::Notification(n) => {
                    if let Some(s) = &c.shared {
                        s.push(|q| q.notifs.push_back(n));
                    }
                }
                Event::Closed(err) if c.primary.is_some() => {
                    // A further stream failed: its connection fails with the same error.
                    fail_primary = c.primary.map(|p| (p, err));
                }
                Event::Closed(err) => {
                    if let Some(s) = &c.shared {
                        // Release: pairs with `is_alive`'s Acquire; the error itself travels
                        // under the queue lock just below.
                        s.alive.store(false, Ordering::Release);
                        s.push(|q| {
                            q.closed.get_or_insert(err);
                        });
                    } else if let Some(reply) = c.reply.take() {
                        let _ = reply.send(Err(err));
                    } else {
                        tracing::info!(peer = %c.peer, error = %err, "incoming connection refused");
                        endpoint.accepted.push(Err(err));
                    }
                }
            }
        }
        if let Some((conn_id, streams, reply)) = first {
            self.start_group(t, conn_id, streams, reply);
        }
        if let Some(conn_id) = joined {
            self.join(t, conn_id);
        }
        if let Some((p, err)) = fail_primary {
            self.close_with(p, err);
        }
    }

    /// Closes a connection outside its own service pass (routed and removed this iteration).
    fn close_with(&mut self, t: Token, err: TransportError) {
        if let Some(c) = self.conns.get(&t) {
            c.link.wire.lock().conn.close(err);
            self.dying.push(t);
        }
    }

    /// The first stream of a striped connection is established: a client opens the others.
    fn start_group(
        &mut self,
        t: Token,
        conn_id: u64,
        streams: usize,
        reply: Option<(ConnReply, Arc<TcpConnection>)>,
    ) {
        let client = reply.is_some();
        self.by_id.insert(conn_id, t);
        self.groups.insert(
            t,
            Group {
                streams: Vec::new(),
                want: streams,
                conn_id,
                turn: 0,
                mode: self.shared.config.poll_mode,
                writes: VecDeque::new(),
                reads: Vec::new(),
                gate: VecDeque::new(),
                reply,
            },
        );
        if client {
            for _ in 1..streams {
                if let Err(e) = self.open_stream(t, conn_id) {
                    return self.close_with(t, e);
                }
            }
        }
    }

    /// Opens a client's further stream of the connection whose first stream is `p`.
    fn open_stream(&mut self, p: Token, conn_id: u64) -> Result<()> {
        let Some(pc) = self.conns.get(&p) else {
            return Ok(());
        };
        let (peer, grants) = (pc.peer, pc.link.grants.clone());
        let mut stream = TcpStream::connect(peer).map_err(|e| TransportError::io("connect", e))?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%peer, error = %e, "setsockopt(TCP_NODELAY) failed");
        }
        // Relaxed: as in `connect`.
        let token = Token(self.shared.next_token.fetch_add(1, Ordering::Relaxed));
        self.poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| TransportError::io("epoll_ctl(ADD)", e))?;
        let cfg = ConnConfig {
            grants,
            ..self.conn_config()
        };
        let conn = Conn::client_join(cfg, peer, Instant::now(), nonce(), conn_id);
        self.insert(token, stream, conn, peer);
        if let Some(c) = self.conns.get_mut(&token) {
            c.primary = Some(p);
        }
        self.dirty.push(token);
        Ok(())
    }

    /// A further stream `t` of connection `conn_id` is established: it joins its group (a
    /// client's answer to `connect` goes out once all have).
    fn join(&mut self, t: Token, conn_id: u64) {
        let p = self
            .conns
            .get(&t)
            .and_then(|c| c.primary)
            .or_else(|| self.by_id.get(&conn_id).copied());
        let shared = p
            .and_then(|p| self.conns.get(&p))
            .and_then(|pc| pc.shared.clone());
        let (Some(p), Some(shared), Some(c)) = (p, shared, self.conns.get_mut(&t)) else {
            // The connection closed meanwhile.
            let err = TransportError::StreamRefused {
                peer: self.conns.get(&t).map(|c| c.peer),
                reason: "the connection closed".into(),
            };
            return self.close_with(t, err);
        };
        c.primary = Some(p);
        c.shared = Some(shared);
        let link = c.link.clone();
        if let Some(g) = self.groups.get_mut(&p) {
            g.streams.push(link);
            if g.streams.len() + 1 >= g.want {
                if let Some((reply, handle)) = g.reply.take() {
                    let _ = reply.send(Ok(handle));
                }
            }
        }
    }

    /// Moves the striped connections' finished transfers on (see [`Group::advance`]).
    fn advance_groups(&mut self) {
        for (t, g) in self.groups.iter_mut() {
            if !g.ready() {
                continue;
            }
            let Some(c) = self.conns.get(t) else {
                continue;
            };
            let mut w = c.link.wire.lock();
            g.advance(&mut w.conn, &mut self.dirty);
            c.link.outbox.lock().fenced = g.fenced();
            self.dirty.push(*t);
        }
    }

    /// Drops a finished connection: closes the socket, and closes the outbox (failing what waits
    /// there) so that handles still held fail later requests at once.
    fn remove(&mut self, t: Token) {
        let Some(c) = self.conns.remove(&t) else {
            return;
        };
        let (err, reqs) = {
            let mut w = c.link.wire.lock();
            if let Some(mut s) = w.stream.take() {
                if let Err(e) = self.poll.registry().deregister(&mut s) {
                    tracing::debug!(error = %e, "epoll_ctl(DEL) failed");
                }
            }
            let err = w
                .conn
                .error()
                .cloned()
                .unwrap_or(TransportError::ConnectionClosed { peer: c.peer });
            let mut outbox = c.link.outbox.lock();
            outbox.closed = Some(err.clone());
            (err, std::mem::take(&mut outbox.reqs))
        };
        for (_, done) in reqs {
            done.complete(Err(err.clone()));
        }
        // A connection of several streams fails as a whole, with the first error.
        if let Some(p) = c.primary {
            self.close_with(p, err.clone());
        }
        if let Some(mut g) = self.groups.remove(&t) {
            self.by_id.remove(&g.conn_id);
            g.fail(&err);
            let streams: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, s)| s.primary == Some(t))
                .map(|(s, _)| *s)
                .collect();
            for s in streams {
                self.close_with(s, err.clone());
            }
        }
    }
}
