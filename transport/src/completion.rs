//! Completions shared by all backends: [`Op`] (one operation) and [`Batch`] (many).
//!
//! An operation is *pending* until its backend completes it exactly once with `Ok(())` or an
//! error. Callers either poll ([`Op::poll`], never blocks), spin ([`Op::wait_spin`], lowest
//! latency), or sleep ([`Op::wait_blocking`]); [`Op::wait`] picks spin or sleep from the endpoint's
//! [`PollMode`]. A timed-out wait does not cancel the operation.
//!
//! Model: the state is one atomic byte, written once by the completer while it holds a mutex that
//! sleeping waiters also hold when they check it, so a wake-up cannot be lost; pollers and spinners
//! read the atomic with `Acquire`, pairing with the completer's `Release`, so they also see the
//! error it stored before. The model is checked with `loom` (completion, failure and a dropped
//! completer against a sleeping waiter; a batch completed from two threads):
//! `RUSTFLAGS="--cfg loom" cargo test -p genie-transport --release --lib completion` (use its own
//! `CARGO_TARGET_DIR`, as `scripts/test.sh` does for the scheduler's, to keep the normal build).
//! Storing the state and notifying outside the lock makes three of them fail with a deadlock.
//!
//! Busy polling without a hand-off: a backend may attach a [`DriveHook`] (e.g. "poll my
//! completion queue") to its operations; [`Op::poll`], [`Op::wait_spin`] and a busy-polling
//! [`Batch::wait`] run it while the operation is pending, so the waiting thread completes the
//! operation itself instead of waiting for another thread to be scheduled.
//!
//! An in-flight operation keeps the [`Region`]s it uses alive (their memory cannot be freed or
//! deregistered) until it completes.

use crate::config::PollMode;
use crate::error::{Result, TransportError};
use crate::region::Region;
use genie_sys::clock::SpinDeadline;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use sync::{AtomicU8, AtomicUsize, Condvar, Mutex};

/// How long a blocking wait polls before it parks the thread (under loom: not at all, so that
/// the model explores the parked path instead of a clock-bounded spin).
const SPIN_BEFORE_PARK: Duration = if cfg!(loom) {
    Duration::ZERO
} else {
    Duration::from_micros(20)
};

/// The primitives the model above is written with: `parking_lot` and std's atomics, or loom's
/// under `cfg(loom)` so that the loom tests at the end of this file check every interleaving of
/// this very code. Run them with
/// `RUSTFLAGS="--cfg loom" cargo test -p genie-transport --release --lib completion`.
mod sync {
    #[cfg(not(loom))]
    pub(super) use parking_lot::{Condvar, Mutex};
    #[cfg(not(loom))]
    pub(super) use std::sync::atomic::{AtomicU8, AtomicUsize};

    #[cfg(loom)]
    pub(super) use loom::sync::atomic::{AtomicU8, AtomicUsize};
    #[cfg(loom)]
    pub(super) use shim::{Condvar, Mutex};

    /// loom's `Mutex` and `Condvar` behind the `parking_lot` API this module uses. loom has no
    /// timed wait: a wait returns only when notified, so a lost wake-up is a deadlock that loom
    /// reports.
    #[cfg(loom)]
    mod shim {
        use std::ops::{Deref, DerefMut};
        use std::sync::PoisonError;
        use std::time::Instant;

        pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

        /// Holds loom's guard; `None` only inside [`Condvar::wait_until`].
        pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

        impl<T> Mutex<T> {
            pub(crate) fn new(v: T) -> Self {
                Self(loom::sync::Mutex::new(v))
            }
            pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
                MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
            }
            pub(crate) fn get_mut(&mut self) -> &mut T {
                self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
            }
        }

        impl<T> Deref for MutexGuard<'_, T> {
            type Target = T;
            fn deref(&self) -> &T {
                self.0.as_deref().expect("guard held outside a wait")
            }
        }

        impl<T> DerefMut for MutexGuard<'_, T> {
            fn deref_mut(&mut self) -> &mut T {
                self.0.as_deref_mut().expect("guard held outside a wait")
            }
        }

        pub(crate) struct Condvar(loom::sync::Condvar);

        /// Never timed out: loom does not model time.
        pub(crate) struct WaitResult;

        impl WaitResult {
            pub(crate) fn timed_out(&self) -> bool {
                false
            }
        }

        impl Condvar {
            pub(crate) fn new() -> Self {
                Self(loom::sync::Condvar::new())
            }
            pub(crate) fn notify_all(&self) {
                self.0.notify_all();
            }
            pub(crate) fn wait_until<T>(
                &self,
                g: &mut MutexGuard<'_, T>,
                _deadline: Instant,
            ) -> WaitResult {
                if let Some(inner) = g.0.take() {
                    g.0 = Some(self.0.wait(inner).unwrap_or_else(PoisonError::into_inner));
                }
                WaitResult
            }
        }
    }
}

