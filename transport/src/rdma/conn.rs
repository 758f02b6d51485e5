//! One RDMA connection: set-up, posting with selective signalling and back-pressure, CQ polling,
//! and the side channel's bytes. What a peer may do (credits, segments, region checks, liveness)
//! is decided in [`super::proto`]; the endpoint's [`super::poller`] calls in here when the
//! connection's completion channel or side channel has something; this file posts, polls and
//! moves frames.

use super::handshake::{Action, Agreed, Handshake, HandshakeError, LaneAgreed};
use super::proto::{
    self, remote_range, Incoming, PeerRegion, Queries, Reassembly, RecvCredits, RegionCache,
    SendCredits, SideChannel, Violation,
};
use super::wire::{
    write_frame, Frame, FrameReader, LaneKeys, QpInfo, ACCESS_READ, ACCESS_WRITE, MAX_LANES,
    SEG_HEADER,
};
use super::{Endpoint, Regs};
use crate::auth::Role;
use crate::codec::DecodeError;
use crate::completion::{joint, Batch, BatchBuilder, Completer, DriveHook, Op, OpPool};
use crate::config::{Backend, PollMode};
use crate::error::{Result, TransportError};
use crate::inbound::InboundQueue;
use crate::liveness::Timer;
use crate::region::{EndpointId, Region, RegionAccess, RemoteRegion};
use crate::tcp::stripe::{self, STRIPE_MIN};
use crate::{Connection, Transfer, TransferKind};
use genie_sys::addressing::{choose_local, LocalAddress};
use genie_sys::clock::SpinDeadline;
use genie_sys::mem::SharedBuf;
use genie_sys::verbs::describe;
use genie_sys::verbs::{
    gid_of_ip, Completion, CompletionQueue, Local as Sge, MemoryWindow, Mr, PathParams, QpCaps,
    QpEndpoint, QueuePair, RemoteAccess, Rts, SendOp, VerbsError, WcError, WcOpcode,
};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receive buffers pre-posted per connection (the peer's send credits).
/// CQ batches [`RdmaConn::drain_cq`] polls at most when the peer closes: more than a full receive
/// queue's worth of completions.
const DRAIN_BATCHES: usize = 64;

const RECV_DEPTH: u32 = 32;
/// Send queue depth (outstanding work requests).
const SQ_DEPTH: u32 = 128;
/// Requested inline limit.
const MAX_INLINE: u32 = 64;
/// Send staging slots (payloads of sends too large to go inline).
const SEND_SLOTS: usize = 16;
/// Largest single work request of a transfer (larger ones are split).
const MAX_CHUNK: usize = 16 << 20;
/// Bit of a work request id that marks a receive.
const RECV_BIT: u64 = 1 << 63;
/// Payload of one receive buffer (a segment; less when `max_message_size` is smaller):
/// `max_message_size` bounds messages, not receive buffers. A message larger than the peer's
/// segment goes as several SENDs, each one segment with a [`SEG_HEADER`]-byte header (more follows
/// / last), each consuming one credit; RC delivers them in order and the receiver reassembles the
/// message (up to its `max_message_size`). Receive memory per connection: `RECV_DEPTH` × (64 KiB
/// + 1) ≈ 2 MiB, whatever `max_message_size` is.
const SEGMENT: usize = 64 << 10;
/// Side-channel bytes queued for a peer that does not read them, past which it loses the
/// connection (frames are small and few: credits, region checks and answers, heartbeats).
const MAX_SIDE_BACKLOG: usize = 1 << 20;

/// What the poller does next with a connection's CQ (see [`RdmaConn::serve_cq`]).
pub(crate) enum CqNext {
    /// Drained and armed: the completion channel fires on the next completion.
    Armed,
    /// The budget ran out (or a completion came while arming): serve it again at once.
    More,
    /// Busy-poll mode: users drove the CQ meanwhile; it is left unarmed to them.
    Driven,
    /// The connection failed.
    Dead,
}

/// Writes what the non-blocking socket `s` takes now; returns how much (less than `buf` on
/// `WouldBlock`).
fn write_some(mut s: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    while let Some(rest) = buf.get(off..).filter(|r| !r.is_empty()) {
        match s.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

fn io_err(call: &'static str) -> impl Fn(io::Error) -> TransportError {
    move |e| TransportError::io(call, e)
}

fn verbs_io(call: &'static str, e: VerbsError) -> TransportError {
    TransportError::io(call, io::Error::other(describe(&e)))
}

/// State of CQ polling (see `RdmaConn::progress`).
struct CqPoll {
    wcs: Vec<Completion>,
    /// The message being reassembled from its segments.
    reasm: Reassembly,
    /// Operations a completion finished, completed once the state lock is released (kept to
    /// reuse its allocation).
    done: Vec<Completer>,
}

/// Who learns the outcome of a posted work request.
enum Owner {
    /// Nobody: a chunk before an operation's last one (its failure fails the connection, and so
    /// the operation), or a request whose owner already got its error.
    Chunk,
    /// The operation this request completes (the last request of a transfer or message).
    Op(Completer),
    /// The request of a [`RdmaConn::submit_fast`] whose submitter is still reaping and has made
    /// no operation yet: if it fails, its error goes to [`State::reaped_error`].
    Submitter,
}

/// A posted work request not yet known to be complete.
struct Pending {
    seq: u64,
    owner: Owner,
    remote_region: u64,
}

struct State {
    qp: Option<QueuePair<Rts>>,
    /// Peer regions already checked with the peer (under this lock, which every post takes
    /// anyway, rather than one of its own).
    cache: RegionCache,
    next_seq: u64,
    pending: VecDeque<Pending>,
    since_signal: u32,
    credits: SendCredits,
    /// Highest sequence number known complete (successfully).
    retired: u64,
    /// The error of a failed request whose submitter had no operation yet (see
    /// [`Owner::Submitter`]), for that submitter to take.
    reaped_error: Option<(u64, TransportError)>,
    /// Sequence number of the last send that used each staging slot.
    slot_seq: [u64; SEND_SLOTS],
    next_slot: usize,
    /// Notifications and message segments held back until the stripes posted before them on
    /// the further lanes have completed (see [`Held`]), in order.
    held: VecDeque<Held>,
}

/// A notification or message segment for the first lane that waits for earlier stripes on the
/// further lanes: RC orders one QP only, so posting it at once could let the peer see it before
/// the data. It is posted, without blocking anyone, by whichever thread handles the completion
/// that passes its fence (a lane's stripe, a first-lane request that frees room, a credit return).
struct Held {
    kind: JobKind,
    local: HeldData,
    completer: Option<Completer>,
    remote_region: u64,
    /// Per further lane: the sequence number that lane must have retired first.
    fence: [u64; MAX_LANES],
}

/// A held request's payload: owned, as it outlives the submission.
enum HeldData {
    Inline(InlineBuf),
    Slot { slot: usize, len: usize },
}

/// A further lane of a connection (`RdmaConfig::qps` > 1): a QP of its own, on the endpoint's
/// device or a further one, with its own CQ, carrying only parts of striped transfers (RDMA WRITE
/// and READ: no receives, no credits). Every request is signalled. Submitters book requests in
/// `st` and queue them; the endpoint's lane poster ([`super::lanes`]) posts them.
struct Lane {
    // Field order is drop order: the QP before its CQ.
    /// The QP, locked only to post (the lane poster) or to fail it (`die`, which does not wait
    /// for a post in progress: the poster fails the QP itself once it sees the connection dead).
    qp: Mutex<Option<QueuePair<Rts>>>,
    st: Mutex<LaneState>,
    cq: CompletionQueue,
    /// Held while polling the CQ (completions of a lane are handled in order); its scratch.
    poll: Mutex<Vec<Completion>>,
    /// Its device: 0 the endpoint's, `i` the `i`-th of [`Endpoint::extra`].
    dev: usize,
    sq_depth: u32,
    /// Notified when requests retire (room in the send queue).
    space: Condvar,
    /// The last sequence number posted and retired, readable without the lock (the fences of
    /// [`Held`] requests). Stored under the lock, after the change.
    posted: AtomicU64,
    retired: AtomicU64,
}

struct LaneState {
    next_seq: u64,
    /// Booked (queued or posted) and not yet retired: sequence number and, on a part's last
    /// request, its completer.
    pending: VecDeque<(u64, Option<Completer>)>,
    /// Booked and not yet posted, in sequence order.
    outbox: VecDeque<LaneWr>,
}

/// A request of a striped part, booked on a lane and not yet posted. Holds its region, so its
/// memory and registration outlive the post.
struct LaneWr {
    seq: u64,
    kind: JobKind,
    /// Offset of this request in the part's remote range (see [`JobKind::send_op`]).
    off: usize,
    region: Region,
    offset: usize,
    len: usize,
}

/// The connection shared by the user's handle and the endpoint's poller.
pub(crate) struct RdmaConn {
    // Field order is drop order: the QP (in `state`) goes before the CQ and before the receive and
    // send buffers' registrations (each of which owns its buffer).
    state: Mutex<State>,
    cq: CompletionQueue,
    /// The receive slots.
    recv_mr: Mr,
    /// Staging for sends too large to go inline; a slot is written only by the sender that
    /// reserved it (see `State::slot_seq`), the NIC reads it after the post.
    send_mr: Mr,
    sq_depth: u32,
    space: Condvar,
    ep: Arc<Endpoint>,
    /// The side channel (non-blocking): read by the endpoint's poller, written by whoever sends a
    /// frame (see [`RdmaConn::send_frame`]).
    side: TcpStream,
    /// Side-channel bytes that could not be written at once; the poller flushes them when the
    /// socket is writable again.
    side_out: Mutex<Vec<u8>>,
    /// This connection's id in the endpoint's poller.
    poll_id: usize,
    peer: SocketAddr,
    peer_endpoint: EndpointId,
    mode: PollMode,
    /// Bytes of one receive buffer (and send staging slot): segment header + payload.
    recv_size: usize,
    /// Bytes of one outgoing segment, header included: the peer's receive buffer size (from the
    /// handshake), at most our own staging slot.
    send_seg: usize,
    /// Held for the whole of a send, so that the segments of two messages never interleave.
    send_order: Mutex<()>,
    max_inline: usize,
    chunk: usize,
    /// Notifications not yet taken by the application, each with the credit it holds.
    notes: Mutex<VecDeque<(u32, u32)>>,
    notes_cv: Condvar,
    /// Messages not yet taken by the application, each with the credits (segments) it holds.
    msgs: Mutex<VecDeque<(Vec<u8>, u32)>>,
    msgs_cv: Condvar,
    /// Our receive credits and the inbound queues' fill (see [`RecvCredits`]): a peer that floods
    /// is held by back-pressure (its sends wait for credits) and the queues stay bounded.
    recv: Mutex<RecvCredits>,
    /// Our private regions granted on this connection: region id → its memory window.
    grants: Mutex<HashMap<u64, Grant>>,
    alive: AtomicBool,
    dead: Mutex<Option<TransportError>>,
    /// Open region checks.
    queries: Mutex<Queries>,
    queries_cv: Condvar,
    /// Whoever polls the CQ holds this, so completions are handled in order by one thread at a time.
    cq_poll: Mutex<CqPoll>,
    /// Busy-poll mode only: the hook given to this connection's operations, so that the thread
    /// waiting on one polls the CQ itself (no thread hand-off on the hot path).
    driver: Option<DriveHook>,
    /// Recycled states of this connection's single operations (no allocation per transfer).
    ops: OpPool,
    /// Changes on (almost) every `drive` call: tells the poller that waiters are driving.
    drives: AtomicU64,
    /// `State::retired`, readable without the state lock: stored (under the lock) after each
    /// change, so a submitter that sees its request here knows its completion was handled.
    retired: AtomicU64,
    /// The further lanes (empty with one QP). Declared after `state`: the first lane's QP goes
    /// first, then these.
    lanes: Vec<Lane>,
    /// Peer regions' keys on the further lanes, from the region checks (as `cache`).
    lane_keys: Mutex<HashMap<(u64, u64), LaneKeys>>,
    /// This connection, for the lane poster's queue.
    me: std::sync::Weak<RdmaConn>,
}

/// A private region granted on one connection: a type-2 memory window bound to its QP.
struct Grant {
    rkey: u32,
    // Field order is drop order: the window goes before the registration it is bound to.
    _window: MemoryWindow,
    _region: Region,
}

impl Drop for RdmaConn {
    /// Deallocates the memory windows before the QP they are bound to is destroyed (fields drop
    /// after this, `state` with its QP first): a bound type-2 window holds a reference to its QP,
    /// and soft-RoCE's `ibv_destroy_qp` waits in the kernel until that reference is gone (seconds
    /// per QP), where hardware drivers invalidate the window instead.
    fn drop(&mut self) {
        self.grants.get_mut().clear();
    }
}

/// A local region this connection cannot use: "region <id> <what>".
#[cold]
fn local_error(local: &Region, what: &str) -> TransportError {
    TransportError::InvalidArgument(format!("region {} {what}", local.id()))
}

fn handshake_err(peer: SocketAddr, e: HandshakeError) -> TransportError {
    match e {
        HandshakeError::VersionMismatch { ours, theirs } => TransportError::VersionMismatch {
            peer: Some(peer),
            ours,
            theirs,
        },
        HandshakeError::Auth(e) => TransportError::AuthFailed {
            peer: Some(peer),
            reason: e.to_string(),
        },
        HandshakeError::Addressing(reason) => TransportError::Addressing {
            peer: Some(peer),
            reason,
        },
        HandshakeError::Refused(super::wire::Refusal::Auth) => TransportError::AuthFailed {
            peer: Some(peer),
            reason: "refused by the peer: authentication failed".into(),
        },
        e => TransportError::PeerMisbehaved {
            peer: Some(peer),
            what: e.to_string(),
        },
    }
}

/// Reads the next handshake frame before `deadline` (one deadline for the whole set-up, however
/// the peer drips its bytes).
fn read_hs(
    s: &mut TcpStream,
    reader: &mut FrameReader,
    peer: SocketAddr,
    deadline: Instant,
) -> Result<Frame> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::PeerDead {
                peer,
                reason: "RDMA connection set-up not finished within the peer timeout".into(),
            });
        }
        s.set_read_timeout(Some(left))
            .map_err(io_err("setsockopt(SO_RCVTIMEO)"))?;
        match reader.next(s) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let inner = e.get_ref().and_then(|x| x.downcast_ref::<DecodeError>());
                if let Some(DecodeError::Version { theirs, .. }) = inner {
                    return Err(handshake_err(
                        peer,
                        super::handshake::version_error(*theirs),
                    ));
                }
                return Err(TransportError::InvalidFrame {
                    peer: Some(peer),
                    expected: "handshake frame",
                    got: e.to_string(),
                });
            }
            Err(_) => return Err(TransportError::ConnectionClosed { peer }),
        }
    }
}

