//! Connection set-up of the RDMA backend as a pure state machine (no I/O, no verbs calls, nonces
//! passed in).
//!
//! The side channel first authenticates both peers with the shared [`crate::auth`] exchange, and
//! only then does either side create its queue pair, so nothing about our verbs resources exists
//! (no CQ, no QP, no pinned buffers) and no remote access is possible before the peer proved the
//! secret:
//!
//! ```text
//! client                                    server
//!   Hello ─────────────────────────────────►
//!                                        ◄── Hello
//!   Proof(client) ─────────────────────────►  checked
//!                                        ◄── Proof(server)        [server: Action::CreateQp]
//!   checked                [client: Action::CreateQp]
//!   QpInfo (sealed) ───────────────────────►
//!                                        ◄── QpInfo (sealed)
//!   [both, once the peer's QpInfo is in: Action::Connect → QP INIT→RTR→RTS]
//!   Ready ─────────────────────────────────►
//!                                        ◄── Ready                 [both: Action::Established]
//! ```
//!
//! `QpInfo` carries QPN, PSN, the port's addressing (link layer, GID type, LID, GID, MTU, whether
//! the sender wants a GRH), receive credits and buffer size, and is sealed with a key derived
//! from the secret and both nonces ([`crate::auth::Auth::seal`]), so an attacker on the path
//! cannot point our QP at its own. The route (destination LID, a GRH only when needed, the path
//! MTU: the smaller of both sides') is [`genie_sys::addressing::route`] of our address and the
//! peer's; a peer that cannot be addressed (InfiniBand against Ethernet, RoCE v1 against v2)
//! fails the handshake with [`HandshakeError::Addressing`], on both sides.
//! `Ready` is sent once the sender's QP is in RTS, so neither side sends on RDMA before the other
//! can receive.
//!
//! Driving it: call [`Handshake::poll_send`] until `None` and send each frame, then
//! [`Handshake::poll_action`]; when it is `None`, read one frame from the peer and give it to
//! [`Handshake::on_frame`]. Repeat until [`Action::Established`].

use super::wire::{sealed_qp_bytes, Frame, QpInfo, Refusal, MAX_LANES, VERSION};
use crate::auth::{Auth, AuthError, Role};
use genie_sys::addressing::{self, AddressingError, LocalAddress, Route};
use std::collections::VecDeque;

/// What both sides agreed on; the driver connects the QP with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The peer's endpoint id.
    pub peer_endpoint: u64,
    /// The peer's QP number.
    pub peer_qpn: u32,
    /// The peer's initial PSN (our receive PSN).
    pub peer_psn: u32,
    /// Destination LID, GRH (when needed) and path MTU (the smaller of both sides' MTUs).
    pub route: Route,
    /// How many messages/notifications we may send before the peer returns credits.
    pub send_credits: u32,
    /// Largest message the peer accepts.
    pub peer_recv_size: u32,
    /// The further lanes both sides offered (as many as the side with fewer), in order: lane
    /// `i + 1` is `lanes[i]`; `None` past the last.
    pub lanes: [Option<LaneAgreed>; MAX_LANES],
}

/// What both sides agreed on for one further lane (a QP besides the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneAgreed {
    /// The peer's QP number on this lane.
    pub peer_qpn: u32,
    /// The peer's initial PSN on this lane.
    pub peer_psn: u32,
    /// The route from our lane's port to the peer's.
    pub route: Route,
}

