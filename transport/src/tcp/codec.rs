//! The TCP backend's wire format: a fixed, versioned frame header followed by a body.
//!
//! ```text
//! offset size field
//!      0    2 magic     "GN"
//!      2    1 version   PROTOCOL_VERSION
//!      3    1 kind      FrameKind
//!      4    1 flags     bit 0 LAST (last chunk of a write / read response), bit 1 NOTIFY
//!      5    3 reserved  zero
//!      8    4 body_len  bytes following the header
//!     12    4 arg       notification value (WRITE), error/refusal code (ERR, REFUSE)
//!     16    8 op_id     the requester's operation id, echoed in replies
//!     24    8 region    target region id
//!     32    8 offset    offset in the target region (WRITE, READ_REQ) or in the read (READ_RESP)
//!     40    8 key       access key of the target region
//! ```
//!
//! Striping ([`crate::config::TcpConfig::streams`] > 1) uses two HELLO fields that are zero
//! otherwise, so a single-stream handshake is unchanged byte for byte:
//! - HELLO `arg`: streams the client wants (0 or 1: one); HELLO_ACK `arg`: streams granted,
//!   the smaller of both sides' settings (0: one), and HELLO_ACK `op_id`: the connection id, a
//!   random number secondary streams present to join.
//! - HELLO `op_id` (non-zero): this stream joins the connection with that id. It then runs the
//!   same authentication as the first stream; the server checks the id (known, of the same peer
//!   endpoint, not yet complete) before READY, else REFUSE with [`RefuseCode::Stream`].
//!
//! All integers are little-endian. Every parse goes through [`Reader`] ([`crate::codec`]), which
//! never indexes into peer bytes and rejects trailing data.

use crate::codec::{DecodeError, Reader};
use crate::error::TransportError;

/// Protocol version spoken by this build; both sides must agree.
pub const PROTOCOL_VERSION: u8 = 2;
/// Size of every frame header in bytes.
pub const HEADER_LEN: usize = 48;
/// Frame magic.
pub const MAGIC: [u8; 2] = *b"GN";
/// Flag: last chunk of a write or read response.
pub const FLAG_LAST: u8 = 1;
/// Flag: deliver the `arg` notification once this (last) chunk has landed.
pub const FLAG_NOTIFY: u8 = 2;
/// Length of handshake nonces (and of proofs): [`crate::auth::NONCE_LEN`].
pub const NONCE_LEN: usize = crate::auth::NONCE_LEN;
/// Largest reason text in a REFUSE frame.
pub const MAX_REASON: usize = 256;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → server: endpoint id, nonce, whether it has a secret ([`crate::auth::Hello`]).
    Hello = 1,
    /// Server → client: the same of the server (no proof yet: the client proves first).
    HelloAck = 2,
    /// Client → server: the client's proof (empty without a secret).
    Auth = 3,
    /// Server → client: the client's proof checked out; the body is the server's proof (empty
    /// without a secret). The connection is established once the client checked it.
    Ready = 4,
    /// Either side: the handshake is refused (`arg` = [`RefuseCode`], body = reason text).
    Refuse = 5,
    /// A chunk of a one-sided write; the body is the data.
    Write = 10,
    /// A one-sided read request; the body is the length (u64).
    ReadReq = 11,
    /// A chunk of a read's data; `offset` is relative to the read's start.
    ReadResp = 12,
    /// A two-sided message; the body is the message.
    Msg = 13,
    /// The operation `op_id` completed at the target.
    Ack = 14,
    /// The operation `op_id` was refused (`arg` = [`ErrCode`], body = region, offset, len, size).
    Err = 15,
    /// Heartbeat: proves liveness, nothing else.
    Ping = 16,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Auth,
            4 => Self::Ready,
            5 => Self::Refuse,
            10 => Self::Write,
            11 => Self::ReadReq,
            12 => Self::ReadResp,
            13 => Self::Msg,
            14 => Self::Ack,
            15 => Self::Err,
            16 => Self::Ping,
            _ => return None,
        })
    }
}

/// Why an access was refused, in ERR frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrCode {
    /// No such region.
    UnknownRegion = 1,
    /// Wrong key.
    BadKey = 2,
    /// Out of bounds.
    OutOfBounds = 3,
    /// The region does not allow this access (the body's offset says which: 0 read, 1 write).
    AccessDenied = 4,
}

/// Why a handshake was refused, in REFUSE frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RefuseCode {
    /// Protocol versions differ (the refusing side's version is in the header).
    Version = 1,
    /// Shared-secret authentication failed.
    Auth = 2,
    /// The handshake itself was malformed.
    Protocol = 3,
    /// A secondary stream named an unknown or already complete connection.
    Stream = 4,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the sender.
    pub version: u8,
    /// Frame kind.
    pub kind: FrameKind,
    /// Flags ([`FLAG_LAST`], [`FLAG_NOTIFY`]).
    pub flags: u8,
    /// Body length.
    pub body_len: u32,
    /// Kind-specific argument.
    pub arg: u32,
    /// Operation id.
    pub op_id: u64,
    /// Region id.
    pub region: u64,
    /// Offset.
    pub offset: u64,
    /// Key.
    pub key: u64,
}