/// A backend's progress hook: drives completions (never blocks; may do nothing when another
/// thread is already driving). See [`Op::with_progress`].
pub type DriveHook = Arc<dyn Fn() + Send + Sync>;

const PENDING: u8 = 0;
const OK: u8 = 1;
const FAILED: u8 = 2;

struct OpState {
    state: AtomicU8,
    error: OnceLock<TransportError>,
    /// The regions kept alive until completion, under the lock that sleeping waiters hold when
    /// they check `state` (one lock for both: completing takes it once).
    lock: Mutex<HeldRegions>,
    cv: Condvar,
    batch: Option<Arc<BatchState>>,
    /// A part of a joint operation (see [`joint`]): told when this part completes.
    joint: Option<Arc<JointState>>,
    mode: PollMode,
    progress: Option<DriveHook>,
}

/// The shared side of a joint operation's parts (see [`joint`]).
struct JointState {
    /// Parts not yet complete.
    left: AtomicUsize,
    /// The first part's error.
    error: OnceLock<TransportError>,
    /// The operation the parts make up; completed by the last part.
    whole: Mutex<Option<Completer>>,
}

impl JointState {
    fn part_done(&self, err: Option<&TransportError>) {
        if let Some(e) = err {
            let _ = self.error.set(e.clone());
        }
        // AcqRel: the part that takes the count to zero sees every other part's error (each set
        // its error before its decrement).
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(c) = self.whole.lock().take() {
                c.complete(self.error.get().cloned().map_or(Ok(()), Err));
            }
        }
    }
}

/// Splits the operation of `whole` into `parts` completers (a transfer striped over several
/// queue pairs or streams): `whole` completes once every part has, with the first part's error
/// if any failed. Dropping a part without completing it fails it (so `whole` never hangs).
/// With `parts == 0`, `whole` completes at once.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn joint(whole: Completer, parts: usize, mode: PollMode) -> Vec<Completer> {
    if parts == 0 {
        whole.complete(Ok(()));
        return Vec::new();
    }
    let state = Arc::new(JointState {
        left: AtomicUsize::new(parts),
        error: OnceLock::new(),
        whole: Mutex::new(Some(whole)),
    });
    (0..parts)
        .map(|_| {
            let st = Arc::new(OpState {
                state: AtomicU8::new(PENDING),
                error: OnceLock::new(),
                lock: Mutex::new(HeldRegions::None),
                cv: Condvar::new(),
                batch: None,
                joint: Some(Arc::clone(&state)),
                mode,
                progress: None,
            });
            Completer {
                state: Some(st),
                done: false,
            }
        })
        .collect()
}

/// The regions an operation keeps alive: one region needs no allocation (the common case: a
/// transfer's local region). Held only to be dropped when the operation completes.
#[allow(dead_code)]
enum HeldRegions {
    None,
    One(Region),
    Many(Vec<Region>),
}

impl From<Vec<Region>> for HeldRegions {
    fn from(mut v: Vec<Region>) -> Self {
        match v.len() {
            0 => HeldRegions::None,
            1 => v.pop().map_or(HeldRegions::None, HeldRegions::One),
            _ => HeldRegions::Many(v),
        }
    }
}

/// Handle to one in-flight operation. Clone it to wait from several places.
#[derive(Clone)]
#[must_use = "an operation's errors are only seen by polling or waiting on it"]
pub struct Op {
    /// `None`: the operation succeeded before its submission returned (see [`Op::done`]).
    state: Option<Arc<OpState>>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op").field("result", &self.peek()).finish()
    }
}

/// The backend's side of an [`Op`]: completes it exactly once. Dropping it without completing
/// fails the operation with [`TransportError::EndpointClosed`], so no waiter can hang.
pub struct Completer {
    /// `None` only once [`Completer::complete_into`] has handed the state back to its pool.
    state: Option<Arc<OpState>>,
    done: bool,
}

