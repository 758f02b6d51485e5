//! The endpoint's lane poster: one thread that posts the work requests of striped transfers' parts
//! on connections' further lanes ([`crate::config::RdmaConfig::qps`] > 1).
//!
//! A submitter books a part's requests on the lane (sequence numbers, pending entries, room in its
//! send queue) and queues them; this thread rings the doorbells. On hardware a post costs a
//! doorbell write, but soft-RoCE (rxe) runs the requester in the posting thread's context and, on
//! an idle QP, moves the whole request before `ibv_post_send` returns (a second or more for a
//! 32 MiB part in the VM): posted by the submitter, a striped write would return only once its
//! further parts had landed. Here the submitter returns at once, as with one QP. One thread per
//! endpoint (started only when lanes are configured), never one per connection; the endpoint's
//! poller never posts, so its heartbeats and completions are never held up by such a post.

use super::conn::RdmaConn;
use crate::error::{Result, TransportError};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

/// Lanes with queued requests: (connection, lane index), in the order they were kicked.
struct Queue {
    kicks: VecDeque<(Weak<RdmaConn>, usize)>,
    stop: bool,
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// Handle to the lane poster thread (see the module docs).
pub(crate) struct LanePoster {
    shared: Arc<Shared>,
}

impl LanePoster {
    /// Starts the thread.
    pub(crate) fn start() -> Result<(Self, JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                kicks: VecDeque::new(),
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let s2 = Arc::clone(&shared);
        let t = std::thread::Builder::new()
            .name("genie-rdma-lanes".into())
            .spawn(move || run(&s2))
            .map_err(|e| TransportError::io("spawn", e))?;
        Ok((Self { shared }, t))
    }

    /// Lane `lane` of `conn` has requests queued: post them soon.
    pub(crate) fn kick(&self, conn: Weak<RdmaConn>, lane: usize) {
        let mut q = self.shared.q.lock();
        if q.stop {
            return;
        }
        q.kicks.push_back((conn, lane));
        drop(q);
        self.shared.cv.notify_one();
    }

    /// Stops the thread (after the endpoint's connections died: what is queued is dropped).
    pub(crate) fn stop(&self) {
        let mut q = self.shared.q.lock();
        q.stop = true;
        q.kicks.clear();
        drop(q);
        self.shared.cv.notify_all();
    }
}

fn run(shared: &Shared) {
    loop {
        let (conn, lane) = {
            let mut q = shared.q.lock();
            loop {
                if q.stop {
                    return;
                }
                if let Some(k) = q.kicks.pop_front() {
                    break k;
                }
                shared.cv.wait(&mut q);
            }
        };
        if let Some(c) = conn.upgrade() {
            c.flush_lane(lane);
        }
    }
}
