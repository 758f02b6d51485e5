//! Frames of the RDMA backend's TCP side channel: connection set-up (authentication, then QP
//! number, PSN, addressing — link layer, GID type, LID, GID, MTU, GRH wish — receive credits),
//! credit returns, remote-region checks and heartbeats.
//!
//! A frame is `[u32 LE body length][u8 tag][body]`. Decoding never panics on peer bytes: every
//! read goes through [`Reader`] ([`crate::codec`]), which fails when the input is short, and
//! trailing bytes are rejected.

use crate::codec::{DecodeError, Reader};
use genie_sys::addressing::{GidType, LinkLayer, RemoteAddress};
use std::io::{self, Read, Write};

/// Protocol version of the side channel; both sides must agree.
pub const VERSION: u8 = 4;

/// Most further lanes (queue pairs besides the first) a [`Frame::QpInfo`] may list.
pub const MAX_LANES: usize = 7;

/// Largest frame body accepted from a peer (control frames are tiny).
pub const MAX_FRAME: u32 = 4096;

/// Bytes of the segment header in front of each message SEND's payload (messages larger than the
/// peer's receive buffer go as several SENDs, reassembled in order by the receiver).
pub const SEG_HEADER: usize = 1;
/// Segment header: the message continues in the next segment.
pub const SEG_MORE: u8 = 1;
/// Segment header: the last (or only) segment of the message.
pub const SEG_LAST: u8 = 0;

/// [`RegionStatus::Ok`] access bit: remote reads allowed.
pub const ACCESS_READ: u8 = 1;
/// [`RegionStatus::Ok`] access bit: remote writes allowed.
pub const ACCESS_WRITE: u8 = 2;

/// Outcome of a remote region check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionStatus {
    /// The region exists and the key matches.
    Ok {
        /// Its length.
        len: u64,
        /// Its virtual address (for RDMA work requests).
        addr: u64,
        /// What the peer may do: bit 0 read, bit 1 write ([`ACCESS_READ`], [`ACCESS_WRITE`]).
        access: u8,
        /// The keys of the region on the connection's further lanes (their QPs may sit on other
        /// devices, where the region has another registration).
        lanes: LaneKeys,
    },
    /// No such region (never registered or dropped).
    Unknown,
    /// The key does not match.
    BadKey,
}

/// The rkeys of a region on a connection's further lanes: lane `i` (from 1) may reach the region
/// with `keys[i]` when bit `i` of `mask` is set; a lane without its bit (a private region, whose
/// memory window is bound to the first lane's QP) must not be used for it. Bit 0 is never set:
/// the first lane uses the descriptor's own key.
///
/// Wire: `mask u8 | keys u32 × popcount(mask)`, in lane order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneKeys {
    /// Bit `i`: lane `i` may be used.
    pub mask: u8,
    /// The key per lane (meaningful where `mask` says).
    pub keys: [u32; MAX_LANES + 1],
}

impl LaneKeys {
    /// The key of lane `lane` (from 1), if it may reach the region.
    pub fn get(&self, lane: usize) -> Option<u32> {
        (lane > 0 && lane <= MAX_LANES && self.mask & (1 << lane) != 0).then(|| self.keys[lane])
    }

    /// Sets the key of lane `lane` (1 to [`MAX_LANES`]; others are ignored).
    pub fn set(&mut self, lane: usize, key: u32) {
        if lane > 0 && lane <= MAX_LANES {
            self.mask |= 1 << lane;
            self.keys[lane] = key;
        }
    }

