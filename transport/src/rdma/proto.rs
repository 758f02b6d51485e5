//! One RDMA connection's protocol logic as plain state machines: send and receive credits,
//! message segmentation and reassembly, the peer-region cache and open region checks, and
//! liveness (heartbeats, the dead-peer bound). No sockets, no verbs, no clocks, no threads.
//!
//! Contract (as [`crate::tcp::proto`]): time is passed in (`now`), and bytes arrive as slices the
//! caller copied out of a receive buffer or frames it decoded from the side channel. The caller
//! (`conn.rs` and the endpoint's poller) only posts work requests, polls completions and moves
//! frames; every decision about what a peer may do lives here, where the tests below drive two
//! sides against each other in memory, with a fake clock.
//!
//! The pieces, and who calls them:
//! - [`SendCredits`]: the peer's pre-posted receive buffers we may still consume (a SEND segment or
//!   a WRITE WITH IMM each takes one). Inputs: [`SendCredits::try_take`] before posting,
//!   [`SendCredits::returned`] when a [`Frame::Credits`] arrives (more than are outstanding is a
//!   [`Violation`]).
//! - [`RecvCredits`]: our receive buffers the peer consumed. A consumed buffer is re-posted at once;
//!   its credit goes back while the inbound queues are under their bounds, else it is *withheld*
//!   with the queued item until the application takes it — a peer that floods is held by
//!   back-pressure. Outputs: [`RecvCredits::poll_return`] (a batch to send back).
//! - [`segments`] and [`Reassembly`]: a message larger than the peer's receive buffer goes as
//!   several SENDs with a one-byte header (more follows / last); the receiver checks every header
//!   and the size bound before it copies a byte.
//! - [`RegionCache`], [`Queries`], [`region_status`], [`remote_range`]: a peer region is checked
//!   with its owner once (side channel) and cached; the range, access and key of every transfer are
//!   checked against the cached answer before anything is posted.
//! - [`SideChannel`]: classifies incoming side-channel frames and keeps the connection's
//!   [`Liveness`] (the timers every backend shares); its [`SideChannel::handle_timeout`] says when
//!   to send a heartbeat and when the peer is dead.

use super::wire::{
    Frame, LaneKeys, RegionStatus, ACCESS_READ, ACCESS_WRITE, SEG_HEADER, SEG_LAST, SEG_MORE,
};
use crate::error::TransportError;
use crate::liveness::{self, Liveness, Timer};
use crate::region::{RegionAccess, RegionTable, RemoteRegion};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a peer did wrong: the connection fails with [`TransportError::PeerMisbehaved`] naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A SEND with no segment header.
    #[error("message segment without its header")]
    EmptySegment,
    /// A segment header that is neither "more follows" nor "last".
    #[error("bad message segment header {0:#x}")]
    BadSegmentHeader(u8),
    /// A message growing past the receiver's `max_message_size`.
    #[error("message of more than {max} bytes (the max_message_size) sent anyway")]
    MessageTooLarge {
        /// The receiver's bound.
        max: usize,
    },
    /// A completion claiming more bytes than its receive buffer holds.
    #[error("receive of {len} bytes does not fit a {buffer}-byte receive buffer")]
    OversizedReceive {
        /// Bytes the completion claims.
        len: usize,
        /// Bytes of the buffer.
        buffer: usize,
    },
    /// More credits returned than we ever consumed.
    #[error("returned {returned} credits with only {outstanding} outstanding")]
    TooManyCredits {
        /// Credits in the frame.
        returned: u32,
        /// Credits we had consumed and not yet got back.
        outstanding: u32,
    },
    /// A region answer nobody asked for (or a second answer to one question).
    #[error("answer {req} to no open region check")]
    UnsolicitedAnswer {
        /// The request id it named.
        req: u64,
    },
    /// A region check with a wrong key (answered, then the connection closes: rkeys are 32 bits,
    /// so a peer gets no free guesses).
    #[error("presented a wrong key for region {region}")]
    WrongKey {
        /// The region it named.
        region: u64,
    },
    /// A set-up frame (or another frame with no meaning) after the connection was established.
    #[error("unexpected side-channel frame {0}")]
    UnexpectedFrame(String),
}

/// Send credits: how many more SEND segments or notifications the peer has receive buffers for.
#[derive(Debug, Clone)]
pub struct SendCredits {
    available: u32,
    /// The peer's receive depth, from the handshake: never more than this may be outstanding.
    granted: u32,
}

impl SendCredits {
    /// The peer posted `granted` receive buffers (its handshake's `credits`).
    pub fn new(granted: u32) -> Self {
        Self {
            available: granted,
            granted,
        }
    }

    /// Credits left.
    #[inline]
    pub fn available(&self) -> u32 {
        self.available
    }

    /// Takes one credit for a request that consumes a peer receive; `false`: none left, wait for
    /// a [`Frame::Credits`].
    #[inline]
    pub fn try_take(&mut self) -> bool {
        match self.available.checked_sub(1) {
            Some(n) => {
                self.available = n;
                true
            }
            None => false,
        }
    }

