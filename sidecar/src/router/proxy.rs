//! The life of a routed request, as named phases:
//! `read_body` -> `parse` (prompt) -> `schedule` (pick D, decide, pick P) ->
//! `forward` (to D with `x-prefiller-host-port` when P/D; a connect error is
//! retried once on another decode endpoint) -> stream back with the in-flight
//! counts held by the body. Every forwarded request reports its outcome to
//! D's circuit breaker (connect errors, broken connections and 502/503/504
//! are failures). Every other path is forwarded by load only. This module owns
//! the router's HTTP surface and must not make scheduling decisions itself
//! (see `pick`).

use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::request::Parts;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{StatusCode, Uri};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use super::config::{DecodeTarget, RouterConfig};
use super::discovery::Members;
use super::metrics::{Decision, RouterMetrics};
use super::pick::{InflightGuard, Routed, Scheduler};
use super::prefix::{prompt_with, Prompt};
use crate::error::{error_body, ERROR_CODE_HEADER};
use crate::proxy::{
    client_addr, forward_headers, read_limited, BodyError, HOP_BY_HOP, PREFILLER_HEADER,
};
use crate::request::ApiKind;
use crate::sanitize;
use crate::telemetry::Trace;
use crate::upstream::{self, HttpClient, UpstreamError};
use opentelemetry::trace::SpanKind;

/// Typed errors of the router; status and `x-pd-error-code` are functions of the variant.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body stalled: no bytes for {0} ms")]
    BodyTimeout(u64),
    #[error("decode endpoint {endpoint} unavailable: {detail}")]
    DecodeUnavailable { endpoint: String, detail: String },
    #[error("decode endpoint {endpoint} failed: {detail}")]
    DecodeFailed { endpoint: String, detail: String },
    #[error("no healthy decode endpoint")]
    NoHealthyDecode,
    #[error("no decode endpoint holds any of the prompt's KV cache (Prefer: if-available)")]
    NoCachedPrefix,
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::InvalidJson(_)
            | RouterError::InvalidRequest(_)
            | RouterError::BodyRead(_) => StatusCode::BAD_REQUEST,
            RouterError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RouterError::DecodeUnavailable { .. } | RouterError::NoHealthyDecode => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RouterError::DecodeFailed { .. } => StatusCode::BAD_GATEWAY,
            RouterError::NoCachedPrefix => StatusCode::PRECONDITION_FAILED,
        }
    }

    /// Stable machine-readable code, also the `class` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            RouterError::InvalidJson(_) => "invalid_json",
            RouterError::InvalidRequest(_) => "invalid_request",
            RouterError::BodyTooLarge { .. } => "body_too_large",
            RouterError::BodyRead(_) => "body_read",
            RouterError::BodyTimeout(_) => "body_timeout",
            RouterError::DecodeUnavailable { .. } => "decode_unavailable",
            RouterError::DecodeFailed { .. } => "decode_failed",
            RouterError::NoHealthyDecode => "no_healthy_decode",
            RouterError::NoCachedPrefix => "no_cached_prefix",
        }
    }

    /// OpenAI's error types: the client's fault or the server's.
    fn openai_type(&self) -> &'static str {
        if self.status().is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = error_body(&self.to_string(), self.openai_type(), status.as_u16());
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from_static(self.code()));
        response
    }
}

/// Everything the handlers share.
pub struct RouterState {
    pub cfg: RouterConfig,
    /// The endpoints now, replaced whole when discovery finds a change.
    view: RwLock<Arc<View>>,
    pub client: HttpClient,
    /// Metrics scrapes and health checks: their own pool, so probes never wait
    /// behind (or hold) the proxy's connections.
    pub probe_client: HttpClient,
    pub metrics: Arc<RouterMetrics>,
}

/// One version of the set of endpoints: the scheduler over them and where each is.
/// A request works with the view it started with from pick to response.
pub struct View {
    pub scheduler: Scheduler,
    /// Where each endpoint is, in the scheduler's order.
    pub members: Members,
}