impl Header {
    /// A header of `kind` with every other field zero and the current version.
    pub fn new(kind: FrameKind) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            kind,
            flags: 0,
            body_len: 0,
            arg: 0,
            op_id: 0,
            region: 0,
            offset: 0,
            key: 0,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let mut w = Writer {
            buf: &mut b,
            pos: 0,
        };
        w.put(&MAGIC);
        w.put(&[self.version, self.kind as u8, self.flags, 0, 0, 0]);
        w.put(&self.body_len.to_le_bytes());
        w.put(&self.arg.to_le_bytes());
        w.put(&self.op_id.to_le_bytes());
        w.put(&self.region.to_le_bytes());
        w.put(&self.offset.to_le_bytes());
        w.put(&self.key.to_le_bytes());
        b
    }

    /// Decodes a header. A version other than ours decodes (so the handshake can report it); the
    /// caller checks [`Header::version`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let magic = r.array::<2>()?;
        if magic != MAGIC {
            return Err(DecodeError::Unexpected {
                expected: "magic \"GN\"",
                got: format!("{magic:02x?}"),
            });
        }
        let version = r.u8()?;
        let kind_raw = r.u8()?;
        let flags = r.u8()?;
        let reserved = r.array::<3>()?;
        let body_len = r.u32()?;
        let arg = r.u32()?;
        let op_id = r.u64()?;
        let region = r.u64()?;
        let offset = r.u64()?;
        let key = r.u64()?;
        r.finish()?;
        if version != PROTOCOL_VERSION {
            // Only the first fields are promised stable across versions; report the version and
            // let the handshake refuse.
            return Ok(Self {
                version,
                kind: FrameKind::Hello,
                flags,
                body_len,
                arg,
                op_id,
                region,
                offset,
                key,
            });
        }
        let kind = FrameKind::from_u8(kind_raw).ok_or_else(|| DecodeError::Unexpected {
            expected: "a known frame kind",
            got: format!("kind {kind_raw}"),
        })?;
        if reserved != [0, 0, 0] {
            return Err(DecodeError::Unexpected {
                expected: "zero reserved bytes",
                got: format!("{reserved:02x?}"),
            });
        }
        if flags & !(FLAG_LAST | FLAG_NOTIFY) != 0 {
            return Err(DecodeError::Unexpected {
                expected: "known flags",
                got: format!("flags {flags:#04x}"),
            });
        }
        Ok(Self {
            version,
            kind,
            flags,
            body_len,
            arg,
            op_id,
            region,
            offset,
            key,
        })
    }

    /// Whether the LAST flag is set.
    pub fn last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }

    /// Whether the NOTIFY flag is set.
    pub fn notify(&self) -> bool {
        self.flags & FLAG_NOTIFY != 0
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        // Only our own fixed-size encodings use this; sizes are constants.
        if let Some(dst) = self.buf.get_mut(self.pos..self.pos + b.len()) {
            dst.copy_from_slice(b);
        }
        self.pos += b.len();
    }
}

/// HELLO and HELLO_ACK body: the sender's endpoint id, nonce and whether it has a secret.
///
/// ```text
/// offset size field
///      0    8 endpoint
///      8   32 nonce
///     40    1 has_secret (0 or 1)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello(pub crate::auth::Hello);

impl Hello {
    /// Length of the body.
    pub const LEN: usize = 8 + NONCE_LEN + 1;

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.0.endpoint.to_le_bytes().to_vec();
        v.extend_from_slice(&self.0.nonce);
        v.push(u8::from(self.0.has_secret));
        v
    }

    /// Decodes the body.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let endpoint = r.u64()?;
        let nonce = r.array()?;
        let has_secret = match r.u8()? {
            0 => false,
            1 => true,
            x => {
                return Err(DecodeError::Unexpected {
                    expected: "secret flag 0 or 1",
                    got: x.to_string(),
                })
            }
        };
        r.finish()?;
        Ok(Self(crate::auth::Hello {
            endpoint,
            nonce,
            has_secret,
        }))
    }
}

/// ERR body: the details of a refused access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessError {
    /// Region id.
    pub region: u64,
    /// Offset of the access.
    pub offset: u64,
    /// Length of the access.
    pub len: u64,
    /// Size of the region (0 when unknown).
    pub size: u64,
}