/// Most operation states an [`OpPool`] keeps for reuse.
const POOL_MAX: usize = 64;

/// Recycles the states of one connection's completed operations: taking one back costs a lock and
/// a uniqueness check where allocating and freeing a state cost about 400 instructions per
/// operation (callgrind, an 8-byte RDMA read: `malloc`, `free` and the fields' drops). On
/// soft-RoCE's emulated CPU the pool took 1 us off an 8-byte write's 23 us one-way latency and
/// 2.4 us off a 73 us read.
///
/// A state is reused only when nothing else holds it: the user's [`Op`] handles (and clones) of
/// the operation that last used it are all dropped. Only successful operations outside batches are
/// recycled, so a reused state has no error and no batch.
pub(crate) struct OpPool {
    free: Mutex<Vec<Arc<OpState>>>,
    mode: PollMode,
    progress: Option<DriveHook>,
}

impl OpPool {
    /// An empty pool for operations of `mode` with the progress hook `progress` (those of the
    /// connection that owns the pool; every operation it makes or takes back shares them).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn new(mode: PollMode, progress: Option<DriveHook>) -> Self {
        OpPool {
            free: Mutex::new(Vec::new()),
            mode,
            progress,
        }
    }

    /// A new pending operation keeping `keep` alive (if any), on a recycled state when one is
    /// free.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn op(&self, keep: Option<Region>) -> (Op, Completer) {
        let keep = keep.map_or(HeldRegions::None, HeldRegions::One);
        let reused = self.free.lock().pop();
        if let Some(mut state) = reused {
            if let Some(st) = Arc::get_mut(&mut state) {
                debug_assert!(st.error.get().is_none() && st.batch.is_none());
                // Unshared (`get_mut` succeeded): a fresh atomic needs no ordering.
                st.state = AtomicU8::new(PENDING);
                *st.lock.get_mut() = keep;
                return (
                    Op {
                        state: Some(state.clone()),
                    },
                    Completer {
                        state: Some(state),
                        done: false,
                    },
                );
            }
            // A handle of its last operation is still held: that handle keeps it.
        }
        Op::with_batch(self.mode, keep, None, self.progress.clone())
    }

    fn give_back(&self, state: Arc<OpState>) {
        let mut free = self.free.lock();
        if free.len() < POOL_MAX {
            free.push(state);
        }
    }
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer").finish_non_exhaustive()
    }
}

impl Op {
    /// A new pending operation and its completer. `keep` are the regions it uses, held until it
    /// completes.
    pub fn new(mode: PollMode, keep: Vec<Region>) -> (Op, Completer) {
        Self::with_batch(mode, keep.into(), None, None)
    }

    /// Like [`Op::new`], with a hook that [`Op::poll`] and [`Op::wait_spin`] run while the
    /// operation is pending (the backend's busy-poll progress: the waiter drives completions).
    pub fn with_progress(
        mode: PollMode,
        keep: Vec<Region>,
        progress: Option<DriveHook>,
    ) -> (Op, Completer) {
        Self::with_batch(mode, keep.into(), None, progress)
    }

    fn with_batch(
        mode: PollMode,
        keep: HeldRegions,
        batch: Option<Arc<BatchState>>,
        progress: Option<DriveHook>,
    ) -> (Op, Completer) {
        let state = Arc::new(OpState {
            state: AtomicU8::new(PENDING),
            error: OnceLock::new(),
            lock: Mutex::new(keep),
            cv: Condvar::new(),
            batch,
            joint: None,
            mode,
            progress,
        });
        (
            Op {
                state: Some(state.clone()),
            },
            Completer {
                state: Some(state),
                done: false,
            },
        )
    }

    /// An operation that already succeeded: a backend that saw its completion before the
    /// submission returned needs no state for it (no allocation, no lock, nothing to wake).
    pub fn done() -> Op {
        Op { state: None }
    }

    /// An operation that already failed (e.g. rejected at submission).
    pub fn failed(mode: PollMode, err: TransportError) -> Op {
        let (op, c) = Self::new(mode, Vec::new());
        c.complete(Err(err));
        op
    }

