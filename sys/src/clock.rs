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
}
