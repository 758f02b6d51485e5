//! The endpoint's poller: one thread and one mio [`Poll`] for the completion channels and side
//! channels of all of the endpoint's connections (no threads per connection).
//!
//! Each connection registers two sources: its CQ's completion channel fd (readable once the armed
//! CQ got a completion) and its side-channel socket (non-blocking, edge-triggered, read until
//! `WouldBlock`), and one more per further lane ([`crate::config::RdmaConfig::qps`] > 1): that
//! lane's CQ channel, always served by the poller when it fires. On a completion event the poller acknowledges the channel's events, polls the CQ
//! (at most [`CQ_BUDGET`] batches per turn, so that one busy connection cannot starve the others),
//! re-arms it and polls once more (a completion may have come before arming). On a side-channel
//! event it reads and handles the frames ([`super::proto::SideChannel`]) and flushes what writers
//! could not send at once. Timers (heartbeats, the dead-peer bound) come from each connection's
//! side-channel state, with the time read here and passed in.
//!
//! Busy-poll mode: user threads waiting on an operation poll the CQ themselves. While they do
//! (their drive counter moves), the poller leaves that CQ unarmed and unpolled and only looks
//! again after a grace period that doubles up to [`DRIVER_GRACE_MAX`]; once a look finds no drive
//! since the last one, it takes over (polls and arms the channel). So a user that drives never
//! has the poller competing with it for the CQ or the CPU, and completions nobody polls (and the
//! credits their receives return) are still handled soon after the user stops.
//!
//! A connection leaves the poller once it is dead ([`RdmaConn::die`] wakes the poller): its sources
//! are deregistered while their fds are still open (the poller holds the connection), then the
//! poller drops its reference.