impl AccessError {
    /// Encodes an access violation as an ERR code and body.
    pub fn from_error(e: &TransportError) -> Option<(ErrCode, Self)> {
        Some(match *e {
            TransportError::UnknownRegion { region } => (
                ErrCode::UnknownRegion,
                Self {
                    region,
                    offset: 0,
                    len: 0,
                    size: 0,
                },
            ),
            TransportError::BadKey { region } => (
                ErrCode::BadKey,
                Self {
                    region,
                    offset: 0,
                    len: 0,
                    size: 0,
                },
            ),
            TransportError::AccessDenied { region, op } => (
                ErrCode::AccessDenied,
                Self {
                    region,
                    offset: u64::from(op == "write"),
                    len: 0,
                    size: 0,
                },
            ),
            TransportError::RegionOutOfBounds {
                region,
                offset,
                len,
                size,
            } => (
                ErrCode::OutOfBounds,
                Self {
                    region,
                    offset,
                    len,
                    size,
                },
            ),
            _ => return None,
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        [self.region, self.offset, self.len, self.size]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()
    }

    /// Decodes an ERR frame into the error it reports.
    pub fn decode(code: u32, b: &[u8]) -> Result<TransportError, DecodeError> {
        let mut r = Reader::new(b);
        let (region, offset, len, size) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        r.finish()?;
        Ok(match code {
            1 => TransportError::UnknownRegion { region },
            2 => TransportError::BadKey { region },
            3 => TransportError::RegionOutOfBounds {
                region,
                offset,
                len,
                size,
            },
            4 => TransportError::AccessDenied {
                region,
                op: if offset == 0 { "read" } else { "write" },
            },
            c => {
                return Err(DecodeError::Unexpected {
                    expected: "error code 1..=4",
                    got: c.to_string(),
                })
            }
        })
    }
}

/// Bytes a client without a secret sends to open a connection: HELLO then an empty AUTH. A server
/// without a secret is established after reading them. For tests and fuzzing that speak the
/// protocol from a raw socket.
pub fn plain_client_handshake(endpoint: u64, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let body = Hello(crate::auth::Hello {
        endpoint,
        nonce,
        has_secret: false,
    })
    .encode();
    let mut h = Header::new(FrameKind::Hello);
    h.body_len = body.len() as u32;
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&body);
    v.extend_from_slice(&Header::new(FrameKind::Auth).encode());
    v
}

/// Encodes a whole frame (header with `body_len` set, then the body).
pub fn encode_frame(mut h: Header, body: &[u8]) -> Vec<u8> {
    h.body_len = body.len() as u32;
    let mut v = h.encode().to_vec();
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = Header {
            version: PROTOCOL_VERSION,
            kind: FrameKind::Write,
            flags: FLAG_LAST | FLAG_NOTIFY,
            body_len: 123,
            arg: 0xdead_beef,
            op_id: 1 << 40,
            region: 7,
            offset: u64::MAX,
            key: 42,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn header_rejects_garbage() {
        let good = Header::new(FrameKind::Ping).encode();
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        assert!(Header::decode(&bad_magic).is_err());
        let mut bad_kind = good;
        bad_kind[3] = 99;
        assert_eq!(
            Header::decode(&bad_kind).unwrap_err().expected(),
            "a known frame kind"
        );
        let mut bad_flags = good;
        bad_flags[4] = 0x80;
        assert!(Header::decode(&bad_flags).is_err());
        let mut bad_res = good;
        bad_res[6] = 1;
        assert!(Header::decode(&bad_res).is_err());
        assert!(Header::decode(&good[..47]).is_err());
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(
            Header::decode(&longer).unwrap_err().expected(),
            "end of frame"
        );
        let mut other_version = good;
        other_version[2] = 9;
        assert_eq!(Header::decode(&other_version).unwrap().version, 9);
    }

    #[test]
    fn bodies_roundtrip() {
        for has_secret in [false, true] {
            let h = Hello(crate::auth::Hello {
                endpoint: 5,
                nonce: [3; NONCE_LEN],
                has_secret,
            });
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
        assert!(Hello::decode(&[0; Hello::LEN]).is_ok());
        assert!(Hello::decode(&[0; Hello::LEN - 1]).is_err());
        assert!(Hello::decode(&[0; Hello::LEN + 1]).is_err());
        let mut bad_flag = [0; Hello::LEN];
        bad_flag[Hello::LEN - 1] = 2;
        assert!(Hello::decode(&bad_flag).is_err());
        let e = TransportError::RegionOutOfBounds {
            region: 1,
            offset: 2,
            len: 3,
            size: 4,
        };
        let (code, body) = AccessError::from_error(&e).unwrap();
        assert!(matches!(
            AccessError::decode(code as u32, &body.encode()),
            Ok(TransportError::RegionOutOfBounds {
                region: 1,
                offset: 2,
                len: 3,
                size: 4
            })
        ));
        assert!(AccessError::decode(7, &body.encode()).is_err());
    }
}
