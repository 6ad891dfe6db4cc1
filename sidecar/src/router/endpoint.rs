//! One decode or prefill endpoint and what the router knows about it:
//! requests in flight, the last engine metrics scraped (with their time), and
//! the circuit breaker fed by health checks and forwarded requests. (The
//! prefix indexes live in the scheduler, one lock for all endpoints of a role.)
//!
//! The pick path reads all of it through short critical sections (an atomic
//! for a closed circuit, a read lock for the metrics snapshot); the probe tasks
//! and the proxy write it. Nothing here does I/O or decides a pick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::breaker::{Admission, Breaker, BreakerConfig, Phase, Transition};
use super::probe::EngineMetrics;

/// Which set an endpoint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Decode,
    Prefill,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Decode => "decode",
            Role::Prefill => "prefill",
        }
    }
}

/// The endpoint's metric handles (registered by `RouterMetrics::endpoint_obs`,
/// or detached ones in unit tests).
#[derive(Clone, Debug, Default)]
pub struct EndpointObs {
    pub inflight: Gauge,
    pub healthy: Gauge,
    pub to_open: Counter,
    pub to_half_open: Counter,
    pub to_closed: Counter,
}

/// What a scorer knows about one candidate endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    /// Requests the router has forwarded there and not yet finished.
    pub inflight: u64,
    /// Leading prompt blocks the endpoint is believed to have cached.
    pub matched_blocks: usize,
    /// `vllm:num_requests_waiting`; None when unknown or stale.
    pub waiting: Option<f64>,
    /// `vllm:kv_cache_usage_perc` (0..1); None when unknown or stale.
    pub kv_usage: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
struct Scraped {
    metrics: EngineMetrics,
    at: Instant,
}

pub struct Endpoint {
    /// Metric label and log name: the decode URL, or the prefill `host:port`.
    pub label: String,
    pub role: Role,
    engine: RwLock<Option<Scraped>>,
    breaker: Mutex<Breaker>,
    /// Mirrors "the breaker is closed" so the pick path takes no lock then.
    closed: AtomicBool,
    obs: EndpointObs,
}

impl Endpoint {
    pub fn new(label: String, role: Role, breaker: BreakerConfig, obs: EndpointObs) -> Endpoint {
        obs.healthy.set(1);
        Endpoint {
            label,
            role,
            engine: RwLock::new(None),
            breaker: Mutex::new(Breaker::new(breaker)),
            closed: AtomicBool::new(true),
            obs,
        }
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn inflight(&self) -> u64 {
        self.obs.inflight.get().max(0) as u64
    }

    /// What the scorers see at `now`, but the prefix match (the scheduler's
    /// prefix index fills it in): engine metrics only when `metrics` (some
    /// scorer reads them), and unknown when older than `staleness`.
    pub fn candidate(&self, now: Instant, staleness: Duration, metrics: bool) -> Candidate {
        let fresh = if metrics {
            self.fresh_metrics(now, staleness).unwrap_or_default()
        } else {
            EngineMetrics::default()
        };
        Candidate {
            inflight: self.inflight(),
            matched_blocks: 0,
            waiting: fresh.waiting,
            kv_usage: fresh.kv_usage,
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> InflightGuard {
        self.obs.inflight.inc();
        InflightGuard {
            endpoint: self.clone(),
        }
    }

    // --- engine metrics -------------------------------------------------

    /// Stores a successful scrape taken at `at`.
    pub fn set_metrics(&self, metrics: EngineMetrics, at: Instant) {
        let mut slot = self.engine.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Scraped { metrics, at });
    }

    /// When the last successful scrape was taken.
    pub fn metrics_at(&self) -> Option<Instant> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .map(|s| s.at)
    }

    /// The last scrape, if it is at most `staleness` old at `now`.
    pub fn fresh_metrics(&self, now: Instant, staleness: Duration) -> Option<EngineMetrics> {
        let scraped = (*self.engine.read().unwrap_or_else(|e| e.into_inner()))?;
        (now.saturating_duration_since(scraped.at) <= staleness).then_some(scraped.metrics)
    }

    // --- circuit breaker ------------------------------------------------

    /// Whether a request may go here now; see [`Breaker::admit`]. Decode
    /// endpoints ask for trials (their requests report outcomes), prefill
    /// endpoints do not (only health checks speak for them).
    pub fn admit(&self, now: Instant, allow_trial: bool) -> Admission {
        if self.closed.load(Ordering::Acquire) {
            return Admission::Yes;
        }
        let (admission, t) = {
            let mut b = self.breaker();
            let r = b.admit(now, allow_trial);
            self.mirror(&b, now);
            r
        };
        self.note(t);
        admission
    }

    /// The circuit is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Not excluded at `now`: closed, or half-open and so able to take a trial.
    pub fn available(&self, now: Instant) -> bool {
        self.is_closed() || self.breaker().phase(now) != Phase::Open
    }

    pub fn phase(&self, now: Instant) -> Phase {
        self.breaker().phase(now)
    }

    /// A health check or a forwarded request's outcome.
    pub fn report(&self, ok: bool, now: Instant) {
        let transitions = {
            let mut b = self.breaker();
            let t = if ok { b.success(now) } else { b.failure(now) };
            self.mirror(&b, now);
            t
        };
        for t in transitions {
            self.note(t);
        }
    }

    /// Gives back a half-open trial that never got an answer.
    pub fn release_trial(&self) {
        self.breaker().release_trial();
    }

    fn mirror(&self, b: &Breaker, now: Instant) {
        self.closed
            .store(b.phase(now) == Phase::Closed, Ordering::Release);
    }

    fn note(&self, t: Transition) {
        let Some(to) = t else { return };
        let role = self.role.as_str();
        match to {
            Phase::Open => {
                self.obs.to_open.inc();
                self.obs.healthy.set(0);
                tracing::warn!(endpoint = %self.label, role, "circuit open: endpoint excluded");
            }
            Phase::HalfOpen => {
                self.obs.to_half_open.inc();
                tracing::info!(endpoint = %self.label, role, "circuit half-open: next probe decides");
            }
            Phase::Closed => {
                self.obs.to_closed.inc();
                self.obs.healthy.set(1);
                tracing::info!(endpoint = %self.label, role, "circuit closed: endpoint back");
            }
        }
    }
}

/// Holds one in-flight count on an endpoint.
pub struct InflightGuard {
    endpoint: Arc<Endpoint>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.endpoint.obs.inflight.dec();
    }
}