impl Agreed {
    /// How many further lanes the connection has.
    pub fn lane_count(&self) -> usize {
        self.lanes.iter().take_while(|l| l.is_some()).count()
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The peer is authenticated: create the CQ, QP and buffers now, then call
    /// [`Handshake::qp_created`].
    CreateQp,
    /// Move the QP INIT→RTR→RTS with these values, then call [`Handshake::connected`].
    Connect(Agreed),
    /// Both QPs are in RTS: the connection is up.
    Established(Agreed),
}

/// Why the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Different side-channel protocol versions.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// Ours.
        ours: u8,
        /// Theirs.
        theirs: u8,
    },
    /// Authentication failed (see [`AuthError`]).
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// A frame arrived that does not fit the current state.
    #[error("unexpected {got} frame while {state}")]
    Unexpected {
        /// Our state.
        state: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A field of the peer's QP info is impossible.
    #[error("invalid {0} in the peer's QP info")]
    InvalidQpInfo(&'static str),
    /// The peer's port cannot be addressed from ours (see [`AddressingError`]).
    #[error("{0}")]
    Addressing(AddressingError),
    /// The peer refused the handshake.
    #[error("refused by the peer ({0:?})")]
    Refused(Refusal),
}

impl HandshakeError {
    /// The refusal to send the peer before closing, if it deserves one (not for its own refusal).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            HandshakeError::Auth(_) => Some(Refusal::Auth),
            HandshakeError::Refused(_) => None,
            _ => Some(Refusal::Protocol),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Awaiting the peer's hello.
    Hello,
    /// Awaiting the peer's proof.
    Proof,
    /// Authenticated; the driver is creating the QP.
    CreatingQp,
    /// Our QP info went out; awaiting the peer's.
    QpInfo,
    /// The driver is connecting the QP.
    Connecting(Agreed),
    /// Our Ready went out; awaiting the peer's.
    Ready(Agreed),
    Established,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Hello => "awaiting hello",
            State::Proof => "awaiting proof",
            State::CreatingQp => "creating the QP",
            State::QpInfo => "awaiting QP info",
            State::Connecting(_) => "connecting the QP",
            State::Ready(_) => "awaiting ready",
            State::Established => "established",
            State::Failed => "failed",
        }
    }
}

/// The handshake of one side. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Handshake {
    auth: Auth,
    state: State,
    local: LocalAddress,
    out: VecDeque<Frame>,
    action: Option<Action>,
    /// The peer's QP info (and its lanes'), when it arrived before ours was created.
    early_qp: Option<(QpInfo, Vec<QpInfo>)>,
    /// Our further lanes' addresses (their ports may be other devices'), once created.
    lane_local: Vec<LocalAddress>,
    /// The peer's Ready, when it arrived while we were still connecting.
    early_ready: bool,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::Proof { .. } => "proof",
        Frame::QpInfo { .. } => "qp-info",
        Frame::Ready => "ready",
        Frame::Credits { .. } => "credits",
        Frame::QueryRegion { .. } => "query-region",
        Frame::RegionInfo { .. } => "region-info",
        Frame::Heartbeat => "heartbeat",
        Frame::Refuse(_) => "refuse",
    }
}

impl Handshake {
    /// A handshake as `role` for endpoint `endpoint` whose port is addressed as `local`
    /// ([`genie_sys::addressing::choose_local`]); `nonce` must be random (passed in so tests are
    /// deterministic). The client's hello is queued.
    pub fn new(
        role: Role,
        secret: Option<&[u8]>,
        endpoint: u64,
        local: LocalAddress,
        nonce: [u8; crate::auth::NONCE_LEN],
    ) -> Self {
        let auth = Auth::new(role, secret, endpoint, nonce);
        let mut out = VecDeque::new();
        if role == Role::Client {
            out.push_back(Frame::Hello(auth.hello()));
        }
        Self {
            auth,
            state: State::Hello,
            local,
            out,
            action: None,
            early_qp: None,
            lane_local: Vec::new(),
            early_ready: false,
        }
    }