use super::conn::{CqNext, RdmaConn};
use super::proto::SideChannel;
use super::wire::FrameReader;
use crate::error::{Result, TransportError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Batches of completions (up to 32 each) one connection's CQ gets per turn of the poller.
pub(crate) const CQ_BUDGET: usize = 16;
/// Busy-poll mode: the first grace period the poller leaves a driven CQ alone (see the module doc).
const DRIVER_GRACE: Duration = Duration::from_millis(1);
/// The longest grace period: on soft-RoCE a wake-up per millisecond cost about 2 us of an 8-byte
/// write's 23 us ping-pong latency, because the woken thread preempts a spinning one.
const DRIVER_GRACE_MAX: Duration = Duration::from_millis(16);
/// Side-channel bytes read per connection and turn, after which the poller comes back to it
/// without sleeping.
const SIDE_BUDGET: usize = 256 << 10;

const WAKER: Token = Token(0);

/// Commands to the poller thread.
enum Cmd {
    /// Watch a new connection; `reader` holds side-channel bytes read past the handshake.
    Add(Arc<RdmaConn>, FrameReader),
    /// A connection died: drop it.
    Dead(usize),
}

struct Shared {
    /// `None` once the poller has stopped: then nothing may be queued (a queued connection would
    /// keep its endpoint, and so the poller's handle, alive).
    cmds: Mutex<Option<Vec<Cmd>>>,
    waker: Waker,
    stop: AtomicBool,
    next_id: AtomicUsize,
}

/// The handle the endpoint and its connections hold.
pub(crate) struct Poller {
    shared: Arc<Shared>,
}

impl Poller {
    /// Starts the poller thread.
    pub(crate) fn start() -> Result<(Self, JoinHandle<()>)> {
        let poll =
            Poll::new().map_err(|e| TransportError::io("epoll_create (mio::Poll::new)", e))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| TransportError::io("eventfd (mio::Waker)", e))?;
        let shared = Arc::new(Shared {
            cmds: Mutex::new(Some(Vec::new())),
            waker,
            stop: AtomicBool::new(false),
            next_id: AtomicUsize::new(1),
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("genie-rdma-poll".into())
            .spawn(move || Loop::new(s2, poll).run())
            .map_err(|e| TransportError::io("spawn", e))?;
        Ok((Self { shared }, thread))
    }

    /// An id for a new connection (its tokens are `2 id` and `2 id + 1`).
    pub(crate) fn next_id(&self) -> usize {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues `cmd`; gives it back if the poller has stopped.
    fn command(&self, cmd: Cmd) -> Option<Cmd> {
        match self.shared.cmds.lock().as_mut() {
            Some(q) => q.push(cmd),
            None => return Some(cmd),
        }
        if let Err(e) = self.shared.waker.wake() {
            tracing::error!(error = %e, "could not wake the rdma poller");
        }
        None
    }

    /// Watches `conn` from now on (or fails it, if the endpoint is closing).
    pub(crate) fn add(&self, conn: Arc<RdmaConn>, reader: FrameReader) {
        if let Some(Cmd::Add(conn, _)) = self.command(Cmd::Add(conn, reader)) {
            conn.die(TransportError::EndpointClosed);
        }
    }

    /// The connection `id` died: the poller drops it.
    pub(crate) fn dead(&self, id: usize) {
        let _ = self.command(Cmd::Dead(id));
    }

    /// Stops the thread (joined by the caller); connections still watched are dropped by it.
    pub(crate) fn stop(&self) {
        // Release: pairs with the Acquire load in `Loop::run`, after the connections were killed.
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
    }
}

/// What the poller keeps per connection.
struct Watched {
    conn: Arc<RdmaConn>,
    side: SideChannel,
    reader: FrameReader,
    /// Busy-poll mode: the driver count at the last look.
    seen_drives: u64,
    grace: Duration,
    /// Busy-poll mode: look at the CQ again at this time (it is not armed meanwhile).
    recheck: Option<Instant>,
    /// The CQ or the side channel has more to do (a budget ran out): serve it again at once.
    more_cq: bool,
    more_side: bool,
    /// Bit `i`: further lane `i`'s CQ has something (see [`RdmaConn::serve_lane`]).
    more_lanes: u16,
}

/// Tokens: a connection's id times [`TOKENS`], plus [`T_CQ`], [`T_SIDE`], or [`T_LANE`] + the
/// index of a further lane.
const TOKENS: usize = 16;
const T_CQ: usize = 0;
const T_SIDE: usize = 1;
const T_LANE: usize = 2;

struct Loop {
    shared: Arc<Shared>,
    poll: Poll,
    conns: HashMap<usize, Watched>,
}

impl Loop {
    fn new(shared: Arc<Shared>, poll: Poll) -> Self {
        Self {
            shared,
            poll,
            conns: HashMap::new(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        // Acquire: pairs with the Release store in `Poller::stop`.
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let timeout = if self
                .conns
                .values()
                .any(|w| w.more_cq || w.more_side || w.more_lanes != 0)
            {
                Some(Duration::ZERO)
            } else {
                self.conns
                    .values()
                    .map(|w| match w.recheck {
                        Some(r) => r.min(w.side.poll_timeout()),
                        None => w.side.poll_timeout(),
                    })
                    .min()
                    .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "epoll_wait failed; the rdma poller stops");
                    break;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                let Token(t) = ev.token();
                if t == WAKER.0 {
                    continue;
                }
                let Some(w) = self.conns.get_mut(&(t / TOKENS)) else {
                    continue;
                };
                let k = t % TOKENS;
                if k >= T_LANE {
                    w.more_lanes |= 1 << (k - T_LANE);
                } else if k == T_CQ {
                    w.more_cq = true;
                } else {
                    if ev.is_writable() {
                        w.conn.flush_side();
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        w.more_side = true;
                    }
                }
            }
            let cmds = self
                .shared
                .cmds
                .lock()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            for cmd in cmds {
                match cmd {
                    Cmd::Add(conn, reader) => self.add(conn, reader, now),
                    Cmd::Dead(id) => self.remove(id),
                }
            }
            let mut dead = Vec::new();
            for (&id, w) in self.conns.iter_mut() {
                if w.more_side {
                    w.more_side = false;
                    w.more_side =
                        w.conn
                            .side_readable(&mut w.side, &mut w.reader, SIDE_BUDGET, now);
                }
                if w.more_cq || w.recheck.is_some_and(|r| r <= now) {
                    w.more_cq = false;
                    w.recheck = None;
                    service_cq(w, now);
                }
                let lanes = std::mem::take(&mut w.more_lanes);
                for i in (0..TOKENS - T_LANE).filter(|i| lanes & (1 << i) != 0) {
                    if let CqNext::More = w.conn.serve_lane(i, CQ_BUDGET) {
                        w.more_lanes |= 1 << i;
                    }
                }
                if w.side.poll_timeout() <= now {
                    // Read first: after a stall of this thread the peer's heartbeats may wait in
                    // the socket with their event not in this batch, and must count before the
                    // dead-peer bound is checked.
                    w.more_side =
                        w.conn
                            .side_readable(&mut w.side, &mut w.reader, SIDE_BUDGET, now);
                    w.conn.side_timeout(&mut w.side, now);
                }
                if !w.conn.is_alive() {
                    dead.push(id);
                }
            }
            for id in dead {
                self.remove(id);
            }
        }
        // The endpoint is closing: refuse new connections, drop those queued and watched (failing
        // any still alive).
        let cmds = self.shared.cmds.lock().take().unwrap_or_default();
        for cmd in cmds {
            if let Cmd::Add(conn, _) = cmd {
                conn.die(TransportError::EndpointClosed);
            }
        }
        for id in self.conns.keys().copied().collect::<Vec<_>>() {
            self.remove(id);
        }
    }

    fn add(&mut self, conn: Arc<RdmaConn>, reader: FrameReader, now: Instant) {
        let id = conn.poll_id();
        let reg = self.poll.registry();
        let cq = conn.cq_fd().map(|fd| {
            reg.register(
                &mut SourceFd(&fd),
                Token(id * TOKENS + T_CQ),
                Interest::READABLE,
            )
        });
        let side_fd = conn.side_fd();
        let side = reg.register(
            &mut SourceFd(&side_fd),
            Token(id * TOKENS + T_SIDE),
            Interest::READABLE | Interest::WRITABLE,
        );
        let mut failed = match (cq, side) {
            (Some(Err(e)), _) | (_, Err(e)) => Some(e),
            (None, _) => Some(std::io::Error::other("the CQ has no completion channel")),
            _ => None,
        };
        for (i, fd) in conn.lane_fds().into_iter().enumerate() {
            let r = match fd {
                Some(fd) => reg.register(
                    &mut SourceFd(&fd),
                    Token(id * TOKENS + T_LANE + i),
                    Interest::READABLE,
                ),
                None => Err(std::io::Error::other(
                    "a lane's CQ has no completion channel",
                )),
            };
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            conn.die(TransportError::io("epoll_ctl (mio::Registry::register)", e));
        }
        let mut w = Watched {
            side: SideChannel::new(conn.peer_timeout(), now),
            conn,
            reader,
            seen_drives: 0,
            grace: DRIVER_GRACE,
            recheck: None,
            // Serve both at once: bytes may have come with the handshake, and the CQ is not armed.
            more_cq: true,
            more_side: true,
            more_lanes: u16::MAX >> (16 - (TOKENS - T_LANE)),
        };
        w.seen_drives = w.conn.drives();
        self.conns.insert(id, w);
    }

    fn remove(&mut self, id: usize) {
        let Some(w) = self.conns.remove(&id) else {
            return;
        };
        // The fds are still open (we hold the connection): deregistering cannot hit a reused fd.
        let reg = self.poll.registry();
        if let Some(fd) = w.conn.cq_fd() {
            let _ = reg.deregister(&mut SourceFd(&fd));
        }
        let _ = reg.deregister(&mut SourceFd(&w.conn.side_fd()));
        for fd in w.conn.lane_fds().into_iter().flatten() {
            let _ = reg.deregister(&mut SourceFd(&fd));
        }
        if w.conn.is_alive() {
            w.conn.die(TransportError::EndpointClosed);
        }
    }
}

/// Serves one connection's CQ: in busy-poll mode, stays away while users drive it (see the
/// module doc); otherwise polls, arms and polls again.
fn service_cq(w: &mut Watched, now: Instant) {
    let busy = w.conn.busy_poll();
    if busy {
        let d = w.conn.drives();
        if d != w.seen_drives {
            w.seen_drives = d;
            w.recheck = Some(now + w.grace);
            w.grace = (w.grace * 2).min(DRIVER_GRACE_MAX);
            return;
        }
        w.grace = DRIVER_GRACE;
    }
    match w.conn.serve_cq(CQ_BUDGET, busy.then_some(w.seen_drives)) {
        CqNext::Armed | CqNext::Dead => {}
        CqNext::More => w.more_cq = true,
        CqNext::Driven => {
            // Users started driving meanwhile: look again after the grace period.
            w.seen_drives = w.conn.drives();
            w.recheck = Some(now + w.grace);
        }
    }
}