    /// The peer returned `n` credits. More than are outstanding is a violation (and changes
    /// nothing).
    pub fn returned(&mut self, n: u32) -> Result<(), Violation> {
        let outstanding = self.granted - self.available;
        if n > outstanding {
            return Err(Violation::TooManyCredits {
                returned: n,
                outstanding,
            });
        }
        self.available += n;
        Ok(())
    }
}

/// Receive credits: our receive buffers the peer consumed, and the inbound queues they feed.
#[derive(Debug, Clone)]
pub struct RecvCredits {
    /// Freed, not yet returned.
    unreturned: u32,
    /// Return credits in batches of this many (a quarter of the receive depth): one frame per
    /// batch, and the peer never runs dry while a batch fills.
    return_at: u32,
    /// Items (messages and notifications) the application has not taken yet.
    items: usize,
    /// Message bytes in those items.
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
}

impl RecvCredits {
    /// For `depth` receive buffers feeding queues bounded by `max_items` items and `max_bytes`
    /// message bytes (the endpoint's `max_inbound_queue` / `max_inbound_bytes`).
    pub fn new(depth: u32, max_items: usize, max_bytes: usize) -> Self {
        Self {
            unreturned: 0,
            return_at: (depth / 4).max(1),
            items: 0,
            bytes: 0,
            max_items,
            max_bytes,
        }
    }

    /// Whether the inbound queues are under their bounds.
    pub fn under_bounds(&self) -> bool {
        self.items < self.max_items && self.bytes < self.max_bytes
    }

    /// One receive buffer was consumed (and is re-posted). `true`: its credit is freed now;
    /// `false`: the queues are full, the caller keeps the credit with what arrived (withheld) and
    /// hands it back through [`RecvCredits::taken`].
    pub fn on_receive(&mut self) -> bool {
        let now = self.under_bounds();
        if now {
            self.release(1);
        }
        now
    }

    /// Frees `n` credits (a receive that queued nothing, or withheld credits of a taken item).
    pub fn release(&mut self, n: u32) {
        self.unreturned = self.unreturned.saturating_add(n);
    }

    /// An item of `bytes` entered the inbound queues.
    pub fn queued(&mut self, bytes: usize) {
        self.items += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// The application took an item of `bytes` that held `withheld` credits.
    pub fn taken(&mut self, bytes: usize, withheld: u32) {
        self.items = self.items.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        self.release(withheld);
    }

    /// Credits to return now, if a batch is full (then they count as returned).
    pub fn poll_return(&mut self) -> Option<u32> {
        (self.unreturned >= self.return_at).then(|| std::mem::take(&mut self.unreturned))
    }
}

/// The segments of a message for a peer whose receive buffers hold `segment` bytes (header
/// included): `(header byte, payload)` in order. An empty message is one header-only segment.
/// `None` if `segment` leaves no room for payload and the message is not empty.
pub fn segments(msg: &[u8], segment: usize) -> Option<impl ExactSizeIterator<Item = (u8, &[u8])>> {
    let per = segment.saturating_sub(SEG_HEADER);
    if per == 0 && !msg.is_empty() {
        return None;
    }
    let n = if msg.is_empty() {
        1
    } else {
        msg.len().div_ceil(per)
    };
    Some((0..n).map(move |i| {
        let start = i * per;
        let end = (start + per).min(msg.len());
        let flag = if i + 1 == n { SEG_LAST } else { SEG_MORE };
        (flag, msg.get(start..end).unwrap_or(&[]))
    }))
}

/// The message being reassembled from its segments, with the credits it withholds.
#[derive(Debug, Default)]
pub struct Reassembly {
    partial: Vec<u8>,
    withheld: u32,
    max: usize,
}

impl Reassembly {
    /// Messages of at most `max` bytes (the receiver's `max_message_size`).
    pub fn new(max: usize) -> Self {
        Self {
            partial: Vec::new(),
            withheld: 0,
            max,
        }
    }

    /// Whether a message is partly received.
    #[cfg(test)]
    pub fn in_progress(&self) -> bool {
        !self.partial.is_empty() || self.withheld > 0
    }

    /// Adds the segment that a completion says filled `len` bytes of the receive buffer `buffer`;
    /// `withheld`: its credit was withheld ([`RecvCredits::on_receive`] said `false`). Returns the
    /// whole message with the credits it withholds after its last segment. Peer bytes are checked
    /// before anything is copied: on error the message so far is dropped.
    pub fn push(
        &mut self,
        buffer: &[u8],
        len: usize,
        withheld: bool,
    ) -> Result<Option<(Vec<u8>, u32)>, Violation> {
        let done = match self.push_checked(buffer, len) {
            Ok(done) => done,
            Err(v) => {
                self.partial = Vec::new();
                self.withheld = 0;
                return Err(v);
            }
        };
        self.withheld += u32::from(withheld);
        Ok(done.then(|| {
            (
                std::mem::take(&mut self.partial),
                std::mem::take(&mut self.withheld),
            )
        }))
    }

