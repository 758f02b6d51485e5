//! The TCP endpoint: a progress thread on a mio event loop driving [`Conn`] state machines.
//!
//! Callers never touch sockets. They push commands (adopt a connected socket, submit a request,
//! close) onto a queue and wake the thread with a [`mio::Waker`] (in [`PollMode::BusyPoll`] the
//! thread spins on `poll` with a zero timeout and needs no wake-up). The thread moves bytes between
//! the sockets and the state machines and routes their events to the user-facing handles: the
//! accept queue, each connection's message and notification queues, and the operations'
//! completions.
//!
//! Sockets are edge-triggered (mio): after each readiness event the thread reads until
//! `WouldBlock` (or a per-connection budget, after which it polls again without sleeping) and
//! writes until the queue is empty or `WouldBlock`.

use super::proto::{Conn, ConnConfig, Event, ReadOutcome, Request, WriteOutcome};
use crate::completion::{Batch, BatchBuilder, Op};
use crate::config::{Backend, PollMode, TransportConfig};
use crate::error::{Result, TransportError};
use crate::region::{EndpointId, Region, RegionTable};
use crate::{Connection, Transfer, TransferKind, Transport};
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

type ConnReply = mpsc::SyncSender<Result<Arc<TcpConnection>>>;

enum Cmd {
    Adopt {
        stream: TcpStream,
        peer: SocketAddr,
        token: Token,
        reply: ConnReply,
    },
    Submit {
        token: Token,
        peer: SocketAddr,
        req: Request,
        done: crate::completion::Completer,
    },
    Close {
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
    accepted: Mutex<VecDeque<Result<Arc<TcpConnection>>>>,
    accepted_cv: Condvar,
    shutdown: AtomicBool,
    next_token: AtomicUsize,
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
        if config.tcp_streams != 1 {
            return Err(TransportError::InvalidArgument(format!(
                "tcp_streams = {}: the TCP backend uses exactly one stream per connection",
                config.tcp_streams
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
            accepted: Mutex::new(VecDeque::new()),
            accepted_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            next_token: AtomicUsize::new(2),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("genie-tcp-{}", local_addr.port()))
            .spawn(move || Progress::new(s, poll, listener).run())
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
        self.shared.shutdown.store(true, Ordering::SeqCst);
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

    fn alloc_region(&self, len: usize) -> Result<Region> {
        self.shared.regions.alloc(len)
    }

    fn register(&self, buf: Vec<u8>) -> Result<Region> {
        Ok(self.shared.regions.register(buf))
    }

    fn connect(&self, addr: SocketAddr) -> Result<Arc<dyn Connection>> {
        let timeout = self.shared.config.peer_timeout;
        let std = std::net::TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| TransportError::io("connect", e))?;
        std.set_nodelay(true)
            .map_err(|e| TransportError::io("setsockopt(TCP_NODELAY)", e))?;
        std.set_nonblocking(true)
            .map_err(|e| TransportError::io("fcntl(O_NONBLOCK)", e))?;
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
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.accepted.lock();
        loop {
            if let Some(r) = q.pop_front() {
                return r.map(|c| c as Arc<dyn Connection>);
            }
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Err(TransportError::EndpointClosed);
            }
            if self
                .shared
                .accepted_cv
                .wait_until(&mut q, deadline)
                .timed_out()
            {
                return q
                    .pop_front()
                    .unwrap_or(Err(TransportError::Timeout { after: timeout }))
                    .map(|c| c as Arc<dyn Connection>);
            }
        }
    }
}

#[derive(Default)]
struct Queues {
    msgs: VecDeque<Vec<u8>>,
    notifs: VecDeque<u32>,
    closed: Option<TransportError>,
}

struct ConnShared {
    q: Mutex<Queues>,
    cv: Condvar,
    alive: AtomicBool,
}

impl ConnShared {
    fn push(&self, f: impl FnOnce(&mut Queues)) {
        let mut q = self.q.lock();
        f(&mut q);
        self.cv.notify_all();
    }
}

/// A connection of a [`TcpTransport`]. Dropping the last handle closes it.
pub struct TcpConnection {
    endpoint: Arc<Shared>,
    token: Token,
    peer_addr: SocketAddr,
    peer_endpoint: EndpointId,
    state: Arc<ConnShared>,
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
        if self.state.alive.swap(false, Ordering::SeqCst) {
            // The endpoint may already be gone; then the socket is closed anyway.
            let _ = self.endpoint.push([Cmd::Close { token: self.token }]);
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
        self.endpoint.push([Cmd::Submit {
            token: self.token,
            peer: self.peer_addr,
            req,
            done,
        }])?;
        Ok(op)
    }

    fn wait_queue<T>(
        &self,
        timeout: Duration,
        take: impl Fn(&mut Queues) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut q = self.state.q.lock();
        loop {
            if let Some(v) = take(&mut q) {
                return Ok(v);
            }
            if let Some(e) = &q.closed {
                return Err(e.clone());
            }
            if self.state.cv.wait_until(&mut q, deadline).timed_out() {
                return take(&mut q).ok_or(TransportError::Timeout { after: timeout });
            }
        }
    }

    fn try_queue<T>(&self, take: impl Fn(&mut Queues) -> Option<T>) -> Result<Option<T>> {
        let mut q = self.state.q.lock();
        match take(&mut q) {
            Some(v) => Ok(Some(v)),
            None => match &q.closed {
                Some(e) => Err(e.clone()),
                None => Ok(None),
            },
        }
    }
}

impl Connection for TcpConnection {
    fn backend(&self) -> Backend {
        Backend::Tcp
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
        self.wait_queue(timeout, |q| q.msgs.pop_front())
    }

    fn try_recv(&self) -> Result<Option<Vec<u8>>> {
        self.try_queue(|q| q.msgs.pop_front())
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
        let mut cmds = Vec::with_capacity(transfers.len());
        for t in transfers {
            match self.request(t) {
                Ok(req) => cmds.push(Cmd::Submit {
                    token: self.token,
                    peer: self.peer_addr,
                    req,
                    done: b.op(Vec::new()),
                }),
                Err(e) => b.failed(e),
            }
        }
        self.endpoint.push(cmds)?;
        Ok(b.build())
    }

    fn is_alive(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst)
    }

    fn close(&self) {
        if self.state.alive.swap(false, Ordering::SeqCst) {
            self.state.push(|q| {
                q.closed.get_or_insert(TransportError::ConnectionClosed {
                    peer: self.peer_addr,
                });
            });
            let _ = self.endpoint.push([Cmd::Close { token: self.token }]);
        }
    }
}

/// One socket and its protocol state, owned by the progress thread.
struct ConnIo {
    stream: TcpStream,
    conn: Conn,
    peer: SocketAddr,
    /// The user-facing queues, once established.
    shared: Option<Arc<ConnShared>>,
    /// A `connect` call waiting for the handshake.
    reply: Option<ConnReply>,
    /// Bytes may still be waiting (the read budget ran out).
    more: bool,
}

struct Progress {
    shared: Arc<Shared>,
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, ConnIo>,
}

fn nonce() -> [u8; super::codec::NONCE_LEN] {
    rand::random()
}

impl Progress {
    fn new(shared: Arc<Shared>, poll: Poll, listener: TcpListener) -> Self {
        Self {
            shared,
            poll,
            listener,
            conns: HashMap::new(),
        }
    }

