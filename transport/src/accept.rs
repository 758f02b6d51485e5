//! The accept side shared by every backend: a bounded queue of incoming connections (and of the
//! refusals worth reporting), and a cap on handshakes in progress.
//!
//! Anyone who can reach the listening port can open connections; none of that may grow without
//! bound. Established connections wait in `AcceptQueue` until the application calls
//! `accept`; failed handshakes are queued too (so that `accept` can say *why* a peer was refused),
//! but a refusal never displaces an established connection: when the queue is full, the oldest
//! refusal makes room, and a new refusal is dropped (logged) if there is none. An established
//! connection that finds the queue full of established ones is handed back to the caller to
//! close. `HandshakeSlots` caps the handshakes running at once; a connection beyond it is
//! closed at once, before any work is done for it.

use crate::error::{Result, TransportError};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default bound of `AcceptQueue`: established connections waiting for `accept`, plus refusals.
pub const ACCEPT_QUEUE: usize = 256;
/// Default cap of `HandshakeSlots`: handshakes in progress at once on one endpoint.
pub const MAX_HANDSHAKES: usize = 256;

/// A bounded queue of accepted connections and refusals. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct AcceptQueue<C> {
    q: Mutex<VecDeque<Result<C>>>,
    cv: Condvar,
    cap: usize,
}

impl<C> AcceptQueue<C> {
    /// A queue of at most `cap` entries (at least 1).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            q: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            cap: cap.max(1),
        }
    }

    /// Queues an established connection or a refusal. Returns the connection when there is no
    /// room for it (the caller closes it).
    pub(crate) fn push(&self, r: Result<C>) -> Option<C> {
        let mut q = self.q.lock();
        if q.len() >= self.cap {
            match q.iter().position(|e| e.is_err()) {
                Some(i) => {
                    q.remove(i);
                }
                None => {
                    return match r {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "accept queue full; refusal not queued");
                            None
                        }
                    }
                }
            }
        }
        q.push_back(r);
        drop(q);
        self.cv.notify_one();
        None
    }

    /// The next entry, waiting up to `timeout`; `closed` is checked on each wake-up.
    pub(crate) fn pop(&self, timeout: Duration, closed: impl Fn() -> bool) -> Result<C> {
        let deadline = Instant::now() + timeout;
        let mut q = self.q.lock();
        loop {
            if let Some(r) = q.pop_front() {
                return r;
            }
            if closed() {
                return Err(TransportError::EndpointClosed);
            }
            if self.cv.wait_until(&mut q, deadline).timed_out() {
                return q
                    .pop_front()
                    .unwrap_or(Err(TransportError::Timeout { after: timeout }));
            }
        }
    }

    /// Wakes every waiter (on shutdown) and empties the queue.
    pub(crate) fn close(&self) -> Vec<Result<C>> {
        let v = self.q.lock().drain(..).collect();
        self.cv.notify_all();
        v
    }
}

/// Counts handshakes in progress against a cap. See the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct HandshakeSlots {
    used: Arc<AtomicUsize>,
    cap: usize,
}

/// One handshake's slot; released on drop.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        // Relaxed: the counter only bounds how many handshakes run; it orders no other memory.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HandshakeSlots {
    /// At most `cap` (at least 1) handshakes at once.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            used: Arc::new(AtomicUsize::new(0)),
            cap: cap.max(1),
        }
    }

    /// A slot, or `None` when `cap` handshakes are already running.
    pub(crate) fn try_take(&self) -> Option<Slot> {
        // Relaxed: see `Slot::drop`; the update itself is atomic, so the cap holds.
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(&self.used)))
    }

    /// Handshakes running now.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(i: u64) -> Result<u64> {
        Err(TransportError::UnknownRegion { region: i })
    }

    #[test]
    fn refusals_never_displace_connections() {
        let q = AcceptQueue::new(3);
        assert!(q.push(refused(1)).is_none());
        assert!(q.push(Ok(10)).is_none());
        assert!(q.push(refused(2)).is_none());
        // Full: a connection evicts the oldest refusal.
        assert!(q.push(Ok(11)).is_none());
        // Full: a refusal evicts the remaining refusal.
        assert!(q.push(refused(3)).is_none());
        assert!(q.push(Ok(12)).is_none());
        // Full of connections: a refusal is dropped, a connection comes back to be closed.
        assert!(q.push(refused(4)).is_none());
        assert_eq!(q.push(Ok(13)), Some(13));
        let got: Vec<u64> = (0..3)
            .map(|_| q.pop(Duration::ZERO, || false).unwrap())
            .collect();
        assert_eq!(got, [10, 11, 12]);
        assert!(matches!(
            q.pop(Duration::ZERO, || false),
            Err(TransportError::Timeout { .. })
        ));
        assert!(matches!(
            q.pop(Duration::ZERO, || true),
            Err(TransportError::EndpointClosed)
        ));
    }

    #[test]
    fn slots_cap_and_release() {
        let s = HandshakeSlots::new(2);
        let a = s.try_take().unwrap();
        let _b = s.try_take().unwrap();
        assert!(s.try_take().is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_take().is_some());
    }
}