    /// Appends the segment's payload; `Ok(true)` after the last segment.
    fn push_checked(&mut self, buffer: &[u8], len: usize) -> Result<bool, Violation> {
        let seg = buffer.get(..len).ok_or(Violation::OversizedReceive {
            len,
            buffer: buffer.len(),
        })?;
        let (&flag, payload) = seg.split_first().ok_or(Violation::EmptySegment)?;
        if flag != SEG_MORE && flag != SEG_LAST {
            return Err(Violation::BadSegmentHeader(flag));
        }
        if self.partial.len().saturating_add(payload.len()) > self.max {
            return Err(Violation::MessageTooLarge { max: self.max });
        }
        self.partial.extend_from_slice(payload);
        Ok(flag == SEG_LAST)
    }
}

/// A peer region as its owner described it: `(length, address, access bits)`.
pub type PeerRegion = (u64, u64, u8);

/// Peer regions already checked with the peer: `(region, key) -> (length, address, access)`,
/// with the last one used in front (the common case: many transfers to one region) to skip the
/// hash.
#[derive(Debug, Default)]
pub struct RegionCache {
    last: Option<(u64, u64, PeerRegion)>,
    map: HashMap<(u64, u64), PeerRegion>,
}

impl RegionCache {
    /// The cached answer for `region` under `key`; `None`: ask the peer ([`Queries::ask`]).
    #[inline]
    pub fn get(&mut self, region: u64, key: u64) -> Option<PeerRegion> {
        match self.last {
            Some((r, k, v)) if r == region && k == key => Some(v),
            _ => self.get_other(region, key),
        }
    }

    #[inline(never)]
    fn get_other(&mut self, region: u64, key: u64) -> Option<PeerRegion> {
        let v = *self.map.get(&(region, key))?;
        self.last = Some((region, key, v));
        Some(v)
    }

    /// Caches the peer's answer for `region` under `key`.
    pub fn insert(&mut self, region: u64, key: u64, v: PeerRegion) {
        self.map.insert((region, key), v);
        self.last = Some((region, key, v));
    }
}

/// Region checks asked of the peer and not yet taken by the asker. Only local threads open
/// them, so their number is bounded by ours; an answer must match an open question.
#[derive(Debug, Default)]
pub struct Queries {
    open: HashMap<u64, Option<RegionStatus>>,
    next: u64,
}

impl Queries {
    /// Opens a check of `region` under `key`: its request id and the frame that asks.
    pub fn ask(&mut self, region: u64, key: u64) -> (u64, Frame) {
        self.next += 1;
        let req = self.next;
        self.open.insert(req, None);
        (req, Frame::QueryRegion { req, region, key })
    }

    /// The peer answered `req`.
    pub fn answer(&mut self, req: u64, status: RegionStatus) -> Result<(), Violation> {
        match self.open.get_mut(&req) {
            Some(slot @ None) => {
                *slot = Some(status);
                Ok(())
            }
            _ => Err(Violation::UnsolicitedAnswer { req }),
        }
    }

    /// The answer to `req` if it came (the question is then closed).
    pub fn take(&mut self, req: u64) -> Option<RegionStatus> {
        let st = (*self.open.get(&req)?)?;
        self.open.remove(&req);
        Some(st)
    }

