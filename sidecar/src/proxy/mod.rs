//! The life of a P/D request, as named phases:
//! `read_body` -> `parse` -> `decide` -> `prefill` (with retries) -> `decode`
//! -> response rewrite (in `body`). What arrives is read in `inbound`, the
//! prefill leg's retries live in `prefill`, the decode leg and its answer
//! streamed back in `decode`, other paths and the probes in `passthrough`.
//! Connectors only build bodies; this module sends them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Uri;
use hyper::body::Incoming;
use serde_json::{Map, Value};

mod bootstrap;
mod decode;
mod inbound;
mod passthrough;
mod prefill;

#[cfg(test)]
pub(crate) use inbound::tests::headers as test_headers;
pub use inbound::{
    body_idle_timeout, client_addr, forward_headers, prefill_target, read_limited, BodyError,
    DATA_PARALLEL_HEADER, HOP_BY_HOP, KV_CACHE_SOURCE_HEADER, PREFILLER_HEADER, REQUEST_ID_HEADER,
    ROUTING_HEADERS,
};
pub use passthrough::{health, passthrough, ready};
pub use prefill::PrefillWatch;

pub use decode::DECODE_STREAM_BROKEN;
use decode::{decode_error, stream_broken, DecodeLeg};
use inbound::read_body;
use prefill::{prefill_with_retries, Answer};

use crate::allow::{Denied, PoolEndpoints, PrefillGuard};
use crate::config::{split_host_port, Config, PrefillFailurePolicy};
use crate::connectors::{self, Connector, Legs, PdRequest};
use crate::error::ProxyError;
use crate::metrics::{Decision, Metrics};
use crate::request::{ApiKind, TokenCounter};
use crate::sanitize;
use crate::telemetry::Trace;
use crate::upstream::{self, HttpClient};
use crate::validate;
use opentelemetry::trace::SpanKind;

/// Everything shared by all listeners of one sidecar.
pub struct Shared {
    pub cfg: Config,
    pub connector: Box<dyn Connector>,
    pub tokens: TokenCounter,
    pub prefill_client: HttpClient,
    pub decode_client: HttpClient,
    pub metrics: Arc<Metrics>,
    /// SSRF protection: None when it is off.
    pub guard: Option<Arc<PrefillGuard>>,
    /// Mooncake: the prefill pods' engine ids.
    engine_ids: Option<bootstrap::EngineIds>,
    /// This pod's `POD_IP:port`: a KV source naming it is no source.
    self_endpoint: Option<String>,
}

impl Shared {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Shared, String> {
        let tokens = TokenCounter::load(cfg.tokenizer.as_deref())?;
        let connector = connectors::for_config(&cfg);
        let engine_ids = connector.bootstrap_port().map(bootstrap::EngineIds::new);
        let self_endpoint = std::env::var("POD_IP")
            .ok()
            .filter(|ip| !ip.is_empty())
            .map(|ip| format!("{ip}:{}", cfg.port));
        let client = |tls| {
            upstream::build_client(tls, cfg.upstream_idle_timeout, cfg.max_idle_conns_per_host)
        };
        let guard = cfg.ssrf.as_ref().map(|s| {
            Arc::new(PrefillGuard {
                static_list: s.static_list.clone(),
                pool: s.pool.as_ref().map(|_| {
                    Arc::new(PoolEndpoints::with_gauges(
                        metrics.allowlist_synced.clone(),
                        metrics.allowlist_endpoints.clone(),
                    ))
                }),
            })
        });
        Ok(Shared {
            prefill_client: client(cfg.prefiller_tls),
            decode_client: client(cfg.decoder_tls),
            connector,
            engine_ids,
            self_endpoint,
            tokens,
            metrics,
            guard,
            cfg,
        })
    }

    fn prefill_scheme(&self) -> &'static str {
        if self.cfg.prefiller_tls.enabled {
            "https"
        } else {
            "http"
        }
    }

    fn decode_scheme(&self) -> &'static str {
        if self.cfg.decoder_tls.enabled {
            "https"
        } else {
            "http"
        }
    }
}