    fn put(&self, b: &mut Vec<u8>) {
        b.push(self.mask);
        for lane in 1..=MAX_LANES {
            if let Some(k) = self.get(lane) {
                b.extend_from_slice(&k.to_le_bytes());
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mask = r.u8()?;
        if mask & 1 != 0 {
            return Err(DecodeError::BadValue("region info lane mask"));
        }
        let mut lanes = LaneKeys::default();
        for lane in 1..=MAX_LANES {
            if mask & (1 << lane) != 0 {
                lanes.set(lane, r.u32()?);
            }
        }
        Ok(lanes)
    }
}

/// One side-channel frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of each side: protocol version, endpoint id, nonce, whether it has a secret.
    Hello(crate::auth::Hello),
    /// The sender's proof of the secret ([`crate::auth`]); `None` without a secret.
    Proof {
        /// HMAC-SHA256 over the role and the transcript.
        mac: Option<[u8; 32]>,
    },
    /// After authentication: the sender's QPs, sealed with the connection's key.
    QpInfo {
        /// The first QP (lane 0) and its receive side.
        info: QpInfo,
        /// The further lanes' QPs (at most [`MAX_LANES`]; their credits and receive size are 0:
        /// they carry only one-sided transfers). The connection uses as many as both sides offer.
        lanes: Vec<QpInfo>,
        /// [`crate::auth::Auth::seal`] of [`sealed_qp_bytes`]; `None` without a secret.
        tag: Option<[u8; 32]>,
    },
    /// The sender's QP reached RTS: the peer may send now.
    Ready,
    /// The sender re-posted `n` receive buffers: the peer may send `n` more messages/notifications.
    Credits {
        /// Number of credits returned.
        n: u32,
    },
    /// Asks whether `region` exists with key `key`.
    QueryRegion {
        /// Request id, echoed in the answer.
        req: u64,
        /// Region id.
        region: u64,
        /// Access key.
        key: u64,
    },
    /// Answer to [`Frame::QueryRegion`].
    RegionInfo {
        /// The request id.
        req: u64,
        /// The answer.
        status: RegionStatus,
    },
    /// Keeps an idle connection alive.
    Heartbeat,
    /// The handshake is refused (sent once, before closing): why, as [`Refusal`].
    Refuse(Refusal),
}

/// Why a handshake was refused, in [`Frame::Refuse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Authentication failed (secrets differ, or only one side has one).
    Auth,
    /// The peer broke the handshake protocol.
    Protocol,
}

/// [`QpInfo::flags`] bit: the sender wants a GRH on InfiniBand (its operator named a GID index).
pub const QP_GLOBAL: u8 = 1;

/// What each side says of its queue pair once the peer is authenticated.
///
/// Layout (little-endian, [`QpInfo::LEN`] bytes):
///
/// ```text
/// qpn u32 | psn u32 | link_layer u8 (1 IB, 2 Ethernet) | gid_type u8 (0 IB, 1 RoCE v1, 2 RoCE v2)
/// | flags u8 (bit 0: QP_GLOBAL; other bits must be 0) | lid u16 | gid [16] | mtu u32
/// | credits u32 | recv_size u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// QP number.
    pub qpn: u32,
    /// Initial PSN of the sender's send queue.
    pub psn: u32,
    /// The sender port's link layer.
    pub link_layer: LinkLayer,
    /// The type of the sender's GID.
    pub gid_type: GidType,
    /// [`QP_GLOBAL`] or 0.
    pub flags: u8,
    /// The sender's LID (0 on Ethernet).
    pub lid: u16,
    /// The sender's GID (on RoCE usually the IPv4-mapped address in use).
    pub gid: [u8; 16],
    /// The sender's active MTU in bytes.
    pub mtu: u32,
    /// Receive buffers the sender pre-posted (initial credits of the peer).
    pub credits: u32,
    /// Size of each receive buffer: the largest SEND (one message segment, header included) the
    /// sender accepts.
    pub recv_size: u32,
}

impl QpInfo {
    /// Length of the encoding.
    pub const LEN: usize = 4 + 4 + 1 + 1 + 1 + 2 + 16 + 4 + 4 + 4;

    /// The sender's address, as [`genie_sys::addressing::route`] takes it.
    pub fn address(&self) -> RemoteAddress {
        RemoteAddress {
            link_layer: self.link_layer,
            lid: self.lid,
            gid: self.gid,
            gid_type: self.gid_type,
            mtu: self.mtu,
            global: self.flags & QP_GLOBAL != 0,
        }
    }

    /// This info with its addressing fields (link layer, GID type, LID, GID, MTU, GRH wish) set
    /// from `local`.
    pub fn with_address(self, local: &genie_sys::addressing::LocalAddress) -> Self {
        Self {
            link_layer: local.link_layer,
            gid_type: local.gid_type,
            flags: if local.global { QP_GLOBAL } else { 0 },
            lid: local.lid,
            gid: local.gid,
            mtu: local.mtu,
            ..self
        }
    }

