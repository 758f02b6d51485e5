//! Decoding untrusted bytes, shared by every wire format of the crate (the TCP frames of
//! [`crate::tcp::codec`], the RDMA side channel's frames).
//!
//! Every parse goes through a [`Reader`], whose reads return a [`DecodeError`] instead of indexing
//! into peer bytes, and which rejects trailing data ([`Reader::finish`]). A wire format decodes
//! its types with `fn decode(bytes) -> Result<Self, DecodeError>` built on it; the layouts
//! themselves (byte tables, tags, versions) stay with their format.
//!
//! ```
//! use genie_transport::codec::{DecodeError, Reader};
//!
//! let mut r = Reader::new(&[7, 0, 0, 0, 1]);
//! assert_eq!(r.u32(), Ok(7));
//! assert_eq!(r.finish(), Err(DecodeError::Trailing(1)));
//! ```

use crate::error::TransportError;

/// Why bytes could not be decoded. The peer sent them: the connection that received them is
/// closed ([`DecodeError::into_error`] names it), never the process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("truncated {what}: {had} of {needed} bytes")]
    Truncated {
        /// What was being read (set with [`Reader::context`]).
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        had: usize,
    },
    /// Bytes remain after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A frame tag or kind that this format does not know.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// A length prefix that is zero or over the format's limit.
    #[error("frame length {0} out of range")]
    BadLength(u32),
    /// A field holds a value it cannot have.
    #[error("bad value in {0}")]
    BadValue(&'static str),
    /// The peer speaks another version of the protocol.
    #[error("protocol version {theirs} (ours is {ours})")]
    Version {
        /// The peer's version.
        theirs: u8,
        /// Ours.
        ours: u8,
    },
    /// A field or frame other than the one expected here.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
}

impl DecodeError {
    /// What the decoder expected, in a few words.
    pub fn expected(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "more bytes",
            Self::Trailing(_) => "end of frame",
            Self::UnknownTag(_) => "a known frame tag",
            Self::BadLength(_) => "a frame length in range",
            Self::BadValue(what) => what,
            Self::Version { .. } => "our protocol version",
            Self::Unexpected { expected, .. } => expected,
        }
    }

    /// What arrived instead, in a few words.
    pub fn got(&self) -> String {
        match self {
            Self::Truncated { had, needed, .. } => format!("{had} of {needed} bytes"),
            Self::Trailing(n) => format!("{n} trailing bytes"),
            Self::UnknownTag(t) => format!("tag {t}"),
            Self::BadLength(n) => format!("length {n}"),
            Self::BadValue(_) => "an impossible value".into(),
            Self::Version { theirs, .. } => format!("version {theirs}"),
            Self::Unexpected { got, .. } => got.clone(),
        }
    }

    /// As a [`TransportError::InvalidFrame`] naming the peer.
    pub fn into_error(self, peer: Option<std::net::SocketAddr>) -> TransportError {
        TransportError::InvalidFrame {
            peer,
            expected: self.expected(),
            got: self.got(),
        }
    }
}

/// A cursor over untrusted bytes: every read returns an error instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            what: "frame",
        }
    }

    /// Names what the next reads decode, for [`DecodeError::Truncated`] (default `"frame"`).
    pub fn context(&mut self, what: &'static str) -> &mut Self {
        self.what = what;
        self
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated {
                what: self.what,
                needed: n,
                had: self.rest.len(),
            });
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Takes a byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// Takes a little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Takes a little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Fails with [`DecodeError::Trailing`] if bytes are left over.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_truncated_not_a_panic() {
        let mut r = Reader::new(&[1, 2, 3]);
        r.context("credits");
        assert_eq!(
            r.u32(),
            Err(DecodeError::Truncated {
                what: "credits",
                needed: 4,
                had: 3
            })
        );
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
        assert_eq!(r.take(3), Ok(&[1, 2, 3][..]));
        assert_eq!(r.u8().unwrap_err().expected(), "more bytes");
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn little_endian_and_trailing_bytes() {
        let mut r = Reader::new(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 9]);
        assert_eq!(r.u64(), Ok(1));
        assert_eq!(r.u8(), Ok(2));
        let e = r.finish().unwrap_err();
        assert_eq!(e, DecodeError::Trailing(1));
        assert!(matches!(
            e.into_error(None),
            TransportError::InvalidFrame { expected: "end of frame", got, .. } if got == "1 trailing bytes"
        ));
    }
}