/// Per-listener state: the decode engine this listener fronts and, on the main
/// listener with data parallelism, the map of rank addresses to engines.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub decode_authority: Arc<str>,
    pub dp_ranks: Option<Arc<HashMap<String, String>>>,
}

/// Why a request was prefilled where it was.
#[derive(Debug)]
pub enum Route {
    Local(&'static str),
    Remote(String),
    /// Remote was wanted but is not possible; the error says why.
    Refused(ProxyError),
}

/// Decision input, kept small and pure so the policy is unit-testable.
#[non_exhaustive]
pub struct DecideInput<'a> {
    pub target: Option<&'a str>,
    pub prompt_tokens: u64,
    pub threshold: u64,
    pub guard: Option<&'a crate::allow::PrefillGuard>,
}

/// Selective P/D: no prefiller named or a short prompt stays local.
pub fn decide(input: DecideInput<'_>) -> Route {
    let Some(target) = input.target else {
        return Route::Local("no_prefiller");
    };
    if split_host_port(target).is_none() {
        return Route::Refused(ProxyError::BadPrefillTarget(target.to_string()));
    }
    if let Some(guard) = input.guard {
        match guard.check(target) {
            Ok(()) => {}
            Err(Denied::NotAllowed) => {
                return Route::Refused(ProxyError::PrefillForbidden(target.to_string()))
            }
            Err(Denied::PoolNotSynced) => {
                return Route::Refused(ProxyError::PrefillPoolNotSynced(target.to_string()))
            }
        }
    }
    if input.prompt_tokens < input.threshold {
        return Route::Local("short_prompt");
    }
    Route::Remote(target.to_string())
}

fn json_headers(mut headers: HeaderMap, len: usize) -> HeaderMap {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers
}

fn upstream_uri(scheme: &str, authority: &str, path_and_query: &str) -> Result<Uri, ProxyError> {
    format!("{scheme}://{authority}{path_and_query}")
        .parse()
        .map_err(|_| ProxyError::BadPrefillTarget(authority.to_string()))
}

/// Response headers for the client: the engine's, minus hop-by-hop.
fn client_response(resp: http::response::Parts, body: Body) -> Response {
    let mut out = Response::from_parts(resp, body);
    for name in HOP_BY_HOP {
        out.headers_mut().remove(name);
    }
    out
}

struct Ctx<'a> {
    state: &'a AppState,
    path_and_query: String,
    headers: HeaderMap,
    start: Instant,
    decode_authority: String,
    /// The request's server span (nothing with tracing off).
    trace: Trace,
}

