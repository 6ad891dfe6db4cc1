//! Prometheus metrics of `pd-router`, served on `--metrics-port`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::sync::Arc;

use super::breaker::Phase;
use super::endpoint::{EndpointObs, Role};
use super::kv_index::EndpointStats;
use super::probe::ProbeObs;
use std::time::Duration;

/// Where a request's prefill was sent.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Decision {
    /// No `x-prefiller-host-port`: the decode pod prefills.
    local,
    /// Forwarded with `x-prefiller-host-port`.
    remote,
    /// Not an inference route: forwarded by load only.
    passthrough,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: Decision,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PickLabels {
    pub profile: &'static str,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub endpoint: String,
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub endpoint: String,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleOnlyLabels {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct RouterMetrics {
    registry: Registry,
    pub requests: Family<DecisionLabels, Counter>,
    pub picks: Family<PickLabels, Counter>,
    pub pick_duration: Histogram,
    pub inflight: Family<EndpointLabels, Gauge>,
    pub errors: Family<ErrorLabels, Counter>,
    pub retries: Counter,
    pub healthy: Family<RoleLabels, Gauge>,
    pub transitions: Family<TransitionLabels, Counter>,
    pub metrics_age: Family<EndpointLabels, FloatGauge>,
    pub scrape_errors: Family<EndpointLabels, Counter>,
    pub health_check_failures: Family<EndpointLabels, Counter>,
    pub engine_waiting: Family<EndpointLabels, FloatGauge>,
    pub engine_running: Family<EndpointLabels, FloatGauge>,
    pub engine_kv_usage: Family<EndpointLabels, FloatGauge>,
    pub endpoints: Family<RoleOnlyLabels, Gauge>,
    pub dns_lookup_failures: Family<NameLabels, Counter>,
    pub kv: Arc<KvEventMetrics>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvEventLabels {
    pub endpoint: String,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    pub endpoint: String,
    pub result: &'static str,
}

/// The KV-event feed's metrics (`kv_feed`), and its index's, set at render.
#[derive(Default)]
pub struct KvEventMetrics {
    pub events: Family<KvEventLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
    pub gaps: Family<EndpointLabels, Counter>,
    pub replays: Family<ReplayLabels, Counter>,
    pub index_blocks: Family<EndpointLabels, Gauge>,
    pub index_synced: Family<EndpointLabels, Gauge>,
    pub last_event_age: Family<EndpointLabels, FloatGauge>,
}

impl KvEventMetrics {
    fn register(registry: &mut Registry) -> Arc<KvEventMetrics> {
        let m = KvEventMetrics::default();
        registry.register(
            "kv_events",
            "KV events received from the engines, by index endpoint and event type",
            m.events.clone(),
        );
        registry.register(
            "kv_events_dropped",
            "KV event messages, batches or runs not indexed, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "kv_event_gaps",
            "Sequence gaps in an endpoint's KV events",
            m.gaps.clone(),
        );
        registry.register(
            "kv_event_replays",
            "Replays asked of an engine's replay socket, by result",
            m.replays.clone(),
        );
        registry.register(
            "kv_index_blocks",
            "Engine blocks in the KV-event index, per endpoint",
            m.index_blocks.clone(),
        );
        registry.register(
            "kv_index_synced",
            "1 while an endpoint's KV-event index is exact, 0 while it is a lower bound",
            m.index_synced.clone(),
        );
        registry.register(
            "kv_last_event_age_seconds",
            "Seconds since the endpoint's last KV event",
            m.last_event_age.clone(),
        );
        Arc::new(m)
    }

    pub fn event(&self, endpoint: &str, r#type: &'static str) {
        self.events
            .get_or_create(&KvEventLabels {
                endpoint: endpoint.to_string(),
                r#type,
            })
            .inc();
    }

    pub fn dropped(&self, reason: &'static str) {
        self.dropped_n(reason, 1);
    }

    pub fn dropped_n(&self, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }

    pub fn gap(&self, endpoint: &str) {
        RouterMetrics::by_endpoint(&self.gaps, endpoint).inc();
    }

    pub fn replay(&self, endpoint: &str, ok: bool) {
        self.replays
            .get_or_create(&ReplayLabels {
                endpoint: endpoint.to_string(),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// The index's gauges at render time.
    pub fn set_index(&self, stats: &[EndpointStats], now: std::time::Instant) {
        for s in stats {
            RouterMetrics::by_endpoint(&self.index_blocks, &s.endpoint).set(s.blocks as i64);
            RouterMetrics::by_endpoint(&self.index_synced, &s.endpoint).set(i64::from(s.synced));
            if let Some(at) = s.last_event {
                RouterMetrics::by_endpoint(&self.last_event_age, &s.endpoint)
                    .set(now.saturating_duration_since(at).as_secs_f64());
            }
        }
    }
}

impl RouterMetrics {
    pub fn new() -> RouterMetrics {
        let mut registry = Registry::with_prefix("pd_router");
        let requests = Family::<DecisionLabels, Counter>::default();
        let picks = Family::<PickLabels, Counter>::default();
        // 1 us .. ~0.5 s: a pick is normally a few microseconds.
        let pick_duration = Histogram::new(exponential_buckets(1e-6, 2.0, 20));
        let inflight = Family::<EndpointLabels, Gauge>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("requests", "Requests by prefill decision", requests.clone());
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept (EMFILE and the like)",
            crate::server::ACCEPT_ERRORS.clone(),
        );
        registry.register(
            "picks",
            "Endpoints picked, by scheduling profile",
            picks.clone(),
        );
        registry.register(
            "pick_duration_seconds",
            "Time to hash the prompt, score, pick and decide",
            pick_duration.clone(),
        );
        registry.register(
            "inflight",
            "Requests forwarded and not finished, per endpoint",
            inflight.clone(),
        );
        registry.register("errors", "Errors by class", errors.clone());
        let retries = Counter::default();
        registry.register(
            "retries",
            "Requests sent again to another decode endpoint after a connect error",
            retries.clone(),
        );
        let healthy = Family::<RoleLabels, Gauge>::default();
        registry.register(
            "endpoint_healthy",
            "1 while the endpoint's circuit is closed, 0 while open or half-open",
            healthy.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "circuit_transitions",
            "Circuit breaker transitions, by the phase entered",
            transitions.clone(),
        );
        let metrics_age = Family::<EndpointLabels, FloatGauge>::default();
        registry.register(
            "endpoint_metrics_age_seconds",
            "Age of the last successful engine metrics scrape (absent before the first)",
            metrics_age.clone(),
        );
        let scrape_errors = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "scrape_errors",
            "Engine metrics scrapes that failed (connect, timeout, non-200)",
            scrape_errors.clone(),
        );
        let health_check_failures = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "health_check_failures",
            "Active health checks that failed",
            health_check_failures.clone(),
        );
        let engine_waiting = Family::<EndpointLabels, FloatGauge>::default();
        registry.register(
            "endpoint_requests_waiting",
            "vllm:num_requests_waiting at the last scrape (NaN when absent)",
            engine_waiting.clone(),
        );
        let engine_running = Family::<EndpointLabels, FloatGauge>::default();
        registry.register(
            "endpoint_requests_running",
            "vllm:num_requests_running at the last scrape (NaN when absent)",
            engine_running.clone(),
        );
        let engine_kv_usage = Family::<EndpointLabels, FloatGauge>::default();
        registry.register(
            "endpoint_kv_cache_usage",
            "vllm:kv_cache_usage_perc at the last scrape, 0..1 (NaN when absent)",
            engine_kv_usage.clone(),
        );
        let endpoints = Family::<RoleOnlyLabels, Gauge>::default();
        registry.register(
            "endpoints",
            "Endpoints scheduled over, by role (static and discovered by DNS)",
            endpoints.clone(),
        );
        let dns_lookup_failures = Family::<NameLabels, Counter>::default();
        registry.register(
            "dns_lookup_failures",
            "Failed lookups of --decode-dns/--prefill-dns names (the last addresses are kept)",
            dns_lookup_failures.clone(),
        );
        let kv = KvEventMetrics::register(&mut registry);
        RouterMetrics {
            kv,
            registry,
            endpoints,
            dns_lookup_failures,
            requests,
            picks,
            pick_duration,
            inflight,
            errors,
            retries,
            healthy,
            transitions,
            metrics_age,
            scrape_errors,
            health_check_failures,
            engine_waiting,
            engine_running,
            engine_kv_usage,
        }
    }

    fn by_endpoint<M: Clone + Default>(family: &Family<EndpointLabels, M>, endpoint: &str) -> M {
        family
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .clone()
    }

    /// The breaker's metric handles of one endpoint (healthy starts at 1).
    pub fn endpoint_obs(&self, endpoint: &str, role: Role) -> EndpointObs {
        let transition = |to: Phase| {
            self.transitions
                .get_or_create(&TransitionLabels {
                    endpoint: endpoint.to_string(),
                    to: to.as_str(),
                })
                .clone()
        };
        let healthy = self
            .healthy
            .get_or_create(&RoleLabels {
                endpoint: endpoint.to_string(),
                role: role.as_str(),
            })
            .clone();
        healthy.set(1);
        EndpointObs {
            inflight: self.inflight_gauge(endpoint),
            healthy,
            to_open: transition(Phase::Open),
            to_half_open: transition(Phase::HalfOpen),
            to_closed: transition(Phase::Closed),
        }
    }

    /// The probes' metric handles of one endpoint; the engine gauges read NaN
    /// until a scrape sets them.
    pub fn probe_obs(&self, endpoint: &str) -> ProbeObs {
        let obs = ProbeObs {
            scrape_errors: Self::by_endpoint(&self.scrape_errors, endpoint),
            health_check_failures: Self::by_endpoint(&self.health_check_failures, endpoint),
            waiting: Self::by_endpoint(&self.engine_waiting, endpoint),
            running: Self::by_endpoint(&self.engine_running, endpoint),
            kv_usage: Self::by_endpoint(&self.engine_kv_usage, endpoint),
        };
        for g in [&obs.waiting, &obs.running, &obs.kv_usage] {
            g.set(f64::NAN);
        }
        obs
    }

    /// Drops the gauges of an endpoint that left (discovery): they would go on
    /// showing its last values. Its counters stay, as counters of gone targets do.
    pub fn forget(&self, endpoint: &str, role: Role) {
        let labels = EndpointLabels {
            endpoint: endpoint.to_string(),
        };
        self.inflight.remove(&labels);
        for family in [
            &self.metrics_age,
            &self.engine_waiting,
            &self.engine_running,
            &self.engine_kv_usage,
        ] {
            family.remove(&labels);
        }
        self.healthy.remove(&RoleLabels {
            endpoint: endpoint.to_string(),
            role: role.as_str(),
        });
    }

    /// Sets the number of endpoints of `role`.
    pub fn set_endpoints(&self, role: Role, n: usize) {
        self.endpoints
            .get_or_create(&RoleOnlyLabels {
                role: role.as_str(),
            })
            .set(n as i64);
    }

    /// Counts a failed lookup of `name`.
    pub fn dns_lookup_failed(&self, name: &str) {
        self.dns_lookup_failures
            .get_or_create(&NameLabels {
                name: name.to_string(),
            })
            .inc();
    }

    /// Sets the metrics-age gauge of `endpoint` (called at render time).
    pub fn set_metrics_age(&self, endpoint: &str, age: Duration) {
        Self::by_endpoint(&self.metrics_age, endpoint).set(age.as_secs_f64());
    }

    pub fn count(&self, decision: Decision) {
        self.requests
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    pub fn pick(&self, profile: &'static str, endpoint: &str) {
        self.picks
            .get_or_create(&PickLabels {
                profile,
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    pub fn error(&self, class: &'static str) {
        self.errors.get_or_create(&ErrorLabels { class }).inc();
    }

    /// The in-flight gauge of one endpoint (shared with the registry).
    pub fn inflight_gauge(&self, endpoint: &str) -> Gauge {
        self.inflight
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_router_families() {
        let m = RouterMetrics::new();
        m.count(Decision::remote);
        m.pick("decode", "http://d:1");
        m.error("decode_unavailable");
        m.inflight_gauge("http://d:1").inc();
        m.pick_duration.observe(3e-6);
        m.retries.inc();
        let obs = m.endpoint_obs("p:1", Role::Prefill);
        obs.to_open.inc();
        m.probe_obs("p:1").scrape_errors.inc();
        m.probe_obs("p:1").waiting.set(2.0);
        m.set_metrics_age("p:1", Duration::from_millis(250));
        let text = m.render();
        for line in [
            r#"pd_router_requests_total{decision="remote"} 1"#,
            r#"pd_router_picks_total{profile="decode",endpoint="http://d:1"} 1"#,
            r#"pd_router_errors_total{class="decode_unavailable"} 1"#,
            r#"pd_router_inflight{endpoint="http://d:1"} 1"#,
            "pd_router_pick_duration_seconds_count 1",
            "pd_router_retries_total 1",
            r#"pd_router_endpoint_healthy{endpoint="p:1",role="prefill"} 1"#,
            r#"pd_router_circuit_transitions_total{endpoint="p:1",to="open"} 1"#,
            r#"pd_router_circuit_transitions_total{endpoint="p:1",to="closed"} 0"#,
            r#"pd_router_scrape_errors_total{endpoint="p:1"} 1"#,
            r#"pd_router_endpoint_requests_waiting{endpoint="p:1"} 2.0"#,
            r#"pd_router_endpoint_metrics_age_seconds{endpoint="p:1"} 0.25"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
