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
//! transfers travel in chunks of [`proto::CHUNK`] bytes. Sockets have `TCP_NODELAY` set.
//!
//! One TCP stream per peer connection. Striping large transfers over several streams is not
//! implemented: on the (shared, heavily loaded) 2-core development machine, one genie stream
//! already matched a single iperf3 stream at 1 MiB messages (ratio 1.09, `scripts/bench-tcp.sh`),
//! and `iperf3 -P 2` vs `-P 1` varied more between runs (11.5 vs 8.2–15 Gbit/s) than between
//! settings, so no gain from more streams could be shown.

pub mod codec;
pub mod endpoint;
pub mod proto;

pub use endpoint::{TcpConnection, TcpTransport};