    /// The next frame to send to the peer.
    pub fn poll_send(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// What the driver must do before reading again (`None`: read the next frame).
    pub fn poll_action(&mut self) -> Option<Action> {
        self.action.take()
    }

    /// Whether the peer has proved the secret (or, without one, the exchange is past that point).
    pub fn is_authenticated(&self) -> bool {
        self.auth.is_authenticated()
    }

    /// Our QP exists (after [`Action::CreateQp`]): queues its info, sealed, with its addressing
    /// fields set to the address given to [`Handshake::new`] ([`QpInfo::with_address`]), the one
    /// the route is computed from. When the peer's info came first and cannot be used, this fails
    /// and our info is still queued (send it, so the peer reports the mismatch too).
    ///
    /// With further lanes (at most [`MAX_LANES`], more are dropped): each lane's QP info and the
    /// address of its port, which the lane's info is given and its route computed from. The
    /// connection gets as many lanes as the side with fewer offers.
    pub fn qp_created(
        &mut self,
        ours: QpInfo,
        mut lanes: Vec<(QpInfo, LocalAddress)>,
    ) -> Result<(), HandshakeError> {
        if self.state != State::CreatingQp {
            return self.fail(self.unexpected("qp created"));
        }
        lanes.truncate(MAX_LANES);
        let ours = ours.with_address(&self.local);
        let lane_infos: Vec<QpInfo> = lanes.iter().map(|(q, a)| q.with_address(a)).collect();
        self.lane_local = lanes.into_iter().map(|(_, a)| a).collect();
        let tag = self
            .auth
            .seal(self.auth.role(), &sealed_qp_bytes(&ours, &lane_infos));
        self.out.push_back(Frame::QpInfo {
            info: ours,
            lanes: lane_infos,
            tag,
        });
        self.state = State::QpInfo;
        match self
            .early_qp
            .take()
            .map(|(peer, lanes)| self.peer_qp(peer, &lanes))
        {
            Some(Err(e)) => {
                // Failed, but our QP info stays queued: the peer learns our address and names
                // the mismatch itself (send what `poll_send` still gives before closing).
                self.state = State::Failed;
                self.action = None;
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// Our QP is in RTS (after [`Action::Connect`]): queues Ready.
    pub fn connected(&mut self) -> Result<(), HandshakeError> {
        let State::Connecting(agreed) = self.state else {
            return self.fail(self.unexpected("connected"));
        };
        self.out.push_back(Frame::Ready);
        self.state = State::Ready(agreed);
        if std::mem::take(&mut self.early_ready) {
            self.state = State::Established;
            self.action = Some(Action::Established(agreed));
        }
        Ok(())
    }

    fn unexpected(&self, got: &'static str) -> HandshakeError {
        HandshakeError::Unexpected {
            state: self.state.name(),
            got,
        }
    }

    fn fail<T>(&mut self, e: HandshakeError) -> Result<T, HandshakeError> {
        self.state = State::Failed;
        self.out.clear();
        self.action = None;
        Err(e)
    }

    /// Feeds one frame from the peer. After an error the handshake stays failed.
    pub fn on_frame(&mut self, f: &Frame) -> Result<(), HandshakeError> {
        let r = self.step(f);
        if let Err(e) = r {
            return self.fail(e);
        }
        Ok(())
    }

    fn step(&mut self, f: &Frame) -> Result<(), HandshakeError> {
        let role = self.auth.role();
        match (self.state, f) {
            (_, Frame::Refuse(r)) => return Err(HandshakeError::Refused(*r)),
            (State::Hello, Frame::Hello(h)) => {
                self.auth.on_peer_hello(*h)?;
                match role {
                    Role::Client => {
                        let mac = self.auth.our_proof()?;
                        self.out.push_back(Frame::Proof { mac });
                    }
                    Role::Server => self.out.push_back(Frame::Hello(self.auth.hello())),
                }
                self.state = State::Proof;
            }
            (State::Proof, Frame::Proof { mac }) => {
                self.auth.on_peer_proof(mac.as_ref().map(|m| &m[..]))?;
                if role == Role::Server {
                    let mac = self.auth.our_proof()?;
                    self.out.push_back(Frame::Proof { mac });
                }
                self.state = State::CreatingQp;
                self.action = Some(Action::CreateQp);
            }
            (State::CreatingQp, Frame::QpInfo { info, lanes, tag }) => {
                self.auth
                    .open(&sealed_qp_bytes(info, lanes), tag.as_ref().map(|t| &t[..]))?;
                if self.early_qp.replace((*info, lanes.clone())).is_some() {
                    return Err(self.unexpected("second qp-info"));
                }
            }
            (State::QpInfo, Frame::QpInfo { info, lanes, tag }) => {
                self.auth
                    .open(&sealed_qp_bytes(info, lanes), tag.as_ref().map(|t| &t[..]))?;
                self.peer_qp(*info, lanes)?;
            }
            (State::Connecting(_), Frame::Ready) if !self.early_ready => self.early_ready = true,
            (State::Ready(agreed), Frame::Ready) => {
                self.state = State::Established;
                self.action = Some(Action::Established(agreed));
            }
            (s, f) => {
                return Err(HandshakeError::Unexpected {
                    state: s.name(),
                    got: frame_name(f),
                })
            }
        }
        Ok(())
    }

    fn peer_qp(&mut self, q: QpInfo, peer_lanes: &[QpInfo]) -> Result<(), HandshakeError> {
        for l in std::iter::once(&q).chain(peer_lanes) {
            if l.psn > 0xff_ffff {
                return Err(HandshakeError::InvalidQpInfo("psn"));
            }
            if l.qpn == 0 || l.qpn > 0xff_ffff {
                return Err(HandshakeError::InvalidQpInfo("qpn"));
            }
            if l.mtu < 256 {
                return Err(HandshakeError::InvalidQpInfo("mtu"));
            }
        }
        if q.credits == 0 || q.recv_size == 0 {
            return Err(HandshakeError::InvalidQpInfo("receive credits"));
        }
        let route =
            addressing::route(&self.local, &q.address()).map_err(HandshakeError::Addressing)?;
        let mut lanes = [None; MAX_LANES];
        for ((slot, ours), theirs) in lanes.iter_mut().zip(&self.lane_local).zip(peer_lanes) {
            *slot = Some(LaneAgreed {
                peer_qpn: theirs.qpn,
                peer_psn: theirs.psn,
                route: addressing::route(ours, &theirs.address())
                    .map_err(HandshakeError::Addressing)?,
            });
        }
        let peer = self.auth.peer().map(|h| h.endpoint).unwrap_or_default();
        let agreed = Agreed {
            peer_endpoint: peer,
            peer_qpn: q.qpn,
            peer_psn: q.psn,
            route,
            send_credits: q.credits,
            peer_recv_size: q.recv_size,
            lanes,
        };
        self.state = State::Connecting(agreed);
        self.action = Some(Action::Connect(agreed));
        Ok(())
    }
}

/// Maps a side-channel decode error of a hello to the handshake's error, so that a peer of another
/// protocol version reads as [`HandshakeError::VersionMismatch`].
pub fn version_error(theirs: u8) -> HandshakeError {
    HandshakeError::VersionMismatch {
        ours: VERSION,
        theirs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::NONCE_LEN;
    use genie_sys::addressing::{GidType, LinkLayer};

    /// The address of a RoCE v2 port (GID index 3) with active MTU `mtu`, whose GID says
    /// `endpoint`.
    fn roce(endpoint: u64, mtu: u32) -> LocalAddress {
        LocalAddress {
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            sgid_index: 3,
            gid: [endpoint as u8; 16],
            gid_type: GidType::RoceV2,
            mtu,
            global: false,
        }
    }

    /// The address of an InfiniBand port with LID `lid` in subnet fe80::/64.
    fn ib(lid: u16, global: bool) -> LocalAddress {
        let mut gid = [0u8; 16];
        gid[..2].copy_from_slice(&[0xfe, 0x80]);
        gid[15] = lid as u8;
        LocalAddress {
            link_layer: LinkLayer::InfiniBand,
            lid,
            sgid_index: 0,
            gid,
            gid_type: GidType::Ib,
            mtu: 4096,
            global,
        }
    }

    fn qp(endpoint: u64) -> QpInfo {
        QpInfo {
            qpn: 0x10 + endpoint as u32,
            psn: 0x1234 * endpoint as u32,
            link_layer: LinkLayer::Ethernet,
            gid_type: GidType::RoceV2,
            flags: 0,
            lid: 0,
            gid: [endpoint as u8; 16],
            mtu: 4096,
            credits: 16,
            recv_size: 65536,
        }
    }

    /// One side and what its driver did, as a log.
    struct Side {
        hs: Handshake,
        qp: QpInfo,
        /// Further lanes offered.
        lanes: Vec<(QpInfo, LocalAddress)>,
        log: Vec<&'static str>,
        agreed: Option<Agreed>,
        /// What `qp_created` refused (the peer's QP info had come first).
        failed: Option<HandshakeError>,
    }

    impl Side {
        fn new(role: Role, secret: Option<&str>, endpoint: u64, mtu: u32) -> Self {
            Self::at(role, secret, endpoint, roce(endpoint, mtu))
        }

        fn at(role: Role, secret: Option<&str>, endpoint: u64, local: LocalAddress) -> Self {
            let nonce = [endpoint as u8; NONCE_LEN];
            Self {
                hs: Handshake::new(role, secret.map(str::as_bytes), endpoint, local, nonce),
                qp: qp(endpoint),
                lanes: Vec::new(),
                log: Vec::new(),
                agreed: None,
                failed: None,
            }
        }

        /// Runs the driver's actions; returns the frames to send.
        fn drive(&mut self) -> Vec<Frame> {
            loop {
                match self.hs.poll_action() {
                    Some(Action::CreateQp) => {
                        assert!(self.hs.is_authenticated(), "QP before authentication");
                        self.log.push("create-qp");
                        let lanes = self.lanes.clone();
                        if let Err(e) = self.hs.qp_created(self.qp, lanes) {
                            self.failed.get_or_insert(e);
                        }
                    }
                    Some(Action::Connect(a)) => {
                        self.log.push("rtr-rts");
                        self.agreed = Some(a);
                        self.hs.connected().unwrap();
                    }
                    Some(Action::Established(a)) => {
                        self.log.push("established");
                        assert_eq!(Some(a), self.agreed);
                    }
                    None => break,
                }
            }
            std::iter::from_fn(|| self.hs.poll_send()).collect()
        }
    }

    /// Drives two sides in memory, frame by frame, until neither has anything to say. Returns
    /// the first error of each side.
    fn run(a: &mut Side, b: &mut Side) -> (Option<HandshakeError>, Option<HandshakeError>) {
        let (mut ea, mut eb) = (None, None);
        for _ in 0..32 {
            let (fa, fb) = (a.drive(), b.drive());
            if fa.is_empty() && fb.is_empty() {
                break;
            }
            for f in fa {
                if eb.is_none() {
                    eb = b.hs.on_frame(&f).err();
                }
            }
            for f in fb {
                if ea.is_none() {
                    ea = a.hs.on_frame(&f).err();
                }
            }
        }
        (ea.or(a.failed.take()), eb.or(b.failed.take()))
    }

    #[test]
    fn both_sides_agree_on_the_smaller_mtu_and_swap_qp_info() {
        for secret in [None, Some("s3cret")] {
            let mut c = Side::new(Role::Client, secret, 1, 4096);
            let mut s = Side::new(Role::Server, secret, 2, 1024);
            assert_eq!(run(&mut c, &mut s), (None, None));
            assert_eq!(c.log, ["create-qp", "rtr-rts", "established"]);
            assert_eq!(s.log, ["create-qp", "rtr-rts", "established"]);
            let (a, b) = (c.agreed.unwrap(), s.agreed.unwrap());
            assert_eq!((a.route.mtu, b.route.mtu), (1024, 1024));
            let dgid = |a: Agreed| a.route.grh.map(|g| (g.sgid_index, g.dgid));
            assert_eq!(
                (a.peer_qpn, a.peer_psn, dgid(a), a.peer_endpoint),
                (0x12, 0x2468, Some((3, [2; 16])), 2)
            );
            assert_eq!(
                (b.peer_qpn, b.peer_psn, dgid(b), b.peer_endpoint),
                (0x11, 0x1234, Some((3, [1; 16])), 1)
            );
            assert_eq!(a.send_credits, 16);
        }
    }

    /// Lanes: each side offers its further QPs, each on its own port's address; the connection
    /// gets as many as the side with fewer, each lane routed between the two lanes' ports (not
    /// the first lane's), and a lane's tampered QP number breaks the seal like the first's.
    #[test]
    fn lanes_pair_up_to_the_smaller_offer_each_on_its_own_route() {
        let lane = |endpoint: u64, i: u32| {
            let mut a = roce(endpoint, 4096);
            a.gid = [0x40 + i as u8 + endpoint as u8 * 8; 16];
            let q = QpInfo {
                qpn: 0x100 * endpoint as u32 + i,
                psn: i,
                credits: 0,
                recv_size: 0,
                ..qp(endpoint)
            };
            (q, a)
        };
        let mut c = Side::new(Role::Client, Some("k"), 1, 4096);
        let mut s = Side::new(Role::Server, Some("k"), 2, 4096);
        c.lanes = (1..=3).map(|i| lane(1, i)).collect();
        s.lanes = (1..=2).map(|i| lane(2, i)).collect();
        assert_eq!(run(&mut c, &mut s), (None, None));
        let (a, b) = (c.agreed.unwrap(), s.agreed.unwrap());
        assert_eq!((a.lane_count(), b.lane_count()), (2, 2));
        for i in 0..2 {
            let (la, lb) = (a.lanes[i].unwrap(), b.lanes[i].unwrap());
            assert_eq!(
                (la.peer_qpn, la.peer_psn),
                (0x200 + i as u32 + 1, i as u32 + 1)
            );
            assert_eq!(
                (lb.peer_qpn, lb.peer_psn),
                (0x100 + i as u32 + 1, i as u32 + 1)
            );
            assert_eq!(la.route.grh.unwrap().dgid, lane(2, i as u32 + 1).1.gid);
            assert_eq!(lb.route.grh.unwrap().dgid, lane(1, i as u32 + 1).1.gid);
        }
        // One side without lanes: none.
        let mut c = Side::new(Role::Client, None, 1, 4096);
        let mut s = Side::new(Role::Server, None, 2, 4096);
        c.lanes = vec![lane(1, 1)];
        assert_eq!(run(&mut c, &mut s), (None, None));
        assert_eq!(c.agreed.unwrap().lane_count(), 0);
        assert_eq!(s.agreed.unwrap().lane_count(), 0);
        // A lane's QP number swapped on the way: the seal fails.
        let mut c = Side::new(Role::Client, Some("k"), 1, 4096);
        let mut s = Side::new(Role::Server, Some("k"), 2, 4096);
        c.lanes = vec![lane(1, 1)];
        s.lanes = vec![lane(2, 1)];
        for _ in 0..8 {
            for f in c.drive() {
                let f = match f {
                    Frame::QpInfo {
                        info,
                        mut lanes,
                        tag,
                    } => {
                        lanes[0].qpn = 0x666;
                        Frame::QpInfo { info, lanes, tag }
                    }
                    f => f,
                };
                if let Err(e) = s.hs.on_frame(&f) {
                    assert_eq!(e, HandshakeError::Auth(AuthError::BadProof));
                    return;
                }
            }
            for f in s.drive() {
                c.hs.on_frame(&f).unwrap();
            }
        }
        panic!("the tampered lane was accepted");
    }

    /// InfiniBand: LID routing without a GRH; a side whose operator named a GID index asks for
    /// one in its QP info, and both sides then use it.
    #[test]
    fn infiniband_peers_route_by_lid_and_agree_on_a_grh() {
        let mut c = Side::at(Role::Client, Some("k"), 1, ib(7, false));
        let mut s = Side::at(Role::Server, Some("k"), 2, ib(9, false));
        assert_eq!(run(&mut c, &mut s), (None, None));
        let (a, b) = (c.agreed.unwrap().route, s.agreed.unwrap().route);
        assert_eq!((a.dlid, a.grh, b.dlid, b.grh), (9, None, 7, None));
        let mut c = Side::at(Role::Client, Some("k"), 1, ib(7, true));
        let mut s = Side::at(Role::Server, Some("k"), 2, ib(9, false));
        assert_eq!(run(&mut c, &mut s), (None, None));
        let (a, b) = (c.agreed.unwrap().route, s.agreed.unwrap().route);
        assert_eq!((a.dlid, b.dlid), (9, 7));
        assert_eq!(a.grh.unwrap().dgid, ib(9, false).gid);
        assert_eq!(
            b.grh.unwrap().dgid,
            ib(7, false).gid,
            "the peer's wish is honoured"
        );
    }

    /// An InfiniBand port against a RoCE port: both sides fail with the typed mismatch, naming
    /// both link layers, and neither connects its QP.
    #[test]
    fn a_link_layer_mismatch_fails_both_sides() {
        let mut c = Side::at(Role::Client, None, 1, ib(7, false));
        let mut s = Side::new(Role::Server, None, 2, 4096);
        let (ec, es) = run(&mut c, &mut s);
        assert_eq!(
            ec,
            Some(HandshakeError::Addressing(
                AddressingError::LinkLayerMismatch {
                    ours: LinkLayer::InfiniBand,
                    theirs: LinkLayer::Ethernet
                }
            ))
        );
        assert_eq!(
            es,
            Some(HandshakeError::Addressing(
                AddressingError::LinkLayerMismatch {
                    ours: LinkLayer::Ethernet,
                    theirs: LinkLayer::InfiniBand
                }
            ))
        );
        assert!(!c.log.contains(&"rtr-rts") && !s.log.contains(&"rtr-rts"));
    }

    #[test]
    fn wrong_or_missing_secret_creates_no_qp_on_either_side() {
        for (cs, ss) in [
            (Some("s3cret"), Some("other")),
            (None, Some("s3cret")),
            (Some("s3cret"), None),
        ] {
            let mut c = Side::new(Role::Client, cs, 1, 4096);
            let mut s = Side::new(Role::Server, ss, 2, 4096);
            let (ec, es) = run(&mut c, &mut s);
            assert!(
                matches!(es, Some(HandshakeError::Auth(_)))
                    || matches!(ec, Some(HandshakeError::Auth(_))),
                "{cs:?}/{ss:?}: {ec:?} {es:?}"
            );
            assert!(c.log.is_empty() && s.log.is_empty(), "{cs:?}/{ss:?}");
        }
    }

    /// A server (with a secret) that took the hello of an attacker (fresh nonce, no secret).
    fn attacked_server() -> Side {
        let mut s = Side::new(Role::Server, Some("k"), 2, 4096);
        s.hs.on_frame(&Frame::Hello(crate::auth::Hello {
            endpoint: 9,
            nonce: [9; NONCE_LEN],
            has_secret: true,
        }))
        .unwrap();
        s
    }

    /// The attack on the old handshake: a client without the secret echoes the server's own hello
    /// and reflects whatever the server sends. The server creates nothing and proves nothing.
    #[test]
    fn reflection_is_refused_before_any_verbs_resource_exists() {
        let mut s = Side::new(Role::Server, Some("k"), 2, 4096);
        // The attacker needs the server's nonce first: a first connection gives a server hello.
        let mut probe = Side::new(Role::Server, Some("k"), 2, 4096);
        probe
            .hs
            .on_frame(&Frame::Hello(crate::auth::Hello {
                endpoint: 9,
                nonce: [9; NONCE_LEN],
                has_secret: true,
            }))
            .unwrap();
        let Some(Frame::Hello(server_hello)) = probe.drive().into_iter().next() else {
            panic!("no hello");
        };
        // Echoing it back (same nonce, same endpoint id) is refused.
        let mut echo = server_hello;
        echo.nonce = [2; NONCE_LEN]; // the victim's own nonce
        assert!(matches!(
            s.hs.on_frame(&Frame::Hello(echo)),
            Err(HandshakeError::Auth(AuthError::Reflected(_)))
        ));
        // With a fresh nonce: the server answers with a bare hello and waits for the client's
        // proof; a reflected frame (its own hello, or garbage as a proof) fails and nothing is
        // created.
        let mut s = attacked_server();
        let sent = s.drive();
        assert!(matches!(sent[..], [Frame::Hello(_)]), "{sent:?}");
        assert!(s.hs.on_frame(&sent[0]).is_err());
        assert!(s.log.is_empty());
        let mut s = attacked_server();
        let _ = s.drive();
        assert!(matches!(
            s.hs.on_frame(&Frame::Proof { mac: Some([0; 32]) }),
            Err(HandshakeError::Auth(AuthError::BadProof))
        ));
        assert!(s.drive().is_empty() && s.log.is_empty());
    }

    #[test]
    fn a_tampered_qp_info_is_refused() {
        let mut c = Side::new(Role::Client, Some("k"), 1, 4096);
        let mut s = Side::new(Role::Server, Some("k"), 2, 4096);
        // Run the authentication, then swap the client's QP number on the way.
        for _ in 0..8 {
            let fc = c.drive();
            for f in fc {
                let f = match f {
                    Frame::QpInfo {
                        mut info,
                        lanes,
                        tag,
                    } => {
                        info.qpn = 0x666;
                        Frame::QpInfo { info, lanes, tag }
                    }
                    f => f,
                };
                if let Err(e) = s.hs.on_frame(&f) {
                    assert_eq!(e, HandshakeError::Auth(AuthError::BadProof));
                    assert!(!s.log.contains(&"rtr-rts"));
                    return;
                }
            }
            for f in s.drive() {
                c.hs.on_frame(&f).unwrap();
            }
        }
        panic!("the tampered QP info was accepted");
    }

    #[test]
    fn out_of_order_and_invalid_frames_fail() {
        let mut s = Side::new(Role::Server, None, 2, 4096);
        assert!(matches!(
            s.hs.on_frame(&Frame::Ready),
            Err(HandshakeError::Unexpected { got: "ready", .. })
        ));
        assert!(
            s.hs.on_frame(&Frame::Hello(crate::auth::Hello {
                endpoint: 1,
                nonce: [1; NONCE_LEN],
                has_secret: false
            }))
            .is_err(),
            "failed stays failed"
        );
        for (field, mutate) in [
            ("psn", (|q: &mut QpInfo| q.psn = 1 << 24) as fn(&mut QpInfo)),
            ("qpn", |q: &mut QpInfo| q.qpn = 0),
            ("receive credits", |q: &mut QpInfo| q.credits = 0),
            // The MTU comes from the sender's address (a port reporting less than 256).
            ("mtu", |_: &mut QpInfo| {}),
        ] {
            let mtu = if field == "mtu" { 100 } else { 4096 };
            let mut c = Side::new(Role::Client, None, 1, mtu);
            let mut s = Side::new(Role::Server, None, 2, 4096);
            c.qp = {
                let mut q = c.qp;
                mutate(&mut q);
                q
            };
            let (_, es) = run(&mut c, &mut s);
            assert_eq!(es, Some(HandshakeError::InvalidQpInfo(field)));
            assert!(!s.log.contains(&"rtr-rts"));
        }
        let mut s = Side::new(Role::Server, None, 2, 4096);
        assert!(s.hs.on_frame(&Frame::Heartbeat).is_err());
    }
}