    /// Gives up on `req` (timed out, or the connection failed); a late answer is then a
    /// violation.
    pub fn cancel(&mut self, req: u64) {
        self.open.remove(&req);
    }
}

/// A region's access as [`RegionStatus::Ok`] carries it.
pub fn access_bits(a: RegionAccess) -> u8 {
    let read = if a.allows_read() { ACCESS_READ } else { 0 };
    let write = if a.allows_write() { ACCESS_WRITE } else { 0 };
    read | write
}

/// The owner's answer to a check of `region` under `key` on a connection that granted `granted`
/// for it; `Err` (after the answer is sent) for a wrong key, which closes the connection.
///
/// `lanes` gives the region's keys on the connection's further lanes (none for a granted private
/// region: its memory window is bound to the first lane's QP).
pub fn region_status(
    table: &RegionTable,
    granted: Option<u64>,
    region: u64,
    key: u64,
    lanes: impl FnOnce(&crate::region::Region) -> LaneKeys,
) -> (RegionStatus, Result<(), Violation>) {
    match table.check_remote_granted(region, key, granted, None, 0, 0) {
        Ok(r) => (
            RegionStatus::Ok {
                len: r.len() as u64,
                addr: r.descriptor().addr,
                access: access_bits(r.access()),
                lanes: if granted.is_some() {
                    LaneKeys::default()
                } else {
                    lanes(&r)
                },
            },
            Ok(()),
        ),
        Err(TransportError::BadKey { .. }) => {
            (RegionStatus::BadKey, Err(Violation::WrongKey { region }))
        }
        Err(_) => (RegionStatus::Unknown, Ok(())),
    }
}

/// The requester's view of an answer about `region`: the region, or why it cannot be used.
pub fn peer_region(status: RegionStatus, region: u64) -> Result<PeerRegion, TransportError> {
    match status {
        RegionStatus::Ok {
            len, addr, access, ..
        } => Ok((len, addr, access)),
        RegionStatus::Unknown => Err(TransportError::UnknownRegion { region }),
        RegionStatus::BadKey => Err(TransportError::BadKey { region }),
    }
}

/// The rkey and address of `[offset, offset + len)` of `remote`, whose length, address and
/// access at the peer are `(size, addr, access)`, for an operation needing access bit `op`.
#[inline(always)]
pub fn remote_range(
    remote: &RemoteRegion,
    offset: u64,
    len: u64,
    op: u8,
    (size, addr, access): PeerRegion,
) -> Result<(u32, u64), TransportError> {
    match (offset.checked_add(len), u32::try_from(remote.key)) {
        (Some(end), Ok(rkey)) if end <= size && access & op != 0 => Ok((rkey, addr + offset)),
        (Some(end), Ok(_)) if end <= size => Err(TransportError::AccessDenied {
            region: remote.region,
            op: if op == ACCESS_READ { "read" } else { "write" },
        }),
        (_, rkey) => Err(resolve_error(remote, offset, len, size, rkey.is_ok())),
    }
}

/// Why [`remote_range`] refused `[offset, offset + len)` of `remote` (of `size` bytes):
/// out of bounds, else a key that cannot be an rkey.
#[cold]
fn resolve_error(
    remote: &RemoteRegion,
    offset: u64,
    len: u64,
    size: u64,
    key_ok: bool,
) -> TransportError {
    match offset.checked_add(len) {
        Some(end) if end <= size && !key_ok => TransportError::BadKey {
            region: remote.region,
        },
        _ => TransportError::RegionOutOfBounds {
            region: remote.region,
            offset,
            len,
            size,
        },
    }
}

/// The shortest heartbeat interval on the side channel, however short the peer timeout.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// The side channel's heartbeat interval for a peer timeout ([`liveness::heartbeat_interval`]).
pub fn heartbeat_interval(peer_timeout: Duration) -> Duration {
    liveness::heartbeat_interval(peer_timeout, MIN_HEARTBEAT)
}

/// An incoming side-channel frame, classified (see [`SideChannel::on_frame`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing to do (a heartbeat).
    Nothing,
    /// The peer returned `n` send credits ([`SendCredits::returned`]).
    Credits(u32),
    /// The peer asks about one of our regions: answer with [`region_status`].
    Query {
        /// Request id to echo.
        req: u64,
        /// Region id.
        region: u64,
        /// Key presented.
        key: u64,
    },
    /// The peer answered one of our checks ([`Queries::answer`]).
    Answer {
        /// Request id.
        req: u64,
        /// The answer.
        status: RegionStatus,
    },
}

/// The established side channel's inbound logic: frame classification and liveness.
#[derive(Debug, Clone)]
pub struct SideChannel {
    live: Liveness,
}

impl SideChannel {
    /// A side channel established at `now`, its peer dead after `peer_timeout` of silence.
    pub fn new(peer_timeout: Duration, now: Instant) -> Self {
        Self {
            live: Liveness::new(peer_timeout, heartbeat_interval(peer_timeout), now),
        }
    }

    /// A frame arrived at `now`.
    pub fn on_frame(&mut self, f: Frame, now: Instant) -> Result<Incoming, Violation> {
        self.live.heard(now);
        Ok(match f {
            Frame::Credits { n } => Incoming::Credits(n),
            Frame::QueryRegion { req, region, key } => Incoming::Query { req, region, key },
            Frame::RegionInfo { req, status } => Incoming::Answer { req, status },
            Frame::Heartbeat => Incoming::Nothing,
            other => return Err(Violation::UnexpectedFrame(format!("{other:?}"))),
        })
    }

    /// When [`SideChannel::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.live.poll_timeout()
    }

    /// Timers at `now` ([`Liveness::handle_timeout`]): the dead-peer bound first, then the
    /// heartbeat (a [`Frame::Heartbeat`], which counts as sent once asked for). Only heartbeats
    /// count as sent: the poller, which runs these timers, does not see the other frames go out.
    pub fn handle_timeout(&mut self, now: Instant) -> Timer {
        self.live.handle_timeout(now)
    }
}

#[cfg(test)]
mod tests {
    //! Two connections' protocol state against each other in memory, with a fake clock: the RC
    //! queue pair is a queue of segments and notifications (in order, as RC delivers), the side
    //! channel a queue of frames. No verbs, no sockets, no sleeps.
    use super::*;
    use crate::config::Backend;
    use crate::region::Region;
    use std::collections::VecDeque;
    use std::sync::Arc;

