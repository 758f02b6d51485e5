//! The clock of a run's timeline.

use std::time::Instant;

/// A monotonic clock anchored to wall-clock time, so that timestamps taken by different
/// workers (threads or processes on one host) are comparable.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    epoch_us: f64,
}

impl WallClock {
    /// Anchors now.
    pub fn now() -> Self {
        let epoch_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        Self {
            at: Instant::now(),
            epoch_us,
        }
    }
}

/// µs since the UNIX epoch, advancing monotonically from the anchor.
pub(super) fn wall_us(c: WallClock) -> f64 {
    c.epoch_us + c.at.elapsed().as_secs_f64() * 1e6
}