    /// `None` while pending; the result once complete. Never blocks (runs the backend's progress
    /// hook, if any, while pending).
    pub fn poll(&self) -> Option<Result<()>> {
        let Some(s) = &self.state else {
            return Some(Ok(()));
        };
        if let Some(p) = &s.progress {
            if s.state.load(Ordering::Acquire) == PENDING {
                p();
            }
        }
        self.peek()
    }

    /// The result without running the progress hook.
    fn peek(&self) -> Option<Result<()>> {
        let Some(s) = &self.state else {
            return Some(Ok(()));
        };
        match s.state.load(Ordering::Acquire) {
            PENDING => None,
            OK => Some(Ok(())),
            _ => Some(Err(s.error.get().cloned().unwrap_or(
                TransportError::InvalidArgument("operation failed without an error".into()),
            ))),
        }
    }

    /// Whether the operation has completed (successfully or not).
    pub fn is_done(&self) -> bool {
        match &self.state {
            None => true,
            Some(s) => s.state.load(Ordering::Acquire) != PENDING,
        }
    }

    /// Waits up to `timeout`, spinning or sleeping per the endpoint's [`PollMode`].
    /// Returns [`TransportError::Timeout`] if still pending.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        match self.state.as_ref().map(|s| s.mode) {
            None => Ok(()),
            Some(PollMode::BusyPoll) => self.wait_spin(timeout),
            Some(PollMode::Blocking) => self.wait_blocking(timeout),
        }
    }

    /// Waits up to `timeout` by spinning on the state (no sleep, lowest latency), running the
    /// backend's progress hook on each round if it has one.
    pub fn wait_spin(&self, timeout: Duration) -> Result<()> {
        // Most waits find the operation done (backends reap completions right after posting):
        // they never read the clock.
        let mut deadline = SpinDeadline::new(timeout);
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            if deadline.passed() {
                return self
                    .poll()
                    .unwrap_or(Err(TransportError::Timeout { after: timeout }));
            }
            std::hint::spin_loop();
        }
    }

    /// Waits up to `timeout` sleeping on a condition variable (after a few microseconds of
    /// polling with `yield_now`, which saves the wake-up when the answer is already on its way).
    pub fn wait_blocking(&self, timeout: Duration) -> Result<()> {
        if let Some(r) = self.poll() {
            return r; // done already: no clock read (see `wait_spin`)
        }
        let start = Instant::now();
        let spin = SPIN_BEFORE_PARK.min(timeout);
        loop {
            if let Some(r) = self.poll() {
                return r;
            }
            if start.elapsed() >= spin {
                break;
            }
            std::thread::yield_now();
        }
        let deadline = start + timeout;
        if let Some(s) = &self.state {
            let mut g = s.lock.lock();
            while s.state.load(Ordering::Acquire) == PENDING {
                if s.cv.wait_until(&mut g, deadline).timed_out() {
                    break;
                }
            }
        }
        self.poll()
            .unwrap_or(Err(TransportError::Timeout { after: timeout }))
    }
}

impl Completer {
    /// Completes the operation. Releases the regions it kept, then wakes waiters.
    pub fn complete(mut self, result: Result<()>) {
        self.done = true;
        self.finish(result);
    }

    /// [`Completer::complete`], then hands the operation's state to `pool` for reuse when the
    /// operation succeeded outside a batch. `pool` must be the one of the connection that made
    /// the operation (same poll mode and progress hook).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn complete_into(mut self, result: Result<()>, pool: &OpPool) {
        let ok = result.is_ok();
        self.done = true;
        self.finish(result);
        if let Some(state) = self.state.take() {
            if ok && state.batch.is_none() && state.joint.is_none() {
                debug_assert_eq!(state.mode, pool.mode);
                pool.give_back(state);
            }
        }
    }

    fn finish(&self, result: Result<()>) {
        let Some(s) = &self.state else {
            return;
        };
        let failed = result.is_err();
        if let Some(j) = &s.joint {
            j.part_done(result.as_ref().err());
        }
        if let Err(e) = result {
            let _ = s.error.set(e);
        }
        {
            let mut kept = s.lock.lock();
            // Released before the state says complete: a waiter that sees it may reuse them.
            *kept = HeldRegions::None;
            s.state
                .store(if failed { FAILED } else { OK }, Ordering::Release);
            s.cv.notify_all();
        }
        if let Some(b) = &s.batch {
            b.one_done(failed);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Err(TransportError::EndpointClosed));
        }
    }
}