    const DEPTH: u32 = 8;
    const SEG: usize = 16; // receive buffer: header + 15 payload bytes
    const MAX_MSG: usize = 100;

    /// What one RC work request delivers into a peer receive buffer.
    #[derive(Debug)]
    enum Delivery {
        Segment(Vec<u8>),
        Notification(u32),
    }

    #[derive(Debug)]
    enum Item {
        Msg(Vec<u8>, u32),
        Note(u32, u32),
    }

    struct Side {
        send: SendCredits,
        recv: RecvCredits,
        reasm: Reassembly,
        side: SideChannel,
        queries: Queries,
        cache: RegionCache,
        /// Inbound queue (what the application has not taken), each with its withheld credits.
        inbox: VecDeque<Item>,
        /// Frames and deliveries on their way to this side.
        frames_in: VecDeque<Frame>,
        rc_in: VecDeque<Delivery>,
        regions: Arc<RegionTable>,
        granted: HashMap<u64, u64>,
        failed: Option<Violation>,
    }

    fn side(id: u64, now: Instant) -> Side {
        Side {
            send: SendCredits::new(DEPTH),
            recv: RecvCredits::new(DEPTH, 4, 1000),
            reasm: Reassembly::new(MAX_MSG),
            side: SideChannel::new(Duration::from_secs(2), now),
            queries: Queries::default(),
            cache: RegionCache::default(),
            inbox: VecDeque::new(),
            frames_in: VecDeque::new(),
            rc_in: VecDeque::new(),
            regions: RegionTable::new(id, Backend::Rdma),
            granted: HashMap::new(),
            failed: None,
        }
    }

    fn pair(now: Instant) -> (Side, Side) {
        (side(1, now), side(2, now))
    }

    /// Posts a message from `a` to `b` segment by segment, as far as credits allow; returns how
    /// many segments went out (the rest would wait for credits).
    fn send_msg(a: &mut Side, b: &mut Side, msg: &[u8]) -> usize {
        let mut sent = 0;
        for (flag, payload) in segments(msg, SEG).expect("room for payload") {
            if !a.send.try_take() {
                break;
            }
            let mut buf = vec![flag];
            buf.extend_from_slice(payload);
            b.rc_in.push_back(Delivery::Segment(buf));
            sent += 1;
        }
        sent
    }

    fn notify(a: &mut Side, b: &mut Side, imm: u32) -> bool {
        let ok = a.send.try_take();
        if ok {
            b.rc_in.push_back(Delivery::Notification(imm));
        }
        ok
    }

    /// The receiver handles its completions (in order) and returns credits in batches.
    fn deliver(b: &mut Side, a: &mut Side) {
        while let Some(d) = b.rc_in.pop_front() {
            let now_free = b.recv.on_receive();
            match d {
                Delivery::Notification(imm) => {
                    b.recv.queued(0);
                    b.inbox.push_back(Item::Note(imm, u32::from(!now_free)));
                }
                Delivery::Segment(bytes) => {
                    let mut buffer = vec![0u8; SEG];
                    buffer[..bytes.len()].copy_from_slice(&bytes);
                    match b.reasm.push(&buffer, bytes.len(), !now_free) {
                        Ok(Some((m, withheld))) => {
                            b.recv.queued(m.len());
                            b.inbox.push_back(Item::Msg(m, withheld));
                        }
                        Ok(None) => {}
                        Err(v) => b.failed = Some(v),
                    }
                }
            }
            if let Some(n) = b.recv.poll_return() {
                a.frames_in.push_back(Frame::Credits { n });
            }
        }
    }

    /// The side channel: frames to `a`, handled as the poller does.
    fn side_frames(a: &mut Side, b: &mut Side, now: Instant) {
        while let Some(f) = a.frames_in.pop_front() {
            match a.side.on_frame(f, now) {
                Ok(Incoming::Credits(n)) => {
                    if let Err(v) = a.send.returned(n) {
                        a.failed = Some(v);
                    }
                }
                Ok(Incoming::Query { req, region, key }) => {
                    let (status, verdict) = region_status(
                        &a.regions,
                        a.granted.get(&region).copied(),
                        region,
                        key,
                        |_| LaneKeys::default(),
                    );
                    b.frames_in.push_back(Frame::RegionInfo { req, status });
                    if let Err(v) = verdict {
                        a.failed = Some(v);
                    }
                }
                Ok(Incoming::Answer { req, status }) => {
                    if let Err(v) = a.queries.answer(req, status) {
                        a.failed = Some(v);
                    }
                }
                Ok(Incoming::Nothing) => {}
                Err(v) => a.failed = Some(v),
            }
        }
    }

    /// Moves everything both ways until nothing is in flight.
    fn pump(a: &mut Side, b: &mut Side, now: Instant) {
        for _ in 0..100 {
            deliver(a, b);
            deliver(b, a);
            side_frames(a, b, now);
            side_frames(b, a, now);
            if a.rc_in.is_empty()
                && b.rc_in.is_empty()
                && a.frames_in.is_empty()
                && b.frames_in.is_empty()
            {
                return;
            }
        }
        panic!("pump did not settle");
    }

