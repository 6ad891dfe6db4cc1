//! The life of a P/D request, as named phases:
//! `read_body` -> `parse` -> `decide` -> `prefill` (with retries) -> `decode`
//! -> response rewrite (in `body`). Passthrough, `/health` and `/ready` live
//! here too. Connectors only build bodies; this module sends them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rand::Rng;
use serde_json::{Map, Value};

use crate::allow::{Denied, PoolEndpoints, PrefillGuard};
use crate::body::{rewrite_usage, Observed};
use crate::config::{split_host_port, Config, PrefillFailurePolicy};
use crate::connectors::{self, Connector, Legs, PdRequest};
use crate::error::ProxyError;
use crate::metrics::{Decision, Metrics};
use crate::request::{ApiKind, TokenCounter};
use crate::sanitize;
use crate::upstream::{self, HttpClient, UpstreamError};
use crate::validate;

pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";
pub const DATA_PARALLEL_HEADER: &str = "x-data-parallel-host-port";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Routing headers that only mean something to a sidecar; never forwarded upstream (and set
/// only by the router: a client's are removed).
pub const ROUTING_HEADERS: [&str; 4] = [
    PREFILLER_HEADER,
    "x-encoder-hosts-ports",
    DATA_PARALLEL_HEADER,
    "x-kv-cache-source-host-port",
];
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

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
}

impl Shared {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Shared, String> {
        let tokens = TokenCounter::load(cfg.tokenizer.as_deref())?;
        let connector = connectors::for_kind(cfg.connector, cfg.sglang_bootstrap_port);
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

/// The prefill target named by the router: the header may repeat or hold a
/// comma list (first wins, or a random one with sampling) and may carry a
/// legacy `http://` prefix.
pub fn prefill_target(headers: &HeaderMap, sampling: bool) -> Option<String> {
    let candidates: Vec<&str> = headers
        .get_all(PREFILLER_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let pick = if sampling && candidates.len() > 1 {
        candidates[rand::rng().random_range(0..candidates.len())]
    } else {
        candidates[0]
    };
    let pick = pick
        .strip_prefix("http://")
        .or_else(|| pick.strip_prefix("https://"))
        .unwrap_or(pick);
    Some(pick.trim_end_matches('/').to_string())
}

/// Headers for an upstream leg: the client's, minus hop-by-hop and routing headers, plus the
/// client's address in `x-forwarded-for`.
pub fn forward_headers(inbound: &HeaderMap, peer: Option<SocketAddr>) -> HeaderMap {
    let mut out = inbound.clone();
    let listed: Vec<HeaderName> = inbound
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in listed {
        out.remove(name);
    }
    for name in HOP_BY_HOP.iter().chain(ROUTING_HEADERS.iter()) {
        out.remove(*name);
    }
    out.remove(header::CONTENT_LENGTH);
    if let Some(peer) = peer {
        let ip = peer.ip().to_string();
        let value = match inbound.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert("x-forwarded-for", v);
        }
    }
    out
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
}

/// Handler of the four P/D routes.
pub async fn pd_handler(State(state): State<AppState>, req: Request) -> Response {
    let start = Instant::now();
    let api = match ApiKind::from_path(req.uri().path()) {
        Some(api) => api,
        None => return passthrough(State(state), req).await,
    };
    let shared = state.shared.clone();
    match run(&state, api, req, start).await {
        Ok((decision, resp)) => {
            shared.metrics.count(api.route(), decision);
            resp
        }
        Err(err) => {
            shared.metrics.error(err.code());
            shared.metrics.count(api.route(), Decision::failed);
            tracing::warn!(error = %err, route = api.route(), "request failed");
            err.into_response()
        }
    }
}

async fn run(
    state: &AppState,
    api: ApiKind,
    req: Request,
    start: Instant,
) -> Result<(Decision, Response), ProxyError> {
    let shared = &state.shared;
    let (parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let target = prefill_target(&parts.headers, shared.cfg.prefiller_sampling);
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
    };

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
        Route::Local(_) => Ok((Decision::local, ctx.decode(raw, None).await?)),
        Route::Refused(err) => ctx.prefill_failed(err, raw).await,
        Route::Remote(target) => {
            let pd = PdRequest {
                api,
                body: &body,
                prefill_target: &target,
            };
            match shared.connector.legs(&pd) {
                Legs::Sequential { prefill } => {
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
                        Err(err) => ctx.prefill_failed(err, raw).await,
                    }
                }
                Legs::Concurrent { prefill, decode } => {
                    ctx.concurrent(&target, prefill, decode, raw).await
                }
            }
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge {
        limit: usize,
    },
    Read(String),
    /// No bytes arrived for this long (slowloris).
    Stalled {
        ms: u64,
    },
}

/// How long a request body may go without a byte before the request is
/// answered 408 (`TANDEM_BODY_IDLE_TIMEOUT_MS`, default 30 s): a body that
/// stalls must not hold a task, a socket and an in-flight slot for ever.
pub fn body_idle_timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| crate::server::env_duration_ms("TANDEM_BODY_IDLE_TIMEOUT_MS", 30_000))
}

