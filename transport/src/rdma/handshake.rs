//! Connection set-up of the RDMA backend as a pure state machine (no I/O, no verbs calls).
//!
//! Both sides run the same machine over the TCP side channel:
//!
//! ```text
//! send Hello ──► AwaitHello ──peer Hello──► AwaitReady ──peer Ready──► Established
//!                              │ (driver: QP INIT→RTR→RTS with the Agreed values,
//!                              │  then send `ready()`)
//! ```
//!
//! `Hello` carries QPN, PSN, GID, MTU, receive credits and a nonce; the agreed path MTU is the
//! smaller of both sides. `Ready` is only sent once the sender's QP is in RTS, so neither side sends
//! on RDMA before the other can receive; with a shared secret it carries
//! HMAC-SHA256(secret, peer nonce || sender endpoint id), which the receiver verifies.

use super::wire::{Frame, Hello, VERSION};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What this side brings to the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// Our endpoint id.
    pub endpoint: u64,
    /// Our QP number.
    pub qpn: u32,
    /// Our initial send PSN (24 bits).
    pub psn: u32,
    /// Our GID.
    pub gid: [u8; 16],
    /// Our active MTU in bytes.
    pub mtu: u32,
    /// Receive buffers we pre-posted.
    pub credits: u32,
    /// Size of each of our receive buffers.
    pub recv_size: u32,
    /// The shared secret, if configured.
    pub secret: Option<Vec<u8>>,
}

/// What both sides agreed on; the driver connects the QP with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The peer's endpoint id.
    pub peer_endpoint: u64,
    /// The peer's QP number.
    pub peer_qpn: u32,
    /// The peer's initial PSN (our receive PSN).
    pub peer_psn: u32,
    /// The peer's GID.
    pub peer_gid: [u8; 16],
    /// Path MTU: the smaller of both sides' MTUs.
    pub path_mtu: u32,
    /// How many messages/notifications we may send before the peer returns credits.
    pub send_credits: u32,
    /// Largest message the peer accepts.
    pub peer_recv_size: u32,
}

/// What a frame did to the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The peer's Hello arrived: connect the QP with these values, then send [`Handshake::ready`].
    PeerHello(Agreed),
    /// The peer's Ready arrived (and its proof checked out): the connection is up.
    Established,
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
    /// One side has a shared secret and the other has not.
    #[error("shared secret configured on {} side only", if *.ours { "our" } else { "the peer's" })]
    SecretMismatch {
        /// Whether we have one.
        ours: bool,
    },
    /// The peer's proof of the secret is wrong.
    #[error("the peer's secret proof is wrong")]
    BadProof,
    /// A frame arrived that does not fit the current state.
    #[error("unexpected {got} frame while {state}")]
    Unexpected {
        /// Our state.
        state: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A field of the peer's Hello is impossible.
    #[error("invalid {0} in the peer's hello")]
    InvalidHello(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitReady {
        peer_nonce: [u8; 16],
        peer_endpoint: u64,
    },
    Established,
    Failed,
}

/// The handshake of one side.
#[derive(Debug, Clone)]
pub struct Handshake {
    local: Local,
    nonce: [u8; 16],
    state: State,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::Ready { .. } => "ready",
        Frame::Credits { .. } => "credits",
        Frame::QueryRegion { .. } => "query-region",
        Frame::RegionInfo { .. } => "region-info",
        Frame::Heartbeat => "heartbeat",
    }
}

fn proof(secret: &[u8], nonce: &[u8; 16], endpoint: u64) -> [u8; 32] {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0; 32];
    };
    m.update(nonce);
    m.update(&endpoint.to_le_bytes());
    m.finalize().into_bytes().into()
}

/// Constant-time check of a peer's proof.
fn verify(secret: &[u8], nonce: &[u8; 16], endpoint: u64, mac: &[u8; 32]) -> bool {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    m.update(nonce);
    m.update(&endpoint.to_le_bytes());
    m.verify_slice(mac).is_ok()
}

impl Handshake {
    /// A handshake for `local`; `nonce` must be random (passed in so tests are deterministic).
    pub fn new(local: Local, nonce: [u8; 16]) -> Self {
        Self {
            local,
            nonce,
            state: State::AwaitHello,
        }
    }

