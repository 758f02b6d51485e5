//! The TCP backend: one progress thread per endpoint on a mio event loop.
//!
//! - [`codec`]: the versioned, length-prefixed frame format (48-byte header + body).
//! - [`proto`]: one connection's protocol as a socket-free state machine (handshake with optional
//!   HMAC-SHA256 challenge-response, request bookkeeping, target-side access checks, heartbeats).
//! - [`endpoint`]: the mio loop that moves bytes between sockets and the state machines, and the
//!   [`TcpTransport`] / [`TcpConnection`] handles. A caller writes its own small messages and read
//!   requests (up to [`endpoint::DIRECT_MAX`]) to the socket under the connection's lock, so a send
//!   wakes no thread on its own side; one-sided writes and larger requests go through the progress
//!   thread (see the endpoint's docs for ordering and the lock order).
//!
//! One-sided operations are carried out by the *target's* progress thread: a WRITE frame's header
//! is checked (region id, key, bounds) before its payload is read from the socket straight into the
//! region; a READ_REQ is checked, then answered with READ_RESP frames sent from the region. Large
//! transfers travel in chunks of [`proto::CHUNK`] bytes. Sockets have `TCP_NODELAY` set. A
//! device region's chunks are staged through host buffers on both sides, pipelined (see
//! [`proto`] and [`crate::device`]); the wire is the same.
//!
//! Streams. A connection uses [`crate::config::TcpConfig::streams`] TCP streams (default 1, at
//! most [`crate::config::TcpConfig::MAX_STREAMS`]); the two ends use the smaller of their two
//! settings, agreed in the first stream's HELLO / HELLO_ACK (see [`codec`]; with one stream the
//! handshake and every frame are those of before, byte for byte). The client then opens the
//! other streams; each runs the same authentication as the first and names the connection it
//! joins by the random 64-bit id the server gave out on the first stream; the server checks the
//! id, the peer's endpoint id and the room left before it answers READY, else refuses the stream
//! ([`crate::TransportError::StreamRefused`]); `connect` returns once every stream has joined.
//! (The id is not bound into the proofs: TCP frames are not authenticated after the handshake
//! anyway, so an on-path attacker gains nothing from it that it does not have already.)
//! Transfers are spread over the streams as [`stripe`] describes: a part is an ordinary WRITE or
//! READ_REQ on its stream, checked by the target as any other; notifications, messages and reads
//! posted after a write that used another stream wait, on the sender, until its parts are
//! acknowledged. Any stream failing fails the whole connection with its error.
//!
//! Figures (2-core shared development machine, `scripts/bench-tcp.sh`): see the README. One
//! process's progress thread serves all of an endpoint's streams, so more streams add socket
//! parallelism in the kernel, not more progress threads.

pub mod codec;
pub mod endpoint;
pub mod proto;
pub mod stripe;

pub use endpoint::{TcpConnection, TcpTransport};
