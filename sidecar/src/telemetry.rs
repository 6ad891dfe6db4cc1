//! OpenTelemetry traces for `pd-sidecar` and `pd-router` (`--tracing`).
//!
//! Off by default. On, spans go to an OTLP collector over gRPC, configured by
//! the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; default `http://localhost:4317`),
//! `OTEL_SERVICE_NAME` (default the binary's name), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default, as llm-d's:
//! `parentbased_traceidratio` at 0.1), `OTEL_TRACES_EXPORTER` (`otlp`, or
//! `none`) and the batch processor's `OTEL_BSP_*`. A W3C `traceparent` from
//! the client is continued, and each upstream leg carries its own span's.
//!
//! [`Trace`] is the handle the request path holds: a span in its context, or
//! nothing when tracing is off (then no header is touched: the client's
//! `traceparent` goes upstream as it came).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use opentelemetry::Value;

/// The process's tracer, set once by [`init`]; unset means tracing is off.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// What [`init`] started; [`Telemetry::shutdown`] flushes the spans still queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter. Blocks: call it off the runtime's workers.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// Starts the OTLP exporter and the tracer for `service` (the default service
/// name). Must run inside the Tokio runtime (the gRPC channel lives there).
pub fn init(service: &str) -> Result<Telemetry, String> {
    let exporter_kind = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_else(|_| "otlp".into());
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler_from_env())
        .with_resource(resource(service));
    match exporter_kind.trim() {
        "none" => tracing::info!("OTEL_TRACES_EXPORTER=none: spans are made but not exported"),
        kind => {
            if kind != "otlp" {
                tracing::warn!(
                    exporter = kind,
                    "OTEL_TRACES_EXPORTER: only otlp (gRPC) and none are supported; using otlp"
                );
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| format!("--tracing: the OTLP exporter: {e}"))?;
            builder = builder.with_batch_exporter(exporter);
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer("tandem");
    TRACER
        .set(tracer)
        .map_err(|_| "--tracing: tracing was started twice".to_string())?;
    tracing::info!(
        endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|_| "http://localhost:4317".into()),
        "OpenTelemetry tracing on"
    );
    Ok(Telemetry { provider })
}

fn resource(service: &str) -> Resource {
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    // OTEL_SERVICE_NAME (read by the builder) wins over the binary's name.
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.is_empty() => builder.build(),
        _ => builder.with_service_name(service.to_string()).build(),
    }
}

/// The sampler `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` name; without
/// them llm-d's default, parent-based with 10% of new traces.
fn sampler_from_env() -> Sampler {
    sampler(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
    )
}

fn sampler(name: Option<&str>, arg: Option<&str>) -> Sampler {
    let ratio = arg
        .and_then(|a| a.trim().parse::<f64>().ok())
        .filter(|r| (0.0..=1.0).contains(r))
        .unwrap_or(0.1);
    let by_ratio = || Sampler::TraceIdRatioBased(ratio);
    match name.map(str::trim).unwrap_or("parentbased_traceidratio") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => by_ratio(),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(by_ratio())),
        other => {
            tracing::warn!(
                sampler = other,
                "unknown OTEL_TRACES_SAMPLER; using parentbased_traceidratio"
            );
            Sampler::ParentBased(Box::new(by_ratio()))
        }
    }
}

struct HeaderExtract<'a>(&'a HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInject<'a>(&'a mut HeaderMap);

impl Injector for HeaderInject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(key),
            HeaderValue::try_from(value.as_str()),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// One span of a request, in its context. Cloning shares the span; it ends
/// at [`Trace::end`] or when the last clone is dropped. `Trace::default()` is
/// no span (tracing off).
#[derive(Clone, Default)]
pub struct Trace {
    cx: Option<Context>,
}

impl Trace {
    /// The request's server span, continuing the caller's `traceparent`.
    pub fn server(name: &'static str, headers: &HeaderMap) -> Trace {
        let Some(tracer) = TRACER.get() else {
            return Trace::default();
        };
        let parent = TraceContextPropagator::new().extract(&HeaderExtract(headers));
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &parent);
        Trace {
            cx: Some(parent.with_span(span)),
        }
    }

    /// A child span starting now.
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Trace {
        self.child_from(name, kind, None)
    }

    /// A child span that started at `start` (say, the request's arrival).
    pub fn child_since(&self, name: &'static str, kind: SpanKind, start: Instant) -> Trace {
        self.child_from(name, kind, Some(start))
    }

    fn child_from(&self, name: &'static str, kind: SpanKind, start: Option<Instant>) -> Trace {
        let (Some(tracer), Some(cx)) = (TRACER.get(), &self.cx) else {
            return Trace::default();
        };
        let mut builder = tracer.span_builder(name).with_kind(kind);
        if let Some(start) = start {
            builder = builder.with_start_time(SystemTime::now() - start.elapsed());
        }
        let span = builder.start_with_context(tracer, cx);
        Trace {
            cx: Some(cx.with_span(span)),
        }
    }

    /// Whether this is a span (tracing on).
    pub fn is_on(&self) -> bool {
        self.cx.is_some()
    }

    pub fn set(&self, key: &'static str, value: impl Into<Value>) {
        if let Some(cx) = &self.cx {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed with `message`.
    pub fn fail(&self, message: impl Into<String>) {
        if let Some(cx) = &self.cx {
            cx.span().set_status(Status::error(message.into()));
        }
    }

    /// Replaces `traceparent` (and `tracestate`) in `headers` with this span's,
    /// so that the upstream's spans are its children. Nothing when tracing is off.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(cx) = &self.cx {
            TraceContextPropagator::new().inject_context(cx, &mut HeaderInject(headers));
        }
    }

    /// Ends the span now (clones still held end nothing more).
    pub fn end(&self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_by_name() {
        let s = |n, a| format!("{:?}", sampler(n, a));
        assert_eq!(
            s(None, None),
            s(Some("parentbased_traceidratio"), Some("0.1"))
        );
        assert!(s(Some("always_on"), None).contains("AlwaysOn"));
        assert!(s(Some("traceidratio"), Some("0.5")).contains("0.5"));
        assert!(s(Some("parentbased_always_off"), None).contains("AlwaysOff"));
        assert!(
            s(Some("traceidratio"), Some("7")).contains("0.1"),
            "out of range"
        );
        assert!(s(Some("bogus"), None).contains("ParentBased"));
    }

    #[test]
    fn without_init_a_trace_is_nothing_and_touches_no_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let t = Trace::server("x", &headers);
        assert!(!t.is_on());
        let child = t.child("y", SpanKind::Client);
        child.set("k", "v");
        child.inject(&mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }
}
