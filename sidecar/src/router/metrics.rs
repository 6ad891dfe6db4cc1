//! Prometheus metrics of `pd-router`, served on `--metrics-port`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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

pub struct RouterMetrics {
    registry: Registry,
    pub requests: Family<DecisionLabels, Counter>,
    pub picks: Family<PickLabels, Counter>,
    pub pick_duration: Histogram,
    pub inflight: Family<EndpointLabels, Gauge>,
    pub errors: Family<ErrorLabels, Counter>,
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
        RouterMetrics {
            registry,
            requests,
            picks,
            pick_duration,
            inflight,
            errors,
        }
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
        let text = m.render();
        for line in [
            r#"pd_router_requests_total{decision="remote"} 1"#,
            r#"pd_router_picks_total{profile="decode",endpoint="http://d:1"} 1"#,
            r#"pd_router_errors_total{class="decode_unavailable"} 1"#,
            r#"pd_router_inflight{endpoint="http://d:1"} 1"#,
            "pd_router_pick_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