    fn conn_config(&self) -> ConnConfig {
        let c = &self.shared.config;
        ConnConfig {
            endpoint: self.shared.endpoint,
            secret: c.secret.as_ref().map(|s| s.as_bytes().to_vec()),
            peer_timeout: c.peer_timeout,
            max_message_size: c.max_message_size,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let busy = self.shared.config.poll_mode == PollMode::BusyPoll;
        let mut touched: Vec<Token> = Vec::new();
        while !self.shared.shutdown.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = if busy || self.conns.values().any(|c| c.more) {
                Some(Duration::ZERO)
            } else {
                self.conns
                    .values()
                    .filter_map(|c| c.conn.poll_timeout())
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
                .filter(|(_, c)| c.conn.poll_timeout().is_some_and(|d| d <= now))
                .map(|(t, _)| *t)
                .collect();
            for t in due {
                if let Some(c) = self.conns.get_mut(&t) {
                    c.conn.handle_timeout(now);
                }
                self.service(t, false, now);
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        // Refuse new commands, then fail what was queued and every open connection.
        let cmds = self.shared.cmds.lock().take().unwrap_or_default();
        drop(cmds); // dropped completers fail their operations with EndpointClosed
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            if let Some(c) = self.conns.get_mut(&t) {
                c.conn.close(TransportError::EndpointClosed);
            }
            self.dispatch(t);
            self.remove(t);
        }
        // Break the cycle accepted connection → endpoint.
        let accepted = std::mem::take(&mut *self.shared.accepted.lock());
        drop(accepted);
        self.shared.accepted_cv.notify_all();
    }

    fn accept_all(&mut self, now: Instant, touched: &mut Vec<Token>) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!(%peer, error = %e, "setsockopt(TCP_NODELAY) failed");
                    }
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
                    self.conns.insert(
                        token,
                        ConnIo {
                            stream,
                            conn,
                            peer,
                            shared: None,
                            reply: None,
                            more: false,
                        },
                    );
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
                self.conns.insert(
                    token,
                    ConnIo {
                        stream,
                        conn,
                        peer,
                        shared: None,
                        reply: Some(reply),
                        more: false,
                    },
                );
                Some(token)
            }
            Cmd::Submit {
                token,
                peer,
                req,
                done,
            } => match self.conns.get_mut(&token) {
                Some(c) => {
                    c.conn.submit(req, done);
                    Some(token)
                }
                None => {
                    // Already closed and removed: its error was recorded in the user's queues.
                    drop(req);
                    done.complete(Err(TransportError::ConnectionClosed { peer }));
                    None
                }
            },
            Cmd::Close { token } => {
                if let Some(c) = self.conns.get_mut(&token) {
                    let peer = c.peer;
                    c.conn.close(TransportError::ConnectionClosed { peer });
                }
                Some(token)
            }
        }
    }

    fn service(&mut self, t: Token, read: bool, now: Instant) {
        let regions = self.shared.regions.clone();
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        if read || c.more {
            c.more = c.conn.read_from(&mut c.stream, &regions, now) == ReadOutcome::MoreReady;
        }
        let out = c.conn.write_to(&mut c.stream, now);
        self.dispatch(t);
        if out == WriteOutcome::Closed {
            self.remove(t);
        }
    }

    /// Routes a connection's events to the user-facing side.
    fn dispatch(&mut self, t: Token) {
        let endpoint = self.shared.clone();
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        while let Some(ev) = c.conn.poll_event() {
            match ev {
                Event::Established { peer_endpoint } => {
                    let state = Arc::new(ConnShared {
                        q: Mutex::new(Queues::default()),
                        cv: Condvar::new(),
                        alive: AtomicBool::new(true),
                    });
                    c.shared = Some(state.clone());
                    let handle = Arc::new(TcpConnection {
                        endpoint: endpoint.clone(),
                        token: t,
                        peer_addr: c.peer,
                        peer_endpoint,
                        state,
                    });
                    match c.reply.take() {
                        Some(reply) => {
                            // If `connect` gave up waiting, dropping the handle closes the connection.
                            let _ = reply.send(Ok(handle));
                        }
                        None => {
                            endpoint.accepted.lock().push_back(Ok(handle));
                            endpoint.accepted_cv.notify_all();
                        }
                    }
                }
                Event::Message(m) => {
                    if let Some(s) = &c.shared {
                        s.push(|q| q.msgs.push_back(m));
                    }
                }
                Event::Notification(n) => {
                    if let Some(s) = &c.shared {
                        s.push(|q| q.notifs.push_back(n));
                    }
                }
                Event::Closed(err) => {
                    if let Some(s) = &c.shared {
                        s.alive.store(false, Ordering::SeqCst);
                        s.push(|q| {
                            q.closed.get_or_insert(err);
                        });
                    } else if let Some(reply) = c.reply.take() {
                        let _ = reply.send(Err(err));
                    } else {
                        tracing::info!(peer = %c.peer, error = %err, "incoming connection refused");
                        endpoint.accepted.lock().push_back(Err(err));
                        endpoint.accepted_cv.notify_all();
                    }
                }
            }
        }
    }

    fn remove(&mut self, t: Token) {
        if let Some(mut c) = self.conns.remove(&t) {
            if let Err(e) = self.poll.registry().deregister(&mut c.stream) {
                tracing::debug!(error = %e, "epoll_ctl(DEL) failed");
            }
        }
    }
}