    /// Fixed-layout encoding (what the seal covers).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let parts: [&[u8]; 10] = [
            &self.qpn.to_le_bytes(),
            &self.psn.to_le_bytes(),
            &[self.link_layer.to_wire()],
            &[self.gid_type.to_wire()],
            &[self.flags],
            &self.lid.to_le_bytes(),
            &self.gid,
            &self.mtu.to_le_bytes(),
            &self.credits.to_le_bytes(),
            &self.recv_size.to_le_bytes(),
        ];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = b.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        b
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.context("qp info");
        Ok(Self {
            qpn: r.u32()?,
            psn: r.u32()?,
            link_layer: LinkLayer::from_wire(r.u8()?)
                .ok_or(DecodeError::BadValue("qp info link layer"))?,
            gid_type: GidType::from_wire(r.u8()?)
                .ok_or(DecodeError::BadValue("qp info gid type"))?,
            flags: match r.u8()? {
                f if f & !QP_GLOBAL == 0 => f,
                _ => return Err(DecodeError::BadValue("qp info flags")),
            },
            lid: u16::from_le_bytes(r.array()?),
            gid: r.array()?,
            mtu: r.u32()?,
            credits: r.u32()?,
            recv_size: r.u32()?,
        })
    }
}

/// What the seal of a [`Frame::QpInfo`] covers: the first QP's encoding, then each lane's.
pub fn sealed_qp_bytes(info: &QpInfo, lanes: &[QpInfo]) -> Vec<u8> {
    let mut b = Vec::with_capacity(QpInfo::LEN * (1 + lanes.len()));
    for q in std::iter::once(info).chain(lanes) {
        b.extend_from_slice(&q.encode());
    }
    b
}

const T_HELLO: u8 = 1;
const T_READY: u8 = 2;
const T_CREDITS: u8 = 3;
const T_QUERY: u8 = 4;
const T_INFO: u8 = 5;
const T_HEARTBEAT: u8 = 6;
const T_PROOF: u8 = 7;
const T_QP: u8 = 8;
const T_REFUSE: u8 = 9;

fn put_opt(b: &mut Vec<u8>, v: &Option<[u8; 32]>) {
    match v {
        Some(m) => {
            b.push(1);
            b.extend_from_slice(m);
        }
        None => b.push(0),
    }
}

/// A flag byte (0 or 1) and, when 1, 32 bytes.
fn opt32(r: &mut Reader<'_>, what: &'static str) -> Result<Option<[u8; 32]>, DecodeError> {
    r.context(what);
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.array()?)),
        _ => Err(DecodeError::BadValue(what)),
    }
}