struct BatchState {
    total: usize,
    done: AtomicUsize,
    failed: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl BatchState {
    fn one_done(&self, failed: bool) {
        if failed {
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
        let _g = self.lock.lock();
        self.done.fetch_add(1, Ordering::AcqRel);
        self.cv.notify_all();
    }
}

/// Counts of a batch's transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStatus {
    /// Not yet complete.
    pub pending: usize,
    /// Completed successfully.
    pub ok: usize,
    /// Completed with an error.
    pub failed: usize,
}

impl BatchStatus {
    /// Whether every transfer has completed.
    pub fn is_done(&self) -> bool {
        self.pending == 0
    }
}

/// Handle to many transfers submitted together; per-transfer results stay visible.
#[must_use = "a batch's errors are only seen by polling or waiting on it"]
pub struct Batch {
    state: Arc<BatchState>,
    ops: Vec<Op>,
    mode: PollMode,
    progress: Option<DriveHook>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("status", &self.status())
            .finish()
    }
}

/// Builds a [`Batch`]: a backend makes one op per transfer with [`BatchBuilder::op`].
pub struct BatchBuilder {
    state: Arc<BatchState>,
    ops: Vec<Op>,
    mode: PollMode,
    progress: Option<DriveHook>,
}

impl std::fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl BatchBuilder {
    /// A builder for a batch of exactly `total` transfers.
    pub fn new(mode: PollMode, total: usize) -> Self {
        let state = Arc::new(BatchState {
            total,
            done: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        Self {
            state,
            ops: Vec::with_capacity(total),
            mode,
            progress: None,
        }
    }

    /// Attaches the backend's progress hook to every op and to [`Batch::wait`] (see
    /// [`Op::with_progress`]).
    pub fn with_progress(mut self, progress: Option<DriveHook>) -> Self {
        self.progress = progress;
        self
    }

    /// A new pending operation belonging to the batch (the next transfer, in order).
    pub fn op(&mut self, keep: Vec<Region>) -> Completer {
        self.op_kept(keep.into())
    }

    /// [`BatchBuilder::op`] keeping one region (no allocation for the list).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn op_keeping(&mut self, keep: Region) -> Completer {
        self.op_kept(HeldRegions::One(keep))
    }

    fn op_kept(&mut self, keep: HeldRegions) -> Completer {
        let (op, c) = Op::with_batch(
            self.mode,
            keep,
            Some(self.state.clone()),
            self.progress.clone(),
        );
        self.ops.push(op);
        c
    }

    /// Adds a transfer that already failed at submission.
    pub fn failed(&mut self, err: TransportError) {
        self.op(Vec::new()).complete(Err(err));
    }

    /// Finishes the batch. Every transfer must have had its op created.
    pub fn build(self) -> Batch {
        debug_assert_eq!(self.ops.len(), self.state.total);
        Batch {
            state: self.state,
            ops: self.ops,
            mode: self.mode,
            progress: self.progress,
        }
    }
}

impl Batch {
    /// Number of transfers.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Current counts. Never blocks.
    pub fn status(&self) -> BatchStatus {
        let done = self.state.done.load(Ordering::Acquire);
        let failed = self.state.failed.load(Ordering::Acquire).min(done);
        BatchStatus {
            pending: self.state.total - done,
            ok: done - failed,
            failed,
        }
    }

    /// Waits until every transfer completed or `timeout` passed; returns the counts either way
    /// ([`TransportError::Timeout`] if some are still pending). Spins in [`PollMode::BusyPoll`].
    pub fn wait(&self, timeout: Duration) -> Result<BatchStatus> {
        if self.mode == PollMode::BusyPoll {
            let mut deadline = SpinDeadline::new(timeout);
            while self.state.done.load(Ordering::Acquire) < self.state.total && !deadline.passed() {
                match &self.progress {
                    Some(p) => p(),
                    None => std::hint::spin_loop(),
                }
            }
        } else {
            let deadline = Instant::now() + timeout;
            let mut g = self.state.lock.lock();
            while self.state.done.load(Ordering::Acquire) < self.state.total {
                if self.state.cv.wait_until(&mut g, deadline).timed_out() {
                    break;
                }
            }
        }
        let s = self.status();
        if s.is_done() {
            Ok(s)
        } else {
            Err(TransportError::Timeout { after: timeout })
        }
    }