/// A new connection's verbs resources, created only once the peer is authenticated.
struct NewQp {
    qp: Option<QueuePair<genie_sys::verbs::Init>>,
    cq: CompletionQueue,
    max_inline: u32,
    recv_mr: Mr,
    send_mr: Mr,
    sq_depth: u32,
    rq_depth: u32,
    recv_size: usize,
    info: QpInfo,
}

fn create_qp(ep: &Endpoint, local: &LocalAddress, psn: u32) -> Result<NewQp> {
    let limits = ep.ctx.limits();
    let sq_depth = SQ_DEPTH.min(limits.max_qp_wr.max(2));
    let rq_depth = RECV_DEPTH.min(limits.max_qp_wr.max(2));
    let cq = ep
        .ctx
        .create_cq(sq_depth + rq_depth + 8, true)
        .map_err(|e| verbs_io("ibv_create_cq", e))?;
    let caps = QpCaps {
        max_send_wr: sq_depth,
        max_recv_wr: rq_depth,
        max_inline_data: MAX_INLINE,
    };
    let (mut qp, max_inline) = match ep.pd.create_rc_qp(&cq, &cq, caps) {
        Ok(qp) => (qp, MAX_INLINE),
        Err(_) => {
            let qp = ep
                .pd
                .create_rc_qp(
                    &cq,
                    &cq,
                    QpCaps {
                        max_inline_data: 0,
                        ..caps
                    },
                )
                .map_err(|e| verbs_io("ibv_create_qp", e))?;
            (qp, 0)
        }
    };
    let recv_size = ep.config.max_message_size.min(SEGMENT) + SEG_HEADER;
    let recv_buf = Arc::new(SharedBuf::zeroed(recv_size * rq_depth as usize)?);
    let send_buf = Arc::new(SharedBuf::zeroed(recv_size * SEND_SLOTS)?);
    // Message buffers are the NIC's and ours only: no remote access at all.
    let recv_mr = ep
        .pd
        .register_local(recv_buf)
        .map_err(|e| verbs_io("ibv_reg_mr", e))?;
    let send_mr = ep
        .pd
        .register_local(send_buf)
        .map_err(|e| verbs_io("ibv_reg_mr", e))?;
    for slot in 0..rq_depth as usize {
        qp.post_recv(
            RECV_BIT | slot as u64,
            &recv_mr,
            slot * recv_size,
            recv_size,
        )
        .map_err(|e| verbs_io("ibv_post_recv", e))?;
    }
    let info = QpInfo {
        qpn: qp.qpn(),
        psn,
        link_layer: local.link_layer,
        gid_type: local.gid_type,
        flags: 0,
        lid: 0,
        gid: [0; 16],
        mtu: 0,
        credits: rq_depth,
        recv_size: u32::try_from(recv_size).unwrap_or(u32::MAX),
    }
    .with_address(local);
    Ok(NewQp {
        qp: Some(qp),
        cq,
        max_inline,
        recv_mr,
        send_mr,
        sq_depth,
        rq_depth,
        recv_size,
        info,
    })
}

/// A further lane's verbs resources before the QP is connected.
struct NewLane {
    qp: Option<QueuePair<genie_sys::verbs::Init>>,
    cq: CompletionQueue,
    dev: usize,
    psn: u32,
    sq_depth: u32,
    local: LocalAddress,
    max_rd_atomic: u8,
}

/// Creates lane `lane`'s CQ and QP (lanes go round the endpoint's device and its further ones;
/// the first lane is always on the endpoint's device). Its address is chosen on its own port:
/// the configured GID index applies to the endpoint's device only.
fn create_lane(ep: &Endpoint, lane: usize, first: &LocalAddress) -> Result<NewLane> {
    let dev = lane % (1 + ep.extra.len());
    let (ctx, pd) = match dev {
        0 => (&ep.ctx, &ep.pd),
        d => {
            let x = &ep.extra[d - 1];
            (&x.ctx, &x.pd)
        }
    };
    let local = if dev == 0 {
        *first
    } else {
        let attrs = ctx
            .port_attrs()
            .map_err(|e| verbs_io("ibv_query_port", e))?;
        choose_local(&attrs, None, None)
            .map_err(|reason| TransportError::Addressing { peer: None, reason })?
    };
    let limits = ctx.limits();
    let sq_depth = SQ_DEPTH.min(limits.max_qp_wr.max(2));
    let cq = ctx
        .create_cq(sq_depth + 8, true)
        .map_err(|e| verbs_io("ibv_create_cq", e))?;
    let qp = pd
        .create_rc_qp(
            &cq,
            &cq,
            QpCaps {
                max_send_wr: sq_depth,
                max_recv_wr: 1,
                max_inline_data: 0,
            },
        )
        .map_err(|e| verbs_io("ibv_create_qp", e))?;
    Ok(NewLane {
        qp: Some(qp),
        cq,
        dev,
        psn: rand::random::<u32>() & 0xff_ffff,
        sq_depth,
        local,
        max_rd_atomic: limits.max_rd_atomic.clamp(1, 16),
    })
}

impl NewLane {
    /// This lane's part of our QP info (no receives: no credits, no receive size).
    fn info(&self) -> (QpInfo, LocalAddress) {
        let qpn = self.qp.as_ref().map_or(0, |q| q.qpn());
        let info = QpInfo {
            qpn,
            psn: self.psn,
            link_layer: self.local.link_layer,
            gid_type: self.local.gid_type,
            flags: 0,
            lid: 0,
            gid: [0; 16],
            mtu: 0,
            credits: 0,
            recv_size: 0,
        };
        (info, self.local)
    }

    /// Moves the QP INIT→RTR→RTS towards the peer's lane.
    fn connect(mut self, agreed: &LaneAgreed) -> Result<Lane> {
        let Some(qp) = self.qp.take() else {
            return Err(TransportError::InvalidArgument(
                "lane connected twice".into(),
            ));
        };
        let path = PathParams {
            route: agreed.route,
            max_rd_atomic: self.max_rd_atomic,
            timeout: 14,
            retry_cnt: 7,
        };
        let remote = QpEndpoint {
            qpn: agreed.peer_qpn,
            psn: agreed.peer_psn,
        };
        let qp = qp
            .to_rtr(self.psn, &remote, &path)
            .and_then(|q| q.to_rts(self.psn, &path))
            .map_err(|e| verbs_io("ibv_modify_qp", e))?;
        Ok(Lane {
            qp: Mutex::new(Some(qp)),
            st: Mutex::new(LaneState {
                next_seq: 1,
                pending: VecDeque::new(),
                outbox: VecDeque::new(),
            }),
            cq: self.cq,
            poll: Mutex::new(Vec::with_capacity(32)),
            dev: self.dev,
            sq_depth: self.sq_depth,
            space: Condvar::new(),
            posted: AtomicU64::new(0),
            retired: AtomicU64::new(0),
        })
    }
}