impl Frame {
    /// Encodes the frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        match self {
            Frame::Hello(h) => {
                b.push(T_HELLO);
                b.push(VERSION);
                b.push(u8::from(h.has_secret));
                b.extend_from_slice(&h.endpoint.to_le_bytes());
                b.extend_from_slice(&h.nonce);
            }
            Frame::Proof { mac } => {
                b.push(T_PROOF);
                put_opt(&mut b, mac);
            }
            Frame::QpInfo { info, lanes, tag } => {
                b.push(T_QP);
                b.extend_from_slice(&info.encode());
                b.push(u8::try_from(lanes.len()).unwrap_or(u8::MAX));
                for l in lanes {
                    b.extend_from_slice(&l.encode());
                }
                put_opt(&mut b, tag);
            }
            Frame::Ready => b.push(T_READY),
            Frame::Credits { n } => {
                b.push(T_CREDITS);
                b.extend_from_slice(&n.to_le_bytes());
            }
            Frame::QueryRegion { req, region, key } => {
                b.push(T_QUERY);
                for v in [req, region, key] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::RegionInfo { req, status } => {
                b.push(T_INFO);
                b.extend_from_slice(&req.to_le_bytes());
                let (tag, len, addr, access, lanes) = match *status {
                    RegionStatus::Ok {
                        len,
                        addr,
                        access,
                        lanes,
                    } => (0u8, len, addr, access, lanes),
                    RegionStatus::Unknown => (1, 0, 0, 0, LaneKeys::default()),
                    RegionStatus::BadKey => (2, 0, 0, 0, LaneKeys::default()),
                };
                b.push(tag);
                b.extend_from_slice(&len.to_le_bytes());
                b.extend_from_slice(&addr.to_le_bytes());
                b.push(access);
                lanes.put(&mut b);
            }
            Frame::Heartbeat => b.push(T_HEARTBEAT),
            Frame::Refuse(r) => {
                b.push(T_REFUSE);
                b.push(match r {
                    Refusal::Auth => 1,
                    Refusal::Protocol => 2,
                });
            }
        }
        let body = u32::try_from(b.len() - 4).unwrap_or(u32::MAX);
        b[..4].copy_from_slice(&body.to_le_bytes());
        b
    }

    /// Decodes one frame body (tag and fields, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let tag = r.u8().map_err(|_| DecodeError::BadLength(0))?;
        let f = match tag {
            T_HELLO => {
                r.context("hello");
                // The version comes first, so that any later layout still reads as a mismatch.
                let version = r.u8()?;
                if version != VERSION {
                    return Err(DecodeError::Version {
                        theirs: version,
                        ours: VERSION,
                    });
                }
                let has_secret = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadValue("hello.has_secret")),
                };
                Frame::Hello(crate::auth::Hello {
                    has_secret,
                    endpoint: r.u64()?,
                    nonce: r.array()?,
                })
            }
            T_PROOF => Frame::Proof {
                mac: opt32(&mut r, "proof")?,
            },
            T_QP => {
                let info = QpInfo::read(&mut r)?;
                r.context("qp info lanes");
                let n = usize::from(r.u8()?);
                if n > MAX_LANES {
                    return Err(DecodeError::BadValue("qp info lane count"));
                }
                let lanes = (0..n)
                    .map(|_| QpInfo::read(&mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                Frame::QpInfo {
                    info,
                    lanes,
                    tag: opt32(&mut r, "qp info")?,
                }
            }
            T_READY => Frame::Ready,
            T_CREDITS => Frame::Credits {
                n: r.context("credits").u32()?,
            },
            T_QUERY => {
                r.context("query");
                Frame::QueryRegion {
                    req: r.u64()?,
                    region: r.u64()?,
                    key: r.u64()?,
                }
            }
            T_INFO => {
                r.context("region info");
                let req = r.u64()?;
                let tag = r.u8()?;
                let len = r.u64()?;
                let addr = r.u64()?;
                let access = r.u8()?;
                if access > (ACCESS_READ | ACCESS_WRITE) {
                    return Err(DecodeError::BadValue("region info access"));
                }
                let lanes = LaneKeys::read(&mut r)?;
                if tag != 0 && lanes != LaneKeys::default() {
                    return Err(DecodeError::BadValue("region info lanes"));
                }
                let status = match tag {
                    0 => RegionStatus::Ok {
                        len,
                        addr,
                        access,
                        lanes,
                    },
                    1 => RegionStatus::Unknown,
                    2 => RegionStatus::BadKey,
                    _ => return Err(DecodeError::BadValue("region info status")),
                };
                Frame::RegionInfo { req, status }
            }
            T_HEARTBEAT => Frame::Heartbeat,
            T_REFUSE => Frame::Refuse(match r.context("refuse").u8()? {
                1 => Refusal::Auth,
                2 => Refusal::Protocol,
                _ => return Err(DecodeError::BadValue("refuse reason")),
            }),
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(f)
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> io::Result<()> {
    w.write_all(&f.encode())
}

/// Reads one frame (blocking, per the stream's timeout). Peer garbage is `InvalidData`.
#[cfg(test)]
pub fn read_frame(r: &mut impl Read) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            DecodeError::BadLength(len),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Frame::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Accumulates side-channel bytes, so that a read timeout in the middle of a frame loses nothing.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next complete frame, reading once from `r` when none is buffered. `Ok(None)`: nothing
    /// complete yet (the read timed out). End of stream is `UnexpectedEof`, garbage `InvalidData`.
    pub fn next(&mut self, r: &mut impl Read) -> io::Result<Option<Frame>> {
        if let Some(f) = self.parse()? {
            return Ok(Some(f));
        }
        let mut tmp = [0u8; 4096];
        match r.read(&mut tmp) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.buf.extend_from_slice(tmp.get(..n).unwrap_or(&[]));
                self.parse()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads what the non-blocking source `r` has now, about `budget` bytes at most (a read may
    /// overshoot by one 4 KiB read). `Ok(true)`: drained (`WouldBlock`); `Ok(false)`: the budget
    /// ran out first. End of stream is `UnexpectedEof`. Take the frames with
    /// [`FrameReader::parse`].
    pub fn fill(&mut self, r: &mut impl Read, budget: usize) -> io::Result<bool> {
        let mut tmp = [0u8; 4096];
        let mut got = 0;
        while got < budget {
            match r.read(&mut tmp) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.buf.extend_from_slice(tmp.get(..n).unwrap_or(&[]));
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The next complete frame already read, if any. Garbage is `InvalidData`.
    pub fn parse(&mut self) -> io::Result<Option<Frame>> {
        let Some(len) = self
            .buf
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
        else {
            return Ok(None);
        };
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                DecodeError::BadLength(len),
            ));
        }
        let end = 4 + len as usize;
        let Some(body) = self.buf.get(4..end) else {
            return Ok(None);
        };
        let f = Frame::decode(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        self.buf.drain(..end);
        f.map(Some)
    }
}

/// Property-test hook: whether `body` decodes as one frame (tag and fields, no length prefix);
/// one that does must also encode and decode to itself, as in [`fuzz_decode`].
#[doc(hidden)]
pub fn decodes(body: &[u8]) -> bool {
    fuzz_decode(body);
    Frame::decode(body).is_ok()
}

/// Fuzzing hook (`fuzz/fuzz_targets/rdma_wire.rs`): decodes `data` as one frame body (a frame that
/// decodes must encode and decode to itself) and as a byte stream. Never panics otherwise.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(
            Frame::decode(f.encode().get(4..).unwrap_or_default()),
            Ok(f)
        );
    }
    let (mut reader, mut src) = (FrameReader::default(), data);
    while reader.next(&mut src).is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(crate::auth::Hello {
                has_secret: true,
                endpoint: 0x1122_3344_5566_7788,
                nonce: [9; 32],
            }),
            Frame::Proof { mac: None },
            Frame::Proof { mac: Some([3; 32]) },
            Frame::QpInfo {
                info: QpInfo {
                    qpn: 0x11,
                    psn: 0xab_cdef,
                    link_layer: LinkLayer::Ethernet,
                    gid_type: GidType::RoceV2,
                    flags: 0,
                    lid: 0,
                    gid: [7; 16],
                    mtu: 4096,
                    credits: 32,
                    recv_size: 65536,
                },
                lanes: Vec::new(),
                tag: Some([5; 32]),
            },
            Frame::QpInfo {
                info: QpInfo {
                    qpn: 0x12,
                    psn: 1,
                    link_layer: LinkLayer::InfiniBand,
                    gid_type: GidType::Ib,
                    flags: QP_GLOBAL,
                    lid: 7,
                    gid: [1; 16],
                    mtu: 1024,
                    credits: 8,
                    recv_size: 4096,
                },
                lanes: vec![
                    QpInfo {
                        qpn: 0x13,
                        psn: 2,
                        link_layer: LinkLayer::Ethernet,
                        gid_type: GidType::RoceV2,
                        flags: 0,
                        lid: 0,
                        gid: [2; 16],
                        mtu: 4096,
                        credits: 0,
                        recv_size: 0,
                    };
                    3
                ],
                tag: None,
            },
            Frame::Ready,
            Frame::Credits { n: 17 },
            Frame::QueryRegion {
                req: 1,
                region: 2,
                key: 3,
            },
            Frame::RegionInfo {
                req: 4,
                status: RegionStatus::Ok {
                    len: 5,
                    addr: 6,
                    access: ACCESS_WRITE,
                    lanes: LaneKeys::default(),
                },
            },
            Frame::RegionInfo {
                req: 5,
                status: RegionStatus::Ok {
                    len: 5,
                    addr: 6,
                    access: ACCESS_READ,
                    lanes: {
                        let mut k = LaneKeys::default();
                        k.set(1, 0xdead);
                        k.set(3, 0xbeef);
                        k
                    },
                },
            },
            Frame::RegionInfo {
                req: 4,
                status: RegionStatus::Unknown,
            },
            Frame::RegionInfo {
                req: 4,
                status: RegionStatus::BadKey,
            },
            Frame::Heartbeat,
            Frame::Refuse(Refusal::Auth),
            Frame::Refuse(Refusal::Protocol),
        ]
    }

    /// A reader that hands out one byte per call and times out in between.
    struct Trickle(Vec<u8>, bool);
    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.1 = !self.1;
            if self.1 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.0.is_empty() {
                return Ok(0);
            }
            out[0] = self.0.remove(0);
            Ok(1)
        }
    }

    #[test]
    fn frame_reader_survives_timeouts_mid_frame() {
        let bytes: Vec<u8> = all_frames().iter().flat_map(Frame::encode).collect();
        let mut r = Trickle(bytes, false);
        let mut fr = FrameReader::default();
        let mut got = Vec::new();
        loop {
            match fr.next(&mut r) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => {}
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                    break;
                }
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn non_blocking_fill_then_parse() {
        let bytes: Vec<u8> = all_frames().iter().flat_map(Frame::encode).collect();
        let mut r = Trickle(bytes.clone(), false);
        let mut fr = FrameReader::default();
        let mut got = Vec::new();
        loop {
            // Each fill stops at the source's `WouldBlock` (drained) after at most one byte here.
            match fr.fill(&mut r, 1 << 20) {
                Ok(drained) => assert!(drained),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                    break;
                }
            }
            while let Some(f) = fr.parse().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
        // A budget smaller than what is there: not drained, the rest stays for the next fill.
        let mut fr = FrameReader::default();
        assert!(!fr.fill(&mut &bytes[..], 4).unwrap());
        assert_eq!(fr.buf.len(), bytes.len().min(4096));
        // Garbage is InvalidData from parse, never a panic.
        let mut fr = FrameReader::default();
        let _ = fr.fill(&mut &[0xff_u8; 8][..], 64);
        assert_eq!(fr.parse().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn frames_round_trip() {
        for f in all_frames() {
            let bytes = f.encode();
            assert_eq!(read_frame(&mut &bytes[..]).unwrap(), f);
        }
    }

    #[test]
    fn truncated_and_trailing_bytes_are_rejected() {
        for f in all_frames() {
            let bytes = f.encode();
            let body = &bytes[4..];
            for cut in 0..body.len() {
                assert!(Frame::decode(&body[..cut]).is_err(), "{f:?} cut at {cut}");
            }
            let mut long = body.to_vec();
            long.push(0);
            assert_eq!(Frame::decode(&long), Err(DecodeError::Trailing(1)));
        }
        assert_eq!(Frame::decode(&[99]), Err(DecodeError::UnknownTag(99)));
        // QP info: link layer (byte 8 of the info), GID type (9) and flags (10) are checked.
        let qp = all_frames()
            .into_iter()
            .find(|f| matches!(f, Frame::QpInfo { .. }))
            .unwrap()
            .encode();
        for (at, bad, what) in [
            (8, 0, "qp info link layer"),
            (8, 3, "qp info link layer"),
            (9, 3, "qp info gid type"),
            (10, 2, "qp info flags"),
        ] {
            let mut body = qp[4..].to_vec();
            body[1 + at] = bad;
            assert_eq!(Frame::decode(&body), Err(DecodeError::BadValue(what)));
        }
        // More lanes than any connection has, and a lane key for lane 0, are refused.
        let mut body = qp[4..].to_vec();
        body[1 + QpInfo::LEN] = MAX_LANES as u8 + 1;
        assert_eq!(
            Frame::decode(&body),
            Err(DecodeError::BadValue("qp info lane count"))
        );
        let mut info = Frame::RegionInfo {
            req: 1,
            status: RegionStatus::Unknown,
        }
        .encode()[4..]
            .to_vec();
        *info.last_mut().unwrap() = 1;
        assert_eq!(
            Frame::decode(&info),
            Err(DecodeError::BadValue("region info lane mask"))
        );
        assert_eq!(
            Frame::decode(&[T_HELLO, 1, 0]),
            Err(DecodeError::Version {
                theirs: 1,
                ours: VERSION
            }),
            "an older peer's hello reads as a version mismatch"
        );
        let huge = (MAX_FRAME + 1).to_le_bytes();
        assert_eq!(
            read_frame(&mut &huge[..]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
