//! How a one-sided transfer is spread over a connection's TCP streams
//! ([`crate::config::TcpConfig::streams`]). Pure arithmetic: the endpoint sends each part as an
//! ordinary WRITE or READ_REQ on its stream, so the target needs nothing new.
//!
//! - A transfer of at least [`STRIPE_MIN`] bytes is cut into one contiguous part per stream
//!   (equal, rounded up to [`STRIPE_ALIGN`]); it completes when every part has.
//! - A shorter write without a notification goes whole to the next stream in turn, so many
//!   medium writes in flight spread over the streams too.
//! - Everything else (short reads, short writes with a notification, messages) stays on the
//!   first stream.
//!
//! Order: a notification, message or read posted after a write that went (partly) over another
//! stream than the first waits on the sender until that write's parts are acknowledged, i.e.
//! landed; a striped write's own notification is sent, empty, after its parts. Two writes to the
//! same target bytes posted without waiting in between may land in either order.

/// Shortest transfer cut into parts, one per stream.
pub const STRIPE_MIN: usize = 256 << 10;
/// Parts are multiples of this (but the last).
pub const STRIPE_ALIGN: usize = 4096;

/// One part of a transfer: the stream (0: the first) and the part's range in the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Stream index, `0..streams`.
    pub stream: usize,
    /// Offset of the part in the transfer.
    pub offset: usize,
    /// Length of the part.
    pub len: usize,
}

/// The parts of a transfer of `len` bytes over `streams` streams. `turn` picks the stream of an
/// uncut write (the caller advances it per write); `cut_only` keeps short transfers on stream 0.
pub fn plan(len: usize, streams: usize, turn: usize, cut_only: bool) -> Vec<Part> {
    let streams = streams.max(1);
    if streams == 1 || len < STRIPE_MIN {
        let stream = if cut_only { 0 } else { turn % streams };
        return vec![Part {
            stream,
            offset: 0,
            len,
        }];
    }
    let part = len.div_ceil(streams).next_multiple_of(STRIPE_ALIGN);
    (0..streams)
        .map(|i| {
            let offset = (i * part).min(len);
            Part {
                stream: i,
                offset,
                len: part.min(len - offset),
            }
        })
        .filter(|p| p.len > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(parts: &[Part], len: usize) -> bool {
        let mut at = 0;
        for p in parts {
            if p.offset != at {
                return false;
            }
            at += p.len;
        }
        at == len
    }

    #[test]
    fn parts_cover_the_transfer_exactly() {
        for streams in 1..=8 {
            for len in [
                0,
                1,
                STRIPE_MIN - 1,
                STRIPE_MIN,
                STRIPE_MIN + 1,
                3 * STRIPE_MIN + 7,
                64 << 20,
            ] {
                let parts = plan(len, streams, 5, false);
                assert!(
                    covers(&parts, len),
                    "{streams} streams, {len} bytes: {parts:?}"
                );
                assert!(parts.iter().all(|p| p.stream < streams));
                if len >= STRIPE_MIN {
                    assert_eq!(parts.len(), streams, "{len}");
                } else {
                    assert_eq!(parts.len(), 1);
                }
            }
        }
    }

    #[test]
    fn short_transfers_take_turns_unless_kept_on_the_first_stream() {
        assert_eq!(plan(100, 3, 4, false)[0].stream, 1);
        assert_eq!(plan(100, 3, 4, true)[0].stream, 0);
        assert_eq!(plan(STRIPE_MIN, 2, 1, true)[1].stream, 1);
    }
}
