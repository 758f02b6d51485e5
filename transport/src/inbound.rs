//! The receiving end of a connection's inbound queues (messages, notifications), the same for
//! every backend: [`InboundQueue::try_take`] behind `try_recv`/`try_recv_notification`,
//! [`InboundQueue::wait`] behind `recv`/`recv_notification`.
//!
//! The backend's progress engine pushes items under the queue's lock and then notifies its
//! condvar; when the connection closes it makes its close error visible to `closed` and notifies
//! too. A take checks, in this order:
//! 1. the queue: an item is returned even from a closed connection, so that what arrived is
//!    drained before the close reason (the [`crate::Connection`] contract);
//! 2. the connection's close error;
//! 3. the clock: a wait sleeps until the deadline and takes once more when it has passed, so an
//!    item pushed as the wait timed out is returned, not a [`TransportError::Timeout`].
//!
//! What differs per backend is passed in:
//! - `take` runs under the queue's lock. A backend that must act on a take while holding it does
//!   so in `take` (TCP wakes a progress thread that stopped reading for lack of room: the thread
//!   sets that flag under the same lock, so no wake-up is lost); one that acts after the lock is
//!   released does so on the returned item (RDMA returns the item's receive credits, which takes
//!   other locks).
//! - `closed` runs under the queue's lock, after `take` found nothing: the close error, or `None`
//!   while the connection is open.
//! - A [`DriveHook`] in busy-poll mode (given to [`InboundQueue::new`]): the waiting thread runs
//!   the backend's progress itself (RDMA: polls the CQ) between looks at the queue instead of
//!   sleeping, and never while holding the queue's lock (delivering an item takes it). Its
//!   deadline is a [`SpinDeadline`], which reads the clock only every few rounds; the look at the
//!   queue just before each deadline check is the last take.

use crate::completion::DriveHook;
use crate::error::{Result, TransportError};
use genie_sys::clock::SpinDeadline;
use parking_lot::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// One inbound queue of a connection, as the application's receiving threads see it. See the
/// [module docs](self).
pub(crate) struct InboundQueue<'a, S> {
    queue: &'a Mutex<S>,
    ready: &'a Condvar,
    drive: Option<&'a DriveHook>,
}

impl<'a, S> InboundQueue<'a, S> {
    /// The queue's state under `queue`'s lock; its producer notifies `ready` after each push and
    /// when the connection closes. With a `drive` hook (busy-poll mode) waits spin and run it
    /// instead of sleeping on `ready`.
    pub(crate) fn new(
        queue: &'a Mutex<S>,
        ready: &'a Condvar,
        drive: Option<&'a DriveHook>,
    ) -> Self {
        Self {
            queue,
            ready,
            drive,
        }
    }

    /// The next item if there is one (in busy-poll mode after driving once when there is none),
    /// else the close error, else `None`.
    pub(crate) fn try_take<T>(
        &self,
        mut take: impl FnMut(&mut S) -> Option<T>,
        closed: impl FnOnce(&S) -> Option<TransportError>,
    ) -> Result<Option<T>> {
        let mut s = self.queue.lock();
        if let Some(v) = take(&mut s) {
            return Ok(Some(v));
        }
        if let Some(drive) = self.drive {
            // An empty queue means "progress now": in busy-poll mode nobody else may be doing it.
            drop(s);
            drive();
            s = self.queue.lock();
            if let Some(v) = take(&mut s) {
                return Ok(Some(v));
            }
        }
        closed(&s).map_or(Ok(None), Err)
    }

