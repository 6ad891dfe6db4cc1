//! The circuit breaker of one endpoint, as a pure state machine: every method
//! takes the current time, so it is tested with a made-up clock.
//!
//! Closed (eligible) -> after `threshold` consecutive failures, Open (excluded)
//! for `open_for` -> HalfOpen: the next success closes it, a failure opens it
//! again. In HalfOpen one trial request at a time may be let through
//! ([`Breaker::admit`]); health checks need no admission. Failures and
//! successes come from health checks and from forwarded requests alike; the
//! caller decides what counts as which. Nothing here does I/O or keeps metrics:
//! methods return the transition they made, if any.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit (at least 1).
    pub threshold: u32,
    /// How long an open circuit stays open before it half-opens.
    pub open_for: Duration,
}

/// Where the circuit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    /// The `to` label of the transition metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
}

/// Whether a request may go to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: as many as the scheduler likes.
    Yes,
    /// Half-open and this caller holds the one trial: report its outcome, or
    /// give it back with [`Breaker::release_trial`].
    Trial,
    No,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial: bool },
}

#[derive(Clone, Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
}

/// A phase change made by a call.
pub type Transition = Option<Phase>;

impl Breaker {
    /// A closed breaker: endpoints are trusted until they fail.
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg: BreakerConfig {
                threshold: cfg.threshold.max(1),
                ..cfg
            },
            state: State::Closed { failures: 0 },
        }
    }

    /// The phase at `now` (an expired Open reads as HalfOpen; call [`Breaker::tick`]
    /// to make that transition and count it).
    pub fn phase(&self, now: Instant) -> Phase {
        match self.state {
            State::Closed { .. } => Phase::Closed,
            State::Open { until } if now >= until => Phase::HalfOpen,
            State::Open { .. } => Phase::Open,
            State::HalfOpen { .. } => Phase::HalfOpen,
        }
    }

    /// Half-opens an open circuit whose time is up.
    pub fn tick(&mut self, now: Instant) -> Transition {
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { trial: false };
                Some(Phase::HalfOpen)
            }
            _ => None,
        }
    }

    /// Whether a request may be sent now; a half-open circuit lets one trial
    /// through when `allow_trial` (only endpoints whose requests report their
    /// outcome should ask for trials). Returns the transition [`Breaker::tick`] made.
    pub fn admit(&mut self, now: Instant, allow_trial: bool) -> (Admission, Transition) {
        let t = self.tick(now);
        let admission = match &mut self.state {
            State::Closed { .. } => Admission::Yes,
            State::Open { .. } => Admission::No,
            State::HalfOpen { trial } => {
                if allow_trial && !*trial {
                    *trial = true;
                    Admission::Trial
                } else {
                    Admission::No
                }
            }
        };
        (admission, t)
    }

    /// Gives back a trial whose outcome will never be known (the request was
    /// abandoned before an answer).
    pub fn release_trial(&mut self) {
        if let State::HalfOpen { trial } = &mut self.state {
            *trial = false;
        }
    }

    /// A health check passed or a request got a usable answer. Returns the
    /// transitions made: at most half-open (time up) then closed.
    pub fn success(&mut self, now: Instant) -> [Transition; 2] {
        let t = self.tick(now);
        let closed = match &mut self.state {
            State::Closed { failures } => {
                *failures = 0;
                None
            }
            // Still open: the circuit's time is not up, whatever the answer.
            State::Open { .. } => None,
            State::HalfOpen { .. } => {
                self.state = State::Closed { failures: 0 };
                Some(Phase::Closed)
            }
        };
        [t, closed]
    }

    /// A health check failed or a request could not be served. Returns the
    /// transitions made: at most half-open (time up) then open.
    pub fn failure(&mut self, now: Instant) -> [Transition; 2] {
        let t = self.tick(now);
        let opened = match &mut self.state {
            State::Closed { failures } => {
                *failures += 1;
                if *failures >= self.cfg.threshold {
                    self.open(now)
                } else {
                    None
                }
            }
            // Failures while open do not extend it: it half-opens on time and
            // the next probe decides.
            State::Open { .. } => None,
            State::HalfOpen { .. } => self.open(now),
        };
        [t, opened]
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.state = State::Open {
            until: now + self.cfg.open_for,
        };
        Some(Phase::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(5);

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            threshold,
            open_for: OPEN_FOR,
        })
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker(3);
        assert_eq!(b.failure(t0), [None, None]);
        assert_eq!(b.failure(t0), [None, None]);
        // A success in between resets the count.
        assert_eq!(b.success(t0), [None, None]);
        assert_eq!(b.failure(t0), [None, None]);
        assert_eq!(b.failure(t0), [None, None]);
        assert_eq!(b.phase(t0), Phase::Closed);
        assert_eq!(b.admit(t0, true).0, Admission::Yes);
        assert_eq!(b.failure(ms(t0, 1)), [None, Some(Phase::Open)]);
        assert_eq!(b.phase(ms(t0, 1)), Phase::Open);
        assert_eq!(b.admit(ms(t0, 2), true), (Admission::No, None));
    }

    #[test]
    fn stays_open_for_its_duration_whatever_happens() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        assert_eq!(b.failure(t0), [None, Some(Phase::Open)]);
        let almost = t0 + OPEN_FOR - Duration::from_millis(1);
        assert_eq!(
            b.success(almost),
            [None, None],
            "a success does not close it early"
        );
        assert_eq!(
            b.failure(almost),
            [None, None],
            "a failure does not extend it"
        );
        assert_eq!(b.phase(almost), Phase::Open);
        assert_eq!(b.admit(almost, true).0, Admission::No);
        // Time is up: half-open, reported once.
        let due = t0 + OPEN_FOR;
        assert_eq!(b.phase(due), Phase::HalfOpen);
        assert_eq!(b.tick(due), Some(Phase::HalfOpen));
        assert_eq!(b.tick(due), None);
    }

    #[test]
    fn half_open_closes_on_success_and_reopens_on_failure() {
        let t0 = Instant::now();
        let mut b = breaker(2);
        b.failure(t0);
        b.failure(t0);
        let due = t0 + OPEN_FOR;
        // The success that finds the time up both half-opens and closes it.
        assert_eq!(b.success(due), [Some(Phase::HalfOpen), Some(Phase::Closed)]);
        assert_eq!(b.phase(due), Phase::Closed);
        // Closed again from zero: one failure is not enough.
        assert_eq!(b.failure(due), [None, None]);
        assert_eq!(b.failure(due), [None, Some(Phase::Open)]);
        let due2 = due + OPEN_FOR;
        assert_eq!(b.tick(due2), Some(Phase::HalfOpen));
        // One failure in half-open reopens it, for a full period from now.
        let later = due2 + Duration::from_secs(1);
        assert_eq!(b.failure(later), [None, Some(Phase::Open)]);
        assert_eq!(
            b.phase(later + OPEN_FOR - Duration::from_millis(1)),
            Phase::Open
        );
        assert_eq!(b.phase(later + OPEN_FOR), Phase::HalfOpen);
    }

    #[test]
    fn half_open_admits_one_trial_at_a_time() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        b.failure(t0);
        let due = t0 + OPEN_FOR;
        assert_eq!(b.admit(due, false), (Admission::No, Some(Phase::HalfOpen)));
        assert_eq!(b.admit(due, true), (Admission::Trial, None));
        assert_eq!(
            b.admit(due, true),
            (Admission::No, None),
            "one trial at a time"
        );
        b.release_trial();
        assert_eq!(b.admit(due, true), (Admission::Trial, None), "given back");
        assert_eq!(b.success(due), [None, Some(Phase::Closed)]);
        assert_eq!(b.admit(due, true), (Admission::Yes, None));
        // A failed trial reopens it.
        b.failure(due);
        let due2 = due + OPEN_FOR;
        assert_eq!(b.admit(due2, true).0, Admission::Trial);
        assert_eq!(b.failure(due2), [None, Some(Phase::Open)]);
        assert_eq!(b.admit(due2, true).0, Admission::No);
    }

    #[test]
    fn threshold_zero_means_one() {
        let mut b = breaker(0);
        assert_eq!(b.failure(Instant::now())[1], Some(Phase::Open));
    }
}