    /// The application takes one item, handing back its withheld credits.
    fn take(s: &mut Side) -> Option<Item> {
        let it = s.inbox.pop_front()?;
        match &it {
            Item::Msg(m, w) => s.recv.taken(m.len(), *w),
            Item::Note(_, w) => s.recv.taken(0, *w),
        }
        Some(it)
    }

    fn flush_returns(b: &mut Side, a: &mut Side) {
        if let Some(n) = b.recv.poll_return() {
            a.frames_in.push_back(Frame::Credits { n });
        }
    }

    #[test]
    fn credits_flow_back_while_the_application_keeps_up() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        for i in 0..100u32 {
            assert!(notify(&mut a, &mut b, i), "credit for notification {i}");
            pump(&mut a, &mut b, now);
            match take(&mut b) {
                Some(Item::Note(imm, 0)) => assert_eq!(imm, i),
                other => panic!("notification {i}: {other:?}"),
            }
        }
        // At most one batch (a quarter of the depth) is ever held back from the sender.
        assert!(
            a.send.available() + DEPTH / 4 >= DEPTH,
            "{}",
            a.send.available()
        );
        assert!(a.failed.is_none() && b.failed.is_none());
    }

    #[test]
    fn full_inbound_queues_withhold_credits_until_the_application_takes() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        // The receiver's application takes nothing: 4 items fill its queue (max_items 4); every
        // later arrival withholds its credit, so the sender runs dry after DEPTH in all.
        let mut sent = 0;
        while notify(&mut a, &mut b, sent) {
            sent += 1;
            pump(&mut a, &mut b, now);
            assert!(sent <= 100, "the sender is never held back");
        }
        assert_eq!(b.inbox.len() as u32, sent, "nothing lost");
        assert!(
            b.inbox.len() as u32 >= DEPTH,
            "at least the receive depth arrived"
        );
        assert_eq!(a.send.available(), 0);
        let withheld: u32 = b
            .inbox
            .iter()
            .map(|i| match i {
                Item::Note(_, w) | Item::Msg(_, w) => *w,
            })
            .sum();
        assert_eq!(
            withheld, DEPTH,
            "the sender's credits are all held with the queued items"
        );
        // The application takes everything: the credits go back and the sender may go on.
        while take(&mut b).is_some() {}
        flush_returns(&mut b, &mut a);
        pump(&mut a, &mut b, now);
        assert_eq!(a.send.available(), DEPTH, "all credits back");
        assert!(notify(&mut a, &mut b, 999));
    }

    #[test]
    fn a_peer_that_never_returns_credits_holds_the_sender_and_nothing_grows() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        // The "peer" here consumes receives but never sends Credits frames: the sender gets
        // exactly DEPTH sends out and is then held, with nothing queued on its side.
        let mut sent = 0;
        while notify(&mut a, &mut b, sent) {
            sent += 1;
        }
        assert_eq!(sent, DEPTH);
        assert_eq!(b.rc_in.len() as u32, DEPTH);
        assert!(!a.send.try_take());
        // A message, likewise: no segment goes out without a credit.
        assert_eq!(send_msg(&mut a, &mut b, &[7; 40]), 0);
    }

    #[test]
    fn returning_more_credits_than_outstanding_is_a_violation() {
        let mut c = SendCredits::new(4);
        assert_eq!(
            c.returned(1),
            Err(Violation::TooManyCredits {
                returned: 1,
                outstanding: 0
            })
        );
        assert!(c.try_take() && c.try_take());
        assert_eq!(c.returned(2), Ok(()));
        assert_eq!(c.available(), 4);
        let e = c.returned(u32::MAX).unwrap_err();
        assert!(e.to_string().contains("only 0 outstanding"), "{e}");
        assert_eq!(c.available(), 4, "a refused return changes nothing");
    }

    #[test]
    fn segmented_messages_are_reassembled_in_order_with_their_credits() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        for len in [0usize, 1, 14, 15, 16, 30, 31, 99, 100] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let n = send_msg(&mut a, &mut b, &msg);
            assert_eq!(
                n,
                len.div_ceil(SEG - SEG_HEADER).max(1),
                "segments of {len} bytes"
            );
            pump(&mut a, &mut b, now);
            match take(&mut b) {
                Some(Item::Msg(m, _)) => assert_eq!(m, msg, "{len} bytes"),
                other => panic!("{len} bytes: {other:?}"),
            }
            flush_returns(&mut b, &mut a);
            pump(&mut a, &mut b, now);
        }
        assert!(!b.reasm.in_progress());
        assert!(a.failed.is_none() && b.failed.is_none());
        // A message longer than the peer's credits completes: its segments' credits go back
        // while it is being reassembled (the queues are not full).
        let big = vec![5u8; MAX_MSG];
        assert!(MAX_MSG.div_ceil(SEG - SEG_HEADER) <= DEPTH as usize);
        assert_eq!(segments(&big, SEG).unwrap().len(), 7);
        assert!(segments(&big, SEG_HEADER).is_none(), "no room for payload");
        assert_eq!(segments(&[], SEG_HEADER).unwrap().len(), 1);
    }

    #[test]
    fn hostile_segments_are_violations_and_never_panic() {
        let mut r = Reassembly::new(8);
        let buf = |bytes: &[u8]| {
            let mut b = vec![0u8; 10];
            b[..bytes.len()].copy_from_slice(bytes);
            b
        };
        assert_eq!(r.push(&buf(&[SEG_MORE, 1, 2]), 3, false), Ok(None));
        assert!(r.in_progress());
        assert_eq!(r.push(&buf(&[]), 0, false), Err(Violation::EmptySegment));
        assert!(!r.in_progress(), "a violation drops the partial message");
        assert_eq!(
            r.push(&buf(&[7, 1]), 2, false),
            Err(Violation::BadSegmentHeader(7))
        );
        assert_eq!(
            Violation::BadSegmentHeader(7).to_string(),
            "bad message segment header 0x7"
        );
        // A completion that claims more bytes than the buffer has.
        assert_eq!(
            r.push(&buf(&[SEG_LAST]), 11, false),
            Err(Violation::OversizedReceive {
                len: 11,
                buffer: 10
            })
        );
        // A peer that ignores max_message_size: the message may not grow past it.
        assert_eq!(r.push(&buf(&[SEG_MORE; 6]), 6, true), Ok(None));
        assert_eq!(
            r.push(&buf(&[SEG_MORE; 5]), 5, true),
            Err(Violation::MessageTooLarge { max: 8 })
        );
        assert!(!r.in_progress());
        // Exactly max is fine, and the withheld credits come with the message.
        assert_eq!(r.push(&buf(&[SEG_MORE; 5]), 5, true), Ok(None));
        assert_eq!(
            r.push(&buf(&[SEG_LAST, 9, 9, 9, 9]), 5, false),
            Ok(Some((vec![1, 1, 1, 1, 9, 9, 9, 9], 1)))
        );
        // An empty message is one header-only last segment.
        assert_eq!(r.push(&buf(&[SEG_LAST]), 1, false), Ok(Some((vec![], 0))));
        // In the two-sided harness a bad header fails the receiver, not the sender.
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        assert!(a.send.try_take());
        b.rc_in.push_back(Delivery::Segment(vec![0xff, 1]));
        pump(&mut a, &mut b, now);
        assert_eq!(b.failed, Some(Violation::BadSegmentHeader(0xff)));
        assert!(a.failed.is_none());
    }

    #[test]
    fn liveness_with_a_fake_clock() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(2);
        let beat = heartbeat_interval(timeout);
        let mut s = SideChannel::new(timeout, t0);
        assert_eq!(s.poll_timeout(), t0 + beat);
        assert_eq!(s.handle_timeout(t0 + beat / 2), Timer::Idle);
        assert_eq!(s.handle_timeout(t0 + beat), Timer::Heartbeat);
        assert_eq!(
            s.handle_timeout(t0 + beat),
            Timer::Idle,
            "one beat per interval"
        );
        // The peer speaks now and then: never dead.
        let mut now = t0;
        for _ in 0..20 {
            now += beat;
            assert_eq!(s.on_frame(Frame::Heartbeat, now), Ok(Incoming::Nothing));
            assert!(!matches!(s.handle_timeout(now), Timer::Dead(_)));
        }
        // Silence: heartbeats keep going out until the timeout, then the peer is dead.
        let heard = now;
        let mut beats = 0;
        loop {
            now = s.poll_timeout();
            match s.handle_timeout(now) {
                Timer::Heartbeat => beats += 1,
                Timer::Dead(silent) => {
                    assert!(silent >= timeout);
                    assert_eq!(now, heard + timeout);
                    break;
                }
                Timer::Idle => {}
            }
            assert!(beats < 10);
        }
        assert!(beats >= 3, "{beats} heartbeats before death");
        // Any frame counts as hearing from the peer.
        let mut s = SideChannel::new(timeout, t0);
        let _ = s.on_frame(Frame::Credits { n: 1 }, t0 + timeout);
        assert!(!matches!(
            s.handle_timeout(t0 + timeout + beat),
            Timer::Dead(_)
        ));
        assert!(matches!(s.handle_timeout(t0 + timeout * 2), Timer::Dead(_)));
    }

    #[test]
    fn set_up_frames_after_set_up_are_violations() {
        let now = Instant::now();
        let mut s = SideChannel::new(Duration::from_secs(1), now);
        let e = s.on_frame(Frame::Ready, now).unwrap_err();
        assert!(matches!(e, Violation::UnexpectedFrame(_)), "{e}");
    }

    fn descriptor(r: &Region) -> RemoteRegion {
        r.descriptor()
    }

    fn region(s: &Side, len: usize, access: RegionAccess) -> Region {
        s.regions.insert(crate::region::NewRegion {
            mem: Arc::new(genie_sys::mem::SharedBuf::zeroed(len).unwrap()),
            key: Some(0x1234),
            remote_addr: 0x10_0000,
            registration: None,
            access,
            private: false,
        })
    }

    /// Asks `b` about `d` from `a`, as the requester does on a cache miss.
    fn check(
        a: &mut Side,
        b: &mut Side,
        d: &RemoteRegion,
        now: Instant,
    ) -> Result<PeerRegion, TransportError> {
        if let Some(v) = a.cache.get(d.region, d.key) {
            return Ok(v);
        }
        let (req, f) = a.queries.ask(d.region, d.key);
        b.frames_in.push_back(f);
        pump(a, b, now);
        let st = a.queries.take(req).expect("answered");
        let v = peer_region(st, d.region)?;
        a.cache.insert(d.region, d.key, v);
        Ok(v)
    }

    #[test]
    fn region_cache_hits_misses_and_bad_key() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let r = region(&b, 64, RegionAccess::Write);
        let d = descriptor(&r);
        // Miss: asked once, cached.
        let v = check(&mut a, &mut b, &d, now).unwrap();
        assert_eq!(v, (64, 0x10_0000, ACCESS_WRITE));
        assert!(a.queries.open.is_empty());
        // Hit: no frame.
        assert_eq!(check(&mut a, &mut b, &d, now).unwrap(), v);
        assert!(b.frames_in.is_empty());
        // Range and access checks against the cached answer.
        assert_eq!(
            remote_range(&d, 8, 56, ACCESS_WRITE, v).unwrap(),
            (0x1234, 0x10_0008)
        );
        assert!(matches!(
            remote_range(&d, 8, 57, ACCESS_WRITE, v),
            Err(TransportError::RegionOutOfBounds { size: 64, .. })
        ));
        assert!(matches!(
            remote_range(&d, u64::MAX, 2, ACCESS_WRITE, v),
            Err(TransportError::RegionOutOfBounds { .. })
        ));
        assert!(matches!(
            remote_range(&d, 0, 8, ACCESS_READ, v),
            Err(TransportError::AccessDenied { op: "read", .. })
        ));
        let wide = RemoteRegion { key: 1 << 40, ..d };
        assert!(matches!(
            remote_range(&wide, 0, 8, ACCESS_WRITE, v),
            Err(TransportError::BadKey { .. })
        ));
        // Unknown region: a typed error, nothing cached, the connection stays (no violation).
        let gone = RemoteRegion {
            region: d.region + 100,
            ..d
        };
        assert!(matches!(
            check(&mut a, &mut b, &gone, now),
            Err(TransportError::UnknownRegion { .. })
        ));
        assert!(a.cache.get(gone.region, gone.key).is_none());
        assert!(a.failed.is_none() && b.failed.is_none());
        // A wrong key: answered BadKey, and the owner closes (no free guesses).
        let bad = RemoteRegion { key: 99, ..d };
        assert!(matches!(
            check(&mut a, &mut b, &bad, now),
            Err(TransportError::BadKey { .. })
        ));
        assert_eq!(b.failed, Some(Violation::WrongKey { region: d.region }));
        // A granted key works on the connection that granted it.
        let (mut a, mut b) = pair(now);
        let r2 = region(&b, 32, RegionAccess::ReadWrite);
        b.granted.insert(r2.id(), 77);
        let granted = RemoteRegion {
            key: 77,
            ..descriptor(&r2)
        };
        assert_eq!(
            check(&mut a, &mut b, &granted, now).unwrap(),
            (32, 0x10_0000, ACCESS_READ | ACCESS_WRITE)
        );
        assert!(b.failed.is_none());
    }

    #[test]
    fn answers_must_match_open_questions() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        // An answer nobody asked for.
        a.frames_in.push_back(Frame::RegionInfo {
            req: 5,
            status: RegionStatus::Unknown,
        });
        pump(&mut a, &mut b, now);
        assert_eq!(a.failed, Some(Violation::UnsolicitedAnswer { req: 5 }));
        // A second answer to one question, and an answer after the asker gave up.
        let mut q = Queries::default();
        let (req, _) = q.ask(1, 2);
        assert_eq!(q.take(req), None, "not answered yet");
        assert_eq!(q.answer(req, RegionStatus::Unknown), Ok(()));
        assert_eq!(
            q.answer(req, RegionStatus::Unknown),
            Err(Violation::UnsolicitedAnswer { req })
        );
        assert_eq!(q.take(req), Some(RegionStatus::Unknown));
        let (req2, _) = q.ask(1, 2);
        assert_ne!(req, req2);
        q.cancel(req2);
        assert!(q.answer(req2, RegionStatus::Unknown).is_err());
        assert!(q.open.is_empty());
    }
}
