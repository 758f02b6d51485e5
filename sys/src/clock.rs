//! A cheap timestamp for latency benchmarks: the CPU's time-stamp counter, which is what
//! perftest's `get_cycles()` reads, with a calibration against the OS clock to turn counts into
//! time.
//!
//! [`std::time::Instant::now`] goes through the vDSO: about 25 instructions and a few calls on
//! real hardware, but 0.14 us in a tight loop and about 0.5 us right after a syscall on
//! soft-RoCE's emulated CPU, where a per-operation timestamp then shows in the latency it
//! measures. One `RDTSC` costs a small part of that.

use std::time::{Duration, Instant};

/// The time-stamp counter now (x86_64: `RDTSC`, not serialising, like perftest's). On other
/// targets, nanoseconds since the first call in this process (so [`Calibration`] still works).
#[inline]
pub fn cycles() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter: it has no memory effects and exists on every x86_64 CPU
        // (the intrinsic is `unsafe` only because some instructions need a CPU feature check).
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Converts [`cycles`] counts to time, calibrated over the span from [`Calibration::start`] to
/// [`Calibration::finish`] (the longer the span, the better: a measurement's whole run).
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    at: Instant,
    c0: u64,
}

impl Calibration {
    /// Starts a calibration span.
    pub fn start() -> Self {
        Calibration {
            at: Instant::now(),
            c0: cycles(),
        }
    }

    /// Ends the span: counts per microsecond over it. A span shorter than 1 ms is first
    /// stretched to 1 ms (by sleeping), so that both clocks' resolution is small against it.
    /// `None` only if the counter did not advance.
    pub fn finish(&self) -> Option<CyclesPerUs> {
        const MIN: Duration = Duration::from_millis(1);
        if let Some(rest) = MIN.checked_sub(self.at.elapsed()) {
            std::thread::sleep(rest);
        }
        let c1 = cycles();
        let us = self.at.elapsed().as_secs_f64() * 1e6;
        let n = c1.checked_sub(self.c0)? as f64;
        (n > 0.0).then_some(CyclesPerUs(n / us))
    }
}

/// A counter rate: [`cycles`] counts per microsecond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CyclesPerUs(pub f64);

impl CyclesPerUs {
    /// Microseconds from counter value `from` to `to` (0 if `to` is earlier).
    pub fn us(&self, from: u64, to: u64) -> f64 {
        to.saturating_sub(from) as f64 / self.0
    }
}

/// The deadline of a spin loop, read from the clock only once per period of checks (64 by
/// default) and first at the end of the first period, so that a loop whose first rounds succeed
/// never reads the clock. On soft-RoCE's emulated CPU a clock read costs 0.14 us in a tight loop
/// and about 0.5 us right after a syscall: more than a round of progress, and it showed in every
/// operation's latency.
#[derive(Debug, Clone)]
pub struct SpinDeadline {
    timeout: Duration,
    start: Option<Instant>,
    checks: u32,
    every: u32,
}

impl SpinDeadline {
    /// Checks per clock read of [`SpinDeadline::new`].
    pub const EVERY: u32 = 64;

    /// A deadline `timeout` after (about) the first clock read, checked every
    /// [`SpinDeadline::EVERY`] rounds.
    pub fn new(timeout: Duration) -> Self {
        Self::every(timeout, Self::EVERY)
    }

    /// Like [`SpinDeadline::new`], reading the clock once per `every` rounds (at least 1).
    pub fn every(timeout: Duration, every: u32) -> Self {
        SpinDeadline {
            timeout,
            start: None,
            checks: 0,
            every: every.max(1),
        }
    }

    /// Whether the deadline has passed; call once per round of the loop.
    pub fn passed(&mut self) -> bool {
        self.checks = self.checks.wrapping_add(1);
        if self.checks % self.every != 0 {
            return false;
        }
        match self.start {
            None => {
                self.start = Some(Instant::now());
                self.timeout.is_zero()
            }
            Some(s) => s.elapsed() >= self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_cycles_measure_a_sleep() {
        let cal = Calibration::start();
        let a = cycles();
        std::thread::sleep(Duration::from_millis(20));
        let b = cycles();
        assert!(b > a, "the counter advances");
        let rate = cal.finish().expect("20 ms is long enough to calibrate");
        let us = rate.us(a, b);
        // A sleep lasts at least what was asked; a loaded machine may stretch it, not shrink it.
        assert!((19_000.0..2_000_000.0).contains(&us), "{us} us");
        assert_eq!(rate.us(b, a), 0.0);
        // A span too short to calibrate is stretched, not refused.
        let r = Calibration::start().finish().expect("stretched to 1 ms");
        assert!(r.0 > 0.0);
    }

    #[test]
    fn spin_deadline_reads_the_clock_every_64_checks() {
        // A zero timeout passes at the first clock read, not before.
        let mut d = SpinDeadline::new(Duration::ZERO);
        assert!((1..SpinDeadline::EVERY).all(|_| !d.passed()));
        assert!(d.passed());
        // A long one does not pass within a few reads.
        let mut d = SpinDeadline::new(Duration::from_secs(60));
        assert!((0..10 * SpinDeadline::EVERY).all(|_| !d.passed()));
        // A short one passes once its time is up, counted from the first read.
        let mut d = SpinDeadline::new(Duration::from_millis(5));
        let start = Instant::now();
        let mut checks = 0u64;
        while !d.passed() {
            checks += 1;
            assert!(start.elapsed() < Duration::from_secs(10), "never passed");
        }
        assert!(start.elapsed() >= Duration::from_millis(5));
        assert!(checks >= SpinDeadline::EVERY as u64);
    }
}
