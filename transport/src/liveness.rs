//! A connection's liveness timers, the same for every backend: a heartbeat goes out once nothing
//! was sent for a quarter of the peer timeout, and a peer heard from for a whole peer timeout is
//! dead. No sockets, no clocks, no threads.
//!
//! Contract (as [`crate::tcp::proto`]): time is passed in. The protocol state machine that owns a
//! [`Liveness`] feeds it
//! - inputs: [`Liveness::heard`] (bytes or a frame arrived from the peer), [`Liveness::sent`]
//!   (bytes went out that the peer will count as hearing from us);
//! - and asks it for the outputs: [`Liveness::poll_timeout`] (when to call
//!   [`Liveness::handle_timeout`] next) and [`Liveness::handle_timeout`], whose [`Timer`] says
//!   what is due: nothing, a heartbeat, or the peer's death. The dead-peer bound is checked
//!   before the heartbeat, so a dead peer never gets one more beat.
//!
//! Four beats per timeout so that one or two late beats never kill a live peer.

use std::time::{Duration, Instant};

/// The heartbeat interval for a peer timeout: a quarter of it, and never less than `min`.
pub fn heartbeat_interval(peer_timeout: Duration, min: Duration) -> Duration {
    (peer_timeout / 4).max(min)
}

/// What [`Liveness::handle_timeout`] asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Timer {
    /// Nothing is due.
    Idle,
    /// Send a heartbeat (it already counts as sent: the next one is due an interval from now).
    Heartbeat,
    /// Nothing heard from the peer for this long (at least the peer timeout): it is dead.
    Dead(Duration),
}

/// The liveness state of one connection. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Liveness {
    timeout: Duration,
    beat: Duration,
    last_heard: Instant,
    last_sent: Instant,
}

impl Liveness {
    /// A connection opened at `now`, its peer dead after `peer_timeout` of silence, a heartbeat
    /// due once nothing went out for `heartbeat` (a backend passes
    /// [`heartbeat_interval`]`(peer_timeout, its minimum)`).
    pub fn new(peer_timeout: Duration, heartbeat: Duration, now: Instant) -> Self {
        Self {
            timeout: peer_timeout,
            beat: heartbeat,
            last_heard: now,
            last_sent: now,
        }
    }

    /// The peer is heard from at `now`. Also for a peer that cannot be heard because we stopped
    /// reading it (back-pressure): its silence is then ours, not its.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Bytes went out to the peer at `now`: they count as a heartbeat.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// The silence after which the peer is dead.
    pub fn peer_timeout(&self) -> Duration {
        self.timeout
    }

    /// The time between heartbeats.
    pub fn heartbeat_interval(&self) -> Duration {
        self.beat
    }

    /// When the peer was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// When bytes (or a heartbeat) last went out.
    pub fn last_sent(&self) -> Instant {
        self.last_sent
    }

    /// When [`Liveness::handle_timeout`] must next be called: the earlier of the dead-peer bound
    /// and the next heartbeat.
    pub fn poll_timeout(&self) -> Instant {
        (self.last_heard + self.timeout).min(self.last_sent + self.beat)
    }

    /// The timers at `now`: the dead-peer bound first, then the heartbeat (which counts as sent
    /// once asked for, whether or not the caller could queue one).
    pub fn handle_timeout(&mut self, now: Instant) -> Timer {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.timeout {
            return Timer::Dead(silent);
        }
        if now >= self.last_sent + self.beat {
            self.last_sent = now;
            return Timer::Heartbeat;
        }
        Timer::Idle
    }
}