/// Handler of the four P/D routes.
pub async fn pd_handler(State(state): State<AppState>, req: Request) -> Response {
    let start = Instant::now();
    let api = match ApiKind::from_path(req.uri().path()) {
        Some(api) => api,
        None => return passthrough(State(state), req).await,
    };
    let shared = state.shared.clone();
    let trace = Trace::server("forward_request", req.headers());
    trace.set("llm_d.pd_proxy.connector", shared.connector.name());
    trace.set("llm_d.openai.api", api.route());
    trace.set("url.path", req.uri().path().to_string());
    match run(&state, api, req, start, &trace).await {
        Ok((decision, resp)) => {
            shared.metrics.count(api.route(), decision);
            trace.set("llm_d.pd_proxy.decision", format!("{decision:?}"));
            trace.set(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
            resp
        }
        Err(err) => {
            shared.metrics.error(err.code());
            shared.metrics.count(api.route(), Decision::failed);
            tracing::warn!(error = %err, route = api.route(), "request failed");
            trace.set("llm_d.pd_proxy.decision", "failed");
            trace.set("llm_d.pd_proxy.error", err.code());
            trace.set(
                "http.response.status_code",
                i64::from(err.status().as_u16()),
            );
            trace.fail(err.to_string());
            err.into_response()
        }
    }
}

async fn run(
    state: &AppState,
    api: ApiKind,
    req: Request,
    start: Instant,
    trace: &Trace,
) -> Result<(Decision, Response), ProxyError> {
    let shared = &state.shared;
    let (parts, body) = req.into_parts();
    let peer = client_addr(&parts);
    let target = prefill_target(&parts.headers, shared.cfg.prefiller_sampling);
    let kv_source = kv_source(shared, &parts.headers);
    let decode_authority = match (&state.dp_ranks, parts.headers.get(DATA_PARALLEL_HEADER)) {
        (Some(ranks), Some(v)) => {
            let key = v.to_str().unwrap_or_default().trim().to_string();
            ranks
                .get(&key)
                .cloned()
                .ok_or(ProxyError::UnknownDataParallelRank(key))?
        }
        _ => state.decode_authority.to_string(),
    };
    let ctx = Ctx {
        state,
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: forward_headers(&parts.headers, peer),
        start,
        decode_authority,
        trace: trace.clone(),
    };
    trace.set("llm_d.pd_proxy.disaggregation_used", target.is_some());
    if let Some(target) = &target {
        trace.set(PREFILL_TARGET, target.clone());
    }
    if let Some(source) = &kv_source {
        trace.set("llm_d.pd_proxy.kv_cache_source", source.clone());
    }

    let raw = read_body(&parts.headers, body, shared.cfg.max_body_bytes).await?;
    // Whatever path it takes, no client body carries transfer parameters to
    // an engine: only the sidecar sets them (from the prefill's answer).
    let raw = if shared.cfg.trust_client_kv_transfer_params {
        raw
    } else {
        sanitize::strip(raw, shared.connector.reserved_fields()).map_err(|e| match e {
            sanitize::StripError::InvalidJson(e) => ProxyError::InvalidJson(e),
            sanitize::StripError::NotAnObject => {
                ProxyError::InvalidRequest("the body must be a JSON object".into())
            }
        })?
    };
    // Without a prefiller the sidecar is a transparent proxy, as llm-d's is:
    // the body goes to the engine as received (less the fields above) and
    // the engine validates it.
    let Some(target) = target else {
        let raw = with_kv_source(shared, raw, kv_source.as_deref());
        return Ok((Decision::local, ctx.decode(raw, None).await?));
    };
    let body = match serde_json::from_slice(&raw) {
        Ok(Value::Object(body)) => body,
        Ok(_) => {
            return Err(ProxyError::InvalidRequest(
                "the body must be a JSON object".into(),
            ))
        }
        Err(e) => return Err(ProxyError::InvalidJson(e.to_string())),
    };
    // The fields the prefill leg reads or rewrites are checked before any
    // leg: a malformed request must not cost a prefill engine its compute.
    validate::check(api, &body).map_err(ProxyError::InvalidRequest)?;
    let route = decide(DecideInput {
        target: Some(&target),
        prompt_tokens: shared.tokens.count(api, &body),
        threshold: shared.cfg.prefill_threshold_tokens,
        guard: shared.guard.as_deref(),
    });
    tracing::debug!(?route, route_path = api.route(), "prefill decision");
    match route {
        Route::Local(_) => {
            let raw = with_kv_source(shared, raw, kv_source.as_deref());
            Ok((Decision::local, ctx.decode(raw, None).await?))
        }
        Route::Refused(err) => ctx.prefill_failed(err, raw).await,
        Route::Remote(target) => {
            let engine = match &shared.engine_ids {
                Some(ids) => match ids.resolve(&shared.prefill_client, &target).await {
                    Ok(engine) => Some(engine),
                    Err(err) => return ctx.prefill_failed(err, raw).await,
                },
                None => None,
            };
            let mut pd = PdRequest::new(api, &body, &target);
            pd.kv_source = kv_source.as_deref();
            pd.remote_engine = engine.as_ref();
            let legs = match shared.connector.legs(&pd) {
                Ok(legs) => legs,
                Err(detail) => {
                    let err = ProxyError::PrefillBootstrap {
                        target: target.clone(),
                        detail,
                    };
                    return ctx.prefill_failed(err, raw).await;
                }
            };
            match legs {
                Legs::Sequential { prefill } => {
                    let decode_first = shared.connector.decode_first(&pd);
                    if decode_first {
                        if let Some(resp) = ctx.decode_first(raw.clone()).await? {
                            return Ok((Decision::local, resp));
                        }
                    }
                    let prefill_start = Instant::now();
                    let outcome = ctx.prefill(&target, prefill).await;
                    shared
                        .metrics
                        .prefill_duration
                        .observe(prefill_start.elapsed().as_secs_f64());
                    let decode_body = outcome.and_then(|resp| {
                        let decode =
                            shared.connector.decode_body(&pd, &resp).map_err(|detail| {
                                ProxyError::PrefillBadResponse {
                                    target: target.clone(),
                                    detail,
                                }
                            })?;
                        Ok((decode, prompt_cached_tokens(&resp)))
                    });
                    match decode_body {
                        Ok((decode, cached)) => {
                            let bytes = Bytes::from(Value::Object(decode).to_string());
                            Ok((Decision::remote, ctx.decode(bytes, cached).await?))
                        }
                        // The engine that declined the request must now compute it.
                        Err(err) if decode_first => {
                            let local = shared
                                .connector
                                .decode_body(&pd, &Value::Null)
                                .map_or(raw, |b| Bytes::from(Value::Object(b).to_string()));
                            ctx.prefill_failed(err, local).await
                        }
                        Err(err) => ctx.prefill_failed(err, raw).await,
                    }
                }
                Legs::Concurrent {
                    prefill,
                    decode,
                    prefill_headers,
                } => {
                    ctx.concurrent(&target, prefill, &prefill_headers, decode, raw)
                        .await
                }
            }
        }
    }
}

/// The peer named by `x-kv-cache-source-host-port`, when the engines can
/// pull from one (an OffloadingConnector P2P tier), the value is `host:port`
/// and SSRF protection (when on) allows it; otherwise the header is ignored.
fn kv_source(shared: &Shared, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(KV_CACHE_SOURCE_HEADER)?.to_str().ok()?.trim();
    if value.is_empty() {
        return None;
    }
    if !shared.cfg.connector.p2p_pull(shared.cfg.enable_p2p_pull) {
        tracing::debug!(
            connector = shared.cfg.connector.as_str(),
            "ignoring {KV_CACHE_SOURCE_HEADER}: the connector has no P2P tier"
        );
        return None;
    }
    if split_host_port(value).is_none() {
        tracing::info!(value, "ignoring a malformed {KV_CACHE_SOURCE_HEADER}");
        return None;
    }
    if let Some(guard) = shared.guard.as_deref() {
        if guard.check(value).is_err() {
            tracing::info!(
                value,
                "SSRF protection: {KV_CACHE_SOURCE_HEADER} not allowed, ignoring it"
            );
            return None;
        }
    }
    Some(value.to_string())
}

/// A request served by the local engine alone, with a KV source: the engine
/// is told to pull the cached prefix from it (`remote_kv_source`) instead of
/// recomputing it. A source naming this pod, or a body that is not a JSON
/// object (the engine answers that), goes as it is.
fn with_kv_source(shared: &Shared, raw: Bytes, source: Option<&str>) -> Bytes {
    let Some(source) = source else {
        return raw;
    };
    if shared
        .self_endpoint
        .as_deref()
        .is_some_and(|me| connectors::same_endpoint(me, source))
    {
        return raw;
    }
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&raw) else {
        return raw;
    };
    let mut params = Map::new();
    params.insert(
        connectors::REMOTE_KV_SOURCE.into(),
        connectors::P2pTier::of(&shared.cfg).source_params(source),
    );
    // The sidecar owns this field: whatever the client sent is replaced.
    body.insert(sanitize::KV_TRANSFER_PARAMS.into(), Value::Object(params));
    Bytes::from(Value::Object(body).to_string())
}

