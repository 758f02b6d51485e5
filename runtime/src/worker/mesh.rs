//! The peer mesh: every worker holds one connection to every other. Higher-numbered workers
//! connect to lower ones at `Setup`; the acceptor thread sorts incoming connections by their
//! first message (a driver's hello queues the driver, a peer's hello joins the mesh).

use super::{Worker, HELLO_TIMEOUT, MAX_PENDING_HELLOS, MAX_WAITING_DRIVERS};
use crate::cluster::Cluster;
use crate::control::{connect_retry, msg_kind, post_msg, recv_msg, send_msg};
use crate::error::{Result, RuntimeError};
use crate::proto::{self, Msg};
use genie_transport::{Connection, Transport, TransportError};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct PeerMap {
    pub(super) conns: Mutex<HashMap<usize, Arc<dyn Connection>>>,
    pub(super) cv: Condvar,
}

/// Sorts incoming connections by their first message (see the module doc): all pending ones
/// are polled together, each within [`HELLO_TIMEOUT`], at most [`MAX_PENDING_HELLOS`] of them.
pub(super) fn accept_loop(
    endpoint: &dyn Transport,
    cluster: &RwLock<Cluster>,
    name: &str,
    peers: &PeerMap,
    stop: &AtomicBool,
    ctrl_tx: &mpsc::SyncSender<Arc<dyn Connection>>,
) {
    let mut pending: VecDeque<(Arc<dyn Connection>, Instant)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        // While hellos are due, look at them often; otherwise sleep in accept.
        let wait = if pending.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(2)
        };
        match endpoint.accept(wait) {
            Ok(conn) => {
                if pending.len() >= MAX_PENDING_HELLOS {
                    if let Some((old, _)) = pending.pop_front() {
                        tracing::warn!(
                            worker = name,
                            "too many silent connections: dropped the oldest"
                        );
                        old.close();
                    }
                }
                pending.push_back((conn, Instant::now() + HELLO_TIMEOUT));
            }
            Err(TransportError::Timeout { .. }) => {}
            Err(TransportError::EndpointClosed) => return,
            Err(e) => tracing::warn!(worker = name, error = %e, "refused an incoming connection"),
        }
        let now = Instant::now();
        let mut k = 0;
        while k < pending.len() {
            let (conn, deadline) = &pending[k];
            let first = match conn.try_recv() {
                Ok(Some(bytes)) => Some(bytes),
                Ok(None) if now < *deadline && conn.is_alive() => {
                    k += 1;
                    continue;
                }
                Ok(None) => {
                    tracing::warn!(worker = name, "no hello within {HELLO_TIMEOUT:?}");
                    None
                }
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "connection ended before its hello");
                    None
                }
            };
            let Some((conn, _)) = pending.remove(k) else {
                break;
            };
            match first {
                Some(bytes) => {
                    if !hello(&conn, &bytes, &cluster.read(), name, peers, ctrl_tx) {
                        return;
                    }
                }
                None => conn.close(),
            }
        }
    }
}

/// Acts on the first message of an incoming connection; `false` when the worker is stopping.
fn hello(
    conn: &Arc<dyn Connection>,
    bytes: &[u8],
    cluster: &Cluster,
    name: &str,
    peers: &PeerMap,
    ctrl_tx: &mpsc::SyncSender<Arc<dyn Connection>>,
) -> bool {
    let refuse = |reason: String| {
        tracing::warn!(worker = name, %reason, "refused a hello");
        let msg = Msg::Failed {
            run: 0,
            error: RuntimeError::Refused {
                worker: name.into(),
                reason,
            }
            .to_string(),
            culprit: None,
        };
        let _ = post_msg(&**conn, "<incoming>", &msg, &[]);
        conn.close();
    };
    match proto::decode(bytes, "<incoming>") {
        Ok((Msg::HelloDriver, _)) => match ctrl_tx.try_send(conn.clone()) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => refuse(format!(
                "{MAX_WAITING_DRIVERS} drivers are already waiting for this worker"
            )),
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
        },
        Ok((Msg::HelloPeer { name: peer }, _)) => match cluster.index_of(&peer) {
            Ok(_) if peer == name => refuse(format!("a peer claims to be `{peer}`, this worker")),
            Ok(i) => {
                let mut conns = peers.conns.lock();
                if conns.get(&i).is_some_and(|c| c.is_alive()) {
                    drop(conns);
                    refuse(format!("peer `{peer}` is already connected"));
                } else if post_msg(&**conn, &peer, &Msg::Welcome, &[]).is_ok() {
                    conns.insert(i, conn.clone());
                    peers.cv.notify_all();
                }
            }
            Err(e) => refuse(e.to_string()),
        },
        Ok((other, _)) => refuse(format!("expected a hello, got {}", msg_kind(&other))),
        Err(e) => refuse(e.to_string()),
    }
    true
}

/// Whether two handles are the same connection.
pub(super) fn same_conn(a: &Arc<dyn Connection>, b: &Arc<dyn Connection>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Worker {
    /// Connects to peer `j` and introduces ourselves; a refusal (our old connection is not yet
    /// seen dead there) is retried until `deadline`.
    pub(super) fn connect_peer(&self, j: usize, deadline: Instant) -> Result<Arc<dyn Connection>> {
        let peer = self.peer_name(j);
        let addr = self.cluster.workers[j].address;
        loop {
            let conn = connect_retry(&*self.endpoint, addr, &peer, deadline)?;
            let hello = Msg::HelloPeer {
                name: self.name.clone(),
            };
            send_msg(&*conn, &peer, &hello, &[])?;
            let left = deadline.saturating_duration_since(Instant::now());
            let reason = match recv_msg(&*conn, &peer, left.max(Duration::from_millis(1))) {
                Ok((Msg::Welcome, _)) => return Ok(conn),
                Ok((Msg::Failed { error, .. }, _)) => error,
                Ok((other, _)) => format!("answered the hello with {}", msg_kind(&other)),
                Err(e) => e.to_string(),
            };
            conn.close();
            if Instant::now() >= deadline {
                return Err(RuntimeError::WorkerFailed {
                    worker: peer,
                    reason,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn peer(&self, i: usize) -> Result<Arc<dyn Connection>> {
        self.peers
            .conns
            .lock()
            .get(&i)
            .cloned()
            .ok_or_else(|| RuntimeError::WorkerFailed {
                worker: self.peer_name(i),
                reason: "not connected (was Setup sent?)".into(),
            })
    }
}