/// Sets up a connection over the side channel `s`, as the side that connected (`Role::Client`)
/// or accepted (`Role::Server`), within one overall deadline of the peer timeout. The peer is
/// authenticated before any verbs resource exists (see [`super::handshake`]).
pub(crate) fn establish(ep: &Arc<Endpoint>, mut s: TcpStream, role: Role) -> Result<Arc<RdmaConn>> {
    let deadline = Instant::now() + ep.config.peer_timeout;
    let peer = s.peer_addr().map_err(io_err("getpeername"))?;
    let local_ip = s.local_addr().map_err(io_err("getsockname"))?.ip();
    s.set_nodelay(true)
        .map_err(io_err("setsockopt(TCP_NODELAY)"))?;
    // The GID table as it is now (addresses come and go); among equally good RoCE GIDs, the one
    // holding the side channel's local address.
    let attrs = ep
        .ctx
        .port_attrs()
        .map_err(|e| verbs_io("ibv_query_port", e))?;
    let local = choose_local(&attrs, ep.config.rdma.gid_index, Some(gid_of_ip(local_ip))).map_err(
        |reason| TransportError::Addressing {
            peer: Some(peer),
            reason,
        },
    )?;
    let limits = ep.ctx.limits();
    let psn = rand::random::<u32>() & 0xff_ffff;
    let secret = ep.config.secret.as_ref().map(|s| s.as_bytes());
    let mut hs = Handshake::new(role, secret, ep.id, local, rand::random());
    let mut reader = FrameReader::default();
    let mut new_qp: Option<NewQp> = None;
    let mut new_lanes: Vec<NewLane> = Vec::new();
    let mut lanes: Vec<Lane> = Vec::new();
    let mut rts: Option<(QueuePair<Rts>, Agreed)> = None;
    let agreed = loop {
        while let Some(f) = hs.poll_send() {
            write_frame(&mut s, &f).map_err(io_err("send"))?;
        }
        match hs.poll_action() {
            Some(Action::CreateQp) => {
                // The state machine asks only after the peer's proof checked out; the verbs
                // resources below must never exist for an unauthenticated peer.
                if !hs.is_authenticated() {
                    return Err(handshake_err(
                        peer,
                        HandshakeError::Unexpected {
                            state: "unauthenticated",
                            got: "create-qp",
                        },
                    ));
                }
                let q = create_qp(ep, &local, psn)?;
                new_lanes = (1..ep.config.rdma.qps)
                    .map(|i| create_lane(ep, i, &local))
                    .collect::<Result<_>>()?;
                let offered = new_lanes.iter().map(NewLane::info).collect();
                if let Err(e) = hs.qp_created(q.info, offered) {
                    // Best effort: our QP info, so that the peer names the mismatch too.
                    while let Some(f) = hs.poll_send() {
                        let _ = write_frame(&mut s, &f);
                    }
                    return Err(handshake_err(peer, e));
                }
                new_qp = Some(q);
            }
            Some(Action::Connect(agreed)) => {
                let Some(qp) = new_qp.as_mut().and_then(|q| q.qp.take()) else {
                    return Err(handshake_err(
                        peer,
                        HandshakeError::Unexpected {
                            state: "connecting",
                            got: "no QP",
                        },
                    ));
                };
                let path = PathParams {
                    route: agreed.route,
                    max_rd_atomic: limits.max_rd_atomic.clamp(1, 16),
                    timeout: 14,
                    retry_cnt: 7,
                };
                let remote = QpEndpoint {
                    qpn: agreed.peer_qpn,
                    psn: agreed.peer_psn,
                };
                let qp = qp
                    .to_rtr(psn, &remote, &path)
                    .and_then(|q| q.to_rts(psn, &path))
                    .map_err(|e| verbs_io("ibv_modify_qp", e))?;
                // As many lanes as both sides offered; ours past that are dropped unused.
                for (nl, la) in new_lanes
                    .drain(..)
                    .zip(agreed.lanes.iter().map_while(|l| *l))
                {
                    lanes.push(nl.connect(&la)?);
                }
                rts = Some((qp, agreed));
                hs.connected().map_err(|e| handshake_err(peer, e))?;
            }
            Some(Action::Established(a)) => break a,
            None => {
                let f = read_hs(&mut s, &mut reader, peer, deadline)?;
                if let Err(e) = hs.on_frame(&f) {
                    if let Some(r) = e.refusal() {
                        // Best effort: tell the peer why before closing.
                        let _ = write_frame(&mut s, &Frame::Refuse(r));
                    }
                    return Err(handshake_err(peer, e));
                }
            }
        }
    };
    let (Some(q), Some((qp, _))) = (new_qp, rts) else {
        return Err(handshake_err(
            peer,
            HandshakeError::Unexpected {
                state: "established",
                got: "no QP",
            },
        ));
    };
    let NewQp {
        cq,
        max_inline,
        recv_mr,
        send_mr,
        sq_depth,
        rq_depth,
        recv_size,
        ..
    } = q;
    tracing::debug!(%peer, lanes = 1 + agreed.lane_count(), qpn = qp.qpn(), peer_qpn = agreed.peer_qpn, mtu = agreed.route.mtu, dlid = agreed.route.dlid, grh = agreed.route.grh.is_some(), sgid_index = local.sgid_index, "rdma connection up");

    s.set_read_timeout(None)
        .map_err(io_err("setsockopt(SO_RCVTIMEO)"))?;
    s.set_nonblocking(true)
        .map_err(io_err("fcntl(O_NONBLOCK)"))?;
    // Chunks: at most the port's maximum message size, and at most MAX_CHUNK so that one huge
    // transfer does not hold the wire for long in front of other work on the connection.
    let chunk = usize::try_from(limits.max_msg_size)
        .unwrap_or(usize::MAX)
        .clamp(4096, MAX_CHUNK);
    let mode = ep.poll_mode();
    let shared = Arc::new_cyclic(|me: &std::sync::Weak<RdmaConn>| {
        let driver = (mode == PollMode::BusyPoll).then(|| {
            let me = me.clone();
            Arc::new(move || {
                if let Some(c) = me.upgrade() {
                    c.drive();
                }
            }) as DriveHook
        });
        RdmaConn {
            state: Mutex::new(State {
                cache: RegionCache::default(),
                qp: Some(qp),
                next_seq: 1,
                pending: VecDeque::new(),
                since_signal: 0,
                credits: SendCredits::new(agreed.send_credits),
                retired: 0,
                reaped_error: None,
                slot_seq: [0; SEND_SLOTS],
                next_slot: 0,
                held: VecDeque::new(),
            }),
            cq,
            recv_mr,
            send_mr,
            sq_depth,
            space: Condvar::new(),
            ep: Arc::clone(ep),
            side: s,
            side_out: Mutex::new(Vec::new()),
            poll_id: ep.poller.next_id(),
            peer,
            peer_endpoint: agreed.peer_endpoint,
            mode,
            recv_size,
            send_seg: (agreed.peer_recv_size as usize).min(recv_size),
            send_order: Mutex::new(()),
            max_inline: max_inline as usize,
            chunk,
            notes: Mutex::new(VecDeque::new()),
            notes_cv: Condvar::new(),
            msgs: Mutex::new(VecDeque::new()),
            msgs_cv: Condvar::new(),
            recv: Mutex::new(RecvCredits::new(
                rq_depth,
                ep.config.max_inbound_queue,
                ep.config.max_inbound_bytes,
            )),
            grants: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            dead: Mutex::new(None),
            queries: Mutex::new(Queries::default()),
            queries_cv: Condvar::new(),
            cq_poll: Mutex::new(CqPoll {
                wcs: Vec::with_capacity(32),
                reasm: Reassembly::new(ep.config.max_message_size),
                done: Vec::new(),
            }),
            ops: OpPool::new(mode, driver.clone()),
            driver,
            drives: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            lanes,
            lane_keys: Mutex::new(HashMap::new()),
            me: me.clone(),
        }
    });
    // The handshake's reader may hold side-channel frames the peer sent right after it.
    ep.poller.add(Arc::clone(&shared), reader);
    Ok(shared)
}

/// The local side of one work request.
enum LocalData<'a> {
    Region {
        mr: &'a Mr,
        offset: usize,
        len: usize,
    },
    Slot {
        slot: usize,
        len: usize,
    },
    Inline(InlineBuf),
    /// A zero-length write or read: no work request at all.
    Nothing,
}

/// Bytes copied into the work request itself (at most [`MAX_INLINE`]): kept on the stack, so that
/// a small write costs no allocation.
struct InlineBuf {
    len: usize,
    bytes: [u8; MAX_INLINE as usize],
}

impl InlineBuf {
    /// An empty buffer (`len` 0).
    fn empty() -> Self {
        Self {
            len: 0,
            bytes: [0; MAX_INLINE as usize],
        }
    }

    /// The concatenation of `parts`; `None` if longer than [`MAX_INLINE`].
    fn of(parts: &[&[u8]]) -> Option<Self> {
        let mut b = Self::empty();
        for p in parts {
            let end = b.len.checked_add(p.len())?;
            b.bytes.get_mut(b.len..end)?.copy_from_slice(p);
            b.len = end;
        }
        Some(b)
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A lane a striped transfer uses: its index (0: the first), the peer region's key there and our
/// region's registration on the lane's device.
struct LaneUse<'r> {
    lane: usize,
    rkey: u32,
    mr: &'r Mr,
}

impl LaneUse<'_> {
    /// Whether it is a further lane (posted by the lane poster).
    fn further(&self) -> Option<usize> {
        self.lane.checked_sub(1)
    }
}

/// One user-visible operation, before it is split into work requests.
struct Job<'a> {
    kind: JobKind,
    local: LocalData<'a>,
    /// `None` for the leading segments of a message (the op completes with its last one).
    completer: Option<Completer>,
    remote_region: u64,
}

#[derive(Clone, Copy)]
enum JobKind {
    Write { rkey: u32, addr: u64 },
    WriteImm { rkey: u32, addr: u64, imm: u32 },
    Read { rkey: u32, addr: u64 },
    Send,
}

impl JobKind {
    /// The job of a one-sided transfer to `addr` under `rkey`.
    fn of(kind: TransferKind, rkey: u32, addr: u64) -> Self {
        match kind {
            TransferKind::Write => JobKind::Write { rkey, addr },
            TransferKind::WriteNotify(imm) => JobKind::WriteImm { rkey, addr, imm },
            TransferKind::Read => JobKind::Read { rkey, addr },
        }
    }

    /// Whether the job's final work request consumes a receive at the peer (a credit).
    fn needs_credit(&self) -> bool {
        matches!(self, JobKind::WriteImm { .. } | JobKind::Send)
    }

    /// The work request of the chunk at `off`; only the last chunk of a notification carries
    /// the immediate.
    fn send_op(&self, off: usize, last_chunk: bool) -> SendOp {
        match *self {
            JobKind::Write { rkey, addr } => SendOp::Write {
                rkey,
                remote_addr: addr + off as u64,
            },
            JobKind::WriteImm { rkey, addr, imm } if last_chunk => SendOp::WriteImm {
                rkey,
                remote_addr: addr + off as u64,
                imm,
            },
            JobKind::WriteImm { rkey, addr, .. } => SendOp::Write {
                rkey,
                remote_addr: addr + off as u64,
            },
            JobKind::Read { rkey, addr } => SendOp::Read {
                rkey,
                remote_addr: addr + off as u64,
            },
            JobKind::Send => SendOp::Send,
        }
    }
}

impl State {
    /// Books work request `seq`, just posted: the sequence, the signalling count, the credit a
    /// final request consumes, and its pending entry with its owner.
    #[inline]
    fn posted(
        &mut self,
        seq: u64,
        signaled: bool,
        takes_credit: bool,
        owner: Owner,
        remote_region: u64,
    ) {
        self.next_seq += 1;
        self.since_signal = if signaled { 0 } else { self.since_signal + 1 };
        if takes_credit {
            // Checked by the caller (`ready`) before posting.
            let took = self.credits.try_take();
            debug_assert!(took, "posted a credit-consuming request without a credit");
        }
        self.pending.push_back(Pending {
            seq,
            owner,
            remote_region,
        });
    }
}

impl RdmaConn {
    fn dead_error(&self) -> TransportError {
        self.dead
            .lock()
            .clone()
            .unwrap_or(TransportError::ConnectionClosed { peer: self.peer })
    }