/// The prefill engine's prompt cache hits, for the decode response's usage.
fn prompt_cached_tokens(resp: &Value) -> Option<u64> {
    let usage = resp.get("usage")?;
    usage
        .get("prompt_tokens_details")
        .or_else(|| usage.get("input_tokens_details"))
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .or(Some(0))
}

impl Ctx<'_> {
    fn shared(&self) -> &Shared {
        &self.state.shared
    }

    /// Remote prefill did not happen: serve locally, or relay the error.
    async fn prefill_failed(
        &self,
        err: ProxyError,
        raw: Bytes,
    ) -> Result<(Decision, Response), ProxyError> {
        // A relayed error is counted once, by pd_handler.
        match self.shared().cfg.on_prefill_failure {
            PrefillFailurePolicy::Fail => Err(err),
            PrefillFailurePolicy::Fallback => {
                self.shared().metrics.error(err.code());
                tracing::warn!(error = %err, "remote prefill failed; serving with local prefill");
                Ok((Decision::fallback, self.decode(raw, None).await?))
            }
        }
    }

    /// The prefill leg with bounded retries (502/503/504 and connection errors).
    async fn prefill(&self, target: &str, body: Map<String, Value>) -> Result<Value, ProxyError> {
        let bytes = Bytes::from(Value::Object(body).to_string());
        let uri = upstream_uri(self.shared().prefill_scheme(), target, &self.path_and_query)?;
        let mut headers = json_headers(self.headers.clone(), bytes.len());
        let span = self.leg_span(PREFILL_SPAN, PREFILL_TARGET, target);
        span.inject(&mut headers);
        let result =
            prefill_with_retries(self.shared(), target, &uri, &headers, bytes, Answer::Json).await;
        end_prefill_span(&span, &result);
        result
    }

    /// A leg's client span, child of the request's, naming its target under `target_key`.
    fn leg_span(&self, name: &'static str, target_key: &'static str, target: &str) -> Trace {
        let span = self.trace.child(name, SpanKind::Client);
        span.set("llm_d.pd_proxy.connector", self.shared().connector.name());
        span.set(target_key, target.to_string());
        span
    }

    /// SGLang, Mooncake, offloading: both legs at once. The prefill runs as its own task; if it fails
    /// before the decode engine answers, the decode request is dropped, and if it
    /// fails later the decode stream is ended with an error, so the client never
    /// hangs on a decode that will never get its KV cache.
    async fn concurrent(
        &self,
        target: &str,
        prefill: Map<String, Value>,
        prefill_headers: &[(&'static str, String)],
        decode: Map<String, Value>,
        raw: Bytes,
    ) -> Result<(Decision, Response), ProxyError> {
        let shared = self.state.shared.clone();
        let bytes = Bytes::from(Value::Object(prefill).to_string());
        let uri = upstream_uri(shared.prefill_scheme(), target, &self.path_and_query)?;
        let mut headers = json_headers(self.headers.clone(), bytes.len());
        for (name, value) in prefill_headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(*name, value);
            }
        }
        let span = self.leg_span(PREFILL_SPAN, PREFILL_TARGET, target);
        span.set("llm_d.pd_proxy.prefill.async", true);
        span.inject(&mut headers);
        let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<ProxyError>();
        let owned_target = target.to_string();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let result = prefill_with_retries(
                &shared,
                &owned_target,
                &uri,
                &headers,
                bytes,
                Answer::Status,
            )
            .await;
            end_prefill_span(&span, &result);
            shared
                .metrics
                .prefill_duration
                .observe(start.elapsed().as_secs_f64());
            if let Err(err) = result {
                // A restarted prefill engine has a new Mooncake engine id.
                if let Some(ids) = &shared.engine_ids {
                    ids.forget(&owned_target);
                }
                let _ = failed_tx.send(err);
            }
        });
        let watch = PrefillWatch::new(task.abort_handle());
        let decode_bytes = Bytes::from(Value::Object(decode).to_string());
        let decode_fut = self.send_decode(decode_bytes);
        tokio::pin!(decode_fut);
        enum First {
            Prefill(Result<ProxyError, tokio::sync::oneshot::error::RecvError>),
            Decode(Result<(http::Response<Incoming>, DecodeLeg), ProxyError>),
        }
        let first = tokio::select! {
            biased;
            res = &mut failed_rx => First::Prefill(res),
            sent = &mut decode_fut => First::Decode(sent),
        };
        match first {
            First::Prefill(Ok(err)) => {
                // Returning drops decode_fut, which cancels the decode request.
                match self.shared().cfg.on_prefill_failure {
                    PrefillFailurePolicy::Fail => Err(err),
                    PrefillFailurePolicy::Fallback => {
                        self.shared().metrics.error(err.code());
                        tracing::warn!(error = %err, "concurrent prefill failed; serving with local prefill");
                        Ok((Decision::fallback, self.decode(raw, None).await?))
                    }
                }
            }
            // The prefill succeeded (its sender is gone): nothing left to watch.
            First::Prefill(Err(_)) => {
                let (resp, leg) = decode_fut.await?;
                Ok((Decision::remote, self.stream_back(resp, None, leg, None)))
            }
            First::Decode(sent) => {
                let (resp, leg) = sent?;
                Ok((
                    Decision::remote,
                    self.stream_back(resp, None, leg, Some((failed_rx, watch))),
                ))
            }
        }
    }
}