/// Reads a request body up to `limit` bytes, refusing early when Content-Length says more.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let idle = body_idle_timeout();
    let mut body = Limited::new(body, limit);
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(BodyError::Stalled {
                    ms: idle.as_millis() as u64,
                })
            }
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(BodyError::TooLarge { limit })
            }
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
        }
    }
}

/// Reads the request body up to the limit (413 past it).
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ProxyError> {
    read_limited(headers, body, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit },
            BodyError::Read(msg) => ProxyError::BodyRead(msg),
            BodyError::Stalled { ms } => ProxyError::BodyTimeout(ms),
        })
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
        let headers = json_headers(self.headers.clone(), bytes.len());
        prefill_with_retries(self.shared(), target, &uri, &headers, bytes).await
    }

    /// SGLang: both legs at once. The prefill runs as its own task; if it fails
    /// before the decode engine answers, the decode request is dropped, and if it
    /// fails later the decode stream is ended with an error, so the client never
    /// hangs on a decode that will never get its KV cache.
    async fn concurrent(
        &self,
        target: &str,
        prefill: Map<String, Value>,
        decode: Map<String, Value>,
        raw: Bytes,
    ) -> Result<(Decision, Response), ProxyError> {
        let shared = self.state.shared.clone();
        let bytes = Bytes::from(Value::Object(prefill).to_string());
        let uri = upstream_uri(shared.prefill_scheme(), target, &self.path_and_query)?;
        let headers = json_headers(self.headers.clone(), bytes.len());
        let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel::<ProxyError>();
        let owned_target = target.to_string();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let result = prefill_with_retries(&shared, &owned_target, &uri, &headers, bytes).await;
            shared
                .metrics
                .prefill_duration
                .observe(start.elapsed().as_secs_f64());
            if let Err(err) = result {
                let _ = failed_tx.send(err);
            }
        });
        let watch = PrefillWatch::new(task.abort_handle());
        let decode_bytes = Bytes::from(Value::Object(decode).to_string());
        let decode_fut = self.send_decode(decode_bytes);
        tokio::pin!(decode_fut);
        enum First {
            Prefill(Result<ProxyError, tokio::sync::oneshot::error::RecvError>),
            Decode(Result<(http::Response<Incoming>, Instant), ProxyError>),
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
                        tracing::warn!(error = %err, "sglang prefill failed; serving without bootstrap");
                        Ok((Decision::fallback, self.decode(raw, None).await?))
                    }
                }
            }
            // The prefill succeeded (its sender is gone): nothing left to watch.
            First::Prefill(Err(_)) => {
                let (resp, sent) = decode_fut.await?;
                Ok((Decision::remote, self.stream_back(resp, None, sent, None)))
            }
            First::Decode(sent) => {
                let (resp, sent) = sent?;
                Ok((
                    Decision::remote,
                    self.stream_back(resp, None, sent, Some((failed_rx, watch))),
                ))
            }
        }
    }

    /// The decode leg on the local engine; the response streams back.
    async fn decode(
        &self,
        body: Bytes,
        cached_tokens: Option<u64>,
    ) -> Result<Response, ProxyError> {
        let (resp, sent) = self.send_decode(body).await?;
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if let (Some(cached), true, true) = (cached_tokens, is_json, resp.status().is_success()) {
            return self.rewrite_json(resp, cached, sent).await;
        }
        Ok(self.stream_back(resp, cached_tokens, sent, None))
    }

    /// Sends the decode request; returns the engine's response head and when it was sent.
    async fn send_decode(
        &self,
        body: Bytes,
    ) -> Result<(http::Response<Incoming>, Instant), ProxyError> {
        let shared = self.shared();
        let uri = upstream_uri(
            shared.decode_scheme(),
            &self.decode_authority,
            &self.path_and_query,
        )?;
        let headers = json_headers(self.headers.clone(), body.len());
        let sent = Instant::now();
        let resp =
            upstream::send_buffered(&shared.decode_client, &Method::POST, &uri, &headers, body)
                .await
                .map_err(decode_error)?;
        Ok((resp, sent))
    }

    fn stream_back(
        &self,
        resp: http::Response<Incoming>,
        cached_tokens: Option<u64>,
        sent: Instant,
        prefill: Option<(tokio::sync::oneshot::Receiver<ProxyError>, PrefillWatch)>,
    ) -> Response {
        let metrics = self.shared().metrics.clone();
        let start = self.start;
        let on_first = Box::new(move || {
            metrics
                .decode_first_byte
                .observe(sent.elapsed().as_secs_f64());
            metrics.ttft.observe(start.elapsed().as_secs_f64());
        });
        let (parts, body) = resp.into_parts();
        let mut observed = Observed::new(body, on_first, cached_tokens)
            .on_error(stream_broken(&self.shared().metrics));
        if let Some((failed, watch)) = prefill {
            observed = observed.abort_on(failed, watch);
        }
        client_response(parts, Body::new(observed))
    }

    async fn rewrite_json(
        &self,
        resp: http::Response<Incoming>,
        cached: u64,
        sent: Instant,
    ) -> Result<Response, ProxyError> {
        let (mut parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ProxyError::DecodeFailed(e.to_string()))?
            .to_bytes();
        let metrics = &self.shared().metrics;
        metrics
            .decode_first_byte
            .observe(sent.elapsed().as_secs_f64());
        let bytes = match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut doc) => {
                if rewrite_usage(&mut doc, cached) {
                    Bytes::from(doc.to_string())
                } else {
                    bytes
                }
            }
            Err(_) => bytes,
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        metrics.ttft.observe(self.start.elapsed().as_secs_f64());
        Ok(client_response(parts, Body::from(bytes)))
    }
}