    /// Our first frame.
    pub fn hello(&self) -> Frame {
        Frame::Hello(Hello {
            version: VERSION,
            has_secret: self.local.secret.is_some(),
            endpoint: self.local.endpoint,
            qpn: self.local.qpn,
            psn: self.local.psn,
            gid: self.local.gid,
            mtu: self.local.mtu,
            credits: self.local.credits,
            recv_size: self.local.recv_size,
            nonce: self.nonce,
        })
    }

    /// Our second frame, to send once our QP is in RTS (after [`Progress::PeerHello`]).
    pub fn ready(&self) -> Frame {
        let mac = match (&self.local.secret, self.state) {
            (Some(s), State::AwaitReady { peer_nonce, .. }) => {
                proof(s, &peer_nonce, self.local.endpoint)
            }
            _ => [0; 32],
        };
        Frame::Ready { mac }
    }

    /// Feeds one frame from the peer. After an error the handshake stays failed.
    pub fn on_frame(&mut self, f: &Frame) -> Result<Progress, HandshakeError> {
        let r = self.step(f);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, f: &Frame) -> Result<Progress, HandshakeError> {
        match (self.state, f) {
            (State::AwaitHello, Frame::Hello(h)) => {
                if h.version != VERSION {
                    return Err(HandshakeError::VersionMismatch {
                        ours: VERSION,
                        theirs: h.version,
                    });
                }
                if h.has_secret != self.local.secret.is_some() {
                    return Err(HandshakeError::SecretMismatch {
                        ours: self.local.secret.is_some(),
                    });
                }
                if h.psn > 0xff_ffff {
                    return Err(HandshakeError::InvalidHello("psn"));
                }
                if h.qpn == 0 || h.qpn > 0xff_ffff {
                    return Err(HandshakeError::InvalidHello("qpn"));
                }
                if h.mtu < 256 {
                    return Err(HandshakeError::InvalidHello("mtu"));
                }
                if h.credits == 0 || h.recv_size == 0 {
                    return Err(HandshakeError::InvalidHello("receive credits"));
                }
                self.state = State::AwaitReady {
                    peer_nonce: h.nonce,
                    peer_endpoint: h.endpoint,
                };
                Ok(Progress::PeerHello(Agreed {
                    peer_endpoint: h.endpoint,
                    peer_qpn: h.qpn,
                    peer_psn: h.psn,
                    peer_gid: h.gid,
                    path_mtu: h.mtu.min(self.local.mtu),
                    send_credits: h.credits,
                    peer_recv_size: h.recv_size,
                }))
            }
            (State::AwaitReady { peer_endpoint, .. }, Frame::Ready { mac }) => {
                if let Some(s) = &self.local.secret {
                    if !verify(s, &self.nonce, peer_endpoint, mac) {
                        return Err(HandshakeError::BadProof);
                    }
                }
                self.state = State::Established;
                Ok(Progress::Established)
            }
            (s, f) => Err(HandshakeError::Unexpected {
                state: match s {
                    State::AwaitHello => "awaiting hello",
                    State::AwaitReady { .. } => "awaiting ready",
                    State::Established => "established",
                    State::Failed => "failed",
                },
                got: frame_name(f),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(endpoint: u64, mtu: u32, secret: Option<&str>) -> Local {
        Local {
            endpoint,
            qpn: 0x10 + endpoint as u32,
            psn: 0x1234 * endpoint as u32,
            gid: [endpoint as u8; 16],
            mtu,
            credits: 16,
            recv_size: 65536,
            secret: secret.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Drives two machines against each other in memory, like two peers over the side channel.
    fn run(
        a: Local,
        b: Local,
    ) -> (
        Result<Agreed, HandshakeError>,
        Result<Agreed, HandshakeError>,
    ) {
        let mut ha = Handshake::new(a, [1; 16]);
        let mut hb = Handshake::new(b, [2; 16]);
        let (ha_hello, hb_hello) = (ha.hello(), hb.hello());
        let aa = ha.on_frame(&hb_hello);
        let ab = hb.on_frame(&ha_hello);
        let (aa, ab) = match (aa, ab) {
            (Ok(Progress::PeerHello(x)), Ok(Progress::PeerHello(y))) => (x, y),
            // A side whose hello phase succeeded sees its peer hang up.
            (x, y) => {
                let closed = HandshakeError::Unexpected {
                    state: "awaiting ready",
                    got: "end of stream",
                };
                return (x.and(Err(closed.clone())), y.and(Err(closed)));
            }
        };
        let (ra, rb) = (ha.ready(), hb.ready());
        let ea = ha.on_frame(&rb).map(|p| {
            assert_eq!(p, Progress::Established);
            aa
        });
        let eb = hb.on_frame(&ra).map(|p| {
            assert_eq!(p, Progress::Established);
            ab
        });
        (ea, eb)
    }

    #[test]
    fn both_sides_agree_on_the_smaller_mtu_and_swap_qp_info() {
        let (a, b) = run(local(1, 4096, None), local(2, 1024, None));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.path_mtu, b.path_mtu), (1024, 1024));
        assert_eq!(
            (a.peer_qpn, a.peer_psn, a.peer_gid, a.peer_endpoint),
            (0x12, 0x2468, [2; 16], 2)
        );
        assert_eq!(
            (b.peer_qpn, b.peer_psn, b.peer_gid, b.peer_endpoint),
            (0x11, 0x1234, [1; 16], 1)
        );
        assert_eq!(a.send_credits, 16);
    }

    #[test]
    fn secret_is_checked_both_ways() {
        let (a, b) = run(
            local(1, 4096, Some("s3cret")),
            local(2, 4096, Some("s3cret")),
        );
        assert!(a.is_ok() && b.is_ok());
        let (a, b) = run(
            local(1, 4096, Some("s3cret")),
            local(2, 4096, Some("other")),
        );
        assert_eq!(
            (a.unwrap_err(), b.unwrap_err()),
            (HandshakeError::BadProof, HandshakeError::BadProof)
        );
        let (a, b) = run(local(1, 4096, Some("s3cret")), local(2, 4096, None));
        assert_eq!(
            a.unwrap_err(),
            HandshakeError::SecretMismatch { ours: true }
        );
        assert_eq!(
            b.unwrap_err(),
            HandshakeError::SecretMismatch { ours: false }
        );
    }

    #[test]
    fn out_of_order_and_invalid_frames_fail() {
        let mut h = Handshake::new(local(1, 4096, None), [0; 16]);
        assert!(matches!(
            h.on_frame(&Frame::Ready { mac: [0; 32] }),
            Err(HandshakeError::Unexpected { got: "ready", .. })
        ));
        assert!(
            h.on_frame(&Handshake::new(local(2, 4096, None), [0; 16]).hello())
                .is_err(),
            "failed stays failed"
        );

        let mut h = Handshake::new(local(1, 4096, None), [0; 16]);
        let Frame::Hello(mut bad) = Handshake::new(local(2, 4096, None), [0; 16]).hello() else {
            unreachable!()
        };
        bad.version = VERSION + 1;
        assert_eq!(
            h.on_frame(&Frame::Hello(bad)),
            Err(HandshakeError::VersionMismatch {
                ours: VERSION,
                theirs: VERSION + 1
            })
        );

        for (field, mutate) in [
            ("psn", (|h: &mut Hello| h.psn = 1 << 24) as fn(&mut Hello)),
            ("qpn", |h: &mut Hello| h.qpn = 0),
            ("mtu", |h: &mut Hello| h.mtu = 100),
            ("receive credits", |h: &mut Hello| h.credits = 0),
        ] {
            let mut h = Handshake::new(local(1, 4096, None), [0; 16]);
            let Frame::Hello(mut bad) = Handshake::new(local(2, 4096, None), [0; 16]).hello()
            else {
                unreachable!()
            };
            mutate(&mut bad);
            assert_eq!(
                h.on_frame(&Frame::Hello(bad)),
                Err(HandshakeError::InvalidHello(field))
            );
        }
        let mut h = Handshake::new(local(1, 4096, None), [0; 16]);
        assert!(h.on_frame(&Frame::Heartbeat).is_err());
    }
}