    fn check_alive(&self) -> Result<()> {
        if self.alive.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.dead_error())
        }
    }

    /// Fails the connection: every pending operation gets `err` (the first one) and the QP is moved
    /// to the error state. Idempotent.
    pub(crate) fn die(&self, err: TransportError) {
        {
            let mut d = self.dead.lock();
            if d.is_none() {
                *d = Some(err.clone());
            }
        }
        let was_alive = self.alive.swap(false, Ordering::AcqRel);
        let (pending, held): (Vec<Pending>, Vec<Held>) = {
            let mut st = self.state.lock();
            if let Some(qp) = st.qp.as_mut() {
                if was_alive {
                    let _ = qp.set_error();
                }
            }
            (st.pending.drain(..).collect(), st.held.drain(..).collect())
        };
        let err = self.dead_error();
        for p in pending {
            if let Owner::Op(c) = p.owner {
                c.complete(Err(err.clone()));
            }
        }
        for h in held {
            if let Some(c) = h.completer {
                c.complete(Err(err.clone()));
            }
        }
        for lane in &self.lanes {
            // A post in progress holds the QP (on soft-RoCE for as long as it moves the data):
            // the poster fails the QP itself after it, seeing the connection dead.
            if let Some(mut qp) = lane.qp.try_lock() {
                if let Some(qp) = qp.as_mut() {
                    if was_alive {
                        let _ = qp.set_error();
                    }
                }
            }
            let parts: Vec<Completer> = {
                let mut ls = lane.st.lock();
                ls.outbox.clear();
                ls.pending.drain(..).filter_map(|(_, c)| c).collect()
            };
            for c in parts {
                c.complete(Err(err.clone()));
            }
            lane.space.notify_all();
        }
        if was_alive {
            tracing::debug!(peer = %self.peer, error = %err, "rdma connection failed");
            let _ = self.side.shutdown(Shutdown::Both);
            self.ep.poller.dead(self.poll_id);
        }
        self.space.notify_all();
        // A receiver that saw the connection alive under its queue's lock is either still
        // holding it (and sees `alive` false at its next look) or already waiting: taking the
        // lock once before notifying means the wake-up cannot fall between its check and its
        // wait. Nothing calls `die` with a queue's lock held.
        drop(self.notes.lock());
        self.notes_cv.notify_all();
        drop(self.msgs.lock());
        self.msgs_cv.notify_all();
        self.queries_cv.notify_all();
    }

    /// The application took an item of `bytes` holding `withheld` credits.
    fn taken(&self, bytes: usize, withheld: u32) {
        let ret = {
            let mut r = self.recv.lock();
            r.taken(bytes, withheld);
            r.poll_return()
        };
        self.return_credits(ret);
    }

    /// Frees `n` credits (a receive that queued nothing).
    fn give_back(&self, n: u32) {
        let ret = {
            let mut r = self.recv.lock();
            r.release(n);
            r.poll_return()
        };
        self.return_credits(ret);
    }

    /// Sends a batch of credits that [`RecvCredits::poll_return`] released.
    fn return_credits(&self, n: Option<u32>) {
        if let Some(n) = n {
            if self.alive.load(Ordering::Acquire) {
                let _ = self.send_frame(&Frame::Credits { n });
            }
        }
    }

    /// Fails the connection for what the peer did.
    fn misbehaved(&self, v: Violation) {
        self.die(TransportError::PeerMisbehaved {
            peer: Some(self.peer),
            what: v.to_string(),
        });
    }

    /// See [`Connection::grant`]: binds a type-2 memory window over the private `region` to this
    /// connection's QP (once per region), so its rkey works on this QP and no other.
    fn grant(&self, region: &Region) -> Result<RemoteRegion> {
        if region.endpoint() != self.ep.id {
            return Err(local_error(region, "belongs to another endpoint"));
        }
        if !region.is_private() {
            return Ok(region.descriptor());
        }
        let desc = |rkey: u32, addr: u64| RemoteRegion {
            key: u64::from(rkey),
            addr,
            ..region.descriptor()
        };
        let Some(mr) = Regs::of(region).map(|r| &r.main) else {
            return Err(local_error(region, "is not RDMA-registered (empty?)"));
        };
        if let Some(g) = self.grants.lock().get(&region.id()) {
            return Ok(desc(g.rkey, mr.addr()));
        }
        let remote = match region.access() {
            RegionAccess::Read => RemoteAccess::Read,
            RegionAccess::Write => RemoteAccess::Write,
            RegionAccess::ReadWrite => RemoteAccess::ReadWrite,
            _ => return Err(local_error(region, "allows no remote access")),
        };
        let mut window = self
            .ep
            .pd
            .alloc_window()
            .map_err(|e| verbs_io("ibv_alloc_mw", e))?;
        let (op, done) = self.ops.op(Some(region.clone()));
        let rkey = {
            let mut st = self.state.lock();
            let deadline = Instant::now() + self.ep.config.peer_timeout;
            while st.pending.len() as u32 >= self.sq_depth {
                self.check_alive()?;
                let reaped = parking_lot::MutexGuard::unlocked(&mut st, || {
                    matches!(self.progress(false), Ok(true))
                });
                if !reaped && self.space.wait_until(&mut st, deadline).timed_out() {
                    return Err(TransportError::Timeout {
                        after: self.ep.config.peer_timeout,
                    });
                }
            }
            let seq = st.next_seq;
            let Some(qp) = st.qp.as_mut() else {
                return Err(self.dead_error());
            };
            let rkey = qp
                .post_bind(seq, &mut window, mr, 0, region.len(), remote)
                .map_err(|e| verbs_io("ibv_post_send(BIND_MW)", e))?;
            st.posted(seq, true, false, Owner::Op(done), region.id());
            rkey
        };
        // Reap the bind's completion here rather than wait for the poller: a bind is rare and
        // short, and in busy-poll mode the poller may be staying away from this CQ.
        let mut deadline = SpinDeadline::new(self.ep.config.peer_timeout);
        loop {
            if let Some(r) = op.poll() {
                r?;
                break;
            }
            self.check_alive()?;
            if deadline.passed() {
                return Err(TransportError::Timeout {
                    after: self.ep.config.peer_timeout,
                });
            }
            if !matches!(self.progress(true), Ok(true)) {
                std::thread::yield_now();
            }
        }
        self.grants.lock().insert(
            region.id(),
            Grant {
                rkey,
                _window: window,
                _region: region.clone(),
            },
        );
        Ok(desc(rkey, mr.addr()))
    }

    /// Sends a side-channel frame from any thread without blocking: what the socket does not take
    /// now waits in `side_out` (behind anything already waiting, so frames keep their order) for
    /// the poller to flush. A peer that lets [`MAX_SIDE_BACKLOG`] bytes pile up loses the
    /// connection.
    fn send_frame(&self, f: &Frame) -> Result<()> {
        let bytes = f.encode();
        let mut out = self.side_out.lock();
        if out.is_empty() {
            match write_some(&self.side, &bytes) {
                Ok(n) => out.extend_from_slice(bytes.get(n..).unwrap_or(&[])),
                Err(e) => {
                    drop(out);
                    return Err(self.side_write_failed(e));
                }
            }
        } else {
            out.extend_from_slice(&bytes);
        }
        if out.len() > MAX_SIDE_BACKLOG {
            let queued = out.len();
            drop(out);
            let err = TransportError::PeerMisbehaved {
                peer: Some(self.peer),
                what: format!("does not read its side channel ({queued} bytes queued)"),
            };
            self.die(err.clone());
            return Err(err);
        }
        Ok(())
    }

    /// Writes what [`RdmaConn::send_frame`] queued (the poller, when the socket is writable).
    pub(crate) fn flush_side(&self) {
        let mut out = self.side_out.lock();
        if out.is_empty() {
            return;
        }
        match write_some(&self.side, &out) {
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) => {
                drop(out);
                self.side_write_failed(e);
            }
        }
    }

    #[cold]
    fn side_write_failed(&self, e: io::Error) -> TransportError {
        let err = TransportError::PeerDead {
            peer: self.peer,
            reason: format!("side channel: {e}"),
        };
        self.die(err.clone());
        err
    }

    /// The rkey and address of `[offset, offset + len)` of `remote`, asking the peer on first use.
    /// Inlined: on the latency path of every transfer (the checks only; errors and first uses
    /// take out-of-line paths).
    #[inline(always)]
    fn resolve(&self, remote: &RemoteRegion, offset: u64, len: u64, op: u8) -> Result<(u32, u64)> {
        if remote.endpoint != self.peer_endpoint {
            return Err(self.foreign(remote));
        }
        let cached = self.state.lock().cache.get(remote.region, remote.key);
        let v = match cached {
            Some(v) => v,
            None => self.resolve_new(remote)?,
        };
        remote_range(remote, offset, len, op, v)
    }

    #[cold]
    fn foreign(&self, remote: &RemoteRegion) -> TransportError {
        TransportError::ForeignDescriptor {
            descriptor_endpoint: remote.endpoint,
            peer_endpoint: self.peer_endpoint,
        }
    }

    /// A region not yet in the cache: asks the peer, and caches its answer.
    #[cold]
    #[inline(never)]
    fn resolve_new(&self, remote: &RemoteRegion) -> Result<PeerRegion> {
        let (v, keys) = self.query(remote)?;
        if !self.lanes.is_empty() {
            let mut m = self.lane_keys.lock();
            // Bounded like the region cache: forget them all rather than grow (a forgotten
            // region is simply not striped until it is checked again).
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert((remote.region, remote.key), keys);
        }
        self.state.lock().cache.insert(remote.region, remote.key, v);
        Ok(v)
    }

    /// The keys of our region `r` on this connection's further lanes (for a region check).
    fn our_lane_keys(&self, r: &Region) -> LaneKeys {
        let mut keys = LaneKeys::default();
        if let Some(regs) = Regs::of(r) {
            for (i, lane) in self.lanes.iter().enumerate() {
                if let Some(mr) = regs.on(lane.dev) {
                    keys.set(i + 1, mr.rkey());
                }
            }
        }
        keys
    }

    fn query(&self, remote: &RemoteRegion) -> Result<(PeerRegion, LaneKeys)> {
        self.check_alive()?;
        // Opened before asking: the side channel accepts only answers to open questions.
        let (req, ask) = self.queries.lock().ask(remote.region, remote.key);
        if let Err(e) = self.send_frame(&ask) {
            self.queries.lock().cancel(req);
            return Err(e);
        }
        let timeout = self.ep.config.peer_timeout;
        let deadline = Instant::now() + timeout;
        let mut q = self.queries.lock();
        loop {
            if let Some(st) = q.take(req) {
                let keys = match st {
                    super::wire::RegionStatus::Ok { lanes, .. } => lanes,
                    _ => LaneKeys::default(),
                };
                return proto::peer_region(st, remote.region).map(|v| (v, keys));
            }
            if !self.alive.load(Ordering::Acquire) {
                q.cancel(req);
                return Err(self.dead_error());
            }
            if self.queries_cv.wait_until(&mut q, deadline).timed_out() {
                q.cancel(req);
                return Err(TransportError::PeerDead {
                    peer: self.peer,
                    reason: "no answer to a region check".into(),
                });
            }
        }
    }

    /// Checks that `[offset, offset + len)` of `local` may be used on this connection.
    #[inline]
    fn check_local(&self, local: &Region, offset: usize, len: usize) -> Result<()> {
        if local.endpoint() != self.ep.id {
            return Err(local_error(local, "belongs to another endpoint"));
        }
        local.check_local(offset, len)
    }

    /// The registration of `local` after [`RdmaConn::check_local`]; `None` for zero bytes.
    #[inline]
    fn local_mr<'r>(&self, local: &'r Region, offset: usize, len: usize) -> Result<Option<&'r Mr>> {
        self.check_local(local, offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        match Regs::of(local).map(|r| &r.main) {
            Some(mr) => Ok(Some(mr)),
            None => Err(local_error(local, "is not RDMA-registered")),
        }
    }

    /// Builds the job of one transfer, validated; the completer comes from `make`.
    fn job<'r>(&self, t: &Transfer<'r>, make: impl FnOnce(Region) -> Completer) -> Result<Job<'r>> {
        let mr = self.local_mr(t.local, t.local_offset, t.len)?;
        let op = match t.kind {
            TransferKind::Read => ACCESS_READ,
            TransferKind::Write | TransferKind::WriteNotify(_) => ACCESS_WRITE,
        };
        let (rkey, addr) = self.resolve(t.remote, t.remote_offset, t.len as u64, op)?;
        let kind = JobKind::of(t.kind, rkey, addr);
        let is_read = matches!(kind, JobKind::Read { .. });
        let local = match mr {
            Some(_) if !is_read && t.len <= self.max_inline => {
                let mut b = InlineBuf::empty();
                b.len = t.len;
                t.local.read(t.local_offset, &mut b.bytes[..t.len])?;
                LocalData::Inline(b)
            }
            Some(mr) => LocalData::Region {
                mr,
                offset: t.local_offset,
                len: t.len,
            },
            // Zero length: a notification still needs its (empty) write-with-immediate.
            None if matches!(kind, JobKind::WriteImm { .. }) => {
                LocalData::Inline(InlineBuf::empty())
            }
            None => LocalData::Nothing,
        };
        Ok(Job {
            kind,
            local,
            completer: Some(make(t.local.clone())),
            remote_region: t.remote.region,
        })
    }

    /// Posts jobs in order. Only the last work request is signalled (plus one per half queue).
    /// Waits for send-queue room and credits. A job that cannot be posted fails its completer.
    fn post_jobs<'r>(&self, jobs: impl ExactSizeIterator<Item = Job<'r>>) {
        let mut st = self.state.lock();
        let n_jobs = jobs.len();
        let sq_half = (self.sq_depth / 2).max(1);
        for (ji, mut job) in jobs.into_iter().enumerate() {
            let last_job = ji + 1 == n_jobs;
            // A notification or message segment behind stripes still in flight on the further
            // lanes (or behind one already held) waits in `held`: posted by whoever completes
            // what it waits for, so this thread does not wait (see `Held`). A notification's data
            // goes now, as a plain write; only its (empty) notification waits.
            let mut hold_after = None;
            if self.must_hold(&st, &job.kind) {
                if !self.alive.load(Ordering::Acquire) {
                    if let Some(c) = job.completer.take() {
                        c.complete(Err(self.dead_error()));
                    }
                    continue;
                }
                match (job.local, job.kind) {
                    (
                        local @ LocalData::Region { .. },
                        JobKind::WriteImm { rkey, addr, imm: _ },
                    ) => {
                        hold_after = Some(Held {
                            kind: job.kind,
                            local: HeldData::Inline(InlineBuf::empty()),
                            completer: job.completer.take(),
                            remote_region: job.remote_region,
                            fence: [0; MAX_LANES],
                        });
                        job = Job {
                            kind: JobKind::Write { rkey, addr },
                            local,
                            completer: None,
                            remote_region: job.remote_region,
                        };
                    }
                    (local, kind) => {
                        let local = match local {
                            LocalData::Slot { slot, len } => HeldData::Slot { slot, len },
                            LocalData::Inline(b) => HeldData::Inline(b),
                            // Notifications and sends always have a payload of one of those.
                            LocalData::Region { .. } | LocalData::Nothing => {
                                HeldData::Inline(InlineBuf::empty())
                            }
                        };
                        let fence = self.fence();
                        st.held.push_back(Held {
                            kind,
                            local,
                            completer: job.completer,
                            remote_region: job.remote_region,
                            fence,
                        });
                        continue;
                    }
                }
            }
            // Work requests of this job: `chunk`-sized pieces of a large region, else one.
            let (total, piece) = match &job.local {
                LocalData::Region { len, .. } => (*len, self.chunk.max(1)),
                LocalData::Slot { len, .. } => (*len, (*len).max(1)),
                LocalData::Inline(b) => (b.len, b.len.max(1)),
                LocalData::Nothing => (0, 1),
            };
            let n = total.div_ceil(piece).max(1);
            let chunks = (0..n).map(|i| (i * piece, piece.min(total - i * piece)));
            if matches!(job.local, LocalData::Nothing) {
                // A zero-length write or read moves nothing: it is complete once validated.
                if let Some(c) = job.completer {
                    c.complete(Ok(()));
                }
                continue;
            }
            let needs_credit = job.kind.needs_credit();
            let mut failed = None;
            let mut completer = job.completer;
            for (ci, (off, len)) in chunks.enumerate() {
                let last_chunk = ci + 1 == n;
                // Back-pressure: room in the send queue (and a credit for the final, consuming request).
                // Read the clock only when we have to wait (the common case has room).
                let mut deadline = None;
                let ready = |st: &State| {
                    (st.pending.len() as u32) < self.sq_depth
                        && (!(needs_credit && last_chunk) || st.credits.available() > 0)
                };
                loop {
                    if !self.alive.load(Ordering::Acquire) {
                        failed = Some(self.dead_error());
                        break;
                    }
                    if ready(&st) {
                        break;
                    }
                    let reaped = parking_lot::MutexGuard::unlocked(&mut st, || {
                        matches!(self.progress(false), Ok(true))
                    });
                    // The state lock was free while reaping: room or credits that came meanwhile
                    // (the poller, a credit frame) notified nobody, so look again
                    // before waiting for the next notification.
                    if reaped || ready(&st) {
                        continue;
                    }
                    let until = *deadline.get_or_insert_with(|| {
                        Instant::now() + self.ep.config.peer_timeout.max(Duration::from_secs(1)) * 4
                    });
                    let timed_out = self.space.wait_until(&mut st, until).timed_out();
                    if timed_out && !ready(&st) {
                        failed = Some(if (st.pending.len() as u32) < self.sq_depth {
                            // Room, but no credit: the peer's application has not taken the
                            // messages or notifications it already has (back-pressure).
                            TransportError::Timeout {
                                after: self.ep.config.peer_timeout.max(Duration::from_secs(1)) * 4,
                            }
                        } else {
                            TransportError::PeerDead {
                                peer: self.peer,
                                reason: format!(
                                    "no progress on the send queue ({} of {} requests in flight, {} credits)",
                                    st.pending.len(),
                                    self.sq_depth,
                                    st.credits.available()
                                ),
                            }
                        });
                        break;
                    }
                }
                if failed.is_some() {
                    break;
                }
                let seq = st.next_seq;
                let signaled = (last_chunk && last_job) || st.since_signal + 1 >= sq_half;
                let op = job.kind.send_op(off, last_chunk);
                let sge = match &job.local {
                    LocalData::Region { mr, offset, .. } => Sge::Mr {
                        mr,
                        offset: offset + off,
                        len,
                    },
                    LocalData::Slot { slot, len } => Sge::Mr {
                        mr: &self.send_mr,
                        offset: slot * self.recv_size,
                        len: *len,
                    },
                    LocalData::Inline(b) => Sge::Inline(b.as_slice()),
                    LocalData::Nothing => Sge::Inline(&[]),
                };
                let Some(qp) = st.qp.as_mut() else {
                    failed = Some(self.dead_error());
                    break;
                };
                if let Err(e) = qp.post_send(seq, op, sge, signaled) {
                    failed = Some(verbs_io("ibv_post_send", e));
                    break;
                }
                if let LocalData::Slot { slot, .. } = job.local {
                    st.slot_seq[slot] = seq;
                }
                st.posted(
                    seq,
                    signaled,
                    needs_credit && last_chunk,
                    match completer.take_if(|_| last_chunk) {
                        Some(c) => Owner::Op(c),
                        None => Owner::Chunk,
                    },
                    job.remote_region,
                );
            }
            if let Some(e) = failed {
                // Chunks already posted stay in the queue without a completer; the op fails now.
                if let Some(c) = completer.take() {
                    c.complete(Err(e.clone()));
                }
                if let Some(c) = hold_after.take().and_then(|h| h.completer) {
                    c.complete(Err(e.clone()));
                }
                // A post failure that is not a dead connection means a broken QP: fail it all.
                if self.alive.load(Ordering::Acquire) {
                    drop(st);
                    self.die(e);
                    st = self.state.lock();
                }
            }
            if let Some(mut h) = hold_after {
                // Its data is posted: the fence covers the stripes in flight now.
                h.fence = self.fence();
                st.held.push_back(h);
            }
        }
        // If the last job failed after earlier ones were posted unsignalled, their completion
        // would never come: `die` above failed them. Otherwise the last posted request is signalled.
        drop(st);
        // Reap finished work after posting (cheap when there is none), not before: the post is
        // what the peer waits for, and a full send queue reaps in the loop above anyway. In
        // busy-poll mode a posting thread counts as a driver: while the user keeps posting (and so
        // reaping), the poller leaves the CQ to it. Otherwise the poller would arm the completion
        // channel, be woken by every signalled completion, complete the operation before the user
        // polls it, so that the user's poll no longer drives, and stay in that mode: a poller
        // wake-up per operation, 3-6x the ping-pong latency on soft-RoCE.
        self.drive();
    }

    fn submit_one(&self, t: Transfer<'_>) -> Result<Op> {
        if !self.lanes.is_empty() && t.len >= STRIPE_MIN {
            if let Some(plan) = self.stripe_plan(&t)? {
                let (op, whole) = self.ops.op(Some(t.local.clone()));
                self.submit_striped(&t, plan, whole);
                return Ok(op);
            }
        }
        if let Some(op) = self.submit_fast(&t)? {
            return Ok(op);
        }
        self.check_alive()?;
        let mut op = None;
        let job = self.job(&t, |keep| {
            let (o, c) = self.ops.op(Some(keep));
            op = Some(o);
            c
        })?;
        self.post_jobs(std::iter::once(job));
        op.ok_or_else(|| TransportError::InvalidArgument("no operation created".into()))
    }

    /// The common case of [`RdmaConn::submit_one`] on one straight path: one work request (no
    /// chunks), room in the send queue and, for a notification, a credit. It validates what
    /// [`RdmaConn::job`] validates, takes inline bytes straight from the region (under its read
    /// lock) and posts under the state lock; the operation is made after the post, still under
    /// the lock, so that its completion cannot be handled before it is queued. Only what the work
    /// request needs comes before the doorbell, which is what the peer waits for (on soft-RoCE's
    /// emulated CPU every instruction there shows in the ping-pong latency). `Ok(None)`: not the
    /// common case, nothing was posted; the general path takes it.
    fn submit_fast(&self, t: &Transfer<'_>) -> Result<Option<Op>> {
        if t.len == 0 || t.len > self.chunk {
            return Ok(None);
        }
        self.check_alive()?;
        if t.remote.endpoint != self.peer_endpoint {
            return Err(self.foreign(t.remote));
        }
        let inline = !matches!(t.kind, TransferKind::Read) && t.len <= self.max_inline;
        let (bytes, mr) = if inline {
            self.check_local(t.local, t.local_offset, t.len)?;
            if t.local.registration().is_none() {
                return Ok(None); // the general path names the error
            }
            (Some(t.local.lock()), None)
        } else {
            (None, self.local_mr(t.local, t.local_offset, t.len)?)
        };
        let sge = match (&bytes, mr) {
            (Some(b), _) => match b.get(t.local_offset..t.local_offset + t.len) {
                Some(b) => Sge::Inline(b),
                None => return Ok(None),
            },
            (None, Some(mr)) => Sge::Mr {
                mr,
                offset: t.local_offset,
                len: t.len,
            },
            (None, None) => return Ok(None),
        };
        let mut st = self.state.lock();
        // A peer region not yet checked with the peer: the general path asks it.
        let Some(v) = st.cache.get(t.remote.region, t.remote.key) else {
            return Ok(None);
        };
        let op = match t.kind {
            TransferKind::Read => ACCESS_READ,
            TransferKind::Write | TransferKind::WriteNotify(_) => ACCESS_WRITE,
        };
        let (rkey, addr) = remote_range(t.remote, t.remote_offset, t.len as u64, op, v)?;
        let kind = JobKind::of(t.kind, rkey, addr);
        let needs_credit = kind.needs_credit();
        if st.pending.len() as u32 >= self.sq_depth
            || (needs_credit && st.credits.available() == 0)
            || self.must_hold(&st, &kind)
        {
            return Ok(None);
        }
        let seq = st.next_seq;
        let Some(qp) = st.qp.as_mut() else {
            return Err(self.dead_error());
        };
        if let Err(e) = qp.post_send(seq, kind.send_op(0, true), sge, true) {
            drop(st);
            drop(bytes);
            // As on the general path: the operation fails, and so does the QP.
            let err = verbs_io("ibv_post_send", e);
            if self.alive.load(Ordering::Acquire) {
                self.die(err.clone());
            }
            return Ok(Some(Op::failed(self.mode, err)));
        }
        st.posted(seq, true, needs_credit, Owner::Submitter, t.remote.region);
        drop(st);
        drop(bytes);
        // Reap after posting, as `post_jobs` does (and count as driving).
        self.drive();
        // Often the reap retired the request (always on soft-RoCE, whose kernel completes it
        // inside the post): then the operation needs no state, no lock and no wake-up. Otherwise
        // it gets one now, under the state lock, so that its completion cannot slip between.
        if self.retired.load(Ordering::Acquire) >= seq {
            return Ok(Some(Op::done()));
        }
        let mut st = self.state.lock();
        if st.retired >= seq {
            return Ok(Some(Op::done()));
        }
        // Failed with its own error (which another thread may have reaped; the connection dies
        // after that, so the request may still be pending: the error decides, not the queue).
        if st.reaped_error.as_ref().is_some_and(|(s, _)| *s == seq) {
            if let Some((_, err)) = st.reaped_error.take() {
                return Ok(Some(Op::failed(self.mode, err)));
            }
        }
        if let Some(p) = st.pending.iter_mut().rev().find(|p| p.seq == seq) {
            let (op, completer) = self.ops.op(Some(t.local.clone()));
            p.owner = Owner::Op(completer);
            return Ok(Some(op));
        }
        // Neither retired nor pending nor failed on its own: the connection died.
        drop(st);
        Ok(Some(Op::failed(self.mode, self.dead_error())))
    }

    /// Retires work requests, delivers receives, re-posts receive buffers: polls the CQ once and
    /// handles what it got. `wait_lock`: take the poll lock even if another thread holds it (the
    /// poller); otherwise give up at once (posting threads, which
    /// reap completions on the way so that no thread handoff sits on the critical path).
    /// Returns whether anything completed.
    fn progress(&self, wait_lock: bool) -> std::result::Result<bool, VerbsError> {
        let mut guard = if wait_lock {
            self.cq_poll.lock()
        } else {
            match self.cq_poll.try_lock() {
                Some(g) => g,
                None => return Ok(false),
            }
        };
        let p = &mut *guard;
        p.wcs.clear();
        let n = self.cq.poll(&mut p.wcs, 32)?;
        // The common case, a lone successful send completion (the reap after a post), on a short
        // inlined path; anything else through `on_completion`.
        match p.wcs.as_slice() {
            [wc] if wc.wr_id & RECV_BIT == 0 && wc.status.is_ok() => {
                self.retire(wc.wr_id, &mut p.done)
            }
            _ => {
                for i in 0..p.wcs.len() {
                    let wc = p.wcs[i];
                    self.on_completion(wc, &mut p.reasm, &mut p.done);
                }
            }
        }
        Ok(n > 0)
    }

    /// Progress run by a user's thread: one waiting on one of this connection's operations (or
    /// messages) in busy-poll mode, or one posting work (in either mode). Polls the CQ unless
    /// another thread is already doing so, and counts as driving (which only busy-poll mode's
    /// poller looks at). A failed poll kills the connection.
    #[inline]
    fn drive(&self) {
        // A hint, not a count: a lost increment when two threads drive at once changes nothing
        // (the value changed either way), and a plain store costs less than a locked add.
        self.drives.store(
            self.drives.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        if let Err(e) = self.progress(false) {
            self.die(verbs_io("ibv_poll_cq", e));
        }
        for i in 0..self.lanes.len() {
            if let Err(e) = self.progress_lane(i, false) {
                self.die(verbs_io("ibv_poll_cq", e));
            }
        }
    }

    /// The poller's turn at the CQ (its completion channel fired, or a busy-poll grace period
    /// ended): acknowledges the channel's events, polls up to `budget` batches, then arms the CQ
    /// and polls once more (a completion may have come before arming). `seen_drives` (busy-poll
    /// mode): the drive count when the poller decided to take over; if users drove since, it
    /// leaves the CQ unarmed to them.
    pub(crate) fn serve_cq(&self, budget: usize, seen_drives: Option<u64>) -> CqNext {
        if let Err(e) = self.cq.take_events() {
            self.die(verbs_io("ibv_get_cq_event", e));
            return CqNext::Dead;
        }
        let mut drained = false;
        for _ in 0..budget {
            match self.progress(true) {
                Ok(true) => {}
                Ok(false) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    self.die(verbs_io("ibv_poll_cq", e));
                    return CqNext::Dead;
                }
            }
        }
        if !self.is_alive() {
            return CqNext::Dead;
        }
        if !drained {
            return CqNext::More;
        }
        if seen_drives.is_some_and(|d| d != self.drives()) {
            return CqNext::Driven;
        }
        if let Err(e) = self.cq.req_notify() {
            self.die(verbs_io("ibv_req_notify_cq", e));
            return CqNext::Dead;
        }
        match self.progress(true) {
            Ok(true) => CqNext::More,
            Ok(false) => CqNext::Armed,
            Err(e) => {
                self.die(verbs_io("ibv_poll_cq", e));
                CqNext::Dead
            }
        }
    }

    /// Whether a request of `kind` for the first lane must wait in `held` now: a notification
    /// or message segment while stripes are in flight on a further lane or something is held.
    #[inline]
    fn must_hold(&self, st: &State, kind: &JobKind) -> bool {
        !self.lanes.is_empty()
            && kind.needs_credit()
            && (!st.held.is_empty() || self.stripes_in_flight())
    }

    /// Whether a further lane has requests posted and not yet retired.
    fn stripes_in_flight(&self) -> bool {
        // Acquire: pairs with the stores of `post_lane` and `progress_lane` (made under the lane's
        // lock, after the change), so a retirement seen here is complete.
        self.lanes
            .iter()
            .any(|l| l.posted.load(Ordering::Acquire) > l.retired.load(Ordering::Acquire))
    }

    /// The fence of a request held now: every further lane's last posted request.
    fn fence(&self) -> [u64; MAX_LANES] {
        let mut f = [0; MAX_LANES];
        for (f, l) in f.iter_mut().zip(&self.lanes) {
            *f = l.posted.load(Ordering::Acquire);
        }
        f
    }

    /// Whether every further lane has retired what `fence` names.
    fn fence_passed(&self, fence: &[u64; MAX_LANES]) -> bool {
        self.lanes
            .iter()
            .zip(fence)
            .all(|(l, f)| l.retired.load(Ordering::Acquire) >= *f)
    }

    /// Posts the held requests whose fence has passed, in order, while the first lane has room
    /// and credits; never waits (called from completion handling and credit returns, so a held
    /// request goes as soon as it may, whoever is around).
    fn release_held(&self) {
        if self.lanes.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        let mut failed = None;
        while let Some(h) = st.held.front() {
            if !self.fence_passed(&h.fence)
                || st.pending.len() as u32 >= self.sq_depth
                || (h.kind.needs_credit() && st.credits.available() == 0)
                || !self.alive.load(Ordering::Acquire)
            {
                break;
            }
            let Some(h) = st.held.pop_front() else {
                break;
            };
            let seq = st.next_seq;
            let sge = match &h.local {
                HeldData::Inline(b) => Sge::Inline(b.as_slice()),
                HeldData::Slot { slot, len } => Sge::Mr {
                    mr: &self.send_mr,
                    offset: slot * self.recv_size,
                    len: *len,
                },
            };
            let Some(qp) = st.qp.as_mut() else {
                failed = Some((h.completer, self.dead_error()));
                break;
            };
            if let Err(e) = qp.post_send(seq, h.kind.send_op(0, true), sge, true) {
                failed = Some((h.completer, verbs_io("ibv_post_send", e)));
                break;
            }
            if let HeldData::Slot { slot, .. } = h.local {
                st.slot_seq[slot] = seq;
            }
            let owner = match h.completer {
                Some(c) => Owner::Op(c),
                None => Owner::Chunk,
            };
            st.posted(seq, true, h.kind.needs_credit(), owner, h.remote_region);
        }
        drop(st);
        if let Some((c, e)) = failed {
            if let Some(c) = c {
                c.complete(Err(e.clone()));
            }
            self.die(e);
        }
    }

    /// The lanes a transfer striped now would use, and the peer address of its first byte;
    /// `None` when fewer than two lanes can reach both regions (a private region, a region of
    /// the peer not yet checked on the lanes): the transfer then goes the usual way.
    fn stripe_plan<'r>(&self, t: &Transfer<'r>) -> Result<Option<(Vec<LaneUse<'r>>, u64)>> {
        self.check_alive()?;
        self.check_local(t.local, t.local_offset, t.len)?;
        let Some(regs) = Regs::of(t.local) else {
            return Ok(None); // the general path names the error
        };
        let op = match t.kind {
            TransferKind::Read => ACCESS_READ,
            TransferKind::Write | TransferKind::WriteNotify(_) => ACCESS_WRITE,
        };
        let (rkey, addr) = self.resolve(t.remote, t.remote_offset, t.len as u64, op)?;
        let keys = self
            .lane_keys
            .lock()
            .get(&(t.remote.region, t.remote.key))
            .copied()
            .unwrap_or_default();
        let mut uses = vec![LaneUse {
            lane: 0,
            rkey,
            mr: &regs.main,
        }];
        for (i, lane) in self.lanes.iter().enumerate() {
            if let (Some(rkey), Some(mr)) = (keys.get(i + 1), regs.on(lane.dev)) {
                uses.push(LaneUse {
                    lane: i + 1,
                    rkey,
                    mr,
                });
            }
        }
        Ok((uses.len() > 1).then_some((uses, addr)))
    }

    /// Posts a transfer cut into one part per lane ([`stripe::plan`]); `whole` completes when
    /// every part has (and, for a notification, the empty write that carries it, posted on the
    /// first lane after the parts, held until they are done: see [`Held`]).
    fn submit_striped(
        &self,
        t: &Transfer<'_>,
        (uses, addr): (Vec<LaneUse<'_>>, u64),
        whole: Completer,
    ) {
        let parts = stripe::plan(t.len, uses.len(), 0, true);
        let notify = match t.kind {
            TransferKind::WriteNotify(imm) => Some(imm),
            _ => None,
        };
        let is_read = matches!(t.kind, TransferKind::Read);
        let mut completers = joint(
            whole,
            parts.len() + usize::from(notify.is_some()),
            self.mode,
        );
        let mut first = Vec::with_capacity(2);
        for p in &parts {
            let (Some(u), Some(c)) = (uses.get(p.stream), completers.pop()) else {
                break;
            };
            let remote = addr + p.offset as u64;
            let kind = if is_read {
                JobKind::Read {
                    rkey: u.rkey,
                    addr: remote,
                }
            } else {
                JobKind::Write {
                    rkey: u.rkey,
                    addr: remote,
                }
            };
            if let Some(lane) = u.further() {
                self.post_lane(lane, kind, t.local, t.local_offset + p.offset, p.len, c);
            } else {
                first.push(Job {
                    kind,
                    local: LocalData::Region {
                        mr: u.mr,
                        offset: t.local_offset + p.offset,
                        len: p.len,
                    },
                    completer: Some(c),
                    remote_region: t.remote.region,
                });
            }
        }
        if let (Some(imm), Some(c)) = (notify, completers.pop()) {
            first.push(Job {
                kind: JobKind::WriteImm {
                    rkey: uses[0].rkey,
                    addr,
                    imm,
                },
                local: LocalData::Inline(InlineBuf::empty()),
                completer: Some(c),
                remote_region: t.remote.region,
            });
        }
        // Any completer left (none, by construction) fails its part when dropped here.
        drop(completers);
        self.post_jobs(first.into_iter());
    }

    /// Books one part of a striped transfer on further lane `i` (index into `lanes`), in
    /// requests of at most `chunk` bytes, all signalled, `completer` with the last, and hands
    /// them to the lane poster ([`super::lanes`]). Waits only for room in the lane's send queue
    /// (back-pressure, bounded by the peer timeout; booked requests count); running out of it
    /// fails the part and the connection.
    fn post_lane(
        &self,
        i: usize,
        kind: JobKind,
        region: &Region,
        offset: usize,
        len: usize,
        completer: Completer,
    ) {
        let (Some(lane), Some(poster)) = (self.lanes.get(i), self.ep.lane_poster.as_ref()) else {
            completer.complete(Err(TransportError::InvalidArgument(format!("no lane {i}"))));
            return;
        };
        let piece = self.chunk.max(1);
        let n = len.div_ceil(piece).max(1);
        let mut completer = Some(completer);
        let mut failed = None;
        let mut st = lane.st.lock();
        for ci in 0..n {
            let (off, l) = (ci * piece, piece.min(len - ci * piece));
            let mut deadline = None;
            loop {
                if !self.alive.load(Ordering::Acquire) {
                    failed = Some(self.dead_error());
                    break;
                }
                if (st.pending.len() as u32) < lane.sq_depth {
                    break;
                }
                let reaped = parking_lot::MutexGuard::unlocked(&mut st, || {
                    matches!(self.progress_lane(i, false), Ok(true))
                });
                if reaped || (st.pending.len() as u32) < lane.sq_depth {
                    continue;
                }
                let wait = self.ep.config.peer_timeout.max(Duration::from_secs(1)) * 4;
                let until = *deadline.get_or_insert_with(|| Instant::now() + wait);
                if lane.space.wait_until(&mut st, until).timed_out()
                    && st.pending.len() as u32 >= lane.sq_depth
                {
                    failed = Some(TransportError::PeerDead {
                        peer: self.peer,
                        reason: format!("no progress on lane {} in {wait:?}", i + 1),
                    });
                    break;
                }
            }
            if failed.is_some() {
                break;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let owner = if ci + 1 == n { completer.take() } else { None };
            st.pending.push_back((seq, owner));
            st.outbox.push_back(LaneWr {
                seq,
                kind,
                off,
                region: region.clone(),
                offset: offset + off,
                len: l,
            });
            lane.posted.store(seq, Ordering::Release);
        }
        drop(st);
        poster.kick(self.me.clone(), i);
        if let Some(e) = failed {
            if let Some(c) = completer.take() {
                c.complete(Err(e.clone()));
            }
            if self.alive.load(Ordering::Acquire) {
                self.die(e);
            }
        }
    }

    /// Posts what is booked on further lane `i`, in order (the lane poster's thread). The lane's
    /// bookkeeping lock is not held during a post (on soft-RoCE a post may move the data before
    /// it returns, and completions must be handled meanwhile).
    pub(crate) fn flush_lane(&self, i: usize) {
        let Some(lane) = self.lanes.get(i) else {
            return;
        };
        let mut qp = lane.qp.lock();
        loop {
            if !self.alive.load(Ordering::Acquire) {
                // `die` may have found the QP busy: fail it now (flushes what is posted).
                if let Some(q) = qp.as_mut() {
                    if !q.is_error() {
                        let _ = q.set_error();
                    }
                }
                lane.st.lock().outbox.clear();
                return;
            }
            let Some(wr) = lane.st.lock().outbox.pop_front() else {
                return;
            };
            let Some(mr) = Regs::of(&wr.region).and_then(|r| r.on(lane.dev)) else {
                drop(qp);
                self.die(local_error(
                    &wr.region,
                    "is not registered on a lane's device",
                ));
                return;
            };
            let Some(q) = qp.as_mut() else {
                return;
            };
            let sge = Sge::Mr {
                mr,
                offset: wr.offset,
                len: wr.len,
            };
            if let Err(e) = q.post_send(wr.seq, wr.kind.send_op(wr.off, true), sge, true) {
                drop(qp);
                self.die(verbs_io("ibv_post_send", e));
                return;
            }
        }
    }

    /// Polls further lane `i`'s CQ once and retires what completed (see [`RdmaConn::progress`]
    /// for `wait_lock`); then posts held requests whose fence passed. An error completion fails
    /// its part with its error and the connection.
    fn progress_lane(&self, i: usize, wait_lock: bool) -> std::result::Result<bool, VerbsError> {
        let Some(lane) = self.lanes.get(i) else {
            return Ok(false);
        };
        let mut wcs = if wait_lock {
            lane.poll.lock()
        } else {
            match lane.poll.try_lock() {
                Some(g) => g,
                None => return Ok(false),
            }
        };
        wcs.clear();
        let n = lane.cq.poll(&mut wcs, 32)?;
        if n == 0 {
            return Ok(false);
        }
        let mut done = Vec::new();
        let mut failed = None;
        {
            let mut st = lane.st.lock();
            for wc in wcs.iter() {
                match wc.status {
                    Ok(()) => {
                        while st.pending.front().is_some_and(|(s, _)| *s <= wc.wr_id) {
                            if let Some((_, Some(c))) = st.pending.pop_front() {
                                done.push(c);
                            }
                        }
                        let r = lane.retired.load(Ordering::Relaxed).max(wc.wr_id);
                        lane.retired.store(r, Ordering::Release);
                    }
                    Err(WcError::Flushed) => {}
                    Err(e) if failed.is_none() => {
                        let err = self.map_wc_error(e, 0);
                        // The failed request's part: the first pending one with a completer.
                        let c = st.pending.iter_mut().find_map(|(_, c)| c.take());
                        failed = Some((c, err));
                    }
                    Err(_) => {}
                }
            }
        }
        drop(wcs);
        lane.space.notify_all();
        for c in done {
            c.complete(Ok(()));
        }
        if let Some((c, err)) = failed {
            if let Some(c) = c {
                c.complete(Err(err.clone()));
            }
            self.die(match err {
                TransportError::UnknownRegion { .. } => {
                    TransportError::ConnectionClosed { peer: self.peer }
                }
                e => e,
            });
        } else {
            self.release_held();
        }
        Ok(true)
    }

    /// The poller's turn at further lane `i`'s CQ (as [`RdmaConn::serve_cq`], without the
    /// busy-poll hand-over: waiters drive lanes through `drive` too, and the poller always
    /// re-arms).
    pub(crate) fn serve_lane(&self, i: usize, budget: usize) -> CqNext {
        let Some(lane) = self.lanes.get(i) else {
            return CqNext::Armed;
        };
        if let Err(e) = lane.cq.take_events() {
            self.die(verbs_io("ibv_get_cq_event", e));
            return CqNext::Dead;
        }
        let mut drained = false;
        for _ in 0..budget {
            match self.progress_lane(i, true) {
                Ok(true) => {}
                Ok(false) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    self.die(verbs_io("ibv_poll_cq", e));
                    return CqNext::Dead;
                }
            }
        }
        if !self.is_alive() {
            return CqNext::Dead;
        }
        if !drained {
            return CqNext::More;
        }
        if let Err(e) = lane.cq.req_notify() {
            self.die(verbs_io("ibv_req_notify_cq", e));
            return CqNext::Dead;
        }
        match self.progress_lane(i, true) {
            Ok(true) => CqNext::More,
            Ok(false) => CqNext::Armed,
            Err(e) => {
                self.die(verbs_io("ibv_poll_cq", e));
                CqNext::Dead
            }
        }
    }

    /// The completion channels' fds of the further lanes, in lane order.
    pub(crate) fn lane_fds(&self) -> Vec<Option<RawFd>> {
        self.lanes.iter().map(|l| l.cq.event_fd()).collect()
    }

    /// This connection's id in the endpoint's poller.
    pub(crate) fn poll_id(&self) -> usize {
        self.poll_id
    }

    /// The completion channel's fd (`None` if the CQ has none).
    pub(crate) fn cq_fd(&self) -> Option<RawFd> {
        self.cq.event_fd()
    }

    /// The side channel's fd.
    pub(crate) fn side_fd(&self) -> RawFd {
        self.side.as_raw_fd()
    }

    /// The endpoint's peer timeout.
    pub(crate) fn peer_timeout(&self) -> Duration {
        self.ep.config.peer_timeout
    }

    /// Busy-poll mode: users drive the CQ themselves.
    pub(crate) fn busy_poll(&self) -> bool {
        self.driver.is_some()
    }

    /// The drive count (see `drives`).
    pub(crate) fn drives(&self) -> u64 {
        self.drives.load(Ordering::Relaxed)
    }

    /// Whether the connection is up.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Retires send work requests up to `seq`, whose completion succeeded (requests complete in
    /// order: those before it succeeded too), completing their operations; `done` is scratch space
    /// (empty between calls).
    #[inline]
    fn retire(&self, seq: u64, done: &mut Vec<Completer>) {
        {
            let mut st = self.state.lock();
            while st.pending.front().is_some_and(|p| p.seq <= seq) {
                if let Some(Pending {
                    owner: Owner::Op(c),
                    ..
                }) = st.pending.pop_front()
                {
                    done.push(c);
                }
            }
            st.retired = st.retired.max(seq);
            self.retired.store(st.retired, Ordering::Release);
        }
        self.space.notify_all();
        if !done.is_empty() {
            for c in done.drain(..) {
                c.complete_into(Ok(()), &self.ops);
            }
        }
        // Room on the first lane: a held request may go now.
        self.release_held();
    }

    /// Handles one completion: a receive, a success (see [`RdmaConn::retire`]) or a failure.
    /// Out of line, so that `progress`, whose common case is one success, stays small.
    #[inline(never)]
    fn on_completion(&self, wc: Completion, reasm: &mut Reassembly, done: &mut Vec<Completer>) {
        if wc.wr_id & RECV_BIT != 0 {
            let slot = (wc.wr_id & !RECV_BIT) as usize;
            if let Err(e) = wc.status {
                if e != WcError::Flushed {
                    self.die(TransportError::PeerMisbehaved {
                        peer: Some(self.peer),
                        what: format!("receive failed: {e}"),
                    });
                }
                return;
            }
            match wc.opcode {
                WcOpcode::RecvWriteImm => match wc.imm {
                    Some(imm) => {
                        let ret = {
                            let mut r = self.recv.lock();
                            let freed = r.on_receive();
                            r.queued(0);
                            self.notes.lock().push_back((imm, u32::from(!freed)));
                            r.poll_return()
                        };
                        self.notes_cv.notify_all();
                        self.return_credits(ret);
                    }
                    None => self.give_back(1),
                },
                WcOpcode::Recv => {
                    if let Err(v) = self.on_segment(slot, wc.byte_len as usize, reasm) {
                        self.misbehaved(v);
                        return;
                    }
                }
                _ => self.give_back(1),
            }
            // The buffer's bytes were copied out: re-post it now. Its credit goes back to the
            // peer when the application takes what arrived in it (`give_back`).
            let mut st = self.state.lock();
            if let Some(qp) = st.qp.as_mut() {
                if let Err(e) = qp.post_recv(
                    wc.wr_id,
                    &self.recv_mr,
                    slot * self.recv_size,
                    self.recv_size,
                ) {
                    drop(st);
                    self.die(verbs_io("ibv_post_recv", e));
                }
            }
            return;
        }
        if wc.status.is_ok() {
            self.retire(wc.wr_id, done);
            return;
        }
        let seq = wc.wr_id;
        done.clear();
        let mut failed = None;
        {
            let mut st = self.state.lock();
            // A failed request (successes went to `retire`). Requests complete in order: those
            // before `seq` succeeded.
            while st.pending.front().is_some_and(|p| p.seq < seq) {
                if let Some(p) = st.pending.pop_front() {
                    st.retired = st.retired.max(p.seq);
                    if let Owner::Op(c) = p.owner {
                        done.push(c);
                    }
                }
            }
            self.retired.store(st.retired, Ordering::Release);
            if let Err(e) = wc.status {
                if e != WcError::Flushed {
                    // The failed request's operation: the first pending op at or after it.
                    let region = st.pending.front().map(|p| p.remote_region).unwrap_or(0);
                    let err = self.map_wc_error(e, region);
                    let first = st
                        .pending
                        .iter_mut()
                        .find(|p| !matches!(p.owner, Owner::Chunk))
                        .map(|p| (p.seq, std::mem::replace(&mut p.owner, Owner::Chunk)));
                    let completer = match first {
                        Some((s, Owner::Submitter)) => {
                            st.reaped_error = Some((s, err.clone()));
                            None
                        }
                        Some((_, Owner::Op(c))) => Some(c),
                        Some((_, Owner::Chunk)) | None => None,
                    };
                    failed = Some((completer, err));
                }
            }
        }
        self.space.notify_all();
        for c in done.drain(..) {
            c.complete_into(Ok(()), &self.ops);
        }
        if let Some((c, err)) = failed {
            if let Some(c) = c {
                c.complete(Err(err.clone()));
            }
            let reason = match &err {
                TransportError::UnknownRegion { .. } => {
                    TransportError::ConnectionClosed { peer: self.peer }
                }
                e => e.clone(),
            };
            self.die(reason);
        }
    }

    /// Adds the segment of `len` bytes in receive slot `slot` to the message being reassembled,
    /// delivering it after its last segment. A segment's credit goes back now unless the queues
    /// are full: a message longer than the receive credits must be able to complete.
    fn on_segment(
        &self,
        slot: usize,
        len: usize,
        reasm: &mut Reassembly,
    ) -> std::result::Result<(), Violation> {
        let mem = self.recv_mr.mem().read();
        let start = slot * self.recv_size;
        let buffer = mem.get(start..start + self.recv_size).unwrap_or(&[]);
        let mut r = self.recv.lock();
        let freed = r.on_receive();
        let done = reasm.push(buffer, len, !freed)?;
        drop(mem);
        if let Some((msg, withheld)) = done {
            r.queued(msg.len());
            self.msgs.lock().push_back((msg, withheld));
        }
        let ret = r.poll_return();
        drop(r);
        self.msgs_cv.notify_all();
        self.return_credits(ret);
        Ok(())
    }

    fn map_wc_error(&self, e: WcError, region: u64) -> TransportError {
        match e {
            WcError::RemoteAccess => TransportError::UnknownRegion { region },
            WcError::RetryExceeded => TransportError::PeerDead {
                peer: self.peer,
                reason: "no acknowledgement (transport retries exceeded)".into(),
            },
            WcError::RnrRetryExceeded => TransportError::PeerDead {
                peer: self.peer,
                reason: "peer posted no receive (RNR retries exceeded)".into(),
            },
            WcError::RemoteInvalidRequest => TransportError::PeerMisbehaved {
                peer: Some(self.peer),
                what: "remote invalid request (message larger than its receive buffer?)".into(),
            },
            e => TransportError::io("ibv_poll_cq", io::Error::other(e.to_string())),
        }
    }

    /// Handles one side-channel frame that arrived at `now` (see [`SideChannel::on_frame`]).
    /// `Err`: the connection failed.
    fn on_side_frame(&self, side: &mut SideChannel, f: Frame, now: Instant) -> Result<()> {
        let r = match side.on_frame(f, now) {
            Ok(Incoming::Nothing) => Ok(()),
            Ok(Incoming::Credits(n)) => {
                let r = self.state.lock().credits.returned(n);
                self.space.notify_all();
                self.release_held();
                r
            }
            Ok(Incoming::Query { req, region, key }) => {
                let granted = self.grants.lock().get(&region).map(|g| u64::from(g.rkey));
                let (status, verdict) =
                    proto::region_status(&self.ep.table, granted, region, key, |r| {
                        self.our_lane_keys(r)
                    });
                self.send_frame(&Frame::RegionInfo { req, status })?;
                verdict
            }
            Ok(Incoming::Answer { req, status }) => {
                let r = self.queries.lock().answer(req, status);
                self.queries_cv.notify_all();
                r
            }
            Err(v) => Err(v),
        };
        r.map_err(|v| {
            self.misbehaved(v);
            self.dead_error()
        })
    }

    /// Timers of the side channel at `now` (the poller): a heartbeat, or the peer's death after
    /// silence.
    pub(crate) fn side_timeout(&self, side: &mut SideChannel, now: Instant) {
        match side.handle_timeout(now) {
            Timer::Idle => {}
            Timer::Heartbeat => {
                let _ = self.send_frame(&Frame::Heartbeat);
            }
            Timer::Dead(silent) => self.die(TransportError::PeerDead {
                peer: self.peer,
                reason: format!("nothing heard for {silent:?}"),
            }),
        }
    }

    /// The side channel is readable (the poller): reads until `WouldBlock` or `budget` bytes and
    /// handles every complete frame. Returns whether bytes may be left (the budget ran out).
    pub(crate) fn side_readable(
        &self,
        side: &mut SideChannel,
        reader: &mut FrameReader,
        budget: usize,
        now: Instant,
    ) -> bool {
        const STEP: usize = 16 << 10;
        let mut left = budget;
        while self.is_alive() {
            let step = left.min(STEP);
            let filled = reader.fill(&mut &self.side, step);
            // The frames that arrived count even if the stream ended after them.
            loop {
                match reader.parse() {
                    Ok(Some(f)) => {
                        if self.on_side_frame(side, f, now).is_err() {
                            return false;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.die(self.side_read_error(e));
                        return false;
                    }
                }
            }
            match filled {
                Ok(true) => return false,
                Ok(false) => {
                    left = left.saturating_sub(step);
                    if left == 0 {
                        return true;
                    }
                }
                Err(e) => {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        self.drain_cq();
                    }
                    self.die(self.side_read_error(e));
                    return false;
                }
            }
        }
        false
    }

    /// Delivers what the CQ holds before the connection fails on the peer's orderly close: a
    /// message the peer sent just before closing completed on its side only once our receive
    /// had, so it is in our CQ, possibly not yet polled (its event and the side channel's end may
    /// come in one batch). Bounded by [`DRAIN_BATCHES`].
    fn drain_cq(&self) {
        for _ in 0..DRAIN_BATCHES {
            if !matches!(self.progress(true), Ok(true)) {
                break;
            }
        }
    }

    /// The connection's error for a failed side-channel read.
    fn side_read_error(&self, e: io::Error) -> TransportError {
        if e.kind() == io::ErrorKind::InvalidData {
            TransportError::InvalidFrame {
                peer: Some(self.peer),
                expected: "side-channel frame",
                got: e.to_string(),
            }
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            TransportError::PeerDead {
                peer: self.peer,
                reason: "the peer closed the connection".into(),
            }
        } else {
            TransportError::PeerDead {
                peer: self.peer,
                reason: format!("side channel: {e}"),
            }
        }
    }
}

