//! Prometheus metrics of the sidecar, served on `--metrics-port`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Decision {
    /// Prefill on the local decode engine by choice (no prefiller named, short prompt).
    local,
    /// Prefill on the named prefill engine.
    remote,
    /// Remote prefill was wanted but failed or was refused; served locally.
    fallback,
    /// Remote prefill failed and the error went to the client (`--on-prefill-failure=fail`).
    failed,
    /// Not a P/D route: forwarded untouched.
    passthrough,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub decision: Decision,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub class: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub prefill_duration: Histogram,
    pub decode_first_byte: Histogram,
    pub ttft: Histogram,
    pub in_flight: Gauge,
    pub prefill_retries: Counter,
    /// 1 once the InferencePool's pods have been listed (SSRF protection
    /// with --inference-pool), 0 before.
    pub allowlist_synced: Gauge,
    /// Prefill endpoints the InferencePool allows (ready pod IPs x ports).
    pub allowlist_endpoints: Gauge,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~100 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pd_sidecar");
        let m = Metrics {
            requests: Family::default(),
            errors: Family::default(),
            prefill_duration: latency_histogram(),
            decode_first_byte: latency_histogram(),
            ttft: latency_histogram(),
            in_flight: Gauge::default(),
            prefill_retries: Counter::default(),
            allowlist_synced: Gauge::default(),
            allowlist_endpoints: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by route and prefill decision",
            m.requests.clone(),
        );
        registry.register("errors", "Errors by class", m.errors.clone());
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept (EMFILE and the like)",
            crate::server::ACCEPT_ERRORS.clone(),
        );
        registry.register(
            "prefill_duration_seconds",
            "Prefill leg latency, all attempts included",
            m.prefill_duration.clone(),
        );
        registry.register(
            "decode_first_byte_seconds",
            "Decode engine time to first response byte",
            m.decode_first_byte.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Client-visible time to first response byte (TTFT for streams)",
            m.ttft.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being served",
            m.in_flight.clone(),
        );
        registry.register(
            "prefill_retries",
            "Prefill attempts retried",
            m.prefill_retries.clone(),
        );
        registry.register(
            "prefill_allowlist_synced",
            "1 once the InferencePool's pods have been listed (--inference-pool), else 0",
            m.allowlist_synced.clone(),
        );
        registry.register(
            "prefill_allowlist_endpoints",
            "Prefill endpoints the InferencePool allows: ready pod IPs x target ports",
            m.allowlist_endpoints.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn count(&self, route: &'static str, decision: Decision) {
        self.requests
            .get_or_create(&RequestLabels { route, decision })
            .inc();
    }

    pub fn error(&self, class: &'static str) {
        self.errors.get_or_create(&ErrorLabels { class }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.count("/v1/completions", Decision::remote);
        m.error("prefill_timeout");
        let text = m.render();
        assert!(
            text.contains(
                r#"pd_sidecar_requests_total{route="/v1/completions",decision="remote"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pd_sidecar_errors_total{class="prefill_timeout"} 1"#),
            "{text}"
        );
        assert!(text.contains("pd_sidecar_time_to_first_byte_seconds_bucket"));
    }
}