#[cfg(test)]
mod tests {
    //! Two sides' timers against each other with a fake clock: what one side's `Heartbeat` asks
    //! for is delivered to the other as `heard` (with a delay, when a test wants the wire slow).
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);
    const MIN: Duration = Duration::from_millis(1);

    fn side(now: Instant) -> Liveness {
        Liveness::new(TIMEOUT, heartbeat_interval(TIMEOUT, MIN), now)
    }

    /// Hands `to` the beats on their way to it that arrived by `now`.
    fn deliver(on_the_way: &mut Vec<Instant>, to: &mut Liveness, now: Instant) {
        on_the_way.retain(|&at| {
            if at <= now {
                to.heard(at);
            }
            at > now
        });
    }

    /// Runs both sides' timers until `until`, always to the earliest `poll_timeout` or arrival;
    /// `a` sends nothing from `a_silent_from` on. A beat arrives `delay` after it was asked for.
    /// Returns the first side found dead and when, and how many beats each sent.
    fn run(
        a: &mut Liveness,
        b: &mut Liveness,
        until: Instant,
        a_silent_from: Instant,
        delay: Duration,
    ) -> (Option<(char, Instant)>, u32, u32) {
        let (mut to_a, mut to_b): (Vec<Instant>, Vec<Instant>) = (Vec::new(), Vec::new());
        let (mut beats_a, mut beats_b) = (0, 0);
        loop {
            let next = [a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .chain(to_a.iter().chain(to_b.iter()).copied())
                .min()
                .unwrap();
            if next > until {
                return (None, beats_a, beats_b);
            }
            let now = next;
            deliver(&mut to_a, a, now);
            deliver(&mut to_b, b, now);
            match a.handle_timeout(now) {
                Timer::Dead(_) => return (Some(('a', now)), beats_a, beats_b),
                Timer::Heartbeat if now < a_silent_from => {
                    beats_a += 1;
                    to_b.push(now + delay);
                }
                _ => {}
            }
            match b.handle_timeout(now) {
                Timer::Dead(_) => return (Some(('b', now)), beats_a, beats_b),
                Timer::Heartbeat => {
                    beats_b += 1;
                    to_a.push(now + delay);
                }
                Timer::Idle => {}
            }
        }
    }

    #[test]
    fn an_idle_pair_keeps_itself_alive_with_four_beats_per_timeout() {
        let t0 = Instant::now();
        let (mut a, mut b) = (side(t0), side(t0));
        let until = t0 + TIMEOUT * 10;
        let never = until + TIMEOUT;
        let (dead, beats_a, beats_b) = run(&mut a, &mut b, until, never, Duration::ZERO);
        assert_eq!(dead, None);
        assert_eq!((beats_a, beats_b), (40, 40));
        // Beats that arrive two intervals late still keep it alive.
        let (mut a, mut b) = (side(t0), side(t0));
        let late = heartbeat_interval(TIMEOUT, MIN) * 2;
        assert_eq!(run(&mut a, &mut b, until, never, late).0, None);
    }

    #[test]
    fn a_silent_peer_is_dead_exactly_one_timeout_after_it_was_last_heard() {
        let t0 = Instant::now();
        let (mut a, mut b) = (side(t0), side(t0));
        let silent_from = t0 + TIMEOUT * 3;
        let (dead, ..) = run(
            &mut a,
            &mut b,
            t0 + TIMEOUT * 10,
            silent_from,
            Duration::ZERO,
        );
        let (who, at) = dead.unwrap();
        assert_eq!(who, 'b');
        // `a`'s last beat went out at the last interval boundary before it fell silent.
        let last = b.last_heard();
        assert!(last < silent_from && silent_from - last <= heartbeat_interval(TIMEOUT, MIN));
        assert_eq!(at, last + TIMEOUT);
        assert_eq!(b.handle_timeout(at), Timer::Dead(TIMEOUT));
        assert!(!matches!(
            b.handle_timeout(at - Duration::from_nanos(1)),
            Timer::Dead(_)
        ));
    }

    #[test]
    fn one_beat_per_interval_and_the_dead_peer_bound_first() {
        let t0 = Instant::now();
        let beat = heartbeat_interval(TIMEOUT, MIN);
        assert_eq!(beat, TIMEOUT / 4);
        let mut l = side(t0);
        assert_eq!(l.poll_timeout(), t0 + beat);
        assert_eq!(l.handle_timeout(t0 + beat / 2), Timer::Idle);
        assert_eq!(l.handle_timeout(t0 + beat), Timer::Heartbeat);
        assert_eq!(
            l.handle_timeout(t0 + beat),
            Timer::Idle,
            "one beat per interval"
        );
        assert_eq!(l.last_sent(), t0 + beat);
        // Other traffic counts as a beat.
        l.sent(t0 + beat * 3 / 2);
        assert_eq!(l.handle_timeout(t0 + beat * 2), Timer::Idle);
        assert_eq!(l.poll_timeout(), t0 + beat * 5 / 2);
        // The dead-peer bound comes before a due heartbeat.
        assert_eq!(l.handle_timeout(t0 + TIMEOUT), Timer::Dead(TIMEOUT));
        assert_eq!(l.last_sent(), t0 + beat * 3 / 2);
        // Hearing from the peer moves the bound; a time before the last hearing is no silence.
        l.heard(t0 + TIMEOUT);
        assert_eq!(l.poll_timeout(), t0 + beat * 5 / 2);
        assert_eq!(l.handle_timeout(t0 + TIMEOUT / 2), Timer::Idle);
        assert!(matches!(l.handle_timeout(t0 + TIMEOUT * 2), Timer::Dead(d) if d == TIMEOUT));
    }

    #[test]
    fn the_interval_has_a_floor() {
        let t0 = Instant::now();
        let tiny = Duration::from_micros(100);
        assert_eq!(heartbeat_interval(tiny, MIN), MIN);
        let ten = Duration::from_millis(10);
        let l = Liveness::new(tiny, heartbeat_interval(tiny, ten), t0);
        assert_eq!(l.heartbeat_interval(), ten);
        assert_eq!(l.peer_timeout(), tiny);
        // The dead-peer bound comes first when the timeout is shorter than the interval.
        assert_eq!(l.poll_timeout(), t0 + tiny);
    }
}