    /// The next item, waiting up to `timeout` for one; the close error if the connection closed
    /// with nothing queued; [`TransportError::Timeout`] once the whole timeout has passed.
    pub(crate) fn wait<T>(
        &self,
        timeout: Duration,
        mut take: impl FnMut(&mut S) -> Option<T>,
        mut closed: impl FnMut(&S) -> Option<TransportError>,
    ) -> Result<T> {
        if let Some(drive) = self.drive {
            let mut deadline = SpinDeadline::new(timeout);
            loop {
                {
                    let mut s = self.queue.lock();
                    if let Some(v) = take(&mut s) {
                        return Ok(v);
                    }
                    if let Some(e) = closed(&s) {
                        return Err(e);
                    }
                }
                if deadline.passed() {
                    return Err(TransportError::Timeout { after: timeout });
                }
                drive();
                std::hint::spin_loop();
            }
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.queue.lock();
        loop {
            if let Some(v) = take(&mut s) {
                return Ok(v);
            }
            if let Some(e) = closed(&s) {
                return Err(e);
            }
            if self.ready.wait_until(&mut s, deadline).timed_out() {
                return take(&mut s).ok_or(TransportError::Timeout { after: timeout });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A queue with a close flag, filled by the test or by a second thread that waits for the
    //! receiver to be parked on the lock's condvar (no sleeps).
    use super::*;
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Default)]
    struct Queue {
        items: VecDeque<u32>,
        closed: Option<TransportError>,
        /// A receiver is about to wait (set by `take` when it finds nothing).
        looked: usize,
    }

    fn closed_error() -> TransportError {
        TransportError::ConnectionClosed {
            peer: SocketAddr::from(([127, 0, 0, 1], 9)),
        }
    }

    fn take(q: &mut Queue) -> Option<u32> {
        let v = q.items.pop_front();
        if v.is_none() {
            q.looked += 1;
        }
        v
    }

    fn closed(q: &Queue) -> Option<TransportError> {
        q.closed.clone()
    }

    #[test]
    fn queued_items_come_before_the_close_error() {
        let (m, cv) = (Mutex::new(Queue::default()), Condvar::new());
        {
            let mut q = m.lock();
            q.items.extend([1, 2]);
            q.closed = Some(closed_error());
        }
        let inbound = InboundQueue::new(&m, &cv, None);
        assert_eq!(inbound.try_take(take, closed).unwrap(), Some(1));
        assert_eq!(inbound.wait(Duration::ZERO, take, closed).unwrap(), 2);
        assert!(matches!(
            inbound.try_take(take, closed),
            Err(TransportError::ConnectionClosed { .. })
        ));
        assert!(matches!(
            inbound.wait(Duration::from_secs(60), take, closed),
            Err(TransportError::ConnectionClosed { .. })
        ));
    }

    #[test]
    fn an_empty_open_queue_is_none_then_a_timeout_after_one_last_take() {
        let (m, cv) = (Mutex::new(Queue::default()), Condvar::new());
        let inbound = InboundQueue::new(&m, &cv, None);
        assert_eq!(inbound.try_take(take, closed).unwrap(), None);
        // A deadline that has passed at once: no sleep, and still one more take.
        assert!(matches!(
            inbound.wait(Duration::ZERO, take, closed),
            Err(TransportError::Timeout { after }) if after == Duration::ZERO
        ));
        assert_eq!(
            m.lock().looked,
            3,
            "try_take, then wait: a take before and one after"
        );
        // An item that shows up only at the take after the timeout is returned.
        let mut looks = 0;
        let late = |q: &mut Queue| {
            looks += 1;
            (looks == 2).then_some(7).or_else(|| take(q))
        };
        assert_eq!(inbound.wait(Duration::ZERO, late, closed).unwrap(), 7);
        assert_eq!(looks, 2);
    }

    /// Runs `f` on a second thread once the receiver has looked `after` times and released the
    /// lock (it is parked on the condvar or spinning).
    fn when_looked(
        m: &Arc<Mutex<Queue>>,
        after: usize,
        f: impl FnOnce(&mut Queue) + Send + 'static,
    ) {
        let m = Arc::clone(m);
        std::thread::spawn(move || loop {
            let mut q = m.lock();
            if q.looked >= after {
                f(&mut q);
                return;
            }
            drop(q);
            std::thread::yield_now();
        });
    }

    #[test]
    fn a_sleeping_wait_wakes_for_an_item_and_for_the_close() {
        let m = Arc::new(Mutex::new(Queue::default()));
        let cv = Arc::new(Condvar::new());
        let inbound = InboundQueue::new(&m, &cv, None);
        let cv2 = Arc::clone(&cv);
        when_looked(&m, 1, move |q| {
            q.items.push_back(5);
            cv2.notify_all();
        });
        assert_eq!(
            inbound.wait(Duration::from_secs(60), take, closed).unwrap(),
            5
        );
        let cv2 = Arc::clone(&cv);
        when_looked(&m, 2, move |q| {
            q.closed = Some(closed_error());
            cv2.notify_all();
        });
        assert!(matches!(
            inbound.wait(Duration::from_secs(60), take, closed),
            Err(TransportError::ConnectionClosed { .. })
        ));
    }

    #[test]
    fn busy_polling_drives_without_the_lock_until_an_item_arrives() {
        let m = Arc::new(Mutex::new(Queue::default()));
        let cv = Condvar::new();
        let drives = Arc::new(AtomicUsize::new(0));
        let hook: DriveHook = {
            let (m, drives) = (Arc::clone(&m), Arc::clone(&drives));
            Arc::new(move || {
                let mut q = m.try_lock().expect("driven while holding the queue's lock");
                // The third drive delivers an item.
                if drives.fetch_add(1, Ordering::Relaxed) == 2 {
                    q.items.push_back(9);
                }
            })
        };
        let inbound = InboundQueue::new(&m, &cv, Some(&hook));
        assert_eq!(
            inbound.wait(Duration::from_secs(60), take, closed).unwrap(),
            9
        );
        assert_eq!(drives.load(Ordering::Relaxed), 3);
        // try_take drives once when the queue is empty, then looks again.
        assert_eq!(inbound.try_take(take, closed).unwrap(), None);
        assert_eq!(drives.load(Ordering::Relaxed), 4);
        drives.store(2, Ordering::Relaxed);
        assert_eq!(inbound.try_take(take, closed).unwrap(), Some(9));
        // Closed and empty: the close error.
        m.lock().closed = Some(closed_error());
        assert!(matches!(
            inbound.wait(Duration::from_secs(60), take, closed),
            Err(TransportError::ConnectionClosed { .. })
        ));
        assert!(matches!(
            inbound.try_take(take, closed),
            Err(TransportError::ConnectionClosed { .. })
        ));
        // Nothing ever arrives: a timeout.
        m.lock().closed = None;
        assert!(matches!(
            inbound.wait(Duration::ZERO, take, closed),
            Err(TransportError::Timeout { .. })
        ));
    }
}
