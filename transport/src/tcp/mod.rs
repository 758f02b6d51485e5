//! The TCP backend: one progress thread per endpoint on a mio event loop.
//!
//! - [`codec`]: the versioned, length-prefixed frame format (48-byte header + body).
//! - [`proto`]: one connection's protocol as a socket-free state machine (handshake with optional
//!   HMAC-SHA256 challenge-response, request bookkeeping, target-side access checks, heartbeats).
//! - [`endpoint`]: the mio loop that moves bytes between sockets and the state machines, and the
//!   [`TcpTransport`] / [`TcpConnection`] handles.
//!
//! One-sided operations are carried out by the *target's* progress thread: a WRITE frame's header
//! is checked (region id, key, bounds) before its payload is read from the socket straight into the
//! region; a READ_REQ is checked, then answered with READ_RESP frames sent from the region. Large
//! transfers travel in chunks of [`proto::CHUNK`] bytes. Sockets have `TCP_NODELAY` set.
//!
//! One TCP stream per peer connection: on loopback a single stream already runs at memory-copy
//! speed, and `iperf3 -P 2` measured no more than one stream on the 2-core CI machine kind (see
//! `scripts/bench-tcp.sh`), so striping over several streams is not implemented.

pub mod codec;
pub mod endpoint;
pub mod proto;

pub use endpoint::{TcpConnection, TcpTransport};