/// The user's handle; dropping it closes the connection.
pub(crate) struct RdmaConnection {
    c: Arc<RdmaConn>,
}

impl RdmaConnection {
    pub(crate) fn new(c: Arc<RdmaConn>) -> Self {
        Self { c }
    }
}

impl Drop for RdmaConnection {
    fn drop(&mut self) {
        self.c
            .die(TransportError::ConnectionClosed { peer: self.c.peer });
    }
}

impl std::fmt::Debug for RdmaConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConnection")
            .field("peer", &self.c.peer)
            .field("alive", &self.c.alive.load(Ordering::Relaxed))
            .finish()
    }
}

/// An item of the inbound queues: a message or a notification.
trait QueuedItem {
    /// The bytes it counts against `max_inbound_bytes`.
    fn inbound_bytes(&self) -> usize;
}

impl QueuedItem for Vec<u8> {
    fn inbound_bytes(&self) -> usize {
        self.len()
    }
}

impl QueuedItem for u32 {
    fn inbound_bytes(&self) -> usize {
        0
    }
}

/// One of the connection's inbound queues as [`InboundQueue`] takes from them: in busy-poll mode
/// the waiting thread polls the CQ itself (the poller steps back while users drive).
fn inbound<'a, T>(
    c: &'a RdmaConn,
    q: &'a Mutex<VecDeque<(T, u32)>>,
    cv: &'a Condvar,
) -> InboundQueue<'a, VecDeque<(T, u32)>> {
    InboundQueue::new(q, cv, c.driver.as_ref())
}

