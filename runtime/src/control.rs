//! Control messages between a driver and its workers, and between peers: the endpoint
//! configuration both sides open, framed `proto` messages sent and received with the
//! worker's name attached to every failure, and connecting while a peer still starts.
//!
//! The driver ([`crate::driver`]) and the worker ([`crate::worker`]) share these; the
//! messages themselves are defined in [`crate::proto`].

use crate::cluster::Cluster;
use crate::error::{Result, RuntimeError};
use crate::proto::{self, Msg};
use genie_transport::{BackendChoice, Connection, Transport, TransportConfig, TransportError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long set-up steps (connecting to peers, exchanging descriptors) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest control message (inputs, outputs).
pub const MAX_MESSAGE: usize = 64 << 20;

/// The transport configuration of a driver endpoint listening on `listen` (a worker's: set
/// `rdma` to [`Cluster::rdma_for`] of its index).
pub fn transport_config(cluster: &Cluster, listen: SocketAddr) -> TransportConfig {
    TransportConfig {
        backend: BackendChoice::Auto,
        listen,
        secret: cluster.secret.clone(),
        max_message_size: MAX_MESSAGE,
        rdma: cluster.rdma_for(None),
        peer_timeout: cluster.peer_timeout,
        ..TransportConfig::default()
    }
}

/// A transport failure on the connection to `worker`: a dead or closed peer blames that
/// worker, anything else is a transport error.
pub(crate) fn terr(worker: &str, e: TransportError) -> RuntimeError {
    match e {
        TransportError::PeerDead { .. } | TransportError::ConnectionClosed { .. } => {
            RuntimeError::WorkerFailed {
                worker: worker.into(),
                reason: e.to_string(),
            }
        }
        source => RuntimeError::Transport {
            worker: worker.into(),
            source,
        },
    }
}

/// Sends a control message and waits until the transport has taken it.
pub fn send_msg(conn: &dyn Connection, peer: &str, msg: &Msg, payload: &[u8]) -> Result<()> {
    let bytes = proto::encode(msg, payload)?;
    conn.send(&bytes)
        .and_then(|op| op.wait(SETUP_TIMEOUT))
        .map_err(|e| terr(peer, e))
}

/// Hands a control message to the transport without waiting until it has been taken.
pub fn post_msg(conn: &dyn Connection, peer: &str, msg: &Msg, payload: &[u8]) -> Result<()> {
    let bytes = proto::encode(msg, payload)?;
    conn.send(&bytes).map(drop).map_err(|e| terr(peer, e))
}

/// Receives the next control message, waiting up to `timeout`.
pub fn recv_msg(conn: &dyn Connection, peer: &str, timeout: Duration) -> Result<(Msg, Vec<u8>)> {
    let bytes = conn.recv(timeout).map_err(|e| terr(peer, e))?;
    proto::decode(&bytes, peer)
}

/// Connects to `addr`, retrying until `deadline` (the peer may still be starting).
pub fn connect_retry(
    endpoint: &dyn Transport,
    addr: SocketAddr,
    peer: &str,
    deadline: Instant,
) -> Result<Arc<dyn Connection>> {
    loop {
        match endpoint.connect(addr) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return Err(RuntimeError::WorkerFailed {
                    worker: peer.into(),
                    reason: format!("cannot connect to {addr}: {e}"),
                })
            }
            // Retrying cannot fix a refused handshake (the cluster secrets or the versions
            // differ) or a bad address; anything else may be a peer still starting.
            Err(
                source @ (TransportError::AuthFailed { .. }
                | TransportError::VersionMismatch { .. }
                | TransportError::InvalidArgument(_)
                | TransportError::BackendUnavailable { .. }),
            ) => {
                return Err(RuntimeError::Transport {
                    worker: peer.into(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A message's variant name (for refusals: never echo what a peer sent in full).
pub(crate) fn msg_kind(m: &Msg) -> &'static str {
    match m {
        Msg::HelloDriver => "HelloDriver",
        Msg::HelloPeer { .. } => "HelloPeer",
        Msg::Welcome => "Welcome",
        Msg::Setup { .. } => "Setup",
        Msg::SetupDone => "SetupDone",
        Msg::Run { .. } => "Run",
        Msg::Regions { .. } => "Regions",
        Msg::Done { .. } => "Done",
        Msg::Failed { .. } => "Failed",
        Msg::FreeSequence { .. } => "FreeSequence",
        Msg::Freed { .. } => "Freed",
        Msg::Shutdown => "Shutdown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// A dead peer blames the worker; other transport failures keep the transport's typed
    /// error as their source, so callers decide on its variant.
    #[test]
    fn transport_failures_keep_their_type() {
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let dead = terr(
            "w1",
            TransportError::PeerDead {
                peer,
                reason: "silent".into(),
            },
        );
        assert!(matches!(dead, RuntimeError::WorkerFailed { ref worker, .. } if worker == "w1"));
        let after = Duration::from_millis(5);
        let timeout = terr("w1", TransportError::Timeout { after });
        assert!(matches!(
            timeout,
            RuntimeError::Transport {
                source: TransportError::Timeout { .. },
                ..
            }
        ));
        assert!(timeout.source().is_some());
        assert!(timeout.to_string().contains("w1") && timeout.to_string().contains("timed out"));
    }
}