impl View {
    /// Where decode endpoint `index` (the scheduler's order) is.
    fn target(&self, index: usize) -> Result<&DecodeTarget, RouterError> {
        self.members
            .decode
            .get(index)
            .ok_or_else(|| RouterError::InvalidRequest("no such decode endpoint".into()))
    }
}

impl RouterState {
    pub fn new(
        cfg: RouterConfig,
        view: View,
        client: HttpClient,
        probe_client: HttpClient,
        metrics: Arc<RouterMetrics>,
    ) -> RouterState {
        RouterState {
            cfg,
            view: RwLock::new(Arc::new(view)),
            client,
            probe_client,
            metrics,
        }
    }

    /// The endpoints now.
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes `view` the endpoints new requests see.
    pub fn set_view(&self, view: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

pub type AppState = Arc<RouterState>;

/// The client's response: the upstream's head minus hop-by-hop headers, its
/// body streamed frame by frame with the in-flight counts attached.
fn client_response(
    resp: http::Response<Incoming>,
    guards: Vec<InflightGuard>,
    spans: Spans,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    Response::from_parts(
        parts,
        Body::new(Guarded {
            inner: body,
            guards: Some(guards),
            spans,
        }),
    )
}

/// The spans an answer holds open: the request's and its decode leg's end
/// with the body; time to first token ends at the first data frame.
#[derive(Default)]
struct Spans {
    open: Vec<Trace>,
    ttft: Option<Trace>,
}

/// A response body that releases its endpoints' in-flight counts when it ends
/// or is dropped (the client went away).
struct Guarded<B> {
    inner: B,
    guards: Option<Vec<InflightGuard>>,
    spans: Spans,
}

impl<B> http_body::Body for Guarded<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.guards = None,
            Poll::Ready(Some(Err(_))) => {
                this.guards = None;
                for span in &this.spans.open {
                    span.fail("the answer broke off");
                }
            }
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                if let Some(ttft) = this.spans.ttft.take() {
                    ttft.end();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn upstream_uri(scheme: &str, authority: &str, path_and_query: &str) -> Result<Uri, RouterError> {
    format!("{scheme}://{authority}{path_and_query}")
        .parse()
        .map_err(|e| RouterError::InvalidRequest(format!("cannot build the upstream URI: {e}")))
}

fn decode_error(endpoint: &str, err: UpstreamError) -> RouterError {
    match err {
        UpstreamError::Connect(detail) => RouterError::DecodeUnavailable {
            endpoint: endpoint.to_string(),
            detail,
        },
        UpstreamError::Other(detail) => RouterError::DecodeFailed {
            endpoint: endpoint.to_string(),
            detail,
        },
    }
}

/// Reads the request body up to the limit (413 past it).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RouterError> {
    read_limited(headers, body, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => RouterError::BodyTooLarge { limit },
            BodyError::Read(msg) => RouterError::BodyRead(msg),
            BodyError::Stalled { ms } => RouterError::BodyTimeout(ms),
        })
}

fn parse(raw: &[u8]) -> Result<Map<String, Value>, RouterError> {
    match serde_json::from_slice(raw) {
        Ok(Value::Object(body)) => Ok(body),
        Ok(_) => Err(RouterError::InvalidRequest(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(RouterError::InvalidJson(e.to_string())),
    }
}

/// Handler of the inference routes.
pub async fn routed(State(state): State<AppState>, req: Request) -> Response {
    let Some(api) = ApiKind::from_path(req.uri().path()) else {
        return passthrough(State(state), req).await;
    };
    let trace = Trace::server("pd_router.request", req.headers());
    trace.set("llm_d.openai.api", api.route());
    match route(&state, api, req, &trace).await {
        Ok(resp) => {
            trace.set(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
            resp
        }
        Err(err) => {
            state.metrics.error(err.code());
            tracing::warn!(error = %err, route = api.route(), "request failed");
            trace.set(
                "http.response.status_code",
                i64::from(err.status().as_u16()),
            );
            trace.set("pd_router.error", err.code());
            trace.fail(err.to_string());
            err.into_response()
        }
    }
}

/// Whether an answer counts against the endpoint's circuit: the statuses a
/// proxy or an overloaded engine gives when it cannot serve.
fn is_failure_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

async fn route(
    state: &RouterState,
    api: ApiKind,
    req: Request,
    trace: &Trace,
) -> Result<Response, RouterError> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let raw = read_body(&parts.headers, body, state.cfg.max_body_bytes).await?;
    let mut body = parse(&raw)?;
    // What the legs read or rewrite is checked here too: a malformed request
    // is answered by the router and reaches no pod.
    crate::validate::check(api, &body).map_err(RouterError::InvalidRequest)?;
    // Transfer parameters are set by the decode sidecar from the prefill's
    // answer, never by a client: a client's would point the decode engine at
    // a host and blocks of its choosing.
    let raw = if sanitize::strip_map(&mut body, &sanitize::SGLANG_RESERVED) {
        // A map of JSON values always serialises.
        Bytes::from(serde_json::to_vec(&body).expect("a JSON map serialises"))
    } else {
        raw
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    let tokenizer = state.cfg.tokenizer.as_ref().map(|t| t.inner.as_ref());
    let prompt = prompt_with(api, &body, tokenizer);

    let view = state.view();
    let cached_only = prefers_if_available(&parts.headers);
    let leg = Leg { trace, start };
    let first = schedule(state, &view, model, &prompt, None, cached_only, trace)?;
    let first_index = first.decode_index;
    let first_decision = Decided::of(&first);
    let err = match forward(state, &view, &parts, &raw, first, &leg).await {
        Err(err @ RouterError::DecodeUnavailable { .. }) => err,
        other => {
            first_decision.count(state);
            return other;
        }
    };
    // No response byte came back, and the body is in memory: another decode
    // endpoint can take it.
    let Ok(second) = schedule(
        state,
        &view,
        model,
        &prompt,
        Some(first_index),
        cached_only,
        trace,
    ) else {
        first_decision.count(state);
        return Err(err);
    };
    state.metrics.retries.inc();
    tracing::info!(failed = %err, retry = %second.decode.label, "retrying on another decode endpoint");
    let decision = Decided::of(&second);
    let result = forward(state, &view, &parts, &raw, second, &leg).await;
    decision.count(state);
    result
}

/// What a forwarded attempt hangs its spans on.
struct Leg<'a> {
    trace: &'a Trace,
    /// When the request arrived (time to first token counts from here).
    start: Instant,
}

/// The prefill decision of the attempt that answers a request, counted once per request.
struct Decided {
    decision: Decision,
    prefill_unavailable: bool,
}

impl Decided {
    fn of(routed: &Routed) -> Decided {
        Decided {
            decision: if routed.prefill.is_some() {
                Decision::remote
            } else {
                Decision::local
            },
            prefill_unavailable: routed.prefill_unavailable,
        }
    }

    fn count(&self, state: &RouterState) {
        state.metrics.count(self.decision);
        if self.prefill_unavailable {
            state.metrics.error("no_prefill_endpoint");
        }
    }
}

/// Picks D (not `exclude`), decides, picks P; counts the picks.
/// RFC 7240 `Prefer: if-available` (llm-d's conditional decode): the request
/// is wanted only where a decode endpoint already holds part of its prefix.
fn prefers_if_available(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| {
            let token = pref.split(';').next().unwrap_or("").trim();
            token.eq_ignore_ascii_case("if-available")
        })
}

/// Picks the pair for one attempt. `cached_only`: a decode pick that holds
/// none of the prompt's blocks is refused (412) before anything is recorded.
fn schedule(
    state: &RouterState,
    view: &View,
    model: &str,
    prompt: &Prompt,
    exclude: Option<usize>,
    cached_only: bool,
    trace: &Trace,
) -> Result<Routed, RouterError> {
    let span = trace.child("pd_router.pick", SpanKind::Internal);
    let started = Instant::now();
    let routed = view
        .scheduler
        .schedule(model, prompt, exclude, started, &mut rand::rng());
    state
        .metrics
        .pick_duration
        .observe(started.elapsed().as_secs_f64());
    let Some(routed) = routed else {
        span.fail("no healthy decode endpoint");
        return Err(RouterError::NoHealthyDecode);
    };
    span.set("pd_router.decode", routed.decode.label.clone());
    span.set("pd_router.decode_score", routed.decode_score);
    span.set("pd_router.prompt_tokens", routed.prompt_tokens as i64);
    span.set("pd_router.uncached_tokens", routed.uncached_tokens as i64);
    span.set(
        "pd_router.decode_matched_blocks",
        routed.decode_matched_blocks as i64,
    );
    if let Some((p, score)) = &routed.prefill {
        span.set("pd_router.prefill", p.label.clone());
        span.set("pd_router.prefill_score", *score);
    }
    span.set("pd_router.prefill_unavailable", routed.prefill_unavailable);
    if cached_only && routed.decode_matched_blocks == 0 {
        span.fail("Prefer: if-available and no prefix cached");
        return Err(RouterError::NoCachedPrefix);
    }
    view.scheduler.record(&routed);
    let metrics = &state.metrics;
    metrics.pick("decode", &routed.decode.label);
    if let Some((p, _)) = &routed.prefill {
        metrics.pick("prefill", &p.label);
    }
    tracing::debug!(
        decode = %routed.decode.label,
        decode_score = routed.decode_score,
        prefill = routed.prefill.as_ref().map(|(p, _)| p.label.as_str()),
        prefill_score = routed.prefill.as_ref().map(|(_, s)| *s),
        prefill_unavailable = routed.prefill_unavailable,
        prompt_tokens = routed.prompt_tokens,
        uncached_tokens = routed.uncached_tokens,
        "pick"
    );
    Ok(routed)
}

/// Sends the request to the picked D (naming P for P/D) and reports the
/// outcome to D's breaker.
async fn forward(
    state: &RouterState,
    view: &View,
    parts: &Parts,
    raw: &Bytes,
    routed: Routed,
    leg: &Leg<'_>,
) -> Result<Response, RouterError> {
    if routed.prefill_unavailable {
        tracing::warn!(decode = %routed.decode.label, "no healthy prefill endpoint: prefilling locally");
    }
    let target = view.target(routed.decode_index)?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = upstream_uri(target.scheme, &target.authority, path)?;
    let peer = client_addr(parts);
    let mut headers = forward_headers(&parts.headers, peer);
    if let Some((p, _)) = &routed.prefill {
        if let Ok(v) = HeaderValue::from_str(&p.label) {
            headers.insert(PREFILLER_HEADER, v);
        }
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
    let span = leg.trace.child("pd_router.decode", SpanKind::Client);
    span.set("pd_router.decode", routed.decode.label.clone());
    if let Some((p, _)) = &routed.prefill {
        span.set("pd_router.prefill", p.label.clone());
    }
    span.inject(&mut headers);
    let ttft = leg
        .trace
        .child_since("pd_router.ttft", SpanKind::Internal, leg.start);
    let sent =
        upstream::send_buffered(&state.client, &parts.method, &uri, &headers, raw.clone()).await;
    if let Ok(resp) = &sent {
        span.set(
            "http.response.status_code",
            i64::from(resp.status().as_u16()),
        );
    }
    match sent {
        // The sidecar says its engine is down (it reached none): nothing was
        // generated, so another decode endpoint can take the request.
        Ok(resp) if engine_behind_is_down(&resp) => {
            routed.outcome.report(false);
            span.fail("the decode pod's engine is down");
            Err(RouterError::DecodeUnavailable {
                endpoint: routed.decode.label.clone(),
                detail: "its engine is unavailable (pd-sidecar answered 503 decode_unavailable)"
                    .into(),
            })
        }
        Ok(resp) => {
            routed.outcome.report(!is_failure_status(resp.status()));
            let spans = Spans {
                open: vec![span, leg.trace.clone()],
                ttft: Some(ttft),
            };
            Ok(client_response(resp, routed.guards, spans))
        }
        Err(e) => {
            routed.outcome.report(false);
            span.fail(e.to_string());
            Err(decode_error(&routed.decode.label, e))
        }
    }
}

/// A decode sidecar's answer that its engine refused the connection: 503
/// with `x-pd-error-code: decode_unavailable`.
fn engine_behind_is_down(resp: &http::Response<hyper::body::Incoming>) -> bool {
    resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && resp
            .headers()
            .get(ERROR_CODE_HEADER)
            .is_some_and(|v| v.as_bytes() == b"decode_unavailable")
}

/// Every other path: to the least loaded decode endpoint, bodies streamed both ways.
pub async fn passthrough(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let peer = client_addr(&parts);
    let view = state.view();
    let Some(pick) = view
        .scheduler
        .pick_by_load(Instant::now(), &mut rand::rng())
    else {
        let err = RouterError::NoHealthyDecode;
        state.metrics.error(err.code());
        return err.into_response();
    };
    state.metrics.count(Decision::passthrough);
    let result = async {
        let target = view.target(pick.index)?;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = upstream_uri(target.scheme, &target.authority, path)?;
        let mut headers = forward_headers(&parts.headers, peer);
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, len.clone());
        }
        let mut out = http::Request::new(body);
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;
        upstream::send_streaming(&state.client, out)
            .await
            .map_err(|e| decode_error(&pick.endpoint.label, e))
    }
    .await;
    match result {
        Ok(resp) => {
            pick.outcome.report(!is_failure_status(resp.status()));
            client_response(resp, vec![pick.guard], Spans::default())
        }
        Err(err) => {
            pick.outcome.report(false);
            state.metrics.error(err.code());
            tracing::warn!(error = %err, path = %parts.uri.path(), "passthrough failed");
            err.into_response()
        }
    }
}

fn status_json(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Liveness: 200 while the process runs.
pub async fn health() -> Response {
    status_json(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// Readiness: 200 while at least one decode endpoint's circuit is closed. A
/// half-open one counts only without health checks: then only a trial request
/// can close it, and an unready router would get none.
pub async fn ready(State(state): State<AppState>) -> Response {
    let count_half_open = state.cfg.probes.health_check_interval.is_zero();
    if state
        .view()
        .scheduler
        .any_decode_available(Instant::now(), count_half_open)
    {
        status_json(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        status_json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"no healthy decode endpoint"}"#,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::test_headers as headers;
    use crate::proxy::REQUEST_ID_HEADER;

    #[test]
    fn client_routing_headers_are_removed() {
        let h = headers(&[
            (PREFILLER_HEADER, "evil:22"),
            ("x-kv-cache-source-host-port", "evil:23"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("host", "router:8080"),
            ("content-length", "9"),
            ("authorization", "Bearer t"),
            (REQUEST_ID_HEADER, "abc"),
        ]);
        let out = forward_headers(&h, Some("10.0.0.9:1234".parse().unwrap()));
        for gone in [
            PREFILLER_HEADER,
            "x-kv-cache-source-host-port",
            "connection",
            "x-hop",
            "host",
            "content-length",
        ] {
            assert!(out.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out[REQUEST_ID_HEADER], "abc");
        assert_eq!(out["x-forwarded-for"], "10.0.0.9");
    }

    #[test]
    fn errors_are_openai_json_with_status_by_variant() {
        let resp = RouterError::InvalidJson("eof".into()).into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[ERROR_CODE_HEADER], "invalid_json");
        let down = RouterError::DecodeUnavailable {
            endpoint: "http://d:1".into(),
            detail: "refused".into(),
        };
        assert_eq!(down.status(), 503);
        assert_eq!(down.openai_type(), "server_error");
        assert_eq!(RouterError::BodyTooLarge { limit: 1 }.status(), 413);
        assert!(parse(b"[1]").is_err());
        assert!(matches!(parse(b"{"), Err(RouterError::InvalidJson(_))));
    }
}