/// Takes the next message or notification, waiting up to `timeout`, and gives its credits back
/// (after the queue's lock is released: returning credits takes the receive state's).
fn wait_queue<T: QueuedItem>(
    c: &RdmaConn,
    q: &Mutex<VecDeque<(T, u32)>>,
    cv: &Condvar,
    timeout: Duration,
) -> Result<T> {
    let (v, withheld) =
        inbound(c, q, cv).wait(timeout, VecDeque::pop_front, |_| c.check_alive().err())?;
    c.taken(v.inbound_bytes(), withheld);
    Ok(v)
}

/// Takes the next message or notification if there is one, and gives its credits back.
fn try_queue<T: QueuedItem>(
    c: &RdmaConn,
    q: &Mutex<VecDeque<(T, u32)>>,
    cv: &Condvar,
) -> Result<Option<T>> {
    let taken = inbound(c, q, cv).try_take(VecDeque::pop_front, |_| c.check_alive().err())?;
    Ok(taken.map(|(v, withheld)| {
        c.taken(v.inbound_bytes(), withheld);
        v
    }))
}

impl Connection for RdmaConnection {
    fn backend(&self) -> Backend {
        Backend::Rdma
    }
    fn grant(&self, region: &Region) -> Result<RemoteRegion> {
        self.c.grant(region)
    }
    fn peer_addr(&self) -> SocketAddr {
        self.c.peer
    }
    fn peer_endpoint(&self) -> EndpointId {
        self.c.peer_endpoint
    }
    fn submit(&self, transfer: Transfer<'_>) -> Result<Op> {
        self.c.submit_one(transfer)
    }
    fn send(&self, msg: &[u8]) -> Result<Op> {
        let c = &self.c;
        let max = c.ep.config.max_message_size;
        if msg.len() > max {
            return Err(TransportError::MessageTooLarge {
                len: msg.len(),
                max,
            });
        }
        // The handshake guarantees a peer receive size of at least the segment header.
        let Some(segments) = proto::segments(msg, c.send_seg) else {
            return Err(TransportError::MessageTooLarge {
                len: msg.len(),
                max: 0,
            });
        };
        c.check_alive()?;
        let (op, completer) = c.ops.op(None);
        let mut completer = Some(completer);
        // One message at a time on the wire: its segments must arrive back to back.
        let _order = c.send_order.lock();
        let n = segments.len();
        for (i, (flag, part)) in segments.enumerate() {
            let last = i + 1 == n;
            let len = SEG_HEADER + part.len();
            let inline = if len <= c.max_inline {
                InlineBuf::of(&[&[flag], part])
            } else {
                None
            };
            let local = if let Some(b) = inline {
                LocalData::Inline(b)
            } else {
                // Copy into the next staging slot once its previous send has completed.
                let slot = {
                    let mut st = c.state.lock();
                    let s = st.next_slot;
                    st.next_slot = (s + 1) % SEND_SLOTS;
                    let deadline = Instant::now() + c.ep.config.peer_timeout * 4;
                    while st.slot_seq[s] > st.retired && c.alive.load(Ordering::Acquire) {
                        if c.space.wait_until(&mut st, deadline).timed_out() {
                            let err = TransportError::PeerDead {
                                peer: c.peer,
                                reason: "send staging never freed".into(),
                            };
                            drop(st);
                            if i > 0 {
                                // Part of the message is on the wire: the stream is broken.
                                c.die(err.clone());
                            }
                            return Err(err);
                        }
                    }
                    c.check_alive()?;
                    // Reserve the slot: a concurrent sender waits until this send is posted and done.
                    st.slot_seq[s] = u64::MAX;
                    s
                };
                let start = slot * c.recv_size;
                if let Some(dst) = c.send_mr.mem().write().get_mut(start..start + len) {
                    if let Some((h, rest)) = dst.split_first_mut() {
                        *h = flag;
                        rest.copy_from_slice(part);
                    }
                }
                LocalData::Slot { slot, len }
            };
            let job = Job {
                kind: JobKind::Send,
                local,
                completer: if last { completer.take() } else { None },
                remote_region: 0,
            };
            c.post_jobs(std::iter::once(job));
            if !last {
                // A leading segment that could not be posted killed the connection.
                c.check_alive()?;
            }
        }
        Ok(op)
    }
    fn recv(&self, timeout: Duration) -> Result<Vec<u8>> {
        wait_queue(&self.c, &self.c.msgs, &self.c.msgs_cv, timeout)
    }
    fn try_recv(&self) -> Result<Option<Vec<u8>>> {
        try_queue(&self.c, &self.c.msgs, &self.c.msgs_cv)
    }
    fn recv_notification(&self, timeout: Duration) -> Result<u32> {
        wait_queue(&self.c, &self.c.notes, &self.c.notes_cv, timeout)
    }
    fn try_recv_notification(&self) -> Result<Option<u32>> {
        try_queue(&self.c, &self.c.notes, &self.c.notes_cv)
    }
    fn post_batch(&self, transfers: &[Transfer<'_>]) -> Result<Batch> {
        self.c.check_alive()?;
        let mut b =
            BatchBuilder::new(self.c.mode, transfers.len()).with_progress(self.c.driver.clone());
        let mut jobs = Vec::with_capacity(transfers.len());
        for t in transfers {
            if !self.c.lanes.is_empty() && t.len >= STRIPE_MIN {
                match self.c.stripe_plan(t) {
                    Ok(Some(plan)) => {
                        // What came before it in the batch is posted first (its notification
                        // must not pass them).
                        self.c.post_jobs(std::mem::take(&mut jobs).into_iter());
                        let whole = b.op_keeping(t.local.clone());
                        self.c.submit_striped(t, plan, whole);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        b.failed(e);
                        continue;
                    }
                }
            }
            match self.c.job(t, |keep| b.op_keeping(keep)) {
                Ok(j) => jobs.push(j),
                Err(e) => b.failed(e),
            }
        }
        self.c.post_jobs(jobs.into_iter());
        Ok(b.build())
    }
    fn is_alive(&self) -> bool {
        self.c.alive.load(Ordering::Acquire)
    }
    fn close(&self) {
        self.c
            .die(TransportError::ConnectionClosed { peer: self.c.peer });
    }
}