/// The pending outcome of a request sent to a decode endpoint: report it once
/// the answer's head (or an error) is known. Dropped unreported (the client
/// went away first), it gives back a half-open trial without judging the
/// endpoint.
pub struct Outcome {
    endpoint: Arc<Endpoint>,
    trial: bool,
    reported: bool,
}

impl Outcome {
    pub fn new(endpoint: Arc<Endpoint>, admission: Admission) -> Outcome {
        Outcome {
            endpoint,
            trial: admission == Admission::Trial,
            reported: false,
        }
    }

    /// `ok`: the endpoint answered with something other than 502/503/504.
    pub fn report(mut self, ok: bool) {
        self.reported = true;
        self.endpoint.report(ok, Instant::now());
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.endpoint.release_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(threshold: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            "http://d:1".into(),
            Role::Decode,
            BreakerConfig {
                threshold,
                open_for: Duration::from_secs(5),
            },
            EndpointObs::default(),
        ))
    }

    #[test]
    fn metrics_go_unknown_when_stale() {
        let e = endpoint(3);
        let t0 = Instant::now();
        let stale = Duration::from_secs(2);
        assert_eq!(e.candidate(t0, stale, true).waiting, None, "never scraped");
        e.set_metrics(
            EngineMetrics {
                waiting: Some(4.0),
                kv_usage: Some(0.25),
                ..EngineMetrics::default()
            },
            t0,
        );
        let c = e.candidate(t0 + stale, stale, true);
        assert_eq!((c.waiting, c.kv_usage), (Some(4.0), Some(0.25)));
        let c = e.candidate(t0 + stale + Duration::from_millis(1), stale, true);
        assert_eq!((c.waiting, c.kv_usage), (None, None));
        assert_eq!(e.metrics_at(), Some(t0), "the last good scrape is kept");
    }

    #[test]
    fn breaker_drives_admission_gauge_and_counters() {
        let e = endpoint(2);
        let t0 = Instant::now();
        assert_eq!(e.obs.healthy.get(), 1);
        e.report(false, t0);
        assert_eq!(e.admit(t0, true), Admission::Yes);
        e.report(false, t0);
        assert_eq!(e.obs.healthy.get(), 0);
        assert_eq!(e.obs.to_open.get(), 1);
        assert_eq!(e.admit(t0, true), Admission::No);
        assert!(!e.available(t0));
        let due = t0 + Duration::from_secs(5);
        assert!(e.available(due));
        // A trial is handed out once; an abandoned one comes back.
        let trial = Outcome::new(e.clone(), e.admit(due, true));
        assert!(trial.trial);
        assert_eq!(e.obs.to_half_open.get(), 1);
        assert_eq!(e.admit(due, true), Admission::No);
        drop(trial);
        assert_eq!(e.admit(due, false), Admission::No, "prefill asks no trial");
        let trial = Outcome::new(e.clone(), e.admit(due, true));
        trial.report(true);
        assert_eq!(e.obs.to_closed.get(), 1);
        assert_eq!(e.obs.healthy.get(), 1);
        assert_eq!(e.admit(due, true), Admission::Yes);
    }
}
