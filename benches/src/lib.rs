//! Genie's benchmark harnesses and the helpers their binaries share: [`perf`], the perftest-style
//! transport measurement behind `genie-perf`, and [`mutex_queue`], the `Mutex<VecDeque>` ready
//! queue that `sched-bench` measures the lock-free dispatcher against.
#![forbid(unsafe_code)]

pub mod mutex_queue;
pub mod perf;

use genie_sys::clock::SpinDeadline;
use std::time::Duration;

/// Spins until `seen()` returns `want`, as perftest's latency loops poll memory for the peer's
/// write; `false` if `wait` passed first. A pure spin, without the `pause` of
/// [`std::hint::spin_loop`] (perftest's loop has none; on soft-RoCE's emulated CPU each `pause`
/// leaves the translated code, 0.26 µs a step, which delays seeing the peer's write). The clock is
/// read once per 1024 steps, never before the first (reading it on every step would slow the loop).
#[inline(always)]
pub fn spin_until(seen: impl Fn() -> u8, want: u8, wait: Duration) -> bool {
    let mut deadline = SpinDeadline::every(wait, 1024);
    while seen() != want {
        if deadline.passed() {
            return false;
        }
    }
    true
}