/// Span names, as llm-d's sidecar names its legs.
const PREFILL_SPAN: &str = "llm_d.pd_proxy.prefill";
const PREFILL_TARGET: &str = "llm_d.pd_proxy.prefill_target";

/// Ends a prefill leg's span with its outcome.
fn end_prefill_span(span: &Trace, result: &Result<Value, ProxyError>) {
    match result {
        Ok(_) => span.set("llm_d.pd_proxy.prefill.status_code", 200i64),
        Err(err) => {
            if let ProxyError::PrefillStatus { status, .. } = err {
                span.set("llm_d.pd_proxy.prefill.status_code", i64::from(*status));
            }
            span.fail(err.to_string());
        }
    }
    span.end();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::allow::PoolEndpoints;
    use crate::config::Allowlist;

    #[test]
    fn decide_policy() {
        let input = |target, tokens, threshold| DecideInput {
            target,
            prompt_tokens: tokens,
            threshold,
            guard: None,
        };
        assert!(matches!(
            decide(input(None, 1000, 0)),
            Route::Local("no_prefiller")
        ));
        assert!(matches!(
            decide(input(Some("p:1"), 10, 256)),
            Route::Local("short_prompt")
        ));
        assert!(matches!(decide(input(Some("p:1"), 256, 256)), Route::Remote(t) if t == "p:1"));
        assert!(matches!(decide(input(Some("p:1"), 0, 0)), Route::Remote(t) if t == "p:1"));
        assert!(matches!(
            decide(input(Some("nonsense"), 999, 0)),
            Route::Refused(ProxyError::BadPrefillTarget(_))
        ));
        let pool = Arc::new(PoolEndpoints::default());
        let guard = PrefillGuard {
            static_list: Allowlist::parse(["ok:1"]).unwrap(),
            pool: Some(pool.clone()),
        };
        let with_guard = |target| {
            decide(DecideInput {
                target: Some(target),
                prompt_tokens: 999,
                threshold: 0,
                guard: Some(&guard),
            })
        };
        assert!(matches!(
            with_guard("evil:1"),
            Route::Refused(ProxyError::PrefillPoolNotSynced(_))
        ));
        assert!(matches!(with_guard("ok:1"), Route::Remote(_)));
        pool.set(["10.0.0.9:8000".parse().unwrap()].into_iter().collect());
        assert!(matches!(with_guard("10.0.0.9:8000"), Route::Remote(_)));
        assert!(matches!(
            with_guard("evil:1"),
            Route::Refused(ProxyError::PrefillForbidden(_))
        ));
    }

    #[test]
    fn cached_tokens_read_from_prefill_usage() {
        let v = serde_json::json!({"usage": {"prompt_tokens_details": {"cached_tokens": 64}}});
        assert_eq!(prompt_cached_tokens(&v), Some(64));
        assert_eq!(
            prompt_cached_tokens(&serde_json::json!({"usage": {"prompt_tokens": 3}})),
            Some(0)
        );
        assert_eq!(prompt_cached_tokens(&serde_json::json!({})), None);
    }
}