    /// Per-transfer results, in submission order (`None` = still pending).
    pub fn results(&self) -> Vec<Option<Result<()>>> {
        self.ops.iter().map(Op::poll).collect()
    }

    /// The per-transfer operations, in submission order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn joint_completes_after_its_last_part_with_the_first_error() {
        let (op, whole) = Op::new(PollMode::Blocking, Vec::new());
        let mut parts = joint(whole, 3, PollMode::Blocking);
        parts.pop().unwrap().complete(Ok(()));
        assert!(op.poll().is_none());
        parts.pop().unwrap().complete(Err(TransportError::Timeout {
            after: Duration::from_secs(1),
        }));
        assert!(op.poll().is_none(), "one part still pending");
        drop(parts); // the last part dropped: fails, and so completes the whole
        match op.wait(Duration::from_secs(1)) {
            Err(TransportError::Timeout { .. }) => {}
            other => panic!("the first error should win: {other:?}"),
        }

        let (op, whole) = Op::new(PollMode::Blocking, Vec::new());
        for p in joint(whole, 2, PollMode::Blocking) {
            p.complete(Ok(()));
        }
        op.wait(Duration::from_secs(1)).unwrap();
        let (op, whole) = Op::new(PollMode::Blocking, Vec::new());
        assert!(joint(whole, 0, PollMode::Blocking).is_empty());
        op.wait(Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn op_completes_once_and_wakes_waiters() {
        let (op, c) = Op::new(PollMode::Blocking, Vec::new());
        assert!(op.poll().is_none());
        assert!(matches!(
            op.wait(Duration::from_millis(1)),
            Err(TransportError::Timeout { .. })
        ));
        let op2 = op.clone();
        let t = std::thread::spawn(move || op2.wait(Duration::from_secs(10)));
        c.complete(Ok(()));
        assert!(t.join().unwrap().is_ok());
        assert!(op.wait_spin(Duration::ZERO).is_ok());
    }

    #[test]
    fn spinning_waiter_runs_the_progress_hook() {
        // The hook completes the op on its third run, as a backend polling its CQ would.
        let completer = Arc::new(Mutex::new(None::<Completer>));
        let runs = Arc::new(AtomicUsize::new(0));
        let (c2, r2) = (Arc::clone(&completer), Arc::clone(&runs));
        let hook: DriveHook = Arc::new(move || {
            if r2.fetch_add(1, Ordering::AcqRel) + 1 == 3 {
                if let Some(c) = c2.lock().take() {
                    c.complete(Ok(()));
                }
            }
        });
        let (op, c) = Op::with_progress(PollMode::BusyPoll, Vec::new(), Some(hook));
        *completer.lock() = Some(c);
        assert!(op.poll().is_none());
        assert!(op.wait(Duration::from_secs(10)).is_ok());
        assert_eq!(runs.load(Ordering::Acquire), 3);
        // Complete: polling no longer runs the hook.
        assert!(matches!(op.poll(), Some(Ok(()))));
        assert_eq!(runs.load(Ordering::Acquire), 3);
    }

    #[test]
    fn pool_reuses_a_state_only_once_no_handle_holds_it() {
        let pool = OpPool::new(PollMode::BusyPoll, None);
        let ptr = |op: &Op| op.state.as_ref().map(Arc::as_ptr);
        // Completed and its handle dropped: the next operation gets the same state, pending.
        let (op, c) = pool.op(None);
        let first = ptr(&op);
        c.complete_into(Ok(()), &pool);
        assert!(matches!(op.poll(), Some(Ok(()))));
        drop(op);
        let (op2, c2) = pool.op(None);
        assert_eq!(ptr(&op2), first);
        assert!(op2.poll().is_none(), "a reused state starts pending");
        // A handle of the finished operation still held: not reused, and it keeps its result.
        c2.complete_into(Ok(()), &pool);
        let (op3, c3) = pool.op(None);
        assert_ne!(ptr(&op3), first);
        assert!(matches!(op2.poll(), Some(Ok(()))));
        // A failed operation is never handed back (its error stays with its handles).
        c3.complete_into(Err(TransportError::BadKey { region: 7 }), &pool);
        drop(op2);
        let (op4, _c4) = pool.op(None);
        assert_ne!(ptr(&op4), ptr(&op3));
        assert!(matches!(
            op3.poll(),
            Some(Err(TransportError::BadKey { region: 7 }))
        ));
    }

    #[test]
    fn done_op_is_complete_in_every_way_of_waiting() {
        let op = Op::done();
        assert!(op.is_done());
        assert!(matches!(op.poll(), Some(Ok(()))));
        op.wait(Duration::ZERO).unwrap();
        op.wait_spin(Duration::ZERO).unwrap();
        op.wait_blocking(Duration::ZERO).unwrap();
        op.clone().wait(Duration::ZERO).unwrap();
        assert!(format!("{op:?}").contains("Ok"));
    }

    #[test]
    fn batch_counts_mixed_results() {
        let mut b = BatchBuilder::new(PollMode::Blocking, 3);
        let c1 = b.op(Vec::new());
        b.failed(TransportError::BadKey { region: 1 });
        let c3 = b.op(Vec::new());
        let batch = b.build();
        assert_eq!(
            batch.status(),
            BatchStatus {
                pending: 2,
                ok: 0,
                failed: 1
            }
        );
        c1.complete(Ok(()));
        let t = std::thread::spawn(move || {
            c3.complete(Err(TransportError::UnknownRegion { region: 2 }))
        });
        let s = batch.wait(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(
            s,
            BatchStatus {
                pending: 0,
                ok: 1,
                failed: 2
            }
        );
        let r = batch.results();
        assert!(matches!(r[0], Some(Ok(()))));
        assert!(matches!(
            r[1],
            Some(Err(TransportError::BadKey { region: 1 }))
        ));
        assert!(matches!(
            r[2],
            Some(Err(TransportError::UnknownRegion { region: 2 }))
        ));
    }
}

/// The model above under loom (see [`sync`]): every interleaving of a completer and a waiter.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    const LONG: Duration = Duration::from_secs(3600);

    /// A sleeping waiter is always woken by a completion on another thread (no lost wake-up: a
    /// lost one deadlocks, which loom reports) and sees its result.
    #[test]
    fn completion_wakes_a_blocking_waiter() {
        loom::model(|| {
            let (op, c) = Op::new(PollMode::Blocking, Vec::new());
            let t = thread::spawn(move || c.complete(Ok(())));
            assert!(op.wait_blocking(LONG).is_ok());
            t.join().unwrap();
        });
    }

    /// The error stored before the state is published is the one every waiter sees.
    #[test]
    fn failure_is_seen_with_its_error() {
        loom::model(|| {
            let (op, c) = Op::new(PollMode::Blocking, Vec::new());
            let t = thread::spawn(move || c.complete(Err(TransportError::Timeout { after: LONG })));
            assert!(matches!(
                op.wait_blocking(LONG),
                Err(TransportError::Timeout { after }) if after == LONG
            ));
            t.join().unwrap();
        });
    }

    /// A completer dropped without completing (its connection died) fails the waiter instead of
    /// leaving it parked, while another handle races to poll.
    #[test]
    fn dropped_completer_fails_waiters() {
        loom::model(|| {
            let (op, c) = Op::new(PollMode::Blocking, Vec::new());
            let other = op.clone();
            let t = thread::spawn(move || drop(c));
            let p = thread::spawn(move || {
                // Pending or already failed, never anything else.
                assert!(!matches!(other.peek(), Some(Ok(()))));
            });
            assert!(matches!(
                op.wait_blocking(LONG),
                Err(TransportError::EndpointClosed)
            ));
            t.join().unwrap();
            p.join().unwrap();
        });
    }

    /// A batch's waiter wakes once both of its operations, completed on two threads, are done,
    /// and counts the failure.
    #[test]
    fn batch_waits_for_every_operation() {
        loom::model(|| {
            let mut b = BatchBuilder::new(PollMode::Blocking, 2);
            let (c1, c2) = (b.op(Vec::new()), b.op(Vec::new()));
            let batch = b.build();
            let t1 = thread::spawn(move || c1.complete(Ok(())));
            let t2 = thread::spawn(move || drop(c2));
            assert_eq!(
                batch.wait(LONG).unwrap(),
                BatchStatus {
                    pending: 0,
                    ok: 1,
                    failed: 1
                }
            );
            t1.join().unwrap();
            t2.join().unwrap();
        });
    }
}