/// Aborts the spawned prefill leg when the response it belongs to is dropped
/// before it ended (the client went away). Once the decode answer has ended,
/// [`PrefillWatch::detach`] lets the prefill leg finish on its own.
pub struct PrefillWatch {
    task: Option<tokio::task::AbortHandle>,
}

impl PrefillWatch {
    pub fn new(task: tokio::task::AbortHandle) -> Self {
        PrefillWatch { task: Some(task) }
    }

    /// The response ended normally: the prefill leg is no longer ours to cancel.
    pub fn detach(&mut self) {
        self.task = None;
    }
}

impl Drop for PrefillWatch {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn prefill_with_retries(
    shared: &Shared,
    target: &str,
    uri: &Uri,
    headers: &HeaderMap,
    bytes: Bytes,
) -> Result<Value, ProxyError> {
    let mut attempt = 0u32;
    loop {
        let once = prefill_once(shared, target, uri, headers, bytes.clone());
        let result = match tokio::time::timeout(shared.cfg.prefill_timeout, once).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::PrefillTimeout {
                target: target.to_string(),
                timeout_ms: shared.cfg.prefill_timeout.as_millis() as u64,
            }),
        };
        match result {
            Err(err) if err.is_retryable() && attempt < shared.cfg.prefill_max_retries => {
                shared.metrics.prefill_retries.inc();
                let base = shared
                    .cfg
                    .prefill_retry_backoff
                    .saturating_mul(1 << attempt.min(10));
                let jitter = rand::rng().random_range(0.5..1.5);
                tracing::debug!(error = %err, attempt, "prefill attempt failed, retrying");
                tokio::time::sleep(base.mul_f64(jitter)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn prefill_once(
    shared: &Shared,
    target: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Value, ProxyError> {
    let unreachable = |detail: String| ProxyError::PrefillUnreachable {
        target: target.to_string(),
        detail,
    };
    let resp = upstream::send_buffered(&shared.prefill_client, &Method::POST, uri, headers, body)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), shared.cfg.max_body_bytes)
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(ProxyError::PrefillStatus {
            target: target.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    serde_json::from_slice(&body).map_err(|e| ProxyError::PrefillBadResponse {
        target: target.to_string(),
        detail: format!("not JSON: {e}"),
    })
}

/// Counts and logs an engine answer that broke off before its end: the client
/// got a truncated answer, which is an error even though its head said 200.
fn stream_broken(metrics: &Arc<Metrics>) -> Box<dyn FnOnce(&str) + Send> {
    let metrics = metrics.clone();
    Box::new(move |reason| {
        metrics.error(DECODE_STREAM_BROKEN);
        tracing::warn!(error = reason, "the engine's answer broke off mid-stream");
    })
}

/// Error class of an answer that broke off mid-stream.
pub const DECODE_STREAM_BROKEN: &str = "decode_stream_broken";

fn decode_error(err: UpstreamError) -> ProxyError {
    match err {
        UpstreamError::Connect(d) => ProxyError::DecodeUnavailable(d),
        UpstreamError::Other(d) => ProxyError::DecodeFailed(d),
    }
}

/// Every other path: to the local engine untouched, bodies streamed both ways.
pub async fn passthrough(State(state): State<AppState>, req: Request) -> Response {
    let shared = &state.shared;
    let (parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = match upstream_uri(shared.decode_scheme(), &state.decode_authority, path) {
        Ok(uri) => uri,
        Err(err) => return err.into_response(),
    };
    let mut headers = forward_headers(&parts.headers, peer);
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, len.clone());
    }
    let mut out = http::Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    shared.metrics.count("other", Decision::passthrough);
    let start = Instant::now();
    match upstream::send_streaming(&shared.decode_client, out).await {
        Ok(resp) => {
            let metrics = shared.metrics.clone();
            let on_first = Box::new(move || {
                metrics
                    .decode_first_byte
                    .observe(start.elapsed().as_secs_f64())
            });
            let (parts, body) = resp.into_parts();
            client_response(
                parts,
                Body::new(
                    Observed::new(body, on_first, None).on_error(stream_broken(&shared.metrics)),
                ),
            )
        }
        Err(err) => {
            let err = decode_error(err);
            shared.metrics.error(err.code());
            err.into_response()
        }
    }
}

/// Liveness: the sidecar itself is up.
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Readiness: 200 only when the decode engine's `/health` answers 200.
pub async fn ready(State(state): State<AppState>) -> Response {
    let shared = &state.shared;
    let uri = match upstream_uri(shared.decode_scheme(), &state.decode_authority, "/health") {
        Ok(uri) => uri,
        Err(err) => return err.into_response(),
    };
    let mut req = http::Request::new(Body::empty());
    *req.uri_mut() = uri;
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        upstream::send_streaming(&shared.decode_client, req),
    );
    match probe.await {
        Ok(Ok(resp)) if resp.status() == StatusCode::OK => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ready"}"#,
        )
            .into_response(),
        _ => ProxyError::NotReady.into_response(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Allowlist;

    /// A header map of `pairs` (repeats kept), for tests here and in `router`.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn target_takes_first_of_comma_list_and_strips_http() {
        let h = headers(&[(PREFILLER_HEADER, "http://10.0.0.1:8000, 10.0.0.2:8000")]);
        assert_eq!(prefill_target(&h, false).as_deref(), Some("10.0.0.1:8000"));
        let h = headers(&[(PREFILLER_HEADER, "a:1"), (PREFILLER_HEADER, "b:2")]);
        assert_eq!(prefill_target(&h, false).as_deref(), Some("a:1"));
        assert_eq!(
            prefill_target(&headers(&[(PREFILLER_HEADER, " ")]), false),
            None
        );
    }

    #[test]
    fn sampling_picks_among_all() {
        let h = headers(&[(PREFILLER_HEADER, "a:1,b:2,c:3")]);
        let seen: std::collections::HashSet<String> =
            (0..200).filter_map(|_| prefill_target(&h, true)).collect();
        assert_eq!(seen.len(), 3);
    }

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
    fn forwarded_headers_drop_routing_and_hop_by_hop() {
        let h = headers(&[
            (PREFILLER_HEADER, "p:1"),
            ("x-encoder-hosts-ports", "e:1"),
            ("x-data-parallel-host-port", "d:1"),
            ("x-kv-cache-source-host-port", "k:1"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("authorization", "Bearer t"),
            ("traceparent", "00-abc-def-01"),
            ("content-length", "5"),
        ]);
        let out = forward_headers(&h, Some("10.1.1.1:5".parse().unwrap()));
        for gone in [
            PREFILLER_HEADER,
            "x-encoder-hosts-ports",
            "x-data-parallel-host-port",
            "x-kv-cache-source-host-port",
            "connection",
            "x-custom-hop",
            "content-length",
        ] {
            assert!(out.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out["traceparent"], "00-abc-def-01");
        assert_eq!(out["x-forwarded-for"], "10.1.1.1");
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
